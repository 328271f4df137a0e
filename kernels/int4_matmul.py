"""W4A16 matmul: bf16/fp16 activations times int4 weights packed two codes per byte.

Stored layout (glmq's ``int4`` format) of an ``nn.Linear`` weight ``W [N, K]``:

- ``qweight`` uint8 ``[N, K // 2]``: ``byte[n, j] = q[n, 2j] | q[n, 2j + 1] << 4`` (low nibble = even k),
  codes 0..15;
- ``scale`` ``[N, K // G]`` (bfloat16 as stored; float16/float32 accepted), ``G`` in 32/64/128;
- ``zero`` ``[N, K // G]`` float or None: ``w = (q - zero) * scale``, or ``(q - 8) * scale`` when None.

``int4_matmul(x, ...)`` returns ``x @ W.T (+ bias)`` in ``x.dtype`` for ``x [..., K]``, with one of three Triton
kernels:

- a GEMV for M <= 16 rows (AR decode of up to 16 sequences), memory-bound: it must stream the packed weights
  at close to HBM bandwidth, so it splits K across programs when N alone gives too few of them to fill the chip, and
  reduces the split partial sums inside the same launch (the last program of each N-tile to finish adds
  them up in a fixed order: deterministic, one launch, CUDA-graph safe). ``_int4_gemv_tc_kernel`` (N > 1024)
  unpacks with inline PTX, rounds (q - z) to the activation dtype and multiplies on the tensor cores (x padded
  to 16 rows), scaling each K-tile's fp32 result; ``_int4_gemv_kernel`` (N <= 1024 and M <= 4, where both
  are launch-bound) multiplies on the CUDA cores in fp32 without rounding the weights.
- ``_int4_gemm_kernel`` for M > 16 (prefill): tiles of W are dequantized in registers to the activation
  dtype and fed to ``tl.dot`` with fp32 accumulation.

Tiles and splits come from measurements on an H100 (``benchmarks/bench_qmatmul.py``). ``int4_matmul`` is the
``torch.library`` custom op ``glmq::int4_matmul`` (registered when this module is first imported), with a
fake implementation so torch.compile and CUDA graphs can trace it; eager calls skip the dispatcher. It runs
on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests). ``int4_matmul_ref`` is the
pure-torch reference with the same signature.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ._ops import custom_op_once

__all__ = ["int4_matmul", "int4_matmul_ref", "int4_dequantize", "GEMV_MAX_ROWS", "FMA_MAX_ROWS", "GROUP_SIZES"]

GROUP_SIZES = (32, 64, 128)
# M <= 16 takes a GEMV kernel (one decode step of up to 16 sequences), larger M the tensor-core GEMM. The
# tensor-core GEMV pads the rows to the MMA's width (16) anyway, so up to 16 rows read the weights once. On an
# H200 the GEMM took 40-205 us per AR layer at M = 8 and 16, against 12-50 us for the GEMV at M = 4
# (benchmarks/results/int4_gemv_libraries_h200). The CUDA-core GEMV keeps M <= FMA_MAX_ROWS.
GEMV_MAX_ROWS = 16
FMA_MAX_ROWS = 4

# Bit pattern of the float 2.0**7: a 4-bit code OR-ed into mantissa bits 16..19 makes the float 128 + code.
_MAGIC7 = tl.constexpr(0x43000000)


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _int4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, lock_ptr,
    N, K, stride_xm, stride_wn, stride_sn, stride_om, tiles_per_split,
    M_ROWS: tl.constexpr, M_PAD: tl.constexpr, GROUP: tl.constexpr, GROUPS_PER_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    # Program (pid_n, pid_k): rows [pid_n * BLOCK_N, +BLOCK_N) of W, K-tiles [pid_k * tiles_per_split, +tiles).
    # A K-tile is GROUPS_PER_TILE whole quantization groups, held as [BLOCK_N, GROUPS_PER_TILE, GROUP // 2]
    # bytes.
    HALF: tl.constexpr = GROUP // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_groups = K // GROUP
    num_tiles = tl.cdiv(num_groups, GROUPS_PER_TILE)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Clamp instead of masking: every weight load stays in bounds and unpredicated; only the store is masked.
    rows = tl.minimum(offs_n, N - 1)
    offs_g = tl.arange(0, GROUPS_PER_TILE)
    offs_j = tl.arange(0, HALF)
    offs_c = tl.arange(0, GROUP)
    offs_m = tl.arange(0, M_PAD)
    # Accumulators hold per-thread partial sums, one per 32 consecutive k of a row (CHUNKS of them per tile),
    # in the register layout of the weight tile: the loop body needs no cross-thread reduction and no layout
    # conversion (shared-memory round trip and barriers). One accumulator per activation row.
    CHUNKS: tl.constexpr = GROUPS_PER_TILE * GROUP // 32
    acc0 = tl.zeros([BLOCK_N, CHUNKS], dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0

    t_begin = pid_k * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, num_tiles)
    for t in range(t_begin, t_end):
        g = t * GROUPS_PER_TILE + offs_g
        gc = tl.minimum(g, num_groups - 1)  # a ragged last tile re-reads the last group, weighted by 0 below
        w_off = rows[:, None, None] * stride_wn + gc[None, :, None] * HALF + offs_j[None, None, :]
        packed = tl.load(w_ptr + w_off).to(tl.int32)
        s_off = rows[:, None] * stride_sn + gc[None, :]
        s = tl.load(s_ptr + s_off).to(tl.float32)
        s = tl.where((g < num_groups)[None, :], s, 0.0)
        if HAS_ZERO:
            zs = (128.0 + tl.load(z_ptr + s_off).to(tl.float32)) * s
        else:  # symmetric: z = 8
            zs = 136.0 * s
        # int -> float without I2F (a quarter-rate instruction on Hopper that would cap the GEMV below HBM
        # speed): a nibble moved to bits 16..19 under the exponent of 2^7 reads as the float 128 + q, exactly.
        # Then w = (128 + q) s - (128 + z) s is one FMA per weight (its error, ~2^-17 s, is far below bf16's).
        lo = (((packed << 16) & 0xF0000) | _MAGIC7).to(tl.float32, bitcast=True)
        hi = (((packed << 12) & 0xF0000) | _MAGIC7).to(tl.float32, bitcast=True)
        w_lo = tl.fma(lo, s[:, :, None], -zs[:, :, None])
        w_hi = tl.fma(hi, s[:, :, None], -zs[:, :, None])
        # Interleave back to k order inside each thread's registers ([.., HALF, 2] -> [.., GROUP]) and cut
        # into 32-wide chunks (16 bytes, one thread's load): x is then read with contiguous, vectorized loads.
        w = tl.reshape(tl.join(w_lo, w_hi), [BLOCK_N, CHUNKS, 32])
        # x through a [BLOCK_N, CHUNKS, 32] pointer tile that repeats along rows: the load takes the weight
        # tile's layout (each thread reads just the x it multiplies, from L1).
        x_off = tl.reshape(gc[:, None] * GROUP + offs_c[None, :], [CHUNKS, 32])
        x_ptrs = x_ptr + tl.broadcast_to(x_off[None, :, :], [BLOCK_N, CHUNKS, 32])
        acc0 += tl.sum(w * tl.load(x_ptrs).to(tl.float32), axis=2)
        if M_ROWS > 1:
            acc1 += tl.sum(w * tl.load(x_ptrs + stride_xm).to(tl.float32), axis=2)
        if M_ROWS > 2:
            acc2 += tl.sum(w * tl.load(x_ptrs + 2 * stride_xm).to(tl.float32), axis=2)
        if M_ROWS > 3:
            acc3 += tl.sum(w * tl.load(x_ptrs + 3 * stride_xm).to(tl.float32), axis=2)

    acc = tl.where(offs_m[:, None] == 0, tl.sum(acc0, axis=1)[None, :], 0.0)
    if M_ROWS > 1:
        acc += tl.where(offs_m[:, None] == 1, tl.sum(acc1, axis=1)[None, :], 0.0)
    if M_ROWS > 2:
        acc += tl.where(offs_m[:, None] == 2, tl.sum(acc2, axis=1)[None, :], 0.0)
    if M_ROWS > 3:
        acc += tl.where(offs_m[:, None] == 3, tl.sum(acc3, axis=1)[None, :], 0.0)

    out_mask = (offs_m[:, None] < M_ROWS) & (offs_n[None, :] < N)
    if SPLIT_K:
        # Each program stores its partial sums; the last program of this N-tile to arrive (an atomic counter)
        # adds all of them in split order, so the result does not depend on scheduling.
        num_splits = tl.num_programs(1)
        p_off = offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + pid_k * M_PAD * N + p_off, acc, mask=out_mask)
        tl.debug_barrier()  # all threads' partial stores precede the releasing atomic
        arrived = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        is_last = arrived == num_splits - 1
        if is_last:
            acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
            for sp in range(0, num_splits):
                # .cg: read from L2, never from a possibly stale L1 line
                acc += tl.load(part_ptr + sp * M_PAD * N + p_off, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(lock_ptr + pid_n, 0)  # leave the counter at zero for the next launch / graph replay
        # (splat the scalar first: the interpreter mis-types bool-tensor & bool-scalar)
        out_mask = out_mask & ((tl.zeros([M_PAD, BLOCK_N], dtype=tl.int32) + arrived) == num_splits - 1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows).to(tl.float32)[None, :]
    if INTERPRETER:
        if out_ptr.dtype.element_ty == tl.bfloat16:
            # Round to nearest even by hand: Triton's interpreter truncates float32 -> bfloat16.
            bits = acc.to(tl.int32, bitcast=True)
            acc = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    out_off = offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# Four packed bytes -> dequantized weights of their low nibbles ($0, $1) and high nibbles ($2, $3), two 16-bit
# floats per register; $4: the bytes, $5/$6: -zero and $7/$8: scale for elements 0-1/2-3. prmt spreads bytes
# 0,1 (2,3) to the two halves, lop3 ORs each nibble under the exponent of the float whose ulp is 1 (bf16 128,
# fp16 1024), one packed FMA removes that offset exactly, a second subtracts the zero and a third (a product
# plus -0) applies the scale: (q - z) * s rounded twice to the 16-bit type.
_UNPACK_ASM = """
{
.reg .b32 a, b, c, d, one, off, nzero;
mov.b32 one, ONE;
mov.b32 off, OFF;
mov.b32 nzero, 0x80008000;
prmt.b32 a, $4, 0, 0x4140;
prmt.b32 b, $4, 0, 0x4342;
shr.b32 c, a, 4;
shr.b32 d, b, 4;
lop3.b32 a, a, 0x000F000F, MAGIC, 0xEA;
lop3.b32 b, b, 0x000F000F, MAGIC, 0xEA;
lop3.b32 c, c, 0x000F000F, MAGIC, 0xEA;
lop3.b32 d, d, 0x000F000F, MAGIC, 0xEA;
fma.rn.T a, a, one, off;
fma.rn.T b, b, one, off;
fma.rn.T c, c, one, off;
fma.rn.T d, d, one, off;
fma.rn.T a, a, one, $5;
fma.rn.T b, b, one, $6;
fma.rn.T c, c, one, $5;
fma.rn.T d, d, one, $6;
fma.rn.T $0, a, $7, nzero;
fma.rn.T $1, b, $8, nzero;
fma.rn.T $2, c, $7, nzero;
fma.rn.T $3, d, $8, nzero;
}
"""
_UNPACK_ASM_NO_SCALE = (_UNPACK_ASM.replace("fma.rn.T a, a, one, $5;", "fma.rn.T $0, a, one, $5;")
                        .replace("fma.rn.T b, b, one, $6;", "fma.rn.T $1, b, one, $6;")
                        .replace("fma.rn.T c, c, one, $5;", "fma.rn.T $2, c, one, $5;")
                        .replace("fma.rn.T d, d, one, $6;", "fma.rn.T $3, d, one, $6;")
                        .split("fma.rn.T $0, a, $7, nzero;")[0] + "}\n")


def _specialize(asm: str, bf16: bool) -> tl.constexpr:
    if bf16:
        asm = asm.replace("ONE", "0x3F803F80").replace("OFF", "0xC300C300").replace("MAGIC", "0x43004300")
        return tl.constexpr(asm.replace(".T", ".bf16x2"))
    asm = asm.replace("ONE", "0x3C003C00").replace("OFF", "0xE400E400").replace("MAGIC", "0x64006400")
    return tl.constexpr(asm.replace(".T", ".f16x2"))


_UNPACK_BF16 = _specialize(_UNPACK_ASM, True)
_UNPACK_FP16 = _specialize(_UNPACK_ASM, False)
# without the scale: (q - z) only; $0-$3 out, $4 bytes, $5/$6 -zero
_UNPACK_Z_BF16 = _specialize(_UNPACK_ASM_NO_SCALE, True)
_UNPACK_Z_FP16 = _specialize(_UNPACK_ASM_NO_SCALE, False)


@triton.jit
def _int4_gemv_tc_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, K, stride_xm, stride_wn, stride_sn, stride_om, tiles_per_split,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, M_PAD: tl.constexpr,
    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, FOLD_SCALE: tl.constexpr,
    PREFETCH_X: tl.constexpr, PREFETCH_SZ: tl.constexpr, INTERPRETER: tl.constexpr,
):
    # Tensor-core GEMV: out^T [BLOCK_N, M_PAD] = W [BLOCK_N, K-slice] @ x^T, the few activation rows padded to
    # the MMA's minimum width (16). The MMA is free here; each weight costs only its unpacking, about two packed
    # instructions per weight (inline PTX), which keeps the kernel memory-bound. BLOCK_K <= GROUP: one scale and
    # zero per row and K-tile. FOLD_SCALE: the MMA multiplies (q - z) * s rounded to the activation dtype and
    # accumulates across K-tiles; else it multiplies (q - z) and each K-tile's fp32 result is scaled (which
    # keeps the weights in registers as the MMA's A operand instead of staging them through shared memory).
    # PREFETCH_X / PREFETCH_SZ fetch x / scales and zeros a K-tile ahead by hand (the weights are pipelined
    # by Triton), to keep load latency off an iteration's path.
    # Program (pid_n, pid_k): rows [pid_n * BLOCK_N, +BLOCK_N), K-tiles [pid_k * tiles_per_split, +tiles).
    HALF_K: tl.constexpr = BLOCK_K // 2
    # K order inside a tile. A warpgroup MMA wants each thread to hold, per 16-wide k-block, the k pairs
    # (2t, 2t+1) and (2t+8, 2t+9), t = lane % 4. Taking k in the natural order would hand each thread single
    # bytes from all over the tile. Instead, thread t reads R = BLOCK_K / 8 contiguous bytes (its 2R codes)
    # and those become its MMA k slots; x is read in the same permuted order (a sum does not care).
    # Packed byte t*R + r holds codes 2(t*R + r) + h (h = 0 low nibble, 1 high) and goes to MMA column
    # 16*(r // 2) + 8*(r % 2) + 2t + h.
    R: tl.constexpr = BLOCK_K // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)
    offs_m = tl.arange(0, M_PAD)
    col = tl.arange(0, BLOCK_K)  # MMA column -> k within the tile
    k_of_col = 2 * R * ((col % 8) // 2) + 4 * (col // 16) + 2 * ((col % 16) // 8) + col % 2
    byte = tl.arange(0, 4)[:, None] * R + tl.arange(0, R)[None, :]  # [4, R]: thread t's bytes
    num_tiles = K // BLOCK_K  # the host guarantees BLOCK_K <= GROUP and K % BLOCK_K == 0
    t_begin = pid_k * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, num_tiles)
    w_ptrs = w_ptr + rows[:, None, None] * stride_wn + t_begin * HALF_K + byte[None, :, :]
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + k_of_col[:, None]
    x_mask = (offs_m < M)[None, :]
    t0 = tl.minimum(t_begin, num_tiles - 1)
    if PREFETCH_SZ:
        sz_ptrs = rows * stride_sn + (t0 * BLOCK_K) // GROUP
        s_next = tl.load(s_ptr + sz_ptrs)
        if HAS_ZERO:
            z_next = tl.load(z_ptr + sz_ptrs)
    if PREFETCH_X:
        x_next = tl.load(x_ptrs + t0 * BLOCK_K, mask=x_mask, other=0.0)  # [BLOCK_K, M_PAD], MMA column order
    acc = tl.zeros([BLOCK_N, M_PAD], dtype=tl.float32)
    for t in range(t_begin, t_end):
        packed = tl.load(w_ptrs)  # [BLOCK_N, 4, R] uint8
        t1 = tl.minimum(t + 1, num_tiles - 1)
        if PREFETCH_SZ:
            s = s_next.to(tl.float32)
            if HAS_ZERO:
                z = z_next.to(tl.float32)
            sz_ptrs = rows * stride_sn + (t1 * BLOCK_K) // GROUP
            s_next = tl.load(s_ptr + sz_ptrs)
            if HAS_ZERO:
                z_next = tl.load(z_ptr + sz_ptrs)
        else:
            sz_ptrs = rows * stride_sn + (t * BLOCK_K) // GROUP
            s = tl.load(s_ptr + sz_ptrs).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + sz_ptrs).to(tl.float32)
        if not HAS_ZERO:
            z = tl.full([BLOCK_N], 8.0, dtype=tl.float32)
        if PREFETCH_X:
            xt = x_next
            x_next = tl.load(x_ptrs + t1 * BLOCK_K, mask=x_mask, other=0.0)
        else:  # left to Triton's pipeliner
            xt = tl.load(x_ptrs + t * BLOCK_K, mask=x_mask, other=0.0)
        if INTERPRETER:
            # Same numbers without inline PTX: (q - z), then times s, each rounded to the activation dtype
            # (nearest even, by hand for bfloat16, which the interpreter would truncate).
            lo = (packed & 0xF).to(tl.float32) - z[:, None, None]
            hi = (packed >> 4).to(tl.float32) - z[:, None, None]
        else:
            nz = tl.broadcast_to((-z).to(xt.dtype)[:, None, None], [BLOCK_N, 4, R])
            if FOLD_SCALE:
                sc = tl.broadcast_to(s.to(xt.dtype)[:, None, None], [BLOCK_N, 4, R])
                if xt.dtype == tl.bfloat16:
                    lo, hi = tl.inline_asm_elementwise(_UNPACK_BF16, "=r,=r,=r,=r,r,r,r,r,r", [packed, nz, sc],
                                                       dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
                else:
                    lo, hi = tl.inline_asm_elementwise(_UNPACK_FP16, "=r,=r,=r,=r,r,r,r,r,r", [packed, nz, sc],
                                                       dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
            else:
                if xt.dtype == tl.bfloat16:
                    lo, hi = tl.inline_asm_elementwise(_UNPACK_Z_BF16, "=r,=r,=r,=r,r,r,r", [packed, nz],
                                                       dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
                else:
                    lo, hi = tl.inline_asm_elementwise(_UNPACK_Z_FP16, "=r,=r,=r,=r,r,r,r", [packed, nz],
                                                       dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        # [BN, t, r, h] -> [BN, t, r // 2, r % 2, h] -> [BN, r // 2, r % 2, t, h] = MMA column order
        w = tl.reshape(tl.join(lo, hi), [BLOCK_N, 4, R // 2, 2, 2])
        w = tl.reshape(tl.permute(w, (0, 2, 3, 1, 4)), [BLOCK_N, BLOCK_K])
        if INTERPRETER:
            if xt.dtype == tl.bfloat16:
                bits = w.to(tl.int32, bitcast=True)
                w = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
            else:
                w = w.to(xt.dtype).to(tl.float32)
            if FOLD_SCALE:
                if xt.dtype == tl.bfloat16:
                    sb = s.to(tl.int32, bitcast=True)  # the scale as the 16-bit type holds it
                    sb = ((sb + 0x7FFF + ((sb >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
                    w = w * sb[:, None]
                    bits = w.to(tl.int32, bitcast=True)
                    w = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
                else:
                    w = (w * s.to(xt.dtype).to(tl.float32)[:, None]).to(xt.dtype).to(tl.float32)
                acc = tl.dot(w, xt.to(tl.float32), acc, input_precision="ieee")
            else:
                acc += s[:, None] * tl.dot(w, xt.to(tl.float32), input_precision="ieee")
        elif FOLD_SCALE:
            acc = tl.dot(w, xt, acc)
        else:
            acc += s[:, None] * tl.dot(w, xt)
        w_ptrs += HALF_K

    out_mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    if SPLIT_K:
        num_splits = tl.num_programs(1)
        p_off = offs_m[None, :] * N + offs_n[:, None]
        tl.store(part_ptr + pid_k * M_PAD * N + p_off, acc, mask=out_mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:
            acc = tl.zeros([BLOCK_N, M_PAD], dtype=tl.float32)
            for sp in range(0, num_splits):
                acc += tl.load(part_ptr + sp * M_PAD * N + p_off, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(lock_ptr + pid_n, 0)
        out_mask = out_mask & ((tl.zeros([BLOCK_N, M_PAD], dtype=tl.int32) + arrived) == num_splits - 1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows).to(tl.float32)[:, None]
    if INTERPRETER:
        if out_ptr.dtype.element_ty == tl.bfloat16:
            bits = acc.to(tl.int32, bitcast=True)
            acc = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    out_off = offs_m[None, :] * stride_om + offs_n[:, None]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _int4_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_sn, stride_om,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRETER: tl.constexpr,
):
    # Tile [BLOCK_M, BLOCK_N] of the output; K in steps of BLOCK_K (the host guarantees K % BLOCK_K == 0).
    HALF_K: tl.constexpr = BLOCK_K // 2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped launch order: GROUP_M row tiles in a row reuse each weight tile while it sits in L2.
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.minimum(offs_m, M - 1)
    rows_n = tl.minimum(offs_n, N - 1)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kh = tl.arange(0, HALF_K)
    x_ptrs = x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + rows_n[None, :] * stride_wn + offs_kh[:, None]  # [HALF_K, BLOCK_N] bytes
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_ptrs)
        packed = tl.load(w_ptrs).to(tl.int32)
        if BLOCK_K <= GROUP:  # one group per K-tile: one scale per column
            g = k0 // GROUP
            s = tl.load(s_ptr + rows_n * stride_sn + g).to(tl.float32)[None, :]
            if HAS_ZERO:
                zs = (128.0 + tl.load(z_ptr + rows_n * stride_sn + g).to(tl.float32)[None, :]) * s
            else:
                zs = 136.0 * s
        else:  # several groups per K-tile: gather the scale of each byte's group (cached loads)
            g_off = rows_n[None, :] * stride_sn + (k0 + 2 * offs_kh[:, None]) // GROUP
            s = tl.load(s_ptr + g_off).to(tl.float32)
            if HAS_ZERO:
                zs = (128.0 + tl.load(z_ptr + g_off).to(tl.float32)) * s
            else:
                zs = 136.0 * s
        # Nibble at bits 16..19 under the exponent of 2^7 reads as the float 128 + q (no I2F, see the GEMV);
        # w = (128 + q) s - (128 + z) s is one FMA.
        w_lo = tl.fma((((packed << 16) & 0xF0000) | _MAGIC7).to(tl.float32, bitcast=True), s, -zs)
        w_hi = tl.fma((((packed << 12) & 0xF0000) | _MAGIC7).to(tl.float32, bitcast=True), s, -zs)
        # [HALF_K, BN] x2 -> [HALF_K, 2, BN] -> [BLOCK_K, BN] in k order.
        w = tl.reshape(tl.permute(tl.join(w_lo, w_hi), (0, 2, 1)), [BLOCK_K, BLOCK_N])
        if INTERPRETER:
            # The interpreter multiplies bfloat16 tiles as raw integers and truncates float32 -> bfloat16:
            # round w to the activation dtype by hand (nearest even) and multiply in float32 instead.
            if a.dtype == tl.bfloat16:
                bits = w.to(tl.int32, bitcast=True)
                w = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
            else:
                w = w.to(a.dtype).to(tl.float32)
            acc = tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w.to(a.dtype), acc)
        x_ptrs += BLOCK_K
        w_ptrs += HALF_K

    if HAS_BIAS:
        acc += tl.load(b_ptr + rows_n).to(tl.float32)[None, :]
    if INTERPRETER:
        if out_ptr.dtype.element_ty == tl.bfloat16:
            bits = acc.to(tl.int32, bitcast=True)
            acc = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    out_off = offs_m[:, None] * stride_om + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemvConfig:
    """CUDA-core GEMV (``_int4_gemv_kernel``)."""

    block_n: int = 32
    groups_per_tile: int = 2
    num_warps: int = 4
    split_k: Optional[int] = None  # None: choose from the SM count
    num_stages: int = 3


@dataclass(frozen=True)
class GemvTcConfig:
    """Tensor-core GEMV (``_int4_gemv_tc_kernel``); block_k is capped at the group size."""

    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    split_k: Optional[int] = None
    num_stages: int = 3
    fold_scale: bool = False  # True: (q - z) * s in 16-bit before the MMA; False: scale each K-tile's result
    prefetch_x: bool = False  # load x a K-tile ahead by hand
    prefetch_sz: bool = False  # load scales and zeros a K-tile ahead by hand


@dataclass(frozen=True)
class GemmConfig:
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # interpreter runs: any plausible number exercises the same code paths
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


# Which GEMV serves M <= GEMV_MAX_ROWS: "auto" picks by N, "fma" or "tc" force one (benchmarks). Measured on
# an H100 (benchmarks/results/qmatmul_h100.json): the tensor-core GEMV with 64x128 tiles, 4 warps, 3 stages
# and no hand prefetch is best or within noise of best from N = 4096 up, for M = 1..4; at N = 256 both
# kernels are launch-bound and the CUDA-core one is 0.6 us ahead.
_DEFAULT_GEMV = "auto"


def _gemv_config(m: int, n: int, k: int, group_size: int) -> GemvConfig | GemvTcConfig:
    if _DEFAULT_GEMV == "tc" or m > FMA_MAX_ROWS or (_DEFAULT_GEMV == "auto" and n > 1024):
        return GemvTcConfig(block_n=64, block_k=min(128, group_size), num_warps=4, num_stages=3)
    # About 4 KB of packed weights per K-tile and program for one or two rows; smaller tiles for more rows,
    # whose x values and accumulators also take registers.
    groups = k // group_size
    gpt = max(1, min((4096 if m <= 2 else 2048) // (32 * group_size // 2), 4))
    return GemvConfig(block_n=32, groups_per_tile=min(gpt, triton.next_power_of_2(groups)), num_warps=4)


def _splits(split_k: Optional[int], n_tiles: int, k_tiles: int, device: torch.device) -> tuple[int, int]:
    """(number of K splits, K-tiles per split)."""
    sms = _sm_count(device)
    if split_k is not None:
        want = split_k
    elif n_tiles >= 3 * sms:
        want = 1  # N alone gives ~3 programs per SM; splitting further only added a ragged wave (H100)
    else:
        want = triton.cdiv(4 * sms, n_tiles)  # ~4 programs per SM measured best
    want = max(1, min(want, k_tiles))
    per_split = triton.cdiv(k_tiles, want)
    return triton.cdiv(k_tiles, per_split), per_split


def _gemm_config(m: int, n: int, k: int, group_size: int) -> GemmConfig:
    # Large M: 256-row tiles halve the dequantization work per output (measured best at M = 1024 on an H100).
    block_m = 256 if m >= 512 else 128 if m > 64 else max(16, triton.next_power_of_2(m))
    block_k = 64 if k % 64 == 0 else group_size
    num_warps = 8 if block_m >= 128 else 4
    return GemmConfig(block_m=block_m, block_n=128, block_k=block_k, num_warps=num_warps,
                      num_stages=3 if block_m >= 128 else 4)


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------

_LOCKS: dict[tuple, torch.Tensor] = {}
_INTERPRETED: dict[object, object] = {}


def _locks(device: torch.device, size: int) -> torch.Tensor:
    """Zeroed int32 counters for the split-K reduction, one set per device and stream (kernels reset them).

    Allocate them before CUDA-graph capture by running the op once (the usual warm-up).
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _LOCKS.get(key)
    if buf is None or buf.numel() < size:
        buf = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
        _LOCKS[key] = buf
    return buf


