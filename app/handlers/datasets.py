"""The Datasets tab's handlers, each a method that can be called and tested without a page: plain values in, the
tab's outputs back (gradio updates where a component changes more than its value). `app/tabs/datasets.py` lays the
tab out and wires these to its components."""
from __future__ import annotations

import html
import json
from pathlib import Path

import gradio as gr

from .. import dataset_ops as ops
from .. import trainer_cli
from ..context import Ctx, guard

PER_PAGE = 60  # gradio copies and hashes every gallery file in the server process: one page at a time


class DatasetsHandlers:
    def __init__(self, ctx: Ctx):
        self.ctx, self.ws = ctx, ctx.ws
        self.running: dict = {}  # dataset -> the captioning process, so Stop can end it

    # ---- the gallery, one page at a time ----------------------------------------------------------------------
    def gallery_value(self, name, number=0, by_name="", by_caption="", only=False, flags=()):
        """One page of the dataset's images (filtered by name, caption and the check's flags), the names shown,
        the page line and the page number. The folder is scanned once per change, whatever the paging."""
        if not name:
            return gr.Gallery(value=[]), [], "", 0
        total = len(ops.images(self.ws, name))
        shown, number, pages, matching = ops.page(self.ws, name, number, PER_PAGE, by_name or "", by_caption or "",
                                                  set(flags) if only else None)
        filtered = matching != total
        info = (f"page {number + 1} of {pages}: images {number * PER_PAGE + 1 if shown else 0}-"
                f"{number * PER_PAGE + len(shown)} of {matching:,}" + (f" matching (of {total:,})" if filtered else ""))
        return (gr.Gallery(value=[(p, rel) for p, rel in shown], label=f"Images ({total:,}): click one to edit its "
                           "caption"), [rel for _, rel in shown], info, number)

    def first_page(self, name, *view):  # a new filter starts at its first page
        return self.gallery_value(name, 0, *view)

    def previous_page(self, name, number, *view):
        return self.gallery_value(name, number - 1, *view)

    def next_page(self, name, number, *view):
        return self.gallery_value(name, number + 1, *view)

    @guard
    def load(self, name):
        """Everything the tab shows of a dataset; the import report and the check results belong to the dataset they
        were made for, so they are cleared."""
        cleared = ([], [], [], "", [])
        if not name:
            return [], [], "", 0, "", "", [], "", 1, "", gr.Dropdown(choices=[], value=None), *cleared
        g, n, info, number = self.gallery_value(name)
        m = ops.settings(self.ws, name)
        trash = ops.trashed(self.ws, name)
        return (g, n, info, number, "", "", ops.tag_table(self.ws, name), m.trigger, m.repeats, m.kind,
                gr.Dropdown(choices=trash, value=trash[-1] if trash else None), *cleared)

    # ---- datasets, images and captions ------------------------------------------------------------------------
    @guard
    def do_create(self, name):
        created = ops.create_dataset(self.ws, name)
        return gr.Dropdown(choices=self.ws.dataset_names(), value=created), f"created dataset **{created}**", ""

    @guard
    def do_import(self, name, paths, request: gr.Request):
        """Streams the CLI's count ("importing: 340 / 1000"); closing the page ends the import."""
        if not name:
            raise ValueError("create or pick a dataset first")
        if not paths:
            raise ValueError("drop some images or zip files first")
        session = getattr(request, "session_hash", None)
        keep = gr.skip()
        holder = {}

        def track(proc):
            holder["proc"] = proc
            self.ctx.track(session, "import", proc)

        try:
            for kind, value in ops.import_steps(self.ws, name, paths, track=track):
                if kind == "progress":
                    yield keep, keep, keep, keep, keep, keep, html.escape(value), keep
                else:
                    done = sum(r[1] == "imported" for r in value)
                    g, n, info, number = self.gallery_value(name)
                    yield (value, g, n, info, number, ops.tag_table(self.ws, name),
                           f"imported {done} of {len(value)} file(s)", None)
        finally:
            if "proc" in holder:
                self.ctx.untrack(session, "import", holder["proc"])

    @guard
    def select(self, name, names, evt: gr.SelectData):
        image = names[evt.index]
        return image, ops.caption(self.ws, name, image)

    @guard
    def do_save(self, name, image, text):
        if not image:
            raise ValueError("click an image first")
        path = ops.save_caption(self.ws, name, image, text)
        return f"saved {path.name}", ops.tag_table(self.ws, name)

    @guard
    def do_remove(self, name, image):
        if not image:
            raise ValueError("click an image first")
        msg = ops.remove_image(self.ws, name, image)
        return (msg, *self.load(name))

    @guard
    def do_restore(self, name, image):
        if not image:
            raise ValueError("pick a removed image")
        msg = ops.restore_image(self.ws, name, image)
        return (msg, *self.load(name))

    @guard
    def do_settings(self, name, trig, reps, k):
        m = ops.save_settings(self.ws, name, trig, int(reps or 1), k or "")
        return f"saved: trigger {m.trigger or '(none)'}, {m.repeats} repeat(s)"

    @guard
    def do_apply(self, name, act, t, new, image):
        msg = ops.bulk_edit(self.ws, name, act, t, new)
        # The open caption is shown as it is now: saving the old text would undo the bulk edit for that image.
        return msg, ops.tag_table(self.ws, name), ops.caption(self.ws, name, image) if image else gr.skip()

    @guard
    def do_check(self, name, res, model, request: gr.Request):
        """Every file decoded and checked in a CLI process whose count is shown as it goes; a second Check from the
        same page replaces the first, and closing the page ends it."""
        if not name:
            raise ValueError("pick a dataset first")
        session = getattr(request, "session_hash", None)
        proc = trainer_cli.start(*ops.check_command(self.ws, name, int(res or 512), model=model))
        self.ctx.track(session, "check", proc)
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
            rows, table, text, flags = ops.check_result(self.ws, name, json.loads(out))
            yield rows, table, text, flags
        finally:
            self.ctx.untrack(session, "check", proc)

    @guard
    def do_caption(self, name, tmpl, trig):
        msg = ops.auto_caption(self.ws, name, template=tmpl, trigger=trig)
        return msg, *self.load(name)

    # ---- captioning models: preview, apply (with progress and Stop), undo --------------------------------------
    @staticmethod
    def spec(kind, mdl, tg, instr, gen, char, black, over, trig):
        return ops.CaptionSpec(ops.CAPTIONERS.get(kind, "auto"), mdl or "", tg or "", instr or "", float(gen),
                               float(char), black or "", bool(over), trig or "")

    @staticmethod
    def suggest(kind, current):
        """A model to start from for the picked captioner, unless the user typed their own."""
        if current and current not in ops.SUGGESTED.values():
            return gr.skip()
        return ops.SUGGESTED.get(ops.CAPTIONERS.get(kind, "auto"), "")

    @guard
    def do_preview(self, name, *values):
        if not name:
            raise ValueError("pick a dataset first")
        rows = ops.caption_preview(self.ws, name, self.spec(*values))
        return (f"previewed {len(rows)} image(s); nothing written yet. **Apply to all** writes captions like these",
                rows)

    def do_caption_apply(self, name, *values):
        """Runs the CLI, showing its progress lines; Stop ends it between two writes (each caption is written
        atomically, and every caption it replaces was backed up before the first one)."""
        try:
            if not name:
                raise ValueError("pick a dataset first")
            if name in self.running:
                raise ValueError(f"{name} is being captioned already")
            args = ops.caption_command(self.ws, name, self.spec(*values))
        except (ValueError, OSError) as e:
            yield f"**Not done:** {html.escape(str(e))}", gr.skip()
            return
        proc = self.running[name] = trainer_cli.start(*args)
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
            self.running.pop(name, None)
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

    def do_stop(self, name):
        proc = self.running.get(name)
        if proc is None:
            return "nothing is being captioned"
        proc.terminate()
        return "stopping ..."

    @guard
    def do_undo(self, name):
        return ops.undo_captioning(self.ws, name), "", [], *self.load(name)  # the last run's table is not there now
