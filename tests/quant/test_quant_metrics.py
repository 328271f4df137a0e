"""Fidelity metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from glmq.quant.metrics import kl_divergence, psnr, ratio_db, sqnr_db


def test_sqnr_known_values():
    ref = torch.ones(1000)
    assert sqnr_db(ref, ref.clone()) == math.inf
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)  # noise 0.01 of the signal power
    assert sqnr_db(ref.to(torch.bfloat16), (ref * 0.5).to(torch.bfloat16)) == pytest.approx(10 * math.log10(4))
    assert sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf
    assert math.isnan(sqnr_db(ref, torch.full((1000,), math.nan)))
    with pytest.raises(ValueError, match="shapes differ"):
        sqnr_db(ref, ref[:-1])


def test_sqnr_one_bit_is_six_db():
    x = torch.linspace(-1, 1, 100_001, dtype=torch.float64)
    quantize = lambda bits: torch.round(x * 2 ** (bits - 1)) / 2 ** (bits - 1)  # noqa: E731
    gain = sqnr_db(x, quantize(9)) - sqnr_db(x, quantize(8))
    assert gain == pytest.approx(6.02, abs=0.05)


def test_kl_divergence_known_values():
    logits = torch.randn(4, 7, 33, generator=torch.Generator().manual_seed(0))
    assert kl_divergence(logits, logits + 3.0) == pytest.approx(0.0, abs=1e-12)  # shift-invariant
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.25, 0.75]]).log()
    assert kl_divergence(p, q) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert kl_divergence(logits, logits * 0.5) > 0
    assert kl_divergence(logits.transpose(1, 2), (logits * 0.5).transpose(1, 2), dim=1) == pytest.approx(
        kl_divergence(logits, logits * 0.5)
    )


def test_psnr_known_values():
    img = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert psnr(img, img.clone()) == math.inf
    assert psnr(img, img + 0.1) == pytest.approx(20.0)
    assert psnr(img * 255, img * 255 + 25.5, max_val=255.0) == pytest.approx(20.0)


def test_ratio_db_of_sums_of_squares():
    assert ratio_db(100.0, 1.0) == 20.0
    assert ratio_db(2.0, 1.0) == round(10 * math.log10(2), 3) == 3.01  # rounded for reports
    # Undefined: an exact result, an empty or zero signal, and sums that overflowed.
    assert ratio_db(1.0, 0.0) is None and ratio_db(0.0, 1.0) is None and ratio_db(math.inf, 1.0) is None
