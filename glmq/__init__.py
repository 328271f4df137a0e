"""glmq: quantize, export and run GLM-Image on ordinary GPUs.

``import glmq`` is cheap: it does not import torch, transformers or diffusers, initialize CUDA or compile
kernels. The heavy pieces load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load", "quantize", "make_tiny"]


def __getattr__(name: str):
    # Lazy: the runtime and converters import torch, transformers and diffusers.
    if name == "load":
        from glmq.runtime.load import load

        return load
    if name == "quantize":
        from glmq.evaluate.quantize import quantize

        return quantize
    if name == "make_tiny":
        from glmq.maketiny import make_tiny

        return make_tiny
    raise AttributeError(f"module 'glmq' has no attribute {name!r}")
