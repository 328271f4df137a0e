"""User-facing errors.

Everything a user can get wrong (a path, a file, a flag) raises :class:`GlmqError` with one sentence that
says what is wrong and, where it helps, what to do. The CLI prints that sentence on stderr and exits with
code 2, without a traceback. Bugs in glmq itself stay ordinary exceptions with tracebacks.
"""

from __future__ import annotations


class GlmqError(Exception):
    """A problem with the user's input, files or environment; the message is one line for the user."""

    exit_code = 2


class CheckpointError(GlmqError):
    """A checkpoint folder or file that is missing, malformed, corrupt or not GLM-Image."""


class OutputExistsError(GlmqError):
    """The output path already exists and ``--force`` was not given."""
