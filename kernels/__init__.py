"""Triton kernels for GLM-Image, shipped as ``glmq.kernels``.

Importing this package must stay free of side effects (no op registration, no CUDA, no compilation):
transformers, diffusers and bitsandbytes probe for a top-level ``kernels`` module and may import this
folder by accident when Python runs from the repository root.
"""
