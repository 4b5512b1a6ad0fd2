/*
 * npy.c — arrays as NumPy .npy files (SPEC §7): the public nsa_npy_load / nsa_npy_save
 * and the nsa_array helpers.
 *
 * The loader reads versions 1.0, 2.0 and 3.0 of little-endian, C-order arrays of
 * '<f4', '<f8', '<i4', '<i8' and '<u2'. The header (a Python dict literal) is parsed
 * strictly, and the data length is checked against the shape before anything is
 * allocated. The saver writes version 1.0 with the data 64-byte aligned, atomically
 * through nsa__atomic_* (safetensors.c).
 */
#include "internal.h"
#include "safetensors.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define NPY_MAX_NDIM 8
#define NPY_MAX_HEADER (1u << 20) // numpy's own headers for these dtypes are < 200 bytes
#define NPY_ALIGN 64

static const char npy_magic[6] = {'\x93', 'N', 'U', 'M', 'P', 'Y'};

static const struct {
    const char *descr;
    nsa_dtype dtype;
} npy_dtypes[] = {
    {"<f4", NSA_DTYPE_F32}, {"<f8", NSA_DTYPE_F64}, {"<i4", NSA_DTYPE_I32},
    {"<i8", NSA_DTYPE_I64}, {"<u2", NSA_DTYPE_U16},
};

// ---------------------------------------------------------------------------------------
// Arrays

size_t nsa_dtype_size(nsa_dtype dtype)
{
    switch (dtype) {
    case NSA_DTYPE_F32: return 4;
    case NSA_DTYPE_F64: return 8;
    case NSA_DTYPE_I32: return 4;
    case NSA_DTYPE_I64: return 8;
    case NSA_DTYPE_U16: return 2;
    case NSA_DTYPE_BF16: return 2;
    }
    return 0;
}

// -1 for a NULL array, a bad ndim, a negative dim or a count that overflows int64.
int64_t nsa_array_numel(const nsa_array *a)
{
    if (!a || a->ndim < 0 || a->ndim > NPY_MAX_NDIM)
        return -1;
    int64_t n = 1;
    for (int i = 0; i < a->ndim; i++) {
        if (a->shape[i] < 0)
            return -1;
        if (a->shape[i] != 0 && n > INT64_MAX / a->shape[i])
            return -1;
        n *= a->shape[i];
    }
    return n;
}

void nsa_array_free(nsa_array *a)
{
    if (!a)
        return;
    free(a->data);
    a->data = NULL;
}

// ---------------------------------------------------------------------------------------
// Header parsing: {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }

typedef struct npy_parser {
    const char *path;
    const char *s;
    size_t n, pos;
} npy_parser;

static nsa_status npy_bad(npy_parser *p, const char *what)
{
    if (p->pos >= p->n)
        return nsa__error(NSA_ERR_FORMAT, "%s: .npy header is truncated (expected %s)", p->path,
                          what);
    return nsa__error(NSA_ERR_FORMAT, "%s: .npy header: expected %s at byte %zu", p->path, what,
                      p->pos);
}

static int npy_peek(npy_parser *p)
{
    while (p->pos < p->n && (p->s[p->pos] == ' ' || p->s[p->pos] == '\t'))
        p->pos++;
    return p->pos < p->n ? (unsigned char)p->s[p->pos] : -1;
}

// A Python string literal in ' or " quotes, without escapes, copied into buf.
static nsa_status npy_string(npy_parser *p, char *buf, size_t size, const char *what)
{
    int q = npy_peek(p);
    if (q != '\'' && q != '"')
        return npy_bad(p, what);
    size_t start = ++p->pos;
    while (p->pos < p->n && p->s[p->pos] != q) {
        if (p->s[p->pos] == '\\' || (unsigned char)p->s[p->pos] < 0x20)
            return npy_bad(p, "a plain string");
        p->pos++;
    }
    if (p->pos >= p->n)
        return npy_bad(p, "a closing quote");
    size_t len = p->pos - start;
    p->pos++;
    if (len >= size) // longer than any name or descr this reader knows: keep a prefix
        len = size - 1;
    memcpy(buf, p->s + start, len);
    buf[len] = '\0';
    return NSA_OK;
}

