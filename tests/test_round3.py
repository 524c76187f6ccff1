"""Round three of the held-out failures: each test fails on the code before its fix.

Correctness: non-finite settings and weights, gradient accumulation's skipped steps and logged loss, nested
setting types, validation splits, Stop in every phase, a relative drift bound. Exports: DoRA by ComfyUI's own
formula, baked text encoders in the layout ComfyUI reads, kohya's metadata. Errors and durability: disk full in
safetensors, the app's start-up check, missing import sources, the embedded model read-only, fsync before COMPLETE,
the Library's atomic import, the Hub's cache errors. And bf16 on CPUs without fast bf16."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainer.training import loop
from trainer.cli import main as cli_main
from trainer.config import ConfigError, RunConfig
from trainer.training.events import Events, read_events
from trainer.errors import TrainingError

from .conftest import make_dataset, tiny_config

FAST = {"train.max_steps": 4, "sample.at_end": False}


# ---- 1. non-finite settings and weights ------------------------------------------------------------------------
@pytest.mark.parametrize("item", ["optim.lr=nan", "optim.lr=inf", "train.noise_offset=nan", "lora.alpha=inf",
                                  "train.max_steps=inf"])
def test_non_finite_settings_are_refused_before_anything_loads(item):
    with pytest.raises(ConfigError, match=item.split("=")[0]):
        RunConfig.load(overrides=[item])


def test_a_lora_with_nan_weights_is_never_written_and_the_last_good_file_stays(tiny_models, dataset, tmp_path,
                                                                              monkeypatch):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_models["sd1"], dataset, out, **{"train.max_steps": 4, "save.every_n_steps": 2,
                                                           "sample.at_end": False})
    real = loop._optimizer_step
    calls = {"n": 0}

    def poison(*a, **k):  # after step 3 every trained weight is NaN (what a diverged run leaves)
        result = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                for g in a[3]:
                    for p in g["params"]:
                        p.fill_(float("nan"))
        return result

    monkeypatch.setattr(loop, "_optimizer_step", poison)
    with pytest.raises(TrainingError, match="NaN or infinite by step 4.*not written"):
        loop.train(cfg)
    assert not (out / "run.safetensors").exists()
    good = load_file(str(out / "checkpoints" / "run-step000002.safetensors"))  # the checkpoint before stays
    assert all(torch.isfinite(t).all() for t in good.values())


# ---- 2. gradient accumulation ------------------------------------------------------------------------------------
def test_a_nan_gradient_in_an_earlier_micro_batch_skips_the_step_and_the_loss_is_their_mean(tiny_models, dataset,
                                                                                           tmp_path, monkeypatch):
    from trainer.training import step as step_mod

    real_loss, seen = step_mod.Step.loss, []

    def loss(self, batch):
        value = real_loss(self, batch)
        seen.append(value.item())
        if len(seen) == 1:  # micro-batch 1 of step 1: finite loss, NaN gradient (0 * inf at sqrt(0))
            p = next(pr for pr in self.denoiser.parameters() if pr.requires_grad)
            value = value + 0 * torch.sqrt(p.sum() - p.sum().detach())
        return value

    monkeypatch.setattr(step_mod.Step, "loss", loss)
    before = {}

    def remember(*a, **k):
        if not before:
            before.update({i: p.detach().clone() for i, g in enumerate(a[3]) for p in g["params"][:1]})
        return real_step(*a, **k)

    real_step = loop._optimizer_step
    monkeypatch.setattr(loop, "_optimizer_step", remember)
    out = tmp_path / "run"
    result = loop.train(tiny_config(tiny_models["sd1"], dataset, out, **{"train.max_steps": 3,
                                                                         "train.gradient_accumulation": 2,
                                                                         "sample.at_end": False}))
    events = read_events(out)
    steps = [e for e in events if e["type"] == "step"]
    assert result.steps == 3 and all(e["loss"] is not None for e in steps)
    for k, e in enumerate(steps):  # the logged loss is the mean over the step's micro-batches
        assert e["loss"] == pytest.approx((seen[2 * k] + seen[2 * k + 1]) / 2, rel=1e-6)
    skipped = [e for e in events if e["type"] == "warning" and "step 1 skipped" in e.get("message", "")]
    assert len(skipped) == 1
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "run.safetensors")).values())


# ---- 3. nested setting types ----------------------------------------------------------------------------------
@pytest.mark.parametrize("item,allowed", [('optim.betas=["a", 5, 7]', "a list of 2 numbers"),
                                          ("optim.betas=[0.9, 1.5]", "each >= 0.0 and < 1.0"),
                                          ("sample.prompts=[1, 2]", "a list of strings"),
                                          ('lora.unet_extra=["ff", 3]', "a list of strings")])
def test_nested_setting_types_and_lengths_are_checked(item, allowed):
    with pytest.raises(ConfigError, match=allowed.replace("[", r"\[")):
        RunConfig.load(overrides=[item])
    assert RunConfig.load(overrides=['sample.prompts="zorb, a red circle"']).sample.prompts == ["zorb, a red circle"]


# ---- 4. validation split ----------------------------------------------------------------------------------------
def test_a_validation_split_that_leaves_less_to_train_on_is_refused_with_the_numbers(tmp_path):
    from trainer.data.scan import scan
    from trainer.training.validation import SplitError, split

    found = scan(make_dataset(tmp_path / "d", n=16))
    with pytest.raises(SplitError, match="holds out 16 of 16 images and leaves 0 to train on; hold out at most 8"):
        split(found, 100, 0)
    with pytest.raises(SplitError, match="holds out 14 of 16 images and leaves 2"):
        split(found, 0.9, 0)
    train, val = split(found, 0.25, 0)
    assert len(train.items) == 12 and len(val.items) == 4
    with pytest.raises(SplitError, match="add images"):
        split(scan(make_dataset(tmp_path / "small", n=3)), 1, 0)


# ---- 5 and 6. Stop in every phase ---------------------------------------------------------------------------------
class StopWhen(Events):
    """Asks to stop once a given event has been written (as a user pressing Stop while it shows)."""

    def __init__(self, run_dir, after_event):
        super().__init__(run_dir)
        self.after = after_event

    def stop_requested(self):
        return any(e["type"] == self.after for e in read_events(self.run_dir))


@pytest.mark.parametrize("after,phase", [("plan", "loading the model"), ("cache", "caching latents"),
                                         ("validation_set", "preparing validation")])
def test_a_stop_before_training_is_honoured_in_that_phase(after, phase, tiny_models, dataset, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_models["sd1"], dataset, out, **{**FAST, "data.validation_split": 1})
    events = StopWhen(out, after)
    if after == "plan":
        events.emit("plan", text="memory plan")
    result = loop.train(cfg, events)
    assert result.stopped_early and result.steps == 0
    kinds = [e["type"] for e in read_events(out)]
    assert "step" not in kinds and kinds[-1] == "done"
    done = read_events(out)[-1]
    assert done["stopped"] is True and done["path"] is None and phase in done["message"]
    assert not (out / "run.safetensors").exists()


def test_a_stop_pressed_while_the_cli_starts_is_not_deleted(tiny_models, dataset, tmp_path):
    """The trainer no longer deletes STOP at start: only a STOP older than its process (an earlier crash) goes."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "STOP").write_text("")
    old = time.time() - 3600
    os.utime(out / "STOP", (old, old))  # left by a run that crashed an hour ago
    cmd = [sys.executable, "-m", "trainer", "train", "--model", str(tiny_models["sd1"]), "--dataset", str(dataset),
           "--output", str(out), "--set", "train.max_steps=200", "--set", "data.resolution=32", "--set",
           "data.bucket_step=8", "--set", "sample.at_end=false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(e["type"] == "plan" for e in read_events(out)):
        time.sleep(0.05)
    (out / "STOP").write_text("")  # pressed now, while the run loads: honoured, not deleted
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    steps = [e for e in read_events(out) if e["type"] == "step"]
    assert len(steps) < 200 and read_events(out)[-1]["type"] == "done" and read_events(out)[-1]["stopped"]
    assert not (out / "STOP").exists()  # cleared once honoured


class SecondStopMidImage(Events):
    """Stop at step 2; Stop again part-way through the first end sample's denoising."""

    def __init__(self, run_dir):
        super().__init__(run_dir)
        self.asked_in_end = 0

    def stop_requested(self):
        kinds = [e["type"] for e in read_events(self.run_dir)]
        if "end_samples" in kinds:
            self.asked_in_end += 1
            return self.asked_in_end >= 3  # before image 1, after denoising step 1, then yes
        return any(e["type"] == "step" and e["step"] >= 2 for e in read_events(self.run_dir))


def test_a_second_stop_during_an_end_sample_ends_it_and_skips_the_final_judging(tiny_models, dataset, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_models["sd1"], dataset, out, **{"train.max_steps": 50, "sample.prompts": ["a", "b"],
                                                           "sample.steps": 20, "data.validation_split": 1})
    events = SecondStopMidImage(out)
    result = loop.train(cfg, events)
    assert result.stopped_early and result.steps == 2
    kinds = [e["type"] for e in read_events(out)]
    assert "sample" not in kinds  # the half-made image is not kept as a sample
    assert events.asked_in_end < 20  # the denoising loop stopped after its step, not 20 steps later
    assert "end_skipped" in kinds and kinds.index("end_skipped") > kinds.index("end_samples")
    assert not any(e["type"] == "checkpoint" for e in read_events(out))  # no validation or drift renders after
    assert (out / "run.safetensors").exists()


# ---- 7. the drift bound and what estimates rest on -------------------------------------------------------------
def test_the_drift_bound_is_relative_to_the_bases_own_seed_spread_and_says_so():
    from trainer.training.validation import Checkpoint, drift_bound, recommend

    bound, basis = drift_bound(None, 0.25)
    assert bound == pytest.approx(0.2) and "0.8x the base model's own change between two seeds, 0.250" in basis
    assert drift_bound(0.05, 0.25) == (0.05, "train.drift_bound")
    cps = [Checkpoint(100, "a", 0.50, 0.05), Checkpoint(200, "b", 0.40, 0.19), Checkpoint(300, "c", 0.30, 0.30)]
    best, why = recommend(cps, bound, basis)
    assert best.step == 200  # 0.30 drift is past 0.8 x 0.25; a fixed 0.09 would have left only step 100
    assert "drift 0.190 within the 0.2 bound (0.8x the base model's own change" in why
    assert recommend(cps, 0.09)[0].step == 100


def test_a_run_measures_the_seed_spread_its_bound_rests_on(tiny_models, dataset, tmp_path):
    out = tmp_path / "run"
    loop.train(tiny_config(tiny_models["sd1"], dataset, out, **{"train.max_steps": 4, "save.every_n_steps": 2,
                                                                "data.validation_split": 1, "sample.at_end": False,
                                                                "sample.prompts": ["a red circle"]}))
    events = read_events(out)
    spread = [e for e in events if e["type"] == "seed_spread"]
    assert len(spread) == 1 and spread[0]["value"] > 0
    rec = next(e for e in events if e["type"] == "recommendation")
    assert "base model's own change between two seeds" in rec["message"]


def test_estimates_say_which_figures_were_not_measured():
    from trainer.memory.estimate import estimate

    def est(**sets):
        cfg = RunConfig.load(overrides=[f"{k}={v}" for k, v in sets.items()])
        return estimate(cfg).text()

    assert "Not measured" not in est(**{"model.family": '"sd1"', "model.source": '"sd1-folder"'})
    assert "SD2's memory" in est(**{"model.family": '"sd2"', "model.source": '"x"'})
    sd3 = est(**{"model.family": '"sd3"', "model.source": '"x"'})
    assert "SD3 on a GPU" in sd3 and "step time for sd3" in sd3
    assert "train.offload" in est(**{"model.family": '"sdxl"', "model.source": '"x"', "train.offload": "true"})


# ---- 8. DoRA as ComfyUI applies it --------------------------------------------------------------------------------
def comfyui_weight_decompose(dora_scale, weight, lora_diff, alpha):
    """ComfyUI's comfy/weight_adapter/base.py weight_decompose (strength 1), as it reads a dora_scale whose first
    dimension is the output's: W' = dora_scale * (W + alpha * diff) / ||W|| per output row, the norm of the base
    weight (an input-axis dora_scale takes the norm of W + diff per input column instead)."""
    diff = lora_diff * alpha
    calc = weight + diff
    if dora_scale.shape[0] == calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0],
                                                                                      *[1] * (weight.dim() - 1))
    else:
        norm = (calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1))
    return calc * (dora_scale / norm)  # raises on a shape ComfyUI cannot broadcast, as ComfyUI does


