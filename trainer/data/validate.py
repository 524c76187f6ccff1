"""Per-file dataset validation, torch-free: every file is either used or reported with a reason.

`check_image` looks at one file; `report` checks a whole dataset, adds duplicate and near-duplicate
detection and the bucket table, and returns a structure the UI renders and the CLI prints.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from . import buckets as bk
from .scan import scan

MAX_PIXELS = 100_000_000  # ~10k x 10k: above this Pillow's bomb guard is an error, not a warning
MIN_SIDE = 64
MAX_ASPECT = 4.0
UPSCALE_WARNING = 1.5  # an image blown up this much into its bucket trains blurry detail
NEAR_DUPLICATE_BITS = 4  # dHash bits that may differ for two images to count as near-duplicates


@dataclass
class FileReport:
    path: str
    status: str = "ok"  # ok | warning | excluded
    reasons: list[str] = field(default_factory=list)
    width: int = 0
    height: int = 0
    caption: str = ""
    bucket: str = ""
    sha256: str = ""
    dhash: str = ""

    def exclude(self, reason: str) -> None:
        self.status = "excluded"
        self.reasons.append(reason)

    def warn(self, reason: str) -> None:
        if self.status == "ok":
            self.status = "warning"
        self.reasons.append(reason)


def check_image(path: Path, min_side: int = MIN_SIDE, max_aspect: float = MAX_ASPECT) -> FileReport:
    """Open, decode and measure one image. Never raises: problems become reasons."""
    rep = FileReport(str(path))
    try:
        data = path.read_bytes()
    except OSError as e:
        rep.exclude(f"unreadable file ({e.strerror or e})")
        return rep
    if not data:
        rep.exclude("zero-byte file")
        return rep
    rep.sha256 = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # the bytes already read for the hash
                w, h = im.size
                if w * h > MAX_PIXELS:
                    rep.exclude(f"decompression bomb: declares {w}x{h} pixels (limit {MAX_PIXELS:,})")
                    return rep
                im.seek(0)
                im = ImageOps.exif_transpose(im)
                im.load()  # decode fully: truncated and corrupt files fail here, not mid-training
                rep.width, rep.height = im.size
                rep.dhash = dhash(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        rep.exclude(f"decompression bomb: {e}")
        return rep
    except UnidentifiedImageError:
        rep.exclude("not an image (the content is not a format Pillow reads)")
        return rep
    except (OSError, SyntaxError, ValueError) as e:
        rep.exclude(f"corrupt or truncated image ({e})")
        return rep
    short, long = sorted((rep.width, rep.height))
    if short < min_side:
        rep.exclude(f"too small: {rep.width}x{rep.height}, the short side must be at least {min_side} px")
    elif long / short > max_aspect:
        rep.exclude(f"extreme aspect ratio {long / short:.1f}:1 (limit {max_aspect:g}:1)")
    return rep


def check_items(items, min_side: int = MIN_SIDE, progress=None, workers: int | None = None,
                known: "CheckCache | None" = None) -> list[FileReport]:
    """Check scanned items (in order), caption problems and exact/near duplicates included. Images are decoded on
    `workers` threads (Pillow decodes without the interpreter lock); a file checked before with the same size and
    modification time takes its result from `known` instead of a second decode. `progress(done, total)`."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    items = list(items)
    known = known if known is not None else CheckCache(None)
    workers = workers or max(1, min(4, os.cpu_count() or 1))

    def one(item):
        rep = known.get(item.image, min_side)
        if rep is None:
            rep = check_image(item.image, min_side=min_side)
            known.put(item.image, min_side, rep)
        rep.caption = item.caption
        if item.caption_problem:
            rep.warn(item.caption_problem)
        return rep

    reports = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for rep in pool.map(one, items, chunksize=16):  # map keeps the items' order
            reports.append(rep)
            if progress and (len(reports) % 25 == 0 or len(reports) == len(items)):
                progress(len(reports), len(items))
    known.save()
    _mark_duplicates(reports)
    return reports


class CheckCache:
    """What `check_image` found per file, keyed by path, size and modification time (nanoseconds), kept in the cache
    folder per dataset: a second run or check over an unchanged dataset decodes nothing. None: a cache of nothing."""

    FIELDS = ("status", "reasons", "width", "height", "sha256", "dhash")

    def __init__(self, folder: Path | None):
        import json
        import threading

        self.path = None
        self.entries: dict = {}
        self.changed = False
        self.lock = threading.Lock()
        if folder is not None:
            from ..resources import default_cache_dir

            key = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:24]
            self.path = default_cache_dir() / "checks" / f"{key}.json"
            try:
                self.entries = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self.entries = {}

    @staticmethod
    def _stamp(path: Path, min_side: int) -> list | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return [st.st_size, st.st_mtime_ns, min_side]

    def get(self, path: Path, min_side: int) -> FileReport | None:
        if self.path is None:
            return None
        with self.lock:
            found = self.entries.get(str(path))
        if found is None or found[:3] != self._stamp(path, min_side):
            return None
        rep = FileReport(str(path), **dict(zip(self.FIELDS, found[3:])))
        rep.reasons = list(rep.reasons)
        return rep

    def put(self, path: Path, min_side: int, rep: FileReport) -> None:
        stamp = self._stamp(path, min_side) if self.path else None
        if stamp and not any("unreadable" in r for r in rep.reasons):
            with self.lock:  # one entry per file: an edited file replaces its old result
                self.entries[str(path)] = stamp + [list(rep.reasons) if f == "reasons" else getattr(rep, f)
                                                   for f in self.FIELDS]
                self.changed = True

    def save(self) -> None:
        if not (self.path and self.changed):
            return
        import json

        from ..atomic import write_text

        try:
            write_text(self.path, json.dumps(self.entries))
            self.changed = False
        except OSError:
            pass  # a read-only cache: check again next time


