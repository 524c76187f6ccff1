"""Load a base model (a diffusers folder, a single-file checkpoint or a Hub id) as a `Base`: its family
(trainer/models/families.py), denoiser, VAE, text encoders, tokenizers and scheduler config."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from trainer.errors import ModelError
from trainer.file_hashes import cached_file_sha256, model_folder_sha256
from trainer.models.families import FAMILIES, Family
from trainer.models.sd3 import NoT5
from trainer.models.info import EMBEDDED_DIR, PICKLE_SUFFIXES, family_name, looks_like_path


@dataclass
class Base:
    """A loaded base model. `unet` is its denoiser: a UNet, or SD3's, Flux's or Z-Image's transformer. Text encoders
    and tokenizers are lists (one for SD and Z-Image, two for SDXL and Flux, three for SD3, whose T5 may be a NoT5 and
    its tokenizer None)."""
    family: Family
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    scheduler_config: dict
    source: str
    name: str
    file_hash: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return self.family.default_prediction(self.scheduler_config)

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.scheduler_config.get("rescale_betas_zero_snr", False))


GUIDANCE_RESCALE_ZTSNR = 0.7  # "Common Diffusion Noise Schedules and Sample Steps are Flawed", section 3.4


def sampling_schedule(scheduler_config: dict, prediction_type: str | None = None,
                      zero_terminal_snr: bool | None = None) -> tuple[dict, float]:
    """(scheduler config, guidance_rescale) that samples as the model trains. With zero terminal SNR the
    schedule must start at the last timestep (trailing spacing) and guidance is rescaled; otherwise samples
    come out washed out."""
    config = dict(scheduler_config)
    if prediction_type and prediction_type != "flow_matching":  # a training target, not a flow scheduler setting
        config["prediction_type"] = prediction_type
    ztsnr = config.get("rescale_betas_zero_snr", False) if zero_terminal_snr is None else zero_terminal_snr
    if not ztsnr:
        return config, 0.0
    return {**config, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, GUIDANCE_RESCALE_ZTSNR


def checkpoint_flags(keys: list[str], scheduler_config: dict) -> dict:
    """A single-file checkpoint's own word on its schedule: empty `v_pred` and `ztsnr` tensors, as NoobAI-XL
    V-Pred and the checkpoints merged from it carry them (diffusers' from_single_file ignores both)."""
    config = dict(scheduler_config)
    if "v_pred" in keys:
        config["prediction_type"] = "v_prediction"
    if "ztsnr" in keys:
        config["rescale_betas_zero_snr"] = True
    return config


def detect_family(unet_config, scheduler_config: dict) -> Family:
    return FAMILIES[family_name(dict(unet_config))]


def resolve_source(source: str) -> str:
    if source in ("", "tiny"):
        if not (EMBEDDED_DIR / "model_index.json").exists():
            raise ModelError(f"the embedded tiny model is not in {EMBEDDED_DIR}; reinstall lora-studio "
                             "or pass --model with a diffusers folder, a .safetensors file or a Hub id")
        return str(EMBEDDED_DIR)
    return source


class _NotForUs(logging.Filter):
    """transformers 5 says at import, for every image processor diffusers' pipelines import for their safety
    checkers, that it would rather have torchvision. No LoRA Studio pipeline uses an image processor; the lines
    only buried what users need to read (issue 30: Preview's log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def quiet_transformers() -> None:
    import transformers.utils.logging  # noqa: F401  (configures the library's handler)

    for handler in logging.getLogger("transformers").handlers:
        if not any(isinstance(f, _NotForUs) for f in handler.filters):
            handler.addFilter(_NotForUs())


def load_base(source: str, family: str = "auto", dtype: torch.dtype | None = None, on_unet=None,
              t5: bool = True) -> Base:
    """Load a diffusers folder, a single-file checkpoint or a Hub id. Raises ModelError with one line.

    `dtype` loads the weights straight into that precision: a half-precision run then never holds an
    fp32 copy of the UNet, which for SDXL would be 10 GB on the way in. `on_unet(unet)` runs as soon as the
    UNet exists; from a folder that is before the text encoders load, so a UNet it shrinks (fp8) never sits
    in half precision beside them. `t5=False` leaves SD3's T5-XXL encoder unloaded (a NoT5 stands in)."""
    from diffusers.utils import logging as diffusers_logging

    quiet_transformers()
    diffusers_logging.disable_progress_bar()  # per-component bars are noise around our own progress
    source = resolve_source(source)
    path = Path(source).expanduser()
    try:
        if path.is_dir():
            if not (path / "model_index.json").exists():
                raise ModelError(f"{path} is a folder but not a diffusers model (no model_index.json); "
                                 "pass a diffusers folder, a .safetensors checkpoint or a Hub id")
            pipe = _from_folder(path, dtype, on_unet, t5)
            file_hash = model_folder_sha256(path)
        elif path.exists():
            pipe = _from_single_file(path, dtype, t5)
            file_hash = cached_file_sha256(path)
        elif looks_like_path(source):
            raise ModelError(f"model {source} does not exist; check the path")
        else:
            pipe = _from_hub(source, dtype, t5)
            file_hash = ""
    except ModelError:
        raise
    except _CallerError as e:
        raise e.error from None
    except Exception as e:  # diffusers raises many kinds; the user needs one line
        raise ModelError(f"could not load model {source}: {_first_line(e)}") from e

    denoiser = pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet
    if on_unet is not None and not isinstance(pipe, SimpleNamespace):  # a pipeline loads all parts at once
        on_unet(denoiser)
    sched = dict(pipe.scheduler.config)
    if path.is_file():
        sched = checkpoint_flags(checkpoint_keys(path), sched)
    fam = detect_family(denoiser.config, sched) if family == "auto" else FAMILIES[family]
    slots = ("", "_2", "_3")[:fam.encoders]
    tes = [getattr(pipe, f"text_encoder{s}", None) for s in slots]
    toks = [getattr(pipe, f"tokenizer{s}", None) for s in slots]
    if fam.encoders == 3 and tes[2] is None and None not in tes[:2]:
        tes[2] = NoT5(denoiser.config.joint_attention_dim).to(tes[0].dtype)  # left out (t5=False) or absent
    if None in tes or None in toks[:len(fam.te_prefixes)]:
        found = sum(t is not None for t in tes)
        raise ModelError(f"{source} has {found} text encoder(s) but a {fam.name} model needs {fam.encoders}")
    name = path.stem if path.exists() else source
    fam.adapt(denoiser.config, toks)
    return Base(fam, denoiser, pipe.vae, tes, toks, sched, source, name, file_hash)


class _CallerError(Exception):
    """Carries an exception raised by load_base's on_unet through its model-loading error handling."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def _pipeline_class_for(model_index: dict, t5: bool = True):
    from diffusers import (FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           ZImagePipeline)

    name = model_index.get("_class_name", "")
    if name.startswith("Flux"):
        return FluxPipeline, {}
    if name.startswith("ZImage"):
        return ZImagePipeline, {}
    if "transformer" in model_index or "3" in name:
        return StableDiffusion3Pipeline, ({} if t5 else {"text_encoder_3": None, "tokenizer_3": None})
    if "XL" in model_index.get("_class_name", "") or "text_encoder_2" in model_index:
        return StableDiffusionXLPipeline, {}
    return StableDiffusionPipeline, {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _from_pretrained(source: str, local_only: bool, dtype=None, t5: bool = True):
    from diffusers import DiffusionPipeline

    if Path(source).is_dir():
        index = json.loads((Path(source) / "model_index.json").read_text())
    else:
        index = DiffusionPipeline.load_config(source, local_files_only=local_only)
    cls, kwargs = _pipeline_class_for(index, t5)
    if dtype is not None:
        kwargs["dtype"] = dtype
    return cls.from_pretrained(source, local_files_only=local_only, **kwargs)


# What training needs from a diffusers folder, and the only libraries its model_index.json may name.
COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
              "tokenizer_2", "tokenizer_3")
LIBRARIES = ("diffusers", "transformers")


def _from_folder(path: Path, dtype=None, on_unet=None, t5: bool = True) -> SimpleNamespace:
    """The components of a local diffusers folder, loaded one by one. Without the pipeline machinery
    the embedded model reaches its first step ~0.6 s sooner, and no safety checker or feature
    extractor a folder may name is ever imported."""
    import importlib

    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    parts = {}
    for name in COMPONENTS:
        library, cls_name = (index.get(name) or [None, None])[:2]
        if library is None or not (path / name).is_dir() or (not t5 and name.endswith("_3")):
            continue
        if library not in LIBRARIES:
            raise ModelError(f"{path}: component {name} comes from {library!r}; only diffusers and transformers "
                             "components are loaded")
        cls = getattr(importlib.import_module(library), cls_name)
        kwargs = {} if name.startswith("tokenizer") else {"dtype": dtype or torch.float32}
        parts[name] = cls.from_pretrained(str(path / name), **kwargs)
        if name in ("unet", "transformer") and on_unet is not None:
            try:
                on_unet(parts[name])
            except Exception as e:  # the caller's own error (a LoRA setting, say), not a loading one
                raise _CallerError(e) from e
    if "transformer" in parts:
        parts.pop("unet", None)
    # the denoiser its model_index names: a Flux.1, SD3 or Z-Image folder has a transformer, an SD one a UNet
    denoiser = "transformer" if "transformer" in parts or ("transformer" in index and "unet" not in parts) else "unet"
    what = index.get("_class_name") or "diffusers Stable Diffusion"
    for required in (denoiser, "vae", "text_encoder", "tokenizer"):
        if required not in parts:
            raise ModelError(f"{path} has no {required}/ folder; a {what} model needs one (download the whole model "
                             "folder, or pass the model's single .safetensors file)")
    config_file = path / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    return SimpleNamespace(scheduler=SimpleNamespace(config=scheduler), **parts)


def _from_hub(source: str, dtype=None, t5: bool = True):
    """The Hugging Face cache first; only a model that is not there (huggingface_hub and diffusers say so with an
    OSError: LocalEntryNotFoundError is one) is downloaded. A cached model that fails to load for another reason
    says that reason instead of being downloaded again."""
    try:
        return _from_pretrained(source, local_only=True, dtype=dtype, t5=t5)
    except OSError as e:
        not_cached = _first_line(e)
    try:
        return _from_pretrained(source, local_only=False, dtype=dtype, t5=t5)
    except Exception as e:
        raise ModelError(f"could not load Hub model {source}: not in the local cache ({not_cached}) and the download "
                         f"failed ({type(e).__name__}: {_first_line(e)}); download it first or pass a local folder") from e


def _from_single_file(path: Path, dtype=None, t5: bool = True):
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        check_pickle_is_weights_only(path)
    elif suffix != ".safetensors":
        raise ModelError(f"{path.name}: unsupported model file type {suffix!r}; use .safetensors or a diffusers folder")
    keys = checkpoint_keys(path)
    modern = _modern_single_file(path, keys, dtype)
    if modern is not None:
        return modern
    if any(k.startswith("model.diffusion_model.joint_blocks.") for k in keys):
        cls, kwargs = StableDiffusion3Pipeline, ({} if t5 else {"text_encoder_3": None, "tokenizer_3": None})
    elif any(k.startswith("conditioner.embedders.1") for k in keys):
        cls, kwargs = StableDiffusionXLPipeline, {}
    else:
        cls = StableDiffusionPipeline
        kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise ModelError(f"{path.name} is not a Stable Diffusion checkpoint, nor a Flux.1 or Z-Image one (no model "
                         "weights this app knows); a LoRA file goes under Preview, not as a base model")
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        return cls.from_single_file(str(path), **kwargs)
    except Exception as e:
        if cls is not StableDiffusion3Pipeline:
            raise
        raise ModelError(f"could not load SD3 checkpoint {path.name}: {_first_line(e).rstrip('.')}. An SD3 single "
                         "file takes its configs, and any text encoder it lacks, from Stability AI's gated Hub repo: "
                         "accept the licence on huggingface.co, run `hf auth login` once, or pass a diffusers folder "
                         "instead") from e


# The Hub repositories a transformer-only single file takes its other parts (and configs) from.
FLUX_REPOS = {"dev": "black-forest-labs/FLUX.1-dev", "schnell": "black-forest-labs/FLUX.1-schnell"}
ZIMAGE_REPO = "Tongyi-MAI/Z-Image-Turbo"


def _modern_single_file(path: Path, keys: list[str], dtype=None):
    """A Flux.1 or Z-Image transformer as people download it (BFL's or ComfyUI's single file, fp8 variants
    included: diffusers converts the keys and casts to `dtype`), with the text encoders and VAE from the family's
    Hub repository. None when the file is neither."""
    stripped = {k.removeprefix("model.diffusion_model.") for k in keys}
    if any(k.startswith("double_blocks.") for k in stripped):
        from diffusers import FluxPipeline, FluxTransformer2DModel

        repo = FLUX_REPOS["dev" if any(k.startswith("guidance_in.") for k in stripped) else "schnell"]
        pipe_cls, model_cls, what = FluxPipeline, FluxTransformer2DModel, "Flux.1"
    elif any(k.startswith(("noise_refiner.", "context_refiner.")) for k in stripped):
        from diffusers import ZImagePipeline, ZImageTransformer2DModel

        repo, pipe_cls, model_cls, what = ZIMAGE_REPO, ZImagePipeline, ZImageTransformer2DModel, "Z-Image"
    else:
        return None
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        transformer = model_cls.from_single_file(str(path), config=repo, subfolder="transformer", **kwargs)
        return pipe_cls.from_pretrained(repo, transformer=transformer, **kwargs)
    except Exception as e:
        raise ModelError(f"could not load {what} checkpoint {path.name}: {_first_line(e).rstrip('.')}. A {what} "
                         f"single file holds the transformer only; its text encoders and VAE come from {repo} on the "
                         "Hub (accept its licence on huggingface.co and run `hf auth login` once where it is gated), "
                         "or pass a diffusers folder instead") from e


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def checkpoint_keys(path: Path) -> list[str]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return list(f.keys())
        except Exception as e:
            raise ModelError(f"{path.name} is not a readable .safetensors file ({e}); re-download it") from None
    return list(check_pickle_is_weights_only(path).keys())


def check_pickle_is_weights_only(path: Path) -> dict:
    """Pickle can run code on load: accept only files that torch's weights-only unpickler reads."""
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"{path.name} is a pickle file that does not load with weights_only=True, so it was "
                         "refused (it could run code); convert it to .safetensors with a tool you trust") from e
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ModelError(f"{path.name} does not hold a state dict")
    return sd

