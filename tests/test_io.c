/*
 * test_io.c — tests of the file formats (SPEC §7): .npy arrays (src/npy.c) and
 * safetensors checkpoints (src/safetensors.c).
 *
 * Round trips of every dtype, hand-written files for what the writers never produce
 * (other .npy versions, BF16 and F64 tensors, escaped names), a catalogue of hostile files
 * each expected to fail with the right status and a message naming the path and the
 * problem, the atomic-write guarantees, and a mutation fuzz loop (run under ASan+UBSan by
 * `make asan`). Files go to a fresh mkdtemp directory that is removed at the end.
 */
#include "harness.h"
#include "internal.h"
#include "nsa.h"
#include "safetensors.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char tmp_dir[256];

// ---------------------------------------------------------------------------------------
// Helpers

// Test-only allocation: a failure ends the program (it prints no RESULT line, which
// run.sh counts as a failure).
static void *xcalloc(size_t count, size_t size)
{
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    return p;
}

static const char *tpath(char *buf, const char *name)
{
    snprintf(buf, 512, "%s/%s", tmp_dir, name);
    return buf;
}

static void write_bytes(const char *path, const void *data, size_t n)
{
    remove(path); // a fresh file: ext4 flushes files truncated and rewritten (auto_da_alloc)
    FILE *fp = fopen(path, "wb");
    if (!fp) {
        fprintf(stderr, "  cannot write %s\n", path);
        return;
    }
    if (n)
        fwrite(data, 1, n, fp);
    fclose(fp);
}

// Reads a whole file into a new buffer (*n bytes); NULL on failure.
static unsigned char *read_bytes(const char *path, size_t *n)
{
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return NULL;
    fseek(fp, 0, SEEK_END);
    long size = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    unsigned char *buf = xcalloc(size > 0 ? (size_t)size : 1, 1);
    *n = buf ? fread(buf, 1, (size_t)size, fp) : 0;
    fclose(fp);
    return buf;
}

// 1 if the n bytes at buf contain the string s.
static int contains(const unsigned char *buf, size_t n, const char *s)
{
    size_t len = strlen(s);
    for (size_t i = 0; i + len <= n; i++)
        if (memcmp(buf + i, s, len) == 0)
            return 1;
    return 0;
}

static int file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

// Number of entries of dir whose name contains ".tmp.".
static int count_tmp_files(const char *dir)
{
    DIR *d = opendir(dir);
    int n = 0;
    if (!d)
        return -1;
    for (struct dirent *e; (e = readdir(d));)
        if (strstr(e->d_name, ".tmp."))
            n++;
    closedir(d);
    return n;
}

// Removes dir and everything in it (one level of subdirectories).
static void remove_tree(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return;
    char path[1024];
    for (struct dirent *e; (e = readdir(d));) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (remove(path) != 0)
            remove_tree(path);
    }
    closedir(d);
    rmdir(dir);
}

// 1 if status is `want` and the last error starts with path and contains word.
static int expect_err(nsa_status got, nsa_status want, const char *path, const char *word)
{
    const char *msg = nsa_last_error();
    int ok = got == want && (!path || strncmp(msg, path, strlen(path)) == 0) &&
             (!word || strstr(msg, word));
    if (!ok)
        fprintf(stderr, "  status %d (want %d), message \"%s\" (want \"%s\" in it)\n", (int)got,
                (int)want, msg, word ? word : "");
    else if (getenv("NSA_TEST_VERBOSE"))
        fprintf(stderr, "  %s\n", msg);
    return ok;
}

// A safetensors file from a literal header (no padding added) and data bytes.
static void write_st_raw(const char *path, const char *json, const void *data, size_t n)
{
    size_t len = strlen(json);
    size_t total = 8 + len + n;
    unsigned char *buf = xcalloc(total, 1);
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)((uint64_t)len >> (8 * i));
    memcpy(buf + 8, json, len);
    if (n)
        memcpy(buf + 8 + len, data, n);
    write_bytes(path, buf, total);
    free(buf);
}

// Writes the header and n_data zero bytes, opens it and expects failure.
static int st_fails(const char *json, size_t n_data, nsa_status want, const char *word)
{
    char path[512];
    tpath(path, "case.safetensors");
    unsigned char *zeros = xcalloc(n_data, 1);
    write_st_raw(path, json, zeros, n_data);
    free(zeros);
    nsa__st_file *f = NULL;
    nsa_status s = nsa__st_open(&f, path);
    int ok = expect_err(s, want, path, word) && f == NULL;
    if (!ok)
        fprintf(stderr, "  header was: %.200s\n", json);
    nsa__st_close(f);
    return ok;
}

// A .npy file from a literal header (a '\n' is appended when newline) and data bytes.
static void write_npy_raw(const char *path, int major, int minor, const char *header,
                          int newline, size_t n_data)
{
    size_t hlen = strlen(header) + (newline ? 1 : 0);
    size_t pre = major == 1 ? 10 : 12;
    size_t total = pre + hlen + n_data;
    unsigned char *buf = xcalloc(total, 1);
    memcpy(buf, "\x93NUMPY", 6);
    buf[6] = (unsigned char)major;
    buf[7] = (unsigned char)minor;
    for (size_t i = 0; i < pre - 8; i++)
        buf[8 + i] = (unsigned char)(hlen >> (8 * i));
    memcpy(buf + pre, header, strlen(header));
    if (newline)
        buf[pre + hlen - 1] = '\n';
    for (size_t i = 0; i < n_data; i++)
        buf[pre + hlen + i] = (unsigned char)(i * 7 + 1);
    write_bytes(path, buf, total);
    free(buf);
}

static int npy_fails(const char *header, size_t n_data, nsa_status want, const char *word)
{
    char path[512];
    tpath(path, "case.npy");
    write_npy_raw(path, 1, 0, header, 1, n_data);
    nsa_array a;
    memset(&a, 0xAB, sizeof a);
    nsa_status s = nsa_npy_load(path, &a);
    int ok = expect_err(s, want, path, word) && a.data == NULL;
    if (!ok)
        fprintf(stderr, "  header was: %.200s\n", header);
    if (s == NSA_OK)
        nsa_array_free(&a);
    return ok;
}

