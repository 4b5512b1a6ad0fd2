/*
 * test_cuda.c — the CUDA backend against the CPU backend (the reference): every op of the
 * backend table on the same random inputs, the attention op over several shapes (GQA group
 * sizes 1..16, head dims 32..192, both block scores, the paper's fixed blocks, given
 * indices, odd T, cached-generation queries), and the whole language model (loss, logits,
 * every gradient, one AdamW step).
 *
 * The attention runs twice on the GPU: with the tiled kernels (the default) and with the
 * simple warp-per-row kernels (NSA_CUDA_ATTN=simple), which must agree with the CPU too.
 *
 * Tolerances (max |gpu - cpu| / max |cpu| over an array, see cmp()):
 *   TOL_OP     1e-5  elementwise ops, norms, attention: same math in float32, only the
 *                    summation order (parallel reductions, online softmax) differs.
 *   TOL_GEMM   1e-4  anything downstream of cuBLAS sgemm: its blocked, split-K accumulation
 *                    order differs from OpenBLAS's over K up to 4*D terms, and the model's
 *                    gradients pass through a dozen such products.
 *   dropout masks, selected block indices (mean_key): exactly equal.
 * Without a CUDA device the test prints "skip: no CUDA device" and "RESULT 0 0".
 */
#include "backend.h"
#include "cuda_util.h"
#include "harness.h"
#include "nsa.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOL_OP 1e-5
#define TOL_GEMM 1e-4

static nsa_context *cpu, *gpu, *gpu_simple;
// ----------------------------------------------------------------------------------------
// Memory ops

static void test_memory(void)
{
    size_t n = 1000;
    float *a = hrand(n, 1.0), *b = hnan(n);
    float *d1 = dput(gpu, a, n * sizeof(float)), *d2 = dput(gpu, NULL, n * sizeof(float));
    OK(OPS(gpu)->copy(gpu, d2, d1, n * sizeof(float)));
    dget(gpu, b, d2, n * sizeof(float));
    CHECK(memcmp(a, b, n * sizeof(float)) == 0);
    OK(OPS(gpu)->zero(gpu, d2, n * sizeof(float)));
    dget(gpu, b, d2, n * sizeof(float));
    int zeros = 1;
    for (size_t i = 0; i < n; i++)
        zeros &= b[i] == 0.0f;
    CHECK(zeros);
    int flag = -1;
    OK(OPS(gpu)->has_nonfinite(gpu, d1, n, &flag));
    CHECK(flag == 0);
    a[777] = INFINITY;
    OK(OPS(gpu)->upload(gpu, d1, a, n * sizeof(float)));
    OK(OPS(gpu)->has_nonfinite(gpu, d1, n, &flag));
    CHECK(flag == 1);
    a[777] = NAN;
    OK(OPS(gpu)->upload(gpu, d1, a, n * sizeof(float)));
    OK(OPS(gpu)->has_nonfinite(gpu, d1, 777, &flag)); // the NaN is past n
    CHECK(flag == 0);
    OK(OPS(gpu)->has_nonfinite(gpu, d1, 778, &flag));
    CHECK(flag == 1);
    dfree(gpu, d1);
    dfree(gpu, d2);
    free(a);
    free(b);
}

// ----------------------------------------------------------------------------------------
// Dense

static void linear_case(int M, int I, int O, int with_bias)
{
    float *x = hrand((size_t)M * I, 1.0), *W = hrand((size_t)O * I, 0.5), *bias = hrand(O, 0.5);
    float *y = hnan((size_t)M * O);
    OK(OPS(cpu)->linear_forward(cpu, y, x, W, with_bias ? bias : NULL, M, I, O));
    float *dx_ = dput(gpu, x, (size_t)M * I * 4), *dW = dput(gpu, W, (size_t)O * I * 4);
    float *db = dput(gpu, bias, (size_t)O * 4), *dy = dput(gpu, y, (size_t)M * O * 4);
    float *poison = hnan((size_t)M * O);
    OK(OPS(gpu)->upload(gpu, dy, poison, (size_t)M * O * 4));
    OK(OPS(gpu)->linear_forward(gpu, dy, dx_, dW, with_bias ? db : NULL, M, I, O));
    cmp_dev("linear_forward y", gpu, dy, y, (size_t)M * O, TOL_GEMM);

    // backward: dx = beta dx + dy W, dW += dy^T x, dbias += sum dy
    float *gy = hrand((size_t)M * O, 1.0);
    for (int beta = 0; beta < 2; beta++) {
        float *gx = hrand((size_t)M * I, 1.0), *gW = hrand((size_t)O * I, 1.0), *gb = hrand(O, 1.0);
        float *dgx = dput(gpu, gx, (size_t)M * I * 4), *dgW = dput(gpu, gW, (size_t)O * I * 4);
        float *dgb = dput(gpu, gb, (size_t)O * 4), *dgy = dput(gpu, gy, (size_t)M * O * 4);
        OK(OPS(cpu)->linear_backward(cpu, gx, (float)beta, gW, with_bias ? gb : NULL, gy, x, W, M,
                                     I, O));
        OK(OPS(gpu)->linear_backward(gpu, dgx, (float)beta, dgW, with_bias ? dgb : NULL, dgy, dx_,
                                     dW, M, I, O));
        cmp_dev(beta ? "linear_backward dx (beta 1)" : "linear_backward dx (beta 0)", gpu, dgx, gx,
                (size_t)M * I, TOL_GEMM);
        cmp_dev("linear_backward dW (+=)", gpu, dgW, gW, (size_t)O * I, TOL_GEMM);
        cmp_dev("linear_backward dbias (+=)", gpu, dgb, gb, O, TOL_OP);
        dfree(gpu, dgx);
        dfree(gpu, dgW);
        dfree(gpu, dgb);
        dfree(gpu, dgy);
        free(gx);
        free(gW);
        free(gb);
    }
    dfree(gpu, dx_);
    dfree(gpu, dW);
    dfree(gpu, db);
    dfree(gpu, dy);
    free(x);
    free(W);
    free(bias);
    free(y);
    free(gy);
    free(poison);
}

static void test_linear(void)
{
    linear_case(37, 29, 41, 1);
    linear_case(300, 128, 96, 0);
    linear_case(1, 64, 3, 1);
    linear_case(513, 7, 200, 1);
}

// ----------------------------------------------------------------------------------------
// Norms and elementwise

