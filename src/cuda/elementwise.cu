/*
 * elementwise.cu — the CUDA backend's ops other than the dense products and attention:
 * bias and column sums, LayerNorm, GELU, add/scale, dropout (the same hash as the CPU, so
 * masks agree bit for bit), RoPE, the compression ops, gates, embedding, cross-entropy,
 * sum of squares, AdamW and the NaN/Inf check.
 *
 * Each launcher enqueues on the context's stream. Reductions over rows (bias, LayerNorm
 * and gate gradients, positions of the MLP compression) run in double in a fixed order:
 * per-split partial sums, then one pass adding the splits in order, so results do not
 * change from run to run. Only embedding_backward uses atomics (repeated tokens).
 */
#include "cuda/common.cuh"

#include <math.h>

#define THREADS 256

// ---------------------------------------------------------------------------------------
// Reductions

template <typename T> __device__ __forceinline__ T warp_sum(T v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
template <typename T> __device__ T block_sum(T v, T *shared32)
{
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads(); // shared32 may hold the previous call's values
    if (lane == 0)
        shared32[warp] = v;
    __syncthreads();
    T s = 0;
    for (int w = 0; w < warps; w++) // fixed order
        s += shared32[w];
    return s;
}

__device__ float block_max(float v, float *shared32)
{
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0)
        shared32[warp] = v;
    __syncthreads();
    float m = shared32[0];
    for (int w = 1; w < warps; w++)
        m = fmaxf(m, shared32[w]);
    return m;
}

// Column sums: sums[c] = sum over rows r of f(r, c), in double. Blocks of 32 columns x 8
// row lanes; grid.y splits the rows; partial[split][c] then summed in split order.
template <class F>
__global__ void colsum_partial_kernel(double *partial, int rows, int cols, int rows_per_split, F f)
{
    __shared__ double acc[8][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    int r0 = blockIdx.y * rows_per_split;
    int r1 = min(rows, r0 + rows_per_split);
    double s = 0.0;
    if (c < cols)
        for (int r = r0 + threadIdx.y; r < r1; r += 8)
            s += f(r, c);
    acc[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        double t = 0.0;
        for (int i = 0; i < 8; i++)
            t += acc[i][threadIdx.x];
        partial[(size_t)blockIdx.y * cols + c] = t;
    }
}

// out[c] += (float)sum of the splits (mode 0), or sums[c] = the double sum (mode 1).
__global__ void colsum_finish_kernel(float *out, double *sums, const double *partial, int cols,
                                     int splits)
{
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols)
        return;
    double s = 0.0;
    for (int i = 0; i < splits; i++)
        s += partial[(size_t)i * cols + c];
    if (out)
        out[c] += (float)s;
    if (sums)
        sums[c] = s;
}

// Enqueues the column sum of f over [rows, cols]: out[c] += sum (float) when out, and
// sums_dev[c] = sum (double) when sums_dev. `extra` bytes of scratch after the partials
// are handed back in *extra_ptr for the caller's own use (one scratch request per op).
template <class F>
static nsa_status colsum(nsa_context *ctx, F f, int rows, int cols, float *out, int want_sums,
                         double **sums_out)
{
    nsa__cuda_state *s = nsa__cuda(ctx);
    if (cols <= 0)
        return NSA_OK;
    int col_blocks = (cols + 31) / 32;
    int splits = (4 * s->num_sms + col_blocks - 1) / col_blocks;
    int max_splits = (rows + 255) / 256;
    if (splits > max_splits)
        splits = max_splits;
    if (splits < 1)
        splits = 1;
    int rows_per_split = (rows + splits - 1) / splits;
    if (rows_per_split < 1)
        rows_per_split = 1;
    size_t partial_n = (size_t)splits * cols;
    void *mem;
    NSA_TRY(nsa__cuda_scratch(ctx, (partial_n + (size_t)cols) * sizeof(double), &mem));
    double *partial = (double *)mem, *sums = partial + partial_n;
    if (rows > 0) {
        colsum_partial_kernel<<<dim3(col_blocks, splits), dim3(32, 8), 0, s->stream>>>(
            partial, rows, cols, rows_per_split, f);
        NSA_CUDA_LAUNCHED("colsum_partial_kernel");
    } else {
        NSA_CUDA_TRY(cudaMemsetAsync(partial, 0, partial_n * sizeof(double), s->stream));
    }
    colsum_finish_kernel<<<(cols + THREADS - 1) / THREADS, THREADS, 0, s->stream>>>(
        out, want_sums ? sums : NULL, partial, cols, splits);
    NSA_CUDA_LAUNCHED("colsum_finish_kernel");
    if (sums_out)
        *sums_out = sums;
    return NSA_OK;
}

