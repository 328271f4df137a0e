"""fp8 row-wise ``torch._scaled_mm`` at the DiT's shapes, with and without ``use_fast_accum``: time and error.

The DiT's fp8 GEMMs are ~94 ms of a 181 ms step at 1024x1024 (profile_e2e_h100/). Hopper's fast fp8
accumulation skips the periodic promotion of partial sums to fp32; this measures what it saves and costs.
Error: relative L2 against the fp32 product of the same quantized operands. Writes fp8_fast_accum.json/.md.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import torch

from glmq.bench.provenance import provenance, provenance_markdown

SHAPES = {"attention q/k/v/out (4096 -> 4096)": (4096, 4096), "ff in (4096 -> 16384)": (4096, 16384),
          "ff out (16384 -> 4096)": (16384, 4096)}
M = 2 * (4096 + 16)  # cond + uncond, 1024x1024 image tokens + glyph tokens


def quantize(t: torch.Tensor):
    scale = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / 448.0
    return (t / scale).to(torch.float8_e4m3fn), scale


def timed(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator("cuda").manual_seed(0)
    rows = []
    for name, (k, n) in SHAPES.items():
        x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16, generator=g)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * k**-0.5
        xq, xs = quantize(x)
        wq, ws = quantize(w)
        ref = (xq.float() * xs) @ (wq.float() * ws).t()
        row = {"layer": name, "M": M, "K": k, "N": n}
        for fast in (False, True):
            fn = lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16,  # noqa: E731
                                          use_fast_accum=fast)
            try:
                y = fn()
            except RuntimeError as e:
                row[f"fast_accum_{fast}"] = {"error": str(e).splitlines()[0][:160]}
                continue
            ms = timed(fn)
            rel = float((y.float() - ref).norm() / ref.norm())
            row[f"fast_accum_{fast}"] = {"ms": round(ms, 4), "tflops": round(2 * M * k * n / ms / 1e9, 1),
                                         "rel_err_vs_fp32": float(f"{rel:.3g}")}
        rows.append(row)
    env = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    prov = provenance()
    (out / "fp8_fast_accum.json").write_text(json.dumps({"environment": env, "provenance": prov, "rows": rows},
                                                        indent=2) + "\n")
    lines = [f"# fp8 row-wise _scaled_mm, fast accumulation off/on: {env['card']}", "",
             f"{env['date']}; torch {env['torch']}, CUDA {env['cuda']}. Median of 30 (CUDA events), M = {M}.",
             provenance_markdown(prov), "",
             "| layer | off: ms | TFLOP/s | rel. err | on: ms | TFLOP/s | rel. err |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for fast in (False, True):
            c = r[f"fast_accum_{fast}"]
            cells += [c.get("error", "failed")[:40], "-", "-"] if "ms" not in c else \
                [str(c["ms"]), str(c["tflops"]), str(c["rel_err_vs_fp32"])]
        lines.append(f"| {r['layer']} | " + " | ".join(cells) + " |")
    (out / "fp8_fast_accum.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
