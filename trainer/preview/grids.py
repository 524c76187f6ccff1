"""Compare and X/Y grids, torch-free: which cells a grid has; the sheet that shows them is trainer.sheets.grid. The
preview worker renders cells; the app assembles the sheet as cells finish, so a grid fills in while it renders."""
from __future__ import annotations

from pathlib import Path

from trainer.sheets import BAND, CELL_MIN, grid  # noqa: F401  (the sheet the app assembles as cells finish)


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
    return [(f"X {x:g} · Y {y:g}", [{"path": a["path"], "weight": x}, {"path": b["path"], "weight": y}])
            for y in ys for x in xs]


def xy_title(loras: list[dict]) -> str:
    """The axes of an X/Y grid, named: which LoRA each weight belongs to."""
    a, b = [s for s in loras if s.get("enabled", True)][:2]
    return f"X: {Path(a['path']).stem} weight (columns)  ·  Y: {Path(b['path']).stem} weight (rows)"


def checkpoint_cells(checkpoints: list[str], weights: list[float]) -> list[tuple[str, list[dict]]]:
    """A run's checkpoints (rows, in training order) at each weight (columns), one LoRA at a time."""
    def when(path: str) -> str:  # "name-step000300" -> "step 300"; the run's own file is the final one
        tail = Path(path).stem.rsplit("-", 1)[-1]
        for word in ("step", "epoch"):
            if tail.startswith(word) and tail[len(word):].isdigit():
                return f"{word} {int(tail[len(word):])}"
        return "final"

    return [(f"{when(path)} @ {w:g}", [{"path": path, "weight": w}]) for path in checkpoints for w in weights]
