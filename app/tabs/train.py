"""Train tab: model, dataset, preset and VRAM tier -> effective settings -> Start; then live progress,
loss, samples and log of any run, read from its run folder. The handlers are TrainHandlers' methods
(app/handlers/train.py); this lays the tab out and wires them."""
from __future__ import annotations

import gradio as gr

from trainer import presets

from .. import train_form as form
from ..context import Ctx, said_in
from ..handlers.train import LOG_LINES, NETWORKS, NO_REG, TIERS, TrainHandlers
from ..workspace import unique_name


def build(ctx: Ctx, saved_form) -> dict:
    """`saved_form`: a gr.BrowserState made outside the tabs (inside a tab that is not shown yet it would not
    read the browser's storage before the page-load event), where the Train form is kept over a reload."""
    h = TrainHandlers(ctx)
    ws = ctx.ws
    names = ws.dataset_names()
    with gr.Tab("Train", id="train") as tab:
        with gr.Row():
            model = gr.Dropdown([form.EMBEDDED], value=form.EMBEDDED, allow_custom_value=True, scale=3, elem_id="model",
                                label="Base model: the embedded tiny model, a local file or folder, or a Hub id")
            dataset = gr.Dropdown(names, value=ws.latest_dataset(), elem_id="train-dataset",
                                  label="Dataset (the one open on the Datasets tab)")
            reg = gr.Dropdown([NO_REG, *names], value=NO_REG, label="Regularization images")
        with gr.Row():
            preset = gr.Dropdown(sorted(presets.available()), value="character", label="Preset", elem_id="preset")
            vram = gr.Dropdown(TIERS, value=form.NO_TIER, label="VRAM tier (GB)")
            run_name = gr.Textbox(unique_name(ws.runs, "run"), label="Run name", elem_id="run-name")
        with gr.Row():
            steps = gr.Number(0, precision=0, minimum=0, label="Steps (0 = the preset's)", elem_id="steps")
            rank = gr.Number(0, precision=0, minimum=0, label="Rank (0 = suggested)")
            lr = gr.Number(0, minimum=0, label="UNet learning rate (0 = the preset's)")
            network = gr.Dropdown(list(NETWORKS), value="LoRA", elem_id="network",
                                  label="Network: LoRA (the default); LoHa or LoKr (LyCORIS files, which diffusers "
                                        "does not read; LoKr makes the smallest files, and learned no style on the "
                                        "embedded model: bench learn --networks)")
        prompts = gr.Textbox(lines=2, elem_id="sample-prompts",
                             label="Sample prompts, one per line (empty = the dataset's first captions with its trigger; "
                                   "the ones used are in Effective settings)")
        with gr.Row():
            summary = gr.Dataframe(headers=["group", "setting", "value"], interactive=False, label="Effective settings",
                                   scale=3, elem_id="summary")
            with gr.Column(scale=2):
                estimate_md = gr.Markdown(elem_id="estimate")
                measure = gr.Button("Measure speed (a few steps of these settings on this machine)",
                                    size="sm", elem_id="measure-speed")
        with gr.Accordion("Advanced: every setting (edit freely; checked on Start)", open=False):
            advanced = gr.Code(language=None, lines=24, interactive=True, elem_id="advanced")
        blocked = form.start_blockers(h.blockers)
        gr.Markdown(blocked, elem_id="doctor", visible=bool(blocked))
        with gr.Row():
            start = gr.Button("Start", variant="primary", elem_id="start", interactive=not blocked)
        start_msg = gr.Markdown(elem_id="start-message")

        gr.Markdown("### Runs")
        runs = ws.run_names()
        with gr.Row():
            # Custom values: a script (or a tab opened before the run existed) may name a run the
            # build-time list lacks; every handler checks the name against the runs folder.
            run_pick = gr.Dropdown(runs, value=runs[0] if runs else None, label="Run", elem_id="run-pick", scale=3,
                                   allow_custom_value=True)
            stop = gr.Button("Stop", variant="stop", elem_id="stop")
            resume = gr.Button("Resume", elem_id="resume")
            keep = gr.Button("Keep the recommended checkpoint", elem_id="keep")
        state_md = gr.Markdown(elem_id="run-state")
        progress = gr.HTML(elem_id="progress")
        with gr.Row():
            # Tick labels short from the first step (one point made "1.000000" and a cut-off "…5765249").
            # steps in decimal (d3's "~g" wrote 100 as 1e+2; "d" wrote the half-step ticks of a run's first three
            # steps as "1, 2, 2, 3, 3"); losses short
            loss = gr.LinePlot(x="step", y="loss", color="series", title="Loss", height=260, elem_id="loss-plot",
                               x_axis_format="~r", y_axis_format=".3~g")
            samples = gr.Gallery(label="Samples", columns=4, height=260, elem_id="samples")
        checkpoint_table = gr.Dataframe(headers=["step", "validation loss", "drift", ""], interactive=False,
                                        label="Checkpoints (validation loss: lower is better; drift: change on "
                                              "prompts without the trigger)", elem_id="checkpoints", visible=False)
        log = gr.Textbox(label="Log tail", lines=LOG_LINES, max_lines=LOG_LINES, elem_id="log", autoscroll=True)
        command = gr.Textbox(label="The same run from a terminal", buttons=["copy"], elem_id="cli-command")
        seen = gr.State(None)
        # Inside the tab like every component: one made outside it becomes a child of the tab bar, which
        # then draws a tab twice and loses Library (issue 18 #1).
        never_seen = gr.State(None)  # a picked run always renders in full
        known_runs = gr.State(runs)
        resolution = gr.State(None)  # what the chosen model and preset train at; the Datasets tab checks at it
        ended = gr.State(0)  # runs seen finishing: each refreshes the estimate with the steps it measured
        timer = gr.Timer(1.5)

    # ---- wiring: each handler is a method of TrainHandlers ------------------------------------------------
    kept = [model, dataset, reg, preset, vram, steps, rank, lr, prompts, network]
    form_inputs = [*kept, run_name]
    settings_outputs = [summary, estimate_md, advanced, resolution, saved_form]
    for comp in form_inputs:
        comp.change(h.settings, form_inputs, settings_outputs)
    # The dataset open on the Datasets tab may have changed since (its trigger, its captions): the sample prompts and
    # repeats are read again whenever this tab is opened
    tab.select(h.settings, form_inputs, settings_outputs, show_progress="hidden")
    measure.click(h.do_measure, [advanced, *form_inputs], settings_outputs, show_progress_on=estimate_md)
    start.click(h.do_start, [advanced, run_name], [start_msg, run_pick, run_name])

    live = [state_md, progress, loss, samples, log, command, checkpoint_table, seen, start_msg]
    # hidden: a tick is bookkeeping; gradio's queue text ("queue: 1/1 | 1.3/0.6s") is no part of a run's state
    timer.tick(h.refresh, [run_pick, seen], live, show_progress="hidden")
    # A run that ends has timed its steps (speed_log): the estimate becomes the measured range at once.
    seen.change(h.count_ended, [seen, ended], ended, show_progress="hidden")
    ended.change(h.settings, form_inputs, settings_outputs, show_progress="hidden")
    timer.tick(h.sync_runs, [run_pick, known_runs], [run_pick, known_runs], show_progress="hidden")
    # Named, so scripts (and the load test) can read a run's state: /run_state(run name).
    run_pick.change(h.refresh, [run_pick, never_seen], live, api_name="run_state", show_progress="hidden")
    stop.click(said_in(start_msg, [start_msg], h.do_stop), run_pick, start_msg)
    resume.click(said_in(start_msg, [start_msg], h.do_resume), run_pick, start_msg)
    keep.click(said_in(start_msg, [start_msg], h.do_keep), run_pick, start_msg)
    return {"refresh_datasets": (dataset, reg), "model": model, "active": h.active,
            "load_form": (h.load_form, [saved_form, *form_inputs], [*kept, *settings_outputs]), "resolution": resolution,
            "runs": (run_pick, known_runs), "run_name": run_name}
