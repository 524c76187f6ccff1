"""Progress as a contract: every long phase of a run says what it is doing, with a count, at least every few
seconds.

`Progress(emit)` writes `{"type": "progress", "phase": NAME, "done": N, "total": M}` events through `emit` (the run's
Events, or a printer for the CLI): when a phase starts, as it advances (at most every `every_s`, and always at its
end), and, while a phase is open, again every `heartbeat_s` from a small daemon thread, so a phase that cannot count
(loading a model of several GB) still shows it is alive. Torch-free.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

PHASES = ("loading", "scanning", "caching latents", "caching text", "validation", "samples", "end samples", "saving",
          "importing", "checking", "captioning", "baking")


class Progress:
    def __init__(self, emit, every_s: float = 1.0, heartbeat_s: float = 3.0, clock=time.monotonic):
        self._emit, self.every_s, self.heartbeat_s, self.clock = emit, every_s, heartbeat_s, clock
        self._lock = threading.Lock()
        self._current: dict | None = None
        self._last = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _send(self, event: dict) -> None:
        self._last = self.clock()
        self._emit(event)

    def start(self, phase: str, total: int | None = None) -> None:
        with self._lock:
            self._current = {"phase": phase, "done": 0, "total": total}
            self._send(dict(self._current))
        self._ensure_heartbeat()

    def update(self, done: int, total: int | None = None) -> None:
        with self._lock:
            if self._current is None:
                return
            self._current["done"] = done
            if total is not None:
                self._current["total"] = total
            at_end = self._current["total"] is not None and done >= self._current["total"]
            if at_end or self.clock() - self._last >= self.every_s:
                self._send(dict(self._current))

    def finish(self) -> None:
        with self._lock:
            if self._current is not None:
                total = self._current["total"]
                self._current["done"] = total if total is not None else self._current["done"]
                self._send({**self._current, "finished": True})
            self._current = None

    @contextmanager
    def phase(self, phase: str, total: int | None = None):
        """`with progress.phase("caching latents", 1000) as tick: ... tick(i + 1)`"""
        self.start(phase, total)
        try:
            yield self.update
        finally:
            self.finish()

    def close(self) -> None:
        self._stop.set()

    def _ensure_heartbeat(self) -> None:
        if self.heartbeat_s == float("inf"):
            return
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="lora-studio-progress", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s / 3):
            with self._lock:
                if self._current is not None and self.clock() - self._last >= self.heartbeat_s:
                    self._send(dict(self._current))


def printer(prefix: str, stream=None):
    """An emit for the CLI: one line per event on stderr ("importing: 340 / 1000")."""
    import sys

    stream = stream or sys.stderr

    def emit(event: dict) -> None:
        total = event.get("total")
        count = f"{event['done']} / {total}" if total is not None else f"{event['done']}"
        stream.write(f"{prefix}{event['phase']}: {count}{' (done)' if event.get('finished') else ''}\n")
        stream.flush()

    return emit