static void test_layernorm(void)
{
    int dims[][2] = {{33, 20}, {257, 512}, {5, 3}};
    for (size_t k = 0; k < sizeof dims / sizeof dims[0]; k++) {
        int M = dims[k][0], D = dims[k][1];
        size_t n = (size_t)M * D;
        float *x = hrand(n, 2.0), *gamma = hrange(D, 0.5, 1.5), *beta = hrand(D, 0.5);
        float *y = hnan(n), *mean = hnan(M), *rstd = hnan(M);
        OK(OPS(cpu)->layernorm_forward(cpu, y, mean, rstd, x, gamma, beta, M, D));
        float *dxx = dput(gpu, x, n * 4), *dg = dput(gpu, gamma, D * 4), *dbt = dput(gpu, beta, D * 4);
        float *dy = dput(gpu, y, n * 4), *dm = dput(gpu, mean, M * 4), *dr = dput(gpu, rstd, M * 4);
        float *p = hnan(n);
        OK(OPS(gpu)->upload(gpu, dy, p, n * 4));
        OK(OPS(gpu)->layernorm_forward(gpu, dy, dm, dr, dxx, dg, dbt, M, D));
        cmp_dev("layernorm_forward y", gpu, dy, y, n, TOL_OP);
        cmp_dev("layernorm_forward mean", gpu, dm, mean, M, TOL_OP);
        cmp_dev("layernorm_forward rstd", gpu, dr, rstd, M, TOL_OP);
        // backward from the CPU's saved statistics
        OK(OPS(gpu)->upload(gpu, dm, mean, M * 4));
        OK(OPS(gpu)->upload(gpu, dr, rstd, M * 4));
        float *gyy = hrand(n, 1.0), *gx = hrand(n, 1.0), *gg = hrand(D, 1.0), *gb = hrand(D, 1.0);
        float *dgy = dput(gpu, gyy, n * 4), *dgx = dput(gpu, gx, n * 4);
        float *dgg = dput(gpu, gg, D * 4), *dgb = dput(gpu, gb, D * 4);
        OK(OPS(cpu)->layernorm_backward(cpu, gx, gg, gb, gyy, x, mean, rstd, gamma, M, D));
        OK(OPS(gpu)->layernorm_backward(gpu, dgx, dgg, dgb, dgy, dxx, dm, dr, dg, M, D));
        cmp_dev("layernorm_backward dx (+=)", gpu, dgx, gx, n, TOL_OP);
        cmp_dev("layernorm_backward dgamma (+=)", gpu, dgg, gg, D, TOL_OP);
        cmp_dev("layernorm_backward dbeta (+=)", gpu, dgb, gb, D, TOL_OP);
        void *all[] = {dxx, dg, dbt, dy, dm, dr, dgy, dgx, dgg, dgb};
        for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
            dfree(gpu, all[i]);
        void *hall[] = {x, gamma, beta, y, mean, rstd, p, gyy, gx, gg, gb};
        for (size_t i = 0; i < sizeof hall / sizeof hall[0]; i++)
            free(hall[i]);
    }
}

static void test_elementwise(void)
{
    size_t n = 100003;
    float *x = hrand(n, 4.0), *a = hrand(n, 1.0), *y = hnan(n);
    float *dxx = dput(gpu, x, n * 4), *da = dput(gpu, a, n * 4), *dy = dput(gpu, y, n * 4);
    OK(OPS(cpu)->gelu_forward(cpu, y, x, n));
    OK(OPS(gpu)->gelu_forward(gpu, dy, dxx, n));
    cmp_dev("gelu_forward", gpu, dy, y, n, TOL_OP);
    OK(OPS(cpu)->gelu_backward(cpu, y, a, x, n));
    OK(OPS(gpu)->gelu_backward(gpu, dy, da, dxx, n));
    cmp_dev("gelu_backward", gpu, dy, y, n, TOL_OP);
    OK(OPS(cpu)->add(cpu, y, x, a, n));
    OK(OPS(gpu)->add(gpu, dy, dxx, da, n));
    cmp_dev("add", gpu, dy, y, n, 0.0);
    OK(OPS(cpu)->scale(cpu, y, -0.37f, n));
    OK(OPS(gpu)->scale(gpu, dy, -0.37f, n));
    cmp_dev("scale", gpu, dy, y, n, 0.0);
    // dropout: the same mask, bit for bit
    memcpy(y, x, n * 4);
    OK(OPS(gpu)->upload(gpu, dy, x, n * 4));
    OK(OPS(cpu)->dropout(cpu, y, n, 0.3f, 0xabcdefull, 77));
    OK(OPS(gpu)->dropout(gpu, dy, n, 0.3f, 0xabcdefull, 77));
    float *h = malloc(n * 4);
    dget(gpu, h, dy, n * 4);
    size_t zeros = 0;
    for (size_t i = 0; i < n; i++)
        zeros += y[i] == 0.0f;
    CHECKF(memcmp(h, y, n * 4) == 0, "dropout masks differ");
    CHECKF(zeros > n / 4 && zeros < n * 35 / 100, "dropout: %zu of %zu dropped at p = 0.3", zeros, n);
    printf("    %-34s identical (%zu of %zu dropped)\n", "dropout", zeros, n);
    free(h);
    dfree(gpu, dxx);
    dfree(gpu, da);
    dfree(gpu, dy);
    free(x);
    free(a);
    free(y);
}

static void test_rope(void)
{
    int B = 2, T = 37, nh = 3, d = 16;
    size_t n = (size_t)B * T * nh * d;
    float *x = hrand(n, 1.0), *y = hdup(x, n * 4);
    float *dxx = dput(gpu, x, n * 4);
    OK(OPS(cpu)->rope(cpu, y, B, T, 0, nh, d, 10000.0, 0));
    OK(OPS(gpu)->rope(gpu, dxx, B, T, 0, nh, d, 10000.0, 0));
    cmp_dev("rope", gpu, dxx, y, n, TOL_OP);
    OK(OPS(cpu)->rope(cpu, y, B, T, 5, nh, d, 500.0, 1));
    OK(OPS(gpu)->rope(gpu, dxx, B, T, 5, nh, d, 500.0, 1));
    cmp_dev("rope inverse, pos0 5", gpu, dxx, y, n, TOL_OP);
    dfree(gpu, dxx);
    free(x);
    free(y);
}

// ----------------------------------------------------------------------------------------
// Compression

