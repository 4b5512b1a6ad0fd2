/*
 * cuda_backend.cu — the CUDA backend's context and op table: device memory, copies,
 * the dense products through cuBLAS, and nsa__cuda_backend_init / nsa__cuda_available.
 * The other ops live in elementwise.cu (norms, activations, compression, gates, loss,
 * optimizer) and attention.cu (the three attention paths).
 *
 * State lives in the context (ctx->impl): one stream, one cuBLAS handle bound to it, and
 * a scratch buffer. Nothing is global. Every call is checked and failures come back as
 * nsa_status with a message naming the call.
 */
#include "cuda/common.cuh"
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"

#include <stdlib.h>
#include <stdio.h>
#include <string.h>

// ---------------------------------------------------------------------------------------
// Scratch

// Grows *buf (of *have bytes) to at least `bytes`.
static nsa_status grow(nsa_context *ctx, void **buf, size_t *have, size_t bytes, void **out)
{
    if (bytes > *have) {
        if (*buf) {
            // Kernels queued earlier may still read the old buffer: wait for them.
            NSA_CUDA_TRY(cudaStreamSynchronize(nsa__cuda_stream(ctx)));
            NSA_CUDA_TRY(cudaFree(*buf));
            *buf = NULL;
            *have = 0;
        }
        size_t want = bytes + bytes / 4; // some headroom against repeated growth
        cudaError_t err = cudaMalloc(buf, want);
        if (err != cudaSuccess) {
            (void)cudaGetLastError();
            *buf = NULL;
            return nsa__error(NSA_ERR_NOMEM, "cuda: out of device memory for %zu bytes of scratch",
                              want);
        }
        *have = want;
    }
    *out = *buf;
    return NSA_OK;
}

nsa_status nsa__cuda_scratch(nsa_context *ctx, size_t bytes, void **out)
{
    nsa__cuda_state *s = nsa__cuda(ctx);
    return grow(ctx, &s->scratch, &s->scratch_bytes, bytes, out);
}

nsa_status nsa__cuda_operand_scratch(nsa_context *ctx, size_t bytes, void **out)
{
    nsa__cuda_state *s = nsa__cuda(ctx);
    return grow(ctx, &s->operands, &s->operands_bytes, bytes, out);
}

// ---------------------------------------------------------------------------------------
// Memory

static nsa_status cuda_alloc(nsa_context *ctx, void **ptr, size_t bytes)
{
    (void)ctx;
    *ptr = NULL;
    cudaError_t err = cudaMalloc(ptr, bytes ? bytes : 64);
    if (err != cudaSuccess) {
        (void)cudaGetLastError(); // clear the sticky-free error so later calls run
        *ptr = NULL;
        return nsa__error(NSA_ERR_NOMEM, "cuda: out of device memory allocating %zu bytes (%s)",
                          bytes, cudaGetErrorString(err));
    }
    return NSA_OK;
}

static void cuda_free(nsa_context *ctx, void *ptr)
{
    (void)ctx;
    if (ptr)
        (void)cudaFree(ptr); // synchronises the device: no kernel still uses ptr
}

static nsa_status cuda_upload(nsa_context *ctx, void *dst, const void *host_src, size_t bytes)
{
    if (!bytes)
        return NSA_OK;
    cudaStream_t st = nsa__cuda_stream(ctx);
    NSA_CUDA_TRY(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, st));
    // The host buffer may be reused as soon as we return (pageable memory).
    NSA_CUDA_TRY(cudaStreamSynchronize(st));
    return NSA_OK;
}

static nsa_status cuda_download(nsa_context *ctx, void *host_dst, const void *src, size_t bytes)
{
    if (!bytes)
        return NSA_OK;
    cudaStream_t st = nsa__cuda_stream(ctx);
    NSA_CUDA_TRY(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, st));
    NSA_CUDA_TRY(cudaStreamSynchronize(st));
    return NSA_OK;
}

static nsa_status cuda_copy(nsa_context *ctx, void *dst, const void *src, size_t bytes)
{
    if (!bytes || dst == src)
        return NSA_OK;
    NSA_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, nsa__cuda_stream(ctx)));
    return NSA_OK;
}

