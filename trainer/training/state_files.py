"""Where a run keeps its resumable states, torch-free so the app can tell whether a run can resume."""
from __future__ import annotations

from pathlib import Path

STATE_DIR = "state"
COMPLETE = "COMPLETE"  # written last: a state folder without it was cut short (killed mid-save)


def folders(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / STATE_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / COMPLETE).exists())


def latest(run_dir: Path) -> Path | None:
    found = folders(run_dir)
    return found[-1] if found else None
