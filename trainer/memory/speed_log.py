"""Seconds per step measured on this machine, kept per run shape, so a time estimate is a range from real
steps here, not a rule of thumb for some other computer. Torch-free: the Train tab reads it.

Every training run adds its steps (after the first two, which warm up); `Measure speed` on the Train tab
runs a few steps of the chosen config to add one. Kept in the cache folder, newest runs first.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from trainer.atomic import write_text
from trainer.models.info import is_embedded, peek_family, peek_resolution, text_encoder_trained_by_default
from trainer.resources import default_cache_dir

FILE = "speed.json"
KEEP_RUNS = 6
WARMUP_STEPS = 2  # the first steps compile kernels and fill caches; they say little about the rest


def shape(cfg) -> str:
    """What decides the cost of a step, from a config whether or not its 'auto' values are resolved yet."""
    source = "tiny" if is_embedded(cfg.model.source) else str(Path(cfg.model.source).expanduser())
    family = cfg.model.family if cfg.model.family != "auto" else peek_family(cfg.model.source)
    te = cfg.lora.train_text_encoder if cfg.lora.train_text_encoder is not None else \
        text_encoder_trained_by_default(family)
    resolution = cfg.data.resolution or peek_resolution(cfg.model.source, cfg.model.family)
    t = cfg.train
    return json.dumps([source, resolution, t.batch_size, t.gradient_accumulation, t.gradient_checkpointing,
                       t.mixed_precision, t.frozen_dtype, bool(te), cfg.lora.rank, cfg.lora.network])


def _path() -> Path:
    return default_cache_dir() / FILE


def _read() -> dict:
    try:
        data = json.loads(_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def record(cfg, step_seconds: list[float], device: str) -> None:
    """Keep one run's steps (quartiles) for its shape; a broken or unwritable log is not worth failing a run."""
    steps = step_seconds[WARMUP_STEPS:]
    if len(steps) < 3:
        return
    q1, median, q3 = statistics.quantiles(steps, n=4)
    data = _read()
    runs = [{"device": device, "q1": round(q1, 4), "median": round(median, 4), "q3": round(q3, 4),
             "steps": len(steps)}] + data.get(shape(cfg), [])
    data[shape(cfg)] = runs[:KEEP_RUNS]
    try:
        write_text(_path(), json.dumps(data, indent=1))
    except OSError:
        pass


def measured(cfg) -> list[dict]:
    return _read().get(shape(cfg), [])


def duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


SLOWER = 3.0  # a run whose typical step took this many times the fastest run's shared the machine with other work


def time_range(cfg, steps: int) -> str | None:
    """'2-3 min (0.9-1.4 s/step, measured here on cpu over 3 runs)', or None when nothing was measured.

    A run that trained beside other work (two trainings, a benchmark, a game) steps many times slower than this
    machine can: counted, one such run stretched the range to '22 s to 24 min'. Runs whose median step is over
    SLOWER times the fastest run's are left out of the range and said apart."""
    runs = measured(cfg)
    if not runs:
        return None
    fastest = min(r["median"] for r in runs)
    kept = [r for r in runs if r["median"] <= SLOWER * fastest]
    low, high = min(r["q1"] for r in kept), max(r["q3"] for r in kept)
    span = duration(low * steps) if duration(low * steps) == duration(high * steps) else \
        f"{duration(low * steps)} to {duration(high * steps)}"
    devices = ", ".join(sorted({r["device"] for r in kept}))
    text = (f"{span} ({low:.2g}-{high:.2g} s/step, measured here on {devices} over {len(kept)} "
            f"run{'s' if len(kept) > 1 else ''}")
    slow = [r for r in runs if r not in kept]
    if slow:
        worst = max(r["median"] for r in slow) / fastest
        text += (f"; {len(slow)} run{'s' if len(slow) > 1 else ''} up to {worst:.0f}x slower left out: the machine was "
                 "busy with other work then")
    return text + ")"
