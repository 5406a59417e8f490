#!/usr/bin/env bash
# Serving at engine speed, on one GPU: for each model (dummy weights, the `throughput` workload),
# the offline throughput, the benchmark client's own ceiling (against a stub server), and
# `bench serve` at request rates inf, 32 and 8, in the same run on the same machine. The rates run in
# that order on one server so that the figure compared with offline (rate inf) meets a cold prefix
# cache, as the offline run does: the workload's prompts are the same at every rate. Then the
# engine's own decode step at the batch the server ran at 32 req/s (its mean number of requests past
# their first token, by Little's law), so that the median TPOT can be set beside it.
#
#   OUT=/some/dir bash tools/gpu_serving.sh        # about 7 minutes on an H200; what it prints is also in
#                                                  # $OUT/summary.txt, its JSON and logs in $OUT/gpu_serving.tar.gz
#   MODELS="llama-3.2-1b" API_SERVERS=2 ...        # one model; the server's --api-server-count
#
# The GPU machine has no internet. If the server's packages are missing, install them from wheels
# fetched beforehand on a machine with internet (Python 3.12, x86-64):
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d wheels \
#       fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection typing-extensions \
#       opentelemetry-api pyzmq msgspec httpx httpcore anyio h11 idna certifi sniffio prometheus-client
# and set WHEELS=path/to/wheels: this script installs them (never touching torch) before it starts.
set -uo pipefail
OUT=${OUT:?set OUT to the directory for the results}
RAW="$OUT/gpu_serving"   # every JSON and log, tarred at the end
mkdir -p "$RAW"
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ -n "${WHEELS:-}" ]; then
    "$PYTHON" -m pip install --no-index --find-links "$WHEELS" --no-deps "$WHEELS"/*.whl >"$RAW/wheels.log" 2>&1 \
        || { echo "installing the wheels failed: see $RAW/wheels.log"; exit 1; }
fi
"$PYTHON" -c "import fastapi, uvicorn, zmq, msgspec, httpx" || { echo "the server's packages are missing; set WHEELS"; exit 1; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; uptime; git log -1 --oneline; } >"$RAW/machine.txt" 2>&1

measure() {
    status=0
    for model in ${MODELS:-llama-3.2-1b qwen3-0.6b}; do
        echo "== $model: offline throughput"
        timeout 150 "$PYTHON" -m nanovllm.cli bench throughput --dummy "$model" --no-progress --ceiling-repeats 3 \
            --json "$RAW/throughput-$model.json" >"$RAW/throughput-$model.log" 2>&1 || { echo "failed: see $RAW/throughput-$model.log"; status=1; }
        tail -4 "$RAW/throughput-$model.log"
        echo "== $model: client ceiling and bench serve at 8, 32, inf req/s"
        timeout 210 "$PYTHON" -m nanovllm.cli bench serve --dummy "$model" --launch --port 18000 --no-progress \
            --ceiling-repeats 3 --request-rate inf,32,8 --client-processes 4 --api-server-count "${API_SERVERS:-1}" \
            --json "$RAW/serve-$model.json" >"$RAW/serve-$model.log" 2>&1 || { echo "failed: see $RAW/serve-$model.log"; status=1; }
        grep -E "client ceiling|Output token throughput|Median TPOT|Request rate" "$RAW/serve-$model.log"
        "$PYTHON" -c '
import json, sys
offline = json.load(open(sys.argv[1]))["nano_vllm"]["throughput"]["output_tokens_per_second"]
served = json.load(open(sys.argv[2]))["nano_vllm"]["throughput@inf"]["output_throughput"]
print(f"inf req/s: server {served:.0f} / offline {offline:.0f} output tok/s = {served / offline:.0%}")
' "$RAW/throughput-$model.json" "$RAW/serve-$model.json"
        echo "== $model: the engine's decode step at the batch of 32 req/s"
        batch=$("$PYTHON" -c '
import json, sys
served = json.load(open(sys.argv[1]))["nano_vllm"]["throughput@32"]
print(max(1, round((served["mean_e2el_ms"] - served["mean_ttft_ms"]) / 1e3 * served["completed"] / served["duration"])))
' "$RAW/serve-$model.json") || { echo "no result at 32 req/s in $RAW/serve-$model.json"; status=1; continue; }
        timeout 120 "$PYTHON" -m nanovllm.bench.host_overhead --dummy "$model" --batch-sizes "$batch" \
            >"$RAW/step-$model.log" 2>&1 || { echo "failed: see $RAW/step-$model.log"; status=1; continue; }
        "$PYTHON" -c '
import json, sys
served = json.load(open(sys.argv[1]))["nano_vllm"]["throughput@32"]
row = next(line for line in open(sys.argv[2]) if line.startswith("| on |") or line.startswith("| off |"))
batch, step_ms = row.split("|")[2].strip(), float(row.split("|")[3])
tpot = served["median_tpot_ms"]
print(f"32 req/s: mean decode batch {batch}, engine decode step {step_ms:.2f} ms at that batch, "
      f"median TPOT {tpot:.2f} ms = {tpot / step_ms:.2f} x step")
' "$RAW/serve-$model.json" "$RAW/step-$model.log"
    done
    return $status
}

measure 2>&1 | tee "$OUT/summary.txt"
status=${PIPESTATUS[0]}
tar czf "$OUT/gpu_serving.tar.gz" -C "$OUT" gpu_serving && rm -rf "$RAW"
exit $status
