/*
 * cmd_model.c — the model commands of the `nsa` program (SPEC §7):
 *   nsa info    [options | --checkpoint M] [--json]
 *   nsa init    [options] [--seed S] --out M
 *   nsa forward --checkpoint M --input X.npy --output Y.npy [--all]
 * Everything the user hands in (flags, the checkpoint, the .npy) is checked here or by
 * the library before use; failures print "nsa: ..." and exit 2 (bad input) or 1.
 */
#include "cli.h"

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

// ---------------------------------------------------------------------------------------
// Shared helpers

// The value of a config option as info shows it: num_kv_heads and compression_block
// resolved to their effective values (0 means "the default" inside the struct).
static void option_value(const nsa_config *cfg, const char *name, char *buf, size_t size)
{
    if (strcmp(name, "num_kv_heads") == 0) {
        snprintf(buf, size, "%d", nsa_config_kv_heads(cfg));
    } else if (strcmp(name, "compression_block") == 0) {
        snprintf(buf, size, "%d", nsa_config_compression_block(cfg));
    } else if (nsa_config_get(cfg, name, buf, size) != NSA_OK) {
        snprintf(buf, size, "?");
    } else if (strpbrk(buf, ".eE") && cli_is_json_number(buf)) {
        // the shortest spelling that reads back the same double ("0.1", not 0.1000...01)
        double v = strtod(buf, NULL);
        for (int digits = 1; digits <= 17; digits++) {
            char shorter[64];
            snprintf(shorter, sizeof shorter, "%.*g", digits, v);
            if (strtod(shorter, NULL) == v) {
                snprintf(buf, size, "%s", shorter);
                break;
            }
        }
    }
}

// a * b * c in size_t, 0 on overflow.
static size_t mul3(size_t a, size_t b, size_t c)
{
    if (a != 0 && b > SIZE_MAX / a)
        return 0;
    size_t ab = a * b;
    if (ab != 0 && c > SIZE_MAX / ab)
        return 0;
    return ab * c;
}

// Writes "[i, j, k]" for the flat index `flat` of an array of the given shape.
static void format_index(char *buf, size_t size, int ndim, const int64_t *shape, int64_t flat)
{
    int64_t idx[8] = {0};
    for (int d = ndim - 1; d >= 0; d--) {
        idx[d] = shape[d] > 0 ? flat % shape[d] : 0;
        flat = shape[d] > 0 ? flat / shape[d] : 0;
    }
    size_t n = 0;
    n += (size_t)snprintf(buf + n, size - n, "[");
    for (int d = 0; d < ndim && n < size; d++)
        n += (size_t)snprintf(buf + n, size - n, "%s%lld", d ? ", " : "", (long long)idx[d]);
    if (n < size)
        snprintf(buf + n, size - n, "]");
}

// ---------------------------------------------------------------------------------------
// nsa info

static const cli_flag info_flags[] = {
    {"checkpoint", "M", "read the config from checkpoint M (safetensors) instead of options"},
    {"json", NULL,
     "print one JSON object: every option by its snake_case name, param_count, "
     "output_size, buffer_size, total_params and num_tensors"},
    {NULL, NULL, NULL},
};

static const cli_spec info_spec = {
    "info",
    "nsa info [options | --checkpoint M] [--json]",
    "Prints the full config (every option of SPEC §1, num_kv_heads and compression_block\n"
    "resolved), param_count (the trained scalars of the model, not embed or lm_head),\n"
    "output_size, buffer_size (floats in the parameter buffer, alignment included),\n"
    "total_params (every tensor, embed and lm_head included) and the tensor table (name,\n"
    "shape, and 'decay' for the tensors AdamW decays). --embed-dim is required unless\n"
    "--checkpoint is given; options and --checkpoint do not mix.",
    info_flags,
    CLI_MODEL_OPTIONS | CLI_CONTEXT,
};

// The scalars of every tensor of the table (param_count plus embed and lm_head).
static nsa_status total_params(const nsa_model *model, size_t *out)
{
    size_t num = nsa_model_num_tensors(model);
    *out = 0;
    for (size_t i = 0; i < num; i++) {
        nsa_tensor_info t;
        nsa_status st = nsa_model_tensor(model, i, &t);
        if (st != NSA_OK)
            return st;
        *out += t.numel;
    }
    return NSA_OK;
}