static void compress_case(int B, int T, int G, int d, int l, int r)
{
    int Tc = T >= l ? (T - l) / r + 1 : 0;
    size_t nx = (size_t)B * T * G * d, nc = (size_t)B * Tc * G * d, nw = (size_t)G * l * d;
    size_t nX = nc * l;
    float *x = hrand(nx, 1.0), *W = hrand(nw, 0.3), *pos = hrand((size_t)l * d, 0.2);
    float *dxx = dput(gpu, x, nx * 4), *dW = dput(gpu, W, nw * 4), *dpos = dput(gpu, pos, (size_t)l * d * 4);
    for (int conv = 0; conv < 2; conv++) {
        float *xc = hnan(nc), *dxc = dput(gpu, xc, nc * 4);
        OK(OPS(cpu)->compress_forward(cpu, xc, x, conv ? W : NULL, B, T, G, d, l, r));
        OK(OPS(gpu)->compress_forward(gpu, dxc, dxx, conv ? dW : NULL, B, T, G, d, l, r));
        cmp_dev(conv ? "compress_forward (conv)" : "compress_forward (mean)", gpu, dxc, xc, nc,
                conv ? TOL_OP : 0.0);
        float *gc = hrand(nc, 1.0), *gx = hrand(nx, 1.0), *gW = hrand(nw, 1.0);
        float *dgc = dput(gpu, gc, nc * 4), *dgx = dput(gpu, gx, nx * 4), *dgW = dput(gpu, gW, nw * 4);
        OK(OPS(cpu)->compress_backward(cpu, gx, conv ? gW : NULL, gc, x, conv ? W : NULL, B, T, G,
                                       d, l, r));
        OK(OPS(gpu)->compress_backward(gpu, dgx, conv ? dgW : NULL, dgc, dxx, conv ? dW : NULL, B,
                                       T, G, d, l, r));
        cmp_dev("compress_backward dx (+=)", gpu, dgx, gx, nx, TOL_OP);
        if (conv)
            cmp_dev("compress_backward dW (+=)", gpu, dgW, gW, nw, TOL_OP);
        dfree(gpu, dxc);
        dfree(gpu, dgc);
        dfree(gpu, dgx);
        dfree(gpu, dgW);
        free(xc);
        free(gc);
        free(gx);
        free(gW);
    }
    float *X = hnan(nX), *dX = dput(gpu, X, nX * 4);
    OK(OPS(cpu)->compress_gather(cpu, X, x, pos, B, T, G, d, l, r));
    OK(OPS(gpu)->compress_gather(gpu, dX, dxx, dpos, B, T, G, d, l, r));
    cmp_dev("compress_gather", gpu, dX, X, nX, 0.0);
    float *gX = hrand(nX, 1.0), *gx = hrand(nx, 1.0), *gp = hrand((size_t)l * d, 1.0);
    float *dgX = dput(gpu, gX, nX * 4), *dgx = dput(gpu, gx, nx * 4), *dgp = dput(gpu, gp, (size_t)l * d * 4);
    OK(OPS(cpu)->compress_gather_backward(cpu, gx, gp, gX, B, T, G, d, l, r));
    OK(OPS(gpu)->compress_gather_backward(gpu, dgx, dgp, dgX, B, T, G, d, l, r));
    cmp_dev("compress_gather_backward dx (+=)", gpu, dgx, gx, nx, TOL_OP);
    cmp_dev("compress_gather_backward dpos (+=)", gpu, dgp, gp, (size_t)l * d, TOL_OP);
    void *dall[] = {dxx, dW, dpos, dX, dgX, dgx, dgp};
    for (size_t i = 0; i < sizeof dall / sizeof dall[0]; i++)
        dfree(gpu, dall[i]);
    void *hall[] = {x, W, pos, X, gX, gx, gp};
    for (size_t i = 0; i < sizeof hall / sizeof hall[0]; i++)
        free(hall[i]);
}

static void test_compress(void)
{
    compress_case(2, 53, 3, 8, 8, 4);  // overlapping blocks (l = 2r), T not a multiple
    compress_case(1, 100, 2, 16, 5, 5); // l = r
    compress_case(1, 3, 1, 4, 4, 2);    // no compressed token
}

// ----------------------------------------------------------------------------------------
// Gates, language model, optimizer

static void test_gates(void)
{
    int M = 301, H = 5;
    size_t n = (size_t)M * H * 3;
    float gamma[3] = {0.3f, -1.2f, 0.7f};
    float *g = hnan(n), *dg = dput(gpu, g, n * 4), *dgam = dput(gpu, gamma, 12);
    OK(OPS(cpu)->gate_forward(cpu, g, gamma, M, H, NSA_GATE_STATIC));
    OK(OPS(gpu)->gate_forward(gpu, dg, dgam, M, H, NSA_GATE_STATIC));
    cmp_dev("gate_forward (static)", gpu, dg, g, n, TOL_OP);
    float *up = hrand(n, 1.0), *dup_ = dput(gpu, up, n * 4);
    float acc[3] = {0.1f, 0.2f, -0.3f}, accg[3];
    float *dacc = dput(gpu, acc, 12);
    OK(OPS(cpu)->gate_backward(cpu, acc, up, g, M, H, NSA_GATE_STATIC));
    OK(OPS(gpu)->gate_backward(gpu, dacc, dup_, dg, M, H, NSA_GATE_STATIC));
    dget(gpu, accg, dacc, 12);
    cmp("gate_backward (static, +=)", accg, acc, 3, TOL_OP);
    float *logits = hrand(n, 3.0), *dl = dput(gpu, logits, n * 4);
    OK(OPS(cpu)->gate_forward(cpu, g, logits, M, H, NSA_GATE_TOKEN));
    OK(OPS(gpu)->gate_forward(gpu, dg, dl, M, H, NSA_GATE_TOKEN));
    cmp_dev("gate_forward (token)", gpu, dg, g, n, TOL_OP);
    float *dlog = hnan(n), *ddlog = dput(gpu, dlog, n * 4);
    OK(OPS(cpu)->gate_backward(cpu, dlog, up, g, M, H, NSA_GATE_TOKEN));
    OK(OPS(gpu)->gate_backward(gpu, ddlog, dup_, dg, M, H, NSA_GATE_TOKEN));
    cmp_dev("gate_backward (token)", gpu, ddlog, dlog, n, TOL_OP);
    void *dall[] = {dg, dgam, dup_, dacc, dl, ddlog};
    for (size_t i = 0; i < sizeof dall / sizeof dall[0]; i++)
        dfree(gpu, dall[i]);
    free(g);
    free(up);
    free(logits);
    free(dlog);
}

