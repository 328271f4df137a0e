"""Does copying the next DiT block while the current one runs (glmq.runtime.placement.BlockStreamer) pay
in the offload mode, and does it change the image?

The overlap is off unless ``GLMQ_PREFETCH=1``; this script switches it per call. One full-size random pipeline
(default recipe, quantized in memory) in the offload mode, not compiled (the
streamed DiT runs eager in every offload call). After a short warm-up call, the same seed is generated with
the copies on the compute stream (``prefetch`` off: copy, then compute, per block) and overlapped (on),
twice each in alternation. Reports DiT ms/step, the H2D bytes per step, and whether the images are
bit-identical. Writes ``offload_prefetch.json`` into --out.

    python benchmarks/check_offload_prefetch.py --out OUT [--size 1024] [--steps 8]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from glmq.bench.provenance import provenance
from glmq.bench.run import environment, random_pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pipe = random_pipeline("full-random", "default", "cuda", mode="offload", compile=False)
    streamer = pipe.placement.streamers["dit"]
    block_bytes = sum(cpu.numel() * cpu.element_size() for p in streamer.parked for *_, cpu in p.slots)
    print(f"built in {time.time() - t0:.0f} s; streamed DiT blocks: {len(streamer.parked)}, "
          f"{block_bytes / 1e9:.2f} GB per step", flush=True)

    def run(prefetch: bool, steps: int) -> dict:
        streamer.prefetch = prefetch
        if prefetch and streamer.copy_stream is None:
            streamer.copy_stream = torch.cuda.Stream(pipe.device)
        gen = torch.Generator("cpu").manual_seed(0)
        torch.cuda.reset_peak_memory_stats()
        img = pipe("a red bicycle in front of a bakery, poster text \"OPEN\"", height=args.size, width=args.size,
                   num_inference_steps=steps, generator=gen, progress=False).images[0]
        t = pipe.last_times
        return {"prefetch": prefetch, "steps": steps, "dit_s": round(t.dit_s, 3),
                "dit_ms_per_step": round(1000 * t.dit_s / steps, 1),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
                "image_sha256": hashlib.sha256(img.tobytes()).hexdigest()}

    run(True, 2)  # warm-up: kernels load, the allocator settles
    rows = [run(p, args.steps) for p in (False, True, False, True)]
    for r in rows:
        print(r, flush=True)
    off = [r["dit_ms_per_step"] for r in rows if not r["prefetch"]]
    on = [r["dit_ms_per_step"] for r in rows if r["prefetch"]]
    result = {"environment": environment(pipe.device), "provenance": provenance(),
              "config": {"size": args.size, "steps": args.steps, "recipe": "default", "mode": "offload",
                         "compile": False, "streamed_bytes_per_step": block_bytes},
              "rows": rows, "ms_per_step_sync": min(off), "ms_per_step_prefetch": min(on),
              "speedup": round(min(off) / min(on), 3),
              "same_image": len({r["image_sha256"] for r in rows}) == 1}
    (out / "offload_prefetch.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("ms_per_step_sync", "ms_per_step_prefetch", "speedup", "same_image")}))


if __name__ == "__main__":
    main()
