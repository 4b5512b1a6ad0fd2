/*
 * optim.c — AdamW over the model's contiguous parameter and gradient buffers: global-norm
 * clipping, warmup + cosine learning rate, weight decay on matrices only, and the
 * optimizer state as a safetensors file (for exact resumption).
 */
#include "model.h"
#include "safetensors.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct nsa_optimizer {
    nsa_model *model;
    nsa_optim_config cfg;
    int64_t step;
    float *m, *v;        // device [buffer_size]
    uint8_t *decay_mask; // device [buffer_size]
};

void nsa_optim_config_default(nsa_optim_config *cfg)
{
    cfg->lr = 3e-3;
    cfg->min_lr = 3e-4;
    cfg->warmup_steps = 100;
    cfg->total_steps = 1000;
    cfg->beta1 = 0.9;
    cfg->beta2 = 0.95;
    cfg->eps = 1e-8;
    cfg->weight_decay = 0.1;
    cfg->clip_norm = 1.0;
}

nsa_status nsa_optim_config_validate(const nsa_optim_config *c)
{
    if (!c)
        return nsa__error(NSA_ERR_INVALID, "optimizer config is NULL");
    if (!(c->lr > 0.0) || !isfinite(c->lr))
        return nsa__error(NSA_ERR_INVALID, "lr = %g: must be > 0", c->lr);
    if (!(c->min_lr >= 0.0 && c->min_lr <= c->lr))
        return nsa__error(NSA_ERR_INVALID, "min_lr = %g: must satisfy 0 <= min_lr <= lr (%g)",
                          c->min_lr, c->lr);
    if (c->warmup_steps < 0)
        return nsa__error(NSA_ERR_INVALID, "warmup_steps = %d: must be >= 0", c->warmup_steps);
    if (c->total_steps < 1)
        return nsa__error(NSA_ERR_INVALID, "total_steps = %d: must be >= 1", c->total_steps);
    if (!(c->beta1 >= 0.0 && c->beta1 < 1.0))
        return nsa__error(NSA_ERR_INVALID, "beta1 = %g: must satisfy 0 <= beta1 < 1", c->beta1);
    if (!(c->beta2 >= 0.0 && c->beta2 < 1.0))
        return nsa__error(NSA_ERR_INVALID, "beta2 = %g: must satisfy 0 <= beta2 < 1", c->beta2);
    if (!(c->eps > 0.0) || !isfinite(c->eps))
        return nsa__error(NSA_ERR_INVALID, "eps = %g: must be > 0", c->eps);
    if (!(c->weight_decay >= 0.0) || !isfinite(c->weight_decay))
        return nsa__error(NSA_ERR_INVALID, "weight_decay = %g: must be >= 0", c->weight_decay);
    if (!(c->clip_norm >= 0.0) || !isfinite(c->clip_norm))
        return nsa__error(NSA_ERR_INVALID, "clip_norm = %g: must be >= 0 (0 = off)", c->clip_norm);
    return NSA_OK;
}

double nsa_optim_lr(const nsa_optim_config *c, int64_t step)
{
    if (step < c->warmup_steps)
        return c->lr * (double)(step + 1) / (double)c->warmup_steps;
    int64_t decay_steps = c->total_steps - c->warmup_steps;
    double progress = decay_steps > 0 ? (double)(step - c->warmup_steps) / (double)decay_steps : 1.0;
    if (progress > 1.0)
        progress = 1.0;
    return c->min_lr + 0.5 * (c->lr - c->min_lr) * (1.0 + cos(M_PI * progress));
}

