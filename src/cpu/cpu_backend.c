/*
 * cpu_backend.c — the CPU backend (the reference): memory, dense products through
 * OpenBLAS, norms, activations, dropout, RoPE, compression, gates, the language-model
 * ops and AdamW. The attention paths are in cpu_attention.c. Loops are written plainly
 * so the compiler vectorises them; OpenMP splits rows over the context's threads.
 * Reductions are done in a fixed order so results are bit-identical run to run.
 */
#include "backend.h"
#include "cpu/cpu.h"
#include "internal.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

// OpenBLAS's thread control (declared here so the netlib cblas.h also compiles).
void openblas_set_num_threads(int num_threads);

// ---------------------------------------------------------------------------------------
// Memory

static nsa_status cpu_alloc(nsa_context *ctx, void **ptr, size_t bytes)
{
    (void)ctx;
    // 64-byte alignment for SIMD loads; round the size up as aligned_alloc requires.
    size_t rounded = (bytes + 63) & ~(size_t)63;
    if (rounded < bytes)
        return nsa__error(NSA_ERR_NOMEM, "allocation of %zu bytes overflows", bytes);
    *ptr = aligned_alloc(64, rounded ? rounded : 64);
    if (!*ptr)
        return nsa__error(NSA_ERR_NOMEM, "out of memory allocating %zu bytes", bytes);
    return NSA_OK;
}

static void cpu_free(nsa_context *ctx, void *ptr)
{
    (void)ctx;
    free(ptr);
}

static nsa_status cpu_copy(nsa_context *ctx, void *dst, const void *src, size_t bytes)
{
    (void)ctx;
    if (bytes && dst != src)
        memmove(dst, src, bytes);
    return NSA_OK;
}

static nsa_status cpu_zero(nsa_context *ctx, void *dst, size_t bytes)
{
    (void)ctx;
    if (bytes)
        memset(dst, 0, bytes);
    return NSA_OK;
}

