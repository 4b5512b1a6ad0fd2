/*
 * attn_case.h — an attention shape of the tests (CPU gradient checks and the CUDA device
 * tests share it) and its nsa_attention_desc.
 */
#ifndef NSA_TEST_ATTN_CASE_H
#define NSA_TEST_ATTN_CASE_H

#include "nsa.h"

#include <string.h>

typedef struct attn_case {
    const char *name;
    int B, T, H, G, d, b, w, r, l, n;
    nsa_select_score score;
    nsa_select_fixed fixed;
    int given; // random block_indices replace the scoring
} attn_case;

static inline nsa_attention_desc attn_case_desc(const attn_case *c)
{
    nsa_attention_desc desc;
    memset(&desc, 0, sizeof desc);
    desc.batch = c->B;
    desc.seq_len = c->T;
    desc.num_heads = c->H;
    desc.num_kv_heads = c->G;
    desc.head_dim = c->d;
    desc.block_size = c->b;
    desc.window_size = c->w;
    desc.compression_ratio = c->r;
    desc.compression_block = c->l;
    desc.num_selected_blocks = c->n;
    desc.select_score = c->score;
    desc.select_fixed = c->fixed;
    return desc;
}

#endif // NSA_TEST_ATTN_CASE_H
