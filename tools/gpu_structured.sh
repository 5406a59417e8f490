#!/usr/bin/env bash
# Structured outputs on a CUDA GPU: the bitmask kernel and sampler tests, then throughput with half the
# requests under a JSON schema against none constrained (target: at most 10% loss on an H200).
# Usage on a CUDA machine with torch + triton + transformers + xgrammar installed:
#   OUT=/some/dir bash tools/gpu_structured.sh
# Writes gpu-tests.txt, structured-throughput.txt and structured-throughput.json to $OUT; about 3 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks}
mkdir -p "$OUT"
START=$SECONDS
python3 -c "import xgrammar" 2>/dev/null || pip install -q xgrammar jsonschema > "$OUT/pip.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu-tests.txt" 2>&1
timeout 150 python3 -m pytest -q -m gpu tests/test_bitmask_op.py -p no:cacheprovider >> "$OUT/gpu-tests.txt" 2>&1
echo "tests rc=$? t=$((SECONDS - START))s"; tail -3 "$OUT/gpu-tests.txt"
timeout 240 python3 benchmarks/structured_throughput.py --dummy llama-3.2-1b \
  --json "$OUT/structured-throughput.json" 2>&1 | grep -v Warning > "$OUT/structured-throughput.txt"
echo "bench rc=$? t=$((SECONDS - START))s"; cat "$OUT/structured-throughput.txt" | tail -5
