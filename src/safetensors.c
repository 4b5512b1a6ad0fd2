/*
 * safetensors.c — the checkpoint file format (SPEC §7): a strict reader and an atomic
 * F32 writer for safetensors files, plus the atomic-file helper shared with npy.c.
 *
 * The reader trusts nothing in the file: the header length is checked against the file
 * size, the JSON header is parsed by a small hand-written parser (depth-limited, with
 * full string escapes), and every tensor's dtype, shape and offsets are validated before
 * any data is read. Tensor data stays on disk and is read lazily by nsa__st_read_f32.
 * Little-endian host assumed (the format is little-endian).
 */
#include "safetensors.h"

#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define ST_MAX_HEADER 100000000u // bytes; the official implementation's limit
#define ST_MAX_DEPTH 64          // nesting allowed inside values this reader ignores
#define ST_MAX_NDIM 8
#define ST_NAME "%.128s" // hostile names are cut so the message still says what is wrong

typedef struct st_entry {
    const char *name;
    int index;
} st_entry;

typedef struct st_meta {
    char *key, *value;
} st_meta;

struct nsa__st_file {
    char *path;
    FILE *fp;
    uint64_t data_start; // file offset of the data section
    uint64_t data_size;
    nsa__st_tensor *tensors; // in file order
    int num_tensors;
    st_meta *meta; // in file order
    int num_meta;
    st_entry *sorted, *meta_sorted; // names sorted, for lookups
};

static const struct {
    const char *name;
    nsa_dtype dtype;
} st_dtypes[] = {
    {"F32", NSA_DTYPE_F32}, {"F64", NSA_DTYPE_F64}, {"BF16", NSA_DTYPE_BF16},
    {"I32", NSA_DTYPE_I32}, {"I64", NSA_DTYPE_I64}, {"U16", NSA_DTYPE_U16},
};

// Dtypes that safetensors defines but this library does not read.
static const char *const st_other_dtypes[] = {"F16", "F8_E4M3", "F8_E5M2", "I8", "U8",
                                              "I16", "U32",     "U64",     "BOOL"};

static const char *st_dtype_name(nsa_dtype dtype)
{
    for (size_t i = 0; i < sizeof st_dtypes / sizeof st_dtypes[0]; i++)
        if (st_dtypes[i].dtype == dtype)
            return st_dtypes[i].name;
    return "?";
}

// Formats a shape as "[2, 3]" into buf.
static const char *st_shape_str(char *buf, size_t size, int ndim, const int64_t *shape)
{
    size_t len = (size_t)snprintf(buf, size, "[");
    for (int i = 0; i < ndim && len < size; i++)
        len += (size_t)snprintf(buf + len, size - len, "%s%lld", i ? ", " : "",
                                (long long)shape[i]);
    if (len < size)
        snprintf(buf + len, size - len, "]");
    return buf;
}

static char *st_strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = malloc(n);
    if (p)
        memcpy(p, s, n);
    return p;
}

static int st_cmp_entry(const void *a, const void *b)
{
    return strcmp(((const st_entry *)a)->name, ((const st_entry *)b)->name);
}

// Sorts a table of n names; returns the index of a duplicate name or -1.
static int st_sort(st_entry *e, int n)
{
    qsort(e, (size_t)n, sizeof *e, st_cmp_entry);
    for (int i = 1; i < n; i++)
        if (strcmp(e[i - 1].name, e[i].name) == 0)
            return e[i].index > e[i - 1].index ? e[i].index : e[i - 1].index;
    return -1;
}

// Binary search of a sorted table; -1 if absent.
static int st_lookup(const st_entry *e, int n, const char *key)
{
    int lo = 0, hi = n - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(key, e[mid].name);
        if (c == 0)
            return e[mid].index;
        if (c < 0)
            hi = mid - 1;
        else
            lo = mid + 1;
    }
    return -1;
}

// ---------------------------------------------------------------------------------------
// JSON parsing

typedef struct st_parser {
    const char *path;
    const char *s; // the header bytes (not NUL-terminated)
    size_t n, pos;
    nsa__st_file *f;
    size_t tensors_cap, meta_cap;
} st_parser;

static nsa_status st_syntax(st_parser *p, const char *what)
{
    if (p->pos >= p->n)
        return nsa__error(NSA_ERR_FORMAT, "%s: header JSON is truncated (expected %s)", p->path,
                          what);
    return nsa__error(NSA_ERR_FORMAT, "%s: header JSON: expected %s at byte %zu", p->path, what,
                      p->pos);
}

static int st_peek(st_parser *p)
{
    while (p->pos < p->n && (p->s[p->pos] == ' ' || p->s[p->pos] == '\t' ||
                             p->s[p->pos] == '\n' || p->s[p->pos] == '\r'))
        p->pos++;
    return p->pos < p->n ? (unsigned char)p->s[p->pos] : -1;
}

static int st_digit(const st_parser *p)
{
    return p->pos < p->n && p->s[p->pos] >= '0' && p->s[p->pos] <= '9';
}

// Consumes the opening bracket (already peeked); 1 if the container is empty (its `close`
// consumed too).
static int st_begin(st_parser *p, char close)
{
    p->pos++;
    if (st_peek(p) != (unsigned char)close)
        return 0;
    p->pos++;
    return 1;
}

// After an element: 1 after ',' (another follows), 0 after `close`, -1 (error recorded).
static int st_more(st_parser *p, char close)
{
    int c = st_peek(p);
    if (c == ',' || c == (unsigned char)close) {
        p->pos++;
        return c == ',';
    }
    st_syntax(p, close == '}' ? "',' or '}'" : "',' or ']'");
    return -1;
}

