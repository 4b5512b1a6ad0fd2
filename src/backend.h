/*
 * backend.h — the interface between the model (written once, src/model*.c) and a device
 * backend (src/cpu/, src/cuda/). Every pointer an op takes is device memory of that
 * backend (host memory for the CPU backend); sizes are in elements. Each op comment
 * gives the shapes and says whether outputs are overwritten (=) or accumulated (+=).
 *
 * A backend fills an nsa__backend_ops table; the context holds it with the backend's own
 * state (threads, BLAS settings, CUDA stream and handles).
 */
#ifndef NSA_BACKEND_H
#define NSA_BACKEND_H

#include "nsa.h"

#include <stddef.h>
#include <stdint.h>

// The attention problem, resolved: everything the three paths need.
typedef struct nsa__attn_dims {
    int B, T, H, G, d;
    int block_size;   // b
    int window;       // w
    int cmp_stride;   // r
    int cmp_len;      // l
    int num_selected; // n
    int num_cmp;      // Tc = number of compressed tokens = T >= l ? (T - l) / r + 1 : 0
    int num_blocks;   // ceil(T / b)
    nsa_select_score select_score;
    nsa_select_fixed select_fixed;
    float scale;
    // Queries only at positions [q_start, T) (cached generation: q_start = T - 1): then q,
    // gates, out, o_paths, lse and idx hold T - q_start rows per batch entry, while k, v,
    // kc, vc hold all T (Tc). 0 for training and full forwards. Forward only; a backend
    // that does not support q_start > 0 returns NSA_ERR_UNSUPPORTED.
    int q_start;
} nsa__attn_dims;

void nsa__attn_dims_init(nsa__attn_dims *dims, const nsa_attention_desc *desc);

typedef struct nsa__backend_ops nsa__backend_ops;

struct nsa_context {
    nsa_device device;
    nsa_precision precision; // NSA_PRECISION_BF16: the backend's bf16 tensor-core paths
    int num_threads;
    const nsa__backend_ops *ops;
    void *impl; // backend state
};

struct nsa__backend_ops {
    const char *name;
    void (*destroy)(nsa_context *ctx);

    // ---- memory
    nsa_status (*alloc)(nsa_context *ctx, void **ptr, size_t bytes);
    void (*free)(nsa_context *ctx, void *ptr);
    nsa_status (*upload)(nsa_context *ctx, void *dst, const void *host_src, size_t bytes);
    nsa_status (*download)(nsa_context *ctx, void *host_dst, const void *src, size_t bytes);
    nsa_status (*copy)(nsa_context *ctx, void *dst, const void *src, size_t bytes);
    nsa_status (*zero)(nsa_context *ctx, void *dst, size_t bytes);
    // 1 if any of x[n] is NaN or Inf (result on the host).
    nsa_status (*has_nonfinite)(nsa_context *ctx, const float *x, size_t n, int *result);

    // ---- dense
    // y[M,O] = x[M,I] W[O,I]^T + bias[O] (bias may be NULL).
    nsa_status (*linear_forward)(nsa_context *ctx, float *y, const float *x, const float *W,
                                 const float *bias, int M, int I, int O);
    // dx[M,I] = dx_beta * dx + dy W (dx may be NULL); dW[O,I] += dy^T x; dbias[O] += sum dy
    // (dbias may be NULL).
    nsa_status (*linear_backward)(nsa_context *ctx, float *dx, float dx_beta, float *dW,
                                  float *dbias, const float *dy, const float *x, const float *W,
                                  int M, int I, int O);

