#!/usr/bin/env bash
# Structured outputs on one CUDA GPU: the bitmask kernel tests and the grammar-process tests, where a
# step's time goes with half the batch under a JSON schema (tools/structured_breakdown.py: the engine's
# waits and the grammar process's accept and fill), then `nano-vllm bench throughput` with none of the
# requests and with half of them under the schema, in the same run (target: at most 10% loss).
#
#   OUT=/some/dir TOKENIZER=DIR bash tools/gpu_structured.sh     # about 3 minutes on an H200
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
echo "== bitmask kernel tests, grammar process tests"
timeout 150 "$PYTHON" -m pytest -q -m gpu tests/test_bitmask_op.py -p no:cacheprovider >"$OUT/gpu-tests.txt" 2>&1 || status=1
tail -1 "$OUT/gpu-tests.txt"
timeout 120 "$PYTHON" -m pytest -q -m "gpu or not gpu" tests/test_grammar_process.py -p no:cacheprovider >"$OUT/grammar-process-tests.txt" 2>&1 || status=1
tail -1 "$OUT/grammar-process-tests.txt"; echo "t=$((SECONDS - START))s"

echo "== where a step's time goes: 512 requests of 256/256, half under a JSON schema"
timeout 150 "$PYTHON" tools/structured_breakdown.py --dummy llama-3.2-1b --tokenizer "$TOKENIZER" 2>&1 \
    | grep -v Warning >"$OUT/breakdown.txt" || status=1
cat "$OUT/breakdown.txt"; echo "t=$((SECONDS - START))s"

for ratio in 0 0.5; do
    echo "== nano-vllm bench throughput, --structured-output-ratio $ratio"
    timeout 150 "$PYTHON" -m nanovllm.cli bench throughput --dummy llama-3.2-1b --tokenizer "$TOKENIZER" \
        --dataset random --num-prompts 512 --input-len 256 --output-len 256 --structured-output-ratio "$ratio" \
        --no-progress --json "$OUT/throughput-ratio-$ratio.json" >"$OUT/throughput-ratio-$ratio.txt" 2>&1 || status=1
    tail -3 "$OUT/throughput-ratio-$ratio.txt"; echo "t=$((SECONDS - START))s"
done

exit $status
