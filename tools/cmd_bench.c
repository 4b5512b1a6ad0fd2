/*
 * cmd_bench.c — `nsa bench`: how fast NSA attention runs on this machine, against the
 * machine's own limits and two dense peers measured in the same run, on the same threads:
 *   - the machine: a large OpenBLAS sgemm split over the threads (its fp32 limit) and
 *     the copy bandwidth;
 *   - per sequence length T: NSA attention forward, and forward + backward (the backend's
 *     ops, as the model calls them, mean compression included); the project's flash-style
 *     dense causal attention (src/cpu/dense.h); a plain BLAS causal attention (full
 *     QK^T, masked softmax, PV per head with sgemm — what a user would write), where its
 *     T x T matrices fit the memory budget;
 *   - the whole model at the default config: training step and forward, tokens/s.
 * Medians of repeated runs; FLOPs counted per path (formulas in BENCHMARKS.md); peak
 * memory: what a call allocates beyond its inputs and outputs (VmHWM after resetting it;
 * the BLAS peer's T x T matrices added). Output: a table, or --json.
 */
#include "cli.h"

#include "backend.h"    // the op table and nsa__attn_dims (internal, from libnsa.a)
#include "cpu/attn.h"   // the NSA kernels' per-phase profile
#include "cpu/dense.h"  // the dense flash attention

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#define NSA_TRY_CLI(expr)                \
    do {                                 \
        nsa_status try_st_ = (expr);     \
        if (try_st_ != NSA_OK)           \
            return try_st_;              \
    } while (0)

// ---------------------------------------------------------------------------------------
// Flags

static const cli_flag bench_flags[] = {
    {"preset", "NAME",
     "attention shape: seed (H=8, G=8, d=32, w=64, b=16, n=8, r=l=4, mean_key) or paper "
     "(d=64, H=16 in kv groups of 4, l=32, r=16, b=64, n=16, w=512, cmp_attn, fixed "
     "blocks); default paper"},
    {"seq-lens", "T,...", "sequence lengths (default 1024,2048,4096,8192,16384,32768,65536)"},
    {"batch", "B", "batch size of the attention runs (default 1)"},
    {"num-heads", "H", "override the preset's query heads"},
    {"num-kv-heads", "G", "override the preset's kv heads"},
    {"head-dim", "d", "override the preset's head dim"},
    {"reps", "N", "timed runs per measurement, median reported (default 5)"},
    {"max-seconds", "S",
     "stop repeating a measurement once its runs took S seconds (default 30; at least one "
     "run)"},
    {"dense-max-t", "T", "largest T for the dense flash attention (default 65536)"},
    {"blas-mem-gb", "GB",
     "memory the plain BLAS attention may use for its T x T matrices (default 6)"},
    {"no-dense", NULL, "skip the dense flash attention"},
    {"no-blas", NULL, "skip the plain BLAS attention"},
    {"no-model", NULL, "skip the whole-model runs"},
    {"no-attention", NULL, "skip the attention runs (machine and model only)"},
    {"model-batch", "B", "batch of the model runs (default 8)"},
    {"model-seq-len", "T", "sequence length of the model runs (default 256)"},
    {"json", NULL, "print one JSON object instead of the table"},
    {NULL, NULL, NULL},
};

static const cli_spec bench_spec = {
    "bench",
    "nsa bench [--preset paper|seed] [--seq-lens 1024,...] [--json] [--device cpu|cuda]\n"
    "          [--threads N] [--reps N] [--no-dense] [--no-blas] [--no-model]",
    "Times NSA attention (forward, forward + backward) against the machine's measured\n"
    "sgemm rate and two dense causal attentions of the same shape (the project's flash\n"
    "kernel and plain BLAS), and the default model's training step and forward. Prints\n"
    "medians: ms, GFLOP/s (FLOPs counted per path), the share of the sgemm rate, peak\n"
    "memory above the inputs, and NSA's speedup over each dense version. With --device\n"
    "cuda the NSA and model runs go to the GPU (the CPU peers are skipped).",
    bench_flags,
    CLI_CONTEXT,
};

// ---------------------------------------------------------------------------------------
// Measuring

typedef struct bench_cfg {
    int reps;
    double max_seconds;
    int json;
} bench_cfg;

typedef struct timing {
    double seconds; // median wall
    int runs;
    double peak_mb; // peak resident memory above what was resident before the run
} timing;

// Current and peak resident set (KiB) from /proc/self/status; -1 if unknown.
static long proc_status_kb(const char *key)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (!f)
        return -1;
    char line[256];
    long v = -1;
    size_t n = strlen(key);
    while (fgets(line, sizeof line, f))
        if (strncmp(line, key, n) == 0) {
            v = atol(line + n);
            break;
        }
    fclose(f);
    return v;
}