static nsa_status cpu_has_nonfinite(nsa_context *ctx, const float *x, size_t n, int *result)
{
    (void)ctx;
    *result = nsa__has_nonfinite(x, n);
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// Dense

// OpenBLAS runs single-threaded (see nsa__cpu_backend_init) and the products are split
// over the OpenMP threads here: one thread pool, no two pools spinning against each other.

// The [start, end) share of n items for this thread, in multiples of `align`.
static void thread_share(int n, int align, int *start, int *end)
{
    int threads = omp_get_num_threads(), id = omp_get_thread_num();
    int chunks = (n + align - 1) / align;
    int lo = (int)((long)chunks * id / threads), hi = (int)((long)chunks * (id + 1) / threads);
    *start = lo * align < n ? lo * align : n;
    *end = hi * align < n ? hi * align : n;
}

// C[M,N] = alpha op(A) op(B) + beta C, rows of C split over the threads (or its columns
// when there are few rows).
static void gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int M, int N, int K, const float *A,
                 int lda, const float *B, int ldb, float beta, float *C, int ldc)
{
    if (M == 0 || N == 0)
        return;
    long work = (long)M * N * (K > 0 ? K : 1);
    if (work < 32768 || omp_get_max_threads() == 1) {
        cblas_sgemm(CblasRowMajor, ta, tb, M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    int split_rows = M >= 4 * omp_get_max_threads() || M >= N;
#pragma omp parallel
    {
        int lo, hi;
        thread_share(split_rows ? M : N, split_rows ? 4 : 16, &lo, &hi);
        if (hi > lo) {
            if (split_rows) {
                const float *a = ta == CblasNoTrans ? A + (size_t)lo * lda : A + lo;
                cblas_sgemm(CblasRowMajor, ta, tb, hi - lo, N, K, 1.0f, a, lda, B, ldb, beta,
                            C + (size_t)lo * ldc, ldc);
            } else {
                const float *b = tb == CblasNoTrans ? B + lo : B + (size_t)lo * ldb;
                cblas_sgemm(CblasRowMajor, ta, tb, M, hi - lo, K, 1.0f, A, lda, b, ldb, beta,
                            C + lo, ldc);
            }
        }
    }
}

static nsa_status cpu_linear_forward(nsa_context *ctx, float *y, const float *x, const float *W,
                                     const float *bias, int M, int n_in, int n_out)
{
    (void)ctx;
    if (M == 0 || n_out == 0)
        return NSA_OK;
    float beta = 0.0f;
    if (bias) {
#pragma omp parallel for schedule(static)
        for (int m = 0; m < M; m++)
            memcpy(y + (size_t)m * n_out, bias, (size_t)n_out * sizeof(float));
        beta = 1.0f;
    }
    gemm(CblasNoTrans, CblasTrans, M, n_out, n_in, x, n_in, W, n_in, beta, y, n_out);
    return NSA_OK;
}

static nsa_status cpu_linear_backward(nsa_context *ctx, float *dx, float dx_beta, float *dW,
                                      float *dbias, const float *dy, const float *x,
                                      const float *W, int M, int n_in, int n_out)
{
    (void)ctx;
    if (M == 0)
        return NSA_OK;
    if (dx)
        gemm(CblasNoTrans, CblasNoTrans, M, n_in, n_out, dy, n_out, W, n_in, dx_beta, dx, n_in);
    if (dW)
        gemm(CblasTrans, CblasNoTrans, n_out, n_in, M, dy, n_out, x, n_in, 1.0f, dW, n_in);
    if (dbias) {
#pragma omp parallel for schedule(static)
        for (int o = 0; o < n_out; o++) {
            double s = 0.0;
            for (int m = 0; m < M; m++)
                s += dy[(size_t)m * n_out + o];
            dbias[o] += (float)s;
        }
    }
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// LayerNorm, GELU, elementwise

#define LN_EPS 1e-5

static nsa_status cpu_layernorm_forward(nsa_context *ctx, float *y, float *mean, float *rstd,
                                        const float *x, const float *gamma, const float *beta,
                                        int M, int D)
{
    (void)ctx;
#pragma omp parallel for schedule(static)
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * D;
        float *yr = y + (size_t)m * D;
        double s = 0.0;
        for (int i = 0; i < D; i++)
            s += xr[i];
        double mu = s / D, v = 0.0;
        for (int i = 0; i < D; i++)
            v += ((double)xr[i] - mu) * ((double)xr[i] - mu);
        double rs = 1.0 / sqrt(v / D + LN_EPS);
        float muf = (float)mu, rsf = (float)rs;
        for (int i = 0; i < D; i++)
            yr[i] = (xr[i] - muf) * rsf * gamma[i] + beta[i];
        if (mean)
            mean[m] = muf;
        if (rstd)
            rstd[m] = rsf;
    }
    return NSA_OK;
}

static nsa_status cpu_layernorm_backward(nsa_context *ctx, float *dx, float *dgamma, float *dbeta,
                                         const float *dy, const float *x, const float *mean,
                                         const float *rstd, const float *gamma, int M, int D)
{
    (void)ctx;
#pragma omp parallel for schedule(static)
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * D, *dyr = dy + (size_t)m * D;
        float *dxr = dx + (size_t)m * D;
        float mu = mean[m], rs = rstd[m];
        double sum_g = 0.0, sum_gx = 0.0;
        for (int i = 0; i < D; i++) {
            float xhat = (xr[i] - mu) * rs;
            float g = dyr[i] * gamma[i];
            sum_g += g;
            sum_gx += (double)g * xhat;
        }
        float mg = (float)(sum_g / D), mgx = (float)(sum_gx / D);
        for (int i = 0; i < D; i++) {
            float xhat = (xr[i] - mu) * rs;
            dxr[i] += rs * (dyr[i] * gamma[i] - mg - xhat * mgx);
        }
    }
#pragma omp parallel for schedule(static)
    for (int i = 0; i < D; i++) {
        double sg = 0.0, sb = 0.0;
        for (int m = 0; m < M; m++) {
            float xhat = (x[(size_t)m * D + i] - mean[m]) * rstd[m];
            sg += (double)dy[(size_t)m * D + i] * xhat;
            sb += dy[(size_t)m * D + i];
        }
        dgamma[i] += (float)sg;
        dbeta[i] += (float)sb;
    }
    return NSA_OK;
}

static nsa_status cpu_gelu_forward(nsa_context *ctx, float *y, const float *x, size_t n)
{
    (void)ctx;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++)
        y[i] = 0.5f * x[i] * (1.0f + erff(x[i] * (float)M_SQRT1_2));
    return NSA_OK;
}

static nsa_status cpu_gelu_backward(nsa_context *ctx, float *dx, const float *dy, const float *x,
                                    size_t n)
{
    (void)ctx;
    const float inv_sqrt_2pi = 0.3989422804014327f;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        float cdf = 0.5f * (1.0f + erff(x[i] * (float)M_SQRT1_2));
        float pdf = inv_sqrt_2pi * expf(-0.5f * x[i] * x[i]);
        dx[i] = dy[i] * (cdf + x[i] * pdf);
    }
    return NSA_OK;
}

