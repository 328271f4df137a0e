"""One fresh process's first image (and optionally a second one): the child ``glmq bench --first-image`` runs
(:func:`glmq.bench.batch.first_image_rows`). Prints one JSON line: seconds to a ready pipeline (imports, build
or load, quantization), the first call's seconds (compilation, graph capture and autotuning included), the
second call's, and what the compile cache did (Inductor's FX graph cache hits and misses, autotune choices
adopted from the cache).

    python -m glmq.bench.first_image --model tiny --cache-dir DIR [--tier 16] [--second] [--no-compile]
"""

from __future__ import annotations

import time

_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", default=None)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--tier", type=float, default=None)
    ap.add_argument("--size", default="1024x1024")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", default="a street poster that says 'glmq'")
    ap.add_argument("--device", default=None)
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--second", action="store_true", help="also time a second image (warm)")
    args = ap.parse_args(argv)

    import torch

    from glmq.bench.run import BenchConfig, _load_or_build, _offline_pieces, _reset, random_pipeline
    from glmq.io.images import parse_size
    from glmq.runtime.compile_cache import activate

    activate(args.cache_dir)  # before anything compiles
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compile_ = not args.no_compile
    w, h = parse_size(args.size)
    if args.path is not None:
        import glmq

        _reset(device, args.tier)
        pipe = glmq.load(args.path, device=str(device), vram_budget_gb=args.tier, compile=compile_,
                         cache_dir=args.cache_dir)
    elif device.type != "cuda":
        pipe = random_pipeline(args.model, args.recipe, device, compile=compile_, cache_dir=args.cache_dir)
    else:  # as glmq bench builds it: on the GPU uncapped, quantized, then capped to the tier
        from glmq.quant.inplace import quantize_modules
        from glmq.runtime.load import from_modules

        cfg = BenchConfig(model=args.model, seed=args.seed)
        comps = _load_or_build(cfg, device, None)
        if args.recipe != "bf16":
            quantize_modules({k: comps[k] for k in ("vision_language_encoder", "transformer")}, args.recipe)
        for m in comps.values():
            m.to("cpu")
        _reset(device, args.tier)
        processor, tokenizer, sched = _offline_pieces()
        pipe = from_modules(comps, processor=processor, tokenizer=tokenizer, scheduler_config=sched,
                            device=str(device), vram_budget_gb=args.tier, compile=compile_, cache_dir=args.cache_dir)
    ready = time.perf_counter() - _START
    adopted = 0
    if pipe._autotune is not None:
        from glmq.kernels import _attention

        adopted = len(_attention.tuned_configs())  # adopted from the cache at load: nothing was tuned yet

    def image() -> float:
        t0 = time.perf_counter()
        pipe(args.prompt, height=h, width=w, num_inference_steps=args.steps, guidance_scale=args.guidance,
             generator=torch.Generator().manual_seed(args.seed), output_type="pt")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return round(time.perf_counter() - t0, 3)

    first = image()
    second = image() if args.second else None
    from torch._dynamo.utils import counters

    print(json.dumps({"ready_s": round(ready, 3), "first_s": first, "second_s": second, "compiled": pipe.compile,
                      "mode": str(pipe.mode), "fxgraph_cache_hit": counters["inductor"].get("fxgraph_cache_hit", 0),
                      "fxgraph_cache_miss": counters["inductor"].get("fxgraph_cache_miss", 0),
                      "autotune_adopted": adopted}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
