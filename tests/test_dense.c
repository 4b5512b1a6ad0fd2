/*
 * test_dense.c — the CPU attention kernels against float64 references:
 *   - the flash-style dense causal attention (src/cpu/dense.h) that `nsa bench` compares
 *     NSA with: forward against a plain float64 causal attention; backward against
 *     central finite differences of that reference on tiny shapes, and against its
 *     float64 analytic gradient (itself checked by the differences) on shapes that span
 *     several key chunks and tiles;
 *   - the tiled NSA paths (cpu_attention.c) against the plain one-row-at-a-time path they
 *     replaced (attn_ref.c), forward and backward, on random shapes including odd head
 *     dims, GQA, partial blocks and multi-tile sequences.
 * Internal functions are reached through the static library (tests link libnsa.a).
 */
#include "backend.h"
#include "cpu/attn.h"
#include "cpu/dense.h"
#include "harness.h"
#include "nsa.h"

#include <omp.h>

// ----------------------------------------------------------------------------------------
// float64 reference of full causal attention (GQA: head h reads kv head h / (H/G))

typedef struct dense_shape {
    int B, T, H, G, d;
} dense_shape;

static void ref_dense(const dense_shape *s, const double *q, const double *k, const double *v,
                      double *out, double scale)
{
    int hpg = s->H / s->G;
    double *p = malloc(sizeof(double) * (size_t)s->T);
    for (int b = 0; b < s->B; b++)
        for (int t = 0; t < s->T; t++)
            for (int h = 0; h < s->H; h++) {
                int g = h / hpg;
                const double *qr = q + (((size_t)b * s->T + t) * s->H + h) * s->d;
                double mx = -INFINITY, sum = 0.0;
                for (int j = 0; j <= t; j++) {
                    const double *kr = k + (((size_t)b * s->T + j) * s->G + g) * s->d;
                    double x = 0.0;
                    for (int c = 0; c < s->d; c++)
                        x += qr[c] * kr[c];
                    p[j] = scale * x;
                    mx = p[j] > mx ? p[j] : mx;
                }
                for (int j = 0; j <= t; j++)
                    sum += p[j] = exp(p[j] - mx);
                double *o = out + (((size_t)b * s->T + t) * s->H + h) * s->d;
                for (int c = 0; c < s->d; c++) {
                    double acc = 0.0;
                    for (int j = 0; j <= t; j++)
                        acc += p[j] / sum * v[(((size_t)b * s->T + j) * s->G + g) * s->d + c];
                    o[c] = acc;
                }
            }
    free(p);
}

// Analytic float64 gradient of L = sum(dout * out): dq, dk, dv (=).
static void ref_dense_grad(const dense_shape *s, const double *q, const double *k,
                           const double *v, const double *dout, double scale, double *dq,
                           double *dk, double *dv)
{
    int hpg = s->H / s->G, T = s->T, d = s->d;
    size_t nq = (size_t)s->B * T * s->H * d, nk = (size_t)s->B * T * s->G * d;
    memset(dq, 0, sizeof(double) * nq);
    memset(dk, 0, sizeof(double) * nk);
    memset(dv, 0, sizeof(double) * nk);
    double *p = malloc(sizeof(double) * (size_t)T), *dp = malloc(sizeof(double) * (size_t)T);
    for (int b = 0; b < s->B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < s->H; h++) {
                int g = h / hpg;
                size_t row = ((size_t)b * T + t) * s->H + h;
                const double *qr = q + row * d, *dor = dout + row * d;
                double mx = -INFINITY, sum = 0.0, D = 0.0;
                for (int j = 0; j <= t; j++) {
                    const double *kr = k + (((size_t)b * T + j) * s->G + g) * d;
                    double x = 0.0;
                    for (int c = 0; c < d; c++)
                        x += qr[c] * kr[c];
                    p[j] = scale * x;
                    mx = p[j] > mx ? p[j] : mx;
                }
                for (int j = 0; j <= t; j++)
                    sum += p[j] = exp(p[j] - mx);
                for (int j = 0; j <= t; j++) {
                    p[j] /= sum;
                    const double *vr = v + (((size_t)b * T + j) * s->G + g) * d;
                    double x = 0.0;
                    for (int c = 0; c < d; c++)
                        x += dor[c] * vr[c];
                    dp[j] = x;
                    D += p[j] * x;
                }
                for (int j = 0; j <= t; j++) {
                    size_t kv = (((size_t)b * T + j) * s->G + g) * d;
                    double ds = p[j] * (dp[j] - D) * scale;
                    for (int c = 0; c < d; c++) {
                        dq[row * d + c] += ds * k[kv + c];
                        dk[kv + c] += ds * qr[c];
                        dv[kv + c] += p[j] * dor[c];
                    }
                }
            }
    free(p);
    free(dp);
}

