/*
 * error.c — status strings and the per-thread last-error message.
 */
#include "internal.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static _Thread_local char last_error[1024];

const char *nsa_version(void)
{
    return "0.1.0";
}

const char *nsa_status_str(nsa_status status)
{
    switch (status) {
    case NSA_OK: return "ok";
    case NSA_ERR_INVALID: return "invalid argument";
    case NSA_ERR_SHAPE: return "wrong shape or dtype";
    case NSA_ERR_NUMERIC: return "non-finite value";
    case NSA_ERR_IO: return "i/o error";
    case NSA_ERR_FORMAT: return "bad file format";
    case NSA_ERR_NOMEM: return "out of memory";
    case NSA_ERR_BACKEND: return "device error";
    case NSA_ERR_UNSUPPORTED: return "unsupported";
    case NSA_ERR_INTERRUPTED: return "interrupted";
    }
    return "unknown status";
}

const char *nsa_last_error(void)
{
    return last_error;
}

nsa_status nsa__error(nsa_status status, const char *fmt, ...)
{
    // Format into a temporary first: callers may pass nsa_last_error() itself as an
    // argument (to prefix a lower-level message with context).
    char message[sizeof last_error];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    memcpy(last_error, message, sizeof last_error);
    return status;
}

void nsa__clear_error(void)
{
    last_error[0] = '\0';
}

void *nsa__malloc(size_t bytes, const char *what)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p)
        nsa__error(NSA_ERR_NOMEM, "out of memory allocating %zu bytes for %s", bytes, what);
    return p;
}

void *nsa__calloc(size_t count, size_t size, const char *what)
{
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p)
        nsa__error(NSA_ERR_NOMEM, "out of memory allocating %zu x %zu bytes for %s", count, size,
                   what);
    return p;
}

int nsa__has_nonfinite(const float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i]))
            return 1;
    return 0;
}

size_t nsa__mul_size(size_t a, size_t b)
{
    if (a != 0 && b > SIZE_MAX / a)
        return 0;
    return a * b;
}
