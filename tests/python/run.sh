#!/usr/bin/env bash
# Builds the Python package against the C++ build in BUILD_DIR (default: build), installs it
# in a virtual environment there, and runs tests/python. scripts/test.sh calls it after ctest:
# the C++ library (CUDA included) is compiled once, by scripts/build.sh; this script installs
# that build into BUILD_DIR/python-prefix and compiles only the extension against it.
# The CPU tests must pass; the GPU tests skip without PyTorch or a GPU; a run that collects no
# test fails (pytest's exit code 5). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${BUILD_DIR:-build}
prefix=$PWD/$build/python-prefix
venv=$PWD/$build/python-venv
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

start=$(date +%s)
cmake --install "$build" --prefix "$prefix" >/dev/null
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"${pip[@]}" install -r python/requirements-ci.txt
CMAKE_PREFIX_PATH="$prefix" "${pip[@]}" install --no-build-isolation --no-deps \
  --force-reinstall ./python
built=$(date +%s)

rc=0
(cd tests/python && "$venv/bin/python" -m pytest "$@") || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "python tests: pytest collected no test" >&2
  exit 1
fi
echo "python tests: package build $((built - start)) s, tests $(( $(date +%s) - built )) s"
exit "$rc"
