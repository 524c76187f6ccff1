"""Where the files that ship inside the package live: the embedded model, the presets and the sample
datasets. They are package data, so a wheel installed anywhere has them (no path outside the package)."""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
ASSETS = PACKAGE / "assets"
EMBEDDED_MODEL = ASSETS / "tiny-sd"
SAMPLE_DATASETS = ASSETS / "sample_datasets"
PRESETS = PACKAGE / "presets"


def default_cache_dir() -> Path:
    """Latent caches and benchmark models: `$LORA_STUDIO_CACHE`, else ~/.cache/lora-studio."""
    env = os.environ.get("LORA_STUDIO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lora-studio"
