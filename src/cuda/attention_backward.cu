/*
 * attention_backward.cu — the tiled backward of the three attention paths (head_dim <=
 * 128); recomputes probabilities from the forward's log-sum-exps.
 *
 *   bwd_dq:          query-centric over 64-row tiles: dq of the compressed and window paths
 *                    (and of the selected path when H/G is not a multiple of 16), dgates,
 *                    and D = (gate * dout) . o per row and path for the passes below.
 *   bwd_dq_slc_pos:  dq of the selected path per position (16 heads a block), +=.
 *   bwd_dkv<window>: key-centric, one block per 64-key tile, all its queries; dk, dv =.
 *   bwd_dkv<cmp>:    key-centric, a block per (key tile, piece of 4096 query rows); dkc,
 *                    dvc added with atomics (one add per element per block).
 *   bwd_dkv<slc>:    key-centric over an inverted index of the selection built on the GPU
 *                    (count, scan, fill): a block per (selected block, piece of its query
 *                    list), dk, dv added with atomics. Block 0 is chosen by every query
 *                    (select_fixed paper), so its list is cut into pieces to spread it.
 * The atomics make dk, dv, dkc, dvc vary in their last bits from run to run (summation
 * order); dq and dgates do not.
 */
#include "cuda/attention.cuh"

// ---- backward: dq and dgates, query-centric

template <int DP> struct dq_smem {
    static const size_t floats = 2 * (size_t)DP * PADR + 2 * (size_t)DP * PADK +
                                 (size_t)TK * (DP + 4) + (size_t)TK * PADR + 9 * TR;
    static size_t bytes() { return floats * sizeof(float) + sizeof(tile_rows); }
};

// The key tiles of one path for a query tile: calls step(key0, cnt, mask) per tile.
// path 0 compressed, 1 selected, 2 window.

template <int DP>
__global__ void __launch_bounds__(TILE_THREADS, 1)
    bwd_dq_kernel(float *dq, float *dgates, float *Dp_out, const float *q, const float *k,
                  const float *v, const float *kc, const float *vc, const float *gates,
                  const int32_t *idx, const float *o_paths, const float *lse3, const float *dout,
                  int do_slc, attn_shape s)
{
    extern __shared__ __align__(16) float smem[];
    float *Qt = smem, *dOt = Qt + DP * PADR, *Kt = dOt + DP * PADR, *Vt = Kt + DP * PADK;
    float *Kr = Vt + DP * PADK, *dSt = Kr + TK * (DP + 4);
    float *lse_s = dSt + TK * PADR, *gate_s = lse_s + 3 * TR, *Dp_s = gate_s + 3 * TR;
    tile_rows *tr = (tile_rows *)(Dp_s + 3 * TR);
    int tile = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
    int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    const int NV = tile_dims<DP>::NV;
    tile_rows_init(tr, s, tile, g, b);
    __syncthreads();
    load_rows_t<DP>(Qt, q, tr, s.d);
    load_rows_t<DP>(dOt, dout, tr, s.d);
    // dgates and D = (gate * dout) . o for each row and path: a warp per row
    size_t path_size = (size_t)s.B * s.T * s.H * s.d;
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int r = warp; r < TR; r += TILE_THREADS / 32) {
        int t = tr->t[r];
        size_t row = (size_t)tr->row[r];
        for (int c3 = 0; c3 < 3; c3++) {
            float gate = t >= 0 ? gates[row * 3 + c3] : 0.0f;
            float dg = 0.0f, dp = 0.0f;
            if (t >= 0)
                for (int c = lane; c < s.d; c += 32) {
                    float o = o_paths[c3 * path_size + row * s.d + c], dy = dout[row * s.d + c];
                    dg += dy * o;
                    dp += (gate * dy) * o;
                }
            dg = warp_sum(dg);
            dp = warp_sum(dp);
            if (lane == 0) {
                gate_s[r * 3 + c3] = gate;
                Dp_s[r * 3 + c3] = dp;
                lse_s[r * 3 + c3] = t >= 0 ? lse3[row * 3 + c3] : -INFINITY;
                if (t >= 0) {
                    dgates[row * 3 + c3] = dg;
                    Dp_out[row * 3 + c3] = dp;
                }
            }
        }
    }
    __syncthreads();
    long long first_rg = (long long)tile * TR;
    long long last_rg = min(first_rg + TR - 1, (long long)s.T * s.hpg - 1);
    int t_first = (int)(first_rg / s.hpg), t_last = (int)(last_rg / s.hpg);
    int trow[4];
