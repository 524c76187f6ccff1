"""Round four (issue 37): what real model folders, third-party files and a new user's first hour found that tiny
models and an idle machine hid. Each test failed before its fix."""
import inspect
import json
from pathlib import Path

import pytest

from tests.conftest import make_dataset, tiny_config
from trainer.models import tiny
from trainer.models.info import EMBEDDED_DIR
from trainer.training.events import read_events

# The published denoiser configs' keys (Hugging Face: black-forest-labs/FLUX.1-dev transformer/config.json,
# Tongyi-MAI/Z-Image-Turbo transformer/config.json). A tiny model must have each of them, and no key its class does
# not take: a hand-registered `sample_size` on the tiny Flux and Z-Image hid that Preview crashed on every real folder.
PUBLISHED_KEYS = {
    "flux": {"attention_head_dim", "axes_dims_rope", "guidance_embeds", "in_channels", "joint_attention_dim",
             "num_attention_heads", "num_layers", "num_single_layers", "patch_size", "pooled_projection_dim"},
    "zimage": {"all_f_patch_size", "all_patch_size", "axes_dims", "axes_lens", "cap_feat_dim", "dim", "in_channels",
               "n_heads", "n_kv_heads", "n_layers", "n_refiner_layers", "norm_eps", "qk_norm", "rope_theta", "t_scale"},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("round4-models")
    return {fam: tiny.build_pipeline(fam, root / fam, seed=0)
            for fam in ("sd1", "sd2", "sdxl", "sd3", "flux", "flux-schnell", "zimage")}


def test_tiny_models_carry_only_the_keys_their_classes_take_and_every_published_one(folders):
    import diffusers

    for fam, folder in [*folders.items(), ("embedded", EMBEDDED_DIR)]:
        index = json.loads((folder / "model_index.json").read_text())
        for part, spec in index.items():
            if part.startswith("_") or not isinstance(spec, list) or spec[0] != "diffusers":
                continue
            config = json.loads((folder / part / ("scheduler_config.json" if part == "scheduler" else
                                                  "config.json")).read_text())
            taken = set(inspect.signature(getattr(diffusers, spec[1]).__init__).parameters)
            extra = {k for k in config if not k.startswith("_")} - taken
            assert not extra, f"{fam}/{part} carries keys {spec[1]} does not take: {sorted(extra)}"
            published = PUBLISHED_KEYS.get(fam.split("-")[0]) if part == "transformer" else None
            assert published is None or published <= set(config), (fam, published - set(config))


@pytest.mark.parametrize("fam", ["flux", "zimage"])
def test_preview_renders_a_flux_or_zimage_folder_at_its_native_size(folders, fam):
    """'Size 0 = native' read transformer.config.sample_size, which neither published config has."""
    from trainer.preview.previewer import Previewer, Request

    p = Previewer()
    image, settings = p.generate(Request(base=str(folders[fam]), prompt="a red circle", steps=1, seed=1, size=None,
                                         guidance=0.0))
    assert settings["size"] == 1024 and image.size == (1024, 1024)


def test_auto_resolution_of_a_big_family_on_the_cpu_is_512_and_says_so(folders, tmp_path):
    from trainer.config import RunConfig
    from trainer.memory.estimate import estimate
    from trainer.models.info import peek_resolution
    from trainer.training import loop

    assert peek_resolution(str(folders["flux"])) == 1024  # the family's size: its config names none
    assert peek_resolution(str(folders["flux"]), on_cpu=True) == 512
    assert peek_resolution(str(folders["sd1"]), on_cpu=True) == 32  # a folder's own size stays
    data = make_dataset(tmp_path / "data", n=2, size=(448, 512))
    cfg = tiny_config(folders["flux"], data, tmp_path / "run", **{"train.max_steps": 1, "sample.at_end": False})
    cfg.data.resolution = None
    loop.train(cfg)
    assert RunConfig.load(str(tmp_path / "run" / "config.toml")).data.resolution == 512
    notes = [e["message"] for e in read_events(tmp_path / "run") if e["type"] == "warning"]
    assert any("at 512 px on the CPU, not its native 1024 px" in n for n in notes), notes
    # the Train tab fills in the size that will train, for this machine or the tier planned for
    from app.train_form import Choice, effective_config
    from app.workspace import Workspace

    ws = Workspace(tmp_path / "ws").ensure(with_samples=False)
    pick = Choice(model=str(folders["flux"]), preset="character")
    assert effective_config(ws, pick, "r", on_cpu=True).data.resolution == 512
    assert effective_config(ws, pick, "r", on_cpu=False).data.resolution == 1024
    assert estimate(effective_config(ws, pick, "r", on_cpu=True), 4, host=True).steps > 0


def test_a_tiny_flux_is_estimated_by_its_own_width_depth_and_tokens(folders):
    """The full-size model's activations applied to any Flux-shaped folder put a tiny one at 50.6 GB at 1024 px."""
    from trainer.config import RunConfig
    from trainer.memory.estimate import estimate

    def at(source):
        return estimate(RunConfig.load({"model": {"source": source, "family": "flux"}, "data": {"resolution": 1024},
                                        "train": {"mixed_precision": "bf16"}}), 4)

    small, published = at(str(folders["flux"])), at("black-forest-labs/FLUX.1-dev")
    assert small.peak_gb < 0.5 and small.activations_gb < 0.05 and small.lora_gb < 0.01, small
    assert published.activations_gb > 10 and published.weights_gb > 20, published  # the full-size figures stand


def test_zimage_turbo_samples_without_cfg_one_transformer_call_a_step(folders, tmp_path):
    """ZImagePipeline turns CFG on for any guidance above 0: the presets' 1.0 rendered every sample at about CFG 2
    with twice the transformer calls. Turbo now samples at 0 in its 9 steps; a run's config.toml says so."""
    from trainer.config import RunConfig
    from trainer.models.info import sampling_defaults
    from trainer.preview.previewer import Previewer, Request
    from trainer.training import loop

    p = Previewer()
    p.pipeline(str(folders["zimage"]))
    calls = []  # transformer evaluations: images through the transformer (CFG batches the negative beside each)
    p.base.unet.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    _, settings = p.generate(Request(base=str(folders["zimage"]), prompt="a red circle", size=32))
    assert (settings["steps"], settings["guidance"]) == (9, 0.0)
    turbo = sum(calls)
    assert 0 < turbo == len(calls) <= 9  # one evaluation a step (at most: the pipeline may skip its last, sigma 0)
    calls.clear()
    p.generate(Request(base=str(folders["zimage"]), prompt="a red circle", size=32, guidance=1.0))
    assert sum(calls) == 2 * turbo  # what every Turbo sample cost before: CFG on
    # a run resolves the same, and writes it down
    data = make_dataset(tmp_path / "data", n=2)
    cfg = tiny_config(folders["zimage"], data, tmp_path / "run", **{"train.max_steps": 1, "data.bucket_step": 16})
    cfg.sample.steps = cfg.sample.guidance_scale = None
    loop.train(cfg)
    written = RunConfig.load(str(tmp_path / "run" / "config.toml")).sample
    assert (written.steps, written.guidance_scale) == (9, 0.0)
    # Base only when it is known to be Base; Flux schnell has no guidance to give
    assert sampling_defaults("zimage", "Tongyi-MAI/Z-Image") == sampling_defaults("zimage", "/m/Z-Image-Base") == (28, 4.0)
    assert sampling_defaults("zimage", "Tongyi-MAI/Z-Image-Turbo") == sampling_defaults("zimage", "/m/zimage") == (9, 0.0)
    assert sampling_defaults("flux", "x", {"guidance_embeds": False}) == (4, 0.0)
    assert sampling_defaults("flux", "x", {"guidance_embeds": True}) == (20, 3.5)


@pytest.mark.parametrize("fam", ["flux", "zimage"])
def test_the_caption_cache_lives_on_disk_and_ram_holds_a_budget(folders, tmp_path, monkeypatch, fam):
    """Flux's T5 sequence is 4 MiB a caption and was held in RAM for the whole run (10,000 captions: 40 GB). Now
    each caption is a file beside the latent cache, RAM keeps a budget of them, a second run encodes none, and
    the LoRA is the same byte for byte. Z-Image keeps only its prompt's real tokens, not the 512-token padding."""
    from safetensors.torch import load_file

    from trainer.data import text_cache
    from trainer.training import loop

    data = make_dataset(tmp_path / "data", n=4)
    one_caption = {"flux": (16 * 48 + 32) * 4, "zimage": 64 * 32 * 4}[fam]  # a tiny caption's bytes, padded (fp32)
    monkeypatch.setattr(text_cache, "MEMORY_BYTES", one_caption)
    held = []
    real_put = text_cache.TextCache.put
    monkeypatch.setattr(text_cache.TextCache, "put",
                        lambda self, c, e: (real_put(self, c, e), held.append(self.held_bytes))[0])
    runs = []
    for i in range(2):
        cfg = tiny_config(folders[fam], data, tmp_path / f"run{i}", **{"train.max_steps": 3, "sample.at_end": False,
                                                                      "data.bucket_step": 16})
        loop.train(cfg)
        runs.append(tmp_path / f"run{i}")
    first, second = ([e for e in read_events(r) if e["type"] == "text_cache"][0] for r in runs)
    assert first["encoded"] == 4 and first["cached"] == 0 and second["encoded"] == 0 and second["cached"] == 4
    files = sorted(Path(first["folder"]).rglob("*.safetensors"))
    assert len(files) == 4 and held and max(held) <= 2 * one_caption  # at most the budget and the newest entry
    entry = load_file(str(files[0]))
    if fam == "zimage":
        assert entry["hidden"].shape[0] < 64 and set(entry) == {"hidden"}  # real tokens only, no mask stored
    else:
        assert entry["hidden"].shape[0] == 16 and set(entry) == {"hidden", "pooled"}  # T5's window is the sequence
    a, b = (load_file(str(next(r.glob("run*.safetensors")))) for r in runs)  # the same LoRA, from disk or not
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_zimage_time_is_computed_in_fp32_and_schnell_reads_256_t5_tokens(folders, tmp_path):
    """Z-Image's time 1 - σ was rounded to bf16 before the subtraction (off by up to 0.002); ZImagePipeline computes
    it in fp32. Flux.1 schnell reads 256 T5 tokens (BFL's reference, sd-scripts), dev 512."""
    import shutil

    import torch

    from trainer.models.families import FAMILIES
    from trainer.models.loading import load_base

    seen = {}

    def model(x, t, feats, return_dict=False):
        seen["t"] = t
        return [[torch.zeros_like(v) for v in x]]

    noisy = torch.zeros(1, 16, 4, 4, dtype=torch.bfloat16)
    t = torch.tensor([998.7])
    FAMILIES["zimage"].denoise(model, noisy, t, torch.zeros(1, 3, 8), torch.ones(1, 3), None, None, None)
    assert seen["t"].dtype == torch.float32 and torch.equal(seen["t"], (1000 - t) / 1000)
    windows = {}
    for fam in ("flux", "flux-schnell"):
        folder = tmp_path / fam
        shutil.copytree(folders[fam], folder)
        config = folder / "tokenizer_2" / "tokenizer_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 512}))
        windows[fam] = load_base(str(folder)).tokenizers[1].model_max_length
    assert windows == {"flux": 512, "flux-schnell": 256}


# ---- files other tools read, and hostile ones (#7-#12) -----------------------------------------------------------
def _save(path, tensors, metadata=None):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {})
    return path


Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # a 32 x 32 layer of the tiny SD1


