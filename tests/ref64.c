/*
 * ref64.c — float64 reference of shared/SPEC.md (see ref64.h). Test-only code.
 *
 * Plain loops straight from the SPEC: no blocking, no BLAS, no shared code with src/.
 * Where the SPEC leaves a choice to the implementation (the order of the selection in
 * sel_out), the reference picks a canonical one and the tests compare sets.
 */
#include "ref64.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ----------------------------------------------------------------------------------------
// Small helpers

static int ref_fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "  ref64: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    return -1;
}

static double *dalloc(size_t n)
{
    double *p = calloc(n ? n : 1, sizeof(double));
    if (!p) {
        fprintf(stderr, "ref64: out of memory (%zu doubles)\n", n);
        exit(2); // test-only code: no way to go on
    }
    return p;
}

static double dot(const double *a, const double *b, int n)
{
    double s = 0.0;
    for (int i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

static double gelu(double x) { return 0.5 * x * (1.0 + erf(x / sqrt(2.0))); }

static double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

// Softmax attention of one query over nkeys keys/values given as row pointers:
// o[d] = sum_i p_i v_i, p = softmax(scale * q.k_i). p_out (may be NULL) receives p.
// No keys: o = 0.
static void attend(double *o, const double *q, const double *const *keys,
                   const double *const *values, int nkeys, int head_dim, double scale,
                   double *p_out)
{
    for (int c = 0; c < head_dim; c++)
        o[c] = 0.0;
    if (nkeys == 0)
        return;
    double *p = dalloc((size_t)nkeys);
    double mx = -INFINITY;
    for (int i = 0; i < nkeys; i++) {
        p[i] = scale * dot(q, keys[i], head_dim);
        if (p[i] > mx)
            mx = p[i];
    }
    double sum = 0.0;
    for (int i = 0; i < nkeys; i++) {
        p[i] = exp(p[i] - mx);
        sum += p[i];
    }
    for (int i = 0; i < nkeys; i++) {
        p[i] /= sum;
        for (int c = 0; c < head_dim; c++)
            o[c] += p[i] * values[i][c];
        if (p_out)
            p_out[i] = p[i];
    }
    free(p);
}

// y [rows,out] = x [rows,in] W^T + bias, W [out,in] (PyTorch layout).
static void linear(double *y, const double *x, const double *w, const double *bias, int rows,
                   int in, int out)
{
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < out; o++)
            y[(size_t)r * out + o] = dot(x + (size_t)r * in, w + (size_t)o * in, in) + bias[o];
}

// LayerNorm over the last dim, eps 1e-5, biased variance.
static void layernorm(double *y, const double *x, const double *gamma, const double *beta, int rows,
                      int dim)
{
    for (int r = 0; r < rows; r++) {
        const double *xr = x + (size_t)r * dim;
        double mean = 0.0, var = 0.0;
        for (int i = 0; i < dim; i++)
            mean += xr[i];
        mean /= dim;
        for (int i = 0; i < dim; i++)
            var += (xr[i] - mean) * (xr[i] - mean);
        var /= dim;
        double inv = 1.0 / sqrt(var + 1e-5);
        for (int i = 0; i < dim; i++)
            y[(size_t)r * dim + i] = (xr[i] - mean) * inv * gamma[i] + beta[i];
    }
}

// ----------------------------------------------------------------------------------------
// The attention op

int ref_num_compressed(int seq_len, int ratio, int block)
{
    if (seq_len < block)
        return 0;
    return (seq_len - block) / ratio + 1; // j*r + l <= T
}

int ref_num_blocks(int seq_len, int block_size) { return (seq_len + block_size - 1) / block_size; }

void ref_compress_mean(double *kc, const double *k, int batch, int seq_len, int num_kv_heads,
                       int head_dim, int ratio, int block)
{
    int tc = ref_num_compressed(seq_len, ratio, block);
    for (int b = 0; b < batch; b++)
        for (int j = 0; j < tc; j++)
            for (int g = 0; g < num_kv_heads; g++)
                for (int c = 0; c < head_dim; c++) {
                    double s = 0.0;
                    for (int i = 0; i < block; i++)
                        s += k[(((size_t)b * seq_len + j * ratio + i) * num_kv_heads + g) * head_dim + c];
                    kc[(((size_t)b * tc + j) * num_kv_heads + g) * head_dim + c] = s / block;
                }
}

// Does compressed token j ([j*r, j*r+l)) overlap selection block i ([i*b, (i+1)*b))?
static int overlaps(int j, int ratio, int cblock, int i, int block_size)
{
    long lo = (long)j * ratio, hi = lo + cblock;
    long blo = (long)i * block_size, bhi = blo + block_size;
    return lo < bhi && hi > blo;
}

// Is candidate a ahead of candidate b in the top-k order (higher score; ties: lower index)?
static int ranks_before(const double *score, int a, int b)
{
    if (score[a] != score[b])
        return score[a] > score[b];
    return a < b;
}

int ref_attention_compressed(const nsa_attention_desc *desc, const double *q, const double *k,
                             const double *v, const double *kc, const double *vc,
                             const double *gates, const int32_t *block_indices, double *out,
                             int32_t *sel_out, ref_attn_stats *stats)
{
    const int B = desc->batch, T = desc->seq_len, H = desc->num_heads, G = desc->num_kv_heads;
    const int d = desc->head_dim, bs = desc->block_size, w = desc->window_size;
    const int r = desc->compression_ratio, l = desc->compression_block;
    const int n = desc->num_selected_blocks;
    if (B < 1 || T < 1 || H < 1 || G < 1 || H % G || d < 1 || bs < 1 || w < 1 || r < 1 || l < 1 ||
        l % r || n < 1)
        return ref_fail("bad attention desc");
    if (desc->select_score == NSA_SELECT_CMP_ATTN && bs % r)
        return ref_fail("cmp_attn needs b %% r == 0");
    if (desc->select_fixed == NSA_SELECT_FIXED_PAPER && n < 3)
        return ref_fail("select_fixed paper needs n >= 3");
    const double scale = desc->scale != 0.0f ? (double)desc->scale : 1.0 / sqrt((double)d);
    const int heads_per_group = H / G;
    const int tc = ref_num_compressed(T, r, l);
    const int nblocks = ref_num_blocks(T, bs);

    double min_margin = INFINITY;
    const double **keys = malloc(sizeof(*keys) * (size_t)(T + tc + 1));
    const double **vals = malloc(sizeof(*vals) * (size_t)(T + tc + 1));
    const double **keys_win = malloc(sizeof(*keys_win) * (size_t)(T + 1));
    const double **vals_win = malloc(sizeof(*vals_win) * (size_t)(T + 1));
    double *p_cmp = dalloc((size_t)heads_per_group * (tc + 1)); // [heads of group, tc]
    double *o_cmp = dalloc((size_t)heads_per_group * d);
    double *o_slc = dalloc((size_t)d), *o_win = dalloc((size_t)d);
    double *score = dalloc((size_t)nblocks), *mean_k = dalloc((size_t)d);
    int *chosen = calloc((size_t)nblocks, sizeof(int));
    int status = 0;
    if (!keys || !vals || !keys_win || !vals_win || !chosen) {
        fprintf(stderr, "ref64: out of memory\n");
        exit(2);
    }

#define Q(b, t, h) (q + (((size_t)(b) * T + (t)) * H + (h)) * d)
#define K(b, t, g) (k + (((size_t)(b) * T + (t)) * G + (g)) * d)
#define V(b, t, g) (v + (((size_t)(b) * T + (t)) * G + (g)) * d)
#define KC(b, j, g) (kc + (((size_t)(b) * tc + (j)) * G + (g)) * d)
#define VC(b, j, g) (vc + (((size_t)(b) * tc + (j)) * G + (g)) * d)

    for (int b = 0; b < B && !status; b++)
        for (int t = 0; t < T && !status; t++)
            for (int g = 0; g < G && !status; g++) {
                // --- compressed path: visible j have j*r + l - 1 <= t
                int nvis = 0;
                for (int j = 0; j < tc; j++)
                    if (j * r + l - 1 <= t) {
                        keys[nvis] = KC(b, j, g);
                        vals[nvis] = VC(b, j, g);
                        nvis++;
                    }
                for (int hh = 0; hh < heads_per_group; hh++) {
                    int h = g * heads_per_group + hh;
                    for (int j = 0; j < tc; j++)
                        p_cmp[hh * (tc + 1) + j] = 0.0;
                    // visible tokens are a prefix 0..nvis-1, so p lands at index j
                    attend(o_cmp + hh * d, Q(b, t, h), keys, vals, nvis, d, scale,
                           p_cmp + hh * (tc + 1));
                }

                // --- selection
                for (int i = 0; i < nblocks; i++)
                    chosen[i] = 0;
                const int ncand = t / bs + 1; // blocks i with i*b <= t
                if (block_indices) {
                    const int32_t *bi = block_indices + (((size_t)b * T + t) * G + g) * n;
                    for (int s = 0; s < n; s++) {
                        if (bi[s] == -1)
                            continue;
                        if (bi[s] < 0 || bi[s] >= ncand) {
                            status = ref_fail("block_indices[%d,%d,%d,%d] = %d out of range", b, t,
                                              g, s, bi[s]);
                            break;
                        }
                        chosen[bi[s]] = 1;
                    }
                } else if (ncand <= n) {
                    for (int i = 0; i < ncand; i++)
                        chosen[i] = 1;
                } else {
                    // scores, summed over the query heads of this kv group
                    for (int i = 0; i < ncand; i++) {
                        score[i] = 0.0;
                        if (desc->select_score == NSA_SELECT_MEAN_KEY) {
                            int lo = i * bs, hi = (i + 1) * bs - 1;
                            if (hi > t)
                                hi = t;
                            for (int c = 0; c < d; c++) {
                                double s = 0.0;
                                for (int p = lo; p <= hi; p++)
                                    s += K(b, p, g)[c];
                                mean_k[c] = s / (hi - lo + 1);
                            }
                            for (int hh = 0; hh < heads_per_group; hh++)
                                score[i] += dot(Q(b, t, g * heads_per_group + hh), mean_k, d);
                        } else {
                            for (int hh = 0; hh < heads_per_group; hh++)
                                for (int j = 0; j < tc; j++)
                                    if (j * r + l - 1 <= t && overlaps(j, r, l, i, bs))
                                        score[i] += p_cmp[hh * (tc + 1) + j];
                        }
                    }
                    int taken = 0;
                    if (desc->select_fixed == NSA_SELECT_FIXED_PAPER) {
                        // block 0 and the two most recent candidates (ncand > n >= 3 here)
                        chosen[0] = chosen[ncand - 1] = chosen[ncand - 2] = 1;
                        taken = 3;
                    }
                    double lowest_taken = INFINITY;
                    int by_score = 0;
                    while (taken < n) {
                        int best = -1;
                        for (int i = 0; i < ncand; i++)
                            if (!chosen[i] && (best < 0 || ranks_before(score, i, best)))
                                best = i;
                        chosen[best] = 1;
                        taken++;
                        by_score = 1;
                        if (score[best] < lowest_taken)
                            lowest_taken = score[best];
                    }
                    if (by_score) {
                        double highest_left = -INFINITY, mag = 0.0;
                        for (int i = 0; i < ncand; i++) {
                            if (fabs(score[i]) > mag)
                                mag = fabs(score[i]);
                            if (!chosen[i] && score[i] > highest_left)
                                highest_left = score[i];
                        }
                        // exact ties (e.g. blocks no visible compressed token overlaps,
                        // score 0) resolve the same way everywhere: not a near-tie
                        double m = (lowest_taken - highest_left) / (mag > 0 ? mag : 1.0);
                        if (lowest_taken != highest_left && m < min_margin)
                            min_margin = m;
                    }
                }
                if (status)
                    break;
                if (sel_out) {
                    int32_t *so = sel_out + (((size_t)b * T + t) * G + g) * n;
                    int s = 0;
                    for (int i = 0; i < nblocks && s < n; i++)
                        if (chosen[i])
                            so[s++] = i;
                    for (; s < n; s++)
                        so[s] = -1;
                }

                // --- selected path: keys s <= t inside the chosen blocks
                int nslc = 0;
                for (int s = 0; s <= t; s++)
                    if (chosen[s / bs]) {
                        keys[nslc] = K(b, s, g);
                        vals[nslc] = V(b, s, g);
                        nslc++;
                    }
                // --- sliding window: max(0, t-w+1) .. t
                int nwin = 0;
                for (int s = t - w + 1 < 0 ? 0 : t - w + 1; s <= t; s++) {
                    keys_win[nwin] = K(b, s, g);
                    vals_win[nwin] = V(b, s, g);
                    nwin++;
                }
                for (int hh = 0; hh < heads_per_group; hh++) {
                    int h = g * heads_per_group + hh;
                    attend(o_slc, Q(b, t, h), keys, vals, nslc, d, scale, NULL);
                    attend(o_win, Q(b, t, h), keys_win, vals_win, nwin, d, scale, NULL);
                    const double *gt = gates + (((size_t)b * T + t) * H + h) * 3;
                    double *o = out + (((size_t)b * T + t) * H + h) * d;
                    for (int c = 0; c < d; c++)
                        o[c] = gt[0] * o_cmp[hh * d + c] + gt[1] * o_slc[c] + gt[2] * o_win[c];
                }
            }
#undef Q
#undef K
#undef V
#undef KC
#undef VC

    if (stats)
        stats->min_margin = min_margin;
    free(keys);
    free(vals);
    free(keys_win);
    free(vals_win);
    free(p_cmp);
    free(o_cmp);
    free(o_slc);
    free(o_win);
    free(score);
    free(mean_k);
    free(chosen);
    return status;
}

int ref_attention(const nsa_attention_desc *desc, const double *q, const double *k,
                  const double *v, const double *gates, const int32_t *block_indices,
                  double *out, int32_t *sel_out, ref_attn_stats *stats)
{
    const int B = desc->batch, T = desc->seq_len, G = desc->num_kv_heads, d = desc->head_dim;
    const int r = desc->compression_ratio, l = desc->compression_block;
    if (B < 1 || T < 1 || G < 1 || d < 1 || r < 1 || l < 1)
        return ref_fail("bad attention desc");
    int tc = ref_num_compressed(T, r, l);
    double *kc = dalloc((size_t)B * tc * G * d), *vc = dalloc((size_t)B * tc * G * d);
    ref_compress_mean(kc, k, B, T, G, d, r, l);
    ref_compress_mean(vc, v, B, T, G, d, r, l);
    int st = ref_attention_compressed(desc, q, k, v, kc, vc, gates, block_indices, out, sel_out,
                                      stats);
    free(kc);
    free(vc);
    return st;
}

// ----------------------------------------------------------------------------------------
// Parameters by name

const double *ref_param(const ref_params *params, const char *name, size_t numel)
{
    for (size_t i = 0; i < params->count; i++)
        if (strcmp(params->tensors[i].name, name) == 0) {
            if (params->tensors[i].numel != numel) {
                ref_fail("tensor %s has %zu elements, SPEC says %zu", name,
                         params->tensors[i].numel, numel);
                return NULL;
            }
            return params->tensors[i].data;
        }
    ref_fail("tensor %s missing", name);
    return NULL;
}

// ref_param with a printf-formatted name.
static const double *param_f(const ref_params *params, size_t numel, const char *fmt, ...)
{
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    return ref_param(params, name, numel);
}

int ref_kv_heads(const nsa_config *cfg)
{
    return cfg->num_kv_heads > 0 ? cfg->num_kv_heads : cfg->num_heads;
}

int ref_compression_block(const nsa_config *cfg)
{
    return cfg->compression_block > 0 ? cfg->compression_block : cfg->compression_ratio;
}

int64_t ref_param_count(const nsa_config *cfg)
{
    const int64_t E = cfg->embed_dim, D = cfg->hidden_size, H = cfg->num_heads,
                  d = cfg->head_dim;
    const int64_t G = ref_kv_heads(cfg), l = ref_compression_block(cfg), Hd = H * d;
    int64_t per_layer = 2 * D;                 // attn_norm
    per_layer += D * Hd + Hd;                  // q_proj
    per_layer += 2 * (D * G * d + G * d);      // k_proj, v_proj
    per_layer += Hd * D + D;                   // o_proj
    if (cfg->gate == NSA_GATE_TOKEN)
        per_layer += 3 * H * D + 3 * H;        // gate_proj
    else
        per_layer += 3;                        // gate
    if (cfg->compress == NSA_COMPRESS_CONV)
        per_layer += 2 * (G * l * d);          // compress_k, compress_v weights
    else if (cfg->compress == NSA_COMPRESS_MLP)
        per_layer += 2 * (l * d + d * l * d + d + d * d + d); // pos, fc1, fc2
    per_layer += 2 * D;                        // ffn_norm
    per_layer += 4 * D * D + 4 * D;            // ffn.up
    per_layer += 4 * D * D + D;                // ffn.down
    int64_t total = cfg->num_layers * per_layer + 2 * D; // + final_norm
    if (E != D)
        total += E * D + D; // in_proj
    return total;
}

// ----------------------------------------------------------------------------------------
// The model

// Rotary embedding in place on x [B,T,heads,d]: pairs (2i, 2i+1), angle t*theta^(-2i/d).
static void rope(double *x, int batch, int seq_len, int heads, int head_dim, double theta)
{
    for (int b = 0; b < batch; b++)
        for (int t = 0; t < seq_len; t++)
            for (int h = 0; h < heads; h++) {
                double *xr = x + (((size_t)b * seq_len + t) * heads + h) * head_dim;
                for (int i = 0; i < head_dim / 2; i++) {
                    double angle = t * pow(theta, -2.0 * i / head_dim);
                    double c = cos(angle), s = sin(angle);
                    double x0 = xr[2 * i], x1 = xr[2 * i + 1];
                    xr[2 * i] = x0 * c - x1 * s;
                    xr[2 * i + 1] = x0 * s + x1 * c;
                }
            }
}

// Compression of x [B,T,G,d] into xc [B,Tc,G,d] by the config's method; `which` is
// "compress_k" or "compress_v".
static int compress(const nsa_config *cfg, const ref_params *params, int layer, const char *which,
                    double *xc, const double *x, int batch, int seq_len)
{
    const int G = ref_kv_heads(cfg), d = cfg->head_dim, r = cfg->compression_ratio;
    const int l = ref_compression_block(cfg);
    const int tc = ref_num_compressed(seq_len, r, l);
    if (cfg->compress == NSA_COMPRESS_MEAN) {
        ref_compress_mean(xc, x, batch, seq_len, G, d, r, l);
        return 0;
    }
#define X(b, t, g) (x + (((size_t)(b) * seq_len + (t)) * G + (g)) * d)
#define XC(b, j, g) (xc + (((size_t)(b) * tc + (j)) * G + (g)) * d)
    if (cfg->compress == NSA_COMPRESS_CONV) {
        const double *wc =
            param_f(params, (size_t)G * l * d, "layers.%d.attn.%s.weight", layer, which);
        if (!wc)
            return -1;
        for (int b = 0; b < batch; b++)
            for (int j = 0; j < tc; j++)
                for (int g = 0; g < G; g++)
                    for (int c = 0; c < d; c++) {
                        double s = 0.0;
                        for (int i = 0; i < l; i++)
                            s += wc[((size_t)g * l + i) * d + c] * X(b, j * r + i, g)[c];
                        XC(b, j, g)[c] = s;
                    }
        return 0;
    }
    if (cfg->compress == NSA_COMPRESS_MLP) {
        const double *pos = param_f(params, (size_t)l * d, "layers.%d.attn.%s.pos", layer, which);
        const double *w1 =
            param_f(params, (size_t)d * l * d, "layers.%d.attn.%s.fc1.weight", layer, which);
        const double *b1 = param_f(params, (size_t)d, "layers.%d.attn.%s.fc1.bias", layer, which);
        const double *w2 =
            param_f(params, (size_t)d * d, "layers.%d.attn.%s.fc2.weight", layer, which);
        const double *b2 = param_f(params, (size_t)d, "layers.%d.attn.%s.fc2.bias", layer, which);
        if (!pos || !w1 || !b1 || !w2 || !b2)
            return -1;
        double *u = dalloc((size_t)l * d), *hid = dalloc((size_t)d);
        for (int b = 0; b < batch; b++)
            for (int j = 0; j < tc; j++)
                for (int g = 0; g < G; g++) {
                    for (int i = 0; i < l; i++)
                        for (int c = 0; c < d; c++)
                            u[i * d + c] = X(b, j * r + i, g)[c] + pos[i * d + c];
                    linear(hid, u, w1, b1, 1, l * d, d);
                    for (int c = 0; c < d; c++)
                        hid[c] = gelu(hid[c]);
                    linear(XC(b, j, g), hid, w2, b2, 1, d, d);
                }
        free(u);
        free(hid);
        return 0;
    }
#undef X
#undef XC
    return ref_fail("unknown compress %d", (int)cfg->compress);
}

int ref_attention_layer_forward(const nsa_config *cfg, const ref_params *params, int layer,
                                const double *z, int batch, int seq_len, double *out,
                                ref_attn_stats *stats)
{
    const int D = cfg->hidden_size, H = cfg->num_heads, d = cfg->head_dim, G = ref_kv_heads(cfg);
    const int Hd = H * d, Gd = G * d, rows = batch * seq_len;
    const int tc = ref_num_compressed(seq_len, cfg->compression_ratio, ref_compression_block(cfg));
    const double *wq = param_f(params, (size_t)Hd * D, "layers.%d.attn.q_proj.weight", layer);
    const double *bq = param_f(params, (size_t)Hd, "layers.%d.attn.q_proj.bias", layer);
    const double *wk = param_f(params, (size_t)Gd * D, "layers.%d.attn.k_proj.weight", layer);
    const double *bk = param_f(params, (size_t)Gd, "layers.%d.attn.k_proj.bias", layer);
    const double *wv = param_f(params, (size_t)Gd * D, "layers.%d.attn.v_proj.weight", layer);
    const double *bv = param_f(params, (size_t)Gd, "layers.%d.attn.v_proj.bias", layer);
    const double *wo = param_f(params, (size_t)D * Hd, "layers.%d.attn.o_proj.weight", layer);
    const double *bo = param_f(params, (size_t)D, "layers.%d.attn.o_proj.bias", layer);
    if (!wq || !bq || !wk || !bk || !wv || !bv || !wo || !bo)
        return -1;

    double *q = dalloc((size_t)rows * Hd), *k = dalloc((size_t)rows * Gd);
    double *v = dalloc((size_t)rows * Gd), *o = dalloc((size_t)rows * Hd);
    double *kc = dalloc((size_t)batch * tc * Gd), *vc = dalloc((size_t)batch * tc * Gd);
    double *gates = dalloc((size_t)rows * H * 3);
    int st = -1;
    linear(q, z, wq, bq, rows, D, Hd); // [B,T,H,d]
    linear(k, z, wk, bk, rows, D, Gd); // [B,T,G,d]
    linear(v, z, wv, bv, rows, D, Gd);
    if (cfg->rope_theta > 0) {
        rope(q, batch, seq_len, H, d, cfg->rope_theta);
        rope(k, batch, seq_len, G, d, cfg->rope_theta);
    }
    if (compress(cfg, params, layer, "compress_k", kc, k, batch, seq_len) ||
        compress(cfg, params, layer, "compress_v", vc, v, batch, seq_len))
        goto done;

    if (cfg->gate == NSA_GATE_STATIC) {
        const double *gamma = param_f(params, 3, "layers.%d.attn.gate", layer);
        if (!gamma)
            goto done;
        double mx = fmax(gamma[0], fmax(gamma[1], gamma[2])), e[3], sum = 0.0;
        for (int c = 0; c < 3; c++)
            sum += e[c] = exp(gamma[c] - mx);
        for (int i = 0; i < rows * H; i++)
            for (int c = 0; c < 3; c++)
                gates[(size_t)i * 3 + c] = e[c] / sum;
    } else {
        const double *wg =
            param_f(params, (size_t)3 * H * D, "layers.%d.attn.gate_proj.weight", layer);
        const double *bg = param_f(params, (size_t)3 * H, "layers.%d.attn.gate_proj.bias", layer);
        if (!wg || !bg)
            goto done;
        linear(gates, z, wg, bg, rows, D, 3 * H); // row h*3+c == layout [B,T,H,3]
        for (size_t i = 0; i < (size_t)rows * H * 3; i++)
            gates[i] = sigmoid(gates[i]);
    }

    nsa_attention_desc desc;
    memset(&desc, 0, sizeof desc);
    desc.batch = batch;
    desc.seq_len = seq_len;
    desc.num_heads = H;
    desc.num_kv_heads = G;
    desc.head_dim = d;
    desc.block_size = cfg->block_size;
    desc.window_size = cfg->window_size;
    desc.compression_ratio = cfg->compression_ratio;
    desc.compression_block = ref_compression_block(cfg);
    desc.num_selected_blocks = cfg->num_selected_blocks;
    desc.select_score = cfg->select_score;
    desc.select_fixed = cfg->select_fixed;
    desc.scale = 0.0f;
    if (ref_attention_compressed(&desc, q, k, v, kc, vc, gates, NULL, o, NULL, stats))
        goto done;
    linear(out, o, wo, bo, rows, Hd, D);
    st = 0;
done:
    free(q);
    free(k);
    free(v);
    free(o);
    free(kc);
    free(vc);
    free(gates);
    return st;
}

// Keeps the smaller margin of two runs.
static void merge_stats(ref_attn_stats *into, const ref_attn_stats *from)
{
    if (into && from->min_margin < into->min_margin)
        into->min_margin = from->min_margin;
}

int ref_block_forward(const nsa_config *cfg, const ref_params *params, int layer, const double *x,
                      int batch, int seq_len, double *out, ref_attn_stats *stats)
{
    const int D = cfg->hidden_size, rows = batch * seq_len;
    const double *g1 = param_f(params, (size_t)D, "layers.%d.attn_norm.weight", layer);
    const double *b1 = param_f(params, (size_t)D, "layers.%d.attn_norm.bias", layer);
    const double *g2 = param_f(params, (size_t)D, "layers.%d.ffn_norm.weight", layer);
    const double *b2 = param_f(params, (size_t)D, "layers.%d.ffn_norm.bias", layer);
    const double *wu = param_f(params, (size_t)4 * D * D, "layers.%d.ffn.up.weight", layer);
    const double *bu = param_f(params, (size_t)4 * D, "layers.%d.ffn.up.bias", layer);
    const double *wd = param_f(params, (size_t)4 * D * D, "layers.%d.ffn.down.weight", layer);
    const double *bd = param_f(params, (size_t)D, "layers.%d.ffn.down.bias", layer);
    if (!g1 || !b1 || !g2 || !b2 || !wu || !bu || !wd || !bd)
        return -1;
    double *a = dalloc((size_t)rows * D), *att = dalloc((size_t)rows * D);
    double *h = dalloc((size_t)rows * D), *up = dalloc((size_t)rows * 4 * D);
    ref_attn_stats st_layer = {INFINITY};
    int st = -1;
    layernorm(a, x, g1, b1, rows, D);
    if (ref_attention_layer_forward(cfg, params, layer, a, batch, seq_len, att, &st_layer))
        goto done;
    merge_stats(stats, &st_layer);
    for (size_t i = 0; i < (size_t)rows * D; i++)
        h[i] = x[i] + att[i];
    layernorm(a, h, g2, b2, rows, D);
    linear(up, a, wu, bu, rows, D, 4 * D);
    for (size_t i = 0; i < (size_t)rows * 4 * D; i++)
        up[i] = gelu(up[i]);
    linear(att, up, wd, bd, rows, 4 * D, D);
    for (size_t i = 0; i < (size_t)rows * D; i++)
        out[i] = h[i] + att[i];
    st = 0;
done:
    free(a);
    free(att);
    free(h);
    free(up);
    return st;
}

int ref_model_forward(const nsa_config *cfg, const ref_params *params, const double *x, int batch,
                      int seq_len, int all_positions, double *out, ref_attn_stats *stats)
{
    const int E = cfg->embed_dim, D = cfg->hidden_size, rows = batch * seq_len;
    if (batch < 1 || seq_len < 1)
        return ref_fail("batch and seq_len must be >= 1");
    if (stats)
        stats->min_margin = INFINITY;
    double *h = dalloc((size_t)rows * D), *next = dalloc((size_t)rows * D);
    int st = -1;
    if (E != D) {
        const double *w = ref_param(params, "in_proj.weight", (size_t)D * E);
        const double *bias = ref_param(params, "in_proj.bias", (size_t)D);
        if (!w || !bias)
            goto done;
        linear(h, x, w, bias, rows, E, D);
    } else {
        memcpy(h, x, sizeof(double) * (size_t)rows * D);
    }
    for (int layer = 0; layer < cfg->num_layers; layer++) {
        ref_attn_stats s = {INFINITY};
        if (ref_block_forward(cfg, params, layer, h, batch, seq_len, next, &s))
            goto done;
        merge_stats(stats, &s);
        double *tmp = h;
        h = next;
        next = tmp;
    }
    const double *gf = ref_param(params, "final_norm.weight", (size_t)D);
    const double *bf = ref_param(params, "final_norm.bias", (size_t)D);
    if (!gf || !bf)
        goto done;
    layernorm(next, h, gf, bf, rows, D);
    if (all_positions)
        memcpy(out, next, sizeof(double) * (size_t)rows * D);
    else
        for (int b = 0; b < batch; b++)
            memcpy(out + (size_t)b * D, next + ((size_t)b * seq_len + seq_len - 1) * D,
                   sizeof(double) * (size_t)D);
    st = 0;
done:
    free(h);
    free(next);
    return st;
}

int ref_lm_forward(const nsa_config *cfg, const ref_params *params, const int32_t *tokens,
                   int batch, int seq_len, double *logits, double *loss, ref_attn_stats *stats)
{
    const int E = cfg->embed_dim, D = cfg->hidden_size, V = cfg->vocab_size;
    const int rows = batch * seq_len;
    if (V < 1)
        return ref_fail("vocab_size must be > 0 for the language model");
    if (loss && seq_len < 2)
        return ref_fail("loss needs seq_len >= 2");
    const double *emb = ref_param(params, "embed.weight", (size_t)V * E);
    const double *wh = ref_param(params, "lm_head.weight", (size_t)V * D);
    const double *bh = ref_param(params, "lm_head.bias", (size_t)V);
    if (!emb || !wh || !bh)
        return -1;
    for (int i = 0; i < rows; i++)
        if (tokens[i] < 0 || tokens[i] >= V)
            return ref_fail("token %d out of range", tokens[i]);
    double *x = dalloc((size_t)rows * E), *h = dalloc((size_t)rows * D);
    double *lg = dalloc((size_t)rows * V);
    int st = -1;
    for (int i = 0; i < rows; i++)
        memcpy(x + (size_t)i * E, emb + (size_t)tokens[i] * E, sizeof(double) * (size_t)E);
    if (ref_model_forward(cfg, params, x, batch, seq_len, 1, h, stats))
        goto done;
    linear(lg, h, wh, bh, rows, D, V);
    if (logits)
        memcpy(logits, lg, sizeof(double) * (size_t)rows * V);
    if (loss) {
        double total = 0.0;
        for (int b = 0; b < batch; b++)
            for (int t = 0; t + 1 < seq_len; t++) {
                const double *row = lg + ((size_t)b * seq_len + t) * V;
                double mx = -INFINITY, sum = 0.0;
                for (int c = 0; c < V; c++)
                    mx = fmax(mx, row[c]);
                for (int c = 0; c < V; c++)
                    sum += exp(row[c] - mx);
                int target = tokens[(size_t)b * seq_len + t + 1];
                total += (mx + log(sum)) - row[target];
            }
        *loss = total / ((double)batch * (seq_len - 1));
    }
    st = 0;
done:
    free(x);
    free(h);
    free(lg);
    return st;
}
