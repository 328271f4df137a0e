"""The batching queue through real HTTP: concurrent clients land in one pipeline call, every client gets the
images of its own prompt and seeds, a batch the memory plan refuses is split, a failure answers 500 and the
server carries on, and a client leaving a shared batch has only its own images discarded.

The server runs in this process (uvicorn on a free port, in a thread) over :class:`ListsPipeline`: the batched
call's interface (lists in, ``supports_batch``) around the real tiny pipeline, which makes one image per call.
It records each call's size, so the tests see what the queue formed.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import urllib.parse

import numpy as np
import pytest
import torch
from PIL import Image

import glmq
from glmq.errors import GlmqError
from glmq.runtime.pipeline import GlmqImageOutput
from glmq.serve.api import Limits
from glmq.serve.server import GlmqServer, ServeOptions
from glmq.testing import http, post_together, same_batched_image

LIMITS = Limits(max_n=4, max_side=256, max_steps=2000, default_size=(32, 32), default_steps=1)


class ListsPipeline:
    """Lists in, one image per entry out, like the batched pipeline; each entry runs on the real pipeline."""

    supports_batch = True

    def __init__(self, pipe, *, refuse_above: int | None = None):
        self.pipe, self.refuse_above = pipe, refuse_above
        self.calls: list[int] = []

    @property
    def last_times(self):
        return self.pipe.last_times

    def __call__(self, prompt, *, generator, image=None, callback=None, **kwargs):
        if self.refuse_above is not None and len(prompt) > self.refuse_above:
            raise GlmqError(f"a batch of {len(prompt)} images does not fit the budget")  # before any work
        self.calls.append(len(prompt))
        images = []
        for i, p in enumerate(prompt):
            if p == "fail":
                raise RuntimeError("an injected failure")
            out = self.pipe(p, generator=generator[i], image=image[i] if image else None, callback=callback, **kwargs)
            images.extend(out.images)
        return GlmqImageOutput(images)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    # One torch thread: on our shared 2-core machine it made tiny images 5x faster than two (test_server.py).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield glmq.load(tiny_dir, device="cpu")
    torch.set_num_threads(threads)


def _serve(pipeline, **options):
    server = GlmqServer(pipeline, ServeOptions(port=0, limits=LIMITS, access_log=False, log_level="warning",
                                               **options))
    return server, server.start()


def _images(body: dict) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in body["data"]]


def _direct(pipe, prompt: str, seed: int, steps: int = 1) -> np.ndarray:
    out = pipe(prompt, height=32, width=32, num_inference_steps=steps, guidance_scale=LIMITS.default_guidance,
               generator=torch.Generator().manual_seed(seed))
    return np.asarray(out.images[0])


def _metrics(url: str) -> dict:
    return http("GET", url + "/metrics?format=json")[1]


def test_concurrent_clients_share_one_call_and_each_gets_its_own_images(pipe):
    lists = ListsPipeline(pipe)
    # The window is long so that slow thread start-up cannot split the batch; a full batch does not wait for it.
    server, url = _serve(lists, max_batch=4, batch_window_s=5.0)
    try:
        requests = [{"prompt": "a red door", "n": 2, "seed": 10}, {"prompt": "a blue sign", "seed": 20},
                    {"prompt": "a green car", "seed": 30}]
        t0 = time.monotonic()
        answers = post_together(url + "/v1/images/generations", requests)
        elapsed = time.monotonic() - t0
        metrics = _metrics(url)
    finally:
        server.stop()
    print(f"3 clients, 4 images in {elapsed:.2f} s; calls {lists.calls}; batches {metrics['batches']}")
    assert [a[0] for a in answers] == [200, 200, 200], answers
    assert lists.calls == [4] and metrics["batches"] == {"4": 1}
    # The full batch started at once rather than waiting out the 5 s window: the first request waited only
    # for the other two to arrive.
    assert metrics["queue_wait_seconds"]["count"] == 3 and metrics["queue_wait_seconds"]["sum"] < 5.0
    for req, (_, body, _) in zip(requests, answers):
        got = _images(body)
        assert [d["seed"] for d in body["data"]] == [req["seed"] + i for i in range(req.get("n", 1))]
        for i, image in enumerate(got):
            assert same_batched_image(image, _direct(pipe, req["prompt"], req["seed"] + i)), (req, i)
    assert metrics["images_delivered"] == 4 and metrics["stage_seconds"]["ar"] > 0


def test_a_batch_the_memory_plan_refuses_is_split_not_failed(pipe):
    lists = ListsPipeline(pipe, refuse_above=2)
    server, url = _serve(lists, max_batch=4, batch_window_s=5.0)
    try:
        answers = post_together(url + "/v1/images/generations", [{"prompt": "a", "n": 2, "seed": 1}, {"prompt": "b", "n": 2, "seed": 3}])
        metrics = _metrics(url)
    finally:
        server.stop()
    assert [a[0] for a in answers] == [200, 200], answers
    assert lists.calls == [2, 2] and metrics["batches"] == {"2": 2}
    assert [len(a[1]["data"]) for a in answers] == [2, 2]


def test_a_request_larger_than_a_batch_spreads_over_consecutive_calls(pipe):
    lists = ListsPipeline(pipe)
    server, url = _serve(lists, max_batch=2, batch_window_s=0.0)
    try:
        status, body, _ = http("POST", url + "/v1/images/generations", {"prompt": "a red door", "n": 3, "seed": 40})
    finally:
        server.stop()
    assert status == 200 and lists.calls == [2, 1]
    for i, image in enumerate(_images(body)):
        assert same_batched_image(image, _direct(pipe, "a red door", 40 + i)), i


def test_a_failed_call_answers_500_and_the_server_keeps_serving(pipe):
    server, url = _serve(ListsPipeline(pipe), max_batch=4, batch_window_s=0.0)
    try:
        status, body, _ = http("POST", url + "/v1/images/generations", {"prompt": "fail"})
        print(body)
        assert status == 500
        assert body["error"]["type"] == "server_error" and body["error"]["code"] == "generation_failed"
        assert "an injected failure" in body["error"]["message"]
        status, body, _ = http("POST", url + "/v1/images/generations", {"prompt": "a red door", "seed": 10})
        assert status == 200 and np.array_equal(_images(body)[0], _direct(pipe, "a red door", 10))
        assert _metrics(url)["failures"] == {"generation_failed": 1}
    finally:
        server.stop()


def test_a_client_leaving_a_shared_batch_loses_only_its_own_images(pipe):
    lists = ListsPipeline(pipe)
    server, url = _serve(lists, max_batch=2, batch_window_s=5.0)
    u = urllib.parse.urlsplit(url)
    body = json.dumps({"prompt": "a red door", "steps": 300, "seed": 1}).encode()
    leaving = socket.create_connection((u.hostname, u.port))
    try:
        leaving.sendall(f"POST /v1/images/generations HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: "
                        f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        answer = {}
        staying = threading.Thread(target=lambda: answer.update(r=http(
            "POST", url + "/v1/images/generations", {"prompt": "a blue sign", "steps": 300, "seed": 2}, timeout=300)))
        staying.start()
        deadline = time.monotonic() + 60
        while _metrics(url)["running_images"] != 2:
            assert time.monotonic() < deadline, _metrics(url)
            time.sleep(0.02)
        leaving.close()  # mid-batch: the batch goes on for the client that stayed
        staying.join()
        metrics = _metrics(url)
    finally:
        leaving.close()
        server.stop()
    status, got, _ = answer["r"]
    assert status == 200 and lists.calls == [2]
    assert np.array_equal(_images(got)[0], _direct(pipe, "a blue sign", 2, steps=300))
    assert metrics["cancelled"] == {"running": 1} and metrics["images_discarded"] == 1
    assert metrics["images_delivered"] == 1


def test_concurrent_edits_share_one_call_with_a_reference_list_per_image(pipe):
    from glmq.testing import multipart

    refs = [Image.new("RGB", (32, 32), (200, 40, 40)), Image.new("RGB", (48, 32), (20, 200, 20))]
    files = []
    for ref in refs:
        buf = io.BytesIO()
        ref.save(buf, format="PNG")
        files.append(buf.getvalue())
    lists = ListsPipeline(pipe)
    server, url = _serve(lists, max_batch=2, batch_window_s=5.0)
    answers = [None, None]

    def client(i):
        body, headers = multipart({"prompt": f"edit {i}", "seed": str(5 + i), "steps": "2"},
                                  [("image[]", "r.png", files[i])])
        answers[i] = http("POST", url + "/v1/images/edits", body, headers, timeout=300)

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.stop()
    assert [a[0] for a in answers] == [200, 200], answers
    assert lists.calls == [2]
    for i, (_, body, _) in enumerate(answers):
        direct = pipe(f"edit {i}", image=[refs[i]], height=32, width=32, num_inference_steps=2,
                      generator=torch.Generator().manual_seed(5 + i))
        assert np.array_equal(_images(body)[0], np.asarray(direct.images[0]))
