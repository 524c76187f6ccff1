"""The one typed run config: defaults <- preset <- user file <- `--set section.key=value` overrides.

Each field's `help` is the CLI help and the UI label. Values that mean "decide from the model" are
`None` in Python and the string "auto" in TOML, so a resolved config.toml always names every key.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import tomllib

import tomli_w


class ConfigError(ValueError):
    """A bad config key or value; the message names the key, the value and what is allowed."""


def opt(default, help: str, choices=None, min=None, max=None, items=None, length=None, below=None):
    """A setting: its default, its help (the CLI's and the UI's words), and what values are allowed. For a list,
    `items` is its elements' type, `length` their number, and min/max/below bound each element."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "items": items, "length": length, "below": below}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    source: str = opt("tiny", "Base model: 'tiny' (the embedded model), a diffusers folder, a .safetensors file or a Hub id")
    family: str = opt("auto", "Model family; 'auto' detects it from the model",
                      choices=["auto", "sd1", "sd2", "sdxl", "sd3", "flux", "zimage"])
    prediction_type: Optional[str] = opt(None, "Training target; auto reads the model's scheduler config "
                                               "(flow_matching for SD3, Flux and Z-Image)",
                                         choices=[None, "epsilon", "v_prediction", "flow_matching"])
    zero_terminal_snr: Optional[bool] = opt(None, "Betas rescaled to zero terminal SNR (v-prediction models such as "
                                                  "NoobAI-XL V-Pred); auto reads the checkpoint's ztsnr key or the "
                                                  "scheduler config. Training then reaches pure noise, and samples use "
                                                  "trailing timesteps with guidance rescale 0.7")
    clip_skip: int = opt(1, "Use the output of the N-th last text-encoder layer (1 = last; SDXL, SD3, Flux and "
                            "Z-Image always use their own)", min=1, max=12)
    t5: bool = opt(True, "SD3: load the T5-XXL text encoder (4.8B parameters, 9.5 GB in bf16; with cached captions "
                         "it leaves the GPU before training). false leaves it out: zeros stand in, as in diffusers "
                         "without text_encoder_3; prompts then rest on the two CLIP encoders, which follow long or "
                         "text-heavy prompts less well. Flux needs its T5 (refused)")


@dataclass
class LoraConfig:
    rank: int = opt(16, "LoRA rank (dimension): 4-8 for simple subjects, 16-32 for complex ones", min=1, max=1024)
    alpha: float = opt(16.0, "LoRA alpha; the update is scaled by alpha / rank", min=0.0)
    dropout: float = opt(0.0, "Dropout on the LoRA path", min=0.0, max=0.9)
    train_unet: bool = opt(True, "Train LoRA on the UNet")
    train_text_encoder: Optional[bool] = opt(None, "Train LoRA on the text encoder(s); auto = yes for SD1/SD2, no for SDXL")
    unet_extra: list = opt([], "Extra denoiser targets besides attention: proj (UNet proj_in/out), ff (feed-forward), "
                               "conv (UNet convolutions: LoCon), single_mlp (Flux's single blocks' MLP)",
                           choices=["proj", "ff", "conv", "single_mlp"], items=str)
    text_encoder_mlp: bool = opt(False, "Also target the text-encoder MLP layers (fc1, fc2)")
    use_dora: bool = opt(False, "Weight-decomposed LoRA (DoRA)")
    use_rslora: bool = opt(False, "Rank-stabilised scaling: alpha / sqrt(rank) instead of alpha / rank")
    network: str = opt("lora", "The adapter: lora (low-rank up·down), loha (Hadamard product of two low-rank pairs: "
                               "rank r reaches rank r² at twice the parameters), lokr (Kronecker product of a small "
                               "and a large factor: the smallest files at a large factor). LoHa and LoKr are "
                               "LyCORIS's, trained with peft and written in the LyCORIS layout",
                       choices=["lora", "loha", "lokr"])
    lokr_factor: int = opt(-1, "LoKr: split each dimension into factor x rest (-1: as close to its square root as it "
                               "divides); a larger factor, a larger first Kronecker factor and a larger file. A factor "
                               "that does not divide a layer's dimension caps its first factor there instead; one "
                               "larger than every targeted dimension is refused (it would split as -1 does)", min=-1)
    decompose_both: bool = opt(False, "LoKr: also make the first (small) Kronecker factor low-rank (smaller file)")
    rank_dropout: float = opt(0.0, "LoHa/LoKr: drop whole ranks of the update during training (0 = off)", min=0.0,
                              max=0.9)


