/*
 * ref64.h — an independent float64 reference of shared/SPEC.md, for the tests only.
 *
 * Written plainly from the SPEC (O(T^2) loops, one position and head at a time) so that
 * it can be read against the math line by line. It shares nothing with the library but
 * the public types of nsa.h (nsa_config, nsa_attention_desc); parameters reach it by
 * their SPEC §7 names through a small table the tests fill.
 *
 * Every function returns 0 on success and -1 (with a message on stderr) when its
 * arguments break a rule — the reference is for valid inputs; tests check the library's
 * refusals themselves.
 */
#ifndef NSA_TEST_REF64_H
#define NSA_TEST_REF64_H

#include <stddef.h>
#include <stdint.h>

#include "nsa.h"

// ----------------------------------------------------------------------------------------
// The attention op (SPEC §3, §6)

// Number of compressed tokens for a sequence of T: those j with j*r + l <= T.
int ref_num_compressed(int seq_len, int ratio, int block);
// Number of selection blocks: ceil(T / b).
int ref_num_blocks(int seq_len, int block_size);

// Mean compression (SPEC §3.1): kc [B,Tc,G,d] from k [B,T,G,d], Tc = ref_num_compressed.
void ref_compress_mean(double *kc, const double *k, int batch, int seq_len, int num_kv_heads,
                       int head_dim, int ratio, int block);

// Optional statistics of a reference run, for telling a real mismatch from a near-tie.
typedef struct ref_attn_stats {
    // Smallest gap, over every (b, t, kv head) where scoring chose, between the lowest
    // selected score and the highest unselected candidate score, divided by the largest
    // |score| of that row (+inf when no choice was ever made).
    double min_margin;
} ref_attn_stats;

// The three-path attention with precomputed compressed keys/values:
//   q [B,T,H,d], k, v [B,T,G,d], kc, vc [B,Tc,G,d] (Tc = ref_num_compressed(T, r, l)),
//   gates [B,T,H,3] (cmp, slc, win; used as given), block_indices [B,T,G,n] or NULL
//   (-1 = unused slot; replaces scoring and top-k), out [B,T,H,d].
//   sel_out [B,T,G,n] (may be NULL): the blocks used, ascending, -1 padding at the end.
//   desc: batch, seq_len, heads, sizes, select_score, select_fixed, scale (0 = 1/sqrt d).
int ref_attention_compressed(const nsa_attention_desc *desc, const double *q, const double *k,
                             const double *v, const double *kc, const double *vc,
                             const double *gates, const int32_t *block_indices, double *out,
                             int32_t *sel_out, ref_attn_stats *stats);

// The public op of SPEC §6: mean compression of k and v, then ref_attention_compressed.
int ref_attention(const nsa_attention_desc *desc, const double *q, const double *k,
                  const double *v, const double *gates, const int32_t *block_indices,
                  double *out, int32_t *sel_out, ref_attn_stats *stats);

// ----------------------------------------------------------------------------------------
// The model (SPEC §2, §3, §5)

// A parameter by its SPEC §7 name; numel is checked against the shape the SPEC gives.
typedef struct ref_tensor {
    const char *name;
    const double *data;
    size_t numel;
} ref_tensor;

typedef struct ref_params {
    const ref_tensor *tensors;
    size_t count;
} ref_params;

// Looks a tensor up; NULL (and a message) when missing or of another size.
const double *ref_param(const ref_params *params, const char *name, size_t numel);

// The effective G and l of a config (0 = default convention of nsa.h).
int ref_kv_heads(const nsa_config *cfg);
int ref_compression_block(const nsa_config *cfg);

// The attention layer of layer `layer` (SPEC §3): z [B,T,D] (already normalised) ->
// out [B,T,D] (after o_proj). stats may be NULL.
int ref_attention_layer_forward(const nsa_config *cfg, const ref_params *params, int layer,
                                const double *z, int batch, int seq_len, double *out,
                                ref_attn_stats *stats);
// One pre-norm block (SPEC §2), inference: x [B,T,D] -> out [B,T,D].
int ref_block_forward(const nsa_config *cfg, const ref_params *params, int layer, const double *x,
                      int batch, int seq_len, double *out, ref_attn_stats *stats);
// The whole model, inference: x [B,T,E] -> out [B,D] (last position) or [B,T,D]
// (all_positions != 0).
int ref_model_forward(const nsa_config *cfg, const ref_params *params, const double *x, int batch,
                      int seq_len, int all_positions, double *out, ref_attn_stats *stats);
// The language model (SPEC §5): tokens [B,T] -> logits [B,T,V] (may be NULL) and the mean
// next-token cross-entropy over B*(T-1) predictions (loss may be NULL; needs T >= 2).
int ref_lm_forward(const nsa_config *cfg, const ref_params *params, const int32_t *tokens,
                   int batch, int seq_len, double *logits, double *loss, ref_attn_stats *stats);

// Exact parameter count of SPEC §4 generalised to every option (without embed/lm_head).
int64_t ref_param_count(const nsa_config *cfg);

#endif // NSA_TEST_REF64_H
