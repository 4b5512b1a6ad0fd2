/*
 * attention.cu — the three attention paths of SPEC §3 on the GPU: the forward kernels and
 * the two ops of the backend table (attn_forward, attn_backward), computing what the CPU
 * backend (src/cpu/) computes. The backward kernels are in attention_backward.cu.
 *
 * Tiled kernels (head_dim <= 128), the paper's group-centric layout: one thread block
 * owns a tile of R = 64 query rows of one (batch, kv head) — consecutive (position, query
 * head) pairs, so the H/G heads that share a kv head share every key and value loaded —
 * and streams key tiles of KT = 64 rows through shared memory with an online softmax.
 *   forward  fwd_cmp:    compressed path; with cmp_attn, a second pass over the same
 *                        compressed keys turns probabilities into block scores and a warp
 *                        per position picks the top n (scoring + top-k fused).
 *            fwd_slcwin: sliding window; then, when H/G is not a multiple of 16, the
 *                        selected blocks (the union of the blocks the tile's positions
 *                        chose, each row masked to its own) and the gated sum.
 *            fwd_slc_pos: when H/G is a multiple of 16, the selected path per position
 *                        (a block owns 16 heads of one position and streams that
 *                        position's own blocks: no union waste) and the gated sum.
 *   backward (attention_backward.cu) query-centric dq, key-centric dk/dv.
 * All arithmetic is fp32 on the CUDA cores (no TF32), so results agree with the CPU to
 * ~1e-6 relative.
 *
 * Simple kernels (any head_dim up to 1024; NSA_CUDA_ATTN=simple selects them): a warp per
 * query row, keys one at a time; the backward adds dk/dv with atomics.
 *
 * Selection: mean_key scores are computed in exactly the CPU's order (no fused multiply-
 * add), so its indices equal the CPU's bit for bit; cmp_attn scores go through expf and
 * sums whose order differs from the CPU's, so two blocks whose scores differ by ~1 ulp may
 * be ordered differently (ties that are exact, such as blocks with no compressed token,
 * break to the lower index as on the CPU).
 */
#include "cuda/attention.cuh"

// ---------------------------------------------------------------------------------------
// Forward kernels (tiled)

// ---- forward: compressed path (+ fused cmp_attn scoring and top-k)

template <int DP> struct fwd_smem {
    static const size_t floats = (size_t)DP * PADR + (size_t)DP * PADK + (size_t)TK * (DP + 4) +
                                 (size_t)TK * PADR + TR;
    static size_t bytes() { return floats * sizeof(float) + sizeof(tile_rows); }
};

