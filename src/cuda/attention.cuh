/*
 * attention.cuh — what the attention files of the CUDA backend share: the resolved shape,
 * position arithmetic, the top-n selection by one warp, the tiles of the tiled kernels
 * (shared-memory layouts, the 4x4 register-blocked products, the online softmax) and the
 * launchers each file exports.
 *
 *   attention.cu           forward kernels (tiled) and the two ops (dispatch)
 *   attention_backward.cu  backward kernels (tiled)
 *   attention_select.cu    block scoring + top-n outside the fused forward
 *   attention_simple.cu    warp-per-row kernels (any head_dim; NSA_CUDA_ATTN=simple)
 */
#ifndef NSA_CUDA_ATTENTION_CUH
#define NSA_CUDA_ATTENTION_CUH

#include "cuda/common.cuh"

#include <math.h>

// ---------------------------------------------------------------------------------------
// Shapes

typedef struct attn_shape {
    int B, T, H, G, d, hpg; // hpg = H / G query heads per kv head
    int Tq, q_start;        // query rows per batch entry, position of the first
    int b, w, r, l, n, Tc, nb;
    float scale;
    int fixed;
} attn_shape;

static inline attn_shape shape_of(const nsa__attn_dims *dm)
{
    attn_shape s;
    s.B = dm->B;
    s.T = dm->T;
    s.H = dm->H;
    s.G = dm->G;
    s.d = dm->d;
    s.hpg = dm->H / dm->G;
    s.q_start = dm->q_start;
    s.Tq = dm->T - dm->q_start;
    s.b = dm->block_size;
    s.w = dm->window;
    s.r = dm->cmp_stride;
    s.l = dm->cmp_len;
    s.n = dm->num_selected;
    s.Tc = dm->num_cmp;
    s.nb = dm->num_blocks;
    s.scale = dm->scale;
    s.fixed = dm->select_fixed == NSA_SELECT_FIXED_PAPER;
    return s;
}

// Number of compressed tokens visible to position t: j*r + l - 1 <= t.
static __device__ __forceinline__ int visible_cmp(const attn_shape &s, int t)
{
    if (t < s.l - 1)
        return 0;
    int nc = (t - s.l + 1) / s.r + 1;
    return nc < s.Tc ? nc : s.Tc;
}

static __device__ __forceinline__ int num_candidates(const attn_shape &s, int t)
{
    return t / s.b + 1;
}

// Compressed token j covers keys j r .. j r + l - 1, selection block i keys i b .. i b + b - 1.
// The blocks that tokens j0 .. j_end overlap: i_lo .. i_hi.
static __device__ __forceinline__ void blocks_of_tokens(const attn_shape &s, int j0, int j_end,
                                                        int &i_lo, int &i_hi)
{
    i_lo = j0 * s.r / s.b;
    i_hi = (j_end * s.r + s.l - 1) / s.b;
}

// The tokens among j0 .. j_end that overlap block i (j r <= (i + 1) b - 1 and
// j r + l - 1 >= i b): jl .. jh, none when jl > jh.
static __device__ __forceinline__ void tokens_of_block(const attn_shape &s, int i, int j0,
                                                       int j_end, int &jl, int &jh)
{
    int a = i * s.b - s.l + 1;
    jl = max(j0, a <= 0 ? 0 : (a + s.r - 1) / s.r);
    jh = min(j_end, ((i + 1) * s.b - 1) / s.r);
}

static __device__ __forceinline__ float warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

static __device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// ---------------------------------------------------------------------------------------
// Top-n selection by one warp: the CPU's select_blocks. score[0..num_cand) (destroyed);
// out[n] (global) = the chosen blocks ascending, -1 padded. Order: higher score first, ties
// to the lower index; with `fixed`, block 0 and the two most recent candidates are always in.
// tmp: n ints of shared memory for this warp.
//
// Each lane keeps its own best SEL_R candidates (of i = lane, lane + 32, ...) in registers,
// best first; a round takes the warp's best front by shuffles and only the owning lane pops
// it, rescanning its candidates when its list runs out. The chosen blocks are put in
// ascending order by their ranks, a lane each.

