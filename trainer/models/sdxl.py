"""SDXL: two CLIP encoders (penultimate layers concatenated, pooled from the second) and added conditioning on
the original size, crop and bucket of each image; LoRA files name its UNet in the original SGM names."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.models.family import Family


@dataclass(frozen=True)
class SDXLFamily(Family):
    def encode(self, text_encoders, input_ids, clip_skip: int = 1):
        # SDXL conditions on the penultimate layer of both encoders, concatenated, plus the
        # projected pooled output of the second.
        hidden, pooled = [], None
        for te, ids in zip(text_encoders, input_ids):
            out = te(ids.to(te.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if hasattr(out, "text_embeds"):
                pooled = out.text_embeds
        return torch.cat(hidden, dim=-1), pooled

    def unet_namer(self, unet_config):
        from trainer.models.sgm_names import unet_namer

        return unet_namer(dict(unet_config))

    def added_cond(self, pooled, original_sizes, crops, target_sizes):
        time_ids = torch.tensor([list(o) + list(c) + list(t) for o, c, t in zip(original_sizes, crops, target_sizes)],
                                dtype=pooled.dtype, device=pooled.device)
        return {"text_embeds": pooled, "time_ids": time_ids}

    def pipeline(self, unet, vae, text_encoders, tokenizers, scheduler):
        from diffusers import StableDiffusionXLPipeline

        text_encoders = text_encoders or [None, None]
        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
                                         tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                         scheduler=scheduler)


