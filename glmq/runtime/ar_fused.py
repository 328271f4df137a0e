"""The AR's text decoder layer with glmq's fused elementwise kernels (:mod:`glmq.kernels.decode_fused`), for the
decode engine when its step runs without ``torch.compile`` (``glmq generate``'s first process).

:func:`layer_forward` computes what upstream's ``GlmImageTextDecoderLayer.forward`` computes, with the same
modules (the q/k/v/o and gate/up/down projections, quantized or not; the cache; the attention function the
model's config names) and the same rounding; only the elementwise work runs in three fused kernels: each
RMSNorm is one launch (with the residual add after the two post-norms), the rotary embedding of q and k one,
SwiGLU one. About 20 launches a layer instead of about 68.

On by default on CUDA when the step is not compiled (``GLMQ_AR_FUSED`` unset); ``GLMQ_AR_FUSED=0`` runs
upstream's layer, ``1`` asks for the fused one on any device (the CPU under ``TRITON_INTERPRET=1``: the tests).
Measured on an H200 (benchmarks/results/uncompiled_h200/, ``glmq bench --no-compile``, default recipe,
1024x1024, tinygemm int4 layers, CUDA graph): 4.26 ms/token against 7.14 with upstream's layer, 17.27 against
20.93 s per image; the compiled step ran 3.91 ms/token on the same machine (bench_stock_h200/), so the
uncompiled step is 1.09x the compiled one.
"""

from __future__ import annotations

import functools
import os

from glmq.errors import GlmqError


def choice() -> str:
    """``GLMQ_AR_FUSED``: ``"auto"`` (unset: fused on CUDA), ``"0"`` or ``"1"``."""
    value = os.environ.get("GLMQ_AR_FUSED", "auto")
    if value not in ("auto", "0", "1"):
        raise GlmqError(f"GLMQ_AR_FUSED must be 0 or 1 (or unset), got {value!r}")
    return value


def wanted(device) -> bool:
    """Whether an uncompiled decode step on ``device`` runs the fused layer: ``GLMQ_AR_FUSED=1``, or unset on
    CUDA."""
    import torch

    value = choice()
    return value == "1" or (value == "auto" and torch.device(device).type == "cuda")


def supported(text_model) -> bool:
    """The layer structure :func:`layer_forward` reproduces: GLM-Image's four RMSNorms, a fused gate/up
    projection with SiLU."""
    layer = text_model.layers[0]
    names = ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm")
    return (all(hasattr(getattr(layer, n, None), "variance_epsilon") for n in names)
            and hasattr(layer.mlp, "gate_up_proj") and getattr(text_model.config, "hidden_act", None) == "silu")


@functools.cache
def _ops():
    """The kernels and upstream's attention registry, imported once (an import statement costs about a
    microsecond, and :func:`layer_forward` runs for every layer of every token)."""
    from transformers.models.glm_image.modeling_glm_image import ALL_ATTENTION_FUNCTIONS, eager_attention_forward

    from glmq.kernels.decode_fused import rms_norm, rotary, silu_mul

    return ALL_ATTENTION_FUNCTIONS, eager_attention_forward, rms_norm, rotary, silu_mul


def layer_forward(layer, hidden, *, position_embeddings, attention_mask, **kwargs):
    """One decoder layer on ``hidden`` ``[B, S, hidden]`` (the arguments the decode engine gives the upstream
    layer: the cache under ``cache`` or ``past_key_values``, and the attention function's own keywords)."""
    ALL_ATTENTION_FUNCTIONS, eager_attention_forward, rms_norm, rotary, silu_mul = _ops()
    attn, mlp = layer.self_attn, layer.mlp
    cache = kwargs.pop("cache", None)
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    kwargs.setdefault("position_ids", None)  # what the upstream layer passes on to its attention
    kwargs.setdefault("use_cache", False)

    def norm(module, x, residual=None):
        return rms_norm(x, module.weight, module.variance_epsilon, residual)

    residual = hidden
    h = norm(layer.input_layernorm, hidden)
    b, s, _ = h.shape
    shape = (b, s, -1, attn.head_dim)
    q, k = rotary(attn.q_proj(h).view(shape), attn.k_proj(h).view(shape), *position_embeddings)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), attn.v_proj(h).view(shape).transpose(1, 2)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx, kwargs=kwargs)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    out, _ = attention(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling, **kwargs)
    out = attn.o_proj(out.reshape(b, s, -1).contiguous())
    hidden = norm(layer.post_self_attn_layernorm, out, residual)
    h = mlp.down_proj(silu_mul(mlp.gate_up_proj(norm(layer.post_attention_layernorm, hidden))))
    return norm(layer.post_mlp_layernorm, h, hidden)


def final_norm(text_model, hidden):
    """The text model's last RMSNorm, fused."""
    rms_norm = _ops()[2]
    return rms_norm(hidden, text_model.norm.weight, text_model.norm.variance_epsilon)
