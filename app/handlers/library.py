"""The Library tab's handlers, each a method that can be called and tested without a page. `app/tabs/library.py`
lays the tab out and wires these to its components."""
from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from .. import library
from ..context import Ctx, guard
from ..workspace import WorkspaceError


class LibraryHandlers:
    def __init__(self, ctx: Ctx):
        self.ws = ctx.ws

    def listing(self, q, fam, fresh=True):
        """The table: listed again (`fresh`: a header read for new or changed files only) or, for a search, the last
        listing filtered (no file touched)."""
        ws = self.ws
        items = library.search(library.entries(ws) if fresh else library.listed(ws), q or "", fam or "")
        return [e.row() for e in items], [str(e.path) for e in items]

    def search(self, q, fam):
        return self.listing(q, fam, fresh=False)

    def find(self, path: str) -> library.Entry:
        """The entry for a path, looked up when the action runs: a file renamed or trashed since it was picked
        gets a clear message, not a job that fails somewhere else."""
        if not path:
            raise WorkspaceError("pick a LoRA in the table first")
        for e in library.entries(self.ws):
            if str(e.path) == path:
                return e
        raise WorkspaceError(f"{Path(path).name} is no longer in the library (renamed, trashed or moved); "
                             "pick it again in the table")

    def picked(self, e: library.Entry) -> tuple:
        return str(e.path), library.cover(self.ws, e), json.dumps(library.details(e), indent=1), e.name

    def hashes_landed(self, seen, q, fam):
        """While hashes are computed in the background, the table shows each as it lands."""
        idx = library.index(self.ws)
        if idx.version == seen:
            return gr.skip(), gr.skip(), seen
        return *self.listing(q, fam, fresh=False), idx.version

    @guard
    def select(self, ps, evt: gr.SelectData):
        return self.picked(self.find(ps[evt.index[0]]))

    @guard
    def do_rename(self, path, name, q, fam):
        out = library.rename(self.ws, self.find(path), name)
        renamed = next(e for e in library.entries(self.ws) if e.path == out)
        return f"renamed to {out.name}", *self.listing(q, fam), *self.picked(renamed)  # the selection follows the file

    @guard
    def do_delete(self, path, q, fam):
        out = library.trash(self.ws, self.find(path))
        return f"moved to {out.parent}", *self.listing(q, fam)

    @guard
    def do_export(self, path):
        e = self.find(path)
        files = library.export(self.ws, e)
        return files, (f"exported **{e.name}**: {Path(files[0]).name} and its model card {Path(files[1]).name} are "
                       "ready under Download (click a file there to save it)")

    @guard
    def do_import(self, path, q, fam):
        if not path:
            return gr.skip(), gr.skip(), gr.skip()
        out = library.import_file(self.ws, path)
        return f"imported {out.name}", *self.listing(q, fam)

    @guard
    def do_merge(self, path, others, rank, q, fam):
        items = [(self.find(path), 1.0)]
        by_name = {e.name: e for e in library.entries(self.ws)}
        for part in [p for p in others.split() if p]:
            name, _, w = part.partition(":")
            if name not in by_name:
                raise WorkspaceError(f"no LoRA named {name!r}")
            items.append((by_name[name], float(w or 1)))
        if len(items) < 2:
            raise WorkspaceError("name at least one other LoRA to merge with")
        out = library.merge(self.ws, items, int(rank or 0))
        return f"wrote {out.name}", *self.listing(q, fam)

    @guard
    def do_resize(self, path, rank, q, fam):
        out = library.resize(self.ws, self.find(path), int(rank))
        return f"wrote {out.name}", *self.listing(q, fam)

    @guard
    def analyze(self, path):
        return f"```\n{library.analyze(self.find(path))}\n```"