// ---------------------------------------------------------------------------------------
// .npy

static void test_dtype_size_and_numel(void)
{
    CHECK(nsa_dtype_size(NSA_DTYPE_F32) == 4);
    CHECK(nsa_dtype_size(NSA_DTYPE_F64) == 8);
    CHECK(nsa_dtype_size(NSA_DTYPE_I32) == 4);
    CHECK(nsa_dtype_size(NSA_DTYPE_I64) == 8);
    CHECK(nsa_dtype_size(NSA_DTYPE_U16) == 2);
    CHECK(nsa_dtype_size(NSA_DTYPE_BF16) == 2);
    nsa_array a = {NSA_DTYPE_F32, 0, {0}, NULL};
    CHECK(nsa_array_numel(&a) == 1);
    a.ndim = 3;
    a.shape[0] = 2, a.shape[1] = 3, a.shape[2] = 4;
    CHECK(nsa_array_numel(&a) == 24);
    a.shape[1] = 0;
    CHECK(nsa_array_numel(&a) == 0);
    a.shape[1] = -1;
    CHECK(nsa_array_numel(&a) == -1);
    a.shape[0] = a.shape[1] = a.shape[2] = INT64_C(1) << 32;
    CHECK(nsa_array_numel(&a) == -1);
    a.ndim = 9;
    CHECK(nsa_array_numel(&a) == -1);
    CHECK(nsa_array_numel(NULL) == -1);
    nsa_array_free(NULL);
    nsa_array zero;
    memset(&zero, 0, sizeof zero);
    nsa_array_free(&zero);
    CHECK(zero.data == NULL);
}

static void test_npy_round_trip(void)
{
    const nsa_dtype dtypes[] = {NSA_DTYPE_F32, NSA_DTYPE_F64, NSA_DTYPE_I32, NSA_DTYPE_I64,
                                NSA_DTYPE_U16};
    const int64_t shapes[][3] = {{0, 0, 0}, {5, 0, 0}, {2, 3, 4}, {0, 3, 0}};
    const int ndims[] = {0, 1, 3, 2};
    test_rng rng = {42};
    char path[512];
    tpath(path, "round.npy");
    for (size_t d = 0; d < sizeof dtypes / sizeof dtypes[0]; d++) {
        for (size_t k = 0; k < sizeof ndims / sizeof ndims[0]; k++) {
            nsa_array a = {dtypes[d], ndims[k], {0}, NULL};
            memcpy(a.shape, shapes[k], sizeof shapes[k]);
            size_t bytes = (size_t)nsa_array_numel(&a) * nsa_dtype_size(a.dtype);
            unsigned char *data = xcalloc(bytes, 1);
            for (size_t i = 0; i < bytes; i++)
                data[i] = (unsigned char)(test_rng_next(&rng) | 1);
            a.data = data;
            CHECKF(nsa_npy_save(path, &a) == NSA_OK, "save: %s", nsa_last_error());

            size_t n = 0;
            unsigned char *raw = read_bytes(path, &n);
            CHECK(raw && n >= bytes && (n - bytes) % 64 == 0);
            CHECK(raw && raw[6] == 1 && raw[7] == 0 && raw[n - bytes - 1] == '\n');
            const char *want = ndims[k] == 0 ? "'shape': ()" : ndims[k] == 1 ? "'shape': (5,)"
                               : ndims[k] == 2 ? "'shape': (0, 3)" : "'shape': (2, 3, 4)";
            CHECKF(raw && n > 10 && contains(raw, n - bytes, want),
                   "header lacks %s", want);
            free(raw);

            nsa_array b;
            CHECKF(nsa_npy_load(path, &b) == NSA_OK, "load: %s", nsa_last_error());
            CHECK(b.dtype == a.dtype && b.ndim == a.ndim);
            for (int i = 0; i < a.ndim; i++)
                CHECK(b.shape[i] == a.shape[i]);
            CHECK(b.data && (bytes == 0 || memcmp(b.data, data, bytes) == 0));
            nsa_array_free(&b);
            CHECK(b.data == NULL);
            free(data);
        }
    }
    CHECK(count_tmp_files(tmp_dir) == 0);
}

static void test_npy_versions_and_spellings(void)
{
    char path[512];
    tpath(path, "v.npy");
    const double want[4] = {1.5, -2.0, 0.25, 1e300};
    // Version 2.0 and 3.0 (4-byte header length), double quotes, no trailing comma.
    for (int major = 2; major <= 3; major++) {
        const char *h = "{\"descr\": \"<f8\", \"fortran_order\": False, \"shape\": (2, 2)}   ";
        size_t hlen = strlen(h) + 1, total = 12 + hlen + sizeof want;
        unsigned char *buf = xcalloc(total, 1);
        memcpy(buf, "\x93NUMPY", 6);
        buf[6] = (unsigned char)major;
        buf[8] = (unsigned char)hlen;
        memcpy(buf + 12, h, hlen - 1);
        buf[12 + hlen - 1] = '\n';
        memcpy(buf + 12 + hlen, want, sizeof want);
        write_bytes(path, buf, total);
        free(buf);
        nsa_array a;
        CHECKF(nsa_npy_load(path, &a) == NSA_OK, "v%d: %s", major, nsa_last_error());
        CHECK(a.dtype == NSA_DTYPE_F64 && a.ndim == 2 && a.shape[0] == 2 && a.shape[1] == 2);
        CHECK(a.data && memcmp(a.data, want, sizeof want) == 0);
        nsa_array_free(&a);
    }
    // Keys in another order, tabs, a trailing comma in the dict and in a 2-d shape.
    write_npy_raw(path, 1, 0, "{'shape': (3, 1,),\t'fortran_order': False, 'descr': '<i4', }",
                  1, 12);
    nsa_array a;
    CHECKF(nsa_npy_load(path, &a) == NSA_OK, "%s", nsa_last_error());
    CHECK(a.dtype == NSA_DTYPE_I32 && a.ndim == 2 && a.shape[0] == 3 && a.shape[1] == 1);
    nsa_array_free(&a);
}

