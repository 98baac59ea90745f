#!/usr/bin/env bash
# The GPU check of the serving engine (issue 18), in at most ~5 minutes on one H100/H200:
#
#     benchmarks/gpu_check.sh OUTDIR
#
# Run from anywhere; it works in the repository root. Uses .venv when present, else installs the
# project into the current python3 (no network needed when the wheels are already there; no Docker).
# Writes into OUTDIR:
#   env.txt          nvidia-smi, torch / CUDA versions
#   tests.txt        the engine tests on the device (LIVECOPY_TEST_DEVICE=cuda): continuous decoder,
#                    deadlines mid-decode, joins, hot swap, isolation; the executor/engine tests
#   generation.txt/.json   static vs continuous engine on cuda: burst copies/s, open-loop p50/p99 at 50%
#                    of saturation and at 400 req/s, copies/s at p99 <= 50 ms, deadline lateness
#   generation_compiled.txt/.json   the same, continuous with the decode step torch.compiled
#   peers.txt/.json  livecopy static / continuous decode vs HF generate() (dynamic and static cache)
#                    and CTranslate2 (fp16, int8) on cuda, batch 1 and 32, K=4, 40 new tokens
#   summary.json     exit status and seconds of each part
# Each part has its own time limit; a part that fails or times out is recorded and the next runs.
set -u
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."

if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, engine" 2>/dev/null; then
    PY=.venv/bin/python
else
    PY=python3
    "$PY" -m pip install -q -e . >"$OUT/install.txt" 2>&1 || echo "pip install -e . failed (see install.txt)"
    "$PY" -m pip install -q pytest pytest-timeout >>"$OUT/install.txt" 2>&1 || true
fi
export LIVECOPY_MODELS__TORCH_THREADS=4 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

SUMMARY="$OUT/summary.tsv"
: >"$SUMMARY"
part() {  # part NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$SUMMARY"
    echo "$name: exit $rc in $((SECONDS - t0)) s"
}

{
    nvidia-smi || true
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
} >"$OUT/env.txt" 2>&1

part tests 75 env LIVECOPY_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
    tests/unit/test_continuous.py tests/unit/test_batching.py \
    "tests/unit/test_copy_executor.py::test_engine_batches_real_model_and_answers_one_to_one" \
    "tests/unit/test_copy_executor.py::test_a_poisoned_request_cannot_fail_the_others_of_its_batch"

part generation 100 "$PY" benchmarks/generation.py --device cuda --engines static,continuous --duration 6 \
    --loads 400 --deadline-ms 200 --burst 256 --json-out "$OUT/generation.json"

part generation_compiled 60 "$PY" benchmarks/generation.py --device cuda --engines continuous --compile \
    --duration 8 --loads 400 --deadline-ms 0 --burst 256 --json-out "$OUT/generation_compiled.json"

part peers 60 "$PY" benchmarks/peers.py --device cuda --threads 4 --repeats 2 --json-out "$OUT/peers.json"

"$PY" - "$SUMMARY" "$OUT/summary.json" <<'EOF'
import json, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
json.dump({name: {"exit": int(rc), "seconds": int(s)} for name, rc, s in rows}, open(sys.argv[2], "w"), indent=2)
EOF
echo "report in $OUT"
