/*
 * attention_simple.cu — the warp-per-row attention kernels: one warp per query row, keys
 * one at a time with an online softmax, any head_dim up to 1024. They serve head_dim > 128
 * (past the tiled kernels' shared memory) and, with NSA_CUDA_ATTN=simple, as a second,
 * independently written GPU implementation for the tests. The backward adds dk, dv, dkc,
 * dvc with atomics.
 */
#include "cuda/attention.cuh"

// ---------------------------------------------------------------------------------------
// Simple kernels: a warp per query row, keys one at a time (online softmax). KPL = floats
// of a row per lane (d <= 32 * KPL).

template <int KPL>
__device__ void warp_attend(const float (&qv)[KPL], const float *K, const float *V,
                            size_t stride, int j0, int j1, float scale, int d, float &m, float &l,
                            float (&o)[KPL])
{
    int lane = threadIdx.x & 31;
    for (int j = j0; j < j1; j++) {
        const float *kr = K + (size_t)j * stride, *vr = V + (size_t)j * stride;
        float part = 0.0f;
#pragma unroll
        for (int k = 0; k < KPL; k++) {
            int c = lane + 32 * k;
            if (c < d)
                part += qv[k] * kr[c];
        }
        float sc = warp_sum(part) * scale;
        float m_new = fmaxf(m, sc);
        float alpha = expf(m - m_new), pr = expf(sc - m_new);
        l = l * alpha + pr;
#pragma unroll
        for (int k = 0; k < KPL; k++) {
            int c = lane + 32 * k;
            o[k] = o[k] * alpha + (c < d ? pr * vr[c] : 0.0f);
        }
        m = m_new;
    }
}

template <int KPL>
__device__ float warp_finish(float m, float l, float (&o)[KPL])
{
    if (l > 0.0f) {
        float inv = 1.0f / l;
#pragma unroll
        for (int k = 0; k < KPL; k++)
            o[k] *= inv;
        return m + logf(l);
    }
#pragma unroll
    for (int k = 0; k < KPL; k++)
        o[k] = 0.0f;
    return -INFINITY;
}

template <int KPL>
__global__ void simple_cmp_kernel(float *o_cmp, float *lse3, const float *q, const float *kc,
                                  const float *vc, attn_shape s)
{
    int lane = threadIdx.x & 31;
    size_t rows = (size_t)s.B * s.Tq * s.H, stride = (size_t)s.G * s.d;
    for (size_t row = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32; row < rows;
         row += (size_t)gridDim.x * blockDim.x / 32) {
        int h = (int)(row % s.H), tq = (int)((row / s.H) % s.Tq), b = (int)(row / s.H / s.Tq);
        int g = h / s.hpg, t = s.q_start + tq;
        float qv[KPL], o[KPL];
#pragma unroll
        for (int k = 0; k < KPL; k++) {
            int c = lane + 32 * k;
            qv[k] = c < s.d ? q[row * s.d + c] : 0.0f;
            o[k] = 0.0f;
        }
        float m = -INFINITY, l = 0.0f;
        size_t base = (size_t)b * s.Tc * stride + (size_t)g * s.d;
        warp_attend<KPL>(qv, kc + base, vc + base, stride, 0, visible_cmp(s, t), s.scale, s.d, m,
                         l, o);
        float lse = warp_finish<KPL>(m, l, o);
#pragma unroll
        for (int k = 0; k < KPL; k++) {
            int c = lane + 32 * k;
            if (c < s.d)
                o_cmp[row * s.d + c] = o[k];
        }
        if (lane == 0)
            lse3[row * 3 + 0] = lse;
    }
}

