/*
 * attn_kernels.h — the register-tiled products, the vector exp and the packing helpers
 * that the CPU attention kernels (cpu_attention.c: NSA's three paths; dense_attention.c:
 * full causal attention) are built from.
 *
 * Layouts (dp = head_dim rounded up to 8; padding columns are zero):
 *   - a "panel" holds 8 consecutive keys transposed: [dp][8] floats, so that the score
 *     product S = Q K^T streams contiguous 8-wide vectors of keys;
 *   - "rows" are row-major [n][dp] copies of k or v (for P V, dS K and the key
 *     gradients).
 * Every product works on 4 rows of its output at a time (MR = 4) and on up to 24 columns
 * (3 AVX vectors), the register tile of a 16-register AVX2 machine: 12 accumulators, 3
 * B vectors and one broadcast. A portable path (plain loops) is used when the build has
 * no AVX2+FMA; it computes the same products.
 */
#ifndef NSA_CPU_ATTN_KERNELS_H
#define NSA_CPU_ATTN_KERNELS_H

#include <math.h>
#include <stddef.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && !defined(NSA_PORTABLE_KERNELS)
#define NSA_AVX2 1
#include <immintrin.h>
#else
#define NSA_AVX2 0
#endif

#if defined(__GNUC__)
#define NSA_KINLINE static inline __attribute__((always_inline))
#else
#define NSA_KINLINE static inline
#endif

#define NSA_MR 4 // output rows of one micro-kernel call

static inline int nsa__round8(int x)
{
    return (x + 7) & ~7;
}

static inline int nsa__round4(int x)
{
    return (x + 3) & ~3;
}

// A run of consecutive B rows for the row products: rows b + i*ldb, i < k.
typedef struct nsa__seg {
    const float *b;
    int k;
} nsa__seg;

// ---------------------------------------------------------------------------------------
// Vector exp: Cephes' expf polynomial (max error ~2 ulp on [-87, 88]); inputs below
// -87 (masked scores are -inf) give exactly 0.

#if NSA_AVX2
// Keeps the B vectors in registers: without it GCC folds each B load into all four FMAs
// that use it (12 loads per k instead of 3), and the kernel becomes load-bound.
#if defined(__GNUC__)
#define NSA_PIN3(a, b, c) __asm__("" : "+x"(a), "+x"(b), "+x"(c))
#else
#define NSA_PIN3(a, b, c) ((void)0)
#endif

NSA_KINLINE __m256 nsa__exp8(__m256 x)
{
    const __m256 lo = _mm256_set1_ps(-87.0f);
    __m256 zero_mask = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
    x = _mm256_max_ps(x, lo);
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    __m256 x2 = _mm256_mul_ps(x, x);
    y = _mm256_fmadd_ps(y, x2, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(zero_mask, y);
}

NSA_KINLINE float nsa__hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

NSA_KINLINE float nsa__hmax8(__m256 v)
{
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

static inline float nsa__expf_masked(float x)
{
    return x < -87.0f ? 0.0f : expf(x);
}

// Max of x[n] (n multiple of 8).
static inline float nsa__vmax(const float *x, int n)
{
#if NSA_AVX2
    __m256 m = _mm256_set1_ps(-INFINITY);
    for (int i = 0; i < n; i += 8)
        m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
    return nsa__hmax8(m);
#else
    float m = -INFINITY;
    for (int i = 0; i < n; i++)
        m = x[i] > m ? x[i] : m;
    return m;
#endif
}

// x[i] = exp(x[i] - shift) in place (n multiple of 8); returns the sum.
static inline float nsa__vexp_sum(float *x, int n, float shift)
{
#if NSA_AVX2
    __m256 s = _mm256_setzero_ps(), sh = _mm256_set1_ps(shift);
    for (int i = 0; i < n; i += 8) {
        __m256 e = nsa__exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh));
        _mm256_storeu_ps(x + i, e);
        s = _mm256_add_ps(s, e);
    }
    return nsa__hsum8(s);
#else
    float s = 0.0f;
    for (int i = 0; i < n; i++)
        s += x[i] = nsa__expf_masked(x[i] - shift);
    return s;
#endif
}

// x[i] = exp(x[i] - shift) in place, no sum (n multiple of 8).
static inline void nsa__vexp(float *x, int n, float shift)
{
#if NSA_AVX2
    __m256 sh = _mm256_set1_ps(shift);
    for (int i = 0; i < n; i += 8)
        _mm256_storeu_ps(x + i, nsa__exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh)));
