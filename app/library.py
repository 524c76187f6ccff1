"""The LoRA library: every .safetensors in loras/ and every finished run, read from file headers only
(no torch). Rename rewrites the header into a new file; delete moves to the trash; tools run the
trainer CLI in a subprocess and always write new files."""
from __future__ import annotations

import base64
import hashlib
import json
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer.lora import header as lora_header
from trainer.lora.readers import kind_of, readers
from trainer.atomic import copy_file, write_bytes
from trainer.data.importer import sanitize_name
from trainer.file_hashes import file_hashes
from trainer import safetensors_header

from . import trainer_cli
from .workspace import Workspace, WorkspaceError, new_folder



@dataclass
class Entry:
    path: Path
    title: str  # the file's own metadata title (ss_output_name), which a copy or rename can leave behind
    family: str
    rank: str
    trigger: str
    size_mb: float
    hashes: dict  # file_sha256/autov2 and tensor_sha256/autov3 (trainer.file_hashes); {} until the index has them
    source: str  # "library" or "run <name>"
    metadata: dict
    kind: dict = field(default_factory=dict)  # trainer.lora.readers.kind_of: network, DoRA, layout

    @property
    def name(self) -> str:
        """The file name without .safetensors: what A1111's <lora:name> and ComfyUI's lists show."""
        return self.path.stem

    def hashed(self) -> dict:
        """The hashes, computed now for this one file if the index has not got to it yet (the listing never waits
        for them; a picked, exported or inspected file does)."""
        if "file_sha256" not in self.hashes:
            try:
                self.hashes.update(file_hashes(self.path))
            except OSError:
                pass
        return self.hashes

    @property
    def sha256(self) -> str:
        return self.hashed().get("file_sha256", "")

    def row(self) -> list:
        pending = "(hashing…)"
        return [self.name, self.title, self.family, self.rank, self.trigger, round(self.size_mb, 2),
                self.hashes.get("autov2", pending), self.hashes.get("autov3", pending), self.source]


HEADERS = ["file", "title", "family", "rank", "trigger", "MB", "AutoV2 (file)", "AutoV3 (tensors)", "from"]
FAMILIES = {"sd_v1": "sd1", "sd_v2": "sd2", "sdxl_base_v1-0": "sdxl", "sd3": "sd3", "flux1": "flux", "zimage": "zimage"}


def read_header(path: Path) -> tuple[dict, int]:
    """(safetensors header, its length); a broken file raises WorkspaceError with the reason."""
    try:
        return safetensors_header.read(path)
    except safetensors_header.HeaderError as e:
        raise WorkspaceError(str(e)) from None


class Index:
    """What the Library knows of each file, keyed by path, size and modification time and kept in the workspace
    (`.library-index.json`): a listing reads the header of new or changed files only, a search filters the last
    listing and touches no file, and the two hashes (a full read of files of 20-200 MB) are computed once, on a
    background thread, and shown when ready."""

    FILE = ".library-index.json"

    def __init__(self, root: Path):
        import threading

        self.path = root / self.FILE
        self.lock = threading.Lock()
        self.version = 0  # grows when a hash lands: the tab redraws its table then
        self.header_reads = 0
        self.listing: list[Entry] | None = None
        try:
            self.rows: dict[str, dict] = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.rows = {}
        self.queue: list[Path] = []
        self.worker: threading.Thread | None = None

    def entry(self, path: Path, source: str) -> Entry:
        st = path.stat()
        key, stamp = str(path), [st.st_size, st.st_mtime_ns]
        with self.lock:
            row = self.rows.get(key)
        if row is None or row["stamp"] != stamp or "kind" not in row:  # an index from before readers were named
            header, _ = read_header(path)
            self.header_reads += 1
            md = header.get("__metadata__", {}) or {}
            ranks = sorted({v["shape"][0] for k, v in header.items() if k.endswith(("lora_down.weight", "lora_A.weight"))})
            network = "LoHa" if any(k.endswith(".hada_w1_a") for k in header) else \
                "LoKr" if any(k.endswith((".lokr_w1", ".lokr_w1_a")) for k in header) else ""
            row = {"stamp": stamp, "metadata": md, "ranks": ranks, "hashes": {}, "network": network,
                   "kind": kind_of(k for k in header if k != "__metadata__")}
            with self.lock:
                self.rows[key] = row
        if not row["hashes"]:
            self._want_hash(path)
        md, ranks = row["metadata"], row["ranks"]
        rank = md.get("ss_network_dim") or (str(ranks[0]) if len(ranks) == 1 else "/".join(map(str, ranks[:3])))
        if row.get("network"):  # LyCORIS: the kind beside its rank (the Library's "rank" column)
            rank = f"{rank} {row['network']}".strip()
        family = FAMILIES.get(md.get("ss_base_model_version", ""), "") or \
            md.get("modelspec.architecture", "?").split("/")[0]
        return Entry(path, md.get("ss_output_name", ""), family, str(rank), md.get("modelspec.trigger_phrase", ""),
                     st.st_size / 2**20, dict(row["hashes"]), source, md, row.get("kind") or {})

    def pending(self) -> int:
        """Files still to hash, or 1 while the index is being saved after the last one."""
        with self.lock:
            return len(self.queue) or int(self.worker is not None)

    def _want_hash(self, path: Path) -> None:
        import threading

        with self.lock:
            if path not in self.queue:
                self.queue.append(path)
            if self.worker is None or not self.worker.is_alive():
                self.worker = threading.Thread(target=self._hash_all, name="lora-studio-library-hashes", daemon=True)
                self.worker.start()

    def _hash_all(self) -> None:
        """Hashes the queue, then saves the index; the worker counts as pending until the file is written, and a
        path queued while it saved is hashed before it ends."""
        while True:
            while True:
                with self.lock:
                    if not self.queue:
                        break
                    path = self.queue[0]
                try:
                    st = path.stat()
                    found = file_hashes(path)
                except OSError:
                    found = None  # gone meanwhile
                with self.lock:
                    self.queue.pop(0)
                    row = self.rows.get(str(path))
                    if found and row and row["stamp"] == [st.st_size, st.st_mtime_ns]:
                        row["hashes"] = found
                        self.version += 1
            self.save()
            with self.lock:
                if not self.queue:
                    self.worker = None
                    return

    def save(self) -> None:
        with self.lock:
            text = json.dumps(self.rows)
        try:
            write_bytes(self.path, text.encode("utf-8"))
        except OSError:
            pass  # a read-only workspace: hash again next time


