/*
 * grad_util.h — what the gradient tests (test_grad.c: the ops; test_grad_model.c: the
 * whole model) share: the tolerance, central finite differences of a float64 objective,
 * the comparisons, per-test scratch memory and the "problem" of an op checked against its
 * float64 forward. Each test program defines ctx / ops through this header.
 */
#ifndef NSA_TEST_GRAD_UTIL_H
#define NSA_TEST_GRAD_UTIL_H

#include "backend.h"
#include "harness.h"
#include "nsa.h"
#include "ref64.h"

// ----------------------------------------------------------------------------------------
// Tolerance and the finite differences
//
// The analytic gradient is computed in float32; the reference is a central difference of
// an exact float64 forward (step 1e-5 on O(1) inputs: truncation ~1e-10, roundoff ~1e-11).
// float32 rounding (~6e-8 per operation, summed over a few hundred terms and amplified by
// the cancellations of softmax and LayerNorm backward) stays orders below 1e-3 of the
// largest gradient, while a wrong or missing term shows up at O(1): 1e-3 tells them apart.
#define TOL_GRAD 1e-3
#define FD_STEP 1e-5

static nsa_context *ctx;
static const nsa__backend_ops *ops;

// Scratch memory of the current test: zeroed, freed all at once by test_done().
static void **scratch;
static size_t scratch_count, scratch_cap;

// The worst relative error of the current test, printed after it.
static double worst_err;
static char worst_what[160];

static inline void worst_reset(void)
{
    worst_err = 0.0;
    worst_what[0] = '\0';
}

// Prints the worst error of the test and frees its scratch memory.
static inline void test_done(void)
{
    if (worst_what[0])
        printf("     worst relative gradient error %.2e (%s)\n", worst_err, worst_what);
    for (size_t i = 0; i < scratch_count; i++)
        free(scratch[i]);
    scratch_count = 0;
}

typedef double (*objective_fn)(void *user);

// d f / d *slot by central differences; *slot is restored.
static inline double central_diff(double *slot, objective_fn f, void *user)
{
    double keep = *slot;
    *slot = keep + FD_STEP;
    double plus = f(user);
    *slot = keep - FD_STEP;
    double minus = f(user);
    *slot = keep;
    return (plus - minus) / (2.0 * FD_STEP);
}

// got (analytic, float32) against mult * fd: max |got - mult*fd| / max |mult*fd| <= TOL_GRAD.
// Returns the relative error (inf for NaN).
static inline double grad_compare(const char *what, const char *part, const float *got, const double *fd,
                           size_t n, double mult)
{
    double scale = 0.0, err = 0.0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++)
        if (fabs(mult * fd[i]) > scale)
            scale = fabs(mult * fd[i]);
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - mult * fd[i]);
        if (isnan(e))
            e = INFINITY;
        if (e > err || (i == 0 && e == err)) {
            err = e;
            at = i;
        }
    }
    double rel = err / (scale > 1e-12 ? scale : 1e-12);
    CHECKF(rel <= TOL_GRAD,
           "%s: %s: worst rel err %.3g at %zu (analytic %.9g, finite diff %.9g, scale %.3g) > %.0e",
           what, part, rel, at, n ? (double)got[at] : 0.0, n ? mult * fd[at] : 0.0, scale, TOL_GRAD);
    if (rel > worst_err || !worst_what[0]) {
        worst_err = rel;
        snprintf(worst_what, sizeof worst_what, "%s: %s", what, part);
    }
    return rel;
}

// float32 forward output against the float64 forward (a sanity check before the gradients).
static inline void forward_compare(const char *what, const char *part, const float *got,
                            const double *ref, size_t n, double tol)
{
    char label[256];
    snprintf(label, sizeof label, "%s: %s", what, part);
    harness_compare(label, got, ref, n, tol);
}


static inline void *talloc(size_t bytes)
{
    if (scratch_count == scratch_cap) {
        scratch_cap = scratch_cap ? 2 * scratch_cap : 256;
        scratch = realloc(scratch, scratch_cap * sizeof *scratch);
    }
    void *p = calloc(1, bytes ? bytes : 1);
    if (!scratch || !p) {
        fprintf(stderr, "test_grad: out of memory\n");
        exit(2);
    }
    return scratch[scratch_count++] = p;
}

