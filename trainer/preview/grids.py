"""Compare and X/Y grids, torch-free: which cells a grid has, and the sheet that shows them. The preview
worker renders cells; the app assembles the sheet as cells finish, so a grid fills in while it renders."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

CELL_MIN = 192  # tiny 64 px images are enlarged (nearest neighbour, so crisp) until a cell is readable
BAND = 16  # the label strip above each cell


def compare_cells(loras: list[dict]) -> list[tuple[str, list[dict]]]:
    """Base, each enabled LoRA alone, and (with more than one) the mix, at one seed."""
    enabled = [s for s in loras if s.get("enabled", True)]
    cells = [("base", [])] + [(f"{Path(s['path']).stem} @ {s['weight']:g}", [s]) for s in enabled]
    if len(enabled) > 1:
        cells.append(("mix", enabled))
    return cells


def xy_cells(loras: list[dict], xs: list[float], ys: list[float]) -> list[tuple[str, list[dict]]]:
    """The first two enabled LoRAs at every (x, y) weight pair, row by row."""
    enabled = [s for s in loras if s.get("enabled", True)]
    if len(enabled) < 2:
        raise ValueError("an X/Y grid needs two enabled LoRAs")
    a, b = enabled[:2]
    return [(f"{x:g} / {y:g}", [{"path": a["path"], "weight": x}, {"path": b["path"], "weight": y}])
            for y in ys for x in xs]


def grid(images: list[Image.Image], labels: list[str], columns: int, cells: int | None = None) -> Image.Image:
    """A labelled sheet; with `cells` larger than the images given, the missing ones are grey placeholders."""
    w, h = images[0].size
    scale = max(1, CELL_MIN // w)
    cw, ch = w * scale, h * scale
    cells = max(cells or 0, len(images))
    rows = (cells + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cw, rows * (ch + BAND)), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(cells):
        x, y = (i % columns) * cw, (i // columns) * (ch + BAND)
        if i < len(images):
            sheet.paste(images[i].resize((cw, ch), Image.NEAREST), (x, y + BAND))
        else:
            draw.rectangle((x + 1, y + BAND + 1, x + cw - 2, y + BAND + ch - 2), fill="#e5e7eb")
        draw.text((x + 3, y + 2), labels[i][:40] if i < len(labels) else "", fill="black")
    return sheet


def checkpoint_cells(checkpoints: list[str], weights: list[float]) -> list[tuple[str, list[dict]]]:
    """A run's checkpoints (rows, in training order) at each weight (columns), one LoRA at a time."""
    def when(path: str) -> str:  # "name-step000300" -> "step 300"; the run's own file is the final one
        tail = Path(path).stem.rsplit("-", 1)[-1]
        for word in ("step", "epoch"):
            if tail.startswith(word) and tail[len(word):].isdigit():
                return f"{word} {int(tail[len(word):])}"
        return "final"

    return [(f"{when(path)} @ {w:g}", [{"path": path, "weight": w}]) for path in checkpoints for w in weights]
