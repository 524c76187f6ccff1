"""Flux.1 and Z-Image on tiny pipelines built from config (the real diffusers and transformers classes): each trains
through the CLI by rectified flow, diffusers' own pipeline consumes every key of the exported file and its fused
weights are W + up·down·alpha/rank, every key is one ComfyUI's map for the family sends to a weight, samples render,
Preview/inspect/resize/merge/bake know the family, a stopped run resumes to the same file, and each family encodes
prompts, packs latents and shifts its timesteps exactly as diffusers' pipeline for it does."""
import math
import re

import pytest
import torch
from safetensors import safe_open

from tests.conftest import make_dataset, tiny_config
from tests.test_sd3 import _file, diffusers_applies_the_file
from trainer.cli import main as cli_main
from trainer.config import RunConfig
from trainer.errors import ModelError
from trainer.lora import tools
from trainer.lora.read import read_lora
from trainer.models import loading as models
from trainer.models import tiny
from trainer.training import loop
from trainer.training.events import read_events

FAMILIES = ["flux", "zimage"]
PIPELINES = {"flux": "FluxPipeline", "flux-schnell": "FluxPipeline", "zimage": "ZImagePipeline"}
TRANSFORMERS = {"flux": "FluxTransformer2DModel", "zimage": "ZImageTransformer2DModel"}


def pipeline_class(family: str):
    import diffusers

    return getattr(diffusers, PIPELINES[family])


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("modern")
    return {fam: tiny.build_pipeline(fam, root / fam, seed=0) for fam in ("flux", "flux-schnell", "zimage")}


@pytest.fixture(scope="module")
def trained(bases, tmp_path_factory):
    """One CLI run per family, rank 4 at alpha 2 (so the scale is not 1), saved in fp32, with a held-out image and a
    checkpoint; Flux trains its CLIP-L too (Z-Image's encoder is never trained)."""
    root = tmp_path_factory.mktemp("modern-runs")
    data = make_dataset(root / "data", n=4)
    out = {}
    for fam in FAMILIES:
        cfg = tiny_config(bases[fam], data, root / fam, **{
            "train.max_steps": 8, "lora.alpha": 2.0, "save.dtype": "fp32", "lora.train_text_encoder": fam == "flux",
            "data.validation_split": 1, "save.every_n_steps": 4, "sample.steps": 2, "optim.lr": 5e-3})
        (root / f"{fam}.toml").write_text(cfg.to_toml())
        assert cli_main(["train", "--config", str(root / f"{fam}.toml")]) == 0
        out[fam] = root / fam
    return out


@pytest.mark.parametrize("fam", FAMILIES)
def test_it_trains_through_the_cli_by_flow_matching_and_samples_render(trained, fam):
    run = trained[fam]
    cfg = RunConfig.load(str(run / "config.toml"))
    assert cfg.model.family == fam and cfg.model.prediction_type == "flow_matching"
    events = read_events(run)
    losses = [e["loss"] for e in events if e["type"] == "step"]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert [e for e in events if e["type"] == "checkpoint" and e.get("validation_loss") is not None]
    samples = [e for e in events if e["type"] == "sample"]
    assert samples and all((run / e["path"]).exists() if not e["path"].startswith("/") else True for e in samples)
    _, _, md = _file(run)
    arch = {"flux": "flux-1-dev/lora", "zimage": "z-image/lora"}[fam]
    assert md["modelspec.architecture"] == arch and md["ss_base_model_version"] == {"flux": "flux1", "zimage":
                                                                                     "zimage"}[fam]