// Resets the peak resident set to the current one (Linux >= 4.0).
static void reset_peak(void)
{
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (f) {
        fputs("5", f);
        fclose(f);
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef nsa_status (*bench_fn)(void *arg);

// Runs fn until reps timed runs or max_seconds; a first run under a second is a warm-up.
static nsa_status measure(const bench_cfg *bc, bench_fn fn, void *arg, timing *out)
{
    double times[64];
    int n = 0, reps = bc->reps < 64 ? bc->reps : 64;
    double spent = 0.0, peak = 0.0;
    int warmed = 0;
    while (n < reps) {
        long rss0 = proc_status_kb("VmRSS:");
        reset_peak();
        double t0 = omp_get_wtime();
        nsa_status st = fn(arg);
        double dt = omp_get_wtime() - t0;
        if (st != NSA_OK)
            return st;
        long hwm = proc_status_kb("VmHWM:");
        if (rss0 >= 0 && hwm >= 0 && (hwm - rss0) / 1024.0 > peak)
            peak = (hwm - rss0) / 1024.0;
        if (!warmed && dt < 1.0) { // warm-up: caches, page faults of first use
            warmed = 1;
            continue;
        }
        warmed = 1;
        times[n++] = dt;
        spent += dt;
        if (spent >= bc->max_seconds)
            break;
    }
    qsort(times, (size_t)n, sizeof(double), cmp_double);
    out->seconds = n % 2 ? times[n / 2] : 0.5 * (times[n / 2 - 1] + times[n / 2]);
    out->runs = n;
    out->peak_mb = peak;
    return NSA_OK;
}

static void fill_random(float *x, size_t n, uint64_t seed, float scale)
{
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        uint64_t z = (seed + i) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        x[i] = scale * ((float)(z >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f);
    }
}

static float *alloc_floats(size_t n)
{
    float *p = aligned_alloc(64, ((n ? n : 1) * sizeof(float) + 63) & ~(size_t)63);
    if (p)
        memset(p, 0, n * sizeof(float)); // touched: resident before the timed runs
    return p;
}

// ---------------------------------------------------------------------------------------
// The machine: sgemm rate and copy bandwidth

// C[M,N] = A[M,K] B[K,N] with the rows of C split over the OpenMP threads (OpenBLAS
// itself single-threaded, as the library runs it).
static void par_sgemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int M, int N, int K, float alpha,
                      const float *A, int lda, const float *B, int ldb, float beta, float *C,
                      int ldc)
{
#pragma omp parallel
    {
        int nth = omp_get_num_threads(), id = omp_get_thread_num();
        int lo = (int)((long)M * id / nth), hi = (int)((long)M * (id + 1) / nth);
        if (hi > lo) {
            const float *a = ta == CblasNoTrans ? A + (size_t)lo * lda : A + lo;
            cblas_sgemm(CblasRowMajor, ta, tb, hi - lo, N, K, alpha, a, lda, B, ldb, beta,
                        C + (size_t)lo * ldc, ldc);
        }
    }
}

typedef struct gemm_arg {
    int n;
    float *a, *b, *c;
} gemm_arg;

static nsa_status run_gemm(void *p)
{
    gemm_arg *g = p;
    par_sgemm(CblasNoTrans, CblasNoTrans, g->n, g->n, g->n, 1.0f, g->a, g->n, g->b, g->n, 0.0f,
              g->c, g->n);
    return NSA_OK;
}

// The device's matrix rate (CUDA): y = x W^T through the backend's linear_forward in the
// context's precision (bf16: the operands' conversion included), synchronised by a download.
typedef struct dev_gemm_arg {
    nsa_context *ctx;
    int n;
    float *x, *w, *y;
} dev_gemm_arg;

static nsa_status run_dev_gemm(void *p)
{
    dev_gemm_arg *g = p;
    NSA_TRY_CLI(g->ctx->ops->linear_forward(g->ctx, g->y, g->x, g->w, NULL, g->n, g->n, g->n));
    float sync;
    return g->ctx->ops->download(g->ctx, &sync, g->y, sizeof sync);
}

typedef struct copy_arg {
    size_t n;
    float *src, *dst;
} copy_arg;

static nsa_status run_copy(void *p)
{
    copy_arg *c = p;
#pragma omp parallel
    {
        int nth = omp_get_num_threads(), id = omp_get_thread_num();
        size_t lo = c->n * id / nth, hi = c->n * (id + 1) / nth;
        memcpy(c->dst + lo, c->src + lo, (hi - lo) * sizeof(float));
    }
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// Attention runs

typedef struct attn_bench {
    nsa_context *ctx;
    nsa__attn_dims dm;
    int on_cpu;
    // inputs and outputs (device memory of ctx)
    float *q, *k, *v, *kc, *vc, *gates, *out, *o_paths, *lse, *dout;
    float *dq, *dk, *dv, *dkc, *dvc, *dgates;
    int32_t *idx;
    // dense peers (host)
    float *dlse;
    float *blas_s, *blas_p;
    nsa__attn_profile prof_fwd, prof_bwd;
} attn_bench;

static nsa_status nsa_fwd(void *p)
{
    attn_bench *a = p;
    const nsa__attn_dims *dm = &a->dm;
    const nsa__backend_ops *ops = a->ctx->ops;
    NSA_TRY_CLI(ops->compress_forward(a->ctx, a->kc, a->k, NULL, dm->B, dm->T, dm->G, dm->d,
                                      dm->cmp_len, dm->cmp_stride));
    NSA_TRY_CLI(ops->compress_forward(a->ctx, a->vc, a->v, NULL, dm->B, dm->T, dm->G, dm->d,
                                      dm->cmp_len, dm->cmp_stride));
    if (a->on_cpu)
        return nsa__cpu_attn_forward_ex(a->ctx, dm, a->q, a->k, a->v, a->kc, a->vc, a->gates,
                                        NULL, a->idx, a->out, NULL, NULL, &a->prof_fwd);
    NSA_TRY_CLI(ops->attn_forward(a->ctx, dm, a->q, a->k, a->v, a->kc, a->vc, a->gates, NULL,
                                  a->idx, a->out, NULL, NULL));
    float sync;
    return ops->download(a->ctx, &sync, a->out, sizeof sync);
}

static nsa_status nsa_fwd_bwd(void *p)
{
    attn_bench *a = p;
    const nsa__attn_dims *dm = &a->dm;
    const nsa__backend_ops *ops = a->ctx->ops;
    NSA_TRY_CLI(ops->compress_forward(a->ctx, a->kc, a->k, NULL, dm->B, dm->T, dm->G, dm->d,
                                      dm->cmp_len, dm->cmp_stride));
    NSA_TRY_CLI(ops->compress_forward(a->ctx, a->vc, a->v, NULL, dm->B, dm->T, dm->G, dm->d,
                                      dm->cmp_len, dm->cmp_stride));
    if (a->on_cpu) {
        NSA_TRY_CLI(nsa__cpu_attn_forward_ex(a->ctx, dm, a->q, a->k, a->v, a->kc, a->vc,
                                             a->gates, NULL, a->idx, a->out, a->o_paths, a->lse,
                                             NULL));
        NSA_TRY_CLI(nsa__cpu_attn_backward_ex(a->ctx, dm, a->q, a->k, a->v, a->kc, a->vc,
                                              a->gates, a->idx, a->o_paths, a->lse, a->dout,
                                              a->dq, a->dk, a->dv, a->dkc, a->dvc, a->dgates,
                                              &a->prof_bwd));
    } else {
        NSA_TRY_CLI(ops->attn_forward(a->ctx, dm, a->q, a->k, a->v, a->kc, a->vc, a->gates,
                                      NULL, a->idx, a->out, a->o_paths, a->lse));
        NSA_TRY_CLI(ops->attn_backward(a->ctx, dm, a->q, a->k, a->v, a->kc, a->vc, a->gates,
                                       a->idx, a->o_paths, a->lse, a->dout, a->dq, a->dk, a->dv,
                                       a->dkc, a->dvc, a->dgates));
    }
    NSA_TRY_CLI(ops->compress_backward(a->ctx, a->dk, NULL, a->dkc, a->k, NULL, dm->B, dm->T,
                                       dm->G, dm->d, dm->cmp_len, dm->cmp_stride));
    NSA_TRY_CLI(ops->compress_backward(a->ctx, a->dv, NULL, a->dvc, a->v, NULL, dm->B, dm->T,
                                       dm->G, dm->d, dm->cmp_len, dm->cmp_stride));
    float sync;
    return ops->download(a->ctx, &sync, a->dq, sizeof sync);
}

static nsa_status dense_fwd(void *p)
{
    attn_bench *a = p;
    const nsa__attn_dims *dm = &a->dm;
    return nsa__cpu_dense_attention_forward(dm->B, dm->T, dm->H, dm->G, dm->d, dm->scale, a->q,
                                            a->k, a->v, a->out, a->dlse);
}

static nsa_status dense_fwd_bwd(void *p)
{
    attn_bench *a = p;
    const nsa__attn_dims *dm = &a->dm;
    NSA_TRY_CLI(nsa__cpu_dense_attention_forward(dm->B, dm->T, dm->H, dm->G, dm->d, dm->scale,
                                                 a->q, a->k, a->v, a->out, a->dlse));
    return nsa__cpu_dense_attention_backward(dm->B, dm->T, dm->H, dm->G, dm->d, dm->scale, a->q,
                                             a->k, a->v, a->out, a->dlse, a->dout, a->dq, a->dk,
                                             a->dv);
}

// Plain BLAS causal attention of one (batch, head): S = scale Q K^T (all T x T), causal
// mask and softmax per row, O = P V. With backward: dP = dO V^T, dS = P (dP - rowsum(dO.O)),
// dQ = scale dS K, dK += scale dS^T Q, dV += P^T dO.
static void blas_head(attn_bench *a, int b, int h, int backward)
{
    const nsa__attn_dims *dm = &a->dm;
    const int T = dm->T, H = dm->H, G = dm->G, d = dm->d, g = h / (H / G);
    const int ldq = H * d, ldk = G * d;
    const float *Q = a->q + (size_t)b * T * ldq + (size_t)h * d;
    const float *K = a->k + (size_t)b * T * ldk + (size_t)g * d;
    const float *V = a->v + (size_t)b * T * ldk + (size_t)g * d;
    float *O = a->out + (size_t)b * T * ldq + (size_t)h * d, *S = a->blas_s;
    par_sgemm(CblasNoTrans, CblasTrans, T, T, d, dm->scale, Q, ldq, K, ldk, 0.0f, S, T);
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        float *row = S + (size_t)t * T, mx = -INFINITY, sum = 0.0f;
        for (int s = 0; s <= t; s++)
            mx = row[s] > mx ? row[s] : mx;
        for (int s = 0; s <= t; s++)
            sum += row[s] = expf(row[s] - mx);
        float inv = 1.0f / sum;
        for (int s = 0; s <= t; s++)
            row[s] *= inv;
        for (int s = t + 1; s < T; s++)
            row[s] = 0.0f;
    }
    par_sgemm(CblasNoTrans, CblasNoTrans, T, d, T, 1.0f, S, T, V, ldk, 0.0f, O, ldq);
    if (!backward)
        return;
    const float *dO = a->dout + (size_t)b * T * ldq + (size_t)h * d;
    float *dP = a->blas_p, *dQ = a->dq + (size_t)b * T * ldq + (size_t)h * d;
    float *dK = a->dk + (size_t)b * T * ldk + (size_t)g * d;
    float *dV = a->dv + (size_t)b * T * ldk + (size_t)g * d;
    par_sgemm(CblasNoTrans, CblasTrans, T, T, d, 1.0f, dO, ldq, V, ldk, 0.0f, dP, T);
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        float D = 0.0f;
        for (int c = 0; c < d; c++)
            D += dO[(size_t)t * ldq + c] * O[(size_t)t * ldq + c];
        float *prow = S + (size_t)t * T, *drow = dP + (size_t)t * T;
        for (int s = 0; s < T; s++)
            drow[s] = prow[s] * (drow[s] - D);
    }
    par_sgemm(CblasNoTrans, CblasNoTrans, T, d, T, dm->scale, dP, T, K, ldk, 0.0f, dQ, ldq);
    // dK, dV: the T rows of the kv head, shared by the group's heads (+=)
    par_sgemm(CblasTrans, CblasNoTrans, T, d, T, dm->scale, dP, T, Q, ldq, 1.0f, dK, ldk);
    par_sgemm(CblasTrans, CblasNoTrans, T, d, T, 1.0f, S, T, dO, ldq, 1.0f, dV, ldk);
}