static void test_embedding_loss(void)
{
    int B = 3, T = 41, V = 300, E = 24, M = B * T;
    int32_t *tok = malloc(sizeof(int32_t) * M);
    for (int i = 0; i < M; i++)
        tok[i] = (int32_t)(test_rng_next(&rng) % 40); // repeats on purpose
    float *table = hrand((size_t)V * E, 1.0), *out = hnan((size_t)M * E);
    int32_t *dtok = dput(gpu, tok, M * 4);
    float *dtable = dput(gpu, table, (size_t)V * E * 4), *dout = dput(gpu, out, (size_t)M * E * 4);
    OK(OPS(cpu)->embedding_forward(cpu, out, tok, table, M, E));
    OK(OPS(gpu)->embedding_forward(gpu, dout, dtok, dtable, M, E));
    cmp_dev("embedding_forward", gpu, dout, out, (size_t)M * E, 0.0);
    float *gout = hrand((size_t)M * E, 1.0), *dgout = dput(gpu, gout, (size_t)M * E * 4);
    OK(OPS(cpu)->embedding_backward(cpu, table, tok, gout, M, E));
    OK(OPS(gpu)->embedding_backward(gpu, dtable, dtok, dgout, M, E));
    cmp_dev("embedding_backward (+=)", gpu, dtable, table, (size_t)V * E, TOL_OP);

    float *logits = hrand((size_t)M * V, 6.0), *w = hrange(M, 0.0, 2.0);
    float *losses = hnan(M), *dlog = hnan((size_t)M * V);
    float *dlogits = dput(gpu, logits, (size_t)M * V * 4), *dw = dput(gpu, w, M * 4);
    float *dlosses = dput(gpu, losses, M * 4), *ddlog = dput(gpu, dlog, (size_t)M * V * 4);
    for (int weighted = 0; weighted < 2; weighted++) {
        OK(OPS(cpu)->cross_entropy(cpu, losses, dlog, logits, tok, weighted ? w : NULL, B, T, V,
                                   0.25f));
        OK(OPS(gpu)->cross_entropy(gpu, dlosses, ddlog, dlogits, dtok, weighted ? dw : NULL, B, T,
                                   V, 0.25f));
        cmp_dev(weighted ? "cross_entropy losses (weighted)" : "cross_entropy losses", gpu,
                dlosses, losses, M, TOL_OP);
        cmp_dev("cross_entropy dlogits", gpu, ddlog, dlog, (size_t)M * V, TOL_OP);
    }
    OK(OPS(cpu)->cross_entropy(cpu, losses, NULL, logits, tok, NULL, B, T, V, 1.0f));
    OK(OPS(gpu)->cross_entropy(gpu, dlosses, NULL, dlogits, dtok, NULL, B, T, V, 1.0f));
    cmp_dev("cross_entropy (no dlogits)", gpu, dlosses, losses, M, TOL_OP);
    void *dall[] = {dtok, dtable, dout, dgout, dlogits, dw, dlosses, ddlog};
    for (size_t i = 0; i < sizeof dall / sizeof dall[0]; i++)
        dfree(gpu, dall[i]);
    void *hall[] = {tok, table, out, gout, logits, w, losses, dlog};
    for (size_t i = 0; i < sizeof hall / sizeof hall[0]; i++)
        free(hall[i]);
}

static void test_optimizer_ops(void)
{
    size_t n = 70001;
    float *x = hrand(n, 3.0), *dxx = dput(gpu, x, n * 4);
    double sc = 0.0, sg = 0.0;
    OK(OPS(cpu)->sum_squares(cpu, x, n, &sc));
    OK(OPS(gpu)->sum_squares(gpu, dxx, n, &sg));
    printf("    %-34s rel err %.2e\n", "sum_squares", fabs(sg - sc) / sc);
    CHECKF(fabs(sg - sc) <= 1e-12 * sc, "sum_squares: gpu %.17g cpu %.17g", sg, sc);
    float *p = hrand(n, 1.0), *g = hrand(n, 1.0), *m = hrand(n, 0.1), *v = hrange(n, 0.01, 0.1);
    uint8_t *mask = malloc(n);
    for (size_t i = 0; i < n; i++)
        mask[i] = (uint8_t)(i % 3 != 0);
    float *dp = dput(gpu, p, n * 4), *dgr = dput(gpu, g, n * 4), *dm = dput(gpu, m, n * 4);
    float *dv = dput(gpu, v, n * 4);
    uint8_t *dmask = dput(gpu, mask, n);
    for (int step = 1; step <= 3; step++) {
        float c1 = 1.0f - powf(0.9f, (float)step), c2 = 1.0f - powf(0.95f, (float)step);
        OK(OPS(cpu)->adamw(cpu, p, g, m, v, mask, n, 3e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.7f, c1, c2));
        OK(OPS(gpu)->adamw(gpu, dp, dgr, dm, dv, dmask, n, 3e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.7f, c1,
                           c2));
    }
    cmp_dev("adamw params", gpu, dp, p, n, TOL_OP);
    cmp_dev("adamw m", gpu, dm, m, n, TOL_OP);
    cmp_dev("adamw v", gpu, dv, v, n, TOL_OP);
    void *dall[] = {dxx, dp, dgr, dm, dv, dmask};
    for (size_t i = 0; i < sizeof dall / sizeof dall[0]; i++)
        dfree(gpu, dall[i]);
    void *hall[] = {x, p, g, m, v, mask};
    for (size_t i = 0; i < sizeof hall / sizeof hall[0]; i++)
        free(hall[i]);
}

// ----------------------------------------------------------------------------------------
// Attention

// Random valid selections: per row 1..min(n, candidates) distinct blocks in random slots.
static void random_indices(int32_t *idx, int B, int T, int G, int n, int b)
{
    int *pool = malloc(sizeof(int) * (size_t)(T + 1));
    for (int bb = 0; bb < B; bb++)
        for (int t = 0; t < T; t++)
            for (int g = 0; g < G; g++) {
                int32_t *row = idx + (((size_t)bb * T + t) * G + g) * n;
                int ncand = t / b + 1;
                for (int i = 0; i < ncand; i++)
                    pool[i] = i;
                for (int i = 0; i < ncand; i++) {
                    int j = i + (int)(test_rng_next(&rng) % (uint64_t)(ncand - i));
                    int tmp = pool[i];
                    pool[i] = pool[j];
                    pool[j] = tmp;
                }
                int most = ncand < n ? ncand : n;
                int m = 1 + (int)(test_rng_next(&rng) % (uint64_t)most);
                for (int s = 0; s < n; s++)
                    row[s] = -1;
                for (int i = 0; i < m; i++) {
                    int s = (int)(test_rng_next(&rng) % (uint64_t)n);
                    while (row[s] != -1)
                        s = (s + 1) % n;
                    row[s] = pool[i];
                }
            }
    free(pool);
}