def _runner(kernel):
    """The compiled kernel on CUDA; on CPU, the same function run by Triton's interpreter (TRITON_INTERPRET=1).

    Choosing at call time (rather than at import, as ``@triton.jit`` does) keeps the module importable in
    any order by tests and the runtime.
    """
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    if kernel not in _INTERPRETED:
        _INTERPRETED[kernel] = InterpretedFunction(kernel.fn)
    return _INTERPRETED[kernel]


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(x, qweight, scale, zero, group_size, bias) -> None:
    name = "int4_matmul"
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{name}: x must be bfloat16 or float16 (the kernel's activation dtypes), got {x.dtype}")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"{name}: qweight must be uint8 [N, K // 2] (two codes per byte), "
                         f"got {qweight.dtype} {list(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if x.shape[-1] != k:
        raise ValueError(f"{name}: x.shape[-1] (K={x.shape[-1]}) must equal 2 * qweight.shape[1] (={k}): "
                         "qweight packs two 4-bit codes per byte along K")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{name}: group_size must be one of {GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise ValueError(f"{name}: K={k} must be a multiple of group_size={group_size}")
    want = [n, k // group_size]
    if list(scale.shape) != want or not scale.is_floating_point():
        raise ValueError(f"{name}: scale must be a float tensor [N, K // group_size] = {want}, "
                         f"got {scale.dtype} {list(scale.shape)}")
    if zero is not None and (list(zero.shape) != want or not zero.is_floating_point()):
        raise ValueError(f"{name}: zero must be None or a float tensor [N, K // group_size] = {want}, "
                         f"got {zero.dtype} {list(zero.shape)}")
    if bias is not None and (list(bias.shape) != [n] or not bias.is_floating_point()):
        raise ValueError(f"{name}: bias must be None or a float tensor [N] = [{n}], "
                         f"got {bias.dtype} {list(bias.shape)}")
    for label, t in (("qweight", qweight), ("scale", scale), ("zero", zero), ("bias", bias)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name}: {label} is on {t.device} but x is on {x.device}; all must share a device")
        if not t.is_contiguous():
            raise ValueError(f"{name}: {label} must be contiguous (row-major), got strides {t.stride()}")
    if x.device.type != "cuda" and not (x.device.type == "cpu" and _interpret()):
        raise ValueError(f"{name}: needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {x.device}; "
                         "use int4_matmul_ref elsewhere")


def _launch(x2: torch.Tensor, qweight, scale, zero, group_size: int, bias,
            config: GemvConfig | GemvTcConfig | GemmConfig | None = None) -> torch.Tensor:
    """Run a kernel on a 2-D x (stride 1 along K). ``config`` picks the kernel and tiles (benchmarks, tests)."""
    m, k = x2.shape
    n = qweight.shape[0]
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0:
        return out
    if config is None:
        config = _gemv_config(m, n, k, group_size) if m <= GEMV_MAX_ROWS else _gemm_config(m, n, k, group_size)
    on_cuda = x2.device.type == "cuda"
    dummy = scale  # stands in for absent zero / bias pointers (never read)
    z = zero if zero is not None else dummy
    b = bias if bias is not None else dummy
    common = dict(HAS_ZERO=zero is not None, HAS_BIAS=bias is not None, INTERPRETER=not on_cuda,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    if isinstance(config, GemmConfig):
        if k % config.block_k:
            raise ValueError(f"int4_matmul: K={k} must be a multiple of block_k={config.block_k}")
        grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
        kernel = _int4_gemm_kernel if on_cuda else _runner(_int4_gemm_kernel)
        kernel[grid](
            x2, qweight, scale, z, b, out, m, n, k, x2.stride(0), qweight.stride(0), scale.stride(0), out.stride(0),
            GROUP=group_size, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            GROUP_M=config.group_m, **common,
        )
        return out

    if m > (GEMV_MAX_ROWS if isinstance(config, GemvTcConfig) else FMA_MAX_ROWS):
        raise ValueError(f"int4_matmul: the {type(config).__name__} kernel takes at most "
                         f"{GEMV_MAX_ROWS if isinstance(config, GemvTcConfig) else FMA_MAX_ROWS} rows, got M={m}")
    n_tiles = triton.cdiv(n, config.block_n)
    if isinstance(config, GemvTcConfig):
        block_k = min(config.block_k, group_size)
        k_tiles, m_pad, kernel = k // block_k, 16, _int4_gemv_tc_kernel
    else:
        k_tiles = triton.cdiv(k // group_size, config.groups_per_tile)
        m_pad, kernel = triton.next_power_of_2(m), _int4_gemv_kernel
    splits, per_split = _splits(config.split_k, n_tiles, k_tiles, x2.device)
    if splits > 1:
        part = torch.empty((splits, m_pad, n), dtype=torch.float32, device=x2.device)
        lock = _locks(x2.device, n_tiles)
    else:
        part, lock = out, out
    kernel = kernel if on_cuda else _runner(kernel)
    if isinstance(config, GemvTcConfig):
        kernel[(n_tiles, splits)](
            x2, qweight, scale, z, b, out, part, lock,
            m, n, k, x2.stride(0), qweight.stride(0), scale.stride(0), out.stride(0), per_split,
            GROUP=group_size, BLOCK_N=config.block_n, BLOCK_K=block_k, M_PAD=m_pad, SPLIT_K=splits > 1,
            FOLD_SCALE=config.fold_scale, PREFETCH_X=config.prefetch_x, PREFETCH_SZ=config.prefetch_sz,
            **common,
        )
    else:
        kernel[(n_tiles, splits)](
            x2, qweight, scale, z, b, out, part, lock,
            n, k, x2.stride(0), qweight.stride(0), scale.stride(0), out.stride(0), per_split,
            M_ROWS=m, M_PAD=m_pad, GROUP=group_size, GROUPS_PER_TILE=config.groups_per_tile,
            BLOCK_N=config.block_n, SPLIT_K=splits > 1, **common,
        )
    return out


def _flatten(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] > 0 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2


def _int4_matmul_impl(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                      group_size: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    _check(x, qweight, scale, zero, group_size, bias)
    out = _launch(_flatten(x), qweight, scale, zero, group_size, bias)
    return out.reshape(*x.shape[:-1], qweight.shape[0])


def _int4_matmul_fake(x, qweight, scale, zero, group_size, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


_int4_matmul_op = custom_op_once("glmq::int4_matmul", _int4_matmul_impl, _int4_matmul_fake)


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor] = None,
                *, group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W.T + bias`` for int4 ``W`` in glmq's packed layout (see the module docstring).

    Args:
        x: ``[..., K]`` bfloat16/float16, stride 1 along K.
        qweight: uint8 ``[N, K // 2]``, contiguous.
        scale: float ``[N, K // group_size]``, contiguous; ``zero``: same or None (symmetric, zero 8).
        group_size: 32, 64 or 128.
        bias: float ``[N]`` or None.

    Returns:
        ``[..., N]`` in ``x.dtype``. M = prod(leading dims) <= 16 uses a GEMV kernel, else the GEMM.
    """
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor or x.device.type == "meta":
        return _int4_matmul_op(x, qweight, scale, zero, group_size, bias)  # tracing: the op and its fake impl
    # Eager calls skip the custom-op dispatcher (tens of microseconds of Python per call): same function.
    return _int4_matmul_impl(x, qweight, scale, zero, group_size, bias)


def int4_dequantize(qweight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor] = None, *,
                    group_size: int) -> torch.Tensor:
    """Unpack and dequantize to a float32 ``[N, K]`` weight (pure torch)."""
    n = qweight.shape[0]
    q = torch.stack((qweight & 0xF, qweight >> 4), dim=-1).reshape(n, -1).float()
    k = q.shape[1]
    z = zero.float() if zero is not None else torch.full_like(scale, 8.0, dtype=torch.float32)
    q = q.reshape(n, k // group_size, group_size)
    return ((q - z[..., None]) * scale.float()[..., None]).reshape(n, k)


def int4_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    zero: Optional[torch.Tensor] = None, *, group_size: int,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pure-torch reference of :func:`int4_matmul`: dequantize to float32, matmul in float32, cast to x.dtype."""
    w = int4_dequantize(qweight, scale, zero, group_size=group_size)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
