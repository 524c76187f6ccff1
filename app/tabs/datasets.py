"""Datasets tab: create/select, drop images or zips in, edit captions, tags, trigger, trash, checks."""
from __future__ import annotations

import html
import json
from pathlib import Path

import gradio as gr

from .. import dataset_ops as ops
from .. import trainer_cli
from ..context import Ctx, guard, said_in

KINDS = ["", "character", "style", "concept"]


PER_PAGE = 60  # gradio copies and hashes every gallery file in the server process: one page at a time


def build(ctx: Ctx) -> dict:
    ws = ctx.ws
    names = ws.dataset_names()
    with gr.Tab("Datasets", id="datasets"):
        with gr.Row():
            ds = gr.Dropdown(names, value=names[0] if names else None, label="Dataset", scale=3, elem_id="dataset-pick",
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
        with gr.Accordion("Trigger word and repeats", open=True):
            with gr.Row():
                trigger = gr.Textbox(label="Trigger word (prepended to captions that lack it)", elem_id="trigger")
                repeats = gr.Number(1, precision=0, minimum=1, label="Repeats per epoch")
                kind = gr.Dropdown(KINDS, value="", label="Kind (picks the caption template)")
                save_settings = gr.Button("Save", elem_id="save-settings")
        with gr.Accordion("Tags", open=False, elem_id="tags-accordion"):
            with gr.Row():
                action = gr.Radio(["add", "add first", "remove", "replace"], value="add", label="Bulk action")
                tag = gr.Textbox(label="Tag", elem_id="bulk-tag")
                new_tag = gr.Textbox(label="Replace with")
                apply = gr.Button("Apply to all captions", elem_id="bulk-apply")
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

    # ---- handlers ------------------------------------------------------------------------------
    def said(fn, inputs, outputs):
        """A handler's event arguments, with its errors said in the message line above the upload box."""
        return said_in(message, outputs, fn), inputs, outputs

    def gallery_value(name, number=0, by_name="", by_caption="", only=False, flags=()):
        """One page of the dataset's images (filtered by name, caption and the check's flags), the names shown,
        the page line and the page number. The folder is scanned once per change, whatever the paging."""
        if not name:
            return gr.Gallery(value=[]), [], "", 0
        total = len(ops.images(ws, name))
        shown, number, pages, matching = ops.page(ws, name, number, PER_PAGE, by_name or "", by_caption or "",
                                                  set(flags) if only else None)
        filtered = matching != total
        info = (f"page {number + 1} of {pages}: images {number * PER_PAGE + 1 if shown else 0}-"
                f"{number * PER_PAGE + len(shown)} of {matching:,}" + (f" matching (of {total:,})" if filtered else ""))
        return (gr.Gallery(value=[(p, rel) for p, rel in shown], label=f"Images ({total:,}): click one to edit its "
                           "caption"), [rel for _, rel in shown], info, number)

    view_inputs = [find_name, find_caption, only_flagged, flagged]
    view_outputs = [gallery, names_state, page_info, page_no]

    def first_page(name, *view):  # a new filter starts at its first page
        return gallery_value(name, 0, *view)

    for box in (find_name, find_caption):
        box.submit(first_page, [ds, *view_inputs], view_outputs)
    only_flagged.change(first_page, [ds, *view_inputs], view_outputs)
    prev_page.click(lambda n, p, *v: gallery_value(n, p - 1, *v), [ds, page_no, *view_inputs], view_outputs)
    next_page.click(lambda n, p, *v: gallery_value(n, p + 1, *v), [ds, page_no, *view_inputs], view_outputs)

    @guard
    def load(name):
        # The import report and the check results belong to the dataset they were made for: cleared here.
        cleared = ([], [], [], "", [])
        if not name:
            return [], [], "", 0, "", "", [], "", 1, "", gr.Dropdown(choices=[], value=None), *cleared
        g, n, info, number = gallery_value(name)
        m = ops.settings(ws, name)
        trash = ops.trashed(ws, name)
        return (g, n, info, number, "", "", ops.tag_table(ws, name), m.trigger, m.repeats, m.kind,
                gr.Dropdown(choices=trash, value=trash[-1] if trash else None), *cleared)

    load_outputs = [gallery, names_state, page_info, page_no, image_name, caption, tags, trigger, repeats, kind,
                    trashed, import_report, files, buckets, check_summary, flagged]
    ds.change(load, ds, load_outputs)

    @guard
    def do_create(name):
        created = ops.create_dataset(ws, name)
        return gr.Dropdown(choices=ws.dataset_names(), value=created), f"created dataset **{created}**", ""

    create.click(*said(do_create, new_name, [ds, message, new_name]))

    @guard
    def do_import(name, paths, request: gr.Request):
        """Streams the CLI's count ("importing: 340 / 1000"); closing the page ends the import."""
        if not name:
            raise ValueError("create or pick a dataset first")
        if not paths:
            raise ValueError("drop some images or zip files first")
        session = getattr(request, "session_hash", None)
        keep = gr.skip()
        holder = {}
        try:
            for kind, value in ops.import_steps(ws, name, paths, track=lambda p: (holder.update(proc=p),
                                                                                   ctx.track(session, "import", p))):
                if kind == "progress":
                    yield keep, keep, keep, keep, keep, keep, html.escape(value), keep
                else:
                    done = sum(r[1] == "imported" for r in value)
                    g, n, info, number = gallery_value(name)
                    yield (value, g, n, info, number, ops.tag_table(ws, name),
                           f"imported {done} of {len(value)} file(s)", None)
        finally:
            if "proc" in holder:
                ctx.untrack(session, "import", holder["proc"])

    import_btn.click(*said(do_import, [ds, upload], [import_report, gallery, names_state, page_info, page_no, tags,
                                                     message, upload]))

    @guard
    def select(name, names, evt: gr.SelectData):
        image = names[evt.index]
        return image, ops.caption(ws, name, image)

    gallery.select(select, [ds, names_state], [image_name, caption])

    @guard
    def do_save(name, image, text):
        if not image:
            raise ValueError("click an image first")
        path = ops.save_caption(ws, name, image, text)
        return f"saved {path.name}", ops.tag_table(ws, name)

    save.click(*said(do_save, [ds, image_name, caption], [message, tags]))

    @guard
    def do_remove(name, image):
        if not image:
            raise ValueError("click an image first")
        msg = ops.remove_image(ws, name, image)
        return (msg, *load(name))

    remove.click(*said(do_remove, [ds, image_name], [message, *load_outputs]))

    @guard
    def do_restore(name, image):
        if not image:
            raise ValueError("pick a removed image")
        msg = ops.restore_image(ws, name, image)
        return (msg, *load(name))

    restore.click(*said(do_restore, [ds, trashed], [message, *load_outputs]))

    @guard
    def do_settings(name, trig, reps, k):
        m = ops.save_settings(ws, name, trig, int(reps or 1), k or "")
        return f"saved: trigger {m.trigger or '(none)'}, {m.repeats} repeat(s)"

    save_settings.click(*said(do_settings, [ds, trigger, repeats, kind], [message]))

    @guard
    def do_apply(name, act, t, new, image):
        msg = ops.bulk_edit(ws, name, act, t, new)
        # The open caption is shown as it is now: saving the old text would undo the bulk edit for that image.
        return msg, ops.tag_table(ws, name), ops.caption(ws, name, image) if image else gr.skip()

    apply.click(*said(do_apply, [ds, action, tag, new_tag, image_name], [message, tags, caption]))

    @guard
    def do_check(name, res, model, request: gr.Request):
        """Every file decoded and checked in a CLI process whose count is shown as it goes; a second Check from the
        same page replaces the first, and closing the page ends it."""
        if not name:
            raise ValueError("pick a dataset first")
        session = getattr(request, "session_hash", None)
        proc = trainer_cli.start(*ops.check_command(ws, name, int(res or 512), model=model))
        ctx.track(session, "check", proc)
        keep = gr.skip()
        try:
            last = ""
            for line in proc.stderr:
                if line.strip():
                    last = line.strip()
                    yield keep, keep, html.escape(last.removeprefix("lora-studio: ")), keep
            out = trainer_cli.result(proc)
            if proc.returncode != 0:
                yield keep, keep, ("**stopped** (a newer check replaced it)" if proc.returncode < 0 else
                                   f"**Not checked:** {html.escape(last.removeprefix('lora-studio: error: '))}"), keep
                return
            rows, table, text, flags = ops.check_result(ws, name, json.loads(out))
            yield rows, table, text, flags
        finally:
            ctx.untrack(session, "check", proc)

    check.click(do_check, [ds, resolution, check_model], [files, buckets, check_summary, flagged],
                api_name="check_dataset")

    @guard
    def do_caption(name, tmpl, trig):
        msg = ops.auto_caption(ws, name, template=tmpl, trigger=trig)
        return msg, *load(name)

    caption_btn.click(*said(do_caption, [ds, template, trigger], [message, *load_outputs]))

    # ---- captioning models: preview, apply (with progress and Stop), undo ---------------------------------
    spec_inputs = [cap_kind, model, cap_tags, instruction, general, character, blacklist, overwrite, trigger]

    def spec(kind, mdl, tg, instr, gen, char, black, over, trig):
        return ops.CaptionSpec(ops.CAPTIONERS.get(kind, "auto"), mdl or "", tg or "", instr or "", float(gen),
                               float(char), black or "", bool(over), trig or "")

    def suggest(kind, current):
        """A model to start from for the picked captioner, unless the user typed their own."""
        if current and current not in ops.SUGGESTED.values():
            return gr.skip()
        return ops.SUGGESTED.get(ops.CAPTIONERS.get(kind, "auto"), "")

    cap_kind.input(suggest, [cap_kind, model], model)  # only when the user picks one, never on a load

    @guard
    def do_preview(name, *values):
        if not name:
            raise ValueError("pick a dataset first")
        rows = ops.caption_preview(ws, name, spec(*values))
        return (f"previewed {len(rows)} image(s); nothing written yet. **Apply to all** writes captions like these",
                rows)

    cap_preview.click(said_in(cap_status, [cap_status, cap_rows], do_preview), [ds, *spec_inputs],
                      [cap_status, cap_rows], show_progress_on=cap_status)

    running: dict = {}  # dataset -> the captioning process, so Stop can end it

    def do_apply(name, *values):
        """Runs the CLI, showing its progress lines; Stop ends it between two writes (each caption is written
        atomically, and every caption it replaces was backed up before the first one)."""
        try:
            if not name:
                raise ValueError("pick a dataset first")
            if name in running:
                raise ValueError(f"{name} is being captioned already")
            args = ops.caption_command(ws, name, spec(*values))
        except (ValueError, OSError) as e:
            yield f"**Not done:** {html.escape(str(e))}", gr.skip()
            return
        proc = running[name] = trainer_cli.start(*args)
        last = "loading the model ..."
        try:
            yield last, gr.skip()
            for line in proc.stderr:
                line = line.strip()
                if line:
                    last = line
                    yield html.escape(line), gr.skip()
            out = trainer_cli.result(proc)
        finally:
            running.pop(name, None)
            backup = Path(args[args.index("--backup") + 1])
            if backup.is_dir() and not any(backup.iterdir()):
                backup.rmdir()  # nothing was replaced: no empty folder in the trash
        if proc.returncode != 0:
            stopped = proc.returncode < 0
            yield ("**stopped**; the captions written so far stay (Undo puts the old ones back)" if stopped else
                   f"**Not done:** {html.escape(last.removeprefix('lora-studio: error: '))}"), gr.skip()
            return
        done = json.loads(out)
        rows = [[Path(p).name, c] for p, c in done["captions"].items()]
        yield f"captioned {len(rows)} image(s) with {html.escape(done['captioner'])}" + \
            ("; **Undo** puts the replaced captions back" if done["backup"] else ""), rows

    cap_apply.click(do_apply, [ds, *spec_inputs], [cap_status, cap_rows]).then(load, ds, load_outputs)

    def do_stop(name):
        proc = running.get(name)
        if proc is None:
            return "nothing is being captioned"
        proc.terminate()
        return "stopping ..."

    cap_stop.click(do_stop, ds, cap_status)

    @guard
    def do_undo(name):
        return ops.undo_captioning(ws, name), "", [], *load(name)  # the last run's table is not what is there now

    cap_undo.click(*said(do_undo, [ds], [message, cap_status, cap_rows, *load_outputs]))
    return {"dataset": ds, "load": (load, load_outputs), "resolution": resolution, "model": check_model}