@dataclass
class DataConfig:
    dataset: str = opt("", "Dataset folder: images with same-name .txt captions (kohya 'N_name' subfolders allowed)")
    resolution: Optional[int] = opt(None, "Training resolution in pixels; auto = the family default (512, 768, 1024)", min=32, max=4096)
    repeats: int = opt(1, "How often each image is seen per epoch (kohya 'N_name' folders set their own)", min=1, max=10000)
    trigger: str = opt("", "Trigger word, prepended to every caption that lacks it")
    caption_extension: str = opt(".txt", "Caption file extension")
    default_caption: str = opt("", "Caption for images without a caption file ('[trigger]' is replaced)")
    shuffle_tags: bool = opt(False, "Shuffle comma-separated tags, keeping the first keep_tokens in place")
    keep_tokens: int = opt(0, "Leading tags kept in place when shuffling", min=0)
    caption_dropout: float = opt(0.0, "Probability of training a step with an empty caption", min=0.0, max=1.0)
    tag_dropout: float = opt(0.0, "Probability of dropping each tag (the first keep_tokens are kept)", min=0.0, max=1.0)
    random_crop: bool = opt(False, "Random instead of centre crop to the bucket")
    flip: bool = opt(False, "Random horizontal flip (avoid for asymmetric subjects)")
    bucket_step: int = opt(64, "Bucket side step in pixels", min=8, max=256)
    min_bucket_side: int = opt(256, "Smallest bucket side in pixels", min=64)
    max_bucket_side: int = opt(2048, "Largest bucket side in pixels", min=64)
    no_upscale: bool = opt(False, "Never upscale an image to reach its bucket")
    cache_latents: bool = opt(True, "Encode images with the VAE once and cache the latents on disk")
    cache_ahead: bool = opt(True, "With cache_latents: start training once the first batch is encoded and encode "
                                  "each later image just before the step that needs it, in the order the seeded "
                                  "sampler takes them (the VAE stays on the GPU beside the denoiser until every "
                                  "latent is cached); false: encode every image before the first step, with the "
                                  "VAE alone on the GPU. Either way the LoRA is the same")
    cache_dir: Optional[str] = opt(None, "Latent cache folder; auto = $LORA_STUDIO_CACHE or ~/.cache/lora-studio")
    cache_text: bool = opt(True, "Encode captions once when the text encoders are frozen and captions are static, "
                                 "then let the text encoders go (off the GPU and out of memory)")
    masked_loss: bool = opt(False, "Weight the loss by each image's <name>.mask.png (kept from transparent imports)")
    validation_split: float = opt(0.0, "Images held out of training for the validation loss: a fraction below 1 (0.1 "
                                       "= 10%) or a whole count (4; 1.0 is one image, not all of them), chosen with "
                                       "train.seed; 0 = none", min=0.0)
    validation_dataset: str = opt("", "A folder of validation images with captions, instead of validation_split")
    reg_dataset: str = opt("", "Regularization (class) images folder, e.g. generic photos of the class; empty = none")
    prior_loss_weight: float = opt(1.0, "Loss weight of regularization images", min=0.0, max=10.0)
    num_workers: int = opt(0, "Data-loader worker processes", min=0, max=32)

    def caches_text(self, text_encoder_trained: bool) -> bool:
        """Captions are encoded once (and the encoders then let go) when the encoders are frozen and no caption
        changes from step to step: the loop and the estimator both ask this."""
        return self.cache_text and not text_encoder_trained and not (self.shuffle_tags or self.tag_dropout)


@dataclass
class OptimConfig:
    optimizer: str = opt("adamw", "Optimizer", choices=["adamw", "adamw8bit", "prodigy"])
    lr: float = opt(1e-4, "UNet learning rate", min=0.0, max=10.0)
    text_encoder_lr: Optional[float] = opt(None, "Text-encoder learning rate; auto = half the UNet rate", min=0.0, max=10.0)
    weight_decay: float = opt(1e-2, "AdamW weight decay", min=0.0, max=1.0)
    betas: list = opt([0.9, 0.999], "Adam betas: two numbers from 0 to below 1", items=float, length=2, min=0.0,
                      below=1.0)
    eps: float = opt(1e-8, "Adam epsilon", min=0.0)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 = off)", min=0.0)
    scheduler: str = opt("constant_with_warmup", "Learning-rate schedule",
                         choices=["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"])
    warmup_steps: int = opt(0, "Learning-rate warmup steps", min=0)