static void test_npy_hostile(void)
{
    char path[512];
    tpath(path, "case.npy");
    const char *f4 = "{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }";
    char h[256];
    CHECK(npy_fails("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", 8,
                    NSA_ERR_FORMAT, "big-endian"));
    CHECK(npy_fails("{'descr': '<f2', 'fortran_order': False, 'shape': (2,), }", 4,
                    NSA_ERR_FORMAT, "dtype"));
    CHECK(npy_fails("{'descr': '|u1', 'fortran_order': False, 'shape': (2,), }", 2,
                    NSA_ERR_FORMAT, "dtype"));
    CHECK(npy_fails("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }", 8,
                    NSA_ERR_FORMAT, "descr"));
    CHECK(npy_fails("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", 16,
                    NSA_ERR_FORMAT, "fortran"));
    CHECK(npy_fails("{'descr': '<f4', 'fortran_order': 0, 'shape': (2,), }", 8, NSA_ERR_FORMAT,
                    "fortran_order"));
    snprintf(h, sizeof h, f4, "5");
    CHECK(npy_fails(h, 20, NSA_ERR_FORMAT, "tuple"));
    snprintf(h, sizeof h, f4, "-1,");
    CHECK(npy_fails(h, 0, NSA_ERR_FORMAT, "negative"));
    snprintf(h, sizeof h, f4, "99999999999999999999,");
    CHECK(npy_fails(h, 0, NSA_ERR_FORMAT, "overflow"));
    snprintf(h, sizeof h, f4, "4294967296, 4294967296, 4");
    CHECK(npy_fails(h, 0, NSA_ERR_FORMAT, "overflow"));
    snprintf(h, sizeof h, f4, "1, 1, 1, 1, 1, 1, 1, 1, 1");
    CHECK(npy_fails(h, 4, NSA_ERR_FORMAT, "more than 8"));
    snprintf(h, sizeof h, f4, "2 3");
    CHECK(npy_fails(h, 24, NSA_ERR_FORMAT, "shape"));
    snprintf(h, sizeof h, f4, "2,,");
    CHECK(npy_fails(h, 8, NSA_ERR_FORMAT, "shape"));
    snprintf(h, sizeof h, f4, "2, 3");
    CHECK(npy_fails(h, 23, NSA_ERR_FORMAT, "truncated"));
    CHECK(npy_fails(h, 25, NSA_ERR_FORMAT, "trailing"));
    CHECK(npy_fails("{'descr': '<f4', 'shape': (2,), }", 8, NSA_ERR_FORMAT, "missing"));
    CHECK(npy_fails("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}", 8,
                    NSA_ERR_FORMAT, "unknown key"));
    CHECK(npy_fails("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2,)}",
                    8, NSA_ERR_FORMAT, "duplicate"));
    CHECK(npy_fails("{'descr': '<f4', 'fortran_order': False, 'shape': (2,)} x", 8,
                    NSA_ERR_FORMAT, "after the dict"));
    CHECK(npy_fails("{'descr': '<f4', 'fortran_order': False 'shape': (2,)}", 8, NSA_ERR_FORMAT,
                    "expected"));
    CHECK(npy_fails("{'descr': '<f4', 'fortran_order': False, 'shape': (2,", 8, NSA_ERR_FORMAT,
                    "truncated"));
    CHECK(npy_fails("{'descr': '<f\\4', 'fortran_order': False, 'shape': (2,)}", 8,
                    NSA_ERR_FORMAT, "string"));
    CHECK(npy_fails("[1, 2]", 8, NSA_ERR_FORMAT, "expected"));

    nsa_array a;
    write_npy_raw(path, 1, 0, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", 0, 8);
    CHECK(expect_err(nsa_npy_load(path, &a), NSA_ERR_FORMAT, path, "newline"));
    write_npy_raw(path, 4, 0, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", 1, 8);
    CHECK(expect_err(nsa_npy_load(path, &a), NSA_ERR_FORMAT, path, "version"));
    write_npy_raw(path, 1, 0, "", 0, 0);
    CHECK(expect_err(nsa_npy_load(path, &a), NSA_ERR_FORMAT, path, "header length"));
    write_bytes(path, "\x93NUMPX\x01\x00\x10\x00{}", 12);
    CHECK(expect_err(nsa_npy_load(path, &a), NSA_ERR_FORMAT, path, "magic"));
    write_bytes(path, "\x93NUMPY\x01\x00\xff\x00{'descr'", 17);
    CHECK(expect_err(nsa_npy_load(path, &a), NSA_ERR_FORMAT, path, "larger than the file"));
    write_bytes(path, "\x93NUMPY\x02\x00\xff\xff\xff\x7f{}\n", 15);
    CHECK(expect_err(nsa_npy_load(path, &a), NSA_ERR_FORMAT, path, "absurd"));
    write_bytes(path, "\x93NUM", 4);
    CHECK(expect_err(nsa_npy_load(path, &a), NSA_ERR_FORMAT, path, "not a .npy"));
    CHECK(a.data == NULL);
}

static void test_npy_missing_and_invalid(void)
{
    char path[512], dir_path[512];
    tpath(path, "does-not-exist.npy");
    nsa_array a;
    CHECK(expect_err(nsa_npy_load(path, &a), NSA_ERR_IO, path, "No such file"));
    CHECK(a.data == NULL);
    // A directory is not a .npy file.
    CHECK(expect_err(nsa_npy_load(tmp_dir, &a), NSA_ERR_IO, tmp_dir, NULL));

    float x[2] = {1, 2};
    nsa_array b = {NSA_DTYPE_BF16, 1, {2}, x};
    tpath(path, "bf16.npy");
    CHECK(expect_err(nsa_npy_save(path, &b), NSA_ERR_INVALID, path, "bf16"));
    CHECK(!file_exists(path));
    b.dtype = NSA_DTYPE_F32;
    b.shape[0] = -2;
    CHECK(expect_err(nsa_npy_save(path, &b), NSA_ERR_INVALID, path, "negative"));
    b.shape[0] = 2;
    b.data = NULL;
    CHECK(expect_err(nsa_npy_save(path, &b), NSA_ERR_INVALID, path, "NULL"));
    CHECK(!file_exists(path));

    // Into a directory that does not exist: NSA_ERR_IO naming the path, and no file.
    b.data = x;
    tpath(dir_path, "no-such-dir/x.npy");
    CHECK(expect_err(nsa_npy_save(dir_path, &b), NSA_ERR_IO, dir_path, "No such file"));
    CHECK(!file_exists(dir_path));
}

// ---------------------------------------------------------------------------------------
// Atomic writes

static void test_atomic_writes(void)
{
    char dir[512], path[600], target[600];
    tpath(dir, "atomic");
    CHECK(mkdir(dir, 0700) == 0);
    float x[6] = {1, 2, 3, 4, 5, 6};
    int64_t shape[2] = {2, 3};
    nsa__st_out_tensor t = {"w", 2, shape, x};
    nsa_array a = {NSA_DTYPE_F32, 2, {2, 3}, x};

    // Success: only the final files remain; saving again replaces them.
    snprintf(path, sizeof path, "%s/m.safetensors", dir);
    CHECKF(nsa__st_write(path, &t, 1, NULL, NULL, 0) == NSA_OK, "%s", nsa_last_error());
    CHECKF(nsa__st_write(path, &t, 1, NULL, NULL, 0) == NSA_OK, "%s", nsa_last_error());
    snprintf(path, sizeof path, "%s/a.npy", dir);
    CHECKF(nsa_npy_save(path, &a) == NSA_OK, "%s", nsa_last_error());
    CHECK(count_tmp_files(dir) == 0);

    // The rename fails (the target is a directory): NSA_ERR_IO, temp file removed, and
    // the directory in the way untouched.
    snprintf(target, sizeof target, "%s/in-the-way", dir);
    CHECK(mkdir(target, 0700) == 0);
    CHECK(expect_err(nsa__st_write(target, &t, 1, NULL, NULL, 0), NSA_ERR_IO, target, NULL));
    CHECK(expect_err(nsa_npy_save(target, &a), NSA_ERR_IO, target, NULL));
    CHECK(count_tmp_files(dir) == 0);
    struct stat st;
    CHECK(stat(target, &st) == 0 && S_ISDIR(st.st_mode));

    // A directory that does not exist.
    snprintf(path, sizeof path, "%s/no-such-dir/m.safetensors", dir);
    CHECK(expect_err(nsa__st_write(path, &t, 1, NULL, NULL, 0), NSA_ERR_IO, path,
                     "No such file"));
    CHECK(!file_exists(path));
    CHECK(count_tmp_files(dir) == 0);

    // Invalid input is refused before any file is created.
    snprintf(path, sizeof path, "%s/bad.safetensors", dir);
    nsa__st_out_tensor two[2] = {t, t};
    CHECK(expect_err(nsa__st_write(path, two, 2, NULL, NULL, 0), NSA_ERR_INVALID, path,
                     "duplicate"));
    int64_t neg[2] = {2, -3};
    two[1].name = "v";
    two[1].shape = neg;
    CHECK(expect_err(nsa__st_write(path, two, 2, NULL, NULL, 0), NSA_ERR_INVALID, path,
                     "negative"));
    CHECK(!file_exists(path));
}

// ---------------------------------------------------------------------------------------
// safetensors

static void test_st_round_trip(void)
{
    char path[512];
    tpath(path, "rt.safetensors");
    test_rng rng = {7};
    float a[24], b[3], c[1];
    test_fill(&rng, a, 24, 1.0);
    test_fill(&rng, b, 3, 10.0);
    c[0] = 3.25f;
    int64_t sa[3] = {2, 3, 4}, sb[1] = {3}, se[2] = {0, 5};
    nsa__st_out_tensor t[4] = {
        {"layers.0.w", 3, sa, a}, {"b", 1, sb, b}, {"scalar", 0, NULL, c}, {"empty", 2, se, NULL}};
    const char *keys[] = {"embed_dim", "quote\"back\\slash", "ctrl", "utf8"};
    const char *values[] = {"64", "a \"quoted\" \\ value /", "line\nbreak\ttab\x01\x1f end",
                            "caf\xc3\xa9 \xf0\x9f\x98\x80"};
    CHECKF(nsa__st_write(path, t, 4, keys, values, 4) == NSA_OK, "%s", nsa_last_error());

    size_t n = 0;
    unsigned char *raw = read_bytes(path, &n);
    CHECK(raw && n > 8);
    uint64_t hlen = 0;
    for (int i = 7; raw && i >= 0; i--)
        hlen = hlen << 8 | raw[i];
    CHECK(hlen % 8 == 0 && 8 + hlen + 4 * 28 == n);
    CHECK(raw && memcmp(raw + 8, "{\"__metadata__\":", 16) == 0);
    CHECK(raw && (raw[8 + hlen - 1] == ' ' || raw[8 + hlen - 1] == '}'));
    free(raw);

    nsa__st_file *f = NULL;
    CHECKF(nsa__st_open(&f, path) == NSA_OK, "%s", nsa_last_error());
    if (!f)
        return;
    CHECK(nsa__st_num_meta(f) == 4);
    for (int i = 0; i < 4; i++) {
        const char *k, *v;
        nsa__st_meta_at(f, i, &k, &v);
        CHECKF(k && v && strcmp(k, keys[i]) == 0 && strcmp(v, values[i]) == 0, "meta %d", i);
        CHECK(nsa__st_meta(f, keys[i]) && strcmp(nsa__st_meta(f, keys[i]), values[i]) == 0);
    }
    CHECK(nsa__st_meta(f, "nope") == NULL);
    CHECK(nsa__st_num_tensors(f) == 4);
    for (int i = 0; i < 4; i++) {
        const nsa__st_tensor *ti = nsa__st_tensor_at(f, i);
        CHECK(ti && strcmp(ti->name, t[i].name) == 0 && ti->dtype == NSA_DTYPE_F32 &&
              ti->ndim == t[i].ndim);
        CHECK(nsa__st_find(f, t[i].name) == ti);
    }
    CHECK(nsa__st_tensor_at(f, 4) == NULL && nsa__st_find(f, "missing") == NULL);
    float got[24];
    test_poison(got, 24);
    CHECK(nsa__st_read_f32(f, "layers.0.w", 3, sa, got) == NSA_OK && memcmp(got, a, sizeof a) == 0);
    CHECK(nsa__st_read_f32(f, "b", 1, sb, got) == NSA_OK && memcmp(got, b, sizeof b) == 0);
    CHECK(nsa__st_read_f32(f, "scalar", 0, NULL, got) == NSA_OK && got[0] == 3.25f);
    CHECK(nsa__st_read_f32(f, "empty", 2, se, NULL) == NSA_OK);

    int64_t wrong[3] = {2, 4, 3};
    CHECK(expect_err(nsa__st_read_f32(f, "layers.0.w", 3, wrong, got), NSA_ERR_FORMAT, path,
                     "expected shape [2, 4, 3], found [2, 3, 4]"));
    CHECK(expect_err(nsa__st_read_f32(f, "layers.0.w", 2, wrong, got), NSA_ERR_FORMAT, path,
                     "layers.0.w"));
    CHECK(expect_err(nsa__st_read_f32(f, "nope", 1, sb, got), NSA_ERR_FORMAT, path, "missing"));
    nsa__st_close(f);
    nsa__st_close(NULL);

    // No metadata, no tensors.
    CHECKF(nsa__st_write(path, NULL, 0, NULL, NULL, 0) == NSA_OK, "%s", nsa_last_error());
    CHECKF(nsa__st_open(&f, path) == NSA_OK, "%s", nsa_last_error());
    CHECK(f && nsa__st_num_tensors(f) == 0 && nsa__st_num_meta(f) == 0);
    nsa__st_close(f);
}

static uint16_t bf16_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    return (uint16_t)(u >> 16);
}

static void test_st_bf16_f64_and_escapes(void)
{
    char path[512];
    tpath(path, "dtypes.safetensors");
    const float bf_vals[4] = {1.5f, -2.0f, 0.15625f, 3.0e10f};
    const double f64_vals[3] = {0.1, -1e-3, 12345.678};
    const int32_t i32_vals[2] = {1, -1};
    unsigned char data[8 + 24 + 8];
    for (int i = 0; i < 4; i++) {
        uint16_t bits = bf16_bits(bf_vals[i]);
        data[2 * i] = (unsigned char)(bits & 0xFF);
        data[2 * i + 1] = (unsigned char)(bits >> 8);
    }
    memcpy(data + 8, f64_vals, 24);
    memcpy(data + 32, i32_vals, 8);
    // Names with escapes: \" \\ \/ \u00e9 and a surrogate pair; whitespace everywhere;
    // keys in any order; an unknown key (ignored); metadata last.
    const char *json =
        "{ \"bf\\\"16\\\\x\\/\" : {\"shape\": [2, 2], \"dtype\": \"BF16\",\n"
        "    \"data_offsets\": [0, 8]},\n"
        "  \"f\\u00e964\\ud83d\\ude00\": {\"dtype\":\"F64\",\"data_offsets\":[8,32],\"shape\":[3],"
        " \"extra\": {\"a\": [1, -2.5e3, true, false, null, \"s\"]}},\n"
        "\t\"ints\": {\"dtype\": \"I32\", \"shape\": [2], \"data_offsets\": [32, 40]},\r\n"
        "  \"__metadata__\": {\"format\": \"pt\", \"esc\": \"\\n\\t\\b\\f\\r\\u0041\"} }   ";
    write_st_raw(path, json, data, sizeof data);
    nsa__st_file *f = NULL;
    CHECKF(nsa__st_open(&f, path) == NSA_OK, "%s", nsa_last_error());
    if (!f)
        return;
    CHECK(nsa__st_num_tensors(f) == 3);
    const char *bf_name = "bf\"16\\x/", *f64_name = "f\xc3\xa9" "64\xf0\x9f\x98\x80";
    CHECK(nsa__st_find(f, bf_name) && nsa__st_find(f, bf_name)->dtype == NSA_DTYPE_BF16);
    CHECK(nsa__st_find(f, f64_name) && nsa__st_find(f, f64_name)->dtype == NSA_DTYPE_F64);
    CHECK(nsa__st_meta(f, "esc") && strcmp(nsa__st_meta(f, "esc"), "\n\t\b\f\rA") == 0);
    CHECK(nsa__st_meta(f, "format") && strcmp(nsa__st_meta(f, "format"), "pt") == 0);

    float got[4];
    int64_t s22[2] = {2, 2}, s3[1] = {3}, s2[1] = {2};
    test_poison(got, 4);
    CHECKF(nsa__st_read_f32(f, bf_name, 2, s22, got) == NSA_OK, "%s", nsa_last_error());
    for (int i = 0; i < 4; i++)
        CHECKF(got[i] == bf_vals[i] || i == 3, "bf16 %d: %g", i, (double)got[i]);
    CHECK(fabs(got[3] - 3.0e10) < 3.0e10 / 128); // 3e10 is rounded to 8 mantissa bits
    double ref[3] = {0.1, -1e-3, 12345.678};
    test_poison(got, 4);
    CHECKF(nsa__st_read_f32(f, f64_name, 1, s3, got) == NSA_OK, "%s", nsa_last_error());
    harness_compare("f64", got, ref, 3, TOL_F32);
    CHECK(expect_err(nsa__st_read_f32(f, "ints", 1, s2, got), NSA_ERR_FORMAT, path, "I32"));
    nsa__st_close(f);
}

static void test_st_hostile(void)
{
    char path[512], deep[3000];
    tpath(path, "case.safetensors");
    nsa__st_file *f = NULL;

    // The length prefix.
    write_bytes(path, "\x10\x00\x00", 3);
    CHECK(expect_err(nsa__st_open(&f, path), NSA_ERR_FORMAT, path, "too short"));
    write_bytes(path, "\x00\x00\x00\x00\x00\x00\x00\x00{}", 10);
    CHECK(expect_err(nsa__st_open(&f, path), NSA_ERR_FORMAT, path, "header length is 0"));
    write_bytes(path, "\x00\x00\x00\x10\x00\x00\x00\x00{}", 10);
    CHECK(expect_err(nsa__st_open(&f, path), NSA_ERR_FORMAT, path, "absurd"));
    write_bytes(path, "\xff\xff\xff\xff\xff\xff\xff\xff{}", 10);
    CHECK(expect_err(nsa__st_open(&f, path), NSA_ERR_FORMAT, path, "absurd"));
    write_bytes(path, "\x40\x00\x00\x00\x00\x00\x00\x00{}", 10);
    CHECK(expect_err(nsa__st_open(&f, path), NSA_ERR_FORMAT, path, "larger than the file"));
    CHECK(f == NULL);

    // JSON syntax.
    CHECK(st_fails("hello world!", 0, NSA_ERR_FORMAT, "JSON"));
    CHECK(st_fails("{\"a\": {\"dtype\": \"F32\", \"sha", 0, NSA_ERR_FORMAT, "truncated"));
    CHECK(st_fails("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}", 4,
                   NSA_ERR_FORMAT, "truncated"));
    CHECK(st_fails("{\"__metadata__\": {} \"b\": {}}", 0, NSA_ERR_FORMAT, "expected"));
    CHECK(st_fails("{\"a\" {}}", 0, NSA_ERR_FORMAT, "':'"));
    CHECK(st_fails("{}  x", 0, NSA_ERR_FORMAT, "after the object"));
    write_bytes(path, "\x06\0\0\0\0\0\0\0{}\0\0\0\0", 14); // NUL padding is not JSON
    CHECK(expect_err(nsa__st_open(&f, path), NSA_ERR_FORMAT, path, "after the object"));
    CHECK(st_fails("{a: 1}", 0, NSA_ERR_FORMAT, "string"));
    CHECK(st_fails("{\"a\": {\"dtype\": \"F32\", \"shape\": [1,], \"data_offsets\": [0, 4]}}", 4,
                   NSA_ERR_FORMAT, "expected"));
    CHECK(st_fails("{\"x\": {\"y\": tru}}", 0, NSA_ERR_FORMAT, "expected"));
    CHECK(st_fails("{\"a\\q\": {}}", 0, NSA_ERR_FORMAT, "escape"));
    CHECK(st_fails("{\"a\\u12\": {}}", 0, NSA_ERR_FORMAT, "escape"));
    CHECK(st_fails("{\"a\\u12G4\": {}}", 0, NSA_ERR_FORMAT, "escape"));
    CHECK(st_fails("{\"a\\udc00\": {}}", 0, NSA_ERR_FORMAT, "surrogate"));
    CHECK(st_fails("{\"a\\ud800x\": {}}", 0, NSA_ERR_FORMAT, "surrogate"));
    CHECK(st_fails("{\"a\\u0000\": {}}", 0, NSA_ERR_FORMAT, "u0000"));
    CHECK(st_fails("{\"a\tb\": {}}", 0, NSA_ERR_FORMAT, "control character"));
    CHECK(st_fails("{\"a\\", 0, NSA_ERR_FORMAT, "truncated"));

    // Deep nesting inside an ignored key.
    size_t len = (size_t)snprintf(deep, sizeof deep, "{\"a\": {\"x\": ");
    for (int i = 0; i < 1000; i++)
        deep[len++] = '[';
    snprintf(deep + len, sizeof deep - len, "]}}");
    CHECK(st_fails(deep, 0, NSA_ERR_FORMAT, "nested too deep"));

    // Types and values.
    const char *fmt = "{\"t\": {\"dtype\": %s, \"shape\": %s, \"data_offsets\": %s}}";
    struct {
        const char *dtype, *shape, *offsets;
        size_t n_data;
        const char *word;
    } cases[] = {
        {"3", "[1]", "[0, 4]", 4, "dtype must be a string"},
        {"\"F17\"", "[1]", "[0, 4]", 4, "unknown dtype 'F17'"},
        {"\"F16\"", "[1]", "[0, 2]", 2, "unsupported dtype 'F16'"},
        {"\"F32\"", "\"1\"", "[0, 4]", 4, "shape must be an array"},
        {"\"F32\"", "[1]", "{}", 4, "data_offsets must be an array"},
        {"\"F32\"", "[-1]", "[0, 4]", 4, "negative"},
        {"\"F32\"", "[-0]", "[0, 0]", 0, "negative"},
        {"\"F32\"", "[1.5]", "[0, 4]", 4, "not an integer"},
        {"\"F32\"", "[1e2]", "[0, 400]", 400, "not an integer"},
        {"\"F32\"", "[01]", "[0, 4]", 4, "leading zero"},
        {"\"F32\"", "[\"1\"]", "[0, 4]", 4, "expected an integer"},
        {"\"F32\"", "[99999999999999999999]", "[0, 4]", 4, "overflows"},
        {"\"F32\"", "[9223372036854775808]", "[0, 4]", 4, "overflows"},
        {"\"F32\"", "[4294967296, 4294967296, 4]", "[0, 4]", 4, "overflows"},
        {"\"F64\"", "[2305843009213693952, 2]", "[0, 0]", 0, "overflows"},
        {"\"F32\"", "[1, 1, 1, 1, 1, 1, 1, 1, 1]", "[0, 4]", 4, "more than 8"},
        {"\"F32\"", "[1]", "[0, 100]", 16, "out of range"},
        {"\"F32\"", "[1]", "[18446744073709551615, 4]", 4, "overflows"},
        {"\"F32\"", "[1]", "[8, 4]", 16, "end before"},
        {"\"F32\"", "[2, 2]", "[0, 12]", 16, "do not match shape [2, 2] of F32 (16 bytes)"},
        {"\"F32\"", "[1]", "[0, 4, 8]", 16, "more than 2"},
        {"\"F32\"", "[1]", "[4]", 16, "2 entries"},
        {"\"F32\"", "[1]", "[0, -4]", 16, "negative"},
    };
    char json[512];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(json, sizeof json, fmt, cases[i].dtype, cases[i].shape, cases[i].offsets);
        CHECKF(st_fails(json, cases[i].n_data, NSA_ERR_FORMAT, cases[i].word), "case %zu", i);
    }
    CHECK(st_fails("{\"t\": 5}", 0, NSA_ERR_FORMAT, "must be an object"));
    CHECK(st_fails("{\"t\": [[[[]]]]}", 0, NSA_ERR_FORMAT, "must be an object"));
    CHECK(st_fails("{\"t\": {\"dtype\": \"F32\", \"shape\": [1]}}", 4, NSA_ERR_FORMAT,
                   "missing 'data_offsets'"));
    CHECK(st_fails("{\"t\": {}}", 0, NSA_ERR_FORMAT, "missing 'dtype'"));
    CHECK(st_fails("{\"t\": {\"dtype\": \"F32\", \"dtype\": \"F32\", \"shape\": [1], "
                   "\"data_offsets\": [0, 4]}}", 4, NSA_ERR_FORMAT, "duplicate key 'dtype'"));
    CHECK(st_fails("{\"t\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}, "
                   "\"t\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}",
                   4, NSA_ERR_FORMAT, "duplicate tensor name 't'"));
    CHECK(st_fails("{\"__metadata__\": {\"k\": \"1\", \"k\": \"2\"}}", 0, NSA_ERR_FORMAT,
                   "duplicate __metadata__ key 'k'"));
    CHECK(st_fails("{\"__metadata__\": {}, \"__metadata__\": {}}", 0, NSA_ERR_FORMAT,
                   "duplicate __metadata__"));
    CHECK(st_fails("{\"__metadata__\": [\"a\"]}", 0, NSA_ERR_FORMAT, "__metadata__ must be"));
    CHECK(st_fails("{\"__metadata__\": {\"k\": 5}}", 0, NSA_ERR_FORMAT, "must be a string"));
    CHECK(st_fails("{\"__metadata__\": {\"k\": {\"a\": \"b\"}}}", 0, NSA_ERR_FORMAT,
                   "must be a string"));

    // Valid corner cases: an empty object, empty shape, zero-size tensor, gaps.
    write_st_raw(path, "{}", NULL, 0);
    CHECK(nsa__st_open(&f, path) == NSA_OK && nsa__st_num_tensors(f) == 0);
    nsa__st_close(f);
    write_st_raw(path, "{\"z\": {\"dtype\": \"F32\", \"shape\": [0, 1000000000000], "
                 "\"data_offsets\": [4, 4]}, \"s\": {\"dtype\": \"F32\", \"shape\": [], "
                 "\"data_offsets\": [8, 12]}}", "\0\0\0\0\0\0\0\0\0\0\x80\x3f", 12);
    CHECKF(nsa__st_open(&f, path) == NSA_OK, "%s", nsa_last_error());
    float one = 0;
    CHECK(f && nsa__st_read_f32(f, "s", 0, NULL, &one) == NSA_OK && one == 1.0f);
    nsa__st_close(f);

    // Missing file and a directory.
    tpath(path, "does-not-exist.safetensors");
    f = NULL;
    CHECK(expect_err(nsa__st_open(&f, path), NSA_ERR_IO, path, "No such file"));
    CHECK(f == NULL);
    CHECK(expect_err(nsa__st_open(&f, tmp_dir), NSA_ERR_IO, tmp_dir, NULL));
}

