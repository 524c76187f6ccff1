"""Caption editing across a dataset, torch-free. Every write is atomic; image files are never touched."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..atomic import write_text
from .captions import fill_template, phrase_count, split_tags
from .scan import scan

TEMPLATES = {"character": "photo of [trigger]", "style": "[trigger] style", "concept": "[trigger]"}


def caption_path(image: str | Path, extension: str = ".txt") -> Path:
    return Path(image).with_suffix(extension)


def set_caption(image: str | Path, text: str, extension: str = ".txt") -> Path:
    path = caption_path(image, extension)
    write_text(path, " ".join(text.split()) + "\n")
    return path


def _rewrite(dataset, change, extension=".txt") -> int:
    """Apply `change(tags) -> tags` to every caption; returns how many files changed."""
    n = 0
    for item in scan(dataset, extension).items:
        tags = split_tags(item.caption)
        new = change(list(tags))
        if new != tags:
            set_caption(item.image, ", ".join(new), extension)
            n += 1
    return n


def add_tag(dataset, tag: str, first: bool = False) -> int:
    """Add `tag` to every caption that does not say it already, as a tag or as whole words inside one: adding the
    trigger to 'photo of vomble' made 'vomble, photo of vomble'."""
    tag = tag.strip()

    def change(tags):
        if phrase_count(", ".join(tags), tag):
            return tags
        return [tag] + tags if first else tags + [tag]
    return _rewrite(dataset, change)


def remove_tag(dataset, tag: str) -> int:
    return _rewrite(dataset, lambda tags: [t for t in tags if t != tag.strip()])


def replace_tag(dataset, old: str, new: str) -> int:
    def change(tags):
        out = []
        for t in tags:
            t = new.strip() if t == old.strip() else t
            if t not in out:
                out.append(t)
        return out
    return _rewrite(dataset, change)


def find_by_tag(dataset, tag: str) -> list[Path]:
    return [i.image for i in scan(dataset).items if tag.strip() in split_tags(i.caption)]


def tag_frequency(dataset) -> dict[str, int]:
    counts = Counter(t for i in scan(dataset).items for t in split_tags(i.caption))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def caption_uncaptioned(dataset, kind: str, trigger: str) -> int:
    """Give every image without a caption the template of `kind` (character, style, concept)."""
    if kind not in TEMPLATES:
        raise ValueError(f"unknown caption template {kind!r}; allowed: {', '.join(TEMPLATES)}")
    n = 0
    for item in scan(dataset).items:
        if not item.caption:
            set_caption(item.image, fill_template(TEMPLATES[kind], trigger))
            n += 1
    return n