static int st_hex4(const char *s, unsigned *out)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
              : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0)
            return 0;
        v = v << 4 | (unsigned)d;
    }
    *out = v;
    return 1;
}

// The character a JSON escape "\\c" stands for; 0 if c is not a one-character escape.
static char st_unescape(char c)
{
    switch (c) {
    case '"': return '"';
    case '\\': return '\\';
    case '/': return '/';
    case 'b': return '\b';
    case 'f': return '\f';
    case 'n': return '\n';
    case 'r': return '\r';
    case 't': return '\t';
    }
    return 0;
}

static size_t st_utf8_put(char *dst, unsigned cp)
{
    if (cp < 0x80) {
        dst[0] = (char)cp;
        return 1;
    }
    size_t n = cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
    static const unsigned char lead[5] = {0, 0, 0xC0, 0xE0, 0xF0};
    for (size_t i = n - 1; i > 0; i--, cp >>= 6)
        dst[i] = (char)(0x80 | (cp & 0x3F));
    dst[0] = (char)(lead[n] | cp);
    return n;
}

// Parses a JSON string at the cursor into a new NUL-terminated UTF-8 string (*out), or
// just validates it when out is NULL. Decoded text is never longer than the raw text,
// so the buffer is sized by a first scan for the closing quote.
static nsa_status st_string(st_parser *p, char **out)
{
    if (st_peek(p) != '"')
        return st_syntax(p, "a string");
    const char *s = p->s;
    size_t start = ++p->pos, end = start;
    while (end < p->n && s[end] != '"')
        end += s[end] == '\\' ? 2 : 1;
    if (end >= p->n) {
        p->pos = p->n;
        return st_syntax(p, "the end of a string");
    }
    char *buf = out ? malloc(end - start + 1) : NULL;
    if (out && !buf)
        return nsa__error(NSA_ERR_NOMEM, "%s: out of memory reading the header", p->path);
    size_t len = 0, i = start;
    const char *bad = NULL;
    while (i < end && !bad) {
        unsigned char c = (unsigned char)s[i];
        unsigned cp = 0, lo = 0;
        if (c < 0x20) {
            bad = "control character in a string";
        } else if (c != '\\') {
            if (buf)
                buf[len] = (char)c;
            len++, i++;
        } else if (st_unescape(s[i + 1])) {
            // i + 1 < end: the scan above stepped over the escaped character.
            if (buf)
                buf[len] = st_unescape(s[i + 1]);
            len++, i += 2;
        } else if (s[i + 1] != 'u') {
            bad = "bad escape in a string";
        } else if (i + 6 > end || !st_hex4(s + i + 2, &cp)) {
            bad = "bad \\u escape";
        } else if (cp >= 0xD800 && cp <= 0xDBFF &&
                   (i + 12 > end || s[i + 6] != '\\' || s[i + 7] != 'u' ||
                    !st_hex4(s + i + 8, &lo) || lo < 0xDC00 || lo > 0xDFFF)) {
            bad = "unpaired surrogate in a \\u escape";
        } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            bad = "unpaired surrogate in a \\u escape";
        } else if (cp == 0) {
            bad = "\\u0000 in a string";
        } else {
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                i += 6;
            }
            char tmp[4];
            len += st_utf8_put(buf ? buf + len : tmp, cp);
            i += 6;
        }
    }
    if (bad) {
        free(buf);
        return nsa__error(NSA_ERR_FORMAT, "%s: header JSON: %s at byte %zu", p->path, bad, i);
    }
    p->pos = end + 1;
    if (buf) {
        buf[len] = '\0';
        *out = buf;
    }
    return NSA_OK;
}

// Scans a JSON number (syntax only), noting whether it is negative or has a fraction or
// exponent; *value is the integer part when it is below 2^63 (else *overflow is set).
static nsa_status st_number(st_parser *p, int *negative, int *fraction, int *overflow,
                            uint64_t *value)
{
    *negative = *fraction = *overflow = 0;
    *value = 0;
    if (p->pos < p->n && p->s[p->pos] == '-') {
        *negative = 1;
        p->pos++;
    }
    if (!st_digit(p))
        return st_syntax(p, "a digit");
    if (p->s[p->pos] == '0') {
        p->pos++;
        if (st_digit(p))
            return nsa__error(NSA_ERR_FORMAT, "%s: header JSON: number with a leading zero at "
                              "byte %zu", p->path, p->pos - 1);
    }
    for (; st_digit(p); p->pos++) {
        unsigned d = (unsigned)(p->s[p->pos] - '0');
        if (*value > ((uint64_t)INT64_MAX - d) / 10)
            *overflow = 1;
        else
            *value = *value * 10 + d;
    }
    if (p->pos < p->n && p->s[p->pos] == '.') {
        *fraction = 1;
        p->pos++;
        if (!st_digit(p))
            return st_syntax(p, "a digit");
        while (st_digit(p))
            p->pos++;
    }
    if (p->pos < p->n && (p->s[p->pos] == 'e' || p->s[p->pos] == 'E')) {
        *fraction = 1;
        p->pos++;
        if (p->pos < p->n && (p->s[p->pos] == '+' || p->s[p->pos] == '-'))
            p->pos++;
        if (!st_digit(p))
            return st_syntax(p, "a digit");
        while (st_digit(p))
            p->pos++;
    }
    return NSA_OK;
}

