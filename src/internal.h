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

#define NSA_TRY(expr)                  \
    do {                               \
        nsa_status nsa__s_ = (expr);   \
        if (nsa__s_ != NSA_OK)         \
            return nsa__s_;            \
    } while (0)

#endif // NSA_INTERNAL_H