def test_diffusers_drops_a_kohya_doras_magnitudes_and_reads_peft_doras_exactly_and_every_place_says_so(
        folders, tmp_path):
    """DoRA files are exact in ComfyUI (test_formats). diffusers' load_lora_weights filters `dora_scale` out of a
    kohya file (it warns) and applies W + up·down; from the peft layout it applies peft's DoRA exactly. inspect, the
    model card and the Library say which reader gets what."""
    from diffusers import StableDiffusionPipeline

    from trainer.lora import tools
    from trainer.training import loop

    data = make_dataset(tmp_path / "data", n=4)
    got = {}
    for layout in ("kohya", "peft"):
        cfg = tiny_config(folders["sd1"], data, tmp_path / layout, **{
            "train.max_steps": 3, "lora.use_dora": True, "save.dtype": "fp32", "save.layout": layout,
            "lora.train_text_encoder": False, "sample.at_end": False, "optim.lr": 5e-2})
        result = loop.train(cfg)
        want = {}
        for name, m in result.models["lora_unet"].named_modules():
            if hasattr(m, "lora_A") and "default" in m.lora_A:
                w = m.get_base_layer().weight.detach().float()
                plain = w + m.get_delta_weight("default").float().reshape(w.shape)
                mag = m.lora_magnitude_vector["default"].weight.detach().float().reshape(-1)
                want[name] = (plain, plain * (mag / plain.reshape(w.shape[0], -1).norm(dim=1)).reshape(-1, 1))
        pipe = StableDiffusionPipeline.from_pretrained(str(folders["sd1"]), safety_checker=None)
        pipe.load_lora_weights(str(result.lora_path), adapter_name="x")
        pipe.fuse_lora(components=["unet"], lora_scale=1.0)
        fused = {n: pipe.unet.get_submodule(n).base_layer.weight.detach().float() for n in want}
        got[layout] = [sum(torch.allclose(fused[n], want[n][i], atol=1e-5) for n in want) for i in (0, 1)]
        got[layout].append(len(want))
        info = tools.inspect(result.lora_path)
        said = " ".join(info["loads_in"])
        assert ("drops the DoRA magnitudes" in said) == (layout == "kohya") and "diffusers" in said
        card = tools.card(result.lora_path).read_text()
        assert "## Where it loads" in card and info["loads_in"][0] in card
    n = got["kohya"][2]
    assert got["kohya"] == [n, 0, n] and got["peft"] == [0, n, n], got  # kohya: plain W+ΔW; peft: exact DoRA


