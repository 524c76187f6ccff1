"""Image decoding shared by training, import and captioning (torch-free)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def open_rgb(path: Path, background=(255, 255, 255)) -> Image.Image:
    """Open an image upright in RGB; transparency is composited on `background`."""
    with Image.open(path) as im:
        im.seek(0)  # first frame of animations
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
            im = im.convert("RGBA")
            canvas = Image.new("RGB", im.size, background)
            canvas.paste(im, mask=im.getchannel("A"))
            return canvas
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float32)
            arr = (arr / max(1.0, arr.max()) * 255.0).clip(0, 255).astype(np.uint8)
            return Image.fromarray(arr).convert("RGB")
        return im.convert("RGB")