static void attention_case(const attn_case *c, nsa_context *g, const char *kernels)
{
    nsa__attn_dims dm;
    dims_of(&dm, c);
    int B = c->B, T = c->T, H = c->H, G = c->G, d = c->d, n = c->n, Tc = dm.num_cmp;
    size_t nq = (size_t)B * T * H * d, nkv = (size_t)B * T * G * d, nkvc = (size_t)B * Tc * G * d;
    size_t ng = (size_t)B * T * H * 3, nidx = (size_t)B * T * G * n;
    printf("  %s [%s]: B=%d T=%d H=%d G=%d d=%d b=%d w=%d r=%d l=%d n=%d %s%s%s\n", c->name,
           kernels, B, T, H, G, d, c->b, c->w, c->r, c->l, n,
           c->score == NSA_SELECT_CMP_ATTN ? "cmp_attn" : "mean_key",
           c->fixed == NSA_SELECT_FIXED_PAPER ? " paper" : "", c->given ? " given" : "");
    float *q = hrand(nq, 1.0), *k = hrand(nkv, 1.0), *v = hrand(nkv, 1.0);
    float *gates = hrange(ng, 0.05, 1.0);
    float *kc = hnan(nkvc), *vc = hnan(nkvc);
    OK(OPS(cpu)->compress_forward(cpu, kc, k, NULL, B, T, G, d, c->l, c->r));
    OK(OPS(cpu)->compress_forward(cpu, vc, v, NULL, B, T, G, d, c->l, c->r));
    int32_t *given = NULL;
    if (c->given) {
        given = malloc(nidx * sizeof(int32_t));
        random_indices(given, B, T, G, n, c->b);
    }
    int32_t *idx = malloc(nidx * 4), *gidx = malloc(nidx * 4);
    float *out = hnan(nq), *op = hnan(3 * nq), *lse = hnan(ng);
    OK(OPS(cpu)->attn_forward(cpu, &dm, q, k, v, kc, vc, gates, given, idx, out, op, lse));

    float *dq_ = dput(g, q, nq * 4), *dk_ = dput(g, k, nkv * 4), *dv_ = dput(g, v, nkv * 4);
    float *dkc = dput(g, kc, nkvc * 4), *dvc = dput(g, vc, nkvc * 4), *dg = dput(g, gates, ng * 4);
    int32_t *dgiven = given ? dput(g, given, nidx * 4) : NULL;
    float *pnq = hnan(3 * nq), *png = hnan(ng);
    int32_t *pidx = malloc(nidx * 4);
    for (size_t i = 0; i < nidx; i++)
        pidx[i] = -7;
    int32_t *didx = dput(g, pidx, nidx * 4);
    float *dout = dput(g, pnq, nq * 4), *dop = dput(g, pnq, 3 * nq * 4), *dlse = dput(g, png, ng * 4);
    OK(OPS(g)->attn_forward(g, &dm, dq_, dk_, dv_, dkc, dvc, dg, dgiven, didx, dout, dop, dlse));
    dget(g, gidx, didx, nidx * 4);
    cmp_exact_i32("forward selected blocks", gidx, idx, nidx);
    cmp_dev("forward out", g, dout, out, nq, TOL_OP);
    cmp_dev("forward o_paths", g, dop, op, 3 * nq, TOL_OP);
    cmp_dev("forward lse", g, dlse, lse, ng, TOL_OP);
    // inference: no saved paths
    OK(OPS(g)->upload(g, dout, pnq, nq * 4));
    OK(OPS(g)->attn_forward(g, &dm, dq_, dk_, dv_, dkc, dvc, dg, dgiven, didx, dout, NULL, NULL));
    cmp_dev("forward out (inference)", g, dout, out, nq, TOL_OP);

    // cached generation: queries at positions [q_start, T) only
    if (B == 1) {
        int qs = T - 1 - (T / 3);
        int Tq = T - qs;
        nsa__attn_dims dq = dm;
        dq.q_start = qs;
        float *dqq = dput(g, q + (size_t)qs * H * d, (size_t)Tq * H * d * 4);
        float *dgq = dput(g, gates + (size_t)qs * H * 3, (size_t)Tq * H * 3 * 4);
        int32_t *dgq_idx = given ? dput(g, given + (size_t)qs * G * n, (size_t)Tq * G * n * 4) : NULL;
        OK(OPS(g)->attn_forward(g, &dq, dqq, dk_, dv_, dkc, dvc, dgq, dgq_idx, didx, dout, NULL,
                                NULL));
        cmp_dev("forward out (q_start)", g, dout, out + (size_t)qs * H * d, (size_t)Tq * H * d,
                TOL_OP);
        dget(g, gidx, didx, (size_t)Tq * G * n * 4);
        cmp_exact_i32("selected blocks (q_start)", gidx, idx + (size_t)qs * G * n, (size_t)Tq * G * n);
        dfree(g, dqq);
        dfree(g, dgq);
        dfree(g, dgq_idx);
    }

    // backward from the CPU's forward (selection, paths, lse), the same dout
    float *gout = hrand(nq, 1.0);
    float *gq = hnan(nq), *gk = hnan(nkv), *gv = hnan(nkv), *gkc = hnan(nkvc), *gvc = hnan(nkvc);
    float *ggt = hnan(ng);
    OK(OPS(cpu)->attn_backward(cpu, &dm, q, k, v, kc, vc, gates, idx, op, lse, gout, gq, gk, gv,
                               gkc, gvc, ggt));
    OK(OPS(g)->upload(g, didx, idx, nidx * 4));
    OK(OPS(g)->upload(g, dop, op, 3 * nq * 4));
    OK(OPS(g)->upload(g, dlse, lse, ng * 4));
    float *dgout = dput(g, gout, nq * 4);
    float *e_q = dput(g, pnq, nq * 4), *e_k = dput(g, pnq, nkv * 4), *e_v = dput(g, pnq, nkv * 4);
    float *e_kc = dput(g, pnq, nkvc * 4), *e_vc = dput(g, pnq, nkvc * 4), *e_g = dput(g, png, ng * 4);
    OK(OPS(g)->attn_backward(g, &dm, dq_, dk_, dv_, dkc, dvc, dg, didx, dop, dlse, dgout, e_q, e_k,
                             e_v, e_kc, e_vc, e_g));
    cmp_dev("backward dq", g, e_q, gq, nq, TOL_OP);
    cmp_dev("backward dk", g, e_k, gk, nkv, TOL_OP);
    cmp_dev("backward dv", g, e_v, gv, nkv, TOL_OP);
    // dkc and dvc are added into dk and dv (through the compression's backward): judged on
    // their scale. (With a single visible compressed token the softmax has zero derivative
    // and dkc is pure rounding noise of an exact 0.)
    cmp_dev_floor("backward dkc", g, e_kc, gkc, nkvc, TOL_OP, max_abs(gk, nkv));
    cmp_dev_floor("backward dvc", g, e_vc, gvc, nkvc, TOL_OP, max_abs(gv, nkv));
    cmp_dev("backward dgates", g, e_g, ggt, ng, TOL_OP);

    void *dall[] = {dq_, dk_, dv_, dkc, dvc, dg, dgiven, didx, dout, dop, dlse,
                    dgout, e_q, e_k, e_v, e_kc, e_vc, e_g};
    for (size_t i = 0; i < sizeof dall / sizeof dall[0]; i++)
        dfree(g, dall[i]);
    void *hall[] = {q, k, v, gates, kc, vc, given, idx, gidx, out, op, lse, pnq, png, pidx,
                    gout, gq, gk, gv, gkc, gvc, ggt};
    for (size_t i = 0; i < sizeof hall / sizeof hall[0]; i++)
        free(hall[i]);
}

