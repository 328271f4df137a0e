"""Save the figures some tests print (timings, SQNR) as a results file, with where they came from.

Some measurements are made by tests on the tiny model (the compressed-tensors export's SQNR, the ComfyUI
server test's cancel latency and duration). This runs the named tests with their output shown and writes
the output, the pass/fail line, the wall time and each test's duration, with the provenance
(``glmq.bench.provenance``) and library versions, to one JSON file.

    python benchmarks/record_test_figures.py --out benchmarks/results/X.json tests/path.py::test_name ...
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("tests", nargs="+", help="pytest node ids")
    args = ap.parse_args(argv)

    from importlib.metadata import PackageNotFoundError, version

    from glmq.bench.provenance import provenance

    cmd = [sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider", "--durations=0", *args.tests]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = round(time.perf_counter() - t0, 1)
    versions = {}
    for name in ("torch", "transformers", "diffusers", "compressed-tensors", "starlette", "uvicorn", "python-multipart",
                 "openai"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    lines = proc.stdout.splitlines()
    result = {
        "provenance": provenance(),
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "versions": versions,
        "tests": args.tests,
        "returncode": proc.returncode,
        "wall_s": wall,
        "summary": next((ln for ln in reversed(lines) if " passed" in ln or " failed" in ln), None),
        "output": lines[-400:],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(result["summary"], f"({wall} s) -> {args.out}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
