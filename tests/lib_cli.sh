# lib_cli.sh — helpers the command-line test scripts share (sourced after they set NSA_BIN,
# tmp, passed=0, failed=0; RUN_TIMEOUT, seconds per nsa run, defaults to 60):
#   ok NAME / fail NAME WHY        count and print "ok NAME" / "FAIL NAME: WHY"
#   check NAME COMMAND...          ok when the command succeeds
#   run ARGS...                    runs nsa: rc, $tmp/out (stdout), $tmp/err (stderr)
#   run_ok NAME ARGS...            the run must exit 0
#   expect_fail NAME PATTERN ARGS...
#                                  exit 2, stderr starting with "nsa: " and matching the
#                                  extended regex PATTERN (case-insensitive)
#   expect_fail_out NAME PATTERN OUTFILE ARGS...
#                                  the same, and no file OUTFILE* left behind (removed first)
#   has_all FILE STRING...         every string occurs in FILE

ok() {
    echo "ok $1"
    passed=$((passed + 1))
}
fail() {
    echo "FAIL $1: $2"
    failed=$((failed + 1))
}
check() {
    local name=$1
    shift
    if "$@"; then ok "$name"; else fail "$name" "check failed (see above)"; fi
}
run() {
    timeout "${RUN_TIMEOUT:-60}" "$NSA_BIN" "$@" >"$tmp/out" 2>"$tmp/err"
    rc=$?
}
run_ok() {
    local name=$1
    shift
    run "$@"
    if [ "$rc" -eq 0 ]; then ok "$name"; else fail "$name" "exit $rc: $(head -c 600 "$tmp/err")"; fi
}
expect_fail_out() {
    local name=$1 pattern=$2 outfile=$3
    shift 3
    [ -n "$outfile" ] && rm -f "$outfile"
    run "$@"
    local why=""
    if [ "$rc" -eq 124 ]; then
        why="timed out"
    elif [ "$rc" -ge 128 ]; then
        why="crashed (exit $rc)"
    elif [ "$rc" -ne 2 ]; then
        why="exit $rc, expected 2"
    elif ! head -n 1 "$tmp/err" | grep -q '^nsa: '; then
        why="stderr does not start with 'nsa: '"
    elif ! grep -Eqi -- "$pattern" "$tmp/err"; then
        why="message does not match /$pattern/"
    elif [ -n "$outfile" ] && compgen -G "$outfile*" >/dev/null; then
        why="output file left behind: $(ls "$outfile"*)"
    fi
    if [ -z "$why" ]; then ok "$name"; else fail "$name" "$why: $(head -c 600 "$tmp/err")"; fi
}
expect_fail() {
    local name=$1 pattern=$2
    shift 2
    expect_fail_out "$name" "$pattern" "" "$@"
}
has_all() {
    local file=$1 s
    shift
    for s in "$@"; do
        grep -qF -- "$s" "$file" || return 1
    done
}
