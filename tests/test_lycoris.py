"""LyCORIS LoHa and LoKr trained with peft and written in the LyCORIS layout: the ΔW each loader computes from the
file (ComfyUI's comfy/weight_adapter/loha.py and lokr.py, A1111's network_hada.py and network_lokr.py, recomputed
here from their code) equals the ΔW peft trained (get_delta_weight), for linear and conv layers, with both Kronecker
factors full (where the loaders ignore alpha and the scale is folded in) and decomposed; tiny SD1 and SDXL train
both kinds through the CLI, every module lands where a LoRA of the same targets does, and Preview, inspect, resize,
merge and bake read them."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import make_dataset, tiny_config
from trainer.cli import main as cli_main
from trainer.config import LoraConfig, RunConfig
from trainer.lora import inject as lora_mod
from trainer.lora import lycoris, tools
from trainer.lora.read import LoraError, module_index, read_lora
from trainer.models import loading as models
from trainer.training import loop


# ---- the loaders' formulas, as their code computes ΔW from a file's tensors --------------------------------------
def comfyui_delta(sd: dict, name: str, shape) -> torch.Tensor:
    """comfy/weight_adapter/lokr.py and loha.py calculate_weight at strength 1 (intermediate float32)."""
    t = {k[len(name) + 1:]: v.float() for k, v in sd.items() if k.startswith(name + ".")}
    alpha = t.get("alpha")
    if "hada_w1_a" in t:
        scale = float(alpha) / t["hada_w1_b"].shape[0] if alpha is not None else 1.0
        if "hada_t1" in t:
            m1 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
            m2 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
        else:
            m1, m2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
        return ((m1 * m2) * scale).reshape(shape)
    dim = None
    if "lokr_w1" in t:
        w1 = t["lokr_w1"]
    else:
        dim, w1 = t["lokr_w1_b"].shape[0], t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    else:
        dim = t["lokr_w2_b"].shape[0]
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"] if "lokr_t2" not in t else \
            torch.einsum("i j k l, j r, i p -> p r k l", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
    return (torch.kron(w1.contiguous(), w2.contiguous()) * scale).reshape(shape)


def a1111_delta(sd: dict, name: str, shape) -> torch.Tensor:
    """extensions-builtin/Lora network_hada.py / network_lokr.py calc_updown, then network.py finalize_updown
    (calc_scale: alpha / dim when both are known, else 1)."""
    t = {k[len(name) + 1:]: v.float() for k, v in sd.items() if k.startswith(name + ".")}
    alpha = float(t["alpha"]) if "alpha" in t else None
    if "hada_w1_a" in t:
        dim = t["hada_w1_b"].shape[0]
        out = [t["hada_w1_a"].size(0), t["hada_w1_b"].size(1)]
        up1 = (t["hada_w1_a"].reshape(t["hada_w1_a"].size(0), -1) @ t["hada_w1_b"].reshape(dim, -1)).reshape(out)
        up2 = (t["hada_w2_a"].reshape(t["hada_w2_a"].size(0), -1) @
               t["hada_w2_b"].reshape(t["hada_w2_b"].size(0), -1)).reshape(out)
        updown = up1 * up2
    else:
        dim = None
        w1 = t.get("lokr_w1")
        if w1 is None:
            dim, w1 = t["lokr_w1_b"].shape[0], t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t.get("lokr_w2")
        if w2 is None:
            dim, w2 = t["lokr_w2_b"].shape[0], t["lokr_w2_a"] @ t["lokr_w2_b"]
        out = [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)] if len(shape) != 4 else list(shape)
        if w2.ndim == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        updown = torch.kron(w1, w2.contiguous()).reshape(out)
    scale = alpha / dim if dim is not None and alpha is not None else 1.0
    return updown.reshape(shape) * scale


class Pair(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(48, 80)
        self.conv = torch.nn.Conv2d(8, 12, 3, padding=1)


CASES = {  # name: (lora settings, what the file holds for the 48 -> 80 linear layer)
    "loha": (dict(network="loha", rank=4, alpha=2.0), {"hada_w1_a"}),
    "lokr both factors full": (dict(network="lokr", rank=16, alpha=4.0), {"lokr_w1", "lokr_w2"}),
    "lokr second factor decomposed": (dict(network="lokr", rank=2, alpha=1.0), {"lokr_w1", "lokr_w2_a"}),
    "lokr both decomposed": (dict(network="lokr", rank=1, alpha=3.0, decompose_both=True, lokr_factor=8),
                             {"lokr_w1_a", "lokr_w2_a"}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_loader_applies_the_delta_peft_trained(case, dtype, tmp_path):
    settings, expected = CASES[case]
    torch.manual_seed(0)
    model = Pair()
    lora_mod.inject(model, LoraConfig(**settings), ["proj", "conv"], "test")
    with torch.no_grad():  # trained values: every factor non-zero
        for name, p in model.named_parameters():
            if "hada_" in name or "lokr_" in name:
                p.normal_(0, 0.3)
    path = tmp_path / "f.safetensors"
    save_file(lycoris.state_dict({"lora_unet": model}, dtype, lambda prefix, p: f"{prefix}_{p}"), str(path))
    sd = load_file(str(path))
    for layer in ("proj", "conv"):
        mod = model.get_submodule(layer)
        want = mod.get_delta_weight("default").detach().float()
        name = f"lora_unet_{layer}"
        parts = {k.split(".")[-1] for k in sd if k.startswith(name + ".")}
        assert layer == "conv" or expected <= parts, parts  # the case's shape, on the linear layer
        for reader in (comfyui_delta, a1111_delta):
            got = reader(sd, name, want.shape)
            tol = 2e-3 * want.abs().max() if dtype == torch.float16 else 1e-5 * want.abs().max()
            assert (got - want).abs().max() <= tol, (case, layer, reader.__name__)
        ours = read_lora(path).modules[name]  # and LoRA Studio's own reader
        assert torch.allclose(ours.delta().reshape(want.shape), comfyui_delta(sd, name, want.shape), atol=1e-6)
        assert torch.allclose((ours.up.flatten(1) @ ours.down.flatten(1)).reshape(want.shape), want,
                              atol=5e-3 * float(want.abs().max()))  # its SVD form (Preview, merge) too
    if case == "lokr both factors full":  # the loaders ignore alpha here: the scale is in the file's factors
        assert float(sd["lora_unet_proj.alpha"].float()) == settings["rank"]


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    """LoRA, LoHa and LoKr on tiny SD1 and SDXL through the CLI, UNet and text encoders, same targets."""
    root = tmp_path_factory.mktemp("lycoris")
    data = make_dataset(root / "data", n=4)
    out = {}
    for fam in ("sd1", "sdxl"):
        for net in ("lora", "loha", "lokr"):
            run = root / f"{fam}-{net}"
            cfg = tiny_config(tiny_models[fam], data, run, **{
                "train.max_steps": 4, "lora.network": net, "lora.alpha": 2.0, "save.dtype": "fp32",
                "lora.train_text_encoder": True, "optim.lr": 1e-2, "sample.at_end": False})
            (root / f"{fam}-{net}.toml").write_text(cfg.to_toml())
            assert cli_main(["train", "--config", str(root / f"{fam}-{net}.toml")]) == 0
            out[(fam, net)] = next(run.glob("*.safetensors"))
    return out


def _names(path) -> set[str]:
    return {k.rsplit(".", 1)[0].removesuffix(".lora_down").removesuffix(".lora_up") for k in load_file(str(path))}


@pytest.mark.parametrize("fam", ["sd1", "sdxl"])
@pytest.mark.parametrize("net", ["loha", "lokr"])
def test_modules_are_named_where_a_lora_of_the_same_targets_is_and_none_is_dropped(runs, tiny_models, fam, net):
    """The LoRA export's kohya names are the ones ComfyUI, A1111 and kohya map (tests/test_formats.py); a LyCORIS
    file of the same targets uses exactly those names, and each lands on a layer of the base."""
    assert _names(runs[(fam, net)]) == _names(runs[(fam, "lora")])
    base = models.load_base(str(tiny_models[fam]))
    lora = read_lora(runs[(fam, net)])
    index = module_index(base.family.models(base.unet, base.text_encoders), base.family.unet_namer(base.unet.config))
    assert lora.network == net and lora.family == fam and all(n in index for n in lora.modules)
    md = lora.metadata
    assert md["ss_network_module"] == "lycoris.kohya" and json.loads(md["ss_network_args"])["algo"] == net


@pytest.mark.parametrize("net", ["loha", "lokr"])
def test_the_trained_model_and_the_file_agree_layer_by_layer(tiny_models, dataset, tmp_path, net):
    """The file's ΔW (read back, loaders' formula) equals each live peft layer's get_delta_weight."""
    result = loop.train(tiny_config(tiny_models["sdxl"], dataset, tmp_path / "run", **{
        "train.max_steps": 3, "lora.network": net, "save.dtype": "fp32", "optim.lr": 1e-2, "sample.at_end": False}))
    sd = load_file(str(result.lora_path))
    base = models.load_base(str(tiny_models["sdxl"]))
    namer = base.family.unet_namer(base.unet.config)
    checked = 0
    for path, mod, algo in lycoris.layers(result.models["lora_unet"]):
        want = mod.get_delta_weight("default").detach().float()
        name = f"lora_unet_{namer(path).replace('.', '_')}"
        assert torch.allclose(comfyui_delta(sd, name, want.shape), want, atol=1e-6), name
        checked += 1
    assert checked == len({k.rsplit(".", 1)[0] for k in sd if k.startswith("lora_unet_")})


