"""Preview tab: mix up to three LoRAs at chosen weights over a base model, generate and compare.
Rendering happens in the preview worker, which keeps the pipeline and loaded LoRAs warm."""
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


def build(ctx: Ctx) -> dict:
    ws = ctx.ws
    with gr.Tab("Preview", id="preview") as tab:
        with gr.Row():
            base = gr.Dropdown([form.EMBEDDED], value=form.EMBEDDED, allow_custom_value=True, scale=3,
                               label="Base model", elem_id="preview-base")
            drop = gr.File(file_types=[".safetensors"], type="filepath", label="Drop a LoRA file (added to the library)",
                           elem_id="preview-drop", scale=2)
        slots = []
        for i in range(SLOTS):
            with gr.Row(elem_id=f"slot{i}"):
                f = gr.Dropdown(lora_choices(ws), value=None, label=f"LoRA {i + 1}", scale=3, elem_id=f"slot{i}-file")
                w = gr.Slider(-2, 2, value=1.0, step=0.05, label="weight", scale=2, elem_id=f"slot{i}-weight")
                sep = gr.Checkbox(False, label="separate UNet / text encoder", elem_id=f"slot{i}-sep")
                wu = gr.Slider(-2, 2, value=1.0, step=0.05, label="UNet", elem_id=f"slot{i}-unet")
                wt = gr.Slider(-2, 2, value=1.0, step=0.05, label="text encoder", elem_id=f"slot{i}-te")
                on = gr.Checkbox(True, label="on", elem_id=f"slot{i}-on")
            slots.append((f, w, sep, wu, wt, on))
        with gr.Row():
            prompt = gr.Textbox(label="Prompt (A1111 <lora:name:0.8> tags work too)", lines=2, scale=4,
                                elem_id="preview-prompt")
            with gr.Column(scale=1):
                trigger = gr.Dropdown([], label="Trigger words of the chosen LoRAs", elem_id="triggers")
                insert = gr.Button("Insert trigger")
        negative = gr.Textbox(label="Negative prompt")
        with gr.Row():
            seed = gr.Number(0, precision=0, label="Seed")
            steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
            cfg = gr.Slider(0, 20, value=4.0, step=0.5, label="CFG")
            size = gr.Number(0, precision=0, label="Size (0 = native)")
            sampler = gr.Dropdown(SAMPLERS, value="ddim", label="Sampler")
        with gr.Row():
            generate = gr.Button("Generate", variant="primary", elem_id="generate")
            mode = gr.Radio(["base / each / mix", "X/Y over LoRA 1 and 2 weights", CHECKPOINTS],
                            value="base / each / mix", label="Compare", elem_id="compare-mode")
            xs = gr.Textbox("0, 0.5, 1", label="LoRA 1 weights (X)", elem_id="xy-x")
            ys = gr.Textbox("0, 0.5, 1", label="LoRA 2 weights (Y)", elem_id="xy-y")
            compare = gr.Button("Compare", elem_id="compare")
            drift_btn = gr.Button("Drift (embedded model)", elem_id="drift")
        with gr.Row():
            image = gr.Image(label="Image", type="filepath", elem_id="preview-image", height=320)
            grid = gr.Image(label="Compare grid", type="filepath", elem_id="compare-grid", height=320)
        settings = gr.Code(label="Exact settings used", language="json", elem_id="preview-settings")

    slot_inputs = [c for s in slots for c in s]

    def request(b, pr, neg, sd, st, cf, sz, smp, *slot_values):
        loras = []
        for i in range(SLOTS):
            f, w, sep, wu, wt, on = slot_values[i * 6:(i + 1) * 6]
            if f:
                loras.append({"path": str(confine.path(ws, f"LoRA {i + 1}", f)), "weight": float(w), "unet": float(wu) if sep else None,
                              "text_encoder": float(wt) if sep else None, "enabled": bool(on)})
        base_model = confine.model(ws, "base model", form.model_source(b))
        return {"base": base_model, "loras": loras, "prompt": pr, "negative": neg, "seed": int(sd or 0),
                "steps": int(st), "guidance": float(cf), "size": int(sz) or None, "sampler": smp}

    def apply_tags(pr, slot_values):
        """Move `<lora:name:w>` tags into the slots; returns the clean prompt and the new slot values."""
        clean, tags = prompt_tags.split(pr)
        values = list(slot_values)
        if not tags:
            return pr, values
        by_name = {}
        for e in library.entries(ws):
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

    common = [base, prompt, negative, seed, steps, cfg, size, sampler]

    def shown(progress, prefix=""):
        """The worker's phase on the busy image ("loading the base model", "image 2 of 4: denoising: step 3 of 20")."""
        return lambda text: progress(None, desc=f"{prefix}{text}") if text else None

    @guard
    def do_generate(b, pr, neg, sd, st, cf, sz, smp, *slot_values, progress=gr.Progress()):
        pr, values = apply_tags(pr, slot_values)
        reply = ctx.render("generate", request=request(b, pr, neg, sd, st, cf, sz, smp, *values),
                           on_progress=shown(progress))
        return (reply["image"], json.dumps(reply["settings"], indent=1), pr, *values)

    # Only the image shows "processing": the slots and the prompt stay usable while it renders.
    # One preview worker renders one request at a time: its requests share one gradio queue slot, so a waiting
    # one shows its place in the queue instead of "processing" while it waits on the worker.
    one_worker = {"concurrency_limit": 1, "concurrency_id": "preview-worker"}
    generate.click(do_generate, common + slot_inputs, [image, settings, prompt, *slot_inputs], show_progress_on=image,
                   **one_worker)

    @guard
    def do_compare(m, x, y, b, pr, neg, sd, st, cf, sz, smp, *slot_values, progress=gr.Progress()):
        """Cell by cell: the sheet is shown after each one, so a grid fills in instead of arriving at the end."""
        pr, values = apply_tags(pr, slot_values)
        req = request(b, pr, neg, sd, st, cf, sz, smp, *values)
        if m == CHECKPOINTS:
            if not req["loras"]:
                raise WorkspaceError("choose a run's LoRA in slot 1 to compare its checkpoints")
            found = [str(confine.path(ws, "checkpoint", p)) for p in library.run_checkpoints(ws, req["loras"][0]["path"])]
            columns, cells = len(parse_weights(x)), grids.checkpoint_cells(found, parse_weights(x))
        elif m.startswith("X/Y"):
            columns, cells = len(parse_weights(x)), grids.xy_cells(req["loras"], parse_weights(x), parse_weights(y))
        else:
            cells = grids.compare_cells(req["loras"])
            columns = len(cells)
        labels, images, sheets = [label for label, _ in cells], [], []
        folder = ctx.preview.out_dir / "grids"
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"  # two compares in one second differ
        for i, (_, loras) in enumerate(cells):
            reply = ctx.render("generate", request={**req, "loras": loras},
                               on_progress=shown(progress, f"image {i + 1} of {len(cells)}: "))
            with Image.open(reply["image"]) as im:
                images.append(im.convert("RGB"))
            sheet = folder / f"{stem}-{i + 1}-of-{len(cells)}.png"
            grids.grid(images, labels, columns, cells=len(cells)).save(sheet)
            sheets.append(sheet)
            yield (str(sheet), pr, *values) if i == 0 else (str(sheet), gr.skip(), *[gr.skip()] * len(values))
        for partial in sheets[:-1]:  # the finished sheet is the one kept
            partial.unlink(missing_ok=True)

    compare.click(do_compare, [mode, xs, ys, *common, *slot_inputs], [grid, prompt, *slot_inputs],
                  show_progress_on=grid, **one_worker)

    @guard
    def do_drift(b, *slot_values):
        out = {}
        for i in range(SLOTS):
            f = slot_values[i * 6]
            if f:
                base_model = confine.model(ws, "base model", form.model_source(b))
                lora = str(confine.path(ws, f"LoRA {i + 1}", f))
                out[f] = ctx.render("drift", request={"base": base_model}, lora=lora)["drift"]
        if not out:
            raise ValueError("choose a LoRA first")
        return json.dumps({"drift (mean pixel change on trigger-free prompts, 0..1)": out}, indent=1)

    drift_btn.click(do_drift, [base, *slot_inputs], settings, **one_worker)

    def triggers(*slot_values):
        words = []
        paths = {slot_values[i * 6] for i in range(SLOTS) if slot_values[i * 6]}
        for e in library.entries(ws):
            if str(e.path) in paths and e.trigger:
                words += [t.strip() for t in e.trigger.split(",") if t.strip()]
        return gr.Dropdown(choices=sorted(set(words)), value=words[0] if words else None)

    for f, *_ in slots:
        f.change(triggers, slot_inputs, trigger)
    insert.click(lambda t, p: (f"{t}, {p}" if p else t) if t else p, [trigger, prompt], prompt)

    @guard
    def do_drop(path, *slot_values):
        if not path:
            return (gr.skip(),) * len(slots)
        added = library.import_file(ws, path)
        choices = lora_choices(ws)
        files = [slot_values[i * 6] for i in range(SLOTS)]
        free = next((i for i, f in enumerate(files) if not f), 0)
        return tuple(gr.Dropdown(choices=choices, value=str(added) if i == free else files[i]) for i in range(SLOTS))

    drop.upload(do_drop, [drop, *slot_inputs], [s[0] for s in slots])

    def refresh(*files_and_settings):
        """The LoRAs there are now; a slot whose file was renamed or trashed meanwhile is emptied rather than
        left pointing at a path that a later Generate would fail on, and the last settings say which of their
        files are gone since."""
        *files, shown_settings = files_and_settings
        choices = lora_choices(ws)
        there = {path for _, path in choices}
        return (*(gr.Dropdown(choices=choices, value=f if f in there else None) for f in files),
                gone_since(shown_settings))

    files_and_settings = [*(s[0] for s in slots), settings]
    # LoRAs a run saved, or the Library renamed, since the page loaded: there when the tab opens.
    tab.select(refresh, files_and_settings, files_and_settings, show_progress="hidden")
    return {"refresh": (refresh, files_and_settings, files_and_settings)}


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