#pragma unroll
    for (int i = 0; i < 4; i++)
        trow[i] = tr->t[ty * 4 + i];
    size_t stride = (size_t)s.G * s.d;
    float dqa[4][NV * 4] = {};

    // One key tile of path c3 with mask ok(i, j).
    auto step = [&](int c3, const float *K, const float *V, size_t base, int key0, int cnt,
                    auto ok) {
        __syncthreads();
        load_keys<DP>(Kt, Kr, Vt, NULL, K, V, base, stride, key0, cnt, s.d);
        __syncthreads();
        float sc[4][4] = {}, dp[4][4] = {};
        mm_4x4<DP>(sc, Qt, PADR, ty * 4, Kt, PADK, tx * 4);
        mm_4x4<DP>(dp, dOt, PADR, ty * 4, Vt, PADK, tx * 4);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int r = ty * 4 + i;
            float l = lse_s[r * 3 + c3], gate = gate_s[r * 3 + c3], D = Dp_s[r * 3 + c3];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                float ds = 0.0f;
                if (l != -INFINITY && ok(i, j)) {
                    float p = expf(sc[i][j] * s.scale - l);
                    ds = p * (gate * dp[i][j] - D) * s.scale;
                }
                dSt[(tx * 4 + j) * PADR + r] = ds;
            }
        }
        __syncthreads();
        mm_4xw<TK, NV>(dqa, dSt, PADR, ty * 4, Kr, DP + 4, tx * 4);
    };

    // compressed
    {
        int nc_max = visible_cmp(s, t_last);
        int vis[4];
#pragma unroll
        for (int i = 0; i < 4; i++)
            vis[i] = trow[i] < 0 ? 0 : visible_cmp(s, trow[i]);
        size_t base = (size_t)b * s.Tc * stride + (size_t)g * s.d;
        for (int j0 = 0; j0 < nc_max; j0 += TK)
            step(0, kc, vc, base, j0, min(TK, nc_max - j0),
                 [&](int i, int j) { return j0 + tx * 4 + j < vis[i]; });
    }
    size_t base = (size_t)b * s.T * stride + (size_t)g * s.d;
    // window
    for (int key0 = max(0, t_first - s.w + 1); key0 <= t_last; key0 += TK) {
        int cnt = min(TK, t_last + 1 - key0);
        step(2, k, v, base, key0, cnt, [&](int i, int j) {
            int kk = tx * 4 + j, pos = key0 + kk;
            return kk < cnt && trow[i] >= 0 && pos <= trow[i] && pos > trow[i] - s.w;
        });
    }
    if (!do_slc) { // bwd_dq_slc_pos_kernel adds the selected path
        store_rows<DP>(dq, tr, dqa, s.d);
        return;
    }
    // selected: the union of the tile's blocks (the bitmap lives after the row arrays)
    unsigned *bitmap = (unsigned *)(tr + 1);
    int nbw = (num_candidates(s, t_last) + 31) / 32;
    __syncthreads();
    for (int e = threadIdx.x; e < nbw; e += blockDim.x)
        bitmap[e] = 0u;
    __syncthreads();
    int ntq = t_last - t_first + 1;
    for (int e = threadIdx.x; e < ntq * s.n; e += blockDim.x) {
        int blk = idx[(((size_t)b * s.T + t_first + e / s.n) * s.G + g) * s.n + e % s.n];
        if (blk >= 0)
            atomicOr(&bitmap[blk / 32], 1u << (blk % 32));
    }
    __syncthreads();
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
                    const int32_t *row_idx = idx + (((size_t)b * s.T + trow[i]) * s.G + g) * s.n;
                    for (int slot = 0; slot < s.n; slot++)
                        sel[i] |= row_idx[slot] == blk;
                }
            }
            int blk_end = min(blk * s.b + s.b, t_last + 1);
            for (int key0 = blk * s.b; key0 < blk_end; key0 += TK) {
                int cnt = min(TK, blk_end - key0);
                step(1, k, v, base, key0, cnt, [&](int i, int j) {
                    int kk = tx * 4 + j;
                    return kk < cnt && sel[i] && key0 + kk <= trow[i];
                });
            }
        }
    }
    store_rows<DP>(dq, tr, dqa, s.d);
}

