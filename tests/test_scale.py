"""Datasets of 10,000 images (issue 31): the data path's algorithms give the same answers as the simple ones they
replace, results are remembered until a file changes, every long phase reports progress, and the UI pages,
filters, indexes and cancels. Speed itself is measured by `lora-studio bench data`, not here."""
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from trainer.data import validate
from trainer.data.importer import import_files
from trainer.data.scan import cached_scan, scan
from trainer.training.events import read_events

from .conftest import make_dataset, tiny_config


def test_near_duplicates_by_hash_bands_match_comparing_every_pair():
    rng = random.Random(7)
    hashes = []
    for i in range(400):
        if hashes and i % 3 == 0:  # a near copy of an earlier hash: 0-6 bits flipped
            bits = int(rng.choice(hashes), 16)
            for _ in range(rng.randrange(7)):
                bits ^= 1 << rng.randrange(64)
            hashes.append(f"{bits:016x}")
        else:
            hashes.append(f"{rng.getrandbits(64):016x}")

    def reports():
        return [validate.FileReport(f"/d/img{i:04d}.png", sha256=f"{i}", dhash=h, caption="c")
                for i, h in enumerate(hashes)]

    fast = reports()
    validate._mark_duplicates(fast)
    slow = reports()  # the old rule: the first kept image within the bound, every pair compared
    kept = []
    for rep in sorted(slow, key=lambda r: (not r.caption, r.path)):
        twin = next((k for k in kept if validate.hamming(k.dhash, rep.dhash) <= validate.NEAR_DUPLICATE_BITS), None)
        if twin is not None:
            rep.warn(f"near-duplicate of {Path(twin.path).name}")
        kept.append(rep)
    assert [r.reasons for r in fast] == [r.reasons for r in slow]
    assert sum(bool(r.reasons) for r in fast) > 50  # the case is not trivial


def test_import_names_stay_unique_and_a_threaded_import_equals_a_sequential_one(tmp_path):
    src = tmp_path / "src"
    for i in range(24):  # the same file name in 24 folders, 24 different pictures
        folder = src / f"f{i:02d}"
        folder.mkdir(parents=True)
        Image.new("RGB", (64 + i, 64), (i * 10, 0, 0)).save(folder / "photo.png")
        (folder / "photo.txt").write_text(f"caption {i}")
    seen = []
    one = import_files([src], tmp_path / "one", workers=1)
    many = import_files([src], tmp_path / "many", workers=4, progress=lambda done, total: seen.append((done, total)))
    names = [r["file"] for r in many.imported]
    assert names == [r["file"] for r in one.imported]
    assert len(set(n.lower() for n in names)) == 24 and names[:3] == ["photo.png", "photo-1.png", "photo-2.png"]
    for n in names:
        assert (tmp_path / "one" / n).read_bytes() == (tmp_path / "many" / n).read_bytes()
        assert (tmp_path / "many" / n).with_suffix(".txt").exists()
    assert seen[-1] == (24, 24) and [d for d, _ in seen] == list(range(1, 25))


def test_a_check_decodes_each_file_once_until_it_changes(tmp_path, monkeypatch):
    ds = make_dataset(tmp_path / "ds", n=4)
    calls = []
    real = validate.check_image
    monkeypatch.setattr(validate, "check_image", lambda path, **kw: calls.append(path.name) or real(path, **kw))
    first = validate.report(ds, resolution=64)
    assert len(calls) == 4
    again = validate.report(ds, resolution=64)
    assert len(calls) == 4 and again["files"] == first["files"]  # remembered: nothing decoded again
    time.sleep(0.01)
    Image.new("RGB", (10, 10), "black").save(ds / "img1.png")  # edited: too small now
    third = validate.report(ds, resolution=64)
    assert calls[4:] == ["img1.png"]
    assert next(f for f in third["files"] if f["path"].endswith("img1.png"))["status"] == "excluded"