def test_dora_linear_and_conv_apply_in_comfyui_exactly_as_trained(tiny_models, dataset, tmp_path):
    from trainer.lora.write import kohya_name
    from trainer.lora.read import read_lora
    from trainer.models import load_base

    out = tmp_path / "dora"
    result = loop.train(tiny_config(tiny_models["sd1"], dataset, out, **{
        "train.max_steps": 3, "lora.use_dora": True, "lora.unet_extra": ["conv"], "optim.lr": 0.01,
        "sample.at_end": False, "save.dtype": "fp32"}))
    path = out / "dora.safetensors"
    sd = load_file(str(path))
    unet = result.models["lora_unet"]
    namer = load_base(str(tiny_models["sd1"])).family.unet_namer(unet.config)
    checked = {"linear": 0, "conv": 0}
    for name, mod in unet.named_modules():
        if not (hasattr(mod, "lora_magnitude_vector") and mod.lora_magnitude_vector):
            continue
        key = kohya_name("lora_unet", name, namer)
        base = mod.get_base_layer().weight.detach().float()
        up, down = sd[f"{key}.lora_up.weight"].float(), sd[f"{key}.lora_down.weight"].float()
        alpha = sd[f"{key}.alpha"].item() / down.shape[0]
        scale = sd[f"{key}.dora_scale"].float()
        assert scale.shape == (base.shape[0], *[1] * (base.dim() - 1))  # (out, 1, 1, 1) for a conv: ComfyUI's shape
        diff = (up.flatten(1) @ down.flatten(1)).reshape(base.shape)
        comfy = comfyui_weight_decompose(scale, base, diff, alpha)
        m = mod.lora_magnitude_vector["default"].weight.detach().float().reshape(-1)
        merged = base + mod.get_delta_weight("default").detach().float().reshape(base.shape)
        peft_weight = merged * (m / merged.reshape(merged.shape[0], -1).norm(dim=1)).reshape(-1, *[1] * (base.dim() - 1))
        torch.testing.assert_close(comfy, peft_weight, rtol=1e-4, atol=1e-6)
        assert (peft_weight - base).abs().max() > 1e-5  # it trained: there is a difference to get right
        checked["conv" if base.dim() == 4 else "linear"] += 1
    assert checked["linear"] > 0 and checked["conv"] > 0, checked
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["lora_studio.dora_norm"] == "base"
    lora = read_lora(path)  # our own readers (Preview, bake) read the magnitude back
    mod = next(m for n, m in unet.named_modules() if hasattr(m, "lora_magnitude_vector") and m.lora_magnitude_vector)
    name = kohya_name("lora_unet", next(n for n, m in unet.named_modules() if m is mod), namer)
    torch.testing.assert_close(lora.modules[name].magnitude(mod.get_base_layer().weight.detach()),
                               mod.lora_magnitude_vector["default"].weight.detach().float().reshape(-1), rtol=1e-4,
                               atol=1e-6)


