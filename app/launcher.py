"""`python launch.py`: make the environment this machine needs, then start the app. Standard library only.

First run: a virtual environment in `.venv` beside this checkout; torch at the version `requirements.lock` pins,
in the build for this machine's GPU (NVIDIA: the newest CUDA build its driver runs; AMD on Linux: ROCm; Apple:
PyPI's build, which has MPS; else the CPU build), then every other package at the locked version. Later runs start
the app at once and install again only when the lock or pyproject.toml changed (or with --reinstall).

`--dry-run` says what it would do, as one JSON object on the last line; `--os` and `--gpu` describe another
machine, so anyone can see the choice for any PC. Options it does not know go to the app (`lora-studio --help`).
Every failure is one line that says what to do. Output is ASCII: a Windows console may not print more.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from app.torch_choice import (TORCH_SIZE_GB, REST_SIZE_GB, Gpu, LaunchError, TorchChoice, choose_torch,  # noqa: F401
                               detect_gpu, detect_os, locked_version, override, parse_gpu_arg, parse_nvidia_smi,
                               variant_index)

ROOT = Path(__file__).resolve().parent.parent
STAMP = "lora-studio-install.json"  # inside the venv: what was installed, from which lock
OSES = ("windows", "linux", "macos")
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
    """Why an install must run now, or None when the environment is as the lock says."""
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
    return None


def extras_for(torch: TorchChoice, app_args: list[str]) -> list[str]:
    extras = ["cuda"] if torch.variant.startswith("cu") else []  # bitsandbytes' 8-bit AdamW for the VRAM tiers
    if "--window" in app_args:
        extras.append("window")  # pywebview
    return extras


@dataclass
class Step:
    title: str
    cmd: list[str]
    torch_index: str | None = None  # the torch step: retried from pip's own index when this one cannot be reached


def install_steps(root: Path, venv: Path, os_name: str, torch: TorchChoice, extras: list[str], fresh: bool,
                  python: str = sys.executable) -> list[Step]:
    py = str(venv_python(venv, os_name))
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
    lock = str(root / "requirements.lock")
    steps = []
    if fresh:
        steps.append(Step(f"making the environment in {venv}", [python, "-m", "venv", str(venv)]))
    steps.append(Step("updating pip", [*pip, "-c", lock, "--upgrade", "pip"]))
    cmd = [*pip, f"torch=={torch.version}"] + (["--index-url", torch.index_url] if torch.index_url else [])
    where = f"from {torch.index_url}" if torch.index_url else "from PyPI"
    steps.append(Step(f"torch {torch.version} ({torch.variant}) {where}", cmd, torch.index_url))
    target = f"{root}[{','.join(extras)}]" if extras else str(root)
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
                     r"out|No route to host|Network is unreachable|Could not fetch URL", re.I)
DISK_FULL = re.compile(r"No space left on device|Errno 28\]|ENOSPC|not enough space on the disk|WinError 112", re.I)
LONG_PATH = re.compile(r"Long Path|WinError 206|filename or extension is too long", re.I)
IN_USE = re.compile(r"WinError 32|being used by another process|WinError 5\]|Access is denied", re.I)
NOT_FOUND = re.compile(r"No matching distribution found for ([^\s]+)|Could not find a version that satisfies the "
                       r"requirement ([^\s]+)", re.I)


def explain(stderr: str, step: Step, os_name: str, python_version: str) -> str:
    """One line for a failed step, from what pip (or venv) printed."""
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
        what = m.group(1) or m.group(2)
        if what.lower().startswith("torch"):
            return (f"{what} has no build for Python {python_version} on {os_name} ({platform.machine() or 'this CPU'})"
                    f" {'at ' + step.torch_index if step.torch_index else 'on PyPI'}; use Python 3.10 to 3.13 from "
                    "python.org (py -3.12 launch.py), or pick a build with --torch-variant")
        return (f"{what} is not available for Python {python_version} on {os_name}; use Python 3.10 to 3.13 from "
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


# ---- main ---------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch.py", allow_abbrev=False,
        description="Install LoRA Studio into .venv (torch for this machine's GPU, the rest from requirements.lock) "
                    "on the first run, then start it. Other options go to the app: --port N, --no-browser, "
                    "--workspace DIR, --listen, --window, --shortcut (python launch.py --help-app lists them). "
                    "python launch.py train|dataset|lora|bench|doctor ... runs that lora-studio command in the "
                    "environment (installing it first if needed).")
    p.add_argument("--dry-run", action="store_true", help="say what would be installed and run, install nothing; the "
                   "last line is one JSON object")
    p.add_argument("--os", choices=OSES, help="describe another machine's system (with --dry-run)")
    p.add_argument("--gpu", metavar='"NAME, MEMORY MiB, DRIVER"', help="describe another machine's GPU as nvidia-smi "
                   "--query-gpu=name,memory.total,driver_version --format=csv,noheader prints it; none for no GPU; "
                   "rocm for an AMD card")
    p.add_argument("--torch-variant", metavar="VARIANT", help="install this torch build instead of the detected one: "
                   "cu130, cu128, cu126, rocm7.2, cpu, or default (PyPI's build for this platform)")
    p.add_argument("--torch-index", metavar="URL", help="install torch from this package index instead")
    p.add_argument("--reinstall", action="store_true", help="install again even if nothing changed (e.g. after a "
                   "driver update or a new GPU)")
    p.add_argument("--venv", type=Path, help="where the environment goes (default: .venv in this folder)")
    p.add_argument("--help-app", action="store_true", help="the app's own options")
    return p


# `python launch.py train ...` is `lora-studio train ...` in the environment: the commands need no PATH entry (the
# console script lives in .venv, which a new user never activates). Their options are theirs, --help included.
COMMANDS = ("train", "dataset", "lora", "bench", "doctor", "ui")


def main(argv: list[str] | None = None, *, root: Path = ROOT) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        args, app_args = parser().parse_args([]), argv
    else:
        args, app_args = parser().parse_known_args(argv)
    try:
        return _main(args, app_args, root)
    except LaunchError as e:
        print(f"LoRA Studio setup: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\nLoRA Studio setup: interrupted; run python launch.py again to finish", file=sys.stderr)
        return 130


def _main(args, app_args: list[str], root: Path) -> int:
    real_os = detect_os()
    os_name = args.os or real_os
    if os_name != real_os and not args.dry_run:
        raise LaunchError(f"--os {os_name} describes another machine: use it with --dry-run (this one runs {real_os})")
    faked = os_name != real_os or args.gpu is not None
    machine = platform.machine() if os_name == real_os else ("arm64" if os_name == "macos" else "x86_64")
    if args.gpu is not None:
        gpu = parse_gpu_arg(args.gpu)
    else:
        gpu = detect_gpu(os_name) if os_name == real_os else None
    torch = choose_torch(os_name, machine, gpu, locked_version(root / "requirements.lock"))
    torch = override(torch, args.torch_variant, args.torch_index, os_name)
    venv = (args.venv or root / ".venv").expanduser().absolute()
    extras = extras_for(torch, app_args)
    wanted = wanted_install(root, torch, extras)
    stamp = read_stamp(venv)
    forced = bool(args.torch_variant or args.torch_index)
    reason = install_reason(venv, os_name, stamp, wanted, args.reinstall, forced)
    fresh = not venv_python(venv, os_name).exists()
    steps = install_steps(root, venv, os_name, torch, extras, fresh) if reason else []
    start = [str(venv_python(venv, os_name)), "-m", "app", *(["--help"] if args.help_app else app_args)]
    if args.dry_run:
        return dry_run(os_name, machine, gpu, torch, venv, root, reason, steps, start, faked)
    if reason:
        install(root, venv, os_name, torch, steps, wanted, reason, gpu)
    else:
        installed = stamp.get("torch", {})
        if not forced and installed.get("variant") not in (torch.variant, None) and not faked:
            say(f"note: this machine now looks like torch {torch.variant} ({torch.reason}), but {installed.get('variant')}"
                " is installed; run python launch.py --reinstall to switch")
    return start_app(start, os_name, root)


def dry_run(os_name, machine, gpu, torch, venv, root, reason, steps, start, faked) -> int:
    say(f"{os_name} ({machine}), GPU: {gpu.name if gpu else 'none found'}"
        + (" (described with --os/--gpu, not detected)" if faked else ""))
    say(f"torch {torch.version} {torch.variant}: {torch.reason}")
    for w in torch.warnings:
        say(f"warning: {w}")
    say(f"would install ({reason}):" if reason else f"nothing to install: {venv} is as requirements.lock says")
    for i, s in enumerate(steps, 1):
        say(f"  [{i}/{len(steps)}] {s.title}: {subprocess.list2cmdline(s.cmd)}")
    say(f"then start: {subprocess.list2cmdline(start)}")
    print(json.dumps({
        "os": os_name, "machine": machine, "gpu": asdict(gpu) if gpu else None,
        "torch": {**asdict(torch)}, "venv": str(venv), "lock": str(root / "requirements.lock"),
        "install": reason, "space_gb": space_needed_gb(torch) if reason else 0,
        "steps": [s.cmd for s in steps], "start": start}))
    return 0


def install(root: Path, venv: Path, os_name: str, torch: TorchChoice, steps: list[Step], wanted: dict, reason: str,
            gpu: Gpu | None) -> None:
    if struct.calcsize("P") == 4:
        raise LaunchError("this is a 32-bit Python, and torch has no 32-bit build; install 64-bit Python 3.12 from "
                          "python.org and run py -3.12 launch.py")
    python_version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if sys.version_info >= (3, 14):
        say(f"note: Python {python_version} is newer than the versions LoRA Studio is tested with (3.10-3.13); if a "
            "package has no build for it, install Python 3.12 and run py -3.12 launch.py")
    if venv.exists() and not venv_python(venv, os_name).exists():
        if any(venv.iterdir()) and not (venv / "pyvenv.cfg").exists():
            raise LaunchError(f"{venv} exists and is not a virtual environment; move it away or pass --venv DIR")
        shutil.rmtree(venv)  # a half-made environment from an interrupted first run
    check_space(venv, space_needed_gb(torch))
    say(f"installing ({reason}); torch {torch.version} {torch.variant}: {torch.reason}")
    for w in torch.warnings:
        say(f"warning: {w}")
    if venv.exists():
        (venv / STAMP).unlink(missing_ok=True)  # written again only when every step has finished
    for i, step in enumerate(steps, 1):
        say(f"[{i}/{len(steps)}] {step.title}")
        code, err = run_step(step.cmd)
        if code and step.torch_index and NETWORK.search(err):
            say(f"could not reach {step.torch_index}; installing torch {torch.version} from your package index "
                "instead (it may not be the build for your GPU: lora-studio doctor tells)")
            wanted = {**wanted, "torch": {**wanted["torch"], "index_url": None, "fallback": True}}
            code, err = run_step([c for c in step.cmd if c not in ("--index-url", step.torch_index)])
        if code:
            raise LaunchError(explain(err, step, os_name, python_version))
    check = subprocess.run([str(venv_python(venv, os_name)), "-c", "import json, torch; print(json.dumps({'v': "
                            "torch.__version__, 'cuda': torch.cuda.is_available() and torch.cuda.get_device_name(0)}))"],
                           capture_output=True, text=True)
    try:
        found = json.loads(check.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise LaunchError(f"torch was installed but does not import: {(check.stderr.strip().splitlines() or ['?'])[-1]}"
                          "; run python launch.py --reinstall") from None
    say(f"torch {found['v']} " + (f"uses {found['cuda']}" if found["cuda"] else "runs on the CPU" if torch.variant
                                  != "mps" else "runs on the Apple GPU (MPS)"))
    if gpu and gpu.vendor == "nvidia" and not found["cuda"] and torch.variant.startswith("cu"):
        say(f"warning: torch cannot use {gpu.name} yet; update the NVIDIA driver, then run python launch.py again")
    (venv / STAMP).write_text(json.dumps({**wanted, "python": platform.python_version()}, indent=1), encoding="utf-8")
    say("installed; later runs start at once")


def start_app(cmd: list[str], os_name: str, root: Path) -> int:
    env = {**os.environ, "LORA_STUDIO_LAUNCHER": str(root / "launch.py")}
    command = cmd[3] if len(cmd) > 3 and cmd[3] in COMMANDS and cmd[3] != "ui" else None
    if command is None:
        print("LoRA Studio: starting; Ctrl-C in this window stops it (the command line: python launch.py train "
              "--help, or .venv's lora-studio)", flush=True)
    if os_name != "windows" and os.name == "posix":
        os.execve(cmd[0], cmd, env)  # the app takes this process: Ctrl-C and exit codes as if started directly
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 130