// (), (5,), (2, 3) or (2, 3,): a tuple of non-negative decimal integers.
static nsa_status npy_shape(npy_parser *p, int *ndim, int64_t *shape)
{
    if (npy_peek(p) != '(')
        return nsa__error(NSA_ERR_FORMAT, "%s: .npy header: 'shape' must be a tuple", p->path);
    p->pos++;
    *ndim = 0;
    int trailing_comma = 0;
    for (;;) {
        int c = npy_peek(p);
        if (c == ')') {
            p->pos++;
            break;
        }
        if (*ndim > 0 && !trailing_comma)
            return npy_bad(p, "',' or ')' in the shape");
        if (c < '0' || c > '9') {
            if (c == '-')
                return nsa__error(NSA_ERR_FORMAT, "%s: .npy header: shape has a negative dim",
                                  p->path);
            return npy_bad(p, "a dim or ')' in the shape");
        }
        if (*ndim == NPY_MAX_NDIM)
            return nsa__error(NSA_ERR_FORMAT, "%s: .npy header: shape has more than %d dims",
                              p->path, NPY_MAX_NDIM);
        int64_t v = 0;
        while (p->pos < p->n && p->s[p->pos] >= '0' && p->s[p->pos] <= '9') {
            int d = p->s[p->pos] - '0';
            if (v > (INT64_MAX - d) / 10)
                return nsa__error(NSA_ERR_FORMAT, "%s: .npy header: shape dim overflows int64",
                                  p->path);
            v = v * 10 + d;
            p->pos++;
        }
        shape[(*ndim)++] = v;
        trailing_comma = 0;
        if (npy_peek(p) == ',') {
            p->pos++;
            trailing_comma = 1;
        }
    }
    if (*ndim == 1 && !trailing_comma)
        return nsa__error(NSA_ERR_FORMAT, "%s: .npy header: shape (%lld) is not a tuple (needs a "
                          "trailing comma)", p->path, (long long)shape[0]);
    return NSA_OK;
}

static int npy_word(npy_parser *p, const char *word)
{
    size_t len = strlen(word);
    if (p->n - p->pos >= len && memcmp(p->s + p->pos, word, len) == 0) {
        p->pos += len;
        return 1;
    }
    return 0;
}

