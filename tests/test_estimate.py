"""The estimator's fit advice: the switches it names, applied, make the run fit; tiers from
presets/vram.toml fit their own budget for SD1."""
import pytest

from trainer import presets
from trainer.config import RunConfig
from trainer.estimate import CUDA_CONTEXT_GB, estimate, fit_advice


def test_advice_switches_make_the_run_fit():
    cfg = RunConfig.load({"model": {"family": "sdxl"}, "lora": {"train_text_encoder": True}, "train": {"batch_size": 4}})
    advice = fit_advice(cfg, 12, 20)
    assert advice.startswith("does not fit 12 GB; set ")
    switches = [s.strip() for s in advice.split("; set ", 1)[1].split(",")]
    fixed = RunConfig.load(cfg.to_dict(), overrides=[x for s in switches for x in s.split(" and ")])
    assert estimate(fixed, 20).peak_gb <= 12 - CUDA_CONTEXT_GB < estimate(cfg, 20).peak_gb
    assert fit_advice(fixed, 12, 20) == ""


@pytest.mark.parametrize("tier", presets.VRAM_TIERS)
def test_sd1_tiers_fit_their_budget(tier):
    cfg = RunConfig.load(presets.resolve("character", family="sd1", vram=tier, n_images=20), {"model": {"family": "sd1"}})
    assert fit_advice(cfg, tier, 20) == "", estimate(cfg, 20).text()
