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
  smoke) for pin in 1 0; do
           GLMQ_PIN_MEMORY=$pin timeout 200 python3 -X faulthandler -m glmq bench --model full-random --recipe default \
             --tiers 80,16 --size 256x256 --steps 2 --no-compile --attention sdpa --out "$OUT/smoke_$pin" > "$OUT/smoke_$pin.log" 2>&1
           echo "== pin=$pin rc=$?"; grep -v "^  File\|^    \|^Extension" "$OUT/smoke_$pin.log" | tail -15
         done ;;
  main)  timeout 330 python3 -X faulthandler -m glmq bench --model full-random --recipe default --tiers 80 \
           --size 1024x1024 --steps 50 --out "$OUT/main" > "$OUT/main.log" 2>&1
         echo "== glmq rc=$?"; grep -v "^  File\|^    \|^Extension" "$OUT/main.log" | tail -22
         timeout 240 python3 -X faulthandler -m glmq bench --model full-random --baseline-only --size 1024x1024 \
           --steps 50 --out "$OUT/stock" > "$OUT/stock.log" 2>&1
         echo "== stock rc=$?"; grep -v "^  File\|^    \|^Extension" "$OUT/stock.log" | tail -12 ;;
  stock) timeout 270 python3 -X faulthandler -m glmq bench --model full-random --baseline-only --size 1024x1024 \
           --steps 50 --out "$OUT/stock" > "$OUT/stock.log" 2>&1
         echo "== stock rc=$?"; grep -v "^  File\|^    \|^Extension" "$OUT/stock.log" | tail -12
         GLMQ_DEBUG=1 timeout 150 python3 -X faulthandler -m glmq bench --model full-random --recipe default --tiers 16 \
           --size 256x256 --steps 2 --no-compile --no-cuda-graph --attention sdpa --out "$OUT/staged" > "$OUT/staged.log" 2>&1
         echo "== staged rc=$?"; grep -v "^Extension" "$OUT/staged.log" | tail -30 ;;
  tiers) timeout 300 python3 -X faulthandler -m glmq bench --model full-random --recipe default --tiers 16,12 \
           --size 1024x1024 --steps 50 --no-compile --out "$OUT/tiers" > "$OUT/tiers.log" 2>&1
         rc=$?; echo "== tiers rc=$rc"; grep -v "^  File\|^    \|^Extension" "$OUT/tiers.log" | tail -14
         if [ $rc -ne 0 ]; then
           timeout 280 python3 -X faulthandler -m glmq bench --model full-random --recipe default --tiers 16,12 \
             --size 1024x1024 --steps 50 --no-compile --no-cuda-graph --out "$OUT/tiers_nograph" > "$OUT/tiers_nograph.log" 2>&1
           echo "== tiers no-graph rc=$?"; grep -v "^  File\|^    \|^Extension" "$OUT/tiers_nograph.log" | tail -14
         fi ;;
  offload) timeout 400 python3 -X faulthandler -m glmq bench --model full-random --recipe default --tiers 12 \
           --size 1024x1024 --steps 50 --no-compile --out "$OUT/offload" > "$OUT/offload.log" 2>&1
         echo "== offload rc=$?"; grep -v "^  File\|^    \|^Extension" "$OUT/offload.log" | tail -14 ;;
esac
