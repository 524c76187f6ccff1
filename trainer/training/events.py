"""The run folder's event log (`events.jsonl`) and its STOP file: the only channel to the app."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

STOP_FILE = "STOP"
EVENTS_FILE = "events.jsonl"


class Events:
    """Appends one JSON object per line. Only the writing process (rank 0) gets enabled=True."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.started = time.monotonic()
        self._last_step: float | None = None
        self._step_s: float | None = None  # moving average of the time between steps
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    @property
    def progress(self):
        """The run's phases as progress events (trainer/progress.py), with a heartbeat while one is open."""
        if getattr(self, "_progress", None) is None:
            from trainer.progress import Progress

            self._progress = Progress(lambda e: self.emit("progress", **e))
        return self._progress

    def close(self) -> None:
        if getattr(self, "_progress", None) is not None:
            self._progress.close()

    def emit(self, type: str, **fields) -> dict:
        event = {"type": type, "time": round(time.time(), 3), **{k: _clean(v) for k, v in fields.items()}}
        if self.enabled:
            with open(self.run_dir / EVENTS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(event) + "\n")
                f.flush()
        return event

    def step(self, step: int, total: int, loss: float, lr: float, epoch: int) -> dict:
        """The ETA comes from the time between steps (a moving average), not from the start: loading the
        model and filling caches made early ETAs of a CPU run several times too long."""
        now = time.monotonic()
        if self._last_step is not None:
            gap = now - self._last_step
            self._step_s = gap if self._step_s is None else 0.8 * self._step_s + 0.2 * gap
        self._last_step = now
        eta = self._step_s * (total - step) if self._step_s is not None else None
        return self.emit("step", step=step, total=total, loss=loss, lr=lr, epoch=epoch,
                         elapsed_s=round(now - self.started, 2), eta_s=None if eta is None else round(eta, 1))

    def stop_requested(self) -> bool:
        return (self.run_dir / STOP_FILE).exists()

    def clear_stop(self) -> None:
        if self.enabled:
            (self.run_dir / STOP_FILE).unlink(missing_ok=True)

    def clear_stale_stop(self) -> None:
        """A STOP file older than this process was left by an earlier run (crashed or killed) and goes; one written
        since (a Stop pressed while this run was queued or loading) is this run's, and every phase honours it."""
        if not self.enabled:
            return
        import psutil

        stop = self.run_dir / STOP_FILE
        try:
            if stop.stat().st_mtime < psutil.Process().create_time():
                stop.unlink(missing_ok=True)
        except FileNotFoundError:
            pass


def _clean(v):
    # JSON has no NaN: a non-finite loss is written as null plus the event's own message.
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Path):
        return str(v)
    return v


def read_events(run_dir: str | Path) -> list[dict]:
    """Every complete line of events.jsonl; a half-written last line is skipped."""
    path = Path(run_dir) / EVENTS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
