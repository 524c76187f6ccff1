"""Which torch a machine gets: its OS, its GPU (nvidia-smi, ROCm) and the newest build of the locked torch version
that its driver runs. Standard library only; every input can be described instead of detected (launch.py --os,
--gpu), so the choice for any PC is testable here."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

TORCH_INDEX = "https://download.pytorch.org/whl/"

# The CUDA builds PyTorch publishes for the locked torch, newest first, with the oldest driver each CUDA release
# runs on (NVIDIA's CUDA toolkit release notes, table 3: Linux, Windows). Update with the lock's torch version.
CUDA_BUILDS = (
    ("cu130", (580, 65, 6), (580, 88)),
    ("cu128", (570, 26), (570, 65)),
    ("cu126", (560, 28, 3), (560, 76)),
)
# Older drivers still run CUDA 12 builds through CUDA's minor-version compatibility (same table, CUDA 12.x row).
CUDA12_FLOOR = ((525, 60, 13), (527, 41))
ROCM_BUILD = "rocm7.2"
# Cards the newest builds dropped: cu128 and later leave out Maxwell and Pascal (sm_50-61), CUDA 13 also Volta.
MAXWELL_PASCAL = re.compile(r"GTX\s*(7\d\d|9\d\d|10\d\d)|GTX TITAN|TITAN X\b|TITAN Xp|Quadro [MP]\d|Tesla [MP]\d|"
                            r"\bMX\s?[1-4]\d\d|\bGT\s*10\d\d|\bP(4|40|100)\b", re.I)
VOLTA = re.compile(r"TITAN V\b|\bV100\b|Quadro GV|Tesla V", re.I)
BLACKWELL = re.compile(r"RTX\s*50\d\d|Blackwell|\bB(100|200)\b|\bGB\d{2,3}\b|RTX PRO \d{4}", re.I)
# Rough sizes for the free-space check: (download, installed) in GB.
TORCH_SIZE_GB = {"cuda": (3.0, 7.5), "rocm": (4.5, 15.0), "cpu": (0.3, 1.2), "mps": (0.1, 0.6)}
REST_SIZE_GB = (0.7, 2.5)


class LaunchError(Exception):
    """One line for the user: what failed and what to do."""


@dataclass
class Gpu:
    vendor: str  # "nvidia" or "amd"
    name: str
    memory_mib: int | None = None
    driver: str | None = None


@dataclass
class TorchChoice:
    version: str
    variant: str  # cu130, cu128, cu126, rocm7.2, cpu, mps, default (PyPI's build for this platform), custom
    index_url: str | None  # None: pip's configured index (PyPI)
    reason: str
    warnings: list[str] = field(default_factory=list)


# ---- what this machine is -----------------------------------------------------------------------------------
def detect_os() -> str:
    if sys.platform.startswith("win"):
        return "windows"
    return "macos" if sys.platform == "darwin" else "linux"


def _version(text: str | None) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text or "")[:3])


def parse_nvidia_smi(text: str, strict: bool = False) -> list[Gpu]:
    """`nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader` lines. `strict` (a --gpu the
    user typed): a memory that is not a whole number of MiB at least 0, or a driver that is not a version, is one
    line saying what is accepted (a driver "abc" was read as too old, -24564 MiB as 24564)."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.rsplit(",", 2)]
        if len(parts) != 3 or not parts[0]:
            continue
        mem = re.fullmatch(r"(-?\d+)(\s*MiB)?", parts[1], re.I)
        driver = parts[2] if re.fullmatch(r"\d+(\.\d+){0,2}", parts[2]) else None
        if strict and (mem is None or int(mem.group(1)) < 0):
            raise LaunchError(f'--gpu memory "{parts[1]}" is not a size like 12282 MiB (nvidia-smi\'s memory.total)')
        if strict and driver is None:
            raise LaunchError(f'--gpu driver "{parts[2]}" is not a driver version like 566.36 (nvidia-smi\'s '
                              "driver_version)")
        gpus.append(Gpu("nvidia", parts[0], int(mem.group(1)) if mem and int(mem.group(1)) >= 0 else None,
                        driver or (parts[2] or None)))
    return gpus


AMD_NAME = re.compile(r"\b(AMD|Radeon|Instinct)\b", re.I)


def parse_gpu_arg(value: str) -> Gpu | None:
    """--gpu: nvidia-smi's csv fields ("NVIDIA GeForce RTX 4070, 12282 MiB, 566.36"), `none`, `rocm[:NAME]`, or an
    AMD card by its name ("AMD Radeon RX 7900 XTX")."""
    v = value.strip()
    if v.lower() in ("none", "no", "cpu", ""):
        return None
    if v.lower().startswith(("rocm", "amd:")):
        name = v.partition(":")[2].strip() or "AMD GPU"
        return Gpu("amd", name)
    if AMD_NAME.search(v) and v.count(",") < 2:
        return Gpu("amd", v)
    gpus = parse_nvidia_smi(v, strict=True)
    if not gpus:
        raise LaunchError(f'--gpu "{value}" is not "NAME, MEMORY MiB, DRIVER" (as nvidia-smi --query-gpu='
                          'name,memory.total,driver_version --format=csv,noheader prints it), none, rocm, or an AMD '
                          "card's name")
    return gpus[0]


