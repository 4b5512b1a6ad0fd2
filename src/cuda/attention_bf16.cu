/*
 * attention_bf16.cu — the three attention paths of SPEC §3 with bf16 operands on the tensor
 * cores (mma.sync m16n8k16, fp32 accumulation): the forward kernels and the bf16 forward op.
 * The tile layout and the step are in attention_bf16.cuh.
 *
 *   bf16_cmp:    compressed path; with cmp_attn, a second pass over the same compressed keys
 *                turns the probabilities (fp32, from the saved lse) into block scores and a
 *                warp per position picks the top n (scoring + top-k fused; no T x blocks
 *                score tensor in global memory).
 *   bf16_slcwin: sliding window, then the selected blocks — the union of the blocks the
 *                tile's positions chose, streamed once for all of them; a warp skips a block
 *                none of its rows chose and masks rows that did not — and the gated sum.
 * Outputs (out, o_paths, lse) are fp32. Probabilities are rounded to bf16 only as the A
 * operand of P V; the softmax sums and the block scores use the fp32 values.
 */
#include "cuda/attention_bf16.cuh"

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
// Compressed path (+ fused cmp_attn scoring and top-k)

// Shared memory: Q tile, two stages of K and V tiles, the tile's rows, then (scoring) the
// block scores of the tile's positions and the selection scratch of each warp. The scoring
// pass keeps P (fp32, MB x (NB + 4)) where the V stages were.
template <int DP> static size_t cmp_smem_bytes(const attn_shape &s, bool score)
{
    size_t bytes = 5 * mcfg<DP>::TILE + sizeof(tile_rows);
    if (score)
        bytes += (size_t)(MB / s.hpg) * s.nb * sizeof(float) + 4 * (size_t)s.n * sizeof(int);
    return bytes;
}

