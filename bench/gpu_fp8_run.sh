#!/usr/bin/env bash
# One device run of the FP8 experts work (issue #8, docs/fp8.md): the FP8 GPU tests built in
# build-hopper/ (test_gpu_fp8_experts once it exists; the FP8 quantizer the benchmark uses),
# then bench/compare.py for each FP8 dtype: `modmoe bench experts --dtype ...` over the
# ANCHORS.md grid, each cell also timed in bf16 in the same process, with the
# torch._scaled_grouped_mm baseline in the same run for fp8-tensor (fp8-block has none).
# Each dtype gets an equal share of the time left before the deadline. The dtype
# fp8-tensor-fast is fp8-tensor with --fp8-fast-accum (docs/fp8.md "FP8 fast accumulation"),
# written to experts_fp8_tensor_fast_accum.json.
#
#   OUT=<dir> [DEADLINE_S=540] [DTYPES="fp8-block fp8-tensor fp8-tensor-fast"] bash bench/gpu_fp8_run.sh
set -u
OUT=${OUT:-/tmp/fp8_out}
source "$(dirname "$0")/gpu_common.sh"
export MODMOE_TEST_DATA_DIR=$PWD/tests/data
export PYTHONUNBUFFERED=1
DEADLINE_S=${DEADLINE_S:-540}
gpu_header

if [[ -x build-hopper/tests/test_gpu_fp8_experts ]]; then
  run_test test_gpu_fp8_experts fp8_experts
else
  echo "fp8_experts: skipped (build-hopper/tests/test_gpu_fp8_experts is not built)"
fi
run_test test_gpu_quant quant

read -r -a dtypes <<< "${DTYPES:-fp8-block fp8-tensor}"
for i in "${!dtypes[@]}"; do
  d=${dtypes[$i]}
  LEFT=$(seconds_left "$DEADLINE_S" $(( ${#dtypes[@]} - i )))
  extra=()
  out_name=experts_${d//-/_}.json
  if [[ $d == fp8-tensor-fast ]]; then
    extra=(--dtype fp8-tensor --fp8-fast-accum)
    out_name=experts_fp8_tensor_fast_accum.json
  else
    extra=(--dtype "$d")
  fi
  timeout "$LEFT" python3 bench/compare.py --modmoe ./build-hopper/apps/modmoe "${extra[@]}" \
    --out "$OUT/$out_name" > "$OUT/logs/compare_$d.log" 2>&1
  echo "compare $d rc $? after ${SECONDS}s"
  grep -vE "^torch_gm|^wrote|^running" "$OUT/logs/compare_$d.log"
done
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
