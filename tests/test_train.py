import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainer.lora import inject as lora_mod
from trainer.cli import main as cli_main
from trainer.config import LoraConfig
from trainer.training.events import Events, read_events
from trainer.lora.write import kohya_name
from trainer.training.loop import train
from trainer.models import ModelError, load_base

from .conftest import first_step_gradients, make_dataset, tiny_config


def load_pipe(model_dir):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt="a red circle", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=3, height=32, width=32, generator=gen, output_type="np").images[0]


def pipeline_parts(pipe):
    parts = {"lora_unet": pipe.unet}
    if getattr(pipe, "text_encoder_2", None) is not None:
        parts.update(lora_te1=pipe.text_encoder, lora_te2=pipe.text_encoder_2)
    else:
        parts["lora_te"] = pipe.text_encoder
    return parts


def assert_every_key_consumed(pipe, path, caplog, adapter="t"):
    """Load with diffusers and check, module by module, that every tensor in the file landed."""
    from trainer.models import detect_family

    namer = detect_family(pipe.unet.config, {}).unet_namer(pipe.unet.config)
    file_sd = load_file(str(path))
    file_modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in file_sd}
    caplog.clear()
    pipe.load_lora_weights(str(path), adapter_name=adapter)
    complaints = [r.getMessage() for r in caplog.records
                  if any(w in r.getMessage().lower() for w in ("unexpected", "not found", "missing keys", "were not used"))]
    assert not complaints, complaints
    loaded = {}
    for prefix, model in pipeline_parts(pipe).items():
        for name, mod in model.named_modules():
            if hasattr(mod, "lora_A") and adapter in mod.lora_A:
                loaded[kohya_name(prefix, name, namer)] = mod
    assert set(loaded) == file_modules
    for key, mod in loaded.items():
        down, up = file_sd[f"{key}.lora_down.weight"].float(), file_sd[f"{key}.lora_up.weight"].float()
        assert torch.allclose(mod.lora_A[adapter].weight.float(), down)
        assert torch.allclose(mod.lora_B[adapter].weight.float(), up)
        assert mod.scaling[adapter] == pytest.approx(file_sd[f"{key}.alpha"].item() / down.shape[0], rel=1e-3)
    return loaded


