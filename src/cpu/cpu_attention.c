/*
 * cpu_attention.c — the three attention paths of SPEC §3 on the CPU, tiled: compressed
 * tokens (with the cmp_attn block scores), scoring + top-k block selection, selected
 * blocks, sliding window and the gated sum; forward and backward. attn_ref.c holds the
 * plain one-row-at-a-time version these kernels are tested against.
 *
 * Work is cut into tiles of consecutive queries of one (batch, kv head) "unit" holding
 * all the query heads that read that kv head (the paper's group-centric tiles): a tile's
 * rows are (query, head) pairs, query-major, so the keys a path loads serve every head
 * of the group (and, in a tile, every query that wants them). Per unit, k and v are first
 * packed into 8-key panels (attn_kernels.h), then the threads take tiles. Each path is a
 * full-row softmax over the path's own keys (at most max(Tc, n*b, w + tile) of them, so
 * scratch is O(T) per thread, never T x T): S = Q K^T by the panel product, the path's
 * mask, max / exp / sum, O = P V by the row product.
 *
 * The selected path picks, per tile, between the union of the tile's selected blocks
 * (all rows at once, each masked to its own blocks: best when queries share blocks) and
 * one query at a time (its heads only: best when selections are scattered), by the
 * number of score entries each would compute.
 *
 * Backward: the compressed and window paths go by the same tiles, recomputing P from the
 * saved log-sum-exps. The selected path goes key-centric: per selection block, the
 * queries that chose it (an inverse index of the selection) are gathered and the block's
 * keys serve all of them at once (query by query, each pair re-read 48 KiB of packed keys
 * and read-modify-wrote 32 KiB of key gradients for a 4-row product: memory-bound). dk /
 * dv (and dkc / dvc) go to per-thread accumulators, summed in thread order at the end of
 * the unit; tiles and the selected path's sub-ranges of queries are dealt to threads in a
 * fixed order, so results are bit-identical run to run for a given thread count.
 */
#include "cpu/attn.h"
#include "cpu/attn_kernels.h"
#include "cpu/cpu.h"
#include "internal.h"

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

const char *const nsa__attn_phase_names[NSA_PHASE_COUNT] = {"pack", "cmp",  "select",
                                                            "slc",  "win",  "other"};

#define S_BUDGET 32768      // floats of score block the paths need at least (128 KiB)
#define CMP_S_FLOATS 98304  // the compressed path's score block (cmp_chunk_rows)

// Columns [col0, col0 + 8*np) of a score block hold the keys at positions
// [pos0, pos0 + 8*np) (pos0 a multiple of 8); blk is the selection block (or -1).
typedef struct key_run {
    int col0, pos0, np, blk;
} key_run;

// Everything fixed for one call.
typedef struct plan {
    const nsa__attn_dims *dm;
    int hpg, dp, Tq, Tw, ntiles, rows_pad;
    int T8, Tc8, nb, nbp, nfull, max_union;
    int q_start, Tr; // queries at positions [q_start, T): Tr rows per batch entry
    int qch, rows_k;  // key-centric selected path: queries per chunk, rows of a chunk
    int slc_blocks;   // forward: selected path key-centric (long sequences, see below)
    int sub_range;    // key-centric selected path: queries per sub-range
    size_t s_floats;
    int cmp_attn, mean_key;
} plan;

// k and v of one unit, packed (forward: kt, vrow, kct, vcrow, ksumt; backward adds the
// transposes of v and the rows of k).
typedef struct unit_pack {
    float *kt, *vrow, *kct, *vcrow, *ksum, *ksumt;
    float *vt, *krow, *vct, *kcrow;
    int *blk_tok_lo, *blk_tok_hi; // compressed tokens [lo, hi) overlapping block i (cmp_attn)
} unit_pack;

typedef struct scratch {
    float *qs, *o[3], *s, *s2, *lse, *inv, *bscore, *qsum, *kpart, *kpart_big;
    float *dout, *dop[3], *D, *dq;
    float *dk, *dv, *dkc, *dvc; // backward: this thread's key gradient accumulators
    float *dq_slc;              // backward: dq of the selected path, a sub-range's rows
    int *ix_start, *ix_list;    // inverse index of a sub-range's selection
    float *qg, *dog, *dqg, *lg, *dg, *dkb, *dvb; // a gathered chunk of one block's queries
    // a sub-range's rows, read once from the [B,T,H,..] arrays: scaled q (both directions);
    // gated dout, D = dO . o_slc and lse of the selected path (backward)
    float *q_sub, *dog_sub, *D_sub, *lse_sub;
    float *o_acc, *m_acc, *l_acc; // forward, key-centric: this thread's partial softmax
                                  // state of the selected path, per (query, head) row
    int32_t *sel, *top;
    int *umap, *ublk;
    unsigned char *inq;
    key_run *runs;
    nsa__seg *segs;
    double t[NSA_PHASE_COUNT], lap, wait;
    int profiling;
} scratch;

// Phase timing by the thread's CPU clock: what a phase cost this thread, whatever else
// the machine runs (a wall clock would charge other processes' time slices to it).
static inline double thread_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static inline void lap(scratch *sc, int phase)
{
    if (!sc->profiling)
        return;
    double now = thread_seconds();
    sc->t[phase] += now - sc->lap;
    sc->lap = now;
}

// A barrier, the time before it charged to `phase`; with profiling, the wall time spent
// waiting in it is added up (a thread sleeping in a barrier uses no CPU time: the phases
// do not show it) and the spinning part goes to "other".
static void sync_threads(scratch *sc, int phase)
{
    lap(sc, phase);
    double w0 = sc->profiling ? omp_get_wtime() : 0.0;
#pragma omp barrier
    if (sc->profiling) {
        sc->wait += omp_get_wtime() - w0;
        lap(sc, NSA_PHASE_OTHER);
    }
}

static inline int imin(int a, int b)
{
    return a < b ? a : b;
}

static inline int imax(int a, int b)
{
    return a > b ? a : b;
}

// Row of query position t of batch entry b in q, gates, out, lse, idx (SPEC's [B,T,...]
// arrays; only positions from q_start on when generating).
static inline size_t qrow(const plan *pl, int b, int t)
{
    return (size_t)b * pl->Tr + (size_t)(t - pl->q_start);
}

// Number of compressed tokens visible to query t: j*r + l - 1 <= t.
static inline int visible_compressed(const nsa__attn_dims *dm, int t)
{
    if (t < dm->cmp_len - 1)
        return 0;
    int nc = (t - dm->cmp_len + 1) / dm->cmp_stride + 1;
    return nc < dm->num_cmp ? nc : dm->num_cmp;
}

static void fill(float *x, int n, float v)
{
    for (int i = 0; i < n; i++)
        x[i] = v;
}

// ---------------------------------------------------------------------------------------
// Plan and buffers

static void plan_init(plan *pl, const nsa__attn_dims *dm, int threads, int score_blocks)
{
    memset(pl, 0, sizeof *pl);
    pl->dm = dm;
    pl->hpg = dm->H / dm->G;
    pl->dp = nsa__round8(dm->d);
    int Tq = nsa__round4(imax(1, 64 / pl->hpg));
    pl->q_start = dm->q_start;
    pl->Tr = dm->T - dm->q_start;
    int per_thread = nsa__round4((pl->Tr + 4 * threads - 1) / (4 * threads));
    if (Tq > per_thread)
        Tq = imax(4, per_thread);
    pl->Tq = Tq;
    pl->Tw = imax(4, imin(Tq, (dm->window / 2) & ~3));
    pl->ntiles = (pl->Tr + Tq - 1) / Tq;
    pl->rows_pad = nsa__round4(Tq * pl->hpg) + 4;
    pl->T8 = nsa__round8(dm->T);
    pl->Tc8 = nsa__round8(dm->num_cmp);
    pl->nb = dm->num_blocks;
    pl->nbp = nsa__round8(dm->num_blocks);
    pl->nfull = dm->T / dm->block_size;
    pl->cmp_attn = score_blocks && dm->select_score == NSA_SELECT_CMP_ATTN;
    pl->mean_key = score_blocks && dm->select_score == NSA_SELECT_MEAN_KEY;
    pl->max_union = imin(pl->nb, Tq * dm->num_selected);
    size_t need = S_BUDGET;
    size_t cmp = (size_t)16 * pl->Tc8 > CMP_S_FLOATS ? (size_t)16 * pl->Tc8 : CMP_S_FLOATS;
    size_t win = (size_t)(nsa__round4(pl->Tw * pl->hpg) + 4) *
                 (size_t)(imin(nsa__round8(dm->window + pl->Tw), pl->T8) + 16);
    size_t slc = (size_t)(nsa__round4(pl->hpg) + 4) * dm->num_selected *
                 (size_t)((dm->block_size + 7) / 8 + 2) * 8;
    size_t mk = (size_t)(nsa__round4(Tq) + 4) * pl->nbp;
    pl->qch = imax(1, 256 / pl->hpg);
    // Past ~2 MiB of keys per kv head (T*dp >= 128Ki floats: T >= 2048 at d = 64) the
    // blocks a query picks are scattered over more than the caches hold; the forward then
    // goes block by block too (slc_forward_blocks).
    pl->slc_blocks = dm->q_start == 0 && (size_t)dm->T * pl->dp >= 131072;
    // ~2 qch queries per block within a sub-range (each query selects n of nb blocks), but
    // no more than keep the sub-range's rows and accumulators (2 x hpg x dp floats per
    // query) within ~2 MiB per thread, so that both threads' rows stay in cache while the
    // keys stream by: 8Ki queries (16 MiB per thread) ran the path at 63 GFLOP/s at
    // T = 64k, 1Ki queries at ~85 (the keys are re-read once per sub-range: cheap, they
    // stream in order)
    long sr = 2L * pl->qch * pl->nb / dm->num_selected;
    long sr_cache = (2L << 20) / (8L * pl->hpg * pl->dp);
    if (sr > sr_cache)
        sr = sr_cache;
    pl->sub_range = (int)(sr < 256 ? 256 : sr > 16384 ? 16384 : sr);
    pl->rows_k = nsa__round4(pl->qch * pl->hpg) + 4;
    size_t slc_k = (size_t)pl->rows_k * (size_t)((dm->block_size + 7) / 8 + 2) * 8;
    need = need > slc_k ? need : slc_k;
    need = need > cmp ? need : cmp;
    need = need > win ? need : win;
    need = need > slc ? need : slc;
    need = need > mk ? need : mk;
    pl->s_floats = need + 64;
}

