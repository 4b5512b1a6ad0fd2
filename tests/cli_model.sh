#!/usr/bin/env bash
# cli_model.sh — tests of the `nsa` program's model commands (info, init, forward; SPEC §7).
#
# Runs $NSA_BIN (default build/nsa) on good and bad input. A good run must exit 0 with the
# right values and shapes (inputs written and outputs read with /usr/bin/python3 + numpy);
# a bad one must exit 2 with a message "nsa: ..." naming the problem, without a crash or a
# hang (every run is under `timeout 20`) and without leaving an output file behind.
# Prints "ok NAME" / "FAIL NAME: why" per test and a last line "RESULT <passed> <failed>".
set -u
NSA_BIN=${NSA_BIN:-build/nsa}
PY=${NSA_PYTHON:-/usr/bin/python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/o"
passed=0
failed=0

RUN_TIMEOUT=20
source "$(dirname "${BASH_SOURCE[0]}")/lib_cli.sh"
# py CODE ARGS...: Python with numpy as np, json, struct, sys imported.
py() {
    local code=$1
    shift
    "$PY" -c "import sys, json, struct
import numpy as np
$code" "$@"
}

if [ ! -x "$NSA_BIN" ]; then
    fail binary "$NSA_BIN is not an executable (run make)"
    echo "RESULT $passed $failed"
    exit 1
fi

SMALL=(--embed-dim 64 --hidden-size 32 --num-heads 4 --head-dim 8 --num-layers 2)
OPTIONS=(embed_dim hidden_size num_heads head_dim window_size block_size num_selected_blocks
    compression_ratio num_layers dropout seq_len num_kv_heads compression_block compress
    select_score select_fixed gate rope_theta vocab_size)

# ---------------------------------------------------------------------------------------
# Help and usage

run_ok help --help
check help_lists_commands grep -q 'forward' "$tmp/out"
run_ok version --version
check version_text grep -Eq '^nsa [0-9]+\.[0-9]+\.[0-9]+' "$tmp/out"
for cmd in info init forward; do
    run_ok "help_$cmd" "$cmd" --help
done
run info --help
missing=""
for o in "${OPTIONS[@]}"; do
    grep -q -- "--${o//_/-} " "$tmp/out" || missing="$missing $o"
done
if [ -z "$missing" ] && grep -q 'default' "$tmp/out"; then ok help_info_every_option; else
    fail help_info_every_option "missing:$missing"; fi
run forward --help
check help_forward_flags has_all "$tmp/out" --checkpoint --input --output --all --threads
run init --help
check help_init_flags has_all "$tmp/out" --seed --out --threads

run
if [ "$rc" -eq 2 ]; then ok no_command; else fail no_command "exit $rc"; fi
expect_fail_out unknown_command 'frobnicate' "" frobnicate
expect_fail_out unknown_flag 'bogus' "" info "${SMALL[@]}" --bogus 3
expect_fail_out missing_value 'hidden.size' "" info --embed-dim 4 --hidden-size
expect_fail_out value_is_flag 'hidden.size' "" info --embed-dim 4 --hidden-size --json
expect_fail_out positional_arg 'stray' "" info "${SMALL[@]}" stray
expect_fail_out switch_with_value 'json' "" info "${SMALL[@]}" --json=1
expect_fail_out bad_preset 'preset' "" info --embed-dim 4 --preset nope
expect_fail_out bad_threads 'threads' "" info "${SMALL[@]}" --threads abc
expect_fail_out negative_threads 'threads' "" info "${SMALL[@]}" --threads -1
expect_fail_out bad_device 'device' "" info "${SMALL[@]}" --device tpu
expect_fail_out bad_precision 'precision fp8' "" info "${SMALL[@]}" --precision fp8
expect_fail_out bf16_needs_cuda 'precision bf16.*device cuda' "" info "${SMALL[@]}" --precision bf16
run_ok precision_fp32 info "${SMALL[@]}" --precision fp32
# cuda: works where the build and machine have it, else exit 1 with a message.
run info "${SMALL[@]}" --device cuda
if [ "$rc" -eq 0 ] || { [ "$rc" -eq 1 ] && head -n 1 "$tmp/err" | grep -q '^nsa: '; }; then
    ok device_cuda_or_message
else
    fail device_cuda_or_message "exit $rc: $(head -c 300 "$tmp/err")"
fi

# ---------------------------------------------------------------------------------------
# info

run_ok info_text info "${SMALL[@]}"
check info_text_param_count grep -Eq '^param_count +27558$' "$tmp/out"
check info_text_tensors has_all "$tmp/out" layers.1.ffn.down.weight in_proj.weight \
    final_norm.bias

run_ok info_json info "${SMALL[@]}" --json
cp "$tmp/out" "$tmp/info_small.json"
check info_json_values py '
d = json.load(open(sys.argv[1]))
opts = sys.argv[2].split()
assert all(o in d for o in opts), [o for o in opts if o not in d]
want = dict(embed_dim=64, hidden_size=32, num_heads=4, head_dim=8, num_layers=2,
            window_size=64, block_size=16, num_selected_blocks=8, compression_ratio=4,
            seq_len=256, num_kv_heads=4, compression_block=4, vocab_size=0,
            compress="mean", select_score="mean_key", select_fixed="none", gate="static",
            param_count=27558, output_size=32, total_params=27558)
for k, v in want.items():
    assert d[k] == v, (k, d[k], v)
assert abs(float(d["dropout"]) - 0.1) < 1e-12 and float(d["rope_theta"]) == 0
' "$tmp/info_small.json" "${OPTIONS[*]}"

# param_count against the SPEC §4 formula, with and without in_proj.
for cfg in "64 32 4 8 2" "32 32 4 8 2" "16 48 2 12 3" "7 5 3 2 1"; do
    set -- $cfg
    run info --embed-dim "$1" --hidden-size "$2" --num-heads "$3" --head-dim "$4" \
        --num-layers "$5" --json
    check "info_param_count_${cfg// /_}" py '
E, D, H, d, N = map(int, sys.argv[2:7])
Hd = H * d
per = 3*(D*Hd + Hd) + (Hd*D + D) + 3 + 2*2*D + (D*4*D + 4*D) + (4*D*D + D)
total = (E*D + D if E != D else 0) + N*per + 2*D
got = json.load(open(sys.argv[1]))
assert got["param_count"] == total, (got["param_count"], total)
assert got["output_size"] == D
' "$tmp/out" $cfg
done
set --

run_ok info_equals_syntax info --embed-dim=64 --hidden-size=32 --num-heads=4 --head-dim=8 \
    --num-layers=2 --json
check info_equals_same cmp -s "$tmp/out" "$tmp/info_small.json"

run_ok info_paper_preset info --preset paper --embed-dim 64 --num-heads 8 --json
check info_paper_values py '
d = json.load(open(sys.argv[1]))
want = dict(num_kv_heads=2, compression_block=32, compression_ratio=16, block_size=64,
            num_selected_blocks=16, select_fixed="paper", window_size=512, compress="mlp",
            select_score="cmp_attn", gate="token")
for k, v in want.items():
    assert d[k] == v, (k, d[k], v)
assert float(d["rope_theta"]) == 10000
' "$tmp/out"
# --preset applies first, wherever it is written.
run_ok info_preset_order info --embed-dim 64 --num-heads 8 --window-size 7 --preset paper --json
check info_preset_order_value py '
assert json.load(open(sys.argv[1]))["window_size"] == 7' "$tmp/out"

expect_fail_out info_missing_embed_dim 'embed.dim' "" info --hidden-size 32
expect_fail_out info_missing_embed_dim_json 'embed.dim' "" info --json

# ---------------------------------------------------------------------------------------
# Every rule of SPEC §1 broken: info and init refuse, naming the option.

RULES=(
    "embed_dim|--embed-dim 0"
    "hidden_size|--embed-dim 8 --hidden-size 0"
    "num_heads|--embed-dim 8 --num-heads 0"
    "head_dim|--embed-dim 8 --head-dim 0"
    "window_size|--embed-dim 8 --window-size 0"
    "block_size|--embed-dim 8 --block-size 0"
    "num_selected_blocks|--embed-dim 8 --num-selected-blocks 0"
    "compression_ratio|--embed-dim 8 --compression-ratio 0"
    "num_layers|--embed-dim 8 --num-layers 0"
    "dropout|--embed-dim 8 --dropout 1"
    "dropout|--embed-dim 8 --dropout -0.1"
    "dropout|--embed-dim 8 --dropout nan"
    "seq_len|--embed-dim 8 --seq-len 0"
    "num_kv_heads|--embed-dim 8 --num-heads 4 --num-kv-heads 3"
    "num_kv_heads|--embed-dim 8 --num-heads 4 --num-kv-heads -1"
    "compression_block|--embed-dim 8 --compression-ratio 4 --compression-block 6"
    "compress|--embed-dim 8 --compress median"
    "select_score|--embed-dim 8 --select-score best"
    "select_score|--embed-dim 8 --select-score cmp_attn --block-size 6 --compression-ratio 4"
    "select_fixed|--embed-dim 8 --select-fixed always"
    "select_fixed|--embed-dim 8 --select-fixed paper --num-selected-blocks 2"
    "gate|--embed-dim 8 --gate dynamic"
    "rope_theta|--embed-dim 8 --rope-theta -1"
    "rope_theta|--embed-dim 8 --rope-theta nan"
    "rope_theta|--embed-dim 8 --rope-theta 10000 --head-dim 7"
    "vocab_size|--embed-dim 8 --vocab-size -1"
    "hidden_size|--embed-dim 8 --hidden-size abc"
    "hidden_size|--embed-dim 8 --hidden-size 12x"
    "hidden_size|--embed-dim 8 --hidden-size 99999999999999999999"
    "num_heads|--embed-dim 8 --num-heads 1.5"
)
i=0
for rule in "${RULES[@]}"; do
    opt=${rule%%|*}
    args=${rule#*|}
    pattern="${opt//_/[-_]}"
    # shellcheck disable=SC2086
    expect_fail_out "rule_info_${i}_$opt" "$pattern" "" info $args
    # shellcheck disable=SC2086
    expect_fail_out "rule_init_${i}_$opt" "$pattern" "$tmp/o/rule.safetensors" init $args \
        --out "$tmp/o/rule.safetensors"
    i=$((i + 1))
done

# ---------------------------------------------------------------------------------------
# init: determinism, the file's contents, usage errors

M="$tmp/small.safetensors"
run_ok init_small init "${SMALL[@]}" --seed 1 --out "$M"
run_ok init_same_seed init "${SMALL[@]}" --seed 1 --out "$tmp/small_again.safetensors"
check init_deterministic cmp -s "$M" "$tmp/small_again.safetensors"
run_ok init_other_seed init "${SMALL[@]}" --seed 2 --out "$tmp/small_seed2.safetensors"
check init_seeds_differ bash -c "! cmp -s '$M' '$tmp/small_seed2.safetensors'"
run_ok init_default_seed init "${SMALL[@]}" --out "$tmp/small_default.safetensors"
run_ok init_seed_zero init "${SMALL[@]}" --seed 0 --out "$tmp/small_zero.safetensors"
check init_default_seed_is_0 cmp -s "$tmp/small_default.safetensors" "$tmp/small_zero.safetensors"
check init_no_temp_left bash -c "[ \$(ls '$tmp' | grep -c '\.tmp') -eq 0 ]"
check init_safetensors_layout py '
raw = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
h = json.loads(raw[8:8 + n])
meta = h.pop("__metadata__")
opts = sys.argv[2].split()
assert all(o in meta and isinstance(meta[o], str) for o in opts), meta
assert meta["embed_dim"] == "64" and meta["hidden_size"] == "32"
total = 0
for name, t in h.items():
    assert t["dtype"] == "F32", name
    b, e = t["data_offsets"]
    assert e - b == 4 * int(np.prod(t["shape"])), name
    total += int(np.prod(t["shape"]))
assert total == 27558, total
assert h["in_proj.weight"]["shape"] == [32, 64]
assert h["layers.1.attn.q_proj.weight"]["shape"] == [32, 32]
assert h["layers.0.ffn.up.weight"]["shape"] == [128, 32]
assert h["layers.0.attn.gate"]["shape"] == [3]
def arr(name):
    b, e = h[name]["data_offsets"]
    return np.frombuffer(raw[8 + n + b:8 + n + e], dtype="<f4")
assert np.all(arr("final_norm.weight") == 1) and np.all(arr("final_norm.bias") == 0)
w = arr("in_proj.weight")
lim = (6 / (64 + 32)) ** 0.5
assert np.all(np.abs(w) <= lim) and np.std(w) > lim / 4
' "$M" "${OPTIONS[*]}"

run_ok info_checkpoint_json info --checkpoint "$M" --json
check info_checkpoint_same cmp -s "$tmp/out" "$tmp/info_small.json"
run_ok info_checkpoint_text info --checkpoint "$M"
check info_checkpoint_text_count grep -Eq '^param_count +27558$' "$tmp/out"

expect_fail_out init_missing_out '--out' "" init "${SMALL[@]}"
expect_fail_out init_missing_embed_dim 'embed.dim' "$tmp/o/m.safetensors" init --out \
    "$tmp/o/m.safetensors"
expect_fail_out init_bad_seed 'seed' "$tmp/o/m.safetensors" init "${SMALL[@]}" --seed abc \
    --out "$tmp/o/m.safetensors"
expect_fail_out init_negative_seed 'seed' "$tmp/o/m.safetensors" init "${SMALL[@]}" --seed -1 \
    --out "$tmp/o/m.safetensors"
expect_fail_out init_unknown_flag 'colour' "$tmp/o/m.safetensors" init "${SMALL[@]}" --colour red \
    --out "$tmp/o/m.safetensors"
expect_fail_out info_checkpoint_and_options 'checkpoint' "" info --checkpoint "$M" --hidden-size 8
run init "${SMALL[@]}" --out "$tmp/no/such/dir/m.safetensors"
if [ "$rc" -eq 1 ] && grep -q '^nsa: ' "$tmp/err"; then ok init_unwritable_exit_1; else
    fail init_unwritable_exit_1 "exit $rc: $(head -c 300 "$tmp/err")"; fi

# ---------------------------------------------------------------------------------------
# forward

py '
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 5, 64)).astype(np.float32)
np.save(sys.argv[1] + "/x.npy", x)
np.save(sys.argv[1] + "/x64.npy", x.astype(np.float64))
np.save(sys.argv[1] + "/x2d.npy", x[1])
np.save(sys.argv[1] + "/x_t1.npy", x[:, :1])
np.save(sys.argv[1] + "/x_t37.npy", rng.standard_normal((1, 37, 64)).astype(np.float32))
' "$tmp"
Y="$tmp/y.npy"
run_ok forward_last forward --checkpoint "$M" --input "$tmp/x.npy" --output "$Y"
check forward_last_shape py '
y = np.load(sys.argv[1])
assert y.dtype == np.float32 and y.shape == (2, 32), (y.dtype, y.shape)
assert np.all(np.isfinite(y)) and np.std(y) > 0.1
' "$Y"
run_ok forward_all forward --checkpoint "$M" --input "$tmp/x.npy" --output "$tmp/y_all.npy" --all
check forward_all_shape py '
y, ya = np.load(sys.argv[1]), np.load(sys.argv[2])
assert ya.dtype == np.float32 and ya.shape == (2, 5, 32), ya.shape
assert np.allclose(ya[:, -1], y, atol=1e-5), np.abs(ya[:, -1] - y).max()
' "$Y" "$tmp/y_all.npy"
run_ok forward_f64 forward --checkpoint "$M" --input "$tmp/x64.npy" --output "$tmp/y64.npy"
check forward_f64_same py '
a, b = np.load(sys.argv[1]), np.load(sys.argv[2])
assert b.dtype == np.float32 and np.allclose(a, b, atol=1e-6)
' "$Y" "$tmp/y64.npy"
run_ok forward_2d forward --checkpoint "$M" --input "$tmp/x2d.npy" --output "$tmp/y2d.npy" --all
check forward_2d_shape py '
ya, y2 = np.load(sys.argv[1]), np.load(sys.argv[2])
assert y2.shape == (5, 32), y2.shape
assert np.allclose(ya[1], y2, atol=1e-5)
' "$tmp/y_all.npy" "$tmp/y2d.npy"
run_ok forward_t1 forward --checkpoint "$M" --input "$tmp/x_t1.npy" --output "$tmp/y1.npy"
check forward_t1_shape py 'assert np.load(sys.argv[1]).shape == (2, 32)' "$tmp/y1.npy"
run_ok forward_t37 forward --checkpoint "$M" --input "$tmp/x_t37.npy" --output "$tmp/y37.npy" \
    --all --threads 2
