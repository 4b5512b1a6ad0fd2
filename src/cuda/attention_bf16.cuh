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
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"

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
// 64-row tile by cp.async, by the 128 threads tid (of a warpgroup); rows past cnt and
// columns past d are zero. d % 8 == 0 and X 16-byte aligned (the launchers check).
template <int DP>
__device__ __forceinline__ void load_tile(bf16 *dst, const bf16 *X, size_t base, size_t stride,
                                          int key0, int cnt, int d, int tid = threadIdx.x)
{
    const int CH = DP / 8; // 16-byte chunks per row
    for (int e = tid; e < NB * CH; e += MMA_THREADS) {
        int kk = e / CH, c = (e % CH) * 8;
        bool ok = kk < cnt && c < d;
        const bf16 *src = ok ? X + base + (size_t)(key0 + kk) * stride + c : X;
        cp_async16(dst + kk * mcfg<DP>::LD + c, src, ok ? 16 : 0);
    }
}

#if NSA_WGMMA
// d (64 x DP) += A B with A from registers and B a sw128 tile of R rows read MN-major
// (k-step ks: rows 16ks .. 16ks + 15 of B).
template <int DP, int R = NB>
__device__ __forceinline__ void wgmma_rs_dp(float (&d)[DP / 8][4], const uint32_t (&a)[4],
                                            const bf16 *B, int ks)
{
    if constexpr (DP == 128)
        wgmma_rs_n128<1>(d, a, desc_mn(B, R, ks), 1);
    else
        wgmma_rs_n64<1>(d, a, desc_mn(B, R, ks), 1);
}
#endif

// load_tile into a sw128 tile of R rows (wgmma.cuh); dst 1024-byte aligned. Thread tid
// copies chunk column c = tid % CH of rows tid / CH + j * (128 / CH): its swizzled offset
// moves by a constant per row step (row % 8 stays), so each copy costs two additions.
template <int DP, int R = NB>
__device__ __forceinline__ void load_tile_sw(bf16 *dst, const bf16 *X, size_t base, size_t stride,
                                             int key0, int cnt, int d, int tid = threadIdx.x)
{
    const int CH = DP / 8, RS = MMA_THREADS / CH; // rows a pass
    int r0 = tid / CH, c = (tid % CH) * 8;
    unsigned char *to = (unsigned char *)dst + sw128_off(R, r0, c);
    const bf16 *from = X + base + (size_t)(key0 + r0) * stride + c;
    bool col_ok = c < d;
#pragma unroll
    for (int j = 0; j < R / RS; j++) {
        bool ok = col_ok && r0 + j * RS < cnt;
        cp_async16(to + j * RS * 128, ok ? from + (size_t)j * RS * stride : X, ok ? 16 : 0);
    }
}

// The same products on tiles in the sw128 layout, by warp and mma.sync (the fallback of the
// warpgroup kernels where wgmma is absent): s (16 x KC) = A B^T, A the warp's rows as
// mma.sync A fragments (af, one per k-step) or rows a_row0 .. + 15 of a 64-row sw128 tile,
// B a KC-row sw128 tile; o (16 x DP) += P B, P the A fragments of the warp's rows over the
// KC rows of B.
template <int DP, int KC = NB>
__device__ __forceinline__ void mma_rs_sw(float (&s)[KC / 8][4], const uint32_t (&af)[DP / 16][4],
                                          const bf16 *Bt, int lane)
{
    const unsigned char *B = (const unsigned char *)Bt;
    frag_zero(s);
    int mi = lane / 8, r = lane % 8;
#pragma unroll
    for (int ks = 0; ks < DP / 16; ks++)
#pragma unroll
        for (int j = 0; j < KC / 16; j++) {
            uint32_t b[4];
            ldmatrix_x4(b, B + sw128_off(KC, 16 * j + (mi / 2) * 8 + r, ks * 16 + (mi % 2) * 8));
            mma_bf16(s[2 * j], af[ks], b[0], b[1]);
            mma_bf16(s[2 * j + 1], af[ks], b[2], b[3]);
        }
}

template <int DP, int KC = NB>
__device__ __forceinline__ void mma_ss_sw(float (&s)[KC / 8][4], const bf16 *At, int a_row0,
                                          const bf16 *Bt, int lane)
{
    const unsigned char *A = (const unsigned char *)At;
    int mi = lane / 8, r = lane % 8;
    uint32_t af[DP / 16][4];
#pragma unroll
    for (int ks = 0; ks < DP / 16; ks++)
        ldmatrix_x4(af[ks], A + sw128_off(NB, a_row0 + (mi % 2) * 8 + r, ks * 16 + (mi / 2) * 8));
    mma_rs_sw<DP, KC>(s, af, Bt, lane);
}

template <int DP, int KC = NB>
__device__ __forceinline__ void mma_pv_sw(float (&o)[DP / 8][4], const uint32_t (&a)[KC / 16][4],
                                          const bf16 *Bt, int lane)
{
    const unsigned char *B = (const unsigned char *)Bt;
    int mi = lane / 8, r = lane % 8;
#pragma unroll
    for (int j = 0; j < KC / 16; j++)
#pragma unroll
        for (int n2 = 0; n2 < DP / 16; n2++) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, B + sw128_off(KC, 16 * j + (mi % 2) * 8 + r,
                                               n2 * 16 + (mi / 2) * 8));
            mma_bf16(o[2 * n2], a[j], b[0], b[1]);
            mma_bf16(o[2 * n2 + 1], a[j], b[2], b[3]);
        }
}

// The products of a warpgroup (4 warps, each its 16 of the 64 rows) on sw128 tiles, by
// wgmma where the build has it, else by mma.sync: s = A B^T (64 x KC; A a 64-row tile, B a
// KC-row tile, K = DP) and o += P B (P: the warp's A fragments over the KC rows of B,
// [k-step][4]). KC is 64 or 128 (keys a chunk). The _issue forms start one (wgmma:
// committed as one group, not waited; mma.sync: done on return); wg_wait<N>() waits until
// at most N groups are pending.
template <int DP, int KC = NB>
__device__ __forceinline__ void wg_rows_keys_issue(float (&s)[KC / 8][4], const bf16 *A,
                                                   const bf16 *B, int warp, int lane)
{
#if NSA_WGMMA
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < DP / 16; ks++)
        if constexpr (KC == 128)
            wgmma_ss_n128(s, desc_k(A, NB, ks), desc_k(B, KC, ks), ks > 0);
        else
            wgmma_ss_n64(s, desc_k(A, NB, ks), desc_k(B, KC, ks), ks > 0);
    wgmma_commit();
#else
    mma_ss_sw<DP, KC>(s, A, warp * 16, B, lane);
#endif
}

template <int DP, int KC = NB>
__device__ __forceinline__ void wg_p_v_issue(float (&o)[DP / 8][4], const uint32_t (&a)[KC / 16][4],
                                             const bf16 *B, int lane)
{
#if NSA_WGMMA
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < KC / 16; j++)
        wgmma_rs_dp<DP, KC>(o, a[j], B, j);
    wgmma_commit();
#else
    mma_pv_sw<DP, KC>(o, a, B, lane);
#endif
}

template <int N> __device__ __forceinline__ void wg_wait()
{
#if NSA_WGMMA
    wgmma_wait<N>();
#endif
}

// The same, waited for: s = A B^T; s1 = A1 B1^T and s2 = A2 B2^T; o += P B.
template <int DP>
__device__ __forceinline__ void wg_rows_keys(float (&s)[8][4], const bf16 *A, const bf16 *B,
                                             int warp, int lane)
{
    wg_rows_keys_issue<DP>(s, A, B, warp, lane);
    wg_wait<0>();
    wgmma_hold(s);
}

// s = A B^T with A the warp's 16 rows in registers (mma.sync A fragments, one a k-step).
template <int DP>
__device__ __forceinline__ void wg_rows_keys_rq(float (&s)[8][4], const uint32_t (&af)[DP / 16][4],
                                                const bf16 *B, int lane)
{
#if NSA_WGMMA
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < DP / 16; ks++)
        wgmma_rs_n64<0>(s, af[ks], desc_k(B, NB, ks), ks > 0);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_hold(s);
