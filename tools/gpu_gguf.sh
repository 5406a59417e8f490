#!/usr/bin/env bash
# GGUF blocks kept quantized on one GPU: the GGUF kernel tests (W8A16 for Q8_0 / Q6_K, W4A16 with float
# offsets for Q4_K, at Llama-3.2-1B's shapes, batch 1, 3, 7, 64, 256, and a tiny Q4_K_M-like GGUF against
# the CPU references), a kernel timing at the 1B shapes against cuBLAS bf16, and `nano-vllm bench latency`
# of a dummy Llama-3.2-1B in bf16, gguf-q8_0 and gguf-q4_k (the layouts GGUF's Q8_0 and Q4_K load into,
# by round-to-nearest at load): every result in $OUT/gpu_gguf.tar.gz, the summary in $OUT/gpu_gguf.log.
# Usage, from the repository root on a machine with a CUDA GPU:  OUT=/some/dir bash tools/gpu_gguf.sh
# At most 4 minutes (the sum of the steps' limits); a failed step does not stop the rest.
set -u
OUT="${OUT:?set OUT to a directory for the results}"
mkdir -p "$OUT"
RESULTS="$(mktemp -d)"     # the steps' files, tarred into $OUT at the end
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
log="$RESULTS/gpu_gguf.log"
STEPS_DIR="$RESULTS"
source "$(dirname "$0")/gpu_steps.sh"
gpu_header

step tests 90 $PY -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_quant_gpu.py -k gguf

step kernel-timing 45 $PY - "$RESULTS/kernel-timing.json" <<'PYEOF'
import json, sys
import torch
import torch.nn.functional as F
from nanovllm.ops.quant_linear import pack_int4
from nanovllm.ops.quant_linear_triton import w4a16_linear_triton, w8a16_linear_triton

def time_us(fn, repeats=20):
    try:
        fn(); torch.cuda.synchronize()
    except Exception as error:
        print("  not timed:", str(error).splitlines()[0], flush=True)
        return float("nan")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay(); start.record()
    for _ in range(repeats):
        graph.replay()
    end.record(); torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / repeats / 10

rows = []
for n, k in ((3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)):     # Llama-3.2-1B: qkv, o, gate_up, down
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    codes4 = pack_int4(torch.randint(0, 16, (n, k), device="cuda"))
    codes8 = torch.randint(-128, 128, (n, k), device="cuda").to(torch.int8)
    s32, o32 = torch.rand(n, k // 32, device="cuda") * 0.01, torch.rand(n, k // 32, device="cuda") * 0.01
    s16 = torch.rand(n, k // 16, device="cuda") * 0.01
    for m in (1, 4, 7, 64, 256):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        row = {"n": n, "k": k, "m": m, "bf16_us": time_us(lambda: F.linear(x, w)),
               "q4_k_us": time_us(lambda: w4a16_linear_triton(x, codes4, s32, o32)),
               "q8_0_us": time_us(lambda: w8a16_linear_triton(x, codes8, s32)),
               "q6_k_us": time_us(lambda: w8a16_linear_triton(x, codes8, s16))}
        for name, bytes_per_weight in (("bf16", 2), ("q4_k", 0.75), ("q8_0", 1.125), ("q6_k", 1.25)):
            row[f"{name}_GBps"] = n * k * bytes_per_weight / row[f"{name}_us"] / 1e3
        rows.append(row)
        print(" ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                       for key, value in row.items()), flush=True)
json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, open(sys.argv[1], "w"), indent=1)
PYEOF

for q in bf16 gguf-q8_0 gguf-q4_k; do
    flag=(); [ "$q" != bf16 ] && flag=(--quantization "$q")
    step "latency-llama-3.2-1b-$q" 35 $PY -m nanovllm.cli bench latency --dummy llama-3.2-1b "${flag[@]}" \
        --peer none --no-progress --num-runs 2 --json "$RESULTS/latency-llama-3.2-1b-$q.json"
done
echo "done in ${SECONDS}s" | tee -a "$log"
tar czf "$OUT/gpu_gguf.tar.gz" -C "$RESULTS" .
cp "$log" "$OUT/gpu_gguf.log"
