"""int4: weight-only 4-bit codes, group-wise along K, packed two per byte.

Stored under a linear's prefix, for a weight ``W`` ``[N, K]`` and group size ``G`` (``K % G == 0``):

- ``weight``: uint8 ``[N, K // 2]``, ``byte[n, j] = q[n, 2j] | (q[n, 2j + 1] << 4)`` (low nibble = even k),
  codes ``q`` in 0..15;
- ``weight_scale``: bfloat16 ``[N, K // G]``;
- ``weight_zero`` (asymmetric only): bfloat16 ``[N, K // G]``, a float zero point in code units.

Symmetric: ``w ~= (q - 8) * s`` with ``q = clamp(round(w / s), -8, 7) + 8``. Asymmetric:
``w ~= (q - z) * s`` with ``q = clamp(round(w / s + z), 0, 15)``; RTN gives an integer ``z``, HQQ may
store any float. The reference dequantization is ``(float(q) - float(z)) * float(s)`` in fp32;
``round`` is round-half-to-even (``torch.round``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from glmq.errors import GlmqError
from glmq.quant.formats.base import QuantFormat, Shape, TensorSpec, guard_scale

GROUP_SIZES = (32, 64, 128)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes ``[..., K]`` (integers 0..15, any integer dtype, K even) into uint8 ``[..., K // 2]``,
    low nibble = even k."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of codes along the last dim; got {codes.shape[-1]}.")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[..., K // 2]`` -> uint8 codes ``[..., K]``."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 expects uint8 bytes; got {packed.dtype}.")
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


_KERNEL: dict[str, Callable] = {}


def _int4_matmul() -> Callable:
    """``glmq.kernels.int4_matmul.int4_matmul``, imported on first use (the kernels import triton) and then
    kept: an import statement costs ~0.6 us per call, and this runs for every quantized layer's forward."""
    fn = _KERNEL.get("int4_matmul")
    if fn is None:
        from glmq.kernels.int4_matmul import int4_matmul as fn

        _KERNEL["int4_matmul"] = fn
    return fn


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int4Format(QuantFormat):
    """4-bit group-wise weight-only format; see the module docstring for the exact layout."""

    name: ClassVar[str] = "int4"

    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size not in GROUP_SIZES:
            raise GlmqError(
                f"int4 group_size must be one of {', '.join(map(str, GROUP_SIZES))}; got {self.group_size!r}."
            )
        if not isinstance(self.symmetric, bool):
            raise GlmqError(f"int4 symmetric must be true or false; got {self.symmetric!r}.")

    def config(self) -> dict[str, Any]:
        return {
            "format": self.name,
            "version": self.version,
            "bits": 4,
            "group_size": self.group_size,
            "group_axis": "K (input features)",
            "symmetric": self.symmetric,
            "weight_dtype": "uint8",
            "packing": "two 4-bit codes per byte along K, low nibble = even k",
            "code_range": [0, 15],
            "scale_dtype": "bfloat16",
            "scale_shape": "[N, K // group_size]",
            "zero_dtype": None if self.symmetric else "bfloat16",
            "dequant": "(q - 8) * s" if self.symmetric else "(q - z) * s",
        }

    def group_size_for(self, k_in: int) -> int:
        return self.group_size

    def check(self, shape: Shape, dtype: torch.dtype = torch.bfloat16) -> None:
        super().check(shape, dtype)
        if shape[1] % self.group_size:
            raise GlmqError(
                f"int4 with group_size {self.group_size} needs K_in divisible by {self.group_size}; "
                f"this weight is {list(shape)} (K_in={shape[1]}). Use a smaller group or another format."
            )

    def expected_tensors(self, prefix: str, shape: Shape) -> TensorSpec:
        n, k = shape
        dot = f"{prefix}." if prefix else ""
        spec = {
            f"{dot}weight": ((n, k // 2), torch.uint8),
            f"{dot}weight_scale": ((n, k // self.group_size), torch.bfloat16),
        }
        if not self.symmetric:
            spec[f"{dot}weight_zero"] = ((n, k // self.group_size), torch.bfloat16)
        return spec

    def _asymptotic_bytes_per_weight(self) -> float:
        return 0.5 + (2 if self.symmetric else 4) / self.group_size

    def _stored_shape(self, tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
        n, half_k = tensors["weight"].shape
        return n, 2 * half_k

    # ---- numbers -----------------------------------------------------------------------------------------

    def qparams(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = self._groups(weight.float())
        # The range always includes 0, so an all-positive or all-negative group still codes 0 exactly.
        wmin = w.amin(dim=-1).clamp_max(0)
        wmax = w.amax(dim=-1).clamp_min(0)
        if self.symmetric:
            # Codes span -8..7: use the -8 as well when the negative side is the larger one.
            scale = guard_scale(torch.maximum(-wmin / 8, wmax / 7)).to(torch.bfloat16)
            return scale, None
        scale = guard_scale((wmax - wmin) / 15).to(torch.bfloat16)
        zero = torch.round(-wmin / scale.float()).clamp(0, 15).to(torch.bfloat16)
        return scale, zero

    def _groups(self, w: torch.Tensor) -> torch.Tensor:
        n, k = w.shape
        return w.reshape(n, k // self.group_size, self.group_size)

    def _codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """fp32 codes 0..15 for fp32 ``w`` and ``scale``/``zero`` broadcastable to it."""
        if self.symmetric:
            return torch.round(w / scale.float()).clamp_(-8, 7).add_(8)
        return torch.round(w / scale.float() + zero.float()).clamp_(0, 15)

    def _deq(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        z = 8.0 if self.symmetric else zero.float()
        return (q - z) * scale.float()

    def fake_quantize(
        self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None
    ) -> torch.Tensor:
        self._check_zero(zero)
        w = weight.float()
        return self._deq(self._codes(w, scale, zero), scale, zero)

    def _check_zero(self, zero: torch.Tensor | None) -> None:
        if self.symmetric and zero is not None:
            raise ValueError("symmetric int4 stores no zero point; pass zero=None.")
        if not self.symmetric and zero is None:
            raise ValueError("asymmetric int4 needs a zero point.")

    def quantize(
        self, weight: torch.Tensor, *, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        w = self.checked_weight(weight)
        n, k = w.shape
        if scale is None:
            if zero is not None:
                raise ValueError("a zero point without a scale; pass both or neither.")
            scale, zero = self.qparams(w)
        else:
            self._check_zero(zero)
            want = (n, k // self.group_size)
            for label, t in (("scale", scale), ("zero", zero)):
                if t is not None and tuple(t.shape) != want:
                    raise ValueError(f"int4 {label} must have shape {list(want)}; got {list(t.shape)}.")
            scale = scale.to(torch.bfloat16)
            if not bool((torch.isfinite(scale) & (scale != 0)).all()):
                raise ValueError("int4 scales must be finite and nonzero.")
            if zero is not None:
                zero = zero.to(torch.bfloat16)
                if not bool(torch.isfinite(zero).all()):
                    raise ValueError("int4 zero points must be finite.")
        z = None if zero is None else zero.unsqueeze(-1)
        codes = self._codes(self._groups(w), scale.unsqueeze(-1), z).reshape(n, k)
        out = {"weight": pack_int4(codes), "weight_scale": scale.contiguous()}
        if zero is not None:
            out["weight_zero"] = zero.contiguous()
        return out

    def dequantize(self, tensors: dict[str, torch.Tensor], shape: Shape) -> torch.Tensor:
        self.validate_tensors(tensors, shape)
        return self._dequantize_stored(tensors)

    def _dequantize_stored(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        n, k = self._stored_shape(tensors)
        q = self._groups(unpack_int4(tensors["weight"]).float())
        zero = tensors.get("weight_zero")
        w = self._deq(q, tensors["weight_scale"].unsqueeze(-1), None if zero is None else zero.unsqueeze(-1))
        return w.reshape(n, k)

    # ---- runtime: the W4A16 Triton kernels (glmq.kernels.int4_matmul), imported on first use -------------

    def kernel_runs(self, x: torch.Tensor, shape: Shape) -> bool:
        return x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16)

    def matmul(
        self, x: torch.Tensor, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return _int4_matmul()(x, tensors["weight"], tensors["weight_scale"], tensors.get("weight_zero"),
                           group_size=self.group_size, bias=bias)
