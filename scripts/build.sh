#!/usr/bin/env bash
# Configures and builds modmoe into ./build (Release, Ninja, 2 jobs unless JOBS is set).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/cuda/bin"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release ${MODMOE_CMAKE_ARGS:-} >/dev/null
cmake --build build -j "${JOBS:-2}"
