"""Where the files that ship inside the package live: the embedded model, the presets and the sample
datasets. They are package data, so a wheel installed anywhere has them (no path outside the package)."""
from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
ASSETS = PACKAGE / "assets"
EMBEDDED_MODEL = ASSETS / "tiny-sd"
SAMPLE_DATASETS = ASSETS / "sample_datasets"
PRESETS = PACKAGE / "presets"