struct plain_col {
    const float *x;
    int ld;
    __device__ double operator()(int r, int c) const { return x[(size_t)r * ld + c]; }
};

// ---------------------------------------------------------------------------------------
// NaN / Inf check

__global__ void nonfinite_kernel(const float *x, size_t n, int *flag)
{
    int found = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        found |= !isfinite(x[i]);
    if (__syncthreads_or(found) && threadIdx.x == 0)
        *flag = 1;
}

NSA_CUDA_OP(has_nonfinite, const float *x, size_t n, int *result)
{
    cudaStream_t st = nsa__cuda_stream(ctx);
    *result = 0;
    if (n == 0)
        return NSA_OK;
    void *mem;
    NSA_TRY(nsa__cuda_scratch(ctx, sizeof(int), &mem));
    int *flag = (int *)mem, host = 0;
    NSA_CUDA_TRY(cudaMemsetAsync(flag, 0, sizeof(int), st));
    nonfinite_kernel<<<nsa__cuda_blocks(n, THREADS) > 4096 ? 4096 : nsa__cuda_blocks(n, THREADS),
                       THREADS, 0, st>>>(x, n, flag);
    NSA_CUDA_LAUNCHED("nonfinite_kernel");
    NSA_CUDA_TRY(cudaMemcpyAsync(&host, flag, sizeof(int), cudaMemcpyDeviceToHost, st));
    NSA_CUDA_TRY(cudaStreamSynchronize(st));
    *result = host != 0;
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// Bias

__global__ void bias_fill_kernel(float *y, const float *bias, size_t M, int O)
{
    size_t n = M * (size_t)O;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = bias[i % (size_t)O];
}

NSA_CUDA_OP(bias_fill, float *y, const float *bias, int M, int O)
{
    size_t n = (size_t)M * O;
    bias_fill_kernel<<<nsa__cuda_blocks(n, THREADS), THREADS, 0, nsa__cuda_stream(ctx)>>>(
        y, bias, (size_t)M, O);
    NSA_CUDA_LAUNCHED("bias_fill_kernel");
    return NSA_OK;
}

NSA_CUDA_OP(bias_grad, float *dbias, const float *dy, int M, int O)
{
    return colsum(ctx, plain_col{dy, O}, M, O, dbias, 0, (double **)NULL);
}

// ---------------------------------------------------------------------------------------
// LayerNorm (eps 1e-5, biased variance; statistics in double as on the CPU)

#define LN_EPS 1e-5

__global__ void layernorm_forward_kernel(float *y, float *mean, float *rstd, const float *x,
                                         const float *gamma, const float *beta, int D)
{
    __shared__ double red[32];
    size_t m = blockIdx.x;
    const float *xr = x + m * D;
    float *yr = y + m * D;
    double s = 0.0;
    for (int i = threadIdx.x; i < D; i += blockDim.x)
        s += xr[i];
    double mu = block_sum(s, red) / D;
    double v = 0.0;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        double dv = (double)xr[i] - mu;
        v += dv * dv;
    }
    v = block_sum(v, red);
    double rs = 1.0 / sqrt(v / D + LN_EPS);
    float muf = (float)mu, rsf = (float)rs;
    for (int i = threadIdx.x; i < D; i += blockDim.x)
        yr[i] = (xr[i] - muf) * rsf * gamma[i] + beta[i];
    if (threadIdx.x == 0) {
        if (mean)
            mean[m] = muf;
        if (rstd)
            rstd[m] = rsf;
    }
}

NSA_CUDA_OP(layernorm_forward, float *y, float *mean, float *rstd, const float *x,
            const float *gamma, const float *beta, int M, int D)
{
    if (M <= 0)
        return NSA_OK;
    int threads = D >= 512 ? 256 : (D >= 128 ? 128 : 32);
    layernorm_forward_kernel<<<M, threads, 0, nsa__cuda_stream(ctx)>>>(y, mean, rstd, x, gamma,
                                                                        beta, D);
    NSA_CUDA_LAUNCHED("layernorm_forward_kernel");
    return NSA_OK;
}