static nsa_status cpu_add(nsa_context *ctx, float *y, const float *a, const float *b, size_t n)
{
    (void)ctx;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++)
        y[i] = a[i] + b[i];
    return NSA_OK;
}

static nsa_status cpu_scale(nsa_context *ctx, float *y, float alpha, size_t n)
{
    (void)ctx;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++)
        y[i] *= alpha;
    return NSA_OK;
}

static nsa_status cpu_dropout(nsa_context *ctx, float *x, size_t n, float p, uint64_t seed,
                              uint64_t stream)
{
    (void)ctx;
    if (p <= 0.0f)
        return NSA_OK;
    float keep_scale = 1.0f / (1.0f - p);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++)
        x[i] = nsa__uniform(seed, stream, i) >= p ? x[i] * keep_scale : 0.0f;
    return NSA_OK;
}

static nsa_status cpu_rope(nsa_context *ctx, float *x, int B, int T, int pos0, int nh, int d,
                           double theta, int inverse)
{
    (void)ctx;
    int half = d / 2;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < half; i++) {
            double angle = (double)(pos0 + t) * pow(theta, -2.0 * i / d);
            float c = (float)cos(angle), s = (float)sin(angle);
            if (inverse)
                s = -s;
            for (int b = 0; b < B; b++) {
                float *row = x + ((size_t)b * T + t) * nh * d;
                for (int h = 0; h < nh; h++) {
                    float *p = row + (size_t)h * d + 2 * i;
                    float x0 = p[0], x1 = p[1];
                    p[0] = x0 * c - x1 * s;
                    p[1] = x0 * s + x1 * c;
                }
            }
        }
    }
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// Compression (SPEC §3.1)

static int num_compressed(int T, int l, int r)
{
    return T >= l ? (T - l) / r + 1 : 0;
}

static nsa_status cpu_compress_forward(nsa_context *ctx, float *xc, const float *x, const float *W,
                                       int B, int T, int G, int d, int l, int r)
{
    (void)ctx;
    int Tc = num_compressed(T, l, r);
    float inv_l = 1.0f / (float)l;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int j = 0; j < Tc; j++) {
            for (int g = 0; g < G; g++) {
                float *out = xc + (((size_t)b * Tc + j) * G + g) * d;
                for (int c = 0; c < d; c++)
                    out[c] = 0.0f;
                for (int i = 0; i < l; i++) {
                    const float *in = x + (((size_t)b * T + (size_t)j * r + i) * G + g) * d;
                    const float *w = W ? W + ((size_t)g * l + i) * d : NULL;
                    for (int c = 0; c < d; c++)
                        out[c] += (w ? w[c] : inv_l) * in[c];
                }
            }
        }
    }
    return NSA_OK;
}

static nsa_status cpu_compress_backward(nsa_context *ctx, float *dx, float *dW, const float *dxc,
                                        const float *x, const float *W, int B, int T, int G, int d,
                                        int l, int r)
{
    (void)ctx;
    int Tc = num_compressed(T, l, r);
    float inv_l = 1.0f / (float)l;
    // One kv head per thread: overlapping blocks (l > r) write the same dx rows.
#pragma omp parallel for schedule(static)
    for (int g = 0; g < G; g++) {
        for (int b = 0; b < B; b++) {
            for (int j = 0; j < Tc; j++) {
                const float *dout = dxc + (((size_t)b * Tc + j) * G + g) * d;
                for (int i = 0; i < l; i++) {
                    size_t row = (((size_t)b * T + (size_t)j * r + i) * G + g) * d;
                    if (W) {
                        const float *w = W + ((size_t)g * l + i) * d;
                        float *dw = dW + ((size_t)g * l + i) * d;
                        for (int c = 0; c < d; c++) {
                            dx[row + c] += w[c] * dout[c];
                            dw[c] += x[row + c] * dout[c];
                        }
                    } else {
                        for (int c = 0; c < d; c++)
                            dx[row + c] += inv_l * dout[c];
                    }
                }
            }
        }
    }
    return NSA_OK;
}

static nsa_status cpu_compress_gather(nsa_context *ctx, float *X, const float *x, const float *pos,
                                      int B, int T, int G, int d, int l, int r)
{
    (void)ctx;
    int Tc = num_compressed(T, l, r);
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int j = 0; j < Tc; j++) {
            for (int g = 0; g < G; g++) {
                float *out = X + (((size_t)b * Tc + j) * G + g) * (size_t)l * d;
                for (int i = 0; i < l; i++) {
                    const float *in = x + (((size_t)b * T + (size_t)j * r + i) * G + g) * d;
                    for (int c = 0; c < d; c++)
                        out[(size_t)i * d + c] = in[c] + pos[(size_t)i * d + c];
                }
            }
        }
    }
    return NSA_OK;
}