template <int DP, bool SCORE>
__global__ void __launch_bounds__(TILE_THREADS, 1)
    fwd_cmp_kernel(float *o_cmp, float *lse3, int32_t *idx, const float *q, const float *kc,
                   const float *vc, attn_shape s)
{
    extern __shared__ __align__(16) float smem[];
    float *Qt = smem, *Kt = Qt + DP * PADR, *Vr = Kt + DP * PADK, *Pt = Vr + TK * (DP + 4);
    float *lse_s = Pt + TK * PADR;
    tile_rows *tr = (tile_rows *)(lse_s + TR);
    int tile = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
    int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    tile_rows_init(tr, s, tile, g, b);
    __syncthreads();
    load_rows_t<DP>(Qt, q, tr, s.d);
    long long last_rg = min((long long)tile * TR + TR - 1, (long long)s.Tq * s.hpg - 1);
    int t_last = s.q_start + (int)(last_rg / s.hpg);
    int nc_max = visible_cmp(s, t_last);
    int vis[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int t = tr->t[ty * 4 + i];
        vis[i] = t < 0 ? 0 : visible_cmp(s, t);
    }
    size_t stride = (size_t)s.G * s.d, base = (size_t)b * s.Tc * stride + (size_t)g * s.d;
    softmax_acc<DP> acc;
    acc.reset();
    for (int j0 = 0; j0 < nc_max; j0 += TK) {
        int cnt = min(TK, nc_max - j0);
        __syncthreads();
        load_keys<DP>(Kt, NULL, NULL, Vr, kc, vc, base, stride, j0, cnt, s.d);
        __syncthreads();
        fwd_tile_step<DP>(acc, Qt, Kt, Vr, Pt, s.scale,
                          [&](int i, int j) { return j0 + tx * 4 + j < vis[i]; });
    }
    float lse[4];
    acc.finish(lse);
    store_rows<DP>(o_cmp, tr, acc.o, s.d);
    if (tx == 0) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int r = ty * 4 + i;
            lse_s[r] = lse[i];
            if (tr->t[r] >= 0)
                lse3[(size_t)tr->row[r] * 3 + 0] = lse[i];
        }
    }
    if (!SCORE)
        return;

    // Scores: the tile is QT = TR / hpg whole positions (the launcher checks TR % hpg == 0).
    int QT = TR / s.hpg;
    float *score = (float *)(tr + 1);
    int *tmp = (int *)(score + (size_t)QT * s.nb);
    int tq0 = tile * QT;
    for (int e = threadIdx.x; e < QT * s.nb; e += blockDim.x)
        score[e] = 0.0f;
    for (int j0 = 0; j0 < nc_max; j0 += TK) {
        int cnt = min(TK, nc_max - j0);
        __syncthreads();
        load_keys<DP>(Kt, NULL, NULL, NULL, kc, vc, base, stride, j0, cnt, s.d);
        __syncthreads();
        float sc[4][4] = {};
        mm_4x4<DP>(sc, Qt, PADR, ty * 4, Kt, PADK, tx * 4);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float l = lse_s[ty * 4 + i];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                bool ok = j0 + tx * 4 + j < vis[i];
                Pt[(tx * 4 + j) * PADR + ty * 4 + i] = ok ? expf(sc[i][j] * s.scale - l) : 0.0f;
            }
        }
        __syncthreads();
        int j_end = j0 + cnt - 1;
        int i_lo, i_hi;
        blocks_of_tokens(s, j0, j_end, i_lo, i_hi);
        int nblk = i_hi - i_lo + 1;
        for (int e = threadIdx.x; e < QT * nblk; e += blockDim.x) {
            int tqi = e / nblk, i = i_lo + e % nblk;
            int tq = tq0 + tqi;
            if (tq >= s.Tq || i >= num_candidates(s, s.q_start + tq))
                continue;
            int jl, jh;
            tokens_of_block(s, i, j0, j_end, jl, jh);
            float sum = 0.0f;
            for (int hh = 0; hh < s.hpg; hh++)
                for (int jj = jl; jj <= jh; jj++)
                    sum += Pt[(jj - j0) * PADR + tqi * s.hpg + hh];
            score[(size_t)tqi * s.nb + i] += sum;
        }
    }
    __syncthreads();
    tile_select(score, tmp, QT, tq0, b, g, idx, s);
}

// ---- forward: window, selected blocks, gated sum

