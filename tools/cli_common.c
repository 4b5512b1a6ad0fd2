/*
 * cli_common.c — what every `nsa` subcommand shares: the flag parser, help text for the
 * SPEC §1 options, strict number parsing, errors and exit statuses, and the context
 * made from --threads / --device. The list of model options comes from the library
 * (nsa_config_option_name), so a new option becomes a flag without touching this file.
 */
#include "cli.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

// ---------------------------------------------------------------------------------------
// Help text of the SPEC §1 options (default and rule). An option the library knows but
// this table does not still works as a flag; its help then shows the library's default.

typedef struct option_help {
    const char *name;
    const char *metavar;
    const char *fallback; // default as shown
    const char *rule;
} option_help;

static const option_help option_helps[] = {
    {"embed_dim", "N", "required", "E, input feature size; >= 1"},
    {"hidden_size", "N", "256", "D, model width; >= 1"},
    {"num_heads", "N", "8", "H, query heads; >= 1"},
    {"head_dim", "N", "32", "d; >= 1 (need not satisfy H*d == D)"},
    {"window_size", "N", "64", "w, sliding window; >= 1"},
    {"block_size", "N", "16", "b, selection block; >= 1"},
    {"num_selected_blocks", "N", "8", "n, blocks each query selects; >= 1"},
    {"compression_ratio", "N", "4", "r, compression stride; >= 1"},
    {"num_layers", "N", "4", "N, blocks; >= 1"},
    {"dropout", "P", "0.1", "p; 0 <= p < 1 (off at inference)"},
    {"seq_len", "N", "256",
     "expected length (buffers, benchmarks); >= 1; any T >= 1 runs"},
    {"num_kv_heads", "N", "= num_heads", "G; divides num_heads (GQA when smaller)"},
    {"compression_block", "N", "= compression_ratio",
     "l; a multiple of compression_ratio (overlapping blocks when larger)"},
    {"compress", "NAME", "mean", "mean, conv or mlp"},
    {"select_score", "NAME", "mean_key",
     "mean_key (seed) or cmp_attn (paper; needs block_size % compression_ratio == 0)"},
    {"select_fixed", "NAME", "none",
     "none, or paper: block 0 and the 2 most recent blocks always selected "
     "(counted in num_selected_blocks; needs num_selected_blocks >= 3)"},
    {"gate", "NAME", "static", "static (seed) or token (paper)"},
    {"rope_theta", "X", "0: off", "> 0 turns rotary position embedding on (head_dim even)"},
    {"vocab_size", "N", "0", "V; > 0 adds the language-model wrapper (tokens in, logits out)"},
};

static const option_help *find_option_help(const char *name)
{
    for (size_t i = 0; i < sizeof option_helps / sizeof option_helps[0]; i++)
        if (strcmp(option_helps[i].name, name) == 0)
            return &option_helps[i];
    return NULL;
}

// ---------------------------------------------------------------------------------------
// Errors and exit statuses

