#!/usr/bin/env bash
# glmq serve on one GPU through the device tool: 4 clients x n=4 at 1024x1024 against an in-process server over
# full-size random weights (benchmarks/serve_clients.py), with `timeout` inside the 10-minute call.
# The GPU machine has no network: like gpu_e2e.sh, every wheel comes from .whl/ (carried). Besides the
# transformers/diffusers wheels gpu_e2e.sh uses, the server stack and its pure-Python dependencies must be there;
# download them once on this side:
#   python -m pip download --no-deps -d .whl starlette uvicorn python-multipart anyio h11 click idna typing_extensions
# Then run `bash benchmarks/gpu_serve.sh [serve_clients.py flags]` (e.g. --steps 30, --no-compile, --max-batch 8);
# results go to $OUT/serve/serve_clients.json and $OUT/serve.log.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "editable install failed"; exit 1; }
python3 -c "import glmq.serve.server, glmq.runtime.pipeline, diffusers, transformers; print('imports ok', transformers.__version__, diffusers.__version__)" || exit 1
timeout 570 python3 -X faulthandler benchmarks/serve_clients.py --out "$OUT/serve" "$@" > "$OUT/serve.log" 2>&1
echo "== serve rc=$?"; grep -v "^  File\|^    \|^Extension" "$OUT/serve.log" | tail -14
