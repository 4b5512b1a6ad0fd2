/*
 * common.cuh — what every file of the CUDA backend shares: the backend's state (stream,
 * cuBLAS handle, a growing scratch buffer), error checks that turn CUDA and cuBLAS
 * failures into nsa_status codes with a message, and the launch helpers.
 *
 * Every op of src/cuda/ enqueues its kernels on the context's stream and returns; only
 * upload (the caller may reuse its host buffer at once) and the ops that hand a value to
 * the host (download, sum_squares, has_nonfinite) wait for the stream.
 */
#ifndef NSA_CUDA_COMMON_CUH
#define NSA_CUDA_COMMON_CUH

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

extern "C" {
#include "backend.h"
#include "internal.h"
}

#define SLCW_NCONFIGS 3 // chunkings of the warp-per-position selected kernels (SLCW_CONFIGS)

// The backend's state, in ctx->impl.
typedef struct nsa__cuda_state {
    int device;
    cudaStream_t stream;
    cublasHandle_t cublas;
    int num_sms;
    size_t max_smem_optin; // bytes of shared memory a block may opt into
    void *scratch;         // device scratch for ops that need temporary memory
    size_t scratch_bytes;
    void *operands; // bf16 copies of fp32 operands (NSA_PRECISION_BF16), a second scratch
    size_t operands_bytes;
    int attn_simple; // 1: the warp-per-row attention kernels (any head_dim; slower)
    int bf16_mt;     // bf16 compressed and window forward: 2 the warpgroup kernels, 1 the warp
                     // kernel, 16 rows a warp (NSA_CUDA_BF16_MT)
    int range_wg;    // warpgroups a block (1 .. 3) of the bf16 compressed and window forward
    int dq_wg;       // and of their dq (NSA_CUDA_BF16_WG sets both, NSA_CUDA_DQ_WG the second;
                     // dk/dv: two for window and compressed, one for selected)
    int bf16_slc_union; // 1: the selected path always by union tiles (NSA_CUDA_BF16_SLC=union)
    int bf16_slcw[2];   // chunking of the warp-per-position selected kernels, forward [0] and
                        // dq [1] (NSA_CUDA_SLCW=fwd[,dq]: ids of SLCW_CONFIGS,
                        // attention_bf16.cuh)
    int range_kc[2];    // keys a chunk of the bf16 compressed [0] and window [1] forward
                        // warpgroup kernels, 64 or 128 (NSA_CUDA_RANGE_KC=cmp[,win])
    void *tma_encode;   // the driver's cuTensorMapEncodeTiled, NULL without one
    int use_tma;        // 1: the warpgroup kernels load key tiles by TMA (tma.cuh) when the
                        // encoder exists (NSA_CUDA_TMA=0: by cp.async)
    int bf16_slc_share; // 1: those kernels load the blocks every position of a thread block
                        // holds once for the block (NSA_CUDA_SLC_SHARE=0 turns it off)
    int sm90a;    // the driver loaded the sm_90a kernels (warpgroup MMA; a probe kernel)
    int dq_fused; // NSA_CUDA_DQ_FUSED=1: the bf16 selected dk/dv kernel also writes dq
                  // partials (bf16) where it can, 2: fp32 partials; 0 (default): the
                  // query-centric dq kernel. Not yet run on a GPU: off until measured.
    int slc_kc;   // NSA_CUDA_SLC_KC=1: the bf16 selected forward for H/G a multiple of 16 with
                  // key blocks outside (attention_bf16_slc_kc.cu), bf16 partials; 2: fp32; 3:
                  // bf16, two row stages and three blocks a SM; 4: bf16, the paper's fixed
                  // blocks by the warp kernel; 5: as 3 over chunks of kc_chunk positions,
                  // each position merged by the block that completes it; 6 (`auto`): 5
                  // where K and V fit in L2 with room, else 4 (slc_kc_mode); 0 (default): a
                  // warp a position. Not yet run on a GPU: off until measured.
    int kc_chunk; // positions a chunk of NSA_CUDA_SLC_KC=5 (NSA_CUDA_KC_CHUNK, a multiple
                  // of 16 from 16 to 4096; default 64)
    // the selected path's kernels of the last bf16 attention forward [0] and backward's dq
    // [1] (NSA_SLC_*; attn_kernels names them)
    int slc_kind[2];
    char kernels_line[96];
    cudaStream_t side[2]; // streams beside `stream` for independent kernels of one op, and
    cudaEvent_t ev[4];    // events to fork and join them (NULL with NSA_CUDA_STREAMS=0)
} nsa__cuda_state;