@pytest.mark.smoke
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_run_writes_a_lora_that_diffusers_loads_fully(family, tiny_models, dataset, tmp_path, peft_warnings):
    out = tmp_path / "runs" / "first"
    cfg = tiny_config(tiny_models[family], dataset, out, **{"train.max_steps": 6, "sample.every_n_steps": 3,
                                                           "lora.train_text_encoder": True, "lora.alpha": 2.0})
    result = train(cfg)
    assert result.steps == 6 and not result.stopped_early
    lora_path = out / "first.safetensors"
    assert result.lora_path == lora_path and lora_path.exists()
    assert (out / "config.toml").exists()
    samples = sorted((out / "samples").glob("*.png"))
    assert len(samples) == 4  # 2 prompts at step 3 and at the end

    events = read_events(out)
    kinds = [e["type"] for e in events if e["type"] != "progress"]  # progress events come in every phase
    assert kinds[0] == "dataset" and kinds[-1] == "done" and "saved" in kinds and "sample" in kinds
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 7))
    assert all({"loss", "lr", "epoch", "elapsed_s", "eta_s", "total"} <= set(e) for e in steps)

    with safe_open(str(lora_path), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    prefixes = {k.split("_")[0] + "_" + k.split("_")[1] for k in keys}
    expected = {"lora_unet", "lora_te1", "lora_te2"} if family == "sdxl" else {"lora_unet", "lora_te"}
    assert prefixes == expected
    assert any(k.startswith(("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                             "lora_te1_text_model_encoder_layers_0_self_attn_q_proj")) for k in keys)
    unet_keys = [k for k in keys if k.startswith("lora_unet_")]
    if family == "sdxl":  # the layout kohya, A1111 and ComfyUI all read
        assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
                   for k in unet_keys)
    else:
        assert all(k.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_"))
                   for k in unet_keys)
    assert meta["ss_network_alpha"] == "2.0" and meta["ss_network_dim"] == "4"

    base_pipe = load_pipe(tiny_models[family])
    base_image = generate(base_pipe)
    assert_every_key_consumed(base_pipe, lora_path, peft_warnings)
    base_pipe.set_adapters(["t"], [1.0])
    with_lora = generate(base_pipe)
    base_pipe.set_adapters(["t"], [0.0])
    at_zero = generate(base_pipe)
    assert np.abs(with_lora - base_image).max() > 1e-3
    np.testing.assert_allclose(at_zero, base_image, atol=1e-5)


def test_exported_alpha_is_the_trained_alpha(tiny_models, dataset, tmp_path):
    """alpha != rank must survive export: diffusers' own converter writes alpha = rank."""
    out = tmp_path / "run"
    train(tiny_config(tiny_models["sd1"], dataset, out, **{"lora.rank": 4, "lora.alpha": 1.0, "train.max_steps": 1,
                                                           "sample.at_end": False}))
    sd = load_file(str(out / "run.safetensors"))
    alphas = {v.item() for k, v in sd.items() if k.endswith(".alpha")}
    assert alphas == {1.0}


def test_only_lora_parameters_train_and_count_matches(tiny_models):
    base = load_base(str(tiny_models["sd1"]))
    cfg = LoraConfig(rank=4)
    unet_targets = lora_mod.unet_targets(cfg)
    te_targets = lora_mod.text_encoder_targets(cfg)

    def expected(model, targets):
        return sum(cfg.rank * (m.in_features + m.out_features) for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in targets))

    want_unet, want_te = expected(base.unet, unet_targets), expected(base.text_encoders[0], te_targets)
    for m in (base.unet, base.vae, base.text_encoders[0]):
        m.requires_grad_(False)
    lora_mod.inject(base.unet, cfg, unet_targets, "UNet")
    lora_mod.inject(base.text_encoders[0], cfg, te_targets, "text-encoder")
    trainable = [(n, p) for m in (base.unet, base.vae, base.text_encoders[0]) for n, p in m.named_parameters()
                 if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    assert sum(p.numel() for p in lora_mod.lora_parameters(base.unet)) == want_unet > 0
    assert sum(p.numel() for p in lora_mod.lora_parameters(base.text_encoders[0])) == want_te > 0
    assert lora_mod.expected_parameter_count(base.unet, cfg.rank) == want_unet


def test_extra_targets_and_rank_checks(tiny_models):
    base = load_base(str(tiny_models["sd1"]))
    cfg = LoraConfig(rank=4, unet_extra=["conv", "ff", "proj"])
    lora_mod.inject(base.unet, cfg, lora_mod.unet_targets(cfg), "UNet")
    names = [n for n, m in base.unet.named_modules() if hasattr(m, "lora_A")]
    assert any(n.endswith("resnets.0.conv1") for n in names)
    assert any(n.endswith("ff.net.2") for n in names)
    assert any(n.endswith("proj_in") for n in names)
    n_params = sum(p.numel() for p in lora_mod.lora_parameters(base.unet))
    assert n_params == lora_mod.expected_parameter_count(base.unet, 4)

    fresh = load_base(str(tiny_models["sd1"]))
    with pytest.raises(ValueError, match="lora.rank 999 is larger than"):
        lora_mod.inject(fresh.unet, LoraConfig(rank=999), lora_mod.UNET_ATTENTION, "UNet")


def test_two_seeded_runs_write_identical_files(tiny_models, dataset, tmp_path):
    paths = []
    for where in ("a", "b"):
        out = tmp_path / where / "run"
        train(tiny_config(tiny_models["sd1"], dataset, out, **{"train.max_steps": 5, "data.shuffle_tags": True,
                                                               "data.caption_dropout": 0.2, "lora.dropout": 0.1}))
        paths.append(out / "run.safetensors")
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_a_cpu_run_leaves_a_core_to_the_page_and_a_second_run(tiny_models, dataset, tmp_path, monkeypatch):
    """torch's default (a spinning thread on every core) made a tiny step 3.5x slower beside one busy process and 4x
    with a second run on this 2-core machine; a CPU run now takes all cores but one, shared among its processes,
    unless OMP_NUM_THREADS says otherwise."""
    from trainer.memory.cpu_features import training_threads

    assert training_threads(cores=2, env={}) == 1 and training_threads(cores=16, env={}) == 15
    assert training_threads(processes=2, cores=16, env={}) == 7 and training_threads(cores=1, env={}) == 1
    assert training_threads(processes=4, cores=2, env={}) == 1
    assert training_threads(cores=16, env={"OMP_NUM_THREADS": "4"}) is None  # the user's setting stands
    from trainer.cli import main as cli_main

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 3)
    try:
        assert cli_main(["train", "--model", str(tiny_models["sd1"]), "--dataset", str(dataset), "--output",
                         str(tmp_path / "run"), "--set", "train.max_steps=1", "--set", "sample.at_end=false"]) == 0
        assert torch.get_num_threads() == 2  # the run's process: 3 cores, one left
    finally:
        torch.set_num_threads(before)


def _eval_loss(pipe, dataset: Path, seeds=range(4)) -> float:
    """Denoising loss on fixed images, noise and timesteps: a deterministic measure of fit."""
    from trainer.data.dataset import open_rgb

    losses = []
    with torch.no_grad():
        for img in sorted(dataset.glob("*.png")):
            caption = img.with_suffix(".txt").read_text()
            arr = np.asarray(open_rgb(img).resize((32, 32)), dtype=np.float32) / 127.5 - 1
            pixels = torch.from_numpy(arr).permute(2, 0, 1)[None]
            latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
            ids = pipe.tokenizer([caption], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 return_tensors="pt").input_ids
            hidden = pipe.text_encoder(ids).last_hidden_state
            for s in seeds:
                g = torch.Generator().manual_seed(s)
                noise = torch.randn(latents.shape, generator=g)
                t = torch.tensor([100 + 200 * s])
                noisy = pipe.scheduler.add_noise(latents, noise, t)
                pred = pipe.unet(noisy, t, hidden).sample
                losses.append(torch.nn.functional.mse_loss(pred, noise).item())
    return float(np.mean(losses))


def test_loss_falls_when_overfitting_two_images(tiny_models, tmp_path):
    data = make_dataset(tmp_path / "two", n=2)
    out = tmp_path / "fit"
    train(tiny_config(tiny_models["sd1"], data, out, **{"train.max_steps": 40, "optim.lr": 3e-3, "lora.rank": 8,
                                                        "lora.alpha": 8.0, "sample.at_end": False}))
    pipe = load_pipe(tiny_models["sd1"])
    before = _eval_loss(pipe, data)
    pipe.load_lora_weights(str(out / "fit.safetensors"))
    after = _eval_loss(pipe, data)
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_paths_run_on_cpu(precision, tiny_models, dataset, tmp_path):
    out = tmp_path / precision
    cfg = tiny_config(tiny_models["sd1"], dataset, out, **{"train.mixed_precision": precision, "train.max_steps": 3,
                                                           "train.gradient_checkpointing": True})
    result = train(cfg)
    assert result.steps == 3
    losses = [e["loss"] for e in read_events(out) if e["type"] == "step"]
    assert all(isinstance(x, float) for x in losses)
    sd = load_file(str(out / f"{precision}.safetensors"))
    ups = [v for k, v in sd.items() if k.endswith("lora_up.weight")]
    assert any(v.abs().sum() > 0 for v in ups)  # B starts at zero: it moved, so gradients flowed


def test_gradient_checkpointing_and_accumulation_give_the_same_gradients(tiny_models, dataset, tmp_path, monkeypatch):
    """Checkpointing recomputes activations; it must not change what is learned. Compared on the first step's
    gradients (accumulated over two micro-batches), tightly: the files after a few Adam steps differ little even when
    the gradients differ a lot."""
    grads = []
    for gc in (False, True):
        out = tmp_path / ("gc" if gc else "plain") / "run"
        grads.append(first_step_gradients(tiny_config(tiny_models["sd1"], dataset, out, **{
            "train.max_steps": 1, "train.gradient_accumulation": 2, "train.gradient_checkpointing": gc,
            "sample.at_end": False}), monkeypatch))
    assert len(grads[0]) == len(grads[1]) > 0
    assert any(g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


class StopAfter(Events):
    def __init__(self, run_dir, at, interrupt=False):
        super().__init__(run_dir)
        self.at, self.interrupt = at, interrupt

    def step(self, step, *a, **k):
        out = super().step(step, *a, **k)
        if self.interrupt and step == self.at:
            raise KeyboardInterrupt
        return out

    def stop_requested(self):
        return not self.interrupt and any(e["type"] == "step" and e["step"] >= self.at for e in read_events(self.run_dir))


@pytest.mark.parametrize("interrupt", [False, True])
def test_stop_file_and_ctrl_c_save_the_lora(interrupt, tiny_models, dataset, tmp_path):
    out = tmp_path / "stopped"
    cfg = tiny_config(tiny_models["sd1"], dataset, out, **{"train.max_steps": 50, "sample.at_end": False})
    result = train(cfg, StopAfter(out, 2, interrupt))
    assert result.stopped_early and result.steps == 2
    assert (out / "stopped.safetensors").exists()
    done = read_events(out)[-1]
    assert done["type"] == "done" and done["stopped"] is True and done["step"] == 2


class StopTwice(Events):
    """Stop at step 2; with `skip`, Stop again as soon as the end samples are announced."""

    def __init__(self, run_dir, skip):
        super().__init__(run_dir)
        self.skip, self.stops = skip, 0

    def emit(self, type, **fields):
        if type == "end_samples" and self.skip:
            (self.run_dir / "STOP").touch()
        return super().emit(type, **fields)

    def stop_requested(self):
        if (self.run_dir / "STOP").exists():
            return True
        if not self.stops and any(e["type"] == "step" and e["step"] >= 2 for e in read_events(self.run_dir)):
            self.stops = 1  # the first Stop, pressed once
            return True
        return False


@pytest.mark.parametrize("skip", [False, True])
def test_stop_saves_the_lora_before_the_end_samples_and_a_second_stop_skips_them(skip, tiny_models, dataset, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_models["sd1"], dataset, out, **{"train.max_steps": 50, "sample.prompts": ["a", "b"]})
    result = train(cfg, StopTwice(out, skip))
    assert result.stopped_early and result.steps == 2
    kinds = [e["type"] for e in read_events(out)]
    # Stopped means saved first; the end samples come after, as their own announced phase.
    assert kinds.index("saved") < kinds.index("end_samples") and kinds[-1] == "done"
    samples = [e for e in read_events(out) if e["type"] == "sample"]
    assert len(samples) == (0 if skip else 2)
    assert (out / "run.safetensors").exists()


def test_a_run_records_its_step_time_and_the_estimate_becomes_a_measured_range(tiny_models, dataset, tmp_path):
    from trainer.memory import speed_log
    from trainer.config import RunConfig
    from trainer.memory.estimate import estimate

    cfg = tiny_config(tiny_models["sd1"], dataset, tmp_path / "r", **{"train.max_steps": 7, "sample.at_end": False})
    unresolved = RunConfig.load(cfg.to_dict())  # what the Train tab holds: 'auto' values not filled in yet
    assert speed_log.time_range(unresolved, 100) is None
    assert "not measured on this machine yet" in estimate(unresolved).text()
    train(cfg)
    (run,) = speed_log.measured(unresolved)  # the same shape, seen from the unresolved config
    assert run["steps"] == 5 and 0 < run["q1"] <= run["median"] <= run["q3"] and run["device"].startswith("cpu")
    text = estimate(unresolved).text(speed_log.time_range(unresolved, 7))
    assert "measured here on cpu" in text and "s/step" in text
    assert speed_log.measured(RunConfig.load(cfg.to_dict(), {"lora": {"network": "lokr"}})) == []  # its own shape


def test_a_run_slowed_by_other_work_is_left_out_of_the_measured_range(tmp_path, monkeypatch):
    """A run beside a benchmark stepped at 4.8 s/step against 0.074 idle; counted, the range read '22 s to 24 min'."""
    from trainer.config import RunConfig
    from trainer.memory import speed_log

    monkeypatch.setattr(speed_log, "default_cache_dir", lambda: tmp_path)
    cfg = RunConfig.load({"model": {"source": "tiny"}})
    for seconds in ([0.07, 0.074, 0.075, 0.076, 0.08], [0.09, 0.1, 0.11, 0.12, 0.13], [4.5, 4.7, 4.8, 4.9, 5.0]):
        speed_log.record(cfg, [1.0, 1.0, *seconds], "cpu (2 cores)")
    text = speed_log.time_range(cfg, 300)
    assert text.startswith("22 s to 38 s (0.072-0.12 s/step, measured here on cpu (2 cores) over 2 runs"), text
    assert "1 run up to 64x slower left out: the machine was busy with other work then" in text
    speed_log.record(cfg, [1.0, 1.0, 0.2, 0.2, 0.2, 0.2], "cpu (2 cores)")  # within 3x of the fastest: counted
    assert "over 3 runs" in speed_log.time_range(cfg, 300)


def test_stale_stop_file_does_not_end_a_new_run(tiny_models, dataset, tmp_path):
    import os
    import time

    out = tmp_path / "r"
    out.mkdir()
    (out / "STOP").write_text("")
    os.utime(out / "STOP", (time.time() - 3600,) * 2)  # left by a run that crashed before this process started
    result = train(tiny_config(tiny_models["sd1"], dataset, out, **{"train.max_steps": 3, "sample.at_end": False}))
    assert not result.stopped_early and result.steps == 3
    assert not (out / "STOP").exists()


def test_cli_trains_and_config_reproduces_the_run(tiny_models, dataset, tmp_path, capsys):
    first = tmp_path / "a" / "run"
    sets = ["train.max_steps=3", "data.resolution=32", "data.bucket_step=8", "sample.steps=2", "lora.rank=4"]
    args = ["train", "--model", str(tiny_models["sd1"]), "--dataset", str(dataset), "--output", str(first)]
    for s in sets:
        args += ["--set", s]
    assert cli_main(args) == 0
    second = tmp_path / "b" / "run"
    assert cli_main(["train", "--config", str(first / "config.toml"), "--output", str(second)]) == 0
    assert (first / "run.safetensors").read_bytes() == (second / "run.safetensors").read_bytes()
    # A finished run folder is never trained over by accident.
    assert cli_main(args) == 2
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["train", "--dataset", "DS", "--model", "/nonexistent/model.safetensors"], "does not exist"),
    (["train", "--dataset", "DS", "--model", "MODEL", "--set", "lora.rank=-1"], "lora.rank"),
    (["train", "--dataset", "/nonexistent", "--model", "MODEL"], "dataset folder /nonexistent does not exist"),
    (["train", "--dataset", "DS", "--model", "MODEL", "--preset", "nosuch"], "unknown preset"),
    (["train", "--model", "MODEL"], "no dataset"),
])
def test_cli_errors_are_one_line(args, message, tiny_models, dataset, tmp_path, capsys):
    args = [a.replace("DS", str(dataset)).replace("MODEL", str(tiny_models["sd1"])) for a in args]
    args += ["--output", str(tmp_path / "out")]
    assert cli_main(args) == 2
    lines = [l for l in capsys.readouterr().err.strip().splitlines() if "lora-studio" in l]
    assert len(lines) == 1 and lines[0].startswith("lora-studio: error:") and message in lines[0]


