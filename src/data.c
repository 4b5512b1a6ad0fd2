/*
 * data.c — training data: token files (.npy, raw uint16 .bin, or any file as bytes) and
 * the built-in long-context retrieval task, generated in-process from a seed.
 */
#include "backend.h"
#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct nsa_dataset {
    int32_t *tokens;
    int64_t num_tokens;
};

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

// Reads a whole file into memory.
static nsa_status read_file(const char *path, unsigned char **data, size_t *size)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return nsa__error(NSA_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    if (fseek(f, 0, SEEK_END) != 0) {
        fclose(f);
        return nsa__error(NSA_ERR_IO, "%s: cannot seek: %s", path, strerror(errno));
    }
    long len = ftell(f);
    if (len < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        return nsa__error(NSA_ERR_IO, "%s: cannot determine the size (not a regular file?)", path);
    }
    unsigned char *buf = nsa__malloc((size_t)len + 1, path);
    if (!buf) {
        fclose(f);
        return NSA_ERR_NOMEM;
    }
    size_t got = fread(buf, 1, (size_t)len, f);
    int err = ferror(f);
    fclose(f);
    if (got != (size_t)len || err) {
        free(buf);
        return nsa__error(NSA_ERR_IO, "%s: read %zu of %ld bytes", path, got, len);
    }
    *data = buf;
    *size = (size_t)len;
    return NSA_OK;
}

nsa_status nsa_dataset_load(nsa_dataset **out, const char *path, int vocab_size)
{
    if (!out || !path)
        return nsa__error(NSA_ERR_INVALID, "nsa_dataset_load: NULL argument");
    *out = NULL;
    if (vocab_size < 1)
        return nsa__error(NSA_ERR_INVALID, "vocab_size = %d: must be >= 1", vocab_size);
    nsa_dataset *ds = nsa__calloc(1, sizeof *ds, "dataset");
    if (!ds)
        return NSA_ERR_NOMEM;
    nsa_status st = NSA_OK;
    if (ends_with(path, ".npy")) {
        nsa_array a;
        st = nsa_npy_load(path, &a);
        if (st == NSA_OK) {
            int64_t n = nsa_array_numel(&a);
            ds->tokens = nsa__malloc((size_t)(n > 0 ? n : 1) * sizeof(int32_t), path);
            if (!ds->tokens)
                st = NSA_ERR_NOMEM;
            for (int64_t i = 0; st == NSA_OK && i < n; i++) {
                int64_t v;
                if (a.dtype == NSA_DTYPE_I32)
                    v = ((const int32_t *)a.data)[i];
                else if (a.dtype == NSA_DTYPE_I64)
                    v = ((const int64_t *)a.data)[i];
                else if (a.dtype == NSA_DTYPE_U16)
                    v = ((const uint16_t *)a.data)[i];
                else {
                    st = nsa__error(NSA_ERR_SHAPE, "%s: token ids must be int32, int64 or uint16, "
                                                   "not a floating-point array", path);
                    break;
                }
                if (v < 0 || v >= vocab_size)
                    st = nsa__error(NSA_ERR_INVALID, "%s: token %lld at index %lld is outside "
                                                     "[0, %d) (vocab_size)",
                                    path, (long long)v, (long long)i, vocab_size);
                else
                    ds->tokens[i] = (int32_t)v;
            }
            ds->num_tokens = n;
            nsa_array_free(&a);
        }
    } else {
        unsigned char *bytes = NULL;
        size_t size = 0;
        st = read_file(path, &bytes, &size);
        int is_bin = ends_with(path, ".bin");
        if (st == NSA_OK && is_bin && size % 2 != 0)
            st = nsa__error(NSA_ERR_FORMAT, "%s: a .bin token file holds uint16 ids, but its size "
                                            "(%zu bytes) is odd",
                            path, size);
        if (st == NSA_OK) {
            int64_t n = is_bin ? (int64_t)(size / 2) : (int64_t)size;
            ds->tokens = nsa__malloc((size_t)(n > 0 ? n : 1) * sizeof(int32_t), path);
            if (!ds->tokens)
                st = NSA_ERR_NOMEM;
            for (int64_t i = 0; st == NSA_OK && i < n; i++) {
                int v = is_bin ? (int)(bytes[2 * i] | (bytes[2 * i + 1] << 8)) : (int)bytes[i];
                if (v >= vocab_size)
                    st = nsa__error(NSA_ERR_INVALID, "%s: token %d at index %lld is outside [0, %d) "
                                                     "(vocab_size%s)",
                                    path, v, (long long)i, vocab_size,
                                    is_bin ? "" : "; text files are read as bytes: use 256");
                else
                    ds->tokens[i] = v;
            }
            ds->num_tokens = n;
        }
        free(bytes);
    }
    if (st == NSA_OK && ds->num_tokens < 2)
        st = nsa__error(NSA_ERR_FORMAT, "%s: holds %lld tokens; at least 2 are needed", path,
                        (long long)ds->num_tokens);
    if (st != NSA_OK) {
        nsa_dataset_free(ds);
        return st;
    }
    *out = ds;
    return NSA_OK;
}

void nsa_dataset_free(nsa_dataset *ds)
{
    if (!ds)
        return;
    free(ds->tokens);
    free(ds);
}

int64_t nsa_dataset_num_tokens(const nsa_dataset *ds)
{
    return ds->num_tokens;
}

int32_t nsa_dataset_token(const nsa_dataset *ds, int64_t i)
{
    return i >= 0 && i < ds->num_tokens ? ds->tokens[i] : -1;
}