def test_preview_mixes_a_lokr_at_weights_and_inspect_resize_merge_bake_read_it(runs, tiny_models, tmp_path):
    from trainer.preview.previewer import Previewer, Request, Slot

    path = runs[("sd1", "lokr")]
    info = tools.inspect(path)
    assert info["kind"].startswith("LoKr") and not info["defects"]
    p = Previewer()
    req = Request(base=str(tiny_models["sd1"]), prompt="a red circle", steps=2, size=32, seed=1)
    plain, _ = p.generate(req)
    off, _ = p.generate(Request(**{**req.__dict__, "loras": [Slot(str(path), weight=0.0)]}))
    on, _ = p.generate(Request(**{**req.__dict__, "loras": [Slot(str(path), weight=1.0)]}))
    assert off.tobytes() == plain.tobytes() and on.tobytes() != plain.tobytes()
    lokr = read_lora(path)
    small = tools.resize(path, tmp_path / "r.safetensors", rank=2, dtype="fp32")
    assert read_lora(small["file"]).network == "lora"  # through ΔW and SVD, a plain LoRA
    merged = tools.merge([path, path], [0.5, 0.5], tmp_path / "m.safetensors", dtype="fp32")
    for name, m in read_lora(merged["file"]).modules.items():
        assert torch.allclose(m.delta().reshape(-1), lokr.modules[name].delta().reshape(-1), atol=1e-4)
    baked = tools.bake(str(tiny_models["sd1"]), [str(path)], [1.0], tmp_path / "baked")
    assert baked["modules_changed"] == len(lokr.modules)


