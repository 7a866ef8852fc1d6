#!/usr/bin/env bash
# The GPU checks in one go, for a machine with CuPy, PyTorch-CUDA and a GPU (such as the lent
# device machine): the GPU tests, TF32 accuracy, the GPU benchmarks and profile, a short example
# training run and an evaluation of the shipped model. Logs and JSON go to $OUT (or ./gpu_out).
# Usage: [SKIP="evaluate train ..."] bash scripts/gpu_check.sh [train-updates]
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export TINYDDPM_CACHE=${TINYDDPM_CACHE:-$PWD/.devcache}  # carried digit/classifier caches, if any
UPDATES=${1:-100}
stage() { echo; echo "=== $1 ($(date +%T))"; }
skipped() { [[ " ${SKIP:-} " == *" $1 "* ]] && echo "(skipped)"; }

stage environment
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import cupy, torch, numpy; print('cupy', cupy.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__)"

stage "gpu tests"
timeout 180 python3 -m pytest -q -m gpu -p no:cacheprovider -rs --maxfail=5 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15

stage "conv parts"
timeout 60 python3 -m bench.gpu_conv_parts 2>&1 | tail -8

stage "tf32 accuracy"
timeout 60 python3 -m bench.tf32_accuracy 2>&1 | tail -2
timeout 60 python3 -m bench.tf32_accuracy --tf32 2>&1 | tail -2

stage "bench_step --device gpu"
timeout 150 python3 -m bench.bench_step --device gpu --repeats 20 --out "$OUT/bench_step_gpu.json" 2>&1 \
  | grep -v "round" | tee "$OUT/bench_gpu.log"
timeout 100 python3 -m bench.bench_step --device gpu --tf32 --skip-memory --repeats 20 \
  --out "$OUT/bench_step_gpu_tf32.json" 2>&1 | grep -v "round" | tee "$OUT/bench_gpu_tf32.log"

stage "profile_layers --device gpu"
timeout 60 python3 -m bench.profile_layers --device gpu --batch 128 --steps 3 --out "$OUT/profile_layers_gpu.json" \
  2>&1 | head -22

stage "train the example preset on the GPU, $UPDATES updates"
skipped train || timeout 120 python3 -m tinyddpm train --device gpu --max-steps "$UPDATES" --preview-every 0 --out /tmp/run 2>&1 \
  | tr '\r' '\n' | grep -v "^ *$" | tail -3
skipped train || tail -2 /tmp/run/loss.csv

stage "evaluate the shipped model on the GPU (DDIM-50, 500 images)"
skipped evaluate || timeout 90 python3 -m tinyddpm evaluate --device gpu --num-images 500 --out "$OUT/evaluate_gpu.json" 2>&1 \
  | tr '\r' '\n' | grep -v "^ *$" | tail -5
stage done
