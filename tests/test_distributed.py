import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.events import read_events


@pytest.mark.timeout(300)
def test_two_process_accelerate_launch_on_cpu(tiny_models, dataset, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        accelerate = shutil.which("accelerate")
    out = tmp_path / "ddp"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "trainer", "train", "--model", str(tiny_models["sd1"]), "--dataset", str(dataset),
           "--output", str(out), "--set", "train.max_steps=4", "--set", "data.resolution=32",
           "--set", "data.bucket_step=8", "--set", "sample.steps=2"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = read_events(out)
    start = [e for e in events if e["type"] == "start"]
    done = [e for e in events if e["type"] == "done"]
    assert len(start) == 1 and start[0]["processes"] == 2        # rank 0 alone writes events
    assert len(done) == 1 and done[0]["ranks_in_sync"] is True   # DDP kept the replicas identical
    assert len([e for e in events if e["type"] == "step"]) == 4
    assert (out / "ddp.safetensors").exists()
    assert proc.stdout.count("done after 4 steps") == 1
    assert sorted(p.name for p in out.iterdir()) == ["config.toml", "ddp.safetensors", "events.jsonl", "samples"]
