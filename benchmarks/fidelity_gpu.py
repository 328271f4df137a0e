"""Image PSNR on the GPU, compiled as ``glmq bench`` runs: the default recipe against bf16, and 8-bit DiT
attention against bf16 attention, at 1024x1024 and 2048x2048, with the same AR tokens and the same noise.

Three pipelines over full-size random weights built on the GPU from one seed (``glmq.bench.run``'s
``_random_components``; the script checks that the builds hold identical weights):

- ``bf16``: the unquantized model, bf16 DiT attention;
- ``default, bf16 attention`` and ``default, fp8 attention``: the ``default`` recipe quantized in place
  (int4 AR, fp8 W8A8 DiT blocks, int8 AdaLN), each with its DiT attention precision fixed. The recipe itself
  runs bf16 attention below 8192 tokens (1024x1024) and fp8 from there (2048x2048), so "the default recipe"
  is the first at 1024 and the second at 2048.

All three run as the bench runs them: ``torch.compile`` of the DiT blocks and CUDA graphs, resident.
For each size the AR of the default pipeline generates the prior tokens once (temperature sampling, seed 0);
every image then gets those tokens and one initial noise (seed 1), so each PSNR measures only the
difference between the two DiT/VAE paths. The first call of each pipeline at each size compiles; its image
is the measured one (compilation does not change the arithmetic). Random weights: the PSNR measures how far
the quantized arithmetic moves an image, not how a real checkpoint's images look.

The GPU budget is small (about 6 minutes), so the step counts are lower than the pipeline's 50 and are
recorded (``--steps``, ``--steps-2048``), and rows still to run when ``--budget-s`` seconds have passed are
recorded as not measured. Writes ``fidelity_gpu.json`` (with provenance) and ``fidelity_gpu.md`` into ``--out``.

    python benchmarks/fidelity_gpu.py --out $OUT/fidelity_gpu                                      # one H200
    python benchmarks/fidelity_gpu.py --model tiny --sizes 64,128 --steps 4 --steps-2048 2 --out /tmp/f  # CPU

On the CPU (the tiny model, fp32) there are no 8-bit attention kernels: only the bf16-attention pipelines
run, and the 8-bit rows say so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROMPT = "A street poster that says 'GLM-Image on every GPU', photographed at dusk, 35mm"
PIPELINES = {  # name -> (recipe quantized in place, DiT attention precision)
    "bf16": ("bf16", "bf16"),
    "default, bf16 attention": ("default", "bf16"),
    "default, fp8 attention": ("default", "fp8"),
}


def _log(msg: str) -> None:
    print(f"[fidelity_gpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _fingerprint(comps) -> float:
    """A cheap checksum of the DiT's and the AR's first weights (equal builds give equal sums)."""
    t = comps["transformer"].transformer_blocks[0].attn1.to_q.weight
    a = comps["vision_language_encoder"].model.language_model.layers[0].mlp.down_proj.weight
    return round(float(t.float().sum()) + float(a.float().sum()), 6)


def build_pipelines(model: str, device):
    """The three pipelines over identical random weights; returns ``{name: pipeline}`` and the fingerprints."""
    import torch

    from glmq.bench.run import _offline_pieces, _random_components
    from glmq.quant.inplace import quantize_modules
    from glmq.runtime.load import from_modules

    processor, tokenizer, sched = _offline_pieces()
    pipes, prints = {}, {}
    for name, (recipe, precision) in PIPELINES.items():
        if device.type != "cuda" and precision != "bf16":
            continue
        _log(f"{name}: building {model} weights")
        comps = _random_components(model, device, seed=0)
        if device.type != "cuda":
            for m in comps.values():
                m.to(torch.float32)
        prints[name] = _fingerprint(comps)
        if recipe != "bf16":
            quantize_modules({k: comps[k] for k in ("vision_language_encoder", "transformer")}, recipe)
        pipes[name] = from_modules(comps, processor=processor, tokenizer=tokenizer, scheduler_config=sched,
                                   device=str(device), compile=True, cuda_graph=True,
                                   attention_precision=precision if device.type == "cuda" else None)
    return pipes, prints


def run(args, save=None) -> dict:
    """Every size in turn; ``save(result)`` after each (the result so far, rows not reached left out)."""
    import torch

    from glmq.quant.metrics import psnr

    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.model == "full-random" and device.type != "cuda":
        raise SystemExit("fidelity_gpu: --model full-random needs a CUDA GPU; use --model tiny on a CPU")
    from glmq.quant.recipe import load_recipe

    min_tokens = load_recipe("default").attention.min_tokens  # where the recipe switches to fp8 attention
    pipes, prints = build_pipelines(args.model, device)
    same_weights = len(set(prints.values())) == 1
    images: dict = {}
    rows = []
    seconds: dict = {}
    tokens: dict = {}

    def snapshot() -> dict:
        return _result(started, args, device, prints, same_weights, tokens, seconds, rows)

    for size in args.sizes:
        steps = args.steps_2048 if size >= 2048 else args.steps
        key = f"{size}x{size}"
        if time.perf_counter() - started > args.budget_s:
            _log(f"{key}: skipped (time budget)")
            continue
        first = pipes["default, bf16 attention"]
        _log(f"{key}: AR tokens from the default pipeline (one DiT step)")
        t0 = time.perf_counter()
        first(PROMPT, height=size, width=size, num_inference_steps=1, generator=torch.Generator().manual_seed(0),
              output_type="latent")
        prior = first.last_prior_token_ids
        tokens[key] = {"generated": int(first.last_times.ar_tokens), "prior_ids": int(prior.numel()),
                       "ar_seconds": round(first.last_times.ar_s, 1),
                       "call_seconds": round(time.perf_counter() - t0, 1)}
        cfg = first.transformer.config
        latents = torch.randn(1, cfg.in_channels, size // 8, size // 8,
                              generator=torch.Generator().manual_seed(1))
        for name, pipe in pipes.items():
            if time.perf_counter() - started > args.budget_s:
                _log(f"{key} {name}: skipped (time budget)")
                continue
            _log(f"{key} {name}: {steps} steps (compiles on its first call)")
            t0 = time.perf_counter()
            img = pipe(PROMPT, height=size, width=size, num_inference_steps=steps, prior_token_ids=prior,
                       latents=latents.to(device, pipe.dtype), output_type="pt")
            if device.type == "cuda":
                torch.cuda.synchronize()
            images[(key, name)] = img.float().clamp(0, 1).cpu()
            seconds[f"{key} {name}"] = {"seconds_with_compile": round(time.perf_counter() - t0, 1),
                                        "dit_attention": pipe.attention_precision,
                                        "dit_ms_per_step": round(1000 * pipe.last_times.dit_s / max(1, steps), 1)}
        # The recipe's choice by the joint sequence (image tokens; the few glyph tokens cannot cross 8192 here).
        recipe_choice = "default, fp8 attention" if (size // 16) ** 2 >= min_tokens else "default, bf16 attention"
        comparisons = (
            ("default recipe vs bf16", recipe_choice, "bf16"),
            ("fp8 vs bf16 DiT attention (default recipe's weights)", "default, fp8 attention",
             "default, bf16 attention"),
        )
        for label, a, b in comparisons:
            row = {"size": key, "comparison": label, "steps": steps, "test": a, "reference": b}
            if (key, a) in images and (key, b) in images:
                row["psnr_db"] = round(float(psnr(images[(key, b)], images[(key, a)])), 2)
            else:
                missing = [n for n in (a, b) if (key, n) not in images]
                row["not_measured"] = ("8-bit attention kernels need a CUDA GPU" if device.type != "cuda"
                                       and any(PIPELINES[n][1] != "bf16" for n in missing if n in PIPELINES)
                                       else "time budget")
            rows.append(row)
            _log(f"{key} {label}: {row.get('psnr_db', row.get('not_measured'))}")
        if save is not None:  # what is measured so far survives a timeout at the next size
            save(snapshot())
    return snapshot()


def _result(started, args, device, prints, same_weights, tokens, seconds, rows) -> dict:
    from glmq.bench.provenance import provenance
    from glmq.bench.run import environment

    return {
        "provenance": provenance(),
        "environment": environment(device),
        "config": {"model": args.model, "prompt": PROMPT, "sizes": args.sizes, "steps": args.steps,
                   "steps_2048": args.steps_2048, "ar_seed": 0, "noise_seed": 1, "compile": device.type == "cuda",
                   "cuda_graph": device.type == "cuda", "budget_s": args.budget_s,
                   "note": "steps below the pipeline's 50 to fit the GPU budget; guidance 1.5 (the pipeline's)"},
        "same_weights_in_every_pipeline": same_weights,
        "weight_fingerprints": prints,
        "ar_tokens": tokens,
        "runs": seconds,
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }


def markdown(result: dict) -> str:
    from glmq.bench.provenance import provenance_markdown

    cfg = result["config"]
    lines = ["# Image PSNR on the GPU: default recipe vs bf16, 8-bit vs bf16 DiT attention", "",
             provenance_markdown(result["provenance"]), "",
             f"Model `{cfg['model']}` (random weights, one seed; identical in every pipeline: "
             f"{result['same_weights_in_every_pipeline']}), same AR tokens and noise per size, "
             f"compiled: {cfg['compile']}. {cfg['note']}.", "",
             "| size | comparison | steps | PSNR (dB) |", "|---|---|---|---|"]
    for r in result["rows"]:
        value = r["psnr_db"] if "psnr_db" in r else f"not measured ({r['not_measured']})"
        lines.append(f"| {r['size']} | {r['comparison']} | {r['steps']} | {value} |")
    lines += ["", "Runs (the first call of each pipeline at a size includes its compilation):", ""]
    lines += [f"- {k}: {v}" for k, v in result["runs"].items()]
    lines += [f"- AR tokens {k}: {v}" for k, v in result["ar_tokens"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("tiny", "full-random"), default="full-random")
    ap.add_argument("--sizes", default="1024,2048", help="square sizes in pixels, comma-separated")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps below 2048x2048")
    ap.add_argument("--steps-2048", type=int, default=8, help="denoising steps at 2048x2048 and above")
    ap.add_argument("--budget-s", type=float, default=330.0, help="start no new image after this many seconds")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        print(f"fidelity_gpu: --sizes must be comma-separated integers, got {args.sizes!r}", file=sys.stderr)
        return 2
    if any(s % 32 for s in args.sizes) or min(args.steps, args.steps_2048) < 1:
        print("fidelity_gpu: sizes must be multiples of 32 and steps at least 1", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)

    def save(result: dict) -> str:
        (args.out / "fidelity_gpu.json").write_text(json.dumps(result, indent=2) + "\n")
        md = markdown(result)
        (args.out / "fidelity_gpu.md").write_text(md)
        return md

    print(save(run(args, save)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
