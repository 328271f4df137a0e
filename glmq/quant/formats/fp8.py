"""fp8_e4m3: per-output-channel float8 weights, for W8A8 with per-token dynamic activation scales.

Stored under a linear's prefix, for a weight ``W`` ``[N, K]``:

- ``weight``: float8_e4m3fn ``[N, K]``;
- ``weight_scale``: float32 ``[N, 1]``, ``s = amax(|w_row|) / 448`` (1 for an all-zero row).

``q = float8_e4m3fn(clamp(w / s, -448, 448))`` (round to nearest even), ``w ~= q.float() * s``.

At runtime the activations are quantized per token (per row of ``x``) the same way,
:func:`quantize_activation_per_token`, and the product is ``(xq @ q^T) * x_scale * s^T`` with fp32
accumulation: :meth:`Fp8Format.matmul_w8a8_ref` is the reference for such kernels, while
:meth:`Fp8Format.matmul_ref` (the contract shared by every format) multiplies unquantized ``x``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from glmq.errors import GlmqError
from glmq.quant.formats.base import PerChannelFormat, guard_scale

FP8_MAX = 448.0


def _to_fp8(x: torch.Tensor) -> torch.Tensor:
    # Clamp first: float -> float8_e4m3fn casts of out-of-range values are not saturating on every
    # backend (e4m3fn has no inf, and some produce NaN).
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_activation_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token fp8 quantization of activations ``x`` ``[..., K]``.

    Returns ``(xq, x_scale)``: float8_e4m3fn ``[..., K]`` and float32 ``[..., 1]`` with
    ``x ~= xq.float() * x_scale`` and ``x_scale = amax(|x_row|) / 448`` (1 for an all-zero row).
    """
    xf = x.float()
    scale = guard_scale(xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX)
    return _to_fp8(xf / scale), scale


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fp8Format(PerChannelFormat):
    """float8_e4m3fn per-output-channel format; see the module docstring for the exact layout."""

    name: ClassVar[str] = "fp8_e4m3"
    code_dtype: ClassVar[torch.dtype] = torch.float8_e4m3fn
    qmax: ClassVar[float] = FP8_MAX
    kernel_alignment: ClassVar[int] = 16

    def _kernels(self) -> tuple[Any, Any, Any]:
        from glmq.kernels.w8a8_linear import fp8_linear, fp8_linear_ref, fp8_supported

        return fp8_linear, fp8_linear_ref, fp8_supported

    def config(self) -> dict[str, Any]:
        return {
            **self._base_config(),
            "rounding": "round to nearest even, saturate at +-448",
            "activations": "float8_e4m3fn, dynamic per-token scale amax/448, at runtime",
        }

    def _codes(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return _to_fp8(w / scale)

    def matmul_w8a8_ref(
        self, x: torch.Tensor, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Reference of the W8A8 runtime: ``x`` ``[..., K]`` quantized per token to fp8, an fp8 x fp8
        product accumulated in fp32, then scaled by ``x_scale * weight_scale^T``; bias added in fp32;
        returned in ``x.dtype``."""
        n, k = self._stored_shape(tensors)
        if x.shape[-1] != k:
            raise GlmqError(f"matmul_w8a8_ref: x has {x.shape[-1]} input features, the weight expects K={k}.")
        self.validate_tensors(tensors, (n, k))
        xq, xs = quantize_activation_per_token(x)
        y = (xq.float() @ tensors["weight"].float().T) * xs * tensors["weight_scale"].T
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)