__global__ void layernorm_backward_dx_kernel(float *dx, const float *dy, const float *x,
                                             const float *mean, const float *rstd,
                                             const float *gamma, int D)
{
    __shared__ double red[32];
    size_t m = blockIdx.x;
    const float *xr = x + m * D, *dyr = dy + m * D;
    float *dxr = dx + m * D;
    float mu = mean[m], rs = rstd[m];
    double sg = 0.0, sgx = 0.0;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float xhat = (xr[i] - mu) * rs;
        float g = dyr[i] * gamma[i];
        sg += g;
        sgx += (double)g * xhat;
    }
    sg = block_sum(sg, red);
    sgx = block_sum(sgx, red);
    float mg = (float)(sg / D), mgx = (float)(sgx / D);
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float xhat = (xr[i] - mu) * rs;
        dxr[i] += rs * (dyr[i] * gamma[i] - mg - xhat * mgx);
    }
}

struct ln_dgamma_col {
    const float *dy, *x, *mean, *rstd;
    int D;
    __device__ double operator()(int r, int c) const
    {
        size_t i = (size_t)r * D + c;
        float xhat = (x[i] - mean[r]) * rstd[r];
        return (double)dy[i] * xhat;
    }
};

NSA_CUDA_OP(layernorm_backward, float *dx, float *dgamma, float *dbeta, const float *dy,
            const float *x, const float *mean, const float *rstd, const float *gamma, int M,
            int D)
{
    if (M <= 0)
        return NSA_OK;
    int threads = D >= 512 ? 256 : (D >= 128 ? 128 : 32);
    layernorm_backward_dx_kernel<<<M, threads, 0, nsa__cuda_stream(ctx)>>>(dx, dy, x, mean, rstd,
                                                                            gamma, D);
    NSA_CUDA_LAUNCHED("layernorm_backward_dx_kernel");
    NSA_TRY(colsum(ctx, ln_dgamma_col{dy, x, mean, rstd, D}, M, D, dgamma, 0, (double **)NULL));
    return colsum(ctx, plain_col{dy, D}, M, D, dbeta, 0, (double **)NULL);
}

// ---------------------------------------------------------------------------------------
// GELU (exact, erf), add, scale

__global__ void gelu_forward_kernel(float *y, const float *x, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = x[i];
        y[i] = 0.5f * v * (1.0f + erff(v * (float)M_SQRT1_2));
    }
}

__global__ void gelu_backward_kernel(float *dx, const float *dy, const float *x, size_t n)
{
    const float inv_sqrt_2pi = 0.3989422804014327f;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = x[i];
        float cdf = 0.5f * (1.0f + erff(v * (float)M_SQRT1_2));
        float pdf = inv_sqrt_2pi * expf(-0.5f * v * v);
        dx[i] = dy[i] * (cdf + v * pdf);
    }
}

NSA_CUDA_OP(gelu_forward, float *y, const float *x, size_t n)
{
    if (!n)
        return NSA_OK;
    gelu_forward_kernel<<<nsa__cuda_blocks(n, THREADS), THREADS, 0, nsa__cuda_stream(ctx)>>>(y, x,
                                                                                            n);
    NSA_CUDA_LAUNCHED("gelu_forward_kernel");
    return NSA_OK;
}

NSA_CUDA_OP(gelu_backward, float *dx, const float *dy, const float *x, size_t n)
{
    if (!n)
        return NSA_OK;
    gelu_backward_kernel<<<nsa__cuda_blocks(n, THREADS), THREADS, 0, nsa__cuda_stream(ctx)>>>(
        dx, dy, x, n);
    NSA_CUDA_LAUNCHED("gelu_backward_kernel");
    return NSA_OK;
}

__global__ void add_kernel(float *y, const float *a, const float *b, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = a[i] + b[i];
}

__global__ void scale_kernel(float *y, float alpha, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] *= alpha;
}

NSA_CUDA_OP(add, float *y, const float *a, const float *b, size_t n)
{
    if (!n)
        return NSA_OK;
    add_kernel<<<nsa__cuda_blocks(n, THREADS), THREADS, 0, nsa__cuda_stream(ctx)>>>(y, a, b, n);
    NSA_CUDA_LAUNCHED("add_kernel");
    return NSA_OK;
}