// A JSON number that must be a non-negative integer below 2^63; `what` names it.
static nsa_status st_uint(st_parser *p, uint64_t *out, const char *what)
{
    int c = st_peek(p);
    size_t start = p->pos;
    if (c != '-' && !(c >= '0' && c <= '9'))
        return nsa__error(NSA_ERR_FORMAT, "%s: %s: expected an integer at byte %zu", p->path,
                          what, p->pos);
    int negative, fraction, overflow;
    NSA_TRY(st_number(p, &negative, &fraction, &overflow, out));
    const char *bad = fraction ? "is not an integer" : negative ? "is negative"
                      : overflow ? "overflows a 64-bit integer" : NULL;
    if (bad)
        return nsa__error(NSA_ERR_FORMAT, "%s: %s: %.*s %s", p->path, what,
                          (int)(p->pos - start < 40 ? p->pos - start : 40), p->s + start, bad);
    return NSA_OK;
}

static int st_literal(st_parser *p, const char *word)
{
    size_t len = strlen(word);
    if (p->n - p->pos < len || memcmp(p->s + p->pos, word, len) != 0)
        return 0;
    p->pos += len;
    return 1;
}

// Skips any JSON value (for keys this reader does not use), refusing deep nesting.
static nsa_status st_skip_value(st_parser *p, int depth)
{
    if (depth > ST_MAX_DEPTH)
        return nsa__error(NSA_ERR_FORMAT, "%s: header JSON is nested too deep (over %d levels)",
                          p->path, ST_MAX_DEPTH);
    int c = st_peek(p);
    if (c == '"')
        return st_string(p, NULL);
    if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        int more = !st_begin(p, close);
        while (more > 0) {
            if (c == '{') {
                NSA_TRY(st_string(p, NULL));
                if (st_peek(p) != ':')
                    return st_syntax(p, "':'");
                p->pos++;
            }
            NSA_TRY(st_skip_value(p, depth + 1));
            more = st_more(p, close);
        }
        return more < 0 ? NSA_ERR_FORMAT : NSA_OK;
    }
    if (c == '-' || (c >= '0' && c <= '9')) {
        int negative, fraction, overflow;
        uint64_t ignored;
        return st_number(p, &negative, &fraction, &overflow, &ignored);
    }
    if (st_literal(p, "true") || st_literal(p, "false") || st_literal(p, "null"))
        return NSA_OK;
    return st_syntax(p, "a value");
}

// ---------------------------------------------------------------------------------------
// The header's entries

// (A header of at most ST_MAX_HEADER bytes cannot hold INT_MAX tensors or entries.)
static nsa_status st_parse_metadata(st_parser *p)
{
    nsa__st_file *f = p->f;
    if (st_peek(p) != '{')
        return nsa__error(NSA_ERR_FORMAT, "%s: __metadata__ must be an object of strings",
                          p->path);
    int more = !st_begin(p, '}');
    while (more > 0) {
        st_meta m = {NULL, NULL};
        NSA_TRY(st_string(p, &m.key));
        nsa_status s = st_peek(p) == ':' ? NSA_OK : st_syntax(p, "':'");
        if (s == NSA_OK) {
            p->pos++;
            if (st_peek(p) == '"')
                s = st_string(p, &m.value);
            else
                s = nsa__error(NSA_ERR_FORMAT, "%s: __metadata__ value of '" ST_NAME
                               "' must be a string", p->path, m.key);
        }
        if (s == NSA_OK && (size_t)f->num_meta == p->meta_cap) {
            size_t cap = p->meta_cap ? 2 * p->meta_cap : 16;
            st_meta *grown = realloc(f->meta, cap * sizeof *grown);
            if (grown) {
                f->meta = grown;
                p->meta_cap = cap;
            } else {
                s = nsa__error(NSA_ERR_NOMEM, "%s: out of memory reading the header", p->path);
            }
        }
        if (s != NSA_OK) {
            free(m.key);
            free(m.value);
            return s;
        }
        f->meta[f->num_meta++] = m;
        more = st_more(p, '}');
    }
    return more < 0 ? NSA_ERR_FORMAT : NSA_OK;
}

// Parses a JSON array of non-negative integers (at most max_len) into v.
static nsa_status st_uint_array(st_parser *p, const char *name, const char *field, uint64_t *v,
                                int max_len, int *len)
{
    if (st_peek(p) != '[')
        return nsa__error(NSA_ERR_FORMAT, "%s: tensor '" ST_NAME "': %s must be an array",
                          p->path, name, field);
    char what[200];
    snprintf(what, sizeof what, "tensor '" ST_NAME "': %s", name, field);
    *len = 0;
    int more = !st_begin(p, ']');
    while (more > 0) {
        if (*len == max_len)
            return nsa__error(NSA_ERR_FORMAT, "%s: %s has more than %d entries", p->path, what,
                              max_len);
        NSA_TRY(st_uint(p, &v[(*len)++], what));
        more = st_more(p, ']');
    }
    return more < 0 ? NSA_ERR_FORMAT : NSA_OK;
}

