#!/usr/bin/env python3
"""bench_torch_cpu.py — PyTorch's CPU attention on the shapes of `nsa bench`, as a peer.

Times full causal attention with Debian's python3-torch on the same shapes, threads and
FLOP convention as `nsa bench` (its "dense" rows): forward, and forward + backward
(autograd of sum(out * dout)). With torch >= 2.0 it uses
torch.nn.functional.scaled_dot_product_attention(is_causal=True) (PyTorch's fused CPU
kernel); older torch (Debian 12 ships 1.13) has no fused kernel, so it runs what a user
of that version writes: q @ k^T, a causal mask, softmax, @ v — a T x T matrix per head,
heads taken in groups that fit --mem-gb.

    /usr/bin/python3 bench/bench_torch_cpu.py [--preset paper|seed] [--seq-lens 1024,...]
                                              [--threads N] [--reps N] [--json]

FLOPs (as BENCHMARKS.md): forward 4*d*H*B*T*(T+1)/2 (the causal half; the explicit path
computes the whole square), forward + backward 3.5 x that. Medians of --reps runs after a
warm-up.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

PRESETS = {
    # B, H, G, d
    "paper": (1, 16, 4, 64),
    "seed": (1, 8, 8, 32),
}


def causal_flops(B, H, T, d):
    return 4.0 * d * H * B * T * (T + 1) / 2.0


def has_sdpa():
    return hasattr(F, "scaled_dot_product_attention")


def attention(q, k, v, heads_per_chunk):
    """q [B,H,T,d], k, v [B,H,T,d] (kv heads already repeated) -> out [B,H,T,d]."""
    if has_sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    T, d = q.shape[2], q.shape[3]
    mask = torch.ones(T, T, dtype=torch.bool).triu_(1)
    outs = []
    for h0 in range(0, q.shape[1], heads_per_chunk):
        h1 = min(q.shape[1], h0 + heads_per_chunk)
        s = torch.matmul(q[:, h0:h1], k[:, h0:h1].transpose(-1, -2)) * (1.0 / math.sqrt(d))
        s = s.masked_fill(mask, float("-inf"))
        outs.append(torch.matmul(torch.softmax(s, dim=-1), v[:, h0:h1]))
    return torch.cat(outs, dim=1)


def timed(fn, reps, max_seconds):
    fn()  # warm-up
    times = []
    spent = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if spent > max_seconds:
            break
    return statistics.median(times), len(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    ap.add_argument("--seq-lens", default="1024,2048,4096,8192,16384")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=30.0)
    ap.add_argument("--mem-gb", type=float, default=6.0,
                    help="memory for the explicit path's T x T matrices (torch < 2.0)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B, H, G, d = PRESETS[args.preset]
    lens = [int(x) for x in args.seq_lens.split(",")]
    impl = "sdpa" if has_sdpa() else "explicit (matmul, mask, softmax, matmul)"
    results = []
    for T in lens:
        gen = torch.Generator().manual_seed(T)
        q = torch.rand(B, H, T, d, generator=gen) * 2 - 1
        k = (torch.rand(B, G, T, d, generator=gen) * 2 - 1).repeat_interleave(H // G, dim=1)
        v = (torch.rand(B, G, T, d, generator=gen) * 2 - 1).repeat_interleave(H // G, dim=1)
        dout = torch.rand(B, H, T, d, generator=gen) * 2 - 1
        # the explicit path holds ~3 T x T floats per head in flight with autograd
        per_head = 3 * T * T * 4 / 1e9
        chunk = max(1, min(H, int(args.mem_gb / per_head))) if not has_sdpa() else H
        if not has_sdpa() and per_head > args.mem_gb:
            print(f"T={T}: skipped (a head's T x T matrices need {per_head:.1f} GB > --mem-gb)",
                  file=sys.stderr)
            continue
        flops = causal_flops(B, H, T, d)
        with torch.no_grad():
            fwd, n_fwd = timed(lambda: attention(q, k, v, chunk), args.reps, args.max_seconds)

        def fwd_bwd():
            qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
            out = attention(qq, kk, vv, chunk)
            out.backward(dout)

        fb, n_fb = timed(fwd_bwd, args.reps, args.max_seconds)
        for name, sec, runs, f in (("fwd", fwd, n_fwd, flops), ("fwd+bwd", fb, n_fb, 3.5 * flops)):
            results.append({"impl": "torch", "pass": name, "T": T, "ms": 1e3 * sec, "runs": runs,
                            "gflop": f / 1e9, "gflops": f / sec / 1e9})
        print(f"T={T} done", file=sys.stderr)
    meta = {"torch": torch.__version__, "threads": args.threads, "kernel": impl,
            "shape": {"B": B, "H": H, "G": G, "d": d}}
    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=1))
        return 0
    print(f"PyTorch {torch.__version__} CPU attention ({impl}), {args.threads} threads, "
          f"B={B} H={H} G={G} d={d}, causal")
    print(f"{'T':>7} {'pass':<8} {'ms':>11} {'GFLOP':>10} {'GFLOP/s':>9}")
    for r in results:
        print(f"{r['T']:>7} {r['pass']:<8} {r['ms']:>11.1f} {r['gflop']:>10.2f} {r['gflops']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
