/*
 * test_attention.c — the public op nsa_attention_forward (SPEC §6) on the CPU against the
 * float64 reference of tests/ref64.c, plus checks of the reference itself (against a
 * separately written full causal attention) and of the op's refusals of bad input.
 *
 * The selection (indices_out) is compared as a set per (b, t, kv head): its order is the
 * implementation's business, which blocks it holds is not.
 */
#include "harness.h"
#include "nsa.h"
#include "ref64.h"

// ----------------------------------------------------------------------------------------
// Helpers

static nsa_context *ctx;

typedef struct att_case {
    const char *name;
    int B, T, H, G, d, b, w, r, l, n;
    nsa_select_score score;
    nsa_select_fixed fixed;
    int given_indices; // 1: random block_indices (with -1 slots) replace the scoring
    float scale;       // 0 = 1/sqrt(d)
} att_case;

static void desc_of(nsa_attention_desc *desc, const att_case *c)
{
    memset(desc, 0, sizeof *desc);
    desc->batch = c->B;
    desc->seq_len = c->T;
    desc->num_heads = c->H;
    desc->num_kv_heads = c->G;
    desc->head_dim = c->d;
    desc->block_size = c->b;
    desc->window_size = c->w;
    desc->compression_ratio = c->r;
    desc->compression_block = c->l;
    desc->num_selected_blocks = c->n;
    desc->select_score = c->score;
    desc->select_fixed = c->fixed;
    desc->scale = c->scale;
}

static double *to_double(const float *x, size_t n)
{
    double *y = malloc(sizeof(double) * (n ? n : 1));
    for (size_t i = 0; i < n; i++)
        y[i] = x[i];
    return y;
}

// Random valid block_indices [B,T,G,n]: per row 1..min(n, candidates) distinct candidate
// blocks (i*b <= t) in random slots, the other slots -1.
static void random_indices(test_rng *rng, int32_t *idx, int B, int T, int G, int n, int b)
{
    int *pool = malloc(sizeof(int) * (size_t)(T + 1));
    int *slot = malloc(sizeof(int) * (size_t)n);
    for (int bb = 0; bb < B; bb++)
        for (int t = 0; t < T; t++)
            for (int g = 0; g < G; g++) {
                int32_t *row = idx + (((size_t)bb * T + t) * G + g) * n;
                int ncand = t / b + 1;
                for (int i = 0; i < ncand; i++)
                    pool[i] = i;
                int most = ncand < n ? ncand : n;
                int m = 1 + (int)(test_rng_next(rng) % (uint64_t)most);
                for (int i = 0; i < m; i++) { // partial Fisher-Yates
                    int j = i + (int)(test_rng_next(rng) % (uint64_t)(ncand - i));
                    int tmp = pool[i];
                    pool[i] = pool[j];
                    pool[j] = tmp;
                }
                for (int s = 0; s < n; s++)
                    slot[s] = s;
                for (int s = 0; s < n; s++) {
                    int j = s + (int)(test_rng_next(rng) % (uint64_t)(n - s));
                    int tmp = slot[s];
                    slot[s] = slot[j];
                    slot[j] = tmp;
                }
                for (int s = 0; s < n; s++)
                    row[s] = -1;
                for (int i = 0; i < m; i++)
                    row[slot[i]] = pool[i];
            }
    free(pool);
    free(slot);
}

static int cmp_i32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

// Compares two selections [rows, n] as sets (sorted copies); reports the first mismatch.
static int compare_selection(const char *what, const int32_t *got, const int32_t *ref, int B,
                             int T, int G, int n)
{
    int32_t *a = malloc(sizeof(int32_t) * (size_t)n), *r = malloc(sizeof(int32_t) * (size_t)n);
    long bad = 0;
    for (int bb = 0; bb < B; bb++)
        for (int t = 0; t < T; t++)
            for (int g = 0; g < G; g++) {
                size_t off = (((size_t)bb * T + t) * G + g) * n;
                memcpy(a, got + off, sizeof(int32_t) * (size_t)n);
                memcpy(r, ref + off, sizeof(int32_t) * (size_t)n);
                qsort(a, (size_t)n, sizeof(int32_t), cmp_i32);
                qsort(r, (size_t)n, sizeof(int32_t), cmp_i32);
                if (memcmp(a, r, sizeof(int32_t) * (size_t)n) == 0)
                    continue;
                if (bad++ == 0) {
                    fprintf(stderr, "  %s: selection differs at b=%d t=%d g=%d: got {", what, bb,
                            t, g);
                    for (int s = 0; s < n; s++)
                        fprintf(stderr, "%s%d", s ? "," : "", got[off + s]);
                    fprintf(stderr, "} ref {");
                    for (int s = 0; s < n; s++)
                        fprintf(stderr, "%s%d", s ? "," : "", ref[off + s]);
                    fprintf(stderr, "}\n");
                }
            }
    if (bad) {
        fprintf(stderr, "  %s: %ld of %d selection rows differ\n", what, bad, B * T * G);
        harness_cur_failed = 1;
    }
    free(a);
    free(r);
    return bad == 0;
}

