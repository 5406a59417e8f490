#!/usr/bin/env bash
# The one-row W4A16 GEMV with many rows' words a thread (_w4a16_row_gemv_kernel; the switch ROW_GEMV in
# nanovllm/ops/quant_linear_triton.py) against the GEMVs the engine runs without it, on one GPU:
#   1. its GPU tests (the PTX path that loads x as 16-byte pairs; W4A16 and GGUF's groups of 32) and the
#      W4A16 reference test;
#   2. `bench latency` at batch 1, Llama-3.1-8B w4a16 and gguf-q4_k, then Llama-3.2-1B w4a16, each with
#      ROW_GEMV off (the GEMVs before it) and on, in the same call (PARTS "latency");
#   3. each layer alone at four tilings (tools/quant_gemv_probe.py --row-gemv; PARTS "probe").
# Results, logs and the summary land in $OUT (a GPU machine may return only a few files: gpu_row_gemv.log
# and gpu_row_gemv.tar.gz). About 7 minutes on an H200 from a fresh start; PARTS (default "tests latency
# probe") picks the parts.
#   OUT=/some/dir bash tools/gpu_row_gemv.sh        (from the repository root)
set -u
source "$(dirname "$0")/gpu_steps.sh"
gpu_setup gpu_row_gemv

PARTS=" ${PARTS:-tests latency probe} "
if [[ $PARTS == *" tests "* ]]; then
    step tests 90 $PY -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_quant_gpu.py -x \
        -k "row_gemv or w4a16_kernel_matches"
fi
ROW=nanovllm.ops.quant_linear_triton.ROW_GEMV=True
OFF=nanovllm.ops.quant_linear_triton.ROW_GEMV=False
latency() {    # latency NAME MODEL FORMAT [SETTING...]: one `bench latency` run with those module settings
    local name=$1 model=$2 q=$3; shift 3
    step "$name" 75 $PY tools/bench_with.py "$@" -- bench latency --dummy "$model" --quantization "$q" \
        --peer none --no-progress --num-runs 2 --json "$WORK/$name.json"
}
if [[ $PARTS == *" latency "* ]]; then
    latency latency-llama-3.1-8b-w4a16-off llama-3.1-8b w4a16 "$OFF"
    latency latency-llama-3.1-8b-gguf-q4_k-off llama-3.1-8b gguf-q4_k "$OFF"
    latency latency-llama-3.1-8b-gguf-q4_k-on llama-3.1-8b gguf-q4_k "$ROW"
    latency latency-llama-3.1-8b-w4a16-on llama-3.1-8b w4a16 "$ROW"
    latency latency-llama-3.2-1b-w4a16-off llama-3.2-1b w4a16 "$OFF"
    latency latency-llama-3.2-1b-w4a16-on llama-3.2-1b w4a16 "$ROW"
fi
if [[ $PARTS == *" probe "* ]]; then
    step probe "${PROBE_S:-110}" $PY tools/quant_gemv_probe.py --row-gemv --json "$WORK/row-probe.json"
    grep "row-gemv" "$WORK/probe.txt" | tee -a "$log"
fi

headlines "$WORK" "latency-*.json"
gpu_finish gpu_row_gemv
