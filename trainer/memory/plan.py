"""The memory planner: from the GPU's memory (or the RAM when training runs on the CPU) choose the cheapest
combination of memory savings that makes a run fit with a margin, say what each costs in speed, and refuse a
run that cannot fit before anything loads. Torch-free, so the Train tab shows the same plan the trainer uses.

The planner only adds savings: a setting the user turned on stays on, and with `train.fit_memory = false` it
changes nothing and only warns. Among the combinations that fit it picks, in order: the fewest changes to what
is trained (text-encoder training off is the last resort), the smallest slow-down, the fewest changes.
"""
from __future__ import annotations

import itertools
import math
import shutil
import subprocess
from dataclasses import dataclass, field
from importlib import metadata

from trainer.memory import cpu_features
from trainer.memory.estimate import NATIVE, estimate, host_load_gb
from trainer.models.info import peek_family

GB = 1024 ** 3
CUDA_CONTEXT_GB = 0.6  # the driver's and allocator's own share of the card, outside what the estimate counts
MARGIN = 0.10  # the plan leaves this share of the budget free: the estimate is within 10% of measured peaks
# Slow-down of a step from each saving, as measured by `lora-studio bench speed` (bench/results*.md):
# gradient checkpointing SD1.5 512 px 0.26 -> 0.43 s on an H100, 5.15 -> 6.70 s on 2 CPU cores; fp8 frozen
# weights 1.13x the fp16 step on the H100, 6.70 -> 7.67 s (SD1.5) and 43.6 -> 47.1 s (SDXL) on 2 CPU cores (a
# CPU has no fp8 arithmetic: each pass turns every weight back into bf16, by moving bits); caching makes steps faster.
STEP_COST = {
    "checkpointing": {"cuda": 1.65, "cpu": 1.30},
    "fp8": {"cuda": 1.13, "cpu": 1.14},
    # int8 and nf4 dequantize each layer for its pass, as fp8 does. CPU: bench qlora, a full-size SD1.5 step at
    # 64 px in fp32 (where the dequantizing is most of the work): int8 1.24x, nf4 1.54x. CUDA not measured (no GPU
    # since they were built): fp8's cost with a margin, so that fp8 comes first where it fits.
    "int8": {"cuda": 1.15, "cpu": 1.24},
    "nf4": {"cuda": 1.2, "cpu": 1.54},
    "cache": {"cuda": 1.0, "cpu": 1.0},
    "adamw8bit": {"cuda": 1.0, "cpu": 1.0},
    "half": {"cuda": 1.0, "cpu": 1.0},
    "text_encoder_frozen": {"cuda": 1.0, "cpu": 1.0},
    # Not measured (no GPU since it was built): every frozen weight crosses PCIe in each pass, e.g. SDXL's 2.6 GB in
    # fp8 three times a checkpointed step, ~1 s at 8 GB/s beside a ~2 s step. Counted high so that the measured
    # savings come first.
    "offload": {"cuda": 2.0, "cpu": 1.0},
}
STORAGES = {"fp8": "fp8 frozen weights", "int8": "int8 frozen weights", "nf4": "nf4 frozen weights (QLoRA)"}
# What training on a quantized base did to the LoRA, measured by `lora-studio bench qlora` on the embedded model
# (scored on the full-precision base, as users apply it): said in the plan beside the speed.
QUALITY = {"int8": "the LoRA trains on an 8-bit copy of the base",
           "nf4": "the LoRA trains on a 4-bit copy of the base; its samples show it on that copy"}
# Halving the batch and doubling gradient accumulation trains on the same images per step; each micro-batch
# uses the device less fully. Not measured here: a rule of thumb, said as such in the plan.
HALVED_BATCH_COST = 1.1


@dataclass
class Budget:
    device: str  # "cuda" or "cpu": where the run's tensors live
    memory_gb: float  # the device's whole memory (GPU) or the RAM available now (CPU)
    ram_available_gb: float | None  # the host's available RAM, which loading the base needs on any device
    source: str  # where the figure came from, said in the plan

    @property
    def usable_gb(self) -> float:
        spare = self.memory_gb - (CUDA_CONTEXT_GB if self.device == "cuda" else 0.0)
        return max(0.0, spare * (1 - MARGIN))