@dataclass
class TrainConfig:
    max_steps: int = opt(0, "Optimizer steps to train; 0 = use epochs", min=0)
    epochs: int = opt(10, "Epochs to train when max_steps is 0", min=1)
    batch_size: int = opt(1, "Images per step per GPU", min=1, max=1024)
    gradient_accumulation: int = opt(1, "Micro-batches per optimizer step", min=1, max=1024)
    mixed_precision: str = opt("no", "Precision of frozen weights and autocast: no (fp32), fp16 (CUDA) or bf16",
                               choices=["no", "fp16", "bf16"])
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass to save memory")
    frozen_dtype: str = opt("auto", "Storage of the frozen UNet and text-encoder weights: auto = the mixed-precision "
                            "dtype; fp8 = float8 with a scale per row, computed in bf16/fp16 (half of fp16's memory; "
                            "needs mixed_precision bf16 or fp16); int8 = bitsandbytes' 8-bit rows (as fp8, any "
                            "precision); nf4 = 4-bit NormalFloat, QLoRA's (a quarter of fp16's memory; the LoRA "
                            "learns on a slightly perturbed base: bench qlora measures by how much)",
                            choices=["auto", "fp8", "int8", "nf4"])
    offload: bool = opt(False, "Keep the frozen UNet weights in system RAM and copy each layer to the GPU only for "
                               "its own forward and backward pass: the GPU holds activations, LoRA and one layer "
                               "(for 4 GB cards; steps slower; nothing changes on a CPU)")
    fit_memory: bool = opt(True, "Let the memory planner turn on savings (caches, fp8/int8/nf4 frozen weights, "
                                 "gradient checkpointing, 8-bit AdamW, a smaller batch with accumulation, offload) when the run "
                                 "would not fit the GPU (or the RAM on a CPU); false = run exactly as configured")
    seed: int = opt(42, "Random seed; the same seed and config give the same LoRA", min=0)
    min_snr_gamma: float = opt(0.0, "Min-SNR loss weighting gamma (5 is common; 0 = off)", min=0.0)
    noise_offset: float = opt(0.0, "Noise offset for darker/brighter images (0.05-0.1 is common; 0 = off)", min=0.0, max=1.0)
    compile: bool = opt(False, "torch.compile the UNet (CUDA only; slower start, faster steps)")
    validate_every_n_steps: int = opt(0, "Validation loss every N steps, besides each saved checkpoint and the end "
                                         "(needs data.validation_split or data.validation_dataset; 0 = only those)",
                                      min=0)
    drift_bound: Optional[float] = opt(None, "Largest drift (mean pixel change 0..1 on prompts without the trigger, "
                                             "against the base) a recommended checkpoint may have; auto = 0.8x the "
                                             "base model's own change between two seeds on those prompts, measured "
                                             "in the run, so the bound scales with the model (0.09 on the embedded "
                                             "model)", min=0.0, max=1.0)


@dataclass
class SampleConfig:
    every_n_steps: int = opt(0, "Render sample images every N steps (0 = only at the end)", min=0)
    prompts: list = opt([], "Sample prompts; empty = the dataset's first two distinct captions, with the trigger",
                        items=str)
    negative_prompt: str = opt("", "Negative prompt for samples")
    seed: int = opt(1234, "Seed of the first sample; each next prompt uses seed + index", min=0)
    steps: Optional[int] = opt(None, "Sampling steps; auto = the model's own (20 for SD 1/2/XL and Flux.1 dev, 28 "
                                      "for SD3 and Z-Image Base, 4 for Flux.1 schnell, 9 for Z-Image Turbo)",
                               min=1, max=200)
    guidance_scale: Optional[float] = opt(None, "Guidance: classifier-free guidance for SD and Z-Image Base, the "
                                                "distilled guidance for Flux.1 dev; 0 = none. auto = the model's own "
                                                "(7 SD 1/2/XL, 5 SD3, 3.5 Flux.1 dev, 0 Flux.1 schnell and Z-Image "
                                                "Turbo, which are distilled, 4 Z-Image Base)", min=0.0, max=30.0)
    at_end: bool = opt(True, "Render samples when training ends")


