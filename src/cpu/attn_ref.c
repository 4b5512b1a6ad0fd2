/*
 * attn_ref.c — the plain reference of the CPU attention (SPEC §3): one query row at a
 * time, scalar loops, per-row softmax. It is what cpu_attention.c's tiled kernels must
 * reproduce; the tests run both (tests/test_dense.c) and the benchmark can time it.
 * Same contract as the backend's attn_forward / attn_backward (src/backend.h).
 *
 * Memory is O(T): each query row is attended with a softmax over its own keys (at most
 * max(Tc, n*b, w) scores in a per-thread buffer), never a T x T matrix. The backward
 * recomputes probabilities from the saved log-sum-exp of each path (flash-style).
 *
 * Work split: forward over (batch, position) — rows are independent; backward over
 * (batch, kv head) — the key/value gradients of a kv head are written by one thread,
 * so no atomics and a fixed summation order (bit-identical results run to run).
 */
#include "cpu/attn.h"
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct span {
    int start, end; // key rows [start, end)
} span;

static inline float dot(const float *a, const float *b, int d)
{
    float s = 0.0f;
    for (int i = 0; i < d; i++)
        s += a[i] * b[i];
    return s;
}

static inline void axpy(float *y, float a, const float *x, int d)
{
    for (int i = 0; i < d; i++)
        y[i] += a * x[i];
}

// Softmax attention of one query q[d] over the key rows in spans (row j at K + j*stride):
// o[d] = sum_j p_j V_j. Returns the log-sum-exp of the scaled scores, -inf (and o = 0)
// when there is no key. scores: scratch for every key of the spans.
static float attend(const float *q, const float *K, const float *V, size_t stride,
                    const span *spans, int num_spans, int d, float scale, float *scores, float *o)
{
    int n = 0;
    float mx = -INFINITY;
    for (int si = 0; si < num_spans; si++) {
        for (int j = spans[si].start; j < spans[si].end; j++) {
            float s = scale * dot(q, K + (size_t)j * stride, d);
            scores[n++] = s;
            mx = s > mx ? s : mx;
        }
    }
    memset(o, 0, (size_t)d * sizeof(float));
    if (n == 0)
        return -INFINITY;
    float sum = 0.0f;
    for (int i = 0; i < n; i++)
        sum += scores[i] = expf(scores[i] - mx);
    n = 0;
    for (int si = 0; si < num_spans; si++)
        for (int j = spans[si].start; j < spans[si].end; j++)
            axpy(o, scores[n++], V + (size_t)j * stride, d);
    float inv = 1.0f / sum;
    for (int i = 0; i < d; i++)
        o[i] *= inv;
    return mx + logf(sum);
}

// Backward of attend for one query: dq (+=), dK, dV (+=) rows of the spans. dO is the
// gradient of this path's output, Dp = dO . o.
static void attend_backward(const float *q, const float *K, const float *V, size_t stride,
                            const span *spans, int num_spans, int d, float scale, float lse,
                            const float *dO, float Dp, float *dq, float *dK, float *dV)
{
    if (lse == -INFINITY)
        return;
    for (int si = 0; si < num_spans; si++) {
        for (int j = spans[si].start; j < spans[si].end; j++) {
            const float *kj = K + (size_t)j * stride, *vj = V + (size_t)j * stride;
            float p = expf(scale * dot(q, kj, d) - lse);
            float ds = p * (dot(dO, vj, d) - Dp) * scale;
            axpy(dq, ds, kj, d);
            axpy(dK + (size_t)j * stride, ds, q, d);
            axpy(dV + (size_t)j * stride, p, dO, d);
        }
    }
}

// Number of compressed tokens visible to query t: j*r + l - 1 <= t.
static inline int visible_compressed(const nsa__attn_dims *dm, int t)
{
    if (t < dm->cmp_len - 1)
        return 0;
    int nc = (t - dm->cmp_len + 1) / dm->cmp_stride + 1;
    return nc < dm->num_cmp ? nc : dm->num_cmp;
}

