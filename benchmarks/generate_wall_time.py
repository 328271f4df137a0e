"""``glmq generate`` process wall time, load included (issue #15's targets: a second process with a warm cache
<= 25 s, the first ever <= 60 s, at 1024x1024 and 50 steps).

Each run is a fresh ``python -m glmq generate`` process, timed from its start to its exit:

1. ``--compile off``, empty cache folder: the first ever process without compilation;
2. ``--compile on``, empty cache folder: the first ever compiled process (pays the whole compilation);
3. ``--compile auto``, the folder run 2 left: a later process (compiles from the cache);
4. the same again (page cache and compile cache both warm);
5. ``--prompts`` with 4 prompts, ``--compile auto``, the same folder: four images in one process, batched.

    python benchmarks/generate_wall_time.py CHECKPOINT --out DIR [--size 1024x1024] [--steps 50] [--device cuda]

The checkpoint is a folder on disk (``glmq make-tiny --size full`` then ``glmq quantize``: see
benchmarks/gpu_batch.sh gen_prep); the tiny model runs the same on a CPU (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "A street poster that says 'GLM-Image on every GPU', photographed at dusk, 35mm"
MORE = ["a red fox in fresh snow, morning light", "an isometric city block, pastel colours",
        "a lighthouse in a storm, oil painting"]


def run(args: list[str], limit: float) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "glmq", "generate", *args, "--json"], capture_output=True,
                              text=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        return {"ok": False, "reason": f"timed out after {limit:.0f} s"}
    wall = round(time.perf_counter() - t0, 2)
    if proc.returncode != 0:
        return {"ok": False, "wall_s": wall, "reason": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return {"ok": True, "wall_s": wall, "summary": json.loads(proc.stdout)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--size", default="1024x1024")
    ap.add_argument("--steps", default="50")
    ap.add_argument("--device", default=None)
    ap.add_argument("--budget-s", type=float, default=540, help="stop starting runs after this many seconds")
    args = ap.parse_args(argv)
    from glmq.bench.provenance import provenance

    args.out.mkdir(parents=True, exist_ok=True)
    common = [args.checkpoint, "--size", args.size, "--steps", args.steps, "--force"]
    common += ["--device", args.device] if args.device else []
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="glmq-gen-") as tmp:
        tmp = Path(tmp)
        prompts = tmp / "prompts.txt"
        prompts.write_text("\n".join([PROMPT, *MORE]) + "\n")
        plan = [
            ("first process, --compile off", ["--prompt", PROMPT, "--compile", "off", "--cache-dir", str(tmp / "a"),
                                               "--out", str(tmp / "off.png")]),
            ("first process, --compile on (empty cache)", ["--prompt", PROMPT, "--compile", "on", "--cache-dir",
                                                           str(tmp / "b"), "--out", str(tmp / "cold.png")]),
            ("later process, --compile auto (cached)", ["--prompt", PROMPT, "--compile", "auto", "--cache-dir",
                                                        str(tmp / "b"), "--out", str(tmp / "cached.png")]),
            ("later process again, --compile auto", ["--prompt", PROMPT, "--compile", "auto", "--cache-dir",
                                                     str(tmp / "b"), "--out", str(tmp / "cached2.png")]),
            ("4 prompts in one process, --compile auto", ["--prompts", str(prompts), "--compile", "auto", "--batch",
                                                          "4", "--cache-dir", str(tmp / "b"), "--out",
                                                          str(tmp / "many")]),
        ]
        for name, run_args in plan:
            left = args.budget_s - (time.perf_counter() - start)
            if left < 30:
                results.append({"run": name, "ok": False, "reason": "not run: the time budget was spent"})
                continue
            r = run(common + run_args, left)
            results.append({"run": name, **r})
            s = r.get("summary", {})
            print(f"{name}: {'ok' if r['ok'] else 'FAILED'} {r.get('wall_s', '-')} s wall; "
                  f"compiled {s.get('compiled')}; {r.get('reason', '')}", file=sys.stderr, flush=True)
    result = {"benchmark": "generate_wall_time", "provenance": provenance(), "checkpoint": args.checkpoint,
              "size": args.size, "steps": int(args.steps), "runs": results}
    (args.out / "generate_wall_time.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| run | process wall s | in the pipeline s | compiled | note |", "|---|---|---|---|---|"]
    for r in results:
        s = r.get("summary") or {}
        inside = s.get("seconds")
        note = r.get("reason", "")
        if "images_per_hour" in s:
            note = f"{s['written']} images, {s['images_per_hour']} images/hour after a {s['load_s']} s load"
        lines.append(f"| {r['run']} | {r.get('wall_s', '-')} | {inside if inside is not None else '-'} | "
                     f"{s.get('compiled', '-')} | {note} |")
    (args.out / "generate_wall_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
