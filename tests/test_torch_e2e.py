#!/usr/bin/python3
"""test_torch_e2e.py — the `nsa` program end to end against the PyTorch reference.

For each config: `nsa init` writes a checkpoint, whose weights are then perturbed (so that
biases, norms, gates and compression parameters are not trivial) and written back with the
safetensors helpers of torch_nsa.py. Then, against tests/torch_nsa.py run as a module
(its own command line, `main([...])`, in float64):
  - a model without vocabulary: `nsa forward` (last position and --all) on random features,
    max abs error / max abs reference <= 1e-4 (float32 against float64);
  - a language model: `nsa forward` logits on random tokens likewise, and `nsa grad`
    against `torch_nsa.py grad --f64`: the same tensors, every gradient within 1e-3 of the
    largest gradient (max abs difference / global max abs gradient) and the loss within
    1e-5 relative.
Prints "ok name (worst errors)" or "FAIL name: why" per config and a last line
"RESULT <passed> <failed>"; the exit status is 0 only when every config passes.
The program is $NSA_BIN (default build/nsa); run with Debian's /usr/bin/python3.
"""
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import torch_nsa  # noqa: E402  (the reference, next to this file)

TOL_FORWARD = 1e-4  # float32 program against the float64 reference, relative to max |ref|
TOL_GRAD = 1e-3     # relative to the largest gradient of the model
TOL_LOSS = 1e-5


def nsa_program():
    path = os.environ.get("NSA_BIN", "build/nsa")
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(HERE, "..", path)  # run from another directory
    return path


NSA = nsa_program()