nsa_status nsa_optimizer_create(nsa_optimizer **out, nsa_model *model, const nsa_optim_config *cfg)
{
    if (!out || !model)
        return nsa__error(NSA_ERR_INVALID, "nsa_optimizer_create: NULL argument");
    *out = NULL;
    NSA_TRY(nsa_optim_config_validate(cfg));
    nsa_context *ctx = model->ctx;
    size_t n = model->buffer_size;
    nsa_optimizer *opt = nsa__calloc(1, sizeof *opt, "optimizer");
    uint8_t *mask = nsa__calloc(n, 1, "weight-decay mask");
    nsa_status st = opt && mask ? NSA_OK : NSA_ERR_NOMEM;
    if (st == NSA_OK) {
        opt->model = model;
        opt->cfg = *cfg;
        for (size_t i = 0; i < model->num_tensors; i++)
            if (model->tensors[i].decay)
                memset(mask + model->tensors[i].offset, 1, model->tensors[i].numel);
        st = ctx->ops->alloc(ctx, (void **)&opt->m, n * sizeof(float));
    }
    if (st == NSA_OK)
        st = ctx->ops->alloc(ctx, (void **)&opt->v, n * sizeof(float));
    if (st == NSA_OK)
        st = ctx->ops->alloc(ctx, (void **)&opt->decay_mask, n);
    if (st == NSA_OK)
        st = ctx->ops->zero(ctx, opt->m, n * sizeof(float));
    if (st == NSA_OK)
        st = ctx->ops->zero(ctx, opt->v, n * sizeof(float));
    if (st == NSA_OK)
        st = ctx->ops->upload(ctx, opt->decay_mask, mask, n);
    free(mask);
    if (st != NSA_OK) {
        nsa_optimizer_free(opt);
        return st;
    }
    *out = opt;
    return NSA_OK;
}

void nsa_optimizer_free(nsa_optimizer *opt)
{
    if (!opt)
        return;
    nsa_context *ctx = opt->model->ctx;
    if (opt->m)
        ctx->ops->free(ctx, opt->m);
    if (opt->v)
        ctx->ops->free(ctx, opt->v);
    if (opt->decay_mask)
        ctx->ops->free(ctx, opt->decay_mask);
    free(opt);
}

int64_t nsa_optimizer_num_steps(const nsa_optimizer *opt)
{
    return opt->step;
}