int cli_error(int code, const char *fmt, ...)
{
    va_list ap;
    fputs("nsa: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return code;
}

int cli_exit_code(nsa_status status, int writing)
{
    switch (status) {
    case NSA_OK: return CLI_EXIT_OK;
    case NSA_ERR_INVALID:
    case NSA_ERR_SHAPE:
    case NSA_ERR_NUMERIC:
    case NSA_ERR_FORMAT: return CLI_EXIT_USAGE;
    case NSA_ERR_IO: return writing ? CLI_EXIT_FAILURE : CLI_EXIT_USAGE;
    default: return CLI_EXIT_FAILURE;
    }
}

int cli_lib_error(nsa_status status, int writing)
{
    const char *msg = nsa_last_error();
    if (!msg || !msg[0])
        msg = nsa_status_str(status);
    return cli_error(cli_exit_code(status, writing), "%s", msg);
}

int cli_lib_error_path(nsa_status status, int writing, const char *path)
{
    const char *msg = nsa_last_error();
    if (!msg || !msg[0])
        msg = nsa_status_str(status);
    if (strstr(msg, path))
        return cli_error(cli_exit_code(status, writing), "%s", msg);
    return cli_error(cli_exit_code(status, writing), "%s: %s", path, msg);
}

// ---------------------------------------------------------------------------------------
// Names: flags are kebab-case, options snake_case; both spellings are accepted.

// Copies the flag name (up to '=' or the end) into buf with '_' turned into '-'.
// Returns 0 when it does not fit or is empty.
static int flag_name(const char *arg, char *buf, size_t size)
{
    size_t n = strcspn(arg, "=");
    if (n == 0 || n >= size)
        return 0;
    for (size_t i = 0; i < n; i++)
        buf[i] = arg[i] == '_' ? '-' : arg[i];
    buf[n] = '\0';
    return 1;
}

static void kebab_to_snake(const char *in, char *out, size_t size)
{
    size_t i = 0;
    for (; in[i] && i + 1 < size; i++)
        out[i] = in[i] == '-' ? '_' : in[i];
    out[i] = '\0';
}

static void snake_to_kebab(const char *in, char *out, size_t size)
{
    size_t i = 0;
    for (; in[i] && i + 1 < size; i++)
        out[i] = in[i] == '_' ? '-' : in[i];
    out[i] = '\0';
}

// The library's name of the model option spelled `kebab`, or NULL.
static const char *model_option(const char *kebab)
{
    char snake[64];
    kebab_to_snake(kebab, snake, sizeof snake);
    int n = nsa_config_num_options();
    for (int i = 0; i < n; i++) {
        const char *name = nsa_config_option_name(i);
        if (name && strcmp(name, snake) == 0)
            return name;
    }
    return NULL;
}

static int spec_flag_index(const cli_spec *spec, const char *kebab)
{
    for (int i = 0; spec->flags && spec->flags[i].name && i < CLI_MAX_FLAGS; i++)
        if (strcmp(spec->flags[i].name, kebab) == 0)
            return i;
    return -1;
}

// ---------------------------------------------------------------------------------------
// The parser

// The value of the flag at argv[*i]: after '=' or the next argument. NULL (and an error
// printed) when missing or empty.
static const char *take_value(int argc, char **argv, int *i, const char *kebab)
{
    const char *eq = strchr(argv[*i], '=');
    const char *value;
    if (eq) {
        value = eq + 1;
    } else {
        if (*i + 1 >= argc) {
            cli_error(CLI_EXIT_USAGE, "--%s needs a value", kebab);
            return NULL;
        }
        value = argv[*i + 1];
        // "--out --all" is a forgotten value, not a file called "--all" (use --out=--all).
        if (value[0] == '-' && value[1] == '-' && value[2] != '\0') {
            cli_error(CLI_EXIT_USAGE, "--%s needs a value (found the flag %s)", kebab, value);
            return NULL;
        }
        (*i)++;
    }
    if (value[0] == '\0') {
        cli_error(CLI_EXIT_USAGE, "--%s needs a value (found an empty string)", kebab);
        return NULL;
    }
    return value;
}

// --preset must act before the options whatever its position, so it is found first.
static int apply_preset(cli_args *args, int argc, char **argv)
{
    const char *preset = NULL;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "--") == 0)
            break;
        if (strncmp(arg, "--preset", 8) == 0 && (arg[8] == '\0' || arg[8] == '=')) {
            preset = arg[8] == '=' ? arg + 9 : (i + 1 < argc ? argv[i + 1] : NULL);
            i++;
        }
    }
    if (!preset || strcmp(preset, "seed") == 0 || strcmp(preset, "default") == 0) {
        nsa_config_default(&args->config);
    } else if (strcmp(preset, "paper") == 0) {
        nsa_paper_defaults(&args->config);
    } else {
        return cli_error(CLI_EXIT_USAGE, "--preset %s: unknown preset (seed or paper)", preset);
    }
    return 0;
}

