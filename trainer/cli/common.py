"""What the commands share: one JSON object or lines on stdout, progress on stderr."""
from __future__ import annotations

import json


class _Said:
    """A long command's progress on stderr ("lora-studio: importing: 340 / 1000"), at most every 2 s and at its end;
    stdout keeps only the result (one JSON object with --json)."""

    def __init__(self, phase: str):
        from trainer.progress import Progress, printer

        self.phase, self.started = phase, False
        self.progress = Progress(printer("lora-studio: "), every_s=2.0, heartbeat_s=float("inf"))

    def __call__(self, done: int, total: int | None = None) -> None:
        if not self.started:
            self.progress.start(self.phase, total)
            self.started = True
        self.progress.update(done, total)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.started:
            self.progress.finish()


def _emit(args, data: dict, text_lines: list[str]) -> None:
    print(json.dumps(data, ensure_ascii=False) if args.json else "\n".join(text_lines))
