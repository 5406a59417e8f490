#!/usr/bin/env bash
# FP8 decode with and without the activation quantization fused into the GEMM's prologue
# (nanovllm/ops/quant_linear_triton.py, FUSED_QUANTIZATION_BYTES), in one run on one GPU:
# batch-1 `latency` of each model in bfloat16 quantized to fp8 at load.
#
#   OUT=/some/dir MODELS="llama-3.2-1b llama-3.1-8b" bash tools/gpu_fp8_fusion.sh
set -uo pipefail
OUT=${OUT:?set OUT to the directory for the results}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0
for model in ${MODELS:-llama-3.2-1b}; do
    for fused_bytes in default 0; do
        name="latency-$model-fp8-fused-$fused_bytes"
        echo "== $name"
        timeout 150 "$PYTHON" - "$model" "$fused_bytes" "$OUT/$name.json" >"$OUT/$name.log" 2>&1 <<'PY' || { echo "failed: see $OUT/$name.log"; status=1; }
import sys
import nanovllm.ops.quant_linear_triton as kernels
from nanovllm.cli import main
model, fused_bytes, json_path = sys.argv[1:]
if fused_bytes != "default":
    kernels.FUSED_QUANTIZATION_BYTES = int(fused_bytes)
sys.exit(main(["bench", "latency", "--dummy", model, "--quantization", "fp8", "--no-progress", "--json", json_path]))
PY
        tail -3 "$OUT/$name.log"
    done
done
exit $status
