import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trainer.lora import tools
from trainer.cli import main as cli_main
from trainer.lora.read import LoraError, module_index, read_lora
from trainer.training.loop import train
from trainer.models import load_base
from trainer.models.sgm_names import unet_namer

from .conftest import make_dataset, tiny_config
from .test_train import load_pipe


@pytest.fixture(scope="session")
def trained(tiny_models, tmp_path_factory):
    """One fp32 LoRA (and one LoCon) per family, trained once; with the training-time models kept."""
    root = tmp_path_factory.mktemp("trained")
    old = os.environ.get("LORA_STUDIO_CACHE")
    os.environ["LORA_STUDIO_CACHE"] = str(root / "cache")
    ds = make_dataset(root / "ds")
    out = {}
    try:
        for fam in ("sd1", "sdxl"):
            for kind, extra in (("lora", []), ("locon", ["conv"])):
                run = root / f"{fam}-{kind}"
                cfg = tiny_config(tiny_models[fam], ds, run, **{"train.max_steps": 4, "save.dtype": "fp32",
                                                                "lora.train_text_encoder": True, "lora.alpha": 2.0,
                                                                "sample.at_end": False})
                cfg.lora.unet_extra = extra
                out[(fam, kind)] = (run / f"{run.name}.safetensors", train(cfg))
    finally:
        if old is None:
            os.environ.pop("LORA_STUDIO_CACHE", None)
        else:
            os.environ["LORA_STUDIO_CACHE"] = old
    return out


def unet_inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(1, 4, 8, 8, generator=g)
    hidden = torch.randn(1, 16, cfg.cross_attention_dim, generator=g)
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, pooled, generator=g), "time_ids": torch.tensor([[32., 32, 0, 0, 32, 32]])}
    return x, torch.tensor([500]), hidden, added


@pytest.mark.parametrize("fam", ["sd1", "sdxl"])
@pytest.mark.parametrize("kind", ["lora", "locon"])
def test_export_reproduces_training_time_output(fam, kind, trained, tiny_models, peft_warnings):
    path, result = trained[(fam, kind)]
    trained_unet = result.models["lora_unet"]
    x, t, hidden, added = unet_inputs(trained_unet)
    trained_unet.eval()
    with torch.no_grad():
        want = trained_unet(x, t, hidden, added_cond_kwargs=added).sample
        te_prefix = "lora_te1" if fam == "sdxl" else "lora_te"
        ids = torch.arange(16)[None] % 40
        want_te = result.models[te_prefix](ids).last_hidden_state
    pipe = load_pipe(tiny_models[fam])
    with torch.no_grad():
        base_out = pipe.unet(x, t, hidden, added_cond_kwargs=added).sample
    peft_warnings.clear()
    pipe.load_lora_weights(str(path))
    assert not [r for r in peft_warnings.records if "unexpected" in r.getMessage().lower()
                or "not found" in r.getMessage().lower()]
    with torch.no_grad():
        got = pipe.unet(x, t, hidden, added_cond_kwargs=added).sample
        got_te = pipe.text_encoder(ids).last_hidden_state
    assert (want - base_out).abs().max() > 1e-4  # the LoRA does something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_te, want_te, atol=1e-5, rtol=1e-4)


def _reference_name(prefix, path, fam, unet_config):
    """The tests' own reading of the documented kohya naming."""
    if prefix != "lora_unet" and not path.startswith("text_model."):
        path = "text_model." + path
    if prefix == "lora_unet" and fam == "sdxl":
        path = unet_namer(dict(unet_config))(path)
    return f"{prefix}_{path.replace('.', '_')}"