static nsa_status npy_parse_header(npy_parser *p, nsa_dtype *dtype, int *ndim, int64_t *shape)
{
    int have_descr = 0, have_order = 0, have_shape = 0;
    if (npy_peek(p) != '{')
        return npy_bad(p, "'{'");
    p->pos++;
    for (;;) {
        int c = npy_peek(p);
        if (c == '}') {
            p->pos++;
            break;
        }
        char key[32];
        NSA_TRY(npy_string(p, key, sizeof key, "a key or '}'"));
        if (npy_peek(p) != ':')
            return npy_bad(p, "':'");
        p->pos++;
        int *seen = strcmp(key, "descr") == 0           ? &have_descr
                    : strcmp(key, "fortran_order") == 0 ? &have_order
                    : strcmp(key, "shape") == 0         ? &have_shape
                                                        : NULL;
        if (!seen)
            return nsa__error(NSA_ERR_FORMAT, "%s: .npy header: unknown key '%s'", p->path, key);
        if (*seen)
            return nsa__error(NSA_ERR_FORMAT, "%s: .npy header: duplicate key '%s'", p->path, key);
        *seen = 1;
        if (seen == &have_descr) {
            char descr[32];
            if (npy_peek(p) != '\'' && npy_peek(p) != '"')
                return nsa__error(NSA_ERR_FORMAT,
                                  "%s: .npy header: 'descr' must be a string (structured dtypes "
                                  "are not supported)", p->path);
            NSA_TRY(npy_string(p, descr, sizeof descr, "the descr string"));
            int found = 0;
            for (size_t i = 0; i < sizeof npy_dtypes / sizeof npy_dtypes[0]; i++)
                if (strcmp(descr, npy_dtypes[i].descr) == 0) {
                    *dtype = npy_dtypes[i].dtype;
                    found = 1;
                }
            if (!found && descr[0] == '>')
                return nsa__error(NSA_ERR_FORMAT,
                                  "%s: .npy dtype '%s' is big-endian: only little-endian arrays "
                                  "are supported", p->path, descr);
            if (!found)
                return nsa__error(NSA_ERR_FORMAT,
                                  "%s: unsupported .npy dtype '%s' (expected '<f4', '<f8', '<i4', "
                                  "'<i8' or '<u2')", p->path, descr);
        } else if (seen == &have_order) {
            npy_peek(p);
            if (npy_word(p, "True"))
                return nsa__error(NSA_ERR_FORMAT,
                                  "%s: .npy array is fortran_order: only C order is supported",
                                  p->path);
            if (!npy_word(p, "False"))
                return npy_bad(p, "True or False for 'fortran_order'");
        } else {
            NSA_TRY(npy_shape(p, ndim, shape));
        }
        c = npy_peek(p);
        if (c == ',') {
            p->pos++;
            continue;
        }
        if (c != '}')
            return npy_bad(p, "',' or '}'");
    }
    if (npy_peek(p) != -1) // only space padding may follow the dict
        return nsa__error(NSA_ERR_FORMAT, "%s: .npy header: unexpected data after the dict at byte "
                          "%zu", p->path, p->pos);
    const char *missing = !have_descr ? "descr" : !have_order ? "fortran_order"
                          : !have_shape ? "shape" : NULL;
    if (missing)
        return nsa__error(NSA_ERR_FORMAT, "%s: .npy header is missing '%s'", p->path, missing);
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// Loading

static nsa_status npy_read(FILE *fp, void *dst, size_t n, const char *path, const char *what)
{
    if (n && fread(dst, 1, n, fp) != n) {
        if (ferror(fp))
            return nsa__error(NSA_ERR_IO, "%s: cannot read %s: %s", path, what, strerror(errno));
        return nsa__error(NSA_ERR_FORMAT, "%s: .npy file is truncated (reading %s)", path, what);
    }
    return NSA_OK;
}

static nsa_status npy_load(FILE *fp, const char *path, nsa_array *out)
{
    struct stat st;
    if (fstat(fileno(fp), &st) != 0)
        return nsa__error(NSA_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode))
        return nsa__error(NSA_ERR_IO, "%s: not a regular file", path);
    uint64_t file_size = (uint64_t)st.st_size;

    unsigned char pre[12];
    if (file_size < 10)
        return nsa__error(NSA_ERR_FORMAT, "%s: not a .npy file (only %llu bytes)", path,
                          (unsigned long long)file_size);
    NSA_TRY(npy_read(fp, pre, 8, path, "the magic string"));
    if (memcmp(pre, npy_magic, sizeof npy_magic) != 0)
        return nsa__error(NSA_ERR_FORMAT, "%s: not a .npy file (bad magic string)", path);
    int major = pre[6], minor = pre[7];
    if (major < 1 || major > 3 || minor != 0)
        return nsa__error(NSA_ERR_FORMAT, "%s: unsupported .npy version %d.%d", path, major,
                          minor);
    size_t len_size = major == 1 ? 2 : 4;
    NSA_TRY(npy_read(fp, pre + 8, len_size, path, "the header length"));
    uint64_t header_len = 0;
    for (size_t i = len_size; i-- > 0;)
        header_len = header_len << 8 | pre[8 + i];
    uint64_t data_start = 8 + len_size + header_len;
    if (header_len == 0 || header_len > NPY_MAX_HEADER)
        return nsa__error(NSA_ERR_FORMAT, "%s: .npy header length %llu is absurd", path,
                          (unsigned long long)header_len);
    if (data_start > file_size)
        return nsa__error(NSA_ERR_FORMAT,
                          "%s: .npy header length %llu is larger than the file (%llu bytes; "
                          "truncated?)", path, (unsigned long long)header_len,
                          (unsigned long long)file_size);

    char *header = nsa__malloc((size_t)header_len, "the .npy header");
    if (!header)
        return NSA_ERR_NOMEM;
    nsa_status s = npy_read(fp, header, (size_t)header_len, path, "the header");
    nsa_dtype dtype = NSA_DTYPE_F32;
    int ndim = 0;
    int64_t shape[NPY_MAX_NDIM] = {0};
    if (s == NSA_OK && header[header_len - 1] != '\n')
        s = nsa__error(NSA_ERR_FORMAT, "%s: .npy header does not end with a newline", path);
    if (s == NSA_OK) {
        npy_parser p = {path, header, (size_t)header_len - 1, 0};
        s = npy_parse_header(&p, &dtype, &ndim, shape);
    }
    free(header);
    NSA_TRY(s);

    // bytes = numel * size without overflow; it must be exactly what the file holds.
    uint64_t elem = nsa_dtype_size(dtype), bytes = elem;
    for (int i = 0; i < ndim; i++) {
        uint64_t dim = (uint64_t)shape[i];
        if (dim != 0 && bytes > UINT64_MAX / dim)
            return nsa__error(NSA_ERR_FORMAT, "%s: .npy shape overflows its size in bytes", path);
        bytes *= dim;
    }
    uint64_t have = file_size - data_start;
    if (have != bytes)
        return nsa__error(NSA_ERR_FORMAT,
                          "%s: .npy data is %llu bytes but the shape needs %llu (%s)", path,
                          (unsigned long long)have, (unsigned long long)bytes,
                          have < bytes ? "truncated" : "trailing bytes");
    if (bytes > SIZE_MAX || bytes / elem > (uint64_t)INT64_MAX)
        return nsa__error(NSA_ERR_FORMAT, "%s: .npy array is too large", path);

    void *data = nsa__malloc((size_t)bytes, "the .npy data");
    if (!data)
        return NSA_ERR_NOMEM;
    s = npy_read(fp, data, (size_t)bytes, path, "the data");
    if (s != NSA_OK) {
        free(data);
        return s;
    }
    out->dtype = dtype;
    out->ndim = ndim;
    memcpy(out->shape, shape, sizeof shape);
    out->data = data;
    return NSA_OK;
}

