/*
 * dense_attention.c — full causal attention, flash-style, forward and backward (dense.h):
 * the baseline of `nsa bench`, written with the same care as the NSA paths so that the
 * speedup measured is the one sparsity buys, not a difference in code quality.
 *
 * Per (batch, kv head) unit, k and v are packed into 8-key panels and rows (as for
 * NSA); tiles of consecutive queries times the heads of the group (64 rows) walk the
 * keys up to their last query in chunks of 256, with an online softmax (running max and
 * sum, the output rescaled when the max moves). The backward recomputes P from the saved
 * log-sum-exp, accumulates dk and dv per thread and sums them in thread order (tiles are
 * dealt in a fixed order: bit-identical results run to run).
 */
#include "cpu/dense.h"
#include "cpu/attn_kernels.h"
#include "internal.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#define DENSE_CHUNK 256 // keys per step of the online softmax

typedef struct dense_plan {
    int B, T, H, G, d, dp, hpg, Tq, ntiles, rows, T8;
    float scale;
} dense_plan;

static void dense_plan_init(dense_plan *pl, int B, int T, int H, int G, int d, float scale)
{
    pl->B = B;
    pl->T = T;
    pl->H = H;
    pl->G = G;
    pl->d = d;
    pl->dp = nsa__round8(d);
    pl->hpg = H / G;
    int Tq = nsa__round4(64 / pl->hpg > 0 ? 64 / pl->hpg : 1);
    int threads = omp_get_max_threads();
    int per_thread = nsa__round4((T + 4 * threads - 1) / (4 * threads));
    pl->Tq = Tq < per_thread ? Tq : (per_thread > 4 ? per_thread : 4);
    pl->ntiles = (T + pl->Tq - 1) / pl->Tq;
    pl->rows = nsa__round4(pl->Tq * pl->hpg) + 4;
    pl->T8 = nsa__round8(T);
    pl->scale = scale > 0.0f ? scale : 1.0f / sqrtf((float)d);
}

// Packs unit (b, g): kt (panels of k), vrow (rows of v); with vt, krow also the
// backward's panels of v and rows of k. Inside a parallel region; ends with a barrier.
static void dense_pack(const dense_plan *pl, const float *k, const float *v, int b, int g,
                       float *kt, float *vrow, float *vt, float *krow)
{
    const ptrdiff_t stride = (ptrdiff_t)pl->G * pl->d;
    const float *kb = k + ((size_t)b * pl->T * pl->G + g) * pl->d;
    const float *vb = v + ((size_t)b * pl->T * pl->G + g) * pl->d;
    const int dp = pl->dp;
#pragma omp for schedule(static)
    for (int p = 0; p < pl->T8 / 8; p++) {
        nsa__pack_panels(kt + (size_t)p * 8 * dp, kb, stride, pl->d, dp, 8 * p, 1, pl->T);
        nsa__pack_rows(vrow + (size_t)p * 8 * dp, vb, stride, pl->d, dp, 8 * p, 8, pl->T, 1.0f);
        if (vt) {
            nsa__pack_panels(vt + (size_t)p * 8 * dp, vb, stride, pl->d, dp, 8 * p, 1, pl->T);
            nsa__pack_rows(krow + (size_t)p * 8 * dp, kb, stride, pl->d, dp, 8 * p, 8, pl->T,
                           1.0f);
        }
    }
}

// Rows of the tile (queries t0.., heads of group g; row r = qi*hpg + hh) of x [B,T,H,d]
// times alpha into dst [rows][dp], zero padded.
static void dense_load(const dense_plan *pl, const float *x, int b, int g, int t0, int nq,
                       float *dst, float alpha)
{
    const float *base = x + (((size_t)b * pl->T + t0) * pl->H + (size_t)g * pl->hpg) * pl->d;
    memset(dst, 0, sizeof(float) * (size_t)pl->rows * pl->dp);
    for (int qi = 0; qi < nq; qi++)
        nsa__pack_rows(dst + (size_t)qi * pl->hpg * pl->dp, base + (size_t)qi * pl->H * pl->d,
                       pl->d, pl->d, pl->dp, 0, pl->hpg, pl->hpg, alpha);
}