template <int DP>
__global__ void __launch_bounds__(TILE_THREADS, 1)
    fwd_slcwin_kernel(float *out, float *o_slc, float *o_win, float *lse3, const float *o_cmp,
                      const float *q, const float *k, const float *v, const float *gates,
                      const int32_t *idx, int do_slc, attn_shape s)
{
    extern __shared__ __align__(16) float smem[];
    float *Qt = smem, *Kt = Qt + DP * PADR, *Vr = Kt + DP * PADK, *Pt = Vr + TK * (DP + 4);
    tile_rows *tr = (tile_rows *)(Pt + TK * PADR + TR);
    unsigned *bitmap = (unsigned *)(tr + 1);
    int tile = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
    int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    tile_rows_init(tr, s, tile, g, b);
    __syncthreads();
    load_rows_t<DP>(Qt, q, tr, s.d);
    long long first_rg = (long long)tile * TR;
    long long last_rg = min(first_rg + TR - 1, (long long)s.Tq * s.hpg - 1);
    int t_first = s.q_start + (int)(first_rg / s.hpg), t_last = s.q_start + (int)(last_rg / s.hpg);
    int trow[4];
#pragma unroll
    for (int i = 0; i < 4; i++)
        trow[i] = tr->t[ty * 4 + i];
    size_t stride = (size_t)s.G * s.d, base = (size_t)b * s.T * stride + (size_t)g * s.d;
    const int NV = tile_dims<DP>::NV;

    // sliding window
    softmax_acc<DP> acc;
    acc.reset();
    for (int key0 = max(0, t_first - s.w + 1); key0 <= t_last; key0 += TK) {
        int cnt = min(TK, t_last + 1 - key0);
        __syncthreads();
        load_keys<DP>(Kt, NULL, NULL, Vr, k, v, base, stride, key0, cnt, s.d);
        __syncthreads();
        fwd_tile_step<DP>(acc, Qt, Kt, Vr, Pt, s.scale, [&](int i, int j) {
            int kk = tx * 4 + j, pos = key0 + kk;
            return kk < cnt && trow[i] >= 0 && pos <= trow[i] && pos > trow[i] - s.w;
        });
    }
    float lse_win[4], ow[4][NV * 4];
    acc.finish(lse_win);
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int c = 0; c < NV * 4; c++)
            ow[i][c] = acc.o[i][c];
    if (o_win)
        store_rows<DP>(o_win, tr, ow, s.d);
    if (!do_slc) { // fwd_slc_pos_kernel takes the selected path and the gated sum
        if (lse3 && tx == 0) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int r = ty * 4 + i;
                if (tr->t[r] >= 0)
                    lse3[(size_t)tr->row[r] * 3 + 2] = lse_win[i];
            }
        }
        return;
    }

    // selected blocks: the union of the tile's selections, as a bitmap of blocks
    int nbw = (num_candidates(s, t_last) + 31) / 32;
    __syncthreads();
    for (int e = threadIdx.x; e < nbw; e += blockDim.x)
        bitmap[e] = 0u;
    __syncthreads();
    int tq_first = t_first - s.q_start, ntq = t_last - t_first + 1;
    for (int e = threadIdx.x; e < ntq * s.n; e += blockDim.x) {
        int blk = idx[(((size_t)b * s.Tq + tq_first + e / s.n) * s.G + g) * s.n + e % s.n];
        if (blk >= 0)
            atomicOr(&bitmap[blk / 32], 1u << (blk % 32));
    }
    __syncthreads();
    acc.reset();
    for (int wi = 0; wi < nbw; wi++) {
        unsigned bits = bitmap[wi];
        while (bits) {
            int blk = wi * 32 + __ffs(bits) - 1;
            bits &= bits - 1;
            bool sel[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                sel[i] = false;
                if (trow[i] >= 0) {
                    const int32_t *row_idx =
                        idx + (((size_t)b * s.Tq + (trow[i] - s.q_start)) * s.G + g) * s.n;
                    for (int slot = 0; slot < s.n; slot++)
                        sel[i] |= row_idx[slot] == blk;
                }
            }
            int blk_end = min(blk * s.b + s.b, t_last + 1);
            for (int key0 = blk * s.b; key0 < blk_end; key0 += TK) {
                int cnt = min(TK, blk_end - key0);
                __syncthreads();
                load_keys<DP>(Kt, NULL, NULL, Vr, k, v, base, stride, key0, cnt, s.d);
                __syncthreads();
                fwd_tile_step<DP>(acc, Qt, Kt, Vr, Pt, s.scale, [&](int i, int j) {
                    int kk = tx * 4 + j;
                    return kk < cnt && sel[i] && key0 + kk <= trow[i];
                });
            }
        }
    }
    float lse_slc[4];
    acc.finish(lse_slc);
    if (o_slc)
        store_rows<DP>(o_slc, tr, acc.o, s.d);
    if (lse3 && tx == 0) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int r = ty * 4 + i;
            if (tr->t[r] >= 0) {
                lse3[(size_t)tr->row[r] * 3 + 1] = lse_slc[i];
                lse3[(size_t)tr->row[r] * 3 + 2] = lse_win[i];
            }
        }
    }
    // gated sum
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int r = ty * 4 + i;
        if (tr->t[r] < 0)
            continue;
        size_t row = (size_t)tr->row[r];
        float g0 = gates[row * 3 + 0], g1 = gates[row * 3 + 1], g2 = gates[row * 3 + 2];
#pragma unroll
        for (int vv = 0; vv < NV; vv++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int c = 64 * vv + tx * 4 + e;
                if (c < s.d)
                    out[row * s.d + c] = g0 * o_cmp[row * s.d + c] + g1 * acc.o[i][vv * 4 + e] +
                                         g2 * ow[i][vv * 4 + e];
            }
    }
}

