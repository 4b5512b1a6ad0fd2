/*
 * test_grad_model.c — the whole model's backward (nsa_model_backward, nsa_lm_backward,
 * gradient accumulation, the gate override) against central finite differences of the
 * float64 reference ref_model_forward / ref_lm_forward (tests/ref64.c), on a random sample
 * of parameters and on every input element. The ops one at a time are in test_grad.c.
 *
 * The reference selects blocks by itself; its smallest selection margin is printed when a
 * check fails, to tell a top-k flip from a bug.
 */
#include "grad_util.h"

// ----------------------------------------------------------------------------------------
// The whole model against ref_model_forward / ref_lm_forward

typedef struct model_fixture {
    nsa_model *model;
    nsa_config cfg;
    size_t n, nt;           // buffer floats, tensors
    float *params;          // as set in the model
    double *pd;             // the same in float64 (finite differences perturb these)
    nsa_tensor_info *info;  // [nt]
    ref_tensor *tensors;    // [nt + num_layers]: + static gates for a gate override
    ref_params table;
    double *forced_gates;   // [num_layers * 3] window-only gate logits (see test_gate_override)
} model_fixture;

// Creates and initialises the model, perturbs every parameter (so biases, norms, gates
// and compression parameters are not trivial) and builds the reference's table.
static int fixture_open(model_fixture *f, const nsa_config *cfg, uint64_t seed)
{
    memset(f, 0, sizeof *f);
    f->cfg = *cfg;
    if (nsa_model_create(&f->model, ctx, cfg) != NSA_OK) {
        CHECKF(0, "nsa_model_create: %s", nsa_last_error());
        f->model = NULL;
        return 0;
    }
    OK(nsa_model_init(f->model, seed));
    f->n = nsa_model_buffer_size(f->model);
    f->nt = nsa_model_num_tensors(f->model);
    f->params = falloc(f->n);
    f->info = talloc(f->nt * sizeof *f->info);
    f->tensors = talloc((f->nt + (size_t)cfg->num_layers) * sizeof *f->tensors);
    f->forced_gates = dalloc((size_t)cfg->num_layers * 3);
    OK(nsa_model_get_params(f->model, f->params));
    test_rng rng = {seed * 31 + 7};
    for (size_t i = 0; i < f->nt; i++) {
        OK(nsa_model_tensor(f->model, i, &f->info[i]));
        size_t len = strlen(f->info[i].name);
        double noise = len >= 5 && !strcmp(f->info[i].name + len - 5, ".gate") ? 0.7 : 0.1;
        for (size_t j = 0; j < f->info[i].numel; j++)
            f->params[f->info[i].offset + j] += (float)(noise * test_rng_uniform(&rng));
    }
    OK(nsa_model_set_params(f->model, f->params));
    f->pd = to_double(f->params, f->n);
    for (size_t i = 0; i < f->nt; i++) {
        f->tensors[i].name = f->info[i].name;
        f->tensors[i].data = f->pd + f->info[i].offset;
        f->tensors[i].numel = f->info[i].numel;
    }
    f->table.tensors = f->tensors;
    f->table.count = f->nt;
    return 1;
}

static void fixture_close(model_fixture *f) { nsa_model_free(f->model); }

// Buffer offsets of the parameters to check: one element of every tensor, then `extra`
// more at random. Returns how many (at most cap).
static size_t pick_params(const model_fixture *f, test_rng *rng, size_t extra, size_t *offs,
                          size_t cap)
{
    size_t k = 0;
    for (size_t i = 0; i < f->nt && k < cap; i++)
        offs[k++] = f->info[i].offset + (size_t)(test_rng_next(rng) % f->info[i].numel);
    for (size_t e = 0; e < extra && k < cap; e++) {
        const nsa_tensor_info *t = &f->info[test_rng_next(rng) % f->nt];
        offs[k++] = t->offset + (size_t)(test_rng_next(rng) % t->numel);
    }
    return k;
}

// 1 where the buffer holds a tensor, 0 in the alignment gaps.
static unsigned char *tensor_mask(const model_fixture *f)
{
    unsigned char *mask = talloc(f->n);
    for (size_t i = 0; i < f->nt; i++)
        memset(mask + f->info[i].offset, 1, f->info[i].numel);
    return mask;
}

