"""Synthetic LLM-like linear layers with outlier channels, for testing quantization without a checkpoint.

Real transformer layers are hard to quantize for reasons random Gaussian data does not show:

- a few *input* channels of the activations are 10-100x larger than the rest, in nearly every token and
  with a consistent sign (LLM.int8, Dettmers et al. 2022; SmoothQuant, Xiao et al. 2022);
- activations are strongly correlated across channels (they live near a low-dimensional subspace), which
  is what lets GPTQ compensate one column's rounding error with others;
- weights are heavier-tailed than Gaussian, and some rows and columns are larger than others.

:func:`make_outlier_layer` draws such a layer reproducibly from a seed:

- activations ``X`` ``[n_tokens, k_in]``: ``(Z A + 0.5 E) * c`` with ``Z`` ``[n_tokens, rank]``, ``A``
  ``[rank, k_in]`` and ``E`` standard normal, ``c`` a log-normal per-channel scale (sigma 0.5); then the
  ``n_outlier_channels`` outlier channels become ``outlier_scale * (sign + 0.3 * X[:, j] / std)``: a
  large, mostly constant value per channel;
- weight ``W`` ``[n_out, k_in]``: a Gaussian scale mixture ``G1 * exp(tail * G2)`` (kurtosis
  ``3 exp(4 tail^2)``, 8.2 at the default 0.5) scaled by ``1 / sqrt(k_in)`` and by log-normal row and
  column factors (sigma 0.3), which raise the kurtosis of the whole matrix to about 17.

Cost is a few elementwise passes: a 4096 x 13696 layer (GLM-Image's ``down_proj``) takes about 2 s
on 2 CPU cores and 224 MB per fp32 weight.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import torch


@dataclasses.dataclass(frozen=True)
class OutlierLayer:
    """A synthetic layer; unpacks as ``weight, activations = make_outlier_layer(...)``."""

    weight: torch.Tensor
    """fp32 ``[n_out, k_in]``."""
    activations: torch.Tensor
    """fp32 ``[n_tokens, k_in]``: calibration inputs of the layer."""
    outlier_channels: torch.Tensor
    """int64 indices of the outlier input channels, sorted."""

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield self.weight
        yield self.activations


def make_outlier_layer(
    n_out: int,
    k_in: int,
    *,
    n_tokens: int = 256,
    n_outlier_channels: int = 4,
    outlier_scale: float = 30.0,
    rank: int = 16,
    tail: float = 0.5,
    seed: int = 0,
) -> OutlierLayer:
    """Draw an LLM-like layer (weight and calibration activations) with outlier input channels.

    ``outlier_scale``: how much larger the outlier channels are than a typical channel (10-100 in LLMs);
    ``rank``: dimension of the shared activation subspace; ``tail``: heaviness of the weight tails
    (0 = Gaussian). Deterministic in ``seed``; see the module docstring for the model.
    """
    if not 0 <= n_outlier_channels <= k_in:
        raise ValueError(f"n_outlier_channels must be in [0, {k_in}]; got {n_outlier_channels}.")
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    channel_scale = torch.exp(0.5 * randn(k_in))
    x = randn(n_tokens, rank) @ (randn(rank, k_in) / math.sqrt(rank))
    x += 0.5 * randn(n_tokens, k_in)
    x *= channel_scale
    outliers = torch.randperm(k_in, generator=gen)[:n_outlier_channels].sort().values
    if n_outlier_channels:
        sign = torch.where(torch.rand(n_outlier_channels, generator=gen) < 0.5, -1.0, 1.0)
        base = x[:, outliers]
        x[:, outliers] = outlier_scale * (sign + 0.3 * base / base.std(dim=0).clamp_min(1e-6))

    w = randn(n_out, k_in)
    w *= torch.exp(tail * randn(n_out, k_in))
    w *= torch.exp(0.3 * randn(n_out, 1)) / math.sqrt(k_in)
    w *= torch.exp(0.3 * randn(1, k_in))
    return OutlierLayer(weight=w, activations=x, outlier_channels=outliers)
