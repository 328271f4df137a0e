"""Triton kernels for GLM-Image, shipped as ``glmq.kernels``.

Importing this package must stay free of side effects (no op registration, no CUDA, no compilation):
transformers, diffusers and bitsandbytes probe for a top-level ``kernels`` module and may import this
folder by accident when Python runs from the repository root.
"""

from __future__ import annotations

import importlib

# Public name -> submodule that defines it. Submodules import torch/triton and register their torch.library ops,
# so they load on first attribute access, never at package import.
_LAZY_EXPORTS = {
    "attention": "_attention",
    "attention_ref": "_attention",
}

__all__ = sorted(_LAZY_EXPORTS)


def __getattr__(name: str):
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY_EXPORTS))