// Every gradient finite, every gap zero.
static void check_grad_buffer(const char *what, const model_fixture *f, const float *g)
{
    unsigned char *mask = tensor_mask(f);
    size_t bad = 0, gaps = 0;
    for (size_t i = 0; i < f->n; i++) {
        bad += !isfinite(g[i]);
        gaps += !mask[i] && g[i] != 0.0f;
    }
    CHECKF(bad == 0, "%s: %zu gradients are NaN or Inf", what, bad);
    CHECKF(gaps == 0, "%s: %zu alignment-gap entries of the gradient buffer are non-zero", what,
           gaps);
}

// The objective of the reference: model output . R, or the (weighted) LM loss.
typedef struct model_objective {
    const nsa_config *cfg;
    const ref_params *table;
    int B, T;
    int lm, all;
    const double *x;        // model input [B,T,E]
    const double *R;        // [B,D] or [B,T,D]
    const int32_t *tokens;  // lm
    const float *weights;   // lm, [B,T] or NULL
    double *out, *logits;   // scratch
    double min_margin;      // over every evaluation
    int failed;
} model_objective;

static double weighted_lm_loss(const model_objective *o, const double *logits)
{
    const int B = o->B, T = o->T, V = o->cfg->vocab_size;
    double total = 0.0, wsum = 0.0;
    for (int b = 0; b < B; b++)
        for (int t = 0; t + 1 < T; t++) {
            size_t row = (size_t)b * T + t;
            const double *z = logits + row * V;
            double mx = z[0], s = 0.0;
            for (int i = 1; i < V; i++)
                mx = fmax(mx, z[i]);
            for (int i = 0; i < V; i++)
                s += exp(z[i] - mx);
            double w = o->weights ? o->weights[row] : 1.0;
            total += w * (mx + log(s) - z[o->tokens[row + 1]]);
            wsum += w;
        }
    return total / wsum;
}

static double model_objective_eval(void *user)
{
    model_objective *o = user;
    ref_attn_stats stats = {INFINITY};
    double value = 0.0;
    if (o->lm) {
        if (ref_lm_forward(o->cfg, o->table, o->tokens, o->B, o->T, o->logits, NULL, &stats)) {
            o->failed = 1;
            return NAN;
        }
        value = weighted_lm_loss(o, o->logits);
    } else {
        size_t n = (size_t)o->B * (o->all ? o->T : 1) * o->cfg->hidden_size;
        if (ref_model_forward(o->cfg, o->table, o->x, o->B, o->T, o->all, o->out, &stats)) {
            o->failed = 1;
            return NAN;
        }
        for (size_t i = 0; i < n; i++)
            value += o->out[i] * o->R[i];
    }
    if (stats.min_margin < o->min_margin)
        o->min_margin = stats.min_margin;
    return value;
}

// Analytic gradients at the sampled offsets against mult * finite differences.
static double check_param_sample(const char *what, const char *part, model_fixture *f,
                                 model_objective *o, const float *grads, const size_t *offs,
                                 size_t k, double mult)
{
    double *fd = dalloc(k);
    float *got = falloc(k);
    for (size_t i = 0; i < k; i++) {
        fd[i] = central_diff(&f->pd[offs[i]], model_objective_eval, o);
        got[i] = grads[offs[i]];
    }
    double rel = grad_compare(what, part, got, fd, k, mult);
    if (rel > TOL_GRAD) {
        for (size_t i = 0; i < k; i++) {
            const char *name = "?";
            for (size_t t = 0; t < f->nt; t++)
                if (offs[i] >= f->info[t].offset &&
                    offs[i] < f->info[t].offset + f->info[t].numel)
                    name = f->info[t].name;
            fprintf(stderr, "    %-40s analytic %13.6g  finite diff %13.6g\n", name,
                    (double)got[i], mult * fd[i]);
        }
        fprintf(stderr, "    smallest selection margin of the reference: %.3g\n", o->min_margin);
    }
    return rel;
}

