/*
 * attention_bf16_slc_kv.cu — the selected path of the bf16 forward for small GQA groups
 * (H/G not a multiple of 16): key blocks outside, queries inside (the loop order of Flash
 * Sparse Attention). A tile of 64 query rows from one position holds at most H/G rows, so
 * the query-centric kernels either waste most of each MMA (a position's own blocks) or
 * stream the union of many positions' blocks; here a thread block takes one selected block
 * and up to KV_SPLIT_ROWS rows of the positions that chose it (the inverted selection index
 * the backward builds, nsa__cuda_sel_lists), gathers their queries into full 64-row tiles
 * and writes one partial result per (row, block): o normalised within the block and its lse.
 * A combine pass merges each row's n partials by their lse and forms the gated sum. For
 * H/G <= 4 the backward's dq of the path runs in the same order (the key gradients already
 * do: the dk/dv kernel walks the same index), each (row, block) writing its own dq partial,
 * summed after; at H/G = 8 union tiles measured faster.
 *
 *   bf16_slc_kv_kernel:         partials part_o [rows, n, d], part_lse [rows, n] (slot = the
 *                               block's place in the row's selection)
 *   bf16_slc_combine_kernel:    o_slc, lse slot 1, out = g0 o_cmp + g1 o_slc + g2 o_win
 *   bf16_bwd_dq_slc_kv_kernel:  dq partials [rows, n, d] from the forward's lse (slot 1)
 *   bf16_dq_slc_add_kernel:     dq += the sum of each row's partials (fp32; bf16 from the
 *                               selected dk/dv kernel for H/G a multiple of 16)
 */
#include "cuda/attention_bf16.cuh"

#define KV_SPLIT_ROWS 256 // query rows per work item (four tiles of MB rows)

// Rows rg0 .. rg0 + MB - 1 of work item w (the block w.key0 / b and the positions that chose
// it) into tr (position, row index; t = -1 past the item) and slot_s (the block's slot in
// the row's selection). Begins and ends with a barrier.
static __device__ void kv_tile_rows(mrows<MB> *tr, int *slot_s, const dkv_work &w, long long rg0,
                                    const attn_shape &s, const int32_t *idx)
{
    int blk = w.key0 / s.b;
    __syncthreads(); // the previous tile's rows are read
    for (int r = threadIdx.x; r < MB; r += blockDim.x) {
        long long rg = rg0 + r;
        int t = -1, slot = 0;
        long long row = 0;
        if (rg < w.rg_end) {
            int qi = (int)(rg / s.hpg), hh = (int)(rg % s.hpg);
            t = w.list[qi];
            row = ((long long)w.b * s.T + t) * s.H + (long long)w.g * s.hpg + hh;
            const int32_t *sel = idx + (((size_t)w.b * s.T + t) * s.G + w.g) * s.n;
            for (int i = 0; i < s.n; i++)
                if (sel[i] == blk)
                    slot = i;
        }
        tr->t[r] = t;
        tr->row[r] = row;
        slot_s[r] = slot;
    }
    __syncthreads();
}

// The block of work item w, NB keys at a time through the stages Ks, Vs: step(Kt, Vt, ok)
// with ok(ii, kk) = key kk of the chunk exists and row g + 8 ii (position trow[ii]) sees it.
template <int DP, class Step>
__device__ __forceinline__ void kv_block_chunks(bf16 *Ks, bf16 *Vs, const bf16 *k, const bf16 *v,
                                                const dkv_work &w, const attn_shape &s,
                                                const int (&trow)[2], Step step)
{
    size_t stride = (size_t)s.G * s.d, base = (size_t)w.b * s.T * stride + (size_t)w.g * s.d;
    stream_chunks<DP>(
        Ks, Vs, k, v, base, stride, s.d, (w.key_end - w.key0 + NB - 1) / NB,
        [&](int i, int &key0, int &cnt) {
            key0 = w.key0 + i * NB;
            cnt = min(NB, w.key_end - key0);
        },
        [&](int, int key0, int cnt, const bf16 *Kt, const bf16 *Vt) {
            step(Kt, Vt, [&](int ii, int kk) { return kk < cnt && key0 + kk <= trow[ii]; });
        });
}