// Carves `bytes` (64-byte aligned) out of base at *off; with base NULL only counts.
static void *take(char *base, size_t *off, size_t bytes)
{
    void *r = base ? base + *off : NULL;
    *off += (bytes + 63) & ~(size_t)63;
    return r;
}

// Scratch of one thread in one block of memory (NULL on failure).
static char *scratch_alloc(const plan *pl, scratch *sc, int backward)
{
    const nsa__attn_dims *dm = pl->dm;
    size_t rows = (size_t)pl->rows_pad * pl->dp * sizeof(float);
    size_t n = (size_t)dm->num_selected;
    size_t runs = (size_t)pl->max_union + n + 8;
    size_t total = 0;
    for (int pass = 0; pass < 2; pass++) {
        char *base = pass ? aligned_alloc(64, total) : NULL;
        size_t off = 0;
        if (pass && !base)
            return NULL;
        memset(sc, 0, sizeof *sc);
        sc->qs = take(base, &off, rows);
        for (int c = 0; c < 3; c++)
            sc->o[c] = take(base, &off, rows);
        sc->s = take(base, &off, pl->s_floats * sizeof(float));
        sc->lse = take(base, &off, (size_t)pl->rows_pad * 3 * sizeof(float));
        sc->inv = take(base, &off, (size_t)pl->rows_pad * sizeof(float));
        sc->bscore = take(base, &off, (size_t)pl->Tq * pl->nbp * sizeof(float));
        sc->qsum = take(base, &off, (size_t)(nsa__round4(pl->Tq) + 4) * pl->dp * sizeof(float));
        sc->kpart = take(base, &off, (size_t)pl->dp * sizeof(float));
        sc->kpart_big = take(base, &off, (size_t)(pl->Tc8 + 8) * sizeof(float));
        sc->sel = take(base, &off, (size_t)pl->Tq * n * sizeof(int32_t));
        sc->top = take(base, &off, (n + 4) * sizeof(int32_t));
        sc->umap = take(base, &off, (size_t)pl->nb * sizeof(int));
        sc->ublk = take(base, &off, runs * sizeof(int));
        sc->inq = take(base, &off, (size_t)pl->Tq * runs);
        sc->runs = take(base, &off, runs * sizeof(key_run));
        sc->segs = take(base, &off, runs * sizeof(nsa__seg));
        if (backward) {
            sc->s2 = take(base, &off, pl->s_floats * sizeof(float));
            sc->dout = take(base, &off, rows);
            for (int c = 0; c < 3; c++)
                sc->dop[c] = take(base, &off, rows);
            sc->D = take(base, &off, (size_t)pl->rows_pad * 3 * sizeof(float));
            sc->dq = take(base, &off, rows);
            size_t kv = (size_t)pl->T8 * pl->dp * sizeof(float);
            size_t kvc = (size_t)(pl->Tc8 + 8) * pl->dp * sizeof(float);
            sc->dk = take(base, &off, kv);
            sc->dv = take(base, &off, kv);
            sc->dkc = take(base, &off, kvc);
            sc->dvc = take(base, &off, kvc);
            sc->dq_slc = take(base, &off, (size_t)pl->sub_range * pl->hpg * pl->dp * sizeof(float));
        }
        if (backward || pl->slc_blocks) {
            size_t rk = (size_t)pl->rows_k * pl->dp * sizeof(float);
            size_t kb = (size_t)((dm->block_size + 7) / 8 + 2) * 8 * pl->dp * sizeof(float);
            if (!sc->s2)
                sc->s2 = take(base, &off, pl->s_floats * sizeof(float));
            sc->qg = take(base, &off, rk);
            sc->dog = take(base, &off, rk);
            sc->dqg = take(base, &off, rk);
            sc->lg = take(base, &off, (size_t)pl->rows_k * sizeof(float));
            sc->dg = take(base, &off, (size_t)pl->rows_k * sizeof(float));
            sc->dkb = take(base, &off, kb);
            sc->dvb = take(base, &off, kb);
            sc->ix_start = take(base, &off, sizeof(int) * ((size_t)pl->nb + 2));
            sc->ix_list = take(base, &off, sizeof(int) * (size_t)pl->sub_range * n);
            size_t sub_rows = (size_t)pl->sub_range * pl->hpg;
            sc->q_sub = take(base, &off, sub_rows * pl->dp * sizeof(float));
            if (backward) {
                sc->dog_sub = take(base, &off, sub_rows * pl->dp * sizeof(float));
                sc->D_sub = take(base, &off, sub_rows * sizeof(float));
                sc->lse_sub = take(base, &off, sub_rows * sizeof(float));
            }
        }
        if (!backward && pl->slc_blocks) {
            size_t rows_all = (size_t)pl->sub_range * pl->hpg;
            sc->o_acc = take(base, &off, rows_all * pl->dp * sizeof(float));
            sc->m_acc = take(base, &off, rows_all * sizeof(float));
            sc->l_acc = take(base, &off, rows_all * sizeof(float));
        }
        total = (off + 63) & ~(size_t)63;
        if (pass) {
            memset(base, 0, total);
            for (int i = 0; i < pl->nb; i++)
                sc->umap[i] = -1;
            return base;
        }
    }
    return NULL;
}

static float *pack_alloc(const plan *pl, unit_pack *pk, int backward)
{
    size_t dp = (size_t)pl->dp;
    size_t kv = (size_t)pl->T8 * dp, kvc = (size_t)(pl->Tc8 + 8) * dp;
    size_t ks = (size_t)(nsa__round8(pl->nfull) + 8) * dp;
    size_t total = 2 * kv + 2 * kvc + 2 * ks + (backward ? 2 * kv + 2 * kvc : 0);
    total += 2 * (size_t)(pl->nbp + 8); // block -> token tables (ints, float-sized)
    float *base = malloc(nsa__mul_size(total ? total : 1, sizeof(float)));
    if (!base)
        return NULL;
    float *p = base;
    pk->kt = p, p += kv;
    pk->vrow = p, p += kv;
    pk->kct = p, p += kvc;
    pk->vcrow = p, p += kvc;
    pk->ksum = p, p += ks;
    pk->ksumt = p, p += ks;
    if (backward) {
        pk->vt = p, p += kv;
        pk->krow = p, p += kv;
        pk->vct = p, p += kvc;
        pk->kcrow = p, p += kvc;
    }
    pk->blk_tok_lo = (int *)p, p += pl->nbp + 8;
    pk->blk_tok_hi = (int *)p, p += pl->nbp + 8;
    // token j spans [j*r, j*r + l): it overlaps block i when j*r < (i+1)*b and
    // j*r + l - 1 >= i*b, a contiguous range of j per block
    const nsa__attn_dims *dm = pl->dm;
    const int r = dm->cmp_stride, l = dm->cmp_len, bs = dm->block_size;
    for (int i = 0; i < pl->nb; i++) {
        int lo = i * bs - l + 1, hi = ((i + 1) * bs - 1) / r + 1;
        lo = lo <= 0 ? 0 : (lo + r - 1) / r;
        pk->blk_tok_lo[i] = lo;
        pk->blk_tok_hi[i] = imax(lo, imin(hi, dm->num_cmp));
    }
    return base;
}

