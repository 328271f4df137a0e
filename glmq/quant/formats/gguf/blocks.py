"""GGUF block quantizers written from the documented ggml block layouts, and the Q4_K_M type plan.

gguf-py (0.19) dequantizes every ggml type but quantizes only the simple ones, so glmq carries its own
quantizers for the types its GGUF exports use. Each takes a 2-D float32 array of shape (rows, cols), with
``cols`` a multiple of the type's block, and returns the raw block bytes as a uint8 array of shape
``(rows, cols // block * block_bytes)``: what ``GGUFWriter.add_tensor(name, raw, raw_dtype=qtype)`` expects
(gguf-py derives the logical shape from the byte shape).

Block layouts (ggml, little endian; "fp16" is IEEE half):

- ``Q8_0``, 32 values, 34 bytes: fp16 ``d``; 32 x int8 ``q``.  ``x = d * q``.
- ``Q5_0``, 32 values, 22 bytes: fp16 ``d``; uint32 ``qh`` (bit j = bit 4 of value j); 16 bytes ``qs``
  (byte j: low nibble = value j, high nibble = value j + 16).  ``x = d * (q - 16)``.
- ``Q5_1``, 32 values, 24 bytes: fp16 ``d``, fp16 ``m``, then ``qh`` and ``qs`` as Q5_0.  ``x = d * q + m``.
- ``Q4_K``, 256 values in 8 sub-blocks of 32, 144 bytes: fp16 ``d``, fp16 ``dmin``; 12 bytes holding eight
  6-bit scales and eight 6-bit mins; 128 bytes ``qs`` (bytes 32c..32c+31: low nibbles = sub-block 2c,
  high nibbles = sub-block 2c+1).  ``x = (d * sc) * q - (dmin * m)``.
- ``Q5_K``, 256 values, 176 bytes: as Q4_K plus 32 bytes ``qh`` before ``qs`` (byte l, bit i = bit 4 of
  value l of sub-block i).
- ``Q6_K``, 256 values in 16 sub-blocks of 16, 210 bytes: 128 bytes ``ql`` (low 4 bits), 64 bytes ``qh``
  (high 2 bits), 16 x int8 scales, fp16 ``d``.  ``x = (d * sc) * (q - 32)``.

Q8_0, Q5_0 and Q5_1 use ggml's reference rule (the block's absmax or range sets the scale), so their bytes
equal gguf-py's own quantizer. The K types search each sub-block's scale (and min): several candidate
scales, each followed by a least-squares refit of scale/min to the rounded levels; the best in squared
error wins and two alternating round/refit passes polish it. The super-block scales are then fitted by
least squares to the final 6/8-bit sub-block scales and levels. The objective is plain squared error,
which is what SQNR measures; llama.cpp weights its search by |x| and can use an importance matrix.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from glmq.errors import GlmqError

__all__ = [
    "QUANT_TYPES",
    "block_size",
    "dequantize",
    "dit_plan",
    "q4_k_m_plan",
    "quantize",
    "sqnr_db",
]

QK_K = 256  # values per K-quant super-block
_CHUNK_VALUES = 1 << 18  # values processed at once: keeps temporaries in cache and memory bounded
_FP16_MAX = 65504.0


@dataclass(frozen=True)
class _Format:
    block: int  # values per block
    nbytes: int  # bytes per block
    quantize: Callable[[np.ndarray], np.ndarray]  # (nblocks, block) f32 -> (nblocks, nbytes) u8
    dequantize: Callable[[np.ndarray], np.ndarray]  # (nblocks, nbytes) u8 -> (nblocks, block) f32


# ----------------------------------------------------------------------------------------------------------
# small helpers


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C ``roundf``: nearest integer, ties away from zero (np.rint rounds ties to even)."""
    t = np.trunc(v)
    return t + np.sign(v) * (np.abs(v - t) >= 0.5)