def test_a_scan_is_remembered_until_the_folder_changes(tmp_path):
    from trainer.data.caption_ops import set_caption

    ds = make_dataset(tmp_path / "ds", n=3)
    a = cached_scan(ds)
    assert cached_scan(ds) is a  # nothing read again
    set_caption(ds / "img0.png", "a new caption")  # an atomic write: a rename in the folder
    b = cached_scan(ds)
    assert b is not a and b.items[0].caption == "a new caption"
    make_dataset(ds / "2_more", n=1, size=(56, 40))
    assert len(cached_scan(ds).items) == 4 == len(scan(ds).items)


def test_progress_events_are_throttled_and_keep_a_heartbeat():
    from trainer.progress import Progress

    now = [0.0]
    sent = []
    p = Progress(sent.append, every_s=1.0, heartbeat_s=3.0, clock=lambda: now[0])
    p.start("caching latents", 1000)
    for i in range(1, 1001):
        now[0] += 0.01  # 10 s in all
        p.update(i)
    p.finish()
    counts = [e["done"] for e in sent]
    assert counts[0] == 0 and counts[-1] == 1000 and sent[-1].get("finished")
    assert 9 <= len(sent) <= 13  # about once a second, not a thousand lines
    beats = []
    q = Progress(beats.append, every_s=1.0, heartbeat_s=0.15)
    q.start("loading")
    time.sleep(0.6)
    q.finish()
    q.close()
    assert len([e for e in beats if e["phase"] == "loading" and not e.get("finished")]) >= 3  # said while silent


def test_every_long_phase_of_a_run_reports_progress(tiny_models, tmp_path):
    from trainer.training.loop import train

    ds = make_dataset(tmp_path / "ds", n=4)
    out = tmp_path / "run"
    train(tiny_config(tiny_models["sd1"], ds, out, **{"train.max_steps": 4, "data.validation_split": 1,
                                                      "sample.prompts": ["a red circle"], "data.cache_ahead": False,
                                                      "lora.train_text_encoder": False,
                                                      "save.state_every_n_steps": 2}))
    progress = [e for e in read_events(out) if e["type"] == "progress"]
    phases = {e["phase"] for e in progress}
    assert {"loading", "scanning", "caching latents", "caching text", "validation", "end samples",
            "saving"} <= phases, phases
    scanning = [e for e in progress if e["phase"] == "scanning"]
    assert scanning[0]["done"] == 0 and scanning[-1]["done"] == scanning[-1]["total"] == 3  # one held out
    assert scanning[-1].get("finished")


def test_the_train_tab_shows_the_phase_and_its_count(tmp_path):
    from app import jobs
    from app.handlers.train import progress_html

    run = tmp_path / "run"
    run.mkdir()
    t = time.time()
    lines = [{"type": "progress", "phase": "scanning", "done": 0, "total": 1000, "time": t},
             {"type": "progress", "phase": "scanning", "done": 1000, "total": 1000, "time": t + 5, "finished": True},
             {"type": "progress", "phase": "caching latents", "done": 0, "total": 1000, "time": t + 5},
             {"type": "progress", "phase": "caching latents", "done": 340, "total": 1000, "time": t + 39}]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    jobs.write_job(run, {"state": "running", "pid": 1})
    v = jobs.view(run, alive=lambda pid, d: True)
    html = progress_html(v)
    assert "caching latents 340 / 1,000 ETA 1:06" in html  # 340 in 34 s: 66 s for the other 660
    with open(run / "events.jsonl", "a") as f:
        f.write(json.dumps({"type": "step", "step": 1, "total": 100, "loss": 0.1, "eta_s": 120, "time": t + 40}) + "\n")
    v = jobs.view(run, alive=lambda pid, d: True)
    assert "1 / 100 steps" in progress_html(v) and "caching latents 340 / 1,000" in progress_html(v)
    assert "ahead of the steps" in progress_html(v)  # cache-ahead: caching goes on beside the steps


