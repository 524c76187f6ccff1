"""Flux.1 (dev and schnell): a rectified-flow transformer of double (joint image/text) and single blocks over packed
2x2 patches of a 16-channel VAE's latents, conditioned on T5-XXL's sequence and CLIP-L's pooled output; dev also
embeds the guidance value it was distilled with."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.errors import ModelError
from trainer.models.flow import FlowMatchingFamily

# The double blocks' joint attention (image stream to_*, text stream add_*) and the single blocks' attention; the
# single blocks' MLP projections and both streams' feed-forward are extras. Every one of these names is a key that
# ComfyUI's Flux map (comfy.utils.flux_to_diffusers) sends to a weight of its own layout, and diffusers' Flux loader
# takes as it is.
FLUX_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
FLUX_FF = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
# The guidance embedding dev LoRAs train with: 1.0, as sd-scripts' Flux LoRA guide trains them (its --guidance_scale
# parser default is 3.5, the sampling value: that is what samples and Preview use).
TRAINING_GUIDANCE = 1.0


@dataclass(frozen=True)
class FluxFamily(FlowMatchingFamily):
    """Flux.1: CLIP-L (pooled) and T5-XXL (the sequence: 512 tokens for dev, 256 for schnell, as BFL's reference code
    and sd-scripts encode them; `adapt` sets schnell's window on its T5 tokenizer); latents packed into 2x2 patches with their position ids; timesteps from the logit-normal
    sampler shifted by the resolution (dev: the image's token count sets the shift, as the sampler does) or by the
    scheduler's fixed shift (schnell). LoRA files are written in diffusers' layout, which ComfyUI and Forge map to
    their fused qkv weights and diffusers loads as it is; only CLIP-L can be trained beside the transformer."""

    LABEL = "a Flux"
    KOHYA_NETWORK = "networks.lora_flux"
    BFL_KOHYA = True  # save.layout = kohya: BFL's fused names (lora/flux_kohya.py)
    CELL = 2

    T5_TOKENS = 512
    SCHNELL_T5_TOKENS = 256

    def adapt(self, denoiser_config, tokenizers) -> None:
        """Schnell (no guidance embedding) reads T5's first 256 tokens: its tokenizer's window is set to that, so
        training, the caption cache, samples and Preview all encode alike."""
        if not dict(denoiser_config).get("guidance_embeds", True) and len(tokenizers) > 1 and tokenizers[1] is not None:
            tokenizers[1].model_max_length = min(tokenizers[1].model_max_length, self.SCHNELL_T5_TOKENS)

    def lora_targets(self, denoiser_config=None):
        """Attention everywhere and the single blocks' MLP in and out (named by path: the model's final proj_out
        shares the name), as sd-scripts' lora_flux and diffusers' Flux LoRA example train them: a single block's q, k,
        v and MLP input are one fused Linear in BFL's model (and in kohya's files), its output one more. Extra: the
        double blocks' feed-forward ("ff"); "single_mlp" names the default's MLP part and adds nothing."""
        n = int(dict(denoiser_config or {}).get("num_single_layers", 38))
        single = [f"single_transformer_blocks.{i}.{name}" for i in range(n) for name in ("proj_mlp", "proj_out")]
        return FLUX_ATTENTION + single, {"single_mlp": [], "ff": FLUX_FF}

    def check(self, cfg) -> None:
        super().check(cfg)
        if not cfg.model.t5:
            raise ModelError("model.t5 = false does not fit Flux: T5-XXL's sequence is the prompt it follows (CLIP "
                             "gives only a pooled vector); keep it and let the caption cache release it")

    def tokenize(self, tokenizers, captions):
        clip, t5 = tokenizers[0], tokenizers[1]
        ids = [clip(captions, padding="max_length", max_length=clip.model_max_length, truncation=True,
                    return_tensors="pt").input_ids]
        return ids + [t5(captions, padding="max_length", max_length=min(t5.model_max_length, self.T5_TOKENS),
                         truncation=True, return_tensors="pt").input_ids]

    def encode(self, text_encoders, input_ids, clip_skip: int = 1):
        clip, t5 = text_encoders[0], text_encoders[1]
        pooled = clip(input_ids[0].to(clip.device), output_hidden_states=False).pooler_output
        hidden = t5(input_ids[1].to(t5.device), output_hidden_states=False)[0]
        return hidden.to(pooled.dtype), pooled

    def architecture(self, denoiser_config) -> str:
        return "flux-1-dev" if dict(denoiser_config).get("guidance_embeds") else "flux-1-schnell"

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/2 * W/2, 4C), as diffusers' FluxPipeline packs them."""
        b, c, h, w = latents.shape
        x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c4 = packed.shape
        x = packed.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c4 // 4, h, w)

    @staticmethod
    def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] += torch.arange(h // 2)[:, None]
        ids[..., 2] += torch.arange(w // 2)[None, :]
        return ids.reshape(-1, 3).to(device=device, dtype=dtype)

    def denoise(self, model, noisy, t, hidden, pooled, sizes, crops, targets):
        b, _, h, w = noisy.shape
        if h % 2 or w % 2:
            raise ModelError(f"a Flux latent of {h}x{w} cannot be packed into 2x2 patches; use a bucket step that "
                             "is a multiple of 16 pixels")
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.full((b,), TRAINING_GUIDANCE, device=noisy.device, dtype=torch.float32)
        out = model(hidden_states=self.pack(noisy), timestep=t.to(noisy.dtype) / 1000, guidance=guidance,
                    pooled_projections=pooled, encoder_hidden_states=hidden,
                    txt_ids=torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
                    img_ids=self.image_ids(h, w, noisy.device, noisy.dtype), return_dict=False)[0]
        return self.unpack(out, h, w)

    def prompt_kwargs(self, text_encoders, tokenizers, prompts, negative, clip_skip: int = 1) -> dict:
        """Flux dev follows its guidance embedding, not classifier-free guidance: no negative prompt is passed."""
        hidden, pooled = self.encode(text_encoders, self.tokenize(tokenizers, prompts), clip_skip)
        return {"prompt_embeds": hidden, "pooled_prompt_embeds": pooled}

    def pipeline(self, unet, vae, text_encoders, tokenizers, scheduler):
        from diffusers import FluxPipeline

        text_encoders = text_encoders or [None, None]
        return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0],
                            text_encoder_2=text_encoders[1], tokenizer_2=tokenizers[1], transformer=unet)