NSA_CUDA_OP(scale, float *y, float alpha, size_t n)
{
    if (!n)
        return NSA_OK;
    scale_kernel<<<nsa__cuda_blocks(n, THREADS), THREADS, 0, nsa__cuda_stream(ctx)>>>(y, alpha, n);
    NSA_CUDA_LAUNCHED("scale_kernel");
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// Dropout: nsa__uniform of backend.h, on the device.

__device__ __forceinline__ uint64_t dev_hash64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    x ^= x >> 31;
    return x;
}

__device__ __forceinline__ float dev_uniform(uint64_t seed, uint64_t stream, uint64_t index)
{
    uint64_t h = dev_hash64(seed ^ dev_hash64(stream * 0x9E3779B97F4A7C15ull + index));
    return (float)(h >> 40) * (1.0f / 16777216.0f);
}

__global__ void dropout_kernel(float *x, size_t n, float p, float keep_scale, uint64_t seed,
                               uint64_t stream)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] = dev_uniform(seed, stream, i) >= p ? x[i] * keep_scale : 0.0f;
}

NSA_CUDA_OP(dropout, float *x, size_t n, float p, uint64_t seed, uint64_t stream)
{
    if (p <= 0.0f || !n)
        return NSA_OK;
    float keep_scale = 1.0f / (1.0f - p);
    dropout_kernel<<<nsa__cuda_blocks(n, THREADS), THREADS, 0, nsa__cuda_stream(ctx)>>>(
        x, n, p, keep_scale, seed, stream);
    NSA_CUDA_LAUNCHED("dropout_kernel");
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// RoPE: pairs (2i, 2i+1) rotated by (pos0 + t) * theta^(-2i/d); angles in double as on
// the CPU. One thread per (t, i), looping over batch entries and heads.

__global__ void rope_kernel(float *x, int B, int T, int pos0, int nh, int d, double theta,
                            int inverse)
{
    int half = d / 2;
    size_t n = (size_t)T * half;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n;
         e += (size_t)gridDim.x * blockDim.x) {
        int t = (int)(e / half), i = (int)(e % half);
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

NSA_CUDA_OP(rope, float *x, int B, int T, int pos0, int nh, int d, double theta, int inverse)
{
    size_t n = (size_t)T * (d / 2);
    if (!n || B <= 0 || nh <= 0)
        return NSA_OK;
    rope_kernel<<<nsa__cuda_blocks(n, 128), 128, 0, nsa__cuda_stream(ctx)>>>(x, B, T, pos0, nh, d,
                                                                             theta, inverse);
    NSA_CUDA_LAUNCHED("rope_kernel");
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// Compression (SPEC §3.1). The forward sums in the CPU's order without fused multiply-add,
// so mean-compressed keys equal the CPU's bit for bit (they feed the block selection).

static inline int num_compressed(int T, int l, int r)
{
    return T >= l ? (T - l) / r + 1 : 0;
}

__global__ void compress_forward_kernel(float *xc, const float *x, const float *W, int B, int T,
                                        int G, int d, int l, int r, int Tc)
{
    size_t n = (size_t)B * Tc * G * d;
    float inv_l = 1.0f / (float)l;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n;
         e += (size_t)gridDim.x * blockDim.x) {
        int c = (int)(e % d);
        size_t rest = e / d;
        int g = (int)(rest % G);
        rest /= G;
        int j = (int)(rest % Tc);
        int b = (int)(rest / Tc);
        float acc = 0.0f;
        for (int i = 0; i < l; i++) {
            float in = x[(((size_t)b * T + (size_t)j * r + i) * G + g) * d + c];
            float w = W ? W[((size_t)g * l + i) * d + c] : inv_l;
            acc = __fadd_rn(acc, __fmul_rn(w, in));
        }
        xc[e] = acc;
    }
}

NSA_CUDA_OP(compress_forward, float *xc, const float *x, const float *W, int B, int T, int G,
            int d, int l, int r)
{
    int Tc = num_compressed(T, l, r);
    size_t n = (size_t)B * Tc * G * d;
    if (!n)
        return NSA_OK;
    compress_forward_kernel<<<nsa__cuda_blocks(n, THREADS), THREADS, 0, nsa__cuda_stream(ctx)>>>(
        xc, x, W, B, T, G, d, l, r, Tc);
    NSA_CUDA_LAUNCHED("compress_forward_kernel");
    return NSA_OK;
}

// The compressed tokens j whose span [j*r, j*r + l) holds position s: j in [lo, hi].
// (b, s, g, c) of flat index e of a [B, T, G, d] array.
__device__ __forceinline__ void unravel_btgd(size_t e, int T, int G, int d, int *b, int *s, int *g,
                                             int *c)
{
    *c = (int)(e % d);
    size_t rest = e / d;
    *g = (int)(rest % G);
    rest /= G;
    *s = (int)(rest % T);
    *b = (int)(rest / T);
}

__device__ __forceinline__ void covering_tokens(int s, int l, int r, int Tc, int *lo, int *hi)
{
    int a = s - l + 1;
    *lo = a <= 0 ? 0 : (a + r - 1) / r;
    int h = s / r;
    *hi = h < Tc - 1 ? h : Tc - 1;
}

// dx[b,s,g,c] += sum over covering j of w[g, s - j*r, c] * dxc[b,j,g,c] (gather: no atomics).
__global__ void compress_backward_dx_kernel(float *dx, const float *dxc, const float *W, int B,
                                            int T, int G, int d, int l, int r, int Tc)
{
    size_t n = (size_t)B * T * G * d;
    float inv_l = 1.0f / (float)l;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n;
         e += (size_t)gridDim.x * blockDim.x) {
        int b, s, g, c;
        unravel_btgd(e, T, G, d, &b, &s, &g, &c);
        int lo, hi;
        covering_tokens(s, l, r, Tc, &lo, &hi);
        float acc = 0.0f;
        for (int j = lo; j <= hi; j++) {
            float w = W ? W[((size_t)g * l + (s - j * r)) * d + c] : inv_l;
            acc += w * dxc[(((size_t)b * Tc + j) * G + g) * d + c];
        }
        if (lo <= hi)
            dx[e] += acc;
    }
}

// dW[g,i,c] += sum over (b, j) of x[b, j*r+i, g, c] * dxc[b,j,g,c].
__global__ void compress_backward_dw_kernel(float *dW, const float *dxc, const float *x, int B,
                                            int T, int G, int d, int l, int r, int Tc)
{
    size_t n = (size_t)G * l * d;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n;
         e += (size_t)gridDim.x * blockDim.x) {
        int c = (int)(e % d);
        int i = (int)((e / d) % l);
        int g = (int)(e / ((size_t)d * l));
        double acc = 0.0;
        for (int b = 0; b < B; b++)
            for (int j = 0; j < Tc; j++)
                acc += (double)x[(((size_t)b * T + (size_t)j * r + i) * G + g) * d + c] *
                       dxc[(((size_t)b * Tc + j) * G + g) * d + c];
        dW[e] += (float)acc;
    }
}

