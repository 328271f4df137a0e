#!/usr/bin/env bash
# Batched generation, the batched AR decode and the first image, on one H200 (issue #15 items 1, 2, 4, 5;
# issue #13 item 2). Each subcommand fits one device call (<= ~9 minutes); results land in $OUT/<name>/ with
# provenance (set GLMQ_GIT_COMMIT to the commit the tree holds). transformers/diffusers wheels go in .whl/
# (carry ".whl"), as for benchmarks/gpu_e2e.sh.
#
#   bash benchmarks/gpu_batch.sh batch80      # glmq bench --batch 1,4,8, 80 GiB tier, 1024x1024, 50 steps  (~8 min)
#   bash benchmarks/gpu_batch.sh batch16      # the same in the 16 GiB tier (staged; the plan sizes DiT chunks)
#   bash benchmarks/gpu_batch.sh decode       # benchmarks/ar_batch_decode.py: ms/step, tokens/s for B = 1..16
#                                             # (each B compiles its own step, ~100 s on an H200: this needs
#                                             # more than one call; decode_a and decode_b split it)
#   bash benchmarks/gpu_batch.sh decode_a     # B = 1, 2, 4
#   bash benchmarks/gpu_batch.sh decode_b     # B = 8, 16
#   bash benchmarks/gpu_batch.sh stock80      # glmq bench, 80 GiB tier, one image, beside stock diffusers (--baseline)
#   bash benchmarks/gpu_batch.sh first80      # glmq bench --first-image: cold/cached/warm, fresh processes, 80 GiB
#   bash benchmarks/gpu_batch.sh first16      # the same, 16 GiB tier
#   bash benchmarks/gpu_batch.sh gen_prep     # a full-size checkpoint on disk: make-tiny --size full, quantize
#   bash benchmarks/gpu_batch.sh gen_times    # glmq generate process wall time: off, on (cold cache), auto (cached)
#   bash benchmarks/gpu_batch.sh unchanged    # single-prompt calls against the pre-batching commit, on the GPU
#   bash benchmarks/gpu_batch.sh int4         # glmq bench, 80 GiB tier, glmq's int4 kernels (GLMQ_INT4_KERNEL=glmq)
#                                             # then tinygemm's (the default): AR ms/token, image, one process each
#   bash benchmarks/gpu_batch.sh uncompiled   # glmq bench --no-compile, 80 GiB tier: upstream layers
#                                             # (GLMQ_AR_FUSED=0), then the fused decode layer (the default)
#   bash benchmarks/gpu_batch.sh layers       # glmq bench, 80 GiB tier, the whole step compiled
#                                             # (GLMQ_AR_COMPILE=step), then one layer compiled for all (the default)
#   bash benchmarks/gpu_batch.sh decode_modes # the decode table with one layer compiled for all (GLMQ_AR_COMPILE=layers,
#                                             # ~5x less compilation per B): B = 1..16 in one call with glmq's int4
#                                             # kernels (GLMQ_INT4_KERNEL=glmq); then tinygemm at B = 1, 8
#   bash benchmarks/gpu_batch.sh dit_attention # issue #14's attention lever at 1024: the DiT step with glmq's bf16
#                                             # kernel (the default below 8192 tokens), glmq's fp8 kernel at every
#                                             # length (47.00 dB against bf16 at 1024, fidelity_gpu_h200/), and
#                                             # upstream's SDPA (cuDNN/flash); one process each, ~2 min each
#   bash benchmarks/gpu_batch.sh tiers_stock  # issue #14's one run: stock diffusers (--baseline) and the 8/12/16/24 GiB
#                                             # tiers at 1024x1024 in one glmq bench process (~7 min)
#   bash benchmarks/gpu_batch.sh r2048        # the resident DiT at 2048x2048 (80 GiB tier), one image (~4 min)
#   bash benchmarks/gpu_batch.sh act_quant    # issue #14's activation-quantization lever: glmq bench, 80 GiB, the DiT's
#                                             # rows quantized by glmq's kernel, then by torch ops Inductor fuses into
#                                             # their producers (GLMQ_ACT_QUANT=inductor); ~4 min
#   bash benchmarks/gpu_batch.sh load         # benchmarks/load_breakdown.py on gen_prep's folder, on the GPU (run
#                                             # right after gen_prep, or it runs gen_prep first); ~2 min
#   bash benchmarks/gpu_batch.sh smoke        # a few minutes: small sizes, every path once
# gen_prep and gen_times share /tmp on the machine: run gen_times right after gen_prep (the machine stays warm
# only briefly between calls); gen_times re-runs gen_prep when the checkpoint is gone (and then has no time left).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "editable install failed"; exit 1; }
CKPT=/tmp/glmq-full-q
BASE_COMMIT=b1ad57e  # the AR draw in vocabulary order (9b8745e, main before batching, until then)
filter() { grep -v "^  File\|^    \|^Extension\|^W[0-9]\{4\}"; }
bench() {  # name, timeout, bench args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -X faulthandler -m glmq bench --model full-random --recipe default --size "${SIZE:-1024x1024}" \
    --steps 50 --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$?"; filter < "$OUT/$name.log" | tail -30
}
case "$1" in
  batch80) bench batch80 560 --tiers 80 --batch 1,4,8 ;;
  batch16) bench batch16 560 --tiers 16 --batch 1,4,8 ;;
  decode_a|decode_b)
           b=$([ "$1" = decode_a ] && echo 1,2,4 || echo 8,16)
           timeout 560 python3 -X faulthandler benchmarks/ar_batch_decode.py --batches "$b" --out "$OUT/$1" > "$OUT/$1.log" 2>&1
           echo "== $1 rc=$?"; filter < "$OUT/$1.log" | tail -10 ;;
  decode_modes)
           (export GLMQ_AR_COMPILE=layers GLMQ_INT4_KERNEL=glmq
            timeout 320 python3 -X faulthandler benchmarks/ar_batch_decode.py --out "$OUT/decode_layers" > "$OUT/decode_layers.log" 2>&1
            echo "== decode_layers rc=$?"; filter < "$OUT/decode_layers.log" | tail -10
            export GLMQ_INT4_KERNEL=tinygemm
            timeout 200 python3 -X faulthandler benchmarks/ar_batch_decode.py --batches 1,8 --out "$OUT/decode_tinygemm" \
              > "$OUT/decode_tinygemm.log" 2>&1
            echo "== decode_tinygemm rc=$?"; filter < "$OUT/decode_tinygemm.log" | tail -8) ;;
  tiers_stock) bench tiers_stock 570 --tiers 8,12,16,24 --edits none --images 1 --baseline ;;
  r2048)   SIZE=2048x2048 bench r2048 400 --tiers 80 --edits none --images 1 ;;
  act_quant)
    (export GLMQ_ACT_QUANT=kernel; bench act_quant_kernel 270 --tiers 80 --images 1 --edits none)
    (export GLMQ_ACT_QUANT=inductor; bench act_quant_inductor 270 --tiers 80 --images 1 --edits none) ;;
  load)
    [ -d "$CKPT" ] || { echo "no $CKPT: running gen_prep first"; bash "$0" gen_prep; }
    timeout 400 python3 benchmarks/load_breakdown.py "$CKPT" --out "$OUT/load" --device cuda --repeat 2 \
      > "$OUT/load.log" 2>&1; echo "== load rc=$?"; filter < "$OUT/load.log" | tail -30 ;;
  stock80) bench stock80 560 --tiers 80 --edits none --images 1 --baseline ;;
  first80) bench first80 560 --tiers 80 --first-image ;;
  first16) bench first16 560 --tiers 16 --first-image ;;
  decode)  timeout 560 python3 -X faulthandler benchmarks/ar_batch_decode.py --out "$OUT/decode" > "$OUT/decode.log" 2>&1
           echo "== decode rc=$?"; filter < "$OUT/decode.log" | tail -14 ;;
  gen_prep)
    rm -rf /tmp/glmq-full "$CKPT"
    t0=$(date +%s)
    timeout 330 python3 -m glmq make-tiny /tmp/glmq-full --size full > "$OUT/gen_prep.log" 2>&1; echo "== make-tiny rc=$? $(( $(date +%s) - t0 )) s"
    timeout 220 python3 -m glmq quantize /tmp/glmq-full --out "$CKPT" --recipe fast --device cuda --no-eval \
      --no-layer-outputs >> "$OUT/gen_prep.log" 2>&1; echo "== quantize rc=$? $(( $(date +%s) - t0 )) s"
    rm -rf /tmp/glmq-full; du -sh "$CKPT"; tail -3 "$OUT/gen_prep.log" ;;
  gen_times)
    [ -d "$CKPT" ] || { echo "no $CKPT: running gen_prep first"; bash "$0" gen_prep; }
    timeout 560 python3 benchmarks/generate_wall_time.py "$CKPT" --out "$OUT/gen_times" > "$OUT/gen_times.log" 2>&1
    echo "== gen_times rc=$?"; filter < "$OUT/gen_times.log" | tail -16 ;;
  unchanged)
    rm -rf /tmp/base && mkdir -p /tmp/base
    if git archive "$BASE_COMMIT" 2>/dev/null | tar -x -C /tmp/base; then
      # the base commit's kernels and layers on both sides: what is compared is batching, not later defaults
      export GLMQ_INT4_KERNEL=glmq GLMQ_AR_FUSED=0
      timeout 500 python3 benchmarks/check_single_prompt_unchanged.py --base-tree /tmp/base --base-commit "$BASE_COMMIT" --device cuda \
        --out "$OUT/unchanged/single_prompt_unchanged_h200.json" 2>&1 | tail -12
    else echo "commit $BASE_COMMIT is not in this tree's .git: copy a checkout of it to /tmp/base"; fi ;;
  int4)
    (export GLMQ_INT4_KERNEL=glmq; bench int4_glmq 275 --tiers 80 --images 2 --edits none)
    (export GLMQ_INT4_KERNEL=tinygemm; bench int4_tinygemm 275 --tiers 80 --images 2 --edits none) ;;
  uncompiled)
    (export GLMQ_AR_FUSED=0; bench uncompiled_upstream 275 --tiers 80 --edits none --no-compile)
    (export GLMQ_AR_FUSED=1; bench uncompiled_fused 275 --tiers 80 --edits none --no-compile) ;;
  layers)
    (export GLMQ_AR_COMPILE=step; bench layers_step 275 --tiers 80 --images 1 --edits none)
    (export GLMQ_AR_COMPILE=layers; bench layers_layers 275 --tiers 80 --images 1 --edits none) ;;
  dit_attention)
    bench dit_attn_bf16 200 --tiers 80 --images 1 --edits none
    bench dit_attn_fp8 200 --tiers 80 --images 1 --edits none --attention-precision fp8
    bench dit_attn_sdpa 200 --tiers 80 --images 1 --edits none --attention sdpa ;;
  smoke)
    SIZE=512x512 bench smoke_bench 300 --tiers 80,16 --steps 4 --batch 1,3 --no-compile
    timeout 200 python3 benchmarks/ar_batch_decode.py --batches 1,4 --tokens 64 --out "$OUT/smoke_decode" \
      > "$OUT/smoke_decode.log" 2>&1; echo "== smoke decode rc=$?"; filter < "$OUT/smoke_decode.log" | tail -8 ;;
  *) echo "unknown subcommand $1"; exit 2 ;;
esac
