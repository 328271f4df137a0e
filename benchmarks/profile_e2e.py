"""Where the time of one glmq image goes, on the runtime as the bench runs it (compiled, CUDA graphs).

Builds the full-size random model, quantizes it with a recipe (default: ``default``), makes one warm-up image
(compilation and graph capture), then profiles with torch.profiler:
- the AR: ``--ar-tokens`` decode steps of the captured graph (plus one prefill);
- the DiT: a whole ``--steps`` denoising loop on fixed prior ids.
Kernels are sorted into classes by name, and each class's device time is reported per AR token and per DiT
step, beside the wall time of the same work. Writes ``profile.json`` and ``profile.md`` into ``--out``.

    python benchmarks/profile_e2e.py --out $OUT/profile                                 # GPU
    python benchmarks/profile_e2e.py --model tiny --size 64 --steps 2 --out /tmp/prof   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

PROMPT = "A street poster that says 'GLM-Image on every GPU', photographed at dusk, 35mm"
# First match wins; names as CUDA/Triton report them.
# Inductor names its kernels after the ops they fuse ("triton_poi_fused_..._attention_..._layer_norm"), so
# they are classed first, before a name pattern could count a fused LayerNorm as attention.
CLASSES = (
    ("fused elementwise/norm/RoPE/quantization (Inductor)", r"^triton_"),
    ("int4 GEMV/GEMM (glmq or tinygemm)", r"int4|tinygemm"),
    ("attention", r"attn|attention|flash|fmha|sdpa|cudnn"),
    ("8-bit activation quantization (glmq)", r"quantize_rows|int8_rescale"),
    ("GEMM (cuBLAS/cuBLASLt)", r"nvjet|gemm|cutlass|xmma|sm90_|sm80_|scaled_mm|_mm_"),
    ("sampling (sort, scan)", r"sort|radix|scan|cumsum"),
    ("convolution (VAE)", r"conv|implicit"),
)


def classify(name: str) -> str:
    for label, pattern in CLASSES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def summarize(prof, units: int, cuda: bool) -> dict:
    """Device time per class (GPU: kernel events only, so no op is counted twice; CPU: self CPU time)."""
    import torch

    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    by_class, kernels = defaultdict(float), 0
    top = []
    for ev in prof.key_averages():
        t = getattr(ev, key, 0) or 0
        if t <= 0 or (cuda and ev.device_type != torch.autograd.DeviceType.CUDA):
            continue
        by_class[classify(ev.key)] += t
        kernels += ev.count
        top.append((t, ev.count, ev.key[:100]))
    top.sort(reverse=True)
    return {"us_per_unit": {k: round(v / units, 1) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
            "total_us_per_unit": round(sum(by_class.values()) / units, 1),
            "kernels_per_unit": round(kernels / units, 1),
            "top": [{"kernel": n, "calls": c, "us_per_unit": round(t / units, 1)} for t, c, n in top[:12]]}


def profiled(fn, units: int, cuda: bool, acts, sync, set_graph) -> dict:
    """Profile ``fn`` as it runs (CUDA graphs on). Should the profiler not see the kernels inside graph
    replays, profile it again with the graphs off: the same compiled kernels, launched one by one."""
    from torch.profiler import profile

    with profile(activities=acts) as prof:
        fn()
        sync()
    part = summarize(prof, units, cuda)
    part["profiled_with_cuda_graphs"] = cuda
    if cuda and part["kernels_per_unit"] < 5:
        set_graph(False)
        try:
            with profile(activities=acts) as prof:
                fn()
                sync()
        finally:
            set_graph(True)
        part = summarize(prof, units, cuda)
        part["profiled_with_cuda_graphs"] = False
    return part


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("tiny", "full-random"), default="full-random")
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--ar-tokens", type=int, default=128)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity

    from glmq.bench.provenance import provenance, provenance_markdown
    from glmq.bench.run import environment, random_pipeline

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = random_pipeline(args.model, args.recipe, device, compile=cuda)
    size, steps = args.size, args.steps
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    pipe(PROMPT, height=size, width=size, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
    warmup_s = time.perf_counter() - t0
    prior = pipe.last_prior_token_ids
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    engine = pipe._engine_for()
    inputs = pipe._ar_inputs(PROMPT, None, size, size)
    ar_kw = {k: inputs[k] for k in ("image_grid_thw", "attention_mask") if k in inputs}
    n = min(args.ar_tokens, engine.plan(inputs["input_ids"].to(device), inputs["image_grid_thw"]).max_new_tokens)
    def gen():
        return engine.generate(inputs["input_ids"], max_new_tokens=n, generator=torch.Generator().manual_seed(0),
                               **ar_kw)
    gen()  # same cache and graph as the warm-up image; this call only settles the profiler-free timing
    sync()
    t0 = time.perf_counter()
    gen()
    sync()
    ar_wall_ms = 1000 * (time.perf_counter() - t0) / n
    ar = profiled(gen, n, cuda, acts, sync, lambda on: setattr(engine, "cuda_graph", on))
    ar["wall_ms_per_token_incl_prefill"] = round(ar_wall_ms, 3)

    call = lambda: pipe(PROMPT, height=size, width=size, num_inference_steps=steps, prior_token_ids=prior,  # noqa: E731
                        generator=torch.Generator().manual_seed(1), output_type="latent")
    call()
    dit_wall_ms = 1000 * pipe.last_times.dit_s / steps
    dit = profiled(call, steps, cuda, acts, sync, lambda on: setattr(pipe._runner, "cuda_graph", on))
    dit["wall_ms_per_step"] = round(dit_wall_ms, 2)

    result = {"environment": environment(device),
              "config": {"model": args.model, "recipe": args.recipe, "size": size, "steps": steps, "ar_tokens": n,
                         "mode": pipe.mode, "compile": pipe.compile, "cuda_graph": pipe.cuda_graph,
                         "dit_attention": pipe.attention_precision, "warmup_image_s": round(warmup_s, 1)},
              "ar_per_token": ar, "dit_per_step": dit}
    (out / "profile.json").write_text(json.dumps(result, indent=2) + "\n")
    env = result["environment"]
    unit = "us of device time" if cuda else "us of CPU time"
    lines = [f"# Where one glmq image's time goes: {args.recipe} recipe, {size}x{size}, {env.get('card')}", "",
             f"{env['date']}; torch {env['torch']}, transformers {env['transformers']}, diffusers {env['diffusers']}, "
             f"triton {env.get('triton')}. Mode {pipe.mode}, compile {pipe.compile}, CUDA graphs {pipe.cuda_graph}, "
             f"DiT attention {pipe.attention_precision}. Produced by `benchmarks/profile_e2e.py`.",
             provenance_markdown(provenance()), ""]
    ar_wall = f"wall {ar['wall_ms_per_token_incl_prefill']} ms/token over {n} tokens incl. prefill"
    dit_wall = f"wall {dit['wall_ms_per_step']} ms/step"
    for title, part, wall in (("AR, per decode token", ar, ar_wall),
                              ("DiT, per denoising step (cond + uncond)", dit, dit_wall)):
        graphs = "with CUDA graphs" if part["profiled_with_cuda_graphs"] else "CUDA graphs off while profiled"
        graphs = graphs if cuda else "CPU"
        lines += [f"## {title}", "", f"{wall}; kernels {part['total_us_per_unit']} {unit} in "
                  f"{part['kernels_per_unit']} launches ({graphs})", "", "| class | us |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in part["us_per_unit"].items()]
        lines += ["", "| top kernels | calls (whole run) | us per unit |", "|---|---|---|"]
        lines += [f"| `{t['kernel']}` | {t['calls']} | {t['us_per_unit']} |" for t in part["top"]]
        lines.append("")
    (out / "profile.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
