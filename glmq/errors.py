"""User-facing errors.

Everything a user can get wrong (a path, a file, a flag) raises :class:`GlmqError` with one sentence that
says what is wrong and, where it helps, what to do. The CLI prints that sentence on stderr and exits with
code 2, without a traceback. Bugs in glmq itself stay ordinary exceptions with tracebacks.
"""

from __future__ import annotations


class GlmqError(Exception):
    """A problem with the user's input, files or environment; the message is one line for the user."""

    exit_code = 2

    def __init__(self, *args):
        # One line whatever the message quotes (an upstream library's multi-line error, a file name): the CLI
        # prints it as the single line on stderr.
        if len(args) == 1 and isinstance(args[0], str):
            args = (" ".join(args[0].split()),)
        super().__init__(*args)


class CheckpointError(GlmqError):
    """A checkpoint folder or file that is missing, malformed, corrupt or not GLM-Image."""


class OutputExistsError(GlmqError):
    """The output path already exists and ``--force`` was not given."""
