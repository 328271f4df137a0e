"""Tensor-parallel sharding of GLM-Image's AR text decoder (the latency mode's AR, one shard per GPU).

Each rank keeps a contiguous slice of every decoder layer, as Megatron-LM splits a transformer:

- attention: query heads and KV heads split evenly (GQA stays intact: rank r's query heads read rank r's
  KV heads); ``q_proj``/``k_proj``/``v_proj`` keep their output rows (and biases) for those heads; ``o_proj``
  keeps the matching input columns and becomes row-parallel: each rank's partial product is summed across
  ranks by one all-reduce (:class:`RowParallel`);
- MLP: the SwiGLU width (13696) split into contiguous ranges; the fused ``gate_up_proj`` keeps the gate rows
  and the up rows of its range (so ``chunk(2)`` in the upstream forward still pairs them), ``down_proj``
  keeps the range's input columns and is row-parallel;
- ``lm_head``: output rows split; every rank gathers the full logits (:class:`GatheredColumns`), so each
  samples the same token from the same numbers and the same noise.

Quantized layers are split along their stored layout, never re-quantized: a column slice keeps its rows'
codes, scales and zeros; a row-parallel slice cuts K at group boundaries (int4 codes are packed two per byte
along K, and a group's 128 columns share one scale and zero), so the shards' weights are exactly the full
weight's columns. GLM-Image's ``down_proj`` has K = 13696 = 107 groups of 128: rank 0 gets 54 groups (6912
columns), rank 1 gets 53 (6784). A per-output-channel 8-bit format (one scale per row) splits K anywhere and
both shards keep the row's scale.

The partial sums change the order of the additions of ``o_proj`` and ``down_proj`` (and, for W8A8 formats,
each shard scales its activations on its own columns), so logits differ from one GPU's in the last bits;
the test suite measures by how much (tests/runtime/parallel/).
"""

from __future__ import annotations

import torch
from torch import nn

from glmq.errors import GlmqError
from glmq.quant.formats.base import PerChannelFormat
from glmq.quant.formats.linear import QuantLinear


