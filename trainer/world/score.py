"""Scores that say whether a LoRA taught the tiny model its sample dataset, and how much it
changed everything else.

- `similarity`: for each generated image, the best match among the dataset images by foreground
  colour histogram (palette bins) and box-normalised shape-mask IoU, averaged. Used for the
  character (its colours and silhouette).
- `silhouette`: the same with the shape mask only, for the concept (a star in any colour).
- `stripes`: how strongly the foreground alternates across the hatching's diagonal stripes, at
  their period. Flat fills, noise and shading score ~0.
- `drift`: mean absolute pixel difference (0..1) between base and LoRA images at the same prompts
  and seeds, for prompts without the trigger: negative transfer.
All are deterministic functions of the pixels.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from . import checker
from .shapes import COLOURS, HATCH_PERIOD

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
MASK_GRID = 16


def colour_histogram(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    pixels = img[mask]
    if len(pixels) == 0:
        return np.zeros(len(_PALETTE))
    nearest = ((pixels[:, None, :] - _PALETTE[None]) ** 2).sum(-1).argmin(1)
    hist = np.bincount(nearest, minlength=len(_PALETTE)).astype(np.float64)
    return hist / hist.sum()


def box_mask(mask: np.ndarray) -> np.ndarray:
    """The mask cropped to its bounding box and resized to a fixed grid: position and size drop out."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return np.zeros((MASK_GRID, MASK_GRID), bool)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    side = max(crop.shape)  # pad to a square so the aspect ratio survives
    square = np.zeros((side, side), np.uint8)
    oy, ox = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[oy:oy + crop.shape[0], ox:ox + crop.shape[1]] = crop * 255
    return np.asarray(Image.fromarray(square).resize((MASK_GRID, MASK_GRID), Image.BILINEAR)) > 127


def describe(image) -> tuple[np.ndarray, np.ndarray]:
    img = checker.as_array(image)
    mask, _ = checker.foreground(img)
    return colour_histogram(img, mask), box_mask(mask)


def _pair(a, b, colour_weight: float) -> float:
    hist = float(np.minimum(a[0], b[0]).sum())
    union = np.logical_or(a[1], b[1]).sum()
    iou = float(np.logical_and(a[1], b[1]).sum() / union) if union else 0.0
    return colour_weight * hist + (1 - colour_weight) * iou


def similarity(images, references, colour_weight: float = 0.5) -> float:
    refs = [describe(r) for r in references]
    return float(np.mean([max(_pair(describe(im), r, colour_weight) for r in refs) for im in images]))


def silhouette(images, references) -> float:
    """Shape-only similarity: the concept comes in every colour, so colour says nothing about it."""
    return similarity(images, references, colour_weight=0.0)


def stripe_strength(image) -> float:
    """How much more the foreground changes across the hatching (half a period along a row) than
    along it (the same distance down the stripes' diagonal). Diagonal stripes of the style's period
    score high; flat fills, noise, shading and bands in other directions score ~0."""
    img = checker.as_array(image)
    mask, _ = checker.foreground(img)
    h = HATCH_PERIOD // 2
    across = _change(img[:, :-h], img[:, h:], mask[:, :-h] & mask[:, h:])
    along = _change(img[h:, :-h], img[:-h, h:], mask[h:, :-h] & mask[:-h, h:])
    if across is None or along is None:
        return 0.0
    return float(np.clip((across - along) / 128.0, 0.0, 1.0))


def _change(a: np.ndarray, b: np.ndarray, both: np.ndarray) -> float | None:
    return float(np.abs(a - b).mean(-1)[both].mean()) if both.sum() >= 8 else None


def stripes(images, references=None) -> float:
    return float(np.mean([stripe_strength(im) for im in images]))


from trainer.training.validation import drift  # noqa: E402,F401  (the training core's; re-exported for bench learn)


SCORERS = {"character": similarity, "concept": silhouette, "style": stripes}
