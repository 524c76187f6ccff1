"""Presets: a kind (character, style, concept) resolved for one model family, one VRAM tier and one
dataset size, as a single config layer between the defaults and the user's own file.

A preset file holds config sections plus three optional tables that are not config:
- `[derive]`: how repeats and rank follow from the number of images;
- `[overlay.<family>.<section>]`: values for sd1, sd2, sdxl, sd3, flux, zimage or the embedded tiny model;
VRAM tiers live in `presets/vram.toml` as `[<GB>.<section>]`, with `[<GB>.sdxl.<section>]` on top
for SDXL, which needs about twice the memory at the same settings.
"""
from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path

from .config import ConfigError, read_toml
from .resources import PRESETS

BUILTIN_DIR = PRESETS
KINDS = ("character", "style", "concept")
VRAM_TIERS = (6, 8, 12, 16, 24)
FAMILY_OVERLAYS = ("sd1", "sd2", "sdxl", "sd3", "flux", "zimage", "tiny")
_NOT_CONFIG = ("kind", "derive", "overlay")


def user_dir() -> Path:
    home = os.environ.get("LORA_STUDIO_HOME")
    return (Path(home) if home else Path.home() / "lora-studio") / "presets"


def available() -> dict[str, Path]:
    """Preset name -> file. A user preset never shadows a built-in one of the same name."""
    found = {p.stem: p for p in sorted(user_dir().glob("*.toml"))} if user_dir().is_dir() else {}
    found.update({p.stem: p for p in sorted(BUILTIN_DIR.glob("*.toml")) if p.stem != "vram"})
    return found


def preset_path(name: str) -> Path:
    if name.endswith(".toml") or os.sep in name:
        path = Path(name)
        if not path.exists():
            raise ConfigError(f"preset file {path} does not exist")
        return path
    presets = available()
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(presets)) or 'none'}")
    return presets[name]


def suggest_rank(kind: str, n_images: int) -> int:
    """Rule of thumb: r=4-8 for a simple subject or a small set, 16-32 for styles or large sets."""
    base = {"character": 8, "concept": 8, "style": 16}.get(kind, 8)
    if n_images < 10:
        base //= 2
    elif n_images > 200:
        base *= 4
    elif n_images > 50:
        base *= 2
    return max(4, min(32, base))


def derived(kind: str, rules: dict, n_images: int) -> dict:
    """Repeats so each epoch sees about `samples_per_epoch` images, and the suggested rank."""
    out: dict = {}
    if rules.get("samples_per_epoch"):
        out.setdefault("data", {})["repeats"] = max(1, math.ceil(rules["samples_per_epoch"] / max(1, n_images)))
    if rules.get("rank", "suggest") == "suggest":
        rank = suggest_rank(kind, n_images)
        out.setdefault("lora", {}).update(rank=rank, alpha=float(rank) * rules.get("alpha_over_rank", 0.5))
    return out


def merge(into: dict, layer: dict) -> dict:
    for section, values in layer.items():
        into.setdefault(section, {}).update(values)
    return into


def vram_layer(gb: int | None, family: str | None) -> dict:
    if gb is None:
        return {}
    if gb not in VRAM_TIERS:
        raise ConfigError(f"VRAM tier {gb} GB is not one of {', '.join(map(str, VRAM_TIERS))}")
    tier = read_toml(BUILTIN_DIR / "vram.toml")[str(gb)]
    layer = {k: v for k, v in tier.items() if k not in FAMILY_OVERLAYS}
    return merge(copy.deepcopy(layer), tier.get(family or "", {}))


def resolve(name: str, *, family: str | None = None, vram: int | None = None,
            n_images: int | None = None) -> dict:
    """The preset as one config layer: base <- derived from the dataset <- family overlay <- VRAM tier."""
    raw = read_toml(preset_path(name))
    kind = raw.get("kind", name)
    layer = copy.deepcopy({k: v for k, v in raw.items() if k not in _NOT_CONFIG})
    if n_images:
        merge(layer, derived(kind, raw.get("derive", {}), n_images))
    if family:
        merge(layer, copy.deepcopy(raw.get("overlay", {}).get(family, {})))
    return merge(layer, vram_layer(vram, family))


def save_user_preset(name: str, text: str) -> Path:
    """Write a user preset; refuses names of built-in presets so a built-in is never shadowed."""
    from .atomic import write_text

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", name):
        raise ConfigError(f"preset name {name!r} may use letters, digits, - and _ only (up to 64)")
    if (BUILTIN_DIR / f"{name}.toml").exists() or name == "vram":
        raise ConfigError(f"{name!r} is a built-in preset; save yours under another name")
    from .config import RunConfig

    data = read_toml_text(text, name)
    RunConfig.load({k: v for k, v in data.items() if k not in _NOT_CONFIG})  # unknown keys fail here
    path = user_dir() / f"{name}.toml"
    write_text(path, text)
    return path


def read_toml_text(text: str, where: str) -> dict:
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"preset {where}: not valid TOML ({e})") from None