// Runs one case: random inputs, the op against the reference.
static void run_case(const att_case *c, uint64_t seed)
{
    nsa_attention_desc desc;
    desc_of(&desc, c);
    const size_t nq = (size_t)c->B * c->T * c->H * c->d, nk = (size_t)c->B * c->T * c->G * c->d;
    const size_t ng = (size_t)c->B * c->T * c->H * 3, ns = (size_t)c->B * c->T * c->G * c->n;
    test_rng rng = {seed};
    float *q = malloc(sizeof(float) * nq), *k = malloc(sizeof(float) * nk);
    float *v = malloc(sizeof(float) * nk), *gates = malloc(sizeof(float) * ng);
    float *out = malloc(sizeof(float) * nq);
    int32_t *given = NULL, *sel = malloc(sizeof(int32_t) * ns), *sel_ref = malloc(sizeof(int32_t) * ns);
    test_fill(&rng, q, nq, 1.0);
    test_fill(&rng, k, nk, 1.0);
    test_fill(&rng, v, nk, 1.0);
    for (size_t i = 0; i < ng; i++) // gates in [0, 1]
        gates[i] = (float)(0.5 + 0.5 * test_rng_uniform(&rng));
    if (c->given_indices) {
        given = malloc(sizeof(int32_t) * ns);
        random_indices(&rng, given, c->B, c->T, c->G, c->n, c->b);
    }
    double *qd = to_double(q, nq), *kd = to_double(k, nk), *vd = to_double(v, nk);
    double *gd = to_double(gates, ng), *ref = malloc(sizeof(double) * nq);
    ref_attn_stats stats;
    int rs = ref_attention(&desc, qd, kd, vd, gd, given, ref, sel_ref, &stats);
    CHECKF(rs == 0, "%s: reference refused the case", c->name);

    test_poison(out, nq);
    for (size_t i = 0; i < ns; i++)
        sel[i] = -77;
    nsa_status st = nsa_attention_forward(ctx, &desc, q, k, v, gates, given, out, sel);
    CHECKF(st == NSA_OK, "%s: nsa_attention_forward returned %d (%s)", c->name, (int)st,
           nsa_last_error());
    if (st == NSA_OK && rs == 0) {
        char what[160];
        snprintf(what, sizeof what, "%s out", c->name);
        int ok_sel = compare_selection(c->name, sel, sel_ref, c->B, c->T, c->G, c->n);
        int ok_out = harness_compare(what, out, ref, nq, TOL_F32);
        if ((!ok_sel || !ok_out) && !c->given_indices)
            fprintf(stderr, "  %s: smallest relative score margin at a selection boundary "
                            "in the reference: %.3g\n", c->name, stats.min_margin);
    }
    free(q);
    free(k);
    free(v);
    free(gates);
    free(out);
    free(given);
    free(sel);
    free(sel_ref);
    free(qd);
    free(kd);
    free(vd);
    free(gd);
    free(ref);
}

#define MK NSA_SELECT_MEAN_KEY
#define CA NSA_SELECT_CMP_ATTN
#define FN NSA_SELECT_FIXED_NONE
#define FP NSA_SELECT_FIXED_PAPER

// ----------------------------------------------------------------------------------------
// The op against the reference

//                                   name  B  T   H G d  b  w  r  l  n  score fixed given scale
static void test_mean_key(void)
{
    att_case c = {"mean_key", 1, 40, 2, 2, 8, 4, 6, 2, 2, 3, MK, FN, 0, 0};
    run_case(&c, 101);
}

static void test_cmp_attn(void)
{
    att_case c = {"cmp_attn", 1, 40, 2, 2, 8, 4, 6, 2, 4, 3, CA, FN, 0, 0};
    run_case(&c, 102);
    att_case c2 = {"cmp_attn l=r=b", 1, 48, 2, 2, 8, 4, 6, 4, 4, 3, CA, FN, 0, 0};
    run_case(&c2, 103);
    // before the first compressed token is complete (t < l - 1) every score is 0 and
    // the top-k falls back to the lowest blocks (ties: lower index first)
    att_case c3 = {"cmp_attn ties before the first token", 1, 24, 2, 1, 8, 2, 3, 2, 8, 2, CA, FN,
                   0, 0};
    run_case(&c3, 104);
}

