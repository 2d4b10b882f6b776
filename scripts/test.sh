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
# Blackwell builds must compile: the library again with sm_100a added (where nvcc exists).
if [ -x "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)" ]; then
  export PATH="$PATH:/usr/local/cuda/bin"
  cmake -S . -B build-sm100 -G Ninja -DCMAKE_BUILD_TYPE=Release -DMODMOE_CUDA=ON \
    -DMODMOE_SM100=ON -DMODMOE_BUILD_TESTS=OFF -DMODMOE_BUILD_APPS=OFF >/dev/null
  cmake --build build-sm100 -j "${JOBS:-2}" >/dev/null
  echo "test.sh: the sm_90a + sm_100a library build compiles"
fi
sm100=$(date +%s)
# The Python package, built against this build (no second CUDA compile), and its tests.
bash tests/python/run.sh
echo "test.sh: build $((built - start)) s, tests $((tested - built)) s," \
  "sm_100a build $((sm100 - tested)) s, python package and tests $(( $(date +%s) - sm100 )) s"
