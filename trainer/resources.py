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


def default_workspace() -> Path:
    """The app's workspace (datasets/, runs/, loras/): `$LORA_STUDIO_HOME`, else ~/lora-studio."""
    home = os.environ.get("LORA_STUDIO_HOME")
    return Path(home).expanduser() if home else Path.home() / "lora-studio"


def run_folder(path: str | Path) -> Path:
    """Where a run folder given as `path` is: an absolute path as it is; a relative one that exists from here (an
    earlier run beside the user) as it is; any other relative one in the workspace's runs/, which the app lists
    (`--output runs/my-lora` and `--output my-lora` both land there; they used to land wherever the command ran)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    parts = p.parts[1:] if p.parts and p.parts[0] == "runs" else p.parts
    return default_workspace() / "runs" / Path(*parts) if parts else default_workspace() / "runs"


def default_cache_dir() -> Path:
    """Latent caches and benchmark models: `$LORA_STUDIO_CACHE`, else ~/.cache/lora-studio."""
    env = os.environ.get("LORA_STUDIO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lora-studio"
