"""fp8_e4m3: per-output-channel float8 weights, for W8A8 with per-token dynamic activation scales.

Stored under a linear's prefix, for a weight ``W`` ``[N, K]``:

- ``weight``: float8_e4m3fn ``[N, K]``;
- ``weight_scale``: float32 ``[N, 1]``, ``s = amax(|w_row|) / 448`` (1 for an all-zero row).

``q = float8_e4m3fn(clamp(w / s, -448, 448))`` (round to nearest even), ``w ~= q.float() * s``.

At runtime the activations are quantized per token (per row of ``x``) the same way and the product is
``(xq @ q^T) * x_scale * s^T`` with fp32 accumulation: :meth:`Fp8Format.matmul` runs it on fp8 tensor cores
(``glmq.kernels.w8a8_linear.fp8_linear``) and :meth:`Fp8Format.matmul_kernel_ref` is its pure-torch
reference, while :meth:`Fp8Format.matmul_ref` (the contract shared by every format) multiplies unquantized
``x``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from glmq.quant.formats.base import PerChannelFormat

FP8_MAX = 448.0


def _to_fp8(x: torch.Tensor) -> torch.Tensor:
    # Clamp first: float -> float8_e4m3fn casts of out-of-range values are not saturating on every
    # backend (e4m3fn has no inf, and some produce NaN).
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fp8Format(PerChannelFormat):
    """float8_e4m3fn per-output-channel format; see the module docstring for the exact layout."""

    name: ClassVar[str] = "fp8_e4m3"
    code_dtype: ClassVar[torch.dtype] = torch.float8_e4m3fn
    qmax: ClassVar[float] = FP8_MAX
    kernel_alignment: ClassVar[int] = 16
    kernel_names: ClassVar[tuple[str, str, str]] = ("fp8_linear", "fp8_linear_ref", "fp8_supported")

    def config(self) -> dict[str, Any]:
        return {
            **self._base_config(),
            "rounding": "round to nearest even, saturate at +-448",
            "activations": "float8_e4m3fn, dynamic per-token scale amax/448, at runtime",
        }

    def _codes(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return _to_fp8(w / scale)
