"""The built wheel works anywhere: installed into a new venv and run from a folder outside the checkout,
it trains with a built-in preset on a sample dataset and its UI seeds a new workspace with the samples.

The new venv gets the wheel alone; its dependencies come from this test environment through a path
entry (installing torch, gradio and the rest again would take minutes and test pip, not us). The test
checks that `trainer` and `app` are imported from the wheel, never from the checkout."""
import os
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.test_ui_e2e import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    dist = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(ROOT)], check=True, cwd=tmp, timeout=300)
    (wheel,) = dist.glob("lora_studio-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, timeout=300)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "test-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(LORA_STUDIO_HOME=str(tmp / "home"), LORA_STUDIO_CACHE=str(tmp / "cache"))
    return wheel, venv, elsewhere, env


def test_wheel_carries_presets_samples_and_the_embedded_model(wheel_venv):
    names = set(zipfile.ZipFile(wheel_venv[0]).namelist())
    for kind in ("character", "style", "concept"):
        assert f"trainer/presets/{kind}.toml" in names
        assert f"trainer/assets/sample_datasets/{kind}/dataset.toml" in names
        assert sum(n.startswith(f"trainer/assets/sample_datasets/{kind}/") and n.endswith(".png") for n in names) >= 10
    assert "trainer/presets/vram.toml" in names
    assert {"trainer/assets/tiny-sd/model_index.json", "trainer/assets/tiny-sd/unet/diffusion_pytorch_model.safetensors"} <= names


@pytest.mark.smoke
def test_installed_wheel_serves_the_ui_and_trains_from_any_folder(wheel_venv):
    _, venv, elsewhere, env = wheel_venv
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import trainer, app; print(trainer.__file__, app.__file__)"],
                           capture_output=True, text=True, cwd=elsewhere, env=env, check=True).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # the wheel's code, not the checkout's

    ws, port = elsewhere / "workspace", free_port()
    ui = subprocess.Popen([str(venv / "bin" / "lora-studio"), "--no-browser", "--port", str(port), "--workspace", str(ws)],
                          cwd=elsewhere, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, page = time.monotonic() + 120, ""
        while time.monotonic() < deadline and not page:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
            except OSError:
                assert ui.poll() is None, ui.stdout.read()
                time.sleep(0.5)
        assert "LoRA Studio" in page
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    samples = sorted((ws / "datasets").iterdir())
    assert [p.name for p in samples] == ["character", "concept", "style"]
    assert len(list((ws / "datasets" / "character").glob("*.png"))) >= 10

    run = subprocess.run([str(venv / "bin" / "lora-studio"), "train", "--preset", "character",
                          "--dataset", str(ws / "datasets" / "character"), "--output", "runs/wheel-run",
                          "--set", "train.max_steps=2", "--set", "sample.at_end=false"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "done after 2 steps" in run.stdout + run.stderr
    # a relative --output lands in the workspace's runs/, which the app lists (it used to land where the command ran)
    landed = Path(env["LORA_STUDIO_HOME"]) / "runs" / "wheel-run"
    assert (landed / "wheel-run.safetensors").stat().st_size > 0 and f"run folder: {landed}" in run.stdout
    assert not (elsewhere / "runs").exists()
