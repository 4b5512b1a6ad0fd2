/*
 * safetensors.h — reading and writing safetensors files (internal).
 * Format: 8-byte little-endian header length N, N bytes of JSON header
 * {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
 *  "__metadata__": {"key": "value", ...}}, then the data bytes.
 * The reader validates everything before trusting it: header length against the file
 * size, JSON syntax, dtypes, shapes (numel * dtype size == end - begin, no overflow),
 * offsets inside the data section. Every failure is NSA_ERR_FORMAT with the reason and
 * the path; a missing file is NSA_ERR_IO.
 */
#ifndef NSA_SAFETENSORS_H
#define NSA_SAFETENSORS_H

#include "nsa.h"

#include <stdint.h>

typedef struct nsa__st_tensor {
    char *name;
    nsa_dtype dtype; // F32, F64, BF16, I32, I64, U16 (the .npy dtypes plus BF16)
    int ndim;        // 0..8
    int64_t shape[8];
    uint64_t begin, end; // byte offsets into the data section
} nsa__st_tensor;

typedef struct nsa__st_file nsa__st_file; // an open, validated file

nsa_status nsa__st_open(nsa__st_file **out, const char *path);
void nsa__st_close(nsa__st_file *f);
int nsa__st_num_tensors(const nsa__st_file *f);
const nsa__st_tensor *nsa__st_tensor_at(const nsa__st_file *f, int i);
// NULL if absent.
const nsa__st_tensor *nsa__st_find(const nsa__st_file *f, const char *name);
// Metadata value for key, NULL if absent.
const char *nsa__st_meta(const nsa__st_file *f, const char *key);
int nsa__st_num_meta(const nsa__st_file *f);
void nsa__st_meta_at(const nsa__st_file *f, int i, const char **key, const char **value);
// Reads tensor `name` as float32 into dst (converting F32/BF16/F64), checking that its
// shape is exactly shape[0..ndim). Errors name the tensor, the expected and found shape.
nsa_status nsa__st_read_f32(nsa__st_file *f, const char *name, int ndim, const int64_t *shape,
                            float *dst);

typedef struct nsa__st_out_tensor {
    const char *name;
    int ndim;
    const int64_t *shape;
    const float *data; // written as F32
} nsa__st_out_tensor;

// Writes an F32 safetensors file atomically (temporary file in the same directory,
// fsync, rename). Metadata keys/values are plain strings (escaped as JSON).
nsa_status nsa__st_write(const char *path, const nsa__st_out_tensor *tensors, int num_tensors,
                         const char *const *meta_keys, const char *const *meta_values,
                         int num_meta);

// Atomic file helper shared with .npy: opens "<path>.tmp.<pid>" for writing.
// nsa__atomic_commit fflush+fsync+closes and renames onto path (or removes the
// temporary on failure); nsa__atomic_abort closes and removes it.
typedef struct nsa__atomic_file {
    void *fp; // FILE*
    char *tmp_path;
    char *path;
} nsa__atomic_file;
nsa_status nsa__atomic_open(nsa__atomic_file *af, const char *path);
nsa_status nsa__atomic_commit(nsa__atomic_file *af);
void nsa__atomic_abort(nsa__atomic_file *af);

#endif // NSA_SAFETENSORS_H
