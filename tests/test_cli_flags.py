"""Bad flag values are one line on stderr, exit code 2, no traceback, and nothing written (issue #21)."""

from __future__ import annotations

import pytest

from glmq.testing import assert_user_error, run_cli_inprocess, tree_snapshot

GENERATE_CASES = [
    (["--steps", "0"], "--steps: must be at least 1"),
    (["--steps", "-3"], "--steps: must be at least 1"),
    (["--size", "0x0"], "positive multiples of 32"),
    (["--size", "1000x1000"], "positive multiples of 32"),
    (["--size=-32x64"], "positive multiples of 32"),
    (["--size", "bigxsmall"], "WIDTHxHEIGHT"),
    (["--guidance", "nan"], "--guidance: must be a finite number"),
    (["--guidance", "inf"], "--guidance: must be a finite number"),
    (["--device", "bogus"], "unknown device 'bogus'"),
    (["--device", "cuda:x"], "unknown device 'cuda:x'"),
    (["--device", "cpu:0"], "unknown device 'cpu:0'"),
    (["--device", "cuda:99"], "--device cuda:99"),  # no GPU here: none available; on a GPU host: no 99th
    (["--seed", "-1"], "--seed: must be between 0 and"),
    (["--vram-budget-gb", "0"], "--vram-budget-gb: must be positive"),
    (["--vram-budget-gb", "nan"], "--vram-budget-gb: must be a finite number"),
]


@pytest.mark.parametrize("extra,needle", GENERATE_CASES, ids=[" ".join(c[0]) for c in GENERATE_CASES])
def test_generate_flags(tiny_dir, tmp_path, extra, needle):
    before = tree_snapshot(tmp_path)
    proc = run_cli_inprocess("generate", str(tiny_dir), "--prompt", "a cat", "--out", str(tmp_path / "x.png"), *extra)
    assert_user_error(proc, needle)
    assert tree_snapshot(tmp_path) == before


@pytest.mark.parametrize("out,needle", [(".", "must name an image file"), ("noext", "unknown image type"),
                                        ("x.notanimage", "unknown image type")])
def test_generate_out_must_be_an_image_file(tiny_dir, tmp_path, monkeypatch, out, needle):
    monkeypatch.chdir(tmp_path)
    before = tree_snapshot(tmp_path)
    assert_user_error(run_cli_inprocess("generate", str(tiny_dir), "--prompt", "a", "--out", out, "--force"), needle)
    assert tree_snapshot(tmp_path) == before


def test_generate_out_that_is_a_folder(tiny_dir, tmp_path):
    (tmp_path / "dir.png").mkdir()
    assert_user_error(run_cli_inprocess("generate", str(tiny_dir), "--prompt", "a", "--out", str(tmp_path / "dir.png"),
                                        "--force"), "is a folder")


@pytest.mark.parametrize("args,needle", [
    (["quantize", "SRC", "--out", "OUT", "--device", "bogus"], "unknown device 'bogus'"),
    (["bench", "--out", "OUT", "--steps", "0"], "--steps: must be at least 1"),
    (["bench", "--out", "OUT", "--tiers", "16,-1"], "--tiers must be positive"),
    (["bench", "--out", "OUT", "--device", "cuda:x"], "unknown device"),
    (["export", "onnx", "SRC", "--out", "OUT", "--group-size", "0"], "--group-size: must be at least 1"),
])
def test_other_commands_flags(tiny_dir, tmp_path, args, needle):
    args = [str(tiny_dir) if a == "SRC" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    before = tree_snapshot(tmp_path)
    assert_user_error(run_cli_inprocess(*args), needle)
    assert tree_snapshot(tmp_path) == before


@pytest.mark.parametrize("cmd", [["make-tiny", "."], ["export", "gguf", "SRC", "--out", "."],
                                 ["quantize", "SRC", "--out", ".", "--recipe", "fast"]])
def test_out_dot_force_is_refused(tiny_dir, tmp_path, monkeypatch, cmd):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "precious.txt").write_text("keep")
    cmd = [str(tiny_dir) if a == "SRC" else a for a in cmd]
    before = tree_snapshot(tmp_path)
    assert_user_error(run_cli_inprocess(*cmd, "--force"), "must name a new folder")
    assert tree_snapshot(tmp_path) == before