static nsa_status cuda_zero(nsa_context *ctx, void *dst, size_t bytes)
{
    if (!bytes)
        return NSA_OK;
    NSA_CUDA_TRY(cudaMemsetAsync(dst, 0, bytes, nsa__cuda_stream(ctx)));
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// Dense products. cuBLAS is column-major: a row-major [R,C] matrix is the column-major
// [C,R] one, its transpose. So every row-major product is computed as its transpose with
// the operands swapped: y = x W^T  <=>  y^T = W x^T.

// C [m,n] (col-major, ldc) = A' B' + beta C with A' = op(A), B' = op(B) as cublasSgemm takes
// them; in NSA_PRECISION_BF16 the operands (na and nb elements, dense) are rounded to bf16
// first and multiplied on tensor cores with fp32 accumulation.
static nsa_status gemm(nsa_context *ctx, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                       int k, const float *A, int lda, size_t na, const float *B, int ldb,
                       size_t nb, float beta, float *C, int ldc)
{
    nsa__cuda_state *s = nsa__cuda(ctx);
    float one = 1.0f;
    if (ctx->precision != NSA_PRECISION_BF16) {
        NSA_CUBLAS_TRY(cublasSgemm(s->cublas, ta, tb, m, n, k, &one, A, lda, B, ldb, &beta, C, ldc));
        return NSA_OK;
    }
    size_t na16 = (na + 7) / 8 * 8;
    void *mem;
    NSA_TRY(nsa__cuda_operand_scratch(ctx, (na16 + nb) * sizeof(__nv_bfloat16), &mem));
    __nv_bfloat16 *A16 = (__nv_bfloat16 *)mem, *B16 = A16 + na16;
    NSA_TRY(nsa__cuda_f32_to_bf16(ctx, A16, A, na));
    NSA_TRY(nsa__cuda_f32_to_bf16(ctx, B16, B, nb));
    NSA_CUBLAS_TRY(cublasGemmEx(s->cublas, ta, tb, m, n, k, &one, A16, CUDA_R_16BF, lda, B16,
                                CUDA_R_16BF, ldb, &beta, C, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
                                CUBLAS_GEMM_DEFAULT));
    return NSA_OK;
}

static nsa_status cuda_linear_forward(nsa_context *ctx, float *y, const float *x, const float *W,
                                      const float *bias, int M, int n_in, int n_out)
{
    if (M == 0 || n_out == 0)
        return NSA_OK;
    nsa__cuda_state *s = nsa__cuda(ctx);
    float beta = 0.0f;
    if (bias) {
        NSA_TRY(nsa__cuda_bias_fill(ctx, y, bias, M, n_out));
        beta = 1.0f;
    }
    if (n_in == 0) {
        if (!bias)
            NSA_CUDA_TRY(cudaMemsetAsync(y, 0, (size_t)M * n_out * sizeof(float), s->stream));
        return NSA_OK;
    }
    // y^T [O,M] = W [I,O]^T (col-major view of W [O,I]) * x^T [I,M]
    return gemm(ctx, CUBLAS_OP_T, CUBLAS_OP_N, n_out, M, n_in, W, n_in, (size_t)n_out * n_in, x,
                n_in, (size_t)M * n_in, beta, y, n_out);
}

static nsa_status cuda_linear_backward(nsa_context *ctx, float *dx, float dx_beta, float *dW,
                                       float *dbias, const float *dy, const float *x,
                                       const float *W, int M, int n_in, int n_out)
{
    if (M == 0)
        return NSA_OK;
    nsa__cuda_state *s = nsa__cuda(ctx);
    if (dx && n_in > 0) {
        if (n_out == 0) {
            if (dx_beta == 0.0f)
                NSA_CUDA_TRY(cudaMemsetAsync(dx, 0, (size_t)M * n_in * sizeof(float), s->stream));
            else if (dx_beta != 1.0f)
                NSA_TRY(nsa__cuda_scale(ctx, dx, dx_beta, (size_t)M * n_in));
        } else {
            // dx^T [I,M] = W^T... in col-major: W viewed [I,O], dy^T viewed [O,M]
            NSA_TRY(gemm(ctx, CUBLAS_OP_N, CUBLAS_OP_N, n_in, M, n_out, W, n_in,
                         (size_t)n_out * n_in, dy, n_out, (size_t)M * n_out, dx_beta, dx, n_in));
        }
    }
    if (dW && n_in > 0 && n_out > 0) {
        // dW^T [I,O] += x^T [I,M] * dy [M,O]
        NSA_TRY(gemm(ctx, CUBLAS_OP_N, CUBLAS_OP_T, n_in, n_out, M, x, n_in, (size_t)M * n_in, dy,
                     n_out, (size_t)M * n_out, 1.0f, dW, n_in));
    }
    if (dbias && n_out > 0)
        NSA_TRY(nsa__cuda_bias_grad(ctx, dbias, dy, M, n_out));
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// The table (fields in the order of nsa__backend_ops)

static void cuda_destroy(nsa_context *ctx);

// One kind of nsa__cuda_state::slc_kind, in words.
static const char *slc_kind_name(int kind, int bwd, char *buf, size_t n)
{
    int sub = kind % 16;
    switch (kind - sub) {
    case NSA_SLC_WARP:
        snprintf(buf, n, "warp(slcw=%d)", sub);
        break;
    case NSA_SLC_KC:
        snprintf(buf, n, "%s(%s)", bwd ? "dkv" : "kc",
                 sub == 2   ? "fp32"
                 : sub == 3 ? "bf16,2st"
                 : sub == 4 ? "bf16,fixed"
                 : sub == 5 ? "bf16,chunked"
                            : "bf16");
        break;
    case NSA_SLC_KV:
        snprintf(buf, n, "kv");
        break;
    case NSA_SLC_UNION:
        snprintf(buf, n, "union");
        break;
    default:
        snprintf(buf, n, "-");
    }
    return buf;
}

static const char *cuda_attn_kernels(nsa_context *ctx)
{
    nsa__cuda_state *s = nsa__cuda(ctx);
    char f[32], b[32];
    snprintf(s->kernels_line, sizeof s->kernels_line, "slc_fwd=%s slc_dq=%s",
             slc_kind_name(s->slc_kind[0], 0, f, sizeof f),
             slc_kind_name(s->slc_kind[1], 1, b, sizeof b));
    return s->kernels_line;
}

static const nsa__backend_ops cuda_ops = {
    .name = "cuda",
    .destroy = cuda_destroy,
    .alloc = cuda_alloc,
    .free = cuda_free,
    .upload = cuda_upload,
    .download = cuda_download,
    .copy = cuda_copy,
    .zero = cuda_zero,
    .has_nonfinite = nsa__cuda_has_nonfinite,
    .linear_forward = cuda_linear_forward,
    .linear_backward = cuda_linear_backward,
    .layernorm_forward = nsa__cuda_layernorm_forward,
    .layernorm_backward = nsa__cuda_layernorm_backward,
    .gelu_forward = nsa__cuda_gelu_forward,
    .gelu_backward = nsa__cuda_gelu_backward,
    .add = nsa__cuda_add,
    .scale = nsa__cuda_scale,
    .dropout = nsa__cuda_dropout,
    .rope = nsa__cuda_rope,
    .compress_forward = nsa__cuda_compress_forward,
    .compress_backward = nsa__cuda_compress_backward,
    .compress_gather = nsa__cuda_compress_gather,
    .compress_gather_backward = nsa__cuda_compress_gather_backward,
    .gate_forward = nsa__cuda_gate_forward,
    .gate_backward = nsa__cuda_gate_backward,
    .attn_forward = nsa__cuda_attn_forward,
    .attn_backward = nsa__cuda_attn_backward,
    .attn_forward_bf16 = nsa__cuda_attn_forward_bf16,
    .attn_backward_bf16 = nsa__cuda_attn_backward_bf16,
    .attn_kernels = cuda_attn_kernels,
    .embedding_forward = nsa__cuda_embedding_forward,
    .embedding_backward = nsa__cuda_embedding_backward,
    .cross_entropy = nsa__cuda_cross_entropy,
    .sum_squares = nsa__cuda_sum_squares,
    .adamw = nsa__cuda_adamw,
};

static void cuda_destroy(nsa_context *ctx)
{
    nsa__cuda_state *s = nsa__cuda(ctx);
    if (!s)
        return;
    if (s->stream)
        (void)cudaStreamSynchronize(s->stream);
    if (s->scratch)
        (void)cudaFree(s->scratch);
    if (s->operands)
        (void)cudaFree(s->operands);
    if (s->cublas)
        (void)cublasDestroy(s->cublas);
    if (s->stream)
        (void)cudaStreamDestroy(s->stream);
    if (s->side[0])
        (void)cudaStreamDestroy(s->side[0]);
    if (s->side[1])
        (void)cudaStreamDestroy(s->side[1]);
    for (int i = 0; i < 4; i++)
        if (s->ev[i])
            (void)cudaEventDestroy(s->ev[i]);
    free(s);
    ctx->impl = NULL;
}

// ---------------------------------------------------------------------------------------
// Creation

// 1 when the current device exists and is a Hopper (or newer) GPU: the kernels are built
// for sm_90 / sm_90a only.
extern "C" int nsa__cuda_available(void)
{
    int count = 0, dev = 0, major = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err == cudaSuccess && count > 0)
        err = cudaGetDevice(&dev);
    if (err == cudaSuccess && count > 0)
        err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    if (err != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return count > 0 && major >= 9;
}

// A tuning switch `name=a[,b]`: v[0] = v[1] = a, then v[1] = b, each only where ok(value).
static void env_pair(const char *name, int (&v)[2], bool (*ok)(int))
{
    const char *e = getenv(name);
    int a = 0, b = 0, got = e ? sscanf(e, "%d,%d", &a, &b) : 0;
    if (got >= 1 && ok(a))
        v[0] = v[1] = a;
    if (got == 2 && ok(b))
        v[1] = b;
}

// Which device code the driver loaded for this card: 1 for the sm_90a build (warpgroup MMA,
// NSA_WGMMA), 0 for another (sm_90, or PTX compiled for a later card).
__global__ void wgmma_probe_kernel(int *out)
{
    *out = NSA_WGMMA;
}

static cudaError_t wgmma_probe(cudaStream_t st, int *has)
{
    int *d = NULL;
    cudaError_t e = cudaMalloc(&d, sizeof(int));
    if (e != cudaSuccess)
        return e;
    wgmma_probe_kernel<<<1, 1, 0, st>>>(d);
    e = cudaGetLastError();
    if (e == cudaSuccess)
        e = cudaMemcpyAsync(has, d, sizeof(int), cudaMemcpyDeviceToHost, st);
    if (e == cudaSuccess)
        e = cudaStreamSynchronize(st);
    cudaError_t f = cudaFree(d);
    return e != cudaSuccess ? e : f;
}

extern "C" nsa_status nsa__cuda_backend_init(nsa_context *ctx, int num_threads)
{
    if (num_threads < 0)
        return nsa__error(NSA_ERR_INVALID, "num_threads = %d: must be >= 0 (0 = default)",
                          num_threads);
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
        (void)cudaGetLastError();
        return nsa__error(NSA_ERR_UNSUPPORTED, "device cuda: no usable CUDA device (%s)",
                          err != cudaSuccess ? cudaGetErrorString(err) : "none found");
    }
    nsa__cuda_state *s = (nsa__cuda_state *)nsa__calloc(1, sizeof *s, "cuda backend state");
    if (!s)
        return NSA_ERR_NOMEM;
    ctx->impl = s;
    ctx->ops = &cuda_ops;
    ctx->num_threads = num_threads;
    nsa_status st = NSA_OK;
    cudaDeviceProp prop;
    int dev = 0;
    // The current device of the calling thread (cudaSetDevice before nsa_context_create
    // picks another).
    err = cudaGetDevice(&dev);
    if (err == cudaSuccess)
        err = cudaGetDeviceProperties(&prop, dev);
    if (err != cudaSuccess) {
        st = nsa__cuda_status(err, "cudaGetDeviceProperties", __FILE__, __LINE__);
    } else if (prop.major < 9) {
        st = nsa__error(NSA_ERR_UNSUPPORTED,
                        "device cuda: %s has compute capability %d.%d; this build needs >= 9.0",
                        prop.name, prop.major, prop.minor);
    }
    if (st == NSA_OK) {
        s->device = dev;
        s->num_sms = prop.multiProcessorCount;
        s->max_smem_optin = prop.sharedMemPerBlockOptin;
        err = cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking);
        if (err != cudaSuccess)
            st = nsa__cuda_status(err, "cudaStreamCreate", __FILE__, __LINE__);
        // two more streams and four events: the bf16 attention queues its independent
        // kernels on them so one's last wave overlaps another's first (NSA_CUDA_STREAMS=0:
        // all on the context's stream)
        const char *ss = getenv("NSA_CUDA_STREAMS");
        if (st == NSA_OK && !(ss && strcmp(ss, "0") == 0)) {
            for (int i = 0; i < 2 && err == cudaSuccess; i++)
                err = cudaStreamCreateWithFlags(&s->side[i], cudaStreamNonBlocking);
            for (int i = 0; i < 4 && err == cudaSuccess; i++)
                err = cudaEventCreateWithFlags(&s->ev[i], cudaEventDisableTiming);
            if (err != cudaSuccess)
                st = nsa__cuda_status(err, "cudaStreamCreate / cudaEventCreate", __FILE__,
                                      __LINE__);
        }
    }
    if (st == NSA_OK) {
        cublasStatus_t cs = cublasCreate(&s->cublas);
        if (cs != CUBLAS_STATUS_SUCCESS)
            st = nsa__cublas_status(cs, "cublasCreate", __FILE__, __LINE__);
    }
    if (st == NSA_OK) {
        cublasStatus_t cs = cublasSetStream(s->cublas, s->stream);
        // fp32 products stay fp32: no TF32 tensor-core rounding (the CPU comparison needs
        // ~1e-6 relative error; TF32 gives ~1e-3).
        if (cs == CUBLAS_STATUS_SUCCESS)
            cs = cublasSetMathMode(s->cublas, CUBLAS_DEFAULT_MATH);
        if (cs != CUBLAS_STATUS_SUCCESS)
            st = nsa__cublas_status(cs, "cublasSetStream / cublasSetMathMode", __FILE__, __LINE__);
    }
    if (st == NSA_OK) {
        // A debug switch for the attention kernels: NSA_CUDA_ATTN=simple selects the
        // warp-per-row kernels (read once here, kept in the context).
        const char *mode = getenv("NSA_CUDA_ATTN");
        s->attn_simple = mode && strcmp(mode, "simple") == 0;
        // A tuning switch: NSA_CUDA_BF16_MT=1 runs the bf16 compressed and window forward
        // by the warp kernel (16 rows a warp) instead of the warpgroup kernels.
        const char *mt = getenv("NSA_CUDA_BF16_MT");
        s->bf16_mt = mt && strcmp(mt, "1") == 0 ? 1 : 2;
        // NSA_CUDA_BF16_WG=1..3: the warpgroup kernels with that many warpgroups (64 rows
        // each) a block; NSA_CUDA_DQ_WG=1..3 the dq kernel alone
        s->range_wg = 3;
        s->dq_wg = 3;
        const char *wg = getenv("NSA_CUDA_BF16_WG"), *dqwg = getenv("NSA_CUDA_DQ_WG");
        if (wg && wg[0] >= '1' && wg[0] <= '3' && !wg[1])
            s->range_wg = s->dq_wg = wg[0] - '0';
        if (dqwg && dqwg[0] >= '1' && dqwg[0] <= '3' && !dqwg[1])
            s->dq_wg = dqwg[0] - '0';
        const char *slc = getenv("NSA_CUDA_BF16_SLC");
        s->bf16_slc_union = slc && strcmp(slc, "union") == 0;
        // NSA_CUDA_SLCW=fwd[,dq]: the chunking of the warp-per-position selected kernels
        // (defaults: 16-key chunks, 4 warps a block forward; 32-key chunks, 2 warps for dq)
        s->bf16_slcw[0] = 2;
        s->bf16_slcw[1] = 0;
        env_pair("NSA_CUDA_SLCW", s->bf16_slcw,
                 [](int v) { return v >= 0 && v < SLCW_NCONFIGS; });
        // NSA_CUDA_RANGE_KC=cmp[,win]: keys a chunk (64 or 128) of the compressed and window
        // forward warpgroup kernels
        s->range_kc[0] = s->range_kc[1] = 64;
        env_pair("NSA_CUDA_RANGE_KC", s->range_kc, [](int v) { return v == 64 || v == 128; });
        // the TMA tensor-map encoder of the driver (no link to libcuda; absent: cp.async)
        void *enc = NULL;
        cudaDriverEntryPointQueryResult q;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &enc, 12000,
                                             cudaEnableDefault, &q) != cudaSuccess ||
            q != cudaDriverEntryPointSuccess)
            enc = NULL;
        (void)cudaGetLastError();
        s->tma_encode = enc;
        const char *tma = getenv("NSA_CUDA_TMA");
        s->use_tma = enc && !(tma && strcmp(tma, "0") == 0);
        const char *fq = getenv("NSA_CUDA_DQ_FUSED");
        s->dq_fused = fq && (strcmp(fq, "1") == 0 || strcmp(fq, "2") == 0) ? fq[0] - '0' : 0;
        const char *kc = getenv("NSA_CUDA_SLC_KC");
        s->slc_kc = kc && kc[0] >= '1' && kc[0] <= '5' && kc[1] == 0 ? kc[0] - '0'
                    : kc && strcmp(kc, "auto") == 0                  ? 6
                                                                     : 0;
        const char *ch = getenv("NSA_CUDA_KC_CHUNK");
        long chunk = ch ? strtol(ch, NULL, 10) : 64;
        s->kc_chunk = chunk >= 16 && chunk <= 4096 && chunk % 16 == 0 ? (int)chunk : 64;
        if (s->dq_fused || s->slc_kc) { // (their kernels exist in the sm_90a code only)
            err = wgmma_probe(s->stream, &s->sm90a);
            if (err != cudaSuccess)
                st = nsa__cuda_status(err, "the wgmma probe kernel", __FILE__, __LINE__);
        }
        const char *share = getenv("NSA_CUDA_SLC_SHARE");
        s->bf16_slc_share = !(share && strcmp(share, "0") == 0);
    }
    if (st != NSA_OK) {
        cuda_destroy(ctx);
        ctx->ops = NULL;
        return st;
    }
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// TMA tensor maps (tma.cuh)

