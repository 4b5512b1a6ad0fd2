/*
 * test_generate.c — cached generation (SPEC §5): the logits of every step of the
 * generator equal the full forward's (nsa_lm_forward) at the same position, for every
 * option that changes the caches (compression mean/conv/mlp with l > r, RoPE, GQA, gates,
 * selection modes); and the sampler and the generator's bad inputs.
 */
#include "harness.h"
#include "nsa.h"

static nsa_context *ctx;

static void perturb(nsa_model *m, test_rng *r)
{
    size_t n = nsa_model_buffer_size(m);
    float *p = malloc(n * sizeof *p);
    nsa_model_get_params(m, p);
    for (size_t i = 0; i < n; i++)
        p[i] += (float)(0.05 * test_rng_uniform(r));
    CHECK(nsa_model_set_params(m, p) == NSA_OK);
    free(p);
}

// Runs T tokens through the generator and compares each step with the full forward.
static void check_config(const char *name, nsa_config cfg, int T, uint64_t seed)
{
    nsa_model *m = NULL;
    if (nsa_model_create(&m, ctx, &cfg) != NSA_OK) {
        CHECKF(0, "%s: create: %s", name, nsa_last_error());
        return;
    }
    test_rng r = {seed};
    nsa_model_init(m, seed);
    perturb(m, &r);
    int V = cfg.vocab_size;
    int32_t *tokens = malloc((size_t)T * sizeof *tokens);
    for (int t = 0; t < T; t++)
        tokens[t] = (int32_t)(test_rng_next(&r) % (uint64_t)V);
    float *full = malloc((size_t)T * V * sizeof *full), *step = malloc((size_t)V * sizeof *step);
    double *ref = malloc((size_t)V * sizeof *ref);
    CHECK(nsa_lm_forward(m, tokens, 1, T, 0, full, NULL) == NSA_OK);
    nsa_generator *g = NULL;
    CHECK(nsa_generator_create(&g, m, T) == NSA_OK);
    for (int t = 0; g && t < T; t++) {
        test_poison(step, (size_t)V);
        nsa_status st = nsa_generator_step(g, tokens[t], step);
        CHECKF(st == NSA_OK, "%s: step %d: %s", name, t, nsa_last_error());
        for (int i = 0; i < V; i++)
            ref[i] = full[(size_t)t * V + i];
        char what[96];
        snprintf(what, sizeof what, "%s t=%d", name, t);
        // Same float32 arithmetic in another order (one row vs a batch of rows).
        if (!harness_compare(what, step, ref, (size_t)V, 1e-5))
            break;
    }
    if (g) {
        CHECK(nsa_generator_length(g) == T);
        CHECK(nsa_generator_step(g, 0, step) == NSA_ERR_INVALID); // full
        nsa_generator_reset(g);
        CHECK(nsa_generator_length(g) == 0);
        CHECK(nsa_generator_step(g, tokens[0], step) == NSA_OK);
        for (int i = 0; i < V; i++)
            ref[i] = full[i];
        harness_compare("after reset", step, ref, (size_t)V, 1e-5);
    }
    nsa_generator_free(g);
    free(tokens);
    free(full);
    free(step);
    free(ref);
    nsa_model_free(m);
}

static nsa_config small_config(void)
{
    nsa_config c;
    nsa_config_default(&c);
    c.embed_dim = 12;
    c.hidden_size = 16;
    c.num_heads = 4;
    c.head_dim = 6;
    c.num_layers = 2;
    c.window_size = 5;
    c.block_size = 6;
    c.num_selected_blocks = 3;
    c.compression_ratio = 3;
    c.vocab_size = 29;
    c.dropout = 0.1; // off at inference: must not matter
    return c;
}

static void test_seed_defaults(void)
{
    check_config("seed", small_config(), 41, 1);
}

static void test_every_cache_option(void)
{
    nsa_config c = small_config();
    c.num_kv_heads = 2;
    c.compression_block = 6;
    c.compress = NSA_COMPRESS_MLP;
    c.select_score = NSA_SELECT_CMP_ATTN;
    c.select_fixed = NSA_SELECT_FIXED_PAPER;
    c.gate = NSA_GATE_TOKEN;
    c.rope_theta = 100.0;
    check_config("mlp cmp_attn paper token rope gqa", c, 45, 2);
    c.compress = NSA_COMPRESS_CONV;
    c.num_kv_heads = 1;
    c.embed_dim = 16; // no in_proj
    check_config("conv mqa e==d", c, 38, 3);
    c.compress = NSA_COMPRESS_MEAN;
    c.select_score = NSA_SELECT_MEAN_KEY;
    c.select_fixed = NSA_SELECT_FIXED_NONE;
    check_config("mean mean_key", c, 30, 4);
}

