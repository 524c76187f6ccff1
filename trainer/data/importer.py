"""Import user files (single files, folders, zip archives) into a managed dataset folder.

Originals are only read. Names are sanitised and never overwrite; exact duplicates (by content hash)
are skipped; images are turned upright RGB, with alpha composited on a background and kept as a
`<name>.mask.png` loss mask. Zip archives are bounded in members, size and compression ratio.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import unicodedata
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from PIL import Image, ImageOps, UnidentifiedImageError

from ..atomic import write_bytes, write_text
from .scan import IMAGE_SUFFIXES, MASK_SUFFIX, DatasetError, decode_caption
from .validate import MAX_PIXELS

INDEX = ".import_index.json"  # source-content hashes already imported: duplicates are skipped
MAX_NAME = 80
RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


@dataclass
class Limits:
    max_files: int = 50_000  # datasets for style LoRAs and fine-tunes run to tens of thousands
    max_file_bytes: int = 200 * 2**20
    max_total_bytes: int = 64 * 2**30
    max_zip_ratio: float = 100.0  # uncompressed / compressed, per member


@dataclass
class ImportResult:
    imported: list[dict] = field(default_factory=list)  # {"source", "file"}
    skipped: list[dict] = field(default_factory=list)   # {"source", "reason"}


class ImportProblem(ValueError):
    pass


def sanitize_name(name: str) -> str:
    """A safe file stem from any user-given name: no folders, no traversal, no odd characters."""
    name = name.split(":")[-1] if ".zip:" in name else name  # "archive.zip:member" labels
    base = PureWindowsPath(PurePosixPath(name.replace("\x00", "")).name).name.rstrip(". ")  # 'a.png.', 'a.png '
    stem = Path(base).stem if Path(base).suffix.lower() in IMAGE_SUFFIXES | {".txt"} else base
    stem = unicodedata.normalize("NFC", stem)
    stem = "".join(c if (c.isalnum() or c in "-_") else "_" for c in stem)
    stem = re.sub(r"_+", "_", stem).strip("._-")[:MAX_NAME] or "image"
    return f"{stem}_" if stem.lower() in RESERVED else stem


KEEP_AS_IS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}


def normalise(data: bytes, background=(255, 255, 255)) -> tuple[Image.Image, Image.Image | None, str | None]:
    """Decode to upright RGB. Returns (image, alpha mask or None, suffix to keep the original bytes
    under, or None when the pixels had to change and the image is re-encoded as PNG)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.size[0] * im.size[1] > MAX_PIXELS:
                raise ImportProblem(f"decompression bomb: declares {im.size[0]}x{im.size[1]} pixels")
            fmt = im.format
            im.seek(0)
            im.load()
    except ImportProblem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImportProblem(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise ImportProblem("not an image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImportProblem(f"corrupt or truncated image ({e})") from None
    changed = fmt not in KEEP_AS_IS or getattr(im, "n_frames", 1) > 1 or im.getexif().get(0x0112, 1) != 1
    im, mask = ImageOps.exif_transpose(im), None
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        mask = rgba.getchannel("A")
        if mask.getextrema() == (255, 255):
            mask = None  # fully opaque: no mask worth keeping
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        im, changed = canvas, True
    elif im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        arr = (arr - arr.min()) / max(1e-9, arr.max() - arr.min()) * 255.0
        im, changed = Image.fromarray(arr.astype(np.uint8)).convert("RGB"), True
    elif im.mode != "RGB":
        im, changed = im.convert("RGB"), True  # CMYK, palette, grayscale
    return im, mask, None if changed else KEEP_AS_IS[fmt]


def import_files(sources: list[str | Path], dataset: str | Path, background=(255, 255, 255),
                 limits: Limits | None = None, progress=None, workers: int | None = None) -> ImportResult:
    """Import every image among `sources` (files, folders, zips). Linear in the number of files: names are checked
    against sets kept current, not a listing per file; images are decoded on `workers` threads (Pillow decodes
    without the interpreter lock) while this thread names and writes them in order, so the result is the same as a
    one-by-one import. `progress(done, total)` is called as files are handled."""
    import os
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    limits = limits or Limits()
    dataset = Path(dataset)
    if dataset.exists() and not dataset.is_dir():
        raise DatasetError(f"{dataset} is a file, not a dataset folder; pick another --to")
    dataset.mkdir(parents=True, exist_ok=True)
    index = _read_index(dataset)
    taken = {p.name.lower() for p in dataset.iterdir()}  # listed once, kept current below
    stems = {Path(n).stem for n in taken if Path(n).suffix in IMAGE_SUFFIXES}
    held = sum(1 for n in taken if Path(n).suffix in IMAGE_SUFFIXES and not n.endswith(MASK_SUFFIX))
    result = ImportResult()
    total_files = _count(sources)
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    total, done = 0, 0

    def prepare(candidate):
        source, data, caption = candidate
        digest = hashlib.sha256(data).hexdigest()
        try:
            return source, data, caption, digest, normalise(data, background)
        except ImportProblem as e:
            return source, data, caption, digest, e

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        candidates = _candidates(sources, limits, result)

        def fill():  # a bounded window ahead: memory stays flat however many files there are
            while len(pending) < 2 * workers:
                nxt = next(candidates, None)
                if nxt is None:
                    return
                pending.append(pool.submit(prepare, nxt))

        fill()
        while pending:
            source, data, caption, digest, prepared = pending.popleft().result()
            fill()
            done += 1
            if progress:
                progress(done, total_files)
            if held + len(result.imported) >= limits.max_files:  # a dataset's limit: two imports do not pass it
                result.skipped.append({"source": source, "reason": f"over the {limits.max_files:,}-image limit of a "
                                       f"dataset (it held {held:,} before this import)"})
                continue
            if digest in index:
                reason = f"exact duplicate of {index[digest]}"
                if caption and _adopt_caption(dataset, index[digest], caption):
                    reason += f" (its caption was given to {index[digest]}, which had none)"
                result.skipped.append({"source": source, "reason": reason})
                continue
            total += len(data)
            if total > limits.max_total_bytes:
                result.skipped.append({"source": source, "reason": "over the total import size limit"})
                continue
            if isinstance(prepared, ImportProblem):
                result.skipped.append({"source": source, "reason": str(prepared)})
                continue
            im, mask, keep_suffix = prepared
            suffix = keep_suffix or ".png"
            stem = _free_stem(taken, stems, sanitize_name(source), suffix)
            target = dataset / f"{stem}{suffix}"
            taken.update({f"{stem}{suffix}".lower(), f"{stem}.txt".lower(), f"{stem}{MASK_SUFFIX}".lower()})
            stems.add(stem.lower())
            write_bytes(target, data if keep_suffix else _png(im))
            if mask is not None:
                write_bytes(dataset / f"{stem}{MASK_SUFFIX}", _png(mask))
            if caption is not None:
                write_text(dataset / f"{stem}.txt", caption)
            index[digest] = target.name
            result.imported.append({"source": source, "file": target.name})
    write_text(dataset / INDEX, json.dumps(index, indent=1, sort_keys=True))
    return result


def _count(sources) -> int:
    """How many files an import will handle, for its progress: images in files and folders, members of zips."""
    n = 0
    for src in map(Path, sources):
        if src.is_dir():
            for p in src.rglob("*"):
                if p.suffix.lower() == ".zip" and p.is_file():
                    n += _zip_images(p)
                elif p.suffix.lower() in IMAGE_SUFFIXES and not p.name.endswith(MASK_SUFFIX):
                    n += 1
        elif src.suffix.lower() == ".zip" and src.is_file():
            n += _zip_images(src)
        elif src.suffix.lower() in IMAGE_SUFFIXES:
            n += 1
    return n


def _zip_images(path: Path) -> int:
    try:
        with zipfile.ZipFile(path) as zf:
            return sum(member_suffix(m.filename) in IMAGE_SUFFIXES | {""} for m in zf.infolist() if not m.is_dir())
    except (zipfile.BadZipFile, OSError):
        return 0


def _adopt_caption(dataset: Path, image_name: str, caption: str) -> bool:
    """Give a duplicate's caption to the kept copy when that has no caption file: the caption is the
    user's work, and keeping the bare copy must not lose it. An existing caption is never replaced."""
    target = (dataset / image_name).with_suffix(".txt")
    if not (dataset / image_name).exists() or target.exists():
        return False
    write_text(target, caption)
    return True


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _free_stem(taken: set[str], stems: set[str], stem: str, suffix: str) -> str:
    """A stem that clashes with no existing image of any type (captions pair with images by stem); `stems` holds the
    images' stems, lower-cased, kept current by the caller (rebuilding it per file made an import quadratic)."""
    candidate, n = stem, 1
    while candidate.lower() in stems or f"{candidate}{suffix}".lower() in taken:
        candidate, n = f"{stem}-{n}", n + 1
    return candidate


def _read_index(dataset: Path) -> dict:
    try:
        return json.loads((dataset / INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
        for p in dataset.iterdir():
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.endswith(MASK_SUFFIX):
                index[hashlib.sha256(p.read_bytes()).hexdigest()] = p.name
        return index


def _caption_text(raw: bytes) -> str:
    return decode_caption(raw)[0]


def _candidates(sources, limits: Limits, result: ImportResult):
    """Yield (source name, bytes, caption text or None) for every image among files, folders and zips."""
    for src in map(Path, sources):
        if not src.exists():
            result.skipped.append({"source": str(src), "reason": "does not exist"})
        elif src.is_dir():
            for p in sorted(src.rglob("*")):
                if not p.is_file() or p.suffix.lower() == ".txt" or p.name.endswith(MASK_SUFFIX):
                    continue  # captions and masks come with their images
                if p.suffix.lower() == ".zip":
                    yield from _from_zip(p, limits, result)
                elif p.suffix.lower() in IMAGE_SUFFIXES:
                    yield from _from_file(p, limits, result)
                elif not p.name.startswith(".") and p.name != "dataset.toml":  # .DS_Store and the like are noise
                    result.skipped.append({"source": str(p), "reason": f"not an image or zip ({p.suffix or 'no extension'})"})
        elif src.suffix.lower() == ".zip":
            yield from _from_zip(src, limits, result)
        elif src.suffix.lower() in IMAGE_SUFFIXES:
            yield from _from_file(src, limits, result)
        elif src.suffix.lower() != ".txt":
            result.skipped.append({"source": str(src), "reason": f"not an image or zip ({src.suffix or 'no extension'})"})


def _from_file(p: Path, limits: Limits, result: ImportResult):
    size = p.stat().st_size
    if size == 0:
        result.skipped.append({"source": str(p), "reason": "zero-byte file"})
        return
    if size > limits.max_file_bytes:
        result.skipped.append({"source": str(p), "reason": f"larger than {limits.max_file_bytes // 2**20} MB"})
        return
    cap = p.with_suffix(".txt")
    yield str(p), p.read_bytes(), _caption_text(cap.read_bytes()) if cap.exists() else None


# A bad CRC or a cut-off member (BadZipFile, EOFError, zlib.error), an encrypted one (RuntimeError), an
# unsupported compression method (NotImplementedError).
ZIP_MEMBER_ERRORS = (zipfile.BadZipFile, EOFError, zlib.error, RuntimeError, NotImplementedError, OSError)


def _zip_reason(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "password" in text or "encrypted" in text:
        return "encrypted"
    return "bad CRC: the archive is damaged" if "CRC" in text else text


def _from_zip(src: Path, limits: Limits, result: ImportResult):
    try:
        zf = zipfile.ZipFile(src)
    except (zipfile.BadZipFile, OSError) as e:
        result.skipped.append({"source": str(src), "reason": f"not a readable zip ({e})"})
        return
    with zf:
        yield from _zip_members(zf, src.name, str(src), limits, result, depth=0)


def member_suffix(name: str) -> str:
    """A name's suffix as Windows and most tools read it: trailing dots and spaces do not count ('a.png.', 'a.png ')."""
    return Path(PurePosixPath(name).name.rstrip(". ")).suffix.lower()


# The first bytes of each image format LoRA Studio imports: a member named without its extension ('CON') is still one.
MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def looks_like_image(head: bytes) -> bool:
    return head.startswith(MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _zip_members(zf, label_prefix: str, source: str, limits: Limits, result: ImportResult, depth: int):
    """Every member is imported, renamed or reported: images (by extension, or by their first bytes when the name
    lacks one), a zip inside the zip (one level: deeper ones are reported), captions with their images; a caption
    without an image, macOS's metadata and anything else get a line in the report."""
    members = [m for m in zf.infolist() if not m.is_dir()]
    if len(members) > 2 * limits.max_files:
        result.skipped.append({"source": source, "reason": f"zip has {len(members)} members (limit "
                                                           f"{2 * limits.max_files})"})
        return
    if sum(m.file_size for m in members) > limits.max_total_bytes:
        result.skipped.append({"source": source, "reason": "zip would unpack past the total size limit"})
        return
    names = {m.filename.lower(): m for m in members}
    images = {_stem_key(m.filename) for m in members if member_suffix(m.filename) in IMAGE_SUFFIXES}
    for m in members:
        label = f"{label_prefix}:{m.filename}"
        path, suffix = PurePosixPath(m.filename), member_suffix(m.filename)
        if path.parts[0] == "__MACOSX" or path.name.startswith("._"):
            result.skipped.append({"source": label, "reason": "macOS metadata (__MACOSX, ._ files), not an image"})
            continue
        if suffix == ".txt":
            if _stem_key(m.filename) not in images:
                result.skipped.append({"source": label, "reason": "a caption with no image of its name in the zip"})
            continue  # a caption comes with its image
        if m.filename.lower().rstrip(". ").endswith(MASK_SUFFIX):
            result.skipped.append({"source": label, "reason": "a loss mask: import makes masks from an image's own "
                                                              "transparency"})
            continue
        ratio = m.file_size / max(1, m.compress_size)
        if m.file_size > limits.max_file_bytes or ratio > limits.max_zip_ratio:
            result.skipped.append({"source": label, "reason": f"zip member too large or compressed {ratio:.0f}:1 "
                                                              "(zip bomb guard)"})
            continue
        try:
            with zf.open(m) as f:
                data = f.read(limits.max_file_bytes + 1)  # the header's sizes can lie
        except ZIP_MEMBER_ERRORS as e:  # one bad member costs that member, not the whole archive
            result.skipped.append({"source": label, "reason": f"unreadable zip member ({_zip_reason(e)})"})
            continue
        if len(data) > limits.max_file_bytes:
            result.skipped.append({"source": label, "reason": "zip member larger than declared"})
            continue
        if suffix == ".zip" or data[:4] == b"PK\x03\x04":
            if depth >= 1:
                result.skipped.append({"source": label, "reason": "a zip inside a zip inside a zip: unpack it and "
                                                                  "import the inner zips"})
                continue
            try:
                inner = zipfile.ZipFile(io.BytesIO(data))
            except zipfile.BadZipFile as e:
                result.skipped.append({"source": label, "reason": f"not a readable zip ({e})"})
                continue
            with inner:
                yield from _zip_members(inner, label, label, limits, result, depth + 1)
            continue
        if suffix not in IMAGE_SUFFIXES and not looks_like_image(data[:16]):
            result.skipped.append({"source": label, "reason": f"not an image or zip ({suffix or 'no extension'})"})
            continue
        cap = names.get(_caption_name(m.filename))
        try:
            caption = _caption_text(zf.read(cap)) if cap is not None and cap.file_size < 1 << 20 else None
        except ZIP_MEMBER_ERRORS:
            caption = None
        yield label, data, caption


def _stem_key(name: str) -> str:
    path = PurePosixPath(name.rstrip(". "))
    return str(path.with_suffix("") if path.suffix else path).lower()


def _caption_name(name: str) -> str:
    return f"{_stem_key(name)}.txt"
