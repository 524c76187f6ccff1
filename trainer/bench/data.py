"""`lora-studio bench data`: the data path at 100, 1,000 and 10,000 images.

Generates datasets of photos-like images (512-1024 px, mostly JPEG, some PNG, tag captions, a few exact and near
duplicates), then times, for each size: import into a new dataset, a cold check (every image decoded, duplicates and
near-duplicates found), a scan, and the Datasets tab's first page (a cold scan of the folder and one page of names);
and for 1,000 images the time from `lora-studio train` to its first step on the embedded model. Per operation it
prints the cost of 10x the data (targets: <= 13x) and the growth exponent (1 = linear); the targets of issue 31 are
checked and said. The table goes into bench/results.md (its "Data path" section) and the last line is one JSON
object.
"""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

SIZES = [(512, 512), (768, 512), (512, 768), (1024, 1024), (1024, 768), (640, 896), (896, 640)]
TAGS = ["1girl", "solo", "smile", "outdoors", "sky", "tree", "red dress", "blue eyes", "short hair", "long hair",
        "standing", "sitting", "looking at viewer", "flower", "city", "night", "water", "cat", "hat", "glasses"]
PER_PAGE = 60
TARGETS = {"growth_10x": 13.0, "import_10k_s": 300.0, "check_10k_s": 180.0, "first_step_1k_s": 60.0,
           "first_page_10k_s": 2.0}


