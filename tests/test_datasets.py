import hashlib
import io
import json
import random
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from PIL import Image

from trainer.cli import main as cli_main
from trainer.data import caption_ops as ops
from trainer.data.buckets import choose_bucket, fit, make_buckets
from trainer.data.captioner import caption_dataset
from trainer.data.captions import augment, with_trigger
from trainer.data.importer import Limits, import_files, sanitize_name
from trainer.data.scan import scan
from trainer.data.validate import report
from trainer.training.events import read_events
from trainer.training.loop import train

from .bad_inputs import make_bad_dataset
from .conftest import make_dataset, step_gradients, tiny_config


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_report_gives_each_bad_file_its_reason(tmp_path):
    expect = make_bad_dataset(tmp_path / "bad")
    rep = report(tmp_path / "bad", resolution=64)
    by_name = {Path(f["path"]).name: f for f in rep["files"]}
    assert set(by_name) == set(expect)
    for name, phrase in expect.items():
        f = by_name[name]
        if phrase:
            assert any(phrase in r for r in f["reasons"]), (name, f["reasons"])
        else:
            assert f["status"] != "excluded", (name, f["reasons"])
    assert by_name["rotated.jpg"]["width"] == 72 and by_name["rotated.jpg"]["height"] == 96  # EXIF applied
    assert by_name["latin1.png"]["caption"] == "café, crème"
    assert rep["summary"]["excluded"] == sum(1 for n, p in expect.items()
                                             if p and p not in ("near-duplicate", "no caption file", "not UTF-8",
                                                                "empty caption"))
    assert sum(rep["buckets"].values()) == rep["summary"]["ok"] + rep["summary"]["warning"]