static double *as_double(const float *x, size_t n)
{
    double *y = malloc(sizeof(double) * (n ? n : 1));
    for (size_t i = 0; i < n; i++)
        y[i] = x[i];
    return y;
}

typedef struct dense_case {
    dense_shape s;
    float *q, *k, *v, *dout;
    double *qd, *kd, *vd, *doutd;
    size_t nq, nk;
} dense_case;

static void dense_case_init(dense_case *c, dense_shape s, uint64_t seed)
{
    c->s = s;
    c->nq = (size_t)s.B * s.T * s.H * s.d;
    c->nk = (size_t)s.B * s.T * s.G * s.d;
    test_rng rng = {seed};
    c->q = malloc(sizeof(float) * c->nq);
    c->k = malloc(sizeof(float) * c->nk);
    c->v = malloc(sizeof(float) * c->nk);
    c->dout = malloc(sizeof(float) * c->nq);
    test_fill(&rng, c->q, c->nq, 1.5);
    test_fill(&rng, c->k, c->nk, 1.5);
    test_fill(&rng, c->v, c->nk, 1.0);
    test_fill(&rng, c->dout, c->nq, 1.0);
    c->qd = as_double(c->q, c->nq);
    c->kd = as_double(c->k, c->nk);
    c->vd = as_double(c->v, c->nk);
    c->doutd = as_double(c->dout, c->nq);
}

static void dense_case_free(dense_case *c)
{
    free(c->q);
    free(c->k);
    free(c->v);
    free(c->dout);
    free(c->qd);
    free(c->kd);
    free(c->vd);
    free(c->doutd);
}

// The library's forward and backward on the case; gradients against ref (double) arrays.
static void check_dense(const char *name, dense_case *c, const double *gq, const double *gk,
                        const double *gv, double tol)
{
    const dense_shape *s = &c->s;
    double scale = 1.0 / sqrt((double)s->d);
    float *out = malloc(sizeof(float) * c->nq), *lse = malloc(sizeof(float) * c->nq / s->d);
    float *dq = malloc(sizeof(float) * c->nq), *dk = malloc(sizeof(float) * c->nk);
    float *dv = malloc(sizeof(float) * c->nk);
    double *ref = malloc(sizeof(double) * c->nq);
    test_poison(out, c->nq);
    test_poison(lse, c->nq / s->d);
    nsa_status st = nsa__cpu_dense_attention_forward(s->B, s->T, s->H, s->G, s->d, 0.0f, c->q,
                                                     c->k, c->v, out, lse);
    CHECKF(st == NSA_OK, "%s: forward returned %d", name, (int)st);
    ref_dense(s, c->qd, c->kd, c->vd, ref, scale);
    char what[160];
    snprintf(what, sizeof what, "%s out", name);
    harness_compare(what, out, ref, c->nq, TOL_F32);
    if (gq) {
        test_poison(dq, c->nq);
        test_poison(dk, c->nk);
        test_poison(dv, c->nk);
        st = nsa__cpu_dense_attention_backward(s->B, s->T, s->H, s->G, s->d, 0.0f, c->q, c->k,
                                               c->v, out, lse, c->dout, dq, dk, dv);
        CHECKF(st == NSA_OK, "%s: backward returned %d", name, (int)st);
        snprintf(what, sizeof what, "%s dq", name);
        harness_compare(what, dq, gq, c->nq, tol);
        snprintf(what, sizeof what, "%s dk", name);
        harness_compare(what, dk, gk, c->nk, tol);
        snprintf(what, sizeof what, "%s dv", name);
        harness_compare(what, dv, gv, c->nk, tol);
    }
    free(out);
    free(lse);
    free(dq);
    free(dk);
    free(dv);
    free(ref);
}

