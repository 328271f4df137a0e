"""Ctrl-C in the ``glmq`` command: one line, exit code 2, at any moment, imports included.

Python's own handling falls short of that in three measured ways: a KeyboardInterrupt raised inside an
import can leave half-initialized modules that later fail as something else (one run blamed the user's
checkpoint: "does not describe a T5EncoderModel (cannot load module more than once per process)"); raised
inside torch's import it can reach C++ code that cannot pass it on, and the process aborts ("terminate
called after throwing an instance of 'python_error'"); and library code that catches it carries on as if
nothing happened. :class:`Interrupts` is installed by :func:`glmq.cli.main` for the length of one command.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_INTERRUPTED = 2
INTERRUPTED = "glmq: interrupted; any .partial output is kept and the same command resumes it"
# After the first Ctrl-C the command unwinds (deleting half-written *.tmp files) in milliseconds. If it is
# still running this much later, library code swallowed the KeyboardInterrupt: glmq exits anyway. Writes are
# safe against SIGKILL at any moment, so exiting there loses nothing a resume does not redo.
INTERRUPT_GRACE_S = 3.0


class Interrupts:
    """Ctrl-C while a command runs, from the first line of :func:`glmq.cli.main` on (imports included).

    The first SIGINT raises KeyboardInterrupt as Python does (unless it lands inside an import: then the
    process ends at once), and starts the grace period: should library code swallow the exception (or turn
    it into another error), the watchdog prints the interrupted line and exits with code 2. A second SIGINT
    exits at once. :func:`glmq.cli.main` reports any error of an interrupted run as the interruption it is,
    never as a problem with the user's files.
    """

    last_interrupted = False  # whether the latest run in this process was interrupted

    def __init__(self):
        self.count = 0
        Interrupts.last_interrupted = False
        self._reported = threading.Lock()
        self._wake = threading.Event()
        self._done = threading.Event()
        self._previous = None
        self._installed = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers belong to the main thread; elsewhere Ctrl-C is the caller's business
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        self._installed = True
        threading.Thread(target=self._watch, name="glmq-interrupt-watchdog", daemon=True).start()

    def uninstall(self) -> None:
        self._done.set()
        self._wake.set()
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _on_sigint(self, signum, frame) -> None:
        self.count += 1
        Interrupts.last_interrupted = True
        if self._done.is_set():  # the command is over; main is returning its result
            return
        if self.count > 1 or _in_import(frame):
            # An exception raised inside an import can leave half-initialized modules behind, and inside
            # torch's import it can reach C++ code that cannot pass it on: the process aborts
            # ("terminate called after throwing an instance of 'python_error'", measured). Writes are
            # safe against SIGKILL at any moment, so ending the process loses nothing a resume does not redo.
            self._hard_exit()
        self._wake.set()
        raise KeyboardInterrupt

    def _watch(self) -> None:
        self._wake.wait()
        if not self._done.wait(INTERRUPT_GRACE_S):
            self._hard_exit()

    def report(self) -> None:
        """Print the interrupted line, once."""
        if self._reported.acquire(blocking=False):
            print(INTERRUPTED, file=sys.stderr, flush=True)

    def _hard_exit(self) -> None:
        if self._reported.acquire(blocking=False):
            os.write(2, (INTERRUPTED + "\n").encode())
        os._exit(EXIT_INTERRUPTED)


def _in_import(frame) -> bool:
    """Whether the interrupted Python frame runs inside an ``import`` (importlib's frames are on its stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def exit_interrupted() -> None:
    """End the process with exit code 2 after an interruption was reported (stdio flushed)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(EXIT_INTERRUPTED)
