"""Two glmq runs on one ``--out``: exactly one succeeds, the other fails at once, nothing is mixed.

Issue #21 found that, without a lock, 7 of 256 tightly timed pairs committed a folder that was missing
files, held stray ``.tmp`` files or disagreed with its own manifest, while the run reported success.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from glmq.io.layout import MANIFEST_NAME
from glmq.io.manifest import verify_manifest
from glmq.io.writer import OutputFolder
from glmq.testing import assert_user_error, run_cli

ROUNDS = 4

# Each worker runs `glmq make-tiny` (the real CLI code path, in one interpreter so that only the first
# round pays for the imports) once per round, released by a file barrier so that both start together.
# The two workers use different seeds: a folder mixing their files cannot verify against its manifest.
WORKER = r"""
import contextlib, io, json, sys, time
from pathlib import Path
from glmq.cli import main

root, seed, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
import glmq.maketiny, diffusers, transformers  # imports outside the timed race
results = []
for r in range(rounds):
    (root / "sync" / f"ready-{r}-{seed}").touch()
    while not (root / "sync" / f"go-{r}").exists():
        pass
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["make-tiny", str(root / "runs" / f"out-{r}"), "--seed", seed])
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


@pytest.mark.slow
def test_concurrent_runs_on_one_out(tmp_path):
    (tmp_path / "sync").mkdir()
    (tmp_path / "runs").mkdir()
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), str(seed), str(ROUNDS)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    for r in range(ROUNDS):
        deadline = time.monotonic() + 300
        while not all((tmp_path / "sync" / f"ready-{r}-{s}").exists() for s in (0, 1)):
            assert time.monotonic() < deadline and all(w.poll() is None for w in workers), "worker died"
            time.sleep(0.001)
        (tmp_path / "sync" / f"go-{r}").touch()
    outputs = []
    for w in workers:
        out, err = w.communicate(timeout=600)
        assert w.returncode == 0, err
        outputs.append(json.loads(out.strip().splitlines()[-1]))

    lock_refusals = 0
    for r in range(ROUNDS):
        results = [outputs[0][r], outputs[1][r]]
        print(r, results)
        codes = sorted(code for code, _ in results)
        assert codes == [0, 2], results  # exactly one run succeeds
        _, err = next(x for x in results if x[0] == 2)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert "is being written by another glmq run" in lines[0] or "already exists" in lines[0], lines
        lock_refusals += "being written" in lines[0]
        out = tmp_path / "runs" / f"out-{r}"
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        assert verify_manifest(out, manifest) == []  # every file listed, none changed, none extra
        assert not list(out.rglob("*.tmp"))
    # nothing left beside the outputs: no .partial, .glmq-lock or .glmq-old
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [f"out-{r}" for r in range(ROUNDS)]
    print("rounds refused by the lock (the rest by 'already exists'):", lock_refusals)


def test_run_on_a_locked_out_fails_at_once_and_touches_nothing(tmp_path):
    holder = OutputFolder(tmp_path / "out", job={"someone": "else"})  # another run, mid-way
    (holder.partial / "half.bin").write_bytes(b"\0" * 10)
    t0 = time.monotonic()
    proc = run_cli("make-tiny", str(tmp_path / "out"), "--force")
    print(f"refused after {time.monotonic() - t0:.1f} s (interpreter start and imports included)")
    assert_user_error(proc, "out is being written by another glmq run")
    assert (holder.partial / "half.bin").read_bytes() == b"\0" * 10
    holder.commit()
    assert (tmp_path / "out" / "half.bin").exists()
