"""Auto-captioning behind one small interface (`caption(images) -> captions`), so the UI and the CLI offer any
captioner: WD tagger tags, Florence-2 or chat-model sentences, a BLIP-style image-to-text pipeline, or tags and a
sentence combined. A real captioner needs weights the user provides (a local folder or a Hub id).

Captions already there are kept unless `overwrite`; then every caption about to be replaced is copied into a
backup folder first, and `restore_captions` puts them back (itself backed up, so that is undoable too).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..atomic import write_text
from .caption_ops import caption_path, set_caption
from .captions import with_trigger
from .images import open_rgb
from .scan import scan

KINDS = ("auto", "wd", "florence", "vlm", "image-to-text")
ABSENT = "absent.json"  # in a caption backup: the captions that did not exist (a restore removes them)


class Captioner(Protocol):
    name: str

    def caption(self, images: list) -> list[str]:
        """One caption per PIL image."""


class TransformersCaptioner:
    """BLIP-style image-to-text models through transformers' pipeline (for example a local BLIP folder)."""

    def __init__(self, model: str, device: str | None = None):
        from transformers import pipeline

        self.name = model
        self._pipe = pipeline("image-to-text", model=model, device=device)

    def caption(self, images: list) -> list[str]:
        return [out[0]["generated_text"].strip() for out in self._pipe(images)]


class Combined:
    """Tags, then a sentence: "1girl, red hair, smiling, a woman with red hair smiles at the camera"."""

    def __init__(self, tagger: Captioner, describer: Captioner):
        self.tagger, self.describer = tagger, describer
        self.name = f"{tagger.name} + {describer.name}"

    def caption(self, images: list) -> list[str]:
        return [", ".join(p for p in (t, d) if p) for t, d in zip(self.tagger.caption(images),
                                                                   self.describer.caption(images))]


def guess_kind(model: str) -> str:
    """What `model` is, from its files or name: a WD tagger, Florence-2, a chat VLM or image-to-text."""
    folder = Path(model).expanduser()
    if (folder / "model.onnx").exists() or (not folder.exists() and "tagger" in model.lower()):
        return "wd"
    from .vlm_captioner import model_type

    kind = model_type(model)
    if kind == "florence2" or (kind is None and "florence" in model.lower()):
        return "florence"
    if kind in ("blip", "blip-2", "vision-encoder-decoder", "git"):
        return "image-to-text"
    return "vlm"


def load_captioner(model: str, kind: str = "auto", *, instruction: str = "", device: str | None = None,
                   tagger_options=None, progress=None) -> Captioner:
    """One captioner by kind (KINDS); 'auto' guesses it from the model's files or name."""
    kind = guess_kind(model) if kind == "auto" else kind
    if kind == "wd":
        from .wd_tagger import WDTagger

        return WDTagger(model, tagger_options, device=device, progress=progress)
    if progress:
        progress(f"loading {model} (a Hub id downloads once into the Hugging Face cache)")
    if kind == "florence":
        from .vlm_captioner import Florence2Captioner

        return Florence2Captioner(model, device=device)
    if kind == "vlm":
        from .vlm_captioner import ChatCaptioner

        return ChatCaptioner(model, device=device, instruction=instruction)
    if kind == "image-to-text":
        return TransformersCaptioner(model, device=device)
    raise ValueError(f"captioner kind {kind!r} is not one of {', '.join(KINDS)}")


@dataclass
class Captioned:
    written: dict[str, str] = field(default_factory=dict)  # image path -> caption written (or previewed)
    empty: list[str] = field(default_factory=list)  # images the captioner had nothing for (left as they were)
    backup: str = ""  # where the replaced captions were copied, when any were
    stopped: bool = False
    removed: list[str] = field(default_factory=list)  # captions a restore took away (they did not exist before)


def caption_dataset(dataset: str | Path, captioner: Captioner, trigger: str = "", overwrite: bool = False,
                    batch_size: int = 8, progress=None, *, limit: int | None = None, preview: bool = False,
                    backup_dir: str | Path | None = None, should_stop=None) -> Captioned:
    """Caption the images that have none (or all, with `overwrite`), trigger first. With `preview` nothing is
    written (the UI shows the first `limit` captions before the user applies them). `should_stop()` is asked
    between batches; what was written before a stop stays."""
    items = [i for i in scan(dataset).items if overwrite or not i.caption][:limit]
    out = Captioned()
    if items and not preview:
        out.backup = str(_back_up(dataset, [i.image for i in items], backup_dir))
    for start in range(0, len(items), batch_size):
        if should_stop and should_stop():
            out.stopped = True
            break
        batch = items[start:start + batch_size]
        texts = captioner.caption([open_rgb(i.image) for i in batch])
        for item, text in zip(batch, texts):
            text = " ".join(text.split())
            if not text:
                out.empty.append(str(item.image))
                continue
            caption = with_trigger(text, trigger)
            if not preview:
                set_caption(item.image, caption)
            out.written[str(item.image)] = caption
        if progress:
            progress(min(start + batch_size, len(items)), len(items))
    return out


def default_backup_dir(dataset: str | Path) -> Path:
    """Replaced captions of a CLI run: in the cache, out of the dataset (where they would train)."""
    from ..resources import default_cache_dir

    return Path(default_cache_dir()) / "caption-backups" / f"{Path(dataset).name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _back_up(dataset: str | Path, images: list[Path], backup_dir: str | Path | None) -> Path:
    """The captions of `images` as they are now, in a new backup folder (paths as inside the dataset); those
    that do not exist yet are listed in ABSENT, so a restore removes what the run creates."""
    folder = Path(backup_dir) if backup_dir else default_backup_dir(dataset)
    folder.mkdir(parents=True, exist_ok=True)
    absent = []
    for image in images:
        rel = caption_path(image).relative_to(dataset)
        if caption_path(image).exists():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(caption_path(image), folder / rel)
        else:
            absent.append(rel.as_posix())
    if absent:
        write_text(folder / ABSENT, json.dumps(absent, indent=1))
    return folder


def restore_captions(dataset: str | Path, backup: str | Path, backup_dir: str | Path | None = None) -> Captioned:
    """Captions back as `backup` holds them: each saved caption written back, each caption it lists as absent
    removed. What that replaces or removes is backed up first, so a restore is undone the same way."""
    backup, dataset = Path(backup), Path(dataset)
    if not backup.is_dir():
        raise ValueError(f"{backup} is not a caption backup folder")
    images = {caption_path(i.image).relative_to(dataset): i.image for i in scan(dataset).items}
    saved = {f: images[f.relative_to(backup)] for f in sorted(backup.rglob("*.txt")) if f.relative_to(backup) in images}
    absent = json.loads((backup / ABSENT).read_text(encoding="utf-8")) if (backup / ABSENT).exists() else []
    created = [images[Path(r)] for r in absent if Path(r) in images and caption_path(images[Path(r)]).exists()]
    out = Captioned()
    touched = list(saved.values()) + created
    if touched:
        out.backup = str(_back_up(dataset, touched, backup_dir))
    for f, img in saved.items():
        text = f.read_text(encoding="utf-8")
        write_text(caption_path(img), text)
        out.written[str(img)] = text.strip()
    for img in created:
        caption_path(img).unlink()  # backed up just above
        out.removed.append(str(img))
    return out
