"""Where ``glmq.load`` spends its time on a folder on disk (issue #15: a later ``glmq generate`` process spent
30.6 s loading, ``generate_wall_h200/``).

Times the imports, then ``glmq.load`` with each of its phases wrapped by a timer: the folder check, each
component's build and reads, and inside them the cumulative time of the file reads, the NaN/Inf checks and the
copies to the device; then the pipeline's assembly (embedding split, tinygemm repacking, attention, compile
cache). Phases that run inside others are indented in the table.

    python benchmarks/load_breakdown.py CHECKPOINT --out DIR [--device cuda] [--dtype bfloat16] [--repeat 2]

``--repeat 2`` loads twice in the process (the second with the page cache warm and the imports paid).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path


class Timers:
    """Inclusive seconds per call path ("load the components > read tensors"), in order of first appearance."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, ...], float] = {}
        self.calls: dict[tuple[str, ...], int] = defaultdict(int)
        self.local = threading.local()  # each thread's own stack of open phases
        self.lock = threading.Lock()
        self.sync = None  # torch.cuda.synchronize on CUDA, so a phase owns its device work

    def wrap(self, owner, attr: str, label: str) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            stack = getattr(self.local, "stack", None)
            if stack is None:
                stack = self.local.stack = []
            main = threading.current_thread() is threading.main_thread()
            # the loader's fill threads: their phases are rows of their own, summed over the threads
            stack.append(label if main else f"{label} (fill threads, summed)")
            path = tuple(stack)
            with self.lock:
                self.seconds.setdefault(path, 0.0)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.sync is not None and threading.current_thread() is threading.main_thread():
                    self.sync()
                with self.lock:
                    self.seconds[path] += time.perf_counter() - t
                    self.calls[path] += 1
                stack.pop()

        setattr(owner, attr, timed)

    def rows(self) -> dict[str, float]:
        """Inclusive seconds per path (" > "-joined); under a path with children, its own time first."""
        out = {}
        for path, sec in self.seconds.items():
            out[" > ".join(path)] = round(sec, 3)
            children = [c for c in self.seconds if len(c) == len(path) + 1 and c[:len(path)] == path]
            if children:
                out[" > ".join((*path, "(its own time)"))] = round(sec - sum(self.seconds[c] for c in children), 3)
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="compute dtype of the unquantized parts (default: glmq.load's)")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)

    imports = {}
    t = time.perf_counter()
    import torch

    imports["torch"] = time.perf_counter() - t
    t = time.perf_counter()
    import glmq

    imports["glmq"] = time.perf_counter() - t
    t = time.perf_counter()
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    imports["transformers + diffusers"] = time.perf_counter() - t
    t = time.perf_counter()
    import glmq.runtime.load as load_mod  # the runtime's own imports (pipeline, kernels' Python side)

    imports["glmq.runtime"] = time.perf_counter() - t

    from glmq.bench.provenance import provenance
    from glmq.io import finite, reader, safetensors_io
    from glmq.models import build
    from glmq.quant.formats import tinygemm
    from glmq.runtime import attention, compile_cache, embedding, loader

    timers = Timers()
    if args.device.startswith("cuda"):
        t = time.perf_counter()
        torch.cuda.init()
        torch.empty(1, device=args.device)
        imports["CUDA context"] = time.perf_counter() - t
        timers.sync = torch.cuda.synchronize
    timers.wrap(loader, "check_before_load", "check the folder (configs, headers, manifest sizes)")
    timers.wrap(loader, "load_component", "load the components")
    timers.wrap(build, "build_model", "build the modules")
    timers.wrap(reader, "read_tensor", "read tensors from the files")
    timers.wrap(safetensors_io, "read_into", "read bytes from the files")
    timers.wrap(finite, "check_finite", "NaN/Inf checks")
    timers.wrap(torch.nn.Module, "to_empty", "allocate the modules on the device")
    timers.wrap(torch.Tensor, "copy_", "copy tensors into the modules")
    timers.wrap(embedding, "split_embedding", "split the AR embedding")
    timers.wrap(tinygemm, "install", "repack int4 layers for tinygemm")
    timers.wrap(attention, "install_attention", "install the attention processors")
    timers.wrap(compile_cache, "activate", "activate the compile cache")
    timers.wrap(load_mod, "GlmqPipeline", "build the pipeline object")

    dtype = getattr(torch, args.dtype) if args.dtype else None
    loads = []
    for i in range(args.repeat):
        timers.seconds = {}
        timers.calls.clear()
        t = time.perf_counter()
        pipe = glmq.load(args.checkpoint, device=args.device, dtype=dtype)
        if timers.sync is not None:
            timers.sync()
        total = time.perf_counter() - t
        phases = timers.rows()
        loads.append({"load": i + 1, "seconds": round(total, 3), "phases": phases,
                      "calls": {" > ".join(k): v for k, v in timers.calls.items()},
                      "mode": str(getattr(pipe.mode, "value", pipe.mode))})
        print(f"load {i + 1}: {total:.2f} s", file=sys.stderr, flush=True)
        del pipe
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    files = sorted(p for p in args.checkpoint.rglob("*") if p.is_file())
    result = {"benchmark": "load_breakdown", "provenance": provenance(), "checkpoint": str(args.checkpoint),
              "checkpoint_bytes": sum(p.stat().st_size for p in files), "device": args.device,
              "card": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "imports_s": {k: round(v, 3) for k, v in imports.items()}, "loads": loads}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load_breakdown.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"{result['card']}, {result['checkpoint_bytes'] / 1e9:.2f} GB on disk, device {args.device}", "",
             "| phase | " + " | ".join(f"load {l['load']} s" for l in loads) + " |",
             "|---|" + "---|" * len(loads)]
    for k, v in imports.items():
        lines.append(f"| import {k} | {round(v, 3)} |" + " - |" * (len(loads) - 1))
    keys = list(dict.fromkeys(k for l in loads for k in l["phases"]))
    for key in keys:
        *parents, name = key.split(" > ")
        label = "&nbsp;&nbsp;" * len(parents) + name
        lines.append(f"| {label} | " + " | ".join(str(l["phases"].get(key, "-")) for l in loads) + " |")
    lines.append("| **glmq.load total** | " + " | ".join(f"**{l['seconds']}**" for l in loads) + " |")
    (args.out / "load_breakdown.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
