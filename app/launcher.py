"""`python launch.py`: make the environment this machine needs, then start the app. Standard library only, and it
runs on old Pythons too, to rescue them.

First run: a Python LoRA Studio supports (pyproject.toml's requires-python; the one that started this, or another on
the machine, or one uv installs), a virtual environment in `.venv` beside this checkout made by uv (fetched from the
package index when it is not here; pip when uv cannot be had), torch at the version `requirements.lock` pins in the
build for this machine's GPU (NVIDIA: the newest CUDA build its driver runs; AMD on Linux: ROCm; Apple: PyPI's build,
which has MPS; else the CPU build), checked against its index before anything installs, then every other package at
the locked version. Later runs start the app at once and install again only when the lock, pyproject.toml or the
wanted torch build changed (or with --reinstall).

`--dry-run` says what it would do, as one JSON object on the last line; `--os`, `--arch`, `--macos` and `--gpu`
describe another machine, so anyone can see the choice for any PC. Options it does not know go to the app
(`lora-studio --help`). Every failure is one line that says what to do. Output is ASCII: a Windows console may not
print more.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

from app import install_tools, interpreters, torch_index
from app.environment import (STAMP, Step, check_space, explain, extras_for, install_reason, install_steps,  # noqa: F401
                             read_stamp, run_step, say, sha256, space_needed_gb, venv_python, wanted_install)
from app.torch_choice import (TORCH_INDEX, Gpu, LaunchError, TorchChoice, choose_torch,  # noqa: F401
                              detect_gpu, detect_os, fallbacks, locked_version, override, parse_gpu_arg,
                              parse_nvidia_smi, variant_index)

ROOT = Path(__file__).resolve().parent.parent
OSES = ("windows", "linux", "macos")
ARCHES = ("x86_64", "arm64", "aarch64")
RELAUNCHED = "LORA_STUDIO_RELAUNCHED"  # set when this launcher re-ran itself under a supported Python
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
    p.add_argument("--arch", choices=ARCHES, help="describe another machine's CPU (with --dry-run): x86_64, or arm64 "
                   "(aarch64) for Apple silicon, Arm Linux and Windows on Arm")
    p.add_argument("--macos", metavar="VERSION", help="describe a Mac's macOS version, e.g. 13.6 (with --dry-run)")
    p.add_argument("--gpu", metavar='"NAME, MEMORY MiB, DRIVER"', help="describe another machine's GPU as nvidia-smi "
                   "--query-gpu=name,memory.total,driver_version --format=csv,noheader prints it; none for no GPU; "
                   "rocm, or an AMD card's name (\"AMD Radeon RX 7900 XTX\")")
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
        return _main(args, app_args, root, argv)
    except LaunchError as e:
        print(f"LoRA Studio setup: error: {e}", file=sys.stderr, flush=True)
        if args.dry_run:  # a dry run's last line is its JSON, a refusal included
            print(json.dumps({"refused": str(e), "install": None, "steps": []}))
        return 1
    except KeyboardInterrupt:
        print("\nLoRA Studio setup: interrupted; run python launch.py again to finish", file=sys.stderr)
        return 130


def _main(args, app_args: list[str], root: Path, argv: list[str]) -> int:
    real_os = detect_os()
    os_name = args.os or real_os
    if (os_name != real_os or args.arch or args.macos) and not args.dry_run:
        raise LaunchError("--os, --arch and --macos describe another machine: use them with --dry-run (this one runs "
                          f"{real_os} on {platform.machine()})")
    described = os_name != real_os or bool(args.arch or args.macos)
    faked = described or args.gpu is not None
    here = interpreters.this_python()
    machine = args.arch or (("arm64" if here["translated"] else platform.machine()) if not described else
                            ("arm64" if os_name == "macos" else "x86_64"))
    gpu = parse_gpu_arg(args.gpu) if args.gpu is not None else (detect_gpu(os_name) if not described else None)
    macos = args.macos or (platform.mac_ver()[0] if os_name == "macos" and not described else None)
    version = locked_version(root / "requirements.lock")
    torch = override(choose_torch(os_name, machine, gpu, version, macos), args.torch_variant, args.torch_index, os_name)
    if gpu is not None and gpu.memory_mib == 0:
        torch.warnings.append(f"{gpu.name} reports 0 MiB of memory: its size is unknown, so memory plans cannot use it; "
                              "check nvidia-smi")
    python = sys.executable if described else supported_python(root, os_name, here, argv, args.dry_run)
    venv = (args.venv or root / ".venv").expanduser().absolute()
    extras = extras_for(torch, app_args)
    stamp = read_stamp(venv)
    forced = bool(args.torch_variant or args.torch_index)
    if not faked and not forced:
        torch = served(torch, gpu, os_name, machine, python)
    wanted = wanted_install(root, torch, extras)
    reason = install_reason(venv, os_name, stamp, wanted, args.reinstall, forced)
    fresh = not venv_python(venv, os_name).exists()
    uv = install_tools.find_uv(root / ".uv", os_name) if reason and not args.dry_run else None
    if reason and not args.dry_run and uv is None:
        uv = get_uv(python, root, os_name)
    planned_uv = uv or (install_tools.planned_uv(root / ".uv", os_name, here=not described) if args.dry_run else None)
    sources = install_tools.uv_index_args(install_tools.pip_settings(python)) if planned_uv and not described else []
    steps = install_steps(root, venv, os_name, torch, extras, fresh, python, planned_uv, sources) if reason else []
    start = [str(venv_python(venv, os_name)), "-m", "app", *(["--help"] if args.help_app else app_args)]
    if args.dry_run:
        return dry_run(os_name, machine, gpu, torch, venv, root, reason, steps, start, faked, python, planned_uv)
    if reason:
        install(root, venv, os_name, torch, steps, wanted, reason, gpu)
    return start_app(start, os_name, root)


def supported_python(root: Path, os_name: str, here: dict, argv: list[str], dry_run: bool) -> str:
    """This Python when LoRA Studio runs on it; else another supported one on this machine, or one uv installs, and
    this launcher runs again under it (said in one line). A 32-bit build or an Intel one under Rosetta counts as
    unsupported: torch has no build for either."""
    why = interpreters.why_not(here, root)
    if why is None:
        return sys.executable
    if os.environ.get(RELAUNCHED):
        raise LaunchError(f"{why}, and so is the Python this launcher was started with again; install Python 3.12 "
                          "from python.org and run python3.12 launch.py")
    found = interpreters.find(root, os_name)
    if found is None and not dry_run:
        uv = install_tools.find_uv(root / ".uv", os_name) or get_uv(sys.executable, root, os_name, quiet=True)
        if uv is not None:
            say(f"{why}: asking uv for a Python LoRA Studio supports ({interpreters.range_text(root)}; a download "
                "of about 30 MB)")
            found = interpreters.with_uv(uv, root, arm_mac=here["translated"])
    if found is None:
        raise LaunchError(f"{why}, and no Python {interpreters.range_text(root)} is on this machine or could be "
                          "downloaded; install Python 3.12 from python.org, then run python3.12 launch.py (py -3.12 "
                          "launch.py on Windows)")
    path, info = found
    say(f"{why}: using Python {'.'.join(map(str, info['version']))} at {path} for LoRA Studio")
    if dry_run:
        return path
    env = {**os.environ, RELAUNCHED: "1"}
    if os.name == "posix":  # the supported Python takes this process: a signal to it reaches the app, none is orphaned
        os.execve(path, [path, str(root / "launch.py"), *argv], env)
    try:
        code = subprocess.call([path, str(root / "launch.py"), *argv], env=env)
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)


def get_uv(python: str, root: Path, os_name: str, quiet: bool = False) -> list[str] | None:
    """uv from the package index (with pip), or None with a line saying pip installs instead."""
    version = locked_version(root / "requirements.lock", "uv")
    if not quiet:
        say(f"getting uv {version}, a fast installer, from the package index")
    uv, why = install_tools.fetch_uv(python, root / ".uv", version, os_name)
    if uv is None and not quiet:
        say(f"uv could not be had ({why}); installing with pip instead")
    return uv


def served(torch: TorchChoice, gpu, os_name: str, machine: str, python: str) -> TorchChoice:
    """Ask the chosen index, once and briefly, whether it serves the locked torch for this Python and platform. A
    build it lacks falls back to the next this GPU and driver run (said, with why); an index that cannot be reached
    to the user's own index (said now, not after minutes of pip's retries)."""
    if not torch.index_url:
        return torch
    py = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True,
                        text=True).stdout.strip() or "%d.%d" % sys.version_info[:2]
    tried = []
    for variant in [torch.variant, *fallbacks(torch, gpu, os_name)]:
        index = variant_index(variant, os_name)
        if index is None:  # PyPI's build (Windows/macOS CPU): nothing to ask
            return replace(torch, variant=variant, index_url=None, reason=f"{torch.reason}; {'; '.join(tried)}")
        answer = torch_index.check(index, torch.version, variant, py, os_name, machine)
        if not answer.reachable:
            say(f"{answer.detail}: torch {torch.version} comes from your configured package index instead (it may not "
                "be the build for your GPU: lora-studio doctor tells)")
            return replace(torch, index_url=None, reason=f"{torch.reason}; {index} unreachable, your index instead",
                           warnings=[*torch.warnings, f"{index} could not be reached"])
        if answer.ok:
            if tried:
                say(f"{'; '.join(tried)}: installing the {variant} build instead")
                return replace(torch, variant=variant, index_url=index, reason=f"{torch.reason}; {'; '.join(tried)}: "
                               f"{variant} instead")
            return torch
        tried.append(answer.detail)
    raise LaunchError(f"{'; '.join(tried)}; no build of torch {torch.version} this machine runs is served: try "
                      "--torch-variant cpu, or another Python (3.12 has the most builds)")


def dry_run(os_name, machine, gpu, torch, venv, root, reason, steps, start, faked, python, uv) -> int:
    say(f"{os_name} ({machine}), GPU: {gpu.name if gpu else 'none found'}"
        + (" (described with --os/--arch/--macos/--gpu, not detected)" if faked else ""))
    say(f"torch {torch.version} {torch.variant}: {torch.reason}")
    for w in torch.warnings:
        say(f"warning: {w}")
    say(f"installer: {'uv (' + uv[0] + ')' if uv else 'pip'}; Python for the environment: {python}")
    say(f"would install ({reason}):" if reason else f"nothing to install: {venv} is as requirements.lock says")
    for i, s in enumerate(steps, 1):
        say(f"  [{i}/{len(steps)}] {s.title}: {subprocess.list2cmdline(s.cmd)}")
    say(f"then start: {subprocess.list2cmdline(start)}")
    print(json.dumps({
        "os": os_name, "machine": machine, "gpu": asdict(gpu) if gpu else None, "python": python,
        "installer": "uv" if uv else "pip", "torch": {**asdict(torch)}, "venv": str(venv),
        "lock": str(root / "requirements.lock"), "install": reason, "space_gb": space_needed_gb(torch) if reason else 0,
        "steps": [s.cmd for s in steps], "start": start}))
    return 0


def install(root: Path, venv: Path, os_name: str, torch: TorchChoice, steps: list[Step], wanted: dict, reason: str,
            gpu: Gpu | None) -> None:
    python_version = "%d.%d" % sys.version_info[:2]
    if venv.exists() and not venv_python(venv, os_name).exists():
        if any(venv.iterdir()) and not (venv / "pyvenv.cfg").exists():
            raise LaunchError(f"{venv} exists and is not a virtual environment; move it away or pass --venv DIR")
        import shutil

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
        if code:
            raise LaunchError(explain(err, step, os_name, python_version, interpreters.range_text(root)))
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
    python = subprocess.run([str(venv_python(venv, os_name)), "-c", "import platform; print(platform.python_version())"],
                            capture_output=True, text=True).stdout.strip()
    (venv / STAMP).write_text(json.dumps({**wanted, "python": python, "installed_torch": found["v"]}, indent=1),
                              encoding="utf-8")
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
