"""Dataset throughput: scan + validate N generated images, then latent-cache them with a tiny VAE twice.

Prints images/s for each phase and the second run's cache hit rate; the last line is one JSON object.
"""
from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw


def generate(folder: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    for i in range(n):
        w, h = rng.choice([(96, 96), (128, 96), (96, 128), (160, 96)])
        im = Image.new("RGB", (w, h), rng.choice(colours))
        d = ImageDraw.Draw(im)
        for _ in range(3):
            x, y = rng.randrange(w - 20), rng.randrange(h - 20)
            d.ellipse((x, y, x + rng.randrange(10, 40), y + rng.randrange(10, 40)), fill=rng.choice(colours))
        im.save(folder / f"img{i:05d}.png")
        (folder / f"img{i:05d}.txt").write_text(f"shapes, {rng.choice(colours)}", encoding="utf-8")


def run(n: int = 1000, resolution: int = 64) -> dict:
    import torch

    from ..config import DataConfig
    from ..data.cache import LatentCache, fill_latent_cache, vae_identity
    from ..data.dataset import TrainingSet
    from ..data.scan import scan
    from ..data.validate import report
    from ..tiny import vae

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        generate(root / "ds", n)
        gen_s = time.perf_counter() - t

        t = time.perf_counter()
        rep = report(root / "ds", resolution=resolution)
        validate_s = time.perf_counter() - t

        model = vae().eval()
        vae_id = vae_identity(model)
        cfg = DataConfig(bucket_step=8, min_bucket_side=32)
        runs = []
        for _ in range(2):
            t = time.perf_counter()
            data = TrainingSet(scan(root / "ds"), cfg, resolution)
            cache = LatentCache(root / "cache")
            cached, encoded = fill_latent_cache(data, cache, model, vae_id, progress=False)
            runs.append({"seconds": time.perf_counter() - t, "cached": cached, "encoded": encoded})
    usable = rep["summary"]["ok"] + rep["summary"]["warning"]
    result = {
        "images": n, "usable": usable, "generate_s": round(gen_s, 2),
        "validate_images_per_s": round(n / validate_s, 1),
        "first_cache_images_per_s": round(n / runs[0]["seconds"], 1),
        "first_cache_encoded": runs[0]["encoded"],
        "second_cache_images_per_s": round(n / runs[1]["seconds"], 1),
        "second_cache_hit_rate": round(runs[1]["cached"] / max(1, usable), 4),
        "second_cache_encoded": runs[1]["encoded"],
    }
    return result


def main(n: int = 1000) -> dict:
    result = run(n)
    print(f"scan+validate: {result['validate_images_per_s']} images/s over {result['images']} images")
    print(f"latent cache, first run:  {result['first_cache_images_per_s']} images/s, "
          f"{result['first_cache_encoded']} encoded")
    print(f"latent cache, second run: {result['second_cache_images_per_s']} images/s, "
          f"hit rate {result['second_cache_hit_rate']:.0%}, {result['second_cache_encoded']} encoded")
    print(json.dumps(result))
    return result
