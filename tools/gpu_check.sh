#!/usr/bin/env bash
# The GPU checks of issue 48 in one run (<= 8 minutes on one GPU): Triton kernel vs torch SDPA, the
# cuda-graph engine vs torch eager, TensorRT where it is installed. Writes docs/results/gpu_check.json.
#
#   bash tools/gpu_check.sh                 # on a GPU machine: CUDA torch + triton + onnx/onnxruntime, no network
#   bash tools/gpu_check.sh --cpu-smoke     # anywhere: the same script at toy sizes, kernel interpreted on the CPU
#   PYTHON=.venv/bin/python bash tools/gpu_check.sh --out /tmp/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [[ -x .venv/bin/python && -z "${PYTHON:-}" ]]; then PY=.venv/bin/python; fi

missing=$("$PY" - <<'PYEOF'
import importlib.util
print(" ".join(m for m in ("torch", "triton", "onnx", "onnxruntime", "safetensors", "numpy")
               if importlib.util.find_spec(m) is None))
PYEOF
)
if [[ -n "$missing" ]]; then
  echo "gpu_check: missing Python packages: $missing (install them; this script uses no network)" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout, installed or not
export MUJOCO_GL="${MUJOCO_GL:-egl}"
if [[ " $* " == *" --cpu-smoke "* ]]; then
  export TRITON_INTERPRET=1
fi
echo "gpu_check: $("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())')"
exec timeout 480 "$PY" tools/gpu_check.py "$@"
