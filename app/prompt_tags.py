"""A1111-style `<lora:name:weight>` tags in a prompt: parsed out, so they can drive the sliders."""
from __future__ import annotations

import re

TAG = re.compile(r"<lora:([^:>]+)(?::([-+]?\d*\.?\d+))?(?::([-+]?\d*\.?\d+))?>")


def split(prompt: str) -> tuple[str, list[tuple[str, float, float | None]]]:
    """(prompt without tags, [(name, weight, text-encoder weight or None)])."""
    tags = [(m.group(1).strip(), float(m.group(2)) if m.group(2) else 1.0,
             float(m.group(3)) if m.group(3) else None) for m in TAG.finditer(prompt)]
    clean = re.sub(r"\s{2,}", " ", TAG.sub("", prompt)).strip(" ,")
    return clean, tags