static const attn_case att_cases[] = {
    // name                   B  T    H   G  d    b   w    r   l   n  score                fixed
    {"gqa1_d64_meankey", 2, 203, 4, 4, 64, 16, 40, 8, 16, 4, NSA_SELECT_MEAN_KEY, NSA_SELECT_FIXED_NONE, 0},
    {"gqa4_d128_cmpattn_paper", 1, 301, 8, 2, 128, 32, 64, 16, 32, 5, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_PAPER, 0},
    {"gqa16_d128_paper_shape", 1, 517, 32, 2, 128, 64, 128, 16, 32, 4, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_PAPER, 0},
    {"gqa16_d64_meankey_paper", 1, 257, 16, 1, 64, 16, 32, 4, 8, 6, NSA_SELECT_MEAN_KEY, NSA_SELECT_FIXED_PAPER, 0},
    {"gqa4_d128_meankey_odd", 2, 131, 8, 2, 128, 8, 20, 4, 4, 5, NSA_SELECT_MEAN_KEY, NSA_SELECT_FIXED_NONE, 0},
    {"gqa4_d32_given", 2, 99, 4, 1, 32, 8, 16, 4, 8, 4, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_NONE, 1},
    {"gqa3_d40_cmpattn", 1, 150, 6, 2, 40, 12, 30, 6, 12, 3, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_PAPER, 0},
    {"gqa1_d128_big_blocks", 1, 333, 2, 2, 128, 100, 70, 10, 20, 2, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_NONE, 0},
    {"gqa2_d192_simple_only", 1, 120, 4, 2, 192, 16, 24, 8, 16, 3, NSA_SELECT_MEAN_KEY, NSA_SELECT_FIXED_NONE, 0},
    {"tiny_T5", 1, 5, 4, 1, 64, 4, 3, 2, 4, 3, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_PAPER, 0},
    {"gqa32_d128_two_head_chunks", 2, 190, 32, 1, 128, 32, 48, 8, 16, 4, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_PAPER, 0},
    {"gqa16_d64_given_long", 1, 700, 16, 1, 64, 16, 64, 16, 16, 5, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_NONE, 1},
};

static void test_attention_tiled(void)
{
    for (size_t i = 0; i < sizeof att_cases / sizeof att_cases[0]; i++)
        attention_case(&att_cases[i], gpu, att_cases[i].d <= 128 ? "tiled" : "simple");
}

static void test_attention_simple(void)
{
    for (size_t i = 0; i < sizeof att_cases / sizeof att_cases[0]; i++)
        attention_case(&att_cases[i], gpu_simple, "simple");
}

// Tiny shapes for compute-sanitizer racecheck (slow): every tiled kernel of both selected-
// path layouts (tile union: H/G = 4; per position: H/G = 16) with fused scoring.
static const attn_case race_cases[] = {
    {"race_union", 1, 60, 4, 1, 64, 8, 12, 4, 8, 3, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_PAPER, 0},
    {"race_per_position", 1, 70, 16, 1, 64, 16, 16, 8, 16, 3, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_PAPER, 0},
};

static void test_attention_race(void)
{
    attention_case(&race_cases[0], gpu, "tiled");
    attention_case(&race_cases[1], gpu, "tiled");
}

static void test_attention_quick(void)
{
    attention_case(&att_cases[1], gpu, "tiled");
    attention_case(&att_cases[5], gpu, "tiled");
    attention_case(&att_cases[10], gpu, "tiled");
    attention_case(&att_cases[6], gpu_simple, "simple");
}

// The public op (host arrays; compression and its gradient routed by the library).
static void test_attention_public_op(void)
{
    nsa_attention_desc desc;
    memset(&desc, 0, sizeof desc);
    desc.batch = 2;
    desc.seq_len = 150;
    desc.num_heads = 8;
    desc.num_kv_heads = 2;
    desc.head_dim = 64;
    desc.block_size = 16;
    desc.window_size = 32;
    desc.compression_ratio = 16;
    desc.compression_block = 16;
    desc.num_selected_blocks = 4;
    desc.select_score = NSA_SELECT_CMP_ATTN;
    desc.select_fixed = NSA_SELECT_FIXED_PAPER;
    size_t nq = (size_t)2 * 150 * 8 * 64, nkv = (size_t)2 * 150 * 2 * 64, ng = (size_t)2 * 150 * 8 * 3;
    size_t nidx = (size_t)2 * 150 * 2 * 4;
    float *q = hrand(nq, 1.0), *k = hrand(nkv, 1.0), *v = hrand(nkv, 1.0), *gt = hrange(ng, 0, 1);
    float *o1 = hnan(nq), *o2 = hnan(nq);
    int32_t *i1 = malloc(nidx * 4), *i2 = malloc(nidx * 4);
    OK(nsa_attention_forward(cpu, &desc, q, k, v, gt, NULL, o1, i1));
    OK(nsa_attention_forward(gpu, &desc, q, k, v, gt, NULL, o2, i2));
    cmp("nsa_attention_forward out", o2, o1, nq, TOL_OP);
    cmp_exact_i32("nsa_attention_forward indices", i2, i1, nidx);
    float *dout = hrand(nq, 1.0);
    float *a[4], *b[4];
    size_t sz[4] = {nq, nkv, nkv, ng};
    for (int i = 0; i < 4; i++) {
        a[i] = hnan(sz[i]);
        b[i] = hnan(sz[i]);
    }
    OK(nsa_attention_backward(cpu, &desc, q, k, v, gt, NULL, dout, a[0], a[1], a[2], a[3]));
    OK(nsa_attention_backward(gpu, &desc, q, k, v, gt, NULL, dout, b[0], b[1], b[2], b[3]));
    const char *names[4] = {"nsa_attention_backward dq", "nsa_attention_backward dk",
                            "nsa_attention_backward dv", "nsa_attention_backward dgates"};
    for (int i = 0; i < 4; i++) {
        cmp(names[i], b[i], a[i], sz[i], TOL_OP);
        free(a[i]);
        free(b[i]);
    }
    void *hall[] = {q, k, v, gt, o1, o2, i1, i2, dout};
    for (size_t i = 0; i < sizeof hall / sizeof hall[0]; i++)
        free(hall[i]);
}

