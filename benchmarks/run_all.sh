#!/usr/bin/env bash
# Run every benchmark; logs go to $OUT (default /tmp/slim_bench). Extra arguments go to every script,
# e.g. `benchmarks/run_all.sh --threads 1 --clock thread` on a shared machine (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-/tmp/slim_bench}
mkdir -p "$OUT"
run() {
  local name=$1; shift
  echo "== $name $*"
  "$PY" "benchmarks/$name.py" "$@" 2>&1 | tee "$OUT/$name.txt"
}
run bench_latency "$@"                  # targets 1, 2: batch 1 and 32 at 224x224
run bench_switch "$@"                   # target 5
run bench_train_step "$@"               # target 3: batch 32 at 128x128
run bench_memory "$@"                   # target 4: batch 32 at 128x128
run bench_calibrate "$@"                # target 6: 2,000 images at 64x64
run bench_mmdet "$@"                    # detection: Faster R-CNN R50-FPN vs exported plain mmdet detectors
run bench_basicsr "$@"                  # SR: US-WDSR vs exported plain WDSR at n = 64/48/32, 256x256 LR
run bench_sb3 "$@"                      # RL: SlimmablePPO vs plain PPO roll-out and update on Breakout
echo "logs in $OUT"