// Checks a parsed tensor entry: its dtype, shape and offsets against the data section.
static nsa_status st_check_tensor(st_parser *p, nsa__st_tensor *t, const char *dtype,
                                  const uint64_t *dims, const uint64_t *offsets, int noff)
{
    const char *name = t->name;
    int found = 0;
    for (size_t i = 0; i < sizeof st_dtypes / sizeof st_dtypes[0]; i++)
        if (strcmp(dtype, st_dtypes[i].name) == 0) {
            t->dtype = st_dtypes[i].dtype;
            found = 1;
        }
    if (!found) {
        int known = 0;
        for (size_t i = 0; i < sizeof st_other_dtypes / sizeof st_other_dtypes[0]; i++)
            known |= strcmp(dtype, st_other_dtypes[i]) == 0;
        return nsa__error(NSA_ERR_FORMAT, "%s: tensor '" ST_NAME "': %s dtype '%.32s'", p->path,
                          name, known ? "unsupported" : "unknown", dtype);
    }
    if (noff != 2)
        return nsa__error(NSA_ERR_FORMAT,
                          "%s: tensor '" ST_NAME "': data_offsets must have 2 entries, not %d",
                          p->path, name, noff);
    char sh[256];
    for (int i = 0; i < t->ndim; i++)
        t->shape[i] = (int64_t)dims[i]; // below 2^63: st_uint checked
    // bytes = numel * size, refusing to overflow.
    uint64_t bytes = nsa_dtype_size(t->dtype);
    for (int i = 0; i < t->ndim; i++) {
        if (dims[i] != 0 && bytes > UINT64_MAX / dims[i])
            return nsa__error(NSA_ERR_FORMAT,
                              "%s: tensor '" ST_NAME "': shape %s overflows its size in bytes",
                              p->path, name, st_shape_str(sh, sizeof sh, t->ndim, t->shape));
        bytes *= dims[i];
    }
    t->begin = offsets[0];
    t->end = offsets[1];
    unsigned long long b = t->begin, e = t->end;
    if (e < b)
        return nsa__error(NSA_ERR_FORMAT,
                          "%s: tensor '" ST_NAME "': data_offsets [%llu, %llu] end before they "
                          "begin", p->path, name, b, e);
    if (e > p->f->data_size)
        return nsa__error(NSA_ERR_FORMAT,
                          "%s: tensor '" ST_NAME "': data_offsets [%llu, %llu] out of range of the "
                          "data section (%llu bytes; file truncated?)",
                          p->path, name, b, e, (unsigned long long)p->f->data_size);
    if (e - b != bytes)
        return nsa__error(NSA_ERR_FORMAT,
                          "%s: tensor '" ST_NAME "': data_offsets [%llu, %llu] do not match shape "
                          "%s of %s (%llu bytes)", p->path, name, b, e,
                          st_shape_str(sh, sizeof sh, t->ndim, t->shape), dtype,
                          (unsigned long long)bytes);
    return NSA_OK;
}

// Parses {"dtype": .., "shape": [..], "data_offsets": [b, e]} (keys in any order,
// unknown keys ignored as safetensors does) for tensor `name` (taken: freed on failure)
// and appends it once validated.
static nsa_status st_parse_tensor(st_parser *p, char *name)
{
    nsa__st_tensor t;
    memset(&t, 0, sizeof t);
    t.name = name;
    int have_dtype = 0, have_shape = 0, have_offsets = 0, noff = 0, more = 0;
    uint64_t dims[ST_MAX_NDIM], offsets[2];
    char *dtype = NULL, *key = NULL;
    nsa_status s = NSA_OK;

    if (st_peek(p) != '{') {
        s = nsa__error(NSA_ERR_FORMAT, "%s: tensor '" ST_NAME "': entry must be an object",
                       p->path, name);
        goto done;
    }
    more = !st_begin(p, '}');
    while (more > 0) {
        if ((s = st_string(p, &key)) != NSA_OK)
            goto done;
        if (st_peek(p) != ':') {
            s = st_syntax(p, "':'");
            goto done;
        }
        p->pos++;
        int *seen = strcmp(key, "dtype") == 0          ? &have_dtype
                    : strcmp(key, "shape") == 0        ? &have_shape
                    : strcmp(key, "data_offsets") == 0 ? &have_offsets
                                                       : NULL;
        if (seen && *seen)
            s = nsa__error(NSA_ERR_FORMAT, "%s: tensor '" ST_NAME "': duplicate key '%s'",
                           p->path, name, key);
        else if (seen == &have_dtype && st_peek(p) != '"')
            s = nsa__error(NSA_ERR_FORMAT, "%s: tensor '" ST_NAME "': dtype must be a string",
                           p->path, name);
        else if (seen == &have_dtype)
            s = st_string(p, &dtype);
        else if (seen == &have_shape)
            s = st_uint_array(p, name, "shape", dims, ST_MAX_NDIM, &t.ndim);
        else if (seen == &have_offsets)
            s = st_uint_array(p, name, "data_offsets", offsets, 2, &noff);
        else
            s = st_skip_value(p, 1);
        if (seen)
            *seen = 1;
        free(key);
        key = NULL;
        if (s != NSA_OK)
            goto done;
        more = st_more(p, '}');
    }
    if (more < 0) {
        s = NSA_ERR_FORMAT;
        goto done;
    }
    const char *missing = !have_dtype ? "dtype" : !have_shape ? "shape"
                          : !have_offsets ? "data_offsets" : NULL;
    if (missing)
        s = nsa__error(NSA_ERR_FORMAT, "%s: tensor '" ST_NAME "': missing '%s'", p->path, name,
                       missing);
    else
        s = st_check_tensor(p, &t, dtype, dims, offsets, noff);
    nsa__st_file *f = p->f;
    if (s == NSA_OK && (size_t)f->num_tensors == p->tensors_cap) {
        size_t cap = p->tensors_cap ? 2 * p->tensors_cap : 64;
        nsa__st_tensor *grown = realloc(f->tensors, cap * sizeof *grown);
        if (grown) {
            f->tensors = grown;
            p->tensors_cap = cap;
        } else {
            s = nsa__error(NSA_ERR_NOMEM, "%s: out of memory reading the header", p->path);
        }
    }
    if (s == NSA_OK)
        f->tensors[f->num_tensors++] = t;
done:
    free(key);
    free(dtype);
    if (s != NSA_OK)
        free(name);
    return s;
}

