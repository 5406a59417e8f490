#!/usr/bin/env bash
# --batch-invariant on one GPU: its tests, then what it costs. In one run on one machine, for
# Llama-3.2-1B (dummy weights): the `throughput` workload and batch-1 `latency`, each without and
# with --batch-invariant.
#
#   OUT=/some/dir bash tools/gpu_batch_invariant.sh     # JSON and logs land in $OUT; about 4 minutes on an H200
set -uo pipefail
OUT=${OUT:?set OUT to the directory for the results}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
MODEL=${MODEL:-llama-3.2-1b}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; uptime; git log -1 --oneline; } >"$OUT/machine.txt" 2>&1

status=0
echo "== tests"
timeout 300 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_batch_invariant_gpu.py -rs \
    >"$OUT/batch-invariant-tests.txt" 2>&1 || status=1
tail -15 "$OUT/batch-invariant-tests.txt"
for workload in throughput latency; do
    for flag in "" "--batch-invariant"; do
        name="$workload-$MODEL${flag:+-batch-invariant}"
        echo "== $name"
        timeout 200 "$PYTHON" -m nanovllm.cli bench "$workload" --dummy "$MODEL" --no-progress $flag \
            --json "$OUT/$name.json" >"$OUT/$name.log" 2>&1 || { echo "failed: see $OUT/$name.log"; status=1; }
        tail -4 "$OUT/$name.log"
    done
done
exit $status
