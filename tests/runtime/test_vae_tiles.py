"""Tiled VAE decoding: glmq's own tile size (not the release's 32-pixel ``sample_size``) and when it is used."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from glmq.runtime.memory import OVERHEAD_BYTES, VAE_TILE_PIXELS, activation_allowance, vae_decode_bytes
from glmq.runtime.vae import decode_tiled, needs_tiles


@pytest.fixture(scope="module")
def vae():
    from glmq.io.layout import BY_NAME
    from glmq.models.build import build_model
    from glmq.models.configs import component_config

    torch.manual_seed(0)
    model = build_model(BY_NAME["vae"], component_config("vae", "tiny"), device="cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _latents(vae, pixels: int) -> torch.Tensor:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return torch.randn(1, vae.config.latent_channels, pixels // factor, pixels // factor,
                       generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_one_tile_is_the_whole_decode(vae):
    z = _latents(vae, 64)
    whole = vae.decode(z, return_dict=False)[0]
    assert torch.equal(decode_tiled(vae, z, tile=64), whole)


@torch.no_grad()
def test_tiles_are_the_size_asked_and_settings_come_back(vae):
    z = _latents(vae, 128)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    saved = vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor
    shapes = []
    hook = vae.decoder.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape[-2:])))
    try:
        out = decode_tiled(vae, z, tile=64)
    finally:
        hook.remove()
    # 64-pixel tiles with 25% overlap: starts every 48 pixels (6 latents at factor 8) over 128 pixels.
    starts = range(0, z.shape[-1], int(64 // factor * 0.75))
    assert len(shapes) == len(starts) ** 2 and max(max(s) for s in shapes) == 64 // factor
    assert out.shape == (1, 3, 128, 128) and torch.isfinite(out).all()
    assert (vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor) == saved
    # Tiles see their own GroupNorm statistics, so the blend is close to, not equal to, the whole decode.
    whole = vae.decode(z, return_dict=False)[0]
    assert 0 < (out - whole).abs().max() < whole.abs().max()


def _decision(height, width, *, budget=None, allocated=0, free=0, reserved=0, monkeypatch):
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 << 30))
    fake_vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=[128, 512, 1024, 1024]))
    z = torch.zeros(1, 16, height // 8, width // 8, dtype=torch.bfloat16)
    return needs_tiles(fake_vae, z, torch.device("cuda"), budget)


def test_tiles_only_when_the_whole_decode_does_not_fit(monkeypatch):
    need = vae_decode_bytes(2048, 2048)
    assert need == 20 * 128 * 2048 * 2048 * 2  # 20 GiB: measured 19.03 on an H100
    gib = 1 << 30
    # 1024x1024 and smaller never tile, however tight the memory.
    assert not _decision(1024, 1024, budget=1, allocated=10 * gib, monkeypatch=monkeypatch)
    # With a budget: what is left of it, after the CUDA context it also holds, decides.
    left = 20 * gib - OVERHEAD_BYTES
    assert not _decision(2048, 2048, budget=20 * gib, allocated=left - need, monkeypatch=monkeypatch)
    assert _decision(2048, 2048, budget=20 * gib, allocated=left - need + 1, monkeypatch=monkeypatch)
    # Without one: the card's free memory plus the allocator's unused reserve.
    assert not _decision(2048, 2048, free=need - gib, reserved=3 * gib, allocated=2 * gib, monkeypatch=monkeypatch)
    assert _decision(2048, 2048, free=need - gib, reserved=2 * gib, allocated=2 * gib, monkeypatch=monkeypatch)


def test_memory_plan_counts_one_tile_above_the_tile_size():
    assert activation_allowance(2048, 2048)[2] == vae_decode_bytes(VAE_TILE_PIXELS, VAE_TILE_PIXELS)
    assert activation_allowance(512, 512)[2] == vae_decode_bytes(512, 512)
