#!/usr/bin/env bash
# One run of everything a GPU machine should check, every log and JSON into OUT:
#
#   bash bench/gpu_check.sh OUT [--quick]      (make gpu-check OUT=dir)
#
#   env.log            nvidia-smi, `gpubackprop info`, the Python packages
#   selftest.log/.json `gpubackprop selftest --device cuda`: every primitive and mode
#   pytest-gpu.log     `pytest -m gpu` (the benchmark-only tests left to step_bench)
#   profile.log        bench/profile_step.py: the host's time in a small step
#   step_bench.log, gpu-<date>.json   bench/step_bench.py against PyTorch and JAX
#                      (STEP_BENCH_ARGS adds arguments: --target-s 0.1, say)
#   explain.log        `gpubackprop explain --device cuda`
#
# Each stage has its own time limit and the next runs whatever the last returned;
# the exit status is the number of stages that failed. PYTHON picks the
# interpreter (default python3); the package must import from this checkout
# (`pip install --no-deps -e .` where nothing can be downloaded).
# --quick: the selftest's quick form and the small case of the benchmark only.
set -u
OUT=${1:?usage: bash bench/gpu_check.sh OUT [--quick]}
QUICK=${2:-}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
failed=0
summary=()

stage() {  # stage NAME LIMIT_S LOG COMMAND...
    local name=$1 limit=$2 log=$3
    shift 3
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$log" 2>&1
    local rc=$?
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
    summary+=("$name: exit $rc in $((SECONDS - t0)) s ($log)")
    echo "== $name: exit $rc in $((SECONDS - t0)) s"
}

{
    date -u
    git rev-parse HEAD 2>/dev/null && git status --short --untracked-files=no
    nvidia-smi
    "$PY" -m gpubackprop.cli info
    "$PY" -m pip list 2>/dev/null | grep -i -E '^(cupy|numpy|torch|jax|jaxlib|ml.dtypes|scikit-learn|nvidia-)'
} >"$OUT/env.log" 2>&1

selftest_args=(--device cuda --json "$OUT/selftest.json")
# shellcheck disable=SC2206  # word splitting of the extra arguments is meant
bench_args=(--device cuda --out "$OUT" ${STEP_BENCH_ARGS:-})
if [ "$QUICK" = "--quick" ]; then
    selftest_args+=(--quick)
    bench_args+=(--cases small --precisions float32,bf16 --repeats 3)
fi
stage selftest 150 selftest.log "$PY" -m gpubackprop.cli selftest "${selftest_args[@]}"
pytest_args=(-m gpu -q -p no:cacheprovider --continue-on-collection-errors -k "not test_bench_gpu_train_step")
"$PY" -c "import pytest_timeout" 2>/dev/null && pytest_args+=(--timeout 120)  # one hung test fails alone
stage "pytest -m gpu" 240 pytest-gpu.log "$PY" -m pytest "${pytest_args[@]}" tests bench
stage profile 60 profile.log "$PY" bench/profile_step.py --device cuda
stage step_bench 330 step_bench.log "$PY" bench/step_bench.py "${bench_args[@]}"
stage explain 60 explain.log "$PY" -m gpubackprop.cli explain --device cuda

printf '%s\n' "${summary[@]}" | tee -a "$OUT/env.log"
exit "$failed"
