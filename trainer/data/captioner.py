"""Auto-captioning behind one small interface, so the UI can offer any captioner or none.

A real captioner needs weights the user provides (a local folder or a Hub id); tests use a fake.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from .caption_ops import set_caption
from .images import open_rgb
from .captions import with_trigger
from .scan import scan


class Captioner(Protocol):
    name: str

    def caption(self, images: list) -> list[str]:
        """One caption per PIL image."""


class TransformersCaptioner:
    """BLIP-style image-to-text models through transformers' pipeline (for example a local BLIP folder)."""

    def __init__(self, model: str, device: str | None = None):
        from transformers import pipeline

        self.name = model
        self._pipe = pipeline("image-to-text", model=model, device=device)

    def caption(self, images: list) -> list[str]:
        return [out[0]["generated_text"].strip() for out in self._pipe(images)]


def caption_dataset(dataset: str | Path, captioner: Captioner, trigger: str = "", overwrite: bool = False,
                    batch_size: int = 8, progress=None) -> int:
    """Caption images that have none (or all, with overwrite); returns how many captions were written."""
    items = [i for i in scan(dataset).items if overwrite or not i.caption]
    written = 0
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        texts = captioner.caption([open_rgb(i.image) for i in batch])
        for item, text in zip(batch, texts):
            set_caption(item.image, with_trigger(text, trigger))
            written += 1
        if progress:
            progress(written, len(items))
    return written
