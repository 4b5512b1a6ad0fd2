/*
 * attention_select.cu — block scoring and top-n selection (SPEC §3.2) where the tiled
 * forward does not fuse it: mean_key always, cmp_attn with the simple kernels or when the
 * fused scoring does not fit. One block of 128 threads per (position, kv head); a warp
 * picks the top n.
 */
#include "cuda/attention.cuh"

// ---------------------------------------------------------------------------------------
// Selection kernels outside the tiled forward: mean_key (always) and cmp_attn (simple
// kernels, or when the fused scoring does not apply). One block per (position, kv head).

// kcum[b,t,g] = sum of k[b,s,g] from the start of t's block to t (the CPU's prefix sums,
// in its order).
__global__ void block_prefix_kernel(float *kcum, const float *k, attn_shape s)
{
    size_t n = (size_t)s.B * s.G * s.d * s.nb;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n;
         e += (size_t)gridDim.x * blockDim.x) {
        int c = (int)(e % s.d);
        size_t rest = e / s.d;
        int g = (int)(rest % s.G);
        rest /= s.G;
        int blk = (int)(rest % s.nb);
        int b = (int)(rest / s.nb);
        int t0 = blk * s.b, t1 = min(t0 + s.b, s.T);
        float acc = 0.0f;
        for (int t = t0; t < t1; t++) {
            size_t i = (((size_t)b * s.T + t) * s.G + g) * s.d + c;
            acc = t == t0 ? k[i] : __fadd_rn(acc, k[i]);
            kcum[i] = acc;
        }
    }
}

__global__ void select_meankey_kernel(int32_t *idx, const float *q, const float *kcum,
                                      attn_shape s)
{
    extern __shared__ float smem[];
    int tq = blockIdx.x, g = blockIdx.y, b = blockIdx.z, t = s.q_start + tq;
    int num_cand = num_candidates(s, t);
    float *qsum = smem, *score = qsum + s.d;
    int *tmp = (int *)(score + s.nb);
    for (int c = threadIdx.x; c < s.d; c += blockDim.x) {
        float acc = 0.0f;
        for (int hh = 0; hh < s.hpg; hh++)
            acc = __fadd_rn(acc, q[(((size_t)b * s.Tq + tq) * s.H + g * s.hpg + hh) * s.d + c]);
        qsum[c] = acc;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < num_cand; i += blockDim.x) {
        int last = min((i + 1) * s.b - 1, t);
        int count = last - i * s.b + 1;
        const float *ks = kcum + (((size_t)b * s.T + last) * s.G + g) * s.d;
        float dot = 0.0f;
        for (int c = 0; c < s.d; c++)
            dot = __fadd_rn(dot, __fmul_rn(qsum[c], ks[c]));
        score[i] = dot / (float)count;
    }
    __syncthreads();
    if (threadIdx.x < 32)
        warp_select(score, num_cand, s.n, s.fixed, idx + (((size_t)b * s.Tq + tq) * s.G + g) * s.n,
                    tmp);
}

// cmp_attn: score(i) = sum over the group's heads and the visible compressed tokens j
// overlapping block i of exp(s_j - lse). Heads outer, tokens in order, as on the CPU.
#define SEL_CHUNK 128
__global__ void select_cmpattn_kernel(int32_t *idx, const float *q, const float *kc,
                                      const float *lse3, attn_shape s)
{
    extern __shared__ float smem[];
    int tq = blockIdx.x, g = blockIdx.y, b = blockIdx.z, t = s.q_start + tq;
    int num_cand = num_candidates(s, t), nc = visible_cmp(s, t);
    float *qrow = smem, *p = qrow + s.d, *score = p + SEL_CHUNK;
    int *tmp = (int *)(score + s.nb);
    for (int i = threadIdx.x; i < num_cand; i += blockDim.x)
        score[i] = 0.0f;
    size_t kv_stride = (size_t)s.G * s.d;
    const float *kcb = kc + (size_t)b * s.Tc * kv_stride + (size_t)g * s.d;
    for (int hh = 0; hh < s.hpg; hh++) {
        size_t row = ((size_t)b * s.Tq + tq) * s.H + g * s.hpg + hh;
        float l = lse3[row * 3 + 0];
        __syncthreads();
        for (int c = threadIdx.x; c < s.d; c += blockDim.x)
            qrow[c] = q[row * s.d + c];
        for (int j0 = 0; j0 < nc; j0 += SEL_CHUNK) {
            __syncthreads();
            int j = j0 + threadIdx.x;
            if (threadIdx.x < SEL_CHUNK && j < nc) {
                const float *kr = kcb + (size_t)j * kv_stride;
                float dot = 0.0f;
                for (int c = 0; c < s.d; c++)
                    dot = __fadd_rn(dot, __fmul_rn(qrow[c], kr[c]));
                p[threadIdx.x] = expf(__fmul_rn(s.scale, dot) - l);
            }
            __syncthreads();
            int j_end = min(j0 + SEL_CHUNK, nc) - 1;
            int i_lo, i_hi;
            blocks_of_tokens(s, j0, j_end, i_lo, i_hi);
            i_hi = min(i_hi, num_cand - 1);
            for (int i = i_lo + (int)threadIdx.x; i <= i_hi; i += blockDim.x) {
                int jl, jh;
                tokens_of_block(s, i, j0, j_end, jl, jh);
                float acc = score[i];
                for (int jj = jl; jj <= jh; jj++)
                    acc += p[jj - j0];
                score[i] = acc;
            }
        }
    }
    __syncthreads();
    if (threadIdx.x < 32)
        warp_select(score, num_cand, s.n, s.fixed, idx + (((size_t)b * s.Tq + tq) * s.G + g) * s.n,
                    tmp);
}

nsa_status nsa__cuda_attn_select(nsa_context *ctx, const attn_shape &s, int mean_key, int32_t *idx,
                                 const float *q, const float *k, const float *kc,
                                 const float *lse3, float *kcum)
{
    cudaStream_t st = nsa__cuda_stream(ctx);
    if (mean_key) {
        size_t ne = (size_t)s.B * s.G * s.d * s.nb;
        block_prefix_kernel<<<nsa__cuda_blocks(ne, 128), 128, 0, st>>>(kcum, k, s);
        NSA_CUDA_LAUNCHED("block_prefix_kernel");
        size_t bytes = ((size_t)s.d + s.nb) * sizeof(float) + (size_t)s.n * sizeof(int);
        NSA_TRY(allow_smem(ctx, select_meankey_kernel, bytes));
        select_meankey_kernel<<<dim3(s.Tq, s.G, s.B), 128, bytes, st>>>(idx, q, kcum, s);
        NSA_CUDA_LAUNCHED("select_meankey_kernel");
    } else {
        size_t bytes = ((size_t)s.d + SEL_CHUNK + s.nb) * sizeof(float) + (size_t)s.n * sizeof(int);
        NSA_TRY(allow_smem(ctx, select_cmpattn_kernel, bytes));
        select_cmpattn_kernel<<<dim3(s.Tq, s.G, s.B), 128, bytes, st>>>(idx, q, kc, lse3, s);
        NSA_CUDA_LAUNCHED("select_cmpattn_kernel");
    }
    return NSA_OK;
}
