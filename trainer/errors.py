"""The errors the CLI turns into one `lora-studio: error:` line. Kept apart from the modules that
raise them, so a command that never trains (dataset import, check) never imports torch to catch them."""


class ModelError(RuntimeError):
    """The base model is missing, unreadable or of the wrong kind. The message says what to do."""


class TrainingError(RuntimeError):
    """A run cannot go on; the message says why and what to try."""


class LoraError(ValueError):
    """A LoRA file that cannot be used, with the reason and what to do."""


class StopRequested(Exception):
    """The user asked the run to stop (a STOP file) before training started: nothing to save."""

    def __init__(self, phase: str):
        super().__init__(phase)
        self.phase = phase