@pytest.mark.parametrize("fam", FAMILIES)
def test_every_key_is_consumed_by_diffusers_and_fused_weights_are_w_plus_scaled_update(bases, trained, fam,
                                                                                        peft_warnings):
    path, tensors, _ = _file(trained[fam])
    components = {k.split(".")[0] for k in tensors}
    assert components == ({"transformer", "text_encoder"} if fam == "flux" else {"transformer"})
    if fam == "flux":  # both streams of the double blocks, and the single blocks
        assert any(".attn.add_k_proj." in k for k in tensors) and any(".attn.to_add_out." in k for k in tensors)
        assert any(k.startswith("transformer.single_transformer_blocks.") for k in tensors)
    else:  # the main layers and both refiners
        for part in ("layers", "noise_refiner", "context_refiner"):
            assert any(k.startswith(f"transformer.{part}.") for k in tensors), part
    diffusers_applies_the_file(pipeline_class(fam).from_pretrained(str(bases[fam])), path, tensors)
    assert not [r for r in peft_warnings.records if "unexpected" in r.getMessage().lower() or
                "missing" in r.getMessage().lower()], [r.getMessage() for r in peft_warnings.records][:3]


def test_the_folded_update_is_up_down_alpha_over_rank_of_the_trained_layers(bases, tmp_path):
    data = make_dataset(tmp_path / "data", n=4)
    for fam in FAMILIES:
        cfg = tiny_config(bases[fam], data, tmp_path / fam, **{"train.max_steps": 2, "lora.alpha": 2.0,
                                                             "save.dtype": "fp32", "sample.at_end": False})
        result = loop.train(cfg)
        _, tensors, _ = _file(tmp_path / fam)
        transformer = result.models["lora_transformer"]
        for key in (k for k in tensors if k.endswith(".lora_A.weight")):
            layer = transformer.get_submodule(key[len("transformer."): -len(".lora_A.weight")])
            expected = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * (2.0 / 4)
            assert torch.allclose(tensors[key.replace("lora_A", "lora_B")] @ tensors[key], expected, atol=1e-7)


# ComfyUI's key maps, as comfy/utils.py writes them (read at comfyanonymous/ComfyUI; flux_to_diffusers and
# z_image_to_diffusers) and comfy/lora.py applies them (model_lora_keys_unet: "transformer.<diffusers name>" for both
# families; "<name>.lora_A/lora_B.weight" read by load_lora). Every diffusers Linear named here becomes a weight of
# ComfyUI's layout (the q, k and v of a fused qkv as slices of it).
COMFY_FLUX = re.compile(
    r"transformer\.(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|"
    r"to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|norm1\.linear|norm1_context\.linear)|"
    r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out|norm\.linear))")
COMFY_ZIMAGE = re.compile(
    r"transformer\.(layers|noise_refiner|context_refiner)\.(?P<i>\d+)\.(attention\.(to_q|to_k|to_v|to_out\.0)|"
    r"feed_forward\.(w1|w2|w3))")
COMFY_CLIP_L = re.compile(r"text_encoder\.text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")


@pytest.mark.parametrize("fam", FAMILIES)
def test_every_key_is_one_comfyui_maps(bases, trained, fam):
    _, tensors, _ = _file(trained[fam])
    names = {k.rsplit(".lora_", 1)[0] for k in tensors}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    rule = COMFY_FLUX if fam == "flux" else COMFY_ZIMAGE
    unmapped = [n for n in names if not (rule.fullmatch(n) or (fam == "flux" and COMFY_CLIP_L.fullmatch(n)))]
    assert names and not unmapped, unmapped[:3]
    if fam == "zimage":  # ComfyUI maps as many refiner layers as its n_refiner_layers (2, the published count)
        import json

        n = json.loads((bases[fam] / "transformer" / "config.json").read_text())["n_refiner_layers"]
        assert n == 2 and all(int(COMFY_ZIMAGE.fullmatch(x)["i"]) < n for x in names if "refiner" in x)