static nsa_status cpu_compress_gather_backward(nsa_context *ctx, float *dx, float *dpos,
                                               const float *dX, int B, int T, int G, int d, int l,
                                               int r)
{
    (void)ctx;
    int Tc = num_compressed(T, l, r);
#pragma omp parallel for schedule(static)
    for (int g = 0; g < G; g++) {
        for (int b = 0; b < B; b++) {
            for (int j = 0; j < Tc; j++) {
                const float *in = dX + (((size_t)b * Tc + j) * G + g) * (size_t)l * d;
                for (int i = 0; i < l; i++) {
                    float *out = dx + (((size_t)b * T + (size_t)j * r + i) * G + g) * d;
                    for (int c = 0; c < d; c++)
                        out[c] += in[(size_t)i * d + c];
                }
            }
        }
    }
    // dpos sums over every (b, j, g): one (i, c) element per iteration, fixed order.
    size_t ld = (size_t)l * d;
#pragma omp parallel for schedule(static)
    for (size_t e = 0; e < ld; e++) {
        double s = 0.0;
        for (size_t row = 0; row < (size_t)B * Tc * G; row++)
            s += dX[row * ld + e];
        dpos[e] += (float)s;
    }
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// Gates

static nsa_status cpu_gate_forward(nsa_context *ctx, float *gates, const float *params, int M,
                                   int H, nsa_gate kind)
{
    (void)ctx;
    if (kind == NSA_GATE_STATIC) {
        double mx = fmax(params[0], fmax(params[1], params[2]));
        double e[3], s = 0.0;
        for (int c = 0; c < 3; c++)
            s += e[c] = exp(params[c] - mx);
        float g[3] = {(float)(e[0] / s), (float)(e[1] / s), (float)(e[2] / s)};
        for (size_t i = 0; i < (size_t)M * H; i++)
            for (int c = 0; c < 3; c++)
                gates[i * 3 + c] = g[c];
    } else {
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < (size_t)M * H * 3; i++)
            gates[i] = 1.0f / (1.0f + expf(-params[i]));
    }
    return NSA_OK;
}

static nsa_status cpu_gate_backward(nsa_context *ctx, float *dparams, const float *dgates,
                                    const float *gates, int M, int H, nsa_gate kind)
{
    (void)ctx;
    if (kind == NSA_GATE_STATIC) {
        double sum_dg[3] = {0, 0, 0};
        for (size_t i = 0; i < (size_t)M * H; i++)
            for (int c = 0; c < 3; c++)
                sum_dg[c] += dgates[i * 3 + c];
        double g[3] = {gates[0], gates[1], gates[2]};
        double dot = g[0] * sum_dg[0] + g[1] * sum_dg[1] + g[2] * sum_dg[2];
        for (int c = 0; c < 3; c++)
            dparams[c] += (float)(g[c] * (sum_dg[c] - dot));
    } else {
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < (size_t)M * H * 3; i++)
            dparams[i] = dgates[i] * gates[i] * (1.0f - gates[i]);
    }
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// Language model

static nsa_status cpu_embedding_forward(nsa_context *ctx, float *out, const int32_t *tokens,
                                        const float *table, int M, int E)
{
    (void)ctx;
#pragma omp parallel for schedule(static)
    for (int m = 0; m < M; m++)
        memcpy(out + (size_t)m * E, table + (size_t)tokens[m] * E, (size_t)E * sizeof(float));
    return NSA_OK;
}

static nsa_status cpu_embedding_backward(nsa_context *ctx, float *dtable, const int32_t *tokens,
                                         const float *dout, int M, int E)
{
    (void)ctx;
    // Sequential over tokens (repeated tokens add into one row), parallel over channels.
#pragma omp parallel for schedule(static)
    for (int e = 0; e < E; e++)
        for (int m = 0; m < M; m++)
            dtable[(size_t)tokens[m] * E + e] += dout[(size_t)m * E + e];
    return NSA_OK;
}