def test_a_lycoris_made_file_with_tucker_conv_and_both_factors_decomposed_reads(tiny_models, tmp_path):
    """A file as LyCORIS/kohya write it for a conv layer with use_tucker: lokr_t2 beside decomposed factors, alpha."""
    base = models.load_base(str(tiny_models["sd1"]))
    conv = base.unet.down_blocks[0].resnets[0].conv1  # 32 -> 32, 3x3
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    r = 2
    g = torch.Generator().manual_seed(0)
    t = {f"{name}.lokr_w1_a": torch.randn(4, r, generator=g), f"{name}.lokr_w1_b": torch.randn(r, 4, generator=g),
         f"{name}.lokr_t2": torch.randn(r, r, 3, 3, generator=g), f"{name}.lokr_w2_a": torch.randn(r, 8, generator=g),
         f"{name}.lokr_w2_b": torch.randn(r, 8, generator=g), f"{name}.alpha": torch.tensor(1.0)}
    path = tmp_path / "lyco.safetensors"
    save_file(t, str(path))
    m = read_lora(path).modules[name]
    assert m.delta().shape == conv.weight.shape
    assert torch.allclose(m.delta(), comfyui_delta(t, name, conv.weight.shape), atol=1e-6)


def test_settings_no_loader_can_honour_are_refused(tiny_models, dataset, tmp_path):
    for sets, message in (({"lora.network": "lokr", "lora.use_dora": True}, "no loader reads a DoRA LoKr"),
                          ({"lora.network": "loha", "lora.use_rslora": True}, "use_rslora with lora.network = loha")):
        with pytest.raises(ValueError, match=message):
            loop.train(tiny_config(tiny_models["sd1"], dataset, tmp_path / "run", **sets))
    with pytest.raises(LoraError, match="LoKr module without"):
        path = tmp_path / "half.safetensors"
        save_file({"lora_unet_x.lokr_w1": torch.ones(2, 2)}, str(path))
        read_lora(path)


