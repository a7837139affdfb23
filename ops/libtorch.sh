#!/usr/bin/env bash
# LibTorch for the worker's `tch` / `tch-cuda` features (burn-tch), from the PyPI `torch` wheel,
# so that nothing downloads at build time (issue #26). burn 0.22's tch crate (0.22) wants
# PyTorch 2.9.0 exactly. Makes a virtual environment (default /var/tmp/sieve-torch, about
# 7 GB with the wheel's CUDA libraries; SIEVE_TORCH_VENV overrides) unless it is there, and
# prints the environment a build and a run need:
#
#   eval "$(bash ops/libtorch.sh)"
#   cargo build --release -p sieve-worker --features tch        # CPU
#   cargo build --release -p sieve-worker --features tch-cuda   # the first CUDA GPU
#
# The build finds LibTorch through the environment's python (LIBTORCH_USE_PYTORCH=1); the
# binaries load it through LD_LIBRARY_PATH at run time.
set -euo pipefail

venv="${SIEVE_TORCH_VENV:-/var/tmp/sieve-torch}"
version=2.9.0
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch; assert torch.__version__.split('+')[0] == '$version'" 2>/dev/null; then
    echo "making $venv (torch==$version from PyPI, a few GB)" >&2
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "torch==$version" >&2
fi
lib="$("$venv/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)"
cat <<ENV
export VIRTUAL_ENV="$venv"
export PATH="$venv/bin:\$PATH"
export LIBTORCH_USE_PYTORCH=1
export LD_LIBRARY_PATH="$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
ENV