template <int DP>
__global__ void __launch_bounds__(POS_THREADS, 2)
    fwd_slc_pos_kernel(float *out, float *o_slc, float *lse3, const float *o_cmp,
                       const float *o_win, const float *q, const float *k, const float *v,
                       const float *gates, const int32_t *idx, int vec4, attn_shape s)
{
    extern __shared__ __align__(16) float smem[];
    const int LD = DP + 4, NC = DP / 32;
    float *Qr = smem, *Kr = Qr + PR * LD, *Vr = Kr + TK * LD, *Pt = Vr + TK * LD;
    int chunks = s.hpg / PR;
    int tq = blockIdx.x / chunks, hc = blockIdx.x % chunks, g = blockIdx.y, b = blockIdx.z;
    int t = s.q_start + tq;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    size_t row0 = ((size_t)b * s.Tq + tq) * s.H + (size_t)g * s.hpg + (size_t)hc * PR;
    for (int e = threadIdx.x; e < PR * DP; e += POS_THREADS) {
        int r = e / DP, c = e % DP;
        Qr[r * LD + c] = c < s.d ? q[(row0 + r) * s.d + c] : 0.0f;
    }
    float m[4], l[4], o[4][NC];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int e = 0; e < NC; e++)
            o[i][e] = 0.0f;
    }
    const int32_t *sel = idx + (((size_t)b * s.Tq + tq) * s.G + g) * s.n;
    size_t stride = (size_t)s.G * s.d, base = (size_t)b * s.T * stride + (size_t)g * s.d;
    for (int slot = 0; slot < s.n; slot++) {
        int blk = sel[slot];
        if (blk < 0)
            continue;
        int end = min(blk * s.b + s.b, t + 1);
        for (int key0 = blk * s.b; key0 < end; key0 += TK) {
            int cnt = min(TK, end - key0);
            __syncthreads();
            load_rows2<DP, POS_THREADS>(Kr, Vr, k, v, base, stride, key0, cnt, s.d, vec4);
            __syncthreads();
            float sc[4][2] = {};
            pos_scores<DP>(sc, Qr, Kr, warp, lane);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                float x0 = lane < cnt ? sc[i][0] * s.scale : -INFINITY;
                float x1 = lane + 32 < cnt ? sc[i][1] * s.scale : -INFINITY;
                float mx = fmaxf(x0, x1);
                for (int off = 16; off > 0; off >>= 1)
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
                float m_new = fmaxf(m[i], mx); // finite: cnt >= 1
                float alpha = expf(m[i] - m_new);
                float p0 = x0 == -INFINITY ? 0.0f : expf(x0 - m_new);
                float p1 = x1 == -INFINITY ? 0.0f : expf(x1 - m_new);
                float rs = warp_sum(p0 + p1);
                l[i] = l[i] * alpha + rs;
                m[i] = m_new;
#pragma unroll
                for (int e = 0; e < NC; e++)
                    o[i][e] *= alpha;
                Pt[lane * PADP + warp * 4 + i] = p0;
                Pt[(lane + 32) * PADP + warp * 4 + i] = p1;
            }
            __syncwarp();
            pos_accumulate<DP>(o, Pt, Vr, warp, lane);
        }
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        size_t row = row0 + warp * 4 + i;
        float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
        float lse = l[i] > 0.0f ? m[i] + logf(l[i]) : -INFINITY;
        if (lse3 && lane == 0)
            lse3[row * 3 + 1] = lse;
        float g0 = gates[row * 3 + 0], g1 = gates[row * 3 + 1], g2 = gates[row * 3 + 2];
#pragma unroll
        for (int e = 0; e < NC; e++) {
            int c = lane * NC + e;
            if (c >= s.d)
                continue;
            float os = o[i][e] * inv;
            if (o_slc)
                o_slc[row * s.d + c] = os;
            out[row * s.d + c] = g0 * o_cmp[row * s.d + c] + g1 * os + g2 * o_win[row * s.d + c];
        }
    }
}

// ---------------------------------------------------------------------------------------
// Launchers and the ops