@dataclass
class Choice:
    name: str
    overrides: list[str]
    cost: str  # what it costs, in words, for the plan
    factor: float  # step-time multiplier
    changes_training: bool = False  # changes what is learned, not only how it is computed
    saving: bool = True  # False: a choice about the CPU's precision, not a memory saving


@dataclass
class Plan:
    budget: Budget
    fits: bool
    peak_gb: float  # the estimate with the chosen savings
    before_gb: float  # the estimate as configured
    choices: list[Choice] = field(default_factory=list)
    host_gb: float | None = None  # host RAM the run needs (loading the base), when it runs on a GPU
    reason: str = ""  # why it cannot fit, with what to do
    fit_memory: bool = True  # train.fit_memory: off, a run that does not fit is warned about, not refused

    @property
    def refused(self) -> bool:
        """Does not fit, and the user left the planner on: the run must not start."""
        return not self.fits and self.fit_memory

    @property
    def overrides(self) -> list[str]:
        return [o for c in self.choices for o in c.overrides]

    @property
    def slowdown(self) -> float:
        return math.prod(c.factor for c in self.choices)

    def text(self) -> str:
        return f"memory plan for {self.budget.source}: {self.verdict()}"

    def verdict(self) -> str:
        """What the plan says, without whom it is for."""
        if not self.fits:
            return self.reason
        usable = f"{self.budget.usable_gb:.1f} GB usable"
        savings = [c for c in self.choices if c.saving]
        notes = "".join(f"; {c.name}: {c.cost}" for c in self.choices if not c.saving)
        if not savings:
            return f"fits as configured (~{self.peak_gb:.1f} GB of {usable}){notes}"
        chosen = "; ".join(f"{c.name} ({c.cost})" for c in savings)
        return (f"~{self.before_gb:.1f} GB as configured does not fit {usable}, so: {chosen}. "
                f"~{self.peak_gb:.1f} GB, steps about {math.prod(c.factor for c in savings):.2f}x as long{notes}")

    def to_dict(self) -> dict:
        return {"source": self.budget.source, "device": self.budget.device, "memory_gb": self.budget.memory_gb,
                "usable_gb": round(self.budget.usable_gb, 2), "fits": self.fits, "peak_gb": self.peak_gb,
                "before_gb": self.before_gb, "overrides": self.overrides, "slowdown": round(self.slowdown, 3),
                "choices": [c.name for c in self.choices], "text": self.text()}


