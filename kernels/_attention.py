"""Scaled dot-product attention for GLM-Image: Triton kernels and their torch reference.

Public API (both functions take the same arguments):

- :func:`attention` runs Triton kernels: a flash-attention forward for prefill and the DiT, SageAttention-style
  8-bit variants (``precision="int8"`` / ``"fp8"``), and flash-decoding (split-K) for a single query token.
- :func:`attention_ref` computes the same function in plain torch with fp32 math (for tests, CPU runs and
  debugging). For the 8-bit precisions it reproduces the kernels' quantization (Q and K in int8; for "fp8"
  also P and V in e4m3).

Importing this module registers the custom op ``torch.ops.glmq.attention`` (with a fake implementation, so
``torch.compile`` can trace through it); eager calls skip the dispatcher. It does not initialize CUDA.
On CUDA, the first call per (dtype, head dim, mode, mask kind, power-of-two length bucket) times a few tile
configurations and keeps the fastest (``GLMQ_ATTN_AUTOTUNE=0``, or CUDA-graph capture, use the default one):
warm up before capturing graphs.

Semantics, for ``q [B, Hq, Sq, D]`` and ``k, v [B, Hkv, Sk, D]`` (``Hq % Hkv == 0``: query head ``h`` reads
key/value head ``h // (Hq // Hkv)``):

- ``key_padding_mask``: bool ``[B, Sk]``, True = the key may be attended to.
- ``kv_len``: int tensor ``[B]`` on the inputs' device (optional): only keys ``0 .. kv_len[b]-1`` exist (a
  static KV cache). It is read on the device, so it can change between CUDA-graph replays.
- ``causal``: query ``i`` sits at key position ``i + L - Sq`` where ``L`` is the number of existing keys
  (``kv_len[b]`` or ``Sk``): with cached keys (``Sq < L``) the queries are the last ``Sq`` positions.
- A query row that can see no key returns zeros.
"""

from __future__ import annotations

import math
import os

import torch
import triton

from . import _attention_kernels as _k
from ._ops import custom_op_once

__all__ = ["attention", "attention_ref", "PRECISIONS", "QUANT_BLOCK_N"]

PRECISIONS = ("bf16", "int8", "fp8")
# 8-bit modes: Q gets one int8 scale per token (free: the softmax scales per row anyway), K one per QUANT_BLOCK_N
# keys of each (batch, head) after mean smoothing. Kernel tiles of 64 or 128 keys each sit inside one K block.
QUANT_BLOCK_N = 128

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------------- checks
def _check_inputs(q, k, v, causal, scale, key_padding_mask, precision, kv_len, dtypes=_FLOAT_DTYPES):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention: {name} must be a 4-D tensor [B, H, S, D], got {getattr(t, 'shape', t)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in dtypes:
        names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"attention: q, k, v must share one dtype among {names}, got "
                         f"{q.dtype}/{k.dtype}/{v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}/{k.device}/{v.device}")
    B, Hq, Sq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"attention: k must be [B={B}, Hkv, Sk, D={D}], got {tuple(k.shape)}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"attention: query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if not 1 <= D <= 256:
        raise ValueError(f"attention: head dim must be in 1..256, got {D}")
    if precision not in PRECISIONS:
        raise ValueError(f"attention: unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision != "bf16" and q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attention: precision={precision!r} needs fp16/bf16 inputs, got {q.dtype}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, k.shape[2]):
            raise ValueError(f"attention: key_padding_mask must be bool [B={B}, Sk={k.shape[2]}], got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError("attention: key_padding_mask must be on the inputs' device")
    if kv_len is not None:
        if kv_len.dtype not in (torch.int32, torch.int64) or tuple(kv_len.shape) != (B,):
            raise ValueError(f"attention: kv_len must be an int32/int64 tensor [B={B}], got "
                             f"{kv_len.dtype} {tuple(kv_len.shape)}")
        if kv_len.device != q.device:
            raise ValueError("attention: kv_len must be on the inputs' device")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"attention: scale must be a finite float, got {scale!r}")


# ------------------------------------------------------------------------------------------------ reference
def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, torch.floor(x + 0.5), torch.ceil(x - 0.5))