// Packs unit (b, g) (inside a parallel region; the caller syncs the threads after it).
static void pack_unit(const plan *pl, unit_pack *pk, const float *k, const float *v,
                      const float *kc, const float *vc, int b, int g, int backward)
{
    const nsa__attn_dims *dm = pl->dm;
    const int d = dm->d, dp = pl->dp, T = dm->T, Tc = dm->num_cmp, G = dm->G;
    const ptrdiff_t stride = (ptrdiff_t)G * d;
    const float *kb = k + ((size_t)b * T * G + g) * d, *vb = v + ((size_t)b * T * G + g) * d;
    const float *kcb = kc + ((size_t)b * Tc * G + g) * d, *vcb = vc + ((size_t)b * Tc * G + g) * d;
    const int npT = pl->T8 / 8, npC = pl->Tc8 / 8 + 1;
#pragma omp for schedule(static) nowait
    for (int p = 0; p < npT; p++) {
        nsa__pack_panels(pk->kt + (size_t)p * 8 * dp, kb, stride, d, dp, 8 * p, 1, T);
        nsa__pack_rows(pk->vrow + (size_t)p * 8 * dp, vb, stride, d, dp, 8 * p, 8, T, 1.0f);
        if (backward) {
            nsa__pack_panels(pk->vt + (size_t)p * 8 * dp, vb, stride, d, dp, 8 * p, 1, T);
            nsa__pack_rows(pk->krow + (size_t)p * 8 * dp, kb, stride, d, dp, 8 * p, 8, T, 1.0f);
        }
    }
#pragma omp for schedule(static) nowait
    for (int p = 0; p < npC; p++) {
        nsa__pack_panels(pk->kct + (size_t)p * 8 * dp, kcb, stride, d, dp, 8 * p, 1, Tc);
        nsa__pack_rows(pk->vcrow + (size_t)p * 8 * dp, vcb, stride, d, dp, 8 * p, 8, Tc, 1.0f);
        if (backward) {
            nsa__pack_panels(pk->vct + (size_t)p * 8 * dp, vcb, stride, d, dp, 8 * p, 1, Tc);
            nsa__pack_rows(pk->kcrow + (size_t)p * 8 * dp, kcb, stride, d, dp, 8 * p, 8, Tc, 1.0f);
        }
    }
    if (pl->mean_key) {
        // sums of the full selection blocks, added in position order (as the reference's
        // running sums are), then transposed into panels for the score product
        const int bs = dm->block_size, npB = nsa__round8(pl->nfull) / 8;
#pragma omp for schedule(static)
        for (int i = 0; i < nsa__round8(pl->nfull); i++) {
            float *row = pk->ksum + (size_t)i * dp;
            memset(row, 0, sizeof(float) * (size_t)dp);
            if (i < pl->nfull)
                for (int s = i * bs; s < (i + 1) * bs; s++)
                    for (int c = 0; c < d; c++)
                        row[c] += kb[(ptrdiff_t)s * stride + c];
        }
#pragma omp for schedule(static) nowait
        for (int p = 0; p < npB; p++)
            nsa__pack_panels(pk->ksumt + (size_t)p * 8 * dp, pk->ksum, dp, dp, dp, 8 * p, 1,
                             pl->nfull);
    }
}

// ---------------------------------------------------------------------------------------
// Row softmax and the forward of one set of rows over key runs

// Row i of S (cols wide), masked: p = exp(s - max) in place; lse and 1/sum out. A row
// with no key gets p = 0, lse = -inf, inv = 0.
static void softmax_row(float *srow, int cols, float *lse, float *inv)
{
    float mx = nsa__vmax(srow, cols);
    if (mx == -INFINITY) {
        memset(srow, 0, sizeof(float) * (size_t)cols);
        *lse = -INFINITY;
        *inv = 0.0f;
        return;
    }
    float sum = nsa__vexp_sum(srow, cols, mx);
    *lse = mx + logf(sum);
    *inv = 1.0f / sum;
}

// S[M, cols] = A[M, dp] K^T over the runs (panels from kt).
static void run_scores(const plan *pl, int M, const float *A, const key_run *runs, int nruns,
                       const float *kt, float *S, int cols)
{
    const int dp = pl->dp;
    for (int r = 0; r < nruns; r++)
        nsa__gemm_panels_contig(M, dp, A, dp, kt + (size_t)runs[r].pos0 * dp, 8 * dp,
                                runs[r].np, S + runs[r].col0, cols);
}

// O[M, dp] (+)= P[M, cols] V over the runs (rows from vrow).
static void run_pv(const plan *pl, scratch *sc, int M, const float *P, int cols,
                   const key_run *runs, int nruns, const float *vrow, float *O, int acc)
{
    const int dp = pl->dp;
    for (int r = 0; r < nruns; r++) {
        sc->segs[r].b = vrow + (size_t)runs[r].pos0 * dp;
        sc->segs[r].k = 8 * runs[r].np;
    }
    nsa__gemm_rows(M, dp, P, cols, 1, sc->segs, nruns, dp, O, dp, acc);
}

// Softmax of rows [0, Mr) of S (rows Mr..M zeroed), O = P V scaled by 1/sum; lse of row i
// to lse[i*3] (lse points at the path's column).
static void finish_rows(const plan *pl, scratch *sc, int M, int Mr, float *S, int cols,
                        const key_run *runs, int nruns, const float *vrow, float *O,
                        float *lse)
{
    for (int i = 0; i < M; i++) {
        if (i < Mr)
            softmax_row(S + (size_t)i * cols, cols, &lse[i * 3], &sc->inv[i]);
        else {
            memset(S + (size_t)i * cols, 0, sizeof(float) * (size_t)cols);
            sc->inv[i] = 0.0f;
        }
    }
    run_pv(pl, sc, M, S, cols, runs, nruns, vrow, O, 0);
    for (int i = 0; i < M; i++)
        nsa__vscale(O + (size_t)i * pl->dp, pl->dp, sc->inv[i]);
}

// Masks columns of row `srow` outside positions [lo, hi) of the run.
static void mask_run(float *srow, const key_run *run, int lo, int hi)
{
    int a = lo - run->pos0, z = hi - run->pos0, n = 8 * run->np;
    if (z < 0)
        z = 0;
    if (a > n)
        a = n;
    if (z > n)
        z = n;
    if (a < 0)
        a = 0;
    if (z < a)
        z = a;
    fill(srow + run->col0, a, -INFINITY);
    fill(srow + run->col0 + z, n - z, -INFINITY);
}

// ---------------------------------------------------------------------------------------
// The paths of one tile: queries t0 .. t0+nq-1 of unit (b, g); rows r = qi*hpg + head.
// Each path has a "scores + mask" step shared by forward and backward.

typedef struct tile {
    int b, g, t0, nq, Mr, M;
} tile;

// Compressed path, rows [r0, r0+m) (m a multiple of 4): scores masked in S (cols wide).
static void cmp_scores(const plan *pl, const unit_pack *pk, const tile *tl, const float *A,
                       int r0, int m, float *S, int cols, key_run *run)
{
    const nsa__attn_dims *dm = pl->dm;
    *run = (key_run){0, 0, cols / 8, -1};
    run_scores(pl, m, A + (size_t)r0 * pl->dp, run, 1, pk->kct, S, cols);
    for (int i = 0; i < m; i++) {
        int r = r0 + i;
        if (r >= tl->Mr)
            continue;
        int nc = visible_compressed(dm, tl->t0 + r / pl->hpg);
        fill(S + (size_t)i * cols + nc, cols - nc, -INFINITY);
    }
}

// Rows of the tile the compressed path takes at once: as many as keep the score block
// within L2 (~384 KiB of a core's 512), but at least 16, so that each panel of compressed
// keys serves many rows (8-row chunks streamed Kc from L3 once per 8 rows: 2x slower at
// T = 64k; the whole 68-row tile spilled S out of L2).

static int cmp_chunk_rows(const plan *pl, const tile *tl, int cols)
{
    (void)pl;
    int rc = (CMP_S_FLOATS / cols) & ~3;
    if (rc < 16)
        rc = 16;
    return rc < tl->M ? rc : tl->M;
}

static void cmp_forward(const plan *pl, const unit_pack *pk, scratch *sc, const tile *tl)
{
    const nsa__attn_dims *dm = pl->dm;
    const int dp = pl->dp, hpg = pl->hpg;
    int nc_last = visible_compressed(dm, tl->t0 + tl->nq - 1);
    if (nc_last == 0) {
        memset(sc->o[0], 0, sizeof(float) * (size_t)tl->M * dp);
        for (int r = 0; r < tl->Mr; r++)
            sc->lse[r * 3] = -INFINITY;
        return;
    }
    int cols = nsa__round8(nc_last), rc = cmp_chunk_rows(pl, tl, cols);
    key_run run;
    for (int r0 = 0; r0 < tl->M; r0 += rc) {
        int m = imin(rc, tl->M - r0);
        cmp_scores(pl, pk, tl, sc->qs, r0, m, sc->s, cols, &run);
        finish_rows(pl, sc, m, imax(0, imin(m, tl->Mr - r0)), sc->s, cols, &run, 1, pk->vcrow,
                    sc->o[0] + (size_t)r0 * dp, sc->lse + (size_t)r0 * 3);
        if (!pl->cmp_attn)
            continue;
        // block scores (SPEC §3.2 cmp_attn): p of token j goes to every block its span
        // [j*r, j*r + l) overlaps; the group's heads add up (into psum first, in head
        // order), then each block sums its tokens in token order. (Scattering token by
        // token into the blocks chained every add through memory: ~1 CPU s at 64k.)
        float *psum = sc->kpart_big;
        for (int qi = r0 / hpg; qi * hpg < r0 + m && qi < tl->nq; qi++) {
            int nc = visible_compressed(dm, tl->t0 + qi);
            memset(psum, 0, sizeof(float) * (size_t)nsa__round8(nc));
            for (int hh = 0; hh < hpg; hh++) {
                int i = qi * hpg + hh - r0;
                if (i < 0 || i >= m)
                    continue;
                nsa__vaxpy(psum, sc->inv[i], sc->s + (size_t)i * cols, nc);
            }
            float *bs = sc->bscore + (size_t)qi * pl->nbp;
            int num_cand = (tl->t0 + qi) / dm->block_size + 1;
            for (int blk = 0; blk < num_cand; blk++) {
                int hi = imin(pk->blk_tok_hi[blk], nc);
                float sum = bs[blk];
                for (int j = pk->blk_tok_lo[blk]; j < hi; j++)
                    sum += psum[j];
                bs[blk] = sum;
            }
        }
    }
}

