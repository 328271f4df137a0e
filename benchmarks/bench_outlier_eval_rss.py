"""Host memory of the outlier evaluation that ``glmq quantize`` runs on the CPU at the released layer shapes.

Peak RSS (``ru_maxrss``) of one process that imports what a conversion imports (torch, transformers,
diffusers, glmq), records its RSS, then runs :func:`glmq.evaluate.outlier_eval.evaluate_outliers` for a recipe
at ``size="full"``. The conversion runs this step before it first uses a GPU, so that on ``--device cuda``
this peak and the host memory the CUDA libraries hold (~1-1.5 GB) do not add up.

    python benchmarks/bench_outlier_eval_rss.py --recipe default --out RESULT.json

Result: ``benchmarks/results/outlier_eval_rss_cpu2.json`` (2 shared CPU cores).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import time


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: kilobytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import diffusers  # noqa: F401  (what a conversion has loaded by then)
    import torch
    import transformers  # noqa: F401

    from glmq.evaluate.outlier_eval import evaluate_outliers
    from glmq.quant.recipe import load_recipe

    after_imports = _rss_gb()
    t0 = time.perf_counter()
    oe = evaluate_outliers(load_recipe(args.recipe), size="full")
    result = {
        "benchmark": "outlier_eval_rss",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpu": platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "recipe": args.recipe,
        "shapes": [r["shape"] for r in oe["rows"]],
        "rss_after_imports_gb": round(after_imports, 3),
        "peak_rss_gb": round(_peak_rss_gb(), 3),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    from glmq.bench.provenance import provenance

    result["provenance"] = provenance()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
