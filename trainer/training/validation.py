"""A deterministic validation loss: images held out of training, each noised at the same timesteps with the
same noise every time, so two checkpoints' figures differ only by what the LoRA learned.

Held out by `data.validation_split` (a fraction below 1, or a count) chosen with the run's seed, or taken
from `data.validation_dataset`. Latents, noise and (with frozen text encoders) caption embeddings are made
once at the start; each evaluation is then a few no-grad UNet passes per image over all timesteps. No random
number generator of the training is touched, so a run with validation trains exactly as one without.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random

import torch
import torch.nn.functional as F

from trainer.data.cache import encode_latent
from trainer.data.captions import split_tags
from trainer.data.dataset import TrainingSet
from trainer.data.scan import Scan

# Spread over the schedule, so low, middle and high noise all count. 20, not 5: on the embedded model 5 left
# checkpoints' losses within noise of each other (bench checkpoints picked one scoring 77% of the best; with 20,
# the best one). Evaluated CHUNK at a time: a batch of 20 at SDXL's 1024 px would not fit a small card.
TIMESTEPS = 20
CHUNK = 4
CENTRE = (0.5, 0.5)


MIN_TRAINING_IMAGES = 3  # a split that leaves fewer trains on next to nothing


class SplitError(ValueError):
    """A validation split that would leave too little to train on; the message has the numbers."""


def split(found: Scan, spec: float, seed: int) -> tuple[Scan, Scan | None]:
    """(training scan, validation scan): `spec` < 1 is a fraction of the images, >= 1 a count; 0 = none.
    The same seed holds out the same images. A split that would keep fewer images for training than it holds out,
    or fewer than MIN_TRAINING_IMAGES, is refused with the numbers and the largest split that works."""
    if not spec:
        return found, None
    total = len(found.items)
    n = max(1, round(spec * total)) if spec < 1 else int(spec)
    if total - n < max(n, MIN_TRAINING_IMAGES):
        most = min(total // 2, total - MIN_TRAINING_IMAGES)
        fix = (f"hold out at most {most} (data.validation_split={most}, or a fraction such as 0.1)" if most >= 1
               else f"add images (a validation set needs at least {MIN_TRAINING_IMAGES + 1}), or set "
                    "data.validation_split=0 or name a data.validation_dataset folder")
        raise SplitError(f"data.validation_split={spec:g} holds out {min(n, total)} of {total} images and leaves "
                         f"{max(total - n, 0)} to train on; {fix}")
    held = set(random.Random(f"validation-{seed}").sample(range(len(found.items)), n))
    train = dataclasses.replace(found, items=[it for i, it in enumerate(found.items) if i not in held])
    val = dataclasses.replace(found, items=[it for i, it in enumerate(found.items) if i in held], problems={})
    return train, val


class Validation:
    """Everything fixed at the start; `loss()` evaluates the current LoRA on it."""

    def __init__(self, found: Scan, cfg, fam, vae, tokenizers, text_encoders, schedule, encode_text: bool,
                 precision, device):
        data_cfg = dataclasses.replace(cfg.data, random_crop=False, flip=False, shuffle_tags=False, tag_dropout=0.0,
                                       caption_dropout=0.0, repeats=1)
        self.data = TrainingSet(found, data_cfg, cfg.data.resolution)
        self.fam, self.tokenizers, self.schedule = fam, tokenizers, schedule
        self.precision, self.device, self.clip_skip = precision, device, cfg.model.clip_skip
        self.timesteps = schedule.spread(TIMESTEPS)
        gen = torch.Generator("cpu").manual_seed(cfg.train.seed + 7919)  # its own generator, never the training's
        with torch.no_grad():
            self.latents = [encode_latent(vae, self.data.pixels(i, CENTRE, False)[0], gen).float()
                            for i in range(len(self.data))]
        self.noise = [torch.randn((TIMESTEPS, *lat.shape), generator=gen) for lat in self.latents]
        self.captions = [e.caption for e in self.data.entries]
        # Frozen text encoders give the same embeddings every time: encode once. Trained ones change, so
        # they encode at every evaluation (they are on the device then).
        self.text = [self._encode(text_encoders, c) for c in self.captions] if encode_text else None

    def __len__(self) -> int:
        return len(self.data)

    @torch.no_grad()
    def _encode(self, text_encoders, caption: str):
        with self.precision.autocast():
            hidden, pooled = self.fam.encode(text_encoders, self.fam.tokenize(self.tokenizers, [caption]), self.clip_skip)
        return hidden[0].cpu(), None if pooled is None else pooled[0].cpu()

    @torch.no_grad()
    def loss(self, unet, text_encoders, stop=None, progress=None) -> float | None:
        """Mean MSE over every held-out image and timestep, the models in eval mode (LoRA dropout off); None when
        `stop()` said so between two images (a Stop pressed meanwhile)."""
        models = [unet, *text_encoders]
        modes = [m.training for m in models]
        for m in models:
            m.eval()
        try:
            total = 0.0
            for i, (latent, noise) in enumerate(zip(self.latents, self.noise)):
                if stop is not None and stop():
                    return None
                hidden, pooled = self.text[i] if self.text is not None else self._encode(text_encoders, self.captions[i])
                total += self._one(unet, i, latent, noise, hidden, pooled)
                if progress:
                    progress(i + 1)
            return total / len(self.latents)
        finally:
            for m, mode in zip(models, modes):
                m.train(mode)

    def _one(self, unet, i: int, latent, noise, hidden, pooled) -> float:
        """Image i's loss over all timesteps, CHUNK timesteps per UNet pass."""
        dtype, total = self.precision.weight_dtype, 0.0
        for start in range(0, TIMESTEPS, CHUNK):
            t = self.timesteps[start:start + CHUNK].to(self.device)
            n = len(t)
            latents = latent.to(self.device).expand(n, *latent.shape)
            eps = noise[start:start + CHUNK].to(self.device)
            noisy, target, model_t = self.schedule.noised(latents, eps, t)
            e = self.data.entries[i]
            size, bucket = (e.size[1], e.size[0]), (e.bucket[1], e.bucket[0])
            pooled_n = None if pooled is None else pooled.to(self.device, dtype).expand(n, *pooled.shape)
            with self.precision.autocast():
                pred = self.fam.denoise(unet, noisy.to(dtype), model_t,
                                        hidden.to(self.device, dtype).expand(n, *hidden.shape), pooled_n, [size] * n,
                                        [self.data.crop_top_left(i, CENTRE)] * n, [bucket] * n)
            total += F.mse_loss(pred.float(), target.float(), reduction="sum").item() / target[0].numel()
        value = total / TIMESTEPS
        return value if math.isfinite(value) else float("nan")


