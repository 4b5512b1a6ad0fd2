/*
 * model.c — the model object: the table of named parameter tensors inside one contiguous
 * buffer (and its gradient twin), initialisation (SPEC §2), and safetensors checkpoints
 * (SPEC §7). The forward and backward passes are in forward.c.
 */
#include "model.h"
#include "safetensors.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { INIT_ZERO, INIT_ONE, INIT_GLOROT, INIT_INV_L, INIT_NORMAL };

// ---------------------------------------------------------------------------------------
// The tensor table

typedef struct table_builder {
    nsa_model *m;
    size_t cap;
    size_t offset;
    nsa_status status;
} table_builder;

static size_t add_tensor(table_builder *tb, const char *name, int ndim, const int64_t *shape,
                         int init, int decay)
{
    if (tb->status != NSA_OK)
        return NSA_NONE;
    nsa_model *m = tb->m;
    if (m->num_tensors == tb->cap) {
        size_t cap = tb->cap ? 2 * tb->cap : 64;
        nsa_tensor_info *t = realloc(m->tensors, cap * sizeof *t);
        int *ini = t ? realloc(m->tensor_init, cap * sizeof *ini) : NULL;
        if (t)
            m->tensors = t;
        if (!t || !ini) {
            tb->status = nsa__error(NSA_ERR_NOMEM, "out of memory building the tensor table");
            return NSA_NONE;
        }
        m->tensor_init = ini;
        tb->cap = cap;
    }
    nsa_tensor_info *t = &m->tensors[m->num_tensors];
    memset(t, 0, sizeof *t);
    char *copy = malloc(strlen(name) + 1);
    if (!copy) {
        tb->status = nsa__error(NSA_ERR_NOMEM, "out of memory building the tensor table");
        return NSA_NONE;
    }
    strcpy(copy, name);
    t->name = copy;
    t->ndim = ndim;
    t->numel = 1;
    for (int i = 0; i < ndim; i++) {
        t->shape[i] = shape[i];
        t->numel *= (size_t)shape[i];
    }
    // Each tensor starts on a 16-float boundary (64 bytes) for aligned vector loads.
    tb->offset = (tb->offset + 15) & ~(size_t)15;
    t->offset = tb->offset;
    t->decay = decay;
    m->tensor_init[m->num_tensors] = init;
    tb->offset += t->numel;
    m->num_tensors++;
    return t->offset;
}

static size_t add1(table_builder *tb, const char *name, int64_t n0, int init)
{
    int64_t s[1] = {n0};
    return add_tensor(tb, name, 1, s, init, 0);
}

static size_t add2(table_builder *tb, const char *name, int64_t n0, int64_t n1, int init)
{
    int64_t s[2] = {n0, n1};
    return add_tensor(tb, name, 2, s, init, init == INIT_GLOROT || init == INIT_NORMAL);
}

static void add_linear(table_builder *tb, const char *prefix, int64_t out, int64_t in, size_t *w,
                       size_t *b)
{
    char name[160];
    snprintf(name, sizeof name, "%s.weight", prefix);
    *w = add2(tb, name, out, in, INIT_GLOROT);
    snprintf(name, sizeof name, "%s.bias", prefix);
    *b = add1(tb, name, out, INIT_ZERO);
}

static void add_norm(table_builder *tb, const char *prefix, int64_t D, size_t *w, size_t *b)
{
    char name[160];
    snprintf(name, sizeof name, "%s.weight", prefix);
    *w = add1(tb, name, D, INIT_ONE);
    snprintf(name, sizeof name, "%s.bias", prefix);
    *b = add1(tb, name, D, INIT_ZERO);
}

