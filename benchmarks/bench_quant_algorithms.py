"""How long RTN, HQQ and GPTQ take per layer on this CPU, at every layer shape of the released model.

Question: how long does ``glmq quantize`` spend choosing scales, per algorithm and format, and what does
that make a whole-checkpoint conversion cost per recipe on a 2-core CPU?

Method (one measurement per point; the machine is shared, so ``os.getloadavg()`` is recorded with it):

- weights: the released layer shapes (every distinct ``nn.Linear`` shape of the AR text decoder, lm_head,
  vision tower and DiT, built on the meta device), random bf16-valued fp32 weights;
- RTN and HQQ treat rows independently: they are timed on the first ``min(N, ROWS)`` rows at full
  width and scaled by ``N / rows`` (labelled ``scaled_from_rows``);
- GPTQ = one factorization of the damped inverse Hessian (depends on K only; timed for K <= 6144,
  extrapolated as c K^3 from the largest timed K above that) + the column loop, timed on
  ``min(N, GPTQ_ROWS)`` rows with a precomputed factor and scaled linearly in rows (an upper bound: part
  of the per-column cost is Python overhead that does not grow with rows). The Hessian accumulation
  (calibration forwards) is not included;
- GB/s = bf16 weight bytes (2 N K) / seconds;
- conversion time per recipe = sum over every quantized layer of the release of its per-layer time:
  an extrapolation, excluding I/O (the measured full ``fast`` conversion is in
  ``results/quantize_full_fast_cpu2.json``) and GPTQ calibration.

Run: ``python benchmarks/bench_quant_algorithms.py`` (about 20-30 min on 2 loaded cores).
Writes ``benchmarks/results/quant_algorithms_cpu2.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROWS = 1024
GPTQ_ROWS = 512
# The first run (on a machine at load 5-9) was stopped after the largest shapes; the rest was timed with
# these smaller slices and GPTQ on int4 only (the recipes' only GPTQ format; the column loop's cost
# does not depend on the format), its finished rows read back from its log (--prior-log).
ROWS_SECOND, GPTQ_ROWS_SECOND = 512, 128
MAX_TIMED_FACTOR_K = 6144
FORMATS = {
    "int4_g128": ("int4", {"group_size": 128, "symmetric": False}),
    "int4_g64": ("int4", {"group_size": 64, "symmetric": False}),
    "int8": ("int8", {}),
    "fp8_e4m3": ("fp8_e4m3", {}),
}
ALGORITHMS = ("rtn", "hqq", "gptq")


def release_linears() -> dict[str, list[tuple[str, tuple[int, int]]]]:
    """``{component: [(module name, (N, K))]}`` for every linear of the released AR and DiT."""
    from torch import nn

    from glmq.io.layout import BY_NAME
    from glmq.models.build import build_model
    from glmq.models.configs import component_config

    out = {}
    for comp in ("vision_language_encoder", "transformer"):
        model = build_model(BY_NAME[comp], component_config(comp, "full"))
        out[comp] = [(n, (m.out_features, m.in_features)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return out


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class _FixedFactorGPTQ:
    """GPTQ whose inverse-Hessian factor is given (the column loop timed alone)."""

    def __init__(self, factor):
        from glmq.quant.algorithms import GPTQ

        class Fixed(GPTQ):
            def _inverse_hessian_factor(self, h):
                return factor

        self.algo = Fixed()


def time_factor(k: int) -> float:
    from glmq.quant.algorithms import get_algorithm

    x = torch.randn(max(k + 64, 1024), k, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    h = x.T @ x / x.shape[0]
    del x
    return _timed(lambda: get_algorithm("gptq")._inverse_hessian_factor(h))


def main() -> None:
    from glmq.bench.provenance import provenance
    from glmq.quant.algorithms import get_algorithm
    from glmq.quant.formats import get_format

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quant_algorithms_cpu2"))
    ap.add_argument("--shapes", default=None, help="comma list NxK to restrict (debug)")
    ap.add_argument("--prior-log", default=None, help="stdout of an interrupted run: keep its rows, time the rest")
    ap.add_argument("--fill-missing", action="store_true",
                    help="time the (shape, format, algorithm) points missing from the existing --out JSON")
    ap.add_argument("--retime-rtn", action="store_true",
                    help="re-time every RTN row of the existing --out JSON on the whole layer (no row scaling) "
                         "and recompute the estimates")
    args = ap.parse_args()
    if args.retime_rtn:
        retime_rtn(Path(args.out))
        return
    if args.fill_missing:
        prior_rows = json.loads(Path(args.out).with_suffix(".json").read_text())["rows"]
    global ROWS, GPTQ_ROWS
    prior_rows, factor_s = ([], {}) if args.prior_log is None else parse_log(Path(args.prior_log).read_text())
    if args.fill_missing:
        old = json.loads(Path(args.out).with_suffix(".json").read_text())
        prior_rows, factor_s = old["rows"], {int(k): v for k, v in old["gptq_factor_seconds_by_k"].items()}
    if prior_rows:
        ROWS, GPTQ_ROWS = ROWS_SECOND, GPTQ_ROWS_SECOND

    linears = release_linears()
    shapes = sorted({s for items in linears.values() for _, s in items}, key=lambda s: -s[0] * s[1])
    if args.shapes:
        keep = {tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")}
        shapes = [s for s in shapes if s in keep]
    loads = [os.getloadavg()]
    rows_out = list(prior_rows)
    done = {(tuple(r["shape"]), r["format"], r["algorithm"]) for r in prior_rows}
    for k in sorted({k for _, k in shapes}):
        if k <= MAX_TIMED_FACTOR_K and k not in factor_s:
            factor_s[k] = round(time_factor(k), 3)
            print(f"GPTQ factor K={k}: {factor_s[k]:.2f} s", flush=True)
    timed_k = max(factor_s)
    c3 = factor_s[timed_k] / timed_k**3
    for n, k in shapes:
        if all((((n, k), f, a) in done) or (a == "gptq" and prior_rows and FORMATS[f][0] != "int4")
               for f in FORMATS for a in ALGORITHMS):
            continue
        gen = torch.Generator().manual_seed(n * 7 + k)
        r = min(n, ROWS)
        w = torch.randn(r, k, generator=gen).bfloat16().float() / k**0.5
        u = torch.eye(k, dtype=torch.float32)  # any upper-triangular factor: the loop's cost does not depend on it
        h = torch.eye(k)
        for label, (fname, params) in FORMATS.items():
            fmt = get_format(fname, **params)
            try:
                fmt.check((n, k))
            except Exception:
                continue
            for algo_name in ALGORITHMS:
                if ((n, k), label, algo_name) in done or (algo_name == "gptq" and prior_rows and fname != "int4"):
                    continue
                if algo_name == "gptq":
                    rg = min(n, GPTQ_ROWS)
                    loop = _timed(lambda: _FixedFactorGPTQ(u).algo.quantize_weight(fmt, w[:rg], hessian=h))
                    fac = factor_s.get(k, c3 * k**3)
                    sec = loop * n / rg + fac
                    how = {"loop_rows": rg, "loop_seconds": round(loop, 3), "factor_seconds": round(fac, 3),
                           "factor": "timed" if k in factor_s else f"extrapolated c*K^3 from K={timed_k}"}
                else:
                    algo = get_algorithm(algo_name)
                    t = _timed(lambda: algo.quantize_weight(fmt, w, hessian=None))
                    sec = t * n / r
                    how = {"rows": r, "seconds_measured": round(t, 3)}
                row = {"shape": [n, k], "format": label, "algorithm": algo_name, "seconds_per_layer": round(sec, 3),
                       "gb_per_s": round(2 * n * k / sec / 1e9, 4), "scaled_from_rows": how, "load": os.getloadavg()}
                rows_out.append(row)
                print(f"{n:>6}x{k:<6} {label:<9} {algo_name:<5} {sec:9.2f} s/layer {row['gb_per_s']:8.4f} GB/s "
                      f"load {row['load'][0]:.1f}", flush=True)
        loads.append(os.getloadavg())
        del w

    per = {(tuple(r["shape"]), r["format"], r["algorithm"]): r["seconds_per_layer"] for r in rows_out}
    conversions = {}
    from glmq.quant.recipe import available_recipes

    for name in available_recipes():
        conversions[name] = recipe_estimate(name, linears, per)
    result = {
        "card": "CPU 2 cores (shared with other jobs: see load)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "glmq": __import__("glmq").__version__, "threads": torch.get_num_threads()},
        "method": __doc__.split("Method", 1)[1].split("Run:")[0].strip(),
        "single_measurement_per_point": True,
        "loadavg_samples": loads + [os.getloadavg()],
        "gptq_factor_seconds_by_k": factor_s,
        "rows": rows_out,
        "conversion_extrapolated": conversions,
        "provenance": provenance(),
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def retime_rtn(out: Path) -> None:
    """RTN is cheap enough to time on whole layers; row-slice timings of it were dominated by load noise."""
    from glmq.bench.provenance import provenance
    from glmq.quant.algorithms import get_algorithm
    from glmq.quant.formats import get_format

    res = json.loads(out.with_suffix(".json").read_text())
    rtn = get_algorithm("rtn")
    for row in res["rows"]:
        if row["algorithm"] != "rtn":
            continue
        n, k = row["shape"]
        fname, params = FORMATS[row["format"]]
        fmt = get_format(fname, **params)
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * 7 + k)).bfloat16().float() / k**0.5
        sec = _timed(lambda: rtn.quantize_weight(fmt, w))
        row.update(seconds_per_layer=round(sec, 3), gb_per_s=round(2 * n * k / sec / 1e9, 4),
                   scaled_from_rows={"rows": n, "whole_layer_retimed": True}, load=os.getloadavg())
        print(f"{n:>6}x{k:<6} {row['format']:<9} rtn {sec:8.2f} s/layer {row['gb_per_s']:.3f} GB/s", flush=True)
        del w
    per = {(tuple(r["shape"]), r["format"], r["algorithm"]): r["seconds_per_layer"] for r in res["rows"]}
    linears = release_linears()
    res["conversion_extrapolated"] = {name: recipe_estimate(name, linears, per) for name in res["conversion_extrapolated"]}
    res["loadavg_samples"].append(os.getloadavg())
    res["rtn_retimed_on_whole_layers"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    res["provenance_rtn_retime"] = provenance()
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(markdown(res))


def parse_log(text: str) -> tuple[list[dict], dict[int, float]]:
    """Rows and GPTQ factor times printed by an interrupted run (its per-row details are not in the log)."""
    rows, factors = [], {}
    for line in text.splitlines():
        parts = line.split()
        if line.startswith("GPTQ factor K="):
            factors[int(parts[2].removeprefix("K=").rstrip(":"))] = float(parts[3])
        elif "s/layer" in line:
            n, k = (int(v) for v in parts[0].split("x"))
            rows.append({"shape": [n, k], "format": parts[1], "algorithm": parts[2],
                         "seconds_per_layer": float(parts[3]), "gb_per_s": float(parts[5]),
                         "scaled_from_rows": {"rows": min(n, 1024) if parts[2] != "gptq" else min(n, 512),
                                              "from_log_of_first_run": True},
                         "load": [float(parts[8])]})
    return rows, factors


def recipe_estimate(name, linears, per) -> dict:
    """Extrapolated seconds of scale selection for the whole release under recipe ``name``."""
    from glmq.quant.recipe import load_recipe

    rec = load_recipe(name)
    total = 0.0
    missing = set()
    layers = 0
    for comp, items in linears.items():
        for mod, shape in items:
            rule = rec.rule_for(comp, mod)
            if rule is None or rule.format == "none":
                continue
            label = {"int4": f"int4_g{rule.params.get('group_size', 128)}"}.get(rule.format, rule.format)
            sec = per.get((shape, label, rule.algorithm))
            if sec is None:
                missing.add((shape, label, rule.algorithm))
                continue
            total += sec
            layers += 1
    return {"quantized_layers": layers, "seconds_extrapolated": round(total, 1),
            "hours_extrapolated": round(total / 3600, 2), "missing": sorted(map(str, missing)),
            "excludes": "I/O and GPTQ calibration forwards"}


def markdown(res: dict) -> str:
    from glmq.bench.provenance import provenance_markdown

    lines = [f"# Quantization algorithm throughput, {res['card']}", "",
             *[provenance_markdown(res[key], label) for key, label in
               (("provenance", "Provenance"), ("provenance_rtn_retime", "RTN re-timed by")) if key in res],
             f"{res['date']}; torch {res['versions']['torch']}, glmq {res['versions']['glmq']}, "
             f"{res['versions']['threads']} threads. One measurement per point; load averages "
             f"{[round(x[0], 1) for x in res['loadavg_samples']]} (the machine was shared: treat as noisy).", "",
             "RTN/HQQ timed on up to 1024 rows at full width (512 for the shapes timed after the first run was "
             "stopped) and scaled to all rows; GPTQ = factorization (by K; extrapolated c K^3 above K=6144) + "
             "column loop timed on up to 512 rows (128 in the second part, int4 only) and scaled linearly "
             "(upper bound). See the JSON for the method.",
             "", "| shape (N x K) | format | algorithm | s/layer | GB/s (bf16 in) |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['format']} | {r['algorithm']} | "
                     f"{r['seconds_per_layer']:.2f} | {r['gb_per_s']:.3f} |")
    lines += ["", "## Whole release per recipe (EXTRAPOLATION: sum of per-layer times; no I/O, no calibration)",
              "", "| recipe | quantized layers | hours |", "|---|---|---|"]
    for name, c in res["conversion_extrapolated"].items():
        miss = f" (missing: {', '.join(c['missing'])})" if c["missing"] else ""
        lines.append(f"| {name} | {c['quantized_layers']} | {c['hours_extrapolated']}{miss} |")
    lines += ["", "Caveats: one measurement per point on a machine shared with other jobs at load 4-12 on 2 cores, "
              "so every time is inflated and noisy (HQQ/GPTQ rows of equal size differ by up to 3x). For scale: "
              "the whole `fast` conversion measured end to end at lower load took 374 s "
              "(`quantize_full_fast_cpu2.json`). HQQ and GPTQ are the algorithms to run on a GPU "
              "(`--device cuda`): on this CPU they cost hours for the whole release.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
