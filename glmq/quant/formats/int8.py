"""int8: symmetric per-output-channel 8-bit integer weights.

Stored under a linear's prefix, for a weight ``W`` ``[N, K]``:

- ``weight``: int8 ``[N, K]``, codes in -127..127 (-128 unused, so the grid is symmetric);
- ``weight_scale``: float32 ``[N, 1]``, ``s = amax(|w_row|) / 127`` (1 for an all-zero row).

``q = clamp(round(w / s), -127, 127)``, ``w ~= q * s`` (fp32 reference dequantization).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from glmq.quant.formats.base import PerChannelFormat


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8Format(PerChannelFormat):
    """8-bit integer per-output-channel format; see the module docstring for the exact layout."""

    name: ClassVar[str] = "int8"
    code_dtype: ClassVar[torch.dtype] = torch.int8
    qmax: ClassVar[float] = 127.0
    kernel_alignment: ClassVar[int] = 8
    kernel_names: ClassVar[tuple[str, str, str]] = ("int8_linear", "int8_linear_ref", "int8_supported")

    def config(self) -> dict[str, Any]:
        return {**self._base_config(), "code_range": [-127, 127], "rounding": "round half to even"}

    def _codes(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
