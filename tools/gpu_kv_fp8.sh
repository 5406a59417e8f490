#!/usr/bin/env bash
# The FP8 KV cache on one GPU: its GPU tests; one decode attention call on bf16 and FP8 caches at
# head_dim 64 and 128 (tools/attention_probe.py --configs, the engine's tiles); then `nano-vllm bench
# throughput` (random weights) with the model-dtype cache (bf16) and with --kv-cache-dtype fp8 in the same
# run: on Llama-3.2-1B the default workload, a long-context one (4096-token prompts, 256 outputs), and the
# long-context one again with the pool held to 1 GiB, where the cache's capacity, not its bandwidth, limits
# the batch; on Llama-3.1-8B 4096-token prompts with 512 outputs. Each run's JSON (figures and kv_pool:
# dtype, blocks, token capacity) and output, in $OUT/gpu_kv_fp8.tar.gz; a table of them in
# $OUT/summary.txt and the steps' tails in $OUT/gpu_kv_fp8.log (three files in all).
# Usage, from the repository root on a machine with a CUDA GPU:  OUT=/some/dir bash tools/gpu_kv_fp8.sh
# ATTENTION_TILES=64x3x2,64x4x2,... times those decode tiles (keys x stages x warps) instead of the engine's.
# About 7 minutes on an H100 (the steps' time limits add up to 680 s); a failed step does not stop the rest.
set -u
OUT="${OUT:?set OUT to a directory for the results}"
RUNS="$OUT/runs"
mkdir -p "$RUNS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
log="$OUT/gpu_kv_fp8.log"
STEPS_DIR="$RUNS"
source "$(dirname "$0")/gpu_steps.sh"
gpu_header
install_missing "zmq, msgspec" '*.whl'   # the engine's serving dependencies, from $WHEELS (default .whl/)

step tests 100 $PY -m pytest -q -m gpu -p no:cacheprovider -rs tests/gpu/test_kv_fp8_gpu.py

for head_dim in 64 128; do
    for kv in bf16 fp8; do
        step "attention-$head_dim-$kv" 60 $PY tools/attention_probe.py --configs --head-dim "$head_dim" --kv-dtype "$kv" \
            --contexts 1024,4096 --tiles "${ATTENTION_TILES:-engine}"
    done
done

bench() {   # bench NAME SECONDS MODEL FLAGS...: both caches, one JSON each
    local name=$1 limit=$2 model=$3; shift 3
    for kv in auto fp8; do
        step "$name-$kv" "$limit" $PY -m nanovllm.cli bench throughput --dummy "$model" --kv-cache-dtype "$kv" \
            --peer none --no-progress --ceiling-repeats 3 "$@" --json "$RUNS/$name-$kv.json"
    done
}
bench throughput 40 llama-3.2-1b
bench long-context 35 llama-3.2-1b --dataset random --input-len 4096 --output-len 256 --num-prompts 64 --max-model-len 8192
bench long-context-1gib 35 llama-3.2-1b --dataset random --input-len 4096 --output-len 256 --num-prompts 64 \
    --max-model-len 8192 --kv-cache-memory $((1 << 30))
bench long-context-8b 60 llama-3.1-8b --dataset random --input-len 4096 --output-len 512 --num-prompts 64 --max-model-len 8192

$PY - "$RUNS" > "$OUT/summary.txt" 2>&1 <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"{'run':<24} {'KV dtype':<14} {'blocks':>8} {'tokens':>10} {'output tok/s':>13} {'of roofline':>12}")
for path in sorted(out.glob("*.json")):
    result = json.loads(path.read_text())
    pool, figure = result.get("kv_pool") or {}, result["figures"][0]
    print(f"{path.stem:<24} {pool.get('dtype', '?'):<14} {pool.get('num_blocks', 0):>8} "
          f"{pool.get('capacity_tokens', 0):>10} {figure['measured']:>13.0f} {figure['fraction_of_roofline']:>12.2f}")
PYEOF
tee -a "$log" < "$OUT/summary.txt"
echo "done in ${SECONDS}s" | tee -a "$log"
tar czf "$OUT/gpu_kv_fp8.tar.gz" -C "$OUT" runs && rm -r "$RUNS"   # every run's output and JSON in one file
