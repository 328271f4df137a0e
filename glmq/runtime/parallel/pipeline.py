"""``ParallelPipeline``: GLM-Image on two GPUs, called from one process like a one-GPU pipeline.

The caller's process holds no model and no GPU memory. It starts one worker process per GPU
(:mod:`glmq.runtime.parallel.worker`; ``torch.distributed`` between them: NCCL on CUDA, gloo on the CPU),
sends each call to both, and returns their images in order. Two modes (``parallel=``):

- ``"latency"``: one image as fast as possible. The AR runs tensor-parallel (each GPU reads half of its
  weights per token; :mod:`~glmq.runtime.parallel.shard`), the DiT's conditional and unconditional passes run
  on one GPU each (:mod:`~glmq.runtime.parallel.guidance`), the VAE on GPU 0.
- ``"throughput"``: many images per hour. For a list of prompts, GPU 0 runs the AR of image n+1 while GPU 1
  runs the DiT and VAE of image n; each GPU holds a whole pipeline.

Failures: an exception in a worker comes back as one :class:`ParallelError` naming the rank and the
exception (the worker's traceback is in its log, whose folder the message names, and in
``error.worker_traceback``). A worker that dies (killed, out of memory, a crashed driver) is noticed within a
second, whatever the other one is doing. Either way both workers are stopped (one may be waiting in a
collective that can never complete) and the pipeline is closed: load it again to go on. Errors in the
caller's own arguments are raised before anything is sent, and leave the pipeline usable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from multiprocessing import Pipe
from multiprocessing.connection import wait as wait_for

from glmq.errors import GlmqError
from glmq.runtime.parallel import PARALLEL_MODES

DEFAULT_START_TIMEOUT_S = 1800.0  # loading (or building and quantizing) a full-size model, then its first call
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0  # a collective that waits longer than this fails in the worker
LOG_DIR_ENV = "GLMQ_PARALLEL_LOG_DIR"


class ParallelError(GlmqError):
    """A worker of a two-GPU pipeline failed or died; the pipeline is closed."""

    def __init__(self, message: str, *, rank: int | None = None, worker_traceback: str | None = None):
        super().__init__(message)
        self.rank = rank
        self.worker_traceback = worker_traceback


def _kill(procs: list) -> None:
    """Stop worker processes now (SIGKILL): used on failures and when the pipeline is garbage-collected."""
    for p in procs:
        if p.poll() is None:
            try:
                p.kill()
            except OSError:
                pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


class ParallelPipeline:
    """A GLM-Image pipeline over two GPUs (or two CPU processes, for tests); see the module docstring.

    Build it with ``glmq.load(path, gpus=2, parallel=...)`` or :func:`from_builder`. Call it like
    :class:`~glmq.runtime.pipeline.GlmqPipeline` for text-to-image, with one prompt or a list of them. Close it
    with :meth:`close` (or use it as a context manager); a pipeline that is garbage-collected or left at exit
    stops its workers too.
    """

    supports_batch = True  # a call takes a list of prompts and a generator per image (glmq serve batches into it)

    def __init__(self, source: dict, *, device: str = "cuda", gpus: int = 2, parallel: str = "latency",
                 start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
                 collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S):
        if parallel not in PARALLEL_MODES:
            raise GlmqError(f"unknown parallel mode {parallel!r}; valid: {', '.join(PARALLEL_MODES)}")
        if gpus != 2:
            raise GlmqError(f"gpus={gpus}: the parallel modes run on exactly 2 GPUs (gpus=1 is the one-GPU pipeline)")
        kind = device.partition(":")[0]
        if kind not in ("cuda", "cpu") or device not in ("cuda", "cpu"):
            raise GlmqError(f"device {device!r}: a two-GPU pipeline takes device 'cuda' (GPUs 0 and 1 as this "
                            "process sees them) or 'cpu' (two CPU processes, for tests)")
        if kind == "cuda":
            import torch

            if not torch.cuda.is_available() or torch.cuda.device_count() < gpus:
                found = torch.cuda.device_count() if torch.cuda.is_available() else 0
                raise GlmqError(f"gpus={gpus} needs {gpus} CUDA GPUs; this machine has {found}")
        self.parallel, self.gpus, self.device = parallel, gpus, device
        self.last_times = None
        self.last_prior_token_ids = None
        self.last_call: dict = {}
        self.closed = False
        self._lock = threading.Lock()
        self._procs: list[subprocess.Popen] = []
        self._conns: list = []
        # Worker logs (and the rendezvous file) live here; GLMQ_PARALLEL_LOG_DIR keeps them in a folder of
        # the caller's choosing after the pipeline closes (a benchmark's record), else they go with it.
        self._log_root = os.environ.get(LOG_DIR_ENV) or None
        if self._log_root:
            os.makedirs(self._log_root, exist_ok=True)
        self._dir = tempfile.mkdtemp(prefix="glmq-parallel-", dir=self._log_root)
        self._finalizer = weakref.finalize(self, _kill, self._procs)
        try:
            self._start(source, start_timeout_s, collective_timeout_s)
        except BaseException:
            self._abort()
            raise

    # -- workers -----------------------------------------------------------------------------------------
    def _start(self, source: dict, start_timeout_s: float, collective_timeout_s: float) -> None:
        store = os.path.join(self._dir, "store")
        for rank in range(self.gpus):
            ours, theirs = Pipe(duplex=True)
            log = open(os.path.join(self._dir, f"rank{rank}.log"), "wb")
            cmd = [sys.executable, "-m", "glmq.runtime.parallel.worker", "--fd", str(theirs.fileno()),
                   "--rank", str(rank), "--world", str(self.gpus), "--store", store,
                   "--device", f"cuda:{rank}" if self.device == "cuda" else "cpu",
                   "--parent", str(os.getpid()), "--timeout", str(collective_timeout_s)]
            try:
                # A session of its own: a Ctrl-C at the terminal reaches the caller, which stops the workers,
                # rather than each worker separately in the middle of a collective.
                proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True, env=_worker_env())
            finally:
                theirs.close()
                log.close()
            self._procs.append(proc)
            self._conns.append(ours)
        from glmq.runtime.parallel import wire

        for conn in self._conns:
            wire.send(conn, "load", {"source": source, "mode": self.parallel})
        ready = self._collect({r: "ready" for r in range(self.gpus)}, timeout=start_timeout_s, what="starting")
        info = ready[0][0].meta
        self.compile = info.get("compile", False)
        self.mode = info["memory_mode"]
        self.attention_precision = info["attention_precision"]
        self.dtype = info["dtype"]
        self.worker_info = [msgs[0].meta for msgs in ready.values()]

    def _collect(self, until: dict[int, str], *, timeout: float | None, what: str, on_message=None) -> dict:
        """Receive messages until each rank in ``until`` has sent its final kind; returns every message by
        rank. ``on_message(rank, msg)`` sees each one as it arrives. Raises :class:`ParallelError` (and stops
        the workers) on an error message, a dead worker or the timeout."""
        from glmq.runtime.parallel import wire

        got: dict[int, list] = {r: [] for r in range(self.gpus)}
        waiting = dict(until)
        deadline = None if timeout is None else time.monotonic() + timeout
        by_conn = {id(c): r for r, c in enumerate(self._conns)}
        while waiting:
            ready = wait_for(self._conns, timeout=0.5)
            for conn in ready:
                rank = by_conn[id(conn)]
                try:
                    msg = wire.recv(conn)
                except (EOFError, OSError):
                    self._diagnose(what, {rank: None})
                if msg.kind == "error":
                    self._diagnose(what, {rank: msg.meta})
                got[rank].append(msg)
                if on_message is not None:
                    try:
                        on_message(rank, msg)
                    except BaseException:
                        self._abort()  # a callback that raises cancels the call: nothing can resume it
                        raise
                if waiting.get(rank) == msg.kind:
                    del waiting[rank]
            for rank, proc in enumerate(self._procs):
                # A worker that has exited with nothing left in its pipe (its last words are read first).
                if proc.poll() is not None and not self._conns[rank].poll():
                    self._diagnose(what, {rank: None})
            if deadline is not None and time.monotonic() > deadline:
                self._fail(f"{what} took longer than {timeout:g} s; stopped the workers", None)
        return got

    def _diagnose(self, what: str, failed: dict, grace_s: float = 2.0):
        """Raise the :class:`ParallelError` of a failure, naming its cause. One rank failing makes the other
        fail too (a collective loses its peer), and their reports race: so first gather, for up to
        ``grace_s``, what every rank says (``failed``: rank -> its error message, or None for a rank that
        exited without one), then blame a rank's own error over a death, and a death over a lost peer."""
        from glmq.runtime.parallel import wire

        end = time.monotonic() + grace_s
        while time.monotonic() < end and len(failed) < self.gpus:
            for rank, conn in enumerate(self._conns):
                if rank in failed:
                    continue
                try:
                    while conn.poll(0):
                        msg = wire.recv(conn)
                        if msg.kind == "error":
                            failed[rank] = msg.meta
                            break
                except (EOFError, OSError):
                    failed[rank] = None
                if rank not in failed and self._procs[rank].poll() is not None and not conn.poll(0):
                    failed[rank] = None
            time.sleep(0.05)

        def kind(rank):
            meta = failed[rank]
            if meta is None:
                return 1  # died without a word: killed, or a crash below Python
            return 2 if _peer_lost(meta) else 0

        ranks = sorted(failed, key=lambda r: (kind(r), r))
        words = []
        for n, rank in enumerate(ranks):
            meta = failed[rank]
            if meta is None:
                words.append(f"rank {rank} exited during {what} ({self._exit_status(rank)})")
            else:
                text = meta["message"] if meta.get("user_error") else f"{meta['type']}: {meta['message']}"
                limit = 400 if n == 0 else 120  # the cause in full; its consequences in brief
                words.append(f"rank {rank} failed during {what}: {text[:limit]}{'...' if len(text) > limit else ''}")
        first = failed[ranks[0]]
        message = words[0] + (f"; then {'; '.join(w.replace(' during ' + what, '') for w in words[1:])}"
                              if len(words) > 1 else "")
        self._fail(message, ranks[0], first.get("traceback") if first else None)

    def _exit_status(self, rank: int) -> str:
        proc = self._procs[rank]
        try:
            code = proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return "its pipe closed"
        if code < 0:
            import signal

            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def _fail(self, message: str, rank: int | None, worker_traceback: str | None = None):
        self._abort(keep_logs=True)
        raise ParallelError(f"{message} (worker logs: {self._dir})", rank=rank, worker_traceback=worker_traceback)

    def _abort(self, keep_logs: bool = False) -> None:
        """Kill the workers and close the pipeline (after a failure, a cancel or an interruption)."""
        _kill(self._procs)
        for c in self._conns:
            c.close()
        self._conns = []
        self.closed = True
        if not keep_logs and not self._log_root:
            shutil.rmtree(self._dir, ignore_errors=True)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the workers (asking first, killing after ``timeout`` seconds) and free their GPUs."""
        if self.closed:
            return
        from glmq.runtime.parallel import wire

        for c in self._conns:
            try:
                wire.send(c, "close")
            except OSError:
                pass
        end = time.monotonic() + timeout
        for p in self._procs:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._abort()

    release = close  # the name GlmqPipeline uses for giving its resources back

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the call ----------------------------------------------------------------------------------------
    def __call__(self, prompt, image=None, height: int | None = 1024, width: int | None = 1024,
                 num_inference_steps: int = 50, guidance_scale: float = 1.5, generator=None,
                 output_type: str = "pil", *, num_images_per_prompt: int = 1, progress: bool = False,
                 callback=None, timeout_s: float | None = None, **unsupported):
        """Generate images from one prompt or a list of prompts (text-to-image); returns what
        :class:`~glmq.runtime.pipeline.GlmqPipeline` returns: a :class:`GlmqImageOutput` of PIL images, or a
        tensor ``[n, 3, H, W]`` (``"pt"``), or the latents (``"latent"``), in prompt order.

        ``generator``: None (one generator seeded from torch's global generator), one ``torch.Generator`` for
        every image (drawn from image after image, as one process would: the images equal those of
        successive one-GPU calls with that generator), or a list with one per image (image ``i`` equals the
        one-GPU image made with ``generator[i]``). The caller's generators are left as a one-GPU run would
        leave them. ``callback(stage, done, total)``: as one GPU's (in the throughput mode the AR of one image
        and the DiT of another report at the same time). One that raises an ``Exception`` cancels the call:
        the workers finish the image they are on (two ranks in a collective can only stop together), skip the
        rest, and the call raises that exception; the pipeline stays usable. A ``KeyboardInterrupt`` stops the
        workers at once and closes the pipeline. ``timeout_s``: fail (and close) if the call takes longer.
        """
        if self.closed:
            raise GlmqError("this two-GPU pipeline is closed (after close() or a worker failure); load it again")
        if unsupported:
            raise GlmqError(f"{', '.join(sorted(unsupported))}: not supported by the two-GPU pipeline "
                            "(text-to-image from prompts; run other requests on one GPU)")
        if image is not None:
            raise GlmqError("image-to-image runs on one GPU; the two-GPU modes take text-to-image prompts")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise GlmqError("prompt must be a string or a non-empty list of strings")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise GlmqError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        height, width = height or 1024, width or 1024
        if height <= 0 or width <= 0 or height % 32 or width % 32:
            raise GlmqError(f"height and width must be positive multiples of 32, got {height}x{width}")
        if output_type not in ("pil", "pt", "latent"):
            raise GlmqError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise GlmqError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        texts = [p for p in prompts for _ in range(num_images_per_prompt)]
        gens, slots = self._generators(generator, len(texts))
        if self.device == "cpu" and any(g.device.type != "cpu" for g in gens):
            raise GlmqError("a CUDA generator was given to a pipeline running on the CPU; use torch.Generator()")
        with self._lock:  # one call at a time: the workers answer requests in order
            return self._generate(texts, gens, slots, height, width, num_inference_steps, guidance_scale,
                                  output_type, progress, callback, timeout_s)

    def _generate(self, texts, gens, slots, height, width, num_inference_steps, guidance_scale, output_type,
                  progress, callback, timeout_s):
        import torch

        from glmq.runtime import pipeline as one_gpu
        from glmq.runtime.parallel import wire

        if self.closed:
            raise GlmqError("this two-GPU pipeline is closed (after close() or a worker failure); load it again")
        jobs = [{"index": i, "prompt": p, "generator": slots[i]} for i, p in enumerate(texts)]
        tensors = {f"generator{i}": g.get_state() for i, g in enumerate(gens)}
        meta = {"jobs": jobs, "generators": [{"device": g.device.type} for g in gens], "height": height,
                "width": width, "steps": num_inference_steps, "guidance": float(guidance_scale),
                "output_type": output_type, "events": bool(progress or callback)}

        from glmq.progress import StageProgress

        bar = StageProgress(enabled=progress)
        report = callback or (lambda stage, done, total: None)
        ar_times: dict[int, dict] = {}
        timeline: list[tuple[float, int, str, int]] = []  # (seconds into the call, rank, "ar"|"image", image)

        cancel: list[Exception] = []

        def on_message(rank, msg):
            if msg.kind in ("ar", "image"):
                timeline.append((round(time.perf_counter() - t0, 4), rank, msg.kind, msg.meta["index"]))
            if msg.kind == "event" and not cancel:
                stage, done, total = msg.meta["stage"], msg.meta["done"], msg.meta["total"]
                if done == 0:
                    bar.stage(stage, total=total if stage == "DiT" else None)
                elif stage == "DiT":
                    bar.step()
                try:
                    report(stage, done, total)
                except Exception as e:  # noqa: BLE001 - the host cancels: the workers stop at the next image
                    cancel.append(e)
                    for c in self._conns:
                        wire.send(c, "cancel")
            elif msg.kind == "ar":
                ar_times[msg.meta["index"]] = msg.meta

        t0 = time.perf_counter()
        try:
            for c in self._conns:
                wire.send(c, "generate", meta, tensors)
            got = self._collect({r: "done" for r in range(self.gpus)}, timeout=timeout_s, what="generation",
                                on_message=on_message)
        except ParallelError:
            raise
        except BaseException:
            # Ctrl-C, a cancelling callback, a broken pipe: the workers may be mid-request; nothing can resume it.
            self._abort()
            raise
        finally:
            bar.close()
        wall = time.perf_counter() - t0
        if cancel:
            raise cancel[0]
        images = {m.meta["index"]: m for msgs in got.values() for m in msgs if m.kind == "image"}
        if sorted(images) != list(range(len(texts))):
            self._fail(f"the workers returned images {sorted(images)} for {len(texts)} prompts", None)
        for i in range(len(texts)):  # leave the caller's generators where one process would have
            gens[slots[i]].set_state(images[i].tensors["generator"])
        last = images[len(texts) - 1]
        times = one_gpu.StageTimes(**last.meta["times"])
        if self.parallel == "throughput":
            ar = ar_times.get(len(texts) - 1, {})
            times.ar_s, times.ar_tokens = ar.get("ar_s", 0.0), ar.get("ar_tokens", 0)
        times.extra.update(parallel=self.parallel, gpus=self.gpus)
        self.last_times = times
        self.last_prior_token_ids = last.tensors["prior"]
        self.last_call = {"images": len(texts), "wall_s": wall, "images_per_hour": 3600 * len(texts) / wall,
                          "ar_s": [ar_times[i]["ar_s"] for i in sorted(ar_times)],
                          "total_s": [images[i].meta["times"]["total_s"] for i in range(len(texts))],
                          "timeline": timeline,
                          "prior_token_ids": [images[i].tensors["prior"] for i in range(len(texts))],
                          "peak_reserved_gib": {r: msgs[-1].meta.get("peak_reserved_gib") for r, msgs in got.items()}}
        outs = [images[i].tensors["image"] for i in range(len(texts))]
        if output_type != "pil":
            return torch.cat(outs)
        from PIL import Image

        pil = []
        for out in outs:
            arr = (out[0].permute(1, 2, 0).float().cpu().numpy() * 255).round().astype("uint8")
            pil.append(Image.fromarray(arr))
        return one_gpu.GlmqImageOutput(pil)

    def _generators(self, generator, n: int):
        """The call's generators and each image's slot among them (see :meth:`__call__`)."""
        import torch

        if generator is None:
            seed = int(torch.randint(0, 2**62, (1,)))
            return [torch.Generator().manual_seed(seed)], [0] * n
        if isinstance(generator, torch.Generator):
            return [generator], [0] * n
        if isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator):
            if len(generator) != n:
                raise GlmqError(f"{len(generator)} generators for {n} images: give one per image, or a single one")
            gens, slots, index = [], [], {}
            for g in generator:  # the same generator twice in the list: one slot, drawn from in turn
                if id(g) not in index:
                    index[id(g)] = len(gens)
                    gens.append(g)
                slots.append(index[id(g)])
            return gens, slots
        raise GlmqError("generator must be None, a torch.Generator or a list of them (one per image)")

    def __repr__(self) -> str:
        state = "closed" if self.closed else "running"
        return f"ParallelPipeline(parallel={self.parallel!r}, gpus={self.gpus}, device={self.device!r}, {state})"


_PEER_LOST = ("connection reset by peer", "connection closed by peer", "broken pipe", "remote process exited",
              "nccl communicator was aborted", "distbackenderror", "socket closed", "connection refused")


def _peer_lost(meta: dict) -> bool:
    """Whether a worker's error says it lost its peer (the effect of the other rank failing, not a cause)."""
    text = f"{meta.get('type', '')} {meta.get('message', '')}".lower()
    return any(w in text for w in _PEER_LOST)