// nsa_model_forward (NSA_FWD_KEEP, last position and all positions) + nsa_model_backward
// with dx, against finite differences of ref_model_forward.
static void check_model_backward(const char *what, model_fixture *f, int B, int T,
                                 uint64_t seed)
{
    const nsa_config *cfg = &f->cfg;
    const int E = cfg->embed_dim, D = cfg->hidden_size;
    const size_t nx = (size_t)B * T * E, nall = (size_t)B * T * D;
    test_rng rng = {seed};
    float *x = falloc(nx), *out = falloc(nall), *Rf = falloc(nall), *dx = falloc(nx);
    float *g = falloc(f->n);
    test_fill(&rng, x, nx, 1.0);
    double *x64 = to_double(x, nx), *ref = dalloc(nall), *fdx = dalloc(nx);
    size_t offs[128];
    for (int all = 0; all < 2; all++) {
        char label[200];
        snprintf(label, sizeof label, "%s, model %s", what, all ? "all positions" : "last position");
        size_t nout = all ? nall : (size_t)B * D;
        test_fill(&rng, Rf, nout, 1.0);
        double *R = to_double(Rf, nout);
        model_objective o = {cfg, &f->table, B, T, 0, all, x64, R, NULL, NULL, ref, NULL,
                             INFINITY, 0};
        OK(nsa_model_zero_grads(f->model));
        test_poison(out, nall);
        OK(nsa_model_forward(f->model, x, B, T, NSA_FWD_KEEP | (all ? NSA_FWD_ALL_POSITIONS : 0u),
                             out));
        CHECK(ref_model_forward(cfg, &f->table, x64, B, T, all, ref, NULL) == 0);
        forward_compare(label, "forward", out, ref, nout, 1e-4);
        test_poison(dx, nx);
        OK(nsa_model_backward(f->model, Rf, dx));
        OK(nsa_model_get_grads(f->model, g));
        check_grad_buffer(label, f, g);
        size_t k = pick_params(f, &rng, 16, offs, 128);
        check_param_sample(label, "parameters (sample)", f, &o, g, offs, k, 1.0);
        for (size_t i = 0; i < nx; i++)
            fdx[i] = central_diff(&x64[i], model_objective_eval, &o);
        grad_compare(label, "dx", dx, fdx, nx, 1.0);
        CHECKF(!o.failed, "%s: the reference failed", label);
    }
}

static void random_tokens(test_rng *rng, int32_t *tokens, size_t n, int V)
{
    for (size_t i = 0; i < n; i++)
        tokens[i] = (int32_t)(test_rng_next(rng) % (uint64_t)V);
}

// nsa_lm_forward[_weighted] (NSA_FWD_KEEP) + nsa_lm_backward(scale) against finite
// differences of the (weighted) loss of ref_lm_forward's logits.
static void check_lm_backward(const char *what, model_fixture *f, int B, int T, int weighted,
                              float scale, uint64_t seed)
{
    const nsa_config *cfg = &f->cfg;
    const int V = cfg->vocab_size;
    const size_t M = (size_t)B * T;
    test_rng rng = {seed};
    char label[200];
    snprintf(label, sizeof label, "%s, lm%s scale %g", what, weighted ? " weighted" : "",
             (double)scale);
    int32_t *tokens = ialloc(M);
    float *weights = weighted ? falloc(M) : NULL, *g = falloc(f->n), *logits = falloc(M * V);
    double *ref_logits = dalloc(M * V);
    random_tokens(&rng, tokens, M, V);
    for (size_t i = 0; weights && i < M; i++)
        weights[i] = (float)uniform_in(&rng, 0.1, 2.0);
    if (weights)
        weights[1] = 0.0f; // a prediction that does not count
    model_objective o = {cfg, &f->table, B, T, 1, 1, NULL, NULL, tokens, weights, NULL,
                         ref_logits, INFINITY, 0};
    OK(nsa_model_zero_grads(f->model));
    float loss = NAN;
    test_poison(logits, M * V);
    if (weighted)
        OK(nsa_lm_forward_weighted(f->model, tokens, weights, B, T, NSA_FWD_KEEP, logits, &loss));
    else
        OK(nsa_lm_forward(f->model, tokens, B, T, NSA_FWD_KEEP, logits, &loss));
    double ref_loss = 0.0, ref_loss_plain = 0.0;
    CHECK(ref_lm_forward(cfg, &f->table, tokens, B, T, ref_logits, &ref_loss_plain, NULL) == 0);
    forward_compare(label, "logits", logits, ref_logits, M * V, 1e-4);
    ref_loss = weighted_lm_loss(&o, ref_logits);
    if (!weighted)
        CHECKF(fabs(ref_loss - ref_loss_plain) <= 1e-12 * fabs(ref_loss_plain),
               "%s: the test's loss %.17g differs from ref_lm_forward's %.17g", label, ref_loss,
               ref_loss_plain);
    forward_compare(label, "loss", &loss, &ref_loss, 1, 1e-5);
    OK(nsa_lm_backward(f->model, scale));
    OK(nsa_model_get_grads(f->model, g));
    check_grad_buffer(label, f, g);
    size_t offs[160];
    size_t k = pick_params(f, &rng, 24, offs, 160);
    check_param_sample(label, "parameters (sample)", f, &o, g, offs, k, scale);
    CHECKF(!o.failed, "%s: the reference failed", label);
}

