/*
 * model.h — the model object shared by model.c (parameters, init, checkpoints),
 * forward.c (forward and backward over the backend) and train.c (optimizer).
 */
#ifndef NSA_MODEL_H
#define NSA_MODEL_H

#include "backend.h"
#include "internal.h"

#define NSA_NONE ((size_t)-1)

// Offsets (in floats) of one layer's tensors in the parameter buffer; NSA_NONE if absent.
typedef struct layer_offsets {
    size_t attn_norm_w, attn_norm_b;
    size_t q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b;
    size_t gate;             // static [3]
    size_t gate_w, gate_b;   // token [3H,D], [3H]
    size_t ck_w, cv_w;       // conv [G,l,d]
    size_t ck_pos, ck_fc1_w, ck_fc1_b, ck_fc2_w, ck_fc2_b; // mlp, keys
    size_t cv_pos, cv_fc1_w, cv_fc1_b, cv_fc2_w, cv_fc2_b; // mlp, values
    size_t ffn_norm_w, ffn_norm_b, up_w, up_b, down_w, down_b;
} layer_offsets;

// Activations of one layer (forward), or their gradients (the backward workspace uses
// the same layout). Pointers into one device allocation.
typedef struct layer_acts {
    float *ln1, *ln1_mean, *ln1_rstd;
    float *q, *k, *v, *kc, *vc;
    float *ck_in, *ck_hid, *ck_act, *cv_in, *cv_hid, *cv_act; // mlp compression
    float *gate_logits, *gates;
    float *attn, *o_paths, *lse;
    float *proj, *h, *ln2, *ln2_mean, *ln2_rstd, *up, *act, *down;
    int32_t *idx;
} layer_acts;

struct nsa_model {
    nsa_context *ctx;
    nsa_config cfg;
    int G, l; // resolved num_kv_heads, compression_block

    nsa_tensor_info *tensors;
    int *tensor_init; // how each tensor is initialised (model.c)
    size_t num_tensors;
    size_t buffer_size; // floats

    float *params, *grads; // device buffers of buffer_size floats
    size_t embed, in_proj_w, in_proj_b, final_w, final_b, lm_w, lm_b;
    layer_offsets *layers;

    uint64_t rng_seed, rng_counter;
    float *gate_override; // device [3] logits (log of the forced gates), or NULL

    // Activations, sized for `cap_rows` = B*T rows and `cap_layers` kept layers.
    int act_B, act_T;       // shape of the last forward
    unsigned act_flags;     // flags of the last forward
    int act_valid;          // a backward may follow
    size_t cap_rows, cap_cmp_rows;
    int cap_layers;
    void *act_mem;          // one device allocation
    layer_acts *acts;       // [cap_layers]
    layer_acts grad;        // backward workspace
    float **layer_out;      // [num_layers] (kept) or 2 ping-pong buffers
    float *x_in;            // [M, E] model input (or embeddings)
    float *x0;              // [M, D] after in_proj (aliases x_in when E == D)
    float *final, *final_mean, *final_rstd; // [M,D], [M], [M]
    float *d_a, *d_b, *d_x; // [M,D], [M,D], [M,E] backward
    float *logits, *losses, *dlogits; // LM: [M,V], [M], [M,V]
    int32_t *tokens;        // LM: [M]
    float *weights;         // LM: [M] loss weights
    double weight_sum;      // LM: sum of the loss weights of the last forward
    int has_weights;        // LM: the last forward had loss weights
    float *host_losses;     // [M] host
};

// Ensures activation buffers for B*T rows; keep_layers: store every layer (backward).
nsa_status nsa__model_reserve(nsa_model *m, int B, int T, int keep_layers, int lm);
void nsa__model_release_acts(nsa_model *m);

#endif // NSA_MODEL_H
