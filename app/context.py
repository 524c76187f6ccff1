"""What every tab needs: the workspace, the job runner, and turning known errors into UI messages."""
from __future__ import annotations

import functools
import html
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import ConfigError
from trainer.data.scan import DatasetError

from .jobs import JobRunner
from .preview_client import PreviewClient, PreviewError
from .workspace import Workspace, WorkspaceError

USER_ERRORS = (WorkspaceError, ConfigError, DatasetError, PreviewError, FileExistsError, ValueError, RuntimeError,
               OSError)


@dataclass
class Ctx:
    ws: Workspace
    runner: JobRunner
    preview: PreviewClient | None = None
    # Long actions a page started (a check, an import): (session, kind) -> the CLI process doing it. A new one of the
    # same kind from the same page replaces it, and closing the page ends them all.
    actions: dict = field(default_factory=dict)

    def track(self, session: str | None, kind: str, proc) -> None:
        old = self.actions.pop((session, kind), None)
        if old is not None and old.poll() is None:
            old.kill()  # superseded: the page asked for a new one
        self.actions[(session, kind)] = proc

    def untrack(self, session: str | None, kind: str, proc) -> None:
        if self.actions.get((session, kind)) is proc:
            del self.actions[(session, kind)]
        if proc.poll() is None:
            proc.kill()

    def page_closed(self, session: str | None) -> int:
        """End every action the closed page started; returns how many were still running."""
        ended = 0
        for key in [k for k in self.actions if k[0] == session]:
            proc = self.actions.pop(key)
            if proc.poll() is None:
                proc.kill()
                ended += 1
        return ended

    def render(self, op: str, on_progress=None, **fields) -> dict:
        """A preview request, with any training run paused meanwhile: on a 2-core CPU a run beside it made
        one 64 px image take minutes. The run continues where it was as soon as the image is done. `on_progress`
        gets the worker's phases ("loading the base model", "denoising: step 3 of 20")."""
        with self.runner.paused():
            return self.preview.call(op, on_progress=on_progress, **fields)


LOG = logging.getLogger("lora_studio")
DETAILS = logging.getLogger("lora_studio.details")  # tracebacks: the log file only


def setup_logging(log_file: Path) -> None:
    """A user's mistake is one line on the console; its traceback goes to `log_file` for a bug report."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_file, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("lora-studio: %(message)s"))
    for logger, handlers in ((LOG, (to_file, console)), (DETAILS, (to_file,))):
        logger.handlers[:] = handlers
        logger.setLevel(logging.INFO)
    DETAILS.propagate = False


def guard(fn):
    """Show a handler's user-facing error as a one-line message; the page and its state stay as they were."""
    def refuse(e: Exception):
        import gradio as gr

        line = str(e).splitlines()[0] if str(e) else type(e).__name__
        LOG.info("%s: %s", fn.__name__.removeprefix("do_"), line)
        DETAILS.info("traceback of the above", exc_info=e)
        # print_exception=False: gradio would print the whole traceback to the console for each one.
        return gr.Error(line, print_exception=False)

    if inspect.isgeneratorfunction(fn):  # a handler that streams results (grids filling in)
        @functools.wraps(fn)
        def streaming(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except USER_ERRORS as e:
                raise refuse(e) from None
        return streaming

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            raise refuse(e) from None
    return wrapper


def said_in(message, outputs: list, fn):
    """`fn` (guarded) with its one-line error written into `message`, one of its `outputs`, where it stays
    on the page (a toast vanishes, and the box it was meant for got an 'Error' badge over its old text); the
    other outputs keep their values."""
    import gradio as gr

    at = outputs.index(message)

    def said(e):
        out = [gr.skip()] * len(outputs)
        out[at] = f"**Not done:** {html.escape(e.message)}"
        return tuple(out) if len(outputs) > 1 else out[0]

    if inspect.isgeneratorfunction(fn):  # a handler that streams its progress
        @functools.wraps(fn)
        def streaming(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error as e:
                yield said(e)
        return streaming

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as e:
            return said(e)
    return wrapper