def test_the_gallery_pages_and_filters_every_image(tmp_path):
    from app import dataset_ops as ops
    from app.workspace import Workspace

    ws = Workspace(tmp_path / "ws").ensure(with_samples=False)
    folder = ws.datasets / "big"
    folder.mkdir()
    for i in range(130):
        Image.new("RGB", (64, 64), (i, 0, 0)).save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text("zorb, red" if i % 10 == 0 else "zorb, blue")
    make_dataset(folder / "2_extra", n=1, size=(50, 40))
    shown, number, pages, matching = ops.page(ws, "big", 2, 60)
    assert (number, pages, matching) == (2, 3, 131) and len(shown) == 11  # every image reachable
    assert shown[-1][1] == "2_extra/img0.png"  # a kohya subfolder's image, named relative to the dataset
    assert ops.caption(ws, "big", "2_extra/img0.png") == "a red circle"
    assert ops.page(ws, "big", 99, 60)[1] == 2  # past the end: the last page
    by_caption = ops.page(ws, "big", 0, 60, caption_filter="RED")
    assert by_caption[3] == 14 and all("red" in ops.caption(ws, "big", rel) for _, rel in by_caption[0])
    assert ops.page(ws, "big", 0, 60, name_filter="img12")[3] == 10
    assert [rel for _, rel in ops.page(ws, "big", 0, 60, only={"img005.png", "img100.png"})[0]] == \
        ["img005.png", "img100.png"]
    with pytest.raises(Exception, match="not in dataset"):
        ops.image_path(ws, "big", "../../outside.png")


def test_the_library_index_reads_each_header_once_and_hashes_in_the_background(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    import torch

    from app import library
    from app.workspace import Workspace

    ws = Workspace(tmp_path / "ws").ensure(with_samples=False)
    for i in range(5):
        save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4) * i, "lora_unet_x.lora_up.weight": torch.ones(4, 2)},
                  str(ws.loras / f"l{i}.safetensors"), metadata={"ss_network_dim": "2"})
    idx = library.index(ws)
    first = library.entries(ws)
    assert idx.header_reads == 5 and len(first) == 5
    library.entries(ws)
    assert idx.header_reads == 5  # unchanged files: their headers are not read again
    deadline = time.time() + 30
    while idx.pending() and time.time() < deadline:
        time.sleep(0.05)
    ready = library.listed(ws)
    assert all(e.hashes.get("autov2") for e in library.entries(ws))  # landed, once
    monkeypatch.setattr(Path, "stat", lambda *a, **k: pytest.fail("a search touched a file"))
    found = library.search(library.listed(ws), "l3")
    assert [e.name for e in found] == ["l3"] and ready
    monkeypatch.undo()
    assert json.loads((ws.root / library.Index.FILE).read_text())  # kept for the next start


def test_a_long_action_is_replaced_by_a_newer_one_and_ends_with_its_page(tmp_path):
    from app import jobs
    from app.context import Ctx
    from app.workspace import Workspace

    ws = Workspace(tmp_path / "ws").ensure(with_samples=False)
    ctx = Ctx(ws, jobs.JobRunner(ws.runs))
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    a, b, c = (subprocess.Popen(sleep) for _ in range(3))
    ctx.track("page1", "check", a)
    ctx.track("page1", "check", b)  # a second Check from the same page
    assert a.wait(timeout=10) is not None and b.poll() is None
    ctx.track("page2", "check", c)
    assert ctx.page_closed("page1") == 1 and b.wait(timeout=10) is not None
    assert c.poll() is None  # another page's check goes on
    ctx.untrack("page2", "check", c)
    assert c.wait(timeout=10) is not None


def test_the_cli_prints_progress_while_importing_and_checking(tmp_path):
    src = make_dataset(tmp_path / "src", n=4)
    out = subprocess.run([sys.executable, "-m", "trainer", "dataset", "import", str(src), "--to", str(tmp_path / "d"),
                          "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "lora-studio: importing: 4 / 4 (done)" in out.stderr
    assert json.loads(out.stdout)["imported"]  # stdout stays one JSON object
    out = subprocess.run([sys.executable, "-m", "trainer", "dataset", "check", str(tmp_path / "d"), "--json",
                          "--resolution", "64"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "lora-studio: checking: 4 / 4 (done)" in out.stderr
