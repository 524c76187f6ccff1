"""Process control that works on Windows, Linux and macOS, through psutil where the OS calls differ.

- A trainer runs detached from the app: its own session on POSIX (a Ctrl-C or crash of the app does not reach
  it), its own process group and no console on Windows (closing the app's console window does not end it).
- Pausing (during a Preview render) suspends the trainer and every process under it: SIGSTOP on POSIX and
  NtSuspendProcess on Windows, both through psutil.
- "Is this pid still our trainer" compares the process's command line, so a recycled pid does not count.
  (`os.kill(pid, 0)` is not a probe on Windows: there it terminates the process.)
"""
from __future__ import annotations

import os
import subprocess

import psutil

WINDOWS = os.name == "nt"
BACKGROUND_NICENESS = 10  # POSIX nice value for background work


def detached(windows: bool = WINDOWS) -> dict:
    """Popen keyword arguments for a child that outlives the app."""
    if windows:
        flags = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200) | getattr(subprocess, "CREATE_NO_WINDOW", 0x8000000)
        return {"creationflags": flags}
    return {"start_new_session": True}


def _tree(pid: int) -> list[psutil.Process]:
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return []


def suspend(pid: int) -> int:
    """Suspend `pid` and its descendants; returns how many processes were suspended."""
    done = 0
    for proc in _tree(pid):
        try:
            proc.suspend()
            done += 1
        except psutil.Error:  # ended meanwhile, or not ours to stop
            pass
    return done


def resume(pid: int) -> int:
    done = 0
    for proc in reversed(_tree(pid)):
        try:
            proc.resume()
            done += 1
        except psutil.Error:
            pass
    return done


def running_with(pid: int | None, needle: str) -> bool:
    """True when `pid` is alive and its command line mentions `needle` (a run folder)."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:  # someone else's process (or a protected one): alive, but we cannot tell whose
        return True
    return needle in cmdline if cmdline else True


def lower_priority(pid: int) -> None:
    """Below the app's priority, so a CPU run does not starve the page that watches it; never raises a priority."""
    try:
        proc = psutil.Process(pid)
        if WINDOWS:
            if proc.nice() in (psutil.NORMAL_PRIORITY_CLASS, psutil.ABOVE_NORMAL_PRIORITY_CLASS):
                proc.nice(psutil.BELOW_NORMAL_PRIORITY_CLASS)
        elif proc.nice() < BACKGROUND_NICENESS:
            proc.nice(BACKGROUND_NICENESS)
    except (psutil.Error, OSError):  # it already ended, or the system refuses: run at the default priority
        pass
