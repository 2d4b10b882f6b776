#!/usr/bin/env bash
# Installs what modmoe's build and tests need from Debian's packages, at pinned versions
# (Debian 12 "bookworm"). Packages already present at the pinned version are left alone, so
# this costs nothing on a machine that has them. The CUDA toolkit is optional: without nvcc
# the build is CPU-only (the reference backend).
set -euo pipefail

PINNED=(
  "cmake=3.25.1-1"
  "ninja-build=1.11.1-2~deb12u1"
  "g++=4:12.2.0-3"
  "libgtest-dev=1.12.1-0.2"
  "libgmock-dev=1.12.1-0.2"
  "nlohmann-json3-dev=3.11.2-2"
)

missing=()
for spec in "${PINNED[@]}"; do
  name=${spec%%=*}
  want=${spec#*=}
  have=$(dpkg-query -W -f='${Version}' "$name" 2>/dev/null || true)
  [ "$have" = "$want" ] || missing+=("$spec")
done

# The Python package is built and tested in a virtual environment (tests/python/run.sh).
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  missing+=("python3-venv=3.11.2-1+b1")
fi

if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  echo "deps: CUDA toolkit found: the CUDA backend will be built"
else
  echo "deps: no CUDA toolkit (nvcc): building the CPU reference backend only"
fi
