#!/usr/bin/env bash
# On a GPU machine: run every GPU test binary of a build, the demo on every preset, and
# compute-sanitizer (memcheck, racecheck) on a short filter. Logs go to $OUT (or ./gpu_logs).
# usage: scripts/gpu_suite.sh BUILD_DIR [--no-sanitizer]   (test binaries spread over the GPUs)
set -uo pipefail
build=${1:?build dir}
out=${OUT:-gpu_logs}
mkdir -p "$out"
export MODMOE_TEST_DATA_DIR=${MODMOE_TEST_DATA_DIR:-$PWD/tests/data}
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$build/apps/modmoe" info | tee -a "$out/gpu.txt"
# One binary after another on one GPU; with several GPUs (a machine of 2 or 4), the binaries
# are dealt to the GPUs round-robin and each GPU's share runs in the background.
ngpu=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | wc -l)
[ "$ngpu" -ge 1 ] || ngpu=1
run_share() {  # gpu index, then binaries; one result line per binary in $out/share_<gpu>.txt
  local g=$1 t name r
  shift
  for t in "$@"; do
    name=$(basename "$t")
    if CUDA_VISIBLE_DEVICES=$g "$t" --gtest_brief=1 > "$out/$name.log" 2>&1; then r=ok; else r=FAILED; fi
    echo "$name: $r $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$out/$name.log" | tr '\n' ' ')"
  done > "$out/share_$g.txt"
}
rm -f "$out"/share_*.txt
bins=()
for t in "$build"/tests/test_gpu_*; do [ -x "$t" ] && bins+=("$t"); done
for ((g = 0; g < ngpu; ++g)); do
  share=()
  for ((i = g; i < ${#bins[@]}; i += ngpu)); do share+=("${bins[i]}"); done
  [ ${#share[@]} -gt 0 ] && run_share "$g" "${share[@]}" &
done
wait
for ((g = 0; g < ngpu; ++g)); do [ -f "$out/share_$g.txt" ] && cat "$out/share_$g.txt"; done
grep -q ": FAILED" "$out"/share_*.txt && status=1
for p in mixtral-8x7b qwen3-30b-a3b deepseek-v3 gpt-oss-120b glm-4.5-air; do
  for t in ${DEMO_TOKENS:-1 1000}; do
    if ! "$build/apps/modmoe" demo --preset "$p" --tokens "$t" > "$out/demo_${p}_$t.log" 2>&1; then status=1; fi
    echo "demo $p T=$t: $(grep -E '^(parity|accuracy)' "$out/demo_${p}_$t.log" | tr -s ' ' | tr '\n' ' ')"
  done
done
grep -h -A6 '^stage' "$out"/demo_deepseek-v3_*.log | tail -7
if [ "${2:-}" != "--no-sanitizer" ]; then
  san="compute-sanitizer --error-exitcode 1"
  f=${SAN_FILTER:-'*SmallInt*:*Features*:*Golden*:*Edges*:*Graph*:*Empty*:*GpuFinalize*:*GpuPrepare*'}
  for tool in memcheck racecheck; do
    for t in "$build"/tests/test_gpu_*; do
      name=$(basename "$t")
      # A binary with no test in the filter launches nothing; the sanitizer would flag that.
      if ! "$t" --gtest_list_tests --gtest_filter="$f" | grep -q '^  '; then
        echo "$tool $name: no test in the filter"
        continue
      fi
      if timeout 150 $san --tool $tool "$t" --gtest_filter="$f" --gtest_brief=1 > "$out/san_${tool}_$name.log" 2>&1; then r=clean; else r=ERRORS; status=1; fi
      echo "$tool $name: $r $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/san_${tool}_$name.log" | tail -1)"
    done
  done
fi
exit $status
