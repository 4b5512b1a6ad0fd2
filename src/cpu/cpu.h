/*
 * cpu.h — entry points shared between the CPU backend's files.
 */
#ifndef NSA_CPU_H
#define NSA_CPU_H

#include "backend.h"

nsa_status nsa__cpu_attn_forward(nsa_context *ctx, const nsa__attn_dims *dims, const float *q,
                                 const float *k, const float *v, const float *kc, const float *vc,
                                 const float *gates, const int32_t *given_idx, int32_t *idx,
                                 float *out, float *o_paths, float *lse);
nsa_status nsa__cpu_attn_backward(nsa_context *ctx, const nsa__attn_dims *dims, const float *q,
                                  const float *k, const float *v, const float *kc,
                                  const float *vc, const float *gates, const int32_t *idx,
                                  const float *o_paths, const float *lse, const float *dout,
                                  float *dq, float *dk, float *dv, float *dkc, float *dvc,
                                  float *dgates);

#endif // NSA_CPU_H