static nsa_status blas_fwd(void *p)
{
    attn_bench *a = p;
    for (int b = 0; b < a->dm.B; b++)
        for (int h = 0; h < a->dm.H; h++)
            blas_head(a, b, h, 0);
    return NSA_OK;
}

static nsa_status blas_fwd_bwd(void *p)
{
    attn_bench *a = p;
    size_t nkv = (size_t)a->dm.B * a->dm.T * a->dm.G * a->dm.d;
    memset(a->dk, 0, nkv * sizeof(float));
    memset(a->dv, 0, nkv * sizeof(float));
    for (int b = 0; b < a->dm.B; b++)
        for (int h = 0; h < a->dm.H; h++)
            blas_head(a, b, h, 1);
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// FLOP counts (BENCHMARKS.md writes them out)

// Forward FLOPs of NSA's three paths: 4 d per (query head, key) of each path (2d for
// q.k, 2d for p v); the selected keys are counted from the selection actually made.
static void nsa_flops(const nsa__attn_dims *dm, const int32_t *idx, double flops[3])
{
    double per_key = 4.0 * dm->d, hpg = dm->H / dm->G;
    double cmp = 0, slc = 0, win = 0;
    for (int t = 0; t < dm->T; t++) {
        int nc = t < dm->cmp_len - 1 ? 0 : (t - dm->cmp_len + 1) / dm->cmp_stride + 1;
        cmp += nc < dm->num_cmp ? nc : dm->num_cmp;
        win += t + 1 < dm->window ? t + 1 : dm->window;
    }
    cmp *= (double)dm->B * dm->H;
    win *= (double)dm->B * dm->H;
    for (int b = 0; b < dm->B; b++)
        for (int t = 0; t < dm->T; t++)
            for (int g = 0; g < dm->G; g++) {
                const int32_t *sel = idx + (((size_t)b * dm->T + t) * dm->G + g) * dm->num_selected;
                for (int i = 0; i < dm->num_selected; i++) {
                    if (sel[i] < 0)
                        continue;
                    long start = (long)sel[i] * dm->block_size, end = start + dm->block_size;
                    if (end > t + 1)
                        end = t + 1;
                    if (end > start)
                        slc += (double)(end - start) * hpg;
                }
            }
    flops[0] = cmp * per_key;
    flops[1] = slc * per_key;
    flops[2] = win * per_key;
}

static double dense_causal_flops(const nsa__attn_dims *dm)
{
    return 4.0 * dm->d * dm->H * dm->B * ((double)dm->T * (dm->T + 1) / 2.0);
}

static double blas_flops(const nsa__attn_dims *dm)
{
    return 4.0 * dm->d * dm->H * dm->B * (double)dm->T * dm->T;
}

// ---------------------------------------------------------------------------------------
// Results

typedef struct result {
    const char *impl; // nsa, dense, blas
    const char *pass; // fwd, fwd+bwd
    int T;
    timing tm;
    double flops; // counted FLOPs of the pass
    double phases[NSA_PHASE_COUNT];
    double phase_flops[NSA_PHASE_COUNT];
    int has_phases;
} result;

typedef struct report {
    result *r;
    int n, cap;
} report;

static result *report_add(report *rep)
{
    if (rep->n == rep->cap) {
        int cap = rep->cap ? 2 * rep->cap : 64;
        result *r = realloc(rep->r, (size_t)cap * sizeof *r);
        if (!r)
            return NULL;
        rep->r = r;
        rep->cap = cap;
    }
    result *r = &rep->r[rep->n++];
    memset(r, 0, sizeof *r);
    return r;
}

static const result *report_find(const report *rep, const char *impl, const char *pass, int T)
{
    for (int i = 0; i < rep->n; i++)
        if (rep->r[i].T == T && strcmp(rep->r[i].impl, impl) == 0 &&
            strcmp(rep->r[i].pass, pass) == 0)
            return &rep->r[i];
    return NULL;
}

// ---------------------------------------------------------------------------------------
// One sequence length

typedef struct shape_opts {
    int B, H, G, d, b, w, r, l, n;
    nsa_select_score score;
    nsa_select_fixed fixed;
    int dense_max_t, no_dense, no_blas;
    double blas_mem_gb;
} shape_opts;

static int attn_alloc(nsa_context *ctx, float **p, size_t n)
{
    void *v = NULL;
    if (ctx->ops->alloc(ctx, &v, (n ? n : 1) * sizeof(float)) != NSA_OK)
        return -1;
    *p = v;
    return 0;
}

static void attn_free_all(attn_bench *a)
{
    nsa_context *ctx = a->ctx;
    float **all[] = {&a->q, &a->k, &a->v, &a->kc, &a->vc, &a->gates, &a->out, &a->o_paths,
                     &a->lse, &a->dout, &a->dq, &a->dk, &a->dv, &a->dkc, &a->dvc, &a->dgates};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (*all[i])
            ctx->ops->free(ctx, *all[i]);
    if (a->idx)
        ctx->ops->free(ctx, a->idx);
    free(a->dlse);
    free(a->blas_s);
    free(a->blas_p);
}

static nsa_status upload_random(nsa_context *ctx, float *dev, size_t n, uint64_t seed, float lo,
                                float hi)
{
    float *h = alloc_floats(n);
    if (!h)
        return NSA_ERR_NOMEM;
    fill_random(h, n, seed, 1.0f);
    for (size_t i = 0; i < n; i++)
        h[i] = lo + (hi - lo) * 0.5f * (h[i] + 1.0f);
    nsa_status st = ctx->ops->upload(ctx, dev, h, n * sizeof(float));
    free(h);
    return st;
}

static int bench_length(nsa_context *ctx, const bench_cfg *bc, const shape_opts *so, int T,
                        report *rep)
{
    attn_bench a;
    memset(&a, 0, sizeof a);
    a.ctx = ctx;
    a.on_cpu = nsa_context_device(ctx) == NSA_DEVICE_CPU;
    nsa_attention_desc desc;
    memset(&desc, 0, sizeof desc);
    desc.batch = so->B;
    desc.seq_len = T;
    desc.num_heads = so->H;
    desc.num_kv_heads = so->G;
    desc.head_dim = so->d;
    desc.block_size = so->b;
    desc.window_size = so->w;
    desc.compression_ratio = so->r;
    desc.compression_block = so->l;
    desc.num_selected_blocks = so->n;
    desc.select_score = so->score;
    desc.select_fixed = so->fixed;
    nsa__attn_dims_init(&a.dm, &desc);
    const nsa__attn_dims *dm = &a.dm;
    size_t nq = (size_t)so->B * T * so->H * so->d, nkv = (size_t)so->B * T * so->G * so->d;
    size_t nkvc = (size_t)so->B * dm->num_cmp * so->G * so->d, ng = (size_t)so->B * T * so->H * 3;
    size_t ni = (size_t)so->B * T * so->G * so->n;
    int rc = 0;
    if (attn_alloc(ctx, &a.q, nq) || attn_alloc(ctx, &a.k, nkv) || attn_alloc(ctx, &a.v, nkv) ||
        attn_alloc(ctx, &a.kc, nkvc) || attn_alloc(ctx, &a.vc, nkvc) ||
        attn_alloc(ctx, &a.gates, ng) || attn_alloc(ctx, &a.out, nq) ||
        attn_alloc(ctx, &a.o_paths, 3 * nq) || attn_alloc(ctx, &a.lse, ng) ||
        attn_alloc(ctx, &a.dout, nq) || attn_alloc(ctx, &a.dq, nq) ||
        attn_alloc(ctx, &a.dk, nkv) || attn_alloc(ctx, &a.dv, nkv) ||
        attn_alloc(ctx, &a.dkc, nkvc) || attn_alloc(ctx, &a.dvc, nkvc) ||
        attn_alloc(ctx, &a.dgates, ng) ||
        attn_alloc(ctx, (float **)&a.idx, ni)) {
        attn_free_all(&a);
        return cli_lib_error(NSA_ERR_NOMEM, 0);
    }
    nsa_status st = upload_random(ctx, a.q, nq, 1, -1.0f, 1.0f);
    if (st == NSA_OK)
        st = upload_random(ctx, a.k, nkv, 2, -1.0f, 1.0f);
    if (st == NSA_OK)
        st = upload_random(ctx, a.v, nkv, 3, -1.0f, 1.0f);
    if (st == NSA_OK)
        st = upload_random(ctx, a.dout, nq, 4, -1.0f, 1.0f);
    if (st == NSA_OK)
        st = upload_random(ctx, a.gates, ng, 5, 0.0f, 1.0f);
    if (st != NSA_OK) {
        attn_free_all(&a);
        return cli_lib_error(st, 0);
    }
    if (!bc->json) {
        fprintf(stderr, "nsa bench: T = %d ...\n", T);
        fflush(stderr);
    }

    // NSA
    timing tf, tb;
    if ((st = measure(bc, nsa_fwd, &a, &tf)) != NSA_OK ||
        (st = measure(bc, nsa_fwd_bwd, &a, &tb)) != NSA_OK) {
        attn_free_all(&a);
        return cli_lib_error(st, 0);
    }
    int32_t *idx = malloc(ni * sizeof(int32_t));
    if (!idx || ctx->ops->download(ctx, idx, a.idx, ni * sizeof(int32_t)) != NSA_OK) {
        free(idx);
        attn_free_all(&a);
        return cli_error(CLI_EXIT_FAILURE, "out of memory or device error reading the selection");
    }
    double pf[3];
    nsa_flops(dm, idx, pf);
    free(idx);
    double nsa_f = pf[0] + pf[1] + pf[2];
    result *r = report_add(rep);
    if (!r)
        goto nomem;
    *r = (result){"nsa", "fwd", T, tf, nsa_f, {0}, {0}, a.on_cpu};
    for (int i = 0; i < NSA_PHASE_COUNT && a.on_cpu; i++)
        r->phases[i] = a.prof_fwd.seconds[i];
    r->phase_flops[NSA_PHASE_CMP] = pf[0];
    r->phase_flops[NSA_PHASE_SLC] = pf[1];
    r->phase_flops[NSA_PHASE_WIN] = pf[2];
    if (!(r = report_add(rep)))
        goto nomem;
    *r = (result){"nsa", "fwd+bwd", T, tb, 3.5 * nsa_f, {0}, {0}, a.on_cpu};
    for (int i = 0; i < NSA_PHASE_COUNT && a.on_cpu; i++)
        r->phases[i] = a.prof_bwd.seconds[i]; // the backward's own phases
    r->phase_flops[NSA_PHASE_CMP] = 2.5 * pf[0];
    r->phase_flops[NSA_PHASE_SLC] = 2.5 * pf[1];
    r->phase_flops[NSA_PHASE_WIN] = 2.5 * pf[2];

    // the dense peers (CPU only)
    if (a.on_cpu && !so->no_dense && T <= so->dense_max_t) {
        a.dlse = malloc((size_t)so->B * T * so->H * sizeof(float));
        if (!a.dlse)
            goto nomem;
        if ((st = measure(bc, dense_fwd, &a, &tf)) != NSA_OK ||
            (st = measure(bc, dense_fwd_bwd, &a, &tb)) != NSA_OK) {
            attn_free_all(&a);
            return cli_lib_error(st, 0);
        }
        double f = dense_causal_flops(dm);
        if (!(r = report_add(rep)))
            goto nomem;
        *r = (result){"dense", "fwd", T, tf, f, {0}, {0}, 0};
        if (!(r = report_add(rep)))
            goto nomem;
        *r = (result){"dense", "fwd+bwd", T, tb, 3.5 * f, {0}, {0}, 0};
    }
    double tt = (double)T * T * sizeof(float) / 1e9;
    if (a.on_cpu && !so->no_blas && tt <= so->blas_mem_gb) {
        a.blas_s = alloc_floats((size_t)T * T);
        if (!a.blas_s)
            goto nomem;
        if ((st = measure(bc, blas_fwd, &a, &tf)) != NSA_OK) {
            attn_free_all(&a);
            return cli_lib_error(st, 0);
        }
        // its T x T matrix is allocated before the timed runs: counted here
        tf.peak_mb += tt * 1e9 / 1048576.0;
        if (!(r = report_add(rep)))
            goto nomem;
        *r = (result){"blas", "fwd", T, tf, blas_flops(dm), {0}, {0}, 0};
        if (2 * tt <= so->blas_mem_gb) {
            a.blas_p = alloc_floats((size_t)T * T);
            if (!a.blas_p)
                goto nomem;
            if ((st = measure(bc, blas_fwd_bwd, &a, &tb)) != NSA_OK) {
                attn_free_all(&a);
                return cli_lib_error(st, 0);
            }
            tb.peak_mb += 2 * tt * 1e9 / 1048576.0;
            if (!(r = report_add(rep)))
                goto nomem;
            *r = (result){"blas", "fwd+bwd", T, tb, 3.5 * blas_flops(dm), {0}, {0}, 0};
        }
    }
    attn_free_all(&a);
    return rc;
nomem:
    attn_free_all(&a);
    return cli_error(CLI_EXIT_FAILURE, "out of memory at T = %d", T);
}

// ---------------------------------------------------------------------------------------
// The model at the default config: training step and forward

typedef struct model_bench {
    nsa_model *model;
    nsa_optimizer *opt;
    int32_t *tokens;
    int B, T;
} model_bench;

static nsa_status model_train_step(void *p)
{
    model_bench *m = p;
    float loss;
    NSA_TRY_CLI(nsa_model_zero_grads(m->model));
    NSA_TRY_CLI(nsa_lm_forward(m->model, m->tokens, m->B, m->T, NSA_FWD_TRAIN, NULL, &loss));
    NSA_TRY_CLI(nsa_lm_backward(m->model, 1.0f));
    return nsa_optimizer_step(m->opt, NULL, NULL);
}

static nsa_status model_forward(void *p)
{
    model_bench *m = p;
    float loss;
    return nsa_lm_forward(m->model, m->tokens, m->B, m->T, 0, NULL, &loss);
}

// FLOPs of one forward of the language model (2 per multiply-add): the linear layers and
// the attention paths (selected keys counted as min(t+1, n*b): an upper bound).
static void model_flops(const nsa_config *cfg, int B, int T, double *linear, double *attn)
{
    double D = cfg->hidden_size, E = cfg->embed_dim, H = cfg->num_heads, d = cfg->head_dim;
    double G = nsa_config_kv_heads(cfg), V = cfg->vocab_size, Hd = H * d;
    int l = nsa_config_compression_block(cfg), r = cfg->compression_ratio;
    int Tc = T >= l ? (T - l) / r + 1 : 0;
    double per_token = 2 * D * (Hd + 2 * G * d) + 2 * Hd * D + 2 * D * 4 * D * 2;
    if (cfg->gate == NSA_GATE_TOKEN)
        per_token += 2 * D * 3 * H;
    double layers = per_token * cfg->num_layers * B * T;
    if (cfg->compress == NSA_COMPRESS_MLP)
        layers += cfg->num_layers * 2.0 * B * Tc * G * (2 * l * d * d + 2 * d * d);
    *linear = layers + (E != D ? 2 * E * D * B * T : 0) + 2 * D * V * B * T;
    double keys = 0;
    for (int t = 0; t < T; t++) {
        int nc = t < l - 1 ? 0 : (t - l + 1) / r + 1;
        keys += nc < Tc ? nc : Tc;
        keys += t + 1 < cfg->window_size ? t + 1 : cfg->window_size;
        long sel = (long)cfg->num_selected_blocks * cfg->block_size;
        keys += t + 1 < sel ? t + 1 : sel;
    }
    *attn = 4.0 * d * H * B * keys * cfg->num_layers;
}

typedef struct model_result {
    int ran, B, T;
    timing train, fwd;
    double linear_flops, attn_flops;
} model_result;

static int bench_model(nsa_context *ctx, const bench_cfg *bc, int B, int T, model_result *mr)
{
    nsa_config cfg;
    nsa_config_default(&cfg);
    cfg.embed_dim = cfg.hidden_size;
    cfg.vocab_size = 256;
    cfg.seq_len = T;
    model_bench m = {0};
    m.B = B;
    m.T = T;
    nsa_optim_config oc;
    nsa_optim_config_default(&oc);
    nsa_status st = nsa_model_create(&m.model, ctx, &cfg);
    if (st == NSA_OK)
        st = nsa_model_init(m.model, 1);
    if (st == NSA_OK)
        st = nsa_optimizer_create(&m.opt, m.model, &oc);
    m.tokens = malloc((size_t)B * T * sizeof(int32_t));
    if (st == NSA_OK && !m.tokens)
        st = NSA_ERR_NOMEM;
    if (st == NSA_OK) {
        for (size_t i = 0; i < (size_t)B * T; i++)
            m.tokens[i] = (int32_t)(((i * 2654435761u) >> 7) % 256);
        if (!bc->json)
            fprintf(stderr, "nsa bench: model ...\n");
        st = measure(bc, model_train_step, &m, &mr->train);
        if (st == NSA_OK)
            st = measure(bc, model_forward, &m, &mr->fwd);
    }
    free(m.tokens);
    nsa_optimizer_free(m.opt);
    nsa_model_free(m.model);
    if (st != NSA_OK)
        return cli_lib_error(st, 0);
    mr->ran = 1;
    mr->B = B;
    mr->T = T;
    model_flops(&cfg, B, T, &mr->linear_flops, &mr->attn_flops);
    return 0;
}

// ---------------------------------------------------------------------------------------
// Output

typedef struct machine {
    double gemm_gflops, copy_gbs;
    int threads, gemm_n;
    char cpu[128], coretype[32], date[32];
    // a device run (CUDA): its GEMM rate is the limit the shares are taken of
    int on_device, bf16, dev_gemm_n;
    double dev_gemm_gflops, cpu_gflops;
} machine;

static void cpu_model(char *buf, size_t size)
{
    snprintf(buf, size, "unknown");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f)
        return;
    char line[256];
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "model name", 10) == 0) {
            char *c = strchr(line, ':');
            if (c) {
                c += 2;
                c[strcspn(c, "\n")] = '\0';
                snprintf(buf, size, "%s", c);
            }
            break;
        }
    fclose(f);
}