static void add_compress(table_builder *tb, const nsa_model *m, int layer, const char *which,
                         size_t *conv_w, size_t *pos, size_t *fc1_w, size_t *fc1_b, size_t *fc2_w,
                         size_t *fc2_b)
{
    char name[160];
    int64_t G = m->G, l = m->l, d = m->cfg.head_dim;
    *conv_w = *pos = *fc1_w = *fc1_b = *fc2_w = *fc2_b = NSA_NONE;
    if (m->cfg.compress == NSA_COMPRESS_CONV) {
        snprintf(name, sizeof name, "layers.%d.attn.compress_%s.weight", layer, which);
        int64_t s[3] = {G, l, d};
        *conv_w = add_tensor(tb, name, 3, s, INIT_INV_L, 0);
    } else if (m->cfg.compress == NSA_COMPRESS_MLP) {
        snprintf(name, sizeof name, "layers.%d.attn.compress_%s.pos", layer, which);
        *pos = add2(tb, name, l, d, INIT_ZERO);
        snprintf(name, sizeof name, "layers.%d.attn.compress_%s.fc1", layer, which);
        add_linear(tb, name, d, l * d, fc1_w, fc1_b);
        snprintf(name, sizeof name, "layers.%d.attn.compress_%s.fc2", layer, which);
        add_linear(tb, name, d, d, fc2_w, fc2_b);
    }
}

static nsa_status build_table(nsa_model *m)
{
    const nsa_config *c = &m->cfg;
    int64_t E = c->embed_dim, D = c->hidden_size, H = c->num_heads, d = c->head_dim;
    int64_t G = m->G, V = c->vocab_size;
    table_builder tb = {m, 0, 0, NSA_OK};
    char name[160];
    m->embed = m->in_proj_w = m->in_proj_b = m->lm_w = m->lm_b = NSA_NONE;
    if (V > 0)
        m->embed = add2(&tb, "embed.weight", V, E, INIT_NORMAL);
    if (E != D)
        add_linear(&tb, "in_proj", D, E, &m->in_proj_w, &m->in_proj_b);
    for (int i = 0; i < c->num_layers; i++) {
        layer_offsets *L = &m->layers[i];
        snprintf(name, sizeof name, "layers.%d.attn_norm", i);
        add_norm(&tb, name, D, &L->attn_norm_w, &L->attn_norm_b);
        snprintf(name, sizeof name, "layers.%d.attn.q_proj", i);
        add_linear(&tb, name, H * d, D, &L->q_w, &L->q_b);
        snprintf(name, sizeof name, "layers.%d.attn.k_proj", i);
        add_linear(&tb, name, G * d, D, &L->k_w, &L->k_b);
        snprintf(name, sizeof name, "layers.%d.attn.v_proj", i);
        add_linear(&tb, name, G * d, D, &L->v_w, &L->v_b);
        snprintf(name, sizeof name, "layers.%d.attn.o_proj", i);
        add_linear(&tb, name, D, H * d, &L->o_w, &L->o_b);
        L->gate = L->gate_w = L->gate_b = NSA_NONE;
        if (c->gate == NSA_GATE_STATIC) {
            snprintf(name, sizeof name, "layers.%d.attn.gate", i);
            L->gate = add1(&tb, name, 3, INIT_ZERO);
        } else {
            snprintf(name, sizeof name, "layers.%d.attn.gate_proj", i);
            add_linear(&tb, name, 3 * H, D, &L->gate_w, &L->gate_b);
        }
        add_compress(&tb, m, i, "k", &L->ck_w, &L->ck_pos, &L->ck_fc1_w, &L->ck_fc1_b,
                     &L->ck_fc2_w, &L->ck_fc2_b);
        add_compress(&tb, m, i, "v", &L->cv_w, &L->cv_pos, &L->cv_fc1_w, &L->cv_fc1_b,
                     &L->cv_fc2_w, &L->cv_fc2_b);
        snprintf(name, sizeof name, "layers.%d.ffn_norm", i);
        add_norm(&tb, name, D, &L->ffn_norm_w, &L->ffn_norm_b);
        snprintf(name, sizeof name, "layers.%d.ffn.up", i);
        add_linear(&tb, name, 4 * D, D, &L->up_w, &L->up_b);
        snprintf(name, sizeof name, "layers.%d.ffn.down", i);
        add_linear(&tb, name, D, 4 * D, &L->down_w, &L->down_b);
    }
    add_norm(&tb, "final_norm", D, &m->final_w, &m->final_b);
    if (V > 0)
        add_linear(&tb, "lm_head", V, D, &m->lm_w, &m->lm_b);
    m->buffer_size = (tb.offset + 15) & ~(size_t)15;
    return tb.status;
}