#else
    mma_rs_sw<DP>(s, af, B, lane);
#endif
}

template <int DP>
__device__ __forceinline__ void wg_rows_keys2(float (&s1)[8][4], const bf16 *A1, const bf16 *B1,
                                              float (&s2)[8][4], const bf16 *A2, const bf16 *B2,
                                              int warp, int lane)
{
    wg_rows_keys_issue<DP>(s1, A1, B1, warp, lane);
    wg_rows_keys_issue<DP>(s2, A2, B2, warp, lane);
    wg_wait<0>();
    wgmma_hold(s1);
    wgmma_hold(s2);
}

template <int DP>
__device__ __forceinline__ void wg_p_v(float (&o)[DP / 8][4], const uint32_t (&a)[4][4],
                                       const bf16 *B, int lane)
{
    wg_p_v_issue<DP>(o, a, B, lane);
    wg_wait<0>();
    wgmma_hold(o);
}

// Rows key0 .. key0 + cnt - 1 of K and V into the sw128 tiles Kd, Vd of R rows by the WG
// warpgroups of the block: with two, one tile each; with one, both (V = NULL: K alone, one
// warpgroup).
template <int DP, int WG, int R = NB>
__device__ __forceinline__ void load_kv_sw(bf16 *Kd, bf16 *Vd, const bf16 *K, const bf16 *V,
                                           size_t base, size_t stride, int key0, int cnt, int d)
{
    int wg = warpgroup_index(), wtid = threadIdx.x % MMA_THREADS;
    if constexpr (WG == 3) { // K by the first warpgroup, V by the second
        if (wg < 2)
            load_tile_sw<DP, R>(wg ? Vd : Kd, wg ? V : K, base, stride, key0, cnt, d, wtid);
    } else if constexpr (WG == 2)
        load_tile_sw<DP, R>(wg ? Vd : Kd, wg ? V : K, base, stride, key0, cnt, d, wtid);
    else {
        load_tile_sw<DP, R>(Kd, K, base, stride, key0, cnt, d, wtid);
        if (V)
            load_tile_sw<DP, R>(Vd, V, base, stride, key0, cnt, d, wtid);
    }
}

// The key chunks of the warpgroup kernels through two stages of sw128 tiles (Ks, Vs: two
// 64-row tiles each) by the WG warpgroups (load_kv_sw): where(i, K, V, base, key0, cnt)
// names chunk i (rows key0 .. key0 + cnt - 1 at base + key * stride of K and V; V = NULL,
// with WG = 1 only: K alone, Vs unused); body(i, Kt, Vt) runs on every thread once chunk i is in shared
// memory. Callers commit their own earlier copies (they complete with chunk 0).
template <int DP, int WG, class Where, class Body>
__device__ __forceinline__ void wg_stream(bf16 *Ks, bf16 *Vs, size_t stride, int d, int nch,
                                          Where where, Body body)
{
    const int TE = NB * DP;
    auto load = [&](int i) {
        const bf16 *K, *V;
        size_t base;
        int key0, cnt;
        where(i, K, V, base, key0, cnt);
        load_kv_sw<DP, WG>(Ks + (i & 1) * TE, Vs + (i & 1) * TE, K, V, base, stride, key0, cnt, d);
    };
    if (nch > 0)
        load(0);
    cp_async_commit();
    for (int i = 0; i < nch; i++) {
        if (i + 1 < nch)
            load(i + 1);
        cp_async_commit();
        cp_async_wait<1>();
        fence_async_smem();
        __syncthreads();
        body(i, Ks + (i & 1) * TE, Vs + (i & 1) * TE);
        __syncthreads();
    }
    cp_async_wait<0>();
}

// The same with the key tiles by TMA (tma.cuh) through ST stages: src(i, mK, mV, key0) names
// chunk i's tensor maps (__grid_constant__ parameters; mV NULL: K alone) and its first key
// (of kv head g, batch entry b; keys past the chunk's own hold later keys, or zeros past the
// sequence, which the callers mask). Thread 0 issues each chunk's copies on its stage's
// `full` barrier once every thread has arrived on the stage's `empty` barrier after the
// chunk before (bars: mbar_init_pipe<ST>(bars, blockDim.x)); no block barrier a chunk, so
// threads drift apart by up to ST - 1 chunks and one warpgroup's softmax runs under
// another's products. body must be done reading the stage (its products waited for) when
// it returns, and must itself order any shared memory its warps exchange across chunks.
// Callers' earlier cp.async copies are waited for and fenced before chunk 0.
template <int DP, int ST, class Src, class Body>
__device__ __forceinline__ void wg_stream_tma(bf16 *Ks, bf16 *Vs, uint64_t *bars, int g, int b,
                                              int nch, Src src, Body body)
{
    static_assert(ST >= 2, "a stage in use and one filling");
    const int TE = NB * DP;
    uint64_t *full = bars, *empty = bars + ST;
    auto issue = [&](int i) {
        const CUtensorMap *mK, *mV;
        int key0;
        src(i, mK, mV, key0);
        uint64_t *bar = &full[i % ST];
        mbar_expect_tx(bar, (mV ? 2 : 1) * TE * (unsigned)sizeof(bf16));
        tma_tile<DP, NB>(Ks + (i % ST) * TE, mK, g, b, key0, bar);
        if (mV)
            tma_tile<DP, NB>(Vs + (i % ST) * TE, mV, g, b, key0, bar);
    };
    if (threadIdx.x == 0)
        for (int i = 0; i < ST - 1 && i < nch; i++)
            issue(i);
    cp_async_wait<0>();
    fence_async_smem();
    __syncthreads();
    for (int i = 0; i < nch; i++) {
        if (threadIdx.x == 0 && i + ST - 1 < nch) { // into the stage chunk i - 1 used
            if (i > 0)
                mbar_wait_use<ST>(empty, i - 1);
            issue(i + ST - 1);
        }
        mbar_wait_use<ST>(full, i);
        body(i, Ks + (i % ST) * TE, Vs + (i % ST) * TE);
        mbar_arrive(&empty[i % ST]);
    }
}

// The consumer loop of an ST-stage stream of row tiles that warp 0 fills (the key-centric
// kernels' query rows): issue(j) fills stage j % ST on full[j % ST] (all lanes of warp 0
// call it), tiles 0 .. ST - 2 issued before; body(it) runs on every thread once tile it is
// in, and each thread must arrive on empty[it % ST] once it is done reading the stage
// (before body returns, or in it), which lets warp 0 refill the stage with tile it + ST - 1.
template <int ST, class Issue, class Body>
__device__ __forceinline__ void row_stream(uint64_t *full, uint64_t *empty, int ntiles,
                                           Issue issue, Body body)
{
    for (int it = 0; it < ntiles; it++) {
        // refill the stage tile it - 1 used once every thread is done with it
        if (threadIdx.x < 32 && it + ST - 1 < ntiles) {
            if (it > 0) {
                if (threadIdx.x == 0)
                    mbar_wait_use<ST>(empty, it - 1);
                __syncwarp();
            }
            issue(it + ST - 1);
        }
        mbar_wait_use<ST>(full, it);
        body(it);
    }
}

// Rounds the dynamic shared memory base up to 1024 bytes (sw128 tiles); the launchers
// ask for SMEM_ALIGN more bytes.
#define SMEM_ALIGN 1024
static __device__ __forceinline__ unsigned char *smem_aligned(unsigned char *p)
{
    return p + ((SMEM_ALIGN - smem_addr(p) % SMEM_ALIGN) % SMEM_ALIGN); // the shared address
}

// The query rows of a tile of R rows of one (batch, kv head): consecutive (position, head)
// pairs; t = -1 for rows past the end.
template <int R> struct mrows {
    int t[R];
    long long row[R]; // index of the row in q / out / gates ([B,Tq,H] order)
};

