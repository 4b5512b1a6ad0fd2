#!/usr/bin/env python3
"""bench_cuda.py — NSA attention on the CUDA backend against PyTorch's
scaled_dot_product_attention (causal) at the paper's shape, timed in the same run.

Runs build/cuda/bench_attn_cuda (the backend's fp32 kernels on device buffers) and, for the
same lengths, SDPA causal in fp32 (the memory-efficient kernel: the flash kernel has no fp32)
and bf16 (the flash kernel), plus the large-GEMM rate of the card (bf16 and fp32 without
TF32) as the machine's measured limits. Prints a Markdown table and writes it to --out.

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


def sdpa_backend(dtype):
    from torch.nn.attention import SDPBackend
    return SDPBackend.FLASH_ATTENTION if dtype == torch.bfloat16 else SDPBackend.EFFICIENT_ATTENTION


def bench_sdpa(T, dtype, reps, warmup, buf):
    from torch.nn.attention import sdpa_kernel
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, H, T, D, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
    k = torch.randn(1, G, T, D, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
    v = torch.randn(1, G, T, D, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
    dout = torch.randn(1, H, T, D, device="cuda", dtype=dtype, generator=gen)
    with sdpa_kernel(sdpa_backend(dtype)):
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


def run_nsa(binary, lens, reps):
    cmd = [binary, "--seq-lens", ",".join(map(str, lens)), "--reps", str(reps)]
    print("+", " ".join(cmd), flush=True)
    res = {}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        print(line, end="", flush=True)
        m = re.match(r"nsa T=(\d+) .*fwd_ms=([\d.]+) fwd_infer_ms=([\d.]+) bwd_ms=([\d.]+) "
                     r"fwd_tflops=([\d.]+) bwd_tflops=([\d.]+)", line)
        if m:
            res[int(m.group(1))] = tuple(float(x) for x in m.groups()[1:])
    if proc.wait() != 0:
        print(f"bench_attn_cuda exited {proc.returncode}", file=sys.stderr)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-lens", default="8192,16384,32768,65536,131072")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench.md"))
    ap.add_argument("--binary", default="build/cuda/bench_attn_cuda")
    ap.add_argument("--fp32-budget-s", type=float, default=90.0,
                    help="skip fp32 SDPA at lengths whose predicted time exceeds this")
    args = ap.parse_args()
    lens = [int(x) for x in args.seq_lens.split(",")]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    buf = torch.empty(64 << 20, dtype=torch.float32, device="cuda")  # 256 MiB L2 flush
    card = torch.cuda.get_device_name()
    print(f"device: {card}; torch {torch.__version__}", flush=True)

    t0 = time.time()
    nsa = run_nsa(args.binary, lens, args.reps)
    print(f"nsa done in {time.time() - t0:.0f} s", flush=True)

    rows = []
    fp32_ms_per_pair = None
    for T in lens:
        row = {"T": T}
        try:
            b = bench_sdpa(T, torch.bfloat16, args.reps, 1, buf)
            row["bf16"] = b
        except Exception as e:  # noqa: BLE001 (report and go on)
            print(f"sdpa bf16 T={T}: {e}", file=sys.stderr)
        runs = args.reps + 1 if T <= 32768 else 1
        pred = None if fp32_ms_per_pair is None else fp32_ms_per_pair * T * T * runs
        if pred is None or pred / 1e3 < args.fp32_budget_s:
            try:
                reps = args.reps if T <= 32768 else 1
                f = bench_sdpa(T, torch.float32, reps, 1 if T <= 32768 else 0, buf)
                row["fp32"] = f
                fp32_ms_per_pair = (f[0] + f[1]) / (T * T)
            except Exception as e:  # noqa: BLE001
                print(f"sdpa fp32 T={T}: {e}", file=sys.stderr)
        else:
            print(f"sdpa fp32 T={T}: skipped (predicted {pred / 1e3:.0f} s)", flush=True)
        print(f"sdpa T={T}: {row}", flush=True)
        rows.append(row)

    g_bf16 = gemm_rate(torch.bfloat16, buf)
    g_fp32 = gemm_rate(torch.float32, buf)

    def cell(x, i):
        return f"{x[i]:.1f}" if x else "—"

    lines = [
        f"NSA attention (this backend, fp32 CUDA cores) vs PyTorch SDPA causal, {card}",
        "",
        f"B=1, H=64, G=4, d=128; NSA l=32 r=16 b=64 n=16 w=512 (cmp_attn, paper fixed blocks). "
        f"Milliseconds, median of {args.reps} (1 for fp32 SDPA past 32k), L2 flushed. "
        f"Large GEMM (8192^3, torch): bf16 {g_bf16:.0f} TFLOP/s, fp32 (no TF32) {g_fp32:.1f} TFLOP/s.",
        "",
        "| T | NSA fwd | NSA fwd (infer) | NSA bwd | NSA fwd TFLOP/s | NSA bwd TFLOP/s "
        "| SDPA fp32 fwd | SDPA fp32 bwd | SDPA bf16 fwd | SDPA bf16 bwd | bf16 fwd TFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        T = row["T"]
        n = nsa.get(T)
        f32, b16 = row.get("fp32"), row.get("bf16")
        lines.append(
            f"| {T} | {cell(n, 0)} | {cell(n, 1)} | {cell(n, 2)} | {cell(n, 3)} | {cell(n, 4)} "
            f"| {cell(f32, 0)} | {cell(f32, 1)} | {cell(b16, 0)} | {cell(b16, 1)} | {cell(b16, 2)} |")
    lines += ["", "NSA TFLOP/s count 4d per attended (head, key) pair over the three paths "
              "(backward x2.5); SDPA counts the causal pairs. fp32 SDPA uses the "
              "memory-efficient kernel; bf16 SDPA the flash kernel."]
    table = "\n".join(lines)
    print(table)
    with open(args.out, "w") as fp:
        fp.write(table + "\n")


if __name__ == "__main__":
    main()
