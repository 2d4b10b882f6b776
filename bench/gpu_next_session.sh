#!/usr/bin/env bash
# The first single-GPU call of the next session, for branch next-gpu (main + pingpong +
# nvfp4-tune + ep-nvfp4): every branch's GPU tests first (a failure names its branch), the
# sanitizers on the new kernels, then the A/Bs. Binaries in build-hopper/ (carry a build of
# this branch: libmodmoe.so, apps/modmoe, tests/test_gpu_{experts,nvfp4_experts,fp8_experts,
# quant_ep,prepare,quant}). In $OUT: experts.json (+ compare.py's baseline and plots),
# experts_nvfp4_tune.json and logs.tgz (at most 8 files come back).
#   OUT=<dir> bash bench/gpu_next_session.sh            (about 8 minutes on an H100)
set -u
OUT=${OUT:-/tmp/next_out}
L=$OUT/logs
mkdir -p "$L"
export MODMOE_TEST_DATA_DIR=$PWD/tests/data PYTHONUNBUFFERED=1
B=./build-hopper/tests
t() {  # binary [filter]
  timeout 200 "$B/$1" --gtest_brief=1 "--gtest_filter=${2:--*GemmThroughput*}" > "$L/$1.log" 2>&1
  echo "$1 rc $? $(grep -E '^\[  (PASSED|FAILED) ' "$L/$1.log" | tr '\n' ' ')"
  grep -E '^\[  FAILED  \] .*\.' "$L/$1.log" | head -8
}
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv | tee "$L/gpu.txt"
t test_gpu_experts              # pingpong: Sm90PingPong*; main: everything else
t test_gpu_nvfp4_experts        # nvfp4-tune: the deep tile, split-K
t test_gpu_quant_ep             # ep-nvfp4: per-row NVFP4 quantize / dequantize
t test_gpu_fp8_experts          # main: the shared harness
t test_gpu_prepare              # main: the shared gate/up interleave
for tool in memcheck racecheck; do
  timeout 120 compute-sanitizer --tool $tool --error-exitcode 9 "$B/test_gpu_experts" \
    --gtest_filter='Cases/Sm90PingPongTail.*:GpuExperts.Sm90PingPongEqualsWideAndReplays' > "$L/san_$tool.log" 2>&1
  echo "pingpong $tool rc $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$L/san_$tool.log")"
done
echo "== tests done at ${SECONDS}s"
# bf16: the ping-pong tile against the selected tiles, same run as torch (about 3 minutes).
timeout 260 python3 bench/compare.py --modmoe ./build-hopper/apps/modmoe --out "$OUT/experts.json" \
  --ab MODMOE_GEMM_CONFIG=sm90_128x128x64_s5 > "$L/compare.log" 2>&1
echo "compare rc $? at ${SECONDS}s"; grep -vE "^torch_gm|^wrote|^running" "$L/compare.log" | tail -30
# NVFP4 decode: the deep tile against the 64-K tile and the split-K choices.
LEFT=$(( 560 - SECONDS )); (( LEFT < 60 )) && LEFT=60
timeout $LEFT ./build-hopper/apps/modmoe bench experts --dtype nvfp4 --tokens 1,16 \
  --ab MODMOE_GEMM_CONFIG=w4a16_16x128x64_s6,MODMOE_GEMM_SPLIT_K=1 --out "$OUT/experts_nvfp4_tune.json" \
  > "$L/nvfp4.log" 2>&1
echo "nvfp4 rc $? at ${SECONDS}s"; grep -vE "^(wrote|running)" "$L/nvfp4.log" | tail -14
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"
