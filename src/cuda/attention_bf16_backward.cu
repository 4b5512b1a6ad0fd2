/*
 * attention_bf16_backward.cu — the backward of the three attention paths with bf16 operands
 * on the tensor cores (fp32 accumulation), from the forward's saved paths and lse:
 *
 *   bf16_bwd_prep:  dgates[row, p] = dout . o_p; D[row, p] = gate_p * dgates[row, p]; dout
 *                   as bf16 (the MMA operand); with TMA each row's metadata for bf16_bwd_dkv
 *                   (meta4).
 *   bf16_bwd_dq:    query-centric, the forward's tile (64 rows of one kv head, the three
 *                   paths' key chunks streamed as in the forward, the selected blocks as the
 *                   union of the tile's choices): S = Q K^T, dP = dO V^T,
 *                   dS = P (gate dP - D), dQ += dS K — in registers, no atomics.
 *   bf16_bwd_dkv:   key-centric, one block per tile of 64 keys (window: every query that
 *                   sees them, written; compressed: pieces of the queries, added; selected:
 *                   work items of the inverted selection index, added): S^T = K Q^T,
 *                   dP^T = V dO^T, dV += (gate P)^T dO, dK += dS^T Q. Partial sums of
 *                   several blocks meet in one fp32 atomic add per element and block. The
 *                   query rows stream by TMA through full/empty mbarrier stages where
 *                   whole positions fill a tile (cp.async and a block barrier otherwise).
 * With P = exp(S scale - lse) from the forward's lse, so the softmax is not redone. With
 * H/G a multiple of 16 the kernels after the prep run on two more streams of the context,
 * each after the kernel that last wrote its output (bf16_backward_dp).
 */
#include "cuda/attention_bf16.cuh"

// ---------------------------------------------------------------------------------------
// Preparation: one warp per row. With meta4 also each row's metadata for the key-centric
// kernels' TMA stream, meta4 [3 paths, B, G, T, hpg] float4 {position (-1: no key on the
// path), lse * log2(e), gate, D} (the rows of a (path, batch entry, kv head) in the order
// their q rows have there).

// A query row's metadata on path p for the key-centric kernels: {position (-1: no key on
// the path, no gradient), lse * log2(e), gate, D}.
static __device__ __forceinline__ float4 dkv_row_meta(int t, float lse, float gate, float D)
{
    bool none = t < 0 || lse == -INFINITY;
    return make_float4(__int_as_float(none ? -1 : t), none ? 0.0f : lse * LOG2E, gate, D);
}

