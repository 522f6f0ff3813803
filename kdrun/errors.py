"""Errors that the CLI turns into one clear line and exit code 2."""


class KdrunError(Exception):
    """A user-facing error: bad config, missing file, impossible request.

    The CLI prints ``kdrun: error: <message>`` on one line and exits with code 2
    (a traceback only with HYDRA_FULL_ERROR=1).
    """

    exit_code = 2


class ConfigError(KdrunError):
    """A config value or key that cannot be used; the message names the key."""


class UnreadableImage(ConfigError):
    """An image file that cannot be decoded; the message names the file. Met mid-run (streamed images), the run's
    checkpoints stay good: once the file is fixed, resuming the run continues it."""


class ResumeRefused(ConfigError):
    """A stage checkpoint that cannot be continued here (made by another configuration, or trained on other data),
    found before the stage changed anything: a finished run keeps its metrics.json and gets no FAILED note."""
