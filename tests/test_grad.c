/*
 * test_grad.c — every backward pass against central finite differences in float64 (the ops
 * and the public attention op here; the whole model in test_grad_model.c).
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
#include "attn_case.h"
#include "grad_util.h"

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
    dm.desc = attn_case_desc(c);
    nsa__attn_dims dims;
    nsa__attn_dims_init(&dims, &dm.desc);
    const size_t nq = (size_t)c->B * c->T * c->H * c->d, nkv = (size_t)c->B * c->T * c->G * c->d;
    const size_t nkvc = (size_t)c->B * dims.num_cmp * c->G * c->d;
    const size_t ng = (size_t)c->B * c->T * c->H * 3, nidx = (size_t)c->B * c->T * c->G * c->n;
    CHECK(dims.num_cmp == ref_num_compressed(c->T, c->r, c->l));
    problem p;
    problem_init(&p, c->name, seed, attn64, &dm);
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
    CHECKF(idx_ok, "%s: the selection holds values outside [-1, num_blocks)", c->name);
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
    dm.desc = attn_case_desc(c);
    const size_t nq = (size_t)c->B * c->T * c->H * c->d, nkv = (size_t)c->B * c->T * c->G * c->d;
    const size_t ng = (size_t)c->B * c->T * c->H * 3, nidx = (size_t)c->B * c->T * c->G * c->n;
    problem p;
    problem_init(&p, c->name, seed, public64, &dm);
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
    nsa_context_free(ctx);
    return harness_finish();
}
