#!/usr/bin/env bash
# Quantized weights on one GPU: the kernel tests, each decode linear of Llama-3.1-8B and -3.2-1B timed
# against cuBLAS bf16 (tools/quant_gemv_probe.py, with a sweep of the one-row tiles), `nano-vllm bench
# latency` for bf16, fp8 and w4a16 at both models and `throughput` for bf16 and fp8 at Llama-3.1-8B, in the
# same run; each result as JSON under $OUT, and all of them in $OUT/gpu_quant.tar.gz.
# Usage, from the repository root on a machine with a CUDA GPU:  OUT=/some/dir bash tools/gpu_quant.sh
# About 6 minutes on an H200 (at most 9.8, the sum of the steps' limits); each step has its own time limit
# and a failed step does not stop the rest.
set -u
OUT="${OUT:?set OUT to a directory for the results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
log="$OUT/gpu_quant.log"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$log"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$log"
git rev-parse HEAD 2>/dev/null | tee -a "$log"

step() {   # step NAME SECONDS COMMAND...: run, keep its output, record its exit status
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$log"
    tail -3 "$OUT/$name.txt" | tee -a "$log"
}

step tests 100 $PY -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_quant_gpu.py

# each decode linear of Llama-3.1-8B and -3.2-1B at 1 and 4 rows against cuBLAS bf16, weights cycled past L2,
# a sweep of the one-row tiles (FP8 GEMV widths / steps / splits, W4A16 GEMV widths / splits / prefetch) and of
# FP8's W8A8 tiles at 8 to 64 rows (OLD=path/to/another/quant_linear_triton.py also times that file's kernels)
step kernel-timing 160 $PY tools/quant_gemv_probe.py --sweep --gemm ${OLD:+--old "$OLD"} --json "$OUT/kernel-timing.json"

for model in llama-3.2-1b llama-3.1-8b; do
    for q in bf16 fp8 w4a16; do
        flag=(); [ "$q" != bf16 ] && flag=(--quantization "$q")
        step "latency-$model-$q" 40 $PY -m nanovllm.cli bench latency --dummy "$model" "${flag[@]}" \
            --peer none --no-progress --num-runs 2 --json "$OUT/latency-$model-$q.json"
    done
done
for q in bf16 fp8; do
    flag=(); [ "$q" != bf16 ] && flag=(--quantization "$q")
    step "throughput-llama-3.1-8b-$q" 45 $PY -m nanovllm.cli bench throughput --dummy llama-3.1-8b "${flag[@]}" \
        --peer none --no-progress --num-prompts 64 --json "$OUT/throughput-llama-3.1-8b-$q.json"
done
$PY - "$OUT" <<'PYEOF' | tee -a "$log"
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*-llama-*.json"))):    # the headline figure of each bench
    for figure in json.load(open(path)).get("figures", []):
        if figure.get("headline"):
            print(f"{os.path.basename(path)[:-5]:34} {figure['device']} {figure['figure']} {figure['measured']:.1f} "
                  f"roofline {figure['roofline']:.1f} ({100 * figure['fraction_of_roofline']:.1f}%)")
PYEOF
echo "done in ${SECONDS}s" | tee -a "$log"
(cd "$OUT" && tar czf gpu_quant.tar.gz --exclude gpu_quant.tar.gz -- *)   # every result in one file
