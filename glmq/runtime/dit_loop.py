"""A fast denoising loop for the GLM-Image DiT (``diffusers.GlmImageTransformer2DModel``).

:class:`DitRunner` reproduces the denoising loop of ``diffusers.GlmImagePipeline.__call__`` (same
scheduler, same shift, same timesteps fed to the DiT) around the unmodified upstream transformer blocks,
whatever linear layers and attention processor sit inside them, and makes each step cheaper:

1. **Conditional and unconditional passes in one forward** (batch 2B). Every per-token operation (patch
   embedding, AdaLN, feed-forward, output head) runs batched. The two halves have glyph sequences of
   different lengths (the prompt's quoted text vs the encoding of ""), so the glyph tokens are left-padded
   to a common length; attention, the only place tokens meet, is called once per half on the unpadded
   rows (:class:`GroupedAttnProcessor`). That is exact, not approximate: no padded token is ever a key,
   so every real token sees precisely what it sees in the stock separate forwards. (The upstream
   processor's own ``attention_mask`` cannot do this: it turns the mask into a 0/1 float matrix that
   ``scaled_dot_product_attention`` *adds* to the scores, so padded keys are not excluded.)
2. **Per-generation precomputation** (:mod:`glmq.runtime.dit_cache`): RoPE tables on the device, glyph
   and prior projections, the timestep embedding and every block's AdaLN modulation for all steps.
3. **Image-to-image**: the reference K/V cache (:meth:`DitRunner.write_reference_kv`, mode "write") is
   read by the conditional half only; the unconditional half's attention gets no cache ("skip"), inside
   the same batched forward.
4. Optionally, ``torch.compile`` of the blocks and a CUDA graph of the whole forward (GPU only).

The fixed inputs are computed once per :meth:`DitRunner.denoise` call; nothing is cached across calls.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from glmq.runtime.compile_cache import compile_static
from glmq.runtime.dit_cache import (
    StepTable,
    install_step_tables,
    modulation_tables,
    prior_hidden_states,
    remove_step_tables,
    rope_tables,
    timestep_embeddings,
)


@dataclass(frozen=True)
class RowGroup:
    """Rows ``[start, stop)`` of a batched forward that share one glyph length and one K/V-cache mode.

    ``text_start`` is the number of left-padding glyph tokens to drop for these rows; ``read_kv`` says
    whether their attention reads the reference-image K/V cache (conditional half of image-to-image).
    """

    start: int
    stop: int
    text_start: int = 0
    read_kv: bool = False


class GroupedAttnProcessor:
    """Wraps a GLM-Image attention processor so that one batched forward can hold differently shaped rows.

    With ``groups`` unset it is a transparent pass-through. With ``groups`` set, the wrapped processor is
    called once per :class:`RowGroup` on that group's rows with its glyph padding removed, and with the
    K/V cache only where the group reads it; the glyph outputs are padded back with zeros. Padded tokens
    therefore never act as keys or values, which makes the batched forward equal to separate forwards.

    Any processor with the upstream call signature works (``attn, hidden_states, encoder_hidden_states,
    attention_mask, image_rotary_emb, kv_cache`` returning ``(image_out, glyph_out)``).
    """

    def __init__(self, inner: Callable):
        self.inner = inner
        self.groups: tuple[RowGroup, ...] | None = None
        self._inner_params = set(inspect.signature(inner.__call__).parameters)

    def _call_inner(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                    kv_cache):
        kwargs: dict[str, Any] = {"attention_mask": attention_mask}
        if "image_rotary_emb" in self._inner_params:
            kwargs["image_rotary_emb"] = image_rotary_emb
        if "kv_cache" in self._inner_params:
            kwargs["kv_cache"] = kv_cache
        elif kv_cache is not None and kv_cache.mode is not None:
            raise TypeError(f"attention processor {type(self.inner).__name__} takes no kv_cache argument, "
                            "so it cannot run image-to-image (reference K/V cache)")
        return self.inner(attn, hidden_states, encoder_hidden_states, **kwargs)

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                 kv_cache: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.groups is None:
            return self._call_inner(attn, hidden_states, encoder_hidden_states, attention_mask,
                                    image_rotary_emb, kv_cache)
        if attention_mask is not None:
            raise ValueError("GroupedAttnProcessor with row groups takes no attention_mask")
        image_out, glyph_out = [], []
        for g in self.groups:
            h, e = self._call_inner(attn, hidden_states[g.start:g.stop],
                                    encoder_hidden_states[g.start:g.stop, g.text_start:], None,
                                    image_rotary_emb, kv_cache if g.read_kv else None)
            image_out.append(h)
            # Padded glyph tokens get a zero attention output: finite, and never read by a real token.
            glyph_out.append(F.pad(e, (0, 0, g.text_start, 0)) if g.text_start else e)
        return torch.cat(image_out), torch.cat(glyph_out)


def install_grouped_processors(transformer: nn.Module) -> list[GroupedAttnProcessor]:
    """Wrap every block's attention processor in a :class:`GroupedAttnProcessor` (idempotent).

    A processor installed since the last call (``block.attn1.set_processor(...)``) gets wrapped in turn.
    """
    wrappers = []
    for block in transformer.transformer_blocks:
        proc = block.attn1.processor
        if not isinstance(proc, GroupedAttnProcessor):
            proc = GroupedAttnProcessor(proc)
            block.attn1.set_processor(proc)
        wrappers.append(proc)
    return wrappers


def attention_in_use(transformer: nn.Module, seq_len: int) -> str:
    """The DiT attention a joint sequence of ``seq_len`` tokens runs: glmq's processor's own choice for that
    length (``"bf16"``, ``"fp8"``, ``"int8"``), or ``"sdpa"`` (upstream's). Looks through the
    :class:`GroupedAttnProcessor` that the DiT loop wraps around it."""
    proc = transformer.transformer_blocks[0].attn1.processor
    proc = proc.inner if isinstance(proc, GroupedAttnProcessor) else proc
    return proc.precision_for(seq_len) if hasattr(proc, "precision_for") else "sdpa"


def remove_grouped_processors(transformer: nn.Module) -> None:
    for block in transformer.transformer_blocks:
        if isinstance(block.attn1.processor, GroupedAttnProcessor):
            block.attn1.set_processor(block.attn1.processor.inner)


@dataclass
class _Pass:
    """One forward per step: the rows it holds and their fixed inputs."""

    rows: int
    glyph: list[torch.Tensor]  # raw glyph embeddings of consecutive rows sharing a length, (n, T, text_dim)
    prior_drop: list[bool]  # per half (B rows each): unconditional (prior embedding zeroed)?
    groups: tuple[RowGroup, ...] | None
    use_kv: bool
    glyph_hidden: torch.Tensor | None = None  # precomputed (rows, T, inner_dim)
    prior_hidden: torch.Tensor | None = None  # precomputed (rows, N, inner_dim)
    graph: Any = field(default=None, repr=False)


class DitRunner:
    """Runs GLM-Image's denoising loop on an upstream ``GlmImageTransformer2DModel``.

    Args:
        transformer: the DiT, already on ``device``; its blocks may hold any linear layers and attention
            processor. The runner wraps each block's ``norm1.linear`` and ``attn1.processor`` (both
            pass-through outside :meth:`denoise`); :meth:`remove` restores them.
        scheduler_config: the pipeline's ``FlowMatchEulerDiscreteScheduler`` config (``scheduler.config``).
        device: where latents and all per-generation tensors live.
        dtype: the transformer's compute dtype (the pipeline's ``transformer.dtype``).
        batch_cfg: run the conditional and unconditional passes as one batch-2B forward (else two).
        precompute: precompute RoPE, projections and modulations once per generation (else recompute them
            every forward, as the stock model does; for measurements).
        cuda_graph: capture each step's forward in a CUDA graph (needs ``precompute``; CUDA only).
        compile: ``torch.compile`` each transformer block (shared code, compiled once).
    """

    def __init__(self, transformer: nn.Module, scheduler_config: dict, *, device: torch.device | str,
                 dtype: torch.dtype = torch.bfloat16, batch_cfg: bool = True, precompute: bool = True,
                 cuda_graph: bool = False, compile: bool = False):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.transformer = transformer
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_cfg = batch_cfg
        self.precompute = precompute
        if cuda_graph and (self.device.type != "cuda" or not precompute):
            raise ValueError("cuda_graph=True needs a CUDA device and precompute=True")
        self.cuda_graph = cuda_graph
        self._blocks = list(transformer.transformer_blocks)
        if compile:
            self._blocks = [compile_static(b) for b in self._blocks]
        self._step = torch.zeros(1, dtype=torch.long, device=self.device)
        self._install()

    # -- module wrappers ---------------------------------------------------------------------------------
    def _install(self) -> None:
        self._tables = install_step_tables(self.transformer)
        self._procs = install_grouped_processors(self.transformer)

    @contextlib.contextmanager
    def eager(self):
        """Run the plain blocks, without compilation or CUDA graphs, inside the block (a call whose DiT blocks
        stream through forward hooks: a graph would replay stale weight addresses)."""
        saved = self._blocks, self.cuda_graph
        self._blocks, self.cuda_graph = list(self.transformer.transformer_blocks), False
        try:
            yield self
        finally:
            self._blocks, self.cuda_graph = saved

    def remove(self) -> None:
        """Restore the transformer's original ``norm1.linear`` modules and attention processors."""
        remove_step_tables(self.transformer)
        remove_grouped_processors(self.transformer)

    # -- image-to-image --------------------------------------------------------------------------------------
    @torch.no_grad()
    def write_reference_kv(self, condition_latents: list[list[torch.Tensor]], prior_token_image_ids: list[torch.Tensor],
                           source_image_grid_thw: list[torch.Tensor], *, vae_scale_factor: int = 8):
        """Encode reference images into a ``GlmImageKVCache`` as ``GlmImagePipeline`` does (mode "write").

        Args:
            condition_latents: per prompt, its reference images' normalized VAE latents
                (``(latent - latents_mean) / latents_std``), each (1, C, h, w).
            prior_token_image_ids: per prompt, the upsampled AR tokens of all its references, concatenated.
            source_image_grid_thw: per prompt, (n_images, 3) token grids, to split the ids per image.
            vae_scale_factor: pixels per latent, for the size conditioning (the image's pixel size).

        Returns the cache to pass to :meth:`denoise` as ``kv_caches``.
        """
        from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

        self._install()
        self._unload()
        t = self.transformer
        kv = GlmImageKVCache(num_layers=len(t.transformer_blocks))
        kv.set_mode("write")
        text_dim = t.config.text_embed_dim
        for latents, ids, grid in zip(condition_latents, prior_token_image_ids, source_image_grid_thw, strict=True):
            per_image = torch.split(ids, grid.prod(dim=-1).tolist())
            for lat, img_ids in zip(latents, per_image, strict=True):
                lat = lat.to(self.device, self.dtype)
                img_ids = img_ids.to(self.device)
                size = (lat.shape[-2] * vae_scale_factor, lat.shape[-1] * vae_scale_factor)
                t(hidden_states=lat,
                  encoder_hidden_states=torch.zeros((1, 0, text_dim), device=self.device, dtype=self.dtype),
                  prior_token_id=img_ids,
                  prior_token_drop=torch.zeros_like(img_ids, dtype=torch.bool),
                  timestep=torch.zeros((1,), device=self.device),
                  target_size=torch.tensor([size], device=self.device),
                  crop_coords=torch.zeros((1, 2), device=self.device),
                  kv_caches=kv)
            kv.next_sample()
        kv.set_mode(None)
        return kv

    # -- the loop ------------------------------------------------------------------------------------------
    def schedule(self, height: int, width: int, latent_hw: tuple[int, int], num_inference_steps: int = 50,
                  timesteps: list[int] | None = None, sigmas: list[float] | None = None) -> torch.Tensor:
        """Set the scheduler up exactly as ``GlmImagePipeline.__call__`` does; returns its timesteps.

        These are the *unshifted* timesteps (1000, 980, ...); the scheduler's sigmas are shifted by
        ``mu = calculate_shift(image_seq_len)``. The DiT is fed ``timestep - 1`` (see :meth:`denoise`).
        """
        from diffusers.pipelines.glm_image.pipeline_glm_image import calculate_shift, retrieve_timesteps

        cfg = self.scheduler.config
        patch = self.transformer.config.patch_size
        image_seq_len = (latent_hw[0] * latent_hw[1]) // patch**2
        ts = (np.linspace(cfg.num_train_timesteps, 1.0, num_inference_steps + 1)[:-1] if timesteps is None
              else np.array(timesteps))
        ts = ts.astype(np.int64).astype(np.float32)
        sig = ts / cfg.num_train_timesteps if sigmas is None else sigmas
        mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("base_shift", 0.25),
                             cfg.get("max_shift", 0.75))
        out, _ = retrieve_timesteps(self.scheduler, num_inference_steps, self.device, ts, sig, mu=mu)
        return out

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, *, prompt_embeds: torch.Tensor,
                negative_prompt_embeds: torch.Tensor | None, prior_token_ids: torch.Tensor, height: int,
                width: int, num_inference_steps: int = 50, guidance_scale: float = 1.5,
                timesteps: list[int] | None = None, sigmas: list[float] | None = None,
                crops_coords_top_left: tuple[int, int] = (0, 0), kv_caches=None,
                callback: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
                ) -> torch.Tensor:
        """Denoise ``latents`` as ``GlmImagePipeline.__call__`` does (its steps 7-8); returns the latents.

        Args:
            latents: (B, C, height / 8, width / 8) initial noise.
            prompt_embeds: (B, T_cond, text_embed_dim) glyph embeddings of the prompt, or a list of B
                (1, T_b, text_embed_dim), one per image (prompts of a batch quote texts of different lengths).
            negative_prompt_embeds: (B or 1, T_uncond, text_embed_dim) glyph embeddings of ""; T_uncond may
                differ from T_cond. Unused (may be None) when ``guidance_scale <= 1``.
            prior_token_ids: (B, image_tokens) upsampled AR tokens.
            height, width: the image size in pixels.
            kv_caches: a reference K/V cache from :meth:`write_reference_kv` (image-to-image), or None.
            callback: called after every step as ``callback(i, t, latents)``; a returned tensor replaces
                the latents.

        Returns the final latents (fp32 after the first step, as the stock loop gives them).
        """
        bsz, _, lh, lw = latents.shape
        if height // lh != width // lw or height % lh or width % lw:
            raise ValueError(f"latents {tuple(latents.shape)} do not match a {height}x{width} image")
        cfg = guidance_scale > 1
        if cfg and negative_prompt_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative_prompt_embeds (the glyph encoding of \"\")")
        self._install()  # re-wraps processors or linears replaced since construction
        latents = latents.to(self.device)
        ts = self.schedule(height, width, (lh, lw), num_inference_steps, timesteps, sigmas)
        # THE TIMESTEP TRAP: the DiT sees the unshifted timestep minus one; only the sigmas are shifted.
        self._dit_t = ts - 1
        rows = list(prompt_embeds) if isinstance(prompt_embeds, (list, tuple)) else list(prompt_embeds.split(1))
        if len(rows) != bsz:
            raise ValueError(f"{len(rows)} prompt embeddings for {bsz} latents")
        edt = rows[0].dtype  # the pipeline builds the size conditions in the embeddings' dtype
        self._target = torch.tensor([(height, width)], dtype=edt, device=self.device)
        self._crop = torch.tensor([crops_coords_top_left], dtype=edt, device=self.device)
        self._kv = kv_caches
        if kv_caches is not None:
            kv_caches.set_mode("read")
        prior_token_ids = prior_token_ids.to(self.device)
        self._prior_ids = prior_token_ids
        uncond = None
        if cfg:
            uncond = negative_prompt_embeds.to(self.device, self.dtype)
            uncond = uncond.expand(bsz, -1, -1).contiguous() if uncond.shape[0] == 1 and bsz > 1 else uncond
        passes = self._plan(bsz, _blocks([r.to(self.device, self.dtype) for r in rows]), uncond, kv_caches is not None)
        try:
            self._prepare(passes, lh, lw)
            static_x = torch.empty((bsz, latents.shape[1], lh, lw), device=self.device, dtype=self.dtype)
            for i, t in enumerate(ts):
                static_x.copy_(latents)
                self._step.fill_(i)
                outs = [self._run(p, static_x, i).float() for p in passes]
                if cfg:
                    cond, uncond = outs[0].chunk(2) if len(outs) == 1 else outs
                    noise_pred = uncond + guidance_scale * (cond - uncond)
                else:
                    noise_pred = outs[0]
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if callback is not None:
                    replaced = callback(i, t, latents)
                    if replaced is not None:
                        latents = replaced
        finally:
            self._unload()
            for p in passes:
                p.graph = None
            if kv_caches is not None:
                kv_caches.set_mode(None)
        return latents

    def _plan(self, bsz: int, cond: list[torch.Tensor], uncond: torch.Tensor | None, use_kv: bool) -> list[_Pass]:
        """The forwards of one step. ``cond``: the conditional rows' glyph embeddings in blocks of one length
        (one block for a single image); ``uncond``: (B, T_uncond, d) or None without guidance."""
        if uncond is None or not self.batch_cfg:
            groups = _row_groups(cond, 0, use_kv) if len(cond) > 1 else None
            passes = [_Pass(bsz, cond, [False], groups, use_kv)]
            return passes if uncond is None else passes + [_Pass(bsz, [uncond], [True], None, False)]
        blocks = [*cond, uncond]
        if len(blocks) == 2 and cond[0].shape[1] == uncond.shape[1] and not use_kv:
            return [_Pass(2 * bsz, blocks, [False, True], None, use_kv)]  # one attention call over all 2B rows
        t = max(b.shape[1] for b in blocks)
        groups = _row_groups(cond, t, use_kv) + (RowGroup(bsz, 2 * bsz, t - uncond.shape[1], False),)
        return [_Pass(2 * bsz, blocks, [False, True], groups, use_kv)]

    # -- per-generation precomputation ---------------------------------------------------------------------
    def _glyph_hidden(self, p: _Pass) -> torch.Tensor:
        """Projected glyph tokens of every half, left-padded with zeros to a common length."""
        proj = [self.transformer.glyph_projector(e) for e in p.glyph]
        t = max(x.shape[1] for x in proj)
        return torch.cat([F.pad(x, (0, 0, t - x.shape[1], 0)) for x in proj])

    def _prior_hidden(self, p: _Pass) -> torch.Tensor:
        return torch.cat([prior_hidden_states(self.transformer, self._prior_ids, drop=d) for d in p.prior_drop])

    def _prepare(self, passes: list[_Pass], lh: int, lw: int) -> None:
        if not self.precompute:
            return
        self._rope = rope_tables(self.transformer, lh, lw, self.device)
        self._temb = timestep_embeddings(self.transformer, self._dit_t, self._target, self._crop, self.dtype)
        for table, mod in zip(self._tables, modulation_tables(self._tables, self._temb), strict=True):
            table.load(mod, self._step)
        for p in passes:
            p.glyph_hidden = self._glyph_hidden(p)
            p.prior_hidden = self._prior_hidden(p)

    def _unload(self) -> None:
        for table in self._tables:
            table.unload()
        for proc in self._procs:
            proc.groups = None

    # -- one forward ---------------------------------------------------------------------------------------
    def _run(self, p: _Pass, x: torch.Tensor, i: int) -> torch.Tensor:
        if not self.cuda_graph:
            return self._forward(p, x, i)
        if p.graph is None:
            p.graph = _capture(lambda: self._forward(p, x, i))
        graph, out = p.graph
        graph.replay()
        return out

    def _forward(self, p: _Pass, x: torch.Tensor, i: int) -> torch.Tensor:
        """One DiT forward over the rows of ``p``: the upstream forward with its fixed inputs served from
        the precomputed tables. Returns the model output, (rows, C, h, w) in the compute dtype."""
        t = self.transformer
        for proc in self._procs:
            proc.groups = p.groups
        if self.precompute:
            temb = self._temb.index_select(0, self._step)  # (1, E): broadcasts over the rows
            for table in self._tables:  # outside the compiled blocks: they see one row, not the step count
                table.select()
            rope, glyph, prior = self._rope, p.glyph_hidden, p.prior_hidden
        else:
            temb = t.time_condition_embed(self._dit_t[i:i + 1], self._target, self._crop, self.dtype)
            rope, glyph, prior = t.rope(x), self._glyph_hidden(p), self._prior_hidden(p)
        bsz, _, h, w = x.shape
        patches = t.image_projector(x)  # the same latents for both halves: project once, broadcast
        hidden = (patches.unsqueeze(0) + prior.unflatten(0, (-1, bsz))).flatten(0, 1)
        kv = self._kv if p.use_kv else None
        for idx, block in enumerate(self._blocks):
            hidden, glyph = block(hidden, glyph, temb, rope, None, None, kv_cache=kv[idx] if kv is not None else None)
        hidden = t.proj_out(t.norm_out(hidden, temb))
        # Unpatchify as the upstream forward: (R, h/p, w/p, C, p, p) -> (R, C, h, w).
        ps = t.config.patch_size
        hidden = hidden.reshape(p.rows, h // ps, w // ps, -1, ps, ps)
        return hidden.permute(0, 3, 1, 4, 2, 5).flatten(4, 5).flatten(2, 3)


def _blocks(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-image glyph embeddings (1, T_b, d) as blocks of consecutive rows that share a length."""
    blocks: list[list[torch.Tensor]] = []
    for r in rows:
        if blocks and blocks[-1][0].shape[1] == r.shape[1]:
            blocks[-1].append(r)
        else:
            blocks.append([r])
    return [b[0] if len(b) == 1 else torch.cat(b) for b in blocks]


def _row_groups(blocks: list[torch.Tensor], length: int, read_kv: bool) -> tuple[RowGroup, ...]:
    """One :class:`RowGroup` per block of rows, each left-padded to ``length`` (0: the longest block's)."""
    length = length or max(b.shape[1] for b in blocks)
    groups, start = [], 0
    for b in blocks:
        groups.append(RowGroup(start, start + b.shape[0], length - b.shape[1], read_kv))
        start += b.shape[0]
    return tuple(groups)


def _capture(fn: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Warm ``fn`` up on a side stream, then capture it; returns the graph and its output buffer.

    The warm-up pass's result is discarded: the caller replays the graph for the current step as well.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


__all__ = ["DitRunner", "GroupedAttnProcessor", "RowGroup", "StepTable", "install_grouped_processors",
           "remove_grouped_processors"]
