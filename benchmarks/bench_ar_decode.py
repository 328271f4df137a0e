"""How many ms per token does GLM-Image's AR decode take: stock HF ``generate`` vs glmq's ``ArEngine``?

Full-size text decoder (40 layers, 4096 wide, GQA 32/2, lm_head 16512 rows) with random bf16 weights, built
directly on the GPU without the vision tower. 1024x1024 text-to-image plan: a ~31-token prompt, then
256 preview + 1024 target grid tokens + EOS = 1281 new tokens.

Providers:
- ``hf_generate``: ``model.generate(**inputs, do_sample=True)`` (dynamic cache) as the diffusers pipeline
  calls it; timed over 100 tokens, ms/token = (t(100) - t(4)) / 96, extrapolated to 1281 tokens.
- ``engine_eager``: ``ArEngine(cuda_graph=False, compile=False)``; ms/token = (t(64) - t(1)) / 63. Its
  greedy tokens/logits are the reference the other variants are compared with (and with HF greedy).
- ``engine_cuda_graph``: ``ArEngine(compile=False)``, the whole 1281-token plan; ms/token =
  (t(1281) - t(1)) / 1280; ``graph_replay_ms`` (in checks) times the captured step alone.
- ``engine_cuda_graph_compiled``: the step through ``torch.compile`` (fusing the layers' small ops), then
  captured; ``..._<backend>``: the same with the SDPA backend that was fastest on the decode shape.

Floor (memory bound, batch 1): every decode step reads all decoder + lm_head weights once,
bytes/token = sum(numel * element size) + KV cache slots read; floor = bytes / measured copy bandwidth.

Run on the device machine from the repository root:
    PYTHONPATH=. python benchmarks/bench_ar_decode.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from glmq.bench.provenance import provenance, provenance_markdown
from glmq.models.build import build_processor, config_object, norm_parameter_names
from glmq.models.configs import component_config
from glmq.runtime.ar_engine import ArEngine, GridPlan

RESULTS: dict = {"rows": [], "checks": {}, "errors": []}


def log(msg: str) -> None:
    print(msg, flush=True)


def build_text_only(device: torch.device, dtype: torch.dtype, size: str = "full", seed: int = 0):
    """GlmImageForConditionalGeneration on ``device``, vision tower removed, random weights."""
    from transformers import GlmImageForConditionalGeneration

    cfg = config_object("ar", component_config("vision_language_encoder", size))
    with torch.device("meta"):
        model = GlmImageForConditionalGeneration(cfg)
    model.model.visual = None  # 1.16 B parameters that text-to-image decode never touches
    model = model.to(dtype).to_empty(device=device)
    norms = norm_parameter_names(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in norms:
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
        rot = model.model.language_model.rotary_emb  # non-persistent fp32 buffers: recompute, as __init__ does
        inv_freq, _ = rot.compute_default_rope_parameters(rot.config, device)
        rot.inv_freq = inv_freq.float()
        rot.original_inv_freq = inv_freq.float().clone()
    return model.eval()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sync_time(fn):
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t, out


def copy_bandwidth(device) -> float:
    """Device-to-device copy GB/s (bytes read + written), the memory ceiling the floor is computed from."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n / statistics.median(times) / 1e9


def add_row(provider: str, ms_per_token: float, tokens_timed: int, note: str, bytes_per_token: float) -> None:
    row = {
        "provider": provider,
        "ms_per_token": round(ms_per_token, 3),
        "tokens_per_s": round(1e3 / ms_per_token, 1),
        "effective_GB_per_s": round(bytes_per_token / (ms_per_token / 1e3) / 1e9, 1),
        "tokens_timed": tokens_timed,
        "s_per_1281_tokens": round(ms_per_token * 1281 / 1e3, 2),
        "note": note,
    }
    RESULTS["rows"].append(row)
    log(f"ROW {row}")


@torch.no_grad()  # as generate() runs it: with grad on, Dynamo would recompile the step for autograd
def kernel_breakdown(engine: ArEngine, steps: int = 3) -> dict:
    """CUDA kernel time of eager decode steps, grouped (GEMM/GEMV, attention, other)."""
    from torch.profiler import ProfilerActivity, profile

    from glmq.runtime.ar_engine import _StepKey

    st = engine._states[1]
    key = next(iter(st.graphs), None) or _StepKey(st.batch, False, None, False, False, False)
    st.step.zero_()
    engine._run_step(st, key)  # compiled variants: make sure this key is compiled before profiling
    st.step.zero_()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine._run_step(st, key)
        torch.cuda.synchronize()
    groups = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    count = 0
    top = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if not t or ev.key.startswith(("ProfilerStep", "cuda")):
            continue
        name = ev.key.lower()
        if any(s in name for s in ("attention", "fmha", "flash", "sdpa")):
            groups["attention"] += t
        elif any(s in name for s in ("gemm", "gemv", "nvjet", "cutlass", "cublas", "splitk")):
            groups["gemm"] += t
        else:
            groups["other"] += t
        count += ev.count
        top.append((t, ev.key[:90], ev.count))
    top.sort(reverse=True)
    return {
        "us_per_step": {k: round(v / steps, 1) for k, v in groups.items()},
        "kernels_per_step": count / steps,
        "top": [{"us_per_step": round(t / steps, 1), "kernel": k, "calls_per_step": c / steps} for t, k, c in top[:12]],
    }


