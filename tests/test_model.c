/*
 * test_model.c — the configuration (SPEC §1, §4, §7 names) and the whole model on the CPU
 * (SPEC §2, §3, §5) against the float64 reference of tests/ref64.c.
 *
 * Weights come from nsa_model_init and are then perturbed with small noise (so that
 * biases, norms, gates and compression parameters are not trivially 0 or 1), written back
 * with nsa_model_set_params, read again, converted to double and handed to the reference
 * by their SPEC §7 names. The parameter table itself is checked against the names and
 * shapes of SPEC §7, so the reference never trusts the library's layout blindly.
 */
#include "harness.h"
#include "nsa.h"
#include "ref64.h"

#include <ctype.h>
#include <stdarg.h>

// ----------------------------------------------------------------------------------------
// Helpers

static nsa_context *ctx;

// Does msg name `option` as a word (not as part of a longer name)?
static int names_option(const char *msg, const char *option)
{
    size_t n = strlen(option);
    for (const char *p = strstr(msg, option); p; p = strstr(p + 1, option)) {
        int before = p == msg || !(isalnum((unsigned char)p[-1]) || p[-1] == '_');
        int after = !(isalnum((unsigned char)p[n]) || p[n] == '_');
        if (before && after)
            return 1;
    }
    return 0;
}

// A small valid config: the seed's defaults scaled down.
static nsa_config small_config(void)
{
    nsa_config c;
    nsa_config_default(&c);
    c.embed_dim = 12;
    c.hidden_size = 16;
    c.num_heads = 2;
    c.head_dim = 8;
    c.num_layers = 2;
    c.window_size = 5;
    c.block_size = 7;
    c.compression_ratio = 3;
    c.num_selected_blocks = 3; // 9 blocks at T = 61: the selection really chooses
    c.seq_len = 61;
    return c;
}

static double *to_double(const float *x, size_t n)
{
    double *y = malloc(sizeof(double) * (n ? n : 1));
    for (size_t i = 0; i < n; i++)
        y[i] = x[i];
    return y;
}

// ----------------------------------------------------------------------------------------
// The expected parameter table of SPEC §7

typedef struct expected_tensor {
    char name[96];
    int ndim;
    int64_t shape[4];
} expected_tensor;

typedef struct expected_table {
    expected_tensor t[512];
    int count;
} expected_table;

static void add(expected_table *tab, int ndim, int64_t s0, int64_t s1, int64_t s2,
                const char *fmt, ...)
{
    expected_tensor *e = &tab->t[tab->count++];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->name, sizeof e->name, fmt, ap);
    va_end(ap);
    e->ndim = ndim;
    e->shape[0] = s0;
    e->shape[1] = s1;
    e->shape[2] = s2;
    e->shape[3] = 0;
}

static void expected_tensors(const nsa_config *c, expected_table *tab)
{
    const int64_t E = c->embed_dim, D = c->hidden_size, H = c->num_heads, d = c->head_dim;
    const int64_t G = ref_kv_heads(c), l = ref_compression_block(c), V = c->vocab_size;
    tab->count = 0;
    if (V > 0)
        add(tab, 2, V, E, 0, "embed.weight");
    if (E != D) {
        add(tab, 2, D, E, 0, "in_proj.weight");
        add(tab, 1, D, 0, 0, "in_proj.bias");
    }
    for (int i = 0; i < c->num_layers; i++) {
        add(tab, 1, D, 0, 0, "layers.%d.attn_norm.weight", i);
        add(tab, 1, D, 0, 0, "layers.%d.attn_norm.bias", i);
        add(tab, 2, H * d, D, 0, "layers.%d.attn.q_proj.weight", i);
        add(tab, 1, H * d, 0, 0, "layers.%d.attn.q_proj.bias", i);
        add(tab, 2, G * d, D, 0, "layers.%d.attn.k_proj.weight", i);
        add(tab, 1, G * d, 0, 0, "layers.%d.attn.k_proj.bias", i);
        add(tab, 2, G * d, D, 0, "layers.%d.attn.v_proj.weight", i);
        add(tab, 1, G * d, 0, 0, "layers.%d.attn.v_proj.bias", i);
        add(tab, 2, D, H * d, 0, "layers.%d.attn.o_proj.weight", i);
        add(tab, 1, D, 0, 0, "layers.%d.attn.o_proj.bias", i);
        if (c->gate == NSA_GATE_STATIC) {
            add(tab, 1, 3, 0, 0, "layers.%d.attn.gate", i);
        } else {
            add(tab, 2, 3 * H, D, 0, "layers.%d.attn.gate_proj.weight", i);
            add(tab, 1, 3 * H, 0, 0, "layers.%d.attn.gate_proj.bias", i);
        }
        const char *kv[2] = {"compress_k", "compress_v"};
        for (int w = 0; w < 2; w++) {
            if (c->compress == NSA_COMPRESS_CONV) {
                add(tab, 3, G, l, d, "layers.%d.attn.%s.weight", i, kv[w]);
            } else if (c->compress == NSA_COMPRESS_MLP) {
                add(tab, 2, l, d, 0, "layers.%d.attn.%s.pos", i, kv[w]);
                add(tab, 2, d, l * d, 0, "layers.%d.attn.%s.fc1.weight", i, kv[w]);
                add(tab, 1, d, 0, 0, "layers.%d.attn.%s.fc1.bias", i, kv[w]);
                add(tab, 2, d, d, 0, "layers.%d.attn.%s.fc2.weight", i, kv[w]);
                add(tab, 1, d, 0, 0, "layers.%d.attn.%s.fc2.bias", i, kv[w]);
            }
        }
        add(tab, 1, D, 0, 0, "layers.%d.ffn_norm.weight", i);
        add(tab, 1, D, 0, 0, "layers.%d.ffn_norm.bias", i);
        add(tab, 2, 4 * D, D, 0, "layers.%d.ffn.up.weight", i);
        add(tab, 1, 4 * D, 0, 0, "layers.%d.ffn.up.bias", i);
        add(tab, 2, D, 4 * D, 0, "layers.%d.ffn.down.weight", i);
        add(tab, 1, D, 0, 0, "layers.%d.ffn.down.bias", i);
    }
    add(tab, 1, D, 0, 0, "final_norm.weight");
    add(tab, 1, D, 0, 0, "final_norm.bias");
    if (V > 0) {
        add(tab, 2, V, D, 0, "lm_head.weight");
        add(tab, 1, V, 0, 0, "lm_head.bias");
    }
}

