/*
 * cmd_grad.c — `nsa grad` (SPEC §7): the gradient of the mean next-token loss (SPEC §5)
 * of a language-model checkpoint on a batch of tokens, for every parameter, written as a
 * safetensors file with the checkpoint's names and shapes:
 *   nsa grad --checkpoint M --input TOKENS.npy --output G.safetensors [--threads N]
 *            [--device cpu|cuda]
 * Dropout is off (NSA_FWD_KEEP). The file's metadata holds the config (as in a
 * checkpoint) and "loss". Other tools (tests/torch_nsa.py grad) write the same format.
 */
#include "cli.h"
#include "safetensors.h" // nsa__st_write (internal, linked from libnsa.a)

#include <limits.h>
#include <stdlib.h>
#include <string.h>

// ---------------------------------------------------------------------------------------
// Flags

static const cli_flag grad_flags[] = {
    {"checkpoint", "M",
     "the model (safetensors, as written by nsa init or nsa train); required. It must be "
     "a language model (vocab_size > 0)"},
    {"input", "TOKENS.npy",
     "the tokens; required. int32 or int64 [B,T] (or [T] for one sequence), every token "
     "in [0, vocab_size), T >= 2 (position t predicts token t+1)"},
    {"output", "G.safetensors",
     "the gradients; required. One F32 tensor per parameter, with the checkpoint's names "
     "and shapes; metadata: the config options and \"loss\" (the mean next-token "
     "cross-entropy over the B*(T-1) predictions). Written atomically"},
    {NULL, NULL, NULL},
};

static const cli_spec grad_spec = {
    "grad",
    "nsa grad --checkpoint M --input TOKENS.npy --output G.safetensors [--threads N]\n"
    "         [--device cpu|cuda]",
    "Computes the loss of SPEC §5 (mean cross-entropy of next-token prediction) of the\n"
    "language model M on the tokens, with dropout off, and its gradient with respect to\n"
    "every parameter (embed, the model, lm_head), and writes them to G with the same\n"
    "names and shapes as the checkpoint. The loss is printed and stored in the metadata.",
    grad_flags,
    CLI_CONTEXT,
};

// ---------------------------------------------------------------------------------------
// Input

// Writes "[i, j]" for the flat index `flat` of an array of the given shape.
static void format_index(char *buf, size_t size, int ndim, const int64_t *shape, int64_t flat)
{
    int64_t idx[8] = {0};
    for (int d = ndim - 1; d >= 0; d--) {
        idx[d] = shape[d] > 0 ? flat % shape[d] : 0;
        flat = shape[d] > 0 ? flat / shape[d] : 0;
    }
    size_t n = (size_t)snprintf(buf, size, "[");
    for (int d = 0; d < ndim && n < size; d++)
        n += (size_t)snprintf(buf + n, size - n, "%s%lld", d ? ", " : "", (long long)idx[d]);
    if (n < size)
        snprintf(buf + n, size - n, "]");
}

// The tokens of `x` as int32 [B,T]: dtype, shape (T >= 2) and range checked. Returns 0 or
// an exit status (message printed).
static int read_tokens(const char *path, const nsa_array *x, int vocab, int32_t **out, int *batch,
                       int *seq_len)
{
    char want[160], found[160];
    snprintf(want, sizeof want, "int32 or int64 tokens [B,T] (or [T]) with T >= 2, in [0, %d)",
             vocab);
    if (x->dtype != NSA_DTYPE_I32 && x->dtype != NSA_DTYPE_I64)
        return cli_error(CLI_EXIT_USAGE, "%s: dtype %s; expected %s", path,
                         cli_dtype_name(x->dtype), want);
    cli_format_shape(found, sizeof found, x->ndim, x->shape);
    if (x->ndim != 1 && x->ndim != 2)
        return cli_error(CLI_EXIT_USAGE, "%s: shape %s has %d dimensions; expected %s", path,
                         found, x->ndim, want);
    int64_t b = x->ndim == 2 ? x->shape[0] : 1, t = x->shape[x->ndim - 1];
    if (b < 1 || t < 1)
        return cli_error(CLI_EXIT_USAGE, "%s: shape %s is empty; expected %s", path, found, want);
    if (t < 2)
        return cli_error(CLI_EXIT_USAGE, "%s: shape %s: T = %lld, but the next-token loss needs "
                         "T >= 2", path, found, (long long)t);
    if (b > INT_MAX || t > INT_MAX || (double)b * (double)t > 1e9)
        return cli_error(CLI_EXIT_USAGE, "%s: shape %s is too large", path, found);
    size_t numel = (size_t)b * (size_t)t;
    int32_t *tok = malloc(numel * sizeof *tok);
    if (!tok)
        return cli_error(CLI_EXIT_FAILURE, "out of memory reading tokens from %s", path);
    for (size_t i = 0; i < numel; i++) {
        int64_t v = x->dtype == NSA_DTYPE_I32 ? ((const int32_t *)x->data)[i]
                                              : ((const int64_t *)x->data)[i];
        if (v < 0 || v >= vocab) {
            char where[128];
            format_index(where, sizeof where, x->ndim, x->shape, (int64_t)i);
            free(tok);
            return cli_error(CLI_EXIT_USAGE, "%s: token %lld at %s is out of range [0, %d) "
                             "(vocab_size %d of the checkpoint)", path, (long long)v, where,
                             vocab, vocab);
        }
        tok[i] = (int32_t)v;
    }
    *out = tok;
    *batch = (int)b;
    *seq_len = (int)t;
    return 0;
}