static void test_select_fixed_paper(void)
{
    att_case c = {"mean_key paper", 1, 45, 2, 2, 8, 4, 6, 2, 2, 4, MK, FP, 0, 0};
    run_case(&c, 111);
    att_case c2 = {"cmp_attn paper", 1, 45, 2, 2, 8, 4, 6, 2, 4, 5, CA, FP, 0, 0};
    run_case(&c2, 112);
    // n = 3: the fixed blocks fill the selection, nothing is chosen by score
    att_case c3 = {"paper n=3", 1, 30, 2, 2, 4, 3, 4, 3, 3, 3, CA, FP, 0, 0};
    run_case(&c3, 113);
}

static void test_gqa(void)
{
    att_case c = {"gqa H4 G2 mean_key", 1, 37, 4, 2, 8, 4, 5, 2, 4, 3, MK, FN, 0, 0};
    run_case(&c, 121);
    att_case c2 = {"gqa H4 G1 cmp_attn paper", 1, 37, 4, 1, 8, 4, 5, 2, 4, 4, CA, FP, 0, 0};
    run_case(&c2, 122);
    att_case c3 = {"gqa H4 G1 mean_key", 2, 29, 4, 1, 4, 3, 5, 3, 3, 2, MK, FN, 0, 0};
    run_case(&c3, 123);
}

static void test_overlapping_compression(void)
{
    att_case c = {"l=3r mean_key", 1, 50, 2, 2, 8, 5, 7, 2, 6, 3, MK, FN, 0, 0};
    run_case(&c, 131);
    att_case c2 = {"l=2r cmp_attn b=r", 1, 50, 2, 1, 8, 3, 7, 3, 6, 4, CA, FN, 0, 0};
    run_case(&c2, 132);
    att_case c3 = {"l=4r cmp_attn paper", 1, 50, 2, 2, 8, 4, 7, 2, 8, 4, CA, FP, 0, 0};
    run_case(&c3, 133);
}

static void test_odd_T(void)
{
    att_case c = {"T61 b7 r3 l3", 1, 61, 2, 2, 8, 7, 5, 3, 3, 3, MK, FN, 0, 0};
    run_case(&c, 141);
    att_case c2 = {"T61 b7 r3 l6", 1, 61, 2, 2, 8, 7, 5, 3, 6, 3, MK, FN, 0, 0};
    run_case(&c2, 142);
    att_case c3 = {"T61 b7 r3 l6 paper", 1, 61, 2, 1, 8, 7, 5, 3, 6, 4, MK, FP, 0, 0};
    run_case(&c3, 143);
    att_case c4 = {"T61 b6 r3 l6 cmp_attn", 1, 61, 2, 2, 8, 6, 5, 3, 6, 3, CA, FN, 0, 0};
    run_case(&c4, 144);
}

static void test_short_T(void)
{
    // T smaller than every block size: no compressed token, one selection block
    att_case c = {"T3 mean_key", 1, 3, 2, 2, 8, 8, 16, 4, 8, 3, MK, FN, 0, 0};
    run_case(&c, 151);
    att_case c2 = {"T3 cmp_attn paper", 1, 3, 2, 1, 8, 8, 16, 4, 8, 3, CA, FP, 0, 0};
    run_case(&c2, 152);
    att_case c3 = {"T1", 1, 1, 2, 2, 8, 4, 4, 2, 2, 3, MK, FN, 0, 0};
    run_case(&c3, 153);
    att_case c4 = {"T1 cmp_attn paper r=l=1", 2, 1, 2, 1, 8, 1, 1, 1, 1, 3, CA, FP, 0, 0};
    run_case(&c4, 154);
}

static void test_batch(void)
{
    att_case c = {"B3 mean_key", 3, 23, 2, 2, 8, 4, 5, 2, 4, 3, MK, FN, 0, 0};
    run_case(&c, 161);
    att_case c2 = {"B3 cmp_attn paper gqa", 3, 23, 4, 2, 8, 4, 5, 2, 4, 4, CA, FP, 0, 0};
    run_case(&c2, 162);
}

static void test_given_indices(void)
{
    att_case c = {"given", 2, 40, 2, 2, 8, 4, 6, 2, 4, 4, MK, FN, 1, 0};
    run_case(&c, 171);
    att_case c2 = {"given gqa", 1, 41, 4, 2, 8, 5, 3, 5, 5, 3, CA, FP, 1, 0};
    run_case(&c2, 172);
    att_case c3 = {"given n > blocks", 1, 17, 2, 1, 8, 4, 3, 2, 2, 9, MK, FN, 1, 0};
    run_case(&c3, 173);
}

