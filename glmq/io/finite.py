"""The one NaN/Inf check every reader and exporter shares.

Weights holding NaN or infinities are never a valid checkpoint: written into an export or loaded into a
model they only produce black images later. :func:`check_finite` refuses them with one line naming the
tensor. It walks the tensor in blocks of :data:`CHUNK` elements, so its temporaries stay a few MB even for
the AR's 2.75 GB embedding (``torch.isfinite`` on a whole tensor allocates masks the size of the input).

An IEEE value is NaN or infinite exactly when all its exponent bits are set, so the check masks the raw
bits with numpy instead of calling ``torch.isfinite``: on 2 loaded CPU cores that read bf16 at 2.5 GB/s
against 0.06 GB/s for ``torch.isfinite`` on bf16 (``benchmarks/results/read_checks_cpu2.json``), which is
what makes checking every tensor of a 35 GB checkpoint affordable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from glmq.errors import CheckpointError

if TYPE_CHECKING:
    import torch

CHUNK = 1 << 22  # elements per block

# torch dtype name -> (integer view, exponent mask, value whose bits mark NaN/Inf when masked)
_BITS = {
    "float64": ("int64", 0x7FF0000000000000, 0x7FF0000000000000),
    "float32": ("int32", 0x7F800000, 0x7F800000),
    "bfloat16": ("int16", 0x7F80, 0x7F80),
    "float16": ("int16", 0x7C00, 0x7C00),
    "float8_e5m2": ("uint8", 0x7C, 0x7C),
    "float8_e4m3fn": ("uint8", 0x7F, 0x7F),  # no infinities; NaN is S.1111.111
}


def count_nonfinite(tensor: torch.Tensor, *, chunk: int = CHUNK) -> int:
    """How many elements of ``tensor`` are NaN or infinite (0 for integer and bool tensors)."""
    import numpy as np
    import torch

    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    flat = tensor.detach().reshape(-1)
    spec = _BITS.get(str(flat.dtype).removeprefix("torch."))
    bad = 0
    if spec is not None and flat.device.type == "cpu":
        view, mask, marked = spec
        int_dtype = getattr(torch, view)
        np_mask = np.array(mask, dtype=view)
        for block in flat.split(chunk):
            bits = block.view(int_dtype).numpy()
            bad += int(np.count_nonzero(np.bitwise_and(bits, np_mask) == marked))
        return bad
    # on a GPU: the same bit test, counted on the device and read back once; other float types widened
    return int(count_nonfinite_lazy(flat, chunk=chunk))


def count_nonfinite_lazy(tensor: torch.Tensor, *, chunk: int = CHUNK) -> torch.Tensor:
    """How many elements of ``tensor`` are NaN or infinite, as a 0-dim int64 tensor on its device, computed
    with torch's bitwise operations (no synchronization: a loader reads the counts once, at the end).
    Float dtypes outside :data:`_BITS` are widened to float32 one block at a time."""
    import torch

    flat = tensor.detach().reshape(-1)
    bad = torch.zeros((), dtype=torch.int64, device=flat.device)
    if not flat.is_floating_point() or flat.numel() == 0:
        return bad
    spec = _BITS.get(str(flat.dtype).removeprefix("torch."))
    for block in flat.split(chunk):
        if spec is None:
            bad += (~torch.isfinite(block.to(torch.float32))).sum()
            continue
        view, mask, marked = spec
        bits = block.view(getattr(torch, view))
        bad += (torch.bitwise_and(bits, mask) == marked).sum()
    return bad


def nonfinite_error(what: str, bad: int) -> CheckpointError:
    """The one refusal of a tensor (described by ``what``) holding ``bad`` NaN or Inf values."""
    return CheckpointError(f"{what} holds {bad} NaN/Inf value(s); refusing to use broken weights")


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise :class:`CheckpointError` when ``tensor`` (described by ``what``) holds NaN or Inf values."""
    bad = count_nonfinite(tensor)
    if bad:
        raise nonfinite_error(what, bad)