static nsa_status st_parse_header(st_parser *p)
{
    if (st_peek(p) != '{')
        return nsa__error(NSA_ERR_FORMAT,
                          "%s: header is not a JSON object (not a safetensors file?)", p->path);
    int have_meta = 0;
    int more = !st_begin(p, '}');
    while (more > 0) {
        char *key = NULL;
        NSA_TRY(st_string(p, &key));
        if (st_peek(p) != ':') {
            free(key);
            return st_syntax(p, "':'");
        }
        p->pos++;
        if (strcmp(key, "__metadata__") == 0) {
            free(key);
            if (have_meta++)
                return nsa__error(NSA_ERR_FORMAT, "%s: duplicate __metadata__", p->path);
            NSA_TRY(st_parse_metadata(p));
        } else {
            NSA_TRY(st_parse_tensor(p, key)); // takes key
        }
        more = st_more(p, '}');
    }
    if (more < 0)
        return NSA_ERR_FORMAT;
    if (st_peek(p) != -1) // only whitespace (the format pads with spaces) may follow
        return nsa__error(NSA_ERR_FORMAT,
                          "%s: header JSON: unexpected data after the object at byte %zu",
                          p->path, p->pos);
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// Reading

void nsa__st_close(nsa__st_file *f)
{
    if (!f)
        return;
    if (f->fp)
        fclose(f->fp);
    for (int i = 0; i < f->num_tensors; i++)
        free(f->tensors[i].name);
    for (int i = 0; i < f->num_meta; i++) {
        free(f->meta[i].key);
        free(f->meta[i].value);
    }
    free(f->tensors);
    free(f->meta);
    free(f->sorted);
    free(f->meta_sorted);
    free(f->path);
    free(f);
}

static nsa_status st_read_exact(FILE *fp, void *dst, size_t n, const char *path, const char *what)
{
    if (n && fread(dst, 1, n, fp) != n) {
        if (ferror(fp))
            return nsa__error(NSA_ERR_IO, "%s: cannot read %s: %s", path, what, strerror(errno));
        return nsa__error(NSA_ERR_FORMAT, "%s: file is truncated (reading %s)", path, what);
    }
    return NSA_OK;
}

static nsa_status st_open(nsa__st_file *f, const char *path)
{
    f->fp = fopen(path, "rb");
    if (!f->fp)
        return nsa__error(NSA_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f->fp), &st) != 0)
        return nsa__error(NSA_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode))
        return nsa__error(NSA_ERR_IO, "%s: not a regular file", path);
    uint64_t file_size = (uint64_t)st.st_size;
    if (file_size < 8)
        return nsa__error(NSA_ERR_FORMAT,
                          "%s: file is too short (%llu bytes) for a safetensors header length",
                          path, (unsigned long long)file_size);
    unsigned char len_bytes[8];
    NSA_TRY(st_read_exact(f->fp, len_bytes, 8, path, "the header length"));
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--)
        header_len = header_len << 8 | len_bytes[i];
    if (header_len == 0)
        return nsa__error(NSA_ERR_FORMAT, "%s: header length is 0 (not a safetensors file?)", path);
    if (header_len > ST_MAX_HEADER)
        return nsa__error(NSA_ERR_FORMAT,
                          "%s: header length %llu is absurd (over %u bytes; not a safetensors "
                          "file?)", path, (unsigned long long)header_len, ST_MAX_HEADER);
    if (header_len > file_size - 8)
        return nsa__error(NSA_ERR_FORMAT,
                          "%s: header length %llu is larger than the file (%llu bytes; truncated?)",
                          path, (unsigned long long)header_len, (unsigned long long)file_size);
    f->data_start = 8 + header_len;
    f->data_size = file_size - f->data_start;

    char *header = malloc((size_t)header_len);
    if (!header)
        return nsa__error(NSA_ERR_NOMEM, "%s: out of memory for a %llu-byte header", path,
                          (unsigned long long)header_len);
    nsa_status s = st_read_exact(f->fp, header, (size_t)header_len, path, "the header");
    if (s == NSA_OK) {
        st_parser p = {path, header, (size_t)header_len, 0, f, 0, 0};
        s = st_parse_header(&p);
    }
    free(header);
    NSA_TRY(s);

    f->sorted = nsa__malloc((size_t)f->num_tensors * sizeof *f->sorted, "tensor table");
    f->meta_sorted = nsa__malloc((size_t)f->num_meta * sizeof *f->meta_sorted, "metadata table");
    if (!f->sorted || !f->meta_sorted)
        return NSA_ERR_NOMEM;
    for (int i = 0; i < f->num_tensors; i++)
        f->sorted[i] = (st_entry){f->tensors[i].name, i};
    for (int i = 0; i < f->num_meta; i++)
        f->meta_sorted[i] = (st_entry){f->meta[i].key, i};
    int dup = st_sort(f->sorted, f->num_tensors);
    if (dup >= 0)
        return nsa__error(NSA_ERR_FORMAT, "%s: duplicate tensor name '" ST_NAME "'", path,
                          f->tensors[dup].name);
    dup = st_sort(f->meta_sorted, f->num_meta);
    if (dup >= 0)
        return nsa__error(NSA_ERR_FORMAT, "%s: duplicate __metadata__ key '" ST_NAME "'", path,
                          f->meta[dup].key);
    return NSA_OK;
}

