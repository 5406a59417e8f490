#!/usr/bin/env bash
# Structured outputs on one CUDA GPU, the loss measured in alternation: the GPU tests of the masked
# decode-graph path and of the grammar process, then `bench throughput`'s 512 x 256/256 workload at
# --structured-output-ratio 0 and 0.5, three times each in one process (0, 0.5, 0, 0.5, 0, 0.5;
# tools/structured_pairs.py: the median loss), then where a constrained step's time goes
# (tools/structured_breakdown.py).
#
#   OUT=/some/dir TOKENIZER=DIR bash tools/gpu_structured_pairs.sh     # about 4 minutes on an H200
#
# TOKENIZER: a HuggingFace tokenizer directory for the grammars (SmolLM2's: its tokenizer.json and
# tokenizer_config.json); dummy weights have none. Needs torch, triton, transformers and xgrammar;
# without network, xgrammar's wheel is installed from $WHEELS (default .whl/) when it is missing.
set -uo pipefail
OUT=${OUT:?set OUT to the directory for the results}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
TOKENIZER=${TOKENIZER:?set TOKENIZER to a HuggingFace tokenizer directory}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
START=$SECONDS

PY=$PYTHON log="$OUT/pip.txt"
source tools/gpu_steps.sh
install_missing xgrammar '*.whl'       # pip's output into $OUT/pip.txt
"$PYTHON" -c "import xgrammar" || { echo "xgrammar is missing: put its wheel in $WHEELS"; exit 1; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; uptime; git log -1 --oneline; } \
    >"$OUT/machine.txt" 2>&1

status=0
echo "== GPU tests: grammar rows and the rest through the decode graphs against eager, the grammar process"
timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_engine_gpu.py tests/test_grammar_process.py \
    -k "grammar or graph or async" >"$OUT/gpu-tests.txt" 2>&1 || status=1
tail -1 "$OUT/gpu-tests.txt"; echo "t=$((SECONDS - START))s"

echo "== bench throughput's 512 x 256/256, ratio 0 and 0.5 in alternation"
timeout 200 "$PYTHON" tools/structured_pairs.py --tokenizer "$TOKENIZER" --rounds 3 --json "$OUT/pairs.json" 2>&1 \
    | grep -v Warning | tee "$OUT/pairs.txt" || status=1
echo "t=$((SECONDS - START))s"

echo "== where a step's time goes: half under a JSON schema against none"
timeout 120 "$PYTHON" tools/structured_breakdown.py --dummy llama-3.2-1b --tokenizer "$TOKENIZER" --shares 0,2 2>&1 \
    | grep -v Warning >"$OUT/breakdown.txt" || status=1
cat "$OUT/breakdown.txt"; echo "t=$((SECONDS - START))s"

exit $status
