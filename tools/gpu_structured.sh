#!/usr/bin/env bash
# Structured outputs on one CUDA GPU: the bitmask kernel tests, the per-step cost of the masks
# (tools/structured_probe.py: accept, fill at 1, 4, 8 threads and the engine's default, copy,
# apply), then throughput with half the requests under a JSON schema against none constrained,
# side by side (tools/structured_throughput.py; target: at most 10% loss).
#
#   OUT=/some/dir bash tools/gpu_structured.sh     # about 3 minutes on an H200
#
# Needs torch, triton, transformers and xgrammar; without network, xgrammar's wheel is installed
# from $WHEELS (default .whl/) when it is missing. Writes machine.txt, gpu-tests.txt, probe.txt,
# structured-throughput.txt and structured-throughput.json to $OUT.
set -uo pipefail
OUT=${OUT:?set OUT to the directory for the results}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
START=$SECONDS

if ! "$PYTHON" -c "import xgrammar" 2>/dev/null && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$WHEELS"/*.whl >"$OUT/pip.txt" 2>&1
fi
"$PYTHON" -c "import xgrammar" || { echo "xgrammar is missing: put its wheel in $WHEELS"; exit 1; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; uptime; git log -1 --oneline; } \
    >"$OUT/machine.txt" 2>&1

status=0
echo "== bitmask kernel tests"
timeout 150 "$PYTHON" -m pytest -q -m gpu tests/test_bitmask_op.py -p no:cacheprovider >"$OUT/gpu-tests.txt" 2>&1 || status=1
tail -1 "$OUT/gpu-tests.txt"; echo "t=$((SECONDS - START))s"

echo "== per-step cost of the masks: 256 rows, 128 under a JSON schema"
{ timeout 120 "$PYTHON" tools/structured_probe.py --device cuda --steps 64 --vocab joined --threads 1,4,8,0
  timeout 60 "$PYTHON" tools/structured_probe.py --device cuda --steps 64 --vocab padded; } \
    2>&1 | grep -v Warning >"$OUT/probe.txt" || status=1
cat "$OUT/probe.txt"; echo "t=$((SECONDS - START))s"

echo "== throughput: none against half constrained (Llama-3.2-1B shape, dummy weights)"
timeout 300 "$PYTHON" tools/structured_throughput.py --dummy llama-3.2-1b --json "$OUT/structured-throughput.json" \
    2>&1 | grep -v Warning >"$OUT/structured-throughput.txt" || status=1
tail -4 "$OUT/structured-throughput.txt"; echo "t=$((SECONDS - START))s"
exit $status
