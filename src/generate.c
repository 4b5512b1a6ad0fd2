/*
 * generate.c — cached generation (SPEC §5): the language model run one token at a time
 * over the backend, keeping per layer the rotated keys, the values and the compressed
 * tokens of the sequence so far. A step computes one row of every dense op and one query
 * of attention (the backend's attn_forward with q_start = t), so its logits equal the
 * full forward's at the same position.
 */
#include "model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct layer_cache {
    float *k, *v;   // [max_len, G*d] (k rotated)
    float *kc, *vc; // [max_cmp, G*d]
} layer_cache;

struct nsa_generator {
    nsa_model *model;
    int max_len, max_cmp, length;
    void *mem; // one device allocation for everything below
    layer_cache *layers;
    int32_t *token; // [1]
    float *x, *cur, *ln, *mean, *rstd, *q, *gate_logits, *gates, *attn, *proj, *h, *up, *act,
        *down, *logits;
    float *cmp_in, *cmp_hid, *cmp_act; // mlp compression of one block: [G, l*d], [G,d], [G,d]
    int32_t *idx;                      // [G*n]
};

#define P(off) (m->params + (off))

static size_t layout(nsa_generator *g, char *base)
{
    const nsa_model *m = g->model;
    const nsa_config *cfg = &m->cfg;
    size_t E = cfg->embed_dim, D = cfg->hidden_size, H = cfg->num_heads, d = cfg->head_dim;
    size_t G = m->G, l = m->l, V = cfg->vocab_size;
    nsa__carver c = {base, 0};
    for (int i = 0; i < cfg->num_layers; i++) {
        g->layers[i].k = NSA_TAKE_F(&c, (size_t)g->max_len * G * d);
        g->layers[i].v = NSA_TAKE_F(&c, (size_t)g->max_len * G * d);
        g->layers[i].kc = NSA_TAKE_F(&c, (size_t)(g->max_cmp > 0 ? g->max_cmp : 1) * G * d);
        g->layers[i].vc = NSA_TAKE_F(&c, (size_t)(g->max_cmp > 0 ? g->max_cmp : 1) * G * d);
    }
    g->token = (int32_t *)nsa__take(&c, sizeof(int32_t));
    g->x = NSA_TAKE_F(&c, E);
    g->cur = NSA_TAKE_F(&c, D);
    g->ln = NSA_TAKE_F(&c, D);
    g->mean = NSA_TAKE_F(&c, 1);
    g->rstd = NSA_TAKE_F(&c, 1);
    g->q = NSA_TAKE_F(&c, H * d);
    g->gate_logits = NSA_TAKE_F(&c, 3 * H);
    g->gates = NSA_TAKE_F(&c, 3 * H);
    g->attn = NSA_TAKE_F(&c, H * d);
    g->proj = NSA_TAKE_F(&c, D);
    g->h = NSA_TAKE_F(&c, D);
    g->up = NSA_TAKE_F(&c, 4 * D);
    g->act = NSA_TAKE_F(&c, 4 * D);
    g->down = NSA_TAKE_F(&c, D);
    g->logits = NSA_TAKE_F(&c, V);
    g->cmp_in = NSA_TAKE_F(&c, G * l * d);
    g->cmp_hid = NSA_TAKE_F(&c, G * d);
    g->cmp_act = NSA_TAKE_F(&c, G * d);
    g->idx = (int32_t *)nsa__take(&c, G * (size_t)cfg->num_selected_blocks * sizeof(int32_t));
    return c.off;
}

nsa_status nsa_generator_create(nsa_generator **out, nsa_model *m, int max_len)
{
    if (!out || !m)
        return nsa__error(NSA_ERR_INVALID, "nsa_generator_create: NULL argument");
    *out = NULL;
    if (m->cfg.vocab_size <= 0)
        return nsa__error(NSA_ERR_INVALID, "generation needs a language model: vocab_size = 0");
    if (max_len < 1 || max_len > (1 << 24))
        return nsa__error(NSA_ERR_INVALID, "max_len = %d: must be in [1, 16777216]", max_len);
    nsa_generator *g = nsa__calloc(1, sizeof *g, "generator");
    if (!g)
        return NSA_ERR_NOMEM;
    g->model = m;
    g->max_len = max_len;
    g->max_cmp = max_len >= m->l ? (max_len - m->l) / m->cfg.compression_ratio + 1 : 0;
    g->layers = nsa__calloc((size_t)m->cfg.num_layers, sizeof *g->layers, "generator caches");
    if (!g->layers) {
        free(g);
        return NSA_ERR_NOMEM;
    }
    size_t bytes = layout(g, NULL);
    nsa_status st = m->ctx->ops->alloc(m->ctx, &g->mem, bytes);
    if (st != NSA_OK) {
        free(g->layers);
        free(g);
        return nsa__error(st, "out of memory for generation caches (%.1f MiB for max_len %d)",
                          (double)bytes / 1048576.0, max_len);
    }
    layout(g, g->mem);
    *out = g;
    return NSA_OK;
}