// mean_key scores of the tile's queries into bscore: full blocks by one product of the
// head-summed queries with the block sums, the block holding t from its own keys.
static void mean_key_scores(const plan *pl, const unit_pack *pk, scratch *sc, const tile *tl,
                            const float *q, const float *k)
{
    const nsa__attn_dims *dm = pl->dm;
    const int d = dm->d, dp = pl->dp, hpg = pl->hpg, bs = dm->block_size, T = dm->T;
    const int Mq = nsa__round4(tl->nq);
    for (int qi = 0; qi < Mq; qi++) {
        float *row = sc->qsum + (size_t)qi * dp;
        memset(row, 0, sizeof(float) * (size_t)dp);
        if (qi >= tl->nq)
            continue;
        const float *qr = q + (qrow(pl, tl->b, tl->t0 + qi) * dm->H + (size_t)tl->g * hpg) * d;
        for (int hh = 0; hh < hpg; hh++)
            for (int c = 0; c < d; c++)
                row[c] += qr[(size_t)hh * d + c];
    }
    int nfull_tile = imin(pl->nfull, (tl->t0 + tl->nq) / bs);
    int cols = nsa__round8(nfull_tile);
    if (cols > 0)
        nsa__gemm_panels_contig(Mq, dp, sc->qsum, dp, pk->ksumt, 8 * dp, cols / 8, sc->s, cols);
    const ptrdiff_t stride = (ptrdiff_t)dm->G * d;
    const float *kb = k + ((size_t)tl->b * T * dm->G + tl->g) * d;
    for (int qi = 0; qi < tl->nq; qi++) {
        int t = tl->t0 + qi, num_cand = t / bs + 1;
        float *score = sc->bscore + (size_t)qi * pl->nbp;
        const float *srow = sc->s + (size_t)qi * cols;
        for (int i = 0; i < num_cand; i++) {
            if ((i + 1) * bs - 1 <= t) {
                score[i] = srow[i] / (float)bs;
            } else {
                memset(sc->kpart, 0, sizeof(float) * (size_t)d);
                for (int s = i * bs; s <= t; s++)
                    for (int c = 0; c < d; c++)
                        sc->kpart[c] += kb[s * stride + c];
                float dot = 0.0f;
                for (int c = 0; c < d; c++)
                    dot += sc->qsum[(size_t)qi * dp + c] * sc->kpart[c];
                score[i] = dot / (float)(t - i * bs + 1);
            }
        }
    }
}

// The selection of the tile's queries into sc->sel (and idx).
static void select_tile(const plan *pl, const unit_pack *pk, scratch *sc, const tile *tl,
                        const float *q, const float *k, const int32_t *given_idx, int32_t *idx)
{
    const nsa__attn_dims *dm = pl->dm;
    const int n = dm->num_selected, G = dm->G;
    if (pl->mean_key)
        mean_key_scores(pl, pk, sc, tl, q, k);
    for (int qi = 0; qi < tl->nq; qi++) {
        int t = tl->t0 + qi;
        size_t off = (qrow(pl, tl->b, t) * G + tl->g) * n;
        int32_t *sel = sc->sel + (size_t)qi * n;
        if (given_idx)
            memcpy(sel, given_idx + off, sizeof(int32_t) * (size_t)n);
        else
            nsa__select_blocks(sc->bscore + (size_t)qi * pl->nbp, t / dm->block_size + 1, n,
                          dm->select_fixed == NSA_SELECT_FIXED_PAPER, sel, sc->top);
        if (idx)
            memcpy(idx + off, sel, sizeof(int32_t) * (size_t)n);
    }
}

// Run of block blk for a query tile ending at t_last.
static key_run block_run(const plan *pl, int blk, int t_last, int col0)
{
    const int bs = pl->dm->block_size;
    int start = blk * bs, end = imin((blk + 1) * bs, t_last + 1);
    int pos0 = start & ~7;
    return (key_run){col0, pos0, (end - pos0 + 7) / 8, blk};
}

// The selected path's plan for a tile: union of the tile's blocks (returns 1, runs in
// sc->runs, membership in sc->inq) or one query at a time (returns 0).
static int slc_plan_union(const plan *pl, scratch *sc, const tile *tl, int *nruns_out,
                          int *cols_out)
{
    const nsa__attn_dims *dm = pl->dm;
    const int n = dm->num_selected, bs = dm->block_size;
    int nu = 0;
    long per_query = 0;
    for (int qi = 0; qi < tl->nq; qi++) {
        int t = tl->t0 + qi;
        const int32_t *sel = sc->sel + (size_t)qi * n;
        for (int i = 0; i < n; i++) {
            int blk = sel[i];
            if (blk < 0 || blk * bs > t)
                continue;
            key_run r = block_run(pl, blk, t, 0);
            per_query += 8L * r.np;
            if (sc->umap[blk] < 0) {
                sc->umap[blk] = nu;
                sc->ublk[nu++] = blk;
            }
        }
    }
    // ascending blocks (insertion sort: a tile holds few)
    for (int i = 1; i < nu; i++) {
        int v = sc->ublk[i], j = i;
        while (j > 0 && sc->ublk[j - 1] > v) {
            sc->ublk[j] = sc->ublk[j - 1];
            j--;
        }
        sc->ublk[j] = v;
    }
    int cols = 0, t_last = tl->t0 + tl->nq - 1;
    for (int u = 0; u < nu; u++) {
        sc->runs[u] = block_run(pl, sc->ublk[u], t_last, cols);
        cols += 8 * sc->runs[u].np;
        sc->umap[sc->ublk[u]] = u;
    }
    long union_cost = (long)tl->M * cols;
    long query_cost = (long)nsa__round4(pl->hpg) * per_query;
    int use_union = nu > 0 && union_cost <= query_cost && (size_t)union_cost <= pl->s_floats;
    if (use_union) {
        memset(sc->inq, 0, (size_t)tl->nq * nu);
        for (int qi = 0; qi < tl->nq; qi++) {
            const int32_t *sel = sc->sel + (size_t)qi * n;
            for (int i = 0; i < n; i++)
                if (sel[i] >= 0 && sel[i] * bs <= tl->t0 + qi)
                    sc->inq[(size_t)qi * nu + sc->umap[sel[i]]] = 1;
        }
    }
    for (int u = 0; u < nu; u++)
        sc->umap[sc->ublk[u]] = -1;
    *nruns_out = nu;
    *cols_out = cols;
    return use_union;
}

// Masks rows [r0, r0+m) of S (rows of the tile) for the union runs.
static void slc_mask_union(const plan *pl, scratch *sc, const tile *tl, float *S, int cols,
                           int nruns)
{
    const int bs = pl->dm->block_size;
    for (int r = 0; r < tl->Mr; r++) {
        int qi = r / pl->hpg, t = tl->t0 + qi;
        float *srow = S + (size_t)r * cols;
        for (int u = 0; u < nruns; u++) {
            const key_run *run = &sc->runs[u];
            if (!sc->inq[(size_t)qi * nruns + u])
                fill(srow + run->col0, 8 * run->np, -INFINITY);
            else
                mask_run(srow, run, run->blk * bs, imin((run->blk + 1) * bs, t + 1));
        }
    }
}

// Runs of query qi's own blocks (in its slot order); returns the count.
static int slc_query_runs(const plan *pl, scratch *sc, const tile *tl, int qi, int *cols_out)
{
    const nsa__attn_dims *dm = pl->dm;
    const int n = dm->num_selected, t = tl->t0 + qi;
    const int32_t *sel = sc->sel + (size_t)qi * n;
    int nr = 0, cols = 0;
    for (int i = 0; i < n; i++) {
        int blk = sel[i];
        if (blk < 0 || blk * dm->block_size > t)
            continue;
        sc->runs[nr] = block_run(pl, blk, t, cols);
        cols += 8 * sc->runs[nr++].np;
    }
    *cols_out = cols;
    return nr;
}

static void slc_mask_query(const plan *pl, scratch *sc, int t, float *S, int cols, int nr,
                           int rows)
{
    const int bs = pl->dm->block_size;
    for (int i = 0; i < rows; i++)
        for (int u = 0; u < nr; u++) {
            const key_run *run = &sc->runs[u];
            mask_run(S + (size_t)i * cols, run, run->blk * bs, imin((run->blk + 1) * bs, t + 1));
        }
}

// Prefetches (into L2) the rows of x [positions][dp] of query qi's selected blocks: the
// blocks are scattered over the whole sequence, so without it each block starts with a
// run of cache misses to memory (the path was load-latency bound at T = 32k).
static void prefetch_query_blocks(const plan *pl, const scratch *sc, const tile *tl, int qi,
                                  const float *x)
{
#if defined(__GNUC__)
    if (qi >= tl->nq)
        return;
    const nsa__attn_dims *dm = pl->dm;
    const int n = dm->num_selected, bs = dm->block_size, t = tl->t0 + qi;
    const int32_t *sel = sc->sel + (size_t)qi * n;
    for (int i = 0; i < n; i++) {
        if (sel[i] < 0 || sel[i] * bs > t)
            continue;
        int start = (sel[i] * bs) & ~7, end = imin((sel[i] + 1) * bs, t + 1);
        const char *p = (const char *)(x + (size_t)start * pl->dp);
        const char *e = (const char *)(x + (size_t)end * pl->dp);
        for (; p < e; p += 64)
            __builtin_prefetch(p, 0, 2);
    }
#else
    (void)pl, (void)sc, (void)tl, (void)qi, (void)x;
#endif
}