static int info_print_json(const nsa_model *model)
{
    size_t total;
    nsa_status st = total_params(model, &total);
    if (st != NSA_OK)
        return cli_lib_error(st, 0);
    const nsa_config *cfg = nsa_model_config(model);
    int n = nsa_config_num_options();
    char value[128];
    printf("{");
    for (int i = 0; i < n; i++) {
        const char *name = nsa_config_option_name(i);
        if (!name)
            continue;
        option_value(cfg, name, value, sizeof value);
        printf("%s", i ? ", " : "");
        cli_json_string(stdout, name);
        printf(": ");
        if (cli_is_json_number(value))
            printf("%s", value);
        else
            cli_json_string(stdout, value);
    }
    printf("%s\"param_count\": %lld, \"output_size\": %lld, \"buffer_size\": %zu, "
           "\"total_params\": %zu, \"num_tensors\": %zu}\n",
           n ? ", " : "", (long long)nsa_param_count(cfg), (long long)nsa_output_size(cfg),
           nsa_model_buffer_size(model), total, nsa_model_num_tensors(model));
    return 0;
}

static int info_print_text(const nsa_model *model)
{
    const nsa_config *cfg = nsa_model_config(model);
    nsa_status st;
    size_t total;
    int n = nsa_config_num_options();
    char value[128];
    printf("config:\n");
    for (int i = 0; i < n; i++) {
        const char *name = nsa_config_option_name(i);
        if (!name)
            continue;
        option_value(cfg, name, value, sizeof value);
        printf("  %-22s %s\n", name, value);
    }
    printf("param_count              %lld\n", (long long)nsa_param_count(cfg));
    printf("output_size              %lld\n", (long long)nsa_output_size(cfg));
    printf("buffer_size              %zu   (floats in the parameter buffer)\n",
           nsa_model_buffer_size(model));
    size_t num = nsa_model_num_tensors(model);
    if ((st = total_params(model, &total)) != NSA_OK)
        return cli_lib_error(st, 0);
    printf("total_params             %zu   (every tensor, embed and lm_head included)\n", total);
    printf("tensors                  %zu   (name, shape, decay: AdamW decays it)\n", num);
    for (size_t i = 0; i < num; i++) {
        nsa_tensor_info t;
        if ((st = nsa_model_tensor(model, i, &t)) != NSA_OK)
            return cli_lib_error(st, 0);
        char shape[96];
        cli_format_shape(shape, sizeof shape, t.ndim, t.shape);
        printf("  %-44s %-16s %s\n", t.name, shape, t.decay ? "decay" : "-");
    }
    return 0;
}

int cmd_info(int argc, char **argv)
{
    cli_args args;
    int rc;
    if (!cli_parse(&args, &info_spec, argc, argv, &rc))
        return rc;
    const char *checkpoint = cli_get(&args, "checkpoint");
    nsa_config cfg;
    if (checkpoint) {
        if ((rc = cli_no_model_options(&args, "cannot be combined with --checkpoint (the "
                                              "checkpoint holds the config)")))
            return rc;
    } else if ((rc = cli_model_config(&args, &cfg))) {
        return rc;
    }

    nsa_context *ctx = NULL;
    nsa_model *model = NULL;
    if ((rc = cli_context(&args, &ctx)))
        return rc;
    nsa_status st = checkpoint ? nsa_model_load(&model, ctx, checkpoint)
                               : nsa_model_create(&model, ctx, &cfg);
    if (st != NSA_OK) {
        model = NULL;
        rc = checkpoint ? cli_lib_error_path(st, 0, checkpoint) : cli_lib_error(st, 0);
    } else if (cli_has(&args, "json")) {
        rc = info_print_json(model);
    } else {
        rc = info_print_text(model);
    }
    if (rc == 0 && (fflush(stdout) != 0 || ferror(stdout)))
        rc = cli_error(CLI_EXIT_FAILURE, "error writing to standard output");
    nsa_model_free(model);
    nsa_context_free(ctx);
    return rc;
}

// ---------------------------------------------------------------------------------------
// nsa init

static const cli_flag init_flags[] = {
    {"seed", "S", "seed of the initialisation (default 0); the same seed gives the same file"},
    {"out", "M", "the checkpoint to write (safetensors, written atomically); required"},
    {NULL, NULL, NULL},
};