template <int DP>
static nsa_status tiled_forward(nsa_context *ctx, const attn_shape &s, int phase, int fused,
                                float *out, float *o_cmp, float *o_slc, float *o_win, float *lse3,
                                int32_t *idx, const float *q, const float *k, const float *v,
                                const float *kc, const float *vc, const float *gates)
{
    cudaStream_t st = nsa__cuda_stream(ctx);
    long long tiles = ((long long)s.Tq * s.hpg + TR - 1) / TR;
    dim3 grid((unsigned)tiles, s.G, s.B);
    size_t base = fwd_smem<DP>::bytes();
    if (phase == 0) {
        if (fused) {
            size_t bytes = base + (size_t)(TR / s.hpg) * s.nb * sizeof(float) +
                           (size_t)(TILE_THREADS / 32) * s.n * sizeof(int);
            NSA_TRY(allow_smem(ctx, fwd_cmp_kernel<DP, true>, bytes));
            fwd_cmp_kernel<DP, true><<<grid, TILE_THREADS, bytes, st>>>(o_cmp, lse3, idx, q, kc,
                                                                        vc, s);
        } else {
            NSA_TRY(allow_smem(ctx, fwd_cmp_kernel<DP, false>, base));
            fwd_cmp_kernel<DP, false><<<grid, TILE_THREADS, base, st>>>(o_cmp, lse3, idx, q, kc,
                                                                        vc, s);
        }
        NSA_CUDA_LAUNCHED("fwd_cmp_kernel");
    } else {
        int per_position = s.hpg % PR == 0;
        size_t bytes = base + (size_t)((s.nb + 31) / 32) * sizeof(unsigned);
        NSA_TRY(allow_smem(ctx, fwd_slcwin_kernel<DP>, bytes));
        fwd_slcwin_kernel<DP><<<grid, TILE_THREADS, bytes, st>>>(
            out, o_slc, o_win, lse3, o_cmp, q, k, v, gates, idx, !per_position, s);
        NSA_CUDA_LAUNCHED("fwd_slcwin_kernel");
        if (per_position) {
            size_t pbytes = pos_smem<DP>::bytes(0);
            NSA_TRY(allow_smem(ctx, fwd_slc_pos_kernel<DP>, pbytes));
            int vec4 = s.d % 4 == 0 && ((uintptr_t)k | (uintptr_t)v) % 16 == 0;
            dim3 pgrid((unsigned)((size_t)s.Tq * (s.hpg / PR)), s.G, s.B);
            fwd_slc_pos_kernel<DP><<<pgrid, POS_THREADS, pbytes, st>>>(
                out, o_slc, lse3, o_cmp, o_win, q, k, v, gates, idx, vec4, s);
            NSA_CUDA_LAUNCHED("fwd_slc_pos_kernel");
        }
    }
    return NSA_OK;
}

// Can the fused scoring run: whole positions per tile and the scores fit in shared memory.
template <int DP> static int fused_fits(nsa_context *ctx, const attn_shape &s)
{
    if (TR % s.hpg != 0)
        return 0;
    size_t bytes = fwd_smem<DP>::bytes() + (size_t)(TR / s.hpg) * s.nb * sizeof(float) +
                   (size_t)(TILE_THREADS / 32) * s.n * sizeof(int);
    return bytes <= nsa__cuda(ctx)->max_smem_optin;
}

