"""What a model family is: everything that differs between families lives in one `Family`, and the training loop
never asks which family it runs. This base class is SD 1.x and 2.x (one CLIP text encoder, a UNet trained by DDPM
with an epsilon or v-prediction target); each other family is one module that overrides what it does differently:
text encoding and what is cached, added conditioning, the noise schedule, the denoiser call, the sampler for samples
and Preview, LoRA key prefixes, the export layout and metadata ids, the default resolution."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.errors import ModelError

# The layers LoRA trains in a UNet: every attention's projections; the extras a config can add by name.
UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_EXTRA = {
    "proj": ["proj_in", "proj_out"],
    "ff": ["ff.net.0.proj", "ff.net.2"],
    # LoCon: the ResNet and resampler convolutions, as kohya's LoCon targets them.
    "conv": ["conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"],
}


@dataclass(frozen=True)
class Family:
    name: str
    default_resolution: int
    te_prefixes: tuple[str, ...]  # one per text encoder LoRA can train, in the base's order
    modelspec_architecture: str
    ss_base_model_version: str
    denoiser_prefix: str = "lora_unet"  # the denoiser's key prefix in kohya-style names
    text_encoder_count: int = 0  # text encoders the base holds; 0 = as many as te_prefixes
    lora_layout: str = "kohya"  # how LoRA files of this family are written: kohya keys or diffusers/peft keys

    @property
    def encoders(self) -> int:
        return self.text_encoder_count or len(self.te_prefixes)

    def models(self, denoiser, text_encoders) -> dict:
        """Key prefix -> model, for the denoiser (None: left out) and the text encoders LoRA can train."""
        out = {self.denoiser_prefix: denoiser} if denoiser is not None else {}
        out.update(zip(self.te_prefixes, text_encoders))
        return out

    def lora_targets(self, denoiser_config=None) -> tuple[list[str], dict[str, list[str]]]:
        """The denoiser's layers LoRA trains (names or dotted suffixes of module paths, as peft matches them) and the
        extras lora.unet_extra may add, by name."""
        return UNET_ATTENTION, UNET_EXTRA

    KOHYA_NETWORK = "networks.lora"  # ss_network_module: the sd-scripts network that trains this family's LoRAs
    BFL_KOHYA = False  # a kohya layout of its own (Flux.1: BFL's fused names), besides diffusers'

    def layout_for(self, requested: str) -> tuple[str, str | None]:
        """(the layout a LoRA file is written in for save.layout = `requested`, a note when it is not the one asked):
        kohya, peft (diffusers' keys with peft's metadata, for SD 1/2/XL) or diffusers (scale folded into lora_B)."""
        if self.lora_layout == "kohya":
            return ("peft", None) if requested in ("peft", "diffusers") else ("kohya", None)
        if requested == "kohya" and not self.BFL_KOHYA:
            return "diffusers", (f"save.layout = kohya: {self.name} LoRAs have no kohya layout that ComfyUI, Forge or "
                                 "diffusers read; written in diffusers' layout, which they all read")
        return ("kohya" if requested == "kohya" else "diffusers"), None

    def check(self, cfg) -> None:
        """Refuse settings this family cannot honour, before anything trains (ModelError, one line)."""
        if cfg.lora.use_dora and self.lora_layout == "diffusers":
            raise ModelError(f"lora.use_dora is not available for {self.name}: its LoRA loaders read no DoRA keys; "
                             "set it to false")

    def adapt(self, denoiser_config, tokenizers) -> None:
        """Set a variant's own text window or the like on the loaded parts (Flux.1 schnell's T5 length); most
        families need nothing."""

    def default_prediction(self, scheduler_config: dict) -> str:
        return scheduler_config.get("prediction_type", "epsilon")

    def architecture(self, denoiser_config) -> str:
        """The modelspec architecture id of this base (SD3 tells Medium and Large apart by its config)."""
        return self.modelspec_architecture

    def schedule(self, scheduler_config: dict, prediction_type: str, zero_terminal_snr: bool, min_snr_gamma: float):
        from trainer.models.schedules import Diffusion

        if prediction_type not in ("epsilon", "v_prediction"):
            raise ModelError(f"model.prediction_type {prediction_type!r} does not fit a {self.name} model; "
                             "use epsilon or v_prediction (or leave it unset to read the model's own)")
        return Diffusion(scheduler_config, prediction_type, zero_terminal_snr, min_snr_gamma)

    def denoise(self, model, noisy, t, hidden, pooled, sizes, crops, targets):
        """The denoiser's prediction. `sizes`, `crops` and `targets` are the (h, w) original sizes, crop corners
        and bucket sizes of the batch, which only SDXL conditions on."""
        return model(noisy, t, hidden, added_cond_kwargs=self.added_cond(pooled, sizes, crops, targets)
                     if pooled is not None else None).sample

    def attention_processor(self):
        """The processor every attention layer of the denoiser is set to: torch's SDPA (diffusers' default for
        SD3's joint attention already)."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        return AttnProcessor2_0()

    def sampler(self, scheduler_config: dict):
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(scheduler_config)

    def tokenize(self, tokenizers, captions: list[str]) -> list[torch.Tensor]:
        return [tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids for tok in tokenizers]

    def encode(self, text_encoders, input_ids: list[torch.Tensor], clip_skip: int = 1):
        """Return (hidden states for cross-attention, pooled embedding or None)."""
        te = text_encoders[0]
        out = te(input_ids[0].to(te.device), output_hidden_states=clip_skip > 1)
        if clip_skip == 1:
            return out.last_hidden_state, None
        final_norm = getattr(te, "text_model", te).final_layer_norm
        return final_norm(out.hidden_states[-clip_skip]), None

    TEXT_ENTRY_VERSION = 1  # bump when what text_entry stores changes: the caption cache keys on it

    def text_entry(self, hidden: torch.Tensor, pooled: torch.Tensor | None) -> dict:
        """What the caption cache keeps of one caption's encoding (encode's outputs, batch dimension gone)."""
        return {"hidden": hidden} if pooled is None else {"hidden": hidden, "pooled": pooled}

    def collate_text(self, entries: list[dict]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch's (hidden, pooled or None) from cached entries, as encode would give it."""
        hidden = torch.stack([e["hidden"] for e in entries])
        return hidden, torch.stack([e["pooled"] for e in entries]) if "pooled" in entries[0] else None

    def added_cond(self, pooled, original_sizes, crops, target_sizes):
        return None

    def unet_namer(self, unet_config):
        """Maps diffusers UNet module paths to the names written in LoRA files."""
        return lambda path: path

    def prompt_kwargs(self, text_encoders, tokenizers, prompts: list[str], negative: str, clip_skip: int = 1) -> dict:
        """Pipeline arguments for `prompts`, encoded exactly as in training (clip skip included)."""
        hidden, pooled = self.encode(text_encoders, self.tokenize(tokenizers, prompts), clip_skip)
        n_hidden, n_pooled = self.encode(text_encoders, self.tokenize(tokenizers, [negative] * len(prompts)), clip_skip)
        kwargs = {"prompt_embeds": hidden, "negative_prompt_embeds": n_hidden}
        if pooled is not None:
            kwargs.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=n_pooled)
        return kwargs

    def pipeline(self, unet, vae, text_encoders, tokenizers, scheduler):
        from diffusers import StableDiffusionPipeline

        text_encoders = text_encoders or [None]  # None: the caller passes prompt embeddings
        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0], unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)