int cli_parse(cli_args *args, const cli_spec *spec, int argc, char **argv, int *exit_code)
{
    memset(args, 0, sizeof *args);
    args->spec = spec;
    *exit_code = CLI_EXIT_USAGE;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            cli_print_help(spec, stdout);
            *exit_code = CLI_EXIT_OK;
            return 0;
        }
    }
    if (spec->features & CLI_MODEL_OPTIONS) {
        if (apply_preset(args, argc, argv))
            return 0;
    } else {
        nsa_config_default(&args->config);
    }

    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        char kebab[64];
        if (strcmp(arg, "--") == 0) {
            if (i + 1 == argc)
                break;
            cli_error(CLI_EXIT_USAGE, "%s: unexpected argument '%s'", spec->command,
                      argv[i + 1]);
            return 0;
        }
        if (arg[0] != '-' || arg[1] != '-') {
            cli_error(CLI_EXIT_USAGE, "%s: unexpected argument '%s' (flags start with --; "
                      "see nsa %s --help)", spec->command, arg, spec->command);
            return 0;
        }
        if (!flag_name(arg + 2, kebab, sizeof kebab)) {
            cli_error(CLI_EXIT_USAGE, "unknown flag %s for 'nsa %s' (see nsa %s --help)", arg,
                      spec->command, spec->command);
            return 0;
        }

        int k = spec_flag_index(spec, kebab);
        if (k >= 0) {
            if (!spec->flags[k].metavar) {
                if (strchr(arg, '=')) {
                    cli_error(CLI_EXIT_USAGE, "--%s takes no value", kebab);
                    return 0;
                }
                args->values[k] = "";
            } else if (!(args->values[k] = take_value(argc, argv, &i, kebab))) {
                return 0;
            }
            continue;
        }
        if ((spec->features & CLI_CONTEXT) &&
            (strcmp(kebab, "threads") == 0 || strcmp(kebab, "device") == 0 ||
             strcmp(kebab, "precision") == 0)) {
            const char *value = take_value(argc, argv, &i, kebab);
            if (!value)
                return 0;
            if (kebab[0] == 't')
                args->threads = value;
            else if (kebab[0] == 'd')
                args->device = value;
            else
                args->precision = value;
            continue;
        }
        if ((spec->features & CLI_MODEL_OPTIONS) && strcmp(kebab, "preset") == 0) {
            if (!take_value(argc, argv, &i, kebab)) // applied by apply_preset
                return 0;
            continue;
        }
        const char *option = model_option(kebab);
        if (option && (spec->features & CLI_MODEL_OPTIONS)) {
            const char *value = take_value(argc, argv, &i, kebab);
            if (!value)
                return 0;
            nsa_status st = nsa_config_set(&args->config, option, value);
            if (st != NSA_OK) {
                const char *msg = nsa_last_error();
                if (msg && msg[0])
                    cli_error(CLI_EXIT_USAGE, "%s", msg);
                else
                    cli_error(CLI_EXIT_USAGE, "--%s %s: invalid value", kebab, value);
                return 0;
            }
            if (args->num_model_options++ == 0)
                args->first_model_option = arg;
            if (strcmp(option, "embed_dim") == 0)
                args->embed_dim_given = 1;
            continue;
        }
        if (option)
            cli_error(CLI_EXIT_USAGE, "--%s: 'nsa %s' takes no model options (the config comes "
                      "from the checkpoint)", kebab, spec->command);
        else
            cli_error(CLI_EXIT_USAGE, "unknown flag --%s for 'nsa %s' (see nsa %s --help)", kebab,
                      spec->command, spec->command);
        return 0;
    }
    *exit_code = CLI_EXIT_OK;
    return 1;
}

const char *cli_get(const cli_args *args, const char *name)
{
    int k = spec_flag_index(args->spec, name);
    return k >= 0 ? args->values[k] : NULL;
}

int cli_has(const cli_args *args, const char *name)
{
    return cli_get(args, name) != NULL;
}

int cli_require(const cli_args *args, const char *name, const char **out)
{
    int k = spec_flag_index(args->spec, name);
    *out = k >= 0 ? args->values[k] : NULL;
    if (*out)
        return 0;
    return cli_error(CLI_EXIT_USAGE, "--%s %s is required (see nsa %s --help)", name,
                     k >= 0 && args->spec->flags[k].metavar ? args->spec->flags[k].metavar
                                                             : "VALUE",
                     args->spec->command);
}

// ---------------------------------------------------------------------------------------
// Numbers: the whole string must be the number, no leading blanks.

static int parse_ll(const char *flag, const char *s, long long lo, long long hi,
                    long long *out)
{
    char *end;
    errno = 0;
    long long v = isspace((unsigned char)s[0]) ? 0 : strtoll(s, &end, 10);
    if (isspace((unsigned char)s[0]) || end == s || *end != '\0')
        return cli_error(CLI_EXIT_USAGE, "--%s %s: not an integer", flag, s);
    if (errno == ERANGE || v < lo || v > hi)
        return cli_error(CLI_EXIT_USAGE, "--%s %s: must be in [%lld, %lld]", flag, s, lo, hi);
    *out = v;
    return 0;
}

int cli_get_int(const cli_args *args, const char *name, long long lo, long long hi,
                long long fallback, long long *out)
{
    const char *s = cli_get(args, name);
    if (!s) {
        *out = fallback;
        return 0;
    }
    return parse_ll(name, s, lo, hi, out);
}

