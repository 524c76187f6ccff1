"""What the Datasets tab does, as plain functions over a workspace (unit-tested without a browser)."""
from __future__ import annotations

import html
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.data import caption_ops
from trainer.data.importer import Limits, sanitize_name
from trainer.data.manifest import Manifest, read_manifest, write_manifest
from trainer.data.scan import MASK_SUFFIX, cached_scan, read_caption

from . import confine, trainer_cli
from .workspace import Workspace, WorkspaceError, check_name, new_folder

# A dataset made in the app holds at most 20,000 images, however many imports fill it (the CLI allows 50,000)
UPLOAD_LIMITS = Limits(max_files=20_000, max_file_bytes=50 * 2**20, max_total_bytes=8 * 2**30)
TRASH_INDEX = "trash.json"


def create_dataset(ws: Workspace, name: str) -> str:
    name = check_name(sanitize_name(name) if name else "", "dataset")
    if ws.dataset(name).exists():
        raise WorkspaceError(f"dataset {name} already exists; pick it in the Dataset list, or choose another name")
    ws.dataset(name).mkdir(parents=True)
    return name


def import_uploads(ws: Workspace, dataset: str, paths: list[str]) -> list[list[str]]:
    """Import uploaded files or zips by the dataset rules; one report row per file (run to its end)."""
    rows = []
    for kind, value in import_steps(ws, dataset, paths):
        if kind == "done":
            rows = value
    return rows