// ----------------------------------------------------------------------------------------
// Dense attention

static void test_dense_forward(void)
{
    const dense_shape shapes[] = {
        {1, 1, 1, 1, 1},   {1, 7, 2, 2, 3},    {2, 37, 4, 2, 8},   {1, 61, 6, 3, 13},
        {1, 300, 4, 1, 16}, {2, 530, 8, 2, 64}, {1, 129, 16, 4, 64},
    };
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        dense_case c;
        dense_case_init(&c, shapes[i], 500 + i);
        char name[64];
        snprintf(name, sizeof name, "T%d H%d G%d d%d", shapes[i].T, shapes[i].H, shapes[i].G,
                 shapes[i].d);
        check_dense(name, &c, NULL, NULL, NULL, 0);
        dense_case_free(&c);
    }
}

// L(x) = sum(dout * ref(x)); central differences in float64 for every input element.
static void finite_differences(dense_case *c, double *gq, double *gk, double *gv)
{
    const dense_shape *s = &c->s;
    double scale = 1.0 / sqrt((double)s->d), h = 1e-6;
    double *out = malloc(sizeof(double) * c->nq);
    double *arrays[3] = {c->qd, c->kd, c->vd}, *grads[3] = {gq, gk, gv};
    size_t sizes[3] = {c->nq, c->nk, c->nk};
    for (int a = 0; a < 3; a++)
        for (size_t i = 0; i < sizes[a]; i++) {
            double keep = arrays[a][i], lp = 0.0, lm = 0.0;
            arrays[a][i] = keep + h;
            ref_dense(s, c->qd, c->kd, c->vd, out, scale);
            for (size_t j = 0; j < c->nq; j++)
                lp += c->doutd[j] * out[j];
            arrays[a][i] = keep - h;
            ref_dense(s, c->qd, c->kd, c->vd, out, scale);
            for (size_t j = 0; j < c->nq; j++)
                lm += c->doutd[j] * out[j];
            arrays[a][i] = keep;
            grads[a][i] = (lp - lm) / (2 * h);
        }
    free(out);
}

static void test_dense_backward_finite_differences(void)
{
    const dense_shape shapes[] = {{1, 9, 2, 1, 4}, {2, 13, 4, 2, 5}, {1, 17, 3, 3, 8}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        dense_case c;
        dense_case_init(&c, shapes[i], 600 + i);
        double *gq = malloc(sizeof(double) * c.nq), *gk = malloc(sizeof(double) * c.nk);
        double *gv = malloc(sizeof(double) * c.nk);
        double *aq = malloc(sizeof(double) * c.nq), *ak = malloc(sizeof(double) * c.nk);
        double *av = malloc(sizeof(double) * c.nk);
        finite_differences(&c, gq, gk, gv);
        // the analytic float64 gradient used for larger shapes agrees with the differences
        ref_dense_grad(&c.s, c.qd, c.kd, c.vd, c.doutd, 1.0 / sqrt((double)c.s.d), aq, ak, av);
        double e = 0.0;
        for (size_t j = 0; j < c.nq; j++)
            e = fmax(e, fabs(aq[j] - gq[j]));
        for (size_t j = 0; j < c.nk; j++)
            e = fmax(e, fmax(fabs(ak[j] - gk[j]), fabs(av[j] - gv[j])));
        CHECKF(e < 1e-7, "shape %zu: analytic float64 gradient differs from finite differences "
                         "by %g", i, e);
        char name[64];
        snprintf(name, sizeof name, "fd T%d H%d G%d d%d", shapes[i].T, shapes[i].H, shapes[i].G,
                 shapes[i].d);
        check_dense(name, &c, gq, gk, gv, 1e-5);
        free(gq);
        free(gk);
        free(gv);
        free(aq);
        free(ak);
        free(av);
        dense_case_free(&c);
    }
}

