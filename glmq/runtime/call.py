"""One call of :class:`~glmq.runtime.pipeline.GlmqPipeline`, for one image or many: the four stages (``ar``,
``encode``, ``dit``, ``vae``), each run once for all of the call's images, in the sizes the memory plan chose
before any work (:func:`glmq.runtime.memory.plan_call`).

- ``ar``: for image-to-image, first the vision tower alone (``vision``: the references' VQ ids, which fill the
  AR prompts and condition the DiT); then the decode engine generates every image's tokens together, up to
  ``ar_batch`` sequences per decode step (:meth:`~glmq.runtime.ar_engine.ArEngine.generate_batch`); each
  image samples from its own generator.
- ``encode``: the glyph embeddings of each prompt (and of "" for guidance), the references' VAE latents.
- ``dit``: the denoising loop over chunks of ``dit_batch`` images (:func:`glmq.runtime.batch.dit_chunks`),
  each forward holding the conditional and unconditional passes of every image of the chunk.
- ``vae``: one image at a time (the decoder's working set is the largest of any stage).

An image made in a batch with its own generator is the image made alone with that generator, up to the
floating point of matrix products over more rows (measured in tests/runtime/test_batch.py and by
``glmq bench --batch``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from glmq.errors import GlmqError
from glmq.runtime import conditioning
from glmq.runtime.batch import CallSpec, dit_chunks, rounds
from glmq.runtime.memory import GiB, MemoryMode, call_peaks


@dataclass
class StageTimes:
    """Seconds per stage of the last call (and AR tokens / DiT steps, for per-unit figures). A batched call
    records the whole batch: ``ar_tokens`` counts decode steps (each serves every sequence of a round),
    ``dit_steps`` the steps of one chunk; ``extra`` has ``images``, ``ar_batch`` and ``dit_batch``."""

    ar_s: float = 0.0
    ar_tokens: int = 0
    glyph_s: float = 0.0
    dit_s: float = 0.0
    dit_steps: int = 0
    vae_s: float = 0.0
    total_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def run(pipe, spec: CallSpec, *, height: int, width: int, steps: int, guidance: float, prior_token_ids,
        latents, prior_token_image_ids, source_image_grid_thw, output_type: str, progress: bool, callback):
    """Make ``spec``'s images with ``pipe``; returns the images as ``[n, 3, H, W]`` in [0, 1] (``"pt"``,
    ``"pil"``: the caller converts) or the final latents (``"latent"``)."""
    from glmq.progress import StageProgress

    n = len(spec.jobs)
    i2i = any(spec.references)
    need_ref_ids = i2i and prior_token_image_ids is None
    inputs = [pipe._ar_inputs(p, list(refs) or None, height, width)
              if prior_token_ids is None or (refs and (need_ref_ids or source_image_grid_thw is None)) else None
              for p, refs in zip(spec.prompts, spec.references)]  # CPU only: the grids size the plan
    plan_grids = [_plan_grids(refs, inp, source_image_grid_thw) for refs, inp in zip(spec.references, inputs)]
    requests = [pipe.request_for(height, width, plan_grids[j.prompt_index]) for j in spec.jobs]
    plan = pipe.plan_for(requests)
    times = StageTimes(extra={"mode": str(plan.mode), "guidance_scale": float(guidance), "size": f"{width}x{height}",
                              "images": n, "int4_kernel": pipe.int4_kernel,
                              "plan_peaks_gib": {k: round(v / GiB, 3) for k, v in
                                                 call_peaks(pipe.sizes, plan, requests).items()}})
    if spec.batched:
        times.extra.update(ar_batch=plan.ar_batch, dit_batch=plan.dit_batch)
    t_start = time.perf_counter()
    bar = StageProgress(enabled=progress)
    report = callback or (lambda stage, done, total: None)
    chunks = dit_chunks(spec, plan.dit_batch)
    try:
        with pipe.placement.call_in(plan.mode, pipe._runner_for()):
            priors, ref_ids, ref_grids = _ar_stage(pipe, spec, inputs, plan, times, bar, report, prior_token_ids,
                                                   prior_token_image_ids, source_image_grid_thw)
            bar.stage("glyph")
            report("glyph", 0, 1)
            pipe.placement.stage("encode", i2i)
            t0 = pipe._sync_time()
            embeds = [pipe.encode_glyphs(p).to(pipe.dtype) for p in spec.prompts]
            negative = pipe.encode_glyphs("").to(pipe.dtype) if guidance > 1 else None
            times.glyph_s = pipe._sync_time() - t0
            ref_latents = [conditioning.reference_latents(
                pipe.vae, list(refs), conditioning.as_grids(grids), patch_size=pipe.transformer.config.patch_size,
                device=pipe.device, dtype=pipe.dtype) if refs else None
                for refs, grids in zip(spec.references, ref_grids)]
            pipe._note_peak(times, "encode")
            pipe.placement.stage("dit", i2i)
            noise = _initial_latents(pipe, spec, latents, height, width)
            bar.stage("DiT", total=steps * len(chunks))
            report("DiT", 0, steps * len(chunks))
            patch = pipe.transformer.config.patch_size * pipe.vae_scale_factor
            longest = max(e.shape[1] for e in embeds)  # the conditional pass's glyph tokens, then the image's
            times.extra["dit_attention"] = pipe._attention_for(longest + (height // patch) * (width // patch))
            t0 = pipe._sync_time()
            final = _dit_stage(pipe, spec, chunks, noise, priors, embeds, negative, ref_latents, ref_ids, ref_grids,
                               height=height, width=width, steps=steps, guidance=guidance, bar=bar, report=report)
            times.dit_s, times.dit_steps = pipe._sync_time() - t0, steps
            pipe._note_peak(times, "dit")
            if output_type == "latent":
                pipe.last_times = times
                return torch.cat(final)
            bar.stage("VAE")
            report("VAE", 0, 1)
            pipe.placement.stage("vae", i2i)
            t0 = pipe._sync_time()
            images = torch.cat([pipe.decode_latents(x) for x in final])  # one at a time: the VAE's peak is per image
            times.vae_s = pipe._sync_time() - t0
            report("VAE", 1, 1)
            pipe._note_peak(times, "vae")
    finally:
        bar.close()
    times.total_s = time.perf_counter() - t_start
    pipe.last_times = times
    return images


def _plan_grids(refs, inputs, source_image_grid_thw):
    """A prompt's references as the plan sees them: their grids, upsampled 2x like the prior ids."""
    if not refs:
        return None
    if source_image_grid_thw is not None:
        return conditioning.as_grids(source_image_grid_thw)
    grids = inputs["image_grid_thw"][: len(refs)].clone()
    grids[:, 1:] *= 2
    return grids


