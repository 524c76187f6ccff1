"""Train tab: model, dataset, preset and VRAM tier -> effective settings -> Start; then live progress,
loss, samples and log of any run, read from its run folder."""
from __future__ import annotations

import html
import shutil
import uuid

import gradio as gr

from trainer import doctor, presets
from trainer.memory import plan
from trainer.memory import speed_log
from trainer.memory.estimate import estimate

from .. import confine, library, trainer_cli
from .. import train_form as form
from ..context import LOG, USER_ERRORS, Ctx, guard, said_in
from ..workspace import WorkspaceError, check_name, unique_name

TIERS = [form.NO_TIER, "6", "8", "12", "16", "24"]
# Measure speed: enough steps past the warm-up for quartiles, and nothing but steps (no samples, no saves).
MEASURE_SETTINGS = ["train.max_steps=8", "sample.at_end=false", "sample.every_n_steps=0", "save.every_n_steps=0",
                    "save.every_n_epochs=0", "save.state_every_n_steps=0"]
NO_REG = "(none)"
KEPT_KEYS = ("model", "dataset", "reg", "preset", "vram", "steps", "rank", "lr", "prompts")  # the form a reload keeps


def _eta(seconds) -> str:
    if seconds is None:
        return ""
    m, s = divmod(int(seconds), 60)
    return f"ETA {m}:{s:02d}"


def _bar(pct: float) -> str:
    return (f'<div style="border:1px solid #8884;border-radius:6px;height:14px;overflow:hidden">'
            f'<div style="width:{pct:.1f}%;height:100%;background:#3b82f6"></div></div>')


def phase_text(p: dict) -> str:
    """'caching latents 340 / 1,000 (ETA 2:10)': a phase, its count and the time its own rate leaves."""
    done, total = p.get("done") or 0, p.get("total")
    count = f" {done:,} / {total:,}" if total else ""
    eta = ""
    if total and done and p.get("time", 0) > p.get("started", 0):
        eta = " " + _eta((p["time"] - p["started"]) / done * (total - done))
    return f"{p.get('phase', '')}{count}{eta}".strip()


def progress_html(v) -> str:
    active = v.state in ("running", "stopping")
    if active and v.progress and not v.step:  # before the first step: the phase is the progress
        p = v.progress
        pct = 100.0 * (p.get("done") or 0) / p["total"] if p.get("total") else 0.0
        return _bar(pct) + f"<div>{html.escape(phase_text(p))}</div>"
    pct = 100.0 * v.step / v.total if v.total else (100.0 if v.state == "finished" else 0.0)
    line = f"{v.step} / {v.total or '?'} steps {html.escape(_eta(v.eta_s) if v.state == 'running' else '')}"
    if active and v.progress:  # samples, validation, saving between steps; end samples after them
        line += f" · {html.escape(phase_text(v.progress))}"
    if active and v.ahead:
        line += f" · {html.escape(phase_text(v.ahead))} ahead of the steps"
    return _bar(pct) + f"<div>{line}</div>"


LOG_LINES = 8  # what the log box shows: the newest lines, so it always follows the run


SMOOTHING = 0.9  # the smoothed curve is an exponential moving average, as TensorBoard draws it


def loss_frame(losses: list[tuple[int, float]], validation: list[tuple[int, float]] = ()):
    """Loss by step as series: the raw values, their moving average and the held-out validation loss;
    numeric from the first tick: an empty frame of object columns made the chart treat loss as categories
    and pile its labels up for the rest of the run."""
    import pandas as pd

    rows, smooth = [], None
    for step, value in losses:
        smooth = value if smooth is None else SMOOTHING * smooth + (1 - SMOOTHING) * value
        rows += [(step, value, "loss"), (step, smooth, "smoothed")]
    rows += [(step, value, "validation") for step, value in validation]
    return pd.DataFrame(rows, columns=["step", "loss", "series"]).astype({"step": "int64", "loss": "float64"})


