"""The models room: `load_base(source) -> Base` (a diffusers folder, a single file or a Hub id; loading.py), one module
per `Family` (family.py: SD 1.x/2.x, sdxl.py, sd3.py; every family by name in families.py), the noise schedules
families train with (schedules.py), what can be said about a model without loading it (info.py, torch-free), SDXL's
original layer names (sgm_names.py) and the embedded tiny model's builder (tiny.py).

Importing this package loads nothing heavy: its names below come from their modules when first asked for, so the app
can use `trainer.models.info` without torch."""
from __future__ import annotations

_WHERE = {
    "load_base": "loading", "Base": "loading", "sampling_schedule": "loading", "detect_family": "loading",
    "resolve_source": "loading", "checkpoint_keys": "loading", "quiet_transformers": "loading",
    "FAMILIES": "families", "Family": "family", "NoT5": "sd3", "SD3Family": "sd3", "SDXLFamily": "sdxl",
    "family_name": "info", "peek_family": "info", "is_embedded": "info", "EMBEDDED_DIR": "info",
}


def __getattr__(name: str):
    if name == "ModelError":
        from trainer.errors import ModelError

        return ModelError
    if name not in _WHERE:
        raise AttributeError(f"module 'trainer.models' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"trainer.models.{_WHERE[name]}"), name)