    // ---- elementwise and norms
    // y[M,D] = LN(x) * gamma + beta; mean[M], rstd[M] saved.
    nsa_status (*layernorm_forward)(nsa_context *ctx, float *y, float *mean, float *rstd,
                                    const float *x, const float *gamma, const float *beta, int M,
                                    int D);
    // dx[M,D] += ; dgamma[D] += ; dbeta[D] += .
    nsa_status (*layernorm_backward)(nsa_context *ctx, float *dx, float *dgamma, float *dbeta,
                                     const float *dy, const float *x, const float *mean,
                                     const float *rstd, const float *gamma, int M, int D);
    // y[n] = GELU(x) (exact, erf). y may alias x only when the input is not needed later.
    nsa_status (*gelu_forward)(nsa_context *ctx, float *y, const float *x, size_t n);
    // dx[n] = dy * GELU'(x) (=; dx may alias dy).
    nsa_status (*gelu_backward)(nsa_context *ctx, float *dx, const float *dy, const float *x,
                                size_t n);
    // y[n] = a[n] + b[n] (y may alias a or b).
    nsa_status (*add)(nsa_context *ctx, float *y, const float *a, const float *b, size_t n);
    // y[n] *= alpha.
    nsa_status (*scale)(nsa_context *ctx, float *y, float alpha, size_t n);
    // Inverted dropout, in place: x[i] = keep(i) ? x[i] / (1-p) : 0, where keep(i) is a
    // hash of (seed, stream, i) — the same mask for forward and backward, no mask stored.
    nsa_status (*dropout)(nsa_context *ctx, float *x, size_t n, float p, uint64_t seed,
                          uint64_t stream);
    // Rotary embedding in place on x [B*T, nh, d] with position pos0 + (row % T); inverse
    // when `inverse` (the backward of the rotation). pos0 > 0 serves cached generation.
    nsa_status (*rope)(nsa_context *ctx, float *x, int B, int T, int pos0, int nh, int d,
                       double theta, int inverse);

    // ---- compression (SPEC §3.1), x [B,T,G,d] -> xc [B,Tc,G,d]
    // Weighted sum over each block of l positions with stride r; W [G,l,d] or NULL for the
    // mean (weights 1/l). xc =.
    nsa_status (*compress_forward)(nsa_context *ctx, float *xc, const float *x, const float *W,
                                   int B, int T, int G, int d, int l, int r);
    // dx += ; dW += (when W is not NULL).
    nsa_status (*compress_backward)(nsa_context *ctx, float *dx, float *dW, const float *dxc,
                                    const float *x, const float *W, int B, int T, int G, int d,
                                    int l, int r);
    // MLP compression input: X [B,Tc,G,l*d] with X[b,j,g,i*d+c] = x[b,j*r+i,g,c] + pos[i,c].
    nsa_status (*compress_gather)(nsa_context *ctx, float *X, const float *x, const float *pos,
                                  int B, int T, int G, int d, int l, int r);
    // dx += scatter of dX; dpos += sum of dX over (b,j,g).
    nsa_status (*compress_gather_backward)(nsa_context *ctx, float *dx, float *dpos,
                                           const float *dX, int B, int T, int G, int d, int l,
                                           int r);

    // ---- gates: gates [M,H,3]
    // static: gates[m,h,:] = softmax(gamma[3]); token: gates = sigmoid(logits [M,H*3]).
    nsa_status (*gate_forward)(nsa_context *ctx, float *gates, const float *params, int M, int H,
                               nsa_gate kind);
    // static: dgamma[3] += ; token: dlogits [M,H*3] = .
    nsa_status (*gate_backward)(nsa_context *ctx, float *dparams, const float *dgates,
                                const float *gates, int M, int H, nsa_gate kind);

    // ---- the three-path attention (SPEC §3)
    // q [B,T,H,d], k, v [B,T,G,d], kc, vc [B,Tc,G,d], gates [B,T,H,3];
    // given_idx [B,T,G,n] or NULL (then scoring + top-k selects); idx [B,T,G,n] = selection
    // (ascending, -1 padded); out [B,T,H,d] = gated sum; o_paths [3,B,T,H,d] and
    // lse [B,T,H,3] saved for backward when not NULL (lse = -inf where a path has no key).
    nsa_status (*attn_forward)(nsa_context *ctx, const nsa__attn_dims *dims, const float *q,
                               const float *k, const float *v, const float *kc, const float *vc,
                               const float *gates, const int32_t *given_idx, int32_t *idx,
                               float *out, float *o_paths, float *lse);
    // dq, dk, dv, dkc, dvc, dgates all overwritten (=).
    nsa_status (*attn_backward)(nsa_context *ctx, const nsa__attn_dims *dims, const float *q,
                                const float *k, const float *v, const float *kc, const float *vc,
                                const float *gates, const int32_t *idx, const float *o_paths,
                                const float *lse, const float *dout, float *dq, float *dk,
                                float *dv, float *dkc, float *dvc, float *dgates);

