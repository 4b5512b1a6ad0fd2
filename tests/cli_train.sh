#!/usr/bin/env bash
# cli_train.sh — tests of `nsa train` and `nsa eval` (SPEC §7): training on the built-in
# retrieval task and on token files, the checkpoint / optimizer state / CSV it writes,
# determinism, exact resumption after kill -9 and after Ctrl-C, and bad input.
#
# Tiny models and few steps (the whole file runs in well under two minutes on two cores);
# every run is under `timeout`. A bad run must exit 2 with a message "nsa: ..." naming the
# problem. Prints "ok NAME" / "FAIL NAME: why" per test and a last line
# "RESULT <passed> <failed>".
set -u
NSA_BIN=${NSA_BIN:-build/nsa}
PY=${NSA_PYTHON:-/usr/bin/python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0

RUN_TIMEOUT=60
source "$(dirname "${BASH_SOURCE[0]}")/lib_cli.sh"
# py CODE ARGS...: Python with numpy as np, json, struct, sys imported.
py() {
    local code=$1
    shift
    "$PY" -c "import sys, json, struct
import numpy as np
$code" "$@"
}
# opt_step FILE: the optimizer_step stored in an optimizer state file (-1 if unreadable).
opt_step() {
    py '
try:
    raw = open(sys.argv[1], "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    print(json.loads(raw[8:8 + n])["__metadata__"]["optimizer_step"])
except Exception:
    print(-1)
' "$1"
}
# start_bg OUTPREFIX ARGS...: starts nsa in the background under timeout, inside a
# subshell whose stderr is closed (so the shell's "Killed" notice stays out of the output);
# sets bg_job (the subshell: `wait` on it gives the exit status) and bg_pid (nsa itself).
start_bg() {
    local prefix=$1 timeout_pid=""
    shift
    (
        timeout 60 "$NSA_BIN" "$@" >"$prefix.out" 2>"$prefix.err"
        exit $?
    ) 2>/dev/null &
    bg_job=$!
    bg_pid=""
    for _ in $(seq 1 500); do
        [ -z "$timeout_pid" ] && timeout_pid=$(pgrep -P "$bg_job" 2>/dev/null | head -n 1)
        [ -n "$timeout_pid" ] && bg_pid=$(pgrep -P "$timeout_pid" 2>/dev/null | head -n 1)
        [ -n "$bg_pid" ] && break
        sleep 0.01
    done
}
# wait_for COND...: polls (every 10 ms, at most 20 s) until the command succeeds.
wait_for() {
    for _ in $(seq 1 2000); do
        "$@" && return 0
        sleep 0.01
    done
    return 1
}
csv_rows_at_least() {
    [ -f "$1" ] && [ "$(wc -l <"$1")" -ge "$2" ]
}

if [ ! -x "$NSA_BIN" ]; then
    fail binary "$NSA_BIN is not an executable (run make)"
    echo "RESULT $passed $failed"
    exit 1
fi

TINY=(--embed-dim 16 --hidden-size 16 --num-heads 2 --head-dim 8 --num-layers 1 --window-size 8
    --block-size 4 --compression-ratio 2 --num-selected-blocks 2)
TASK=(--task-seq-len 48 --task-min-distance 16)
FAST=(--steps 20 --batch-size 4 --eval-every 5 --eval-sequences 64 --threads 1)

# ---------------------------------------------------------------------------------------
# Help

run_ok help_train train --help
check help_train_flags has_all "$tmp/out" --data --vocab-size --steps --batch-size --seq-len \
    --lr --seed --out --resume --device --threads --log --no-baseline --quiet --task-seq-len \
    --task-min-distance --embed-dim
run_ok help_eval eval --help
check help_eval_flags has_all "$tmp/out" --checkpoint --data --batch-size --seq-len --max-tokens \
    --json
run_ok help_lists_train --help
check help_lists_train_eval has_all "$tmp/out" train eval

# ---------------------------------------------------------------------------------------
# The retrieval task: checkpoint, optimizer state, CSV, summary.

A="$tmp/task.safetensors"
run_ok task_train train "${TINY[@]}" "${TASK[@]}" "${FAST[@]}" --no-baseline --out "$A"
cp "$tmp/err" "$tmp/task.err"
cp "$tmp/out" "$tmp/task.out"
check task_files_written test -s "$A" -a -s "$A.opt" -a -s "$A.csv"
check task_csv_rows py '
lines = open(sys.argv[1]).read().splitlines()
assert lines[0].split(",")[:2] == ["step", "loss"], lines[0]
steps = [int(l.split(",")[0]) for l in lines[1:]]
assert steps == list(range(1, 21)), steps
assert all(np.isfinite(float(l.split(",")[1])) for l in lines[1:])
' "$A.csv"
check task_progress_lines has_all "$tmp/task.err" "step 5/20" "step 20/20" val_loss val_acc
check task_summary has_all "$tmp/task.out" NSA chance 0.1250
check task_no_baseline_file test ! -e "$tmp/task.window.safetensors"
run_ok task_checkpoint_loads info --checkpoint "$A"
check task_checkpoint_vocab grep -Eq '^  vocab_size +96$' "$tmp/out"
check task_checkpoint_seq_len grep -Eq '^  seq_len +48$' "$tmp/out"
check task_opt_step test "$(opt_step "$A.opt")" = 20

run_ok task_eval eval --checkpoint "$A" --task-min-distance 16 --max-tokens 3072
check task_eval_text grep -Eq '^loss [0-9.]+ perplexity [0-9.]+ accuracy [0-9.]+ chance 0\.1250$' \
    "$tmp/out"
run_ok task_eval_json eval --checkpoint "$A" --task-min-distance 16 --max-tokens 3072 --json
check task_eval_json_values py '
d = json.load(open(sys.argv[1]))
assert d["data"] is None and abs(d["chance"] - 0.125) < 1e-12, d
assert abs(d["perplexity"] - np.exp(d["loss"])) < 1e-6 * d["perplexity"], d
assert 0 <= d["accuracy"] <= 1, d
' "$tmp/out"

# With the window-only baseline (the default): its checkpoint, progress and summary line.
W="$tmp/base.safetensors"
run_ok baseline_train train "${TINY[@]}" "${TASK[@]}" "${FAST[@]}" --out "$W"
check baseline_files test -s "$tmp/base.window.safetensors" -a -s "$tmp/base.window.safetensors.opt"
check baseline_progress grep -q '^baseline step 20/20' "$tmp/err"
check baseline_summary has_all "$tmp/out" NSA "window baseline" chance
check baseline_nsa_same_as_alone cmp -s "$W" "$A"
check baseline_differs_from_nsa py '
a = open(sys.argv[1], "rb").read(); b = open(sys.argv[2], "rb").read()
assert a != b
' "$W" "$tmp/base.window.safetensors"

# The baseline's checkpoint runs as the window-only model it is (its gates are saved set
# to the window), so nsa eval finds the summary's numbers.
grep '^  window baseline' "$tmp/out" >"$tmp/base.summary"
run_ok baseline_eval eval --checkpoint "$tmp/base.window.safetensors" --task-min-distance 16 \
    --max-tokens 3072 --json
check baseline_eval_matches_summary py '
d = json.load(open(sys.argv[1]))
words = open(sys.argv[2]).read().split()
acc, loss = float(words[2]), float(words[4])
assert abs(d["accuracy"] - acc) < 1e-4 and abs(d["loss"] - loss) < 2e-4, (d, words)
' "$tmp/out" "$tmp/base.summary"

run_ok custom_log train "${TINY[@]}" "${TASK[@]}" "${FAST[@]}" --steps 3 --no-baseline --quiet \
    --log "$tmp/custom.csv" --out "$tmp/custom.safetensors"
check custom_log_written test "$(wc -l <"$tmp/custom.csv")" -eq 4 \
    -a ! -e "$tmp/custom.safetensors.csv"

run_ok quiet_train train "${TINY[@]}" "${TASK[@]}" "${FAST[@]}" --no-baseline --quiet \
    --out "$tmp/quiet.safetensors"
check quiet_no_stderr test ! -s "$tmp/err"
check quiet_summary grep -q chance "$tmp/out"

# A terminal gets the live progress bar (when `script` is there to provide one).
if command -v script >/dev/null 2>&1; then
    timeout 60 script -qec "$NSA_BIN train ${TINY[*]} ${TASK[*]} ${FAST[*]} --no-baseline \
        --out $tmp/tty.safetensors" /dev/null >"$tmp/tty.txt" 2>&1
    check tty_progress_bar py '
s = open(sys.argv[1], "rb").read().decode("utf-8", "replace")
assert "\r[" in s and "ETA" in s and "step 20/20" in s, s[-400:]
' "$tmp/tty.txt"
fi

# ---------------------------------------------------------------------------------------
# Determinism: the same command gives the same bytes (at the same thread count).

run_ok determinism_run1 train "${TINY[@]}" "${TASK[@]}" "${FAST[@]}" --no-baseline --quiet \
    --out "$tmp/d1.safetensors"
run_ok determinism_run2 train "${TINY[@]}" "${TASK[@]}" "${FAST[@]}" --no-baseline --quiet \
    --out "$tmp/d2.safetensors"
check determinism_same_checkpoint cmp "$tmp/d1.safetensors" "$tmp/d2.safetensors"
check determinism_same_opt cmp "$tmp/d1.safetensors.opt" "$tmp/d2.safetensors.opt"
run_ok determinism_threads2_run1 train "${TINY[@]}" "${TASK[@]}" "${FAST[@]}" --threads 2 \
    --no-baseline --quiet --out "$tmp/t1.safetensors"
run_ok determinism_threads2_run2 train "${TINY[@]}" "${TASK[@]}" "${FAST[@]}" --threads 2 \
    --no-baseline --quiet --out "$tmp/t2.safetensors"
check determinism_threads2_same cmp "$tmp/t1.safetensors" "$tmp/t2.safetensors"
run_ok other_seed train "${TINY[@]}" "${TASK[@]}" "${FAST[@]}" --no-baseline --quiet --seed 7 \
    --out "$tmp/s7.safetensors"
check other_seed_differs py '
assert open(sys.argv[1], "rb").read() != open(sys.argv[2], "rb").read()
' "$tmp/d1.safetensors" "$tmp/s7.safetensors"

# ---------------------------------------------------------------------------------------
# Resumption: a run killed (-9) or interrupted (Ctrl-C) and resumed ends byte-identical
# to a straight one. A model of ~50 ms a step, so the kill lands mid-run.

RES=(--embed-dim 32 --hidden-size 32 --num-heads 2 --head-dim 16 --num-layers 2 --window-size 8
    --block-size 4 --compression-ratio 2 --num-selected-blocks 2 --task-seq-len 128
    --task-min-distance 16 --steps 30 --batch-size 8 --checkpoint-every 5 --eval-every 10
    --eval-sequences 32 --threads 1 --no-baseline --quiet)
R="$tmp/straight.safetensors"
run_ok resume_straight_run train "${RES[@]}" --out "$R"

K="$tmp/killed.safetensors"
start_bg "$tmp/killed" train "${RES[@]}" --out "$K"
# The model file is written after the state file: once it exists, a checkpoint is whole.
wait_for test -f "$K"
[ -n "$bg_pid" ] && kill -9 "$bg_pid" 2>/dev/null
wait "$bg_job"
bg_rc=$?
killed_step=$(opt_step "$K.opt")
if [ "$bg_rc" -eq 137 ] && [ "$killed_step" -ge 5 ] && [ "$killed_step" -lt 30 ]; then
    ok resume_killed_midway
else
    fail resume_killed_midway "exit $bg_rc, state at step $killed_step (want killed before 30)"
fi
run_ok resume_after_kill train "${RES[@]}" --out "$K" --resume
check resume_after_kill_same_model cmp "$R" "$K"
check resume_after_kill_same_state cmp "$R.opt" "$K.opt"

I="$tmp/interrupted.safetensors"
start_bg "$tmp/interrupted" train "${RES[@]}" --out "$I"
wait_for csv_rows_at_least "$I.csv" 3 # the header and two steps
[ -n "$bg_pid" ] && kill -INT "$bg_pid" 2>/dev/null
wait "$bg_job"
bg_rc=$?
if [ "$bg_rc" -eq 130 ]; then ok sigint_exit_130; else
    fail sigint_exit_130 "exit $bg_rc: $(head -c 400 "$tmp/interrupted.err")"; fi
check sigint_message grep -Eq "^nsa: interrupted at step [0-9]+; checkpoint saved to \
.*interrupted\.safetensors; continue with --resume$" "$tmp/interrupted.err"
int_step=$(opt_step "$I.opt")
if [ "$int_step" -ge 1 ] && [ "$int_step" -lt 30 ]; then ok sigint_state_midway; else
    fail sigint_state_midway "state at step $int_step"; fi
run_ok sigint_checkpoint_loads info --checkpoint "$I"
run_ok sigint_resume train "${RES[@]}" --out "$I" --resume
check sigint_resume_same_model cmp "$R" "$I"

# Resuming a finished run changes nothing.
cp "$R" "$tmp/straight_copy.safetensors"
run_ok resume_finished_noop train "${RES[@]}" --out "$R" --resume
check resume_finished_unchanged cmp "$R" "$tmp/straight_copy.safetensors"
# The model options come from the checkpoint: none needed, the same ones accepted.
run_ok resume_without_model_options train --task-seq-len 128 --task-min-distance 16 --steps 30 \
    --threads 1 --no-baseline --quiet --out "$R" --resume
# Extending a finished run continues it.
run_ok resume_extend train "${RES[@]}" --steps 32 --out "$R" --resume
check resume_extend_step test "$(opt_step "$R.opt")" = 32

# ---------------------------------------------------------------------------------------
# Token files: bytes, int32 / uint16 .npy, raw uint16 .bin.

py '
d = sys.argv[1]
text = ("Native sparse attention mixes a compressed view of the whole context, a few "
        "selected blocks and a sliding window. ") * 60
open(d + "/text.txt", "w").write(text)
rng = np.random.default_rng(5)
tok = rng.integers(0, 50, size=4000)
np.save(d + "/tok32.npy", tok.astype(np.int32))
np.save(d + "/tok16.npy", tok.astype(np.uint16))
tok.astype("<u2").tofile(d + "/tok.bin")
np.save(d + "/tok_float.npy", tok.astype(np.float32))
bad = tok.copy(); bad[1234] = 60
np.save(d + "/tok_big.npy", bad.astype(np.int32))
open(d + "/odd.bin", "wb").write(b"\x01\x00\x02\x00\x03")
open(d + "/short.txt", "w").write("only twenty bytes!!!")
' "$tmp"
DATA=(--steps 10 --batch-size 4 --seq-len 32 --eval-every 5 --threads 1)

run_ok data_text train "${TINY[@]}" "${DATA[@]}" --data "$tmp/text.txt" \
    --out "$tmp/text.safetensors"
check data_text_val_loss grep -Eq 'val_loss [0-9.]+ \(perplexity [0-9.]+\)' "$tmp/out"
check data_text_progress grep -q 'step 10/10 .*val_loss' "$tmp/err"
check data_text_no_baseline test ! -e "$tmp/text.window.safetensors"
run_ok data_text_info info --checkpoint "$tmp/text.safetensors"
check data_text_vocab_256 grep -Eq '^  vocab_size +256$' "$tmp/out"
run_ok data_text_eval eval --checkpoint "$tmp/text.safetensors" --data "$tmp/text.txt"
check data_text_eval_out grep -Eq '^loss [0-9.]+ perplexity [0-9.]+$' "$tmp/out"
run_ok data_text_eval_json eval --checkpoint "$tmp/text.safetensors" --data "$tmp/text.txt" \
    --max-tokens 1000 --json
check data_text_eval_json_values py '
d = json.load(open(sys.argv[1]))
assert d["accuracy"] is None and d["chance"] is None and d["data"].endswith("text.txt"), d
assert d["loss"] > 0 and abs(d["perplexity"] - np.exp(d["loss"])) < 1e-6 * d["perplexity"], d
' "$tmp/out"

for f in tok32.npy tok16.npy tok.bin; do
    name=data_${f//./_}
    run_ok "$name" train "${TINY[@]}" "${DATA[@]}" --vocab-size 50 --data "$tmp/$f" \
        --out "$tmp/$name.safetensors"
    check "${name}_val_loss" grep -Eq 'val_loss [0-9.]+' "$tmp/out"
    run_ok "${name}_eval" eval --checkpoint "$tmp/$name.safetensors" --data "$tmp/$f"
    check "${name}_eval_out" grep -Eq '^loss [0-9.]+ perplexity [0-9.]+$' "$tmp/out"
done
# A data run continues with --resume (seq_len and vocab_size from the checkpoint).
run_ok data_resume_short train "${TINY[@]}" "${DATA[@]}" --steps 6 --vocab-size 50 \
    --data "$tmp/tok.bin" --out "$tmp/data_resume.safetensors" --quiet
run_ok data_resume_extend train --steps 10 --batch-size 4 --threads 1 --data "$tmp/tok.bin" \
    --out "$tmp/data_resume.safetensors" --resume
check data_resume_extend_step test "$(opt_step "$tmp/data_resume.safetensors.opt")" = 10
check data_resume_extend_seq_len grep -q 'batch 4 x 32 tokens' "$tmp/err"
# The same tokens in three containers train the same model.
check data_formats_agree cmp "$tmp/data_tok32_npy.safetensors" "$tmp/data_tok_bin.safetensors"
check data_formats_agree_u16 cmp "$tmp/data_tok16_npy.safetensors" "$tmp/data_tok_bin.safetensors"

# ---------------------------------------------------------------------------------------
# Bad input: exit 2, "nsa: ..." naming the problem.

expect_fail bad_missing_data 'missing\.txt' train "${TINY[@]}" "${DATA[@]}" \
    --data "$tmp/missing.txt" --out "$tmp/x.safetensors"
expect_fail bad_token_too_big 'token 60.*1234|1234.*60' train "${TINY[@]}" "${DATA[@]}" \
    --vocab-size 50 --data "$tmp/tok_big.npy" --out "$tmp/x.safetensors"
expect_fail bad_bin_odd_size 'odd' train "${TINY[@]}" "${DATA[@]}" --vocab-size 50 \
    --data "$tmp/odd.bin" --out "$tmp/x.safetensors"
expect_fail bad_data_too_short 'seq_len|seq-len' train "${TINY[@]}" "${DATA[@]}" \
    --data "$tmp/short.txt" --out "$tmp/x.safetensors"
expect_fail bad_float_tokens 'float|int32' train "${TINY[@]}" "${DATA[@]}" --vocab-size 50 \
    --data "$tmp/tok_float.npy" --out "$tmp/x.safetensors"
expect_fail bad_text_vocab 'token|vocab' train "${TINY[@]}" "${DATA[@]}" --vocab-size 50 \
    --data "$tmp/text.txt" --out "$tmp/x.safetensors"
expect_fail bad_steps_0 'steps' train "${TINY[@]}" "${TASK[@]}" --steps 0 --out "$tmp/x.safetensors"
expect_fail bad_lr_negative 'lr' train "${TINY[@]}" "${TASK[@]}" --lr -1 --out "$tmp/x.safetensors"
expect_fail bad_lr_text 'lr' train "${TINY[@]}" "${TASK[@]}" --lr fast --out "$tmp/x.safetensors"
expect_fail bad_batch_size_0 'batch-size' train "${TINY[@]}" "${TASK[@]}" --batch-size 0 \
    --out "$tmp/x.safetensors"
expect_fail bad_val_fraction_1 'val-fraction' train "${TINY[@]}" "${DATA[@]}" --val-fraction 1 \
    --data "$tmp/text.txt" --out "$tmp/x.safetensors"
expect_fail bad_task_flag_with_data 'task-pairs' train "${TINY[@]}" "${DATA[@]}" --task-pairs 2 \
    --data "$tmp/text.txt" --out "$tmp/x.safetensors"
expect_fail bad_task_config 'min_distance|seq_len' train "${TINY[@]}" --task-seq-len 20 \
    --out "$tmp/x.safetensors"
expect_fail bad_model_option 'num_kv_heads' train "${TINY[@]}" "${TASK[@]}" --num-kv-heads 3 \
    --out "$tmp/x.safetensors"
expect_fail bad_unknown_flag 'unknown flag --frobnicate' train "${TINY[@]}" --frobnicate 3
expect_fail bad_resume_missing 'nothing\.safetensors' train "${TINY[@]}" "${TASK[@]}" --resume \
    --out "$tmp/nothing.safetensors"
run_ok init_plain init "${TINY[@]}" --vocab-size 96 --out "$tmp/plain.safetensors"
expect_fail bad_resume_no_state 'plain\.safetensors\.opt' train "${TASK[@]}" --resume \
    --out "$tmp/plain.safetensors"
cp "$A" "$tmp/corrupt.safetensors"
head -c 1000 "$A.opt" >"$tmp/corrupt.safetensors.opt"
expect_fail bad_resume_corrupt_state 'corrupt\.safetensors\.opt' train "${TASK[@]}" "${FAST[@]}" \
    --resume --out "$tmp/corrupt.safetensors"
cp "$A" "$tmp/conflict.safetensors"
cp "$A.opt" "$tmp/conflict.safetensors.opt"
expect_fail bad_resume_conflict 'hidden-size 32.*hidden_size 16' train "${TINY[@]}" \
    --hidden-size 32 "${TASK[@]}" "${FAST[@]}" --resume --out "$tmp/conflict.safetensors"
expect_fail bad_resume_conflict_preset 'preset paper' train --preset paper "${TASK[@]}" \
    "${FAST[@]}" --resume --out "$tmp/conflict.safetensors"
expect_fail bad_resume_conflict_vocab 'vocab' train "${TASK[@]}" "${FAST[@]}" --vocab-size 200 \
    --resume --out "$tmp/conflict.safetensors"
expect_fail bad_resume_other_seed 'seed' train "${TASK[@]}" "${FAST[@]}" --steps 25 --seed 3 \
    --resume --out "$tmp/conflict.safetensors"
check bad_resume_left_checkpoint cmp "$A" "$tmp/conflict.safetensors"
expect_fail eval_no_checkpoint 'checkpoint' eval --data "$tmp/text.txt"
expect_fail eval_missing_data 'missing\.txt' eval --checkpoint "$A" --data "$tmp/missing.txt"
run_ok init_features init --embed-dim 8 --hidden-size 8 --num-heads 2 --head-dim 4 \
    --num-layers 1 --out "$tmp/features.safetensors"
expect_fail eval_not_lm 'language model|vocab_size' eval --checkpoint "$tmp/features.safetensors" \
    --data "$tmp/text.txt"
expect_fail eval_token_too_big 'token' eval --checkpoint "$tmp/data_tok32_npy.safetensors" \
    --data "$tmp/text.txt"

echo "RESULT $passed $failed"
[ "$failed" -eq 0 ]
