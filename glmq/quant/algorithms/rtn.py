"""Round-to-nearest: each format's own min/max (asymmetric) or absmax (symmetric) scales, no search."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from glmq.quant.algorithms.base import QuantAlgorithm
from glmq.quant.formats.base import QuantFormat


@dataclasses.dataclass(frozen=True, kw_only=True)
class RTN(QuantAlgorithm):
    """Round to nearest with the format's default parameters (``fmt.qparams``): the baseline, data-free,
    one pass over the weight."""

    name: ClassVar[str] = "rtn"

    def quantize_weight(
        self, fmt: QuantFormat, weight: torch.Tensor, *, hessian: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        return fmt.quantize(weight)
