#!/usr/bin/env bash
# The GPU checks in one go, for a machine with CuPy, PyTorch-CUDA and a GPU
# (the lent device machine): the GPU tests, the GPU benchmark, a short example
# training run and a shipped-model evaluation, with logs under $OUT (or ./gpu_out).
# Usage: bash scripts/gpu_check.sh [train-steps]
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export TINYDDPM_CACHE=${TINYDDPM_CACHE:-$PWD/.devcache}  # carried digits/classifier caches, if any
STEPS=${1:-100}
tinyddpm() { python3 -c 'import sys; from tinyddpm.cli import main; sys.argv[0] = "tinyddpm"; main()' "$@"; }
stage() { echo; echo "=== $1 ($(date +%T))"; }

stage environment
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import cupy, torch, numpy; print('cupy', cupy.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__)"

stage "gpu tests"
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider --maxfail=5 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25

stage "gradcheck --device gpu"
timeout 45 tinyddpm gradcheck --device gpu 2>&1 | tail -8

stage "bench_step --device gpu"
timeout 120 python3 -m bench.bench_step --device gpu --repeats 10 --out "$OUT/bench_step_gpu.json" 2>&1 \
  | tee "$OUT/bench_gpu.log" | grep -v "round"

stage "profile_layers --device gpu"
timeout 60 python3 -m bench.profile_layers --device gpu --batch 128 --steps 3 --out "$OUT/profile_layers_gpu.json" 2>&1 | tail -45

stage "train example preset on the GPU, $STEPS updates"
timeout 90 tinyddpm train --device gpu --max-steps "$STEPS" --preview-every 0 --out /tmp/run 2>&1 | tr '\r' '\n' | tail -4
tail -3 /tmp/run/loss.csv
cp /tmp/run/loss.png "$OUT/" 2>/dev/null

stage "evaluate the shipped model on the GPU (DDIM-50, 500 images)"
timeout 60 tinyddpm evaluate --device gpu --num-images 500 --out "$OUT/evaluate_gpu.json" 2>&1 | tr '\r' '\n' | tail -5
stage done