def run_nsa(*args):
    """Runs `nsa args...`; raises with its stderr when it fails."""
    args = [str(a) for a in args]
    r = subprocess.run([NSA] + args, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nsa {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def run_reference(*args):
    """Runs torch_nsa.py's command line in this process (float64)."""
    args = [str(a) for a in args] + ["--f64"]
    if torch_nsa.main(args) != 0:
        raise RuntimeError(f"torch_nsa.py {' '.join(args)} failed")


def flags(options):
    out = []
    for name, value in options.items():
        out += ["--" + name.replace("_", "-"), value]
    return out


def perturb(path, seed):
    """Adds noise to every weight of the checkpoint and writes it back (same metadata)."""
    tensors, meta = torch_nsa.read_safetensors(path)
    rng = np.random.default_rng(seed)
    for name, a in tensors.items():
        noise = 0.7 if name.endswith(".gate") else 0.1
        tensors[name] = (a + noise * rng.uniform(-1, 1, a.shape)).astype(np.float32)
    torch_nsa.write_safetensors(path, tensors, meta)


def rel_err(got, ref):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        raise AssertionError(f"shape {list(got.shape)}, reference {list(ref.shape)}")
    scale = max(float(np.max(np.abs(ref))), 1e-30) if ref.size else 1.0
    err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    return err / scale if np.all(np.isfinite(got)) else float("inf")


# ----------------------------------------------------------------------------------------
# The configs: every option of SPEC §1

def small(**kw):
    """The seed's options scaled down (as tests/test_model.c)."""
    base = dict(embed_dim=12, hidden_size=16, num_heads=2, head_dim=8, num_layers=2,
                window_size=5, block_size=7, compression_ratio=3, num_selected_blocks=3)
    base.update(kw)
    return base


CASES = [
    # name, options, B, T
    ("seed small, odd T=61 b=7 r=3 w=5 n=3", small(), 2, 61),
    ("GQA H=4 G=2, H*d=16 != D=12, E != D", small(hidden_size=12, num_heads=4, num_kv_heads=2,
                                                 head_dim=4), 2, 40),
    ("E == D, conv l=6 > r=3", small(embed_dim=16, compress="conv", compression_block=6), 2, 50),
    ("select_fixed paper n=4, rope_theta 10000", small(select_fixed="paper", num_selected_blocks=4,
                                                        rope_theta=10000), 3, 45),
    ("cmp_attn b=6 r=3 l=9, rope_theta 7", small(select_score="cmp_attn", block_size=6,
                                                  compression_block=9, rope_theta=7), 2, 47),
    ("lm: mlp l=6 r=3, gate token", small(compress="mlp", compression_block=6, gate="token",
                                          vocab_size=11), 2, 61),
    ("lm: E == D, mean, GQA G=1, cmp_attn", small(embed_dim=16, num_heads=4, num_kv_heads=1,
                                                   head_dim=4, select_score="cmp_attn",
                                                   block_size=6, vocab_size=9), 2, 37),
    ("lm: conv l=r=3, paper n=3, rope, gate token", small(compress="conv", select_fixed="paper",
                                                           rope_theta=100, gate="token",
                                                           vocab_size=10), 3, 29),
    ("lm: T=3 below every block size (mlp)", small(block_size=8, compression_ratio=4,
                                                   compression_block=8, window_size=16,
                                                   compress="mlp", vocab_size=9), 2, 3),
    ("T=5 below every block size (features, token gate)",
     small(block_size=8, compression_ratio=4, compression_block=8, window_size=16,
           gate="token", compress="conv"), 2, 5),
    ("lm: preset paper small (b=64 l=32 r=16 n=16 w=512, T=150)",
     dict(preset="paper", embed_dim=16, hidden_size=32, num_heads=4, num_kv_heads=1, head_dim=8,
          num_layers=1, vocab_size=13), 1, 150),
    ("lm: paper options scaled (b=8 r=4 l=8 n=4 w=16 G=2 N=2)",
     dict(preset="paper", embed_dim=16, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8,
          num_layers=2, block_size=8, compression_ratio=4, compression_block=8,
          num_selected_blocks=4, window_size=16, vocab_size=13), 2, 61),
]


# ----------------------------------------------------------------------------------------

def check_features(tmp, ckpt, cfg, B, T, rng):
    """nsa forward (last, --all) against torch_nsa forward. Returns {what: error}."""
    x = rng.uniform(-1, 1, (B, T, cfg.embed_dim)).astype(np.float32)
    xin = os.path.join(tmp, "x.npy")
    np.save(xin, x)
    errs = {}
    for extra, key in (([], "fwd"), (["--all"], "fwd_all")):
        got, ref = os.path.join(tmp, "y.npy"), os.path.join(tmp, "y_ref.npy")
        run_nsa("forward", "--checkpoint", ckpt, "--input", xin, "--output", got, *extra)
        run_reference("forward", ckpt, xin, ref, *extra)
        errs[key] = (rel_err(np.load(got), np.load(ref)), TOL_FORWARD)
    return errs


def check_lm(tmp, ckpt, cfg, B, T, rng):
    """nsa forward (logits) and nsa grad against torch_nsa. Returns {what: error}."""
    tokens = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int64)
    tin = os.path.join(tmp, "tokens.npy")
    np.save(tin, tokens)
    errs = {}
    got, ref = os.path.join(tmp, "logits.npy"), os.path.join(tmp, "logits_ref.npy")
    run_nsa("forward", "--checkpoint", ckpt, "--input", tin, "--output", got)
    run_reference("forward", ckpt, tin, ref)
    errs["logits"] = (rel_err(np.load(got), np.load(ref)), TOL_FORWARD)

    got, ref = os.path.join(tmp, "grad.safetensors"), os.path.join(tmp, "grad_ref.safetensors")
    run_nsa("grad", "--checkpoint", ckpt, "--input", tin, "--output", got)
    run_reference("grad", ckpt, tin, ref)
    g, gmeta = torch_nsa.read_safetensors(got)
    r, rmeta = torch_nsa.read_safetensors(ref)
    if list(g) != list(r):
        raise AssertionError(f"grad tensors {sorted(set(g) ^ set(r))} differ from the reference's")
    _, cmeta = torch_nsa.read_safetensors(ckpt)
    for name in torch_nsa.OPTIONS:  # the config of the checkpoint, as the checkpoint has it
        if gmeta.get(name) != cmeta.get(name):
            raise AssertionError(f"grad metadata {name} = {gmeta.get(name)!r}, checkpoint "
                                 f"{cmeta.get(name)!r}")
    scale = max(float(np.max(np.abs(a))) for a in r.values())
    worst, worst_name = 0.0, ""
    for name in r:
        if g[name].shape != r[name].shape:
            raise AssertionError(f"grad {name}: shape {list(g[name].shape)}, reference "
                                 f"{list(r[name].shape)}")
        e = float(np.max(np.abs(g[name].astype(np.float64) - r[name]))) / scale
        if not np.all(np.isfinite(g[name])):
            e = float("inf")
        if e >= worst:
            worst, worst_name = e, name
    errs[f"grad[{worst_name}]"] = (worst, TOL_GRAD)
    loss, ref_loss = float(gmeta["loss"]), float(rmeta["loss"])
    errs["loss"] = (abs(loss - ref_loss) / abs(ref_loss), TOL_LOSS)
    return errs


def run_case(index, name, options, B, T):
    with tempfile.TemporaryDirectory(prefix="nsa_e2e_") as tmp:
        ckpt = os.path.join(tmp, "model.safetensors")
        run_nsa("init", *flags(options), "--seed", 100 + index, "--out", ckpt)
        perturb(ckpt, 200 + index)
        cfg, _ = torch_nsa.load_checkpoint(ckpt)
        rng = np.random.default_rng(300 + index)
        if cfg.vocab_size > 0:
            return check_lm(tmp, ckpt, cfg, B, T, rng)
        return check_features(tmp, ckpt, cfg, B, T, rng)


def check_grad_refusals():
    """nsa grad on bad input: exit 2 and one "nsa: " line naming the problem."""
    with tempfile.TemporaryDirectory(prefix="nsa_e2e_") as tmp:
        feat, lm = os.path.join(tmp, "feat.safetensors"), os.path.join(tmp, "lm.safetensors")
        run_nsa("init", *flags(small(num_layers=1)), "--out", feat)
        run_nsa("init", *flags(small(num_layers=1, vocab_size=5)), "--out", lm)
        inputs = {"ok": np.array([[1, 2, 3]], np.int32), "short": np.array([[4]], np.int64),
                  "range": np.array([[1, 5]], np.int32), "float": np.zeros((1, 3), np.float32)}
        for key, a in inputs.items():
            np.save(os.path.join(tmp, key + ".npy"), a)
        out = os.path.join(tmp, "g.safetensors")
        bad = [(feat, "ok", "vocab_size"), (lm, "short", "T"), (lm, "range", "out of range"),
               (lm, "float", "dtype"), (lm, "missing", "missing.npy")]
        for ckpt, key, words in bad:
            r = subprocess.run([NSA, "grad", "--checkpoint", ckpt, "--input",
                                os.path.join(tmp, key + ".npy"), "--output", out],
                               capture_output=True, text=True)
            if r.returncode != 2 or not r.stderr.startswith("nsa: ") or words not in r.stderr:
                raise AssertionError(f"{key} input: exit {r.returncode}, stderr {r.stderr!r} "
                                     f"(expected exit 2 and a message with {words!r})")
            if os.path.exists(out):
                raise AssertionError(f"{key} input: {out} written despite the error")


def main():
    torch.set_num_threads(1)
    torch.set_printoptions(precision=10)
    passed = failed = 0
    start = time.time()
    for index, (name, options, B, T) in enumerate(CASES):
        label = f"{name} [B={B} T={T}]"
        try:
            errs = run_case(index, name, options, B, T)
            bad = [f"{k} {e:.3g} > {tol:g}" for k, (e, tol) in errs.items() if not e <= tol]
            summary = ", ".join(f"{k} {e:.2e}" for k, (e, _) in errs.items())
        except Exception as e:  # noqa: BLE001 — any failure of the program or reference
            bad, summary = [f"{type(e).__name__}: {e}"], ""
        if bad:
            failed += 1
            print(f"FAIL {label}: {'; '.join(bad)}" + (f" ({summary})" if summary else ""))
        else:
            passed += 1
            print(f"ok   {label} ({summary})")
        sys.stdout.flush()
    try:
        check_grad_refusals()
        passed += 1
        print("ok   nsa grad refuses bad input (exit 2, nsa: message, no file)")
    except Exception as e:  # noqa: BLE001
        failed += 1
        print(f"FAIL nsa grad refuses bad input: {type(e).__name__}: {e}")
    print(f"# {time.time() - start:.1f} s")
    print(f"RESULT {passed} {failed}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
