#!/usr/bin/env bash
# A change against its baseline on one machine: GPU machines of one kind differ by several percent
# from each other, so a figure is only compared with one measured beside it, in the same call.
#   git archive BASE_COMMIT nanovllm | tar -x -C .baseline      (here; .baseline is ignored, carry it)
#   OUT=/some/dir BASE=.baseline bash tools/run-gpu-ab.sh
# Runs the single-GPU tests first (so every Triton kernel is compiled before anything is timed), the
# attention probe, then host_overhead, latency and throughput for this tree ("new") and the baseline
# ("base"), alternating which goes first. Writes ab.txt, gpu-tests.txt and the new runs' JSON to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to a folder for the logs and results}
BASE=${BASE:-.baseline}
LOG=$OUT/ab.txt
START=$SECONDS
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$LOG" 2>&1
say() { echo "== $* t=$((SECONDS - START))s" | tee -a "$LOG"; }
tree_path() { if [ "$1" = base ]; then echo "$PWD/$BASE"; else echo "$PWD"; fi; }

if [ "${TESTS:-1}" = 1 ]; then say tests   # TESTS=0: skip (the benches' warm-ups then compile the kernels)
  PYTHONPATH=$PWD timeout "${TESTS_S:-240}" python3 -m pytest -q -m gpu tests/gpu/test_kernels_gpu.py \
    tests/gpu/test_engine_gpu.py -p no:cacheprovider --timeout 120 --timeout-method thread > "$OUT/gpu-tests.txt" 2>&1
  echo "tests rc=$?" | tee -a "$LOG"; tail -3 "$OUT/gpu-tests.txt" | tee -a "$LOG"; fi

for probe in ${PROBES:-tools/attention_probe.py}; do say "$probe"
  PYTHONPATH=$PWD timeout 120 python3 "$probe" 2>&1 | grep -v Warn >> "$LOG"; done
for tree in new base; do   # which nanovllm each tree's runs import
  PYTHONPATH=$(tree_path $tree) PYTHONSAFEPATH=1 python3 -c "import nanovllm; print('$tree:', nanovllm.__file__)" >> "$LOG"; done

overhead() { say "host_overhead $1"
  PYTHONPATH=$(tree_path "$1") PYTHONSAFEPATH=1 timeout 120 python3 -m nanovllm.bench.host_overhead --dummy llama-3.2-1b \
    --batch-sizes 1 256 2>&1 | grep "^| o\|host ms" | sed "s/^/$1 /" >> "$LOG"; }
# bench TREE NAME ARGS...: one run; the new tree's JSON is kept as $OUT/NAME.json
bench() { local tree=$1 name=$2; shift 2; say "$name $tree"
  local json=$OUT/base-$name.json; [ "$tree" = new ] && json=$OUT/$name.json
  PYTHONPATH=$(tree_path "$tree") PYTHONSAFEPATH=1 timeout 150 python3 -m nanovllm.cli bench "$@" --json "$json" --no-progress 2>&1 \
    | grep "^| [lt]\|Latency:\|Throughput:\|rror" | sed "s/^/$tree /" >> "$LOG"; }

overhead new; overhead base
bench base latency-llama-3.2-1b latency --dummy llama-3.2-1b
bench new latency-llama-3.2-1b latency --dummy llama-3.2-1b
if [ "${THROUGHPUT:-1}" = 1 ]; then   # THROUGHPUT=0: host_overhead and latency only
  bench new throughput-llama-3.2-1b throughput --dummy llama-3.2-1b
  bench base throughput-llama-3.2-1b throughput --dummy llama-3.2-1b
  bench base throughput-qwen3-0.6b throughput --dummy qwen3-0.6b
  bench new throughput-qwen3-0.6b throughput --dummy qwen3-0.6b
fi
say done
grep -v "^==" "$LOG" | tail -40
