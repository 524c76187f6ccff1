import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.training.events import read_events

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cmd, env, timeout):
    """Run the launcher; on a hang kill it and its workers (which hold the pipes). torchrun starts each worker in
    a session of its own, so a process-group kill misses them: every descendant is listed while the launcher
    still lives (after it, they belong to init) and signalled one by one. Returns (returncode, stdout, stderr),
    with returncode None on a timeout."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        for sig in (signal.SIGABRT, signal.SIGKILL):  # SIGABRT first: faulthandler prints every thread's stack
            for pid in family:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(3)
        out, err = proc.communicate()
        return None, out, err


@pytest.mark.timeout(600)
def test_two_process_accelerate_launch_on_cpu(tiny_models, dataset, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        accelerate = shutil.which("accelerate")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONFAULTHANDLER": "1"}
    timeout = float(os.environ.get("DDP_TEST_TIMEOUT", 300))
    out = tmp_path / "ddp"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "trainer", "train", "--model", str(tiny_models["sd1"]), "--dataset", str(dataset),
           "--output", str(out), "--set", "train.max_steps=4", "--set", "data.resolution=32",
           "--set", "data.bucket_step=8", "--set", "sample.steps=2"]
    rc, stdout, stderr = _launch(cmd, env, timeout)
    if rc is None:  # a hang is a failure, with every rank's stacks (faulthandler) kept for the report
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "ddp_hang.txt").write_text(stderr)
        pytest.fail(f"the 2-process run hung for {timeout:.0f} s; stacks in {ARTIFACTS / 'ddp_hang.txt'}:\n"
                    f"{stderr[-3000:]}")
    assert rc == 0, (stderr or "")[-3000:]
    events = read_events(out)
    start = [e for e in events if e["type"] == "start"]
    done = [e for e in events if e["type"] == "done"]
    assert len(start) == 1 and start[0]["processes"] == 2        # rank 0 alone writes events
    assert len(done) == 1 and done[0]["ranks_in_sync"] is True   # DDP kept the replicas identical
    assert len([e for e in events if e["type"] == "step"]) == 4
    assert (out / "ddp.safetensors").exists()
    assert stdout.count("done after 4 steps") == 1
    assert sorted(p.name for p in out.iterdir()) == ["config.toml", "ddp.safetensors", "events.jsonl", "samples"]
