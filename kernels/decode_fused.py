"""Fused elementwise kernels for the AR decode step when it runs without ``torch.compile``.

An upstream GLM-Image text decoder layer launches about 68 kernels per token, most of them elementwise: four
RMSNorms of seven or eight each, the partial rotary embedding of q and k (twelve), SwiGLU (two), two residual
adds. A CUDA graph removes the launches' CPU cost but not their GPU-side gaps; Inductor fuses them, which is
why the compiled step was three times faster (4.9 against 14.7 ms/token on the H200). These kernels do the
same fusions by hand, one launch each, for the uncompiled path (glmq.runtime.ar_fused):

- ``rms_norm(x, weight, eps, residual=None)``: upstream's RMSNorm (fp32 statistics, the normalized values
  rounded to ``x``'s dtype, then times ``weight``), and, with ``residual``, the residual add that follows
  the layer's post-norms;
- ``rotary(q, k, cos, sin)``: the partial rotary embedding of q and k ``[B, S, H, D]`` (the first
  ``cos.shape[-1]`` channels rotated half against half, the rest passed through), both in one launch;
- ``silu_mul(gate_up)``: ``up * silu(gate)`` of the fused gate/up projection's output (gate first).

Each rounds where upstream rounds (every bf16 operation's result), so the outputs differ from upstream's only
by the order of the RMSNorm's sum and the approximate square root. The pure-torch references (``*_ref``) are
upstream's operations. Only float32 and bfloat16 run in Triton (on CUDA, or on the CPU under
``TRITON_INTERPRET=1``); anything else runs the reference. Each is a ``torch.library`` custom op.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._ops import custom_op_once

__all__ = ["rms_norm", "rms_norm_ref", "rotary", "rotary_ref", "silu_mul", "silu_mul_ref"]


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _round(y, TO_BF16: tl.constexpr):
    # A float32 value rounded to the nearest bfloat16 (ties to even), still as float32: what every bf16
    # operation of upstream's does to its result. The bit trick rounds the same on the GPU and in the
    # interpreter (whose float32 -> bfloat16 conversion truncates).
    if TO_BF16:
        bits = y.to(tl.int32, bitcast=True)
        y = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return y


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, r_ptr, out_ptr, D, eps, stride_x, stride_r, stride_o,
                     X_BF16: tl.constexpr, OUT_BF16: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / D
    y = _round(x * (1.0 / tl.sqrt(var + eps)), X_BF16)  # hidden_states.to(input_dtype)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = _round(w * y, OUT_BF16)  # weight * hidden_states
    if HAS_RES:
        r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        out = _round(r + out, OUT_BF16)  # residual + hidden_states
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, S, HQ, HK, D, ROT,
                   stride_cb, stride_cs, IS_BF16: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (token t = b * S + s, head h of q's HQ then k's HK): one head vector of D channels.
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    b = t // S
    s = t % S
    is_q = h < HQ
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    half = ROT // 2
    if is_q:
        base_in = q_ptr + (t * HQ + h) * D
        base_out = qo_ptr + (t * HQ + h) * D
    else:
        base_in = k_ptr + (t * HK + (h - HQ)) * D
        base_out = ko_ptr + (t * HK + (h - HQ)) * D
    x = tl.load(base_in + offs, mask=mask, other=0.0).to(tl.float32)
    # rotate_half over the first ROT channels: channel i < half takes -x[i + half], channel i >= half x[i - half]
    rot_mask = offs < ROT
    partner = tl.where(offs < half, offs + half, offs - half)
    xp = tl.load(base_in + partner, mask=rot_mask, other=0.0).to(tl.float32)
    xp = tl.where(offs < half, -xp, xp)
    c = tl.load(cos_ptr + b * stride_cb + s * stride_cs + offs, mask=rot_mask, other=0.0).to(tl.float32)
    sn = tl.load(sin_ptr + b * stride_cb + s * stride_cs + offs, mask=rot_mask, other=0.0).to(tl.float32)
    y = _round(_round(x * c, IS_BF16) + _round(xp * sn, IS_BF16), IS_BF16)
    y = tl.where(rot_mask, y, x)
    tl.store(base_out + offs, y.to(qo_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, F, stride_x, stride_o, IS_BF16: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < F
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + F + offs, mask=mask, other=0.0).to(tl.float32)
    act = _round(gate / (1.0 + tl.exp(-gate)), IS_BF16)  # silu(gate) in the input's dtype
    tl.store(out_ptr + row * stride_o + offs, _round(up * act, IS_BF16).to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Host wrappers
# ----------------------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.bfloat16)


def _triton_runs(*tensors: torch.Tensor) -> bool:
    if any(t.dtype not in _DTYPES for t in tensors):
        return False
    device = tensors[0].device
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1")


def _launchable(kernel, device: torch.device):
    if device.type == "cuda":
        return kernel
    from triton.runtime.interpreter import InterpretedFunction

    return kernel if isinstance(kernel, InterpretedFunction) else InterpretedFunction(kernel.fn)


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.shape[-1] > 0 and x.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous, got strides {x.stride()}")
    return x.reshape(-1, x.shape[-1])


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """Upstream's RMSNorm (``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``, statistics in float32), then
    ``residual + ...`` when given."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return residual + out if residual is not None else out


