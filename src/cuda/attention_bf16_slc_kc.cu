/*
 * attention_bf16_slc_kc.cu — the selected path of the bf16 forward with key blocks outside
 * for H/G a multiple of 16 (NSA_CUDA_SLC_KC; sm_90a with TMA).
 *
 * The default kernel (attention_bf16.cu, bf16_slc_warp_kernel) runs a warp per (position,
 * 16 heads) that streams the position's own n blocks of K and V: at the paper's shape 512 KB
 * of K/V a position and kv head, 137 GB from L2 at T = 64k, which bounds it (21.9 ms on the
 * H200). Here a thread block takes one selected block and the positions that chose it (the
 * inverted index nsa__cuda_sel_lists builds, as the dk/dv kernel walks it), holds the
 * block's K and V in shared memory and streams the positions' query rows through it by TMA,
 * one box a position, 64 rows (64 / hpg positions) a tile. Per tile: S = Q K^T (warpgroup
 * MMA), the block's softmax, O = P V, and one partial a (row, block): o normalised within the
 * block (bf16, or fp32) and its lse. A combine pass (nsa__cuda_slc_combine) merges each row's
 * n partials by their lse and forms the gated sum. Bytes a (position, kv head, block): 4 KB
 * of q read, 4 KB of partial written and read again (bf16, H/G = 16, d = 128) instead of
 * 32 KB of K/V; the partials go through HBM.
 *
 * Partial layout [B, T, G, ns, hpg, d] (slot = the block's place in the position's
 * selection): the 16 rows of a warp, one position's heads, are 4 KB side by side. Mode 4,
 * with the paper's fixed selection: the fixed blocks (block 0, the two most recent), which
 * the warp-per-position kernel loads once for all positions of a thread block, stay with
 * that kernel (one partial for the three, slot n of ns = n + 1: attention_bf16.cu,
 * nsa__cuda_slc_fixed_partials, beside the compressed path and the scoring: a computed
 * selection always holds them); this kernel's index leaves them out.
 * From bytes: 192 instead of 216 KB a position and kv head through HBM, 11% fewer.
 *
 * Mode 5 (chunked, for sequences whose K and V stay in L2): the index is keyed by (chunk of
 * positions, kv head, block) in that order, so the blocks of one chunk of positions run
 * together and their partials are read back while still in L2; the thread block that
 * writes a position's last partial (a counter a position and kv head) merges the position's
 * rows after its tiles (slc_merge_row_pair, the combine's merge, partials loaded through L2
 * only); no combine pass runs (a small kernel writes the rows whose selection holds no
 * block). Lists are cut into items of 4 tiles, so that the merges spread. From bytes at 8k
 * (all of K and V, 16 MB, in L2): ~3.5 KB of K/V, 4 KB of q and 8 KB of partials a
 * (position, kv head, block), all through L2, against 32 KB for the warp kernel.
 *
 *   bf16_slc_kc_kernel:    part_o, part_lse   (then nsa__cuda_slc_combine: out, o_slc, lse3;
 *                          mode 5: out, o_slc, lse3 itself)
 *   slc_empty_rows_kernel: mode 5's rows without blocks: out, o_slc, lse3
 */
#include "cuda/attention_bf16.cuh"

// Positions of a work item at most (64 tiles of 64 rows, one position at least 16 rows).
#define KC_MAX_POS (64 * MB / 16)

// Shared memory: the block's K and V, ST stages of a 64-row q tile (sw128 tiles), the
// stages' full/empty barriers; MERGE: the positions to merge and their count.
template <int DP, int ST, bool MERGE> static size_t slc_kc_smem_bytes()
{
    return (2 + ST) * (size_t)NB * DP * sizeof(bf16) + 2 * ST * sizeof(uint64_t) +
           (MERGE ? (KC_MAX_POS + 1) * sizeof(int) : 0) + SMEM_ALIGN;
}