#define SEL_R 4

static __device__ __forceinline__ bool sel_better(float v, int i, float bv, int bi)
{
    return v > bv || (v == bv && i < bi); // NaN (taken or forced) is never better
}

static __device__ __forceinline__ void sel_scan(const float *score, int num_cand, int lane,
                                                float (&v)[SEL_R], int (&ix)[SEL_R])
{
#pragma unroll
    for (int r = 0; r < SEL_R; r++) {
        v[r] = -INFINITY;
        ix[r] = 0x7fffffff;
    }
    for (int i = lane; i < num_cand; i += 32) {
        float cv = score[i];
        int ci = i;
        if (!sel_better(cv, ci, v[SEL_R - 1], ix[SEL_R - 1]))
            continue;
#pragma unroll
        for (int r = 0; r < SEL_R; r++)
            if (sel_better(cv, ci, v[r], ix[r])) {
                float tv = v[r];
                int ti = ix[r];
                v[r] = cv;
                ix[r] = ci;
                cv = tv;
                ci = ti;
            }
    }
}

static __device__ void warp_select(float *score, int num_cand, int n, int fixed, int32_t *out, int *tmp)
{
    int lane = threadIdx.x & 31;
    if (num_cand <= n) {
        for (int i = lane; i < n; i += 32)
            out[i] = i < num_cand ? i : -1;
        return;
    }
    int forced = fixed ? 3 : 0, k = n - forced;
    if (fixed && lane == 0) {
        score[0] = NAN; // NaN: never chosen by the comparisons below
        score[num_cand - 2] = NAN;
        score[num_cand - 1] = NAN;
    }
    __syncwarp();
    float v[SEL_R];
    int ix[SEL_R];
    sel_scan(score, num_cand, lane, v, ix);
    for (int it = 0; it < k; it++) {
        float bv = v[0];
        int bi = ix[0];
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (sel_better(ov, oi, bv, bi)) {
                bv = ov;
                bi = oi;
            }
        }
        bool found = bi < num_cand; // (always, unless the scores held NaN)
        if (lane == 0)
            tmp[it] = found ? bi : -1;
        if (found && (bi & 31) == lane) { // the owner pops its front
            score[bi] = NAN;
#pragma unroll
            for (int r = 0; r + 1 < SEL_R; r++) {
                v[r] = v[r + 1];
                ix[r] = ix[r + 1];
            }
            v[SEL_R - 1] = -INFINITY;
            ix[SEL_R - 1] = 0x7fffffff;
            if (ix[0] == 0x7fffffff) // list run out: the lane's next best from shared memory
                sel_scan(score, num_cand, lane, v, ix);
        }
    }
    if (fixed && lane == 0) {
        tmp[k] = 0;
        tmp[k + 1] = num_cand - 2;
        tmp[k + 2] = num_cand - 1;
    }
    __syncwarp();
    // ascending, -1 last: the rank of each entry among the n (distinct apart from -1s)
    for (int j = lane; j < n; j += 32) {
        int x = tmp[j], kx = x < 0 ? 0x7fffffff : x, rank = 0;
        for (int i = 0; i < n; i++) {
            int y = tmp[i], ky = y < 0 ? 0x7fffffff : y;
            rank += ky < kx || (ky == kx && i < j);
        }
        out[rank] = x;
    }
    __syncwarp();
}

// The selections of a tile's QT positions tq0 .. (batch b, kv head g) from their block
// scores score [QT][nb], a warp per position (tmp: n ints per warp). All threads call it.
static __device__ void tile_select(float *score, int *tmp, int QT, int tq0, int b, int g,
                                   int32_t *idx, const attn_shape &s)
{
    int warp = threadIdx.x / 32;
    for (int tqi = warp; tqi < QT; tqi += blockDim.x / 32) {
        int tq = tq0 + tqi;
        if (tq >= s.Tq)
            continue;
        warp_select(score + (size_t)tqi * s.nb, num_candidates(s, s.q_start + tq), s.n, s.fixed,
                    idx + (((size_t)b * s.Tq + tq) * s.G + g) * s.n, tmp + warp * s.n);
    }
}

