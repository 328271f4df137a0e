"""What conditions the DiT besides the AR's prior ids: the glyph embeddings of the prompt's quoted text, and,
for image-to-image, the reference images' VQ ids, grids and VAE latents. Each reproduces the stock pipeline's
rule (and says where glmq departs from it)."""

from __future__ import annotations

import re

import torch

from glmq.errors import GlmqError
from glmq.runtime.vae import latent_stats

_GLYPH_PATTERNS = (r"'([^']*)'", r"\u201c([^\u201c\u201d]*)\u201d", r'"([^"]*)"', r"「([^「」]*)」")


def glyph_texts(prompt: str) -> list[str]:
    """The quoted substrings the glyph encoder renders, in the order the stock pipeline collects them."""
    found: list[str] = []
    for pattern in _GLYPH_PATTERNS:
        found += re.findall(pattern, prompt)
    return found


@torch.no_grad()
def encode_glyphs(tokenizer, text_encoder, prompt: str, device) -> torch.Tensor:
    """Glyph embeddings [1, T, d] of the prompt's quoted text ("" when there is none), as upstream."""
    texts = glyph_texts(prompt) or [""]
    ids = tokenizer(texts, max_length=2048, truncation=True).input_ids
    pad = tokenizer.pad_token_id
    # Upstream prepends one pad token to every text when the NUMBER of texts is even; replicated as is so
    # that glmq's embeddings equal the stock pipeline's.
    ids = [[pad] * ((len(ids) + 1) % 2) + row for row in ids]
    longest = max(len(row) for row in ids)
    mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in ids], device=device)
    ids = torch.tensor([r + [pad] * (longest - len(r)) for r in ids], device=device)
    hidden = text_encoder(ids, attention_mask=mask).last_hidden_state
    return hidden[mask.bool()].unsqueeze(0)


def as_grids(grids) -> torch.Tensor:
    """Source grids given as one tensor or one grid (tensor or [t, h, w]) per reference, as (n, 3)."""
    if isinstance(grids, (list, tuple)):
        grids = torch.cat([torch.as_tensor(g).reshape(-1, 3) for g in grids])
    return torch.as_tensor(grids).reshape(-1, 3)


@torch.no_grad()
def reference_tokens(ar, inputs, n_images: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """VQ ids of the reference images (the AR's vision tower and VQ), upsampled 2x like the prior ids, and
    their upsampled grids."""
    return upsample_reference_ids(reference_ids(ar, inputs, n_images, device), inputs["image_grid_thw"][:n_images])


@torch.no_grad()
def reference_ids(ar, inputs, n_images: int, device) -> torch.Tensor:
    """VQ ids [N] of the first ``n_images`` images of the processor's ``inputs`` (the AR's vision tower and VQ), in
    the order their placeholders take in the AR prompt (:func:`fill_image_placeholders`)."""
    grids = inputs["image_grid_thw"][:n_images].to(device)
    inner = ar.model
    features = inner.get_image_features(inputs["pixel_values"].to(device), grids, return_dict=True)
    # transformers >= 5.2 returns one [C, h, w] map per image, which get_image_tokens takes as is (the stock
    # pipeline concatenates them into the wrong shape and crashes here).
    return inner.get_image_tokens(features.pooler_output).view(-1)


def upsample_reference_ids(ids: torch.Tensor, grids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The DiT's view of reference ids [N] on ``grids`` (n, 3): each id repeated 2x2, and the grids doubled."""
    grids = grids.cpu()
    upsampled = []
    for part, (_, h, w) in zip(torch.split(ids.cpu(), grids.prod(-1).tolist()), grids.tolist()):
        grid = part.view(1, h, w)
        upsampled.append(grid.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(-1))
    up_grids = grids.clone()
    up_grids[:, 1:] *= 2
    return torch.cat(upsampled), up_grids


def fill_image_placeholders(ar, input_ids: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The AR prompt ``input_ids`` with its ``<|image|>`` placeholders replaced by the references' VQ ``ids``, as
    ``GlmImageModel.forward`` does (the decode engine then needs no vision tower)."""
    ids = ids.to(input_ids.device)
    return input_ids.masked_scatter(ar.model.get_placeholder_mask(input_ids, ids), ids)


def references_for_ar(ar, inputs, n_images: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One vision pass over a prompt's ``n_images`` references: the AR prompt's ids with the placeholders
    filled (on the CPU, for the decode engine), and the DiT's upsampled reference ids and grids."""
    ids = reference_ids(ar, inputs, n_images, device)
    ref_ids, ref_grids = upsample_reference_ids(ids, inputs["image_grid_thw"][:n_images])
    return fill_image_placeholders(ar, inputs["input_ids"], ids).cpu(), ref_ids, ref_grids


@torch.no_grad()
def reference_latents(vae, images: list, grids: torch.Tensor, *, patch_size: int, device,
                      dtype) -> list[torch.Tensor]:
    """Normalized VAE latents of each reference, sized from its (upsampled) grid.

    Each reference's latents must hold exactly one patch per upsampled VQ id, so its size comes from the
    processor's grid. Upstream floors the image to a multiple of 16 pixels instead, which disagrees whenever
    the processor resized it (a 1024x1024 reference gets a 31x31 grid, i.e. 992 pixels) and then fails adding
    the prior embeddings to the patches.
    """
    from diffusers.image_processor import VaeImageProcessor

    if len(grids) != len(images):
        raise GlmqError(f"{len(images)} reference image(s) but {len(grids)} source grid(s)")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    processor = VaeImageProcessor(vae_scale_factor=factor)
    mean, std = latent_stats(vae, device, dtype)
    cell = factor * patch_size
    out = []
    for img, (_, grid_h, grid_w) in zip(images, grids.tolist()):
        pixels = processor.preprocess(img, height=grid_h * cell, width=grid_w * cell)
        lat = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mode()
        out.append((lat.to(dtype) - mean) / std)
    return out