// One work item (dkv_work_of: the block w.key0 / b of kv head g, batch entry b, and up to
// `split` positions of its list): PT 1 writes bf16 partials, 2 fp32. Warp 0 fills the stages
// (one 5-D box a position and 64-column panel; slots past the list read position T, zeros)
// and refills a stage once every thread has arrived on its `empty` barrier, which each
// thread does as soon as its S = Q K^T is done (P V reads V alone).
// MERGE (bf16; the chunked index, nch chunks a batch entry): after its tiles the block
// counts each of its positions at counts[(b T + t) G + g] (zero before the launch; one a
// position and block it chose), and merges the rows of the positions whose count it
// completes into io's outputs (one fence a thread and one atomic a position an item, not
// one a tile: the count is a round trip to L2 that the warp would wait for).
template <int DP, int ST, int MINB, int PT, bool MERGE>
__global__ void __launch_bounds__(MMA_THREADS, MINB)
    bf16_slc_kc_kernel(void *part_o, float *part_lse, const bf16 *k, const bf16 *v,
                       const __grid_constant__ CUtensorMap tmq, const int32_t *idx,
                       const int *list_offsets, const int *lists, const int *item_start,
                       const int *item_key, int split, int ns, int *counts, int nch,
                       slc_sum_io io, attn_shape s)
{
#if NSA_WGMMA // (the host runs it where its probe found the sm_90a code: cuda_backend.cu)
    static_assert(!MERGE || PT == 1, "the merge reads bf16 partials");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int TE = NB * DP;
    bf16 *Ks = (bf16 *)smem_aligned(smem_raw), *Vs = Ks + TE, *Qs = Vs + TE;
    uint64_t *full = (uint64_t *)(Qs + ST * TE), *empty = full + ST;
    int *mlist = (int *)(empty + ST), *mcount = mlist + KC_MAX_POS; // (MERGE)
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4;

    dkv_work w;
    attn_shape sk = s; // (the chunked index: batch entries b * nch + chunk)
    sk.B = MERGE ? s.B * nch : s.B;
    if (!dkv_work_of<PATH_SLC>(w, sk, NB, list_offsets, lists, item_start, split,
                               MERGE ? item_key : NULL))
        return;
    const int g = w.g, b = MERGE ? w.b / nch : w.b, blk = w.key0 / s.b,
              cnt = w.key_end - w.key0;
    const int ppt = MB / s.hpg; // positions a tile (1, 2 or 4: H/G divides 64)
    const int npos = (int)(w.rg_end / s.hpg), ntiles = (npos + ppt - 1) / ppt;
    size_t stride = (size_t)s.G * s.d, kbase = (size_t)b * s.T * stride + (size_t)g * s.d;
    load_tile_sw<DP>(Ks, k, kbase, stride, w.key0, cnt, s.d);
    load_tile_sw<DP>(Vs, v, kbase, stride, w.key0, cnt, s.d);
    cp_async_commit();

    // tile j's positions into stage j % ST (warp 0)
    auto issue = [&](int j) {
        int qi0 = j * ppt, nvalid = min(ppt, npos - qi0);
        unsigned char *dst = (unsigned char *)(Qs + (j % ST) * TE);
        uint64_t *bar = &full[j % ST];
        if (lane == 0)
            mbar_expect_tx(bar, TE * (unsigned)sizeof(bf16));
        __syncwarp();
        for (int p = lane; p < ppt; p += 32) {
            int t = p < nvalid ? w.list[qi0 + p] : s.T;
            unsigned off = (unsigned)(p * s.hpg * 128);
#pragma unroll
            for (int pp = 0; pp < DP / 64; pp++)
                tma_load_5d(dst + pp * NB * 128 + off, &tmq, pp * 64, 0, g, t, b, bar);
        }
    };

    const float sl2 = s.scale * LOG2E;
    // this warp's 16 rows: heads hh0 .. hh0 + 15 of the tile's position p_w
    const int p_w = warp * 16 / s.hpg, hh0 = warp * 16 % s.hpg;
    auto step = [&](const bf16 *Qt, int it) {
        int qi = it * ppt + p_w;
        int t = qi < npos ? w.list[qi] : -1; // (warp-uniform)
        float sc[8][4];
        wg_rows_keys_issue<DP>(sc, Qt, Ks, warp, lane); // S: rows x keys
        // meanwhile: the block's slot in the position's selection
        int slot =
            t >= 0 ? warp_slot_of(idx + (((size_t)b * s.T + t) * s.G + g) * s.n, s.n, blk, lane)
                   : -1;
        wg_wait<0>();
        wgmma_hold(sc);
        mbar_arrive(&empty[it % ST]); // this thread is done with the stage
        // the block's softmax: keys kk < cnt with key0 + kk <= t
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, alpha[2];
        int last = t - w.key0;
        softmax_probs<NB>(sc, m, l, alpha, sl2, lane,
                          [&](int, int kk) { return kk < cnt && kk <= last; });
        uint32_t a[4][4];
#pragma unroll
        for (int j = 0; j < 4; j++)
            c_to_a(a[j], sc[2 * j], sc[2 * j + 1]);
        float o[DP / 8][4];
        frag_zero(o);
        wg_p_v<DP>(o, a, Vs, lane);
        if (slot < 0) // past the list (or a selection without this block: none written)
            return;
        size_t prow = ((((size_t)b * s.T + t) * s.G + g) * ns + slot) * s.hpg + hh0 + gq;
#pragma unroll
        for (int i = 0; i < 2; i++) {
            size_t at = prow + 8 * i;
            if (PT == 1)
                store_partial_row<DP>((bf16 *)part_o + at * s.d, part_lse + at, i, m, l, o, lane,
                                      s.d);
            else
                store_partial_row<DP>((float *)part_o + at * s.d, part_lse + at, i, m, l, o,
                                      lane, s.d);
        }
    };

    if (MERGE && threadIdx.x == 0)
        *mcount = 0;
    mbar_init_pipe<ST>(full, MMA_THREADS); // empty = full + ST
    __syncthreads();
    if (threadIdx.x < 32) // (while K and V arrive)
        for (int j = 0; j < ST - 1 && j < ntiles; j++)
            issue(j);
    cp_async_wait<0>();
    fence_async_smem();
    __syncthreads();
    row_stream<ST>(full, empty, ntiles, issue, [&](int it) { step(Qs + (it % ST) * TE, it); });
    if (MERGE) {
        __threadfence(); // this thread's partial stores, before the counts
        __syncthreads();
        __threadfence(); // (and the block's, which the barrier ordered before this thread)
        for (int p = threadIdx.x; p < npos; p += MMA_THREADS) {
            int t = w.list[p], nvalid = 0;
            const int32_t *sel = idx + (((size_t)b * s.T + t) * s.G + g) * s.n;
            for (int i = 0; i < s.n; i++) // (the partials the merge will read)
                nvalid += slot_written<1>(sel, i, s.n, t, s.b);
            if (atomicAdd(counts + ((size_t)b * s.T + t) * s.G + g, 1) == nvalid - 1) {
                __threadfence(); // (the other blocks' partials before the merge reads them)
                mlist[atomicAdd(mcount, 1)] = t;
            }
        }
        // the rows of the positions this block completed, two a warp
        __syncthreads();
        int nrows = *mcount * s.hpg;
        __threadfence();
        auto row_of = [&](size_t e) {
            return ((size_t)b * s.T + mlist[e / s.hpg]) * s.H + (size_t)g * s.hpg + e % s.hpg;
        };
        for (int e0 = 2 * warp; e0 < nrows; e0 += 2 * (MMA_THREADS / 32))
            slc_merge_row_pair<1, true>(e0, nrows, row_of, lane, io, (const bf16 *)part_o,
                                        part_lse, idx, s);
    }
#endif
}

