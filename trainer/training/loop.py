"""`train(cfg, events)`: a run from start to its LoRA, in the order it happens. Its pieces live beside it: the start
(setup), where models sit (residency), the loss of a step (step), checkpoints and the end (judge), saving (saving,
state), what several processes share (distributed)."""
from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import RunConfig
from trainer.errors import StopRequested, TrainingError
from trainer.lora.write import now_epoch
from trainer.memory import speed_log, spill
from trainer.training import state as state_mod
from trainer.training.distributed import end_processes, no_sync, ranks_in_sync, stop_everywhere
from trainer.training.events import Events
from trainer.training.judge import Judge, finish
from trainer.training.samples import render_prompts, sample
from trainer.training.saving import save_lora_file, save_state
from trainer.training.setup import prepare, scan_datasets, start, write_config
from trainer.training.step import Step


@dataclass
class Result:
    lora_path: Path
    steps: int
    stopped_early: bool
    is_main: bool = True
    models: dict | None = None  # the trained peft modules by key prefix, for callers that keep going in-process


NON_FINITE_PATIENCE = 3  # fp16 scalers skip a few overflowing steps by design; a streak is a real fault


def train(cfg: RunConfig, events: Events | None = None, resume: bool = False, plan: dict | None = None) -> Result:
    """`plan`: the memory plan the CLI made for this run (memory/plan.py), recorded as the first event."""
    accelerator, events, precision = start(cfg, events, plan)
    main, device, world = accelerator.is_main_process, accelerator.device, accelerator.num_processes
    run_dir = Path(cfg.save.output_dir)
    name = cfg.save.name or run_dir.name
    final = run_dir / f"{name}.safetensors"
    found, reg, held_out = scan_datasets(cfg)  # first: cheap, and a typo should not cost a model load
    try:
        r = prepare(cfg, events, accelerator, precision, found, reg, held_out)
    except StopRequested as stop:  # a Stop pressed while loading or caching: nothing was trained, nothing is saved
        return _stopped_before_training(stop, events, accelerator, final)
    base, fam, data = r.base, r.base.family, r.data
    unet, tes = base.unet, base.text_encoders
    gen = torch.Generator("cpu").manual_seed(cfg.train.seed + accelerator.process_index)
    rng = random.Random(cfg.train.seed + accelerator.process_index)
    if main:
        write_config(cfg, run_dir)
        accelerator.init_trackers("lora-studio")
    events.emit("start", total=r.total, family=fam.name, resolution=cfg.data.resolution, processes=world,
                trainable_params=sum(p.numel() for g in r.groups for p in g["params"]), device=str(device),
                mixed_precision=cfg.train.mixed_precision, frozen_dtype=cfg.train.frozen_dtype)
    step_loss = Step(cfg, data, fam, r.schedule, precision, device, r.cache, base.vae, r.vae_id, base.tokenizers,
                     r.tes_fwd, r.unet_fwd, r.text_cache, bool(cfg.lora.train_text_encoder),
                     2 ** (len(base.vae.config.block_out_channels) - 1), rng, gen).loss
    stream = _Lookahead(_batches(data, cfg, r.batches_per_epoch, accelerator))
    save_args = dict(cfg=cfg, base=base, data=data, started=now_epoch(),
                     models=fam.models(unet if cfg.lora.train_unet else None, r.te_trained))
    params = state_mod.trainable(save_args["models"])
    judge = Judge(cfg, r.val, events, accelerator, final, models=[unet, *tes],
                  render=lambda prompts, offset=0, stop=None: render_prompts(cfg, base, unet, tes, precision, prompts,
                                                                             stop, r.encoded, seed_offset=offset),
                  sample=lambda at: sample(cfg, base, unet, tes, precision, run_dir, at, events, encoded=r.encoded))
    step, epoch, consumed, smooth, bad_streak, stopped, feeder, total = 0, 0, 0, None, 0, False, r.feeder, r.total

    def state_now():
        save_state(run_dir, step, epoch, consumed, params, r, cfg, precision, events, accelerator, rng, gen)

    if resume:
        step, epoch, consumed = state_mod.resume(run_dir, params, r.optimizer, r.lr_scheduler, precision, rng, gen,
                                                 accelerator, stream, judge, final, events)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, disable=not main, desc="train", dynamic_ncols=True)
    step_seconds = []  # the optimizer steps alone (no samples, saves or encoding): what speed_log keeps for estimates
    watch = _spill_watch(device) if main else None
    try:
        while step < total:
            step_started, encoding_s, losses = time.monotonic(), 0.0, []
            for micro in range(cfg.train.gradient_accumulation):
                epoch, batch = next(stream)
                consumed += 1
                if feeder is not None:  # cache-ahead: this batch's latents, encoded now (not a step's cost)
                    t0 = time.monotonic()
                    feeder.ensure(batch)
                    encoding_s += time.monotonic() - t0
                with no_sync(accelerator, r.prepared, enabled=micro < cfg.train.gradient_accumulation - 1):
                    loss = step_loss(batch)
                    precision.scaler.scale(loss / cfg.train.gradient_accumulation).backward()
                losses.append(loss.detach())
            loss_value, stepped = _optimizer_step(torch.stack(losses).mean(), r.optimizer, r.lr_scheduler, r.groups,
                                                  precision, accelerator, cfg.optim.max_grad_norm)
            step += 1
            step_seconds.append(time.monotonic() - step_started - encoding_s)
            if feeder is not None:
                feeder = None if feeder.complete else feeder
                if feeder is not None:
                    feeder.prefetch(stream.peek()[1])  # decoded on a thread while the next step's turn comes
            if not stepped and math.isfinite(loss_value) and not precision.scaler.is_enabled():
                events.emit("warning", step=step, message=f"step {step} skipped: its gradients were NaN or "
                            "infinite, so the LoRA was left as it was")
            if watch is not None:
                _check_spill(watch, step_seconds[-1], cfg, events)
            # fp16's scaler skips overflowing steps by design; any other skipped step is a fault if it repeats
            bad_streak = 0 if stepped or precision.scaler.is_enabled() and math.isfinite(loss_value) else bad_streak + 1
            if bad_streak >= NON_FINITE_PATIENCE:
                raise TrainingError(_non_finite_message(step, cfg.train.mixed_precision))
            if math.isfinite(loss_value):
                smooth = loss_value if smooth is None else 0.9 * smooth + 0.1 * loss_value
            lr = r.lr_scheduler.get_last_lr()[0]
            events.step(step, total, loss_value, lr, epoch + 1)
            accelerator.log({"loss": loss_value, "lr": lr}, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{smooth:.4f}" if smooth is not None else "nan", lr=f"{lr:.2e}", epoch=epoch + 1)

            if main and cfg.sample.every_n_steps and step % cfg.sample.every_n_steps == 0 and step < total:
                # a Stop ends the samples between denoising steps: then the LoRA saves (a 1024 px sample on a CPU
                # took minutes, and Stop waited for every one)
                sample(cfg, base, unet, tes, precision, run_dir, step, events, events.stop_requested, r.encoded)
            if cfg.save.every_n_steps and step % cfg.save.every_n_steps == 0 and step < total and main:
                save_lora_file(checkpoint := run_dir / "checkpoints" / f"{name}-step{step:06d}.safetensors", step,
                               epoch, events, **save_args)
                judge(step, checkpoint)
            if cfg.train.validate_every_n_steps and step % cfg.train.validate_every_n_steps == 0 and step < total:
                judge(step)
            if cfg.save.state_every_n_steps and step % cfg.save.state_every_n_steps == 0 and step < total:
                state_now()
            if stop_everywhere(accelerator, events):
                stopped = True
                events.emit("stopping", step=step, message="STOP file found: saving and stopping")
                break
            if cfg.save.every_n_epochs and main and step % r.steps_per_epoch == 0 and step < total \
                    and (step // r.steps_per_epoch) % cfg.save.every_n_epochs == 0:
                save_lora_file(checkpoint := run_dir / "checkpoints" /
                               f"{name}-epoch{step // r.steps_per_epoch:04d}.safetensors", step, epoch, events,
                               **save_args)
                judge(step, checkpoint)
    except KeyboardInterrupt:
        stopped = True
        events.emit("stopping", step=step, message="interrupted: saving the LoRA before exiting")
    except torch.OutOfMemoryError:
        raise TrainingError(_oom_message(step, cfg)) from None
    finally:
        bar.close()

    accelerator.wait_for_everyone()
    if stopped and 0 < step < total:
        state_now()  # Stop or Ctrl-C: Resume continues exactly from here
    if main and step > 0:
        finish(cfg, run_dir, final, step, epoch, stopped, events, save_args, judge,
               sample=lambda stop: sample(cfg, base, unet, tes, precision, run_dir, step, events, stop, r.encoded,
                                          end=True))
        speed_log.record(cfg, step_seconds, _device_name(device))
    in_sync = ranks_in_sync(accelerator, r.groups)
    del step_loss, r.prepared, r.unet_fwd, r.tes_fwd  # the DDP wrappers, which end_processes lets go first
    end_processes(accelerator)
    if main:
        events.clear_stop()
        peak = {"cuda_peak_gb": round(torch.cuda.max_memory_allocated() / 1024 ** 3, 3)} if device.type == "cuda" else {}
        events.emit("done", step=step, total=total, stopped=stopped, path=str(final) if step else None,
                    processes=world, ranks_in_sync=in_sync, **peak)
    events.close()
    return Result(final, step, stopped, main, save_args["models"])


# ---- small pieces the loop reads as one line each --------------------------------------------------------------
def _batches(data, cfg: RunConfig, batches_per_epoch: int, accelerator):
    """(epoch, batch) for this process, epoch after epoch: the seeded shuffle of each epoch, cut to whole batches for
    every process and dealt out by rank."""
    epoch, world = 0, accelerator.num_processes
    while True:
        batches = data.epoch_batches(epoch, cfg.train.seed, cfg.train.batch_size)
        for b in batches[: batches_per_epoch * world][accelerator.process_index::world]:
            yield epoch, b
        epoch += 1


def _stopped_before_training(stop: StopRequested, events: Events, accelerator, final: Path) -> Result:
    events.emit("stopping", step=0, message=f"STOP found while {stop.phase}: stopped before training started")
    end_processes(accelerator)
    if accelerator.is_main_process:
        events.clear_stop()
        events.emit("done", step=0, total=None, stopped=True, path=None, processes=accelerator.num_processes,
                    message=f"stopped while {stop.phase}, before training started; nothing was saved")
    events.close()
    return Result(final, 0, True, accelerator.is_main_process)


def _optimizer_step(loss, optimizer, lr_scheduler, groups, precision, accelerator, max_grad_norm) -> tuple[float, bool]:
    """Unscale, clip, step, advance the schedule and clear the gradients. The step is skipped when the loss (the
    mean over the micro-batches) or any gradient is not finite, as GradScaler skips fp16 overflows, so the LoRA stays
    good: the gradient norm, which clipping computes anyway, is NaN/inf when any micro-batch's gradient was. Returns
    (the loss averaged over processes, whether the optimizer stepped)."""
    precision.scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], max_grad_norm or math.inf)
    loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
    stepped = math.isfinite(loss_value) and math.isfinite(float(norm))
    if stepped:
        precision.scaler.step(optimizer)
    precision.scaler.update()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, stepped