template <int KPL>
__global__ void simple_slcwin_kernel(float *out, float *o_slc, float *o_win, float *lse3,
                                     const float *o_cmp, const float *q, const float *k,
                                     const float *v, const float *gates, const int32_t *idx,
                                     attn_shape s)
{
    int lane = threadIdx.x & 31;
    size_t rows = (size_t)s.B * s.Tq * s.H, stride = (size_t)s.G * s.d;
    for (size_t row = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32; row < rows;
         row += (size_t)gridDim.x * blockDim.x / 32) {
        int h = (int)(row % s.H), tq = (int)((row / s.H) % s.Tq), b = (int)(row / s.H / s.Tq);
        int g = h / s.hpg, t = s.q_start + tq;
        float qv[KPL], os[KPL], ow[KPL];
#pragma unroll
        for (int kk = 0; kk < KPL; kk++) {
            int c = lane + 32 * kk;
            qv[kk] = c < s.d ? q[row * s.d + c] : 0.0f;
            os[kk] = ow[kk] = 0.0f;
        }
        size_t base = (size_t)b * s.T * stride + (size_t)g * s.d;
        const int32_t *sel = idx + (((size_t)b * s.Tq + tq) * s.G + g) * s.n;
        float m = -INFINITY, l = 0.0f;
        for (int i = 0; i < s.n; i++) {
            int blk = sel[i];
            if (blk < 0)
                continue;
            int start = blk * s.b, end = min(start + s.b, t + 1);
            warp_attend<KPL>(qv, k + base, v + base, stride, start, end, s.scale, s.d, m, l, os);
        }
        float lse_slc = warp_finish<KPL>(m, l, os);
        m = -INFINITY;
        l = 0.0f;
        warp_attend<KPL>(qv, k + base, v + base, stride, max(0, t - s.w + 1), t + 1, s.scale, s.d,
                         m, l, ow);
        float lse_win = warp_finish<KPL>(m, l, ow);
        const float *gt = gates + row * 3;
        float g0 = gt[0], g1 = gt[1], g2 = gt[2];
#pragma unroll
        for (int kk = 0; kk < KPL; kk++) {
            int c = lane + 32 * kk;
            if (c < s.d) {
                out[row * s.d + c] = g0 * o_cmp[row * s.d + c] + g1 * os[kk] + g2 * ow[kk];
                if (o_slc) {
                    o_slc[row * s.d + c] = os[kk];
                    o_win[row * s.d + c] = ow[kk];
                }
            }
        }
        if (lane == 0 && lse3) {
            lse3[row * 3 + 1] = lse_slc;
            lse3[row * 3 + 2] = lse_win;
        }
    }
}

// Backward of one path for one row (warp): dq (registers) +=, dK, dV (global) += with
// atomics.
template <int KPL>
__device__ void warp_attend_backward(const float (&qv)[KPL], const float (&dov)[KPL], float Dp,
                                     float lse, const float *K, const float *V, float *dK,
                                     float *dV, size_t stride, int j0, int j1, float scale, int d,
                                     float (&dq)[KPL])
{
    int lane = threadIdx.x & 31;
    if (lse == -INFINITY)
        return;
    for (int j = j0; j < j1; j++) {
        const float *kr = K + (size_t)j * stride, *vr = V + (size_t)j * stride;
        float ps = 0.0f, pd = 0.0f;
#pragma unroll
        for (int k = 0; k < KPL; k++) {
            int c = lane + 32 * k;
            if (c < d) {
                ps += qv[k] * kr[c];
                pd += dov[k] * vr[c];
            }
        }
        ps = warp_sum(ps);
        pd = warp_sum(pd);
        float p = expf(scale * ps - lse);
        float ds = p * (pd - Dp) * scale;
#pragma unroll
        for (int k = 0; k < KPL; k++) {
            int c = lane + 32 * k;
            if (c < d) {
                dq[k] += ds * kr[c];
                atomicAdd(dK + (size_t)j * stride + c, ds * qv[k]);
                atomicAdd(dV + (size_t)j * stride + c, p * dov[k]);
            }
        }
    }
}