import torch  # noqa: E402  (the LyCORIS files below are built by hand)


def test_hostile_lycoris_files_are_one_line_naming_the_file_and_module(folders, tmp_path, capsys):
    from app.library import import_file
    from app.workspace import Workspace, WorkspaceError
    from trainer.cli import main as cli_main

    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.01  # noqa: E731
    no_alpha = _save(tmp_path / "loha-no-alpha.safetensors", {f"{Q}.hada_w1_a": r(32, 4), f"{Q}.hada_w1_b": r(4, 32),
                                                               f"{Q}.hada_w2_a": r(32, 4), f"{Q}.hada_w2_b": r(4, 32)})
    assert cli_main(["lora", "inspect", str(no_alpha)]) == 0
    assert "alpha none (scale 1)" in capsys.readouterr().out  # was TypeError: NoneType.__format__
    nan = r(4, 4)
    nan[0, 0] = float("nan")
    bad_lokr = _save(tmp_path / "lokr-nan.safetensors", {f"{Q}.lokr_w1": nan, f"{Q}.lokr_w2": r(8, 8),
                                                         f"{Q}.alpha": torch.tensor(1.0)})
    assert cli_main(["lora", "inspect", str(bad_lokr)]) == 0  # was linalg.svd: non-finite
    assert "NaN or infinite" in capsys.readouterr().err
    # factors that make a 32 x 16 update for a 32 x 32 layer: bake and Preview name the file and the module
    misfit = _save(tmp_path / "lokr-misfit.safetensors", {f"{Q}.lokr_w1": r(4, 4), f"{Q}.lokr_w2": r(8, 4),
                                                          f"{Q}.alpha": torch.tensor(1.0)})
    assert cli_main(["lora", "bake", str(misfit), "--model", str(folders["sd1"]), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "lokr-misfit.safetensors: module " + Q in err and "(32, 16)" in err and "Traceback" not in err
    from trainer.preview.previewer import Previewer, Request, Slot

    with pytest.raises(ValueError, match=f"lokr-misfit.safetensors: module {Q}"):
        Previewer().generate(Request(base=str(folders["sd1"]), prompt="x", steps=1, size=32,
                                     loras=[Slot(str(misfit))]))
    # an alpha of several numbers, and LoHa factors that do not multiply: refused by name, at import too
    many = _save(tmp_path / "alpha3.safetensors", {f"{Q}.lora_down.weight": r(4, 32), f"{Q}.lora_up.weight": r(32, 4),
                                                   f"{Q}.alpha": torch.ones(3)})
    crossed = _save(tmp_path / "loha-crossed.safetensors", {f"{Q}.hada_w1_a": r(32, 4), f"{Q}.hada_w1_b": r(5, 32),
                                                            f"{Q}.hada_w2_a": r(32, 4), f"{Q}.hada_w2_b": r(4, 32),
                                                            f"{Q}.alpha": torch.tensor(4.0)})
    ws = Workspace(tmp_path / "ws").ensure(with_samples=False)
    for path, words in ((many, f"{Q}.alpha holds 3 values"), (crossed, "factors do not fit together")):
        assert cli_main(["lora", "inspect", str(path)]) == 2
        err = capsys.readouterr().err
        assert words in err and Q in err and "Traceback" not in err, err
        with pytest.raises(WorkspaceError, match=words):
            import_file(ws, str(path))
    assert not list((ws.root / "loras").glob("*.safetensors"))  # nothing half-imported


def test_a_flux_or_zimage_folder_without_its_transformer_is_named_as_such(folders, tmp_path):
    import shutil

    from trainer.errors import ModelError
    from trainer.models.loading import load_base

    for fam, words in (("flux", "FluxPipeline"), ("zimage", "ZImagePipeline")):
        folder = tmp_path / fam
        shutil.copytree(folders[fam], folder)
        shutil.rmtree(folder / "transformer")
        with pytest.raises(ModelError, match=f"no transformer/ folder; a {words} model needs one"):
            load_base(str(folder))


def test_every_zip_member_is_imported_renamed_or_reported(tmp_path):
    """'CON', 'trailing.png.', 'name.png ' and a zip inside the zip were dropped without a word ('imported 8,
    skipped 0'); and the app's 20,000-image limit held per import, so two imports passed it."""
    import io
    import zipfile

    from PIL import Image

    from trainer.data.importer import Limits, import_files

    def png(colour):
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), colour).save(buf, "PNG")
        return buf.getvalue()

    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("deep.png", png("red"))
    members = {"CON": png("blue"), "trailing.png.": png("green"), "name.png ": png("yellow"), "name.txt": "my words",
               "inner.zip": inner.getvalue(), "orphan.txt": "no image", "__MACOSX/._x.png": b"\x00\x05\x16\x07",
               "notes.md": "hello", "ok.png": png("white")}
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    result = import_files([tmp_path / "a.zip"], tmp_path / "ds")
    files = {Path(r["source"].split(":")[-1]).name if "inner.zip" not in r["source"] else "inner": r["file"]
             for r in result.imported}
    assert files == {"CON": "CON_.png", "trailing.png.": "trailing.png", "name.png ": "name.png", "inner": "deep.png",
                     "ok.png": "ok.png"}
    assert (tmp_path / "ds" / "name.txt").read_text() == "my words"  # its caption came with it
    reported = {r["source"].split(":", 1)[1]: r["reason"] for r in result.skipped}
    assert set(reported) == {"orphan.txt", "__MACOSX/._x.png", "notes.md"}
    handled = len(result.imported) + len(result.skipped) + 1  # + name.txt, imported with its image
    assert handled == len(members)
    # the limit counts the images a dataset holds already: a second import cannot pass it
    for i, colour in enumerate(("purple", "pink", "gray", "orange", "navy")):
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"more{i}.png")
    first = import_files([tmp_path / f"more{i}.png" for i in range(3)], tmp_path / "ds2", limits=Limits(max_files=3))
    second = import_files([tmp_path / f"more{i}.png" for i in (3, 4)], tmp_path / "ds2", limits=Limits(max_files=3))
    assert len(first.imported) == 3 and not second.imported
    assert all("3-image limit of a dataset (it held 3" in s["reason"] for s in second.skipped)