N_CHECK = 96  # greedy tokens compared between variants
REF: dict = {}


def compare_greedy(ref, got) -> dict:
    """Greedy agreement of ``got`` with ``ref`` ((tokens, logits) pairs): agreed prefix, and the largest logit
    difference on it relative to the largest reference logit (bf16 paths differ by rounding, so the token
    streams may part at a near-tie; after that the logits are of different sequences)."""
    rt, rl = ref
    gt, gl = got
    n = min(rt.shape[1], gt.shape[1])
    agree = int((rt[0, :n] == gt[0, :n]).int().cumprod(0).sum())
    k = max(agree, 1)
    rel = float((gl[:, :k] - rl[:, :k]).abs().max() / rl[:, :k].abs().max())
    return {"greedy_prefix_agreement": f"{agree}/{n}", "rel_logit_diff_on_prefix": float(f"{rel:.3g}")}


def sdpa_backend_times(tcfg, head_dim, cache_len, dtype, device) -> dict:
    """us per call of each SDPA backend on the decode shape, replayed from a CUDA graph (no launch gaps)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kv, rep = tcfg.num_key_value_heads, tcfg.num_attention_heads // tcfg.num_key_value_heads
    q = torch.randn(1, kv, rep, head_dim, dtype=dtype, device=device)
    k = torch.randn(1, kv, cache_len, head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    mask = torch.arange(cache_len, device=device).view(1, 1, 1, -1) < cache_len - 64
    times = {}
    for backend in ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        try:
            with sdpa_kernel([getattr(SDPBackend, backend)]):
                for _ in range(3):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(20):
                        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            graph.replay()
            start.record()
            for _ in range(10):
                graph.replay()
            end.record()
            end.synchronize()
            times[backend] = round(start.elapsed_time(end) * 1e3 / 200, 2)
        except Exception as e:  # noqa: BLE001 - a backend that refuses this shape is simply not a candidate
            log(f"SDPA {backend}: {type(e).__name__}: {e}")
    return times


def bench_engine(name: str, engine: ArEngine, inputs, plan: GridPlan, repeats: int, bytes_per_token: float) -> None:
    """Time the whole plan with ``engine``; check sampling validity, reproducibility and greedy agreement."""
    checks = {}
    g = torch.Generator().manual_seed(0)
    t_first, _ = sync_time(lambda: engine.generate(**inputs, generator=g))
    checks["first_call_s"] = round(t_first, 2)  # includes compile and graph capture
    checks["compiled"] = engine._compiled
    t1, _ = sync_time(lambda: engine.generate(**inputs, max_new_tokens=1, generator=g))
    runs = []
    for r in range(repeats):
        g = torch.Generator().manual_seed(100 + r)
        t, toks = sync_time(lambda: engine.generate(**inputs, generator=g))
        runs.append(t)
    t_full = statistics.median(runs)
    add_row(name, (t_full - t1) / (plan.max_new_tokens - 1) * 1e3, plan.max_new_tokens,
            f"whole plan, median of {repeats}: {t_full:.3f}s incl. {t1 * 1e3:.1f} ms prefill", bytes_per_token)
    checks["full_plan_s"] = [round(x, 3) for x in runs]
    checks["sampled_grid_ids_valid"] = bool((toks[:, : plan.num_grid_tokens] < engine.valid_vocab).all())
    checks["sampled_distinct_ids"] = int(toks.unique().numel())
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    checks["reproducible_with_generator"] = bool(torch.equal(
        engine.generate(**inputs, generator=g1), engine.generate(**inputs, generator=g2)))
    st = engine._states[1]
    graph = next(iter(st.graphs.values()), None)
    if graph is not None:  # the captured step alone: no prefill, no host loop
        st.step.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        n_rep = min(500, plan.num_grid_tokens)
        start.record()
        for _ in range(n_rep):
            graph.replay()
        end.record()
        end.synchronize()
        checks["graph_replay_ms"] = round(start.elapsed_time(end) / n_rep, 3)
    got = engine.generate(**inputs, max_new_tokens=N_CHECK, greedy=True, output_logits=True)
    if "greedy" in REF:
        checks["vs_engine_eager"] = compare_greedy(REF["greedy"], got)
    if "hf" in REF:
        checks["vs_hf_greedy"] = compare_greedy(REF["hf"], got)
    if engine._compiled and torch.cuda.is_available():
        try:
            RESULTS[f"kernel_breakdown_{name}_step"] = kernel_breakdown(engine)
            log(f"BREAKDOWN {name} {RESULTS[f'kernel_breakdown_{name}_step']}")
        except Exception:
            RESULTS["errors"].append(f"{name} breakdown: " + traceback.format_exc())
    RESULTS["checks"][name] = checks
    log(f"CHECKS {name} {checks}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--hf-tokens", type=int, default=100)
    ap.add_argument("--eager-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--size", default="full", help="model size; 'tiny' (with --device cpu) is a dry run")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tag", default="h100", help="results file name: ar_decode_<tag>.{json,md}")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import transformers

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    RESULTS["env"] = {
        "card": torch.cuda.get_device_name(device) if on_gpu else platform.processor() or "cpu",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "dtype": str(dtype).removeprefix("torch."),
        "size": args.size,
    }
    RESULTS["provenance"] = provenance()
    try:
        import triton

        RESULTS["env"]["triton"] = triton.__version__
    except ImportError:
        pass
    log(f"ENV {RESULTS['env']}")
    RESULTS["env"]["copy_GB_per_s"] = round(copy_bandwidth(device), 1) if on_gpu else 10.0

    t, model = sync_time(lambda: build_text_only(device, dtype, args.size))
    log(f"built in {t:.1f}s" + (f", {torch.cuda.memory_allocated() / 1e9:.2f} GB allocated" if on_gpu else ""))
    text = model.model.language_model
    weight_bytes = sum(p.numel() * p.element_size() for n, p in text.named_parameters() if "embed_tokens" not in n)
    weight_bytes += sum(p.numel() * p.element_size() for p in model.lm_head.parameters())
    processor = build_processor()
    side = 1024 if args.size == "full" else 64
    inputs = processor.apply_chat_template(
        [[{"role": "user", "content": [{"type": "text", "text": "a photo of a cat"}]}]],
        tokenize=True, target_h=side, target_w=side, return_dict=True, return_tensors="pt").to(device)
    prompt_len = inputs["input_ids"].shape[1]
    plan = GridPlan.for_image(side, side)
    tcfg = text.config
    head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
    kv_slot_bytes = 2 * tcfg.num_hidden_layers * tcfg.num_key_value_heads * head_dim * dtype.itemsize
    cache_len = -(-(prompt_len + plan.max_new_tokens) // 128) * 128
    bytes_per_token = weight_bytes + kv_slot_bytes * cache_len
    floor_ms = bytes_per_token / (RESULTS["env"]["copy_GB_per_s"] * 1e9) * 1e3
    RESULTS["shape"] = {"prompt_tokens": prompt_len, "new_tokens": plan.max_new_tokens, "grids": plan.grids,
                        "weight_GB_per_token": round(weight_bytes / 1e9, 3), "cache_len": cache_len,
                        "bytes_per_token_GB": round(bytes_per_token / 1e9, 3), "floor_ms_per_token": round(floor_ms, 3)}
    log(f"SHAPE {RESULTS['shape']}")

    def save():
        (args.out / f"ar_decode_{args.tag}.json").write_text(json.dumps(RESULTS, indent=2) + "\n")

    # -- stock HF generate -------------------------------------------------------------------------------
    try:
        hf = lambda n: model.generate(**inputs, max_new_tokens=n, do_sample=True)  # noqa: E731
        sync_time(lambda: hf(4))
        t4, _ = sync_time(lambda: hf(4))
        tn, out = sync_time(lambda: hf(args.hf_tokens))
        n_done = out.shape[1] - prompt_len
        add_row("hf_generate", (tn - t4) / (n_done - 4) * 1e3, n_done,
                f"dynamic cache, do_sample=True; extrapolated from {n_done} tokens", bytes_per_token)
    except Exception:
        RESULTS["errors"].append(traceback.format_exc())
        log(traceback.format_exc())
    save()

    # -- engine, eager (no graph, no compile): the reference the faster variants are checked against -----------
    eager = None
    try:
        eager = ArEngine(model, cuda_graph=False, compile=False, max_cache_len=cache_len)
        g = torch.Generator().manual_seed(0)
        sync_time(lambda: eager.generate(**inputs, max_new_tokens=8, generator=g))
        t1, _ = sync_time(lambda: eager.generate(**inputs, max_new_tokens=1, generator=g))
        tn, _ = sync_time(lambda: eager.generate(**inputs, max_new_tokens=args.eager_tokens, generator=g))
        add_row("engine_eager", (tn - t1) / (args.eager_tokens - 1) * 1e3, args.eager_tokens,
                "static cache, SDPA, sampling on device, no CUDA graph, no compile", bytes_per_token)
        RESULTS["checks"]["prefill_plus_first_token_s"] = round(t1, 4)
        REF["greedy"] = eager.generate(**inputs, max_new_tokens=N_CHECK, greedy=True, output_logits=True)
        hf_out = model.generate(**inputs, max_new_tokens=32, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
        REF["hf"] = (hf_out.sequences[:, prompt_len:], torch.stack(hf_out.logits, 1).float())
        RESULTS["checks"]["engine_eager"] = compare_greedy(REF["hf"], REF["greedy"])
        if on_gpu:
            RESULTS["kernel_breakdown_eager_step"] = kernel_breakdown(eager)
            log(f"BREAKDOWN {RESULTS['kernel_breakdown_eager_step']}")
    except Exception:
        RESULTS["errors"].append(traceback.format_exc())
        log(traceback.format_exc())
    save()

    # -- SDPA backends on the decode attention shape (packed GQA: 16 query rows per KV head) ------------------
    best_backend = None
    if on_gpu:
        try:
            RESULTS["sdpa_decode_us"] = sdpa_backend_times(tcfg, head_dim, cache_len, dtype, device)
            log(f"SDPA {RESULTS['sdpa_decode_us']}")
            best_backend = min(RESULTS["sdpa_decode_us"], key=RESULTS["sdpa_decode_us"].get)
        except Exception:
            RESULTS["errors"].append(traceback.format_exc())
            log(traceback.format_exc())
    save()

    # -- engine with CUDA graph: uncompiled, compiled, compiled with the fastest SDPA backend -----------------
    variants = [("engine_cuda_graph", dict(compile=False)), ("engine_cuda_graph_compiled", dict(compile=True))]
    if best_backend is not None:
        from torch.nn.attention import SDPBackend

        variants.append((f"engine_cuda_graph_compiled_{best_backend.lower()}",
                         dict(compile=True, sdpa_backends=[getattr(SDPBackend, best_backend)])))
    for name, kw in variants:
        try:
            bench_engine(name, ArEngine(model, max_cache_len=cache_len, **kw), inputs, plan, args.repeats,
                         bytes_per_token)
        except Exception:
            RESULTS["errors"].append(f"{name}: " + traceback.format_exc())
            log(traceback.format_exc())
        torch.cuda.empty_cache() if on_gpu else None
        save()
    if on_gpu:
        RESULTS["checks"]["peak_allocated_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    save()
    write_markdown(args.out / f"ar_decode_{args.tag}.md")


def write_markdown(path: Path) -> None:
    env, shape = RESULTS["env"], RESULTS.get("shape", {})
    lines = [
        f"# AR decode, GLM-Image text decoder ({env['size']} size, random {env['dtype']} weights), text-to-image plan",
        "",
        f"{env['card']}, {env['date']}, torch {env['torch']} (CUDA {env['cuda']}), transformers "
        f"{env['transformers']}, triton {env.get('triton', '-')}; device copy {env.get('copy_GB_per_s')} GB/s.",
        f"Prompt {shape.get('prompt_tokens')} tokens, {shape.get('new_tokens')} new tokens (grids "
        f"{shape.get('grids')}); {shape.get('bytes_per_token_GB')} GB read per token (weights + KV slots), "
        f"floor {shape.get('floor_ms_per_token')} ms/token.",
        provenance_markdown(RESULTS["provenance"]),
        "",
        "| provider | ms/token | tokens/s | effective GB/s | s per 1281 tokens | tokens timed | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in RESULTS["rows"]:
        lines.append(f"| {r['provider']} | {r['ms_per_token']} | {r['tokens_per_s']} | {r['effective_GB_per_s']} | "
                     f"{r['s_per_1281_tokens']} | {r['tokens_timed']} | {r['note']} |")
    lines += ["", "Checks:", ""] + [f"- {k}: {v}" for k, v in RESULTS["checks"].items()]
    if "sdpa_decode_us" in RESULTS:
        lines += ["", f"SDPA on the decode shape (us/call, CUDA-graph replay): {RESULTS['sdpa_decode_us']}"]
    for k, kb in RESULTS.items():
        if k.startswith("kernel_breakdown_"):
            lines += ["", f"{k.removeprefix('kernel_breakdown_')}: CUDA kernel time per step (us, profiled outside "
                          f"the graph) {kb['us_per_step']}, {kb['kernels_per_step']:.0f} kernels/step."]
    if RESULTS["errors"]:
        lines += ["", f"{len(RESULTS['errors'])} error(s): see the JSON."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