// Mode 5's rows whose selection holds no block (no thread block merges them): a thread a
// (position, kv head) finds them, and writes what the merge would: lse slot 1 -inf, o_slc
// 0, out = g0 o_cmp + g1 0 + g2 o_win (the same sum as slc_merge_row_half's).
__global__ void slc_empty_rows_kernel(slc_sum_io io, const int32_t *idx, attn_shape s)
{
    size_t n_pos = (size_t)s.B * s.T * s.G;
    for (size_t pg = blockIdx.x * (size_t)blockDim.x + threadIdx.x; pg < n_pos;
         pg += (size_t)gridDim.x * blockDim.x) {
        bool empty = true;
        for (int i = 0; i < s.n && empty; i++)
            empty = idx[pg * s.n + i] < 0;
        if (!empty)
            continue;
        size_t row0 = pg / s.G * s.H + pg % s.G * s.hpg; // (b T + t) H + g hpg
        for (size_t row = row0; row < row0 + s.hpg; row++) {
            if (io.lse3)
                io.lse3[row * 3 + 1] = -INFINITY;
            float g0 = io.gates[row * 3 + 0], g1 = io.gates[row * 3 + 1];
            float g2 = io.gates[row * 3 + 2];
            for (int c = 0; c < s.d; c++) {
                size_t at = row * s.d + c;
                if (io.o_slc)
                    io.o_slc[at] = 0.0f;
                io.out[at] = g0 * io.o_cmp[at] + g1 * 0.0f + g2 * io.o_win[at];
            }
        }
    }
}