template <int R>
__device__ __forceinline__ void mrows_init(mrows<R> *tr, const attn_shape &s, int tile, int g, int b)
{
    for (int r = threadIdx.x; r < R; r += blockDim.x) {
        long long rg = (long long)tile * R + r;
        int tq = (int)(rg / s.hpg), hh = (int)(rg % s.hpg);
        bool ok = tq < s.Tq;
        tr->t[r] = ok ? s.q_start + tq : -1;
        tr->row[r] = ok ? ((long long)b * s.Tq + tq) * s.H + (long long)g * s.hpg + hh : 0;
    }
}

// The tile's query rows of X [rows, d] into a padded tile of R rows.
template <int DP, int R>
__device__ __forceinline__ void load_row_tile(bf16 *dst, const bf16 *X, const mrows<R> *tr, int d)
{
    const int CH = DP / 8;
    for (int e = threadIdx.x; e < R * CH; e += MMA_THREADS) {
        int r = e / CH, c = (e % CH) * 8;
        bool ok = tr->t[r] >= 0 && c < d;
        const bf16 *src = ok ? X + (size_t)tr->row[r] * d + c : X;
        cp_async16(dst + r * mcfg<DP>::LD + c, src, ok ? 16 : 0);
    }
}

// The warpgroup's 64 rows (wg * 64 .. of the tile tr) of X [rows, d] into a sw128 tile.
template <int DP, int R>
__device__ __forceinline__ void load_rows_sw(bf16 *dst, const bf16 *X, const mrows<R> *tr, int d)
{
    const int CH = DP / 8;
    int wg = warpgroup_index();
    for (int e = threadIdx.x % MMA_THREADS; e < NB * CH; e += MMA_THREADS) {
        int r = e / CH, c = (e % CH) * 8, rr = wg * NB + r;
        bool ok = tr->t[rr] >= 0 && c < d;
        cp_async16((unsigned char *)dst + sw128_off(NB, r, c),
                   ok ? X + (size_t)tr->row[rr] * d + c : X, ok ? 16 : 0);
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
template <int DP, int KT = NB>
__device__ __forceinline__ void mma_rows_keys(float (&s)[KT / 8][4], const uint32_t (&af)[DP / 16][4],
                                              const bf16 *Bt, int lane)
{
#pragma unroll
    for (int nt = 0; nt < KT / 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            s[nt][e] = 0.0f;
    int mi = lane / 8, r = lane % 8;
#pragma unroll
    for (int ks = 0; ks < DP / 16; ks++)
#pragma unroll
        for (int j = 0; j < KT / 16; j++) {
            uint32_t b[4];
            ldmatrix_x4(b, Bt + (16 * j + (mi / 2) * 8 + r) * mcfg<DP>::LD + ks * 16 + (mi % 2) * 8);
            mma_bf16(s[2 * j], af[ks], b[0], b[1]);
            mma_bf16(s[2 * j + 1], af[ks], b[2], b[3]);
        }
}

// o[nt] (16 rows x DP) += P (16 x 64 keys, C fragments) V, V a padded 64-row tile.
template <int DP, int KT = NB>
__device__ __forceinline__ void mma_p_v(float (&o)[DP / 8][4], const float (&p)[KT / 8][4],
                                        const bf16 *Vt, int lane)
{
    int mi = lane / 8, r = lane % 8;
#pragma unroll
    for (int j = 0; j < KT / 16; j++) {
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

// s[nt] (16 rows x 64 keys) = A B^T with the warp's 16 rows of A read from a padded tile in
// shared memory (rows a_row0 ..) at each k-step instead of held in registers.
template <int DP>
__device__ __forceinline__ void mma_rows_keys_sa(float (&s)[8][4], const bf16 *At, int a_row0,
                                                 const bf16 *Bt, int lane)
{
    frag_zero(s);
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

// Streams nch key chunks through STAGES shared-memory stages (Ks and Vs hold STAGES tiles
// each; STAGES - 1 chunks are in flight while one is used): where(i, key0, cnt) names chunk
// i (rows key0 .. key0 + cnt - 1 of K and V, or of K alone when V is NULL); body(i, key0,
// cnt, Kt, Vt) runs on every thread once chunk i is in shared memory. All threads call it.
template <int DP, int STAGES = 2, class Where, class Body>
__device__ __forceinline__ void stream_chunks(bf16 *Ks, bf16 *Vs, const bf16 *K, const bf16 *V,
                                              size_t base, size_t stride, int d, int nch,
                                              Where where, Body body)
{
    const int LD = mcfg<DP>::LD;
    auto load = [&](int i) {
        int key0, cnt;
        where(i, key0, cnt);
        int stg = i % STAGES;
        load_tile<DP>(Ks + stg * NB * LD, K, base, stride, key0, cnt, d);
        if (V)
            load_tile<DP>(Vs + stg * NB * LD, V, base, stride, key0, cnt, d);
    };
#pragma unroll
    for (int p = 0; p < STAGES - 1; p++) {
        if (p < nch)
            load(p);
        cp_async_commit();
    }
    for (int i = 0; i < nch; i++) {
        if (i + STAGES - 1 < nch)
            load(i + STAGES - 1);
        cp_async_commit();
        cp_async_wait<STAGES - 1>();
        __syncthreads();
        int key0, cnt, stg = i % STAGES;
        where(i, key0, cnt);
        body(i, key0, cnt, Ks + stg * NB * LD, Vs + stg * NB * LD);
        __syncthreads();
    }
}

// The online-softmax update of a warp's rows g and g + 8 for one chunk of scores s (C
// fragments; m in log2 units): masks by ok(i, kk), scales by sl2, turns s into the
// probabilities (relative to the new max) and rescales l and o.
template <int KT = NB, class Ok>
__device__ __forceinline__ void softmax_probs(float (&s)[KT / 8][4], float (&m)[2], float (&l)[2],
                                              float (&alpha)[2], float sl2, int lane, Ok ok)
{
    int c = lane % 4;
    float mx[2] = {-INFINITY, -INFINITY}; // of the raw scores (sl2 > 0 keeps the order)
#pragma unroll
    for (int nt = 0; nt < KT / 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int i = e / 2, kk = nt * 8 + 2 * c + (e & 1);
            float x = ok(i, kk) ? s[nt][e] : -INFINITY;
            s[nt][e] = x;
            mx[i] = fmaxf(mx[i], x);
        }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        float m_new = fmaxf(m[i], quad_max(mx[i]) * sl2);
        alpha[i] = m_new == -INFINITY ? 1.0f : ex2_approx(m[i] - m_new);
        float base = m_new == -INFINITY ? 0.0f : m_new;
        float rs = 0.0f;
#pragma unroll
        for (int nt = 0; nt < KT / 8; nt++) {
            float p0 = ex2_approx(fmaf(s[nt][2 * i], sl2, -base));
            float p1 = ex2_approx(fmaf(s[nt][2 * i + 1], sl2, -base));
            s[nt][2 * i] = p0;
            s[nt][2 * i + 1] = p1;
            rs += p0 + p1;
        }
        l[i] = l[i] * alpha[i] + quad_sum(rs);
        m[i] = m_new;
    }
}

// o's rows g and g + 8 times alpha[0], alpha[1].
template <int DP>
__device__ __forceinline__ void rescale_rows(float (&o)[DP / 8][4], const float (&alpha)[2])
{
#pragma unroll
    for (int nt = 0; nt < DP / 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            o[nt][e] *= alpha[e / 2];
}

// The online-softmax update of a warp's rows g and g + 8 for one chunk of scores s (C
// fragments; m in log2 units): masks by ok(i, kk), scales by sl2, turns s into the
// probabilities (relative to the new max) and rescales l and o.
template <int DP, int KT = NB, class Ok>
__device__ __forceinline__ void softmax_update(float (&s)[KT / 8][4], float (&m)[2], float (&l)[2],
                                               float (&o)[DP / 8][4], float sl2, int lane, Ok ok)
{
    float alpha[2];
    softmax_probs<KT>(s, m, l, alpha, sl2, lane, ok);
    rescale_rows<DP>(o, alpha);
}

// One chunk of KT keys of the forward for a warp's 16 rows with Q in registers (qf): scores, mask
// ok(i, kk), online softmax, O += P V.
template <int DP, int KT = NB, class Ok>
__device__ __forceinline__ void fwd_step_rq(float (&m)[2], float (&l)[2], float (&o)[DP / 8][4],
                                            const uint32_t (&qf)[DP / 16][4], const bf16 *Kt,
                                            const bf16 *Vt, float sl2, int lane, Ok ok)
{
    float s[KT / 8][4];
    mma_rows_keys<DP, KT>(s, qf, Kt, lane);
    softmax_update<DP, KT>(s, m, l, o, sl2, lane, ok);
    mma_p_v<DP, KT>(o, s, Vt, lane);
}

// ---- the backward's query-centric step (dq)

// Per-row constants of one path for the thread's rows g and g + 8.
struct path_rows {
    float lse2[2], gate[2], D[2];
    // Slot i from row `row` of path p (lse2 in log2 units); a missing row (valid false) or
    // one without keys on the path (lse -inf: its mask is all false) gets no gradient.
    __device__ __forceinline__ void set(int i, bool valid, size_t row, int p, const float *lse3,
                                        const float *gates, const float *Dp)
    {
        float l = valid ? lse3[row * 3 + p] : -INFINITY;
        lse2[i] = l == -INFINITY ? 0.0f : l * LOG2E;
        gate[i] = valid ? gates[row * 3 + p] : 0.0f;
        D[i] = valid ? Dp[row * 3 + p] : 0.0f;
    }
};

// One chunk of KT keys of dq: mask ok(i, kk).
template <int DP, int KT = NB, class Ok>
__device__ __forceinline__ void dq_step(float (&dq)[DP / 8][4], const uint32_t (&qf)[DP / 16][4],
                                        const uint32_t (&of)[DP / 16][4], const bf16 *Kt,
                                        const bf16 *Vt, const path_rows &pr, float sl2, int lane,
                                        Ok ok)
{
    float sc[KT / 8][4], dp[KT / 8][4];
    mma_rows_keys<DP, KT>(sc, qf, Kt, lane);
    mma_rows_keys<DP, KT>(dp, of, Vt, lane);
    int c = lane % 4;
#pragma unroll
    for (int nt = 0; nt < KT / 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int i = e / 2, kk = nt * 8 + 2 * c + (e & 1);
            float p = ok(i, kk) ? ex2_approx(sc[nt][e] * sl2 - pr.lse2[i]) : 0.0f;
            sc[nt][e] = p * (pr.gate[i] * dp[nt][e] - pr.D[i]);
        }
    mma_p_v<DP, KT>(dq, sc, Kt, lane); // dQ += dS K: K's rows play V's part
}

// ---- the warp-per-position selected kernels: a warp per (position, 16 query heads)

// Their chunking: KEYS keys a chunk, ST stages a warp in shared memory (ST - 1 chunks in
// flight while one is used), W warps a thread block, MINB blocks per SM asked of the
// compiler. NSA_CUDA_SLCW picks one by its id (X(id, KEYS, ST, W, MINB)).
// H200, 64k paper shape: 2 suits the forward (47.9 ms against 50.6 with 0), 0 the dq kernel
// (87.3 ms backward against 88.8-89.0 with 1 or 2, whose 168 registers spill there); 3 stages
// or 8 warps a block measured slower for both.
#define SLCW_CONFIGS(X) X(0, 32, 2, 2, 3) X(1, 16, 2, 2, 6) X(2, 16, 2, 4, 3) // SLCW_NCONFIGS

// Shared memory of a thread block: ST stages of KEYS rows of K and of V a warp, then each
// warp's list of its own blocks (n ints).
template <int DP, int KEYS, int ST, int W> static inline size_t slcw_smem_bytes(int n)
{
    return (size_t)W * 2 * ST * KEYS * mcfg<DP>::LD * sizeof(bf16) + (size_t)W * n * sizeof(int);
}

// The selected blocks sel[n] (any order, -1 for none) of position t, keys of each block up
// to t, KEYS at a time through the warp's ST stages Kw (K stages 0 .., then V) by
// cp.async, no barrier beyond the warp: body(Kt, Vt, cnt) for every chunk of cnt > 0 keys.
// Lane l copies 16-byte column l % CH of rows l / CH + j 32 / CH (constant steps).
template <int DP, int KEYS, int ST, class Body>
__device__ __forceinline__ void warp_stream_blocks(bf16 *Kw, const bf16 *K, const bf16 *V,
                                                   size_t base, size_t stride, int d,
                                                   const int32_t *sel, int n, int bsize, int t,
                                                   int lane, Body body)
{
    const int LD = mcfg<DP>::LD, CH = DP / 8, RS = 32 / CH;
    int subs = (bsize + KEYS - 1) / KEYS;
    int r0 = lane / CH, c = (lane % CH) * 8;
    bool col_ok = c < d;
    auto chunk = [&](int i, int &key0, int &cnt) {
        int blk = sel[i / subs];
        key0 = blk * bsize + (i % subs) * KEYS;
        cnt = blk < 0 ? 0 : min(KEYS, min(blk * bsize + bsize, t + 1) - key0);
    };
    auto stage = [&](int i, int v) { return Kw + ((v ? ST : 0) + i % ST) * KEYS * LD; };
    auto issue = [&](int i) {
        int key0, cnt;
        chunk(i, key0, cnt);
        bf16 *Kd = stage(i, 0) + r0 * LD + c, *Vd = stage(i, 1) + r0 * LD + c;
        size_t at = base + (size_t)(key0 + r0) * stride + c;
#pragma unroll
        for (int j = 0; j < KEYS / RS; j++) {
            bool ok = col_ok && r0 + j * RS < cnt;
            size_t aj = at + (size_t)j * RS * stride;
            cp_async16(Kd + j * RS * LD, ok ? K + aj : K, ok ? 16 : 0);
            cp_async16(Vd + j * RS * LD, ok ? V + aj : V, ok ? 16 : 0);
        }
    };
    int nch = n * subs;
#pragma unroll
    for (int p = 0; p < ST - 1; p++) {
        if (p < nch)
            issue(p);
        cp_async_commit();
    }
    for (int i = 0; i < nch; i++) {
        if (i + ST - 1 < nch)
            issue(i + ST - 1);
        cp_async_commit();
        cp_async_wait<ST - 1>();
        __syncwarp();
        int key0, cnt;
        chunk(i, key0, cnt);
        if (cnt > 0)
            body(stage(i, 0), stage(i, 1), cnt);
        __syncwarp();
    }
    cp_async_wait<0>();
}

// The 16 query rows of a warp of the warp-per-position kernels: position tq, its first row.
struct warp_unit {
    int tq, t;
    size_t row0;
};

template <int W>
static __device__ __forceinline__ bool warp_unit_of(warp_unit &u, const attn_shape &s, int warp)
{
    int per_pos = s.hpg / 16;
    long long unit = (long long)blockIdx.x * W + warp;
    u.tq = (int)(unit / per_pos);
    if (u.tq >= s.Tq)
        return false;
    u.t = s.q_start + u.tq;
    u.row0 = ((size_t)blockIdx.z * s.Tq + u.tq) * s.H + (size_t)blockIdx.y * s.hpg +
             (size_t)(unit % per_pos) * 16;
    return true;
}

// The blocks a thread block of the warp-per-position kernels loads once for all its warps:
// with the paper's fixed selection every position's block 0 and its two most recent blocks,
// so block 0 and blocks cb_lo .. cb_hi (the positions t_first .. t_last of the block's
// warps). Without it none (n_blocks 0).
struct cta_common {
    int t_last, cb_lo, cb_hi, n_blocks;
    __device__ __forceinline__ bool holds(int blk) const
    {
        return n_blocks > 0 && (blk == 0 || (blk >= cb_lo && blk <= cb_hi));
    }
    __device__ __forceinline__ int block(int j) const { return j == 0 ? 0 : cb_lo + j - 1; }
};

template <int W>
static __device__ __forceinline__ cta_common cta_common_of(const attn_shape &s, bool on)
{
    int per_pos = s.hpg / 16;
    long long u0 = (long long)blockIdx.x * W;
    long long u1 = min(u0 + W - 1, (long long)s.Tq * per_pos - 1);
    int t_first = s.q_start + (int)(u0 / per_pos), t_last = s.q_start + (int)(u1 / per_pos);
    cta_common c;
    c.t_last = t_last;
    c.cb_lo = max(1, t_first / s.b - 1);
    c.cb_hi = t_last / s.b;
    c.n_blocks = on ? 1 + max(0, c.cb_hi - c.cb_lo + 1) : 0;
    return c;
}

// The common blocks of cc, keys up to the block's last position, KEYS at a time through the
// W * ST stages of all warps (pool; stage j: K at 2 j KEYS LD, V after it) loaded by all
// threads, a barrier a chunk: body(Kt, Vt, cnt) on every warp whose position t chose the
// block (sel[n], its selection; t < 0: none), cnt > 0 its keys of the chunk (up to t);
// FIXED_ONLY: only where the block is one of t's paper_fixed blocks (sel NULL: each of them,
// as a computed selection always holds them). All threads call it.
template <int DP, int KEYS, int ST, int W, bool FIXED_ONLY = false, class Body>
__device__ __forceinline__ void cta_stream_common(bf16 *pool, const bf16 *K, const bf16 *V,
                                                  size_t base, size_t stride, int d,
                                                  const cta_common &cc, int bsize,
                                                  const int32_t *sel, int n, int t, int lane,
                                                  Body body)
{
    const int LD = mcfg<DP>::LD, CH = DP / 8, P = W * ST, STAGE = KEYS * LD;
    int subs = (bsize + KEYS - 1) / KEYS, nch = cc.n_blocks * subs;
    auto chunk = [&](int i, int &key0, int &cnt) {
        int blk = cc.block(i / subs);
        key0 = blk * bsize + (i % subs) * KEYS;
        cnt = min(KEYS, min(blk * bsize + bsize, cc.t_last + 1) - key0);
    };
    auto issue = [&](int i) {
        if (i < nch) {
            int key0, cnt;
            chunk(i, key0, cnt);
            bf16 *Kd = pool + (size_t)(2 * (i % P)) * STAGE;
            for (int e = threadIdx.x; e < 2 * KEYS * CH; e += W * 32) {
                int mat = e / (KEYS * CH), rem = e % (KEYS * CH), r = rem / CH;
                int c = (rem % CH) * 8;
                bool ok = r < cnt && c < d;
                const bf16 *X = mat ? V : K;
                cp_async16(Kd + mat * STAGE + r * LD + c,
                           ok ? X + base + (size_t)(key0 + r) * stride + c : X, ok ? 16 : 0);
            }
        }
        cp_async_commit();
    };
#pragma unroll
    for (int p = 0; p < P - 1; p++)
        issue(p);
    bool member = false;
    for (int i = 0; i < nch; i++) {
        issue(i + P - 1); // into the stage chunk i - 1 used: every warp is past it
        cp_async_wait<P - 1>();
        __syncthreads();
        int key0, cnt;
        chunk(i, key0, cnt);
        if (i % subs == 0) { // a new block: did the warp's position choose it
            int blk = key0 / bsize;
            bool hit = false;
            if (t >= 0 && (!FIXED_ONLY || paper_fixed(blk, t, bsize))) {
                if (FIXED_ONLY && !sel) // (a computed selection holds every fixed block)
                    hit = true;
                else
                    for (int e = lane; e < n; e += 32)
                        hit |= sel[e] == blk;
            }
            member = __any_sync(0xffffffffu, hit);
        }
        int cw = min(cnt, t - key0 + 1);
        if (member && cw > 0)
            body(pool + (size_t)(2 * (i % P)) * STAGE, pool + (size_t)(2 * (i % P) + 1) * STAGE,
                 cw);
        __syncthreads();
    }
    cp_async_wait<0>();
}

// The warp's blocks of sel[n] outside the common ones, in sel's order, into own[]; their
// count.
static __device__ __forceinline__ int own_blocks(int *own, const int32_t *sel, int n,
                                                 const cta_common &cc, int lane)
{
    int cnt = 0;
    for (int i0 = 0; i0 < n; i0 += 32) {
        int blk = i0 + lane < n ? sel[i0 + lane] : -1;
        bool keep = blk >= 0 && !cc.holds(blk);
        unsigned m = __ballot_sync(0xffffffffu, keep);
        if (keep)
            own[cnt + __popc(m & ((1u << lane) - 1u))] = blk;
        cnt += __popc(m);
    }
    __syncwarp();
    return cnt;
}

// A warp-per-position kernel's walk over its warp's selection (sel[n] of position t; valid
// false: a warp past the end, t unused): the thread block's common blocks first (every
// thread), then the warp's own blocks through its stages of pool (own: its list of n ints),
// body(Kt, Vt, cnt) on each chunk of its keys. False for a warp past the end. FIXED_ONLY:
// the common blocks that are paper_fixed for t alone (cc must hold them: the paper's fixed
// selection), none of the warp's own.
template <int DP, int KEYS, int ST, int W, bool FIXED_ONLY = false, class Body>
__device__ __forceinline__ bool warp_stream_selection(bf16 *pool, int *own, const bf16 *K,
                                                      const bf16 *V, size_t base, size_t stride,
                                                      const attn_shape &s, const cta_common &cc,
                                                      const int32_t *sel, bool valid, int t,
                                                      int warp, int lane, Body body)
{
    if (cc.n_blocks > 0)
        cta_stream_common<DP, KEYS, ST, W, FIXED_ONLY>(pool, K, V, base, stride, s.d, cc, s.b,
                                                       sel, s.n, valid ? t : -1, lane, body);
    if (!valid)
        return false;
    if (FIXED_ONLY)
        return true;
    int nown = own_blocks(own, sel, s.n, cc, lane);
    warp_stream_blocks<DP, KEYS, ST>(pool + (size_t)warp * 2 * ST * KEYS * mcfg<DP>::LD, K, V,
                                     base, stride, s.d, own, nown, s.b, t, lane, body);
    return true;
}

// Shared memory (and the carveout that lets several blocks hold it) of a warp-per-position
// kernel.
template <class Kernel> static nsa_status slcw_prepare(nsa_context *ctx, Kernel kernel, size_t bytes)
{
    NSA_TRY(allow_smem(ctx, kernel, bytes));
    NSA_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                      cudaSharedmemCarveoutMaxShared));
    return NSA_OK;
}

// A fragments of 16 rows row0 .. of X [rows, d] straight from global memory (zero past d).
template <int DP>
__device__ __forceinline__ void global_a_frags(uint32_t (&af)[DP / 16][4], const bf16 *X,
                                               size_t row0, int d, int lane)
{
    int gq = lane / 4, c4 = lane % 4;
#pragma unroll
    for (int ks = 0; ks < DP / 16; ks++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int r = gq + 8 * (e & 1), col = ks * 16 + 2 * c4 + 8 * (e >> 1);
            af[ks][e] = col < d ? *reinterpret_cast<const uint32_t *>(X + (row0 + r) * d + col)
                                : 0u;
        }
}

// ---- the forward's online-softmax state of a warp's 16 rows (rows g and g + 8 a thread)

template <int DP> struct fwd_acc {
    float m[2], l[2], o[DP / 8][4];
    __device__ __forceinline__ void reset()
    {
        m[0] = m[1] = -INFINITY;
        l[0] = l[1] = 0.0f;
        frag_zero(o);
    }
    // Normalises o; lse[i] (natural log) of row g + 8 i, -inf without keys.
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

// Row g + 8 ii of a warp's C fragments x (DP columns), times `scale`, into dst[0 .. d) (fp32).
template <int DP>
__device__ __forceinline__ void store_frag_row(float *dst, const float (&x)[DP / 8][4], int ii,
                                               float scale, int lane, int d)
{
    int c = lane % 4;
#pragma unroll
    for (int nt = 0; nt < DP / 8; nt++) {
        int col = nt * 8 + 2 * c;
        if (col < d)
            *reinterpret_cast<float2 *>(dst + col) =
                make_float2(x[nt][2 * ii] * scale, x[nt][2 * ii + 1] * scale);
    }
}

// The same as bf16 for NT (even) n-tiles, columns past ncols (a multiple of 8) skipped:
// lanes swap a value with their neighbour (lane ^ 1) so that each stores 8 bytes, four
// columns of one n-tile, and a quad's stores fill one 32-byte sector (two n-tiles) where
// 4-byte stores would fill half of two.
template <int NT>
__device__ __forceinline__ void store_row_bf16(bf16 *dst, const float (&x)[NT][4], int ii,
                                               float scale, int lane, int ncols)
{
    static_assert(NT % 2 == 0, "pairs of n-tiles");
    int c4 = lane % 4;
    bool odd = c4 & 1;
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
        __nv_bfloat162 a = __floats2bfloat162_rn(x[nt][2 * ii] * scale, x[nt][2 * ii + 1] * scale);
        __nv_bfloat162 b =
            __floats2bfloat162_rn(x[nt + 1][2 * ii] * scale, x[nt + 1][2 * ii + 1] * scale);
        uint32_t ua = *reinterpret_cast<uint32_t *>(&a), ub = *reinterpret_cast<uint32_t *>(&b);
        // even lanes keep n-tile nt (columns 2 c4 .. 2 c4 + 3), odd ones n-tile nt + 1
        // (columns 2 (c4 - 1) ..): each sends the half its neighbour keeps
        uint32_t got = __shfl_xor_sync(0xffffffffu, odd ? ua : ub, 1);
        uint2 v = odd ? make_uint2(got, ub) : make_uint2(ua, got);
        int col = (nt + (odd ? 1 : 0)) * 8 + 2 * (c4 & 2);
        if (col < ncols)
            *reinterpret_cast<uint2 *>(dst + col) = v;
    }
}

// Row g + 8 ii of a warp's online-softmax state (m in log2 units, l, o: DP columns) as one
// partial of the key-centric paths: o / l into dst[0 .. d) (P: bf16 or float) and the lse
// (natural log; -inf without keys) into *lse by the quad's first lane. (bf16: every lane
// of the warp calls it, store_row_bf16 shuffles.)
template <int DP, class P>
__device__ __forceinline__ void store_partial_row(P *dst, float *lse, int ii,
                                                  const float (&m)[2], const float (&l)[2],
                                                  const float (&o)[DP / 8][4], int lane, int d)
{
    float inv = l[ii] > 0.0f ? 1.0f / l[ii] : 0.0f;
    if (lane % 4 == 0)
        *lse = l[ii] > 0.0f ? (m[ii] + log2f(l[ii])) * LN2 : -INFINITY;
    if constexpr (sizeof(P) == sizeof(bf16))
        store_row_bf16<DP / 8>(dst, o, ii, inv, lane, d);
    else
        store_frag_row<DP>(dst, o, ii, inv, lane, d);
}

// The first slot of sel[n] (a position's selection) that holds block blk, -1 for none; every
// lane of the warp calls it and gets the same answer.
static __device__ __forceinline__ int warp_slot_of(const int32_t *sel, int n, int blk, int lane)
{
    for (int i0 = 0; i0 < n; i0 += 32) {
        unsigned hit = __ballot_sync(0xffffffffu, i0 + lane < n && sel[i0 + lane] == blk);
        if (hit)
            return i0 + __ffs(hit) - 1;
    }
    return -1;
}

// Four columns of a partial row as floats. CG: through L2 only (ld.global.cg), for partials
// other thread blocks wrote during the same kernel (L1 is not coherent).
template <bool CG> static __device__ __forceinline__ float4 part4(const float *p)
{
    return CG ? __ldcg(reinterpret_cast<const float4 *>(p))
              : *reinterpret_cast<const float4 *>(p);
}
template <bool CG> static __device__ __forceinline__ float4 part4(const bf16 *p)
{
    uint2 u = CG ? __ldcg(reinterpret_cast<const uint2 *>(p)) : *reinterpret_cast<const uint2 *>(p);
    float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u.x));
    float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u.y));
    return make_float4(a.x, a.y, b.x, b.y);
}
template <bool CG> static __device__ __forceinline__ float part1(const float *p)
{
    return CG ? __ldcg(p) : *p;
}