# ---- 9. bake: the text encoder in the layout ComfyUI and A1111 read ------------------------------------------------
def test_a_baked_text_encoder_keeps_the_text_model_prefix_and_loads_everywhere(tiny_models, dataset, tmp_path):
    from transformers import CLIPTextModel

    out = tmp_path / "run"
    loop.train(tiny_config(tiny_models["sd1"], dataset, out, **{"train.max_steps": 2, "sample.at_end": False,
                                                                "lora.train_text_encoder": True}))
    assert cli_main(["lora", "bake", str(out / "run.safetensors"), "--model", str(tiny_models["sd1"]),
                     "--out", str(tmp_path / "baked")]) == 0
    keys = list(load_file(str(tmp_path / "baked" / "text_encoder" / "model.safetensors")))
    # ComfyUI's SD1 clip loader and A1111 look for these names; transformers 5 writes them without text_model.
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "text_model.embeddings.token_embedding.weight" in keys and "text_model.final_layer_norm.weight" in keys
    assert all(k.startswith("text_model.") for k in keys)
    baked = CLIPTextModel.from_pretrained(str(tmp_path / "baked" / "text_encoder"))
    plain = CLIPTextModel.from_pretrained(str(Path(tiny_models["sd1"]) / "text_encoder"))
    changed = [n for (n, a), (_, b) in zip(baked.state_dict().items(), plain.state_dict().items()) if not torch.equal(a, b)]
    assert any("q_proj" in n for n in changed)  # the LoRA is in the weights transformers loads back