def _ar_stage(pipe, spec: CallSpec, inputs, plan, times, bar, report, prior_token_ids, prior_token_image_ids,
              source_image_grid_thw):
    """Every image's prior ids (AR, or given), and each prompt's reference ids and grids (vision tower, or given)."""
    n_prompts, i2i = len(spec.prompts), any(spec.references)
    ref_ids, ref_grids = [None] * n_prompts, [None] * n_prompts
    if prior_token_image_ids is not None:  # one prompt (checked by the pipeline)
        ref_ids[0], ref_grids[0] = prior_token_image_ids, source_image_grid_thw
    if prior_token_ids is None:
        bar.stage("AR")
        report("AR", 0, 1)
        vision_s = 0.0
        if i2i:  # the vision tower in a stage of its own: it is never on the GPU beside the text decoder
            pipe.placement.stage("vision", True)
            t0 = pipe._sync_time()
            inputs = list(inputs)
            for p, refs in enumerate(spec.references):
                if refs:
                    filled, ids, grids = conditioning.references_for_ar(pipe.ar, inputs[p], len(refs), pipe.device)
                    if ref_ids[p] is None:  # the caller's ids, when given, condition the DiT
                        ref_ids[p], ref_grids[p] = ids, grids
                    inputs[p] = {**inputs[p], "input_ids": filled, "pixel_values": None}
            vision_s = pipe._sync_time() - t0
        pipe.placement.stage("ar", False)
        t0 = pipe._sync_time()
        priors, times.ar_tokens = _decode(pipe, spec, inputs, plan.ar_batch, report)
        times.ar_s = pipe._sync_time() - t0 + vision_s
        times.extra["ar_step"] = pipe._engine.step_kind
        pipe.last_prior_token_ids = torch.cat(priors)
    else:
        priors = _given(prior_token_ids, len(spec.jobs), "prior_token_ids")
    for p, refs in enumerate(spec.references):
        if refs and ref_ids[p] is None:  # the AR did not run: the references' ids for the DiT alone
            pipe.placement.stage("vision", True)
            ref_ids[p], ref_grids[p] = conditioning.reference_tokens(pipe.ar, inputs[p], len(refs), pipe.device)
    engine = pipe._engine
    if engine is not None and (pipe.mode is not MemoryMode.RESIDENT or engine.max_batch > 1):
        engine.free()  # the batch's KV cache must not sit on the GPU through the DiT stage
    pipe._note_peak(times, "ar")
    return priors, ref_ids, ref_grids