static const cli_spec init_spec = {
    "init",
    "nsa init [options] [--seed S] --out M",
    "Creates a model for the options (--embed-dim required) and initialises it as SPEC §2\n"
    "says (Glorot-uniform linears, zero biases, LayerNorm ones/zeros, static gates 0,\n"
    "conv weights 1/l, embedding N(0,1)) from a deterministic generator seeded by S, then\n"
    "saves it as checkpoint M with every option in its metadata.",
    init_flags,
    CLI_MODEL_OPTIONS | CLI_CONTEXT,
};

int cmd_init(int argc, char **argv)
{
    cli_args args;
    int rc;
    if (!cli_parse(&args, &init_spec, argc, argv, &rc))
        return rc;
    nsa_config cfg;
    uint64_t seed;
    const char *out;
    if ((rc = cli_model_config(&args, &cfg)) || (rc = cli_get_u64(&args, "seed", 0, &seed)) ||
        (rc = cli_require(&args, "out", &out)))
        return rc;

    nsa_context *ctx = NULL;
    nsa_model *model = NULL;
    if ((rc = cli_context(&args, &ctx)))
        return rc;
    nsa_status st = nsa_model_create(&model, ctx, &cfg);
    if (st != NSA_OK) {
        model = NULL;
        rc = cli_lib_error(st, 0);
    } else if ((st = nsa_model_init(model, seed)) != NSA_OK) {
        rc = cli_lib_error(st, 0);
    } else if ((st = nsa_model_save(model, out)) != NSA_OK) {
        rc = cli_lib_error_path(st, 1, out);
    } else {
        printf("wrote %s: param_count %lld, buffer_size %zu, seed %llu\n", out,
               (long long)nsa_param_count(&cfg), nsa_model_buffer_size(model),
               (unsigned long long)seed);
    }
    nsa_model_free(model);
    nsa_context_free(ctx);
    return rc;
}

// ---------------------------------------------------------------------------------------
// nsa forward

static const cli_flag forward_flags[] = {
    {"checkpoint", "M", "the model (safetensors, as written by nsa init or nsa train); required"},
    {"input", "X.npy",
     "the input; required. float32 or float64 [B,T,E] (float64 is converted to "
     "float32), or [T,E] for a single sequence. For a checkpoint with vocab_size > 0: "
     "int32 or int64 tokens [B,T] (or [T]) in [0, vocab_size). NaN or Inf is refused"},
    {"output", "Y.npy",
     "the output, float32; required. [B,D] (the last position) or [B,T,D] with "
     "--all; logits [B,T,V] for a language model. A [T,...] input gives the output "
     "without its B axis. Written atomically: on any failure no file is created"},
    {"all", NULL, "output every position [B,T,D] (no effect on logits, always [B,T,V])"},
    {NULL, NULL, NULL},
};

static const cli_spec forward_spec = {
    "forward",
    "nsa forward --checkpoint M --input X.npy --output Y.npy [--all] [--threads N]",
    "Runs the model of checkpoint M at inference (dropout off) on X and writes Y.\n"
    "The model options come from the checkpoint; any T >= 1 is accepted.",
    forward_flags,
    CLI_CONTEXT,
};

// Checks the input's ndim and that its last `tail` dims match; fills batch and seq_len
// (a missing batch axis is B = 1). Returns 0 or 2 (message printed).
static int check_shape(const char *path, const nsa_array *x, int tail_dim, const char *want,
                       int *batch, int *seq_len)
{
    int tail = tail_dim > 0 ? 1 : 0; // features have a last axis E, tokens none
    int full = 2 + tail;
    char found[160];
    cli_format_shape(found, sizeof found, x->ndim, x->shape);
    if (x->ndim != full && x->ndim != full - 1)
        return cli_error(CLI_EXIT_USAGE, "%s: shape %s has %d dimensions; expected %s", path,
                         found, x->ndim, want);
    if (tail && x->shape[x->ndim - 1] != tail_dim)
        return cli_error(CLI_EXIT_USAGE, "%s: shape %s does not match the checkpoint: "
                         "expected %s (last dim %d)", path, found, want, tail_dim);
    int64_t b = x->ndim == full ? x->shape[0] : 1;
    int64_t t = x->shape[x->ndim == full ? 1 : 0];
    if (b < 1 || t < 1)
        return cli_error(CLI_EXIT_USAGE, "%s: shape %s is empty; expected %s with B, T >= 1",
                         path, found, want);
    if (b > INT_MAX || t > INT_MAX)
        return cli_error(CLI_EXIT_USAGE, "%s: shape %s is too large", path, found);
    *batch = (int)b;
    *seq_len = (int)t;
    return 0;
}