// ---------------------------------------------------------------------------------------
// Tiled kernels. 256 threads as a 16 x 16 grid (ty, tx); a thread owns 4 consecutive rows
// (ty*4..) and 4 consecutive keys (tx*4..) of a 64 x 64 score tile, and 4 rows x DP/16
// columns (tx*4 + 64*v ..) of a 64 x DP output tile. Operands sit in shared memory
// "k-major" (the reduction index outermost) so each step is two 16-byte loads and 16 FMAs.

#define TR 64  // rows (query position, head) per tile
#define TK 64  // keys per tile
#define PADR (TR + 4)
#define PADK (TK + 4)
#define TILE_THREADS 256

template <int DP> struct tile_dims {
    static const int NV = DP / 64; // 16-byte column groups per thread
    static const int PADD = DP + 4;
};

static __device__ __forceinline__ void ld4(float (&x)[4], const float *p)
{
    float4 v = *reinterpret_cast<const float4 *>(p);
    x[0] = v.x;
    x[1] = v.y;
    x[2] = v.z;
    x[3] = v.w;
}

// acc[i][j] += sum_k A[k][m0 + i] * B[k][n0 + j], k < K (A, B k-major, leading dims lda, ldb).
template <int K>
__device__ __forceinline__ void mm_4x4(float (&acc)[4][4], const float *A, int lda, int m0,
                                       const float *Bm, int ldb, int n0)
{
#pragma unroll 8
    for (int k = 0; k < K; k++) {
        float a[4], b[4];
        ld4(a, A + k * lda + m0);
        ld4(b, Bm + k * ldb + n0);
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++)
                acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
}

// acc[i][v*4 + e] += sum_k A[k][m0 + i] * B[k][n0 + 64 v + e], k < K.
template <int K, int NV>
__device__ __forceinline__ void mm_4xw(float (&acc)[4][NV * 4], const float *A, int lda, int m0,
                                       const float *Bm, int ldb, int n0)
{
#pragma unroll 4
    for (int k = 0; k < K; k++) {
        float a[4];
        ld4(a, A + k * lda + m0);
#pragma unroll
        for (int v = 0; v < NV; v++) {
            float b[4];
            ld4(b, Bm + k * ldb + n0 + 64 * v);
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                    acc[i][v * 4 + e] = fmaf(a[i], b[e], acc[i][v * 4 + e]);
        }
    }
}

