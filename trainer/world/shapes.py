"""Scenes of simple shapes on plain or gradient backgrounds, rendered at 64 px, with captions.

The base world has three shapes, eight colours and two sizes. The sample datasets add what it
lacks: a named figure (`zorb`), a hatched rendering style and a new object (a star).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4  # drawn large and box-filtered down, so edges are anti-aliased like real images

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (15, 20), "large": (28, 36)}  # diameter range in pixels
# The `hatched` style's stripe period in pixels. The embedded model's f=4 VAE keeps about half the
# contrast of 16 px stripes through an encode and decode, a fifth at 12 px and none at 6 px, so a
# LoRA could not draw finer hatching however well it learned.
HATCH_PERIOD = 16


@dataclass(frozen=True)
class Scene:
    shape: str  # a base shape, or "star" / "zorb" for the sample datasets
    colour: str
    size: str
    background: str
    gradient: bool = False
    diameter: int = 24
    cx: float = 32.0
    cy: float = 32.0
    hatched: bool = False
    hatch_period: int = HATCH_PERIOD

    def caption(self) -> str:
        bg = f"{self.background} gradient" if self.gradient else self.background
        if self.shape == "zorb":
            return f"zorb, a {self.size} figure on a {bg} background"
        text = f"a {self.size} {self.colour} {self.shape} on a {bg} background"
        return f"hatched, {text}" if self.hatched else text


def random_scene(rng: random.Random, shapes=SHAPES, **fixed) -> Scene:
    """A scene drawn uniformly from the world; `fixed` pins any field (shape, colour, ...)."""
    shape = fixed.pop("shape", None) or rng.choice(shapes)
    colour = fixed.pop("colour", None) or rng.choice(list(COLOURS))
    size = fixed.pop("size", None) or rng.choice(list(SIZES))
    background = fixed.pop("background", None) or rng.choice([c for c in COLOURS if c != colour])
    gradient = fixed.pop("gradient", rng.random() < 0.5)
    lo, hi = SIZES[size]
    diameter = rng.randint(lo, hi)
    margin = diameter / 2 + 2
    cx = rng.uniform(margin, SIZE - margin)
    cy = rng.uniform(margin, SIZE - margin)
    return Scene(shape, colour, size, background, gradient, diameter, cx, cy, **fixed)


def background(scene: Scene) -> np.ndarray:
    """HxWx3 float background: plain, or a vertical gradient from the colour to a lighter tint."""
    base = np.array(COLOURS[scene.background], dtype=np.float32)
    img = np.broadcast_to(base, (SIZE, SIZE, 3)).copy()
    if scene.gradient:
        light = base + (255 - base) * 0.45
        t = np.linspace(0.0, 1.0, SIZE, dtype=np.float32)[:, None, None]
        img = base * (1 - t) + light * t
        img = np.broadcast_to(img, (SIZE, SIZE, 3)).copy()
    return img


def polygon(shape: str, cx: float, cy: float, d: float) -> list[tuple[float, float]] | None:
    r = d / 2
    if shape == "square":
        s = r * 0.86  # equal visual weight to the circle
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.42
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    return None


def shape_mask(shape: str, cx: float, cy: float, d: float) -> np.ndarray:
    """Anti-aliased coverage (0..1) of one shape on the 64 px canvas."""
    k = SUPERSAMPLE
    canvas = Image.new("L", (SIZE * k, SIZE * k), 0)
    draw = ImageDraw.Draw(canvas)
    pts = polygon(shape, cx * k, cy * k, d * k)
    if pts is None:  # circle
        r = d * k / 2
        draw.ellipse([cx * k - r, cy * k - r, cx * k + r, cy * k + r], fill=255)
    else:
        draw.polygon(pts, fill=255)
    return np.asarray(canvas.resize((SIZE, SIZE), Image.BOX), dtype=np.float32) / 255.0


def hatch_pattern(period: int) -> np.ndarray:
    """1 on diagonal stripes, 0 between them: the 'hatched' style's fill."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    return (((x + y) % period) < period / 2).astype(np.float32)


def layers(scene: Scene) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
    """(coverage, colour) pairs painted in order over the background."""
    if scene.shape == "zorb":
        # The character: a purple triangle body with a yellow circle head and a white eye.
        d, cx, cy = scene.diameter, scene.cx, scene.cy
        body = shape_mask("triangle", cx, cy + d * 0.18, d * 0.75)
        head = shape_mask("circle", cx, cy - d * 0.28, d * 0.45)
        eye = shape_mask("circle", cx + d * 0.06, cy - d * 0.3, d * 0.14)
        return [(body, COLOURS["purple"]), (head, COLOURS["yellow"]), (eye, COLOURS["black"])]
    cover = shape_mask(scene.shape, scene.cx, scene.cy, scene.diameter)
    colour = COLOURS[scene.colour]
    if scene.hatched:
        # Stripes of the colour alternating with a dark ink, clipped to the shape.
        ink = tuple(int(c * 0.25) for c in colour)
        stripes = hatch_pattern(scene.hatch_period)
        return [(cover, ink), (cover * stripes, colour)]
    return [(cover, colour)]


def render(scene: Scene) -> Image.Image:
    img = background(scene)
    for cover, colour in layers(scene):
        a = cover[..., None]
        img = img * (1 - a) + np.array(colour, dtype=np.float32) * a
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def with_shape(scene: Scene, **changes) -> Scene:
    return replace(scene, **changes)
