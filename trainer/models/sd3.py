"""SD 3 / 3.5: an MMDiT transformer trained by rectified flow; CLIP-L and CLIP-G, then T5-XXL (optional)."""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from trainer.models.flow import FlowMatchingFamily

# The joint attention: the image stream's projections and the text stream's (add_*), in every block's attention and
# SD3.5's second, image-only one (attn2).
MMDIT_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
MMDIT_EXTRA = {"ff": ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]}


class NoT5(torch.nn.Module):
    """Stands in for SD3's T5 encoder when it is left out: zero embeddings, as diffusers' SD3 pipeline uses
    without text_encoder_3 (CLIP's token count, the transformer's joint width). SD3 was trained with each text
    encoder dropped now and then, so it still follows the CLIP half of a prompt."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        # An empty parameter gives it a device and a dtype that move with .to(), as a real encoder's do.
        self.anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, input_ids, **_):
        hidden = torch.zeros(*input_ids.shape, self.width, device=self.anchor.device, dtype=self.anchor.dtype)
        return SimpleNamespace(last_hidden_state=hidden)


@dataclass(frozen=True)
class SD3Family(FlowMatchingFamily):
    """SD 3 / 3.5: an MMDiT transformer trained by rectified flow, conditioned on CLIP-L and CLIP-G (penultimate
    layers, concatenated and zero-padded to T5's width) followed in the sequence by T5-XXL, plus both CLIPs'
    pooled projections. The text encoders LoRA can train are the two CLIPs (diffusers' SD3 loader has no T5)."""

    LABEL = "an SD3"
    KOHYA_NETWORK = "networks.lora_sd3"

    T5_TOKENS = 256  # diffusers' SD3 default max_sequence_length

    def lora_targets(self, denoiser_config=None):
        return MMDIT_ATTENTION, MMDIT_EXTRA

    def tokenize(self, tokenizers, captions):
        ids = super().tokenize(tokenizers[:2], captions)
        t5 = tokenizers[2] if len(tokenizers) > 2 else None
        if t5 is None:
            return ids + [torch.zeros(len(captions), tokenizers[0].model_max_length, dtype=torch.long)]
        return ids + [t5(captions, padding="max_length", max_length=min(t5.model_max_length, self.T5_TOKENS),
                         truncation=True, add_special_tokens=True, return_tensors="pt").input_ids]

    def encode(self, text_encoders, input_ids, clip_skip: int = 1):
        hidden, pooled = [], []
        for te, ids in zip(text_encoders[:2], input_ids[:2]):
            out = te(ids.to(te.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        t5 = text_encoders[2](input_ids[2].to(text_encoders[2].device)).last_hidden_state
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)

    def architecture(self, denoiser_config) -> str:
        # kohya's sai_model_spec: "stable-diffusion-3" followed by the variant, told apart as sd-scripts' sd3_utils
        # tells them: SD3.5 has qk-norm, and Medium its second image attention (dual attention layers)
        config = dict(denoiser_config)
        if config.get("qk_norm"):
            return "stable-diffusion-3-5-medium" if config.get("dual_attention_layers") else "stable-diffusion-3-5-large"
        return "stable-diffusion-3-medium"

    def denoise(self, model, noisy, t, hidden, pooled, sizes, crops, targets):
        return model(hidden_states=noisy, timestep=t, encoder_hidden_states=hidden, pooled_projections=pooled).sample

    def pipeline(self, unet, vae, text_encoders, tokenizers, scheduler):
        from diffusers import StableDiffusion3Pipeline

        text_encoders = text_encoders or [None, None, None]
        t5 = None if isinstance(text_encoders[2], NoT5) else text_encoders[2]
        return StableDiffusion3Pipeline(transformer=unet, scheduler=scheduler, vae=vae,
                                        text_encoder=text_encoders[0], tokenizer=tokenizers[0],
                                        text_encoder_2=text_encoders[1], tokenizer_2=tokenizers[1],
                                        text_encoder_3=t5, tokenizer_3=tokenizers[2] if t5 is not None else None)