// The input as float32 (a copy when it was float64), every element finite.
static int features_to_f32(const char *path, const nsa_array *x, float **out, float **owned)
{
    int64_t numel = nsa_array_numel(x);
    char where[128];
    *owned = NULL;
    if (x->dtype == NSA_DTYPE_F32) {
        const float *v = x->data;
        for (int64_t i = 0; i < numel; i++) {
            if (!isfinite(v[i])) {
                format_index(where, sizeof where, x->ndim, x->shape, i);
                return cli_error(CLI_EXIT_USAGE, "%s: %s at %s; the input must be finite", path,
                                 isnan(v[i]) ? "NaN" : "Inf", where);
            }
        }
        *out = x->data;
        return 0;
    }
    const double *v = x->data;
    float *f = malloc((size_t)numel * sizeof *f);
    if (!f)
        return cli_error(CLI_EXIT_FAILURE, "out of memory converting %s to float32", path);
    for (int64_t i = 0; i < numel; i++) {
        f[i] = (float)v[i];
        if (!isfinite(f[i])) {
            format_index(where, sizeof where, x->ndim, x->shape, i);
            free(f);
            return cli_error(CLI_EXIT_USAGE, "%s: %s at %s; the input must be finite%s", path,
                             isnan(v[i]) ? "NaN" : "Inf", where,
                             isfinite(v[i]) ? " (the value overflows float32)" : "");
        }
    }
    *out = *owned = f;
    return 0;
}

// Tokens as int32, each in [0, vocab).
static int tokens_to_i32(const char *path, const nsa_array *x, int vocab, int32_t **out)
{
    int64_t numel = nsa_array_numel(x);
    int32_t *tok = malloc((size_t)numel * sizeof *tok);
    if (!tok)
        return cli_error(CLI_EXIT_FAILURE, "out of memory reading tokens from %s", path);
    for (int64_t i = 0; i < numel; i++) {
        int64_t v = x->dtype == NSA_DTYPE_I32 ? ((const int32_t *)x->data)[i]
                                              : ((const int64_t *)x->data)[i];
        if (v < 0 || v >= vocab) {
            char where[128];
            format_index(where, sizeof where, x->ndim, x->shape, i);
            free(tok);
            return cli_error(CLI_EXIT_USAGE, "%s: token %lld at %s is out of range [0, %d) "
                             "(vocab_size %d of the checkpoint)", path, (long long)v, where,
                             vocab, vocab);
        }
        tok[i] = (int32_t)v;
    }
    *out = tok;
    return 0;
}

// Writes y (owned by the caller) as a float32 .npy; shape without the batch axis when
// the input had none.
static int save_output(const char *path, float *y, int ndim, const int64_t *shape)
{
    nsa_array a;
    memset(&a, 0, sizeof a);
    a.dtype = NSA_DTYPE_F32;
    a.ndim = ndim;
    for (int d = 0; d < ndim; d++)
        a.shape[d] = shape[d];
    a.data = y;
    nsa_status st = nsa_npy_save(path, &a);
    return st == NSA_OK ? 0 : cli_lib_error_path(st, 1, path);
}

