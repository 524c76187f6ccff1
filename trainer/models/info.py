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
            config = json.loads((folder / name / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return config if isinstance(config, dict) else None
    return None


def stored_dtype(source: str) -> str | None:
    """The dtype most of a base's denoiser weights are stored in ("F16", "BF16", "F32"), from the safetensors
    headers of a diffusers folder's unet/ or transformer/, or of a single file; None for a Hub id or no header."""
    from trainer.safetensors_header import HeaderError, read

    path = Path(source or EMBEDDED_DIR).expanduser() if source not in ("", "tiny") else EMBEDDED_DIR
    if path.is_dir():
        files = [f for name in ("unet", "transformer") for f in sorted((path / name).glob("*.safetensors"))][:1]
    else:
        files = [path] if path.suffix.lower() == ".safetensors" and path.is_file() else []
    counts: dict[str, int] = {}
    for f in files:
        try:
            header, _ = read(f)
        except HeaderError:
            return None
        for k, v in header.items():
            if k != "__metadata__" and isinstance(v, dict):
                n = 1
                for d in v.get("shape", []):
                    n *= d
                counts[v.get("dtype", "")] = counts.get(v.get("dtype", ""), 0) + n
    return max(counts, key=counts.get) if counts else None


def looks_like_path(source: str) -> bool:
    """A Hub id is "owner/name"; anything else with separators or a file suffix is meant as a path."""
    return (source.startswith((".", "/", "~")) or source.count("/") != 1 or "\\" in source
            or source.endswith((".safetensors",) + PICKLE_SUFFIXES))


# The size each family trains and samples at when its config does not say (Flux.1's and Z-Image's published transformer
# configs carry no sample_size; a UNet's and SD3's do). Every reader of a native size asks native_resolution below.
NATIVE_RESOLUTION = {"tiny": 64, "sd1": 512, "sd2": 768, "sdxl": 1024, "sd3": 1024, "flux": 1024, "zimage": 1024}
# What 'auto' trains a family of native size >= 1024 at on a machine without a GPU: a step at 1024 px takes four
# times as long, and a tiny Flux folder at 1024 px took 96 minutes here (issue 37). data.resolution overrides it.
CPU_RESOLUTION = 512


def native_resolution(family: str | None, denoiser_config: dict | None, vae_config: dict | None) -> int | None:
    """The size a model was made for: its latent size times the VAE's downscale when the denoiser's config names a
    sample_size (a UNet's, SD3's transformer's: SD1.5 512, SD2-768 768, SDXL 1024, the embedded model 64), else the
    family's native size; None when neither is known."""
    latent = (denoiser_config or {}).get("sample_size")
    blocks = (vae_config or {}).get("block_out_channels")
    if isinstance(latent, int) and not isinstance(latent, bool) and isinstance(blocks, (list, tuple)) and blocks:
        return latent * 2 ** (len(blocks) - 1)
    return NATIVE_RESOLUTION.get(family or "")


def auto_resolution(native: int | None, on_cpu: bool) -> int | None:
    """data.resolution = auto: the native size, or CPU_RESOLUTION for a big family on a machine without a GPU."""
    if native is not None and on_cpu and native > CPU_RESOLUTION:
        return CPU_RESOLUTION
    return native


def peek_resolution(source: str, family: str = "auto", on_cpu: bool = False) -> int | None:
    """The size a model trains at, from its config files (the trainer's own rule: native_resolution, then
    auto_resolution); the family default for a single file; None when nothing can be told."""
    folder = EMBEDDED_DIR if is_embedded(source) else Path(source).expanduser()
    configs = []
    for read in (lambda: denoiser_config(folder), lambda: _json(folder / "vae" / "config.json")):
        try:
            configs.append(read())
        except (OSError, ValueError):
            configs.append(None)
    try:
        fam = peek_family(source, family)
    except (OSError, ValueError):
        fam = None
    return auto_resolution(native_resolution(fam, *configs), on_cpu)


def _json(path: Path) -> dict | None:
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


# Samples' and Preview's defaults per model, from each model's own card: (steps, guidance). Guidance is classifier-free
# guidance for SD 1/2/XL, SD3 and Z-Image Base, and Flux.1 dev's distilled guidance embedding (FluxPipeline runs no
# CFG for it). 0 turns CFG off where the pipeline would run it: ZImagePipeline applies pos + g·(pos - neg) for any
# g above 0, so Turbo's "1.0" rendered at about CFG 2 with twice the transformer calls (issue 37).
SAMPLING = {"tiny": (20, 4.0), "sd1": (20, 7.0), "sd2": (20, 7.0), "sdxl": (20, 7.0), "sd3": (28, 5.0),
            "flux": (20, 3.5), "flux-schnell": (4, 0.0), "zimage": (9, 0.0), "zimage-base": (28, 4.0)}
VARIANT_WORDS = {"flux-schnell": "Flux.1 schnell (distilled: no guidance)",
                 "zimage": "Z-Image Turbo (distilled: 8 steps, no CFG)", "zimage-base": "Z-Image Base (CFG)"}
ZIMAGE_BASE_REPOS = ("tongyi-mai/z-image",)  # Z-Image's undistilled base, as its Hub repository is named


def variant(family: str | None, source: str, config: dict | None = None) -> str:
    """The SAMPLING key of a model: its family, or a distilled/base variant that samples apart. Flux.1 schnell has no
    guidance embedding; a Z-Image model samples as Turbo (the one most people have) unless it is known to be Base:
    the base repository's id, or a name that says base."""
    name = str(source).replace("\\", "/").rstrip("/").lower()
    if family == "flux":
        embeds = (config or {}).get("guidance_embeds")
        return "flux-schnell" if embeds is False or (embeds is None and "schnell" in name) else "flux"
    if family == "zimage":
        stem = name.rsplit("/", 1)[-1]
        known_base = name in ZIMAGE_BASE_REPOS or ("base" in stem and "turbo" not in stem)
        return "zimage-base" if known_base else "zimage"
    return family or "sd1"


def sampling_defaults(family: str | None, source: str, config: dict | None = None) -> tuple[int, float]:
    if is_embedded(source):
        return SAMPLING["tiny"]
    return SAMPLING.get(variant(family, source, config), SAMPLING["sd1"])


def peek_sampling(source: str, family: str = "auto") -> tuple[int, float]:
    """(steps, guidance) a model samples at, from its files where it is a folder (torch-free, for the app)."""
    fam = peek_family(source, family)
    folder = EMBEDDED_DIR if is_embedded(source) else Path(source).expanduser()
    return sampling_defaults(fam, source, denoiser_config(folder))
