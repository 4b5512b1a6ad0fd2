/*
 * test_grad.c — every backward pass against central finite differences in float64.
 *
 * Three levels, each against a float64 forward that shares nothing with the library:
 *   - the ops of the backend table (src/backend.h) on a CPU context, one at a time, each
 *     against a small float64 forward written here (the attention paths against
 *     ref_attention_compressed of tests/ref64.c);
 *   - the public op nsa_attention_backward against ref_attention;
 *   - the whole model (nsa_model_backward, nsa_lm_backward) against ref_model_forward and
 *     ref_lm_forward, on a random sample of parameters and on every input element.
 * The loss of an op is sum(out * R) with a random R, so its gradient is the op's backward
 * applied to dout = R. Inputs are random (test_rng), never zeros.
 *
 * Selection is not differentiated (SPEC §3.2): for the attention ops the float64 forward
 * gets the selection the library used as block_indices, so a finite-difference step
 * cannot flip the top-k. For the whole model the reference selects by itself; its
 * smallest selection margin is printed when a check fails, to tell a flip from a bug.
 */
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

static void worst_reset(void)
{
    worst_err = 0.0;
    worst_what[0] = '\0';
}

// Prints the worst error of the test and frees its scratch memory.
static void test_done(void)
{
    if (worst_what[0])
        printf("     worst relative gradient error %.2e (%s)\n", worst_err, worst_what);
    for (size_t i = 0; i < scratch_count; i++)
        free(scratch[i]);
    scratch_count = 0;
}

typedef double (*objective_fn)(void *user);

