"""Quantization algorithms (how scales and codes are chosen), keyed by name.

``get_algorithm("gptq", act_order=True).quantize_weight(fmt, weight, hessian=H)``, or in one call
``quantize_weight(fmt, weight, algorithm="gptq", hessian=H, act_order=True)``. Algorithms are separate
from the formats that store their results (``glmq.quant.formats``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from glmq.errors import GlmqError
from glmq.quant.algorithms.base import QuantAlgorithm
from glmq.quant.algorithms.gptq import GPTQ
from glmq.quant.algorithms.hessian import HessianAccumulator
from glmq.quant.algorithms.hqq import HQQ
from glmq.quant.algorithms.rtn import RTN
from glmq.quant.formats.base import QuantFormat

ALGORITHMS: dict[str, type[QuantAlgorithm]] = {cls.name: cls for cls in (RTN, HQQ, GPTQ)}


def _lookup(name: str) -> type[QuantAlgorithm]:
    try:
        return ALGORITHMS[name]
    except (KeyError, TypeError):
        raise GlmqError(
            f"unknown quantization algorithm {name!r}; valid algorithms: {', '.join(ALGORITHMS)}."
        ) from None


def get_algorithm(name: str, **opts: Any) -> QuantAlgorithm:
    """Build the algorithm registered as ``name`` with its options."""
    cls = _lookup(name)
    try:
        return cls(**opts)
    except TypeError:
        valid = [f.name for f in dataclasses.fields(cls)]
        raise GlmqError(f"bad options {sorted(opts)} for algorithm {name!r}; it takes {', '.join(valid)}.") from None


def algorithm_from_config(config: dict[str, Any]) -> QuantAlgorithm:
    """Rebuild an algorithm from its :meth:`~QuantAlgorithm.config` dict."""
    if not isinstance(config, dict) or "algorithm" not in config:
        raise GlmqError(f"an algorithm config must be a dict with an 'algorithm' key; got {config!r}.")
    return _lookup(config["algorithm"]).from_config(config)


def quantize_weight(
    fmt: QuantFormat,
    weight: torch.Tensor,
    *,
    algorithm: str | QuantAlgorithm = "rtn",
    hessian: torch.Tensor | None = None,
    **opts: Any,
) -> dict[str, torch.Tensor]:
    """Quantize ``weight`` ``[N, K]`` into ``fmt``'s stored tensors with ``algorithm`` (a name plus
    ``opts``, or an instance). ``hessian`` ``[K, K]`` is required by calibrated algorithms (GPTQ)."""
    if isinstance(algorithm, QuantAlgorithm):
        if opts:
            raise TypeError("pass options either in the algorithm instance or as keywords, not both.")
        algo = algorithm
    else:
        algo = get_algorithm(algorithm, **opts)
    return algo.quantize_weight(fmt, weight, hessian=hessian)


__all__ = [
    "ALGORITHMS",
    "GPTQ",
    "HQQ",
    "RTN",
    "HessianAccumulator",
    "QuantAlgorithm",
    "algorithm_from_config",
    "get_algorithm",
    "quantize_weight",
]
