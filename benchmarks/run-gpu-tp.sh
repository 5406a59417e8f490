#!/usr/bin/env bash
# Tensor parallelism on two GPUs in one script: Llama-3.1-8B (dummy weights) `latency` and `throughput`
# at TP=1 and TP=2, each with the roofline of the cards it ran on, then the NCCL tests.
# Usage on a machine with two CUDA GPUs:  OUT=/some/dir bash benchmarks/run-gpu-tp.sh
# Writes at most 8 files to $OUT (the device tool's limit).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
OUT=${OUT:-benchmarks}
mkdir -p "$OUT"
START=$SECONDS
LOG=$OUT/gpu-tp-log.txt
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m | head -3
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'nccl', torch.cuda.nccl.version())"
} > "$OUT/gpu-tp.txt" 2>&1

bench() { local name=$1; shift; echo "== $name (t=$((SECONDS - START))s)" >> "$LOG"
  timeout 170 python3 -m nanovllm.cli bench "$@" --json "$OUT/$name.json" --no-progress >> "$OUT/bench-tp.txt" 2>> "$LOG"
  echo "== $name rc=$? (t=$((SECONDS - START))s)" >> "$LOG"; }
for tp in 1 2; do
  bench "latency-llama-3.1-8b-tp$tp" latency --dummy llama-3.1-8b --tensor-parallel-size $tp
  bench "throughput-llama-3.1-8b-tp$tp" throughput --dummy llama-3.1-8b --tensor-parallel-size $tp
done
grep -v Warning "$OUT/bench-tp.txt" | grep "^|\|Latency\|Throughput"

LEFT=$(( ${DEADLINE_S:-570} - (SECONDS - START) ))
echo "== tests with ${LEFT}s left" >> "$LOG"
timeout -s INT $LEFT python3 -m pytest -v -m gpu tests/gpu/test_tensor_parallel_gpu.py -p no:cacheprovider \
  --timeout 100 >> "$OUT/gpu-tp-tests.txt" 2>&1
echo "== tests rc=$? (t=$((SECONDS - START))s)" >> "$LOG"
grep -E "PASSED|FAILED|ERROR|passed|failed|Timeout" "$OUT/gpu-tp-tests.txt" | tail -20
tail -5 "$LOG"
