"""Tensor-parallel shards of quantized and float linears (in one process): exact slices of the stored
weight, cut at group boundaries, and partial products that sum to the layer's output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from glmq.errors import GlmqError
from glmq.quant.formats import get_format
from glmq.quant.formats.linear import QuantLinear
from glmq.runtime.parallel.shard import even_split, k_unit, shard_ar, take_columns, take_rows

FORMATS = [("int4", dict(group_size=128)), ("int4", dict(group_size=32, symmetric=False)), ("int8", {}),
           ("fp8_e4m3", {}), (None, {})]
IDS = ["int4-g128-sym", "int4-g32-asym", "int8", "fp8", "float"]


def _layer(fmt, params, k, n=24, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    return lin if fmt is None else QuantLinear.from_linear(lin, get_format(fmt, **params))


def _weight_only(layer):
    """Quantized layers dequantize and multiply (the CPU path). W8A8 kernels would also scale each shard's
    activations on its own columns: a documented difference, not a slice."""
    if isinstance(layer, QuantLinear):
        layer.mode = "weight_only"
    return layer


def _exact(layer, x: torch.Tensor) -> torch.Tensor:
    return x.double() @ _weight(layer).double().T + (layer.bias.double() if layer.bias is not None else 0)


def _weight(layer) -> torch.Tensor:
    return layer.dequantize() if isinstance(layer, QuantLinear) else layer.weight.detach().float()


def test_even_split_gives_the_remainder_to_the_first_ranks():
    assert even_split(107, 2) == [(0, 54), (54, 107)]  # GLM-Image's down_proj: 107 groups of 128
    assert even_split(4, 2) == [(0, 2), (2, 4)]
    assert even_split(16512, 2) == [(0, 8256), (8256, 16512)]  # lm_head rows
    assert even_split(5, 3) == [(0, 2), (2, 4), (4, 5)]


def test_glm_image_down_proj_splits_54_and_53_groups_exactly():
    down = _layer("int4", dict(group_size=128, symmetric=False), k=13696, n=8, bias=False)
    cuts = [(a * 128, b * 128) for a, b in even_split(13696 // 128, 2)]
    assert cuts == [(0, 6912), (6912, 13696)]
    shards = [take_columns(down, a, b, keep_bias=False) for a, b in cuts]
    assert [s.in_features for s in shards] == [6912, 6784]
    assert torch.equal(torch.cat([_weight(s) for s in shards], dim=1), _weight(down))


@pytest.mark.parametrize("fmt,params", FORMATS, ids=IDS)
def test_row_parallel_shards_are_the_layers_columns_and_sum_to_its_output(fmt, params):
    layer = _layer(fmt, params, k=384)  # 3 groups of 128, or 12 of 32: an uneven cut at a group boundary
    unit = k_unit(layer)
    cut = even_split(384 // unit, 2)[0][1] * unit
    shards = [take_columns(layer, 0, cut, keep_bias=True), take_columns(layer, cut, 384, keep_bias=False)]
    w = _weight(layer)
    assert torch.equal(_weight(shards[0]), w[:, :cut]) and torch.equal(_weight(shards[1]), w[:, cut:])
    assert shards[1].bias is None and torch.equal(shards[0].bias, layer.bias)
    if isinstance(layer, QuantLinear):
        assert shards[0].format == layer.format and shards[0].mode == layer.mode
    x = torch.randn(5, 384)
    with torch.no_grad():
        whole = _weight_only(layer)(x)
        summed = _weight_only(shards[0])(x[:, :cut]) + _weight_only(shards[1])(x[:, cut:])
        exact = _exact(layer, x)
    err_whole = (whole.double() - exact).abs().max().item()
    err_sum = (summed.double() - exact).abs().max().item()
    print(f"{fmt or 'float'} {params}: cut at {cut}/384; max error vs float64: whole {err_whole:.3g}, "
          f"summed shards {err_sum:.3g}")
    assert err_sum <= 2 * err_whole


@pytest.mark.parametrize("fmt,params", FORMATS, ids=IDS)
def test_column_parallel_shards_take_rows_with_their_scales_and_bias(fmt, params):
    layer = _layer(fmt, params, k=256, n=24)
    rows = torch.cat([torch.arange(2, 7), torch.arange(14, 19)])  # a fused gate_up keeps two ranges
    shard = take_rows(layer, rows)
    assert torch.equal(_weight(shard), _weight(layer)[rows])
    assert torch.equal(shard.bias, layer.bias[rows])
    x = torch.randn(3, 256)
    with torch.no_grad():  # the same dot products; a narrower matmul may block (and round) them differently
        err_shard = (_weight_only(shard)(x).double() - _exact(layer, x)[:, rows]).abs().max().item()
        err_whole = (_weight_only(layer)(x).double() - _exact(layer, x)).abs().max().item()
    assert err_shard <= 2 * err_whole


def test_a_cut_inside_a_group_is_refused():
    layer = _layer("int4", dict(group_size=128), k=384)
    with pytest.raises(GlmqError, match="group boundary"):
        take_columns(layer, 0, 200, keep_bias=True)


def _tiny_ar(**text):
    from glmq.io.layout import BY_NAME
    from glmq.models.build import build_model
    from glmq.models.configs import component_config

    cfg = component_config("vision_language_encoder", "tiny")
    cfg["text_config"].update(text)
    return build_model(BY_NAME["vision_language_encoder"], cfg, device="cpu").eval()


def test_shard_ar_refuses_what_cannot_be_split_evenly():
    with pytest.raises(GlmqError, match=r"needs attention heads \(4\) and KV heads \(1\) divisible by 2"):
        shard_ar(_tiny_ar(num_key_value_heads=1), 0, 2)
    ar = _tiny_ar(intermediate_size=128)
    for layer in ar.model.language_model.layers:  # one group of 128 columns: nothing to give the second rank
        layer.mlp.down_proj = QuantLinear.from_linear(layer.mlp.down_proj, get_format("int4", group_size=128))
    with pytest.raises(GlmqError, match="1 group"):
        shard_ar(ar, 1, 2)


def test_shard_ar_keeps_each_ranks_heads_mlp_range_and_vocabulary():
    ar = _tiny_ar(intermediate_size=96)
    full = {n: m.weight.detach().clone() for n, m in ar.named_modules() if isinstance(m, nn.Linear)}
    kept = shard_ar(ar, 1, 2)
    text = ar.model.language_model
    layer = text.layers[0]
    assert kept["heads"] == (2, 4) and kept["kv_heads"] == (1, 2) and kept["mlp"][0] == (48, 96)
    assert (text.config.num_attention_heads, text.config.num_key_value_heads, text.config.head_dim) == (2, 1, 32)
    prefix = "model.language_model.layers.0."
    assert torch.equal(layer.self_attn.q_proj.weight, full[prefix + "self_attn.q_proj"][64:128])
    assert torch.equal(layer.self_attn.k_proj.weight, full[prefix + "self_attn.k_proj"][32:64])
    assert torch.equal(layer.self_attn.o_proj.inner.weight, full[prefix + "self_attn.o_proj"][:, 64:128])
    gate_up = full[prefix + "mlp.gate_up_proj"]
    assert torch.equal(layer.mlp.gate_up_proj.weight, torch.cat([gate_up[48:96], gate_up[96 + 48:192]]))
    assert torch.equal(layer.mlp.down_proj.inner.weight, full[prefix + "mlp.down_proj"][:, 48:96])
    assert ar.lm_head.out_features == full["lm_head"].shape[0] and ar.lm_head.sizes == [64, 64]
    with pytest.raises(GlmqError, match="already sharded"):
        shard_ar(ar, 1, 2)
