"""The estimator: tiers from presets/vram.toml fit their own budget (SD1, SDXL, SD3, Flux.1, Z-Image) as the planner
sees it, and every saved measurement is within 10% of its estimate."""
import pytest

from trainer import presets
from trainer.config import RunConfig
from trainer.memory.estimate import estimate
from trainer.memory.plan import Budget, make_plan


@pytest.mark.parametrize("tier", presets.VRAM_TIERS)
@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3", "flux", "zimage"])
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


def test_a_local_folder_is_planned_at_its_own_size_a_single_file_at_the_familys(tiny_models, tmp_path):
    """A pruned, distilled or tiny diffusers folder is counted from its safetensors headers (no weight read); a name
    that is no folder (a Hub id, a single file) gets the family's published sizes."""
    from trainer.config import RunConfig
    from trainer.memory.estimate import PARAMS_M, folder_params_m, params_m, safetensors_params

    folder = tiny_models["sdxl"]
    counted = folder_params_m(str(folder))
    assert counted["unet"] == safetensors_params(folder / "unet") / 1e6 < 5  # millions: the tiny UNet
    assert counted["text_encoders"] == (safetensors_params(folder / "text_encoder") +
                                        safetensors_params(folder / "text_encoder_2")) / 1e6
    cfg = RunConfig.load({"model": {"source": str(folder)}})
    assert params_m(cfg, "sdxl")["unet"] == counted["unet"]
    hub = RunConfig.load({"model": {"source": "someone/sdxl-model"}})
    assert params_m(hub, "sdxl")["unet"] == PARAMS_M["sdxl"]["unet"]
