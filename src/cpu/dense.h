/*
 * dense.h — the project's own full causal softmax attention on the CPU (dense_attention.c),
 * flash-style: tiled, online softmax, O(T) memory, built from the same micro-kernels as
 * the NSA paths (attn_kernels.h). It is the baseline NSA's speed is measured against
 * (`nsa bench`), not a model op.
 */
#ifndef NSA_CPU_DENSE_H
#define NSA_CPU_DENSE_H

#include "nsa.h"

// out[b,t,h,:] = softmax_s<=t(scale * q[b,t,h,:] . k[b,s,g,:]) v[b,s,g,:], g = h / (H/G).
// q [B,T,H,d], k, v [B,T,G,d], out [B,T,H,d] (=), lse [B,T,H] (=, may be NULL): the
// log-sum-exp of each row's scaled scores, which the backward needs. scale 0 = 1/sqrt(d).
// Uses the calling thread's OpenMP team size. NSA_ERR_NOMEM when scratch cannot be had.
nsa_status nsa__cpu_dense_attention_forward(int B, int T, int H, int G, int d, float scale,
                                            const float *q, const float *k, const float *v,
                                            float *out, float *lse);

// Backward of the forward above from its out and lse: dout [B,T,H,d] -> dq [B,T,H,d],
// dk, dv [B,T,G,d], all overwritten (=).
nsa_status nsa__cpu_dense_attention_backward(int B, int T, int H, int G, int d, float scale,
                                             const float *q, const float *k, const float *v,
                                             const float *out, const float *lse,
                                             const float *dout, float *dq, float *dk,
                                             float *dv);

#endif // NSA_CPU_DENSE_H
