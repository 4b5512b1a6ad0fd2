/*
 * bench_attn_cuda.c — times the CUDA backend's NSA attention (forward and backward) at the
 * paper's shape on device buffers, through the backend op table (the public
 * nsa_attention_* functions copy host arrays and would time PCIe).
 *
 *   bench_attn_cuda [--seq-lens 8192,16384,...] [--reps N] [--warmup N] [--batch B]
 *                   [--heads H] [--kv-heads G] [--head-dim d] [--dtype bf16|fp32|both]
 *
 * --dtype bf16 (default): q, k, v, kc, vc in bf16 through attn_forward_bf16 /
 * attn_backward_bf16 (tensor cores, fp32 accumulation; outputs and gradients fp32);
 * fp32: the fp32 kernels (CUDA cores).
 *
 * Shape (paper): H = 64, G = 4, d = 128, l = 32, r = 16, b = 64, n = 16, w = 512, B = 1,
 * cmp_attn scores, block 0 and the two most recent blocks fixed. Each measurement: warm-up
 * runs, then `reps` runs each preceded by an L2 flush (a 256 MiB memset), timed with CUDA
 * events; the median is reported. Forward = attn_forward saving paths and lse (training);
 * inference = attn_forward without; backward = attn_backward.
 *
 * FLOPs counted: 4 d per (query head, key) pair the three paths attend (QK^T and PV; the
 * backward counts 2.5x the forward, as FlashAttention's papers do). Prints one line per
 * length: "nsa T=... fwd_ms=... fwd_infer_ms=... bwd_ms=... fwd_tflops=... bwd_tflops=...",
 * with bf16 also the selected path's kernels of the last runs ("slc_fwd=... slc_dq=...").
 */
