"""make-tiny writes the release's layout, and stock diffusers runs it without glmq."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from glmq.io.layout import COMPONENTS, WEIGHT_COMPONENTS
from glmq.io.reader import PipelineReader
from glmq.testing import run_cli_inprocess


def test_layout_matches_a_diffusers_pipeline_folder(tiny_dir):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "GlmImagePipeline"
    for c in COMPONENTS:
        assert index[c.name] == [c.library, c.class_name]
        assert (tiny_dir / c.name).is_dir()
    for c in WEIGHT_COMPONENTS:
        folder = tiny_dir / c.name
        assert (folder / "config.json").is_file()
        weight_map = json.loads((folder / c.index_name).read_text())["weight_map"]
        assert set(weight_map.values()) == {p.name for p in folder.glob("*.safetensors")}
    assert len(list((tiny_dir / "vision_language_encoder").glob("model-*-of-*.safetensors"))) > 1
    assert (tiny_dir / "scheduler" / "scheduler_config.json").is_file()
    assert (tiny_dir / "processor" / "tokenizer.json").is_file()


def test_dtypes_are_the_releases(tiny_dir):
    reader = PipelineReader(tiny_dir)
    for c in WEIGHT_COMPONENTS:
        dtypes = {info.dtype for info in reader.component(c.name).tensors.values()}
        assert dtypes == {c.dtype}, (c.name, dtypes)


def test_same_seed_same_bytes_other_seed_other_weights(tiny_dir, tmp_path):
    a = json.loads((tiny_dir / "glmq-manifest.json").read_text())["files"]
    run_cli_inprocess("make-tiny", str(tmp_path / "again"))
    run_cli_inprocess("make-tiny", str(tmp_path / "seed1"), "--seed", "1")
    b = json.loads((tmp_path / "again" / "glmq-manifest.json").read_text())["files"]
    c = json.loads((tmp_path / "seed1" / "glmq-manifest.json").read_text())["files"]
    assert a == b
    shards = [k for k in a if k.endswith(".safetensors")]
    assert all(a[k]["sha256"] != c[k]["sha256"] for k in shards)


STOCK = textwrap.dedent(
    """
    import sys, torch
    from diffusers import GlmImagePipeline
    pipe = GlmImagePipeline.from_pretrained(sys.argv[1])
    out = pipe("a tiny 'sign' on a wall", height=64, width=64, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0))
    img = out.images[0]
    assert img.size == (64, 64) and img.mode == "RGB", img
    assert not any(m == "glmq" or m.startswith("glmq.") for m in sys.modules), "glmq was imported"
    print("OK", img.getextrema())
    """
)


def test_stock_diffusers_loads_and_generates_without_glmq(tiny_dir, tmp_path):
    # Run outside the repository so nothing of ours is importable by accident.
    proc = subprocess.run([sys.executable, "-c", STOCK, str(tiny_dir)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    print(proc.stdout, proc.stderr[-3000:])
    assert proc.returncode == 0
    assert "OK" in proc.stdout


def test_inspect_reports_components_and_verified_manifest(tiny_dir):
    proc = run_cli_inprocess("inspect", str(tiny_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    by_name = {c["name"]: c for c in report["components"]}
    assert by_name["vision_language_encoder"]["class"] == "GlmImageForConditionalGeneration"
    assert by_name["transformer"]["quantization"] is None
    assert by_name["transformer"]["dtypes"] == {"bfloat16": by_name["transformer"]["params"]}
    assert report["manifest"] == {"present": True, "verified": True, "hashes_checked": True,
                                  "files": report["manifest"]["files"], "problems": []}
    assert report["total_params"] == sum(c.get("params", 0) for c in report["components"])


def test_tensors_made_ahead_on_threads_are_the_bytes_made_one_at_a_time(tiny_dir, tmp_path, monkeypatch):
    """make-tiny draws upcoming tensors on worker threads; each has its own seeded generator, so one worker
    with nothing made ahead writes the same shards as the session's folder (made with the defaults)."""
    from glmq import maketiny

    monkeypatch.setattr(maketiny, "AHEAD_WORKERS", 1)
    monkeypatch.setattr(maketiny, "AHEAD_BYTES", 0)
    maketiny.make_tiny(tmp_path / "one", progress=False)
    a = json.loads((tiny_dir / "glmq-manifest.json").read_text())["files"]
    b = json.loads((tmp_path / "one" / "glmq-manifest.json").read_text())["files"]
    assert a == b


def test_ahead_keeps_order_bounds_what_waits_and_passes_errors():
    import threading
    import time
    from collections import Counter

    import pytest

    from glmq.maketiny import Ahead

    order = [f"t{i}" for i in range(40)]
    sizes = {n: (i % 7 + 1) * 100 for i, n in enumerate(order)}
    made, lock = set(), threading.Lock()
    calls = Counter()
    most = 0

    def produce(name):
        time.sleep(0.001)
        with lock:
            made.add(name)
            calls[name] += 1
        return name.upper()

    with Ahead(produce, order, sizes, workers=4, budget=1000) as ahead:
        for i, name in enumerate(order):
            assert ahead.take(name) == name.upper()
            with lock:  # made and not yet taken: bounded by the budget plus one tensor
                waiting = sum(sizes[n] for n in made if order.index(n) > i)
            most = max(most, waiting)
            assert ahead.waiting <= 1000 + max(sizes.values())
    assert 0 < most <= 1000 + max(sizes.values())
    assert made == set(order)
    assert set(calls.values()) == {1}  # each made once, on a thread, and handed over
    with Ahead(produce, order, sizes, workers=2) as ahead:
        assert ahead.take("not planned") == "NOT PLANNED"  # out of plan: made on the spot

    def broken(name):
        if name == "t3":
            raise OSError(28, "No space left on device")
        return name

    with Ahead(broken, order, sizes, workers=2) as ahead:
        assert [ahead.take(n) for n in order[:3]] == order[:3]
        with pytest.raises(OSError, match="No space left"):
            ahead.take("t3")