int cli_get_u64(const cli_args *args, const char *name, uint64_t fallback, uint64_t *out)
{
    const char *s = cli_get(args, name);
    if (!s) {
        *out = fallback;
        return 0;
    }
    char *end;
    errno = 0;
    unsigned long long v = 0;
    if (isdigit((unsigned char)s[0]))
        v = strtoull(s, &end, 10);
    if (!isdigit((unsigned char)s[0]) || *end != '\0')
        return cli_error(CLI_EXIT_USAGE, "--%s %s: not a non-negative integer", name, s);
    if (errno == ERANGE)
        return cli_error(CLI_EXIT_USAGE, "--%s %s: must be < 2^64", name, s);
    *out = (uint64_t)v;
    return 0;
}

int cli_get_double(const cli_args *args, const char *name, double lo, double hi,
                   double fallback, double *out)
{
    const char *s = cli_get(args, name);
    if (!s) {
        *out = fallback;
        return 0;
    }
    char *end;
    errno = 0;
    double v = isspace((unsigned char)s[0]) ? 0 : strtod(s, &end);
    if (isspace((unsigned char)s[0]) || end == s || *end != '\0' || !isfinite(v))
        return cli_error(CLI_EXIT_USAGE, "--%s %s: not a finite number", name, s);
    if (v < lo || v > hi)
        return cli_error(CLI_EXIT_USAGE, "--%s %s: must be in [%g, %g]", name, s, lo, hi);
    *out = v;
    return 0;
}

// ---------------------------------------------------------------------------------------
// Config and context

int cli_model_config(const cli_args *args, nsa_config *out)
{
    if (!args->embed_dim_given)
        return cli_error(CLI_EXIT_USAGE, "--embed-dim N is required (the input feature size; "
                         "see nsa %s --help)", args->spec->command);
    nsa_status st = nsa_config_validate(&args->config);
    if (st != NSA_OK)
        return cli_lib_error(st, 0);
    *out = args->config;
    return 0;
}

int cli_no_model_options(const cli_args *args, const char *why)
{
    if (args->num_model_options == 0)
        return 0;
    return cli_error(CLI_EXIT_USAGE, "%s: %s", args->first_model_option, why);
}

int cli_context(const cli_args *args, nsa_context **out)
{
    nsa_device device = NSA_DEVICE_CPU;
    long long threads = 0;
    *out = NULL;
    if (args->device && nsa_device_parse(args->device, &device) != NSA_OK)
        return cli_error(CLI_EXIT_USAGE, "--device %s: unknown device (cpu or cuda)",
                         args->device);
    if (args->threads && parse_ll("threads", args->threads, 0, 4096, &threads))
        return CLI_EXIT_USAGE;
    nsa_precision precision = NSA_PRECISION_FP32;
    if (args->precision && nsa_precision_parse(args->precision, &precision) != NSA_OK)
        return cli_error(CLI_EXIT_USAGE, "--precision %s: unknown precision (fp32 or bf16)",
                         args->precision);
    if (precision == NSA_PRECISION_BF16 && device != NSA_DEVICE_CUDA)
        return cli_error(CLI_EXIT_USAGE, "--precision bf16: needs --device cuda (the CPU "
                                         "backend computes in fp32)");
    nsa_status st = nsa_context_create(out, device, (int)threads);
    if (st == NSA_OK)
        st = nsa_context_set_precision(*out, precision);
    if (st != NSA_OK) {
        nsa_context_free(*out);
        *out = NULL;
        return cli_lib_error(st, 0);
    }
    return 0;
}

// ---------------------------------------------------------------------------------------
// Help

#define HELP_COLUMN 28 // where the help text starts
#define HELP_WIDTH 98   // where it wraps

// "  --name META   help", the help word-wrapped (and split at '\n') under itself.
static void print_flag(FILE *fp, const char *name, const char *metavar, const char *help)
{
    char left[96];
    snprintf(left, sizeof left, "--%s%s%s", name, metavar ? " " : "", metavar ? metavar : "");
    int col = fprintf(fp, "  %s", left);
    if (col >= HELP_COLUMN) {
        fputc('\n', fp);
        col = 0;
    }
    fprintf(fp, "%*s", HELP_COLUMN - col, "");
    col = HELP_COLUMN;
    const char *p = help;
    while (*p) {
        if (*p == '\n') {
            fprintf(fp, "\n%*s", HELP_COLUMN, "");
            col = HELP_COLUMN;
            p++;
            continue;
        }
        size_t word = strcspn(p, " \n");
        if (col > HELP_COLUMN && col + 1 + (int)word > HELP_WIDTH) {
            fprintf(fp, "\n%*s", HELP_COLUMN, "");
            col = HELP_COLUMN;
        } else if (col > HELP_COLUMN) {
            fputc(' ', fp);
            col++;
        }
        fwrite(p, 1, word, fp);
        col += (int)word;
        p += word;
        while (*p == ' ')
            p++;
    }
    fputc('\n', fp);
}