static double gflops(double flops, double seconds)
{
    return seconds > 0 ? flops / seconds / 1e9 : 0.0;
}

static void print_table(const machine *mc, const shape_opts *so, const report *rep,
                        const int *lens, int nlens, const model_result *mr)
{
    printf("machine: %s, %d threads, OPENBLAS_CORETYPE=%s\n", mc->cpu, mc->threads,
           mc->coretype);
    printf("sgemm %dx%dx%d over the threads: %.1f GFLOP/s; copy bandwidth %.1f GB/s (read + "
           "write)\n",
           mc->gemm_n, mc->gemm_n, mc->gemm_n, mc->on_device ? mc->cpu_gflops : mc->gemm_gflops, mc->copy_gbs);
    if (mc->on_device)
        printf("device (cuda) GEMM %dx%dx%d, %s: %.1f GFLOP/s — the %%sgemm column below is the "
               "share of this rate\n",
               mc->dev_gemm_n, mc->dev_gemm_n, mc->dev_gemm_n,
               mc->bf16 ? "bf16 operands, fp32 accumulation" : "fp32", mc->dev_gemm_gflops);
    printf("attention: B=%d H=%d G=%d d=%d  w=%d b=%d n=%d r=%d l=%d  %s %s\n\n", so->B, so->H,
           so->G, so->d, so->w, so->b, so->n, so->r, so->l,
           so->score == NSA_SELECT_CMP_ATTN ? "cmp_attn" : "mean_key",
           so->fixed == NSA_SELECT_FIXED_PAPER ? "fixed=paper" : "fixed=none");
    printf("%7s %-6s %-8s %11s %10s %9s %7s %9s %16s\n", "T", "impl", "pass", "ms", "GFLOP",
           "GFLOP/s", "%sgemm", "peak MB", "NSA speedup");
    for (int li = 0; li < nlens; li++) {
        const char *impls[3] = {"nsa", "dense", "blas"}, *passes[2] = {"fwd", "fwd+bwd"};
        for (int ii = 0; ii < 3; ii++)
            for (int pi = 0; pi < 2; pi++) {
                const result *r = report_find(rep, impls[ii], passes[pi], lens[li]);
                if (!r)
                    continue;
                double gf = gflops(r->flops, r->tm.seconds);
                char sp[48] = "";
                const result *n = report_find(rep, "nsa", passes[pi], lens[li]);
                if (ii > 0 && n)
                    snprintf(sp, sizeof sp, "%.2fx (%.0f%%)", r->tm.seconds / n->tm.seconds,
                             100.0 * (r->tm.seconds / n->tm.seconds) / (r->flops / n->flops));
                printf("%7d %-6s %-8s %11.1f %10.2f %9.1f %6.0f%% %9.0f %16s\n", lens[li],
                       impls[ii], passes[pi], 1e3 * r->tm.seconds, r->flops / 1e9, gf,
                       100.0 * gf / mc->gemm_gflops, r->tm.peak_mb, sp);
            }
        for (int pi = 0; pi < 2; pi++) {
            const result *r = report_find(rep, "nsa", passes[pi], lens[li]);
            if (!r || !r->has_phases)
                continue;
            double total = 0;
            for (int p = 0; p < NSA_PHASE_COUNT; p++)
                total += r->phases[p];
            printf("%7s   nsa %s phases (CPU s, GFLOP/s per thread-second x threads, %%sgemm):",
                   "", pi ? "bwd" : "fwd");
            for (int p = 0; p < NSA_PHASE_COUNT; p++) {
                printf(" %s %.3f", nsa__attn_phase_names[p], r->phases[p]);
                if (r->phase_flops[p] > 0 && r->phases[p] > 0) {
                    double rate = gflops(r->phase_flops[p], r->phases[p]) * mc->threads;
                    printf(" (%.0f, %.0f%%)", rate, 100.0 * rate / mc->gemm_gflops);
                }
            }
            printf("  [%.0f%% of CPU in cmp+select vs %.0f%% in slc]\n",
                   total > 0 ? 100 * (r->phases[NSA_PHASE_CMP] + r->phases[NSA_PHASE_SELECT]) / total : 0,
                   total > 0 ? 100 * r->phases[NSA_PHASE_SLC] / total : 0);
        }
    }
    printf("  (speedup: dense time / NSA time, and in brackets that speedup as a share of the "
           "FLOP ratio;\n   fwd+bwd FLOPs = 3.5 x forward; blas computes the full T x T "
           "square)\n");
    if (mr->ran) {
        double train_f = 3.0 * mr->linear_flops + 3.5 * mr->attn_flops;
        double fwd_f = mr->linear_flops + mr->attn_flops;
        double tokens = (double)mr->B * mr->T;
        printf("\nmodel (default config, E=D=256, V=256, B=%d, T=%d):\n", mr->B, mr->T);
        printf("  training step %8.1f ms  %9.0f tokens/s  %6.1f GFLOP/s  %3.0f%% of sgemm  "
               "(%.2f GFLOP/step)\n",
               1e3 * mr->train.seconds, tokens / mr->train.seconds,
               gflops(train_f, mr->train.seconds),
               100.0 * gflops(train_f, mr->train.seconds) / mc->gemm_gflops, train_f / 1e9);
        printf("  forward       %8.1f ms  %9.0f tokens/s  %6.1f GFLOP/s  %3.0f%% of sgemm  "
               "(%.2f GFLOP)\n",
               1e3 * mr->fwd.seconds, tokens / mr->fwd.seconds, gflops(fwd_f, mr->fwd.seconds),
               100.0 * gflops(fwd_f, mr->fwd.seconds) / mc->gemm_gflops, fwd_f / 1e9);
    }
}