static int cmp_size(const void *a, const void *b)
{
    const size_t *x = a, *y = b;
    return (x[0] > y[0]) - (x[0] < y[0]);
}

// Checks the model's table against SPEC §7 (names, shapes, every one once) and that the
// tensors tile the buffer exactly. Returns the number of trained scalars of SPEC §4
// summed from the table (everything but embed and lm_head).
static int64_t check_table(nsa_model *m, const nsa_config *cfg, const char *what)
{
    static expected_table tab;
    expected_tensors(cfg, &tab);
    size_t nt = nsa_model_num_tensors(m);
    CHECKF((int)nt == tab.count, "%s: %zu tensors, SPEC §7 lists %d", what, nt, tab.count);
    int *seen = calloc((size_t)tab.count, sizeof(int));
    size_t *spans = malloc(sizeof(size_t) * 2 * (nt ? nt : 1));
    int64_t trained = 0;
    for (size_t i = 0; i < nt; i++) {
        nsa_tensor_info info;
        if (nsa_model_tensor(m, i, &info) != NSA_OK) {
            CHECKF(0, "%s: nsa_model_tensor(%zu) failed: %s", what, i, nsa_last_error());
            continue;
        }
        spans[2 * i] = info.offset;
        spans[2 * i + 1] = info.numel;
        if (strcmp(info.name, "embed.weight") && strncmp(info.name, "lm_head.", 8))
            trained += (int64_t)info.numel;
        int found = -1;
        for (int j = 0; j < tab.count; j++)
            if (strcmp(tab.t[j].name, info.name) == 0)
                found = j;
        if (found < 0) {
            CHECKF(0, "%s: tensor %s is not in SPEC §7", what, info.name);
            continue;
        }
        CHECKF(!seen[found], "%s: tensor %s listed twice", what, info.name);
        seen[found] = 1;
        const expected_tensor *e = &tab.t[found];
        int same = info.ndim == e->ndim;
        int64_t numel = 1;
        for (int k = 0; same && k < e->ndim; k++) {
            same = info.shape[k] == e->shape[k];
            numel *= e->shape[k];
        }
        CHECKF(same, "%s: %s has ndim %d shape [%lld,%lld,%lld], SPEC says ndim %d [%lld,%lld,%lld]",
               what, info.name, info.ndim, (long long)info.shape[0], (long long)info.shape[1],
               (long long)info.shape[2], e->ndim, (long long)e->shape[0], (long long)e->shape[1],
               (long long)e->shape[2]);
        CHECKF(!same || (int64_t)info.numel == numel, "%s: %s numel %zu", what, info.name,
               info.numel);
        CHECK(nsa_model_find_tensor(m, info.name) == (int64_t)i);
    }
    for (int j = 0; j < tab.count; j++)
        CHECKF(seen[j], "%s: SPEC §7 tensor %s missing", what, tab.t[j].name);
    // the tensors lie inside the buffer without overlapping (the library may pad between
    // them for alignment, so gaps are allowed)
    qsort(spans, nt, 2 * sizeof(size_t), cmp_size);
    size_t at = 0;
    for (size_t i = 0; i < nt; i++) {
        CHECKF(spans[2 * i] >= at, "%s: tensor at offset %zu overlaps the one before (ends %zu)",
               what, spans[2 * i], at);
        at = spans[2 * i] + spans[2 * i + 1];
    }
    CHECKF(at <= nsa_model_buffer_size(m), "%s: tensors end at %zu, buffer_size %zu", what, at,
           nsa_model_buffer_size(m));
    CHECK(nsa_model_find_tensor(m, "no.such.tensor") == -1);
    free(seen);
    free(spans);
    return trained;
}

// ----------------------------------------------------------------------------------------
// Configuration

static void test_config_default(void)
{
    nsa_config c;
    memset(&c, 0x5a, sizeof c);
    nsa_config_default(&c);
    CHECK(c.embed_dim == 0);
    CHECK(c.hidden_size == 256);
    CHECK(c.num_heads == 8);
    CHECK(c.head_dim == 32);
    CHECK(c.window_size == 64);
    CHECK(c.block_size == 16);
    CHECK(c.num_selected_blocks == 8);
    CHECK(c.compression_ratio == 4);
    CHECK(c.num_layers == 4);
    CHECK(c.dropout == 0.1);
    CHECK(c.seq_len == 256);
    CHECK(c.num_kv_heads == 0 || c.num_kv_heads == 8);
    CHECK(nsa_config_kv_heads(&c) == 8);
    CHECK(c.compression_block == 0 || c.compression_block == 4);
    CHECK(nsa_config_compression_block(&c) == 4);
    CHECK(c.compress == NSA_COMPRESS_MEAN);
    CHECK(c.select_score == NSA_SELECT_MEAN_KEY);
    CHECK(c.select_fixed == NSA_SELECT_FIXED_NONE);
    CHECK(c.gate == NSA_GATE_STATIC);
    CHECK(c.rope_theta == 0.0);
    CHECK(c.vocab_size == 0);
    // embed_dim is required
    CHECK(nsa_config_validate(&c) == NSA_ERR_INVALID);
    CHECK(names_option(nsa_last_error(), "embed_dim"));
    c.embed_dim = 64;
    CHECK(nsa_config_validate(&c) == NSA_OK);

    nsa_config r;
    memset(&r, 0x33, sizeof r);
    nsa_recommended_defaults(&r);
    nsa_config_default(&c);
    CHECK(memcmp(&r, &c, sizeof c) == 0 ||
          (r.hidden_size == 256 && r.num_heads == 8 && r.head_dim == 32 && r.window_size == 64 &&
           r.block_size == 16 && r.num_selected_blocks == 8 && r.compression_ratio == 4 &&
           r.num_layers == 4 && r.dropout == 0.1));
}