NSA_CUDA_OP(attn_forward, const nsa__attn_dims *dims, const float *q, const float *k,
            const float *v, const float *kc, const float *vc, const float *gates,
            const int32_t *given_idx, int32_t *idx, float *out, float *o_paths, float *lse)
{
    attn_shape s = shape_of(dims);
    if (s.Tq <= 0 || s.B <= 0)
        return NSA_OK;
    if (s.d > 1024)
        return nsa__error(NSA_ERR_UNSUPPORTED, "cuda attention: head_dim = %d: at most 1024",
                          s.d);
    if (ctx->precision == NSA_PRECISION_BF16) {
        int done;
        NSA_TRY(nsa__cuda_attn_forward_as_bf16(ctx, dims, q, k, v, kc, vc, gates, given_idx, idx,
                                               out, o_paths, lse, &done));
        if (done)
            return NSA_OK;
    }
    nsa__cuda_state *cs = nsa__cuda(ctx);
    cudaStream_t st = cs->stream;
    int tiled = !cs->attn_simple && s.d <= 128;
    int score = given_idx == NULL;
    int mean_key = score && dims->select_score == NSA_SELECT_MEAN_KEY;
    int fused = 0;
    if (tiled && score && !mean_key)
        fused = s.d <= 64 ? fused_fits<64>(ctx, s) : fused_fits<128>(ctx, s);

    // scratch: o_cmp, o_win and lse when the caller keeps none; block key sums for mean_key
    size_t rows = (size_t)s.B * s.Tq * s.H;
    size_t n_ocmp = o_paths ? 0 : 2 * rows * s.d, n_lse = lse ? 0 : rows * 3;
    size_t n_kcum = mean_key ? (size_t)s.B * s.T * s.G * s.d : 0;
    float *scratch = NULL;
    if (n_ocmp + n_lse + n_kcum) {
        void *mem;
        NSA_TRY(nsa__cuda_scratch(ctx, (n_ocmp + n_lse + n_kcum) * sizeof(float), &mem));
        scratch = (float *)mem;
    }
    float *o_cmp = o_paths ? o_paths : scratch;
    float *lse3 = lse ? lse : scratch + n_ocmp;
    float *kcum = scratch + n_ocmp + n_lse;
    float *o_slc = o_paths ? o_paths + rows * s.d : NULL;
    float *o_win = o_paths ? o_paths + 2 * rows * s.d : scratch + rows * s.d;

    // 1. compressed path (+ fused cmp_attn selection)
    if (tiled) {
        if (s.d <= 64)
            NSA_TRY(tiled_forward<64>(ctx, s, 0, fused, out, o_cmp, o_slc, o_win, lse3, idx, q, k,
                                      v, kc, vc, gates));
        else
            NSA_TRY(tiled_forward<128>(ctx, s, 0, fused, out, o_cmp, o_slc, o_win, lse3, idx, q,
                                       k, v, kc, vc, gates));
    } else {
        NSA_TRY(nsa__cuda_attn_simple_forward(ctx, s, 0, out, o_cmp, o_slc, o_win, lse3, q, k,
                                              v, kc, vc, gates, idx));
    }
    // 2. selection
    size_t n_idx = rows / s.H * s.G * s.n;
    if (!score) {
        NSA_CUDA_TRY(cudaMemcpyAsync(idx, given_idx, n_idx * sizeof(int32_t),
                                     cudaMemcpyDeviceToDevice, st));
    } else if (mean_key || !fused) {
        NSA_TRY(nsa__cuda_attn_select(ctx, s, mean_key, idx, q, k, kc, lse3, kcum));
    }
    // 3. selected blocks, window, gated sum
    if (tiled) {
        if (s.d <= 64)
            return tiled_forward<64>(ctx, s, 1, fused, out, o_cmp, o_slc, o_win, lse ? lse3 : NULL,
                                     idx, q, k, v, kc, vc, gates);
        return tiled_forward<128>(ctx, s, 1, fused, out, o_cmp, o_slc, o_win, lse ? lse3 : NULL,
                                  idx, q, k, v, kc, vc, gates);
    }
    return nsa__cuda_attn_simple_forward(ctx, s, 1, out, o_cmp, o_slc, o_win, lse ? lse3 : NULL,
                                         q, k, v, kc, vc, gates, idx);
}

NSA_CUDA_OP(attn_backward, const nsa__attn_dims *dims, const float *q, const float *k,
            const float *v, const float *kc, const float *vc, const float *gates,
            const int32_t *idx, const float *o_paths, const float *lse, const float *dout,
            float *dq, float *dk, float *dv, float *dkc, float *dvc, float *dgates)
{
    attn_shape s = shape_of(dims);
    if (s.q_start != 0)
        return nsa__error(NSA_ERR_UNSUPPORTED, "cuda attention backward: q_start = %d: the "
                                               "backward runs on full sequences only",
                          s.q_start);
    if (s.T <= 0 || s.B <= 0)
        return NSA_OK;
    if (s.d > 1024)
        return nsa__error(NSA_ERR_UNSUPPORTED, "cuda attention: head_dim = %d: at most 1024",
                          s.d);
    if (ctx->precision == NSA_PRECISION_BF16) {
        int done;
        NSA_TRY(nsa__cuda_attn_backward_as_bf16(ctx, dims, q, k, v, kc, vc, gates, idx, o_paths,
                                                lse, dout, dq, dk, dv, dkc, dvc, dgates, &done));
        if (done)
            return NSA_OK;
    }
    if (!nsa__cuda(ctx)->attn_simple && s.d <= 128)
        return nsa__cuda_attn_tiled_backward(ctx, s, dq, dk, dv, dkc, dvc, dgates, q, k, v, kc, vc,
                                             gates, idx, o_paths, lse, dout);
    return nsa__cuda_attn_simple_backward(ctx, s, dq, dk, dv, dkc, dvc, dgates, q, k, v, kc, vc,
                                          gates, idx, o_paths, lse, dout);
}
