"""The server's counters, as JSON (``GET /metrics?format=json``) and Prometheus' text format (``GET /metrics``).

Requests by endpoint and status, images delivered and discarded, cancellations, the size of every batch the
GPU worker ran, seconds per pipeline stage, and latency histograms. The queue gauges are read from the
batcher when the metrics are asked for, so they are never stale.
"""

from __future__ import annotations

import threading
from collections import Counter

STAGES = ("ar", "glyph", "dit", "vae")
GAUGES = {  # what Batcher.gauges reports, for the Prometheus HELP lines
    "queue_requests": "requests waiting for their first image (the queue --max-queue bounds)",
    "queue_images": "images waiting to be handed to a pipeline call",
    "running_requests": "requests with images in the running pipeline call",
    "running_images": "images in the running pipeline call",
    "max_batch": "most images per pipeline call (1: the pipeline does not batch)",
    "accepting": "1 while new requests are accepted, 0 once shutting down",
}
# Seconds: a 1024x1024 image takes about 15 s on an H200, a tiny CPU image well under one.
LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


def _number(value: float) -> str:
    """A sample value, exact for counts (``:g`` would print 1234567 as 1.23457e+06)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus histograms keep them."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def as_dict(self) -> dict:
        return {"count": self.count, "sum": round(self.sum, 6),
                "buckets": {str(b): c for b, c in zip(self.buckets, self.counts)}}


class Metrics:
    """Thread-safe counters: the event loop and the GPU worker both record."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter = Counter()  # (endpoint, status) -> count
        self.images_delivered = 0
        self.images_discarded = 0  # made for a client that had gone
        self.cancelled: Counter = Counter()  # "queued" / "running" -> requests whose client went away
        self.batches: Counter = Counter()  # images in one pipeline call -> calls
        self.batch_seconds = 0.0
        self.failures: Counter = Counter()  # error code -> pipeline calls that raised
        self.stage_seconds: Counter = Counter()  # stage -> seconds, summed over pipeline calls
        self.queue_wait = Histogram()  # accepted -> first image handed to the pipeline
        self.latency = Histogram()  # accepted -> images ready (200 answers)

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def delivered(self, images: int, latency_s: float) -> None:
        with self._lock:
            self.images_delivered += images
            self.latency.observe(latency_s)

    def discarded(self, images: int) -> None:
        with self._lock:
            self.images_discarded += images

    def cancel(self, where: str) -> None:
        with self._lock:
            self.cancelled[where] += 1

    def waited(self, seconds: float) -> None:
        with self._lock:
            self.queue_wait.observe(seconds)

    def batch(self, images: int, seconds: float, stages: dict[str, float]) -> None:
        with self._lock:
            self.batches[images] += 1
            self.batch_seconds += seconds
            for stage, s in stages.items():
                self.stage_seconds[stage] += s

    def failure(self, code: str) -> None:
        with self._lock:
            self.failures[code] += 1

    def as_dict(self, gauges: dict[str, float]) -> dict:
        with self._lock:
            return {
                "requests": [{"endpoint": e, "status": s, "count": c} for (e, s), c in sorted(self.requests.items())],
                "images_delivered": self.images_delivered,
                "images_discarded": self.images_discarded,
                "cancelled": dict(self.cancelled),
                "batches": {str(size): n for size, n in sorted(self.batches.items())},
                "batch_seconds": round(self.batch_seconds, 6),
                "failures": dict(self.failures),
                "stage_seconds": {s: round(self.stage_seconds[s], 6) for s in STAGES},
                "queue_wait_seconds": self.queue_wait.as_dict(),
                "request_seconds": self.latency.as_dict(),
                **gauges,
            }

    def prometheus(self, gauges: dict[str, float]) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        d = self.as_dict(gauges)
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP glmq_{name} {help_}")
            out.append(f"# TYPE glmq_{name} {kind}")
            out.extend(f"glmq_{name}{labels} {_number(value)}" for labels, value in samples)

        metric("requests_total", "counter", "HTTP answers by endpoint and status code",
               [(f'{{endpoint="{r["endpoint"]}",status="{r["status"]}"}}', r["count"]) for r in d["requests"]])
        metric("images_total", "counter", "images delivered to clients", [("", d["images_delivered"])])
        metric("images_discarded_total", "counter", "images made for clients that disconnected",
               [("", d["images_discarded"])])
        metric("cancelled_requests_total", "counter", "requests whose client disconnected, by where they were",
               [(f'{{where="{w}"}}', c) for w, c in sorted(d["cancelled"].items())])
        metric("batches_total", "counter", "pipeline calls by the number of images they made",
               [(f'{{size="{s}"}}', c) for s, c in d["batches"].items()])
        metric("batch_seconds_total", "counter", "seconds spent in pipeline calls", [("", d["batch_seconds"])])
        metric("generation_failures_total", "counter", "pipeline calls that raised, by error code",
               [(f'{{code="{c}"}}', n) for c, n in sorted(d["failures"].items())])
        metric("stage_seconds_total", "counter", "seconds per pipeline stage, summed over calls",
               [(f'{{stage="{s}"}}', v) for s, v in d["stage_seconds"].items()])
        for name, help_ in (("queue_wait_seconds", "seconds from acceptance to the first image's start"),
                            ("request_seconds", "seconds from acceptance to the images being ready")):
            h = d[name]
            samples = [(f'{{le="{b}"}}', c) for b, c in h["buckets"].items()]
            samples += [('{le="+Inf"}', h["count"])]
            out.append(f"# HELP glmq_{name} {help_}")
            out.append(f"# TYPE glmq_{name} histogram")
            out.extend(f"glmq_{name}_bucket{labels} {_number(value)}" for labels, value in samples)
            out.append(f"glmq_{name}_sum {_number(h['sum'])}")
            out.append(f"glmq_{name}_count {_number(h['count'])}")
        for name, value in gauges.items():
            metric(name, "gauge", GAUGES.get(name, name.replace("_", " ")), [("", value)])
        return "\n".join(out) + "\n"