__global__ void bf16_bwd_prep_kernel(float *dgates, float *Dp, float4 *meta4, bf16 *dO16,
                                     const float *dout, const float *o_paths, const float *gates,
                                     const float *lse3, size_t rows, attn_shape s)
{
    int d = s.d;
    int lane = threadIdx.x % 32;
    size_t warp = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32;
    size_t nwarps = (size_t)gridDim.x * blockDim.x / 32;
    for (size_t row = warp; row < rows; row += nwarps) {
        float a[3] = {0.0f, 0.0f, 0.0f};
        for (int c = lane * 4; c < d; c += 128) { // 4 columns a lane (d % 8 == 0)
            size_t i = row * d + c;
            float4 x = *reinterpret_cast<const float4 *>(dout + i);
            __nv_bfloat162 lo = __floats2bfloat162_rn(x.x, x.y);
            __nv_bfloat162 hi = __floats2bfloat162_rn(x.z, x.w);
            uint2 packed;
            packed.x = *reinterpret_cast<uint32_t *>(&lo);
            packed.y = *reinterpret_cast<uint32_t *>(&hi);
            *reinterpret_cast<uint2 *>(dO16 + i) = packed;
#pragma unroll
            for (int p = 0; p < 3; p++) {
                float4 o = *reinterpret_cast<const float4 *>(o_paths + (size_t)p * rows * d + i);
                a[p] = fmaf(x.x, o.x, fmaf(x.y, o.y, fmaf(x.z, o.z, fmaf(x.w, o.w, a[p]))));
            }
        }
        // lanes 0, 1, 2: path p = lane
        float sum = 0.0f;
#pragma unroll
        for (int p = 0; p < 3; p++) {
            float t = warp_sum(a[p]);
            sum = lane == p ? t : sum;
        }
        if (lane < 3) {
            int p = lane;
            float gate = gates[row * 3 + p];
            dgates[row * 3 + p] = sum;
            Dp[row * 3 + p] = gate * sum;
            if (meta4) {
                unsigned hh = (unsigned)(row % s.hpg);
                size_t bt = row / s.H;
                unsigned g = (unsigned)(row % s.H) / s.hpg, t = (unsigned)(bt % s.T);
                size_t b = bt / s.T;
                meta4[((((size_t)p * s.B + b) * s.G + g) * s.T + t) * s.hpg + hh] =
                    dkv_row_meta((int)t, lse3[row * 3 + p], gate, gate * sum);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// dq: query-centric

template <int DP> static size_t dq_smem_bytes(const attn_shape &s)
{
    return 6 * mcfg<DP>::TILE + sizeof(mrows<MB>) +
           (2 * (size_t)tile_positions(MB, s.hpg) * s.n + 1) * sizeof(int) +
           (size_t)((s.nb + 31) / 32) * sizeof(unsigned);
}

template <int DP>
__global__ void __launch_bounds__(MMA_THREADS, 2)
    bf16_bwd_dq_kernel(float *dq, const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *kc,
                       const bf16 *vc, const bf16 *dO16, const float *gates, const float *lse3,
                       const float *Dp, const int32_t *idx, int do_slc, attn_shape s)
{
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int LD = mcfg<DP>::LD;
    bf16 *Qs = (bf16 *)smem_raw, *Os = Qs + NB * LD, *Ks = Os + NB * LD, *Vs = Ks + 2 * NB * LD;
    mrows<MB> *tr = (mrows<MB> *)(Vs + 2 * NB * LD);
    int *sidx = (int *)(tr + 1);
    int *ulist = sidx + tile_positions(MB, s.hpg) * s.n;
    int *nunion = ulist + tile_positions(MB, s.hpg) * s.n;
    unsigned *bitmap = (unsigned *)(nunion + 1);
    int tile = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, c4 = lane % 4;
    mrows_init<MB>(tr, s, tile, g, b);
    __syncthreads();
    load_row_tile<DP, MB>(Qs, q, tr, s.d);
    load_row_tile<DP, MB>(Os, dO16, tr, s.d);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    uint32_t qf[DP / 16][4], of[DP / 16][4];
    load_a_frags<DP>(qf, Qs, warp, lane);
    load_a_frags<DP>(of, Os, warp, lane);

    long long first_rg = (long long)tile * MB;
    long long last_rg = min(first_rg + MB - 1, (long long)s.Tq * s.hpg - 1);
    int t_first = (int)(first_rg / s.hpg), t_last = (int)(last_rg / s.hpg);
    int trow[2];
    path_rows pr[3];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        int r = warp * 16 + gq + 8 * i;
        trow[i] = tr->t[r];
        size_t row = (size_t)tr->row[r];
#pragma unroll
        for (int p = 0; p < 3; p++)
            pr[p].set(i, trow[i] >= 0, row, p, lse3, gates, Dp);
    }
    const float sl2 = s.scale * LOG2E;
    float acc[DP / 8][4];
    frag_zero(acc);
    size_t stride = (size_t)s.G * s.d;

    // compressed
    {
        int vis[2];
#pragma unroll
        for (int i = 0; i < 2; i++)
            vis[i] = trow[i] < 0 ? 0 : visible_cmp(s, trow[i]);
        int nc_max = visible_cmp(s, t_last);
        size_t base = (size_t)b * s.Tc * stride + (size_t)g * s.d;
        stream_chunks<DP>(
            Ks, Vs, kc, vc, base, stride, s.d, (nc_max + NB - 1) / NB,
            [&](int i, int &key0, int &cnt) {
                key0 = i * NB;
                cnt = min(NB, nc_max - key0);
            },
            [&](int, int key0, int, const bf16 *Kt, const bf16 *Vt) {
                if (__all_sync(0xffffffffu, key0 + NB <= min(vis[0], vis[1])))
                    dq_step<DP>(acc, qf, of, Kt, Vt, pr[PATH_CMP], sl2, lane,
                                [](int, int) { return true; });
                else
                    dq_step<DP>(acc, qf, of, Kt, Vt, pr[PATH_CMP], sl2, lane,
                                [&](int ii, int kk) { return key0 + kk < vis[ii]; });
            });
    }
    size_t base = (size_t)b * s.T * stride + (size_t)g * s.d;
    // window
    {
        int lo = max(0, t_first - s.w + 1);
        stream_chunks<DP>(
            Ks, Vs, k, v, base, stride, s.d, (t_last - lo + NB) / NB,
            [&](int i, int &key0, int &cnt) {
                key0 = lo + i * NB;
                cnt = min(NB, t_last + 1 - key0);
            },
            [&](int, int key0, int, const bf16 *Kt, const bf16 *Vt) {
                auto ok = [&](int ii, int pos) { return pos <= trow[ii] && pos > trow[ii] - s.w; };
                bool full = ok(0, key0) && ok(0, key0 + NB - 1) && ok(1, key0) &&
                            ok(1, key0 + NB - 1);
                if (__all_sync(0xffffffffu, full))
                    dq_step<DP>(acc, qf, of, Kt, Vt, pr[PATH_WIN], sl2, lane,
                                [](int, int) { return true; });
                else
                    dq_step<DP>(acc, qf, of, Kt, Vt, pr[PATH_WIN], sl2, lane,
                                [&](int ii, int kk) { return ok(ii, key0 + kk); });
            });
    }
    // selected: the union of the tile's blocks (unless bf16_bwd_dq_slc_warp adds them)
    if (do_slc) {
        build_union(sidx, ulist, nunion, bitmap, idx, s, b, g, t_first, t_last);
        int subs = (s.b + NB - 1) / NB;
        int pl[2];
        bool member[2] = {false, false};
#pragma unroll
        for (int i = 0; i < 2; i++)
            pl[i] = trow[i] < 0 ? -1 : trow[i] - t_first;
        stream_chunks<DP>(
            Ks, Vs, k, v, base, stride, s.d, *nunion * subs,
            [&](int i, int &key0, int &cnt) {
                int u = ulist[i / subs];
                key0 = u * s.b + (i % subs) * NB;
                cnt = max(0, min(NB, min(u * s.b + s.b, t_last + 1) - key0));
            },
            [&](int i, int key0, int cnt, const bf16 *Kt, const bf16 *Vt) {
                if (i % subs == 0) {
                    int u = ulist[i / subs];
#pragma unroll
                    for (int ii = 0; ii < 2; ii++)
                        member[ii] = pl[ii] >= 0 && holds(sidx + pl[ii] * s.n, s.n, u);
                }
                if (__any_sync(0xffffffffu, member[0] || member[1]))
                    dq_step<DP>(acc, qf, of, Kt, Vt, pr[PATH_SLC], sl2, lane,
                                [&](int ii, int kk) {
                                    return member[ii] && kk < cnt && key0 + kk <= trow[ii];
                                });
            });
    }
#pragma unroll
    for (int nt = 0; nt < DP / 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            acc[nt][e] *= s.scale;
    store_frag_rows<DP>(dq, tr->t, tr->row, acc, warp * 16, lane, s.d);
    (void)c4;
}

// dq of the compressed and window paths by warpgroups (wg_rows_keys2 / wg_p_v: wgmma on
// sm_90a): WG warpgroups own 64 query rows each of a tile of 64 WG rows and share the key
// chunks streamed (WG = 2 halves the K/V traffic per row). Q and dO stay in shared memory
// (sw128 tiles), the compressed chunks then the window chunks run through one pipeline (TMA:
// DQ_KST stages; cp.async: two). Writes dq (=); the selected path adds its part after.
// stages of the key chunks (TMA; a compile-time tuning knob)
#ifndef NSA_DQ_KST
#define NSA_DQ_KST 3
#endif
#define DQ_KST(TMA) ((TMA) ? NSA_DQ_KST : 2)

template <int DP, int WG> static size_t dq_wg_smem_bytes(bool tma)
{
    int kst = DQ_KST(tma);
    return (2 * WG + 2 * kst) * (size_t)NB * DP * sizeof(bf16) + 2 * kst * sizeof(uint64_t) +
           sizeof(mrows<MB * WG>) + SMEM_ALIGN;
}

// The tensor maps of the dq kernel's key tiles (TMA): compressed K, V, then K, V.
struct dq_maps {
    CUtensorMap kc, vc, k, v;
};

template <int DP, int WG, bool TMA>
__global__ void __launch_bounds__(MMA_THREADS * WG, WG == 1 ? 2 : 1)
    bf16_bwd_dq_wg_kernel(float *dq, const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *kc,
                          const bf16 *vc, const bf16 *dO16, const float *gates, const float *lse3,
                          const float *Dp, const __grid_constant__ dq_maps tm, attn_shape s)
{
    const int R = MB * WG, TE = NB * DP;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *Qs = (bf16 *)smem_aligned(smem_raw), *Os = Qs + WG * TE, *Ks = Os + WG * TE;
    const int KST = DQ_KST(TMA);
    bf16 *Vs = Ks + KST * TE;
    uint64_t *bars = (uint64_t *)(Vs + KST * TE); // the stages' barriers (TMA)
    mrows<R> *tr = (mrows<R> *)(bars + 2 * KST);
    int tile = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
    int warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32, gq = lane / 4, c4 = lane % 4;
    int wg = warpgroup_index();
    if (TMA)
        mbar_init_pipe<KST>(bars, MMA_THREADS * WG);
    mrows_init<R>(tr, s, tile, g, b);
    __syncthreads();
    Qs += wg * TE, Os += wg * TE; // this warpgroup's rows wg * 64 ..
    load_rows_sw<DP, R>(Qs, q, tr, s.d);
    load_rows_sw<DP, R>(Os, dO16, tr, s.d);
    cp_async_commit();

    long long first_rg = (long long)tile * R;
    long long last_rg = min(first_rg + R - 1, (long long)s.Tq * s.hpg - 1);
    int t_first = (int)(first_rg / s.hpg), t_last = (int)(last_rg / s.hpg);
    int trow[2], vis[2];
    path_rows prc, prw;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        int r = wg * NB + warp * 16 + gq + 8 * i;
        trow[i] = tr->t[r];
        vis[i] = trow[i] < 0 ? 0 : visible_cmp(s, trow[i]);
        prc.set(i, trow[i] >= 0, (size_t)tr->row[r], PATH_CMP, lse3, gates, Dp);
        prw.set(i, trow[i] >= 0, (size_t)tr->row[r], PATH_WIN, lse3, gates, Dp);
    }
    // chunks 0 .. ncc - 1: compressed tokens i * 64 ..; then the window's keys from lo
    int nc_max = visible_cmp(s, t_last), ncc = (nc_max + NB - 1) / NB;
    int lo = max(0, t_first - s.w + 1), nch = ncc + (t_last - lo + NB) / NB;
    size_t stride = (size_t)s.G * s.d;
    size_t cbase = (size_t)b * s.Tc * stride + (size_t)g * s.d;
    size_t wbase = (size_t)b * s.T * stride + (size_t)g * s.d;
    const float sl2 = s.scale * LOG2E;
    float acc[DP / 8][4];
    frag_zero(acc);
    auto key0_of = [&](int i) { return i < ncc ? i * NB : lo + (i - ncc) * NB; };
    auto chunk = [&](int i, const bf16 *Kt, const bf16 *Vt) {
        float sc[8][4], dp[8][4];
        wg_rows_keys2<DP>(sc, Qs, Kt, dp, Os, Vt, warp, lane);
        bool cmp = i < ncc;
        int key0 = key0_of(i);
        path_rows p; // the chunk's path, by selects (no indexed local array)
#pragma unroll
        for (int ii = 0; ii < 2; ii++) {
            p.lse2[ii] = cmp ? prc.lse2[ii] : prw.lse2[ii];
            p.gate[ii] = cmp ? prc.gate[ii] : prw.gate[ii];
            p.D[ii] = cmp ? prc.D[ii] : prw.D[ii];
        }
        // key kk of the chunk for row i: compressed kk < lim[i] - key0; window
        // 0 <= t - (key0 + kk) < w, i.e. kk in [t - w + 1 - key0, t - key0]
        int klo[2], khi[2];
#pragma unroll
        for (int ii = 0; ii < 2; ii++) {
            klo[ii] = cmp ? 0 : trow[ii] - s.w + 1 - key0;
            khi[ii] = cmp ? vis[ii] - 1 - key0 : trow[ii] - key0;
        }
        bool full = klo[0] <= 0 && klo[1] <= 0 && khi[0] >= NB - 1 && khi[1] >= NB - 1;
        uint32_t a[4][4];
        if (__all_sync(0xffffffffu, full)) {
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int ii = e / 2;
                    float pp = ex2_approx(sc[nt][e] * sl2 - p.lse2[ii]);
                    sc[nt][e] = pp * (p.gate[ii] * dp[nt][e] - p.D[ii]);
                }
        } else {
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int ii = e / 2, kk = nt * 8 + 2 * c4 + (e & 1);
                    bool ok = kk >= klo[ii] && kk <= khi[ii];
                    float pp = ok ? ex2_approx(sc[nt][e] * sl2 - p.lse2[ii]) : 0.0f;
                    sc[nt][e] = pp * (p.gate[ii] * dp[nt][e] - p.D[ii]);
                }
        }
#pragma unroll
        for (int j = 0; j < 4; j++)
            c_to_a(a[j], sc[2 * j], sc[2 * j + 1]);
        wg_p_v<DP>(acc, a, Kt, lane); // dQ += dS K: K's rows play V's part
    };
    if (TMA)
        wg_stream_tma<DP, KST>(
            Ks, Vs, bars, g, b, nch,
            [&](int i, const CUtensorMap *&mK, const CUtensorMap *&mV, int &key0) {
                bool cmp = i < ncc;
                mK = cmp ? &tm.kc : &tm.k, mV = cmp ? &tm.vc : &tm.v;
                key0 = key0_of(i);
            },
            chunk);
    else
        wg_stream<DP, WG>(
            Ks, Vs, stride, s.d, nch,
            [&](int i, const bf16 *&K, const bf16 *&V, size_t &base, int &key0, int &cnt) {
                bool cmp = i < ncc;
                key0 = key0_of(i);
                cnt = min(NB, cmp ? nc_max - key0 : t_last + 1 - key0);
                K = cmp ? kc : k, V = cmp ? vc : v, base = cmp ? cbase : wbase;
            },
            chunk);
#pragma unroll
    for (int nt = 0; nt < DP / 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            acc[nt][e] *= s.scale;
    store_frag_rows<DP>(dq, tr->t, tr->row, acc, wg * NB + warp * 16, lane, s.d);
}

template <int DP, int WG>
static nsa_status dq_wg(nsa_context *ctx, const attn_shape &s, float *dq, const bf16 *q,
                        const bf16 *k, const bf16 *v, const bf16 *kc, const bf16 *vc,
                        const bf16 *dO16, const float *gates, const float *lse, const float *Dp)
{
    long long tiles = ((long long)s.T * s.hpg + WG * MB - 1) / (WG * MB);
    int tma = nsa__cuda(ctx)->use_tma;
    auto kernel = tma ? bf16_bwd_dq_wg_kernel<DP, WG, true> : bf16_bwd_dq_wg_kernel<DP, WG, false>;
    dq_maps tm{}; // (zeros when unused)
    if (tma) {
        if (s.Tc > 0) {
            NSA_TRY(nsa__cuda_tensor_map(ctx, &tm.kc, kc, s.B, s.Tc, s.G, s.d, NB));
            NSA_TRY(nsa__cuda_tensor_map(ctx, &tm.vc, vc, s.B, s.Tc, s.G, s.d, NB));
        }
        NSA_TRY(nsa__cuda_tensor_map(ctx, &tm.k, k, s.B, s.T, s.G, s.d, NB));
        NSA_TRY(nsa__cuda_tensor_map(ctx, &tm.v, v, s.B, s.T, s.G, s.d, NB));
    }
    size_t bytes = dq_wg_smem_bytes<DP, WG>(tma);
    NSA_TRY(allow_smem(ctx, kernel, bytes));
    kernel<<<dim3((unsigned)tiles, s.G, s.B), WG * MMA_THREADS, bytes, nsa__cuda_stream(ctx)>>>(
        dq, q, k, v, kc, vc, dO16, gates, lse, Dp, tm, s);
    NSA_CUDA_LAUNCHED("bf16_bwd_dq_wg_kernel");
    return NSA_OK;
}

// dq of the selected path when H/G is a multiple of 16, added (+=) to what bf16_bwd_dq wrote:
// a warp per (position, 16 heads) streams that position's own blocks (attention_bf16.cu's
// bf16_slc_warp_kernel, backward, the common blocks loaded once a thread block as there),
// no barrier across warps otherwise.
template <int DP, int KEYS, int ST, int W, int MINB>
__global__ void __launch_bounds__(32 * W, MINB)
    bf16_bwd_dq_slc_warp_kernel(float *dq, const bf16 *q, const bf16 *k, const bf16 *v,
                                const bf16 *dO16, const float *gates, const float *lse3,
                                const float *Dp, const int32_t *idx, int share, attn_shape s)
{
    const int LD = mcfg<DP>::LD;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, c4 = lane % 4;
    bf16 *pool = (bf16 *)smem_raw;
    int *own = (int *)(pool + (size_t)W * 2 * ST * KEYS * LD) + warp * s.n;
    warp_unit u;
    bool valid = warp_unit_of<W>(u, s, warp);
    cta_common cc = cta_common_of<W>(s, share && s.fixed);
    if (!valid && cc.n_blocks == 0)
        return;
    int g = blockIdx.y, b = blockIdx.z;
    uint32_t qf[DP / 16][4], of[DP / 16][4];
    path_rows pr;
    const int32_t *sel = NULL;
    if (valid) {
        global_a_frags<DP>(qf, q, u.row0, s.d, lane);
        global_a_frags<DP>(of, dO16, u.row0, s.d, lane);
#pragma unroll
        for (int i = 0; i < 2; i++)
            pr.set(i, true, u.row0 + gq + 8 * i, PATH_SLC, lse3, gates, Dp);
        sel = idx + (((size_t)b * s.Tq + u.tq) * s.G + g) * s.n;
    }
    size_t stride = (size_t)s.G * s.d, base = (size_t)b * s.T * stride + (size_t)g * s.d;
    const float sl2 = s.scale * LOG2E;
    float acc[DP / 8][4];
    frag_zero(acc);
    auto step = [&](const bf16 *Kt, const bf16 *Vt, int cnt) {
        dq_step<DP, KEYS>(acc, qf, of, Kt, Vt, pr, sl2, lane,
                          [&](int, int kk) { return kk < cnt; });
    };
    if (!warp_stream_selection<DP, KEYS, ST, W>(pool, own, k, v, base, stride, s, cc, sel, valid,
                                                u.t, warp, lane, step))
        return;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        float *row = dq + (u.row0 + gq + 8 * i) * s.d;
#pragma unroll
        for (int nt = 0; nt < DP / 8; nt++) {
            int col = nt * 8 + 2 * c4;
            if (col >= s.d)
                continue;
            float2 x = *reinterpret_cast<float2 *>(row + col);
            x.x += acc[nt][2 * i] * s.scale;
            x.y += acc[nt][2 * i + 1] * s.scale;
            *reinterpret_cast<float2 *>(row + col) = x;
        }
    }
}

template <int DP, int KEYS, int ST, int W, int MINB>
static nsa_status dq_slc_warp(nsa_context *ctx, const attn_shape &s, float *dq, const bf16 *q,
                              const bf16 *k, const bf16 *v, const bf16 *dO16, const float *gates,
                              const float *lse, const float *Dp, const int32_t *idx)
{
    auto kernel = bf16_bwd_dq_slc_warp_kernel<DP, KEYS, ST, W, MINB>;
    size_t wbytes = slcw_smem_bytes<DP, KEYS, ST, W>(s.n);
    long long units = (long long)s.T * (s.hpg / 16);
    NSA_TRY(slcw_prepare(ctx, kernel, wbytes));
    dim3 wgrid((unsigned)((units + W - 1) / W), s.G, s.B);
    kernel<<<wgrid, 32 * W, wbytes, nsa__cuda_stream(ctx)>>>(dq, q, k, v, dO16, gates, lse, Dp,
                                                             idx, nsa__cuda(ctx)->bf16_slc_share,
                                                             s);
    NSA_CUDA_LAUNCHED("bf16_bwd_dq_slc_warp_kernel");
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// dk, dv: key-centric

// stages of the TMA row stream: 3 with two warpgroups (one block a SM; a compile-time
// tuning knob), 2 with one (two blocks a SM)
#ifndef NSA_DKV_ST2
#define NSA_DKV_ST2 3
#endif
#define DKV_ST(WG) ((WG) == 2 ? NSA_DKV_ST2 : 2)

// (dqp: the sm_90a kernel with dq partials, whose tiles are unpadded sw128 ones, and the dS
// tile after them: two blocks still fit a SM)
template <int DP, int WG, int ST> static size_t dkv_smem_bytes(bool dqp = false)
{
    size_t tile = dqp ? (size_t)NB * DP * sizeof(bf16) : mcfg<DP>::TILE;
    return (2 * WG + 2 * ST) * tile + (dqp ? NB * NB * sizeof(bf16) : 0) +
           ST * MB * sizeof(float4) + 2 * ST * sizeof(uint64_t) + SMEM_ALIGN;
}

// The tensor maps of the key-centric kernels' query rows (TMA): q and dO as 5-D row tensors
// (nsa__cuda_tensor_map_rows), boxes of the MB / hpg positions of a tile (compressed, window)
// or of one position (selected).
struct dkv_maps {
    CUtensorMap q, o;
};

// On sm_90a the four products of a step run as warpgroup MMAs (wgmma.cuh) on sw128 tiles:
// S^T and dP^T with both operands in shared memory, dV and dK with (gate P)^T and dS^T from
// registers. Otherwise mma.sync on padded tiles. WG warpgroups of 128 threads, each with its
// 64 keys of a tile of 64 WG keys, share the query rows streamed (WG = 2 halves the traffic
// of q and dO, which bounds the compressed and window paths).
//
// The rows stream through ST stages. With TMA (sm_90a, H/G dividing 64) warp 0 fills a stage
// with the tile's q and dO boxes and its rows' metadata (meta4, from the prep kernel) on the
// stage's `full` barrier, and refills it once every thread has arrived on its `empty` barrier:
// the warpgroups are not held in step, so one's exponentials can run under the other's
// products. Otherwise all threads copy rows by cp.async through two stages, a block barrier
// a tile.
//
// DQP (the selected path, sm_90a, TMA, one block a work item): the tile's dq as well, one
// partial a (row, block), dq_part = scale dS K in bf16 (DQP 1) or fp32 (2) at part_dq
// [rows, n, d] (slot = the block's place in the row's selection), summed into dq after
// (nsa__cuda_dq_slc_add).
// dS goes through shared memory as a [row][key] tile (the A operand; the accumulators hold
// dS^T), K is the B operand as it is (keys x d, N contiguous). This replaces the
// query-centric dq pass, which reads each position's blocks of K and V again.
template <int DP, int PATH, int WG, int ST, bool TMA, int DQP = 0>
__global__ void __launch_bounds__(MMA_THREADS * WG, 2 / WG)
    bf16_bwd_dkv_kernel(float *dK, float *dV, const bf16 *q, const bf16 *dO16, const bf16 *K,
                        const bf16 *V, const float *gates, const float *lse3, const float *Dp,
                        const float4 *meta4, const __grid_constant__ dkv_maps tm,
                        const int *list_offsets, const int *lists, const int *item_start,
                        int split, void *part_dq, const int32_t *idx, attn_shape s)
{
    static_assert(!DQP || (PATH == PATH_SLC && WG == 1 && TMA), "dq partials: selected, TMA");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int LD = mcfg<DP>::LD;
    // one 64-row tile: padded rows, or a sw128 tile (no padding)
    const int TE = NSA_WGMMA ? NB * DP : NB * LD;
    bf16 *Ks = (bf16 *)smem_aligned(smem_raw), *Vs = Ks + WG * TE, *Qs = Vs + WG * TE;
    bf16 *Os = Qs + ST * TE;
    bf16 *dSs = Os + ST * TE; // (DQP) dS of a tile as [row][key], sw128
    // per query row of each stage: {position (-1: no gradient), lse * log2(e), gate, D}
    float4 *meta_s = (float4 *)(dSs + (DQP ? NB * NB : 0));
    uint64_t *full = (uint64_t *)(meta_s + ST * MB), *empty = full + ST; // (TMA)
    int warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32, gq = lane / 4, c4 = lane % 4;
    int wg = warpgroup_index(), wtid = threadIdx.x % MMA_THREADS;
    int Tk = PATH == PATH_CMP ? s.Tc : s.T;

    // The key tile and its query rows (dkv_work_of, shared with the fp32 kernel).
    dkv_work w;
    if (!dkv_work_of<PATH>(w, s, NB * WG, list_offsets, lists, item_start, split))
        return;
    int g = w.g, b = w.b, key0 = w.key0, key_end = w.key_end, t0 = w.t0;
    long long rg_begin = w.rg_begin, rg_end = w.rg_end;
    const int *list = w.list;
    // this warpgroup's keys: wkey0 .. key_end - 1 (at most 64)
    int wkey0 = key0 + wg * NB, cnt = max(0, min(NB, key_end - wkey0));
    size_t stride = (size_t)s.G * s.d, kbase = (size_t)b * Tk * stride + (size_t)g * s.d;
    Ks += wg * TE, Vs += wg * TE;
#if NSA_WGMMA
    load_tile_sw<DP>(Ks, K, kbase, stride, wkey0, cnt, s.d, wtid);
    load_tile_sw<DP>(Vs, V, kbase, stride, wkey0, cnt, s.d, wtid);
#else
    load_tile<DP>(Ks, K, kbase, stride, wkey0, cnt, s.d, wtid);
    load_tile<DP>(Vs, V, kbase, stride, wkey0, cnt, s.d, wtid);
#endif

    // query row r of the piece: position and row index
    auto row_of = [&](long long rg, int &t, size_t &row) {
        int qi = (int)(rg / s.hpg), hh = (int)(rg % s.hpg);
        t = PATH == PATH_SLC ? list[qi] : t0 + qi;
        row = ((size_t)b * s.T + t) * s.H + (size_t)g * s.hpg + hh;
    };
    // 2 WG threads a row: each copies its share of the row's q and dO chunks; the first
    // also writes the row's metadata.
    auto load_rows = [&](long long rg0, int stg) {
        const int CH = DP / 8, TPR = MMA_THREADS * WG / MB;
        int r = threadIdx.x / TPR, part = threadIdx.x % TPR;
        long long rg = rg0 + r;
        int t = -1;
        size_t row = 0;
        if (rg < rg_end)
            row_of(rg, t, row);
#pragma unroll
        for (int i = 0; i < CH / TPR; i++) {
            int c = (part + TPR * i) * 8;
            bool ok = t >= 0 && c < s.d;
            const bf16 *sq = ok ? q + row * s.d + c : q, *so = ok ? dO16 + row * s.d + c : dO16;
#if NSA_WGMMA
            uint32_t at = sw128_off(NB, r, c);
            cp_async16((unsigned char *)(Qs + stg * TE) + at, sq, ok ? 16 : 0);
            cp_async16((unsigned char *)(Os + stg * TE) + at, so, ok ? 16 : 0);
#else
            cp_async16(Qs + stg * TE + r * LD + c, sq, ok ? 16 : 0);
            cp_async16(Os + stg * TE + r * LD + c, so, ok ? 16 : 0);
#endif
        }
        if (part == 0)
            meta_s[stg * MB + r] =
                t >= 0 ? dkv_row_meta(t, lse3[row * 3 + PATH], gates[row * 3 + PATH],
                                      Dp[row * 3 + PATH])
                       : dkv_row_meta(-1, 0.0f, 0.0f, 0.0f);
    };
    // (TMA) tile j's rows into stage j % ST by warp 0: q and dO boxes, metadata by bulk
    // copies. Compressed and window rows are whole positions from t0 (rg_begin % hpg == 0);
    // the selected path's positions come from the list, one box each, and the slots past
    // the list read position T (zeros).
    auto issue = [&](int j) {
        int stg = j % ST, pos_per_tile = MB / s.hpg; // positions a tile
        long long rg0 = rg_begin + (long long)j * MB;
        unsigned char *q_dst = (unsigned char *)(Qs + stg * TE);
        unsigned char *o_dst = (unsigned char *)(Os + stg * TE);
        float4 *meta_dst = meta_s + stg * MB;
        const float4 *meta_src = meta4 + (((size_t)PATH * s.B + b) * s.G + g) * s.T * s.hpg;
        uint64_t *bar = &full[stg];
        if (PATH != PATH_SLC) {
            if (lane == 0) {
                int t = t0 + (int)(rg0 / s.hpg);
                unsigned nrows = (unsigned)min((long long)MB, (long long)(s.T - t) * s.hpg);
                mbar_expect_tx(bar, 2 * TE * (unsigned)sizeof(bf16) + nrows * 16);
#pragma unroll
                for (int p = 0; p < DP / 64; p++) {
                    tma_load_5d(q_dst + p * NB * 128, &tm.q, p * 64, 0, g, t, b, bar);
                    tma_load_5d(o_dst + p * NB * 128, &tm.o, p * 64, 0, g, t, b, bar);
                }
                bulk_load(meta_dst, meta_src + (size_t)t * s.hpg, nrows * 16, bar);
            }
        } else {
            int qi0 = (int)(rg0 / s.hpg), npos = (int)(rg_end / s.hpg);
            int nvalid = max(0, min(pos_per_tile, npos - qi0));
            if (lane == 0)
                mbar_expect_tx(bar, 2 * TE * (unsigned)sizeof(bf16) +
                                        (unsigned)(nvalid * s.hpg * 16));
            __syncwarp();
            for (int slot = lane; slot < pos_per_tile; slot += 32) {
                int t = slot < nvalid ? list[qi0 + slot] : s.T;
                unsigned off = (unsigned)(slot * s.hpg * 128);
#pragma unroll
                for (int p = 0; p < DP / 64; p++) {
                    tma_load_5d(q_dst + p * NB * 128 + off, &tm.q, p * 64, 0, g, t, b, bar);
                    tma_load_5d(o_dst + p * NB * 128 + off, &tm.o, p * 64, 0, g, t, b, bar);
                }
                if (slot < nvalid)
                    bulk_load(meta_dst + slot * s.hpg, meta_src + (size_t)t * s.hpg,
                              (unsigned)(s.hpg * 16), bar);
            }
        }
    };

    const float sl2 = s.scale * LOG2E;
    float dk[DP / 8][4], dv[DP / 8][4];
    frag_zero(dk);
    frag_zero(dv);
    // The thread's two keys: position pos sees rows of position t when
    //   compressed: t >= pos * r + l - 1;  window: 0 <= t - pos < w;  selected: t >= pos,
    // as t >= tmin and (unsigned)(t - tmin) < span; a key past the tile: tmin = INT_MAX.
    int tmin[2];
    unsigned span[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        int pos = wkey0 + warp * 16 + gq + 8 * i;
        tmin[i] = pos >= key_end ? INT_MAX : PATH == PATH_CMP ? pos * s.r + s.l - 1 : pos;
        span[i] = PATH == PATH_WIN ? (unsigned)s.w : UINT_MAX;
    }
    int ntiles = (int)((rg_end - rg_begin + MB - 1) / MB);

#if NSA_WGMMA
    // (DQP) the tile's dq partials from dS in dSs: dq_part = scale dS K, 64 columns at a time
    auto dq_partials = [&](const float4 *ms, long long nrows) {
        __syncthreads(); // dSs complete
        int blk = key0 / s.b;
        // the block's slot in the selection of the position of rows warp 16 + 8 i (H/G >= 8:
        // eight rows, one position) and that position's first row
        int slot[2];
        size_t rowp[2];
#pragma unroll
        for (int i = 0; i < 2; i++) {
            int r = warp * 16 + 8 * i;
            // (-1: past the list, or no key on the path: lse -inf for every head of the
            // position, whose rows the add kernel skips)
            int t = r < nrows ? __float_as_int(ms[r].x) : -1;
            rowp[i] = ((size_t)b * s.T + (t < 0 ? 0 : t)) * s.H + (size_t)g * s.hpg + r % s.hpg;
            slot[i] = t < 0 ? -1
                            : warp_slot_of(idx + (((size_t)b * s.T + t) * s.G + g) * s.n, s.n,
                                           blk, lane);
        }
#pragma unroll
        for (int half = 0; half < DP / 64; half++) {
            float acc[8][4];
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < NB / 16; ks++)
                wgmma_ss_n64<1>(acc, desc_k(dSs, NB, ks), desc_mn(Ks + half * NB * 64, NB, ks),
                                ks > 0);
            wgmma_commit();
            wgmma_wait<0>();
            wgmma_hold(acc);
#pragma unroll
            for (int i = 0; i < 2; i++) {
                if (slot[i] < 0)
                    continue;
                size_t at = ((rowp[i] + gq) * s.n + slot[i]) * s.d + half * 64;
                // (slot[i] is the same in every lane: the paired bf16 stores shuffle)
                if (DQP == 1)
                    store_row_bf16<8>((bf16 *)part_dq + at, acc, i, s.scale, lane,
                                      s.d - half * 64);
                else
                    store_frag_row<64>((float *)part_dq + at, acc, i, s.scale, lane,
                                       s.d - half * 64);
            }
        }
    };
#endif
    // One tile of 64 rows (the first `nrows` of it real) at Qt / Ot with metadata ms.
    auto step = [&](const bf16 *Qt, const bf16 *Ot, const float4 *ms, long long nrows) {
        float st[8][4], dpt[8][4];
        // P = exp(S - lse) masked, in st (on sm_90a while dP^T still runs on the tensor cores)
        auto probs = [&]() {
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    int rr = nt * 8 + 2 * c4 + h;
                    float4 m = ms[rr];
                    int t = rr < nrows ? __float_as_int(m.x) : -1;
#pragma unroll
                    for (int i = 0; i < 2; i++) {
                        bool ok = t >= tmin[i] &&
                                  (PATH != PATH_WIN || (unsigned)(t - tmin[i]) < span[i]);
                        st[nt][2 * i + h] = ok ? ex2_approx(st[nt][2 * i + h] * sl2 - m.y) : 0.0f;
                    }
                }
        };
        // dS = P (gate dP - D) into dpt, gate P into st
        auto grads = [&]() {
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    float4 m = ms[nt * 8 + 2 * c4 + h];
#pragma unroll
                    for (int i = 0; i < 2; i++) {
                        int e = 2 * i + h;
                        dpt[nt][e] = st[nt][e] * (m.z * dpt[nt][e] - m.w); // dK += dS^T Q
                        st[nt][e] *= m.z;                                  // dV += (gate P)^T dO
                    }
                }
        };
#if NSA_WGMMA
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < DP / 16; ks++) // S^T: keys x rows
            wgmma_ss_n64(st, desc_k(Ks, NB, ks), desc_k(Qt, NB, ks), ks > 0);
        wgmma_commit();