typedef struct model_case {
    const char *what;
    nsa_config cfg;
    int B, T;
} model_case;

static nsa_config tiny_config(void)
{
    nsa_config c;
    nsa_config_default(&c); // dropout 0.1: NSA_FWD_KEEP must run without it
    c.embed_dim = 6;
    c.hidden_size = 8;
    c.num_heads = 2;
    c.head_dim = 4;
    c.num_layers = 2;
    c.window_size = 4;
    c.block_size = 3;
    c.num_selected_blocks = 2;
    c.compression_ratio = 2;
    c.compression_block = 4;
    c.vocab_size = 7;
    c.seq_len = 13;
    return c;
}

static size_t model_cases(model_case *cases)
{
    size_t n = 0;
    nsa_config c = tiny_config();
    cases[n++] = (model_case){"mean static mean_key E!=D l>r", c, 2, 13};

    c = tiny_config();
    c.embed_dim = 8; // E == D
    c.compress = NSA_COMPRESS_CONV;
    c.gate = NSA_GATE_TOKEN;
    c.select_score = NSA_SELECT_CMP_ATTN;
    c.block_size = 4;
    c.num_heads = 4;
    c.num_kv_heads = 2; // GQA, H*d = 16 != D
    c.rope_theta = 10.0;
    cases[n++] = (model_case){"conv token cmp_attn GQA rope E==D", c, 2, 15};

    c = tiny_config();
    c.embed_dim = 5;
    c.hidden_size = 12;
    c.num_heads = 4;
    c.num_kv_heads = 1;
    c.head_dim = 4;
    c.num_layers = 1;
    c.compress = NSA_COMPRESS_MLP;
    c.compression_block = 6;
    c.gate = NSA_GATE_TOKEN;
    c.select_score = NSA_SELECT_CMP_ATTN;
    c.select_fixed = NSA_SELECT_FIXED_PAPER;
    c.block_size = 4;
    c.num_selected_blocks = 4;
    c.window_size = 5;
    c.rope_theta = 100.0;
    cases[n++] = (model_case){"mlp token cmp_attn paper rope G=1 E!=D", c, 1, 21};

    c = tiny_config();
    c.compress = NSA_COMPRESS_MLP;
    c.compression_ratio = 3;
    c.compression_block = 3;
    c.select_fixed = NSA_SELECT_FIXED_PAPER;
    c.num_selected_blocks = 3;
    c.block_size = 2;
    c.head_dim = 3;
    c.num_heads = 3; // H*d = 9 != D
    cases[n++] = (model_case){"mlp static mean_key paper l=r=3 d=3", c, 2, 11};

    c = tiny_config();
    c.compress = NSA_COMPRESS_MLP;
    c.block_size = 8;
    c.compression_block = 8;
    c.compression_ratio = 4;
    c.window_size = 16;
    c.gate = NSA_GATE_TOKEN;
    cases[n++] = (model_case){"T=3 below every block size (mlp, no compressed token)", c, 2, 3};
    return n;
}

static void test_model_backward(void)
{
    worst_reset();
    model_case cases[8];
    size_t n = model_cases(cases);
    for (size_t i = 0; i < n; i++) {
        model_fixture f;
        if (!fixture_open(&f, &cases[i].cfg, 100 + i))
            continue;
        check_model_backward(cases[i].what, &f, cases[i].B, cases[i].T, 200 + i);
        fixture_close(&f);
    }
    test_done();
}

static void test_lm_backward(void)
{
    worst_reset();
    model_case cases[8];
    size_t n = model_cases(cases);
    for (size_t i = 0; i < n; i++) {
        model_fixture f;
        if (!fixture_open(&f, &cases[i].cfg, 300 + i))
            continue;
        int T = cases[i].T;
        check_lm_backward(cases[i].what, &f, cases[i].B, T, 0, 1.0f, 400 + i);
        check_lm_backward(cases[i].what, &f, cases[i].B, T, 1, 0.25f, 500 + i);
        fixture_close(&f);
    }
    test_done();
}

