#!/usr/bin/env bash
# run_gpu.sh — on a machine with an NVIDIA GPU (Hopper): build the CUDA backend, run its
# tests against the CPU backend, run compute-sanitizer memcheck and racecheck, and time
# NSA attention against PyTorch SDPA (bench/bench_cuda.py). Logs and the table go to $OUT
# (default ./gpu_out).
#
#   bash bench/run_gpu.sh [all|test|train|bench|groups|ab]
#   env: SEQ_LENS=8192,16384 REPS=5 NSA_DTYPE=bf16|fp32|both (the bench), GQA_GROUPS="64:64 16:4"
#        GQA_T=16384 (H:G pairs of the small-group comparison), TESTS=... and
#        SANITIZE=... (which device tests run, and which run under compute-sanitizer; empty:
#        none), TEST_TIMEOUT=420 (seconds a device test may run: a hung kernel ends there),
#        PROFILE=1 PROFILE_T=16384 PROFILE_KERNELS=regex (kernel times by ncu, of the kernels
#        matching regex when given), PROFILE_DETAIL=regex (ncu's
#        throughput, occupancy and stall sections for the bf16 kernels matching regex),
#        SANITIZE_ENV="NSA_CUDA_SLC_KC=1" (switches set for the compute-sanitizer runs; or
#        SANITIZE_SETS="NSA_CUDA_SLC_KC=5 NSA_CUDA_SLC_KC=4,NSA_CUDA_DQ_FUSED=1": one pair of
#        runs per set, comma-separated switches),
#        SANITIZE_ARGS=--no-variants (memcheck on the default context's cases alone),
#        AB_VAR=NSA_CUDA_SLCW AB_VALUES="0 1 2" AB_T=65536 (ab: bench_attn_cuda once per value of
#        the tuning variable, alternating, AB_ROUNDS=2 times; AB_T may list lengths,
#        8192,65536), or AB_SETS="default NSA_CUDA_SLC_KC=1,NSA_CUDA_DQ_FUSED=1" (one run per
#        set of switches, comma-separated; default: none)
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
# carried in .deps/ (include/cblas.h, lib/libopenblas.so*; bench/carry_deps.sh makes it).
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
    for t in ${TESTS-test_wgmma test_cuda test_cuda_bf16}; do
        echo "== $t"
        start=$(date +%s)
        timeout "${TEST_TIMEOUT:-420}" build/cuda/$t >"$OUT/$t.log" 2>&1 || status=1
        grep -vE "^    " "$OUT/$t.log" | tail -n 40
        grep -E "max rel err|differ" "$OUT/$t.log" | sort -k5 -g | tail -n 3
        echo "$t: $(( $(date +%s) - start )) s"
    done
    # compute-sanitizer: memcheck on every case, racecheck (shared-memory hazards) on the
    # small --race shapes
    for t in ${SANITIZE-test_cuda test_cuda_bf16}; do
        for set in ${SANITIZE_SETS:-${SANITIZE_ENV:+${SANITIZE_ENV// /,}}} ""; do
            [ -n "${SANITIZE_SETS:-}${SANITIZE_ENV:-}" ] && [ -z "$set" ] && continue
            envs=${set//,/ } tag=${set:+_${set//[^A-Za-z0-9]/_}}
            echo "== compute-sanitizer memcheck ($t${set:+ with $envs})"
            start=$(date +%s)
            env $envs timeout 300 compute-sanitizer --tool memcheck --error-exitcode 3 \
                build/cuda/$t ${SANITIZE_ARGS:-} >"$OUT/memcheck_$t$tag.log" 2>&1 || status=1
            grep -E "^(FAIL|RESULT)|ERROR SUMMARY|=========" "$OUT/memcheck_$t$tag.log" | head -n 20
            echo "memcheck: $(( $(date +%s) - start )) s"
            echo "== compute-sanitizer racecheck ($t --race${set:+ with $envs})"
            start=$(date +%s)
            env $envs timeout 240 compute-sanitizer --tool racecheck --error-exitcode 3 \
                build/cuda/$t --race >"$OUT/racecheck_$t$tag.log" 2>&1 || status=1
            grep -E "^(FAIL|RESULT)|ERROR SUMMARY|=========" "$OUT/racecheck_$t$tag.log" | head -n 20
            echo "racecheck: $(( $(date +%s) - start )) s"
        done
    done
fi

if [ "$what" = all ] || [ "$what" = train ]; then
    # the default task (nsa train with no data) on the GPU, fp32 and bf16
    for prec in fp32 bf16; do
        echo "== nsa train --device cuda --precision $prec"
        start=$(date +%s)
        build/cuda/nsa train --device cuda --precision $prec --out /tmp/nsa-$prec.safetensors \
            $([ $prec = bf16 ] && echo --no-baseline) >"$OUT/train_$prec.log" 2>&1 || status=1
        grep -E "tok/s|NSA |window baseline|chance|step 1000" "$OUT/train_$prec.log" | tail -n 6
        echo "train $prec: $(( $(date +%s) - start )) s"
    done
    # a larger model on the same task (MFU: 6 x params x tokens/s against the GEMM rate)
    for prec in fp32 bf16; do
        echo "== nsa train (D = 512, 4 layers, 8 heads of 64, T = 1024) --precision $prec"
        build/cuda/nsa train --device cuda --precision $prec --embed-dim 512 --hidden-size 512 \
            --num-layers 4 --num-heads 8 --head-dim 64 --task-seq-len 1024 --batch-size 16 \
            --steps 60 --eval-every 20 --eval-sequences 64 --no-baseline \
            --out /tmp/nsa-large-$prec.safetensors 2>&1 | grep -E "params|step 60/" || status=1
    done
fi

echo "== memory limits (build/cuda/gpu_limits)"
build/cuda/gpu_limits || status=1

if [ -n "${PROFILE_DETAIL:-}" ]; then
    echo "== ncu sections, kernels matching ${PROFILE_DETAIL}, T=${PROFILE_T:-16384}"
    timeout 400 ncu --clock-control none -k "regex:${PROFILE_DETAIL}" --launch-count "${PROFILE_COUNT:-8}" \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis \
        --section SchedulerStats build/cuda/bench_attn_cuda --seq-lens "${PROFILE_T:-16384}" \
        --reps 1 --warmup 0 >"$OUT/ncu_detail.txt" 2>"$OUT/ncu_detail.err" || true
    grep -E "^  [a-z_0-9]+.*\(|Duration|Memory Throughput|L2 Cache Throughput|L1/TEX Cache Th|Compute \(SM\)|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Issue Slots Busy|Stall|One or More|No Eligible|Executed Ipc A|Warp Cycles Per Issued" \
        "$OUT/ncu_detail.txt" | head -n 300
fi

if [ -n "${PROFILE:-}" ]; then
    echo "== kernel times (ncu, T=${PROFILE_T:-16384}: forward, inference forward, backward)"
    timeout 240 ncu --clock-control none ${PROFILE_KERNELS:+-k "regex:$PROFILE_KERNELS"} \
        --metrics gpu__time_duration.sum --csv build/cuda/bench_attn_cuda \
        --seq-lens "${PROFILE_T:-16384}" --reps 1 --warmup 0 >"$OUT/ncu.csv" 2>"$OUT/ncu.err" || true
    python3 - "$OUT/ncu.csv" <<'PY' || tail -n 20 "$OUT/ncu.err"
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head, rows = rows[0], rows[1:]
ki, vi, ui = head.index("Kernel Name"), head.index("Metric Value"), head.index("Metric Unit")
scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3,
         "ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
for r in rows:
    ms = float(r[vi].replace(",", "")) * scale.get(r[ui], float("nan"))
    print(f"{ms:10.3f} ms  {r[ki][:110]}")
PY
fi

if [ "$what" = ab ]; then
    sets=${AB_SETS:-}
    if [ -z "$sets" ]; then
        for val in ${AB_VALUES:?}; do
            sets="$sets ${AB_VAR:?}=$val"
        done
    fi
    echo "== A/B:$sets, T=${AB_T:-65536}"
    : >"$OUT/ab.txt"
    for round in $(seq "${AB_ROUNDS:-2}"); do
        for set in $sets; do
            envs=()
            [ "$set" = default ] || IFS=, read -ra envs <<<"$set"
            env ${envs[@]+"${envs[@]}"} build/cuda/bench_attn_cuda --seq-lens "${AB_T:-65536}" \
                --reps "${AB_REPS:-3}" | sed "s/^/$set: /" | tee -a "$OUT/ab.txt" || status=1
        done
    done
    # per set and length: the best of the rounds, and its ratio to the first set's
    python3 - "$OUT/ab.txt" <<'PY' || status=1
import re, sys
best = {}
for line in open(sys.argv[1]):
    m = re.match(r"(\S+): nsa .*?T=(\d+) .*?fwd_ms=([\d.na]+) .*?bwd_ms=([\d.na]+)", line)
    if not m:
        continue
    key = (m.group(1), int(m.group(2)))
    f, b = float(m.group(3)), float(m.group(4))
    o = best.get(key, (f, b))
    best[key] = tuple(min(x, y) if x == x and y == y else (x if x == x else y)
                      for x, y in zip(o, (f, b))) # (nan: none measured)
sets = list(dict.fromkeys(k[0] for k in best))
print("== A/B summary (best of the rounds; x: time against the first set)")
for T in sorted({k[1] for k in best}):
    base = best.get((sets[0], T), (float("nan"), float("nan")))
    for s in sets:
        if (s, T) not in best:
            continue
        f, b = best[(s, T)]
        print(f"T={T:<6} fwd {f:8.3f} ms ({f / base[0]:.3f}x)  bwd {b:8.3f} ms "
              f"({b / base[1]:.3f}x)  {s}")
PY
fi

if [ "$what" = all ] || [ "$what" = bench ]; then
    echo "== bench"
    PYTHONUNBUFFERED=1 python3 bench/bench_cuda.py --seq-lens "$SEQ_LENS" --reps "$REPS" \
        --nsa-dtype "${NSA_DTYPE:-bf16}" --out "$OUT/bench.md" || status=1
fi

if [ "$what" = all ] || [ "$what" = bench ] || [ "$what" = groups ]; then
    # small GQA groups (H/G < 16): the default selected path (key blocks outside) against
    # union tiles (NSA_CUDA_BF16_SLC=union), bf16, T = GQA_T
    echo "== GQA groups (H G), T=${GQA_T:-16384}: default, then union tiles"
    for hg in ${GQA_GROUPS:-64:64 16:16 16:8 16:4 32:4}; do
        h=${hg%:*} g=${hg#*:}
        build/cuda/bench_attn_cuda --seq-lens "${GQA_T:-16384}" --reps 3 --heads "$h" \
            --kv-heads "$g" || status=1
        NSA_CUDA_BF16_SLC=union build/cuda/bench_attn_cuda --seq-lens "${GQA_T:-16384}" \
            --reps 3 --heads "$h" --kv-heads "$g" | sed 's/^/union: /' || status=1
    done
fi
exit $status