def _worker_env() -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def load_parallel(path, *, device: str = "cuda", gpus: int = 2, parallel: str = "latency",
                  dtype=None, attention: str = "auto", cuda_graph: bool = True, compile: bool = False,
                  attention_precision: str | None = None, cache_dir=None, **timeouts) -> ParallelPipeline:
    """``glmq.load(path, gpus=2, parallel=...)``: the folder is checked here first (as ``glmq inspect`` does,
    one line on a problem), then each worker loads it onto its GPU."""
    from pathlib import Path

    from glmq.runtime.loader import check_before_load

    path = Path(path)
    check_before_load(path)
    options = {"dtype": str(dtype).removeprefix("torch.") if dtype is not None else None, "attention": attention,
               "cuda_graph": cuda_graph, "compile": compile, "attention_precision": attention_precision,
               "cache_dir": str(cache_dir) if cache_dir is not None else None}
    return ParallelPipeline({"path": str(path.resolve()), "options": options}, device=device, gpus=gpus,
                            parallel=parallel, **timeouts)


def from_builder(builder: str, args: dict, *, device: str = "cuda", gpus: int = 2, parallel: str = "latency",
                 **timeouts) -> ParallelPipeline:
    """A two-GPU pipeline whose workers each build their pipeline by calling ``builder`` ("package.module:
    function", imported in the worker) as ``builder(device=..., **args)``; ``args`` must be JSON. ``glmq bench``
    builds its random full-size models this way (a model in the caller's memory cannot cross processes)."""
    return ParallelPipeline({"builder": builder, "args": args}, device=device, gpus=gpus, parallel=parallel,
                            **timeouts)