# ---- 10. metadata as kohya writes it ---------------------------------------------------------------------------
def test_metadata_counts_tags_per_image_and_names_datasets_as_kohya_does(tiny_models, tmp_path):
    ds = tmp_path / "ds"
    make_dataset(ds / "3_zorb", n=2)
    make_dataset(ds / "1_extra", n=1, size=(56, 40))  # another image than 3_zorb's first (no duplicate)
    out = tmp_path / "run"
    loop.train(tiny_config(tiny_models["sd1"], ds, out, **{**FAST, "model.prediction_type": "v_prediction"}))
    with safe_open(str(out / "run.safetensors"), "pt") as f:
        md = f.metadata()
    assert all(isinstance(v, str) for v in md.values())
    freq = json.loads(md["ss_tag_frequency"])
    assert freq["3_zorb"] == {"a red circle": 1, "a blue circle": 1}  # per image, not times its 3 repeats
    dirs = json.loads(md["ss_dataset_dirs"])
    assert dirs == {"3_zorb": {"n_repeats": 3, "img_count": 2}, "1_extra": {"n_repeats": 1, "img_count": 1}}
    (dataset,) = json.loads(md["ss_datasets"])
    assert dataset["num_train_images"] == 7 and {s["image_dir"] for s in dataset["subsets"]} == {"3_zorb", "1_extra"}
    assert md["ss_num_train_images"] == "7"
    assert md["modelspec.prediction_type"] == "v"  # the spec's word, not "v_prediction"
    assert len(md["ss_new_sd_model_hash"]) == 64  # a diffusers folder is hashed too (its UNet's weights)


