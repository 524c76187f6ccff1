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


@pytest.mark.parametrize("saved", ["speed-measurements.json", "speed-measurements-cuda-h100.json"])
def test_estimator_within_ten_percent_of_every_saved_measurement(saved):
    """bench/*.json hold real peaks (CPU RSS here; max allocated on an H100, fp16 and fp8 frozen weights,
    latent cache filled); replaying them recomputes each estimate with today's constants, so a change to
    the estimator that loses its calibration fails here."""
    from pathlib import Path

    from trainer.bench import speed

    out = speed.load_measurements(Path(__file__).resolve().parent.parent / "bench" / saved)
    full = [m for m in out["results"] if m.setting.model != "tiny" and not m.error]
    assert full
    for m in full:
        assert m.estimate_err <= 0.10, f"{m.setting.label}: estimate {m.estimate_gb} GB vs measured {m.peak_gb:.2f} GB"
