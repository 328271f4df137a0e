"""How long the AR decode step takes to compile: the whole step (default) against one decoder layer whose graph
serves every layer (``GLMQ_AR_COMPILE=layers``), as the depth grows to the released 40 layers.

The tiny AR's widths with ``--layers`` decoder layers (random weights, seed 0). Each measurement runs in a fresh
process with an empty Inductor cache, so nothing is reused from an earlier one: the first compiled generation
of a 64x64 text-to-image prompt (prefill, compilation, 261 tokens on the tiny config), timed, then a second
generation; the compiled tokens must equal the eager engine's. Writes ``ar_compile_time.json`` and ``.md``
(with provenance) into ``--out``.

    python benchmarks/ar_compile_time.py --layers 2,16,40 --out benchmarks/results/ar_compile_time_cpu2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(layers: int, device: str) -> dict:
    """One measurement, in this process: the mode comes from ``GLMQ_AR_COMPILE``."""
    import torch
    from torch._dynamo.utils import counters

    from glmq.io.layout import BY_NAME
    from glmq.models.build import build_model, build_processor
    from glmq.models.configs import component_config
    from glmq.runtime.ar_engine import ArEngine, compile_mode

    torch.set_num_threads(1)
    cfg = component_config("vision_language_encoder", "tiny")
    cfg["text_config"]["num_hidden_layers"] = layers
    torch.manual_seed(0)
    model = build_model(BY_NAME["vision_language_encoder"], cfg, device=device).eval()
    msgs = [[{"role": "user", "content": [{"type": "text", "text": "a cat"}]}]]
    inputs = build_processor().apply_chat_template(msgs, tokenize=True, target_h=64, target_w=64, return_dict=True,
                                                   return_tensors="pt")
    inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "image_grid_thw", "attention_mask")}
    ref = ArEngine(model, device=device).generate(**inputs, generator=torch.Generator().manual_seed(3))
    engine = ArEngine(model, device=device, compile=True)
    t0 = time.perf_counter()
    got = engine.generate(**inputs, generator=torch.Generator().manual_seed(3))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.generate(**inputs, generator=torch.Generator().manual_seed(3))
    return {"layers": layers, "mode": compile_mode(), "step_kind": engine.step_kind,
            "first_call_s": round(first, 2), "second_call_s": round(time.perf_counter() - t0, 3),
            "tokens": int(got.shape[-1]), "tokens_equal_eager": bool(torch.equal(got.cpu(), ref.cpu())),
            "graphs_compiled": int(counters["stats"]["unique_graphs"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="2,16,40")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.device)))
        return 0
    if args.out is None:
        ap.error("--out is required")
    try:
        depths = [int(x) for x in args.layers.split(",")]
    except ValueError:
        print(f"ar_compile_time: --layers must be comma-separated integers, got {args.layers!r}", file=sys.stderr)
        return 2
    if min(depths) < 1:
        print("ar_compile_time: --layers must be at least 1", file=sys.stderr)
        return 2
    from glmq.bench.provenance import provenance, write_table_result

    rows = []
    for layers in depths:
        for mode in ("step", "layers"):
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "GLMQ_AR_COMPILE": mode, "TORCHINDUCTOR_CACHE_DIR": cache,
                       "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
                proc = subprocess.run([sys.executable, __file__, "--child", str(layers), "--device", args.device],
                                      env=env, capture_output=True, text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr, flush=True)
    import torch

    result = {"benchmark": "ar_compile_time", "provenance": provenance(), "device": args.device,
              "torch": torch.__version__, "cpu_threads": 1, "rows": rows}
    title = (f"AR decode step compile time: whole step vs one layer ({args.device}, tiny widths, torch "
             f"{torch.__version__}, one thread)")
    columns = ["layers", "GLMQ_AR_COMPILE", "first compiled call s", "second call s", "graphs", "tokens equal eager"]
    cells = [[r["layers"], r["mode"], r["first_call_s"], r["second_call_s"], r["graphs_compiled"],
              r["tokens_equal_eager"]] for r in rows]
    lines = write_table_result(args.out, "ar_compile_time", result, title, columns, cells)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