check forward_t37_shape py '
y = np.load(sys.argv[1]); assert y.shape == (1, 37, 32) and np.all(np.isfinite(y))' "$tmp/y37.npy"
run_ok forward_again forward --checkpoint "$M" --input "$tmp/x.npy" --output "$tmp/y_again.npy"
check forward_deterministic cmp -s "$Y" "$tmp/y_again.npy"
check forward_no_temp_left bash -c "[ \$(ls '$tmp' | grep -c '\.tmp') -eq 0 ]"

run forward --checkpoint "$M" --input "$tmp/x.npy" --output "$tmp/no/such/dir/y.npy"
if [ "$rc" -eq 1 ] && grep -q '^nsa: ' "$tmp/err"; then ok forward_unwritable_exit_1; else
    fail forward_unwritable_exit_1 "exit $rc: $(head -c 300 "$tmp/err")"; fi

O="$tmp/o/y.npy"
expect_fail_out forward_missing_checkpoint_flag 'checkpoint' "$O" forward --input "$tmp/x.npy" \
    --output "$O"
expect_fail_out forward_missing_input_flag 'input' "$O" forward --checkpoint "$M" --output "$O"
expect_fail_out forward_missing_output_flag 'output' "" forward --checkpoint "$M" --input "$tmp/x.npy"
expect_fail_out forward_model_option 'hidden.size' "$O" forward --checkpoint "$M" \
    --input "$tmp/x.npy" --output "$O" --hidden-size 8