static int forward_features(nsa_model *model, const char *in_path, const nsa_array *x,
                            const char *out_path, int all)
{
    const nsa_config *cfg = nsa_model_config(model);
    int embed = cfg->embed_dim, hidden = (int)nsa_output_size(cfg);
    char want[96];
    snprintf(want, sizeof want, "float32 or float64 [B,T,%d] (or [T,%d])", embed, embed);
    if (x->dtype != NSA_DTYPE_F32 && x->dtype != NSA_DTYPE_F64)
        return cli_error(CLI_EXIT_USAGE, "%s: dtype %s; expected %s", in_path,
                         cli_dtype_name(x->dtype), want);
    int batch, seq_len, rc;
    if ((rc = check_shape(in_path, x, embed, want, &batch, &seq_len)))
        return rc;
    float *xf = NULL, *owned = NULL;
    if ((rc = features_to_f32(in_path, x, &xf, &owned)))
        return rc;
    size_t rows = all ? (size_t)seq_len : 1;
    size_t numel = mul3((size_t)batch, rows, (size_t)hidden);
    float *y = numel && numel <= SIZE_MAX / sizeof(float) ? malloc(numel * sizeof(float)) : NULL;
    if (!y) {
        free(owned);
        return cli_error(CLI_EXIT_FAILURE, "out of memory for the output (%d x %zu x %d floats)",
                         batch, rows, hidden);
    }
    nsa_status st = nsa_model_forward(model, xf, batch, seq_len,
                                      all ? NSA_FWD_ALL_POSITIONS : 0u, y);
    free(owned);
    if (st != NSA_OK) {
        free(y);
        return cli_lib_error(st, 0);
    }
    int64_t shape[3];
    int ndim = 0;
    if (x->ndim == 3)
        shape[ndim++] = batch;
    if (all)
        shape[ndim++] = seq_len;
    shape[ndim++] = hidden;
    rc = save_output(out_path, y, ndim, shape);
    free(y);
    return rc;
}

static int forward_lm(nsa_model *model, const char *in_path, const nsa_array *x,
                      const char *out_path)
{
    int vocab = nsa_model_config(model)->vocab_size;
    char want[128];
    snprintf(want, sizeof want, "int32 or int64 tokens [B,T] (or [T]) for a language model "
             "with vocab_size %d", vocab);
    if (x->dtype != NSA_DTYPE_I32 && x->dtype != NSA_DTYPE_I64)
        return cli_error(CLI_EXIT_USAGE, "%s: dtype %s; expected %s", in_path,
                         cli_dtype_name(x->dtype), want);
    int batch, seq_len, rc;
    if ((rc = check_shape(in_path, x, 0, want, &batch, &seq_len)))
        return rc;
    int32_t *tokens = NULL;
    if ((rc = tokens_to_i32(in_path, x, vocab, &tokens)))
        return rc;
    size_t numel = mul3((size_t)batch, (size_t)seq_len, (size_t)vocab);
    float *logits = numel && numel <= SIZE_MAX / sizeof(float) ? malloc(numel * sizeof(float))
                                                               : NULL;
    if (!logits) {
        free(tokens);
        return cli_error(CLI_EXIT_FAILURE, "out of memory for the logits (%d x %d x %d floats)",
                         batch, seq_len, vocab);
    }
    nsa_status st = nsa_lm_forward(model, tokens, batch, seq_len, 0u, logits, NULL);
    free(tokens);
    if (st != NSA_OK) {
        free(logits);
        return cli_lib_error(st, 0);
    }
    int64_t shape[3];
    int ndim = 0;
    if (x->ndim == 2)
        shape[ndim++] = batch;
    shape[ndim++] = seq_len;
    shape[ndim++] = vocab;
    rc = save_output(out_path, logits, ndim, shape);
    free(logits);
    return rc;
}

int cmd_forward(int argc, char **argv)
{
    cli_args args;
    int rc;
    if (!cli_parse(&args, &forward_spec, argc, argv, &rc))
        return rc;
    const char *checkpoint, *input, *output;
    if ((rc = cli_require(&args, "checkpoint", &checkpoint)) ||
        (rc = cli_require(&args, "input", &input)) || (rc = cli_require(&args, "output", &output)))
        return rc;

    nsa_context *ctx = NULL;
    nsa_model *model = NULL;
    nsa_array x;
    memset(&x, 0, sizeof x);
    if ((rc = cli_context(&args, &ctx)))
        return rc;
    nsa_status st = nsa_model_load(&model, ctx, checkpoint);
    if (st != NSA_OK) {
        model = NULL;
        rc = cli_lib_error_path(st, 0, checkpoint);
    } else if ((st = nsa_npy_load(input, &x)) != NSA_OK) {
        memset(&x, 0, sizeof x);
        rc = cli_lib_error_path(st, 0, input);
    } else if (nsa_model_config(model)->vocab_size > 0) {
        rc = forward_lm(model, input, &x, output);
    } else {
        rc = forward_features(model, input, &x, output, cli_has(&args, "all"));
    }
    nsa_array_free(&x);
    nsa_model_free(model);
    nsa_context_free(ctx);
    return rc;
}
