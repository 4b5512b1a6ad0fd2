/*
 * attention_bf16.cuh — what the bf16 tensor-core attention files share: the tile of query
 * rows, the double-buffered key chunks in shared memory, fragment loads of the tile's rows,
 * and the forward step (S = Q K^T on tensor cores, online softmax in registers, O += P V).
 *
 * A thread block of 4 warps owns MB = 64 query rows of one (batch, kv head): consecutive
 * (position, query head) pairs, so all H/G heads of a kv group share each key chunk loaded
 * (the paper's group-centric tile). Warp w owns rows 16w..16w+15 (one m16 tile). Key chunks
 * of NB = 64 rows (keys or compressed tokens) stream through two shared-memory stages filled
 * by cp.async while the other is used. Operands are bf16 rows padded to DP + 8 elements
 * (16 bytes: ldmatrix reads of 8 rows hit 8 different bank groups); accumulation is fp32.
 *
 *   attention_bf16.cu           forward kernels and the bf16 forward op
 *   attention_bf16_backward.cu  backward kernels and the bf16 backward op
 */
#ifndef NSA_CUDA_ATTENTION_BF16_CUH
#define NSA_CUDA_ATTENTION_BF16_CUH

#include "cuda/attention.cuh"
#include "cuda/mma.cuh"

#define MB 64 // query rows per thread block
#define NB 64 // keys per chunk
#define MMA_THREADS 128

typedef __nv_bfloat16 bf16;

template <int DP> struct mcfg {
    static const int LD = DP + 8;  // padded row, in bf16 elements
    static const int KS = DP / 16; // k-steps over the head dim
    static const int NT = DP / 8;  // n-tiles over the head dim
    static const size_t TILE = (size_t)NB * LD * sizeof(bf16); // one 64-row tile in bytes
};

static const float LOG2E = 1.4426950408889634f;
static const float LN2 = 0.6931471805599453f;

// Rows key0 .. key0 + cnt - 1 (rows base + key * stride of X, d columns) into a padded
// 64-row tile by cp.async; rows past cnt and columns past d are zero. d % 8 == 0 and X
// 16-byte aligned (the launchers check).
template <int DP>
__device__ __forceinline__ void load_tile(bf16 *dst, const bf16 *X, size_t base, size_t stride,
                                          int key0, int cnt, int d)
{
    const int CH = DP / 8; // 16-byte chunks per row
    for (int e = threadIdx.x; e < NB * CH; e += MMA_THREADS) {
        int kk = e / CH, c = (e % CH) * 8;
        bool ok = kk < cnt && c < d;
        const bf16 *src = ok ? X + base + (size_t)(key0 + kk) * stride + c : X;
        cp_async16(dst + kk * mcfg<DP>::LD + c, src, ok ? 16 : 0);
    }
}

// The tile's query rows (tile_rows tr) of X [rows, d] into a padded tile.
template <int DP>
__device__ __forceinline__ void load_row_tile(bf16 *dst, const bf16 *X, const tile_rows *tr, int d)
{
    const int CH = DP / 8;
    for (int e = threadIdx.x; e < MB * CH; e += MMA_THREADS) {
        int r = e / CH, c = (e % CH) * 8;
        bool ok = tr->t[r] >= 0 && c < d;
        const bf16 *src = ok ? X + (size_t)tr->row[r] * d + c : X;
        cp_async16(dst + r * mcfg<DP>::LD + c, src, ok ? 16 : 0);
    }
}

// A fragments of the warp's 16 rows of a padded row tile, every k-step of the head dim.
template <int DP>
__device__ __forceinline__ void load_a_frags(uint32_t (&af)[DP / 16][4], const bf16 *tile,
                                             int warp, int lane)
{
    int mi = lane / 8, r = lane % 8;
#pragma unroll
    for (int ks = 0; ks < DP / 16; ks++)
        ldmatrix_x4(af[ks], tile + (warp * 16 + (mi % 2) * 8 + r) * mcfg<DP>::LD + ks * 16 +
                                (mi / 2) * 8);
}

// s[nt] (16 rows x 64 keys) = A (16 x DP, fragments) B^T, B a padded 64-row tile.
template <int DP>
__device__ __forceinline__ void mma_rows_keys(float (&s)[8][4], const uint32_t (&af)[DP / 16][4],
                                              const bf16 *Bt, int lane)
{
#pragma unroll
    for (int nt = 0; nt < 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            s[nt][e] = 0.0f;
    int mi = lane / 8, r = lane % 8;
#pragma unroll
    for (int ks = 0; ks < DP / 16; ks++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            uint32_t b[4];
            ldmatrix_x4(b, Bt + (16 * j + (mi / 2) * 8 + r) * mcfg<DP>::LD + ks * 16 + (mi % 2) * 8);
            mma_bf16(s[2 * j], af[ks], b[0], b[1]);
            mma_bf16(s[2 * j + 1], af[ks], b[2], b[3]);
        }
}

// o[nt] (16 rows x DP) += P (16 x 64 keys, C fragments) V, V a padded 64-row tile.
template <int DP>
__device__ __forceinline__ void mma_p_v(float (&o)[DP / 8][4], const float (&p)[8][4],
                                        const bf16 *Vt, int lane)
{
    int mi = lane / 8, r = lane % 8;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        uint32_t a[4];
        c_to_a(a, p[2 * j], p[2 * j + 1]);
#pragma unroll
        for (int n2 = 0; n2 < DP / 16; n2++) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, Vt + (16 * j + (mi % 2) * 8 + r) * mcfg<DP>::LD + n2 * 16 +
                                     (mi / 2) * 8);
            mma_bf16(o[2 * n2], a, b[0], b[1]);
            mma_bf16(o[2 * n2 + 1], a, b[2], b[3]);
        }
    }
}

