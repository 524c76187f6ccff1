"""Preview tab: mix up to three LoRAs at chosen weights over a base model, generate and compare. The handlers
are PreviewHandlers' methods (app/handlers/preview.py); this lays the tab out and wires them."""
from __future__ import annotations

import gradio as gr

from .. import train_form as form
from ..context import Ctx
from ..handlers.preview import CHECKPOINTS, SAMPLERS, SLOTS, PreviewHandlers, lora_choices

def build(ctx: Ctx) -> dict:
    h = PreviewHandlers(ctx)
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
                # shown only when the split is on: with it off, "weight" is what applies
                wu = gr.Slider(-2, 2, value=1.0, step=0.05, label="UNet", elem_id=f"slot{i}-unet", visible=False)
                wt = gr.Slider(-2, 2, value=1.0, step=0.05, label="text encoder", elem_id=f"slot{i}-te",
                               visible=False)
                sep.change(lambda on: (gr.Slider(visible=on), gr.Slider(visible=on)), sep, [wu, wt],
                           show_progress="hidden")
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
            steps = gr.Slider(1, 100, value=20, step=1, label="Steps (the model's own when it is picked)",
                              elem_id="preview-steps")
            cfg = gr.Slider(0, 20, value=4.0, step=0.5, elem_id="preview-cfg",
                            label="Guidance: CFG (0 = none: Z-Image Turbo, Flux schnell); Flux dev: its distilled guidance")
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
        drift_md = gr.Markdown(elem_id="drift-result")
        with gr.Row():
            image = gr.Image(label="Image", type="filepath", elem_id="preview-image", height=320)
            grid = gr.Image(label="Compare grid", type="filepath", elem_id="compare-grid", height=320)
        settings = gr.Code(label="Exact settings used", language="json", elem_id="preview-settings")

    # ---- wiring: each handler is a method of PreviewHandlers ----------------------------------------------
    slot_inputs = [c for s in slots for c in s]
    common = [base, prompt, negative, seed, steps, cfg, size, sampler]
    # Only the image shows "processing": the slots and the prompt stay usable while it renders.
    # One preview worker renders one request at a time: its requests share one gradio queue slot, so a waiting
    # one shows its place in the queue instead of "processing" while it waits on the worker.
    one_worker = {"concurrency_limit": 1, "concurrency_id": "preview-worker"}
    generate.click(h.do_generate, common + slot_inputs, [image, settings, prompt, *slot_inputs], show_progress_on=image,
                   **one_worker)
    compare.click(h.do_compare, [mode, xs, ys, *common, *slot_inputs], [grid, prompt, *slot_inputs],
                  show_progress_on=grid, **one_worker)
    drift_btn.click(h.do_drift, [base, *slot_inputs], drift_md, **one_worker)
    base.change(h.model_defaults, base, [steps, cfg], show_progress="hidden")
    for f, *_ in slots:
        f.change(h.triggers, slot_inputs, trigger)
    insert.click(h.insert_trigger, [trigger, prompt], prompt)
    drop.upload(h.do_drop, [drop, *slot_inputs], [s[0] for s in slots])
    files_and_settings = [*(s[0] for s in slots), settings]
    # LoRAs a run saved, or the Library renamed, since the page loaded: there when the tab opens.
    tab.select(h.refresh, files_and_settings, files_and_settings, show_progress="hidden")
    return {"refresh": (h.refresh, files_and_settings, files_and_settings)}