template <int DP>
__global__ void __launch_bounds__(POS_THREADS, 2)
    bwd_dq_slc_pos_kernel(float *dq, const float *q, const float *k, const float *v,
                          const float *gates, const int32_t *idx, const float *lse3,
                          const float *Dp, const float *dout, int vec4, attn_shape s)
{
    extern __shared__ __align__(16) float smem[];
    const int LD = DP + 4, NC = DP / 32;
    float *Qr = smem, *dOr = Qr + PR * LD, *Kr = dOr + PR * LD, *Vr = Kr + TK * LD;
    float *dSt = Vr + TK * LD;
    int chunks = s.hpg / PR;
    int t = blockIdx.x / chunks, hc = blockIdx.x % chunks, g = blockIdx.y, b = blockIdx.z;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    size_t row0 = ((size_t)b * s.T + t) * s.H + (size_t)g * s.hpg + (size_t)hc * PR;
    for (int e = threadIdx.x; e < PR * DP; e += POS_THREADS) {
        int r = e / DP, c = e % DP;
        Qr[r * LD + c] = c < s.d ? q[(row0 + r) * s.d + c] : 0.0f;
        dOr[r * LD + c] = c < s.d ? dout[(row0 + r) * s.d + c] : 0.0f;
    }
    float lse[4], gate[4], D[4], dqa[4][NC];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        size_t row = row0 + warp * 4 + i;
        lse[i] = lse3[row * 3 + 1];
        gate[i] = gates[row * 3 + 1];
        D[i] = Dp[row * 3 + 1];
#pragma unroll
        for (int e = 0; e < NC; e++)
            dqa[i][e] = 0.0f;
    }
    const int32_t *sel = idx + (((size_t)b * s.T + t) * s.G + g) * s.n;
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
            float sc[4][2] = {}, dp[4][2] = {};
            pos_scores<DP>(sc, Qr, Kr, warp, lane);
            pos_scores<DP>(dp, dOr, Vr, warp, lane);
#pragma unroll
            for (int i = 0; i < 4; i++) {
#pragma unroll
                for (int j = 0; j < 2; j++) {
                    int kk = lane + 32 * j;
                    float ds = 0.0f;
                    if (kk < cnt && lse[i] != -INFINITY) {
                        float p = expf(sc[i][j] * s.scale - lse[i]);
                        ds = p * (gate[i] * dp[i][j] - D[i]) * s.scale;
                    }
                    dSt[kk * PADP + warp * 4 + i] = ds;
                }
            }
            __syncwarp();
            pos_accumulate<DP>(dqa, dSt, Kr, warp, lane);
        }
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        size_t row = row0 + warp * 4 + i;
#pragma unroll
        for (int e = 0; e < NC; e++) {
            int c = lane * NC + e;
            if (c < s.d)
                dq[row * s.d + c] += dqa[i][e];
        }
    }
}

// ---- backward: dk, dv (and dkc, dvc), key-centric

template <int DP> struct dkv_smem {
    static const size_t floats = 2 * (size_t)DP * PADK + 2 * (size_t)DP * PADR +
                                 2 * (size_t)TR * (DP + 4) + (size_t)TR * PADK + 3 * TR;
    static size_t bytes() { return floats * sizeof(float) + TR * sizeof(int) + TR * sizeof(long long); }
};

