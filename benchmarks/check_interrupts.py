"""How does `glmq` end when Ctrl-C arrives at a random moment? (issue #21: 19 of 120 start-up interrupts were
ignored, 5 blamed the user's checkpoint.)

Starts `glmq ARGS` N times, each time sending SIGINT after a seeded random delay (uniform in [0, --max-delay]
seconds) counted from the moment the interpreter is up and about to import glmq (a SIGINT during Python's own
start-up, before any glmq code exists, is not what this measures), and classifies the ending:

- ok: exit code 2 and exactly the one "interrupted" line on stderr;
- finished: the command completed before the signal;
- bad: anything else (a traceback, another message, another exit code, an abort), printed in full.

    python benchmarks/check_interrupts.py --runs 40 --out benchmarks/results/interrupts_cpu2.json \\
        -- inspect /tmp/glm-image-tiny
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import signal
import subprocess
import sys
import time

LAUNCHER = r"""
import runpy, sys
import glmq
sys.argv = ["glmq", *sys.argv[1:]]
print("ready", flush=True)
runpy.run_module("glmq", run_name="__main__", alter_sys=True)
"""
INTERRUPTED = "glmq: interrupted; any .partial output is kept and the same command resumes it"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--max-delay", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON file for the counts and every run")
    ap.add_argument("args", nargs="+", help="the glmq command line (after --)")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    counts: collections.Counter = collections.Counter()
    runs = []
    for _ in range(a.runs):
        delay = rng.uniform(0, a.max_delay)
        p = subprocess.Popen([sys.executable, "-c", LAUNCHER, *a.args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        try:
            _, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            kind = "bad"
            err = "(still running 60 s after the Ctrl-C)\n" + err
        else:
            lines = [line for line in err.splitlines() if line.strip()]
            kind = ("finished" if p.returncode == 0 else
                    "ok" if p.returncode == 2 and lines == [INTERRUPTED] else "bad")
        counts[kind] += 1
        runs.append({"delay_s": round(delay, 3), "exit": p.returncode, "exit_after_s": round(time.monotonic() - t0, 2),
                     "kind": kind, **({"stderr": err[-3000:]} if kind == "bad" else {})})
        print(f"delay {delay:6.3f} s  exit {p.returncode:>3}  {kind}", flush=True)
        if kind == "bad":
            print(err[-3000:], flush=True)
    result = {"command": ["glmq", *a.args], "runs": a.runs, "max_delay_s": a.max_delay, "seed": a.seed,
              "counts": dict(counts), "python": sys.version.split()[0], "each": runs}
    print(json.dumps(result["counts"]))
    if a.out:
        from glmq.bench.provenance import provenance

        result["provenance"] = provenance()
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