#else
    for (int i = 0; i < n; i++)
        x[i] = nsa__expf_masked(x[i] - shift);
#endif
}

// ds[i] = p[i] * (dp[i] - D) in place into dp (n multiple of 8).
static inline void nsa__vdsoftmax(float *dp, const float *p, int n, float D)
{
#if NSA_AVX2
    __m256 dd = _mm256_set1_ps(D);
    for (int i = 0; i < n; i += 8)
        _mm256_storeu_ps(dp + i, _mm256_mul_ps(_mm256_loadu_ps(p + i),
                                               _mm256_sub_ps(_mm256_loadu_ps(dp + i), dd)));
#else
    for (int i = 0; i < n; i++)
        dp[i] = p[i] * (dp[i] - D);
#endif
}

static inline void nsa__vscale(float *x, int n, float a)
{
#if NSA_AVX2
    if ((n & 7) == 0) {
        __m256 av = _mm256_set1_ps(a);
        for (int i = 0; i < n; i += 8)
            _mm256_storeu_ps(x + i, _mm256_mul_ps(av, _mm256_loadu_ps(x + i)));
        return;
    }
#endif
    for (int i = 0; i < n; i++)
        x[i] *= a;
}

// y[i] = a * x[i] (n floats, any n).
static inline void nsa__vcopy_scaled(float *y, const float *x, int n, float a)
{
    int i = 0;
#if NSA_AVX2
    __m256 av = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(av, _mm256_loadu_ps(x + i)));
#endif
    for (; i < n; i++)
        y[i] = a * x[i];
}

// y[i] += a * x[i] (n floats, any n).
static inline void nsa__vaxpy(float *y, float a, const float *x, int n)
{
    int i = 0;
#if NSA_AVX2
    __m256 av = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++)
        y[i] += a * x[i];
}

// y[i] += x[i] (n floats, any n).
static inline void nsa__vadd(float *y, const float *x, int n)
{
    int i = 0;
#if NSA_AVX2
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_loadu_ps(x + i)));
#endif
    for (; i < n; i++)
        y[i] += x[i];
}

#if NSA_AVX2
// Stores a 4 x 8n tile (n = 1..3 vectors of 8 columns per row) from its accumulators.
static inline void nsa__mk_store_4x24(float *c, ptrdiff_t ldc, int n, __m256 c00, __m256 c01,
                                      __m256 c02, __m256 c10, __m256 c11, __m256 c12,
                                      __m256 c20, __m256 c21, __m256 c22, __m256 c30,
                                      __m256 c31, __m256 c32)
{
    _mm256_storeu_ps(c, c00);
    _mm256_storeu_ps(c + ldc, c10);
    _mm256_storeu_ps(c + 2 * ldc, c20);
    _mm256_storeu_ps(c + 3 * ldc, c30);
    if (n > 1) {
        _mm256_storeu_ps(c + 8, c01);
        _mm256_storeu_ps(c + ldc + 8, c11);
        _mm256_storeu_ps(c + 2 * ldc + 8, c21);
        _mm256_storeu_ps(c + 3 * ldc + 8, c31);
    }
    if (n > 2) {
        _mm256_storeu_ps(c + 16, c02);
        _mm256_storeu_ps(c + ldc + 16, c12);
        _mm256_storeu_ps(c + 2 * ldc + 16, c22);
        _mm256_storeu_ps(c + 3 * ldc + 16, c32);
    }
}
#endif

static inline float nsa__vdot(const float *a, const float *b, int n)
{
#if NSA_AVX2
    if ((n & 7) == 0) {
        __m256 s = _mm256_setzero_ps();
        for (int i = 0; i < n; i += 8)
            s = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s);
        return nsa__hsum8(s);
    }
