"""LoRA files: peft layers -> kohya/A1111 keys, metadata (ss_* and modelspec.*), atomic save.

Names and alphas are written from the live model and its peft scaling, never by string-rewriting a
peft state dict: diffusers' converter writes alpha = rank whatever alpha was trained, and
transformers 5's CLIPTextModel lost the `text_model.` level that every loader expects.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import io
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from trainer.atomic import write_bytes
from trainer.lora.inject import ADAPTER

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def kohya_name(prefix: str, module_path: str, unet_namer=None) -> str:
    if prefix.startswith("lora_te") and not module_path.startswith("text_model."):
        module_path = "text_model." + module_path
    if prefix == "lora_unet" and unet_namer is not None:
        module_path = unet_namer(module_path)
    return f"{prefix}_{module_path.replace('.', '_')}"


def lora_layers(model: torch.nn.Module):
    """(module path, peft LoRA layer) for every layer carrying our adapter."""
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and ADAPTER in mod.lora_A:
            # DDP/compile wrappers add a prefix that is not part of the model's own names.
            for wrapper in ("module.", "_orig_mod."):
                if name.startswith(wrapper):
                    name = name[len(wrapper):]
            yield name, mod


def kohya_state_dict(models: dict[str, torch.nn.Module], dtype: torch.dtype = torch.float16,
                     unet_namer=None) -> dict[str, torch.Tensor]:
    """`models` maps key prefix ('lora_unet', 'lora_te', 'lora_te1', 'lora_te2') to a peft-injected model;
    `unet_namer` is the family's UNet naming (SGM names for SDXL)."""
    out: dict[str, torch.Tensor] = {}
    for prefix, model in models.items():
        for path, mod in lora_layers(model):
            key = kohya_name(prefix, path, unet_namer)
            down = mod.lora_A[ADAPTER].weight
            up = mod.lora_B[ADAPTER].weight
            rank = down.shape[0]
            # kohya scales by alpha / rank; peft's scaling already includes rsLoRA's sqrt.
            alpha = float(mod.scaling[ADAPTER]) * rank
            out[f"{key}.lora_down.weight"] = down.detach().to("cpu", dtype).contiguous()
            out[f"{key}.lora_up.weight"] = up.detach().to("cpu", dtype).contiguous()
            out[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype)
            magnitude = getattr(mod, "lora_magnitude_vector", None)
            if magnitude is not None and ADAPTER in magnitude:
                scale = comfyui_dora_scale(mod).reshape(up.shape[0], *[1] * (down.ndim - 1))  # (out, 1[, 1, 1])
                out[f"{key}.dora_scale"] = scale.to("cpu", dtype).contiguous()
    return out


DORA_NORM_KEY = "lora_studio.dora_norm"  # metadata: "base" = dora_scale is written for ComfyUI's formula (below)


def comfyui_dora_scale(mod) -> torch.Tensor:
    """The dora_scale that makes ComfyUI apply exactly the weight peft trained. peft's DoRA weight is
    m * (W + dW) / ||W + dW|| (a norm per output row). ComfyUI (comfy/weight_adapter/base.py weight_decompose) reads a
    dora_scale shaped (out, 1, ...) as per-output and divides by the norm of the base weight W instead (its PR #15458
    would change that), so the file carries m * ||W|| / ||W + dW||: ComfyUI's product is then peft's weight."""
    w = mod.get_base_layer().weight.detach().float()
    merged = w + mod.get_delta_weight(ADAPTER).detach().float().reshape(w.shape)
    m = mod.lora_magnitude_vector[ADAPTER].weight.detach().float().reshape(-1)
    rows = w.shape[0]
    return m * w.reshape(rows, -1).norm(dim=1) / merged.reshape(rows, -1).norm(dim=1)