def detect_gpu(os_name: str, run=subprocess.run, which=shutil.which, exists=os.path.exists) -> Gpu | None:
    """The largest NVIDIA card nvidia-smi reports, else an AMD card ROCm sees (Linux), else None."""
    smi = which("nvidia-smi")
    if not smi and os_name == "windows":
        legacy = os.path.join(os.environ.get("ProgramFiles", r"C:\Program Files"), "NVIDIA Corporation", "NVSMI",
                              "nvidia-smi.exe")
        smi = legacy if exists(legacy) else None
    if smi:
        try:
            out = run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                      capture_output=True, text=True, timeout=20)
            gpus = parse_nvidia_smi(out.stdout) if out.returncode == 0 else []
        except (OSError, subprocess.SubprocessError):
            gpus = []
        if gpus:
            return max(gpus, key=lambda g: g.memory_mib or 0)
    if os_name == "linux" and exists("/dev/kfd") and (which("rocminfo") or which("rocm-smi") or exists("/opt/rocm")):
        return Gpu("amd", "AMD GPU (ROCm)")
    return None


# ---- which torch --------------------------------------------------------------------------------------------
def locked_version(lock: Path, package: str = "torch") -> str:
    try:
        text = lock.read_text(encoding="utf-8")
    except OSError as e:
        raise LaunchError(f"cannot read {lock}: {e.strerror}; run launch.py from a complete checkout "
                          "(git clone, then python launch.py)") from None
    m = re.search(rf"^{re.escape(package)}==([^\s;#]+)", text, re.M | re.I)
    if not m:
        raise LaunchError(f"{lock.name} pins no {package} version; restore it with git checkout {lock.name}")
    return m.group(1)


def variant_index(variant: str, os_name: str) -> str | None:
    if variant in ("default", "mps"):
        return None
    if variant == "cpu" and os_name != "linux":
        return None  # PyPI's Windows and macOS torch is the CPU build; Linux's is a multi-GB CUDA one
    return TORCH_INDEX + variant


MACOS_FLOOR = (14, 0)  # torch 2.13's macOS wheels are macosx_14_0_arm64


def choose_torch(os_name: str, machine: str, gpu: Gpu | None, version: str,
                 macos_version: str | None = None) -> TorchChoice:
    """The build of torch `version` for this machine, and why. A machine no build of it runs on gets one line that
    says what would (an Intel Mac, macOS before 14), never a traceback."""
    arm = machine.lower() in ("arm64", "aarch64")
    if os_name == "macos":
        if not arm:
            raise LaunchError(f"this is an Intel Mac: PyTorch's last macOS x86-64 build was torch 2.2.2 (2024), and "
                              f"LoRA Studio needs torch 2.4 or newer (it is tested with {version}). What works: an "
                              "Apple-silicon Mac, a Windows or Linux PC (a CPU trains the embedded model), or Linux "
                              "in a virtual machine on this Mac")
        found = _version(macos_version) if macos_version else None
        if found and found[:2] < MACOS_FLOOR:
            raise LaunchError(f"torch {version} needs macOS {MACOS_FLOOR[0]} (Sonoma) or newer on Apple silicon, and "
                              f"this Mac runs macOS {macos_version}: update macOS (System Settings > General > Software "
                              "Update), then run python3 launch.py again")
        return TorchChoice(version, "mps", None, "Apple silicon: PyPI's build runs on the GPU through MPS")
    if gpu is None:
        where = "PyPI's Windows build" if os_name == "windows" else "PyTorch's CPU index (PyPI's Linux build is CUDA)"
        return TorchChoice(version, "cpu", variant_index("cpu", os_name), f"no NVIDIA or ROCm GPU found: {where}")
    if gpu.vendor == "amd":
        if os_name != "linux":
            return TorchChoice(version, "cpu", variant_index("cpu", os_name), f"{gpu.name}: torch's ROCm builds are "
                               "Linux only, so the CPU build", [f"{gpu.name} is not used: PyTorch publishes ROCm "
                               "builds for Linux only (AMD's Windows preview wheels: rocm.docs.amd.com)"])
        return TorchChoice(version, ROCM_BUILD, TORCH_INDEX + ROCM_BUILD, f"{gpu.name}: PyTorch's {ROCM_BUILD} build")
    if arm and os_name == "windows":
        return TorchChoice(version, "cpu", None, "Windows on Arm: PyTorch has no CUDA build there",
                           [f"{gpu.name} is not used: no CUDA build of torch exists for Windows on Arm"])
    col = 1 if os_name == "windows" else 0
    driver = _version(gpu.driver)
    allowed = card_builds(gpu)
    label = f"{gpu.name}, driver {gpu.driver or 'unknown'}"
    for variant, *mins in allowed:
        if driver >= mins[col]:
            cuda = f"{variant[2:-1]}.{variant[-1]}"
            return TorchChoice(version, variant, TORCH_INDEX + variant,
                               f"{label}: the newest CUDA build this driver runs (CUDA {cuda})")
    if BLACKWELL.search(gpu.name):
        return TorchChoice(version, "cu128", TORCH_INDEX + "cu128", f"{label}: RTX 50-series and other Blackwell "
                           "cards need CUDA 12.8 or newer", [f"driver {gpu.driver} is too old for {gpu.name}: install "
                           "NVIDIA's driver 570 or newer (nvidia.com/drivers); torch will then use the card"])
    floor = CUDA12_FLOOR[col]
    if driver >= floor:
        oldest = allowed[-1]
        return TorchChoice(version, oldest[0], TORCH_INDEX + oldest[0], f"{label}: older than CUDA 12.6 wants, "
                           "so cu126 through CUDA's minor-version compatibility",
                           [f"driver {gpu.driver} is older than {'.'.join(map(str, oldest[col + 1]))}, which CUDA 12.6 "
                            "wants: update it (nvidia.com/drivers) if training fails to start on the GPU"])
    return TorchChoice(version, "cpu", variant_index("cpu", os_name), f"{label}: too old for any CUDA build of torch "
                       f"{version}, so the CPU build", [f"driver {gpu.driver} is older than {'.'.join(map(str, floor))}: "
                       "training runs on the CPU. Update the NVIDIA driver, then run: python launch.py --reinstall"])


