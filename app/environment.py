"""The environment launch.py makes: what it should hold (the lock, pyproject and torch build it was installed from, in
a stamp inside it), whether it must be installed again and why, the install steps (uv, or pip where uv cannot be had)
and, for a failed step, one line with the cause. Standard library only."""
from __future__ import annotations

import hashlib
import json
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from app.install_tools import build_of, installed_torch, same_build
from app.torch_choice import REST_SIZE_GB, TORCH_INDEX, TORCH_SIZE_GB, LaunchError, TorchChoice

STAMP = "lora-studio-install.json"  # inside the venv: what was installed, from which lock


# ---- the environment ----------------------------------------------------------------------------------------
def venv_python(venv: Path, os_name: str) -> Path:
    return venv / ("Scripts/python.exe" if os_name == "windows" else "bin/python")


def sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def wanted_install(root: Path, torch: TorchChoice, extras: list[str]) -> dict:
    return {"lock": sha256(root / "requirements.lock"), "pyproject": sha256(root / "pyproject.toml"),
            "torch": {"version": torch.version, "variant": torch.variant, "index_url": torch.index_url},
            "extras": sorted(extras)}


def read_stamp(venv: Path) -> dict:
    try:
        return json.loads((venv / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def install_reason(venv: Path, os_name: str, stamp: dict, wanted: dict, reinstall: bool, forced_torch: bool) -> str | None:
    """Why an install must run now, or None when the environment is as the lock says. The torch the environment
    holds counts too: a CPU build where this machine now wants ROCm or CUDA (a new card, a driver update) is
    installed again, and a dry run says so instead of "nothing to install"."""
    if not venv_python(venv, os_name).exists():
        return f"first run: no environment in {venv}"
    if reinstall:
        return "--reinstall"
    if not stamp:
        return "no record of a finished install in this environment"
    for key, what in (("lock", "requirements.lock"), ("pyproject", "pyproject.toml")):
        if stamp.get(key) != wanted[key]:
            return f"{what} changed since the last install"
    if set(wanted["extras"]) - set(stamp.get("extras", [])):
        return f"the {', '.join(sorted(set(wanted['extras']) - set(stamp.get('extras', []))))} extra is not installed"
    if forced_torch and stamp.get("torch", {}).get("variant") != wanted["torch"]["variant"]:
        return f"torch {wanted['torch']['variant']} asked for; {stamp.get('torch', {}).get('variant')} is installed"
    have, want = installed_torch(venv), wanted["torch"]["variant"]
    if have and stamp.get("torch", {}).get("variant") != want and not same_build(have, want, os_name):
        return (f"the environment holds torch {have} ({build_of(have, os_name)}), and this machine wants the "
                f"{want} build")
    return None


def extras_for(torch: TorchChoice, app_args: list[str]) -> list[str]:
    extras = ["cuda"] if torch.variant.startswith("cu") else []  # prodigyopt (bitsandbytes is a core dependency)
    if "--window" in app_args:
        extras.append("window")  # pywebview
    return extras


@dataclass
class Step:
    title: str
    cmd: list[str]
    torch_index: str | None = None  # the torch step: its index, for the failure's explanation


def install_steps(root: Path, venv: Path, os_name: str, torch: TorchChoice, extras: list[str], fresh: bool,
                  python: str = sys.executable, uv: list[str] | None = None, sources: list[str] | None = None
                  ) -> list[Step]:
    """uv's steps where uv is there (`uv`; `sources`: the user's pip index settings as uv's flags), else pip's.
    torch installs under the lock's constraints too: its own dependencies resolve once, to the locked versions."""
    py = str(venv_python(venv, os_name))
    lock = str(root / "requirements.lock")
    target = f"{root}[{','.join(extras)}]" if extras else str(root)
    where = f"from {torch.index_url}" if torch.index_url else "from your package index"
    if uv:
        sources = sources or []
        steps = [Step(f"making the environment in {venv} (Python at {python})",
                      [*uv, "venv", "--seed", "--python", python, str(venv)])] if fresh else []
        pick = ["--torch-backend", torch.variant] if torch.index_url and torch.index_url.startswith(TORCH_INDEX) \
            else (["--index-url", torch.index_url, "--index-strategy", "unsafe-best-match"] if torch.index_url
                  else sources)
        steps.append(Step(f"torch {torch.version} ({torch.variant}) {where}", [*uv, "pip", "install", "--python",
                          py, "-c", lock, f"torch=={torch.version}", *pick], torch.index_url))
        steps.append(Step("LoRA Studio and its packages at the locked versions",
                          [*uv, "pip", "install", "--python", py, "-c", lock, *sources, "-e", target]))
        return steps
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
    steps = [Step(f"making the environment in {venv}", [python, "-m", "venv", str(venv)])] if fresh else []
    steps.append(Step("updating pip", [*pip, "-c", lock, "--upgrade", "pip"]))
    cmd = [*pip, "-c", lock, f"torch=={torch.version}"] + (["--index-url", torch.index_url] if torch.index_url else [])
    steps.append(Step(f"torch {torch.version} ({torch.variant}) {where}", cmd, torch.index_url))
    steps.append(Step("LoRA Studio and its packages at the locked versions", [*pip, "-c", lock, "-e", target]))
    return steps


def space_needed_gb(torch: TorchChoice) -> float:
    kind = ("cuda" if torch.variant.startswith("cu") else "rocm" if torch.variant.startswith("rocm")
            else "mps" if torch.variant == "mps" else "cpu")
    return round(sum(TORCH_SIZE_GB[kind]) + sum(REST_SIZE_GB), 1)


def check_space(folder: Path, need_gb: float, disk_usage=shutil.disk_usage) -> None:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free_gb = disk_usage(probe).free / 2**30
    if free_gb < need_gb:
        raise LaunchError(f"not enough disk space: the environment needs about {need_gb:.0f} GB in {probe} and "
                          f"{free_gb:.1f} GB is free; free some space, or put it on another drive with --venv DIR")


# ---- running pip and saying what went wrong -----------------------------------------------------------------
NETWORK = re.compile(r"NameResolutionError|Temporary failure in name resolution|getaddrinfo failed|Failed to "
                     r"establish a new connection|Max retries exceeded|ProxyError|SSLError|ConnectTimeout|Read timed "
                     r"out|No route to host|Network is unreachable|Could not fetch URL|dns error|error sending request for url|"
                     r"Failed to fetch|client error \(Connect\)|operation timed out", re.I)
DISK_FULL = re.compile(r"No space left on device|Errno 28\]|ENOSPC|not enough space on the disk|WinError 112", re.I)
LONG_PATH = re.compile(r"Long Path|WinError 206|filename or extension is too long", re.I)
IN_USE = re.compile(r"WinError 32|being used by another process|WinError 5\]|Access is denied", re.I)
NOT_FOUND = re.compile(r"No matching distribution found for ([^\s]+)|Could not find a version that satisfies the "
                       r"requirement ([^\s]+)|there is no version of ([^\s,]+)|no wheels with a matching (?:Python "
                       r"ABI|platform) tag.* for ([^\s,]+)", re.I)


def explain(stderr: str, step: Step, os_name: str, python_version: str, supported: str = "3.11 to 3.13") -> str:
    """One line for a failed step, from what pip, uv or venv printed: the build, the Python, the network or the disk,
    whichever it was. `supported`: the Pythons LoRA Studio runs on (pyproject.toml's requires-python)."""
    if DISK_FULL.search(stderr):
        return f"the disk filled up while {step.title}; free some space (about 10 GB for a GPU build) and run " \
               "python launch.py again"
    if "ensurepip" in stderr or "No module named venv" in stderr:
        return ("this Python cannot make virtual environments; on Debian or Ubuntu: sudo apt install "
                f"python{python_version}-venv, then run python launch.py again")
    if LONG_PATH.search(stderr):
        return ("Windows refused a long file path; move the LoRA Studio folder closer to the drive root (e.g. "
                "C:\\lora-studio) or enable long paths (Settings > System > For developers), then run it again")
    if IN_USE.search(stderr) and os_name == "windows":
        return ("Windows could not replace a file that is in use; close LoRA Studio (and anything else using "
                ".venv), then run py launch.py again")
    m = NOT_FOUND.search(stderr)
    if NETWORK.search(stderr) and (not m or "from versions: none" in stderr):
        return (f"cannot reach the package index while {step.title}; check the internet connection or proxy "
                "(HTTPS_PROXY), then run python launch.py again")
    if m:
        what = next(g for g in m.groups() if g).rstrip(".`'")
        if what.lower().startswith("torch"):
            return (f"{what} has no build for Python {python_version} on {os_name} ({platform.machine() or 'this CPU'})"
                    f" {'at ' + step.torch_index if step.torch_index else 'on PyPI'}; use Python {supported} from "
                    "python.org (py -3.12 launch.py), or pick a build with --torch-variant")
        return (f"{what} is not available for Python {python_version} on {os_name}; use Python {supported} from "
                "python.org, or check your package index settings (pip config list)")
    errors = [ln.strip() for ln in stderr.splitlines() if ln.strip().startswith(("ERROR", "error"))]
    last = errors[-1] if errors else next((ln.strip() for ln in reversed(stderr.splitlines()) if ln.strip()), "")
    return f"{step.title} failed: {last or 'see the lines above'}"


def run_step(cmd: list[str]) -> tuple[int, str]:
    """Run with pip's own progress on the console; stderr is shown as it comes and kept for `explain`."""
    try:
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                encoding="utf-8", errors="replace")
    except OSError as e:
        return 1, f"{e}"
    kept: list[str] = []
    for line in proc.stderr:
        sys.stderr.write(line)
        kept = (kept + [line])[-300:]
    return proc.wait(), "".join(kept)


def say(text: str) -> None:
    print(f"LoRA Studio setup: {text}", flush=True)