// ---------------------------------------------------------------------------------------
// Create / free

nsa_status nsa_model_create(nsa_model **out, nsa_context *ctx, const nsa_config *cfg)
{
    if (!out)
        return nsa__error(NSA_ERR_INVALID, "nsa_model_create: out is NULL");
    *out = NULL;
    if (!ctx)
        return nsa__error(NSA_ERR_INVALID, "nsa_model_create: context is NULL");
    NSA_TRY(nsa_config_validate(cfg));
    nsa_model *m = nsa__calloc(1, sizeof *m, "model");
    if (!m)
        return NSA_ERR_NOMEM;
    m->ctx = ctx;
    m->cfg = *cfg;
    m->G = nsa_config_kv_heads(cfg);
    m->l = nsa_config_compression_block(cfg);
    m->cfg.num_kv_heads = m->G;
    m->cfg.compression_block = m->l;
    m->layers = nsa__calloc((size_t)cfg->num_layers, sizeof *m->layers, "layer table");
    nsa_status st = m->layers ? build_table(m) : NSA_ERR_NOMEM;
    if (st == NSA_OK)
        st = ctx->ops->alloc(ctx, (void **)&m->params, m->buffer_size * sizeof(float));
    if (st == NSA_OK)
        st = ctx->ops->alloc(ctx, (void **)&m->grads, m->buffer_size * sizeof(float));
    if (st == NSA_OK)
        st = ctx->ops->zero(ctx, m->params, m->buffer_size * sizeof(float));
    if (st == NSA_OK)
        st = ctx->ops->zero(ctx, m->grads, m->buffer_size * sizeof(float));
    if (st != NSA_OK) {
        nsa_model_free(m);
        return st;
    }
    *out = m;
    return NSA_OK;
}

void nsa_model_free(nsa_model *m)
{
    if (!m)
        return;
    nsa__model_release_acts(m);
    nsa_model_set_gate_override(m, NULL);
    if (m->params)
        m->ctx->ops->free(m->ctx, m->params);
    if (m->grads)
        m->ctx->ops->free(m->ctx, m->grads);
    for (size_t i = 0; i < m->num_tensors; i++)
        free((char *)m->tensors[i].name);
    free(m->tensors);
    free(m->tensor_init);
    free(m->layers);
    free(m);
}

const nsa_config *nsa_model_config(const nsa_model *m)
{
    return &m->cfg;
}

size_t nsa_model_num_tensors(const nsa_model *m)
{
    return m->num_tensors;
}

nsa_status nsa_model_tensor(const nsa_model *m, size_t i, nsa_tensor_info *out)
{
    if (!m || !out || i >= m->num_tensors)
        return nsa__error(NSA_ERR_INVALID, "nsa_model_tensor: index %zu out of range (%zu tensors)",
                          i, m ? m->num_tensors : 0);
    *out = m->tensors[i];
    return NSA_OK;
}

int64_t nsa_model_find_tensor(const nsa_model *m, const char *name)
{
    for (size_t i = 0; i < m->num_tensors; i++)
        if (strcmp(m->tensors[i].name, name) == 0)
            return (int64_t)i;
    return -1;
}

size_t nsa_model_buffer_size(const nsa_model *m)
{
    return m->buffer_size;
}

nsa_status nsa_model_get_params(const nsa_model *m, float *dst)
{
    return m->ctx->ops->download(m->ctx, dst, m->params, m->buffer_size * sizeof(float));
}

nsa_status nsa_model_set_params(nsa_model *m, const float *src)
{
    if (nsa__has_nonfinite(src, m->buffer_size))
        return nsa__error(NSA_ERR_NUMERIC, "nsa_model_set_params: NaN or Inf in the parameters");
    m->act_valid = 0;
    return m->ctx->ops->upload(m->ctx, m->params, src, m->buffer_size * sizeof(float));
}