@contextlib.contextmanager
def lora_disabled(models):
    """The base model's behaviour, for comparison: every peft LoRA layer off for the duration."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def embedded_drift() -> dict:
    """The embedded model's trigger-free scenes ("prompts") and the seed, steps and guidance they are rendered at
    ("eval"): shipped with the model, so neither training nor preview imports the synthetic world."""
    import json

    from trainer.resources import EMBEDDED_MODEL

    return json.loads((EMBEDDED_MODEL / "drift_prompts.json").read_text(encoding="utf-8"))


def drift_prompts(cfg, embedded: bool, n: int = 4) -> list[str]:
    """Prompts without the trigger: what the LoRA should leave alone. The embedded model's own scenes (as
    `bench learn` measures drift), else the sample prompts with the trigger taken out."""
    if embedded:
        return embedded_drift()["prompts"][:n]
    stripped = [", ".join(t for t in split_tags(p) if t != cfg.data.trigger) for p in cfg.sample.prompts]
    return [p for p in stripped if p][:n]


def drift(base_images, lora_images) -> float:
    """Mean absolute pixel change (0..1) between renders of the same prompts and seeds: how much a LoRA moves what it
    should leave alone (the base's own seed-to-seed change sets the bound it is judged by)."""
    import numpy as np

    def pixels(im):
        return np.asarray(im.convert("RGB") if hasattr(im, "convert") else im, dtype=np.float32)

    return float(np.mean([np.abs(pixels(a) - pixels(b)).mean() / 255.0 for a, b in zip(base_images, lora_images)]))


@dataclasses.dataclass
class Checkpoint:
    step: int
    path: str
    validation_loss: float
    drift: float | None


SPREAD_SHARE = 0.8  # auto drift bound: this share of the base's own seed-to-seed change (0.09 on the embedded model)
SPREAD_SEED_OFFSET = 1000  # the second seed the base renders the drift prompts at


def drift_bound(configured: float | None, seed_spread: float | None) -> tuple[float, str]:
    """(the bound, what it rests on): train.drift_bound when set, else SPREAD_SHARE of the base model's own change
    between two seeds on the drift prompts (a LoRA should change trigger-free images less than a new seed does)."""
    if configured is not None:
        return configured, "train.drift_bound"
    if seed_spread is None:
        return 1.0, "no drift measured"
    return SPREAD_SHARE * seed_spread, f"{SPREAD_SHARE:g}x the base model's own change between two seeds, " \
                                       f"{seed_spread:.3f}"


def recommend(checkpoints: list[Checkpoint], drift_bound: float, basis: str = "") -> tuple[Checkpoint, str] | None:
    """The checkpoint to keep and why, in one line: the lowest validation loss among those whose drift stays
    within the bound (all of them when none does), and how much worse the ones after it got. `basis`: what the
    bound rests on, said beside it."""
    usable = [c for c in checkpoints if math.isfinite(c.validation_loss)]
    if not usable:
        return None
    calm = [c for c in usable if c.drift is None or c.drift <= drift_bound] or usable
    best = min(calm, key=lambda c: (c.validation_loss, c.step))
    why = [f"step {best.step}: lowest validation loss ({best.validation_loss:.4g})"]
    if best.drift is not None:
        within = "within" if best.drift <= drift_bound else "above"
        why.append(f"drift {best.drift:.3f} {within} the {drift_bound:.3g} bound" + (f" ({basis})" if basis else ""))
    passed_over = [c for c in usable if c not in calm and c.validation_loss < best.validation_loss]
    if passed_over:
        why.append(f"{len(passed_over)} checkpoint(s) with lower loss drift past the bound")
    later = [c for c in usable if c.step > best.step]
    if later:
        worst = max(later, key=lambda c: c.validation_loss)
        rise = (worst.validation_loss / best.validation_loss - 1) * 100 if best.validation_loss else 0.0
        if rise >= 1:
            why.append(f"later checkpoints overfit: validation loss +{rise:.0f}% by step {worst.step}")
        else:
            why.append(f"later checkpoints are no better (+{max(rise, 0):.1f}% at most)")
    return best, "; ".join(why)