// The gradient buffer: backward adds (+=), nsa_model_zero_grads clears.
static void test_grad_accumulation(void)
{
    worst_reset();
    model_case cases[8];
    model_cases(cases);
    const model_case *c = &cases[1];
    model_fixture f;
    if (!fixture_open(&f, &c->cfg, 600))
        return;
    const int B = c->B, T = c->T, E = c->cfg.embed_dim, D = c->cfg.hidden_size;
    const size_t M = (size_t)B * T;
    test_rng rng = {601};
    float *g1 = falloc(f.n), *g2 = falloc(f.n), *x = falloc(M * E), *R = falloc(M * D);
    float *dx1 = falloc(M * E), *dx2 = falloc(M * E), *out = falloc(M * D);
    int32_t *tokens = ialloc(M);
    random_tokens(&rng, tokens, M, c->cfg.vocab_size);
    test_fill(&rng, x, M * E, 1.0);
    test_fill(&rng, R, M * D, 1.0);
    double *expect = dalloc(f.n);

    // LM: two forward/backward pairs, scales 1 and 0.5, add up to 1.5 times the first
    OK(nsa_model_zero_grads(f.model));
    OK(nsa_lm_forward(f.model, tokens, B, T, NSA_FWD_KEEP, NULL, NULL));
    OK(nsa_lm_backward(f.model, 1.0f));
    OK(nsa_model_get_grads(f.model, g1));
    OK(nsa_lm_forward(f.model, tokens, B, T, NSA_FWD_KEEP, NULL, NULL));
    OK(nsa_lm_backward(f.model, 0.5f));
    OK(nsa_model_get_grads(f.model, g2));
    for (size_t i = 0; i < f.n; i++)
        expect[i] = 1.5 * g1[i];
    forward_compare("lm backward twice (scales 1, 0.5)", "accumulated gradients", g2, expect,
                    f.n, 1e-6);

    // the model: the same backward twice after one forward doubles the buffer
    OK(nsa_model_zero_grads(f.model));
    OK(nsa_model_get_grads(f.model, g2));
    size_t nonzero = 0;
    for (size_t i = 0; i < f.n; i++)
        nonzero += g2[i] != 0.0f;
    CHECKF(nonzero == 0, "nsa_model_zero_grads left %zu non-zero entries", nonzero);
    OK(nsa_model_forward(f.model, x, B, T, NSA_FWD_KEEP | NSA_FWD_ALL_POSITIONS, out));
    OK(nsa_model_backward(f.model, R, dx1));
    OK(nsa_model_get_grads(f.model, g1));
    OK(nsa_model_backward(f.model, R, dx2));
    OK(nsa_model_get_grads(f.model, g2));
    for (size_t i = 0; i < f.n; i++)
        expect[i] = 2.0 * g1[i];
    forward_compare("model backward twice", "accumulated gradients", g2, expect, f.n, 1e-6);
    CHECKF(memcmp(dx1, dx2, sizeof(float) * M * E) == 0, "dx is not overwritten (=)");
    OK(nsa_model_zero_grads(f.model));
    OK(nsa_model_get_grads(f.model, g2));
    nonzero = 0;
    for (size_t i = 0; i < f.n; i++)
        nonzero += g2[i] != 0.0f;
    CHECKF(nonzero == 0, "nsa_model_zero_grads left %zu non-zero entries", nonzero);

    // a backward with no forward that kept activations is refused
    OK(nsa_model_forward(f.model, x, B, T, 0, out));
    CHECK(nsa_model_backward(f.model, R, dx1) != NSA_OK);
    CHECK(nsa_lm_backward(f.model, 1.0f) != NSA_OK);
    fixture_close(&f);
    test_done();
}

