"""Datasets tab: create/select, drop images or zips in, edit captions, tags, trigger, trash, checks."""
from __future__ import annotations

import gradio as gr

from .. import dataset_ops as ops
from ..context import Ctx, said_in
from ..handlers.datasets import DatasetsHandlers

KINDS = ["", "character", "style", "concept"]


def build(ctx: Ctx) -> dict:
    h = DatasetsHandlers(ctx)
    names = ctx.ws.dataset_names()
    with gr.Tab("Datasets", id="datasets"):
        with gr.Row():
            ds = gr.Dropdown(names, value=ctx.ws.latest_dataset(), label="Dataset", scale=3, elem_id="dataset-pick",
                             allow_custom_value=True)  # datasets made since start-up; handlers check the name
            new_name = gr.Textbox(label="New dataset", placeholder="name", scale=2, elem_id="new-dataset")
            create = gr.Button("Create", scale=1, elem_id="create-dataset")
        message = gr.Markdown(elem_id="dataset-message")
        with gr.Row():
            upload = gr.File(file_count="multiple", file_types=["image", ".zip", ".txt"], type="filepath",
                             label="Drop images (with their .txt captions) or .zip files here", elem_id="upload")
            with gr.Column(scale=0, min_width=160):
                import_btn = gr.Button("Import", variant="primary", elem_id="import")
        import_report = gr.Dataframe(headers=["file", "result", "detail"], interactive=False, label="Import report",
                                     elem_id="import-report")
        names_state = gr.State([])
        page_no = gr.State(0)
        flagged = gr.State([])  # files the last check excluded or warned about, for "only flagged"
        with gr.Row():
            find_name = gr.Textbox(label="File name contains", elem_id="find-name", scale=2)
            find_caption = gr.Textbox(label="Caption contains", elem_id="find-caption", scale=2)
            only_flagged = gr.Checkbox(False, label="Only files the check flagged", elem_id="only-flagged")
            prev_page = gr.Button("◀ Previous", elem_id="prev-page", size="sm")
            next_page = gr.Button("Next ▶", elem_id="next-page", size="sm")
        page_info = gr.Markdown(elem_id="page-info")
        with gr.Row():
            gallery = gr.Gallery(label="Images: click one to edit its caption", columns=6, height=380,
                                 allow_preview=False, elem_id="gallery", scale=3)
            with gr.Column(scale=2):
                image_name = gr.Textbox(label="Image", interactive=False, elem_id="image-name")
                caption = gr.Textbox(label="Caption", lines=3, elem_id="caption")
                with gr.Row():
                    save = gr.Button("Save caption", variant="primary", elem_id="save-caption")
                    remove = gr.Button("Move to trash", variant="stop", elem_id="remove-image")
                caption_msg = gr.Markdown(elem_id="caption-message")  # what Save and Move to trash say, beside them
        with gr.Accordion("Trigger word and repeats", open=True):
            with gr.Row():
                trigger = gr.Textbox(label="Trigger word (prepended to captions that lack it)", elem_id="trigger")
                repeats = gr.Number(1, precision=0, minimum=1, label="Repeats per epoch")
                kind = gr.Dropdown(KINDS, value="", label="Kind (picks the caption template)")
                save_settings = gr.Button("Save", elem_id="save-settings")
            settings_msg = gr.Markdown(elem_id="settings-message")
        with gr.Accordion("Tags", open=False, elem_id="tags-accordion"):
            with gr.Row():
                action = gr.Radio(["add", "add first", "remove", "replace"], value="add", label="Bulk action")
                tag = gr.Textbox(label="Tag", elem_id="bulk-tag")
                new_tag = gr.Textbox(label="Replace with")
                apply = gr.Button("Apply to all captions", elem_id="bulk-apply")
            tags_msg = gr.Markdown(elem_id="tags-message")
            tags = gr.Dataframe(headers=["tag", "images"], interactive=False, label="Tag frequency")
        with gr.Accordion("Trash", open=False):
            with gr.Row():
                trashed = gr.Dropdown([], label="Removed images", allow_custom_value=False)
                restore = gr.Button("Restore")
        with gr.Accordion("Validation and buckets", open=False):
            with gr.Row():
                resolution = gr.Number(512, precision=0, minimum=32, elem_id="check-resolution",
                                       label="Training resolution (follows the Train tab's model and preset)")
                check = gr.Button("Check every file and caption", elem_id="check-dataset")
            check_model = gr.State("")  # the Train tab's base model: its tokenizer counts caption tokens
            check_summary = gr.Markdown(elem_id="check-summary")
            files = gr.Dataframe(headers=["file", "status", "why", "size", "bucket"], interactive=False,
                                 elem_id="check-files")
            buckets = gr.Dataframe(headers=["bucket", "images"], interactive=False)
        with gr.Accordion("Caption images", open=False, elem_id="captioning"):
            with gr.Row():
                template = gr.Dropdown(["character", "style", "concept"], value="character", label="Template")
                caption_btn = gr.Button("Caption uncaptioned images from the template")
            with gr.Row():
                cap_kind = gr.Dropdown(list(ops.CAPTIONERS), value=next(iter(ops.CAPTIONERS)), label="Captioner",
                                       elem_id="captioner-kind")
                model = gr.Textbox(ops.SUGGESTED["wd"], elem_id="captioner-model", scale=2,
                                   label="Model: a local folder or a Hub id (downloaded once on this machine)")
                cap_tags = gr.Textbox(label="Also tag with a WD tagger (optional): captions become 'tags, sentence'",
                                      elem_id="captioner-tags")
            with gr.Row():
                instruction = gr.Textbox(label="Instruction (chat models)", lines=2, elem_id="captioner-instruction",
                                         placeholder="Write one descriptive caption for this image ...")
                general = gr.Slider(0.05, 0.95, 0.35, step=0.05, label="Tags from score (general)")
                character = gr.Slider(0.05, 0.99, 0.85, step=0.01, label="Tags from score (character)")
                blacklist = gr.Textbox(label="Never write these tags (comma-separated)")
            overwrite = gr.Checkbox(False, label="Also re-caption images that have captions (the old ones are kept: "
                                                 "Undo puts them back)", elem_id="captioner-overwrite")
            with gr.Row():
                cap_preview = gr.Button(f"Preview on the first {ops.PREVIEW_IMAGES}", elem_id="caption-preview")
                cap_apply = gr.Button("Apply to all", variant="primary", elem_id="caption-apply")
                cap_stop = gr.Button("Stop", variant="stop", elem_id="caption-stop")
                cap_undo = gr.Button("Undo the last captioning", elem_id="caption-undo")
            cap_status = gr.Markdown(elem_id="caption-status")
            cap_rows = gr.Dataframe(headers=["image", "caption"], interactive=False, wrap=True,
                                    elem_id="caption-preview-table")

    # ---- wiring: each handler is a method of DatasetsHandlers (app/handlers/datasets.py) ------------------
    def said(fn, inputs, outputs, where=message):
        """A handler's event arguments, with its errors said in `where`: the message line beside the button pressed
        (the one above the upload box for creating and importing; 'click an image first' was said there for the
        caption editor's buttons, far from them)."""
        return said_in(where, outputs, fn), inputs, outputs

    view_inputs = [find_name, find_caption, only_flagged, flagged]
    view_outputs = [gallery, names_state, page_info, page_no]
    for box in (find_name, find_caption):
        box.submit(h.first_page, [ds, *view_inputs], view_outputs)
    only_flagged.change(h.first_page, [ds, *view_inputs], view_outputs)
    prev_page.click(h.previous_page, [ds, page_no, *view_inputs], view_outputs)
    next_page.click(h.next_page, [ds, page_no, *view_inputs], view_outputs)

    load_outputs = [gallery, names_state, page_info, page_no, image_name, caption, tags, trigger, repeats, kind,
                    trashed, import_report, files, buckets, check_summary, flagged]
    ds.change(h.load, ds, load_outputs)
    create.click(*said(h.do_create, new_name, [ds, message, new_name]))
    import_btn.click(*said(h.do_import, [ds, upload], [import_report, gallery, names_state, page_info, page_no,
                                                          tags, message, upload]))
    gallery.select(h.select, [ds, names_state], [image_name, caption])
    save.click(*said(h.do_save, [ds, image_name, caption], [caption_msg, tags], caption_msg))
    remove.click(*said(h.do_remove, [ds, image_name], [caption_msg, *load_outputs], caption_msg))
    restore.click(*said(h.do_restore, [ds, trashed], [message, *load_outputs]))
    save_settings.click(*said(h.do_settings, [ds, trigger, repeats, kind], [settings_msg], settings_msg))
    apply.click(*said(h.do_apply, [ds, action, tag, new_tag, image_name], [tags_msg, tags, caption], tags_msg))
    check.click(h.do_check, [ds, resolution, check_model], [files, buckets, check_summary, flagged],
                api_name="check_dataset")
    caption_btn.click(*said(h.do_caption, [ds, template, trigger], [message, *load_outputs]))

    spec_inputs = [cap_kind, model, cap_tags, instruction, general, character, blacklist, overwrite, trigger]
    cap_kind.input(h.suggest, [cap_kind, model], model)  # only when the user picks one, never on a load
    cap_preview.click(said_in(cap_status, [cap_status, cap_rows], h.do_preview), [ds, *spec_inputs],
                      [cap_status, cap_rows], show_progress_on=cap_status)
    cap_apply.click(h.do_caption_apply, [ds, *spec_inputs], [cap_status, cap_rows]).then(h.load, ds, load_outputs)
    cap_stop.click(h.do_stop, ds, cap_status)
    cap_undo.click(*said(h.do_undo, [ds], [message, cap_status, cap_rows, *load_outputs]))
    return {"dataset": ds, "load": (h.load, load_outputs), "resolution": resolution, "model": check_model}