// Query rows of a key tile: rows rg in [0, num_rows) of a flattened (query, head) list.
// PATH_CMP / PATH_WIN: positions t0 + rg / hpg; PATH_SLC: list[rg / hpg].
template <int DP, int PATH>
__global__ void __launch_bounds__(TILE_THREADS, 1)
    bwd_dkv_kernel(float *dK, float *dV, const float *q, const float *K, const float *V,
                   const float *gates, const float *lse3, const float *Dp, const float *dout,
                   const int *list_offsets, const int *lists, const int *item_start, int split,
                   attn_shape s)
{
    extern __shared__ __align__(16) float smem[];
    float *Kt = smem, *Vt = Kt + DP * PADK, *Qt = Vt + DP * PADK, *dOt = Qt + DP * PADR;
    float *Qr = dOt + DP * PADR, *dOr = Qr + TR * (DP + 4), *Ps = dOr + TR * (DP + 4);
    float *lse_s = Ps + TR * PADK, *gate_s = lse_s + TR, *Dp_s = gate_s + TR;
    int *t_s = (int *)(Dp_s + TR);
    long long *row_s = (long long *)(t_s + TR + (TR & 1));
    int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    const int NV = tile_dims<DP>::NV;
    int Tk = PATH == PATH_CMP ? s.Tc : s.T;

    // The key tile and its query rows [rg_begin, rg_end) (dkv_work_of). Window: all its
    // queries, one block per tile, written (=). Compressed: the queries split in pieces of
    // `split` rows, one block each, added with atomics. Selected: work items (block, piece of
    // its query list of `split` positions), added with atomics.
    dkv_work w;
    if (!dkv_work_of<PATH>(w, s, TK, list_offsets, lists, item_start, split))
        return;
    int g = w.g, b = w.b, key0 = w.key0, key_end = w.key_end, t0 = w.t0;
    long long rg_begin = w.rg_begin, rg_end = w.rg_end;
    const int *list = w.list;
    int cnt = key_end - key0;
    size_t stride = (size_t)s.G * s.d, base = (size_t)b * Tk * stride + (size_t)g * s.d;
    load_keys<DP>(Kt, NULL, Vt, NULL, K, V, base, stride, key0, cnt, s.d);

    float dka[4][NV * 4] = {}, dva[4][NV * 4] = {};
    for (long long rg0 = rg_begin; rg0 < rg_end; rg0 += TR) {
        __syncthreads(); // previous chunk done with the row buffers
        for (int r = threadIdx.x; r < TR; r += blockDim.x) {
            long long rg = rg0 + r;
            int t = -1;
            long long row = 0;
            if (rg < rg_end) {
                int qi = (int)(rg / s.hpg), hh = (int)(rg % s.hpg);
                t = PATH == PATH_SLC ? list[qi] : t0 + qi;
                row = ((long long)b * s.T + t) * s.H + (long long)g * s.hpg + hh;
            }
            t_s[r] = t;
            row_s[r] = row;
            lse_s[r] = t >= 0 ? lse3[row * 3 + PATH] : -INFINITY;
            gate_s[r] = t >= 0 ? gates[row * 3 + PATH] : 0.0f;
            Dp_s[r] = t >= 0 ? Dp[row * 3 + PATH] : 0.0f;
        }
        __syncthreads();
        for (int e = threadIdx.x; e < TR * DP; e += blockDim.x) {
            int r = e / DP, c = e % DP;
            float qx = 0.0f, dx = 0.0f;
            if (t_s[r] >= 0 && c < s.d) {
                qx = q[(size_t)row_s[r] * s.d + c];
                dx = dout[(size_t)row_s[r] * s.d + c];
            }
            Qt[c * PADR + r] = qx;
            dOt[c * PADR + r] = dx;
            Qr[r * (DP + 4) + c] = qx;
            dOr[r * (DP + 4) + c] = dx;
        }
        __syncthreads();
        // S^T and dP^T: keys ty*4+i, rows tx*4+j
        float sc[4][4] = {}, dp[4][4] = {};
        mm_4x4<DP>(sc, Kt, PADK, ty * 4, Qt, PADR, tx * 4);
        mm_4x4<DP>(dp, Vt, PADK, ty * 4, dOt, PADR, tx * 4);
        float ds[4][4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int kk = ty * 4 + i, pos = key0 + kk;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                int r = tx * 4 + j, t = t_s[r];
                float l = lse_s[r];
                bool ok = kk < cnt && t >= 0 && l != -INFINITY;
                if (PATH == PATH_CMP)
                    ok = ok && pos < visible_cmp(s, t);
                else if (PATH == PATH_WIN)
                    ok = ok && pos <= t && pos > t - s.w;
                else
                    ok = ok && pos <= t;
                float p = ok ? expf(sc[i][j] * s.scale - l) : 0.0f;
                float gate = gate_s[r];
                ds[i][j] = p * (gate * dp[i][j] - Dp_s[r]) * s.scale;
                Ps[r * PADK + kk] = p * gate; // dV += P^T (gate * dout)
            }
        }
        __syncthreads();
        mm_4xw<TR, NV>(dva, Ps, PADK, ty * 4, dOr, DP + 4, tx * 4);
        __syncthreads();
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++)
                Ps[(tx * 4 + j) * PADK + ty * 4 + i] = ds[i][j];
        __syncthreads();
        mm_4xw<TR, NV>(dka, Ps, PADK, ty * 4, Qr, DP + 4, tx * 4);
    }
    // window: written (=); compressed and selected: added (the compressed buffers are
    // zeroed first, the selected path adds to the window's result)
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int kk = ty * 4 + i;
        if (kk >= cnt)
            continue;
        size_t rowk = base + (size_t)(key0 + kk) * stride;