// nsa_model_set_gate_override {0, 0, 1}: the sliding window alone. The gate parameters
// get no gradient; the outputs and the other gradients are those of the reference with
// static gate logits (-1e4, -1e4, 0), whose softmax is exactly (0, 0, 1) in float64.
static void check_gate_override(const char *what, const nsa_config *cfg, int B, int T,
                                uint64_t seed)
{
    model_fixture f;
    if (!fixture_open(&f, cfg, seed))
        return;
    const int L = cfg->num_layers, V = cfg->vocab_size;
    const size_t M = (size_t)B * T;
    nsa_config window_cfg = *cfg;
    window_cfg.gate = NSA_GATE_STATIC;
    for (int i = 0; i < L; i++) {
        char *name = talloc(64);
        snprintf(name, 64, "layers.%d.attn.gate", i);
        if (cfg->gate == NSA_GATE_STATIC) { // replace the model's own gate in the table
            for (size_t t = 0; t < f.nt; t++)
                if (!strcmp(f.tensors[t].name, name))
                    f.tensors[t].name = "(overridden gate)";
        }
        f.forced_gates[3 * i + 0] = -1e4;
        f.forced_gates[3 * i + 1] = -1e4;
        f.forced_gates[3 * i + 2] = 0.0;
        f.tensors[f.nt + (size_t)i] = (ref_tensor){name, f.forced_gates + 3 * i, 3};
    }
    ref_params window_table = {f.tensors, f.nt + (size_t)L};

    test_rng rng = {seed + 1};
    int32_t *tokens = ialloc(M);
    random_tokens(&rng, tokens, M, V);
    float *logits = falloc(M * V), *logits_free = falloc(M * V), *g = falloc(f.n);
    double *ref_logits = dalloc(M * V);
    const float window_only[3] = {0.0f, 0.0f, 1.0f};
    OK(nsa_lm_forward(f.model, tokens, B, T, 0, logits_free, NULL));
    OK(nsa_model_set_gate_override(f.model, window_only));
    OK(nsa_model_zero_grads(f.model));
    float loss = NAN;
    OK(nsa_lm_forward(f.model, tokens, B, T, NSA_FWD_KEEP, logits, &loss));
    CHECK(ref_lm_forward(&window_cfg, &window_table, tokens, B, T, ref_logits, NULL, NULL) == 0);
    forward_compare(what, "logits with the window alone", logits, ref_logits, M * V, 1e-5);
    OK(nsa_lm_backward(f.model, 1.0f));
    OK(nsa_model_get_grads(f.model, g));
    check_grad_buffer(what, &f, g);
    size_t gate_grads = 0, gate_params = 0;
    for (size_t t = 0; t < f.nt; t++) {
        const char *name = f.info[t].name;
        if (!strstr(name, ".attn.gate"))
            continue;
        gate_params += f.info[t].numel;
        for (size_t j = 0; j < f.info[t].numel; j++)
            gate_grads += g[f.info[t].offset + j] != 0.0f;
    }
    CHECKF(gate_params > 0 && gate_grads == 0, "%s: %zu of %zu gate parameters got a gradient",
           what, gate_grads, gate_params);
    // the other gradients: those of the window-only reference
    model_objective o = {&window_cfg, &window_table, B, T, 1, 1, NULL, NULL, tokens, NULL, NULL,
                         ref_logits, INFINITY, 0};
    size_t offs[160], k = pick_params(&f, &rng, 24, offs, 160), kept = 0;
    for (size_t i = 0; i < k; i++) { // not the gates: the override replaces them
        int is_gate = 0;
        for (size_t t = 0; t < f.nt; t++)
            if (strstr(f.info[t].name, ".attn.gate") && offs[i] >= f.info[t].offset &&
                offs[i] < f.info[t].offset + f.info[t].numel)
                is_gate = 1;
        if (!is_gate)
            offs[kept++] = offs[i];
    }
    check_param_sample(what, "parameters (sample) with the window alone", &f, &o, g, offs, kept,
                       1.0);
    // removing the override restores the learned gates
    OK(nsa_model_set_gate_override(f.model, NULL));
    OK(nsa_lm_forward(f.model, tokens, B, T, 0, logits, NULL));
    CHECKF(memcmp(logits, logits_free, sizeof(float) * M * V) == 0,
           "%s: the logits after removing the override differ from before it", what);
    fixture_close(&f);
}

static void test_gate_override(void)
{
    worst_reset();
    model_case cases[8];
    model_cases(cases);
    check_gate_override("gate override {0,0,1}, static gate", &cases[0].cfg, 2, 13, 700);
    check_gate_override("gate override {0,0,1}, token gate", &cases[1].cfg, 2, 15, 710);
    test_done();
}

// ----------------------------------------------------------------------------------------

int main(void)
{
    nsa_status st = nsa_context_create(&ctx, NSA_DEVICE_CPU, 0);
    if (st != NSA_OK) {
        printf("FAIL nsa_context_create: %s\n", nsa_last_error());
        harness_failed++;
        return harness_finish();
    }
    ops = ctx->ops;
    RUN(test_model_backward);
    RUN(test_lm_backward);
    RUN(test_grad_accumulation);
    RUN(test_gate_override);
    nsa_context_free(ctx);
    return harness_finish();
}