static __device__ __forceinline__ float max16(float v)
{
    for (int o = 8; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

static __device__ __forceinline__ float sum16(float v)
{
    for (int o = 8; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Rows of a query tile: flattened (position, head) pairs of one (batch, kv head).
struct tile_rows {
    int t[TR];         // position, -1 for rows past the end
    long long row[TR]; // index of the row in q / out / gates ([B,Tq,H] order)
};

static __device__ void tile_rows_init(tile_rows *tr, const attn_shape &s, int tile, int g, int b)
{
    for (int r = threadIdx.x; r < TR; r += blockDim.x) {
        long long rg = (long long)tile * TR + r;
        int tq = (int)(rg / s.hpg), hh = (int)(rg % s.hpg);
        bool ok = tq < s.Tq;
        tr->t[r] = ok ? s.q_start + tq : -1;
        tr->row[r] = ok ? ((long long)b * s.Tq + tq) * s.H + (long long)g * s.hpg + hh : 0;
    }
}

// Xt[c][r] = X[row r][c] (zero past d and for missing rows). ld = PADR.
template <int DP>
__device__ void load_rows_t(float *Xt, const float *X, const tile_rows *tr, int d)
{
    for (int e = threadIdx.x; e < TR * DP; e += blockDim.x) {
        int r = e / DP, c = e % DP;
        float x = 0.0f;
        if (tr->t[r] >= 0 && c < d)
            x = X[(size_t)tr->row[r] * d + c];
        Xt[c * PADR + r] = x;
    }
}

// Key tile: keys key0 .. key0 + cnt - 1 of the rows base + key*stride. Kt[c][kk]
// (k-major), Vr[kk][c] (row layout, ld DP+4); either may be NULL; Vt[c][kk] / Kr[kk][c]
// likewise.
template <int DP>
__device__ void load_keys(float *Kt, float *Kr, float *Vt, float *Vr, const float *K,
                          const float *V, size_t base, size_t stride, int key0, int cnt, int d)
{
    for (int e = threadIdx.x; e < TK * DP; e += blockDim.x) {
        int kk = e / DP, c = e % DP;
        bool ok = kk < cnt && c < d;
        size_t i = base + (size_t)(key0 + kk) * stride + c;
        float kx = ok ? K[i] : 0.0f, vx = ok ? V[i] : 0.0f;
        if (Kt)
            Kt[c * PADK + kk] = kx;
        if (Kr)
            Kr[kk * (DP + 4) + c] = kx;
        if (Vt)
            Vt[c * PADK + kk] = vx;
        if (Vr)
            Vr[kk * (DP + 4) + c] = vx;
    }
}

// Online-softmax state of a thread's 4 rows.
template <int DP> struct softmax_acc {
    float m[4], l[4], o[4][tile_dims<DP>::NV * 4];
    __device__ void reset()
    {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            m[i] = -INFINITY;
            l[i] = 0.0f;
#pragma unroll
            for (int c = 0; c < tile_dims<DP>::NV * 4; c++)
                o[i][c] = 0.0f;
        }
    }
    // lse[i] of each row, o normalised (0 and -inf for rows with no key).
    __device__ void finish(float (&lse)[4])
    {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
            lse[i] = l[i] > 0.0f ? m[i] + logf(l[i]) : -INFINITY;
#pragma unroll
            for (int c = 0; c < tile_dims<DP>::NV * 4; c++)
                o[i][c] *= inv;
        }
    }
};

// One key tile of the forward: scores (masked by ok(i, j) for row ty*4+i, key tx*4+j),
// online softmax, P to shared memory, O += P V. Kt and Vr hold the tile; Pt is [TK][PADR].
template <int DP, class Mask>
__device__ void fwd_tile_step(softmax_acc<DP> &acc, const float *Qt, const float *Kt,
                              const float *Vr, float *Pt, float scale, Mask ok)
{
    int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    float sc[4][4] = {};
    mm_4x4<DP>(sc, Qt, PADR, ty * 4, Kt, PADK, tx * 4);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            sc[i][j] = ok(i, j) ? sc[i][j] * scale : -INFINITY;
            mx = fmaxf(mx, sc[i][j]);
        }
        mx = max16(mx);
        float m_new = fmaxf(acc.m[i], mx);
        float alpha = 1.0f, rs = 0.0f;
        if (m_new != -INFINITY) {
            alpha = expf(acc.m[i] - m_new);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                sc[i][j] = sc[i][j] == -INFINITY ? 0.0f : expf(sc[i][j] - m_new);
                rs += sc[i][j];
            }
        } else {
#pragma unroll
            for (int j = 0; j < 4; j++)
                sc[i][j] = 0.0f;
        }
        rs = sum16(rs);
        acc.l[i] = acc.l[i] * alpha + rs;
        acc.m[i] = m_new;
#pragma unroll
        for (int c = 0; c < tile_dims<DP>::NV * 4; c++)
            acc.o[i][c] *= alpha;
#pragma unroll
        for (int j = 0; j < 4; j++)
            Pt[(tx * 4 + j) * PADR + ty * 4 + i] = sc[i][j];
    }
    __syncthreads();
    mm_4xw<TK, tile_dims<DP>::NV>(acc.o, Pt, PADR, ty * 4, Vr, DP + 4, tx * 4);
}

