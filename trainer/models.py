"""Load a base model and describe its family.

Everything that differs between SD1, SD2 and SDXL lives in a `Family`: how captions become
conditioning, the added conditioning, key prefixes, default resolution and file-format names.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from .errors import ModelError
from .model_info import EMBEDDED_DIR, PICKLE_SUFFIXES, family_name, looks_like_path


@dataclass(frozen=True)
class Family:
    name: str
    default_resolution: int
    te_prefixes: tuple[str, ...]
    modelspec_architecture: str
    ss_base_model_version: str

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

        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0], unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)


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
        from .sgm_names import unet_namer

        return unet_namer(dict(unet_config))

    def added_cond(self, pooled, original_sizes, crops, target_sizes):
        time_ids = torch.tensor([list(o) + list(c) + list(t) for o, c, t in zip(original_sizes, crops, target_sizes)],
                                dtype=pooled.dtype, device=pooled.device)
        return {"text_embeds": pooled, "time_ids": time_ids}

    def pipeline(self, unet, vae, text_encoders, tokenizers, scheduler):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
                                         tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                         scheduler=scheduler)


FAMILIES = {
    "sd1": Family("sd1", 512, ("lora_te",), "stable-diffusion-v1", "sd_v1"),
    "sd2": Family("sd2", 768, ("lora_te",), "stable-diffusion-v2-768-v", "sd_v2"),
    "sdxl": SDXLFamily("sdxl", 1024, ("lora_te1", "lora_te2"), "stable-diffusion-xl-v1-base", "sdxl_base_v1-0"),
}


@dataclass
class Base:
    """A loaded base model. Text encoders and tokenizers are lists (one for SD, two for SDXL)."""
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
        return self.scheduler_config.get("prediction_type", "epsilon")

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
    if prediction_type:
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


def load_base(source: str, family: str = "auto", dtype: torch.dtype | None = None, on_unet=None) -> Base:
    """Load a diffusers folder, a single-file checkpoint or a Hub id. Raises ModelError with one line.

    `dtype` loads the weights straight into that precision: a half-precision run then never holds an
    fp32 copy of the UNet, which for SDXL would be 10 GB on the way in. `on_unet(unet)` runs as soon as the
    UNet exists; from a folder that is before the text encoders load, so a UNet it shrinks (fp8) never sits
    in half precision beside them."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # per-component bars are noise around our own progress
    source = resolve_source(source)
    path = Path(source).expanduser()
    try:
        if path.is_dir():
            if not (path / "model_index.json").exists():
                raise ModelError(f"{path} is a folder but not a diffusers model (no model_index.json); "
                                 "pass a diffusers folder, a .safetensors checkpoint or a Hub id")
            pipe = _from_folder(path, dtype, on_unet)
            file_hash = ""
        elif path.exists():
            pipe = _from_single_file(path, dtype)
            file_hash = sha256_file(path)
        elif looks_like_path(source):
            raise ModelError(f"model {source} does not exist; check the path")
        else:
            pipe = _from_hub(source, dtype)
            file_hash = ""
    except ModelError:
        raise
    except _CallerError as e:
        raise e.error from None
    except Exception as e:  # diffusers raises many kinds; the user needs one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"could not load model {source}: {first}") from e

    if on_unet is not None and not isinstance(pipe, SimpleNamespace):  # a pipeline loads all parts at once
        on_unet(pipe.unet)
    sched = dict(pipe.scheduler.config)
    if path.is_file():
        sched = checkpoint_flags(checkpoint_keys(path), sched)
    fam = detect_family(pipe.unet.config, sched) if family == "auto" else FAMILIES[family]
    tes = [t for t in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if t is not None]
    toks = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]
    if len(tes) != len(fam.te_prefixes):
        raise ModelError(f"{source} has {len(tes)} text encoder(s) but a {fam.name} model needs {len(fam.te_prefixes)}")
    name = path.stem if path.exists() else source
    return Base(fam, pipe.unet, pipe.vae, tes, toks, sched, source, name, file_hash)


class _CallerError(Exception):
    """Carries an exception raised by load_base's on_unet through its model-loading error handling."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def _pipeline_class_for(model_index: dict):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if "XL" in model_index.get("_class_name", "") or "text_encoder_2" in model_index:
        return StableDiffusionXLPipeline, {}
    return StableDiffusionPipeline, {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _from_pretrained(source: str, local_only: bool, dtype=None):
    from diffusers import DiffusionPipeline

    if Path(source).is_dir():
        index = json.loads((Path(source) / "model_index.json").read_text())
    else:
        index = DiffusionPipeline.load_config(source, local_files_only=local_only)
    cls, kwargs = _pipeline_class_for(index)
    if dtype is not None:
        kwargs["dtype"] = dtype
    return cls.from_pretrained(source, local_files_only=local_only, **kwargs)


# What training needs from a diffusers folder, and the only libraries its model_index.json may name.
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
LIBRARIES = ("diffusers", "transformers")


def _from_folder(path: Path, dtype=None, on_unet=None) -> SimpleNamespace:
    """The components of a local diffusers folder, loaded one by one. Without the pipeline machinery
    the embedded model reaches its first step ~0.6 s sooner, and no safety checker or feature
    extractor a folder may name is ever imported."""
    import importlib

    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    parts = {}
    for name in COMPONENTS:
        library, cls_name = (index.get(name) or [None, None])[:2]
        if library is None or not (path / name).is_dir():
            continue
        if library not in LIBRARIES:
            raise ModelError(f"{path}: component {name} comes from {library!r}; only diffusers and transformers "
                             "components are loaded")
        cls = getattr(importlib.import_module(library), cls_name)
        kwargs = {} if name.startswith("tokenizer") else {"dtype": dtype or torch.float32}
        parts[name] = cls.from_pretrained(str(path / name), **kwargs)
        if name == "unet" and on_unet is not None:
            try:
                on_unet(parts[name])
            except Exception as e:  # the caller's own error (a LoRA setting, say), not a loading one
                raise _CallerError(e) from e
    for required in ("unet", "vae", "text_encoder", "tokenizer"):
        if required not in parts:
            raise ModelError(f"{path} has no {required}/ folder; a diffusers Stable Diffusion model needs one")
    config_file = path / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    return SimpleNamespace(scheduler=SimpleNamespace(config=scheduler), **parts)


def _from_hub(source: str, dtype=None):
    try:
        return _from_pretrained(source, local_only=True, dtype=dtype)
    except Exception:
        pass
    try:
        return _from_pretrained(source, local_only=False, dtype=dtype)
    except Exception as e:
        raise ModelError(f"could not load Hub model {source}: not in the local cache and not downloadable "
                         f"({type(e).__name__}); download it first or pass a local folder") from e


def _from_single_file(path: Path, dtype=None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        check_pickle_is_weights_only(path)
    elif suffix != ".safetensors":
        raise ModelError(f"{path.name}: unsupported model file type {suffix!r}; use .safetensors or a diffusers folder")
    keys = checkpoint_keys(path)
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        cls, kwargs = StableDiffusionXLPipeline, {}
    else:
        cls = StableDiffusionPipeline
        kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise ModelError(f"{path.name} is not a Stable Diffusion checkpoint (no model.diffusion_model.* weights); "
                         "a LoRA file goes under Preview, not as a base model")
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    return cls.from_single_file(str(path), **kwargs)


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


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