static void slc_forward(const plan *pl, const unit_pack *pk, scratch *sc, const tile *tl)
{
    const int dp = pl->dp, hpg = pl->hpg;
    int nr, cols;
    if (slc_plan_union(pl, sc, tl, &nr, &cols)) {
        run_scores(pl, tl->M, sc->qs, sc->runs, nr, pk->kt, sc->s, cols);
        slc_mask_union(pl, sc, tl, sc->s, cols, nr);
        finish_rows(pl, sc, tl->M, tl->Mr, sc->s, cols, sc->runs, nr, pk->vrow, sc->o[1],
                    sc->lse + 1);
        return;
    }
    const int M = nsa__round4(hpg);
    prefetch_query_blocks(pl, sc, tl, 0, pk->kt);
    for (int qi = 0; qi < tl->nq; qi++) {
        int r0 = qi * hpg;
        prefetch_query_blocks(pl, sc, tl, qi, pk->vrow);
        prefetch_query_blocks(pl, sc, tl, qi + 1, pk->kt);
        nr = slc_query_runs(pl, sc, tl, qi, &cols);
        if (nr == 0) { // no key: o = 0
            memset(sc->o[1] + (size_t)r0 * dp, 0, sizeof(float) * (size_t)hpg * dp);
            for (int i = 0; i < hpg; i++)
                sc->lse[(r0 + i) * 3 + 1] = -INFINITY;
            continue;
        }
        run_scores(pl, M, sc->qs + (size_t)r0 * dp, sc->runs, nr, pk->kt, sc->s, cols);
        slc_mask_query(pl, sc, tl->t0 + qi, sc->s, cols, nr, hpg);
        // rows past this query's heads belong to the next query (or are padding): their
        // outputs are overwritten when that query comes
        finish_rows(pl, sc, M, hpg, sc->s, cols, sc->runs, nr, pk->vrow,
                    sc->o[1] + (size_t)r0 * dp, sc->lse + (size_t)r0 * 3 + 1);
    }
}

// Window sub-tile [qa, qb) of the tile: its run and masked scores.
static void win_scores(const plan *pl, const unit_pack *pk, const tile *tl, const float *A,
                       int qa, int qb, float *S, key_run *run, int *cols_out)
{
    const nsa__attn_dims *dm = pl->dm;
    const int hpg = pl->hpg, w = dm->window;
    int ta = tl->t0 + qa, tb = tl->t0 + qb - 1;
    int pos0 = imax(0, ta - w + 1) & ~7;
    *run = (key_run){0, pos0, (tb + 1 - pos0 + 7) / 8, -1};
    int cols = 8 * run->np, M = nsa__round4((qb - qa) * hpg);
    run_scores(pl, M, A + (size_t)qa * hpg * pl->dp, run, 1, pk->kt, S, cols);
    for (int i = 0; i < (qb - qa) * hpg; i++) {
        int t = ta + i / hpg;
        mask_run(S + (size_t)i * cols, run, imax(0, t - w + 1), t + 1);
    }
    *cols_out = cols;
}

static void win_forward(const plan *pl, const unit_pack *pk, scratch *sc, const tile *tl)
{
    const int hpg = pl->hpg, dp = pl->dp;
    for (int qa = 0; qa < tl->nq; qa += pl->Tw) {
        int qb = imin(tl->nq, qa + pl->Tw), cols;
        key_run run;
        win_scores(pl, pk, tl, sc->qs, qa, qb, sc->s, &run, &cols);
        int r0 = qa * hpg;
        finish_rows(pl, sc, nsa__round4((qb - qa) * hpg), (qb - qa) * hpg, sc->s, cols, &run, 1,
                    pk->vrow, sc->o[2] + (size_t)r0 * dp, sc->lse + (size_t)r0 * 3 + 2);
    }
}

// Scaled queries of the tile into sc->qs (rows past Mr zero).
static void load_rows(const plan *pl, const tile *tl, const float *x, float *dst, float alpha)
{
    const nsa__attn_dims *dm = pl->dm;
    const int d = dm->d;
    const float *base = x + (qrow(pl, tl->b, tl->t0) * dm->H + (size_t)tl->g * pl->hpg) * d;
    // row r = qi*hpg + hh lives at base + qi*H*d + hh*d
    for (int qi = 0; qi < tl->nq; qi++)
        nsa__pack_rows(dst + (size_t)qi * pl->hpg * pl->dp, base + (size_t)qi * dm->H * d, d, d,
                       pl->dp, 0, pl->hpg, pl->hpg, alpha);
    memset(dst + (size_t)tl->Mr * pl->dp, 0,
           sizeof(float) * (size_t)(pl->rows_pad - tl->Mr) * pl->dp);
}

static void tile_init(const plan *pl, tile *tl, int b, int g, int it)
{
    tl->b = b;
    tl->g = g;
    tl->t0 = pl->q_start + it * pl->Tq;
    tl->nq = imin(pl->Tq, pl->dm->T - tl->t0);
    tl->Mr = tl->nq * pl->hpg;
    tl->M = nsa__round4(tl->Mr);
}

// ---------------------------------------------------------------------------------------
// Forward

static void tile_forward(const plan *pl, const unit_pack *pk, scratch *sc, const tile *tl,
                         const float *q, const float *k, const float *gates,
                         const int32_t *given_idx, int32_t *idx, float *out, float *o_paths,
                         float *lse)
{
    const nsa__attn_dims *dm = pl->dm;
    const int d = dm->d, dp = pl->dp, hpg = pl->hpg, H = dm->H;
    load_rows(pl, tl, q, sc->qs, dm->scale);
    if (pl->cmp_attn)
        for (int qi = 0; qi < tl->nq; qi++)
            memset(sc->bscore + (size_t)qi * pl->nbp, 0,
                   sizeof(float) * (size_t)((tl->t0 + qi) / dm->block_size + 1));
    lap(sc, NSA_PHASE_OTHER);
    cmp_forward(pl, pk, sc, tl);
    lap(sc, NSA_PHASE_CMP);
    select_tile(pl, pk, sc, tl, q, k, given_idx, idx);
    lap(sc, NSA_PHASE_SELECT);
    if (pl->slc_blocks) { // done per block after the tiles; gated in by slc_forward_merge
        memset(sc->o[1], 0, sizeof(float) * (size_t)tl->M * dp);
        for (int r = 0; r < tl->Mr; r++)
            sc->lse[r * 3 + 1] = 0.0f;
    } else {
        slc_forward(pl, pk, sc, tl);
    }
    lap(sc, NSA_PHASE_SLC);
    win_forward(pl, pk, sc, tl);
    lap(sc, NSA_PHASE_WIN);
    const size_t path_size = (size_t)dm->B * pl->Tr * H * d;
    for (int r = 0; r < tl->Mr; r++) {
        int t = tl->t0 + r / hpg, h = tl->g * hpg + r % hpg;
        size_t row = qrow(pl, tl->b, t) * H + h;
        const float *o0 = sc->o[0] + (size_t)r * dp, *o1 = sc->o[1] + (size_t)r * dp;
        const float *o2 = sc->o[2] + (size_t)r * dp, *gt = gates + row * 3;
        float *orow = out + row * d;
        for (int c = 0; c < d; c++)
            orow[c] = gt[0] * o0[c] + gt[1] * o1[c] + gt[2] * o2[c];
        if (o_paths)
            for (int p = 0; p < 3; p++)
                memcpy(o_paths + p * path_size + row * d, sc->o[p] + (size_t)r * dp,
                       sizeof(float) * (size_t)d);
        if (lse)
            memcpy(lse + row * 3, sc->lse + (size_t)r * 3, 3 * sizeof(float));
    }
    lap(sc, NSA_PHASE_OTHER);
}

static void profile_add(nsa__attn_profile *prof, const scratch *sc)
{
    if (!prof)
        return;
#pragma omp critical(nsa_attn_profile)
    {
        for (int i = 0; i < NSA_PHASE_COUNT; i++)
            prof->seconds[i] += sc->t[i];
        prof->wait += sc->wait;
    }
}

// ---------------------------------------------------------------------------------------
// Selected path, key-centric (the backward always; the forward on long sequences). Query
// by query, each (query, block) pair reads the block's packed keys (32 KiB forward, 48 KiB
// and a 32 KiB read-modify-write of key gradients backward) for a 4-row product: once the
// keys outgrow the caches that is memory-bound (35 GFLOP/s at T = 64k, BENCHMARKS.md).
// Instead the queries are cut into sub-ranges whose rows stay in cache (~2 MiB per thread;
// their q, and backward their gated dO, D and lse, copied once into compact arrays), and
// a thread takes whole sub-ranges; within one it goes block by block, gathering the
// queries that selected the block (an inverse index of the selection), so a block's keys
// serve ~qch queries at once. Rows belong to one thread: no merging; key gradients go to
// the thread's accumulators as elsewhere.

// Deals the key-centric sub-ranges of the backward to the threads: largest first, each to
// the thread with the least work so far, by the work estimated per query (its selected
// keys, min(t + 1, n*b), plus a fixed cost per selected block for the gathers). A fixed
// deal keeps the key-gradient sums independent of timing; contiguous halves of the
// queries (or a plain interleave) left one thread idle for a third of the path at T = 1k,
// where early queries select few keys.
static void slc_deal(const plan *pl, int nsub, int nth, int *owner, double *load)
{
    const nsa__attn_dims *dm = pl->dm;
    const int bs = dm->block_size, n = dm->num_selected;
    const long cap = (long)n * bs;
    for (int th = 0; th < nth; th++)
        load[th] = 0.0;
    for (int j = nsub - 1; j >= 0; j--) {
        int s0 = j * pl->sub_range, s1 = imin(dm->T, s0 + pl->sub_range);
        double cost = 0.0;
        for (int t = s0; t < s1; t++)
            cost += (double)((t + 1 < cap ? t + 1 : cap) + 16L * imin(t / bs + 1, n));
        int best = 0;
        for (int th = 1; th < nth; th++)
            if (load[th] < load[best])
                best = th;
        owner[j] = best;
        load[best] += cost;
    }
}