NSA_CUDA_OP(compress_backward, float *dx, float *dW, const float *dxc, const float *x,
            const float *W, int B, int T, int G, int d, int l, int r)
{
    int Tc = num_compressed(T, l, r);
    if (Tc == 0)
        return NSA_OK;
    cudaStream_t st = nsa__cuda_stream(ctx);
    size_t n = (size_t)B * T * G * d;
    compress_backward_dx_kernel<<<nsa__cuda_blocks(n, THREADS), THREADS, 0, st>>>(
        dx, dxc, W, B, T, G, d, l, r, Tc);
    NSA_CUDA_LAUNCHED("compress_backward_dx_kernel");
    if (W && dW) {
        size_t nw = (size_t)G * l * d;
        compress_backward_dw_kernel<<<nsa__cuda_blocks(nw, 128), 128, 0, st>>>(dW, dxc, x, B, T, G,
                                                                               d, l, r, Tc);
        NSA_CUDA_LAUNCHED("compress_backward_dw_kernel");
    }
    return NSA_OK;
}

__global__ void compress_gather_kernel(float *X, const float *x, const float *pos, int B, int T,
                                       int G, int d, int l, int r, int Tc)
{
    size_t ld = (size_t)l * d, n = (size_t)B * Tc * G * ld;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n;
         e += (size_t)gridDim.x * blockDim.x) {
        size_t k = e % ld, rest = e / ld;
        int i = (int)(k / d), c = (int)(k % d);
        int g = (int)(rest % G);
        rest /= G;
        int j = (int)(rest % Tc);
        int b = (int)(rest / Tc);
        X[e] = x[(((size_t)b * T + (size_t)j * r + i) * G + g) * d + c] + pos[k];
    }
}

