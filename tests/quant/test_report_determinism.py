"""Two conversions with default flags write byte-identical folders (reports and manifest included); timings
are kept out of the written files and returned (``--json``) instead."""

from __future__ import annotations

import json

from glmq.io.layout import MANIFEST_NAME
from glmq.testing import run_cli


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_default_runs_are_byte_identical(tiny_dir, tmp_path):
    # Separate processes, as a user would run them: nothing (such as the outlier evaluation's in-process
    # memo) is shared between the two runs.
    outs = [tmp_path / "a", tmp_path / "b"]
    procs = [run_cli("quantize", str(tiny_dir), "--out", str(outs[0]), "--json"),
             run_cli("quantize", str(tiny_dir), "--out", str(outs[1]))]
    for proc in procs:
        assert proc.returncode == 0, proc.stderr
    a, b = _files(outs[0]), _files(outs[1])
    assert MANIFEST_NAME in a and "quantization_report.json" in a and "quantization_report.md" in a
    assert sorted(a) == sorted(b)
    differing = [name for name in a if a[name] != b[name]]
    assert not differing, differing
    # The timings are still measured: on stdout with --json, not in the files.
    printed = json.loads(procs[0].stdout)
    timings = printed["timings"]
    print(timings)
    # The tiny outlier evaluation can round to 0.0 s on a fast machine; each timing is there and non-negative.
    assert all(isinstance(timings[k], float) and timings[k] >= 0 for k in ("outlier_eval_s", "model_level_s"))
    assert timings["total_s"] > 0
    written = json.loads(a["quantization_report.json"])
    assert "timings" not in written and "seconds" not in written["outlier_eval"]
    assert all("seconds" not in row for row in written["outlier_eval"]["rows"])
    assert {k: v for k, v in printed.items() if k != "timings"} == written
