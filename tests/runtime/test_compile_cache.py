"""The persistent compile caches (glmq.runtime.compile_cache) on the CPU: the folder is chosen, used by a first
process and reused by a second (Inductor's FX graph and AOTAutograd caches, through the tiny AR's compiled
decode step), a corrupt entry costs a recompilation and nothing else, and glmq's autotune file round-trips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from glmq.runtime import compile_cache as cc

_CHILD = textwrap.dedent("""
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    from glmq.runtime.compile_cache import activate
    root = activate(sys.argv[1])
    from torch._dynamo.utils import counters
    from glmq.models.build import build_processor
    from glmq.runtime.ar_engine import ArEngine, ArRequest
    from glmq.testing import tiny_ar
    inp = build_processor().apply_chat_template([[{"role": "user", "content": [{"type": "text", "text": "a cat"}]}]],
        tokenize=True, target_h=64, target_w=64, return_dict=True, return_tensors="pt")
    engine = ArEngine(tiny_ar(), compile=True)
    t0 = time.perf_counter()
    out, = engine.generate_batch([ArRequest(inp["input_ids"], inp["image_grid_thw"],
                                            generator=torch.Generator().manual_seed(0))])
    print(json.dumps({"seconds": time.perf_counter() - t0, "compiled": engine._compiled, "root": str(root),
                      "tokens": out[0].tolist(), "inductor": dict(counters["inductor"])}))
""")


def _child(root):
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR",
                                                            cc.CACHE_ENV)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(root)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_a_second_process_reuses_the_first_one_s_compilation_and_survives_corruption(tmp_path):
    root = tmp_path / "cache"
    cold, _ = _child(root)
    cached, _ = _child(root)
    print(f"compiled decode step, first generation: empty cache {cold['seconds']:.1f} s, "
          f"cached {cached['seconds']:.1f} s")
    assert cold["compiled"] and cached["compiled"] and cold["root"] == str(root)
    assert cold["inductor"].get("fxgraph_cache_miss", 0) >= 1
    assert cached["inductor"].get("fxgraph_cache_hit", 0) >= 1 and not cached["inductor"].get("fxgraph_cache_miss")
    assert cached["tokens"] == cold["tokens"]
    entries = [p for p in (root / "inductor").rglob("*") if p.is_file() and "locks" not in p.parts]
    assert entries and (root.stat().st_mode & 0o777) == 0o700
    for p in entries:  # every cache entry damaged: PyTorch must recompile over them, not fail
        p.write_bytes(b"not a cache entry")
    damaged, stderr = _child(root)
    print("stderr after corruption (first lines):", stderr.strip().splitlines()[:2])
    assert damaged["compiled"] and damaged["tokens"] == cold["tokens"]
    assert damaged["inductor"].get("fxgraph_cache_miss", 0) >= 1


def test_the_folder_follows_the_argument_then_glmq_cache_dir_then_xdg(tmp_path, monkeypatch):
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", cc.CACHE_ENV, "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cc.cache_root() == tmp_path / "home" / ".cache" / "glmq"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cc.cache_root() == tmp_path / "xdg" / "glmq"
    # The default folder leaves a user's own PyTorch settings alone...
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    assert cc.activate() == tmp_path / "xdg" / "glmq"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "xdg" / "glmq" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine")
    # ...an explicit one (GLMQ_CACHE_DIR, or the argument) replaces them.
    monkeypatch.setenv(cc.CACHE_ENV, str(tmp_path / "env"))
    assert cc.activate() == tmp_path / "env" and os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "env" / "triton")
    assert cc.activate(tmp_path / "arg") == tmp_path / "arg"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "arg" / "inductor")


def test_a_folder_others_can_write_is_not_used(tmp_path, monkeypatch):
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert cc.activate(shared) is None
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ  # PyTorch keeps its own default
    (tmp_path / "file").write_text("")
    assert cc.activate(tmp_path / "file") is None


def test_glmq_autotune_choices_round_trip_and_bad_entries_are_skipped(tmp_path, monkeypatch):
    from glmq.kernels import _attention

    monkeypatch.setattr(_attention, "_TUNED", {})
    good = next(iter(_attention._CANDIDATES.values()))
    key = (0, torch.bfloat16, 128, False, "bf16", False, True, 16, 1, 2048, (True, False))
    _attention._TUNED[key] = good[1]
    store = cc.AutotuneStore(tmp_path, "cpu")
    store.save()
    saved = json.loads(store.path.read_text())
    assert saved["pairs"][0][0][1] == {"dtype": "bfloat16"}
    monkeypatch.setattr(_attention, "_TUNED", {})
    assert cc.AutotuneStore(tmp_path, "cpu").load() == 1
    assert _attention._TUNED == {key: good[1]}
    # An entry naming a config the kernels do not have, a malformed one, then a file that is not JSON.
    other = list(key)
    other[9] = 4096
    saved["pairs"] += [[cc._encode(tuple(other)), [1, 2, 3, 4, True]], ["junk"], [[{"dtype": "nope"}], [1]]]
    store.path.write_text(json.dumps(saved))
    monkeypatch.setattr(_attention, "_TUNED", {})
    assert cc.AutotuneStore(tmp_path, "cpu").load() == 1
    store.path.write_text("{ not json")
    monkeypatch.setattr(_attention, "_TUNED", {})
    assert cc.AutotuneStore(tmp_path, "cpu").load() == 0


def test_compiled_markers(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    monkeypatch.delenv("GLMQ_AR_COMPILE", raising=False)
    monkeypatch.delenv("GLMQ_INT4_KERNEL", raising=False)
    monkeypatch.delenv("GLMQ_ACT_QUANT", raising=False)
    assert not cc.was_compiled(tmp_path, model, "cpu") and not cc.was_compiled(None, model, "cpu")
    cc.mark_compiled(tmp_path, model, "cpu")
    assert cc.was_compiled(tmp_path, model, "cpu")
    assert not cc.was_compiled(tmp_path, tmp_path, "cpu")  # another model
    # other switches compile other graphs: `glmq generate --compile auto` must not take them as cached
    for name, value in (("GLMQ_AR_COMPILE", "step"), ("GLMQ_INT4_KERNEL", "glmq"), ("GLMQ_ACT_QUANT", "inductor")):
        monkeypatch.setenv(name, value)
        assert not cc.was_compiled(tmp_path, model, "cpu")
        monkeypatch.delenv(name)
    assert cc.was_compiled(tmp_path, model, "cpu")
    for marker in (tmp_path / "compiled").iterdir():
        marker.write_text("\x00\x01")
    assert not cc.was_compiled(tmp_path, model, "cpu")


@pytest.mark.parametrize("flag", ["auto", "on"])
def test_generate_compiles_only_on_cuda(tiny_dir, tmp_path, flag):
    from glmq.testing import run_cli_inprocess

    proc = run_cli_inprocess("generate", str(tiny_dir), "--prompt", "x", "--size", "64x64", "--steps", "1",
                             "--device", "cpu", "--compile", flag, "--cache-dir", str(tmp_path / "c"),
                             "--out", str(tmp_path / "x.png"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["compiled"] is False
