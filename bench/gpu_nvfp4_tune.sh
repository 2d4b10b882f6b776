#!/usr/bin/env bash
# One device run of the W4A16 decode tuning (docs/nvfp4.md, "Deep decode tile"): the NVFP4 GPU
# tests built in build-hopper/ (the deep 256-K decode tile, its split-K, the 64-K tile forced,
# deep == 64-K bitwise), then `modmoe bench experts --dtype nvfp4` at decode sizes with A/B
# columns in the same process:
#   default                      the deep tile, split-K by select_config's rule (mixtral T=1 GEMM2)
#   MODMOE_GEMM_CONFIG=w4a16_16x128x64_s6   the 64-K decode tile measured before (no split)
#   MODMOE_GEMM_SPLIT_K=1        the deep tile without split-K
#   MODMOE_GEMM_SPLIT_K=2        the deep tile with split 2 wherever the problem allows it (the
#                                T = 1 cells: split_k_capacity sizes the scratch for decode grids)
# Every file lands flat in $OUT (at most 5): gpu.txt, nvfp4_experts.log, bench.log,
# experts_nvfp4_tune.json, and summary.txt (the lines printed here).
#
#   OUT=<dir> [DEADLINE_S=540] [TOKENS=1,16,128] bash bench/gpu_nvfp4_tune.sh
set -u
OUT=${OUT:-/tmp/nvfp4_tune_out}
source "$(dirname "$0")/gpu_common.sh"
export MODMOE_TEST_DATA_DIR=$PWD/tests/data
DEADLINE_S=${DEADLINE_S:-540}
TOKENS=${TOKENS:-1,16,128}
AB=${AB:-MODMOE_GEMM_CONFIG=w4a16_16x128x64_s6,MODMOE_GEMM_SPLIT_K=1,MODMOE_GEMM_SPLIT_K=2}
mkdir -p "$OUT/logs"

{
  gpu_header
  ./build-hopper/apps/modmoe info 2>&1 | head -12 > "$OUT/logs/info.txt"
  run_test test_gpu_nvfp4_experts nvfp4_experts
  LEFT=$(seconds_left "$DEADLINE_S")
  timeout "$LEFT" ./build-hopper/apps/modmoe bench experts --dtype nvfp4 --tokens "$TOKENS" \
    --ab "$AB" --out "$OUT/experts_nvfp4_tune.json" > "$OUT/logs/bench.log" 2>&1
  echo "bench rc $? after ${SECONDS}s (ab: $AB)"
  # The table: per cell the default time, then one column per --ab variant, in that order.
  grep -vE "^(wrote|running)" "$OUT/logs/bench.log" | tail -40
} 2>&1 | tee "$OUT/summary.txt.tmp"

cat "$OUT/logs/info.txt" >> "$OUT/logs/gpu.txt"
mv "$OUT/logs/gpu.txt" "$OUT/logs/nvfp4_experts.log" "$OUT/logs/bench.log" "$OUT/" 2>/dev/null
mv "$OUT/summary.txt.tmp" "$OUT/summary.txt"
rm -rf "$OUT/logs"
