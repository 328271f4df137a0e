"""Output folders are atomic, refuse to overwrite, and resume to byte-identical results."""

from __future__ import annotations

import errno

import pytest
import torch

from glmq.errors import GlmqError, OutputExistsError
from glmq.io.layout import BY_NAME
from glmq.io.manifest import verify_manifest
from glmq.io.reader import ComponentReader
from glmq.io.writer import OutputFolder

COMP = BY_NAME["transformer"]
SPECS = [(f"blocks.{i}.weight", "bfloat16", (64, 48 + i)) for i in range(6)]


def _produce(name):
    i = int(name.split(".")[1])
    g = torch.Generator().manual_seed(i)
    return torch.randn(64, 48 + i, generator=g).to(torch.bfloat16)


def _write(out, produce=_produce, force=False, job=None):
    folder = OutputFolder(out, job=job or {"test": 1}, force=force)
    folder.write_json(f"{COMP.name}/config.json", {"x": 1})
    folder.component_writer(COMP, SPECS, max_shard_bytes=2 * 64 * 56 * 2).write(produce)
    return folder.commit()


def _bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_written_folder_is_sharded_indexed_and_manifested(tmp_path):
    out = _write(tmp_path / "out")
    assert not (tmp_path / "out.partial").exists()
    reader = ComponentReader(out / COMP.name, COMP)
    assert len(reader.files) == 3  # two tensors per shard
    for name, _, shape in SPECS:
        assert torch.equal(reader.get(name), _produce(name))
    import json

    manifest = json.loads((out / "glmq-manifest.json").read_text())
    assert verify_manifest(out, manifest) == []
    (out / COMP.name / "config.json").write_text('{"x": 2}')
    assert any("config.json" in p for p in verify_manifest(out, manifest))


def test_existing_output_is_refused_then_replaced_with_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        _write(out)
    assert (out / "keep.txt").read_text() == "mine" and not (tmp_path / "out.partial").exists()
    _write(out, force=True)
    assert not (out / "keep.txt").exists() and (out / "glmq-manifest.json").exists()


class Boom(Exception):
    pass


@pytest.mark.parametrize("fail_at", [1, 2, 4, 5])
def test_resume_after_interruption_is_byte_identical(tmp_path, fail_at):
    reference = _bytes(_write(tmp_path / "ref"))
    calls = []

    def failing(name):
        calls.append(name)
        if len(calls) == fail_at + 1:
            raise Boom()
        return _produce(name)

    with pytest.raises(Boom):
        _write(tmp_path / "out", failing)
    assert (tmp_path / "out.partial").is_dir() and not (tmp_path / "out").exists()
    assert not list((tmp_path / "out.partial").rglob("*.tmp"))  # a half shard never survives

    produced = []
    _write(tmp_path / "out", lambda n: (produced.append(n), _produce(n))[1])
    assert _bytes(tmp_path / "out") == reference
    finished_shards = fail_at // 2
    assert len(produced) == len(SPECS) - 2 * finished_shards  # finished shards were not produced again


def test_a_different_job_discards_a_stale_partial(tmp_path):
    with pytest.raises(Boom):
        _write(tmp_path / "out", lambda n: (_ for _ in ()).throw(Boom()) if n.endswith("5.weight") else _produce(n))
    produced = []
    _write(tmp_path / "out", lambda n: (produced.append(n), _produce(n))[1], job={"test": 2})
    assert len(produced) == len(SPECS)


def test_corrupted_finished_shard_is_rewritten_on_resume(tmp_path):
    reference = _bytes(_write(tmp_path / "ref"))
    with pytest.raises(Boom):
        _write(tmp_path / "out", lambda n: (_ for _ in ()).throw(Boom()) if n.endswith("5.weight") else _produce(n))
    shard = sorted((tmp_path / "out.partial" / COMP.name).glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    _write(tmp_path / "out")
    assert _bytes(tmp_path / "out") == reference


def test_full_disk_is_a_user_error_and_keeps_the_partial(tmp_path):
    def full(name):
        if name.endswith("3.weight"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return _produce(name)

    with pytest.raises(GlmqError, match="no space left.*resume"):
        _write(tmp_path / "out", full)
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "out.partial").rglob("*.tmp"))
