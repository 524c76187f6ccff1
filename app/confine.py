"""What a request from the browser may name on disk: the workspace, the latent cache, and the folders the
user allowed when launching (`--allow-path DIR`). Anything else is refused with the key, the path and how
to allow it. Only the app is confined: `lora-studio train` on the command line reads and writes anywhere
its user can."""
from __future__ import annotations

from pathlib import Path

from trainer.config import RunConfig
from trainer.models.info import is_embedded, looks_like_path
from trainer.resources import EMBEDDED_MODEL, default_cache_dir

from .workspace import Workspace, WorkspaceError

RUN_PATHS = ("data.dataset", "data.reg_dataset", "data.validation_dataset", "data.cache_dir", "save.output_dir")


def roots(ws: Workspace) -> list[Path]:
    """Where a request may read and write. The installed embedded model is not among them: it is a read-only root
    for model.source alone (a cache or run folder inside the package would write into it)."""
    return [p.expanduser().resolve() for p in (ws.root, default_cache_dir(), *ws.allowed_paths)]


def path(ws: Workspace, key: str, value: str | Path) -> Path:
    """`value` resolved (relative to the workspace, symlinks followed), refused unless it lies in an allowed root."""
    p = Path(value).expanduser()
    p = (p if p.is_absolute() else ws.root / p).resolve()
    embedded = EMBEDDED_MODEL.resolve()
    if p.is_relative_to(embedded):
        raise WorkspaceError(f"{key} = {str(value)!r} is inside the installed embedded model, which is read only; "
                             "pick a folder in the workspace")
    if any(p.is_relative_to(r) for r in roots(ws)):
        return p
    folder = p if p.is_dir() or not p.suffix else p.parent
    raise WorkspaceError(f"{key} = {str(value)!r} is outside the workspace {ws.root} and the allowed folders; "
                         f"move it into the workspace, or start lora-studio with --allow-path {folder}")


def model(ws: Workspace, key: str, source: str) -> str:
    """A model to read (a base, a captioner): the embedded one, a Hub id (downloaded into the Hub cache), or a local
    path: anywhere on an app that answers this machine alone (reading writes nothing), inside the allowed roots on
    one that listens on a network."""
    if is_embedded(source):
        return source
    if not looks_like_path(source) and not (ws.root / source).exists():
        return source  # "owner/name" that is no local folder: a Hub id
    if ws.models_anywhere:
        p = Path(source).expanduser()
        p = (p if p.is_absolute() else ws.root / p).resolve()
        if p.exists():
            return str(p)
        raise WorkspaceError(f"{key} = {source!r} does not exist; give a model folder, a .safetensors file or a Hub "
                             "id (owner/name)")
    try:
        return str(path(ws, key, source))
    except WorkspaceError as e:
        raise WorkspaceError(f"{e} (this app listens on a network, so it reads models from those folders only)") \
            from None


def run_config(ws: Workspace, cfg: RunConfig) -> RunConfig:
    """Check every path a run from the UI would read or write; each is rewritten resolved, so the
    trainer uses exactly the path that was checked."""
    cfg.model.source = model(ws, "model.source", cfg.model.source)
    for key in RUN_PATHS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value:
            setattr(getattr(cfg, section), name, str(path(ws, key, value)))
    return cfg
