#!/usr/bin/env bash
# The GPU session in one script: kernel and engine tests on CUDA, then the BENCHMARKS.md workloads
# with the roofline in the same process, and the host share of a decode step.
# Usage on a CUDA machine with torch + triton + transformers installed:
#   OUT=/some/dir bash benchmarks/run-gpu.sh
# Writes 8 files to $OUT (the device tool brings back at most 8).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks}
mkdir -p "$OUT"
START=$SECONDS
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"

timeout 240 python3 -m pytest -q -m gpu tests/gpu tests/test_sampler.py -p no:cacheprovider > "$OUT/gpu-tests.txt" 2>&1
echo "tests rc=$? t=$((SECONDS - START))s"; tail -15 "$OUT/gpu-tests.txt"

# bench NAME ARGS...: one run, its JSON saved as $OUT/NAME.json, its table appended to $OUT/bench.txt
bench() { local name=$1; shift; echo "== $name t=$((SECONDS - START))s" >> "$OUT/bench.txt"
  timeout 150 python3 -m nanovllm.cli bench "$@" --json "$OUT/$name.json" --no-progress 2>&1 | grep -v Warning >> "$OUT/bench.txt"; }
bench throughput-llama-3.2-1b throughput --dummy llama-3.2-1b
bench latency-llama-3.2-1b latency --dummy llama-3.2-1b
bench throughput-qwen3-0.6b throughput --dummy qwen3-0.6b
bench throughput-llama-3.2-1b-sync throughput --dummy llama-3.2-1b --async-scheduling off
grep "^==\|^|\|Latency:\|Throughput:\|Error\|error" "$OUT/bench.txt"
timeout 120 python3 -m nanovllm.bench.host_overhead --dummy llama-3.2-1b --batch-sizes 1 64 256 2>&1 | grep -v Warning | tee "$OUT/host-overhead.txt"
echo "done t=$((SECONDS - START))s"
