"""A safetensors file's header (its JSON, read without torch or the tensors): the one reader for the rooms that need
a file's names, shapes and dtypes before anything loads (the LoRA checks, the base's stored precision)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

MAX_HEADER = 100 * 2**20


class HeaderError(ValueError):
    """The file cannot be used (not safetensors, truncated, unreadable, or not a LoRA); the message says why and what
    to do."""


def read(path: str | Path) -> tuple[dict, int]:
    """(safetensors header, its length)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise HeaderError(f"{path.name} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or n > path.stat().st_size - 8:
                raise HeaderError(f"{path.name} is truncated or not a safetensors file")
            return json.loads(f.read(n)), n
    except (OSError, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, HeaderError):
            raise
        raise HeaderError(f"{path.name} cannot be read as safetensors: {e}") from None
