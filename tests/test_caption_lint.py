"""Caption lint: the tags it says are cut off are exactly the ones the training tokenizer truncates; missing and
misspelt triggers, duplicate tags, tags in every caption; `dataset check` reports them per file."""
import json

from PIL import Image
from transformers import CLIPTokenizer

from trainer.cli import main as cli_main
from trainer.data import caption_lint
from trainer.data.captions import split_tags
from trainer.models.info import EMBEDDED_DIR


def test_cut_tags_are_the_ones_training_truncates():
    counter = caption_lint.token_counter("tiny")
    assert counter.window == 24 and "embedded" in counter.name
    caption = "zorb, a large figure, blue background, soft light, tall grass, distant hills, red sky, old stone wall"
    n, cut = caption_lint.cut_tags(caption, counter)
    assert n > counter.room and cut
    # what training sees: the model's tokenizer, truncated to its window (trainer/models/family.py tokenize)
    tok = CLIPTokenizer.from_pretrained(str(EMBEDDED_DIR / "tokenizer"))
    ids = tok(caption, truncation=True, max_length=tok.model_max_length)["input_ids"]
    seen = tok.decode(ids, skip_special_tokens=True)
    tags = split_tags(caption)
    kept = tags[:len(tags) - len(cut)]
    assert cut == tags[len(kept):]  # a suffix of the tags
    assert all(" ".join(t.split()) in seen for t in kept)
    assert not all(t in seen for t in cut)  # the first cut tag is at most partly there, the rest not at all
    assert all(t not in seen for t in cut[1:])
    assert caption_lint.cut_tags("zorb, a small figure", counter) == (len(tok("zorb, a small figure",
                                                                              add_special_tokens=False)["input_ids"]), [])


def test_trigger_duplicates_and_tags_in_every_caption():
    counter = caption_lint.token_counter("tiny")
    found = caption_lint.lint({
        "a.png": "glorp, red shirt, smiling",
        "b.png": "Glorp_girl, red shirt, red shirt",
        "c.png": "glorp, red shirt, standing",
        "d.png": "",  # empty: the scan reports it, the lint does not count it
    }, "glorp", counter)
    assert set(found.files) == {"b.png"}
    b = " / ".join(found.files["b.png"])
    assert "no trigger 'glorp' but Glorp_girl: a typo?" in b  # a near miss is a warning on that file ...
    assert found.notes == ["1 of 3 captions do not start with the trigger 'glorp'; training puts it first, so nothing "
                           "needs changing"]  # ... a plain missing trigger is one note for the set
    assert "duplicate tag(s): red shirt" in b
    assert found.always == ["red shirt"]
    assert found.frequency[0] == ("red shirt", 3) and ("glorp", 2) in found.frequency


def test_approximate_counter_says_so():
    counter = caption_lint.TokenCounter("an approximate count (no tokenizer found)", 77)
    assert counter.counts(["a, b c"]) == [4]


def test_dataset_check_reports_lint_per_file(tmp_path, capsys):
    ds = tmp_path / "ds"
    ds.mkdir()
    for i in range(3):
        Image.effect_noise((64, 64), 60 + 30 * i).convert("RGB").rotate(90 * i).save(ds / f"{i}.png")
    (ds / "0.txt").write_text("zorb, a figure, gradient, gradient")
    (ds / "1.txt").write_text("zorb, a figure, " + ", ".join(f"tag number {k}" for k in range(12)))
    (ds / "2.txt").write_text("a figure, zorb")
    assert cli_main(["dataset", "check", str(ds), "--resolution", "64", "--trigger", "zorb", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    why = {f["path"].rsplit("/", 1)[-1]: (f["status"], " / ".join(f["reasons"])) for f in rep["files"]}
    assert why["0.png"][0] == "warning" and "duplicate tag(s): gradient" in why["0.png"][1]
    assert "cut off at training: " in why["1.png"][1] and "tag number 11" in why["1.png"][1]
    assert why["2.png"] == ("ok", "")
    assert rep["captions"]["always"] == ["a figure"] and rep["captions"]["window"] == 24
    assert rep["summary"] == {"ok": 1, "warning": 2, "excluded": 0}
    assert cli_main(["dataset", "check", str(ds), "--resolution", "64", "--trigger", "zorb"]) == 0
    text = capsys.readouterr().out
    assert "'a figure' is in every caption besides the trigger" in text
