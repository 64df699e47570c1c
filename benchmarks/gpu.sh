#!/usr/bin/env bash
# Times the Pallas GPU kernels (forward, forward+backward) against cuDNN and jax's Mosaic GPU
# attention; writes benchmarks/results/gpu_<family>.json. Under 8 minutes on an H100/H200.
# Needs a Python whose jax sees the GPU (PYTHON=..., default python). Without a GPU it says so
# and exits with status 2.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if ! nvidia-smi -L >/dev/null 2>&1; then
  echo "benchmarks/gpu.sh: no NVIDIA GPU here (nvidia-smi lists none); nothing timed." >&2
  exit 2
fi
nvidia-smi -L
exec timeout 480 "$PYTHON" benchmarks/gpu.py "$@"
