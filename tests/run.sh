#!/usr/bin/env bash
# run.sh — runs the whole test suite and prints the closing line "N passed, N failed".
#
# Every test program (C binaries build/tests/test_*, Python scripts tests/test_*.py run with
# Debian's /usr/bin/python3, shell scripts tests/cli_*.sh) prints its own "ok"/"FAIL" lines
# and a last line "RESULT <passed> <failed>"; a program that crashes or prints no RESULT
# line counts as one failure.
set -u
BUILD=${BUILD:-build}
export NSA_BIN=${NSA_BIN:-$BUILD/nsa}
export NSA_BUILD=$BUILD
PY=${NSA_PYTHON:-/usr/bin/python3}
passed=0
failed=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT

run_one() {
    local name=$1
    shift
    echo "== $name"
    "$@" >"$log" 2>&1
    local rc=$?
    cat "$log"
    local line
    line=$(grep -E '^RESULT [0-9]+ [0-9]+$' "$log" | tail -n 1)
    if [ -z "$line" ]; then
        echo "FAIL $name: exited $rc without a RESULT line"
        failed=$((failed + 1))
        return
    fi
    set -- $line
    passed=$((passed + $2))
    failed=$((failed + $3))
    if [ "$rc" -ne 0 ] && [ "$3" -eq 0 ]; then
        echo "FAIL $name: exited $rc"
        failed=$((failed + 1))
    fi
}

for t in "$BUILD"/tests/test_*; do
    [ -x "$t" ] || continue
    run_one "$(basename "$t")" "$t"
done
for t in tests/cli_*.sh; do
    [ -f "$t" ] || continue
    run_one "$(basename "$t")" bash "$t"
done
if [ -n "${NSA_SKIP_PY:-}" ]; then
    echo "(python tests skipped: NSA_SKIP_PY is set)"
elif "$PY" -c 'import torch, numpy' 2>/dev/null; then
    for t in tests/test_*.py; do
        [ -f "$t" ] || continue
        run_one "$(basename "$t")" "$PY" "$t"
    done
else
    echo "FAIL python tests: $PY cannot import torch and numpy (apt-get install python3-torch python3-numpy)"
    failed=$((failed + 1))
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