@pytest.mark.parametrize("fam", FAMILIES)
def test_preview_inspect_resize_and_merge_know_the_family(bases, trained, fam, tmp_path):
    from trainer.preview.previewer import Previewer, Request, Slot

    path, _, _ = _file(trained[fam])
    info = tools.inspect(path)
    assert info["family"] == fam and info["layout"] == "peft" and not info["defects"]
    p = Previewer()
    req = Request(base=str(bases[fam]), prompt="a red circle", steps=2, size=32, seed=1, guidance=3.0)
    plain, settings = p.generate(req)
    assert settings["scheduler"] == "FlowMatchEulerDiscreteScheduler" and settings["family"] == fam
    with_lora, _ = p.generate(Request(**{**req.__dict__, "loras": [Slot(str(path), weight=1.0)]}))
    off, _ = p.generate(Request(**{**req.__dict__, "loras": [Slot(str(path), weight=0.0)]}))
    assert off.tobytes() == plain.tobytes() and with_lora.tobytes() != plain.tobytes()

    small = tools.resize(path, tmp_path / "r2.safetensors", rank=2, dtype="fp32")
    merged = tools.merge([path, path], [0.5, 0.5], tmp_path / "m.safetensors", dtype="fp32")
    for out in (small["file"], merged["file"]):
        lora = read_lora(out)
        assert lora.family == fam and lora.layout == "peft"
        pipe = pipeline_class(fam).from_pretrained(str(bases[fam]))
        pipe.load_lora_weights(out, adapter_name="y")  # diffusers' loader takes the rewritten file too
        with safe_open(out, "pt") as f:
            keys = list(f.keys())
        placed = sum(1 for k in keys if k.startswith("transformer.") and
                     "y" in pipe.transformer.get_submodule(k[len("transformer."):].rsplit(".lora_", 1)[0]).lora_A)
        assert placed == sum(k.startswith("transformer.") for k in keys)
    a, b = read_lora(path), read_lora(merged["file"])
    for name, m in a.modules.items():  # merging a LoRA with itself at 0.5 + 0.5 is the same update
        assert torch.allclose(b.modules[name].delta(), m.delta(), atol=1e-6)


@pytest.mark.parametrize("fam", FAMILIES)
def test_a_stopped_run_resumes_to_the_same_file(bases, fam, tmp_path):
    from trainer.training import state
    from trainer.training.events import Events

    data = make_dataset(tmp_path / "data", n=4)
    settings = {"train.max_steps": 6, "save.state_every_n_steps": 0, "sample.at_end": False}
    ref = loop.train(tiny_config(bases[fam], data, tmp_path / "a" / "run", **settings)).lora_path.read_bytes()
    run = tmp_path / "b" / "run"

    class StopAt(Events):  # presses Stop after step 2, as the UI's Stop button does
        def step(self, step, *a, **k):
            if step == 2:
                (self.run_dir / "STOP").touch()
            return super().step(step, *a, **k)

    first = loop.train(tiny_config(bases[fam], data, run, **settings), events=StopAt(run))
    assert first.stopped_early and first.steps == 2 and state.latest(run).name == "step-000002"
    second = loop.train(RunConfig.load(run / "config.toml"), resume=True)
    assert second.steps == 6 and second.lora_path.read_bytes() == ref


@pytest.mark.parametrize("fam", FAMILIES)
def test_bake_fuses_the_lora_into_a_loadable_folder(bases, trained, fam, tmp_path):
    import diffusers

    path, tensors, _ = _file(trained[fam])
    out = tools.bake(str(bases[fam]), [str(path)], [1.0], tmp_path / "baked")
    baked = models.load_base(out["folder"])
    assert baked.family.name == fam and out["modules_changed"] == len(read_lora(path).modules)
    before = getattr(diffusers, TRANSFORMERS[fam]).from_pretrained(str(bases[fam] / "transformer"))
    for key in (k for k in tensors if k.startswith("transformer.") and k.endswith(".lora_A.weight")):
        module_path = key[len("transformer."): -len(".lora_A.weight")]
        expected = before.get_submodule(module_path).weight + tensors[key.replace("lora_A", "lora_B")] @ tensors[key]
        assert torch.allclose(baked.unet.get_submodule(module_path).weight, expected, atol=1e-6), key