// What the merge of a row's selected-path partials writes and reads besides them: out = g0
// o_cmp + g1 o_slc + g2 o_win, o_slc (when kept), lse slot 1 (when kept).
struct slc_sum_io {
    float *out, *o_slc, *lse3;
    const float *o_cmp, *o_win, *gates;
};

// Four columns of the gated sum g0 oc + g1 os + g2 ow.
static __device__ __forceinline__ float4 gated_sum4(float g0, float g1, float g2, float4 oc,
                                                    float4 os, float4 ow)
{
    return make_float4(g0 * oc.x + g1 * os.x + g2 * ow.x, g0 * oc.y + g1 * os.y + g2 * ow.y,
                       g0 * oc.z + g1 * os.z + g2 * ow.z, g0 * oc.w + g1 * os.w + g2 * ow.w);
}

// acc[0 .. 8) += w x, x eight bf16 columns in 16 bytes.
static __device__ __forceinline__ void add_bf16x8(float (&acc)[8], uint4 x, float w)
{
    const uint32_t xs[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&xs[j]));
        acc[2 * j] += w * f.x;
        acc[2 * j + 1] += w * f.y;
    }
}

// Whether slot i (< ns) of a position's selected-path partials was written (sel: the
// position's selection, t the position, b the block size): a block's own slot when it is one
// (>= 0), but in LAYOUT 2 for the paper's fixed blocks, whose partial is slot n together.
template <int LAYOUT>
static __device__ __forceinline__ bool slot_written(const int32_t *sel, int i, int n, int t,
                                                    int b)
{
    return i == n || (sel[i] >= 0 && (LAYOUT != 2 || !paper_fixed(sel[i], t, b)));
}