// Causal mask of the chunk [c0, c0 + cols) for rows of queries t0 + r/hpg.
static void dense_mask(const dense_plan *pl, float *S, int M, int Mr, int cols, int t0, int c0)
{
    for (int r = 0; r < M; r++) {
        float *srow = S + (size_t)r * cols;
        int valid = r < Mr ? t0 + r / pl->hpg + 1 - c0 : 0; // keys c0 .. t
        if (valid < 0)
            valid = 0;
        for (int c = valid; c < cols; c++)
            srow[c] = -INFINITY;
    }
}

nsa_status nsa__cpu_dense_attention_forward(int B, int T, int H, int G, int d, float scale,
                                            const float *q, const float *k, const float *v,
                                            float *out, float *lse)
{
    if (B < 1 || T < 1 || H < 1 || G < 1 || d < 1 || H % G != 0)
        return nsa__error(NSA_ERR_INVALID, "dense attention: bad shape B=%d T=%d H=%d G=%d d=%d",
                          B, T, H, G, d);
    dense_plan pl;
    dense_plan_init(&pl, B, T, H, G, d, scale);
    const int dp = pl.dp;
    float *pack = malloc(nsa__mul_size((size_t)2 * pl.T8, (size_t)dp * sizeof(float)));
    if (!pack)
        return nsa__error(NSA_ERR_NOMEM, "dense attention: out of memory packing k and v");
    float *kt = pack, *vrow = pack + (size_t)pl.T8 * dp;
    int failed = 0;
#pragma omp parallel
    {
        size_t rows = (size_t)pl.rows * dp;
        float *mem = malloc(sizeof(float) * (2 * rows + (size_t)pl.rows * (DENSE_CHUNK + 3)));
        if (!mem) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        float *qs = mem, *o = qs + rows, *S = o + rows;
        float *m = S + (size_t)pl.rows * DENSE_CHUNK, *l = m + pl.rows, *alpha = l + pl.rows;
        for (int unit = 0; unit < B * G && !failed; unit++) {
            int b = unit / G, g = unit % G;
            dense_pack(&pl, k, v, b, g, kt, vrow, NULL, NULL);
#pragma omp for schedule(dynamic, 1)
            for (int it = 0; it < pl.ntiles; it++) {
                int t0 = (pl.ntiles - 1 - it) * pl.Tq, nq = T - t0 < pl.Tq ? T - t0 : pl.Tq;
                int Mr = nq * pl.hpg, M = nsa__round4(Mr), t_last = t0 + nq - 1;
                dense_load(&pl, q, b, g, t0, nq, qs, pl.scale);
                memset(o, 0, sizeof(float) * (size_t)M * dp);
                for (int r = 0; r < M; r++) {
                    m[r] = -INFINITY;
                    l[r] = 0.0f;
                }
                for (int c0 = 0; c0 <= t_last; c0 += DENSE_CHUNK) {
                    int cols = nsa__round8((t_last + 1 - c0) < DENSE_CHUNK ? t_last + 1 - c0 : DENSE_CHUNK);
                    nsa__gemm_panels_contig(M, dp, qs, dp, kt + (size_t)c0 * dp, 8 * dp, cols / 8, S,
                                            cols);
                    if (c0 + cols > t0)
                        dense_mask(&pl, S, M, Mr, cols, t0, c0);
                    for (int r = 0; r < M; r++) {
                        float *srow = S + (size_t)r * cols;
                        if (r >= Mr) {
                            memset(srow, 0, sizeof(float) * (size_t)cols);
                            alpha[r] = 1.0f;
                            continue;
                        }
                        float mx = nsa__vmax(srow, cols);
                        float m_new = mx > m[r] ? mx : m[r];
                        if (m_new == -INFINITY) { // no key yet in this row
                            memset(srow, 0, sizeof(float) * (size_t)cols);
                            alpha[r] = 1.0f;
                            continue;
                        }
                        alpha[r] = m[r] == -INFINITY ? 0.0f : expf(m[r] - m_new);
                        l[r] = l[r] * alpha[r] + nsa__vexp_sum(srow, cols, m_new);
                        m[r] = m_new;
                    }
                    for (int r = 0; r < M; r++)
                        if (alpha[r] != 1.0f)
                            nsa__vscale(o + (size_t)r * dp, dp, alpha[r]);
                    nsa__seg seg = {vrow + (size_t)c0 * dp, cols};
                    nsa__gemm_rows(M, dp, S, cols, 1, &seg, 1, dp, o, dp, 1);
                }
                for (int r = 0; r < Mr; r++) {
                    int t = t0 + r / pl.hpg, h = g * pl.hpg + r % pl.hpg;
                    size_t row = ((size_t)b * T + t) * H + h;
                    float inv = 1.0f / l[r];
                    const float *src = o + (size_t)r * dp;
                    float *dst = out + row * d;
                    for (int c = 0; c < d; c++)
                        dst[c] = src[c] * inv;
                    if (lse)
                        lse[row] = m[r] + logf(l[r]);
                }
            }
        }
        free(mem);
    }
    free(pack);
    if (failed)
        return nsa__error(NSA_ERR_NOMEM, "dense attention: out of memory for scratch");
    return NSA_OK;
}

