"""What can be told about a base model from its config files alone, without torch or weights:
where the embedded model lives and which family a diffusers folder is. The app uses this."""
from __future__ import annotations

import json
from pathlib import Path

from trainer.resources import EMBEDDED_MODEL

EMBEDDED_DIR = EMBEDDED_MODEL
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def family_name(unet_config: dict) -> str:
    """sd1/sd2/sdxl from a UNet's config, sd3, flux or zimage from their transformers'."""
    if "num_single_layers" in unet_config or unet_config.get("_class_name", "").startswith("FluxTransformer"):
        return "flux"
    if "cap_feat_dim" in unet_config or unet_config.get("_class_name", "").startswith("ZImageTransformer"):
        return "zimage"
    if "joint_attention_dim" in unet_config:
        return "sd3"
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet_config.get("cross_attention_dim") == 1024 or unet_config.get("use_linear_projection"):
        return "sd2"
    return "sd1"


# Families whose VAE overflows in fp16 (SDXL: black images, NaN latents; SD3, Flux and Z-Image are published in bf16).
FP32_VAE_UNDER_FP16 = ("sdxl", "sd3", "flux", "zimage")


def text_encoder_trained_by_default(family: str | None) -> bool:
    """lora.train_text_encoder = auto: yes for SD1/SD2; SDXL's, SD3's and Flux's encoders rarely need it and cost
    memory, and Z-Image's is never trained."""
    return family not in ("sdxl", "sd3", "flux", "zimage")


def is_embedded(source: str) -> bool:
    if source in ("", "tiny"):
        return True
    try:
        return Path(source).expanduser().resolve() == EMBEDDED_DIR.resolve()
    except OSError:
        return False


def peek_family(source: str, family: str = "auto") -> str | None:
    """The family name presets use: 'tiny' for the embedded model, sd1/sd2/sdxl/sd3/flux/zimage for a diffusers
    folder, None when it cannot be told without loading (single files, Hub ids)."""
    if family != "auto":
        return family
    if is_embedded(source):
        return "tiny"
    unet = denoiser_config(Path(source).expanduser())
    return family_name(unet) if unet is not None else None


def denoiser_config(folder: Path) -> dict | None:
    """A diffusers folder's UNet config, or its transformer's (SD3, Flux, Z-Image)."""
    for name in ("unet", "transformer"):
        try:
            return json.loads((folder / name / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return None


def looks_like_path(source: str) -> bool:
    """A Hub id is "owner/name"; anything else with separators or a file suffix is meant as a path."""
    return (source.startswith((".", "/", "~")) or source.count("/") != 1 or "\\" in source
            or source.endswith((".safetensors",) + PICKLE_SUFFIXES))


FAMILY_RESOLUTION = {"tiny": 64, "sd1": 512, "sd2": 768, "sdxl": 1024, "sd3": 1024, "flux": 1024, "zimage": 1024}


def peek_resolution(source: str, family: str = "auto") -> int | None:
    """The size a model trains at, from its config files: latent size times the VAE's downscale (the
    trainer's own rule); the family default for a single file; None when nothing can be told."""
    folder = EMBEDDED_DIR if is_embedded(source) else Path(source).expanduser()
    try:
        unet = denoiser_config(folder)
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return FAMILY_RESOLUTION.get(peek_family(source, family) or "")