static nsa_status cpu_cross_entropy(nsa_context *ctx, float *losses, float *dlogits,
                                    const float *logits, const int32_t *tokens,
                                    const float *weights, int B, int T, int V, float scale)
{
    (void)ctx;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            size_t row = (size_t)b * T + t;
            const float *z = logits + row * V;
            float *dz = dlogits ? dlogits + row * V : NULL;
            if (t == T - 1) {
                losses[row] = 0.0f;
                if (dz)
                    memset(dz, 0, (size_t)V * sizeof(float));
                continue;
            }
            int target = tokens[row + 1];
            float w = weights ? weights[row] : 1.0f;
            float mx = z[0];
            for (int i = 1; i < V; i++)
                mx = z[i] > mx ? z[i] : mx;
            double s = 0.0;
            for (int i = 0; i < V; i++)
                s += exp((double)z[i] - mx);
            double lse = mx + log(s);
            losses[row] = w * (float)(lse - z[target]);
            if (dz) {
                float f = scale * w;
                for (int i = 0; i < V; i++)
                    dz[i] = (float)exp((double)z[i] - lse) * f;
                dz[target] -= f;
            }
        }
    }
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// Optimizer

static nsa_status cpu_sum_squares(nsa_context *ctx, const float *x, size_t n, double *result)
{
    // Fixed-order reduction: fixed chunks summed in order, so the result does not depend
    // on the thread count or timing.
    enum { CHUNK = 1 << 14 };
    size_t num_chunks = (n + CHUNK - 1) / CHUNK;
    double *partial = nsa__calloc(num_chunks ? num_chunks : 1, sizeof(double), "sum of squares");
    if (!partial)
        return NSA_ERR_NOMEM;
    (void)ctx;
#pragma omp parallel for schedule(static)
    for (size_t c = 0; c < num_chunks; c++) {
        size_t end = (c + 1) * CHUNK < n ? (c + 1) * CHUNK : n;
        double s = 0.0;
        for (size_t i = c * CHUNK; i < end; i++)
            s += (double)x[i] * x[i];
        partial[c] = s;
    }
    double total = 0.0;
    for (size_t c = 0; c < num_chunks; c++)
        total += partial[c];
    free(partial);
    *result = total;
    return NSA_OK;
}

static nsa_status cpu_adamw(nsa_context *ctx, float *params, const float *grads, float *m, float *v,
                            const uint8_t *decay_mask, size_t n, float lr, float beta1,
                            float beta2, float eps, float weight_decay, float grad_scale, float c1,
                            float c2)
{
    (void)ctx;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        float g = grads[i] * grad_scale;
        m[i] = beta1 * m[i] + (1.0f - beta1) * g;
        v[i] = beta2 * v[i] + (1.0f - beta2) * g * g;
        float mhat = m[i] / c1, vhat = v[i] / c2;
        float p = params[i];
        if (decay_mask[i])
            p -= lr * weight_decay * p;
        params[i] = p - lr * mhat / (sqrtf(vhat) + eps);
    }
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// The table

static void cpu_destroy(nsa_context *ctx)
{
    (void)ctx;
}

static const nsa__backend_ops cpu_ops = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_copy,
    .download = cpu_copy,
    .copy = cpu_copy,
    .zero = cpu_zero,
    .has_nonfinite = cpu_has_nonfinite,
    .linear_forward = cpu_linear_forward,
    .linear_backward = cpu_linear_backward,
    .layernorm_forward = cpu_layernorm_forward,
    .layernorm_backward = cpu_layernorm_backward,
    .gelu_forward = cpu_gelu_forward,
    .gelu_backward = cpu_gelu_backward,
    .add = cpu_add,
    .scale = cpu_scale,
    .dropout = cpu_dropout,
    .rope = cpu_rope,
    .compress_forward = cpu_compress_forward,
    .compress_backward = cpu_compress_backward,
    .compress_gather = cpu_compress_gather,
    .compress_gather_backward = cpu_compress_gather_backward,
    .gate_forward = cpu_gate_forward,
    .gate_backward = cpu_gate_backward,
    .attn_forward = nsa__cpu_attn_forward,
    .attn_backward = nsa__cpu_attn_backward,
    .embedding_forward = cpu_embedding_forward,
    .embedding_backward = cpu_embedding_backward,
    .cross_entropy = cpu_cross_entropy,
    .sum_squares = cpu_sum_squares,
    .adamw = cpu_adamw,
};

nsa_status nsa__cpu_backend_init(nsa_context *ctx, int num_threads)
{
    if (num_threads < 0)
        return nsa__error(NSA_ERR_INVALID, "num_threads = %d: must be >= 0 (0 = default)",
                          num_threads);
    if (num_threads > 0)
        omp_set_num_threads(num_threads);
    // BLAS calls are split over OpenMP threads by the backend itself (gemm above).
    openblas_set_num_threads(1);
    ctx->num_threads = num_threads > 0 ? num_threads : omp_get_max_threads();
    ctx->ops = &cpu_ops;
    ctx->impl = NULL;
    return NSA_OK;
}