static void test_paper_defaults(void)
{
    nsa_config c;
    nsa_paper_defaults(&c);
    CHECK(c.num_heads >= 4);
    CHECK(nsa_config_kv_heads(&c) == c.num_heads / 4);
    CHECK(nsa_config_compression_block(&c) == 32);
    CHECK(c.compression_ratio == 16);
    CHECK(c.block_size == 64);
    CHECK(c.num_selected_blocks == 16);
    CHECK(c.select_fixed == NSA_SELECT_FIXED_PAPER);
    CHECK(c.window_size == 512);
    CHECK(c.compress == NSA_COMPRESS_MLP);
    CHECK(c.select_score == NSA_SELECT_CMP_ATTN);
    CHECK(c.gate == NSA_GATE_TOKEN);
    CHECK(c.rope_theta == 10000.0);
    CHECK(c.embed_dim == 0);
    c.embed_dim = 64;
    CHECK(nsa_config_validate(&c) == NSA_OK);
}

static void expect_rejected(const char *what, const nsa_config *c, const char *option)
{
    nsa_status st = nsa_config_validate(c);
    CHECKF(st == NSA_ERR_INVALID, "%s: validate returned %d", what, (int)st);
    if (st != NSA_OK)
        CHECKF(names_option(nsa_last_error(), option), "%s: message \"%s\" does not name %s",
               what, nsa_last_error(), option);
    CHECKF(nsa_param_count(c) == -1, "%s: param_count of an invalid config is not -1", what);
    CHECKF(nsa_output_size(c) == -1, "%s: output_size of an invalid config is not -1", what);
}

