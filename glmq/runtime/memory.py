"""Which components sit on the GPU when: memory modes chosen from a VRAM budget, checked per call.

- ``resident``: every component stays on the GPU (fastest; needs the most memory).
- ``staged``: one network at a time. A call goes through four stages (five for image-to-image), each with
  only what it needs on the GPU (the rest parked in pinned CPU memory; parking is free, the pinned copy
  already exists): ``vision`` (image-to-image only: the AR's vision tower and VQ, which turn the references
  into VQ ids), ``ar`` (the text decoder, with only its embedding's visual rows:
  :mod:`glmq.runtime.embedding`), ``encode`` (glyph encoder and VAE: glyphs, and the references' latents),
  ``dit`` (the DiT alone: the references' K/V, the denoising loop), ``vae`` (VAE alone: the decode). Peak
  is the largest stage.
- ``offload``: staged, and the DiT streams its blocks through the GPU one at a time (weights parked in
  pinned CPU memory, copied in just before each block runs). The AR stays staged: streaming its layers
  would cost a full weight transfer per token. Slowest; smallest peak.

A budget counts what a real card must hold: the allocator's peak reserved bytes plus the CUDA context
(driver, library handles, loaded kernels), which lives outside the allocator. Estimates are the weights'
bytes on the GPU plus per-stage activations (calibrated on the GPU, see :func:`activation_allowance`),
the request's extras (the reference images' K/V cache and VAE encode), the context and a fragmentation
margin. ``choose_mode`` picks the fastest mode whose peak fits text-to-image; each call is checked
again with :func:`mode_for_request`, which moves a larger request (two references, 2048x2048) to a leaner
mode for that call or refuses it before any work.
"""

from __future__ import annotations

import contextlib
import enum
import os
from dataclasses import dataclass, field

from glmq.errors import GlmqError


class MemoryMode(str, enum.Enum):
    """Where the networks sit (module docstring), fastest first. A str, so ``mode == "staged"`` still holds."""

    RESIDENT = "resident"
    STAGED = "staged"
    OFFLOAD = "offload"

    def __str__(self) -> str:
        return self.value

    @property
    def streams_dit(self) -> bool:
        """The DiT's blocks visit the GPU one at a time (no compiled blocks, no CUDA graph of the DiT)."""
        return self is MemoryMode.OFFLOAD


MODES = tuple(m.value for m in MemoryMode)
GiB = 1024**3
# CUDA context, cuBLAS/cuDNN handles and loaded kernel modules: 0.79 GiB measured on an H200 with the
# compiled runtime (benchmarks/results/memory_sequence_h200/); 1 GiB leaves a margin.
OVERHEAD_BYTES = int(1.0 * GiB)
# The caching allocator reserves more than it hands out (block rounding, CUDA-graph private pools).
FRAGMENTATION = 0.08


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
    # bf16 K and V of one reference token in every DiT layer (image-to-image's reference cache).
    dit_kv_bytes_per_token: int = 0
    # K and V of one token in every AR decoder layer (the decode engine's static cache, one row per sequence).
    ar_kv_bytes_per_token: int = 0
    # The (height, width) the activations above were sized for.
    size: tuple[int, int] = (1024, 1024)


@dataclass(frozen=True)
class Request:
    """What one call asks for: image size and, for image-to-image, each reference's token count (the
    processor's grid, upsampled 2x like the prior ids)."""

    height: int = 1024
    width: int = 1024
    reference_tokens: tuple[int, ...] = field(default=())

    @property
    def image_to_image(self) -> bool:
        return bool(self.reference_tokens)


VAE_TILE_PIXELS = 1024  # side of a tile when the VAE decodes in tiles (glmq.runtime.pipeline.decode_tiled)


def vae_decode_bytes(height: int, width: int, *, batch: int = 1, channels: int = 128, bytes_per_value: int = 2) -> int:
    """Peak working set of decoding a ``height`` x ``width`` image in one piece: about 19 bf16 feature maps of
    the decoder's last level (full resolution, ``channels`` wide), measured on an H100 at 1024 and 2048 (4.76
    and 19.03 GiB, benchmarks/results/vae_tiles_h100/); 20 leaves a margin."""
    return 20 * channels * height * width * batch * bytes_per_value


