"""W8A8 linears: 8-bit weights times activations quantized per token on the fly.

Stored layouts (glmq's ``fp8_e4m3`` and ``int8`` formats) of an ``nn.Linear`` weight ``W [N, K]``:

- ``fp8_e4m3``: ``weight`` float8_e4m3fn ``[N, K]``, ``weight_scale`` float32 ``[N, 1]``, ``w = q * s``;
- ``int8``: ``weight`` int8 ``[N, K]`` in [-127, 127], ``weight_scale`` float32 ``[N, 1]``, ``w = q * s``.

Paths, each with a pure-torch ``*_ref`` of the same signature:

- :func:`fp8_linear`: rows of x quantized to e4m3 with scale ``amax / 448`` (:func:`quantize_rows`, a Triton
  kernel: one pass over x instead of torch's four), then ``torch._scaled_mm`` with row-wise scales
  (fp8 tensor cores, sm_89+), bf16 out.
- :func:`int8_linear`: rows of x quantized to int8 with scale ``amax / 127``, ``torch._int_mm`` (int8 tensor
  cores, Ampere+), int32 accumulators rescaled in float32 by a Triton epilogue (one pass).
- :func:`weight_only_linear`: dequantize the weight to x's dtype and ``F.linear`` (CPU and anything else).
  It is pure torch and is its own reference.

:func:`quantize_rows` and the int8 epilogue are ``torch.library`` custom ops (``glmq::quantize_rows``,
``glmq::int8_rescale``, registered when this module is first imported) with fake implementations, so
torch.compile and CUDA graphs can trace every path.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._ops import custom_op_once

__all__ = [
    "quantize_rows", "quantize_rows_ref", "fp8_linear", "fp8_linear_ref", "int8_linear", "int8_linear_ref",
    "weight_only_linear", "fp8_supported", "int8_supported", "act_quant_choice",
]

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0  # symmetric int8: [-127, 127]
_AMAX_FLOOR = 1e-12  # an all-zero row gets this amax, so its scale stays finite and its codes zero


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                          QMAX: tl.constexpr, IS_FP8: tl.constexpr, BLOCK_K: tl.constexpr,
                          SINGLE_PASS: tl.constexpr, INTERPRETER: tl.constexpr):
    # One program per row: pass 1 finds amax, pass 2 writes the codes. With SINGLE_PASS (K <= BLOCK_K) the
    # row stays in registers, so x is read from memory once. Divisions are correctly rounded (div_rn) so the
    # codes match quantize_rows_ref bit for bit.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_first = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
    amax = tl.abs(x_first)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    amax = tl.maximum(tl.max(amax, axis=0), 1e-12)
    qmax = tl.full([BLOCK_K], QMAX, tl.float32)
    inv = tl.div_rn(qmax, amax)
    tl.store(s_ptr + row, tl.max(tl.div_rn(amax, qmax), axis=0))
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        if SINGLE_PASS:
            y = x_first * inv
        else:
            y = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=mask, other=0.0).to(tl.float32) * inv
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
        if IS_FP8:
            if INTERPRETER:
                # The interpreter's float32 -> e4m3 rounding can carry into the exponent wrongly: round to
                # the e4m3 grid by hand (nearest even), after which the conversion is exact.
                bits = y.to(tl.int32, bitcast=True)
                normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
                subnormal = (y + 24576.0) - 24576.0  # multiples of 2^-9 below 2^-6
                y = tl.where(tl.abs(y) < 0.015625, subnormal, normal)
            q = y.to(tl.float8e4nv)
        else:
            # round half to even without libdevice: adding 1.5 * 2^23 pushes the fraction out of the mantissa
            q = ((y + 12582912.0) - 12582912.0).to(tl.int8)
        tl.store(q_ptr + row * stride_qm + k0 + offs, q, mask=mask)


@triton.jit
def _int8_rescale_kernel(acc_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, M, N, stride_am, stride_om,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         INTERPRETER: tl.constexpr):
    # out = acc * x_scale[m] * w_scale[n] (+ bias[n]) in one pass over the int32 products (torch needs five).
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    acc = tl.load(acc_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_n[None, :], mask=mask, other=0)
    xs = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
    ws = tl.load(ws_ptr + offs_n, mask=offs_n < N, other=0.0)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if INTERPRETER:
        if out_ptr.dtype.element_ty == tl.bfloat16:  # the interpreter truncates float32 -> bfloat16
            bits = y.to(tl.int32, bitcast=True)
            y = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :],
             y.to(out_ptr.dtype.element_ty), mask=mask)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_rows(x: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype not in (torch.float8_e4m3fn, torch.int8):
        raise ValueError(f"quantize_rows: dtype must be torch.float8_e4m3fn or torch.int8, got {dtype}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"quantize_rows: x must be a 2-D float tensor [M, K], got {x.dtype} {list(x.shape)}")
    if x.shape[1] > 0 and x.stride(1) != 1:
        raise ValueError(f"quantize_rows: x must have stride 1 along K, got strides {x.stride()}")


def _quantize_rows_impl(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    _check_rows(x, dtype)
    if x.device.type != "cuda" and not (x.device.type == "cpu" and _interpret()):
        return quantize_rows_ref(x, dtype)  # no Triton here: same numbers from torch
    m, k = x.shape
    q = torch.empty((m, k), dtype=dtype, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    kernel = _quantize_rows_kernel
    if x.device.type != "cuda":
        from triton.runtime.interpreter import InterpretedFunction

        kernel = kernel if isinstance(kernel, InterpretedFunction) else InterpretedFunction(kernel.fn)
    block = triton.next_power_of_2(max(k, 16))
    single = block <= 16384  # a whole row in registers (up to 32 values a thread)
    block = block if single else 8192
    kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0),
                 QMAX=FP8_MAX if dtype == torch.float8_e4m3fn else INT8_MAX,
                 IS_FP8=dtype == torch.float8_e4m3fn, BLOCK_K=block, SINGLE_PASS=single,
                 INTERPRETER=x.device.type != "cuda", num_warps=max(4, min(16, block // 512)))
    return q, scale


def _quantize_rows_fake(x, dtype):
    return x.new_empty(x.shape, dtype=dtype), x.new_empty((x.shape[0], 1), dtype=torch.float32)


_quantize_rows_op = custom_op_once("glmq::quantize_rows", _quantize_rows_impl, _quantize_rows_fake)


def _int8_rescale_impl(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                       bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    m, n = acc.shape
    if acc.device.type != "cuda" and not (acc.device.type == "cpu" and _interpret()):
        y = acc.float() * x_scale * w_scale.reshape(1, n)
        return (y if bias is None else y + bias.float()).to(dtype)
    out = torch.empty((m, n), dtype=dtype, device=acc.device)
    kernel = _int8_rescale_kernel
    if acc.device.type != "cuda":
        from triton.runtime.interpreter import InterpretedFunction

        kernel = kernel if isinstance(kernel, InterpretedFunction) else InterpretedFunction(kernel.fn)
    block_m, block_n = 32, 128
    kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        acc, x_scale, w_scale, bias if bias is not None else w_scale, out, m, n, acc.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, INTERPRETER=acc.device.type != "cuda",
        num_warps=4)
    return out


def _int8_rescale_fake(acc, x_scale, w_scale, bias, dtype):
    return acc.new_empty(acc.shape, dtype=dtype)


_int8_rescale_op = custom_op_once("glmq::int8_rescale", _int8_rescale_impl, _int8_rescale_fake)


ACT_QUANT_ENV = "GLMQ_ACT_QUANT"
ACT_QUANT_CHOICES = ("kernel", "inductor")


def act_quant_choice() -> str:
    """``GLMQ_ACT_QUANT``: ``"kernel"`` (unset: glmq's Triton kernel, a custom op the compiler cannot see into)
    or ``"inductor"`` (inside ``torch.compile``, :func:`quantize_rows_ref`'s torch operations, which Inductor
    can fuse into the kernel that produces ``x`` and share between the linears that read the same ``x``;
    eager calls keep the kernel). Raises ValueError for anything else."""
    value = os.environ.get(ACT_QUANT_ENV, "kernel")
    if value not in ACT_QUANT_CHOICES:
        raise ValueError(f"{ACT_QUANT_ENV} must be 'kernel' or 'inductor', got {value!r}")
    return value


def quantize_rows(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantization of a 2-D ``x [M, K]`` (stride 1 along K).

    Returns ``(q [M, K] dtype, scale [M, 1] float32)`` with ``scale = amax / QMAX`` (448 for
    float8_e4m3fn, 127 for int8; amax floored at 1e-12) and ``q = x * (QMAX / amax)`` saturated to
    [-QMAX, QMAX], rounded to nearest even. CUDA tensors use the Triton kernel, others the reference;
    while compiling, ``GLMQ_ACT_QUANT=inductor`` traces the reference instead (:func:`act_quant_choice`).
    """
    if torch.compiler.is_compiling() and act_quant_choice() == "inductor":
        _check_rows(x, dtype)
        return quantize_rows_ref(x, dtype)
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor or x.device.type == "meta":
        return _quantize_rows_op(x, dtype)
    return _quantize_rows_impl(x, dtype)  # eager: skip the custom-op dispatcher's overhead


def quantize_rows_ref(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference of :func:`quantize_rows` (bit-identical codes and scales)."""
    qmax = FP8_MAX if dtype == torch.float8_e4m3fn else INT8_MAX
    xf = x.float()
    amax = xf.abs().amax(dim=1, keepdim=True).clamp_min(_AMAX_FLOOR) if x.shape[1] else \
        torch.full((x.shape[0], 1), _AMAX_FLOOR, device=x.device)
    # torch.full_like(...) / amax: a true division (python_scalar / tensor would multiply by a reciprocal)
    y = (xf * (torch.full_like(amax, qmax) / amax)).clamp(-qmax, qmax)
    q = y.to(dtype) if dtype == torch.float8_e4m3fn else torch.round(y).to(dtype)
    return q, amax / torch.full_like(amax, qmax)


def _check_w8(name: str, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              bias: Optional[torch.Tensor], wdtype: torch.dtype) -> None:
    if weight.dtype != wdtype or weight.dim() != 2:
        raise ValueError(f"{name}: weight must be {wdtype} [N, K], got {weight.dtype} {list(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"{name}: x.shape[-1] (K={x.shape[-1]}) must equal weight.shape[1] (={k})")
    if weight_scale.dtype != torch.float32 or list(weight_scale.shape) != [n, 1]:
        raise ValueError(f"{name}: weight_scale must be float32 [N, 1] = [{n}, 1], "
                         f"got {weight_scale.dtype} {list(weight_scale.shape)}")
    if bias is not None and list(bias.shape) != [n]:
        raise ValueError(f"{name}: bias must be None or [N] = [{n}], got {list(bias.shape)}")
    if not weight.is_contiguous():
        raise ValueError(f"{name}: weight must be contiguous (row-major [N, K]), got strides {weight.stride()}")


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.shape[0] == 0 or x2.stride(1) == 1 else x2.contiguous()


def fp8_supported(device: torch.device) -> bool:
    """Whether :func:`fp8_linear` can run here (CUDA with compute capability 8.9 or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def int8_supported(device: torch.device) -> bool:
    """Whether :func:`int8_linear` takes the int8 tensor-core path here (CUDA, compute capability 8.0+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ (weight * weight_scale).T + bias`` with x quantized per row to e4m3, on fp8 tensor cores.

    Args:
        x: ``[..., K]`` float (bf16 in GLM-Image), on a CUDA device of compute capability >= 8.9.
        weight: float8_e4m3fn ``[N, K]``, contiguous; weight_scale: float32 ``[N, 1]``; bias: ``[N]`` or None.
        K and N must be multiples of 16 (``torch._scaled_mm``).

    Returns:
        ``[..., N]`` in ``x.dtype`` (computed in bf16 by ``_scaled_mm``).
    """
    _check_w8("fp8_linear", x, weight, weight_scale, bias, torch.float8_e4m3fn)
    if not fp8_supported(x.device):
        raise ValueError(f"fp8_linear: needs a CUDA device of compute capability >= 8.9, got {x.device}; "
                         "use weight_only_linear or fp8_linear_ref")
    n, k = weight.shape
    if k % 16 or n % 16:
        raise ValueError(f"fp8_linear: K={k} and N={n} must be multiples of 16 (torch._scaled_mm)")
    x2 = _rows(x)
    xq, xs = quantize_rows(x2, torch.float8_e4m3fn)
    b = bias.to(torch.bfloat16) if bias is not None else None
    y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale.t(), bias=b, out_dtype=torch.bfloat16)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference of :func:`fp8_linear`: the same activation codes, dequantized, multiplied in float32."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_rows_ref(x2, torch.float8_e4m3fn)
    y = (xq.float() * xs) @ (weight.float() * weight_scale).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ (weight * weight_scale).T + bias`` with x quantized per row to int8, via ``torch._int_mm``.

    Args:
        x: ``[..., K]`` float; weight: int8 ``[N, K]`` contiguous; weight_scale: float32 ``[N, 1]``.
        K and N must be multiples of 8 (``torch._int_mm``). Fewer than 17 rows are padded (cuBLAS limit).

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    _check_w8("int8_linear", x, weight, weight_scale, bias, torch.int8)
    n, k = weight.shape
    if k % 8 or n % 8:
        raise ValueError(f"int8_linear: K={k} and N={n} must be multiples of 8 (torch._int_mm)")
    x2 = _rows(x)
    m = x2.shape[0]
    xq, xs = quantize_rows(x2, torch.int8)
    if m <= 16 and x.device.type == "cuda":  # _int_mm on CUDA wants more than 16 rows
        xq = torch.cat([xq, xq.new_zeros(17 - m, k)])
    acc = torch._int_mm(xq, weight.t())[:m]
    tracing = torch.compiler.is_compiling() or type(acc) is not torch.Tensor or acc.device.type == "meta"
    rescale = _int8_rescale_op if tracing else _int8_rescale_impl
    y = rescale(acc, xs, weight_scale, bias, x.dtype)
    return y.reshape(*x.shape[:-1], n)


def int8_linear_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference of :func:`int8_linear`: the same activation codes, integer dot products in float64."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_rows_ref(x2, torch.int8)
    y = ((xq.double() @ weight.double().T) * xs.double() * weight_scale.double().T).float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def weight_only_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fallback for any device: dequantize the 8-bit weight to ``x.dtype``, then ``F.linear`` (pure torch)."""
    w = (weight.to(torch.float32) * weight_scale).to(x.dtype)
    return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)
