"""The estimator: tiers from presets/vram.toml fit their own budget (SD1, SDXL, SD3) as the planner sees it, and every
saved measurement is within 10% of its estimate."""
import pytest

from trainer import presets
from trainer.config import RunConfig
from trainer.memory.estimate import estimate
from trainer.memory.plan import Budget, make_plan


@pytest.mark.parametrize("tier", presets.VRAM_TIERS)
@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3"])
def test_tiers_fit_their_budget(tier, family):
    cfg = RunConfig.load(presets.resolve("character", family=family, vram=tier, n_images=20), {"model": {"family": family}})
    plan = make_plan(cfg, Budget("cuda", tier, 64.0, f"{tier} GB"), 20)
    assert plan.fits and plan.choices == [], plan.text() + " / " + estimate(cfg, 20).text()


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
