"""The AR's batched decode (issue #13 item 2): ms per decode step and tokens per second for B sequences.

One engine (``ArEngine``: static cache, per-row slots, CUDA graph, compiled step as ``glmq.load(compile=True)``
runs it) decodes B independent 1024x1024 text-to-image sequences together (different prompts, one generator
each), for B = 1, 2, 4, 8, 16. Per B: one untimed generation (compilation and graph capture of B's step),
then a timed one: the decode loop's time from the end of the prefill (a device sync there) to the end,
divided by its steps. Tokens per second = B / step time (every row emits one token per step). The target of
issue #13: the step at B = 8 at most 1.3x the step at B = 1 (the weights are read once per step).

    python benchmarks/ar_batch_decode.py --out DIR                       # GPU: full-size random AR, default recipe
    python benchmarks/ar_batch_decode.py --model tiny --batches 1,2,4 --out DIR   # CPU: the tiny AR (a smoke test)

Bytes per step: the int4 AR weights are read once per step whatever B is; each row adds its own KV cache
read (40 layers x 2 x 2 heads x 128 x 2 bytes = 40 KiB per cached token) and its activations.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

PROMPTS = ["A street poster that says 'GLM-Image on every GPU', photographed at dusk, 35mm",
           "a red fox in fresh snow, morning light", "an isometric city block, pastel colours",
           "a bowl of ramen on a wooden table", "a lighthouse in a storm, oil painting",
           "a robot reading a newspaper in a cafe", "macro photo of a dragonfly wing",
           "a shop sign that says 'glmq' over a blue door"]


def build_ar(model: str, recipe: str, device):
    import torch

    from glmq.io.layout import BY_NAME
    from glmq.models.build import build_model
    from glmq.models.configs import component_config

    size = "full" if model == "full-random" else "tiny"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        ar = build_model(BY_NAME["vision_language_encoder"], component_config("vision_language_encoder", size),
                         device=str(device)).eval()
    finally:
        torch.set_default_dtype(previous)
    ar.requires_grad_(False)
    if recipe != "bf16":
        from glmq.quant.inplace import quantize_modules

        quantize_modules({"vision_language_encoder": ar}, recipe)
    from glmq.quant.formats import tinygemm

    if tinygemm.enabled(device):  # as glmq.load decides it (GLMQ_INT4_KERNEL; tinygemm by default on CUDA)
        tinygemm.install(ar, device)
    if device.type == "cuda":  # glmq's attention, as the pipeline installs it on CUDA
        from glmq.runtime.attention import register_ar_attention

        register_ar_attention()
        ar.model.language_model.set_attn_implementation("glmq")
    return ar


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--model", default="full-random", choices=("full-random", "tiny"))
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--size", default="1024x1024")
    ap.add_argument("--tokens", type=int, default=None, help="decode this many tokens per row (default: the grids)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--cache-dir", default=None, help="glmq compile cache folder (default: glmq's)")
    args = ap.parse_args(argv)

    import torch

    from glmq.bench.provenance import provenance, write_table_result
    from glmq.io.images import parse_size
    from glmq.models.build import build_processor
    from glmq.runtime.ar_engine import ArEngine, ArRequest
    from glmq.quant.formats import tinygemm
    from glmq.runtime.compile_cache import activate

    device = torch.device("cuda" if torch.cuda.is_available() and args.model == "full-random" else "cpu")
    if args.model == "full-random" and device.type != "cuda":
        raise SystemExit("--model full-random needs a CUDA GPU; use --model tiny on a CPU")
    cache = activate(args.cache_dir) if device.type == "cuda" else None
    batches = [int(b) for b in args.batches.split(",")]
    w, h = parse_size(args.size)
    t0 = time.perf_counter()
    ar = build_ar(args.model, args.recipe, device)
    build_s = time.perf_counter() - t0
    processor = build_processor()
    engine = ArEngine(ar, max_batch=max(batches), compile=not args.no_compile and device.type == "cuda")

    def requests(b: int, seed: int):
        out = []
        for i in range(b):
            msg = [[{"role": "user", "content": [{"type": "text", "text": PROMPTS[i % len(PROMPTS)]}]}]]
            inp = processor.apply_chat_template(msg, tokenize=True, target_h=h, target_w=w, return_dict=True,
                                                return_tensors="pt")
            out.append(ArRequest(inp["input_ids"], inp["image_grid_thw"], attention_mask=inp["attention_mask"],
                                 generator=torch.Generator().manual_seed(seed + i), max_new_tokens=args.tokens))
        return out

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def save():  # after each B: a run cut short keeps the rows it finished
        base = rows[0]["step_ms"] if rows and rows[0]["batch"] == 1 else None
        for r in rows:
            r["step_vs_b1"] = round(r["step_ms"] / base, 3) if base else None
        env = {"torch": torch.__version__, "device": str(device), "compiled": engine._compiled,
               "ar_step": engine.step_kind, "int4_kernel": tinygemm.kernel_in({"ar": ar}),
               "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"}
        if device.type == "cuda":
            import triton

            env["triton"] = triton.__version__
        result = {"benchmark": "ar_batch_decode", "provenance": provenance(), "environment": env, "model": args.model,
                  "recipe": args.recipe, "size": args.size, "build_s": round(build_s, 1),
                  "compile_cache": str(cache) if cache else None, "rows": rows}
        title = (f"AR batched decode: {env['card']}, {args.model} {args.recipe}, {args.size}, "
                 f"step {env['ar_step']}, int4 kernel {env['int4_kernel']}")
        columns = ["B", "ms/step", "vs B=1", "tokens/s", "tokens per row", "prefill s", "first call s"]
        cells = [[r["batch"], f"{r['step_ms']:.3f}", r["step_vs_b1"] or "-", f"{r['tokens_per_s']:.0f}",
                  r["tokens_per_row"], f"{r['prefill_s']:.3f}", f"{r['first_call_s']:.1f}"] for r in rows]
        return write_table_result(args.out, "ar_batch_decode", result, title, columns, cells)

    rows = []
    for b in batches:
        t = time.perf_counter()
        engine.generate_batch(requests(b, 0))  # compilation, graph capture
        warm_s = time.perf_counter() - t
        marks = {}

        def after(done, total):
            if done == 1:
                sync()
                marks["decode_start"] = time.perf_counter()

        sync()
        t = time.perf_counter()
        tokens = engine.generate_batch(requests(b, 0), step_callback=after)
        sync()
        end = time.perf_counter()
        steps = max(x.shape[-1] for x in tokens) - 1
        step_ms = 1000 * (end - marks["decode_start"]) / steps
        rows.append({"batch": b, "tokens_per_row": steps + 1, "step_ms": round(step_ms, 3),
                     "tokens_per_s": round(1000 * b / step_ms, 1), "prefill_s": round(marks["decode_start"] - t, 3),
                     "total_s": round(end - t, 3), "first_call_s": round(warm_s, 3)})
        print(f"B={b}: {step_ms:.3f} ms/step, {1000 * b / step_ms:.0f} tokens/s", file=sys.stderr, flush=True)
        save()
    print("\n".join(save()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