nsa_status nsa__st_open(nsa__st_file **out, const char *path)
{
    if (!out || !path)
        return nsa__error(NSA_ERR_INVALID, "nsa__st_open: NULL argument");
    *out = NULL;
    nsa__st_file *f = nsa__calloc(1, sizeof *f, "safetensors file");
    if (!f)
        return NSA_ERR_NOMEM;
    f->path = st_strdup(path);
    nsa_status s = f->path ? st_open(f, path)
                           : nsa__error(NSA_ERR_NOMEM, "%s: out of memory", path);
    if (s != NSA_OK) {
        nsa__st_close(f);
        return s;
    }
    *out = f;
    return NSA_OK;
}

int nsa__st_num_tensors(const nsa__st_file *f)
{
    return f ? f->num_tensors : 0;
}

const nsa__st_tensor *nsa__st_tensor_at(const nsa__st_file *f, int i)
{
    return f && i >= 0 && i < f->num_tensors ? &f->tensors[i] : NULL;
}

const nsa__st_tensor *nsa__st_find(const nsa__st_file *f, const char *name)
{
    int i = f && name ? st_lookup(f->sorted, f->num_tensors, name) : -1;
    return i >= 0 ? &f->tensors[i] : NULL;
}

const char *nsa__st_meta(const nsa__st_file *f, const char *key)
{
    int i = f && key ? st_lookup(f->meta_sorted, f->num_meta, key) : -1;
    return i >= 0 ? f->meta[i].value : NULL;
}

int nsa__st_num_meta(const nsa__st_file *f)
{
    return f ? f->num_meta : 0;
}

void nsa__st_meta_at(const nsa__st_file *f, int i, const char **key, const char **value)
{
    int ok = f && i >= 0 && i < f->num_meta;
    if (key)
        *key = ok ? f->meta[i].key : NULL;
    if (value)
        *value = ok ? f->meta[i].value : NULL;
}

