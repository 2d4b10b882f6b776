#!/usr/bin/env bash
# The second README command: install, build, and run the tests. On a machine without a GPU
# the gpu and multigpu suites skip cleanly; the cpu suites must all pass.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/deps.sh
bash scripts/build.sh
built=$(date +%s)
ctest --test-dir build --output-on-failure -j "${JOBS:-2}" --timeout 900 "$@"
tested=$(date +%s)
# The Python package, built against this build (no second CUDA compile), and its tests.
bash tests/python/run.sh
echo "test.sh: build $((built - start)) s, tests $((tested - built)) s," \
  "python package and tests $(( $(date +%s) - tested )) s"
