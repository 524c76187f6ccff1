"""The app's handlers and job runner, without a browser. A fake trainer stands in for the real one
so the queue, crash and restart logic is tested in seconds."""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from app import dataset_ops as ops
from app import jobs
from app.train_form import Choice, effective_config, parse_edited, summary
from app.workspace import Workspace, WorkspaceError
from tests.conftest import make_dataset

FAKE_TRAINER = textwrap.dedent('''\
    #!{python}
    # Stands in for `python -m trainer train --config C --output DIR ...`: writes events like the trainer.
    import json, sys, time, pathlib, tomllib
    out = pathlib.Path(sys.argv[sys.argv.index("--output") + 1])
    cfg = tomllib.loads((out / "config.toml").read_text())
    mode = cfg["data"].get("default_caption", "")
    def emit(**e):
        with open(out / "events.jsonl", "a") as f:
            f.write(json.dumps({{"time": time.time(), **e}}) + "\\n")
    if mode == "crash":
        print("Traceback: boom", flush=True); sys.exit(3)
    if mode == "vanish":
        import os; os.kill(os.getpid(), 9)
    emit(type="start", total=4)
    for step in range(1, 5):
        if (out / "STOP").exists():
            emit(type="done", step=step - 1, stopped=True, path=str(out / "x.safetensors")); sys.exit(0)
        time.sleep(float(cfg["train"].get("noise_offset", 0)) * 10)
        emit(type="step", step=step, total=4, loss=1.0 / step, eta_s=1.0)
    emit(type="sample", step=4, path=str(out / "s.png"))
    emit(type="done", step=4, stopped=False, path=str(out / "x.safetensors"))
    if mode == "linger":  # the trainer's exit comes a moment after its last event (saving, closing files)
        time.sleep(1.5)
''')


@pytest.fixture
def ws(tmp_path):
    return Workspace(tmp_path / "ws").ensure(with_samples=False)