// Shared memory of the key-block kernels: row_tiles gathered row tiles (q; dq: q and dO),
// two stages of K and of V, the tile's rows and slots.
template <int DP> static size_t kv_smem_bytes(int row_tiles)
{
    return (size_t)row_tiles * MB * mcfg<DP>::LD * sizeof(bf16) + 4 * mcfg<DP>::TILE +
           sizeof(mrows<MB>) + MB * sizeof(int);
}

template <int DP>
__global__ void __launch_bounds__(MMA_THREADS, 2)
    bf16_slc_kv_kernel(float *part_o, float *part_lse, const bf16 *q, const bf16 *k,
                       const bf16 *v, const int32_t *idx, const int *list_offsets,
                       const int *lists, const int *item_start, int split_pos, attn_shape s)
{
    const int LD = mcfg<DP>::LD;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *Qs = (bf16 *)smem_raw, *Ks = Qs + MB * LD, *Vs = Ks + 2 * NB * LD;
    mrows<MB> *tr = (mrows<MB> *)(Vs + 2 * NB * LD);
    int *slot_s = (int *)(tr + 1);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4;

    // the block (whole: tk = b) and the positions of this work item
    dkv_work w;
    if (!dkv_work_of<PATH_SLC>(w, s, s.b, list_offsets, lists, item_start, split_pos))
        return;
    const float sl2 = s.scale * LOG2E;

    for (long long rg0 = w.rg_begin; rg0 < w.rg_end; rg0 += MB) {
        kv_tile_rows(tr, slot_s, w, rg0, s, idx);
        load_row_tile<DP, MB>(Qs, q, tr, s.d);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        uint32_t qf[DP / 16][4];
        load_a_frags<DP>(qf, Qs, warp, lane);
        int trow[2];
#pragma unroll
        for (int i = 0; i < 2; i++)
            trow[i] = tr->t[warp * 16 + gq + 8 * i];
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, o[DP / 8][4];
        frag_zero(o);
        kv_block_chunks<DP>(Ks, Vs, k, v, w, s, trow, [&](const bf16 *Kt, const bf16 *Vt, auto ok) {
            fwd_step_rq<DP>(m, l, o, qf, Kt, Vt, sl2, lane, ok);
        });
        // the block's partial of each row: o / l and lse (natural log; -inf without keys)
#pragma unroll
        for (int ii = 0; ii < 2; ii++) {
            int r = warp * 16 + gq + 8 * ii;
            if (trow[ii] < 0)
                continue;
            size_t at = (size_t)tr->row[r] * s.n + slot_s[r];
            store_partial_row<DP>(part_o + at * s.d, part_lse + at, ii, m, l, o, lane, s.d);
        }
    }
}

// One warp per row: slc_combine_row (attention_bf16.cuh); bf16 partials (layouts 1 and 2,
// key blocks outside for H/G a multiple of 16): two rows a warp, slc_merge_row_pair.
// (a warp a row: three blocks a SM, 80 registers, no spills, 24 warps with eight loads each
// in flight; two rows a warp: two blocks a SM, sixteen 16-byte loads a lane in flight)
template <class P, int LAYOUT>
__global__ void __launch_bounds__(256, sizeof(P) == sizeof(bf16) ? 2 : 3)
    bf16_slc_combine_kernel(slc_sum_io io, const P *part_o, const float *part_lse,
                            const int32_t *idx, attn_shape s)
{
    int lane = threadIdx.x % 32;
    size_t rows = (size_t)s.B * s.T * s.H, nwarps = (size_t)gridDim.x * blockDim.x / 32;
    size_t warp_id = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32;
    if constexpr (sizeof(P) == sizeof(bf16)) {
        for (size_t r0 = 2 * warp_id; r0 < rows; r0 += 2 * nwarps)
            slc_merge_row_pair<LAYOUT, true>(r0, rows, [](size_t r) { return r; }, lane, io,
                                             (const bf16 *)part_o, part_lse, idx, s);
    } else {
        for (size_t row = warp_id; row < rows; row += nwarps)
            slc_combine_row<P, LAYOUT, false>(row, lane, io, part_o, part_lse, idx, s);
    }
}