// Half a warp (lanes 16 hw .. 16 hw + 15) merges row `row` (when active; every lane of the
// warp calls it, the shuffles stay within each half) as slc_combine_row does, for bf16
// partials in layout 1 or 2 (ns = n or n + 1 <= 32 slots), loaded through L2 only: 8
// columns a lane (d <= 128), and every used slot's partial (16 at most), the lse and the
// other paths' rows loaded at once, one round trip to L2 or HBM a row where the combine's
// warp makes four. False (on every lane, nothing written) when a row of the warp has more
// than 16 used slots: the caller merges both by slc_combine_row.
template <int LAYOUT>
static __device__ __forceinline__ bool slc_merge_row_half(size_t row, bool active, int lane,
                                                          const slc_sum_io &io,
                                                          const bf16 *part_o,
                                                          const float *part_lse,
                                                          const int32_t *idx,
                                                          const attn_shape &s)
{
    static_assert(LAYOUT == 1 || LAYOUT == 2, "partials of a position side by side");
    const int hl = lane & 15, hbase = lane & 16;
    int h = (int)(row % s.H), t = (int)(row / s.H % s.T), ns = s.n + (LAYOUT == 2);
    if (ns > 32 || s.d > 128) // (the same for both rows)
        return false;
    size_t bt = row / s.H, pos = bt * s.G + h / s.hpg;
    size_t base = pos * ns * s.hpg + h % s.hpg; // slot i: base + i * hpg
    const int32_t *sel = idx + pos * s.n;
    auto used = [&](int i) {
        return active && i < ns && slot_written<LAYOUT>(sel, i, s.n, t, s.b);
    };
    // the half's used slots (bit i: slot i), then slot_of[u]: the u-th of them, in order
    unsigned lo = __ballot_sync(0xffffffffu, used(hl)), hi = __ballot_sync(0xffffffffu, used(hl + 16));
    unsigned m = (lo >> hbase & 0xffffu) | (hi >> hbase & 0xffffu) << 16;
    int cnt = __popc(m);
    if (!__all_sync(0xffffffffu, cnt <= 16))
        return false;
    int my_slot = hl < cnt ? (int)__fns(m, 0, hl + 1) : -1;
    float lsei = my_slot >= 0 ? __ldcg(part_lse + base + (size_t)my_slot * s.hpg) : -INFINITY;
    int c = 8 * hl;
    bool on = active && c < s.d;
    uint4 x[16];
#pragma unroll
    for (int u = 0; u < 16; u++) {
        int su = __shfl_sync(0xffffffffu, my_slot, hbase + u);
        x[u] = on && su >= 0
                   ? __ldcg(reinterpret_cast<const uint4 *>(part_o + (base + (size_t)su * s.hpg) * s.d + c))
                   : make_uint4(0u, 0u, 0u, 0u);
    }
    size_t at = row * s.d + c;
    float4 z = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    float4 oc0 = on ? *reinterpret_cast<const float4 *>(io.o_cmp + at) : z;
    float4 oc1 = on ? *reinterpret_cast<const float4 *>(io.o_cmp + at + 4) : z;
    float4 ow0 = on ? *reinterpret_cast<const float4 *>(io.o_win + at) : z;
    float4 ow1 = on ? *reinterpret_cast<const float4 *>(io.o_win + at + 4) : z;
    float g0 = 0.0f, g1 = 0.0f, g2 = 0.0f;
    if (active) {
        g0 = io.gates[row * 3 + 0];
        g1 = io.gates[row * 3 + 1];
        g2 = io.gates[row * 3 + 2];
    }
    float mx = lsei;
#pragma unroll
    for (int off = 8; off > 0; off >>= 1)
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float wsum = my_slot >= 0 && mx > -INFINITY ? __expf(lsei - mx) : 0.0f;
#pragma unroll
    for (int off = 8; off > 0; off >>= 1)
        wsum += __shfl_xor_sync(0xffffffffu, wsum, off);
    float lse = mx > -INFINITY ? mx + __logf(wsum) : -INFINITY;
    float w = my_slot >= 0 && lse > -INFINITY ? __expf(lsei - lse) : 0.0f;
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int u = 0; u < 16; u++) { // in slot order
        float wu = __shfl_sync(0xffffffffu, w, hbase + u);
        if (wu != 0.0f)
            add_bf16x8(acc, x[u], wu);
    }
    if (active && hl == 0 && io.lse3)
        io.lse3[row * 3 + 1] = lse;
    if (!on)
        return true;
    float4 a0 = make_float4(acc[0], acc[1], acc[2], acc[3]);
    float4 a1 = make_float4(acc[4], acc[5], acc[6], acc[7]);
    if (io.o_slc) {
        *reinterpret_cast<float4 *>(io.o_slc + at) = a0;
        *reinterpret_cast<float4 *>(io.o_slc + at + 4) = a1;
    }
    *reinterpret_cast<float4 *>(io.out + at) = gated_sum4(g0, g1, g2, oc0, a0, ow0);
    *reinterpret_cast<float4 *>(io.out + at + 4) = gated_sum4(g0, g1, g2, oc1, a1, ow1);
    return true;
}

