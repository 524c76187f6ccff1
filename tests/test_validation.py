"""Which checkpoint to keep (issue 20): held-out images chosen by seed; a validation loss that is the same
every time it is asked of the same LoRA, touches nothing the training uses and is resumed exactly; per
checkpoint its loss and drift; a recommendation with its reason, and Keep copying it to the Library."""
import json

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from app import jobs, library
from app.workspace import Workspace
from trainer.data.scan import scan
from trainer.training.events import Events, read_events
from trainer.training.loop import train
from trainer.training.validation import Checkpoint, SplitError, recommend, split

from .conftest import make_dataset, tiny_config


def validation_losses(run_dir) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(run_dir) if e["type"] == "validation"}


def test_held_out_images_are_chosen_by_seed_and_never_trained_on(tmp_path):
    found = scan(make_dataset(tmp_path / "ds", n=10))
    train_a, val_a = split(found, 0.3, seed=1)
    train_b, val_b = split(found, 0.3, seed=1)
    _, val_c = split(found, 0.3, seed=2)
    names = lambda s: sorted(i.image.name for i in s.items)  # noqa: E731
    assert len(val_a.items) == 3 and names(val_a) == names(val_b) and names(val_a) != names(val_c)
    assert not set(names(train_a)) & set(names(val_a)) and len(train_a.items) + len(val_a.items) == 10
    assert len(split(found, 4, seed=1)[1].items) == 4  # a count
    with pytest.raises(SplitError, match="holds out 10 of 10 images and leaves 0 to train on"):
        split(found, 50, seed=1)  # refused with the numbers, not one image trained silently
    assert split(found, 0, seed=1)[1] is None


def test_validation_loss_is_deterministic_and_does_not_change_training(tiny_models, tmp_path):
    data = make_dataset(tmp_path / "ds", n=4)
    held = make_dataset(tmp_path / "held", n=3, size=(48, 40))
    quiet = {"train.max_steps": 6, "sample.at_end": False}
    plain = train(tiny_config(tiny_models["sd1"], data, tmp_path / "plain", **quiet))
    runs = []
    for name in ("v1", "v2"):
        cfg = tiny_config(tiny_models["sd1"], data, tmp_path / name, **quiet, **{
            "data.validation_dataset": str(held), "train.validate_every_n_steps": 2})
        runs.append(train(cfg))
    first, second = validation_losses(tmp_path / "v1"), validation_losses(tmp_path / "v2")
    assert sorted(first) == [2, 4, 6] and first == second  # fixed timesteps and noise: the same figure twice
    assert len({round(v, 9) for v in first.values()}) == 3  # and it follows the LoRA as it trains
    # Validating consumed nothing of the training's randomness: the LoRA is the one trained without it.
    a, b = load_file(str(plain.lora_path)), load_file(str(runs[0].lora_path))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


class StopAt(Events):
    def __init__(self, run_dir, at):
        super().__init__(run_dir)
        self.at = at

    def stop_requested(self):
        return any(e["type"] == "step" and e["step"] == self.at for e in read_events(self.run_dir))


def test_a_resumed_run_reports_the_same_validation_loss(tiny_models, tmp_path):
    data = make_dataset(tmp_path / "ds", n=6)
    sets = {"train.max_steps": 6, "sample.at_end": False, "data.validation_split": 2,
            "train.validate_every_n_steps": 2}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(tiny_config(tiny_models["sd1"], data, whole, **sets))
    stopped = train(tiny_config(tiny_models["sd1"], data, cut, **sets), StopAt(cut, 3))
    assert stopped.stopped_early and stopped.steps == 3
    train(tiny_config(tiny_models["sd1"], data, cut, **sets), resume=True)
    assert validation_losses(cut)[2] == validation_losses(whole)[2]
    assert validation_losses(cut)[6] == validation_losses(whole)[6]  # the same held-out images after a resume


def test_a_resumed_run_recommends_among_the_checkpoints_saved_before_the_stop(tiny_models, tmp_path):
    data = make_dataset(tmp_path / "ds", n=6)
    sets = {"train.max_steps": 6, "sample.at_end": False, "sample.steps": 2, "sample.prompts": ["a red circle"],
            "data.validation_split": 2, "save.every_n_steps": 2}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(tiny_config(tiny_models["sd1"], data, whole, **sets))
    train(tiny_config(tiny_models["sd1"], data, cut, **sets), StopAt(cut, 3))
    train(tiny_config(tiny_models["sd1"], data, cut, **sets), resume=True)
    recommended = [e for e in read_events(cut) if e["type"] == "recommendation"]
    expected = [e for e in read_events(whole) if e["type"] == "recommendation"]
    assert recommended[-1]["step"] == expected[0]["step"] and recommended[-1]["message"] == expected[0]["message"]


