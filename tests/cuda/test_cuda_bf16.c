/*
 * test_cuda_bf16.c — the CUDA backend's bf16 tensor-core attention against the CPU
 * backend. The inputs are rounded to bf16 on the host; the CPU computes in fp32 on those
 * rounded values (the exact math on the same numbers) and the GPU on the bf16 operands with
 * fp32 accumulation.
 *
 * Checks, per shape (GQA group sizes 1..16, head dims 32..128, both block scores, the
 * paper's fixed blocks, given indices, odd T, cached-generation queries):
 *   - selection: the GPU's fused scoring + top-k picks the CPU's blocks; a block whose score
 *     differs from another's by rounding may swap, so at most 1% of rows may differ;
 *   - forward with the CPU's selection: out, o_paths, lse within TOL_BF16 (max |gpu - cpu| /
 *     max |cpu|); the probabilities enter P V as bf16 (2^-9 relative), the rest is fp32;
 *   - backward (when the backend has one) from the CPU's forward: dq, dk, dv, dkc, dvc,
 *     dgates within TOL_BF16.
 * Without a CUDA device the test prints "skip: no CUDA device" and "RESULT 0 0".
 */
#include "backend.h"
#include "cuda_util.h"
#include "harness.h"
#include "nsa.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOL_BF16 1e-2

static nsa_context *cpu, *gpu, *gpu_mt1;

// Set by the variants test: the selected path's kernels (the backend's attn_kernels line)
// a switch must bring where its conditions hold (H/G 16, 32 or 64, block_size <= 64), the
// forward's with the paper's fixed selection in expect_fwd_paper when it differs; NULL: no
// expectation.
static const char *expect_fwd, *expect_fwd_paper, *expect_dq;

static int kernels_expected(const attn_case *c)
{
    int hpg = c->H / c->G;
    return (hpg == 16 || hpg == 32 || hpg == 64) && c->b <= 64;
}

// The kernels line holds `want` (when given and the case qualifies).
static void check_kernels(const attn_case *c, const char *want)
{
    const char *line = OPS(gpu)->attn_kernels ? OPS(gpu)->attn_kernels(gpu) : "";
    if (!want || !kernels_expected(c))
        return;
    printf("    %-34s %s\n", "kernels", line);
    CHECKF(strstr(line, want) != NULL, "%s: the switch should have run %s, ran: %s", c->name,
           want, line);
}

