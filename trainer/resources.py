"""Where the files that ship with LoRA Studio live: the embedded model, the presets and the sample datasets.

The embedded model is package data (`trainer/assets/tiny-sd`). The presets and sample datasets sit at the top of
a checkout (`presets/`, `sample_datasets/`, where people look for them); building a wheel copies them into the
package (`trainer/presets`, `trainer/assets/sample_datasets`: see setup.py), so an installed wheel has them too.
Each is looked up inside the package first, then beside it in the checkout."""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CHECKOUT = PACKAGE.parent
ASSETS = PACKAGE / "assets"
EMBEDDED_MODEL = ASSETS / "tiny-sd"


def _shipped(in_package: Path, in_checkout: Path) -> Path:
    return in_package if in_package.is_dir() else in_checkout


PRESETS = _shipped(PACKAGE / "presets", CHECKOUT / "presets")
SAMPLE_DATASETS = _shipped(ASSETS / "sample_datasets", CHECKOUT / "sample_datasets")


def default_cache_dir() -> Path:
    """Latent caches and benchmark models: `$LORA_STUDIO_CACHE`, else ~/.cache/lora-studio."""
    env = os.environ.get("LORA_STUDIO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lora-studio"
