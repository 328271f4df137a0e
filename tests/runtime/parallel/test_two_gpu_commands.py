"""``glmq generate --gpus 2`` and ``glmq bench --gpus 2`` as two CPU processes on gloo (the tiny model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from glmq.testing import assert_user_error, run_cli_inprocess


@pytest.fixture
def one_thread(monkeypatch):
    """Workers and this process's one-process reference on one thread each (see test_two_processes)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_generate_prompts_on_two_processes_writes_the_one_process_images(tiny_dir, tmp_path, one_thread):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a 'glmq' sign\n\n  a red cube  \n", encoding="utf-8")
    common = ("generate", str(tiny_dir), "--prompts", str(prompts), "--size", "64x64", "--steps", "3", "--seed", "5",
              "--device", "cpu", "--json")
    two = run_cli_inprocess(*common, "--gpus", "2", "--parallel", "throughput", "--out", str(tmp_path / "two.png"))
    assert two.returncode == 0, two.stderr
    summary = json.loads(two.stdout)
    print(summary)
    assert summary["images"] == 2 and summary["seeds"] == [5, 6] and summary["parallel"] == "throughput"
    one = run_cli_inprocess(*common, "--out", str(tmp_path / "one.png"))
    assert one.returncode == 0, one.stderr
    for i in range(2):
        a = np.asarray(Image.open(tmp_path / f"two-{i:03d}.png"))
        b = np.asarray(Image.open(tmp_path / f"one-{i:03d}.png"))
        assert a.shape == (64, 64, 3) and np.array_equal(a, b)


def test_generate_two_gpu_mistakes_are_one_line(tiny_dir, tmp_path):
    out = str(tmp_path / "x.png")
    ref = tmp_path / "ref.png"
    Image.new("RGB", (64, 64)).save(ref)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    base = ("generate", str(tiny_dir), "--device", "cpu", "--out", out)
    assert_user_error(run_cli_inprocess(*base, "--prompt", "a", "--gpus", "2", "--image", str(ref)),
                      "runs on one GPU")
    assert_user_error(run_cli_inprocess(*base, "--prompt", "a", "--parallel", "throughput"), "needs gpus=2")
    assert_user_error(run_cli_inprocess(*base, "--prompt", "a", "--gpus", "3"), "--gpus")
    assert_user_error(run_cli_inprocess(*base, "--prompt", "a", "--gpus", "2", "--vram-budget-gb", "8"),
                      "apply to one GPU")
    assert_user_error(run_cli_inprocess(*base, "--prompts", str(empty)), "no prompts")
    assert_user_error(run_cli_inprocess(*base, "--prompt", "a", "--prompts", str(empty)), "not allowed with")


def test_bench_gpus_2_adds_latency_and_throughput_rows_beside_the_one_gpu_row(tiny_dir, tmp_path, one_thread):
    proc = run_cli_inprocess("bench", str(tiny_dir), "--device", "cpu", "--gpus", "2", "--recipe", "bf16",
                             "--steps", "2", "--size", "64x64", "--edits", "none", "--throughput-images", "2",
                             "--out", str(tmp_path / "bench"), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    one, latency, throughput = result["rows"]
    print(json.dumps([{k: r.get(k) for k in ("mode", "seconds_per_image", "checks")} for r in result["rows"]]))
    assert result["consistency_problems"] == [] and result["config"]["gpus"] == 2
    assert one.get("gpus") is None and latency["parallel"] == "latency" and throughput["parallel"] == "throughput"
    assert latency["fit"] and throughput["fit"]
    # Same seed as the one-GPU row: the same tokens both ways; the throughput image is the same image.
    assert latency["checks"]["vs_one_gpu_prior_tokens_equal"] == 1.0
    assert throughput["checks"]["vs_one_gpu_prior_tokens_equal"] == 1.0
    assert throughput["checks"]["vs_one_gpu_image_max_abs_diff"] == 0
    two = throughput["two_gpus"]
    assert two["images_per_hour"] == pytest.approx(3600 * 2 / two["wall_s"], rel=1e-3)
    assert throughput["seconds_per_image"]["median"] == pytest.approx(two["wall_s"] / 2, abs=1e-3)
    assert two["vs_one_gpu"] == pytest.approx(two["images_per_hour"] / two["one_gpu_images_per_hour"], rel=1e-2)
    md = (tmp_path / "bench" / "bench.md").read_text()
    assert "2 GPUs latency" in md and "2 GPUs throughput" in md and "images/hour" in md
