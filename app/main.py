"""Build the Gradio app and serve it."""
from __future__ import annotations

import gradio as gr

from .context import Ctx, setup_logging
from .handlers.train import stem_of
from .jobs import JobRunner
from .preview_client import PreviewClient
from .tabs import datasets, library, preview, train
from .workspace import Workspace, unique_name

CSS = """#run-state p {font-size: 1.05em} footer {display: none !important}
/* 64 px images fill their box, enlarged with hard pixel edges instead of sitting tiny or blurred; grids are
   enlarged already (grids.py) and carry text, so they scale smoothly */
#preview-image img, #compare-grid img, #samples img {width: 100%; height: 100%; object-fit: contain}
#preview-image img, #samples img {image-rendering: pixelated}"""

# Closing or reloading the page while a run trains: the browser asks first (it words the question itself). The
# run keeps going either way, as the run's state on the page says.
HEAD = """<script>
window.addEventListener('beforeunload', function (e) {
  var s = document.querySelector('#run-state');
  if (s && /\\b(running|stopping)\\b/.test(s.innerText)) { e.preventDefault(); e.returnValue = ''; }
});
</script>"""


def build_app(ctx: Ctx) -> gr.Blocks:
    with gr.Blocks(title="LoRA Studio") as demo:
        gr.Markdown(f"## LoRA Studio\nWorkspace: `{ctx.ws.root}`")
        saved_form = gr.BrowserState({}, storage_key="lora-studio-train-form")
        with gr.Tabs() as tabs:
            ds = datasets.build(ctx)
            tr = train.build(ctx, saved_form)
            pv = preview.build(ctx)
            lib = library.build(ctx)

        def lists(current=None):
            names = ctx.ws.dataset_names()
            return (gr.Dropdown(choices=names, value=current) if current else gr.Dropdown(choices=names),
                    gr.Dropdown(choices=["(none)", *names]))

        # The Train tab trains the dataset open on the Datasets tab: one just created, imported into or captioned is
        # the one Start uses (it used to stay on the first sample set).
        ds["dataset"].change(lists, ds["dataset"], list(tr["refresh_datasets"]))

        def on_page_load():
            """The lists as they are now, not as they were when the server started: a reload or a
            second tab sees datasets and runs made since, and is offered a run name that is free."""
            names, runs = ctx.ws.dataset_names(), ctx.ws.run_names()
            active = ctx.runner.running() or next(iter(ctx.runner.queued()), None)
            latest = active if active in runs else (runs[0] if runs else None)
            stem = stem_of(runs[0]) if runs else "run"  # the newest run's name, numbered on: "glorp-run-2"
            return (gr.Dropdown(choices=names, value=ctx.ws.latest_dataset()), *lists(),
                    gr.Dropdown(choices=runs, value=latest), runs, unique_name(ctx.ws.runs, stem))

        demo.load(on_page_load, None, [ds["dataset"], *tr["refresh_datasets"], *tr["runs"], tr["run_name"]])
        # A reload while a run trains or waits lands on its progress, not on the Datasets tab.
        demo.load(lambda: gr.Tabs(selected="train") if tr["active"]() else gr.skip(), None, tabs)
        show, show_out = ds["load"]
        demo.load(show, ds["dataset"], show_out)  # the pre-selected dataset's images, trigger and tags at once
        load_form, inputs, outputs = tr["load_form"]
        demo.load(load_form, inputs, outputs)  # the Train form as the user left it, and its settings
        # The Datasets tab checks at the resolution the chosen model and preset train at.
        tr["resolution"].change(lambda r: r or gr.skip(), tr["resolution"], ds["resolution"])
        # ... and counts caption tokens with that model's tokenizer.
        tr["model"].change(lambda m: m, tr["model"], ds["model"])
        listing, l_in, l_out = lib["listing"]
        demo.load(listing, l_in, l_out)
        refresh, r_in, r_out = pv["refresh"]
        demo.load(refresh, r_in, r_out)  # LoRAs finished since the page was built
        # A rename, trash, import, merge or resize in the Library shows in Preview's slots at once.
        lib["table"].change(refresh, r_in, r_out)

        def page_closed(request: gr.Request):
            """A closed page's long actions (a check, an import) end with it; a training run does not."""
            ctx.page_closed(getattr(request, "session_hash", None))

        demo.unload(page_closed)
    return demo


STARTUP_CHECK_S = 90  # how long the app waits for its own page to answer at start (gradio's own check gives up at 3 s)


def patient_url_ok(url: str, deadline_s: float = STARTUP_CHECK_S, timeout_s: float = 10.0) -> bool:
    """Does the server answer at `url`? gradio asks once with a 3-second timeout and, on a busy machine (a CPU
    training beside it), decides localhost is unreachable and dies asking for a share link. Ask until the deadline."""
    import time

    import httpx

    end = time.monotonic() + deadline_s
    while True:
        try:
            r = httpx.head(url, timeout=timeout_s, verify=False)
            if r.status_code in (200, 401, 301, 302, 303, 307, 308):
                return True
        except (httpx.TransportError, OSError):  # not listening yet, or too busy to answer in time
            pass
        if time.monotonic() >= end:
            return False
        time.sleep(0.5)


class StartupError(RuntimeError):
    """The server started but its page never answered; the message says what to check."""


def serve(ws: Workspace, *, host: str = "127.0.0.1", port: int = 7860, auth=None, open_browser: bool = True,
          block: bool = True, allowed_hosts: tuple[str, ...] = (), allowed_origins: tuple[str, ...] = ()):
    from gradio import networking

    ws.ensure()
    setup_logging(ws.root / "app.log")
    runner = JobRunner(ws.runs, cwd=ws.root).start()
    demo = build_app(Ctx(ws, runner, PreviewClient(ws.root / "preview")))
    demo.queue(default_concurrency_limit=4)
    networking.url_ok = patient_url_ok  # gradio's launch looks it up here for its start-up check
    try:
        _launch(demo, ws, host, port, auth, open_browser, block, allowed_hosts, allowed_origins)
    except ValueError as e:
        if "shareable link" not in str(e):
            raise
        raise StartupError(f"the app started but its page did not answer on http://{host}:{port} within "
                           f"{STARTUP_CHECK_S} s: the machine is very busy, or a proxy intercepts local addresses "
                           "(set NO_PROXY=localhost,127.0.0.1); try again") from None
    return demo, runner


def _launch(demo, ws, host, port, auth, open_browser, block, allowed_hosts, allowed_origins):
    from starlette.middleware import Middleware

    from .request_guard import RequestGuard, is_loopback

    demo.launch(server_name=host, server_port=port, auth=auth, inbrowser=open_browser, prevent_thread_lock=not block,
                allowed_paths=[str(ws.root)], css=CSS, head=HEAD, quiet=False, show_error=True, footer_links=[],
                max_file_size="200mb",  # per upload; the importer adds count and total limits
                app_kwargs={"middleware": [Middleware(RequestGuard, check_host=is_loopback(host),
                                                      allowed_hosts=allowed_hosts, allowed_origins=allowed_origins)]})
