"""How fast are glmq's quantized matmuls on the GPU, at GLM-Image's shapes?

One run checks correctness on the GPU against the references, then times:

- AR decode (M = 1..4) int4 W4A16 GEMV at the text decoder's shapes (G = 128, asymmetric), with a sweep of
  kernel variants and tiles, against bf16 ``F.linear`` and a measured device-to-device copy bandwidth.
  GB/s counts the bytes a GEMV must read: packed weight + scales + zeros + activations (N*K/2 + 2*2*N*K/G +
  2*M*K). Every timing is a CUDA-graph replay over enough weight copies that none is served from L2.
- AR prefill (M = 1024) int4 GEMM, TFLOP/s = 2*M*N*K / t, against bf16 (CUDA-graph replays too).
- DiT W8A8 at M = 8194 (two batches of 4097 tokens): fp8 (row quantization kernel + ``torch._scaled_mm``)
  and int8 (``torch._int_mm``), the activation quantization included, against bf16.
- The AR decode weight-read time per token: the per-layer sum over 40 layers plus the lm_head.

Run from the repository root (``PYTHONPATH=.`` if glmq is not installed):
    python benchmarks/bench_qmatmul.py --out benchmarks/results [--sweep]
Writes ``qmatmul_<card>.json`` and ``.md`` into --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton

try:
    from glmq.kernels import int4_matmul as I4
    from glmq.kernels import w8a8_linear as W8
except ImportError:  # glmq not installed: the repository root is on sys.path
    from kernels import int4_matmul as I4
    from kernels import w8a8_linear as W8

from glmq.bench.provenance import provenance, provenance_markdown

GROUP = 128
LAYERS = 40
TARGET_MS_PER_TOKEN = 2.0
# (name, N, K) of the AR text decoder (hidden 4096, 32 q heads, 2 kv heads x 128, MLP 13696, lm_head 16512)
DECODE_SHAPES = [("q_proj", 4096, 4096), ("k_proj/v_proj", 256, 4096), ("qkv_fused", 4608, 4096),
                 ("o_proj", 4096, 4096), ("gate_up_proj", 27392, 4096), ("down_proj", 4096, 13696),
                 ("lm_head", 16512, 4096)]
PREFILL_SHAPES = [("q_proj", 4096, 4096), ("qkv_fused", 4608, 4096), ("gate_up_proj", 27392, 4096),
                  ("down_proj", 4096, 13696)]
DIT_M = 8194
DIT_SHAPES = [("attn 4096->4096", 4096, 4096), ("ff up 4096->16384", 16384, 4096), ("ff down 16384->4096", 4096, 16384)]
POOL_BYTES = 160 << 20  # weights rotated per timing: > 3x the H100's 50 MB L2

START = time.time()


def log(*args):
    print(f"[{time.time() - START:6.1f}s]", *args, flush=True)


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


# ------------------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------------------


def time_graph(calls, min_launches=64, reps=15):
    """Median device time (us) of one call, from CUDA-graph replays of the calls in turn (>= min_launches)."""
    seq = [calls[i % len(calls)] for i in range(max(min_launches, len(calls)))]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on the capture stream: compiles, allocates split-K counters
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for c in seq:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        graph.replay()
        t1.record()
        t1.synchronize()
        times.append(t0.elapsed_time(t1) * 1000 / len(seq))
    del graph
    return statistics.median(times)


def time_events(fn, reps=20, warmup=3):
    """Median device time (us) of fn for large kernels (launch overhead negligible)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        fn()
        t1.record()
        t1.synchronize()
        times.append(t0.elapsed_time(t1) * 1000)
    return statistics.median(times)