#pragma unroll
        for (int ks = 0; ks < DP / 16; ks++) // dP^T
            wgmma_ss_n64(dpt, desc_k(Vs, NB, ks), desc_k(Ot, NB, ks), ks > 0);
        wgmma_commit();
        wgmma_wait<1>();
        wgmma_hold(st);
        probs();
        wgmma_wait<0>();
        wgmma_hold(dpt);
        grads();
        // dV += (gate P)^T dO, dK += dS^T Q: each batch's A fragments packed before its fence,
        // and left alone until the wait
        if constexpr (DQP) {
            __syncthreads(); // every warp's dq products of the last tile are done with dSs
            // dS^T (thread: keys warp 16 + gq + 8 i, rows nt 8 + 2 c4 + h) into dSs [row][key]
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int key = warp * 16 + gq + 8 * (e >> 1), rr = nt * 8 + 2 * c4 + (e & 1);
                    *(bf16 *)((unsigned char *)dSs + sw128_off(NB, rr, key)) =
                        __float2bfloat16(dpt[nt][e]);
                }
            fence_async_smem();
        }
        uint32_t av[4][4], ak[4][4];
#pragma unroll
        for (int j = 0; j < 4; j++)
            c_to_a(av[j], st[2 * j], st[2 * j + 1]);
        wg_p_v_issue<DP>(dv, av, Ot, lane);
