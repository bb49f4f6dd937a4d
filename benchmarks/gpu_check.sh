#!/usr/bin/env bash
# The prepared GPU check: everything that needs a CUDA GPU, in one run of under 5 minutes on
# one GPU. First the CUDA tests (sparse path against the dense reference, bf16 autocast, a
# CUDA trainer against the CPU one, device-side byte regrouping and pinned copies against
# the CPU wire bytes, a producer on CUDA), then benchmarks/bench_gpu.py (SAE step against a
# bf16 encoder matmul at 16k/64k/256k latents, trainer tokens/s, producer against its bare
# forward on SmolLM2), which writes the "GPU" section of BENCHMARKS.md.
#
#   benchmarks/gpu_check.sh [--quick] [--no-write] [--python PATH] [--wheelhouse DIR]
#
# Needs a CUDA build of torch in the environment (see the Makefile's TORCH_SPEC). On a
# machine with no network (a lent GPU machine), pass its own Python and --wheelhouse DIR:
# the wheels `make gpu-wheels` downloads (pyzmq, lz4) are installed from DIR with no index,
# and this checkout is imported as `saestream` without being installed. Without a GPU it
# says so and exits 0: there is nothing to check. A GPU that this torch cannot use, or a
# Python without torch or saestream's dependencies, exits 1; bad arguments exit 2.
set -uo pipefail

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

PY=${PYTHON:-.venv/bin/python}
WHEELHOUSE=""
log=""
shim=""
trap 'rm -rf ${log:+"$log"} ${shim:+"$shim"}' EXIT
BENCH_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quick | --no-write) BENCH_ARGS+=("$1") ;;
        --python | --wheelhouse)
            [ $# -ge 2 ] || { echo "gpu_check: $1 needs a path" >&2; exit 2; }
            if [ "$1" = --python ]; then PY=$2; else WHEELHOUSE=$2; fi
            shift ;;
        --python=*) PY=${1#--python=} ;;
        --wheelhouse=*) WHEELHOUSE=${1#--wheelhouse=} ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# Paths given relative to where the script was called from, before moving to the checkout.
case "$PY" in */*) [ -e "$PY" ] && PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac
if [ -n "$WHEELHOUSE" ]; then
    [ -d "$WHEELHOUSE" ] || { echo "gpu_check: no wheelhouse folder '$WHEELHOUSE'" >&2; exit 2; }
    WHEELHOUSE=$(cd "$WHEELHOUSE" && pwd)
fi
cd "$(dirname "$0")/.." || exit 2
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_check: no Python at '$PY' (run make install, or pass --python)" >&2
    exit 2
fi

if ! err=$("$PY" -c 'import torch' 2>&1); then
    echo "gpu_check: torch does not import with $PY: ${err##*$'\n'}" >&2
    exit 1
fi
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
        build=$("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')
        echo "gpu_check: nvidia-smi lists a GPU, but this torch ($build) cannot use it" >&2
        exit 1
    fi
    echo "gpu_check: skipped: no CUDA GPU here (torch.cuda.is_available() is False); nothing to check"
    exit 0
fi

# saestream's own dependencies beside torch: from the wheelhouse where one is given.
if [ -n "$WHEELHOUSE" ]; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELHOUSE" pyzmq lz4 \
        || { echo "gpu_check: cannot install pyzmq and lz4 from $WHEELHOUSE" >&2; exit 1; }
fi
if ! "$PY" -c 'import saestream' 2>/dev/null; then  # this checkout, importable as saestream
    shim=$(mktemp -d)
    ln -s "$PWD" "$shim/saestream"
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! err=$("$PY" -c 'import saestream.consumer.trainer, saestream.producer.daemon, zmq, lz4' 2>&1); then
    echo "gpu_check: saestream does not import with $PY: ${err##*$'\n'} (make gpu-wheels; --wheelhouse)" >&2
    exit 1
fi
"$PY" -c 'import torch; print("gpu_check:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'

# 100 s + 180 s: the whole check stays under 5 minutes, start-up included.
log=$(mktemp)
timeout 100 "$PY" -m pytest -q -p no:cacheprovider -rs \
    tests/test_cuda.py tests/test_staging.py tests/test_wire.py 2>&1 | tee "$log"
tests_rc=${PIPESTATUS[0]}
summary=$(grep -E '^=*.*[0-9]+ (passed|failed|error)' "$log" | tail -n 1 | tr -d '=' | sed 's/^ *//;s/ *$//')
[ "$tests_rc" = 124 ] && summary="timed out after 100 s${summary:+: $summary}"
timeout 180 "$PY" benchmarks/bench_gpu.py "${BENCH_ARGS[@]}" --tests "${summary:-no summary} (exit $tests_rc)"
bench_rc=$?
echo "gpu_check: tests exit $tests_rc, benchmark exit $bench_rc"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