// Writes a thread's rows of o (normalised) to dst rows ([rows][d]).
template <int DP>
__device__ void store_rows(float *dst, const tile_rows *tr, const float (&o)[4][DP / 16], int d)
{
    int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int r = ty * 4 + i;
        if (tr->t[r] < 0)
            continue;
#pragma unroll
        for (int v = 0; v < DP / 64; v++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int c = 64 * v + tx * 4 + e;
                if (c < d)
                    dst[(size_t)tr->row[r] * d + c] = o[i][v * 4 + e];
            }
    }
}

// ---- selected path per position (query heads in chunks of PR = 16)
//
// The union of a 64-row tile's selections wastes most of its work when neighbouring
// positions choose different blocks, so when H/G is a multiple of 16 the selected path runs
// per position instead: a block of 128 threads owns 16 query heads of one position (the
// paper's kernel: all heads of a kv group share each selected key block it loads) and
// streams that position's own n blocks. Warp w owns rows 4w..4w+3; for scores each lane
// takes keys lane and lane+32, for outputs columns lane*DP/32.. . Q, K and V sit in shared
// memory in row layout (16-byte loads, no bank conflicts).

#define PR 16
#define POS_THREADS 128
#define PADP (PR + 4)

template <int DP> struct pos_smem {
    static size_t bytes(int with_dout)
    {
        return ((size_t)(with_dout ? 2 : 1) * PR * (DP + 4) + 2 * (size_t)TK * (DP + 4) +
                (size_t)TK * PADP) *
               sizeof(float);
    }
};

// Row layout load of rows key0.. of K (and V): X[kk][c], ld DP + 4, zero past cnt and d.
template <int DP, int THREADS>
__device__ __forceinline__ void load_rows2(float *Kr, float *Vr, const float *K, const float *V,
                                           size_t base, size_t stride, int key0, int cnt, int d,
                                           bool vec4)
{
    if (vec4) {
        for (int e = threadIdx.x; e < TK * DP / 4; e += THREADS) {
            int kk = e / (DP / 4), c = (e % (DP / 4)) * 4;
            float4 kx = make_float4(0.f, 0.f, 0.f, 0.f), vx = kx;
            if (kk < cnt && c < d) {
                size_t i = base + (size_t)(key0 + kk) * stride + c;
                kx = *reinterpret_cast<const float4 *>(K + i);
                if (Vr)
                    vx = *reinterpret_cast<const float4 *>(V + i);
            }
            *reinterpret_cast<float4 *>(Kr + kk * (DP + 4) + c) = kx;
            if (Vr)
                *reinterpret_cast<float4 *>(Vr + kk * (DP + 4) + c) = vx;
        }
    } else {
        for (int e = threadIdx.x; e < TK * DP; e += THREADS) {
            int kk = e / DP, c = e % DP;
            bool ok = kk < cnt && c < d;
            size_t i = base + (size_t)(key0 + kk) * stride + c;
            Kr[kk * (DP + 4) + c] = ok ? K[i] : 0.0f;
            if (Vr)
                Vr[kk * (DP + 4) + c] = ok ? V[i] : 0.0f;
        }
    }
}

// s[i][j] = sum_c A[4w+i][c] * Kr[lane + 32 j][c] (A and Kr in row layout, ld DP + 4).
template <int DP>
__device__ __forceinline__ void pos_scores(float (&sc)[4][2], const float *A, const float *Kr,
                                           int warp, int lane)
{
#pragma unroll 4
    for (int c = 0; c < DP; c += 4) {
        float k0[4], k1[4];
        ld4(k0, Kr + lane * (DP + 4) + c);
        ld4(k1, Kr + (lane + 32) * (DP + 4) + c);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float a[4];
            ld4(a, A + (warp * 4 + i) * (DP + 4) + c);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                sc[i][0] = fmaf(a[e], k0[e], sc[i][0]);
                sc[i][1] = fmaf(a[e], k1[e], sc[i][1]);
            }
        }
    }
}

