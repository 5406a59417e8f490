# Sourced by the tools/gpu_*.sh scripts: `gpu_setup`, their start (the directories, the python, the head of
# their log); `step`, each part of a run with a time limit of its own, so that one that fails or hangs does
# not stop the rest; `headlines`, the figures of their benches; and `gpu_finish`, the one archive that
# comes back (a GPU machine may return only a few files).

gpu_setup() {   # gpu_setup NAME: OUT made absolute, WORK (= STEPS_DIR, each step's output), PY, PYTHONPATH,
                # log = $OUT/NAME.log begun with gpu_header
    OUT="${OUT:?set OUT to a directory for the results}"
    mkdir -p "$OUT"
    OUT=$(cd "$OUT" && pwd)
    WORK=$(mktemp -d)
    STEPS_DIR="$WORK"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    PY="${PYTHON:-python3}"
    log="$OUT/$1.log"
    gpu_header
}

gpu_finish() {   # gpu_finish NAME: the run's time into the log, and WORK with the log as $OUT/NAME.tar.gz
    echo "done in ${SECONDS}s" | tee -a "$log"
    cp "$log" "$WORK/"
    (cd "$WORK" && tar czf "$OUT/$1.tar.gz" -- *)
}

gpu_header() {   # the card, torch and Triton, and the commit the results record (bench.report.git_commit:
                 # NANO_VLLM_GIT_COMMIT for a tree copied to the GPU machine), into $log (and the terminal)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$log"
    $PY -c "import torch, triton; from nanovllm.bench.report import git_commit
print('torch', torch.__version__, 'triton', triton.__version__); print(git_commit() or '')" | tee -a "$log"
}

install_missing() {   # install_missing "IMPORTS" GLOB: where `import IMPORTS` fails, pip-install the wheels
                      # $WHEELS/GLOB (default .whl/; no index, no dependencies), pip's output into $log
    local wheels=${WHEELS:-.whl}
    if ! $PY -c "import $1" 2>/dev/null && ls "$wheels"/$2 >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$wheels"/$2 >> "$log" 2>&1
    fi
}

step() {   # step NAME SECONDS COMMAND...: run, keep its output in $STEPS_DIR/NAME.txt, record its exit status
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$STEPS_DIR/$name.txt" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$log"
    tail -3 "$STEPS_DIR/$name.txt" | tee -a "$log"
}

headlines() {   # headlines DIR PATTERN: the headline figure of each bench result DIR/PATTERN (JSON), into $log
    $PY - "$1" "$2" <<'PYEOF' | tee -a "$log"
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], sys.argv[2]))):
    for figure in json.load(open(path)).get("figures", []):
        if figure.get("headline"):
            print(f"{os.path.basename(path)[:-5]:46} {figure['device']} {figure['figure']} {figure['measured']:.1f} "
                  f"roofline {figure['roofline']:.1f} ({100 * figure['fraction_of_roofline']:.1f}%)")
PYEOF
}