static void test_config_validate(void)
{
    nsa_config base;
    nsa_config_default(&base);
    base.embed_dim = 32;
    CHECK(nsa_config_validate(&base) == NSA_OK);
    nsa_config c;
#define BREAK(field, value, option)              \
    do {                                         \
        c = base;                                \
        c.field = value;                         \
        expect_rejected(#field " = " #value, &c, option); \
    } while (0)
    BREAK(embed_dim, 0, "embed_dim");
    BREAK(embed_dim, -3, "embed_dim");
    BREAK(hidden_size, 0, "hidden_size");
    BREAK(num_heads, 0, "num_heads");
    BREAK(head_dim, 0, "head_dim");
    BREAK(window_size, 0, "window_size");
    BREAK(block_size, 0, "block_size");
    BREAK(num_selected_blocks, 0, "num_selected_blocks");
    BREAK(compression_ratio, 0, "compression_ratio");
    BREAK(num_layers, 0, "num_layers");
    BREAK(dropout, -0.1, "dropout");
    BREAK(dropout, 1.0, "dropout");
    BREAK(dropout, NAN, "dropout");
    BREAK(seq_len, 0, "seq_len");
    BREAK(num_kv_heads, 3, "num_kv_heads"); // does not divide 8
    BREAK(num_kv_heads, -2, "num_kv_heads");
    BREAK(compression_block, 6, "compression_block"); // not a multiple of r = 4
    BREAK(compression_block, 2, "compression_block");
    BREAK(compress, (nsa_compress)7, "compress");
    BREAK(select_score, (nsa_select_score)5, "select_score");
    BREAK(select_fixed, (nsa_select_fixed)9, "select_fixed");
    BREAK(gate, (nsa_gate)4, "gate");
    BREAK(vocab_size, -1, "vocab_size");
#undef BREAK
    // cmp_attn needs b % r == 0 (16 % 5)
    c = base;
    c.select_score = NSA_SELECT_CMP_ATTN;
    c.compression_ratio = 5;
    expect_rejected("cmp_attn with b % r != 0", &c, "select_score");
    // select_fixed paper needs n >= 3
    c = base;
    c.select_fixed = NSA_SELECT_FIXED_PAPER;
    c.num_selected_blocks = 2;
    expect_rejected("paper with n = 2", &c, "select_fixed");
    // rope needs an even head_dim
    c = base;
    c.rope_theta = 10000.0;
    c.head_dim = 7;
    expect_rejected("rope with odd head_dim", &c, "rope_theta");

    // valid edges are accepted
    c = base;
    c.dropout = 0.0;
    c.num_kv_heads = 1;
    c.compression_block = 12; // 3r
    c.select_score = NSA_SELECT_CMP_ATTN;
    c.select_fixed = NSA_SELECT_FIXED_PAPER;
    c.num_selected_blocks = 3;
    c.rope_theta = 10000.0;
    c.vocab_size = 5;
    c.seq_len = 61; // divides by nothing: fine
    c.num_heads = 3;
    c.head_dim = 6;
    c.hidden_size = 17; // H*d != D
    CHECKF(nsa_config_validate(&c) == NSA_OK, "valid edges refused: %s", nsa_last_error());
    c.dropout = 0.999;
    c.window_size = 1;
    c.block_size = 1;
    c.compression_ratio = 1;
    c.compression_block = 1;
    CHECKF(nsa_config_validate(&c) == NSA_OK, "valid edges refused: %s", nsa_last_error());
    CHECK(nsa_config_validate(NULL) == NSA_ERR_INVALID);
}

static void test_param_count(void)
{
    nsa_config c;
    nsa_config_default(&c);
    c.embed_dim = 64;
    c.hidden_size = 32;
    c.num_heads = 4;
    c.head_dim = 8;
    c.num_layers = 2;
    CHECK(nsa_param_count(&c) == 27558);
    CHECK(ref_param_count(&c) == 27558);
    CHECK(nsa_output_size(&c) == 32);

    // every combination of the options that change the parameter set, counted three ways:
    // the library, the formula of ref64.c and the sum over the model's tensor table
    int combos = 0;
    for (int compress = 0; compress < 3; compress++)
        for (int gate = 0; gate < 2; gate++)
            for (int gqa = 0; gqa < 2; gqa++)
                for (int same_ed = 0; same_ed < 2; same_ed++)
                    for (int vocab = 0; vocab < 2; vocab++) {
                        nsa_config_default(&c);
                        c.hidden_size = 24;
                        c.embed_dim = same_ed ? 24 : 10;
                        c.num_heads = 4;
                        c.num_kv_heads = gqa ? 2 : 0;
                        c.head_dim = 5; // H*d = 20 != D
                        c.num_layers = 2;
                        c.compression_ratio = 2;
                        c.compression_block = 6;
                        c.compress = (nsa_compress)compress;
                        c.gate = (nsa_gate)gate;
                        c.select_score = (nsa_select_score)(combos % 2);
                        c.vocab_size = vocab ? 7 : 0;
                        char what[96];
                        snprintf(what, sizeof what, "compress %d gate %d gqa %d E==D %d V %d",
                                 compress, gate, gqa, same_ed, vocab);
                        int64_t lib = nsa_param_count(&c), ref = ref_param_count(&c);
                        CHECKF(lib == ref, "%s: param_count %lld, reference %lld", what,
                               (long long)lib, (long long)ref);
                        CHECK(nsa_output_size(&c) == 24);
                        nsa_model *m = NULL;
                        nsa_status st = nsa_model_create(&m, ctx, &c);
                        CHECKF(st == NSA_OK, "%s: nsa_model_create: %s", what, nsa_last_error());
                        if (st == NSA_OK) {
                            int64_t table = check_table(m, &c, what);
                            CHECKF(table == ref, "%s: table sums to %lld, reference %lld", what,
                                   (long long)table, (long long)ref);
                            // embed [V,E] and lm_head [V,D] + [V] live in the buffer too;
                            // the buffer may hold alignment padding (at most 16 floats a tensor)
                            size_t extra = vocab ? (size_t)7 * c.embed_dim + 7 * 24 + 7 : 0;
                            size_t bs = nsa_model_buffer_size(m), need = (size_t)ref + extra;
                            CHECKF(bs >= need && bs <= need + 16 * nsa_model_num_tensors(m),
                                   "%s: buffer_size %zu for %zu floats", what, bs, need);
                        }
                        nsa_model_free(m);
                        combos++;
                    }
}

static const char *const spec_options[] = {
    "embed_dim", "hidden_size", "num_heads", "head_dim", "window_size", "block_size",
    "num_selected_blocks", "compression_ratio", "num_layers", "dropout", "seq_len",
    "num_kv_heads", "compression_block", "compress", "select_score", "select_fixed", "gate",
    "rope_theta", "vocab_size",
};

static void test_config_set_get(void)
{
    const int nopt = nsa_config_num_options();
    for (size_t i = 0; i < sizeof spec_options / sizeof spec_options[0]; i++) {
        int found = 0;
        for (int j = 0; j < nopt; j++)
            found |= nsa_config_option_name(j) && !strcmp(nsa_config_option_name(j), spec_options[i]);
        CHECKF(found, "option %s missing from nsa_config_option_name", spec_options[i]);
    }

    nsa_config a;
    nsa_config_default(&a);
    a.embed_dim = 24;
    a.hidden_size = 40;
    a.num_heads = 6;
    a.head_dim = 6;
    a.window_size = 9;
    a.block_size = 10;
    a.num_selected_blocks = 5;
    a.compression_ratio = 5;
    a.num_layers = 3;
    a.dropout = 0.25;
    a.seq_len = 77;
    a.num_kv_heads = 3;
    a.compression_block = 10;
    a.compress = NSA_COMPRESS_CONV;
    a.select_score = NSA_SELECT_CMP_ATTN;
    a.select_fixed = NSA_SELECT_FIXED_PAPER;
    a.gate = NSA_GATE_TOKEN;
    a.rope_theta = 500.0;
    a.vocab_size = 33;
    CHECK(nsa_config_validate(&a) == NSA_OK);
    nsa_config b;
    nsa_config_default(&b);
    char buf[128];
    for (int j = 0; j < nopt; j++) {
        const char *name = nsa_config_option_name(j);
        if (!name) {
            CHECKF(0, "option %d has no name", j);
            continue;
        }
        nsa_status st = nsa_config_get(&a, name, buf, sizeof buf);
        CHECKF(st == NSA_OK, "get %s: %s", name, nsa_last_error());
        st = nsa_config_set(&b, name, buf);
        CHECKF(st == NSA_OK, "set %s = \"%s\": %s", name, buf, nsa_last_error());
    }
    CHECK(b.embed_dim == a.embed_dim);
    CHECK(b.hidden_size == a.hidden_size);
    CHECK(b.num_heads == a.num_heads);
    CHECK(b.head_dim == a.head_dim);
    CHECK(b.window_size == a.window_size);
    CHECK(b.block_size == a.block_size);
    CHECK(b.num_selected_blocks == a.num_selected_blocks);
    CHECK(b.compression_ratio == a.compression_ratio);
    CHECK(b.num_layers == a.num_layers);
    CHECK(b.dropout == a.dropout);
    CHECK(b.seq_len == a.seq_len);
    CHECK(nsa_config_kv_heads(&b) == 3);
    CHECK(nsa_config_compression_block(&b) == 10);
    CHECK(b.compress == a.compress);
    CHECK(b.select_score == a.select_score);
    CHECK(b.select_fixed == a.select_fixed);
    CHECK(b.gate == a.gate);
    CHECK(b.rope_theta == a.rope_theta);
    CHECK(b.vocab_size == a.vocab_size);

    // the spelled values of the enum options
    struct {
        const char *name, *value;
        int want;
        int *field;
    } spelled[] = {
        {"compress", "mean", NSA_COMPRESS_MEAN, (int *)&b.compress},
        {"compress", "conv", NSA_COMPRESS_CONV, (int *)&b.compress},
        {"compress", "mlp", NSA_COMPRESS_MLP, (int *)&b.compress},
        {"select_score", "mean_key", NSA_SELECT_MEAN_KEY, (int *)&b.select_score},
        {"select_score", "cmp_attn", NSA_SELECT_CMP_ATTN, (int *)&b.select_score},
        {"select_fixed", "none", NSA_SELECT_FIXED_NONE, (int *)&b.select_fixed},
        {"select_fixed", "paper", NSA_SELECT_FIXED_PAPER, (int *)&b.select_fixed},
        {"gate", "static", NSA_GATE_STATIC, (int *)&b.gate},
        {"gate", "token", NSA_GATE_TOKEN, (int *)&b.gate},
    };
    for (size_t i = 0; i < sizeof spelled / sizeof spelled[0]; i++) {
        nsa_status st = nsa_config_set(&b, spelled[i].name, spelled[i].value);
        CHECKF(st == NSA_OK && *spelled[i].field == spelled[i].want, "set %s = %s",
               spelled[i].name, spelled[i].value);
        CHECK(nsa_config_get(&b, spelled[i].name, buf, sizeof buf) == NSA_OK &&
              strcmp(buf, spelled[i].value) == 0);
    }

    // errors name the option
    CHECK(nsa_config_set(&b, "compress", "zip") == NSA_ERR_INVALID);
    CHECK(names_option(nsa_last_error(), "compress"));
    CHECK(nsa_config_set(&b, "num_heads", "eight") == NSA_ERR_INVALID);
    CHECK(names_option(nsa_last_error(), "num_heads"));
    CHECK(nsa_config_set(&b, "dropout", "0.1x") == NSA_ERR_INVALID);
    CHECK(names_option(nsa_last_error(), "dropout"));
    CHECK(nsa_config_set(&b, "no_such_option", "1") == NSA_ERR_INVALID);
    CHECK(strstr(nsa_last_error(), "no_such_option") != NULL);
    CHECK(nsa_config_get(&b, "no_such_option", buf, sizeof buf) != NSA_OK);
    // buf is always NUL-terminated
    char small[3] = {'x', 'x', 'x'};
    nsa_config_get(&a, "rope_theta", small, sizeof small);
    CHECK(memchr(small, '\0', sizeof small) != NULL);
}

static void test_attention_desc_from_config(void)
{
    nsa_config c = small_config();
    c.num_kv_heads = 1;
    c.compression_block = 6;
    c.select_score = NSA_SELECT_MEAN_KEY;
    c.select_fixed = NSA_SELECT_FIXED_PAPER;
    nsa_attention_desc d;
    memset(&d, 0x7f, sizeof d);
    nsa_attention_desc_from_config(&d, &c);
    CHECK(d.batch == 0 && d.seq_len == 0);
    CHECK(d.num_heads == 2 && d.num_kv_heads == 1 && d.head_dim == 8);
    CHECK(d.block_size == 7 && d.window_size == 5 && d.compression_ratio == 3);
    CHECK(d.compression_block == 6 && d.num_selected_blocks == 3);
    CHECK(d.select_score == NSA_SELECT_MEAN_KEY && d.select_fixed == NSA_SELECT_FIXED_PAPER);
    CHECK(d.scale == 0.0f || fabs(d.scale - 1.0 / sqrt(8.0)) < 1e-7);
}

// ----------------------------------------------------------------------------------------
// The model against the reference

// Model weights: init(seed), then + noise, written back; `pd` gets them in double.
typedef struct model_fixture {
    nsa_model *model;
    float *params;
    double *pd;
    ref_tensor *tensors;
    ref_params table;
} model_fixture;

static int fixture_open(model_fixture *f, const nsa_config *cfg, uint64_t seed, const char *what)
{
    memset(f, 0, sizeof *f);
    nsa_status st = nsa_model_create(&f->model, ctx, cfg);
    CHECKF(st == NSA_OK, "%s: nsa_model_create: %s", what, nsa_last_error());
    if (st != NSA_OK)
        return 0;
    st = nsa_model_init(f->model, seed);
    CHECKF(st == NSA_OK, "%s: nsa_model_init: %s", what, nsa_last_error());
    check_table(f->model, cfg, what);
    size_t n = nsa_model_buffer_size(f->model), nt = nsa_model_num_tensors(f->model);
    f->params = malloc(sizeof(float) * n);
    float *back = malloc(sizeof(float) * n);
    CHECK(nsa_model_get_params(f->model, f->params) == NSA_OK);
    test_rng rng = {seed ^ 0xabcdefull};
    for (size_t i = 0; i < nt; i++) {
        nsa_tensor_info info;
        if (nsa_model_tensor(f->model, i, &info) != NSA_OK)
            continue;
        size_t len = strlen(info.name);
        // static gates get larger noise so the three paths weigh differently
        double noise = len >= 5 && !strcmp(info.name + len - 5, ".gate") ? 0.7 : 0.1;
        for (size_t j = 0; j < info.numel; j++)
            f->params[info.offset + j] += (float)(noise * test_rng_uniform(&rng));
    }
    CHECK(nsa_model_set_params(f->model, f->params) == NSA_OK);
    CHECK(nsa_model_get_params(f->model, back) == NSA_OK);
    CHECKF(memcmp(back, f->params, sizeof(float) * n) == 0, "%s: get_params after set_params differs",
           what);
    free(back);
    f->pd = to_double(f->params, n);
    f->tensors = calloc(nt ? nt : 1, sizeof(ref_tensor));
    for (size_t i = 0; i < nt; i++) {
        nsa_tensor_info info;
        if (nsa_model_tensor(f->model, i, &info) != NSA_OK)
            continue;
        f->tensors[i].name = info.name;
        f->tensors[i].data = f->pd + info.offset;
        f->tensors[i].numel = info.numel;
    }
    f->table.tensors = f->tensors;
    f->table.count = nt;
    return 1;
}

static void fixture_close(model_fixture *f)
{
    nsa_model_free(f->model);
    free(f->params);
    free(f->pd);
    free(f->tensors);
}

// Compares out (float) with ref (double), mentions near-ties of the selection on failure.
static void compare(const char *what, const char *part, const float *got, const double *ref,
                    size_t n, double tol, const ref_attn_stats *stats)
{
    char label[192];
    snprintf(label, sizeof label, "%s: %s", what, part);
    if (!harness_compare(label, got, ref, n, tol) && stats)
        fprintf(stderr, "  %s: smallest relative selection margin in the reference: %.3g\n",
                label, stats->min_margin);
}

// The model tolerance: float32 against float64, max-abs relative to the largest |ref|.
#define TOL_MODEL TOL_F32

// Every entry point of the model on random inputs against the reference.
static void check_model(const char *what, const nsa_config *cfg, int B, int T, uint64_t seed)
{
    model_fixture f;
    if (!fixture_open(&f, cfg, seed, what))
        return;
    const int E = cfg->embed_dim, D = cfg->hidden_size, V = cfg->vocab_size;
    const size_t nx = (size_t)B * T * E, nall = (size_t)B * T * D;
    test_rng rng = {seed * 7919 + 1};
    float *x = malloc(sizeof(float) * nx), *out = malloc(sizeof(float) * nall);
    float *xd = malloc(sizeof(float) * nall);
    double *ref = malloc(sizeof(double) * nall);
    ref_attn_stats stats;
    test_fill(&rng, x, nx, 1.0);
    double *x64 = to_double(x, nx);

    // whole model, last position and all positions
    for (int all = 0; all < 2; all++) {
        size_t n = all ? nall : (size_t)B * D;
        test_poison(out, nall);
        nsa_status st = nsa_model_forward(f.model, x, B, T, all ? NSA_FWD_ALL_POSITIONS : 0, out);
        CHECKF(st == NSA_OK, "%s: nsa_model_forward: %s", what, nsa_last_error());
        int rs = ref_model_forward(cfg, &f.table, x64, B, T, all, ref, &stats);
        CHECKF(rs == 0, "%s: reference model failed", what);
        if (st == NSA_OK && rs == 0)
            compare(what, all ? "forward all positions" : "forward last position", out, ref, n,
                    TOL_MODEL, &stats);
        if (!all && st == NSA_OK)
            for (size_t i = n; i < nall; i++) // nothing written past [B,D]
                CHECKF(isnan(out[i]), "%s: forward wrote past [B,D] at %zu", what, i);
    }

    // one block and one attention layer at a time, on inputs of the hidden width
    test_fill(&rng, xd, nall, 1.0);
    double *xd64 = to_double(xd, nall);
    for (int layer = 0; layer < cfg->num_layers; layer++) {
        char part[64];
        test_poison(out, nall);
        nsa_status st = nsa_model_block_forward(f.model, layer, xd, B, T, out);
        CHECKF(st == NSA_OK, "%s: nsa_model_block_forward(%d): %s", what, layer, nsa_last_error());
        int rs = ref_block_forward(cfg, &f.table, layer, xd64, B, T, ref, &stats);
        CHECK(rs == 0);
        snprintf(part, sizeof part, "block %d", layer);
        if (st == NSA_OK && rs == 0)
            compare(what, part, out, ref, nall, TOL_MODEL, &stats);

        test_poison(out, nall);
        stats.min_margin = INFINITY;
        st = nsa_model_attention_forward(f.model, layer, xd, B, T, out);
        CHECKF(st == NSA_OK, "%s: nsa_model_attention_forward(%d): %s", what, layer,
               nsa_last_error());
        rs = ref_attention_layer_forward(cfg, &f.table, layer, xd64, B, T, ref, &stats);
        CHECK(rs == 0);
        snprintf(part, sizeof part, "attention %d", layer);
        if (st == NSA_OK && rs == 0)
            compare(what, part, out, ref, nall, TOL_MODEL, &stats);
    }
    free(xd64);

    // the language model
    if (V > 0) {
        int32_t *tokens = malloc(sizeof(int32_t) * (size_t)B * T);
        for (int i = 0; i < B * T; i++)
            tokens[i] = (int32_t)(test_rng_next(&rng) % (uint64_t)V);
        const size_t nl = (size_t)B * T * V;
        float *logits = malloc(sizeof(float) * nl), loss = NAN;
        double *ref_logits = malloc(sizeof(double) * nl), ref_loss = 0.0;
        test_poison(logits, nl);
        float *loss_ptr = T >= 2 ? &loss : NULL;
        nsa_status st = nsa_lm_forward(f.model, tokens, B, T, 0, logits, loss_ptr);
        CHECKF(st == NSA_OK, "%s: nsa_lm_forward: %s", what, nsa_last_error());
        int rs = ref_lm_forward(cfg, &f.table, tokens, B, T, ref_logits, T >= 2 ? &ref_loss : NULL,
                                &stats);
        CHECK(rs == 0);
        if (st == NSA_OK && rs == 0) {
            compare(what, "lm logits", logits, ref_logits, nl, TOL_MODEL, &stats);
            if (T >= 2)
                compare(what, "lm loss", &loss, &ref_loss, 1, TOL_MODEL, &stats);
        }
        // loss alone (no logits)
        if (T >= 2) {
            float loss2 = NAN;
            st = nsa_lm_forward(f.model, tokens, B, T, 0, NULL, &loss2);
            CHECKF(st == NSA_OK, "%s: nsa_lm_forward without logits: %s", what, nsa_last_error());
            if (st == NSA_OK && rs == 0)
                compare(what, "lm loss (no logits)", &loss2, &ref_loss, 1, TOL_MODEL, &stats);
        } else {
            float l1 = 0.0f;
            CHECKF(nsa_lm_forward(f.model, tokens, B, T, 0, logits, &l1) != NSA_OK,
                   "%s: loss with T = 1 accepted", what);
        }
        // a token out of range is refused
        tokens[B * T - 1] = V;
        st = nsa_lm_forward(f.model, tokens, B, T, 0, logits, loss_ptr);
        CHECKF(st != NSA_OK && nsa_last_error()[0], "%s: token = vocab_size accepted", what);
        tokens[B * T - 1] = -1;
        st = nsa_lm_forward(f.model, tokens, B, T, 0, logits, loss_ptr);
        CHECKF(st != NSA_OK && nsa_last_error()[0], "%s: token = -1 accepted", what);
        free(tokens);
        free(logits);
        free(ref_logits);
    }

    free(x);
    free(x64);
    free(out);
    free(xd);
    free(ref);
    fixture_close(&f);
}

static void test_model_seed_small(void)
{
    nsa_config c = small_config();
    check_model("seed small (E=12 D=16 H=2 d=8 N=2 w=5 b=7 r=3 n=3)", &c, 2, 61, 1);
    c.num_selected_blocks = 8; // the seed's n: one block of 9 left out
    check_model("seed small n=8", &c, 2, 61, 2);
    c.vocab_size = 11;
    check_model("seed small with lm (V=11)", &c, 2, 61, 3);
}

static void test_model_hd_ne_d(void)
{
    nsa_config c = small_config();
    c.num_heads = 3;
    c.head_dim = 4; // H*d = 12 != D = 16
    check_model("H*d != D", &c, 2, 61, 4);
}

static void test_model_e_eq_d(void)
{
    nsa_config c = small_config();
    c.embed_dim = 16; // no in_proj
    check_model("E == D", &c, 2, 61, 5);
}

static void test_model_gqa(void)
{
    nsa_config c = small_config();
    c.num_heads = 4;
    c.num_kv_heads = 2;
    c.head_dim = 4;
    check_model("GQA H=4 G=2", &c, 2, 61, 6);
    c.num_kv_heads = 1;
    c.select_score = NSA_SELECT_CMP_ATTN;
    c.block_size = 6;
    check_model("GQA H=4 G=1 cmp_attn", &c, 2, 47, 7);
}

static void test_model_compress(void)
{
    nsa_config c = small_config();
    c.compress = NSA_COMPRESS_CONV;
    c.compression_block = 6; // l = 2r
    check_model("conv l=6 r=3", &c, 2, 61, 8);
    c.compress = NSA_COMPRESS_MLP;
    check_model("mlp l=6 r=3", &c, 2, 61, 9);
    c.compression_block = 3;
    check_model("mlp l=r=3", &c, 2, 40, 10);
    c.compress = NSA_COMPRESS_CONV;
    c.num_kv_heads = 1;
    check_model("conv l=r=3 G=1", &c, 2, 40, 11);
}

static void test_model_cmp_attn(void)
{
    nsa_config c = small_config();
    c.select_score = NSA_SELECT_CMP_ATTN;
    c.block_size = 6; // b % r == 0
    check_model("cmp_attn b=6 r=3", &c, 2, 61, 12);
    c.compression_block = 9;
    check_model("cmp_attn b=6 r=3 l=9", &c, 2, 61, 13);
    // every score is 0 until the first compressed token is complete (t < 11): ties
    c.block_size = 3;
    c.compression_block = 12;
    c.num_selected_blocks = 2;
    check_model("cmp_attn ties b=r=3 l=12 n=2", &c, 2, 40, 23);
}

static void test_model_select_fixed_paper(void)
{
    nsa_config c = small_config();
    c.select_fixed = NSA_SELECT_FIXED_PAPER;
    c.num_selected_blocks = 4;
    check_model("select_fixed paper n=4", &c, 2, 61, 14);
}

static void test_model_gate_token(void)
{
    nsa_config c = small_config();
    c.gate = NSA_GATE_TOKEN;
    check_model("gate token", &c, 2, 61, 15);
}

static void test_model_rope(void)
{
    nsa_config c = small_config();
    c.rope_theta = 10000.0;
    check_model("rope_theta 10000", &c, 2, 61, 16);
    c.rope_theta = 7.0; // fast rotation: the angles matter at every position
    check_model("rope_theta 7", &c, 2, 61, 17);
}

static void test_model_short_T(void)
{
    nsa_config c = small_config();
    c.block_size = 8;
    c.compression_ratio = 4;
    c.compression_block = 8;
    c.window_size = 16;
    c.compress = NSA_COMPRESS_MLP;
    c.vocab_size = 9;
    check_model("T=3 below every block size", &c, 2, 3, 18);
    check_model("T=1", &c, 2, 1, 19);
    c.compress = NSA_COMPRESS_MEAN;
    c.vocab_size = 0;
    check_model("T=1 mean", &c, 3, 1, 20);
}

static void test_model_paper_defaults(void)
{
    nsa_config c;
    nsa_paper_defaults(&c);
    c.embed_dim = 16;
    c.hidden_size = 32;
    c.num_heads = 4;
    c.num_kv_heads = 1; // H/4
    c.head_dim = 8;
    c.num_layers = 1;
    c.vocab_size = 13;
    // b = 64, l = 32, r = 16, n = 16, w = 512 as in paper_defaults; T = 150 gives 3 blocks
    // and 8 compressed tokens
    check_model("paper_defaults small", &c, 1, 150, 21);
    // the same options with the block sizes scaled down so the selection chooses
    c.block_size = 8;
    c.compression_ratio = 4;
    c.compression_block = 8;
    c.num_selected_blocks = 4;
    c.window_size = 16;
    c.num_heads = 4;
    c.num_kv_heads = 2;
    c.num_layers = 2;
    check_model("paper options scaled (b=8 r=4 l=8 n=4 w=16 G=2)", &c, 2, 61, 22);
}

static void test_model_nan_input(void)
{
    nsa_config c = small_config();
    nsa_model *m = NULL;
    if (nsa_model_create(&m, ctx, &c) != NSA_OK) {
        CHECKF(0, "nsa_model_create: %s", nsa_last_error());
        return;
    }
    CHECK(nsa_model_init(m, 3) == NSA_OK);
    const int B = 2, T = 10;
    float *x = malloc(sizeof(float) * B * T * 12), *out = malloc(sizeof(float) * B * T * 16);
    test_rng rng = {99};
    test_fill(&rng, x, (size_t)B * T * 12, 1.0);
    x[57] = NAN;
    nsa_status st = nsa_model_forward(m, x, B, T, 0, out);
    CHECKF(st == NSA_ERR_NUMERIC, "NaN input: status %d", (int)st);
    CHECK(nsa_last_error()[0] != '\0');
    x[57] = INFINITY;
    st = nsa_model_forward(m, x, B, T, NSA_FWD_ALL_POSITIONS, out);
    CHECKF(st == NSA_ERR_NUMERIC, "Inf input: status %d", (int)st);
    x[57] = 0.5f;
    CHECK(nsa_model_forward(m, x, B, T, 0, out) == NSA_OK);
    free(x);
    free(out);
    nsa_model_free(m);
}

// The model reference on its own: causal at every position, whatever the compression,
// gate and rope (changing x at t > t0 leaves every output at t <= t0 untouched).
static void test_ref_model_causal(void)
{
    nsa_config c = small_config();
    c.compress = NSA_COMPRESS_MLP;
    c.compression_block = 6;
    c.gate = NSA_GATE_TOKEN;
    c.rope_theta = 100.0;
    c.select_score = NSA_SELECT_CMP_ATTN;
    c.block_size = 6;
    c.select_fixed = NSA_SELECT_FIXED_PAPER;
    c.num_layers = 2;
    expected_table *tab = malloc(sizeof *tab);
    expected_tensors(&c, tab);
    ref_tensor *t = calloc((size_t)tab->count, sizeof *t);
    size_t total = 0;
    for (int i = 0; i < tab->count; i++) {
        size_t n = 1;
        for (int k = 0; k < tab->t[i].ndim; k++)
            n *= (size_t)tab->t[i].shape[k];
        t[i].name = tab->t[i].name;
        t[i].numel = n;
        total += n;
    }
    double *w = malloc(sizeof(double) * total);
    test_rng rng = {5};
    for (size_t i = 0; i < total; i++)
        w[i] = 0.3 * test_rng_uniform(&rng);
    for (int i = 0, at = 0; i < tab->count; at += (int)t[i].numel, i++)
        t[i].data = w + at;
    ref_params p = {t, (size_t)tab->count};
    CHECK(ref_param_count(&c) == (int64_t)total);
    const int T = 40, t0 = 22, E = 12, D = 16;
    double *x = malloc(sizeof(double) * T * E), *o1 = malloc(sizeof(double) * T * D);
    double *o2 = malloc(sizeof(double) * T * D);
    for (int i = 0; i < T * E; i++)
        x[i] = test_rng_uniform(&rng);
    CHECK(ref_model_forward(&c, &p, x, 1, T, 1, o1, NULL) == 0);
    for (int i = (t0 + 1) * E; i < T * E; i++)
        x[i] = 2.0 * test_rng_uniform(&rng);
    CHECK(ref_model_forward(&c, &p, x, 1, T, 1, o2, NULL) == 0);
    CHECK(memcmp(o1, o2, sizeof(double) * (size_t)(t0 + 1) * D) == 0);
    double later = 0.0;
    for (int i = (t0 + 1) * D; i < T * D; i++)
        later = fmax(later, fabs(o1[i] - o2[i]));
    CHECK(later > 1e-3);
    // the last-position output is the last row of all positions
    double *last = malloc(sizeof(double) * D);
    CHECK(ref_model_forward(&c, &p, x, 1, T, 0, last, NULL) == 0);
    CHECK(memcmp(last, o2 + (size_t)(T - 1) * D, sizeof(double) * D) == 0);
    free(last);
    free(x);
    free(o1);
    free(o2);
    free(w);
    free(t);
    free(tab);
}

// The context's precision: fp32 by default; bf16 refused by the CPU backend with a message
// naming the fix, invalid values refused, names parsed.
static void test_context_precision(void)
{
    CHECK(nsa_context_precision(ctx) == NSA_PRECISION_FP32);
    CHECK(nsa_context_set_precision(ctx, NSA_PRECISION_BF16) == NSA_ERR_UNSUPPORTED);
    CHECK(strstr(nsa_last_error(), "cuda") != NULL);
    CHECK(nsa_context_precision(ctx) == NSA_PRECISION_FP32);
    CHECK(nsa_context_set_precision(ctx, (nsa_precision)7) == NSA_ERR_INVALID);
    CHECK(nsa_context_set_precision(NULL, NSA_PRECISION_FP32) == NSA_ERR_INVALID);
    CHECK(nsa_context_set_precision(ctx, NSA_PRECISION_FP32) == NSA_OK);
    nsa_precision p = NSA_PRECISION_FP32;
    CHECK(nsa_precision_parse("bf16", &p) == NSA_OK && p == NSA_PRECISION_BF16);
    CHECK(nsa_precision_parse("fp32", &p) == NSA_OK && p == NSA_PRECISION_FP32);
    CHECK(nsa_precision_parse("fp16", &p) == NSA_ERR_INVALID);
    CHECK(strstr(nsa_last_error(), "fp16") != NULL);
    CHECK(nsa_precision_parse(NULL, &p) == NSA_ERR_INVALID);
}

// ----------------------------------------------------------------------------------------

int main(void)
{
    RUN(test_ref_model_causal);
    RUN(test_config_default);
    RUN(test_paper_defaults);
    RUN(test_config_validate);
    RUN(test_config_set_get);
    RUN(test_attention_desc_from_config);

    nsa_status st = nsa_context_create(&ctx, NSA_DEVICE_CPU, 0);
    if (st != NSA_OK) {
        printf("FAIL nsa_context_create: %s\n", nsa_last_error());
        harness_failed++;
        return harness_finish();
    }
    RUN(test_context_precision);
    RUN(test_param_count);
    RUN(test_model_seed_small);
    RUN(test_model_hd_ne_d);
    RUN(test_model_e_eq_d);
    RUN(test_model_gqa);
    RUN(test_model_compress);
    RUN(test_model_cmp_attn);
    RUN(test_model_select_fixed_paper);
    RUN(test_model_gate_token);
    RUN(test_model_rope);
    RUN(test_model_short_T);
    RUN(test_model_paper_defaults);
    RUN(test_model_nan_input);
    nsa_context_free(ctx);
    return harness_finish();
}
