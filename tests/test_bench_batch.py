"""glmq bench --batch and --first-image, and benchmarks/ar_batch_decode.py, on the CPU with the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glmq.testing import assert_user_error, run_cli_inprocess

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the first-image children, on a shared 2-core runner
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_batch_rows_report_images_per_hour_and_match_batch_one(tiny_dir, tmp_path):
    out = tmp_path / "bench"
    proc = run_cli_inprocess("bench", str(tiny_dir), "--out", str(out), "--size", "64x64", "--steps", "2",
                             "--batch", "1,3", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "bench.json").read_text())
    one, three = result["rows"]  # the batch rows replace the one-image and edit rows
    assert (one["task"], three["task"]) == ("t2i x1", "t2i x3") and one["fit"] and three["fit"]
    assert three["dit_batch"] == 3 and three["ar_batch"] == 4  # no budget on the CPU: one chunk; AR rows 2^k
    s = three["seconds_per_call"]["median"]
    # seconds are stored to the millisecond: the rate agrees with them within that rounding (5e-4 s of s).
    assert three["images_per_hour"] == pytest.approx(3600 * 3 / s, rel=6e-4 / s)
    assert three["seconds_per_image"]["median"] == pytest.approx(s / 3, abs=1e-3)
    assert three["vs_batch_1"] == pytest.approx(three["images_per_hour"] / one["images_per_hour"], abs=0.01)
    assert three["ar_tokens_per_s"] == pytest.approx(3 * 261 / three["stages"]["ar_s"], rel=0.01)
    checks = three["checks"]
    assert checks["same_seed_prior_tokens_equal"] == 1.0
    # Image 0 of the batch (seed 0) is batch 1's image: on the CPU to the bit.
    assert checks["vs_batch_1_prior_tokens_equal"] == 1.0 and checks["vs_batch_1_max_abs_diff"] == 0.0
    assert result["consistency_problems"] == []
    assert result["config"]["batch"] == [1, 3]
    md = (out / "bench.md").read_text()
    assert "## Batches" in md and "| default | - | 64x64 | 3 | resident |" in md


def test_first_image_runs_fresh_processes_over_one_cache_folder(tiny_dir, tmp_path):
    out = tmp_path / "bench"
    proc = run_cli_inprocess("bench", str(tiny_dir), "--out", str(out), "--size", "64x64", "--steps", "1",
                             "--first-image", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "bench.json").read_text())
    assert result["rows"] == []  # without --batch, only the first-image processes ran
    row, = result["first_image"]
    print(json.dumps(row, indent=1))
    assert row["fit"] and row["compile"] is False  # the CPU pipeline does not compile
    cold, cached = row["cold"], row["cached"]
    assert cold["ok"] and cached["ok"] and cold["second_s"] is None and cached["second_s"] > 0
    assert row["cold_first_s"] == cold["first_s"] and row["warm_s"] == cached["second_s"]
    assert cold["process_s"] > cold["ready_s"] > 0
    assert "## First image in a fresh process" in (out / "bench.md").read_text()


def test_bad_batch_lists_are_user_errors(tiny_dir, tmp_path):
    for value in ("0", "1,x", "", "65"):
        assert_user_error(run_cli_inprocess("bench", str(tiny_dir), "--out", str(tmp_path / "b"), "--batch", value),
                          "--batch takes batch sizes")


def test_the_decode_table_script_runs_on_the_tiny_ar(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ar_batch_decode.py"), "--model", "tiny",
                           "--batches", "1,2,4", "--tokens", "24", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "ar_batch_decode.json").read_text())
    assert [r["batch"] for r in result["rows"]] == [1, 2, 4]
    for r in result["rows"]:
        assert r["tokens_per_row"] == 24 and r["step_ms"] > 0
        assert r["tokens_per_s"] == pytest.approx(1000 * r["batch"] / r["step_ms"], rel=0.01)
    assert result["rows"][0]["step_vs_b1"] == 1.0
    assert result["provenance"]["git_commit"] and result["provenance"]["command"]
    assert "| 4 |" in (tmp_path / "ar_batch_decode.md").read_text()