// Top-n of score[0..num_cand) (ties to the lower index) into out[n], ascending, -1
// padded; with fixed (paper) block 0 and the two most recent candidates always in.
void nsa__select_blocks(const float *score, int num_cand, int n, int fixed, int32_t *out,
                        int32_t *top)
{
    if (num_cand <= n) {
        for (int i = 0; i < n; i++)
            out[i] = i < num_cand ? i : -1;
        return;
    }
    int num_forced = fixed ? 3 : 0; // num_cand > n >= 3 here, so the three are distinct
    int k = n - num_forced, len = 0;
    for (int i = 0; i < num_cand && k > 0; i++) {
        if (fixed && (i == 0 || i >= num_cand - 2))
            continue;
        float s = score[i];
        if (len == k && !(s > score[top[len - 1]]))
            continue;
        int pos = len < k ? len++ : len - 1;
        while (pos > 0 && score[top[pos - 1]] < s) {
            top[pos] = top[pos - 1];
            pos--;
        }
        top[pos] = i;
    }
    if (fixed) {
        top[len++] = 0;
        top[len++] = num_cand - 2;
        top[len++] = num_cand - 1;
    }
    // ascending order (insertion sort: n is small)
    for (int i = 1; i < len; i++) {
        int32_t v = top[i];
        int j = i;
        while (j > 0 && top[j - 1] > v) {
            top[j] = top[j - 1];
            j--;
        }
        top[j] = v;
    }
    for (int i = 0; i < n; i++)
        out[i] = i < len ? top[i] : -1;
}

// Key spans of the selected blocks of query t (positions <= t), in idx order.
static int selected_spans(const nsa__attn_dims *dm, const int32_t *sel, int t, span *spans)
{
    int ns = 0;
    for (int i = 0; i < dm->num_selected; i++) {
        int blk = sel[i];
        if (blk < 0)
            continue;
        int start = blk * dm->block_size, end = start + dm->block_size;
        if (end > t + 1)
            end = t + 1;
        if (start < end)
            spans[ns++] = (span){start, end};
    }
    return ns;
}

static inline span window_span(const nsa__attn_dims *dm, int t)
{
    int start = t - dm->window + 1;
    return (span){start > 0 ? start : 0, t + 1};
}

// ---------------------------------------------------------------------------------------
// Forward

// Prefix sums of k inside each selection block: kcum[b,t,g] = sum of k[b,s,g] for s from
// the start of t's block to t (for mean_key scores of full and partial blocks).
static void block_prefix_sums(const nsa__attn_dims *dm, const float *k, float *kcum)
{
    int T = dm->T, G = dm->G, d = dm->d;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < dm->B; b++) {
        for (int g = 0; g < G; g++) {
            for (int t = 0; t < T; t++) {
                const float *kr = k + (((size_t)b * T + t) * G + g) * d;
                float *cr = kcum + (((size_t)b * T + t) * G + g) * d;
                if (t % dm->block_size == 0)
                    memcpy(cr, kr, (size_t)d * sizeof(float));
                else
                    for (int c = 0; c < d; c++)
                        cr[c] = cr[c - (ptrdiff_t)G * d] + kr[c];
            }
        }
    }
}