static inline float *falloc(size_t n) { return talloc(sizeof(float) * n); }
static inline double *dalloc(size_t n) { return talloc(sizeof(double) * n); }
static inline int32_t *ialloc(size_t n) { return talloc(sizeof(int32_t) * n); }

static inline double *to_double(const float *x, size_t n)
{
    double *y = dalloc(n);
    for (size_t i = 0; i < n; i++)
        y[i] = x[i];
    return y;
}

// An output an op accumulates into (+=): it starts from random values, and what the op
// added is compared.
typedef struct accum {
    float *buf, *start;
    size_t n;
} accum;

static inline float *accum_start(accum *a, test_rng *rng, size_t n)
{
    a->n = n;
    a->start = falloc(n);
    a->buf = falloc(n);
    test_fill(rng, a->start, n, 1.0);
    memcpy(a->buf, a->start, sizeof(float) * n);
    return a->buf;
}

static inline float *accum_added(const accum *a)
{
    float *y = falloc(a->n);
    for (size_t i = 0; i < a->n; i++)
        y[i] = a->buf[i] - a->start[i];
    return y;
}

static inline double uniform_in(test_rng *rng, double lo, double hi)
{
    return lo + (hi - lo) * 0.5 * (test_rng_uniform(rng) + 1.0);
}

// ----------------------------------------------------------------------------------------
// An op problem: named inputs (float32 for the library, the same values in float64 for
// the reference), a float64 forward, and the loss sum(out * R).

#define MAX_INPUTS 8

typedef struct problem problem;
typedef void (*forward64_fn)(const problem *p, double *out);

struct problem {
    const char *what;
    int num_inputs;
    const char *name[MAX_INPUTS];
    size_t size[MAX_INPUTS];
    float *f[MAX_INPUTS];  // what the library gets
    double *x[MAX_INPUTS]; // the same values in float64; finite differences perturb these
    size_t nout;
    float *Rf;
    double *R, *out;
    forward64_fn forward;
    const void *dims; // the op's shapes, for forward
    test_rng rng;
};

static inline void problem_init(problem *p, const char *what, uint64_t seed, forward64_fn forward,
                         const void *dims)
{
    memset(p, 0, sizeof *p);
    p->what = what;
    p->forward = forward;
    p->dims = dims;
    p->rng.s = seed;
}

// Adds an input of n values uniform in [lo, hi); returns its index.
static inline int problem_input(problem *p, const char *name, size_t n, double lo, double hi)
{
    int i = p->num_inputs++;
    p->name[i] = name;
    p->size[i] = n;
    p->f[i] = falloc(n);
    p->x[i] = dalloc(n);
    for (size_t j = 0; j < n; j++) {
        p->f[i][j] = (float)uniform_in(&p->rng, lo, hi);
        p->x[i][j] = p->f[i][j];
    }
    return i;
}

static inline void problem_output(problem *p, size_t nout)
{
    p->nout = nout;
    p->Rf = falloc(nout);
    test_fill(&p->rng, p->Rf, nout, 1.0);
    p->R = to_double(p->Rf, nout);
    p->out = dalloc(nout);
}

static inline double problem_loss(void *user)
{
    problem *p = user;
    p->forward(p, p->out);
    double s = 0.0;
    for (size_t i = 0; i < p->nout; i++)
        s += p->out[i] * p->R[i];
    return s;
}

// The float64 forward's output (after problem_forward) against the library's.
static inline void problem_forward_check(problem *p, const float *got)
{
    p->forward(p, p->out);
    forward_compare(p->what, "forward", got, p->out, p->nout, TOL_F32);
}

// grads[i]: the analytic gradient of input i (NULL: not differentiated), compared with
// mult * the finite-difference gradient over every element.
static inline void problem_check(problem *p, const float *const *grads, double mult)
{
    for (int i = 0; i < p->num_inputs; i++) {
        if (!grads[i])
            continue;
        double *fd = dalloc(p->size[i]);
        for (size_t j = 0; j < p->size[i]; j++)
            fd[j] = central_diff(&p->x[i][j], problem_loss, p);
        char part[64];
        snprintf(part, sizeof part, "d%s", p->name[i]);
        grad_compare(p->what, part, grads[i], fd, p->size[i], mult);
    }
}

#define OK(call) CHECKF((call) == NSA_OK, "%s failed: %s", #call, nsa_last_error())

#endif // NSA_TEST_GRAD_UTIL_H
