"""glmq: quantize, export and run GLM-Image on ordinary GPUs.

``import glmq`` is cheap: it does not import torch, transformers or diffusers, initialize CUDA or compile
kernels. The heavy pieces load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
