"""Generate `sample_datasets/`: three small datasets that teach the tiny model something new.

    python -m trainer.world.datasets --out sample_datasets

- character: `zorb`, a figure (purple body, yellow head, one eye) the base world never shows, in
  different places, sizes and backgrounds;
- style: shapes of the base world drawn `hatched` (diagonal ink stripes) instead of flat;
- concept: a five-pointed `star`, an object the base world lacks.

Seeded and written with fixed PNG settings, so a rerun rewrites the same bytes.
"""
from __future__ import annotations

import argparse
import io
import random
from pathlib import Path

from ..atomic import write_bytes, write_text
from ..resources import SAMPLE_DATASETS
from . import shapes

KINDS = {
    # kind: (trigger, number of images, how one scene is drawn)
    "character": ("zorb", 16, lambda rng: shapes.random_scene(rng, shape="zorb", size=rng.choice(["small", "large"]))),
    "style": ("", 16, lambda rng: shapes.random_scene(rng, hatched=True)),
    "concept": ("star", 16, lambda rng: shapes.random_scene(rng, shape="star")),
}
SEED = 2024


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def scenes(kind: str) -> list[shapes.Scene]:
    trigger, count, draw = KINDS[kind]
    rng = random.Random(f"{SEED}-{kind}")
    return [draw(rng) for _ in range(count)]


def write_dataset(kind: str, folder: Path) -> Path:
    trigger = KINDS[kind][0]
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes(kind)):
        stem = f"{kind}_{i:02d}"
        write_bytes(folder / f"{stem}.png", png_bytes(shapes.render(scene)))
        write_text(folder / f"{stem}.txt", scene.caption() + "\n")
    manifest = f'name = "{kind}"\ntrigger = "{trigger}"\nrepeats = 1\nkind = "{kind}"\n'
    write_text(folder / "dataset.toml", manifest)
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=SAMPLE_DATASETS)
    args = p.parse_args(argv)
    for kind in KINDS:
        print(write_dataset(kind, args.out / kind))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
