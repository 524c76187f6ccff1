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