_INDEXES: dict[str, Index] = {}


def index(ws: Workspace) -> Index:
    key = str(ws.root)
    if key not in _INDEXES:
        _INDEXES[key] = Index(ws.root)
    return _INDEXES[key]


def entry(path: Path, source: str, ws: Workspace | None = None) -> Entry:
    if ws is None:  # a file outside any workspace: read as it is, hashed now
        idx = Index(path.parent)
        e = idx.entry(path, source)
        e.hashes = file_hashes(path)
        return e
    return index(ws).entry(path, source)


def entries(ws: Workspace) -> list[Entry]:
    """Every LoRA in loras/ and every run's, from the index (a header is read only for a new or changed file); the
    listing is kept for searches."""
    found = []
    for p in sorted(ws.loras.glob("*.safetensors")):
        found.append(_safe_entry(p, "library", ws))
    for run in sorted(p for p in ws.runs.iterdir() if p.is_dir()) if ws.runs.is_dir() else []:
        for p in sorted(run.glob("*.safetensors")):
            # "run" when the LoRA carries its run's name (the usual case), else which run: never "run run"
            found.append(_safe_entry(p, "run" if p.stem == run.name else f"run {run.name}", ws))
    listing = [e for e in found if e is not None]
    index(ws).listing = listing
    return listing


def listed(ws: Workspace) -> list[Entry]:
    """The last listing (made now if there is none): what a search filters, without touching a file."""
    idx = index(ws)
    return idx.listing if idx.listing is not None else entries(ws)


def _safe_entry(path: Path, source: str, ws: Workspace) -> Entry | None:
    try:
        return entry(path, source, ws)
    except (WorkspaceError, OSError):
        return None  # broken files are refused at import; one that broke later is simply not listed


def search(items: list[Entry], text: str = "", family: str = "") -> list[Entry]:
    text = text.strip().lower()
    return [e for e in items if (not family or e.family == family)
            and (not text or text in e.name.lower() or text in e.title.lower() or text in e.trigger.lower())]


