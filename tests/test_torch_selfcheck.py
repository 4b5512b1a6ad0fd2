#!/usr/bin/python3
"""test_torch_selfcheck.py — tests of the PyTorch reference (tests/torch_nsa.py) itself.

The C library is judged against torch_nsa.py, so the reference has to be trustworthy: this
checks it against hand-computed values, a second, loop-by-loop implementation of the
attention written straight from SPEC §3, full causal attention, causality for every option
combination, autograd against finite differences, and its command line. Prints "ok NAME" or
"FAIL NAME: why" per test and a last line "RESULT <passed> <failed>".
"""
import itertools
import math
import os
import subprocess
import sys
import tempfile
import traceback

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import torch_nsa as tn  # noqa: E402

torch.set_num_threads(1)  # tiny tensors: threads only spin (and slow down under load)
F64 = torch.float64
results = {"passed": 0, "failed": 0}


def check(name, fn):
    try:
        fn()
        results["passed"] += 1
        print(f"ok {name}", flush=True)
    except Exception as e:  # a failed assertion or a crash both fail the test
        results["failed"] += 1
        detail = "".join(traceback.format_exception_only(type(e), e)).strip()
        print(f"FAIL {name}: {detail}", flush=True)


def close(a, b, tol, what=""):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"{what} shape {a.shape} vs {b.shape}"
    err = np.max(np.abs(a - b)) if a.size else 0.0
    scale = max(1.0, np.max(np.abs(b)) if b.size else 0.0)
    assert err <= tol * scale, f"{what} max abs error {err:.3g} > {tol:g} * {scale:.3g}"


def rand(shape, seed):
    return torch.tensor(np.random.default_rng(seed).standard_normal(shape), dtype=F64)


def model_params(cfg, seed=0):
    return tn.params_from_numpy(cfg, tn.random_params(cfg, seed), F64)


# ----------------------------------------------------------------------------------------
# A second implementation of SPEC §3.1-§3.3, one query at a time, in numpy

def loop_compress(x, mode, r, l, P=None, prefix=None):
    """x [B,T,G,d] numpy -> [B,Tc,G,d]."""
    B, T, G, d = x.shape
    Tc = (T - l) // r + 1 if T >= l else 0
    out = np.zeros((B, Tc, G, d))
    for b, j, g in itertools.product(range(B), range(Tc), range(G)):
        rows = [x[b, j * r + i, g] for i in range(l)]
        if mode == "mean":
            out[b, j, g] = sum(rows) / l
        elif mode == "conv":
            W = P[prefix + ".weight"].numpy()
            out[b, j, g] = sum(W[g, i] * rows[i] for i in range(l))
        else:
            pos = P[prefix + ".pos"].numpy()
            vec = np.concatenate([rows[i] + pos[i] for i in range(l)])  # index i*d + channel
            h = P[prefix + ".fc1.weight"].numpy() @ vec + P[prefix + ".fc1.bias"].numpy()
            h = np.array([0.5 * z * (1 + math.erf(z / math.sqrt(2))) for z in h])
            out[b, j, g] = P[prefix + ".fc2.weight"].numpy() @ h + P[prefix + ".fc2.bias"].numpy()
    return out


def softmax_attend(qv, keys, vals, scale):
    if not keys:
        return np.zeros_like(qv), []
    s = np.array([scale * float(qv @ kk) for kk in keys])
    p = np.exp(s - s.max())
    p /= p.sum()
    return sum(pi * vv for pi, vv in zip(p, vals)), p


