/*
 * attention_bf16.cu — the three attention paths of SPEC §3 with bf16 operands on the tensor
 * cores (mma.sync m16n8k16, fp32 accumulation): the forward kernels and the bf16 forward op.
 * The tile layout and the step are in attention_bf16.cuh.
 *
 *   bf16_range:  compressed path, and (a second instance) the sliding window: the tile's
 *                rows attend a contiguous key range, each row masked to its own.
 *   bf16_score:  with cmp_attn, a second pass over the same compressed keys turns the
 *                probabilities (fp32, from the saved lse) into block scores and a warp per
 *                position picks the top n (scoring + top-k fused; no T x blocks score tensor
 *                in global memory).
 *   bf16_slc:    the selected blocks — the union of the blocks the tile's positions chose,
 *                streamed once for all of them; a warp skips a block none of its rows chose
 *                and masks rows that did not — and the gated sum.
 * Outputs (out, o_paths, lse) are fp32. Probabilities are rounded to bf16 only as the A
 * operand of P V; the softmax sums and the block scores use the fp32 values. The window
 * path runs on a second stream of the context beside the compressed path and the scoring;
 * the selected path, which forms the gated sum, waits for both.
 */
#include "cuda/attention_bf16.cuh"
#include "cuda/tma.cuh"

// ---------------------------------------------------------------------------------------
// Conversions

__global__ void bf16_to_f32_kernel(float *dst, const bf16 *src, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __bfloat162float(src[i]);
}

__global__ void f32_to_bf16_kernel(bf16 *dst, const float *src, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __float2bfloat16_rn(src[i]);
}

nsa_status nsa__cuda_bf16_to_f32(nsa_context *ctx, float *dst, const bf16 *src, size_t n)
{
    if (!n)
        return NSA_OK;
    bf16_to_f32_kernel<<<nsa__cuda_blocks(n, 256), 256, 0, nsa__cuda_stream(ctx)>>>(dst, src, n);
    NSA_CUDA_LAUNCHED("bf16_to_f32_kernel");
    return NSA_OK;
}

