"""Helpers for glmq's own tests and for users testing glmq integrations (CPU-only, no model weights)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def fail_if_blocked(seconds: int, what: str):
    """Context manager: raise AssertionError (naming ``what``) instead of hanging when the block takes longer
    than ``seconds`` (SIGALRM; main thread only). For reads of FIFOs and other things that could block."""
    import contextlib
    import signal

    @contextlib.contextmanager
    def guard():
        def _timeout(signum, frame):
            raise AssertionError(what)

        old = signal.signal(signal.SIGALRM, _timeout)
        signal.alarm(seconds)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)

    return guard()


def run_cli(*args: str, cwd: str | Path | None = None, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``glmq ARGS`` in a fresh interpreter, as a user would, capturing text output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "glmq", *args], capture_output=True, text=True, cwd=cwd,
                          env=full_env, timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, exactly one line on stderr containing every needle, and no traceback."""
    print("stderr:", proc.stderr)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def assert_one_line_error(err: Exception, *needles: str) -> None:
    """A raised user error reads as one line holding every needle (what the CLI will print)."""
    msg = str(err)
    print(msg)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def tiny_ar(vision_vocab_size: int | None = None, seed: int = 0):
    """The tiny GLM-Image AR (``GlmImageForConditionalGeneration``, CPU, fp32) with every parameter random, norms
    and biases included, so every path carries signal."""
    import torch

    from glmq.io.layout import BY_NAME
    from glmq.models.build import build_model
    from glmq.models.configs import component_config

    cfg = component_config("vision_language_encoder", "tiny")
    if vision_vocab_size is not None:
        cfg["text_config"]["vision_vocab_size"] = vision_vocab_size
    model = build_model(BY_NAME["vision_language_encoder"], cfg, device="cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def format_variants() -> list:
    """Every registered quantization format, int4 at each group size and symmetry: the contract suite."""
    from glmq.quant.formats import FORMATS, Int4Format

    variants = [Int4Format(group_size=g, symmetric=s) for g in (32, 64, 128) for s in (True, False)]
    covered = {type(f) for f in variants}
    return variants + [cls() for cls in FORMATS.values() if cls not in covered]


def tree_snapshot(root: str | Path) -> dict[str, int]:
    """Relative path -> size of every file and folder under ``root`` (to prove nothing was written)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): (p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")}


def run_cli_inprocess(*args: str) -> subprocess.CompletedProcess:
    """Run ``glmq ARGS`` in this interpreter (fast: model libraries are already imported).

    Same code path as the console script from argument parsing on; returns what :func:`run_cli` returns.
    """
    import contextlib
    import io

    from glmq.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse usage errors and --help
            code = e.code if isinstance(e.code, int) else 2
    return subprocess.CompletedProcess(["glmq", *args], code, out.getvalue(), err.getvalue())


# -- glmq serve ------------------------------------------------------------------------------------------------

def start_server(*args: str, env: dict | None = None, timeout: float = 120):
    """Start ``glmq serve ARGS --port 0`` in a fresh interpreter; returns ``(process, base URL)`` once it listens.

    The process's stderr goes to a temporary file (``process.stderr_path``) so a chatty server never blocks on
    a full pipe; its stdout is read for the "listening on" line. The caller ends it (``process.terminate()``)."""
    import re
    import tempfile
    import time

    err = tempfile.NamedTemporaryFile(prefix="glmq-serve-", suffix=".stderr", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "glmq", "serve", *args, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=err, text=True, env={**os.environ, **(env or {})})
    proc.stderr_path = err.name
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    proc.wait()
    raise AssertionError(f"glmq serve did not start: {Path(err.name).read_text()[-3000:]}")


def http(method: str, url: str, body: bytes | dict | None = None, headers: dict | None = None,
         timeout: float = 120) -> tuple[int, dict | str, dict]:
    """One HTTP request with the standard library: ``(status, JSON body or text, headers)``; a dict ``body`` is
    sent as JSON."""
    import json
    import urllib.error
    import urllib.request

    headers = dict(headers or {})
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw, got = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as e:
        status, raw, got = e.code, e.read(), dict(e.headers)
    text = raw.decode("utf-8", "replace")
    try:
        return status, json.loads(text), got
    except ValueError:
        return status, text, got


def multipart(fields: dict[str, str] | list[tuple[str, str]], files: list[tuple[str, str, bytes]]
              ) -> tuple[bytes, dict]:
    """A multipart/form-data body and its Content-Type header from text ``fields`` (a dict, or pairs to repeat
    a name) and ``(part name, file name, bytes)`` files."""
    import uuid

    boundary = uuid.uuid4().hex
    parts = []
    for name, value in (fields.items() if isinstance(fields, dict) else fields):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, filename, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def post_together(url: str, bodies: list[dict], timeout: float = 300) -> list[tuple]:
    """POST each JSON body to ``url`` from its own thread, all released at the same moment (a barrier); the
    answers of :func:`http`, in the order of ``bodies``."""
    import threading

    answers: list = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def client(i):
        start.wait()
        answers[i] = http("POST", url, bodies[i], timeout=timeout)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def same_batched_image(a, b) -> bool:
    """Two 8-bit images (arrays) of one request, one of them made in a batch: equal within one level. The batched
    DiT's fp32 sums round differently from a lone call's (pixels move by ~2e-6 of full scale,
    tests/runtime/test_batch.py), which can flip a value lying on a rounding boundary by one level; another
    seed, prompt or reference moves pixels by tens of levels."""
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    diff = int(np.abs(a.astype(int) - b.astype(int)).max()) if a.shape == b.shape else None
    print("max 8-bit difference, batched vs alone:", diff)
    return diff is not None and diff <= 1
