"""Frozen text encoders whose captions are all cached leave memory once the sample prompts are encoded: the samples
made from those embeddings equal the ones the encoders would give, and a run that samples, validates and judges
drift still works without them."""
import numpy as np
import pytest
import torch

from tests.conftest import tiny_config
from trainer.training import loop, residency
from trainer.models import tiny
from trainer.training.events import Events, read_events
from trainer.models import load_base, sampling_schedule
from trainer.memory.precision import Precision
from trainer.training.samples import render


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return tiny.build_pipeline("sd3", tmp_path_factory.mktemp("sd3") / "sd3", seed=0)


def _render(cfg, base, encoded=None):
    schedule, rescale = sampling_schedule(base.scheduler_config, base.prediction_type, False)
    return render(base.family, base.unet, base.vae, base.text_encoders, base.tokenizers, schedule, cfg.sample.prompts,
                  negative=cfg.sample.negative_prompt, seed=3, steps=2, guidance=4.0, size=32, clip_skip=1,
                  autocast=Precision("no", torch.device("cpu")).autocast(), encoded=encoded)


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3"])
def test_samples_from_the_encoded_prompts_equal_those_of_the_encoders(family, tiny_models, sd3, dataset, tmp_path):
    model = sd3 if family == "sd3" else tiny_models[family]
    cfg = tiny_config(model, dataset, tmp_path / "run", **{"sample.negative_prompt": "blurry"})
    cfg.sample.prompts = ["a red circle", "a blue circle, on grey"]
    kept, let_go = (load_base(str(model), dtype=torch.float32) for _ in range(2))
    events = Events(tmp_path / "run")
    encoded = residency.let_encoders_go(cfg, let_go, Precision("no", torch.device("cpu")), torch.device("cpu"), True, events,
                                     drift=True)
    assert all(p.device.type == "meta" for te in let_go.text_encoders for p in te.parameters())
    assert set(encoded) >= set(cfg.sample.prompts)
    got, want = _render(cfg, let_go, encoded), _render(cfg, kept)
    assert len(got) == 2 and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, want))
    assert not np.array_equal(np.asarray(got[0]), np.asarray(got[1]))  # the prompts were not mixed up
    assert [e["prompts"] for e in read_events(tmp_path / "run") if e["type"] == "text_encoders_released"] == [
        len(encoded)]


def test_a_run_samples_validates_and_judges_drift_without_its_encoders(tiny_models, dataset, tmp_path):
    run = tmp_path / "run"
    loop.train(tiny_config(tiny_models["sdxl"], dataset, run, **{
        "train.max_steps": 4, "data.validation_split": 1, "save.every_n_steps": 2, "sample.every_n_steps": 2}))
    events = read_events(run)
    kinds = [e["type"] for e in events]
    assert kinds.index("text_encoders_released") < kinds.index("step")
    sampled = [e["step"] for e in events if e["type"] == "sample" and not e.get("grid")]
    assert sorted(set(sampled)) == [2, 4] and sampled.count(2) == sampled.count(4) > 0
    checkpoints = [e for e in events if e["type"] == "checkpoint"]
    assert len(checkpoints) == 2 and all(e["drift"] is not None and e["validation_loss"] > 0 for e in checkpoints)


def test_encoders_stay_when_captions_are_encoded_every_step(tiny_models, dataset, tmp_path):
    run = tmp_path / "run"
    loop.train(tiny_config(tiny_models["sd1"], dataset, run, **{"train.max_steps": 2, "data.shuffle_tags": True}))
    assert "text_encoders_released" not in [e["type"] for e in read_events(run)]