#pragma unroll
        for (int vv = 0; vv < NV; vv++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int c = 64 * vv + tx * 4 + e;
                if (c >= s.d)
                    continue;
                if (PATH != PATH_WIN) {
                    atomicAdd(dK + rowk + c, dka[i][vv * 4 + e]);
                    atomicAdd(dV + rowk + c, dva[i][vv * 4 + e]);
                } else {
                    dK[rowk + c] = dka[i][vv * 4 + e];
                    dV[rowk + c] = dva[i][vv * 4 + e];
                }
            }
    }
}

// Inverted index of the selection: for each (b, g, block), the positions that chose it.
// CHUNKED: for each (b, chunk of `chunk` positions, g, block), keys in that order.
template <bool CHUNKED>
static __device__ __forceinline__ size_t sel_key_of(const attn_shape &s, int b, int t, int g,
                                                    int blk, int chunk)
{
    size_t bb = CHUNKED ? (size_t)b * ((s.T + chunk - 1) / chunk) + t / chunk : (size_t)b;
    return (bb * s.G + g) * s.nb + blk;
}

template <bool CHUNKED>
__global__ void sel_count_kernel(int *counts, const int32_t *idx, attn_shape s, int skip_fixed,
                                 int chunk)
{
    size_t n = (size_t)s.B * s.T * s.G * s.n;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n;
         e += (size_t)gridDim.x * blockDim.x) {
        int blk = idx[e];
        if (blk < 0)
            continue;
        size_t rest = e / s.n;
        int g = (int)(rest % s.G), b = (int)(rest / s.G / s.T), t = (int)(rest / s.G % s.T);
        if (skip_fixed && paper_fixed(blk, t, s.b))
            continue;
        atomicAdd(&counts[sel_key_of<CHUNKED>(s, b, t, g, blk, chunk)], 1);
    }
}

// Exclusive scan of counts[n] into offsets[n+1] (one block; n is B*G*num_blocks) and a
// copy into cursor.
__global__ void sel_scan_kernel(int *offsets, int *cursor, const int *counts, int n)
{
    __shared__ int part[1024];
    __shared__ int carry;
    if (threadIdx.x == 0)
        carry = 0;
    __syncthreads();
    for (int c0 = 0; c0 < n; c0 += 1024) {
        int i = c0 + threadIdx.x;
        int x = i < n ? counts[i] : 0;
        part[threadIdx.x] = x;
        __syncthreads();
        for (int o = 1; o < 1024; o <<= 1) { // Hillis-Steele inclusive scan
            int y = threadIdx.x >= o ? part[threadIdx.x - o] : 0;
            __syncthreads();
            part[threadIdx.x] += y;
            __syncthreads();
        }
        int excl = carry + part[threadIdx.x] - x;
        if (i < n) {
            offsets[i] = excl;
            cursor[i] = excl;
        }
        __syncthreads();
        if (threadIdx.x == 1023)
            carry += part[1023];
        __syncthreads();
    }
    if (threadIdx.x == 0)
        offsets[n] = carry;
}

template <bool CHUNKED>
__global__ void sel_fill_kernel(int *lists, int *cursor, const int32_t *idx, attn_shape s,
                                int skip_fixed, int chunk)
{
    size_t n = (size_t)s.B * s.T * s.G * s.n;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n;
         e += (size_t)gridDim.x * blockDim.x) {
        int blk = idx[e];
        if (blk < 0)
            continue;
        size_t rest = e / s.n;
        int g = (int)(rest % s.G);
        rest /= s.G;
        int t = (int)(rest % s.T), b = (int)(rest / s.T);
        if (skip_fixed && paper_fixed(blk, t, s.b))
            continue;
        int pos = atomicAdd(&cursor[sel_key_of<CHUNKED>(s, b, t, g, blk, chunk)], 1);
        lists[pos] = t;
    }
}

