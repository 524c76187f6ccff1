"""The Train tab's settings: preset + dataset + model + VRAM tier resolved into the effective config
(the same layering as `lora-studio train`), shown as TOML the user can edit, and checked on Start."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from trainer import presets
from trainer.config import ConfigError, RunConfig
from trainer.data.captions import sample_prompts
from trainer.data.manifest import read_manifest
from trainer.data.scan import DatasetError, cached_scan
from trainer.models.info import peek_family, peek_resolution, text_encoder_trained_by_default

from .workspace import Workspace

EMBEDDED = "tiny (embedded)"
NO_TIER = "no GPU / not set"


@dataclass
class Choice:
    model: str = EMBEDDED
    dataset: str = ""
    reg_dataset: str = ""
    preset: str = "character"
    vram: str = NO_TIER
    steps: int = 0  # 0 = what the preset says
    rank: int = 0
    lr: float = 0.0
    prompts: tuple[str, ...] = ()  # sample prompts; empty = from the dataset's trigger and captions
    network: str = "lora"  # lora.network: lora, loha or lokr


def start_blockers(findings) -> str:
    """What stops any run in this environment (doctor's blocking findings) as Markdown, or '' if nothing does.
    The Train tab shows it instead of letting Start launch a run that fails at once."""
    if not findings:
        return ""
    lines = [f"- {f.message}. **Fix:** `{f.fix}`" for f in findings]
    return "**Start is disabled: this environment cannot train** (`lora-studio doctor` says more)\n\n" + "\n".join(lines)


def model_source(model: str) -> str:
    return "tiny" if model in ("", EMBEDDED) else model.strip()


def effective_config(ws: Workspace, c: Choice, run_name: str, on_cpu: bool = False) -> RunConfig:
    """`on_cpu`: the run will train on this machine's CPU (no GPU here and no VRAM tier picked): an 'auto'
    resolution is then filled in as the trainer resolves it there (512 px for a big family), so the form, the
    estimate and the Advanced box show the size that will train."""
    source = model_source(c.model)
    family = peek_family(source)
    dataset = ws.dataset(c.dataset) if c.dataset else None
    try:
        items = cached_scan(dataset).items if dataset else None
    except DatasetError:
        items = None
    vram = None if c.vram in ("", NO_TIER) else int(c.vram)
    layer = presets.resolve(c.preset, family=family, vram=vram, n_images=len(items) if items is not None else None) \
        if c.preset else presets.vram_layer(vram, family)
    overrides = {"model": {"source": source},
                 "data": {"dataset": str(dataset) if dataset else ""},
                 "save": {"output_dir": str(ws.run(run_name)), "name": run_name}}
    if c.reg_dataset:
        overrides["data"]["reg_dataset"] = str(ws.dataset(c.reg_dataset))
    if c.steps:
        overrides["train"] = {"max_steps": int(c.steps)}
    if c.rank:
        overrides["lora"] = {"rank": int(c.rank), "alpha": float(c.rank) / 2}
    if c.lr:
        overrides.setdefault("optim", {})["lr"] = float(c.lr)
    if c.network and c.network != "lora":
        overrides.setdefault("lora", {})["network"] = c.network
    cfg = RunConfig.load(layer, overrides)
    if cfg.data.resolution is None:  # a folder's own size (None for a Hub id or a single file: the trainer reads it)
        cfg.data.resolution = peek_resolution(source, cfg.model.family, on_cpu) if family else None
    # Shown and editable before Start; what the trainer would pick itself: the dataset's first captions with
    # its trigger (presets used to name the sample datasets' prompts, whatever the user's trigger was).
    trigger = cfg.data.trigger or (read_manifest(dataset).trigger if dataset else "")
    cfg.sample.prompts = list(c.prompts) or sample_prompts([i.caption for i in items or []], trigger)
    return cfg


def training_resolution(cfg: RunConfig) -> int | None:
    return cfg.data.resolution or peek_resolution(cfg.model.source, cfg.model.family)


def parse_edited(text: str) -> RunConfig:
    """The Advanced box's TOML, checked exactly as the trainer will check it."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        hint = ("; a Windows path goes in single quotes ('C:\\Users\\me\\pics'), which keep backslashes as they are, "
                "or with forward slashes") if "\\" in text else ""
        raise ConfigError(f"the settings are not valid TOML: {e}{hint}") from None
    cfg = RunConfig.load(data)
    if not cfg.data.dataset:
        raise ConfigError("pick a dataset first")
    return cfg


FROZEN_WORDS = {"auto": "in the run's precision", "fp8": "fp8 (float8, computed in bf16/fp16)",
                "int8": "int8 (8-bit rows)", "nf4": "nf4 (4-bit, QLoRA): samples render on the 4-bit copy"}


def summary(cfg: RunConfig) -> list[list]:
    """The settings users look at first, grouped; everything else is in the Advanced box."""
    te = cfg.lora.train_text_encoder
    family = cfg.model.family if cfg.model.family != "auto" else peek_family(cfg.model.source)
    trains_te = te if te is not None else text_encoder_trained_by_default(family)
    t5 = {"sd3": "loaded" if cfg.model.t5 else "left out (model.t5 = false)", "flux": "loaded (Flux needs it)"}
    return [
        ["model", "base model", cfg.model.source],
        *([["model", "T5-XXL text encoder", t5[family]]] if family in t5 else []),
        ["data", "dataset", Path(cfg.data.dataset).name if cfg.data.dataset else "(none)"],
        ["lora", "rank / alpha", f"{cfg.lora.rank} / {cfg.lora.alpha:g}"],
        *([["lora", "network", {"loha": "LoHa (LyCORIS)", "lokr": f"LoKr (LyCORIS), factor {'auto' if cfg.lora.lokr_factor == -1 else cfg.lora.lokr_factor}"}
            [cfg.lora.network]]] if cfg.lora.network != "lora" else []),
        ["lora", "text encoder", "auto" if te is None else ("trained" if te else "frozen")],
        ["optim", "learning rate (UNet / TE)" if trains_te else "learning rate", f"{cfg.optim.lr:g} / {'auto' if cfg.optim.text_encoder_lr is None else f'{cfg.optim.text_encoder_lr:g}'}"
         if trains_te else f"{cfg.optim.lr:g} (the text encoder is frozen: it has no rate)"],
        ["train", "steps", cfg.train.max_steps or f"{cfg.train.epochs} epochs"],
        ["train", "batch / precision", f"{cfg.train.batch_size} / {cfg.train.mixed_precision}"],
        ["train", "gradient checkpointing", cfg.train.gradient_checkpointing],
        *([["train", "frozen weights", FROZEN_WORDS[cfg.train.frozen_dtype]
            + (", streamed from system RAM" if cfg.train.offload else "")]]
          if cfg.train.frozen_dtype != "auto" or cfg.train.offload else []),
        ["data", "repeats / resolution", f"{cfg.data.repeats} / {training_resolution(cfg) or 'auto'}"],
        ["data", "trigger", cfg.data.trigger or "(from the dataset)"],
        ["sample", "sample prompts", " | ".join(cfg.sample.prompts) or "(none)"],
    ]