static void test_dense_backward_large(void)
{
    // several 256-key chunks, several tiles per thread, odd head dims, GQA
    const dense_shape shapes[] = {{1, 300, 4, 1, 16}, {2, 530, 8, 2, 64}, {1, 77, 3, 1, 9}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        dense_case c;
        dense_case_init(&c, shapes[i], 700 + i);
        double *gq = malloc(sizeof(double) * c.nq), *gk = malloc(sizeof(double) * c.nk);
        double *gv = malloc(sizeof(double) * c.nk);
        ref_dense_grad(&c.s, c.qd, c.kd, c.vd, c.doutd, 1.0 / sqrt((double)c.s.d), gq, gk, gv);
        char name[64];
        snprintf(name, sizeof name, "T%d H%d G%d d%d", shapes[i].T, shapes[i].H, shapes[i].G,
                 shapes[i].d);
        check_dense(name, &c, gq, gk, gv, 2e-5);
        free(gq);
        free(gk);
        free(gv);
        dense_case_free(&c);
    }
}

// Same inputs, same thread count: bit-identical outputs and gradients.
static void test_dense_deterministic(void)
{
    dense_case c;
    dense_case_init(&c, (dense_shape){1, 200, 4, 2, 32}, 800);
    size_t nq = c.nq, nk = c.nk, nl = nq / 32;
    float *buf[2][5];
    for (int run = 0; run < 2; run++) {
        float *out = malloc(sizeof(float) * nq), *lse = malloc(sizeof(float) * nl);
        float *dq = malloc(sizeof(float) * nq), *dk = malloc(sizeof(float) * nk);
        float *dv = malloc(sizeof(float) * nk);
        nsa__cpu_dense_attention_forward(1, 200, 4, 2, 32, 0.0f, c.q, c.k, c.v, out, lse);
        nsa__cpu_dense_attention_backward(1, 200, 4, 2, 32, 0.0f, c.q, c.k, c.v, out, lse,
                                          c.dout, dq, dk, dv);
        buf[run][0] = out, buf[run][1] = lse, buf[run][2] = dq, buf[run][3] = dk, buf[run][4] = dv;
    }
    size_t sizes[5] = {nq, nl, nq, nk, nk};
    for (int i = 0; i < 5; i++) {
        CHECKF(memcmp(buf[0][i], buf[1][i], sizeof(float) * sizes[i]) == 0,
               "array %d differs between two runs", i);
        free(buf[0][i]);
        free(buf[1][i]);
    }
    dense_case_free(&c);
}

static void test_dense_bad_shape(void)
{
    float x[8] = {0};
    CHECK(nsa__cpu_dense_attention_forward(1, 1, 3, 2, 1, 0.0f, x, x, x, x, x) == NSA_ERR_INVALID);
    CHECK(nsa__cpu_dense_attention_forward(1, 0, 1, 1, 1, 0.0f, x, x, x, x, x) == NSA_ERR_INVALID);
    CHECK(nsa_last_error()[0] != '\0');
}

// ----------------------------------------------------------------------------------------
// The tiled NSA paths against the plain path

static nsa_context *ctx;

// max |a - r| / max(max |r|, floor): the floor keeps exactly-zero references (a path with
// one key has dS = 0) from turning rounding noise into a relative failure.
static double rel_err(const float *a, const float *r, size_t n, double floor)
{
    double scale = floor, worst = 0.0;
    for (size_t i = 0; i < n; i++)
        scale = fmax(scale, fabs(r[i]));
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - r[i]);
        if (!(e <= worst))
            worst = isnan(e) ? INFINITY : e;
    }
    return worst / scale;
}

