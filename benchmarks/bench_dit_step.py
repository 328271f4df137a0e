"""Milliseconds per GLM-Image denoising step (conditional + unconditional pass) at 1024x1024, full-size DiT.

Question: how fast is one classifier-free-guided denoising step of the released DiT architecture
(30 blocks, 32 heads x 128, random bf16 weights) with glmq's DitRunner, against the stock diffusers loop?

Shapes: latents 1 x 16 x 128 x 128 -> 4096 image tokens; glyph tokens 16 (conditional) and 1
(unconditional, the encoding of ""). FLOPs per pass with S = glyph + 4096 tokens, D = 4096, 30 blocks:
linears 24 * D^2 * S per block (q, k, v, out: 4 D^2; feed-forward D -> 4D -> D: 8 D^2; x2 for
multiply-add), attention 4 * S^2 * D per block (QK^T and PV). About 58 TFLOP per pass, 116 per step.

Variants (all time the whole step: forward(s), guidance, Euler update):
  stock            the GlmImagePipeline loop: two upstream forwards per step, stock processor
  batched_raw      DitRunner, cond+uncond in one forward, nothing precomputed (RoPE etc. per forward)
  separate_pre     DitRunner, two forwards per step, RoPE/projections/modulations precomputed
  batched_pre      DitRunner, one batched forward, precomputed
  batched_graph    ... plus a CUDA graph of the forward
  *_cudnn          the same under SDPA's cuDNN attention backend
  *_triton_attn    with glmq's Triton attention processor (glmq.runtime.attention), when it imports
  fp8_*            attn1.to_* / ff.net.* swapped to fp8 QuantLinear (glmq.quant.formats.linear), when it imports
  compile_*        torch.compile of every block (last: it is the slowest to prepare)

Correctness: one step of each main variant against an fp32 copy of the same weights (stock loop), as the
relative error of the latent update; the bf16 stock loop's own error is the yardstick.

Run on the GPU machine from the repo root: PYTHONPATH=. python benchmarks/bench_dit_step.py --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from glmq.bench.provenance import provenance, provenance_markdown

HEIGHT = WIDTH = 1024
GLYPH_COND, GLYPH_UNCOND = 16, 1
D, LAYERS = 4096, 30


def step_tflop(image_tokens: int = 4096) -> float:
    total = 0.0
    for glyph in (GLYPH_COND, GLYPH_UNCOND):
        s = glyph + image_tokens
        total += LAYERS * (24 * D * D * s + 4 * s * s * D)
    return total / 1e12


def build(device: str):
    from glmq.io.layout import BY_NAME
    from glmq.models.build import build_model
    from glmq.models.configs import component_config

    torch.manual_seed(0)
    dit = build_model(BY_NAME["transformer"], component_config("transformer", "full"), device=device,
                      dtype=torch.bfloat16)
    return dit.eval().requires_grad_(False)


def make_inputs(device: str, dit):
    g = torch.Generator(device=device).manual_seed(1)
    cfg = dit.config
    return {
        "latents": torch.randn((1, cfg.in_channels, HEIGHT // 8, WIDTH // 8), generator=g, device=device),
        "prompt_embeds": torch.randn((1, GLYPH_COND, cfg.text_embed_dim), generator=g, device=device,
                                     dtype=torch.bfloat16),
        "negative_prompt_embeds": torch.randn((1, GLYPH_UNCOND, cfg.text_embed_dim), generator=g, device=device,
                                              dtype=torch.bfloat16),
        "prior_token_ids": torch.randint(0, cfg.prior_vq_quantizer_codebook_size, (1, (HEIGHT // 16) * (WIDTH // 16)),
                                         generator=g, device=device),
    }


@torch.no_grad()
def stock_loop(dit, scheduler_config, inputs, steps, on_step=None, guidance_scale=1.5):
    """The denoising loop of diffusers.GlmImagePipeline.__call__ (steps 7-8), two upstream forwards per step."""
    from glmq.runtime.dit_loop import DitRunner

    device = inputs["latents"].device
    runner = DitRunner(dit, scheduler_config, device=device, dtype=dit.dtype)
    runner.remove()  # only its scheduler set-up is used: the forwards below are pure upstream
    latents = inputs["latents"].clone()
    ts = runner.schedule(HEIGHT, WIDTH, tuple(latents.shape[-2:]), steps)
    sched = runner.scheduler
    ids = inputs["prior_token_ids"]
    edt = inputs["prompt_embeds"].dtype  # the pipeline builds the size conditions in the embeddings' dtype
    target = torch.tensor([(HEIGHT, WIDTH)], dtype=edt, device=latents.device)
    crop = torch.tensor([(0, 0)], dtype=edt, device=latents.device)
    for i, t in enumerate(ts):
        x = latents.to(dit.dtype)
        timestep = t.expand(latents.shape[0]) - 1
        common = dict(hidden_states=x, prior_token_id=ids, timestep=timestep, target_size=target, crop_coords=crop,
                      return_dict=False)
        cond = dit(encoder_hidden_states=inputs["prompt_embeds"], prior_token_drop=torch.zeros_like(ids, dtype=torch.bool),
                   **common)[0].float()
        uncond = dit(encoder_hidden_states=inputs["negative_prompt_embeds"],
                     prior_token_drop=torch.ones_like(ids, dtype=torch.bool), **common)[0].float()
        latents = sched.step(uncond + guidance_scale * (cond - uncond), t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i, t, latents)
    return latents


def runner_loop(dit, scheduler_config, inputs, steps, on_step=None, **kw):
    from glmq.runtime.dit_loop import DitRunner

    runner = DitRunner(dit, scheduler_config, device=inputs["latents"].device, dtype=kw.pop("dtype", torch.bfloat16),
                       **kw)
    try:
        return runner.denoise(inputs["latents"].clone(), prompt_embeds=inputs["prompt_embeds"],
                              negative_prompt_embeds=inputs["negative_prompt_embeds"],
                              prior_token_ids=inputs["prior_token_ids"], height=HEIGHT, width=WIDTH,
                              num_inference_steps=steps, callback=on_step)
    finally:
        runner.remove()


def time_steps(loop, steps: int, skip: int = 2) -> dict:
    """Per-step times from device events recorded after every step; the first ``skip`` steps (warm-up, graph
    capture, compilation) are reported separately."""
    events = []

    def on_step(i, t, latents):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        events.append(ev)

    start = torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    loop(steps, on_step)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    marks = [start, *events]
    per = [marks[i].elapsed_time(marks[i + 1]) for i in range(len(events))]
    steady = per[skip:]
    return {"ms_per_step_median": statistics.median(steady), "ms_per_step_mean": statistics.fmean(steady),
            "ms_per_step_min": min(steady), "first_steps_ms": per[:skip], "timed_steps": len(steady),
            "wall_s": wall, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}


def update(loop, inputs) -> torch.Tensor:
    """The latent update of one step (dt * guided velocity), fp32."""
    return loop(1, None) - inputs["latents"]


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@contextlib.contextmanager
def sdpa_backend(name: str | None):
    if name is None:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, name)]):
        yield


def profile_step(loop, top: int = 12) -> dict:
    """Device time of one steady step by kernel class (GEMM, attention, other), from the PyTorch profiler."""
    from torch.profiler import ProfilerActivity, profile

    loop(2, None)  # warm
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loop(1, None)
        torch.cuda.synchronize()
    classes = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    kernels = []
    for ev in prof.key_averages():
        us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        if us <= 0:
            continue
        name = ev.key.lower()
        if any(k in name for k in ("gemm", "sm90", "cutlass", "matmul", "_scaled_mm", "nvjet", "xmma")) and "flash" not in name:
            cls = "gemm"
        elif any(k in name for k in ("flash", "fmha", "attention", "attn", "cudnn")):
            cls = "attention"
        else:
            cls = "other"
        classes[cls] += us / 1e3
        kernels.append((us / 1e3, cls, ev.key[:90]))
    kernels.sort(reverse=True)
    return {"ms_by_class": classes, "top_kernels": [{"ms": round(ms, 3), "class": c, "name": n} for ms, c, n in kernels[:top]]}


def write_report(runs: list[Path], to: Path) -> None:
    """Merge the JSON of device runs into ``to``.json and a Markdown table ``to``.md."""
    data = [json.loads(p.read_text()) for p in runs]
    prov = provenance()  # of this merge; each run carries its own
    to.with_suffix(".json").write_text(json.dumps({"benchmark": "dit_step", "provenance": prov, "runs": data},
                                                  indent=2) + "\n")
    lines = ["# DiT denoising step, 1024x1024, full-size GLM-Image DiT (random weights)", "",
             "One step = conditional + unconditional pass + guidance + Euler update; median over the steady steps of",
             "a 10-step run (CUDA events). Glyph tokens 16 (cond) / 1 (uncond), 4096 image tokens,",
             f"{data[0]['tflop_per_step']:.1f} TFLOP per step. Produced by `benchmarks/bench_dit_step.py`.",
             provenance_markdown(prov, "Merged by"), ""]
    for r in data:
        v = r["versions"]
        lines += [f"## {r['phase']} run: {r['card']}, {r['date']}",
                  f"torch {v['torch']} (CUDA {v['cuda']}), diffusers {v['diffusers']}, transformers {v['transformers']}",
                  provenance_markdown(r["provenance"]) if "provenance" in r else "Provenance: not recorded.", "",
                  "| variant | ms/step (median) | min | TFLOP/s | first two steps (ms) | peak GB | rel. err vs fp32 |",
                  "|---|---:|---:|---:|---|---:|---:|"]
        for name, m in r["variants"].items():
            err = r["errors"].get(name)
            lines.append(f"| {name} | {m['ms_per_step_median']:.1f} | {m['ms_per_step_min']:.1f} | {m['tflops']:.0f} | "
                         f"{', '.join('%.0f' % x for x in m['first_steps_ms'])} | {m['peak_gb']:.1f} | "
                         f"{'' if err is None else '%.2e' % err} |")
        for key in sorted(k for k in r if k.startswith("profile_") and r[k]):
            cls = r[key]["ms_by_class"]
            lines += ["", f"Kernel time of one step, {key[len('profile_'):]}: "
                      + ", ".join(f"{c} {ms:.1f} ms" for c, ms in cls.items())]
        if r["failures"]:
            lines += ["", "Failures: " + "; ".join(f"{k}: {e}" for k, e in r["failures"].items())]
        lines.append("")
    to.with_suffix(".md").write_text("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--report", type=Path, nargs="+", metavar="JSON",
                    help="instead of running: merge these run files into --out (a path without suffix)")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps per timed run (first 2 not timed)")
    ap.add_argument("--budget-s", type=float, default=330, help="skip compile variants past this many seconds")
    ap.add_argument("--skip", default="", help="comma-separated variant names to skip")
    ap.add_argument("--phase", choices=("sweep", "compile"), default="sweep",
                    help="sweep: every variant; compile: the baseline again, then the compiled variants with "
                         "their errors and a kernel profile of the best one")
    args = ap.parse_args()
    if args.out is None:
        ap.error("--out is required")
    if args.report:
        write_report(args.report, args.out)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    t_start = time.perf_counter()

    import diffusers
    import transformers

    from glmq.models.build import build_scheduler

    props = torch.cuda.get_device_properties(0)
    result = {
        "benchmark": "dit_step", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "card": props.name, "sm_count": props.multi_processor_count,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "shape": {"height": HEIGHT, "width": WIDTH, "image_tokens": 4096, "glyph_cond": GLYPH_COND,
                  "glyph_uncond": GLYPH_UNCOND, "dit": "full (30 x 32 heads x 128), random bf16 weights"},
        "phase": args.phase, "tflop_per_step": step_tflop(), "variants": {}, "errors": {}, "failures": {},
        "provenance": provenance(),
    }

    def save():
        (args.out / f"dit_step_{args.phase}.json").write_text(json.dumps(result, indent=2))

    dit = build("cuda")
    sched_cfg = build_scheduler().config
    inputs = make_inputs("cuda", dit)
    print(f"built in {time.perf_counter() - t_start:.1f}s; {torch.cuda.memory_allocated() / 1e9:.1f} GB", flush=True)

    loops = {
        "stock": lambda m: (lambda n, cb: stock_loop(m, sched_cfg, inputs, n, cb)),
        "batched_raw": lambda m: (lambda n, cb: runner_loop(m, sched_cfg, inputs, n, cb, precompute=False)),
        "separate_pre": lambda m: (lambda n, cb: runner_loop(m, sched_cfg, inputs, n, cb, batch_cfg=False)),
        "batched_pre": lambda m: (lambda n, cb: runner_loop(m, sched_cfg, inputs, n, cb)),
        "batched_graph": lambda m: (lambda n, cb: runner_loop(m, sched_cfg, inputs, n, cb, cuda_graph=True)),
    }

    def attempt(name, fn):
        if name in skip:
            return None
        try:
            out = fn()
            return out
        except Exception as e:  # record and go on: one broken variant must not lose the others' numbers
            result["failures"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            return None
        finally:
            save()

    # 1. correctness: one step against an fp32 copy of the weights
    ref_dit = copy.deepcopy(dit).float()
    ref_inputs = {k: (v.float() if v.is_floating_point() else v) for k, v in inputs.items()}

    @torch.no_grad()
    def ref_update():
        return stock_loop(ref_dit, sched_cfg, ref_inputs, 1) - inputs["latents"]

    ref = ref_update()
    del ref_dit
    torch.cuda.empty_cache()

    # 2. timings
    def timed(name, loop, backend=None):
        def go():
            torch.cuda.reset_peak_memory_stats()
            with sdpa_backend(backend):
                r = time_steps(loop, args.steps)
            r["tflops"] = result["tflop_per_step"] / (r["ms_per_step_median"] / 1e3)
            result["variants"][name] = r
            print(f"{name:28s} {r['ms_per_step_median']:8.2f} ms/step  {r['tflops']:6.1f} TFLOP/s  "
                  f"first {['%.0f' % x for x in r['first_steps_ms']]}  peak {r['peak_gb']:.1f} GB", flush=True)
        attempt(name, go)

    def with_triton_attention(model):
        from glmq.runtime.attention import install_dit_attention

        install_dit_attention(model, precision="bf16")

    def check(name, loop):
        err = attempt(f"err_{name}", lambda: rel(update(loop, inputs), ref))
        if err is not None:
            result["errors"][name] = err
            print(f"rel err vs fp32, {name}: {err:.3e}", flush=True)

    def fp8_copy():
        from glmq.quant.formats.linear import swap_linears

        model = copy.deepcopy(dit)
        plan = {}
        for i in range(len(model.transformer_blocks)):
            for leaf in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"):
                plan[f"transformer_blocks.{i}.{leaf}"] = {"format": "fp8_e4m3"}
        swap_linears(model, plan)
        return model

    def compiled(model, **kw):
        return lambda n, cb: runner_loop(model, sched_cfg, inputs, n, cb, compile=True, **kw)

    if args.phase == "compile":
        timed("stock", loops["stock"](dit))
        check("batched_compile_graph", compiled(dit, cuda_graph=True))
        timed("batched_compile_graph", compiled(dit, cuda_graph=True))
        fp8 = attempt("fp8_swap", fp8_copy)
        if fp8 is not None:
            with sdpa_backend("CUDNN_ATTENTION"):
                check("fp8_batched_compile_graph_cudnn", compiled(fp8, cuda_graph=True))
            timed("fp8_batched_compile_graph_cudnn", compiled(fp8, cuda_graph=True), "CUDNN_ATTENTION")
            timed("fp8_batched_compile_graph_cudnn_again", compiled(fp8, cuda_graph=True), "CUDNN_ATTENTION")
            timed("fp8_batched_compile_graph", compiled(fp8, cuda_graph=True))
            with sdpa_backend("CUDNN_ATTENTION"):
                result["profile_fp8_batched_compile_cudnn"] = attempt(
                    "profile_fp8_compile", lambda: profile_step(compiled(fp8), top=20))
            attempt("fp8_install_triton_attn", lambda: with_triton_attention(fp8))
            if "fp8_install_triton_attn" not in result["failures"]:
                timed("fp8_batched_compile_graph_triton_attn", compiled(fp8, cuda_graph=True))
        result["total_s"] = time.perf_counter() - t_start
        save()
        print(json.dumps({k: round(v["ms_per_step_median"], 2) for k, v in result["variants"].items()}))
        print("errors", json.dumps(result["errors"]))
        print("failures", json.dumps(result["failures"]))
        return 0

    for name in ("stock", "batched_pre", "batched_graph"):
        check(name, loops[name](dit))

    for name in loops:
        timed(name, loops[name](dit))
    timed("batched_graph_cudnn", loops["batched_graph"](dit), "CUDNN_ATTENTION")
    timed("stock_cudnn", loops["stock"](dit), "CUDNN_ATTENTION")

    def stock_attention(model):
        from diffusers.models.transformers.transformer_glm_image import GlmImageAttnProcessor

        for block in model.transformer_blocks:
            block.attn1.set_processor(GlmImageAttnProcessor())

    attempt("install_triton_attn", lambda: with_triton_attention(dit))
    triton_ok = "install_triton_attn" not in result["failures"] and "install_triton_attn" not in skip
    if triton_ok:
        check("batched_graph_triton_attn", loops["batched_graph"](dit))
        timed("batched_pre_triton_attn", loops["batched_pre"](dit))
        timed("batched_graph_triton_attn", loops["batched_graph"](dit))
        stock_attention(dit)

    # 3. fp8 linears, on a copy
    fp8 = attempt("fp8_swap", fp8_copy)
    if fp8 is not None:
        for name in ("batched_pre", "batched_graph"):
            check(f"fp8_{name}", loops[name](fp8))
        timed("fp8_batched_pre", loops["batched_pre"](fp8))
        timed("fp8_batched_graph", loops["batched_graph"](fp8))
        timed("fp8_batched_graph_cudnn", loops["batched_graph"](fp8), "CUDNN_ATTENTION")
        with sdpa_backend("CUDNN_ATTENTION"):
            result["profile_fp8_batched_pre_cudnn"] = attempt("profile_fp8", lambda: profile_step(loops["batched_pre"](fp8)))
        if triton_ok:
            attempt("fp8_install_triton_attn", lambda: with_triton_attention(fp8))
            timed("fp8_batched_graph_triton_attn", loops["batched_graph"](fp8))
            stock_attention(fp8)

    with sdpa_backend("CUDNN_ATTENTION"):
        result["profile_bf16_batched_pre_cudnn"] = attempt("profile_bf16", lambda: profile_step(loops["batched_pre"](dit)))

    # 4. torch.compile of the blocks (one graph shared by all 30), each variant only while time is left
    plan = [("batched_compile_graph", dit, True, None), ("fp8_batched_compile_graph_cudnn", fp8, True, "CUDNN_ATTENTION"),
            ("batched_compile", dit, False, None), ("batched_compile_graph_cudnn", dit, True, "CUDNN_ATTENTION")]
    for name, model, graph, backend in plan:
        if model is None:
            continue
        if time.perf_counter() - t_start > args.budget_s:
            result["failures"][name] = "skipped: time budget"
            continue
        timed(name, compiled(model, cuda_graph=graph), backend)
    result["total_s"] = time.perf_counter() - t_start
    save()
    print(json.dumps({k: round(v["ms_per_step_median"], 2) for k, v in result["variants"].items()}))
    print("errors", json.dumps(result["errors"]))
    print("failures", json.dumps(result["failures"]))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
