#!/usr/bin/env bash
# The GPU runs in one script: the docs/benchmarks.md workloads with the roofline in the same process,
# async scheduling on (the default on one GPU) and off, the host share of a decode step, then the GPU tests.
# Usage on a CUDA machine with torch + triton + transformers installed:
#   OUT=/some/dir bash tools/run-gpu.sh        (TESTS=all for every GPU test, slower)
# Writes 8 files to $OUT; copy the JSON results into benchmarks/results/ and run `nano-vllm bench report`.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to a folder for the logs and results}
mkdir -p "$OUT"
START=$SECONDS
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 > "$OUT/gpu.txt"
# First, so that every Triton kernel the benches use is compiled (and cached) before any is timed.
overhead() { timeout 100 python3 -m nanovllm.bench.host_overhead --dummy llama-3.2-1b --batch-sizes 1 64 256 \
  --async-scheduling "$1" 2>&1 | grep "^|\\|card" >> "$OUT/host-overhead.txt"; }
overhead on
# bench NAME ARGS...: one run, its JSON saved as $OUT/NAME.json, its table appended to $OUT/bench.txt
bench() { local name=$1; shift; echo "== $name t=$((SECONDS - START))s" >> "$OUT/bench.txt"
  timeout 120 python3 -m nanovllm.cli bench "$@" --json "$OUT/$name.json" --no-progress 2>&1 | grep -v Warning >> "$OUT/bench.txt"; }
bench throughput-llama-3.2-1b throughput --dummy llama-3.2-1b
bench latency-llama-3.2-1b latency --dummy llama-3.2-1b
bench throughput-qwen3-0.6b throughput --dummy qwen3-0.6b
grep "^==\|^|\|Latency:\|Throughput:\|rror" "$OUT/bench.txt"; cat "$OUT/host-overhead.txt"
if [ "${TESTS:-async}" = all ]; then SELECT=(tests/gpu tests/test_sampler.py); else SELECT=(tests/gpu -k "async or fused"); fi
timeout 120 python3 -m pytest -q -m gpu "${SELECT[@]}" -p no:cacheprovider > "$OUT/gpu-tests.txt" 2>&1
echo "tests rc=$? t=$((SECONDS - START))s"; tail -4 "$OUT/gpu-tests.txt"
bench throughput-llama-3.2-1b-sync throughput --dummy llama-3.2-1b --no-async-scheduling
grep -A4 "^== throughput-llama-3.2-1b-sync" "$OUT/bench.txt" | grep "^|\|Throughput"
if [ "${OVERHEAD_OFF:-0}" = 1 ]; then overhead off; tail -4 "$OUT/host-overhead.txt"; fi
# PROFILE=1: where the host's time goes at batch 256, both modes
if [ "${PROFILE:-0}" = 1 ]; then for mode in off on; do
  timeout 100 python3 -m nanovllm.bench.host_overhead --batch-sizes 256 --profile --async-scheduling $mode 2>&1 \
    | grep -v Warning >> "$OUT/host-profile.txt"; done; cat "$OUT/host-profile.txt"; fi
echo "done t=$((SECONDS - START))s"
