#!/usr/bin/env bash
# Fetch the peer wheels bench/gpu_suite.py compares against, on a machine WITH a package
# registry, for a GPU machine that may have none: liger-kernel (fused linear CE / JSD) and
# cut-cross-entropy (Apple's CCE). Both are pure-Python wheels (their kernels are Triton),
# so one download serves any CUDA image. No dependencies are fetched (--no-deps): torch and
# triton come from the GPU image itself and must never be replaced.
#
#   bench/gpu_wheels.sh [DIR]        # default bench/wheels/ (git-ignored)
#   copy DIR with the checkout; `pdengine bench gpu` installs from it with
#   `pip --no-index --no-deps --target <tmp>` (--wheels DIR to point elsewhere)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:-$here/wheels}"
python="${PYTHON:-python3}"
mkdir -p "$dest"
"$python" -m pip download --no-deps --only-binary :all: --dest "$dest" liger-kernel cut-cross-entropy
ls -l "$dest"
