"""The workspace folder: datasets/, runs/, loras/, presets/ and trash/ under one root."""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from trainer.resources import SAMPLE_DATASETS

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,79}")


class WorkspaceError(ValueError):
    """A name or path the workspace refuses; the message says what is allowed."""


def default_root() -> Path:
    from trainer.resources import default_workspace

    return default_workspace()


@dataclass
class Workspace:
    root: Path
    # Folders outside the workspace that requests from the browser may name (`--allow-path`), for
    # example a models folder; see app/confine.py.
    allowed_paths: tuple[Path, ...] = ()
    # On an app that answers only this machine (127.0.0.1, the default), a model may be read from anywhere its user
    # can read: reading a base model writes nothing. Listening on a network keeps models inside the allowed roots.
    models_anywhere: bool = False

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def loras(self) -> Path:
        return self.root / "loras"

    @property
    def trash(self) -> Path:
        return self.root / "trash"

    def ensure(self, with_samples: bool = True) -> "Workspace":
        for folder in (self.datasets, self.runs, self.loras, self.trash):
            folder.mkdir(parents=True, exist_ok=True)
        marker = self.root / ".samples-copied"
        if with_samples and not marker.exists() and SAMPLE_DATASETS.is_dir():
            # Copies, so editing a sample in the UI never touches the shipped originals.
            for src in sorted(p for p in SAMPLE_DATASETS.iterdir() if p.is_dir()):
                if not (self.datasets / src.name).exists():
                    shutil.copytree(src, self.datasets / src.name)
            marker.write_text("sample datasets copied once; delete this file to copy them again\n")
        return self

    def dataset_names(self) -> list[str]:
        return sorted(p.name for p in self.datasets.iterdir() if p.is_dir()) if self.datasets.is_dir() else []

    def latest_dataset(self) -> str | None:
        """The dataset created or edited last: its folder changed last (a new image, a caption or its trigger saved:
        every write replaces a file in it). The tabs start on it, not on the first sample set."""
        folders = [p for p in self.datasets.iterdir() if p.is_dir()] if self.datasets.is_dir() else []
        return max(folders, key=lambda p: (p.stat().st_mtime_ns, p.name)).name if folders else None

    def run_names(self) -> list[str]:
        if not self.runs.is_dir():
            return []
        runs = [p for p in self.runs.iterdir() if p.is_dir()]
        return [p.name for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]

    def dataset(self, name: str) -> Path:
        return self.datasets / check_name(name, "dataset")

    def run(self, name: str) -> Path:
        return self.runs / check_name(name, "run")

    def inside(self, path: str | Path) -> Path:
        """`path` resolved, refused unless it lies inside the workspace."""
        p = Path(path).resolve()
        if not p.is_relative_to(self.root.resolve()):
            raise WorkspaceError(f"{path} is outside the workspace {self.root}")
        return p


def check_name(name: str, what: str) -> str:
    name = (name or "").strip()
    if not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise WorkspaceError(f"{what} name {name!r} may use letters, digits, space, '.', '-' and '_' "
                             "(up to 80, starting with a letter or digit)")
    return name


def new_folder(parent: Path, name: str) -> Path:
    """A folder that did not exist before: `name`, else `name-2`, `name-3`... Created exclusively, so two
    calls in the same second (or from two requests at once) never share one, and nothing in it is overwritten."""
    parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        folder = parent / (name if n == 1 else f"{name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            n += 1


def unique_name(folder: Path, name: str) -> str:
    candidate, n = name, 2
    while (folder / candidate).exists():
        candidate, n = f"{name}-{n}", n + 1
    return candidate
