"""One GPU worker thread owns the pipeline; requests wait in a queue and run in dynamically formed batches.

A request of ``n`` images is a :class:`Job`. The worker takes the oldest job, waits a short collection window
for more jobs with the same batch key (size, steps, guidance, reference count), then hands up to
``max_batch`` images (from one job or several, oldest first) to one pipeline call, so the AR decodes
concurrent requests together. A job larger than a batch is spread over consecutive batches.

- A pipeline that says ``supports_batch`` is called once per batch with lists (a prompt, a generator and,
  for edits, a reference list per image); any other pipeline is called once per image (``max_batch`` 1).
- Image i of a request uses the seed ``seed + i``, whichever batch it lands in.
- ``max_queue`` bounds the requests waiting for their first image; one more is answered 429.
- A client that disconnects cancels its job: queued images are dropped at once; images in the running
  call are discarded when it returns, and a call whose clients have all gone stops at its next AR token
  or DiT step.
- A call the memory plan refuses (:class:`GlmqError`) is split in halves and retried; a single image it
  still refuses is answered 400. Any other exception answers 500 for that call's requests, and the worker
  carries on with the next batch.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field

from glmq.errors import GlmqError
from glmq.serve.api import ApiError, ImageRequest
from glmq.serve.metrics import Metrics

log = logging.getLogger("glmq.serve")


class Aborted(Exception):
    """Raised from the pipeline's callback to stop the running call."""


@dataclass(eq=False)
class Job:
    """One request's images on their way through the queue; ``future`` gets a :class:`Result` or an ApiError."""

    request: ImageRequest
    future: Future = field(default_factory=Future)
    accepted: float = field(default_factory=time.perf_counter)
    images: list = field(init=False)
    handed: int = 0  # images given to pipeline calls so far
    made: int = 0
    cancelled: bool = False
    failed: bool = False

    def __post_init__(self):
        self.images = [None] * self.request.n