@pytest.mark.parametrize("fam", FAMILIES)
def test_it_trains_with_fp8_frozen_weights_and_checkpointing(bases, fam, tmp_path):
    from trainer.memory import frozen

    data = make_dataset(tmp_path / "data", n=4)
    cfg = tiny_config(bases[fam], data, tmp_path / "run", **{"train.max_steps": 3, "train.mixed_precision": "bf16",
                                                           "train.frozen_dtype": "fp8", "sample.at_end": False,
                                                           "train.gradient_checkpointing": True})
    result = loop.train(cfg)
    transformer = result.models["lora_transformer"]
    assert frozen.stored_bytes(transformer)["float8_e4m3fn"] > 0
    assert all(p.dtype == torch.float32 for n, p in transformer.named_parameters() if "lora_" in n)
    losses = [e["loss"] for e in read_events(tmp_path / "run") if e["type"] == "step"]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


def test_flux_encodes_packs_and_shifts_as_diffusers_flux_pipeline_does(bases):
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from trainer.models.schedules import FlowMatching

    base = models.load_base(str(bases["flux"]))
    fam = base.family
    pipe = FluxPipeline.from_pretrained(str(bases["flux"]))
    prompts = ["a red circle", "a small blue square on a white background"]
    with torch.no_grad():
        hidden, pooled = fam.encode(base.text_encoders, fam.tokenize(base.tokenizers, prompts))
        want_hidden, want_pooled, _ = pipe.encode_prompt(prompts, None, max_sequence_length=16)
    assert torch.equal(hidden, want_hidden) and torch.equal(pooled, want_pooled)
    latents = torch.randn(2, 16, 8, 12)
    packed = fam.pack(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 12))
    assert torch.equal(fam.unpack(packed, 8, 12), latents)
    assert torch.equal(fam.image_ids(8, 12, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32))
    # dev: the shift of a bucket is the one the sampler uses for a picture of that size
    schedule = fam.schedule(base.scheduler_config, "flow_matching", False, 0.0)
    c = base.scheduler_config
    for h, w in ((64, 64), (128, 128), (96, 160)):
        mu = calculate_shift(h * w // 4, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"],
                             c["max_shift"])
        assert math.isclose(schedule.shift_for((1, 16, h, w)), math.exp(mu), rel_tol=1e-9)
    u = torch.tensor([0.25, 0.5, 0.75])
    s = math.exp(calculate_shift(4096, 256, 4096, 0.5, 1.15))
    assert torch.allclose(schedule._shifted(u, s), s / (s + 1 / u - 1))  # the sampler's time_shift, exponential form
    schnell = models.load_base(str(bases["flux-schnell"]))
    flat = schnell.family.schedule(schnell.scheduler_config, "flow_matching", False, 0.0)
    assert isinstance(flat, FlowMatching) and flat.shift_for((1, 16, 128, 128)) == flat.shift_for((1, 16, 8, 8)) == 1


def test_flux_denoise_is_the_call_flux_pipeline_makes(bases):
    base = models.load_base(str(bases["flux"]))
    fam, model = base.family, base.unet
    noisy, hidden, pooled = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 48), torch.randn(1, 32)
    t = torch.tensor([700.0])
    with torch.no_grad():
        ours = fam.denoise(model, noisy, t, hidden, pooled, None, None, None)
        theirs = model(hidden_states=fam.pack(noisy), timestep=t / 1000, guidance=torch.tensor([1.0]),
                       pooled_projections=pooled, encoder_hidden_states=hidden, txt_ids=torch.zeros(16, 3),
                       img_ids=fam.image_ids(8, 8, "cpu", torch.float32), return_dict=False)[0]
    assert torch.equal(ours, fam.unpack(theirs, 8, 8))


