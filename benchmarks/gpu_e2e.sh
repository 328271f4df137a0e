#!/usr/bin/env bash
# End-to-end GPU runs through the device tool: carries transformers/diffusers wheels in .whl/.
#   bash benchmarks/gpu_e2e.sh smoke|main|tiers  (writes under $OUT)
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "editable install failed"; exit 1; }
python3 -c "import glmq.kernels, glmq.runtime.pipeline, diffusers, transformers; print('imports ok', transformers.__version__, diffusers.__version__)" || exit 1
case "$1" in
  smoke) python3 -X faulthandler -m glmq bench --model full-random --recipe default --tiers 80,16,12 --size 256x256 --steps 2 \
           --no-compile --out "$OUT/smoke" 2>&1 | tee "$OUT/smoke.log" | tail -30 ;;
  main)  python3 -X faulthandler -m glmq bench --model full-random --recipe default --tiers 80 --baseline --size 1024x1024 \
           --steps 50 --out "$OUT/main" 2>&1 | tee "$OUT/main.log" | tail -30 ;;
  tiers) python3 -X faulthandler -m glmq bench --model full-random --recipe default --tiers 16,12 --size 1024x1024 \
           --steps 50 --out "$OUT/tiers" 2>&1 | tee "$OUT/tiers.log" | tail -30 ;;
esac
