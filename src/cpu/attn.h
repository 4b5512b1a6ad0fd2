/*
 * attn.h — the CPU attention's internal entry points besides the backend table
 * (src/cpu/cpu.h): the plain reference path (attn_ref.c) and the tiled kernels with a
 * per-phase profile (cpu_attention.c), for the tests and `nsa bench`.
 */
#ifndef NSA_CPU_ATTN_H
#define NSA_CPU_ATTN_H

#include "backend.h"

// CPU seconds spent in each phase of one call, summed over the threads (each thread's
// own CPU clock, so other processes on the machine do not inflate them), filled when a
// profile is passed. Phases of the forward and of the backward.
enum {
    NSA_PHASE_PACK = 0,  // packing k, v (and their compressed tokens) into panels
    NSA_PHASE_CMP,       // compressed path (with the cmp_attn block scores)
    NSA_PHASE_SELECT,    // mean_key scores and top-k (or copying given indices)
    NSA_PHASE_SLC,       // selected path
    NSA_PHASE_WIN,       // sliding window
    NSA_PHASE_OTHER,     // loading tiles, gating, writing outputs, reductions
    NSA_PHASE_COUNT
};

typedef struct nsa__attn_profile {
    double seconds[NSA_PHASE_COUNT];
    double wall; // seconds of the whole call
    double wait; // wall seconds the threads spent in barriers, summed over the threads
} nsa__attn_profile;

extern const char *const nsa__attn_phase_names[NSA_PHASE_COUNT];

// The tiled kernels (what the backend table calls, with prof = NULL).
nsa_status nsa__cpu_attn_forward_ex(nsa_context *ctx, const nsa__attn_dims *dims, const float *q,
                                    const float *k, const float *v, const float *kc,
                                    const float *vc, const float *gates,
                                    const int32_t *given_idx, int32_t *idx, float *out,
                                    float *o_paths, float *lse, nsa__attn_profile *prof);
nsa_status nsa__cpu_attn_backward_ex(nsa_context *ctx, const nsa__attn_dims *dims, const float *q,
                                     const float *k, const float *v, const float *kc,
                                     const float *vc, const float *gates, const int32_t *idx,
                                     const float *o_paths, const float *lse, const float *dout,
                                     float *dq, float *dk, float *dv, float *dkc, float *dvc,
                                     float *dgates, nsa__attn_profile *prof);

// The plain reference path: same arguments and results as the backend's attn_forward /
// attn_backward (src/backend.h).
nsa_status nsa__cpu_attn_forward_ref(nsa_context *ctx, const nsa__attn_dims *dims, const float *q,
                                     const float *k, const float *v, const float *kc,
                                     const float *vc, const float *gates,
                                     const int32_t *given_idx, int32_t *idx, float *out,
                                     float *o_paths, float *lse);
nsa_status nsa__cpu_attn_backward_ref(nsa_context *ctx, const nsa__attn_dims *dims,
                                      const float *q, const float *k, const float *v,
                                      const float *kc, const float *vc, const float *gates,
                                      const int32_t *idx, const float *o_paths, const float *lse,
                                      const float *dout, float *dq, float *dk, float *dv,
                                      float *dkc, float *dvc, float *dgates);

// Top-n of score[0..num_cand) (ties to the lower index) into out[n], ascending, -1 padded;
// with `fixed` (paper) block 0 and the two most recent candidates are always in. top:
// scratch of n + 3 entries. Shared by both paths so they select identically.
void nsa__select_blocks(const float *score, int num_cand, int n, int fixed, int32_t *out,
                        int32_t *top);

#endif // NSA_CPU_ATTN_H
