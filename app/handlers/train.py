"""The Train tab's handlers, each a method that can be called and tested without a page, and the pure functions
that draw a run (its progress bar, loss series, log tail). `app/tabs/train.py` lays the tab out and wires these to
its components; the form's values arrive in the order of `FORM` (then the run name)."""
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
from ..context import LOG, USER_ERRORS, Ctx, guard
from ..workspace import WorkspaceError, check_name, unique_name

TIERS = [form.NO_TIER, "6", "8", "12", "16", "24"]
# Measure speed: enough steps past the warm-up for quartiles, and nothing but steps (no samples, no saves).
MEASURE_SETTINGS = ["train.max_steps=8", "sample.at_end=false", "sample.every_n_steps=0", "save.every_n_steps=0",
                    "save.every_n_epochs=0", "save.state_every_n_steps=0"]
NO_REG = "(none)"
KEPT_KEYS = ("model", "dataset", "reg", "preset", "vram", "steps", "rank", "lr", "prompts", "network")  # kept on reload
# The Train tab's network choice: label -> lora.network (the Advanced box has the knobs: lokr_factor, ...)
NETWORKS = {"LoRA": "lora", "LoHa (LyCORIS)": "loha", "LoKr (LyCORIS)": "lokr"}


class TrainHandlers:
    def __init__(self, ctx: Ctx):
        self.ws, self.runner = ctx.ws, ctx.runner
        self.gpu = plan.nvidia_smi_gpu()  # once: the GPU does not change while the app runs
        self.blockers = doctor.blocking_findings(self.ws.root)  # versions and disk: no torch import

    # ---- settings -----------------------------------------------------------------------------------------------
    @staticmethod
    def choice(m, d, r, p, v, s, k, l, pr, net=None) -> form.Choice:
        return form.Choice(model=m or form.EMBEDDED, dataset=d or "", reg_dataset="" if r in (None, NO_REG) else r,
                           preset=p or "", vram=v or form.NO_TIER, steps=int(s or 0), rank=int(k or 0), lr=float(l or 0),
                           prompts=tuple(line.strip() for line in (pr or "").splitlines() if line.strip()),
                           network=NETWORKS.get(net or "LoRA", "lora"))

    def memory_plan(self, cfg, tier, n=None):
        """Against this machine's GPU (a tier caps it), as the trainer will plan when it starts; without a GPU
        here, against a GPU of the chosen tier (to plan for another machine), else the RAM of a CPU run."""
        return plan.make_plan(cfg, plan.budget_for(None if tier in (None, "", form.NO_TIER) else float(tier),
                                                   self.gpu), n)

    def settings(self, *values):
        """The effective settings, the estimate and memory plan, the Advanced box's TOML, the resolution the
        Datasets tab checks at, and the form to keep over a reload. A setting that cannot be used (a model that is not
        there, a bad value) is said where the estimate goes, beside the form, not as a toast over the page."""
        try:
            return self._settings(*values)
        except USER_ERRORS as e:
            line = str(e).splitlines()[0] if str(e) else type(e).__name__
            LOG.info("settings: %s", line)
            return [], f"**Not ready to start:** {html.escape(line)}", gr.skip(), gr.skip(), gr.skip()

    def _settings(self, m, d, r, p, v, s, k, l, pr, net, name):
        c = self.choice(m, d, r, p, v, s, k, l, pr, net)
        on_cpu = plan.trains_on_cpu(plan.budget_for(None if v in (None, "", form.NO_TIER) else float(v), self.gpu,
                                                    ram_gb=0.0))
        cfg = confine.run_config(self.ws, form.effective_config(self.ws, c, check_name(name, "run"), on_cpu))
        n = None
        if d:  # scanned once per change of the folder (the effective config above asked the same)
            from trainer.data.scan import cached_scan

            n = len(cached_scan(self.ws.dataset(d)).items)
        planned = self.memory_plan(cfg, v, n)
        guess = estimate(cfg, n, host=planned.budget.device == "cpu")  # the same figure the plan weighs
        text = f"**Estimate:** {guess.text(speed_log.time_range(cfg, guess.steps))}"
        text += f"\n\n**{'Memory plan' if planned.fits else 'Does not fit'}** for " + \
            html.escape(planned.budget.source) + ": " + html.escape(planned.verdict())
        saved = dict(zip(KEPT_KEYS, (m, d, r, p, v, s, k, l, pr, net)))
        return form.summary(cfg), text, cfg.to_toml(), form.training_resolution(cfg), saved

    @guard
    def do_measure(self, text, *values):
        """Time a few steps of exactly these settings here; the estimate then shows the measured range."""
        cfg = confine.run_config(self.ws, form.parse_edited(text))
        folder = self.ws.root / ".speed-check" / uuid.uuid4().hex[:8]
        folder.mkdir(parents=True)
        try:
            (folder / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
            trainer_cli.run("train", "--config", str(folder / "config.toml"), "--output", str(folder), "--force",
                            *[a for key in MEASURE_SETTINGS for a in ("--set", key)])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return self.settings(*values)

    def load_form(self, saved, *values):
        """On page load: the form as the user left it (a reload used to reset steps, rank and the rest), its dataset
        the one the Datasets tab opens (created or edited last), and the settings computed from it in the same
        call, so no default-form result can land after it. A saved preset that no longer exists keeps the default."""
        names = self.ws.dataset_names()
        saved = dict(saved or {})
        if self.ws.latest_dataset():  # the dataset open on the Datasets tab, which a reload opens at the latest
            saved["dataset"] = self.ws.latest_dataset()
        ok = {"dataset": lambda x: x in names, "reg": lambda x: x in (NO_REG, *names),
              "preset": lambda x: x in presets.available(), "vram": lambda x: x in TIERS,
              "network": lambda x: x in NETWORKS}
        restored = [saved[k] if saved.get(k) is not None and ok.get(k, lambda x: True)(saved[k]) else v
                    for k, v in zip(KEPT_KEYS, values)]
        return (*restored, *self.settings(*restored, values[-1]))

    def do_start(self, text, name):
        """Start message, the run list with the new run picked, and a fresh run name. Errors stay on the page under
        Start (a toast vanished, and marking the run-name box as failed hid it)."""
        try:
            return self._start(text, name)
        except USER_ERRORS as e:
            line = str(e).splitlines()[0]
            LOG.info("start: %s", line)
            return f"**Not started:** {html.escape(line)}", gr.skip(), gr.skip()

    def _start(self, text, name):
        if self.blockers:  # the button is disabled; an API call gets the same answer
            raise RuntimeError(self.blockers[0].line())
        name = check_name(name, "run")
        cfg = form.parse_edited(text)
        cfg.save.output_dir, cfg.save.name = str(self.ws.run(name)), name  # the run folder is the run name
        confine.run_config(self.ws, cfg)  # every path the Advanced box names stays inside the allowed folders
        planned = plan.make_plan(cfg, plan.budget_for(None, self.gpu))  # where it will really train
        if planned.refused:
            raise ValueError(planned.text())
        v = self.runner.submit(name, cfg.to_toml())
        msg = f"started **{name}**" if v.state == "running" else f"**{name}** is {v.message or v.state}"
        # the next run's name follows this one's ("glorp-run" -> "glorp-run-2"), not back to "run"
        return msg, gr.Dropdown(choices=self.ws.run_names(), value=name), unique_name(self.ws.runs, stem_of(name))

    # ---- the live view of a run ---------------------------------------------------------------------------------
    def has_run(self, name) -> bool:
        # One stat per timer tick, not a sorted listing of every run; a bad name is simply no run.
        try:
            return bool(name) and self.ws.run(name).is_dir()
        except WorkspaceError:
            return False

    def refresh(self, name, last):
        """State, progress, loss, samples, log tail, command, checkpoints, what was drawn (`last`) and the Start/Stop
        message line: the plot and gallery are sent only when the run has something new, and the message line
        ("stopping; the LoRA is saved after the current step") is cleared when the run ends."""
        nothing = gr.Dataframe(value=None, visible=False)
        if not name:
            return "", "", None, [], "", "", nothing, last, gr.skip()
        if not self.has_run(name):
            return f"no run named {html.escape(name)}", "", None, [], "", "", nothing, last, gr.skip()
        v = self.runner.view(name)
        ended = last is not None and last[0] == name and last[4] in ("running", "stopping", "queued") and \
            v.state in ("finished", "stopped", "failed", "cancelled")
        said = "" if ended else gr.skip()
        signature = (name, v.step, len(v.samples), len(v.val_losses), v.state, len(v.checkpoints),
                     bool(v.recommendation))  # not the phase: progress_html is sent on every tick anyway
        state = f"**{v.state}**" + (f": {html.escape(v.message)}" if v.message else "")
        if v.state == "running":
            state += " (closing this page or the app does not stop it)"
        if v.state == "stopping":
            state += f"\n\n{html.escape(waiting_for(v))}"
        if v.alert and v.state in ("running", "stopping"):
            state += f"\n\n**Warning:** {html.escape(v.alert)}"
        if v.plan:
            state += f"\n\n{html.escape(v.plan[0].upper() + v.plan[1:])}"
        if v.notes:  # what the run said about itself (samples on a 4-bit base, files skipped, a lower resolution)
            more = f" (and {len(v.notes) - 3} more in the run's events.jsonl)" if len(v.notes) > 3 else ""
            state += "\n\n" + "\n\n".join(f"Note: {html.escape(n)}" for n in v.notes[:3]) + more
        if v.recommendation:
            state += f"\n\n**Recommended:** {html.escape(v.recommendation['message'])}"
        log_tail = newest_lines(v.log_tail)
        if signature == last:  # nothing new: leave the plot and gallery alone (no flicker, no traffic)
            return state, progress_html(v), gr.skip(), gr.skip(), log_tail, v.command, gr.skip(), last, said
        same_run = last is not None and last[0] == name and last[4] == v.state
        # Each part only when it changed: with every step the whole gallery and checkpoint table were sent again
        # (the server copying each sample into gradio's cache, the page redrawing them every 1.5 s).
        plot = gr.skip() if same_run and last[1:4:2] == signature[1:4:2] else loss_frame(v.losses, v.val_losses)
        gallery = gr.skip() if same_run and last[2] == signature[2] else list(v.samples)
        table = gr.skip() if same_run and last[5:] == signature[5:] else checkpoint_rows(v)
        return state, progress_html(v), plot, gallery, log_tail, v.command, table, signature, said

    @staticmethod
    def count_ended(sig, n):
        """A run that ends has timed its steps (speed_log): counting it refreshes the estimate at once."""
        return n + 1 if sig and sig[4] in ("finished", "stopped") else gr.skip()

    def sync_runs(self, current, known):
        """Runs started from another tab or the CLI appear here too; the picked one stays picked. Only a run that
        appears or goes counts: the list is newest first, and two runs writing at once swap places all the time
        (each swap re-sent the list, which re-rendered the picked run's loss plot and showed gradio's queue timer)."""
        names = self.ws.run_names()
        if set(names) == set(known or ()):
            return gr.skip(), known
        return gr.Dropdown(choices=names, value=current if current in names else (names[0] if names else None)), names

    @guard
    def do_stop(self, name):
        if not self.has_run(name):
            raise ValueError("pick a run")
        return self.runner.stop(name)

    @guard
    def do_resume(self, name):
        if not self.has_run(name):
            raise ValueError("pick a run")
        v = self.runner.submit(name, "", resume=True)
        return f"resuming **{name}**: {v.message or v.state}"

    @guard
    def do_keep(self, name):
        if not self.has_run(name):
            raise ValueError("pick a run")
        rec = self.runner.view(name).recommendation
        if not rec:
            raise ValueError(f"{name} has no recommendation: it needs a validation set (data.validation_split or "
                             "data.validation_dataset) and saved checkpoints (save.every_n_steps)")
        kept = library.keep(self.ws, name, rec)
        return f"kept **{kept.name}** in the Library ({html.escape(rec['message'])})"

    def active(self) -> bool:
        return bool(self.runner.running() or self.runner.queued())


def _eta(seconds) -> str:
    if seconds is None:
        return ""
    m, s = divmod(int(seconds), 60)
    return f"ETA {m}:{s:02d}"


def _bar(pct: float) -> str:
    return (f'<div style="border:1px solid #8884;border-radius:6px;height:14px;overflow:hidden">'
            f'<div style="width:{pct:.1f}%;height:100%;background:#3b82f6"></div></div>')


def stem_of(name: str) -> str:
    """A run name without the "-N" a second run of it got: the stem the next name is made from."""
    import re

    return re.sub(r"-\d+$", "", name) or "run"


def waiting_for(v) -> str:
    """What a stopping run waits for, with how long it should take: a Stop on a slow run (a tiny Flux at 1024 px on
    a CPU) took 13 minutes with no word of why."""
    if v.phase == "end samples":
        return "The LoRA is saved; rendering the end samples (Stop again skips them)."
    if v.progress and v.progress.get("phase") not in (None, "caching latents"):
        return (f"Stopping: ending {phase_text(v.progress)} at its next image or denoising step, then saving the "
                "LoRA.")
    per_step = v.eta_s / (v.total - v.step) if v.eta_s and v.total and v.total > v.step else None
    took = f" (a step takes about {_duration(per_step)} here)" if per_step else ""
    return f"Stopping: finishing step {v.step + 1}{took}, then saving the LoRA."


def _duration(s: float) -> str:
    return f"{s:.1f} s" if s < 90 else f"{s / 60:.0f} min"


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


SERIES = ("loss", "smoothed", "validation")
MAX_POINTS = 1000  # per series: a 20,000-step run draws the mean of every 20 steps, not 40,000 points a tick


def loss_frame(losses: list[tuple[int, float]], validation: list[tuple[int, float]] = ()):
    """Loss by step as series: the raw values, their moving average and the held-out validation loss;
    numeric from the first tick: an empty frame of object columns made the chart treat loss as categories
    and pile its labels up for the rest of the run.

    Every series is named in every frame, a series with no value yet by one empty (NaN) row, which the chart
    leaves out: gradio's plot fixes its colours to the series of the first frame it draws and only swaps the
    data after that, so a line whose series was missing then (every series, on a page opened before its
    run's first step; validation, until the first checkpoint) was drawn with no colour: not at all."""
    import pandas as pd

    rows, smooth, every = [], None, -(-len(losses) // MAX_POINTS)  # a long run: the mean of each `every` steps
    bucket: list[float] = []
    for i, (step, value) in enumerate(losses):
        smooth = value if smooth is None else SMOOTHING * smooth + (1 - SMOOTHING) * value
        bucket.append(value)
        if len(bucket) == every or i == len(losses) - 1:
            rows += [(step, sum(bucket) / len(bucket), "loss"), (step, smooth, "smoothed")]
            bucket = []
    rows += [(step, value, "validation") for step, value in validation]
    first = rows[0][0] if rows else 0
    present = {r[2] for r in rows}
    rows += [(first, float("nan"), name) for name in SERIES if name not in present]
    return pd.DataFrame(rows, columns=["step", "loss", "series"]).astype({"step": "int64", "loss": "float64"})


def _figure(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def newest_lines(text: str, n: int = LOG_LINES) -> str:
    return "\n".join(text.splitlines()[-n:])


def checkpoint_rows(v):
    picked = (v.recommendation or {}).get("step")
    rows = [[c.get("step"), _figure(c.get("validation_loss"), ".5f"), _figure(c.get("drift"), ".4f"),
             "recommended" if c.get("step") == picked else ""] for c in v.checkpoints]
    return gr.Dataframe(value=rows, visible=bool(rows))
