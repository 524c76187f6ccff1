"""The floor a training step is compared with: a bare UNet forward + backward.

Same UNet, same LoRA, same input shapes, precision, attention and checkpointing as the loop, but
no data loading, text encoding, optimizer or bookkeeping. Run as its own process by `bench speed`
so its peak memory is its own:

    python -m trainer.bench.floor --model DIR --resolution 512 --precision bf16 --checkpointing 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def measure(model: str, resolution: int, precision: str, checkpointing: bool, rank: int, steps: int,
            warmup: int, attention: str = "sdpa") -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import cast_training_params

    from ..config import LoraConfig
    from trainer.lora.inject import inject, unet_targets
    from trainer.models import FAMILIES
    from trainer.memory.precision import Precision

    prec = Precision(precision, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", dtype=prec.weight_dtype)
    unet.requires_grad_(False)
    unet.to(prec.device)
    lora = LoraConfig(rank=rank, alpha=rank)
    inject(unet, lora, unet_targets(lora), "UNet")
    cast_training_params([unet], dtype=torch.float32)  # as the loop does: LoRA in fp32 over a half base
    if checkpointing:
        unet.enable_gradient_checkpointing()
    if attention == "sdpa":
        unet.set_attn_processor(FAMILIES["sd1"].attention_processor())  # what the loop sets on a UNet
    else:  # the pre-SDPA path that materialises every attention matrix: only to show what SDPA saves
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    cfg = unet.config
    gen = torch.Generator().manual_seed(0)
    vae = json.loads((Path(model) / "vae" / "config.json").read_text(encoding="utf-8"))
    side = resolution // 2 ** (len(vae["block_out_channels"]) - 1)  # the latent size the loop trains on
    latents = torch.randn((1, cfg.in_channels, side, side), generator=gen).to(prec.device)
    hidden = torch.randn((1, 77, cfg.cross_attention_dim), generator=gen).to(prec.device, prec.weight_dtype)
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn((1, pooled), generator=gen).to(prec.device, prec.weight_dtype),
                 "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]],
                                          dtype=prec.weight_dtype, device=prec.device)}
    t = torch.tensor([500], device=prec.device)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        with prec.autocast():
            pred = unet(latents.to(prec.weight_dtype), t, hidden, added_cond_kwargs=added).sample
        F.mse_loss(pred.float(), latents).backward()
        if prec.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        unet.zero_grad(set_to_none=True)
    out = {"floor_s": statistics.median(times), "times": [round(x, 3) for x in times]}
    if prec.device.type == "cuda":
        out["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 1024 ** 3
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--precision", default="bf16", choices=["no", "fp16", "bf16"])
    p.add_argument("--checkpointing", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "classic"])
    a = p.parse_args(argv)
    print(json.dumps(measure(a.model, a.resolution, a.precision, bool(a.checkpointing), a.rank, a.steps, a.warmup,
                             a.attention)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