def _has(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def candidates(cfg, device: str) -> list[Choice]:
    """Savings that would change this config (one already on is not offered), cheapest kind first."""
    t, d = cfg.train, cfg.data
    out = []
    slow_half = device == "cpu" and not cpu_features.bf16_fast()  # bf16 would cost 15-30x there: never offered
    if t.mixed_precision == "no" and not slow_half:
        half = "fp16" if device == "cuda" else "bf16"
        out.append(Choice(f"{half} frozen weights", [f"train.mixed_precision={half}"], "no slower; LoRA stays fp32",
                          STEP_COST["half"][device]))
    if not (d.cache_latents and d.cache_text) and not (d.random_crop or d.flip):  # augmentations need live latents
        out.append(Choice("latent and caption caches", ["data.cache_latents=true", "data.cache_text=true"],
                          "faster (14.4 -> 10.1 s a step measured)", STEP_COST["cache"][device]))
    if device == "cuda" and d.cache_ahead:
        out.append(Choice("latents cached before training", ["data.cache_ahead=false"], "no slower; the first step "
                          "waits until every image is encoded (the VAE then never sits beside the denoiser)", 1.0))
    stored = t.frozen_dtype in STORAGES
    if not stored and not (slow_half and t.mixed_precision == "no"):
        f = STEP_COST["fp8"][device]
        out.append(Choice("fp8 frozen weights", ["train.frozen_dtype=fp8"], f"steps {f:.2f}x", f))
    if t.frozen_dtype in ("auto", "fp8"):  # int8 and nf4 compute in any precision, fp32 on a CPU too
        for kind in ("int8", "nf4") if not stored else ("nf4",):
            f = STEP_COST[kind][device]
            out.append(Choice(STORAGES[kind], [f"train.frozen_dtype={kind}"], f"steps {f:.2f}x; {QUALITY[kind]}", f))
    elif t.frozen_dtype == "int8":
        f = STEP_COST["nf4"][device]
        out.append(Choice(STORAGES["nf4"], ["train.frozen_dtype=nf4"], f"steps {f:.2f}x; {QUALITY['nf4']}", f))
    if not t.gradient_checkpointing:
        f = STEP_COST["checkpointing"][device]
        out.append(Choice("gradient checkpointing", ["train.gradient_checkpointing=true"], f"steps {f:.2f}x", f))
    if device == "cuda" and not t.offload:
        f = STEP_COST["offload"][device]
        out.append(Choice("frozen UNet weights streamed from system RAM", ["train.offload=true"],
                          f"steps slower: each layer's weights cross to the GPU in every pass (not measured; "
                          f"counted as {f:.1f}x so it comes last)", f))
    if device == "cuda" and cfg.optim.optimizer == "adamw" and _has("bitsandbytes"):
        out.append(Choice("8-bit AdamW", ["optim.optimizer=adamw8bit"], "no measurable slow-down",
                          STEP_COST["adamw8bit"][device]))
    if cfg.lora.train_text_encoder:
        out.append(Choice("text encoder not trained", ["lora.train_text_encoder=false"],
                          "changes what is learned: the UNet alone learns the trigger", 1.0, changes_training=True))
    if _keeps_t5(cfg):
        out.append(Choice("T5-XXL left out", ["model.t5=false"], "changes the conditioning: prompts rest on the two "
                          "CLIP encoders, which follow long or text-heavy prompts less well", 1.0, changes_training=True))
    return out


def _keeps_t5(cfg) -> bool:
    return cfg.model.t5 and peek_family(cfg.model.source, cfg.model.family) == "sd3"


def _batch_choices(cfg) -> list[Choice | None]:
    """None (the batch as configured), then halvings down to 1 with accumulation keeping images per step."""
    out: list[Choice | None] = [None]
    b, acc = cfg.train.batch_size, cfg.train.gradient_accumulation
    n = 0
    while b > 1:
        b, acc, n = max(1, b // 2), acc * 2, n + 1
        f = HALVED_BATCH_COST ** n
        out.append(Choice(f"batch {b} x {acc} accumulation", [f"train.batch_size={b}",
                          f"train.gradient_accumulation={acc}"],
                          f"same images per step; steps ~{f:.2f}x as long by a rule of thumb, not measured", f))
    return out


def _load(cfg, overrides: list[str]):
    return type(cfg).load(cfg.to_dict(), overrides=overrides) if overrides else cfg


FP32_ON_THIS_CPU = ["train.mixed_precision=no", "train.frozen_dtype=auto"]


def make_plan(cfg, budget: Budget, n_samples: int | None = None) -> Plan:
    """The plan for `cfg` on `budget`. On a CPU without fast bf16 a bf16 run trains in fp32 instead when fp32 fits
    (bf16 steps would take 15-30x as long), said in the plan; when it does not fit, bf16 stays and the plan says
    how slow that is."""
    slow_half = budget.device == "cpu" and cfg.train.mixed_precision != "no" and not cpu_features.bf16_fast()
    if slow_half and cfg.train.fit_memory:  # fit_memory off: exactly as configured, bf16 included
        fp32 = _make_plan(_load(cfg, FP32_ON_THIS_CPU), budget, n_samples)
        if fp32.fits:
            fp32.choices.insert(0, Choice("fp32 on this CPU", FP32_ON_THIS_CPU, "bf16 is 15-30x slower than fp32 on a "
                                          "CPU without AVX512-BF16 or AMX, so the run trains in fp32", 1.0,
                                          saving=False))
            fp32.fit_memory = cfg.train.fit_memory
            return fp32
    plan = _make_plan(cfg, budget, n_samples)
    plan.fit_memory = cfg.train.fit_memory
    if slow_half and plan.fits:
        plan.choices.append(Choice("bf16 kept", [], "fp32 does not fit, so steps take 15-30x as long on this CPU, "
                                   "which has no AVX512-BF16 or AMX", 20.0, saving=False))
    return plan


def _make_plan(cfg, budget: Budget, n_samples: int | None) -> Plan:
    host = budget.device == "cpu"
    before = estimate(cfg, n_samples, host=host).peak_gb
    usable = budget.usable_gb
    host_gb = None
    if not host:  # the base is loaded on the host in half precision before any layer reaches the GPU
        host_gb = host_load_gb(cfg)
        ram = budget.ram_available_gb
        if ram is not None and host_gb > ram:
            return Plan(budget, False, before, before, host_gb=host_gb, reason=(
                f"loading this model needs ~{host_gb:.1f} GB of system RAM and {ram:.1f} GB is available; close "
                "other programs or add swap" + (", or set model.t5=false (T5-XXL is 9.5 GB of it)"
                                                if _keeps_t5(cfg) else "")))
    if before <= usable:
        return Plan(budget, True, before, before, host_gb=host_gb)
    if not cfg.train.fit_memory:
        return Plan(budget, False, before, before, host_gb=host_gb, reason=(
            f"~{before:.1f} GB as configured does not fit {usable:.1f} GB usable; train.fit_memory is off, so it "
            "runs as configured and may run out of memory (turn it on to let the planner choose savings)"))
    offered = candidates(cfg, budget.device)
    best = None
    for k in range(len(offered) + 1):
        for subset in itertools.combinations(offered, k):
            for batch in _batch_choices(cfg):
                chosen = list(subset) + ([batch] if batch else [])
                if any(c.name == "fp8 frozen weights" for c in chosen) and cfg.train.mixed_precision == "no" and \
                        not any(o.startswith("train.mixed_precision=") for c in chosen for o in c.overrides):
                    continue  # fp8 computes in half precision
                if sum(c.name in STORAGES.values() for c in chosen) > 1:
                    continue  # one stored form at a time
                trial = _load(cfg, [o for c in chosen for o in c.overrides])
                peak = estimate(trial, n_samples, host=host).peak_gb
                if peak > usable:
                    continue
                key = (sum(c.changes_training for c in chosen), math.prod(c.factor for c in chosen), len(chosen))
                if best is None or key < best[0]:
                    best = (key, chosen, peak)
    if best is None:
        everything = _load(cfg, [o for c in offered for o in c.overrides] + (
            _batch_choices(cfg)[-1].overrides if cfg.train.batch_size > 1 else []))
        floor = estimate(everything, n_samples, host=host).peak_gb
        res = cfg.data.resolution or NATIVE.get(peek_family(cfg.model.source, cfg.model.family) or "sd1")
        return Plan(budget, False, floor, before, host_gb=host_gb, reason=(
            f"~{before:.1f} GB as configured, ~{floor:.1f} GB with every saving: neither fits {usable:.1f} GB "
            f"usable; lower data.resolution (now {res} px) or use a machine with more memory"))
    order = {c.name: i for i, c in enumerate(offered)}
    chosen = sorted(best[1], key=lambda c: order.get(c.name, len(order)))
    return Plan(budget, True, best[2], before, chosen, host_gb=host_gb)


def ram_available_gb() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.virtual_memory().available / GB


def nvidia_smi_gpu() -> tuple[str, float] | None:
    """(name, GB) of the first NVIDIA GPU without importing torch (for the app), or None."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        name, mib = out.splitlines()[0].rsplit(",", 1)
        return name.strip(), float(mib) / 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def trains_on_cpu(budget: Budget) -> bool:
    """A run planned against `budget` trains on the CPU: no GPU here nor a tier planned for, and not Apple silicon
    (whose MPS the planner cannot size, so it plans against the RAM it shares)."""
    import platform
    import sys

    return budget.device == "cpu" and not (sys.platform == "darwin" and platform.machine() == "arm64")


def budget_for(vram_gb: float | None = None, gpu: tuple[str, float] | None = None,
               ram_gb: float | None = None) -> Budget:
    """The budget a run plans against: the GPU (`gpu` as detected; `vram_gb`, a tier or --vram, caps it), a
    tier alone when no GPU is seen here, else the available RAM for a CPU run."""
    ram = ram_gb if ram_gb is not None else ram_available_gb()
    if gpu is not None:
        name, total = gpu
        if vram_gb and vram_gb < total:
            return Budget("cuda", float(vram_gb), ram, f"{vram_gb:g} GB of the {name} ({total:.0f} GB)")
        return Budget("cuda", total, ram, f"the {name} ({total:.1f} GB)")
    if vram_gb:
        return Budget("cuda", float(vram_gb), ram, f"a {vram_gb:g} GB GPU")
    return Budget("cpu", ram or 0.0, ram, f"training on the CPU ({ram or 0:.1f} GB of RAM available)")
