#!/usr/bin/env bash
# One run of everything a GPU machine should check, every log and JSON into OUT:
#
#   bash bench/gpu_check.sh OUT [--quick] [--device cuda|cpu]     (make gpu-check OUT=dir)
#
#   env.log            nvidia-smi, `gpubackprop info`, the Python packages
#   selftest.log/.json `gpubackprop selftest`: every primitive and mode against float64
#   pytest-gpu.log     `pytest -m gpu` (the benchmark-only tests left to step_bench; cuda only)
#   profile.log        python -m bench.profile_step: the host's time in a small step
#   step_bench.log, gpu-<date>.json   python -m bench.step_bench against PyTorch and JAX
#                      (STEP_BENCH_ARGS adds arguments: --target-s 0.05, say)
#   explain.log        `gpubackprop explain`
#
# Each stage has its own time limit (GPU_CHECK_LIMITS=off: none, for the CPU half
# in CI, where a busy machine must not fail it) and the next runs whatever the last returned;
# the exit status is the number of stages that failed. PYTHON picks the
# interpreter (default python3); the package must import from this checkout
# (`pip install --no-deps -e .` where nothing can be downloaded).
# --quick: the selftest's quick form and the small case of the benchmark only.
# --device cpu: the same stages on the CPU (CI runs it so, to keep the script right).
set -u
OUT=${1:?usage: bash bench/gpu_check.sh OUT [--quick] [--device cuda|cpu]}
shift
QUICK=
DEVICE=cuda
while [ $# -gt 0 ]; do
    case $1 in
        --quick) QUICK=1 ;;
        --device) DEVICE=${2:?--device needs cuda or cpu}; shift ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
case $DEVICE in cuda|cpu) ;; *) echo "gpu_check.sh: --device must be cuda or cpu, not $DEVICE" >&2; exit 2 ;; esac
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
    if [ "${GPU_CHECK_LIMITS:-on}" = off ]; then
        "$@" >"$OUT/$log" 2>&1
    else
        timeout --kill-after=10 "$limit" "$@" >"$OUT/$log" 2>&1
    fi
    local rc=$?
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
    summary+=("$name: exit $rc in $((SECONDS - t0)) s ($log)")
    echo "== $name: exit $rc in $((SECONDS - t0)) s"
}

{
    date -u
    git rev-parse HEAD 2>/dev/null && git status --short --untracked-files=no
    command -v nvidia-smi >/dev/null && nvidia-smi
    "$PY" -m gpubackprop.cli info
    "$PY" -m pip list 2>/dev/null | grep -i -E '^(cupy|numpy|torch|jax|jaxlib|ml.dtypes|scikit-learn|nvidia-)'
} >"$OUT/env.log" 2>&1

selftest_args=(--device "$DEVICE" --json "$OUT/selftest.json")
bench_args=(--device "$DEVICE" --out "$OUT")
profile_args=(--device "$DEVICE")
if [ -n "$QUICK" ]; then
    selftest_args+=(--quick)
    bench_args+=(--cases small --precisions "$([ "$DEVICE" = cuda ] && echo float32,bf16 || echo float32)" --repeats 3)
    profile_args+=(--steps 200)
fi
# shellcheck disable=SC2206  # word splitting of the extra arguments is meant
bench_args+=(${STEP_BENCH_ARGS:-})
stage selftest 150 selftest.log "$PY" -m gpubackprop.cli selftest "${selftest_args[@]}"
if [ "$DEVICE" = cuda ]; then
    pytest_args=(-m gpu -q -p no:cacheprovider --continue-on-collection-errors -k "not test_bench_gpu_train_step")
    "$PY" -c "import pytest_timeout" 2>/dev/null && pytest_args+=(--timeout 120)  # one hung test fails alone
    stage "pytest -m gpu" 240 pytest-gpu.log "$PY" -m pytest "${pytest_args[@]}" tests bench
fi
stage profile 60 profile.log "$PY" -m bench.profile_step "${profile_args[@]}"
stage step_bench 330 step_bench.log "$PY" -m bench.step_bench "${bench_args[@]}"
stage explain 60 explain.log "$PY" -m gpubackprop.cli explain --device "$DEVICE"

printf '%s\n' "${summary[@]}" | tee -a "$OUT/env.log"
exit "$failed"
