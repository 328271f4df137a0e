"""Ctrl-C at any moment: one line, exit code 2, no traceback, no wrong diagnosis; SIGKILL or SIGINT at any
phase of a write, then the same command, gives a byte-identical result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glmq.interrupt import INTERRUPTED
from glmq.errors import CheckpointError
from glmq.io.layout import BY_NAME
from glmq.io.writer import JOURNAL_NAME
from glmq.testing import assert_user_error, run_cli_inprocess

# Starts glmq the way `python -m glmq` does, once the interpreter itself is up: a SIGINT during Python's own
# start-up (site, runpy) happens before any glmq code exists and is no part of what these tests measure.
LAUNCHER = r"""
import runpy, sys
import glmq
sys.argv = ["glmq", *sys.argv[1:]]
print("ready", flush=True)
runpy.run_module("glmq", run_name="__main__", alter_sys=True)
"""


def _start(*args: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", LAUNCHER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def _finish(p: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def test_fallback_line_of_main_module_matches_the_cli():
    source = (Path(__file__).resolve().parents[1] / "glmq" / "__main__.py").read_text()
    assert INTERRUPTED in source


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.01, 0.05, 0.15, 0.3, 0.6, 1.0, 1.6, 2.5])
def test_ctrl_c_during_start_up(tiny_dir, delay):
    """inspect imports torch, transformers and diffusers first: the interrupt lands in those imports, in
    argument parsing or in the reading, depending on the delay."""
    p = _start("inspect", str(tiny_dir))
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    proc = _finish(p)
    if proc.returncode == 0:
        pytest.skip(f"inspect finished within {delay} s: nothing left to interrupt")
    assert_user_error(proc, INTERRUPTED)
    assert "does not describe" not in proc.stderr


SWALLOWER = r"""
import sys, time
import glmq.cli

def swallow(args):  # library code that catches KeyboardInterrupt and carries on
    while True:
        try:
            time.sleep(0.01)
        except KeyboardInterrupt:
            pass

glmq.cli._cmd_inspect = swallow
print("ready", flush=True)
sys.exit(glmq.cli.main(["inspect", "x"]))
"""


def test_swallowed_ctrl_c_still_stops_the_run():
    from glmq.interrupt import INTERRUPT_GRACE_S

    p = subprocess.Popen([sys.executable, "-c", SWALLOWER], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    proc = _finish(p, timeout=INTERRUPT_GRACE_S + 30)
    took = time.monotonic() - t0
    print(f"exited {took:.2f} s after the Ctrl-C")
    assert_user_error(proc, INTERRUPTED)
    assert took < INTERRUPT_GRACE_S + 5


def test_broken_import_is_not_blamed_on_the_checkpoint(monkeypatch, tiny_dir):
    import glmq.models.build as build

    def broken(*a, **k):
        raise ImportError("cannot load module more than once per process")

    monkeypatch.setattr(build, "build_model", broken)
    with pytest.raises(ImportError):
        build.expected_specs(BY_NAME["text_encoder"], {"d_model": 8})
    proc = run_cli_inprocess("inspect", str(tiny_dir))
    assert_user_error(proc, "a library failed to import", "check the installation")
    assert "does not describe" not in proc.stderr
    with pytest.raises(CheckpointError, match="does not describe"):  # a real config error still is one
        monkeypatch.undo()
        build.expected_specs(BY_NAME["text_encoder"], {"d_model": "wide"})


# --- interrupted writes resume byte-identically ----------------------------------------------------------


def _journaled(partial: Path) -> int:
    try:
        return len(json.loads((partial / JOURNAL_NAME).read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return -1  # no journal yet (or between its write and its rename)


def _bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("sig,shards", [(signal.SIGINT, 0), (signal.SIGINT, 2), (signal.SIGKILL, 0),
                                        (signal.SIGKILL, 2)])
def test_interrupted_make_tiny_resumes_byte_identical(tiny_dir, tmp_path, sig, shards):
    """Signal a `make-tiny` once its partial folder holds ``shards`` journaled shards (0: just created),
    then run the same command again: the result equals an uninterrupted run, byte for byte."""
    from glmq.maketiny import make_tiny

    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    p = _start("make-tiny", str(out))
    deadline = time.monotonic() + 120
    while _journaled(partial) < shards and p.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.0005)
    if p.poll() is not None:
        pytest.fail(f"make-tiny finished before reaching {shards} shards: {p.returncode}")
    p.send_signal(sig)
    proc = _finish(p)
    if sig == signal.SIGINT:
        assert_user_error(proc, INTERRUPTED)
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and partial.is_dir()
    print("journaled when stopped:", _journaled(partial))
    make_tiny(out, progress=False)  # the same job: resumes
    assert _bytes(out) == _bytes(tiny_dir)
    assert sorted(os.listdir(tmp_path)) == ["out"]
