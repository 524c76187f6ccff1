"""Mixed precision in one place: frozen-weight dtype, autocast, and the fp16 grad scaler.

accelerate's autocast is a no-op for fp16 on CPU, so the loop uses torch's directly; the same
code then runs on CUDA (fp16 + GradScaler) and on CPU (bf16, or fp16 as far as torch allows).
"""
from __future__ import annotations

import contextlib

import torch

from trainer.models.info import FP32_VAE_UNDER_FP16

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Precision:
    def __init__(self, mode: str, device: torch.device):
        self.mode = mode
        self.device = device
        self.weight_dtype = DTYPES[mode]
        self.scaler = torch.amp.GradScaler(device.type, enabled=(mode == "fp16"))

    def autocast(self):
        if self.mode == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.weight_dtype)

    def vae_dtype(self, family_name: str) -> torch.dtype:
        # These VAEs overflow in fp16 (black images, NaN latents): they stay fp32 there.
        if self.mode == "fp16" and family_name in FP32_VAE_UNDER_FP16:
            return torch.float32
        return self.weight_dtype
