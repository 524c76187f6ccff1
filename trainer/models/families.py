"""Every family LoRA Studio trains, by the name configs and files use."""
from __future__ import annotations

from trainer.models.family import Family
from trainer.models.info import NATIVE_RESOLUTION as NATIVE
from trainer.models.flux import FluxFamily
from trainer.models.sd3 import SD3Family
from trainer.models.sdxl import SDXLFamily
from trainer.models.zimage import ZImageFamily

FAMILIES = {
    "sd1": Family("sd1", NATIVE["sd1"], ("lora_te",), "stable-diffusion-v1", "sd_v1"),
    "sd2": Family("sd2", NATIVE["sd2"], ("lora_te",), "stable-diffusion-v2-768-v", "sd_v2"),
    "sdxl": SDXLFamily("sdxl", NATIVE["sdxl"], ("lora_te1", "lora_te2"), "stable-diffusion-xl-v1-base", "sdxl_base_v1-0"),
    # kohya's sai_model_spec names SD3.5 Medium/Large apart; one family trains both, so the id is SD3's.
    "sd3": SD3Family("sd3", NATIVE["sd3"], ("lora_te1", "lora_te2"), "stable-diffusion-3", "sd3",
                     denoiser_prefix="lora_transformer", text_encoder_count=3, lora_layout="diffusers"),
    # kohya's ids for Flux: "flux-1-dev" / "flux-1-schnell" (architecture() tells them apart) and "flux1". CLIP-L is
    # the one encoder LoRA can train (T5-XXL never is).
    "flux": FluxFamily("flux", NATIVE["flux"], ("lora_te1",), "flux-1-dev", "flux1", denoiser_prefix="lora_transformer",
                       text_encoder_count=2, lora_layout="diffusers"),
    # No published modelspec id: the name Z-Image's own repositories use. Its Qwen3 encoder is never trained.
    "zimage": ZImageFamily("zimage", NATIVE["zimage"], (), "z-image", "zimage", denoiser_prefix="lora_transformer",
                           text_encoder_count=1, lora_layout="diffusers"),
}


