"""The VAE's side of a call: latent statistics, and decoding in one piece or in 1024-pixel tiles."""

from __future__ import annotations

import torch

from glmq.runtime.memory import OVERHEAD_BYTES, VAE_TILE_PIXELS, vae_decode_bytes


def latent_stats(vae, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel latents mean and std, shaped to broadcast over ``[B, C, h, w]``."""
    c = vae.config.latent_channels
    mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1).to(device, dtype)
    std = torch.tensor(vae.config.latents_std).view(1, c, 1, 1).to(device, dtype)
    return mean, std


def needs_tiles(vae, z: torch.Tensor, device: torch.device, vram_budget: int | None) -> bool:
    """Tile only an image larger than one tile whose one-piece decode would not fit what is left of the budget
    (the budget holds the CUDA context too, glmq.runtime.memory) or, with no budget, the free memory."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    height, width = z.shape[-2] * factor, z.shape[-1] * factor
    if height * width <= VAE_TILE_PIXELS**2 or device.type != "cuda":
        return False
    need = vae_decode_bytes(height, width, batch=z.shape[0], channels=vae.config.block_out_channels[0],
                            bytes_per_value=z.element_size())
    allocated = torch.cuda.memory_allocated(device)
    if vram_budget is not None:
        available = vram_budget - OVERHEAD_BYTES - allocated
    else:  # free on the card, plus what the caching allocator holds unused
        available = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - allocated
    return need > available


@torch.no_grad()
def decode(vae, latents: torch.Tensor, device: torch.device, *, vram_budget: int | None = None,
           tiled: bool | None = None) -> torch.Tensor:
    """VAE-decode ``latents`` (DiT space) into images in [0, 1], [B, 3, H, W]. ``tiled``: None decides by
    :func:`needs_tiles`."""
    mean, std = latent_stats(vae, device, vae.dtype)
    z = latents.to(device, vae.dtype) * std + mean
    if tiled is None:
        tiled = needs_tiles(vae, z, device, vram_budget)
    image = decode_tiled(vae, z) if tiled else vae.decode(z, return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


def decode_tiled(vae, z: torch.Tensor, tile: int = VAE_TILE_PIXELS, overlap: float = 0.25) -> torch.Tensor:
    """``vae.decode`` in overlapping ``tile``-pixel tiles blended at the seams (diffusers' ``tiled_decode``).

    diffusers sizes its tiles from the VAE config's ``sample_size``, which GLM-Image's release sets to 32: a
    2048x2048 image would go through ~7,000 tiles of 32 pixels, with a seam every 24 pixels (35.7 s on an H100,
    benchmarks/results/e2e_h100/glmq2048_vae_tiles32/). Here the tiles are ``tile`` pixels; the
    module's own settings are restored afterwards.
    """
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if max(z.shape[-2:]) * factor <= tile:  # one tile: diffusers would still cut it at the overlap stride
        return vae.decode(z, return_dict=False)[0]
    saved = vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor
    vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = tile, tile // factor, overlap
    try:
        return vae.tiled_decode(z, return_dict=False)[0]
    finally:
        vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = saved