// Online-softmax state of a warp's rows g and g + 8 (in log2 units: m is a max of
// score * scale * log2 e).
template <int DP> struct mma_acc {
    float m[2], l[2], o[DP / 8][4];
    __device__ __forceinline__ void reset()
    {
        m[0] = m[1] = -INFINITY;
        l[0] = l[1] = 0.0f;
#pragma unroll
        for (int nt = 0; nt < DP / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                o[nt][e] = 0.0f;
    }
    // Normalises o; lse[i] (natural log) of row g + 8 i, -inf for a row with no key.
    __device__ __forceinline__ void finish(float (&lse)[2])
    {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
            lse[i] = l[i] > 0.0f ? (m[i] + log2f(l[i])) * LN2 : -INFINITY;
#pragma unroll
            for (int nt = 0; nt < DP / 8; nt++) {
                o[nt][2 * i] *= inv;
                o[nt][2 * i + 1] *= inv;
            }
        }
    }
};

// One key chunk of the forward for one warp: scores, mask ok(i, kk) (row g + 8 i, key kk
// of the chunk), online softmax, O += P V.
template <int DP, class Ok>
__device__ __forceinline__ void mma_fwd_step(mma_acc<DP> &acc, const uint32_t (&qf)[DP / 16][4],
                                             const bf16 *Kt, const bf16 *Vt, float sl2, int lane,
                                             Ok ok)
{
    float s[8][4];
    mma_rows_keys<DP>(s, qf, Kt, lane);
    int c = lane % 4;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int i = e / 2, kk = nt * 8 + 2 * c + (e & 1);
            float x = ok(i, kk) ? s[nt][e] * sl2 : -INFINITY;
            s[nt][e] = x;
            mx[i] = fmaxf(mx[i], x);
        }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        float m_new = fmaxf(acc.m[i], quad_max(mx[i]));
        float alpha = m_new == -INFINITY ? 1.0f : exp2f(acc.m[i] - m_new);
        float base = m_new == -INFINITY ? 0.0f : m_new;
        float rs = 0.0f;
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            float p0 = exp2f(s[nt][2 * i] - base), p1 = exp2f(s[nt][2 * i + 1] - base);
            s[nt][2 * i] = p0;
            s[nt][2 * i + 1] = p1;
            rs += p0 + p1;
        }
        acc.l[i] = acc.l[i] * alpha + quad_sum(rs);
        acc.m[i] = m_new;
#pragma unroll
        for (int nt = 0; nt < DP / 8; nt++) {
            acc.o[nt][2 * i] *= alpha;
            acc.o[nt][2 * i + 1] *= alpha;
        }
    }
    mma_p_v<DP>(acc.o, s, Vt, lane);
}

// s[nt] (16 rows x 64 keys) = A B^T with the warp's 16 rows of A read from a padded tile in
// shared memory (rows a_row0 ..) at each k-step instead of held in registers.
template <int DP>
__device__ __forceinline__ void mma_rows_keys_sa(float (&s)[8][4], const bf16 *At, int a_row0,
                                                 const bf16 *Bt, int lane)
{
#pragma unroll
    for (int nt = 0; nt < 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            s[nt][e] = 0.0f;
    int mi = lane / 8, r = lane % 8;
#pragma unroll
    for (int ks = 0; ks < DP / 16; ks++) {
        uint32_t a[4];
        ldmatrix_x4(a, At + (a_row0 + (mi % 2) * 8 + r) * mcfg<DP>::LD + ks * 16 + (mi / 2) * 8);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            uint32_t b[4];
            ldmatrix_x4(b, Bt + (16 * j + (mi / 2) * 8 + r) * mcfg<DP>::LD + ks * 16 + (mi % 2) * 8);
            mma_bf16(s[2 * j], a, b[0], b[1]);
            mma_bf16(s[2 * j + 1], a, b[2], b[3]);
        }
    }
}

