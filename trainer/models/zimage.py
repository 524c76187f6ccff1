"""Z-Image (Turbo and Base): a single-stream flow transformer over 2x2 patches of a 16-channel VAE's latents,
conditioned on a Qwen3 language model's hidden states for the chat-templated prompt."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.errors import ModelError
from trainer.models.flow import FlowMatchingFamily

# Every attention of the main layers and of both refiners (image and caption); the SwiGLU feed-forward is an extra.
# ComfyUI's Z-Image map (comfy.utils.z_image_to_diffusers) sends each of these names to its fused qkv (to_q, to_k,
# to_v as slices) or to its own weight, under the diffusion_model., transformer. and bare prefixes.
ZIMAGE_ATTENTION = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"]
ZIMAGE_EXTRA = {"ff": ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]}


@dataclass(frozen=True)
class ZImageFamily(FlowMatchingFamily):
    """Z-Image: the prompt goes through Qwen3's chat template (a user turn, generation prompt, thinking on) and the
    second-to-last hidden layer is kept for the prompt's real tokens only, as diffusers' ZImagePipeline encodes it.
    The transformer takes a list of latents and a list of caption features of their own lengths; it predicts
    x0 - noise at time 1 - σ, so the loop's velocity target is its negation. The text encoder is never trained."""

    LABEL = "a Z-Image"
    CELL = 2

    TOKENS = 512  # diffusers' ZImagePipeline max_sequence_length

    def lora_targets(self, denoiser_config=None):
        return ZIMAGE_ATTENTION, ZIMAGE_EXTRA

    def check(self, cfg) -> None:
        super().check(cfg)
        if cfg.lora.train_text_encoder:
            raise ModelError("lora.train_text_encoder does not fit Z-Image: its text encoder is a 4B language "
                             "model that no Z-Image LoRA loader applies a LoRA to; set it to false")

    @staticmethod
    def templated(tokenizer, caption: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=True)

    def tokenize(self, tokenizers, captions):
        tok = tokenizers[0]
        out = tok([self.templated(tok, c) for c in captions], padding="max_length",
                  max_length=min(tok.model_max_length, self.TOKENS), truncation=True, return_tensors="pt")
        return [out.input_ids, out.attention_mask]

    def encode(self, text_encoders, input_ids, clip_skip: int = 1):
        """(hidden states of every position, the prompt's mask): the mask travels as the 'pooled' half of the
        conditioning, so cached captions keep one shape; the denoiser keeps the masked positions only."""
        te = text_encoders[0]
        ids, mask = input_ids[0].to(te.device), input_ids[1].to(te.device)
        hidden = te(input_ids=ids, attention_mask=mask.bool(), output_hidden_states=True).hidden_states[-2]
        return hidden, mask.to(hidden.dtype)

    def text_entry(self, hidden, mask):
        """The prompt's real tokens only: padded to the 512-token window, a cached caption was 2.5 MiB."""
        return {"hidden": hidden[mask > 0.5]}

    def collate_text(self, entries):
        """Cached captions of their own lengths, padded to the batch's longest with a mask, as encode gives them."""
        n = max(e["hidden"].shape[0] for e in entries)
        first = entries[0]["hidden"]
        hidden = first.new_zeros(len(entries), n, first.shape[-1])
        mask = first.new_zeros(len(entries), n)
        for i, e in enumerate(entries):
            hidden[i, :e["hidden"].shape[0]] = e["hidden"]
            mask[i, :e["hidden"].shape[0]] = 1
        return hidden, mask

    @staticmethod
    def features(hidden: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        return [h[m > 0.5] for h, m in zip(hidden, mask)]

    def denoise(self, model, noisy, t, hidden, pooled, sizes, crops, targets):
        b, _, h, w = noisy.shape
        if h % 2 or w % 2:
            raise ModelError(f"a Z-Image latent of {h}x{w} cannot be cut into 2x2 patches; use a bucket step that "
                             "is a multiple of 16 pixels")
        x = list(noisy.unsqueeze(2).unbind(0))
        # 1 - σ in fp32, as ZImagePipeline computes it: rounding t to bf16 first (steps of 4 near 1000) moved it by
        # up to 0.002
        out = model(x, (1000 - t.float()) / 1000, self.features(hidden, pooled), return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def prompt_kwargs(self, text_encoders, tokenizers, prompts, negative, clip_skip: int = 1) -> dict:
        hidden, mask = self.encode(text_encoders, self.tokenize(tokenizers, prompts))
        n_hidden, n_mask = self.encode(text_encoders, self.tokenize(tokenizers, [negative] * len(prompts)))
        return {"prompt_embeds": self.features(hidden, mask), "negative_prompt_embeds": self.features(n_hidden, n_mask)}

    def pipeline(self, unet, vae, text_encoders, tokenizers, scheduler):
        from diffusers import ZImagePipeline

        text_encoders = text_encoders or [None]
        return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0],
                              transformer=unet)
