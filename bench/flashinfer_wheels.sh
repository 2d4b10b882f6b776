#!/usr/bin/env bash
# FlashInfer's CuTe-DSL SM90 MoE on the GPU machine (no internet there) for bench/compare.py
# --flashinfer. Its wheels and their dependencies are ~215 MB (flashinfer-python 62 MB,
# nvidia-cutlass-dsl-libs-cu13 92 MB), over the device tool's 64 MiB carry per call, so they
# travel in parts over consecutive calls to one warm machine (ignored folders stay there
# between calls; a machine idle for 30 s is given back, so run the calls back to back).
#
#   here:   bash bench/flashinfer_wheels.sh download .devcarry/fi      -> .devcarry/fi/part_aa ...
#   device: one call per part, each carrying that part alone:
#           bash bench/flashinfer_wheels.sh stash .devcarry/fi/part_aa   (copies it to .fi-cache/)
#           last call: bash bench/flashinfer_wheels.sh install /tmp/fi_site
#                      PYTHONPATH=/tmp/fi_site python3 bench/compare.py --flashinfer ...
# The PyTorch 2.11 environment there provides torch, numpy, requests, packaging, tqdm, click,
# ninja, typing-extensions; everything else is pinned below (cp312, manylinux x86_64, CUDA 13).
set -euo pipefail
PINS=(
  flashinfer-python==0.7.2.post1 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1
  apache-tvm-ffi==0.1.15.post2 cuda-python==13.4.4 cuda-bindings==13.4.4 cuda-core==1.2.2
  cuda-pathfinder==1.9.1 cuda-tile==1.7.0 nvidia-cudnn-frontend==1.32.0 nccl4py==0.6.0
  nccl-extensions==0.1.0 einops==0.8.2 tabulate==0.10.0 nvidia-ml-py==13.615.71 protobuf==7.36.2
)
cache=.fi-cache
case ${1:-} in
  download)
    out=${2:?folder for the parts}
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d "$tmp" "${PINS[@]}"
    mkdir -p "$out"
    rm -f "$out"/part_*
    tar cf - -C "$tmp" . | split -b 55M - "$out/part_"
    rm -rf "$tmp"
    ls -l "$out"
    ;;
  stash)
    part=${2:?a part}
    mkdir -p "$cache"
    cp "$part" "$cache/"
    ls -l "$cache"
    ;;
  install)
    target=${2:?target folder}
    tmp=$(mktemp -d)
    cat "$cache"/part_* | tar xf - -C "$tmp"
    python3 -m pip install -q --no-index --no-deps --target "$target" "$tmp"/*.whl
    rm -rf "$tmp"
    # The CuTe DSL's `cutlass` package is put on sys.path by a .pth file, which Python reads
    # in site directories only: addsitedir here (bench/flashinfer_peer.py does the same).
    PYTHONPATH="$target" python3 -c 'import site, sys; site.addsitedir(sys.argv[1]); import cutlass.cute, flashinfer; print("flashinfer", flashinfer.__version__, "cutlass-dsl ok")' "$target"
    ;;
  *)
    echo "usage: $0 download DIR | stash PART | install TARGET" >&2
    exit 2
    ;;
esac
