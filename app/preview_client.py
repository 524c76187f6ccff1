"""Talks to the preview worker (`python -m trainer.preview_worker`), which keeps the pipeline and the
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

    def _ensure(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            log = open(self.out_dir / "worker.log", "ab")
            self.proc = subprocess.Popen([sys.executable, "-m", "trainer.preview_worker", "--out", str(self.out_dir)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                         bufsize=1)
        return self.proc

    def call(self, op: str, **fields) -> dict:
        with self.lock:
            proc = self._ensure()
            try:
                proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
            except (BrokenPipeError, OSError):
                line = ""
            if not line:
                self.proc = None
                raise PreviewError("the preview worker stopped; see preview/worker.log. Press Generate to restart it")
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