template <int DP, bool SCORE>
__global__ void __launch_bounds__(MMA_THREADS, 2)
    bf16_cmp_kernel(float *o_cmp, float *lse3, int32_t *idx, const bf16 *q, const bf16 *kc,
                    const bf16 *vc, attn_shape s)
{
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int LD = mcfg<DP>::LD;
    bf16 *Qs = (bf16 *)smem_raw, *Ks = Qs + NB * LD, *Vs = Ks + 2 * NB * LD;
    tile_rows *tr = (tile_rows *)(Vs + 2 * NB * LD);
    int tile = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, c4 = lane % 4;
    tile_rows_init(tr, s, tile, g, b);
    __syncthreads();
    load_row_tile<DP>(Qs, q, tr, s.d);
    cp_async_commit();

    long long last_rg = min((long long)tile * MB + MB - 1, (long long)s.Tq * s.hpg - 1);
    int t_last = s.q_start + (int)(last_rg / s.hpg);
    int nc_max = visible_cmp(s, t_last);
    int vis[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        int t = tr->t[warp * 16 + gq + 8 * i];
        vis[i] = t < 0 ? 0 : visible_cmp(s, t);
    }
    size_t stride = (size_t)s.G * s.d, base = (size_t)b * s.Tc * stride + (size_t)g * s.d;
    int nch = (nc_max + NB - 1) / NB;
    if (nch > 0) {
        load_tile<DP>(Ks, kc, base, stride, 0, min(NB, nc_max), s.d);
        load_tile<DP>(Vs, vc, base, stride, 0, min(NB, nc_max), s.d);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    uint32_t qf[DP / 16][4];
    load_a_frags<DP>(qf, Qs, warp, lane);

    const float sl2 = s.scale * LOG2E;
    mma_acc<DP> acc;
    acc.reset();
    for (int i = 0; i < nch; i++) {
        int stg = i & 1;
        if (i + 1 < nch) {
            int j1 = (i + 1) * NB, cnt = min(NB, nc_max - j1);
            load_tile<DP>(Ks + (stg ^ 1) * NB * LD, kc, base, stride, j1, cnt, s.d);
            load_tile<DP>(Vs + (stg ^ 1) * NB * LD, vc, base, stride, j1, cnt, s.d);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        int j0 = i * NB;
        mma_fwd_step<DP>(acc, qf, Ks + stg * NB * LD, Vs + stg * NB * LD, sl2, lane,
                         [&](int ii, int kk) { return j0 + kk < vis[ii]; });
        __syncthreads();
    }
    float lse[2];
    acc.finish(lse);
    store_frag_rows<DP>(o_cmp, tr, acc.o, warp, lane, s.d);
    if (c4 == 0) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            int r = warp * 16 + gq + 8 * i;
            if (tr->t[r] >= 0)
                lse3[(size_t)tr->row[r] * 3 + 0] = lse[i];
        }
    }
    if (!SCORE)
        return;

    // Scores: the tile is QT = MB / hpg whole positions (the launcher checks MB % hpg == 0).
    const int LP = NB + 4;
    int QT = MB / s.hpg;
    float *Ps = (float *)Vs;
    float *score = (float *)(tr + 1);
    int *tmp = (int *)(score + (size_t)QT * s.nb);
    int tq0 = tile * QT;
    float l2[2] = {lse[0] * LOG2E, lse[1] * LOG2E};
    for (int e = threadIdx.x; e < QT * s.nb; e += MMA_THREADS)
        score[e] = 0.0f;
    if (nch > 0)
        load_tile<DP>(Ks, kc, base, stride, 0, min(NB, nc_max), s.d);
    cp_async_commit();
    for (int i = 0; i < nch; i++) {
        int stg = i & 1;
        if (i + 1 < nch) {
            int j1 = (i + 1) * NB;
            load_tile<DP>(Ks + (stg ^ 1) * NB * LD, kc, base, stride, j1, min(NB, nc_max - j1),
                          s.d);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        int j0 = i * NB, cnt = min(NB, nc_max - j0);
        float sc[8][4];
        mma_rows_keys<DP>(sc, qf, Ks + stg * NB * LD, lane);
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int ii = e / 2, kk = nt * 8 + 2 * c4 + (e & 1);
                float p = j0 + kk < vis[ii] ? exp2f(sc[nt][e] * sl2 - l2[ii]) : 0.0f;
                Ps[(warp * 16 + gq + 8 * ii) * LP + kk] = p;
            }
        __syncthreads();
        int j_end = j0 + cnt - 1;
        int i_lo = j0 * s.r / s.b, i_hi = (j_end * s.r + s.l - 1) / s.b;
        int nblk = i_hi - i_lo + 1;
        for (int e = threadIdx.x; e < QT * nblk; e += MMA_THREADS) {
            int tqi = e / nblk, bi = i_lo + e % nblk;
            int tq = tq0 + tqi;
            if (tq >= s.Tq || bi >= num_candidates(s, s.q_start + tq))
                continue;
            // tokens j with j*r <= (bi+1)*b - 1 and j*r + l - 1 >= bi*b
            int a = bi * s.b - s.l + 1;
            int jl = max(j0, a <= 0 ? 0 : (a + s.r - 1) / s.r);
            int jh = min(j_end, ((bi + 1) * s.b - 1) / s.r);
            float sum = 0.0f;
            for (int hh = 0; hh < s.hpg; hh++)
                for (int jj = jl; jj <= jh; jj++)
                    sum += Ps[(tqi * s.hpg + hh) * LP + jj - j0];
            score[(size_t)tqi * s.nb + bi] += sum;
        }
        __syncthreads();
    }
    __syncthreads();
    for (int tqi = warp; tqi < QT; tqi += MMA_THREADS / 32) {
        int tq = tq0 + tqi;
        if (tq >= s.Tq)
            continue;
        warp_select(score + (size_t)tqi * s.nb, num_candidates(s, s.q_start + tq), s.n, s.fixed,
                    idx + (((size_t)b * s.Tq + tq) * s.G + g) * s.n, tmp + warp * s.n);
    }
}

