#!/usr/bin/env bash
# Serving at engine speed, on one GPU: for each model (dummy weights, the `throughput` workload),
# the offline throughput, the benchmark client's own ceiling (against a stub server), and
# `bench serve` at request rates 8, 32 and inf, in the same run on the same machine.
#
#   OUT=/some/dir bash tools/gpu_serving.sh        # JSON and logs land in $OUT; about 6 minutes on an H200
#
# The GPU machine has no internet. If the server's packages are missing, install them from wheels
# fetched beforehand on a machine with internet (Python 3.12, x86-64):
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d wheels \
#       fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection typing-extensions \
#       opentelemetry-api pyzmq msgspec httpx httpcore anyio h11 idna certifi sniffio prometheus-client
# and set WHEELS=path/to/wheels: this script installs them (never touching torch) before it starts.
set -uo pipefail
OUT=${OUT:?set OUT to the directory for the results}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ -n "${WHEELS:-}" ]; then
    "$PYTHON" -m pip install --no-index --find-links "$WHEELS" --no-deps "$WHEELS"/*.whl >"$OUT/wheels.log" 2>&1 \
        || { echo "installing the wheels failed: see $OUT/wheels.log"; exit 1; }
fi
"$PYTHON" -c "import fastapi, uvicorn, zmq, msgspec, httpx" || { echo "the server's packages are missing; set WHEELS"; exit 1; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; uptime; git log -1 --oneline; } >"$OUT/machine.txt" 2>&1

status=0
for model in llama-3.2-1b qwen3-0.6b; do
    echo "== $model: offline throughput"
    timeout 150 "$PYTHON" -m nanovllm.cli bench throughput --dummy "$model" --no-progress --ceiling-repeats 3 \
        --json "$OUT/throughput-$model.json" >"$OUT/throughput-$model.log" 2>&1 || { echo "failed: see $OUT/throughput-$model.log"; status=1; }
    tail -4 "$OUT/throughput-$model.log"
    echo "== $model: client ceiling and bench serve at 8, 32, inf req/s"
    timeout 210 "$PYTHON" -m nanovllm.cli bench serve --dummy "$model" --launch --port 18000 --no-progress \
        --ceiling-repeats 3 --request-rate 8,32,inf --client-processes 4 \
        --json "$OUT/serve-$model.json" >"$OUT/serve-$model.log" 2>&1 || { echo "failed: see $OUT/serve-$model.log"; status=1; }
    grep -E "client ceiling|Output token throughput|Median TPOT|Request rate" "$OUT/serve-$model.log"
done
exit $status
