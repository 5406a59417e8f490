#!/usr/bin/env bash
# Tensor parallelism on two GPUs in one script: the NCCL tests, then Llama-3.1-8B (dummy weights)
# `throughput` and `latency` at TP=1 and TP=2, each with the roofline of the cards it ran on.
# Usage on a machine with two CUDA GPUs:  OUT=/some/dir bash benchmarks/run-gpu-tp.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu-tp.txt"
nvidia-smi topo -m | tee -a "$OUT/gpu-tp.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'nccl', torch.cuda.nccl.version())" | tee -a "$OUT/gpu-tp.txt"

timeout 400 python3 -m pytest -q -m gpu tests/gpu/test_tensor_parallel_gpu.py -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/gpu-tp-tests.txt"

bench() { local name=$1; shift; timeout 300 python3 -m nanovllm.cli bench "$@" --json "$OUT/$name.json" --no-progress 2>&1 | grep -v Warning | tee -a "$OUT/bench-tp.txt"; }
for tp in 1 2; do
  bench "latency-llama-3.1-8b-tp$tp" latency --dummy llama-3.1-8b --tensor-parallel-size $tp
  bench "throughput-llama-3.1-8b-tp$tp" throughput --dummy llama-3.1-8b --tensor-parallel-size $tp
done