nsa_status nsa__cuda_slc_combine(nsa_context *ctx, const attn_shape &s, float *out,
                                 float *o_slc, float *lse3, const float *o_cmp,
                                 const float *o_win, const float *gates, const void *part_o,
                                 int fp32, int layout, const float *part_lse,
                                 const int32_t *idx)
{
    size_t rows = (size_t)s.B * s.T * s.H;
    // (a warp a row; bf16: a warp two rows)
    unsigned blocks = nsa__cuda_blocks((fp32 ? rows : (rows + 1) / 2) * 32, 256);
    cudaStream_t st = nsa__cuda_stream(ctx);
    slc_sum_io io = {out, o_slc, lse3, o_cmp, o_win, gates};
#define COMBINE(P, LAYOUT)                                                                    \
    bf16_slc_combine_kernel<P, LAYOUT>                                                        \
        <<<blocks, 256, 0, st>>>(io, (const P *)part_o, part_lse, idx, s)
    if (fp32 ? layout == 2 : layout == 0) // (the forms in use: fp32 0 and 1, bf16 1 and 2)
        return nsa__error(NSA_ERR_UNSUPPORTED, "cuda bf16 combine: %s partials in layout %d",
                          fp32 ? "fp32" : "bf16", layout);
    if (fp32 && layout == 0)
        COMBINE(float, 0);
    else if (fp32)
        COMBINE(float, 1);
    else if (layout == 2)
        COMBINE(bf16, 2);
    else
        COMBINE(bf16, 1);
#undef COMBINE
    NSA_CUDA_LAUNCHED("bf16_slc_combine_kernel");
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// Backward: dq of the selected path, key blocks outside

template <int DP>
__global__ void __launch_bounds__(MMA_THREADS, 2)
    bf16_bwd_dq_slc_kv_kernel(float *part_dq, const bf16 *q, const bf16 *k, const bf16 *v,
                              const bf16 *dO16, const float *gates, const float *lse3,
                              const float *Dp, const int32_t *idx, const int *list_offsets,
                              const int *lists, const int *item_start, int split_pos,
                              attn_shape s)
{
    const int LD = mcfg<DP>::LD;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *Qs = (bf16 *)smem_raw, *Os = Qs + MB * LD, *Ks = Os + MB * LD, *Vs = Ks + 2 * NB * LD;
    mrows<MB> *tr = (mrows<MB> *)(Vs + 2 * NB * LD);
    int *slot_s = (int *)(tr + 1);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4;
    dkv_work w;
    if (!dkv_work_of<PATH_SLC>(w, s, s.b, list_offsets, lists, item_start, split_pos))
        return;
    const float sl2 = s.scale * LOG2E;

    for (long long rg0 = w.rg_begin; rg0 < w.rg_end; rg0 += MB) {
        kv_tile_rows(tr, slot_s, w, rg0, s, idx);
        load_row_tile<DP, MB>(Qs, q, tr, s.d);
        load_row_tile<DP, MB>(Os, dO16, tr, s.d);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        uint32_t qf[DP / 16][4], of[DP / 16][4];
        load_a_frags<DP>(qf, Qs, warp, lane);
        load_a_frags<DP>(of, Os, warp, lane);
        int trow[2];
        path_rows pr;
#pragma unroll
        for (int i = 0; i < 2; i++) {
            int r = warp * 16 + gq + 8 * i;
            trow[i] = tr->t[r];
            pr.set(i, trow[i] >= 0, (size_t)tr->row[r], PATH_SLC, lse3, gates, Dp);
        }
        float acc[DP / 8][4];
        frag_zero(acc);
        kv_block_chunks<DP>(Ks, Vs, k, v, w, s, trow, [&](const bf16 *Kt, const bf16 *Vt, auto ok) {
            dq_step<DP>(acc, qf, of, Kt, Vt, pr, sl2, lane, ok);
        });
#pragma unroll
        for (int ii = 0; ii < 2; ii++) {
            int r = warp * 16 + gq + 8 * ii;
            if (trow[ii] < 0)
                continue;
            store_frag_row<DP>(part_dq + ((size_t)tr->row[r] * s.n + slot_s[r]) * s.d, acc, ii,
                               s.scale, lane, s.d);
        }
    }
}

// One warp per row: dq += the row's partials over its used slots (4 columns a lane), in slot
// order. P: float (this file's kernel) or bf16 (the selected dk/dv kernel's, H/G a multiple
// of 16). With lse3, rows whose selected path saw no key (lse -inf: the dk/dv kernel skips
// them, writing no partial) are left as they are.
template <class P>
static __device__ __forceinline__ void dq_add_row(float *dq, const P *part_dq, const int32_t *idx,
                                                  const float *lse3, const attn_shape &s,
                                                  size_t row, int lane)
{
    int h = (int)(row % s.H);
    const int32_t *sel = idx + ((row / s.H) * s.G + h / s.hpg) * s.n;
    if (lse3 && lse3[row * 3 + 1] == -INFINITY)
        return;
    for (int c = 4 * lane; c < s.d; c += 128) {
        float4 acc = *reinterpret_cast<const float4 *>(dq + row * s.d + c);
        // eight slots' loads in flight at a time, then their sum in slot order
        for (int i0 = 0; i0 < s.n; i0 += 8) {
            bool use[8];
            float4 x[8];
#pragma unroll
            for (int u = 0; u < 8; u++) {
                int i = i0 + u;
                use[u] = i < s.n && sel[i] >= 0;
                x[u] = use[u] ? part4<false>(part_dq + (row * s.n + i) * s.d + c)
                              : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            }
#pragma unroll
            for (int u = 0; u < 8; u++)
                if (use[u]) {
                    acc.x += x[u].x;
                    acc.y += x[u].y;
                    acc.z += x[u].z;
                    acc.w += x[u].w;
                }
        }
        *reinterpret_cast<float4 *>(dq + row * s.d + c) = acc;
    }
}

// The same for bf16 partials, two rows a warp: half a warp a row, 8 columns a lane (d <=
// 128), the row's lse and selection, then dq and every used slot's partial (n <= 16) loaded
// at once: two round trips a row where dq_add_row makes four. False (all lanes; nothing
// written) where n or d is too large.
static __device__ __forceinline__ bool dq_add_row_half(float *dq, const bf16 *part_dq,
                                                       const int32_t *idx, const float *lse3,
                                                       const attn_shape &s, size_t row,
                                                       bool active, int lane)
{
    if (s.n > 16 || s.d > 128)
        return false;
    const int hl = lane & 15, hbase = lane & 16;
    int h = (int)(row % s.H);
    const int32_t *sel = idx + ((row / s.H) * s.G + h / s.hpg) * s.n;
    int blk = active && hl < s.n ? sel[hl] : -1;
    if (active && lse3 && lse3[row * 3 + 1] == -INFINITY) // (no partial written)
        active = false, blk = -1;
    unsigned used = __ballot_sync(0xffffffffu, blk >= 0) >> hbase & 0xffffu;
    int c = 8 * hl;
    bool on = active && c < s.d;
    size_t at = row * s.d + c;
    uint4 x[16];
#pragma unroll
    for (int u = 0; u < 16; u++)
        x[u] = on && (used >> u & 1u)
                   ? __ldcg(reinterpret_cast<const uint4 *>(part_dq + (row * s.n + u) * s.d + c))
                   : make_uint4(0u, 0u, 0u, 0u);
    if (!on)
        return true;
    float acc[8];
    *reinterpret_cast<float4 *>(acc) = *reinterpret_cast<const float4 *>(dq + at);
    *reinterpret_cast<float4 *>(acc + 4) = *reinterpret_cast<const float4 *>(dq + at + 4);
#pragma unroll
    for (int u = 0; u < 16; u++) // in slot order
        if (used >> u & 1u)
            add_bf16x8(acc, x[u], 1.0f);
    *reinterpret_cast<float4 *>(dq + at) = *reinterpret_cast<const float4 *>(acc);
    *reinterpret_cast<float4 *>(dq + at + 4) = *reinterpret_cast<const float4 *>(acc + 4);
    return true;
}

template <class P>
__global__ void bf16_dq_slc_add_kernel(float *dq, const P *part_dq, const int32_t *idx,
                                       const float *lse3, attn_shape s)
{
    int lane = threadIdx.x % 32;
    size_t rows = (size_t)s.B * s.T * s.H, nwarps = (size_t)gridDim.x * blockDim.x / 32;
    for (size_t row = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32; row < rows;
         row += nwarps)
        dq_add_row(dq, part_dq, idx, lse3, s, row, lane);
}

// bf16 partials: two rows a warp (dq_add_row_half, else dq_add_row one after the other).
__global__ void __launch_bounds__(256, 2)
    bf16_dq_slc_add_pairs_kernel(float *dq, const bf16 *part_dq, const int32_t *idx,
                                 const float *lse3, attn_shape s)
{
    int lane = threadIdx.x % 32;
    size_t rows = (size_t)s.B * s.T * s.H, nwarps = (size_t)gridDim.x * blockDim.x / 32;
    for (size_t r0 = 2 * ((blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32); r0 < rows;
         r0 += 2 * nwarps) {
        size_t r = r0 + lane / 16;
        if (dq_add_row_half(dq, part_dq, idx, lse3, s, r < rows ? r : r0, r < rows, lane))
            continue;
        for (r = r0; r < r0 + 2 && r < rows; r++)
            dq_add_row(dq, part_dq, idx, lse3, s, r, lane);
    }
}

nsa_status nsa__cuda_dq_slc_add(nsa_context *ctx, const attn_shape &s, float *dq,
                                const void *part_dq, int fp32, const int32_t *idx,
                                const float *lse3)
{
    size_t rows = (size_t)s.B * s.T * s.H;
    // (a warp a row; bf16: a warp two rows)
    unsigned blocks = nsa__cuda_blocks((fp32 ? rows : (rows + 1) / 2) * 32, 256);
    cudaStream_t st = nsa__cuda_stream(ctx);
    if (fp32) {
        bf16_dq_slc_add_kernel<float><<<blocks, 256, 0, st>>>(dq, (const float *)part_dq, idx,
                                                              lse3, s);
        NSA_CUDA_LAUNCHED("bf16_dq_slc_add_kernel");
    } else {
        bf16_dq_slc_add_pairs_kernel<<<blocks, 256, 0, st>>>(dq, (const bf16 *)part_dq, idx,
                                                             lse3, s);
        NSA_CUDA_LAUNCHED("bf16_dq_slc_add_pairs_kernel");
    }
    return NSA_OK;
}

size_t nsa__cuda_dq_slc_kv_scratch_bytes(const attn_shape &s)
{
    return (size_t)s.B * s.T * s.H * s.n * s.d * sizeof(float);
}

template <int DP>
static nsa_status dq_slc_kv_dp(nsa_context *ctx, const attn_shape &s, float *part_dq, float *dq,
                               const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dO16,
                               const float *gates, const float *lse3, const float *Dp,
                               const int32_t *idx, const sel_index &si, int split_pos)
{
    cudaStream_t st = nsa__cuda_stream(ctx);
    size_t bytes = kv_smem_bytes<DP>(2);
    NSA_TRY(allow_smem(ctx, bf16_bwd_dq_slc_kv_kernel<DP>, bytes));
    bf16_bwd_dq_slc_kv_kernel<DP><<<dim3((unsigned)si.max_items, 1, 1), MMA_THREADS, bytes, st>>>(
        part_dq, q, k, v, dO16, gates, lse3, Dp, idx, si.offsets, si.lists, si.item_start,
        split_pos, s);
    NSA_CUDA_LAUNCHED("bf16_bwd_dq_slc_kv_kernel");
    return nsa__cuda_dq_slc_add(ctx, s, dq, part_dq, 1, idx, NULL); // (every row written)
}

nsa_status nsa__cuda_dq_slc_kv(nsa_context *ctx, const attn_shape &s, float *part_dq, float *dq,
                               const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dO16,
                               const float *gates, const float *lse3, const float *Dp,
                               const int32_t *idx, const sel_index &si, int split_pos)
{
    if (s.d <= 64)
        return dq_slc_kv_dp<64>(ctx, s, part_dq, dq, q, k, v, dO16, gates, lse3, Dp, idx, si,
                                split_pos);
    return dq_slc_kv_dp<128>(ctx, s, part_dq, dq, q, k, v, dO16, gates, lse3, Dp, idx, si,
                             split_pos);
}

// Scratch floats of the partials (part_o, part_lse) and ints of the selection index.
size_t nsa__cuda_slc_kv_scratch_bytes(const attn_shape &s)
{
    size_t rows = (size_t)s.B * s.T * s.H;
    return rows * s.n * ((size_t)s.d + 1) * sizeof(float) + nsa__cuda_sel_ws_ints(s) * sizeof(int);
}

template <int DP>
static nsa_status slc_kv_dp(nsa_context *ctx, const attn_shape &s, void *scratch, float *out,
                            float *o_slc, float *lse3, const float *o_cmp, const float *o_win,
                            const bf16 *q, const bf16 *k, const bf16 *v, const float *gates,
                            const int32_t *idx)
{
    cudaStream_t st = nsa__cuda_stream(ctx);
    size_t rows = (size_t)s.B * s.T * s.H;
    float *part_o = (float *)scratch, *part_lse = part_o + rows * s.n * s.d;
    int *ws = (int *)(part_lse + rows * s.n);
    int split_pos = KV_SPLIT_ROWS / s.hpg > 0 ? KV_SPLIT_ROWS / s.hpg : 1;
    sel_index si;
    NSA_TRY(nsa__cuda_sel_lists(ctx, s, idx, ws, split_pos, &si));
    size_t bytes = kv_smem_bytes<DP>(1);
    NSA_TRY(allow_smem(ctx, bf16_slc_kv_kernel<DP>, bytes));
    bf16_slc_kv_kernel<DP><<<dim3((unsigned)si.max_items, 1, 1), MMA_THREADS, bytes, st>>>(
        part_o, part_lse, q, k, v, idx, si.offsets, si.lists, si.item_start, split_pos, s);
    NSA_CUDA_LAUNCHED("bf16_slc_kv_kernel");
    return nsa__cuda_slc_combine(ctx, s, out, o_slc, lse3, o_cmp, o_win, gates, part_o, 1, 0,
                                 part_lse, idx);
}

nsa_status nsa__cuda_slc_kv_forward(nsa_context *ctx, const attn_shape &s, void *scratch,
                                    float *out, float *o_slc, float *lse3, const float *o_cmp,
                                    const float *o_win, const bf16 *q, const bf16 *k,
                                    const bf16 *v, const float *gates, const int32_t *idx)
{
    if (s.d <= 64)
        return slc_kv_dp<64>(ctx, s, scratch, out, o_slc, lse3, o_cmp, o_win, q, k, v, gates, idx);
    return slc_kv_dp<128>(ctx, s, scratch, out, o_slc, lse3, o_cmp, o_win, q, k, v, gates, idx);
}
