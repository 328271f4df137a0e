"""Parts of the GLM-Image networks that a fidelity check must notice when they break.

A fidelity figure is evidence only if it could have failed. :func:`dit_parts` and :func:`ar_parts` name the
parts of the DiT and of the AR text decoder whose loss the checks must see (every block's attention and MLP,
every linear layer a recipe quantizes, the glyph and prior paths), and :func:`zeroed` breaks them at run
time: their outputs become zeros, through forward hooks, without touching the weights. Used by the tests
that show every part of the tiny model matters, and by ``benchmarks/tiny_fidelity.py``, which records how
far each break moves the figures the tests check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def _zero_output(module, args, out):
    import torch

    if isinstance(out, torch.Tensor):
        return torch.zeros_like(out)
    if isinstance(out, tuple):
        return type(out)(torch.zeros_like(o) if isinstance(o, torch.Tensor) else o for o in out)
    if hasattr(out, "last_hidden_state"):  # a transformers ModelOutput (the glyph encoder)
        out.last_hidden_state = torch.zeros_like(out.last_hidden_state)
        return out
    raise TypeError(f"cannot zero a {type(out).__name__} output of {type(module).__name__}")


@contextlib.contextmanager
def zeroed(*modules) -> Iterator[None]:
    """Within the block, every module in ``modules`` outputs zeros (its weights are left as they are)."""
    handles = [m.register_forward_hook(_zero_output) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _linears(module, prefix: str) -> dict:
    from torch import nn

    from glmq.quant.formats.linear import QuantLinear

    return {f"{prefix}.{n}": m for n, m in module.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}


def dit_parts(dit) -> dict:
    """Name -> module of every part of a ``GlmImageTransformer2DModel`` that must matter: each block's
    attention (``transformer_blocks.N.attn1``) and MLP (``...ff``), each linear layer inside a block (the
    layers recipes quantize, AdaLN included), the glyph projector and the prior projector."""
    parts = {}
    for i, block in enumerate(dit.transformer_blocks):
        parts[f"transformer_blocks.{i}.attn1"] = block.attn1
        parts[f"transformer_blocks.{i}.ff"] = block.ff
        parts.update(_linears(block, f"transformer_blocks.{i}"))
    parts["glyph_projector"] = dit.glyph_projector
    parts["prior_projector"] = dit.prior_projector
    return parts


def ar_parts(ar) -> dict:
    """Name -> module of every part of the AR text decoder that must matter: each decoder layer's attention
    and MLP, and each linear layer in them (the layers recipes quantize)."""
    parts = {}
    for i, layer in enumerate(ar.model.language_model.layers):
        prefix = f"model.language_model.layers.{i}"
        parts[f"{prefix}.self_attn"] = layer.self_attn
        parts[f"{prefix}.mlp"] = layer.mlp
        parts.update(_linears(layer, prefix))
    return parts
