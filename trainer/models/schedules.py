"""How a family noises latents and what its model learns to predict: DDPM diffusion (SD1, SD2, SDXL) or
rectified flow (SD3, Flux.1, Z-Image). The loop and the validation loss ask their family's schedule; neither branches on it.

A schedule draws training times (`sample`, given the batch's latent shape), spreads fixed ones for the validation loss (`spread`), noises a
batch at given times (`noised`: the model's input, the target it regresses to, and the time value the model
itself is fed) and weighs the per-sample losses (`weight`).
"""
from __future__ import annotations

import math

import torch


class Diffusion:
    """DDPM noising with an epsilon or v-prediction target, as diffusers' LoRA examples train SD1/SD2/SDXL."""

    weights_by_snr = True  # train.min_snr_gamma applies

    def __init__(self, scheduler_config: dict, prediction_type: str, zero_terminal_snr: bool, min_snr_gamma: float):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(scheduler_config, prediction_type=prediction_type,
                                                   rescale_betas_zero_snr=zero_terminal_snr)
        self.steps = self.scheduler.config.num_train_timesteps
        self.v_pred = prediction_type == "v_prediction"
        self.min_snr_gamma = min_snr_gamma

    def sample(self, n: int, gen: torch.Generator, shape=None) -> torch.Tensor:
        return torch.randint(0, self.steps, (n,), generator=gen)

    def spread(self, n: int) -> torch.Tensor:
        return torch.linspace(self.steps * 0.05, self.steps * 0.95, n).round().long()

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        noisy = self.scheduler.add_noise(latents, noise, t)
        target = self.scheduler.get_velocity(latents, noise, t) if self.v_pred else noise
        return noisy, target, t

    def weight(self, t: torch.Tensor) -> torch.Tensor | None:
        """Min-SNR-γ: min(SNR, γ)/SNR for epsilon, min(SNR, γ)/(SNR+1) for v, which stays finite (0) at the
        zero-terminal-SNR last step."""
        if not self.min_snr_gamma:
            return None
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, t)
        clipped = torch.clamp(snr, max=self.min_snr_gamma)
        return clipped / (snr + 1) if self.v_pred else clipped / snr


class FlowMatching:
    """Rectified flow as SD3 trains: x_σ = (1-σ)·x0 + σ·ε and the model predicts the velocity ε - x0.

    σ is drawn logit-normal (mean 0, std 1), the sampler the SD3 paper ranks best (section 5.1, "rf/lognorm(0.00,
    1.00)"), then shifted by the scheduler's `shift` (3.0 for SD3; higher resolutions need more noise to destroy the
    same signal, section 5.3.2). The loss weight is 1: the logit-normal density already is the weighting, as in
    diffusers' SD3 example with weighting_scheme="logit_normal". σ is continuous rather than rounded onto the
    scheduler's 1000 steps; the transformer embeds any time value, and so do the samplers.

    A scheduler with `use_dynamic_shifting` (Flux.1 dev) shifts by the image's size instead: exp(μ), μ linear in the
    image's token count (latent cells over `cell`, 2x2 patches for Flux) from base_shift at base_image_seq_len to
    max_shift at max_image_seq_len. That is the shift diffusers' Flux pipeline samples a picture of that size with
    (calculate_shift), and sd-scripts' `timestep_sampling = "flux_shift"`: training sees the noise levels its own
    sampler will visit at every bucket size, where one fixed shift would train 512 px buckets at 1024 px noise."""

    weights_by_snr = False  # min-SNR weighting is for DDPM schedules

    def __init__(self, scheduler_config: dict, logit_mean: float = 0.0, logit_std: float = 1.0, cell: int = 1):
        self.config = dict(scheduler_config)
        self.shift = float(scheduler_config.get("shift", 1.0))
        self.dynamic = bool(scheduler_config.get("use_dynamic_shifting", False))
        self.steps = int(scheduler_config.get("num_train_timesteps", 1000))
        self.logit_mean, self.logit_std, self.cell = logit_mean, logit_std, cell

    def shift_for(self, shape=None) -> float:
        """The shift for latents of `shape` (B, C, H, W); without one, a dynamic schedule's at max_image_seq_len
        (a 1024 px image for Flux): the fixed spread of the validation loss."""
        if not self.dynamic:
            return self.shift
        c = self.config
        lo, hi = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        a, b = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
        tokens = hi if shape is None else (shape[-2] // self.cell) * (shape[-1] // self.cell)
        return math.exp(a + (b - a) * (tokens - lo) / (hi - lo))

    def _shifted(self, u: torch.Tensor, shift: float) -> torch.Tensor:
        return shift * u / (1 + (shift - 1) * u)

    def sample(self, n: int, gen: torch.Generator, shape=None) -> torch.Tensor:
        u = torch.sigmoid(torch.randn(n, generator=gen) * self.logit_std + self.logit_mean)
        return self._shifted(u, self.shift_for(shape))

    def spread(self, n: int) -> torch.Tensor:
        return self._shifted(torch.linspace(0.05, 0.95, n), self.shift_for())

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor):
        s = sigma.to(latents.device, latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
        return (1 - s) * latents + s * noise, noise - latents, sigma * self.steps

    def weight(self, sigma: torch.Tensor) -> torch.Tensor | None:
        return None
