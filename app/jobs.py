"""Training runs as subprocesses, one at a time, tracked through their run folders.

Each run folder holds `config.toml` (in), `events.jsonl`, samples and LoRAs (out, written by the
trainer) and `job.json` (ours: queued/running, the pid, the command). A run's state is always
derived from those files, so a page reload or an app restart shows the same thing, and a run whose
process died is reported failed instead of running forever.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer.atomic import write_text
from trainer.training.events import STOP_FILE, read_events
from trainer.training.state_files import latest as latest_state

from . import portable
from .trainer_cli import command

JOB_FILE = "job.json"
LOG_FILE = "trainer.log"
ACTIVE = ("queued", "running", "stopping")


@dataclass
class RunView:
    name: str
    state: str  # queued, running, stopping, finished, stopped, failed, cancelled
    message: str = ""
    step: int = 0
    total: int = 0
    eta_s: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # the held-out loss (trainer/training/validation.py)
    samples: list[tuple[str, str]] = field(default_factory=list)  # (image, "step N: prompt")
    lora: str | None = None
    log_tail: str = ""
    command: str = ""
    queue_position: int = 0
    phase: str = ""  # "end samples": stopped and saved, rendering the end samples (a second Stop skips them)
    recommendation: dict | None = None  # the checkpoint to keep and why (trainer/training/validation.py recommend)
    plan: str = ""  # the memory plan the trainer chose, in one line
    checkpoints: list[dict] = field(default_factory=list)  # checkpoint events: step, validation_loss, drift, path
    alert: str = ""  # a warning the run's page shows above all else (VRAM spilling into system memory)
    notes: list = field(default_factory=list)  # the run's other warnings, each once, in order
    progress: dict | None = None  # the open phase: {"phase", "done", "total", "started", "time"} (trainer/progress.py)
    ahead: dict | None = None  # latents encoded during training (cache-ahead), likewise


def train_command(run_dir: Path, resume: bool = False) -> list[str]:
    cmd = command("train", "--config", str(run_dir / "config.toml"), "--output", str(run_dir))
    return cmd + (["--resume", str(run_dir)] if resume else ["--force"])


def cli_equivalent(run_dir: Path, resume: bool = False) -> str:
    """The command a user types to do the same from a terminal: through launch.py when the app was started by it
    (lora-studio is in .venv, not on the PATH of a new user's terminal)."""
    launcher = os.environ.get("LORA_STUDIO_LAUNCHER")
    start = [("py" if portable.WINDOWS else "python"), launcher] if launcher else ["lora-studio"]
    cmd = [*start, "train", "--config", str(run_dir / "config.toml"), "--output", str(run_dir)]
    return quote_command(cmd + (["--resume", str(run_dir)] if resume else []))


def quote_command(cmd: list[str], windows: bool = portable.WINDOWS) -> str:
    """`cmd` as the user's shell reads it: cmd.exe's quoting on Windows, POSIX shell quoting elsewhere."""
    return subprocess.list2cmdline(cmd) if windows else shlex.join(cmd)


def read_job(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / JOB_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_job(run_dir: Path, job: dict) -> None:
    write_text(run_dir / JOB_FILE, json.dumps(job, indent=1))


def pid_alive(pid: int | None, run_dir: Path) -> bool:
    """True when `pid` is still our trainer for `run_dir` (a recycled pid does not count)."""
    return portable.running_with(pid, str(run_dir))


def tail(path: Path, lines: int = 30) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 16384))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    # tqdm redraws with carriage returns; only the last redraw of each line matters.
    return "\n".join(line.split("\r")[-1] for line in text.splitlines()[-lines:])


def sample_label(e: dict) -> str:
    """What a sample shows under it: the step it was made at and its prompt (a grid: what it holds)."""
    prompt = e.get("prompt") or ""
    return f"step {e.get('step')}: {prompt[:80]}{'…' if len(prompt) > 80 else ''}"