def _rms_norm_impl(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    checked = (x, weight) if residual is None else (x, weight, residual)
    out_dtype = torch.result_type(weight, x) if residual is None else torch.promote_types(
        residual.dtype, torch.result_type(weight, x))
    if not _triton_runs(*checked) or out_dtype not in _DTYPES:
        return rms_norm_ref(x, weight, eps, residual)
    d = x.shape[-1]
    if weight.shape != (d,) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"rms_norm: weight must be [{d}] and residual {list(x.shape)}, got {list(weight.shape)}"
                         f"{'' if residual is None else ' and ' + str(list(residual.shape))}")
    rows = _rows(x, "rms_norm")
    res = _rows(residual, "rms_norm") if residual is not None else rows
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if rows.shape[0] == 0:
        return out
    block = triton.next_power_of_2(max(d, 16))
    _launchable(_rms_norm_kernel, x.device)[(rows.shape[0],)](
        rows, weight.contiguous(), res, out.view(-1, d), d, float(eps), rows.stride(0), res.stride(0), d,
        X_BF16=x.dtype == torch.bfloat16, OUT_BF16=out_dtype == torch.bfloat16, HAS_RES=residual is not None,
        BLOCK_D=block, num_warps=max(1, min(16, block // 256)))
    return out


def _rms_norm_fake(x, weight, eps, residual=None):
    dtype = torch.result_type(weight, x) if residual is None else torch.promote_types(
        residual.dtype, torch.result_type(weight, x))
    return torch.empty(x.shape, dtype=dtype, device=x.device)


def rotate_half_ref(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's partial rotary embedding on ``q`` ``[B, S, HQ, D]`` and ``k`` ``[B, S, HK, D]`` with ``cos`` and
    ``sin`` ``[B, S, ROT]`` (``ROT <= D``, even): ``x_rot * cos + rotate_half(x_rot) * sin`` on the first ROT
    channels, the rest unchanged."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    rot = cos.shape[-1]

    def one(x):
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        return torch.cat([(x_rot * cos) + (rotate_half_ref(x_rot) * sin), x_pass], dim=-1)

    return one(q), one(k)


def _rotary_impl(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not _triton_runs(q, k, cos, sin) or len({q.dtype, k.dtype, cos.dtype, sin.dtype}) != 1:
        return rotary_ref(q, k, cos, sin)
    b, s, hq, d = q.shape
    rot = cos.shape[-1]
    if k.shape[:2] != (b, s) or k.shape[-1] != d or cos.shape != (b, s, rot) or sin.shape != cos.shape \
            or rot % 2 or rot > d:
        raise ValueError(f"rotary: q [B, S, HQ, D], k [B, S, HK, D], cos and sin [B, S, ROT] with an even ROT <= D; "
                         f"got {list(q.shape)}, {list(k.shape)}, {list(cos.shape)}, {list(sin.shape)}")
    q, k = q.contiguous(), k.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    if b * s == 0:
        return qo, ko
    _launchable(_rotary_kernel, q.device)[(b * s, hq + k.shape[2])](
        q, k, cos, sin, qo, ko, s, hq, k.shape[2], d, rot, cos.stride(0), cos.stride(1),
        IS_BF16=q.dtype == torch.bfloat16, BLOCK_D=triton.next_power_of_2(max(d, 16)), num_warps=1)
    return qo, ko


def _rotary_fake(q, k, cos, sin):
    return torch.empty_like(q), torch.empty_like(k)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Upstream's SwiGLU on the fused gate/up output ``[..., 2F]`` (gate first): ``up * silu(gate)``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return up * torch.nn.functional.silu(gate)


def _silu_mul_impl(gate_up: torch.Tensor) -> torch.Tensor:
    if not _triton_runs(gate_up) or gate_up.shape[-1] % 2:
        return silu_mul_ref(gate_up)
    f = gate_up.shape[-1] // 2
    rows = _rows(gate_up, "silu_mul")
    out = torch.empty((*gate_up.shape[:-1], f), dtype=gate_up.dtype, device=gate_up.device)
    if rows.shape[0] == 0 or f == 0:
        return out
    block = min(1024, triton.next_power_of_2(f))
    _launchable(_silu_mul_kernel, gate_up.device)[(rows.shape[0], triton.cdiv(f, block))](
        rows, out.view(-1, f), f, rows.stride(0), f, IS_BF16=gate_up.dtype == torch.bfloat16, BLOCK=block,
        num_warps=4)
    return out


def _silu_mul_fake(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


_rms_norm_op = custom_op_once("glmq::rms_norm", _rms_norm_impl, _rms_norm_fake)
_rotary_op = custom_op_once("glmq::rotary", _rotary_impl, _rotary_fake)
_silu_mul_op = custom_op_once("glmq::silu_mul", _silu_mul_impl, _silu_mul_fake)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """See the module docstring; the ``glmq::rms_norm`` op (eager calls skip the dispatcher)."""
    if torch.compiler.is_compiling():
        return _rms_norm_op(x, weight, float(eps), residual)
    return _rms_norm_impl(x, weight, float(eps), residual)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring; the ``glmq::rotary`` op."""
    if torch.compiler.is_compiling():
        return _rotary_op(q, k, cos, sin)
    return _rotary_impl(q, k, cos, sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """See the module docstring; the ``glmq::silu_mul`` op."""
    if torch.compiler.is_compiling():
        return _silu_mul_op(gate_up)
    return _silu_mul_impl(gate_up)
