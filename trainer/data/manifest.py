"""The optional dataset manifest (`dataset.toml`): name, trigger word and default repeats."""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import tomli_w

from ..atomic import write_text
from .scan import MANIFEST

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class Manifest:
    name: str = ""
    trigger: str = ""
    repeats: int = 1
    kind: str = ""  # character, style or concept: picks the caption template


def read_manifest(dataset: str | Path) -> Manifest:
    path = Path(dataset) / MANIFEST
    if not path.exists():
        return Manifest(name=Path(dataset).name)
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    known = {k: v for k, v in data.items() if k in Manifest.__dataclass_fields__}
    return Manifest(**known)


def write_manifest(dataset: str | Path, manifest: Manifest) -> None:
    write_text(Path(dataset) / MANIFEST, tomli_w.dumps(asdict(manifest)))