// One warp merges row `row`'s partials by their lse (slots of unused entries skipped: their
// partials were never written), then writes lse slot 1, o_slc and the gated sum. Lanes hold
// the slots' weights (32 slots at a time) and 4 consecutive columns each. Partials P (float
// or bf16) of (row, slot): at row * n + slot (LAYOUT 0, attention_bf16_slc_kv.cu), or at
// (((b T + t) G + g) ns + slot) hpg + hh, a position's heads side by side
// (attention_bf16_slc_kc.cu): LAYOUT 1 ns = n; LAYOUT 2 ns = n + 1, slot n holding the
// paper's fixed blocks together (the warp kernel's partial) and the slots of the fixed blocks
// unused. part_lse likewise, o at that index times d. CG: partials loaded through L2 only.
template <class P, int LAYOUT, bool CG>
static __device__ __forceinline__ void slc_combine_row(size_t row, int lane, const slc_sum_io &io,
                                                       const P *part_o, const float *part_lse,
                                                       const int32_t *idx, const attn_shape &s)
{
    int h = (int)(row % s.H);
    size_t bt = row / s.H; // b * T + t
    const int32_t *sel = idx + (bt * s.G + h / s.hpg) * s.n;
    // partial of slot i < ns: base + i * sstride; used(i): written
    int ns = s.n + (LAYOUT == 2), t = (int)(bt % s.T);
    size_t base = LAYOUT ? (bt * s.G + h / s.hpg) * ns * s.hpg + h % s.hpg : row * s.n;
    size_t sstride = LAYOUT ? (size_t)s.hpg : 1;
    auto used = [&](int i) { return slot_written<LAYOUT>(sel, i, s.n, t, s.b); };
    float mx = -INFINITY;
    for (int i = lane; i < ns; i += 32)
        if (used(i))
            mx = fmaxf(mx, part1<CG>(part_lse + base + i * sstride));
    mx = warp_max(mx);
    float wsum = 0.0f;
    if (mx > -INFINITY)
        for (int i = lane; i < ns; i += 32)
            if (used(i))
                wsum += __expf(part1<CG>(part_lse + base + i * sstride) - mx);
    wsum = warp_sum(wsum);
    float lse = mx > -INFINITY ? mx + __logf(wsum) : -INFINITY;
    if (io.lse3 && lane == 0)
        io.lse3[row * 3 + 1] = lse;
    float g0 = io.gates[row * 3 + 0], g1 = io.gates[row * 3 + 1], g2 = io.gates[row * 3 + 2];
    for (int c0 = 0; c0 < s.d; c0 += 128) { // every lane runs the shuffles
        int c = c0 + 4 * lane;
        bool on = c < s.d;
        float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (int i0 = 0; i0 < ns; i0 += 32) {
            int i = i0 + lane;
            float w = i < ns && used(i) && lse > -INFINITY
                          ? __expf(part1<CG>(part_lse + base + i * sstride) - lse)
                          : 0.0f;
            int cnt = min(32, ns - i0);
            // eight slots' loads in flight at a time, then their sum in slot order
            for (int j0 = 0; j0 < cnt; j0 += 8) {
                float wj[8];
                float4 x[8];
#pragma unroll
                for (int u = 0; u < 8; u++) {
                    int j = j0 + u; // (< 32; lanes past the chunk hold w = 0)
                    wj[u] = __shfl_sync(0xffffffffu, w, j);
                    if (!on) // unused slot (never written), no weight, or past d
                        wj[u] = 0.0f;
                    x[u] = wj[u] != 0.0f
                               ? part4<CG>(part_o + (base + (size_t)(i0 + j) * sstride) * s.d + c)
                               : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                }
#pragma unroll
                for (int u = 0; u < 8; u++)
                    if (wj[u] != 0.0f) {
                        acc.x += wj[u] * x[u].x;
                        acc.y += wj[u] * x[u].y;
                        acc.z += wj[u] * x[u].z;
                        acc.w += wj[u] * x[u].w;
                    }
            }
        }
        if (!on)
            continue;
        size_t at = row * s.d + c;
        if (io.o_slc)
            *reinterpret_cast<float4 *>(io.o_slc + at) = acc;
        float4 oc = *reinterpret_cast<const float4 *>(io.o_cmp + at);
        float4 ow = *reinterpret_cast<const float4 *>(io.o_win + at);
        *reinterpret_cast<float4 *>(io.out + at) = gated_sum4(g0, g1, g2, oc, acc, ow);
    }
}