typedef CUresult (*nsa__encode_fn)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *,
                                   const cuuint64_t *, const cuuint64_t *, const cuuint32_t *,
                                   const cuuint32_t *, CUtensorMapInterleave, CUtensorMapSwizzle,
                                   CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// A bf16 tensor map of `rank` dims (bytes strides of dims 1 .. rank - 1), sw128 boxes.
static nsa_status encode_bf16(nsa_context *ctx, CUtensorMap *map, const void *X, int rank,
                              const cuuint64_t *dims, const cuuint64_t *strides,
                              const cuuint32_t *box)
{
    nsa__encode_fn encode = (nsa__encode_fn)nsa__cuda(ctx)->tma_encode;
    if (!encode)
        return nsa__error(NSA_ERR_UNSUPPORTED, "cuda: the driver has no TMA tensor-map encoder");
    cuuint32_t estr[5] = {1, 1, 1, 1, 1};
    CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, (cuuint32_t)rank, (void *)X, dims,
                        strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                        CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) {
        char shape[128] = "";
        size_t used = 0;
        for (int i = rank - 1; i >= 0 && used < sizeof shape; i--) {
            int n = snprintf(shape + used, sizeof shape - used, "%s%llu", i < rank - 1 ? ", " : "",
                             (unsigned long long)dims[i]);
            used += n > 0 ? (size_t)n : 0;
        }
        return nsa__error(NSA_ERR_BACKEND,
                          "cuda: cuTensorMapEncodeTiled failed (%d) for a [%s] bf16 tensor", (int)r,
                          shape);
    }
    return NSA_OK;
}

