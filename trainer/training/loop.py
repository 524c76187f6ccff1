"""The training loop: encode, noise, predict, loss, step, sample, save. Reads top to bottom."""
from __future__ import annotations

import contextlib
import gc
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from trainer.memory import frozen
from trainer.lora import inject as lora_mod
from trainer.memory import speed_log
from trainer.memory import spill
from trainer.training import state as state_mod
from trainer.training import validation
from trainer.config import RunConfig
from trainer.data.cache import LatentCache, LatentFeeder, default_cache_dir, fill_latent_cache, vae_identity
from trainer.data.captions import sample_prompts
from trainer.data.dataset import TrainingSet
from trainer.data.manifest import read_manifest
from trainer.data.scan import DatasetError, scan
from trainer.errors import StopRequested, TrainingError
from trainer.training.events import Events, read_events
from trainer.lora.write import SAVE_DTYPES, NonFiniteError, build_metadata, dataset_metadata, diffusers_state_dict, kohya_state_dict, now_epoch, peft_state_dict, png_data_url, save_lora
from trainer.models.info import is_embedded, text_encoder_trained_by_default
from trainer.models import load_base, sampling_schedule
from trainer.memory.precision import Precision
from trainer.training.samples import render, save_png
from trainer.training.step import Step
from trainer.world.score import drift


@dataclass
class Result:
    lora_path: Path
    steps: int
    stopped_early: bool
    is_main: bool = True
    models: dict | None = None  # the trained peft modules by key prefix, for callers that keep going in-process


NON_FINITE_PATIENCE = 3  # fp16 scalers skip a few overflowing steps by design; a streak is a real fault