nsa_status nsa__cuda_f32_to_bf16(nsa_context *ctx, bf16 *dst, const float *src, size_t n)
{
    if (!n)
        return NSA_OK;
    f32_to_bf16_kernel<<<nsa__cuda_blocks(n, 256), 256, 0, nsa__cuda_stream(ctx)>>>(dst, src, n);
    NSA_CUDA_LAUNCHED("f32_to_bf16_kernel");
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// Compressed path and sliding window: one kernel over a contiguous key range

// The end of both range kernels for a warp's rows row0 .. row0 + 15 of the tile tr:
// normalised o into o_path, lse into slot `path` of lse3 (when given).
template <int DP, int R>
__device__ __forceinline__ void range_finish(fwd_acc<DP> &acc, float *o_path, float *lse3,
                                             int path, const mrows<R> *tr, int row0, int lane,
                                             int d)
{
    float lse[2];
    acc.finish(lse);
    store_frag_rows<DP>(o_path, tr->t, tr->row, acc.o, row0, lane, d);
    if (lse3 && lane % 4 == 0)
#pragma unroll
        for (int i = 0; i < 2; i++) {
            int r = row0 + lane / 4 + 8 * i;
            if (tr->t[r] >= 0)
                lse3[(size_t)tr->row[r] * 3 + path] = lse[i];
        }
}

// The warp kernel (NSA_CUDA_BF16_MT=1; the warpgroup kernel below otherwise): 64 rows a
// block, 16 a warp, Q in a padded shared tile.

template <int DP> static size_t attn_smem_bytes()
{
    return (size_t)MB * mcfg<DP>::LD * sizeof(bf16) + 4 * mcfg<DP>::TILE + sizeof(mrows<MB>);
}

// PATH_CMP: K, V = kc, vc; row t attends compressed tokens j < visible_cmp(t).
// PATH_WIN: K, V = k, v; row t attends keys t - w < key <= t.
// Writes o_path and, where lse3 is given, lse slot PATH.
template <int DP, int PATH>
__global__ void __launch_bounds__(MMA_THREADS, 2)
    bf16_range_kernel(float *o_path, float *lse3, const bf16 *q, const bf16 *K, const bf16 *V,
                      attn_shape s)
{
    const int LD = mcfg<DP>::LD;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *Qs = (bf16 *)smem_raw, *Ks = Qs + MB * LD, *Vs = Ks + 2 * NB * LD;
    mrows<MB> *tr = (mrows<MB> *)(Vs + 2 * NB * LD);
    int tile = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4;
    int row0 = warp * 16;
    mrows_init<MB>(tr, s, tile, g, b);
    __syncthreads();
    load_row_tile<DP, MB>(Qs, q, tr, s.d);
    cp_async_commit();
    long long first_rg = (long long)tile * MB;
    long long last_rg = min(first_rg + MB - 1, (long long)s.Tq * s.hpg - 1);
    int t_first = s.q_start + (int)(first_rg / s.hpg), t_last = s.q_start + (int)(last_rg / s.hpg);
    // per row: the number of visible compressed tokens (PATH_CMP) or the position (-1: none)
    int lim[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        int t = tr->t[row0 + gq + 8 * i];
        lim[i] = PATH == PATH_CMP ? (t < 0 ? 0 : visible_cmp(s, t)) : t;
    }
    // the tile's keys lo .. hi - 1
    int lo = PATH == PATH_CMP ? 0 : max(0, t_first - s.w + 1);
    int hi = PATH == PATH_CMP ? visible_cmp(s, t_last) : t_last + 1;
    int Tk = PATH == PATH_CMP ? s.Tc : s.T;
    size_t stride = (size_t)s.G * s.d, base = (size_t)b * Tk * stride + (size_t)g * s.d;
    const float sl2 = s.scale * LOG2E;
    fwd_acc<DP> acc;
    acc.reset();
    // one chunk: scores, mask ok(i, kk), online softmax, O += P V
    auto step = [&](const bf16 *Kt, const bf16 *Vt, auto ok) {
        float sc[8][4];
        mma_rows_keys_sa<DP>(sc, Qs, row0, Kt, lane);
        softmax_update<DP>(sc, acc.m, acc.l, acc.o, sl2, lane, ok);
        mma_p_v<DP>(acc.o, sc, Vt, lane);
    };
    stream_chunks<DP>(
        Ks, Vs, K, V, base, stride, s.d, (hi - lo + NB - 1) / NB,
        [&](int i, int &key0, int &cnt) {
            key0 = lo + i * NB;
            cnt = min(NB, hi - key0);
        },
        [&](int, int key0, int, const bf16 *Kt, const bf16 *Vt) {
            auto ok = [&](int ii, int key) {
                if (PATH == PATH_CMP)
                    return key < lim[ii];
                return key <= lim[ii] && key > lim[ii] - s.w;
            };
            // every row of the warp sees the whole chunk: no mask (most compressed chunks;
            // the window's two-sided test keeps its mask: unmasked copies spill there)
            bool full = PATH == PATH_CMP;
#pragma unroll
            for (int ii = 0; ii < 2; ii++)
                full = full && ok(ii, key0) && ok(ii, key0 + NB - 1);
            if (PATH == PATH_CMP && __all_sync(0xffffffffu, full))
                step(Kt, Vt, [](int, int) { return true; });
            else
                step(Kt, Vt, [&](int ii, int kk) { return ok(ii, key0 + kk); });
        });
    cp_async_wait<0>();
    range_finish<DP>(acc, o_path, lse3, PATH, tr, row0, lane, s.d);
}

// The same by warpgroups (wgmma on sm_90a, mma.sync on the same tiles otherwise): WG
// warpgroups of 64 rows each, Q in sw128 shared tiles, key chunks of KC = 64 or 128 keys
// through ST >= 3 stages shared by the warpgroups. Software-pipelined within a warpgroup as
// FlashAttention-3 does: the scores of chunk i + 1 run on the tensor cores while O is
// rescaled and O += P V of chunk i is issued, and the softmax of chunk i + 1 runs while that
// product does. A chunk's stage is refilled once every warpgroup is past its product
// (chunks i + 1 .. i + ST - 1 are loaded or in flight). With KC = 128 the scores are
// m64n128 products: per key, a third less shared-memory traffic (the Q operand is read once
// per 128 keys) and half the barriers; the 64 x 128 scores take 64 more registers a thread.
// With TMA the key tiles come from the copy engine (tma.cuh; one thread issues a chunk's
// copies, every thread waits on the stage's barrier) instead of cp.async by every thread.
template <int DP, int WG, int KC, int ST> static size_t range_wg_smem_bytes()
{
    return (WG * (size_t)NB + 2 * ST * (size_t)KC) * DP * sizeof(bf16) + sizeof(mrows<MB * WG>) +
           2 * ST * sizeof(uint64_t) + SMEM_ALIGN;
}

template <int DP, int WG, int PATH, int KC, int ST, bool TMA>
__global__ void __launch_bounds__(MMA_THREADS * WG, 1)
    bf16_range_wg_kernel(float *o_path, float *lse3, const bf16 *q, const bf16 *K, const bf16 *V,
                         const __grid_constant__ CUtensorMap tmK,
                         const __grid_constant__ CUtensorMap tmV, attn_shape s)
{
    static_assert(ST >= 3, "chunk i + 1 is loaded before chunk i's stage frees");
    const int R = MB * WG, TQ = NB * DP, TC = KC * DP;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *Qs = (bf16 *)smem_aligned(smem_raw), *Ks = Qs + WG * TQ, *Vs = Ks + ST * TC;
    mrows<R> *tr = (mrows<R> *)(Vs + ST * TC);
    // TMA: stage i % ST holds chunk i; full barriers, then empty ones (every thread done
    // with the stage's chunk)
    uint64_t *bars = (uint64_t *)(tr + 1);
    int tile = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
    int warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32, gq = lane / 4;
    int wg = warpgroup_index(), row0 = wg * NB + warp * 16;
    if (TMA)
        mbar_init_pipe<ST>(bars, MMA_THREADS * WG);
    mrows_init<R>(tr, s, tile, g, b);
    __syncthreads();
    Qs += wg * TQ;
    load_rows_sw<DP, R>(Qs, q, tr, s.d);
    cp_async_commit();
    long long first_rg = (long long)tile * R;
    long long last_rg = min(first_rg + R - 1, (long long)s.Tq * s.hpg - 1);
    int t_first = s.q_start + (int)(first_rg / s.hpg), t_last = s.q_start + (int)(last_rg / s.hpg);
    // per row: keys klo .. khi visible (compressed: 0 .. visible - 1; window: t - w + 1 .. t)
    int klo[2], khi[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        int t = tr->t[row0 + gq + 8 * i];
        klo[i] = PATH == PATH_CMP ? 0 : t - s.w + 1;
        khi[i] = PATH == PATH_CMP ? (t < 0 ? 0 : visible_cmp(s, t)) - 1 : t;
    }
    int lo = PATH == PATH_CMP ? 0 : max(0, t_first - s.w + 1);
    int hi = PATH == PATH_CMP ? visible_cmp(s, t_last) : t_last + 1;
    int nch = (hi - lo + KC - 1) / KC;
    int Tk = PATH == PATH_CMP ? s.Tc : s.T;
    size_t stride = (size_t)s.G * s.d, base = (size_t)b * Tk * stride + (size_t)g * s.d;
    // chunk i into stage i % ST (cp.async: one commit group each, empty past the end)
    auto load = [&](int i) {
        if (TMA) {
            if (threadIdx.x == 0 && i < nch) {
                uint64_t *bar = &bars[i % ST];
                int key0 = lo + i * KC;
                mbar_expect_tx(bar, 2 * TC * sizeof(bf16));
                tma_tile<DP, KC>(Ks + (i % ST) * TC, &tmK, g, b, key0, bar);
                tma_tile<DP, KC>(Vs + (i % ST) * TC, &tmV, g, b, key0, bar);
            }
            return;
        }
        if (i < nch) {
            int key0 = lo + i * KC;
            load_kv_sw<DP, WG, KC>(Ks + (i % ST) * TC, Vs + (i % ST) * TC, K, V, base, stride,
                                   key0, min(KC, hi - key0), s.d);
        }
        cp_async_commit();
    };
    // TMA: chunk i in shared memory (every thread waits on its stage's barrier)
    auto arrived = [&](int i) {
        if (TMA)
            mbar_wait_use<ST>(bars, i);
    };
    const float sl2 = s.scale * LOG2E;
    fwd_acc<DP> acc;
    acc.reset();
    int key0 = lo;
    auto probs = [&](float (&sc)[KC / 8][4], float (&alpha)[2]) { // softmax of the chunk at key0
        bool full = true;
#pragma unroll
        for (int ii = 0; ii < 2; ii++)
            full = full && klo[ii] <= key0 && khi[ii] >= key0 + KC - 1;
        if (__all_sync(0xffffffffu, full)) // no mask (most chunks)
            softmax_probs<KC>(sc, acc.m, acc.l, alpha, sl2, lane, [](int, int) { return true; });
        else
            softmax_probs<KC>(sc, acc.m, acc.l, alpha, sl2, lane, [&](int ii, int kk) {
                return key0 + kk >= klo[ii] && key0 + kk <= khi[ii];
            });
    };
#pragma unroll
    for (int i = 0; i < ST - 1; i++)
        load(i);
    float sc[KC / 8][4], alpha[2] = {1.0f, 1.0f};
    uint32_t a[KC / 16][4];
    if (nch > 0) {
        if (TMA)
            cp_async_wait<0>(); // Q
        else
            cp_async_wait<ST - 2>(); // Q and chunk 0
        fence_async_smem();
        arrived(0);
        __syncthreads();
        wg_rows_keys_issue<DP, KC>(sc, Qs, Ks, warp, lane);
        wg_wait<0>();
        wgmma_hold(sc);
        probs(sc, alpha);
#pragma unroll
        for (int j = 0; j < KC / 16; j++)
            c_to_a(a[j], sc[2 * j], sc[2 * j + 1]);
    }
    for (int i = 0; i < nch; i++) {
        bool next = i + 1 < nch;
        // chunk i + 1 in shared memory; every warpgroup past the product of chunk i - 1,
        // whose stage takes chunk i + ST - 1 (TMA: thread 0 waits for the stage's empty
        // barrier, the others go on)
        if (TMA) {
            if (threadIdx.x == 0 && i > 0 && i + ST - 1 < nch)
                mbar_wait_use<ST>(bars + ST, i - 1);
            if (next)
                arrived(i + 1);
        } else {
            cp_async_wait<ST - 3>();
            fence_async_smem();
            __syncthreads();
        }
        load(i + ST - 1);
        // (issued after the last chunk too, on chunk i's resident stage, and ignored: a
        // product issued on every path keeps the compiler from copying its accumulators
        // while it runs)
        wg_rows_keys_issue<DP, KC>(sc, Qs, Ks + ((next ? i + 1 : i) % ST) * TC, warp, lane);
        rescale_rows<DP>(acc.o, alpha);
        wg_p_v_issue<DP, KC>(acc.o, a, Vs + (i % ST) * TC, lane);
        wg_wait<1>(); // the scores of chunk i + 1
        wgmma_hold(sc);
        if (next) {
            key0 = lo + (i + 1) * KC;
            probs(sc, alpha);
        }
        wg_wait<0>(); // O += P V of chunk i: a is free again
        wgmma_hold(acc.o);
        if (TMA) // done with chunk i's stage
            mbar_arrive(&bars[ST + i % ST]);
        if (next)
#pragma unroll
            for (int j = 0; j < KC / 16; j++)
                c_to_a(a[j], sc[2 * j], sc[2 * j + 1]);
    }
    wg_wait<0>();
    cp_async_wait<0>();
    range_finish<DP>(acc, o_path, lse3, PATH, tr, row0, lane, s.d);
}

template <int DP, int WG, int PATH, int KC>
static nsa_status range_wg(nsa_context *ctx, const attn_shape &s, float *o_path, float *lse3,
                           const bf16 *q, const bf16 *K, const bf16 *V)
{
    const int ST = KC == 128 ? 3 : 4; // 224 KB and 160 KB of stages (two warpgroups)
    int tma = nsa__cuda(ctx)->use_tma;
    auto kernel = tma ? bf16_range_wg_kernel<DP, WG, PATH, KC, ST, true>
                      : bf16_range_wg_kernel<DP, WG, PATH, KC, ST, false>;
    CUtensorMap tmK{}, tmV{}; // (zeros when unused)
    int Tk = PATH == PATH_CMP ? s.Tc : s.T;
    if (tma && Tk > 0) { // (no keys: no chunk is loaded)
        NSA_TRY(nsa__cuda_tensor_map(ctx, &tmK, K, s.B, Tk, s.G, s.d, KC));
        NSA_TRY(nsa__cuda_tensor_map(ctx, &tmV, V, s.B, Tk, s.G, s.d, KC));
    }
    dim3 grid((unsigned)(((long long)s.Tq * s.hpg + WG * MB - 1) / (WG * MB)), s.G, s.B);
    size_t bytes = range_wg_smem_bytes<DP, WG, KC, ST>();
    NSA_TRY(allow_smem(ctx, kernel, bytes));
    kernel<<<grid, WG * MMA_THREADS, bytes, nsa__cuda_stream(ctx)>>>(o_path, lse3, q, K, V, tmK,
                                                                     tmV, s);
    return NSA_OK;
}

// The compressed or window path: warpgroup kernels (NSA_CUDA_BF16_WG warpgroups a block,
// NSA_CUDA_RANGE_KC keys a chunk), or with NSA_CUDA_BF16_MT=1 the warp kernel.
template <int DP, int PATH>
static nsa_status range_path(nsa_context *ctx, const attn_shape &s, float *o_path, float *lse3,
                             const bf16 *q, const bf16 *K, const bf16 *V)
{
    nsa__cuda_state *cs = nsa__cuda(ctx);
    if (cs->bf16_mt == 2) {
        int kc = PATH == PATH_CMP ? cs->range_kc[0] : cs->range_kc[1];
        auto launch = cs->range_wg == 1   ? range_wg<DP, 1, PATH, 64>
                      : cs->range_wg == 3 ? range_wg<DP, 3, PATH, 64>
                      : kc == 128         ? range_wg<DP, 2, PATH, 128>
                                          : range_wg<DP, 2, PATH, 64>;
        NSA_TRY(launch(ctx, s, o_path, lse3, q, K, V));
        if (PATH == PATH_CMP)
            NSA_CUDA_LAUNCHED("bf16_range_wg_kernel<compressed>");
        else
            NSA_CUDA_LAUNCHED("bf16_range_wg_kernel<window>");
        return NSA_OK;
    }
    size_t bytes = attn_smem_bytes<DP>();
    dim3 grid((unsigned)(((long long)s.Tq * s.hpg + MB - 1) / MB), s.G, s.B);
    NSA_TRY(allow_smem(ctx, bf16_range_kernel<DP, PATH>, bytes));
    bf16_range_kernel<DP, PATH><<<grid, MMA_THREADS, bytes, cs->stream>>>(o_path, lse3, q, K, V,
                                                                         s);
    if (PATH == PATH_CMP)
        NSA_CUDA_LAUNCHED("bf16_range_kernel<compressed>");
    else
        NSA_CUDA_LAUNCHED("bf16_range_kernel<window>");
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// cmp_attn block scores and top-n, fused: per tile of 64 rows = QT = 64 / hpg whole
// positions, S = Q Kc^T again, P = exp(S scale - lse) (fp32, the compressed path's lse),
// summed over each position's heads, then over the compressed tokens overlapping each block;
// a warp per position picks the top n. No T x blocks score tensor leaves shared memory.

// One step of a sum over lanes that halves what each lane keeps: lanes with `BIT` set keep
// a[HALF .. 2 HALF) (moved to a[0 .. HALF)), the others a[0 .. HALF), each adding its
// partner's (lane ^ BIT) copy of the half it keeps.
template <int HALF, int BIT> static __device__ __forceinline__ void halve_sum(float *a, int lane)
{
    bool up = lane & BIT;
#pragma unroll
    for (int k = 0; k < HALF; k++) {
        float send = up ? a[k] : a[k + HALF], keep = up ? a[k + HALF] : a[k];
        a[k] = keep + __shfl_xor_sync(0xffffffffu, send, BIT);
    }
}

// Q stays in registers (qreg) when a warp's 16 rows are one position's heads (H/G a multiple
// of 16): a quarter less shared memory, four blocks a SM at 64k.
static bool score_qreg(const attn_shape &s)
{
    return s.hpg % 16 == 0;
}

template <int DP> static size_t score_smem_bytes(const attn_shape &s)
{
    int QT = MB / s.hpg, slots = QT > 4 ? QT : 4;
    return (score_qreg(s) ? 2 : 3) * (size_t)NB * DP * sizeof(bf16) + SMEM_ALIGN +
           4 * sizeof(uint64_t) +
           sizeof(mrows<MB>) + ((size_t)QT * s.nb + 1) / 2 * 2 * sizeof(float) +
           4 * (size_t)s.n * sizeof(int) + (size_t)slots * NB * sizeof(float);
}

template <int DP, bool TMA, bool QREG>
__global__ void __launch_bounds__(MMA_THREADS, 4)
    bf16_score_kernel(int32_t *idx, const float *lse3, const bf16 *q, const bf16 *kc,
                      const __grid_constant__ CUtensorMap tmKc, attn_shape s)
{
    const int TE = NB * DP;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    // Q (unless in registers) and two stages of compressed keys, sw128 tiles (S = Q Kc^T by
    // wg_rows_keys[_rq]), the stages' barriers (TMA)
    bf16 *Qs = (bf16 *)smem_aligned(smem_raw), *Ks = Qs + (QREG ? 0 : TE);
    uint64_t *bars = (uint64_t *)(Ks + 2 * TE); // full, empty (wg_stream_tma)
    mrows<MB> *tr = (mrows<MB> *)(bars + 4);
    int QT = MB / s.hpg;
    float *score = (float *)(tr + 1);
    int *tmp = (int *)(score + ((size_t)QT * s.nb + 1) / 2 * 2); // ssum's float2 8-aligned
    // P of a chunk summed over slots of min(hpg, 16) rows: a warp (hpg >= 16, a position
    // spans hpg / 16 warps) or a position (hpg < 16); [slots][NB]
    float *ssum = (float *)(tmp + 4 * s.n);
    bool wide = s.hpg >= 16;
    int spp = wide ? s.hpg / 16 : 1; // slots per position
    int tile = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, c4 = lane % 4;
    if (TMA)
        mbar_init_pipe<2>(bars, MMA_THREADS);
    mrows_init<MB>(tr, s, tile, g, b);
    for (int e = threadIdx.x; e < QT * s.nb; e += MMA_THREADS)
        score[e] = 0.0f;
    __syncthreads();
    uint32_t qf[QREG ? DP / 16 : 1][4]; // (QREG) the warp's rows: one position's heads
    if constexpr (QREG) {
        if (tr->t[warp * 16] >= 0)
            global_a_frags<DP>(qf, q, (size_t)tr->row[warp * 16], s.d, lane);
        else
            for (auto &f : qf)
                f[0] = f[1] = f[2] = f[3] = 0u;
    } else {
        load_rows_sw<DP, MB>(Qs, q, tr, s.d);
        cp_async_commit();
    }
    long long last_rg = min((long long)tile * MB + MB - 1, (long long)s.Tq * s.hpg - 1);
    int nc_max = visible_cmp(s, s.q_start + (int)(last_rg / s.hpg));
    int vis[2];
    float l2[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        int r = warp * 16 + gq + 8 * i, t = tr->t[r];
        vis[i] = t < 0 ? 0 : visible_cmp(s, t);
        float l = vis[i] > 0 ? lse3[(size_t)tr->row[r] * 3 + 0] : 0.0f;
        l2[i] = l * LOG2E;
    }
    size_t stride = (size_t)s.G * s.d, base = (size_t)b * s.Tc * stride + (size_t)g * s.d;
    const float sl2 = s.scale * LOG2E;
    int tq0 = tile * QT;
    // With hpg <= 16 a warp owns 16 / hpg whole positions. Where blocks are whole strides
    // (b % r == 0, l % r == 0, TB = b / r tokens per block dividing NB), block j0 / TB + m
    // of a chunk sums the chunk's tokens m TB - ov .. m TB + TB - 1 (ov = l / r - 1 earlier
    // tokens overlap it): offsets fixed for every chunk.
    int TB = s.b / s.r, ov = s.l / s.r - 1;
    bool fast = s.hpg <= 16 && s.b % s.r == 0 && s.l % s.r == 0 && NB % TB == 0;
    int n_m = fast ? (NB - 1 + ov) / TB + 1 : 0; // blocks a chunk touches
    int p_per_warp = s.hpg <= 16 ? 16 / s.hpg : 1, p_first = warp * p_per_warp;
    // lane i < p_per_warp: the candidate blocks of the warp's position i (0 past the end)
    int tq_lane = tq0 + p_first + lane;
    int ncand_lane = fast && lane < p_per_warp && tq_lane < s.Tq
                         ? num_candidates(s, s.q_start + tq_lane) : 0;
    // The paper's blocks (b = 4 r, l = 2 r) with a warp a position (hpg = 16): a block's
    // tokens lie in three neighbouring lanes after the head sums, so two shuffles sum it.
    bool quad = fast && s.hpg == 16 && TB == 4 && ov == 1;
    int ncand_warp = __shfl_sync(0xffffffffu, ncand_lane, 0);
    auto chunk = [&](int i, const bf16 *Kt, const bf16 *) {
        int j0 = i * NB, cnt = min(NB, nc_max - j0);
        float sc[8][4];
        if constexpr (QREG)
            wg_rows_keys_rq<DP>(sc, qf, Kt, lane);
        else
            wg_rows_keys<DP>(sc, Qs, Kt, warp, lane);
        if (wide) {
            // a[2 nt + e]: token nt * 8 + 2 c4 + e summed over the thread's rows g, g + 8
            float a[16];
            if (j0 + NB <= vis[0]) { // the whole chunk visible (warp-uniform)
#pragma unroll
                for (int nt = 0; nt < 8; nt++)
#pragma unroll
                    for (int e = 0; e < 2; e++)
                        a[2 * nt + e] = ex2_approx(fmaf(sc[nt][e], sl2, -l2[0])) +
                                        ex2_approx(fmaf(sc[nt][2 + e], sl2, -l2[1]));
            } else {
#pragma unroll
                for (int nt = 0; nt < 8; nt++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        int kk = nt * 8 + 2 * c4 + e;
                        float p0 = j0 + kk < vis[0] ? ex2_approx(fmaf(sc[nt][e], sl2, -l2[0])) : 0.0f;
                        float p1 = j0 + kk < vis[1] ? ex2_approx(fmaf(sc[nt][2 + e], sl2, -l2[1])) : 0.0f;
                        a[2 * nt + e] = p0 + p1;
                    }
            }
            // sum over the 8 row groups, halving the values kept at each step (lane bit
            // 4, 3, 2 keeps n-tiles bit 2, 1, 0): 14 shuffles; lane L ends with tokens
            // 2 L, 2 L + 1 of the chunk
            halve_sum<8, 16>(a, lane);
            halve_sum<4, 8>(a, lane);
            halve_sum<2, 4>(a, lane);
            if (quad) { // block 16 i + m: tokens 4 m - 1 .. 4 m + 3 (lanes 2m - 1 .. 2m + 1)
                float x = a[0] + a[1];
                float y = x + __shfl_down_sync(0xffffffffu, x, 1);
                float z = __shfl_up_sync(0xffffffffu, a[1], 1);
                int m = lane / 2, blk = i * 16 + m;
                float *warp_score = score + (size_t)warp * s.nb;
                if ((lane & 1) == 0 && blk < ncand_warp)
                    warp_score[blk] += m > 0 ? y + z : y;
                if (lane == 31 && blk + 1 < ncand_warp) // token 63 opens block 16 i + 16
                    warp_score[blk + 1] += a[1];
                __syncwarp(); // (lane 0 adds to that block in the next chunk)
                return;
            }
            *reinterpret_cast<float2 *>(ssum + warp * NB + 2 * lane) = make_float2(a[0], a[1]);
        } else { // the hpg row groups of a position
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    int kk = nt * 8 + 2 * c4 + e;
                    float p0 = j0 + kk < vis[0] ? ex2_approx(sc[nt][e] * sl2 - l2[0]) : 0.0f;
                    float p1 = j0 + kk < vis[1] ? ex2_approx(sc[nt][2 + e] * sl2 - l2[1]) : 0.0f;
                    for (int o = 4; o < 4 * s.hpg; o <<= 1) {
                        p0 += __shfl_xor_sync(0xffffffffu, p0, o);
                        p1 += __shfl_xor_sync(0xffffffffu, p1, o);
                    }
                    if (gq % s.hpg == 0) {
                        ssum[((warp * 16 + gq) / s.hpg) * NB + kk] = p0;
                        ssum[((warp * 16 + gq + 8) / s.hpg) * NB + kk] = p1;
                    }
                }
        }
        if (fast) { // the warp's positions alone, offsets fixed
            __syncwarp();
            int blk0 = j0 / TB;
            for (int pi = 0; pi < p_per_warp; pi++) {
                int nc = __shfl_sync(0xffffffffu, ncand_lane, pi), tqi = p_first + pi;
                for (int m = lane; m < n_m && blk0 + m < nc; m += 32) {
                    int jl = max(0, m * TB - ov), jh = min(cnt - 1, m * TB + TB - 1);
                    float sum = 0.0f;
                    for (int jj = jl; jj <= jh; jj++)
                        sum += ssum[tqi * NB + jj];
                    score[(size_t)tqi * s.nb + blk0 + m] += sum;
                }
            }
            __syncwarp();
            return;
        }
        // block sums: with hpg <= 16 a warp owns whole positions and sums their blocks
        // alone; wider positions span warps and wait for each other
        int j_end = j0 + cnt - 1;
        int i_lo, i_hi;
        blocks_of_tokens(s, j0, j_end, i_lo, i_hi);
        int nblk = i_hi - i_lo + 1;
        int p_lo = 0, p_n = QT, e0 = threadIdx.x, step = MMA_THREADS;
        if (s.hpg <= 16) {
            p_lo = warp * 16 / s.hpg;
            p_n = 16 / s.hpg;
            e0 = lane;
            step = 32;
            __syncwarp();
        } else {
            __syncthreads();
        }
        for (int e = e0; e < p_n * nblk; e += step) {
            int tqi = p_lo + e / nblk, bi = i_lo + e % nblk;
            int tq = tq0 + tqi;
            if (tq >= s.Tq || bi >= num_candidates(s, s.q_start + tq))
                continue;
            int jl, jh;
            tokens_of_block(s, bi, j0, j_end, jl, jh);
            float sum = 0.0f;
            for (int sl = tqi * spp; sl < (tqi + 1) * spp; sl++)
                for (int jj = jl; jj <= jh; jj++)
                    sum += ssum[sl * NB + jj - j0];
            score[(size_t)tqi * s.nb + bi] += sum;
        }
        // the next chunk's slots are written only once every reader of these is done
        // (wide positions read other warps' slots; the key stream has no block barrier)
        if (s.hpg <= 16)
            __syncwarp();
        else
            __syncthreads();
    };
    int nch = (nc_max + NB - 1) / NB;
    if (TMA)
        wg_stream_tma<DP, 2>(
            Ks, Ks, bars, g, b, nch,
            [&](int i, const CUtensorMap *&mK, const CUtensorMap *&mV, int &key0) {
                mK = &tmKc, mV = NULL, key0 = i * NB;
            },
            chunk);
    else
        wg_stream<DP, 1>(
            Ks, Ks, stride, s.d, nch,
            [&](int i, const bf16 *&K, const bf16 *&V, size_t &bs, int &key0, int &cnt) {
                key0 = i * NB;
                cnt = min(NB, nc_max - key0);
                K = kc, V = NULL, bs = base;
            },
            chunk);
    __syncthreads();
    tile_select(score, tmp, QT, tq0, b, g, idx, s);
}

// ---------------------------------------------------------------------------------------
// Selected blocks and the gated sum. A tile of 64 rows streams the union of the blocks its
// positions chose, once for all of them; a warp skips a block none of its rows chose and
// masks rows that did not. Q stays in registers so three stages of K and V (two chunks in
// flight) fit. With H/G a multiple of 16 the warp-per-position kernel below runs instead: in
// a union tile every warp waits at each chunk's barrier for the one whose position chose it.

// The end of the selected path for the thread's row g + 8 ii (index `row`): o normalised
// (o_slc when kept), lse slot 1, and the gated sum out = g0 o_cmp + g1 o_slc + g2 o_win.
template <int DP>
__device__ __forceinline__ void slc_finish_row(size_t row, int ii, const float (&m)[2],
                                               const float (&l)[2], const float (&o)[DP / 8][4],
                                               int lane, float *out, float *o_slc, float *lse3,
                                               const float *o_cmp, const float *o_win,
                                               const float *gates, int d)
{
    int c4 = lane % 4;
    float inv = l[ii] > 0.0f ? 1.0f / l[ii] : 0.0f;
    if (lse3 && c4 == 0)
        lse3[row * 3 + 1] = l[ii] > 0.0f ? (m[ii] + log2f(l[ii])) * LN2 : -INFINITY;
    float g0 = gates[row * 3 + 0], g1 = gates[row * 3 + 1], g2 = gates[row * 3 + 2];
#pragma unroll
    for (int nt = 0; nt < DP / 8; nt++) {
        int col = nt * 8 + 2 * c4;
        if (col >= d)
            continue;
        size_t at = row * d + col;
        float2 os = make_float2(o[nt][2 * ii] * inv, o[nt][2 * ii + 1] * inv);
        if (o_slc)
            *reinterpret_cast<float2 *>(o_slc + at) = os;
        float2 oc = *reinterpret_cast<const float2 *>(o_cmp + at);
        float2 ow = *reinterpret_cast<const float2 *>(o_win + at);
        *reinterpret_cast<float2 *>(out + at) =
            make_float2(g0 * oc.x + g1 * os.x + g2 * ow.x, g0 * oc.y + g1 * os.y + g2 * ow.y);
    }
}

#define SLC_STAGES 3

template <int DP> static size_t slc_smem_bytes(const attn_shape &s)
{
    return 2 * SLC_STAGES * mcfg<DP>::TILE + sizeof(mrows<MB>) +
           (2 * (size_t)tile_positions(MB, s.hpg) * s.n + 1) * sizeof(int) +
           (size_t)((s.nb + 31) / 32) * sizeof(unsigned);
}

template <int DP>
__global__ void __launch_bounds__(MMA_THREADS, 2)
    bf16_slc_kernel(float *out, float *o_slc, float *lse3, const float *o_cmp, const float *o_win,
                    const bf16 *q, const bf16 *k, const bf16 *v, const float *gates,
                    const int32_t *idx, attn_shape s)
{
    const int LD = mcfg<DP>::LD;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *Ks = (bf16 *)smem_raw, *Vs = Ks + SLC_STAGES * NB * LD;
    mrows<MB> *tr = (mrows<MB> *)(Vs + SLC_STAGES * NB * LD);
    int *sidx = (int *)(tr + 1);
    int *ulist = sidx + tile_positions(MB, s.hpg) * s.n;
    int *nunion = ulist + tile_positions(MB, s.hpg) * s.n;
    unsigned *bitmap = (unsigned *)(nunion + 1);
    int tile = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4;
    mrows_init<MB>(tr, s, tile, g, b);
    __syncthreads();
    load_row_tile<DP, MB>(Ks, q, tr, s.d); // Q through the first K stage into registers
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    uint32_t qf[DP / 16][4];
    load_a_frags<DP>(qf, Ks, warp, lane);
    long long first_rg = (long long)tile * MB;
    long long last_rg = min(first_rg + MB - 1, (long long)s.Tq * s.hpg - 1);
    int t_first = s.q_start + (int)(first_rg / s.hpg), t_last = s.q_start + (int)(last_rg / s.hpg);
    int trow[2], pl[2];
    bool member[2] = {false, false};
#pragma unroll
    for (int i = 0; i < 2; i++) {
        trow[i] = tr->t[warp * 16 + gq + 8 * i];
        pl[i] = trow[i] < 0 ? -1 : trow[i] - t_first;
    }
    size_t stride = (size_t)s.G * s.d, base = (size_t)b * s.T * stride + (size_t)g * s.d;
    const float sl2 = s.scale * LOG2E;
    build_union(sidx, ulist, nunion, bitmap, idx, s, b, g, t_first, t_last); // syncs first
    int subs = (s.b + NB - 1) / NB;
    bool active = false;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, o[DP / 8][4];
    frag_zero(o);
    stream_chunks<DP, SLC_STAGES>(
        Ks, Vs, k, v, base, stride, s.d, *nunion * subs,
        [&](int i, int &key0, int &cnt) {
            int u = ulist[i / subs];
            key0 = u * s.b + (i % subs) * NB;
            cnt = max(0, min(NB, min(u * s.b + s.b, t_last + 1) - key0));
        },
        [&](int i, int key0, int cnt, const bf16 *Kt, const bf16 *Vt) {
            if (i % subs == 0) { // which of the thread's rows chose this block
                int u = ulist[i / subs];
#pragma unroll
                for (int ii = 0; ii < 2; ii++)
                    member[ii] = pl[ii] >= 0 && holds(sidx + pl[ii] * s.n, s.n, u);
                active = __any_sync(0xffffffffu, member[0] || member[1]);
            }
            if (active)
                fwd_step_rq<DP>(m, l, o, qf, Kt, Vt, sl2, lane, [&](int ii, int kk) {
                    return member[ii] && kk < cnt && key0 + kk <= trow[ii];
                });
        });
    cp_async_wait<0>();
#pragma unroll
    for (int ii = 0; ii < 2; ii++) {
        int r = warp * 16 + gq + 8 * ii;
        if (tr->t[r] < 0)
            continue;
        slc_finish_row<DP>((size_t)tr->row[r], ii, m, l, o, lane, out, o_slc, lse3, o_cmp, o_win,
                           gates, s.d);
    }
}

// ---------------------------------------------------------------------------------------
// Selected blocks when H/G is a multiple of 16: a warp per (position, 16 query heads) streams
// that position's own blocks, KEYS keys at a time, through its own shared-memory stages, with
// no barrier across warps. The union tile above makes a whole block wait on the one warp
// whose position chose the chunk in flight; here every warp always works (each block is
// loaded once per 16 heads, the paper's kernel). With the paper's fixed selection the blocks
// every position of the thread block holds (block 0, the two most recent) are first loaded
// once for all its W warps (cta_stream_common), a barrier a chunk; each warp then streams
// the rest of its selection alone.
//
// FIXED (1: bf16 partials; with the paper's fixed selection, training shapes): the fixed
// blocks alone (loaded once a thread block whatever NSA_CUDA_SLC_SHARE says), whose
// attention goes as one partial (o normalised, lse) into slot n of the ns slots of part /
// part_lse ([B, T, G, ns, hpg, d]); idx NULL: the selection is being computed (it holds
// every fixed block), so this runs before it. The key-centric kernel
// (attention_bf16_slc_kc.cu) writes the other slots and the combine forms the path.

template <int DP, int KEYS, int ST, int W, int MINB, int FIXED = 0>
__global__ void __launch_bounds__(32 * W, MINB)
    bf16_slc_warp_kernel(float *out, float *o_slc, float *lse3, const float *o_cmp,
                         const float *o_win, const bf16 *q, const bf16 *k, const bf16 *v,
                         const float *gates, const int32_t *idx, int share, attn_shape s,
                         void *part, float *part_lse, int ns)
{
    const int LD = mcfg<DP>::LD;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4;
    bf16 *pool = (bf16 *)smem_raw;
    int *own = (int *)(pool + (size_t)W * 2 * ST * KEYS * LD) + warp * s.n;
    warp_unit u;
    bool valid = warp_unit_of<W>(u, s, warp);
    cta_common cc = cta_common_of<W>(s, (share || FIXED) && s.fixed);
    if (!valid && cc.n_blocks == 0)
        return; // no barrier below spans warps
    int g = blockIdx.y, b = blockIdx.z;
    uint32_t qf[DP / 16][4];
    const int32_t *sel = NULL;
    if (valid) {
        global_a_frags<DP>(qf, q, u.row0, s.d, lane);
        // (FIXED with idx NULL: a selection still being computed, which holds every fixed
        // block: not read)
        if (!FIXED || idx)
            sel = idx + (((size_t)b * s.Tq + u.tq) * s.G + g) * s.n;
    }
    size_t stride = (size_t)s.G * s.d, base = (size_t)b * s.T * stride + (size_t)g * s.d;
    const float sl2 = s.scale * LOG2E;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, o[DP / 8][4];
    frag_zero(o);
    auto step = [&](const bf16 *Kt, const bf16 *Vt, int cnt) {
        fwd_step_rq<DP, KEYS>(m, l, o, qf, Kt, Vt, sl2, lane,
                              [&](int, int kk) { return kk < cnt; });
    };
    if (!warp_stream_selection<DP, KEYS, ST, W, FIXED != 0>(pool, own, k, v, base, stride, s,
                                                             cc, sel, valid, u.t, warp, lane,
                                                             step))
        return;
    if constexpr (FIXED != 0) { // the partial of rows row0 + gq (+ 8) at slot n
        size_t prow = (((size_t)b * s.T + u.t) * s.G + g) * ns + s.n;
        prow = prow * s.hpg + (u.row0 % s.H - (size_t)g * s.hpg) + gq;
#pragma unroll
        for (int ii = 0; ii < 2; ii++)
            store_partial_row<DP>((bf16 *)part + (prow + 8 * ii) * s.d, part_lse + prow + 8 * ii,
                                  ii, m, l, o, lane, s.d);
    } else {
#pragma unroll
        for (int ii = 0; ii < 2; ii++)
            slc_finish_row<DP>(u.row0 + gq + 8 * ii, ii, m, l, o, lane, out, o_slc, lse3, o_cmp,
                               o_win, gates, s.d);
    }
}

// (FIXED: the fixed blocks' bf16 partials into part, part_lse, which have ns slots; out ..
// gates unused)
template <int DP, int KEYS, int ST, int W, int MINB, int FIXED = 0>
static nsa_status slc_warp(nsa_context *ctx, const attn_shape &s, float *out, float *o_slc,
                           float *lse3, const float *o_cmp, const float *o_win, const bf16 *q,
                           const bf16 *k, const bf16 *v, const float *gates, const int32_t *idx,
                           void *part = NULL, float *part_lse = NULL, int ns = 0)
{
    auto kernel = bf16_slc_warp_kernel<DP, KEYS, ST, W, MINB, FIXED>;
    size_t wbytes = slcw_smem_bytes<DP, KEYS, ST, W>(s.n);
    long long units = (long long)s.Tq * (s.hpg / 16);
    NSA_TRY(slcw_prepare(ctx, kernel, wbytes));
    dim3 wgrid((unsigned)((units + W - 1) / W), s.G, s.B);
    kernel<<<wgrid, 32 * W, wbytes, nsa__cuda_stream(ctx)>>>(
        out, o_slc, lse3, o_cmp, o_win, q, k, v, gates, idx, nsa__cuda(ctx)->bf16_slc_share, s,
        part, part_lse, ns);
    NSA_CUDA_LAUNCHED("bf16_slc_warp_kernel");
    return NSA_OK;
}

nsa_status nsa__cuda_slc_fixed_partials(nsa_context *ctx, const attn_shape &s, void *part,
                                        float *part_lse, int ns, const bf16 *q, const bf16 *k,
                                        const bf16 *v, const int32_t *idx)
{
    if (s.hpg % 16 != 0 || !s.fixed || s.Tq != s.T || ns != s.n + 1)
        return nsa__error(NSA_ERR_UNSUPPORTED, "cuda bf16 fixed-block partials: H/G = %d, fixed "
                                               "selection %d, %d of %d positions: not covered",
                          s.hpg, s.fixed, s.Tq, s.T);
    switch (nsa__cuda(ctx)->bf16_slcw[0]) {
#define SLCW_CASE(id, keys, st, w, minb)                                                     \
    case id:                                                                                 \
        return s.d <= 64 ? slc_warp<64, keys, st, w, minb, 1>(ctx, s, NULL, NULL, NULL, NULL, \
                                                              NULL, q, k, v, NULL, idx, part, \
                                                              part_lse, ns)                   \
                         : slc_warp<128, keys, st, w, minb, 1>(ctx, s, NULL, NULL, NULL,      \
                                                               NULL, NULL, q, k, v, NULL,     \
                                                               idx, part, part_lse, ns);
        SLCW_CONFIGS(SLCW_CASE)
#undef SLCW_CASE
    }
    return nsa__error(NSA_ERR_INVALID, "cuda bf16: selected-kernel chunking %d unknown",
                      nsa__cuda(ctx)->bf16_slcw[0]);
}

// ---------------------------------------------------------------------------------------
// The op

template <int DP> static int score_fits(nsa_context *ctx, const attn_shape &s)
{
    return MB % s.hpg == 0 && score_smem_bytes<DP>(s) <= nsa__cuda(ctx)->max_smem_optin;
}

template <int DP>
static nsa_status bf16_forward_dp(nsa_context *ctx, const attn_shape &s, int phase, int fused,
                                  float *out, float *o_cmp, float *o_slc, float *o_win,
                                  float *lse3, int32_t *idx, const bf16 *q, const bf16 *k,
                                  const bf16 *v, const bf16 *kc, const bf16 *vc,
                                  const float *gates, void *kv_scratch, int kc_mode)
{
    cudaStream_t st = nsa__cuda_stream(ctx);
    if (phase == 0) {
        NSA_TRY((range_path<DP, PATH_CMP>(ctx, s, o_cmp, lse3, q, kc, vc)));
        if (fused) {
            int tma = nsa__cuda(ctx)->use_tma && s.Tc > 0;
            bool qreg = score_qreg(s);
            auto kernel = tma ? (qreg ? bf16_score_kernel<DP, true, true>
                                      : bf16_score_kernel<DP, true, false>)
                              : (qreg ? bf16_score_kernel<DP, false, true>
                                      : bf16_score_kernel<DP, false, false>);
            CUtensorMap tm{}; // (zeros when unused)
            if (tma)
                NSA_TRY(nsa__cuda_tensor_map(ctx, &tm, kc, s.B, s.Tc, s.G, s.d, NB));
            size_t sbytes = score_smem_bytes<DP>(s);
            NSA_TRY(allow_smem(ctx, kernel, sbytes));
            dim3 sgrid((unsigned)(((long long)s.Tq * s.hpg + MB - 1) / MB), s.G, s.B);
            kernel<<<sgrid, MMA_THREADS, sbytes, st>>>(idx, lse3, q, kc, tm, s);
            NSA_CUDA_LAUNCHED("bf16_score_kernel");
        }
    } else if (phase == 2) { // the window path
        return range_path<DP, PATH_WIN>(ctx, s, o_win, lse3, q, k, v);
    } else { // phase 3: the selected path and the gated sum (after the others)
        int *kind = &nsa__cuda(ctx)->slc_kind[0];
        if (s.hpg % 16 == 0 && !nsa__cuda(ctx)->bf16_slc_union) {
            if (kv_scratch) { // (NSA_CUDA_SLC_KC: key blocks outside)
                return nsa__cuda_slc_kc_forward(ctx, s, kc_mode, kv_scratch, out,
                                                o_slc, lse3, o_cmp, o_win, q, k, v, gates, idx);
            }
            *kind = NSA_SLC_WARP + nsa__cuda(ctx)->bf16_slcw[0];
            switch (nsa__cuda(ctx)->bf16_slcw[0]) {
#define SLCW_CASE(id, keys, st, w, minb)                                                     \
    case id:                                                                                 \
        return slc_warp<DP, keys, st, w, minb>(ctx, s, out, o_slc, lse3, o_cmp, o_win, q, k,  \
                                               v, gates, idx);
                SLCW_CONFIGS(SLCW_CASE)
#undef SLCW_CASE
            }
        }
        *kind = kv_scratch ? NSA_SLC_KV : NSA_SLC_UNION;
        if (kv_scratch)
            return nsa__cuda_slc_kv_forward(ctx, s, kv_scratch, out, o_slc, lse3, o_cmp, o_win,
                                            q, k, v, gates, idx);
        size_t sbytes = slc_smem_bytes<DP>(s);
        dim3 sgrid((unsigned)(((long long)s.Tq * s.hpg + MB - 1) / MB), s.G, s.B);
        NSA_TRY(allow_smem(ctx, bf16_slc_kernel<DP>, sbytes));
        bf16_slc_kernel<DP><<<sgrid, MMA_THREADS, sbytes, st>>>(out, o_slc, lse3, o_cmp, o_win, q,
                                                                k, v, gates, idx, s);
        NSA_CUDA_LAUNCHED("bf16_slc_kernel");
    }
    return NSA_OK;
}

// Dispatch on the head dim (64 or 128 padded).
static nsa_status bf16_forward_phase(nsa_context *ctx, const attn_shape &s, int phase, int fused,
                                     float *out, float *o_cmp, float *o_slc, float *o_win,
                                     float *lse3, int32_t *idx, const bf16 *q, const bf16 *k,
                                     const bf16 *v, const bf16 *kc, const bf16 *vc,
                                     const float *gates, void *kv, int kc_mode = 0)
{
    auto run = s.d <= 64 ? bf16_forward_dp<64> : bf16_forward_dp<128>;
    return run(ctx, s, phase, fused, out, o_cmp, o_slc, o_win, lse3, idx, q, k, v, kc, vc, gates,
               kv, kc_mode);
}

nsa_status nsa__cuda_attn_forward_bf16(nsa_context *ctx, const nsa__attn_dims *dims,
                                       const uint16_t *q16, const uint16_t *k16,
                                       const uint16_t *v16, const uint16_t *kc16,
                                       const uint16_t *vc16, const float *gates,
                                       const int32_t *given_idx, int32_t *idx, float *out,
                                       float *o_paths, float *lse)
{
    const bf16 *q = (const bf16 *)q16, *k = (const bf16 *)k16, *v = (const bf16 *)v16;
    const bf16 *kc = (const bf16 *)kc16, *vc = (const bf16 *)vc16;
    attn_shape s = shape_of(dims);
    if (s.Tq <= 0 || s.B <= 0)
        return NSA_OK;
    const void *ptrs[] = {q, k, v, kc, vc, out, o_paths};
    if (!bf16_supported(s, ptrs, 7))
        return nsa__error(NSA_ERR_UNSUPPORTED,
                          "cuda bf16 attention: head_dim = %d: needs a multiple of 8 up to 128 "
                          "and 16-byte aligned buffers",
                          s.d);
    nsa__cuda_state *cs = nsa__cuda(ctx);
    cudaStream_t st = cs->stream;
    int score = given_idx == NULL;
    int mean_key = score && dims->select_score == NSA_SELECT_MEAN_KEY;
    int fused = score && !mean_key && (s.d <= 64 ? score_fits<64>(ctx, s) : score_fits<128>(ctx, s));

    // scratch: o_cmp, o_win and lse when the caller keeps none; fp32 copies of the inputs
    // the unfused selection reads (q and kc, or q and k with the block key sums)
    size_t rows = (size_t)s.B * s.Tq * s.H;
    size_t n_ocmp = o_paths ? 0 : 2 * rows * s.d, n_lse = lse ? 0 : rows * 3;
    size_t n_sel = 0, n_keys = 0;
    if (score && !fused) {
        n_keys = mean_key ? (size_t)s.B * s.T * s.G * s.d : (size_t)s.B * s.Tc * s.G * s.d;
        n_sel = rows * s.d + n_keys + (mean_key ? n_keys : 0);
    }
    // small groups (H/G not a multiple of 16) over whole sequences: the selected path with key
    // blocks outside (attention_bf16_slc_kv.cu) when its partials fit in half the free
    // device memory; otherwise (and with NSA_CUDA_BF16_SLC=union) union tiles
    size_t kv_bytes = 0;
    int kc_mode = 0; // (NSA_CUDA_SLC_KC where it runs)
    if (s.hpg % 16 != 0 && s.Tq == s.T && s.q_start == 0 && !cs->bf16_slc_union)
        kv_bytes = bytes_if_half_free(nsa__cuda_slc_kv_scratch_bytes(s));
    // H/G 16, 32 or 64 with NSA_CUDA_SLC_KC (sm_90a, TMA): key blocks outside as well
    // (attention_bf16_slc_kc.cu), under the same conditions and where a block is one key
    // tile (a 64-row tile then holds whole positions); by default a warp a position
    int want = slc_kc_mode(cs, s);
    if (want && !cs->bf16_slc_union && slc_kc_covers(cs, s))
        kv_bytes = bytes_if_half_free(nsa__cuda_slc_kc_scratch_bytes(s, want, cs->kc_chunk));
    if (s.hpg % 16 == 0 && kv_bytes)
        kc_mode = want;
    size_t main_bytes = (n_ocmp + n_lse + n_sel) * sizeof(float);
    main_bytes = nsa__align256(main_bytes);
    float *scratch = NULL;
    void *kv_scratch = NULL;
    if (main_bytes + kv_bytes) {
        void *mem;
        NSA_TRY(nsa__cuda_scratch(ctx, main_bytes + kv_bytes, &mem));
        scratch = (float *)mem;
        kv_scratch = kv_bytes ? (char *)mem + main_bytes : NULL;
    }
    float *o_cmp = o_paths ? o_paths : scratch;
    float *lse3 = lse ? lse : scratch + n_ocmp;
    float *o_slc = o_paths ? o_paths + rows * s.d : NULL;
    float *o_win = o_paths ? o_paths + 2 * rows * s.d : scratch + rows * s.d;

    // the window path on a second stream beside the compressed path and the selection (its
    // blocks fill the others' last waves), and with NSA_CUDA_SLC_KC=4 the fixed blocks, which
    // need no scores; the selected path, which reads all of them, after them
    float *lse_out = lse ? lse3 : NULL;
    auto window = [&]() -> nsa_status {
        NSA_TRY(bf16_forward_phase(ctx, s, 2, fused, out, o_cmp, o_slc, o_win, lse_out, idx, q,
                                   k, v, kc, vc, gates, NULL));
        return kc_mode ? nsa__cuda_slc_kc_fixed(ctx, s, kc_mode, kv_scratch, q, k, v, given_idx)
                       : NSA_OK;
    };
    auto compressed_and_selection = [&]() -> nsa_status {
        NSA_TRY(bf16_forward_phase(ctx, s, 0, fused, out, o_cmp, o_slc, o_win, lse3, idx, q, k,
                                   v, kc, vc, gates, NULL));
        size_t n_idx = rows / s.H * s.G * s.n;
        if (!score) {
            NSA_CUDA_TRY(cudaMemcpyAsync(idx, given_idx, n_idx * sizeof(int32_t),
                                         cudaMemcpyDeviceToDevice, st));
        } else if (!fused) {
            float *qf = scratch + n_ocmp + n_lse, *keys = qf + rows * s.d, *kcum = keys + n_keys;
            NSA_TRY(nsa__cuda_bf16_to_f32(ctx, qf, q, rows * s.d));
            NSA_TRY(nsa__cuda_bf16_to_f32(ctx, keys, mean_key ? k : kc, n_keys));
            NSA_TRY(nsa__cuda_attn_select(ctx, s, mean_key, idx, qf, keys, keys, lse3, kcum));
        }
        return NSA_OK;
    };
    NSA_TRY(nsa__cuda_beside(cs, window, compressed_and_selection));
    return bf16_forward_phase(ctx, s, 3, fused, out, o_cmp, o_slc, o_win, lse_out, idx, q, k, v,
                              kc, vc, gates, kv_scratch, kc_mode);
}