@dataclass
class SaveConfig:
    output_dir: str = opt("runs/lora", "Run folder: config.toml, events.jsonl, samples/, checkpoints/ and the LoRA")
    name: str = opt("", "LoRA file name (without .safetensors); empty = the run folder name")
    every_n_steps: int = opt(0, "Save a checkpoint LoRA every N steps (0 = off)", min=0)
    every_n_epochs: int = opt(0, "Save a checkpoint LoRA every N epochs (0 = off)", min=0)
    dtype: str = opt("fp16", "Tensor dtype of saved LoRA files", choices=["fp16", "bf16", "fp32"])
    layout: str = opt("auto", "Key layout of saved LoRAs: auto = the family's own (kohya for SD 1/2/XL; diffusers' for "
                              "SD3, Flux.1 and Z-Image, which ComfyUI, Forge and diffusers read); kohya (A1111, "
                              "ComfyUI, kohya's sd-scripts, diffusers; for Flux.1 kohya's fused BFL names, which "
                              "sd-scripts and Forge read too); peft or diffusers (diffusers' own layout: for SD "
                              "1/2/XL peft's keys with their adapter metadata, which keep DoRA magnitudes that "
                              "diffusers drops from kohya files). SD3 and Z-Image have no kohya layout a loader reads",
                      choices=["auto", "kohya", "peft", "diffusers"])
    state_every_n_steps: int = opt(200, "Save the full training state (for --resume) every N steps; 0 = only on Stop",
                                   min=0)
    keep_states: int = opt(2, "Training states kept (older ones are removed)", min=1, max=100)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    save: SaveConfig = field(default_factory=SaveConfig)

    # ---- layering -------------------------------------------------------------------------
    @classmethod
    def load(cls, *layers: dict | str | Path | None, overrides: list[str] = ()) -> "RunConfig":
        """Apply TOML files or dicts in order over the defaults, then `section.key=value` overrides."""
        cfg = cls()
        for layer in layers:
            if layer is None:
                continue
            if not isinstance(layer, dict):
                layer = read_toml(layer)
            cfg.update(layer)
        for item in overrides:
            cfg.set_override(item)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Settings each allowed alone that do nothing together were accepted and silently ignored (issue 37): each
        is refused, naming the setting and what would take effect."""
        lora = self.lora
        if lora.network == "lora" and lora.rank_dropout:
            raise ConfigError(f"lora.rank_dropout = {lora.rank_dropout:g} applies to LoHa and LoKr only (lora.network "
                              "= loha or lokr); a plain LoRA's dropout is lora.dropout: set rank_dropout to 0")
        if lora.network != "lokr" and (lora.lokr_factor != -1 or lora.decompose_both):
            key = "lokr_factor" if lora.lokr_factor != -1 else "decompose_both"
            raise ConfigError(f"lora.{key} applies to LoKr only (lora.network = lokr); this run trains "
                              f"{lora.network}: leave it at its default ({'-1' if key == 'lokr_factor' else 'false'})")
        if lora.lokr_factor == 0:
            raise ConfigError("bad value for lora.lokr_factor: 0; allowed: -1 (near each dimension's square root) or a "
                              "whole number >= 1")
        split = self.data.validation_split
        if split >= 1 and not float(split).is_integer():
            raise ConfigError(f"bad value for data.validation_split: {split:g}; allowed: a fraction below 1 (0.1 holds "
                              "out 10%) or a whole count of images (4)")

    def update(self, data: dict, where: str = "") -> None:
        for section, values in data.items():
            sec = self._section(section, where)
            if not isinstance(values, dict):
                raise ConfigError(f"{where}[{section}] must be a table of keys, got {values!r}")
            for key, value in values.items():
                set_field(sec, f"{section}.{key}", key, value)

    def set_override(self, item: str) -> None:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        if "." not in dotted:
            raise ConfigError(f"override key {dotted!r} must be section.key, e.g. train.max_steps")
        section, key = dotted.strip().split(".", 1)
        set_field(self._section(section), f"{section}.{key}", key, parse_literal(raw.strip()))

    def _section(self, name: str, where: str = ""):
        names = [f.name for f in dataclasses.fields(self)]
        if name not in names:
            raise ConfigError(f"{where}unknown config section {name!r}; allowed: {', '.join(names)}")
        return getattr(self, name)

    # ---- output ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {s.name: {k: to_toml_value(v) for k, v in dataclasses.asdict(getattr(self, s.name)).items()}
                for s in dataclasses.fields(self)}

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def to_toml_value(v):
    return "auto" if v is None else v


def parse_literal(raw: str):
    """Parse a `--set` value as TOML (numbers, booleans, lists, quoted strings), else as a bare string. One double-
    quoted string with a backslash in it is taken literally: it is a Windows path ("D:\\new\\pics"), and TOML would
    read its \\n as a line break or refuse its \\U."""
    if len(raw) >= 2 and raw[0] == raw[-1] == '"' and "\\" in raw and '"' not in raw[1:-1]:
        return raw[1:-1]
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def field_spec(section_obj, key: str) -> dataclasses.Field:
    for f in dataclasses.fields(section_obj):
        if f.name == key:
            return f
    allowed = ", ".join(f.name for f in dataclasses.fields(section_obj))
    raise KeyError(allowed)


def set_field(section_obj, dotted: str, key: str, value: Any) -> None:
    try:
        f = field_spec(section_obj, key)
    except KeyError as e:
        raise ConfigError(f"unknown config key {dotted!r}; allowed keys in this section: {e.args[0]}") from None
    setattr(section_obj, key, coerce(dotted, f, value))


def _base_type(annotation):
    # Annotations are strings under `from __future__ import annotations`.
    t = eval(annotation, {"Optional": Optional, "list": list}) if isinstance(annotation, str) else annotation
    optional = False
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        optional, t = True, args[0]
    return t, optional


def coerce(dotted: str, f: dataclasses.Field, value: Any):
    t, optional = _base_type(f.type)
    meta = f.metadata
    choices = meta.get("choices")

    def bad(allowed: str):
        return ConfigError(f"bad value for {dotted}: {value!r}; allowed: {allowed}")

    if optional and (value is None or value == "auto"):
        return None
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise bad("true or false" + (" or auto" if optional else ""))
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise bad(_range_text("a whole number", meta, optional))
    elif t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(_range_text("a number", meta, optional))
        value = float(value)
        if not math.isfinite(value):  # NaN passes every comparison below; inf is no learning rate either
            raise bad(_range_text("a finite number", meta, optional))
    elif t is str:
        if not isinstance(value, str):
            raise bad("a string")
    elif t is list:
        return _coerce_list(dotted, meta, value, bad)
    if choices and value not in choices:
        raise bad(", ".join("auto" if c is None else str(c) for c in choices))
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad(_range_text("a whole number" if t is int else "a number", meta, optional))
    return value


def _coerce_list(dotted: str, meta, value, bad) -> list:
    """A list setting: each element of the declared type (a number as a number, a string as a string), within its
    bounds, in the declared number. A bare string is one element, or comma-separated names where there are choices."""
    items, choices, length = meta.get("items"), meta.get("choices"), meta.get("length")
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()] if choices else [value]
    if not isinstance(value, list):
        raise bad("a list")
    kind = {float: "numbers", int: "whole numbers", str: "strings"}.get(items, "values")
    if length is not None and len(value) != length:
        raise bad(f"a list of {length} {kind}")
    out = []
    for v in value:
        if items is float and not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v):
            v = float(v)
        elif items is not None and (isinstance(v, bool) or not isinstance(v, items)):
            raise bad(f"a list of {kind}" + (f" ({', '.join(map(str, choices))})" if choices else ""))
        lo, hi, below = meta.get("min"), meta.get("max"), meta.get("below")
        if items in (int, float) and ((lo is not None and v < lo) or (hi is not None and v > hi)
                                      or (below is not None and v >= below)):
            bounds = [f">= {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else "",
                      f"< {below}" if below is not None else ""]
            raise bad(f"a list of {kind}, each {' and '.join(b for b in bounds if b)}")
        if choices and v not in choices:
            raise bad("a list of " + ", ".join(map(str, choices)))
        out.append(v)
    return out


def _range_text(kind: str, meta, optional: bool) -> str:
    lo, hi = meta.get("min"), meta.get("max")
    text = kind
    if lo is not None and hi is not None:
        text += f" from {lo} to {hi}"
    elif lo is not None:
        text += f" >= {lo}"
    elif hi is not None:
        text += f" <= {hi}"
    return text + (" or auto" if optional else "")


def describe() -> list[tuple[str, str, Any]]:
    """(section.key, help, default) for every field: the CLI's `--set` help and the UI's labels."""
    rows = []
    base = RunConfig()
    for s in dataclasses.fields(base):
        for f in dataclasses.fields(getattr(base, s.name)):
            rows.append((f"{s.name}.{f.name}", f.metadata["help"], to_toml_value(getattr(getattr(base, s.name), f.name))))
    return rows