def dhash(im: Image.Image, size: int = 8) -> str:
    """Difference hash: 64 bits of left-right brightness gradients on a 9x8 thumbnail."""
    import numpy as np

    g = np.asarray(im.convert("L").resize((size + 1, size), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = 0
    for b in (g[:, :-1] > g[:, 1:]).flatten():
        bits = (bits << 1) | int(b)
    return f"{bits:016x}"


def hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def report(root: str | Path, resolution: int = 512, caption_extension: str = ".txt", min_side: int = MIN_SIDE,
           bucket_step: int = 64, progress=None) -> dict:
    """The whole dataset's report: per-file status and reasons, a summary and the bucket table."""
    found = scan(root, caption_extension)
    files: list[FileReport] = []
    for path, reason in found.problems.items():
        rep = FileReport(path)
        rep.exclude(reason)
        files.append(rep)
    files += check_items(found.items, min_side=min(min_side, resolution), progress=progress,
                         known=CheckCache(Path(root)))
    table = bk.make_buckets(resolution, bucket_step, 256, 2048)
    buckets: dict[str, int] = {}
    for rep in files:
        if rep.status != "excluded":
            b = bk.choose_bucket(rep.width, rep.height, table, step=bucket_step)
            rep.bucket = f"{b[0]}x{b[1]}"
            buckets[rep.bucket] = buckets.get(rep.bucket, 0) + 1
            scale = max(b[0] / rep.width, b[1] / rep.height)
            if scale >= UPSCALE_WARNING:
                rep.warn(f"upscaled {scale:.1f}x into its {rep.bucket} bucket at {resolution} px, so it trains soft; "
                         "use a larger image, a lower resolution, or data.no_upscale")
    files.sort(key=lambda r: r.path)
    summary = {s: sum(r.status == s for r in files) for s in ("ok", "warning", "excluded")}
    return {"root": str(root), "summary": summary, "buckets": dict(sorted(buckets.items())),
            "files": [asdict(r) for r in files]}


BANDS = NEAR_DUPLICATE_BITS + 1  # of a 64-bit hash: two hashes this close agree exactly on at least one band


def _bands(h: str) -> list[tuple[int, int]]:
    """(band number, its bits) for the dHash `h`, cut into BANDS parts of 12-13 bits."""
    bits, out, start = int(h, 16), [], 0
    for b in range(BANDS):
        width = 64 // BANDS + (1 if b < 64 % BANDS else 0)
        out.append((b, (bits >> start) & ((1 << width) - 1)))
        start += width
    return out


def _mark_duplicates(files: list[FileReport]) -> None:
    """Of identical images the one with a caption is used (a caption is the user's work; a bare copy adds
    nothing), then the first by name. A near-duplicate is named after the first kept image within
    NEAR_DUPLICATE_BITS of its dHash; candidates come from an index of hash bands (by the pigeonhole principle two
    such hashes share a band), so the search is near-linear instead of comparing every pair."""
    seen_sha: dict[str, str] = {}
    kept: list[FileReport] = []
    by_band: dict[tuple[int, int], list[int]] = {}  # band -> positions in `kept`
    for rep in sorted(files, key=lambda r: (not r.caption, r.path)):
        if rep.status == "excluded" or not rep.sha256:
            continue
        if rep.sha256 in seen_sha:
            why = " (that copy has a caption)" if not rep.caption else ""
            rep.exclude(f"exact duplicate of {Path(seen_sha[rep.sha256]).name}{why}")
            continue
        seen_sha[rep.sha256] = rep.path
        bands = _bands(rep.dhash) if rep.dhash else []
        candidates = sorted({i for band in bands for i in by_band.get(band, ())})
        twin = next((kept[i] for i in candidates if hamming(kept[i].dhash, rep.dhash) <= NEAR_DUPLICATE_BITS), None)
        if twin is not None:
            rep.warn(f"near-duplicate of {Path(twin.path).name}")
        for band in bands:
            by_band.setdefault(band, []).append(len(kept))
        kept.append(rep)


def excluded_paths(rep: dict) -> dict[str, str]:
    return {f["path"]: "; ".join(f["reasons"]) for f in rep["files"] if f["status"] == "excluded"}
