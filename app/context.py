"""What every tab needs: the workspace, the job runner, and turning known errors into UI messages."""
from __future__ import annotations

import functools
from dataclasses import dataclass

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


def guard(fn):
    """Show a handler's user-facing error as a one-line message; the page and its state stay as they were."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import gradio as gr

        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            raise gr.Error(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    return wrapper
