"""Flux.1 in kohya's layout (issue 37 #6): sd-scripts' lora_flux.py made 0 modules from a diffusers-layout file.
save.layout = "kohya" writes BFL's fused names; every loader applies exactly the ΔW each diffusers layer trained:
kohya's formula (ComfyUI, Forge, sd-scripts: up·down·alpha/rank on the fused weight), diffusers' converter (which
splits the blocks back) and LoRA Studio's own reader (Preview, merge, bake)."""
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_dataset, tiny_config
from trainer.lora import flux_kohya
from trainer.lora.read import read_lora
from trainer.models import tiny
from trainer.training import loop

# Every Linear of BFL's Flux blocks, as ComfyUI names them lora_unet_<path with _> (comfy/lora.py model_lora_keys_unet)
BFL = re.compile(r"lora_unet_(double_blocks_\d+_(img|txt)_(attn_(qkv|proj)|mlp_[02]|mod_lin)|"
                 r"single_blocks_\d+_(linear[12]|modulation_lin))")
CLIP = re.compile(r"lora_te1_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-kohya")
    base = tiny.build_pipeline("flux", root / "flux", seed=0)
    data = make_dataset(root / "data", n=4)
    cfg = tiny_config(base, data, root / "run", **{"train.max_steps": 3, "lora.alpha": 2.0, "save.dtype": "fp32",
                                                  "save.layout": "kohya", "lora.train_text_encoder": True,
                                                  "sample.at_end": False, "optim.lr": 5e-3})
    result = loop.train(cfg)
    return SimpleNamespace(base=base, path=result.lora_path, tensors=load_file(str(result.lora_path)),
                           models=result.models, root=root, data=data)


def trained_deltas(models) -> dict[str, torch.Tensor]:
    """diffusers module path -> the ΔW it trained (B·A·alpha/rank), transformer layers only."""
    out = {}
    for path, mod in models["lora_transformer"].named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            out[path] = mod.lora_B["default"].weight @ mod.lora_A["default"].weight * mod.scaling["default"]
    return out


def test_every_module_is_a_bfl_or_clip_name_and_kohyas_formula_gives_each_layers_update(run):
    names = {k.rsplit(".", 1)[0].removesuffix(".lora_down").removesuffix(".lora_up") for k in run.tensors}
    assert names and all(BFL.fullmatch(n) or CLIP.fullmatch(n) for n in names), sorted(names)[:5]
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
            "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_1_linear2"} <= names
    deltas = trained_deltas(run.models)
    t = run.tensors
    checked = 0
    for name in (n for n in names if n.startswith("lora_unet_")):
        down, up, alpha = t[f"{name}.lora_down.weight"], t[f"{name}.lora_up.weight"], float(t[f"{name}.alpha"])
        applied = up @ down * (alpha / down.shape[0])  # kohya's formula on BFL's (fused) weight
        parts = [p for p, d in deltas.items() if flux_kohya.bfl_name(p)[0] == name]
        slots = sorted(parts, key=lambda p: flux_kohya.bfl_name(p)[1] or 0)
        row = 0
        for p in slots:
            n = deltas[p].shape[0]
            assert torch.allclose(applied[row:row + n], deltas[p], atol=1e-6), (name, p)
            row += n
            checked += 1
        if name.endswith("linear1") and row < applied.shape[0]:  # the MLP input, when it did not train: zero
            assert not applied[row:].any()
    assert checked == len(deltas)


def test_lora_studio_reads_it_back_as_the_layers_it_trained(run, tmp_path):
    """Preview, merge, resize and bake read Flux files through one naming: the fused modules split exactly."""
    from trainer.lora import tools

    lora = read_lora(run.path)
    assert lora.family == "flux" and lora.layout == "kohya"
    deltas = trained_deltas(run.models)
    for path, delta in deltas.items():
        m = lora.modules[flux_kohya.diffusers_name(path)]
        assert torch.allclose(m.delta(), delta, atol=1e-6), path
        assert m.rank == 4  # its own block of the fused rank, not the whole of it
    merged = tools.merge([str(run.path)], [1.0], tmp_path / "m.safetensors", dtype="fp32")
    again = read_lora(merged["file"])
    assert again.layout == "peft"  # written in diffusers' layout, which every Flux loader reads
    for path, delta in deltas.items():
        assert torch.allclose(again.modules[flux_kohya.diffusers_name(path)].delta(), delta, atol=1e-6)


def test_preview_renders_the_kohya_file_as_the_diffusers_one(run):
    from trainer.preview.previewer import Previewer, Request, Slot

    same = tiny_config(run.base, run.data, run.root / "run-diffusers", **{
        "train.max_steps": 3, "lora.alpha": 2.0, "save.dtype": "fp32", "lora.train_text_encoder": True,
        "sample.at_end": False, "optim.lr": 5e-3})
    diffusers_file = loop.train(same).lora_path
    assert next(iter(load_file(str(diffusers_file)))).startswith(("transformer.", "text_encoder."))
    p = Previewer()
    req = dict(base=str(run.base), prompt="a red circle", steps=2, size=32, seed=3)
    a, _ = p.generate(Request(**req, loras=[Slot(str(run.path))]))
    b, _ = p.generate(Request(**req, loras=[Slot(str(diffusers_file))]))
    plain, _ = p.generate(Request(**req))
    diff = (torch.tensor(list(a.getdata())).float() - torch.tensor(list(b.getdata())).float()).abs().max()
    effect = (torch.tensor(list(a.getdata())).float() - torch.tensor(list(plain.getdata())).float()).abs().max()
    assert diff <= 1 and effect > 1  # the same image, to a level of 8-bit rounding; the LoRA changes it


def test_diffusers_converter_splits_our_fused_modules_exactly_at_fluxs_real_widths():
    """diffusers' kohya-Flux converter fixes linear1's split at Flux.1's widths (3 x 3072 + 12288), so it is checked
    on modules of those widths: the image qkv with every member, linear1 without its MLP member (a zero block)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    torch.manual_seed(0)
    inner, mlp, rank = 3072, 12288, 2
    widths = {"attn.to_q": inner, "attn.to_k": inner, "attn.to_v": inner, "proj_mlp": mlp}
    layer = lambda out: SimpleNamespace(in_features=inner, out_features=out)  # noqa: E731
    model = SimpleNamespace(get_submodule=lambda path: layer(widths[path.split(".", 2)[2]]))
    members = {j: (torch.randn(rank, inner), torch.randn(inner, rank)) for j in range(3)}
    file = {}
    file.update(flux_kohya._fuse("lora_unet_double_blocks_0_img_attn_qkv", members, model, "transformer_blocks.0",
                                 torch.float32))
    file.update(flux_kohya._fuse("lora_unet_single_blocks_0_linear1", members, model, "single_transformer_blocks.0",
                                 torch.float32))
    converted = _convert_kohya_flux_lora_to_diffusers(dict(file))
    for prefix in ("transformer.transformer_blocks.0.attn.to_", "transformer.single_transformer_blocks.0.attn.to_"):
        for j, x in enumerate("qkv"):
            a, b = converted[f"{prefix}{x}.lora_A.weight"], converted[f"{prefix}{x}.lora_B.weight"]
            down, up = members[j]
            assert a.shape[0] == rank and torch.allclose(b @ a, up @ down, atol=1e-5), (prefix, x)
    mlp_a = converted["transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight"]
    mlp_b = converted["transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"]
    assert not (mlp_b @ mlp_a).any()
