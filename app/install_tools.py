"""The launcher's tools: uv (fetched from the package index with pip when it is not on the machine; pip stays the
fallback), the user's own pip configuration handed to uv (their index, mirrors and local wheel folders), and the torch
an environment holds. Standard library only."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

PYPI = "https://pypi.org/simple"


def find_uv(tools: Path, os_name: str) -> list[str] | None:
    """uv on the PATH, or the copy fetched into `tools` before."""
    if os.environ.get("LORA_STUDIO_INSTALLER", "").lower() == "pip":
        return None
    on_path = shutil.which("uv")
    if on_path:
        return [on_path]
    exe = tools / "bin" / ("uv.exe" if os_name == "windows" else "uv")
    return [str(exe)] if exe.is_file() else None


def planned_uv(tools: Path, os_name: str, here: bool = True) -> list[str] | None:
    """The uv a dry run describes: the one here (for this machine), else the copy an install would fetch (None: pip
    installs)."""
    if os.environ.get("LORA_STUDIO_INSTALLER", "").lower() == "pip":
        return None
    return (find_uv(tools, os_name) if here else None) or [str(tools / "bin" / ("uv.exe" if os_name == "windows"
                                                                                 else "uv"))]


def fetch_uv(python: str, tools: Path, version: str, os_name: str, run=subprocess.run) -> tuple[list[str] | None, str]:
    """uv `version` into `tools` with the running Python's pip (uv's wheels are the same for every Python). Returns
    (the command, '') or (None, why not)."""
    if os.environ.get("LORA_STUDIO_INSTALLER", "").lower() == "pip":
        return None, "LORA_STUDIO_INSTALLER=pip"
    cmd = [python, "-m", "pip", "install", "--disable-pip-version-check", "--quiet", "--upgrade", "--target",
           str(tools), f"uv=={version}"]
    try:
        out = run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        return None, str(e)
    found = find_uv(tools, os_name)
    if out.returncode != 0 or found is None:
        lines = [ln for ln in (out.stderr or "").splitlines() if ln.strip()]
        return None, (lines[-1].strip() if lines else f"pip exited with {out.returncode}")
    return found, ""


def pip_settings(python: str, run=subprocess.run) -> dict[str, list[str]]:
    """What the user's pip configuration names (pip config list, and PIP_* variables): index-url, extra-index-url,
    find-links. uv reads none of it; the launcher passes it on, so a mirror or a folder of wheels still serves."""
    out: dict[str, list[str]] = {"index-url": [], "extra-index-url": [], "find-links": []}
    try:
        listed = run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        listed = ""
    for line in listed.splitlines():
        m = re.match(r"(?::env:|[\w-]+)\.([\w-]+)\s*=\s*'?(.*?)'?\s*$", line.strip())
        if m and m.group(1) in out:
            out[m.group(1)] += m.group(2).split()
    for key in out:
        value = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if value:
            out[key] += value.split()
    return {k: list(dict.fromkeys(v)) for k, v in out.items()}


def uv_index_args(settings: dict[str, list[str]]) -> list[str]:
    """uv's flags for the same sources pip would use (folders that do not exist are left out: pip only warns)."""
    args: list[str] = []
    if settings.get("index-url"):
        args += ["--default-index", settings["index-url"][0]]
    for url in settings.get("extra-index-url", []):
        if not url.startswith("file://") or os.path.isdir(url[len("file://"):]):
            args += ["--index", url]
    for link in settings.get("find-links", []):
        if "://" in link or os.path.isdir(link):
            args += ["--find-links", link]
    if settings.get("extra-index-url") or settings.get("find-links"):
        args += ["--index-strategy", "unsafe-best-match"]  # pip's rule: the best version from any of them
    return args


def installed_torch(venv: Path) -> str | None:
    """The torch version an environment holds ('2.13.0+cpu'), from its dist-info: nothing is imported."""
    pattern = [str(venv / "lib" / "python*" / "site-packages" / "torch-*.dist-info"),
               str(venv / "Lib" / "site-packages" / "torch-*.dist-info")]
    for found in (g for p in pattern for g in glob.glob(p)):
        m = re.match(r"torch-(.+)\.dist-info$", Path(found).name)
        if m:
            return m.group(1)
    return None


def build_of(version: str, os_name: str) -> str:
    """The build a torch version is: its local label (cpu, cu128, rocm7.2), else PyPI's for that system."""
    local = version.partition("+")[2]
    if local:
        return local
    return "mps" if os_name == "macos" else ("cpu" if os_name == "windows" else "default")


def same_build(installed: str, wanted: str, os_name: str) -> bool:
    have = build_of(installed, os_name)
    return have == wanted or {have, wanted} <= {"mps", "default"} or \
        (os_name == "windows" and {have, wanted} <= {"cpu", "default"})
