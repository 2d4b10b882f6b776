#!/usr/bin/env bash
# Runs the expert-parallel all-to-all on a multi-GPU machine from an existing build (no
# compiler needed there): the multigpu tests, `modmoe ep-demo` and `modmoe bench all-to-all`.
#   bash bench/run_all_to_all.sh [BUILD_DIR] [steps...]
#   steps: info tests bench demo demo_identity demo2 demo_fp8 bench_fp8 demo_nvfp4 bench_nvfp4 bench_ab
#          (default: info tests bench demo)
# Logs go to $OUT (default ./out/all_to_all); the benchmark JSON to
# $OUT/bench/results/<gpu>x<N>/all_to_all.json (N = the machine's GPUs used, rows for every
# ep size in BENCH_GPUS, default "2,4" on 4+ GPUs, else "2"): copy that tree into the repo.
# NCCL comes from PyTorch's nvidia-nccl wheel when it is not on the loader path already.
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0): it can take a shared host's GPUs out of service.
set -u
B=${1:-build}
shift || true
STEPS=${*:-info tests bench demo}
OUT=${OUT:-out/all_to_all}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
NCCL_LIB=$(python3 -c 'import nvidia.nccl as m, os; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null)
[ -n "$NCCL_LIB" ] && export LD_LIBRARY_PATH="$NCCL_LIB:${LD_LIBRARY_PATH:-}"
NGPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | wc -l)
echo "== $NGPU GPUs, NCCL from ${NCCL_LIB:-the loader path}"

for step in $STEPS; do
  case $step in
    info)
      nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
      nvidia-smi topo -m 2>&1 | head -12
      ;;
    tests)
      timeout ${T_TESTS:-240} "$B/tests/test_all_to_all" 2>&1 | tee "$OUT/tests.log" | grep -E "^\[ *(RUN|OK|FAILED|SKIPPED|PASSED) |FAILED|error|rank .*:" | head -120
      ;;
    demo)  # 4 GPUs when there are, real experts
      G=2; [ "$NGPU" -ge 4 ] && G=4
      timeout ${T_DEMO:-150} "$B/apps/modmoe" ep-demo --gpus $G --tokens 128 --backend nvlink 2>&1 | tee -a "$OUT/ep_demo.log"
      ;;
    demo_identity)
      G=2; [ "$NGPU" -ge 4 ] && G=4
      timeout ${T_DEMO:-150} "$B/apps/modmoe" ep-demo --gpus $G --tokens 128 --experts identity 2>&1 | tee -a "$OUT/ep_demo.log"
      ;;
    demo_fp8)  # quantize before dispatch: fp8-block and fp8-tensor on 2 GPUs, and on 4 when there are
      # Identity experts (quantize, e4m3 + scales dispatched, dequantize, combine: exact) run
      # today; real experts need the FP8 experts on the GPU (until then each rank stops with
      # "not supported yet: FP8 experts on the GPU").
      GS=2; [ "$NGPU" -ge 4 ] && GS="2 4"
      for G in $GS; do
        for d in fp8-block fp8-tensor; do
          for x in identity real; do
            CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((G - 1))) timeout ${T_DEMO:-150} "$B/apps/modmoe" ep-demo --gpus $G \
              --tokens 128 --dtype $d --experts $x 2>&1 | tee -a "$OUT/ep_demo_fp8.log"
          done
        done
      done
      ;;
    bench_fp8)  # the all-to-all cells with e4m3 + scales dispatched (the EP layer too once FP8 experts run on the GPU)
      G=2; [ "$NGPU" -ge 4 ] && G=2,4
      BIN=$(realpath "$B/apps/modmoe")
      for d in ${FP8_DTYPES:-fp8-block fp8-tensor}; do
        (cd "$OUT" && timeout ${T_BENCH:-570} "$BIN" bench all-to-all --gpus "${BENCH_GPUS:-$G}" --dtype $d \
          --time-limit $(( ${T_BENCH:-570} - 30 )) ${BENCH_ARGS:-}) 2>&1 | tee -a "$OUT/bench_fp8.log"
      done
      ;;
    demo_nvfp4)  # quantize before dispatch, NVFP4: on 2 GPUs, and on 4 when there are
      # Identity experts: quantize per token, e2m1 rows + e4m3 scales + per-token globals
      # dispatched, dequantized by the receiver, combine: exact against the CPU's dequantize.
      # Real experts: W4A16 on the dequantized rows against fused_moe on the same rows (1e-2).
      GS=2; [ "$NGPU" -ge 4 ] && GS="2 4"
      for G in $GS; do
        for x in identity real; do
          CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((G - 1))) timeout ${T_DEMO:-150} "$B/apps/modmoe" ep-demo --gpus $G \
            --tokens 128 --dtype nvfp4 --experts $x 2>&1 | tee -a "$OUT/ep_demo_nvfp4.log"
        done
      done
      ;;
    bench_nvfp4)  # the all-to-all cells with NVFP4 payloads, and the NVFP4 EP layer
      G=2; [ "$NGPU" -ge 4 ] && G=2,4
      BIN=$(realpath "$B/apps/modmoe")
      (cd "$OUT" && timeout ${T_BENCH:-570} "$BIN" bench all-to-all --gpus "${BENCH_GPUS:-$G}" --dtype nvfp4 \
        --time-limit $(( ${T_BENCH:-570} - 30 )) ${BENCH_ARGS:-}) 2>&1 | tee -a "$OUT/bench_nvfp4.log"
      ;;
    demo2)  # 2 GPUs, both backends
      for b in nvlink nccl; do
        CUDA_VISIBLE_DEVICES=0,1 timeout ${T_DEMO:-150} "$B/apps/modmoe" ep-demo --gpus 2 --tokens 256 --backend $b 2>&1 | tee -a "$OUT/ep_demo.log"
      done
      ;;
    bench_ab)  # tuning switches, NvLink only, same machine as `bench`
      for v in ${AB_VARS:-MODMOE_A2A_THREAD_FENCES=1 MODMOE_A2A_COMBINE_NC=1}; do
        env $v timeout ${T_AB:-60} "$B/apps/modmoe" bench all-to-all --gpus "$NGPU" --sms ${AB_SMS:-32} --backends nvlink \
          --layer none --iters 20 --out "$OUT/ab_${v%%=*}.json" 2>&1 | tee -a "$OUT/bench.log" | tail -8
      done
      ;;
    bench)  # ep sizes 2 and 4 in one JSON, with the EP layer (nvlink, nccl) and fused_moe per row
      G=2; [ "$NGPU" -ge 4 ] && G=2,4
      BIN=$(realpath "$B/apps/modmoe")
      # --time-limit < T_BENCH: ranks that hang are killed and the rows so far are still written.
      (cd "$OUT" && timeout ${T_BENCH:-570} "$BIN" bench all-to-all --gpus "${BENCH_GPUS:-$G}" \
        --time-limit $(( ${T_BENCH:-570} - 30 )) ${BENCH_ARGS:-}) 2>&1 | tee "$OUT/bench.log"
      ;;
  esac
done
