"""``glmq serve``: uvicorn runs the application, one GPU worker thread runs the pipeline.

:class:`GlmqServer` ties the pieces together and owns the lifecycle:

- the listening socket is bound first, so a port in use is a one-line error before minutes of loading;
- SIGTERM or Ctrl-C stops accepting (new connections are refused, requests on open connections get 503),
  lets queued and running requests finish, then exits with code 0; after ``shutdown_timeout_s`` whatever is
  left is answered 503 and the running pipeline call stops at its next AR token or DiT step. A second Ctrl-C
  exits at once.

``GlmqServer(...).run()`` serves in the calling (main) thread with signal handling; ``start()`` / ``stop()``
serve from a background thread, for tests and benchmark scripts that drive their own clients.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field

import uvicorn

from glmq.errors import GlmqError
from glmq.serve.api import Limits
from glmq.serve.app import ServerState, create_app
from glmq.serve.batcher import Batcher
from glmq.serve.metrics import Metrics

log = logging.getLogger("glmq.serve")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8  # images per pipeline call (a pipeline without batching runs one at a time)
    max_queue: int = 32  # requests waiting for their first image; one more gets 429
    batch_window_s: float = 0.1  # how long the oldest request waits for companions while its batch is not full
    shutdown_timeout_s: float = 60.0
    log_level: str = "info"
    access_log: bool = True
    model: str = "glm-image"  # the id /v1/models reports
    limits: Limits = field(default_factory=Limits)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket, or a one-line GlmqError (address in use, no permission, unknown host)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise GlmqError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise GlmqError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


class _Uvicorn(uvicorn.Server):
    """uvicorn's server with our shutdown: the first signal starts draining (and the deadline); the process
    then exits normally instead of re-raising the signal after the graceful stop, as uvicorn does."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
            return
        first = not self.should_exit
        self.should_exit = True
        if first:
            self._on_exit()


class GlmqServer:
    """A pipeline served over HTTP; see the module docstring."""

    def __init__(self, pipe, options: ServeOptions, *, sock: socket.socket | None = None, info: dict | None = None):
        self.options = options
        self.sock = sock if sock is not None else bind(options.host, options.port)
        self.metrics = Metrics()
        self.batcher = Batcher(pipe, self.metrics, max_batch=options.max_batch, max_queue=options.max_queue,
                               window_s=options.batch_window_s)
        self.state = ServerState(limits=options.limits, model=options.model, info=dict(info or {}))
        self.state.info.setdefault("batched", self.batcher.batched)
        self.app = create_app(self.batcher, self.metrics, self.state)
        config = uvicorn.Config(self.app, log_level=options.log_level, access_log=options.access_log, lifespan="off",
                                # uvicorn's own deadline is a backstop: ours answers 503 first
                                timeout_graceful_shutdown=options.shutdown_timeout_s + 5)
        self._server = _Uvicorn(config, self._begin_shutdown)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def _begin_shutdown(self) -> None:
        """From the signal handler (or :meth:`stop`): only flags here; the rest runs on the event loop."""
        self.state.draining = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        g = self.batcher.gauges()
        log.info("glmq serve: shutting down; finishing %d running and %d queued request(s)", g["running_requests"],
                 g["queue_requests"])
        self.batcher.close()
        self._loop.call_later(self.options.shutdown_timeout_s, self.batcher.abort,
                              f"the server is shutting down (deadline of {self.options.shutdown_timeout_s:g} s passed)")

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.batcher.start()
        await self._server.serve(sockets=[self.sock])

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT, then drain and return."""
        _configure_logging(self.options.log_level)
        try:
            asyncio.run(self._serve())
        finally:
            self._finish()

    def start(self) -> str:
        """Serve from a background thread; returns the base URL once the server accepts connections."""
        _configure_logging(self.options.log_level)
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), name="glmq-serve-http",
                                        daemon=True)
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread stopped during start-up")
            self._thread.join(0.02)
        return self.url

    def stop(self) -> None:
        """What SIGTERM does, for a server from :meth:`start`: drain, then stop the threads."""
        self._server.handle_exit(signal.SIGTERM, None)
        if self._thread is not None:
            self._thread.join()
        self._finish()

    def _finish(self) -> None:
        if self._server.force_exit:  # a second Ctrl-C: stop the running call too, answer the rest 503
            self.batcher.abort("the server was stopped")
        self.batcher.close()
        if not self.batcher.join(timeout=self.options.shutdown_timeout_s + 10):
            log.warning("glmq serve: the GPU worker did not stop in time")
        self.sock.close()


def _configure_logging(level: str) -> None:
    logger = logging.getLogger("glmq.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())
