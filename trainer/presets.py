"""Presets: TOML files of config sections that sit between the defaults and the user's own file."""
from __future__ import annotations

import os
from pathlib import Path

from .config import ConfigError

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "presets"


def user_dir() -> Path:
    home = os.environ.get("LORA_STUDIO_HOME")
    return (Path(home) if home else Path.home() / "lora-studio") / "presets"


def available() -> dict[str, Path]:
    """Preset name -> file. A user preset never shadows a built-in one of the same name."""
    found = {p.stem: p for p in sorted(user_dir().glob("*.toml"))} if user_dir().is_dir() else {}
    found.update({p.stem: p for p in sorted(BUILTIN_DIR.glob("*.toml"))})
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
