"""Aspect-ratio buckets: sizes near resolution² in steps, and the crop that fits an image to one."""
from __future__ import annotations

import math


def make_buckets(resolution: int, step: int = 64, min_side: int = 256, max_side: int = 2048) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of `step`, with area at most resolution²."""
    if step % 8:
        raise ValueError(f"bucket step {step} must be a multiple of 8 (the VAE downsamples by 8)")
    res = max(step, resolution // step * step)
    min_side = max(step, min(min_side, res) // step * step)
    max_side = max(res, max_side // step * step)
    area = res * res
    buckets = {(res, res)}
    w = min_side
    while w <= max_side and w * min_side <= area:  # wider than this cannot keep the area at min height
        h = min(max_side, area // w // step * step)
        buckets.add((w, h))
        buckets.add((h, w))
        w += step
    return sorted(buckets)


def choose_bucket(width: int, height: int, buckets: list[tuple[int, int]], no_upscale: bool = False,
                  step: int = 64) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's; never zero-sized."""
    width, height = max(1, width), max(1, height)
    aspect = math.log(width / height)
    candidates = buckets
    if no_upscale:
        candidates = [(w, h) for w, h in buckets if w <= width and h <= height]
        if not candidates:
            # Smaller than every bucket: its own size rounded down to the step, at least one step.
            return max(step, width // step * step), max(step, height // step * step)
    return min(candidates, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def fit(width: int, height: int, bucket: tuple[int, int], crop_x: float = 0.5, crop_y: float = 0.5):
    """Scale to cover the bucket, then crop. Returns (scaled size, crop box left/top/right/bottom)."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    sw, sh = max(bw, round(width * scale)), max(bh, round(height * scale))
    left, top = round((sw - bw) * crop_x), round((sh - bh) * crop_y)
    return (sw, sh), (left, top, left + bw, top + bh)
