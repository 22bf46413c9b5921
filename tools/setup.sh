#!/usr/bin/env bash
# Set up edge-steer in ./.venv on a fresh machine (idempotent; re-running is cheap).
#
# PyTorch is installed first and explicitly, because a bare `torch` requirement pulls a multi-GB
# CUDA build from PyPI. On the project's CPU machines `torch==2.13.0` is the CPU build served from
# local disk. On a robot PC with an NVIDIA GPU, install the CUDA wheel matching its driver into
# .venv first (or set TORCH_SPEC); pyproject's range then accepts it and nothing is reinstalled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC (CPU build on this machine kind)"
  .venv/bin/python -m pip install -q "$TORCH_SPEC"
fi
# [ray]: the cluster executor's tests run in CI (ray is about 240 MB installed)
.venv/bin/python -m pip install -q -e '.[dev,ray]'
# Triton runs our fused-attention kernel under its interpreter in the tests. It lives apart from the venv's
# site-packages: on this CPU kind, a process that renders with Mesa's software EGL and then loads triton's LLVM
# (torch._dynamo imports it) segfaults, so only the kernel tests' subprocesses put .venv/kernels on their path.
[ -d .venv/kernels/triton ] || .venv/bin/python -m pip install -q --target .venv/kernels 'triton>=3.0'
echo "setup: ok ($(.venv/bin/python -c 'import torch, mujoco; print("torch", torch.__version__, "| mujoco", mujoco.__version__)'))"