static void test_n_above_blocks(void)
{
    att_case c = {"n=20 > 8 blocks", 1, 30, 2, 2, 8, 4, 6, 2, 4, 20, MK, FN, 0, 0};
    run_case(&c, 181);
    att_case c2 = {"n=20 > 8 blocks cmp_attn paper", 2, 30, 2, 1, 8, 4, 6, 2, 4, 20, CA, FP, 0, 0};
    run_case(&c2, 182);
}

static void test_paper_like(void)
{
    att_case c = {"paper-like", 1, 100, 4, 1, 16, 16, 32, 8, 16, 4, CA, FP, 0, 0};
    run_case(&c, 191);
    att_case c2 = {"paper-like mean_key", 2, 100, 4, 2, 16, 16, 32, 8, 16, 4, MK, FN, 0, 0};
    run_case(&c2, 192);
    // the fla parallel_nsa setting: l = r = b, cmp_attn, paper
    att_case c3 = {"fla-like l=r=b", 1, 100, 4, 1, 16, 16, 32, 16, 16, 4, CA, FP, 0, 0};
    run_case(&c3, 193);
}

static void test_explicit_scale(void)
{
    att_case c = {"scale 0.3", 1, 33, 2, 2, 8, 4, 6, 2, 4, 3, CA, FN, 0, 0.3f};
    run_case(&c, 201);
}

// ----------------------------------------------------------------------------------------
// The reference on its own (no library involved)

// Full causal softmax attention, written separately: out [B,T,H,d].
static void full_causal(double *out, const double *q, const double *k, const double *v, int B,
                        int T, int H, int G, int d)
{
    double *p = malloc(sizeof(double) * (size_t)T);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < H; h++) {
                int g = h / (H / G);
                const double *qr = q + (((size_t)b * T + t) * H + h) * d;
                double mx = -INFINITY, sum = 0.0;
                for (int s = 0; s <= t; s++) {
                    const double *kr = k + (((size_t)b * T + s) * G + g) * d;
                    double x = 0.0;
                    for (int c = 0; c < d; c++)
                        x += qr[c] * kr[c];
                    p[s] = x / sqrt((double)d);
                    mx = p[s] > mx ? p[s] : mx;
                }
                for (int s = 0; s <= t; s++)
                    sum += p[s] = exp(p[s] - mx);
                double *o = out + (((size_t)b * T + t) * H + h) * d;
                for (int c = 0; c < d; c++) {
                    double acc = 0.0;
                    for (int s = 0; s <= t; s++)
                        acc += p[s] / sum * v[(((size_t)b * T + s) * G + g) * d + c];
                    o[c] = acc;
                }
            }
    free(p);
}

static void fill_d(test_rng *rng, double *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = test_rng_uniform(rng);
}

static double max_abs_diff(const double *a, const double *b, size_t n)
{
    double m = 0.0;
    for (size_t i = 0; i < n; i++)
        m = fmax(m, fabs(a[i] - b[i]));
    return m;
}

// Each path reduces to full causal attention when it sees every past key: the selected
// path with every block chosen, the window with w >= T, the compressed path with r = l = 1.
static void test_ref_paths_equal_full_attention(void)
{
    const int B = 2, T = 23, H = 4, G = 2, d = 8;
    const size_t nq = (size_t)B * T * H * d, nk = (size_t)B * T * G * d;
    test_rng rng = {7};
    double *q = malloc(sizeof(double) * nq), *k = malloc(sizeof(double) * nk);
    double *v = malloc(sizeof(double) * nk), *full = malloc(sizeof(double) * nq);
    double *out = malloc(sizeof(double) * nq), *gates = malloc(sizeof(double) * B * T * H * 3);
    fill_d(&rng, q, nq);
    fill_d(&rng, k, nk);
    fill_d(&rng, v, nk);
    full_causal(full, q, k, v, B, T, H, G, d);
    for (int path = 0; path < 3; path++) {
        for (int i = 0; i < B * T * H; i++)
            for (int c = 0; c < 3; c++)
                gates[i * 3 + c] = c == path ? 1.0 : 0.0;
        for (int score = 0; score < 2; score++) {
            att_case c = {"", B, T, H, G, d, 4, T, 1, 1, 6, score ? CA : MK, FN, 0, 0};
            nsa_attention_desc desc;
            desc_of(&desc, &c); // 6 blocks of 4 cover T = 23: every block selected
            CHECK(ref_attention(&desc, q, k, v, gates, NULL, out, NULL, NULL) == 0);
            double e = max_abs_diff(out, full, nq);
            CHECKF(e < 1e-12, "path %d score %d: differs from full attention by %g", path, score,
                   e);
        }
    }
    // window w < T differs from full attention (the test above is not vacuous)
    for (int i = 0; i < B * T * H; i++)
        for (int c = 0; c < 3; c++)
            gates[i * 3 + c] = c == 2 ? 1.0 : 0.0;
    att_case c = {"", B, T, H, G, d, 4, 5, 1, 1, 6, MK, FN, 0, 0};
    nsa_attention_desc desc;
    desc_of(&desc, &c);
    CHECK(ref_attention(&desc, q, k, v, gates, NULL, out, NULL, NULL) == 0);
    CHECK(max_abs_diff(out, full, nq) > 1e-3);
    free(q);
    free(k);
    free(v);
    free(full);
    free(out);
    free(gates);
}