// Rows e0 and e0 + 1 (< nrows) by one warp: half a warp a row where slc_merge_row_half can,
// else one after the other by slc_combine_row (row_of: a row's index from e).
template <int LAYOUT, bool CG, class RowOf>
static __device__ __forceinline__ void slc_merge_row_pair(size_t e0, size_t nrows, RowOf row_of,
                                                          int lane, const slc_sum_io &io,
                                                          const bf16 *part_o,
                                                          const float *part_lse,
                                                          const int32_t *idx,
                                                          const attn_shape &s)
{
    size_t e = e0 + lane / 16;
    if (slc_merge_row_half<LAYOUT>(row_of(e < nrows ? e : e0), e < nrows, lane, io, part_o,
                                   part_lse, idx, s))
        return;
    for (size_t r = e0; r < e0 + 2 && r < nrows; r++)
        slc_combine_row<bf16, LAYOUT, CG>(row_of(r), lane, io, part_o, part_lse, idx, s);
}

// Stores the 16 rows row0 .. row0 + 15 of an m-tile's o (C fragments, DP columns) as fp32
// into dst rows ([rows][d]); t[r] < 0 marks rows past the end, row[r] their index.
template <int DP>
__device__ __forceinline__ void store_frag_rows(float *dst, const int *t, const long long *row,
                                                const float (&o)[DP / 8][4], int row0, int lane,
                                                int d)
{
    int g = lane / 4;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        int r = row0 + g + 8 * i;
        if (t[r] >= 0)
            store_frag_row<DP>(dst + (size_t)row[r] * d, o, i, 1.0f, lane, d);
    }
}

