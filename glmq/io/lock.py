"""One writer per output: an exclusive ``flock`` on ``OUT.glmq-lock``, held for the whole run.

Two glmq runs given the same ``--out`` would otherwise share ``OUT.partial``: one could commit while the
other is still writing, leaving a folder that disagrees with its own manifest. The second run now fails at
once with one line.

The lock file is removed by the holder when it is done. That is safe because a run that opened the file
before it was removed checks, once it holds the lock, that the path still names the file it locked, and
starts over if not. A run killed with SIGKILL leaves the file behind; the kernel drops its lock, and the
next run takes the file over. ``flock`` locks are per open file: on a network file system without
``flock`` support the lock may not exclude a run on another machine.

Within one process, a thread that opens the same output again takes the lock over from its earlier,
abandoned :class:`~glmq.io.writer.OutputFolder` (one thread cannot run two writes at once; the earlier one
ended with an exception), which can then no longer commit. Another thread is refused like another process.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from glmq.errors import GlmqError

LOCK_SUFFIX = ".glmq-lock"

_held: dict[str, tuple[int, OutputLock]] = {}  # lock path -> (thread id, holder) in this process
_held_guard = threading.Lock()


class OutputLock:
    """The exclusive lock on writing ``out``; :meth:`release` (or process exit) gives it back."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out.with_name(out.name + LOCK_SUFFIX)
        self.key = os.path.abspath(self.path)
        self.fd: int | None = None
        with _held_guard:
            held = _held.get(self.key)
            if held is not None:
                thread, holder = held
                if thread != threading.get_ident():
                    raise self._busy()
                self.fd, holder.fd = holder.fd, None  # take over from the abandoned holder
            else:
                self.fd = self._acquire()
            _held[self.key] = (threading.get_ident(), self)

    def _busy(self) -> GlmqError:
        return GlmqError(f"{self.out} is being written by another glmq run (lock {self.path.name} is held); "
                         f"wait for it to finish or stop it")

    def _acquire(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy() from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
            os.close(fd)  # the previous holder removed the file after we opened it: lock the new one

    @property
    def held(self) -> bool:
        return self.fd is not None

    def check(self) -> None:
        """Raise if this holder lost the lock to a newer write of the same output in this thread."""
        if self.fd is None:
            raise GlmqError(f"{self.out}: this write was superseded by a newer one of the same output")

    def release(self) -> None:
        with _held_guard:
            if self.fd is None:
                return
            if _held.get(self.key, (None, None))[1] is self:
                del _held[self.key]
            fd, self.fd = self.fd, None
            try:
                os.unlink(self.path)  # while still holding the lock: see the module docstring
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)