// ---------------------------------------------------------------------------------------
// Output

// Writes the gradient buffer `grads` as one tensor per parameter, with the config and
// the loss in the metadata.
static int write_grads(const nsa_model *model, const float *grads, float loss, const char *path)
{
    const nsa_config *cfg = nsa_model_config(model);
    size_t num = nsa_model_num_tensors(model);
    int num_opts = nsa_config_num_options();
    nsa_tensor_info *info = calloc(num ? num : 1, sizeof *info);
    nsa__st_out_tensor *out = calloc(num ? num : 1, sizeof *out);
    const char **keys = calloc((size_t)num_opts + 2, sizeof *keys);
    const char **values = calloc((size_t)num_opts + 2, sizeof *values);
    char(*value_buf)[64] = calloc((size_t)num_opts + 1, 64);
    int rc = 0;
    if (!info || !out || !keys || !values || !value_buf) {
        rc = cli_error(CLI_EXIT_FAILURE, "out of memory writing %s", path);
        goto done;
    }
    for (size_t i = 0; i < num; i++) {
        nsa_status st = nsa_model_tensor(model, i, &info[i]);
        if (st != NSA_OK) {
            rc = cli_lib_error(st, 0);
            goto done;
        }
        out[i].name = info[i].name;
        out[i].ndim = info[i].ndim;
        out[i].shape = info[i].shape;
        out[i].data = grads + info[i].offset;
    }
    int num_meta = 0;
    for (int i = 0; i < num_opts; i++) {
        const char *name = nsa_config_option_name(i);
        if (!name || nsa_config_get(cfg, name, value_buf[i], 64) != NSA_OK)
            continue;
        keys[num_meta] = name;
        values[num_meta++] = value_buf[i];
    }
    snprintf(value_buf[num_opts], 64, "%.9g", (double)loss);
    keys[num_meta] = "loss";
    values[num_meta++] = value_buf[num_opts];
    nsa_status st = nsa__st_write(path, out, (int)num, keys, values, num_meta);
    if (st != NSA_OK)
        rc = cli_lib_error_path(st, 1, path);
done:
    free(info);
    free(out);
    free(keys);
    free(values);
    free(value_buf);
    return rc;
}

// ---------------------------------------------------------------------------------------
// nsa grad

// Forward with the activations kept, backward, gradients out. Returns 0 or a status.
static int run_grad(nsa_model *model, const int32_t *tokens, int batch, int seq_len,
                    const char *out_path)
{
    float loss = 0.0f;
    nsa_status st = nsa_lm_forward(model, tokens, batch, seq_len, NSA_FWD_KEEP, NULL, &loss);
    if (st == NSA_OK)
        st = nsa_model_zero_grads(model);
    if (st == NSA_OK)
        st = nsa_lm_backward(model, 1.0f);
    if (st != NSA_OK)
        return cli_lib_error(st, 0);
    size_t n = nsa_model_buffer_size(model);
    float *grads = malloc((n ? n : 1) * sizeof *grads);
    if (!grads)
        return cli_error(CLI_EXIT_FAILURE, "out of memory for the gradients (%zu floats)", n);
    int rc = 0;
    if ((st = nsa_model_get_grads(model, grads)) != NSA_OK)
        rc = cli_lib_error(st, 0);
    else
        rc = write_grads(model, grads, loss, out_path);
    free(grads);
    if (rc == 0)
        printf("wrote %s: loss %.9g over %d x %d predictions\n", out_path, (double)loss, batch,
               seq_len - 1);
    return rc;
}

int cmd_grad(int argc, char **argv)
{
    cli_args args;
    int rc;
    if (!cli_parse(&args, &grad_spec, argc, argv, &rc))
        return rc;
    const char *checkpoint, *input, *output;
    if ((rc = cli_require(&args, "checkpoint", &checkpoint)) ||
        (rc = cli_require(&args, "input", &input)) || (rc = cli_require(&args, "output", &output)))
        return rc;

    nsa_context *ctx = NULL;
    nsa_model *model = NULL;
    nsa_array x;
    int32_t *tokens = NULL;
    int batch = 0, seq_len = 0;
    memset(&x, 0, sizeof x);
    if ((rc = cli_context(&args, &ctx)))
        return rc;
    nsa_status st = nsa_model_load(&model, ctx, checkpoint);
    if (st != NSA_OK) {
        model = NULL;
        rc = cli_lib_error_path(st, 0, checkpoint);
    } else if (nsa_model_config(model)->vocab_size <= 0) {
        rc = cli_error(CLI_EXIT_USAGE, "%s: vocab_size = 0: grad needs a language-model "
                       "checkpoint (vocab_size > 0; nsa init --vocab-size V)", checkpoint);
    } else if ((st = nsa_npy_load(input, &x)) != NSA_OK) {
        memset(&x, 0, sizeof x);
        rc = cli_lib_error_path(st, 0, input);
    } else if ((rc = read_tokens(input, &x, nsa_model_config(model)->vocab_size, &tokens, &batch,
                                 &seq_len)) == 0) {
        rc = run_grad(model, tokens, batch, seq_len, output);
    }
    if (rc == 0 && (fflush(stdout) != 0 || ferror(stdout)))
        rc = cli_error(CLI_EXIT_FAILURE, "error writing to standard output");
    free(tokens);
    nsa_array_free(&x);
    nsa_model_free(model);
    nsa_context_free(ctx);
    return rc;
}