def train(cfg: RunConfig, events: Events | None = None, resume: bool = False, plan: dict | None = None) -> Result:
    """`plan`: the memory plan the CLI made for this run (trainer/plan.py), recorded as the first event."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    run_dir = Path(cfg.save.output_dir)
    # Without a GPU, accelerate only forms a multi-process (gloo) group when told it is on CPU.
    no_gpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    accelerator = Accelerator(cpu=no_gpu, log_with=_trackers(), project_dir=str(run_dir / "logs"))
    main = accelerator.is_main_process
    events = events or Events(run_dir, enabled=main)
    events.clear_stale_stop()
    if plan:
        events.emit("plan", **plan)
    device = accelerator.device
    precision = Precision(cfg.train.mixed_precision, device)
    set_seed(cfg.train.seed)
    if cfg.train.frozen_dtype == "fp8" and cfg.train.mixed_precision == "no":
        raise TrainingError("train.frozen_dtype=fp8 computes in half precision, but train.mixed_precision is 'no'; "
                            "set train.mixed_precision=bf16 (or fp16 on CUDA)")

    found, reg, held_out = _scan_datasets(cfg)  # first: cheap, and a typo should not cost a model load
    try:
        return _train(cfg, events, accelerator, resume, precision, found, reg, held_out)
    except StopRequested as stop:  # a Stop pressed while loading or caching: nothing was trained, nothing is saved
        events.emit("stopping", step=0, message=f"STOP found while {stop.phase}: stopped before training started")
        _end_processes(accelerator)
        if main:
            events.clear_stop()
            events.emit("done", step=0, total=None, stopped=True, path=None, processes=accelerator.num_processes,
                        message=f"stopped while {stop.phase}, before training started; nothing was saved")
        return Result(run_dir / f"{cfg.save.name or run_dir.name}.safetensors", 0, True, main)


def _train(cfg: RunConfig, events: Events, accelerator, resume: bool, precision: Precision, found, reg,
           held_out) -> Result:
    run_dir, main, device = Path(cfg.save.output_dir), accelerator.is_main_process, accelerator.device

    # ---- model, family defaults, LoRA ----------------------------------------------------------
    base, schedule, te_trained = _prepare_models(cfg, precision, events)
    _stop_point(accelerator, events, "loading the model")
    fam, unet, vae, tes, train_te = base.family, base.unet, base.vae, base.text_encoders, cfg.lora.train_text_encoder
    trained = ([unet] if cfg.lora.train_unet else []) + te_trained  # the models carrying trainable LoRA weights

    # ---- data ------------------------------------------------------------------------------------
    data, cache, vae_id, text_cache, feeder = _prepare_data(cfg, base, found, reg, bool(train_te), precision, device,
                                                           events, accelerator)
    _stop_point(accelerator, events, "caching latents and captions")

    # ---- optimizer and schedule -----------------------------------------------------------------
    world = accelerator.num_processes
    groups, optimizer, lr_scheduler, batches_per_epoch, steps_per_epoch, total = _optimization(
        cfg, unet, te_trained, data, device, world)
    prepared, unet_fwd, tes_fwd = _wrapped(cfg, accelerator, trained, unet, tes, device)

    latent_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    val = _validation_set(cfg, base, held_out, schedule, bool(train_te), precision, device, events) \
        if main and held_out is not None else None
    # Frozen encoders whose captions are all cached: only the samples would still run them.
    encoded = _let_encoders_go(cfg, base, precision, device, main, events, drift=val is not None) \
        if text_cache is not None else None
    _stop_point(accelerator, events, "preparing validation and samples")
    gen = torch.Generator("cpu").manual_seed(cfg.train.seed + accelerator.process_index)
    rng = random.Random(cfg.train.seed + accelerator.process_index)
    if main:
        write_config(cfg, run_dir)
        accelerator.init_trackers("lora-studio")
    trainable = sum(p.numel() for g in groups for p in g["params"])
    events.emit("start", total=total, family=fam.name, resolution=cfg.data.resolution, trainable_params=trainable,
                device=str(device), processes=world, mixed_precision=cfg.train.mixed_precision,
                frozen_dtype=cfg.train.frozen_dtype)

    step_loss = Step(cfg, data, fam, schedule, precision, device, cache, vae, vae_id, base.tokenizers, tes_fwd,
                     unet_fwd, text_cache, bool(train_te), latent_factor, rng, gen).loss

    def batch_stream():
        epoch = 0
        while True:
            batches = data.epoch_batches(epoch, cfg.train.seed, cfg.train.batch_size)
            for b in batches[: batches_per_epoch * world][accelerator.process_index::world]:
                yield epoch, b
            epoch += 1

    # ---- the loop ----------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    stream = _Lookahead(batch_stream())
    step, epoch, consumed, smooth, bad_streak, stopped = 0, 0, 0, None, 0, False
    name = cfg.save.name or run_dir.name
    final = run_dir / f"{name}.safetensors"
    started = now_epoch()
    save_args = dict(cfg=cfg, base=base, data=data, models=fam.models(unet if cfg.lora.train_unet else None,
                     te_trained), started=started)
    params = state_mod.trainable(save_args["models"])

    def save_state():
        try:
            state_mod.write_rank_rng(state_mod.temp_folder(run_dir, step), accelerator.process_index, rng, gen)
            accelerator.wait_for_everyone()
            if main:
                with events.progress.phase("saving"):
                    folder = state_mod.commit(run_dir, step, params, optimizer, lr_scheduler, precision.scaler,
                                              {"step": step, "epoch": epoch, "consumed": consumed},
                                              cfg.save.keep_states)
                events.emit("state", step=step, path=str(folder))
        except (OSError, RuntimeError, SafetensorError) as e:  # a full disk: torch.save says RuntimeError
            raise state_mod.save_failed(run_dir, step, e, params) from None
        accelerator.wait_for_everyone()

    judge = _Judge(cfg, val, events, accelerator, final, models=[unet, *tes],
                   render=lambda prompts, offset=0: _render(cfg, base, unet, tes, precision, prompts, encoded=encoded,
                                                            seed_offset=offset),
                   sample=lambda at: _sample(cfg, base, unet, tes, precision, run_dir, at, events, encoded=encoded))

    if resume:
        step, epoch, consumed = _resume(run_dir, params, optimizer, lr_scheduler, precision, rng, gen, accelerator,
                                        stream, judge, final, events)
    bar = tqdm(total=total, initial=step, disable=not main, desc="train", dynamic_ncols=True)
    step_seconds = []  # the optimizer steps alone (no samples, no saves): what speed_log keeps for estimates
    watch = _spill_watch(device) if main else None
    try:
        while step < total:
            step_started, encoding_s = time.monotonic(), 0.0
            losses = []
            for micro in range(cfg.train.gradient_accumulation):
                epoch, batch = next(stream)
                consumed += 1
                if feeder is not None:  # cache-ahead: this batch's latents, encoded now (not a step's cost)
                    t0 = time.monotonic()
                    feeder.ensure(batch)
                    encoding_s += time.monotonic() - t0
                last = micro == cfg.train.gradient_accumulation - 1
                with _no_sync(accelerator, prepared, enabled=not last):
                    loss = step_loss(batch)
                    precision.scaler.scale(loss / cfg.train.gradient_accumulation).backward()
                losses.append(loss.detach())
            loss_value, stepped = _optimizer_step(torch.stack(losses).mean(), optimizer, lr_scheduler, groups,
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
            lr = lr_scheduler.get_last_lr()[0]
            events.step(step, total, loss_value, lr, epoch + 1)
            accelerator.log({"loss": loss_value, "lr": lr}, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{smooth:.4f}" if smooth is not None else "nan", lr=f"{lr:.2e}", epoch=epoch + 1)

            if main and cfg.sample.every_n_steps and step % cfg.sample.every_n_steps == 0 and step < total:
                _sample(cfg, base, unet, tes, precision, run_dir, step, events, encoded=encoded)
            if cfg.save.every_n_steps and step % cfg.save.every_n_steps == 0 and step < total and main:
                _save(checkpoint := run_dir / "checkpoints" / f"{name}-step{step:06d}.safetensors", step, epoch, events,
                      **save_args)
                judge(step, checkpoint)
            if cfg.train.validate_every_n_steps and step % cfg.train.validate_every_n_steps == 0 and step < total:
                judge(step)
            if cfg.save.state_every_n_steps and step % cfg.save.state_every_n_steps == 0 and step < total:
                save_state()
            if _stop_everywhere(accelerator, events):
                stopped = True
                events.emit("stopping", step=step, message="STOP file found: saving and stopping")
                break
            if cfg.save.every_n_epochs and main and step % steps_per_epoch == 0 and step < total \
                    and (step // steps_per_epoch) % cfg.save.every_n_epochs == 0:
                _save(checkpoint := run_dir / "checkpoints" / f"{name}-epoch{step // steps_per_epoch:04d}.safetensors",
                      step, epoch, events, **save_args)
                judge(step, checkpoint)
    except KeyboardInterrupt:
        stopped = True
        events.emit("stopping", step=step, message="interrupted: saving the LoRA before exiting")
    except torch.OutOfMemoryError:
        raise TrainingError(_oom_message(step, cfg)) from None
    finally:
        bar.close()

    accelerator.wait_for_everyone()
    if stopped and step > 0 and step < total:
        save_state()  # Stop or Ctrl-C: Resume continues exactly from here
    if main and step > 0:
        _finish(cfg, run_dir, final, step, epoch, stopped, events, save_args, judge,
                sample=lambda stop: _sample(cfg, base, unet, tes, precision, run_dir, step, events, stop, encoded,
                                            end=True))
    if main:
        speed_log.record(cfg, step_seconds, _device_name(device))
    in_sync = _ranks_in_sync(accelerator, groups)
    del step_loss, prepared, unet_fwd, tes_fwd  # the DDP wrappers, which _end_processes lets go first
    _end_processes(accelerator)
    if main:
        events.clear_stop()
        peak = {"cuda_peak_gb": round(torch.cuda.max_memory_allocated() / 1024 ** 3, 3)} if device.type == "cuda" else {}
        events.emit("done", step=step, total=total, stopped=stopped, path=str(final) if step else None,
                    processes=world, ranks_in_sync=in_sync, **peak)
    events.close()
    return Result(final, step, stopped, main, save_args["models"])


# ---- pieces the loop reads as one line each ------------------------------------------------------

def _wrapped(cfg: RunConfig, accelerator, trained, unet, tes, device):
    """(the trained models as accelerate prepared them, the denoiser and the text encoders as the forward pass calls
    them): DDP-wrapped on several processes, the denoiser compiled when asked on CUDA. Data order and AMP stay ours."""
    prepared = accelerator.prepare(*trained)
    prepared = list(prepared) if isinstance(prepared, (list, tuple)) else [prepared]
    model_of = dict(zip(map(id, trained), prepared))
    unet_fwd = model_of.get(id(unet), unet)
    if cfg.train.compile and device.type == "cuda":
        unet_fwd = torch.compile(unet_fwd)
    return prepared, unet_fwd, [model_of.get(id(te), te) for te in tes]


def _validation_set(cfg: RunConfig, base, held_out, schedule, train_te: bool, precision, device, events: Events):
    """The held-out images' latents, noise and (for frozen encoders) captions, made once now; None when none is
    usable."""
    with _borrowed([base.vae], device, visiting=base.text_encoders), events.progress.phase("validation", len(held_out.items)):
        val = validation.Validation(held_out, cfg, base.family, base.vae, base.tokenizers, base.text_encoders,
                                    schedule, encode_text=not train_te, precision=precision, device=device)
    events.emit("validation_set", images=len(val), problems=len(val.data.problems))
    return val if len(val) else None


def _finish(cfg: RunConfig, run_dir: Path, final: Path, step: int, epoch: int, stopped: bool, events: Events,
            save_args: dict, judge, sample) -> None:
    """The main process's end of a run that trained: the end samples (the first one the LoRA's thumbnail), the
    LoRA, its validation, the recommended checkpoint and every checkpoint's samples side by side. Stopped means
    stopped: the LoRA is saved first, and the end samples (minutes on a CPU) become their own phase that a second
    Stop skips (`sample(stop)` asks it before each image)."""
    thumb = None
    if stopped:
        _save(final, step, epoch, events, **save_args)
        events.clear_stop()
        if cfg.sample.at_end:
            events.emit("end_samples", step=step, prompts=len(cfg.sample.prompts),
                        message="the LoRA is saved; rendering the end samples (Stop again skips them)")
    if cfg.sample.at_end:
        written = sample(events.stop_requested if stopped else None)
        thumb = written[0] if written else None
    if thumb or not stopped:
        _save(final, step, epoch, events, thumbnail=thumb, **save_args)
    if stopped and events.stop_requested():  # a second Stop: the LoRA is saved; skip what is left of the end
        events.emit("end_skipped", step=step, message="second Stop: skipped the rest of the end samples and the "
                    "final LoRA's validation and drift")
    else:
        judge(step, final)
    picked = validation.recommend(judge.checkpoints, *validation.drift_bound(cfg.train.drift_bound, judge.seed_spread))
    if picked:
        events.emit("recommendation", step=picked[0].step, path=picked[0].path, message=picked[1])
    _checkpoint_grid(run_dir, [c.step for c in judge.checkpoints], events)


def _resume(run_dir: Path, params, optimizer, lr_scheduler, precision, rng, gen, accelerator, stream, judge,
            final: Path, events: Events) -> tuple[int, int, int]:
    """Everything the newest saved state holds put back, the batch stream advanced to where it was, and the
    checkpoints saved before the interruption counted again. Returns (step, epoch, batches consumed)."""
    folder = state_mod.latest(run_dir)
    if folder is None:
        raise TrainingError(f"nothing to resume: {run_dir / state_mod.STATE_DIR} holds no complete training "
                            "state; start a new run instead")
    counters = state_mod.load(folder, params, optimizer, lr_scheduler, precision.scaler, rng, gen,
                              accelerator.process_index)
    step, epoch, consumed = counters["step"], counters["epoch"], counters["consumed"]
    for _ in range(consumed):  # the same shuffled order, continued where the state left it
        next(stream)
    # Not the run's own file among those checkpoints: it is written again at the end.
    judge.checkpoints.extend(validation.Checkpoint(e["step"], e["path"], e["validation_loss"], e["drift"])
                             for e in read_events(run_dir) if e["type"] == "checkpoint" and e["step"] <= step
                             and e["path"] != str(final) and e["validation_loss"] is not None)
    events.emit("resumed", step=step, state=folder.name)
    return step, epoch, consumed


def _optimization(cfg: RunConfig, unet, te_trained, data, device, world: int):
    """(parameter groups, optimizer, learning-rate schedule, batches per epoch on each process, steps per epoch,
    total steps)."""
    from diffusers.optimization import get_scheduler

    groups = [{"params": lora_mod.lora_parameters(unet), "lr": cfg.optim.lr}] if cfg.lora.train_unet else []
    if te_trained:
        groups.append({"params": [p for te in te_trained for p in lora_mod.lora_parameters(te)],
                       "lr": cfg.optim.text_encoder_lr})
    optimizer = make_optimizer(cfg, groups, device)
    batches_per_epoch = len(data.epoch_batches(0, cfg.train.seed, cfg.train.batch_size)) // world
    if batches_per_epoch == 0:
        raise TrainingError(f"{data.num_samples} samples make fewer batches than {world} processes; "
                            "lower train.batch_size or add images or repeats")
    steps_per_epoch = max(1, batches_per_epoch // cfg.train.gradient_accumulation)
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    lr_scheduler = get_scheduler(cfg.optim.scheduler, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                                 num_training_steps=total)
    return groups, optimizer, lr_scheduler, batches_per_epoch, steps_per_epoch, total


def _scan_datasets(cfg: RunConfig):
    """(training, regularisation or None, held-out or None) scans; the held-out images come from
    data.validation_dataset or are split off the training set by data.validation_split."""
    try:
        found = scan(cfg.data.dataset, cfg.data.caption_extension)
        reg = scan(cfg.data.reg_dataset, cfg.data.caption_extension) if cfg.data.reg_dataset else None
        held_out = scan(cfg.data.validation_dataset, cfg.data.caption_extension) if cfg.data.validation_dataset else None
    except DatasetError as e:
        raise TrainingError(str(e)) from None
    if held_out is None:
        try:
            found, held_out = validation.split(found, cfg.data.validation_split, cfg.train.seed)
        except validation.SplitError as e:
            raise TrainingError(str(e)) from None
    return found, reg, held_out


def _prepare_models(cfg: RunConfig, precision: Precision, events: Events):
    """The base loaded in the run's precision, its 'auto' settings filled in, LoRA injected (the denoiser's as soon
    as it loads), frozen weights in their dtype, LoRA weights in fp32, checkpointing on where asked. Returns
    (base, the family's noise schedule, the text encoders being trained)."""
    from diffusers.training_utils import cast_training_params

    fp8 = cfg.train.frozen_dtype == "fp8"
    with events.progress.phase("loading"):  # no count to give: its heartbeat says it is still loading
        base = load_base(cfg.model.source, cfg.model.family, dtype=precision.weight_dtype,
                         on_unet=lambda unet: _ready_unet(unet, cfg, precision, fp8), t5=cfg.model.t5)
    fam = base.family
    resolve_auto(cfg, fam, base.prediction_type, native_resolution(base), base.zero_terminal_snr)
    if cfg.model.zero_terminal_snr and cfg.model.prediction_type == "epsilon":
        raise TrainingError("model.zero_terminal_snr needs model.prediction_type = v_prediction: at the last "
                            "timestep there is no signal left, so the noise cannot be predicted from it")
    if cfg.lora.use_dora and fam.lora_layout == "diffusers":
        raise TrainingError(f"lora.use_dora is not available for {fam.name}: its LoRA loaders read no DoRA keys; "
                            "set it to false")
    if cfg.train.offload and precision.device.type != "cuda":
        events.emit("warning", message="train.offload streams frozen weights to a CUDA GPU; on this "
                    f"{precision.device.type} they are in RAM already, so it changes nothing")
    schedule = fam.schedule(base.scheduler_config, cfg.model.prediction_type, cfg.model.zero_terminal_snr,
                            cfg.train.min_snr_gamma)
    if cfg.train.min_snr_gamma and not schedule.weights_by_snr:
        events.emit("warning", message=f"train.min_snr_gamma does not apply to {fam.name}'s flow matching; ignored")
    unet, vae, tes = base.unet, base.vae, base.text_encoders
    te_trained = list(tes[:len(fam.te_prefixes)]) if cfg.lora.train_text_encoder else []  # SD3's T5 is never trained
    for m in (vae, *tes):
        m.requires_grad_(False)
    for te in tes:  # a no-op when the loader honoured dtype; before LoRA exists, so only base weights cast
        _place(te, torch.device("cpu"), precision.weight_dtype)
        if any(te is t for t in te_trained):
            lora_mod.inject(te, cfg.lora, lora_mod.text_encoder_targets(cfg.lora), "text-encoder")
        if fp8:
            frozen.freeze(te, precision.weight_dtype, fp8=True)
    trained = ([unet] if cfg.lora.train_unet else []) + te_trained
    if not trained:
        raise TrainingError("nothing to train: set lora.train_unet or lora.train_text_encoder to true")
    cast_training_params(trained, dtype=torch.float32)  # LoRA weights stay fp32 under half-precision bases
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for te in te_trained:
            (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
    if fam.attention_processor() is not None:
        unet.set_attn_processor(fam.attention_processor())
    return base, schedule, te_trained


def _prepare_data(cfg: RunConfig, base, found, reg, train_te: bool, precision: Precision, device, events: Events,
                  accelerator):
    """The training set with its latent cache filled (then the VAE leaves the device) and, for frozen encoders
    and fixed captions, every caption encoded once (then the encoders leave too); the denoiser goes to the
    device last. Returns (data, latent cache or None, VAE identity, text cache or None)."""
    fam, unet, vae, tes, main = base.family, base.unet, base.vae, base.text_encoders, accelerator.is_main_process
    n_images = len(found.items) + (len(reg.items) if reg is not None else 0)
    with events.progress.phase("scanning", n_images) as tick:  # every image decoded and checked (cached per file)
        data = TrainingSet(found, cfg.data, cfg.data.resolution, reg, progress=lambda done, total: tick(done))
    for path, reason in data.problems.items():
        events.emit("warning", message=f"skipped {path}: {reason}")
    if not len(data):
        raise TrainingError(f"dataset {cfg.data.dataset} has no usable images; run `lora-studio dataset check` on it")
    events.emit("dataset", images=len(data), samples=data.num_samples, buckets=data.bucket_table())
    if not cfg.sample.prompts:  # written into config.toml, so a resume or a re-run samples the same prompts
        cfg.sample.prompts = sample_prompts([e.caption for e in data.entries if not e.is_reg], cfg.data.trigger)
    use_cache = cfg.data.cache_latents and not (cfg.data.random_crop or cfg.data.flip)
    cache = LatentCache(Path(cfg.data.cache_dir or default_cache_dir()) / "latents") if use_cache else None
    vae_id = vae_identity(vae) if use_cache else ""
    _place(vae, device, precision.vae_dtype(fam.name))
    feeder = None
    if use_cache and cfg.data.cache_ahead and accelerator.num_processes == 1:
        feeder = _feeder(data, cache, vae, vae_id, events)  # None when every latent is cached already
    elif use_cache:
        _fill_latent_cache(data, cache, vae, vae_id, main, accelerator, events)
        vae.to("cpu")  # every latent is cached now: the VAE comes back only to decode samples
    text_cache = None
    if cfg.data.caches_text(train_te):  # the encoders visit the device one at a time
        captions = sorted({e.caption for e in data.entries} | ({""} if cfg.data.caption_dropout else set()))
        with _borrowed([], device, visiting=tes), events.progress.phase("caching text", len(captions)) as tick:
            text_cache = _encode_captions(fam, tes, base.tokenizers, captions, cfg.model.clip_skip, precision,
                                          stop=events.stop_requested, progress=tick)
        events.emit("text_cache", captions=len(captions))
    else:  # encoded at every step
        for te in tes:
            te.to(device)  # loaded in the weight dtype already; .to(dtype) would also cast fp8 and LoRA tensors
    unet.to(device)
    return data, cache, vae_id, text_cache, feeder


def _feeder(data, cache, vae, vae_id, events: Events):
    """Cache-ahead (data.cache_ahead): training starts now and each image is encoded just before the step that takes
    it; the VAE leaves the device when the last latent is cached. None when nothing is left to encode."""
    from trainer.progress import Progress

    progress = Progress(lambda e: events.emit("progress", **e), heartbeat_s=float("inf"))

    def done():
        vae.to("cpu")  # every latent is cached now: the VAE comes back only to decode samples
        progress.finish()
        events.emit("cache_filled", encoded=feeder.encoded)

    feeder = LatentFeeder(data, cache, vae, vae_id, progress=lambda n, total: progress.update(n, total),
                          on_complete=done)
    events.emit("cache", cached=len(data) - feeder.total, to_encode=feeder.total, ahead=True)
    if feeder.complete:
        feeder.close()
        return None
    progress.start("caching latents", feeder.total)
    return feeder


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


class _Judge:
    """The figures the end of the run recommends a checkpoint from: the held-out loss of the LoRA as it is now
    (once per step however many reasons ask), and for a saved LoRA also its drift from the base (renders of the
    trigger-free prompts against the base's, made once). A checkpoint that was not sampled gets its samples."""

    def __init__(self, cfg, val, events, accelerator, final: Path, models, render, sample):
        self.cfg, self.val, self.events, self.accelerator, self.final = cfg, val, events, accelerator, final
        self.models, self.render, self.sample = models, render, sample
        self.checkpoints: list[validation.Checkpoint] = []  # saved LoRAs with their figures
        self.loss_at: tuple[int | None, float | None] = (None, None)
        self.base_renders: list = []
        self.seed_spread: float | None = None  # the base's own change between two seeds: the auto drift bound

    def __call__(self, step: int, saved: Path | None = None) -> None:
        cfg = self.cfg
        if self.val is None:
            return
        if self.loss_at[0] != step:
            with self.events.progress.phase("validation", len(self.val)):
                self.loss_at = (step, self.val.loss(self.models[0], self.models[1:]))
            self.events.emit("validation", step=step, loss=self.loss_at[1])
            self.accelerator.log({"validation_loss": self.loss_at[1]}, step=step)
        if saved is None:
            return
        prompts = validation.drift_prompts(cfg, is_embedded(cfg.model.source))
        if prompts and not self.base_renders:
            with validation.lora_disabled(self.models):
                self.base_renders.extend(self.render(prompts))
                if cfg.train.drift_bound is None:
                    other = self.render(prompts, validation.SPREAD_SEED_OFFSET)
                    self.seed_spread = drift(self.base_renders, other)
                    self.events.emit("seed_spread", value=self.seed_spread, prompts=len(prompts))
        moved = drift(self.base_renders, self.render(prompts)) if prompts else None
        self.checkpoints.append(validation.Checkpoint(step, str(saved), self.loss_at[1], moved))
        self.events.emit("checkpoint", step=step, path=str(saved), validation_loss=self.loss_at[1], drift=moved)
        sampled = (cfg.sample.every_n_steps and step % cfg.sample.every_n_steps == 0) or \
            (saved == self.final and cfg.sample.at_end)
        if cfg.sample.prompts and not sampled:
            self.sample(step)


def native_resolution(base) -> int:
    """The size the model was trained at: its latent size times the VAE's downscale (SD1.5 512, SD2-768
    768, SDXL 1024, the embedded model 64); the family default when the config does not say."""
    latent = base.unet.config.get("sample_size")
    if not isinstance(latent, int):
        return base.family.default_resolution
    return latent * 2 ** (len(base.vae.config.block_out_channels) - 1)


def _ready_unet(unet, cfg: RunConfig, precision: Precision, fp8: bool) -> None:
    """The UNet's LoRA and frozen stand-ins, built on the host as soon as it loads (before the text encoders):
    neither full-precision weights nor all the models at once reach the GPU, each model goes there for its
    own phase (VAE: latent cache; text encoders: caption cache; UNet: training), and with fp8 the half-precision
    UNet is gone before the encoders arrive, so neither phase's peak is the sum of all the models."""
    from trainer.models import FAMILIES, family_name

    unet.requires_grad_(False)
    _place(unet, torch.device("cpu"), precision.weight_dtype)  # a no-op when the loader honoured dtype
    if cfg.lora.train_unet:
        fam = FAMILIES[family_name(dict(unet.config)) if cfg.model.family == "auto" else cfg.model.family]
        lora_mod.inject(unet, cfg.lora, lora_mod.unet_targets(cfg.lora, fam.denoiser_prefix), "UNet")
    # After injection: peft wraps the original layers. Streamed weights stay on the host when the UNet moves.
    frozen.freeze(unet, precision.weight_dtype, fp8=fp8, stream=cfg.train.offload)


def resolve_auto(cfg: RunConfig, fam, model_prediction_type: str, resolution: int, zero_terminal_snr: bool = False) -> None:
    """Fill every 'auto' value from the model, so the written config.toml is explicit."""
    cfg.model.family = fam.name
    if cfg.model.prediction_type is None:
        cfg.model.prediction_type = model_prediction_type
    if cfg.model.zero_terminal_snr is None:
        cfg.model.zero_terminal_snr = zero_terminal_snr
    if cfg.data.resolution is None:
        cfg.data.resolution = resolution
    if cfg.lora.train_text_encoder is None:
        cfg.lora.train_text_encoder = text_encoder_trained_by_default(fam.name)
    if cfg.optim.text_encoder_lr is None:
        cfg.optim.text_encoder_lr = cfg.optim.lr / 2
    if cfg.data.cache_dir is None:
        cfg.data.cache_dir = str(default_cache_dir())
    manifest = read_manifest(cfg.data.dataset)  # the dataset's own defaults, below any explicit setting
    if not cfg.data.trigger:
        cfg.data.trigger = manifest.trigger
    if cfg.data.repeats == 1:
        cfg.data.repeats = max(1, manifest.repeats)


def write_config(cfg: RunConfig, run_dir: Path) -> None:
    from trainer.atomic import write_text

    write_text(run_dir / "config.toml", cfg.to_toml())


def make_optimizer(cfg: RunConfig, groups, device):
    o = cfg.optim
    if o.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingError("optim.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes, "
                                "or use optim.optimizer=adamw") from None
        if device.type != "cuda":
            raise TrainingError("optim.optimizer=adamw8bit needs a CUDA GPU; use optim.optimizer=adamw on CPU")
        return bnb.optim.AdamW8bit(groups, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise TrainingError("optim.optimizer=prodigy needs prodigyopt: pip install prodigyopt") from None
        return Prodigy(groups, betas=tuple(o.betas), weight_decay=o.weight_decay)
    return torch.optim.AdamW(groups, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def _place(model, device, dtype) -> None:
    # Casting to the dtype a model already has makes diffusers warn for nothing; move only then.
    if next(model.parameters()).dtype == dtype:
        model.to(device)
    else:
        model.to(device, dtype=dtype)


def _trackers():
    import importlib.util

    return "tensorboard" if importlib.util.find_spec("tensorboard") else None


@contextlib.contextmanager
def _no_sync(accelerator, models, enabled: bool):
    # Skip the DDP all-reduce on accumulation micro-steps; only the last one syncs gradients.
    with contextlib.ExitStack() as stack:
        if enabled:
            for m in models:
                stack.enter_context(accelerator.no_sync(m))
        yield


def _end_processes(accelerator) -> None:
    """Let DDP's reducers go while the process group is still registered, then end it. A reducer holding the
    group's last reference destroys it with the GIL held, and that joins gloo's threads, one of which may need the
    GIL to finish cleaning up the last collective: a deadlock (rank 0 hung after its done event, 2 of 12
    two-process CPU runs on a loaded machine). The group's own destructor releases the GIL."""
    accelerator.free_memory()  # drops accelerate's references to the prepared (DDP-wrapped) models
    accelerator.end_training()


def _ranks_in_sync(accelerator, groups) -> bool:
    """Every process must end with the same LoRA weights; compare a checksum across ranks."""
    total = torch.stack([p.detach().double().sum() for g in groups for p in g["params"]]).sum().reshape(1)
    sums = accelerator.gather(total.to(accelerator.device))
    return bool(torch.allclose(sums, sums[0].expand_as(sums), rtol=0, atol=1e-9))


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


def _stop_point(accelerator, events: Events, phase: str) -> None:
    """Between the phases before training: a Stop pressed since the run was queued ends it here, on every process."""
    if _stop_everywhere(accelerator, events):
        raise StopRequested(phase)


def _stop_everywhere(accelerator, events: Events) -> bool:
    flag = torch.tensor([1.0 if events.stop_requested() else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


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


@torch.no_grad()
def _encode_captions(fam, tes, tokenizers, captions, clip_skip, precision, stop=None, progress=None) -> dict:
    """caption -> (hidden states, pooled or None), on CPU, for frozen text encoders. Captions go 16 at a time,
    so an encoder visiting the GPU (see _borrowed) moves once per chunk rather than once per caption; `stop()` is
    asked between chunks."""
    out, chunk = {}, 16  # captions per encoder pass
    with precision.autocast():
        for start in range(0, len(captions), chunk):
            if stop is not None and stop():
                break
            part = captions[start:start + chunk]
            hidden, pooled = fam.encode(tes, fam.tokenize(tokenizers, part), clip_skip)
            for i, c in enumerate(part):
                out[c] = (hidden[i].cpu(), None if pooled is None else pooled[i].cpu())
            if progress:
                progress(len(out))
    return out


def _fill_latent_cache(data, cache, vae, vae_id, main, accelerator, events) -> None:
    """Encode every image once on the main process; the other ranks then read the cache."""
    if main:
        with events.progress.phase("caching latents", len(data)) as tick:
            cached, encoded = fill_latent_cache(data, cache, vae, vae_id, stop=events.stop_requested,
                                                progress=lambda n, todo: tick(len(data) - todo + n))
        events.emit("cache", cached=cached, to_encode=encoded)
    accelerator.wait_for_everyone()


def _checkpoint_grid(run_dir: Path, steps: list[int], events: Events) -> None:
    """The run's sample prompts (rows) at every checkpoint (columns), same seeds: samples/checkpoints.png."""
    from PIL import Image

    from trainer.preview.grids import grid

    shown = {(e["step"], e["path"]): e for e in read_events(run_dir) if e["type"] == "sample" and e["step"] in steps}
    by_step = {s: sorted((e for (st, _), e in shown.items() if st == s), key=lambda e: e["seed"]) for s in steps}
    rows = min((len(v) for v in by_step.values()), default=0)
    if len(steps) < 2 or not rows:
        return
    images, labels = [], []
    for r in range(rows):
        for s in steps:
            images.append(Image.open(by_step[s][r]["path"]).convert("RGB"))
            labels.append(f"step {s}" if r == 0 else "")
    path = run_dir / "samples" / "checkpoints.png"
    grid(images, labels, columns=len(steps)).save(path)
    events.emit("sample", step=steps[-1], path=str(path), prompt="every checkpoint x the sample prompts",
                seed=None, grid=True)


def _render(cfg, base, unet, tes, precision, prompts, stop=None, encoded=None, seed_offset: int = 0,
            on_image=None) -> list:
    """Prompts at the sample settings and seeds, with the VAE and text encoders borrowed back to the device;
    `encoded`: the prompts' embeddings, made before the encoders were let go (see _let_encoders_go)."""
    schedule, rescale = sampling_schedule(base.scheduler_config, cfg.model.prediction_type, cfg.model.zero_terminal_snr)
    with _borrowed([base.vae], precision.device, visiting=tes if encoded is None else ()):
        return render(base.family, unet, base.vae, tes, base.tokenizers, schedule, prompts,
                      negative=cfg.sample.negative_prompt, seed=cfg.sample.seed + seed_offset, steps=cfg.sample.steps,
                      guidance=cfg.sample.guidance_scale, size=cfg.data.resolution, guidance_rescale=rescale,
                      clip_skip=cfg.model.clip_skip, autocast=precision.autocast(), stop=stop, encoded=encoded,
                      on_image=on_image)


def _let_encoders_go(cfg, base, precision, device, main, events, drift: bool) -> dict:
    """Encode the prompts the run will still sample (its sample prompts and, when `drift` is judged, i.e. with a
    validation set, the drift prompts; with the negative prompt), then let the frozen text encoders' weights go: moved to the meta device, which keeps no data, so a
    stray use fails loudly instead of reading garbage. They hold host RAM the whole run otherwise: SDXL's pair 1.6 GB
    in bf16, SD3's T5-XXL 9.5 GB. Returns prompt -> pipeline arguments, for samples.render."""
    drifts = validation.drift_prompts(cfg, is_embedded(cfg.model.source)) if drift else []
    prompts = list(dict.fromkeys([*cfg.sample.prompts, *drifts]))
    encoded = {}
    if main:  # the only process that samples
        with torch.no_grad(), precision.autocast(), _borrowed([], device, visiting=base.text_encoders):
            for prompt in prompts:
                kwargs = base.family.prompt_kwargs(base.text_encoders, base.tokenizers, [prompt],
                                                   cfg.sample.negative_prompt, cfg.model.clip_skip)
                encoded[prompt] = {k: v.cpu() for k, v in kwargs.items()}
    for te in base.text_encoders:
        te.to("meta")
    gc.collect()
    events.emit("text_encoders_released", prompts=len(encoded))
    return encoded


def _sample(cfg, base, unet, tes, precision, run_dir, step, events, stop=None, encoded=None,
            end: bool = False) -> list[Path]:
    prompts = cfg.sample.prompts
    phase = "end samples" if end else "samples"
    with events.progress.phase(phase, len(prompts)) as tick:
        images = _render(cfg, base, unet, tes, precision, prompts, stop, encoded, on_image=tick)
    written = []
    for i, (prompt, im) in enumerate(zip(prompts, images)):
        path = save_png(im, run_dir / "samples" / f"step{step:06d}_{i:02d}.png")
        events.emit("sample", step=step, path=str(path), prompt=prompt, seed=cfg.sample.seed + i)
        written.append(path)
    return written


@contextlib.contextmanager
def _borrowed(modules, device, visiting=()):
    """Modules offloaded to the CPU once their outputs were cached come back to the device for sampling, and
    leave again after. The `visiting` ones (text encoders) come one at a time, each only for its own forward
    call: SD3's T5-XXL (9.5 GB in bf16) and its two CLIPs need not fit on the card together, nor beside the
    denoiser. On a CPU, or for modules already on the device, nothing moves."""
    homes = [next(m.parameters()).device for m in modules]
    for m in modules:
        m.to(device)
    hooks = [h for m in visiting for h in _visit(m, device)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for m, home in zip(modules, homes):
            m.to(home)


def _visit(module, device) -> list:
    """Hooks that bring `module` (and its tensor inputs) to `device` for each forward call and send it home
    after; its outputs stay on the device."""
    home = next(module.parameters()).device
    if home.type == device.type and (home.index or 0) == (device.index or 0):
        return []

    def arrive(mod, args, kwargs):
        mod.to(device)
        move = lambda x: x.to(device) if torch.is_tensor(x) else x  # noqa: E731
        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

    def leave(mod, args, kwargs, output):
        mod.to(home)
        return output

    return [module.register_forward_pre_hook(arrive, with_kwargs=True),
            module.register_forward_hook(leave, with_kwargs=True)]


def _save(path: Path, step: int, epoch: int, events: Events, *, cfg, base, data, models, started,
          thumbnail: Path | None = None) -> None:
    extra = {}
    if base.family.lora_layout == "diffusers":  # the one layout SD3's loaders share
        tensors = diffusers_state_dict(models, SAVE_DTYPES[cfg.save.dtype])
    elif cfg.save.layout == "peft":
        tensors, extra = peft_state_dict(models, SAVE_DTYPES[cfg.save.dtype])
    else:
        tensors = kohya_state_dict(models, SAVE_DTYPES[cfg.save.dtype], base.family.unet_namer(base.unet.config))
    metadata = build_metadata(
        name=path.stem, family=base.family, cfg=cfg, resolution=cfg.data.resolution,
        prediction_type=cfg.model.prediction_type, train_text_encoder=bool(cfg.lora.train_text_encoder),
        datasets=dataset_metadata(data.entries, cfg, cfg.data.resolution), steps=step,
        epoch=epoch + 1, started=started, finished=now_epoch(), base_name=base.name, base_hash=base.file_hash,
        thumbnail=png_data_url(thumbnail) if thumbnail else None,
        architecture=base.family.architecture(base.unet.config),
    )
    ups = [t for k, t in tensors.items() if k.endswith((".lora_up.weight", ".lora_B.weight"))]
    if ups and not any(t.any() for t in ups):  # e.g. saved while warmup still held the learning rate at 0
        note = (f"{path.name}: every lora_up weight is zero, so this LoRA changes nothing yet (step {step}; "
                f"warmup {cfg.optim.warmup_steps} steps at learning rate {cfg.optim.lr:g})")
        events.emit("warning", message=note)
        print(f"lora-studio: warning: {note}", file=sys.stderr)
    try:
        with events.progress.phase("saving"):
            save_lora(path, tensors, {**metadata, **extra})
    except NonFiniteError as e:  # never a file every loader would apply as garbage; an earlier one stays
        raise TrainingError(f"the LoRA's weights became NaN or infinite by step {step}: {e} (any earlier "
                            f"{path.name} and the checkpoints before are kept; try a lower optim.lr)") from None
    except OSError as e:  # written to a temp file first: the previous file at `path` is untouched
        raise TrainingError(f"could not save {path.name}: {e.strerror or e} (free disk space or pick another "
                            f"save.output_dir; any earlier {path.name} is intact)") from None
    events.emit("saved", step=step, path=str(path))
