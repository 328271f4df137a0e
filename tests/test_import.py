"""``import glmq`` is fast and lean: no torch, no CUDA, no kernel compilation, no web server stack."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys, time
t = time.perf_counter()
import glmq, glmq.cli, glmq.kernels
elapsed = time.perf_counter() - t
heavy = [m for m in ("torch", "triton", "transformers", "diffusers", "bitsandbytes",
                     "starlette", "uvicorn", "python_multipart") if m in sys.modules]  # the last three: glmq serve
print(f"{elapsed:.3f}", ",".join(heavy))
"""


def test_import_glmq_is_fast_and_does_not_touch_torch_or_cuda(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    elapsed, heavy = proc.stdout.strip().split(" ") if " " in proc.stdout.strip() else (proc.stdout.strip(), "")
    print("import time", elapsed, "heavy modules:", heavy)
    assert heavy == ""  # torch is not even imported, so CUDA cannot be initialized
    assert float(elapsed) < 2.0