// The selected path's kernels (nsa__cuda_state::slc_kind): none run yet, a warp a position
// (+ the SLCW id), key blocks outside for H/G a multiple of 16 (+ the NSA_CUDA_SLC_KC mode;
// the backward: dq partials of the dk/dv kernel, + NSA_CUDA_DQ_FUSED), key blocks outside
// for small groups, union tiles.
enum { NSA_SLC_NONE = 0, NSA_SLC_WARP = 16, NSA_SLC_KC = 32, NSA_SLC_KV = 48, NSA_SLC_UNION = 64 };

// Queue the calls of a scope on another stream: every launch helper takes the context's
// stream, so a scope that runs part of an op beside the rest swaps it in and back.
struct nsa__on_stream {
    nsa__cuda_state *s;
    cudaStream_t saved;
    nsa__on_stream(nsa__cuda_state *st, cudaStream_t to) : s(st), saved(st->stream)
    {
        s->stream = to;
    }
    ~nsa__on_stream() { s->stream = saved; }
};

static inline nsa__cuda_state *nsa__cuda(nsa_context *ctx)
{
    return (nsa__cuda_state *)ctx->impl;
}

static inline cudaStream_t nsa__cuda_stream(nsa_context *ctx)
{
    return ((nsa__cuda_state *)ctx->impl)->stream;
}

// ---------------------------------------------------------------------------------------
// Error checks: `NSA_CUDA_TRY(cudaMemcpyAsync(...));` returns NSA_ERR_BACKEND (or
// NSA_ERR_NOMEM for allocations) with the call, the file and CUDA's own message.

static inline nsa_status nsa__cuda_status(cudaError_t err, const char *what, const char *file,
                                          int line)
{
    if (err == cudaSuccess)
        return NSA_OK;
    nsa_status st = err == cudaErrorMemoryAllocation ? NSA_ERR_NOMEM : NSA_ERR_BACKEND;
    return nsa__error(st, "cuda: %s failed at %s:%d: %s (%s)", what, file, line,
                      cudaGetErrorString(err), cudaGetErrorName(err));
}

static inline const char *nsa__cublas_name(cublasStatus_t s)
{
    switch (s) {
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "cuBLAS error";
    }
}

static inline nsa_status nsa__cublas_status(cublasStatus_t s, const char *what, const char *file,
                                            int line)
{
    if (s == CUBLAS_STATUS_SUCCESS)
        return NSA_OK;
    nsa_status st = s == CUBLAS_STATUS_ALLOC_FAILED ? NSA_ERR_NOMEM : NSA_ERR_BACKEND;
    return nsa__error(st, "cublas: %s failed at %s:%d: %s (%d)", what, file, line,
                      nsa__cublas_name(s), (int)s);
}

