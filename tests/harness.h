/*
 * harness.h — the tiny test harness every C test program uses.
 *
 * A test program defines test functions `static void test_x(void)` and a main that calls
 * RUN(test_x) for each, then returns harness_finish(). Checks record failures with the
 * file and line and carry on; harness_finish prints "RESULT <passed> <failed>" which
 * tests/run.sh adds up into the closing "N passed, N failed" line.
 *
 * Tolerances are named per dtype in one place (TOL_F32, TOL_F64) and comparisons report
 * the worst element.
 */
#ifndef NSA_TEST_HARNESS_H
#define NSA_TEST_HARNESS_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// float32 implementation against a float64 reference: max |a-r| / max(max|r|, 1e-30)
#define TOL_F32 1e-5
#define TOL_F64 1e-10

static int harness_passed, harness_failed, harness_cur_failed;
static const char *harness_cur_name;

#define CHECK(cond)                                                                    \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "  %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
            harness_cur_failed = 1;                                                    \
        }                                                                              \
    } while (0)

#define CHECKF(cond, ...)                                            \
    do {                                                             \
        if (!(cond)) {                                               \
            fprintf(stderr, "  %s:%d: check failed: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                            \
            fprintf(stderr, "\n");                                   \
            harness_cur_failed = 1;                                  \
        }                                                            \
    } while (0)

#define RUN(fn)                                                         \
    do {                                                                \
        harness_cur_name = #fn;                                         \
        harness_cur_failed = 0;                                         \
        fn();                                                           \
        if (harness_cur_failed) {                                       \
            harness_failed++;                                           \
            printf("FAIL %s\n", #fn);                                   \
        } else {                                                        \
            harness_passed++;                                           \
            printf("ok   %s\n", #fn);                                   \
        }                                                               \
        fflush(stdout);                                                 \
    } while (0)

static inline int harness_finish(void)
{
    printf("RESULT %d %d\n", harness_passed, harness_failed);
    return harness_failed ? 1 : 0;
}

// Seeded generator for test inputs (splitmix64): never zeros by construction of callers.
typedef struct { uint64_t s; } test_rng;
static inline uint64_t test_rng_next(test_rng *r)
{
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
// uniform in [-1, 1)
static inline double test_rng_uniform(test_rng *r)
{
    return (double)(test_rng_next(r) >> 11) * (2.0 / 9007199254740992.0) - 1.0;
}
static inline void test_fill(test_rng *r, float *x, size_t n, double scale)
{
    for (size_t i = 0; i < n; i++)
        x[i] = (float)(scale * test_rng_uniform(r));
}
// Poison: NaN so that unwritten outputs fail comparisons.
static inline void test_poison(float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = NAN;
}

// Relative max-abs error of a float32 result against a float64 reference; prints the
// worst element when over tol. Returns 1 when within tol (NaN never passes).
static inline int harness_compare(const char *what, const float *got, const double *ref, size_t n,
                                  double tol)
{
    double scale = 1e-30, worst = 0.0;
    size_t worst_i = 0;
    for (size_t i = 0; i < n; i++)
        if (fabs(ref[i]) > scale)
            scale = fabs(ref[i]);
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - ref[i]);
        if (!(e <= worst) || isnan(e)) { // NaN propagates to worst
            worst = isnan(e) ? INFINITY : e;
            worst_i = i;
        }
    }
    double rel = worst / scale;
    if (!(rel <= tol)) {
        fprintf(stderr, "  %s: worst rel err %.3g at %zu (got %.9g, ref %.9g, scale %.3g) > %.1g\n",
                what, rel, worst_i, n ? (double)got[worst_i] : 0.0, n ? ref[worst_i] : 0.0, scale,
                tol);
        harness_cur_failed = 1;
        return 0;
    }
    return 1;
}

#endif // NSA_TEST_HARNESS_H