expect_fail_out forward_no_checkpoint 'nope\.safetensors' "$O" forward --checkpoint \
    "$tmp/nope.safetensors" --input "$tmp/x.npy" --output "$O"
expect_fail_out forward_no_input 'nope\.npy' "$O" forward --checkpoint "$M" --input \
    "$tmp/nope.npy" --output "$O"
expect_fail_out forward_checkpoint_is_dir "$(basename "$tmp")" "$O" forward --checkpoint "$tmp" \
    --input "$tmp/x.npy" --output "$O"

# Bad inputs for a feature model: shape, dtype, values.
py '
d = sys.argv[1]
rng = np.random.default_rng(1)
x = rng.standard_normal((2, 5, 64)).astype(np.float32)
np.save(d + "/last63.npy", rng.standard_normal((2, 5, 63)).astype(np.float32))
np.save(d + "/ndim4.npy", x[..., None])
np.save(d + "/ndim1.npy", x[0, 0])
np.save(d + "/empty_b.npy", x[:0])
np.save(d + "/empty_t.npy", x[:, :0])
np.save(d + "/int8.npy", (x * 10).astype(np.int8))
np.save(d + "/int32.npy", (x * 10).astype(np.int32))
np.save(d + "/f16.npy", x.astype(np.float16))
np.save(d + "/str.npy", np.array([["ab", "cd"]]))
np.save(d + "/bool.npy", x > 0)
np.save(d + "/obj.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
for name, v in (("nan", np.nan), ("inf", np.inf), ("ninf", -np.inf)):
    y = x.copy(); y[1, 3, 7] = v; np.save(d + "/" + name + ".npy", y)
y = x.astype(np.float64); y[0, 4, 2] = np.nan; np.save(d + "/nan64.npy", y)
y = x.astype(np.float64); y[0, 1, 0] = 1e300; np.save(d + "/big64.npy", y)
# Malformed .npy files, from a good one.
good = open(d + "/x.npy", "rb").read()
hl = struct.unpack("<H", good[8:10])[0]
def w(name, data): open(d + "/" + name + ".npy", "wb").write(data)
w("bad_magic", b"\x93NUMPX" + good[6:])
w("empty_file", b"")
w("magic_only", good[:6])
w("trunc_header", good[:10 + hl // 2])
w("trunc_data", good[:len(good) - 100])
w("trunc_data_1", good[:len(good) - 1])
w("bad_version", good[:6] + b"\x09\x00" + good[8:])
w("header_len_huge", good[:8] + struct.pack("<H", 65535) + good[10:])
def with_header(text):
    text = text.encode("latin1")
    pad = 64 - (10 + len(text) + 1) % 64
    text += b" " * pad + b"\n"
    return good[:8] + struct.pack("<H", len(text)) + text + good[10 + hl:]
def dict_header(descr="<f4", fortran="False", shape="(2, 5, 64)"):
    return with_header("{%r: %r, %r: %s, %r: %s, }" % ("descr", descr, "fortran_order",
                                                      fortran, "shape", shape))
w("bad_dict", with_header("{%r: %r, %r: False, %r: (2, 5," % ("descr", "<f4",
                                                             "fortran_order", "shape")))
w("no_shape", with_header("{%r: %r, %r: False, }" % ("descr", "<f4", "fortran_order")))
w("fortran", dict_header(fortran="True"))
w("big_endian", dict_header(descr=">f4"))
w("neg_shape", dict_header(shape="(2, -5, 64)"))
w("huge_shape", dict_header(shape="(1099511627776, 1099511627776, 64)"))
w("overflow_shape", dict_header(shape="(4294967296, 4294967296, 4294967296)"))
w("shape_mismatch", dict_header(shape="(3, 5, 64)"))
w("bad_descr", dict_header(descr="<q9"))
w("not_dict", with_header("[1, 2, 3]"))
' "$tmp"
BAD_INPUTS=(
    "last63|63.*64|64.*63"
    "ndim4|dim|shape"
    "ndim1|dim|shape"
    "empty_b|empty|shape"
    "empty_t|empty|shape"
    "int8|dtype|descr|i1|int8|unsupported"
    "int32|int32"
    "f16|dtype|descr|f2|float16|unsupported"
    "str|dtype|descr|U2|unsupported"
    "bool|dtype|descr|b1|bool|unsupported"
    "obj|dtype|descr|object|unsupported|pickle"
    "nan|nan"
    "inf|inf"
    "ninf|inf"
    "nan64|nan"
    "big64|inf|overflow|finite"
    "bad_magic|magic|npy"
    "empty_file|trunc|short|empty|magic|npy"
    "magic_only|trunc|short|npy"
    "trunc_header|trunc|header|npy"
    "trunc_data|trunc|short|size|data|npy"
    "trunc_data_1|trunc|short|size|data|npy"
    "bad_version|version"
    "header_len_huge|header|trunc|npy"
    "bad_dict|header|dict|syntax|expected|npy"
    "no_shape|shape"
    "fortran|fortran"
    "big_endian|endian|descr|dtype|>f4"
    "neg_shape|shape|neg"
    "huge_shape|shape|size|large|trunc|data"
    "overflow_shape|shape|size|large|overflow"
    "shape_mismatch|size|data|trunc|short"
    "bad_descr|descr|dtype|q9"
    "not_dict|header|dict|npy"
)
for item in "${BAD_INPUTS[@]}"; do
    name=${item%%|*}
    expect_fail_out "forward_bad_input_$name" "${item#*|}" "$O" forward --checkpoint "$M" \
        --input "$tmp/$name.npy" --output "$O"
done

# ---------------------------------------------------------------------------------------
# Damaged checkpoints: every one refused by info and forward with exit 2.

py '
d, src = sys.argv[1], sys.argv[2]
raw = open(src, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
h = json.loads(raw[8:8 + n])
data = raw[8 + n:]
def w(name, blob): open(d + "/ck_" + name + ".safetensors", "wb").write(blob)
for cut in (0, 4, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 4, 8 + n + len(data) // 2,
            len(raw) - 4, len(raw) - 1):
    w("cut_%d" % cut, raw[:cut])
w("hlen_2_60", struct.pack("<Q", 1 << 60) + raw[8:])
w("hlen_max", struct.pack("<Q", (1 << 64) - 1) + raw[8:])
w("hlen_0", struct.pack("<Q", 0) + raw[8:])
w("hlen_file", struct.pack("<Q", len(raw)) + raw[8:])
w("hlen_short", struct.pack("<Q", n - 10) + raw[8:])
w("header_x", raw[:8] + b"X" + raw[9:])
w("header_ff", raw[:8 + n // 2] + b"\xff\xff\xff" + raw[8 + n // 2 + 3:])
w("header_nul", raw[:8 + n // 3] + b"\0" + raw[8 + n // 3 + 1:])
def rebuild(name, hdr, body=data):
    js = json.dumps(hdr).encode()
    js += b" " * ((8 - len(js) % 8) % 8)
    w(name, struct.pack("<Q", len(js)) + js + body)
import copy
def edit(name, fn):
    hdr = copy.deepcopy(h); fn(hdr); rebuild(name, hdr)
edit("meta_hidden_abc", lambda x: x["__metadata__"].update(hidden_size="abc"))
edit("meta_kv_heads_3", lambda x: x["__metadata__"].update(num_kv_heads="3"))
edit("meta_no_embed_dim", lambda x: x["__metadata__"].pop("embed_dim"))
edit("meta_missing", lambda x: x.pop("__metadata__"))
edit("meta_not_strings", lambda x: x["__metadata__"].update(hidden_size=32))
edit("meta_hidden_mismatch", lambda x: x["__metadata__"].update(hidden_size="48"))
edit("tensor_missing", lambda x: x.pop("layers.1.ffn.up.bias"))
edit("tensor_shape", lambda x: x["in_proj.weight"].update(shape=[33, 64]))
edit("tensor_shape_same_numel", lambda x: x["in_proj.weight"].update(shape=[64, 32]))
edit("tensor_dtype_f16", lambda x: x["final_norm.bias"].update(dtype="F16"))
edit("tensor_dtype_bad", lambda x: x["final_norm.bias"].update(dtype="Q7"))
edit("tensor_offsets_past_end", lambda x: x["final_norm.bias"].update(
    data_offsets=[len(data) - 64, len(data) + 64]))
edit("tensor_offsets_reversed", lambda x: x["final_norm.bias"].update(
    data_offsets=x["final_norm.bias"]["data_offsets"][::-1]))
edit("tensor_offsets_huge", lambda x: x["final_norm.bias"].update(
    data_offsets=[(1 << 63) - 8, (1 << 63) + 120]))
edit("tensor_shape_negative", lambda x: x["final_norm.bias"].update(shape=[-32]))
edit("tensor_shape_huge", lambda x: x["in_proj.weight"].update(shape=[1 << 62, 1 << 62]))
edit("tensor_extra", lambda x: x.update({"bogus.weight": {"dtype": "F32", "shape": [1],
                                                          "data_offsets": [0, 4]}}))
edit("tensor_no_offsets", lambda x: x["final_norm.bias"].pop("data_offsets"))
rebuild("header_array", [1, 2, 3])
rebuild("header_string", "hello")
w("header_deep", struct.pack("<Q", 200000) + b"[" * 200000 + data)
w("header_deep_obj", struct.pack("<Q", 400000) + b"{\"a\":" * 80000 + b" " * 0 + data)
w("header_long_string", struct.pack("<Q", 1 << 20) + b"{\"" + b"a" * ((1 << 20) - 2) + data)
' "$tmp" "$M"
for ck in "$tmp"/ck_*.safetensors; do
    name=$(basename "$ck" .safetensors)
    expect_fail_out "info_$name" "$name" "" info --checkpoint "$ck"
    expect_fail_out "forward_$name" "$name" "$O" forward --checkpoint "$ck" --input "$tmp/x.npy" \
        --output "$O"
done
# A bad option in the metadata: the message names the option and its value too.
expect_fail_out ck_meta_names_kv_heads 'num_kv_heads.*3' "" info \
    --checkpoint "$tmp/ck_meta_kv_heads_3.safetensors"
expect_fail_out ck_meta_names_hidden_size 'hidden_size.*abc' "" info \
    --checkpoint "$tmp/ck_meta_hidden_abc.safetensors"

# A BF16 checkpoint (accepted on load, SPEC §7) gives nearly the same output.
check bf16_checkpoint_written py '
raw = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
h = json.loads(raw[8:8 + n]); data = raw[8 + n:]
out, body = {}, b""
for name, t in h.items():
    if name == "__metadata__":
        out[name] = t; continue
    b, e = t["data_offsets"]
    a = np.frombuffer(data[b:e], dtype="<f4")
    bf = (a.view(np.uint32) >> 16).astype("<u2").tobytes()
    out[name] = dict(dtype="BF16", shape=t["shape"], data_offsets=[len(body), len(body) + len(bf)])
    body += bf
js = json.dumps(out).encode(); js += b" " * ((8 - len(js) % 8) % 8)
open(sys.argv[2], "wb").write(struct.pack("<Q", len(js)) + js + body)
' "$M" "$tmp/bf16.safetensors"
run_ok forward_bf16_checkpoint forward --checkpoint "$tmp/bf16.safetensors" --input "$tmp/x.npy" \
    --output "$tmp/y_bf16.npy"
check forward_bf16_close py '
a, b = np.load(sys.argv[1]), np.load(sys.argv[2])
assert a.shape == b.shape and np.abs(a - b).max() < 0.1 * np.abs(a).max(), np.abs(a - b).max()
' "$Y" "$tmp/y_bf16.npy"

# ---------------------------------------------------------------------------------------
# A language-model checkpoint: tokens in, logits out.

LM="$tmp/lm.safetensors"
LM_OPTS=(--vocab-size 50 --embed-dim 16 --hidden-size 16 --num-heads 2 --head-dim 8
    --num-layers 1 --block-size 4 --compression-ratio 2 --window-size 4)
run_ok lm_init init "${LM_OPTS[@]}" --seed 3 --out "$LM"
run_ok lm_info info --checkpoint "$LM"
check lm_info_tensors has_all "$tmp/out" embed.weight lm_head.weight lm_head.bias
check lm_info_vocab grep -Eq '^  vocab_size +50$' "$tmp/out"
run_ok lm_info_json info --checkpoint "$LM" --json
check lm_info_total_params py '
d = json.load(open(sys.argv[1]))
V, E, D = 50, 16, 16
assert d["vocab_size"] == V and d["param_count"] > 0
assert d["total_params"] == d["param_count"] + V*E + V*D + V, d
' "$tmp/out"
py '
d = sys.argv[1]
rng = np.random.default_rng(2)
t = rng.integers(0, 50, size=(2, 9))
np.save(d + "/tok32.npy", t.astype(np.int32))
np.save(d + "/tok64.npy", t.astype(np.int64))
np.save(d + "/tok1d.npy", t[1].astype(np.int32))
for name, v in (("tok_50", 50), ("tok_neg", -1), ("tok_huge", 1 << 40)):
    u = t.astype(np.int64); u[1, 4] = v; np.save(d + "/" + name + ".npy", u)
np.save(d + "/tok_float.npy", t.astype(np.float32))
np.save(d + "/tok_3d.npy", t.astype(np.int32)[..., None])
np.save(d + "/tok_empty.npy", t.astype(np.int32)[:, :0])
' "$tmp"
run_ok lm_forward forward --checkpoint "$LM" --input "$tmp/tok32.npy" --output "$tmp/logits.npy"
check lm_logits_shape py '
y = np.load(sys.argv[1])
assert y.dtype == np.float32 and y.shape == (2, 9, 50), y.shape
assert np.all(np.isfinite(y)) and np.std(y) > 0
' "$tmp/logits.npy"
run_ok lm_forward_i64 forward --checkpoint "$LM" --input "$tmp/tok64.npy" \
    --output "$tmp/logits64.npy"
check lm_i64_same cmp -s "$tmp/logits.npy" "$tmp/logits64.npy"
run_ok lm_forward_1d forward --checkpoint "$LM" --input "$tmp/tok1d.npy" --output "$tmp/logits1.npy"
check lm_1d_shape py '
a, b = np.load(sys.argv[1]), np.load(sys.argv[2])
assert b.shape == (9, 50) and np.allclose(a[1], b, atol=1e-5)
' "$tmp/logits.npy" "$tmp/logits1.npy"
expect_fail_out lm_token_50 'token 50|50' "$O" forward --checkpoint "$LM" --input "$tmp/tok_50.npy" \
    --output "$O"
expect_fail_out lm_token_negative '-1' "$O" forward --checkpoint "$LM" --input "$tmp/tok_neg.npy" \
    --output "$O"
expect_fail_out lm_token_huge '1099511627776' "$O" forward --checkpoint "$LM" \
    --input "$tmp/tok_huge.npy" --output "$O"
expect_fail_out lm_float_tokens 'float32|dtype|int' "$O" forward --checkpoint "$LM" \
    --input "$tmp/tok_float.npy" --output "$O"
expect_fail_out lm_tokens_3d 'dim|shape' "$O" forward --checkpoint "$LM" --input "$tmp/tok_3d.npy" \
    --output "$O"
expect_fail_out lm_tokens_empty 'empty|shape' "$O" forward --checkpoint "$LM" \
    --input "$tmp/tok_empty.npy" --output "$O"

echo "RESULT $passed $failed"
[ "$failed" -eq 0 ]