def card_builds(gpu: Gpu) -> list[tuple]:
    """The CUDA builds (newest first, with their driver minimums) that have kernels for this card."""
    return [b for b in CUDA_BUILDS if not (MAXWELL_PASCAL.search(gpu.name) and b[0] != "cu126")
            and not (VOLTA.search(gpu.name) and b[0] == "cu130")
            and not (BLACKWELL.search(gpu.name) and b[0] == "cu126")]  # no Blackwell kernels before CUDA 12.8


def fallbacks(choice: TorchChoice, gpu: Gpu | None, os_name: str) -> list[str]:
    """The builds to try, in order, when the chosen one's index does not serve the locked torch for this Python and
    platform: the older CUDA builds this card and driver run, then the CPU build; ROCm falls back to the CPU."""
    if choice.variant.startswith("cu") and gpu is not None:
        col = 1 if os_name == "windows" else 0
        driver, names = _version(gpu.driver), [b[0] for b in card_builds(gpu)]
        older = names[names.index(choice.variant) + 1:] if choice.variant in names else []
        runs = [b[0] for b in card_builds(gpu) if b[0] in older and (driver >= b[col + 1] or
                                                                     driver >= CUDA12_FLOOR[col])]
        return [*runs, "cpu"]
    if choice.variant.startswith("rocm"):
        return ["cpu"]
    return []


def variants() -> list[str]:
    return [b[0] for b in CUDA_BUILDS] + [ROCM_BUILD, "cpu", "default"]


def override(choice: TorchChoice, variant: str | None, index_url: str | None, os_name: str) -> TorchChoice:
    """--torch-variant / --torch-index, checked: a build PyTorch does not publish, a CUDA or ROCm build on a Mac (or
    ROCm on Windows), or an index that is not a URL is one line saying what is accepted."""
    if not variant and not index_url:
        return choice
    if variant and variant not in variants():
        raise LaunchError(f"--torch-variant {variant} is not a torch build; accepted: {', '.join(variants())}")
    if variant and os_name == "macos" and variant not in ("cpu", "default"):
        raise LaunchError(f"--torch-variant {variant} has no macOS build (CUDA and ROCm are for Windows and Linux); "
                          "on a Mac: default (PyPI's build, with MPS) or cpu")
    if variant and os_name == "windows" and variant.startswith("rocm"):
        raise LaunchError(f"--torch-variant {variant}: PyTorch publishes ROCm builds for Linux only; on Windows: "
                          f"{', '.join(b[0] for b in CUDA_BUILDS)}, cpu or default")
    if index_url and not re.match(r"(https?|file)://[^\s]+$", index_url):
        raise LaunchError(f"--torch-index {index_url} is not a URL; give a package index such as "
                          f"{TORCH_INDEX}cu128 (https://, http:// or file://)")
    variant = variant or "custom"
    index = index_url or variant_index(variant, os_name)
    return TorchChoice(choice.version, variant, index, f"asked for with --torch-{'index' if index_url else 'variant'}"
                       f" (this machine would get {choice.variant})")