def test_sd3_files_do_not_claim_kohyas_module_or_an_alpha_they_do_not_use():
    from trainer.lora.write import build_metadata
    from trainer.models.families import FAMILIES

    cfg = RunConfig.load(overrides=["lora.rank=8", "lora.alpha=4"])
    fam = FAMILIES["sd3"]
    md = build_metadata(name="x", family=fam, cfg=cfg, resolution=1024, prediction_type="flow_matching",
                        train_text_encoder=False, datasets={}, steps=1, epoch=1, started=0, finished=0, base_name="b",
                        base_hash="")
    assert md["ss_network_module"] == "networks.lora_sd3" and md["ss_network_alpha"] == "8.0"  # sd-scripts' SD3 net
    assert md["lora_studio.trained_alpha"] == "4.0" and "modelspec.prediction_type" not in md


def test_metadata_values_must_be_strings(tmp_path):
    from trainer.lora.write import save_lora

    with pytest.raises(TypeError, match="strings"):
        save_lora(tmp_path / "x.safetensors", {"a": torch.zeros(1)}, {"ss_steps": 3})
    assert not (tmp_path / "x.safetensors").exists()


# ---- 11-15. one-line errors, nothing written where it should not be ----------------------------------------------
def test_the_apps_start_up_check_waits_for_a_busy_machine(monkeypatch):
    import httpx

    from app.main import patient_url_ok

    calls = []

    def slow_then_up(url, **kw):
        calls.append(kw["timeout"])
        if len(calls) < 3:
            raise httpx.ReadTimeout("timed out")
        return httpx.Response(200)

    monkeypatch.setattr(httpx, "head", slow_then_up)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    assert patient_url_ok("http://127.0.0.1:1/", deadline_s=60) and len(calls) == 3
    monkeypatch.setattr(httpx, "head", lambda url, **kw: (_ for _ in ()).throw(httpx.ConnectError("refused")))
    assert not patient_url_ok("http://127.0.0.1:1/", deadline_s=0)


