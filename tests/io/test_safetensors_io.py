"""Our safetensors writer is bit-compatible with the reference library; our header check catches damage."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glmq.errors import CheckpointError
from glmq.io.safetensors_io import StreamingFileWriter, read_header, sha256_file


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 13, generator=g).to(torch.bfloat16),
        "a.bias": torch.randn(7, generator=g),
        "codes": torch.randint(0, 255, (5, 3), generator=g, dtype=torch.uint8),
        "fp8": torch.randn(4, 6, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.0, dtype=torch.float16),
        "empty": torch.zeros(0, 4),
    }


def _write(path, tensors, metadata=None):
    specs = [(n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in tensors.items()]
    w = StreamingFileWriter(path, specs, metadata)
    for n, t in tensors.items():
        w.write(n, t)
    return w.close()


def test_streamed_file_reads_back_bit_exact_with_reference_reader(tmp_path):
    tensors = _tensors()
    sha = _write(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    assert sha == sha256_file(tmp_path / "x.safetensors")
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for n, t in tensors.items():
            got = f.get_tensor(n)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    infos, md = read_header(tmp_path / "x.safetensors")
    assert set(infos) == set(tensors) and md == {"format": "pt"}
    assert infos["a.weight"].dtype == "bfloat16" and infos["a.weight"].shape == (7, 13)


def test_reference_writer_output_passes_our_header_check(tmp_path):
    tensors = {k: v for k, v in _tensors().items() if k != "empty"}
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    infos, _ = read_header(tmp_path / "ref.safetensors")
    assert {n: i.shape for n, i in infos.items()} == {n: tuple(t.shape) for n, t in tensors.items()}


def test_writer_rejects_tensor_not_announced(tmp_path):
    w = StreamingFileWriter(tmp_path / "x.safetensors", [("a", "float32", (2,))])
    with pytest.raises(ValueError, match="expected a float32 \\[2\\]"):
        w.write("a", torch.zeros(3))
    w.abort()
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[: len(b) - 10], "truncated"),
        (lambda b: b[:5], "truncated"),
        (lambda b: b + b"xx", "trailing"),
        (lambda b: b[:8] + b"#" + b[9:], "not valid JSON"),
        (lambda b: struct.pack("<Q", 10**12) + b[8:], "corrupt or truncated"),
    ],
    ids=["cut-data", "cut-header", "trailing", "bad-json", "huge-header"],
)
def test_damaged_files_are_named_by_the_header_check(tmp_path, damage, message):
    _write(tmp_path / "x.safetensors", _tensors())
    p = tmp_path / "x.safetensors"
    p.write_bytes(damage(p.read_bytes()))
    with pytest.raises(CheckpointError, match=message) as e:
        read_header(p)
    assert str(p) in str(e.value)


def test_overlapping_ranges_are_rejected(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    raw = json.dumps(header).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(12))
    with pytest.raises(CheckpointError, match="overlaps"):
        read_header(tmp_path / "x.safetensors")


def test_shape_disagreeing_with_byte_range_is_rejected(tmp_path):
    header = {"a": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 8]}}
    raw = json.dumps(header).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(CheckpointError, match="does not match shape"):
        read_header(tmp_path / "x.safetensors")