#define NSA_CUDA_TRY(call)                                                              \
    do {                                                                                \
        cudaError_t nsa__e_ = (call);                                                   \
        if (nsa__e_ != cudaSuccess)                                                     \
            return nsa__cuda_status(nsa__e_, #call, __FILE__, __LINE__);                \
    } while (0)

// Fork: side[0 .. n) start after everything queued on the context's stream so far (ev[0]).
// Join: the context's stream waits for everything queued on side[0 .. n) (ev[3]); an op
// that forked joins on every path out, errors included, so no kernel of it outlives it.
static inline cudaError_t nsa__cuda_fork(nsa__cuda_state *s, int n)
{
    cudaError_t e = cudaEventRecord(s->ev[0], s->stream);
    for (int i = 0; i < n && e == cudaSuccess; i++)
        e = cudaStreamWaitEvent(s->side[i], s->ev[0], 0);
    return e;
}

static inline nsa_status nsa__cuda_join(nsa__cuda_state *s, int n, nsa_status st)
{
    cudaError_t e = cudaSuccess;
    for (int i = 0; i < n && e == cudaSuccess; i++) {
        e = cudaEventRecord(s->ev[3], s->side[i]);
        if (e == cudaSuccess)
            e = cudaStreamWaitEvent(s->stream, s->ev[3], 0);
    }
    if (st != NSA_OK)
        return st;
    return nsa__cuda_status(e, "cudaEventRecord / cudaStreamWaitEvent (join)", __FILE__, __LINE__);
}

// side() queued on side[0] beside main() on the context's stream, both after everything
// queued on it so far, and the stream waiting for both (a fork and a join); without side
// streams (NSA_CUDA_STREAMS=0) side() then main() on the stream. main() is not called when
// side() fails; the first error is returned.
template <class Side, class Main>
static inline nsa_status nsa__cuda_beside(nsa__cuda_state *s, Side side, Main main)
{
    if (!s->ev[0]) {
        NSA_TRY(side());
        return main();
    }
    NSA_CUDA_TRY(nsa__cuda_fork(s, 1));
    nsa_status st;
    {
        nsa__on_stream on(s, s->side[0]);
        st = side();
    }
    if (st == NSA_OK)
        st = main();
    return nsa__cuda_join(s, 1, st);
}

#define NSA_CUBLAS_TRY(call)                                                            \
    do {                                                                                \
        cublasStatus_t nsa__s_ = (call);                                                \
        if (nsa__s_ != CUBLAS_STATUS_SUCCESS)                                           \
            return nsa__cublas_status(nsa__s_, #call, __FILE__, __LINE__);              \
    } while (0)

// After a kernel launch: reports a bad launch configuration (or an earlier asynchronous
// fault) as NSA_ERR_BACKEND naming the kernel.
#define NSA_CUDA_LAUNCHED(name)                                                         \
    do {                                                                                \
        cudaError_t nsa__e_ = cudaGetLastError();                                       \
        if (nsa__e_ != cudaSuccess)                                                     \
            return nsa__cuda_status(nsa__e_, "launch of " name, __FILE__, __LINE__);    \
    } while (0)

// ---------------------------------------------------------------------------------------
// Launch helpers

// bytes rounded up to a multiple of 256 (the offsets of arrays carved from one scratch).
static inline size_t nsa__align256(size_t bytes)
{
    return (bytes + 255) / 256 * 256;
}

static inline unsigned nsa__cuda_blocks(size_t n, int threads)
{
    size_t b = (n + (size_t)threads - 1) / (size_t)threads;
    // Grid-stride loops cover the rest; 2^20 blocks keep every SM busy.
    return (unsigned)(b == 0 ? 1 : (b > (1u << 20) ? (1u << 20) : b));
}

// Scratch memory of at least `bytes` (device, contents undefined). Valid until the next
// call; ops run in stream order, so one op's scratch is free once its kernels are queued
// behind the next op's. Growing it waits for the stream (cudaFree synchronises).
nsa_status nsa__cuda_scratch(nsa_context *ctx, size_t bytes, void **out);
// The same for the bf16 operand copies of NSA_PRECISION_BF16, kept apart from the scratch so
// an op can convert its inputs and then call an op that takes scratch.
nsa_status nsa__cuda_operand_scratch(nsa_context *ctx, size_t bytes, void **out);

// bf16 <-> fp32 copies of n elements (round to nearest even).
nsa_status nsa__cuda_bf16_to_f32(nsa_context *ctx, float *dst, const __nv_bfloat16 *src, size_t n);
nsa_status nsa__cuda_f32_to_bf16(nsa_context *ctx, __nv_bfloat16 *dst, const float *src, size_t n);

// Entry points of the files of src/cuda/ (the ops table is in cuda_backend.cu).
#define NSA_CUDA_OP(name, ...) nsa_status nsa__cuda_##name(nsa_context *ctx, __VA_ARGS__)

NSA_CUDA_OP(has_nonfinite, const float *x, size_t n, int *result);
NSA_CUDA_OP(bias_fill, float *y, const float *bias, int M, int O);
NSA_CUDA_OP(bias_grad, float *dbias, const float *dy, int M, int O);
NSA_CUDA_OP(layernorm_forward, float *y, float *mean, float *rstd, const float *x,
            const float *gamma, const float *beta, int M, int D);
NSA_CUDA_OP(layernorm_backward, float *dx, float *dgamma, float *dbeta, const float *dy,
            const float *x, const float *mean, const float *rstd, const float *gamma, int M,
            int D);
NSA_CUDA_OP(gelu_forward, float *y, const float *x, size_t n);
NSA_CUDA_OP(gelu_backward, float *dx, const float *dy, const float *x, size_t n);
NSA_CUDA_OP(add, float *y, const float *a, const float *b, size_t n);
NSA_CUDA_OP(scale, float *y, float alpha, size_t n);
NSA_CUDA_OP(dropout, float *x, size_t n, float p, uint64_t seed, uint64_t stream);
NSA_CUDA_OP(rope, float *x, int B, int T, int pos0, int nh, int d, double theta, int inverse);
NSA_CUDA_OP(compress_forward, float *xc, const float *x, const float *W, int B, int T, int G,
            int d, int l, int r);
NSA_CUDA_OP(compress_backward, float *dx, float *dW, const float *dxc, const float *x,
            const float *W, int B, int T, int G, int d, int l, int r);
NSA_CUDA_OP(compress_gather, float *X, const float *x, const float *pos, int B, int T, int G,
            int d, int l, int r);
NSA_CUDA_OP(compress_gather_backward, float *dx, float *dpos, const float *dX, int B, int T,
            int G, int d, int l, int r);
NSA_CUDA_OP(gate_forward, float *gates, const float *params, int M, int H, nsa_gate kind);
NSA_CUDA_OP(gate_backward, float *dparams, const float *dgates, const float *gates, int M,
            int H, nsa_gate kind);
NSA_CUDA_OP(embedding_forward, float *out, const int32_t *tokens, const float *table, int M,
            int E);
NSA_CUDA_OP(embedding_backward, float *dtable, const int32_t *tokens, const float *dout, int M,
            int E);
NSA_CUDA_OP(cross_entropy, float *losses, float *dlogits, const float *logits,
            const int32_t *tokens, const float *weights, int B, int T, int V, float scale);
NSA_CUDA_OP(sum_squares, const float *x, size_t n, double *result);
NSA_CUDA_OP(adamw, float *params, const float *grads, float *m, float *v,
            const uint8_t *decay_mask, size_t n, float lr, float beta1, float beta2, float eps,
            float weight_decay, float grad_scale, float c1, float c2);
NSA_CUDA_OP(attn_forward, const nsa__attn_dims *dims, const float *q, const float *k,
            const float *v, const float *kc, const float *vc, const float *gates,
            const int32_t *given_idx, int32_t *idx, float *out, float *o_paths, float *lse);
NSA_CUDA_OP(attn_backward, const nsa__attn_dims *dims, const float *q, const float *k,
            const float *v, const float *kc, const float *vc, const float *gates,
            const int32_t *idx, const float *o_paths, const float *lse, const float *dout,
            float *dq, float *dk, float *dv, float *dkc, float *dvc, float *dgates);
NSA_CUDA_OP(attn_forward_bf16, const nsa__attn_dims *dims, const uint16_t *q, const uint16_t *k,
            const uint16_t *v, const uint16_t *kc, const uint16_t *vc, const float *gates,
            const int32_t *given_idx, int32_t *idx, float *out, float *o_paths, float *lse);
NSA_CUDA_OP(attn_backward_bf16, const nsa__attn_dims *dims, const uint16_t *q, const uint16_t *k,
            const uint16_t *v, const uint16_t *kc, const uint16_t *vc, const float *gates,
            const int32_t *idx, const float *o_paths, const float *lse, const float *dout,
            float *dq, float *dk, float *dv, float *dkc, float *dvc, float *dgates);

#endif // NSA_CUDA_COMMON_CUH
