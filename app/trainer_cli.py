"""Runs `lora-studio` trainer commands for the UI, in child processes below the UI's CPU priority.

Child processes, because decoding and hashing thousands of images in the server would hold its
interpreter lock and every other request (other tabs, live progress) would wait behind it; and the
UI process never imports torch. A lower priority, because importing, validating and captioning, or
training on the CPU, would otherwise take the cores the server and the browser need. It costs the
background work nothing when the cores are free.
"""
from __future__ import annotations

import json
import subprocess
import sys

from .portable import lower_priority
from .workspace import WorkspaceError


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainer", *args]


def run(*args: str, timeout: float = 3600) -> str:
    """stdout of `lora-studio ARGS`; its last error line, as a WorkspaceError, when it fails."""
    with subprocess.Popen(command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                          text=True) as proc:
        lower_priority(proc.pid)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise WorkspaceError(f"`lora-studio {' '.join(args[:2])}` was stopped after {timeout:.0f} s; "
                                 "run it from a terminal to follow its progress") from None
    if proc.returncode != 0:
        lines = (err or out).strip().splitlines()
        raise WorkspaceError(lines[-1].removeprefix("lora-studio: error: ") if lines else f"exit {proc.returncode}")
    return out.strip()


def start(*args: str) -> subprocess.Popen:
    """`lora-studio ARGS` running in the background, for long jobs whose progress lines (stderr, a text pipe) the
    UI shows and which Stop ends. Its stdout goes to a temporary file, read with `result`: a pipe the caller
    leaves unread while it follows stderr would fill up with a large JSON answer and stall the child."""
    import tempfile

    out = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
    proc = subprocess.Popen(command(*args), stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, bufsize=1)
    proc.stdout_file = out
    lower_priority(proc.pid)
    return proc


def result(proc: subprocess.Popen) -> str:
    """What a `start`ed command printed on stdout, once it has ended."""
    proc.wait()
    with proc.stdout_file as out:
        out.seek(0)
        return out.read()


def run_json(*args: str, timeout: float = 3600) -> dict:
    return json.loads(run(*args, timeout=timeout))