static uint16_t f2bf(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static float bf2f(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// x rounded to bf16 in place; the bf16 bits in a new array.
static uint16_t *to_bf16(float *x, size_t n)
{
    uint16_t *h = malloc(sizeof(uint16_t) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) {
        h[i] = f2bf(x[i]);
        x[i] = bf2f(h[i]);
    }
    return h;
}

// Random valid selections: per row 1..min(n, candidates) distinct blocks, ascending,
// -1 padded; every 23rd position none (all -1).
static void random_indices(int32_t *idx, int B, int T, int G, int n, int b)
{
    for (int bb = 0; bb < B; bb++)
        for (int t = 0; t < T; t++)
            for (int g = 0; g < G; g++) {
                int32_t *row = idx + (((size_t)bb * T + t) * G + g) * n;
                int ncand = t / b + 1, m = 0;
                if (t % 23 == 7) // now and then a selection without blocks (all slots -1)
                    ncand = 0;
                for (int i = 0; i < ncand && m < n; i++)
                    if (ncand - i <= n - m || test_rng_next(&rng) % 3 == 0)
                        row[m++] = i;
                for (int s = m; s < n; s++)
                    row[s] = -1;
            }
}

static void *dput16(nsa_context *c, const uint16_t *h, size_t n)
{
    return dput(c, h, n * sizeof(uint16_t));
}

// After a failed comparison of a [B,T,H,d] output: how many rows are off (max |gpu - cpu|
// over a row beyond tol times the largest |cpu|), and the first few with their position,
// head and selection, to tell a kernel's mistake from another's on one device run.
static void report_bad_rows(const char *what, nsa_context *g, const float *dev, const float *ref,
                            const attn_case *c, const int32_t *sel)
{
    size_t rows = (size_t)c->B * c->T * c->H, n = rows * c->d, bad = 0;
    float *h = malloc(sizeof(float) * n);
    dget(g, h, dev, n * sizeof(float));
    double scale = ref_scale(ref, n, 0.0);
    for (size_t r = 0; r < rows; r++) {
        double e = 0.0;
        for (int j = 0; j < c->d; j++)
            e = fmax(e, abs_err(h[r * c->d + j], ref[r * c->d + j]));
        if (!(e <= TOL_BF16 * scale) && bad++ < 6) {
            int hh = (int)(r % c->H), t = (int)(r / c->H % c->T), b = (int)(r / c->H / c->T);
            const int32_t *row = sel + (((size_t)b * c->T + t) * c->G + hh / (c->H / c->G)) * c->n;
            fprintf(stderr, "  rows: %s b=%d t=%d h=%d off by %.3g (scale %.3g), blocks", what, b,
                    t, hh, e, scale);
            for (int i = 0; i < c->n; i++)
                fprintf(stderr, " %d", (int)row[i]);
            fprintf(stderr, "\n");
        }
    }
    fprintf(stderr, "  rows: %s: %zu of %zu rows off\n", what, bad, rows);
    free(h);
}

static void bf16_case(const attn_case *c)
{
    nsa__attn_dims dm;
    dims_of(&dm, c);
    int B = c->B, T = c->T, H = c->H, G = c->G, d = c->d, n = c->n, Tc = dm.num_cmp;
    size_t nq = (size_t)B * T * H * d, nkv = (size_t)B * T * G * d, nkvc = (size_t)B * Tc * G * d;
    size_t ng = (size_t)B * T * H * 3, nidx = (size_t)B * T * G * n;
    printf("  %s: B=%d T=%d H=%d G=%d d=%d b=%d w=%d r=%d l=%d n=%d %s%s%s\n", c->name, B, T, H,
           G, d, c->b, c->w, c->r, c->l, n, c->score == NSA_SELECT_CMP_ATTN ? "cmp_attn" : "mean_key",
           c->fixed == NSA_SELECT_FIXED_PAPER ? " paper" : "", c->given ? " given" : "");
    float *q = hrand(nq, 1.5), *k = hrand(nkv, 1.5), *v = hrand(nkv, 1.0);
    float *gates = hrange(ng, 0.05, 1.0);
    float *kc = hnan(nkvc), *vc = hnan(nkvc);
    OK(OPS(cpu)->compress_forward(cpu, kc, k, NULL, B, T, G, d, c->l, c->r));
    OK(OPS(cpu)->compress_forward(cpu, vc, v, NULL, B, T, G, d, c->l, c->r));
    uint16_t *q16 = to_bf16(q, nq), *k16 = to_bf16(k, nkv), *v16 = to_bf16(v, nkv);
    uint16_t *kc16 = to_bf16(kc, nkvc), *vc16 = to_bf16(vc, nkvc);
    int32_t *given = NULL;
    if (c->given) {
        given = malloc(nidx * sizeof(int32_t));
        random_indices(given, B, T, G, n, c->b);
    }
    int32_t *idx = malloc(nidx * 4), *gidx = malloc(nidx * 4);
    float *out = hnan(nq), *op = hnan(3 * nq), *lse = hnan(ng);
    OK(OPS(cpu)->attn_forward(cpu, &dm, q, k, v, kc, vc, gates, given, idx, out, op, lse));

    void *dq_ = dput16(gpu, q16, nq), *dk_ = dput16(gpu, k16, nkv), *dv_ = dput16(gpu, v16, nkv);
    void *dkc = dput16(gpu, kc16, nkvc), *dvc = dput16(gpu, vc16, nkvc);
    float *dg = dput(gpu, gates, ng * 4);
    float *pnq = hnan(3 * nq), *png = hnan(ng);
    int32_t *didx = dput(gpu, idx, nidx * 4), *dgiven = dput(gpu, idx, nidx * 4);
    float *dout = dput(gpu, pnq, nq * 4), *dop = dput(gpu, pnq, 3 * nq * 4);
    float *dlse = dput(gpu, png, ng * 4);

    // 1. selection by the GPU (fused scoring + top-k) against the CPU's
    if (!c->given) {
        OK(OPS(gpu)->attn_forward_bf16(gpu, &dm, dq_, dk_, dv_, dkc, dvc, dg, NULL, didx, dout,
                                       dop, dlse));
        dget(gpu, gidx, didx, nidx * 4);
        size_t rows = nidx / n, bad = 0;
        for (size_t i = 0; i < rows; i++)
            bad += memcmp(gidx + i * n, idx + i * n, sizeof(int32_t) * n) != 0;
        printf("    %-34s %zu of %zu rows differ\n", "selected blocks", bad, rows);
        CHECKF(bad * 100 <= rows, "selection: %zu of %zu rows differ from the CPU's", bad, rows);
    }
    // 2. forward with the CPU's selection
    OK(OPS(gpu)->attn_forward_bf16(gpu, &dm, dq_, dk_, dv_, dkc, dvc, dg, dgiven, didx, dout, dop,
                                   dlse));
    check_kernels(c, c->fixed == NSA_SELECT_FIXED_PAPER && expect_fwd_paper ? expect_fwd_paper
                                                                             : expect_fwd);
    if (!cmp_dev("bf16 forward out", gpu, dout, out, nq, TOL_BF16))
        report_bad_rows("out", gpu, dout, out, c, idx);
    cmp_dev("bf16 forward o_cmp", gpu, dop, op, nq, TOL_BF16);
    if (!cmp_dev("bf16 forward o_slc", gpu, dop + nq, op + nq, nq, TOL_BF16))
        report_bad_rows("o_slc", gpu, dop + nq, op + nq, c, idx);
    cmp_dev("bf16 forward o_win", gpu, dop + 2 * nq, op + 2 * nq, nq, TOL_BF16);
    cmp_dev("bf16 forward lse", gpu, dlse, lse, ng, TOL_BF16);
    float *kept = hnan(nq), *infer = hnan(nq);
    dget(gpu, kept, dout, nq * 4);
    OK(OPS(gpu)->upload(gpu, dout, pnq, nq * 4));
    OK(OPS(gpu)->attn_forward_bf16(gpu, &dm, dq_, dk_, dv_, dkc, dvc, dg, dgiven, didx, dout, NULL,
                                   NULL));
    cmp_dev("bf16 forward out (inference)", gpu, dout, out, nq, TOL_BF16);
    // the inference run (no o_paths, no lse kept) forms the gated sum from the same values in
    // the same order: the same bits
    dget(gpu, infer, dout, nq * 4);
    CHECKF(memcmp(kept, infer, nq * 4) == 0,
           "bf16 forward out: the inference run differs in its bits from the run that keeps "
           "o_paths");
    free(kept);
    free(infer);
    if (B == 1) { // cached generation: queries at [qs, T)
        int qs = T - 1 - T / 3, Tq = T - qs;
        nsa__attn_dims dq = dm;
        dq.q_start = qs;
        void *dqq = dput16(gpu, q16 + (size_t)qs * H * d, (size_t)Tq * H * d);
        float *dgq = dput(gpu, gates + (size_t)qs * H * 3, (size_t)Tq * H * 3 * 4);
        int32_t *dgi = dput(gpu, idx + (size_t)qs * G * n, (size_t)Tq * G * n * 4);
        OK(OPS(gpu)->attn_forward_bf16(gpu, &dq, dqq, dk_, dv_, dkc, dvc, dgq, dgi, didx, dout,
                                       NULL, NULL));
        cmp_dev("bf16 forward out (q_start)", gpu, dout, out + (size_t)qs * H * d,
                (size_t)Tq * H * d, TOL_BF16);
        dfree(gpu, dqq);
        dfree(gpu, dgq);
        dfree(gpu, dgi);
    }

    // 3. backward from the CPU's forward
    if (OPS(gpu)->attn_backward_bf16) {
        float *gout = hrand(nq, 1.0);
        float *gq = hnan(nq), *gk = hnan(nkv), *gv = hnan(nkv), *gkc = hnan(nkvc);
        float *gvc = hnan(nkvc), *ggt = hnan(ng);
        OK(OPS(cpu)->attn_backward(cpu, &dm, q, k, v, kc, vc, gates, idx, op, lse, gout, gq, gk,
                                   gv, gkc, gvc, ggt));
        OK(OPS(gpu)->upload(gpu, didx, idx, nidx * 4)); // the q_start run overwrote it
        OK(OPS(gpu)->upload(gpu, dop, op, 3 * nq * 4));
        OK(OPS(gpu)->upload(gpu, dlse, lse, ng * 4));
        float *dgout = dput(gpu, gout, nq * 4);
        float *e_q = dput(gpu, pnq, nq * 4), *e_k = dput(gpu, pnq, nkv * 4);
        float *e_v = dput(gpu, pnq, nkv * 4), *e_kc = dput(gpu, pnq, nkvc * 4);
        float *e_vc = dput(gpu, pnq, nkvc * 4), *e_g = dput(gpu, png, ng * 4);
        OK(OPS(gpu)->attn_backward_bf16(gpu, &dm, dq_, dk_, dv_, dkc, dvc, dg, didx, dop, dlse,
                                        dgout, e_q, e_k, e_v, e_kc, e_vc, e_g));
        check_kernels(c, expect_dq);
        cmp_dev("bf16 backward dq", gpu, e_q, gq, nq, TOL_BF16);
        cmp_dev("bf16 backward dk", gpu, e_k, gk, nkv, TOL_BF16);
        cmp_dev("bf16 backward dv", gpu, e_v, gv, nkv, TOL_BF16);
        cmp_dev_floor("bf16 backward dkc", gpu, e_kc, gkc, nkvc, TOL_BF16, max_abs(gk, nkv));
        cmp_dev_floor("bf16 backward dvc", gpu, e_vc, gvc, nkvc, TOL_BF16, max_abs(gv, nkv));
        cmp_dev("bf16 backward dgates", gpu, e_g, ggt, ng, TOL_BF16);
        void *dall[] = {dgout, e_q, e_k, e_v, e_kc, e_vc, e_g};
        for (size_t i = 0; i < sizeof dall / sizeof dall[0]; i++)
            dfree(gpu, dall[i]);
        void *hall[] = {gout, gq, gk, gv, gkc, gvc, ggt};
        for (size_t i = 0; i < sizeof hall / sizeof hall[0]; i++)
            free(hall[i]);
    }

    void *dall[] = {dq_, dk_, dv_, dkc, dvc, dg, didx, dgiven, dout, dop, dlse};
    for (size_t i = 0; i < sizeof dall / sizeof dall[0]; i++)
        dfree(gpu, dall[i]);
    void *hall[] = {q, k, v, gates, kc, vc, q16, k16, v16, kc16, vc16, given, idx, gidx, out,
                    op, lse, pnq, png};
    for (size_t i = 0; i < sizeof hall / sizeof hall[0]; i++)
        free(hall[i]);
}

static const attn_case cases[] = {
    // name                    B  T    H   G  d    b   w    r   l   n  score  fixed  given
    {"gqa16_d128_paper_shape", 1, 1100, 32, 2, 128, 64, 128, 16, 32, 6, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_PAPER, 0},
    {"gqa16_d64_given", 2, 300, 16, 1, 64, 32, 64, 16, 32, 4, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_NONE, 1},
    // two batch entries and kv heads, a head dim that is not a multiple of 64 (the padded
    // columns of the 128-wide tiles)
    {"gqa16_d96_b2_g2", 2, 260, 32, 2, 96, 64, 64, 16, 32, 4, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_PAPER, 0},
    // given blocks under the paper's fixed selection: a position need not hold block 0 or its
    // two most recent blocks, which the warp-per-position kernels load once a thread block
    {"gqa16_d128_given_fixed", 1, 700, 16, 1, 128, 32, 64, 16, 32, 5, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_PAPER, 1},
    {"gqa4_d128_cmpattn_odd", 1, 301, 8, 2, 128, 32, 64, 16, 32, 5, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_PAPER, 0},
    {"gqa1_d64_meankey", 2, 203, 4, 4, 64, 16, 40, 8, 16, 4, NSA_SELECT_MEAN_KEY, NSA_SELECT_FIXED_NONE, 0},
    {"gqa2_d32_small_blocks", 1, 150, 4, 2, 32, 8, 20, 4, 8, 5, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_NONE, 0},
    {"gqa3_d40_unfused", 1, 150, 6, 2, 40, 12, 30, 6, 12, 3, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_PAPER, 0},
    {"gqa8_d128_big_blocks", 1, 333, 8, 1, 128, 100, 70, 10, 20, 2, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_NONE, 0},
    {"tiny_T5", 1, 5, 4, 1, 64, 4, 3, 2, 4, 3, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_PAPER, 0},
    {"gqa32_d64_wide_positions", 1, 200, 32, 1, 64, 16, 32, 8, 16, 4, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_PAPER, 0},
    // one position a scoring tile with an odd block count (the per-chunk sums' alignment)
    {"gqa64_d64_odd_blocks", 1, 200, 64, 1, 64, 16, 32, 8, 16, 4, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_PAPER, 0},
    // positions spanning two warps over three scoring chunks (the warps exchange their head
    // sums through shared memory each chunk)
    {"gqa32_d64_wide_chunks", 1, 1100, 32, 1, 64, 16, 32, 8, 16, 4, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_PAPER, 0},
    // H/G = 8 with B, G > 1: the selected path's dk/dv rows by TMA, one box a position, slots
    // past a list's end read as zeros
    {"gqa8_d128_tma_rows", 2, 400, 16, 2, 128, 32, 64, 16, 32, 5, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_PAPER, 0},
    // more than 16 selected blocks (25 candidates at the end; NSA_CUDA_SLC_KC=5 merges such
    // rows a warp a row instead of half a warp)
    {"gqa16_d64_n20", 1, 400, 16, 1, 64, 16, 32, 8, 16, 20, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_PAPER, 0},
};

static void test_bf16_attention(void)
{
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        bf16_case(&cases[i]);
}

// The other kernel variants: the compressed and window forward by the warp kernel, 16 rows
// a warp (NSA_CUDA_BF16_MT=1), instead of the warpgroup kernels, and the
// selected path by union tiles (NSA_CUDA_BF16_SLC=union) for every group size (by default
// H/G a multiple of 16 runs a warp per position, smaller groups key blocks outside).
static void test_bf16_attention_mt1(void)
{
    nsa_context *keep = gpu;
    gpu = gpu_mt1;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i += 2)
        bf16_case(&cases[i]);
    gpu = keep;
}

// Tuning variants of the kernels, each in a context of its own: the warp-per-position
// selected kernels (the cases with H/G a multiple of 16) in every chunking of SLCW_CONFIGS
// (src/cuda/attention_bf16.cuh; each id for the forward and dq alike, where the default
// takes 2 and 0) and with the blocks
// common to a thread block's positions loaded per warp; the compressed and window forward
// with two warpgroups a block and 128-key chunks (both paths, or the compressed one), two
// warpgroups with key tiles by cp.async instead of TMA, one warpgroup (forward and dq), and
// the default three with cp.async, every kernel on the context's one stream (every case);
// the selected path's dq as bf16 and as fp32 partials from the dk/dv kernel instead of by
// the query-centric kernel, the first also on one stream; the selected forward with key
// blocks outside (bf16 partials, fp32, bf16 with two row stages on one stream, bf16 with the
// fused dq, bf16 with the fixed blocks by the warp kernel, on two streams and on one, and
// over chunks of positions merged in the kernel: 64 positions a chunk, 16, and 4096, one
// chunk whose lists are cut into work items; `auto`, which picks the chunks for these short
// sequences) (these H/G a multiple of 16).
// Where a switch's conditions hold, the kernels it names must be the ones that ran.
static void test_bf16_variants(void)
{
    static const struct {
        const char *var, *val, *var2, *val2; // var2 NULL: one variable
        int warp_slc_only;
        const char *fwd, *dq; // the kernels it must run (check_kernels), or NULL
        const char *fwd_paper; // the forward's with the paper's fixed selection (NULL: fwd)
    } vars[] = {
        {"NSA_CUDA_SLCW", "0", NULL, NULL, 1, "slc_fwd=warp(slcw=0)", "slc_dq=warp(slcw=0)",
         NULL},
        {"NSA_CUDA_SLCW", "1", NULL, NULL, 1, "slc_fwd=warp(slcw=1)", "slc_dq=warp(slcw=1)",
         NULL},
        {"NSA_CUDA_SLCW", "2", NULL, NULL, 1, "slc_fwd=warp(slcw=2)", "slc_dq=warp(slcw=2)",
         NULL},
        {"NSA_CUDA_SLC_SHARE", "0", NULL, NULL, 1, NULL, NULL, NULL},
        {"NSA_CUDA_BF16_WG", "2", "NSA_CUDA_RANGE_KC", "128", 0, NULL, NULL, NULL},
        {"NSA_CUDA_BF16_WG", "2", "NSA_CUDA_TMA", "0", 0, NULL, NULL, NULL},
        {"NSA_CUDA_BF16_WG", "2", "NSA_CUDA_RANGE_KC", "128,64", 0, NULL, NULL, NULL},
        {"NSA_CUDA_BF16_WG", "1", NULL, NULL, 0, NULL, NULL, NULL},
        {"NSA_CUDA_TMA", "0", "NSA_CUDA_STREAMS", "0", 0, NULL, NULL, NULL},
        {"NSA_CUDA_DQ_FUSED", "1", NULL, NULL, 1, NULL, "slc_dq=dkv(bf16)", NULL},
        {"NSA_CUDA_DQ_FUSED", "2", NULL, NULL, 1, NULL, "slc_dq=dkv(fp32)", NULL},
        {"NSA_CUDA_DQ_FUSED", "1", "NSA_CUDA_STREAMS", "0", 1, NULL, "slc_dq=dkv(bf16)", NULL},
        {"NSA_CUDA_SLC_KC", "1", NULL, NULL, 1, "slc_fwd=kc(bf16)", NULL, NULL},
        {"NSA_CUDA_SLC_KC", "2", NULL, NULL, 1, "slc_fwd=kc(fp32)", NULL, NULL},
        {"NSA_CUDA_SLC_KC", "3", "NSA_CUDA_STREAMS", "0", 1, "slc_fwd=kc(bf16,2st)", NULL, NULL},
        {"NSA_CUDA_SLC_KC", "1", "NSA_CUDA_DQ_FUSED", "1", 1, "slc_fwd=kc(bf16)",
         "slc_dq=dkv(bf16)", NULL},
        {"NSA_CUDA_SLC_KC", "4", NULL, NULL, 1, "slc_fwd=kc(bf16)", NULL,
         "slc_fwd=kc(bf16,fixed)"},
        {"NSA_CUDA_SLC_KC", "4", "NSA_CUDA_STREAMS", "0", 1, "slc_fwd=kc(bf16)", NULL,
         "slc_fwd=kc(bf16,fixed)"},
        {"NSA_CUDA_SLC_KC", "5", NULL, NULL, 1, "slc_fwd=kc(bf16,chunked)", NULL, NULL},
        {"NSA_CUDA_SLC_KC", "5", "NSA_CUDA_KC_CHUNK", "16", 1, "slc_fwd=kc(bf16,chunked)", NULL,
         NULL},
        {"NSA_CUDA_SLC_KC", "5", "NSA_CUDA_KC_CHUNK", "4096", 1, "slc_fwd=kc(bf16,chunked)", NULL,
         NULL},
        {"NSA_CUDA_SLC_KC", "auto", NULL, NULL, 1, "slc_fwd=kc(bf16,chunked)", NULL, NULL},
    };
    nsa_context *keep = gpu;
    for (size_t v = 0; v < sizeof vars / sizeof vars[0]; v++) {
        setenv(vars[v].var, vars[v].val, 1);
        if (vars[v].var2)
            setenv(vars[v].var2, vars[v].val2, 1);
        nsa_status st = nsa_context_create(&gpu, NSA_DEVICE_CUDA, 0);
        unsetenv(vars[v].var);
        if (vars[v].var2)
            unsetenv(vars[v].var2);
        CHECKF(st == NSA_OK, "context: %s", nsa_last_error());
        if (st != NSA_OK)
            break;
        printf("  %s=%s %s=%s\n", vars[v].var, vars[v].val, vars[v].var2 ? vars[v].var2 : "",
               vars[v].var2 ? vars[v].val2 : "");
        expect_fwd = vars[v].fwd;
        expect_fwd_paper = vars[v].fwd_paper;
        expect_dq = vars[v].dq;
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
            if (!vars[v].warp_slc_only || (cases[i].H / cases[i].G) % 16 == 0)
                bf16_case(&cases[i]);
        expect_fwd = expect_fwd_paper = expect_dq = NULL;
        nsa_context_free(gpu);
    }
    gpu = keep;
}

static void test_bf16_race(void)
{
    static const attn_case race = {"race", 1, 140, 16, 1, 64, 16, 24, 8, 16, 3, NSA_SELECT_CMP_ATTN,
                               NSA_SELECT_FIXED_PAPER, 0};
    // a small group (H/G = 4): the selected path with key blocks outside
    static const attn_case race4 = {"race_gqa4", 1, 140, 8, 2, 64, 16, 24, 8, 16, 3,
                                    NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_PAPER, 0};
    // H/G = 32 over two scoring chunks (warps exchange head sums through shared memory)
    static const attn_case race32 = {"race_gqa32", 1, 560, 32, 1, 64, 16, 24, 8, 16, 3,
                                     NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_PAPER, 0};
    // n = 6 under the fixed selection: three blocks by score (with NSA_CUDA_SLC_KC=4 the
    // key-centric kernel's, beside the warp kernel's fixed ones; with 5, 300 positions are
    // five chunks)
    static const attn_case race_kc = {"race_kc", 1, 300, 16, 1, 64, 16, 24, 8, 16, 6,
                                      NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_PAPER, 0};
    bf16_case(&race);
    bf16_case(&race4);
    bf16_case(&race32);
    bf16_case(&race_kc);
}

static void test_bf16_rejects(void)
{
    attn_case c = {"odd_head_dim", 1, 40, 4, 1, 36, 8, 8, 4, 8, 2, NSA_SELECT_CMP_ATTN,
               NSA_SELECT_FIXED_NONE, 0};
    nsa__attn_dims dm;
    dims_of(&dm, &c);
    nsa_status st = OPS(gpu)->attn_forward_bf16(gpu, &dm, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                                                NULL, NULL, NULL, NULL);
    CHECKF(st == NSA_ERR_UNSUPPORTED, "head_dim 36: got %s", nsa_status_str(st));
    printf("    head_dim 36: %s\n", nsa_last_error());
}

// ||got - ref|| / ||ref|| (NaN anywhere: infinite).
static double norm_rel(const float *got, const float *ref, size_t n)
{
    double e = 0.0, r = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)got[i] - ref[i];
        e += d * d;
        r += (double)ref[i] * ref[i];
    }
    return isfinite(e) ? sqrt(e / (r > 0.0 ? r : 1e-300)) : INFINITY;
}

