#!/usr/bin/env bash
# One-row W4A16 and GGUF 4-bit GEMVs given x laid out for them by the kernel before (W4Rows; the switch
# W4_ROWS_FROM_PRODUCER in nanovllm/ops/quant_linear.py), and gate_up_proj's partial products added up by
# SiLU-and-mul (PARTIALS_INTO_SILU in nanovllm/ops/activation.py), against the engine as it is, on one GPU:
#   1. the quantization GPU tests (every kernel compiled and checked before anything is timed), and the
#      peer all-reduce's kernel with its ranks simulated on streams of this GPU (tensor parallelism's, which
#      needs no second GPU for that check);
#   2. `bench latency` at batch 1 for bf16, and for w4a16 and gguf-q4_k with each change added to the
#      one before: as it is; W4Rows; (w4a16) W4Rows and the partials into SiLU (GGUF's one-row gate_up_proj
#      does not split K); those and longer steps (w4a16: [16, 512] on every layer, LONG_GEMV_MAX_OUTPUTS
#      and LONG_GEMV_MAX_STEPS; gguf-q4_k: [8, 512] on the widest layers too, LONG_GEMV_NARROW_OUTPUTS);
#   3. each one-row linear given rows or W4Rows, and a sweep of the GEMV's tiles (tools/quant_gemv_probe.py).
# The results and logs land in one file, $OUT/gpu_w4_rows.tar.gz, and the summary in $OUT/gpu_w4_rows.log
# (a GPU machine may return only a few files).
#   OUT=/some/dir bash tools/gpu_w4_rows.sh        (from the repository root)
# PARTS picks the parts (default "tests latency probe") and MODELS the models of part 2 (default
# "llama-3.2-1b llama-3.1-8b"). On an H200 the tests take about 2 minutes, each model's benches about 4
# and the probe about 4: where one command may run 10 minutes, run PARTS="tests latency"
# MODELS=llama-3.2-1b, then PARTS="latency probe" MODELS=llama-3.1-8b.
set -u
source "$(dirname "$0")/gpu_steps.sh"
gpu_setup gpu_w4_rows

PARTS=" ${PARTS:-tests latency probe} "
if [[ $PARTS == *" tests "* ]]; then
    step tests 150 $PY -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_quant_gpu.py \
        tests/gpu/test_peer_all_reduce_gpu.py
fi

ROWS=nanovllm.ops.quant_linear.W4_ROWS_FROM_PRODUCER=True
SILU=nanovllm.ops.activation.PARTIALS_INTO_SILU=True
KERNELS=nanovllm.ops.quant_linear_triton
WIDE=$KERNELS.LONG_GEMV_NARROW_OUTPUTS=1000000
LONG=("$KERNELS.LONG_GEMV_MAX_OUTPUTS=1000000" "$KERNELS.LONG_GEMV_MAX_STEPS=1000000")
latency() {    # latency NAME MODEL FORMAT [SETTING...]: one `bench latency` run with those module settings
    local name=$1 model=$2 q=$3 flag=(); shift 3
    [ "$q" != bf16 ] && flag=(--quantization "$q")
    step "$name" 45 $PY tools/bench_with.py "$@" -- bench latency --dummy "$model" "${flag[@]}" \
        --peer none --no-progress --num-runs 2 --json "$WORK/$name.json"
}
for model in $([[ $PARTS == *" latency "* ]] && echo ${MODELS:-llama-3.2-1b llama-3.1-8b}); do
    latency "latency-$model-bf16" "$model" bf16
    latency "latency-$model-w4a16-1-rows" "$model" w4a16
    latency "latency-$model-w4a16-2-w4rows" "$model" w4a16 "$ROWS"
    latency "latency-$model-w4a16-3-w4rows-silu" "$model" w4a16 "$ROWS" "$SILU"
    latency "latency-$model-w4a16-4-w4rows-silu-long" "$model" w4a16 "$ROWS" "$SILU" "${LONG[@]}"
    latency "latency-$model-gguf-q4_k-3-w4rows-wide8" "$model" gguf-q4_k "$ROWS" "$WIDE"
    latency "latency-$model-gguf-q4_k-2-w4rows" "$model" gguf-q4_k "$ROWS"
    latency "latency-$model-gguf-q4_k-1-rows" "$model" gguf-q4_k
done

if [[ $PARTS == *" probe "* ]]; then
    step kernel-timing "${PROBE_S:-240}" $PY tools/quant_gemv_probe.py --sweep --sweep-formats w4rows \
        --json "$WORK/kernel-timing.json"
fi

headlines "$WORK" "latency-*.json"
gpu_finish gpu_w4_rows
