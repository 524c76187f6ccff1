"""Windows' VRAM spill, seen while it happens.

On Windows the NVIDIA driver (since 536.40, "CUDA - Sysmem Fallback Policy") lends a CUDA program shared system
memory once the card's own is full, instead of failing with out-of-memory: the run goes on, 50-200x slower, and
says nothing (kohya_ss #1285 #1524 #1730). Two signs give it away, and either one warns once, with the plan that
fits: memory the run holds beyond the card's dedicated memory, or a step time that jumps several-fold after a
steady start. Torch-free: the loop passes in its own readings.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable

STEADY_STEPS = 5  # steps after the first (warm-up) that make the baseline
JUMP = 4.0  # a median of recent steps this many times the baseline is a jump, not noise or a sample in between
RECENT = 3


@dataclass
class SpillWatch:
    card: str  # the GPU's name
    dedicated_gb: float  # its own memory
    windows: bool  # only Windows' driver spills; elsewhere the same signs mean an out-of-memory is near
    held_gb: Callable[[], float]  # the memory the run holds now (torch's allocator: reserved)
    times: list[float] = field(default_factory=list)
    warned: bool = False

    def observe(self, step_s: float) -> tuple[str, float] | None:
        """After each step, with its time: (message, GB held) the first time the run looks spilled, else None."""
        if self.warned:
            return None
        held_gb = self.held_gb()
        self.times.append(step_s)
        why = None
        if held_gb > self.dedicated_gb:
            why = f"the run holds {held_gb:.1f} GB on the {self.dedicated_gb:.1f} GB {self.card}"
        elif len(self.times) >= 1 + STEADY_STEPS + RECENT:
            base = statistics.median(self.times[1:1 + STEADY_STEPS])
            now = statistics.median(self.times[-RECENT:])
            if base > 0 and now >= JUMP * base:
                why = f"steps went from {base:.2f} s to {now:.2f} s ({now / base:.0f}x) with {held_gb:.1f} GB " \
                      f"held on the {self.dedicated_gb:.1f} GB {self.card}"
        if why is None:
            return None
        self.warned = True
        if self.windows:
            return (f"VRAM spill: {why}, so Windows' NVIDIA driver is lending it shared system memory, which makes "
                    "steps many times slower. Stop the run and start it with less memory (below), or set 'CUDA - "
                    "Sysmem Fallback Policy' to 'Prefer No Sysmem Fallback' in the NVIDIA Control Panel to get an "
                    "out-of-memory error instead"), held_gb
        return (f"GPU memory is nearly full: {why}; other programs may be using the card. Less memory: see below",
                held_gb)


def spill_budget_gb(dedicated_gb: float, held_gb: float, estimated_gb: float | None) -> float:
    """The budget to plan again against: the card, shrunk by how far the run outgrew what was estimated for it, so
    a plan the estimator says fits would fit the card with the same error."""
    if not estimated_gb or held_gb <= estimated_gb:
        return dedicated_gb
    return dedicated_gb * estimated_gb / held_gb


def advice(cfg, watch: SpillWatch, held_gb: float) -> str:
    """What to run instead: the memory plan for the budget `spill_budget_gb` gives, as --set overrides."""
    from trainer.memory.estimate import estimate
    from trainer.memory.plan import Budget, make_plan

    cfg = type(cfg).load(cfg.to_dict(), overrides=["train.fit_memory=true"])
    budget_gb = spill_budget_gb(watch.dedicated_gb, held_gb, estimate(cfg).peak_gb)
    planned = make_plan(cfg, Budget("cuda", budget_gb, None, f"{budget_gb:.1f} GB of the {watch.card}"))
    if not planned.fits:
        return f"No plan fits: {planned.reason}"
    if not planned.overrides:
        return ("The estimate says these settings fit the card, so something else holds its memory: close other "
                "programs that use the GPU (games, browsers, another run), or pick a smaller VRAM tier")
    return "The plan that fits: " + " ".join(f"--set {o}" for o in planned.overrides) + f" ({planned.verdict()})"
