"""One micro-batch's training loss, as diffusers' training examples compute it: latents (cached, or encoded now
with the batch's crop and flip), noise at times the family's schedule draws, the captions' conditioning (cached
for frozen encoders, else encoded with gradients), the denoiser's prediction, and the per-sample weights
(masks, prior preservation, the schedule's own weighting). The family decides the schedule and the call."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.data.cache import encode_latent, latent_generator


@dataclass
class Step:
    cfg: object
    data: object  # the TrainingSet
    fam: object
    schedule: object
    precision: object
    device: torch.device
    cache: object  # a LatentCache, or None when latents are encoded every step
    vae: torch.nn.Module
    vae_id: str
    tokenizers: list
    text_encoders: list  # as the forward pass sees them (DDP-wrapped when trained on several processes)
    denoiser: torch.nn.Module  # likewise
    text_cache: object  # a TextCache (data/text_cache.py) for frozen encoders and fixed captions, or None
    train_te: bool
    latent_factor: int  # pixels per latent cell, for masks
    rng: object  # random.Random: crops, flips and caption shuffles
    gen: torch.Generator  # noise, timesteps and VAE sampling

    def loss(self, batch_idx: list[int]) -> torch.Tensor:
        cfg, data, device, dtype = self.cfg, self.data, self.device, self.precision.weight_dtype
        crops = [data.crop_position(self.rng) for _ in batch_idx]
        flips = [cfg.data.flip and self.rng.random() < 0.5 for _ in batch_idx]
        captions = [data.caption(i, self.rng) for i in batch_idx]
        with torch.no_grad():
            latents, crop_tl = self.latents(batch_idx, crops, flips)
        latents = latents.to(device, torch.float32)
        noise = torch.randn(latents.shape, generator=self.gen).to(device)
        if cfg.train.noise_offset:
            noise += cfg.train.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=self.gen).to(device)
        t = self.schedule.sample(latents.shape[0], self.gen, latents.shape).to(device)
        noisy, target, model_t = self.schedule.noised(latents, noise, t)
        hidden, pooled = self.conditioning(captions)
        sizes = [(e.size[1], e.size[0]) for e in (data.entries[i] for i in batch_idx)]
        targets = [(data.entries[i].bucket[1], data.entries[i].bucket[0]) for i in batch_idx]
        with self.precision.autocast():
            pred = self.fam.denoise(self.denoiser, noisy.to(dtype), model_t, hidden.to(dtype),
                                    None if pooled is None else pooled.to(dtype), sizes, crop_tl, targets)
        loss = F.mse_loss(pred.float(), target.float(), reduction="none")
        if cfg.data.masked_loss:
            masks = torch.stack([data.mask(i, c, f, self.latent_factor) for i, c, f in zip(batch_idx, crops, flips)])
            loss = loss * masks.to(device) / masks.mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-3).to(device)
        loss = loss.mean(dim=(1, 2, 3))
        loss = loss * torch.tensor([cfg.data.prior_loss_weight if data.entries[i].is_reg else 1.0
                                    for i in batch_idx], device=device)
        weight = self.schedule.weight(t)
        return (loss if weight is None else loss * weight).mean()

    def conditioning(self, captions: list[str]):
        if self.text_cache is not None:
            hidden, pooled = self.fam.collate_text([self.text_cache.get(c) for c in captions])
            return hidden.to(self.device), None if pooled is None else pooled.to(self.device)
        with self.precision.autocast(), (contextlib.nullcontext() if self.train_te else torch.no_grad()):
            return self.fam.encode(self.text_encoders, self.fam.tokenize(self.tokenizers, captions),
                                   self.cfg.model.clip_skip)

    def latents(self, batch_idx, crops, flips):
        data, cache = self.data, self.cache
        out, crop_tl = [], []
        for i, crop, flip in zip(batch_idx, crops, flips):
            key = data.cache_key(i, crop, self.vae_id) if cache else None
            latent = cache.get(key) if cache else None
            if latent is None:
                pixels, _ = data.pixels(i, crop, flip)
                # A cached latent is seeded by its key (the same in any order); one made every step (random crops,
                # flips) draws from the run's generator.
                latent = encode_latent(self.vae, pixels, latent_generator(key) if cache else self.gen)
                if cache:
                    cache.put(key, latent)
            out.append(latent)
            crop_tl.append(data.crop_top_left(i, crop))
        return torch.stack(out), crop_tl
