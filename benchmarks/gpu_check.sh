#!/usr/bin/env bash
# The GPU checks, for whoever gets a CUDA machine (about 4-6 minutes, under 8 with the timeouts):
# the gpu-marked tests (tests/gpu: fit/evaluate/resume in bfloat16 on CUDA; NCCL with 2 GPUs), then
# benchmarks/gpu.py (random ~1.1B Llama, bf16, letters, sequence 256, batch 8) and its summary.
#
#   make gpu-check                         # or, in an installed checkout:
#   BAYES_POLAR_DATA=../shared/data benchmarks/gpu_check.sh
#
# Writes benchmarks/results/gpu-random-llama-1b.json and summary-random-llama-1b.json (commit both,
# with the machine they record). PYTHON (default .venv/bin/python) and THREADS (CPU threads for the
# last layer, which lives on the CPU; default 8) can be set.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
THREADS=${THREADS:-8}
: "${BAYES_POLAR_DATA:?set BAYES_POLAR_DATA to the benchmark data folder (see ../shared/data/README.md)}"
export BAYES_POLAR_DATA BAYES_POLAR_REQUIRE_DATA=1 OMP_NUM_THREADS="$THREADS"

"$PYTHON" -c "import sys, torch; sys.exit(None if torch.cuda.is_available() else
    f'no CUDA device for torch {torch.__version__}: run this on a GPU machine (with a CUDA build of torch)')"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader || true

status=0  # a failing step does not stop the next: one GPU session gives every answer it can
timeout 240 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/gpu || status=$?
timeout 300 "$PYTHON" benchmarks/gpu.py --threads "$THREADS" || status=$?
"$PYTHON" benchmarks/summary.py --model random-llama-1b || status=$?
exit "$status"
