"""A LoRA file written from the trained peft layers: the family's key layout (kohya for SD 1/2/SDXL, diffusers' for
SD3, or peft's when asked), the run's metadata, and never a file holding NaN/Inf."""
from __future__ import annotations

import sys
from pathlib import Path

from trainer.errors import TrainingError
from trainer.lora.write import (SAVE_DTYPES, NonFiniteError, build_metadata, dataset_metadata, diffusers_state_dict,
                                kohya_name, kohya_state_dict, now_epoch, peft_state_dict, png_data_url, save_lora)
from trainer.lora.lycoris import DIFFUSERS_PREFIX
from trainer.lora.lycoris import state_dict as lycoris_state_dict
from trainer.training.events import Events


def lycoris_namer(base):
    """LyCORIS module names: kohya's for SD 1/2/SDXL and every text encoder; `lycoris_<path>` for a transformer
    (SD3, Flux, Z-Image), the name ComfyUI maps for those families."""
    unet_namer = base.family.unet_namer(base.unet.config)
    diffusers = base.family.lora_layout == "diffusers"

    def name_of(prefix: str, path: str) -> str:
        if diffusers and not prefix.startswith("lora_te"):
            return DIFFUSERS_PREFIX + path.replace(".", "_")
        return kohya_name(prefix, path, unet_namer)
    return name_of


def save_lora_file(path: Path, step: int, epoch: int, events: Events, *, cfg, base, data, models, started,
          thumbnail: Path | None = None) -> None:
    extra, dtype = {}, SAVE_DTYPES[cfg.save.dtype]
    layout, _ = base.family.layout_for(cfg.save.layout)
    if cfg.lora.network != "lora":  # LoHa/LoKr: the LyCORIS layout, whatever save.layout says
        tensors = lycoris_state_dict(models, dtype, lycoris_namer(base))
    elif layout == "diffusers":  # the one layout SD3's, Flux's and Z-Image's loaders share
        tensors = diffusers_state_dict(models, dtype)
    elif layout == "peft":
        tensors, extra = peft_state_dict(models, dtype)
    elif base.family.BFL_KOHYA:  # Flux.1 in kohya's layout: BFL's fused names for the transformer
        from trainer.lora import flux_kohya

        denoiser = models.get(base.family.denoiser_prefix)
        tensors = flux_kohya.state_dict(denoiser, dtype) if denoiser is not None else {}
        tensors.update(kohya_state_dict({k: m for k, m in models.items() if m is not denoiser}, dtype))
    else:
        tensors = kohya_state_dict(models, dtype, base.family.unet_namer(base.unet.config))
    metadata = build_metadata(
        name=path.stem, family=base.family, cfg=cfg, resolution=cfg.data.resolution,
        prediction_type=cfg.model.prediction_type, train_text_encoder=bool(cfg.lora.train_text_encoder),
        datasets=dataset_metadata(data.entries, cfg, cfg.data.resolution), steps=step,
        epoch=epoch + 1, started=started, finished=now_epoch(), base_name=base.name, base_hash=base.file_hash,
        thumbnail=png_data_url(thumbnail) if thumbnail else None,
        architecture=base.family.architecture(base.unet.config), layout=layout,
    )
    # the factor each kind starts from zero: while it is all zero, the file changes nothing
    ups = [t for k, t in tensors.items() if k.endswith((".lora_up.weight", ".lora_B.weight", ".hada_w2_b",
                                                        ".lokr_w1", ".lokr_w1_a"))]
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


def save_state(run_dir: Path, step: int, epoch: int, consumed: int, params: dict, r, cfg, precision, events: Events,
               accelerator, rng, gen) -> None:
    """The full training state for --resume: each process's random state, then (main) the weights, optimizer,
    schedule and counters, committed whole or not at all. A full disk is one line and the last good state stays."""
    from safetensors import SafetensorError

    from trainer.training import state as state_mod

    try:
        state_mod.write_rank_rng(state_mod.temp_folder(run_dir, step), accelerator.process_index, rng, gen)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with events.progress.phase("saving"):
                folder = state_mod.commit(run_dir, step, params, r.optimizer, r.lr_scheduler, precision.scaler,
                                          {"step": step, "epoch": epoch, "consumed": consumed}, cfg.save.keep_states)
            events.emit("state", step=step, path=str(folder))
    except (OSError, RuntimeError, SafetensorError) as e:  # a full disk: torch.save says RuntimeError
        raise state_mod.save_failed(run_dir, step, e, params) from None
    accelerator.wait_for_everyone()