// Positions a tile of R rows can span.
static inline __host__ __device__ int tile_positions(int R, int hpg)
{
    return R / hpg + 2;
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

// `bytes` when they fit in half the device memory free now, else 0: the key-block paths
// below take their partials' scratch only then and otherwise fall back to union tiles.
static inline size_t bytes_if_half_free(size_t bytes)
{
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return bytes <= free_b / 2 ? bytes : 0;
}

// The selected path and the gated sum for small groups, key blocks outside
// (attention_bf16_slc_kv.cu; training shapes: Tq = T). scratch holds
// nsa__cuda_slc_kv_scratch_bytes(s).
size_t nsa__cuda_slc_kv_scratch_bytes(const attn_shape &s);
nsa_status nsa__cuda_slc_kv_forward(nsa_context *ctx, const attn_shape &s, void *scratch,
                                    float *out, float *o_slc, float *lse3, const float *o_cmp,
                                    const float *o_win, const bf16 *q, const bf16 *k,
                                    const bf16 *v, const float *gates, const int32_t *idx);
// The selected path's partials merged by their lse per row, then lse slot 1 (lse3 may be
// NULL), o_slc (when not NULL) and out = g0 o_cmp + g1 o_slc + g2 o_win. part_o: bf16, or
// fp32 when fp32; (row, slot) at row * n + slot (layout 0: fp32 only), or at
// (((b T + t) G + g) ns + slot) hpg + hh (part_lse the same, part_o times d) with ns = n
// (layout 1) or n + 1 (layout 2: bf16 only; slot n holds the paper's fixed blocks
// together, their own slots are not read). Slots with idx < 0 are never read.
nsa_status nsa__cuda_slc_combine(nsa_context *ctx, const attn_shape &s, float *out,
                                 float *o_slc, float *lse3, const float *o_cmp,
                                 const float *o_win, const float *gates, const void *part_o,
                                 int fp32, int layout, const float *part_lse,
                                 const int32_t *idx);
// The paper's fixed blocks of every position by the warp-per-position kernel (H/G a multiple
// of 16, fixed selection, Tq = T): one bf16 partial a row (o normalised, lse) into slot n of
// part / part_lse, laid out as layout 2 of nsa__cuda_slc_combine (ns = n + 1 slots). idx:
// the selection (a position attends the fixed blocks it holds), or NULL for one the scoring
// computes (it holds them all), which need not exist yet.
nsa_status nsa__cuda_slc_fixed_partials(nsa_context *ctx, const attn_shape &s, void *part,
                                        float *part_lse, int ns, const bf16 *q, const bf16 *k,
                                        const bf16 *v, const int32_t *idx);
// The selected path and the gated sum with key blocks outside for H/G 16, 32 or 64, sm_90a
// with TMA, block_size <= 64, training shapes (Tq = T)
// (attention_bf16_slc_kc.cu; NSA_CUDA_SLC_KC = mode: 1 bf16 partials, 2 fp32, 3 bf16 with
// two row stages and three blocks a SM, 4 bf16 with the paper's fixed blocks by the warp
// kernel, 5 as 3 over chunks of `chunk` positions, merged in the kernel). scratch holds
// nsa__cuda_slc_kc_scratch_bytes(s, mode, chunk) (chunk: the context's kc_chunk; 0 where
// mode 5's index would have too many keys: the warp kernel runs).
size_t nsa__cuda_slc_kc_scratch_bytes(const attn_shape &s, int mode, int chunk);
// The mode NSA_CUDA_SLC_KC asks for this call: 1 .. 5, or for `auto` (6) 5 where K and V
// (B T G d bf16 each) fit in 24 MiB, which L2 then holds beside a chunk's partials, else 4;
// 0: none.
static inline int slc_kc_mode(const nsa__cuda_state *cs, const attn_shape &s)
{
    if (cs->slc_kc != 6)
        return cs->slc_kc;
    return (size_t)s.B * s.T * s.G * s.d * 2 * sizeof(bf16) <= ((size_t)24 << 20) ? 5 : 4;
}
// Whether those kernels cover the call (the shape and the code the driver loaded).
static inline bool slc_kc_covers(const nsa__cuda_state *cs, const attn_shape &s)
{
    return s.hpg % 16 == 0 && MB % s.hpg == 0 && s.b <= NB && s.Tq == s.T && s.q_start == 0 &&
           cs->sm90a && cs->use_tma;
}
// Mode 4 with the paper's fixed selection, before nsa__cuda_slc_kc_forward (and before or
// beside the scoring): the fixed blocks' partials into scratch (given_idx: the caller's
// selection, or NULL when the scoring computes it). Otherwise nothing.
nsa_status nsa__cuda_slc_kc_fixed(nsa_context *ctx, const attn_shape &s, int mode,
                                  void *scratch, const bf16 *q, const bf16 *k, const bf16 *v,
                                  const int32_t *given_idx);
nsa_status nsa__cuda_slc_kc_forward(nsa_context *ctx, const attn_shape &s, int mode,
                                    void *scratch, float *out, float *o_slc, float *lse3,
                                    const float *o_cmp, const float *o_win, const bf16 *q,
                                    const bf16 *k, const bf16 *v, const float *gates,
                                    const int32_t *idx);
// dq of the selected path for small groups, key blocks outside, added to dq: part_dq holds
// nsa__cuda_dq_slc_kv_scratch_bytes(s); si the inverted selection index of split_pos
// positions per work item.
size_t nsa__cuda_dq_slc_kv_scratch_bytes(const attn_shape &s);
nsa_status nsa__cuda_dq_slc_kv(nsa_context *ctx, const attn_shape &s, float *part_dq, float *dq,
                               const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dO16,
                               const float *gates, const float *lse3, const float *Dp,
                               const int32_t *idx, const sel_index &si, int split_pos);
// dq += the dq partials [rows, n, d] (bf16, or fp32 when fp32) of the selected path (the
// dk/dv kernel writes them for H/G a multiple of 16 on sm_90a), each row's used slots in
// order; rows whose lse3 slot 1 is -inf (no key seen, no partial written) are skipped.
nsa_status nsa__cuda_dq_slc_add(nsa_context *ctx, const attn_shape &s, float *dq,
                                const void *part_dq, int fp32, const int32_t *idx,
                                const float *lse3);

#endif // NSA_CUDA_ATTENTION_BF16_CUH
