"""Library tab: every LoRA in the workspace with cover, family, rank, triggers, settings, size and
hash; search, rename, trash, export with its model card, import, and merge/resize/analyze."""
from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from .. import library
from ..context import Ctx, guard, said_in
from ..workspace import WorkspaceError


def build(ctx: Ctx) -> dict:
    ws = ctx.ws
    with gr.Tab("Library", id="library"):
        with gr.Row():
            query = gr.Textbox(label="Search name or trigger", scale=3)
            family = gr.Dropdown(["", "sd1", "sd2", "sdxl", "sd3"], value="", label="Family")
            refresh = gr.Button("Refresh", elem_id="library-refresh")
        table = gr.Dataframe(headers=library.HEADERS, interactive=False, elem_id="library-table")
        paths = gr.State([])
        with gr.Row():
            cover = gr.Image(label="Cover", type="filepath", height=200, elem_id="library-cover")
            info = gr.Code(label="Details", language="json", elem_id="library-details")
        chosen = gr.Textbox(label="Selected file", interactive=False, elem_id="library-selected")
        with gr.Row():
            new_name = gr.Textbox(label="New name", elem_id="library-new-name")
            rename = gr.Button("Rename", elem_id="library-rename")
            delete = gr.Button("Move to trash", variant="stop")
            export = gr.Button("Export with model card", elem_id="library-export")
        download = gr.File(label="Download", file_count="multiple", elem_id="library-download")
        with gr.Row():
            upload = gr.File(file_types=[".safetensors"], type="filepath", label="Import a LoRA (.safetensors)")
        with gr.Row():
            merge_with = gr.Textbox(label="Merge: other names with weights, e.g. style:0.6", scale=2)
            merge_rank = gr.Number(0, precision=0, label="Merge to rank (0 = exact)")
            merge = gr.Button("Merge")
            resize_rank = gr.Number(8, precision=0, label="Resize to rank")
            resize = gr.Button("Resize")
            analyze = gr.Button("Analyze")
        message = gr.Markdown(elem_id="library-message")
        hash_timer = gr.Timer(2.0)
        seen_version = gr.State(-1)  # inside the tab, as every component (outside, gradio drew a tab twice)

    def said(fn, inputs, outputs):
        """A handler's event arguments, with its errors said in the message line under the tools."""
        return said_in(message, outputs, fn), inputs, outputs

    def listing(q, fam, fresh=True):
        """The table: listed again (`fresh`: a header read for new or changed files only) or, for a search, the last
        listing filtered (no file touched)."""
        items = library.search(library.entries(ws) if fresh else library.listed(ws), q or "", fam or "")
        return [e.row() for e in items], [str(e.path) for e in items]

    def find(path: str) -> library.Entry:
        """The entry for a path, looked up when the action runs: a file renamed or trashed since it was picked
        gets a clear message, not a job that fails somewhere else."""
        if not path:
            raise WorkspaceError("pick a LoRA in the table first")
        for e in library.entries(ws):
            if str(e.path) == path:
                return e
        raise WorkspaceError(f"{Path(path).name} is no longer in the library (renamed, trashed or moved); "
                             "pick it again in the table")

    def picked(e: library.Entry) -> tuple:
        return str(e.path), library.cover(ws, e), json.dumps(library.details(e), indent=1), e.name

    refresh.click(listing, [query, family], [table, paths])
    for trigger_event in (query.submit, family.change):
        trigger_event(lambda q, f: listing(q, f, fresh=False), [query, family], [table, paths])

    def hashes_landed(seen, q, fam):
        """While hashes are computed in the background, the table shows each as it lands."""
        idx = library.index(ws)
        if idx.version == seen:
            return gr.skip(), gr.skip(), seen
        return *listing(q, fam, fresh=False), idx.version

    hash_timer.tick(hashes_landed, [seen_version, query, family], [table, paths, seen_version],
                    show_progress="hidden")

    @guard
    def select(ps, evt: gr.SelectData):
        return picked(find(ps[evt.index[0]]))

    selection = [chosen, cover, info, new_name]
    table.select(select, paths, selection)

    @guard
    def do_rename(path, name, q, fam):
        out = library.rename(ws, find(path), name)
        renamed = next(e for e in library.entries(ws) if e.path == out)
        return f"renamed to {out.name}", *listing(q, fam), *picked(renamed)  # the selection follows the file

    rename.click(*said(do_rename, [chosen, new_name, query, family], [message, table, paths, *selection]))

    @guard
    def do_delete(path, q, fam):
        out = library.trash(ws, find(path))
        return f"moved to {out.parent}", *listing(q, fam)

    delete.click(*said(do_delete, [chosen, query, family], [message, table, paths]))

    @guard
    def do_export(path):
        e = find(path)
        files = library.export(ws, e)
        return files, (f"exported **{e.name}**: {Path(files[0]).name} and its model card {Path(files[1]).name} are "
                       "ready under Download (click a file there to save it)")

    export.click(*said(do_export, chosen, [download, message]))

    @guard
    def do_import(path, q, fam):
        if not path:
            return gr.skip(), gr.skip(), gr.skip()
        out = library.import_file(ws, path)
        return f"imported {out.name}", *listing(q, fam)

    upload.upload(*said(do_import, [upload, query, family], [message, table, paths]))

    @guard
    def do_merge(path, others, rank, q, fam):
        items = [(find(path), 1.0)]
        by_name = {e.name: e for e in library.entries(ws)}
        for part in [p for p in others.split() if p]:
            name, _, w = part.partition(":")
            if name not in by_name:
                raise WorkspaceError(f"no LoRA named {name!r}")
            items.append((by_name[name], float(w or 1)))
        if len(items) < 2:
            raise WorkspaceError("name at least one other LoRA to merge with")
        out = library.merge(ws, items, int(rank or 0))
        return f"wrote {out.name}", *listing(q, fam)

    merge.click(*said(do_merge, [chosen, merge_with, merge_rank, query, family], [message, table, paths]))

    @guard
    def do_resize(path, rank, q, fam):
        out = library.resize(ws, find(path), int(rank))
        return f"wrote {out.name}", *listing(q, fam)

    resize.click(*said(do_resize, [chosen, resize_rank, query, family], [message, table, paths]))
    analyze.click(*said(guard(lambda path: f"```\n{library.analyze(find(path))}\n```"), chosen, [message]))
    return {"listing": (listing, [query, family], [table, paths]), "table": table}