class _Lookahead:
    """An iterator whose next item can be looked at without taking it (cache-ahead decodes the next batch early)."""

    def __init__(self, it):
        self.it, self.buffer = it, []

    def __iter__(self):
        return self

    def __next__(self):
        return self.buffer.pop(0) if self.buffer else next(self.it)

    def peek(self):
        if not self.buffer:
            self.buffer.append(next(self.it))
        return self.buffer[0]


def _spill_watch(device):
    """On CUDA, a watch for memory past the card's own (Windows' driver then spills into system RAM); else None."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return spill.SpillWatch(props.name, props.total_memory / 1024 ** 3, windows=sys.platform == "win32",
                            held_gb=lambda: torch.cuda.memory_reserved(device) / 1024 ** 3)


def _check_spill(watch, step_s: float, cfg: RunConfig, events: Events) -> None:
    seen = watch.observe(step_s)
    if seen:
        message = f"{seen[0]}. {spill.advice(cfg, watch, seen[1])}"
        events.emit("warning", kind="vram_spill", message=message)
        print(f"lora-studio: warning: {message}", file=sys.stderr)


def _device_name(device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({os.cpu_count()} cores)" if device.type == "cpu" else device.type


def _non_finite_message(step: int, mixed_precision: str) -> str:
    hint = {"fp16": "fp16 overflow: try train.mixed_precision=bf16, a lower optim.lr, or a fp32 VAE",
            "bf16": "try a lower optim.lr or train.mixed_precision=no"}.get(mixed_precision, "try a lower optim.lr")
    return f"loss became NaN/inf at step {step} ({hint}); the last saved LoRA is kept"


def _oom_message(step: int, cfg: RunConfig) -> str:
    t = cfg.train
    return (f"out of GPU memory at step {step} (batch {t.batch_size}, {cfg.data.resolution} px, checkpointing "
            f"{'on' if t.gradient_checkpointing else 'off'}, {t.mixed_precision}): pick the next smaller VRAM "
            "tier (--vram), or set train.batch_size=1, train.gradient_checkpointing=true, "
            "train.mixed_precision=fp16, optim.optimizer=adamw8bit, lora.train_text_encoder=false")
