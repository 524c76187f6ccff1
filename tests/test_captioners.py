"""Captioners on tiny random-weight models of the real architectures (no downloads): the WD tagger's tags follow
its thresholds, blacklist and underscore rules; Florence-2 and a chat VLM write captions; tags + sentence combine;
the trigger goes first; existing captions are kept unless overwrite, and overwritten ones can be restored."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.captioner_models import build_florence2, build_llava, build_wd_tagger
from trainer.cli import main as cli_main
from trainer.data.captioner import Combined, caption_dataset, guess_kind, load_captioner, restore_captions
from trainer.data.wd_tagger import TaggerOptions, WDTagger


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioners")
    return {"wd": build_wd_tagger(root / "wd"), "florence": build_florence2(root / "florence"),
            "vlm": build_llava(root / "llava")}


def colour_dataset(folder, colours=("red", "blue", "red")):
    folder.mkdir(parents=True)
    for i, c in enumerate(colours):
        Image.new("RGB", (48 + 8 * i, 40), c).save(folder / f"img{i}.png")
    return folder


def test_wd_tagger_thresholds_ratings_kaomoji_and_blacklist(models):
    tagger = WDTagger(str(models["wd"]))
    red, blue = Image.new("RGB", (80, 40), "red"), Image.new("RGB", (40, 80), "blue")
    assert tagger.caption([red, blue]) == ["^_^, simple background, red background",
                                           "^_^, simple background, blue background"]
    strict = WDTagger(str(models["wd"]), TaggerOptions(character_threshold=0.7, blacklist=["Simple Background"],
                                                       underscores_to_spaces=False))
    assert strict.caption([red]) == ["zorb_(character), ^_^, red_background"]  # character tags first


def test_wd_tagger_pads_to_a_white_square_in_bgr(models):
    tagger = WDTagger(str(models["wd"]))
    x = tagger.prepare(Image.new("RGB", (80, 40), (255, 0, 0)))
    assert x.shape == (64, 64, 3) and x.dtype == np.float32
    assert tuple(x[0, 32]) == (255, 255, 255)  # padding above the wide image is white
    assert tuple(x[32, 32]) == (0, 0, 255)  # red in BGR order


def test_kinds_are_guessed_from_the_files(models):
    assert [guess_kind(str(models[k])) for k in ("wd", "florence", "vlm")] == ["wd", "florence", "vlm"]


@pytest.mark.parametrize("kind", ["florence", "vlm"])
def test_sentence_captioners_write_captions_trigger_first(models, tmp_path, kind):
    ds = colour_dataset(tmp_path / "ds")
    (ds / "img0.txt").write_text("my own words")
    captioner = load_captioner(str(models[kind]), kind, instruction="Describe it.")
    captioner.generate_kwargs = {**captioner.generate_kwargs, "min_new_tokens": 4}  # random weights may stop at once
    captioner.max_new_tokens = 6
    done = caption_dataset(ds, captioner, trigger="glorp", batch_size=2)
    assert sorted(p.rsplit("/", 1)[-1] for p in done.written) == ["img1.png", "img2.png"]
    for name in ("img1", "img2"):
        text = (ds / f"{name}.txt").read_text().strip()
        assert text.startswith("glorp, ") and len(text) > len("glorp, ")
    assert (ds / "img0.txt").read_text() == "my own words"  # kept: no overwrite
    backup = Path(done.backup)  # nothing replaced; the new captions are listed, so an undo takes them away
    assert [f.name for f in backup.iterdir()] == ["absent.json"]
    assert json.loads((backup / "absent.json").read_text()) == ["img1.txt", "img2.txt"]


def test_combined_tags_and_sentence_overwrite_backup_and_restore(models, tmp_path):
    ds = colour_dataset(tmp_path / "ds")
    before = {f"img{i}.txt": f"caption {i} by hand" for i in range(3)}
    for name, text in before.items():
        (ds / name).write_text(text)
    sentence = load_captioner(str(models["vlm"]), "vlm")
    sentence.generate_kwargs, sentence.max_new_tokens = {"min_new_tokens": 3}, 4
    captioner = Combined(WDTagger(str(models["wd"])), sentence)
    preview = caption_dataset(ds, captioner, trigger="glorp", overwrite=True, limit=2, preview=True)
    assert len(preview.written) == 2 and all((ds / n).read_text() == t for n, t in before.items())  # nothing written
    done = caption_dataset(ds, captioner, trigger="glorp", overwrite=True, backup_dir=tmp_path / "backup")
    assert len(done.written) == 3 and done.backup == str(tmp_path / "backup")
    red = (ds / "img0.txt").read_text().strip()
    assert red.startswith("glorp, ^_^, simple background, red background, ") and len(red) > 47  # + the sentence
    assert {f.name: f.read_text() for f in (tmp_path / "backup").iterdir()} == before
    undone = restore_captions(ds, tmp_path / "backup", tmp_path / "backup2")
    assert len(undone.written) == 3 and all((ds / n).read_text() == t for n, t in before.items())
    assert (tmp_path / "backup2" / "img0.txt").read_text().strip() == red  # the undo is undoable too


def test_cli_preview_then_apply_then_restore(models, tmp_path, capsys):
    ds = colour_dataset(tmp_path / "ds", ("red", "blue"))
    (ds / "img1.txt").write_text("hand made")
    wd = str(models["wd"])
    assert cli_main(["dataset", "caption", str(ds), "--auto", wd, "--preview", "1", "--overwrite", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["changed"] == 0 and list(out["captions"].values()) == ["^_^, simple background, red background"]
    assert not (ds / "img0.txt").exists()
    assert cli_main(["dataset", "caption", str(ds), "--auto", wd, "--trigger", "glorp", "--blacklist", "^_^",
                     "--overwrite", "--backup", str(tmp_path / "b"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["changed"] == 2 and out["backup"] == str(tmp_path / "b")
    assert (ds / "img1.txt").read_text().strip() == "glorp, simple background, blue background"
    assert cli_main(["dataset", "caption", str(ds), "--restore", str(tmp_path / "b"), "--backup",
                     str(tmp_path / "b2")]) == 0
    assert (ds / "img1.txt").read_text() == "hand made"
    assert not (ds / "img0.txt").exists()  # it had no caption before: the restore takes the new one away
    assert "1 caption(s) restored and 1 removed" in capsys.readouterr().out
    assert cli_main(["dataset", "caption", str(ds), "--restore", str(tmp_path / "b2"), "--json"]) == 0  # redo
    assert json.loads(capsys.readouterr().out)["changed"] == 2
    assert (ds / "img0.txt").read_text().startswith("glorp, ") and (ds / "img1.txt").read_text().startswith("glorp")
    assert cli_main(["dataset", "caption", str(ds), "--auto", str(tmp_path / "nope")]) == 2
    assert "could not load captioning model" in capsys.readouterr().err