static void test_gate_override(void)
{
    nsa_config c = small_config();
    nsa_model *m = NULL;
    CHECK(nsa_model_create(&m, ctx, &c) == NSA_OK);
    nsa_model_init(m, 5);
    float g3[3] = {0.0f, 0.0f, 1.0f};
    CHECK(nsa_model_set_gate_override(m, g3) == NSA_OK);
    int32_t tokens[20];
    for (int t = 0; t < 20; t++)
        tokens[t] = (t * 7) % c.vocab_size;
    float *full = malloc(20 * (size_t)c.vocab_size * sizeof *full);
    float *step = malloc((size_t)c.vocab_size * sizeof *step);
    double *ref = malloc((size_t)c.vocab_size * sizeof *ref);
    CHECK(nsa_lm_forward(m, tokens, 1, 20, 0, full, NULL) == NSA_OK);
    nsa_generator *g = NULL;
    CHECK(nsa_generator_create(&g, m, 20) == NSA_OK);
    for (int t = 0; t < 20; t++) {
        CHECK(nsa_generator_step(g, tokens[t], step) == NSA_OK);
        for (int i = 0; i < c.vocab_size; i++)
            ref[i] = full[(size_t)t * c.vocab_size + i];
        harness_compare("window-only", step, ref, (size_t)c.vocab_size, 1e-5);
    }
    nsa_generator_free(g);
    free(full);
    free(step);
    free(ref);
    nsa_model_free(m);
}

static void test_bad_input(void)
{
    nsa_config c = small_config();
    nsa_model *m = NULL;
    CHECK(nsa_model_create(&m, ctx, &c) == NSA_OK);
    nsa_generator *g = NULL;
    CHECK(nsa_generator_create(&g, m, 0) == NSA_ERR_INVALID);
    CHECK(nsa_generator_create(&g, m, 4) == NSA_OK);
    float logits[29];
    CHECK(nsa_generator_step(g, -1, logits) == NSA_ERR_INVALID);
    CHECK(nsa_generator_step(g, 29, logits) == NSA_ERR_INVALID);
    CHECK(nsa_generator_step(g, 3, NULL) == NSA_ERR_INVALID);
    CHECK(nsa_generator_length(g) == 0);
    nsa_generator_free(g);
    nsa_model_free(m);
    c.vocab_size = 0;
    CHECK(nsa_model_create(&m, ctx, &c) == NSA_OK);
    CHECK(nsa_generator_create(&g, m, 4) == NSA_ERR_INVALID);
    CHECK(nsa_last_error()[0] != '\0');
    nsa_model_free(m);
}

static void test_sampler(void)
{
    float logits[5] = {0.5f, 2.0f, 2.0f, -1.0f, 0.0f};
    CHECK(nsa_sample_token(logits, 5, 0.0, 0.99) == 1); // greedy, tie to the lower id
    // temperature: the cumulative distribution is walked in id order
    int counts[5] = {0};
    for (int i = 0; i < 10000; i++)
        counts[nsa_sample_token(logits, 5, 1.0, (i + 0.5) / 10000.0)]++;
    double z = exp(0.5) + 2 * exp(2.0) + exp(-1.0) + 1.0;
    for (int i = 0; i < 5; i++) {
        double want = 10000.0 * exp((double)logits[i]) / z;
        CHECKF(fabs(counts[i] - want) <= 2.0, "id %d: %d draws, expected %.1f", i, counts[i], want);
    }
}

int main(void)
{
    if (nsa_context_create(&ctx, NSA_DEVICE_CPU, 0) != NSA_OK) {
        fprintf(stderr, "context: %s\n", nsa_last_error());
        return 1;
    }
    RUN(test_seed_defaults);
    RUN(test_every_cache_option);
    RUN(test_gate_override);
    RUN(test_bad_input);
    RUN(test_sampler);
    nsa_context_free(ctx);
    return harness_finish();
}
