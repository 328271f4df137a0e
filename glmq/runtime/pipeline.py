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
from pathlib import Path

import torch

from glmq.errors import GlmqError
from glmq.quant.formats import tinygemm
from glmq.runtime import conditioning, vae
from glmq.runtime.call import StageTimes  # noqa: F401  (public name, re-exported)
from glmq.runtime.conditioning import glyph_texts  # noqa: F401  (public name, re-exported)
from glmq.runtime.memory import CallPlan, GiB, MemoryMode, Request, StageSizes, mode_for_request, plan_call
from glmq.runtime.placement import Placement


class GlmqImageOutput(list):
    """The images of one call: a list (``out[0]``, as glmq returned before) that also answers diffusers'
    ``out.images``."""

    @property
    def images(self) -> list:
        return list(self)


class GlmqPipeline:
    """Text-to-image and image-to-image with GLM-Image, one image or a batch per call; see :func:`load`."""

    supports_batch = True  # a call takes a list of prompts, num_images_per_prompt and a generator per image

    def __init__(self, path: Path | None, *, device: torch.device, dtype: torch.dtype, mode: MemoryMode,
                 sizes: StageSizes, components: dict, processor, tokenizer, scheduler_config: dict, attention: str,
                 cuda_graph: bool, compile: bool = False, attention_precision: str = "bf16",
                 vram_budget: int | None = None, cache_root: Path | None = None):
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
        self.int4_kernel = tinygemm.kernel_in(components)  # "glmq", "tinygemm" or None
        # Offload streams DiT weights through hooks, which a CUDA graph cannot replay; the AR keeps its graph.
        self.cuda_graph = cuda_graph and device.type == "cuda"
        self.dit_cuda_graph = self.cuda_graph and not self.mode.streams_dit
        self.compile = compile and device.type == "cuda"
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.last_times = StageTimes()
        self.last_prior_token_ids: torch.Tensor | None = None  # what the AR generated for the last image
        self._engine = None
        self._runner = None
        self.cache_root = cache_root  # where compile and autotune artifacts persist (glmq.runtime.compile_cache)
        self._autotune = None
        if cache_root is not None and device.type == "cuda":
            from glmq.runtime.compile_cache import AutotuneStore

            self._autotune = AutotuneStore(cache_root, device)
            self._autotune.load()
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

    def plan_for(self, requests: list[Request]) -> CallPlan:
        """The plan of one call of ``requests`` (one per image): its mode, and how many images go through a DiT
        forward and sequences through an AR decode step at a time (:func:`glmq.runtime.memory.plan_call`). On a
        GPU without a budget the card's size bounds the batches, and nothing is refused."""
        if self.device.type != "cuda":
            return plan_call(self.sizes, None, self.mode, requests)
        if self.vram_budget is None:
            total = torch.cuda.get_device_properties(self.device).total_memory
            return plan_call(self.sizes, total, self.mode, requests, refuse=False)
        return plan_call(self.sizes, self.vram_budget, self.mode, requests)

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
        """Run the AR for one prompt: the DiT's prior ids (and, for image-to-image, the references' ids and
        grids). ``inputs``: the processor's output for these arguments, when the caller already has it;
        ``step_callback(done, total)``: see :meth:`ArEngine.generate`."""
        from glmq.runtime.ar_engine import ArRequest, prior_tokens_from_generated

        inputs = inputs if inputs is not None else self._ar_inputs(prompt, images, height, width)
        input_ids, ref_ids, ref_grids = inputs["input_ids"], None, None
        if images:  # one vision pass: its ids fill the prompt and condition the DiT
            input_ids, ref_ids, ref_grids = conditioning.references_for_ar(self.ar, inputs, len(images), self.device)
        request = ArRequest(input_ids, inputs["image_grid_thw"], inputs.get("images_per_sample"), None,
                            inputs.get("attention_mask"), generator)
        tokens, = self._engine_for().generate_batch([request], step_callback=step_callback)
        prior = prior_tokens_from_generated(tokens.cpu(), inputs["image_grid_thw"], is_text_to_image=not images)
        return prior, tokens.shape[-1], ref_ids, ref_grids

    def _attention_for(self, seq_len: int) -> str:
        """The DiT attention this call's joint sequence (glyph + image tokens of the conditional pass) runs:
        glmq's processor's own choice for that length (``"bf16"``, ``"fp8"``, ``"int8"``), or ``"sdpa"``."""
        from glmq.runtime.dit_loop import attention_in_use

        return attention_in_use(self.transformer, seq_len)

    def encode_glyphs(self, prompt: str) -> torch.Tensor:
        """Glyph embeddings [1, T, d] of the prompt's quoted text ("" when there is none), as upstream."""
        return conditioning.encode_glyphs(self.tokenizer, self.text_encoder, prompt, self.device)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], image=None, height: int | None = 1024, width: int | None = 1024,
                 num_inference_steps: int = 50, guidance_scale: float = 1.5, generator=None,
                 prior_token_ids: torch.Tensor | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", *, num_images_per_prompt: int = 1,
                 prior_token_image_ids: torch.Tensor | None = None,
                 source_image_grid_thw: torch.Tensor | list | None = None, progress: bool = False, callback=None):
        """Generate images. Returns a :class:`GlmqImageOutput` (a list of PIL images that also has diffusers'
        ``.images``) for ``output_type="pil"``, a tensor ``[n, 3, H, W]`` in [0, 1] for ``"pt"``, or the final
        latents for ``"latent"``.

        ``prompt``: a string or a list of strings; each makes ``num_images_per_prompt`` images, prompt-major.
        ``image``: image-to-image references: for one prompt a PIL image or a list of them; for a list of
        prompts a list with one entry per prompt (None, an image or a list). ``generator``: one
        ``torch.Generator`` for the whole call, or a list with one per image; an image made with its own
        generator is the image a call would make alone with it. The images' AR sequences decode together and
        the DiT denoises them in chunks the memory plan allows (:mod:`glmq.runtime.call`).

        ``prior_token_ids``: skip the AR with these upsampled target-grid ids (one row per image, or one row
        for all; for image-to-image with one prompt also give ``prior_token_image_ids`` and
        ``source_image_grid_thw`` or let the AR's vision tower compute them). ``latents``: initial noise, one row
        per image. ``callback``: called as ``callback(stage, done, total)`` with stage "AR", "glyph", "DiT" or
        "VAE": once when the stage starts (``done`` 0), then after every AR token and every DiT step (``total``
        is the stage's token or step count, over all DiT chunks; 1 for glyph and VAE). An exception it raises
        stops the generation, which is how a host (ComfyUI) cancels a running image.

        Every call is planned before any work: under a VRAM budget it runs in the pipeline's memory mode, or a
        leaner one when a request needs it (see :meth:`mode_for`), or raises :class:`GlmqError`.
        """
        from glmq.runtime import call
        from glmq.runtime.batch import call_spec

        spec = call_spec(prompt, image, num_images_per_prompt, generator)
        height, width = height or 1024, width or 1024
        if height <= 0 or width <= 0 or height % 32 or width % 32:
            raise GlmqError(f"height and width must be positive multiples of 32, got {height}x{width}")
        if output_type not in ("pil", "pt", "latent"):
            raise GlmqError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
        if (prior_token_image_ids is not None or source_image_grid_thw is not None) and len(spec.prompts) > 1:
            raise GlmqError("prior_token_image_ids and source_image_grid_thw apply to a call with one prompt")
        out = call.run(self, spec, height=height, width=width, steps=num_inference_steps, guidance=guidance_scale,
                       prior_token_ids=prior_token_ids, latents=latents, prior_token_image_ids=prior_token_image_ids,
                       source_image_grid_thw=source_image_grid_thw, output_type=output_type, progress=progress,
                       callback=callback)
        self._persist()
        if output_type != "pil":
            return out
        from PIL import Image

        arr = (out.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype("uint8")
        return GlmqImageOutput([Image.fromarray(a) for a in arr])

    def _persist(self) -> None:
        """After a call: save what it autotuned, and mark the model compiled (``glmq generate --compile auto``)."""
        if self._autotune is not None:
            self._autotune.save()
        if self.compile and self.cache_root is not None and self.path is not None:
            from glmq.runtime.compile_cache import mark_compiled

            mark_compiled(self.cache_root, self.path, self.device)

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