#endif
    float s = 0.0f;
    for (int i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

// ---------------------------------------------------------------------------------------
// Panel product: C[4, 8*np] = A[4, K] [P_0 | ... | P_{np-1}], np <= 3, P_j [K][8].

#if NSA_AVX2
NSA_KINLINE void nsa__mk_panels_np(const int np, int K, const float *a, ptrdiff_t lda,
                                   const float *p0, const float *p1, const float *p2, float *c,
                                   ptrdiff_t ldc)
{
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00;
    __m256 c20 = c00, c21 = c00, c22 = c00, c30 = c00, c31 = c00, c32 = c00;
    const float *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda;
    for (int k = 0; k < K; k++) {
        __m256 b0 = _mm256_loadu_ps(p0 + 8 * k), b1 = b0, b2 = b0;
        if (np > 1)
            b1 = _mm256_loadu_ps(p1 + 8 * k);
        if (np > 2)
            b2 = _mm256_loadu_ps(p2 + 8 * k);
        NSA_PIN3(b0, b1, b2);
        __m256 x = _mm256_broadcast_ss(a0 + k);
        c00 = _mm256_fmadd_ps(x, b0, c00);
        if (np > 1)
            c01 = _mm256_fmadd_ps(x, b1, c01);
        if (np > 2)
            c02 = _mm256_fmadd_ps(x, b2, c02);
        x = _mm256_broadcast_ss(a1 + k);
        c10 = _mm256_fmadd_ps(x, b0, c10);
        if (np > 1)
            c11 = _mm256_fmadd_ps(x, b1, c11);
        if (np > 2)
            c12 = _mm256_fmadd_ps(x, b2, c12);
        x = _mm256_broadcast_ss(a2 + k);
        c20 = _mm256_fmadd_ps(x, b0, c20);
        if (np > 1)
            c21 = _mm256_fmadd_ps(x, b1, c21);
        if (np > 2)
            c22 = _mm256_fmadd_ps(x, b2, c22);
        x = _mm256_broadcast_ss(a3 + k);
        c30 = _mm256_fmadd_ps(x, b0, c30);
        if (np > 1)
            c31 = _mm256_fmadd_ps(x, b1, c31);
        if (np > 2)
            c32 = _mm256_fmadd_ps(x, b2, c32);
    }
    nsa__mk_store_4x24(c, ldc, np, c00, c01, c02, c10, c11, c12, c20, c21, c22, c30, c31, c32);
}
#endif

static inline void nsa__mk_panels(int np, int K, const float *a, ptrdiff_t lda, const float *p0,
                                  const float *p1, const float *p2, float *c, ptrdiff_t ldc)
{
#if NSA_AVX2
    if (np == 3)
        nsa__mk_panels_np(3, K, a, lda, p0, p1, p2, c, ldc);
    else if (np == 2)
        nsa__mk_panels_np(2, K, a, lda, p0, p1, p1, c, ldc);
    else
        nsa__mk_panels_np(1, K, a, lda, p0, p0, p0, c, ldc);
#else
    const float *pp[3] = {p0, p1, p2};
    for (int i = 0; i < NSA_MR; i++) {
        for (int j = 0; j < np; j++) {
            float acc[8] = {0};
            for (int k = 0; k < K; k++) {
                float x = a[i * lda + k];
                for (int l = 0; l < 8; l++)
                    acc[l] += x * pp[j][8 * k + l];
            }
            memcpy(c + i * ldc + 8 * j, acc, sizeof acc);
        }
    }
#endif
}

// C[M, 8*np] = A[M, K] [P_0 | ... ], panels given by pointer; M multiple of 4.
static inline void nsa__gemm_panels(int M, int K, const float *A, ptrdiff_t lda,
                                    const float *const *panels, int np, float *C, ptrdiff_t ldc)
{
    for (int j = 0; j < np; j += 3) {
        int n = np - j < 3 ? np - j : 3;
        const float *p0 = panels[j], *p1 = n > 1 ? panels[j + 1] : p0, *p2 = n > 2 ? panels[j + 2] : p0;
        for (int i = 0; i < M; i += NSA_MR)
            nsa__mk_panels(n, K, A + (ptrdiff_t)i * lda, lda, p0, p1, p2, C + (ptrdiff_t)i * ldc + 8 * j,
                           ldc);
    }
}

// Same, with the panels consecutive in memory (panel j at P + j * panel_stride).
static inline void nsa__gemm_panels_contig(int M, int K, const float *A, ptrdiff_t lda,
                                           const float *P, ptrdiff_t panel_stride, int np, float *C,
                                           ptrdiff_t ldc)
{
    for (int j = 0; j < np; j += 3) {
        int n = np - j < 3 ? np - j : 3;
        const float *p0 = P + j * panel_stride;
        for (int i = 0; i < M; i += NSA_MR)
            nsa__mk_panels(n, K, A + (ptrdiff_t)i * lda, lda, p0, p0 + panel_stride,
                           p0 + 2 * panel_stride, C + (ptrdiff_t)i * ldc + 8 * j, ldc);
    }
}

// ---------------------------------------------------------------------------------------
// Row product: C[4, 8*nv] (+)= sum_k A[i,k] B[k, n0 .. n0 + 8*nv), nv <= 3, the k of A
// running on through the segments of B (A[i,k] = a[i*a_rs + k*a_cs]).

#if NSA_AVX2
NSA_KINLINE void nsa__mk_rows_nv(const int nv, const nsa__seg *seg, int nseg, ptrdiff_t ldb,
                                 const float *a, ptrdiff_t a_rs, ptrdiff_t a_cs, float *c,
                                 ptrdiff_t ldc, int acc)
{
    __m256 c00, c01, c02, c10, c11, c12, c20, c21, c22, c30, c31, c32;
    if (acc) {
        c00 = _mm256_loadu_ps(c);
        c10 = _mm256_loadu_ps(c + ldc);
        c20 = _mm256_loadu_ps(c + 2 * ldc);
        c30 = _mm256_loadu_ps(c + 3 * ldc);
        c01 = c11 = c21 = c31 = c02 = c12 = c22 = c32 = _mm256_setzero_ps();
        if (nv > 1) {
            c01 = _mm256_loadu_ps(c + 8);
            c11 = _mm256_loadu_ps(c + ldc + 8);
            c21 = _mm256_loadu_ps(c + 2 * ldc + 8);
            c31 = _mm256_loadu_ps(c + 3 * ldc + 8);
        }
        if (nv > 2) {
            c02 = _mm256_loadu_ps(c + 16);
            c12 = _mm256_loadu_ps(c + ldc + 16);
            c22 = _mm256_loadu_ps(c + 2 * ldc + 16);
            c32 = _mm256_loadu_ps(c + 3 * ldc + 16);
        }
    } else {
        c00 = c01 = c02 = c10 = c11 = c12 = c20 = c21 = c22 = c30 = c31 = c32 = _mm256_setzero_ps();
    }
    const float *a0 = a, *a1 = a + a_rs, *a2 = a + 2 * a_rs, *a3 = a + 3 * a_rs;
    for (int s = 0; s < nseg; s++) {
        const float *b = seg[s].b;
        int K = seg[s].k;
        for (int k = 0; k < K; k++) {
            __m256 b0 = _mm256_loadu_ps(b), b1 = b0, b2 = b0;
            if (nv > 1)
                b1 = _mm256_loadu_ps(b + 8);
            if (nv > 2)
                b2 = _mm256_loadu_ps(b + 16);
            b += ldb;
            NSA_PIN3(b0, b1, b2);
            __m256 x = _mm256_broadcast_ss(a0);
            c00 = _mm256_fmadd_ps(x, b0, c00);
            if (nv > 1)
                c01 = _mm256_fmadd_ps(x, b1, c01);
            if (nv > 2)
                c02 = _mm256_fmadd_ps(x, b2, c02);
            x = _mm256_broadcast_ss(a1);
            c10 = _mm256_fmadd_ps(x, b0, c10);
            if (nv > 1)
                c11 = _mm256_fmadd_ps(x, b1, c11);
            if (nv > 2)
                c12 = _mm256_fmadd_ps(x, b2, c12);
            x = _mm256_broadcast_ss(a2);
            c20 = _mm256_fmadd_ps(x, b0, c20);
            if (nv > 1)
                c21 = _mm256_fmadd_ps(x, b1, c21);
            if (nv > 2)
                c22 = _mm256_fmadd_ps(x, b2, c22);
            x = _mm256_broadcast_ss(a3);
            c30 = _mm256_fmadd_ps(x, b0, c30);
            if (nv > 1)
                c31 = _mm256_fmadd_ps(x, b1, c31);
            if (nv > 2)
                c32 = _mm256_fmadd_ps(x, b2, c32);
            a0 += a_cs;
            a1 += a_cs;
            a2 += a_cs;
            a3 += a_cs;
        }
    }
    nsa__mk_store_4x24(c, ldc, nv, c00, c01, c02, c10, c11, c12, c20, c21, c22, c30, c31, c32);
}
#endif

// One 4 x 8*nv tile; b of every segment already offset to the tile's first column.
static inline void nsa__mk_rows(int nv, const nsa__seg *seg, int nseg, ptrdiff_t ldb,
                                const float *a, ptrdiff_t a_rs, ptrdiff_t a_cs, float *c,
                                ptrdiff_t ldc, int acc)
{
#if NSA_AVX2
    if (nv == 3)
        nsa__mk_rows_nv(3, seg, nseg, ldb, a, a_rs, a_cs, c, ldc, acc);
    else if (nv == 2)
        nsa__mk_rows_nv(2, seg, nseg, ldb, a, a_rs, a_cs, c, ldc, acc);
    else
        nsa__mk_rows_nv(1, seg, nseg, ldb, a, a_rs, a_cs, c, ldc, acc);
#else
    for (int i = 0; i < NSA_MR; i++) {
        float out[24];
        for (int n = 0; n < 8 * nv; n++)
            out[n] = acc ? c[i * ldc + n] : 0.0f;
        ptrdiff_t k = 0;
        for (int s = 0; s < nseg; s++)
            for (int kk = 0; kk < seg[s].k; kk++, k++) {
                float x = a[i * a_rs + k * a_cs];
                const float *b = seg[s].b + kk * ldb;
                for (int n = 0; n < 8 * nv; n++)
                    out[n] += x * b[n];
            }
        memcpy(c + i * ldc, out, sizeof(float) * 8 * nv);
    }
#endif
}

#define NSA_KCHUNK 256 // keys per K-block of the row products (B block stays in L2)

// C[M, N] (+)= A[M, K] B[K, N] with B given as segments of rows (ldb apart), N multiple
// of 8, M multiple of 4. Long K is cut into blocks of NSA_KCHUNK rows so that the B
// block is reused from cache across the row tiles.
static inline void nsa__gemm_rows(int M, int N, const float *A, ptrdiff_t a_rs, ptrdiff_t a_cs,
                                  const nsa__seg *seg, int nseg, ptrdiff_t ldb, float *C,
                                  ptrdiff_t ldc, int acc)
{
    nsa__seg blk[64], off[64];
    int s = 0, s_pos = 0; // current segment and rows of it consumed
    ptrdiff_t k0 = 0;
    int first = 1;
    while (s < nseg || first) {
        int nb = 0, kb = 0;
        while (s < nseg && kb < NSA_KCHUNK && nb < 64) {
            int take = seg[s].k - s_pos;
            if (take > NSA_KCHUNK - kb)
                take = NSA_KCHUNK - kb;
            blk[nb].b = seg[s].b + (ptrdiff_t)s_pos * ldb;
            blk[nb].k = take;
            nb++;
            kb += take;
            s_pos += take;
            if (s_pos == seg[s].k) {
                s++;
                s_pos = 0;
            }
        }
        int a_acc = acc || !first;
        if (nb == 0 && !first)
            break;
        for (int n0 = 0; n0 < N; n0 += 24) {
            int nv = (N - n0) / 8 < 3 ? (N - n0) / 8 : 3;
            for (int i = 0; i < nb; i++) {
                off[i].b = blk[i].b + n0;
                off[i].k = blk[i].k;
            }
            for (int i = 0; i < M; i += NSA_MR)
                nsa__mk_rows(nv, off, nb, ldb, A + (ptrdiff_t)i * a_rs + k0 * a_cs, a_rs, a_cs,
                             C + (ptrdiff_t)i * ldc + n0, ldc, a_acc);
        }
        k0 += kb;
        first = 0;
    }
}

// ---------------------------------------------------------------------------------------
// Packing

// Panels of x rows [row0, row0 + 8*np) (row r at x + r*stride, d floats; rows >= n_rows
// and columns >= d are zero) into dst [np][dp][8].
static inline void nsa__pack_panels(float *dst, const float *x, ptrdiff_t stride, int d, int dp,
                                    int row0, int np, int n_rows)
{
    for (int p = 0; p < np; p++) {
        float *out = dst + (size_t)p * dp * 8;
        for (int j = 0; j < 8; j++) {
            int r = row0 + 8 * p + j;
            if (r < n_rows) {
                const float *src = x + (ptrdiff_t)r * stride;
                for (int c = 0; c < d; c++)
                    out[c * 8 + j] = src[c];
                for (int c = d; c < dp; c++)
                    out[c * 8 + j] = 0.0f;
            } else {
                for (int c = 0; c < dp; c++)
                    out[c * 8 + j] = 0.0f;
            }
        }
    }
}

// Rows [row0, row0 + n) of x (stride apart, d floats) into dst [n][dp], zero padded;
// rows >= n_rows are zero.
static inline void nsa__pack_rows(float *dst, const float *x, ptrdiff_t stride, int d, int dp,
                                  int row0, int n, int n_rows, float alpha)
{
    for (int i = 0; i < n; i++) {
        float *out = dst + (size_t)i * dp;
        int r = row0 + i;
        if (r < n_rows) {
            nsa__vcopy_scaled(out, x + (ptrdiff_t)r * stride, d, alpha);
            for (int c = d; c < dp; c++)
                out[c] = 0.0f;
        } else {
            memset(out, 0, sizeof(float) * (size_t)dp);
        }
    }
}

#endif // NSA_CPU_ATTN_KERNELS_H
