"""Does this CPU compute bf16 fast? Torch-free, so the app's memory plan asks the same question as the trainer's.

A CPU without AVX512-BF16 or AMX (most desktop and many server parts: torch's capability AVX2) runs a bf16 matmul
15-30x slower than fp32 (512x512: 0.25 s against 0.017 s on one core of such a machine), so a CPU run there must not
train in bf16. The flags come from /proc/cpuinfo (Linux), sysctl (macOS); elsewhere from what a trainer process with
torch found and recorded in the cache folder, and until then the answer is no (fp32 is never wrong, only larger).
`LORA_STUDIO_CPU_BF16=fast|slow` overrides it (tests, or a user who measured)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

RECORD = "cpu-bf16.json"


def _record_path() -> Path:
    from trainer.resources import default_cache_dir

    return default_cache_dir() / RECORD


def _linux_flags() -> set[str]:
    text = ""
    if sys.platform.startswith("linux"):
        try:
            text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
        except OSError:
            pass
    words = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            words.update(line.split(":", 1)[1].split())
    return words


@lru_cache(maxsize=1)
def _detected() -> bool | None:
    if sys.platform.startswith("linux"):
        flags = _linux_flags()
        if flags:
            return bool({"avx512_bf16", "amx_bf16", "bf16"} & flags)  # x86 flags, or aarch64's Features
    elif sys.platform == "darwin" and platform.machine() == "arm64":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5)
            return out.stdout.strip() == "1"
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        return bool(json.loads(_record_path().read_text(encoding="utf-8"))["bf16_fast"])
    except (OSError, ValueError, KeyError):
        return None


def bf16_fast() -> bool:
    override = os.environ.get("LORA_STUDIO_CPU_BF16", "").lower()
    if override in ("fast", "slow"):
        return override == "fast"
    return bool(_detected())


def record_from_torch() -> bool:
    """In a process with torch: ask torch's own CPU checks and remember the answer for torch-free callers."""
    import torch

    fast = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or
                getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    if sys.platform.startswith("win"):  # the one platform without a torch-free way to read the flags
        try:
            from trainer.atomic import write_text

            write_text(_record_path(), json.dumps({"bf16_fast": fast,
                                                   "capability": torch.backends.cpu.get_cpu_capability()}))
        except OSError:
            pass
    return fast


def describe() -> str:
    return "fast bf16 (AVX512-BF16 or AMX)" if bf16_fast() else "no fast bf16 (no AVX512-BF16 or AMX): fp32 for CPU runs"


def training_threads(processes: int = 1, cores: int | None = None, env=None) -> int | None:
    """torch's threads for a run on the CPU: one core left to everything else (the app's page, its server, a second
    run), shared among the run's processes; None when OMP_NUM_THREADS says (the user's choice stands).

    torch's default, a spinning OpenMP thread on every core, collapses as soon as anything else wants a core: on this
    2-core machine a tiny-model step (`lora-studio train`, median of 60) took 0.12 s alone, 0.42 s beside one busy
    process and 0.48-0.50 s with a second run beside it (the journey test's run with its page open: 0.35 s); with
    one thread 0.10 s alone, 0.10 s and 0.12-0.14 s. The price with nothing else running, where compute dominates: a
    full-size SD1.5 64 px step took 1.35 s with one thread against 1.04 s with two (2 cores; less on more cores)."""
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS", "").strip():
        return None
    cores = cores or os.cpu_count() or 1
    return max(1, (cores - 1) // max(1, processes))
