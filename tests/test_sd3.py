"""SD 3 / 3.5 on a tiny SD3 pipeline built from config (MMDiT with SD3.5's attn2 and qk-norm, CLIP-L, CLIP-G, T5,
16-channel VAE, flow-matching scheduler): it trains through the CLI by rectified flow, every key of the exported
file is consumed by diffusers' SD3 loader and is one ComfyUI maps, the fused weights equal W + up·down·alpha/rank,
the T5 can be left out, and Preview, inspect, resize and merge know the family."""
import math

import pytest
import torch
from safetensors import safe_open

from tests.conftest import tiny_config
from trainer.training import loop, setup
from trainer.models import loading as models
from trainer.models import tiny
from trainer.lora import tools
from trainer.cli import main as cli_main
from trainer.config import RunConfig
from trainer.training.events import read_events
from trainer.lora.read import read_lora
from trainer.models.schedules import FlowMatching


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return tiny.build_pipeline("sd3", tmp_path_factory.mktemp("sd3") / "sd3", seed=0)


@pytest.fixture(scope="module")
def trained(sd3, tmp_path_factory):
    """One CLI run with the text encoders trained too, rank 4 at alpha 2 (so the scale is not 1), saved in fp32."""
    from tests.conftest import make_dataset

    root = tmp_path_factory.mktemp("sd3run")
    data = make_dataset(root / "data", n=4)
    cfg = tiny_config(sd3, data, root / "run", **{"train.max_steps": 12, "lora.alpha": 2.0, "save.dtype": "fp32",
                                                 "lora.train_text_encoder": True, "data.validation_split": 1,
                                                 "save.every_n_steps": 6, "sample.steps": 2})
    (root / "c.toml").write_text(cfg.to_toml())
    assert cli_main(["train", "--config", str(root / "c.toml")]) == 0
    return root / "run"