nsa_status nsa__cpu_dense_attention_backward(int B, int T, int H, int G, int d, float scale,
                                             const float *q, const float *k, const float *v,
                                             const float *out, const float *lse,
                                             const float *dout, float *dq, float *dk,
                                             float *dv)
{
    if (B < 1 || T < 1 || H < 1 || G < 1 || d < 1 || H % G != 0)
        return nsa__error(NSA_ERR_INVALID, "dense attention: bad shape B=%d T=%d H=%d G=%d d=%d",
                          B, T, H, G, d);
    dense_plan pl;
    dense_plan_init(&pl, B, T, H, G, d, scale);
    const int dp = pl.dp, threads = omp_get_max_threads();
    const size_t kv = (size_t)pl.T8 * dp;
    float *pack = malloc(nsa__mul_size(4 * kv, sizeof(float)));
    float **acc = calloc((size_t)threads * 2, sizeof(float *));
    if (!pack || !acc) {
        free(pack);
        free(acc);
        return nsa__error(NSA_ERR_NOMEM, "dense attention: out of memory packing k and v");
    }
    float *kt = pack, *vrow = pack + kv, *vt = pack + 2 * kv, *krow = pack + 3 * kv;
    int failed = 0;
#pragma omp parallel
    {
        size_t rows = (size_t)pl.rows * dp;
        int id = omp_get_thread_num(), nth = omp_get_num_threads();
        float *mem = malloc(sizeof(float) * (3 * rows + 2 * (size_t)pl.rows * DENSE_CHUNK +
                                             2 * (size_t)pl.rows + 2 * kv));
        if (!mem) {
#pragma omp atomic write
            failed = 1;
        }
        float *qs = mem, *dO = qs + rows, *dqt = dO + rows, *S = dqt + rows;
        float *dP = S + (size_t)pl.rows * DENSE_CHUNK, *L = dP + (size_t)pl.rows * DENSE_CHUNK;
        float *D = L + pl.rows, *dkp = D + pl.rows, *dvp = dkp + kv;
        if (mem) {
            acc[2 * id] = dkp;
            acc[2 * id + 1] = dvp;
        }
#pragma omp barrier
        for (int unit = 0; unit < B * G && !failed; unit++) {
            int b = unit / G, g = unit % G;
            dense_pack(&pl, k, v, b, g, kt, vrow, vt, krow);
            memset(dkp, 0, sizeof(float) * kv);
            memset(dvp, 0, sizeof(float) * kv);
#pragma omp for schedule(static, 1)
            for (int it = 0; it < pl.ntiles; it++) {
                int t0 = (pl.ntiles - 1 - it) * pl.Tq, nq = T - t0 < pl.Tq ? T - t0 : pl.Tq;
                int Mr = nq * pl.hpg, M = nsa__round4(Mr), t_last = t0 + nq - 1;
                dense_load(&pl, q, b, g, t0, nq, qs, pl.scale);
                dense_load(&pl, dout, b, g, t0, nq, dO, 1.0f);
                memset(dqt, 0, sizeof(float) * rows);
                for (int r = 0; r < Mr; r++) {
                    size_t row = ((size_t)b * T + t0 + r / pl.hpg) * H + g * pl.hpg + r % pl.hpg;
                    L[r] = lse[row];
                    D[r] = nsa__vdot(dO + (size_t)r * dp, out + row * d, d);
                }
                for (int c0 = 0; c0 <= t_last; c0 += DENSE_CHUNK) {
                    int cols = nsa__round8((t_last + 1 - c0) < DENSE_CHUNK ? t_last + 1 - c0 : DENSE_CHUNK);
                    const float *ktc = kt + (size_t)c0 * dp, *vtc = vt + (size_t)c0 * dp;
                    nsa__gemm_panels_contig(M, dp, qs, dp, ktc, 8 * dp, cols / 8, S, cols);
                    if (c0 + cols > t0)
                        dense_mask(&pl, S, M, Mr, cols, t0, c0);
                    for (int r = 0; r < M; r++) {
                        if (r < Mr)
                            nsa__vexp(S + (size_t)r * cols, cols, L[r]);
                        else
                            memset(S + (size_t)r * cols, 0, sizeof(float) * (size_t)cols);
                    }
                    nsa__gemm_panels_contig(M, dp, dO, dp, vtc, 8 * dp, cols / 8, dP, cols);
                    for (int r = 0; r < M; r++)
                        nsa__vdsoftmax(dP + (size_t)r * cols, S + (size_t)r * cols, cols,
                                       r < Mr ? D[r] : 0.0f);
                    nsa__seg seg = {krow + (size_t)c0 * dp, cols};
                    nsa__gemm_rows(M, dp, dP, cols, 1, &seg, 1, dp, dqt, dp, 1);
                    // dk += dS^T Q, dv += P^T dO: 4 keys at a time over the tile's rows
                    for (int kk = 0; kk < cols; kk += NSA_MR) {
                        size_t pos = (size_t)c0 + kk;
                        for (int n0 = 0; n0 < dp; n0 += 24) {
                            int nv = (dp - n0) / 8 < 3 ? (dp - n0) / 8 : 3;
                            nsa__seg qa = {qs + n0, Mr}, da = {dO + n0, Mr};
                            nsa__mk_rows(nv, &qa, 1, dp, dP + kk, 1, cols, dkp + pos * dp + n0, dp, 1);
                            nsa__mk_rows(nv, &da, 1, dp, S + kk, 1, cols, dvp + pos * dp + n0, dp, 1);
                        }
                    }
                }
                for (int r = 0; r < Mr; r++) {
                    size_t row = ((size_t)b * T + t0 + r / pl.hpg) * H + g * pl.hpg + r % pl.hpg;
                    for (int c = 0; c < d; c++)
                        dq[row * d + c] = pl.scale * dqt[(size_t)r * dp + c];
                }
            }
#pragma omp for schedule(static)
            for (int s = 0; s < T; s++) {
                float *dkr = dk + (((size_t)b * T + s) * G + g) * d;
                float *dvr = dv + (((size_t)b * T + s) * G + g) * d;
                for (int c = 0; c < d; c++) {
                    float sk = 0.0f, sv = 0.0f;
                    for (int th = 0; th < nth; th++) {
                        sk += acc[2 * th][(size_t)s * dp + c];
                        sv += acc[2 * th + 1][(size_t)s * dp + c];
                    }
                    dkr[c] = sk;
                    dvr[c] = sv;
                }
            }
        }
        free(mem);
    }
    free(acc);
    free(pack);
    if (failed)
        return nsa__error(NSA_ERR_NOMEM, "dense attention: out of memory for scratch");
    return NSA_OK;
}
