"""The training dataset: bucketed, deterministic batches of images (or cached latents) and captions."""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..config import DataConfig
from . import buckets as bk
from .captions import augment, fill_template, with_trigger
from .images import open_rgb
from .scan import MASK_SUFFIX, Scan
from .validate import CheckCache, check_items


@dataclass
class Entry:
    path: Path
    caption: str
    repeats: int
    size: tuple[int, int]  # original (width, height) after EXIF rotation
    bucket: tuple[int, int]
    digest: str
    is_reg: bool = False


class TrainingSet:
    def __init__(self, scan: Scan, cfg: DataConfig, resolution: int, reg_scan: Scan | None = None, progress=None):
        self.cfg = cfg
        self.progress = progress  # (done, total) while the images are checked
        self.resolution = resolution
        self.problems: dict[str, str] = {}
        self.buckets = bk.make_buckets(resolution, cfg.bucket_step, cfg.min_bucket_side, cfg.max_bucket_side)
        self.entries: list[Entry] = []
        self._add(scan, cfg.trigger, lambda item: item.repeats * cfg.repeats, is_reg=False)
        if reg_scan is not None:
            # kohya's rule: regularization images fill as many samples per epoch as the training images.
            per_reg = max(1, round(self.num_samples / max(1, len(reg_scan.items))))
            self._add(reg_scan, "", lambda item: per_reg, is_reg=True)

    def _add(self, scan: Scan, trigger: str, repeats, is_reg: bool) -> None:
        self.problems.update(scan.problems)
        # One bad file must never stop a run: the same checks as `dataset check` exclude it with a reason.
        reports = check_items(scan.items, min_side=min(64, self.resolution), progress=self.progress,
                              known=CheckCache(scan.root))
        for item, rep in zip(scan.items, reports):
            if rep.status == "excluded":
                self.problems[str(item.image)] = "; ".join(rep.reasons)
                continue
            size = (rep.width, rep.height)
            caption = with_trigger(item.caption or fill_template(self.cfg.default_caption, trigger), trigger)
            bucket = bk.choose_bucket(*size, self.buckets, self.cfg.no_upscale, self.cfg.bucket_step)
            self.entries.append(Entry(item.image, caption, repeats(item), size, bucket, rep.sha256, is_reg))

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def num_samples(self) -> int:
        return sum(e.repeats for e in self.entries if not e.is_reg)

    def bucket_table(self) -> dict[str, int]:
        table: dict[str, int] = {}
        for e in self.entries:
            key = f"{e.bucket[0]}x{e.bucket[1]}"
            table[key] = table.get(key, 0) + e.repeats
        return dict(sorted(table.items()))

    def epoch_batches(self, epoch: int, seed: int, batch_size: int) -> list[list[int]]:
        """Shuffled batches for one epoch; every batch comes from one bucket. Same (seed, epoch), same order."""
        rng = random.Random(f"{seed}-{epoch}")
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, e in enumerate(self.entries):
            by_bucket.setdefault(e.bucket, []).extend([i] * e.repeats)
        batches = []
        for bucket in sorted(by_bucket):
            idx = by_bucket[bucket]
            rng.shuffle(idx)
            batches += [idx[k:k + batch_size] for k in range(0, len(idx), batch_size)]
        rng.shuffle(batches)
        return batches

    def crop_position(self, rng: random.Random) -> tuple[float, float]:
        return (rng.random(), rng.random()) if self.cfg.random_crop else (0.5, 0.5)

    def crop_top_left(self, i: int, crop: tuple[float, float]) -> tuple[int, int]:
        """SDXL's crop conditioning (y, x) for image i, computed without opening the image."""
        e = self.entries[i]
        _, box = bk.fit(*e.size, e.bucket, *crop)
        return box[1], box[0]

    def pixels(self, i: int, crop: tuple[float, float], flip: bool):
        """Image i fitted to its bucket as a CHW tensor in [-1, 1], plus its crop top-left (y, x)."""
        e = self.entries[i]
        im = open_rgb(e.path)
        scaled, box = bk.fit(*im.size, e.bucket, *crop)
        im = im.resize(scaled, Image.Resampling.LANCZOS).crop(box)
        if flip:
            im = ImageOps.mirror(im)
        arr = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)
        return arr / 127.5 - 1.0, (box[1], box[0])

    def mask(self, i: int, crop: tuple[float, float], flip: bool, factor: int) -> torch.Tensor:
        """Image i's loss mask at latent size (1, h/factor, w/factor) in [0, 1]; all ones without a mask file."""
        e = self.entries[i]
        bw, bh = e.bucket
        path = e.path.with_name(e.path.stem + MASK_SUFFIX)
        if not path.exists():
            return torch.ones(1, bh // factor, bw // factor)
        with Image.open(path) as m:
            m = ImageOps.exif_transpose(m).convert("L")
            scaled, box = bk.fit(*m.size, e.bucket, *crop)
            m = m.resize(scaled, Image.Resampling.BILINEAR).crop(box)
        if flip:
            m = ImageOps.mirror(m)
        m = m.resize((bw // factor, bh // factor), Image.Resampling.BOX)
        return torch.from_numpy(np.asarray(m, dtype=np.float32).copy())[None] / 255.0

    def caption(self, i: int, rng: random.Random) -> str:
        c = self.cfg
        return augment(self.entries[i].caption, rng, c.shuffle_tags, c.keep_tokens, c.tag_dropout, c.caption_dropout)

    def cache_key(self, i: int, crop: tuple[float, float], vae_id: str) -> str:
        """Content-based: the image's bytes, its bucket and crop, the VAE; 'v2': sampled with a generator seeded by
        this key (latents cached before that came from one generator shared by a run's whole cache)."""
        e = self.entries[i]
        return hashlib.sha256(f"{e.digest}|{e.bucket}|{crop}|{vae_id}|v2".encode()).hexdigest()[:32]
