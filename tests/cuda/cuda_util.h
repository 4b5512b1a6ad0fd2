/*
 * cuda_util.h — helpers the CUDA device tests share: random host arrays, device copies,
 * and the comparisons (max |got - ref| / max |ref|, exact integer equality) that print one
 * line per array and mark the running test failed past the tolerance.
 */
#ifndef NSA_TEST_CUDA_UTIL_H
#define NSA_TEST_CUDA_UTIL_H

#include "attn_case.h"
#include "backend.h"
#include "harness.h"
#include "nsa.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static test_rng rng = {0x5eed1234ull};

// ----------------------------------------------------------------------------------------
// Helpers

static inline float *hrand(size_t n, double scale)
{
    float *x = malloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) {
        double u = test_rng_uniform(&rng);
        if (u == 0.0)
            u = 0.5;
        x[i] = (float)(scale * u);
    }
    return x;
}

// Uniform in [lo, hi).
static inline float *hrange(size_t n, double lo, double hi)
{
    float *x = malloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++)
        x[i] = (float)(lo + (hi - lo) * 0.5 * (test_rng_uniform(&rng) + 1.0));
    return x;
}

static inline float *hnan(size_t n)
{
    float *x = malloc(sizeof(float) * (n ? n : 1));
    test_poison(x, n);
    return x;
}

static inline void *hdup(const void *p, size_t bytes)
{
    void *q = malloc(bytes ? bytes : 1);
    if (bytes)
        memcpy(q, p, bytes);
    return q;
}

static inline void *dput(nsa_context *c, const void *h, size_t bytes)
{
    void *d = NULL;
    nsa_status st = c->ops->alloc(c, &d, bytes);
    CHECKF(st == NSA_OK, "alloc %zu: %s", bytes, nsa_last_error());
    if (st == NSA_OK && h && bytes) {
        st = c->ops->upload(c, d, h, bytes);
        CHECKF(st == NSA_OK, "upload: %s", nsa_last_error());
    }
    return d;
}

static inline void dget(nsa_context *c, void *h, const void *d, size_t bytes)
{
    nsa_status st = c->ops->download(c, h, d, bytes);
    CHECKF(st == NSA_OK, "download: %s", nsa_last_error());
}

static inline void dfree(nsa_context *c, void *d)
{
    if (d)
        c->ops->free(c, d);
}

// max(max |ref| over its finite values, floor), 1e-30 for 0: the scale of relative errors.
static inline double ref_scale(const float *ref, size_t n, double floor)
{
    double scale = floor;
    for (size_t i = 0; i < n; i++)
        if (isfinite(ref[i]) && fabs(ref[i]) > scale)
            scale = fabs(ref[i]);
    return scale == 0.0 ? 1e-30 : scale;
}

// |got - ref|; equal infinities count as 0, NaN as infinite.
static inline double abs_err(float got, float ref)
{
    double e;
    if (isinf(ref) || isinf(got))
        e = got == ref ? 0.0 : INFINITY;
    else
        e = fabs((double)got - ref);
    return isnan(e) || isnan(got) ? INFINITY : e;
}

// max |got - ref| / ref_scale(ref, n, floor) (abs_err's rules).
static inline double rel_err_floor(const float *got, const float *ref, size_t n, double floor,
                            size_t *worst_i)
{
    double scale = ref_scale(ref, n, floor), worst = 0.0;
    *worst_i = 0;
    for (size_t i = 0; i < n; i++) {
        double e = abs_err(got[i], ref[i]);
        if (e > worst) {
            worst = e;
            *worst_i = i;
        }
    }
    return worst / scale;
}

static inline double max_abs(const float *x, size_t n)
{
    double m = 0.0;
    for (size_t i = 0; i < n; i++)
        if (isfinite(x[i]) && fabs(x[i]) > m)
            m = fabs(x[i]);
    return m;
}

// As cmp, relative to max(max |ref|, floor).
static inline int cmp_floor(const char *what, const float *got, const float *ref, size_t n, double tol,
                     double floor)
{
    size_t wi;
    double rel = rel_err_floor(got, ref, n, floor, &wi);
    printf("    %-34s max rel err %.2e\n", what, rel);
    if (!(rel <= tol)) {
        fprintf(stderr, "  %s: rel err %.3g > %.1g at %zu (gpu %.9g, cpu %.9g)\n", what, rel, tol,
                wi, n ? (double)got[wi] : 0.0, n ? (double)ref[wi] : 0.0);
        harness_cur_failed = 1;
        return 0;
    }
    return 1;
}

static inline int cmp(const char *what, const float *got, const float *ref, size_t n, double tol)
{
    return cmp_floor(what, got, ref, n, tol, 0.0);
}

// GPU array (device) against CPU array (host).
static inline int cmp_dev_floor(const char *what, nsa_context *g, const float *dev, const float *ref,
                         size_t n, double tol, double floor)
{
    float *h = malloc(sizeof(float) * (n ? n : 1));
    dget(g, h, dev, n * sizeof(float));
    int ok = cmp_floor(what, h, ref, n, tol, floor);
    free(h);
    return ok;
}

static inline int cmp_dev(const char *what, nsa_context *g, const float *dev, const float *ref, size_t n,
                   double tol)
{
    return cmp_dev_floor(what, g, dev, ref, n, tol, 0.0);
}

static inline int cmp_exact_i32(const char *what, const int32_t *got, const int32_t *ref, size_t n)
{
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; i++)
        if (got[i] != ref[i] && bad++ == 0)
            first = i;
    printf("    %-34s %zu of %zu differ\n", what, bad, n);
    if (bad) {
        fprintf(stderr, "  %s: %zu of %zu differ, first at %zu (gpu %d, cpu %d)\n", what, bad, n,
                first, (int)got[first], (int)ref[first]);
        harness_cur_failed = 1;
    }
    return bad == 0;
}

#define OPS(c) ((c)->ops)
#define OK(expr)                                                                             \
    do {                                                                                     \
        nsa_status st_ = (expr);                                                             \
        CHECKF(st_ == NSA_OK, "%s: %s (%s)", #expr, nsa_status_str(st_), nsa_last_error()); \
    } while (0)

// The resolved dims of a test's attention shape.
static inline void dims_of(nsa__attn_dims *dm, const attn_case *c)
{
    nsa_attention_desc desc = attn_case_desc(c);
    nsa__attn_dims_init(dm, &desc);
}

#endif // NSA_TEST_CUDA_UTIL_H