def _decode(pipe, spec: CallSpec, inputs, ar_batch: int, report):
    """The AR over every image in rounds of ``ar_batch`` sequences; returns the prior ids per image and the
    decode steps run (the longest sequence of each round)."""
    from glmq.runtime.ar_engine import ArRequest, prior_tokens_from_generated

    engine = pipe._engine_for()
    engine.reserve(ar_batch)
    priors, steps = [None] * len(spec.jobs), 0
    for group in rounds(spec.jobs, ar_batch):
        rows = min(1 << (len(group) - 1).bit_length(), ar_batch)  # a power of two: one compiled step per size
        requests = []
        for job in group:
            inp = inputs[job.prompt_index]
            requests.append(ArRequest(inp["input_ids"], inp["image_grid_thw"], inp.get("images_per_sample"),
                                      inp.get("pixel_values"), inp.get("attention_mask"), job.generator))
        tokens = engine.generate_batch(requests, rows=rows,
                                       step_callback=lambda done, total: report("AR", done, total))
        for job, t in zip(group, tokens):
            priors[job.index] = prior_tokens_from_generated(t.cpu(), inputs[job.prompt_index]["image_grid_thw"],
                                                            is_text_to_image=not spec.image_to_image(job))
        steps += max(t.shape[-1] for t in tokens)
    return priors, steps


def _given(tensor: torch.Tensor, n: int, name: str) -> list[torch.Tensor]:
    """Rows of a caller's ``[n, ...]`` tensor, one per image (one row serves every image)."""
    if tensor.shape[0] not in (1, n):
        raise GlmqError(f"{name} has {tensor.shape[0]} rows for {n} images (give one row per image)")
    return [tensor[i : i + 1] if tensor.shape[0] == n else tensor[:1] for i in range(n)]


def _initial_latents(pipe, spec: CallSpec, latents, height: int, width: int) -> list[torch.Tensor]:
    """Each image's starting noise: given, or drawn from its generator (one shared generator draws all images'
    noise at once, as diffusers does)."""
    n = len(spec.jobs)
    if latents is not None:
        return _given(latents, n, "latents")
    shape = (1, pipe.transformer.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)

    def draw(rows: int, generator):
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn((rows, *shape[1:]), generator=generator, device=device, dtype=pipe.dtype)

    if spec.shared_generator:
        return list(draw(n, spec.jobs[0].generator).split(1))
    return [draw(1, job.generator) for job in spec.jobs]


def _dit_stage(pipe, spec: CallSpec, chunks, noise, priors, embeds, negative, ref_latents, ref_ids, ref_grids, *,
               height, width, steps, guidance, bar, report) -> list[torch.Tensor]:
    """Denoise every image, one chunk per forward; image-to-image chunks read their prompt's reference K/V,
    written once per prompt."""
    runner = pipe._runner_for()
    final: list = [None] * len(spec.jobs)
    kv, kv_prompt = None, None
    total = steps * len(chunks)
    try:
        for c, chunk in enumerate(chunks):
            prompt = chunk[0].prompt_index
            if spec.image_to_image(chunk[0]) and kv_prompt != prompt:
                if kv is not None:
                    kv.clear()
                kv = runner.write_reference_kv([ref_latents[prompt]], [ref_ids[prompt].to(pipe.device)],
                                               [conditioning.as_grids(ref_grids[prompt])],
                                               vae_scale_factor=pipe.vae_scale_factor)
                kv_prompt = prompt

            def step(i, t, x, done=c * steps):
                bar.step()
                report("DiT", done + i + 1, total)

            out = runner.denoise(torch.cat([noise[j.index] for j in chunk]).to(pipe.device, pipe.dtype),
                                 prompt_embeds=[embeds[j.prompt_index] for j in chunk], negative_prompt_embeds=negative,
                                 prior_token_ids=torch.cat([priors[j.index] for j in chunk]).to(pipe.device),
                                 height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                                 kv_caches=kv if spec.image_to_image(chunk[0]) else None, callback=step)
            for k, job in enumerate(chunk):
                final[job.index] = out[k : k + 1]
    finally:
        if kv is not None:
            kv.clear()
    return final
