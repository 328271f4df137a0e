"""What one GPU can say about the two-GPU latency mode before two GPUs are lent (issue #20).

On a single GPU, in one process with a one-rank process group (NCCL on CUDA, gloo on the CPU):

1. AR decode, full size, int4 g128 asymmetric text decoder (the default recipe's layout; RTN scales, which
   cost the same per token as HQQ's), compiled and CUDA-graphed as ``glmq.load(compile=True)`` runs it:
   - ``ar_full``: the whole decoder, ms/token (the one-GPU figure);
   - ``ar_rank0_shard``: the same model sharded for 2 ranks (``shard_ar``) and decoded with rank 0's shard
     alone: half the query/KV heads, 54 of 107 MLP groups, half of lm_head, with the row-parallel all-reduces
     and the logits gather running over the one-rank group. This is rank 0's work per token in the latency
     mode *without the communication* (the NCCL calls are there but have no peer): a lower bound, and a check
     that the collectives compile and are captured in the step's CUDA graph.
2. The uneven row-parallel cut of ``down_proj`` (K = 13696 = 54 + 53 groups of 128) through the int4 Triton
   kernel: both shards' partial products summed, against the whole layer and the fp32 reference.
3. DiT, full size, default recipe (fp8 W8A8 blocks), compiled and graphed, 1024x1024: ms per step with both
   guidance passes batched (one GPU) and ms per pass at batch 1 (what each rank runs in the latency mode).

    python benchmarks/check_tp_one_gpu.py --out DIR [--device cpu --size tiny]   (a CPU dry run)

Writes ``DIR/tp_one_gpu.json`` (with provenance) and prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS: dict = {"rows": [], "checks": {}, "errors": []}


def log(msg: str) -> None:
    print(msg, flush=True)


def sync_time(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def quantize_text(model, group_size: int) -> None:
    from glmq.quant.formats import get_format
    from glmq.quant.formats.linear import swap_linears

    int4 = get_format("int4", group_size=group_size, symmetric=False)
    plan = {}
    for i in range(len(model.model.language_model.layers)):
        for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_up_proj", "down_proj"))):
            for n in names:
                plan[f"model.language_model.layers.{i}.{part}.{n}"] = {"format": int4}
    swap_linears(model, plan)  # RTN int4 on the device, the layer's weight freed as each one is replaced


def time_decode(name: str, model, inputs, side: int, note: str) -> None:
    from glmq.runtime.ar_engine import ArEngine, GridPlan

    plan = GridPlan.for_image(side, side)
    caught = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        engine = ArEngine(model, compile=True, cuda_graph=True)
        first, _ = sync_time(lambda: engine.generate(**inputs, generator=torch.Generator().manual_seed(0)))
        caught = [str(x.message)[:300] for x in w if "ArEngine" in str(x.message)]
    t1, _ = sync_time(lambda: engine.generate(**inputs, max_new_tokens=1, generator=torch.Generator().manual_seed(1)))
    runs = [sync_time(lambda: engine.generate(**inputs, generator=torch.Generator().manual_seed(2 + r)))[0]
            for r in range(2)]
    ms = (min(runs) - t1) / (plan.max_new_tokens - 1) * 1e3
    RESULTS["rows"].append({"what": name, "ms_per_token": round(ms, 3), "tokens": plan.max_new_tokens,
                            "plan_s": [round(x, 3) for x in runs], "first_call_s": round(first, 1),
                            "compiled": engine._compiled, "compile_warnings": caught, "note": note})
    log(f"ROW {RESULTS['rows'][-1]}")


def check_down_proj_cut(device, dtype) -> None:
    from glmq.quant.formats import get_format
    from glmq.quant.formats.linear import QuantLinear
    from glmq.runtime.parallel.shard import even_split, take_columns

    torch.manual_seed(0)
    lin = torch.nn.Linear(13696, 4096, bias=False, device=device, dtype=dtype)
    q = QuantLinear.from_linear(lin, get_format("int4", group_size=128, symmetric=False))
    cuts = [(a * 128, b * 128) for a, b in even_split(107, 2)]
    shards = [take_columns(q, a, b, keep_bias=False) for a, b in cuts]
    out = {"cuts": cuts}
    for rows in (1, 6):
        x = torch.randn(rows, 13696, device=device, dtype=dtype)
        with torch.no_grad():
            whole = q(x).float()
            summed = sum(s(x[:, a:b]).float() for s, (a, b) in zip(shards, cuts))
            ref = x.float() @ q.dequantize().T
        rel = lambda y: float((y - ref).norm() / ref.norm())  # noqa: E731
        out[f"rows_{rows}"] = {"whole_rel_err": rel(whole), "summed_shards_rel_err": rel(summed),
                               "kernel_ran": q.format.kernel_runs(x, (4096, 13696))}
    RESULTS["checks"]["down_proj_uneven_cut"] = out
    log(f"CHECK down_proj {out}")


def dit_steps(device, size: str, side: int) -> None:
    from glmq.io.layout import BY_NAME
    from glmq.models.build import build_model, build_scheduler
    from glmq.models.configs import component_config
    from glmq.quant.inplace import quantize_modules
    from glmq.runtime.attention import install_dit_attention
    from glmq.runtime.dit_loop import DitRunner

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        dit = build_model(BY_NAME["transformer"], component_config("transformer", size), device=str(device)).eval()
    finally:
        torch.set_default_dtype(previous)
    dit.requires_grad_(False)
    quantize_modules({"transformer": dit}, "default")
    if device.type == "cuda":
        install_dit_attention(dit, precision="bf16")
    sched = dict(build_scheduler().config)
    cfg = dit.config
    lat = torch.randn(1, cfg.in_channels, side // 8, side // 8, device=device, dtype=dtype)
    cond = torch.randn(1, 12, cfg.text_embed_dim, device=device, dtype=dtype)
    uncond = torch.randn(1, 1, cfg.text_embed_dim, device=device, dtype=dtype)
    prior = torch.randint(0, 16384 if size == "full" else 128, (1, (side // 16) ** 2), device=device)
    cuda = device.type == "cuda"
    for batched in (True, False):
        runner = DitRunner(dit, sched, device=device, dtype=dtype, batch_cfg=batched, cuda_graph=cuda, compile=cuda)

        def run(steps):
            return runner.denoise(lat, prompt_embeds=cond, negative_prompt_embeds=uncond, prior_token_ids=prior,
                                  height=side, width=side, num_inference_steps=steps, guidance_scale=1.5)

        first, _ = sync_time(lambda: run(4))
        t4 = min(sync_time(lambda: run(4))[0] for _ in range(2))
        t14 = min(sync_time(lambda: run(14))[0] for _ in range(2))
        ms = (t14 - t4) / 10 * 1e3
        name = "dit_step_batched_cfg" if batched else "dit_step_two_batch1_passes"
        row = {"what": name, "ms_per_step": round(ms, 2), "first_call_s": round(first, 1),
               "note": "both guidance passes in one batch-2 forward (one GPU)" if batched else
               "the two passes as two batch-1 forwards; half of it is one rank's pass in the latency mode"}
        if not batched:
            row["ms_per_batch1_pass"] = round(ms / 2, 2)
        RESULTS["rows"].append(row)
        log(f"ROW {row}")
        runner.remove()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="full")
    ap.add_argument("--skip-dit", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch.distributed as dist
    import transformers

    from glmq.bench.provenance import provenance
    from glmq.models.build import build_processor
    from glmq.runtime.parallel.shard import shard_ar

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # NCCL binds to an indexed device
    dtype = torch.bfloat16 if cuda else torch.float32
    RESULTS["env"] = {"card": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
                      "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                      "python": platform.python_version(), "size": args.size}
    RESULTS["provenance"] = provenance()
    path = args.out / "tp_one_gpu.json"

    def save():
        path.write_text(json.dumps(RESULTS, indent=2) + "\n")

    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=0, world_size=1,
                            device_id=device if cuda else None)
    side = 1024 if args.size == "full" else 64
    try:
        from bench_ar_decode import build_text_only

        t, model = sync_time(lambda: build_text_only(device, dtype, args.size))
        quantize_text(model, 128 if args.size == "full" else 32)  # tiny heads are 32 wide
        from glmq.runtime.attention import register_ar_attention

        if cuda:
            register_ar_attention()
            model.model.language_model.set_attn_implementation("glmq")
        inputs = build_processor().apply_chat_template(
            [[{"role": "user", "content": [{"type": "text", "text": "a photo of a cat"}]}]], tokenize=True,
            target_h=side, target_w=side, return_dict=True, return_tensors="pt").to(device)
        log(f"AR built and quantized in {t:.1f}s")
        time_decode("ar_full", model, inputs, side, "one GPU: the whole int4 decoder")
        save()
        shard_ar(model, 0, 2)
        head = model.lm_head  # a one-rank group gathers one part: rank 0's 8256 rows are the logits here
        head.sizes, head.out_features = head.sizes[:1], head.sizes[0]
        torch.cuda.empty_cache() if cuda else None
        time_decode("ar_rank0_shard", model, inputs, side,
                    "rank 0's shard alone (heads 0-15, MLP groups 0-53, lm_head rows 0-8255); all-reduces and the "
                    "gather over a one-rank group: no communication time")
        del model
        save()
    except Exception:
        RESULTS["errors"].append(traceback.format_exc())
        log(traceback.format_exc())
    save()
    try:
        if args.size == "full":
            check_down_proj_cut(device, dtype)
    except Exception:
        RESULTS["errors"].append(traceback.format_exc())
        log(traceback.format_exc())
    save()
    if not args.skip_dit:
        try:
            if cuda:
                torch.cuda.empty_cache()
            dit_steps(device, args.size, side)
        except Exception:
            RESULTS["errors"].append(traceback.format_exc())
            log(traceback.format_exc())
    save()
    log("\n| what | ms/token or ms/step | note |\n|---|---|---|")
    for r in RESULTS["rows"]:
        v = r.get("ms_per_token", r.get("ms_per_step"))
        log(f"| {r['what']} | {v} | {r['note']} |")
    dist.destroy_process_group()
    return 1 if RESULTS["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
