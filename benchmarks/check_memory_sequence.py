"""Does the memory plan hold for a sequence of calls in one process? GPU memory per stage, per call.

The question (fresh-machine issue): under a VRAM budget, a user makes several calls in one process:
text-to-image twice, then an edit of the last image, then an edit with two references. Each call must fit
the budget counted as a real card counts it: the caching allocator's peak *reserved* bytes plus the CUDA
context (driver, cuBLAS/cuDNN handles, loaded kernel modules), which lives outside the allocator.

The allocator is capped at ``budget - context`` (the context measured after warming the libraries up), so
an overrun shows as an OOM here rather than passing silently. Per call the script records seconds, stage
times, peak allocated / reserved bytes, the context, and ``peak_device_gib`` = peak reserved + context.
On an out-of-memory error it records where the live memory was (largest live blocks with the frames that
allocated them, from ``torch.cuda.memory._record_memory_history``) and goes on with the next call.

    python benchmarks/check_memory_sequence.py --tier 16 --out $OUT/seq16             # GPU, full-size random
    python benchmarks/check_memory_sequence.py --model tiny --size 64 --steps 2 --out /tmp/seq   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

T2I = "A street poster that says 'GLM-Image on every GPU', photographed at dusk, 35mm"
EDIT = "Make the poster say 'glmq' in bold red letters, keep everything else"


def _gib(n) -> float | None:
    return None if n is None else round(n / 2**30, 3)


def _top_live_blocks(limit: int = 12) -> list[dict]:
    """The largest live allocations with the innermost frames of our code (or any) that made them."""
    import torch

    snap = torch.cuda.memory._snapshot()
    blocks = []
    for seg in snap.get("segments", []):
        for b in seg.get("blocks", []):
            if b.get("state") != "active_allocated":
                continue
            frames = b.get("frames") or []
            ours = [f for f in frames if "glmq" in f.get("filename", "") or "diffusers" in f.get("filename", "")
                    or "transformers" in f.get("filename", "")]
            pick = (ours or frames)[:4]
            blocks.append({"bytes": b["size"], "frames": [f"{Path(f['filename']).name}:{f['line']} {f['name']}"
                                                            for f in pick]})
    blocks.sort(key=lambda b: -b["bytes"])
    by_site: dict[str, list[int]] = {}
    for b in blocks:
        key = " < ".join(b["frames"][:2]) or "?"
        by_site.setdefault(key, []).append(b["bytes"])
    sites = sorted(((sum(v), len(v), k) for k, v in by_site.items()), reverse=True)[:limit]
    return [{"gib": _gib(total), "blocks": n, "site": site} for total, n, site in sites]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("tiny", "full-random"), default="full-random")
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--tier", type=float, default=16.0, help="GPU budget in GiB (allocator cap = tier - context)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--history", action="store_true", help="record allocation stacks (slower) for OOM reports")
    ap.add_argument("--calls", default="t2i,t2i,edit1,edit1,edit2",
                    help="comma list of t2i | edit1 (edit the last image) | edit2 (two references)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch

    from glmq.bench.run import environment, random_pipeline, stage_dict
    from glmq.runtime.memory import GiB, cuda_context_bytes

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"environment": environment(device), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                    "config": vars(args), "calls": []}
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    pipe = random_pipeline(args.model, args.recipe, device, compile=not args.no_compile, vram_budget_gb=args.tier
                           if cuda else None)
    result["build_s"] = round(time.perf_counter() - t0, 1)
    result["mode"] = pipe.mode
    if cuda:
        context = cuda_context_bytes(device)
        total = torch.cuda.get_device_properties(device).total_memory
        cap = args.tier * GiB - context
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), torch.cuda.current_device())
        result.update(context_gib_at_start=_gib(context), allocator_cap_gib=_gib(cap))
        if args.history:
            torch.cuda.memory._record_memory_history(max_entries=100000)

    def write():
        (out / "memory_sequence.json").write_text(json.dumps(result, indent=2) + "\n")

    last, first = None, None
    for i, call in enumerate(args.calls.split(",")):
        refs = {"t2i": None, "edit1": [last] if last is not None else None,
                "edit2": [last, first.resize((args.size * 3 // 4, args.size))] if last is not None else None}[call]
        row: dict = {"call": call, "index": i}
        if call != "t2i" and refs is None:
            row["skipped"] = "no image to edit yet"
            result["calls"].append(row)
            continue
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        prompt = T2I if call == "t2i" else EDIT
        t0 = time.perf_counter()
        try:
            img = pipe(prompt, image=refs, height=args.size, width=args.size, num_inference_steps=args.steps,
                       generator=torch.Generator().manual_seed(7))[0]
            row.update(ok=True, seconds=round(time.perf_counter() - t0, 3), stages=stage_dict(pipe.last_times),
                       ar_tokens=pipe.last_times.ar_tokens)
            last = img
            first = first or img
        except torch.OutOfMemoryError as e:
            row.update(ok=False, seconds=round(time.perf_counter() - t0, 3), error=str(e).splitlines()[0][:300],
                       trace=traceback.format_exc().splitlines()[-12:])
            if cuda and args.history:
                row["live_at_oom"] = _top_live_blocks()
        if cuda:
            torch.cuda.synchronize(device)
            reserved_peak = torch.cuda.max_memory_reserved(device)
            ctx = cuda_context_bytes(device)
            row.update(peak_allocated_gib=_gib(torch.cuda.max_memory_allocated(device)),
                       peak_reserved_gib=_gib(reserved_peak), context_gib=_gib(ctx),
                       peak_device_gib=_gib(reserved_peak + ctx), within_tier=reserved_peak + ctx <= args.tier * GiB)
        result["calls"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("trace", "live_at_oom")}), flush=True)
        write()
    write()
    return 0 if all(r.get("ok", True) for r in result["calls"]) else 1


if __name__ == "__main__":
    sys.exit(main())
