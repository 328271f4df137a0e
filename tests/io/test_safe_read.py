"""glmq.io.safe_read: regular files only, size caps, bounded nesting and numbers, one-line errors."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from glmq.errors import CheckpointError
from glmq.io import safe_read
from glmq.io.finite import check_finite, count_nonfinite
from glmq.testing import assert_one_line_error, fail_if_blocked


@pytest.fixture
def alarm():
    """Fail (instead of hanging the suite) if a read blocks for more than 10 s."""
    with fail_if_blocked(10, "the read blocked"):
        yield


def _refused(fn, *needles):
    with pytest.raises(CheckpointError) as e:
        fn()
    assert_one_line_error(e.value, *needles)


def test_fifo_refused_without_blocking(tmp_path, alarm):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)  # no writer: a blocking open() would wait forever
    _refused(lambda: safe_read.read_json(fifo, "config"), "config.json", "FIFO")


def test_device_and_folder_refused(tmp_path, alarm):
    link = tmp_path / "config.json"
    link.symlink_to("/dev/zero")  # read until memory runs out, if read at all
    _refused(lambda: safe_read.read_json(link, "config"), "character device")
    _refused(lambda: safe_read.read_json(tmp_path, "config"), "folder")
    _refused(lambda: safe_read.read_json(tmp_path / "nope.json", "config"), "missing config")


def test_size_cap(tmp_path):
    p = tmp_path / "big.json"
    p.write_text(json.dumps({"a": "x" * 2000}))
    assert safe_read.read_json(p, "config", max_bytes=4096)["a"] == "x" * 2000
    _refused(lambda: safe_read.read_json(p, "config", max_bytes=1000), "more than the 1000")


def test_depth_scanned_before_parsing(tmp_path):
    p = tmp_path / "deep.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    _refused(lambda: safe_read.read_json(p, "index"), "100000 levels")
    # brackets inside strings do not count; real depth does
    assert safe_read.nesting_depth('{"a": "[[[[[[", "b": [[1]]}') == 3
    assert safe_read.nesting_depth(b'{"a": "\\"[[[", "b": {}}') == 2
    ok = "[" * safe_read.MAX_DEPTH + "]" * safe_read.MAX_DEPTH
    assert safe_read.loads_json(ok, "x", "y") is not None
    _refused(lambda: safe_read.loads_json("[" + ok + "]", "x", "y"), "levels deep")


@pytest.mark.parametrize("text, needle", [
    ('{"n": ' + "9" * 5000 + "}", "5000 digits"),
    ('{"n": NaN}', "NaN"),
    ('{"n": -Infinity}', "Infinity"),
    ('{"n": 1e999}', "out-of-range"),
    ('{"n": 1,}', "not valid JSON"),
    (b'{"n": "\xff"}', "not valid UTF-8"),
])
def test_bad_json_one_line(text, needle):
    _refused(lambda: safe_read.loads_json(text, "f.json", "config"), "f.json", needle)


def test_toml(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('version = 1\n[x]\ny = [1, 2]\n')
    assert safe_read.read_toml(p, "recipe") == {"version": 1, "x": {"y": [1, 2]}}
    p.write_text("a = " + "[" * 1000 + "]" * 1000)
    _refused(lambda: safe_read.read_toml(p, "recipe"), "levels deep")
    p.write_text("a = 1e999")
    _refused(lambda: safe_read.read_toml(p, "recipe"), "out-of-range")
    p.write_text("a = " + "9" * 5000)
    _refused(lambda: safe_read.read_toml(p, "recipe"), "not valid TOML")
    p.write_bytes(b"a = '\xff'")
    _refused(lambda: safe_read.read_toml(p, "recipe"), "UTF-8")


def test_typed_accessors():
    assert safe_read.want_int(5, "w", "f", lo=1, hi=9) == 5
    _refused(lambda: safe_read.want_int("32", "w", "heads"), "heads must be an integer")
    _refused(lambda: safe_read.want_int(True, "w", "heads"), "must be an integer")
    _refused(lambda: safe_read.want_int(10**9, "w", "hidden", hi=1 << 17), "outside")
    _refused(lambda: safe_read.want_int(10**5000, "w", "n"), "bits")  # never formats 5000 digits
    _refused(lambda: safe_read.want_int_list([1, -1], "w", "shape"), "shape[1]")
    _refused(lambda: safe_read.want_str_map({"a": ["b"]}, "w", "weight_map"), "weight_map['a'] must be a string")
    _refused(lambda: safe_read.want_number(float("nan"), "w", "eps"), "finite")


def test_safetensors_header_types(tmp_path):
    from glmq.io.safetensors_io import read_header

    def write(header: dict, data: bytes = b"\0" * 8):
        raw = json.dumps(header).encode()
        p = tmp_path / "x.safetensors"
        p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        return p

    good = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    tensors, meta = read_header(write({**good, "__metadata__": {"format": "pt"}}))
    assert tensors["w"].shape == (2,) and meta == {"format": "pt"}
    cases = [
        ({"w": {**good["w"], "dtype": ["F32"]}}, "unsupported dtype"),
        ({"w": {**good["w"], "shape": "Infinity"}}, "shape must be a list"),
        ({"w": {**good["w"], "shape": [2.0]}}, "shape[0] must be an integer"),
        ({"w": {**good["w"], "shape": [1 << 50]}}, "outside"),
        ({"w": {**good["w"], "data_offsets": [0, 8, 9]}}, "data_offsets has 3 entries"),
        ({**good, "__metadata__": ["format"]}, "__metadata__ must be a JSON object"),
        ({**good, "__metadata__": {"format": 1}}, "__metadata__['format'] must be a string"),
        ({"w": "F32"}, "tensor 'w' must be a JSON object"),
        ({"w": {**good["w"], "extra": 1}}, "exactly dtype, shape, data_offsets"),
    ]
    for header, needle in cases:
        _refused(lambda h=header: read_header(write(h)), "x.safetensors", needle)
    p = write(good)
    raw = p.read_bytes()
    (tmp_path / "deep.safetensors").write_bytes(struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000)
    _refused(lambda: read_header(tmp_path / "deep.safetensors"), "levels deep")
    n = struct.unpack("<Q", raw[:8])[0]
    fixed = raw[8:8 + n].replace(b"[2]", b"[" + b"9" * 5000 + b"]")
    (tmp_path / "int.safetensors").write_bytes(struct.pack("<Q", len(fixed)) + fixed + raw[8 + n:])
    _refused(lambda: read_header(tmp_path / "int.safetensors"), "5000 digits")


def test_finite_checker_blocks_and_dtypes():
    t = torch.zeros(1000, 7, dtype=torch.bfloat16)
    assert count_nonfinite(t, chunk=64) == 0
    t[999, 6] = float("nan")
    t[0, 0] = float("inf")
    assert count_nonfinite(t, chunk=64) == 2  # found across block boundaries
    with pytest.raises(CheckpointError) as e:
        check_finite(t, "w.safetensors: tensor 'x'")
    assert_one_line_error(e.value, "tensor 'x'", "2 NaN/Inf")
    f8 = torch.zeros(10).to(torch.float8_e4m3fn)
    f8.view(torch.uint8)[3] = 0x7F  # e4m3fn's NaN encoding
    assert count_nonfinite(f8) == 1
    assert count_nonfinite(torch.full((4,), 7, dtype=torch.int32)) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.float8_e5m2,
                                   torch.float8_e4m3fn])
def test_finite_bits_agree_with_isfinite(dtype):
    """The exponent-bit check counts exactly what torch.isfinite (on an fp32/fp64 widening) reports."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3001, generator=g) * 1e3).to(torch.float64)
    # extremes that stay finite (subnormals, max values) must not be counted
    x[:4] = torch.tensor([1e-40, -1e-300, 57344.0, -448.0], dtype=torch.float64)
    t = x.to(dtype)
    bits = t.view(torch.uint8)
    nonfinite = [float("nan"), float("inf"), float("-inf")] if dtype != torch.float8_e4m3fn else [float("nan")]
    for i, v in enumerate(nonfinite * 5):
        t[100 + 97 * i] = v
    if dtype == torch.float8_e4m3fn:
        bits[7] = 0xFF  # the negative NaN encoding
    want = int((~torch.isfinite(t.to(torch.float64))).sum())
    assert want >= 5
    assert count_nonfinite(t, chunk=64) == want
