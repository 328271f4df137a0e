"""The safetensors file format, read and written one tensor at a time.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data section, which follows
the header) plus an optional ``"__metadata__"`` string map, then the raw little-endian tensor bytes.

We parse headers ourselves so that a truncated or corrupt file is reported by name before any tensor is
touched, and we write files ourselves so that a shard is streamed tensor by tensor with a known layout
(header first, then each tensor's bytes): the writer never holds more than one tensor, and the bytes are
a pure function of the tensors and their order, which makes resumed conversions byte-identical.
Reading tensor data goes through ``safetensors.safe_open`` (memory-mapped). Nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from glmq.errors import CheckpointError

if TYPE_CHECKING:
    import torch

# safetensors dtype tag -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
TAG_OF_DTYPE = {name: tag for tag, (name, _) in DTYPES.items()}

# Refuse absurd header lengths before allocating: real headers are a few MB at most.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, name, dtype (torch name), shape and byte range in the data section."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    data_start: int = 0  # offset of the data section in the file (8 + header length)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header without reading tensor data.

    Returns ``(tensors, metadata)``. Raises :class:`CheckpointError` for a file that is missing, truncated,
    has a malformed header, unknown dtypes, shapes that disagree with byte ranges, or ranges that overlap,
    leave holes or run past the end of the file.
    """
    from glmq.io.safe_read import loads_json, open_regular, want_dict, want_int_list, want_str_map

    path = Path(path)
    f, size = open_regular(path, "safetensors file")
    try:
        with f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (its declared header length does not fit the "
                    f"{size}-byte file)"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read safetensors header ({e.strerror or e.__class__.__name__})") from None
    if len(raw) != n:
        raise CheckpointError(f"{path}: truncated safetensors file (header cut short)")
    header = loads_json(raw, path, "safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else want_str_map(metadata, str(path), "__metadata__")
    data_start = 8 + n
    data_len = size - data_start
    where = str(path)
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        entry = want_dict(entry, where, f"tensor {name[:80]!r}")
        if set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name[:80]!r} "
                                  "(needs exactly dtype, shape, data_offsets)")
        tag = entry["dtype"]
        if not isinstance(tag, str) or tag not in DTYPES:
            shown = tag if isinstance(tag, str) else type(tag).__name__
            raise CheckpointError(f"{path}: tensor {name[:80]!r} has unsupported dtype {shown[:40]!r}")
        # Dimensions past 2**40 or ranks past 8 describe no real tensor; bounding them keeps products small.
        shape = tuple(want_int_list(entry["shape"], where, f"tensor {name[:80]!r} shape", hi=1 << 40, max_len=8))
        offsets = want_int_list(entry["data_offsets"], where, f"tensor {name[:80]!r} data_offsets", hi=1 << 62,
                                max_len=2)
        if len(offsets) != 2:
            raise CheckpointError(f"{path}: tensor {name[:80]!r} data_offsets must be [begin, end]")
        begin, end = offsets
        dtype, width = DTYPES[tag]
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * width or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name[:80]!r} byte range [{begin}, {end}) does not match shape {list(shape)} {tag}"
            )
        tensors[name] = TensorInfo(path, name, dtype, shape, begin, end, data_start)
        spans.append((begin, end, name))
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            raise CheckpointError(f"{path}: corrupt safetensors file (tensor {name[:80]!r} overlaps or leaves a gap)")
        cursor = end
    if cursor != data_len:
        if cursor > data_len:
            raise CheckpointError(
                f"{path}: truncated safetensors file ({data_len} data bytes, header needs {cursor})"
            )
        raise CheckpointError(f"{path}: corrupt safetensors file ({data_len - cursor} trailing bytes)")
    return tensors, dict(metadata)


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor into a fresh CPU tensor with plain reads (no memory map).

    A memory map would keep every page it touched resident for as long as the file stays open, so a
    converter walking a 33 GB checkpoint would see its resident memory grow to the size of the shards;
    reading into a buffer keeps it at the size of the tensor in hand.
    """
    import torch

    out = torch.empty(info.shape, dtype=getattr(torch, info.dtype))
    if info.nbytes == 0:
        return out
    with open(info.file, "rb") as f:
        read_into(f, info, memoryview(out.reshape(-1).view(torch.uint8).numpy()))
    return out


def read_error(info: TensorInfo, e: OSError):
    """The one error for a tensor whose file cannot be opened or read (``e``), naming file and tensor."""
    from glmq.errors import CheckpointError

    return CheckpointError(f"{info.file}: cannot read tensor {info.name!r} ({e.strerror or e})")


def read_into(f, info: TensorInfo, dest: memoryview, begin: int = 0) -> None:
    """Fill ``dest`` with the tensor's bytes ``begin .. begin + len(dest)``, read from the open file ``f``."""
    f.seek(info.data_start + info.begin + begin)
    got = 0
    while got < len(dest):
        n = f.readinto(dest[got:])
        if not n:
            from glmq.errors import CheckpointError

            raise CheckpointError(f"{info.file}: truncated while reading tensor {info.name!r}")
        got += n


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's raw little-endian bytes (row-major), without copying when it is contiguous on the CPU."""
    import torch

    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def build_header(specs: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> bytes:
    """Serialize a header for tensors written in ``specs`` order: (name, torch dtype name, shape)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape in specs:
        if dtype not in TAG_OF_DTYPE:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        width = DTYPES[TAG_OF_DTYPE[dtype]][1]
        numel = 1
        for d in shape:
            numel *= d
        header[name] = {"dtype": TAG_OF_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + numel * width]}
        offset += numel * width
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


class StreamingFileWriter:
    """Writes one safetensors file whose tensor list is known up front, one tensor at a time.

    The header is written first from ``specs``; each :meth:`write` must then supply the next tensor in
    order with exactly the announced dtype and shape. The sha256 of the whole file is computed on the fly.
    """

    def __init__(self, path: str | os.PathLike, specs: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = list(specs)
        self._next = 0
        self._sha = hashlib.sha256()
        self._f: BinaryIO = open(self.path, "wb")
        self._emit(build_header(self.specs, metadata))

    def _emit(self, data: bytes | memoryview) -> None:
        self._f.write(data)
        self._sha.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.specs):
            raise ValueError(f"{self.path.name}: unexpected tensor {name!r}, all announced tensors written")
        want_name, want_dtype, want_shape = self.specs[self._next]
        got_dtype = str(tensor.dtype).removeprefix("torch.")
        if name != want_name or got_dtype != want_dtype or tuple(tensor.shape) != tuple(want_shape):
            raise ValueError(
                f"{self.path.name}: expected {want_name} {want_dtype} {list(want_shape)}, "
                f"got {name} {got_dtype} {list(tensor.shape)}"
            )
        self._emit(tensor_bytes(tensor))
        self._next += 1

    def close(self) -> str:
        """Flush to disk and return the file's sha256 hex digest. All announced tensors must be written."""
        if self._next != len(self.specs):
            missing = self.specs[self._next][0]
            raise ValueError(f"{self.path.name}: closed before tensor {missing!r} was written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self._sha.hexdigest()

    def abort(self) -> None:
        """Close and delete a half-written file."""
        try:
            self._f.close()
        finally:
            self.path.unlink(missing_ok=True)


def sha256_file(path: str | os.PathLike, chunk: int = 16 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