nsa_status nsa_model_get_grads(const nsa_model *m, float *dst)
{
    return m->ctx->ops->download(m->ctx, dst, m->grads, m->buffer_size * sizeof(float));
}

nsa_status nsa_model_zero_grads(nsa_model *m)
{
    return m->ctx->ops->zero(m->ctx, m->grads, m->buffer_size * sizeof(float));
}

void nsa_model_set_rng(nsa_model *m, uint64_t seed, uint64_t counter)
{
    m->rng_seed = seed;
    m->rng_counter = counter;
}

void nsa_model_get_rng(const nsa_model *m, uint64_t *seed, uint64_t *counter)
{
    if (seed)
        *seed = m->rng_seed;
    if (counter)
        *counter = m->rng_counter;
}

// ---------------------------------------------------------------------------------------
// Initialisation

// splitmix64 stream for initialisation (independent of the dropout hash).
typedef struct init_rng {
    uint64_t state;
} init_rng;

static uint64_t init_next(init_rng *r)
{
    uint64_t z = (r->state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double init_uniform(init_rng *r) // [0, 1)
{
    return (double)(init_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

nsa_status nsa_model_init(nsa_model *m, uint64_t seed)
{
    if (!m)
        return nsa__error(NSA_ERR_INVALID, "nsa_model_init: model is NULL");
    float *host = nsa__malloc(m->buffer_size * sizeof(float), "parameter initialisation");
    if (!host)
        return NSA_ERR_NOMEM;
    memset(host, 0, m->buffer_size * sizeof(float));
    for (size_t i = 0; i < m->num_tensors; i++) {
        const nsa_tensor_info *t = &m->tensors[i];
        // One stream per tensor: a tensor's values do not depend on which others exist.
        init_rng r = {seed * 0xD1B54A32D192ED03ull + (uint64_t)i * 0x9E3779B97F4A7C15ull + 1};
        float *p = host + t->offset;
        switch (m->tensor_init[i]) {
        case INIT_ZERO:
            break;
        case INIT_ONE:
            for (size_t j = 0; j < t->numel; j++)
                p[j] = 1.0f;
            break;
        case INIT_INV_L:
            for (size_t j = 0; j < t->numel; j++)
                p[j] = 1.0f / (float)m->l;
            break;
        case INIT_GLOROT: {
            double limit = sqrt(6.0 / (double)(t->shape[0] + t->shape[1]));
            for (size_t j = 0; j < t->numel; j++)
                p[j] = (float)((2.0 * init_uniform(&r) - 1.0) * limit);
            break;
        }
        case INIT_NORMAL:
            for (size_t j = 0; j < t->numel; j++) {
                double u1 = init_uniform(&r), u2 = init_uniform(&r);
                p[j] = (float)(sqrt(-2.0 * log(1.0 - u1)) * cos(2.0 * M_PI * u2));
            }
            break;
        }
    }
    nsa_status st = m->ctx->ops->upload(m->ctx, m->params, host, m->buffer_size * sizeof(float));
    free(host);
    m->act_valid = 0;
    return st;
}

// ---------------------------------------------------------------------------------------
// Checkpoints

nsa_status nsa_model_save(const nsa_model *m, const char *path)
{
    if (!m || !path)
        return nsa__error(NSA_ERR_INVALID, "nsa_model_save: NULL argument");
    int num_opts = nsa_config_num_options();
    float *host = nsa__malloc(m->buffer_size * sizeof(float), "checkpoint");
    nsa__st_out_tensor *out = nsa__calloc(m->num_tensors, sizeof *out, "checkpoint table");
    const char **keys = nsa__calloc((size_t)num_opts + 2, sizeof *keys, "checkpoint metadata");
    const char **values = nsa__calloc((size_t)num_opts + 2, sizeof *values, "checkpoint metadata");
    char(*value_buf)[64] = nsa__calloc((size_t)num_opts, 64, "checkpoint metadata");
    nsa_status st = host && out && keys && values && value_buf ? NSA_OK : NSA_ERR_NOMEM;
    if (st == NSA_OK)
        st = nsa_model_get_params(m, host);
    int num_meta = 0;
    for (int i = 0; st == NSA_OK && i < num_opts; i++) {
        keys[num_meta] = nsa_config_option_name(i);
        st = nsa_config_get(&m->cfg, keys[num_meta], value_buf[i], 64);
        values[num_meta++] = value_buf[i];
    }
    if (st == NSA_OK) {
        keys[num_meta] = "format";
        values[num_meta++] = "nsa";
        for (size_t i = 0; i < m->num_tensors; i++) {
            out[i].name = m->tensors[i].name;
            out[i].ndim = m->tensors[i].ndim;
            out[i].shape = m->tensors[i].shape;
            out[i].data = host + m->tensors[i].offset;
        }
        st = nsa__st_write(path, out, (int)m->num_tensors, keys, values, num_meta);
    }
    free(host);
    free(out);
    free(keys);
    free(values);
    free(value_buf);
    return st;
}

// Reads the config of a checkpoint from its metadata.
static nsa_status config_from_file(nsa__st_file *f, const char *path, nsa_config *cfg)
{
    nsa_config_default(cfg);
    int have_embed = 0;
    for (int i = 0; i < nsa_config_num_options(); i++) {
        const char *name = nsa_config_option_name(i);
        const char *value = nsa__st_meta(f, name);
        if (!value)
            continue;
        if (strcmp(name, "embed_dim") == 0)
            have_embed = 1;
        if (nsa_config_set(cfg, name, value) != NSA_OK)
            return nsa__error(NSA_ERR_FORMAT, "%s: metadata: %s", path, nsa_last_error());
    }
    if (!have_embed)
        return nsa__error(NSA_ERR_FORMAT,
                          "%s: metadata has no embed_dim: not an nsa checkpoint (SPEC §7)", path);
    if (nsa_config_validate(cfg) != NSA_OK)
        return nsa__error(NSA_ERR_FORMAT, "%s: invalid config in metadata: %s", path,
                          nsa_last_error());
    return NSA_OK;
}

nsa_status nsa_model_load(nsa_model **out, nsa_context *ctx, const char *path)
{
    if (!out || !ctx || !path)
        return nsa__error(NSA_ERR_INVALID, "nsa_model_load: NULL argument");
    *out = NULL;
    nsa__st_file *f = NULL;
    NSA_TRY(nsa__st_open(&f, path));
    nsa_config cfg;
    nsa_model *m = NULL;
    float *host = NULL;
    nsa_status st = config_from_file(f, path, &cfg);
    if (st == NSA_OK)
        st = nsa_model_create(&m, ctx, &cfg);
    if (st == NSA_OK) {
        host = nsa__calloc(m->buffer_size, sizeof(float), "checkpoint");
        if (!host)
            st = NSA_ERR_NOMEM;
    }
    // Every tensor of the config must be there with its shape; nothing else may be.
    for (size_t i = 0; st == NSA_OK && i < m->num_tensors; i++) {
        const nsa_tensor_info *t = &m->tensors[i];
        if (!nsa__st_find(f, t->name))
            st = nsa__error(NSA_ERR_FORMAT, "%s: tensor '%s' is missing", path, t->name);
        else
            st = nsa__st_read_f32(f, t->name, t->ndim, t->shape, host + t->offset);
        if (st == NSA_OK && nsa__has_nonfinite(host + t->offset, t->numel))
            st = nsa__error(NSA_ERR_FORMAT, "%s: tensor '%s' contains NaN or Inf", path, t->name);
    }
    for (int i = 0; st == NSA_OK && i < nsa__st_num_tensors(f); i++) {
        const nsa__st_tensor *t = nsa__st_tensor_at(f, i);
        if (nsa_model_find_tensor(m, t->name) < 0)
            st = nsa__error(NSA_ERR_FORMAT, "%s: unexpected tensor '%s' for this config", path,
                            t->name);
    }
    if (st == NSA_OK)
        st = ctx->ops->upload(ctx, m->params, host, m->buffer_size * sizeof(float));
    free(host);
    nsa__st_close(f);
    if (st != NSA_OK) {
        nsa_model_free(m);
        return st;
    }
    *out = m;
    return NSA_OK;
}
