"""The device buffers of the AR decode engine (:mod:`glmq.runtime.ar_engine`): the static KV cache, one row per
sequence, and the per-batch state a captured decode step reads and writes; and what a request asks for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from glmq.runtime.ar_plan import GridPlan


class StaticKVCache:
    """Keys and values of every decoder layer: per layer ``[max_batch, kv_heads, max_len, head_dim]``, preallocated.

    Duck-types the one method of ``transformers.Cache`` the decoder layers call, ``update``. The engine sets,
    before each forward, where the ``q`` new tokens of its ``R`` rows go: ``write_rows`` (long ``[R, 1]``, the
    cache row of each) and ``write_pos`` (long ``[R, q]``, the slot of each token; rows of a batch may sit at
    different slots), and ``read_rows``, the slice of rows the attention then reads (one row for the prefill of
    one request, the first ``B`` for a decode step). One tensor per layer (not views of one block) written with
    one ``index_put_`` keeps ``torch.compile`` from copying the cache: it sees independent inputs mutated in
    place, the pattern it re-inplaces.
    """

    is_compileable = True

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.write_rows: torch.Tensor | None = None
        self.write_pos: torch.Tensor | None = None
        self.read_rows = slice(None)
        self.layers = [LayerKV(self, i) for i in range(num_layers)]  # what a layer compiled on its own is given

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states, layer_idx)

    def reset(self) -> None:
        # Stale values in unwritten slots are masked, but 0 * NaN is NaN in a masked softmax @ V: clear them.
        for t in (*self.keys, *self.values):
            t.zero_()


class LayerKV:
    """One layer's keys and values of a :class:`StaticKVCache`, with its ``update``; the layer index the decoder
    passes is ignored. A decoder layer compiled on its own (``GLMQ_AR_COMPILE=layers``) gets one of these, so
    nothing it reads differs between layers but tensors of one shape: one compiled graph serves all 40 (given
    the whole cache it would index a list by the layer's ``layer_idx`` and compile once per layer)."""

    is_compileable = True

    def __init__(self, cache: StaticKVCache, layer: int):
        self.cache, self.keys, self.values = cache, cache.keys[layer], cache.values[layer]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        c = self.cache  # [R, H, q, D] -> the cache's [row, :, slot] places, [R, q, H, D] in advanced-indexing order
        self.keys[c.write_rows, :, c.write_pos] = key_states.transpose(1, 2)
        self.values[c.write_rows, :, c.write_pos] = value_states.transpose(1, 2)
        return self.keys[c.read_rows], self.values[c.read_rows]


@dataclass(frozen=True)
class ArRequest:
    """One sequence of :meth:`ArEngine.generate_batch`: the processor's outputs for one prompt (batch 1) and
    how to sample it. Requests sharing one ``generator`` draw from it in request order."""

    input_ids: torch.Tensor  # long [1, L]
    image_grid_thw: torch.Tensor
    images_per_sample: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None  # image-to-image: the references, whose VQ ids fill the prompt
    attention_mask: torch.Tensor | None = None
    generator: torch.Generator | None = None
    temperature: float = 0.9
    top_p: float = 0.75
    grid_plan: GridPlan | None = None  # default: derived from the prompt (see ArEngine.plan)
    max_new_tokens: int | None = None  # default: the plan's grid tokens + EOS


@dataclass(frozen=True)
class StepKey:
    """Everything a captured decode step bakes in (one CUDA graph per distinct key)."""

    batch: int
    greedy: bool
    top_k: int | None
    padded: bool
    additive_mask: bool
    output_logits: bool


@dataclass
class RowSpec:
    """What one row of a batch needs loaded before the loop."""

    prompt_len: int  # cache slots its prompt takes (left padding included)
    n_new: int  # tokens it generates; later steps emit padding
    grid_tokens: int  # tokens under the grid mask
    decode_pos: torch.Tensor | None  # long [3, N] M-RoPE position of generated token j (None: text positions)
    temperature: float
    top_p: float


class BatchState:
    """Static device buffers of one batch size; a CUDA graph reads and writes only these."""

    def __init__(self, batch: int, max_len: int, vocab: int, device: torch.device):
        long = dict(dtype=torch.long, device=device)
        self.batch = batch
        self.rows = torch.arange(batch, **long)[:, None]  # the cache row of each sequence
        self.tok = torch.zeros(batch, 1, **long)  # the token fed at the next step
        self.step = torch.zeros(1, **long)  # index j of that token among the generated ones
        self.prompt_len = torch.zeros(batch, **long)  # per row: the slot of generated token 0
        self.n_new = torch.zeros(batch, **long)  # per row: tokens to generate (then padding)
        self.pos_table = torch.zeros(3, batch, max_len, **long)  # M-RoPE position of generated token j
        self.limits = torch.full((max_len + 1, batch), vocab, **long)  # ids < limits[k, b] allowed for token k
        self.uniform = torch.full((max_len + 1, batch), 0.5, dtype=torch.float32, device=device)
        self.key_ok = torch.ones(batch, max_len, dtype=torch.bool, device=device)  # False at left padding
        self.out = torch.zeros(batch, max_len + 1, **long)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.temperature = torch.ones(batch, 1, dtype=torch.float32, device=device)
        self.top_p = torch.ones(batch, 1, dtype=torch.float32, device=device)
        self.logits: torch.Tensor | None = None  # [B, max_len + 1, V] float32, only when asked for
        self.graphs: dict[StepKey, Any] = {}