#pragma unroll
        for (int j = 0; j < 4; j++)
            c_to_a(ak[j], dpt[2 * j], dpt[2 * j + 1]);
        wg_p_v_issue<DP>(dk, ak, Qt, lane);
        wgmma_wait<0>();
        wgmma_hold(dv);
        wgmma_hold(dk);
        if constexpr (DQP)
            dq_partials(ms, nrows);
#else
        // (DQP runs only where the host's probe found this sm_90a code: cuda_backend.cu)
        mma_rows_keys_sa<DP>(st, Ks, warp * 16, Qt, lane);  // S^T: keys x rows
        mma_rows_keys_sa<DP>(dpt, Vs, warp * 16, Ot, lane); // dP^T
        probs();
        grads();
        mma_p_v<DP>(dv, st, Ot, lane);
        mma_p_v<DP>(dk, dpt, Qt, lane);
#endif
    };

    if constexpr (TMA && NSA_WGMMA) { // (the sm_90 build's padded tiles: cp.async)
        mbar_init_pipe<ST>(full, MMA_THREADS * WG); // empty = full + ST
        // metadata rows no copy fills (past the sequence, past the list) read as finite
        for (int i = threadIdx.x; i < ST * MB; i += blockDim.x)
            meta_s[i] = make_float4(__int_as_float(-1), 0.0f, 0.0f, 0.0f);
        cp_async_commit();
        cp_async_wait<0>();
        fence_async_smem();
        __syncthreads();
        if (threadIdx.x < 32)
            for (int j = 0; j < ST - 1 && j < ntiles; j++)
                issue(j);
        row_stream<ST>(full, empty, ntiles, issue, [&](int it) {
            int stg = it % ST;
            step(Qs + stg * TE, Os + stg * TE, meta_s + stg * MB,
                 rg_end - rg_begin - (long long)it * MB);
            mbar_arrive(&empty[stg]); // this thread's reads of the stage are done
        });
    } else {
        load_rows(rg_begin, 0);
        cp_async_commit();
        for (int it = 0; it < ntiles; it++) {
            int stg = it & 1;
            if (it + 1 < ntiles)
                load_rows(rg_begin + (long long)(it + 1) * MB, stg ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
#if NSA_WGMMA
            fence_async_smem();
#endif
            __syncthreads();
            step(Qs + stg * TE, Os + stg * TE, meta_s + stg * MB, MB);
            __syncthreads();
        }
    }
    // window: written (=); compressed and selected: added
#pragma unroll
    for (int i = 0; i < 2; i++) {
        int pos = wkey0 + warp * 16 + gq + 8 * i;
        if (pos >= key_end)
            continue;
        size_t at = kbase + (size_t)pos * stride;
#pragma unroll
        for (int nt = 0; nt < DP / 8; nt++) {
            int col = nt * 8 + 2 * c4;
            if (col >= s.d)
                continue;
            float k0 = dk[nt][2 * i] * s.scale, k1 = dk[nt][2 * i + 1] * s.scale;
            float v0 = dv[nt][2 * i], v1 = dv[nt][2 * i + 1];
            if (PATH == PATH_WIN) {
                *reinterpret_cast<float2 *>(dK + at + col) = make_float2(k0, k1);
                *reinterpret_cast<float2 *>(dV + at + col) = make_float2(v0, v1);
            } else {
                atomicAdd(dK + at + col, k0);
                atomicAdd(dK + at + col + 1, k1);
                atomicAdd(dV + at + col, v0);
                atomicAdd(dV + at + col + 1, v1);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The op

template <int DP>
static nsa_status bf16_backward_dp(nsa_context *ctx, const attn_shape &s, float *dq, float *dk,
                                   float *dv, float *dkc, float *dvc, const bf16 *q,
                                   const bf16 *k, const bf16 *v, const bf16 *kc, const bf16 *vc,
                                   const bf16 *dO16, const float *gates, const int32_t *idx,
                                   const float *lse, const float *Dp, const float4 *meta4,
                                   int *ws, float *part_dq, void *dq_parts)
{
    nsa__cuda_state *cs = nsa__cuda(ctx);
    long long tiles = ((long long)s.T * s.hpg + MB - 1) / MB;
    size_t bytes = dq_smem_bytes<DP>(s);
    NSA_TRY(allow_smem(ctx, bf16_bwd_dq_kernel<DP>, bytes));
    int warp_slc = s.hpg % 16 == 0 && !cs->bf16_slc_union;
    // dq of the compressed and window paths (all three by union tiles for small groups)
    auto dq_dense = [&]() -> nsa_status {
        if (!warp_slc && !part_dq) {
            bf16_bwd_dq_kernel<DP><<<dim3((unsigned)tiles, s.G, s.B), MMA_THREADS, bytes,
                                     nsa__cuda_stream(ctx)>>>(dq, q, k, v, kc, vc, dO16, gates,
                                                              lse, Dp, idx, 1, s);
            NSA_CUDA_LAUNCHED("bf16_bwd_dq_kernel");
            return NSA_OK;
        }
        int wgs = cs->dq_wg;
        auto launch = wgs == 3 ? dq_wg<DP, 3> : wgs == 2 ? dq_wg<DP, 2> : dq_wg<DP, 1>;
        return launch(ctx, s, dq, q, k, v, kc, vc, dO16, gates, lse, Dp);
    };
    // dq of the selected path, a warp a position, or the sum of the partials the selected
    // dk/dv kernel wrote (adds to dq)
    auto dq_selected = [&]() -> nsa_status {
        if (!warp_slc)
            return NSA_OK;
        if (dq_parts)
            return nsa__cuda_dq_slc_add(ctx, s, dq, dq_parts, cs->dq_fused == 2, idx, lse);
        switch (cs->bf16_slcw[1]) {
#define SLCW_CASE(id, keys, st, w, minb)                                                     \
    case id:                                                                                 \
        return dq_slc_warp<DP, keys, st, w, minb>(ctx, s, dq, q, k, v, dO16, gates, lse, Dp, \
                                                  idx);
            SLCW_CONFIGS(SLCW_CASE)
#undef SLCW_CASE
        }
        return NSA_OK;
    };

    // window and compressed: tiles of 128 keys (two warpgroups); selected: one block. Query
    // rows by TMA when the prep kernel wrote their metadata (meta4: H/G divides 64).
    dkv_grid kg = {}, kg2 = {};
    NSA_TRY(dkv_grid_of(s, NB, 64 * MB, &kg));
    NSA_TRY(dkv_grid_of(s, 2 * NB, 64 * MB, &kg2));
    int tma = meta4 != NULL && kg2.split_rows % s.hpg == 0; // (pieces of whole positions)
    // the selected path's rows by TMA when a position's box is at least 1 KB (H/G >= 8: each
    // box then also lands on a 1024-byte boundary of the sw128 tile, as the swizzle pattern
    // needs; with fewer heads the copies are too small anyway: H = G = 64 at 16k, 25 -> 32 ms)
    int tma_slc = tma && s.hpg >= 8;
    if (!tma_slc || kg.slc_chunks != 1 || !warp_slc)
        dq_parts = NULL; // (the caller checks the same)
    dkv_maps tm{}, tm1{}; // boxes of a tile's positions, of one position (zeros when unused)
    if (tma) {
        NSA_TRY(nsa__cuda_tensor_map_rows(ctx, &tm.q, q, s.B, s.T, s.G, s.hpg, s.d, MB / s.hpg));
        NSA_TRY(nsa__cuda_tensor_map_rows(ctx, &tm.o, dO16, s.B, s.T, s.G, s.hpg, s.d,
                                          MB / s.hpg));
    }
    if (tma_slc) {
        NSA_TRY(nsa__cuda_tensor_map_rows(ctx, &tm1.q, q, s.B, s.T, s.G, s.hpg, s.d, 1));
        NSA_TRY(nsa__cuda_tensor_map_rows(ctx, &tm1.o, dO16, s.B, s.T, s.G, s.hpg, s.d, 1));
    }
    auto kwin = tma ? bf16_bwd_dkv_kernel<DP, PATH_WIN, 2, DKV_ST(2), true>
                    : bf16_bwd_dkv_kernel<DP, PATH_WIN, 2, 2, false>;
    auto kcmp = tma ? bf16_bwd_dkv_kernel<DP, PATH_CMP, 2, DKV_ST(2), true>
                    : bf16_bwd_dkv_kernel<DP, PATH_CMP, 2, 2, false>;
    int dqp = dq_parts ? cs->dq_fused : 0; // 1: bf16 dq partials, 2: fp32
    cs->slc_kind[1] = !warp_slc ? (part_dq ? NSA_SLC_KV : NSA_SLC_UNION)
                      : dqp     ? NSA_SLC_KC + dqp
                                : NSA_SLC_WARP + cs->bf16_slcw[1];
    auto kslc = dqp == 2  ? bf16_bwd_dkv_kernel<DP, PATH_SLC, 1, DKV_ST(1), true, 2>
                : dqp     ? bf16_bwd_dkv_kernel<DP, PATH_SLC, 1, DKV_ST(1), true, 1>
                : tma_slc ? bf16_bwd_dkv_kernel<DP, PATH_SLC, 1, DKV_ST(1), true>
                          : bf16_bwd_dkv_kernel<DP, PATH_SLC, 1, 2, false>;
    size_t kv_bytes = tma_slc ? dkv_smem_bytes<DP, 1, DKV_ST(1)>(dq_parts != NULL)
                              : dkv_smem_bytes<DP, 1, 2>();
    size_t kv2_bytes = tma ? dkv_smem_bytes<DP, 2, DKV_ST(2)>() : dkv_smem_bytes<DP, 2, 2>();
    NSA_TRY(allow_smem(ctx, kwin, kv2_bytes));
    NSA_TRY(allow_smem(ctx, kcmp, kv2_bytes));
    NSA_TRY(allow_smem(ctx, kslc, kv_bytes));
    // dk, dv of the window path (writes them)
    auto dkv_window = [&]() -> nsa_status {
        kwin<<<kg2.win, 2 * MMA_THREADS, kv2_bytes, nsa__cuda_stream(ctx)>>>(
            dk, dv, q, dO16, k, v, gates, lse, Dp, meta4, tm, NULL, NULL, NULL, 0, NULL, NULL, s);
        NSA_CUDA_LAUNCHED("bf16_bwd_dkv_kernel<window>");
        return NSA_OK;
    };
    // dkc, dvc
    auto dkv_compressed = [&]() -> nsa_status {
        if (s.Tc <= 0)
            return NSA_OK;
        cudaStream_t st = nsa__cuda_stream(ctx);
        size_t nkvc = (size_t)s.B * s.Tc * s.G * s.d;
        NSA_CUDA_TRY(cudaMemsetAsync(dkc, 0, nkvc * sizeof(float), st));
        NSA_CUDA_TRY(cudaMemsetAsync(dvc, 0, nkvc * sizeof(float), st));
        kcmp<<<kg2.cmp, 2 * MMA_THREADS, kv2_bytes, st>>>(dkc, dvc, q, dO16, kc, vc, gates, lse,
                                                          Dp, meta4, tm, NULL, NULL, NULL,
                                                          kg2.split_rows, NULL, NULL, s);
        NSA_CUDA_LAUNCHED("bf16_bwd_dkv_kernel<compressed>");
        return NSA_OK;
    };
    // dk, dv of the selected path (adds to them), and for small groups its dq by key blocks
    auto dkv_selected = [&]() -> nsa_status {
        sel_index si;
        NSA_TRY(nsa__cuda_sel_lists(ctx, s, idx, ws, kg.split_pos, &si));
        kslc<<<dim3((unsigned)si.max_items, kg.slc_chunks, 1), MMA_THREADS, kv_bytes,
               nsa__cuda_stream(ctx)>>>(dk, dv, q, dO16, k, v, gates, lse, Dp, meta4, tm1,
                                        si.offsets, si.lists, si.item_start, kg.split_pos,
                                        dq_parts, idx, s);
        NSA_CUDA_LAUNCHED("bf16_bwd_dkv_kernel<selected>");
        if (part_dq) // small groups: dq of the selected path by key blocks (same index)
            NSA_TRY(nsa__cuda_dq_slc_kv(ctx, s, part_dq, dq, q, k, v, dO16, gates, lse, Dp, idx,
                                        si, kg.split_pos));
        return NSA_OK;
    };

    if (!cs->ev[0] || !warp_slc) {
        NSA_TRY(dq_dense());
        if (!dq_parts)
            NSA_TRY(dq_selected());
        NSA_TRY(dkv_window());
        NSA_TRY(dkv_compressed());
        NSA_TRY(dkv_selected());
        return dq_parts ? dq_selected() : NSA_OK; // the sum of the partials dkv_selected wrote
    }
    // two streams, each kernel after the one that last wrote its output: the selected path
    // on side[0], the others on side[1], so one kernel's last wave overlaps another's first;
    // the context's stream waits for both
    cudaStream_t sl = cs->side[0], sc = cs->side[1];
    NSA_CUDA_TRY(nsa__cuda_fork(cs, 2));
    nsa_status st = [&]() -> nsa_status {
        {
            nsa__on_stream on(cs, sc);
            NSA_TRY(dkv_window());
            NSA_CUDA_TRY(cudaEventRecord(cs->ev[1], sc));
            NSA_TRY(dq_dense());
            NSA_CUDA_TRY(cudaEventRecord(cs->ev[2], sc));
            NSA_TRY(dkv_compressed());
        }
        nsa__on_stream on(cs, sl);
        NSA_CUDA_TRY(cudaStreamWaitEvent(sl, cs->ev[1], 0));
        NSA_TRY(dkv_selected());
        NSA_CUDA_TRY(cudaStreamWaitEvent(sl, cs->ev[2], 0));
        return dq_selected();
    }();
    return nsa__cuda_join(cs, 2, st);
}

nsa_status nsa__cuda_attn_backward_bf16(nsa_context *ctx, const nsa__attn_dims *dims,
                                        const uint16_t *q16, const uint16_t *k16,
                                        const uint16_t *v16, const uint16_t *kc16,
                                        const uint16_t *vc16, const float *gates,
                                        const int32_t *idx, const float *o_paths,
                                        const float *lse, const float *dout, float *dq,
                                        float *dk, float *dv, float *dkc, float *dvc,
                                        float *dgates)
{
    const bf16 *q = (const bf16 *)q16, *k = (const bf16 *)k16, *v = (const bf16 *)v16;
    const bf16 *kc = (const bf16 *)kc16, *vc = (const bf16 *)vc16;
    attn_shape s = shape_of(dims);
    if (s.q_start != 0)
        return nsa__error(NSA_ERR_UNSUPPORTED, "cuda attention backward: q_start = %d: the "
                                               "backward runs on full sequences only",
                          s.q_start);
    if (s.T <= 0 || s.B <= 0)
        return NSA_OK;
    const void *ptrs[] = {q, k, v, kc, vc, dq, dk, dv, dkc, dvc, dout, o_paths};
    if (!bf16_supported(s, ptrs, 12))
        return nsa__error(NSA_ERR_UNSUPPORTED,
                          "cuda bf16 attention: head_dim = %d: needs a multiple of 8 up to 128 "
                          "and 16-byte aligned buffers",
                          s.d);
    size_t rows = (size_t)s.B * s.T * s.H;
    // small groups (H/G <= 4): dq of the selected path by key blocks when its partials fit in
    // half the free device memory (as the forward), else union tiles. H100, T = 16384: H/G =
    // 1, 2, 4 gain 1.33x, 1.19x, 1.06x; at H/G = 8 union tiles were faster (14.5 vs 16.1 ms).
    nsa__cuda_state *cs = nsa__cuda(ctx);
    size_t part_bytes = 0;
    if (s.hpg <= 4 && !cs->bf16_slc_union)
        part_bytes = bytes_if_half_free(nsa__cuda_dq_slc_kv_scratch_bytes(s));
    // the key-centric kernels stream query rows by TMA (metadata in meta4) when whole
    // positions fill their 64-row tiles (the sm_90 build's kernels keep cp.async)
    int meta = cs->use_tma && s.hpg <= MB && MB % s.hpg == 0;
    // H/G a multiple of 16 on sm_90a, NSA_CUDA_DQ_FUSED=1 (bf16) or 2 (fp32): the selected
    // dk/dv kernel also writes the path's dq, one partial a (row, block), when they fit in
    // half the free device memory and a block is one key tile; otherwise (and by default,
    // until it has been checked and timed on a GPU) the query-centric dq kernel
    size_t parts_bytes = 0;
    if (meta && cs->sm90a && cs->dq_fused && s.hpg % 16 == 0 && s.b <= NB &&
        !cs->bf16_slc_union)
        parts_bytes = bytes_if_half_free(rows * s.n * s.d *
                                          (cs->dq_fused == 2 ? sizeof(float) : sizeof(bf16)));
    // scratch: dout as bf16, D [rows, 3], the selection index, the dq partials, meta4
    size_t o16_bytes = nsa__align256(rows * s.d * sizeof(bf16));
    size_t ws_bytes =
        nsa__align256(rows * 3 * sizeof(float) + nsa__cuda_sel_ws_ints(s) * sizeof(int));
    size_t part_at = o16_bytes + ws_bytes, parts_at = part_at + nsa__align256(part_bytes);
    size_t meta_at = parts_at + nsa__align256(parts_bytes);
    size_t meta_bytes = meta ? 3 * rows * sizeof(float4) : 0;
    void *mem;
    NSA_TRY(nsa__cuda_scratch(ctx, meta_at + meta_bytes, &mem));
    bf16 *dO16 = (bf16 *)mem;
    float *Dp = (float *)((char *)mem + o16_bytes);
    int *ws = (int *)(Dp + rows * 3);
    float *part_dq = part_bytes ? (float *)((char *)mem + part_at) : NULL;
    void *dq_parts = parts_bytes ? (void *)((char *)mem + parts_at) : NULL;
    float4 *meta4 = meta ? (float4 *)((char *)mem + meta_at) : NULL;
    cudaStream_t st = nsa__cuda_stream(ctx);
    bf16_bwd_prep_kernel<<<nsa__cuda_blocks(rows * 32, 256), 256, 0, st>>>(
        dgates, Dp, meta4, dO16, dout, o_paths, gates, lse, rows, s);
    NSA_CUDA_LAUNCHED("bf16_bwd_prep_kernel");
    if (s.d <= 64)
        return bf16_backward_dp<64>(ctx, s, dq, dk, dv, dkc, dvc, q, k, v, kc, vc, dO16, gates,
                                    idx, lse, Dp, meta4, ws, part_dq, dq_parts);
    return bf16_backward_dp<128>(ctx, s, dq, dk, dv, dkc, dvc, q, k, v, kc, vc, dO16, gates, idx,
                                 lse, Dp, meta4, ws, part_dq, dq_parts);
}

// ---------------------------------------------------------------------------------------
// NSA_PRECISION_BF16 through the fp32 ops

// bf16 copies of q [nq], k, v [nkv], kc, vc [nkvc] in the operand scratch.
static nsa_status operands_bf16(nsa_context *ctx, const float *q, const float *k, const float *v,
                                const float *kc, const float *vc, size_t nq, size_t nkv,
                                size_t nkvc, uint16_t *(&out)[5])
{
    size_t n[5] = {nq, nkv, nkv, nkvc, nkvc}, total = 0;
    for (int i = 0; i < 5; i++)
        total += (n[i] + 7) / 8 * 8; // 16-byte aligned pieces
    void *mem;
    NSA_TRY(nsa__cuda_operand_scratch(ctx, total * sizeof(bf16), &mem));
    const float *src[5] = {q, k, v, kc, vc};
    bf16 *at = (bf16 *)mem;
    for (int i = 0; i < 5; i++) {
        out[i] = (uint16_t *)at;
        NSA_TRY(nsa__cuda_f32_to_bf16(ctx, at, src[i], n[i]));
        at += (n[i] + 7) / 8 * 8;
    }
    return NSA_OK;
}

nsa_status nsa__cuda_attn_forward_as_bf16(nsa_context *ctx, const nsa__attn_dims *dims,
                                          const float *q, const float *k, const float *v,
                                          const float *kc, const float *vc, const float *gates,
                                          const int32_t *given_idx, int32_t *idx, float *out,
                                          float *o_paths, float *lse, int *done)
{
    attn_shape s = shape_of(dims);
    const void *ptrs[] = {out, o_paths};
    *done = 0;
    if (!bf16_supported(s, ptrs, 2))
        return NSA_OK;
    uint16_t *op[5];
    NSA_TRY(operands_bf16(ctx, q, k, v, kc, vc, (size_t)s.B * s.Tq * s.H * s.d,
                          (size_t)s.B * s.T * s.G * s.d, (size_t)s.B * s.Tc * s.G * s.d, op));
    NSA_TRY(nsa__cuda_attn_forward_bf16(ctx, dims, op[0], op[1], op[2], op[3], op[4], gates,
                                        given_idx, idx, out, o_paths, lse));
    *done = 1;
    return NSA_OK;
}

nsa_status nsa__cuda_attn_backward_as_bf16(nsa_context *ctx, const nsa__attn_dims *dims,
                                           const float *q, const float *k, const float *v,
                                           const float *kc, const float *vc, const float *gates,
                                           const int32_t *idx, const float *o_paths,
                                           const float *lse, const float *dout, float *dq,
                                           float *dk, float *dv, float *dkc, float *dvc,
                                           float *dgates, int *done)
{
    attn_shape s = shape_of(dims);
    const void *ptrs[] = {dq, dk, dv, dkc, dvc, dout, o_paths};
    *done = 0;
    if (!bf16_supported(s, ptrs, 7))
        return NSA_OK;
    uint16_t *op[5];
    NSA_TRY(operands_bf16(ctx, q, k, v, kc, vc, (size_t)s.B * s.T * s.H * s.d,
                          (size_t)s.B * s.T * s.G * s.d, (size_t)s.B * s.Tc * s.G * s.d, op));
    NSA_TRY(nsa__cuda_attn_backward_bf16(ctx, dims, op[0], op[1], op[2], op[3], op[4], gates, idx,
                                         o_paths, lse, dout, dq, dk, dv, dkc, dvc, dgates));
    *done = 1;
    return NSA_OK;
}
