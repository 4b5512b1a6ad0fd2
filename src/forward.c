/*
 * forward.c — the model's forward and backward passes (SPEC §2-§5), written once over the
 * backend interface: the same code drives the CPU and the CUDA backend.
 *
 * Activations live in one device allocation sized for the largest B*T seen. In inference
 * one layer's set is reused by every layer (memory independent of depth); with
 * NSA_FWD_TRAIN / NSA_FWD_KEEP every layer keeps its own for the backward.
 */
#include "model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

// ---------------------------------------------------------------------------------------
// Activation memory

static void layout_layer(nsa__carver *c, layer_acts *a, const nsa_model *m, size_t M, size_t Mc,
                         int keep)
{
    const nsa_config *cfg = &m->cfg;
    size_t D = cfg->hidden_size, H = cfg->num_heads, d = cfg->head_dim, G = m->G, l = m->l;
    memset(a, 0, sizeof *a);
    a->ln1 = NSA_TAKE_F(c, M * D);
    a->ln1_mean = NSA_TAKE_F(c, M);
    a->ln1_rstd = NSA_TAKE_F(c, M);
    a->q = NSA_TAKE_F(c, M * H * d);
    a->k = NSA_TAKE_F(c, M * G * d);
    a->v = NSA_TAKE_F(c, M * G * d);
    a->kc = NSA_TAKE_F(c, Mc * G * d);
    a->vc = NSA_TAKE_F(c, Mc * G * d);
    if (cfg->compress == NSA_COMPRESS_MLP) {
        a->ck_in = NSA_TAKE_F(c, Mc * G * l * d);
        a->ck_hid = NSA_TAKE_F(c, Mc * G * d);
        a->ck_act = NSA_TAKE_F(c, Mc * G * d);
        a->cv_in = NSA_TAKE_F(c, Mc * G * l * d);
        a->cv_hid = NSA_TAKE_F(c, Mc * G * d);
        a->cv_act = NSA_TAKE_F(c, Mc * G * d);
    }
    if (cfg->gate == NSA_GATE_TOKEN)
        a->gate_logits = NSA_TAKE_F(c, M * H * 3);
    a->gates = NSA_TAKE_F(c, M * H * 3);
    a->attn = NSA_TAKE_F(c, M * H * d);
    if (keep) {
        a->o_paths = NSA_TAKE_F(c, 3 * M * H * d);
        a->lse = NSA_TAKE_F(c, M * H * 3);
    }
    a->idx = (int32_t *)nsa__take(c, M * G * (size_t)cfg->num_selected_blocks * sizeof(int32_t));
    a->proj = NSA_TAKE_F(c, M * D);
    a->h = NSA_TAKE_F(c, M * D);
    a->ln2 = NSA_TAKE_F(c, M * D);
    a->ln2_mean = NSA_TAKE_F(c, M);
    a->ln2_rstd = NSA_TAKE_F(c, M);
    a->up = NSA_TAKE_F(c, M * 4 * D);
    a->act = NSA_TAKE_F(c, M * 4 * D);
    a->down = NSA_TAKE_F(c, M * D);
}

static size_t num_cmp_tokens(const nsa_model *m, int T)
{
    return T >= m->l ? (size_t)((T - m->l) / m->cfg.compression_ratio + 1) : 0;
}

void nsa__model_release_acts(nsa_model *m)
{
    // (the gate override is not an activation: nsa_model_free releases it)
    if (m->act_mem)
        m->ctx->ops->free(m->ctx, m->act_mem);
    free(m->acts);
    free(m->layer_out);
    free(m->host_losses);
    m->act_mem = NULL;
    m->acts = NULL;
    m->layer_out = NULL;
    m->host_losses = NULL;
    m->cap_rows = m->cap_cmp_rows = 0;
    m->cap_layers = 0;
    m->act_valid = 0;
}

// Lays out every buffer for M rows; returns the bytes needed (base NULL) or assigns.
static size_t layout_all(nsa_model *m, char *base, size_t M, size_t Mc, int keep, int lm)
{
    const nsa_config *cfg = &m->cfg;
    size_t D = cfg->hidden_size, E = cfg->embed_dim, V = cfg->vocab_size;
    int N = cfg->num_layers, sets = keep ? N : 1, outs = keep && N > 2 ? N : 2;
    nsa__carver c = {base, 0};
    for (int i = 0; i < sets; i++)
        layout_layer(&c, &m->acts[i], m, M, Mc, keep);
    for (int i = sets; i < N; i++)
        m->acts[i] = m->acts[0];
    if (keep)
        layout_layer(&c, &m->grad, m, M, Mc, keep);
    for (int i = 0; i < outs; i++)
        m->layer_out[i] = NSA_TAKE_F(&c, M * D);
    m->x_in = NSA_TAKE_F(&c, M * E);
    m->x0 = E != D ? NSA_TAKE_F(&c, M * D) : m->x_in;
    m->final = NSA_TAKE_F(&c, M * D);
    m->final_mean = NSA_TAKE_F(&c, M);
    m->final_rstd = NSA_TAKE_F(&c, M);
    m->d_a = m->d_b = m->d_x = NULL;
    if (keep) {
        m->d_a = NSA_TAKE_F(&c, M * D);
        m->d_b = NSA_TAKE_F(&c, M * D);
        m->d_x = NSA_TAKE_F(&c, M * E);
    }
    m->logits = m->losses = m->dlogits = NULL;
    m->tokens = NULL;
    m->weights = NULL;
    if (lm) {
        m->logits = NSA_TAKE_F(&c, M * V);
        m->losses = NSA_TAKE_F(&c, M);
        m->tokens = (int32_t *)nsa__take(&c, M * sizeof(int32_t));
        m->weights = NSA_TAKE_F(&c, M);
        if (keep)
            m->dlogits = NSA_TAKE_F(&c, M * V);
    }
    return c.off;
}