def cover(ws: Workspace, e: Entry) -> str | None:
    """The file's thumbnail (modelspec.thumbnail data URL) as a PNG path, or None."""
    url = e.metadata.get("modelspec.thumbnail", "")
    if not url.startswith("data:image/"):
        return None
    key = e.sha256[:16] or hashlib.sha256(f"{e.path}|{e.size_mb}|{e.path.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    out = ws.root / ".covers" / f"{key}.png"
    if not out.exists():
        try:
            write_bytes(out, base64.b64decode(url.split(",", 1)[1]))
        except (ValueError, IndexError):
            return None
    return str(out)


def details(e: Entry) -> dict:
    md = e.metadata
    keys = ("ss_network_dim", "ss_network_alpha", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr",
            "ss_max_train_steps", "ss_num_train_images", "ss_resolution", "ss_seed", "ss_sd_model_name")
    info = {k: md[k] for k in keys if k in md}
    try:
        info["datasets"] = {name: len(tags) for name, tags in json.loads(md.get("ss_tag_frequency", "{}")).items()}
    except ValueError:
        pass
    loads = readers(e.family or None, e.kind) if e.kind else []
    return {"file": str(e.path), "title": e.title, **e.hashed(), **info, **({"loads in": loads} if loads else {})}


def rewrite_name(src: Path, dst: Path, new_name: str, extra: dict[str, str] | None = None) -> None:
    """A copy of `src` at `dst` whose ss_output_name (and ModelSpec title) say `new_name`, with `extra`
    metadata added; the tensors are the same bytes."""
    header, n = read_header(src)
    md = header.setdefault("__metadata__", {})
    md["ss_output_name"] = new_name
    if "modelspec.title" in md:
        md["modelspec.title"] = new_name
    md.update(extra or {})
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    with open(src, "rb") as f:
        f.seek(8 + n)
        data = f.read()
    write_bytes(dst, struct.pack("<Q", len(raw)) + raw + data)


def rename(ws: Workspace, e: Entry, new_name: str) -> Path:
    new_name = sanitize_name(new_name)
    dst = ws.loras / f"{new_name}.safetensors"
    if dst.exists():
        raise WorkspaceError(f"{dst.name} already exists in the library; pick another name")
    rewrite_name(e.path, dst, new_name)
    if e.source == "library":
        trash(ws, e)  # the old name goes away, but into the trash, not oblivion
    return dst


def run_checkpoints(ws: Workspace, lora: str | Path) -> list[Path]:
    """A run's saved checkpoints in training order, then its final LoRA, from the final LoRA's path."""
    lora = Path(lora)
    if lora.parent.parent != ws.runs:
        raise WorkspaceError(f"{lora.name} is not a run's LoRA; pick one from a run to compare its checkpoints")
    return sorted((lora.parent / "checkpoints").glob("*.safetensors")) + [lora]


def keep(ws: Workspace, run: str, recommendation: dict) -> Path:
    """Copy a run's recommended checkpoint into the library as `<run>-step<N>`, its figures and the reason it
    was picked in the metadata (`lora_studio.recommendation`), so they travel with the file."""
    src = Path(recommendation["path"])
    if not src.is_file():
        raise WorkspaceError(f"{src.name} is not there any more; it was moved or deleted after the run")
    dst = new_path(ws, sanitize_name(f"{run}-step{recommendation['step']}"))
    figures = {k: recommendation.get(k) for k in ("step", "validation_loss", "drift", "message")}
    rewrite_name(src, dst, dst.stem, {"lora_studio.recommendation": json.dumps(figures)})
    return dst


def trash(ws: Workspace, e: Entry) -> Path:
    dst = new_folder(ws.trash / "loras", time.strftime("%Y%m%d-%H%M%S")) / e.path.name
    shutil.move(str(e.path), dst)
    return dst


def import_file(ws: Workspace, path: str) -> Path:
    """Check an uploaded LoRA from its header and bytes (torch-free, milliseconds), then copy it into the library
    atomically (a full disk leaves no half file)."""
    src = Path(path)
    if src.suffix.lower() != ".safetensors":
        raise WorkspaceError(f"{src.name}: only .safetensors LoRA files are imported (no pickles)")
    try:
        defects = lora_header.check(src)  # refuses truncated files and kinds LoRA Studio does not read
    except lora_header.HeaderError as e:
        raise WorkspaceError(str(e)) from None
    if defects:
        raise WorkspaceError(f"{src.name} was not imported: {defects[0]}")
    dst = new_path(ws, sanitize_name(src.stem))
    copy_file(src, dst)
    return dst


def export(ws: Workspace, e: Entry) -> list[str]:
    """The .safetensors and its model card, for download."""
    card = e.path.with_name(e.path.stem + ".README.md")
    if not card.exists():
        trainer_cli.run("lora", "card", str(e.path))
    return [str(e.path), str(card)]


def new_path(ws: Workspace, stem: str) -> Path:
    path, n = ws.loras / f"{stem}.safetensors", 2
    while path.exists():
        path, n = ws.loras / f"{stem}-{n}.safetensors", n + 1
    return path


def merge(ws: Workspace, items: list[tuple[Entry, float]], rank: int = 0) -> Path:
    out = new_path(ws, "merged-" + "-".join(sanitize_name(e.name)[:16] for e, _ in items))
    args = ["lora", "merge", *[f"{e.path}:{w:g}" for e, w in items], "--out", str(out)]
    trainer_cli.run(*args, *(["--rank", str(rank)] if rank else []))
    return out


def resize(ws: Workspace, e: Entry, rank: int) -> Path:
    out = new_path(ws, f"{sanitize_name(e.name)}-r{rank}")
    trainer_cli.run("lora", "resize", str(e.path), "--out", str(out), "--rank", str(rank))
    return out


def analyze(e: Entry) -> str:
    return trainer_cli.run("lora", "analyze", str(e.path))