def test_the_recommendation_prefers_low_validation_loss_within_the_drift_bound():
    cps = [Checkpoint(100, "a", 0.50, 0.01), Checkpoint(200, "b", 0.40, 0.05), Checkpoint(300, "c", 0.35, 0.20),
           Checkpoint(400, "d", 0.60, 0.30)]
    best, why = recommend(cps, drift_bound=0.09)
    assert best.step == 200  # step 300 has a lower loss but drifts past the bound
    assert why.startswith("step 200: lowest validation loss (0.4)") and "drift 0.050 within the 0.09 bound" in why
    assert "1 checkpoint(s) with lower loss drift past the bound" in why and "+50% by step 400" in why
    assert recommend(cps, drift_bound=1.0)[0].step == 300
    assert recommend([], 0.09) is None


def test_each_checkpoint_gets_figures_and_the_run_recommends_one(tiny_models, tmp_path):
    data = make_dataset(tmp_path / "ds", n=6)
    out = tmp_path / "run"
    train(tiny_config(tiny_models["sd1"], data, out, **{
        "train.max_steps": 6, "sample.at_end": False, "sample.steps": 2, "sample.prompts": ["a red circle"],
        "data.validation_split": 2, "save.every_n_steps": 2, "optim.lr": 5e-2}))
    events = read_events(out)
    checkpoints = [e for e in events if e["type"] == "checkpoint"]
    assert [c["step"] for c in checkpoints] == [2, 4, 6]  # two checkpoints and the final LoRA
    assert all(c["validation_loss"] == validation_losses(out)[c["step"]] for c in checkpoints)
    assert all(0 < c["drift"] < 1 for c in checkpoints)  # the trained LoRA moves the pictures, a little
    (rec,) = [e for e in events if e["type"] == "recommendation"]
    (spread,) = [e["value"] for e in events if e["type"] == "seed_spread"]  # the base's own seed-to-seed change
    calm = [c for c in checkpoints if c["drift"] <= 0.8 * spread] or checkpoints  # train.drift_bound's auto bound
    best = min(calm, key=lambda c: c["validation_loss"])
    assert rec["step"] == best["step"] and rec["path"] == best["path"] and "lowest validation loss" in rec["message"]

    # The Train tab shows it, and "Keep" copies that checkpoint into the Library with its figures.
    shown = jobs.view(out, alive=lambda pid, d: False).recommendation
    assert shown["step"] == best["step"] and shown["validation_loss"] == best["validation_loss"]
    ws = Workspace(tmp_path / "ws").ensure(with_samples=False)
    kept = library.keep(ws, "run", shown)
    assert kept == ws.loras / f"run-step{best['step']}.safetensors"
    with safe_open(str(kept), "pt") as f:
        figures = json.loads(f.metadata()["lora_studio.recommendation"])
    assert figures["validation_loss"] == best["validation_loss"] and figures["drift"] == best["drift"]
    a, b = load_file(best["path"]), load_file(str(kept))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_every_checkpoint_has_samples_and_a_grid_shows_them_side_by_side(tiny_models, tmp_path):
    from PIL import Image

    data = make_dataset(tmp_path / "ds", n=6)
    out = tmp_path / "run"
    train(tiny_config(tiny_models["sd1"], data, out, **{
        "train.max_steps": 6, "sample.steps": 2, "sample.prompts": ["a red circle", "a blue circle"],
        "data.validation_split": 2, "save.every_n_steps": 3}))
    samples = [e for e in read_events(out) if e["type"] == "sample"]
    assert sorted((e["step"], e["seed"]) for e in samples if not e.get("grid")) == [(3, 1234), (3, 1235), (6, 1234),
                                                                                     (6, 1235)]
    (sheet,) = [e for e in samples if e.get("grid")]
    with Image.open(sheet["path"]) as im:  # 2 checkpoints x 2 prompts, each 32 px cell enlarged to 192
        assert im.size[0] == 2 * 192 and (im.size[1] - 2 * 192) % 2 == 0 and im.size[1] - 2 * 192 >= 2 * 24


def test_the_checkpoint_benchmark_runs_and_reports_its_checks(capsys):
    from trainer.bench.checkpoints import main

    out = main(steps=20, every=10, overrides=["sample.steps=2"])
    assert [r["step"] for r in out["checkpoints"]] == [10, 20] and out["recommended_step"] in (10, 20)
    assert {"validation_loss_turns_upward", "recommended_within_10pct_of_best",
            "recommended_drift_not_worse_than_last"} <= set(out)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out  # the last line is the JSON