def _fake_quant_int8(x: torch.Tensor, block: int) -> torch.Tensor:
    """Quantize ``x [B, H, S, D]`` (fp32) to int8 with one absmax scale per ``block`` rows; dequantize again."""
    B, H, S, D = x.shape
    pad = (-S) % block
    xb = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(B, H, -1, block, D)
    s = xb.abs().amax(dim=(3, 4), keepdim=True).clamp_min(1e-30) / 127.0
    return (_round_half_away(xb / s) * s).view(B, H, -1, D)[:, :, :S]


def attention_ref(q, k, v, *, causal=False, scale=None, key_padding_mask=None, precision="bf16", kv_len=None):
    """Reference attention in fp32 torch; same signature and semantics as :func:`attention`.

    Also accepts float64 inputs (then computes in float64): the ground truth for checking fp32 results.

    ``precision="int8"``/``"fp8"`` reproduce the kernels' quantization (K smoothed by its mean over the
    sequence; Q per token and K per QUANT_BLOCK_N rows in int8; for "fp8" also P scaled by 448
    and V per channel in e4m3, P taken against the row's global maximum where the kernel uses its running
    one) with everything else in fp32. Queries are processed in chunks so memory stays bounded.
    Returns ``[B, Hq, Sq, D]`` in ``q.dtype``.
    """
    _check_inputs(q, k, v, causal, scale, key_padding_mask, precision, kv_len, _FLOAT_DTYPES + (torch.float64,))
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = D ** -0.5 if scale is None else float(scale)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    if precision != "bf16":
        kf = kf - kf.mean(dim=2, keepdim=True)
        qf = _fake_quant_int8(qf, 1)
        kf = _fake_quant_int8(kf, QUANT_BLOCK_N)
    v_scale = None
    if precision == "fp8":
        v_scale = vf.abs().amax(dim=2, keepdim=True).clamp_min(1e-30) / 448.0
        vf = (vf / v_scale).to(torch.float8_e4m3fn).float()
    kf = kf.repeat_interleave(group, dim=1)
    vf = vf.repeat_interleave(group, dim=1)
    if v_scale is not None:
        v_scale = v_scale.repeat_interleave(group, dim=1)

    seq_k = torch.full((B,), Sk, device=q.device, dtype=torch.int64)
    if kv_len is not None:
        seq_k = kv_len.to(torch.int64).clamp(max=Sk)
    cols = torch.arange(Sk, device=q.device)
    key_ok = cols[None, :] < seq_k[:, None]  # [B, Sk]
    if key_padding_mask is not None:
        key_ok = key_ok & key_padding_mask

    out = torch.empty(B, Hq, Sq, D, device=q.device, dtype=cdt)
    chunk = max(1, min(Sq, (1 << 26) // max(1, B * Hq * Sk)))
    for r0 in range(0, Sq, chunk):
        r1 = min(Sq, r0 + chunk)
        s = torch.matmul(qf[:, :, r0:r1], kf.transpose(-1, -2)) * scale  # [B, Hq, r, Sk]
        ok = key_ok[:, None, None, :]
        if causal:
            pos = torch.arange(r0, r1, device=q.device)[None, :] + (seq_k[:, None] - Sq)  # [B, r]
            ok = ok & (cols[None, None, :] <= pos[:, :, None])[:, None]
        s = s.masked_fill(~ok, float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = torch.exp(s - m)
        l = p.sum(dim=-1, keepdim=True)
        if precision == "fp8":
            p = (p * 448.0).to(torch.float8_e4m3fn).float() / 448.0
        o = torch.matmul(p, vf)
        if v_scale is not None:
            o = o * v_scale
        out[:, :, r0:r1] = o / torch.where(l == 0, torch.ones_like(l), l)
    return out.to(q.dtype)


# -------------------------------------------------------------------------------------------- launch helpers
def _interpreting() -> bool:
    return not isinstance(_k._attn_fwd_kernel, triton.runtime.JITFunction)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: small, so that the tests exercise several splits
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _tma_ok(t: torch.Tensor) -> bool:
    """Host TMA descriptors need a 16-byte aligned base, 16-byte multiple strides and a unit last stride."""
    es = t.element_size()
    if not t.is_cuda:
        return t.stride(-1) == 1  # the interpreter has no alignment rules
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all((s * es) % 16 == 0 for s in t.stride()[:-1])


def _tma_supported(device: torch.device) -> bool:
    if device.type != "cuda":
        return True  # the interpreter emulates descriptors
    return torch.cuda.get_device_capability(device)[0] >= 9


def _make_desc(t: torch.Tensor, block_shape: list[int]):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), block_shape)


# (BLOCK_M, BLOCK_N, num_warps, num_stages, USE_TMA) candidates per (mode, head-dim class). BLOCK_M=64 with 4
# warps fits two CTAs per SM (<= 113 KB of shared memory each), so one CTA's softmax overlaps the other's MMAs;
# BLOCK_M=128 halves the K/V traffic from L2, which matters at long sequences. The first entry is the default
# used without autotuning (CUDA-graph capture, GLMQ_ATTN_AUTOTUNE=0).
_CANDIDATES = {
    ("float", "d128"): [(128, 128, 8, 3, True), (64, 64, 4, 3, True), (64, 64, 4, 3, False), (128, 64, 8, 3, False),
                        (64, 64, 4, 2, True), (128, 64, 8, 3, True), (128, 128, 8, 2, True)],
    ("float", "d256"): [(64, 64, 4, 2, True), (128, 64, 8, 2, True), (64, 64, 4, 2, False)],
    ("fp32", "d128"): [(32, 32, 4, 2, False)],
    ("fp32", "d256"): [(32, 32, 4, 2, False)],
    ("quant", "d128"): [(128, 128, 8, 3, False), (64, 64, 4, 3, True), (64, 64, 4, 3, False), (64, 128, 4, 3, True),
                        (64, 128, 4, 3, False), (128, 128, 8, 3, True), (128, 64, 8, 3, True), (64, 128, 4, 2, True)],
    ("quant", "d256"): [(64, 64, 4, 2, True), (64, 64, 4, 2, False)],
}
_TUNED: dict[tuple, tuple] = {}
# Every autotuning measurement: key -> [(config, median ms or None if it failed)] (read by the benchmark).
_TUNE_LOG: dict[tuple, list] = {}
# Tests and benchmarks may pin one (BLOCK_M, BLOCK_N, num_warps, num_stages, USE_TMA) tuple here.
_FORCE_CONFIG: tuple | None = None
# Interpreter: small tiles so tiny test shapes still span several blocks and ragged tails.
_INTERPRET_FLOAT_CONFIG = (16, 16, 4, 1, False)


def tuned_configs() -> list[tuple[tuple, tuple]]:
    """This process's autotuning choices as ``(key, config)`` pairs: what a persistent cache saves."""
    return list(_TUNED.items())


def adopt_tuned_configs(pairs) -> int:
    """Take earlier choices (from a persistent cache) for keys not tuned in this process; a config that is not
    among today's candidates is skipped. Returns how many were adopted."""
    known = {c for group in _CANDIDATES.values() for c in group}
    known |= {c[:4] + (False,) for c in known}
    adopted = 0
    for key, cfg in pairs:
        if key not in _TUNED and tuple(cfg) in known:
            _TUNED[key] = tuple(cfg)
            adopted += 1
    return adopted


def _autotune_enabled() -> bool:
    return os.environ.get("GLMQ_ATTN_AUTOTUNE", "1") != "0"


def _pick_config(key, candidates, launch):
    """Time every candidate once per key (bucketed shapes) and cache the fastest; skip while capturing graphs."""
    if key in _TUNED:
        return _TUNED[key]
    if not _autotune_enabled() or torch.cuda.is_current_stream_capturing():
        return candidates[0]
    best, best_ms = candidates[0], float("inf")
    log = _TUNE_LOG.setdefault(key, [])
    for cfg in candidates:
        try:
            ms = triton.testing.do_bench(lambda: launch(cfg), warmup=10, rep=40, return_mode="median")
        except Exception:  # a config that does not fit (shared memory, registers) on this card
            log.append((cfg, None))
            continue
        log.append((cfg, ms))
        if ms < best_ms:
            best, best_ms = cfg, ms
    _TUNED[key] = best
    return best


def _launch_fwd(q, k, v, out, causal, scale, kpm, kv_len, precision, cfg):
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    block_m, block_n, num_warps, num_stages, use_tma = cfg
    block_d = max(16, _next_pow2(D))
    quant = precision != "bf16"
    dummy = q.new_empty(1, dtype=torch.float32)
    kscale = vscale = dummy
    kk, vv = k, v
    if quant:
        kk, kscale = _quantize_k(k, QUANT_BLOCK_N)
    pv_fp8 = precision == "fp8"
    if pv_fp8:
        vv, vscale = _quantize_v_fp8(v, QUANT_BLOCK_N, block_d)
    desc_k = desc_v = None
    if use_tma:
        desc_k = _make_desc(kk, [1, 1, block_n, block_d])
        desc_v = _make_desc(vv, [1, 1, block_d, block_n] if pv_fp8 else [1, 1, block_n, block_d])
    kpm_t = kpm.view(torch.uint8) if kpm is not None else dummy
    kvl = kv_len.to(torch.int32) if kv_len is not None else dummy
    grid = (triton.cdiv(Sq, block_m), B * Hq)
    _k._attn_fwd_kernel[grid](
        q, kk, vv, out, kpm_t, kvl, kscale, vscale, desc_k, desc_v,
        *q.stride(), *kk.stride(),
        # The fp8 V is stored transposed ([.., D, S]): pass its (key, channel) strides in the kernel's order.
        *(vv.stride() if not pv_fp8 else (vv.stride(0), vv.stride(1), vv.stride(3), vv.stride(2))),
        *out.stride(),
        kpm_t.stride(0) if kpm is not None else 0,
        kscale.stride(0) if quant else 0, kscale.stride(1) if quant else 0,
        vscale.stride(0) if pv_fp8 else 0, vscale.stride(1) if pv_fp8 else 0,
        Hq, Hkv, Sq, Sk, scale * _k.LOG2E,
        GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, HAS_KPM=kpm is not None, HAS_KVLEN=kv_len is not None,
        QUANT=quant, PV_FP8=pv_fp8, USE_TMA=use_tma, DOT_IEEE=q.dtype == torch.float32,
        INTERPRET=_interpreting(), QUANT_BLOCK_N=QUANT_BLOCK_N, num_warps=num_warps, num_stages=num_stages,
    )


def _quantize_k(k, block_n):
    """K - mean over the sequence, int8 per block_n rows -> ([B, Hkv, Sk_pad, D] int8, [B, Hkv, nb] fp32)."""
    B, Hkv, Sk, D = k.shape
    nb = triton.cdiv(Sk, block_n)
    mean = k.mean(dim=2, dtype=torch.float32).contiguous()  # [B, Hkv, D], without an fp32 copy of K
    kq = torch.empty(B, Hkv, nb * block_n, D, device=k.device, dtype=torch.int8)
    ks = torch.empty(B, Hkv, nb, device=k.device, dtype=torch.float32)
    block_d = max(16, _next_pow2(D))
    _k._quant_k_kernel[(nb, B * Hkv)](
        k, mean, kq, ks, *k.stride(), kq.stride(0), kq.stride(1), kq.stride(2), ks.stride(0), ks.stride(1),
        Hkv, Sk, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=4,
    )
    return kq, ks


def _quantize_v_fp8(v, block_n, block_d):
    """V per channel (absmax over the sequence) to fp8 e4m3, transposed to [B, Hkv, block_d, Sk_pad]."""
    B, Hkv, Sk, D = v.shape
    nb = triton.cdiv(Sk, block_n)
    # One reduction pass without an fp32 or abs() copy of V.
    vs = (torch.linalg.vector_norm(v, ord=float("inf"), dim=2, dtype=torch.float32).clamp_min(1e-30)
          / 448.0).contiguous()  # [B, Hkv, D]
    vt = torch.empty(B, Hkv, block_d, nb * block_n, device=v.device, dtype=torch.float8_e4m3fn)
    _k._quant_v_kernel[(nb, B * Hkv)](
        v, vs, vt, *v.stride(), vt.stride(0), vt.stride(1), vt.stride(2), Hkv, Sk,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_N=block_n, INTERPRET=_interpreting(), num_warps=4,
    )
    return vt, vs


def _run_fwd(q, k, v, causal, scale, kpm, kv_len, precision):
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    out = torch.empty(B, Hq, Sq, D, device=q.device, dtype=q.dtype)
    mode = "quant" if precision != "bf16" else ("fp32" if q.dtype == torch.float32 else "float")
    dclass = "d128" if D <= 128 else "d256"
    candidates = _CANDIDATES[(mode, dclass)]
    if not _tma_supported(q.device) or not (_tma_ok(k) and _tma_ok(v)):
        candidates = [c for c in candidates if not c[4]] or [c[:4] + (False,) for c in candidates[:1]]
    if _FORCE_CONFIG is not None:
        cfg = _FORCE_CONFIG
    elif _interpreting():
        cfg = candidates[0] if mode == "quant" else _INTERPRET_FLOAT_CONFIG
    else:
        key = (q.device.index, q.dtype, D, causal, precision, kpm is not None, kv_len is not None, Hq // Hkv,
               _next_pow2(Sq), _next_pow2(Sk), tuple(c[4] for c in candidates))
        cfg = _pick_config(key, candidates, lambda c: _launch_fwd(q, k, v, out, causal, scale, kpm, kv_len,
                                                                  precision, c))
    _launch_fwd(q, k, v, out, causal, scale, kpm, kv_len, precision, cfg)
    return out


# Flash-decoding launch: (keys per tile, target programs per SM, num_warps, num_stages).
_DECODE_CONFIG = (64, 2, 4, 3)  # best or tied on the H100 sweep (benchmarks/results/attention_notes.md)
_INTERPRET_DECODE_CONFIG = (16, 2, 4, 1)


def _run_decode(q, k, v, scale, kpm, kv_len):
    B, Hq, _, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    block_n, per_sm, num_warps, num_stages = _INTERPRET_DECODE_CONFIG if _interpreting() else _DECODE_CONFIG
    block_d = max(16, _next_pow2(D))
    n_blocks = max(1, triton.cdiv(Sk, block_n))
    # Enough (batch, kv head, split) programs for per_sm per SM; each split spans whole key blocks.
    want = max(1, triton.cdiv(per_sm * _sm_count(q.device), B * Hkv))
    splits = min(n_blocks, want)
    chunk = triton.cdiv(n_blocks, splits) * block_n
    splits = max(1, triton.cdiv(Sk, chunk))
    op = torch.empty(B, Hq, splits, D, device=q.device, dtype=torch.float32)
    mp = torch.empty(B, Hq, splits, device=q.device, dtype=torch.float32)
    lp = torch.empty(B, Hq, splits, device=q.device, dtype=torch.float32)
    out = torch.empty(B, Hq, 1, D, device=q.device, dtype=q.dtype)
    dummy = q.new_empty(1, dtype=torch.float32)
    kpm_t = kpm.view(torch.uint8) if kpm is not None else dummy
    kvl = kv_len.to(torch.int32) if kv_len is not None else dummy
    _k._attn_decode_kernel[(splits, B * Hkv)](
        q, k, v, kpm_t, kvl, op, mp, lp,
        q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(),
        kpm_t.stride(0) if kpm is not None else 0,
        Hkv, Sk, chunk, splits, scale * _k.LOG2E,
        GROUP=group, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_H=max(16, _next_pow2(group)), BLOCK_N=block_n,
        HAS_KPM=kpm is not None, HAS_KVLEN=kv_len is not None, DOT_IEEE=q.dtype == torch.float32,
        INTERPRET=_interpreting(), num_warps=num_warps, num_stages=num_stages,
    )
    _k._attn_decode_combine_kernel[(B * Hq,)](
        op, mp, lp, out, out.stride(0), out.stride(1), out.stride(3), Hq, splits,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=max(2, _next_pow2(splits)), INTERPRET=_interpreting(), num_warps=4,
    )
    return out


# ------------------------------------------------------------------------------------------------ custom op
def _attention_impl(q, k, v, causal, scale, key_padding_mask, precision, kv_len):
    if q.device.type == "cpu" and not _interpreting():
        raise RuntimeError("attention: CPU tensors run only under TRITON_INTERPRET=1 (set before glmq.kernels._"
                           "attention is imported); use attention_ref on the CPU otherwise")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if q.shape[0] == 0 or q.shape[2] == 0:
        return q.new_empty(q.shape)
    if k.shape[2] == 0:
        return q.new_zeros(q.shape)
    if q.shape[2] == 1 and precision == "bf16":
        return _run_decode(q, k, v, scale, key_padding_mask, kv_len)
    return _run_fwd(q, k, v, causal, scale, key_padding_mask, kv_len, precision)


def _attention_op_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
    key_padding_mask: torch.Tensor | None, precision: str, kv_len: torch.Tensor | None,
) -> torch.Tensor:
    return _attention_impl(q, k, v, causal, scale, key_padding_mask, precision, kv_len)


