"""Which components sit on the GPU when: memory modes chosen from a VRAM budget.

- ``resident``: every component stays on the GPU (fastest; needs the most memory).
- ``staged``: one network at a time. The AR (text decoder; the vision tower only for image-to-image) is on
  the GPU while it generates, then parked in pinned CPU memory; the glyph encoder, DiT and VAE come in for
  the diffusion stage. Peak is the larger of the two stages.
- ``offload``: staged, and the DiT streams its blocks through the GPU one at a time (weights parked in
  pinned CPU memory, copied in just before each block runs). The AR stays staged: streaming its layers
  would cost a full weight transfer per token. Slowest; smallest peak.

Estimates are the weights' bytes on the GPU plus a per-stage activation allowance, with a safety margin
for the allocator and the CUDA context; ``choose_mode`` picks the fastest mode that fits the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from glmq.errors import GlmqError

MODES = ("resident", "staged", "offload")
GiB = 1024**3
# CUDA context, cuBLAS workspaces and allocator fragmentation that never shows up in our own counts.
OVERHEAD_BYTES = int(1.0 * GiB)


@dataclass(frozen=True)
class StageSizes:
    """Bytes each network occupies on the GPU (weights) and the activations its stage needs."""

    ar_weights: int
    vision_weights: int
    glyph_weights: int
    dit_weights: int
    vae_weights: int
    ar_activations: int
    dit_activations: int
    vae_activations: int
    largest_ar_block: int
    largest_dit_block: int


VAE_TILE_PIXELS = 1024  # side of a tile when the VAE decodes in tiles (glmq.runtime.pipeline.decode_tiled)


def vae_decode_bytes(height: int, width: int, *, batch: int = 1, channels: int = 128, bytes_per_value: int = 2) -> int:
    """Peak working set of decoding a ``height`` x ``width`` image in one piece: about 19 bf16 feature maps of
    the decoder's last level (full resolution, ``channels`` wide), measured on an H100 at 1024 and 2048 (4.76
    and 19.03 GiB, benchmarks/results/vae_tiles_h100/); 20 leaves a margin."""
    return 20 * channels * height * width * batch * bytes_per_value


def activation_allowance(height: int, width: int, *, dit_hidden: int = 4096, dit_ff: int = 16384,
                         vae_channels: int = 128) -> tuple[int, int, int]:
    """Rough peak activation bytes (AR, DiT, VAE) for one image of ``height`` x ``width``.

    DiT: calibrated on the H100 run in benchmarks/results/e2e_h100/glmq_default_1024_tiers16_12.json: the
    diffusion stage peaked 5.6 GiB above its weights at 1024x1024 (4096 image + glyph tokens, batch 2, the
    per-step AdaLN tables for 50 steps, RoPE tables, CUDA-graph pools, the VAE decode); scaled by tokens.
    VAE decoder: :func:`vae_decode_bytes`, at most one tile's worth (larger images decode in tiles when short).
    """
    tokens = (height // 16) * (width // 16) + 256
    dit = int(5.6 * 1024**3 * tokens / 4352 * max(dit_hidden * dit_ff, 1) / (4096 * 16384))
    if height * width > VAE_TILE_PIXELS**2:  # decoded in tiles when the whole image would not fit
        height = width = VAE_TILE_PIXELS
    vae = vae_decode_bytes(height, width, channels=vae_channels)
    ar = 512 * 1024**2  # logits, KV cache and a prefill's activations at 1024x1024
    return ar, dit, vae


def stage_peaks(s: StageSizes, mode: str, *, image_to_image: bool) -> dict[str, int]:
    vision = s.vision_weights if image_to_image else 0
    if mode == "resident":
        weights = s.ar_weights + s.vision_weights + s.glyph_weights + s.dit_weights + s.vae_weights
        ar = dit = weights
    elif mode == "staged":
        ar = s.ar_weights + vision
        dit = s.glyph_weights + s.dit_weights + s.vae_weights
    elif mode == "offload":
        ar = s.ar_weights + vision
        dit = s.glyph_weights + s.vae_weights + s.largest_dit_block * 2 + (s.dit_weights // 20)
    else:
        raise GlmqError(f"unknown memory mode {mode!r}; valid modes: {', '.join(MODES)}")
    return {
        "ar": ar + s.ar_activations + OVERHEAD_BYTES,
        "dit": dit + s.dit_activations + OVERHEAD_BYTES,
        "vae": (dit if mode != "offload" else s.vae_weights) + s.vae_activations + OVERHEAD_BYTES,
    }


def choose_mode(s: StageSizes, budget_bytes: int | None, *, image_to_image: bool = False,
                requested: str | None = None) -> str:
    """The fastest mode whose estimated peak fits ``budget_bytes`` (``requested`` forces one)."""
    if requested is not None:
        if requested not in MODES:
            raise GlmqError(f"unknown memory mode {requested!r}; valid modes: {', '.join(MODES)}")
        return requested
    if budget_bytes is None:
        return "resident"
    for mode in MODES:
        if max(stage_peaks(s, mode, image_to_image=image_to_image).values()) <= budget_bytes:
            return mode
    need = max(stage_peaks(s, "offload", image_to_image=image_to_image).values())
    raise GlmqError(
        f"does not fit: even with per-block offload this model needs about {need / GiB:.1f} GiB of GPU "
        f"memory, the budget is {budget_bytes / GiB:.1f} GiB"
    )
