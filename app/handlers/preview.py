"""The Preview tab's handlers, each a method that can be called and tested without a page: the slots' values
arrive flat, six per slot (file, weight, separate, UNet weight, text-encoder weight, on). Rendering happens in the
preview worker, which keeps the pipeline and loaded LoRAs warm. `app/tabs/preview.py` lays the tab out and wires
these to its components."""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import gradio as gr
from PIL import Image

from trainer.preview import grids

from .. import confine, library, prompt_tags
from .. import train_form as form
from ..context import Ctx, guard
from ..workspace import WorkspaceError

CHECKPOINTS = "checkpoints of LoRA 1 x its weights (X)"  # which checkpoint of a run to keep, at one seed
SLOTS = 3
SAMPLERS = ["ddim", "euler", "euler_a", "dpm++"]


def lora_choices(ws) -> list[tuple[str, str]]:
    return [(f"{e.name} ({e.source})", str(e.path)) for e in library.entries(ws)]


def parse_weights(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"weights {text!r} must be numbers separated by commas, e.g. 0, 0.5, 1") from None
    if not values or len(values) > 6:
        raise ValueError("give 1 to 6 weights, e.g. 0, 0.5, 1")
    return values


class PreviewHandlers:
    def __init__(self, ctx: Ctx):
        self.ctx, self.ws = ctx, ctx.ws

    def request(self, b, pr, neg, sd, st, cf, sz, smp, *slot_values):
        """The worker's render request from the form: paths confined to the workspace, the base model resolved."""
        ws = self.ws
        loras = []
        for i in range(SLOTS):
            f, w, sep, wu, wt, on = slot_values[i * 6:(i + 1) * 6]
            if f:
                loras.append({"path": str(confine.path(ws, f"LoRA {i + 1}", f)), "weight": float(w),
                              "unet": float(wu) if sep else None, "text_encoder": float(wt) if sep else None,
                              "enabled": bool(on)})
        base_model = confine.model(ws, "base model", form.model_source(b))
        return {"base": base_model, "loras": loras, "prompt": pr, "negative": neg, "seed": int(sd or 0),
                "steps": int(st), "guidance": float(cf), "size": int(sz) or None, "sampler": smp}

    @staticmethod
    def model_defaults(b):
        """Steps and guidance for a newly picked base: the model's own (Z-Image Turbo 9 steps without CFG, Flux.1
        dev's distilled guidance 3.5, SD3 CFG 5 ...), read torch-free; the sliders then show what will render."""
        from trainer.models.info import peek_sampling

        try:
            steps, guidance = peek_sampling(form.model_source(b))
        except (OSError, ValueError):
            return gr.skip(), gr.skip()
        return steps, guidance

    def apply_tags(self, pr, slot_values):
        """Move `<lora:name:w>` tags into the slots; returns the clean prompt and the new slot values."""
        clean, tags = prompt_tags.split(pr)
        values = list(slot_values)
        if not tags:
            return pr, values
        by_name = {}
        for e in library.entries(self.ws):
            by_name.setdefault(e.name, str(e.path))
            by_name.setdefault(e.path.stem, str(e.path))
        for name, weight, te in tags:
            if name not in by_name:
                raise WorkspaceError(f"no LoRA named {name!r} in the library (prompt tag <lora:{name}:...>)")
            path = by_name[name]
            files = [values[i * 6] for i in range(SLOTS)]
            i = files.index(path) if path in files else next((k for k, f in enumerate(files) if not f), None)
            if i is None:
                raise WorkspaceError(f"all {SLOTS} LoRA slots are in use; clear one for {name}")
            values[i * 6:(i + 1) * 6] = [path, weight, te is not None, weight, te if te is not None else weight, True]
        return clean, values

    @staticmethod
    def shown(progress, prefix=""):
        """The worker's phase on the busy image ("loading the base model", "image 2 of 4: denoising: step 3 of 20")."""
        return lambda text: progress(None, desc=f"{prefix}{text}") if text else None

    @guard
    def do_generate(self, b, pr, neg, sd, st, cf, sz, smp, *slot_values, progress=gr.Progress()):
        pr, values = self.apply_tags(pr, slot_values)
        reply = self.ctx.render("generate", request=self.request(b, pr, neg, sd, st, cf, sz, smp, *values),
                                on_progress=self.shown(progress))
        return (reply["image"], json.dumps(reply["settings"], indent=1), pr, *values)

    @guard
    def do_compare(self, m, x, y, b, pr, neg, sd, st, cf, sz, smp, *slot_values, progress=gr.Progress()):
        """Cell by cell: the sheet is shown after each one, so a grid fills in instead of arriving at the end."""
        pr, values = self.apply_tags(pr, slot_values)
        req = self.request(b, pr, neg, sd, st, cf, sz, smp, *values)
        if m == CHECKPOINTS:
            if not req["loras"]:
                raise WorkspaceError("choose a run's LoRA in slot 1 to compare its checkpoints")
            found = [str(confine.path(self.ws, "checkpoint", p))
                     for p in library.run_checkpoints(self.ws, req["loras"][0]["path"])]
            columns, cells = len(parse_weights(x)), grids.checkpoint_cells(found, parse_weights(x))
            title = f"{Path(req['loras'][0]['path']).stem}: checkpoints (rows) at each weight (columns)"
        elif m.startswith("X/Y"):
            columns, cells = len(parse_weights(x)), grids.xy_cells(req["loras"], parse_weights(x), parse_weights(y))
            title = grids.xy_title(req["loras"])
        else:
            cells = grids.compare_cells(req["loras"])
            columns, title = len(cells), f"the base, each LoRA alone and their mix, seed {req['seed']}"
        labels, images, sheets = [label for label, _ in cells], [], []
        folder = self.ctx.preview.out_dir / "grids"
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"  # two compares in one second differ
        for i, (_, loras) in enumerate(cells):
            reply = self.ctx.render("generate", request={**req, "loras": loras},
                                    on_progress=self.shown(progress, f"image {i + 1} of {len(cells)}: "))
            with Image.open(reply["image"]) as im:
                images.append(im.convert("RGB"))
            sheet = folder / f"{stem}-{i + 1}-of-{len(cells)}.png"
            grids.grid(images, labels, columns, cells=len(cells), title=title).save(sheet)
            sheets.append(sheet)
            yield (str(sheet), pr, *values) if i == 0 else (str(sheet), gr.skip(), *[gr.skip()] * len(values))
        for partial in sheets[:-1]:  # the finished sheet is the one kept
            partial.unlink(missing_ok=True)

    @guard
    def do_drift(self, b, *slot_values):
        out = {}
        for i in range(SLOTS):
            f = slot_values[i * 6]
            if f:
                base_model = confine.model(self.ws, "base model", form.model_source(b))
                lora = str(confine.path(self.ws, f"LoRA {i + 1}", f))
                out[f] = self.ctx.render("drift", request={"base": base_model}, lora=lora)["drift"]
        if not out:
            raise ValueError("choose a LoRA first")
        return drift_text(out)

    def triggers(self, *slot_values):
        words = []
        paths = {slot_values[i * 6] for i in range(SLOTS) if slot_values[i * 6]}
        for e in library.entries(self.ws):
            if str(e.path) in paths and e.trigger:
                words += [t.strip() for t in e.trigger.split(",") if t.strip()]
        return gr.Dropdown(choices=sorted(set(words)), value=words[0] if words else None)

    @staticmethod
    def insert_trigger(t, p):
        return (f"{t}, {p}" if p else t) if t else p

    @guard
    def do_drop(self, path, *slot_values):
        if not path:
            return (gr.skip(),) * SLOTS
        added = library.import_file(self.ws, path)
        choices = lora_choices(self.ws)
        files = [slot_values[i * 6] for i in range(SLOTS)]
        free = next((i for i, f in enumerate(files) if not f), 0)
        return tuple(gr.Dropdown(choices=choices, value=str(added) if i == free else files[i]) for i in range(SLOTS))

    def refresh(self, *files_and_settings):
        """The LoRAs there are now; a slot whose file was renamed or trashed meanwhile is emptied rather than
        left pointing at a path that a later Generate would fail on, and the last settings say which of their
        files are gone since."""
        *files, shown_settings = files_and_settings
        choices = lora_choices(self.ws)
        there = {path for _, path in choices}
        return (*(gr.Dropdown(choices=choices, value=f if f in there else None) for f in files),
                gone_since(shown_settings))


def drift_text(found: dict[str, float]) -> str:
    """The Drift button's answer, for people: each LoRA by name with its figure, and what the figure means (it was
    path-keyed JSON in the settings box)."""
    rows = "\n".join(f"| {Path(path).stem} | {value:.4f} |" for path, value in found.items())
    return ("**Drift** on the embedded model's trigger-free scenes: the mean pixel change (0 to 1) against the base "
            "at the same seeds. Lower keeps the base model's other subjects intact; runs recommend checkpoints "
            "within 0.09 here.\n\n| LoRA | drift |\n| --- | --- |\n" + rows)


def gone_since(text: str | None):
    """The settings JSON with each LoRA file that no longer exists marked as renamed or moved since the render."""
    if not text:
        return gr.skip()
    try:
        data = json.loads(text)
    except ValueError:
        return gr.skip()
    changed = False
    for slot in data.get("loras", []) if isinstance(data, dict) else []:
        path = slot.get("path", "")
        if path and not slot.get("since") and not Path(path).exists():
            slot["since"] = "renamed, moved or trashed since this render"
            changed = True
    return json.dumps(data, indent=1) if changed else gr.skip()