// Streams nch key chunks through the two stages: where(i, key0, cnt) names chunk i (rows
// key0 .. key0 + cnt - 1 of K and V, or of K alone when V is NULL); body(i, key0, cnt, Kt,
// Vt) runs on every thread once chunk i is in shared memory. All threads call it.
template <int DP, class Where, class Body>
__device__ __forceinline__ void stream_chunks(bf16 *Ks, bf16 *Vs, const bf16 *K, const bf16 *V,
                                              size_t base, size_t stride, int d, int nch,
                                              Where where, Body body)
{
    const int LD = mcfg<DP>::LD;
    if (nch > 0) {
        int key0, cnt;
        where(0, key0, cnt);
        load_tile<DP>(Ks, K, base, stride, key0, cnt, d);
        if (V)
            load_tile<DP>(Vs, V, base, stride, key0, cnt, d);
    }
    cp_async_commit();
    for (int i = 0; i < nch; i++) {
        int stg = i & 1;
        if (i + 1 < nch) {
            int k1, c1;
            where(i + 1, k1, c1);
            load_tile<DP>(Ks + (stg ^ 1) * NB * LD, K, base, stride, k1, c1, d);
            if (V)
                load_tile<DP>(Vs + (stg ^ 1) * NB * LD, V, base, stride, k1, c1, d);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        int key0, cnt;
        where(i, key0, cnt);
        body(i, key0, cnt, Ks + stg * NB * LD, Vs + stg * NB * LD);
        __syncthreads();
    }
}

// Stores a warp's rows of o (C fragment layout, DP columns) as fp32 into dst rows
// ([rows][d]); the thread's rows are warp*16 + g + 8 i.
template <int DP>
__device__ __forceinline__ void store_frag_rows(float *dst, const tile_rows *tr,
                                                const float (&o)[DP / 8][4], int warp, int lane,
                                                int d)
{
    int g = lane / 4, c = lane % 4;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        int r = warp * 16 + g + 8 * i;
        if (tr->t[r] < 0)
            continue;
        float *row = dst + (size_t)tr->row[r] * d;
#pragma unroll
        for (int nt = 0; nt < DP / 8; nt++) {
            int col = nt * 8 + 2 * c;
            if (col < d)
                *reinterpret_cast<float2 *>(row + col) = make_float2(o[nt][2 * i], o[nt][2 * i + 1]);
        }
    }
}

// Positions a tile of MB rows can span.
static inline __host__ __device__ int tile_positions(int hpg)
{
    return MB / hpg + 2;
}

// The union of the selections of positions t_first .. t_last (kv head g, batch b) as an
// ascending list of blocks: sidx[(t - t_first) * n + slot] = the rows of idx,
// ulist[0 .. *nunion) the blocks; bitmap holds ceil(blocks / 32) words. All threads call it.
static __device__ void build_union(int *sidx, int *ulist, int *nunion, unsigned *bitmap,
                                   const int32_t *idx, const attn_shape &s, int b, int g,
                                   int t_first, int t_last)
{
    int lane = threadIdx.x % 32;
    int nbw = (num_candidates(s, t_last) + 31) / 32;
    int tq_first = t_first - s.q_start, ntq = t_last - t_first + 1;
    __syncthreads(); // earlier users of the buffers are done
    for (int e = threadIdx.x; e < nbw; e += blockDim.x)
        bitmap[e] = 0u;
    for (int e = threadIdx.x; e < ntq * s.n; e += blockDim.x)
        sidx[e] = idx[(((size_t)b * s.Tq + tq_first + e / s.n) * s.G + g) * s.n + e % s.n];
    __syncthreads();
    for (int e = threadIdx.x; e < ntq * s.n; e += blockDim.x) {
        int blk = sidx[e];
        if (blk >= 0)
            atomicOr(&bitmap[blk / 32], 1u << (blk % 32));
    }
    __syncthreads();
    if (threadIdx.x < 32) {
        int count = 0;
        for (int w0 = 0; w0 < nbw; w0 += 32) {
            unsigned bits = w0 + lane < nbw ? bitmap[w0 + lane] : 0u;
            int pc = __popc(bits), incl = pc;
            for (int o = 1; o < 32; o <<= 1) {
                int x = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o)
                    incl += x;
            }
            int pos = count + incl - pc;
            while (bits) {
                ulist[pos++] = (w0 + lane) * 32 + __ffs(bits) - 1;
                bits &= bits - 1;
            }
            count += __shfl_sync(0xffffffffu, incl, 31);
        }
        if (lane == 0)
            *nunion = count;
    }
    __syncthreads();
}

// Does row list lst[n] (any order, -1 for none) hold block u.
static __device__ __forceinline__ bool holds(const int *lst, int n, int u)
{
    bool in = false;
    for (int slot = 0; slot < n; slot++)
        in |= lst[slot] == u;
    return in;
}

// Is the bf16 tensor-core path available for this shape and these pointers.
static inline int bf16_supported(const attn_shape &s, const void *const *ptrs, int nptrs)
{
    if (s.d % 8 != 0 || s.d > 128)
        return 0;
    for (int i = 0; i < nptrs; i++)
        if (ptrs[i] && (uintptr_t)ptrs[i] % 16 != 0)
            return 0;
    return 1;
}


#endif // NSA_CUDA_ATTENTION_BF16_CUH