static void print_text(FILE *fp, const char *text)
{
    fprintf(fp, "%s\n", text);
}

void cli_print_help(const cli_spec *spec, FILE *fp)
{
    fprintf(fp, "usage: %s\n\n", spec->usage);
    if (spec->description)
        print_text(fp, spec->description);
    fprintf(fp, "\nflags:\n");
    for (int i = 0; spec->flags && spec->flags[i].name; i++)
        print_flag(fp, spec->flags[i].name, spec->flags[i].metavar, spec->flags[i].help);
    if (spec->features & CLI_CONTEXT) {
        print_flag(fp, "threads", "N", "CPU threads (default 0: OpenMP's default)");
        print_flag(fp, "device", "NAME", "cpu (default) or cuda");
        print_flag(fp, "precision", "P",
                   "fp32 (default) or bf16: bf16 operands on tensor cores, fp32 accumulation "
                   "and storage (cuda only)");
    }
    print_flag(fp, "help", NULL, "this text");
    if (!(spec->features & CLI_MODEL_OPTIONS))
        return;

    fprintf(fp, "\nmodel options (SPEC §1), as --kebab-case VALUE or --kebab-case=VALUE;\n"
                "a rule broken is refused with a message naming the option:\n");
    print_flag(fp, "preset", "NAME",
               "seed (default): the defaults below; paper: the paper's shape scaled down "
               "(num_kv_heads = H/4, compression_block 32, compression_ratio 16, "
               "block_size 64, num_selected_blocks 16, select_fixed paper, window_size 512, "
               "compress mlp, select_score cmp_attn, gate token, rope_theta 10000); applied "
               "first, the other options then change it");
    nsa_config defaults;
    nsa_config_default(&defaults);
    int n = nsa_config_num_options();
    for (int i = 0; i < n; i++) {
        const char *name = nsa_config_option_name(i);
        if (!name)
            continue;
        char kebab[64], help[512], value[64];
        snake_to_kebab(name, kebab, sizeof kebab);
        const option_help *h = find_option_help(name);
        if (h) {
            snprintf(help, sizeof help, "%s (%s%s)", h->rule,
                     strcmp(h->fallback, "required") ? "default " : "", h->fallback);
        } else {
            if (nsa_config_get(&defaults, name, value, sizeof value) != NSA_OK)
                snprintf(value, sizeof value, "?");
            snprintf(help, sizeof help, "(default %s)", value);
        }
        print_flag(fp, kebab, h ? h->metavar : "VALUE", help);
    }
}

// ---------------------------------------------------------------------------------------
// Output helpers

void cli_json_string(FILE *fp, const char *s)
{
    fputc('"', fp);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\')
            fprintf(fp, "\\%c", *p);
        else if (*p < 0x20)
            fprintf(fp, "\\u%04x", *p);
        else
            fputc(*p, fp);
    }
    fputc('"', fp);
}

int cli_is_json_number(const char *s)
{
    const char *p = s;
    if (*p == '-')
        p++;
    if (!isdigit((unsigned char)*p))
        return 0;
    if (*p == '0' && isdigit((unsigned char)p[1]))
        return 0;
    while (isdigit((unsigned char)*p))
        p++;
    if (*p == '.') {
        p++;
        if (!isdigit((unsigned char)*p))
            return 0;
        while (isdigit((unsigned char)*p))
            p++;
    }
    if (*p == 'e' || *p == 'E') {
        p++;
        if (*p == '+' || *p == '-')
            p++;
        if (!isdigit((unsigned char)*p))
            return 0;
        while (isdigit((unsigned char)*p))
            p++;
    }
    return *p == '\0';
}

void cli_format_shape(char *buf, size_t size, int ndim, const int64_t *shape)
{
    size_t n = (size_t)snprintf(buf, size, "[");
    for (int d = 0; d < ndim && n < size; d++)
        n += (size_t)snprintf(buf + n, size - n, "%s%lld", d ? ", " : "", (long long)shape[d]);
    if (n < size)
        snprintf(buf + n, size - n, "]");
}

const char *cli_dtype_name(nsa_dtype dtype)
{
    switch (dtype) {
    case NSA_DTYPE_F32: return "float32";
    case NSA_DTYPE_F64: return "float64";
    case NSA_DTYPE_I32: return "int32";
    case NSA_DTYPE_I64: return "int64";
    case NSA_DTYPE_U16: return "uint16";
    case NSA_DTYPE_BF16: return "bfloat16";
    }
    return "unknown";
}
