#!/usr/bin/env bash
# On a GPU machine without internet: install the carried build wheels (scikit-build-core,
# nanobind, pathspec, pytest) into a target folder, build the Python package against an
# installed modmoe prefix, and run tests/python (CPU and GPU tests).
# usage: scripts/gpu_python.sh WHEEL_DIR PREFIX
set -euo pipefail
whl=${1:?wheel dir}
prefix=${2:?installed modmoe prefix}
site=/tmp/modmoe_site
pkg=/tmp/modmoe_pkg
rm -rf "$site" "$pkg"
python3 -m pip install -q --no-index --no-deps --target "$site" "$whl"/*.whl
export PYTHONPATH="$site"
nb_dir=$(python3 -m nanobind --cmake_dir)
CMAKE_PREFIX_PATH="$prefix" python3 -m pip install -q --no-build-isolation --no-deps \
  --target "$pkg" -C cmake.define.nanobind_DIR="$nb_dir" ./python
export PYTHONPATH="$pkg:$site"
export LD_LIBRARY_PATH="$prefix/lib:${LD_LIBRARY_PATH:-}"
cd tests/python && python3 -m pytest -q -rs "${@:3}"
