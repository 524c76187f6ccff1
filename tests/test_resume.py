"""Exact resume: a run killed with SIGKILL, then resumed from its latest complete state, writes the
same LoRA bytes as an uninterrupted run. Incomplete states (a kill mid-save) are ignored."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_dataset, tiny_config
from trainer.training import state
from trainer.config import RunConfig
from trainer.training.loop import TrainingError, train

STEPS = 30
SETTINGS = dict(**{"train.max_steps": STEPS, "save.state_every_n_steps": 4, "save.keep_states": 2,
                   "data.shuffle_tags": True, "data.caption_dropout": 0.3, "train.noise_offset": 0.05,
                   "sample.at_end": False, "lora.dropout": 0.1, "optim.scheduler": "cosine"})


def steps_done(run: Path) -> int:
    try:
        lines = (run / "events.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max([json.loads(x)["step"] for x in lines if '"type": "step"' in x] or [0])


def kill_at(cfg: RunConfig, run: Path, at_step: int) -> int:
    run.mkdir(parents=True)
    (run / "in.toml").write_text(cfg.to_toml())
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "train", "--config", str(run / "in.toml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while steps_done(run) < at_step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    return steps_done(run)


def test_sigkill_then_resume_is_bit_identical(tiny_models, tmp_path):
    data = make_dataset(tmp_path / "data", n=6)
    ref = train(tiny_config(tiny_models["sd1"], data, tmp_path / "ref" / "run", **SETTINGS))
    reference = ref.lora_path.read_bytes()

    for at in (5, 14):  # between saves, and later with older states already rotated out
        run = tmp_path / f"kill{at}" / "run"
        killed_after = kill_at(tiny_config(tiny_models["sd1"], data, run, **SETTINGS), run, at)
        assert killed_after < STEPS and not (run / "run.safetensors").exists()
        latest = state.latest(run)
        assert latest is not None and len(state.folders(run)) <= 2
        # A kill during a later save leaves a temp folder and maybe a folder without its marker.
        (run / "state" / ".tmp-step-000999").mkdir()
        (run / "state" / ".tmp-step-000999" / "lora.safetensors").write_bytes(b"half")
        (run / "state" / "step-000998").mkdir()
        assert state.latest(run) == latest

        result = train(RunConfig.load(run / "config.toml"), resume=True)
        assert result.steps == STEPS
        events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
        resumed = [e for e in events if e["type"] == "resumed"]
        assert resumed and resumed[-1]["step"] == int(latest.name.split("-")[1]) > 0
        assert result.lora_path.read_bytes() == reference


def test_resume_without_state_says_so(tiny_models, tmp_path):
    data = make_dataset(tmp_path / "data", n=2)
    cfg = tiny_config(tiny_models["sd1"], data, tmp_path / "run")
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(cfg, resume=True)


def test_stop_saves_a_state_that_resumes_exactly(tiny_models, tmp_path):
    data = make_dataset(tmp_path / "data", n=4)
    settings = {**SETTINGS, "train.max_steps": 10, "save.state_every_n_steps": 0}
    ref = train(tiny_config(tiny_models["sd1"], data, tmp_path / "a" / "run", **settings)).lora_path.read_bytes()
    run = tmp_path / "b" / "run"
    cfg = tiny_config(tiny_models["sd1"], data, run, **settings)
    from trainer.training.events import Events

    class StopAt(Events):  # presses Stop after step 3, as the UI's Stop button does
        def step(self, step, *a, **k):
            if step == 3:
                (self.run_dir / "STOP").touch()
            return super().step(step, *a, **k)

    first = train(cfg, events=StopAt(run))
    assert first.stopped_early and first.steps == 3 and state.latest(run).name == "step-000003"
    second = train(RunConfig.load(run / "config.toml"), resume=True)
    assert second.steps == 10 and second.lora_path.read_bytes() == ref


def test_out_of_memory_gives_tier_advice(tiny_models, tmp_path, monkeypatch):
    import torch

    data = make_dataset(tmp_path / "data", n=2)
    cfg = tiny_config(tiny_models["sd1"], data, tmp_path / "run")
    calls = {"n": 0}
    real = torch.nn.functional.mse_loss

    def oom_on_second_step(*a, **k):  # what the CUDA allocator raises when a step does not fit
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **k)

    monkeypatch.setattr("trainer.training.step.F.mse_loss", oom_on_second_step)
    with pytest.raises(TrainingError, match=r"out of GPU memory at step 1 .*VRAM tier"):
        train(cfg)


def test_disk_full_during_save_keeps_the_previous_file(tiny_models, tmp_path, monkeypatch):
    import errno

    data = make_dataset(tmp_path / "data", n=2)
    run = tmp_path / "run"
    first = train(tiny_config(tiny_models["sd1"], data, run, **{"sample.at_end": False}))
    before = first.lora_path.read_bytes()

    real_write = Path.write_bytes

    def disk_fills_halfway(self, data):  # the temp file gets half the bytes, then the disk is full
        if self.name.startswith(".run.safetensors."):
            with open(self, "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", disk_fills_halfway)
    with pytest.raises(TrainingError, match="No space left on device.*intact"):
        train(tiny_config(tiny_models["sd1"], data, run, **{"sample.at_end": False, "train.max_steps": 2}))
    assert first.lora_path.read_bytes() == before
    assert not list(run.glob(".run.safetensors.*"))  # no half-written temp file left behind


def test_non_finite_loss_stops_with_advice_and_keeps_the_last_good_lora(tiny_models, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    data = make_dataset(tmp_path / "data", n=2)
    cfg = tiny_config(tiny_models["sd1"], data, tmp_path / "run", **{
        "train.max_steps": 12, "save.every_n_steps": 2, "train.mixed_precision": "bf16"})
    calls = {"n": 0}
    real = torch.nn.functional.mse_loss

    def overflow_from_step_5(*a, **k):  # what an fp16 overflow looks like to the loop
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] >= 5 else out

    monkeypatch.setattr("trainer.training.step.F.mse_loss", overflow_from_step_5)
    with pytest.raises(TrainingError, match=r"NaN/inf at step 7 .*lower optim.lr.*last saved LoRA is kept"):
        train(cfg)
    kept = sorted((tmp_path / "run" / "checkpoints").glob("*.safetensors"))
    assert [p.name[-23:] for p in kept] == ["-step000002.safetensors", "-step000004.safetensors", "-step000006.safetensors"]
    assert all(torch.isfinite(t).all() for t in load_file(kept[-1]).values())
