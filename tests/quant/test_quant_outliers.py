"""The synthetic outlier-layer generator has the documented properties and is reproducible."""

from __future__ import annotations

import pytest
import torch

from glmq.evaluate.outliers import make_outlier_layer


def test_reproducible_and_unpacks():
    a = make_outlier_layer(96, 320, n_tokens=64, seed=5)
    b = make_outlier_layer(96, 320, n_tokens=64, seed=5)
    w, x = a
    assert w.shape == (96, 320) and x.shape == (64, 320) and w.dtype == x.dtype == torch.float32
    assert torch.equal(w, b.weight) and torch.equal(x, b.activations)
    assert not torch.equal(w, make_outlier_layer(96, 320, n_tokens=64, seed=6).weight)


@pytest.mark.parametrize("outlier_scale", [10.0, 100.0])
def test_outlier_channels_are_large_and_systematic(outlier_scale):
    lay = make_outlier_layer(64, 1024, n_tokens=512, n_outlier_channels=6, outlier_scale=outlier_scale, seed=0)
    mags = lay.activations.abs().mean(dim=0)
    typical = mags.median()
    ratio = mags[lay.outlier_channels] / typical
    print(f"outlier_scale {outlier_scale}: outlier/median channel magnitude {ratio.min():.1f}..{ratio.max():.1f}")
    assert len(lay.outlier_channels) == 6
    assert (ratio > 0.5 * outlier_scale).all() and (ratio < 2 * outlier_scale).all()
    others = torch.ones(1024, dtype=torch.bool)
    others[lay.outlier_channels] = False
    assert mags[others].max() < mags[lay.outlier_channels].min()
    # Systematic: the same sign in (nearly) every token.
    signs = torch.sign(lay.activations[:, lay.outlier_channels]).mean(dim=0).abs()
    assert (signs > 0.95).all()


def test_weights_heavy_tailed_and_activations_correlated():
    lay = make_outlier_layer(256, 512, n_tokens=1024, n_outlier_channels=0, seed=1)
    w = lay.weight.flatten().double()
    kurtosis = float(((w - w.mean()) ** 4).mean() / w.var() ** 2)
    eig = torch.linalg.eigvalsh(torch.corrcoef(lay.activations.T.double()))
    top16 = float(eig[-16:].sum() / eig.sum())
    print(f"weight kurtosis {kurtosis:.1f} (Gaussian 3); top-16 share of activation correlation {top16:.2f}")
    assert kurtosis > 6
    assert top16 > 0.5
    assert make_outlier_layer(8, 16, n_outlier_channels=0).outlier_channels.numel() == 0
    with pytest.raises(ValueError, match="n_outlier_channels"):
        make_outlier_layer(8, 16, n_outlier_channels=17)