// ----------------------------------------------------------------------------------------
// The whole model

static void model_case(const char *name, const nsa_config *cfg, nsa_context *g, int B, int T)
{
    printf("  %s (%s attention)\n", name, g == gpu_simple ? "simple" : "tiled");
    nsa_model *mc = NULL, *mg = NULL;
    OK(nsa_model_create(&mc, cpu, cfg));
    OK(nsa_model_create(&mg, g, cfg));
    if (!mc || !mg) {
        nsa_model_free(mc);
        nsa_model_free(mg);
        return;
    }
    OK(nsa_model_init(mc, 42));
    OK(nsa_model_init(mg, 42));
    size_t nbuf = nsa_model_buffer_size(mc);
    // perturb every parameter a little (norms, biases, gates away from 1 and 0)
    float *params = malloc(nbuf * 4);
    OK(nsa_model_get_params(mc, params));
    for (size_t i = 0; i < nbuf; i++)
        params[i] += (float)(0.02 * test_rng_uniform(&rng));
    OK(nsa_model_set_params(mc, params));
    OK(nsa_model_set_params(mg, params));
    nsa_model_set_rng(mc, 7, 3);
    nsa_model_set_rng(mg, 7, 3);
    int M = B * T, V = cfg->vocab_size;
    int32_t *tok = malloc(sizeof(int32_t) * M);
    for (int i = 0; i < M; i++)
        tok[i] = (int32_t)(test_rng_next(&rng) % (uint64_t)V);
    float *lc = hnan((size_t)M * V), *lg = hnan((size_t)M * V);
    float loss_c = NAN, loss_g = NAN;
    OK(nsa_lm_forward(mc, tok, B, T, NSA_FWD_TRAIN, lc, &loss_c));
    OK(nsa_lm_forward(mg, tok, B, T, NSA_FWD_TRAIN, lg, &loss_g));
    cmp("logits", lg, lc, (size_t)M * V, TOL_GEMM);
    cmp("loss", &loss_g, &loss_c, 1, TOL_GEMM);
    OK(nsa_model_zero_grads(mc));
    OK(nsa_model_zero_grads(mg));
    OK(nsa_lm_backward(mc, 1.0f));
    OK(nsa_lm_backward(mg, 1.0f));
    float *gc = malloc(nbuf * 4), *gg = malloc(nbuf * 4);
    OK(nsa_model_get_grads(mc, gc));
    OK(nsa_model_get_grads(mg, gg));
    cmp("gradient buffer (all)", gg, gc, nbuf, TOL_GEMM);
    // Every tensor against its own scale, floored at 1e-3 of the whole buffer's: some
    // gradients are exactly 0 in exact arithmetic (a bias added to every key, k_proj.bias
    // without RoPE or compress_k.fc2.bias, leaves every softmax unchanged), and both
    // backends then return rounding noise (~1e-9) whose relative difference means nothing.
    double scale_all = 0.0;
    for (size_t i = 0; i < nbuf; i++)
        if (fabs(gc[i]) > scale_all)
            scale_all = fabs(gc[i]);
    double worst = 0.0;
    const char *worst_name = "";
    char *noise = calloc(nsa_model_num_tensors(mc), 1); // tensors with a ~0 gradient
    for (size_t i = 0; i < nsa_model_num_tensors(mc); i++) {
        nsa_tensor_info ti;
        OK(nsa_model_tensor(mc, i, &ti));
        double scale = 0.0, err = 0.0;
        for (size_t e = 0; e < ti.numel; e++) {
            double r = gc[ti.offset + e], d = fabs((double)gg[ti.offset + e] - r);
            scale = fabs(r) > scale ? fabs(r) : scale;
            err = d > err || isnan(d) ? (isnan(d) ? INFINITY : d) : err;
        }
        noise[i] = scale < 1e-4 * scale_all;
        if (scale < 1e-3 * scale_all)
            scale = 1e-3 * scale_all;
        double e = err / scale;
        if (!(e <= worst)) {
            worst = e;
            worst_name = ti.name;
        }
        if (!(e <= TOL_GEMM)) {
            fprintf(stderr, "  gradient %s: rel err %.3g\n", ti.name, e);
            harness_cur_failed = 1;
        }
    }
    printf("    %-34s max rel err %.2e (%s)\n", "gradients, worst tensor", worst, worst_name);
    // one optimizer step (clipping, AdamW) on both. AdamW divides each gradient by its own
    // root mean square, so a noise-only gradient moves its parameter by a full lr in a
    // random direction: those tensors are left out of the comparison.
    nsa_optim_config oc;
    nsa_optim_config_default(&oc);
    oc.warmup_steps = 0;
    oc.clip_norm = 0.5;
    nsa_optimizer *oc_ = NULL, *og = NULL;
    OK(nsa_optimizer_create(&oc_, mc, &oc));
    OK(nsa_optimizer_create(&og, mg, &oc));
    double nc = 0, ng = 0;
    if (oc_ && og) {
        OK(nsa_optimizer_step(oc_, &nc, NULL));
        OK(nsa_optimizer_step(og, &ng, NULL));
        printf("    %-34s cpu %.9g gpu %.9g\n", "gradient norm", nc, ng);
        CHECKF(fabs(nc - ng) <= TOL_GEMM * nc, "grad norm cpu %g gpu %g", nc, ng);
        float *pc = malloc(nbuf * 4), *pg = malloc(nbuf * 4);
        OK(nsa_model_get_params(mc, pc));
        OK(nsa_model_get_params(mg, pg));
        int skipped = 0;
        for (size_t i = 0; i < nsa_model_num_tensors(mc); i++) {
            nsa_tensor_info ti;
            OK(nsa_model_tensor(mc, i, &ti));
            if (noise[i]) {
                memcpy(pg + ti.offset, pc + ti.offset, ti.numel * 4);
                skipped++;
            }
        }
        printf("    (%d tensors with a ~0 gradient left out of the next line)\n", skipped);
        cmp("params after one AdamW step", pg, pc, nbuf, TOL_GEMM);
        free(pc);
        free(pg);
    }
    free(noise);
    nsa_optimizer_free(oc_);
    nsa_optimizer_free(og);
    nsa_model_free(mc);
    nsa_model_free(mg);
    free(params);
    free(tok);
    free(lc);
    free(lg);
    free(gc);
    free(gg);
}