def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    """(n,) float32 -> (n, 2) uint8 holding the IEEE half (round to nearest even)."""
    return v.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _fp16_value(b: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> (n,) float32."""
    return np.ascontiguousarray(b).view(np.float16).reshape(-1).astype(np.float32)


def _to_fp16_checked(v: np.ndarray, what: str) -> np.ndarray:
    """Round scales to fp16, refusing the ones that overflow (weights beyond ~1e6 in magnitude)."""
    if np.any(np.abs(v) > _FP16_MAX):
        raise GlmqError(f"a GGUF block {what} exceeds the fp16 range: the tensor holds values too large to quantize")
    return v.astype(np.float16).astype(np.float32)


def _min_fp16_step(step: np.ndarray) -> np.ndarray:
    """Keep non-zero super-block steps at least fp16's smallest subnormal (2**-24): tiny weights then get
    small integer scale codes instead of a step that rounds to zero and erases the block."""
    tiny = np.float32(2.0**-24)
    return np.where((step != 0) & (np.abs(step) < tiny), np.copysign(tiny, step), step).astype(np.float32)


def _pack_5bit(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 32) levels 0..31 -> qh (n, 4) and qs (n, 16) of Q5_0/Q5_1."""
    q = q.astype(np.uint8)
    qs = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    qh = np.bitwise_or.reduce(bits, axis=1).astype("<u4").view(np.uint8).reshape(-1, 4)
    return qh, qs


def _unpack_5bit(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack_5bit`: (n, 32) levels as float32."""
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
    high = (np.ascontiguousarray(qh).view("<u4") >> np.arange(32, dtype=np.uint32)) & 1
    return (low | (high.astype(np.uint8) << 4)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Q8_0, Q5_0, Q5_1: ggml's reference rule (bytes equal gguf-py's and llama.cpp's)


def _q8_0_quantize(x: np.ndarray) -> np.ndarray:
    d = np.abs(x).max(axis=1) / np.float32(127)
    inv = np.zeros_like(d)
    np.divide(np.float32(1), d, out=inv, where=d != 0)
    q = _round_half_away(x * inv[:, None]).astype(np.int8)
    _to_fp16_checked(d, "scale")
    return np.concatenate([_fp16_bytes(d), q.view(np.uint8)], axis=1)


def _q8_0_dequantize(b: np.ndarray) -> np.ndarray:
    d = _fp16_value(b[:, :2])
    return b[:, 2:].view(np.int8).astype(np.float32) * d[:, None]


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """The value of largest magnitude in each row, with its sign (first one on ties)."""
    idx = np.abs(x).argmax(axis=1)
    return x[np.arange(x.shape[0]), idx]


def _q5_0_quantize(x: np.ndarray) -> np.ndarray:
    # The extreme value maps to level 0 (-16 after the offset), which uses the extra negative level.
    d = _signed_absmax(x) / np.float32(-16)
    inv = np.zeros_like(d)
    np.divide(np.float32(1), d, out=inv, where=d != 0)
    q = np.minimum(np.trunc(x * inv[:, None] + np.float32(16.5)), 31)
    qh, qs = _pack_5bit(q)
    _to_fp16_checked(d, "scale")
    return np.concatenate([_fp16_bytes(d), qh, qs], axis=1)


def _q5_0_dequantize(b: np.ndarray) -> np.ndarray:
    d = _fp16_value(b[:, :2])
    return (_unpack_5bit(b[:, 2:6], b[:, 6:]) - np.float32(16)) * d[:, None]


def _q5_1_quantize(x: np.ndarray) -> np.ndarray:
    lo = x.min(axis=1)
    d = (x.max(axis=1) - lo) / np.float32(31)
    inv = np.zeros_like(d)
    np.divide(np.float32(1), d, out=inv, where=d != 0)
    q = np.minimum(np.trunc((x - lo[:, None]) * inv[:, None] + np.float32(0.5)), 31)
    qh, qs = _pack_5bit(q)
    _to_fp16_checked(d, "scale")
    _to_fp16_checked(lo, "min")
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(lo), qh, qs], axis=1)


def _q5_1_dequantize(b: np.ndarray) -> np.ndarray:
    d = _fp16_value(b[:, :2])
    m = _fp16_value(b[:, 2:4])
    return _unpack_5bit(b[:, 4:8], b[:, 8:]) * d[:, None] + m[:, None]


# ----------------------------------------------------------------------------------------------------------
# K-quant search


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b)


def _rowsum(a: np.ndarray) -> np.ndarray:
    return np.einsum("ij->i", a)


# Candidate level counts relative to nmax: the extreme values land a little inside or outside the grid.
_ASYM_DELTAS = (-0.9, -0.6, -0.3, 0.0, 0.3, 0.6, 0.9)
_SYM_DELTAS = (-0.6, -0.3, 0.0, 0.3, 0.6)
_REFINE_PASSES = 2


def _fit_scale_min(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``x`` (n, g): scale ``s >= 0`` and offset ``b <= 0`` minimizing ``sum (s*L + b - x)^2``
    over integer levels ``L`` in ``[0, nmax]``. Returns float32 ``(s, b)``."""
    n, g = x.shape
    sx = _rowsum(x)
    sxx = _rowdot(x, x)
    lo = np.minimum(x.min(axis=1), 0)
    rng = x.max(axis=1) - lo
    inv_rng = np.zeros_like(rng)
    np.divide(np.float32(1), rng, out=inv_rng, where=rng > 0)

    best_err = np.full(n, np.inf, dtype=np.float32)
    best_s = np.zeros(n, dtype=np.float32)
    best_b = lo.copy()

    def refit(levels: np.ndarray) -> None:
        sl = _rowsum(levels)
        sll = _rowdot(levels, levels)
        slx = _rowdot(levels, x)
        det = g * sll - sl * sl
        ok = det > 0
        safe_det = np.where(ok, det, 1)
        s = np.where(ok, (g * slx - sl * sx) / safe_det, 0)
        b = np.where(ok, (sll * sx - sl * slx) / safe_det, sx / g)
        # The format stores the offset as -dmin*m with m >= 0: refit the scale alone when b would be > 0.
        pos = b > 0
        s = np.where(pos, slx / np.where(sll > 0, sll, 1), s)
        b = np.where(pos, 0, b)
        s = np.maximum(s, 0)
        err = sxx - 2 * s * slx - 2 * b * sx + s * s * sll + 2 * s * b * sl + g * b * b
        better = err < best_err
        best_err[better] = err[better]
        best_s[better] = s[better]
        best_b[better] = b[better]

    shifted = x - lo[:, None]
    levels = np.empty_like(x)
    for delta in _ASYM_DELTAS:
        np.multiply(shifted, ((nmax + delta) * inv_rng)[:, None], out=levels)
        np.rint(levels, out=levels)
        np.clip(levels, 0, nmax, out=levels)
        refit(levels)
    for _ in range(_REFINE_PASSES):
        inv_s = np.zeros_like(best_s)
        np.divide(np.float32(1), best_s, out=inv_s, where=best_s > 0)
        np.multiply(x - best_b[:, None], inv_s[:, None], out=levels)
        np.rint(levels, out=levels)
        np.clip(levels, 0, nmax, out=levels)
        refit(levels)
    return best_s, best_b


def _fit_scale_sym(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Per row of ``x`` (n, g): signed scale ``s`` minimizing ``sum (s*L - x)^2`` over integer levels ``L`` in
    ``[lo, hi]`` (``lo = -hi - 1``: the extra negative level is used by mapping the extreme value there)."""
    n = x.shape[0]
    sxx = _rowdot(x, x)
    amax = _signed_absmax(x)
    best_err = np.full(n, np.inf, dtype=np.float32)
    best_s = np.zeros(n, dtype=np.float32)

    def refit(levels: np.ndarray) -> None:
        sll = _rowdot(levels, levels)
        slx = _rowdot(levels, x)
        ok = sll > 0
        s = np.where(ok, slx / np.where(ok, sll, 1), 0)
        err = sxx - s * slx
        better = err < best_err
        best_err[better] = err[better]
        best_s[better] = s[better]

    levels = np.empty_like(x)
    for target in (lo, hi):  # the extreme value goes to the most negative or the most positive level
        for delta in _SYM_DELTAS:
            scale = (target - np.sign(target) * delta) / np.where(amax != 0, amax, 1)
            np.multiply(x, scale[:, None], out=levels)
            np.rint(levels, out=levels)
            np.clip(levels, lo, hi, out=levels)
            refit(levels)
    for _ in range(_REFINE_PASSES):
        inv_s = np.zeros_like(best_s)
        np.divide(np.float32(1), best_s, out=inv_s, where=best_s != 0)
        np.multiply(x, inv_s[:, None], out=levels)
        np.rint(levels, out=levels)
        np.clip(levels, lo, hi, out=levels)
        refit(levels)
    return best_s


def _levels(x: np.ndarray, step: np.ndarray, offset: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Nearest levels of ``x`` (n, g) on the grid ``step*L - offset`` (per row), clipped to [lo, hi]."""
    inv = np.zeros_like(step)
    np.divide(np.float32(1), step, out=inv, where=step != 0)
    levels = (x + offset[:, None]) * inv[:, None]
    np.rint(levels, out=levels)
    return np.clip(levels, lo, hi, out=levels)


def _quantize_scale_codes(values: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Super-block step (fp16-rounded) and 6-bit codes for non-negative sub-block values (nsb, k)."""
    step = _to_fp16_checked(_min_fp16_step(values.max(axis=1) / np.float32(qmax)), "scale")
    inv = np.zeros_like(step)
    np.divide(np.float32(1), step, out=inv, where=step > 0)
    codes = np.clip(np.rint(values * inv[:, None]), 0, qmax)
    return step, codes


def _kquant_asym(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shared Q4_K/Q5_K fit. ``x`` (nb, 256). Returns fp16-exact ``d``, ``dmin`` (nb,), 6-bit ``sc``, ``m``
    (nb, 8) and levels (nb, 256), all float32."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    s, b = _fit_scale_min(sub, nmax)
    d, sc = _quantize_scale_codes(s.reshape(nb, 8), 63)
    dmin, mc = _quantize_scale_codes((-b).reshape(nb, 8), 63)

    def levels_for(d: np.ndarray, dmin: np.ndarray) -> np.ndarray:
        step = (d[:, None] * sc).reshape(-1)
        offset = (dmin[:, None] * mc).reshape(-1)
        return _levels(sub, step, offset, 0, nmax).reshape(nb, 256)

    def sq_err(d: np.ndarray, dmin: np.ndarray, q: np.ndarray) -> np.ndarray:
        y = (d[:, None] * sc)[:, :, None] * q.reshape(nb, 8, 32) - (dmin[:, None] * mc)[:, :, None]
        r = (y.reshape(nb, 256) - x)
        return _rowdot(r, r)

    q = levels_for(d, dmin)
    err = sq_err(d, dmin, q)
    # Least-squares refit of (d, dmin) to the integer codes: x ~ d * (sc*q) - dmin * m.
    u = (sc[:, :, None] * q.reshape(nb, 8, 32)).reshape(nb, 256)
    v = np.repeat(mc, 32, axis=1)
    suu, suv, svv = _rowdot(u, u), _rowdot(u, v), _rowdot(v, v)
    sux, svx = _rowdot(u, x), _rowdot(v, x)
    det = suu * svv - suv * suv
    ok = det > 0
    safe = np.where(ok, det, 1)
    d2 = np.where(ok, (sux * svv - svx * suv) / safe, d)
    dmin2 = np.where(ok, (sux * suv - svx * suu) / safe, dmin)
    bad = ~ok | (d2 < 0) | (dmin2 < 0)
    d2 = _to_fp16_checked(np.where(bad, d, d2), "scale")
    dmin2 = _to_fp16_checked(np.where(bad, dmin, dmin2), "min")
    q2 = levels_for(d2, dmin2)
    err2 = sq_err(d2, dmin2, q2)
    use2 = err2 < err
    d = np.where(use2, d2, d)
    dmin = np.where(use2, dmin2, dmin)
    q = np.where(use2[:, None], q2, q)
    # Values near fp16's underflow (|x| < ~1e-5) can round d and dmin so unevenly that the block decodes
    # worse than all zeros: store zeros there instead.
    zero = np.minimum(err, err2) > _rowdot(x, x)
    if zero.any():
        d, dmin = np.where(zero, 0, d), np.where(zero, 0, dmin)
        sc, mc, q = np.where(zero[:, None], 0, sc), np.where(zero[:, None], 0, mc), np.where(zero[:, None], 0, q)
    return d, dmin, sc, mc, q


def _pack_kscales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins (nb, 8) -> the 12-byte Q4_K/Q5_K scale field."""
    sc = sc.astype(np.uint8)
    m = m.astype(np.uint8)
    first = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    second = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    third = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return np.concatenate([first, second, third], axis=1)


def _unpack_kscales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`_pack_kscales`: float32 (nb, 8) scales and mins."""
    first, second, third = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = np.concatenate([first & 0x3F, (third & 0x0F) | ((first >> 6) << 4)], axis=1)
    m = np.concatenate([second & 0x3F, (third >> 4) | ((second >> 6) << 4)], axis=1)
    return sc.astype(np.float32), m.astype(np.float32)


def _pack_nibbles_k(q: np.ndarray) -> np.ndarray:
    """(nb, 256) levels -> 128 bytes: per 64 values, low nibbles hold the first 32, high nibbles the next."""
    q = (q.astype(np.uint8) & 0x0F).reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _unpack_nibbles_k(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([q & 0x0F, q >> 4], axis=2).reshape(-1, 256)


def _kasym_dequant(d, dmin, sc, m, q) -> np.ndarray:
    nb = q.shape[0]
    step = (d[:, None] * sc)[:, :, None]
    offset = (dmin[:, None] * m)[:, :, None]
    return (step * q.reshape(nb, 8, 32).astype(np.float32) - offset).reshape(nb, 256)


def _q4_k_quantize(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _kquant_asym(x, 15)
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), _pack_kscales(sc, m), _pack_nibbles_k(q)], axis=1)


def _q4_k_dequantize(b: np.ndarray) -> np.ndarray:
    sc, m = _unpack_kscales(b[:, 4:16])
    return _kasym_dequant(_fp16_value(b[:, 0:2]), _fp16_value(b[:, 2:4]), sc, m, _unpack_nibbles_k(b[:, 16:]))


def _q5_k_quantize(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _kquant_asym(x, 31)
    qi = q.astype(np.uint8).reshape(-1, 8, 32)
    qh = np.bitwise_or.reduce((qi >> 4) << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
    return np.concatenate(
        [_fp16_bytes(d), _fp16_bytes(dmin), _pack_kscales(sc, m), qh, _pack_nibbles_k(q)], axis=1
    )


def _q5_k_dequantize(b: np.ndarray) -> np.ndarray:
    sc, m = _unpack_kscales(b[:, 4:16])
    high = (b[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # (nb, 8, 32)
    q = _unpack_nibbles_k(b[:, 48:]) | (high.reshape(-1, 256) << 4)
    return _kasym_dequant(_fp16_value(b[:, 0:2]), _fp16_value(b[:, 2:4]), sc, m, q)


def _q6_k_quantize(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    s = _fit_scale_sym(sub, -32, 31).reshape(nb, 16)
    # Super-block step: the largest-magnitude sub-block scale maps to code -128 (int8's extra level).
    smax = _signed_absmax(s)
    d = _to_fp16_checked(_min_fp16_step(smax / np.float32(-128)), "scale")
    inv = np.zeros_like(d)
    np.divide(np.float32(1), d, out=inv, where=d != 0)
    sc = np.clip(np.rint(s * inv[:, None]), -128, 127)

    def levels_for(d: np.ndarray) -> np.ndarray:
        step = (d[:, None] * sc).reshape(-1)
        return _levels(sub, step, np.zeros_like(step), -32, 31).reshape(nb, 256)

    def sq_err(d: np.ndarray, q: np.ndarray) -> np.ndarray:
        r = ((d[:, None] * sc)[:, :, None] * q.reshape(nb, 16, 16)).reshape(nb, 256) - x
        return _rowdot(r, r)

    q = levels_for(d)
    err = sq_err(d, q)
    u = (sc[:, :, None] * q.reshape(nb, 16, 16)).reshape(nb, 256)
    suu = _rowdot(u, u)
    d2 = np.where(suu > 0, _rowdot(u, x) / np.where(suu > 0, suu, 1), d)
    d2 = _to_fp16_checked(d2, "scale")
    q2 = levels_for(d2)
    use2 = sq_err(d2, q2) < err
    d = np.where(use2, d2, d)
    q = np.where(use2[:, None], q2, q)

    u = (q + 32).astype(np.uint8).reshape(nb, 2, 128)  # two halves of 128 values
    ql = (u[:, :, :64] & 0x0F) | ((u[:, :, 64:] & 0x0F) << 4)  # (nb, 2, 64)
    hi = (u >> 4).reshape(nb, 2, 4, 32)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # (nb, 2, 32)
    return np.concatenate(
        [ql.reshape(nb, 128), qh.reshape(nb, 64), sc.astype(np.int8).view(np.uint8), _fp16_bytes(d)], axis=1
    )


def _q6_k_dequantize(b: np.ndarray) -> np.ndarray:
    nb = b.shape[0]
    ql = b[:, :128].reshape(nb, 2, 1, 64)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(nb, 2, 4, 32)
    qh = b[:, 128:192].reshape(nb, 2, 1, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]) & 0x03
    q = (low | (high << 4)).reshape(nb, 16, 16).astype(np.float32) - np.float32(32)
    sc = b[:, 192:208].view(np.int8).astype(np.float32)
    d = _fp16_value(b[:, 208:210])
    return ((d[:, None] * sc)[:, :, None] * q).reshape(nb, 256)


QUANT_TYPES: dict[GGMLQuantizationType, _Format] = {
    GGMLQuantizationType.Q8_0: _Format(32, 34, _q8_0_quantize, _q8_0_dequantize),
    GGMLQuantizationType.Q5_0: _Format(32, 22, _q5_0_quantize, _q5_0_dequantize),
    GGMLQuantizationType.Q5_1: _Format(32, 24, _q5_1_quantize, _q5_1_dequantize),
    GGMLQuantizationType.Q4_K: _Format(QK_K, 144, _q4_k_quantize, _q4_k_dequantize),
    GGMLQuantizationType.Q5_K: _Format(QK_K, 176, _q5_k_quantize, _q5_k_dequantize),
    GGMLQuantizationType.Q6_K: _Format(QK_K, 210, _q6_k_quantize, _q6_k_dequantize),
}
"""The block types glmq quantizes itself, with (values per block, bytes per block, quantize, dequantize)."""


def _format(qtype: GGMLQuantizationType) -> _Format:
    fmt = QUANT_TYPES.get(qtype)
    if fmt is None:
        valid = ", ".join(t.name for t in QUANT_TYPES)
        name = getattr(qtype, "name", repr(qtype))
        raise GlmqError(f"glmq cannot quantize GGUF type {name}; valid types: {valid}")
    return fmt


def block_size(qtype: GGMLQuantizationType) -> int:
    """Values per block of ``qtype``: a row length must be a multiple of it."""
    return _format(qtype).block


def quantize(array: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Quantize a 2-D float array (rows, cols) to ``qtype``'s raw blocks.

    Returns uint8 ``(rows, cols // block * block_bytes)``, ready for
    ``GGUFWriter.add_tensor(name, raw, raw_dtype=qtype)``. ``cols`` must be a multiple of the block size
    (32 for Q8_0/Q5_0/Q5_1, 256 for the K types); values must be finite.
    """
    fmt = _format(qtype)
    x = np.asarray(array)
    if x.ndim != 2:
        raise GlmqError(f"GGUF {qtype.name} quantization takes a 2-D array (rows, cols); got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise GlmqError(f"GGUF {qtype.name} quantization takes a float array; got {x.dtype}")
    rows, cols = x.shape
    if cols % fmt.block:
        raise GlmqError(
            f"GGUF {qtype.name} needs rows whose length is a multiple of {fmt.block}; got {cols} columns "
            f"(shape {x.shape})"
        )
    out = np.empty((rows, cols // fmt.block * fmt.nbytes), dtype=np.uint8)
    step = max(1, _CHUNK_VALUES // max(cols, 1))
    for r0 in range(0, rows, step):
        chunk = np.ascontiguousarray(x[r0 : r0 + step], dtype=np.float32)
        if not np.isfinite(chunk).all():
            raise GlmqError(f"cannot quantize to GGUF {qtype.name}: the tensor holds NaN or infinite values")
        blocks = chunk.reshape(-1, fmt.block)
        out[r0 : r0 + step] = fmt.quantize(blocks).reshape(chunk.shape[0], -1)
    return out


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Inverse of :func:`quantize`: uint8 ``(rows, nbytes)`` -> float32 ``(rows, cols)``."""
    fmt = _format(qtype)
    b = np.asarray(raw)
    if b.dtype != np.uint8 or b.ndim != 2 or b.shape[1] % fmt.nbytes:
        raise GlmqError(
            f"GGUF {qtype.name} raw data must be uint8 (rows, k*{fmt.nbytes}); got {b.dtype} {b.shape}"
        )
    rows = b.shape[0]
    blocks = np.ascontiguousarray(b).reshape(-1, fmt.nbytes)
    return fmt.dequantize(blocks).reshape(rows, -1)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB of numpy arrays: :func:`glmq.quant.metrics.sqnr_db`."""
    from glmq.quant.metrics import sqnr_db as _sqnr_db

    return _sqnr_db(np.asarray(reference), np.asarray(approx))


# ----------------------------------------------------------------------------------------------------------
# Type plans

_F32 = GGMLQuantizationType.F32
_BF16 = GGMLQuantizationType.BF16
_Q4_K = GGMLQuantizationType.Q4_K
_Q6_K = GGMLQuantizationType.Q6_K

# When a row length is not a multiple of 256, llama.cpp swaps a K type for a 32-block type of similar size.
_K_FALLBACK = {
    GGMLQuantizationType.Q4_K: GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q5_K: GGMLQuantizationType.Q5_1,
    GGMLQuantizationType.Q6_K: GGMLQuantizationType.Q8_0,
}

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's layer choice for extra bits: the first and last eighth, and every third layer between."""
    eighth = n_layers // 8
    return layer < eighth or layer >= 7 * n_layers // 8 or (layer - eighth) % 3 == 2


def _fit_row_length(qtype: GGMLQuantizationType, cols: int) -> GGMLQuantizationType:
    if cols % block_size(qtype) == 0:
        return qtype
    fallback = _K_FALLBACK.get(qtype)
    if fallback is not None and cols % block_size(fallback) == 0:
        return fallback
    return _BF16  # llama.cpp falls back to F16; the checkpoint is bf16, so BF16 loses nothing


def q4_k_m_plan(shapes: Mapping[str, Sequence[int]]) -> dict[str, GGMLQuantizationType]:
    """GGUF type per tensor for a Q4_K_M export of the AR, following llama.cpp's Q4_K_M mix.

    ``shapes`` maps GGUF tensor names (see :mod:`glmq.quant.formats.gguf.names`) to PyTorch shapes
    ``(rows, cols)``; ``cols`` is the contiguous dimension that blocks run along. Rules:

    - 1-D tensors (norms, biases) stay F32; so does anything named ``*_norm.weight``.
    - The image side (``v.*``: vision tower, VQ codebook) is kept in BF16: it only runs for
      image-to-image and the codebook's cosine nearest-neighbour search is sensitive to noise.
    - ``output.weight`` (the lm_head): Q6_K.
    - ``blk.N.attn_v.weight`` and ``blk.N.ffn_down.weight``: Q6_K in the layers llama.cpp gives more bits
      (the first and last eighth of the layers and every third layer in between), Q4_K elsewhere.
    - Everything else 2-D (``token_embd``, q/k/o projections, the fused ``ffn_up``): Q4_K.
    - A row length that is not a multiple of 256 takes llama.cpp's fallback: Q4_K -> Q5_0,
      Q6_K -> Q8_0 (GLM-Image's ``ffn_down`` rows are 13696 long); BF16 if even 32 does not divide it.
    """
    blocks = {int(m.group(1)) for name in shapes if (m := _BLOCK_RE.match(name))}
    n_layers = max(blocks) + 1 if blocks else 0
    plan: dict[str, GGMLQuantizationType] = {}
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2 or not name.endswith(".weight") or name.endswith("_norm.weight"):
            plan[name] = _F32
            continue
        if name.startswith("v."):
            plan[name] = _BF16
            continue
        qtype = _Q4_K
        m = _BLOCK_RE.match(name)
        if name == "output.weight":
            qtype = _Q6_K
        elif m and (name.endswith(".attn_v.weight") or name.endswith(".ffn_down.weight")):
            if _more_bits(int(m.group(1)), n_layers):
                qtype = _Q6_K
        plan[name] = _fit_row_length(qtype, shape[-1])
    return plan


# DiT tensors kept out of quantization: the conditioning embedders and the final projection are small and
# sit where errors reach every token (ComfyUI-GGUF keeps the same roles in high precision).
_DIT_KEEP = (
    "time_condition_embed.",
    "image_projector.",
    "glyph_projector.",
    "prior_projector.",
    "prior_token_embedding.",
    "norm_out.",
    "proj_out.",
)


def dit_plan(shapes: Mapping[str, Sequence[int]], qtype: GGMLQuantizationType) -> dict[str, GGMLQuantizationType]:
    """GGUF type per DiT tensor (diffusers names, ComfyUI-GGUF layout): 1-D tensors F32, the conditioning
    embedders/projectors and the output layer BF16, every other 2-D weight ``qtype`` (with llama.cpp's
    32-block fallback when a row length is not a multiple of 256)."""
    _format(qtype)
    plan: dict[str, GGMLQuantizationType] = {}
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2:
            plan[name] = _F32
        elif name.startswith(_DIT_KEEP) or len(shape) != 2:
            plan[name] = _BF16
        else:
            plan[name] = _fit_row_length(qtype, shape[-1])
    return plan