def _attention_fake(q, k, v, causal, scale, key_padding_mask, precision, kv_len):
    return q.new_empty(q.shape)


_attention_op = custom_op_once("glmq::attention", _attention_op_impl, _attention_fake)


def attention(q, k, v, *, causal=False, scale=None, key_padding_mask=None, precision="bf16", kv_len=None):
    """Attention over ``q [B, Hq, Sq, D]`` and ``k, v [B, Hkv, Sk, D]`` (GQA when ``Hkv < Hq``).

    Args:
        causal: mask future keys, aligned to the bottom right (see the module docstring).
        scale: softmax scale; ``D ** -0.5`` when None.
        key_padding_mask: optional bool ``[B, Sk]``, True = attend.
        precision: ``"bf16"`` (tensor-core math in the inputs' dtype, fp32 accumulation; fp32 inputs use exact
            fp32 dots), ``"int8"`` (SageAttention: smoothed K, int8 Q.K^T with per-block scales, P.V in the
            inputs' dtype) or ``"fp8"`` (SageAttention2-style: the same int8 Q.K^T, then P.V in e4m3 with V
            scaled per channel; sm_89+).
        kv_len: optional int tensor ``[B]``: only the first ``kv_len[b]`` keys exist.

    ``Sq == 1`` with ``precision="bf16"`` uses flash-decoding (the cache read is split over all SMs).
    Returns ``[B, Hq, Sq, D]`` in ``q.dtype``. Inputs may be strided views (unit stride in D is best).
    """
    _check_inputs(q, k, v, causal, scale, key_padding_mask, precision, kv_len)
    if precision == "fp8" and q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 9):
        raise ValueError("attention: precision='fp8' needs an sm_89+ GPU (Ada/Hopper); use 'int8'")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if torch.compiler.is_compiling() or type(q) is not torch.Tensor or q.device.type == "meta":
        # Tracing (torch.compile, fake/functional tensors, meta): go through the registered op and its fake.
        return _attention_op(q, k, v, bool(causal), scale, key_padding_mask, precision, kv_len)
    # Eager: call the implementation directly; the dispatcher round trip of a Python custom op costs tens of
    # microseconds, as much as a whole decode step's kernels.
    return _attention_impl(q, k, v, bool(causal), scale, key_padding_mask, precision, kv_len)