// The file is replaced by a shorter one after opening: reads fail cleanly.
static void test_st_truncated_after_open(void)
{
    char path[512];
    tpath(path, "shrink.safetensors");
    float x[64];
    for (int i = 0; i < 64; i++)
        x[i] = (float)i + 0.5f;
    int64_t shape[1] = {64};
    nsa__st_out_tensor t = {"x", 1, shape, x};
    CHECK(nsa__st_write(path, &t, 1, NULL, NULL, 0) == NSA_OK);
    nsa__st_file *f = NULL;
    CHECK(nsa__st_open(&f, path) == NSA_OK);
    CHECK(truncate(path, 100) == 0);
    float got[64];
    CHECK(f && expect_err(nsa__st_read_f32(f, "x", 1, shape, got), NSA_ERR_FORMAT, path,
                          "truncated"));
    nsa__st_close(f);
}

// ---------------------------------------------------------------------------------------
// Mutation fuzzing: every mutant either loads or fails with NSA_ERR_FORMAT and a message.

static void mutate(test_rng *rng, unsigned char *buf, size_t *n, size_t cap, size_t hot_end)
{
    static const unsigned char interesting[] = {0, 0xFF, '"', '\\', '[', ']', '{', '}', ',',
                                                ':', '-', '9', '0', '.', 'e', ' ', '\'', '('};
    int ops = 1 + (int)(test_rng_next(rng) % 3);
    for (int k = 0; k < ops && *n > 0; k++) {
        // Mostly in the header, where the parsing happens.
        size_t limit = (test_rng_next(rng) % 5 != 0 && hot_end < *n) ? hot_end : *n;
        size_t pos = (size_t)(test_rng_next(rng) % limit);
        switch (test_rng_next(rng) % 6) {
        case 0: buf[pos] ^= (unsigned char)(1u << (test_rng_next(rng) % 8)); break;
        case 1: buf[pos] = (unsigned char)test_rng_next(rng); break;
        case 2: buf[pos] = interesting[test_rng_next(rng) % sizeof interesting]; break;
        case 3: *n = pos; break; // truncate
        case 4: // delete a byte
            memmove(buf + pos, buf + pos + 1, *n - pos - 1);
            (*n)--;
            break;
        case 5: // insert a byte
            if (*n < cap) {
                memmove(buf + pos + 1, buf + pos, *n - pos);
                buf[pos] = interesting[test_rng_next(rng) % sizeof interesting];
                (*n)++;
            }
            break;
        }
    }
}