void nsa_generator_free(nsa_generator *g)
{
    if (!g)
        return;
    if (g->mem)
        g->model->ctx->ops->free(g->model->ctx, g->mem);
    free(g->layers);
    free(g);
}

int nsa_generator_length(const nsa_generator *g)
{
    return g->length;
}

void nsa_generator_reset(nsa_generator *g)
{
    g->length = 0;
}

// The compressed key (or value) token j from the cached rows j*r .. j*r+l-1.
static nsa_status compress_token(nsa_generator *g, const layer_offsets *L, int which, int j,
                                 const float *cache, float *dst)
{
    nsa_model *m = g->model;
    nsa_context *ctx = m->ctx;
    const nsa_config *cfg = &m->cfg;
    int G = m->G, d = cfg->head_dim, l = m->l, r = cfg->compression_ratio;
    const float *rows = cache + (size_t)j * r * G * d;
    if (cfg->compress != NSA_COMPRESS_MLP) {
        const float *w = NULL;
        if (cfg->compress == NSA_COMPRESS_CONV)
            w = P(which ? L->cv_w : L->ck_w);
        return ctx->ops->compress_forward(ctx, dst, rows, w, 1, l, G, d, l, r);
    }
    size_t pos = which ? L->cv_pos : L->ck_pos, fc1_w = which ? L->cv_fc1_w : L->ck_fc1_w;
    size_t fc1_b = which ? L->cv_fc1_b : L->ck_fc1_b, fc2_w = which ? L->cv_fc2_w : L->ck_fc2_w;
    size_t fc2_b = which ? L->cv_fc2_b : L->ck_fc2_b;
    NSA_TRY(ctx->ops->compress_gather(ctx, g->cmp_in, rows, P(pos), 1, l, G, d, l, r));
    NSA_TRY(ctx->ops->linear_forward(ctx, g->cmp_hid, g->cmp_in, P(fc1_w), P(fc1_b), G, l * d, d));
    NSA_TRY(ctx->ops->gelu_forward(ctx, g->cmp_act, g->cmp_hid, (size_t)G * d));
    return ctx->ops->linear_forward(ctx, dst, g->cmp_act, P(fc2_w), P(fc2_b), G, d, d);
}