// acc[i][e] += sum_kk Pt[kk][4w+i] * X[kk][lane*NC + e], NC = DP / 32.
template <int DP>
__device__ __forceinline__ void pos_accumulate(float (&acc)[4][DP / 32], const float *Pt,
                                               const float *X, int warp, int lane)
{
    const int NC = DP / 32;
#pragma unroll 4
    for (int kk = 0; kk < TK; kk++) {
        float p[4];
        ld4(p, Pt + kk * PADP + warp * 4);
        float x[NC];
        if constexpr (NC == 4) {
            ld4(x, X + kk * (DP + 4) + lane * 4);
        } else {
            float2 v2 = *reinterpret_cast<const float2 *>(X + kk * (DP + 4) + lane * 2);
            x[0] = v2.x;
            x[1] = v2.y;
        }
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int e = 0; e < NC; e++)
                acc[i][e] = fmaf(p[i], x[e], acc[i][e]);
    }
}

// ---------------------------------------------------------------------------------------
// Launch helpers and the launchers of the other attention files

template <class K> static nsa_status allow_smem(nsa_context *ctx, K kernel, size_t bytes)
{
    if (bytes > nsa__cuda(ctx)->max_smem_optin)
        return nsa__error(NSA_ERR_UNSUPPORTED,
                          "cuda attention: needs %zu bytes of shared memory per block (the device "
                          "allows %zu)",
                          bytes, nsa__cuda(ctx)->max_smem_optin);
    NSA_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      (int)bytes));
    return NSA_OK;
}

enum { PATH_CMP = 0, PATH_SLC = 1, PATH_WIN = 2 }; // also the slots of lse and gates

// The work of one thread block of a key-centric backward pass (the fp32 and the bf16
// kernels): a tile of at most `tk` keys key0 .. key_end - 1 (rows of k/v, or of kc/vc for the
// compressed path) of kv head g of batch b, and the flattened (query, head) rows [rg_begin,
// rg_end) that attend it: position t0 + rg / hpg (window, compressed) or list[rg / hpg]
// (selected). Window: every query that sees the tile (grid: tiles x G x B). Compressed:
// pieces of `split` rows, cut at multiples of `split` of the (position, head) order (grid:
// pieces * tiles x G x B). Selected: work items of the
// inverted index, `split` positions each (grid: items x chunks of the block). False when
// the block has nothing to do.
struct dkv_work {
    int g, b, key0, key_end, t0;
    long long rg_begin, rg_end;
    const int *list;
};