static void test_fuzz(void)
{
    char st_path[512], npy_path[512], mut_path[512];
    tpath(st_path, "seed.safetensors");
    tpath(npy_path, "seed.npy");
    tpath(mut_path, "mutant");
    float w[12], b[3];
    for (int i = 0; i < 12; i++)
        w[i] = (float)i - 5.5f;
    for (int i = 0; i < 3; i++)
        b[i] = (float)i * 0.25f;
    int64_t sw[2] = {4, 3}, sb[1] = {3};
    nsa__st_out_tensor t[2] = {{"w", 2, sw, w}, {"b\"x", 1, sb, b}};
    const char *keys[] = {"embed_dim", "note"}, *values[] = {"4", "tab\there \\ \"q\""};
    CHECK(nsa__st_write(st_path, t, 2, keys, values, 2) == NSA_OK);
    nsa_array a = {NSA_DTYPE_F64, 2, {2, 2}, NULL};
    double d[4] = {1, 2, 3, 4};
    a.data = d;
    CHECK(nsa_npy_save(npy_path, &a) == NSA_OK);

    const char *seeds[2] = {st_path, npy_path};
    test_rng rng = {12345};
    int loaded[2] = {0, 0}, failed[2] = {0, 0};
    for (int which = 0; which < 2; which++) {
        size_t seed_n = 0;
        unsigned char *seed = read_bytes(seeds[which], &seed_n);
        if (!seed)
            continue;
        size_t cap = seed_n + 16, hot_end = which == 0 ? seed_n - 60 : 128;
        unsigned char *buf = xcalloc(cap, 1);
        for (int iter = 0; iter < 4000; iter++) {
            size_t n = seed_n;
            memcpy(buf, seed, seed_n);
            mutate(&rng, buf, &n, cap, hot_end);
            write_bytes(mut_path, buf, n);
            nsa__clear_error();
            nsa_status s;
            if (which == 0) {
                nsa__st_file *f = NULL;
                s = nsa__st_open(&f, mut_path);
                for (int i = 0; s == NSA_OK && i < nsa__st_num_tensors(f); i++) {
                    const nsa__st_tensor *ti = nsa__st_tensor_at(f, i);
                    uint64_t numel = (ti->end - ti->begin) / nsa_dtype_size(ti->dtype);
                    float *dst = xcalloc((size_t)numel, sizeof(float));
                    nsa_status r = nsa__st_read_f32(f, ti->name, ti->ndim, ti->shape, dst);
                    int is_float = ti->dtype == NSA_DTYPE_F32 || ti->dtype == NSA_DTYPE_BF16 ||
                                   ti->dtype == NSA_DTYPE_F64;
                    CHECKF(is_float ? r == NSA_OK : r == NSA_ERR_FORMAT,
                           "iter %d read %s: %d %s", iter, ti->name, (int)r, nsa_last_error());
                    free(dst);
                }
                nsa__st_close(f);
            } else {
                nsa_array got;
                s = nsa_npy_load(mut_path, &got);
                if (s == NSA_OK) {
                    int64_t numel = nsa_array_numel(&got);
                    CHECKF(numel >= 0 && (size_t)numel * nsa_dtype_size(got.dtype) <= n,
                           "iter %d: numel %lld", iter, (long long)numel);
                }
                nsa_array_free(&got);
            }
            if (s == NSA_OK) {
                loaded[which]++;
            } else {
                failed[which]++;
                CHECKF(s == NSA_ERR_FORMAT && strncmp(nsa_last_error(), mut_path,
                                                      strlen(mut_path)) == 0,
                       "iter %d (%s): status %d, \"%s\"", iter, which ? "npy" : "safetensors",
                       (int)s, nsa_last_error());
            }
        }
        free(buf);
        free(seed);
    }
    printf("  fuzz: safetensors %d loaded, %d refused; npy %d loaded, %d refused\n", loaded[0],
           failed[0], loaded[1], failed[1]);
    // Both outcomes must have been exercised.
    CHECKF(loaded[0] > 0 && failed[0] > 0 && loaded[1] > 0 && failed[1] > 0,
           "loaded %d/%d, failed %d/%d", loaded[0], loaded[1], failed[0], failed[1]);
}

int main(void)
{
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/nsa_test_io.XXXXXX");
    if (!mkdtemp(tmp_dir)) {
        perror("mkdtemp");
        printf("RESULT 0 1\n");
        return 1;
    }
    RUN(test_dtype_size_and_numel);
    RUN(test_npy_round_trip);
    RUN(test_npy_versions_and_spellings);
    RUN(test_npy_hostile);
    RUN(test_npy_missing_and_invalid);
    RUN(test_atomic_writes);
    RUN(test_st_round_trip);
    RUN(test_st_bf16_f64_and_escapes);
    RUN(test_st_hostile);
    RUN(test_st_truncated_after_open);
    RUN(test_fuzz);
    remove_tree(tmp_dir);
    return harness_finish();
}
