"""``glmq.load(path)``: a GLM-Image pipeline that generates fast and fits small GPUs.

The networks are the upstream transformers/diffusers modules loaded by :mod:`glmq.runtime.loader`
(quantized linears swapped in where the checkpoint says so); glmq owns only the loops around them:
the AR decode engine (:mod:`glmq.runtime.ar_engine`), the batched DiT loop (:mod:`glmq.runtime.dit_loop`),
and the memory stages (:mod:`glmq.runtime.memory`). The call mirrors diffusers' ``GlmImagePipeline``.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from glmq.errors import GlmqError
from glmq.runtime.memory import (
    OVERHEAD_BYTES,
    VAE_TILE_PIXELS,
    GiB,
    Request,
    StageSizes,
    activation_allowance,
    choose_mode,
    mode_for_request,
    vae_decode_bytes,
)

_GLYPH_PATTERNS = (r"'([^']*)'", r"\u201c([^\u201c\u201d]*)\u201d", r'"([^"]*)"', r"「([^「」]*)」")


def _debug(msg: str) -> None:
    """Stage-by-stage trace on stderr when GLMQ_DEBUG=1 (for diagnosing crashes in native code)."""
    if os.environ.get("GLMQ_DEBUG") == "1":
        import sys

        print(f"[glmq debug] {msg}", file=sys.stderr, flush=True)


def glyph_texts(prompt: str) -> list[str]:
    """The quoted substrings the glyph encoder renders, in the order the stock pipeline collects them."""
    found: list[str] = []
    for pattern in _GLYPH_PATTERNS:
        found += re.findall(pattern, prompt)
    return found


@dataclass
class StageTimes:
    """Seconds per stage of the last call (and AR tokens / DiT steps, for per-unit figures)."""

    ar_s: float = 0.0
    ar_tokens: int = 0
    glyph_s: float = 0.0
    dit_s: float = 0.0
    dit_steps: int = 0
    vae_s: float = 0.0
    total_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class GlmqImageOutput(list):
    """The images of one call: a list (``out[0]``, as glmq returned before) that also answers diffusers'
    ``out.images``."""

    @property
    def images(self) -> list:
        return list(self)


class _Parked:
    """A module whose tensors live in pinned CPU memory (copied once) and visit the GPU on demand.

    ``to_gpu`` copies every parameter and buffer in (asynchronously from pinned memory); ``to_cpu`` just
    points them back at the pinned copies, freeing the GPU copies: weights never change, so nothing is
    copied back.
    """

    def __init__(self, module, device: torch.device, exclude: set | None = None):
        self.device = device
        self.slots = []
        pin = torch.cuda.is_available() and os.environ.get("GLMQ_PIN_MEMORY", "1") != "0"
        self.non_blocking = pin
        for mod in module.modules():
            for kind in ("_parameters", "_buffers"):
                for name, t in getattr(mod, kind).items():
                    if t is not None and (id(mod), kind, name) not in (exclude or ()):
                        cpu = t.detach().to("cpu")
                        self.slots.append((mod, kind, name, cpu.pin_memory() if pin else cpu))
        self.to_cpu()

    @staticmethod
    def _set(mod, kind, name, value):
        if kind == "_parameters":
            mod._parameters[name].data = value
        else:
            mod._buffers[name] = value

    def to_gpu(self):
        for mod, kind, name, cpu in self.slots:
            self._set(mod, kind, name, cpu.to(self.device, non_blocking=self.non_blocking))

    def to_cpu(self):
        for mod, kind, name, cpu in self.slots:
            self._set(mod, kind, name, cpu)


def _slot_keys(module) -> set:
    return {(id(m), kind, name) for m in module.modules() for kind in ("_parameters", "_buffers")
            for name, t in getattr(m, kind).items() if t is not None}


class _BlockStreamer:
    """Keeps a stack of blocks in pinned CPU memory and copies each to the GPU just before it runs.

    ``resident``: submodule names of each block that stay with the rest of the network instead (the DiT's
    AdaLN ``norm1``, which the loop evaluates for all timesteps up front, outside the blocks' forward).
    """

    def __init__(self, blocks, device: torch.device, resident: tuple[str, ...] = ()):
        self.handles = []
        self.keys = set()
        for block in blocks:
            keep = set()
            for sub in resident:
                keep |= _slot_keys(block.get_submodule(sub))
            parked = _Parked(block, device, exclude=keep)
            self.keys |= {(id(m), kind, n) for m, kind, n, _ in parked.slots}
            self.handles.append(block.register_forward_pre_hook(lambda m, a, p=parked: p.to_gpu()))
            self.handles.append(block.register_forward_hook(lambda m, a, o, p=parked: p.to_cpu()))


class GlmqPipeline:
    """Text-to-image and image-to-image with GLM-Image; see :func:`load`."""

    def __init__(self, path: Path, *, device: torch.device, dtype: torch.dtype, mode: str, sizes: StageSizes,
                 components: dict, processor, tokenizer, scheduler_config: dict, attention: str,
                 cuda_graph: bool, compile: bool = False, attention_precision: str = "bf16",
                 vram_budget: int | None = None):
        self.path = path
        self.vram_budget = vram_budget  # bytes the caller allowed on the GPU (None: whatever is free)
        if vram_budget is not None and device.type == "cuda":
            _prefer_expandable_segments()
        self.device = device
        self.dtype = dtype
        self.mode = mode
        self.sizes = sizes
        self.ar = components["vision_language_encoder"]
        self.transformer = components["transformer"]
        self.text_encoder = components["text_encoder"]
        self.vae = components["vae"]
        self.processor = processor
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.attention = attention
        self.attention_precision = attention_precision  # of the DiT's glmq kernels; "sdpa" when they are off
        # Offload streams DiT weights through hooks, which a CUDA graph cannot replay; the AR keeps its graph.
        self.cuda_graph = cuda_graph and device.type == "cuda"
        self.dit_cuda_graph = self.cuda_graph and mode != "offload"
        self.compile = compile and device.type == "cuda"
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.last_times = StageTimes()
        self.last_prior_token_ids: torch.Tensor | None = None  # what the AR generated for the last image
        self._engine = None
        self._runner = None
        self._streamers: dict[str, _BlockStreamer] = {}
        self._parked: dict[str, _Parked] = {}
        self._place_initial()

    def release(self) -> None:
        """Undo what this pipeline installed on the modules (DiT wrappers, streaming hooks, AR caches and
        CUDA graphs), so the same modules can serve another pipeline."""
        if self._runner is not None:
            self._runner.remove()
            self._runner = None
        self._engine = None
        for streamer in self._streamers.values():
            for handle in streamer.handles:
                handle.remove()
        self._streamers.clear()

    # -- placement ----------------------------------------------------------------------------------------
    def _gpu(self) -> bool:
        return self.device.type == "cuda"

    def _park(self, name: str, module, exclude: set) -> _Parked:
        if name not in self._parked:
            self._parked[name] = _Parked(module, self.device, exclude)
        return self._parked[name]

    def _place_initial(self) -> None:
        nets = {"ar": self.ar, "dit": self.transformer, "glyph": self.text_encoder, "vae": self.vae}
        if not self._gpu() or self.mode == "resident":
            for m in nets.values():
                m.to(self.device)
            return
        streamed = set()
        if self.mode == "offload":
            # The DiT's blocks stream through the GPU; everything else is parked per stage.
            self._streamers["dit"] = _BlockStreamer(self.transformer.transformer_blocks, self.device,
                                                    resident=("norm1",))
            streamed = self._streamers["dit"].keys
        for name, m in nets.items():
            self._park(name, m, streamed)

    # What each stage of a call needs on the GPU (staged and offload modes; see glmq.runtime.memory).
    _STAGE_NETS = {"ar": {"ar"}, "encode": {"glyph", "vae"}, "dit": {"dit", "vae"}, "vae": {"vae"}}

    def _stage(self, stage: str, image_to_image: bool) -> None:
        """Put the networks ``stage`` needs on the GPU and park the others (staged/offload modes).

        Everything that leaves is parked first, then what the stage needs is copied in, so the GPU never holds
        two stages at once (the H200 sequence run, benchmarks/results/memory_sequence_h200/, ran out of memory
        under 16 GiB moving the AR and vision tower in while the DiT was still there). The AR's vision tower
        and VQ only visit for image-to-image. Streamed DiT blocks are left to their streamer.
        """
        if not self._gpu() or not self._parked:
            return
        keep_on_cpu = set()
        if "dit" in self._streamers:
            keep_on_cpu |= self._streamers["dit"].keys
        if not image_to_image:
            keep_on_cpu |= _slot_keys(self.ar.model.visual) | _slot_keys(self.ar.model.vqmodel)
        wanted = self._STAGE_NETS[stage]
        _debug(f"stage {stage}: moving {sorted(wanted)} to the GPU")
        moves = []
        for name, parked in self._parked.items():
            for mod, kind, pname, cpu in parked.slots:
                if name in wanted and (id(mod), kind, pname) not in keep_on_cpu:
                    current = getattr(mod, kind)[pname]
                    if current is None or current.device != self.device:
                        moves.append((mod, kind, pname, cpu, parked.non_blocking))
                else:
                    _Parked._set(mod, kind, pname, cpu)
        if self._gpu():
            torch.cuda.empty_cache()  # hand the parked stage's blocks back before the next one arrives
        for mod, kind, pname, cpu, non_blocking in moves:
            _Parked._set(mod, kind, pname, cpu.to(self.device, non_blocking=non_blocking))
        if self._gpu() and os.environ.get("GLMQ_DEBUG") == "1":
            _debug(f"stage {stage}: placed, {torch.cuda.memory_allocated(self.device) / GiB:.2f} GiB allocated")

    def _park_all(self) -> None:
        """Every parked network back to its pinned CPU copy (between calls, and after a failed one)."""
        for parked in self._parked.values():
            parked.to_cpu()
        if self._parked and self._gpu():
            torch.cuda.empty_cache()

    @staticmethod
    def request_for(height: int, width: int, reference_grids: torch.Tensor | None = None) -> Request:
        """The memory plan's view of a call: its size and each reference's token count, from the references'
        upsampled grids ``(n, 3)`` (the DiT's view: one prior id per patch)."""
        rows = reference_grids.tolist() if reference_grids is not None else []
        return Request(height, width, tuple(int(t * h * w) for t, h, w in rows))

    def mode_for(self, request: Request) -> str:
        """The memory mode this call runs in (see :func:`glmq.runtime.memory.mode_for_request`); a GlmqError,
        before any work, when the request cannot fit the budget."""
        if not self._gpu() or self.vram_budget is None:
            return self.mode
        return mode_for_request(self.sizes, self.vram_budget, self.mode, request)

    @contextlib.contextmanager
    def _run_in(self, mode: str):
        """Run one call in ``mode``; a staged pipeline streams its DiT blocks for a call that needs offload."""
        streamer = None
        runner = self._runner_for()
        try:
            if mode == "offload" and self.mode == "staged":
                self._park_all()  # the blocks' pinned copies already exist: the streamer reuses them
                streamer = _BlockStreamer(self.transformer.transformer_blocks, self.device, resident=("norm1",))
                self._streamers["dit"] = streamer
                with runner.eager():
                    yield
            else:
                yield
        finally:
            if streamer is not None:
                for handle in streamer.handles:
                    handle.remove()
                del self._streamers["dit"]
            self._park_all()

    # -- stages -------------------------------------------------------------------------------------------
    def _engine_for(self):
        """The AR engine, built once. In the staged and offload modes the AR's weights come back to the GPU at
        new addresses for every image: the compiled step takes them as inputs and stays (a new engine would
        trace it again), but the CUDA graphs captured with the old addresses are dropped and recaptured."""
        if self._engine is None:
            from glmq.runtime.ar_engine import ArEngine

            self._engine = ArEngine(self.ar, device=self.device, cuda_graph=self.cuda_graph, compile=self.compile)
        elif self.mode != "resident":
            self._engine.drop_graphs()
        return self._engine

    def _runner_for(self):
        if self._runner is None:
            from glmq.runtime.dit_loop import DitRunner

            self._runner = DitRunner(self.transformer, self.scheduler_config, device=self.device,
                                     dtype=self.dtype, cuda_graph=self.dit_cuda_graph,
                                     compile=self.compile and self.mode != "offload")
        return self._runner

    def _ar_inputs(self, prompt: str, images: list | None, height: int, width: int):
        content = [{"type": "image", "image": img} for img in (images or [])]
        content.append({"type": "text", "text": prompt})
        return self.processor.apply_chat_template([[{"role": "user", "content": content}]], tokenize=True,
                                                  target_h=height, target_w=width, return_dict=True,
                                                  return_tensors="pt")

    @torch.no_grad()
    def generate_prior_tokens(self, prompt: str, height: int, width: int, images: list | None = None,
                              generator: torch.Generator | None = None, *, inputs=None, step_callback=None):
        """Run the AR: the DiT's prior ids (and, for image-to-image, the references' ids and grids).
        ``inputs``: the processor's output for these arguments, when the caller already has it."""
        from glmq.runtime.ar_engine import prior_tokens_from_generated

        inputs = inputs if inputs is not None else self._ar_inputs(prompt, images, height, width)
        engine = self._engine_for()
        tokens = engine.generate(inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"],
                                 attention_mask=inputs.get("attention_mask"),
                                 images_per_sample=inputs.get("images_per_sample"),
                                 pixel_values=inputs.get("pixel_values"), generator=generator,
                                 step_callback=step_callback)
        grids = inputs["image_grid_thw"]
        prior = prior_tokens_from_generated(tokens.cpu(), grids, is_text_to_image=not images)
        ref_ids = ref_grids = None
        if images:
            ref_ids, ref_grids = self._reference_tokens(inputs, len(images))
        return prior, tokens.shape[-1], ref_ids, ref_grids

    def _reference_tokens(self, inputs, n_images: int):
        """VQ ids of the reference images, upsampled 2x like the prior ids, and their upsampled grids."""
        grids = inputs["image_grid_thw"][:n_images].to(self.device)
        inner = self.ar.model
        features = inner.get_image_features(inputs["pixel_values"].to(self.device), grids, return_dict=True)
        # transformers >= 5.2 returns one [C, h, w] map per image, which get_image_tokens takes as is
        # (the stock pipeline concatenates them into the wrong shape and crashes here).
        ids = inner.get_image_tokens(features.pooler_output).view(-1)
        upsampled = []
        for part, (_, h, w) in zip(torch.split(ids, grids.prod(-1).tolist()), grids.tolist()):
            grid = part.view(1, h, w)
            upsampled.append(grid.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(-1))
        up_grids = grids.clone()
        up_grids[:, 1:] *= 2
        return torch.cat(upsampled).cpu(), up_grids.cpu()

    @torch.no_grad()
    def encode_glyphs(self, prompt: str) -> torch.Tensor:
        """Glyph embeddings [1, T, d] of the prompt's quoted text ("" when there is none), as upstream."""
        texts = glyph_texts(prompt) or [""]
        ids = self.tokenizer(texts, max_length=2048, truncation=True).input_ids
        pad = self.tokenizer.pad_token_id
        # Upstream prepends one pad token to every text when the NUMBER of texts is even; replicated as
        # is so that glmq's embeddings equal the stock pipeline's.
        ids = [[pad] * ((len(ids) + 1) % 2) + row for row in ids]
        longest = max(len(row) for row in ids)
        mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in ids], device=self.device)
        ids = torch.tensor([r + [pad] * (longest - len(r)) for r in ids], device=self.device)
        hidden = self.text_encoder(ids, attention_mask=mask).last_hidden_state
        return hidden[mask.bool()].unsqueeze(0)

    def _preprocess_reference(self, img, height: int, width: int) -> torch.Tensor:
        from diffusers.image_processor import VaeImageProcessor

        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor).preprocess(img, height=height, width=width)

    @torch.no_grad()
    def __call__(self, prompt: str, image=None, height: int | None = 1024, width: int | None = 1024,
                 num_inference_steps: int = 50, guidance_scale: float = 1.5,
                 generator: torch.Generator | None = None, prior_token_ids: torch.Tensor | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", *,
                 prior_token_image_ids: torch.Tensor | None = None,
                 source_image_grid_thw: torch.Tensor | list | None = None, progress: bool = False,
                 callback=None):
        """Generate one image. Returns a :class:`GlmqImageOutput` (a list of one PIL image that also has
        diffusers' ``.images``) for ``output_type="pil"``, a tensor ``[1, 3, H, W]`` in [0, 1] for ``"pt"``,
        or the final latents for ``"latent"``.

        ``image``: a PIL image or a list of them (image-to-image references). ``prior_token_ids``: skip the
        AR with these upsampled target-grid ids (for image-to-image also give ``prior_token_image_ids`` and
        ``source_image_grid_thw`` or let the AR's vision tower compute them). ``latents``: initial noise.
        ``callback``: called as ``callback(stage, done, total)`` with stage "AR", "glyph", "DiT" or "VAE": once
        when the stage starts (``done`` 0), then after every AR token and every DiT step (``total`` is the
        stage's token or step count; 1 for glyph and VAE). An exception it raises stops the generation, which
        is how a host (ComfyUI) cancels a running image.

        Under a VRAM budget the call is planned before any work: it runs in the pipeline's memory mode, or a
        leaner one when this request needs it (see :meth:`mode_for`), or raises :class:`GlmqError`.
        """
        from glmq.progress import StageProgress

        if not isinstance(prompt, str):
            raise GlmqError("glmq generates one prompt per call; call it once per prompt")
        images = [image] if image is not None and not isinstance(image, (list, tuple)) else (list(image) if image else None)
        height, width = height or 1024, width or 1024
        if height <= 0 or width <= 0 or height % 32 or width % 32:
            raise GlmqError(f"height and width must be positive multiples of 32, got {height}x{width}")
        if output_type not in ("pil", "pt", "latent"):
            raise GlmqError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
        i2i = bool(images)
        inputs = None
        if prior_token_ids is None or (i2i and prior_token_image_ids is None):
            inputs = self._ar_inputs(prompt, images, height, width)  # CPU only: the grids size the plan
        if i2i and source_image_grid_thw is None:
            up = inputs["image_grid_thw"][:len(images)].clone()
            up[:, 1:] *= 2
            grids_for_plan = up
        elif i2i:
            grids_for_plan = _as_grids(source_image_grid_thw)
        else:
            grids_for_plan = None
        request = self.request_for(height, width, grids_for_plan)
        mode = self.mode_for(request)
        times = StageTimes()
        times.extra["mode"] = mode
        t_start = time.perf_counter()
        bar = StageProgress(enabled=progress)
        report = callback or (lambda stage, done, total: None)

        def dit_step(i, t, x):
            bar.step()
            report("DiT", i + 1, num_inference_steps)

        kv = None
        try:
            with self._run_in(mode):
                if prior_token_ids is None:
                    bar.stage("AR")
                    report("AR", 0, 1)
                    self._stage("ar", i2i)
                    t0 = self._sync_time()
                    _debug("AR: generating")
                    prior_token_ids, n_tokens, ref_ids, ref_grids = self.generate_prior_tokens(
                        prompt, height, width, images, generator, inputs=inputs,
                        step_callback=lambda done, total: report("AR", done, total))
                    times.ar_s, times.ar_tokens = self._sync_time() - t0, n_tokens
                    self.last_prior_token_ids = prior_token_ids
                    if prior_token_image_ids is None:
                        prior_token_image_ids, source_image_grid_thw = ref_ids, ref_grids
                elif i2i and prior_token_image_ids is None:
                    self._stage("ar", True)
                    prior_token_image_ids, source_image_grid_thw = self._reference_tokens(inputs, len(images))
                self._note_peak(times, "ar")
                bar.stage("glyph")
                report("glyph", 0, 1)
                self._stage("encode", i2i)
                t0 = self._sync_time()
                prompt_embeds = self.encode_glyphs(prompt).to(self.dtype)
                negative = self.encode_glyphs("").to(self.dtype) if guidance_scale > 1 else None
                times.glyph_s = self._sync_time() - t0
                cond_latents = source_grids = None
                if i2i:
                    source_grids = _as_grids(source_image_grid_thw)
                    cond_latents = self._encode_references(images, source_grids)
                self._note_peak(times, "encode")
                _debug("glyph done; DiT")
                self._stage("dit", i2i)
                runner = self._runner_for()
                if i2i:
                    kv = runner.write_reference_kv([cond_latents], [prior_token_image_ids.to(self.device)],
                                                   [source_grids], vae_scale_factor=self.vae_scale_factor)
                if latents is None:
                    shape = (1, self.transformer.config.in_channels, height // self.vae_scale_factor,
                             width // self.vae_scale_factor)
                    gen_device = generator.device if generator is not None else torch.device("cpu")
                    latents = torch.randn(shape, generator=generator, device=gen_device, dtype=self.dtype)
                bar.stage("DiT", total=num_inference_steps)
                report("DiT", 0, num_inference_steps)
                t0 = self._sync_time()
                latents = runner.denoise(latents.to(self.device, self.dtype), prompt_embeds=prompt_embeds,
                                         negative_prompt_embeds=negative,
                                         prior_token_ids=prior_token_ids.to(self.device), height=height,
                                         width=width, num_inference_steps=num_inference_steps,
                                         guidance_scale=guidance_scale, kv_caches=kv,
                                         callback=dit_step)
                times.dit_s, times.dit_steps = self._sync_time() - t0, num_inference_steps
                if kv is not None:
                    kv.clear()
                    kv = None
                self._note_peak(times, "dit")
                if output_type == "latent":
                    self.last_times = times
                    return latents
                _debug("DiT done; VAE")
                bar.stage("VAE")
                report("VAE", 0, 1)
                self._stage("vae", i2i)
                t0 = self._sync_time()
                image_out = self.decode_latents(latents)
                times.vae_s = self._sync_time() - t0
                report("VAE", 1, 1)
                self._note_peak(times, "vae")
        finally:
            if kv is not None:
                kv.clear()
            bar.close()
        times.total_s = time.perf_counter() - t_start
        self.last_times = times
        if output_type == "pt":
            return image_out
        from PIL import Image

        arr = (image_out[0].permute(1, 2, 0).float().cpu().numpy() * 255).round().astype("uint8")
        return GlmqImageOutput([Image.fromarray(arr)])

    def _encode_references(self, images: list, grids: torch.Tensor) -> list[torch.Tensor]:
        """Normalized VAE latents of each reference, sized from its grid.

        Each reference's latents must hold exactly one patch per (upsampled) VQ id, so its size comes from the
        processor's grid. Upstream floors the image to a multiple of 16 pixels instead, which disagrees whenever
        the processor resized it (a 1024x1024 reference gets a 31x31 grid, i.e. 992 pixels) and then fails
        adding the prior embeddings to the patches.
        """
        if len(grids) != len(images):
            raise GlmqError(f"{len(images)} reference image(s) but {len(grids)} source grid(s)")
        mean, std = self._latent_stats(self.dtype)
        cell = self.vae_scale_factor * self.transformer.config.patch_size
        out = []
        for img, (_, grid_h, grid_w) in zip(images, grids.tolist()):
            pixels = self._preprocess_reference(img, grid_h * cell, grid_w * cell)
            lat = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mode()
            out.append((lat.to(self.dtype) - mean) / std)
        return out

    def _note_peak(self, times: StageTimes, stage: str) -> None:
        """Peak reserved GiB since the caller's last reset, after ``stage`` (CUDA): which stage set the peak."""
        if self._gpu():
            peaks = times.extra.setdefault("peak_reserved_gib_after", {})
            peaks[stage] = round(torch.cuda.max_memory_reserved(self.device) / GiB, 3)

    def _latent_stats(self, dtype):
        c = self.vae.config.latent_channels
        mean = torch.tensor(self.vae.config.latents_mean).view(1, c, 1, 1).to(self.device, dtype)
        std = torch.tensor(self.vae.config.latents_std).view(1, c, 1, 1).to(self.device, dtype)
        return mean, std

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, *, tiled: bool | None = None) -> torch.Tensor:
        """VAE-decode ``latents`` (DiT space) into images in [0, 1], [B, 3, H, W].

        ``tiled``: decode in overlapping 1024-pixel tiles (see :func:`decode_tiled`), which bounds the decoder's
        working set at that of a 1024x1024 image. None (default): tile only an image larger than 1024x1024
        whose whole decode would not fit the GPU memory budget (or, with no budget, the free memory).
        """
        vdtype = self.vae.dtype
        mean, std = self._latent_stats(vdtype)
        z = latents.to(self.device, vdtype) * std + mean
        if tiled is None:
            tiled = self._vae_needs_tiles(z)
        image = decode_tiled(self.vae, z) if tiled else self.vae.decode(z, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def _vae_needs_tiles(self, z: torch.Tensor) -> bool:
        height, width = z.shape[-2] * self.vae_scale_factor, z.shape[-1] * self.vae_scale_factor
        if height * width <= VAE_TILE_PIXELS**2 or self.device.type != "cuda":
            return False
        need = vae_decode_bytes(height, width, batch=z.shape[0], channels=self.vae.config.block_out_channels[0],
                                bytes_per_value=z.element_size())
        allocated = torch.cuda.memory_allocated(self.device)
        if self.vram_budget is not None:  # the budget holds the CUDA context too (glmq.runtime.memory)
            available = self.vram_budget - OVERHEAD_BYTES - allocated
        else:  # free on the card, plus what the caching allocator holds unused
            available = torch.cuda.mem_get_info(self.device)[0] + torch.cuda.memory_reserved(self.device) - allocated
        return need > available

    def _sync_time(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def _prefer_expandable_segments() -> None:
    """Under a budget, let the caching allocator grow its segments in place (PyTorch's expandable segments):
    at the same allocations the H200 sequence run reserved 0.5 GiB less with them
    (benchmarks/results/memory_sequence_h200/). A setting the user made in PYTORCH_CUDA_ALLOC_CONF wins."""
    if "expandable_segments" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        return
    # The accelerator-generic setter where it exists (torch >= 2.9 deprecates the CUDA one with a warning).
    setter = (getattr(torch._C, "_accelerator_setAllocatorSettings", None)
              or getattr(torch.cuda.memory, "_set_allocator_settings", None))
    if setter is not None:
        with contextlib.suppress(RuntimeError, ValueError):
            setter("expandable_segments:True")


def _as_grids(grids) -> torch.Tensor:
    """Source grids given as one tensor or one grid (tensor or [t, h, w]) per reference, as (n, 3)."""
    if isinstance(grids, (list, tuple)):
        grids = torch.cat([torch.as_tensor(g).reshape(-1, 3) for g in grids])
    return torch.as_tensor(grids).reshape(-1, 3)


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


_VISION_PREFIXES = ("model.visual.", "model.vqmodel.")


def _gpu_tensor_bytes(cr, dtype_bytes: int) -> list[tuple[str, int]]:
    """(name, bytes on the GPU) of a checkpoint component's tensors: floats become ``dtype_bytes`` wide."""
    out = []
    for name, info in cr.tensors.items():
        floating = info.dtype in ("float32", "bfloat16", "float16")
        out.append((name, info.numel * dtype_bytes if floating else info.nbytes))
    return out


def _module_tensor_bytes(module) -> list[tuple[str, int]]:
    """(name, bytes) of a live module's parameters and buffers, each shared tensor once."""
    out, seen = [], set()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            out.append((name, t.numel() * t.element_size()))
    return out


def _largest_group(named: list[tuple[str, int]], prefix: str) -> int:
    """The largest total over tensors ``prefix<i>.*`` grouped by ``i`` (one decoder layer or DiT block)."""
    groups: dict[str, int] = {}
    for name, nbytes in named:
        if name.startswith(prefix):
            key = name[len(prefix):].split(".", 1)[0]
            groups[key] = groups.get(key, 0) + nbytes
    return max(groups.values(), default=0)


def _kv_bytes_per_token(dit_config) -> int:
    """bf16 K and V of one token in every DiT layer: what each reference token costs in the K/V cache."""
    get = dit_config.get if isinstance(dit_config, dict) else (lambda k, d=None: getattr(dit_config, k, d))
    inner = int(get("num_attention_heads", 0) or 0) * int(get("attention_head_dim", 0) or 0)
    return 2 * int(get("num_layers", 0) or 0) * inner * 2


def _stage_sizes(named: dict[str, list[tuple[str, int]]], height: int, width: int, dit_config=None) -> StageSizes:
    ar, dit = named["vision_language_encoder"], named["transformer"]
    vision = sum(b for n, b in ar if n.startswith(_VISION_PREFIXES))
    act_ar, act_dit, act_vae = activation_allowance(height, width)
    return StageSizes(
        ar_weights=sum(b for _, b in ar) - vision,
        vision_weights=vision,
        glyph_weights=sum(b for _, b in named["text_encoder"]),
        dit_weights=sum(b for _, b in dit),
        vae_weights=sum(b for _, b in named["vae"]),
        ar_activations=act_ar,
        dit_activations=act_dit,
        vae_activations=act_vae,
        largest_ar_block=_largest_group(ar, "model.language_model.layers."),
        largest_dit_block=_largest_group(dit, "transformer_blocks."),
        dit_kv_bytes_per_token=_kv_bytes_per_token(dit_config) if dit_config is not None else 0,
        size=(height, width),
    )


def stage_sizes(reader, height: int = 1024, width: int = 1024) -> StageSizes:
    """Per-stage GPU bytes from a checkpoint's headers (bf16 compute; the glyph encoder stays fp32)."""
    widths = {"vision_language_encoder": 2, "transformer": 2, "text_encoder": 4, "vae": 2}
    return _stage_sizes({name: _gpu_tensor_bytes(reader.component(name), w) for name, w in widths.items()},
                        height, width, reader.component("transformer").config)


def stage_sizes_from_modules(components: dict, height: int = 1024, width: int = 1024) -> StageSizes:
    """Like :func:`stage_sizes`, measured on live modules (their current dtypes)."""
    names = ("vision_language_encoder", "transformer", "text_encoder", "vae")
    return _stage_sizes({name: _module_tensor_bytes(components[name]) for name in names}, height, width,
                        components["transformer"].config)


def from_modules(components: dict, *, processor, tokenizer, scheduler_config: dict, device: str = "cuda",
                 vram_budget_gb: float | None = None, dtype: torch.dtype | None = None, mode: str | None = None,
                 attention: str = "auto", cuda_graph: bool = True, compile: bool = False,
                 path: Path | None = None, attention_precision: str | None = None) -> GlmqPipeline:
    """A pipeline over already-built modules (e.g. random full-size weights built on the GPU).
    ``attention_precision``: see :func:`load`; None reads the recipe's choice from the transformer's config."""
    dev = torch.device(device)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    sizes = stage_sizes_from_modules(components)
    budget = int(vram_budget_gb * GiB) if vram_budget_gb is not None and dev.type == "cuda" else None
    chosen = choose_mode(sizes, budget, requested=mode) if dev.type == "cuda" else "resident"
    if attention_precision is None and path is not None:
        from glmq.io.layout import read_json

        tcfg = read_json(path / "transformer" / "config.json", "transformer config.json")
    else:  # modules quantized in place carry their recipe (glmq.quant.inplace)
        recipe = getattr(components["transformer"], "glmq_recipe", None)
        tcfg = {"quantization_config": {"recipe": recipe}} if recipe else {}
    precision = _install_attention(components, dev, attention, attention_precision, tcfg)
    return GlmqPipeline(path, device=dev, dtype=dtype, mode=chosen, sizes=sizes, components=components,
                        processor=processor, tokenizer=tokenizer, scheduler_config=scheduler_config,
                        attention=attention, cuda_graph=cuda_graph, compile=compile, attention_precision=precision,
                        vram_budget=budget)


def load(path: str | Path, device: str = "cuda", vram_budget_gb: float | None = None, *,
         dtype: torch.dtype | None = None, mode: str | None = None, attention: str = "auto",
         cuda_graph: bool = True, compile: bool = False, attention_precision: str | None = None) -> GlmqPipeline:
    """Load a GLM-Image folder (the bf16 release, make-tiny output or ``glmq quantize`` output).

    Args:
        path: the pipeline folder.
        device: "cuda" (default), "cuda:N" or "cpu".
        vram_budget_gb: GPU memory to plan for, counted as a card counts it (the allocator's peak reserved
            bytes plus the CUDA context); the fastest memory mode whose estimated peak fits text-to-image is
            used (``resident``, ``staged``, ``offload``), and each call is planned again from its size and
            references (see :mod:`glmq.runtime.memory`); None: all resident.
        dtype: compute dtype of the unquantized parts (bf16 on GPU, fp32 on CPU by default).
        mode: force a memory mode.
        attention: "auto" (glmq's Triton kernels on CUDA, upstream SDPA elsewhere), "glmq", "sdpa".
        cuda_graph: capture the AR step and DiT step in CUDA graphs (CUDA, non-offload modes only).
        compile: ``torch.compile`` the AR decode step and (except in the offload mode) the DiT blocks (CUDA; the
            first image pays the compilation).
        attention_precision: DiT attention kernel precision, "bf16", "fp8" or "int8"; None (default) uses what
            the quantizing recipe recorded (its ``[attention]`` table), bf16 for unquantized folders. Applies
            to glmq's kernels only (``attention`` "auto" on CUDA, or "glmq").
    """
    from transformers import ByT5Tokenizer, GlmImageProcessor

    from glmq.io.reader import PipelineReader
    from glmq.models.build import _quiet_transformers
    from glmq.runtime.loader import load_component

    _quiet_transformers()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GlmqError("device cuda requested but no CUDA GPU is available (use device='cpu')")
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    path = Path(path)
    from glmq.io.layout import read_json
    from glmq.runtime.loader import GgufComponent, check_before_load, open_component

    check_before_load(path)  # validates as `glmq inspect` does (configs, tensors, manifest) before allocating
    sources = {name: open_component(path, name)
               for name in ("vision_language_encoder", "transformer", "text_encoder", "vae")}
    has_gguf = any(isinstance(s, GgufComponent) for s in sources.values())
    budget = int(vram_budget_gb * GiB) if vram_budget_gb is not None and dev.type == "cuda" else None
    chosen = None
    if not has_gguf:  # sizes straight from the safetensors headers: the mode is known before loading
        sizes = stage_sizes(PipelineReader(path))
        chosen = choose_mode(sizes, budget, requested=mode) if dev.type == "cuda" else "resident"
    components = {}
    for name, src in sources.items():
        target_dtype = torch.float32 if name == "text_encoder" else dtype
        if name == "vae" and dtype == torch.float16:
            target_dtype = torch.bfloat16  # an fp16 VAE overflows to NaN
        load_device = dev if chosen == "resident" else "cpu"
        components[name] = load_component(src, device=load_device, dtype=target_dtype)
    processor = GlmImageProcessor.from_pretrained(path / "processor")
    tokenizer = ByT5Tokenizer.from_pretrained(path / "tokenizer")
    scheduler_config = read_json(path / "scheduler" / "scheduler_config.json", "scheduler config")
    if chosen is None:  # GGUF: dequantized on load, sized from the modules
        return from_modules(components, processor=processor, tokenizer=tokenizer, scheduler_config=scheduler_config,
                            device=device, vram_budget_gb=vram_budget_gb, dtype=dtype, mode=mode,
                            attention=attention, cuda_graph=cuda_graph, compile=compile, path=path,
                            attention_precision=attention_precision)
    precision = _install_attention(components, dev, attention, attention_precision, sources["transformer"].config)
    return GlmqPipeline(path, device=dev, dtype=dtype, mode=chosen, sizes=sizes, components=components,
                        processor=processor, tokenizer=tokenizer, scheduler_config=scheduler_config,
                        attention=attention, cuda_graph=cuda_graph, compile=compile, attention_precision=precision,
                        vram_budget=budget)


def _install_attention(components: dict, device: torch.device, attention: str, precision: str | None,
                       transformer_config: dict) -> str:
    """Plug glmq's kernels in as ``attention`` says; returns the DiT attention precision ("sdpa" when off)."""
    if attention not in ("auto", "glmq", "sdpa"):
        raise GlmqError(f"unknown attention {attention!r}; valid: auto, glmq, sdpa")
    use_glmq = attention == "glmq" or (attention == "auto" and device.type == "cuda")
    if not use_glmq:
        if precision not in (None, "bf16"):
            raise GlmqError(f"attention precision {precision!r} needs glmq's attention kernels "
                            f"(attention='glmq', or 'auto' on CUDA), not {attention!r} on {device.type}")
        return "sdpa"
    from glmq.runtime.attention import attention_policy, install_dit_attention, register_ar_attention

    dit_precision, min_tokens = attention_policy(precision, transformer_config, device)
    register_ar_attention()
    components["vision_language_encoder"].model.language_model.set_attn_implementation("glmq")
    install_dit_attention(components["transformer"], precision=dit_precision, min_tokens=min_tokens)
    return dit_precision if not min_tokens else f"{dit_precision} (>= {min_tokens} tokens, else bf16)"
