#!/usr/bin/env bash
# 16 concurrent streaming requests through the server against the offline throughput of the same
# 16 requests, on this CPU with the embedded model (the target: the server at 90% or more).
#
#   OUT=/some/dir bash tools/cpu_serving.sh
#
# Other work on the machine skews both figures: each JSON records the load average at its start and
# end, and this script prints them beside the ratio. Run it on a quiet machine.
set -uo pipefail
OUT=${OUT:?set OUT to the directory for the results}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
WORKLOAD=(--dataset random --num-prompts 16 --input-len 64 --output-len 128 --ceiling-repeats 3 --no-progress)

"$PYTHON" -m nanovllm.cli bench throughput "${WORKLOAD[@]}" --json "$OUT/cpu-offline.json" >"$OUT/cpu-offline.log" 2>&1 \
    || { echo "offline run failed: see $OUT/cpu-offline.log"; exit 1; }
"$PYTHON" -m nanovllm.cli bench serve --launch --port 18001 "${WORKLOAD[@]}" --request-rate inf \
    --json "$OUT/cpu-serve.json" >"$OUT/cpu-serve.log" 2>&1 || { echo "serve run failed: see $OUT/cpu-serve.log"; exit 1; }
"$PYTHON" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
offline = json.load(open(f"{out}/cpu-offline.json"))
serve = json.load(open(f"{out}/cpu-serve.json"))
offline_tps = offline["nano_vllm"]["random"]["output_tokens_per_second"]
served = serve["nano_vllm"]["random@inf"]
load = lambda result: "{start:.1f} -> {end:.1f}".format(**result["machine"]["load_average_1min"])
print(f"offline  {offline_tps:8.1f} output tok/s   (load average {load(offline)})")
print(f"server   {served['output_throughput']:8.1f} output tok/s   (load average {load(serve)}; "
      f"client ceiling {served['client_ceiling_output_throughput']:.0f} tok/s)")
print(f"server / offline: {served['output_throughput'] / offline_tps:.0%}")
PY
