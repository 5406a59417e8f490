#!/usr/bin/env bash
# Tensor parallelism on two GPUs in one script: Llama-3.1-8B (dummy weights) `latency` and `throughput`
# at TP=1 and TP=2, each with the roofline of the cards it ran on, then the NCCL tests.
# Usage on a machine with two CUDA GPUs:  OUT=/some/dir bash tools/run-gpu-tp.sh
#   TPS="2" runs the TP=2 benches alone; PROFILE=1 adds the host/GPU profile of a TP=2 decode step;
#   ASYNC=1 adds the TP=2 benches with async scheduling (two more files: pair it with TPS="2").
# Writes at most 8 files to $OUT. A command that outlives its limit gets SIGABRT,
# so that Python's faulthandler prints where it hung into the log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
OUT=${OUT:?set OUT to a folder for the logs and results}
mkdir -p "$OUT"
START=$SECONDS
LOG=$OUT/gpu-tp-log.txt
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m | head -3
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'nccl', torch.cuda.nccl.version())"
} > "$OUT/gpu-tp.txt" 2>&1

# The tests first (TP=2 == TP=1, torchrun, NCCL failures), at most TESTS_S seconds.
echo "== tests (t=$((SECONDS - START))s)" >> "$LOG"
timeout -s INT ${TESTS_S:-240} python3 -m pytest -v -m gpu tests/gpu/test_tensor_parallel_gpu.py -p no:cacheprovider \
  --timeout 100 --timeout-method thread >> "$OUT/gpu-tp-tests.txt" 2>&1
echo "== tests rc=$? (t=$((SECONDS - START))s)" >> "$LOG"
grep -E "PASSED|FAILED|ERROR|passed|failed|Timeout" "$OUT/gpu-tp-tests.txt" | tail -20

bench() { local name=$1; shift; echo "== $name (t=$((SECONDS - START))s)" >> "$LOG"
  timeout -s ABRT -k 10 170 python3 -m nanovllm.cli bench "$@" --json "$OUT/$name.json" --no-progress >> "$OUT/bench-tp.txt" 2>> "$LOG"
  echo "== $name rc=$? (t=$((SECONDS - START))s)" >> "$LOG"; }
for tp in ${TPS:-1 2}; do
  bench "latency-llama-3.1-8b-tp$tp" latency --dummy llama-3.1-8b --tensor-parallel-size $tp
  bench "throughput-llama-3.1-8b-tp$tp" throughput --dummy llama-3.1-8b --tensor-parallel-size $tp
done
if [ "${ASYNC:-0}" = 1 ]; then
  bench "latency-llama-3.1-8b-tp2-async" latency --dummy llama-3.1-8b --tensor-parallel-size 2 --async-scheduling
  bench "throughput-llama-3.1-8b-tp2-async" throughput --dummy llama-3.1-8b --tensor-parallel-size 2 --async-scheduling
fi
grep -v Warning "$OUT/bench-tp.txt" | grep "^|\|Latency\|Throughput"
if [ "${PROFILE:-0}" = 1 ]; then echo "== profile (t=$((SECONDS - START))s)" >> "$LOG"
  timeout -s ABRT -k 10 150 python3 -m nanovllm.bench.host_overhead --dummy llama-3.1-8b --batch-sizes 1 64 \
    --tensor-parallel-size 2 --profile 2>> "$LOG" | grep -v Warning > "$OUT/tp-profile.txt"
  echo "== profile rc=$? (t=$((SECONDS - START))s)" >> "$LOG"; grep "^|" "$OUT/tp-profile.txt" | head -4; fi

tail -5 "$LOG"
