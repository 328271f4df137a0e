"""Writing never deletes what glmq did not create, and never copies what lies outside the source folder."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
import torch

from glmq.errors import GlmqError, OutputExistsError
from glmq.io.layout import BY_NAME, MANIFEST_NAME
from glmq.io.manifest import verify_manifest
from glmq.io.writer import OWNED_MARKER, OutputFolder
from glmq.testing import assert_one_line_error, tree_snapshot

COMP = BY_NAME["transformer"]
SPECS = [(f"blocks.{i}.weight", "bfloat16", (8, 8)) for i in range(2)]


def _write(out, *, force=False, job=None, src=None, side=None):
    folder = OutputFolder(out, job=job or {"t": 1}, force=force)
    folder.write_json(f"{COMP.name}/config.json", {"x": 1})
    if src is not None:
        folder.copy_in(src, side)
    folder.component_writer(COMP, SPECS).write(lambda n: torch.ones(8, 8, dtype=torch.bfloat16))
    return folder.commit()


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_commit_leaves_no_marker_lock_or_old_folder(tmp_path):
    out = _write(tmp_path / "out")
    _write(out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .partial, .glmq-lock, .glmq-old
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert OWNED_MARKER not in manifest["files"] and verify_manifest(out, manifest) == []


def test_foreign_partial_is_left_untouched(tmp_path):
    foreign = tmp_path / "out.partial"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    before = tree_snapshot(tmp_path)
    with pytest.raises(GlmqError) as e:
        _write(tmp_path / "out")
    assert_one_line_error(e.value, "out.partial", "not created by glmq")
    assert tree_snapshot(tmp_path) == before
    # --force is about OUT, not about OUT.partial
    with pytest.raises(GlmqError, match="not created by glmq"):
        _write(tmp_path / "out", force=True)
    assert (foreign / "thesis.tex").read_text() == "years of work"


def test_own_partial_of_another_job_is_replaced_and_empty_one_reused(tmp_path):
    folder = OutputFolder(tmp_path / "out", job={"t": 1})
    (folder.partial / "stale.bin").write_bytes(b"x")
    folder.close()  # interrupted: the partial stays, marked as glmq's
    assert (tmp_path / "out.partial" / OWNED_MARKER).exists()
    _write(tmp_path / "out", job={"t": 2})
    assert not (tmp_path / "out" / "stale.bin").exists()
    (tmp_path / "b.partial").mkdir()  # a crash between mkdir and the marker leaves it empty
    _write(tmp_path / "b")
    assert (tmp_path / "b" / MANIFEST_NAME).exists()


def test_force_refuses_a_foreign_glmq_old(tmp_path):
    out = _write(tmp_path / "out")
    old = tmp_path / "out.glmq-old"
    old.mkdir()
    (old / "keep.txt").write_text("someone else's")
    before = tree_snapshot(tmp_path)
    with pytest.raises(GlmqError) as e:
        _write(out, force=True)
    assert_one_line_error(e.value, "out.glmq-old", "not created by glmq")
    assert tree_snapshot(tmp_path) == before


def test_force_removes_only_its_own_glmq_old(tmp_path):
    out = _write(tmp_path / "out")
    old = tmp_path / "out.glmq-old"  # debris of a forced replacement killed before its clean-up
    old.mkdir()
    (old / OWNED_MARKER).touch()
    (old / "replaced").mkdir()
    _write(out, force=True)
    assert not old.exists() and (out / MANIFEST_NAME).exists()


@pytest.mark.parametrize("name", [".", "..", "/"])
def test_out_that_would_delete_the_cwd_or_root_is_refused(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("keep")
    before = tree_snapshot(tmp_path)
    with pytest.raises(GlmqError) as e:
        _write(name, force=True)
    assert_one_line_error(e.value, "output")
    assert tree_snapshot(tmp_path) == before


def test_out_holding_the_cwd_or_a_source_is_refused(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    with pytest.raises(GlmqError, match="contains the current folder"):
        OutputFolder(tmp_path / "a", job={}, force=True)
    with pytest.raises(GlmqError, match="must not be the input folder"):
        OutputFolder(tmp_path / "x" / "inside", job={}, sources=(tmp_path / "x",))
    assert not (tmp_path / "a.partial").exists()


def test_second_writer_of_one_output_fails_at_once(tmp_path):
    first = OutputFolder(tmp_path / "out", job={"t": 1})
    errors = []

    def other_thread():  # another thread is refused like another process
        try:
            OutputFolder(tmp_path / "out", job={"t": 1})
        except GlmqError as e:
            errors.append(e)

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert len(errors) == 1
    assert_one_line_error(errors[0], "is being written by another glmq run")
    assert (tmp_path / "out.glmq-lock").exists()
    first.commit()
    assert not (tmp_path / "out.glmq-lock").exists()


def test_same_thread_takes_over_an_abandoned_write(tmp_path):
    abandoned = OutputFolder(tmp_path / "out", job={"t": 1})  # e.g. its run raised; the object lingers
    _write(tmp_path / "out")
    with pytest.raises(GlmqError, match="superseded"):
        abandoned.commit()
    assert (tmp_path / "out" / MANIFEST_NAME).exists()


def test_existing_out_check_releases_the_lock(tmp_path):
    out = _write(tmp_path / "out")
    with pytest.raises(OutputExistsError):
        _write(out)
    assert not (tmp_path / "out.glmq-lock").exists()


# --- source files ----------------------------------------------------------------------------------------


@pytest.fixture
def src(tmp_path):
    s = tmp_path / "src"
    (s / "processor").mkdir(parents=True)
    (s / "processor" / "config.json").write_text("{}")
    return s


def test_side_file_linked_outside_the_source_is_refused(src, tmp_path):
    secret = tmp_path / "netrc"
    secret.write_text("machine example.com password hunter2")
    (src / "processor" / "notes.txt").symlink_to(secret)
    with pytest.raises(GlmqError) as e:
        _write(tmp_path / "out", src=src, side="processor")
    assert_one_line_error(e.value, "notes.txt", "outside the source folder")
    assert "hunter2" not in str(e.value)
    assert not (tmp_path / "out").exists()
    assert not any(p.name == "notes.txt" for p in (tmp_path / "out.partial").rglob("*"))


def test_side_file_linked_inside_the_source_is_copied_as_a_file(src, tmp_path):
    (src / "processor" / "alias.json").symlink_to(src / "processor" / "config.json")
    out = _write(tmp_path / "out", src=src, side="processor")
    copied = out / "processor" / "alias.json"
    assert not copied.is_symlink() and copied.read_text() == "{}"


def test_hf_cache_snapshot_links_into_blobs_are_followed(tmp_path):
    repo = tmp_path / "models--zai-org--GLM-Image"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_text('{"a": 1}')
    snap = repo / "snapshots" / "0123abcd"
    (snap / "processor").mkdir(parents=True)
    (snap / "processor" / "config.json").symlink_to("../../../blobs/abc123")
    out = _write(tmp_path / "out", src=snap, side="processor")
    assert (out / "processor" / "config.json").read_text() == '{"a": 1}'


def test_fifo_and_device_side_files_are_refused(src, tmp_path):
    os.mkfifo(src / "processor" / "pipe.json")
    with pytest.raises(GlmqError) as e:  # would block forever if opened blindly
        _write(tmp_path / "out", src=src, side="processor")
    assert_one_line_error(e.value, "pipe.json", "FIFO")
    (src / "processor" / "pipe.json").unlink()
    # a tensor file may live anywhere (cache blobs), but never be a device: /dev/zero would fill the disk
    (src / "processor" / "zero.safetensors").symlink_to("/dev/zero")
    with pytest.raises(GlmqError) as e:
        _write(tmp_path / "out", src=src, side="processor")
    assert_one_line_error(e.value, "zero.safetensors", "device")


def test_linked_folder_is_refused(src, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (src / "processor" / "sub").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(GlmqError, match="link to a folder"):
        _write(tmp_path / "out", src=src, side="processor")


# --- manifest paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", ["../outside.txt", "/etc/passwd", "a/../../outside.txt", "./x", "a\\..\\b", ""])
def test_manifest_paths_leaving_the_folder_are_not_read(tmp_path, rel):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside.txt").write_text("secret")
    problems = verify_manifest(root, {"files": {rel: {"sha256": "0" * 64, "bytes": 6}}})
    print(problems)
    assert len(problems) == 1 and "manifest path" in problems[0] and "secret" not in problems[0]


def test_manifest_path_through_a_link_out_of_the_folder_is_a_problem(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0")
    (root / "link").symlink_to(tmp_path / "etc")
    import hashlib

    entry = {"sha256": hashlib.sha256(b"root:x:0:0").hexdigest(), "bytes": 10}
    problems = verify_manifest(root, {"files": {"link/passwd": entry}})
    assert problems == ["link/passwd: resolves outside the folder (a link); not checked"]


def test_malformed_manifest_entry_is_a_problem_not_a_crash(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    assert "malformed manifest entry" in verify_manifest(tmp_path, {"files": {"a.txt": "deadbeef"}})[0]


def test_inspect_refuses_a_manifest_with_dotdot(tiny_dir, tmp_path):
    from glmq.testing import assert_user_error, run_cli_inprocess

    dst = tmp_path / "model"
    shutil.copytree(tiny_dir, dst)
    manifest = json.loads((dst / MANIFEST_NAME).read_text())
    manifest["files"]["../../../../../../../../etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
    (dst / MANIFEST_NAME).write_text(json.dumps(manifest))
    proc = run_cli_inprocess("inspect", str(dst))
    assert_user_error(proc, "manifest verification failed", "etc/passwd", "leaves the folder")
    assert "manifest: OK" not in proc.stdout


def test_shard_error_does_not_echo_the_file_s_first_bytes(tmp_path):
    from glmq.errors import CheckpointError
    from glmq.io.safetensors_io import read_header

    secret = tmp_path / "netrc"
    secret.write_bytes(b"password hunter2\n")
    shard = tmp_path / "model.safetensors"
    shard.symlink_to(secret)
    with pytest.raises(CheckpointError) as e:
        read_header(shard)
    assert_one_line_error(e.value, "model.safetensors", "corrupt or truncated")
    assert str(int.from_bytes(b"password", "little")) not in str(e.value)


def test_partial_that_is_a_link_is_refused_even_to_a_marked_folder(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / OWNED_MARKER).touch()  # looks like glmq's, but is reached through a link
    (target / "data.bin").write_bytes(b"keep")
    (tmp_path / "out.partial").symlink_to(target)
    with pytest.raises(GlmqError, match="not created by glmq"):
        _write(tmp_path / "out")
    assert (target / "data.bin").read_bytes() == b"keep"