static nsa_config seed_config(void)
{
    nsa_config c;
    nsa_config_default(&c);
    c.embed_dim = 24;
    c.hidden_size = 32;
    c.num_heads = 4;
    c.head_dim = 16;
    c.num_layers = 2;
    c.window_size = 9;
    c.block_size = 8;
    c.num_selected_blocks = 3;
    c.compression_ratio = 4;
    c.dropout = 0.1;
    c.vocab_size = 37;
    return c;
}

static nsa_config paper_config(void)
{
    nsa_config c;
    nsa_paper_defaults(&c);
    c.embed_dim = 32;
    c.hidden_size = 32;
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
    return c;
}

static void test_model_seed(void)
{
    nsa_config c = seed_config();
    model_case("seed config (mean, mean_key, static gate, in_proj, dropout)", &c, gpu, 2, 67);
    model_case("seed config (mean, mean_key, static gate, in_proj, dropout)", &c, gpu_simple, 2,
               67);
}

static void test_model_paper(void)
{
    nsa_config c = paper_config();
    model_case("paper config (mlp, cmp_attn, paper, token gate, rope)", &c, gpu, 2, 90);
    model_case("paper config (mlp, cmp_attn, paper, token gate, rope)", &c, gpu_simple, 2, 90);
}

static void test_model_paper_quick(void)
{
    nsa_config c = paper_config();
    model_case("paper config (mlp, cmp_attn, paper, token gate, rope)", &c, gpu, 1, 40);
}

// Cached generation (attention with q_start = t on the GPU) against the CPU, token by token.
static void test_generate(void)
{
    nsa_config c = paper_config();
    c.num_heads = 16;
    c.num_kv_heads = 1; // 16 heads per kv head: the per-position selected kernel
    nsa_model *mc = NULL, *mg = NULL;
    OK(nsa_model_create(&mc, cpu, &c));
    OK(nsa_model_create(&mg, gpu, &c));
    if (!mc || !mg) {
        nsa_model_free(mc);
        nsa_model_free(mg);
        return;
    }
    OK(nsa_model_init(mc, 5));
    OK(nsa_model_init(mg, 5));
    nsa_generator *gc = NULL, *gg = NULL;
    OK(nsa_generator_create(&gc, mc, 80));
    OK(nsa_generator_create(&gg, mg, 80));
    int V = c.vocab_size;
    float *lc = malloc(sizeof(float) * V), *lg = malloc(sizeof(float) * V);
    double worst = 0.0;
    for (int i = 0; gc && gg && i < 80; i++) {
        int32_t tok = (int32_t)(test_rng_next(&rng) % (uint64_t)V);
        OK(nsa_generator_step(gc, tok, lc));
        OK(nsa_generator_step(gg, tok, lg));
        size_t wi;
        double e = rel_err_floor(lg, lc, V, 0.0, &wi);
        worst = e > worst || isnan(e) ? (isnan(e) ? INFINITY : e) : worst;
    }
    printf("    %-34s max rel err %.2e\n", "generated logits (80 steps)", worst);
    CHECKF(worst <= TOL_GEMM, "generate: logits differ by %.3g", worst);
    nsa_generator_free(gc);
    nsa_generator_free(gg);
    nsa_model_free(mc);
    nsa_model_free(mg);
    free(lc);
    free(lg);
}

static void test_model_conv_gqa(void)
{
    nsa_config c = seed_config();
    c.compress = NSA_COMPRESS_CONV;
    c.num_kv_heads = 1;
    c.compression_block = 8;
    c.select_score = NSA_SELECT_CMP_ATTN;
    c.head_dim = 64; // the tiled kernels' DP = 64 path in the model
    model_case("conv compression, G = 1, cmp_attn, d = 64", &c, gpu, 1, 100);
}

// ----------------------------------------------------------------------------------------

// --quick: a subset (a few attention shapes, one model); --race: two tiny attention shapes
// for compute-sanitizer racecheck.
int main(int argc, char **argv)
{
    int quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
    int race = argc > 1 && strcmp(argv[1], "--race") == 0;
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
    setenv("NSA_CUDA_ATTN", "simple", 1);
    nsa_status st = nsa_context_create(&gpu_simple, NSA_DEVICE_CUDA, 0);
    unsetenv("NSA_CUDA_ATTN");
    if (st != NSA_OK) {
        printf("FAIL context creation (simple): %s\n", nsa_last_error());
        printf("RESULT 0 1\n");
        return 1;
    }
    if (race) {
        RUN(test_attention_race);
        nsa_context_free(gpu_simple);
        nsa_context_free(gpu);
        nsa_context_free(cpu);
        return harness_finish();
    }
    if (quick) {
        RUN(test_memory);
        RUN(test_layernorm);
        RUN(test_compress);
        RUN(test_attention_quick);
        RUN(test_model_paper_quick);
        nsa_context_free(gpu_simple);
        nsa_context_free(gpu);
        nsa_context_free(cpu);
        return harness_finish();
    }
    RUN(test_memory);
    RUN(test_linear);
    RUN(test_layernorm);
    RUN(test_elementwise);
    RUN(test_rope);
    RUN(test_compress);
    RUN(test_gates);
    RUN(test_embedding_loss);
    RUN(test_optimizer_ops);
    RUN(test_attention_tiled);
    RUN(test_attention_simple);
    RUN(test_attention_public_op);
    RUN(test_model_seed);
    RUN(test_model_paper);
    RUN(test_model_conv_gqa);
    RUN(test_generate);
    nsa_context_free(gpu_simple);
    nsa_context_free(gpu);
    nsa_context_free(cpu);
    return harness_finish();
}