NSA_CUDA_OP(compress_gather, float *X, const float *x, const float *pos, int B, int T, int G,
            int d, int l, int r)
{
    int Tc = num_compressed(T, l, r);
    size_t n = (size_t)B * Tc * G * l * d;
    if (!n)
        return NSA_OK;
    compress_gather_kernel<<<nsa__cuda_blocks(n, THREADS), THREADS, 0, nsa__cuda_stream(ctx)>>>(
        X, x, pos, B, T, G, d, l, r, Tc);
    NSA_CUDA_LAUNCHED("compress_gather_kernel");
    return NSA_OK;
}

// dx[b,s,g,c] += sum over covering j of dX[b,j,g,(s - j*r)*d + c].
__global__ void compress_gather_backward_kernel(float *dx, const float *dX, int B, int T, int G,
                                                int d, int l, int r, int Tc)
{
    size_t n = (size_t)B * T * G * d, ld = (size_t)l * d;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n;
         e += (size_t)gridDim.x * blockDim.x) {
        int b, s, g, c;
        unravel_btgd(e, T, G, d, &b, &s, &g, &c);
        int lo, hi;
        covering_tokens(s, l, r, Tc, &lo, &hi);
        float acc = 0.0f;
        for (int j = lo; j <= hi; j++)
            acc += dX[(((size_t)b * Tc + j) * G + g) * ld + (size_t)(s - j * r) * d + c];
        if (lo <= hi)
            dx[e] += acc;
    }
}

NSA_CUDA_OP(compress_gather_backward, float *dx, float *dpos, const float *dX, int B, int T,
            int G, int d, int l, int r)
{
    int Tc = num_compressed(T, l, r);
    if (Tc == 0)
        return NSA_OK;
    size_t n = (size_t)B * T * G * d;
    compress_gather_backward_kernel<<<nsa__cuda_blocks(n, THREADS), THREADS, 0,
                                      nsa__cuda_stream(ctx)>>>(dx, dX, B, T, G, d, l, r, Tc);
    NSA_CUDA_LAUNCHED("compress_gather_backward_kernel");
    int ld = l * d;
    return colsum(ctx, plain_col{dX, ld}, B * Tc * G, ld, dpos, 0, (double **)NULL);
}

// ---------------------------------------------------------------------------------------
// Gates: static = softmax of 3 logits (double, as on the CPU); token = sigmoid.

__global__ void gate_static_kernel(float *gates, const float *params, size_t rows)
{
    double p0 = params[0], p1 = params[1], p2 = params[2];
    double mx = fmax(p0, fmax(p1, p2));
    double e0 = exp(p0 - mx), e1 = exp(p1 - mx), e2 = exp(p2 - mx);
    double s = e0 + e1 + e2;
    float g0 = (float)(e0 / s), g1 = (float)(e1 / s), g2 = (float)(e2 / s);
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < rows;
         i += (size_t)gridDim.x * blockDim.x) {
        gates[i * 3 + 0] = g0;
        gates[i * 3 + 1] = g1;
        gates[i * 3 + 2] = g2;
    }
}

__global__ void gate_token_kernel(float *gates, const float *logits, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        gates[i] = 1.0f / (1.0f + expf(-logits[i]));
}

NSA_CUDA_OP(gate_forward, float *gates, const float *params, int M, int H, nsa_gate kind)
{
    size_t rows = (size_t)M * H;
    if (!rows)
        return NSA_OK;
    cudaStream_t st = nsa__cuda_stream(ctx);
    if (kind == NSA_GATE_STATIC) {
        gate_static_kernel<<<nsa__cuda_blocks(rows, THREADS), THREADS, 0, st>>>(gates, params,
                                                                                rows);
        NSA_CUDA_LAUNCHED("gate_static_kernel");
    } else {
        gate_token_kernel<<<nsa__cuda_blocks(rows * 3, THREADS), THREADS, 0, st>>>(gates, params,
                                                                                   rows * 3);
        NSA_CUDA_LAUNCHED("gate_token_kernel");
    }
    return NSA_OK;
}

