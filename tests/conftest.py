import logging
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from trainer.models import tiny
from trainer.config import RunConfig

COLOURS = ["red", "blue", "green", "yellow"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Randomly initialised tiny pipelines in the diffusers layout, built once per test session."""
    root = tmp_path_factory.mktemp("models")
    return {fam: tiny.build_pipeline(fam, root / fam, seed=0) for fam in ("sd1", "sd2", "sdxl")}


def make_dataset(folder: Path, n: int = 4, size=(40, 48)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = COLOURS[i % len(COLOURS)]
        w, h = size if i % 2 else size[::-1]
        im = Image.new("RGB", (w, h), "white")
        ImageDraw.Draw(im).ellipse((6, 6, w - 6, h - 6), fill=c)
        im.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a {c} circle", encoding="utf-8")
    return folder


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "dataset")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LORA_STUDIO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    # Plans must not depend on which CPU CI lands on (one without AVX512-BF16/AMX switches bf16 runs to fp32):
    # tests of that switch set it to slow themselves.
    monkeypatch.setenv("LORA_STUDIO_CPU_BF16", "fast")


def tiny_config(model: Path, dataset: Path, out: Path, **overrides) -> RunConfig:
    """A fast CPU run on the tiny models: 32 px, few steps, few sampling steps."""
    sets = {"train.max_steps": 4, "data.resolution": 32, "data.bucket_step": 8, "sample.steps": 2,
            "optim.lr": 1e-3, "optim.warmup_steps": 0, "lora.rank": 4, "lora.alpha": 4.0}
    sets.update(overrides)
    items = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={str(v).lower() if isinstance(v, bool) else v}"
             for k, v in sets.items()]
    items = [i.replace("'", '"') for i in items]
    return RunConfig.load({"model": {"source": str(model)}, "data": {"dataset": str(dataset)},
                           "save": {"output_dir": str(out)}}, overrides=items)


@pytest.fixture
def peft_warnings(caplog):
    """Warnings from diffusers/peft/transformers while loading LoRAs: missing or unexpected keys show up here."""
    caplog.set_level(logging.WARNING)
    return caplog


def pytest_terminal_summary(terminalreporter):
    """Name the browser tests' screenshot folders in every log (CI's included), so they can be looked at."""
    root = Path(__file__).resolve().parent.parent / "test-artifacts"
    for folder in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        shots = list(folder.glob("*.png"))
        if shots:
            terminalreporter.write_line(f"browser screenshots: {folder} ({len(shots)} png)")


def step_gradients(cfg: RunConfig, monkeypatch) -> list[list]:
    """The LoRA gradients of each optimizer step of a run, as the loop has them just before it steps (after
    unscaling, before clipping): a comparison far tighter than the trained files, which Adam's first steps make
    nearly sign(gradient) whatever the gradient's size."""
    from trainer.training import loop

    real, steps = loop._optimizer_step, []

    def capture(loss, optimizer, lr_scheduler, groups, *a, **k):
        steps.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                      for g in groups for p in g["params"]])
        return real(loss, optimizer, lr_scheduler, groups, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(loop, "_optimizer_step", capture)
        loop.train(cfg)
    return steps


def first_step_gradients(cfg: RunConfig, monkeypatch) -> list:
    return step_gradients(cfg, monkeypatch)[0]
