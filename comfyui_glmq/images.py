"""ComfyUI ``IMAGE`` tensors <-> what glmq's pipeline takes and returns.

ComfyUI passes images as float32 ``[B, H, W, C]`` in [0, 1] (C = 3, sometimes 4 from files with alpha);
glmq takes PIL images as references and returns ``[1, 3, H, W]`` in [0, 1] with ``output_type="pt"``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Each frame of a ComfyUI ``IMAGE`` batch ``[B, H, W, C]`` as an RGB PIL image (alpha dropped)."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an IMAGE batch [B, H, W, C] with C in 1, 3, 4; got shape {tuple(images.shape)}")
    frames = images[..., :3] if images.shape[-1] >= 3 else images.expand(*images.shape[:-1], 3)
    # Round to nearest, as PIL would when it saves a float image: truncation would darken every channel.
    arr = (frames.detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def from_pipeline(images: torch.Tensor) -> torch.Tensor:
    """glmq's ``[N, 3, H, W]`` output as a ComfyUI ``IMAGE`` (float32 ``[N, H, W, 3]`` on the CPU)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected [N, 3, H, W] images, got shape {tuple(images.shape)}")
    return images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).contiguous().cpu()