// d f / d *slot by central differences; *slot is restored.
static double central_diff(double *slot, objective_fn f, void *user)
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
static double grad_compare(const char *what, const char *part, const float *got, const double *fd,
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
static void forward_compare(const char *what, const char *part, const float *got,
                            const double *ref, size_t n, double tol)
{
    char label[256];
    snprintf(label, sizeof label, "%s: %s", what, part);
    harness_compare(label, got, ref, n, tol);
}


static void *talloc(size_t bytes)
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

static float *falloc(size_t n) { return talloc(sizeof(float) * n); }
static double *dalloc(size_t n) { return talloc(sizeof(double) * n); }
static int32_t *ialloc(size_t n) { return talloc(sizeof(int32_t) * n); }

static double *to_double(const float *x, size_t n)
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

static float *accum_start(accum *a, test_rng *rng, size_t n)
{
    a->n = n;
    a->start = falloc(n);
    a->buf = falloc(n);
    test_fill(rng, a->start, n, 1.0);
    memcpy(a->buf, a->start, sizeof(float) * n);
    return a->buf;
}

static float *accum_added(const accum *a)
{
    float *y = falloc(a->n);
    for (size_t i = 0; i < a->n; i++)
        y[i] = a->buf[i] - a->start[i];
    return y;
}

static double uniform_in(test_rng *rng, double lo, double hi)
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

static void problem_init(problem *p, const char *what, uint64_t seed, forward64_fn forward,
                         const void *dims)
{
    memset(p, 0, sizeof *p);
    p->what = what;
    p->forward = forward;
    p->dims = dims;
    p->rng.s = seed;
}

// Adds an input of n values uniform in [lo, hi); returns its index.
static int problem_input(problem *p, const char *name, size_t n, double lo, double hi)
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

static void problem_output(problem *p, size_t nout)
{
    p->nout = nout;
    p->Rf = falloc(nout);
    test_fill(&p->rng, p->Rf, nout, 1.0);
    p->R = to_double(p->Rf, nout);
    p->out = dalloc(nout);
}

static double problem_loss(void *user)
{
    problem *p = user;
    p->forward(p, p->out);
    double s = 0.0;
    for (size_t i = 0; i < p->nout; i++)
        s += p->out[i] * p->R[i];
    return s;
}

// The float64 forward's output (after problem_forward) against the library's.
static void problem_forward_check(problem *p, const float *got)
{
    p->forward(p, p->out);
    forward_compare(p->what, "forward", got, p->out, p->nout, TOL_F32);
}

// grads[i]: the analytic gradient of input i (NULL: not differentiated), compared with
// mult * the finite-difference gradient over every element.
static void problem_check(problem *p, const float *const *grads, double mult)
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

// ----------------------------------------------------------------------------------------
// Dense and elementwise ops

typedef struct dims_linear {
    int M, I, O;
} dims_linear;

static void linear64(const problem *p, double *y)
{
    const dims_linear *dm = p->dims;
    const double *x = p->x[0], *W = p->x[1], *b = p->x[2];
    for (int m = 0; m < dm->M; m++)
        for (int o = 0; o < dm->O; o++) {
            double s = b[o];
            for (int i = 0; i < dm->I; i++)
                s += x[(size_t)m * dm->I + i] * W[(size_t)o * dm->I + i];
            y[(size_t)m * dm->O + o] = s;
        }
}

static void test_linear(void)
{
    worst_reset();
    dims_linear dm = {7, 9, 5};
    problem p;
    problem_init(&p, "linear M=7 I=9 O=5", 11, linear64, &dm);
    int ix = problem_input(&p, "x", (size_t)dm.M * dm.I, -1, 1);
    int iw = problem_input(&p, "W", (size_t)dm.O * dm.I, -1, 1);
    int ib = problem_input(&p, "bias", (size_t)dm.O, -1, 1);
    problem_output(&p, (size_t)dm.M * dm.O);
    size_t nx = p.size[ix], nw = p.size[iw], nb = p.size[ib];
    float *y = falloc(p.nout);
    test_poison(y, p.nout);
    OK(ops->linear_forward(ctx, y, p.f[ix], p.f[iw], p.f[ib], dm.M, dm.I, dm.O));
    problem_forward_check(&p, y);

    // dx = 1 * dx + dy W, dW += , dbias += : start from random values and subtract them
    accum dx, dw, db;
    OK(ops->linear_backward(ctx, accum_start(&dx, &p.rng, nx), 1.0f, accum_start(&dw, &p.rng, nw),
                            accum_start(&db, &p.rng, nb), p.Rf, p.f[ix], p.f[iw], dm.M, dm.I,
                            dm.O));
    const float *grads[] = {accum_added(&dx), accum_added(&dw), accum_added(&db)};
    problem_check(&p, grads, 1.0);

    // dx_beta = 0 overwrites dx (poisoned); NULL dbias and NULL dx are accepted
    float *dx2 = falloc(nx), *dw2 = falloc(nw);
    test_poison(dx2, nx);
    OK(ops->linear_backward(ctx, dx2, 0.0f, dw2, NULL, p.Rf, p.f[ix], p.f[iw], dm.M, dm.I, dm.O));
    const float *grads2[] = {dx2, dw2, NULL};
    problem_check(&p, grads2, 1.0);
    memset(dw2, 0, sizeof(float) * nw);
    OK(ops->linear_backward(ctx, NULL, 0.0f, dw2, NULL, p.Rf, p.f[ix], p.f[iw], dm.M, dm.I, dm.O));
    const float *grads3[] = {NULL, dw2, NULL};
    problem_check(&p, grads3, 1.0);

    test_done();
}

typedef struct dims_rows {
    int M, D;
} dims_rows;

static void layernorm64(const problem *p, double *y)
{
    const dims_rows *dm = p->dims;
    const double *x = p->x[0], *gamma = p->x[1], *beta = p->x[2];
    for (int m = 0; m < dm->M; m++) {
        const double *xr = x + (size_t)m * dm->D;
        double mean = 0.0, var = 0.0;
        for (int i = 0; i < dm->D; i++)
            mean += xr[i] / dm->D;
        for (int i = 0; i < dm->D; i++)
            var += (xr[i] - mean) * (xr[i] - mean) / dm->D;
        for (int i = 0; i < dm->D; i++)
            y[(size_t)m * dm->D + i] = (xr[i] - mean) / sqrt(var + 1e-5) * gamma[i] + beta[i];
    }
}

static void test_layernorm(void)
{
    worst_reset();
    dims_rows dm = {6, 11};
    problem p;
    problem_init(&p, "layernorm M=6 D=11", 12, layernorm64, &dm);
    int ix = problem_input(&p, "x", (size_t)dm.M * dm.D, -2, 3);
    int ig = problem_input(&p, "gamma", (size_t)dm.D, 0.5, 1.5);
    int ib = problem_input(&p, "beta", (size_t)dm.D, -1, 1);
    problem_output(&p, (size_t)dm.M * dm.D);
    size_t nx = p.size[ix], nd = (size_t)dm.D;
    float *y = falloc(nx), *mean = falloc((size_t)dm.M), *rstd = falloc((size_t)dm.M);
    test_poison(y, nx);
    OK(ops->layernorm_forward(ctx, y, mean, rstd, p.f[ix], p.f[ig], p.f[ib], dm.M, dm.D));
    problem_forward_check(&p, y);
    // dx, dgamma, dbeta all +=
    accum dx, dg, db;
    OK(ops->layernorm_backward(ctx, accum_start(&dx, &p.rng, nx), accum_start(&dg, &p.rng, nd),
                               accum_start(&db, &p.rng, nd), p.Rf, p.f[ix], mean, rstd, p.f[ig],
                               dm.M, dm.D));
    const float *grads[] = {accum_added(&dx), accum_added(&dg), accum_added(&db)};
    problem_check(&p, grads, 1.0);
    test_done();
}

static void gelu64(const problem *p, double *y)
{
    for (size_t i = 0; i < p->nout; i++) {
        double x = p->x[0][i];
        y[i] = 0.5 * x * (1.0 + erf(x / sqrt(2.0)));
    }
}

static void test_gelu(void)
{
    worst_reset();
    problem p;
    problem_init(&p, "gelu n=64", 13, gelu64, NULL);
    const size_t n = 64;
    int ix = problem_input(&p, "x", n, -4, 4);
    problem_output(&p, n);
    float *y = falloc(n), *dx = falloc(n);
    test_poison(y, n);
    test_poison(dx, n);
    OK(ops->gelu_forward(ctx, y, p.f[ix], n));
    problem_forward_check(&p, y);
    OK(ops->gelu_backward(ctx, dx, p.Rf, p.f[ix], n)); // dx =
    const float *grads[] = {dx};
    problem_check(&p, grads, 1.0);
    // dx may alias dy
    float *inplace = falloc(n);
    memcpy(inplace, p.Rf, sizeof(float) * n);
    OK(ops->gelu_backward(ctx, inplace, inplace, p.f[ix], n));
    CHECK(memcmp(inplace, dx, sizeof(float) * n) == 0);
    test_done();
}

typedef struct dims_dropout {
    float p;
    uint64_t seed, stream;
} dims_dropout;

// Inverted dropout with the keep decision of SPEC (hash of seed, stream, index).
static void dropout64(const problem *p, double *y)
{
    const dims_dropout *dm = p->dims;
    for (size_t i = 0; i < p->nout; i++) {
        int keep = nsa__uniform(dm->seed, dm->stream, i) >= dm->p;
        y[i] = keep ? p->x[0][i] / (1.0 - (double)dm->p) : 0.0;
    }
}

static void test_dropout(void)
{
    worst_reset();
    dims_dropout dm = {0.3f, 1234, 5};
    problem p;
    problem_init(&p, "dropout p=0.3 n=200", 14, dropout64, &dm);
    const size_t n = 200;
    int ix = problem_input(&p, "x", n, -2, 2);
    problem_output(&p, n);
    float *y = falloc(n), *g = falloc(n);
    memcpy(y, p.f[ix], sizeof(float) * n);
    OK(ops->dropout(ctx, y, n, dm.p, dm.seed, dm.stream));
    problem_forward_check(&p, y);
    size_t dropped = 0;
    for (size_t i = 0; i < n; i++)
        dropped += y[i] == 0.0f;
    CHECKF(dropped > n / 10 && dropped < n / 2, "dropout p=0.3 dropped %zu of %zu", dropped, n);
    // the backward is the same op (the same mask) applied to dy
    memcpy(g, p.Rf, sizeof(float) * n);
    OK(ops->dropout(ctx, g, n, dm.p, dm.seed, dm.stream));
    const float *grads[] = {g};
    problem_check(&p, grads, 1.0);
    test_done();
}

typedef struct dims_rope {
    int B, T, pos0, nh, d;
    double theta;
} dims_rope;

static void rope64(const problem *p, double *y)
{
    const dims_rope *dm = p->dims;
    for (int b = 0; b < dm->B; b++)
        for (int t = 0; t < dm->T; t++)
            for (int h = 0; h < dm->nh; h++) {
                size_t row = (((size_t)b * dm->T + t) * dm->nh + h) * dm->d;
                for (int i = 0; i < dm->d / 2; i++) {
                    double a = (dm->pos0 + t) * pow(dm->theta, -2.0 * i / dm->d);
                    double x0 = p->x[0][row + 2 * i], x1 = p->x[0][row + 2 * i + 1];
                    y[row + 2 * i] = x0 * cos(a) - x1 * sin(a);
                    y[row + 2 * i + 1] = x0 * sin(a) + x1 * cos(a);
                }
            }
}

static void test_rope(void)
{
    worst_reset();
    const double thetas[2] = {7.0, 10000.0};
    const int pos0s[2] = {0, 5}; // pos0 > 0: positions of cached generation
    for (int k = 0; k < 2; k++) {
        dims_rope dm = {2, 9, pos0s[k], 3, 6, thetas[k]};
        char what[80];
        snprintf(what, sizeof what, "rope B=2 T=9 pos0=%d nh=3 d=6 theta=%g", dm.pos0, dm.theta);
        problem p;
        problem_init(&p, what, 15 + (uint64_t)k, rope64, &dm);
        size_t n = (size_t)dm.B * dm.T * dm.nh * dm.d;
        int ix = problem_input(&p, "x", n, -1, 1);
        problem_output(&p, n);
        float *y = falloc(n), *g = falloc(n);
        memcpy(y, p.f[ix], sizeof(float) * n);
        OK(ops->rope(ctx, y, dm.B, dm.T, dm.pos0, dm.nh, dm.d, dm.theta, 0));
        problem_forward_check(&p, y);
        // the backward of a rotation is the inverse rotation of dy
        memcpy(g, p.Rf, sizeof(float) * n);
        OK(ops->rope(ctx, g, dm.B, dm.T, dm.pos0, dm.nh, dm.d, dm.theta, 1));
        const float *grads[] = {g};
        problem_check(&p, grads, 1.0);
    }
    test_done();
}

// ----------------------------------------------------------------------------------------
// Compression (SPEC §3.1)

typedef struct dims_cmp {
    int B, T, G, d, l, r, Tc;
} dims_cmp;

static dims_cmp cmp_dims(int B, int T, int G, int d, int l, int r)
{
    dims_cmp dm = {B, T, G, d, l, r, ref_num_compressed(T, r, l)};
    return dm;
}

// xc = weighted sum (input 1 = W [G,l,d]) or mean (no input 1) of l rows, stride r.
static void compress64(const problem *p, double *xc)
{
    const dims_cmp *dm = p->dims;
    const double *x = p->x[0], *W = p->num_inputs > 1 ? p->x[1] : NULL;
    for (int b = 0; b < dm->B; b++)
        for (int j = 0; j < dm->Tc; j++)
            for (int g = 0; g < dm->G; g++)
                for (int c = 0; c < dm->d; c++) {
                    double s = 0.0;
                    for (int i = 0; i < dm->l; i++) {
                        double w = W ? W[((size_t)g * dm->l + i) * dm->d + c] : 1.0 / dm->l;
                        s += w * x[(((size_t)b * dm->T + j * dm->r + i) * dm->G + g) * dm->d + c];
                    }
                    xc[(((size_t)b * dm->Tc + j) * dm->G + g) * dm->d + c] = s;
                }
}

static void check_compress(const char *what, dims_cmp dm, int with_w, uint64_t seed)
{
    problem p;
    problem_init(&p, what, seed, compress64, &dm);
    int ix = problem_input(&p, "x", (size_t)dm.B * dm.T * dm.G * dm.d, -1, 1);
    int iw = with_w ? problem_input(&p, "W", (size_t)dm.G * dm.l * dm.d, -0.5, 1) : -1;
    problem_output(&p, (size_t)dm.B * dm.Tc * dm.G * dm.d);
    size_t nx = p.size[ix], nw = with_w ? p.size[iw] : 0;
    float *xc = falloc(p.nout);
    test_poison(xc, p.nout);
    OK(ops->compress_forward(ctx, xc, p.f[ix], with_w ? p.f[iw] : NULL, dm.B, dm.T, dm.G, dm.d,
                             dm.l, dm.r));
    problem_forward_check(&p, xc);
    // dx += , dW += : from random starting values
    accum dx, dw;
    accum_start(&dw, &p.rng, nw);
    OK(ops->compress_backward(ctx, accum_start(&dx, &p.rng, nx), with_w ? dw.buf : NULL, p.Rf,
                              p.f[ix], with_w ? p.f[iw] : NULL, dm.B, dm.T, dm.G, dm.d, dm.l,
                              dm.r));
    const float *grads[] = {accum_added(&dx), accum_added(&dw)};
    problem_check(&p, grads, 1.0);
}

static void test_compress(void)
{
    worst_reset();
    // overlapping blocks (l = 2r), an odd T with a partial tail, and l = r
    check_compress("compress conv B=2 T=11 G=2 d=3 l=4 r=2", cmp_dims(2, 11, 2, 3, 4, 2), 1, 21);
    check_compress("compress mean B=2 T=11 G=2 d=3 l=4 r=2", cmp_dims(2, 11, 2, 3, 4, 2), 0, 22);
    check_compress("compress conv B=1 T=10 G=3 d=2 l=r=3", cmp_dims(1, 10, 3, 2, 3, 3), 1, 23);
    check_compress("compress mean B=2 T=13 G=1 d=4 l=6 r=2", cmp_dims(2, 13, 1, 4, 6, 2), 0, 24);
    test_done();
}

// X[b,j,g,i*d+c] = x[b,j*r+i,g,c] + pos[i,c]
static void gather64(const problem *p, double *X)
{
    const dims_cmp *dm = p->dims;
    const double *x = p->x[0], *pos = p->x[1];
    for (int b = 0; b < dm->B; b++)
        for (int j = 0; j < dm->Tc; j++)
            for (int g = 0; g < dm->G; g++)
                for (int i = 0; i < dm->l; i++)
                    for (int c = 0; c < dm->d; c++)
                        X[((((size_t)b * dm->Tc + j) * dm->G + g) * dm->l + i) * dm->d + c] =
                            x[(((size_t)b * dm->T + j * dm->r + i) * dm->G + g) * dm->d + c] +
                            pos[(size_t)i * dm->d + c];
}

static void test_compress_gather(void)
{
    worst_reset();
    const dims_cmp cases[2] = {cmp_dims(2, 11, 2, 3, 4, 2), cmp_dims(1, 9, 1, 2, 3, 3)};
    for (int k = 0; k < 2; k++) {
        dims_cmp dm = cases[k];
        char what[96];
        snprintf(what, sizeof what, "compress_gather B=%d T=%d G=%d d=%d l=%d r=%d", dm.B, dm.T,
                 dm.G, dm.d, dm.l, dm.r);
        problem p;
        problem_init(&p, what, 25 + (uint64_t)k, gather64, &dm);
        int ix = problem_input(&p, "x", (size_t)dm.B * dm.T * dm.G * dm.d, -1, 1);
        int ip = problem_input(&p, "pos", (size_t)dm.l * dm.d, -1, 1);
        problem_output(&p, (size_t)dm.B * dm.Tc * dm.G * dm.l * dm.d);
        size_t nx = p.size[ix], np = p.size[ip];
        float *X = falloc(p.nout);
        test_poison(X, p.nout);
        OK(ops->compress_gather(ctx, X, p.f[ix], p.f[ip], dm.B, dm.T, dm.G, dm.d, dm.l, dm.r));
        problem_forward_check(&p, X);
        accum dx, dp;
        OK(ops->compress_gather_backward(ctx, accum_start(&dx, &p.rng, nx),
                                         accum_start(&dp, &p.rng, np), p.Rf, dm.B, dm.T, dm.G,
                                         dm.d, dm.l, dm.r));
        const float *grads[] = {accum_added(&dx), accum_added(&dp)};
        problem_check(&p, grads, 1.0);
    }
    test_done();
}

// ----------------------------------------------------------------------------------------
// Gates

typedef struct dims_gate {
    int M, H;
} dims_gate;

static void gate_static64(const problem *p, double *gates)
{
    const dims_gate *dm = p->dims;
    const double *gamma = p->x[0];
    double mx = fmax(gamma[0], fmax(gamma[1], gamma[2])), e[3], s = 0.0;
    for (int c = 0; c < 3; c++)
        s += e[c] = exp(gamma[c] - mx);
    for (size_t i = 0; i < (size_t)dm->M * dm->H; i++)
        for (int c = 0; c < 3; c++)
            gates[i * 3 + c] = e[c] / s;
}

static void gate_token64(const problem *p, double *gates)
{
    for (size_t i = 0; i < p->nout; i++)
        gates[i] = 1.0 / (1.0 + exp(-p->x[0][i]));
}

static void test_gate(void)
{
    worst_reset();
    dims_gate dm = {7, 3};
    size_t n = (size_t)dm.M * dm.H * 3;
    {
        problem p;
        problem_init(&p, "gate static M=7 H=3", 31, gate_static64, &dm);
        int ig = problem_input(&p, "gamma", 3, -1.5, 1.5);
        problem_output(&p, n);
        float *gates = falloc(n), dg0[3], dg[3], gg[3];
        test_poison(gates, n);
        OK(ops->gate_forward(ctx, gates, p.f[ig], dm.M, dm.H, NSA_GATE_STATIC));
        problem_forward_check(&p, gates);
        test_fill(&p.rng, dg0, 3, 1.0); // dgamma +=
        memcpy(dg, dg0, sizeof dg);
        OK(ops->gate_backward(ctx, dg, p.Rf, gates, dm.M, dm.H, NSA_GATE_STATIC));
        for (int c = 0; c < 3; c++)
            gg[c] = dg[c] - dg0[c];
        const float *grads[] = {gg};
        problem_check(&p, grads, 1.0);
    }
    {
        problem p;
        problem_init(&p, "gate token M=7 H=3", 32, gate_token64, &dm);
        int il = problem_input(&p, "logits", n, -3, 3);
        problem_output(&p, n);
        float *gates = falloc(n), *dl = falloc(n);
        test_poison(gates, n);
        test_poison(dl, n); // dlogits =
        OK(ops->gate_forward(ctx, gates, p.f[il], dm.M, dm.H, NSA_GATE_TOKEN));
        problem_forward_check(&p, gates);
        OK(ops->gate_backward(ctx, dl, p.Rf, gates, dm.M, dm.H, NSA_GATE_TOKEN));
        const float *grads[] = {dl};
        problem_check(&p, grads, 1.0);
    }
    test_done();
}

// ----------------------------------------------------------------------------------------
// Language-model ops

typedef struct dims_lm {
    int B, T, V, E;
    const int32_t *tokens; // [B*T]
    const float *weights;  // [B*T] or NULL
} dims_lm;

static void embedding64(const problem *p, double *out)
{
    const dims_lm *dm = p->dims;
    for (int m = 0; m < dm->B * dm->T; m++)
        for (int e = 0; e < dm->E; e++)
            out[(size_t)m * dm->E + e] = p->x[0][(size_t)dm->tokens[m] * dm->E + e];
}

static void test_embedding(void)
{
    worst_reset();
    int32_t tokens[12] = {3, 1, 4, 1, 0, 2, 3, 3, 1, 0, 4, 1}; // repeats add into one row
    dims_lm dm = {2, 6, 6, 5, tokens, NULL};                  // row 5 is never used
    problem p;
    problem_init(&p, "embedding M=12 V=6 E=5", 41, embedding64, &dm);
    int it = problem_input(&p, "table", (size_t)dm.V * dm.E, -1, 1);
    problem_output(&p, (size_t)dm.B * dm.T * dm.E);
    size_t nt = p.size[it];
    float *out = falloc(p.nout);
    test_poison(out, p.nout);
    OK(ops->embedding_forward(ctx, out, tokens, p.f[it], dm.B * dm.T, dm.E));
    problem_forward_check(&p, out);
    accum dt; // dtable +=
    OK(ops->embedding_backward(ctx, accum_start(&dt, &p.rng, nt), tokens, p.Rf, dm.B * dm.T, dm.E));
    const float *grads[] = {accum_added(&dt)};
    problem_check(&p, grads, 1.0);
    test_done();
}

// losses[b,t] = w[b,t] * (logsumexp(z[b,t]) - z[b,t,tokens[b,t+1]]), 0 at t = T-1.
static void cross_entropy64(const problem *p, double *losses)
{
    const dims_lm *dm = p->dims;
    for (int b = 0; b < dm->B; b++)
        for (int t = 0; t < dm->T; t++) {
            size_t row = (size_t)b * dm->T + t;
            if (t == dm->T - 1) {
                losses[row] = 0.0;
                continue;
            }
            const double *z = p->x[0] + row * dm->V;
            double mx = z[0], s = 0.0;
            for (int i = 1; i < dm->V; i++)
                mx = fmax(mx, z[i]);
            for (int i = 0; i < dm->V; i++)
                s += exp(z[i] - mx);
            double w = dm->weights ? dm->weights[row] : 1.0;
            losses[row] = w * (mx + log(s) - z[dm->tokens[row + 1]]);
        }
}

static void test_cross_entropy(void)
{
    worst_reset();
    const int B = 2, T = 5, V = 7;
    int32_t tokens[10] = {1, 6, 0, 3, 3, 2, 5, 5, 4, 0};
    float weights[10];
    test_rng rng = {43};
    for (int i = 0; i < B * T; i++)
        weights[i] = (float)uniform_in(&rng, 0.2, 2.0);
    weights[3] = 0.0f; // a position that does not count
    for (int weighted = 0; weighted < 2; weighted++) {
        dims_lm dm = {B, T, V, 0, tokens, weighted ? weights : NULL};
        const char *what = weighted ? "cross_entropy weighted B=2 T=5 V=7 scale=0.37"
                                    : "cross_entropy B=2 T=5 V=7 scale=0.37";
        problem p;
        problem_init(&p, what, 44 + (uint64_t)weighted, cross_entropy64, &dm);
        int iz = problem_input(&p, "logits", (size_t)B * T * V, -3, 3);
        // dlogits is the gradient of sum(losses): R = 1
        problem_output(&p, (size_t)B * T);
        for (size_t i = 0; i < p.nout; i++)
            p.Rf[i] = 1.0f, p.R[i] = 1.0;
        float *losses = falloc(p.nout), *dz = falloc(p.size[iz]);
        test_poison(losses, p.nout);
        test_poison(dz, p.size[iz]);
        const float scale = 0.37f;
        OK(ops->cross_entropy(ctx, losses, dz, p.f[iz], tokens, dm.weights, B, T, V, scale));
        problem_forward_check(&p, losses);
        const float *grads[] = {dz};
        problem_check(&p, grads, scale); // dlogits = scale * weight * d(loss)/dlogits
        // without dlogits: losses alone
        float *losses2 = falloc(p.nout);
        test_poison(losses2, p.nout);
        OK(ops->cross_entropy(ctx, losses2, NULL, p.f[iz], tokens, dm.weights, B, T, V, 1.0f));
        CHECK(memcmp(losses, losses2, sizeof(float) * p.nout) == 0);
    }
    test_done();
}

// ----------------------------------------------------------------------------------------
// The attention op of the backend (SPEC §3) against ref_attention_compressed

typedef struct dims_attn {
    nsa_attention_desc desc;
    const int32_t *idx; // the library's selection, given to the reference
} dims_attn;

static void attn64(const problem *p, double *out)
{
    const dims_attn *dm = p->dims;
    int rc = ref_attention_compressed(&dm->desc, p->x[0], p->x[1], p->x[2], p->x[3], p->x[4],
                                      p->x[5], dm->idx, out, NULL, NULL);
    if (rc != 0)
        for (size_t i = 0; i < p->nout; i++)
            out[i] = NAN;
}

typedef struct attn_case {
    const char *what;
    int B, T, H, G, d, b, w, r, l, n;
    nsa_select_score score;
    nsa_select_fixed fixed;
    int given; // random block_indices instead of scoring
} attn_case;

static nsa_attention_desc attn_desc(const attn_case *c)
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

// Random valid block_indices [B,T,G,n]: per row 1..min(n, candidates) distinct candidates
// (i*b <= t) in random slots, the other slots -1.
static void random_indices(test_rng *rng, int32_t *idx, int B, int T, int G, int n, int b)
{
    int *pool = talloc(sizeof(int) * (size_t)(T + 1));
    for (int bb = 0; bb < B; bb++)
        for (int t = 0; t < T; t++)
            for (int g = 0; g < G; g++) {
                int32_t *row = idx + (((size_t)bb * T + t) * G + g) * n;
                int ncand = t / b + 1;
                for (int i = 0; i < ncand; i++)
                    pool[i] = i;
                int most = ncand < n ? ncand : n;
                int m = 1 + (int)(test_rng_next(rng) % (uint64_t)most);
                for (int i = 0; i < m; i++) { // partial Fisher-Yates
                    int j = i + (int)(test_rng_next(rng) % (uint64_t)(ncand - i));
                    int tmp = pool[i];
                    pool[i] = pool[j];
                    pool[j] = tmp;
                }
                for (int s = 0; s < n; s++)
                    row[s] = -1;
                for (int i = 0; i < m; i++) { // into random free slots
                    int s = (int)(test_rng_next(rng) % (uint64_t)n);
                    while (row[s] != -1)
                        s = (s + 1) % n;
                    row[s] = pool[i];
                }
            }
}

static void check_attn_op(const attn_case *c, uint64_t seed)
{
    dims_attn dm;
    dm.desc = attn_desc(c);
    nsa__attn_dims dims;
    nsa__attn_dims_init(&dims, &dm.desc);
    const size_t nq = (size_t)c->B * c->T * c->H * c->d, nkv = (size_t)c->B * c->T * c->G * c->d;
    const size_t nkvc = (size_t)c->B * dims.num_cmp * c->G * c->d;
    const size_t ng = (size_t)c->B * c->T * c->H * 3, nidx = (size_t)c->B * c->T * c->G * c->n;
    CHECK(dims.num_cmp == ref_num_compressed(c->T, c->r, c->l));
    problem p;
    problem_init(&p, c->what, seed, attn64, &dm);
    int iq = problem_input(&p, "q", nq, -1.5, 1.5);
    int ik = problem_input(&p, "k", nkv, -1.5, 1.5);
    int iv = problem_input(&p, "v", nkv, -1, 1);
    int ikc = problem_input(&p, "kc", nkvc, -1.5, 1.5);
    int ivc = problem_input(&p, "vc", nkvc, -1, 1);
    int igt = problem_input(&p, "gates", ng, 0.05, 1);
    problem_output(&p, nq);
    int32_t *given = NULL, *idx = ialloc(nidx);
    if (c->given) {
        given = ialloc(nidx);
        random_indices(&p.rng, given, c->B, c->T, c->G, c->n, c->b);
    }
    for (size_t i = 0; i < nidx; i++)
        idx[i] = -7;
    float *out = falloc(nq), *o_paths = falloc(3 * nq), *lse = falloc(ng);
    test_poison(out, nq);
    test_poison(o_paths, 3 * nq);
    test_poison(lse, ng);
    OK(ops->attn_forward(ctx, &dims, p.f[iq], p.f[ik], p.f[iv], p.f[ikc], p.f[ivc], p.f[igt],
                         given, idx, out, o_paths, lse));
    int idx_ok = 1;
    for (size_t i = 0; i < nidx; i++)
        idx_ok &= idx[i] >= -1 && idx[i] < dims.num_blocks;
    CHECKF(idx_ok, "%s: the selection holds values outside [-1, num_blocks)", c->what);
    dm.idx = idx;
    if (idx_ok)
        problem_forward_check(&p, out);
    // the backward overwrites every output: poison them
    float *dq = falloc(nq), *dk = falloc(nkv), *dv = falloc(nkv), *dkc = falloc(nkvc);
    float *dvc = falloc(nkvc), *dg = falloc(ng);
    test_poison(dq, nq);
    test_poison(dk, nkv);
    test_poison(dv, nkv);
    test_poison(dkc, nkvc);
    test_poison(dvc, nkvc);
    test_poison(dg, ng);
    OK(ops->attn_backward(ctx, &dims, p.f[iq], p.f[ik], p.f[iv], p.f[ikc], p.f[ivc], p.f[igt], idx,
                          o_paths, lse, p.Rf, dq, dk, dv, dkc, dvc, dg));
    if (idx_ok) {
        const float *grads[] = {dq, dk, dv, dkc, dvc, dg};
        problem_check(&p, grads, 1.0);
    }
}

static void test_attn_op(void)
{
    worst_reset();
    const attn_case cases[] = {
        {"attn GQA H=4 G=2 T=23 b=4 r=2 l=4 w=5 n=2 mean_key", 2, 23, 4, 2, 4, 4, 5, 2, 4, 2,
         NSA_SELECT_MEAN_KEY, NSA_SELECT_FIXED_NONE, 0},
        {"attn GQA H=4 G=2 T=23 b=4 r=2 l=4 w=5 n=2 cmp_attn", 2, 23, 4, 2, 4, 4, 5, 2, 4, 2,
         NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_NONE, 0},
        {"attn T=23 b=4 r=2 l=6 w=5 n=4 cmp_attn paper", 1, 23, 2, 2, 4, 4, 5, 2, 6, 4,
         NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_PAPER, 0},
        {"attn H=3 G=1 d=5 T=20 b=3 r=3 l=3 w=7 n=4 mean_key paper", 2, 20, 3, 1, 5, 3, 7, 3, 3,
         4, NSA_SELECT_MEAN_KEY, NSA_SELECT_FIXED_PAPER, 0},
        {"attn given indices T=17 b=3 r=2 l=4 n=3", 2, 17, 2, 1, 4, 3, 4, 2, 4, 3,
         NSA_SELECT_MEAN_KEY, NSA_SELECT_FIXED_NONE, 1},
        {"attn T=3 below every block size (no compressed token)", 2, 3, 2, 2, 4, 4, 8, 2, 4, 2,
         NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_NONE, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        check_attn_op(&cases[i], 51 + i);
    test_done();
}

// ----------------------------------------------------------------------------------------
// The public op (SPEC §6): nsa_attention_backward against ref_attention (mean compression)

typedef struct dims_public {
    nsa_attention_desc desc;
    const int32_t *idx;
} dims_public;

static void public64(const problem *p, double *out)
{
    const dims_public *dm = p->dims;
    if (ref_attention(&dm->desc, p->x[0], p->x[1], p->x[2], p->x[3], dm->idx, out, NULL, NULL))
        for (size_t i = 0; i < p->nout; i++)
            out[i] = NAN;
}

static void check_public(const attn_case *c, uint64_t seed)
{
    dims_public dm;
    dm.desc = attn_desc(c);
    const size_t nq = (size_t)c->B * c->T * c->H * c->d, nkv = (size_t)c->B * c->T * c->G * c->d;
    const size_t ng = (size_t)c->B * c->T * c->H * 3, nidx = (size_t)c->B * c->T * c->G * c->n;
    problem p;
    problem_init(&p, c->what, seed, public64, &dm);
    int iq = problem_input(&p, "q", nq, -1.5, 1.5);
    int ik = problem_input(&p, "k", nkv, -1.5, 1.5);
    int iv = problem_input(&p, "v", nkv, -1, 1);
    int igt = problem_input(&p, "gates", ng, 0.05, 1);
    problem_output(&p, nq);
    int32_t *given = NULL, *used = ialloc(nidx);
    if (c->given) {
        given = ialloc(nidx);
        random_indices(&p.rng, given, c->B, c->T, c->G, c->n, c->b);
    }
    float *out = falloc(nq);
    test_poison(out, nq);
    OK(nsa_attention_forward(ctx, &dm.desc, p.f[iq], p.f[ik], p.f[iv], p.f[igt], given, out,
                             used));
    // the reference gets the selection the library used (the given one, or its own)
    dm.idx = given ? given : used;
    problem_forward_check(&p, out);
    float *dq = falloc(nq), *dk = falloc(nkv), *dv = falloc(nkv), *dg = falloc(ng);
    test_poison(dq, nq);
    test_poison(dk, nkv);
    test_poison(dv, nkv);
    test_poison(dg, ng);
    OK(nsa_attention_backward(ctx, &dm.desc, p.f[iq], p.f[ik], p.f[iv], p.f[igt], given, p.Rf, dq,
                              dk, dv, dg));
    const float *grads[] = {dq, dk, dv, dg};
    problem_check(&p, grads, 1.0);
}

static void test_attention_public(void)
{
    worst_reset();
    const attn_case cases[] = {
        {"nsa_attention_backward given indices GQA T=23 b=4 r=2 l=4 w=5 n=3", 2, 23, 4, 2, 4, 4,
         5, 2, 4, 3, NSA_SELECT_MEAN_KEY, NSA_SELECT_FIXED_NONE, 1},
        {"nsa_attention_backward own selection cmp_attn paper T=21 b=4 r=2 l=6 n=4", 1, 21, 2, 1,
         4, 4, 6, 2, 6, 4, NSA_SELECT_CMP_ATTN, NSA_SELECT_FIXED_PAPER, 0},
        {"nsa_attention_backward own selection mean_key T=19 b=3 r=3 l=3 n=2", 2, 19, 2, 2, 3, 3,
         4, 3, 3, 2, NSA_SELECT_MEAN_KEY, NSA_SELECT_FIXED_NONE, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        check_public(&cases[i], 61 + i);
    test_done();
}

// ----------------------------------------------------------------------------------------
// The whole model against ref_model_forward / ref_lm_forward

typedef struct model_fixture {
    nsa_model *model;
    nsa_config cfg;
    size_t n, nt;           // buffer floats, tensors
    float *params;          // as set in the model
    double *pd;             // the same in float64 (finite differences perturb these)
    nsa_tensor_info *info;  // [nt]
    ref_tensor *tensors;    // [nt + num_layers]: + static gates for a gate override
    ref_params table;
    double *forced_gates;   // [num_layers * 3] window-only gate logits (see test_gate_override)
} model_fixture;

// Creates and initialises the model, perturbs every parameter (so biases, norms, gates
// and compression parameters are not trivial) and builds the reference's table.
static int fixture_open(model_fixture *f, const nsa_config *cfg, uint64_t seed)
{
    memset(f, 0, sizeof *f);
    f->cfg = *cfg;
    if (nsa_model_create(&f->model, ctx, cfg) != NSA_OK) {
        CHECKF(0, "nsa_model_create: %s", nsa_last_error());
        f->model = NULL;
        return 0;
    }
    OK(nsa_model_init(f->model, seed));
    f->n = nsa_model_buffer_size(f->model);
    f->nt = nsa_model_num_tensors(f->model);
    f->params = falloc(f->n);
    f->info = talloc(f->nt * sizeof *f->info);
    f->tensors = talloc((f->nt + (size_t)cfg->num_layers) * sizeof *f->tensors);
    f->forced_gates = dalloc((size_t)cfg->num_layers * 3);
    OK(nsa_model_get_params(f->model, f->params));
    test_rng rng = {seed * 31 + 7};
    for (size_t i = 0; i < f->nt; i++) {
        OK(nsa_model_tensor(f->model, i, &f->info[i]));
        size_t len = strlen(f->info[i].name);
        double noise = len >= 5 && !strcmp(f->info[i].name + len - 5, ".gate") ? 0.7 : 0.1;
        for (size_t j = 0; j < f->info[i].numel; j++)
            f->params[f->info[i].offset + j] += (float)(noise * test_rng_uniform(&rng));
    }
    OK(nsa_model_set_params(f->model, f->params));
    f->pd = to_double(f->params, f->n);
    for (size_t i = 0; i < f->nt; i++) {
        f->tensors[i].name = f->info[i].name;
        f->tensors[i].data = f->pd + f->info[i].offset;
        f->tensors[i].numel = f->info[i].numel;
    }
    f->table.tensors = f->tensors;
    f->table.count = f->nt;
    return 1;
}

static void fixture_close(model_fixture *f) { nsa_model_free(f->model); }

// Buffer offsets of the parameters to check: one element of every tensor, then `extra`
// more at random. Returns how many (at most cap).
static size_t pick_params(const model_fixture *f, test_rng *rng, size_t extra, size_t *offs,
                          size_t cap)
{
    size_t k = 0;
    for (size_t i = 0; i < f->nt && k < cap; i++)
        offs[k++] = f->info[i].offset + (size_t)(test_rng_next(rng) % f->info[i].numel);
    for (size_t e = 0; e < extra && k < cap; e++) {
        const nsa_tensor_info *t = &f->info[test_rng_next(rng) % f->nt];
        offs[k++] = t->offset + (size_t)(test_rng_next(rng) % t->numel);
    }
    return k;
}

// 1 where the buffer holds a tensor, 0 in the alignment gaps.
static unsigned char *tensor_mask(const model_fixture *f)
{
    unsigned char *mask = talloc(f->n);
    for (size_t i = 0; i < f->nt; i++)
        memset(mask + f->info[i].offset, 1, f->info[i].numel);
    return mask;
}

// Every gradient finite, every gap zero.
static void check_grad_buffer(const char *what, const model_fixture *f, const float *g)
{
    unsigned char *mask = tensor_mask(f);
    size_t bad = 0, gaps = 0;
    for (size_t i = 0; i < f->n; i++) {
        bad += !isfinite(g[i]);
        gaps += !mask[i] && g[i] != 0.0f;
    }
    CHECKF(bad == 0, "%s: %zu gradients are NaN or Inf", what, bad);
    CHECKF(gaps == 0, "%s: %zu alignment-gap entries of the gradient buffer are non-zero", what,
           gaps);
}

// The objective of the reference: model output . R, or the (weighted) LM loss.
typedef struct model_objective {
    const nsa_config *cfg;
    const ref_params *table;
    int B, T;
    int lm, all;
    const double *x;        // model input [B,T,E]
    const double *R;        // [B,D] or [B,T,D]
    const int32_t *tokens;  // lm
    const float *weights;   // lm, [B,T] or NULL
    double *out, *logits;   // scratch
    double min_margin;      // over every evaluation
    int failed;
} model_objective;

static double weighted_lm_loss(const model_objective *o, const double *logits)
{
    const int B = o->B, T = o->T, V = o->cfg->vocab_size;
    double total = 0.0, wsum = 0.0;
    for (int b = 0; b < B; b++)
        for (int t = 0; t + 1 < T; t++) {
            size_t row = (size_t)b * T + t;
            const double *z = logits + row * V;
            double mx = z[0], s = 0.0;
            for (int i = 1; i < V; i++)
                mx = fmax(mx, z[i]);
            for (int i = 0; i < V; i++)
                s += exp(z[i] - mx);
            double w = o->weights ? o->weights[row] : 1.0;
            total += w * (mx + log(s) - z[o->tokens[row + 1]]);
            wsum += w;
        }
    return total / wsum;
}

static double model_objective_eval(void *user)
{
    model_objective *o = user;
    ref_attn_stats stats = {INFINITY};
    double value = 0.0;
    if (o->lm) {
        if (ref_lm_forward(o->cfg, o->table, o->tokens, o->B, o->T, o->logits, NULL, &stats)) {
            o->failed = 1;
            return NAN;
        }
        value = weighted_lm_loss(o, o->logits);
    } else {
        size_t n = (size_t)o->B * (o->all ? o->T : 1) * o->cfg->hidden_size;
        if (ref_model_forward(o->cfg, o->table, o->x, o->B, o->T, o->all, o->out, &stats)) {
            o->failed = 1;
            return NAN;
        }
        for (size_t i = 0; i < n; i++)
            value += o->out[i] * o->R[i];
    }
    if (stats.min_margin < o->min_margin)
        o->min_margin = stats.min_margin;
    return value;
}

// Analytic gradients at the sampled offsets against mult * finite differences.
static double check_param_sample(const char *what, const char *part, model_fixture *f,
                                 model_objective *o, const float *grads, const size_t *offs,
                                 size_t k, double mult)
{
    double *fd = dalloc(k);
    float *got = falloc(k);
    for (size_t i = 0; i < k; i++) {
        fd[i] = central_diff(&f->pd[offs[i]], model_objective_eval, o);
        got[i] = grads[offs[i]];
    }
    double rel = grad_compare(what, part, got, fd, k, mult);
    if (rel > TOL_GRAD) {
        for (size_t i = 0; i < k; i++) {
            const char *name = "?";
            for (size_t t = 0; t < f->nt; t++)
                if (offs[i] >= f->info[t].offset &&
                    offs[i] < f->info[t].offset + f->info[t].numel)
                    name = f->info[t].name;
            fprintf(stderr, "    %-40s analytic %13.6g  finite diff %13.6g\n", name,
                    (double)got[i], mult * fd[i]);
        }
        fprintf(stderr, "    smallest selection margin of the reference: %.3g\n", o->min_margin);
    }
    return rel;
}

// nsa_model_forward (NSA_FWD_KEEP, last position and all positions) + nsa_model_backward
// with dx, against finite differences of ref_model_forward.
static void check_model_backward(const char *what, model_fixture *f, int B, int T,
                                 uint64_t seed)
{
    const nsa_config *cfg = &f->cfg;
    const int E = cfg->embed_dim, D = cfg->hidden_size;
    const size_t nx = (size_t)B * T * E, nall = (size_t)B * T * D;
    test_rng rng = {seed};
    float *x = falloc(nx), *out = falloc(nall), *Rf = falloc(nall), *dx = falloc(nx);
    float *g = falloc(f->n);
    test_fill(&rng, x, nx, 1.0);
    double *x64 = to_double(x, nx), *ref = dalloc(nall), *fdx = dalloc(nx);
    size_t offs[128];
    for (int all = 0; all < 2; all++) {
        char label[200];
        snprintf(label, sizeof label, "%s, model %s", what, all ? "all positions" : "last position");
        size_t nout = all ? nall : (size_t)B * D;
        test_fill(&rng, Rf, nout, 1.0);
        double *R = to_double(Rf, nout);
        model_objective o = {cfg, &f->table, B, T, 0, all, x64, R, NULL, NULL, ref, NULL,
                             INFINITY, 0};
        OK(nsa_model_zero_grads(f->model));
        test_poison(out, nall);
        OK(nsa_model_forward(f->model, x, B, T, NSA_FWD_KEEP | (all ? NSA_FWD_ALL_POSITIONS : 0u),
                             out));
        CHECK(ref_model_forward(cfg, &f->table, x64, B, T, all, ref, NULL) == 0);
        forward_compare(label, "forward", out, ref, nout, 1e-4);
        test_poison(dx, nx);
        OK(nsa_model_backward(f->model, Rf, dx));
        OK(nsa_model_get_grads(f->model, g));
        check_grad_buffer(label, f, g);
        size_t k = pick_params(f, &rng, 16, offs, 128);
        check_param_sample(label, "parameters (sample)", f, &o, g, offs, k, 1.0);
        for (size_t i = 0; i < nx; i++)
            fdx[i] = central_diff(&x64[i], model_objective_eval, &o);
        grad_compare(label, "dx", dx, fdx, nx, 1.0);
        CHECKF(!o.failed, "%s: the reference failed", label);
    }
}

static void random_tokens(test_rng *rng, int32_t *tokens, size_t n, int V)
{
    for (size_t i = 0; i < n; i++)
        tokens[i] = (int32_t)(test_rng_next(rng) % (uint64_t)V);
}

// nsa_lm_forward[_weighted] (NSA_FWD_KEEP) + nsa_lm_backward(scale) against finite
// differences of the (weighted) loss of ref_lm_forward's logits.
static void check_lm_backward(const char *what, model_fixture *f, int B, int T, int weighted,
                              float scale, uint64_t seed)
{
    const nsa_config *cfg = &f->cfg;
    const int V = cfg->vocab_size;
    const size_t M = (size_t)B * T;
    test_rng rng = {seed};
    char label[200];
    snprintf(label, sizeof label, "%s, lm%s scale %g", what, weighted ? " weighted" : "",
             (double)scale);
    int32_t *tokens = ialloc(M);
    float *weights = weighted ? falloc(M) : NULL, *g = falloc(f->n), *logits = falloc(M * V);
    double *ref_logits = dalloc(M * V);
    random_tokens(&rng, tokens, M, V);
    for (size_t i = 0; weights && i < M; i++)
        weights[i] = (float)uniform_in(&rng, 0.1, 2.0);
    if (weights)
        weights[1] = 0.0f; // a prediction that does not count
    model_objective o = {cfg, &f->table, B, T, 1, 1, NULL, NULL, tokens, weights, NULL,
                         ref_logits, INFINITY, 0};
    OK(nsa_model_zero_grads(f->model));
    float loss = NAN;
    test_poison(logits, M * V);
    if (weighted)
        OK(nsa_lm_forward_weighted(f->model, tokens, weights, B, T, NSA_FWD_KEEP, logits, &loss));
    else
        OK(nsa_lm_forward(f->model, tokens, B, T, NSA_FWD_KEEP, logits, &loss));
    double ref_loss = 0.0, ref_loss_plain = 0.0;
    CHECK(ref_lm_forward(cfg, &f->table, tokens, B, T, ref_logits, &ref_loss_plain, NULL) == 0);
    forward_compare(label, "logits", logits, ref_logits, M * V, 1e-4);
    ref_loss = weighted_lm_loss(&o, ref_logits);
    if (!weighted)
        CHECKF(fabs(ref_loss - ref_loss_plain) <= 1e-12 * fabs(ref_loss_plain),
               "%s: the test's loss %.17g differs from ref_lm_forward's %.17g", label, ref_loss,
               ref_loss_plain);
    forward_compare(label, "loss", &loss, &ref_loss, 1, 1e-5);
    OK(nsa_lm_backward(f->model, scale));
    OK(nsa_model_get_grads(f->model, g));
    check_grad_buffer(label, f, g);
    size_t offs[160];
    size_t k = pick_params(f, &rng, 24, offs, 160);
    check_param_sample(label, "parameters (sample)", f, &o, g, offs, k, scale);
    CHECKF(!o.failed, "%s: the reference failed", label);
}

typedef struct model_case {
    const char *what;
    nsa_config cfg;
    int B, T;
} model_case;

static nsa_config tiny_config(void)
{
    nsa_config c;
    nsa_config_default(&c); // dropout 0.1: NSA_FWD_KEEP must run without it
    c.embed_dim = 6;
    c.hidden_size = 8;
    c.num_heads = 2;
    c.head_dim = 4;
    c.num_layers = 2;
    c.window_size = 4;
    c.block_size = 3;
    c.num_selected_blocks = 2;
    c.compression_ratio = 2;
    c.compression_block = 4;
    c.vocab_size = 7;
    c.seq_len = 13;
    return c;
}

static size_t model_cases(model_case *cases)
{
    size_t n = 0;
    nsa_config c = tiny_config();
    cases[n++] = (model_case){"mean static mean_key E!=D l>r", c, 2, 13};

    c = tiny_config();
    c.embed_dim = 8; // E == D
    c.compress = NSA_COMPRESS_CONV;
    c.gate = NSA_GATE_TOKEN;
    c.select_score = NSA_SELECT_CMP_ATTN;
    c.block_size = 4;
    c.num_heads = 4;
    c.num_kv_heads = 2; // GQA, H*d = 16 != D
    c.rope_theta = 10.0;
    cases[n++] = (model_case){"conv token cmp_attn GQA rope E==D", c, 2, 15};

    c = tiny_config();
    c.embed_dim = 5;
    c.hidden_size = 12;
    c.num_heads = 4;
    c.num_kv_heads = 1;
    c.head_dim = 4;
    c.num_layers = 1;
    c.compress = NSA_COMPRESS_MLP;
    c.compression_block = 6;
    c.gate = NSA_GATE_TOKEN;
    c.select_score = NSA_SELECT_CMP_ATTN;
    c.select_fixed = NSA_SELECT_FIXED_PAPER;
    c.block_size = 4;
    c.num_selected_blocks = 4;
    c.window_size = 5;
    c.rope_theta = 100.0;
    cases[n++] = (model_case){"mlp token cmp_attn paper rope G=1 E!=D", c, 1, 21};

    c = tiny_config();
    c.compress = NSA_COMPRESS_MLP;
    c.compression_ratio = 3;
    c.compression_block = 3;
    c.select_fixed = NSA_SELECT_FIXED_PAPER;
    c.num_selected_blocks = 3;
    c.block_size = 2;
    c.head_dim = 3;
    c.num_heads = 3; // H*d = 9 != D
    cases[n++] = (model_case){"mlp static mean_key paper l=r=3 d=3", c, 2, 11};

    c = tiny_config();
    c.compress = NSA_COMPRESS_MLP;
    c.block_size = 8;
    c.compression_block = 8;
    c.compression_ratio = 4;
    c.window_size = 16;
    c.gate = NSA_GATE_TOKEN;
    cases[n++] = (model_case){"T=3 below every block size (mlp, no compressed token)", c, 2, 3};
    return n;
}

static void test_model_backward(void)
{
    worst_reset();
    model_case cases[8];
    size_t n = model_cases(cases);
    for (size_t i = 0; i < n; i++) {
        model_fixture f;
        if (!fixture_open(&f, &cases[i].cfg, 100 + i))
            continue;
        check_model_backward(cases[i].what, &f, cases[i].B, cases[i].T, 200 + i);
        fixture_close(&f);
    }
    test_done();
}

static void test_lm_backward(void)
{
    worst_reset();
    model_case cases[8];
    size_t n = model_cases(cases);
    for (size_t i = 0; i < n; i++) {
        model_fixture f;
        if (!fixture_open(&f, &cases[i].cfg, 300 + i))
            continue;
        int T = cases[i].T;
        check_lm_backward(cases[i].what, &f, cases[i].B, T, 0, 1.0f, 400 + i);
        check_lm_backward(cases[i].what, &f, cases[i].B, T, 1, 0.25f, 500 + i);
        fixture_close(&f);
    }
    test_done();
}

// The gradient buffer: backward adds (+=), nsa_model_zero_grads clears.
static void test_grad_accumulation(void)
{
    worst_reset();
    model_case cases[8];
    model_cases(cases);
    const model_case *c = &cases[1];
    model_fixture f;
    if (!fixture_open(&f, &c->cfg, 600))
        return;
    const int B = c->B, T = c->T, E = c->cfg.embed_dim, D = c->cfg.hidden_size;
    const size_t M = (size_t)B * T;
    test_rng rng = {601};
    float *g1 = falloc(f.n), *g2 = falloc(f.n), *x = falloc(M * E), *R = falloc(M * D);
    float *dx1 = falloc(M * E), *dx2 = falloc(M * E), *out = falloc(M * D);
    int32_t *tokens = ialloc(M);
    random_tokens(&rng, tokens, M, c->cfg.vocab_size);
    test_fill(&rng, x, M * E, 1.0);
    test_fill(&rng, R, M * D, 1.0);
    double *expect = dalloc(f.n);

    // LM: two forward/backward pairs, scales 1 and 0.5, add up to 1.5 times the first
    OK(nsa_model_zero_grads(f.model));
    OK(nsa_lm_forward(f.model, tokens, B, T, NSA_FWD_KEEP, NULL, NULL));
    OK(nsa_lm_backward(f.model, 1.0f));
    OK(nsa_model_get_grads(f.model, g1));
    OK(nsa_lm_forward(f.model, tokens, B, T, NSA_FWD_KEEP, NULL, NULL));
    OK(nsa_lm_backward(f.model, 0.5f));
    OK(nsa_model_get_grads(f.model, g2));
    for (size_t i = 0; i < f.n; i++)
        expect[i] = 1.5 * g1[i];
    forward_compare("lm backward twice (scales 1, 0.5)", "accumulated gradients", g2, expect,
                    f.n, 1e-6);

    // the model: the same backward twice after one forward doubles the buffer
    OK(nsa_model_zero_grads(f.model));
    OK(nsa_model_get_grads(f.model, g2));
    size_t nonzero = 0;
    for (size_t i = 0; i < f.n; i++)
        nonzero += g2[i] != 0.0f;
    CHECKF(nonzero == 0, "nsa_model_zero_grads left %zu non-zero entries", nonzero);
    OK(nsa_model_forward(f.model, x, B, T, NSA_FWD_KEEP | NSA_FWD_ALL_POSITIONS, out));
    OK(nsa_model_backward(f.model, R, dx1));
    OK(nsa_model_get_grads(f.model, g1));
    OK(nsa_model_backward(f.model, R, dx2));
    OK(nsa_model_get_grads(f.model, g2));
    for (size_t i = 0; i < f.n; i++)
        expect[i] = 2.0 * g1[i];
    forward_compare("model backward twice", "accumulated gradients", g2, expect, f.n, 1e-6);
    CHECKF(memcmp(dx1, dx2, sizeof(float) * M * E) == 0, "dx is not overwritten (=)");
    OK(nsa_model_zero_grads(f.model));
    OK(nsa_model_get_grads(f.model, g2));
    nonzero = 0;
    for (size_t i = 0; i < f.n; i++)
        nonzero += g2[i] != 0.0f;
    CHECKF(nonzero == 0, "nsa_model_zero_grads left %zu non-zero entries", nonzero);

    // a backward with no forward that kept activations is refused
    OK(nsa_model_forward(f.model, x, B, T, 0, out));
    CHECK(nsa_model_backward(f.model, R, dx1) != NSA_OK);
    CHECK(nsa_lm_backward(f.model, 1.0f) != NSA_OK);
    fixture_close(&f);
    test_done();
}

// nsa_model_set_gate_override {0, 0, 1}: the sliding window alone. The gate parameters
// get no gradient; the outputs and the other gradients are those of the reference with
// static gate logits (-1e4, -1e4, 0), whose softmax is exactly (0, 0, 1) in float64.
static void check_gate_override(const char *what, const nsa_config *cfg, int B, int T,
                                uint64_t seed)
{
    model_fixture f;
    if (!fixture_open(&f, cfg, seed))
        return;
    const int L = cfg->num_layers, V = cfg->vocab_size;
    const size_t M = (size_t)B * T;
    nsa_config window_cfg = *cfg;
    window_cfg.gate = NSA_GATE_STATIC;
    for (int i = 0; i < L; i++) {
        char *name = talloc(64);
        snprintf(name, 64, "layers.%d.attn.gate", i);
        if (cfg->gate == NSA_GATE_STATIC) { // replace the model's own gate in the table
            for (size_t t = 0; t < f.nt; t++)
                if (!strcmp(f.tensors[t].name, name))
                    f.tensors[t].name = "(overridden gate)";
        }
        f.forced_gates[3 * i + 0] = -1e4;
        f.forced_gates[3 * i + 1] = -1e4;
        f.forced_gates[3 * i + 2] = 0.0;
        f.tensors[f.nt + (size_t)i] = (ref_tensor){name, f.forced_gates + 3 * i, 3};
    }
    ref_params window_table = {f.tensors, f.nt + (size_t)L};

    test_rng rng = {seed + 1};
    int32_t *tokens = ialloc(M);
    random_tokens(&rng, tokens, M, V);
    float *logits = falloc(M * V), *logits_free = falloc(M * V), *g = falloc(f.n);
    double *ref_logits = dalloc(M * V);
    const float window_only[3] = {0.0f, 0.0f, 1.0f};
    OK(nsa_lm_forward(f.model, tokens, B, T, 0, logits_free, NULL));
    OK(nsa_model_set_gate_override(f.model, window_only));
    OK(nsa_model_zero_grads(f.model));
    float loss = NAN;
    OK(nsa_lm_forward(f.model, tokens, B, T, NSA_FWD_KEEP, logits, &loss));
    CHECK(ref_lm_forward(&window_cfg, &window_table, tokens, B, T, ref_logits, NULL, NULL) == 0);
    forward_compare(what, "logits with the window alone", logits, ref_logits, M * V, 1e-5);
    OK(nsa_lm_backward(f.model, 1.0f));
    OK(nsa_model_get_grads(f.model, g));
    check_grad_buffer(what, &f, g);
    size_t gate_grads = 0, gate_params = 0;
    for (size_t t = 0; t < f.nt; t++) {
        const char *name = f.info[t].name;
        if (!strstr(name, ".attn.gate"))
            continue;
        gate_params += f.info[t].numel;
        for (size_t j = 0; j < f.info[t].numel; j++)
            gate_grads += g[f.info[t].offset + j] != 0.0f;
    }
    CHECKF(gate_params > 0 && gate_grads == 0, "%s: %zu of %zu gate parameters got a gradient",
           what, gate_grads, gate_params);
    // the other gradients: those of the window-only reference
    model_objective o = {&window_cfg, &window_table, B, T, 1, 1, NULL, NULL, tokens, NULL, NULL,
                         ref_logits, INFINITY, 0};
    size_t offs[160], k = pick_params(&f, &rng, 24, offs, 160), kept = 0;
    for (size_t i = 0; i < k; i++) { // not the gates: the override replaces them
        int is_gate = 0;
        for (size_t t = 0; t < f.nt; t++)
            if (strstr(f.info[t].name, ".attn.gate") && offs[i] >= f.info[t].offset &&
                offs[i] < f.info[t].offset + f.info[t].numel)
                is_gate = 1;
        if (!is_gate)
            offs[kept++] = offs[i];
    }
    check_param_sample(what, "parameters (sample) with the window alone", &f, &o, g, offs, kept,
                       1.0);
    // removing the override restores the learned gates
    OK(nsa_model_set_gate_override(f.model, NULL));
    OK(nsa_lm_forward(f.model, tokens, B, T, 0, logits, NULL));
    CHECKF(memcmp(logits, logits_free, sizeof(float) * M * V) == 0,
           "%s: the logits after removing the override differ from before it", what);
    fixture_close(&f);
}

static void test_gate_override(void)
{
    worst_reset();
    model_case cases[8];
    model_cases(cases);
    check_gate_override("gate override {0,0,1}, static gate", &cases[0].cfg, 2, 13, 700);
    check_gate_override("gate override {0,0,1}, token gate", &cases[1].cfg, 2, 15, 710);
    test_done();
}

// ----------------------------------------------------------------------------------------

int main(void)
{
    nsa_status st = nsa_context_create(&ctx, NSA_DEVICE_CPU, 0);
    if (st != NSA_OK) {
        printf("FAIL nsa_context_create: %s\n", nsa_last_error());
        harness_failed++;
        return harness_finish();
    }
    ops = ctx->ops;
    RUN(test_linear);
    RUN(test_layernorm);
    RUN(test_gelu);
    RUN(test_dropout);
    RUN(test_rope);
    RUN(test_compress);
    RUN(test_compress_gather);
    RUN(test_gate);
    RUN(test_embedding);
    RUN(test_cross_entropy);
    RUN(test_attn_op);
    RUN(test_attention_public);
    RUN(test_model_backward);
    RUN(test_lm_backward);
    RUN(test_grad_accumulation);
    RUN(test_gate_override);
    nsa_context_free(ctx);
    return harness_finish();
}
