"""Triton kernels behind :mod:`glmq.kernels.attention` (host code lives there).

Three kernels:

- ``_attn_fwd_kernel``: flash-attention forward (online softmax, one program per BLOCK_M query rows of one
  (batch, query head)). Handles GQA (the key/value head is ``h // GROUP``), any sequence lengths, causal
  masking aligned to the bottom right (queries are the last ``Sq`` of the ``seq_k`` valid keys), a key padding
  mask, a per-batch valid key count ``kv_len``, and the SageAttention-style 8-bit modes: Q quantized per token
  in registers, K pre-quantized per QUANT_BLOCK_N rows after mean smoothing, P.V in bf16/fp16 or fp8.
- ``_attn_decode_kernel`` + ``_attn_decode_combine_kernel``: flash-decoding for one query token. One program
  handles all GROUP query heads of a key/value head (so K/V are read once for the group) over one slice of the
  cache; a second kernel merges the slices' partial softmax states.

Numerics: scores are kept in the log2 domain (``exp2`` with ``log2(e)`` folded into the scale), accumulators are
fp32, rows with no visible key produce zeros (never NaN).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _round_half_away(x):
    # Round to nearest, ties away from zero: identical in the interpreter and on the GPU, and easy to mirror in
    # the torch reference (libdevice's rint is not available under TRITON_INTERPRET).
    return tl.where(x >= 0, tl.floor(x + 0.5), tl.ceil(x - 0.5))


@triton.jit
def _to_fp8(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    # The Triton 3.9 interpreter's fp32 -> e4m3 cast loses the carry when rounding crosses a power of two
    # (125 -> 64). Under the interpreter only, snap x to the e4m3 grid in fp32 first so the cast is exact.
    if INTERPRET:
        ax = tl.abs(x)
        step = tl.math.exp2(tl.floor(tl.math.log2(tl.maximum(ax, 0.015625))) - 3.0)
        r = ax / step
        f = tl.floor(r)
        # round half to even, as the GPU's cvt.rn does (ties are common: bf16 inputs have few mantissa bits)
        up = (r - f > 0.5) | ((r - f == 0.5) & (f - 2.0 * tl.floor(f * 0.5) == 1.0))
        r = tl.minimum(tl.where(up, f + 1.0, f) * step, 448.0)
        x = tl.where(x < 0, -r, r)
    return x.to(dtype)


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    # The Triton 3.9 interpreter truncates fp32 -> bf16 (biased: about twice the error of the GPU's
    # round-to-nearest-even cvt.rn). Under the interpreter only, round to nearest even on the bits first.
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, INTERPRET: tl.constexpr):
    # INTERPRET (set by the host under TRITON_INTERPRET only): the Triton 3.9 interpreter multiplies bf16 tiles
    # as their raw uint16 bits; widen every operand to fp32 first, which is exact (int8 sums stay below 2^24).
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE or INTERPRET:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load_kv_tile(ptr, desc, b, hk, start_n, stride_n, stride_d, seq_k,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """[BLOCK_N, BLOCK_D] rows start_n.. of a K or V head; rows past seq_k read as zeros when MASKED."""
    if USE_TMA:
        return desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        cols = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        ptrs = ptr + cols[:, None] * stride_n + offs_d[None, :] * stride_d
        if MASKED:
            return tl.load(ptrs, mask=(cols[:, None] < seq_k) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        elif BLOCK_D != HEAD_DIM:
            return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _scores(q, k, DOT_IEEE: tl.constexpr, QUANT: tl.constexpr, INTERPRET: tl.constexpr):
    """S = Q K^T, as fp32. For int8 returns S + 1.5 * 2^23 (see _tile_scale)."""
    qk = _dot(q, tl.trans(k), None, DOT_IEEE, INTERPRET)
    if QUANT:
        if INTERPRET:
            qk = qk.to(tl.int32)  # the interpreter's dot ran in fp32 (exact here)
        # int32 -> fp32 without I2F, which shares the 16/clk/SM unit with exp2 and would cancel the cheaper
        # int8 MMA: |S| <= 127 * 127 * 256 < 2^22, so adding the bits of 1.5 * 2^23 and reinterpreting gives
        # exactly 1.5 * 2^23 + S. _tile_scale folds the offset into the per-tile bias.
        qk = (qk + 0x4B400000).to(tl.float32, bitcast=True)
    return qk


@triton.jit
def _tile_scale(row_scale, ks_ptr, start_n, QUANT_BLOCK_N: tl.constexpr, QUANT: tl.constexpr):
    """(scale, bias): the tile's log2-domain scores are qk * scale - bias (per row when QUANT, else scalar)."""
    if QUANT:
        # Q's per-token scale x the scale of the K block holding this tile (BLOCK_N divides QUANT_BLOCK_N).
        s_scale = row_scale * tl.load(ks_ptr + start_n // QUANT_BLOCK_N)
        return s_scale, 12582912.0 * s_scale
    else:
        return row_scale, 0.0


@triton.jit
def _softmax_step(qk, s_scale, s_bias, m_i, l_i, cols, rows_pos, seq_k, kpm_ptr,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, QUANT: tl.constexpr,
                  P_SHIFT: tl.constexpr):
    """Online softmax in the log2 domain: (P scaled by 2^P_SHIFT, alpha, new m, new l)."""
    if MASKED or HAS_KPM:
        valid = cols[None, :] < seq_k
        if CAUSAL and MASKED:
            valid = valid & (cols[None, :] <= rows_pos[:, None])
        if HAS_KPM:
            keep = tl.load(kpm_ptr + cols, mask=cols < seq_k, other=0)
            valid = valid & (keep[None, :] != 0)
        if QUANT:
            qk = tl.where(valid, qk * s_scale[:, None] - s_bias[:, None], float("-inf"))
        else:
            qk = tl.where(valid, qk * s_scale, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen no visible key keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = tl.math.exp2(qk - (m_shift - P_SHIFT)[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
    elif QUANT:
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * s_scale - s_bias)
        p = tl.math.exp2(qk * s_scale[:, None] - (m_ij + s_bias - P_SHIFT)[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
    else:
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * s_scale)
        p = tl.math.exp2(qk * s_scale - (m_ij - P_SHIFT)[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
    return p, alpha, m_ij, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _pv_step(acc, p, alpha, v_ptr, desc_v, b, hk, start_n, stride_vn, stride_vd, seq_k,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
             PV_FP8: tl.constexpr, USE_TMA: tl.constexpr, DOT_IEEE: tl.constexpr, INTERPRET: tl.constexpr):
    acc = acc * alpha[:, None]
    if PV_FP8:
        # V is stored transposed ([D, S], keys contiguous, zero-padded) so the fp8 MMA reads it K-major; P
        # already carries the 448 scale (folded into exp2), which the cast to e4m3 needs.
        if USE_TMA:
            v = tl.trans(desc_v.load([b, hk, 0, start_n]).reshape(BLOCK_D, BLOCK_N))
        else:
            cols = start_n + tl.arange(0, BLOCK_N)
            offs_d = tl.arange(0, BLOCK_D)
            v = tl.trans(tl.load(v_ptr + offs_d[:, None] * stride_vd + cols[None, :] * stride_vn))
        return tl.dot(_to_fp8(p, v.dtype, INTERPRET), v, acc)
    else:
        v = _load_kv_tile(v_ptr, desc_v, b, hk, start_n, stride_vn, stride_vd, seq_k,
                          HEAD_DIM, BLOCK_D, BLOCK_N, MASKED, USE_TMA)
        return _dot(_cast(p, v.dtype, INTERPRET), v, acc, DOT_IEEE, INTERPRET)


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, row_scale,
    k_ptr, v_ptr, ks_ptr, kpm_ptr, desc_k, desc_v,
    b, hk, stride_kn, stride_kd, stride_vn, stride_vd,
    rows_pos, seq_k, lo, hi,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, QUANT: tl.constexpr,
    PV_FP8: tl.constexpr, USE_TMA: tl.constexpr, DOT_IEEE: tl.constexpr, INTERPRET: tl.constexpr,
    QUANT_BLOCK_N: tl.constexpr,
):
    P_SHIFT: tl.constexpr = 8.807354922057604 if PV_FP8 else 0.0  # log2(448)
    offs_n = tl.arange(0, BLOCK_N)
    # Note: issuing the next tile's Q.K^T before this tile's softmax does not overlap them: Triton 3.x waits on
    # each wgmma right after issuing it unless its result only feeds another MMA. Overlap comes from running two
    # CTAs per SM instead (BLOCK_M=64 configs).
    for start_n in tl.range(lo, hi, BLOCK_N):
        k = _load_kv_tile(k_ptr, desc_k, b, hk, start_n, stride_kn, stride_kd, seq_k,
                          HEAD_DIM, BLOCK_D, BLOCK_N, MASKED, USE_TMA)
        qk = _scores(q, k, DOT_IEEE, QUANT, INTERPRET)
        s_scale, s_bias = _tile_scale(row_scale, ks_ptr, start_n, QUANT_BLOCK_N, QUANT)
        p, alpha, m_i, l_i = _softmax_step(qk, s_scale, s_bias, m_i, l_i, start_n + offs_n, rows_pos, seq_k,
                                           kpm_ptr, MASKED, CAUSAL, HAS_KPM, QUANT, P_SHIFT)
        acc = _pv_step(acc, p, alpha, v_ptr, desc_v, b, hk, start_n, stride_vn, stride_vd, seq_k,
                       HEAD_DIM, BLOCK_D, BLOCK_N, MASKED, PV_FP8, USE_TMA, DOT_IEEE, INTERPRET)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, KPM, KVLEN, KSCALE, VSCALE,
    desc_k, desc_v,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_ksb, stride_ksh, stride_vsb, stride_vsh,
    HQ, HKV, SEQ_Q, SEQ_K, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_KVLEN: tl.constexpr,
    QUANT: tl.constexpr, PV_FP8: tl.constexpr, USE_TMA: tl.constexpr, DOT_IEEE: tl.constexpr,
    INTERPRET: tl.constexpr, QUANT_BLOCK_N: tl.constexpr,
):
    # QUANT: int8 Q.K^T (K pre-quantized by _quant_k_kernel); PV_FP8: e4m3 P.V with V pre-quantized per channel.
    start_m = tl.program_id(0)
    if CAUSAL:
        # Bottom rows see the most keys: launch them first so the longest programs do not form the tail.
        start_m = tl.num_programs(0) - 1 - start_m
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP

    seq_k = SEQ_K
    if HAS_KVLEN:
        seq_k = tl.minimum(tl.load(KVLEN + b), SEQ_K)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < SEQ_Q) & d_ok[None, :], other=0.0)

    row_scale = qk_scale
    if QUANT:
        # SageAttention-style, at per-token granularity: each Q row gets its own int8 scale, quantized in
        # registers (Q is read once per program). It costs nothing extra: the softmax scales per row anyway.
        q_s = tl.maximum(tl.max(tl.abs(q.to(tl.float32)), 1), 1e-30) / 127.0
        q = _round_half_away(q.to(tl.float32) / q_s[:, None]).to(tl.int8)
        row_scale = qk_scale * q_s

    k_ptr = K + b * stride_kb + hk * stride_kh
    v_ptr = V + b * stride_vb + hk * stride_vh
    ks_ptr = KSCALE + b * stride_ksb + hk * stride_ksh
    kpm_ptr = KPM + b * stride_mb

    # Query row i sits at key position i + (seq_k - SEQ_Q): causal masks align to the bottom right.
    rows_pos = offs_m + (seq_k - SEQ_Q)
    n_full = (seq_k // BLOCK_N) * BLOCK_N
    n_end = seq_k
    if CAUSAL:
        first_pos = start_m * BLOCK_M + (seq_k - SEQ_Q)
        n_full = tl.minimum(n_full, (tl.maximum(first_pos + 1, 0) // BLOCK_N) * BLOCK_N)
        n_end = tl.maximum(tl.minimum(seq_k, first_pos + BLOCK_M), 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Blocks fully inside the visible region: no bounds or causal masks (key padding still applies).
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, row_scale, k_ptr, v_ptr, ks_ptr, kpm_ptr, desc_k, desc_v,
        b, hk, stride_kn, stride_kd, stride_vn, stride_vd, rows_pos, seq_k, 0, n_full,
        HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, HAS_KPM, QUANT, PV_FP8, USE_TMA, DOT_IEEE, INTERPRET, QUANT_BLOCK_N,
    )
    # The diagonal and the ragged tail.
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, row_scale, k_ptr, v_ptr, ks_ptr, kpm_ptr, desc_k, desc_v,
        b, hk, stride_kn, stride_kd, stride_vn, stride_vd, rows_pos, seq_k, n_full, n_end,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_KPM, QUANT, PV_FP8, USE_TMA, DOT_IEEE, INTERPRET, QUANT_BLOCK_N,
    )

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if PV_FP8:
        v_s = tl.load(VSCALE + b * stride_vsb + hk * stride_vsh + offs_d, mask=d_ok, other=0.0)
        out = out * v_s[None, :]  # P's 448 scale cancels against l, which summed the same scaled P
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, _cast(out, O.dtype.element_ty, INTERPRET), mask=(offs_m[:, None] < SEQ_Q) & d_ok[None, :])


@triton.jit
def _quant_k_kernel(
    K, MEAN, KQ, KS,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_qb, stride_qh, stride_qn,
    stride_sb, stride_sh,
    HKV, SEQ_K,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # K - mean(K) over the sequence (per batch and head; softmax-invariant since it shifts every score of a
    # query row by the same q.mean), then one int8 scale per BLOCK_N keys. Rows past SEQ_K are written as zeros.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_n[:, None] < SEQ_K) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + pid_bh * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
    k = tl.where(ok, k - mean[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(k), 1), 0)
    s = tl.maximum(amax, 1e-30) / 127.0
    kq = _round_half_away(k / s).to(tl.int8)
    tl.store(KQ + b * stride_qb + h * stride_qh + offs_n[:, None] * stride_qn + offs_d[None, :], kq,
             mask=offs_d[None, :] < HEAD_DIM)
    tl.store(KS + b * stride_sb + h * stride_sh + pid_n, s)


@triton.jit
def _attn_decode_kernel(
    Q, K, V, KPM, KVLEN, OP, MP, LP,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb,
    HKV, SEQ_K, CHUNK, NUM_SPLITS, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_KPM: tl.constexpr, HAS_KVLEN: tl.constexpr, DOT_IEEE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # One program: the GROUP query heads of key/value head hk (padded to BLOCK_H rows, >= 16 for the MMA),
    # keys [split * CHUNK, (split + 1) * CHUNK). Writes unnormalized partial outputs and their softmax state.
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    offs_g = tl.arange(0, BLOCK_H)
    g_ok = offs_g < GROUP
    heads = hk * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)

    seq_k = SEQ_K
    if HAS_KVLEN:
        seq_k = tl.minimum(tl.load(KVLEN + b), SEQ_K)
    lo = pid_s * CHUNK
    hi = tl.minimum(lo + CHUNK, seq_k)

    k_ptr = K + b * stride_kb + hk * stride_kh
    v_ptr = V + b * stride_vb + hk * stride_vh
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < hi
        k = tl.load(k_ptr + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_ptr + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        qk = _dot(q, tl.trans(k), None, DOT_IEEE, INTERPRET)
        valid = n_ok
        if HAS_KPM:
            keep = tl.load(KPM + b * stride_mb + cols, mask=n_ok, other=0)
            valid = valid & (keep != 0)
        qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        m_shift = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = tl.math.exp2(qk - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot(_cast(p, v.dtype, INTERPRET), v, acc * alpha[:, None], DOT_IEEE, INTERPRET)
        m_i = m_ij

    # Partials: [B, HQ, NUM_SPLITS, D] and [B, HQ, NUM_SPLITS], contiguous.
    row = (b * HKV * GROUP + heads) * NUM_SPLITS + pid_s
    tl.store(OP + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])
    tl.store(MP + row, m_i, mask=g_ok)
    tl.store(LP + row, l_i, mask=g_ok)


@triton.jit
def _attn_decode_combine_kernel(
    OP, MP, LP, O,
    stride_ob, stride_oh, stride_od,
    HQ, NUM_SPLITS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)  # b * HQ + h
    b = pid // HQ
    h = pid % HQ
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m = tl.load(MP + pid * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    l = tl.load(LP + pid * NUM_SPLITS + offs_s, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_shift = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_shift)
    l_sum = tl.sum(w * l, 0)
    part = tl.load(OP + (pid * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                   mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.where(l_sum == 0.0, 1.0, l_sum)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d * stride_od, _cast(out, O.dtype.element_ty, INTERPRET),
             mask=d_ok)


@triton.jit
def _quant_v_kernel(
    V, VS, VT,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_tb, stride_th, stride_td,
    HKV, SEQ_K,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
):
    # V / (per-channel absmax / 448) -> e4m3, written transposed ([D, S], keys contiguous) for the K-major fp8
    # MMA of P.V. Padded rows and channels are written as zeros.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=(offs_n[:, None] < SEQ_K) & d_ok[None, :], other=0.0).to(tl.float32)
    vs = tl.load(VS + pid_bh * HEAD_DIM + offs_d, mask=d_ok, other=1.0)
    vq = _to_fp8(v / vs[None, :], VT.dtype.element_ty, INTERPRET)
    tl.store(VT + b * stride_tb + h * stride_th + offs_d[None, :] * stride_td + offs_n[:, None], vq)