static void print_json(const machine *mc, const shape_opts *so, const report *rep,
                       const model_result *mr)
{
    printf("{\"machine\": {\"cpu\": ");
    cli_json_string(stdout, mc->cpu);
    printf(", \"threads\": %d, \"openblas_coretype\": ", mc->threads);
    cli_json_string(stdout, mc->coretype);
    printf(", \"sgemm_n\": %d, \"sgemm_gflops\": %.2f, \"copy_gbs\": %.2f, \"date\": ",
           mc->gemm_n, mc->on_device ? mc->cpu_gflops : mc->gemm_gflops, mc->copy_gbs);
    cli_json_string(stdout, mc->date);
    if (mc->on_device) // the *_share fields below are shares of this rate
        printf(", \"device\": \"cuda\", \"device_precision\": \"%s\", \"device_gemm_n\": %d, "
               "\"device_gemm_gflops\": %.2f",
               mc->bf16 ? "bf16" : "fp32", mc->dev_gemm_n, mc->dev_gemm_gflops);
    printf("},\n \"shape\": {\"B\": %d, \"H\": %d, \"G\": %d, \"d\": %d, \"window\": %d, "
           "\"block_size\": %d, \"num_selected\": %d, \"compression_ratio\": %d, "
           "\"compression_block\": %d, \"select_score\": \"%s\", \"select_fixed\": \"%s\"},\n",
           so->B, so->H, so->G, so->d, so->w, so->b, so->n, so->r, so->l,
           so->score == NSA_SELECT_CMP_ATTN ? "cmp_attn" : "mean_key",
           so->fixed == NSA_SELECT_FIXED_PAPER ? "paper" : "none");
    printf(" \"results\": [");
    for (int i = 0; i < rep->n; i++) {
        const result *r = &rep->r[i];
        double gf = gflops(r->flops, r->tm.seconds);
        const result *n = report_find(rep, "nsa", r->pass, r->T);
        printf("%s\n  {\"impl\": \"%s\", \"pass\": \"%s\", \"T\": %d, \"ms\": %.3f, \"runs\": %d, "
               "\"gflop\": %.4f, \"gflops\": %.2f, \"sgemm_share\": %.4f, \"peak_mb\": %.1f",
               i ? "," : "", r->impl, r->pass, r->T, 1e3 * r->tm.seconds, r->tm.runs,
               r->flops / 1e9, gf, gf / mc->gemm_gflops, r->tm.peak_mb);
        if (n && n != r)
            printf(", \"nsa_speedup\": %.3f, \"flop_ratio\": %.3f",
                   r->tm.seconds / n->tm.seconds, r->flops / n->flops);
        if (r->has_phases) {
            printf(", \"phases_cpu_s\": {");
            for (int p = 0; p < NSA_PHASE_COUNT; p++)
                printf("%s\"%s\": %.4f", p ? ", " : "", nsa__attn_phase_names[p], r->phases[p]);
            printf("}, \"path_gflop\": {\"cmp\": %.4f, \"slc\": %.4f, \"win\": %.4f}",
                   r->phase_flops[NSA_PHASE_CMP] / 1e9, r->phase_flops[NSA_PHASE_SLC] / 1e9,
                   r->phase_flops[NSA_PHASE_WIN] / 1e9);
        }
        printf("}");
    }
    printf("\n ]");
    if (mr->ran) {
        double train_f = 3.0 * mr->linear_flops + 3.5 * mr->attn_flops;
        double fwd_f = mr->linear_flops + mr->attn_flops, tokens = (double)mr->B * mr->T;
        printf(",\n \"model\": {\"batch\": %d, \"seq_len\": %d, \"train_ms\": %.3f, "
               "\"train_tokens_per_s\": %.1f, \"train_gflop\": %.4f, \"train_sgemm_share\": %.4f, "
               "\"forward_ms\": %.3f, \"forward_tokens_per_s\": %.1f, \"forward_gflop\": %.4f, "
               "\"forward_sgemm_share\": %.4f}",
               mr->B, mr->T, 1e3 * mr->train.seconds, tokens / mr->train.seconds, train_f / 1e9,
               gflops(train_f, mr->train.seconds) / mc->gemm_gflops, 1e3 * mr->fwd.seconds,
               tokens / mr->fwd.seconds, fwd_f / 1e9,
               gflops(fwd_f, mr->fwd.seconds) / mc->gemm_gflops);
    }
    printf("\n}\n");
}

