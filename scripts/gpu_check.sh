#!/usr/bin/env bash
# The GPU checks in one go, for a machine with CuPy, PyTorch-CUDA and a GPU (such as the lent
# device machine): the GPU tests, the GPU benchmarks (training and sampling with and without CUDA graphs),
# the training step's host and device time, a per-layer profile, a short example training
# run, the sample command with and without CUDA graphs, and an evaluation of the shipped
# model. Logs, JSON and a sample grid go to $OUT (or ./gpu_out). Stages named in SKIP are
# left out; "conv tf32" are extra stages (conv parts, TF32 accuracy and the TF32 benchmark)
# that run only when named in EXTRA.
# Usage: [SKIP="evaluate train ..."] [EXTRA="conv tf32"] bash scripts/gpu_check.sh [train-updates]
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export TINYDDPM_CACHE=${TINYDDPM_CACHE:-$PWD/.devcache}  # carried digit/classifier caches, if any
UPDATES=${1:-100}
stage() { echo; echo "=== $1 ($(date +%T))"; }
skip() { [[ " ${SKIP:-} " == *" $1 "* ]] && echo "(skipped)"; }
extra() { [[ " ${EXTRA:-} " == *" $1 "* ]] || { echo "(extra, not named in EXTRA)"; false; }; }
bench() { timeout "$1" python3 -m bench.bench_step --device gpu --repeats 20 --min-row-seconds 10 "${@:2}" 2>&1 | grep -v "round"; }

stage environment
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import cupy, torch, numpy; print('cupy', cupy.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__)"

stage "gpu tests"
skip tests || timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider -rs --maxfail=5 2>&1 \
  | tee "$OUT/pytest_gpu.log" | tail -15

stage "bench_step --device gpu (CUDA graphs on)"
skip bench || bench 150 --out "$OUT/bench_step_gpu.json"

stage "bench_step --device gpu, TINYDDPM_CUDA_GRAPHS=0 (every kernel launched from Python)"
skip eager || TINYDDPM_CUDA_GRAPHS=0 bench 100 --skip-memory --out "$OUT/bench_step_gpu_eager.json"

stage "training steps split into queueing (host) and waiting (device), gc on and off"
skip host || timeout 60 python3 -m bench.gpu_step_host --out "$OUT/gpu_step_host.json" 2>&1 | tail -4

stage "profile_layers --device gpu (training step)"
skip profile || timeout 60 python3 -m bench.profile_layers --device gpu --batch 128 --steps 3 \
  --out "$OUT/profile_layers_gpu.json" 2>&1 | head -22

stage "train the example preset on the GPU, $UPDATES updates"
skip train || { timeout 120 python3 -m tinyddpm train --device gpu --max-steps "$UPDATES" --preview-every 0 \
  --out /tmp/run 2>&1 | tr '\r' '\n' | grep -v "^ *$" | tail -3; tail -2 /tmp/run/loss.csv; }

stage "sample 16 images, 500 DDPM steps, shipped model: CUDA graphs on, then off"
if ! skip sample; then
  for graphs in 1 0; do
    start=$(date +%s.%N)
    TINYDDPM_CUDA_GRAPHS=$graphs timeout 120 python3 -m tinyddpm sample --device gpu --num-images 16 \
      --display-every 0 --out "/tmp/sample_graphs$graphs" 2>&1 | tr '\r' '\n' | grep -v "^ *$" | tail -1
    echo "graphs=$graphs: $(python3 -c "import time; print(f'{time.time() - $start:.1f}')") s wall"
  done
  cp /tmp/sample_graphs1/*.png "$OUT/" 2>/dev/null
  python3 - <<'PY'
import glob
import numpy as np
from PIL import Image
a, b = (sorted(glob.glob(f"/tmp/sample_graphs{g}/*.png")) for g in (1, 0))
for p, q in zip(a, b):
    x, y = (np.asarray(Image.open(f), dtype=np.int16) for f in (p, q))
    print(p.split("/")[-1], "graphs on vs off: max 8-bit difference", int(np.abs(x - y).max()))
PY
fi

stage "evaluate the shipped model on the GPU (DDIM-50, 500 images)"
skip evaluate || timeout 90 python3 -m tinyddpm evaluate --device gpu --num-images 500 --out "$OUT/evaluate_gpu.json" 2>&1 \
  | tr '\r' '\n' | grep -v "^ *$" | tail -5

stage "conv parts, TF32 accuracy and the TF32 benchmark"
if extra conv; then timeout 60 python3 -m bench.gpu_conv_parts 2>&1 | tail -8; fi
if extra tf32; then
  timeout 60 python3 -m bench.tf32_accuracy 2>&1 | tail -2
  timeout 60 python3 -m bench.tf32_accuracy --tf32 2>&1 | tail -2
  bench 100 --tf32 --skip-memory --out "$OUT/bench_step_gpu_tf32.json"
fi
stage done
