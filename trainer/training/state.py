"""Full training state for exact resume: LoRA weights, optimizer, LR schedule, grad scaler, every RNG,
and the counters that place the run in its shuffled data order.

A state is written into a hidden temp folder and renamed to `state/step-NNNNNN` only when complete
(a `COMPLETE` marker is its last file), so a kill mid-save leaves the previous state as the latest.
Tensors go to safetensors; optimizer/scheduler/scaler dicts go through torch.save and come back only
through `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from trainer.atomic import fsync_dir, replace, write_text
from trainer.errors import TrainingError

from trainer.training.state_files import COMPLETE, STATE_DIR, folders, latest


def trainable(models: dict) -> dict[str, torch.nn.Parameter]:
    """Every trained parameter by a stable name: the LoRA weights of each model."""
    return {f"{prefix}.{name}": p for prefix, model in models.items()
            for name, p in model.named_parameters() if p.requires_grad}


def _rng_state(rng: random.Random, gen: torch.Generator) -> tuple[dict, dict]:
    np_state = np.random.get_state()
    plain = {"python": _listify(random.getstate()), "run": _listify(rng.getstate()),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    tensors = {"torch": torch.get_rng_state(), "generator": gen.get_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return plain, tensors


def _listify(x):
    return [_listify(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def write_rank_rng(tmp: Path, rank: int, rng: random.Random, gen: torch.Generator) -> None:
    plain, tensors = _rng_state(rng, gen)
    tmp.mkdir(parents=True, exist_ok=True)
    write_text(tmp / f"rng-{rank}.json", json.dumps(plain))
    save_file(tensors, str(tmp / f"rng-{rank}.safetensors"))


def temp_folder(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / STATE_DIR / f".tmp-step-{step:06d}"


def commit(run_dir: Path, step: int, params: dict, optimizer, lr_scheduler, scaler, counters: dict, keep: int) -> Path:
    """Write the shared part of the state, mark it complete, rename it into place, drop old states."""
    tmp = temp_folder(run_dir, step)
    tmp.mkdir(parents=True, exist_ok=True)
    weights = {k: p.detach().float().cpu().contiguous() for k, p in params.items()}
    bad = [k for k, t in weights.items() if not bool(torch.isfinite(t).all())]
    if bad:  # a state to resume from must be one worth resuming: the last good one stays the latest
        raise TrainingError(f"the LoRA weights hold NaN or infinite values ({len(bad)} of {len(weights)} tensors, "
                            f"e.g. {bad[0]}); try a lower optim.lr")
    save_file(weights, str(tmp / "lora.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": scaler.state_dict()}, tmp / "optim.pt")
    write_text(tmp / "counters.json", json.dumps(counters))
    _fsync_tree(tmp)  # every file on disk before COMPLETE says the state is whole: a power cut cannot tear it
    write_text(tmp / COMPLETE, f"step {step}\n")
    final = Path(run_dir) / STATE_DIR / f"step-{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    replace(tmp, final)
    fsync_dir(final.parent)
    for old in folders(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb+") as handle:
                os.fsync(handle.fileno())
    fsync_dir(folder)


def save_failed(run_dir: Path, step: int, error: Exception, params: dict) -> TrainingError:
    """Clean up after a state save that failed (the partial folder would keep a full disk full) and say
    why in one line. A full disk shows as ENOSPC, or as torch.save's 'unexpected pos' from its zip writer."""
    shutil.rmtree(temp_folder(run_dir, step), ignore_errors=True)
    needed = 3 * sum(p.numel() * 4 for p in params.values()) + 2**20  # fp32 weights + AdamW's two moments
    try:
        free = shutil.disk_usage(run_dir).free
    except OSError:
        free = None
    last = latest(run_dir)
    kept = (f"the last good state ({last.name}) and the LoRA files are kept" if last
            else "the LoRA files already written are kept")
    said_full = any(w in str(error) for w in ("No space left", "StorageFull", "not enough space"))
    if getattr(error, "errno", None) == errno.ENOSPC or said_full or (free is not None and free < needed):
        room = f"{_size(free)} free at {run_dir}, about {_size(needed)} needed" if free is not None else str(run_dir)
        return TrainingError(f"disk full while saving the training state at step {step} ({room}); the partial state "
                             f"was removed and {kept}. Free some space, then Resume")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return TrainingError(f"could not save the training state at step {step}: {first}; the partial state was removed "
                         f"and {kept}")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n // 1024} KB"


def load(folder: Path, params: dict, optimizer, lr_scheduler, scaler, rng: random.Random, gen: torch.Generator,
         rank: int) -> dict:
    """Restore everything saved in `folder` into the live objects; returns the counters."""
    weights = load_file(str(folder / "lora.safetensors"))
    missing = sorted(set(params) ^ set(weights))
    if missing:
        raise ValueError(f"the saved state in {folder} does not match this run's LoRA "
                         f"(e.g. {missing[0]}); was the config changed? Start a new run instead")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(weights[k].to(p.device, p.dtype))
    blob = torch.load(folder / "optim.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    lr_scheduler.load_state_dict(blob["lr_scheduler"])
    scaler.load_state_dict(blob["scaler"])
    plain = json.loads((folder / f"rng-{rank}.json").read_text(encoding="utf-8"))
    tensors = load_file(str(folder / f"rng-{rank}.safetensors"))
    random.setstate(_tuplify(plain["python"]))
    rng.setstate(_tuplify(plain["run"]))
    kind, keys, *rest = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(tensors["torch"])
    gen.set_state(tensors["generator"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in tensors])
    return json.loads((folder / "counters.json").read_text(encoding="utf-8"))


def resume(run_dir: Path, params, optimizer, lr_scheduler, precision, rng, gen, accelerator, stream, judge,
           final: Path, events) -> tuple[int, int, int]:
    """Everything the newest saved state holds put back, the batch stream advanced to where it was, and the
    checkpoints saved before the interruption counted again. Returns (step, epoch, batches consumed)."""
    folder = latest(run_dir)
    if folder is None:
        raise TrainingError(f"nothing to resume: {run_dir / STATE_DIR} holds no complete training "
                            "state; start a new run instead")
    counters = load(folder, params, optimizer, lr_scheduler, precision.scaler, rng, gen,
                              accelerator.process_index)
    step, epoch, consumed = counters["step"], counters["epoch"], counters["consumed"]
    for _ in range(consumed):  # the same shuffled order, continued where the state left it
        next(stream)
    # Not the run's own file among those checkpoints: it is written again at the end.
    from trainer.training.events import read_events
    from trainer.training.validation import Checkpoint

    judge.checkpoints.extend(Checkpoint(e["step"], e["path"], e["validation_loss"], e["drift"])
                             for e in read_events(run_dir) if e["type"] == "checkpoint" and e["step"] <= step
                             and e["path"] != str(final) and e["validation_loss"] is not None)
    events.emit("resumed", step=step, state=folder.name)
    return step, epoch, consumed