def test_flux_lokr_names_its_transformer_modules_as_comfyui_maps_them(tmp_path):
    """SD3, Flux and Z-Image LyCORIS files: `lycoris_<diffusers path>` (comfy/lora.py model_lora_keys_unet registers
    that name for each family's diffusers keys)."""
    from trainer.models import tiny

    flux = tiny.build_pipeline("flux", tmp_path / "flux")
    data = make_dataset(tmp_path / "data", n=4)
    result = loop.train(tiny_config(flux, data, tmp_path / "run", **{"train.max_steps": 2, "lora.network": "lokr",
                                                                    "sample.at_end": False}))
    keys = load_file(str(result.lora_path))
    names = {k.rsplit(".", 1)[0] for k in keys}
    assert names and all(n.startswith(("lycoris_transformer_blocks_", "lycoris_single_transformer_blocks_"))
                         for n in names)
    lora = read_lora(result.lora_path)
    assert lora.family == "flux" and lora.network == "lokr"
    assert RunConfig.load(str(tmp_path / "run" / "config.toml")).lora.network == "lokr"


def test_bench_compares_a_lokr_of_about_the_loras_size(tiny_models):
    """bench learn --networks trains LoKr with both factors full and the factor whose parameter count is nearest the
    LoRA's (a LoKr at the LoRA's rank had 14x fewer parameters on the style preset: no comparison at one size)."""
    import copy
    import math

    from peft import inject_adapter_in_model

    from diffusers import UNet2DConditionModel

    from trainer.bench.learn import FULL_RANK, lokr_factor_like

    unet = UNet2DConditionModel.from_pretrained(Path(tiny_models["sd1"]) / "unet")
    lora = LoraConfig(rank=8, alpha=4.0)
    targets = lora_mod.unet_targets(lora)

    def count(cfg):
        model = copy.deepcopy(unet).requires_grad_(False)
        inject_adapter_in_model(lora_mod.peft_config(cfg, targets), model, adapter_name="probe")
        return sum(p.numel() for name, p in model.named_parameters() if ".probe" in name)

    factor = lokr_factor_like(unet, lora)
    lokr = LoraConfig(rank=FULL_RANK, alpha=float(FULL_RANK), network="lokr", lokr_factor=factor)
    ratios = {f: count(LoraConfig(rank=FULL_RANK, alpha=float(FULL_RANK), network="lokr", lokr_factor=f)) / count(lora)
              for f in (2, 4, 8, 16, -1)}
    assert abs(math.log(ratios[factor])) == min(abs(math.log(r)) for r in ratios.values())
    assert 0.5 < ratios[factor] < 2.0, ratios
    model = copy.deepcopy(unet).requires_grad_(False)
    inject_adapter_in_model(lora_mod.peft_config(lokr, targets), model, adapter_name="probe")
    layers = [m for m in model.modules() if "probe" in getattr(m, "lokr_w1", {})]
    assert layers and all("probe" in m.lokr_w2 and m.scaling["probe"] == 1.0 for m in layers)  # both full, scale 1