// ---------------------------------------------------------------------------------------
// The retrieval task

#define TASK_QUERY 0

void nsa_task_config_default(nsa_task_config *cfg)
{
    cfg->seq_len = 256;
    cfg->num_pairs = 4;
    cfg->num_keys = 8;
    cfg->num_values = 8;
    cfg->vocab_size = 96;
    cfg->min_distance = 64;
    cfg->num_queries = 4;
}

// Token layout: 0 query marker, then the query keys, the answers (values), the pair
// tokens "key k holds value v" (num_keys * num_values of them), and filler.
static int first_value(const nsa_task_config *c)
{
    return 1 + c->num_keys;
}

static int first_pair(const nsa_task_config *c)
{
    return 1 + c->num_keys + c->num_values;
}

static int first_filler(const nsa_task_config *c)
{
    return first_pair(c) + c->num_keys * c->num_values;
}

nsa_status nsa_task_config_validate(const nsa_task_config *c)
{
    if (!c)
        return nsa__error(NSA_ERR_INVALID, "task config is NULL");
    if (c->num_pairs < 1)
        return nsa__error(NSA_ERR_INVALID, "task num_pairs = %d: must be >= 1", c->num_pairs);
    if (c->num_keys < c->num_pairs)
        return nsa__error(NSA_ERR_INVALID, "task num_keys = %d: must be >= num_pairs (%d)",
                          c->num_keys, c->num_pairs);
    if (c->num_keys > 4096)
        return nsa__error(NSA_ERR_INVALID, "task num_keys = %d: must be <= 4096", c->num_keys);
    if (c->num_values < 2 || c->num_values > 4096)
        return nsa__error(NSA_ERR_INVALID, "task num_values = %d: must be in [2, 4096]",
                          c->num_values);
    if (c->num_queries < 1 || c->num_queries > c->num_pairs)
        return nsa__error(NSA_ERR_INVALID, "task num_queries = %d: must be in [1, num_pairs (%d)]",
                          c->num_queries, c->num_pairs);
    if (c->min_distance < 0)
        return nsa__error(NSA_ERR_INVALID, "task min_distance = %d: must be >= 0", c->min_distance);
    long need_vocab = (long)first_filler(c) + 1;
    if (c->vocab_size < need_vocab)
        return nsa__error(NSA_ERR_INVALID, "task vocab_size = %d: must be >= %ld (marker, keys, "
                                           "values, key*value pair tokens and at least one filler "
                                           "token)",
                          c->vocab_size, need_vocab);
    long need_len = (long)c->num_pairs + c->min_distance + 3L * c->num_queries;
    if (c->seq_len < need_len)
        return nsa__error(NSA_ERR_INVALID, "task seq_len = %d: must be >= %ld (the pairs, "
                                           "min_distance, and 3 tokens per query)",
                          c->seq_len, need_len);
    return NSA_OK;
}

typedef struct task_rng {
    uint64_t seed, stream, i;
} task_rng;

static uint64_t task_next(task_rng *r)
{
    return nsa__hash64(r->seed ^ nsa__hash64(r->stream * 0x9E3779B97F4A7C15ull + r->i++));
}

static int task_below(task_rng *r, int n) // uniform in [0, n)
{
    return (int)(task_next(r) % (uint64_t)n);
}

nsa_status nsa_task_sample(const nsa_task_config *c, uint64_t seed, uint64_t index,
                           int32_t *tokens, float *weights, int32_t *answer)
{
    NSA_TRY(nsa_task_config_validate(c));
    if (!tokens)
        return nsa__error(NSA_ERR_INVALID, "nsa_task_sample: tokens is NULL");
    int T = c->seq_len, filler = first_filler(c), num_filler = c->vocab_size - filler;
    task_rng r = {seed, index, 0};
    for (int t = 0; t < T; t++)
        tokens[t] = filler + task_below(&r, num_filler);
    // distinct keys (partial Fisher-Yates over the key ids), random values
    int keys[4096], values[4096];
    for (int i = 0; i < c->num_keys; i++)
        keys[i] = i;
    for (int i = 0; i < c->num_pairs; i++) {
        int j = i + task_below(&r, c->num_keys - i);
        int tmp = keys[i];
        keys[i] = keys[j];
        keys[j] = tmp;
        values[i] = task_below(&r, c->num_values);
    }
    // One pair token per equal segment of the region before [queries - min_distance).
    int tail = 3 * c->num_queries;
    int region = T - tail - c->min_distance, segment = region / c->num_pairs;
    for (int i = 0; i < c->num_pairs; i++) {
        int pos = i * segment + task_below(&r, segment);
        tokens[pos] = first_pair(c) + keys[i] * c->num_values + values[i];
    }
    // The queries ask distinct pairs in random order (a partial shuffle of the pairs).
    int order[4096];
    for (int i = 0; i < c->num_pairs; i++)
        order[i] = i;
    if (weights)
        for (int t = 0; t < T; t++)
            weights[t] = 0.0f;
    for (int i = 0; i < c->num_queries; i++) {
        int j = i + task_below(&r, c->num_pairs - i);
        int q = order[j];
        order[j] = order[i];
        order[i] = q;
        int pos = T - tail + 3 * i;
        tokens[pos] = TASK_QUERY;
        tokens[pos + 1] = 1 + keys[q];
        tokens[pos + 2] = first_value(c) + values[q];
        if (weights)
            weights[pos + 1] = 1.0f;
    }
    if (answer)
        *answer = tokens[T - 1];
    return NSA_OK;
}