#include "backend.h"
#include "nsa.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CK(expr)                                                                          \
    do {                                                                                  \
        nsa_status st_ = (expr);                                                          \
        if (st_ != NSA_OK) {                                                              \
            fprintf(stderr, "bench: %s failed: %s\n", #expr, nsa_last_error());           \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)

#define CU(expr)                                                                          \
    do {                                                                                  \
        cudaError_t e_ = (expr);                                                          \
        if (e_ != cudaSuccess) {                                                          \
            fprintf(stderr, "bench: %s failed: %s\n", #expr, cudaGetErrorString(e_));     \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)

static nsa_context *ctx;
static void *flush_buf;
static const size_t flush_bytes = (size_t)256 << 20;

static void *dalloc(size_t bytes)
{
    void *p = NULL;
    CK(ctx->ops->alloc(ctx, &p, bytes));
    return p;
}

// Fills n floats in [lo, hi) from a host pattern uploaded in pieces.
static void dfill(float *d, size_t n, float lo, float hi, unsigned seed)
{
    enum { PIECE = 1 << 22 };
    float *h = malloc((PIECE + 8) * sizeof(float));
    unsigned x = seed * 2654435761u + 1;
    for (size_t i = 0; i < PIECE + 8; i++) {
        x = x * 1664525u + 1013904223u;
        h[i] = lo + (hi - lo) * (float)(x >> 8) / 16777216.0f;
    }
    for (size_t off = 0; off < n; off += PIECE) {
        size_t m = n - off < PIECE ? n - off : PIECE;
        CK(ctx->ops->upload(ctx, d + off, h + (off / PIECE) % 7, m * sizeof(float)));
    }
    free(h);
}

static uint16_t f2bf(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

// d16[n] = bf16 of the fp32 device array d[n] (through the host, in pieces).
static void to_bf16(uint16_t *d16, const float *d, size_t n)
{
    enum { PIECE = 1 << 22 };
    float *h = malloc(PIECE * sizeof(float));
    uint16_t *h16 = malloc(PIECE * sizeof(uint16_t));
    for (size_t off = 0; off < n; off += PIECE) {
        size_t m = n - off < PIECE ? n - off : PIECE;
        CK(ctx->ops->download(ctx, h, d + off, m * sizeof(float)));
        for (size_t i = 0; i < m; i++)
            h16[i] = f2bf(h[i]);
        CK(ctx->ops->upload(ctx, d16 + off, h16, m * sizeof(uint16_t)));
    }
    free(h);
    free(h16);
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

typedef struct bufs {
    nsa__attn_dims dm;
    int bf16;
    float *q, *k, *v, *kc, *vc, *gates, *out, *o_paths, *lse, *dout;
    uint16_t *q16, *k16, *v16, *kc16, *vc16;
    float *dq, *dk, *dv, *dkc, *dvc, *dgates;
    int32_t *idx;
} bufs;

enum { RUN_FWD, RUN_FWD_INFER, RUN_BWD };

static void run_once(bufs *b, int what)
{
    const nsa__backend_ops *ops = ctx->ops;
    if (b->bf16) {
        if (what == RUN_FWD)
            CK(ops->attn_forward_bf16(ctx, &b->dm, b->q16, b->k16, b->v16, b->kc16, b->vc16,
                                      b->gates, NULL, b->idx, b->out, b->o_paths, b->lse));
        else if (what == RUN_FWD_INFER)
            CK(ops->attn_forward_bf16(ctx, &b->dm, b->q16, b->k16, b->v16, b->kc16, b->vc16,
                                      b->gates, NULL, b->idx, b->out, NULL, NULL));
        else if (ops->attn_backward_bf16)
            CK(ops->attn_backward_bf16(ctx, &b->dm, b->q16, b->k16, b->v16, b->kc16, b->vc16,
                                       b->gates, b->idx, b->o_paths, b->lse, b->dout, b->dq,
                                       b->dk, b->dv, b->dkc, b->dvc, b->dgates));
        return;
    }
    if (what == RUN_FWD)
        CK(ops->attn_forward(ctx, &b->dm, b->q, b->k, b->v, b->kc, b->vc, b->gates, NULL, b->idx,
                             b->out, b->o_paths, b->lse));
    else if (what == RUN_FWD_INFER)
        CK(ops->attn_forward(ctx, &b->dm, b->q, b->k, b->v, b->kc, b->vc, b->gates, NULL, b->idx,
                             b->out, NULL, NULL));
    else
        CK(ops->attn_backward(ctx, &b->dm, b->q, b->k, b->v, b->kc, b->vc, b->gates, b->idx,
                              b->o_paths, b->lse, b->dout, b->dq, b->dk, b->dv, b->dkc, b->dvc,
                              b->dgates));
}

// Median milliseconds of `reps` timed runs after `warmup` untimed ones. The backend runs
// on its own stream; events on the legacy stream would not see it, so each run is
// bracketed by device synchronisation and timed with events recorded around it on
// stream 0 after a sync (the op's kernels are the only work on the device).
static float time_op(bufs *b, int what, int warmup, int reps)
{
    for (int i = 0; i < warmup; i++)
        run_once(b, what);
    CU(cudaDeviceSynchronize());
    float *ms = malloc(sizeof(float) * reps);
    cudaEvent_t e0, e1;
    CU(cudaEventCreate(&e0));
    CU(cudaEventCreate(&e1));
    for (int i = 0; i < reps; i++) {
        CU(cudaMemset(flush_buf, i & 0xff, flush_bytes));
        CU(cudaDeviceSynchronize());
        CU(cudaEventRecord(e0, 0));
        run_once(b, what);
        CU(cudaDeviceSynchronize());
        CU(cudaEventRecord(e1, 0));
        CU(cudaEventSynchronize(e1));
        CU(cudaEventElapsedTime(&ms[i], e0, e1));
    }
    qsort(ms, reps, sizeof(float), cmp_float);
    float med = ms[reps / 2];
    CU(cudaEventDestroy(e0));
    CU(cudaEventDestroy(e1));
    free(ms);
    return med;
}

// Attended (query head, key) pairs summed over positions.
static double attended_pairs(const nsa__attn_dims *dm)
{
    double pairs = 0.0;
    for (int t = 0; t < dm->T; t++) {
        int nc = t < dm->cmp_len - 1 ? 0 : (t - dm->cmp_len + 1) / dm->cmp_stride + 1;
        if (nc > dm->num_cmp)
            nc = dm->num_cmp;
        long sel = (long)dm->num_selected * dm->block_size;
        if (sel > t + 1)
            sel = t + 1;
        int win = dm->window < t + 1 ? dm->window : t + 1;
        pairs += (double)nc + (double)sel + (double)win;
    }
    return pairs * dm->H * dm->B;
}

// Times forward, inference forward and backward at length T (bf16 or fp32 operands).
static void bench_length(int T, int B, int H, int G, int d, int use16, int reps, int warmup)
{
    nsa_attention_desc desc;
    memset(&desc, 0, sizeof desc);
    desc.batch = B;
    desc.seq_len = T;
    desc.num_heads = H;
    desc.num_kv_heads = G;
    desc.head_dim = d;
    desc.block_size = 64;
    desc.window_size = 512;
    desc.compression_ratio = 16;
    desc.compression_block = 32;
    desc.num_selected_blocks = 16;
    desc.select_score = NSA_SELECT_CMP_ATTN;
    desc.select_fixed = NSA_SELECT_FIXED_PAPER;
    bufs b;
    memset(&b, 0, sizeof b);
    b.bf16 = use16;
    nsa__attn_dims_init(&b.dm, &desc);
    size_t nq = (size_t)B * T * H * d, nkv = (size_t)B * T * G * d;
    size_t nkvc = (size_t)B * b.dm.num_cmp * G * d, ng = (size_t)B * T * H * 3;
    size_t nidx = (size_t)B * T * G * 16;
    b.q = dalloc(nq * 4);
    b.k = dalloc(nkv * 4);
    b.v = dalloc(nkv * 4);
    b.kc = dalloc(nkvc * 4 + 4);
    b.vc = dalloc(nkvc * 4 + 4);
    dfill(b.q, nq, -1.0f, 1.0f, 1);
    dfill(b.k, nkv, -1.0f, 1.0f, 2);
    dfill(b.v, nkv, -1.0f, 1.0f, 3);
    CK(ctx->ops->compress_forward(ctx, b.kc, b.k, NULL, B, T, G, d, 32, 16));
    CK(ctx->ops->compress_forward(ctx, b.vc, b.v, NULL, B, T, G, d, 32, 16));
    if (use16) { // bf16 operands; the fp32 ones are freed before timing
        b.q16 = dalloc(nq * 2 + 16);
        b.k16 = dalloc(nkv * 2 + 16);
        b.v16 = dalloc(nkv * 2 + 16);
        b.kc16 = dalloc(nkvc * 2 + 16);
        b.vc16 = dalloc(nkvc * 2 + 16);
        to_bf16(b.q16, b.q, nq);
        to_bf16(b.k16, b.k, nkv);
        to_bf16(b.v16, b.v, nkv);
        to_bf16(b.kc16, b.kc, nkvc);
        to_bf16(b.vc16, b.vc, nkvc);
        float *f32[] = {b.q, b.k, b.v, b.kc, b.vc};
        for (size_t i = 0; i < 5; i++)
            ctx->ops->free(ctx, f32[i]);
        b.q = b.k = b.v = b.kc = b.vc = NULL;
    }
    b.gates = dalloc(ng * 4);
    b.out = dalloc(nq * 4);
    b.o_paths = dalloc(3 * nq * 4);
    b.lse = dalloc(ng * 4);
    b.dout = dalloc(nq * 4);
    b.dq = dalloc(nq * 4);
    b.dk = dalloc(nkv * 4);
    b.dv = dalloc(nkv * 4);
    b.dkc = dalloc(nkvc * 4 + 4);
    b.dvc = dalloc(nkvc * 4 + 4);
    b.dgates = dalloc(ng * 4);
    b.idx = dalloc(nidx * 4);
    dfill(b.gates, ng, 0.0f, 1.0f, 4);
    dfill(b.dout, nq, -1.0f, 1.0f, 5);
    int r = T >= 65536 ? (reps < 3 ? reps : 3) : reps;
    float fwd = time_op(&b, RUN_FWD, warmup, r);
    float inf = time_op(&b, RUN_FWD_INFER, warmup, r);
    float bwd = use16 && !ctx->ops->attn_backward_bf16 ? NAN : time_op(&b, RUN_BWD, warmup, r);
    double flops = 4.0 * d * attended_pairs(&b.dm);
    printf("nsa dtype=%s T=%d B=%d H=%d G=%d d=%d fwd_ms=%.3f fwd_infer_ms=%.3f bwd_ms=%.3f "
           "fwd_tflops=%.2f bwd_tflops=%.2f %s\n",
           use16 ? "bf16" : "fp32", T, B, H, G, d, fwd, inf, bwd, flops / (fwd * 1e-3) / 1e12,
           2.5 * flops / (bwd * 1e-3) / 1e12,
           use16 && ctx->ops->attn_kernels ? ctx->ops->attn_kernels(ctx) : "");
    fflush(stdout);
    void *all[] = {b.q, b.k, b.v, b.kc, b.vc, b.q16, b.k16, b.v16, b.kc16, b.vc16, b.gates,
                   b.out, b.o_paths, b.lse, b.dout, b.dq, b.dk, b.dv, b.dkc, b.dvc, b.dgates,
                   b.idx};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (all[i])
            ctx->ops->free(ctx, all[i]);
}

int main(int argc, char **argv)
{
    const char *lens = "8192,16384,32768,65536";
    int reps = 5, warmup = 1, B = 1, H = 64, G = 4, d = 128;
    const char *dtype = "bf16";
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--seq-lens") == 0)
            lens = argv[i + 1];
        else if (strcmp(argv[i], "--reps") == 0)
            reps = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--warmup") == 0)
            warmup = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--batch") == 0)
            B = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--heads") == 0)
            H = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--kv-heads") == 0)
            G = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--head-dim") == 0)
            d = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--dtype") == 0)
            dtype = argv[i + 1];
        else {
            fprintf(stderr, "bench: unknown flag %s\n", argv[i]);
            return 2;
        }
    }
    if (reps < 1)
        reps = 1;
    if (warmup < 0 || B < 1 || H < 1 || G < 1 || H % G != 0 || d < 1) {
        fprintf(stderr, "bench: --batch, --heads, --kv-heads, --head-dim must be positive and "
                        "--heads a multiple of --kv-heads (got %d, %d, %d, %d; --warmup %d)\n",
                B, H, G, d, warmup);
        return 2;
    }
    if (strcmp(dtype, "bf16") != 0 && strcmp(dtype, "fp32") != 0 && strcmp(dtype, "both") != 0) {
        fprintf(stderr, "bench: --dtype %s: expected bf16, fp32 or both\n", dtype);
        return 2;
    }
    for (const char *c = lens; *c; c++)
        if ((*c < '0' || *c > '9') && *c != ',') {
            fprintf(stderr, "bench: --seq-lens %s: expected positive lengths separated by commas\n",
                    lens);
            return 2;
        }
    if (!nsa_device_available(NSA_DEVICE_CUDA)) {
        printf("skip: no CUDA device\n");
        return 0;
    }
    CK(nsa_context_create(&ctx, NSA_DEVICE_CUDA, 0));
    CU(cudaMalloc(&flush_buf, flush_bytes));
    int first = strcmp(dtype, "fp32") == 0 ? 0 : 1, last = strcmp(dtype, "bf16") == 0 ? 1 : 0;
    if (strcmp(dtype, "both") == 0)
        first = 1, last = 0;
    char *list = strdup(lens);
    for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ","))
        for (int use16 = first;; use16 = !use16) {
            if (atoi(tok) < 1) {
                fprintf(stderr, "bench: --seq-lens: length %s: must be positive\n", tok);
                break;
            }
            bench_length(atoi(tok), B, H, G, d, use16, reps, warmup);
            if (use16 == last)
                break;
        }
    free(list);
    CU(cudaFree(flush_buf));
    nsa_context_free(ctx);
    return 0;
}