def test_the_embedded_model_is_read_only_for_the_ui(tmp_path):
    from app import confine
    from app.workspace import Workspace, WorkspaceError
    from trainer.resources import EMBEDDED_MODEL

    ws = Workspace(tmp_path / "ws").ensure(with_samples=False)
    cfg = RunConfig.load(overrides=[f'data.cache_dir="{EMBEDDED_MODEL / "cache"}"', 'data.dataset="d"'])
    with pytest.raises(WorkspaceError, match="data.cache_dir .* inside the installed embedded model, which is read only"):
        confine.run_config(ws, cfg)
    assert confine.model(ws, "model.source", str(EMBEDDED_MODEL)) == str(EMBEDDED_MODEL)  # still a base model


def test_a_state_is_on_disk_before_complete_says_so(tmp_path, monkeypatch):
    from trainer.training import state

    order = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: order.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    real_write = state.write_text
    monkeypatch.setattr(state, "write_text", lambda p, t: order.append(("write", str(p))) or real_write(p, t))
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state.commit(tmp_path, 1, {"p": param}, opt, sched, torch.amp.GradScaler("cpu", enabled=False), {"step": 1}, 2)
    complete = next(i for i, (what, p) in enumerate(order) if what == "write" and p.endswith("COMPLETE"))
    synced = {Path(p).name for what, p in order[:complete] if what == "fsync"}
    assert {"lora.safetensors", "optim.pt", "counters.json"} <= synced
    assert any(what == "fsync" and p.endswith("state") for what, p in order[complete:])  # the rename, too


