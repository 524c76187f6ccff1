"""Talks to the preview worker (`python -m trainer.preview.worker`), which keeps the pipeline and the
loaded LoRAs warm. Started on first use; restarted if it dies. The UI process never imports torch."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path


class PreviewError(RuntimeError):
    pass


class PreviewClient:
    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self.started = False  # a reply came back from the current worker

    def _ensure(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            self.started = False
            self.out_dir.mkdir(parents=True, exist_ok=True)
            log = open(self.out_dir / "worker.log", "ab")
            self.proc = subprocess.Popen([sys.executable, "-m", "trainer.preview.worker", "--out", str(self.out_dir)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                         bufsize=1)
        return self.proc

    def call(self, op: str, on_progress=None, **fields) -> dict:
        """Send one request and wait for its reply; the worker's progress lines before it go to `on_progress`."""
        with self.lock:
            proc = self._ensure()
            if on_progress and not self.started:
                on_progress("starting the preview worker")
            try:
                proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
                proc.stdin.flush()
                while True:
                    line = proc.stdout.readline()
                    progress = json.loads(line).get("progress") if line.startswith('{"progress"') else None
                    if progress is None:
                        break
                    if on_progress:
                        on_progress(progress)
            except (BrokenPipeError, OSError):
                line = ""
            if not line:
                self.proc = None
                raise PreviewError("the preview worker stopped; see preview/worker.log. Press Generate to restart it")
            self.started = True
        reply = json.loads(line)
        if not reply.get("ok"):
            raise PreviewError(reply.get("error", "preview failed"))
        return reply

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
