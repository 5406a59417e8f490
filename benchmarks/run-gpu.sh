#!/usr/bin/env bash
# The GPU session in one script: kernel and engine tests on CUDA, then the
# BENCHMARKS.md workloads with the roofline in the same process.
# Usage on a CUDA machine with torch + triton + transformers installed:
#   OUT=/some/dir bash benchmarks/run-gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

python3 -m pytest -q -m gpu tests/gpu tests/test_sampler.py -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/gpu-tests.txt"

bench() { python3 -m nanovllm.cli bench "$@" --save-dir "$OUT" --no-progress 2>&1 | grep -v Warning; }
bench throughput --dummy qwen3-0.6b
bench throughput --dummy llama-3.2-1b
bench latency --dummy llama-3.2-1b
bench throughput --dummy qwen3-0.6b --dataset throughput-fixed --num-prompts 64 --peer hf
python3 -m nanovllm.bench.attention 2>&1 | tee "$OUT/attention.txt"
