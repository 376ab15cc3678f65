#!/usr/bin/env bash
# One command for a machine with a CUDA GPU (issue 15):
#   benchmarks/gpu_check.sh OUTDIR
# 0. tests/test_cuda.py (what only a GPU run confirms: compiled kernels, TRITON_INTERPRET=0),
# 1. the kernel suites against the torch reference on the GPU (pytest, SAMPLERS_TEST_DEVICE=cuda),
# 2. a host-sync check of the triton sampling step (torch.cuda.set_sync_debug_mode),
# 3. benchmarks/gpu_bench.py at the shapes of benchmarks/RESULTS.md's GPU table,
# writing JSON and Markdown under OUTDIR (summary.md collects them). Each part has its own
# time budget (about 7 minutes in all, under 8 on an H100-class GPU); a part that runs over
# is stopped and the summary says so. On a machine without a CUDA GPU it says so, runs
# `gpu_bench.py --dry-run` (the checks at tiny shapes under Triton's interpreter) and exits 0.
# PYTHON picks the interpreter (default: the first of python3 and python that imports torch:
# on the lent GPU machines `python3` is the one holding torch). The test parts run on
# GPU_CHECK_JOBS pytest-xdist workers (default: the CPU count, at most 8) when xdist is
# installed: on a fresh machine they are mostly Triton compilations, which are CPU-bound and
# compile one kernel at a time per process. The budgets can be overridden with
# CUDA_TESTS_BUDGET, TESTS_BUDGET, SYNC_BUDGET and BENCH_BUDGET (seconds).
# It writes 11 files; where only a few files come back (the lent machines return at most 8),
# archive the folder:
#   bash benchmarks/gpu_check.sh /tmp/gpu_check; tar -czf "$OUT/gpu_check.tgz" -C /tmp gpu_check
set -u
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
else
    PY=
    for candidate in python3 python; do
        if command -v "$candidate" > /dev/null && "$candidate" -c 'import torch' 2> /dev/null; then
            PY=$candidate
            break
        fi
    done
    if [ -z "$PY" ]; then
        echo "gpu_check: neither python3 nor python imports torch; set PYTHON to the interpreter that does" >&2
        exit 2
    fi
fi
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.md"

CUDA_TESTS_BUDGET=${CUDA_TESTS_BUDGET:-60}
TESTS_BUDGET=${TESTS_BUDGET:-120}
SYNC_BUDGET=${SYNC_BUDGET:-50}
BENCH_BUDGET=${BENCH_BUDGET:-190}

# status NAME RC BUDGET: one summary line for a part (124/137: stopped by timeout).
status() {
    case "$2" in
        0) echo "- $1: ok" ;;
        124|137) echo "- $1: STOPPED after its $3 s budget (partial results kept)" ;;
        *) echo "- $1: FAILED (exit $2)" ;;
    esac >> "$SUMMARY"
}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU on this machine; running gpu_bench.py --dry-run only"
    printf '# gpu_check on %s\n\nNo CUDA GPU: only `gpu_bench.py --dry-run` ran.\n\n' "$(hostname)" > "$SUMMARY"
    TRITON_INTERPRET=1 timeout 600 "$PY" benchmarks/gpu_bench.py --dry-run \
        --json "$OUT/gpu_bench_dry_run.json" --markdown "$OUT/gpu_bench_dry_run.md"
    rc=$?
    status "gpu_bench.py --dry-run" "$rc" 600
    cat "$OUT/gpu_bench_dry_run.md" >> "$SUMMARY" 2>/dev/null
    exit 0
fi

unset TRITON_INTERPRET
JOBS=${GPU_CHECK_JOBS:-$(nproc 2> /dev/null || echo 1)}
[ "$JOBS" -gt 8 ] && JOBS=8
XDIST=()
if [ "$JOBS" -gt 1 ] && "$PY" -c 'import xdist' 2> /dev/null; then
    XDIST=(-n "$JOBS" --dist worksteal)
fi
GPU=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')
echo "gpu_check: $GPU; results under $OUT"
printf '# gpu_check on %s (%s)\n\nStarted %s; %s; test workers: %s.\n\n' "$GPU" "$(hostname)" \
    "$(date -u '+%Y-%m-%d %H:%M UTC')" \
    "$("$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' 2>&1)" \
    "${XDIST[1]:-1}" > "$SUMMARY"

# 0. the GPU-only checks (compiled kernels)
TRITON_INTERPRET=0 timeout "$CUDA_TESTS_BUDGET" "$PY" -m pytest -q -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} tests/test_cuda.py \
    --junitxml="$OUT/cuda_tests.xml" > "$OUT/cuda_tests.txt" 2>&1
status "tests/test_cuda.py (cuda_tests.txt / .xml)" $? "$CUDA_TESTS_BUDGET"
tail -n 3 "$OUT/cuda_tests.txt" | sed 's/^/    /' >> "$SUMMARY"

# 1. kernel suites on the GPU
SAMPLERS_TEST_DEVICE=cuda timeout "$TESTS_BUDGET" "$PY" -m pytest -q -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} \
    tests/test_kernels.py tests/test_kernels_blocked.py tests/test_kernels_pipeline.py tests/test_dry_inplace.py \
    --junitxml="$OUT/kernel_tests.xml" > "$OUT/kernel_tests.txt" 2>&1
status "kernel suites on the GPU (kernel_tests.txt / .xml)" $? "$TESTS_BUDGET"
tail -n 3 "$OUT/kernel_tests.txt" | sed 's/^/    /' >> "$SUMMARY"

# 2. host syncs per sampling step on the triton path
timeout "$SYNC_BUDGET" "$PY" benchmarks/gpu_sync_check.py --json "$OUT/sync_check.json" \
    --markdown "$OUT/sync_check.md" > "$OUT/sync_check.txt" 2>&1
status "host-sync check (sync_check.md; exit 1 = some step synchronised)" $? "$SYNC_BUDGET"

# 3. the GPU table (gpu_bench.py stops adding rows itself a little before its budget)
timeout "$BENCH_BUDGET" "$PY" benchmarks/gpu_bench.py --budget-s $((BENCH_BUDGET - 45)) \
    --json "$OUT/gpu_bench.json" --markdown "$OUT/gpu_bench.md" > "$OUT/gpu_bench.txt" 2>&1
status "gpu_bench.py (gpu_bench.md)" $? "$BENCH_BUDGET"

{
    echo
    echo "## Host syncs"
    echo
    cat "$OUT/sync_check.md" 2>/dev/null || echo "(no result)"
    echo
    echo "## gpu_bench.py"
    echo
    cat "$OUT/gpu_bench.md" 2>/dev/null || echo "(no result)"
} >> "$SUMMARY"
echo "gpu_check: done; see $SUMMARY"
cat "$SUMMARY"