@pytest.mark.parametrize("fam", ["sd1", "sdxl"])
def test_reference_weights_match_fused_pipeline(fam, trained, tiny_models):
    path, _ = trained[(fam, "locon")]
    sd = load_file(str(path))
    weight = 0.7
    pipe = load_pipe(tiny_models[fam])
    parts = {"lora_unet": pipe.unet}
    parts.update({"lora_te1": pipe.text_encoder, "lora_te2": pipe.text_encoder_2} if fam == "sdxl"
                 else {"lora_te": pipe.text_encoder})
    base = {(p, n): m.weight.detach().clone() for p, model in parts.items() for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    pipe.load_lora_weights(str(path), adapter_name="x")
    pipe.fuse_lora(lora_scale=weight, adapter_names=["x"])
    checked = 0
    for (prefix, name), w0 in base.items():
        key = _reference_name(prefix, name, fam, pipe.unet.config)
        fused = dict(parts[prefix].named_modules())[name]
        fused_w = (fused.base_layer if hasattr(fused, "base_layer") else fused).weight.detach()
        if f"{key}.lora_down.weight" not in sd:
            torch.testing.assert_close(fused_w, w0)
            continue
        down, up, alpha = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"], sd[f"{key}.alpha"].item()
        delta = (up.flatten(1) @ down.flatten(1)).reshape(w0.shape) * alpha / down.shape[0] * weight
        torch.testing.assert_close(fused_w, w0 + delta, atol=1e-5, rtol=1e-4)
        checked += 1
    assert checked == len({k.rsplit(".", 2)[0] for k in sd if k.endswith("lora_down.weight")})


def _foreign_files(trained, tmp_path):
    """Files in other tools' layouts, built from the documented key patterns."""
    sd1 = load_file(str(trained[("sd1", "lora")][0]))
    sdxl = load_file(str(trained[("sdxl", "locon")][0]))
    files = {}
    no_alpha = {k: v for k, v in sd1.items() if not k.endswith(".alpha")}
    files["sd1_no_alpha"] = no_alpha
    # SDXL in diffusers UNet naming, as some trainers write it.
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    class Cfg:
        layers_per_block = 1
    diff_names = _maybe_map_sgm_blocks_to_diffusers(dict(sdxl), Cfg())
    files["sdxl_diffusers_names"] = {k.replace("in_layers_2", "conv1")
                                     .replace("out_layers_3", "conv2").replace("emb_layers_1", "time_emb_proj")
                                     .replace("skip_connection", "conv_shortcut").replace("input_blocks", "down_blocks")
                                     .replace("output_blocks", "up_blocks").replace("middle_block", "mid_block")
                                     .replace("_op.", "_conv."): v for k, v in diff_names.items()}
    paths = {}
    for name, tensors in files.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(paths[name]))
    return paths


def test_files_from_other_tools_import(trained, tiny_models, tmp_path):
    paths = _foreign_files(trained, tmp_path)
    a = read_lora(paths["sd1_no_alpha"])
    assert a.family == "sd1" and a.family_source == "keys" and all(m.alpha == m.rank for m in a.modules.values())
    b = read_lora(paths["sdxl_diffusers_names"])
    assert b.family is None or b.family == "sdxl"
    sgm = read_lora(trained[("sdxl", "locon")][0])
    assert sgm.family == "sdxl" and "LoCon" in sgm.kind
    base = load_base(str(tiny_models["sdxl"]))
    index = module_index({"lora_unet": base.unet, "lora_te1": base.text_encoders[0], "lora_te2": base.text_encoders[1]},
                         base.family.unet_namer(base.unet.config))
    for lora in (b, sgm):  # either SDXL naming resolves to the same layers
        assert all(n in index for n in lora.modules), [n for n in lora.modules if n not in index][:3]
    assert {id(index[n]) for n in b.modules} == {id(index[n]) for n in sgm.modules}

    # The diffusers/peft layout, written by diffusers itself.
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    _, result = trained[("sd1", "lora")]
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "peft", unet_lora_layers=get_peft_model_state_dict(result.models["lora_unet"]),
        text_encoder_lora_layers=get_peft_model_state_dict(result.models["lora_te"]),
        unet_lora_adapter_metadata=result.models["lora_unet"].peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=result.models["lora_te"].peft_config["default"].to_dict())
    peft_file = read_lora(tmp_path / "peft" / "pytorch_lora_weights.safetensors")
    kohya = read_lora(trained[("sd1", "lora")][0])
    assert peft_file.layout == "peft" and set(peft_file.modules) == set(kohya.modules)
    for name, m in kohya.modules.items():
        torch.testing.assert_close(peft_file.modules[name].delta(), m.delta(), atol=1e-6, rtol=1e-5)

    # Resized or merged, a peft-layout file stays in that layout with its scale folded in: its adapter metadata
    # (the old alphas) is not carried over, or every loader would scale it a second time.
    meta = json.loads(peft_file.metadata["lora_adapter_metadata"])
    meta["unet.lora_alpha"] = meta["unet.r"] / 2  # a scale that is not 1
    tensors = load_file(str(peft_file.path))
    halved = tmp_path / "halved.safetensors"
    save_file(tensors, str(halved), metadata={"lora_adapter_metadata": json.dumps(meta), "format": "pt"})
    source = read_lora(halved)
    rank = max(m.rank for m in source.modules.values())
    for out in (tools.resize(halved, tmp_path / "r.safetensors", rank=rank, dtype="fp32")["file"],
                tools.merge([halved], [1.0], tmp_path / "m.safetensors", dtype="fp32")["file"]):
        with safe_open(out, "pt") as f:
            assert "lora_adapter_metadata" not in (f.metadata() or {}) and all(".lora_A." in k or ".lora_B." in k
                                                                              for k in f.keys())
        again = read_lora(out)
        for name, m in source.modules.items():
            torch.testing.assert_close(again.modules[name].delta(), m.delta(), atol=1e-5, rtol=1e-4)