// item_key (the chunked index, sel_index::item_key): the key of each item, instead of a
// binary search of item_start.
template <int PATH>
static __device__ __forceinline__ bool dkv_work_of(dkv_work &w, const attn_shape &s, int tk,
                                                   const int *list_offsets, const int *lists,
                                                   const int *item_start, int split,
                                                   const int *item_key = NULL)
{
    w.t0 = 0;
    w.rg_begin = 0;
    w.list = NULL;
    if (PATH == PATH_SLC) {
        int n_keys = s.B * s.G * s.nb, item = blockIdx.x;
        if (item >= item_start[n_keys])
            return false;
        int lo = 0, hi = n_keys - 1; // the last key whose items start at or before `item`
        if (item_key)
            lo = item_key[item];
        else
            while (lo < hi) {
                int mid = (lo + hi + 1) / 2;
                if (item_start[mid] <= item)
                    lo = mid;
                else
                    hi = mid - 1;
            }
        int key = lo, seg = item - item_start[lo];
        int blk = key % s.nb;
        w.g = (key / s.nb) % s.G;
        w.b = key / (s.nb * s.G);
        w.key0 = blk * s.b + blockIdx.y * tk;
        w.key_end = min(min(w.key0 + tk, blk * s.b + s.b), s.T);
        int off = list_offsets[key], count = list_offsets[key + 1] - off;
        int first = seg * split, npos = min(split, count - first);
        w.list = lists + off + first;
        w.rg_end = (long long)npos * s.hpg;
    } else {
        int Tk = PATH == PATH_CMP ? s.Tc : s.T;
        w.g = blockIdx.y;
        w.b = blockIdx.z;
        int tiles = (Tk + tk - 1) / tk;
        int tile = PATH == PATH_CMP ? blockIdx.x % tiles : blockIdx.x;
        w.key0 = tile * tk;
        w.key_end = min(w.key0 + tk, Tk);
        w.t0 = PATH == PATH_CMP ? w.key0 * s.r + s.l - 1 : w.key0;
        int t1 = PATH == PATH_CMP ? s.T - 1 : min(s.T - 1, w.key_end - 1 + s.w - 1);
        long long num_rows = t1 >= w.t0 ? (long long)(t1 - w.t0 + 1) * s.hpg : 0;
        w.rg_end = num_rows;
        if (PATH == PATH_CMP) { // piece blockIdx.x / tiles of the absolute rows, so that
            // the key tiles running side by side read the same rows (from L2)
            long long first = (long long)w.t0 * s.hpg, p0 = (long long)(blockIdx.x / tiles) * split;
            w.rg_begin = max(p0 - first, 0LL);
            w.rg_end = min(num_rows, p0 + split - first);
        }
    }
    return w.key0 < w.key_end && w.rg_begin < w.rg_end;
}

// The grids dkv_work_of decodes, for tiles of tk keys and compressed pieces of split_rows
// rows: window tiles x G x B; compressed pieces * tiles x G x B (launch only when Tc > 0);
// selected: work items of split_pos positions (from nsa__cuda_sel_lists) x slc_chunks.
struct dkv_grid {
    dim3 win, cmp;
    int split_rows, split_pos, slc_chunks;
};

static inline nsa_status dkv_grid_of(const attn_shape &s, int tk, int split_rows, dkv_grid *g)
{
    g->split_rows = split_rows;
    g->split_pos = split_rows / s.hpg > 0 ? split_rows / s.hpg : 1;
    g->win = dim3((unsigned)((s.T + tk - 1) / tk), s.G, s.B);
    long long pieces = ((long long)s.T * s.hpg + split_rows - 1) / split_rows;
    long long ctas = pieces * ((s.Tc + tk - 1) / tk);
    if (ctas > INT32_MAX)
        return nsa__error(NSA_ERR_UNSUPPORTED, "cuda attention backward: sequence too long");
    g->cmp = dim3((unsigned)ctas, s.G, s.B);
    g->slc_chunks = (s.b + tk - 1) / tk;
    if (g->slc_chunks > 65535)
        return nsa__error(NSA_ERR_UNSUPPORTED,
                          "cuda attention backward: block_size = %d: too large", s.b);
    return NSA_OK;
}

// Selection into idx [B,Tq,G,n] when the fused scoring does not run: mean_key (kcum:
// scratch of B*T*G*d floats) or cmp_attn (from the compressed path's lse in lse3).
nsa_status nsa__cuda_attn_select(nsa_context *ctx, const attn_shape &s, int mean_key, int32_t *idx,
                                 const float *q, const float *k, const float *kc,
                                 const float *lse3, float *kcum);

// The simple kernels: phase 0 the compressed path (o_cmp, lse3 slot 0), phase 1 the
// selected and window paths and the gated sum (o_slc, o_win, lse3 may be NULL).
nsa_status nsa__cuda_attn_simple_forward(nsa_context *ctx, const attn_shape &s, int phase,
                                         float *out, float *o_cmp, float *o_slc, float *o_win,
                                         float *lse3, const float *q, const float *k,
                                         const float *v, const float *kc, const float *vc,
                                         const float *gates, const int32_t *idx);
