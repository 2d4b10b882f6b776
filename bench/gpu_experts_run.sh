#!/usr/bin/env bash
# One device run of the experts-stage work (docs/perf_notes_experts.md): the GPU tests of the
# stage, then bench/compare.py over the ANCHORS.md grid (torch baseline in the same run) with
# A/B columns for run-time options (AB, comma-separated NAME=VALUE; default: the two defaults
# chosen from earlier A/Bs, split-K off and tail rows on, checked against their alternative).
#
#   OUT=<dir> [DEADLINE_S=280] bash bench/gpu_experts_run.sh     (binaries in build-hopper/)
set -u
OUT=${OUT:-/tmp/experts_out}
source "$(dirname "$0")/gpu_common.sh"
export MODMOE_TEST_DATA_DIR=$PWD/tests/data
export PYTHONUNBUFFERED=1
gpu_header

run_test test_gpu_permute permute
run_test test_gpu_finalize finalize
run_test test_gpu_experts experts

AB=${AB:-MODMOE_GEMM_SPLIT_K=2,MODMOE_GEMM_TAIL=0}
LEFT=$(seconds_left "${DEADLINE_S:-280}")
timeout "$LEFT" python3 bench/compare.py --modmoe ./build-hopper/apps/modmoe \
  --out "$OUT/experts.json" --ab "$AB" > "$OUT/logs/compare.log" 2>&1
echo "compare rc $? after ${SECONDS}s"
grep -vE "^torch_gm|^wrote|^running" "$OUT/logs/compare.log"
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
