"""Build the Gradio app and serve it."""
from __future__ import annotations

import gradio as gr

from .context import Ctx, setup_logging
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
        with gr.Tabs():
            ds = datasets.build(ctx)
            tr = train.build(ctx, saved_form)
            pv = preview.build(ctx)
            lib = library.build(ctx)

        def lists():
            names = ctx.ws.dataset_names()
            return gr.Dropdown(choices=names), gr.Dropdown(choices=["(none)", *names])

        # A dataset created on the Datasets tab shows up on the Train tab.
        ds["dataset"].change(lists, None, list(tr["refresh_datasets"]))

        def on_page_load():
            """The lists as they are now, not as they were when the server started: a reload or a
            second tab sees datasets and runs made since, and is offered a run name that is free."""
            names, runs = ctx.ws.dataset_names(), ctx.ws.run_names()
            latest = runs[0] if runs else None
            return (gr.Dropdown(choices=names), *lists(), gr.Dropdown(choices=runs, value=latest), runs,
                    unique_name(ctx.ws.runs, "run"))

        demo.load(on_page_load, None, [ds["dataset"], *tr["refresh_datasets"], *tr["runs"], tr["run_name"]])
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
    return demo


def serve(ws: Workspace, *, host: str = "127.0.0.1", port: int = 7860, auth=None, open_browser: bool = True,
          block: bool = True, allowed_hosts: tuple[str, ...] = (), allowed_origins: tuple[str, ...] = ()):
    from starlette.middleware import Middleware

    from .request_guard import RequestGuard, is_loopback

    ws.ensure()
    setup_logging(ws.root / "app.log")
    runner = JobRunner(ws.runs, cwd=ws.root).start()
    demo = build_app(Ctx(ws, runner, PreviewClient(ws.root / "preview")))
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=host, server_port=port, auth=auth, inbrowser=open_browser, prevent_thread_lock=not block,
                allowed_paths=[str(ws.root)], css=CSS, head=HEAD, quiet=False, show_error=True, footer_links=[],
                max_file_size="200mb",  # per upload; the importer adds count and total limits
                app_kwargs={"middleware": [Middleware(RequestGuard, check_host=is_loopback(host),
                                                      allowed_hosts=allowed_hosts, allowed_origins=allowed_origins)]})
    return demo, runner
