#!/usr/bin/env bash
# run_gpu.sh — on a machine with an NVIDIA GPU (Hopper): build the CUDA backend, run its
# test against the CPU backend, run compute-sanitizer memcheck on the quick test, and time
# NSA attention against PyTorch SDPA (bench/bench_cuda.py). Logs and the table go to $OUT
# (default ./gpu_out).
#
#   bash bench/run_gpu.sh [all|test|bench]      SEQ_LENS=8192,16384 REPS=5 to change the bench
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
what=${1:-all}
SEQ_LENS=${SEQ_LENS:-8192,16384,32768,65536,131072}
REPS=${REPS:-5}
status=0

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
nvcc --version | tail -n 1

# OpenBLAS (the CPU backend, the reference of the test) when the machine has none: a copy
# carried in .deps/ (include/cblas.h, lib/libopenblas.so*).
if ! printf '#include <cblas.h>\n' | cc -E -x c - >/dev/null 2>&1 && [ -d .deps ]; then
    echo "using the OpenBLAS carried in .deps/"
    export CPATH=$PWD/.deps/include${CPATH:+:$CPATH}
    export LIBRARY_PATH=$PWD/.deps/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
    export LD_LIBRARY_PATH=$PWD/.deps/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

echo "== build"
start=$(date +%s)
if ! make cuda -j"$(nproc)" >"$OUT/build.log" 2>&1; then
    tail -n 40 "$OUT/build.log"
    echo "build failed"
    exit 1
fi
grep -iE "warning" "$OUT/build.log" | head -n 20
echo "built in $(( $(date +%s) - start )) s"

if [ "$what" = all ] || [ "$what" = test ]; then
    echo "== test_cuda"
    start=$(date +%s)
    build/cuda/test_cuda >"$OUT/test_cuda.log" 2>&1 || status=1
    cat "$OUT/test_cuda.log"
    echo "test_cuda: $(( $(date +%s) - start )) s"

    echo "== compute-sanitizer memcheck (test_cuda, every case)"
    start=$(date +%s)
    timeout 200 compute-sanitizer --tool memcheck --error-exitcode 3 build/cuda/test_cuda \
        >"$OUT/memcheck.log" 2>&1 || status=1
    grep -E "^(ok|FAIL|RESULT)|ERROR SUMMARY|=========" "$OUT/memcheck.log" | head -n 40
    echo "memcheck: $(( $(date +%s) - start )) s"

    echo "== compute-sanitizer racecheck (test_cuda --race: shared-memory hazards)"
    start=$(date +%s)
    timeout 240 compute-sanitizer --tool racecheck --error-exitcode 3 build/cuda/test_cuda --race \
        >"$OUT/racecheck.log" 2>&1 || status=1
    grep -E "^(ok|FAIL|RESULT)|ERROR SUMMARY|=========" "$OUT/racecheck.log" | head -n 40
    echo "racecheck: $(( $(date +%s) - start )) s"
fi

if [ -n "${PROFILE:-}" ]; then
    echo "== kernel times (ncu, T=${PROFILE_T:-16384}: forward, inference forward, backward)"
    timeout 240 ncu --metrics gpu__time_duration.sum --csv build/cuda/bench_attn_cuda \
        --seq-lens "${PROFILE_T:-16384}" --reps 1 --warmup 0 >"$OUT/ncu.csv" 2>"$OUT/ncu.err" || true
    python3 - "$OUT/ncu.csv" <<'PY' || tail -n 20 "$OUT/ncu.err"
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head, rows = rows[0], rows[1:]
ki, vi, ui = head.index("Kernel Name"), head.index("Metric Value"), head.index("Metric Unit")
scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}
for r in rows:
    ms = float(r[vi].replace(",", "")) * scale.get(r[ui], float("nan"))
    print(f"{ms:10.3f} ms  {r[ki][:110]}")
PY
fi

if [ "$what" = all ] || [ "$what" = bench ]; then
    echo "== bench"
    PYTHONUNBUFFERED=1 python3 bench/bench_cuda.py --seq-lens "$SEQ_LENS" --reps "$REPS" \
        --out "$OUT/bench.md" || status=1
fi
exit $status