nsa_status nsa_npy_load(const char *path, nsa_array *out)
{
    if (!out)
        return nsa__error(NSA_ERR_INVALID, "nsa_npy_load: out is NULL");
    memset(out, 0, sizeof *out);
    if (!path)
        return nsa__error(NSA_ERR_INVALID, "nsa_npy_load: path is NULL");
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return nsa__error(NSA_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    nsa_status s = npy_load(fp, path, out);
    fclose(fp);
    return s;
}

// ---------------------------------------------------------------------------------------
// Saving

nsa_status nsa_npy_save(const char *path, const nsa_array *a)
{
    if (!path || !*path)
        return nsa__error(NSA_ERR_INVALID, "nsa_npy_save: path is empty");
    if (!a)
        return nsa__error(NSA_ERR_INVALID, "%s: array is NULL", path);
    const char *descr = NULL;
    for (size_t i = 0; i < sizeof npy_dtypes / sizeof npy_dtypes[0]; i++)
        if (npy_dtypes[i].dtype == a->dtype)
            descr = npy_dtypes[i].descr;
    if (!descr)
        return nsa__error(NSA_ERR_INVALID, "%s: dtype %s has no .npy equivalent", path,
                          a->dtype == NSA_DTYPE_BF16 ? "bf16" : "(unknown)");
    if (a->ndim < 0 || a->ndim > NPY_MAX_NDIM)
        return nsa__error(NSA_ERR_INVALID, "%s: ndim = %d: must be 0..%d", path, a->ndim,
                          NPY_MAX_NDIM);
    int64_t numel = nsa_array_numel(a);
    if (numel < 0)
        return nsa__error(NSA_ERR_INVALID, "%s: shape has a negative dim or overflows", path);
    size_t bytes = nsa__mul_size((size_t)numel, nsa_dtype_size(a->dtype));
    if (numel > 0 && bytes == 0)
        return nsa__error(NSA_ERR_INVALID, "%s: array size overflows", path);
    if (numel > 0 && !a->data)
        return nsa__error(NSA_ERR_INVALID, "%s: array data is NULL", path);

    // Header: the dict, then spaces and '\n' so the data starts at a multiple of 64.
    char header[512];
    int len = snprintf(header, sizeof header, "{'descr': '%s', 'fortran_order': False, 'shape': (",
                       descr);
    for (int i = 0; i < a->ndim; i++)
        len += snprintf(header + len, sizeof header - (size_t)len, "%s%lld", i ? ", " : "",
                        (long long)a->shape[i]);
    len += snprintf(header + len, sizeof header - (size_t)len, "%s), }",
                    a->ndim == 1 ? "," : "");
    size_t total = 10 + (size_t)len + 1; // magic, version, length, dict, '\n'
    size_t padded = (total + NPY_ALIGN - 1) / NPY_ALIGN * NPY_ALIGN;
    memset(header + len, ' ', padded - total);
    size_t header_len = (size_t)len + (padded - total) + 1;
    header[header_len - 1] = '\n';

    unsigned char pre[10];
    memcpy(pre, npy_magic, sizeof npy_magic);
    pre[6] = 1;
    pre[7] = 0;
    pre[8] = (unsigned char)(header_len & 0xFF);
    pre[9] = (unsigned char)(header_len >> 8);

    nsa__atomic_file af;
    NSA_TRY(nsa__atomic_open(&af, path));
    FILE *fp = af.fp;
    int ok = fwrite(pre, 1, sizeof pre, fp) == sizeof pre &&
             fwrite(header, 1, header_len, fp) == header_len &&
             (bytes == 0 || fwrite(a->data, 1, bytes, fp) == bytes);
    if (!ok) {
        int err = errno;
        nsa__atomic_abort(&af);
        return nsa__error(NSA_ERR_IO, "%s: cannot write: %s", path, strerror(err));
    }
    return nsa__atomic_commit(&af);
}