// The queries of positions [s0, s1) that selected block i: list[start[i] .. start[i+1]),
// ascending.
static void slc_index_build(const plan *pl, int *start, int *list, const int32_t *idx, int b,
                            int g, int s0, int s1)
{
    const nsa__attn_dims *dm = pl->dm;
    const int n = dm->num_selected, bs = dm->block_size, nb = pl->nb;
    memset(start, 0, sizeof(int) * (size_t)(nb + 2));
    for (int t = s0; t < s1; t++) {
        const int32_t *sel = idx + (((size_t)b * dm->T + t) * dm->G + g) * n;
        for (int i = 0; i < n; i++)
            if (sel[i] >= 0 && sel[i] * bs <= t)
                start[sel[i] + 2]++;
    }
    for (int i = 0; i < nb; i++)
        start[i + 2] += start[i + 1];
    // start[i + 1] is now where block i's list begins; filling moves it to its end, which
    // is where block i + 1 begins: start[i] then reads as block i's beginning
    for (int t = s0; t < s1; t++) {
        const int32_t *sel = idx + (((size_t)b * dm->T + t) * dm->G + g) * n;
        for (int i = 0; i < n; i++)
            if (sel[i] >= 0 && sel[i] * bs <= t)
                list[start[sel[i] + 1]++] = t;
    }
}

// The scaled q rows of the sub-range [s0, s1) of unit (b, g) into sc->q_sub, in order: the
// chunks then gather their rows from a compact array that stays in cache (each query is
// gathered once per selected block; from the [B,T,H,d] array that missed the caches).
static void load_sub_q(const plan *pl, scratch *sc, const float *q, int b, int g, int s0, int s1)
{
    const nsa__attn_dims *dm = pl->dm;
    const int d = dm->d, dp = pl->dp, hpg = pl->hpg;
    for (int t = s0; t < s1; t++) {
        size_t row0 = ((size_t)b * dm->T + t) * dm->H + (size_t)g * hpg;
        nsa__pack_rows(sc->q_sub + (size_t)(t - s0) * hpg * dp, q + row0 * d, d, d, dp, 0, hpg,
                       hpg, dm->scale);
    }
}

// q rows of the chunk's queries ts[0..nqc) (of the sub-range from s0) into sc->qg (rows
// up to M zero).
static void gather_q(const plan *pl, scratch *sc, const int *ts, int s0, int nqc, int M)
{
    const size_t rows = (size_t)pl->hpg * pl->dp;
    for (int j = 0; j < nqc; j++)
        memcpy(sc->qg + (size_t)j * rows, sc->q_sub + (size_t)(ts[j] - s0) * rows,
               sizeof(float) * rows);
    memset(sc->qg + (size_t)nqc * rows, 0, sizeof(float) * (size_t)(M - nqc * pl->hpg) * pl->dp);
}

// Forward of the selected path for the queries [t_lo, t_hi) of unit (b, g): o_slc gated
// into out (+=), o_paths[1] and lse[.., 1] written.
static void slc_forward_range(const plan *pl, const unit_pack *pk, scratch *sc, int b, int g,
                              int t_lo, int t_hi, const float *q, const int32_t *idx,
                              const float *gates, float *out, float *o_paths, float *lse)
{
    const nsa__attn_dims *dm = pl->dm;
    const int d = dm->d, dp = pl->dp, hpg = pl->hpg, H = dm->H, T = dm->T, bs = dm->block_size;
    const size_t path_size = (size_t)dm->B * T * H * d;
    for (int s0 = t_lo; s0 < t_hi; s0 += pl->sub_range) {
        int s1 = imin(t_hi, s0 + pl->sub_range);
        size_t rows = (size_t)(s1 - s0) * hpg;
        slc_index_build(pl, sc->ix_start, sc->ix_list, idx, b, g, s0, s1);
        load_sub_q(pl, sc, q, b, g, s0, s1);
        memset(sc->o_acc, 0, rows * dp * sizeof(float));
        memset(sc->l_acc, 0, rows * sizeof(float));
        fill(sc->m_acc, (int)rows, -INFINITY);
        for (int blk = 0; blk < pl->nb; blk++) {
            int count = sc->ix_start[blk + 1] - sc->ix_start[blk];
            if (count == 0)
                continue;
            key_run run = block_run(pl, blk, T - 1, 0);
            int cols = 8 * run.np;
            for (int c0 = 0; c0 < count; c0 += pl->qch) {
                int nqc = imin(pl->qch, count - c0), Mr = nqc * hpg, M = nsa__round4(Mr);
                const int *ts = sc->ix_list + sc->ix_start[blk] + c0;
                gather_q(pl, sc, ts, s0, nqc, M);
                float *S = sc->s;
                run_scores(pl, M, sc->qg, &run, 1, pk->kt, S, cols);
                for (int r = 0; r < M; r++) {
                    float *srow = S + (size_t)r * cols;
                    if (r >= Mr) {
                        memset(srow, 0, sizeof(float) * (size_t)cols);
                        continue;
                    }
                    int t = ts[r / hpg];
                    size_t R = (size_t)(t - s0) * hpg + r % hpg;
                    mask_run(srow, &run, blk * bs, imin((blk + 1) * bs, t + 1));
                    float mx = nsa__vmax(srow, cols); // finite: the block holds a key <= t
                    float m_old = sc->m_acc[R], m_new = mx > m_old ? mx : m_old;
                    float alpha = m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
                    float sum = nsa__vexp_sum(srow, cols, m_new);
                    sc->l_acc[R] = sc->l_acc[R] * alpha + sum;
                    sc->m_acc[R] = m_new;
                    sc->lg[r] = alpha;
                }
                nsa__seg seg = {pk->vrow + (size_t)run.pos0 * dp, cols};
                nsa__gemm_rows(M, dp, S, cols, 1, &seg, 1, dp, sc->dqg, dp, 0);
                for (int r = 0; r < Mr; r++) {
                    float *o = sc->o_acc + ((size_t)(ts[r / hpg] - s0) * hpg + r % hpg) * dp;
                    if (sc->lg[r] != 1.0f)
                        nsa__vscale(o, dp, sc->lg[r]);
                    nsa__vadd(o, sc->dqg + (size_t)r * dp, dp);
                }
            }
        }
        for (int t = s0; t < s1; t++)
            for (int hh = 0; hh < hpg; hh++) {
                size_t R = (size_t)(t - s0) * hpg + hh;
                size_t row = ((size_t)b * T + t) * H + (size_t)g * hpg + hh;
                float *o = sc->o_acc + R * dp, m = sc->m_acc[R], l = sc->l_acc[R];
                nsa__vscale(o, dp, l > 0.0f ? 1.0f / l : 0.0f);
                nsa__vaxpy(out + row * d, gates[row * 3 + 1], o, d);
                if (o_paths)
                    memcpy(o_paths + path_size + row * d, o, sizeof(float) * (size_t)d);
                if (lse)
                    lse[row * 3 + 1] = m == -INFINITY ? -INFINITY : m + logf(l);
            }
    }
}

nsa_status nsa__cpu_attn_forward_ex(nsa_context *ctx, const nsa__attn_dims *dm, const float *q,
                                    const float *k, const float *v, const float *kc,
                                    const float *vc, const float *gates,
                                    const int32_t *given_idx, int32_t *idx, float *out,
                                    float *o_paths, float *lse, nsa__attn_profile *prof)
{
    (void)ctx;
    double t_start = omp_get_wtime();
    if (prof)
        memset(prof, 0, sizeof *prof);
    plan pl;
    plan_init(&pl, dm, omp_get_max_threads(), given_idx == NULL);
    if (!idx) // the key-centric selected path reads the selection back
        pl.slc_blocks = 0;
    unit_pack pk;
    float *pack = pack_alloc(&pl, &pk, 0);
    if (!pack)
        return nsa__error(NSA_ERR_NOMEM, "out of memory for attention packing buffers");
    int failed = 0;
    const int nsub = (dm->T + pl.sub_range - 1) / pl.sub_range; // key-centric sub-ranges
#pragma omp parallel
    {
        scratch sc;
        char *mem = scratch_alloc(&pl, &sc, 0);
        if (!mem) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        sc.profiling = prof != NULL;
        sc.lap = sc.profiling ? thread_seconds() : 0.0;
        for (int unit = 0; unit < dm->B * dm->G && !failed; unit++) {
            int b = unit / dm->G, g = unit % dm->G;
            pack_unit(&pl, &pk, k, v, kc, vc, b, g, 0);
            sync_threads(&sc, NSA_PHASE_PACK);
            // largest (latest) tiles first: the compressed path grows with t
#pragma omp for schedule(dynamic, 1) nowait
            for (int it = 0; it < pl.ntiles; it++) {
                tile tl;
                tile_init(&pl, &tl, b, g, pl.ntiles - 1 - it);
                tile_forward(&pl, &pk, &sc, &tl, q, k, gates, given_idx, idx, out, o_paths, lse);
            }
            sync_threads(&sc, NSA_PHASE_OTHER);
            if (!pl.slc_blocks)
                continue;
            // the selection of the whole unit is known: the selected path per block, by
            // sub-ranges of queries dealt as they come, latest first (each query's rows are
            // computed by one thread, so the result does not depend on the deal)
#pragma omp for schedule(dynamic, 1) nowait
            for (int j = 0; j < nsub; j++) {
                int s0 = (nsub - 1 - j) * pl.sub_range, s1 = imin(dm->T, s0 + pl.sub_range);
                slc_forward_range(&pl, &pk, &sc, b, g, s0, s1, q, idx, gates, out, o_paths, lse);
            }
            sync_threads(&sc, NSA_PHASE_SLC);
        }
        if (mem)
            profile_add(prof, &sc);
        free(mem);
    }
    free(pack);
    if (failed)
        return nsa__error(NSA_ERR_NOMEM, "out of memory for attention scratch buffers");
    if (prof)
        prof->wall = omp_get_wtime() - t_start;
    return NSA_OK;
}