def even_split(units: int, world: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of ``units`` over ``world`` ranks, as even as possible (earlier ranks get the
    remainder): ``even_split(107, 2) == [(0, 54), (54, 107)]``."""
    base, extra = divmod(units, world)
    out, start = [], 0
    for r in range(world):
        stop = start + base + (1 if r < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def k_unit(linear: nn.Module) -> int:
    """The granularity at which ``linear``'s input columns (K) can be cut: its format's group size for a
    group-wise quantized layer (int4), 1 for a float layer or a per-output-channel format."""
    if isinstance(linear, QuantLinear) and not isinstance(linear.format, PerChannelFormat):
        return linear.format.group_size_for(linear.in_features)
    return 1


def _as_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    out.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias.contiguous().clone(), requires_grad=False)
    return out


def _quant(linear: QuantLinear, n: int, k: int, state: dict[str, torch.Tensor], keep_bias: bool) -> QuantLinear:
    bias = linear.bias if keep_bias else None
    new = QuantLinear(k, n, linear.format, bias=bias is not None, mode=linear.mode, device="meta",
                      bias_dtype=linear.bias.dtype if linear.bias is not None else torch.bfloat16)
    state = {name: t.contiguous().clone() for name, t in state.items()}
    if bias is not None:
        state["bias"] = bias.contiguous().clone() if "bias" not in state else state["bias"]
    new._check_tensors(state)
    new.load_state_dict(state, assign=True)
    return new


def take_rows(linear: nn.Module, rows: torch.Tensor) -> nn.Module:
    """``linear`` restricted to the output rows ``rows`` (long, ascending): a column-parallel shard.
    Every stored tensor of a quantized layer is ``[N, ...]``, so its rows are sliced as they are."""
    rows = rows.to(torch.long)
    if isinstance(linear, QuantLinear):
        state = {name: t.index_select(0, rows.to(t.device)) for name, t in linear.stored_tensors().items()}
        if linear.bias is not None:
            state["bias"] = linear.bias.index_select(0, rows.to(linear.bias.device))
        return _quant(linear, int(rows.numel()), linear.in_features, state, keep_bias=linear.bias is not None)
    if isinstance(linear, nn.Linear):
        w = linear.weight.index_select(0, rows.to(linear.weight.device))
        b = linear.bias.index_select(0, rows.to(linear.bias.device)) if linear.bias is not None else None
        return _as_linear(w, b)
    raise GlmqError(f"cannot shard a {type(linear).__name__}: tensor parallelism takes nn.Linear or QuantLinear")


def take_columns(linear: nn.Module, start: int, stop: int, *, keep_bias: bool) -> nn.Module:
    """``linear`` restricted to the input columns ``[start, stop)``: a row-parallel shard, whose output is a
    partial sum. ``keep_bias``: whether this shard adds the bias (exactly one shard of a layer should).

    A quantized layer is cut at its groups: ``start`` and ``stop`` must be multiples of :func:`k_unit`. Each
    stored ``[N, L]`` tensor holds ``L / K`` entries per input column (codes: 1, or 1/2 packed two per byte;
    scales and zeros: 1/G), and is sliced at ``start * L / K`` .. ``stop * L / K``; a per-row ``[N, 1]`` scale
    covers every column and is kept whole."""
    k = linear.in_features
    if not 0 <= start < stop <= k:
        raise GlmqError(f"column range [{start}, {stop}) is empty or outside K={k}")
    if isinstance(linear, QuantLinear):
        unit = k_unit(linear)
        if start % unit or (stop % unit and stop != k):
            raise GlmqError(f"{linear.format} layer with K={k}: a shard must start and end on a group boundary "
                            f"(multiples of {unit}), got [{start}, {stop})")
        state = {}
        for name, t in linear.stored_tensors().items():
            length = t.shape[1]
            if length == 1 and isinstance(linear.format, PerChannelFormat):
                state[name] = t  # one scale per output row: every column shares it
                continue
            lo, hi = start * length, stop * length
            if lo % k or hi % k:
                raise GlmqError(f"{linear.format} tensor {name!r} [{t.shape[0]}, {length}] cannot be cut at "
                                f"columns {start}..{stop} of K={k}")
            state[name] = t[:, lo // k:hi // k]
        if keep_bias and linear.bias is not None:
            state["bias"] = linear.bias
        return _quant(linear, linear.out_features, stop - start, state, keep_bias=keep_bias)
    if isinstance(linear, nn.Linear):
        return _as_linear(linear.weight[:, start:stop], linear.bias if keep_bias else None)
    raise GlmqError(f"cannot shard a {type(linear).__name__}: tensor parallelism takes nn.Linear or QuantLinear")


class RowParallel(nn.Module):
    """A row-parallel shard: its partial product, summed over the ranks of ``group`` (one all-reduce).
    ``in_features`` is the shard's, ``out_features`` the layer's."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner = inner
        self.group = group
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        y = self.inner(x)
        dist.all_reduce(y, group=self.group)
        return y


class GatheredColumns(nn.Module):
    """A column-parallel shard whose outputs are gathered from every rank of ``group``: each rank returns the
    full ``[..., out_features]`` (``sizes``: every rank's row count, in rank order)."""

    def __init__(self, inner: nn.Module, group, sizes: list[int]):
        super().__init__()
        self.inner = inner
        self.group = group
        self.sizes = list(sizes)
        self.in_features, self.out_features = inner.in_features, sum(self.sizes)

    @property
    def weight(self):  # callers that read lm_head.weight for its dtype or device
        return getattr(self.inner, "weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        import torch.nn.functional as F

        y = self.inner(x)
        widest = max(self.sizes)
        if y.shape[-1] < widest:  # all_gather takes equal shapes: pad the narrower shards
            y = F.pad(y, (0, widest - y.shape[-1]))
        parts = [torch.empty_like(y) for _ in self.sizes]
        dist.all_gather(parts, y.contiguous(), group=self.group)
        return torch.cat([p[..., :n] for p, n in zip(parts, self.sizes)], dim=-1)


def shard_ar(ar: nn.Module, rank: int, world: int, group=None) -> dict:
    """Shard ``ar`` (a ``GlmImageForConditionalGeneration``) in place for tensor parallelism over ``world``
    ranks; this process keeps rank ``rank``'s slice. ``group``: the process group of the all-reduces and
    gathers (None: the default group). The text config then describes the shard (local head counts, explicit
    ``head_dim``), which is what the AR engine sizes its KV cache from.

    Returns what was kept: ``{"heads": (h0, h1), "kv_heads": ..., "mlp": [(i0, i1) per layer], "vocab": ...}``.
    Raises :class:`GlmqError` when the model cannot be split this way (heads or KV heads not divisible by
    ``world``, an MLP with fewer groups than ranks)."""
    if getattr(ar, "glmq_tensor_parallel", None) is not None:
        raise GlmqError("this AR is already sharded for tensor parallelism")
    text = ar.model.language_model
    cfg = text.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if heads % world or kv_heads % world:
        raise GlmqError(f"tensor parallelism over {world} GPUs needs attention heads ({heads}) and KV heads "
                        f"({kv_heads}) divisible by {world}")
    h0, h1 = rank * heads // world, (rank + 1) * heads // world
    g0, g1 = rank * kv_heads // world, (rank + 1) * kv_heads // world
    q_rows = torch.arange(h0 * head_dim, h1 * head_dim)
    kv_rows = torch.arange(g0 * head_dim, g1 * head_dim)
    kept_mlp = []
    for layer in text.layers:
        attn = layer.self_attn
        attn.q_proj = take_rows(attn.q_proj, q_rows)
        attn.k_proj = take_rows(attn.k_proj, kv_rows)
        attn.v_proj = take_rows(attn.v_proj, kv_rows)
        o = attn.o_proj
        if (h0 * head_dim) % k_unit(o) or (h1 * head_dim) % k_unit(o):
            raise GlmqError(f"o_proj's quantization groups ({k_unit(o)} input columns) straddle the heads "
                            f"({head_dim} columns each) where {world} GPUs would split it")
        attn.o_proj = RowParallel(take_columns(o, h0 * head_dim, h1 * head_dim, keep_bias=rank == 0), group)

        mlp = layer.mlp
        width = mlp.down_proj.in_features
        unit = k_unit(mlp.down_proj)
        if width // unit < world:
            raise GlmqError(f"the MLP's down_proj has {width // unit} group(s) of {unit} columns: too few to split "
                            f"across {world} GPUs")
        i0, i1 = (a * unit for a in even_split(width // unit, world)[rank])
        mlp.gate_up_proj = take_rows(mlp.gate_up_proj, torch.cat([torch.arange(i0, i1),
                                                                  torch.arange(width + i0, width + i1)]))
        mlp.down_proj = RowParallel(take_columns(mlp.down_proj, i0, i1, keep_bias=rank == 0), group)
        kept_mlp.append((i0, i1))

    head = ar.lm_head
    vocab = head.out_features
    ranges = even_split(vocab, world)
    v0, v1 = ranges[rank]
    ar.lm_head = GatheredColumns(take_rows(head, torch.arange(v0, v1)), group, [b - a for a, b in ranges])

    cfg.head_dim = head_dim  # derived from the (now local) head count otherwise
    cfg.num_attention_heads, cfg.num_key_value_heads = h1 - h0, g1 - g0
    kept = {"rank": rank, "world": world, "heads": (h0, h1), "kv_heads": (g0, g1), "mlp": kept_mlp,
            "vocab": (v0, v1)}
    ar.glmq_tensor_parallel = kept
    return kept
