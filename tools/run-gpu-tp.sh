#!/usr/bin/env bash
# Tensor parallelism on two GPUs in one script: the GPU tests, then Llama-3.1-8B (dummy weights) `latency`
# and `throughput` at TP=1 and TP=2, each with the roofline of the cards it ran on.
# Usage on a machine with two CUDA GPUs:  OUT=/some/dir bash tools/run-gpu-tp.sh
#   PARTS picks what runs, in this order (default "tests benches"):
#     tests    the GPU tests of tensor parallelism (at most TESTS_S seconds, default 360), the peer
#              all-reduce's checks among them
#     benches  latency and throughput at each TP in TPS (default "1 2")
#     peer     the all-reduce probe (NCCL against the peer kernel and torch's symmetric memory, in graphs),
#              then latency and throughput at TP=2 with --all-reduce peer
#     async    latency and throughput at TP=2 with async scheduling, NCCL's all-reduce and the peer one
#     profile  the host/GPU profile of a TP=2 decode step
#   Within a 10-minute call each: PARTS="tests", PARTS="benches peer", then PARTS="async profile".
# Writes at most 8 files to $OUT (logs, and one JSON a bench: "benches peer" makes 8, "async profile" 7,
# so run those apart). A command that outlives its limit gets SIGABRT, so that Python's faulthandler
# prints where it hung into the log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
OUT=${OUT:?set OUT to a folder for the logs and results}
mkdir -p "$OUT"
START=$SECONDS
LOG=$OUT/gpu-tp-log.txt
PARTS=${PARTS:-tests benches}
has() { [[ " $PARTS " == *" $1 "* ]]; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m | head -3
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'nccl', torch.cuda.nccl.version())"
  git rev-parse HEAD; echo "PARTS=$PARTS"
} >> "$LOG" 2>&1

if has tests; then echo "== tests (t=$((SECONDS - START))s)" >> "$LOG"
  timeout -s INT ${TESTS_S:-360} python3 -m pytest -v -m gpu tests/gpu/test_tensor_parallel_gpu.py -p no:cacheprovider \
    --timeout 150 --timeout-method thread >> "$OUT/gpu-tp-tests.txt" 2>&1
  echo "== tests rc=$? (t=$((SECONDS - START))s)" >> "$LOG"
  grep -E "PASSED|FAILED|ERROR|passed|failed|Timeout" "$OUT/gpu-tp-tests.txt" | tail -24
fi

bench() { local name=$1; shift; echo "== $name (t=$((SECONDS - START))s)" >> "$LOG"
  timeout -s ABRT -k 10 170 python3 -m nanovllm.cli bench "$@" --json "$OUT/$name.json" --no-progress >> "$OUT/bench-tp.txt" 2>> "$LOG"
  echo "== $name rc=$? (t=$((SECONDS - START))s)" >> "$LOG"; }
if has benches; then
  for tp in ${TPS:-1 2}; do
    bench "latency-llama-3.1-8b-tp$tp" latency --dummy llama-3.1-8b --tensor-parallel-size $tp
    bench "throughput-llama-3.1-8b-tp$tp" throughput --dummy llama-3.1-8b --tensor-parallel-size $tp
  done
fi
if has peer; then echo "== all-reduce probe (t=$((SECONDS - START))s)" >> "$LOG"
  timeout -s ABRT -k 10 150 python3 tools/all_reduce_probe.py --batches 1 8 32 64 128 256 1024 \
    >> "$OUT/bench-tp.txt" 2>> "$LOG"
  echo "== all-reduce probe rc=$? (t=$((SECONDS - START))s)" >> "$LOG"
  bench "latency-llama-3.1-8b-tp2-peer" latency --dummy llama-3.1-8b --tensor-parallel-size 2 --all-reduce peer
  bench "throughput-llama-3.1-8b-tp2-peer" throughput --dummy llama-3.1-8b --tensor-parallel-size 2 --all-reduce peer
fi
if has async; then
  for all_reduce in auto peer; do suffix=$([ $all_reduce = peer ] && echo -peer)
    bench "latency-llama-3.1-8b-tp2-async$suffix" latency --dummy llama-3.1-8b --tensor-parallel-size 2 \
      --async-scheduling --all-reduce $all_reduce
    bench "throughput-llama-3.1-8b-tp2-async$suffix" throughput --dummy llama-3.1-8b --tensor-parallel-size 2 \
      --async-scheduling --all-reduce $all_reduce
  done
fi
[ -f "$OUT/bench-tp.txt" ] && grep -v Warning "$OUT/bench-tp.txt" | grep "^|\|Latency\|Throughput\|x 2, torch"
if has profile; then echo "== profile (t=$((SECONDS - START))s)" >> "$LOG"
  timeout -s ABRT -k 10 150 python3 -m nanovllm.bench.host_overhead --dummy llama-3.1-8b --batch-sizes 1 64 \
    --tensor-parallel-size 2 --profile 2>> "$LOG" | grep -v Warning > "$OUT/tp-profile.txt"
  echo "== profile rc=$? (t=$((SECONDS - START))s)" >> "$LOG"; grep "^|" "$OUT/tp-profile.txt" | head -4; fi

tail -5 "$LOG"