def _figure(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def newest_lines(text: str, n: int = LOG_LINES) -> str:
    return "\n".join(text.splitlines()[-n:])


def build(ctx: Ctx, saved_form) -> dict:
    """`saved_form`: a gr.BrowserState made outside the tabs (inside a tab that is not shown yet it would not
    read the browser's storage before the page-load event), where the Train form is kept over a reload."""
    ws, runner = ctx.ws, ctx.runner
    names = ws.dataset_names()
    with gr.Tab("Train", id="train"):
        with gr.Row():
            model = gr.Dropdown([form.EMBEDDED], value=form.EMBEDDED, allow_custom_value=True, scale=3, elem_id="model",
                                label="Base model: the embedded tiny model, a local file or folder, or a Hub id")
            dataset = gr.Dropdown(names, value=names[0] if names else None, label="Dataset", elem_id="train-dataset")
            reg = gr.Dropdown([NO_REG, *names], value=NO_REG, label="Regularization images")
        with gr.Row():
            preset = gr.Dropdown(sorted(presets.available()), value="character", label="Preset", elem_id="preset")
            vram = gr.Dropdown(TIERS, value=form.NO_TIER, label="VRAM tier (GB)")
            run_name = gr.Textbox(unique_name(ws.runs, "run"), label="Run name", elem_id="run-name")
        with gr.Row():
            steps = gr.Number(0, precision=0, minimum=0, label="Steps (0 = the preset's)", elem_id="steps")
            rank = gr.Number(0, precision=0, minimum=0, label="Rank (0 = suggested)")
            lr = gr.Number(0, minimum=0, label="UNet learning rate (0 = the preset's)")
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
        blockers = doctor.blocking_findings(ws.root)  # versions and disk: no torch import
        blocked = form.start_blockers(blockers)
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
            loss = gr.LinePlot(x="step", y="loss", color="series", title="Loss", height=260, elem_id="loss-plot")
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

    # ---- settings ------------------------------------------------------------------------------
    kept = [model, dataset, reg, preset, vram, steps, rank, lr, prompts]
    form_inputs = [*kept, run_name]

    def choice(m, d, r, p, v, s, k, l, pr):
        return form.Choice(model=m or form.EMBEDDED, dataset=d or "", reg_dataset="" if r in (None, NO_REG) else r,
                           preset=p or "", vram=v or form.NO_TIER, steps=int(s or 0), rank=int(k or 0), lr=float(l or 0),
                           prompts=tuple(line.strip() for line in (pr or "").splitlines() if line.strip()))

    gpu = plan.nvidia_smi_gpu()  # once: the GPU does not change while the app runs

    def memory_plan(cfg, tier, n=None):
        """Against this machine's GPU (a tier caps it), as the trainer will plan when it starts; without a GPU
        here, against a GPU of the chosen tier (to plan for another machine), else the RAM of a CPU run."""
        return plan.make_plan(cfg, plan.budget_for(None if tier in (None, "", form.NO_TIER) else float(tier), gpu), n)

    @guard
    def settings(m, d, r, p, v, s, k, l, pr, name):
        c = choice(m, d, r, p, v, s, k, l, pr)
        cfg = confine.run_config(ws, form.effective_config(ws, c, check_name(name, "run")))
        n = None
        if d:  # scanned once per change of the folder (the effective config above asked the same)
            from trainer.data.scan import cached_scan

            n = len(cached_scan(ws.dataset(d)).items)
        planned = memory_plan(cfg, v, n)
        guess = estimate(cfg, n, host=planned.budget.device == "cpu")  # the same figure the plan weighs
        text = f"**Estimate:** {guess.text(speed_log.time_range(cfg, guess.steps))}"
        text += f"\n\n**{'Memory plan' if planned.fits else 'Does not fit'}** for " + \
            html.escape(planned.budget.source) + ": " + html.escape(planned.verdict())
        saved = dict(zip(KEPT_KEYS, (m, d, r, p, v, s, k, l, pr)))
        return form.summary(cfg), text, cfg.to_toml(), form.training_resolution(cfg), saved

    settings_outputs = [summary, estimate_md, advanced, resolution, saved_form]
    for comp in form_inputs:
        comp.change(settings, form_inputs, settings_outputs)

    @guard
    def do_measure(text, *values):
        """Time a few steps of exactly these settings here; the estimate then shows the measured range."""
        cfg = confine.run_config(ws, form.parse_edited(text))
        folder = ws.root / ".speed-check" / uuid.uuid4().hex[:8]
        folder.mkdir(parents=True)
        try:
            (folder / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
            trainer_cli.run("train", "--config", str(folder / "config.toml"), "--output", str(folder), "--force",
                            *[a for key in MEASURE_SETTINGS for a in ("--set", key)])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return settings(*values)

    measure.click(do_measure, [advanced, *form_inputs], settings_outputs, show_progress_on=estimate_md)

    def load_form(saved, *values):
        """On page load: the form as the user left it (a reload used to reset dataset, steps and the rest),
        and the settings computed from it in the same call, so no default-form result can land after it. A
        saved dataset or preset that no longer exists keeps the current default."""
        names = ws.dataset_names()
        ok = {"dataset": lambda x: x in names, "reg": lambda x: x in (NO_REG, *names),
              "preset": lambda x: x in presets.available(), "vram": lambda x: x in TIERS}
        saved = saved or {}
        restored = [saved[k] if saved.get(k) is not None and ok.get(k, lambda x: True)(saved[k]) else v
                    for k, v in zip(KEPT_KEYS, values)]
        return (*restored, *settings(*restored, values[-1]))

    def do_start(text, name):
        # Errors stay on the page under Start (a toast vanished, and marking the run-name box as failed hid it).
        try:
            return _start(text, name)
        except USER_ERRORS as e:
            line = str(e).splitlines()[0]
            LOG.info("start: %s", line)
            return f"**Not started:** {html.escape(line)}", gr.skip(), gr.skip()

    def _start(text, name):
        if blockers:  # the button is disabled; an API call gets the same answer
            raise RuntimeError(blockers[0].line())
        name = check_name(name, "run")
        cfg = form.parse_edited(text)
        cfg.save.output_dir, cfg.save.name = str(ws.run(name)), name  # the run folder is the run name
        confine.run_config(ws, cfg)  # every path the Advanced box names stays inside the allowed folders
        planned = plan.make_plan(cfg, plan.budget_for(None, gpu))  # where it will really train
        if planned.refused:
            raise ValueError(planned.text())
        v = runner.submit(name, cfg.to_toml())
        msg = f"started **{name}**" if v.state == "running" else f"**{name}** is {v.message or v.state}"
        return msg, gr.Dropdown(choices=ws.run_names(), value=name), unique_name(ws.runs, "run")

    start.click(do_start, [advanced, run_name], [start_msg, run_pick, run_name])

    # ---- live view -----------------------------------------------------------------------------
    def has_run(name) -> bool:
        # One stat per timer tick, not a sorted listing of every run; a bad name is simply no run.
        try:
            return bool(name) and ws.run(name).is_dir()
        except WorkspaceError:
            return False

    def refresh(name, last):
        nothing = gr.Dataframe(value=None, visible=False)
        if not name:
            return "", "", None, [], "", "", nothing, last
        if not has_run(name):
            return f"no run named {html.escape(name)}", "", None, [], "", "", nothing, last
        v = runner.view(name)
        signature = (name, v.step, len(v.samples), len(v.val_losses), v.state, len(v.checkpoints),
                     bool(v.recommendation))  # not the phase: progress_html is sent on every tick anyway
        state = f"**{v.state}**" + (f": {html.escape(v.message)}" if v.message else "")
        if v.state == "running":
            state += " (closing this page or the app does not stop it)"
        if v.alert and v.state in ("running", "stopping"):
            state += f"\n\n**Warning:** {html.escape(v.alert)}"
        if v.plan:
            state += f"\n\n{html.escape(v.plan[0].upper() + v.plan[1:])}"
        if v.recommendation:
            state += f"\n\n**Recommended:** {html.escape(v.recommendation['message'])}"
        log_tail = newest_lines(v.log_tail)
        if signature == last:  # nothing new: leave the plot and gallery alone (no flicker, no traffic)
            return state, progress_html(v), gr.skip(), gr.skip(), log_tail, v.command, gr.skip(), last
        return (state, progress_html(v), loss_frame(v.losses, v.val_losses), list(v.samples), log_tail, v.command,
                checkpoint_rows(v), signature)

    def checkpoint_rows(v):
        picked = (v.recommendation or {}).get("step")
        rows = [[c.get("step"), _figure(c.get("validation_loss"), ".5f"), _figure(c.get("drift"), ".4f"),
                 "recommended" if c.get("step") == picked else ""] for c in v.checkpoints]
        return gr.Dataframe(value=rows, visible=bool(rows))

    live = [state_md, progress, loss, samples, log, command, checkpoint_table, seen]
    # hidden: a tick is bookkeeping; gradio's queue text ("queue: 1/1 | 1.3/0.6s") is no part of a run's state
    timer.tick(refresh, [run_pick, seen], live, show_progress="hidden")
    # A run that ends has timed its steps (speed_log): the estimate becomes the measured range at once.
    def count_ended(sig, n):
        return n + 1 if sig and sig[4] in ("finished", "stopped") else gr.skip()

    seen.change(count_ended, [seen, ended], ended, show_progress="hidden")
    ended.change(settings, form_inputs, settings_outputs, show_progress="hidden")

    def sync_runs(current, known):
        """Runs started from another tab or the CLI appear here too; the picked one stays picked."""
        names = ws.run_names()
        if names == known:
            return gr.skip(), known
        return gr.Dropdown(choices=names, value=current if current in names else (names[0] if names else None)), names

    timer.tick(sync_runs, [run_pick, known_runs], [run_pick, known_runs], show_progress="hidden")
    # Named, so scripts (and the load test) can read a run's state: /run_state(run name).
    run_pick.change(refresh, [run_pick, never_seen], live, api_name="run_state")

    @guard
    def do_stop(name):
        if not has_run(name):
            raise ValueError("pick a run")
        return runner.stop(name)

    stop.click(said_in(start_msg, [start_msg], do_stop), run_pick, start_msg)

    @guard
    def do_resume(name):
        if not has_run(name):
            raise ValueError("pick a run")
        v = runner.submit(name, "", resume=True)
        return f"resuming **{name}**: {v.message or v.state}"

    resume.click(said_in(start_msg, [start_msg], do_resume), run_pick, start_msg)

    @guard
    def do_keep(name):
        if not has_run(name):
            raise ValueError("pick a run")
        rec = runner.view(name).recommendation
        if not rec:
            raise ValueError(f"{name} has no recommendation: it needs a validation set (data.validation_split or "
                             "data.validation_dataset) and saved checkpoints (save.every_n_steps)")
        kept = library.keep(ws, name, rec)
        return f"kept **{kept.name}** in the Library ({html.escape(rec['message'])})"

    keep.click(said_in(start_msg, [start_msg], do_keep), run_pick, start_msg)
    return {"refresh_datasets": (dataset, reg), "model": model, "active": lambda: bool(runner.running() or runner.queued()),
            "load_form": (load_form, [saved_form, *form_inputs], [*kept, *settings_outputs]), "resolution": resolution,
            "runs": (run_pick, known_runs), "run_name": run_name}
