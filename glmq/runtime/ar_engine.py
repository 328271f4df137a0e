"""A fast autoregressive decode engine for GLM-Image's ``GlmImageForConditionalGeneration``.

Stock ``generate`` spends ~83 ms per token on an H100 (1281 tokens at 1024x1024), almost all of it in
Python and kernel-launch overhead around a dynamic KV cache. This engine keeps the upstream modules and
owns only the loop around them:

- a static KV cache ``[layers, B, kv_heads, max_len, head_dim]`` written in place, one row per sequence;
- one prefill through the upstream decoder layers, then a per-token step that calls the same layers
  (embedding, M-RoPE rotary module, ``GlmImageTextDecoderLayer``, final norm, ``lm_head``) and samples on
  the device; on CUDA that step is captured once in a CUDA graph and replayed, with no host sync per token;
- positions from upstream ``GlmImageModel.get_rope_index``: 3-D M-RoPE for the prompt and the
  precomputed per-step decode positions of the generated grids (preview grid, then target grid);
- a grid mask: while a grid is being filled, ids ``>= valid_vocab`` (ids the DiT codebook cannot embed,
  and EOS) are masked out, so the AR can neither emit an invalid id nor stop early; after the last grid
  token every id is allowed again (the model is expected to emit EOS there, as upstream does).

Whatever linear or attention modules sit inside the decoder layers (QuantLinear, a custom attention
registered through ``transformers.AttentionInterface``) keep working: the engine only calls them.

Attention contract. Every decoder layer receives, besides the upstream arguments:

- ``attention_mask``: the exact mask over the static cache, ``[B, 1, q, max_len]``; bool (True = attend)
  for every implementation but ``"eager"``, which gets the additive float mask transformers' eager path
  expects. It covers causality, unwritten slots and left padding;
- ``kv_len``: int32 ``[B]``, the number of cache slots written so far (this step's slot included), read
  on the device so it changes between CUDA-graph replays; queries are the last ``q`` of those slots;
- ``key_padding_mask``: bool ``[B, max_len]`` (True = real token), passed only when the batch is padded.

A decode kernel may ignore the dense mask and use ``kv_len`` (and ``key_padding_mask``) instead.

Batches. ``generate`` takes one left-padded batch that shares one grid plan, as HF ``generate`` does.
``generate_batch`` decodes independent sequences together (B = 1..``max_batch``): each request is prefilled
on its own (exactly the computation of a request made alone), then one decode step serves every row, each
with its own prompt length and cache slots, M-RoPE positions, grids and grid mask, sampling noise (its own
generator), temperature and top-p, and stopping point. The weights are read once per step for all rows.

Optionally (``compile=True``) the step goes through ``torch.compile`` before capture, which fuses the many
small elementwise kernels of the upstream layers.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from typing import TYPE_CHECKING

import torch

from glmq.errors import GlmqError
from glmq.runtime import ar_fused
from glmq.runtime.ar_plan import GridPlan, insert_image_tokens, rope_positions
from glmq.runtime.ar_plan import prior_tokens_from_generated  # noqa: F401  (public name, re-exported)
from glmq.runtime.ar_state import ArRequest, BatchState, RowSpec, StaticKVCache, StepKey  # noqa: F401  (re-exported)
from glmq.runtime.compile_cache import compile_static
from glmq.runtime.sampling import sample_tokens

if TYPE_CHECKING:
    from collections.abc import Sequence

_CACHE_ROUND = 128  # cache lengths are rounded up so nearby requests share one cache (and CUDA graph)


# ---------------------------------------------------------------------------------------------------------
# The engine


def _out_features(linear: torch.nn.Module) -> int:
    n = getattr(linear, "out_features", None)
    return int(n) if n is not None else int(linear.weight.shape[0])


def compile_mode() -> str:
    """What ``compile=True`` compiles in the AR decode step (``GLMQ_AR_COMPILE``): ``"layers"`` (the default:
    one decoder layer, its graph serving every layer, the rest of the step eager inside the CUDA graph) or
    ``"step"`` (the whole step, one graph through every layer).

    Measured on an H200 (benchmarks/results/decode_modes_h200/ against bench_decode_h200/, two runs of
    ``benchmarks/ar_batch_decode.py``, glmq's int4 kernels): the engine's first call (compilation, graph
    capture, one generation) 24.9 s per layer against 107.7 s for the whole step, for 4.984 against
    4.828 ms a decode step at B = 1 (+3%, about 0.2 s per 1024 image). The bench's warm-up image fell from 129 s
    (bench_decode_h200/) to 38 s (bench_stock_h200/, with tinygemm int4 layers as well). Without a CUDA graph
    (the CPU) each layer is a Python call (2.5 against 1.3 s per 261-token generation, ar_compile_time_cpu2/)."""
    choice = os.environ.get("GLMQ_AR_COMPILE", "layers")
    if choice not in ("step", "layers"):
        raise GlmqError(f"GLMQ_AR_COMPILE must be 'step' or 'layers', got {choice!r}")
    return choice


def _layer_call(layer, hidden, position_embeddings, mask, cache_arg: str, cache, kwargs: dict):
    """One decoder layer as the engine calls it: ``cache`` under the keyword this transformers version uses."""
    out = layer(hidden, position_embeddings=position_embeddings, attention_mask=mask, **{cache_arg: cache}, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # older transformers return (hidden_states, ...)


class ArEngine:
    """Static-cache, CUDA-graph decode of ``GlmImageForConditionalGeneration`` with GLM-Image's grid rules.

    Args:
        model: a ``GlmImageForConditionalGeneration`` in eval mode (any dtype; its linear and attention
            modules may be swapped). Only the text decoder, ``lm_head`` and, for image-to-image, the vision
            tower and VQ are used.
        max_batch: the largest batch ``generate`` or ``generate_batch`` will be called with (the cache is
            allocated for it; :meth:`reserve` grows it).
        max_cache_len: cache slots (prompt + new tokens). ``None``: sized by the first request (rounded up
            to 128) and regrown when a later request needs more.
        device: where the decode runs; default the embedding's device.
        cuda_graph: capture the per-token step in a CUDA graph (CUDA only; CPU always runs eagerly).
        compile: run the per-token step through ``torch.compile`` before capturing it. Upstream layers
            launch ~68 small kernels each per token (four RMSNorms, M-RoPE, residuals, SwiGLU); Inductor
            fuses them, which a CUDA graph alone cannot. On an H100 with the default recipe's int4 layers and
            glmq's attention: 8.4 -> 5.0 ms/token (benchmarks/results/e2e_h100/compare1024/), for about a
            minute of compilation on the first call. Off by default here; ``GlmqPipeline`` turns it on with
            its ``compile``. Same-seed generations are identical, compiled or not: tokens and pixels on that
            H100 run, tokens and logits (to fp32 rounding) against the eager step in the CPU tests. (A
            bf16-only benchmark with cuDNN attention, ar_decode_h100.md, once saw two same-seed generations
            differ; not reproduced since.) The layers' own modules are still what runs: swapped linears and
            attention functions are traced (or called through their custom ops). If compiling fails the
            engine warns and runs the step uncompiled.
        sdpa_backends: ``torch.nn.attention.SDPBackend`` values the decode step may use when the attention
            implementation is "sdpa" (``None``: PyTorch's choice). Fixed while the step is first traced.
    """

    def __init__(self, model, *, max_batch: int = 1, max_cache_len: int | None = None, device=None,
                 cuda_graph: bool = True, compile: bool = False, sdpa_backends=None):
        self.model = model
        self.text = model.model.language_model
        self.lm_head = model.lm_head
        tcfg = self.text.config
        self.device = torch.device(device) if device is not None else self.text.embed_tokens.weight.device
        self.dtype = self.text.embed_tokens.weight.dtype
        self.max_batch = int(max_batch)
        self.max_cache_len = max_cache_len
        self.cuda_graph = bool(cuda_graph) and self.device.type == "cuda"
        self.compile = bool(compile)
        self.sdpa_backends = list(sdpa_backends) if sdpa_backends is not None else None
        # Without Inductor, glmq's fused elementwise kernels (on CUDA by default, glmq.runtime.ar_fused).
        self.fused = not self.compile and ar_fused.wanted(self.device) and ar_fused.supported(self.text)
        # GLMQ_AR_COMPILE=layers: one decoder layer compiled, its graph reused by every layer (and the rest of the
        # step eager inside the CUDA graph), instead of the whole step traced through 40 layers.
        per_layer = self.compile and compile_mode() == "layers"
        self._layer = compile_static(_layer_call) if per_layer else None
        whole = self.compile and not per_layer
        self._step = compile_static(self._decode_step) if whole else self._decode_step
        self._compiled = self.compile
        head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
        self._kv_dims = (len(self.text.layers), tcfg.num_key_value_heads, head_dim)
        self.vocab_size = _out_features(self.lm_head)
        codebook = getattr(getattr(model.config, "vq_config", None), "num_embeddings", None) or self.vocab_size
        self.valid_vocab = min(int(codebook), self.vocab_size)
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        eos = eos if eos is not None else tcfg.eos_token_id
        self.eos_token_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        pad = getattr(gen, "pad_token_id", None)
        pad = pad if pad is not None else getattr(tcfg, "pad_token_id", None)
        self.pad_token_id = int(pad if pad is not None else self.eos_token_ids[0])
        self._eos = torch.tensor(self.eos_token_ids, dtype=torch.long, device=self.device)
        params = inspect.signature(self.text.layers[0].forward).parameters
        self._cache_arg = "cache" if "cache" in params or "past_key_values" not in params else "past_key_values"
        self._cache: StaticKVCache | None = None
        self._states: dict[int, BatchState] = {}
        if max_cache_len is not None:
            self._ensure_cache(int(max_cache_len))

    # -- public -------------------------------------------------------------------------------------------

    def plan(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor,
             images_per_sample: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> GridPlan:
        """The grids ``generate`` fills for these processor inputs (every sample must share one plan)."""
        grids = image_grid_thw.cpu()
        per_sample = (torch.split(grids, images_per_sample.tolist()) if images_per_sample is not None
                      else [grids] * input_ids.shape[0])
        end_id = self.model.config.image_end_token_id
        plans = set()
        for b in range(input_ids.shape[0]):
            row = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
            plans.add(GridPlan.from_grids(per_sample[b], int((row == end_id).sum())))
        if len(plans) != 1:
            raise ValueError(f"samples in one batch must generate the same grids, got {sorted(p.grids for p in plans)}")
        return plans.pop()

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        *,
        image_grid_thw: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images_per_sample: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        generator: torch.Generator | None = None,
        temperature: float = 0.9,
        top_p: float = 0.75,
        top_k: int | None = None,
        greedy: bool = False,
        valid_vocab: int | None = None,
        grid_plan: GridPlan | None = None,
        output_logits: bool = False,
        step_callback=None,
    ):
        """Generate like ``model.generate(**processor_inputs, max_new_tokens=..., do_sample=True)``.

        Args:
            input_ids: long [B, L] prompt from ``GlmImageProcessor`` (left-padded when B > 1; the samples share
                one grid plan: see :meth:`generate_batch` for independent sequences).
            image_grid_thw, attention_mask, images_per_sample, pixel_values: the processor's other outputs
                (``pixel_values`` only for image-to-image: its reference images become VQ ids in the prompt).
            max_new_tokens: default ``grid_plan.max_new_tokens`` (grid tokens + EOS).
            generator: draws all the sampling noise up front (on its own device), so a seed reproduces a
                generation; ``None`` uses torch's global CPU generator.
            temperature, top_p, top_k: HF warper semantics (see ``glmq.runtime.sampling``).
            greedy: argmax decoding (HF ``do_sample=False``), for tests.
            valid_vocab: ids allowed inside grids; default ``min(VQ codebook size, lm_head rows)``.
            grid_plan: override the plan derived from the prompt (see :meth:`plan`).
            output_logits: also return the raw float32 lm_head logits of every step.
            step_callback: called as ``step_callback(done, total)`` after the prefill and after every decode
                step (``total`` = max_new_tokens); an exception it raises stops the generation (a host's cancel).

        Returns:
            long [B, max_new_tokens] generated tokens (no prompt); a row that emitted EOS is padded with
            ``pad_token_id`` afterwards, as HF does. With ``output_logits``: ``(tokens, logits [B, N, V])``.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        batch, prompt_len = input_ids.shape
        self._check_batch(batch)
        ids = input_ids.to(self.device)
        mask2d = attention_mask.to(self.device) if attention_mask is not None else None
        if pixel_values is not None:
            ids = self._insert_image_tokens(ids, pixel_values, image_grid_thw, images_per_sample)
        plan = grid_plan or self.plan(ids, image_grid_thw, images_per_sample, mask2d)
        n_new = int(max_new_tokens) if max_new_tokens is not None else plan.max_new_tokens
        if n_new < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {n_new}")
        limit = self._limit(valid_vocab)
        prefill_pos, decode_pos = self._positions(ids, image_grid_thw, images_per_sample, mask2d)
        rows = [RowSpec(prompt_len, n_new, plan.num_grid_tokens, decode_pos[:, b] if decode_pos is not None else None,
                     float(temperature), float(top_p)) for b in range(batch)]
        self._ensure_cache(prompt_len + n_new)
        st = self._state(batch)
        padded = mask2d is not None and not bool(mask2d.bool().all())
        key = StepKey(batch, bool(greedy), int(top_k) if top_k else None, padded, self._additive(), bool(output_logits))
        noise = None
        if not greedy:
            gen_device = generator.device if generator is not None else torch.device("cpu")
            noise = torch.rand((n_new, batch), generator=generator, device=gen_device, dtype=torch.float32)

        def prefill():
            slots = torch.arange(prompt_len, device=self.device).expand(batch, prompt_len)
            kv_len = torch.full((batch,), prompt_len, dtype=torch.int32, device=self.device)
            logits = self._forward(key, ids, prefill_pos, slice(0, batch), st.rows, slots, kv_len, st.key_ok)
            self._emit(st, key, logits, torch.zeros(1, dtype=torch.long, device=self.device))

        n = self._run(st, key, rows, limit, noise, mask2d, prefill, step_callback)
        if output_logits:
            return st.out[:, :n].clone(), st.logits[:, :n].clone()
        return st.out[:, :n].clone()

    @torch.no_grad()
    def generate_batch(self, requests: Sequence[ArRequest], *, top_k: int | None = None, greedy: bool = False,
                       valid_vocab: int | None = None, output_logits: bool = False, step_callback=None,
                       rows: int | None = None) -> list:
        """Decode independent sequences together: one decode step for all B rows (B <= ``max_batch``).

        Each request is prefilled alone (the same computation as a request made alone), and keeps its own
        prompt, positions, grids, grid mask, sampling noise (from its generator, drawn up front, in request order
        for a shared generator), temperature, top-p and length; a row that is done emits padding while the
        others continue. ``top_k``, ``greedy``, ``valid_vocab``, ``output_logits`` and ``step_callback`` as in
        :meth:`generate` (``total`` is the longest request's token count).

        ``rows``: decode with this many rows (>= the requests), the extra ones idle: a caller that rounds its
        batch sizes up (to powers of two, say) compiles and captures one decode step per size it uses, not one
        per number of requests.

        Returns one long ``[1, n_new]`` tensor per request (with ``output_logits``: ``(tokens, logits [1, n_new,
        V])`` per request). The tokens of a row equal those of the same request made alone, up to the floating
        point of the decode step's matrix products at B rows instead of one (see
        tests/runtime/test_ar_batch.py).
        """
        if not requests:
            raise ValueError("generate_batch needs at least one request")
        batch = max(len(requests), int(rows or 0))
        self._check_batch(batch)
        limit = self._limit(valid_vocab)
        prepared, with_images = [], {}
        for r in requests:
            if r.input_ids.ndim != 2 or r.input_ids.shape[0] != 1:
                raise ValueError(f"each request's input_ids must be [1, L], got {tuple(r.input_ids.shape)}")
            ids = r.input_ids.to(self.device)
            mask = r.attention_mask.to(self.device) if r.attention_mask is not None else None
            if r.pixel_values is not None:  # requests sharing a prompt and its references: one vision pass
                key_images = (id(r.input_ids), id(r.pixel_values))
                if key_images not in with_images:
                    with_images[key_images] = self._insert_image_tokens(ids, r.pixel_values, r.image_grid_thw,
                                                                        r.images_per_sample)
                ids = with_images[key_images]
            plan = r.grid_plan or self.plan(ids, r.image_grid_thw, r.images_per_sample, mask)
            n_new = int(r.max_new_tokens) if r.max_new_tokens is not None else plan.max_new_tokens
            if n_new < 1:
                raise ValueError(f"max_new_tokens must be >= 1, got {n_new}")
            prefill_pos, decode_pos = self._positions(ids, r.image_grid_thw, r.images_per_sample, mask)
            row = RowSpec(ids.shape[1], n_new, plan.num_grid_tokens,
                          decode_pos[:, 0] if decode_pos is not None else None, float(r.temperature), float(r.top_p))
            prepared.append((ids, mask, prefill_pos, row))
        idle = RowSpec(1, 0, 0, None, 1.0, 1.0)  # padding rows: no prompt, no tokens (they emit padding)
        rows = [p[3] for p in prepared] + [idle] * (batch - len(prepared))
        self._ensure_cache(max(r.prompt_len + r.n_new for r in rows))
        st = self._state(batch)
        padded = any(m is not None and not bool(m.bool().all()) for _, m, _, _ in prepared)
        key = StepKey(batch, bool(greedy), int(top_k) if top_k else None, padded, self._additive(), bool(output_logits))
        noise = None
        if not greedy:
            noise = torch.zeros((max(r.n_new for r in rows), batch), dtype=torch.float32)
            for b, (r, row) in enumerate(zip(requests, rows)):  # padding rows draw nothing
                gen_device = r.generator.device if r.generator is not None else torch.device("cpu")
                noise[: row.n_new, b : b + 1] = torch.rand((row.n_new, 1), generator=r.generator, device=gen_device,
                                                           dtype=torch.float32).cpu()
        key_ok = torch.ones(batch, max(r.prompt_len for r in rows), dtype=torch.bool, device=self.device)
        for b, (ids, mask, _, _) in enumerate(prepared):
            if mask is not None:
                key_ok[b, : ids.shape[1]] = mask[0].bool()

        def prefill():
            logits = []
            for b, (ids, _, positions, row) in enumerate(prepared):
                slots = torch.arange(row.prompt_len, device=self.device)[None]
                kv_len = torch.full((1,), row.prompt_len, dtype=torch.int32, device=self.device)
                logits.append(self._forward(key, ids, positions, slice(b, b + 1), st.rows[b : b + 1], slots, kv_len,
                                            st.key_ok[b : b + 1]))
            if batch > len(prepared):
                logits.append(torch.zeros(batch - len(prepared), logits[0].shape[-1], device=self.device))
            self._emit(st, key, torch.cat(logits), torch.zeros(1, dtype=torch.long, device=self.device))

        self._run(st, key, rows, limit, noise, key_ok, prefill, step_callback)
        rows = rows[: len(prepared)]
        tokens = [st.out[b : b + 1, : row.n_new].clone() for b, row in enumerate(rows)]
        if output_logits:
            return [(t, st.logits[b : b + 1, : row.n_new].clone()) for b, (t, row) in enumerate(zip(tokens, rows))]
        return tokens

    def reserve(self, batch: int) -> None:
        """Allocate for ``batch`` sequences from the next generation on (a larger cache, new buffers and CUDA
        graphs; the compiled step stays). Never shrinks."""
        if batch > self.max_batch:
            self.max_batch = int(batch)
            self.free()

    def free(self) -> None:
        """Give the KV cache, the per-batch buffers and their CUDA graphs back (the next generation allocates
        them again): between calls of a pipeline whose other stages need the memory."""
        self._cache = None
        self._states = {}

    def drop_graphs(self) -> None:
        """Forget the captured CUDA graphs (they hold the addresses of the weights they were captured with);
        the next ``generate`` captures them again. Call it after the model's weights moved."""
        for st in self._states.values():
            st.graphs.clear()

    # -- setup --------------------------------------------------------------------------------------------

    def _check_batch(self, batch: int) -> None:
        if batch > self.max_batch:
            raise ValueError(f"batch {batch} exceeds max_batch={self.max_batch}")

    def _limit(self, valid_vocab: int | None) -> int:
        limit = self.valid_vocab if valid_vocab is None else int(valid_vocab)
        if not 1 <= limit <= self.vocab_size:
            raise ValueError(f"valid_vocab must be in [1, {self.vocab_size}] (lm_head rows), got {limit}")
        return limit

    def _additive(self) -> bool:
        return self.text.config._attn_implementation == "eager"

    def _insert_image_tokens(self, ids, pixel_values, image_grid_thw, images_per_sample):
        return insert_image_tokens(self.model, ids, pixel_values, image_grid_thw, images_per_sample, self.device)

    def _positions(self, ids, image_grid_thw, images_per_sample, attention_mask):
        return rope_positions(self.model, ids, image_grid_thw, images_per_sample, attention_mask)

    def _ensure_cache(self, needed: int) -> None:
        if self._cache is not None and self._cache.max_len >= needed:
            return
        if self.max_cache_len is not None and needed > self.max_cache_len:
            raise ValueError(f"prompt + max_new_tokens = {needed} exceeds max_cache_len={self.max_cache_len}")
        max_len = self.max_cache_len or -(-needed // _CACHE_ROUND) * _CACHE_ROUND
        layers, kv_heads, head_dim = self._kv_dims
        self._cache = self._states = None  # free the old buffers (and graphs) before allocating new ones
        self._cache = StaticKVCache(layers, self.max_batch, kv_heads, max_len, head_dim,
                                    dtype=self.dtype, device=self.device)
        self._states = {}

    def _state(self, batch: int) -> BatchState:
        if batch not in self._states:
            self._states[batch] = BatchState(batch, self._cache.max_len, self.vocab_size, self.device)
        return self._states[batch]

    def _load(self, st: BatchState, rows: list[RowSpec], limit: int, noise, key_ok) -> None:
        """Fill the static buffers for one generation (all host work happens here, before the loop)."""
        self._cache.reset()
        st.step.zero_()
        st.finished.zero_()
        st.out.zero_()
        st.prompt_len.copy_(torch.tensor([r.prompt_len for r in rows]))
        st.n_new.copy_(torch.tensor([r.n_new for r in rows]))
        st.temperature.copy_(torch.tensor([[r.temperature] for r in rows]))
        st.top_p.copy_(torch.tensor([[r.top_p] for r in rows]))
        limits = torch.full(tuple(st.limits.shape), self.vocab_size, dtype=torch.long)
        for b, r in enumerate(rows):
            limits[: min(r.grid_tokens, limits.shape[0]), b] = limit
        st.limits.copy_(limits)
        st.key_ok.fill_(True)
        if key_ok is not None:
            st.key_ok[:, : key_ok.shape[1]] = key_ok.bool()
        width = st.pos_table.shape[-1]
        for b, r in enumerate(rows):
            pos = r.decode_pos
            if pos is None:  # no grids: text positions continue after the prompt (an idle row: one position)
                pos = (torch.arange(max(r.n_new, 1), device=self.device) + r.prompt_len).expand(3, max(r.n_new, 1))
            n = min(pos.shape[-1], width)
            st.pos_table[:, b, :n] = pos[:, :n]
            st.pos_table[:, b, n:] = pos[:, n - 1 : n]  # past the table: repeat the end marker
        if noise is not None:
            st.uniform[: noise.shape[0]] = noise.to(self.device)

    def _run(self, st: BatchState, key: StepKey, rows: list[RowSpec], limit: int, noise, key_ok, prefill,
             step_callback) -> int:
        """Load the buffers, prefill, then decode until the longest row is done; returns its token count."""
        n_max = max(r.n_new for r in rows)
        if key.output_logits and st.logits is None:
            st.logits = torch.zeros(st.batch, self._cache.max_len + 1, self.vocab_size, device=self.device)
        with self._attention_backends():
            graph = self._graph(st, key) if self.cuda_graph else None  # capture first: warm-up dirties buffers
            self._load(st, rows, limit, noise, key_ok)
            prefill()
            if step_callback is not None:
                step_callback(1, n_max)
            for i in range(n_max - 1):
                if graph is not None:
                    graph.replay()
                else:
                    self._run_step(st, key)
                if step_callback is not None:
                    step_callback(i + 2, n_max)
        return n_max

    # -- the per-token work ---------------------------------------------------------------------------------

    def _mask(self, key: StepKey, slots: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
        """Attention mask [R, 1, q, max_len] for the queries of each row at cache ``slots`` [R, q]."""
        keys = torch.arange(key_ok.shape[1], device=self.device)
        at = slots[..., None]
        ok = (keys <= at) & key_ok[:, None, :]
        ok = ok | (keys == at)  # a padded query sees itself: no empty rows
        ok = ok[:, None]
        if key.additive_mask:
            return torch.zeros(ok.shape, dtype=self.dtype, device=self.device).masked_fill_(
                ~ok, torch.finfo(self.dtype).min)
        return ok

    def _forward(self, key: StepKey, ids, positions, rows: slice, write_rows, slots, kv_len, key_ok, *,
                 decode: bool = False) -> torch.Tensor:
        """Decoder on ``ids`` [R, q] of cache ``rows``, written at ``slots`` [R, q]: float32 logits of the last
        position of each row. ``decode``: ``ids`` are tokens the ``lm_head`` emitted (a split embedding reads its
        on-device rows, with no host work)."""
        embed = self.text.embed_tokens
        hidden = embed.visual(ids) if decode and hasattr(embed, "visual") else embed(ids)
        position_embeddings = self.text.rotary_emb(hidden, positions)
        mask = self._mask(key, slots, key_ok)
        cache = self._cache
        cache.read_rows, cache.write_rows, cache.write_pos = rows, write_rows, slots
        kwargs = {"kv_len": kv_len}
        if key.padded:
            kwargs["key_padding_mask"] = key_ok
        if self.fused:
            for layer in self.text.layers:
                hidden = ar_fused.layer_forward(layer, hidden, position_embeddings=position_embeddings,
                                                attention_mask=mask, **{self._cache_arg: cache}, **kwargs)
            hidden = ar_fused.final_norm(self.text, hidden[:, -1:])
            return self.lm_head(hidden)[:, -1].float()
        if decode and self._layer is not None:  # one compiled graph for every layer (the prefill runs eager)
            for layer, kv in zip(self.text.layers, cache.layers):
                hidden = self._layer(layer, hidden, position_embeddings, mask, self._cache_arg, kv, kwargs)
        else:
            for layer in self.text.layers:
                hidden = _layer_call(layer, hidden, position_embeddings, mask, self._cache_arg, cache, kwargs)
        hidden = self.text.norm(hidden[:, -1:])
        return self.lm_head(hidden)[:, -1].float()

    def _emit(self, st: BatchState, key: StepKey, logits: torch.Tensor, k: torch.Tensor) -> None:
        """Sample generated token ``k`` ([1] long) of every row from ``logits``, record it and make it the next
        input. A row past its EOS or its length emits padding, as HF does past EOS."""
        if key.output_logits:
            st.logits.index_copy_(1, k, logits[:, None])
        nxt = sample_tokens(logits, vocab_limit=st.limits.index_select(0, k).reshape(-1),
                            uniform=st.uniform.index_select(0, k).reshape(-1), temperature=st.temperature,
                            top_p=st.top_p, top_k=key.top_k, greedy=key.greedy)
        nxt = torch.where(st.finished | (k >= st.n_new), self.pad_token_id, nxt)
        st.finished.logical_or_((nxt[:, None] == self._eos[None, :]).any(dim=-1))
        st.out.index_copy_(1, k, nxt[:, None])
        st.tok.copy_(nxt[:, None])

    def _decode_step(self, st: BatchState, key: StepKey) -> None:
        """Feed generated token j = ``st.step`` of every row and sample token j + 1. Device-only:
        graph-capturable."""
        slots = (st.prompt_len + st.step)[:, None]
        positions = st.pos_table.index_select(2, st.step)
        kv_len = (slots[:, 0] + 1).to(torch.int32)
        logits = self._forward(key, st.tok, positions, slice(0, st.batch), st.rows, slots, kv_len, st.key_ok,
                               decode=True)
        self._emit(st, key, logits, st.step + 1)
        st.step.add_(1)

    @property
    def step_kind(self) -> str:
        """How the decode step runs now: ``"compiled"`` (the whole step), ``"compiled per layer"``
        (``GLMQ_AR_COMPILE=layers``, the default), ``"eager"`` (not asked to compile), or ``"eager after a failed
        compile"``; with ``", fused kernels"`` (glmq.runtime.ar_fused) and ``", CUDA graph"`` when it is replayed
        from a graph."""
        kind = ("compiled per layer" if self._layer is not None else "compiled" if self._compiled
                else "eager after a failed compile" if self.compile else "eager")
        if self.fused:
            kind += ", fused kernels"
        return kind + (", CUDA graph" if self.cuda_graph else "")

    @torch.no_grad()
    def _run_step(self, st: BatchState, key: StepKey) -> None:
        """One decode step, compiled when asked; a step that fails to compile falls back to eager for good."""
        if not self._compiled:
            return self._decode_step(st, key)
        step = st.step.clone()
        try:
            return self._step(st, key)
        except Exception as e:  # noqa: BLE001 - any compiler failure: keep decoding, uncompiled
            warnings.warn(f"ArEngine: torch.compile of the decode step failed ({type(e).__name__}: {e}); "
                          "running it uncompiled", RuntimeWarning, stacklevel=2)
            self._step, self._layer, self._compiled = self._decode_step, None, False
            st.step.copy_(step)  # a failed trace may have run part of the step: redo it from the start
            return self._decode_step(st, key)

    def _attention_backends(self):
        if self.sdpa_backends is None:
            return contextlib.nullcontext()
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel(self.sdpa_backends)

    def _graph(self, st: BatchState, key: StepKey):
        """The CUDA graph of one decode step for ``key`` (captured on first use)."""
        if key not in st.graphs:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up: compilation, lazy inits, autotuning, allocator growth
                for _ in range(3):
                    self._run_step(st, key)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step(st, key)
            st.graphs[key] = graph
        return st.graphs[key]