nsa_status nsa__st_read_f32(nsa__st_file *f, const char *name, int ndim, const int64_t *shape,
                            float *dst)
{
    if (!f || !name || ndim < 0 || ndim > ST_MAX_NDIM || (ndim > 0 && !shape))
        return nsa__error(NSA_ERR_INVALID, "nsa__st_read_f32: bad arguments");
    const nsa__st_tensor *t = nsa__st_find(f, name);
    if (!t)
        return nsa__error(NSA_ERR_FORMAT, "%s: tensor '" ST_NAME "' is missing", f->path, name);
    int same = t->ndim == ndim;
    for (int i = 0; same && i < ndim; i++)
        same = t->shape[i] == shape[i];
    if (!same) {
        char want[256], got[256];
        return nsa__error(NSA_ERR_FORMAT, "%s: tensor '" ST_NAME "': expected shape %s, found %s",
                          f->path, name, st_shape_str(want, sizeof want, ndim, shape),
                          st_shape_str(got, sizeof got, t->ndim, t->shape));
    }
    if (t->dtype != NSA_DTYPE_F32 && t->dtype != NSA_DTYPE_BF16 && t->dtype != NSA_DTYPE_F64)
        return nsa__error(NSA_ERR_FORMAT,
                          "%s: tensor '" ST_NAME "': dtype %s, expected F32, BF16 or F64",
                          f->path, name, st_dtype_name(t->dtype));
    size_t elem = nsa_dtype_size(t->dtype);
    uint64_t numel = (t->end - t->begin) / elem;
    if (numel == 0)
        return NSA_OK;
    if (!dst)
        return nsa__error(NSA_ERR_INVALID, "nsa__st_read_f32: dst is NULL");
    if (numel > SIZE_MAX / elem || f->data_start + t->begin > (uint64_t)INT64_MAX)
        return nsa__error(NSA_ERR_FORMAT, "%s: tensor '" ST_NAME "' is too large", f->path, name);
    if (fseeko(f->fp, (off_t)(f->data_start + t->begin), SEEK_SET) != 0)
        return nsa__error(NSA_ERR_IO, "%s: cannot seek to tensor '" ST_NAME "': %s", f->path,
                          name, strerror(errno));
    char what[200];
    snprintf(what, sizeof what, "tensor '" ST_NAME "'", name);
    if (t->dtype == NSA_DTYPE_F32)
        return st_read_exact(f->fp, dst, (size_t)numel * 4, f->path, what);

    // Convert through a small buffer: the tensor may be large.
    enum { CHUNK = 4096 };
    unsigned char buf[CHUNK * 8];
    for (size_t done = 0; done < numel;) {
        size_t count = numel - done < CHUNK ? (size_t)(numel - done) : CHUNK;
        NSA_TRY(st_read_exact(f->fp, buf, count * elem, f->path, what));
        for (size_t i = 0; i < count; i++) {
            if (t->dtype == NSA_DTYPE_BF16) { // the upper 16 bits of an f32
                uint32_t bits = ((uint32_t)buf[2 * i] | (uint32_t)buf[2 * i + 1] << 8) << 16;
                memcpy(&dst[done + i], &bits, 4);
            } else {
                double d;
                memcpy(&d, buf + 8 * i, 8);
                dst[done + i] = (float)d;
            }
        }
        done += count;
    }
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// Atomic files

nsa_status nsa__atomic_open(nsa__atomic_file *af, const char *path)
{
    if (!af)
        return nsa__error(NSA_ERR_INVALID, "nsa__atomic_open: NULL argument");
    memset(af, 0, sizeof *af);
    if (!path || !*path)
        return nsa__error(NSA_ERR_INVALID, "output path is empty");
    size_t len = strlen(path) + 32;
    af->path = st_strdup(path);
    af->tmp_path = malloc(len);
    nsa_status s = NSA_OK;
    if (!af->path || !af->tmp_path) {
        s = nsa__error(NSA_ERR_NOMEM, "%s: out of memory", path);
    } else {
        snprintf(af->tmp_path, len, "%s.tmp.%ld", path, (long)getpid());
        af->fp = fopen(af->tmp_path, "wb");
        if (!af->fp)
            s = nsa__error(NSA_ERR_IO, "%s: cannot create temporary file '%s': %s", path,
                           af->tmp_path, strerror(errno));
    }
    if (s != NSA_OK) { // nothing was created: nothing to remove
        free(af->path);
        free(af->tmp_path);
        memset(af, 0, sizeof *af);
    }
    return s;
}

void nsa__atomic_abort(nsa__atomic_file *af)
{
    if (!af)
        return;
    if (af->fp)
        fclose(af->fp);
    if (af->tmp_path)
        remove(af->tmp_path);
    free(af->tmp_path);
    free(af->path);
    memset(af, 0, sizeof *af);
}

// Makes the rename durable; best effort (some file systems refuse fsync on directories).
static void st_sync_dir(const char *path)
{
    const char *slash = strrchr(path, '/');
    size_t n = !slash ? 1 : slash == path ? 1 : (size_t)(slash - path);
    char *dir = malloc(n + 1);
    if (!dir)
        return;
    memcpy(dir, slash ? path : ".", n);
    dir[n] = '\0';
    int fd = open(dir, O_RDONLY);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
    free(dir);
}

nsa_status nsa__atomic_commit(nsa__atomic_file *af)
{
    if (!af || !af->fp)
        return nsa__error(NSA_ERR_INVALID, "nsa__atomic_commit: file is not open");
    FILE *fp = af->fp;
    af->fp = NULL;
    const char *failed = NULL;
    int err = 0;
    if (fflush(fp) != 0 || ferror(fp))
        failed = "cannot write", err = errno;
    else if (fsync(fileno(fp)) != 0)
        failed = "cannot fsync", err = errno;
    if (fclose(fp) != 0 && !failed)
        failed = "cannot close", err = errno;
    if (!failed && rename(af->tmp_path, af->path) != 0)
        failed = "cannot rename the temporary file into place", err = errno;
    nsa_status s = NSA_OK;
    if (failed)
        s = nsa__error(NSA_ERR_IO, "%s: %s: %s", af->path, failed,
                       err ? strerror(err) : "unknown error");
    else
        st_sync_dir(af->path);
    if (!failed) { // renamed: nothing left to remove
        free(af->tmp_path);
        af->tmp_path = NULL;
    }
    nsa__atomic_abort(af);
    return s;
}

// ---------------------------------------------------------------------------------------
// Writing

typedef struct st_buf {
    char *p;
    size_t len, cap;
    int oom;
} st_buf;

static void st_put(st_buf *b, const char *s, size_t n)
{
    if (b->oom)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *grown = realloc(b->p, cap);
        if (!grown) {
            b->oom = 1;
            return;
        }
        b->p = grown;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void st_puts(st_buf *b, const char *s)
{
    st_put(b, s, strlen(s));
}

static void st_put_json_string(st_buf *b, const char *s)
{
    st_put(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        char esc[8];
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            st_put(b, esc, 2);
        } else if (c < 0x20) {
            snprintf(esc, sizeof esc, "\\u%04x", c);
            st_put(b, esc, 6);
        } else {
            st_put(b, s, 1);
        }
    }
    st_put(b, "\"", 1);
}

static void st_put_u64(st_buf *b, const char *before, uint64_t v)
{
    char num[64];
    snprintf(num, sizeof num, "%s%llu", before, (unsigned long long)v);
    st_puts(b, num);
}

// Checks for duplicates among n names (NULL-free); returns one or NULL.
static const char *st_find_duplicate(const char *const *names, size_t stride, int n, int *nomem)
{
    st_entry *e = nsa__malloc((size_t)n * sizeof *e, "name table");
    *nomem = !e;
    if (!e)
        return NULL;
    for (int i = 0; i < n; i++)
        e[i] = (st_entry){*(const char *const *)((const char *)names + (size_t)i * stride), i};
    int dup = st_sort(e, n);
    const char *name = dup >= 0 ? *(const char *const *)((const char *)names + (size_t)dup * stride)
                                : NULL;
    free(e);
    return name;
}

// Validates the arguments and builds the header (padded with spaces to a multiple of 8).
static nsa_status st_build_header(st_buf *b, const char *path, const nsa__st_out_tensor *tensors,
                                  int num_tensors, const char *const *meta_keys,
                                  const char *const *meta_values, int num_meta)
{
    if (num_tensors < 0 || num_meta < 0 || (num_tensors > 0 && !tensors) ||
        (num_meta > 0 && (!meta_keys || !meta_values)))
        return nsa__error(NSA_ERR_INVALID, "%s: bad tensor or metadata list", path);
    for (int i = 0; i < num_meta; i++)
        if (!meta_keys[i] || !meta_values[i])
            return nsa__error(NSA_ERR_INVALID, "%s: metadata entry %d is NULL", path, i);
    for (int i = 0; i < num_tensors; i++)
        if (!tensors[i].name || !*tensors[i].name || strcmp(tensors[i].name, "__metadata__") == 0)
            return nsa__error(NSA_ERR_INVALID, "%s: tensor %d has an invalid name", path, i);
    int nomem = 0;
    const char *dup = num_meta ? st_find_duplicate(meta_keys, sizeof *meta_keys, num_meta, &nomem)
                               : NULL;
    if (dup)
        return nsa__error(NSA_ERR_INVALID, "%s: duplicate metadata key '%s'", path, dup);
    dup = num_tensors && !nomem ? st_find_duplicate(&tensors[0].name, sizeof *tensors,
                                                    num_tensors, &nomem) : NULL;
    if (dup)
        return nsa__error(NSA_ERR_INVALID, "%s: duplicate tensor name '%s'", path, dup);
    if (nomem)
        return NSA_ERR_NOMEM;

    st_puts(b, "{");
    if (num_meta > 0) {
        st_puts(b, "\"__metadata__\":{");
        for (int i = 0; i < num_meta; i++) {
            st_puts(b, i ? "," : "");
            st_put_json_string(b, meta_keys[i]);
            st_puts(b, ":");
            st_put_json_string(b, meta_values[i]);
        }
        st_puts(b, "}");
    }
    uint64_t offset = 0;
    for (int i = 0; i < num_tensors; i++) {
        const nsa__st_out_tensor *t = &tensors[i];
        if (t->ndim < 0 || t->ndim > ST_MAX_NDIM || (t->ndim > 0 && !t->shape))
            return nsa__error(NSA_ERR_INVALID, "%s: tensor '%s': ndim = %d: must be 0..%d", path,
                              t->name, t->ndim, ST_MAX_NDIM);
        uint64_t bytes = 4;
        for (int d = 0; d < t->ndim; d++) {
            if (t->shape[d] < 0)
                return nsa__error(NSA_ERR_INVALID, "%s: tensor '%s': dim %d is negative", path,
                                  t->name, d);
            uint64_t dim = (uint64_t)t->shape[d];
            if (dim != 0 && bytes > UINT64_MAX / dim)
                bytes = UINT64_MAX; // caught below
            else
                bytes *= dim;
        }
        if (bytes > (uint64_t)SIZE_MAX / 2 || offset > UINT64_MAX / 2 - bytes)
            return nsa__error(NSA_ERR_INVALID, "%s: tensor '%s': size overflows", path, t->name);
        if (bytes && !t->data)
            return nsa__error(NSA_ERR_INVALID, "%s: tensor '%s': data is NULL", path, t->name);
        st_puts(b, num_meta > 0 || i > 0 ? "," : "");
        st_put_json_string(b, t->name);
        st_puts(b, ":{\"dtype\":\"F32\",\"shape\":[");
        for (int d = 0; d < t->ndim; d++)
            st_put_u64(b, d ? "," : "", (uint64_t)t->shape[d]);
        st_put_u64(b, "],\"data_offsets\":[", offset);
        st_put_u64(b, ",", offset + bytes);
        st_puts(b, "]}");
        offset += bytes;
    }
    st_puts(b, "}");
    while (!b->oom && b->len % 8 != 0)
        st_puts(b, " ");
    if (b->oom)
        return nsa__error(NSA_ERR_NOMEM, "%s: out of memory building the header", path);
    if (b->len > ST_MAX_HEADER)
        return nsa__error(NSA_ERR_INVALID, "%s: header would be %zu bytes (over %u)", path, b->len,
                          ST_MAX_HEADER);
    return NSA_OK;
}

nsa_status nsa__st_write(const char *path, const nsa__st_out_tensor *tensors, int num_tensors,
                         const char *const *meta_keys, const char *const *meta_values,
                         int num_meta)
{
    if (!path || !*path)
        return nsa__error(NSA_ERR_INVALID, "safetensors output path is empty");
    st_buf b = {0};
    nsa_status s = st_build_header(&b, path, tensors, num_tensors, meta_keys, meta_values,
                                   num_meta);
    nsa__atomic_file af;
    if (s == NSA_OK)
        s = nsa__atomic_open(&af, path);
    if (s != NSA_OK) {
        free(b.p);
        return s;
    }
    unsigned char len_bytes[8];
    for (int i = 0; i < 8; i++)
        len_bytes[i] = (unsigned char)((uint64_t)b.len >> (8 * i));
    FILE *fp = af.fp;
    int ok = fwrite(len_bytes, 1, 8, fp) == 8 && fwrite(b.p, 1, b.len, fp) == b.len;
    free(b.p);
    for (int i = 0; ok && i < num_tensors; i++) {
        size_t numel = 1;
        for (int d = 0; d < tensors[i].ndim; d++)
            numel *= (size_t)tensors[i].shape[d]; // cannot overflow: checked above
        ok = numel == 0 || fwrite(tensors[i].data, sizeof(float), numel, fp) == numel;
    }
    if (!ok) {
        int err = errno;
        nsa__atomic_abort(&af);
        return nsa__error(NSA_ERR_IO, "%s: cannot write: %s", path, strerror(err));
    }
    return nsa__atomic_commit(&af);
}