static nsa_status layer_step(nsa_generator *g, int li, int t)
{
    nsa_model *m = g->model;
    nsa_context *ctx = m->ctx;
    const nsa__backend_ops *ops = ctx->ops;
    const nsa_config *cfg = &m->cfg;
    const layer_offsets *L = &m->layers[li];
    layer_cache *c = &g->layers[li];
    int D = cfg->hidden_size, H = cfg->num_heads, d = cfg->head_dim, G = m->G;
    size_t kv_row = (size_t)G * d;
    float *k_row = c->k + (size_t)t * kv_row, *v_row = c->v + (size_t)t * kv_row;
    NSA_TRY(ops->layernorm_forward(ctx, g->ln, g->mean, g->rstd, g->cur, P(L->attn_norm_w),
                                   P(L->attn_norm_b), 1, D));
    NSA_TRY(ops->linear_forward(ctx, g->q, g->ln, P(L->q_w), P(L->q_b), 1, D, H * d));
    NSA_TRY(ops->linear_forward(ctx, k_row, g->ln, P(L->k_w), P(L->k_b), 1, D, G * d));
    NSA_TRY(ops->linear_forward(ctx, v_row, g->ln, P(L->v_w), P(L->v_b), 1, D, G * d));
    if (cfg->rope_theta > 0.0) {
        NSA_TRY(ops->rope(ctx, g->q, 1, 1, t, H, d, cfg->rope_theta, 0));
        NSA_TRY(ops->rope(ctx, k_row, 1, 1, t, G, d, cfg->rope_theta, 0));
    }
    int len = t + 1, l = m->l, r = cfg->compression_ratio;
    if (len >= l && (len - l) % r == 0) {
        int j = (len - l) / r;
        NSA_TRY(compress_token(g, L, 0, j, c->k, c->kc + (size_t)j * kv_row));
        NSA_TRY(compress_token(g, L, 1, j, c->v, c->vc + (size_t)j * kv_row));
    }
    if (m->gate_override) {
        NSA_TRY(ops->gate_forward(ctx, g->gates, m->gate_override, 1, H, NSA_GATE_STATIC));
    } else if (cfg->gate == NSA_GATE_STATIC) {
        NSA_TRY(ops->gate_forward(ctx, g->gates, P(L->gate), 1, H, NSA_GATE_STATIC));
    } else {
        NSA_TRY(ops->linear_forward(ctx, g->gate_logits, g->ln, P(L->gate_w), P(L->gate_b), 1, D,
                                    3 * H));
        NSA_TRY(ops->gate_forward(ctx, g->gates, g->gate_logits, 1, H, NSA_GATE_TOKEN));
    }
    nsa_attention_desc desc;
    nsa_attention_desc_from_config(&desc, cfg);
    desc.batch = 1;
    desc.seq_len = len;
    nsa__attn_dims dm;
    nsa__attn_dims_init(&dm, &desc);
    dm.q_start = t;
    NSA_TRY(ops->attn_forward(ctx, &dm, g->q, c->k, c->v, c->kc, c->vc, g->gates, NULL, g->idx,
                              g->attn, NULL, NULL));
    NSA_TRY(ops->linear_forward(ctx, g->proj, g->attn, P(L->o_w), P(L->o_b), 1, H * d, D));
    NSA_TRY(ops->add(ctx, g->h, g->cur, g->proj, (size_t)D));
    NSA_TRY(ops->layernorm_forward(ctx, g->ln, g->mean, g->rstd, g->h, P(L->ffn_norm_w),
                                   P(L->ffn_norm_b), 1, D));
    NSA_TRY(ops->linear_forward(ctx, g->up, g->ln, P(L->up_w), P(L->up_b), 1, D, 4 * D));
    NSA_TRY(ops->gelu_forward(ctx, g->act, g->up, (size_t)4 * D));
    NSA_TRY(ops->linear_forward(ctx, g->down, g->act, P(L->down_w), P(L->down_b), 1, 4 * D, D));
    return ops->add(ctx, g->cur, g->h, g->down, (size_t)D);
}

nsa_status nsa_generator_step(nsa_generator *g, int32_t token, float *logits)
{
    if (!g || !logits)
        return nsa__error(NSA_ERR_INVALID, "nsa_generator_step: NULL argument");
    nsa_model *m = g->model;
    const nsa_config *cfg = &m->cfg;
    if (g->length >= g->max_len)
        return nsa__error(NSA_ERR_INVALID, "generator is full: %d tokens (max_len)", g->max_len);
    if (token < 0 || token >= cfg->vocab_size)
        return nsa__error(NSA_ERR_INVALID, "token %d: must be in [0, %d)", (int)token,
                          cfg->vocab_size);
    nsa_context *ctx = m->ctx;
    const nsa__backend_ops *ops = ctx->ops;
    int E = cfg->embed_dim, D = cfg->hidden_size, V = cfg->vocab_size, t = g->length;
    NSA_TRY(ops->upload(ctx, g->token, &token, sizeof token));
    NSA_TRY(ops->embedding_forward(ctx, g->x, g->token, P(m->embed), 1, E));
    if (E != D)
        NSA_TRY(ops->linear_forward(ctx, g->cur, g->x, P(m->in_proj_w), P(m->in_proj_b), 1, E, D));
    else
        NSA_TRY(ops->copy(ctx, g->cur, g->x, (size_t)D * sizeof(float)));
    for (int i = 0; i < cfg->num_layers; i++)
        NSA_TRY(layer_step(g, i, t));
    NSA_TRY(ops->layernorm_forward(ctx, g->ln, g->mean, g->rstd, g->cur, P(m->final_w),
                                   P(m->final_b), 1, D));
    NSA_TRY(ops->linear_forward(ctx, g->logits, g->ln, P(m->lm_w), P(m->lm_b), 1, D, V));
    NSA_TRY(ops->download(ctx, logits, g->logits, (size_t)V * sizeof(float)));
    g->length++;
    return NSA_OK;
}

int32_t nsa_sample_token(const float *logits, int V, double temperature, double u)
{
    int best = 0;
    for (int i = 1; i < V; i++)
        if (logits[i] > logits[best])
            best = i;
    if (!(temperature > 0.0))
        return best;
    double total = 0.0;
    for (int i = 0; i < V; i++)
        total += exp(((double)logits[i] - logits[best]) / temperature);
    double target = u * total, acc = 0.0;
    for (int i = 0; i < V; i++) {
        acc += exp(((double)logits[i] - logits[best]) / temperature);
        if (target < acc)
            return i;
    }
    return best;
}