// The scratch of a mode: partial o (bf16; fp32 in mode 2) and lse of ns slots a row (n + 1
// in mode 4 with the fixed selection, the fixed blocks' partial in slot n), in mode 5 the
// counters of (position, kv head), then the inverted index's workspace (mode 5: chunks of
// `chunk` positions).
struct kc_parts {
    void *o;
    float *lse;
    int *counts, *ws;
    int ns, fix, chunk;
    size_t bytes; // in all
};

static kc_parts kc_parts_of(const attn_shape &s, int mode, int chunk, void *scratch)
{
    kc_parts p;
    // (mode 4 without the fixed selection: mode 1; n >= 3 holds all three fixed blocks)
    p.fix = mode == 4 && s.fixed && s.n >= 3;
    p.ns = s.n + p.fix; // (the combine's layout 2 when fix, 1 otherwise)
    p.chunk = mode == 5 ? chunk : 0;
    size_t parts = (size_t)s.B * s.T * s.H * p.ns;
    size_t lse_at = nsa__align256(parts * s.d * (mode == 2 ? sizeof(float) : sizeof(bf16)));
    size_t cnt_at = lse_at + nsa__align256(parts * sizeof(float));
    size_t ws_at = cnt_at + (p.chunk ? nsa__align256((size_t)s.B * s.T * s.G * sizeof(int)) : 0);
    size_t ws_ints = nsa__cuda_sel_ws_ints(s, p.chunk);
    p.bytes = ws_ints ? ws_at + ws_ints * sizeof(int) : 0; // (0: the chunked index can't be built)
    char *mem = (char *)scratch;
    p.o = mem;
    p.lse = mem ? (float *)(mem + lse_at) : NULL;
    p.counts = mem && p.chunk ? (int *)(mem + cnt_at) : NULL;
    p.ws = mem ? (int *)(mem + ws_at) : NULL;
    return p;
}

size_t nsa__cuda_slc_kc_scratch_bytes(const attn_shape &s, int mode, int chunk)
{
    return kc_parts_of(s, mode, chunk, NULL).bytes;
}

// NSA_ERR_UNSUPPORTED where slc_kc_covers does not hold (the forward's gate checks it).
static nsa_status kc_covered(nsa_context *ctx, const attn_shape &s)
{
    const nsa__cuda_state *cs = nsa__cuda(ctx);
    if (!slc_kc_covers(cs, s))
        return nsa__error(NSA_ERR_UNSUPPORTED,
                          "cuda bf16 selected path (key blocks outside): H/G = %d, block_size "
                          "= %d, %d of %d positions, sm_90a code %s, TMA %s: not covered",
                          s.hpg, s.b, s.Tq, s.T, cs->sm90a ? "loaded" : "absent",
                          cs->use_tma ? "on" : "off");
    return NSA_OK;
}

nsa_status nsa__cuda_slc_kc_fixed(nsa_context *ctx, const attn_shape &s, int mode,
                                  void *scratch, const bf16 *q, const bf16 *k, const bf16 *v,
                                  const int32_t *given_idx)
{
    kc_parts p = kc_parts_of(s, mode, nsa__cuda(ctx)->kc_chunk, scratch);
    if (!p.fix)
        return NSA_OK;
    NSA_TRY(kc_covered(ctx, s));
    return nsa__cuda_slc_fixed_partials(ctx, s, p.o, p.lse, p.ns, q, k, v, given_idx);
}