// Changing anything at positions > t0 leaves outputs and selections at <= t0 unchanged.
static void test_ref_causal(void)
{
    const att_case cases[] = {
        {"", 1, 40, 4, 2, 8, 4, 6, 2, 4, 3, MK, FN, 0, 0},
        {"", 1, 40, 4, 2, 8, 4, 6, 2, 4, 4, CA, FP, 0, 0},
        {"", 1, 40, 2, 1, 8, 6, 6, 3, 9, 3, CA, FN, 0, 0},
    };
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const att_case *c = &cases[ci];
        nsa_attention_desc desc;
        desc_of(&desc, c);
        const size_t nq = (size_t)c->T * c->H * c->d, nk = (size_t)c->T * c->G * c->d;
        const size_t ng = (size_t)c->T * c->H * 3, ns = (size_t)c->T * c->G * c->n;
        test_rng rng = {11 + ci};
        double *q = malloc(sizeof(double) * nq), *k = malloc(sizeof(double) * nk);
        double *v = malloc(sizeof(double) * nk), *g = malloc(sizeof(double) * ng);
        double *o1 = malloc(sizeof(double) * nq), *o2 = malloc(sizeof(double) * nq);
        int32_t *s1 = malloc(sizeof(int32_t) * ns), *s2 = malloc(sizeof(int32_t) * ns);
        fill_d(&rng, q, nq);
        fill_d(&rng, k, nk);
        fill_d(&rng, v, nk);
        fill_d(&rng, g, ng);
        CHECK(ref_attention(&desc, q, k, v, g, NULL, o1, s1, NULL) == 0);
        const int t0 = 21;
        for (size_t i = (size_t)(t0 + 1) * c->H * c->d; i < nq; i++)
            q[i] = 3.0 * test_rng_uniform(&rng);
        for (size_t i = (size_t)(t0 + 1) * c->G * c->d; i < nk; i++) {
            k[i] = 3.0 * test_rng_uniform(&rng);
            v[i] = 3.0 * test_rng_uniform(&rng);
        }
        CHECK(ref_attention(&desc, q, k, v, g, NULL, o2, s2, NULL) == 0);
        size_t upto = (size_t)(t0 + 1) * c->H * c->d;
        CHECKF(memcmp(o1, o2, sizeof(double) * upto) == 0, "case %zu: output at t <= %d changed",
               ci, t0);
        CHECKF(memcmp(s1, s2, sizeof(int32_t) * (size_t)(t0 + 1) * c->G * c->n) == 0,
               "case %zu: selection at t <= %d changed", ci, t0);
        CHECKF(max_abs_diff(o1 + upto, o2 + upto, nq - upto) > 1e-3,
               "case %zu: later outputs did not change (test vacuous)", ci);
        free(q);
        free(k);
        free(v);
        free(g);
        free(o1);
        free(o2);
        free(s1);
        free(s2);
    }
}