__global__ void gate_token_backward_kernel(float *dlogits, const float *dgates,
                                           const float *gates, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dlogits[i] = dgates[i] * gates[i] * (1.0f - gates[i]);
}

// dgamma[c] += g[c] * (sum_dg[c] - sum_k g[k] sum_dg[k]).
__global__ void gate_static_backward_kernel(float *dparams, const double *sum_dg,
                                            const float *gates)
{
    if (threadIdx.x != 0 || blockIdx.x != 0)
        return;
    double g[3] = {gates[0], gates[1], gates[2]};
    double dot = g[0] * sum_dg[0] + g[1] * sum_dg[1] + g[2] * sum_dg[2];
    for (int c = 0; c < 3; c++)
        dparams[c] += (float)(g[c] * (sum_dg[c] - dot));
}

NSA_CUDA_OP(gate_backward, float *dparams, const float *dgates, const float *gates, int M, int H,
            nsa_gate kind)
{
    size_t rows = (size_t)M * H;
    cudaStream_t st = nsa__cuda_stream(ctx);
    if (kind == NSA_GATE_STATIC) {
        if (!rows)
            return NSA_OK;
        double *sums = NULL;
        NSA_TRY(colsum(ctx, plain_col{dgates, 3}, (int)rows, 3, (float *)NULL, 1, &sums));
        gate_static_backward_kernel<<<1, 32, 0, st>>>(dparams, sums, gates);
        NSA_CUDA_LAUNCHED("gate_static_backward_kernel");
    } else {
        if (!rows)
            return NSA_OK;
        gate_token_backward_kernel<<<nsa__cuda_blocks(rows * 3, THREADS), THREADS, 0, st>>>(
            dparams, dgates, gates, rows * 3);
        NSA_CUDA_LAUNCHED("gate_token_backward_kernel");
    }
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// Language model

__global__ void embedding_forward_kernel(float *out, const int32_t *tokens, const float *table,
                                         int M, int E)
{
    size_t n = (size_t)M * E;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t m = i / E, e = i % E;
        out[i] = table[(size_t)tokens[m] * E + e];
    }
}

// Repeated tokens add into one row: atomics (the order of those few additions varies).
__global__ void embedding_backward_kernel(float *dtable, const int32_t *tokens, const float *dout,
                                          int M, int E)
{
    size_t n = (size_t)M * E;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t m = i / E, e = i % E;
        atomicAdd(&dtable[(size_t)tokens[m] * E + e], dout[i]);
    }
}

NSA_CUDA_OP(embedding_forward, float *out, const int32_t *tokens, const float *table, int M,
            int E)
{
    size_t n = (size_t)M * E;
    if (!n)
        return NSA_OK;
    embedding_forward_kernel<<<nsa__cuda_blocks(n, THREADS), THREADS, 0, nsa__cuda_stream(ctx)>>>(
        out, tokens, table, M, E);
    NSA_CUDA_LAUNCHED("embedding_forward_kernel");
    return NSA_OK;
}

NSA_CUDA_OP(embedding_backward, float *dtable, const int32_t *tokens, const float *dout, int M,
            int E)
{
    size_t n = (size_t)M * E;
    if (!n)
        return NSA_OK;
    embedding_backward_kernel<<<nsa__cuda_blocks(n, THREADS), THREADS, 0,
                                nsa__cuda_stream(ctx)>>>(dtable, tokens, dout, M, E);
    NSA_CUDA_LAUNCHED("embedding_backward_kernel");
    return NSA_OK;
}

// One block per (b, t) row: max, sum of exponentials in double, log-sum-exp.
__global__ void cross_entropy_kernel(float *losses, float *dlogits, const float *logits,
                                     const int32_t *tokens, const float *weights, int T, int V,
                                     float scale)
{
    __shared__ double red[32];
    __shared__ float redf[32];
    size_t row = blockIdx.x;
    int t = (int)(row % T);
    const float *z = logits + row * V;
    float *dz = dlogits ? dlogits + row * V : NULL;
    if (t == T - 1) {
        if (threadIdx.x == 0)
            losses[row] = 0.0f;
        if (dz)
            for (int i = threadIdx.x; i < V; i += blockDim.x)
                dz[i] = 0.0f;
        return;
    }
    int target = tokens[row + 1];
    float w = weights ? weights[row] : 1.0f;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x)
        mx = fmaxf(mx, z[i]);
    mx = block_max(mx, redf);
    double s = 0.0;
    for (int i = threadIdx.x; i < V; i += blockDim.x)
        s += exp((double)z[i] - mx);
    s = block_sum(s, red);
    double lse = mx + log(s);
    if (threadIdx.x == 0)
        losses[row] = w * (float)(lse - z[target]);
    if (dz) {
        float f = scale * w;
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            float g = (float)exp((double)z[i] - lse) * f;
            dz[i] = i == target ? g - f : g;
        }
    }
}