// The whole language model with NSA_PRECISION_BF16 on the GPU (bf16 dense products and
// attention, fp32 storage) against the fp32 CPU model: logits, loss and every gradient
// within bf16's error (relative in the 2-norm: the roundings of each product add up), and
// not equal to fp32 (the bf16 paths really run).
static void test_bf16_model(void)
{
    nsa_config c;
    nsa_paper_defaults(&c);
    c.embed_dim = 64;
    c.hidden_size = 64;
    c.num_heads = 8;
    c.num_kv_heads = 2;
    c.head_dim = 16;
    c.num_layers = 2;
    c.window_size = 16;
    c.block_size = 16;
    c.num_selected_blocks = 4;
    c.compression_ratio = 8;
    c.compression_block = 16;
    c.dropout = 0.0;
    c.vocab_size = 41;
    nsa_context *g16 = NULL;
    OK(nsa_context_create(&g16, NSA_DEVICE_CUDA, 0));
    OK(nsa_context_set_precision(g16, NSA_PRECISION_BF16));
    CHECK(nsa_context_precision(g16) == NSA_PRECISION_BF16);
    CHECK(nsa_context_set_precision(cpu, NSA_PRECISION_BF16) == NSA_ERR_UNSUPPORTED);
    nsa_model *mc = NULL, *mg = NULL;
    OK(nsa_model_create(&mc, cpu, &c));
    OK(nsa_model_create(&mg, g16, &c));
    if (!mc || !mg) {
        nsa_model_free(mc);
        nsa_model_free(mg);
        nsa_context_free(g16);
        return;
    }
    OK(nsa_model_init(mc, 42));
    size_t nbuf = nsa_model_buffer_size(mc);
    float *params = malloc(nbuf * 4);
    OK(nsa_model_get_params(mc, params));
    OK(nsa_model_set_params(mg, params));
    int B = 2, T = 150, M = B * T, V = c.vocab_size;
    int32_t *tok = malloc(sizeof(int32_t) * M);
    // tokens from a generator of its own: the inputs do not move when other tests draw more
    test_rng trng = {0x70c3e5ull};
    for (int i = 0; i < M; i++)
        tok[i] = (int32_t)(test_rng_next(&trng) % (uint64_t)V);
    float *lc = hnan((size_t)M * V), *lg = hnan((size_t)M * V);
    float loss_c = NAN, loss_g = NAN;
    OK(nsa_lm_forward(mc, tok, B, T, NSA_FWD_TRAIN, lc, &loss_c));
    OK(nsa_lm_forward(mg, tok, B, T, NSA_FWD_TRAIN, lg, &loss_g));
    double e_logits = norm_rel(lg, lc, (size_t)M * V);
    printf("    %-34s %.2e (norm-relative)\n", "logits", e_logits);
    printf("    %-34s cpu %.7g gpu bf16 %.7g\n", "loss", loss_c, loss_g);
    CHECKF(e_logits <= 2e-2, "logits: %g", e_logits);
    CHECKF(e_logits > 1e-6, "logits equal to fp32 (%g): bf16 not in use", e_logits);
    CHECKF(fabs(loss_g - loss_c) <= 1e-2 * fabs(loss_c), "loss cpu %g gpu %g", loss_c, loss_g);
    OK(nsa_model_zero_grads(mc));
    OK(nsa_model_zero_grads(mg));
    OK(nsa_lm_backward(mc, 1.0f));
    OK(nsa_lm_backward(mg, 1.0f));
    float *gc = malloc(nbuf * 4), *gg = malloc(nbuf * 4);
    OK(nsa_model_get_grads(mc, gc));
    OK(nsa_model_get_grads(mg, gg));
    double e_all = norm_rel(gg, gc, nbuf), worst = 0.0;
    const char *worst_name = "";
    for (size_t i = 0; i < nsa_model_num_tensors(mc); i++) {
        nsa_tensor_info ti;
        OK(nsa_model_tensor(mc, i, &ti));
        double e = norm_rel(gg + ti.offset, gc + ti.offset, ti.numel);
        double rn = 0.0;
        for (size_t k = 0; k < ti.numel; k++)
            rn += (double)gc[ti.offset + k] * gc[ti.offset + k];
        if (rn < 1e-12) // gradients that are 0 in exact arithmetic: rounding noise
            continue;
        if (e > worst) {
            worst = e;
            worst_name = ti.name;
        }
    }
    printf("    %-34s %.2e; worst tensor %.2e (%s)\n", "gradients (norm-relative)", e_all, worst,
           worst_name);
    CHECKF(e_all <= 3e-2, "gradients: %g", e_all);
    CHECKF(worst <= 6e-2, "gradient of %s: %g", worst_name, worst);
    nsa_model_free(mc);
    nsa_model_free(mg);
    nsa_context_free(g16);
    void *hall[] = {params, tok, lc, lg, gc, gg};
    for (size_t i = 0; i < sizeof hall / sizeof hall[0]; i++)
        free(hall[i]);
}