    // bf16 variants (NULL where the backend has none): q, k, v, kc, vc hold bf16 values
    // (uint16 bit patterns, 16-byte aligned), used as tensor-core operands with fp32
    // accumulation; gates, dout and every output are fp32, shapes as above. Head dims that
    // are multiples of 8 up to 128, and the fp32 buffers (outputs, o_paths, dout) 16-byte
    // aligned; other shapes return NSA_ERR_UNSUPPORTED.
    nsa_status (*attn_forward_bf16)(nsa_context *ctx, const nsa__attn_dims *dims,
                                    const uint16_t *q, const uint16_t *k, const uint16_t *v,
                                    const uint16_t *kc, const uint16_t *vc, const float *gates,
                                    const int32_t *given_idx, int32_t *idx, float *out,
                                    float *o_paths, float *lse);
    nsa_status (*attn_backward_bf16)(nsa_context *ctx, const nsa__attn_dims *dims,
                                     const uint16_t *q, const uint16_t *k, const uint16_t *v,
                                     const uint16_t *kc, const uint16_t *vc, const float *gates,
                                     const int32_t *idx, const float *o_paths, const float *lse,
                                     const float *dout, float *dq, float *dk, float *dv,
                                     float *dkc, float *dvc, float *dgates);
    // (NULL where absent) which kernels the last bf16 attention forward and backward ran for
    // the selected path, as "slc_fwd=... slc_dq=..." (benchmarks and device tests print it:
    // a tuning switch whose conditions do not hold falls back without an error).
    const char *(*attn_kernels)(nsa_context *ctx);

    // ---- language model
    // out[M,E] = table[tokens[m], :].
    nsa_status (*embedding_forward)(nsa_context *ctx, float *out, const int32_t *tokens,
                                    const float *table, int M, int E);
    // dtable[tokens[m], :] += dout[m, :].
    nsa_status (*embedding_backward)(nsa_context *ctx, float *dtable, const int32_t *tokens,
                                     const float *dout, int M, int E);
    // Next-token cross-entropy over logits [B,T,V]: position t < T-1 predicts tokens[t+1].
    // losses [B*T] = weight * per-position loss (0 at t = T-1); weights [B*T] or NULL (1);
    // dlogits (may be NULL) [B,T,V] = scale * weight * d(loss)/dlogits.
    nsa_status (*cross_entropy)(nsa_context *ctx, float *losses, float *dlogits,
                                const float *logits, const int32_t *tokens, const float *weights,
                                int B, int T, int V, float scale);

    // ---- optimizer
    // sum of squares of x[n] into *result (host, double).
    nsa_status (*sum_squares)(nsa_context *ctx, const float *x, size_t n, double *result);
    // One AdamW step over n params: m, v moments; grad scaled by grad_scale first;
    // decoupled weight decay where decay_mask (host-resolved per-element flags on device,
    // uint8 [n]) is 1. bias corrections c1 = 1 - beta1^t, c2 = 1 - beta2^t.
    nsa_status (*adamw)(nsa_context *ctx, float *params, const float *grads, float *m, float *v,
                        const uint8_t *decay_mask, size_t n, float lr, float beta1, float beta2,
                        float eps, float weight_decay, float grad_scale, float c1, float c2);
};

// Backends compiled in.
nsa_status nsa__cpu_backend_init(nsa_context *ctx, int num_threads);
#ifdef NSA_HAVE_CUDA
nsa_status nsa__cuda_backend_init(nsa_context *ctx, int num_threads);
int nsa__cuda_available(void);
#endif

// The dropout hash shared by all backends, so a seed means the same mask everywhere.
static inline uint64_t nsa__hash64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    x ^= x >> 31;
    return x;
}
// Uniform in [0,1) with 24 bits, from (seed, stream, index).
static inline float nsa__uniform(uint64_t seed, uint64_t stream, uint64_t index)
{
    uint64_t h = nsa__hash64(seed ^ nsa__hash64(stream * 0x9E3779B97F4A7C15ull + index));
    return (float)(h >> 40) * (1.0f / 16777216.0f);
}

#endif // NSA_BACKEND_H