def test_pickle_checkpoints_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this would run on load",))

    bad = tmp_path / "model.ckpt"
    bad.write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(ModelError, match="weights_only"):
        load_base(str(bad))


def test_wrong_kind_of_model_is_one_line(tmp_path):
    folder = tmp_path / "notamodel"
    folder.mkdir()
    with pytest.raises(ModelError, match="not a diffusers model"):
        load_base(str(folder))
    lora_file = tmp_path / "lora.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(lora_file))
    with pytest.raises(ModelError, match="not a Stable Diffusion checkpoint"):
        load_base(str(lora_file))


def test_family_detection(tiny_models):
    assert load_base(str(tiny_models["sd1"])).family.name == "sd1"
    sd2 = load_base(str(tiny_models["sd2"]))
    assert sd2.family.name == "sd2" and sd2.prediction_type == "v_prediction"
    assert load_base(str(tiny_models["sdxl"])).family.name == "sdxl"


def test_v_prediction_and_min_snr_train(tiny_models, dataset, tmp_path):
    out = tmp_path / "v"
    train(tiny_config(tiny_models["sd2"], dataset, out, **{"train.max_steps": 3, "train.min_snr_gamma": 5.0,
                                                           "train.noise_offset": 0.05, "sample.at_end": False}))
    with safe_open(str(out / "v.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_v_parameterization"] == "True" and meta["modelspec.prediction_type"] == "v"  # the spec's word
    cfg = json.loads(meta["lora_studio.config"])
    assert cfg["train"]["min_snr_gamma"] == 5.0 and "output_dir" not in cfg["save"]


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "trainer", "train", "--help"], capture_output=True, text=True, check=True)
    assert "lora.rank" in out.stdout and "train.mixed_precision" in out.stdout


