#!/usr/bin/env bash
# The first README command: install, build, and run `modmoe demo` on a built-in preset.
# Extra arguments go to the demo, e.g. `bash scripts/demo.sh --preset qwen3-30b-a3b`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
bash scripts/build.sh
./build/apps/modmoe info
./build/apps/modmoe demo "$@"