def test_wrong_family_unsupported_and_truncated(trained, tiny_models, tmp_path):
    with pytest.raises(LoraError, match="SD 1.x LoRA but the base model is SDXL"):
        tools.bake(str(tiny_models["sdxl"]), [trained[("sd1", "lora")][0]], [1.0], tmp_path / "baked")
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 2)}, str(loha))
    with pytest.raises(LoraError, match="LoHa"):
        read_lora(loha)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(trained[("sd1", "lora")][0].read_bytes()[:500])
    with pytest.raises(LoraError, match="truncated or corrupt"):
        read_lora(cut)


def test_merge_is_exact_at_full_rank_and_svd_error_falls(trained, tmp_path):
    a, b = trained[("sd1", "lora")][0], trained[("sd1", "locon")][0]
    out = tmp_path / "merged.safetensors"
    info = tools.merge([a, b], [0.8, -0.5], out, dtype="fp32")
    assert info["exact"]
    la, lb, lm = read_lora(a), read_lora(b), read_lora(out)
    for name, m in lm.modules.items():
        want = sum(l.modules[name].delta() * w for l, w in ((la, 0.8), (lb, -0.5)) if name in l.modules)
        torch.testing.assert_close(m.delta(), want, atol=1e-6, rtol=1e-5)
    errors = []
    for r in (1, 2, 4, 8):
        res = tools.resize(out, tmp_path / f"r{r}.safetensors", rank=r, dtype="fp32")
        errors.append(res["energy_lost_mean"])
    assert errors == sorted(errors, reverse=True) and errors[0] > errors[-1] and errors[-1] < 1e-6
    svd = tools.merge([a, b], [0.8, -0.5], tmp_path / "svd.safetensors", rank=2)
    assert 0 < svd["energy_lost"] < 1
    with pytest.raises(LoraError, match="already exists"):
        tools.merge([a], [1.0], out)


def test_analyze_dynamic_resize_inspect_and_card(trained, tmp_path, capsys):
    path = trained[("sd1", "lora")][0]
    a = tools.analyze(path)
    assert a["rank_for_90"] <= a["rank_for_95"] <= a["rank_for_99"] <= a["trained_rank"]
    assert "rank" in a["suggestion"] and len(a["modules"]) == len(read_lora(path).modules)
    r = tools.resize(path, tmp_path / "fro.safetensors", sv_fro=0.9)
    assert r["energy_lost_max"] <= 0.1 + 1e-6
    assert cli_main(["lora", "inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"family", "rank", "alpha", "modules", "metadata"} <= set(info)
    assert info["family"] == "sd1" and info["rank"] == 4 and info["alpha"] == 2.0
    # Two named hashes: the tensor hash is the one kohya writes; the file hash is of every byte (AutoV2).
    assert info["tensor_sha256"] == info["metadata"]["sshs_model_hash"] and info["autov3"] == info["tensor_sha256"][:12]
    assert info["file_sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest() != info["tensor_sha256"]
    assert info["autov2"] == info["file_sha256"][:10]
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    for key in ("ss_output_name", "ss_base_model_version", "ss_network_dim", "ss_network_alpha", "ss_tag_frequency",
                "ss_steps", "ss_seed", "ss_training_started_at", "sshs_model_hash", "modelspec.architecture",
                "modelspec.title", "modelspec.resolution", "lora_studio.config"):
        assert key in md
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    json.loads(md["lora_studio.config"])
    card = tools.card(path)
    text = card.read_text()
    assert "Trigger words" in text and "load_lora_weights" in text and "<lora:" in text
    assert cli_main(["lora", "card", str(path)]) == 2  # never overwrites without --force
    assert cli_main(["lora", "card", str(path), "--force"]) == 0


def test_bake_fuses_into_a_loadable_model(trained, tiny_models, tmp_path):
    path, _ = trained[("sd1", "lora")]
    out = tmp_path / "baked"
    res = tools.bake(str(tiny_models["sd1"]), [path], [1.0], out)
    assert res["modules_changed"] == len(read_lora(path).modules)
    baked = load_pipe(out)
    pipe = load_pipe(tiny_models["sd1"])
    pipe.load_lora_weights(str(path))
    x, t, hidden, added = unet_inputs(pipe.unet)
    with torch.no_grad():
        torch.testing.assert_close(baked.unet(x, t, hidden).sample, pipe.unet(x, t, hidden).sample,
                                   atol=1e-5, rtol=1e-4)
    assert list(out.rglob("*.safetensors")) and not list(out.rglob("*.bin"))