@pytest.fixture
def fake_python(tmp_path):
    path = tmp_path / "fake_trainer.py"
    path.write_text(FAKE_TRAINER.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


def config_text(ws, name, mode="", delay=0.0):
    make_dataset(ws.datasets / "d", n=2)
    cfg = effective_config(ws, Choice(dataset="d"), name)
    cfg.data.default_caption, cfg.train.noise_offset = mode, delay
    return cfg.to_toml()


def wait(runner, name, states, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        runner.tick()
        v = runner.view(name)
        if v.state in states:
            return v
        time.sleep(0.05)
    raise AssertionError(f"{name} stayed {runner.view(name).state}")


def test_queue_runs_one_at_a_time_and_reports_progress(ws, fake_python):
    runner = jobs.JobRunner(ws.runs, python=fake_python)
    first = runner.submit("a", config_text(ws, "a", delay=0.05))
    second = runner.submit("b", config_text(ws, "b"))
    assert first.state == "running"
    # Below the UI's priority, so a CPU run does not starve the page watching it.
    assert os.getpriority(os.PRIO_PROCESS, runner.procs["a"].pid) == max(os.getpriority(os.PRIO_PROCESS, 0), 10)
    assert second.state == "queued" and "waiting for a" in second.message and second.queue_position == 1
    done = wait(runner, "a", {"finished"})
    assert done.step == done.total == 4 and [s for s, _ in done.losses] == [1, 2, 3, 4]
    assert done.samples and done.lora.endswith("x.safetensors")
    assert wait(runner, "b", {"finished"}).state == "finished"
    assert "lora-studio train --config" in done.command


def test_crash_is_reported_with_the_last_log_line(ws, fake_python):
    runner = jobs.JobRunner(ws.runs, python=fake_python)
    runner.submit("c", config_text(ws, "c", mode="crash"))
    proc = runner.procs.get("c")
    if proc is not None:  # submit's own view may already have reaped a fast crash
        proc.wait(timeout=30)
    # No tick between the exit and the view: the view itself must record the exit code.
    v = runner.view("c")
    assert v.state == "failed" and "boom" in v.message and "exit code 3" in v.message
    assert jobs.read_job(ws.runs / "c")["returncode"] == 3


def test_dead_process_after_restart_is_failed_not_running(ws, fake_python):
    runner = jobs.JobRunner(ws.runs, python=fake_python)
    runner.submit("v", config_text(ws, "v", mode="vanish"))
    time.sleep(1.0)
    # A new runner (an app restart) never saw the process: it must not say "running" forever.
    fresh = jobs.JobRunner(ws.runs, python=fake_python)
    assert fresh.view("v").state == "failed"
    assert fresh.running() is None


def test_finished_runs_survive_a_restart(ws, fake_python):
    runner = jobs.JobRunner(ws.runs, python=fake_python)
    runner.submit("r", config_text(ws, "r"))
    wait(runner, "r", {"finished"})
    assert jobs.JobRunner(ws.runs).view("r").state == "finished"


def test_stop_twice_and_cancel_queued(ws, fake_python):
    runner = jobs.JobRunner(ws.runs, python=fake_python)
    runner.submit("s", config_text(ws, "s", delay=0.1))
    runner.submit("q", config_text(ws, "q"))
    assert "cancelled" in runner.stop("q")
    assert "stopping" in runner.stop("s")
    second = runner.stop("s")  # a second press is harmless: still stopping, or (on a loaded machine the fake run
    assert "stopping" in second or "stopped; nothing to stop" in second  # may have saved already) nothing left
    v = wait(runner, "s", {"stopped"})
    assert v.step < 4
    assert runner.view("q").state == "cancelled"
    with pytest.raises(FileExistsError):
        runner.submit("s", config_text(ws, "s"))


def test_effective_config_layers_preset_model_and_edits(ws):
    make_dataset(ws.datasets / "d", n=12)
    cfg = effective_config(ws, Choice(dataset="d", preset="character", steps=7, rank=4), "run1")
    assert cfg.model.source == "tiny" and cfg.data.resolution == 64  # the tiny overlay
    assert cfg.train.max_steps == 7 and cfg.lora.rank == 4 and cfg.data.repeats == 13  # ceil(150 / 12)
    assert Path(cfg.save.output_dir) == ws.runs / "run1"
    edited = parse_edited(cfg.to_toml().replace("max_steps = 7", "max_steps = 9"))
    assert edited.train.max_steps == 9
    with pytest.raises(Exception, match="lora.rank"):
        parse_edited(cfg.to_toml().replace("rank = 4", "rank = -1"))
    with pytest.raises(Exception, match="train2"):
        parse_edited(cfg.to_toml() + "\n[train2]\nnosuch = 1\n")


def test_dataset_handlers(ws, tmp_path):
    src = make_dataset(tmp_path / "src", n=3, size=(96, 80))
    name = ops.create_dataset(ws, "my set")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    rows = ops.import_uploads(ws, name, [str(p) for p in sorted(src.glob("*.png"))] + [str(tmp_path / "broken.jpg")])
    assert [r[1] for r in rows].count("imported") == 3
    assert rows[-1][:2] == ["broken.jpg", "skipped"] and rows[-1][2]
    images = [Path(p).name for p, _ in ops.images(ws, name)]
    ops.save_caption(ws, name, images[0], "zorb,  a red   circle")
    assert (ws.dataset(name) / images[0]).with_suffix(".txt").read_text() == "zorb, a red circle\n"
    assert ops.bulk_edit(ws, name, "add first", "zorb").startswith("add first")
    assert dict((t, n) for t, n in ops.tag_table(ws, name))["zorb"] == 3
    ops.save_settings(ws, name, "zorb", 5, "character")
    assert ops.settings(ws, name).repeats == 5
    ops.remove_image(ws, name, images[1])
    assert len(ops.images(ws, name)) == 2 and ops.trashed(ws, name) == [images[1]]
    ops.restore_image(ws, name, images[1])
    assert len(ops.images(ws, name)) == 3 and ops.trashed(ws, name) == []
    rows, buckets, summary = ops.validation(ws, name, 64)
    assert len(rows) == 3  # same circle, other colours
    assert summary.startswith("1 ok, 2 with warnings, 0 excluded; captions counted with the embedded model")
    assert "near-duplicate" in rows[1][2] and buckets == [["64x64", 3]]
    with pytest.raises(WorkspaceError):
        ops.image_path(ws, name, "../../etc/passwd")
    safe = ops.create_dataset(ws, "../../evil")  # sanitised into a plain name inside datasets/
    assert (ws.datasets / safe).resolve().parent == ws.datasets.resolve()


def test_app_never_imports_torch():
    code = "import sys, app.main, app.cli, app.jobs; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_listen_without_auth_is_refused(capsys):
    from app.cli import main

    assert main(["--listen", "--no-browser"]) == 2
    assert "--auth" in capsys.readouterr().err


def test_train_tab_disables_start_when_doctor_finds_a_blocker(ws, monkeypatch):
    from app.context import Ctx
    from app.main import build_app
    from trainer import doctor

    finding = doctor.Finding(True, "peft is not installed (LoRA Studio needs peft>=0.17,<1)",
                             "pip install -c requirements.lock -e .")
    runner = jobs.JobRunner(ws.runs, cwd=ws.root)
    for blockers, interactive in (([], True), ([finding], False)):
        monkeypatch.setattr(doctor, "blocking_findings", lambda workspace=None: blockers)
        demo = build_app(Ctx(ws, runner))
        by_id = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
        assert by_id["start"].interactive is interactive
        assert by_id["doctor"].visible is bool(blockers)
        if blockers:
            assert "peft is not installed" in by_id["doctor"].value and "pip install -c requirements.lock" in \
                by_id["doctor"].value
            start = next(d for d in demo.fns.values() if d.name == "do_start")
            message = start.fn("", "run9")[0]  # said under Start, where it stays, not in a passing toast
            assert message.startswith("**Not started:**") and "peft is not installed" in message


def test_a_port_in_use_is_one_line_not_a_traceback(tmp_path):
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "app", "--no-browser", "--port", str(port), "--workspace",
                              str(tmp_path / "ws")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"port {port} on 127.0.0.1 is in use" in out.stderr and "--port N" in out.stderr


def test_loss_plot_data_is_numeric_from_the_first_tick_and_the_log_shows_the_newest_lines():
    from app.handlers.train import LOG_LINES, loss_frame, newest_lines

    empty = loss_frame([])
    assert str(empty["step"].dtype) == "int64" and str(empty["loss"].dtype) == "float64"  # not object columns
    frame = loss_frame([(1, 1.0), (2, 0.5)])
    assert list(frame[frame.series == "loss"].loss) == [1.0, 0.5]
    assert list(frame[frame.series == "smoothed"].loss) == [1.0, 0.95]  # the moving average beside it
    with_val = loss_frame([(1, 1.0), (2, 0.5)], [(2, 0.7)])
    assert list(with_val[with_val.series == "validation"].itertuples(index=False, name=None)) == [(2, 0.7, "validation")]
    # Every frame names every series (the plot colours only the series of the first frame it draws); one with
    # no value yet is a single NaN row, which the chart leaves out.
    for f in (empty, frame, with_val):
        assert set(f.series) == {"loss", "smoothed", "validation"}
    assert len(empty) == 3 and empty.loss.isna().all()
    assert frame[frame.series == "validation"].loss.isna().all() and frame.loss.notna().sum() == 4
    assert with_val.loss.notna().all()
    log = "\n".join(f"step {i}" for i in range(1, 31))
    assert newest_lines(log).splitlines() == [f"step {i}" for i in range(31 - LOG_LINES, 31)]


def test_a_long_run_draws_at_most_a_thousand_points_a_series_and_each_tick_sends_only_what_changed(tmp_path):
    """The Train tab sent the whole gallery and checkpoint table with every step (every 1.5 s tick) and the plot
    one point per step however long the run: a new step now sends the plot alone, a new sample the gallery, and
    a 5,000-step run draws the mean of every 5 steps."""
    import json

    import gradio as gr

    from app import jobs
    from app.context import Ctx
    from app.handlers.train import MAX_POINTS, TrainHandlers, loss_frame
    from app.workspace import Workspace

    losses = [(i, float(i % 10)) for i in range(1, 5001)]
    frame = loss_frame(losses)
    raw = frame[frame.series == "loss"]
    assert len(raw) == MAX_POINTS == 1000 and raw.step.iloc[-1] == 5000
    assert list(raw.loss[:2]) == [3.0, 6.0]  # the mean of steps 1-5 (1,2,3,4,5) and 6-10 (6,7,8,9,0)
    assert len(loss_frame(losses[:800])[lambda f: f.series == "loss"]) == 800  # a short run: every step

    ws = Workspace(tmp_path / "ws")
    run = ws.runs / "r"
    run.mkdir(parents=True)
    (run / "job.json").write_text(json.dumps({"state": "running", "pid": None}), encoding="utf-8")
    events = [{"type": "start", "total": 100, "time": 1}, {"type": "step", "step": 1, "loss": 0.5, "time": 1},
              {"type": "sample", "step": 1, "path": str(run / "s.png"), "prompt": "p", "time": 1}]

    def tick(last):
        (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
        return h.refresh("r", last)

    h = TrainHandlers(Ctx(ws, jobs.JobRunner(ws.runs)))
    h.runner.view = lambda name: jobs.view(run, alive=lambda pid, d: True)
    first = tick(None)
    assert not isinstance(first[2], type(gr.skip())) and len(first[3]) == 1  # the first tick sends everything
    events.append({"type": "step", "step": 2, "loss": 0.4, "time": 2})
    second = tick(first[7])
    skip = gr.skip()
    assert len(second[2]) > len(first[2])  # the new point
    assert second[3] == skip and second[6] == skip  # the same gallery and checkpoints are not sent again
    events.append({"type": "sample", "step": 2, "path": str(run / "t.png"), "prompt": "p", "time": 2})
    third = tick(second[7])
    assert third[2] == skip and len(third[3]) == 2  # a new sample: the gallery alone
    assert tick(third[7])[2:4] == (skip, skip)  # nothing new: nothing sent


def test_existing_dataset_name_and_resume_without_a_saved_state_are_refused_at_once(ws, fake_python):
    assert ops.create_dataset(ws, "mine") == "mine"
    with pytest.raises(WorkspaceError, match="dataset mine already exists"):
        ops.create_dataset(ws, "mine")
    runner = jobs.JobRunner(ws.runs, python=fake_python)
    runner.submit("r1", config_text(ws, "r1"))
    wait(runner, "r1", {"finished"})
    with pytest.raises(RuntimeError, match="no saved state to resume from"):
        runner.submit("r1", "", resume=True)
    cut_short = ws.runs / "r1" / "state" / "step-000002"
    cut_short.mkdir(parents=True)  # a save killed before its COMPLETE marker is no state either
    with pytest.raises(RuntimeError, match="no saved state"):
        runner.submit("r1", "", resume=True)
    (cut_short / "COMPLETE").touch()
    assert runner.submit("r1", "", resume=True).state in ("queued", "running")
    wait(runner, "r1", {"finished"})


def test_resume_pressed_as_a_run_ends_is_not_taken_for_a_failed_run(ws, fake_python):
    """The finished run's process was reaped after the resume's job was written: its exit code was recorded over
    the resume, which then read 'failed: the trainer process ended without finishing (exit code 0)' (under load)."""
    runner = jobs.JobRunner(ws.runs, python=fake_python)
    runner.submit("r1", config_text(ws, "r1", mode="linger"))
    wait(runner, "r1", {"finished"})  # its done event is written; its process is still lingering
    real = runner.procs["r1"]
    assert real.poll() is None

    class Ending:  # exits between the resume's two looks at it: alive when submit starts, gone at its tick
        pid, returncode, polls = real.pid, None, 0

        def poll(self):
            self.polls += 1
            if self.polls > 1:
                real.wait()
                self.returncode = real.returncode
            return self.returncode

        def wait(self, timeout=None):
            self.returncode = real.wait(timeout)
            return self.returncode

    runner.procs["r1"] = Ending()
    (ws.runs / "r1" / "state" / "step-000004").mkdir(parents=True)
    (ws.runs / "r1" / "state" / "step-000004" / "COMPLETE").touch()
    resumed = runner.submit("r1", "", resume=True)
    assert resumed.state in ("queued", "running"), resumed.message
    assert wait(runner, "r1", {"finished", "failed"}).state == "finished"


def test_each_page_load_proposes_a_free_run_name(ws):
    from app.context import Ctx
    from app.main import build_app

    demo = build_app(Ctx(ws, jobs.JobRunner(ws.runs, cwd=ws.root)))
    page_state = next(d for d in demo.fns.values() if d.name == "on_page_load")
    assert page_state.fn()[-1] == "run"
    (ws.runs / "run").mkdir(parents=True)  # a run started after the server (and its first page) came up
    assert page_state.fn()[-1] == "run-2"


def test_a_just_stopped_app_leaves_its_port_free():
    """Closed connections linger in TIME_WAIT; the server binds with SO_REUSEADDR, and so must the check."""
    import socket

    from app.cli import port_free

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()
    client.close()
    assert not port_free("127.0.0.1", port)  # still listening
    server.close()
    assert port_free("127.0.0.1", port)


def test_trashing_the_same_image_twice_in_one_second_keeps_both(ws, tmp_path, monkeypatch):
    monkeypatch.setattr(ops.time, "strftime", lambda fmt: "20261130-120000")
    name = ops.create_dataset(ws, "twice")
    folder = ws.dataset(name)
    make_dataset(folder, n=1)
    first = (folder / "img0.png").read_bytes()
    ops.remove_image(ws, name, "img0.png")
    make_dataset(tmp_path / "other", n=2)  # another picture under the same name, with its own caption
    for suffix in (".png", ".txt"):
        (folder / f"img0{suffix}").write_bytes((tmp_path / "other" / f"img1{suffix}").read_bytes())
    ops.remove_image(ws, name, "img0.png")
    kept = sorted((ws.trash / name).rglob("img0.png"))
    assert len(kept) == 2 and {p.read_bytes() for p in kept} == {first, (tmp_path / "other" / "img1.png").read_bytes()}
    assert len(list((ws.trash / name).rglob("img0.txt"))) == 2
    ops.restore_image(ws, name, "img0.png")  # the newest comes back first
    assert (folder / "img0.png").read_bytes() == (tmp_path / "other" / "img1.png").read_bytes()


def test_a_user_error_is_one_console_line_and_its_traceback_goes_to_the_log_file(tmp_path, capsys):
    import gradio as gr

    from app.context import guard, setup_logging

    setup_logging(tmp_path / "app.log")

    @guard
    def do_rename(name):
        raise WorkspaceError(f"{name} already exists in the library; pick another name\nmore detail")

    with pytest.raises(gr.Error) as err:
        do_rename("glorp")
    assert err.value.message == "glorp already exists in the library; pick another name"
    assert err.value.print_exception is False  # gradio would print the whole traceback to the console
    assert capsys.readouterr().err.splitlines() == ["lora-studio: rename: glorp already exists in the library; "
                                                    "pick another name"]
    logged = (tmp_path / "app.log").read_text(encoding="utf-8")
    assert "Traceback (most recent call last)" in logged and "more detail" in logged


def test_files_are_written_with_the_users_umask_not_0600(tmp_path):
    from trainer.atomic import UMASK, write_text

    write_text(tmp_path / "caption.txt", "zorb")
    assert (tmp_path / "caption.txt").stat().st_mode & 0o777 == 0o666 & ~UMASK
    (tmp_path / "caption.txt").chmod(0o640)  # a mode the user chose is kept when the file is replaced
    write_text(tmp_path / "caption.txt", "zorb, red")
    assert (tmp_path / "caption.txt").stat().st_mode & 0o777 == 0o640


def test_a_preview_pauses_the_training_run_and_it_continues_after(ws, fake_python):
    runner = jobs.JobRunner(ws.runs, python=fake_python)
    runner.submit("long", config_text(ws, "long", delay=0.2))
    pid = runner.procs["long"].pid
    state = lambda: Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]  # noqa: E731

    with runner.paused(), runner.paused():  # nested (two previews at once) pauses once
        time.sleep(0.3)
        assert state() == "T"  # stopped: the preview has the CPU
        assert "paused while Preview renders" in runner.view("long").message
    assert state() != "T"
    assert wait(runner, "long", {"finished"}).step == 4  # and it finished normally


def test_sample_prompts_come_from_the_datasets_trigger_and_captions(ws):
    make_dataset(ws.datasets / "mine", n=3)
    ops.save_settings(ws, "mine", "glorp", 1, "character")
    cfg = effective_config(ws, Choice(dataset="mine", preset="character"), "r")
    # Not the demo's "zorb, a large figure..." that the character preset used to carry.
    assert cfg.sample.prompts == ["glorp, a red circle", "glorp, a blue circle"]
    assert ["sample", "sample prompts", "glorp, a red circle | glorp, a blue circle"] in summary(cfg)
    edited = effective_config(ws, Choice(dataset="mine", preset="character", prompts=("glorp on a hill",)), "r")
    assert edited.sample.prompts == ["glorp on a hill"]


def test_checks_run_at_the_training_resolution_and_warn_on_upscaling(ws, tmp_path):
    from trainer.data.validate import report

    from app.train_form import training_resolution

    assert training_resolution(effective_config(ws, Choice(dataset="", preset="character"), "r")) == 64  # embedded
    make_dataset(ws.datasets / "small", n=2, size=(64, 96))
    at_512 = {Path(f["path"]).name: f for f in report(ws.datasets / "small", resolution=512)["files"]}
    at_64 = {Path(f["path"]).name: f for f in report(ws.datasets / "small", resolution=64)["files"]}
    assert any("upscaled" in r for r in at_512["img0.png"]["reasons"])
    assert not any("upscaled" in r for r in at_64["img0.png"]["reasons"])


def test_preview_requests_queue_with_a_position_instead_of_waiting_on_the_worker(ws):
    from app.context import Ctx
    from app.main import build_app

    demo = build_app(Ctx(ws, jobs.JobRunner(ws.runs)))
    preview = [f for f in demo.fns.values() if f.name in ("do_generate", "do_compare", "do_drift")]
    assert len(preview) == 3 and {(f.concurrency_id, f.concurrency_limit) for f in preview} == {("preview-worker", 1)}


def test_a_resumed_run_does_not_show_the_previous_attempts_end_samples(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    events = [{"type": "step", "step": 5, "total": 10, "loss": 0.1, "time": 1.0},
              {"type": "end_samples", "step": 5, "message": "the LoRA is saved; rendering the end samples", "time": 2.0},
              {"type": "done", "step": 5, "stopped": True, "time": 3.0}]
    (run / "events.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    jobs.write_job(run, {"state": "running", "queued_at": 4.0, "resume": True, "pid": 1})
    v = jobs.view(run, alive=lambda pid, d: True)
    assert v.state == "running" and v.phase == "" and "end samples" not in v.message


def test_run_view_lists_each_checkpoint_once_with_its_figures_and_the_plan(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    events = [{"type": "plan", "text": "memory plan for a 8 GB GPU: fits as configured", "time": 1.0},
              {"type": "checkpoint", "step": 100, "validation_loss": 0.05, "drift": 0.06, "path": "a", "time": 2.0},
              {"type": "checkpoint", "step": 200, "validation_loss": 0.04, "drift": 0.07, "path": "b", "time": 3.0},
              {"type": "checkpoint", "step": 200, "validation_loss": 0.041, "drift": 0.07, "path": "b", "time": 4.0},
              {"type": "recommendation", "step": 200, "message": "step 200: lowest validation loss", "time": 5.0}]
    (run / "events.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    jobs.write_job(run, {"state": "finished", "queued_at": 0.0})
    v = jobs.view(run, alive=lambda pid, d: True)
    assert [(c["step"], c["validation_loss"]) for c in v.checkpoints] == [(100, 0.05), (200, 0.041)]
    assert v.plan.endswith("fits as configured") and v.recommendation["drift"] == 0.07


@pytest.mark.timeout(120)
def test_a_started_command_with_a_large_answer_does_not_stall(tmp_path):
    """Captioning thousands of images answers with a JSON object far larger than a pipe's buffer (64 KB) while the
    UI follows the progress lines on stderr; read from a pipe only at the end, that answer stalled the child."""
    from app import trainer_cli

    big = tmp_path / "big"
    big.mkdir()
    pixel = Image.new("RGB", (1, 1))
    for i in range(400):
        name = f"{i:04d}_{'x' * 200}"
        pixel.save(big / f"{name}.png")
        (big / f"{name}.txt").write_text("a, b")
    proc = trainer_cli.start("dataset", "caption", str(big), "--find", "a", "--json")
    lines = list(proc.stderr)
    out = json.loads(trainer_cli.result(proc))
    assert proc.returncode == 0 and lines == [] and len(out["images"]) == 400
    assert len(json.dumps(out)) > 64 * 1024


def test_every_component_lives_inside_a_tab(ws):
    """A component made outside a tab's `with` block (a gr.State passed inline to an event, say) becomes a child of
    the tab bar, and gradio then draws a tab twice and loses another: it happened three times."""
    import gradio as gr

    from app.context import Ctx
    from app.main import build_app

    demo = build_app(Ctx(ws, jobs.JobRunner(ws.runs, cwd=ws.root)))
    tabs = [b for b in demo.blocks.values() if isinstance(b, gr.Tabs)]
    assert len(tabs) == 1
    strays = [type(c).__name__ for c in tabs[0].children if not isinstance(c, gr.Tab)]
    assert strays == [], strays
    assert [c.label for c in tabs[0].children] == ["Datasets", "Train", "Preview", "Library"]


def test_the_run_list_is_resent_only_when_a_run_appears_or_goes(ws):
    """Two runs writing at once swap places in the newest-first list every few seconds; each re-send of the list
    used to re-render the picked run (its loss plot blanked, gradio's queue timer showed over the progress). The
    Train tab's handlers are called here as plain methods, without a page."""
    import gradio as gr

    from app.context import Ctx
    from app.handlers.train import TrainHandlers

    h = TrainHandlers(Ctx(ws, jobs.JobRunner(ws.runs, cwd=ws.root)))
    for name in ("a", "b"):
        ws.run(name).mkdir(parents=True)
    os.utime(ws.run("a"), (1, 1))
    assert ws.run_names() == ["b", "a"]
    update, known = h.sync_runs("a", ["a", "b"])  # the same runs in another order
    assert isinstance(update, type(gr.skip())) and known == ["a", "b"]
    ws.run("c").mkdir()
    update, known = h.sync_runs("a", ["a", "b"])
    assert set(known) == {"a", "b", "c"} and update.value == "a"  # a new run shows; the picked one stays picked