// Feeding the reference its own selection as block_indices reproduces its output; GQA with
// every block selected equals G = H with the kv heads repeated.
static void test_ref_given_and_gqa(void)
{
    const int T = 30, H = 4, G = 2, d = 8;
    att_case c = {"", 1, T, H, G, d, 4, 5, 2, 4, 3, CA, FP, 0, 0};
    nsa_attention_desc desc;
    desc_of(&desc, &c);
    const size_t nq = (size_t)T * H * d, nk = (size_t)T * G * d, ns = (size_t)T * G * c.n;
    test_rng rng = {23};
    double *q = malloc(sizeof(double) * nq), *k = malloc(sizeof(double) * nk);
    double *v = malloc(sizeof(double) * nk), *g = malloc(sizeof(double) * T * H * 3);
    double *o1 = malloc(sizeof(double) * nq), *o2 = malloc(sizeof(double) * nq);
    int32_t *s1 = malloc(sizeof(int32_t) * ns), *s2 = malloc(sizeof(int32_t) * ns);
    fill_d(&rng, q, nq);
    fill_d(&rng, k, nk);
    fill_d(&rng, v, nk);
    fill_d(&rng, g, (size_t)T * H * 3);
    CHECK(ref_attention(&desc, q, k, v, g, NULL, o1, s1, NULL) == 0);
    CHECK(ref_attention(&desc, q, k, v, g, s1, o2, s2, NULL) == 0);
    CHECK(memcmp(o1, o2, sizeof(double) * nq) == 0);
    CHECK(memcmp(s1, s2, sizeof(int32_t) * ns) == 0);

    // every block selected (n >= 8 blocks): G = 2 equals G = 4 with kv heads repeated
    double *k4 = malloc(sizeof(double) * nq), *v4 = malloc(sizeof(double) * nq);
    for (int t = 0; t < T; t++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < d; i++) {
                k4[((size_t)t * H + h) * d + i] = k[((size_t)t * G + h / 2) * d + i];
                v4[((size_t)t * H + h) * d + i] = v[((size_t)t * G + h / 2) * d + i];
            }
    att_case cg = {"", 1, T, H, G, d, 4, 5, 2, 4, 8, MK, FN, 0, 0};
    att_case cm = {"", 1, T, H, H, d, 4, 5, 2, 4, 8, MK, FN, 0, 0};
    desc_of(&desc, &cg);
    CHECK(ref_attention(&desc, q, k, v, g, NULL, o1, NULL, NULL) == 0);
    desc_of(&desc, &cm);
    CHECK(ref_attention(&desc, q, k4, v4, g, NULL, o2, NULL, NULL) == 0);
    CHECK(max_abs_diff(o1, o2, nq) < 1e-14);
    free(k4);
    free(v4);
    free(q);
    free(k);
    free(v);
    free(g);
    free(o1);
    free(o2);
    free(s1);
    free(s2);
}

// Hand-made selections: keys built so that the scores are known.
static void test_ref_selection_by_hand(void)
{
    // T = 12, b = 2, d = 1, H = G = 1, q = 1: mean_key score of block i = mean of its keys.
    const int T = 12;
    double q[12], k[12], v[12], g[36], out[12];
    const double block_mean[6] = {0.1, 0.9, -0.5, 0.7, 0.3, 0.2};
    for (int t = 0; t < T; t++) {
        q[t] = 1.0;
        // keys of a block: mean +- 0.05, so the first key alone ranks the same way
        k[t] = block_mean[t / 2] + (t % 2 ? -0.05 : 0.05);
        v[t] = t;
        g[3 * t] = 0.0;
        g[3 * t + 1] = 1.0;
        g[3 * t + 2] = 0.0;
    }
    int32_t sel[12 * 2];
    att_case c = {"", 1, T, 1, 1, 1, 2, 1, 1, 1, 2, MK, FN, 0, 0};
    nsa_attention_desc desc;
    desc_of(&desc, &c);
    CHECK(ref_attention(&desc, q, k, v, g, NULL, out, sel, NULL) == 0);
    // t = 11: candidates 0..5, top 2 by mean: blocks 1 (0.9) and 3 (0.7)
    CHECK(sel[11 * 2] == 1 && sel[11 * 2 + 1] == 3);
    // t = 4: candidates 0, 1, 2 (block 2 holds only key 4 = -0.45): blocks 0 and 1
    CHECK(sel[4 * 2] == 0 && sel[4 * 2 + 1] == 1);
    // t = 1: one candidate, second slot unused
    CHECK(sel[1 * 2] == 0 && sel[1 * 2 + 1] == -1);

    // select_fixed paper, n = 3 at t = 11: block 0 and blocks 4, 5 whatever their scores
    int32_t sel3[12 * 3];
    att_case cp = {"", 1, T, 1, 1, 1, 2, 1, 1, 1, 3, MK, FP, 0, 0};
    desc_of(&desc, &cp);
    CHECK(ref_attention(&desc, q, k, v, g, NULL, out, sel3, NULL) == 0);
    CHECK(sel3[33] == 0 && sel3[34] == 4 && sel3[35] == 5);
    // n = 4 with paper at t = 11: {0, 4, 5} plus the best other: block 1
    int32_t sel4[12 * 4];
    cp.n = 4;
    desc_of(&desc, &cp);
    CHECK(ref_attention(&desc, q, k, v, g, NULL, out, sel4, NULL) == 0);
    CHECK(sel4[44] == 0 && sel4[45] == 1 && sel4[46] == 4 && sel4[47] == 5);

    // ties go to the lower block: all keys equal
    for (int t = 0; t < T; t++)
        k[t] = 0.5;
    cp.fixed = FN;
    cp.n = 2;
    desc_of(&desc, &cp);
    CHECK(ref_attention(&desc, q, k, v, g, NULL, out, sel, NULL) == 0);
    CHECK(sel[22] == 0 && sel[23] == 1);

    // cmp_attn, r = l = b = 2: scores are p_cmp; compressed key j = mean of block j.
    // With q large, p_cmp concentrates on the block with the largest mean key.
    for (int t = 0; t < T; t++) {
        q[t] = 50.0;
        k[t] = block_mean[t / 2];
    }
    att_case cc = {"", 1, T, 1, 1, 1, 2, 1, 2, 2, 1, CA, FN, 0, 0};
    desc_of(&desc, &cc);
    int32_t sel1[12];
    CHECK(ref_attention(&desc, q, k, v, g, NULL, out, sel1, NULL) == 0);
    CHECK(sel1[11] == 1); // blocks 0..4 visible (5 only complete at t = 11: also visible)
    CHECK(sel1[2] == 0);  // t = 2: only block 0's compressed token visible
    CHECK(sel1[0] == 0);  // t = 0: no visible token, all scores 0, tie -> block 0
    // selected path output at t = 11 is then the mean of v over block 1 weighted by
    // softmax of q*k/sqrt(1) (equal keys in the block): (2 + 3) / 2
    CHECK(fabs(out[11] - 2.5) < 1e-12);
}

