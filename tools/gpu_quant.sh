#!/usr/bin/env bash
# Quantized weights on one GPU: the kernel tests, each decode linear of Llama-3.1-8B and -3.2-1B timed
# against cuBLAS bf16 (tools/quant_gemv_probe.py, with a sweep of the one-row tiles), `nano-vllm bench
# latency` for bf16, fp8, w4a16 and GGUF's Q8_0 and Q4_K at both models and `throughput` (its default 256
# requests) at Llama-3.1-8B for bf16, fp8, and fp8 with the FP8 KV cache, in the same run; each result as
# JSON under $OUT, and all of them in $OUT/gpu_quant.tar.gz.
# TARGETS=1 runs the speed targets' part alone: the tests, `latency` of bf16, fp8 and w4a16, `throughput`.
# Usage, from the repository root on a machine with a CUDA GPU:  OUT=/some/dir bash tools/gpu_quant.sh
# BASE=path/to/another/checkout times its kernels beside these, and its Llama-3.2-1B decode in Q8_0, Q4_K
# and W4A16; GEMM_SWEEP=1 adds the FP8 W8A8 tile sweep; SWEEP_FORMATS narrows the one-row sweep
# (fp8,w4a16,w8a16).
# Then a decode step's GPU time with the kernels between the GEMVs launched early as set, with none and with
# every kind, and with gate_up_proj's W4A16 GEMV gated or not (tools/decode_ab_probe.py). About 10 minutes on
# an H200; each step has its own time limit and a failed step does not stop the rest.
set -u
OUT="${OUT:?set OUT to a directory for the results}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)      # absolute: the BASE runs below work from another tree
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
log="$OUT/gpu_quant.log"
STEPS_DIR="$OUT"
source "$(dirname "$0")/gpu_steps.sh"
gpu_header
install_missing gguf 'gguf-*.whl'     # the GGUF files the GPU tests write, from $WHEELS (default .whl/)

step tests 180 $PY -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_quant_gpu.py

# each decode linear of Llama-3.1-8B and -3.2-1B at 1 and 4 rows against cuBLAS bf16, weights cycled past L2,
# a sweep of the one-row tiles (FP8 GEMV widths / steps / splits, W4A16 GEMV widths / splits / prefetch) and of
# FP8's W8A8 tiles at 8 to 64 rows (OLD=path/to/another/quant_linear_triton.py also times that file's kernels)
# BASE=path/to/another/checkout: its kernels timed beside these, and its GGUF Q8_0 decode (W8A16) too
OLD="${OLD:-${BASE:+$BASE/nanovllm/ops/quant_linear_triton.py}}"
[ -z "${TARGETS:-}" ] && step kernel-timing 160 $PY tools/quant_gemv_probe.py --sweep --sweep-formats "${SWEEP_FORMATS:-fp8,w4a16,w8a16}" \
    ${GEMM_SWEEP:+--gemm} ${OLD:+--old "$OLD"} --json "$OUT/kernel-timing.json"

latency() {    # latency MODEL FORMAT [TREE NAME]: one bench latency run of the tree (this one by default)
    local model=$1 q=$2 tree=${3:-$PWD} name=${4:-latency-$1-$2} flag=()
    [ "$q" != bf16 ] && flag=(--quantization "$q")
    (cd "$tree" && PYTHONPATH="$tree:$PYTHONPATH" step "$name" 40 $PY -m nanovllm.cli bench latency --dummy "$model" "${flag[@]}" \
        --peer none --no-progress --num-runs 2 --json "$OUT/$name.json")
}
formats=(bf16 fp8 w4a16)
[ -z "${TARGETS:-}" ] && formats+=(gguf-q8_0 gguf-q4_k)
for model in llama-3.2-1b llama-3.1-8b; do
    for q in "${formats[@]}"; do
        latency "$model" "$q"
    done
done
if [ -n "${BASE:-}" ]; then
    for q in gguf-q8_0 gguf-q4_k w4a16; do latency llama-3.2-1b $q "$BASE" "base-latency-llama-3.2-1b-$q"; done
fi
for q in bf16 fp8 fp8-kv; do     # fp8-kv: FP8 weights and the FP8 KV cache
    flag=(); [ "$q" != bf16 ] && flag=(--quantization fp8)
    [ "$q" = fp8-kv ] && flag+=(--kv-cache-dtype fp8)
    step "throughput-llama-3.1-8b-$q" 120 $PY -m nanovllm.cli bench throughput --dummy llama-3.1-8b "${flag[@]}" \
        --peer none --no-progress --json "$OUT/throughput-llama-3.1-8b-$q.json"
done
if [ -z "${TARGETS:-}" ]; then
    # GPU time of a batch-1 decode step with the kernels between the GEMVs launched early (PDL_BETWEEN, ops/__init__.py)
    # as set, with none of them and with the other kinds too (the kinds' costs differ by model and format)
    early_sets=(--set as-set --set none='nanovllm.ops.PDL_BETWEEN=()'
                --set and-merge='nanovllm.ops.PDL_BETWEEN={"norm", "partials", "merge"}'
                --set every-kind='nanovllm.ops.PDL_BETWEEN={"norm", "partials", "merge", "attention", "silu"}')
    for spec in llama-3.1-8b:w4a16 llama-3.1-8b:bf16 llama-3.2-1b:fp8; do
        model=${spec%%:*} q=${spec##*:} flag=()
        [ "$q" != bf16 ] && flag=(--quantization "$q")
        step "early-launch-$model-$q" 60 $PY tools/decode_ab_probe.py --dummy "$model" "${flag[@]}" "${early_sets[@]}" \
            --json "$OUT/early-launch-$model-$q.json"
    done
    # gate_up_proj's gated W4A16 GEMV (FUSED_SILU, ops/quant_linear_triton.py) against the SiLU-and-mul kernel after
    # the GEMV, and its late launch of the next kernel in one wave (GATED_LATE_IN_ONE_WAVE) against the launch at its start
    gated_sets=(--set as-set --set unfused='nanovllm.ops.quant_linear_triton.FUSED_SILU=False'
                --set start-launch='nanovllm.ops.quant_linear_triton.GATED_LATE_IN_ONE_WAVE=False')
    for model in llama-3.2-1b llama-3.1-8b; do
        step "gated-$model-w4a16" 60 $PY tools/decode_ab_probe.py --dummy "$model" --quantization w4a16 "${gated_sets[@]}" \
            --json "$OUT/gated-$model-w4a16.json"
    done
fi
headlines "$OUT" "*-llama-*.json"
echo "done in ${SECONDS}s" | tee -a "$log"
(cd "$OUT" && tar czf gpu_quant.tar.gz --exclude gpu_quant.tar.gz -- *)   # every result in one file
