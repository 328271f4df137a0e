"""What the AR generates for one sequence: the grids it fills (:class:`GridPlan`), its prompt as the model
sees it (the references' VQ ids in place, :func:`insert_image_tokens`) and its M-RoPE positions
(:func:`rope_positions`), and the DiT's prior ids taken from the generated tokens
(:func:`prior_tokens_from_generated`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Sequence


@dataclass(frozen=True)
class GridPlan:
    """The token layout of one generation: the grids the AR fills, in generation order, then one more token.

    Text-to-image generates the preview grid first, then the target grid (``grids = ((16, 16), (32, 32))``
    at 1024x1024: 256 + 1024 grid tokens + EOS = 1281). Image-to-image generates only the target grid.
    """

    grids: tuple[tuple[int, int], ...]

    @property
    def grid_tokens(self) -> tuple[int, ...]:
        return tuple(h * w for h, w in self.grids)

    @property
    def num_grid_tokens(self) -> int:
        return sum(self.grid_tokens)

    @property
    def max_new_tokens(self) -> int:
        """Grid tokens plus the final EOS (what the diffusers pipeline passes to ``generate``)."""
        return self.num_grid_tokens + 1

    @property
    def target_slice(self) -> slice:
        """Where the full-resolution target grid (the last one generated) sits in the generated tokens."""
        start = self.num_grid_tokens - self.grid_tokens[-1]
        return slice(start, self.num_grid_tokens)

    @classmethod
    def from_grids(cls, image_grid_thw: torch.Tensor | Sequence[Sequence[int]], num_source_images: int) -> GridPlan:
        """Plan for one sample from its ``image_grid_thw`` rows (processor order: sources, then targets).

        Mirrors ``GlmImageModel.get_rope_index``: the grids not matched by a complete image in the prompt
        are decoded, last row first (text-to-image: ``[target, preview]`` rows -> preview, then target).
        """
        rows = [tuple(int(x) for x in r) for r in (image_grid_thw.tolist() if torch.is_tensor(image_grid_thw)
                                                   else image_grid_thw)]
        n_decode = max(len(rows) - int(num_source_images), 0)
        if n_decode == 0:
            raise ValueError(f"no grid left to generate: {len(rows)} grids, {num_source_images} source images")
        return cls(tuple((rows[-i][1], rows[-i][2]) for i in range(1, n_decode + 1)))

    @classmethod
    def for_image(cls, height: int, width: int, *, is_text_to_image: bool = True) -> GridPlan:
        """Plan for a ``height`` x ``width`` image, with the grid sizes ``GlmImageProcessor`` prompts for.

        The target grid is 1/32 of the image; the text-to-image preview keeps ~256 tokens at the same
        aspect ratio: ``prev_h = int(sqrt(h / w) * 16)``.
        """
        token_h, token_w = height // 32, width // 32
        if token_h < 1 or token_w < 1:
            raise ValueError(f"image {height}x{width} is smaller than one 32x32 token")
        ratio = token_h / token_w
        target = (token_h, token_w)
        if not is_text_to_image:
            return cls((target,))
        preview = (int(ratio**0.5 * 16), int((1 / ratio) ** 0.5 * 16))
        return cls((preview, target))


def prior_tokens_from_generated(
    tokens: torch.Tensor, grids: torch.Tensor | Sequence[Sequence[int]], is_text_to_image: bool
) -> torch.Tensor:
    """The DiT's prior ids from generated tokens: the target grid, upsampled 2x (nearest).

    Same result as diffusers' ``GlmImagePipeline._extract_large_image_tokens`` + ``_upsample_token_ids``.

    Args:
        tokens: long [B, N] generated tokens only (the engine's output; no prompt).
        grids: ``image_grid_thw`` rows of one sample (processor order: sources, then targets).
        is_text_to_image: True when the prompt has no reference images.

    Returns:
        long [B, 4 * h * w] for a target grid of h x w.
    """
    rows = [tuple(int(x) for x in r) for r in (grids.tolist() if torch.is_tensor(grids) else grids)]
    if is_text_to_image:
        offset = sum(t * h * w for t, h, w in rows[1:])
        _, h, w = rows[0]
    else:
        offset = 0
        _, h, w = rows[-1]
    if tokens.shape[-1] < offset + h * w:
        raise ValueError(f"tokens: need at least {offset + h * w} generated tokens, got {tokens.shape[-1]}")
    grid = tokens[:, offset : offset + h * w].reshape(-1, h, w)
    return grid.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).reshape(tokens.shape[0], -1).long()


def insert_image_tokens(model, ids, pixel_values, image_grid_thw, images_per_sample, device):
    """Replace ``<|image|>`` placeholders by the reference images' VQ ids, as ``GlmImageModel.forward`` does."""
    inner = model.model
    grids = image_grid_thw.to(device)
    ips = images_per_sample.to(device) if images_per_sample is not None else None
    source_grids = inner.get_image_grids_for_generation(ips, grids)
    features = inner.get_image_features(pixel_values.to(device), source_grids, return_dict=True)
    image_ids = inner.get_image_tokens(features.pooler_output).view(-1).to(ids.device)
    return ids.masked_scatter(inner.get_placeholder_mask(ids, image_ids), image_ids)


def rope_positions(model, ids, image_grid_thw, images_per_sample, attention_mask):
    """Upstream ``get_rope_index``: prompt positions [3, B, L] and decode positions [3, B, N] (or None).

    It caches the decode table on the model; that state is restored so HF ``generate`` is unaffected.
    """
    inner = model.model
    saved = (inner.rope_deltas, inner._cached_decode_position_ids, inner._prefill_len)
    try:
        prefill, _ = inner.get_rope_index(ids, image_grid_thw=image_grid_thw.to(ids.device),
                                          images_per_sample=images_per_sample, attention_mask=attention_mask)
        decode = inner._cached_decode_position_ids
    finally:
        inner.rope_deltas, inner._cached_decode_position_ids, inner._prefill_len = saved
    return prefill, (decode.permute(1, 0, 2) if decode is not None else None)
