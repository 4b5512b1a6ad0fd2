/*
 * internal.h — helpers shared by the library's source files (not installed).
 * Errors: nsa__error() records a per-thread message and returns the status, so a
 * failing path reads `return nsa__error(NSA_ERR_INVALID, "x = %d: must be >= 1", x);`.
 */
#ifndef NSA_INTERNAL_H
#define NSA_INTERNAL_H

#include "nsa.h"

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define NSA_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define NSA_PRINTF(a, b)
#endif

// Records the message (printf-style) for nsa_last_error() and returns `status`.
nsa_status nsa__error(nsa_status status, const char *fmt, ...) NSA_PRINTF(2, 3);
// Clears the message (called on success paths where a stale message would mislead).
void nsa__clear_error(void);

// Checked allocation: NULL and an NSA_ERR_NOMEM message naming `what` on failure.
void *nsa__malloc(size_t bytes, const char *what);
void *nsa__calloc(size_t count, size_t size, const char *what);

// Returns 1 if any of the n floats is NaN or Inf.
int nsa__has_nonfinite(const float *x, size_t n);

// Size arithmetic that refuses to overflow: 0 on overflow.
size_t nsa__mul_size(size_t a, size_t b);

// Carving one allocation into 64-byte aligned pieces: a first pass with base NULL
// measures (off ends as the total size), a second pass with the allocation assigns.
typedef struct nsa__carver {
    char *base;
    size_t off;
} nsa__carver;

static inline void *nsa__take(nsa__carver *c, size_t bytes)
{
    size_t o = (c->off + 63) & ~(size_t)63;
    c->off = o + bytes;
    return c->base ? c->base + o : NULL;
}

#define NSA_TAKE_F(c, n) ((float *)nsa__take((c), (size_t)(n) * sizeof(float)))

#define NSA_TRY(expr)                  \
    do {                               \
        nsa_status nsa__s_ = (expr);   \
        if (nsa__s_ != NSA_OK)         \
            return nsa__s_;            \
    } while (0)

#endif // NSA_INTERNAL_H
