#!/usr/bin/env python3
"""bench_cuda.py — NSA attention on the CUDA backend against PyTorch's
scaled_dot_product_attention (causal) at the paper's shape, timed in the same run.

Runs build/cuda/bench_attn_cuda (the backend's kernels on device buffers; bf16 operands by
default, --nsa-dtype both adds the fp32 kernels) and, for the same lengths, SDPA causal in bf16
with cuDNN and with the flash kernel (FA2), plus the large bf16 GEMM rate of the card as the
machine's measured limit. Prints a Markdown table and writes it to --out.

Shape: B = 1, 64 query heads, 4 kv heads, head dim 128 (SDPA gets the kv heads repeated, as
GQA is computed); NSA: l = 32, r = 16, b = 64, n = 16, w = 512. Timing: CUDA events, warm-up,
L2 flushed before each run, median.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

H, G, D = 64, 4, 128


def flush_l2(buf):
    buf.zero_()


def timed(fn, reps, warmup, buf):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ms = []
    for _ in range(reps):
        flush_l2(buf)
        torch.cuda.synchronize()
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        ms.append(e0.elapsed_time(e1))
    return statistics.median(ms)


def sdpa_backends():
    from torch.nn.attention import SDPBackend
    out = {"flash": SDPBackend.FLASH_ATTENTION}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        out["cudnn"] = SDPBackend.CUDNN_ATTENTION
    return out


def bench_sdpa(T, dtype, backend, reps, warmup, buf):
    from torch.nn.attention import sdpa_kernel
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, H, T, D, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
    k = torch.randn(1, G, T, D, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
    v = torch.randn(1, G, T, D, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
    dout = torch.randn(1, H, T, D, device="cuda", dtype=dtype, generator=gen)
    with sdpa_kernel(backend):
        def fwd():
            kk = k.repeat_interleave(H // G, dim=1)
            vv = v.repeat_interleave(H // G, dim=1)
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)

        with torch.no_grad():
            f_ms = timed(fwd, reps, warmup, buf)
        out = fwd()

        def bwd():
            torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

        b_ms = timed(bwd, reps, warmup, buf)
    del out, q, k, v, dout
    torch.cuda.empty_cache()
    flops = 4.0 * D * H * T * (T + 1) / 2  # causal pairs
    return f_ms, b_ms, flops / (f_ms * 1e-3) / 1e12, 2.5 * flops / (b_ms * 1e-3) / 1e12


def gemm_rate(dtype, buf, n=8192):
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = timed(lambda: a @ b, 5, 2, buf)
    del a, b
    return 2.0 * n ** 3 / (ms * 1e-3) / 1e12


def run_nsa(binary, lens, reps, dtype):
    cmd = [binary, "--seq-lens", ",".join(map(str, lens)), "--reps", str(reps), "--dtype", dtype]
    print("+", " ".join(cmd), flush=True)
    res = {}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        print(line, end="", flush=True)
        m = re.match(r"nsa dtype=(\w+) T=(\d+) .*fwd_ms=([\d.]+) fwd_infer_ms=([\d.]+) "
                     r"bwd_ms=([\d.na]+) fwd_tflops=([\d.]+) bwd_tflops=([\d.na]+)", line)
        if m:
            res[(m.group(1), int(m.group(2)))] = tuple(float(x) for x in m.groups()[2:])
    if proc.wait() != 0:
        print(f"bench_attn_cuda exited {proc.returncode}", file=sys.stderr)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-lens", default="8192,16384,32768,65536,131072")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench.md"))
    ap.add_argument("--binary", default="build/cuda/bench_attn_cuda")
    ap.add_argument("--nsa-dtype", default="bf16", choices=["bf16", "fp32", "both"])
    args = ap.parse_args()
    lens = [int(x) for x in args.seq_lens.split(",")]
    buf = torch.empty(64 << 20, dtype=torch.float32, device="cuda")  # 256 MiB L2 flush
    card = torch.cuda.get_device_name()
    print(f"device: {card}; torch {torch.__version__}", flush=True)

    t0 = time.time()
    nsa = run_nsa(args.binary, lens, args.reps, args.nsa_dtype)
    print(f"nsa done in {time.time() - t0:.0f} s", flush=True)

    backends = sdpa_backends()
    rows = []
    for T in lens:
        row = {"T": T}
        for name, be in backends.items():
            try:
                row[name] = bench_sdpa(T, torch.bfloat16, be, args.reps if T <= 65536 else 2, 1, buf)
            except Exception as e:  # noqa: BLE001 (report and go on)
                print(f"sdpa {name} T={T}: {str(e)[:200]}", file=sys.stderr)
        print(f"sdpa T={T}: {row}", flush=True)
        rows.append(row)
    g_bf16 = gemm_rate(torch.bfloat16, buf)

    def cell(x, i, fmt="{:.1f}"):
        return fmt.format(x[i]) if x and x[i] == x[i] else "—"

    dtypes = ["bf16", "fp32"] if args.nsa_dtype == "both" else [args.nsa_dtype]
    lines = [
        f"NSA attention (this backend) vs PyTorch SDPA causal (bf16), {card}, torch {torch.__version__}",
        "",
        f"B=1, H=64, G=4, d=128; NSA l=32 r=16 b=64 n=16 w=512 (cmp_attn, paper fixed blocks). "
        f"Milliseconds, median of {args.reps} (3 for NSA past 32k), L2 flushed before each run. "
        f"Large bf16 GEMM (8192^3, torch): {g_bf16:.0f} TFLOP/s.",
        "",
        "| T | NSA | fwd | fwd (infer) | bwd | fwd TFLOP/s (% GEMM) | bwd TFLOP/s (% GEMM) "
        "| cuDNN fwd / bwd | FA2 fwd / bwd | NSA fwd, bwd vs cuDNN |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        T = row["T"]
        cu, fl = row.get("cudnn"), row.get("flash")
        for dt in dtypes:
            n = nsa.get((dt, T))
            pct = lambda x: f"{x:.1f} ({100 * x / g_bf16:.0f}%)" if x == x else "—"
            speed = "—"
            if n and cu:
                speed = f"{cu[0] / n[0]:.2f}x, " + (f"{cu[1] / n[2]:.2f}x" if n[2] == n[2] else "—")
            lines.append(
                f"| {T} | {dt} | {cell(n, 0)} | {cell(n, 1)} | {cell(n, 2)} "
                f"| {pct(n[3]) if n else '—'} | {pct(n[4]) if n else '—'} "
                f"| {cell(cu, 0)} / {cell(cu, 1)} | {cell(fl, 0)} / {cell(fl, 1)} | {speed} |")
    lines += ["", "NSA TFLOP/s count 4d per attended (head, key) pair over the three paths "
              "(backward x2.5); SDPA attends every causal pair. NSA bf16: bf16 q/k/v on tensor "
              "cores, fp32 accumulation, fp32 outputs and gradients."]
    table = "\n".join(lines)
    print(table)
    with open(args.out, "w") as fp:
        fp.write(table + "\n")


if __name__ == "__main__":
    main()
