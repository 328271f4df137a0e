"""``glmq.load(path)``: a GLM-Image pipeline that generates fast and fits small GPUs.

The networks are the upstream transformers/diffusers modules loaded by :mod:`glmq.runtime.loader`
(quantized linears swapped in where the checkpoint says so); glmq owns only the loops around them and where
the weights sit: the AR decode engine (:mod:`~glmq.runtime.ar_engine`), the batched DiT loop
(:mod:`~glmq.runtime.dit_loop`), the memory plan (:mod:`~glmq.runtime.memory`) and placement
(:mod:`~glmq.runtime.placement`), the conditioning inputs (:mod:`~glmq.runtime.conditioning`) and the VAE
(:mod:`~glmq.runtime.vae`). The call mirrors diffusers' ``GlmImagePipeline``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from glmq.errors import GlmqError
from glmq.runtime import conditioning, vae
from glmq.runtime.conditioning import glyph_texts  # noqa: F401  (public name, re-exported)
from glmq.runtime.memory import GiB, MemoryMode, Request, StageSizes, mode_for_request
from glmq.runtime.placement import Placement, _debug


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


class GlmqPipeline:
    """Text-to-image and image-to-image with GLM-Image; see :func:`load`."""

    def __init__(self, path: Path | None, *, device: torch.device, dtype: torch.dtype, mode: MemoryMode,
                 sizes: StageSizes, components: dict, processor, tokenizer, scheduler_config: dict, attention: str,
                 cuda_graph: bool, compile: bool = False, attention_precision: str = "bf16",
                 vram_budget: int | None = None):
        from glmq.runtime.memory import prefer_expandable_segments

        self.path, self.device, self.dtype, self.sizes = path, device, dtype, sizes
        self.vram_budget = vram_budget  # bytes the caller allowed on the GPU (None: whatever is free)
        if vram_budget is not None and device.type == "cuda":
            prefer_expandable_segments()
        self.mode = MemoryMode(mode)
        self.ar = components["vision_language_encoder"]
        self.transformer = components["transformer"]
        self.text_encoder = components["text_encoder"]
        self.vae = components["vae"]
        self.processor, self.tokenizer, self.scheduler_config = processor, tokenizer, scheduler_config
        self.attention = attention
        self.attention_precision = attention_precision  # of the DiT's glmq kernels; "sdpa" when they are off
        # Offload streams DiT weights through hooks, which a CUDA graph cannot replay; the AR keeps its graph.
        self.cuda_graph = cuda_graph and device.type == "cuda"
        self.dit_cuda_graph = self.cuda_graph and not self.mode.streams_dit
        self.compile = compile and device.type == "cuda"
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.last_times = StageTimes()
        self.last_prior_token_ids: torch.Tensor | None = None  # what the AR generated for the last image
        self._engine = None
        self._runner = None
        nets = {"ar": self.ar, "dit": self.transformer, "glyph": self.text_encoder, "vae": self.vae}
        self.placement = Placement(nets, device, self.mode, vision=(self.ar.model.visual, self.ar.model.vqmodel))

    def release(self) -> None:
        """Undo what this pipeline installed on the modules (DiT wrappers, streaming hooks, AR caches and
        CUDA graphs), so the same modules can serve another pipeline."""
        if self._runner is not None:
            self._runner.remove()
            self._runner = None
        self._engine = None
        self.placement.release()

    # -- planning -----------------------------------------------------------------------------------------
    @staticmethod
    def request_for(height: int, width: int, reference_grids: torch.Tensor | None = None) -> Request:
        """The memory plan's view of a call: its size and each reference's token count, from the references'
        upsampled grids ``(n, 3)`` (the DiT's view: one prior id per patch)."""
        rows = reference_grids.tolist() if reference_grids is not None else []
        return Request(height, width, tuple(int(t * h * w) for t, h, w in rows))

    def mode_for(self, request: Request) -> MemoryMode:
        """The memory mode this call runs in (see :func:`glmq.runtime.memory.mode_for_request`); a GlmqError,
        before any work, when the request cannot fit the budget."""
        if self.device.type != "cuda" or self.vram_budget is None:
            return self.mode
        return mode_for_request(self.sizes, self.vram_budget, self.mode, request)

    # -- stages -------------------------------------------------------------------------------------------
    def _engine_for(self):
        """The AR engine, built once. Outside the resident mode the AR's weights come back to the GPU at new
        addresses for every image: the compiled step takes them as inputs and stays (a new engine would trace
        it again), but the CUDA graphs captured with the old addresses are dropped and recaptured."""
        if self._engine is None:
            from glmq.runtime.ar_engine import ArEngine

            self._engine = ArEngine(self.ar, device=self.device, cuda_graph=self.cuda_graph, compile=self.compile)
        elif self.mode != MemoryMode.RESIDENT:
            self._engine.drop_graphs()
        return self._engine

    def _runner_for(self):
        if self._runner is None:
            from glmq.runtime.dit_loop import DitRunner

            self._runner = DitRunner(self.transformer, self.scheduler_config, device=self.device,
                                     dtype=self.dtype, cuda_graph=self.dit_cuda_graph,
                                     compile=self.compile and not self.mode.streams_dit)
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
        ``inputs``: the processor's output for these arguments, when the caller already has it;
        ``step_callback(done, total)``: see :meth:`ArEngine.generate`."""
        from glmq.runtime.ar_engine import prior_tokens_from_generated

        inputs = inputs if inputs is not None else self._ar_inputs(prompt, images, height, width)
        tokens = self._engine_for().generate(inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"],
                                             attention_mask=inputs.get("attention_mask"),
                                             images_per_sample=inputs.get("images_per_sample"),
                                             pixel_values=inputs.get("pixel_values"), generator=generator,
                                             step_callback=step_callback)
        prior = prior_tokens_from_generated(tokens.cpu(), inputs["image_grid_thw"], is_text_to_image=not images)
        ref_ids = ref_grids = None
        if images:
            ref_ids, ref_grids = conditioning.reference_tokens(self.ar, inputs, len(images), self.device)
        return prior, tokens.shape[-1], ref_ids, ref_grids

    def _attention_for(self, seq_len: int) -> str:
        """The DiT attention this call's joint sequence (glyph + image tokens of the conditional pass) runs:
        glmq's processor's own choice for that length (``"bf16"``, ``"fp8"``, ``"int8"``), or ``"sdpa"``."""
        proc = self.transformer.transformer_blocks[0].attn1.processor
        return proc.precision_for(seq_len) if hasattr(proc, "precision_for") else "sdpa"

    def encode_glyphs(self, prompt: str) -> torch.Tensor:
        """Glyph embeddings [1, T, d] of the prompt's quoted text ("" when there is none), as upstream."""
        return conditioning.encode_glyphs(self.tokenizer, self.text_encoder, prompt, self.device)

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
        plan_grids = None
        if i2i and source_image_grid_thw is not None:
            plan_grids = conditioning.as_grids(source_image_grid_thw)
        elif i2i:
            plan_grids = inputs["image_grid_thw"][:len(images)].clone()
            plan_grids[:, 1:] *= 2
        mode = self.mode_for(self.request_for(height, width, plan_grids))
        times = StageTimes(extra={"mode": str(mode), "guidance_scale": float(guidance_scale),
                                  "size": f"{width}x{height}"})
        t_start = time.perf_counter()
        bar = StageProgress(enabled=progress)
        report = callback or (lambda stage, done, total: None)

        def dit_step(i, t, x):
            bar.step()
            report("DiT", i + 1, num_inference_steps)

        stage = self.placement.stage
        kv = None
        try:
            with self.placement.call_in(mode, self._runner_for()):
                if prior_token_ids is None:
                    bar.stage("AR")
                    report("AR", 0, 1)
                    stage("ar", i2i)
                    t0 = self._sync_time()
                    prior_token_ids, n_tokens, ref_ids, ref_grids = self.generate_prior_tokens(
                        prompt, height, width, images, generator, inputs=inputs,
                        step_callback=lambda done, total: report("AR", done, total))
                    times.ar_s, times.ar_tokens = self._sync_time() - t0, n_tokens
                    self.last_prior_token_ids = prior_token_ids
                    if prior_token_image_ids is None:
                        prior_token_image_ids, source_image_grid_thw = ref_ids, ref_grids
                elif i2i and prior_token_image_ids is None:
                    stage("ar", True)
                    prior_token_image_ids, source_image_grid_thw = conditioning.reference_tokens(
                        self.ar, inputs, len(images), self.device)
                self._note_peak(times, "ar")
                bar.stage("glyph")
                report("glyph", 0, 1)
                stage("encode", i2i)
                t0 = self._sync_time()
                prompt_embeds = self.encode_glyphs(prompt).to(self.dtype)
                negative = self.encode_glyphs("").to(self.dtype) if guidance_scale > 1 else None
                times.glyph_s = self._sync_time() - t0
                if i2i:
                    source_grids = conditioning.as_grids(source_image_grid_thw)
                    cond_latents = conditioning.reference_latents(
                        self.vae, images, source_grids, patch_size=self.transformer.config.patch_size,
                        device=self.device, dtype=self.dtype)
                self._note_peak(times, "encode")
                _debug("glyph done; DiT")
                stage("dit", i2i)
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
                patch = self.transformer.config.patch_size * self.vae_scale_factor
                times.extra["dit_attention"] = self._attention_for(
                    prompt_embeds.shape[1] + (height // patch) * (width // patch))
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
                bar.stage("VAE")
                report("VAE", 0, 1)
                stage("vae", i2i)
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

    def _note_peak(self, times: StageTimes, stage: str) -> None:
        """Peak reserved GiB since the caller's last reset, after ``stage`` (CUDA): which stage set the peak."""
        if self.device.type == "cuda":
            peaks = times.extra.setdefault("peak_reserved_gib_after", {})
            peaks[stage] = round(torch.cuda.max_memory_reserved(self.device) / GiB, 3)

    def decode_latents(self, latents: torch.Tensor, *, tiled: bool | None = None) -> torch.Tensor:
        """VAE-decode ``latents`` (DiT space) into images in [0, 1], [B, 3, H, W]; ``tiled``: see
        :func:`glmq.runtime.vae.decode` (None: only when the one-piece decode would not fit)."""
        return vae.decode(self.vae, latents, self.device, vram_budget=self.vram_budget, tiled=tiled)

    def _sync_time(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def __getattr__(name: str):
    # ``load`` and ``from_modules`` live in glmq.runtime.load (which imports this module); the old names stay.
    if name in ("load", "from_modules"):
        from glmq.runtime import load as _load

        return getattr(_load, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
