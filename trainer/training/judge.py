"""The figures a run recommends a checkpoint from, and the end of a run that trained: its held-out validation set,
each saved checkpoint's validation loss and drift, the end samples, the final LoRA and the recommendation."""
from __future__ import annotations

from pathlib import Path

from trainer.config import RunConfig
from trainer.models.info import is_embedded
from trainer.training import validation
from trainer.training.events import Events
from trainer.training.residency import borrowed
from trainer.training.samples import checkpoint_grid
from trainer.training.saving import save_lora_file
from trainer.training.validation import drift


class Judge:
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
        """A Stop pressed meanwhile ends the figures between images (and denoising steps): the run saves its LoRA
        sooner, and this checkpoint goes without them."""
        cfg, stop = self.cfg, self.events.stop_requested
        if self.val is None:
            return
        if self.loss_at[0] != step:
            with self.events.progress.phase("validation", len(self.val)) as tick:
                loss = self.val.loss(self.models[0], self.models[1:], stop=stop, progress=tick)
            if loss is None:  # stopped part-way: no figure
                return
            self.loss_at = (step, loss)
            self.events.emit("validation", step=step, loss=self.loss_at[1])
            self.accelerator.log({"validation_loss": self.loss_at[1]}, step=step)
        if saved is None:
            return
        prompts = validation.drift_prompts(cfg, is_embedded(cfg.model.source))
        if prompts and not self.base_renders:
            with validation.lora_disabled(self.models):
                renders = self.render(prompts, stop=stop)
                if len(renders) < len(prompts):
                    return
                if cfg.train.drift_bound is None:
                    other = self.render(prompts, validation.SPREAD_SEED_OFFSET, stop=stop)
                    if len(other) < len(prompts):
                        return
                    self.seed_spread = drift(renders, other)
                    self.events.emit("seed_spread", value=self.seed_spread, prompts=len(prompts))
                self.base_renders.extend(renders)
        renders = self.render(prompts, stop=stop) if prompts else []
        if len(renders) < len(prompts):
            return
        moved = drift(self.base_renders, renders) if prompts else None
        self.checkpoints.append(validation.Checkpoint(step, str(saved), self.loss_at[1], moved))
        self.events.emit("checkpoint", step=step, path=str(saved), validation_loss=self.loss_at[1], drift=moved)
        sampled = (cfg.sample.every_n_steps and step % cfg.sample.every_n_steps == 0) or \
            (saved == self.final and cfg.sample.at_end)
        if cfg.sample.prompts and not sampled:
            self.sample(step)

def validation_set(cfg: RunConfig, base, held_out, schedule, train_te: bool, precision, device, events: Events):
    """The held-out images' latents, noise and (for frozen encoders) captions, made once now; None when none is
    usable."""
    with borrowed([base.vae], device, visiting=base.text_encoders), events.progress.phase("validation", len(held_out.items)):
        val = validation.Validation(held_out, cfg, base.family, base.vae, base.tokenizers, base.text_encoders,
                                    schedule, encode_text=not train_te, precision=precision, device=device)
    events.emit("validation_set", images=len(val), problems=len(val.data.problems))
    return val if len(val) else None

def finish(cfg: RunConfig, run_dir: Path, final: Path, step: int, epoch: int, stopped: bool, events: Events,
            save_args: dict, judge, sample) -> None:
    """The main process's end of a run that trained: the end samples (the first one the LoRA's thumbnail), the
    LoRA, its validation, the recommended checkpoint and every checkpoint's samples side by side. Stopped means
    stopped: the LoRA is saved first, and the end samples (minutes on a CPU) become their own phase that a second
    Stop skips (`sample(stop)` asks it before each image)."""
    thumb = None
    if stopped:
        save_lora_file(final, step, epoch, events, **save_args)
        events.clear_stop()
        if cfg.sample.at_end:
            events.emit("end_samples", step=step, prompts=len(cfg.sample.prompts),
                        message="the LoRA is saved; rendering the end samples (Stop again skips them)")
    if cfg.sample.at_end:
        written = sample(events.stop_requested if stopped else None)
        thumb = written[0] if written else None
    if thumb or not stopped:
        save_lora_file(final, step, epoch, events, thumbnail=thumb, **save_args)
    if stopped and events.stop_requested():  # a second Stop: the LoRA is saved; skip what is left of the end
        events.emit("end_skipped", step=step, message="second Stop: skipped the rest of the end samples and the "
                    "final LoRA's validation and drift")
    else:
        judge(step, final)
    picked = validation.recommend(judge.checkpoints, *validation.drift_bound(cfg.train.drift_bound, judge.seed_spread))
    if picked:
        events.emit("recommendation", step=picked[0].step, path=picked[0].path, message=picked[1])
    checkpoint_grid(run_dir, [c.step for c in judge.checkpoints], events)