nsa_status nsa__cpu_attn_forward(nsa_context *ctx, const nsa__attn_dims *dm, const float *q,
                                 const float *k, const float *v, const float *kc, const float *vc,
                                 const float *gates, const int32_t *given_idx, int32_t *idx,
                                 float *out, float *o_paths, float *lse)
{
    return nsa__cpu_attn_forward_ex(ctx, dm, q, k, v, kc, vc, gates, given_idx, idx, out, o_paths,
                                    lse, NULL);
}

// ---------------------------------------------------------------------------------------
// Backward

// Backward of rows [0, M) (Mr real) of one path over its runs, S holding the masked
// scores: P = exp(S - lse), dP = dO V^T, dS = P (dP - D); dq += dS K, dk += dS^T Q,
// dv += P^T dO (dk, dv indexed by position). lse, D: the rows' values at stride 3.
static void bwd_rows(const plan *pl, scratch *sc, int M, int Mr, const float *A,
                     const float *dO, const float *lse, const float *D, float *S, float *dP,
                     int cols, const key_run *runs, int nruns, const float *vt,
                     const float *krow, float *dq, float *dk, float *dv)
{
    const int dp = pl->dp;
    for (int i = 0; i < M; i++) {
        float *srow = S + (size_t)i * cols;
        if (i < Mr && lse[i * 3] != -INFINITY)
            nsa__vexp(srow, cols, lse[i * 3]);
        else
            memset(srow, 0, sizeof(float) * (size_t)cols);
    }
    run_scores(pl, M, dO, runs, nruns, vt, dP, cols);
    for (int i = 0; i < M; i++)
        nsa__vdsoftmax(dP + (size_t)i * cols, S + (size_t)i * cols, cols, i < Mr ? D[i * 3] : 0.0f);
    // dq += dS K
    for (int r = 0; r < nruns; r++) {
        sc->segs[r].b = krow + (size_t)runs[r].pos0 * dp;
        sc->segs[r].k = 8 * runs[r].np;
    }
    nsa__gemm_rows(M, dp, dP, cols, 1, sc->segs, nruns, dp, dq, dp, 1);
    // dk += dS^T Q, dv += P^T dO: 4 keys at a time, the k of the product running over rows
    for (int r = 0; r < nruns; r++) {
        const key_run *run = &runs[r];
        for (int kk = 0; kk < 8 * run->np; kk += NSA_MR) {
            int col = run->col0 + kk;
            size_t pos = (size_t)run->pos0 + kk;
            for (int n0 = 0; n0 < dp; n0 += 24) {
                int nv = (dp - n0) / 8 < 3 ? (dp - n0) / 8 : 3;
                nsa__seg qa = {A + n0, Mr}, da = {dO + n0, Mr};
                nsa__mk_rows(nv, &qa, 1, dp, dP + col, 1, cols, dk + pos * dp + n0, dp, 1);
                nsa__mk_rows(nv, &da, 1, dp, S + col, 1, cols, dv + pos * dp + n0, dp, 1);
            }
        }
    }
}

static void tile_backward(const plan *pl, const unit_pack *pk, scratch *sc, const tile *tl,
                          const float *q, const float *gates, const int32_t *idx,
                          const float *o_paths, const float *lse, const float *dout, float *dq,
                          float *dgates)
{
    const nsa__attn_dims *dm = pl->dm;
    const int d = dm->d, dp = pl->dp, hpg = pl->hpg, H = dm->H, T = dm->T;
    const size_t path_size = (size_t)dm->B * T * H * d;
    load_rows(pl, tl, q, sc->qs, dm->scale);
    load_rows(pl, tl, dout, sc->dout, 1.0f);
    memset(sc->dq, 0, sizeof(float) * (size_t)pl->rows_pad * dp);
    for (int c = 0; c < 3; c++)
        memset(sc->dop[c], 0, sizeof(float) * (size_t)pl->rows_pad * dp);
    for (int r = 0; r < tl->Mr; r++) {
        int t = tl->t0 + r / hpg, h = tl->g * hpg + r % hpg;
        size_t row = ((size_t)tl->b * T + t) * H + h;
        const float *dor = sc->dout + (size_t)r * dp;
        for (int c = 0; c < 3; c++) {
            const float *o = o_paths + c * path_size + row * d;
            float gate = gates[row * 3 + c];
            float *dop = sc->dop[c] + (size_t)r * dp;
            dgates[row * 3 + c] = nsa__vdot(dor, o, d);
            for (int i = 0; i < d; i++)
                dop[i] = gate * dor[i];
            sc->D[r * 3 + c] = nsa__vdot(dop, o, d);
            sc->lse[r * 3 + c] = lse[row * 3 + c];
        }
    }
    lap(sc, NSA_PHASE_OTHER);

    // compressed path
    int nc_last = visible_compressed(dm, tl->t0 + tl->nq - 1);
    if (nc_last > 0) {
        int cols = nsa__round8(nc_last), rc = cmp_chunk_rows(pl, tl, cols);
        key_run run;
        for (int r0 = 0; r0 < tl->M; r0 += rc) {
            int m = imin(rc, tl->M - r0);
            cmp_scores(pl, pk, tl, sc->qs, r0, m, sc->s, cols, &run);
            bwd_rows(pl, sc, m, imax(0, imin(m, tl->Mr - r0)), sc->qs + (size_t)r0 * dp,
                     sc->dop[0] + (size_t)r0 * dp, sc->lse + (size_t)r0 * 3,
                     sc->D + (size_t)r0 * 3, sc->s, sc->s2, cols, &run, 1, pk->vct, pk->kcrow,
                     sc->dq + (size_t)r0 * dp, sc->dkc, sc->dvc);
        }
    }
    lap(sc, NSA_PHASE_CMP);

    // the selected path is done key-centric, after the tiles (slc_backward_blocks)
    int cols;

    // window
    for (int qa = 0; qa < tl->nq; qa += pl->Tw) {
        int qb = imin(tl->nq, qa + pl->Tw), r0 = qa * hpg;
        key_run run;
        win_scores(pl, pk, tl, sc->qs, qa, qb, sc->s, &run, &cols);
        bwd_rows(pl, sc, nsa__round4((qb - qa) * hpg), (qb - qa) * hpg, sc->qs + (size_t)r0 * dp,
                 sc->dop[2] + (size_t)r0 * dp, sc->lse + (size_t)r0 * 3 + 2,
                 sc->D + (size_t)r0 * 3 + 2, sc->s, sc->s2, cols, &run, 1, pk->vt, pk->krow,
                 sc->dq + (size_t)r0 * dp, sc->dk, sc->dv);
    }
    lap(sc, NSA_PHASE_WIN);

    for (int r = 0; r < tl->Mr; r++) {
        int t = tl->t0 + r / hpg, h = tl->g * hpg + r % hpg;
        float *dqr = dq + (((size_t)tl->b * T + t) * H + h) * d;
        const float *src = sc->dq + (size_t)r * dp;
        for (int c = 0; c < d; c++)
            dqr[c] = dm->scale * src[c];
    }
    lap(sc, NSA_PHASE_OTHER);
}