@dataclass
class Result:
    images: list  # PIL images, in the request's order
    seeds: list[int]
    seconds: float  # from acceptance to the last image


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class Batcher:
    """The queue and the GPU worker thread (see the module docstring). ``window_s``: how long the oldest
    request waits for companions while its batch is not full."""

    def __init__(self, pipe, metrics: Metrics, *, max_batch: int = 8, max_queue: int = 32, window_s: float = 0.1):
        self.pipe, self.metrics = pipe, metrics
        self.batched = bool(getattr(pipe, "supports_batch", False))
        self.max_batch = max_batch if self.batched else 1
        self.max_queue, self.window_s = max_queue, window_s
        self._takes_callback = _accepts(pipe, "callback")
        self._cond = threading.Condition()
        self._queue: list[Job] = []  # jobs with images not yet handed to a call, oldest first
        self._running: list[Job] = []
        self._running_images = 0
        self._accepting = True
        self._abort_reason: str | None = None
        self._thread = threading.Thread(target=self._work, name="glmq-serve-gpu", daemon=True)

    # -- the event loop's side ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def check_fits(self, request: ImageRequest) -> None:
        """Refuse, before queuing, a text-to-image size the pipeline's memory plan cannot fit at all."""
        mode_for, request_for = getattr(self.pipe, "mode_for", None), getattr(self.pipe, "request_for", None)
        if mode_for is None or request_for is None or request.references:
            return  # edits are planned from their references' grids, when the call runs
        try:
            mode_for(request_for(request.height, request.width))
        except GlmqError as e:
            raise ApiError(400, str(e), param="size", code="request_not_feasible") from None

    def submit(self, job: Job) -> None:
        with self._cond:
            if not self._accepting:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if sum(1 for j in self._queue if j.handed == 0) >= self.max_queue:
                raise ApiError(429, f"the queue is full ({self.max_queue} requests waiting); retry later",
                               code="queue_full", type="rate_limit_error")
            self._queue.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job's queued images; what is running is discarded when it returns."""
        with self._cond:
            if job.cancelled or job.failed or job.future.done():
                return
            job.cancelled = True
            if job in self._queue:
                self._queue.remove(job)
            self.metrics.cancel("queued" if job.handed == 0 else "running")
            self._cond.notify_all()

    def close(self) -> None:
        """Accept no more requests; the worker finishes what is queued and running, then stops."""
        with self._cond:
            self._accepting = False
            self._cond.notify_all()

    def abort(self, reason: str) -> None:
        """Fail everything queued and running with 503 ``reason`` (the shutdown deadline passed)."""
        with self._cond:
            self._accepting = False
            self._abort_reason = reason
            self._fail(list(self._queue), ApiError(503, reason, code="shutting_down"))
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker to stop; whether it did."""
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def gauges(self) -> dict[str, float]:
        with self._cond:
            return {"queue_requests": sum(1 for j in self._queue if j.handed == 0),
                    "queue_images": sum(j.request.n - j.handed for j in self._queue),
                    "running_requests": len(self._running), "running_images": self._running_images,
                    "max_batch": self.max_batch, "accepting": int(self._accepting)}

    # -- the worker ---------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            items = self._next_batch()
            if items is None:
                return
            try:
                self._run(items)
            except Exception:  # a bug in the batcher itself: log it and keep serving
                log.exception("glmq serve: the GPU worker failed outside a pipeline call")
                with self._cond:
                    self._fail([job for job, _ in items], ApiError(500, "internal error", code="internal_error"))
            finally:
                with self._cond:
                    self._running, self._running_images = [], 0

    def _next_batch(self) -> list[tuple[Job, int]] | None:
        """The next batch as (job, image index) pairs, after the collection window; None once closed and empty."""
        with self._cond:
            while True:
                while not self._queue:
                    if not self._accepting:
                        return None
                    self._cond.wait()
                if self.max_batch > 1 and self._accepting:
                    deadline = time.monotonic() + self.window_s
                    while self._queue and self._accepting and self._waiting_images(self._queue[0]) < self.max_batch:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    if not self._queue:
                        continue  # every waiting client left during the window
                return self._take()

    def _waiting_images(self, head: Job) -> int:
        key = head.request.batch_key
        return sum(j.request.n - j.handed for j in self._queue if j.request.batch_key == key)

    def _take(self) -> list[tuple[Job, int]]:
        key = self._queue[0].request.batch_key
        items: list[tuple[Job, int]] = []
        now = time.perf_counter()
        for job in list(self._queue):
            if job.request.batch_key != key:
                continue
            if job.handed == 0:
                self.metrics.waited(now - job.accepted)
            while job.handed < job.request.n and len(items) < self.max_batch:
                items.append((job, job.handed))
                job.handed += 1
            if job.handed == job.request.n:
                self._queue.remove(job)
            if len(items) == self.max_batch:
                break
        return items

    def _run(self, items: list[tuple[Job, int]]) -> None:
        with self._cond:  # a half of a split batch may hold images of a request that has failed or left since
            items = [(job, i) for job, i in items if not (job.failed or job.cancelled)]
        if not items:
            return
        jobs = list(dict.fromkeys(job for job, _ in items))
        with self._cond:
            self._running, self._running_images = jobs, len(items)
        req = items[0][0].request
        t0 = time.perf_counter()
        try:
            images, stages = self._generate(items)
        except Aborted:
            with self._cond:
                reason = self._abort_reason
                if reason is not None:
                    self._fail(jobs, ApiError(503, reason, code="shutting_down"))
            log.info("glmq serve: stopped a call of %d image(s): %s", len(items), reason or "every client left")
            return
        except GlmqError as e:
            if len(items) > 1:  # the plan refused the whole batch: try its halves
                log.info("glmq serve: a batch of %d was refused (%s); splitting it", len(items), e)
                half = len(items) // 2
                self._run(items[:half])
                self._run(items[half:])
                return
            self.metrics.failure("request_not_feasible")
            with self._cond:
                self._fail(jobs, ApiError(400, str(e), code="request_not_feasible"))
            return
        except Exception as e:
            log.exception("glmq serve: a pipeline call of %d image(s) failed", len(items))
            self.metrics.failure("generation_failed")
            self._free_device_memory()
            detail = " ".join(str(e).split())[:300]
            with self._cond:
                self._fail(jobs, ApiError(500, f"generation failed ({e.__class__.__name__}: {detail})",
                                          code="generation_failed"))
            return
        seconds = time.perf_counter() - t0
        self.metrics.batch(len(items), seconds, stages)
        log.info("glmq serve: %d image(s) %dx%d, %d steps, for %d request(s) in %.2f s", len(items), req.width,
                 req.height, req.steps, len(jobs), seconds)
        with self._cond:
            for (job, index), image in zip(items, images):
                job.images[index] = image
                job.made += 1
            for job in jobs:
                if job.cancelled:
                    self.metrics.discarded(sum(1 for j, _ in items if j is job))
                elif not job.failed and job.made == job.request.n:
                    job.future.set_result(Result(job.images, job.request.seeds, time.perf_counter() - job.accepted))

    def _generate(self, items: list[tuple[Job, int]]) -> tuple[list, Counter]:
        import torch

        req = items[0][0].request
        kwargs = dict(height=req.height, width=req.width, num_inference_steps=req.steps,
                      guidance_scale=req.guidance, progress=False)
        if self._takes_callback:
            kwargs["callback"] = self._check_abort
        generators = [torch.Generator(device="cpu").manual_seed(job.request.seeds[i]) for job, i in items]
        stages: Counter = Counter()
        if self.batched:
            references = [list(job.request.references) for job, _ in items] if req.references else None
            out = self.pipe(prompt=[job.request.prompt for job, _ in items], generator=generators,
                            image=references, **kwargs)
            images = list(out.images)
            stages.update(self._stage_seconds())
        else:
            images = []
            for (job, _), generator in zip(items, generators):
                out = self.pipe(job.request.prompt, image=list(job.request.references) or None, generator=generator,
                                **kwargs)
                images.extend(out.images)
                stages.update(self._stage_seconds())
        if len(images) != len(items):
            raise RuntimeError(f"the pipeline returned {len(images)} images for {len(items)} prompts")
        return images, stages

    def _check_abort(self, stage: str, done: int, total: int) -> None:
        """The pipeline's progress callback: stop the call at shutdown's deadline or once its clients left."""
        running = self._running
        if self._abort_reason is not None or (running and all(job.cancelled for job in running)):
            raise Aborted

    def _stage_seconds(self) -> dict[str, float]:
        t = getattr(self.pipe, "last_times", None)
        if t is None:
            return {}
        return {"ar": t.ar_s, "glyph": t.glyph_s, "dit": t.dit_s, "vae": t.vae_s}

    def _free_device_memory(self) -> None:
        device = getattr(self.pipe, "device", None)
        if getattr(device, "type", None) == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _fail(self, jobs: list[Job], error: ApiError) -> None:
        """Answer ``jobs`` with ``error`` (the caller holds the lock)."""
        for job in jobs:
            if job.failed or job.future.done():
                continue
            job.failed = True
            if job in self._queue:
                self._queue.remove(job)
            if not job.cancelled:
                job.future.set_exception(error)
