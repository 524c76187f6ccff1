"""Labelled image sheets, torch-free: the Preview tab's compare and X/Y grids and a run's checkpoint grid
(samples/checkpoints.png) are drawn by `grid`."""
from __future__ import annotations

from PIL import Image, ImageDraw

CELL_MIN = 192  # tiny 64 px images are enlarged (nearest neighbour, so crisp) until a cell is readable
BAND = 16  # the label strip above each cell


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
