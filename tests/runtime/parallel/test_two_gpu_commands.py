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
              "--num-images", "2", "--device", "cpu", "--json")
    two = run_cli_inprocess(*common, "--gpus", "2", "--parallel", "throughput", "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    summary = json.loads(two.stdout)
    print({k: summary[k] for k in ("written", "seconds", "images_per_hour", "memory_mode")})
    assert summary["written"] == 4
    # One GPU makes them one call per image (--batch 1): the throughput mode runs each image alone, and a batched
    # call equals that only up to the rounding of matrix products over more rows (runtime/call.py).
    one = run_cli_inprocess(*common, "--batch", "1", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    names = sorted(p.name for p in (tmp_path / "two").glob("*.png"))
    assert len(names) == 4 and names == sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    for name in names:
        a = np.asarray(Image.open(tmp_path / "two" / name))
        b = np.asarray(Image.open(tmp_path / "one" / name))
        assert a.shape == (64, 64, 3) and np.array_equal(a, b)


def test_generate_one_prompt_on_two_processes(tiny_dir, tmp_path, one_thread):
    common = ("generate", str(tiny_dir), "--prompt", "a 'glmq' sign", "--size", "64x64", "--steps", "2",
              "--device", "cpu", "--json")
    two = run_cli_inprocess(*common, "--gpus", "2", "--out", str(tmp_path / "two.png"))
    assert two.returncode == 0, two.stderr
    one = run_cli_inprocess(*common, "--out", str(tmp_path / "one.png"))
    assert one.returncode == 0, one.stderr
    a, b = (np.asarray(Image.open(tmp_path / f)).astype(int) for f in ("two.png", "one.png"))
    print("latency CLI image vs one process, max |difference| in 8-bit levels:", np.abs(a - b).max())
    assert np.abs(a - b).max() <= 1  # the latency mode's rounding (a few 1e-6) may move a pixel by one level


def test_generate_two_gpu_mistakes_are_one_line(tiny_dir, tmp_path):
    out = str(tmp_path / "x.png")
    ref = tmp_path / "ref.png"
    Image.new("RGB", (64, 64)).save(ref)
    empty = tmp_path / "empty.txt"
    empty.write_text("a\n", encoding="utf-8")
    base = ("generate", str(tiny_dir), "--device", "cpu", "--out", out)
    assert_user_error(run_cli_inprocess(*base, "--prompt", "a", "--gpus", "2", "--image", str(ref)),
                      "runs on one GPU")
    assert_user_error(run_cli_inprocess(*base, "--prompt", "a", "--parallel", "throughput"), "needs gpus=2")
    assert_user_error(run_cli_inprocess(*base, "--prompt", "a", "--gpus", "3"), "--gpus")
    assert_user_error(run_cli_inprocess(*base, "--prompt", "a", "--gpus", "2", "--vram-budget-gb", "8"),
                      "apply to one GPU")
    assert_user_error(run_cli_inprocess(*base, "--prompt", "a", "--prompts", str(empty)), "not allowed with")
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"prompt": "make it red", "image": str(ref)}) + "\n", encoding="utf-8")
    assert_user_error(run_cli_inprocess("generate", str(tiny_dir), "--device", "cpu", "--prompts", str(edits),
                                        "--gpus", "2", "--out", str(tmp_path / "dir")), "text-to-image prompts")


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
    # wall_s is stored to the millisecond: the rate agrees with it within that rounding (5e-4 s of wall_s).
    assert two["images_per_hour"] == pytest.approx(3600 * 2 / two["wall_s"], rel=6e-4 / two["wall_s"])
    assert throughput["seconds_per_image"]["median"] == pytest.approx(two["wall_s"] / 2, abs=1e-3)
    assert two["vs_one_gpu"] == pytest.approx(two["images_per_hour"] / two["one_gpu_images_per_hour"], rel=1e-2)
    md = (tmp_path / "bench" / "bench.md").read_text()
    assert "2 GPUs latency" in md and "2 GPUs throughput" in md and "images/hour" in md


def test_serve_on_two_processes_batches_into_the_throughput_pipeline(tiny_dir, tmp_path, one_thread):
    import base64
    import io
    import signal

    from glmq.testing import http, multipart, start_server

    proc, url = start_server(str(tiny_dir), "--device", "cpu", "--gpus", "2", "--parallel", "throughput",
                             "--max-batch", "4", env={"OMP_NUM_THREADS": "1"}, timeout=240)
    try:
        status, health, _ = http("GET", url + "/health")
        assert status == 200 and health["batched"], health
        status, body, _ = http("POST", url + "/v1/images/generations",
                               {"prompt": "a 'glmq' sign", "n": 2, "size": "64x64", "seed": 7, "steps": 2})
        assert status == 200, body
        got = [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in body["data"]]
        png = io.BytesIO()
        Image.new("RGB", (32, 32), (200, 40, 40)).save(png, format="PNG")
        form, headers = multipart({"prompt": "make it blue", "size": "32x32", "steps": "1"},
                                  [("image", "a.png", png.getvalue())])
        status, body, _ = http("POST", url + "/v1/images/edits", form, headers)
        print("an edit on the two-GPU server:", status, body)
        assert status == 400 and "runs on one GPU" in body["error"]["message"]  # refused; the server goes on
        status, _, _ = http("GET", url + "/health")
        assert status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    log = open(proc.stderr_path).read()
    assert code == 0 and "Traceback" not in log, log[-3000:]
    import glmq

    one = glmq.load(tiny_dir, device="cpu")
    for i, seed in enumerate((7, 8)):  # the server's seeds: seed, seed + 1; each image as one GPU makes it alone
        ref = one("a 'glmq' sign", height=64, width=64, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(seed))[0]
        assert np.array_equal(got[i], np.asarray(ref))