// ----------------------------------------------------------------------------------------
// Bad input through the op

static void expect_status(const char *what, nsa_status got, nsa_status want)
{
    CHECKF(got == want, "%s: status %d, want %d", what, (int)got, (int)want);
    CHECKF(got == NSA_OK || nsa_last_error()[0] != '\0', "%s: empty nsa_last_error()", what);
}

static void test_bad_input(void)
{
    const att_case good = {"", 1, 20, 4, 2, 8, 4, 5, 2, 4, 3, CA, FN, 0, 0};
    const size_t nq = 20 * 4 * 8, nk = 20 * 2 * 8, ng = 20 * 4 * 3, ns = 20 * 2 * 3;
    test_rng rng = {31};
    float *q = malloc(sizeof(float) * nq), *k = malloc(sizeof(float) * nk);
    float *v = malloc(sizeof(float) * nk), *gates = malloc(sizeof(float) * ng);
    float *out = malloc(sizeof(float) * nq);
    int32_t *idx = malloc(sizeof(int32_t) * ns), *sel = malloc(sizeof(int32_t) * ns);
    test_fill(&rng, q, nq, 1.0);
    test_fill(&rng, k, nk, 1.0);
    test_fill(&rng, v, nk, 1.0);
    for (size_t i = 0; i < ng; i++)
        gates[i] = (float)(0.5 + 0.5 * test_rng_uniform(&rng));
    nsa_attention_desc desc;
    desc_of(&desc, &good);
    expect_status("good", nsa_attention_forward(ctx, &desc, q, k, v, gates, NULL, out, sel),
                  NSA_OK);

    expect_status("NULL ctx", nsa_attention_forward(NULL, &desc, q, k, v, gates, NULL, out, sel),
                  NSA_ERR_INVALID);
    expect_status("NULL desc", nsa_attention_forward(ctx, NULL, q, k, v, gates, NULL, out, sel),
                  NSA_ERR_INVALID);
    expect_status("NULL q", nsa_attention_forward(ctx, &desc, NULL, k, v, gates, NULL, out, sel),
                  NSA_ERR_INVALID);
    expect_status("NULL k", nsa_attention_forward(ctx, &desc, q, NULL, v, gates, NULL, out, sel),
                  NSA_ERR_INVALID);
    expect_status("NULL v", nsa_attention_forward(ctx, &desc, q, k, NULL, gates, NULL, out, sel),
                  NSA_ERR_INVALID);
    expect_status("NULL gates", nsa_attention_forward(ctx, &desc, q, k, v, NULL, NULL, out, sel),
                  NSA_ERR_INVALID);
    expect_status("NULL out", nsa_attention_forward(ctx, &desc, q, k, v, gates, NULL, NULL, sel),
                  NSA_ERR_INVALID);

    struct {
        const char *what;
        att_case c;
    } bad[] = {
        {"H % G != 0", {"", 1, 20, 4, 3, 8, 4, 5, 2, 4, 3, MK, FN, 0, 0}},
        {"block_size 0", {"", 1, 20, 4, 2, 8, 0, 5, 2, 4, 3, MK, FN, 0, 0}},
        {"l not a multiple of r", {"", 1, 20, 4, 2, 8, 4, 5, 2, 3, 3, MK, FN, 0, 0}},
        {"cmp_attn with b % r != 0", {"", 1, 20, 4, 2, 8, 5, 5, 2, 4, 3, CA, FN, 0, 0}},
        {"paper with n < 3", {"", 1, 20, 4, 2, 8, 4, 5, 2, 4, 2, MK, FP, 0, 0}},
        {"window 0", {"", 1, 20, 4, 2, 8, 4, 0, 2, 4, 3, MK, FN, 0, 0}},
        {"ratio 0", {"", 1, 20, 4, 2, 8, 4, 5, 0, 4, 3, MK, FN, 0, 0}},
        {"n 0", {"", 1, 20, 4, 2, 8, 4, 5, 2, 4, 0, MK, FN, 0, 0}},
        {"head_dim 0", {"", 1, 20, 4, 2, 0, 4, 5, 2, 4, 3, MK, FN, 0, 0}},
        {"seq_len 0", {"", 1, 0, 4, 2, 8, 4, 5, 2, 4, 3, MK, FN, 0, 0}},
        {"batch 0", {"", 0, 20, 4, 2, 8, 4, 5, 2, 4, 3, MK, FN, 0, 0}},
        {"num_kv_heads 0", {"", 1, 20, 4, 0, 8, 4, 5, 2, 4, 3, MK, FN, 0, 0}},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        nsa_attention_desc bd;
        desc_of(&bd, &bad[i].c);
        // the arrays are big enough for every case (H <= 4, G <= 3, d <= 8, T <= 20)
        float *big_k = malloc(sizeof(float) * nq), *big_v = malloc(sizeof(float) * nq);
        test_fill(&rng, big_k, nq, 1.0);
        test_fill(&rng, big_v, nq, 1.0);
        expect_status(bad[i].what,
                      nsa_attention_forward(ctx, &bd, q, big_k, big_v, gates, NULL, out, NULL),
                      NSA_ERR_INVALID);
        free(big_k);
        free(big_v);
    }

    // non-finite data
    float keep = q[37];
    q[37] = NAN;
    expect_status("NaN in q", nsa_attention_forward(ctx, &desc, q, k, v, gates, NULL, out, sel),
                  NSA_ERR_NUMERIC);
    q[37] = keep;
    keep = k[5];
    k[5] = INFINITY;
    expect_status("Inf in k", nsa_attention_forward(ctx, &desc, q, k, v, gates, NULL, out, sel),
                  NSA_ERR_NUMERIC);
    k[5] = keep;

    // block_indices out of range: 5 blocks of 4 cover T = 20
    for (size_t i = 0; i < ns; i++)
        idx[i] = i % 3 == 0 ? 0 : -1; // block 0 in slot 0, the other slots unused
    expect_status("indices: block 0 only",
                  nsa_attention_forward(ctx, &desc, q, k, v, gates, idx, out, sel), NSA_OK);
    const size_t last = ((size_t)19 * 2 + 1) * 3; // t = 19, g = 1, slot 0
    idx[last] = 5;
    expect_status("index = number of blocks",
                  nsa_attention_forward(ctx, &desc, q, k, v, gates, idx, out, sel),
                  NSA_ERR_INVALID);
    idx[last] = 4; // block 4 starts at 16 <= 19: fine
    expect_status("index of the last block",
                  nsa_attention_forward(ctx, &desc, q, k, v, gates, idx, out, sel), NSA_OK);
    idx[last] = 0;
    const size_t early = ((size_t)6 * 2 + 0) * 3 + 2; // t = 6, g = 0, slot 2
    idx[early] = 2; // block 2 starts at 8 > 6: the future
    expect_status("index of a future block",
                  nsa_attention_forward(ctx, &desc, q, k, v, gates, idx, out, sel),
                  NSA_ERR_INVALID);
    idx[early] = -2;
    expect_status("index -2", nsa_attention_forward(ctx, &desc, q, k, v, gates, idx, out, sel),
                  NSA_ERR_INVALID);
    idx[early] = -1;
    expect_status("index -1 (unused slot)",
                  nsa_attention_forward(ctx, &desc, q, k, v, gates, idx, out, sel), NSA_OK);

    free(q);
    free(k);
    free(v);
    free(gates);
    free(out);
    free(idx);
    free(sel);
}

// ----------------------------------------------------------------------------------------

int main(void)
{
    RUN(test_ref_paths_equal_full_attention);
    RUN(test_ref_causal);
    RUN(test_ref_given_and_gqa);
    RUN(test_ref_selection_by_hand);

    nsa_status st = nsa_context_create(&ctx, NSA_DEVICE_CPU, 0);
    if (st != NSA_OK) {
        printf("FAIL nsa_context_create: %s\n", nsa_last_error());
        harness_failed++;
        return harness_finish();
    }
    RUN(test_mean_key);
    RUN(test_cmp_attn);
    RUN(test_select_fixed_paper);
    RUN(test_gqa);
    RUN(test_overlapping_compression);
    RUN(test_odd_T);
    RUN(test_short_T);
    RUN(test_batch);
    RUN(test_given_indices);
    RUN(test_n_above_blocks);
    RUN(test_paper_like);
    RUN(test_explicit_scale);
    RUN(test_bad_input);
    nsa_context_free(ctx);
    return harness_finish();
}
