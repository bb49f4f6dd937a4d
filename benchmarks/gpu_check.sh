#!/usr/bin/env bash
# The prepared GPU check: everything that needs a CUDA GPU, in one run of under 5 minutes on
# one GPU. First the CUDA tests (sparse path against the dense reference, bf16 autocast, a
# CUDA trainer against the CPU one, device-side byte regrouping and pinned copies against
# the CPU wire bytes, a producer on CUDA), then benchmarks/bench_gpu.py (SAE step against a
# bf16 encoder matmul at 16k/64k/256k latents, trainer tokens/s, producer against its bare
# forward on SmolLM2), which writes the "GPU" section of BENCHMARKS.md.
#
#   benchmarks/gpu_check.sh [--quick] [--no-write] [--python PATH]
#
# Needs a CUDA build of torch in the environment (see the Makefile's TORCH_SPEC). Without a
# GPU it says so and exits 0: there is nothing to check. Bad arguments exit 2.
set -uo pipefail

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
}

PY=${PYTHON:-.venv/bin/python}
BENCH_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quick | --no-write) BENCH_ARGS+=("$1") ;;
        --python)
            [ $# -ge 2 ] || { echo "gpu_check: --python needs a path" >&2; exit 2; }
            PY=$2
            shift ;;
        --python=*) PY=${1#--python=} ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

cd "$(dirname "$0")/.." || exit 2
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_check: no Python at '$PY' (run make install, or pass --python)" >&2
    exit 2
fi
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: skipped: no CUDA GPU here (torch.cuda.is_available() is False); nothing to check"
    exit 0
fi
"$PY" -c 'import torch; print("gpu_check:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'

log=$(mktemp)
trap 'rm -f "$log"' EXIT
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -rs \
    tests/test_cuda.py tests/test_staging.py tests/test_wire.py 2>&1 | tee "$log"
tests_rc=${PIPESTATUS[0]}
summary=$(grep -E '(passed|failed|error)' "$log" | tail -n 1 | tr -d '=' | sed 's/^ *//;s/ *$//')
timeout 240 "$PY" benchmarks/bench_gpu.py "${BENCH_ARGS[@]}" --tests "${summary:-no summary} (exit $tests_rc)"
bench_rc=$?
echo "gpu_check: tests exit $tests_rc, benchmark exit $bench_rc"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
