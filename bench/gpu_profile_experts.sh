#!/usr/bin/env bash
# One device run of Nsight Compute on the experts stage (docs/perf_notes_experts.md, "What
# limits"): the selected tile of each GEMM of GpuExperts.GemmThroughput's three prefill/middle
# problems (MODMOE_GEMM_PROFILE=1: one launch each, 6 kernels), with the speed-of-light, memory,
# compute and warp-state sections; then the kernel durations of one qwen3 T=1 experts call
# (which launches, how long each).
#   OUT=<dir> bash bench/gpu_profile_experts.sh        (binaries in build-hopper/)
set -u
OUT=${OUT:-/tmp/profile_out}
mkdir -p "$OUT"
export MODMOE_TEST_DATA_DIR=$PWD/tests/data
SECTIONS="--section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section WarpStateStats --section Occupancy --section SchedulerStats"
MODMOE_GEMM_PROFILE=1 timeout 300 ncu --target-processes all -k regex:grouped_gemm -c 6 $SECTIONS \
  -o "$OUT/gemm" ./build-hopper/tests/test_gpu_experts --gtest_filter='*GemmThroughput*' > "$OUT/gemm_run.log" 2>&1
echo "ncu gemm rc $?"
ncu --import "$OUT/gemm.ncu-rep" --page details > "$OUT/gemm_details.txt" 2>&1
grep -E "sm90_grouped_gemm_kernel|Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|L1/TEX Cache Throughput|Shared Memory|Tensor|Issue Slots Busy|Stall" "$OUT/gemm_details.txt" | head -120
# (the bench's own setup kernels, fills and the cuBLAS ceiling, are filtered out: they used up
# the 40 launches in the first run)
timeout 120 ncu --target-processes all --metrics gpu__time_duration.sum -c 40 \
  -k 'regex:^(?!.*(fill_kernel|nvjet|cutlass|gemmSN|copy_kernel)).*' \
  ./build-hopper/apps/modmoe bench experts --models qwen3 --tokens 1 > "$OUT/decode_kernels.txt" 2>&1
echo "ncu decode rc $?"
grep -E "^  [a-z_].*\(|gpu__time_duration" "$OUT/decode_kernels.txt" | head -80