// --race: one small shape for compute-sanitizer racecheck; --no-variants: without
// test_bf16_variants (the default kernels alone, for memcheck).
int main(int argc, char **argv)
{
    int race = argc > 1 && strcmp(argv[1], "--race") == 0;
    int variants = !(argc > 1 && strcmp(argv[1], "--no-variants") == 0);
    if (!nsa_device_available(NSA_DEVICE_CUDA)) {
        printf("skip: no CUDA device\n");
        printf("RESULT 0 0\n");
        return 0;
    }
    if (nsa_context_create(&cpu, NSA_DEVICE_CPU, 0) != NSA_OK ||
        nsa_context_create(&gpu, NSA_DEVICE_CUDA, 0) != NSA_OK) {
        printf("FAIL context creation: %s\n", nsa_last_error());
        printf("RESULT 0 1\n");
        return 1;
    }
    setenv("NSA_CUDA_BF16_MT", "1", 1);
    setenv("NSA_CUDA_BF16_SLC", "union", 1);
    nsa_status st = nsa_context_create(&gpu_mt1, NSA_DEVICE_CUDA, 0);
    unsetenv("NSA_CUDA_BF16_MT");
    unsetenv("NSA_CUDA_BF16_SLC");
    if (st != NSA_OK) {
        printf("FAIL context creation: %s\n", nsa_last_error());
        printf("RESULT 0 1\n");
        return 1;
    }
    if (race) {
        RUN(test_bf16_race);
        nsa_context *keep = gpu;
        gpu = gpu_mt1;
        RUN(test_bf16_race);
        gpu = keep;
    } else {
        RUN(test_bf16_rejects);
        RUN(test_bf16_attention);
        RUN(test_bf16_attention_mt1);
        if (variants)
            RUN(test_bf16_variants);
        RUN(test_bf16_model);
    }
    nsa_context_free(gpu_mt1);
    nsa_context_free(gpu);
    nsa_context_free(cpu);
    return harness_finish();
}