def test_the_librarys_import_is_atomic(tmp_path, monkeypatch):
    import shutil

    from app import library
    from app.workspace import Workspace

    ws = Workspace(tmp_path / "ws").ensure(with_samples=False)
    src = tmp_path / "style.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.lora_up.weight": torch.ones(4, 2)},
              str(src))

    def half_copy(a, b, *args, **kw):
        Path(b).write_bytes(Path(a).read_bytes()[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", half_copy)
    with pytest.raises(OSError):
        library.import_file(ws, str(src))
    assert list(ws.loras.iterdir()) == []  # no half file under the LoRA's name
    monkeypatch.undo()
    assert library.import_file(ws, str(src)).read_bytes() == src.read_bytes()


def test_a_hub_model_that_fails_from_the_cache_says_why(monkeypatch):
    from trainer.models import loading as models
    from trainer.errors import ModelError

    calls = []

    def from_pretrained(source, local_only, dtype, t5):
        calls.append(local_only)
        if local_only:
            raise OSError("owner/model is not cached locally (LocalEntryNotFoundError)")
        raise ConnectionError("no network")

    monkeypatch.setattr(models, "_from_pretrained", from_pretrained)
    with pytest.raises(ModelError, match="not in the local cache .owner/model is not cached locally.*no network"):
        models._from_hub("owner/model")
    assert calls == [True, False]

    def broken_cache(source, local_only, dtype, t5):
        calls.append(local_only)
        raise ValueError("cached model_index.json is damaged")

    calls.clear()
    monkeypatch.setattr(models, "_from_pretrained", broken_cache)
    with pytest.raises(ValueError, match="damaged"):  # said, not swallowed into a download attempt
        models._from_hub("owner/model")
    assert calls == [True]


def test_import_of_a_missing_folder_exits_non_zero(tmp_path, capsys):
    assert cli_main(["dataset", "import", str(tmp_path / "nowhere"), "--to", str(tmp_path / "ds")]) == 2
    assert "do not exist" in capsys.readouterr().err


# ---- 21. CPUs without fast bf16 -------------------------------------------------------------------------------------
def test_a_cpu_without_fast_bf16_trains_in_fp32_and_the_plan_says_so(monkeypatch):
    from trainer.memory.plan import Budget, candidates, make_plan

    cfg = RunConfig.load(overrides=["train.mixed_precision=bf16", 'data.dataset="d"'])
    monkeypatch.setenv("LORA_STUDIO_CPU_BF16", "slow")
    plan = make_plan(cfg, Budget("cpu", 20.0, 20.0, "a CPU"))
    assert plan.fits and "train.mixed_precision=no" in plan.overrides
    assert "bf16 is 15-30x slower than fp32" in plan.text() and "does not fit" not in plan.text()
    assert not any("bf16" in c.name or "fp8" in c.name for c in candidates(RunConfig(), "cpu"))
    gpu = make_plan(cfg, Budget("cuda", 24.0, 64.0, "a GPU"))
    assert "train.mixed_precision=no" not in gpu.overrides  # a GPU keeps its half precision
    monkeypatch.setenv("LORA_STUDIO_CPU_BF16", "fast")
    assert make_plan(cfg, Budget("cpu", 20.0, 20.0, "a CPU")).overrides == []
    assert any("bf16" in c.name for c in candidates(RunConfig(), "cpu"))


def test_cpu_bf16_detection_reads_the_flags(monkeypatch, tmp_path):
    from trainer.memory import cpu_features

    monkeypatch.delenv("LORA_STUDIO_CPU_BF16")
    cpu_features._detected.cache_clear()
    monkeypatch.setattr(cpu_features.sys, "platform", "linux")
    monkeypatch.setattr(cpu_features, "_linux_flags", lambda: {"fpu", "avx2", "fma"})
    assert cpu_features.bf16_fast() is False
    cpu_features._detected.cache_clear()
    monkeypatch.setattr(cpu_features, "_linux_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert cpu_features.bf16_fast() is True
    cpu_features._detected.cache_clear()
    monkeypatch.setattr(cpu_features.sys, "platform", "win32")
    monkeypatch.setattr(cpu_features, "_record_path", lambda: tmp_path / "cpu-bf16.json")
    assert cpu_features.bf16_fast() is False  # nothing recorded yet: fp32 is never wrong
    (tmp_path / "cpu-bf16.json").write_text(json.dumps({"bf16_fast": True}))
    cpu_features._detected.cache_clear()
    assert cpu_features.bf16_fast() is True
    cpu_features._detected.cache_clear()


# ---- 17. Preview says what it is doing ---------------------------------------------------------------------------
def test_preview_reports_its_phases(tmp_path):
    from trainer.preview.previewer import Previewer, Request

    said = []
    image, settings = Previewer(said.append).generate(Request(base="tiny", prompt="a red circle", steps=3))
    assert said[0].startswith("loading the base model") and said[-1] == "denoising: step 3 of 3"
    assert "denoising: step 1 of 3" in said and image.size[0] > 0


def test_the_lora_check_the_app_runs_needs_no_torch(tmp_path):
    """Dropping a LoRA into Preview or the Library checks it without torch, as thoroughly as lora inspect."""
    from safetensors.torch import save_file

    from trainer.lora import header as lora_header

    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4, dtype=torch.bfloat16),
               "lora_unet_x.lora_up.weight": torch.ones(4, 2, dtype=torch.bfloat16)}, str(good))
    assert lora_header.check(good) == []
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4, dtype=torch.bfloat16),
               "lora_unet_x.lora_up.weight": torch.full((4, 3), float("nan"), dtype=torch.bfloat16)}, str(bad))
    defects = lora_header.check(bad)
    assert any("ranks that do not match" in d for d in defects) and any("NaN" in d for d in defects)
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_x.hada_w1_a": torch.ones(2, 2)}, str(loha))
    with pytest.raises(lora_header.HeaderError, match="LoHa"):
        lora_header.check(loha)
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-4])
    with pytest.raises(lora_header.HeaderError, match="truncated"):
        lora_header.check(tmp_path / "cut.safetensors")
    code = "import sys, trainer.lora.header; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_lora_studio_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "app", "--help"], capture_output=True, text=True, timeout=60).stdout
    for command in ("ui", "train", "dataset", "lora", "bench", "doctor"):
        assert f"\n  {command} " in out, out
