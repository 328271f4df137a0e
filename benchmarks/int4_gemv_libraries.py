"""Which int4 W4A16 matmul should the AR decode use: glmq's Triton kernels, or a library's?

Issue #13 asks for existing kernel libraries to be measured against ours on the GPU, keeping the fastest
that meets our numerics. At the AR decoder's shapes (hidden 4096, 2 kv heads, MLP 13696, group 128,
asymmetric: glmq's default int4 format) and M = 1, 2, 4, 8, 16 rows (one decode step of B sequences):

- ``bf16``: ``F.linear`` on a bf16 weight (cuBLAS), the unquantized reference point;
- ``glmq``: ``glmq.kernels.int4_matmul`` (the runtime's path), on glmq's packed layout;
- ``tinygemm``: PyTorch's own ``torch._weight_int4pack_mm`` (the kernel torchao's int4 weight-only
  config uses on CUDA by default), its layout converted from glmq's codes: w = (q - 8) * s + z_tg with
  z_tg = (8 - z) * s rounded to bf16 (the only numerical difference);
- ``gemlite``: gemlite's ``A16Wn`` (Triton, HQQ convention w = (q - z) * s, glmq's own), default dispatch and
  each of its GEMV kernels forced;
- ``torchao``: ``quantize_(Linear, Int4WeightOnlyConfig(128))`` on the bf16 weight (its own rounding), when
  it imports against this torch.

Numerics: output SQNR (dB) of every path against the fp32 matmul of the same dequantized weight (torchao
quantizes on its own, so its figure includes its rounding: compared with the fp32 bf16-weight matmul).
Timing: median device time of CUDA-graph replays over enough weight copies (>= 160 MB) that no weight is
served from L2, as ``bench_qmatmul.py`` does. GB/s counts the weight bytes each layout reads plus
activations. The per-token figure sums 40 layers (fused qkv, o, fused gate/up, down) and the lm_head.

    python benchmarks/int4_gemv_libraries.py --out OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qmatmul import copy_bandwidth, time_graph  # noqa: E402  (same timing method)

from glmq.bench.provenance import provenance, provenance_markdown  # noqa: E402
from glmq.kernels import int4_matmul as I4  # noqa: E402
from glmq.quant.metrics import sqnr_db  # noqa: E402

GROUP = 128
LAYERS = 40
POOL_BYTES = 160 << 20
SHAPES = [("qkv_fused", 4608, 4096), ("o_proj", 4096, 4096), ("gate_up_fused", 27392, 4096),
          ("down_proj", 4096, 13696), ("lm_head", 16512, 4096)]
PER_TOKEN = {"qkv_fused": LAYERS, "o_proj": LAYERS, "gate_up_fused": LAYERS, "down_proj": LAYERS, "lm_head": 1}
MS = (1, 2, 4, 8, 16)
START = time.time()


def log(*a):
    print(f"[{time.time() - START:6.1f}s]", *a, flush=True)


def glmq_weight(n, k):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    scale = (0.005 + 0.01 * torch.rand(n, k // GROUP, device="cuda")).to(torch.bfloat16)
    zero = (15 * torch.rand(n, k // GROUP, device="cuda")).round().to(torch.bfloat16)
    return codes, packed, scale, zero


def dequant(codes, scale, zero):
    n, k = codes.shape
    q = codes.float().reshape(n, k // GROUP, GROUP)
    return ((q - zero.float()[..., None]) * scale.float()[..., None]).reshape(n, k)


def tinygemm_pack(codes, scale, zero, inner_k_tiles=8):
    hi_first = ((codes[:, 0::2] << 4) | codes[:, 1::2]).contiguous()  # tinygemm: even k in the high nibble
    w = torch._convert_weight_to_int4pack(hi_first, inner_k_tiles)
    z_tg = ((8 - zero.float()) * scale.float()).to(torch.bfloat16)
    sz = torch.stack([scale.t(), z_tg.t()], dim=-1).contiguous()  # [K/G, N, 2]
    return w, sz


def gemlite_layer(codes, scale, zero):
    from gemlite.helper import A16Wn

    return A16Wn(device="cuda", dtype=torch.bfloat16).from_weights(codes, scale, zero, W_nbits=4, group_size=GROUP)


def copies_for(nbytes):
    return max(1, min(200, math.ceil(POOL_BYTES / nbytes)))


def weight_bytes(n, k):
    return n * k // 2 + 2 * 2 * n * (k // GROUP)


def measure_shape(name, n, k, res, have):
    wb = weight_bytes(n, k)
    copies = copies_for(wb)
    pool = [glmq_weight(n, k) for _ in range(copies)]
    codes, packed, scale, zero = pool[0]
    w_ref = dequant(codes, scale, zero)
    entry = {"name": name, "n": n, "k": k, "copies": copies, "rows": {}}
    tg_pool = gl_pool = None
    if have["tinygemm"]:
        try:
            tg_pool = [tinygemm_pack(c, s, z) for c, _, s, z in pool]
        except Exception as e:  # noqa: BLE001  (recorded, not fatal)
            entry["tinygemm_error"] = f"{type(e).__name__}: {e}"[:300]
    if have["gemlite"]:
        try:
            gl_pool = [gemlite_layer(c, s, z) for c, _, s, z in pool]
        except Exception as e:  # noqa: BLE001
            entry["gemlite_error"] = f"{type(e).__name__}: {e}"[:300]
    bf_pool = [w_ref.to(torch.bfloat16)] + [torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                                            for _ in range(copies_for(2 * n * k) - 1)]
    for m in MS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w_ref.T
        act = 2 * m * k + 2 * m * n
        row = {}

        def record(label, calls, out, nbytes):
            try:
                us = time_graph(calls)
                row[label] = {"us": round(us, 2), "GBps": round(nbytes / us / 1e3, 1),
                              "sqnr_db": None if out is None else round(sqnr_db(ref, out.float()), 2)}
            except Exception as e:  # noqa: BLE001
                row[label] = {"error": f"{type(e).__name__}: {e}"[:300]}

        record("bf16", [lambda w=w: F.linear(x, w) for w in bf_pool], F.linear(x, bf_pool[0]), 2 * n * k + act)
        record("glmq", [lambda p=p: I4.int4_matmul(x, p[1], p[2], p[3], group_size=GROUP) for p in pool],
               I4.int4_matmul(x, packed, scale, zero, group_size=GROUP), wb + act)
        if tg_pool is not None:
            try:
                out = torch._weight_int4pack_mm(x, tg_pool[0][0], GROUP, tg_pool[0][1])
                record("tinygemm", [lambda t=t: torch._weight_int4pack_mm(x, t[0], GROUP, t[1]) for t in tg_pool],
                       out, wb + act)
            except Exception as e:  # noqa: BLE001
                row["tinygemm"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        if gl_pool is not None:
            try:
                out = gl_pool[0](x)
                record("gemlite", [lambda g=g: g(x) for g in gl_pool], out, wb + act)
            except Exception as e:  # noqa: BLE001
                row["gemlite"] = {"error": f"{type(e).__name__}: {e}"[:300]}
            for kind in ("GEMV_REVSPLITK", "GEMV_SPLITK", "GEMV"):
                try:
                    out = gl_pool[0].forward_manual(x, matmul_type=kind)
                    record(f"gemlite_{kind.lower()}", [lambda g=g, kind=kind: g.forward_manual(x, matmul_type=kind)
                                                       for g in gl_pool], out, wb + act)
                except Exception as e:  # noqa: BLE001
                    row[f"gemlite_{kind.lower()}"] = {"error": f"{type(e).__name__}: {e}"[:200]}
        entry["rows"][m] = row
        best = min((v["us"], lab) for lab, v in row.items() if "us" in v and lab != "bf16"
                   and (v["sqnr_db"] or 0) >= 40)
        log(f"{name:14s} M={m:2d} " + "  ".join(f"{lab} {v['us']:.1f}us/{v.get('sqnr_db')}dB" if "us" in v
                                            else f"{lab} ERR" for lab, v in row.items()) + f"  best {best[1]}")
    res["shapes"].append(entry)
    del pool, tg_pool, gl_pool, bf_pool
    torch.cuda.empty_cache()


def torchao_check(res):
    """torchao's int4 weight-only config on one Linear: what it dispatches to here, and its time at M=1."""
    out = {}
    try:
        import torchao
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        out["version"] = torchao.__version__
        lin = torch.nn.Linear(4096, 4608, bias=False, device="cuda", dtype=torch.bfloat16)
        w = lin.weight.detach().float().clone()
        quantize_(lin, Int4WeightOnlyConfig(group_size=GROUP))
        out["weight_type"] = type(lin.weight).__name__
        for m in (1, 8):
            x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
            y = lin(x)
            out[f"M{m}"] = {"us_single_copy_L2_resident": round(time_graph([lambda: lin(x)]), 2),
                            "sqnr_vs_bf16_weight_db": round(sqnr_db(x.float() @ w.T, y.float()), 2)}
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"[:400]
        out["trace"] = traceback.format_exc()[-800:]
    res["torchao"] = out
    log("torchao:", {k: v for k, v in out.items() if k != "trace"})