def view(run_dir: Path, alive=pid_alive) -> RunView:
    """Everything the Train tab shows about one run, from its folder."""
    job, events = read_job(run_dir), read_events(run_dir)
    v = RunView(run_dir.name, job.get("state", "unknown"), command=cli_equivalent(run_dir, job.get("resume", False)))
    since = job.get("queued_at", 0)  # a resumed run's folder also holds the previous attempt's end
    for e in events:
        if e.get("type") in ("done", "error", "end_samples", "recommendation") and e.get("time", since) < since:
            continue
        t = e.get("type")
        if t == "start":
            v.total = e.get("total", 0)
        elif t == "step":
            v.step, v.total, v.eta_s = e["step"], e.get("total", v.total), e.get("eta_s")
            if v.progress and v.progress.get("phase") == "caching latents":  # cache-ahead: caching goes on beside
                v.ahead, v.progress = v.progress, None
            if e.get("loss") is not None:
                v.losses.append((e["step"], e["loss"]))
        elif t == "validation" and e.get("loss") is not None:
            v.val_losses.append((e["step"], e["loss"]))
        elif t == "checkpoint":
            v.checkpoints = [c for c in v.checkpoints if c.get("step") != e.get("step")] + [e]  # a resume redoes one
        elif t == "plan":
            v.plan = e.get("text", "")
        elif t == "warning" and e.get("kind") == "vram_spill":
            v.alert = e.get("message", "")
        elif t == "warning" and e.get("message") and e["message"] not in v.notes:
            v.notes.append(e["message"])
        elif t == "progress":
            slot = "ahead" if e.get("phase") == "caching latents" and v.step else "progress"
            current = getattr(v, slot)
            if e.get("finished"):
                setattr(v, slot, None)
            else:
                started = current["started"] if current and current["phase"] == e.get("phase") else e.get("time", 0)
                setattr(v, slot, {**e, "started": started})
        elif t == "recommendation":
            figures = next((c for c in v.checkpoints if c.get("step") == e.get("step")), {})
            v.recommendation = {**figures, **e}
        elif t == "sample" and e.get("path"):
            v.samples.append((e["path"], sample_label(e)))
        elif t == "end_samples":
            v.phase, v.message = "end samples", e.get("message", "")
        elif t == "end_skipped":
            v.phase, v.message = "", e.get("message", "")
        elif t == "done":
            v.state, v.lora = ("stopped" if e.get("stopped") else "finished"), e.get("path")
            v.message = e.get("message") or f"{v.state} after {e.get('step', v.step)} steps"
        elif t == "error":
            v.state, v.message = "failed", e.get("message", "")
    v.log_tail = tail(run_dir / LOG_FILE)
    if v.state in ("running", "stopping") and not alive(job.get("pid"), run_dir):
        v.state = "failed"
    if v.state == "failed" and not v.message:
        last = [line for line in v.log_tail.splitlines() if line.strip()]
        code = f" (exit code {job['returncode']})" if job.get("returncode") is not None else ""
        v.message = f"the trainer process ended without finishing{code}" + (f": {last[-1]}" if last else "")
    return v