nsa_status nsa__cpu_attn_forward_ref(nsa_context *ctx, const nsa__attn_dims *dm, const float *q,
                                     const float *k, const float *v, const float *kc,
                                     const float *vc, const float *gates,
                                     const int32_t *given_idx, int32_t *idx, float *out,
                                     float *o_paths, float *lse)
{
    (void)ctx;
    const int B = dm->B, T = dm->T, H = dm->H, G = dm->G, d = dm->d, n = dm->num_selected;
    const int Tc = dm->num_cmp, nb = dm->num_blocks, heads_per_group = H / G;
    const int q_start = dm->q_start, Tq = T - q_start; // query rows per batch entry
    const size_t kv_stride = (size_t)G * d, path_size = (size_t)B * Tq * H * d;
    const int score_blocks = given_idx == NULL;
    const int mean_key = score_blocks && dm->select_score == NSA_SELECT_MEAN_KEY;

    float *kcum = NULL;
    if (mean_key) {
        kcum = nsa__malloc(nsa__mul_size((size_t)B * T * G, (size_t)d * sizeof(float)),
                           "block key sums");
        if (!kcum)
            return NSA_ERR_NOMEM;
        block_prefix_sums(dm, k, kcum);
    }
    long max_keys = Tc, sel_keys = (long)n * dm->block_size;
    if ((sel_keys < T ? sel_keys : T) > max_keys)
        max_keys = sel_keys < T ? sel_keys : T;
    if ((dm->window < T ? dm->window : T) > max_keys)
        max_keys = dm->window < T ? dm->window : T;

    int failed = 0;
#pragma omp parallel
    {
        size_t floats = (size_t)max_keys + nb + 4 * (size_t)d;
        float *scores = malloc(floats * sizeof(float));
        int32_t *top = malloc(((size_t)n + 4) * sizeof(int32_t));
        span *spans = malloc(((size_t)n + 1) * sizeof(span));
        if (!scores || !top || !spans) {
#pragma omp atomic write
            failed = 1;
        }
        float *bscore = scores + max_keys, *qsum = bscore + nb, *o3 = qsum + d;
#pragma omp for schedule(dynamic, 8)
        for (long bt = 0; bt < (long)B * Tq; bt++) {
            if (failed)
                continue;
            int b = (int)(bt / Tq), t = q_start + (int)(bt % Tq);
            size_t qrow = (size_t)bt; // (b, t) among the query rows
            int nc = visible_compressed(dm, t);
            int num_cand = t / dm->block_size + 1;
            for (int g = 0; g < G; g++) {
                int32_t *sel = idx + (qrow * G + g) * n;
                if (score_blocks)
                    memset(bscore, 0, (size_t)num_cand * sizeof(float));
                // compressed path, and the cmp_attn block scores from its probabilities
                for (int hh = 0; hh < heads_per_group; hh++) {
                    int h = g * heads_per_group + hh;
                    size_t row = qrow * H + h;
                    const float *qr = q + row * d;
                    float *o = o_paths ? o_paths + row * d : o3;
                    span sp = {0, nc};
                    const float *kcb = kc + (size_t)b * Tc * kv_stride + (size_t)g * d;
                    const float *vcb = vc + (size_t)b * Tc * kv_stride + (size_t)g * d;
                    float l = attend(qr, kcb, vcb, kv_stride, &sp, 1, d, dm->scale, scores, o);
                    if (lse)
                        lse[row * 3 + 0] = l;
                    if (score_blocks && dm->select_score == NSA_SELECT_CMP_ATTN) {
                        // scores[j] holds exp(s_j - max); p_j = exp(s_j - lse)
                        for (int j = 0; j < nc; j++) {
                            float p = expf(dm->scale * dot(qr, kcb + (size_t)j * kv_stride, d) - l);
                            int first = j * dm->cmp_stride / dm->block_size;
                            int last = (j * dm->cmp_stride + dm->cmp_len - 1) / dm->block_size;
                            if (last > num_cand - 1)
                                last = num_cand - 1;
                            for (int i = first; i <= last; i++)
                                bscore[i] += p;
                        }
                    }
                    if (!o_paths)
                        memcpy(out + row * d, o, (size_t)d * sizeof(float)); // staged below
                }
                // selection
                if (!score_blocks) {
                    memcpy(sel, given_idx + (qrow * G + g) * n,
                           (size_t)n * sizeof(int32_t));
                } else {
                    if (mean_key) {
                        memset(qsum, 0, (size_t)d * sizeof(float));
                        for (int hh = 0; hh < heads_per_group; hh++)
                            axpy(qsum, 1.0f, q + (qrow * H + g * heads_per_group + hh) * d, d);
                        for (int i = 0; i < num_cand; i++) {
                            int last = (i + 1) * dm->block_size - 1;
                            if (last > t)
                                last = t;
                            int count = last - i * dm->block_size + 1;
                            const float *ks = kcum + (((size_t)b * T + last) * G + g) * d;
                            bscore[i] = dot(qsum, ks, d) / (float)count;
                        }
                    }
                    nsa__select_blocks(bscore, num_cand, n, dm->select_fixed == NSA_SELECT_FIXED_PAPER,
                                  sel, top);
                }
                int ns = selected_spans(dm, sel, t, spans);
                span win = window_span(dm, t);
                const float *kb = k + (size_t)b * T * kv_stride + (size_t)g * d;
                const float *vb = v + (size_t)b * T * kv_stride + (size_t)g * d;
                for (int hh = 0; hh < heads_per_group; hh++) {
                    int h = g * heads_per_group + hh;
                    size_t row = qrow * H + h;
                    const float *qr = q + row * d;
                    float *o_cmp = o_paths ? o_paths + row * d : out + row * d;
                    float *o_slc = o_paths ? o_paths + path_size + row * d : o3;
                    float *o_win = o_paths ? o_paths + 2 * path_size + row * d : o3 + d;
                    float l1 = attend(qr, kb, vb, kv_stride, spans, ns, d, dm->scale, scores, o_slc);
                    float l2 = attend(qr, kb, vb, kv_stride, &win, 1, d, dm->scale, scores, o_win);
                    if (lse) {
                        lse[row * 3 + 1] = l1;
                        lse[row * 3 + 2] = l2;
                    }
                    const float *gt = gates + row * 3;
                    float *orow = out + row * d;
                    for (int c = 0; c < d; c++)
                        orow[c] = gt[0] * o_cmp[c] + gt[1] * o_slc[c] + gt[2] * o_win[c];
                }
            }
        }
        free(scores);
        free(top);
        free(spans);
    }
    free(kcum);
    if (failed)
        return nsa__error(NSA_ERR_NOMEM, "out of memory for attention scratch buffers");
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// Backward

nsa_status nsa__cpu_attn_backward_ref(nsa_context *ctx, const nsa__attn_dims *dm,
                                      const float *q, const float *k, const float *v,
                                      const float *kc, const float *vc, const float *gates,
                                      const int32_t *idx, const float *o_paths, const float *lse,
                                      const float *dout, float *dq, float *dk, float *dv,
                                      float *dkc, float *dvc, float *dgates)
{
    (void)ctx;
    if (dm->q_start != 0)
        return nsa__error(NSA_ERR_UNSUPPORTED, "attention backward: q_start must be 0");
    const int B = dm->B, T = dm->T, H = dm->H, G = dm->G, d = dm->d, n = dm->num_selected;
    const int Tc = dm->num_cmp, heads_per_group = H / G;
    const size_t kv_stride = (size_t)G * d, path_size = (size_t)B * T * H * d;
    memset(dq, 0, path_size * sizeof(float));
    memset(dk, 0, (size_t)B * T * kv_stride * sizeof(float));
    memset(dv, 0, (size_t)B * T * kv_stride * sizeof(float));
    memset(dkc, 0, (size_t)B * Tc * kv_stride * sizeof(float));
    memset(dvc, 0, (size_t)B * Tc * kv_stride * sizeof(float));

    int failed = 0;
#pragma omp parallel
    {
        float *dO = malloc((size_t)d * sizeof(float));
        span *spans = malloc(((size_t)n + 1) * sizeof(span));
        if (!dO || !spans) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int b = 0; b < B; b++) {
            for (int g = 0; g < G; g++) {
                if (failed)
                    continue;
                size_t kv_off = (size_t)b * T * kv_stride + (size_t)g * d;
                size_t kvc_off = (size_t)b * Tc * kv_stride + (size_t)g * d;
                for (int t = 0; t < T; t++) {
                    const int32_t *sel = idx + (((size_t)b * T + t) * G + g) * n;
                    int ns = selected_spans(dm, sel, t, spans);
                    span win = window_span(dm, t), cmp = {0, visible_compressed(dm, t)};
                    for (int hh = 0; hh < heads_per_group; hh++) {
                        int h = g * heads_per_group + hh;
                        size_t row = ((size_t)b * T + t) * H + h;
                        const float *qr = q + row * d, *dor = dout + row * d;
                        for (int c = 0; c < 3; c++) {
                            const float *o = o_paths + c * path_size + row * d;
                            float gate = gates[row * 3 + c];
                            dgates[row * 3 + c] = dot(dor, o, d);
                            for (int i = 0; i < d; i++)
                                dO[i] = gate * dor[i];
                            float Dp = dot(dO, o, d);
                            float l = lse[row * 3 + c];
                            if (c == 0)
                                attend_backward(qr, kc + kvc_off, vc + kvc_off, kv_stride, &cmp, 1,
                                                d, dm->scale, l, dO, Dp, dq + row * d,
                                                dkc + kvc_off, dvc + kvc_off);
                            else
                                attend_backward(qr, k + kv_off, v + kv_off, kv_stride,
                                                c == 1 ? spans : &win, c == 1 ? ns : 1, d,
                                                dm->scale, l, dO, Dp, dq + row * d, dk + kv_off,
                                                dv + kv_off);
                        }
                    }
                }
            }
        }
        free(dO);
        free(spans);
    }
    if (failed)
        return nsa__error(NSA_ERR_NOMEM, "out of memory for attention scratch buffers");
    return NSA_OK;
}
