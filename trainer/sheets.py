"""Labelled image sheets, torch-free: the Preview tab's compare and X/Y grids and a run's checkpoint grid
(samples/checkpoints.png) are drawn by `grid`."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

CELL_MIN = 192  # tiny 64 px images are enlarged (nearest neighbour, so crisp) until a cell is readable
BAND = 16  # the smallest label strip above each cell; it grows with the cell so labels stay readable


def font(size: int):
    """A scalable font at `size` px (Pillow's own, no system font needed); its bitmap font where there is none."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def grid(images: list[Image.Image], labels: list[str], columns: int, cells: int | None = None,
         title: str = "") -> Image.Image:
    """A labelled sheet; with `cells` larger than the images given, the missing ones are grey placeholders. Labels
    are about a twelfth of a cell high (the fixed 6 px bitmap font was unreadable); `title` names the axes."""
    w, h = images[0].size
    scale = max(1, CELL_MIN // w)
    cw, ch = w * scale, h * scale
    size = max(12, min(28, cw // 12))
    text = font(size)
    band = max(BAND, size + 8)
    lines = _wrapped(title, text, columns * cw - 8) if title else []
    head = len(lines) * (size + 6) + 6 if lines else 0
    cells = max(cells or 0, len(images))
    rows = (cells + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cw, head + rows * (ch + band)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, line in enumerate(lines):
        draw.text((4, 4 + k * (size + 6)), line, fill="black", font=text)
    for i in range(cells):
        x, y = (i % columns) * cw, head + (i // columns) * (ch + band)
        if i < len(images):
            sheet.paste(images[i].resize((cw, ch), Image.NEAREST), (x, y + band))
        else:
            draw.rectangle((x + 1, y + band + 1, x + cw - 2, y + band + ch - 2), fill="#e5e7eb")
        label = labels[i] if i < len(labels) else ""
        while label and draw.textlength(label, font=text) > cw - 6:  # fit the cell: cut with an ellipsis
            label = label[:-2] + "…" if len(label) > 2 else ""
        draw.text((x + 3, y + 3), label, fill="black", font=text)
    return sheet


def _wrapped(text: str, face, width: int) -> list[str]:
    """`text` in lines no wider than `width` px, broken between words."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, line = [], ""
    for word in text.split(" "):
        trial = f"{line} {word}".strip()
        if line and probe.textlength(trial, font=face) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])