def copy_bandwidth():
    src = torch.randn(256 << 20, device="cuda", dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    us = time_events(lambda: dst.copy_(src), reps=10)
    return 2 * src.numel() * 4 / us / 1e3  # GB/s, read + write


# ------------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------------


def int4_weights(n, k, group=GROUP, symmetric=False, copies=1):
    out = []
    for _ in range(copies):
        qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
        scale = (0.005 + 0.01 * torch.rand(n, k // group, device="cuda")).to(torch.bfloat16)
        zero = None if symmetric else (15 * torch.rand(n, k // group, device="cuda")).to(torch.bfloat16)
        out.append((qweight, scale, zero))
    return out


def int4_bytes(m, n, k, group=GROUP, zero=True):
    return n * k // 2 + (2 if zero else 1) * 2 * n * (k // group) + 2 * m * k


def copies_for(nbytes):
    return max(1, min(400, math.ceil(POOL_BYTES / nbytes)))


# ------------------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------------------


def check_correctness(res):
    """Kernels against float32 references on the GPU; errors relative to the fp32 result."""
    rows = []
    configs = [("gemv_fma", I4.GemvConfig(block_n=32, groups_per_tile=2)),
               ("gemv_fma_split", I4.GemvConfig(block_n=32, groups_per_tile=1, split_k=7)),
               ("gemv_tc", I4.GemvTcConfig(block_n=64, block_k=128)),
               ("gemv_tc_split", I4.GemvTcConfig(block_n=128, block_k=64, split_k=5)),
               ("gemv_tc_fold", I4.GemvTcConfig(block_n=64, block_k=128, split_k=3, fold_scale=True,
                                                prefetch_x=False, prefetch_sz=True)),
               ("gemm", None)]
    for (n, k, g, sym) in [(4096, 4096, 128, False), (256, 4096, 128, True), (200, 13696, 128, False),
                           (4608, 4096, 64, False), (1000, 1024, 32, True)]:
        (qw, s, z), = int4_weights(n, k, g, sym)
        w = I4.int4_dequantize(qw, s, z, group_size=g)
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        for m in (1, 3, 4, 17, 1024):
            for dtype in ((torch.bfloat16, torch.float16) if m in (1, 17) and n == 4096 else (torch.bfloat16,)):
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                ref = x.float() @ w.T + b.float()
                torch_err = rel_err(x @ w.to(dtype).T + b.to(dtype), ref)
                for name, cfg in configs:
                    if (cfg is None) != (m > 4):
                        continue
                    y = I4._launch(x, qw, s, z, g, b.to(dtype), cfg)
                    y2 = I4._launch(x, qw, s, z, g, b.to(dtype), cfg)
                    err = rel_err(y, ref)
                    rows.append(dict(kernel=name, m=m, n=n, k=k, group=g, symmetric=sym, dtype=str(dtype),
                                     err=err, torch_err=torch_err, ok=bool(err <= 2 * torch_err),
                                     deterministic=bool(torch.equal(y, y2)), finite=bool(torch.isfinite(y).all())))
                y = I4.int4_matmul(x, qw, s, z, group_size=g, bias=b.to(dtype))  # public op, default path
                err = rel_err(y, ref)
                rows.append(dict(kernel="int4_matmul(default)", m=m, n=n, k=k, group=g, symmetric=sym,
                                 dtype=str(dtype), err=err, torch_err=torch_err, ok=bool(err <= 2 * torch_err),
                                 deterministic=True, finite=bool(torch.isfinite(y).all())))
    res["int4_correctness"] = rows
    bad = [r for r in rows if not (r["ok"] and r["deterministic"] and r["finite"])]
    log(f"int4 correctness: {len(rows) - len(bad)}/{len(rows)} ok")
    for r in bad[:20]:
        log("  FAIL", r)

    # CUDA graph capture of the public op (split-K counters) and torch.compile tracing via the fake impl
    (qw, s, z), = int4_weights(4096, 4096)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    eager = I4.int4_matmul(x, qw, s, z, group_size=GROUP)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        I4.int4_matmul(x, qw, s, z, group_size=GROUP)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = I4.int4_matmul(x, qw, s, z, group_size=GROUP)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    res["int4_cuda_graph_matches_eager"] = bool(torch.equal(out, eager))
    log("int4 CUDA graph replay == eager:", res["int4_cuda_graph_matches_eager"])

    # W8A8
    w8 = []
    for (m, n, k) in [(8194, 4096, 4096), (33, 1024, 4096), (1, 4096, 4096), (8194, 4096, 16384)]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for dt in (torch.float8_e4m3fn, torch.int8):
            q, sc = W8.quantize_rows(x, dt)
            qr, scr = W8.quantize_rows_ref(x, dt)
            mism = int((q.float() != qr.float()).sum().item())
            w8.append(dict(check=f"quantize_rows {dt}", m=m, k=k, code_mismatches=mism,
                           scales_equal=bool(torch.equal(sc, scr))))
        wf = torch.randn(n, k, device="cuda") * 0.02
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        for fmt, fn, ref_fn in [(torch.float8_e4m3fn, W8.fp8_linear, W8.fp8_linear_ref),
                                (torch.int8, W8.int8_linear, W8.int8_linear_ref)]:
            qmax = 448.0 if fmt == torch.float8_e4m3fn else 127.0
            ws = wf.abs().amax(1, keepdim=True) / qmax
            wq = (wf / ws).clamp(-qmax, qmax)
            wq = wq.to(fmt) if fmt == torch.float8_e4m3fn else wq.round().to(fmt)
            try:
                y = fn(x, wq, ws, b)
                ref = ref_fn(x, wq, ws, b)
                exact = x.float() @ (wq.float() * ws).T + b.float()
                w8.append(dict(check=fn.__name__, m=m, n=n, k=k, err_vs_ref=rel_err(y, ref),
                               sqnr_vs_fp32_db=10 * math.log10(1 / max(rel_err(y, exact) ** 2, 1e-30))))
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                w8.append(dict(check=fn.__name__, m=m, n=n, k=k, error=repr(e)[:300]))
    res["w8a8_correctness"] = w8
    for r in w8:
        log(" ", r)



def check_compile(res):
    """torch.compile(fullgraph=True) traces the custom op through its fake implementation."""
    (qw, s, z), = int4_weights(4096, 4096)
    fn = torch.compile(lambda x: I4.int4_matmul(x, qw, s, z, group_size=GROUP) * 2, fullgraph=True)
    x = torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16)
    res["int4_torch_compile_ok"] = bool(torch.equal(fn(x), I4.int4_matmul(x, qw, s, z, group_size=GROUP) * 2))
    log("torch.compile(fullgraph) through the custom op:", res["int4_torch_compile_ok"])


def gemv_candidates(n, k, sms, sweep):
    """(label, config) pairs; splits chosen to give ~1, 2, 4 or 8 programs per SM."""
    out = []
    fma_tiles = [(32, 2, 4), (64, 1, 4)] if sweep else [(32, 2, 4)]
    # (block_n, block_k, warps, stages, fold_scale, prefetch_x, prefetch_sz)
    tc_tiles = [(64, 128, 4, 3, False, True, False), (64, 128, 4, 3, False, True, True),
                (64, 128, 4, 3, False, False, False), (64, 128, 4, 3, True, True, False),
                (64, 128, 4, 3, True, True, True), (128, 128, 8, 3, False, True, False),
                (64, 128, 4, 4, False, True, False), (128, 128, 4, 3, False, True, False)] if sweep else \
        [(64, 128, 4, 3, False, True, False)]
    waves = (1, 2, 4, 8) if sweep else (4,)  # programs per SM
    for bn, gpt, nw in fma_tiles:
        n_tiles = triton.cdiv(n, bn)
        k_tiles = triton.cdiv(k // GROUP, gpt)
        for split in sorted({max(1, min(k_tiles, triton.cdiv(w * sms, n_tiles))) for w in waves}):
            out.append((f"fma bn{bn} gpt{gpt} w{nw} split{split}",
                        I4.GemvConfig(block_n=bn, groups_per_tile=gpt, num_warps=nw, split_k=split)))
    for bn, bk, nw, ns, fold, pfx, psz in tc_tiles:
        n_tiles = triton.cdiv(n, bn)
        k_tiles = k // bk
        flags = ("F" if fold else "") + ("X" if pfx else "") + ("S" if psz else "")
        for split in sorted({max(1, min(k_tiles, triton.cdiv(w * sms, n_tiles))) for w in waves}):
            out.append((f"tc bn{bn} bk{bk} w{nw} s{ns} {flags or '-'} split{split}",
                        I4.GemvTcConfig(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns, split_k=split,
                                        fold_scale=fold, prefetch_x=pfx, prefetch_sz=psz)))
    return out


def bench_decode(res, sweep, deadline):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    decode = []
    for name, n, k in DECODE_SHAPES:
        if time.time() > deadline:
            log("decode: out of time, skipping", name)
            break
        nbytes = int4_bytes(1, n, k)
        pool = int4_weights(n, k, copies=copies_for(nbytes))
        wbf = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(2 * n * k))]
        entry = dict(name=name, n=n, k=k, copies=len(pool), rows={})
        for m in (1, 2, 3, 4):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16_us = time_graph([lambda w=w: F.linear(x, w) for w in wbf])
            row = dict(bf16_us=bf16_us, bf16_gbps=(2 * n * k + 2 * m * k) / bf16_us / 1e3)
            calls = [lambda p=p: I4.int4_matmul(x, p[0], p[1], p[2], group_size=GROUP) for p in pool]
            row["default_us"] = time_graph(calls)
            row["default_gbps"] = int4_bytes(m, n, k) / row["default_us"] / 1e3
            cands = gemv_candidates(n, k, sms, sweep and m == 1)
            if m > 1 and "best_m1" in entry:  # the two best M=1 configs of each kernel family, at this M
                cands = [c for c in gemv_candidates(n, k, sms, sweep) if c[0] in entry["best_m1"]]
            if m == 4:
                cands.append(("gemm bm16 bn64 bk128", I4.GemmConfig(block_m=16, block_n=64, block_k=128,
                                                                     num_warps=4, num_stages=4)))
            variants = {}
            for label, cfg in cands:
                if time.time() > deadline:
                    break
                try:
                    variants[label] = time_graph([lambda p=p, cfg=cfg: I4._launch(x, p[0], p[1], p[2], GROUP, None, cfg)
                                                  for p in pool])
                except Exception as e:  # noqa: BLE001
                    variants[label] = repr(e)[:200]
            timed = {lbl: us for lbl, us in variants.items() if isinstance(us, float)}
            if timed:
                best = min(timed, key=timed.get)
                row.update(best=best, best_us=timed[best], best_gbps=int4_bytes(m, n, k) / timed[best] / 1e3)
            row["variants"] = variants
            if m == 1:
                ranked = sorted(timed, key=timed.get)
                entry["best_m1"] = [l for l in ranked if l.startswith("fma")][:2] + \
                                   [l for l in ranked if l.startswith("tc")][:2]
            entry["rows"][m] = row
            log(f"decode {name} [{n}x{k}] M={m}: bf16 {bf16_us:.1f}us default {row['default_us']:.1f}us "
                f"({row['default_gbps']:.0f} GB/s) best {row.get('best')} {row.get('best_us', float('nan')):.1f}us "
                f"({row.get('best_gbps', float('nan')):.0f} GB/s)")
        decode.append(entry)
        del pool, wbf
        torch.cuda.empty_cache()
    res["decode"] = decode


def per_token(res):
    by = {e["name"]: e["rows"].get(1) for e in res.get("decode", [])}
    needed = ["q_proj", "k_proj/v_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"]
    if not all(by.get(n) for n in needed):
        return
    out = {}
    for key in ("default_us", "best_us", "bf16_us"):
        if not all(key in by[n] for n in needed):
            continue
        layer = by["q_proj"][key] + 2 * by["k_proj/v_proj"][key] + by["o_proj"][key] + by["gate_up_proj"][key] \
            + by["down_proj"][key]
        total = LAYERS * layer + by["lm_head"][key]
        out[key] = dict(per_layer_us=layer, per_token_ms=total / 1000)
        if by.get("qkv_fused") and key in by["qkv_fused"]:
            fused = by["qkv_fused"][key] + by["o_proj"][key] + by["gate_up_proj"][key] + by["down_proj"][key]
            out[key]["per_token_ms_qkv_fused"] = (LAYERS * fused + by["lm_head"][key]) / 1000
    weights = LAYERS * sum(int4_bytes(1, n, k) for n, k in [(4096, 4096), (256, 4096), (256, 4096), (4096, 4096),
                                                             (27392, 4096), (4096, 13696)]) + int4_bytes(1, 16512, 4096)
    out["int4_bytes_per_token"] = weights
    out["target_ms"] = TARGET_MS_PER_TOKEN
    if res.get("copy_gbps"):
        out["copy_bound_ms"] = weights / res["copy_gbps"] / 1e6
    res["decode_per_token"] = out
    log("per token:", json.dumps(out))


def bench_prefill(res, sweep, deadline):
    m = 1024
    configs = [("bm256 bn128 bk64 w8 s3", I4.GemmConfig(256, 128, 64, 8, 8, 3))]
    if sweep:
        configs += [("bm128 bn128 bk64 w8 s3", I4.GemmConfig(128, 128, 64, 8, 8, 3)),
                    ("bm256 bn128 bk64 w8 s4", I4.GemmConfig(256, 128, 64, 8, 8, 4)),
                    ("bm128 bn256 bk64 w8 s3", I4.GemmConfig(128, 256, 64, 8, 8, 3)),
                    ("bm256 bn128 bk128 w8 s3", I4.GemmConfig(256, 128, 128, 8, 8, 3))]
    rows = []
    for name, n, k in PREFILL_SHAPES:
        if time.time() > deadline:
            break
        (qw, s, z), = int4_weights(n, k)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        flop = 2 * m * n * k
        row = dict(name=name, m=m, n=n, k=k, bf16_us=time_graph([lambda: F.linear(x, w)], min_launches=10))
        row["default_us"] = time_graph([lambda: I4.int4_matmul(x, qw, s, z, group_size=GROUP)], min_launches=10)
        variants = {}
        for label, cfg in configs:
            try:
                variants[label] = time_graph([lambda cfg=cfg: I4._launch(x, qw, s, z, GROUP, None, cfg)],
                                             min_launches=10)
            except Exception as e:  # noqa: BLE001
                variants[label] = repr(e)[:200]
        timed = {lbl: us for lbl, us in variants.items() if isinstance(us, float)}
        best = min(timed, key=timed.get)
        row.update(variants=variants, best=best, best_us=timed[best], bf16_tflops=flop / row["bf16_us"] / 1e6,
                   default_tflops=flop / row["default_us"] / 1e6, best_tflops=flop / timed[best] / 1e6)
        rows.append(row)
        log(f"prefill {name} M={m}: bf16 {row['bf16_tflops']:.0f} TFLOP/s, int4 default {row['default_tflops']:.0f}, "
            f"best {best} {row['best_tflops']:.0f}")
    res["prefill"] = rows


def bench_dit(res, deadline):
    rows = []
    m = DIT_M
    for name, n, k in DIT_SHAPES:
        if time.time() > deadline:
            break
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        wf = torch.randn(n, k, device="cuda") * 0.02
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        w_bf16 = wf.to(torch.bfloat16)
        flop = 2 * m * n * k
        row = dict(name=name, m=m, n=n, k=k, bf16_us=time_graph([lambda: F.linear(x, w_bf16, b)], min_launches=10))
        try:
            ws = wf.abs().amax(1, keepdim=True) / 448.0
            wq = (wf / ws).clamp(-448, 448).to(torch.float8_e4m3fn)
            xq, xs = W8.quantize_rows(x, torch.float8_e4m3fn)
            row["fp8_quant_us"] = time_graph([lambda: W8.quantize_rows(x, torch.float8_e4m3fn)], min_launches=10)
            row["fp8_quant_torch_us"] = time_graph([lambda: W8.quantize_rows_ref(x, torch.float8_e4m3fn)],
                                                   min_launches=10)
            row["fp8_gemm_us"] = time_graph([lambda: torch._scaled_mm(
                xq, wq.t(), scale_a=xs, scale_b=ws.t(), bias=b, out_dtype=torch.bfloat16)], min_launches=10)
            row["fp8_total_us"] = time_graph([lambda: W8.fp8_linear(x, wq, ws, b)], min_launches=10)
        except Exception as e:  # noqa: BLE001
            row["fp8_error"] = repr(e)[:300]
        try:
            ws8 = wf.abs().amax(1, keepdim=True) / 127.0
            wq8 = (wf / ws8).round().clamp(-127, 127).to(torch.int8)
            xq8, _ = W8.quantize_rows(x, torch.int8)
            row["int8_gemm_us"] = time_graph([lambda: torch._int_mm(xq8, wq8.t())], min_launches=10)
            row["int8_total_us"] = time_graph([lambda: W8.int8_linear(x, wq8, ws8, b)], min_launches=10)
        except Exception as e:  # noqa: BLE001
            row["int8_error"] = repr(e)[:300]
        for key in [k_ for k_ in list(row) if k_.endswith("_us")]:
            row[key.replace("_us", "_tflops")] = flop / row[key] / 1e6
        rows.append(row)
        log(f"dit {name}: " + ", ".join(f"{k_}={v:.0f}" for k_, v in row.items() if k_.endswith("tflops")))
    res["dit_w8a8"] = rows


def host_overhead(res):
    """Eager (no graph) wall time per int4_matmul call at M=1, 4096x4096: Python + dispatch + launch."""
    (qw, s, z), = int4_weights(4096, 4096)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(10):
        I4.int4_matmul(x, qw, s, z, group_size=GROUP)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(200):
        I4.int4_matmul(x, qw, s, z, group_size=GROUP)
    torch.cuda.synchronize()
    res["eager_us_per_call_4096"] = (time.perf_counter() - t) / 200 * 1e6
    log(f"eager int4_matmul call (host-bound): {res['eager_us_per_call_4096']:.1f} us")


# ------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------


def markdown(res):
    env = res["env"]
    lines = [f"# Quantized matmuls on {env['device']} ({env['date']})", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, {env['sms']} SMs. "
             f"Device-to-device copy: {res.get('copy_gbps', float('nan')):.0f} GB/s (read + write).",
             provenance_markdown(res["provenance"]), "",
             "Timings are medians of CUDA-graph replays (device time, no host overhead). Decode GB/s "
             "counts packed weight + bf16 scales and zeros (G=128, asymmetric) + activations.", ""]
    if res.get("decode"):
        lines += ["## AR decode, int4 W4A16 GEMV", "",
                  "| layer | N x K | M | bf16 us | int4 default us | GB/s | best variant | best us | best GB/s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for e in res["decode"]:
            for m, r in e["rows"].items():
                lines.append(f"| {e['name']} | {e['n']} x {e['k']} | {m} | {r['bf16_us']:.1f} | {r['default_us']:.1f} | "
                             f"{r['default_gbps']:.0f} | {r.get('best', '-')} | {r.get('best_us', float('nan')):.1f} | "
                             f"{r.get('best_gbps', float('nan')):.0f} |")
        lines.append("")
    if res.get("decode_per_token"):
        p = res["decode_per_token"]
        lines += ["## AR decode weight-read time per token (40 layers + lm_head, M=1)", "",
                  "| path | per layer us | per token ms | per token ms, fused qkv |", "|---|---|---|---|"]
        for key, label in (("bf16_us", "bf16 F.linear"), ("default_us", "int4 default"), ("best_us", "int4 best tiles")):
            if key in p:
                lines.append(f"| {label} | {p[key]['per_layer_us']:.1f} | {p[key]['per_token_ms']:.3f} | "
                             f"{p[key].get('per_token_ms_qkv_fused', float('nan')):.3f} |")
        lines += ["", f"int4 bytes per token {p['int4_bytes_per_token'] / 1e9:.2f} GB; at the measured copy bandwidth "
                  f"{p.get('copy_bound_ms', float('nan')):.3f} ms; target {p['target_ms']} ms/token for the whole "
                  "decode step.", ""]
    if res.get("prefill"):
        lines += ["## AR prefill, int4 GEMM, M=1024", "", "| layer | N x K | bf16 TFLOP/s | int4 default | int4 best | best tiles |",
                  "|---|---|---|---|---|---|"]
        for r in res["prefill"]:
            lines.append(f"| {r['name']} | {r['n']} x {r['k']} | {r['bf16_tflops']:.0f} | {r['default_tflops']:.0f} | "
                         f"{r['best_tflops']:.0f} | {r['best']} |")
        lines.append("")
    if res.get("dit_w8a8"):
        lines += [f"## DiT W8A8, M={DIT_M} (TFLOP/s; totals include activation quantization and bias)", "",
                  "| shape | bf16 | fp8 total | fp8 GEMM only | fp8 quant us (Triton / torch) | int8 total | int8 GEMM only |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["dit_w8a8"]:
            f = lambda key: f"{r[key]:.0f}" if key in r else "-"  # noqa: E731
            lines.append(f"| {r['name']} | {f('bf16_tflops')} | {f('fp8_total_tflops')} | {f('fp8_gemm_tflops')} | "
                         f"{f('fp8_quant_us')} / {f('fp8_quant_torch_us')} | {f('int8_total_tflops')} | "
                         f"{f('int8_gemm_tflops')} |")
        lines.append("")
    ok = res.get("int4_correctness", [])
    lines += ["## Correctness on the GPU", "",
              f"int4: {sum(r['ok'] and r['deterministic'] and r['finite'] for r in ok)}/{len(ok)} cases within 2x "
              "torch's own bf16/fp16 error against float32, deterministic, finite; "
              f"CUDA graph == eager: {res.get('int4_cuda_graph_matches_eager')}; "
              f"torch.compile(fullgraph): {res.get('int4_torch_compile_ok')}.", ""]
    for r in res.get("w8a8_correctness", []):
        lines.append("- " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if res.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in res["errors"]]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--sweep", action="store_true", help="time many tile configurations")
    parser.add_argument("--budget-s", type=float, default=330, help="stop timing new shapes after this")
    parser.add_argument("--tag", default=None, help="file name tag (default: the card, e.g. h100)")
    args = parser.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    tag = args.tag or ("h200" if "H200" in props.name else "h100" if "H100" in props.name else "gpu")
    res = dict(env=dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                        triton=triton.__version__, cuda=torch.version.cuda,
                        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        gemv_default=I4._DEFAULT_GEMV, sweep=args.sweep,
                        kernels="tc GEMV: scale folded into the unpack (inline PTX), scales/zeros/x prefetched; "
                                "quantize_rows single pass; int8 epilogue fused"), errors=[],
               provenance=provenance())
    deadline = START + args.budget_s
    os.makedirs(args.out, exist_ok=True)

    def save():
        with open(os.path.join(args.out, f"qmatmul_{tag}.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
        with open(os.path.join(args.out, f"qmatmul_{tag}.md"), "w") as f:
            f.write(markdown(res))

    for section in (lambda: res.update(copy_gbps=copy_bandwidth()), lambda: check_correctness(res),
                    lambda: bench_decode(res, args.sweep, deadline - 110), lambda: per_token(res),
                    lambda: bench_dit(res, deadline - 40), lambda: bench_prefill(res, args.sweep, deadline),
                    lambda: host_overhead(res), lambda: check_compile(res)):
        try:
            section()
        except Exception:  # noqa: BLE001 - a failed section is recorded; the others still run
            res["errors"].append(traceback.format_exc()[-1500:])
            log("SECTION FAILED:", traceback.format_exc()[-1500:])
        save()
    log("copy GB/s:", res.get("copy_gbps"))
    print(markdown(res))


if __name__ == "__main__":
    sys.exit(main())