// The blocks outside the fixed ones (all of them, but in mode 4 with the fixed selection)
// by key blocks outside, then the combine (MERGE: the kernel merges, and
// slc_empty_rows_kernel writes the rows without blocks).
template <int DP, int ST, int MINB, int PT, bool MERGE>
static nsa_status slc_kc_dp(nsa_context *ctx, const attn_shape &s, const kc_parts &p,
                            float *out, float *o_slc, float *lse3, const float *o_cmp,
                            const float *o_win, const bf16 *q, const bf16 *k, const bf16 *v,
                            const float *gates, const int32_t *idx)
{
    cudaStream_t st = nsa__cuda_stream(ctx);
    // work items of up to 64 tiles (the selected dk/dv kernel's split); MERGE: 4 tiles, so
    // that the merges of a chunk's positions, which fall to the items that finish last
    // (those of the blocks every position holds: its own), spread over several blocks
    int split_pos = (MERGE ? 4 : 64) * MB / s.hpg;
    int nch = MERGE ? (s.T + p.chunk - 1) / p.chunk : 1;
    sel_index si;
    NSA_TRY(nsa__cuda_sel_lists(ctx, s, idx, p.ws, split_pos, &si, p.fix, MERGE ? p.chunk : 0));
    if (MERGE)
        NSA_CUDA_TRY(cudaMemsetAsync(p.counts, 0, (size_t)s.B * s.T * s.G * sizeof(int), st));
    CUtensorMap tmq;
    NSA_TRY(nsa__cuda_tensor_map_rows(ctx, &tmq, q, s.B, s.T, s.G, s.hpg, s.d, 1));
    auto kernel = bf16_slc_kc_kernel<DP, ST, MINB, PT, MERGE>;
    size_t bytes = slc_kc_smem_bytes<DP, ST, MERGE>();
    NSA_TRY(slcw_prepare(ctx, kernel, bytes)); // (and the carveout for MINB blocks a SM)
    slc_sum_io io = {out, o_slc, lse3, o_cmp, o_win, gates};
    kernel<<<dim3((unsigned)si.max_items, 1, 1), MMA_THREADS, bytes, st>>>(
        p.o, p.lse, k, v, tmq, idx, si.offsets, si.lists, si.item_start, si.item_key, split_pos,
        p.ns, p.counts, nch, io, s);
    NSA_CUDA_LAUNCHED("bf16_slc_kc_kernel");
    if (MERGE) {
        size_t n_pos = (size_t)s.B * s.T * s.G;
        slc_empty_rows_kernel<<<nsa__cuda_blocks(n_pos, 256), 256, 0, st>>>(io, idx, s);
        NSA_CUDA_LAUNCHED("slc_empty_rows_kernel");
        return NSA_OK;
    }
    return nsa__cuda_slc_combine(ctx, s, out, o_slc, lse3, o_cmp, o_win, gates, p.o, PT == 2,
                                 p.fix ? 2 : 1, p.lse, idx);
}

nsa_status nsa__cuda_slc_kc_forward(nsa_context *ctx, const attn_shape &s, int mode,
                                    void *scratch, float *out, float *o_slc, float *lse3,
                                    const float *o_cmp, const float *o_win, const bf16 *q,
                                    const bf16 *k, const bf16 *v, const float *gates,
                                    const int32_t *idx)
{
    NSA_TRY(kc_covered(ctx, s));
    kc_parts p = kc_parts_of(s, mode, nsa__cuda(ctx)->kc_chunk, scratch);
    nsa__cuda(ctx)->slc_kind[0] = NSA_SLC_KC + (p.fix ? 4 : mode == 4 ? 1 : mode);
#define KC_ARGS ctx, s, p, out, o_slc, lse3, o_cmp, o_win, q, k, v, gates, idx
#define KC_RUN(DP)                                                                              \
    (mode == 2   ? slc_kc_dp<DP, 4, 2, 2, false>(KC_ARGS)                                         \
     : mode == 3 ? slc_kc_dp<DP, 2, 3, 1, false>(KC_ARGS)                                         \
     : mode == 5 ? slc_kc_dp<DP, 2, 3, 1, true>(KC_ARGS)                                          \
                 : slc_kc_dp<DP, 4, 2, 1, false>(KC_ARGS))
    if (s.d <= 64)
        return KC_RUN(64);
    return KC_RUN(128);
#undef KC_RUN
#undef KC_ARGS
}
