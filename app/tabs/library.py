"""Library tab: every LoRA in the workspace with cover, family, rank, triggers, settings, size and
hash; search, rename, trash, export with its model card, import, and merge/resize/analyze. The handlers are
LibraryHandlers' methods (app/handlers/library.py); this lays the tab out and wires them."""
from __future__ import annotations

import gradio as gr

from .. import library
from ..context import Ctx, said_in
from ..handlers.library import LibraryHandlers


def build(ctx: Ctx) -> dict:
    h = LibraryHandlers(ctx)
    with gr.Tab("Library", id="library"):
        with gr.Row():
            query = gr.Textbox(label="Search name or trigger", scale=3)
            family = gr.Dropdown(["", "sd1", "sd2", "sdxl", "sd3", "flux", "zimage"], value="", label="Family")
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

    # ---- wiring: each handler is a method of LibraryHandlers ----------------------------------------------
    def said(fn, inputs, outputs):
        """A handler's event arguments, with its errors said in the message line under the tools."""
        return said_in(message, outputs, fn), inputs, outputs

    refresh.click(h.listing, [query, family], [table, paths])
    for trigger_event in (query.submit, family.change):
        trigger_event(h.search, [query, family], [table, paths])
    hash_timer.tick(h.hashes_landed, [seen_version, query, family], [table, paths, seen_version],
                    show_progress="hidden")
    selection = [chosen, cover, info, new_name]
    table.select(h.select, paths, selection)
    rename.click(*said(h.do_rename, [chosen, new_name, query, family], [message, table, paths, *selection]))
    delete.click(*said(h.do_delete, [chosen, query, family], [message, table, paths]))
    export.click(*said(h.do_export, chosen, [download, message]))
    upload.upload(*said(h.do_import, [upload, query, family], [message, table, paths]))
    merge.click(*said(h.do_merge, [chosen, merge_with, merge_rank, query, family], [message, table, paths]))
    resize.click(*said(h.do_resize, [chosen, resize_rank, query, family], [message, table, paths]))
    analyze.click(*said(h.analyze, chosen, [message]))
    return {"listing": (h.listing, [query, family], [table, paths]), "table": table}