def _file(run):
    path = next(run.glob("*.safetensors"))
    with safe_open(str(path), "pt") as f:
        return path, {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _layer(model, module_path: str):
    """A module by the file's path; diffusers drops the `text_model.` level where transformers 5's CLIP lacks it."""
    try:
        return model.get_submodule(module_path)
    except AttributeError:
        return model.get_submodule(module_path.removeprefix("text_model."))


def diffusers_applies_the_file(pipe, path, tensors: dict) -> None:
    """diffusers' own loader takes every key of the file onto a peft layer with exactly its values, and the fused
    weights are W + up·down (the scale folded into lora_B): the export loads as trained."""
    components = {k.split(".")[0] for k in tensors}
    before = {c: {n: p.detach().clone() for n, p in getattr(pipe, c).named_parameters()} for c in components}
    pipe.load_lora_weights(str(path), adapter_name="x")
    for key, value in tensors.items():  # every key landed on a peft layer with exactly its values
        component, _, rest = key.partition(".")
        module_path, kind = rest.rsplit(".lora_", 1)
        layer = _layer(getattr(pipe, component), module_path)
        assert torch.equal(getattr(layer, "lora_" + kind.split(".")[0])["x"].weight, value), key
    pipe.fuse_lora(components=sorted(components), lora_scale=1.0)
    checked = 0
    for key in (k for k in tensors if k.endswith(".lora_A.weight")):
        component, _, rest = key.partition(".")
        module_path = rest[: -len(".lora_A.weight")]
        name = f"{module_path}.weight"
        base = before[component].get(name) if name in before[component] else \
            before[component][name.removeprefix("text_model.")]
        layer = _layer(getattr(pipe, component), module_path)
        fused = layer.base_layer.weight if hasattr(layer, "base_layer") else layer.weight
        up = tensors[key.replace(".lora_A.", ".lora_B.")]
        assert torch.allclose(fused, base + up @ tensors[key], atol=1e-6), key
        checked += 1
    assert checked == len(tensors) // 2


def test_flow_matching_noises_along_the_line_and_shifts_sigma():
    fm = FlowMatching({"shift": 3.0, "num_train_timesteps": 1000})
    x0, eps = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    noisy, target, model_t = fm.noised(x0, eps, torch.tensor([0.0, 1.0]))
    assert torch.equal(noisy[0], x0[0]) and torch.equal(noisy[1], eps[1])  # sigma 0 is the image, 1 pure noise
    assert torch.equal(target, eps - x0) and model_t.tolist() == [0.0, 1000.0]
    sigmas = fm.sample(20000, torch.Generator().manual_seed(0))
    # logit-normal u has median 0.5; shift 3 moves it to 3·0.5/(1+2·0.5) = 0.75
    assert 0 < float(sigmas.min()) and float(sigmas.max()) < 1 and abs(float(sigmas.median()) - 0.75) < 0.01
    spread = fm.spread(20)
    assert torch.all(spread[1:] > spread[:-1]) and torch.equal(spread, fm.spread(20))  # fixed for validation


def test_sd3_trains_through_the_cli_and_records_flow_matching(trained):
    cfg = RunConfig.load(str(trained / "config.toml"))
    assert cfg.model.family == "sd3" and cfg.model.prediction_type == "flow_matching"
    events = read_events(trained)
    losses = [e["loss"] for e in events if e["type"] == "step"]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    vals = [e["loss"] for e in events if e["type"] == "validation"]
    assert len(vals) >= 2 and vals[-1] < vals[0]  # the held-out flow-matching loss falls
    assert any(e["type"] == "sample" for e in events)  # the flow sampler renders
    _, tensors, md = _file(trained)
    assert md["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora" and md["ss_base_model_version"] == "sd3"
    assert "modelspec.prediction_type" not in md  # the spec has epsilon and v only; kohya writes none for flow models
    assert not any(k.endswith(".alpha") for k in tensors)  # the scale is folded into lora_B
    assert md["ss_network_module"] == "networks.lora_sd3" and md["ss_network_alpha"] == str(float(md["ss_network_dim"]))


def test_every_key_is_consumed_by_diffusers_and_fused_weights_are_w_plus_scaled_update(sd3, trained):
    from diffusers import StableDiffusion3Pipeline

    path, tensors, _ = _file(trained)
    components = {k.split(".")[0] for k in tensors}
    assert components == {"transformer", "text_encoder", "text_encoder_2"}
    # attn, attn2 (SD3.5) and the context stream's projections are all there
    assert any(".attn2.to_q." in k for k in tensors) and any(".attn.add_k_proj." in k for k in tensors)
    assert any(".attn.to_add_out." in k for k in tensors)
    # The trained run's own layers: alpha 2 over rank 4 gives scale 0.5, folded into lora_B.
    run_cfg = RunConfig.load(str(trained / "config.toml"))
    assert run_cfg.lora.rank == 4 and run_cfg.lora.alpha == 2.0
    diffusers_applies_the_file(StableDiffusion3Pipeline.from_pretrained(str(sd3)), path, tensors)


def test_the_folded_update_is_up_down_alpha_over_rank_of_the_trained_layers(sd3, dataset, tmp_path):
    """The file holds B·scale, so B_file·A_file equals the live peft layer's B·A·alpha/rank exactly."""
    cfg = tiny_config(sd3, dataset, tmp_path / "run", **{"train.max_steps": 2, "lora.alpha": 2.0,
                                                       "save.dtype": "fp32", "sample.at_end": False})
    result = loop.train(cfg)
    _, tensors, _ = _file(tmp_path / "run")
    transformer = result.models["lora_transformer"]
    for key in (k for k in tensors if k.endswith(".lora_A.weight")):
        layer = transformer.get_submodule(key[len("transformer."): -len(".lora_A.weight")])
        expected = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * (2.0 / 4)
        assert torch.allclose(tensors[key.replace("lora_A", "lora_B")] @ tensors[key], expected, atol=1e-7)


def test_every_key_is_one_comfyui_maps(sd3, trained):
    """ComfyUI's SD3 map (comfy/lora.py model_lora_keys_unet/clip) names each diffusers transformer Linear as
    "transformer.<path>" and CLIP layers as "text_encoder[_2].text_model.encoder.layers.N.<self_attn.x_proj|mlp.fcN>";
    the LoRA weights are then read from "<name>.lora_A/lora_B.weight". The same rule, applied to the tiny model."""
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(str(sd3 / "transformer"))
    mapped = {f"transformer.{n}" for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    clip = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"]
    for prefix in ("text_encoder", "text_encoder_2"):
        mapped |= {f"{prefix}.text_model.encoder.layers.{b}.{c}" for b in range(2) for c in clip}
    _, tensors, _ = _file(trained)
    names = {k.rsplit(".lora_", 1)[0] for k in tensors}
    assert names and names <= mapped, sorted(names - mapped)[:3]
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)


def test_t5_can_be_left_out(sd3, dataset, tmp_path, monkeypatch):
    loaded = []
    real = models.load_base

    def spy(*a, **k):
        loaded.append(real(*a, **k))
        return loaded[-1]

    monkeypatch.setattr(setup, "load_base", spy)
    cfg = tiny_config(sd3, dataset, tmp_path / "run", **{"train.max_steps": 2, "model.t5": False,
                                                       "sample.at_end": False,
                                                       "data.cache_text": False})  # the encoders stay, to ask below
    loop.train(cfg)
    base = loaded[0]
    assert isinstance(base.text_encoders[2], models.NoT5) and base.tokenizers[2] is None
    hidden, pooled = base.family.encode(base.text_encoders, base.family.tokenize(base.tokenizers, ["a red circle"]))
    clip_tokens = base.tokenizers[0].model_max_length
    assert hidden.shape[1] == 2 * clip_tokens and not hidden[:, clip_tokens:].any()  # T5's half is zeros
    assert RunConfig.load(str(tmp_path / "run" / "config.toml")).model.t5 is False
    assert any(e["type"] == "done" for e in read_events(tmp_path / "run"))


def test_preview_inspect_resize_and_merge_know_sd3(sd3, trained, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from trainer.preview.previewer import Previewer, Request, Slot

    path, _, _ = _file(trained)
    info = tools.inspect(path)
    assert info["family"] == "sd3" and info["layout"] == "peft" and not info["defects"]
    p = Previewer()
    req = Request(base=str(sd3), prompt="a red circle", steps=2, size=32, seed=1)
    plain, settings = p.generate(req)
    assert settings["scheduler"] == "FlowMatchEulerDiscreteScheduler" and settings["family"] == "sd3"
    with_lora, _ = p.generate(Request(**{**req.__dict__, "loras": [Slot(str(path), weight=1.0)]}))
    off, _ = p.generate(Request(**{**req.__dict__, "loras": [Slot(str(path), weight=0.0)]}))
    assert off.tobytes() == plain.tobytes() and with_lora.tobytes() != plain.tobytes()

    small = tools.resize(path, tmp_path / "r2.safetensors", rank=2, dtype="fp32")
    merged = tools.merge([path, path], [0.5, 0.5], tmp_path / "m.safetensors", dtype="fp32")
    for out in (small["file"], merged["file"]):
        lora = read_lora(out)
        assert lora.family == "sd3" and lora.layout == "peft"
        pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3))
        pipe.load_lora_weights(out, adapter_name="y")  # diffusers' SD3 loader takes the rewritten file too
        with safe_open(out, "pt") as f:
            keys = list(f.keys())
        placed = sum(1 for k in keys if k.startswith("transformer.") and
                     "y" in pipe.transformer.get_submodule(k[len("transformer."):].rsplit(".lora_", 1)[0]).lora_A)
        assert placed == sum(k.startswith("transformer.") for k in keys)
    # merging a LoRA with itself at 0.5 + 0.5 is the same update
    a, b = read_lora(path), read_lora(merged["file"])
    for name, m in a.modules.items():
        assert torch.allclose(b.modules[name].delta(), m.delta(), atol=1e-6)


def test_a_stopped_sd3_run_resumes_to_the_same_file(sd3, dataset, tmp_path):
    """The flow-matching sigmas come from the run's own generator, so Stop and Resume give the uninterrupted file."""
    from trainer.training import state
    from trainer.training.events import Events

    settings = {"train.max_steps": 6, "save.state_every_n_steps": 0, "sample.at_end": False}
    ref = loop.train(tiny_config(sd3, dataset, tmp_path / "a" / "run", **settings)).lora_path.read_bytes()
    run = tmp_path / "b" / "run"

    class StopAt(Events):  # presses Stop after step 2, as the UI's Stop button does
        def step(self, step, *a, **k):
            if step == 2:
                (self.run_dir / "STOP").touch()
            return super().step(step, *a, **k)

    first = loop.train(tiny_config(sd3, dataset, run, **settings), events=StopAt(run))
    assert first.stopped_early and first.steps == 2 and state.latest(run).name == "step-000002"
    second = loop.train(RunConfig.load(run / "config.toml"), resume=True)
    assert second.steps == 6 and second.lora_path.read_bytes() == ref


def test_bake_fuses_an_sd3_lora_into_a_loadable_sd3_folder(sd3, trained, tmp_path):
    from diffusers import SD3Transformer2DModel

    path, tensors, _ = _file(trained)
    out = tools.bake(str(sd3), [str(path)], [1.0], tmp_path / "baked")
    baked = models.load_base(out["folder"])
    assert baked.family.name == "sd3" and out["modules_changed"] == len(read_lora(path).modules)
    before = SD3Transformer2DModel.from_pretrained(str(sd3 / "transformer"))
    for key in (k for k in tensors if k.startswith("transformer.") and k.endswith(".lora_A.weight")):
        module_path = key[len("transformer."): -len(".lora_A.weight")]
        expected = before.get_submodule(module_path).weight + tensors[key.replace("lora_A", "lora_B")] @ tensors[key]
        assert torch.allclose(baked.unet.get_submodule(module_path).weight, expected, atol=1e-6), key


def test_an_sd3_single_file_is_recognised_and_a_hub_failure_says_what_to_do(tmp_path, monkeypatch):
    """No download here: the loader must pick diffusers' SD3 single-file loader for joint_blocks keys, and when that
    cannot reach the gated config repo, say how to get access in one line."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import save_file

    from trainer.errors import ModelError

    path = tmp_path / "sd3.5_medium.safetensors"
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(6, 2)}, str(path))
    called = {}

    def offline(cls, source, **kwargs):
        called.update(kwargs, source=source)
        raise OSError("You are trying to access a gated repo.\nMake sure to have access to it.")

    monkeypatch.setattr(StableDiffusion3Pipeline, "from_single_file", classmethod(offline))
    with pytest.raises(ModelError, match=r"gated repo\. An SD3 single file.*hf auth login") as e:
        models.load_base(str(path), dtype=torch.bfloat16, t5=False)
    assert "\n" not in str(e.value)
    assert called["source"] == str(path) and called["torch_dtype"] == torch.bfloat16
    assert called["text_encoder_3"] is None and called["tokenizer_3"] is None  # model.t5=false loads no T5


def test_sd3_trains_with_fp8_frozen_weights_checkpointing_and_trained_clips(sd3, dataset, tmp_path):
    """The memory savings work on the MMDiT and T5 too: frozen bulk in float8, LoRA weights fp32, finite losses."""
    from trainer.memory import frozen

    cfg = tiny_config(sd3, dataset, tmp_path / "run", **{"train.max_steps": 3, "train.mixed_precision": "bf16",
                                                       "train.frozen_dtype": "fp8", "train.gradient_checkpointing": True,
                                                       "lora.train_text_encoder": True, "sample.at_end": False,
                                                       "train.min_snr_gamma": 5.0})
    result = loop.train(cfg)
    transformer = result.models["lora_transformer"]
    assert frozen.stored_bytes(transformer)["float8_e4m3fn"] > 0
    for name, mod in transformer.named_modules():  # the attention and MLP bulk in float8; adaptive norms and
        if name.endswith(("attn.to_q.base_layer", "ff.net.2", "attn2.to_k.base_layer")):  # embeddings half, as
            assert mod.stored_weight.dtype == frozen.STORAGE, name  # diffusers' layerwise casting keeps "norm"
        if name.endswith(("norm1.linear", "context_embedder")):
            assert not hasattr(mod, "stored_weight") and mod.weight.dtype == torch.bfloat16, name
    for model in result.models.values():
        assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    events = read_events(tmp_path / "run")
    losses = [e["loss"] for e in events if e["type"] == "step"]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert any(e["type"] == "warning" and "min_snr_gamma does not apply" in e["message"] for e in events)