def loop_core(q, k, v, kc, vc, gates, b, w, r, l, n, select_score, select_fixed):
    B, T, H, d = q.shape
    G, Tc = k.shape[2], kc.shape[1]
    rep, scale = H // G, 1 / math.sqrt(d)
    out = np.zeros_like(q)
    for bi, t in itertools.product(range(B), range(T)):
        visible = [j for j in range(Tc) if j * r + l - 1 <= t]
        o_cmp, p_cmp = {}, {}
        for h in range(H):
            o_cmp[h], p = softmax_attend(q[bi, t, h], [kc[bi, j, h // rep] for j in visible],
                                         [vc[bi, j, h // rep] for j in visible], scale)
            p_cmp[h] = dict(zip(visible, p))
        for g in range(G):
            heads = range(g * rep, (g + 1) * rep)
            candidates = list(range(t // b + 1))
            score = {}
            for i in candidates:
                if select_score == "mean_key":
                    m = np.mean([k[bi, s, g] for s in range(i * b, min((i + 1) * b, t + 1))], axis=0)
                    score[i] = sum(float(q[bi, t, h] @ m) for h in heads)
                else:
                    score[i] = sum(p_cmp[h][j] for h in heads for j in visible
                                   if j * r < (i + 1) * b and j * r + l > i * b)
            if len(candidates) <= n:
                chosen = set(candidates)
            else:
                fixed = {0, t // b, t // b - 1} & set(candidates) if select_fixed == "paper" else set()
                rest = sorted((i for i in candidates if i not in fixed), key=lambda i: (-score[i], i))
                chosen = fixed | set(rest[:n - len(fixed)])
            slc = [s for s in range(t + 1) if s // b in chosen]
            win = list(range(max(0, t - w + 1), t + 1))
            for h in heads:
                o_slc, _ = softmax_attend(q[bi, t, h], [k[bi, s, g] for s in slc],
                                          [v[bi, s, g] for s in slc], scale)
                o_win, _ = softmax_attend(q[bi, t, h], [k[bi, s, g] for s in win],
                                          [v[bi, s, g] for s in win], scale)
                gt = gates[bi, t, h]
                out[bi, t, h] = gt[0] * o_cmp[h] + gt[1] * o_slc + gt[2] * o_win
    return out


def np_linear(x, P, prefix):
    return x @ P[prefix + ".weight"].numpy().T + P[prefix + ".bias"].numpy()


def np_layer_norm(x, P, prefix):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * P[prefix + ".weight"].numpy() + P[prefix + ".bias"].numpy()


def np_gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def loop_model(P, cfg, x):
    """The whole model of SPEC §2-§3 in numpy, all positions: x [B,T,E] -> [B,T,D]."""
    B, T, _ = x.shape
    H, G, d, r, l = cfg.num_heads, cfg.G, cfg.head_dim, cfg.compression_ratio, cfg.l
    if cfg.embed_dim != cfg.hidden_size:
        x = np_linear(x, P, "in_proj")
    for layer in range(cfg.num_layers):
        pre = f"layers.{layer}."
        z = np_layer_norm(x, P, pre + "attn_norm")
        q = np_linear(z, P, pre + "attn.q_proj").reshape(B, T, H, d)
        k = np_linear(z, P, pre + "attn.k_proj").reshape(B, T, G, d)
        v = np_linear(z, P, pre + "attn.v_proj").reshape(B, T, G, d)
        if cfg.rope_theta > 0:
            for a in (q, k):
                for t, i in itertools.product(range(T), range(d // 2)):
                    angle = t * cfg.rope_theta ** (-2 * i / d)
                    c, s = math.cos(angle), math.sin(angle)
                    x0, x1 = a[:, t, :, 2 * i].copy(), a[:, t, :, 2 * i + 1].copy()
                    a[:, t, :, 2 * i], a[:, t, :, 2 * i + 1] = x0 * c - x1 * s, x0 * s + x1 * c
        if cfg.gate == "static":
            gamma = P[pre + "attn.gate"].numpy()
            gates = np.broadcast_to(np.exp(gamma) / np.exp(gamma).sum(), (B, T, H, 3))
        else:
            logits = np_linear(z, P, pre + "attn.gate_proj")
            gates = np.zeros((B, T, H, 3))
            for h, c in itertools.product(range(H), range(3)):
                gates[:, :, h, c] = 1 / (1 + np.exp(-logits[:, :, h * 3 + c]))
        kc = loop_compress(k, cfg.compress, r, l, P, pre + "attn.compress_k")
        vc = loop_compress(v, cfg.compress, r, l, P, pre + "attn.compress_v")
        o = loop_core(q, k, v, kc, vc, gates, cfg.block_size, cfg.window_size, r, l,
                      cfg.num_selected_blocks, cfg.select_score, cfg.select_fixed)
        heads = np.concatenate([o[:, :, h] for h in range(H)], axis=-1)  # head-major concat
        h_res = x + np_linear(heads, P, pre + "attn.o_proj")
        up = np_linear(np_layer_norm(h_res, P, pre + "ffn_norm"), P, pre + "ffn.up")
        x = h_res + np_linear(np_gelu(up), P, pre + "ffn.down")
    return np_layer_norm(x, P, "final_norm")


def full_causal(q, k, v):
    """Plain causal softmax attention with GQA, q [B,T,H,d], k, v [B,T,G,d]."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    T = q.shape[1]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", torch.softmax(s, -1), v)


# ----------------------------------------------------------------------------------------
# Tests

def test_safetensors_roundtrip():
    rng = np.random.default_rng(1)
    tensors = {"a": rng.standard_normal((3, 4)).astype(np.float32),
               "b.c": rng.standard_normal((5,)), "i": np.arange(6, dtype=np.int32).reshape(2, 3),
               "j": np.arange(4, dtype=np.int64), "s": np.array(2.5, dtype=np.float32)}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t.safetensors")
        tn.write_safetensors(path, tensors, {"x": "1", "loss": "0.5"})
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
        assert n % 8 == 0, "header not padded to 8 bytes"
        back, meta = tn.read_safetensors(path)
        assert meta == {"x": "1", "loss": "0.5"}, meta
        for name, arr in tensors.items():
            assert back[name].dtype == arr.dtype and np.array_equal(back[name], arr), name
        tn.write_safetensors(path, {"a": tensors["a"]}, bf16=True)
        back, _ = tn.read_safetensors(path)
        assert np.max(np.abs(back["a"] - tensors["a"])) <= 2 ** -8 * np.max(np.abs(tensors["a"]))
    # round to nearest even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 -> 1
    bits = tn.f32_to_bf16_bits(np.array([1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, -2.0], np.float32))
    assert list(bits) == [0x3F80, 0x3F80, 0x3F82, 0xC000], [hex(x) for x in bits]


def test_config():
    cfg = tn.Config.from_metadata({"embed_dim": "64", "num_kv_heads": "0", "compression_block": "0"})
    assert (cfg.hidden_size, cfg.num_heads, cfg.G, cfg.l, cfg.compress) == (256, 8, 8, 4, "mean")
    meta = dict(embed_dim="8", num_heads="8", num_kv_heads="2", compression_ratio="16",
                compression_block="32", block_size="64", num_selected_blocks="16",
                compress="mlp", select_score="cmp_attn", select_fixed="paper", gate="token",
                rope_theta="10000", vocab_size="7", dropout="0")
    cfg = tn.Config.from_metadata(meta)
    assert (cfg.G, cfg.l, cfg.rope_theta, cfg.vocab_size) == (2, 32, 10000.0, 7)
    again = tn.Config.from_metadata(cfg.to_metadata())
    assert again.to_metadata() == cfg.to_metadata()
    for bad, word in ((dict(num_kv_heads="3"), "num_kv_heads"), (dict(compression_block="6"),
                      "compression_block"), (dict(compress="max"), "compress"),
                      (dict(select_score="cmp_attn", block_size="6"), "select_score"),
                      (dict(select_fixed="paper", num_selected_blocks="2"), "select_fixed"),
                      (dict(rope_theta="10", head_dim="3"), "rope_theta")):
        try:
            tn.Config.from_metadata(dict(embed_dim="4", **bad))
        except ValueError as e:
            assert str(e).startswith(word), str(e)
        else:
            raise AssertionError(f"{bad} accepted")


def test_param_count():
    cfg = tn.Config(embed_dim=64, hidden_size=32, num_heads=4, head_dim=8, num_layers=2)
    assert tn.param_count(cfg) == 27558, tn.param_count(cfg)
    # the general count, by hand, for GQA + conv / mlp + token gate
    E, D, H, G, d, l, N = 10, 12, 4, 2, 3, 4, 3
    base = (D * H * d + H * d) + 2 * (D * G * d + G * d) + (H * d * D + D) + 4 * D + 8 * D * D + 5 * D
    for compress, extra in (("conv", 2 * G * l * d), ("mlp", 2 * (l * d + l * d * d + d + d * d + d))):
        cfg = tn.Config(embed_dim=E, hidden_size=D, num_heads=H, num_kv_heads=G, head_dim=d,
                        num_layers=N, compression_ratio=2, compression_block=l,
                        compress=compress, gate="token", vocab_size=9)
        want = E * D + D + N * (base + 3 * H * D + 3 * H + extra) + 2 * D
        assert tn.param_count(cfg) == want, (compress, tn.param_count(cfg), want)


def test_mean_compression_hand():
    k = torch.arange(1.0, 8.0, dtype=F64).reshape(1, 7, 1, 1)  # k_t = t + 1, d = 1
    kc = tn.compress(k, "mean", 2, 2)
    assert kc.flatten().tolist() == [1.5, 3.5, 5.5], kc.flatten().tolist()
    kc = tn.compress(k, "mean", 2, 4)  # overlapping: spans [0,4), [2,6); [4,8) not complete
    assert kc.flatten().tolist() == [2.5, 4.5], kc.flatten().tolist()
    assert tn.compress(k[:, :3], "mean", 2, 4).shape[1] == 0
    # o_cmp with d = 1, scale 1, l = r = 2, v_t = 10 t, q = 0.3, gates (1, 0, 0)
    q = torch.full((1, 7, 1, 1), 0.3, dtype=F64)
    v = 10 * torch.arange(7.0, dtype=F64).reshape(1, 7, 1, 1)
    gates = torch.tensor([1.0, 0.0, 0.0], dtype=F64).expand(1, 7, 1, 3)
    o = tn.nsa_attention(q, k, v, gates, 2, 3, 2, 2, 1).flatten().tolist()
    e0, e1 = math.exp(0.3 * 1.5), math.exp(0.3 * 3.5)
    want = [0.0, 5.0, 5.0, (5 * e0 + 25 * e1) / (e0 + e1)]
    close(o[:4], want, 1e-14, "o_cmp")


def test_topk_ties():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    every = torch.ones(5, dtype=torch.bool)
    none = torch.zeros(5, dtype=torch.bool)
    picked = lambda sel: torch.nonzero(sel).flatten().tolist()  # noqa: E731
    assert picked(tn.top_blocks(scores, every, none, 2)) == [1, 2]
    assert picked(tn.top_blocks(scores, every, none, 3)) == [1, 2, 4]
    assert picked(tn.top_blocks(scores, every, none, 9)) == [0, 1, 2, 3, 4]
    fixed = torch.tensor([True, False, False, True, True])
    assert picked(tn.top_blocks(scores, every, fixed, 4)) == [0, 1, 3, 4]
    assert picked(tn.top_blocks(torch.zeros(5), every, none, 3)) == [0, 1, 2]
    candidate = torch.tensor([True, True, True, False, False])
    assert picked(tn.top_blocks(scores, candidate, none, 1)) == [1]
    # through the op: q = 0 makes every mean_key score 0, so the lowest blocks win and the
    # selected output is the plain mean of v over them
    T, b, n = 10, 2, 2
    q = torch.zeros(1, T, 1, 4, dtype=F64)
    k, v = rand((1, T, 1, 4), 3), rand((1, T, 1, 4), 4)
    gates = torch.tensor([0.0, 1.0, 0.0], dtype=F64).expand(1, T, 1, 3)
    for fixed_mode, blocks in (("none", [0, 1]), ("paper", [0, 1, 3, 4])):
        o, sel = tn.nsa_attention(q, k, v, gates, b, 4, 2, 2, len(blocks), "mean_key",
                                  fixed_mode, return_selection=True)
        assert picked(sel[0, 0, T - 1]) == blocks, (fixed_mode, picked(sel[0, 0, T - 1]))
        keys = [s for s in range(T) if s // b in blocks]
        close(o[0, T - 1, 0], v[0, keys, 0].mean(0), 1e-13, fixed_mode)
    # cmp_attn before any compressed token is complete: all scores 0 -> lowest blocks
    o, sel = tn.nsa_attention(rand((1, T, 1, 4), 5), k, v, gates, b, 4, 2, 12, 2, "cmp_attn",
                              return_selection=True)
    assert picked(sel[0, 0, T - 1]) == [0, 1]


def test_rope():
    x = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64).expand(1, 5, 1, 4)
    y = tn.rope(x, 100.0)
    t = torch.arange(5, dtype=F64)
    want = torch.stack((t.cos(), t.sin(), (t / 10).cos(), (t / 10).sin()), -1)  # 100^(-2/4)
    close(y[0, :, 0], want, 1e-14, "angles")
    # scores after rotation depend on t - s only
    q, k = rand((1, 1, 1, 6), 1).expand(1, 9, 1, 6), rand((1, 1, 1, 6), 2).expand(1, 9, 1, 6)
    qr, kr = tn.rope(q, 50.0)[0, :, 0], tn.rope(k, 50.0)[0, :, 0]
    close(qr[5] @ kr[2], qr[7] @ kr[4], 1e-13, "relative")


def test_loop_reference():
    configs = [  # (B, T, H, G, d, b, w, r, l, n, select_score, select_fixed, compress)
        (2, 17, 4, 2, 3, 3, 4, 3, 3, 2, "mean_key", "none", "mean"),
        (1, 23, 4, 1, 4, 4, 6, 2, 4, 3, "cmp_attn", "paper", "mlp"),
        (1, 19, 2, 2, 2, 4, 5, 4, 8, 3, "cmp_attn", "none", "conv"),
        (1, 21, 3, 3, 2, 2, 1, 1, 3, 4, "mean_key", "paper", "conv"),
        (2, 13, 2, 1, 3, 4, 20, 2, 2, 2, "cmp_attn", "paper", "mean"),
        (1, 5, 2, 2, 2, 2, 3, 2, 4, 3, "mean_key", "none", "mlp"),
        (2, 22, 6, 2, 2, 4, 5, 2, 6, 3, "cmp_attn", "none", "mean"),
    ]
    for seed, (B, T, H, G, d, b, w, r, l, n, score, fixed, mode) in enumerate(configs):
        cfg = tn.Config(embed_dim=4, hidden_size=4, num_heads=H, num_kv_heads=G, head_dim=d,
                        block_size=b, compression_ratio=r, compression_block=l, compress=mode,
                        num_layers=1)
        P = model_params(cfg, seed)
        pre = "layers.0.attn.compress_k"
        q, k, v = rand((B, T, H, d), 10 * seed), rand((B, T, G, d), 10 * seed + 1), rand((B, T, G, d), 10 * seed + 2)
        gates = torch.tensor(np.random.default_rng(seed).uniform(size=(B, T, H, 3)))
        kc, vc = tn.compress(k, mode, r, l, P, pre), tn.compress(v, mode, r, l, P, pre)
        close(kc, loop_compress(k.numpy(), mode, r, l, P, pre), 1e-13, f"compress {mode}")
        got = tn.nsa_core(q, k, v, kc, vc, gates, b, w, r, l, n, score, fixed)
        want = loop_core(q.numpy(), k.numpy(), v.numpy(), kc.numpy(), vc.numpy(), gates.numpy(),
                         b, w, r, l, n, score, fixed)
        close(got, want, 1e-12, f"config {seed}")


def test_model_loop():
    for seed, (compress, score, fixed, gate, rope) in enumerate((
            ("mlp", "cmp_attn", "paper", "token", 1), ("conv", "mean_key", "none", "static", 0),
            ("mean", "cmp_attn", "none", "static", 1), ("conv", "mean_key", "paper", "token", 0))):
        cfg = combo_config(compress, score, fixed, gate, rope)
        P = model_params(cfg, 20 + seed)
        x = rand((2, 13, 6), seed)
        close(tn.model_forward(P, cfg, x, True), loop_model(P, cfg, x.numpy()), 1e-12, str(seed))


def test_full_attention():
    B, T, H, G, d, b = 2, 11, 4, 2, 5, 3
    q, k, v = rand((B, T, H, d), 1), rand((B, T, G, d), 2), rand((B, T, G, d), 3)
    full = full_causal(q, k, v)
    for c, (score, fixed, w) in itertools.product((1, 2), (("mean_key", "none", T),
                                                           ("cmp_attn", "paper", T + 5))):
        gates = torch.zeros(B, T, H, 3, dtype=F64)
        gates[..., c] = 1
        o = tn.nsa_attention(q, k, v, gates, b, w, 3, 6, 4, score, fixed)  # n = 4 = nb
        close(o, full, 1e-13, f"path {c} {score}")
    # model level: with w >= T and n >= nb, the selection rule and w beyond T change nothing
    base = dict(embed_dim=6, hidden_size=8, num_heads=4, num_kv_heads=2, head_dim=4,
                block_size=3, num_selected_blocks=5, compression_ratio=3, num_layers=2)
    x = rand((2, T, 6), 4)
    outs = []
    for score, fixed, w in (("mean_key", "none", T), ("cmp_attn", "paper", 64)):
        cfg = tn.Config(window_size=w, select_score=score, select_fixed=fixed, **base)
        outs.append(tn.model_forward(model_params(tn.Config(**base), 7), cfg, x, True))
    close(outs[0], outs[1], 1e-13, "model")


def combo_config(compress, score, fixed, gate, rope):
    return tn.Config(embed_dim=6, hidden_size=8, num_heads=4, num_kv_heads=2, head_dim=4,
                     window_size=5, block_size=4, num_selected_blocks=3, compression_ratio=2,
                     compression_block=4, num_layers=2, compress=compress, select_score=score,
                     select_fixed=fixed, gate=gate, rope_theta=100.0 if rope else 0.0)


def test_causality(cfg, seed):
    P = model_params(cfg, seed)
    T = 14
    x = rand((2, T, 6), seed)
    y = tn.model_forward(P, cfg, x, all_positions=True)
    for t in (3, 6, 10):
        x2 = x.clone()
        x2[:, t + 1:] = rand((2, T - t - 1, 6), seed + t)
        y2 = tn.model_forward(P, cfg, x2, all_positions=True)
        close(y2[:, :t + 1], y[:, :t + 1], 1e-12, f"t={t}")
        assert np.max(np.abs((y2[:, t + 1:] - y[:, t + 1:]).numpy())) > 1e-6, "later outputs unchanged"
        close(tn.model_forward(P, cfg, x[:, :t + 1]), y[:, t], 1e-12, f"prefix t={t}")


def test_gradcheck(compress, gate, extra):
    cfg = tn.Config(embed_dim=3, hidden_size=4, num_heads=2, head_dim=2, window_size=3,
                    block_size=2, num_selected_blocks=3, compression_ratio=1,
                    compression_block=2, num_layers=1, compress=compress, gate=gate,
                    vocab_size=5, **extra)
    names = [name for name, _ in tn.param_shapes(cfg)]
    P = model_params(cfg, 3)
    tokens = np.random.default_rng(4).integers(0, 5, size=(2, 7))

    def loss(*ps):
        return tn.lm_loss(dict(zip(names, ps)), cfg, tokens)

    inputs = tuple(P[name].clone().requires_grad_(True) for name in names)
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_lm_loss():
    cfg = tn.Config(embed_dim=5, hidden_size=4, num_heads=2, head_dim=2, block_size=2,
                    num_layers=1, vocab_size=6)
    P = model_params(cfg, 5)
    tokens = np.random.default_rng(6).integers(0, 6, size=(3, 5))
    logits = tn.lm_logits(P, cfg, tokens).detach().numpy()
    total = 0.0
    for b, t in itertools.product(range(3), range(4)):
        row = logits[b, t]
        total += math.log(np.sum(np.exp(row - row.max()))) + row.max() - row[tokens[b, t + 1]]
    close(tn.lm_loss(P, cfg, tokens).item(), total / 12, 1e-13, "loss")


def test_short_sequences():
    # T = 1: o_cmp = 0, o_slc = o_win = v_0
    q, k, v = rand((1, 1, 4, 3), 1), rand((1, 1, 2, 3), 2), rand((1, 1, 2, 3), 3)
    gates = torch.tensor(np.random.default_rng(0).uniform(size=(1, 1, 4, 3)))
    o = tn.nsa_attention(q, k, v, gates, 4, 4, 2, 4, 3, "cmp_attn", "paper")
    want = (gates[..., 1:2] + gates[..., 2:3]) * v.repeat_interleave(2, 2)
    close(o, want, 1e-14, "T=1")
    for compress, score in (("mlp", "cmp_attn"), ("conv", "mean_key")):
        cfg = combo_config(compress, score, "paper", "token", True)
        P = model_params(cfg, 2)
        for T in (1, 2, 3, 5, 7, 9, 13):
            y = tn.model_forward(P, cfg, rand((2, T, 6), T), all_positions=True)
            assert y.shape == (2, T, 8) and torch.isfinite(y).all(), (compress, T)


def test_block_indices():
    B, T, H, G, d, b, n = 2, 15, 4, 2, 3, 3, 3
    q, k, v = rand((B, T, H, d), 1), rand((B, T, G, d), 2), rand((B, T, G, d), 3)
    gates = torch.tensor(np.random.default_rng(0).uniform(size=(B, T, H, 3)))
    o, sel = tn.nsa_attention(q, k, v, gates, b, 4, 3, 6, n, "cmp_attn", "paper",
                              return_selection=True)
    idx = tn.mask_to_indices(sel, n)
    assert (idx[:, 0] == [0, -1, -1]).all(), idx[:, 0]
    o2 = tn.nsa_attention(q, k, v, gates, b, 4, 3, 6, n, block_indices=idx)
    close(o2, o, 0, "given indices")
    # slots reversed, one unused slot, a repeated index, a future block: same keys
    idx5 = np.concatenate([idx[..., ::-1], np.full((B, T, G, 1), -1, np.int32), idx[..., :1]], -1)
    idx5[:, 3, :, -1] = 4  # query 3 (block 1) names block 4: keys in the future, ignored
    o3 = tn.nsa_attention(q, k, v, gates, b, 4, 3, 6, n, block_indices=idx5)
    close(o3, o, 1e-15, "shuffled indices")


def test_cli():
    cfg = tn.Config(embed_dim=5, hidden_size=8, num_heads=4, num_kv_heads=2, head_dim=2,
                    window_size=3, block_size=2, num_selected_blocks=3, compression_ratio=2,
                    compression_block=4, num_layers=2, compress="mlp", select_score="cmp_attn",
                    select_fixed="paper", gate="token", rope_theta=10000.0, vocab_size=11)
    weights = tn.random_params(cfg, 8)
    tokens = np.random.default_rng(9).integers(0, 11, size=(2, 9)).astype(np.int32)
    x = np.random.default_rng(10).standard_normal((2, 9, 5)).astype(np.float32)
    tool = [sys.executable, os.path.join(HERE, "torch_nsa.py")]
    os.environ["OMP_NUM_THREADS"] = "1"  # the subprocesses' tensors are tiny too
    with tempfile.TemporaryDirectory() as tmp:
        ck, tok, xin = (os.path.join(tmp, n) for n in ("m.safetensors", "tok.npy", "x.npy"))
        out, gfile = os.path.join(tmp, "out.npy"), os.path.join(tmp, "g.safetensors")
        tn.write_safetensors(ck, weights, cfg.to_metadata())
        np.save(tok, tokens), np.save(xin, x)
        P = tn.params_from_numpy(cfg, weights, F64)
        for flags in ([], ["--f64"]):
            subprocess.run(tool + ["forward", ck, tok, out] + flags, check=True)
            y = np.load(out)
            assert y.dtype == (np.float64 if flags else np.float32)
            close(y, tn.lm_logits(P, cfg, tokens).detach(), 1e-5, "logits")
        for flags, want in (([], tn.model_forward(P, cfg, torch.tensor(x, dtype=F64))),
                            (["--all"], tn.model_forward(P, cfg, torch.tensor(x, dtype=F64), True))):
            subprocess.run(tool + ["forward", ck, xin, out] + flags, check=True)
            close(np.load(out), want.detach(), 1e-5, "forward " + " ".join(flags))
        subprocess.run(tool + ["grad", ck, tok, gfile, "--f64"], check=True)
        grads, meta = tn.read_safetensors(gfile)
        Pg = {name: p.clone().requires_grad_(True) for name, p in P.items()}
        loss = tn.lm_loss(Pg, cfg, tokens)
        loss.backward()
        close(float(meta["loss"]), loss.item(), 1e-14, "loss")
        assert list(grads) == [name for name, _ in tn.param_shapes(cfg)]
        for name, g in grads.items():
            close(g, Pg[name].grad, 1e-13, name)
            assert np.abs(g).max() > 0, f"{name}: zero gradient"
        assert tn.Config.from_metadata(meta).to_metadata() == cfg.to_metadata()
        np.save(tok, tokens[:, :3])  # T = 3 < l: no compressed token, compress grads are 0
        subprocess.run(tool + ["grad", ck, tok, gfile], check=True)
        grads, _ = tn.read_safetensors(gfile)
        assert grads["layers.0.attn.compress_k.fc1.weight"].max() == 0
        assert np.abs(grads["layers.0.attn.q_proj.weight"]).max() > 0
        # a BF16 checkpoint loads as its rounded values
        tn.write_safetensors(ck, weights, cfg.to_metadata(), bf16=True)
        _, P16 = tn.load_checkpoint(ck, F64)
        for name, w in weights.items():
            close(P16[name], tn.bf16_bits_to_f32(tn.f32_to_bf16_bits(w)), 0, name)
        # a missing tensor is refused with exit status 2
        del weights["layers.1.attn.compress_v.pos"]
        tn.write_safetensors(ck, weights, cfg.to_metadata())
        run = subprocess.run(tool + ["forward", ck, tok, out], capture_output=True, text=True)
        assert run.returncode == 2 and "compress_v.pos" in run.stderr, run.stderr
        # the attention op and its gradients
        B, T, H, G, d = 1, 10, 4, 2, 3
        arrays = {"q": rand((B, T, H, d), 1), "k": rand((B, T, G, d), 2), "v": rand((B, T, G, d), 3),
                  "g": torch.rand(B, T, H, 3, dtype=F64), "dout": rand((B, T, H, d), 4)}
        paths = {name: os.path.join(tmp, name + ".npy") for name in arrays}
        for name, a in arrays.items():
            np.save(paths[name], a.numpy())
        idx_path = os.path.join(tmp, "idx.npy")
        subprocess.run(tool + ["attn", paths["q"], paths["k"], paths["v"], paths["g"], out,
                               "--block-size", "2", "--window-size", "3", "--compression-ratio",
                               "2", "--num-selected-blocks", "3", "--select-score", "cmp_attn",
                               "--indices-out", idx_path, "--dout", paths["dout"],
                               "--grads-out", gfile, "--f64"], check=True)
        leaves = [arrays[n].clone().requires_grad_(True) for n in ("q", "k", "v", "g")]
        o = tn.nsa_attention(*leaves, 2, 3, 2, 2, 3, "cmp_attn")
        o.backward(arrays["dout"])
        close(np.load(out), o.detach(), 1e-14, "attn")
        grads, _ = tn.read_safetensors(gfile)
        for name, leaf in zip(("dq", "dk", "dv", "dgates"), leaves):
            close(grads[name], leaf.grad, 1e-13, name)
        assert np.load(idx_path).shape == (B, T, G, 3)


def main():
    check("safetensors_roundtrip", test_safetensors_roundtrip)
    check("config", test_config)
    check("param_count", test_param_count)
    check("mean_compression_hand", test_mean_compression_hand)
    check("topk_ties", test_topk_ties)
    check("rope", test_rope)
    check("loop_reference", test_loop_reference)
    check("model_loop", test_model_loop)
    check("full_attention", test_full_attention)
    check("short_sequences", test_short_sequences)
    check("block_indices", test_block_indices)
    check("lm_loss", test_lm_loss)
    for seed, combo in enumerate(itertools.product(("mean", "conv", "mlp"), ("mean_key", "cmp_attn"),
                                                   ("none", "paper"), ("static", "token"), (0, 1))):
        name = "causality_{}_{}_{}_{}_rope{}".format(*combo)
        check(name, lambda: test_causality(combo_config(*combo), seed))
    for compress, gate, extra in (
            ("mean", "static", {}),
            ("mean", "token", dict(select_score="cmp_attn", select_fixed="paper")),
            ("conv", "static", dict(rope_theta=10.0, num_kv_heads=1)),
            ("conv", "token", dict(select_score="cmp_attn")),
            ("mlp", "static", dict(select_fixed="paper", rope_theta=10.0)),
            ("mlp", "token", dict(select_score="cmp_attn", select_fixed="paper", num_kv_heads=1,
                                  rope_theta=10.0))):
        check(f"gradcheck_{compress}_{gate}", lambda: test_gradcheck(compress, gate, extra))
    check("cli", test_cli)
    print(f"RESULT {results['passed']} {results['failed']}")
    return 0 if results["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