def test_zimage_encodes_and_denoises_as_diffusers_zimage_pipeline_does(bases):
    from diffusers import ZImagePipeline

    base = models.load_base(str(bases["zimage"]))
    fam = base.family
    pipe = ZImagePipeline.from_pretrained(str(bases["zimage"]))
    prompts = ["a red circle", "a small blue square on a white background"]
    with torch.no_grad():
        hidden, mask = fam.encode(base.text_encoders, fam.tokenize(base.tokenizers, prompts))
        want = pipe._encode_prompt(list(prompts), device="cpu", max_sequence_length=64)  # the tiny window
    got = fam.features(hidden, mask)
    assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, want))
    assert got[0].shape[0] < got[1].shape[0]  # each prompt keeps its own length
    noisy, t = torch.randn(2, 16, 8, 8), torch.tensor([300.0, 800.0])
    with torch.no_grad():
        ours = fam.denoise(base.unet, noisy, t, hidden, mask, None, None, None)
        out = base.unet(list(noisy.unsqueeze(2).unbind(0)), (1000 - t) / 1000, want, return_dict=False)[0]
    assert torch.equal(ours, -torch.stack(out).squeeze(2))  # the pipeline steps with the negated output


def test_flux_schnell_trains_without_a_guidance_embedding(bases, tmp_path):
    data = make_dataset(tmp_path / "data", n=4)
    result = loop.train(tiny_config(bases["flux-schnell"], data, tmp_path / "run", **{"train.max_steps": 2}))
    _, tensors, md = _file(tmp_path / "run")
    assert md["modelspec.architecture"] == "flux-1-schnell/lora" and tensors and result.steps == 2


def test_settings_a_family_cannot_honour_are_refused_before_training(bases, tmp_path):
    data = make_dataset(tmp_path / "data", n=4)
    cases = [("flux", {"model.t5": False}, "model.t5 = false does not fit Flux"),
             ("zimage", {"lora.train_text_encoder": True}, "does not fit Z-Image"),
             ("flux", {"lora.use_dora": True}, "use_dora is not available for flux")]
    for fam, overrides, message in cases:
        with pytest.raises(ModelError, match=re.escape(message)):
            loop.train(tiny_config(bases[fam], data, tmp_path / fam, **overrides))
        assert not any(e["type"] == "step" for e in read_events(tmp_path / fam))


@pytest.mark.parametrize("fam, keys, cls", [
    ("flux", ["double_blocks.0.img_attn.qkv.weight", "guidance_in.in_layer.weight"], "FluxTransformer2DModel"),
    ("zimage", ["model.diffusion_model.noise_refiner.0.attention.qkv.weight"], "ZImageTransformer2DModel")])
def test_a_single_file_is_recognised_and_a_hub_failure_says_what_to_do(fam, keys, cls, tmp_path, monkeypatch):
    """No download here: the transformer's single-file loader is picked by its keys, with the family's Hub repo for the
    rest; when that cannot be reached, one line says how to get access."""
    import diffusers
    from safetensors.torch import save_file

    path = tmp_path / f"{fam}.safetensors"
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    called = {}

    def offline(klass, source, **kwargs):
        called.update(kwargs, source=source)
        raise OSError("You are trying to access a gated repo.\nMake sure to have access to it.")

    monkeypatch.setattr(getattr(diffusers, cls), "from_single_file", classmethod(offline))
    with pytest.raises(ModelError, match=r"gated repo\. A (Flux\.1|Z-Image) single file.*hf auth login") as e:
        models.load_base(str(path), dtype=torch.bfloat16)
    assert "\n" not in str(e.value)
    assert called["source"] == str(path) and called["torch_dtype"] == torch.bfloat16
    assert called["config"] == {"flux": "black-forest-labs/FLUX.1-dev", "zimage": "Tongyi-MAI/Z-Image-Turbo"}[fam]