template <int KPL>
__global__ void simple_backward_kernel(float *dq, float *dk, float *dv, float *dkc, float *dvc,
                                       float *dgates, const float *q, const float *k,
                                       const float *v, const float *kc, const float *vc,
                                       const float *gates, const int32_t *idx,
                                       const float *o_paths, const float *lse3, const float *dout,
                                       attn_shape s)
{
    int lane = threadIdx.x & 31;
    size_t rows = (size_t)s.B * s.T * s.H, stride = (size_t)s.G * s.d;
    size_t path_size = rows * s.d;
    for (size_t row = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32; row < rows;
         row += (size_t)gridDim.x * blockDim.x / 32) {
        int h = (int)(row % s.H), t = (int)((row / s.H) % s.T), b = (int)(row / s.H / s.T);
        int g = h / s.hpg;
        float qv[KPL], dor[KPL], dqv[KPL];
#pragma unroll
        for (int kk = 0; kk < KPL; kk++) {
            int c = lane + 32 * kk;
            qv[kk] = c < s.d ? q[row * s.d + c] : 0.0f;
            dor[kk] = c < s.d ? dout[row * s.d + c] : 0.0f;
            dqv[kk] = 0.0f;
        }
        size_t base = (size_t)b * s.T * stride + (size_t)g * s.d;
        size_t cbase = (size_t)b * s.Tc * stride + (size_t)g * s.d;
        for (int path = 0; path < 3; path++) {
            const float *o = o_paths + path * path_size + row * s.d;
            float gate = gates[row * 3 + path];
            float dg = 0.0f, dpp = 0.0f, dov[KPL];
#pragma unroll
            for (int kk = 0; kk < KPL; kk++) {
                int c = lane + 32 * kk;
                float oc = c < s.d ? o[c] : 0.0f;
                dov[kk] = gate * dor[kk];
                dg += dor[kk] * oc;
                dpp += dov[kk] * oc;
            }
            dg = warp_sum(dg);
            float Dp = warp_sum(dpp);
            if (lane == 0)
                dgates[row * 3 + path] = dg;
            float l = lse3[row * 3 + path];
            if (path == 0) {
                warp_attend_backward<KPL>(qv, dov, Dp, l, kc + cbase, vc + cbase, dkc + cbase,
                                          dvc + cbase, stride, 0, visible_cmp(s, t), s.scale, s.d,
                                          dqv);
            } else if (path == 1) {
                const int32_t *sel = idx + (((size_t)b * s.T + t) * s.G + g) * s.n;
                for (int i = 0; i < s.n; i++) {
                    int blk = sel[i];
                    if (blk < 0)
                        continue;
                    int start = blk * s.b, end = min(start + s.b, t + 1);
                    warp_attend_backward<KPL>(qv, dov, Dp, l, k + base, v + base, dk + base,
                                              dv + base, stride, start, end, s.scale, s.d, dqv);
                }
            } else {
                warp_attend_backward<KPL>(qv, dov, Dp, l, k + base, v + base, dk + base, dv + base,
                                          stride, max(0, t - s.w + 1), t + 1, s.scale, s.d, dqv);
            }
        }
#pragma unroll
        for (int kk = 0; kk < KPL; kk++) {
            int c = lane + 32 * kk;
            if (c < s.d)
                dq[row * s.d + c] = dqv[kk];
        }
    }
}

// ---------------------------------------------------------------------------------------
// Launchers

#define SIMPLE_THREADS 128

template <int KPL>
static nsa_status simple_forward(nsa_context *ctx, const attn_shape &s, int phase, float *out,
                                 float *o_cmp, float *o_slc, float *o_win, float *lse3,
                                 const float *q, const float *k, const float *v, const float *kc,
                                 const float *vc, const float *gates, const int32_t *idx)
{
    cudaStream_t st = nsa__cuda_stream(ctx);
    size_t rows = (size_t)s.B * s.Tq * s.H;
    unsigned blocks = nsa__cuda_blocks(rows * 32, SIMPLE_THREADS);
    if (phase == 0) {
        simple_cmp_kernel<KPL><<<blocks, SIMPLE_THREADS, 0, st>>>(o_cmp, lse3, q, kc, vc, s);
        NSA_CUDA_LAUNCHED("simple_cmp_kernel");
    } else {
        simple_slcwin_kernel<KPL><<<blocks, SIMPLE_THREADS, 0, st>>>(out, o_slc, o_win, lse3,
                                                                     o_cmp, q, k, v, gates, idx, s);
        NSA_CUDA_LAUNCHED("simple_slcwin_kernel");
    }
    return NSA_OK;
}