def test_rslora_and_dora_export(tiny_models, dataset, tmp_path):
    out = tmp_path / "rs"
    train(tiny_config(tiny_models["sd1"], dataset, out, **{"train.max_steps": 1, "lora.use_rslora": True,
                                                           "lora.rank": 4, "lora.alpha": 4.0, "sample.at_end": False}))
    sd = load_file(str(out / "rs.safetensors"))
    # kohya scales by alpha/rank; rsLoRA by alpha/sqrt(rank): the file's alpha must carry the difference.
    assert {v.item() for k, v in sd.items() if k.endswith(".alpha")} == {8.0}
    out = tmp_path / "dora"
    train(tiny_config(tiny_models["sd1"], dataset, out, **{"train.max_steps": 1, "lora.use_dora": True,
                                                           "sample.at_end": False}))
    sd = load_file(str(out / "dora.safetensors"))
    downs = [k for k in sd if k.endswith(".lora_down.weight")]
    assert len([k for k in sd if k.endswith(".dora_scale")]) == len(downs)
    for k in downs:
        up = sd[k.replace("lora_down.weight", "lora_up.weight")]
        assert sd[k.replace("lora_down.weight", "dora_scale")].shape == (up.shape[0], 1)  # per output row, as peft


def test_an_error_of_the_unet_callback_is_not_called_a_loading_error(tiny_models):
    """load_base's on_unet (LoRA injection, fp8) runs inside the loader; its errors keep their own words."""
    from trainer.errors import TrainingError
    from trainer.models import load_base

    def fails(unet):
        raise TrainingError("lora.unet_extra names no layer of this UNet")

    with pytest.raises(TrainingError, match="names no layer"):
        load_base(str(tiny_models["sd1"]), on_unet=fails)