def per_token(res):
    """Weight-read ms per decode step (40 layers + lm_head) per path and M, each layer at that path's time."""
    table = {}
    for m in MS:
        for label in ("bf16", "glmq", "tinygemm", "gemlite", "best_gemlite", "best_any"):
            total, ok = 0.0, True
            for e in res["shapes"]:
                row = e["rows"][m]
                if label == "best_gemlite":
                    cands = [v["us"] for lab, v in row.items() if lab.startswith("gemlite") and "us" in v]
                elif label == "best_any":
                    cands = [v["us"] for lab, v in row.items() if lab != "bf16" and "us" in v
                             and (v["sqnr_db"] or 0) >= 40]
                else:
                    cands = [row[label]["us"]] if "us" in row.get(label, {}) else []
                if not cands:
                    ok = False
                    break
                total += min(cands) * PER_TOKEN[e["name"]]
            if ok:
                table.setdefault(m, {})[label] = round(total / 1000, 3)
    res["per_token_ms"] = table


def markdown(res):
    env = res["environment"]
    lines = [f"# int4 W4A16 matmul: glmq vs libraries, {env['device']} ({env['date']})", "",
             f"torch {env['torch']}, triton {env['triton']}, gemlite {env.get('gemlite')}, "
             f"torchao {res.get('torchao', {}).get('version')}; copy bandwidth {env['copy_GBps']} GB/s.", "",
             "Median us of CUDA-graph replays over weight copies (no L2 reuse); SQNR vs the fp32 matmul of the "
             "same dequantized weight.", ""]
    labels = sorted({lab for e in res["shapes"] for r in e["rows"].values() for lab in r})
    lines += ["| layer | N x K | M | " + " | ".join(labels) + " |", "|---|---|---|" + "---|" * len(labels)]
    for e in res["shapes"]:
        for m, row in e["rows"].items():
            cells = [(f"{row[lab]['us']} us, {row[lab]['GBps']} GB/s, {row[lab]['sqnr_db']} dB" if "us" in row.get(lab, {})
                      else ("error" if lab in row else "")) for lab in labels]
            lines.append(f"| {e['name']} | {e['n']} x {e['k']} | {m} | " + " | ".join(cells) + " |")
    lines += ["", "## Weight-read ms per decode step (40 layers: fused qkv, o, fused gate/up, down; + lm_head)", "",
              "| M | " + " | ".join(["bf16", "glmq", "tinygemm", "gemlite", "best_gemlite", "best_any"]) + " |",
              "|---|" + "---|" * 6]
    for m, row in res["per_token_ms"].items():
        lines.append(f"| {m} | " + " | ".join(str(row.get(k, "")) for k in
                                             ["bf16", "glmq", "tinygemm", "gemlite", "best_gemlite", "best_any"]) + " |")
    lines += ["", f"torchao: `{json.dumps({k: v for k, v in res.get('torchao', {}).items() if k != 'trace'})}`", "",
              provenance_markdown(res["provenance"])]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton

    have = {"tinygemm": hasattr(torch, "_weight_int4pack_mm"), "gemlite": False}
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "copy_GBps": round(copy_bandwidth(), 1)}
    try:
        import gemlite

        env["gemlite"] = gemlite.__version__
        have["gemlite"] = True
    except Exception as e:  # noqa: BLE001
        env["gemlite_error"] = f"{type(e).__name__}: {e}"[:300]
    res = {"environment": env, "provenance": provenance(), "shapes": []}
    log(env)
    for name, n, k in SHAPES:
        try:
            measure_shape(name, n, k, res, have)
        except Exception as e:  # noqa: BLE001
            res["shapes"].append({"name": name, "n": n, "k": k, "error": traceback.format_exc()[-1500:]})
            log(name, "failed", e)
        (out / "int4_gemv_libraries.json").write_text(json.dumps(res, indent=1, default=str))
    torchao_check(res)
    res["shapes"] = [e for e in res["shapes"] if "rows" in e]
    per_token(res)
    (out / "int4_gemv_libraries.json").write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res)
    (out / "int4_gemv_libraries.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