nsa_status nsa__cuda_attn_simple_backward(nsa_context *ctx, const attn_shape &s, float *dq,
                                          float *dk, float *dv, float *dkc, float *dvc,
                                          float *dgates, const float *q, const float *k,
                                          const float *v, const float *kc, const float *vc,
                                          const float *gates, const int32_t *idx,
                                          const float *o_paths, const float *lse,
                                          const float *dout);
// Inverted index of the selection idx [B,T,G,n] for the key-centric backward passes, built in
// ws (nsa__cuda_sel_ws_ints(s) ints of device memory): for each key block (b, g, block) the
// positions that chose it, lists[offsets[key] .. offsets[key + 1]), and work items of at
// most split_pos positions: key block `key` owns items item_start[key] .. item_start[key + 1]
// - 1, at most max_items in all. With skip_fixed, the blocks paper_fixed names for each
// position are left out (another kernel attends them). With chunk > 0 the keys are (b, chunk
// of `chunk` positions, g, block) in that order: a list holds the positions of one chunk
// (dkv_work_of decodes them as batch entry b * ceil(T / chunk) + chunk, its key read from
// item_key), and max_items counts the blocks each chunk can see (the work of a chunk comes
// before the next one's).
// dst[i] = src[0] + ... + src[i - 1] for i < n (scan.cu); ws holds nsa__cuda_scan_ws_bytes(n)
// bytes (0: n too large).
size_t nsa__cuda_scan_ws_bytes(size_t n);
nsa_status nsa__cuda_scan_ints(nsa_context *ctx, int *dst, const int *src, size_t n, void *ws);
typedef struct sel_index {
    const int *offsets, *lists, *item_start;
    const int *item_key; // (chunked: the key of each item; NULL otherwise)
    size_t max_items;
} sel_index;
size_t nsa__cuda_sel_ws_ints(const attn_shape &s, int chunk = 0); // (chunked: 0 if too large)
nsa_status nsa__cuda_sel_lists(nsa_context *ctx, const attn_shape &s, const int32_t *idx,
                               int *ws, int split_pos, sel_index *out, int skip_fixed = 0,
                               int chunk = 0);

// Whether block blk is one the paper's fixed selection forces on position t (block 0 and
// the two most recent candidates, SPEC 3.2; block size b).
static __host__ __device__ __forceinline__ bool paper_fixed(int blk, int t, int b)
{
    return blk == 0 || blk == t / b || blk == t / b - 1;
}

// NSA_PRECISION_BF16 through the fp32 ops: q, k, v, kc, vc rounded to bf16 in the operand
// scratch, then the bf16 tensor-core op (attention_bf16*.cu). *done = 0 (nothing run) when
// the shape or the buffers are not covered by the bf16 kernels.
nsa_status nsa__cuda_attn_forward_as_bf16(nsa_context *ctx, const nsa__attn_dims *dims,
                                          const float *q, const float *k, const float *v,
                                          const float *kc, const float *vc, const float *gates,
                                          const int32_t *given_idx, int32_t *idx, float *out,
                                          float *o_paths, float *lse, int *done);
nsa_status nsa__cuda_attn_backward_as_bf16(nsa_context *ctx, const nsa__attn_dims *dims,
                                           const float *q, const float *k, const float *v,
                                           const float *kc, const float *vc, const float *gates,
                                           const int32_t *idx, const float *o_paths,
                                           const float *lse, const float *dout, float *dq,
                                           float *dk, float *dv, float *dkc, float *dvc,
                                           float *dgates, int *done);

// The tiled backward (head_dim <= 128).
nsa_status nsa__cuda_attn_tiled_backward(nsa_context *ctx, const attn_shape &s, float *dq,
                                         float *dk, float *dv, float *dkc, float *dvc,
                                         float *dgates, const float *q, const float *k,
                                         const float *v, const float *kc, const float *vc,
                                         const float *gates, const int32_t *idx,
                                         const float *o_paths, const float *lse,
                                         const float *dout);

#endif // NSA_CUDA_ATTENTION_CUH