nsa_status nsa_optimizer_step(nsa_optimizer *opt, double *grad_norm, double *lr_used)
{
    if (!opt)
        return nsa__error(NSA_ERR_INVALID, "nsa_optimizer_step: optimizer is NULL");
    nsa_model *model = opt->model;
    nsa_context *ctx = model->ctx;
    const nsa_optim_config *c = &opt->cfg;
    double sq = 0.0;
    NSA_TRY(ctx->ops->sum_squares(ctx, model->grads, model->buffer_size, &sq));
    double norm = sqrt(sq);
    if (grad_norm)
        *grad_norm = norm;
    if (!isfinite(norm))
        return nsa__error(NSA_ERR_NUMERIC, "step %lld: the gradient contains NaN or Inf (norm %g); "
                                           "parameters left unchanged",
                          (long long)opt->step, norm);
    double scale = c->clip_norm > 0.0 && norm > c->clip_norm ? c->clip_norm / norm : 1.0;
    double lr = nsa_optim_lr(c, opt->step);
    if (lr_used)
        *lr_used = lr;
    double t = (double)(opt->step + 1);
    float c1 = (float)(1.0 - pow(c->beta1, t)), c2 = (float)(1.0 - pow(c->beta2, t));
    NSA_TRY(ctx->ops->adamw(ctx, model->params, model->grads, opt->m, opt->v, opt->decay_mask,
                            model->buffer_size, (float)lr, (float)c->beta1, (float)c->beta2,
                            (float)c->eps, (float)c->weight_decay, (float)scale, c1, c2));
    opt->step++;
    model->act_valid = 0;
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// State files

nsa_status nsa_optimizer_save(const nsa_optimizer *opt, const char *path, const char *const *keys,
                              const char *const *values, int num_meta)
{
    if (!opt || !path || num_meta < 0 || (num_meta > 0 && (!keys || !values)))
        return nsa__error(NSA_ERR_INVALID, "nsa_optimizer_save: bad arguments");
    nsa_context *ctx = opt->model->ctx;
    size_t n = opt->model->buffer_size;
    float *host = nsa__malloc(3 * n * sizeof(float), "optimizer state");
    const char **k = nsa__calloc((size_t)num_meta + 2, sizeof *k, "metadata");
    const char **v = nsa__calloc((size_t)num_meta + 2, sizeof *v, "metadata");
    nsa_status st = host && k && v ? NSA_OK : NSA_ERR_NOMEM;
    if (st == NSA_OK)
        st = ctx->ops->download(ctx, host, opt->m, n * sizeof(float));
    if (st == NSA_OK)
        st = ctx->ops->download(ctx, host + n, opt->v, n * sizeof(float));
    if (st == NSA_OK)
        st = nsa_model_get_params(opt->model, host + 2 * n);
    if (st == NSA_OK) {
        char step_buf[32];
        snprintf(step_buf, sizeof step_buf, "%lld", (long long)opt->step);
        k[0] = "optimizer_step";
        v[0] = step_buf;
        k[1] = "format";
        v[1] = "nsa-optimizer";
        for (int i = 0; i < num_meta; i++) {
            k[i + 2] = keys[i];
            v[i + 2] = values[i];
        }
        int64_t shape[1] = {(int64_t)n};
        nsa__st_out_tensor t[3] = {{"adam.m", 1, shape, host},
                                   {"adam.v", 1, shape, host + n},
                                   {"params", 1, shape, host + 2 * n}};
        st = nsa__st_write(path, t, 3, k, v, num_meta + 2);
    }
    free(host);
    free(k);
    free(v);
    return st;
}

nsa_status nsa_optimizer_load(nsa_optimizer *opt, const char *path)
{
    if (!opt || !path)
        return nsa__error(NSA_ERR_INVALID, "nsa_optimizer_load: NULL argument");
    nsa_context *ctx = opt->model->ctx;
    size_t n = opt->model->buffer_size;
    nsa__st_file *f = NULL;
    NSA_TRY(nsa__st_open(&f, path));
    float *host = nsa__malloc(3 * n * sizeof(float), "optimizer state");
    nsa_status st = host ? NSA_OK : NSA_ERR_NOMEM;
    const char *step = nsa__st_meta(f, "optimizer_step");
    char *end = NULL;
    long long step_value = step ? strtoll(step, &end, 10) : -1;
    if (st == NSA_OK && (!step || *end != '\0' || step_value < 0))
        st = nsa__error(NSA_ERR_FORMAT, "%s: no valid optimizer_step in the metadata", path);
    int64_t shape[1] = {(int64_t)n};
    if (st == NSA_OK)
        st = nsa__st_read_f32(f, "adam.m", 1, shape, host);
    if (st == NSA_OK)
        st = nsa__st_read_f32(f, "adam.v", 1, shape, host + n);
    if (st == NSA_OK)
        st = nsa__st_read_f32(f, "params", 1, shape, host + 2 * n);
    if (st == NSA_OK && nsa__has_nonfinite(host, 3 * n))
        st = nsa__error(NSA_ERR_FORMAT, "%s: optimizer state contains NaN or Inf", path);
    if (st == NSA_OK)
        st = nsa_model_set_params(opt->model, host + 2 * n);
    if (st == NSA_OK)
        st = ctx->ops->upload(ctx, opt->m, host, n * sizeof(float));
    if (st == NSA_OK)
        st = ctx->ops->upload(ctx, opt->v, host + n, n * sizeof(float));
    if (st == NSA_OK)
        opt->step = step_value;
    free(host);
    nsa__st_close(f);
    return st;
}

nsa_status nsa_optimizer_file_meta(const char *path, const char *key, char *buf, size_t buf_size)
{
    if (!path || !key || !buf || buf_size == 0)
        return nsa__error(NSA_ERR_INVALID, "nsa_optimizer_file_meta: bad arguments");
    nsa__st_file *f = NULL;
    NSA_TRY(nsa__st_open(&f, path));
    const char *value = nsa__st_meta(f, key);
    nsa_status st = NSA_OK;
    if (!value)
        st = nsa__error(NSA_ERR_FORMAT, "%s: metadata has no '%s'", path, key);
    else if (strlen(value) >= buf_size)
        st = nsa__error(NSA_ERR_INVALID, "%s: metadata '%s' longer than the buffer", path, key);
    else
        strcpy(buf, value);
    nsa__st_close(f);
    return st;
}
