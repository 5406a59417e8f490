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

# bench NAME ARGS...: one run, its JSON saved as $OUT/NAME.json, its table appended to $OUT/bench.txt
bench() { local name=$1; shift; python3 -m nanovllm.cli bench "$@" --json "$OUT/$name.json" --no-progress 2>&1 | grep -v Warning | tee -a "$OUT/bench.txt"; }
bench throughput-qwen3-0.6b throughput --dummy qwen3-0.6b
bench throughput-llama-3.2-1b throughput --dummy llama-3.2-1b
bench latency-llama-3.2-1b latency --dummy llama-3.2-1b
bench throughput-fixed-64-qwen3-0.6b-vs-hf throughput --dummy qwen3-0.6b --dataset throughput-fixed --num-prompts 64 --peer hf
python3 -m nanovllm.bench.attention 2>&1 | tee "$OUT/attention.txt"
python3 -m nanovllm.bench.host_overhead --dummy llama-3.2-1b --batch-sizes 1 64 256 2>&1 | tee "$OUT/host-overhead.txt"
