/*
 * attention.c — the attention op alone (SPEC §6), for callers who bring their own q, k, v
 * and gates: validation, mean compression of k and v, and the backend's three paths.
 */
#include "backend.h"
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void nsa__attn_dims_init(nsa__attn_dims *dm, const nsa_attention_desc *desc)
{
    memset(dm, 0, sizeof *dm);
    dm->B = desc->batch;
    dm->T = desc->seq_len;
    dm->H = desc->num_heads;
    dm->G = desc->num_kv_heads;
    dm->d = desc->head_dim;
    dm->block_size = desc->block_size;
    dm->window = desc->window_size;
    dm->cmp_stride = desc->compression_ratio;
    dm->cmp_len = desc->compression_block;
    dm->num_selected = desc->num_selected_blocks;
    dm->num_cmp = dm->T >= dm->cmp_len ? (dm->T - dm->cmp_len) / dm->cmp_stride + 1 : 0;
    dm->num_blocks = (dm->T + dm->block_size - 1) / dm->block_size;
    dm->select_score = desc->select_score;
    dm->select_fixed = desc->select_fixed;
    dm->scale = desc->scale > 0.0f ? desc->scale : 1.0f / sqrtf((float)desc->head_dim);
}

void nsa_attention_desc_from_config(nsa_attention_desc *desc, const nsa_config *cfg)
{
    memset(desc, 0, sizeof *desc);
    desc->num_heads = cfg->num_heads;
    desc->num_kv_heads = nsa_config_kv_heads(cfg);
    desc->head_dim = cfg->head_dim;
    desc->block_size = cfg->block_size;
    desc->window_size = cfg->window_size;
    desc->compression_ratio = cfg->compression_ratio;
    desc->compression_block = nsa_config_compression_block(cfg);
    desc->num_selected_blocks = cfg->num_selected_blocks;
    desc->select_score = cfg->select_score;
    desc->select_fixed = cfg->select_fixed;
    desc->scale = 0.0f;
}

static nsa_status positive(const char *name, int value)
{
    if (value < 1)
        return nsa__error(NSA_ERR_INVALID, "attention: %s = %d: must be >= 1", name, value);
    return NSA_OK;
}

nsa_status nsa__attn_desc_validate(const nsa_attention_desc *desc)
{
    if (!desc)
        return nsa__error(NSA_ERR_INVALID, "attention: desc is NULL");
    NSA_TRY(positive("batch", desc->batch));
    NSA_TRY(positive("seq_len", desc->seq_len));
    NSA_TRY(positive("num_heads", desc->num_heads));
    NSA_TRY(positive("num_kv_heads", desc->num_kv_heads));
    NSA_TRY(positive("head_dim", desc->head_dim));
    NSA_TRY(positive("block_size", desc->block_size));
    NSA_TRY(positive("window_size", desc->window_size));
    NSA_TRY(positive("compression_ratio", desc->compression_ratio));
    NSA_TRY(positive("compression_block", desc->compression_block));
    NSA_TRY(positive("num_selected_blocks", desc->num_selected_blocks));
    if (desc->num_heads % desc->num_kv_heads != 0)
        return nsa__error(NSA_ERR_INVALID, "attention: num_kv_heads = %d: must divide num_heads (%d)",
                          desc->num_kv_heads, desc->num_heads);
    if (desc->compression_block % desc->compression_ratio != 0)
        return nsa__error(NSA_ERR_INVALID,
                          "attention: compression_block = %d: must be a multiple of "
                          "compression_ratio (%d)",
                          desc->compression_block, desc->compression_ratio);
    if ((unsigned)desc->select_score > NSA_SELECT_CMP_ATTN)
        return nsa__error(NSA_ERR_INVALID, "attention: select_score = %d: must be mean_key or cmp_attn",
                          (int)desc->select_score);
    if ((unsigned)desc->select_fixed > NSA_SELECT_FIXED_PAPER)
        return nsa__error(NSA_ERR_INVALID, "attention: select_fixed = %d: must be none or paper",
                          (int)desc->select_fixed);
    if (desc->select_score == NSA_SELECT_CMP_ATTN && desc->block_size % desc->compression_ratio)
        return nsa__error(NSA_ERR_INVALID,
                          "attention: select_score = cmp_attn: needs block_size (%d) to be a "
                          "multiple of compression_ratio (%d)",
                          desc->block_size, desc->compression_ratio);
    if (desc->select_fixed == NSA_SELECT_FIXED_PAPER && desc->num_selected_blocks < 3)
        return nsa__error(NSA_ERR_INVALID,
                          "attention: select_fixed = paper: needs num_selected_blocks >= 3 (got %d)",
                          desc->num_selected_blocks);
    if (!(desc->scale >= 0.0f) || !isfinite(desc->scale))
        return nsa__error(NSA_ERR_INVALID, "attention: scale = %g: must be >= 0 (0 = 1/sqrt(d))",
                          (double)desc->scale);
    double elems = (double)desc->batch * desc->seq_len * desc->num_heads * desc->head_dim;
    if (elems > 1e12)
        return nsa__error(NSA_ERR_INVALID, "attention: B*T*H*d = %.3g elements is too large", elems);
    return NSA_OK;
}