# The VAE encoder's working set as a share of the decoder's at the same size: measured on the CPU at the released
# config (benchmarks/results/vae_working_set_cpu/: 1.27-1.33 GiB against 3.79-4.18 GiB for the decode, in bf16 at
# 1024x1024, a ratio of 0.32-0.34; the decoder's CPU figure is 0.80-0.88 of the H100's 4.76 GiB). 0.4 leaves a
# margin over both.
VAE_ENCODE_SHARE = 0.4


def activation_allowance(height: int, width: int, *, dit_hidden: int = 4096, dit_ff: int = 16384,
                         vae_channels: int = 128) -> tuple[int, int, int]:
    """Rough peak activation bytes (AR, DiT, VAE) for one image of ``height`` x ``width``.

    DiT (the denoising stage alone, batch 2 for the two guidance passes, CUDA-graph pool included):
    1.5 GiB at 1024x1024, scaled by tokens. Measured on the H200 with the compiled default recipe
    (benchmarks/results/memory_sequence_h200/tier16/): the DiT stage reserved 1.3 GiB above its weights
    (8.64 GiB with 7.33 GiB of DiT and VAE weights); the 2048x2048 staged run on the H100 peaked 5.3 GiB
    above the weights with the VAE in tiles (benchmarks/results/e2e_h100/tier16_2048/), 1.4 GiB per 4352
    tokens. VAE decoder: :func:`vae_decode_bytes`, at most one tile's worth (larger images decode
    in tiles when short).
    """
    tokens = (height // 16) * (width // 16) + 256
    dit = int(1.5 * GiB * tokens / 4352 * max(dit_hidden * dit_ff, 1) / (4096 * 16384))
    if height * width > VAE_TILE_PIXELS**2:  # decoded in tiles when the whole image would not fit
        height = width = VAE_TILE_PIXELS
    vae = vae_decode_bytes(height, width, channels=vae_channels)
    ar = 512 * 1024**2  # logits, KV cache and a prefill's activations at 1024x1024
    return ar, dit, vae


def _scaled(nbytes: int, s: StageSizes, req: Request) -> int:
    """``nbytes`` sized for ``s.size``, rescaled by image tokens to ``req``'s size."""
    have = (s.size[0] // 16) * (s.size[1] // 16) + 256
    want = (req.height // 16) * (req.width // 16) + 256
    return int(nbytes * want / have)


def ar_sequence_bytes(s: StageSizes, req: Request) -> int:
    """The decode engine's cache for one more sequence of ``req``: its prompt (a generous 512 tokens of text, and
    the references' tokens), the grids it generates, rounded up to the engine's 128-slot cache."""
    grid = (req.height // 32) * (req.width // 32)
    tokens = 512 + sum(req.reference_tokens) // 4 + grid + (0 if req.image_to_image else 256) + 1
    return s.ar_kv_bytes_per_token * (-(-tokens // 128) * 128)


def stage_peaks(s: StageSizes, mode: str, request: Request | None = None, *, ar_batch: int = 1,
                dit_batch: int = 1, images: int = 1) -> dict[str, int]:
    """Estimated GPU bytes (reserved + context) at the peak of each stage of one call in ``mode`` (``request``
    default: text-to-image at the size ``s`` was measured for). ``ar_batch``: sequences the AR decodes together
    (each adds its cache rows); ``dit_batch``: images per DiT forward, all of ``request``'s kind and sharing its
    references (each adds the activations of its conditional and unconditional pass); ``images``: the call's
    images, whose decoded pixels (fp32) stay on the GPU until the call returns."""
    req = request or Request(*s.size)
    if mode not in MODES:
        raise GlmqError(f"unknown memory mode {mode!r}; valid modes: {', '.join(MODES)}")
    mode = MemoryMode(mode)
    i2i = req.image_to_image
    vision = s.vision_weights if i2i else 0
    kv = s.dit_kv_bytes_per_token * sum(req.reference_tokens)
    # The VAE's working set scales with the pixels it processes at once (one tile at most); references are
    # encoded one at a time.
    base_area = _area(*s.size)
    encode_act = max((int(VAE_ENCODE_SHARE * s.vae_activations) * _area(side, side) // base_area
                      for side in (int(t**0.5) * 16 for t in req.reference_tokens)), default=0)
    dit_act = _scaled(s.dit_activations, s, req) * max(int(dit_batch), 1)
    vae_act = s.vae_activations * _area(req.height, req.width) // base_area
    if mode is MemoryMode.RESIDENT:
        everything = s.ar_weights + s.vision_weights + s.glyph_weights + s.dit_weights + s.vae_weights
        ar = enc = dit = vae = everything
    else:  # image-to-image: the vision tower runs in a stage of its own, before the text decoder arrives
        ar = s.ar_weights
        enc = s.glyph_weights + s.vae_weights
        dit = s.largest_dit_block * 2 + s.dit_weights // 20 if mode.streams_dit else s.dit_weights
        vae = s.vae_weights
    more_sequences = (max(int(ar_batch), 1) - 1) * ar_sequence_bytes(s, req)
    peaks = {"ar": ar + _scaled(s.ar_activations, s, req) + (s.ar_activations if i2i else 0) + more_sequences,
             "encode": enc + encode_act, "dit": dit + dit_act + kv,
             "vae": vae + vae_act + (max(int(images), 1) - 1) * 3 * req.height * req.width * 4}
    if i2i and mode is not MemoryMode.RESIDENT:
        peaks["vision"] = vision + s.ar_activations  # the references' features: within the AR's allowance
    return {k: int(v * (1 + FRAGMENTATION)) + OVERHEAD_BYTES for k, v in peaks.items()}


def _area(height: int, width: int) -> int:
    """Pixels the VAE processes at once for an image of this size: at most one tile."""
    if height * width > VAE_TILE_PIXELS**2:
        return VAE_TILE_PIXELS**2
    return height * width


def peak_bytes(s: StageSizes, mode: str, request: Request | None = None, **batches) -> int:
    return max(stage_peaks(s, mode, request, **batches).values())


def choose_mode(s: StageSizes, budget_bytes: int | None, *, requested: str | None = None) -> MemoryMode:
    """The fastest mode whose estimated peak fits ``budget_bytes`` for text-to-image at the size ``s`` was
    measured for (``requested`` forces a mode). Larger requests (references, a larger size) are planned per
    call by :func:`mode_for_request`."""
    if requested is not None:
        if requested not in MODES:
            raise GlmqError(f"unknown memory mode {requested!r}; valid modes: {', '.join(MODES)}")
        return MemoryMode(requested)
    if budget_bytes is None:
        return MemoryMode.RESIDENT
    for mode in MemoryMode:
        if peak_bytes(s, mode) <= budget_bytes:
            return mode
    need = peak_bytes(s, MemoryMode.OFFLOAD)
    raise GlmqError(
        f"does not fit: even with per-block offload this model needs about {need / GiB:.1f} GiB of GPU "
        f"memory, the budget is {budget_bytes / GiB:.1f} GiB"
    )


def mode_for_request(s: StageSizes, budget_bytes: int | None, base_mode: str, request: Request) -> MemoryMode:
    """The mode one call runs in: ``base_mode`` (the pipeline's), or a leaner one when this request would
    not fit the budget in it. Raises :class:`GlmqError` before any work when no mode fits.

    Only a staged pipeline moves down (to offload, streaming the DiT blocks from the pinned copies it already
    keeps); a resident pipeline keeps no CPU copies, so it runs resident or refuses."""
    base_mode = MemoryMode(base_mode)
    if budget_bytes is None:
        return base_mode
    modes = list(MemoryMode)
    candidates = (base_mode,) if base_mode is MemoryMode.RESIDENT else tuple(modes[modes.index(base_mode):])
    for mode in candidates:
        if peak_bytes(s, mode, request) <= budget_bytes:
            return mode
    need = peak_bytes(s, candidates[-1], request)
    what = f"{request.height}x{request.width}"
    if request.reference_tokens:
        what += f" with {len(request.reference_tokens)} reference image(s)"
    raise GlmqError(f"a {what} image needs about {need / GiB:.1f} GiB of GPU memory in the {candidates[-1]} "
                    f"mode; the budget is {budget_bytes / GiB:.1f} GiB (raise vram_budget_gb, load with a smaller "
                    "budget so that glmq can stage or offload, or use fewer or smaller references or a smaller "
                    "size)")


def cuda_context_bytes(device) -> int:
    """GPU memory in use outside PyTorch's caching allocator: the CUDA context, library handles and loaded
    kernel modules (grows as kernels load). A real card must hold it beside the allocator's reserved bytes."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return max(0, total - free - torch.cuda.memory_reserved(device))


def prefer_expandable_segments() -> None:
    """Under a budget, let the caching allocator grow its segments in place (PyTorch's expandable segments):
    at the same allocations the H200 sequence run reserved 0.5 GiB less with them
    (benchmarks/results/memory_sequence_h200/). A setting the user made in PYTORCH_CUDA_ALLOC_CONF wins."""
    import torch

    if "expandable_segments" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        return
    # The accelerator-generic setter where it exists (torch >= 2.9 deprecates the CUDA one with a warning).
    setter = (getattr(torch._C, "_accelerator_setAllocatorSettings", None)
              or getattr(torch.cuda.memory, "_set_allocator_settings", None))
    if setter is not None:
        with contextlib.suppress(RuntimeError, ValueError):
            setter("expandable_segments:True")


MAX_AR_BATCH = 16  # sequences one AR decode step serves (the engine's tested range, issue #13)


@dataclass(frozen=True)
class CallPlan:
    """How one call of several images runs: its memory mode, the images per DiT forward and the rows of an AR
    decode step (a power of two; more sequences run in further rounds, fewer leave rows idle)."""

    mode: MemoryMode
    dit_batch: int
    ar_batch: int


def plan_call(s: StageSizes, budget_bytes: int | None, base_mode: str, requests: list[Request], *,
              refuse: bool = True) -> CallPlan:
    """Plan a call of ``requests`` (one per image, one size) before any work.

    The mode is the one the most demanding image needs (:func:`mode_for_request`: a GlmqError when even one
    image does not fit and ``refuse``); then as many images per DiT forward and sequences per AR decode as
    fit the budget in that mode, at least one. A batch therefore never runs out of memory where its images
    made one at a time would not: it runs in smaller chunks. ``refuse=False`` (a GPU without a budget: the
    card's size stands in for one) keeps ``base_mode`` and only sizes the chunks."""
    if not requests:
        raise GlmqError("a call needs at least one image")
    n = len(requests)
    worst = _worst(requests)
    if budget_bytes is None:
        return CallPlan(MemoryMode(base_mode), n, min(_next_pow2(n), MAX_AR_BATCH))
    mode = mode_for_request(s, budget_bytes, base_mode, worst) if refuse else MemoryMode(base_mode)
    if refuse and peak_bytes(s, mode, worst, images=n) > budget_bytes:
        raise GlmqError(f"{n} images of {worst.height}x{worst.width} need about "
                        f"{peak_bytes(s, mode, worst, images=n) / GiB:.1f} GiB of GPU memory for their pixels at the "
                        f"end of the call; the budget is {budget_bytes / GiB:.1f} GiB (make fewer images per call)")

    def fits(**batch) -> bool:
        return peak_bytes(s, mode, worst, images=n, **batch) <= budget_bytes

    # Stages hold one batch each (the AR's sequences, or the DiT's images): each size is chosen on its own. AR
    # batches are powers of two (a round of 5 decodes as 8 rows): one compiled step and graph per size.
    dit = max((k for k in range(1, n + 1) if fits(dit_batch=k)), default=1)
    ar = max((k for k in _AR_SIZES if k <= _next_pow2(n) and fits(ar_batch=k)), default=1)
    return CallPlan(mode, dit, ar)


def _worst(requests: list[Request]) -> Request:
    """The request whose stages need the most: the most reference tokens, then references, then pixels."""
    return max(requests, key=lambda r: (sum(r.reference_tokens), len(r.reference_tokens), r.height * r.width))


def call_peaks(s: StageSizes, plan: CallPlan, requests: list[Request]) -> dict[str, int]:
    """The estimated peak of each stage (bytes on the card) of a call of ``requests`` run as ``plan``: what a
    bench row puts beside the peaks it measures, so that each run checks the plan."""
    return stage_peaks(s, plan.mode, _worst(requests), ar_batch=plan.ar_batch, dit_batch=plan.dit_batch,
                       images=len(requests))


_AR_SIZES = tuple(2**i for i in range(MAX_AR_BATCH.bit_length()) if 2**i <= MAX_AR_BATCH)


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()