// ---------------------------------------------------------------------------------------
// Sliding window, selected blocks, gated sum

template <int DP> static size_t slcwin_smem_bytes(const attn_shape &s)
{
    return 5 * mcfg<DP>::TILE + sizeof(tile_rows) +
           (2 * (size_t)tile_positions(s.hpg) * s.n + 1) * sizeof(int) +
           (size_t)((s.nb + 31) / 32) * sizeof(unsigned);
}

template <int DP>
__global__ void __launch_bounds__(MMA_THREADS, 2)
    bf16_slcwin_kernel(float *out, float *o_slc, float *o_win, float *lse3, const float *o_cmp,
                       const bf16 *q, const bf16 *k, const bf16 *v, const float *gates,
                       const int32_t *idx, attn_shape s)
{
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int LD = mcfg<DP>::LD;
    bf16 *Qs = (bf16 *)smem_raw, *Ks = Qs + NB * LD, *Vs = Ks + 2 * NB * LD;
    tile_rows *tr = (tile_rows *)(Vs + 2 * NB * LD);
    int *sidx = (int *)(tr + 1);
    int *ulist = sidx + tile_positions(s.hpg) * s.n;
    int *nunion = ulist + tile_positions(s.hpg) * s.n;
    unsigned *bitmap = (unsigned *)(nunion + 1);
    int tile = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, c4 = lane % 4;
    tile_rows_init(tr, s, tile, g, b);
    __syncthreads();
    load_row_tile<DP>(Qs, q, tr, s.d);
    cp_async_commit();

    long long first_rg = (long long)tile * MB;
    long long last_rg = min(first_rg + MB - 1, (long long)s.Tq * s.hpg - 1);
    int t_first = s.q_start + (int)(first_rg / s.hpg), t_last = s.q_start + (int)(last_rg / s.hpg);
    int trow[2];
#pragma unroll
    for (int i = 0; i < 2; i++)
        trow[i] = tr->t[warp * 16 + gq + 8 * i];
    size_t stride = (size_t)s.G * s.d, base = (size_t)b * s.T * stride + (size_t)g * s.d;
    const float sl2 = s.scale * LOG2E;

    // sliding window: keys lo .. t_last in chunks
    int lo = max(0, t_first - s.w + 1);
    int nch = (t_last - lo + NB) / NB;
    load_tile<DP>(Ks, k, base, stride, lo, min(NB, t_last + 1 - lo), s.d);
    load_tile<DP>(Vs, v, base, stride, lo, min(NB, t_last + 1 - lo), s.d);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    uint32_t qf[DP / 16][4];
    load_a_frags<DP>(qf, Qs, warp, lane);
    mma_acc<DP> acc;
    acc.reset();
    for (int i = 0; i < nch; i++) {
        int stg = i & 1;
        if (i + 1 < nch) {
            int k1 = lo + (i + 1) * NB, cnt = min(NB, t_last + 1 - k1);
            load_tile<DP>(Ks + (stg ^ 1) * NB * LD, k, base, stride, k1, cnt, s.d);
            load_tile<DP>(Vs + (stg ^ 1) * NB * LD, v, base, stride, k1, cnt, s.d);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        int key0 = lo + i * NB;
        mma_fwd_step<DP>(acc, qf, Ks + stg * NB * LD, Vs + stg * NB * LD, sl2, lane,
                         [&](int ii, int kk) {
                             int pos = key0 + kk;
                             return pos <= trow[ii] && pos > trow[ii] - s.w;
                         });
        __syncthreads();
    }
    float lse_win[2];
    acc.finish(lse_win);
    store_frag_rows<DP>(o_win, tr, acc.o, warp, lane, s.d);

    // selected blocks: the union of the tile's selections
    build_union(sidx, ulist, nunion, bitmap, idx, s, b, g, t_first, t_last);
    int subs = (s.b + NB - 1) / NB;
    nch = *nunion * subs;
    int pl[2];
    bool member[2] = {false, false};
#pragma unroll
    for (int i = 0; i < 2; i++)
        pl[i] = trow[i] < 0 ? -1 : trow[i] - t_first;
    auto chunk = [&](int i, int &key0, int &cnt) {
        int u = ulist[i / subs];
        key0 = u * s.b + (i % subs) * NB;
        cnt = max(0, min(NB, min(u * s.b + s.b, t_last + 1) - key0));
    };
    acc.reset();
    if (nch > 0) {
        int key0, cnt;
        chunk(0, key0, cnt);
        load_tile<DP>(Ks, k, base, stride, key0, cnt, s.d);
        load_tile<DP>(Vs, v, base, stride, key0, cnt, s.d);
    }
    cp_async_commit();
    for (int i = 0; i < nch; i++) {
        int stg = i & 1;
        if (i + 1 < nch) {
            int k1, c1;
            chunk(i + 1, k1, c1);
            load_tile<DP>(Ks + (stg ^ 1) * NB * LD, k, base, stride, k1, c1, s.d);
            load_tile<DP>(Vs + (stg ^ 1) * NB * LD, v, base, stride, k1, c1, s.d);
        }
        cp_async_commit();
        int key0, cnt;
        chunk(i, key0, cnt);
        if (i % subs == 0) { // which of the thread's rows chose this block
            int u = ulist[i / subs];
#pragma unroll
            for (int ii = 0; ii < 2; ii++)
                member[ii] = pl[ii] >= 0 && holds(sidx + pl[ii] * s.n, s.n, u);
        }
        cp_async_wait<1>();
        __syncthreads();
        if (__any_sync(0xffffffffu, member[0] || member[1]))
            mma_fwd_step<DP>(acc, qf, Ks + stg * NB * LD, Vs + stg * NB * LD, sl2, lane,
                             [&](int ii, int kk) {
                                 return member[ii] && kk < cnt && key0 + kk <= trow[ii];
                             });
        __syncthreads();
    }
    float lse_slc[2];
    acc.finish(lse_slc);
    if (o_slc)
        store_frag_rows<DP>(o_slc, tr, acc.o, warp, lane, s.d);
#pragma unroll
    for (int ii = 0; ii < 2; ii++) {
        int r = warp * 16 + gq + 8 * ii;
        if (tr->t[r] < 0)
            continue;
        size_t row = (size_t)tr->row[r];
        if (lse3 && c4 == 0) {
            lse3[row * 3 + 1] = lse_slc[ii];
            lse3[row * 3 + 2] = lse_win[ii];
        }
        float g0 = gates[row * 3 + 0], g1 = gates[row * 3 + 1], g2 = gates[row * 3 + 2];
#pragma unroll
        for (int nt = 0; nt < DP / 8; nt++) {
            int col = nt * 8 + 2 * c4;
            if (col >= s.d)
                continue;
            size_t at = row * s.d + col;
            float2 oc = *reinterpret_cast<const float2 *>(o_cmp + at);
            float2 ow = *reinterpret_cast<const float2 *>(o_win + at);
            *reinterpret_cast<float2 *>(out + at) =
                make_float2(g0 * oc.x + g1 * acc.o[nt][2 * ii] + g2 * ow.x,
                            g0 * oc.y + g1 * acc.o[nt][2 * ii + 1] + g2 * ow.y);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The op

template <int DP>
static nsa_status bf16_forward_dp(nsa_context *ctx, const attn_shape &s, int phase, int fused,
                                  float *out, float *o_cmp, float *o_slc, float *o_win,
                                  float *lse3, int32_t *idx, const bf16 *q, const bf16 *k,
                                  const bf16 *v, const bf16 *kc, const bf16 *vc,
                                  const float *gates)
{
    cudaStream_t st = nsa__cuda_stream(ctx);
    long long tiles = ((long long)s.Tq * s.hpg + MB - 1) / MB;
    dim3 grid((unsigned)tiles, s.G, s.B);
    if (phase == 0) {
        if (fused) {
            size_t bytes = cmp_smem_bytes<DP>(s, true);
            NSA_TRY(allow_smem(ctx, bf16_cmp_kernel<DP, true>, bytes));
            bf16_cmp_kernel<DP, true><<<grid, MMA_THREADS, bytes, st>>>(o_cmp, lse3, idx, q, kc,
                                                                         vc, s);
        } else {
            size_t bytes = cmp_smem_bytes<DP>(s, false);
            NSA_TRY(allow_smem(ctx, bf16_cmp_kernel<DP, false>, bytes));
            bf16_cmp_kernel<DP, false><<<grid, MMA_THREADS, bytes, st>>>(o_cmp, lse3, idx, q, kc,
                                                                          vc, s);
        }
        NSA_CUDA_LAUNCHED("bf16_cmp_kernel");
    } else {
        size_t bytes = slcwin_smem_bytes<DP>(s);
        NSA_TRY(allow_smem(ctx, bf16_slcwin_kernel<DP>, bytes));
        bf16_slcwin_kernel<DP><<<grid, MMA_THREADS, bytes, st>>>(out, o_slc, o_win, lse3, o_cmp, q,
                                                                 k, v, gates, idx, s);
        NSA_CUDA_LAUNCHED("bf16_slcwin_kernel");
    }
    return NSA_OK;
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
    int fused = score && !mean_key && MB % s.hpg == 0 &&
                (s.d <= 64 ? cmp_smem_bytes<64>(s, true) : cmp_smem_bytes<128>(s, true)) <=
                    cs->max_smem_optin;

    // scratch: o_cmp, o_win and lse when the caller keeps none; fp32 copies of the inputs
    // the unfused selection reads (q and kc, or q and k with the block key sums)
    size_t rows = (size_t)s.B * s.Tq * s.H;
    size_t n_ocmp = o_paths ? 0 : 2 * rows * s.d, n_lse = lse ? 0 : rows * 3;
    size_t n_sel = 0, n_keys = 0;
    if (score && !fused) {
        n_keys = mean_key ? (size_t)s.B * s.T * s.G * s.d : (size_t)s.B * s.Tc * s.G * s.d;
        n_sel = rows * s.d + n_keys + (mean_key ? n_keys : 0);
    }
    float *scratch = NULL;
    if (n_ocmp + n_lse + n_sel) {
        void *mem;
        NSA_TRY(nsa__cuda_scratch(ctx, (n_ocmp + n_lse + n_sel) * sizeof(float), &mem));
        scratch = (float *)mem;
    }
    float *o_cmp = o_paths ? o_paths : scratch;
    float *lse3 = lse ? lse : scratch + n_ocmp;
    float *o_slc = o_paths ? o_paths + rows * s.d : NULL;
    float *o_win = o_paths ? o_paths + 2 * rows * s.d : scratch + rows * s.d;

    if (s.d <= 64)
        NSA_TRY(bf16_forward_dp<64>(ctx, s, 0, fused, out, o_cmp, o_slc, o_win, lse3, idx, q, k,
                                    v, kc, vc, gates));
    else
        NSA_TRY(bf16_forward_dp<128>(ctx, s, 0, fused, out, o_cmp, o_slc, o_win, lse3, idx, q, k,
                                     v, kc, vc, gates));
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
    if (s.d <= 64)
        return bf16_forward_dp<64>(ctx, s, 1, fused, out, o_cmp, o_slc, o_win, lse ? lse3 : NULL,
                                   idx, q, k, v, kc, vc, gates);
    return bf16_forward_dp<128>(ctx, s, 1, fused, out, o_cmp, o_slc, o_win, lse ? lse3 : NULL, idx,
                                q, k, v, kc, vc, gates);
}