nsa_status nsa__cuda_tensor_map(nsa_context *ctx, CUtensorMap *map, const void *X, int B, int Tk,
                                int G, int d, int rows)
{
    cuuint64_t dims[4] = {(cuuint64_t)d, (cuuint64_t)G, (cuuint64_t)Tk, (cuuint64_t)B};
    cuuint64_t strides[3] = {(cuuint64_t)d * 2, (cuuint64_t)G * d * 2,
                             (cuuint64_t)Tk * G * d * 2}; // bytes, dims 1 .. 3
    cuuint32_t box[4] = {64, 1, (cuuint32_t)rows, 1};
    return encode_bf16(ctx, map, X, 4, dims, strides, box);
}

nsa_status nsa__cuda_tensor_map_rows(nsa_context *ctx, CUtensorMap *map, const void *X, int B,
                                     int T, int G, int hpg, int d, int npos)
{
    cuuint64_t dims[5] = {(cuuint64_t)d, (cuuint64_t)hpg, (cuuint64_t)G, (cuuint64_t)T,
                          (cuuint64_t)B};
    cuuint64_t row = (cuuint64_t)d * 2;
    cuuint64_t strides[4] = {row, row * hpg, row * hpg * G, row * hpg * G * T};
    cuuint32_t box[5] = {64, (cuuint32_t)hpg, 1, (cuuint32_t)npos, 1};
    return encode_bf16(ctx, map, X, 5, dims, strides, box);
}