// The key of each work item of the chunked index (item_start: the scan of the items a key).
__global__ void sel_item_keys_kernel(int *item_key, const int *item_start, int n_keys)
{
    for (int key = blockIdx.x * blockDim.x + threadIdx.x; key < n_keys;
         key += gridDim.x * blockDim.x)
        for (int i = item_start[key]; i < item_start[key + 1]; i++)
            item_key[i] = key;
}

// Work items of the selected key-centric pass: ceil(count / split) per (b, g, block).
__global__ void sel_items_kernel(int *items, const int *counts, int n_keys, int split)
{
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n_keys; i += gridDim.x * blockDim.x)
        items[i] = (counts[i] + split - 1) / split;
}

// Keys of the index (see sel_key_of), selections, and the ints from which the chunked
// index's scan workspace starts (256-byte aligned from ws).
static size_t sel_keys(const attn_shape &s, int chunk)
{
    size_t nch = chunk > 0 ? ((size_t)s.T + chunk - 1) / chunk : 1;
    return (size_t)s.B * nch * s.G * s.nb;
}
// (chunked: after the lists, item_key of at most n_entries items, one entry at least each)
static size_t sel_scan_at(const attn_shape &s, int chunk)
{
    size_t n_entries = (size_t)s.B * s.T * s.G * s.n;
    return (5 * (sel_keys(s, chunk) + 1) + 2 * n_entries + 63) / 64 * 64;
}

size_t nsa__cuda_sel_ws_ints(const attn_shape &s, int chunk)
{
    size_t n_keys = sel_keys(s, chunk), n_entries = (size_t)s.B * s.T * s.G * s.n;
    if (chunk <= 0)
        return 5 * (n_keys + 1) + n_entries;
    size_t scan_bytes = nsa__cuda_scan_ws_bytes(n_keys + 1);
    if (scan_bytes == 0) // (too many keys for the device scan)
        return 0;
    return sel_scan_at(s, chunk) + (scan_bytes + sizeof(int) - 1) / sizeof(int);
}

// Work items of the chunked index at most: one for each (b, chunk, g, block) a position of
// the chunk can see (its lists' cuts at split_pos positions add n_entries / split_pos).
static size_t sel_chunked_keys_seen(const attn_shape &s, int chunk)
{
    size_t seen = 0;
    for (int t0 = 0; t0 < s.T; t0 += chunk) {
        int t1 = t0 + chunk < s.T ? t0 + chunk : s.T; // positions t0 .. t1 - 1 see blocks
        size_t vis = (size_t)(t1 - 1) / s.b + 1;   // 0 .. (t1 - 1) / b
        size_t picks = (size_t)(t1 - t0) * s.n;
        seen += vis < picks ? vis : picks;
    }
    return seen * s.B * s.G;
}

