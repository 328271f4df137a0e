"""What the per-layer output SQNR (``glmq quantize``'s layer-output calibration) costs on a full-size checkpoint.

For the first N AR decoder layers and the first M DiT blocks: process CPU seconds and wall seconds of the
calibration pass (materialize one unit from the lazy reader, run it on the calibration tokens), and of
quantizing the unit's planned layers with and without the output SQNR; peak RSS. A whole conversion is
the sum over 40 layers and 30 blocks, so the per-unit medians extrapolate (the JSON says so).

    python benchmarks/bench_layer_outputs.py SRC --recipe fast --ar-layers 4 --dit-blocks 3 --out RESULT.json

SRC is a full-size GLM-Image folder (``glmq make-tiny --size full``). Results used in the README and the
closing notes: ``benchmarks/results/quantize_layer_outputs_cpu2.json`` (summarized from this script's output).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import sys
import time


def _cpu_s() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


class _Clock:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), _cpu_s()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, _cpu_s() - self.cpu


def _unit_of(component: str, name: str) -> str:
    parts = name.split(".")
    if component == "vision_language_encoder":
        return parts[3]  # model.language_model.layers.<i>.
    return parts[1] if name.startswith("transformer_blocks.") else "stem"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("--recipe", default="fast")
    ap.add_argument("--ar-layers", type=int, default=4)
    ap.add_argument("--dit-blocks", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import diffusers
    import torch
    import transformers

    import glmq
    from glmq.bench.provenance import provenance
    from glmq.io.layout import BY_NAME
    from glmq.io.reader import PipelineReader
    from glmq.quant import convert
    from glmq.quant.calibrate import ArCalibrator
    from glmq.quant.dit_calibrate import DitCalibrator
    from glmq.quant.recipe import load_recipe

    reader = PipelineReader(args.src)
    recipe = load_recipe(args.recipe)
    out: dict = {"recipe": args.recipe, "ar_layers": [], "dit_blocks": []}
    for comp, count, calibrator, key in (("vision_language_encoder", args.ar_layers, ArCalibrator, "ar_layers"),
                                         ("transformer", args.dit_blocks, DitCalibrator, "dit_blocks")):
        cr = reader.component(comp)
        plans, _, _ = convert.plan_component(BY_NAME[comp], cr, recipe)
        with _Clock() as setup:
            cal = calibrator(reader, plans)
        units: dict[str, list] = {}
        for name, plan in plans.items():
            units.setdefault(_unit_of(comp, name), []).append(plan)
        for unit in list(units)[:count]:
            with _Clock() as pass_clock:
                calibs = {p.name: cal.result(p.name) for p in units[unit]}
            plain = [0.0, 0.0]
            with_sqnr = [0.0, 0.0]
            sqnr = {}
            for p in units[unit]:
                w = cr.get(p.name + ".weight")
                with _Clock() as c:
                    convert._quantize_layer(p, w, None, "cpu")
                plain[0] += c.wall
                plain[1] += c.cpu
                with _Clock() as c:
                    stats = convert._quantize_layer(p, w, calibs[p.name], "cpu")["__stats__"]
                with_sqnr[0] += c.wall
                with_sqnr[1] += c.cpu
                sqnr[p.name] = stats["output_sqnr_db"]
            row = {"unit": unit, "layers": len(units[unit]),
                   "calibration_pass_wall_s": round(pass_clock.wall, 2), "calibration_pass_cpu_s": round(pass_clock.cpu, 2),
                   "quantize_wall_s": round(plain[0], 2), "quantize_cpu_s": round(plain[1], 2),
                   "quantize_with_output_sqnr_wall_s": round(with_sqnr[0], 2),
                   "quantize_with_output_sqnr_cpu_s": round(with_sqnr[1], 2),
                   "peak_rss_gb": round(_peak_rss_gb(), 3), "output_sqnr_db": sqnr}
            print(comp, json.dumps(row), file=sys.stderr, flush=True)
            out[key].append(row)
        out[key + "_describe"] = cal.describe()
        out[key + "_constructor_cpu_s"] = round(setup.cpu, 2)
    out["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out["card"] = "CPU"
    out["provenance"] = provenance()
    out["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                       "transformers": transformers.__version__, "diffusers": diffusers.__version__,
                       "glmq": glmq.__version__}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