static void nsa_fast_vs_plain(const nsa_attention_desc *desc, uint64_t seed, int *bad)
{
    nsa__attn_dims dm;
    nsa__attn_dims_init(&dm, desc);
    size_t nq = (size_t)dm.B * dm.T * dm.H * dm.d, nk = (size_t)dm.B * dm.T * dm.G * dm.d;
    size_t nkc = (size_t)dm.B * dm.num_cmp * dm.G * dm.d, ng = (size_t)dm.B * dm.T * dm.H * 3;
    size_t ni = (size_t)dm.B * dm.T * dm.G * dm.num_selected;
    test_rng rng = {seed};
    float *in = malloc(sizeof(float) * (2 * nq + 2 * nk + 2 * nkc + ng + 1));
    float *q = in, *dout = q + nq, *k = dout + nq, *v = k + nk, *kc = v + nk, *vc = kc + nkc;
    float *gates = vc + nkc;
    test_fill(&rng, in, 2 * nq + 2 * nk + 2 * nkc, 1.5);
    for (size_t i = 0; i < ng; i++)
        gates[i] = (float)(0.5 + 0.5 * test_rng_uniform(&rng));
    // [0] plain, [1] tiled
    float *out[2], *paths[2], *lse[2], *grads[2][6];
    int32_t *idx[2];
    size_t gsize[6] = {nq, nk, nk, nkc, nkc, ng};
    for (int w = 0; w < 2; w++) {
        out[w] = malloc(sizeof(float) * nq);
        paths[w] = malloc(sizeof(float) * 3 * nq);
        lse[w] = malloc(sizeof(float) * ng);
        idx[w] = malloc(sizeof(int32_t) * ni);
        for (int i = 0; i < 6; i++) {
            grads[w][i] = malloc(sizeof(float) * (gsize[i] + 1));
            test_poison(grads[w][i], gsize[i]);
        }
        test_poison(out[w], nq);
        test_poison(paths[w], 3 * nq);
    }
    nsa__cpu_attn_forward_ref(ctx, &dm, q, k, v, kc, vc, gates, NULL, idx[0], out[0], paths[0],
                              lse[0]);
    nsa__cpu_attn_forward_ex(ctx, &dm, q, k, v, kc, vc, gates, NULL, idx[1], out[1], paths[1],
                             lse[1], NULL);
    // backward of both from the plain forward's selection and saved paths
    nsa__cpu_attn_backward_ref(ctx, &dm, q, k, v, kc, vc, gates, idx[0], paths[0], lse[0], dout,
                               grads[0][0], grads[0][1], grads[0][2], grads[0][3], grads[0][4],
                               grads[0][5]);
    nsa__cpu_attn_backward_ex(ctx, &dm, q, k, v, kc, vc, gates, idx[0], paths[0], lse[0], dout,
                              grads[1][0], grads[1][1], grads[1][2], grads[1][3], grads[1][4],
                              grads[1][5], NULL);
    const char *names[6] = {"dq", "dk", "dv", "dkc", "dvc", "dgates"};
    double worst = fmax(rel_err(out[1], out[0], nq, 1e-3), rel_err(paths[1], paths[0], 3 * nq, 1e-3));
    const char *worst_name = "out";
    // gradients that are 0 in exact arithmetic (a path with a single key has dS = 0) are
    // rounding noise of terms the size of dv's entries: that is the scale they are held to
    double gscale = 1e-3;
    for (size_t i = 0; i < nk; i++)
        gscale = fmax(gscale, fabs(grads[0][2][i]));
    for (int i = 0; i < 6; i++) {
        double e = rel_err(grads[1][i], grads[0][i], gsize[i], i == 5 ? 1e-3 : gscale);
        if (e > worst) {
            worst = e;
            worst_name = names[i];
        }
    }
    int same_idx = memcmp(idx[0], idx[1], sizeof(int32_t) * ni) == 0;
    if (!(worst <= 2e-5) || !same_idx) {
        if ((*bad)++ < 5)
            fprintf(stderr, "  B%d T%d H%d G%d d%d b%d w%d r%d l%d n%d score %d fixed %d: "
                            "worst %s %.3g, selection %s\n",
                    dm.B, dm.T, dm.H, dm.G, dm.d, dm.block_size, dm.window, dm.cmp_stride,
                    dm.cmp_len, dm.num_selected, (int)dm.select_score, (int)dm.select_fixed,
                    worst_name, worst, same_idx ? "same" : "differs");
    }
    for (int w = 0; w < 2; w++) {
        free(out[w]);
        free(paths[w]);
        free(lse[w]);
        free(idx[w]);
        for (int i = 0; i < 6; i++)
            free(grads[w][i]);
    }
    free(in);
}