NSA_CUDA_OP(cross_entropy, float *losses, float *dlogits, const float *logits,
            const int32_t *tokens, const float *weights, int B, int T, int V, float scale)
{
    size_t rows = (size_t)B * T;
    if (!rows)
        return NSA_OK;
    int threads = V >= 1024 ? 256 : (V >= 128 ? 128 : 32);
    cross_entropy_kernel<<<(unsigned)rows, threads, 0, nsa__cuda_stream(ctx)>>>(
        losses, dlogits, logits, tokens, weights, T, V, scale);
    NSA_CUDA_LAUNCHED("cross_entropy_kernel");
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// Optimizer

// Per-block partial sums of squares (double), then one block adds them in order.
__global__ void sum_squares_partial_kernel(double *partial, const float *x, size_t n)
{
    __shared__ double red[32];
    double s = 0.0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        s += (double)x[i] * x[i];
    s = block_sum(s, red);
    if (threadIdx.x == 0)
        partial[blockIdx.x] = s;
}

__global__ void sum_squares_finish_kernel(double *out, const double *partial, int count)
{
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        double s = 0.0;
        for (int i = 0; i < count; i++)
            s += partial[i];
        *out = s;
    }
}

NSA_CUDA_OP(sum_squares, const float *x, size_t n, double *result)
{
    cudaStream_t st = nsa__cuda_stream(ctx);
    *result = 0.0;
    if (!n)
        return NSA_OK;
    int blocks = (int)nsa__cuda_blocks(n, THREADS);
    if (blocks > 1024)
        blocks = 1024;
    void *mem;
    NSA_TRY(nsa__cuda_scratch(ctx, ((size_t)blocks + 1) * sizeof(double), &mem));
    double *partial = (double *)mem, *total = partial + blocks;
    sum_squares_partial_kernel<<<blocks, THREADS, 0, st>>>(partial, x, n);
    NSA_CUDA_LAUNCHED("sum_squares_partial_kernel");
    sum_squares_finish_kernel<<<1, 32, 0, st>>>(total, partial, blocks);
    NSA_CUDA_LAUNCHED("sum_squares_finish_kernel");
    double host = 0.0;
    NSA_CUDA_TRY(cudaMemcpyAsync(&host, total, sizeof(double), cudaMemcpyDeviceToHost, st));
    NSA_CUDA_TRY(cudaStreamSynchronize(st));
    *result = host;
    return NSA_OK;
}

__global__ void adamw_kernel(float *params, const float *grads, float *m, float *v,
                             const uint8_t *decay_mask, size_t n, float lr, float beta1,
                             float beta2, float eps, float weight_decay, float grad_scale,
                             float c1, float c2)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float g = grads[i] * grad_scale;
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        float mhat = mi / c1, vhat = vi / c2;
        float p = params[i];
        if (decay_mask[i])
            p -= lr * weight_decay * p;
        params[i] = p - lr * mhat / (sqrtf(vhat) + eps);
    }
}

NSA_CUDA_OP(adamw, float *params, const float *grads, float *m, float *v,
            const uint8_t *decay_mask, size_t n, float lr, float beta1, float beta2, float eps,
            float weight_decay, float grad_scale, float c1, float c2)
{
    if (!n)
        return NSA_OK;
    adamw_kernel<<<nsa__cuda_blocks(n, THREADS), THREADS, 0, nsa__cuda_stream(ctx)>>>(
        params, grads, m, v, decay_mask, n, lr, beta1, beta2, eps, weight_decay, grad_scale, c1,
        c2);
    NSA_CUDA_LAUNCHED("adamw_kernel");
    return NSA_OK;
}
