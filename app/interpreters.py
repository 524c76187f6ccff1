"""Which Python the environment gets: the one that started launch.py when LoRA Studio supports it (the range
pyproject.toml's requires-python names; 64-bit; native to the CPU, not x86 under Rosetta), else another one on this
machine, else one uv installs. Standard library only, and it must run on old Pythons (3.8) to rescue them."""
from __future__ import annotations

import glob
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

PROBE = ("import json, platform, struct, sys; print(json.dumps({'version': list(sys.version_info[:3]), "
         "'bits': struct.calcsize('P') * 8, 'machine': platform.machine(), 'executable': sys.executable}))")


def supported(root: Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """(lowest, first unsupported) minor version from pyproject.toml's requires-python, the one source the package,
    the lock and this launcher read: ">=3.11,<3.14" is ((3, 11), (3, 14))."""
    text = (root / "pyproject.toml").read_text(encoding="utf-8")
    spec = re.search(r'^requires-python\s*=\s*"([^"]+)"', text, re.M).group(1)
    low = re.search(r">=\s*(\d+)\.(\d+)", spec)
    high = re.search(r"<\s*(\d+)\.(\d+)", spec)
    return (int(low.group(1)), int(low.group(2))), ((int(high.group(1)), int(high.group(2))) if high else (4, 0))


def range_text(root: Path) -> str:
    (a, b), (c, d) = supported(root)
    return f"{a}.{b} to {c}.{d - 1}"


def preferred(root: Path) -> list[str]:
    """The supported minor versions, the order they are looked for: the lowest first (the one the test suite and the
    lock's checks run on: the most tested, and the most packages have wheels for it), then each newer one."""
    (a, b), (c, d) = supported(root)
    return [f"{a}.{m}" for m in range(b, d)] if a == c else [f"{a}.{b}"]


DOWNLOAD = "3.12"  # what uv installs when the machine has none: every package LoRA Studio uses has wheels for it


def translated() -> bool:
    """An x86 process on an Apple-silicon Mac (Rosetta 2): sysctl.proc_translated is 1."""
    if sys.platform != "darwin":
        return False
    try:
        out = subprocess.run(["sysctl", "-n", "sysctl.proc_translated"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.stdout.strip() == "1"


def this_python() -> dict:
    return {"version": list(sys.version_info[:3]), "bits": struct.calcsize("P") * 8, "machine": platform.machine(),
            "executable": sys.executable, "translated": translated()}


def why_not(info: dict, root: Path) -> str | None:
    """Why a Python cannot run LoRA Studio's environment, or None when it can."""
    low, high = supported(root)
    version = tuple(info["version"][:2])
    name = "Python " + ".".join(str(v) for v in info["version"][:2])
    if not low <= version < high:
        return f"{name} is outside the {range_text(root)} LoRA Studio runs on"
    if info.get("bits", 64) != 64:
        return f"{name} is a 32-bit build, and torch has no 32-bit build"
    if info.get("translated"):
        return f"{name} is an Intel (x86-64) build running under Rosetta on this Apple-silicon Mac"
    return None


def probe(python: str, timeout: float = 15) -> dict | None:
    try:
        out = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    try:
        info = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    info["translated"] = sys.platform == "darwin" and info.get("machine") == "x86_64" and _apple_silicon()
    return info


def _apple_silicon() -> bool:
    if platform.machine() == "arm64":
        return True
    return translated()


def candidates(root: Path, os_name: str) -> list[str]:
    """Pythons this machine may have, most likely supported first: the Windows py launcher's list, versioned names
    on the PATH, pyenv's and Homebrew's installs, uv's managed ones."""
    found: list[str] = []
    versions = preferred(root)
    if os_name == "windows" and shutil.which("py"):
        try:
            out = subprocess.run(["py", "-0p"], capture_output=True, text=True, timeout=15).stdout
            found += [m.group(2).strip() for m in re.finditer(r"-V:(\d+\.\d+)\S*\s+\*?\s*(\S.*)", out)
                      if m.group(1) in versions]
        except (OSError, subprocess.SubprocessError):
            pass
    for v in versions:
        for name in (f"python{v}", f"python{v.replace('.', '')}"):
            path = shutil.which(name)
            if path:
                found.append(path)
    pyenv = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    for v in versions:
        found += sorted(glob.glob(os.path.join(pyenv, "versions", f"{v}.*", "bin", f"python{v}")), reverse=True)
        found += [f"/opt/homebrew/bin/python{v}", f"/usr/local/bin/python{v}", f"/usr/bin/python{v}"]
    uv_home = os.environ.get("UV_PYTHON_INSTALL_DIR") or str(Path.home() / ".local" / "share" / "uv" / "python")
    for v in versions:
        found += sorted(glob.glob(os.path.join(uv_home, f"cpython-{v}.*", "bin", f"python{v}")), reverse=True)
    seen, out = set(), []
    for path in found:
        if path not in seen and os.path.exists(path):
            seen.add(path)
            out.append(path)
    return out


def find(root: Path, os_name: str, probe_fn=probe) -> tuple[str, dict] | None:
    """The first supported Python among `candidates`, with what it is."""
    for path in candidates(root, os_name):
        info = probe_fn(path)
        if info is not None and why_not(info, root) is None:
            return path, info
    return None


def with_uv(uv: list[str], root: Path, arm_mac: bool = False) -> tuple[str, dict] | None:
    """A Python uv already manages or installs now (it downloads a standalone build)."""
    for v in dict.fromkeys([v for v in (DOWNLOAD,) if v in preferred(root)] + preferred(root)):
        request = f"cpython-{v}-macos-aarch64" if arm_mac else v
        try:
            subprocess.run([*uv, "python", "install", request], capture_output=True, text=True, timeout=600)
            out = subprocess.run([*uv, "python", "find", request], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            continue
        path = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else ""
        info = probe(path) if path else None
        if info is not None and why_not(info, root) is None:
            return path, info
    return None
