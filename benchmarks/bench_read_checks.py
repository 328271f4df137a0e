"""What the read-side checks of issue #21 cost: the NaN/Inf scan per tensor and the config checks.

Question: does scanning every tensor for NaN/Inf (glmq.io.finite, in blocks) slow `inspect`, the
converters and `glmq.load` noticeably, and does it keep memory bounded? Rows: tensor shape, dtype, median
seconds of the scan, GB/s of stored bytes (bytes / seconds), and peak growth of resident memory while
scanning (VmHWM after - before; the tensor itself is resident before), beside one pass of
``torch.isfinite`` over the same blocks (fp8 has no CPU isfinite kernel: widened to fp32 there). Also: milliseconds for
check_config on the full-size configs (it runs before every build).

    python benchmarks/bench_read_checks.py --out benchmarks/results/read_checks_cpu2.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from glmq.io.finite import count_nonfinite


def _hwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = []
    # The released AR's fused gate_up_proj (bf16), its embedding (bf16), and an fp8 DiT-sized weight.
    for shape, dtype in [((27392, 4096), torch.bfloat16), ((168064, 4096), torch.bfloat16),
                         ((4096, 16384), torch.float8_e4m3fn)]:
        t = torch.randn(shape[0], 64, dtype=torch.bfloat16).repeat(1, shape[1] // 64).to(dtype)
        count_nonfinite(t[:8])  # warm-up
        base = _hwm()
        times = []
        for _ in range(args.repeats):
            s = time.perf_counter()
            bad = count_nonfinite(t)
            times.append(time.perf_counter() - s)
        assert bad == 0
        med = statistics.median(times)
        nbytes = t.numel() * t.element_size()
        growth = _hwm() - base
        # For comparison: torch.isfinite on the same blocks (what the exporters used before).
        s = time.perf_counter()
        ref = sum(int(b.numel() - torch.isfinite(b.float() if b.element_size() == 1 else b).sum())
                  for b in t.reshape(-1).split(1 << 22))
        ref_s = time.perf_counter() - s
        assert ref == 0
        rows.append({"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "median_s": round(med, 4),
                     "gb_per_s": round(nbytes / med / 1e9, 2), "peak_growth_mib": round(growth / 2**20, 1),
                     "tensor_mib": round(nbytes / 2**20, 1), "torch_isfinite_s": round(ref_s, 4),
                     "torch_isfinite_gb_per_s": round(nbytes / ref_s / 1e9, 3)})
        print(rows[-1])
        del t
    from glmq.io.layout import BY_NAME
    from glmq.models.check_config import check_config
    from glmq.models.configs import component_config

    check_config("dit", component_config("transformer", "full"), "warm-up")
    config_ms = {}
    for name in ("vision_language_encoder", "transformer", "text_encoder", "vae"):
        comp = BY_NAME[name]
        cfg = component_config(name, "full")
        s = time.perf_counter()
        for _ in range(10):
            check_config(comp.role, cfg, name)
        config_ms[name] = round((time.perf_counter() - s) / 10 * 1e3, 3)
    print(config_ms)
    result = {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "finite_scan": rows, "check_config_ms": config_ms}
    from glmq.bench.provenance import provenance

    result["provenance"] = provenance()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