def generate(folder: Path, n: int, seed: int = 0) -> None:
    """`n` images with captions: random shapes over a gradient, 85% JPEG, 15% PNG (at most 768 px); every 50th is
    an exact copy of an earlier one and every 50th (offset) a near copy (shifted by a pixel), as real sets have."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    for i in range(n):
        name = f"img{i:05d}"
        if i % 50 == 25 and made:  # an exact duplicate under another name
            src = rng.choice(made)
            target = folder / f"{name}{src.suffix}"
            target.write_bytes(src.read_bytes())
        else:
            png = rng.random() < 0.15
            w, h = rng.choice([s for s in SIZES if not png or max(s) <= 768])
            im = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
            d = ImageDraw.Draw(im)
            for _ in range(6):
                x, y = rng.randrange(w - 40), rng.randrange(h - 40)
                d.ellipse((x, y, x + rng.randrange(30, w // 2), y + rng.randrange(30, h // 2)),
                          fill=tuple(rng.randrange(256) for _ in range(3)))
            if i % 50 == 40 and made:  # a near duplicate: an earlier image moved by one pixel
                with Image.open(rng.choice(made)) as src:
                    im = src.convert("RGB").transform(src.size, Image.Transform.AFFINE, (1, 0, 1, 0, 1, 0))
            target = folder / f"{name}{'.png' if png else '.jpg'}"
            im.save(target, quality=90) if not png else im.save(target)
        (folder / f"{name}.txt").write_text(", ".join(rng.sample(TAGS, rng.randrange(4, 9))), encoding="utf-8")
        made.append(target)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def first_step_s(dataset: Path, out: Path, env: dict) -> float | None:
    """Seconds from starting `lora-studio train` (the embedded model, the character preset) to its first step."""
    from trainer.training.events import read_events

    cmd = [sys.executable, "-m", "trainer", "train", "--dataset", str(dataset), "--preset", "character",
           "--output", str(out), "--set", "train.max_steps=3", "--set", "sample.at_end=false"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    first = None
    while proc.poll() is None and first is None:
        if any(e.get("type") == "step" for e in read_events(out)):
            first = time.monotonic() - start
        time.sleep(0.1)
    err = proc.communicate()[1]
    if first is None and any(e.get("type") == "step" for e in read_events(out)):
        first = time.monotonic() - start
    if proc.returncode != 0:
        print(f"first step run failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    return first


def measure(n: int, root: Path, env: dict) -> dict:
    from ..data.importer import import_files
    from ..data.scan import cached_scan, scan
    from ..data.validate import report

    src, dst = root / f"src-{n}", root / f"dataset-{n}"
    gen_s, _ = _timed(lambda: generate(src, n))
    print(f"{n:>6} images generated in {gen_s:.0f} s", flush=True)
    import_s, res = _timed(lambda: import_files([src], dst))
    check_s, rep = _timed(lambda: report(dst, resolution=512))
    scan_s, found = _timed(lambda: scan(dst))
    page_s, _ = _timed(lambda: cached_scan(dst).items[:PER_PAGE])  # the tab's first pick of the folder, cold
    row = {"images": n, "imported": len(res.imported), "skipped": len(res.skipped), "import_s": round(import_s, 2),
           "check_s": round(check_s, 2), "scan_s": round(scan_s, 3), "first_page_s": round(page_s, 3),
           "excluded": rep["summary"]["excluded"], "warnings": rep["summary"]["warning"]}
    if n == 1000:  # cold too: a cache of its own, so the run checks and encodes every image itself
        cold = {**env, "LORA_STUDIO_CACHE": str(root / "cache-first-step")}
        row["first_step_s"] = round(first_step_s(dst, root / "run-1000", cold) or float("nan"), 1)
    print(f"{n:>6} images: import {import_s:.1f} s ({len(res.imported)} in, {len(res.skipped)} skipped), check "
          f"{check_s:.1f} s ({rep['summary']['excluded']} excluded, {rep['summary']['warning']} warned), scan "
          f"{scan_s:.2f} s, first page {page_s:.2f} s" + (f", first step {row['first_step_s']} s"
                                                           if "first_step_s" in row else ""), flush=True)
    return row


def growth(rows: list[dict], key: str) -> dict | None:
    """The cost of 10x the data between the two largest sets, and the exponent it implies (1: linear)."""
    have = [r for r in rows if r.get(key)]
    if len(have) < 2:
        return None
    a, b = have[-2], have[-1]
    ratio = b[key] / a[key]
    return {"from": a["images"], "to": b["images"], "ratio": round(ratio, 2),
            "exponent": round(math.log(ratio) / math.log(b["images"] / a["images"]), 2)}


def run(sizes=(100, 1000, 10000), work: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="lora-studio-bench-data-", dir=work) as tmp:
        root = Path(tmp)
        env = {**os.environ, "LORA_STUDIO_CACHE": str(root / "cache")}  # cold: nothing checked or cached before
        before = os.environ.get("LORA_STUDIO_CACHE")
        os.environ["LORA_STUDIO_CACHE"] = env["LORA_STUDIO_CACHE"]
        try:
            rows = [measure(n, root, env) for n in sorted(sizes)]
        finally:
            if before is None:
                os.environ.pop("LORA_STUDIO_CACHE", None)
            else:
                os.environ["LORA_STUDIO_CACHE"] = before
    ops = {k: growth(rows, k) for k in ("import_s", "check_s", "scan_s", "first_page_s")}
    big = next((r for r in rows if r["images"] == 10000), None)
    one_k = next((r for r in rows if r["images"] == 1000), None)
    targets = {
        **{f"{k}_10x_within_13x": (g["ratio"] <= TARGETS["growth_10x"]) if g else None for k, g in ops.items()},
        "import_10k_within_5_min": big["import_s"] <= TARGETS["import_10k_s"] if big else None,
        "check_10k_within_3_min": big["check_s"] <= TARGETS["check_10k_s"] if big else None,
        "first_page_10k_within_2_s": big["first_page_s"] <= TARGETS["first_page_10k_s"] if big else None,
        "first_step_1k_within_1_min": (one_k.get("first_step_s", math.inf) <= TARGETS["first_step_1k_s"]
                                       if one_k else None),
    }
    return {"rows": rows, "growth": ops, "targets": targets, "cpu_cores": os.cpu_count()}


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = ["## Data path", "", f"Generated by `lora-studio bench data` on {os.cpu_count()} CPU cores "
             f"({time.strftime('%Y-%m-%d')}): datasets of generated 512-1024 px images (85% JPEG, 15% PNG, tag "
             "captions, 2% exact and 2% near duplicates), imported into a new dataset, checked cold (every image "
             "decoded), scanned, and the Datasets tab's first page (a cold scan and one page); the first step of "
             "`lora-studio train` on the embedded model with 1,000 images, from the command. Do not edit: re-run it.",
             "", "| images | import s | check s | scan s | first page s | first step s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['images']:,} | {r['import_s']} | {r['check_s']} | {r['scan_s']} | {r['first_page_s']} | "
                     f"{r.get('first_step_s', '')} |")
    lines += ["", "| operation | 10x the data costs | growth exponent |", "|---|---|---|"]
    for k, g in result["growth"].items():
        if g:
            lines.append(f"| {k.removesuffix('_s').replace('_', ' ')} ({g['from']:,} -> {g['to']:,}) | {g['ratio']}x | "
                         f"{g['exponent']} |")
    lines += ["", "Targets (issue 31): " + ", ".join(f"{k} {'yes' if v else 'no' if v is not None else 'not run'}"
                                                     for k, v in result["targets"].items()), ""]
    return "\n".join(lines)


def write_section(text: str, path: Path = Path("bench/results.md")) -> None:
    """Put the "Data path" section into the results file, replacing an older one (the other sections stay)."""
    from trainer.bench.sections import replace_section

    replace_section(path, "Data path", text)


def main(sizes=(100, 1000, 10000), results_md: Path | None = Path("bench/results.md")) -> dict:
    result = run(sizes)
    text = markdown(result)
    print(text)
    if results_md is not None:
        write_section(text, results_md)
        print(f"wrote the Data path section of {results_md}")
    print(json.dumps(result))
    return result
