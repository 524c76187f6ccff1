"""Find the images and captions of a dataset folder, torch-free so the UI can call it.

A dataset is a folder of images with same-stem caption files. Kohya-style subfolders named
`N_name` repeat their images N times per epoch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
MANIFEST = "dataset.toml"
MASK_SUFFIX = ".mask.png"  # alpha kept from imported RGBA images, used as an optional loss mask
REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")


@dataclass
class Item:
    image: Path
    caption: str
    repeats: int
    caption_problem: str = ""


@dataclass
class Scan:
    root: Path
    items: list[Item] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)  # file -> reason it is not used


class DatasetError(ValueError):
    pass


def read_caption(path: Path) -> tuple[str, str]:
    """Return (caption, problem). Non-UTF-8 captions are reported and read as cp1252/latin-1."""
    if not path.exists():
        return "", "no caption file"
    return decode_caption(path.read_bytes())


def decode_caption(raw: bytes) -> tuple[str, str]:
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text, problem = raw.decode("utf-8"), ""
    except UnicodeDecodeError:
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        problem = "caption is not UTF-8 (read as Windows-1252)"
    text = " ".join(text.split())
    if not text and not problem:
        problem = "empty caption"
    return text, problem


def scan(root: str | Path, caption_extension: str = ".txt", repeats: int = 1) -> Scan:
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DatasetError(f"{root} is a file, not a dataset folder; pass a folder of images with .txt captions")
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist; pass a folder of images with .txt captions")
    result = Scan(root)
    for folder, folder_repeats in _folders(root, repeats):
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                result.problems[str(path)] = ("hidden file (its name starts with '.'), so tools skip it; rename it "
                                              "without the leading dot to train on it")
                continue
            if path.name.startswith(".") or not path.is_file() or path.name == MANIFEST \
                    or path.suffix.lower() == caption_extension or path.name.endswith(MASK_SUFFIX):
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                result.problems[str(path)] = f"not an image type LoRA Studio reads ({path.suffix or 'no extension'})"
            elif path.stat().st_size == 0:
                result.problems[str(path)] = "zero-byte file"
            else:
                caption, problem = read_caption(path.with_suffix(caption_extension))
                result.items.append(Item(path, caption, folder_repeats, problem))
    return result


def _folders(root: Path, repeats: int):
    yield root, repeats
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        m = REPEAT_DIR.match(sub.name)
        if m:
            yield sub, max(1, int(m.group(1)))


_CACHE: dict[tuple[str, str], tuple[tuple, Scan]] = {}


def _stamp(root: Path) -> tuple:
    """What changes when an image or caption is added, removed, renamed or rewritten through an atomic write (a
    rename in its folder): the modification times of the folder and of its kohya subfolders."""
    stamps = [root.stat().st_mtime_ns]
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and REPEAT_DIR.match(p.name)):
        stamps.append((sub.name, sub.stat().st_mtime_ns))
    return tuple(stamps)


def cached_scan(root: str | Path, caption_extension: str = ".txt") -> Scan:
    """`scan`, remembered until the folder changes: the Datasets and Train tabs ask on every page and every form
    change, and a 10,000-image scan reads 10,000 captions. A caption edited in place by another program (not
    through an atomic write) is seen at the next change of the folder."""
    root = Path(root)
    if not root.is_dir():
        return scan(root, caption_extension)  # raises the usual DatasetError
    key = (str(root.resolve()), caption_extension)
    stamp = _stamp(root)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    result = scan(root, caption_extension)
    _CACHE[key] = (stamp, result)
    return result