nsa_status nsa__check_block_indices(const nsa__attn_dims *dm, const int32_t *idx)
{
    size_t rows = (size_t)dm->B * dm->T * dm->G;
    for (size_t r = 0; r < rows; r++) {
        int t = (int)((r / dm->G) % dm->T);
        const int32_t *sel = idx + r * dm->num_selected;
        for (int i = 0; i < dm->num_selected; i++) {
            int32_t blk = sel[i];
            if (blk == -1)
                continue;
            if (blk < 0 || (int64_t)blk * dm->block_size > t)
                return nsa__error(NSA_ERR_INVALID,
                                  "block_indices[b=%zu,t=%d,g=%zu,%d] = %d: must be -1 or a block "
                                  "i with 0 <= i*block_size <= t",
                                  r / ((size_t)dm->T * dm->G), t, r % dm->G, i, (int)blk);
            for (int j = 0; j < i; j++)
                if (sel[j] == blk)
                    return nsa__error(NSA_ERR_INVALID,
                                      "block_indices[b=%zu,t=%d,g=%zu]: block %d appears twice",
                                      r / ((size_t)dm->T * dm->G), t, r % dm->G, (int)blk);
        }
    }
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// Device staging: on the CPU the caller's host arrays are used in place.

typedef struct staged {
    void *dev;
    int owned;
} staged;

static nsa_status stage_in(nsa_context *ctx, staged *s, const void *host, size_t bytes)
{
    s->owned = 0;
    if (ctx->device == NSA_DEVICE_CPU) {
        s->dev = (void *)host;
        return NSA_OK;
    }
    NSA_TRY(ctx->ops->alloc(ctx, &s->dev, bytes));
    s->owned = 1;
    if (host)
        return ctx->ops->upload(ctx, s->dev, host, bytes);
    return NSA_OK;
}

// An output: the caller's array on the CPU, fresh device memory (nothing uploaded) else.
static nsa_status stage_out(nsa_context *ctx, staged *s, void *host, size_t bytes)
{
    s->owned = 0;
    if (ctx->device == NSA_DEVICE_CPU) {
        s->dev = host;
        return NSA_OK;
    }
    s->owned = 1;
    return ctx->ops->alloc(ctx, &s->dev, bytes);
}

static void stage_free(nsa_context *ctx, staged *s)
{
    if (s->owned)
        ctx->ops->free(ctx, s->dev);
    s->dev = NULL;
    s->owned = 0;
}

static nsa_status check_inputs(nsa_context *ctx, const nsa_attention_desc *desc, const float *q,
                               const float *k, const float *v, const float *gates,
                               const int32_t *block_indices, nsa__attn_dims *dm)
{
    if (!ctx)
        return nsa__error(NSA_ERR_INVALID, "attention: context is NULL");
    NSA_TRY(nsa__attn_desc_validate(desc));
    if (!q || !k || !v || !gates)
        return nsa__error(NSA_ERR_INVALID, "attention: q, k, v and gates must not be NULL");
    nsa__attn_dims_init(dm, desc);
    size_t nq = (size_t)dm->B * dm->T * dm->H * dm->d, nkv = (size_t)dm->B * dm->T * dm->G * dm->d;
    if (nsa__has_nonfinite(q, nq))
        return nsa__error(NSA_ERR_NUMERIC, "attention: q contains NaN or Inf");
    if (nsa__has_nonfinite(k, nkv))
        return nsa__error(NSA_ERR_NUMERIC, "attention: k contains NaN or Inf");
    if (nsa__has_nonfinite(v, nkv))
        return nsa__error(NSA_ERR_NUMERIC, "attention: v contains NaN or Inf");
    size_t ng = (size_t)dm->B * dm->T * dm->H * 3;
    for (size_t i = 0; i < ng; i++)
        if (!(gates[i] >= 0.0f && gates[i] <= 1.0f))
            return nsa__error(NSA_ERR_NUMERIC, "attention: gates[%zu] = %g: must be in [0, 1]", i,
                              (double)gates[i]);
    if (block_indices)
        NSA_TRY(nsa__check_block_indices(dm, block_indices));
    return NSA_OK;
}

// The staged buffers of one op call.
typedef struct op_buffers {
    staged q, k, v, gates, given, idx, out, kc, vc, o_paths, lse;
} op_buffers;

static void op_buffers_free(nsa_context *ctx, op_buffers *b)
{
    staged *all[] = {&b->q, &b->k, &b->v, &b->gates, &b->given, &b->idx, &b->out,
                     &b->kc, &b->vc, &b->o_paths, &b->lse};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        stage_free(ctx, all[i]);
}

static nsa_status device_alloc(nsa_context *ctx, staged *s, size_t bytes)
{
    s->owned = 1;
    return ctx->ops->alloc(ctx, &s->dev, bytes);
}

// Stages inputs, compresses k and v (mean) and runs the forward; with `save`, keeps the
// paths and log-sum-exps for a backward.
static nsa_status op_forward(nsa_context *ctx, const nsa__attn_dims *dm, const float *q,
                             const float *k, const float *v, const float *gates,
                             const int32_t *block_indices, int save, op_buffers *b)
{
    const nsa__backend_ops *ops = ctx->ops;
    size_t nq = (size_t)dm->B * dm->T * dm->H * dm->d, nkv = (size_t)dm->B * dm->T * dm->G * dm->d;
    size_t nkvc = (size_t)dm->B * dm->num_cmp * dm->G * dm->d;
    size_t nidx = (size_t)dm->B * dm->T * dm->G * dm->num_selected;
    NSA_TRY(stage_in(ctx, &b->q, q, nq * sizeof(float)));
    NSA_TRY(stage_in(ctx, &b->k, k, nkv * sizeof(float)));
    NSA_TRY(stage_in(ctx, &b->v, v, nkv * sizeof(float)));
    NSA_TRY(stage_in(ctx, &b->gates, gates, nq / dm->d * 3 * sizeof(float)));
    if (block_indices)
        NSA_TRY(stage_in(ctx, &b->given, block_indices, nidx * sizeof(int32_t)));
    NSA_TRY(device_alloc(ctx, &b->idx, nidx * sizeof(int32_t)));
    NSA_TRY(device_alloc(ctx, &b->out, nq * sizeof(float)));
    NSA_TRY(device_alloc(ctx, &b->kc, nkvc * sizeof(float)));
    NSA_TRY(device_alloc(ctx, &b->vc, nkvc * sizeof(float)));
    if (save) {
        NSA_TRY(device_alloc(ctx, &b->o_paths, 3 * nq * sizeof(float)));
        NSA_TRY(device_alloc(ctx, &b->lse, nq / dm->d * 3 * sizeof(float)));
    }
    NSA_TRY(ops->compress_forward(ctx, b->kc.dev, b->k.dev, NULL, dm->B, dm->T, dm->G, dm->d,
                                  dm->cmp_len, dm->cmp_stride));
    NSA_TRY(ops->compress_forward(ctx, b->vc.dev, b->v.dev, NULL, dm->B, dm->T, dm->G, dm->d,
                                  dm->cmp_len, dm->cmp_stride));
    return ops->attn_forward(ctx, dm, b->q.dev, b->k.dev, b->v.dev, b->kc.dev, b->vc.dev,
                             b->gates.dev, block_indices ? b->given.dev : NULL, b->idx.dev,
                             b->out.dev, save ? b->o_paths.dev : NULL, save ? b->lse.dev : NULL);
}

nsa_status nsa_attention_forward(nsa_context *ctx, const nsa_attention_desc *desc, const float *q,
                                 const float *k, const float *v, const float *gates,
                                 const int32_t *block_indices, float *out, int32_t *indices_out)
{
    nsa__attn_dims dm;
    NSA_TRY(check_inputs(ctx, desc, q, k, v, gates, block_indices, &dm));
    if (!out)
        return nsa__error(NSA_ERR_INVALID, "attention: out must not be NULL");
    op_buffers b;
    memset(&b, 0, sizeof b);
    nsa_status st = op_forward(ctx, &dm, q, k, v, gates, block_indices, 0, &b);
    size_t nq = (size_t)dm.B * dm.T * dm.H * dm.d;
    size_t nidx = (size_t)dm.B * dm.T * dm.G * dm.num_selected;
    if (st == NSA_OK)
        st = ctx->ops->download(ctx, out, b.out.dev, nq * sizeof(float));
    if (st == NSA_OK && indices_out)
        st = ctx->ops->download(ctx, indices_out, b.idx.dev, nidx * sizeof(int32_t));
    op_buffers_free(ctx, &b);
    return st;
}

nsa_status nsa_attention_backward(nsa_context *ctx, const nsa_attention_desc *desc,
                                  const float *q, const float *k, const float *v,
                                  const float *gates, const int32_t *block_indices,
                                  const float *dout, float *dq, float *dk, float *dv,
                                  float *dgates)
{
    nsa__attn_dims dm;
    NSA_TRY(check_inputs(ctx, desc, q, k, v, gates, block_indices, &dm));
    if (!dout || !dq || !dk || !dv || !dgates)
        return nsa__error(NSA_ERR_INVALID, "attention backward: dout, dq, dk, dv and dgates must "
                                           "not be NULL");
    size_t nq = (size_t)dm.B * dm.T * dm.H * dm.d, nkv = (size_t)dm.B * dm.T * dm.G * dm.d;
    size_t nkvc = (size_t)dm.B * dm.num_cmp * dm.G * dm.d;
    if (nsa__has_nonfinite(dout, nq))
        return nsa__error(NSA_ERR_NUMERIC, "attention backward: dout contains NaN or Inf");
    const nsa__backend_ops *ops = ctx->ops;
    op_buffers b;
    memset(&b, 0, sizeof b);
    staged g_dout = {0}, g_dq = {0}, g_dk = {0}, g_dv = {0}, g_dkc = {0}, g_dvc = {0}, g_dg = {0};
    nsa_status st = op_forward(ctx, &dm, q, k, v, gates, block_indices, 1, &b);
    if (st == NSA_OK)
        st = stage_in(ctx, &g_dout, dout, nq * sizeof(float));
    if (st == NSA_OK)
        st = stage_out(ctx, &g_dq, dq, nq * sizeof(float));
    if (st == NSA_OK)
        st = stage_out(ctx, &g_dk, dk, nkv * sizeof(float));
    if (st == NSA_OK)
        st = stage_out(ctx, &g_dv, dv, nkv * sizeof(float));
    if (st == NSA_OK)
        st = stage_out(ctx, &g_dg, dgates, nq / dm.d * 3 * sizeof(float));
    if (st == NSA_OK)
        st = device_alloc(ctx, &g_dkc, nkvc * sizeof(float));
    if (st == NSA_OK)
        st = device_alloc(ctx, &g_dvc, nkvc * sizeof(float));
    if (st == NSA_OK)
        st = ops->attn_backward(ctx, &dm, b.q.dev, b.k.dev, b.v.dev, b.kc.dev, b.vc.dev,
                                b.gates.dev, b.idx.dev, b.o_paths.dev, b.lse.dev, g_dout.dev,
                                g_dq.dev, g_dk.dev, g_dv.dev, g_dkc.dev, g_dvc.dev, g_dg.dev);
    // The compressed keys and values are means of k and v: route their gradients back.
    if (st == NSA_OK)
        st = ops->compress_backward(ctx, g_dk.dev, NULL, g_dkc.dev, b.k.dev, NULL, dm.B, dm.T,
                                    dm.G, dm.d, dm.cmp_len, dm.cmp_stride);
    if (st == NSA_OK)
        st = ops->compress_backward(ctx, g_dv.dev, NULL, g_dvc.dev, b.v.dev, NULL, dm.B, dm.T,
                                    dm.G, dm.d, dm.cmp_len, dm.cmp_stride);
    if (st == NSA_OK && g_dq.owned)
        st = ops->download(ctx, dq, g_dq.dev, nq * sizeof(float));
    if (st == NSA_OK && g_dk.owned)
        st = ops->download(ctx, dk, g_dk.dev, nkv * sizeof(float));
    if (st == NSA_OK && g_dv.owned)
        st = ops->download(ctx, dv, g_dv.dev, nkv * sizeof(float));
    if (st == NSA_OK && g_dg.owned)
        st = ops->download(ctx, dgates, g_dg.dev, nq / dm.d * 3 * sizeof(float));
    staged *grads[] = {&g_dout, &g_dq, &g_dk, &g_dv, &g_dkc, &g_dvc, &g_dg};
    for (size_t i = 0; i < sizeof grads / sizeof grads[0]; i++)
        stage_free(ctx, grads[i]);
    op_buffers_free(ctx, &b);
    return st;
}