def test_check_cli_json_and_text(tmp_path, capsys):
    make_bad_dataset(tmp_path / "bad")
    assert cli_main(["dataset", "check", str(tmp_path / "bad"), "--resolution", "64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["excluded"] > 0 and data["buckets"]
    assert cli_main(["dataset", "check", str(tmp_path / "bad"), "--resolution", "64"]) == 0
    out = capsys.readouterr().out
    assert "excluded" in out and "decompression bomb" in out


def test_import_normalises_and_never_touches_originals(tmp_path):
    src = tmp_path / "src"
    make_bad_dataset(src)
    Image.new("RGB", (80, 80), "navy").save(src / "héllo wörld ünïcode.png")
    long_name = "x" * 200 + ".png"
    Image.new("RGB", (80, 80), "teal").save(src / long_name)
    before = tree_hashes(src)
    res = import_files([src], tmp_path / "ds")
    assert tree_hashes(src) == before
    imported = {Path(r["source"]).name: r["file"] for r in res.imported}
    skipped = {Path(r["source"]).name: r["reason"] for r in res.skipped}
    assert "corrupt.jpg" in skipped and "notes.png" in skipped and "bomb.png" in skipped and "empty.png" in skipped
    assert "exact duplicate" in skipped["x_dup.png"]
    ds = tmp_path / "ds"
    for name in ("rotated.jpg", "rgba.png", "cmyk.jpg", "sixteen.png", "palette.png"):
        with Image.open(ds / imported[name]) as im:
            assert im.mode == "RGB", name
    with Image.open(ds / imported["rotated.jpg"]) as im:
        assert im.size == (72, 96)
    assert (ds / (Path(imported["rgba.png"]).stem + ".mask.png")).exists()
    assert (ds / imported["latin1.png"]).with_suffix(".txt").read_text(encoding="utf-8") == "café, crème"
    assert all(len(Path(f).stem) <= 80 for f in imported.values())
    assert "héllo_wörld_ünïcode.png" in imported.values() or any("héllo" in f for f in imported.values())
    # Importing the same folder again adds nothing and overwrites nothing.
    snapshot = tree_hashes(ds)
    again = import_files([src], ds)
    assert not again.imported and tree_hashes(ds) == snapshot


def test_import_names_never_escape_or_overwrite(tmp_path):
    assert sanitize_name("../../etc/passwd") == "passwd"
    assert sanitize_name("..\\..\\boot.ini") == "boot_ini"
    assert sanitize_name("CON.png") == "CON_"
    zpath = tmp_path / "evil.zip"
    buf = io.BytesIO()
    Image.new("RGB", (80, 80), "red").save(buf, format="PNG")
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("../../outside.png", buf.getvalue())
        z.writestr("/abs/path.png", buf.getvalue() + b"\0")
        z.writestr("sub/same.png", Image.new("RGB", (80, 80), "blue").tobytes()[:0] + _png((80, 80), "blue"))
        z.writestr("other/same.png", _png((80, 80), "green"))
        z.writestr("other/same.txt", "a green square")
    ds = tmp_path / "ds"
    res = import_files([zpath], ds)
    assert not (tmp_path / "outside.png").exists()
    files = sorted(p.name for p in ds.iterdir() if p.suffix == ".png")
    assert files == ["outside.png", "path.png", "same-1.png", "same.png"]
    assert (ds / "same-1.txt").read_text() == "a green square"
    assert len(res.imported) == 4


def _png(size, colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_zip_bomb_is_refused(tmp_path):
    zpath = tmp_path / "bomb.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("huge.png", b"\0" * (20 * 2**20))
        z.writestr("ok.png", _png((80, 80), "red"))
    res = import_files([zpath], tmp_path / "ds")
    assert [r["file"] for r in res.imported] == ["ok.png"]
    assert "zip bomb" in res.skipped[0]["reason"]
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as z:
        for i in range(30):
            z.writestr(f"{i}.txt", "x")
    res = import_files([many], tmp_path / "ds2", limits=Limits(max_files=10))
    assert not res.imported and "members" in res.skipped[0]["reason"]


@pytest.mark.parametrize("w, h", [(1, 4000), (4000, 1), (63, 63), (10000, 10000), (1, 1), (512, 513)])
@pytest.mark.parametrize("no_upscale", [False, True])
def test_buckets_are_always_valid(w, h, no_upscale):
    for res, step in ((512, 64), (1024, 64), (32, 8)):
        table = make_buckets(res, step, 256, 2048)
        assert all(bw > 0 and bh > 0 and bw % step == 0 and bh % step == 0 for bw, bh in table)
        assert all(bw * bh <= res * res for bw, bh in table)
        bw, bh = choose_bucket(w, h, table, no_upscale=no_upscale, step=step)
        assert bw > 0 and bh > 0 and bw % step == 0 and bh % step == 0
        (sw, sh), (l, t, r, b) = fit(w, h, (bw, bh))
        assert (r - l, b - t) == (bw, bh) and l >= 0 and t >= 0 and r <= sw and b <= sh


def test_bucket_prefers_matching_aspect():
    table = make_buckets(512, 64, 256, 1024)
    bw, bh = choose_bucket(1600, 900, table)
    assert bw > bh and abs(bw / bh - 16 / 9) < 0.25


def test_caption_operations_round_trip(tmp_path):
    ds = make_dataset(tmp_path / "ds")
    (ds / "img0.txt").write_text("a red circle, shiny", encoding="utf-8")
    images_before = {p.name: p.read_bytes() for p in ds.glob("*.png")}
    assert ops.add_tag(ds, "sks", first=True) == 4
    assert all(i.caption.startswith("sks, ") for i in scan(ds).items)
    assert ops.add_tag(ds, "sks") == 0  # already there
    assert ops.replace_tag(ds, "shiny", "matte") == 1
    assert [p.name for p in ops.find_by_tag(ds, "matte")] == ["img0.png"]
    assert ops.tag_frequency(ds)["sks"] == 4
    assert ops.remove_tag(ds, "sks") == 4
    assert scan(ds).items[0].caption == "a red circle, matte"
    assert {p.name: p.read_bytes() for p in ds.glob("*.png")} == images_before
    assert not [p for p in ds.iterdir() if p.name.endswith(".tmp")]
    (ds / "img1.txt").unlink()
    assert ops.caption_uncaptioned(ds, "character", "zorp") == 1
    assert (ds / "img1.txt").read_text().strip() == "photo of zorp"
    assert with_trigger("a cat", "zorp") == "zorp, a cat" and with_trigger("zorp, a cat", "zorp") == "zorp, a cat"


def test_caption_cli(tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds")
    assert cli_main(["dataset", "caption", str(ds), "--add", "sks", "--first", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"changed": 4}
    assert cli_main(["dataset", "stats", str(ds), "--resolution", "32", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["tags"]["sks"] == 4 and stats["images"] == 4


def test_shuffle_keep_tokens_and_dropout_statistics():
    rng = random.Random(0)
    caption = "trigger, a, b, c, d, e"
    n = 4000
    outs = [augment(caption, rng, True, 1, 0.0, 0.0) for _ in range(n)]
    assert all(o.startswith("trigger, ") for o in outs)
    assert len(set(outs)) > 60  # 5! = 120 orders of the tail
    first_after = [o.split(", ")[1] for o in outs]
    assert all(abs(first_after.count(t) / n - 0.2) < 0.03 for t in "abcde")
    dropped = sum(augment(caption, rng, False, 1, 0.0, 0.25) == "" for _ in range(n)) / n
    assert abs(dropped - 0.25) < 0.03
    kept = [len(augment(caption, rng, False, 1, 0.3, 0.0).split(", ")) - 1 for _ in range(n)]
    assert abs(sum(kept) / (5 * n) - 0.7) < 0.03


class FakeCaptioner:
    name = "fake"

    def caption(self, images):
        return [f"a picture {im.size[0]}x{im.size[1]}" for im in images]


def test_auto_caption_interface(tmp_path):
    ds = make_dataset(tmp_path / "ds")
    (ds / "img2.txt").unlink()
    assert len(caption_dataset(ds, FakeCaptioner(), trigger="zorp").written) == 1
    assert (ds / "img2.txt").read_text().strip() == "zorp, a picture 48x40"
    asked = []
    stopped = caption_dataset(ds, FakeCaptioner(), overwrite=True, batch_size=3, backup_dir=tmp_path / "b",
                              should_stop=lambda: asked.append(1) or len(asked) > 1)
    assert stopped.stopped and len(stopped.written) == 3  # the first batch, then the stop between batches
    assert len(list((tmp_path / "b").glob("*.txt"))) == 4  # every caption it was about to replace, first
    assert len(caption_dataset(ds, FakeCaptioner(), overwrite=True, backup_dir=tmp_path / "c").written) == 4


def test_training_skips_bad_files_and_keeps_going(tiny_models, tmp_path):
    ds = make_dataset(tmp_path / "ds")
    (ds / "broken.png").write_text("not really a png")
    (ds / "broken.txt").write_text("a broken thing")
    out = tmp_path / "run"
    result = train(tiny_config(tiny_models["sd1"], ds, out, **{"train.max_steps": 2, "sample.at_end": False}))
    assert result.steps == 2
    warnings = [e["message"] for e in read_events(out) if e["type"] == "warning"]
    assert any("broken.png" in w and "not an image" in w for w in warnings)


def test_latent_cache_hits_misses_and_recovers(tiny_models, tmp_path):
    ds = make_dataset(tmp_path / "ds")
    model = tiny_models["sd1"]

    def run(name):  # the cache filled before the first step (cache-ahead would encode only what one step takes)
        out = tmp_path / name
        train(tiny_config(model, ds, out, **{"train.max_steps": 1, "sample.at_end": False, "data.cache_ahead": False}))
        return next(e for e in read_events(out) if e["type"] == "cache")

    first = run("r1")
    assert first["to_encode"] == 4 and first["cached"] == 0
    second = run("r2")
    assert second["to_encode"] == 0 and second["cached"] == 4
    Image.new("RGB", (40, 48), "black").save(ds / "img0.png")  # an edited image is encoded again
    assert run("r3")["to_encode"] == 1
    for f in (tmp_path / "cache" / "latents").rglob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:20])  # truncated by a crash
    assert run("r4")["to_encode"] == 4  # recomputed, not fatal


def test_cache_ahead_trains_the_same_lora_as_caching_first_and_encodes_in_the_samplers_order(tiny_models, tmp_path,
                                                                                           monkeypatch):
    from trainer.data import cache as cache_mod

    ds = make_dataset(tmp_path / "ds", n=4)
    make_dataset(tmp_path / "ds" / "2_more", n=2, size=(56, 40))  # six distinct images, two of them repeated
    order = []
    real_put = cache_mod.LatentCache.put
    monkeypatch.setattr(cache_mod.LatentCache, "put", lambda self, key, latent: order.append(key) or
                        real_put(self, key, latent))
    files, kinds = [], []
    for ahead in (True, False):
        order.clear()
        out = tmp_path / f"ahead-{ahead}" / "run"
        monkeypatch.setenv("LORA_STUDIO_CACHE", str(tmp_path / f"cache-{ahead}"))  # each encodes from nothing
        cfg = tiny_config(tiny_models["sd1"], ds, out, **{"train.max_steps": 8, "sample.at_end": False,
                                                           "data.cache_ahead": ahead, "data.cache_dir": "auto"})
        loop_result = train(cfg)
        files.append(load_file(str(loop_result.lora_path)))
        events = read_events(out)
        kinds.append([e["type"] for e in events if e["type"] in ("cache", "step", "cache_filled")])
        if ahead:  # encoded in the order the seeded sampler takes the images
            from trainer.data.cache import CENTRE
            from trainer.data.dataset import TrainingSet

            data = TrainingSet(scan(ds), cfg.data, 32)
            first_seen = list(dict.fromkeys(i for b in data.epoch_batches(0, cfg.train.seed, 1) for i in b))
            keys = [data.cache_key(i, CENTRE, _vae_id(tiny_models["sd1"])) for i in first_seen]
            assert len(order) == 6 and order == keys
    # cache-ahead: the first step comes after one latent, not six; the rest while training
    assert kinds[0][:2] == ["cache", "step"] and "cache_filled" in kinds[0]
    assert kinds[1][:2] == ["cache", "step"]  # caching first: every latent before the first step
    assert files[0].keys() == files[1].keys()
    for k in files[0]:
        assert torch.equal(files[0][k], files[1][k]), k  # bit-identical: latents are seeded by their keys
    out = tmp_path / "again" / "run"
    train(tiny_config(tiny_models["sd1"], ds, out, **{"train.max_steps": 2, "sample.at_end": False}))
    assert next(e for e in read_events(out) if e["type"] == "cache")["to_encode"] == 0  # a re-run encodes none


def _vae_id(model_dir) -> str:
    from trainer.data.cache import vae_identity
    from trainer.models import load_base

    return vae_identity(load_base(str(model_dir)).vae)


def test_text_cache_gives_the_same_gradients_as_encoding_every_step(tiny_models, dataset, tmp_path, monkeypatch):
    grads = []
    for cached in (True, False):
        out = tmp_path / ("cached" if cached else "live") / "run"
        grads.append(step_gradients(tiny_config(tiny_models["sdxl"], dataset, out, **{
            "train.max_steps": 2, "data.cache_text": cached, "data.caption_dropout": 0.3, "sample.at_end": False}),
            monkeypatch))
        assert any(e["type"] == "text_cache" for e in read_events(out)) == cached
    for step_a, step_b in zip(*grads):  # each step's gradients, not the files after two Adam steps
        for a, b in zip(step_a, step_b):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_regularization_images_are_balanced_and_weighted(tiny_models, tmp_path, monkeypatch):
    from trainer.config import DataConfig
    from trainer.data.dataset import TrainingSet
    from trainer.training.step import Step

    ds = make_dataset(tmp_path / "ds", n=4)
    reg = make_dataset(tmp_path / "reg", n=2)
    data = TrainingSet(scan(ds), DataConfig(trigger="zorp", bucket_step=8), 32, scan(reg))
    regs = [e for e in data.entries if e.is_reg]
    assert len(regs) == 2 and sum(e.repeats for e in regs) == data.num_samples == 4
    assert all(not e.caption.startswith("zorp") for e in regs)  # the class keeps its own captions
    assert all(e.caption.startswith("zorp") for e in data.entries if not e.is_reg)
    real_loss = Step.loss
    for w in (0.0, 1.0):
        kinds = []

        def loss(self, batch, kinds=kinds):
            kinds.append(all(self.data.entries[i].is_reg for i in batch))
            return real_loss(self, batch)

        monkeypatch.setattr(Step, "loss", loss)
        out = tmp_path / f"w{w}" / "run"
        grads = step_gradients(tiny_config(tiny_models["sd1"], ds, out, **{
            "train.max_steps": 8, "data.reg_dataset": str(reg), "data.prior_loss_weight": w,
            "sample.at_end": False}), monkeypatch)
        reg_steps = [g for g, is_reg in zip(grads, kinds) if is_reg]
        own_steps = [g for g, is_reg in zip(grads, kinds) if not is_reg]
        assert reg_steps and own_steps
        assert all(any(t.abs().sum() > 0 for t in g) for g in own_steps)
        reg_moved = [any(t.abs().sum() > 0 for t in g) for g in reg_steps]
        # prior_loss_weight 0 removes the class images' contribution exactly; 1 keeps it
        assert not any(reg_moved) if w == 0.0 else all(reg_moved)


def test_manifest_supplies_trigger_and_repeats(tiny_models, tmp_path):
    from trainer.data.manifest import Manifest, read_manifest, write_manifest

    ds = make_dataset(tmp_path / "ds")
    write_manifest(ds, Manifest(name="shapes", trigger="zorp", repeats=3))
    assert read_manifest(ds).trigger == "zorp"
    out = tmp_path / "run"
    train(tiny_config(tiny_models["sd1"], ds, out, **{"train.max_steps": 1, "sample.at_end": False}))
    config = (out / "config.toml").read_text()
    assert 'trigger = "zorp"' in config and "repeats = 3" in config
    start = next(e for e in read_events(out) if e["type"] == "dataset")
    assert start["samples"] == 12


def test_masked_loss_uses_the_imported_alpha(tiny_models, tmp_path, monkeypatch):
    from trainer.config import DataConfig
    from trainer.data.dataset import TrainingSet

    src = tmp_path / "src"
    src.mkdir()
    im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    im.paste((255, 0, 0, 255), (0, 0, 32, 64))  # left half opaque
    im.save(src / "half.png")
    (src / "half.txt").write_text("a red half")
    ds = tmp_path / "ds"
    import_files([src], ds)
    assert (ds / "half.mask.png").exists()
    data = TrainingSet(scan(ds), DataConfig(bucket_step=8, min_bucket_side=32), 64)
    m = data.mask(0, (0.5, 0.5), False, 8)
    assert m.shape == (1, 8, 8)
    assert m[0, :, :4].mean() > 0.95 and m[0, :, 4:].mean() < 0.05
    assert data.mask(0, (0.5, 0.5), True, 8)[0, :, 4:].mean() > 0.95  # flipped with the image
    # The loss itself: each image's squared error averaged over its opaque half only.
    from trainer.training import step as step_mod

    real_mse, seen = step_mod.F.mse_loss, []

    def mse(pred, target, reduction="mean"):
        seen.append((pred.detach().float(), target.detach().float()))
        return real_mse(pred, target, reduction=reduction)

    real_loss, losses = step_mod.Step.loss, []

    def loss(self, batch):
        value = real_loss(self, batch)
        losses.append(value.item())
        return value

    real_mask, masks = TrainingSet.mask, []

    def mask_of(self, *a, **k):
        masks.append(real_mask(self, *a, **k))
        return masks[-1]

    monkeypatch.setattr(step_mod.F, "mse_loss", mse)
    monkeypatch.setattr(step_mod.Step, "loss", loss)
    monkeypatch.setattr(TrainingSet, "mask", mask_of)
    out = tmp_path / "run"
    result = train(tiny_config(tiny_models["sd1"], ds, out, **{"train.max_steps": 2, "data.resolution": 64,
                                                               "data.masked_loss": True, "sample.at_end": False}))
    assert result.steps == 2
    assert len(seen) == len(losses) == len(masks) == 2
    for (pred, target), value, used in zip(seen, losses, masks):
        se = (pred - target) ** 2  # (1, channels, h, w)
        mask = used.to(se.dtype).expand_as(se[0])
        assert 0.4 < float(mask.mean()) < 0.6  # about the opaque half
        assert value == pytest.approx(float((se[0] * mask).sum() / mask.sum()), rel=1e-5)
        assert abs(value - float(se.mean())) > 1e-6  # not the unmasked loss
    assert all(e["loss"] is not None for e in read_events(out) if e["type"] == "step")


def test_data_benchmark_prints_json_last(capsys, tmp_path):
    assert cli_main(["bench", "data", "--sizes", "12,30", "--no-results"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["images"] for r in last["rows"]] == [12, 30]
    small, big = last["rows"]
    assert big["imported"] + big["skipped"] == 30 and big["skipped"] >= 1  # the generated exact duplicate
    assert all(r["import_s"] > 0 and r["check_s"] > 0 for r in last["rows"])
    assert last["growth"]["import_s"]["from"] == 12 and last["growth"]["import_s"]["to"] == 30
    assert "import_10k_within_5_min" in last["targets"] and last["targets"]["import_10k_within_5_min"] is None


