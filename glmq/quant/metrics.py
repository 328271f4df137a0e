"""Fidelity metrics for quantized weights, logits and images.

All take a reference and a test tensor of the same shape (torch tensors, or numpy arrays: the GGUF and
ONNX exporters' numbers), compute in fp64 and return a Python float. This is glmq's one SQNR.
"""

from __future__ import annotations

import math

import torch


def _tensor(a) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach()
    import numpy as np

    return torch.from_numpy(np.ascontiguousarray(a))


def _pair(ref, test) -> tuple[torch.Tensor, torch.Tensor]:
    ref, test = _tensor(ref), _tensor(test)
    if ref.shape != test.shape:
        raise ValueError(f"shapes differ: reference {list(ref.shape)}, test {list(test.shape)}.")
    return ref.double(), test.double()


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||ref||^2 / ||ref - test||^2)`` in dB.

    ``inf`` when ``test`` equals ``ref`` exactly; ``-inf`` when ``ref`` is all zeros and ``test`` is not;
    ``nan`` if either holds NaN. Each 6.02 dB is one bit of precision.
    """
    r, t = _pair(ref, test)
    noise = float((r - t).square().sum())
    signal = float(r.square().sum())
    if math.isnan(noise):
        return math.nan
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def ratio_db(signal: float, noise: float) -> float | None:
    """``10 log10(signal / noise)`` of two accumulated sums of squares, rounded to 0.001 dB, for reports;
    None when undefined (an exact or empty result, or a non-finite ratio)."""
    if not (signal > 0 and noise > 0):
        return None
    v = 10 * math.log10(signal / noise)
    return round(v, 3) if math.isfinite(v) else None


def kl_divergence(ref_logits: torch.Tensor, test_logits: torch.Tensor, dim: int = -1) -> float:
    """Mean over positions of ``KL(softmax(ref) || softmax(test))`` along ``dim``, in nats.

    0 for identical logits (up to rounding); the usual measure of how far a quantized language model's
    next-token distribution moved.
    """
    r, t = _pair(ref_logits, test_logits)
    log_p = torch.log_softmax(r, dim=dim)
    log_q = torch.log_softmax(t, dim=dim)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=dim)
    return float(kl.mean())


def psnr(ref: torch.Tensor, test: torch.Tensor, max_val: float = 1.0) -> float:
    """Peak signal-to-noise ratio ``10 log10(max_val^2 / mse)`` in dB for images in ``[0, max_val]``;
    ``inf`` for identical images."""
    r, t = _pair(ref, test)
    mse = float((r - t).square().mean())
    if math.isnan(mse):
        return math.nan
    if mse == 0:
        return math.inf
    return 10 * math.log10(max_val**2 / mse)