nsa_status nsa__cuda_sel_lists(nsa_context *ctx, const attn_shape &s, const int32_t *idx,
                               int *ws, int split_pos, sel_index *out, int skip_fixed, int chunk)
{
    cudaStream_t st = nsa__cuda_stream(ctx);
    size_t n_keys = sel_keys(s, chunk), n_entries = (size_t)s.B * s.T * s.G * s.n;
    if (n_keys + 1 > (size_t)INT32_MAX || n_entries > (size_t)INT32_MAX)
        return nsa__error(NSA_ERR_UNSUPPORTED, "cuda attention backward: %zu selections: too many",
                          n_entries);
    int *counts = ws, *offsets = counts + n_keys + 1, *cursor = offsets + n_keys + 1;
    int *items = cursor + n_keys + 1, *item_start = items + n_keys + 1;
    int *lists = item_start + n_keys + 1;
    NSA_CUDA_TRY(cudaMemsetAsync(counts, 0, (n_keys + 1) * sizeof(int), st));
    unsigned eblocks = nsa__cuda_blocks(n_entries, 256);
    if (chunk > 0)
        sel_count_kernel<true><<<eblocks, 256, 0, st>>>(counts, idx, s, skip_fixed, chunk);
    else
        sel_count_kernel<false><<<eblocks, 256, 0, st>>>(counts, idx, s, skip_fixed, 0);
    NSA_CUDA_LAUNCHED("sel_count_kernel");
    // (the chunked index has B T / chunk times as many keys: a device-wide scan)
    auto scan = [&](int *dst, const int *src) -> nsa_status { // dst[0 .. n_keys] (src[n_keys] = 0)
        if (chunk > 0)
            return nsa__cuda_scan_ints(ctx, dst, src, n_keys + 1, ws + sel_scan_at(s, chunk));
        sel_scan_kernel<<<1, 1024, 0, st>>>(dst, cursor, src, (int)n_keys);
        NSA_CUDA_LAUNCHED("sel_scan_kernel");
        return NSA_OK;
    };
    NSA_TRY(scan(offsets, counts));
    if (chunk > 0) {
        NSA_CUDA_TRY(cudaMemcpyAsync(cursor, offsets, n_keys * sizeof(int),
                                     cudaMemcpyDeviceToDevice, st));
        sel_fill_kernel<true><<<eblocks, 256, 0, st>>>(lists, cursor, idx, s, skip_fixed, chunk);
    } else
        sel_fill_kernel<false><<<eblocks, 256, 0, st>>>(lists, cursor, idx, s, skip_fixed, 0);
    NSA_CUDA_LAUNCHED("sel_fill_kernel");
    sel_items_kernel<<<nsa__cuda_blocks(n_keys, 256), 256, 0, st>>>(items, counts, (int)n_keys,
                                                                    split_pos);
    NSA_CUDA_LAUNCHED("sel_items_kernel");
    if (chunk > 0)
        NSA_CUDA_TRY(cudaMemsetAsync(items + n_keys, 0, sizeof(int), st));
    NSA_TRY(scan(item_start, items));
    out->item_key = NULL;
    if (chunk > 0) {
        int *item_key = lists + n_entries;
        sel_item_keys_kernel<<<nsa__cuda_blocks(n_keys, 256), 256, 0, st>>>(item_key, item_start,
                                                                          (int)n_keys);
        NSA_CUDA_LAUNCHED("sel_item_keys_kernel");
        out->item_key = item_key;
    }
    out->offsets = offsets;
    out->lists = lists;
    out->item_start = item_start;
    out->max_items = n_entries / (size_t)split_pos +
                     (chunk > 0 ? sel_chunked_keys_seen(s, chunk) : n_keys);
    if (out->max_items > INT32_MAX)
        return nsa__error(NSA_ERR_UNSUPPORTED, "cuda attention backward: too many work items");
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// Launcher

template <int DP>
static nsa_status tiled_backward_dp(nsa_context *ctx, const attn_shape &s, float *dq, float *dk,
                                 float *dv, float *dkc, float *dvc, float *dgates, const float *q,
                                 const float *k, const float *v, const float *kc,
                                 const float *vc, const float *gates, const int32_t *idx,
                                 const float *o_paths, const float *lse, const float *dout)
{
    cudaStream_t st = nsa__cuda_stream(ctx);
    size_t rows = (size_t)s.B * s.T * s.H;
    void *mem;
    NSA_TRY(nsa__cuda_scratch(ctx, rows * 3 * sizeof(float) + nsa__cuda_sel_ws_ints(s) * sizeof(int),
                              &mem));
    float *Dp = (float *)mem;
    int *ws = (int *)(Dp + rows * 3);
    int per_position = s.hpg % PR == 0;
    int vec4 = s.d % 4 == 0 && ((uintptr_t)k | (uintptr_t)v) % 16 == 0;

    // dq of the compressed and window paths (and of the selected path unless per position),
    // dgates, and D = (gate * dout) . o for the key-centric passes
    long long tiles = ((long long)s.T * s.hpg + TR - 1) / TR;
    size_t bytes = dq_smem<DP>::bytes() + (size_t)((s.nb + 31) / 32) * sizeof(unsigned);
    NSA_TRY(allow_smem(ctx, bwd_dq_kernel<DP>, bytes));
    bwd_dq_kernel<DP><<<dim3((unsigned)tiles, s.G, s.B), TILE_THREADS, bytes, st>>>(
        dq, dgates, Dp, q, k, v, kc, vc, gates, idx, o_paths, lse, dout, !per_position, s);
    NSA_CUDA_LAUNCHED("bwd_dq_kernel");
    if (per_position) {
        size_t pbytes = pos_smem<DP>::bytes(1);
        NSA_TRY(allow_smem(ctx, bwd_dq_slc_pos_kernel<DP>, pbytes));
        dim3 pgrid((unsigned)((size_t)s.T * (s.hpg / PR)), s.G, s.B);
        bwd_dq_slc_pos_kernel<DP><<<pgrid, POS_THREADS, pbytes, st>>>(dq, q, k, v, gates, idx, lse,
                                                                      Dp, dout, vec4, s);
        NSA_CUDA_LAUNCHED("bwd_dq_slc_pos_kernel");
    }

    dkv_grid kg = {};
    NSA_TRY(dkv_grid_of(s, TK, 64 * TR, &kg));
    // dk, dv of the window (=), one block per key tile
    size_t kv_bytes = dkv_smem<DP>::bytes();
    NSA_TRY(allow_smem(ctx, bwd_dkv_kernel<DP, PATH_WIN>, kv_bytes));
    bwd_dkv_kernel<DP, PATH_WIN><<<kg.win, TILE_THREADS, kv_bytes, st>>>(
        dk, dv, q, k, v, gates, lse, Dp, dout, NULL, NULL, NULL, 0, s);
    NSA_CUDA_LAUNCHED("bwd_dkv_kernel<window>");

    // dkc, dvc: a block per (key tile, piece of split_rows query rows), atomics
    if (s.Tc > 0) {
        size_t nkvc = (size_t)s.B * s.Tc * s.G * s.d;
        NSA_CUDA_TRY(cudaMemsetAsync(dkc, 0, nkvc * sizeof(float), st));
        NSA_CUDA_TRY(cudaMemsetAsync(dvc, 0, nkvc * sizeof(float), st));
        NSA_TRY(allow_smem(ctx, bwd_dkv_kernel<DP, PATH_CMP>, kv_bytes));
        bwd_dkv_kernel<DP, PATH_CMP><<<kg.cmp, TILE_THREADS, kv_bytes, st>>>(
            dkc, dvc, q, kc, vc, gates, lse, Dp, dout, NULL, NULL, NULL, kg.split_rows, s);
        NSA_CUDA_LAUNCHED("bwd_dkv_kernel<compressed>");
    }

    // dk, dv of the selected blocks (+=): the inverted index, cut into work items of
    // split_pos positions, a block per (item, 64-key chunk of the block), atomics
    sel_index si;
    NSA_TRY(nsa__cuda_sel_lists(ctx, s, idx, ws, kg.split_pos, &si));
    NSA_TRY(allow_smem(ctx, bwd_dkv_kernel<DP, PATH_SLC>, kv_bytes));
    bwd_dkv_kernel<DP, PATH_SLC><<<dim3((unsigned)si.max_items, kg.slc_chunks, 1), TILE_THREADS,
                                   kv_bytes, st>>>(dk, dv, q, k, v, gates, lse, Dp, dout,
                                                   si.offsets, si.lists, si.item_start,
                                                   kg.split_pos, s);
    NSA_CUDA_LAUNCHED("bwd_dkv_kernel<selected>");
    return NSA_OK;
}

nsa_status nsa__cuda_attn_tiled_backward(nsa_context *ctx, const attn_shape &s, float *dq,
                                         float *dk, float *dv, float *dkc, float *dvc,
                                         float *dgates, const float *q, const float *k,
                                         const float *v, const float *kc, const float *vc,
                                         const float *gates, const int32_t *idx,
                                         const float *o_paths, const float *lse,
                                         const float *dout)
{
    if (s.d <= 64)
        return tiled_backward_dp<64>(ctx, s, dq, dk, dv, dkc, dvc, dgates, q, k, v, kc, vc, gates,
                                     idx, o_paths, lse, dout);
    return tiled_backward_dp<128>(ctx, s, dq, dk, dv, dkc, dvc, dgates, q, k, v, kc, vc, gates,
                                  idx, o_paths, lse, dout);
}
