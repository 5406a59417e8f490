#!/usr/bin/env bash
# The GPU tests (kernels, CUDA-graph and tensor-parallel engines, whose log-probabilities are compared
# with the eager and single-GPU runs), plus the CPU parity tests run once more on this machine.
# Needs two CUDA GPUs for the tensor-parallel tests (they skip with fewer).
# Usage, from the repository root: OUT=results bash tests/gpu/run_gpu_tests.sh
set -u
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.csv" 2>&1
python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu -rs --durations=10 2>&1 | tee "$OUT/gpu-tests.txt"
status=${PIPESTATUS[0]}
python3 -m pytest -q -p no:cacheprovider tests/test_model_parity.py tests/test_sampler_statistics.py 2>&1 \
  | tee "$OUT/cpu-parity-tests.txt"
exit $(( status || PIPESTATUS[0] ))
