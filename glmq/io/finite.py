"""The one NaN/Inf check every reader and exporter shares.

Weights holding NaN or infinities are never a valid checkpoint: written into an export or loaded into a
model they only produce black images later. :func:`check_finite` refuses them with one line naming the
tensor. It walks the tensor in blocks of :data:`CHUNK` elements, so its temporaries stay a few MB even for
the AR's 2.75 GB embedding (``torch.isfinite`` on a whole tensor allocates masks the size of the input, and
fp8 or bf16 blocks are widened to fp32 one block at a time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from glmq.errors import CheckpointError

if TYPE_CHECKING:
    import torch

CHUNK = 1 << 22  # elements per block: 16 MB of fp32


def count_nonfinite(tensor: torch.Tensor, *, chunk: int = CHUNK) -> int:
    """How many elements of ``tensor`` are NaN or infinite (0 for integer and bool tensors)."""
    import torch

    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    flat = tensor.detach().reshape(-1)
    # float8 types have no isfinite kernel on every backend; widening one block at a time is exact.
    widen = flat.element_size() == 1
    bad = 0
    for block in flat.split(chunk):
        if widen:
            block = block.to(torch.float32)
        ok = torch.isfinite(block)
        if not bool(ok.all()):  # count only when needed: a bool sum would widen the mask to int64
            bad += int(ok.numel() - torch.count_nonzero(ok))
    return bad


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise :class:`CheckpointError` when ``tensor`` (described by ``what``) holds NaN or Inf values."""
    bad = count_nonfinite(tensor)
    if bad:
        raise CheckpointError(f"{what} holds {bad} NaN/Inf value(s); refusing to use broken weights")
