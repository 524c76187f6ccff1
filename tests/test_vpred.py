"""v-prediction with zero terminal SNR (SDXL, NoobAI-XL V-Pred style): detected from the scheduler config or a
single file's v_pred/ztsnr keys, trained on the rescaled schedule (pure noise at the last timestep, min-SNR for v
stays finite), sampled with trailing timesteps and guidance rescale, recorded in the file's metadata."""
import math

import pytest
import torch
from safetensors import safe_open

from tests.conftest import tiny_config
from trainer.training import loop, samples
from trainer.models import loading as models
from trainer.models import tiny
from trainer.config import RunConfig
from trainer.errors import TrainingError
from trainer.training.events import read_events

VPRED_ZTSNR = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}


@pytest.fixture(scope="module")
def vpred_sdxl(tmp_path_factory):
    return tiny.build_pipeline("sdxl", tmp_path_factory.mktemp("vpred") / "sdxl", seed=0, scheduler=VPRED_ZTSNR)


def test_sampling_schedule_follows_the_training_schedule():
    base = {"prediction_type": "epsilon", "timestep_spacing": "leading", "num_train_timesteps": 1000}
    assert models.sampling_schedule(base) == (base, 0.0)
    config, rescale = models.sampling_schedule(base, "v_prediction", True)
    assert config["timestep_spacing"] == "trailing" and config["rescale_betas_zero_snr"] is True
    assert config["prediction_type"] == "v_prediction" and rescale == models.GUIDANCE_RESCALE_ZTSNR
    assert models.sampling_schedule({**base, "rescale_betas_zero_snr": True})[1] == 0.7  # read from the config


def test_single_file_keys_say_v_pred_and_ztsnr():
    flags = models.checkpoint_flags(["model.diffusion_model.x", "v_pred", "ztsnr"], {"prediction_type": "epsilon"})
    assert flags == {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    assert models.checkpoint_flags(["model.diffusion_model.x"], {"prediction_type": "epsilon"}) == \
        {"prediction_type": "epsilon"}


def test_vpred_ztsnr_sdxl_trains_on_the_rescaled_schedule_and_samples_trailing(vpred_sdxl, dataset, tmp_path,
                                                                                  monkeypatch):
    import diffusers

    made, rendered = [], []
    real_from_config = diffusers.DDPMScheduler.from_config.__func__

    def spy_from_config(cls, *a, **k):
        made.append(real_from_config(cls, *a, **k))
        return made[-1]

    monkeypatch.setattr(diffusers.DDPMScheduler, "from_config", classmethod(spy_from_config))
    real_render = samples.render

    def spy_render(*a, **k):
        rendered.append((a[5], k["guidance_rescale"]))
        return real_render(*a, **k)

    monkeypatch.setattr(samples, "render", spy_render)
    run = tmp_path / "run"
    cfg = tiny_config(vpred_sdxl, dataset, run, **{"train.max_steps": 4, "train.min_snr_gamma": 5.0})
    result = loop.train(cfg)
    written = RunConfig.load(str(run / "config.toml"))
    assert written.model.prediction_type == "v_prediction" and written.model.zero_terminal_snr is True
    trained = made[0]
    assert trained.config.prediction_type == "v_prediction" and float(trained.alphas_cumprod[-1]) < 1e-9
    losses = [e["loss"] for e in read_events(run) if e["type"] == "step"]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    schedule, rescale = rendered[-1]
    assert schedule["timestep_spacing"] == "trailing" and schedule["rescale_betas_zero_snr"] and rescale == 0.7
    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_zero_terminal_snr"] == "True" and meta["ss_v_parameterization"] == "True"


def test_min_snr_weight_for_v_is_finite_at_the_terminal_timestep():
    """The schedule the loop uses (trainer/models/schedules.py), not a copy of its formula."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from trainer.models.schedules import Diffusion

    config = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    t = torch.tensor([0, 500, 999])
    v = Diffusion(config, "v_prediction", zero_terminal_snr=True, min_snr_gamma=5.0)
    weight = v.weight(t)
    assert torch.isfinite(weight).all() and weight[-1] == 0  # zero terminal SNR: nothing left to weigh at t=999
    snr = compute_snr(v.scheduler, t)
    assert weight[0] == pytest.approx(5.0 / (snr[0].item() + 1), rel=1e-5)  # clipped at gamma, over SNR + 1 for v
    assert weight[1] == pytest.approx(min(snr[1].item(), 5.0) / (snr[1].item() + 1), rel=1e-5)
    eps = Diffusion(config, "epsilon", zero_terminal_snr=False, min_snr_gamma=5.0).weight(t)
    eps_snr = compute_snr(Diffusion(config, "epsilon", False, 5.0).scheduler, t)
    assert eps[0] == pytest.approx(5.0 / eps_snr[0].item(), rel=1e-5)  # epsilon: over SNR, not SNR + 1
    assert eps[-1] == pytest.approx(1.0)  # SNR below gamma: weight 1
    assert Diffusion(config, "v_prediction", zero_terminal_snr=True, min_snr_gamma=0.0).weight(t) is None


def test_zero_terminal_snr_with_epsilon_is_refused(vpred_sdxl, dataset, tmp_path):
    cfg = tiny_config(vpred_sdxl, dataset, tmp_path / "run", **{"model.prediction_type": "epsilon"})
    with pytest.raises(TrainingError, match="needs model.prediction_type = v_prediction"):
        loop.train(cfg)


def test_preview_samples_a_ztsnr_base_with_trailing_timesteps(vpred_sdxl):
    from trainer.preview.previewer import SAMPLERS, Previewer

    p = Previewer()
    p.pipeline(str(vpred_sdxl))
    for sampler in SAMPLERS:
        config = p.scheduler(sampler).config
        assert config.timestep_spacing == "trailing" and config.prediction_type == "v_prediction", sampler
