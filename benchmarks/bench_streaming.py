"""How fast and how lean are glmq's streaming converters on the full-size checkpoint?

Runs one glmq command in a child process and reports wall time, bytes written, throughput (GB/s of output
written; for converters also of input read) and the child's peak resident memory (ru_maxrss of the
child, which includes every page of the memory-mapped input it touched and still held).

    python benchmarks/bench_streaming.py --name make_full -- make-tiny /data/glm-full --size full
    python benchmarks/bench_streaming.py --name quantize_full --input /data/glm-full -- quantize /data/glm-full --out /data/q

Results: benchmarks/results/<name>_<host>.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--input", type=Path, help="input folder, to report read throughput")
    ap.add_argument("--out-folder", type=Path, help="output folder (default: the glmq command's OUT)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = [a for a in args.cmd if a != "--"]
    out = args.out_folder
    if out is None:
        out = Path(cmd[cmd.index("--out") + 1]) if "--out" in cmd else Path(cmd[1])
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "glmq", *cmd], stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    peak_rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    written = folder_bytes(out)
    read = folder_bytes(args.input) if args.input else None
    import torch

    from glmq.bench.provenance import provenance

    result = {
        "benchmark": args.name,
        "command": "glmq " + " ".join(cmd),
        "returncode": proc.returncode,
        "stderr_tail": proc.stderr[-500:],
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                 "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "wall_s": round(wall, 1),
        "bytes_written": written,
        "write_gb_per_s": round(written / wall / 1e9, 3),
        "bytes_read": read,
        "read_gb_per_s": round(read / wall / 1e9, 3) if read else None,
        "peak_rss_gb": round(peak_rss_kb * 1024 / 1e9, 3),
        "provenance": provenance(),
    }
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    dest = results / f"{args.name}_cpu{os.cpu_count()}.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