def import_steps(ws: Workspace, dataset: str, paths: list[str], track=None):
    """The import as it goes: ("progress", "importing: 340 / 1000") lines from the CLI, then ("done", report rows).
    A .txt dropped with the images is the caption of the image with the same name (the browser uploads each file to
    a folder of its own, so the importer would not find it beside its image): each such pair is put side by side
    first. `track(proc)` is told the CLI process (the page can end it)."""
    import tempfile

    lim = UPLOAD_LIMITS
    by_stem = {Path(p).stem: Path(p) for p in paths if Path(p).suffix.lower() == ".txt"}
    sources, paired = [], set()
    with tempfile.TemporaryDirectory(prefix="lora-studio-upload-") as tmp:
        for i, p in enumerate(map(Path, paths)):
            if p.suffix.lower() == ".txt":
                continue
            caption = by_stem.get(p.stem)
            if caption is None or p.suffix.lower() == ".zip":
                sources.append(str(p))
                continue
            pair = Path(tmp) / str(i)
            pair.mkdir()
            shutil.copyfile(p, pair / p.name)
            shutil.copyfile(caption, pair / f"{p.stem}.txt")
            sources.append(str(pair / p.name))
            paired.add(p.stem)
        result = {"imported": [], "skipped": []}
        if sources:
            proc = trainer_cli.start("dataset", "import", "--json", "--to", str(ws.dataset(dataset)),
                                     "--max-files", str(lim.max_files), "--max-file-mb",
                                     str(lim.max_file_bytes // 2**20), "--max-total-mb",
                                     str(lim.max_total_bytes // 2**20), "--", *sources)
            if track:
                track(proc)
            last = ""
            for line in proc.stderr:
                if line.strip():
                    last = line.strip()
                    yield "progress", last.removeprefix("lora-studio: ")
            out = trainer_cli.result(proc)
            if proc.returncode not in (0, 2):  # 2: some named source was missing; the report says which
                raise WorkspaceError(last.removeprefix("lora-studio: error: ") or f"import failed ({proc.returncode})")
            result = json.loads(out) if out.strip() else result
    rows = [[Path(r["source"]).name, "imported", _saved_as(r["source"], r["file"])
             + (" (with its caption)" if Path(r["source"]).stem in paired else "")] for r in result["imported"]]
    rows += [[Path(r["source"]).name, "skipped", r["reason"]] for r in result["skipped"]]
    rows += [[f"{stem}.txt", "skipped", f"no image named {stem}.* among the dropped files"]
             for stem in sorted(set(by_stem) - paired)]
    yield "done", rows


def _saved_as(source: str, saved: str) -> str:
    """The import report's detail for an imported file: only what the user could not guess (a new name)."""
    original = Path(source.rsplit(":", 1)[-1] if ".zip:" in source else source).name
    return "" if saved == original else f"saved as {saved}"


def images(ws: Workspace, dataset: str) -> list[tuple[str, str]]:
    """(image path, caption) for every image in the dataset, in name order (scanned once per change of the folder)."""
    folder = ws.dataset(dataset)
    if not folder.is_dir():
        return []
    return [(str(i.image), i.caption) for i in cached_scan(folder).items]


def image_path(ws: Workspace, dataset: str, name: str) -> Path:
    """An image of the dataset by its name relative to the dataset (`img.png`, or `2_more/img.png` in a kohya
    subfolder); nothing outside the dataset."""
    root = ws.dataset(dataset).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or not path.is_file() or path.parent != root and path.parent.parent != root:
        raise WorkspaceError(f"{name} is not in dataset {dataset}")
    return path


def page(ws: Workspace, dataset: str, number: int, per_page: int, name_filter: str = "", caption_filter: str = "",
         only: set[str] | None = None) -> tuple[list[tuple[str, str]], int, int, int]:
    """One page of the dataset's images: ((path, name relative to the dataset) on this page, the page number it
    really is, the number of pages, how many images match), filtered by file name, caption text and, with `only`,
    by name (e.g. the files the last check flagged). Linear in the dataset's size; the gallery gets one page."""
    root = ws.dataset(dataset)
    items = images(ws, dataset)
    name_filter, caption_filter = name_filter.strip().lower(), caption_filter.strip().lower()
    matching = []
    for path, caption in items:
        rel = Path(path).relative_to(root).as_posix()
        if name_filter and name_filter not in rel.lower():
            continue
        if caption_filter and caption_filter not in caption.lower():
            continue
        if only is not None and rel not in only:
            continue
        matching.append((path, rel))
    pages = max(1, -(-len(matching) // per_page))
    number = min(max(0, number), pages - 1)
    return matching[number * per_page:(number + 1) * per_page], number, pages, len(matching)


def caption(ws: Workspace, dataset: str, name: str) -> str:
    return read_caption(image_path(ws, dataset, name).with_suffix(".txt"))[0]


def save_caption(ws: Workspace, dataset: str, name: str, text: str) -> Path:
    return caption_ops.set_caption(image_path(ws, dataset, name), text)


def bulk_edit(ws: Workspace, dataset: str, action: str, tag: str, new: str = "") -> str:
    folder = ws.dataset(dataset)
    tag = tag.strip()
    if not tag:
        raise WorkspaceError("type a tag first")
    if action == "add":
        n = caption_ops.add_tag(folder, tag)
    elif action == "add first":
        n = caption_ops.add_tag(folder, tag, first=True)
    elif action == "remove":
        n = caption_ops.remove_tag(folder, tag)
    elif action == "replace":
        if not new.strip():
            raise WorkspaceError("type the replacement tag")
        n = caption_ops.replace_tag(folder, tag, new.strip())
    else:
        raise WorkspaceError(f"unknown tag action {action!r}")
    return f"{action} {tag!r}: {n} caption(s) changed"


def tag_table(ws: Workspace, dataset: str) -> list[list]:
    from collections import Counter

    from trainer.data.captions import split_tags

    folder = ws.dataset(dataset)
    if not folder.is_dir():
        return []
    counts = Counter(t for i in cached_scan(folder).items for t in split_tags(i.caption))
    return [[t, n] for t, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def settings(ws: Workspace, dataset: str) -> Manifest:
    return read_manifest(ws.dataset(dataset))


def save_settings(ws: Workspace, dataset: str, trigger: str, repeats: int, kind: str = "") -> Manifest:
    m = read_manifest(ws.dataset(dataset))
    m.trigger, m.repeats = trigger.strip(), max(1, int(repeats))
    if kind:
        m.kind = kind
    m.name = m.name or dataset
    write_manifest(ws.dataset(dataset), m)
    return m


def remove_image(ws: Workspace, dataset: str, name: str) -> str:
    """Move an image with its caption and mask to the trash; nothing is deleted."""
    image = image_path(ws, dataset, name)
    bin_dir = new_folder(ws.trash / dataset / time.strftime("%Y%m%d-%H%M%S"), image.stem)
    moved = []
    for companion in (image, image.with_suffix(".txt"), image.parent / f"{image.stem}{MASK_SUFFIX}"):
        if companion.exists():
            shutil.move(str(companion), bin_dir / companion.name)
            moved.append(companion.name)
    index = _trash_index(ws)
    index.append({"dataset": dataset, "image": image.name, "files": moved, "folder": str(bin_dir)})
    _write_trash_index(ws, index)
    return f"moved {image.name} to the trash"


def trashed(ws: Workspace, dataset: str) -> list[str]:
    return [e["image"] for e in _trash_index(ws) if e["dataset"] == dataset]


def restore_image(ws: Workspace, dataset: str, name: str) -> str:
    index = _trash_index(ws)
    for entry in reversed(index):
        if entry["dataset"] == dataset and entry["image"] == name:
            target = ws.dataset(dataset)
            clash = [f for f in entry["files"] if (target / f).exists()]
            if clash:
                raise WorkspaceError(f"cannot restore {name}: {', '.join(clash)} exists again in {dataset}")
            for f in entry["files"]:
                shutil.move(str(Path(entry["folder"]) / f), target / f)
            index.remove(entry)
            _write_trash_index(ws, index)
            return f"restored {name}"
    raise WorkspaceError(f"{name} is not in the trash of {dataset}")


def _trash_index(ws: Workspace) -> list[dict]:
    path = ws.trash / TRASH_INDEX
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else []


def _write_trash_index(ws: Workspace, index: list[dict]) -> None:
    from trainer.atomic import write_text

    write_text(ws.trash / TRASH_INDEX, json.dumps(index, indent=1))


def check_command(ws: Workspace, dataset: str, resolution: int = 512, model: str = "") -> list[str]:
    from .train_form import model_source

    tokens_from = confine.model(ws, "model.source", model_source(model)) if model else "tiny"
    return ["dataset", "check", "--json", "--resolution", str(int(resolution)), "--model", tokens_from, "--",
            str(ws.dataset(dataset))]


def check_result(ws: Workspace, dataset: str, rep: dict) -> tuple[list[list], list[list], str, list[str]]:
    """(per-file rows, bucket rows, summary: counts, then what the caption lint says about the whole set, the names
    of the files flagged: excluded or warned, relative to the dataset, for the gallery's filter)."""
    root = ws.dataset(dataset)
    rel = lambda p: Path(p).relative_to(root).as_posix() if Path(p).is_relative_to(root) else Path(p).name  # noqa: E731
    rows = [[rel(f["path"]), f["status"], "; ".join(f["reasons"]), f"{f['width']}x{f['height']}", f["bucket"]]
            for f in rep["files"]]
    buckets = [[b, n] for b, n in rep["buckets"].items()]
    s = rep["summary"]
    c = rep["captions"]
    text = (f"{s['ok']} ok, {s['warning']} with warnings, {s['excluded']} excluded; captions counted with "
            f"{c['tokenizer']} ({c['window'] - 2} tokens fit)")
    for tag in c["always"]:
        text += (f"\n\n**{html.escape(tag)}** is in every caption besides the trigger: it will be learned as part "
                 "of the trigger (remove it where it is not what the trigger means)")
    for note in c.get("notes", []):
        text += f"\n\nNote: {html.escape(note)}"
    flagged = [rel(f["path"]) for f in rep["files"] if f["status"] != "ok"]
    return rows, buckets, text, flagged


def validation(ws: Workspace, dataset: str, resolution: int = 512, model: str = "") -> tuple[list[list], list[list], str]:
    """The check, run to its end (the tab streams it instead: check_command)."""
    rep = trainer_cli.run_json(*check_command(ws, dataset, resolution, model))
    return check_result(ws, dataset, rep)[:3]


def auto_caption(ws: Workspace, dataset: str, *, template: str, trigger: str = "") -> str:
    """Caption uncaptioned images from a template ("photo of [trigger]"), through the trainer CLI."""
    if not template:
        raise WorkspaceError("pick a caption template")
    args = ["dataset", "caption", str(ws.dataset(dataset)), "--json", "--template", template]
    out = trainer_cli.run_json(*args, *(["--trigger", trigger] if trigger else []))
    return f"{out['changed']} caption file(s) written"


# ---- captioning models ---------------------------------------------------------------------------------------
CAPTIONERS = {  # label -> the CLI's --kind
    "WD tagger: booru tags (ONNX)": "wd",
    "Florence-2: a detailed sentence": "florence",
    "Chat vision model: your instruction (JoyCaption, Qwen-VL)": "vlm",
    "Image-to-text (BLIP)": "image-to-text",
    "Guess from the model": "auto",
}
SUGGESTED = {"wd": "SmilingWolf/wd-eva02-large-tagger-v3", "florence": "florence-community/Florence-2-large",
             "vlm": "", "image-to-text": "Salesforce/blip-image-captioning-large", "auto": ""}
PREVIEW_IMAGES = 4
CAPTION_BACKUPS = "captions-"  # trash/<dataset>/captions-<time>: captions a captioning run replaced


@dataclass
class CaptionSpec:
    kind: str  # a CAPTIONERS value
    model: str
    tags: str = ""  # a WD tagger to combine with a sentence captioner: "tags, sentence"
    instruction: str = ""
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    blacklist: str = ""
    overwrite: bool = False
    trigger: str = ""


def caption_command(ws: Workspace, dataset: str, spec: CaptionSpec, *, preview: bool = False) -> list[str]:
    """The `lora-studio dataset caption` arguments for a spec; every local model path stays inside the allowed
    folders (a Hub id downloads into the Hugging Face cache)."""
    if not spec.model.strip():
        raise WorkspaceError("name a captioning model: a local folder or a Hub id (the box suggests one)")
    args = ["dataset", "caption", str(ws.dataset(dataset)), "--json",
            "--auto", confine.model(ws, "captioning model", spec.model.strip()), "--kind", spec.kind,
            "--general-threshold", str(spec.general_threshold), "--character-threshold", str(spec.character_threshold)]
    if spec.tags.strip():
        args += ["--tags", confine.model(ws, "tagger", spec.tags.strip())]
    for flag, value in (("--instruction", spec.instruction), ("--blacklist", spec.blacklist),
                        ("--trigger", spec.trigger or read_manifest(ws.dataset(dataset)).trigger)):
        if value.strip():
            args += [flag, value.strip()]
    if spec.overwrite:
        args.append("--overwrite")
    if preview:
        return args + ["--preview", str(PREVIEW_IMAGES)]
    return args + ["--backup", str(new_folder(ws.trash / dataset, CAPTION_BACKUPS + time.strftime("%Y%m%d-%H%M%S")))]


def caption_preview(ws: Workspace, dataset: str, spec: CaptionSpec) -> list[list[str]]:
    """[image, caption] for the first images the run would caption; nothing is written."""
    out = trainer_cli.run_json(*caption_command(ws, dataset, spec, preview=True))
    rows = [[Path(p).name, c] for p, c in out["captions"].items()]
    rows += [[Path(p).name, "(the model had nothing to say: left as it is)"] for p in out["empty"]]
    if not rows:
        raise WorkspaceError("no image to caption: every image has a caption (tick 'Also re-caption' to redo them)")
    return rows


def caption_backups(ws: Workspace, dataset: str) -> list[Path]:
    """Backups of replaced captions for this dataset, oldest first (by when they were written)."""
    folder = ws.trash / dataset
    return sorted((p for p in folder.glob(CAPTION_BACKUPS + "*") if p.is_dir() and any(p.iterdir())),
                  key=lambda p: p.stat().st_mtime) if folder.is_dir() else []


def undo_captioning(ws: Workspace, dataset: str) -> str:
    """Captions as they were before the newest captioning run (or undo): replaced ones back, new ones taken away;
    the ones now there are kept in turn, so pressing it again redoes."""
    backups = caption_backups(ws, dataset)
    if not backups:
        raise WorkspaceError(f"no captions to put back for {dataset}: nothing has replaced any yet")
    newest = backups[-1]
    keep = new_folder(ws.trash / dataset, CAPTION_BACKUPS + time.strftime("%Y%m%d-%H%M%S"))
    out = trainer_cli.run_json("dataset", "caption", str(ws.dataset(dataset)), "--restore", str(newest),
                               "--backup", str(keep), "--json")
    # Restored: renamed out of the undo list, not deleted (the trash never loses anything); `keep` is newest now.
    target = new_folder(newest.parent, "restored-" + newest.name)
    target.rmdir()  # a name no other folder has, for the rename
    newest.rename(target)
    return (f"put back {out['restored']} caption(s) and took away {out['removed']} new one(s); "
            "press again to redo")
