# Shared by the one-GPU run scripts (bench/gpu_*_run.sh), sourced once OUT is set: the GPU's
# state at the start, one gtest binary of build-hopper/ run with its log kept, and the time
# left before a deadline.

gpu_header() {
  mkdir -p "$OUT/logs"
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv \
    > "$OUT/logs/gpu.txt" 2>&1
  head -2 "$OUT/logs/gpu.txt"
}

run_test() {  # binary, log name[, more ':'-joined negative filters]; prints one line
  timeout 150 "./build-hopper/tests/$1" --gtest_brief=1 \
    "--gtest_filter=-*GemmThroughput*${3:+:$3}" > "$OUT/logs/$2.log" 2>&1
  local rc=$?
  echo "$2: rc $rc $(grep -E '^\[  (PASSED|FAILED) ' "$OUT/logs/$2.log" | tr '\n' ' ')"
  grep -E '^\[  FAILED  \] .*\.' "$OUT/logs/$2.log" | head -8
  return $rc
}

seconds_left() {  # DEADLINE_S [share]: seconds left before the deadline (/ share), at least 30
  local left=$(( ($1 - SECONDS) / ${2:-1} ))
  (( left < 30 )) && left=30  # NOTE: timeout 0 would mean no limit
  echo "$left"
}
