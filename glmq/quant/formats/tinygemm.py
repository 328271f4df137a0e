"""int4 layers through PyTorch's own W4A16 kernel (``torch._weight_int4pack_mm``, "tinygemm"): the default on
one CUDA GPU.

Measured on an H200, commit c699fb8 (benchmarks/results/decode_modes_h200/, bench_stock_h200/):

- weight reads of the AR's 40 layers per decode step (int4_gemv_libraries_h200/): tinygemm 2.63 ms against
  glmq's Triton kernels 3.56 ms at one row (51.8 against 55.4 dB against the fp32 product of the same
  dequantized weights; bf16 itself reaches 52.5, so both are within glmq's kernel tolerance of twice bf16's
  error);
- the whole decode step, one layer compiled for all: 3.854 against 4.984 ms at B = 1, but 7.207 against
  6.309 ms at B = 8 (tinygemm's cost grows with the rows; glmq's tensor-core GEMV reads the weights once for
  up to 16);
- ``glmq bench``, default recipe, 1024x1024: 13.73 s per image (AR 3.91 ms/token) beside stock diffusers'
  134.8 s in the same run. Every tier from 8 to 24 GiB ran with it (tiers_h200/).

At B = 8 the AR is about an eighth of an image's time (the DiT dominates), so tinygemm's loss there (0.9 ms a
step, ~0.14 s per image) is smaller than its gain for one image (1.1 ms a token, ~1.4 s per image): it is the
default for one GPU (``GLMQ_INT4_KERNEL=auto``). ``GLMQ_INT4_KERNEL=glmq`` keeps glmq's kernels (batched
serving that decodes 8 or more sequences at once); ``tinygemm`` asks for it on any device (the CPU build too,
which the tests use). It ships inside PyTorch, so it costs no dependency.

A layer is repacked once, when the pipeline is assembled: the codes go into tinygemm's tiled layout (same
bytes as glmq's) and the scale and zero point into its ``[K // G, N, 2]`` table, where tinygemm computes
``w = (q - 8) * scale + zero'``; glmq's ``w = (q - z) * scale`` is that with ``zero' = (8 - z) * scale``
(bf16, as tinygemm reads it). On the GPU its packer takes two codes per byte with the even k in the high
nibble (glmq's own layout has it in the low one); the CPU build of the same kernel takes the codes unpacked.
The CPU tests run the CPU build, so the arithmetic above is checked without a GPU; the GPU packing call is
the one the H200 measurements above used.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from glmq.errors import GlmqError
from glmq.quant.formats.int4 import Int4Format, unpack_int4
from glmq.quant.formats.linear import QuantLinear
from glmq.quant.metrics import sqnr_db

INNER_K_TILES = 8  # tinygemm's K tiling on the GPU: K must be a multiple of 16 x this
GROUP_SIZES = (32, 64, 128, 256)


CHOICES = ("auto", "glmq", "tinygemm")


def choice() -> str:
    """``GLMQ_INT4_KERNEL``: ``"auto"`` (unset: tinygemm on one CUDA GPU, glmq's kernels elsewhere), ``"glmq"``
    or ``"tinygemm"``."""
    value = os.environ.get("GLMQ_INT4_KERNEL", "auto")
    if value not in CHOICES:
        raise GlmqError(f"GLMQ_INT4_KERNEL must be 'auto', 'glmq' or 'tinygemm', got {value!r}")
    return value


def wanted() -> bool:
    """Whether the user asked for tinygemm by name (``GLMQ_INT4_KERNEL=tinygemm``)."""
    return choice() == "tinygemm"


def enabled(device: torch.device) -> bool:
    """Whether a one-device pipeline on ``device`` swaps its int4 layers to tinygemm: asked for by name, or
    ``auto`` on a CUDA device (where it was measured faster)."""
    value = choice()
    return value == "tinygemm" or (value == "auto" and torch.device(device).type == "cuda")


def scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """tinygemm's ``[K // G, N, 2]`` bf16 table for glmq's ``scale`` and ``zero`` ``[N, K // G]`` (None:
    symmetric, a zero point of 8)."""
    s = scale.float()
    z = torch.full_like(s, 8.0) if zero is None else zero.float()
    return torch.stack([s.t(), ((8.0 - z) * s).t()], dim=-1).to(torch.bfloat16).contiguous()


def fits(layer: nn.Module, device: torch.device) -> bool:
    """An int4 QuantLinear whose shape and group size tinygemm takes, on a device where it runs."""
    if not isinstance(layer, QuantLinear) or not isinstance(layer.format, Int4Format):
        return False
    n, k, g = layer.out_features, layer.in_features, layer.format.group_size
    if g not in GROUP_SIZES or k % g or n % 8:
        return False
    if device.type == "cuda":
        return k % (16 * INNER_K_TILES) == 0 and torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu"


class TinygemmLinear(nn.Module):
    """``y = x @ W.T + bias`` for an int4 :class:`QuantLinear`'s weight, repacked for tinygemm on ``device``
    (the layer's buffers are read there; the repacked ones stay there until the module is moved)."""

    def __init__(self, layer: QuantLinear, device: torch.device):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.group_size = layer.format.group_size
        self.device_type = device.type
        codes = unpack_int4(layer.weight.to(device))
        if device.type == "cuda":
            high_first = (codes[:, 0::2] << 4) | codes[:, 1::2]
            packed = torch._convert_weight_to_int4pack(high_first.contiguous(), INNER_K_TILES)
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        zero = layer._buffers.get("weight_zero")
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros(layer.weight_scale.to(device),
                                                                  None if zero is None else zero.to(device)))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        mm = torch._weight_int4pack_mm if self.device_type == "cuda" else torch._weight_int4pack_mm_for_cpu
        y = mm(flat, self.packed, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


MIN_SQNR_DB = 40.0  # a wrong packing or zero point lands near 0 dB; a correct one measured 51.8 on the H200


def install(module: nn.Module, device: torch.device) -> int:
    """Swap every int4 QuantLinear under ``module`` that tinygemm takes for a :class:`TinygemmLinear`, each
    repacked on ``device`` and left where the layer was (a parked layer stays on the CPU). The first swapped
    layer is checked against glmq's own product on a random input (``MIN_SQNR_DB``); if it disagrees, or the
    kernel is missing, nothing is swapped and a warning says why. Returns the number of layers swapped."""
    targets = [(name, m) for name, m in module.named_modules() if fits(m, device)]
    if not targets:
        return 0
    try:
        with torch.no_grad():
            name, first = targets[0]
            swapped = TinygemmLinear(first, device)
            x = torch.randn(3, first.in_features, generator=torch.Generator().manual_seed(0)).to(device,
                                                                                                  torch.bfloat16)
            tensors = {k: v.to(device) for k, v in first.stored_tensors().items()}
            bias = first.bias.to(device).float() if first.bias is not None else None
            db = sqnr_db(first.format.matmul_kernel_ref(x.float(), tensors, bias), swapped(x))
            if not db >= MIN_SQNR_DB:
                raise RuntimeError(f"{name}: {db:.1f} dB against glmq's int4 product (at least {MIN_SQNR_DB} "
                                   "expected)")
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        warnings.warn(f"tinygemm int4 kernel: not used ({e}); glmq's int4 kernels run instead", stacklevel=2)
        return 0
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        home = layer.weight.device
        setattr(parent, child, TinygemmLinear(layer, device).to(home))
    return len(targets)


def kernel_in(components: dict) -> str | None:
    """Which kernel the pipeline's int4 layers run on a GPU: "tinygemm", "glmq" (Triton), or None (no int4
    layer)."""
    modules = [m for c in components.values() for m in c.modules()]
    if any(isinstance(m, TinygemmLinear) for m in modules):
        return "tinygemm"
    if any(isinstance(m, QuantLinear) and isinstance(m.format, Int4Format) for m in modules):
        return "glmq"
    return None