nsa_status nsa__model_reserve(nsa_model *m, int B, int T, int keep, int lm)
{
    size_t M = (size_t)B * T, Mc = (size_t)B * num_cmp_tokens(m, T);
    int want_layers = keep ? m->cfg.num_layers : 1;
    // The current buffers serve any shape up to their capacity (LM buffers exist when
    // host_losses does).
    if (m->act_mem && M <= m->cap_rows && Mc <= m->cap_cmp_rows && want_layers <= m->cap_layers &&
        (!lm || m->host_losses))
        return NSA_OK;
    size_t rows = M > m->cap_rows ? M : m->cap_rows;
    size_t cmp_rows = Mc > m->cap_cmp_rows ? Mc : m->cap_cmp_rows;
    int layers = want_layers > m->cap_layers ? want_layers : m->cap_layers;
    int with_lm = lm || m->host_losses != NULL;
    nsa__model_release_acts(m);
    int N = m->cfg.num_layers;
    m->acts = nsa__calloc((size_t)N, sizeof *m->acts, "activation table");
    m->layer_out = nsa__calloc((size_t)N + 2, sizeof *m->layer_out, "activation table");
    if (!m->acts || !m->layer_out) {
        nsa__model_release_acts(m);
        return NSA_ERR_NOMEM;
    }
    int keep_all = layers >= N;
    size_t bytes = layout_all(m, NULL, rows, cmp_rows, keep_all, with_lm);
    nsa_status st = m->ctx->ops->alloc(m->ctx, &m->act_mem, bytes);
    if (st != NSA_OK) {
        nsa__model_release_acts(m);
        return nsa__error(st, "out of memory for activations: %.1f MiB for B*T = %zu rows",
                          (double)bytes / 1048576.0, M);
    }
    layout_all(m, m->act_mem, rows, cmp_rows, keep_all, with_lm);
    if (with_lm) {
        m->host_losses = nsa__malloc(rows * sizeof(float), "losses");
        if (!m->host_losses) {
            nsa__model_release_acts(m);
            return NSA_ERR_NOMEM;
        }
    }
    m->cap_rows = rows;
    m->cap_cmp_rows = cmp_rows;
    m->cap_layers = keep_all ? N : 1;
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// One layer

static void attn_dims_for(const nsa_model *m, int B, int T, nsa__attn_dims *dm)
{
    nsa_attention_desc desc;
    nsa_attention_desc_from_config(&desc, &m->cfg);
    desc.batch = B;
    desc.seq_len = T;
    nsa__attn_dims_init(dm, &desc);
}

#define P(off) (m->params + (off))
#define DP(off) (m->grads + (off))

// Dropout streams: one per (forward call, layer, site).
static uint64_t dropout_stream(const nsa_model *m, int layer, int site)
{
    return (m->rng_counter << 16) | ((uint64_t)layer * 4 + (uint64_t)site);
}

// The attention sublayer: z = a->ln1 [M,D] -> a->proj [M,D] (before dropout).
static nsa_status attention_forward(nsa_model *m, int li, layer_acts *a, int B, int T, int keep)
{
    const nsa__backend_ops *ops = m->ctx->ops;
    nsa_context *ctx = m->ctx;
    const nsa_config *cfg = &m->cfg;
    const layer_offsets *L = &m->layers[li];
    int M = B * T, D = cfg->hidden_size, H = cfg->num_heads, d = cfg->head_dim, G = m->G;
    int l = m->l, r = cfg->compression_ratio;
    nsa__attn_dims dm;
    attn_dims_for(m, B, T, &dm);
    int Mc = B * dm.num_cmp * G;
    NSA_TRY(ops->linear_forward(ctx, a->q, a->ln1, P(L->q_w), P(L->q_b), M, D, H * d));
    NSA_TRY(ops->linear_forward(ctx, a->k, a->ln1, P(L->k_w), P(L->k_b), M, D, G * d));
    NSA_TRY(ops->linear_forward(ctx, a->v, a->ln1, P(L->v_w), P(L->v_b), M, D, G * d));
    if (cfg->rope_theta > 0.0) {
        NSA_TRY(ops->rope(ctx, a->q, B, T, 0, H, d, cfg->rope_theta, 0));
        NSA_TRY(ops->rope(ctx, a->k, B, T, 0, G, d, cfg->rope_theta, 0));
    }
    if (cfg->compress == NSA_COMPRESS_MLP) {
        if (Mc > 0) {
            NSA_TRY(ops->compress_gather(ctx, a->ck_in, a->k, P(L->ck_pos), B, T, G, d, l, r));
            NSA_TRY(ops->linear_forward(ctx, a->ck_hid, a->ck_in, P(L->ck_fc1_w), P(L->ck_fc1_b),
                                        Mc, l * d, d));
            NSA_TRY(ops->gelu_forward(ctx, a->ck_act, a->ck_hid, (size_t)Mc * d));
            NSA_TRY(ops->linear_forward(ctx, a->kc, a->ck_act, P(L->ck_fc2_w), P(L->ck_fc2_b), Mc,
                                        d, d));
            NSA_TRY(ops->compress_gather(ctx, a->cv_in, a->v, P(L->cv_pos), B, T, G, d, l, r));
            NSA_TRY(ops->linear_forward(ctx, a->cv_hid, a->cv_in, P(L->cv_fc1_w), P(L->cv_fc1_b),
                                        Mc, l * d, d));
            NSA_TRY(ops->gelu_forward(ctx, a->cv_act, a->cv_hid, (size_t)Mc * d));
            NSA_TRY(ops->linear_forward(ctx, a->vc, a->cv_act, P(L->cv_fc2_w), P(L->cv_fc2_b), Mc,
                                        d, d));
        }
    } else {
        const float *wk = cfg->compress == NSA_COMPRESS_CONV ? P(L->ck_w) : NULL;
        const float *wv = cfg->compress == NSA_COMPRESS_CONV ? P(L->cv_w) : NULL;
        NSA_TRY(ops->compress_forward(ctx, a->kc, a->k, wk, B, T, G, d, l, r));
        NSA_TRY(ops->compress_forward(ctx, a->vc, a->v, wv, B, T, G, d, l, r));
    }
    if (m->gate_override) {
        NSA_TRY(ops->gate_forward(ctx, a->gates, m->gate_override, M, H, NSA_GATE_STATIC));
    } else if (cfg->gate == NSA_GATE_STATIC) {
        NSA_TRY(ops->gate_forward(ctx, a->gates, P(L->gate), M, H, NSA_GATE_STATIC));
    } else {
        NSA_TRY(ops->linear_forward(ctx, a->gate_logits, a->ln1, P(L->gate_w), P(L->gate_b), M, D,
                                    3 * H));
        NSA_TRY(ops->gate_forward(ctx, a->gates, a->gate_logits, M, H, NSA_GATE_TOKEN));
    }
    NSA_TRY(ops->attn_forward(ctx, &dm, a->q, a->k, a->v, a->kc, a->vc, a->gates, NULL, a->idx,
                              a->attn, keep ? a->o_paths : NULL, keep ? a->lse : NULL));
    return ops->linear_forward(ctx, a->proj, a->attn, P(L->o_w), P(L->o_b), M, H * d, D);
}

// Block li: x [M,D] -> y [M,D].
static nsa_status layer_forward(nsa_model *m, int li, const float *x, float *y, int B, int T,
                                int keep, int train)
{
    const nsa__backend_ops *ops = m->ctx->ops;
    nsa_context *ctx = m->ctx;
    const layer_offsets *L = &m->layers[li];
    layer_acts *a = &m->acts[li];
    int M = B * T, D = m->cfg.hidden_size;
    float p = (float)m->cfg.dropout;
    size_t n = (size_t)M * D;
    NSA_TRY(ops->layernorm_forward(ctx, a->ln1, a->ln1_mean, a->ln1_rstd, x, P(L->attn_norm_w),
                                   P(L->attn_norm_b), M, D));
    NSA_TRY(attention_forward(m, li, a, B, T, keep));
    if (train)
        NSA_TRY(ops->dropout(ctx, a->proj, n, p, m->rng_seed, dropout_stream(m, li, 0)));
    NSA_TRY(ops->add(ctx, a->h, x, a->proj, n));
    NSA_TRY(ops->layernorm_forward(ctx, a->ln2, a->ln2_mean, a->ln2_rstd, a->h, P(L->ffn_norm_w),
                                   P(L->ffn_norm_b), M, D));
    NSA_TRY(ops->linear_forward(ctx, a->up, a->ln2, P(L->up_w), P(L->up_b), M, D, 4 * D));
    NSA_TRY(ops->gelu_forward(ctx, a->act, a->up, (size_t)M * 4 * D));
    NSA_TRY(ops->linear_forward(ctx, a->down, a->act, P(L->down_w), P(L->down_b), M, 4 * D, D));
    if (train)
        NSA_TRY(ops->dropout(ctx, a->down, n, p, m->rng_seed, dropout_stream(m, li, 1)));
    NSA_TRY(ops->add(ctx, y, a->h, a->down, n));
    if (train && li < m->cfg.num_layers - 1)
        NSA_TRY(ops->dropout(ctx, y, n, p, m->rng_seed, dropout_stream(m, li, 2)));
    return NSA_OK;
}

// Backward of block li: dy [M,D] (consumed, modified) -> dx [M,D] (=); parameter
// gradients +=. x is the block's input.
static nsa_status layer_backward(nsa_model *m, int li, const float *x, float *dy, float *dx, int B,
                                 int T, int train)
{
    const nsa__backend_ops *ops = m->ctx->ops;
    nsa_context *ctx = m->ctx;
    const nsa_config *cfg = &m->cfg;
    const layer_offsets *L = &m->layers[li];
    layer_acts *a = &m->acts[li], *g = &m->grad;
    int M = B * T, D = cfg->hidden_size, H = cfg->num_heads, d = cfg->head_dim, G = m->G;
    int l = m->l, r = cfg->compression_ratio;
    float p = (float)cfg->dropout;
    size_t n = (size_t)M * D;
    nsa__attn_dims dm;
    attn_dims_for(m, B, T, &dm);
    int Mc = B * dm.num_cmp * G;

    if (train && li < cfg->num_layers - 1)
        NSA_TRY(ops->dropout(ctx, dy, n, p, m->rng_seed, dropout_stream(m, li, 2)));
    // y = h + dropout(down)
    NSA_TRY(ops->copy(ctx, g->down, dy, n * sizeof(float)));
    if (train)
        NSA_TRY(ops->dropout(ctx, g->down, n, p, m->rng_seed, dropout_stream(m, li, 1)));
    NSA_TRY(ops->linear_backward(ctx, g->act, 0.0f, DP(L->down_w), DP(L->down_b), g->down, a->act,
                                 P(L->down_w), M, 4 * D, D));
    NSA_TRY(ops->gelu_backward(ctx, g->up, g->act, a->up, (size_t)M * 4 * D));
    NSA_TRY(ops->linear_backward(ctx, g->ln2, 0.0f, DP(L->up_w), DP(L->up_b), g->up, a->ln2,
                                 P(L->up_w), M, D, 4 * D));
    NSA_TRY(ops->copy(ctx, g->h, dy, n * sizeof(float)));
    NSA_TRY(ops->layernorm_backward(ctx, g->h, DP(L->ffn_norm_w), DP(L->ffn_norm_b), g->ln2, a->h,
                                    a->ln2_mean, a->ln2_rstd, P(L->ffn_norm_w), M, D));
    // h = x + dropout(proj)
    NSA_TRY(ops->copy(ctx, g->proj, g->h, n * sizeof(float)));
    if (train)
        NSA_TRY(ops->dropout(ctx, g->proj, n, p, m->rng_seed, dropout_stream(m, li, 0)));
    NSA_TRY(ops->linear_backward(ctx, g->attn, 0.0f, DP(L->o_w), DP(L->o_b), g->proj, a->attn,
                                 P(L->o_w), M, H * d, D));
    NSA_TRY(ops->attn_backward(ctx, &dm, a->q, a->k, a->v, a->kc, a->vc, a->gates, a->idx,
                               a->o_paths, a->lse, g->attn, g->q, g->k, g->v, g->kc, g->vc,
                               g->gates));
    float ln1_beta = 0.0f; // the first product into g->ln1 overwrites it
    if (m->gate_override) {
        // forced gates: no gradient for the gate parameters
    } else if (cfg->gate == NSA_GATE_STATIC) {
        NSA_TRY(ops->gate_backward(ctx, DP(L->gate), g->gates, a->gates, M, H, NSA_GATE_STATIC));
    } else {
        NSA_TRY(ops->gate_backward(ctx, g->gate_logits, g->gates, a->gates, M, H, NSA_GATE_TOKEN));
        NSA_TRY(ops->linear_backward(ctx, g->ln1, 0.0f, DP(L->gate_w), DP(L->gate_b),
                                     g->gate_logits, a->ln1, P(L->gate_w), M, D, 3 * H));
        ln1_beta = 1.0f;
    }
    if (cfg->compress == NSA_COMPRESS_MLP) {
        if (Mc > 0) {
            NSA_TRY(ops->linear_backward(ctx, g->ck_act, 0.0f, DP(L->ck_fc2_w), DP(L->ck_fc2_b),
                                         g->kc, a->ck_act, P(L->ck_fc2_w), Mc, d, d));
            NSA_TRY(ops->gelu_backward(ctx, g->ck_hid, g->ck_act, a->ck_hid, (size_t)Mc * d));
            NSA_TRY(ops->linear_backward(ctx, g->ck_in, 0.0f, DP(L->ck_fc1_w), DP(L->ck_fc1_b),
                                         g->ck_hid, a->ck_in, P(L->ck_fc1_w), Mc, l * d, d));
            NSA_TRY(ops->compress_gather_backward(ctx, g->k, DP(L->ck_pos), g->ck_in, B, T, G, d,
                                                  l, r));
            NSA_TRY(ops->linear_backward(ctx, g->cv_act, 0.0f, DP(L->cv_fc2_w), DP(L->cv_fc2_b),
                                         g->vc, a->cv_act, P(L->cv_fc2_w), Mc, d, d));
            NSA_TRY(ops->gelu_backward(ctx, g->cv_hid, g->cv_act, a->cv_hid, (size_t)Mc * d));
            NSA_TRY(ops->linear_backward(ctx, g->cv_in, 0.0f, DP(L->cv_fc1_w), DP(L->cv_fc1_b),
                                         g->cv_hid, a->cv_in, P(L->cv_fc1_w), Mc, l * d, d));
            NSA_TRY(ops->compress_gather_backward(ctx, g->v, DP(L->cv_pos), g->cv_in, B, T, G, d,
                                                  l, r));
        }
    } else {
        int conv = cfg->compress == NSA_COMPRESS_CONV;
        NSA_TRY(ops->compress_backward(ctx, g->k, conv ? DP(L->ck_w) : NULL, g->kc, a->k,
                                       conv ? P(L->ck_w) : NULL, B, T, G, d, l, r));
        NSA_TRY(ops->compress_backward(ctx, g->v, conv ? DP(L->cv_w) : NULL, g->vc, a->v,
                                       conv ? P(L->cv_w) : NULL, B, T, G, d, l, r));
    }
    if (cfg->rope_theta > 0.0) {
        NSA_TRY(ops->rope(ctx, g->q, B, T, 0, H, d, cfg->rope_theta, 1));
        NSA_TRY(ops->rope(ctx, g->k, B, T, 0, G, d, cfg->rope_theta, 1));
    }
    NSA_TRY(ops->linear_backward(ctx, g->ln1, ln1_beta, DP(L->q_w), DP(L->q_b), g->q, a->ln1,
                                 P(L->q_w), M, D, H * d));
    NSA_TRY(ops->linear_backward(ctx, g->ln1, 1.0f, DP(L->k_w), DP(L->k_b), g->k, a->ln1,
                                 P(L->k_w), M, D, G * d));
    NSA_TRY(ops->linear_backward(ctx, g->ln1, 1.0f, DP(L->v_w), DP(L->v_b), g->v, a->ln1,
                                 P(L->v_w), M, D, G * d));
    NSA_TRY(ops->copy(ctx, dx, g->h, n * sizeof(float)));
    return ops->layernorm_backward(ctx, dx, DP(L->attn_norm_w), DP(L->attn_norm_b), g->ln1, x,
                                   a->ln1_mean, a->ln1_rstd, P(L->attn_norm_w), M, D);
}

// ---------------------------------------------------------------------------------------
// The whole model

static nsa_status check_shape_args(const nsa_model *m, const void *x, int B, int T,
                                   const void *out)
{
    if (!m)
        return nsa__error(NSA_ERR_INVALID, "model is NULL");
    if (!x || !out)
        return nsa__error(NSA_ERR_INVALID, "input and output must not be NULL");
    if (B < 1 || T < 1)
        return nsa__error(NSA_ERR_SHAPE, "batch = %d, seq_len = %d: both must be >= 1", B, T);
    if ((double)B * T > 1e9)
        return nsa__error(NSA_ERR_SHAPE, "batch * seq_len = %.3g: too large", (double)B * T);
    return NSA_OK;
}

// Runs the model on m->x_in (already on the device): all layers and the final norm.
static nsa_status run_body(nsa_model *m, int B, int T, unsigned flags)
{
    const nsa__backend_ops *ops = m->ctx->ops;
    const nsa_config *cfg = &m->cfg;
    int M = B * T, D = cfg->hidden_size, E = cfg->embed_dim, N = cfg->num_layers;
    int train = (flags & NSA_FWD_TRAIN) != 0 && cfg->dropout > 0.0;
    int keep = (flags & (NSA_FWD_TRAIN | NSA_FWD_KEEP)) != 0;
    if (E != D)
        NSA_TRY(ops->linear_forward(m->ctx, m->x0, m->x_in, P(m->in_proj_w), P(m->in_proj_b), M, E,
                                    D));
    const float *x = m->x0;
    for (int i = 0; i < N; i++) {
        float *y = keep ? m->layer_out[i] : m->layer_out[i % 2];
        NSA_TRY(layer_forward(m, i, x, y, B, T, keep, train));
        x = y;
    }
    NSA_TRY(ops->layernorm_forward(m->ctx, m->final, m->final_mean, m->final_rstd, x,
                                   P(m->final_w), P(m->final_b), M, D));
    m->act_B = B;
    m->act_T = T;
    m->act_flags = flags;
    m->act_valid = keep;
    if (train)
        m->rng_counter++;
    return NSA_OK;
}

nsa_status nsa_model_forward(nsa_model *m, const float *x, int B, int T, unsigned flags, float *out)
{
    NSA_TRY(check_shape_args(m, x, B, T, out));
    const nsa_config *cfg = &m->cfg;
    size_t M = (size_t)B * T, D = cfg->hidden_size, E = cfg->embed_dim;
    if (nsa__has_nonfinite(x, M * E))
        return nsa__error(NSA_ERR_NUMERIC, "input x [%d,%d,%zu] contains NaN or Inf", B, T, E);
    int keep = (flags & (NSA_FWD_TRAIN | NSA_FWD_KEEP)) != 0;
    m->act_valid = 0;
    NSA_TRY(nsa__model_reserve(m, B, T, keep, 0));
    const nsa__backend_ops *ops = m->ctx->ops;
    NSA_TRY(ops->upload(m->ctx, m->x_in, x, M * E * sizeof(float)));
    NSA_TRY(run_body(m, B, T, flags));
    if (flags & NSA_FWD_ALL_POSITIONS)
        return ops->download(m->ctx, out, m->final, M * D * sizeof(float));
    for (int b = 0; b < B; b++)
        NSA_TRY(ops->download(m->ctx, out + (size_t)b * D, m->final + ((size_t)b * T + T - 1) * D,
                              D * sizeof(float)));
    return NSA_OK;
}

// Backward from d(final) in m->d_a ([M,D], device) down to d(x_in) in m->d_x (when wanted).
static nsa_status backward_body(nsa_model *m, int want_dx)
{
    const nsa__backend_ops *ops = m->ctx->ops;
    const nsa_config *cfg = &m->cfg;
    int B = m->act_B, T = m->act_T, M = B * T, D = cfg->hidden_size, E = cfg->embed_dim;
    int N = cfg->num_layers;
    int train = (m->act_flags & NSA_FWD_TRAIN) != 0 && cfg->dropout > 0.0;
    size_t n = (size_t)M * D;
    // d_a holds d(final); d_b = d(last layer out)
    NSA_TRY(ops->zero(m->ctx, m->d_b, n * sizeof(float)));
    NSA_TRY(ops->layernorm_backward(m->ctx, m->d_b, DP(m->final_w), DP(m->final_b), m->d_a,
                                    m->layer_out[N - 1], m->final_mean, m->final_rstd,
                                    P(m->final_w), M, D));
    float *dy = m->d_b, *dx = m->d_a;
    for (int i = N - 1; i >= 0; i--) {
        const float *x = i > 0 ? m->layer_out[i - 1] : m->x0;
        NSA_TRY(layer_backward(m, i, x, dy, dx, B, T, train));
        float *tmp = dy;
        dy = dx;
        dx = tmp;
    }
    // dy = d(x0)
    if (E != D) {
        NSA_TRY(ops->linear_backward(m->ctx, want_dx ? m->d_x : NULL, 0.0f, DP(m->in_proj_w),
                                     DP(m->in_proj_b), dy, m->x_in, P(m->in_proj_w), M, E, D));
    } else if (want_dx) {
        NSA_TRY(ops->copy(m->ctx, m->d_x, dy, n * sizeof(float)));
    }
    return NSA_OK;
}

nsa_status nsa_model_backward(nsa_model *m, const float *dout, float *dx)
{
    if (!m || !dout)
        return nsa__error(NSA_ERR_INVALID, "nsa_model_backward: model and dout must not be NULL");
    if (!m->act_valid)
        return nsa__error(NSA_ERR_INVALID, "nsa_model_backward: no forward with NSA_FWD_TRAIN or "
                                           "NSA_FWD_KEEP precedes it");
    const nsa__backend_ops *ops = m->ctx->ops;
    int B = m->act_B, T = m->act_T;
    size_t M = (size_t)B * T, D = m->cfg.hidden_size, E = m->cfg.embed_dim;
    if (m->act_flags & NSA_FWD_ALL_POSITIONS) {
        if (nsa__has_nonfinite(dout, M * D))
            return nsa__error(NSA_ERR_NUMERIC, "dout contains NaN or Inf");
        NSA_TRY(ops->upload(m->ctx, m->d_a, dout, M * D * sizeof(float)));
    } else {
        if (nsa__has_nonfinite(dout, (size_t)B * D))
            return nsa__error(NSA_ERR_NUMERIC, "dout contains NaN or Inf");
        NSA_TRY(ops->zero(m->ctx, m->d_a, M * D * sizeof(float)));
        for (int b = 0; b < B; b++)
            NSA_TRY(ops->upload(m->ctx, m->d_a + ((size_t)b * T + T - 1) * D, dout + (size_t)b * D,
                                D * sizeof(float)));
    }
    NSA_TRY(backward_body(m, dx != NULL));
    if (dx)
        NSA_TRY(ops->download(m->ctx, dx, m->d_x, M * E * sizeof(float)));
    return NSA_OK;
}

static nsa_status check_layer(const nsa_model *m, int layer)
{
    if (layer < 0 || layer >= m->cfg.num_layers)
        return nsa__error(NSA_ERR_INVALID, "layer = %d: must be in [0, %d)", layer,
                          m->cfg.num_layers);
    return NSA_OK;
}

// The checks and buffers shared by the single-layer entry points; in [B,T,D] named `what`.
static nsa_status prepare_layer_call(nsa_model *m, int layer, const float *in, int B, int T,
                                     const float *out, const char *what)
{
    NSA_TRY(check_shape_args(m, in, B, T, out));
    NSA_TRY(check_layer(m, layer));
    if (nsa__has_nonfinite(in, (size_t)B * T * m->cfg.hidden_size))
        return nsa__error(NSA_ERR_NUMERIC, "input %s contains NaN or Inf", what);
    m->act_valid = 0;
    return nsa__model_reserve(m, B, T, 0, 0);
}

nsa_status nsa_model_block_forward(nsa_model *m, int layer, const float *x, int B, int T,
                                   float *out)
{
    NSA_TRY(prepare_layer_call(m, layer, x, B, T, out, "x"));
    size_t n = (size_t)B * T * m->cfg.hidden_size;
    const nsa__backend_ops *ops = m->ctx->ops;
    NSA_TRY(ops->upload(m->ctx, m->layer_out[0], x, n * sizeof(float)));
    // Run with layer `layer`'s weights and activations slot 0.
    layer_acts saved = m->acts[layer];
    m->acts[layer] = m->acts[0];
    nsa_status st = layer_forward(m, layer, m->layer_out[0], m->layer_out[1], B, T, 0, 0);
    m->acts[layer] = saved;
    NSA_TRY(st);
    return ops->download(m->ctx, out, m->layer_out[1], n * sizeof(float));
}

nsa_status nsa_model_attention_forward(nsa_model *m, int layer, const float *z, int B, int T,
                                       float *out)
{
    NSA_TRY(prepare_layer_call(m, layer, z, B, T, out, "z"));
    size_t n = (size_t)B * T * m->cfg.hidden_size;
    const nsa__backend_ops *ops = m->ctx->ops;
    layer_acts *a = &m->acts[0];
    NSA_TRY(ops->upload(m->ctx, a->ln1, z, n * sizeof(float)));
    NSA_TRY(attention_forward(m, layer, a, B, T, 0));
    return ops->download(m->ctx, out, a->proj, n * sizeof(float));
}

// ---------------------------------------------------------------------------------------
// Language model (SPEC §5)

nsa_status nsa_lm_forward(nsa_model *m, const int32_t *tokens, int B, int T, unsigned flags,
                          float *logits, float *loss)
{
    return nsa_lm_forward_weighted(m, tokens, NULL, B, T, flags, logits, loss);
}

nsa_status nsa_lm_forward_weighted(nsa_model *m, const int32_t *tokens, const float *weights,
                                   int B, int T, unsigned flags, float *logits, float *loss)
{
    if (!m || !tokens)
        return nsa__error(NSA_ERR_INVALID, "nsa_lm_forward: model and tokens must not be NULL");
    const nsa_config *cfg = &m->cfg;
    if (cfg->vocab_size <= 0)
        return nsa__error(NSA_ERR_INVALID, "nsa_lm_forward: the model has no language-model "
                                           "wrapper (vocab_size = 0)");
    if (B < 1 || T < 1 || (double)B * T > 1e9)
        return nsa__error(NSA_ERR_SHAPE, "batch = %d, seq_len = %d: both must be >= 1", B, T);
    int keep = (flags & (NSA_FWD_TRAIN | NSA_FWD_KEEP)) != 0;
    if ((loss || keep) && T < 2)
        return nsa__error(NSA_ERR_SHAPE, "seq_len = %d: the next-token loss needs at least 2", T);
    size_t M = (size_t)B * T, V = cfg->vocab_size, E = cfg->embed_dim, D = cfg->hidden_size;
    for (size_t i = 0; i < M; i++)
        if (tokens[i] < 0 || tokens[i] >= cfg->vocab_size)
            return nsa__error(NSA_ERR_INVALID, "tokens[%zu] = %d: must be in [0, %d)", i,
                              (int)tokens[i], cfg->vocab_size);
    double weight_sum = (double)B * (T - 1);
    if (weights) {
        weight_sum = 0.0;
        for (size_t i = 0; i < M; i++) {
            if (!(weights[i] >= 0.0f) || !isfinite(weights[i]))
                return nsa__error(NSA_ERR_INVALID, "weights[%zu] = %g: must be finite and >= 0",
                                  i, (double)weights[i]);
            if ((int)(i % (size_t)T) != T - 1)
                weight_sum += weights[i];
        }
        if (weight_sum <= 0.0)
            return nsa__error(NSA_ERR_INVALID, "loss weights are all zero");
    }
    m->act_valid = 0;
    NSA_TRY(nsa__model_reserve(m, B, T, keep, 1));
    const nsa__backend_ops *ops = m->ctx->ops;
    NSA_TRY(ops->upload(m->ctx, m->tokens, tokens, M * sizeof(int32_t)));
    if (weights)
        NSA_TRY(ops->upload(m->ctx, m->weights, weights, M * sizeof(float)));
    const float *dev_weights = weights ? m->weights : NULL;
    NSA_TRY(ops->embedding_forward(m->ctx, m->x_in, m->tokens, P(m->embed), (int)M, (int)E));
    NSA_TRY(run_body(m, B, T, flags | NSA_FWD_ALL_POSITIONS));
    NSA_TRY(ops->linear_forward(m->ctx, m->logits, m->final, P(m->lm_w), P(m->lm_b), (int)M,
                                (int)D, (int)V));
    if (logits)
        NSA_TRY(ops->download(m->ctx, logits, m->logits, M * V * sizeof(float)));
    if (loss) {
        NSA_TRY(ops->cross_entropy(m->ctx, m->losses, NULL, m->logits, m->tokens, dev_weights, B,
                                   T, (int)V, 1.0f));
        NSA_TRY(ops->download(m->ctx, m->host_losses, m->losses, M * sizeof(float)));
        double s = 0.0;
        for (size_t i = 0; i < M; i++)
            s += m->host_losses[i];
        *loss = (float)(s / weight_sum);
    }
    m->weight_sum = weight_sum;
    m->has_weights = weights != NULL;
    m->act_valid = keep ? 2 : 0; // 2: an LM forward
    return NSA_OK;
}

nsa_status nsa_lm_backward(nsa_model *m, float scale)
{
    if (!m)
        return nsa__error(NSA_ERR_INVALID, "nsa_lm_backward: model is NULL");
    if (m->act_valid != 2)
        return nsa__error(NSA_ERR_INVALID, "nsa_lm_backward: no nsa_lm_forward with NSA_FWD_TRAIN "
                                           "or NSA_FWD_KEEP precedes it");
    if (m->act_T < 2)
        return nsa__error(NSA_ERR_SHAPE, "nsa_lm_backward: seq_len must be >= 2");
    const nsa__backend_ops *ops = m->ctx->ops;
    const nsa_config *cfg = &m->cfg;
    int B = m->act_B, T = m->act_T, M = B * T, V = cfg->vocab_size, D = cfg->hidden_size;
    NSA_TRY(ops->cross_entropy(m->ctx, m->losses, m->dlogits, m->logits, m->tokens,
                               m->has_weights ? m->weights : NULL, B, T, V,
                               (float)(scale / m->weight_sum)));
    NSA_TRY(ops->linear_backward(m->ctx, m->d_a, 0.0f, DP(m->lm_w), DP(m->lm_b), m->dlogits,
                                 m->final, P(m->lm_w), M, D, V));
    NSA_TRY(backward_body(m, 1));
    return ops->embedding_backward(m->ctx, DP(m->embed), m->tokens, m->d_x, M, cfg->embed_dim);
}

// ---------------------------------------------------------------------------------------
// Gate override

nsa_status nsa_model_set_gate_override(nsa_model *m, const float *gates3)
{
    if (!m)
        return nsa__error(NSA_ERR_INVALID, "nsa_model_set_gate_override: model is NULL");
    m->act_valid = 0;
    if (!gates3) {
        if (m->gate_override)
            m->ctx->ops->free(m->ctx, m->gate_override);
        m->gate_override = NULL;
        return NSA_OK;
    }
    for (int c = 0; c < 3; c++)
        if (!(gates3[c] >= 0.0f && gates3[c] <= 1.0f))
            return nsa__error(NSA_ERR_INVALID, "gate override[%d] = %g: must be in [0, 1]", c,
                              (double)gates3[c]);
    // Stored as logits log(g) for the static gate's softmax, which gives back g exactly
    // when the three sum to 1 (log 0 = -inf gives an exact 0).
    float sum = gates3[0] + gates3[1] + gates3[2];
    if (!(sum > 0.0f))
        return nsa__error(NSA_ERR_INVALID, "gate override: at least one gate must be > 0");
    if (fabsf(sum - 1.0f) > 1e-6f)
        return nsa__error(NSA_ERR_INVALID, "gate override: the three gates must sum to 1 (got %g)",
                          (double)sum);
    float logits[3];
    for (int c = 0; c < 3; c++)
        logits[c] = gates3[c] > 0.0f ? logf(gates3[c]) : -INFINITY;
    if (!m->gate_override)
        NSA_TRY(m->ctx->ops->alloc(m->ctx, (void **)&m->gate_override, 3 * sizeof(float)));
    return m->ctx->ops->upload(m->ctx, m->gate_override, logits, 3 * sizeof(float));
}
