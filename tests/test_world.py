"""The synthetic world behind the embedded model: the sample datasets regenerate byte for byte, the
checker reads clean scenes and refuses wrong ones, the stripe score sees only the style's hatching,
phase 3 of pretraining touches the decoder only, and the presets follow their rules (rank from data
size, tiers, user presets never shadow built-ins)."""
import dataclasses
import random

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import presets
from trainer.config import ConfigError
from trainer.world import checker, datasets, score, shapes
from trainer.world.learn import SAMPLE_DATASETS
from trainer.world.pretrain import RECIPE, build_vae, outline_band, sharpen_decoder, to_tensor


def test_sample_datasets_regenerate_byte_identically(tmp_path):
    for kind in datasets.KINDS:
        datasets.write_dataset(kind, tmp_path / kind)
        shipped = sorted(p.name for p in (SAMPLE_DATASETS / kind).iterdir())
        assert shipped == sorted(p.name for p in (tmp_path / kind).iterdir())
        for name in shipped:
            assert (SAMPLE_DATASETS / kind / name).read_bytes() == (tmp_path / kind / name).read_bytes(), name
        assert 10 <= len([n for n in shipped if n.endswith(".png")]) <= 20


def test_the_embedded_models_drift_scenes_are_the_worlds():
    """Training and the Preview tab read the trigger-free scenes (and the settings bench learn renders them at)
    from the embedded model's folder, not from the world: they must be what the world would write."""
    from trainer.training.validation import drift_prompts, embedded_drift
    from trainer.world.learn import EVAL, plain_prompts

    shipped = embedded_drift()
    assert shipped["prompts"] == plain_prompts(EVAL["prompts"])
    assert shipped["eval"] == {k: EVAL[k] for k in ("seed", "steps", "guidance")}
    assert drift_prompts(None, True, 4) == plain_prompts(4)  # the first n of them, as plain_prompts(n) gives


def test_checker_reads_clean_scenes_and_refuses_wrong_prompts():
    rng = random.Random("checker-test")
    scenes = [shapes.random_scene(rng) for _ in range(150)]
    images = [shapes.render(s) for s in scenes]
    right = sum(checker.follows(im, s.shape, s.colour) for im, s in zip(images, scenes))
    assert right >= 0.97 * len(scenes)
    other_shape = sum(checker.follows(im, next(x for x in shapes.SHAPES if x != s.shape), s.colour)
                      for im, s in zip(images, scenes))
    other_colour = sum(checker.follows(im, s.shape, next(c for c in shapes.COLOURS if c != s.colour))
                       for im, s in zip(images, scenes))
    assert other_shape <= 3 and other_colour == 0


def test_stripe_score_sees_the_style_hatching_only():
    rng = random.Random("stripes")
    hatched = [shapes.random_scene(rng, hatched=True, size="large", colour="red") for _ in range(6)]
    flat = [dataclasses.replace(s, hatched=False) for s in hatched]
    assert score.stripes([shapes.render(s) for s in hatched]) > 0.3
    assert score.stripes([shapes.render(s) for s in flat]) < 0.02
    noisy = []
    for i, s in enumerate(flat):  # texture with no period, in the shape's colours
        arr = np.asarray(shapes.render(s)).astype(np.int16)
        arr = arr + np.random.default_rng(i).integers(-60, 60, arr.shape)
        noisy.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))
    assert score.stripes(noisy) < 0.03
    # Stripes of the style's period but along the other axes are not its hatching.
    y, x = np.mgrid[0:shapes.SIZE, 0:shapes.SIZE]
    for bands in (y % shapes.HATCH_PERIOD < shapes.HATCH_PERIOD // 2, x % shapes.HATCH_PERIOD < shapes.HATCH_PERIOD // 2):
        img = np.full((shapes.SIZE, shapes.SIZE, 3), 240, np.uint8)
        img[12:52, 12:52] = np.where(bands[12:52, 12:52, None], (220, 40, 40), (55, 10, 10))
        assert score.stripe_strength(Image.fromarray(img)) < 0.05


def test_outline_band_covers_edges_only():
    scene = shapes.random_scene(random.Random(3), shape="square", size="large", gradient=False)
    band = outline_band(to_tensor([shapes.render(scene)]))[0, 0]
    cx, cy, r = int(scene.cx), int(scene.cy), scene.diameter // 2
    assert band[cy, cx] == 0 and band[1, 1] == 0  # the square's middle, the far background
    assert band[cy, cx - r] == 1 and band[cy - r, cx] == 1  # its left and top edges


def test_decoder_sharpening_changes_the_decoder_only():
    torch.manual_seed(0)
    vae = build_vae(16)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    sharpen_decoder(vae, {**RECIPE, "decoder_steps": 2, "vae_batch": 2})
    after = vae.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed), sorted(changed)[:5]
    assert any(k.startswith("decoder.") for k in changed)


@pytest.mark.parametrize("kind", presets.KINDS)
def test_rank_suggestion_grows_with_the_dataset(kind):
    small, medium, large = (presets.suggest_rank(kind, n) for n in (6, 30, 400))
    assert 4 <= small <= medium <= large <= 32 and small < large


def test_presets_derive_repeats_and_keep_trigger_rules():
    character = presets.resolve("character", family="sd1", n_images=10)
    assert character["data"]["keep_tokens"] >= 1
    few, many = (presets.resolve("character", family="sd1", n_images=n)["data"]["repeats"] for n in (5, 100))
    assert few > many >= 1
    style = presets.resolve("style", family="sd1", n_images=20)
    assert style["data"].get("shuffle_tags") is True


def test_vram_tiers_switch_memory_settings():
    low, high = (presets.resolve("character", family="sdxl", vram=gb, n_images=20) for gb in (6, 24))
    assert low != high
    assert low["train"]["gradient_checkpointing"] is True


def test_user_preset_never_shadows_a_built_in(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="built-in"):
        presets.save_user_preset("character", "[lora]\nrank = 4\n")
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "character.toml").write_text("[lora]\nrank = 2\n")  # placed by hand
    assert presets.available()["character"] == presets.BUILTIN_DIR / "character.toml"
    path = presets.save_user_preset("mine", "[lora]\nrank = 4\n")
    assert presets.available()["mine"] == path
    with pytest.raises(ConfigError, match="lora.nonsense|nonsense"):
        presets.save_user_preset("bad", "[lora]\nnonsense = 1\n")