// Backward of the selected path for the queries [t_lo, t_hi) of unit (b, g), key-centric
// as the forward: dq (+=, after the tiles wrote the other paths' part), dk / dv into this
// thread's accumulators (a block's sums kept in a small buffer over its chunks).
static void slc_backward_range(const plan *pl, const unit_pack *pk, scratch *sc, int b, int g,
                               int t_lo, int t_hi, const float *q, const int32_t *idx,
                               const float *gates, const float *o_paths, const float *lse,
                               const float *dout, float *dq)
{
    const nsa__attn_dims *dm = pl->dm;
    const int d = dm->d, dp = pl->dp, hpg = pl->hpg, H = dm->H, T = dm->T, bs = dm->block_size;
    const size_t path_size = (size_t)dm->B * T * H * d;
    const float *o_slc = o_paths + path_size;
    for (int s0 = t_lo; s0 < t_hi; s0 += pl->sub_range) {
        int s1 = imin(t_hi, s0 + pl->sub_range);
        slc_index_build(pl, sc->ix_start, sc->ix_list, idx, b, g, s0, s1);
        load_sub_q(pl, sc, q, b, g, s0, s1);
        for (int t = s0; t < s1; t++)
            for (int hh = 0; hh < hpg; hh++) {
                size_t row = ((size_t)b * T + t) * H + (size_t)g * hpg + hh;
                size_t R = (size_t)(t - s0) * hpg + hh;
                float *dor = sc->dog_sub + R * dp;
                nsa__vcopy_scaled(dor, dout + row * d, d, gates[row * 3 + 1]);
                for (int c = d; c < dp; c++)
                    dor[c] = 0.0f;
                sc->lse_sub[R] = lse[row * 3 + 1];
                sc->D_sub[R] = nsa__vdot(dor, o_slc + row * d, d);
            }
        memset(sc->dq_slc, 0, (size_t)(s1 - s0) * hpg * dp * sizeof(float));
        for (int blk = 0; blk < pl->nb; blk++) {
            int count = sc->ix_start[blk + 1] - sc->ix_start[blk];
            if (count == 0)
                continue;
            key_run run = block_run(pl, blk, T - 1, 0);
            int cols = 8 * run.np;
            memset(sc->dkb, 0, sizeof(float) * (size_t)cols * dp);
            memset(sc->dvb, 0, sizeof(float) * (size_t)cols * dp);
            for (int c0 = 0; c0 < count; c0 += pl->qch) {
                int nqc = imin(pl->qch, count - c0), Mr = nqc * hpg, M = nsa__round4(Mr);
                const int *ts = sc->ix_list + sc->ix_start[blk] + c0;
                gather_q(pl, sc, ts, s0, nqc, M);
                for (int j = 0; j < nqc; j++) {
                    size_t R0 = (size_t)(ts[j] - s0) * hpg;
                    memcpy(sc->dog + (size_t)j * hpg * dp, sc->dog_sub + R0 * dp,
                           sizeof(float) * (size_t)hpg * dp);
                    for (int hh = 0; hh < hpg; hh++) {
                        sc->lg[j * hpg + hh] = sc->lse_sub[R0 + hh];
                        sc->dg[j * hpg + hh] = sc->D_sub[R0 + hh];
                    }
                }
                memset(sc->dog + (size_t)Mr * dp, 0, sizeof(float) * (size_t)(M - Mr) * dp);
                float *S = sc->s, *dP = sc->s2;
                run_scores(pl, M, sc->qg, &run, 1, pk->kt, S, cols);
                for (int r = 0; r < M; r++) {
                    float *srow = S + (size_t)r * cols;
                    if (r >= Mr || sc->lg[r] == -INFINITY) {
                        memset(srow, 0, sizeof(float) * (size_t)cols);
                        continue;
                    }
                    int t = ts[r / hpg];
                    mask_run(srow, &run, blk * bs, imin((blk + 1) * bs, t + 1));
                    nsa__vexp(srow, cols, sc->lg[r]);
                }
                run_scores(pl, M, sc->dog, &run, 1, pk->vt, dP, cols);
                for (int r = 0; r < M; r++)
                    nsa__vdsoftmax(dP + (size_t)r * cols, S + (size_t)r * cols, cols,
                                   r < Mr ? sc->dg[r] : 0.0f);
                nsa__seg seg = {pk->krow + (size_t)run.pos0 * dp, cols};
                nsa__gemm_rows(M, dp, dP, cols, 1, &seg, 1, dp, sc->dqg, dp, 0);
                for (int r = 0; r < Mr; r++)
                    nsa__vadd(sc->dq_slc + ((size_t)(ts[r / hpg] - s0) * hpg + r % hpg) * dp,
                              sc->dqg + (size_t)r * dp, dp);
                // dk += dS^T Q, dv += P^T dO over the chunk's rows, 4 keys at a time
                for (int kk = 0; kk < cols; kk += NSA_MR)
                    for (int n0 = 0; n0 < dp; n0 += 24) {
                        int nv = (dp - n0) / 8 < 3 ? (dp - n0) / 8 : 3;
                        nsa__seg qa = {sc->qg + n0, Mr}, da = {sc->dog + n0, Mr};
                        nsa__mk_rows(nv, &qa, 1, dp, dP + kk, 1, cols,
                                     sc->dkb + (size_t)kk * dp + n0, dp, 1);
                        nsa__mk_rows(nv, &da, 1, dp, S + kk, 1, cols,
                                     sc->dvb + (size_t)kk * dp + n0, dp, 1);
                    }
            }
            nsa__vadd(sc->dk + (size_t)run.pos0 * dp, sc->dkb, cols * dp);
            nsa__vadd(sc->dv + (size_t)run.pos0 * dp, sc->dvb, cols * dp);
        }
        for (int t = s0; t < s1; t++)
            for (int hh = 0; hh < hpg; hh++)
                nsa__vaxpy(dq + (((size_t)b * T + t) * H + (size_t)g * hpg + hh) * d, dm->scale,
                           sc->dq_slc + ((size_t)(t - s0) * hpg + hh) * dp, d);
    }
}

nsa_status nsa__cpu_attn_backward_ex(nsa_context *ctx, const nsa__attn_dims *dm, const float *q,
                                     const float *k, const float *v, const float *kc,
                                     const float *vc, const float *gates, const int32_t *idx,
                                     const float *o_paths, const float *lse, const float *dout,
                                     float *dq, float *dk, float *dv, float *dkc, float *dvc,
                                     float *dgates, nsa__attn_profile *prof)
{
    (void)ctx;
    if (dm->q_start != 0)
        return nsa__error(NSA_ERR_UNSUPPORTED, "attention backward: q_start must be 0");
    double t_start = omp_get_wtime();
    if (prof)
        memset(prof, 0, sizeof *prof);
    const int T = dm->T, G = dm->G, d = dm->d, Tc = dm->num_cmp;
    plan pl;
    plan_init(&pl, dm, omp_get_max_threads(), 0);
    unit_pack pk;
    float *pack = pack_alloc(&pl, &pk, 1);
    if (!pack)
        return nsa__error(NSA_ERR_NOMEM, "out of memory for attention packing buffers");
    const int threads = omp_get_max_threads();
    const int nsub = (T + pl.sub_range - 1) / pl.sub_range; // key-centric sub-ranges
    float **acc = calloc((size_t)threads * 4, sizeof(float *));
    int *owner = malloc(sizeof(int) * (size_t)nsub);
    double *load = malloc(sizeof(double) * (size_t)threads);
    if (!acc || !owner || !load) {
        free(acc);
        free(owner);
        free(load);
        free(pack);
        return nsa__error(NSA_ERR_NOMEM, "out of memory for attention scratch buffers");
    }
    int failed = 0;
#pragma omp parallel
    {
        scratch sc;
        char *mem = scratch_alloc(&pl, &sc, 1);
        int id = omp_get_thread_num(), nth = omp_get_num_threads();
        if (!mem) {
#pragma omp atomic write
            failed = 1;
        } else {
            acc[id * 4 + 0] = sc.dk;
            acc[id * 4 + 1] = sc.dv;
            acc[id * 4 + 2] = sc.dkc;
            acc[id * 4 + 3] = sc.dvc;
        }
#pragma omp single
        slc_deal(&pl, nsub, nth, owner, load);
        sc.profiling = prof != NULL;
        sc.lap = sc.profiling ? thread_seconds() : 0.0;
        const size_t kv = (size_t)pl.T8 * pl.dp, kvc = (size_t)(pl.Tc8 + 8) * pl.dp;
        for (int unit = 0; unit < dm->B * G && !failed; unit++) {
            int b = unit / G, g = unit % G;
            pack_unit(&pl, &pk, k, v, kc, vc, b, g, 1);
            memset(sc.dk, 0, kv * sizeof(float));
            memset(sc.dv, 0, kv * sizeof(float));
            memset(sc.dkc, 0, kvc * sizeof(float));
            memset(sc.dvc, 0, kvc * sizeof(float));
            sync_threads(&sc, NSA_PHASE_PACK);
            // a fixed interleaved deal of tiles (largest first): the accumulators' sums
            // then do not depend on timing
#pragma omp for schedule(static, 1) nowait
            for (int it = 0; it < pl.ntiles; it++) {
                tile tl;
                tile_init(&pl, &tl, b, g, pl.ntiles - 1 - it);
                tile_backward(&pl, &pk, &sc, &tl, q, gates, idx, o_paths, lse, dout, dq, dgates);
            }
            sync_threads(&sc, NSA_PHASE_OTHER); // the tiles wrote dq; the selected path adds
            for (int j = nsub - 1; j >= 0; j--) {
                if (owner[j] != id)
                    continue;
                int s0 = j * pl.sub_range, s1 = imin(T, s0 + pl.sub_range);
                slc_backward_range(&pl, &pk, &sc, b, g, s0, s1, q, idx, gates, o_paths, lse,
                                   dout, dq);
            }
            sync_threads(&sc, NSA_PHASE_SLC);
            // sum the threads' accumulators in thread order into this unit's rows
#pragma omp for schedule(static) nowait
            for (int s = 0; s < T + Tc; s++) {
                int cmp = s >= T, pos = cmp ? s - T : s;
                float *dst = cmp ? dkc + (((size_t)b * Tc + pos) * G + g) * d
                                 : dk + (((size_t)b * T + pos) * G + g) * d;
                float *dst_v = cmp ? dvc + (((size_t)b * Tc + pos) * G + g) * d
                                   : dv + (((size_t)b * T + pos) * G + g) * d;
                for (int c = 0; c < d; c++) {
                    float sk = 0.0f, sv = 0.0f;
                    for (int th = 0; th < nth; th++) {
                        sk += acc[th * 4 + (cmp ? 2 : 0)][(size_t)pos * pl.dp + c];
                        sv += acc[th * 4 + (cmp ? 3 : 1)][(size_t)pos * pl.dp + c];
                    }
                    dst[c] = sk;
                    dst_v[c] = sv;
                }
            }
            sync_threads(&sc, NSA_PHASE_OTHER); // before the next unit zeroes the sums
        }
        if (mem)
            profile_add(prof, &sc);
        free(mem);
    }
    free(acc);
    free(owner);
    free(load);
    free(pack);
    if (failed)
        return nsa__error(NSA_ERR_NOMEM, "out of memory for attention scratch buffers");
    if (prof)
        prof->wall = omp_get_wtime() - t_start;
    return NSA_OK;
}

nsa_status nsa__cpu_attn_backward(nsa_context *ctx, const nsa__attn_dims *dm, const float *q,
                                  const float *k, const float *v, const float *kc,
                                  const float *vc, const float *gates, const int32_t *idx,
                                  const float *o_paths, const float *lse, const float *dout,
                                  float *dq, float *dk, float *dv, float *dkc, float *dvc,
                                  float *dgates)
{
    return nsa__cpu_attn_backward_ex(ctx, dm, q, k, v, kc, vc, gates, idx, o_paths, lse, dout, dq,
                                     dk, dv, dkc, dvc, dgates, NULL);
}