class JobRunner:
    """Starts queued runs one at a time. `tick()` does one round; `start()` runs it on a thread."""

    def __init__(self, runs_dir: Path, python: str = sys.executable, poll_s: float = 1.0, cwd: Path | None = None):
        self.runs_dir = Path(runs_dir)
        self.python, self.poll_s, self.cwd = python, poll_s, cwd
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self._pauses = 0  # preview renders in progress; while > 0 our training child is stopped
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ---- public ------------------------------------------------------------------------------
    def submit(self, name: str, config_text: str, resume: bool = False) -> RunView:
        run_dir = self.runs_dir / name
        with self.lock:
            self._reap()
            if resume:
                if self.is_active(run_dir):
                    raise RuntimeError(f"run {name} is already {read_job(run_dir).get('state')}")
                if latest_state(run_dir) is None:  # refused now, not by the trainer seconds later
                    raise RuntimeError(f"run {name} has no saved state to resume from (states are saved every "
                                       "save.state_every_n_steps steps and on Stop); start it again instead")
                self._settle(name)
            else:
                if run_dir.exists() and any(run_dir.iterdir()):
                    raise FileExistsError(f"run {name} already exists; pick another name")
                run_dir.mkdir(parents=True, exist_ok=True)
                write_text(run_dir / "config.toml", config_text)
            (run_dir / STOP_FILE).unlink(missing_ok=True)
            write_job(run_dir, {"state": "queued", "queued_at": time.time(), "resume": resume,
                                "command": cli_equivalent(run_dir, resume)})
        self.tick()
        return self.view(name)

    def stop(self, name: str) -> str:
        """Ask a run to save and stop (a second press changes nothing, except that it skips the end samples a
        stopped run renders after saving); cancel it if queued."""
        run_dir = self.runs_dir / name
        with self.lock:
            self._reap()
            job = read_job(run_dir)
            current = view(run_dir, self._alive)
            state = current.state
            if state == "queued":
                job["state"] = "cancelled"
                write_job(run_dir, job)
                return f"{name}: cancelled before it started"
            if state in ("running", "stopping"):
                (run_dir / STOP_FILE).touch()
                job["state"] = "stopping"
                write_job(run_dir, job)
                if current.phase == "end samples":
                    return f"{name}: skipping the rest of the end samples"
                return f"{name}: stopping; the LoRA is saved after the current step"
            return f"{name} is {state}; nothing to stop"

    def view(self, name: str) -> RunView:
        with self.lock:
            # A process can end between two ticks; record its exit code before anyone reads the run.
            self._reap()
        v = view(self.runs_dir / name, self._alive)
        if v.state == "running" and self._pauses and name in self.procs:
            v.message = "paused while Preview renders; it continues by itself"
        if v.state == "queued":
            queue = self.queued()
            v.queue_position = queue.index(name) + 1 if name in queue else 0
            running = self.running()
            v.message = f"queued (#{v.queue_position}), waiting for {running}" if running else "queued"
        return v

    def queued(self) -> list[str]:
        runs = [(read_job(d).get("queued_at", 0), d.name) for d in self._run_dirs() if read_job(d).get("state") == "queued"]
        return [n for _, n in sorted(runs)]

    def running(self) -> str | None:
        for d in self._run_dirs():
            if read_job(d).get("state") in ("running", "stopping") and view(d, self._alive).state in ("running", "stopping"):
                return d.name
        return None

    @contextlib.contextmanager
    def paused(self):
        """Pause the training run this runner started (the trainer and every process under it, suspended through
        psutil on any OS) for the duration, so something the user waits for (a preview) gets the CPU or GPU;
        nested uses pause once."""
        with self.lock:
            self._pauses += 1
            if self._pauses == 1:
                self._each_child(portable.suspend)
        try:
            yield
        finally:
            with self.lock:
                self._pauses -= 1
                if self._pauses == 0:
                    self._each_child(portable.resume)

    def _each_child(self, action) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                action(proc.pid)

    def active_runs(self) -> list[str]:
        """Runs whose trainer is alive now (they keep going when the app closes)."""
        with self.lock:
            self._reap()
            return [d.name for d in self._run_dirs() if view(d, self._alive).state in ("running", "stopping")]

    def is_active(self, run_dir: Path) -> bool:
        return view(run_dir, self._alive).state in ACTIVE

    def start(self) -> "JobRunner":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lora-studio-jobs", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    # ---- the one round ------------------------------------------------------------------------
    def tick(self) -> None:
        with self.lock:
            self._reap()
            if self.running() is None:
                queue = self.queued()
                if queue:
                    self._launch(queue[0])

    def _reap(self) -> None:
        for name, proc in list(self.procs.items()):
            if proc.poll() is not None:
                self._finish(name, proc.returncode)

    def _settle(self, name: str) -> None:
        """A run that wrote its end but whose process has not exited yet is waited for and reaped now: reaped after
        the resume's job was written, its exit was recorded over that job, and the resume showed as failed ("ended
        without finishing (exit code 0)"; a Resume pressed within a second of the end, seen under load)."""
        proc = self.procs.get(name)
        if proc is not None:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"run {name} is still finishing; try again in a moment") from None
            self._finish(name, proc.returncode)

    def _launch(self, name: str) -> None:
        run_dir = self.runs_dir / name
        job = read_job(run_dir)
        cmd = train_command(run_dir, job.get("resume", False))
        cmd[0] = self.python
        with open(run_dir / LOG_FILE, "ab") as log:
            # Detached: a crash, Ctrl-C or closed console of the UI does not take the training down with it.
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.cwd, **portable.detached())
        portable.lower_priority(proc.pid)  # a CPU run must not starve the page that watches it
        self.procs[name] = proc
        job.update(state="running", pid=proc.pid, started_at=time.time())
        write_job(run_dir, job)

    def _finish(self, name: str, returncode: int) -> None:
        run_dir = self.runs_dir / name
        self.procs.pop(name, None)
        job = read_job(run_dir)
        v = view(run_dir, lambda pid, d: False)
        job.update(state=v.state if v.state not in ACTIVE else "failed", returncode=returncode, ended_at=time.time())
        write_job(run_dir, job)

    def _alive(self, pid, run_dir: Path) -> bool:
        proc = self.procs.get(run_dir.name)
        if proc is not None and proc.pid == pid:
            # Our own child counts as running until it is reaped, so its end always comes with its exit code.
            return True
        return pid_alive(pid, run_dir)

    def _run_dirs(self) -> list[Path]:
        return sorted(d for d in self.runs_dir.iterdir() if d.is_dir()) if self.runs_dir.is_dir() else []

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.tick()
            except Exception as e:  # the runner must outlive any one broken run folder
                print(f"lora-studio: job runner: {e}", file=sys.stderr)