PEFT_COMPONENTS = {"lora_unet": "unet", "lora_transformer": "transformer", "lora_te": "text_encoder",
                   "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}


def diffusers_state_dict(models: dict[str, torch.nn.Module], dtype: torch.dtype = torch.float16) -> dict:
    """diffusers' own key layout (`transformer.<path>.lora_A.weight`, `text_encoder.text_model.<path>...`) with each
    layer's scale folded into lora_B and no alpha keys: diffusers' SD3 loader accepts only keys that contain
    "lora", and it and ComfyUI then apply W + B·A at scale 1, which is exactly W + up·down·alpha/rank."""
    out: dict[str, torch.Tensor] = {}
    for prefix, model in models.items():
        component = PEFT_COMPONENTS[prefix]
        for path, mod in lora_layers(model):
            if getattr(mod, "lora_magnitude_vector", None) and ADAPTER in mod.lora_magnitude_vector:
                raise ValueError("DoRA has no key layout SD3 loaders read; set lora.use_dora=false")
            if prefix.startswith("lora_te") and not path.startswith("text_model."):
                path = "text_model." + path  # ComfyUI's names; diffusers drops the level where a model lacks it
            up = mod.lora_B[ADAPTER].weight.detach().float() * float(mod.scaling[ADAPTER])
            out[f"{component}.{path}.lora_A.weight"] = mod.lora_A[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
            out[f"{component}.{path}.lora_B.weight"] = up.to("cpu", dtype).contiguous()
    return out


def peft_state_dict(models: dict[str, torch.nn.Module], dtype: torch.dtype = torch.float16) -> tuple[dict, dict]:
    """The diffusers/peft layout (`unet.<path>.lora_A.weight`, ...) and its `lora_adapter_metadata`,
    which is how diffusers learns each component's alpha, rsLoRA and DoRA settings."""
    from peft.utils import get_peft_model_state_dict

    tensors, config = {}, {}
    for prefix, model in models.items():
        component = PEFT_COMPONENTS[prefix]
        for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER).items():
            for wrapper in ("module.", "_orig_mod."):
                k = k[len(wrapper):] if k.startswith(wrapper) else k
            tensors[f"{component}.{k}"] = v.detach().to("cpu", dtype).contiguous()
        peft_cfg = model.peft_config[ADAPTER].to_dict()
        for k, v in peft_cfg.items():
            config[f"{component}.{k}"] = sorted(v) if isinstance(v, set) else v
    return tensors, {"lora_adapter_metadata": json.dumps(config, sort_keys=True, default=str), "format": "pt"}


def tensor_hashes(tensors: dict[str, torch.Tensor]) -> tuple[str, str]:
    """kohya's `sshs_model_hash` (sha256 of the tensor bytes, header excluded) and A1111's legacy hash."""
    blob = st_save(tensors)
    header_len = int.from_bytes(blob[:8], "little")
    data = blob[8 + header_len:]
    legacy = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return hashlib.sha256(data).hexdigest(), legacy


def now_epoch() -> int:
    # SOURCE_DATE_EPOCH makes two identical runs write byte-identical files (reproducible builds).
    sde = os.environ.get("SOURCE_DATE_EPOCH")
    return int(sde) if sde else int(time.time())


def iso_date(epoch: int) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def png_data_url(path: str | Path, max_side: int = 256) -> str:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


MODELSPEC_PREDICTION = {"epsilon": "epsilon", "v_prediction": "v"}  # the spec's words; flow matching has none (kohya
# writes none for Flux either)


def dataset_metadata(entries, cfg, resolution: int) -> dict[str, str]:
    """kohya's dataset keys, counted as kohya counts them: per image folder (a kohya `N_name` folder is its own),
    each image once whatever its repeats. `entries`: the training set's (path, caption, repeats, is_reg)."""
    from collections import Counter, defaultdict

    from trainer.data.captions import split_tags

    folders: dict[str, dict] = defaultdict(lambda: {"tags": Counter(), "images": 0, "repeats": 1, "is_reg": False})
    for e in entries:
        f = folders[Path(e.path).parent.name]
        f["images"] += 1
        f["repeats"], f["is_reg"] = e.repeats, e.is_reg
        f["tags"].update(set(split_tags(e.caption)))
    train = {k: v for k, v in folders.items() if not v["is_reg"]}
    subsets = [{"img_count": v["images"], "num_repeats": v["repeats"], "image_dir": k, "is_reg": v["is_reg"],
                "shuffle_caption": cfg.data.shuffle_tags, "keep_tokens": cfg.data.keep_tokens,
                "flip_aug": cfg.data.flip, "random_crop": cfg.data.random_crop, "color_aug": False,
                "class_tokens": None} for k, v in folders.items()]
    dataset = {"is_dreambooth": True, "batch_size_per_device": cfg.train.batch_size,
               "num_train_images": sum(v["images"] * v["repeats"] for v in train.values()),
               "num_reg_images": sum(v["images"] for v in folders.values() if v["is_reg"]),
               "resolution": [resolution, resolution], "enable_bucket": True,
               "min_bucket_reso": cfg.data.min_bucket_side, "max_bucket_reso": cfg.data.max_bucket_side,
               "bucket_reso_steps": cfg.data.bucket_step, "bucket_no_upscale": cfg.data.no_upscale,
               "tag_frequency": {k: dict(v["tags"]) for k, v in train.items()}, "subsets": subsets}
    return {"ss_tag_frequency": json.dumps(dataset["tag_frequency"], ensure_ascii=False),
            "ss_dataset_dirs": json.dumps({k: {"n_repeats": v["repeats"], "img_count": v["images"]}
                                           for k, v in train.items()}, ensure_ascii=False),
            "ss_datasets": json.dumps([dataset], ensure_ascii=False),
            "ss_num_train_images": str(dataset["num_train_images"]),
            "ss_num_reg_images": str(dataset["num_reg_images"])}


def build_metadata(*, name: str, family, cfg, resolution: int, prediction_type: str, train_text_encoder: bool,
                   datasets: dict[str, str], steps: int, epoch: int, started: int, finished: int,
                   base_name: str, base_hash: str, thumbnail: str | None = None,
                   architecture: str | None = None, layout: str | None = None) -> dict[str, str]:
    """`datasets`: dataset_metadata's keys; `layout`: the one the file is written in (the family's by default). A file
    in diffusers' layout (SD3, Flux.1, Z-Image) has each layer's alpha/rank folded into lora_B: its alpha is the
    rank (scale 1). ss_network_module names the sd-scripts network that trains the family (networks.lora_flux for
    Flux.1, networks.lora_sd3 for SD3), the name kohya's tools know the file by."""
    lycoris = cfg.lora.network != "lora"  # LoHa/LoKr keep each module's alpha in every layout
    layout = layout or family.layout_for(cfg.save.layout)[0]
    folded = layout == "diffusers" and not lycoris
    conv = "conv" in cfg.lora.unet_extra
    network_args = {"conv_dim": str(cfg.lora.rank), "conv_alpha": str(cfg.lora.alpha)} if conv else {}
    if cfg.lora.use_dora:
        network_args["dora_wd"] = "True"
        network_args["wd_on_output"] = "True"
    if cfg.lora.use_rslora:
        network_args["rs_lora"] = "True"
    if lycoris:
        from trainer.lora.lycoris import network_args as lycoris_args

        network_args = lycoris_args(cfg)
    te_lr = cfg.optim.text_encoder_lr if train_text_encoder else 0.0
    config = cfg.to_dict()
    config["save"].pop("output_dir", None)  # where it ran is not how it was made
    md = {
        "ss_output_name": name,
        "ss_base_model_version": family.ss_base_model_version,
        "ss_network_module": "lycoris.kohya" if lycoris else family.KOHYA_NETWORK,
        "ss_network_dim": str(cfg.lora.rank),
        "ss_network_alpha": str(float(cfg.lora.rank) if folded else cfg.lora.alpha),
        "ss_network_args": json.dumps(network_args),
        "ss_resolution": f"({resolution}, {resolution})",
        **datasets,
        "ss_batch_size_per_device": str(cfg.train.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.train.gradient_accumulation),
        "ss_steps": str(steps),
        "ss_epoch": str(epoch),
        "ss_learning_rate": str(cfg.optim.lr),
        "ss_unet_lr": str(cfg.optim.lr),
        "ss_text_encoder_lr": str(te_lr),
        "ss_network_train_unet_only": str(not train_text_encoder),
        "ss_seed": str(cfg.train.seed),
        "ss_mixed_precision": cfg.train.mixed_precision,
        "ss_min_snr_gamma": str(cfg.train.min_snr_gamma),
        "ss_noise_offset": str(cfg.train.noise_offset),
        "ss_training_started_at": str(started),
        "ss_training_finished_at": str(finished),
        "ss_sd_model_name": base_name,
        "ss_new_sd_model_hash": base_hash,
        "ss_v2": str(family.name == "sd2"),
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_zero_terminal_snr": str(bool(cfg.model.zero_terminal_snr)),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture or family.modelspec_architecture}/lora",
        "modelspec.implementation": ("https://github.com/Stability-AI/generative-models"
                                     if family.name == "sdxl" else "diffusers"),
        "modelspec.title": name,
        "modelspec.date": iso_date(finished),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.trigger_phrase": cfg.data.trigger,
        "modelspec.description": f"LoRA trained with LoRA Studio on {base_name}",
        "modelspec.author": "",
        "modelspec.license": "",
        "modelspec.tags": "lora" if not lycoris else f"lora,lycoris,{cfg.lora.network}",
        "lora_studio.config": json.dumps(config, sort_keys=True),
    }
    if prediction_type in MODELSPEC_PREDICTION:
        md["modelspec.prediction_type"] = MODELSPEC_PREDICTION[prediction_type]
    if folded:
        md["lora_studio.trained_alpha"] = str(cfg.lora.alpha)  # folded into lora_B; kept for the record
    if thumbnail:
        md["modelspec.thumbnail"] = thumbnail
    if cfg.lora.use_dora and layout == "kohya":
        md[DORA_NORM_KEY] = "base"
    return md


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with a sorted header. The library writes its header from a hash map, so the
    same tensors and metadata would otherwise give different files from run to run."""
    blob = st_save(tensors)
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    header.pop("__metadata__", None)
    header["__metadata__"] = dict(metadata)
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text + blob[8 + n:]


class NonFiniteError(ValueError):
    """Tensors with NaN or infinite values: such a file is never written."""


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))


def save_lora(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write atomically, with kohya's tensor hashes added to the metadata. A file with NaN/Inf values is refused
    (whatever was at `path` stays): every loader would apply it as garbage. Metadata values must be strings, as the
    safetensors format and every reader (kohya, A1111, ComfyUI) take them."""
    bad = non_finite(tensors)
    if bad:
        raise NonFiniteError(f"{len(bad)} of {len(tensors)} tensors hold NaN or infinite values (e.g. {bad[0]}); "
                             f"{Path(path).name} was not written")
    not_text = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if not_text:
        raise TypeError(f"metadata values must be strings: {not_text[:3]}")
    md = dict(metadata)
    md["sshs_model_hash"], md["sshs_legacy_hash"] = tensor_hashes(tensors)
    write_bytes(path, safetensors_bytes(tensors, md))
    return Path(path)
