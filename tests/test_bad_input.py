"""Every class of bad input gives one line on stderr, exit code 2, no traceback, and writes nothing."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from glmq.testing import assert_user_error, run_cli, run_cli_inprocess, tree_snapshot

DIT = "transformer"
DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"


@pytest.fixture
def broken(tiny_dir, tmp_path):
    """A private copy of the tiny folder to damage."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_dir, dst)
    (dst / "glmq-manifest.json").unlink()  # damage is found by the checks, not only by the manifest
    return dst


def _dit_shard(folder):
    return sorted((folder / DIT).glob("*.safetensors"))[0]


def _rewrite_dit(folder, edit):
    shard = _dit_shard(folder)
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((folder / DIT / DIT_INDEX).read_text())
    index["weight_map"] = {n: shard.name for n in tensors}
    (folder / DIT / DIT_INDEX).write_text(json.dumps(index))


def _inspect_fails(folder, *needles, subprocess=False):
    before = tree_snapshot(folder.parent)
    run = run_cli if subprocess else run_cli_inprocess
    assert_user_error(run("inspect", str(folder)), *needles)
    assert tree_snapshot(folder.parent) == before


def test_missing_path(tmp_path):
    _inspect_fails(tmp_path / "nope", "no such file or folder", subprocess=True)


def test_not_a_glm_image_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    _inspect_fails(tmp_path / "x", "not a GLM-Image pipeline folder", "FluxPipeline")


def test_missing_component(broken):
    shutil.rmtree(broken / "vae")
    _inspect_fails(broken, "missing component folder vae/")


def test_missing_tensor(broken):
    _rewrite_dit(broken, lambda t: t.pop("proj_out.weight"))
    _inspect_fails(broken, "missing tensor 'proj_out.weight'")


def test_wrong_shape(broken):
    def edit(t):
        t["proj_out.weight"] = torch.zeros(3, 5, dtype=torch.bfloat16)

    _rewrite_dit(broken, edit)
    _inspect_fails(broken, "'proj_out.weight' has shape [3, 5]")


def test_wrong_dtype(broken):
    def edit(t):
        t["proj_out.weight"] = torch.zeros_like(t["proj_out.weight"], dtype=torch.int8)

    _rewrite_dit(broken, edit)
    _inspect_fails(broken, "'proj_out.weight' has dtype int8")


def test_truncated_shard(broken):
    shard = _dit_shard(broken)
    shard.write_bytes(shard.read_bytes()[:-100])
    _inspect_fails(broken, "truncated", shard.name)


def test_corrupt_header(broken):
    shard = _dit_shard(broken)
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe\x00\x01"
    shard.write_bytes(bytes(data))
    _inspect_fails(broken, "corrupt", shard.name)


def test_pickle_weights_are_refused_not_loaded(broken, tmp_path):
    for p in (broken / DIT).glob("diffusion_pytorch_model*"):
        p.unlink()
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (broken / DIT / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    _inspect_fails(broken, "pickle", "only safetensors", subprocess=True)
    assert not marker.exists()


def test_changed_file_fails_manifest_verification(tiny_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_dir, dst)
    cfg = dst / "scheduler" / "scheduler_config.json"
    cfg.write_text(cfg.read_text().replace("1000", "999"))
    proc = run_cli_inprocess("inspect", str(dst))
    assert_user_error(proc, "manifest verification failed", "scheduler_config.json")
    assert "manifest: FAILED" in proc.stdout


def test_existing_output_is_not_touched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    before = tree_snapshot(tmp_path)
    assert_user_error(run_cli_inprocess("make-tiny", str(out)), "already exists", "--force")
    assert tree_snapshot(tmp_path) == before


def test_bad_flag_is_one_line():
    assert_user_error(run_cli_inprocess("make-tiny", "x", "--size", "huge"), "invalid choice")
