#!/usr/bin/env bash
# Issue #20 on two GPUs: the one-GPU row and both two-GPU modes in ONE `glmq bench --gpus 2` run (same card,
# weights, prompt and seeds): default recipe, full-size random weights, 1024x1024, 50 steps.
#
# Run through the device tool on kind nvidia-h200-x2, from the repository root, carrying the transformers and
# diffusers wheels (.whl/, as benchmarks/gpu_e2e.sh) and declaring the commit:
#     GLMQ_GIT_COMMIT=<commit> bash benchmarks/gpu_two_gpus.sh "$OUT"
# About 8 minutes (estimate from the one-GPU run in benchmarks/results/tp_one_gpu_h200/: three model builds and
# quantizations of ~40 s, three compiled warm-ups of 1-2 minutes, then 1 + 1 + 4 timed images); the bench stops
# itself at 535 s, keeping every finished row. Leave NVLink multicast off, as the machine sets it
# (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1): nothing here changes those variables.
#
# BENCH_DRY=1: the same commands on the CPU with the tiny model (two CPU processes, bf16 recipe, 64x64, 2 steps):
# the check that the script works before a two-GPU machine is spent on it.
#
# Writes into OUT: bench.json (rows with provenance and per-rank details), bench.md, bench.log, workers.log (both
# pipelines' worker logs), gpu.csv (the cards and their links).
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_two_gpus.sh OUT}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; then
  # An older setuptools there may refuse pyproject.toml (no build isolation, no network): import glmq from a
  # copy of the package with the kernels linked in where the install would map them (glmq.kernels).
  echo "editable install failed; importing glmq from a copy of the source instead"
  # (Run from there: Python puts the working folder first on its path, and ./glmq has no kernels.)
  rm -rf /tmp/glmq-src && mkdir -p /tmp/glmq-src && cp -r glmq /tmp/glmq-src/ && ln -s "$PWD/kernels" /tmp/glmq-src/glmq/kernels
  export PYTHONPATH="/tmp/glmq-src${PYTHONPATH:+:$PYTHONPATH}"
  cd /tmp/glmq-src || exit 1
fi
python3 -c "import glmq.kernels, glmq.runtime.parallel.pipeline" || { echo "glmq does not import"; exit 1; }
if [ "${BENCH_DRY:-0}" = 1 ]; then
  ARGS=(--model tiny --device cpu --recipe bf16 --size 64x64 --steps 2)
else
  { nvidia-smi --query-gpu=index,name,memory.total,clocks.max.sm --format=csv; nvidia-smi topo -m; } > "$OUT/gpu.csv" 2>&1
  python3 -c "import torch; n = torch.cuda.device_count(); print('gpus', n, 'torch', torch.__version__); \
raise SystemExit(0 if n >= 2 else 'needs two GPUs')" || exit 1
  env | grep -E '^(NCCL_NVLS_ENABLE|TORCH_SYMM_MEM_DISABLE_MULTICAST|NVSHMEM_DISABLE_NVLS)=' || true
  ARGS=(--model full-random --recipe default --tiers 80 --size 1024x1024 --steps 50)
fi
export GLMQ_PARALLEL_LOG_DIR=/tmp/glmq-workers-$$
timeout -k 20 535 python3 -X faulthandler -m glmq bench "${ARGS[@]}" --images 1 --edits none --gpus 2 \
  --throughput-images 4 --out "$OUT/bench" > "$OUT/bench.log" 2>&1
rc=$?
echo "== bench rc=$rc"
find "$GLMQ_PARALLEL_LOG_DIR" -name '*.log' -print0 2>/dev/null | sort -z | xargs -0 -r tail -n 200 > "$OUT/workers.log" 2>&1
mv "$OUT/bench/bench.json" "$OUT/bench/bench.md" "$OUT/" 2>/dev/null
rm -rf "$OUT/bench"
grep -v "^  File\|^    \|^Extension" "$OUT/bench.log" | tail -12
cat "$OUT/bench.md" 2>/dev/null
python3 - "$OUT/bench.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except OSError:
    raise SystemExit("no bench.json")
print("consistency problems:", r.get("consistency_problems"))
for row in r["rows"]:
    two = row.get("two_gpus") or {}
    print(row.get("mode"), row.get("seconds_per_image"), "vs one GPU:", two.get("vs_one_gpu"),
          "images/hour:", two.get("images_per_hour"), "peaks GiB:", two.get("peak_reserved_gib"),
          "checks:", row.get("checks"), row.get("reason", ""))
PY
exit $rc