def test_settings_that_did_nothing_together_are_refused_by_name(folders, tmp_path):
    from trainer.config import ConfigError, RunConfig
    from trainer.training import loop

    for sets, words in ((["lora.rank_dropout=0.2"], "applies to LoHa and LoKr only"),
                        (["lora.lokr_factor=8"], "lora.lokr_factor applies to LoKr only"),
                        (["lora.network=lokr", "lora.lokr_factor=0"], "lora.lokr_factor: 0"),
                        (["data.validation_split=1.5"], "a fraction below 1")):
        with pytest.raises(ConfigError, match=words):
            RunConfig.load(overrides=sets)
    assert RunConfig.load(overrides=["lora.network=loha", "lora.rank_dropout=0.2"]).lora.rank_dropout == 0.2
    data = make_dataset(tmp_path / "data", n=4)
    cfg = tiny_config(folders["sd1"], data, tmp_path / "run", **{"lora.network": "lokr", "lora.lokr_factor": 10**9})
    with pytest.raises(ValueError, match="larger than every UNet layer's dimension .*as lora.lokr_factor = -1 does"):
        loop.train(cfg)


def test_a_full_disk_names_the_file_it_was_writing(tmp_path, capsys, monkeypatch):
    import errno

    from trainer.cli import main as cli_main

    lora = _save(tmp_path / "a.safetensors", {f"{Q}.lora_down.weight": torch.ones(4, 32),
                                             f"{Q}.lora_up.weight": torch.ones(32, 4), f"{Q}.alpha": torch.tensor(4.)})

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    assert cli_main(["lora", "merge", str(lora), str(lora), "--out", str(tmp_path / "ab.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"No space left on device: {tmp_path / 'ab.safetensors'} (free disk space" in err, err
    assert not list(tmp_path.glob("*ab.safetensors*"))  # no half file, no temp file left


def test_a_model_outside_the_workspace_is_read_on_a_loopback_app_and_refused_on_a_network(folders, tmp_path):
    """The box promises 'a local file or folder'; a folder outside the workspace was refused, as a raw toast."""
    from app import confine
    from app.workspace import Workspace, WorkspaceError

    local = Workspace(tmp_path / "ws", models_anywhere=True).ensure(with_samples=False)
    assert confine.model(local, "model.source", str(folders["flux"])) == str(folders["flux"].resolve())
    listening = Workspace(tmp_path / "ws2").ensure(with_samples=False)
    with pytest.raises(WorkspaceError, match="--allow-path .*listens on a network"):
        confine.model(listening, "model.source", str(folders["flux"]))
    # writes stay confined either way
    with pytest.raises(WorkspaceError, match="outside the workspace"):
        confine.path(local, "save.output_dir", str(tmp_path / "elsewhere"))


def test_the_launcher_runs_the_cli_commands_so_no_path_entry_is_needed(tmp_path, monkeypatch):
    """Every CLI example in the README failed after `python launch.py`: lora-studio lives in .venv, which no new
    user activates. `python launch.py train ...` runs it there, its own options (--help too) untouched."""
    from app import launcher

    started = {}
    monkeypatch.setattr(launcher, "start_app", lambda cmd, os_name, root: started.setdefault("cmd", cmd) and 0)
    monkeypatch.setattr(launcher, "install_reason", lambda *a: None)  # an environment that is installed already
    assert launcher.main(["train", "--help", "--dataset", "d", "--venv", "x"]) == 0
    assert started["cmd"][1:] == ["-m", "app", "train", "--help", "--dataset", "d", "--venv", "x"]
    # and the Train tab's "the same run from a terminal" says it that way when the launcher started the app
    from app.jobs import cli_equivalent

    monkeypatch.setenv("LORA_STUDIO_LAUNCHER", "/home/me/lora-studio/launch.py")
    assert cli_equivalent(tmp_path / "r").startswith("python /home/me/lora-studio/launch.py train --config ")
    monkeypatch.delenv("LORA_STUDIO_LAUNCHER")
    assert cli_equivalent(tmp_path / "r").startswith("lora-studio train --config ")


def test_stop_ends_samples_and_validation_part_way_and_the_page_says_what_it_waits_for(folders, tmp_path,
                                                                                        monkeypatch):
    """Stop on a slow run took 12 min 49 s: it waited for every sample (each denoising step) and every held-out
    image. Now a mid-run sample ends at its next denoising step, the validation at its next image, and the LoRA
    saves; the Train tab says what a stopping run is waiting for."""
    from app.handlers.train import waiting_for
    from app.jobs import RunView
    from trainer.training import samples, validation
    from trainer.training import loop

    data = make_dataset(tmp_path / "data", n=6)
    calls = {"denoise": 0, "held_out": 0}
    real_interrupter, real_one = samples._interrupter, validation.Validation._one

    def interrupter(stop):
        inner = real_interrupter(stop)

        def on_step(pipe, step, timestep, kwargs):
            calls["denoise"] += 1
            (tmp_path / "run" / "STOP").touch()  # the user presses Stop during the first sample
            return inner(pipe, step, timestep, kwargs)
        return on_step

    monkeypatch.setattr(samples, "_interrupter", interrupter)
    cfg = tiny_config(folders["sd1"], data, tmp_path / "run", **{"train.max_steps": 10, "sample.every_n_steps": 2,
                                                                "sample.steps": 50, "sample.at_end": False})
    result = loop.train(cfg)
    assert result.stopped_early and result.steps == 2 and result.lora_path.exists()
    assert calls["denoise"] == 1  # not 50 steps x 2 prompts
    # the held-out loss, stopped at its next image
    monkeypatch.setattr(samples, "_interrupter", real_interrupter)

    def one(self, *a, **k):
        calls["held_out"] += 1
        if calls["held_out"] == 1:
            (tmp_path / "run2" / "STOP").touch()  # pressed during the first held-out image
        return real_one(self, *a, **k)

    monkeypatch.setattr(validation.Validation, "_one", one)
    cfg = tiny_config(folders["sd1"], data, tmp_path / "run2", **{"train.max_steps": 10, "data.validation_split": 3,
                                                                 "train.validate_every_n_steps": 2,
                                                                 "sample.at_end": False})
    result = loop.train(cfg)
    # 1 image of the mid-run validation, then the 3 of the saved LoRA's own (after the Stop): one figure in all
    assert result.stopped_early and result.steps == 2 and calls["held_out"] == 1 + 3
    assert len([e for e in read_events(tmp_path / "run2") if e["type"] == "validation"]) == 1
    # what the page says meanwhile
    busy = RunView("r", "stopping", step=40, total=100, eta_s=600.0,
                   progress={"phase": "samples", "done": 1, "total": 2})
    assert waiting_for(busy).startswith("Stopping: ending samples 1 / 2 at its next image or denoising step")
    stepping = RunView("r", "stopping", step=40, total=100, eta_s=600.0)
    assert waiting_for(stepping) == "Stopping: finishing step 41 (a step takes about 10.0 s here), then saving the LoRA."


def test_bulk_tools_do_not_stack_the_trigger_and_the_check_flags_a_doubled_one(tmp_path):
    from trainer.data import caption_ops
    from trainer.data.caption_lint import lint
    from trainer.data.captions import with_trigger

    data = make_dataset(tmp_path / "d", n=3)
    for p in data.glob("*.txt"):
        p.unlink()
    assert caption_ops.caption_uncaptioned(data, "character", "vomble") == 3  # "photo of vomble"
    assert caption_ops.add_tag(data, "vomble", first=True) == 0  # it is there already: not "vomble, photo of vomble"
    assert {p.read_text().strip() for p in data.glob("*.txt")} == {"photo of vomble"}
    assert with_trigger("photo of vomble", "vomble") == "photo of vomble"  # training does not stack it either
    assert with_trigger("a red circle", "vomble") == "vomble, a red circle"
    assert caption_ops.add_tag(data, "smiling") == 3

    from trainer.data.caption_lint import TokenCounter

    found = lint({"a.png": "vomble, photo of vomble", "b.png": "photo of vomble"}, "vomble", TokenCounter("words", 77))
    assert any("'vomble' is in the caption 2 times" in f for f in found.files.get("a.png", [])), found.files
    assert "b.png" not in found.files
