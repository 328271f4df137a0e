"""Messages between the caller and its GPU workers: a JSON header and raw tensor bytes, over a pipe.

Nothing is pickled: a message is one JSON frame (``kind``, ``meta`` and each tensor's name, dtype and shape)
followed by one frame of raw bytes per tensor, through ``multiprocessing.connection.Connection``'s
``send_bytes``/``recv_bytes``. What crosses is small: requests (prompts, sizes, generator states), images
and token ids back, progress events and errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int16,
    torch.int32, torch.int64, torch.bool)}

MAX_HEADER_BYTES = 1 << 20


@dataclass
class Message:
    kind: str
    meta: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def send(conn, kind: str, meta: dict | None = None, tensors: dict[str, torch.Tensor] | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in (tensors or {}).items()}
    specs = [{"name": k, "dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
             for k, v in tensors.items()]
    header = json.dumps({"kind": kind, "meta": meta or {}, "tensors": specs}).encode()
    conn.send_bytes(header)
    for v in tensors.values():
        conn.send_bytes(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")


def recv(conn) -> Message:
    """The next message (blocks; raises EOFError when the other end is gone)."""
    header = json.loads(conn.recv_bytes(MAX_HEADER_BYTES))
    tensors = {}
    for spec in header["tensors"]:
        dtype = _DTYPES[spec["dtype"]]
        raw = conn.recv_bytes()
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        tensors[spec["name"]] = flat.view(dtype).reshape(spec["shape"])
    return Message(header["kind"], header["meta"], tensors)
