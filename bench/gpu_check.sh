#!/usr/bin/env bash
# The ONE GPU check of issue 11 (item 5), for a session lent a GPU (e.g. the device tool's H200):
#
#   bash bench/gpu_check.sh            # results under $OUT (default ./gpu_check_out)
#
# ViT-L/16 at 384, bfloat16, the real multi-task train step (bench/train_step.py) on one GPU:
#   1. per-GPU batch 40 (the recipe's v5p-128 per-chip batch) for each remat policy with
#      attention_impl=cudnn, and none / nothing_saveable / dots_saveable with xla;
#   2. the largest per-GPU batch that fits, per remat policy (cudnn): the first candidate of a
#      descending list (LARGEST_NONE, LARGEST_DOTS, LARGEST_NOTHING) that runs;
#   3. python bench/eval_rank.py --preset=market and --preset=veriwild.
# Every train_step run prints one JSON line (MFU, step time, compile time, peak memory) into
# $OUT/train_step.jsonl, with "run" naming it; a failed run (e.g. out of memory) gets a line with
# "failed" and its last error line in $OUT/errors.log. eval_rank lines go to $OUT/eval_rank.jsonl.
# No run starts once BUDGET_S seconds (default 420) have passed and each is cut at the budget's
# end, so the script ends in under 8 minutes (most of each run is the ViT-L compile). Four files
# come back: gpu.txt, train_step.jsonl, eval_rank.jsonl, errors.log.
# Needs jax with CUDA, flax, optax, numpy (the device machine's python3 has them).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-420}
STEPS=${STEPS:-5}
VARIANT=${VARIANT:-L/16}        # smaller for a smoke test of this script on a CPU
IMAGE_SIZE=${IMAGE_SIZE:-384}
LARGEST_NONE=${LARGEST_NONE:-"64 48"}
LARGEST_DOTS=${LARGEST_DOTS:-"112 96 64"}
LARGEST_NOTHING=${LARGEST_NOTHING:-"320 256 160"}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
START=$(date +%s)
: > "$OUT/train_step.jsonl"; : > "$OUT/eval_rank.jsonl"; : > "$OUT/errors.log"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, jax.devices())' 2>&1; } > "$OUT/gpu.txt"

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# step NAME BATCH POLICY ATTENTION: one bench/train_step.py run; status 0 if it ran.
step() {
  local name=$1 batch=$2 policy=$3 attention=$4 t line
  t=$(left)
  if (( t < 40 )); then
    echo "{\"run\": \"$name\", \"skipped\": \"time budget\"}" >> "$OUT/train_step.jsonl"
    return 2
  fi
  if line=$(timeout "$t" "$PY" bench/train_step.py --variant="$VARIANT" --image_size="$IMAGE_SIZE" \
      --dtype=bfloat16 --batch_size="$batch" --remat_policy="$policy" \
      --attention_impl="$attention" --num_classes=10000 --steps="$STEPS" --warmup=2 \
      2> "$OUT/last.err" | tail -1) && [[ $line == \{* ]]; then
    echo "{\"run\": \"$name\", ${line#\{}" >> "$OUT/train_step.jsonl"
    rm -f "$OUT/last.err"
    return 0
  fi
  echo "{\"run\": \"$name\", \"batch_size\": $batch, \"remat_policy\": \"$policy\", \"attention_impl\": \"$attention\", \"failed\": true}" >> "$OUT/train_step.jsonl"
  { echo "== $name"; grep -E 'Error|RESOURCE_EXHAUSTED|Killed' "$OUT/last.err" | tail -2
    tail -1 "$OUT/last.err"; } >> "$OUT/errors.log"
  rm -f "$OUT/last.err"
  return 1
}

# largest POLICY CANDIDATES...: the first candidate batch that runs.
largest() {
  local policy=$1 b; shift
  for b in "$@"; do
    step "largest_${policy}_cudnn_b$b" "$b" "$policy" cudnn
    case $? in 0|2) return ;; esac
  done
}

step b40_nothing_saveable_cudnn 40 nothing_saveable cudnn
step b40_none_cudnn 40 none cudnn
step b40_dots_saveable_cudnn 40 dots_saveable cudnn
step b40_none_xla 40 none xla
for preset in market veriwild; do
  if (( $(left) > 40 )); then
    timeout 90 "$PY" bench/eval_rank.py --preset=$preset 2>> "$OUT/errors.log" | tail -1 \
      >> "$OUT/eval_rank.jsonl" || echo "{\"preset\": \"$preset\", \"failed\": true}" \
      >> "$OUT/eval_rank.jsonl"
  else
    echo "{\"preset\": \"$preset\", \"skipped\": \"time budget\"}" >> "$OUT/eval_rank.jsonl"
  fi
done
largest none $LARGEST_NONE
largest dots_saveable $LARGEST_DOTS
largest nothing_saveable $LARGEST_NOTHING
step b40_nothing_saveable_xla 40 nothing_saveable xla
step b40_dots_saveable_xla 40 dots_saveable xla
step b40_dots_with_no_batch_dims_saveable_cudnn 40 dots_with_no_batch_dims_saveable cudnn
echo "gpu_check: $(( $(date +%s) - START ))s; results in $OUT"
cat "$OUT/train_step.jsonl"