nsa_status nsa__cuda_attn_simple_forward(nsa_context *ctx, const attn_shape &s, int phase,
                                         float *out, float *o_cmp, float *o_slc, float *o_win,
                                         float *lse3, const float *q, const float *k,
                                         const float *v, const float *kc, const float *vc,
                                         const float *gates, const int32_t *idx)
{
#define SIMPLE_FWD(KPL)                                                                         \
    return simple_forward<KPL>(ctx, s, phase, out, o_cmp, o_slc, o_win, lse3, q, k, v, kc, vc,  \
                               gates, idx)
    if (s.d <= 32)
        SIMPLE_FWD(1);
    if (s.d <= 64)
        SIMPLE_FWD(2);
    if (s.d <= 128)
        SIMPLE_FWD(4);
    if (s.d <= 256)
        SIMPLE_FWD(8);
    if (s.d <= 512)
        SIMPLE_FWD(16);
    SIMPLE_FWD(32);
#undef SIMPLE_FWD
}

template <int KPL>
static nsa_status simple_backward(nsa_context *ctx, const attn_shape &s, float *dq, float *dk,
                                  float *dv, float *dkc, float *dvc, float *dgates, const float *q,
                                  const float *k, const float *v, const float *kc,
                                  const float *vc, const float *gates, const int32_t *idx,
                                  const float *o_paths, const float *lse, const float *dout)
{
    cudaStream_t st = nsa__cuda_stream(ctx);
    size_t rows = (size_t)s.B * s.T * s.H;
    simple_backward_kernel<KPL><<<nsa__cuda_blocks(rows * 32, SIMPLE_THREADS), SIMPLE_THREADS, 0,
                                  st>>>(dq, dk, dv, dkc, dvc, dgates, q, k, v, kc, vc, gates, idx,
                                        o_paths, lse, dout, s);
    NSA_CUDA_LAUNCHED("simple_backward_kernel");
    return NSA_OK;
}

nsa_status nsa__cuda_attn_simple_backward(nsa_context *ctx, const attn_shape &s, float *dq,
                                          float *dk, float *dv, float *dkc, float *dvc,
                                          float *dgates, const float *q, const float *k,
                                          const float *v, const float *kc, const float *vc,
                                          const float *gates, const int32_t *idx,
                                          const float *o_paths, const float *lse,
                                          const float *dout)
{
    cudaStream_t st = nsa__cuda_stream(ctx);
    size_t nkv = (size_t)s.B * s.T * s.G * s.d, nkvc = (size_t)s.B * s.Tc * s.G * s.d;
    NSA_CUDA_TRY(cudaMemsetAsync(dk, 0, nkv * sizeof(float), st));
    NSA_CUDA_TRY(cudaMemsetAsync(dv, 0, nkv * sizeof(float), st));
    if (nkvc) {
        NSA_CUDA_TRY(cudaMemsetAsync(dkc, 0, nkvc * sizeof(float), st));
        NSA_CUDA_TRY(cudaMemsetAsync(dvc, 0, nkvc * sizeof(float), st));
    }
#define SIMPLE_BWD(KPL)                                                                         \
    return simple_backward<KPL>(ctx, s, dq, dk, dv, dkc, dvc, dgates, q, k, v, kc, vc, gates,   \
                                idx, o_paths, lse, dout)
    if (s.d <= 32)
        SIMPLE_BWD(1);
    if (s.d <= 64)
        SIMPLE_BWD(2);
    if (s.d <= 128)
        SIMPLE_BWD(4);
    if (s.d <= 256)
        SIMPLE_BWD(8);
    if (s.d <= 512)
        SIMPLE_BWD(16);
    SIMPLE_BWD(32);
#undef SIMPLE_BWD
}
