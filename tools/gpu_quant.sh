#!/usr/bin/env bash
# Quantized weights on one GPU: the kernel tests, a kernel timing against cuBLAS bf16 and
# torch._scaled_mm (with a sweep of decode tiles: W4A16 GEMV widths and splits, GEMV against tl.dot
# at 2-4 rows, FP8 with and without the activations quantized in the GEMM), and `nano-vllm bench`
# latency / throughput for bf16, fp8 and w4a16 in the same run (Llama-3.2-1B shape, then
# Llama-3.1-8B latency), each result as JSON under $OUT, and all of them in $OUT/gpu_quant.tar.gz.
# Usage, from the repository root on a machine with a CUDA GPU:  OUT=/some/dir bash tools/gpu_quant.sh
# At most 8 minutes (the sum of the steps' limits); each step has its own time limit and a failed
# step does not stop the rest.
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

step tests 70 $PY -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_quant_gpu.py

step kernel-timing 100 $PY - "$OUT/kernel-timing.json" <<'PYEOF'
import json, sys
import torch
import torch.nn.functional as F
from nanovllm.ops.quant_linear import pack_int4, quantize_fp8_per_channel, quantize_fp8_per_token_torch
from dataclasses import replace
from nanovllm.ops.quant_linear_triton import (Tiles, choose_tiles, choose_w4a16_tiles, fp8_linear_partials_triton,
                                              fp8_linear_tiles, fp8_linear_triton, w4a16_linear_tiles,
                                              w4a16_linear_triton)

def time_us(fn, repeats=20):
    try:
        fn(); torch.cuda.synchronize()
    except Exception as error:         # e.g. a torch whose _scaled_mm refuses this shape, a tile over shared memory
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

rows, sweeps = [], []
shapes = ((3072, 2048), (2048, 8192), (16384, 2048), (6144, 4096), (28672, 4096), (4096, 14336))
for n, k in shapes:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    wq, ws = quantize_fp8_per_channel(w)
    qweight = pack_int4(torch.randint(0, 16, (n, k), device="cuda"))
    scales = torch.rand(n, k // 128, device="cuda") * 0.01
    zeros = torch.full((n, k // 128), 8, dtype=torch.uint8, device="cuda")
    for m in (1, 4, 7, 64, 256):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        xq, xs = quantize_fp8_per_token_torch(x)
        row = {"n": n, "k": k, "m": m, "tiles": str(choose_tiles(m, n, k // 128, 128, x.device)),
               "w4a16_tiles": str(choose_w4a16_tiles(m, n, k // 128, 128, x.device)),
               "bf16_us": time_us(lambda: F.linear(x, w)),
               "fp8_us": time_us(lambda: fp8_linear_triton(x, wq, ws)),
               "scaled_mm_us": time_us(lambda: torch._scaled_mm(xq, wq.T, scale_a=xs[:, None], scale_b=ws[None, :],
                                                                out_dtype=torch.bfloat16)),
               "w4a16_us": time_us(lambda: w4a16_linear_triton(x, qweight, scales, zeros))}
        row["bf16_GBps"] = n * k * 2 / row["bf16_us"] / 1e3
        row["fp8_GBps"] = n * k / row["fp8_us"] / 1e3
        row["w4a16_GBps"] = n * k * (0.5 + 5 / 128) / row["w4a16_us"] / 1e3
        rows.append(row)
        print(" ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                       for key, value in row.items()), flush=True)
        if m <= 4 and (n, k) in shapes[:3] + shapes[4:5]:    # decode tiles: what other choices would give
            chosen = choose_tiles(m, n, k // 128, 128, x.device)
            for fused in (False, True):             # FP8: activations quantized by their own kernel, or in the GEMM
                tiles = replace(chosen, quantize_x=fused)
                sweep = {"n": n, "k": k, "m": m, "fp8_tiles": str(tiles),
                         "fp8_us": time_us(lambda: fp8_linear_tiles(x, wq, ws, None, tiles))}
                sweeps.append(sweep)
                print("  sweep", sweep, flush=True)
            for block_m, block_n in ((m, 32), (m, 64), (m, 128), (16, 32)):   # W4A16: GEMV widths, then tl.dot
                for split_k in (1, 4, 16):
                    tiles = Tiles(block_m, block_n, 128, split_k)
                    sweep = {"n": n, "k": k, "m": m, "w4a16_tiles": str(tiles),
                             "w4a16_us": time_us(lambda: w4a16_linear_tiles(x, qweight, scales, zeros, None, tiles))}
                    sweeps.append(sweep)
                    print("  sweep", sweep, flush=True)
        if m == 256 and (n, k) in shapes[4:]:      # prefill tiles: the tensor-core kernels' other shapes
            for block_m, block_n, warps, stages in ((128, 128, 8, 3), (128, 256, 8, 3), (128, 128, 4, 4),
                                                    (64, 128, 4, 4), (64, 64, 4, 4)):
                tiles = Tiles(block_m, block_n, 128, 1, warps, stages)
                sweep = {"n": n, "k": k, "m": m, "tiles": str(tiles),
                         "fp8_us": time_us(lambda: fp8_linear_tiles(x, wq, ws, None, tiles)),
                         "w4a16_us": time_us(lambda: w4a16_linear_tiles(x, qweight, scales, zeros, None, tiles))}
                sweeps.append(sweep)
                print("  sweep", sweep, flush=True)
json.dump({"device": torch.cuda.get_device_name(), "rows": rows, "tile_sweep": sweeps},
          open(sys.argv[1], "w"), indent=1)
PYEOF

for q in bf16 fp8 w4a16; do
    flag=(); [ "$q" != bf16 ] && flag=(--quantization "$q")
    step "latency-llama-3.2-1b-$q" 35 $PY -m nanovllm.cli bench latency --dummy llama-3.2-1b "${flag[@]}" \
        --peer none --no-progress --num-runs 2 --json "$OUT/latency-llama-3.2-1b-$q.json"
done
for q in bf16 fp8 w4a16; do
    flag=(); [ "$q" != bf16 ] && flag=(--quantization "$q")
    step "throughput-llama-3.2-1b-$q" 30 $PY -m nanovllm.cli bench throughput --dummy llama-3.2-1b "${flag[@]}" \
        --peer none --no-progress --num-prompts 64 --json "$OUT/throughput-llama-3.2-1b-$q.json"
done
for q in bf16 fp8 w4a16; do
    flag=(); [ "$q" != bf16 ] && flag=(--quantization "$q")
    step "latency-llama-3.1-8b-$q" 35 $PY -m nanovllm.cli bench latency --dummy llama-3.1-8b "${flag[@]}" \
        --peer none --no-progress --num-runs 1 --json "$OUT/latency-llama-3.1-8b-$q.json"
done
echo "done in ${SECONDS}s" | tee -a "$log"
(cd "$OUT" && tar czf gpu_quant.tar.gz --exclude gpu_quant.tar.gz -- *)   # every result in one file
