"""Read a 64 px shape-world image back: background, foreground mask, colour name and shape.

Used to judge whether the tiny model follows prompts ("a small red circle ..." must show a red
circle) and by the LoRA scores. Deliberately simple: per-row background from the image borders,
the largest blob that differs from it, nearest palette colour, and the blob's fill of its box.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .shapes import COLOURS, SHAPES

FOREGROUND_DISTANCE = 60.0  # RGB distance from the row's background that counts as foreground
_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _PALETTE_NAMES], dtype=np.float32)


@dataclass
class Reading:
    mask: np.ndarray  # bool HxW, the largest foreground blob
    colour: str | None
    background: str
    shape: str | None
    fill: float  # blob area / bounding-box area

    @property
    def found(self) -> bool:
        return self.colour is not None


def nearest_colour(rgb) -> str:
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE - np.asarray(rgb, np.float32)) ** 2).sum(-1)))]


def as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return np.asarray(image, dtype=np.float32)


def row_background(img: np.ndarray) -> np.ndarray:
    """Background colour per row, from the two outermost columns on each side (gradients are vertical)."""
    border = np.concatenate([img[:, :2], img[:, -2:]], axis=1)
    return np.median(border, axis=1)


def largest_blob(mask: np.ndarray) -> np.ndarray:
    seen = np.zeros_like(mask)
    best: list = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        blob, queue = [], deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            blob.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(blob) > len(best):
            best = blob
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def foreground(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(largest foreground blob, distance of every pixel from its row background)."""
    dist = np.sqrt(((img - row_background(img)[:, None, :]) ** 2).sum(-1))
    return largest_blob(dist > FOREGROUND_DISTANCE), dist


def classify_shape(mask: np.ndarray) -> tuple[str | None, float]:
    ys, xs = np.nonzero(mask)
    if len(ys) < 12:
        return None, 0.0
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(ys) / float(h * w)
    top = (ys < ys.min() + h / 2).sum()
    bottom = len(ys) - top
    if fill < 0.66 and top < 0.7 * bottom:
        return "triangle", fill
    if fill > 0.88:
        return "square", fill
    if fill > 0.66:
        return "circle", fill
    return None, fill


def read(image) -> Reading:
    img = as_array(image)
    mask, dist = foreground(img)
    bg = nearest_colour(row_background(img)[0])
    if mask.sum() < 12:
        return Reading(mask, None, bg, None, 0.0)
    # The colour from the blob's core, away from anti-aliased or blurred edges.
    core = mask & (dist >= np.percentile(dist[mask], 50))
    colour = nearest_colour(np.median(img[core], axis=0))
    shape, fill = classify_shape(mask)
    return Reading(mask, colour, bg, shape, fill)


def follows(image, shape: str, colour: str) -> bool:
    """True when the image shows a `colour` `shape` (the checker for prompt following)."""
    r = read(image)
    return r.shape == shape and r.colour == colour


assert set(SHAPES) <= {"circle", "square", "triangle"}, "classify_shape knows only these shapes"