static void test_nsa_tiled_matches_plain(void)
{
    test_rng rng = {900};
    int bad = 0, cases = 120;
    for (int i = 0; i < cases; i++) {
        nsa_attention_desc de;
        memset(&de, 0, sizeof de);
        int G = 1 + (int)(test_rng_next(&rng) % 3), hpg = 1 + (int)(test_rng_next(&rng) % 5);
        de.batch = 1 + (int)(test_rng_next(&rng) % 2);
        de.seq_len = 1 + (int)(test_rng_next(&rng) % 150);
        de.num_heads = G * hpg;
        de.num_kv_heads = G;
        de.head_dim = 1 + (int)(test_rng_next(&rng) % 20);
        de.window_size = 1 + (int)(test_rng_next(&rng) % 40);
        de.compression_ratio = 1 + (int)(test_rng_next(&rng) % 4);
        de.compression_block = de.compression_ratio * (1 + (int)(test_rng_next(&rng) % 3));
        de.num_selected_blocks = 3 + (int)(test_rng_next(&rng) % 5);
        de.select_score = test_rng_next(&rng) % 2 ? NSA_SELECT_CMP_ATTN : NSA_SELECT_MEAN_KEY;
        de.block_size = 1 + (int)(test_rng_next(&rng) % 12);
        if (de.select_score == NSA_SELECT_CMP_ATTN)
            de.block_size = de.compression_ratio * (1 + (int)(test_rng_next(&rng) % 3));
        de.select_fixed = test_rng_next(&rng) % 2 ? NSA_SELECT_FIXED_PAPER : NSA_SELECT_FIXED_NONE;
        if (i % 10 == 0) { // the paper's head dim and a sequence of many tiles
            de.head_dim = 64;
            de.block_size = 16;
            de.compression_ratio = 8;
            de.compression_block = 16;
            de.seq_len = 400;
        }
        nsa_fast_vs_plain(&de, 1000 + (uint64_t)i, &bad);
    }
    CHECKF(bad == 0, "%d of %d random cases differ", bad, cases);
    // sequences long enough for the key-centric selected forward (T * head_dim >= 128Ki)
    const nsa_attention_desc longs[] = {
        {2, 2100, 8, 2, 64, 64, 128, 16, 32, 6, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_PAPER, 0},
        {1, 2300, 3, 1, 61, 50, 100, 5, 10, 5, NSA_SELECT_MEAN_KEY, NSA_SELECT_FIXED_NONE, 0},
    };
    bad = 0;
    for (size_t i = 0; i < sizeof longs / sizeof longs[0]; i++)
        nsa_fast_vs_plain(&longs[i], 2000 + i, &bad);
    CHECKF(bad == 0, "%d of 2 long cases differ", bad);
}

// ----------------------------------------------------------------------------------------

int main(void)
{
    RUN(test_dense_forward);
    RUN(test_dense_backward_finite_differences);
    RUN(test_dense_backward_large);
    RUN(test_dense_deterministic);
    RUN(test_dense_bad_shape);
    if (nsa_context_create(&ctx, NSA_DEVICE_CPU, 0) != NSA_OK) {
        printf("FAIL nsa_context_create: %s\n", nsa_last_error());
        harness_failed++;
        return harness_finish();
    }
    RUN(test_nsa_tiled_matches_plain);
    nsa_context_free(ctx);
    return harness_finish();
}
