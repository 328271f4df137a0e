"""Does ``glmq serve`` batch concurrent clients, and what does a client wait? Latency per request, the batch
sizes the queue formed, images per hour.

The question (issue #15, item 3): four clients each ask for n=4 images at 1024x1024 at the same moment. The
server should decode their AR sequences together (one pipeline call of 16 images with ``--max-batch 16``,
read from its /metrics), and the script records what each client waited and the images per hour that makes.

The server runs in this process exactly as ``glmq serve`` runs it (``GlmqServer``: uvicorn in a thread, one
GPU worker thread owning the pipeline); the clients are threads sending real HTTP requests, released together
by a barrier. A warm-up round with the measured round's shapes (the same clients, n and size, with
``--warmup-steps`` steps) pays for compilation and CUDA-graph capture first; a pipeline without batching
warms up with one image. Writes ``serve_clients.json`` (with provenance) into ``--out`` and prints one table.

    python benchmarks/serve_clients.py --out $OUT/serve                      # H200: full-size random weights
    python benchmarks/serve_clients.py --model tiny --size 64x64 --steps 2 --out /tmp/serve   # CPU smoke test
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = ["A street poster that says 'GLM-Image on every GPU', photographed at dusk, 35mm",
           "A watercolor fox reading a newspaper in a cafe",
           "A neon sign that says 'glmq' above a rainy alley",
           "An isometric cutaway of a tiny bakery, soft light"]


def _pipeline(args):
    import torch

    import glmq

    if args.model == "full-random":
        from glmq.bench.run import random_pipeline

        return random_pipeline("full-random", args.recipe, "cuda", compile=not args.no_compile,
                               vram_budget_gb=args.vram_budget_gb)
    path = args.model
    if args.model == "tiny":
        from glmq.maketiny import make_tiny

        path = make_tiny(Path(tempfile.mkdtemp(prefix="glmq-serve-bench-")) / "tiny", progress=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return glmq.load(path, device=device, vram_budget_gb=args.vram_budget_gb, compile=not args.no_compile)


def _round(url: str, clients: int, n: int, size: str, steps: int, seed: int) -> dict:
    """``clients`` concurrent requests of ``n`` images; per request the status, latency and seeds."""
    from PIL import Image

    from glmq.testing import http

    answers: list[dict] = [{} for _ in range(clients)]
    start = threading.Barrier(clients + 1)

    def client(i):
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "n": n, "size": size, "steps": steps, "seed": seed + 100 * i}
        start.wait()
        t0 = time.perf_counter()
        status, answer, _ = http("POST", url + "/v1/images/generations", body, timeout=3600)
        latency = time.perf_counter() - t0
        record = {"client": i, "n": n, "status": status, "latency_s": round(latency, 3)}
        if status == 200:
            sizes = {Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).size for d in answer["data"]}
            record.update(images=len(answer["data"]), image_sizes=sorted(f"{w}x{h}" for w, h in sizes),
                          seeds=[d["seed"] for d in answer["data"]])
        else:
            record["error"] = answer
        answers[i] = record

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    images = sum(a.get("images", 0) for a in answers)
    latencies = [a["latency_s"] for a in answers if a["status"] == 200]
    return {"wall_s": round(wall, 3), "images": images,
            "images_per_hour": round(images / wall * 3600, 1) if images else 0.0,
            "latency_s": ({"median": round(statistics.median(latencies), 3), "min": min(latencies),
                           "max": max(latencies)} if latencies else None),
            "requests": answers}


def _metrics(url: str) -> dict:
    from glmq.testing import http

    return http("GET", url + "/metrics?format=json")[1]


def _delta(after: dict, before: dict) -> dict:
    """What the server recorded during one round."""
    batches = {k: v - before["batches"].get(k, 0) for k, v in after["batches"].items()
               if v - before["batches"].get(k, 0)}
    stages = {k: round(v - before["stage_seconds"][k], 3) for k, v in after["stage_seconds"].items()}
    wait = after["queue_wait_seconds"]
    wait_before = before["queue_wait_seconds"]
    count = wait["count"] - wait_before["count"]
    return {"batches": batches, "stage_seconds": stages,
            "batch_seconds": round(after["batch_seconds"] - before["batch_seconds"], 3),
            "queue_wait_mean_s": round((wait["sum"] - wait_before["sum"]) / count, 3) if count else None,
            "failures": {k: v - before["failures"].get(k, 0) for k, v in after["failures"].items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for serve_clients.json")
    ap.add_argument("--model", default="full-random",
                    help="full-random (the released sizes, random weights, built on the GPU), tiny, or a folder")
    ap.add_argument("--recipe", default="default", help="for full-random: recipe to quantize with, or bf16")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--n", type=int, default=4, help="images per request")
    ap.add_argument("--size", default="1024x1024")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup-steps", type=int, default=4,
                    help="steps of the warm-up round (its shapes are the measured round's; default 4)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--batch-window-ms", type=float, default=500.0)
    ap.add_argument("--vram-budget-gb", type=float, default=None)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from glmq.bench.provenance import provenance
    from glmq.bench.run import environment
    from glmq.io.images import parse_size
    from glmq.serve.api import Limits
    from glmq.serve.server import GlmqServer, ServeOptions

    width, height = parse_size(args.size)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pipe = _pipeline(args)
    load_s = time.perf_counter() - t0
    limits = Limits(max_n=max(args.n, 1), max_side=max(width, height, 2048),
                    max_steps=max(args.steps, args.warmup_steps, 100))
    server = GlmqServer(pipe, ServeOptions(port=0, max_batch=args.max_batch, max_queue=max(32, args.clients),
                                           batch_window_s=args.batch_window_ms / 1000, limits=limits,
                                           access_log=False, log_level="warning"))
    url = server.start()
    result = {"question": "does glmq serve batch concurrent clients; latency per request, batch sizes, images/hour",
              **environment(pipe.device), "provenance": provenance(),
              "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                         "supports_batch": server.batcher.batched, "max_batch_used": server.batcher.max_batch,
                         "memory_mode": str(pipe.mode), "load_s": round(load_s, 1)}}
    out_file = args.out / "serve_clients.json"
    try:
        if pipe.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pipe.device)
        before = _metrics(url)
        if server.batcher.batched:
            warm = _round(url, args.clients, args.n, args.size, args.warmup_steps, args.seed + 10_000)
        else:
            warm = _round(url, 1, 1, args.size, args.warmup_steps, args.seed + 10_000)
        after_warm = _metrics(url)
        result["warmup"] = {**warm, "server": _delta(after_warm, before)}
        out_file.write_text(json.dumps(result, indent=2) + "\n")
        print(f"warm-up: {warm['wall_s']} s", file=sys.stderr, flush=True)
        measured = _round(url, args.clients, args.n, args.size, args.steps, args.seed)
        result["round"] = {**measured, "server": _delta(_metrics(url), after_warm)}
        if pipe.device.type == "cuda":
            result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(pipe.device) / 2**30, 3)
            result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(pipe.device) / 2**30, 3)
    finally:
        server.stop()
        out_file.write_text(json.dumps(result, indent=2) + "\n")
    r = result["round"]
    lat = r["latency_s"] or {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    st = r["server"]["stage_seconds"]
    print(f"{result.get('card', result['device'])}, {args.model} {args.recipe}, torch {result['torch']}, "
          f"commit {result['provenance']['git_commit']}")
    print("| clients x n | size | steps | max batch | batches run (size: count) | wall s | images/h | "
          "latency s median (min-max) | AR s | DiT s | VAE s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.clients} x {args.n} | {args.size} | {args.steps} | {server.batcher.max_batch} | "
          f"{r['server']['batches']} | {r['wall_s']} | {r['images_per_hour']} | {lat['median']} ({lat['min']}-"
          f"{lat['max']}) | {st['ar']} | {st['dit']} | {st['vae']} |")
    print(f"-> {out_file}")
    ok = all(a["status"] == 200 for a in r["requests"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