// ---------------------------------------------------------------------------------------
// nsa bench

static int parse_lens(const char *s, int *lens, int max, int *n)
{
    *n = 0;
    const char *p = s;
    while (*p) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 1 || v > (1 << 24) || (*end && *end != ','))
            return cli_error(CLI_EXIT_USAGE, "--seq-lens %s: expected positive integers "
                                             "separated by commas", s);
        if (*n == max)
            return cli_error(CLI_EXIT_USAGE, "--seq-lens %s: at most %d lengths", s, max);
        lens[(*n)++] = (int)v;
        p = *end ? end + 1 : end;
    }
    if (*n == 0)
        return cli_error(CLI_EXIT_USAGE, "--seq-lens: no length given");
    return 0;
}

int cmd_bench(int argc, char **argv)
{
    cli_args args;
    int rc;
    if (!cli_parse(&args, &bench_spec, argc, argv, &rc))
        return rc;
    shape_opts so;
    memset(&so, 0, sizeof so);
    const char *preset = cli_get(&args, "preset");
    if (!preset || strcmp(preset, "paper") == 0) {
        so = (shape_opts){1, 16, 4, 64, 64, 512, 16, 32, 16, NSA_SELECT_CMP_ATTN,
                          NSA_SELECT_FIXED_PAPER, 0, 0, 0, 0.0};
    } else if (strcmp(preset, "seed") == 0 || strcmp(preset, "default") == 0) {
        so = (shape_opts){1, 8, 8, 32, 16, 64, 4, 4, 8, NSA_SELECT_MEAN_KEY,
                          NSA_SELECT_FIXED_NONE, 0, 0, 0, 0.0};
    } else {
        return cli_error(CLI_EXIT_USAGE, "--preset %s: unknown preset (paper or seed)", preset);
    }
    long long v, ll;
    double dv;
    bench_cfg bc = {5, 30.0, cli_has(&args, "json")};
    if ((rc = cli_get_int(&args, "batch", 1, 1024, 1, &v)))
        return rc;
    so.B = (int)v;
    int preset_group = so.H / so.G; // query heads per kv head, kept when only H changes
    if ((rc = cli_get_int(&args, "num-heads", 1, 4096, so.H, &v)))
        return rc;
    so.H = (int)v;
    if ((rc = cli_get_int(&args, "num-kv-heads", 1, 4096,
                          so.H % preset_group == 0 ? so.H / preset_group : so.H, &v)))
        return rc;
    so.G = (int)v;
    if (so.H % so.G != 0)
        return cli_error(CLI_EXIT_USAGE, "--num-kv-heads %d: must divide the query heads (%d)",
                         so.G, so.H);
    if ((rc = cli_get_int(&args, "head-dim", 1, 1024, so.d, &v)))
        return rc;
    so.d = (int)v;
    if ((rc = cli_get_int(&args, "reps", 1, 64, 5, &v)))
        return rc;
    bc.reps = (int)v;
    if ((rc = cli_get_double(&args, "max-seconds", 0.0, 1e6, 30.0, &bc.max_seconds)))
        return rc;
    if ((rc = cli_get_int(&args, "dense-max-t", 1, 1 << 24, 65536, &ll)))
        return rc;
    so.dense_max_t = (int)ll;
    if ((rc = cli_get_double(&args, "blas-mem-gb", 0.0, 1e6, 6.0, &dv)))
        return rc;
    so.blas_mem_gb = dv;
    so.no_dense = cli_has(&args, "no-dense");
    so.no_blas = cli_has(&args, "no-blas");
    long long mb, mt;
    if ((rc = cli_get_int(&args, "model-batch", 1, 4096, 8, &mb)) ||
        (rc = cli_get_int(&args, "model-seq-len", 2, 1 << 20, 256, &mt)))
        return rc;
    int lens[32], nlens = 0;
    const char *lens_arg = cli_get(&args, "seq-lens");
    if ((rc = parse_lens(lens_arg ? lens_arg : "1024,2048,4096,8192,16384,32768,65536", lens,
                         32, &nlens)))
        return rc;

    nsa_context *ctx = NULL;
    if ((rc = cli_context(&args, &ctx)))
        return rc;
    machine mc;
    memset(&mc, 0, sizeof mc);
    mc.threads = omp_get_max_threads();
    cpu_model(mc.cpu, sizeof mc.cpu);
    const char *ct = getenv("OPENBLAS_CORETYPE");
    snprintf(mc.coretype, sizeof mc.coretype, "%s", ct ? ct : "(unset)");
    time_t now = time(NULL);
    strftime(mc.date, sizeof mc.date, "%Y-%m-%d %H:%M UTC", gmtime(&now));

    // the machine's limits, measured first
    {
        gemm_arg g = {2048, NULL, NULL, NULL};
        g.a = alloc_floats((size_t)g.n * g.n);
        g.b = alloc_floats((size_t)g.n * g.n);
        g.c = alloc_floats((size_t)g.n * g.n);
        copy_arg c = {(size_t)64 << 20, NULL, NULL};
        c.src = alloc_floats(c.n);
        c.dst = alloc_floats(c.n);
        if (!g.a || !g.b || !g.c || !c.src || !c.dst) {
            free(g.a), free(g.b), free(g.c), free(c.src), free(c.dst);
            nsa_context_free(ctx);
            return cli_error(CLI_EXIT_FAILURE, "out of memory for the machine measurements");
        }
        fill_random(g.a, (size_t)g.n * g.n, 7, 1.0f);
        fill_random(g.b, (size_t)g.n * g.n, 8, 1.0f);
        fill_random(c.src, c.n, 9, 1.0f);
        bench_cfg quick = {bc.reps, 10.0, bc.json};
        timing tg, tc;
        measure(&quick, run_gemm, &g, &tg);
        measure(&quick, run_copy, &c, &tc);
        mc.gemm_n = g.n;
        mc.gemm_gflops = gflops(2.0 * g.n * (double)g.n * g.n, tg.seconds);
        mc.copy_gbs = 2.0 * c.n * sizeof(float) / tc.seconds / 1e9;
        free(g.a), free(g.b), free(g.c), free(c.src), free(c.dst);
    }
    if (nsa_context_device(ctx) != NSA_DEVICE_CPU) {
        dev_gemm_arg dg = {ctx, 8192, NULL, NULL, NULL};
        size_t bytes = (size_t)dg.n * dg.n * sizeof(float);
        nsa_status st = ctx->ops->alloc(ctx, (void **)&dg.x, bytes);
        if (st == NSA_OK)
            st = ctx->ops->alloc(ctx, (void **)&dg.w, bytes);
        if (st == NSA_OK)
            st = ctx->ops->alloc(ctx, (void **)&dg.y, bytes);
        if (st == NSA_OK)
            st = upload_random(ctx, dg.x, (size_t)dg.n * dg.n, 11, -1.0f, 1.0f);
        if (st == NSA_OK)
            st = upload_random(ctx, dg.w, (size_t)dg.n * dg.n, 12, -1.0f, 1.0f);
        timing td;
        bench_cfg quick = {bc.reps, 10.0, bc.json};
        if (st == NSA_OK)
            st = measure(&quick, run_dev_gemm, &dg, &td);
        ctx->ops->free(ctx, dg.x);
        ctx->ops->free(ctx, dg.w);
        ctx->ops->free(ctx, dg.y);
        if (st != NSA_OK) {
            nsa_context_free(ctx);
            return cli_lib_error(st, 0);
        }
        mc.on_device = 1;
        mc.bf16 = nsa_context_precision(ctx) == NSA_PRECISION_BF16;
        mc.dev_gemm_n = dg.n;
        mc.dev_gemm_gflops = gflops(2.0 * dg.n * (double)dg.n * dg.n, td.seconds);
        mc.cpu_gflops = mc.gemm_gflops;
        mc.gemm_gflops = mc.dev_gemm_gflops; // the shares below are of the device's rate
    }

    report rep = {0};
    if (!cli_has(&args, "no-attention"))
        for (int i = 0; i < nlens && rc == 0; i++)
            rc = bench_length(ctx, &bc, &so, lens[i], &rep);
    model_result mr;
    memset(&mr, 0, sizeof mr);
    if (rc == 0 && !cli_has(&args, "no-model"))
        rc = bench_model(ctx, &bc, (int)mb, (int)mt, &mr);
    if (rc == 0) {
        if (bc.json)
            print_json(&mc, &so, &rep, &mr);
        else
            print_table(&mc, &so, &rep, lens, nlens, &mr);
        if (fflush(stdout) != 0 || ferror(stdout))
            rc = cli_error(CLI_EXIT_FAILURE, "error writing to standard output");
    }
    free(rep.r);
    nsa_context_free(ctx);
    return rc;
}
