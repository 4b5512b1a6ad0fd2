/*
 * config.c — the model configuration: defaults, validation, parameter count, and the
 * options by name (what checkpoints store and the command line parses). SPEC §1, §4.
 */
#include "internal.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// Upper bound on every size option: keeps products of sizes far from overflow and turns
// absurd values (a typo, a corrupt checkpoint) into a clear error instead of a huge malloc.
#define NSA_MAX_DIM (1 << 24)

void nsa_config_default(nsa_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->embed_dim = 0;
    cfg->hidden_size = 256;
    cfg->num_heads = 8;
    cfg->head_dim = 32;
    cfg->window_size = 64;
    cfg->block_size = 16;
    cfg->num_selected_blocks = 8;
    cfg->compression_ratio = 4;
    cfg->num_layers = 4;
    cfg->dropout = 0.1;
    cfg->seq_len = 256;
    cfg->num_kv_heads = 0;
    cfg->compression_block = 0;
    cfg->compress = NSA_COMPRESS_MEAN;
    cfg->select_score = NSA_SELECT_MEAN_KEY;
    cfg->select_fixed = NSA_SELECT_FIXED_NONE;
    cfg->gate = NSA_GATE_STATIC;
    cfg->rope_theta = 0.0;
    cfg->vocab_size = 0;
}

void nsa_recommended_defaults(nsa_config *cfg)
{
    nsa_config_default(cfg);
}

void nsa_paper_defaults(nsa_config *cfg)
{
    nsa_config_default(cfg);
    cfg->num_kv_heads = cfg->num_heads / 4;
    cfg->compression_block = 32;
    cfg->compression_ratio = 16;
    cfg->block_size = 64;
    cfg->num_selected_blocks = 16;
    cfg->select_fixed = NSA_SELECT_FIXED_PAPER;
    cfg->window_size = 512;
    cfg->compress = NSA_COMPRESS_MLP;
    cfg->select_score = NSA_SELECT_CMP_ATTN;
    cfg->gate = NSA_GATE_TOKEN;
    cfg->rope_theta = 10000.0;
}

int nsa_config_kv_heads(const nsa_config *cfg)
{
    return cfg->num_kv_heads > 0 ? cfg->num_kv_heads : cfg->num_heads;
}

int nsa_config_compression_block(const nsa_config *cfg)
{
    return cfg->compression_block > 0 ? cfg->compression_block : cfg->compression_ratio;
}

// ---------------------------------------------------------------------------------------
// Validation

static nsa_status check_size(const char *name, int value)
{
    if (value < 1)
        return nsa__error(NSA_ERR_INVALID, "%s = %d: must be >= 1", name, value);
    if (value > NSA_MAX_DIM)
        return nsa__error(NSA_ERR_INVALID, "%s = %d: must be <= %d", name, value, NSA_MAX_DIM);
    return NSA_OK;
}

nsa_status nsa_config_validate(const nsa_config *cfg)
{
    if (!cfg)
        return nsa__error(NSA_ERR_INVALID, "config is NULL");
    if (cfg->embed_dim < 1)
        return nsa__error(NSA_ERR_INVALID, "embed_dim = %d: required, must be >= 1",
                          cfg->embed_dim);
    NSA_TRY(check_size("embed_dim", cfg->embed_dim));
    NSA_TRY(check_size("hidden_size", cfg->hidden_size));
    NSA_TRY(check_size("num_heads", cfg->num_heads));
    NSA_TRY(check_size("head_dim", cfg->head_dim));
    NSA_TRY(check_size("window_size", cfg->window_size));
    NSA_TRY(check_size("block_size", cfg->block_size));
    NSA_TRY(check_size("num_selected_blocks", cfg->num_selected_blocks));
    NSA_TRY(check_size("compression_ratio", cfg->compression_ratio));
    NSA_TRY(check_size("num_layers", cfg->num_layers));
    NSA_TRY(check_size("seq_len", cfg->seq_len));
    if (cfg->num_layers > 4096)
        return nsa__error(NSA_ERR_INVALID, "num_layers = %d: must be <= 4096", cfg->num_layers);
    if (!(cfg->dropout >= 0.0 && cfg->dropout < 1.0))
        return nsa__error(NSA_ERR_INVALID, "dropout = %g: must satisfy 0 <= dropout < 1",
                          cfg->dropout);
    if (cfg->num_kv_heads < 0)
        return nsa__error(NSA_ERR_INVALID, "num_kv_heads = %d: must be >= 1 (or 0 for num_heads)",
                          cfg->num_kv_heads);
    int kv_heads = nsa_config_kv_heads(cfg);
    if (cfg->num_heads % kv_heads != 0)
        return nsa__error(NSA_ERR_INVALID, "num_kv_heads = %d: must divide num_heads (%d)",
                          kv_heads, cfg->num_heads);
    if (cfg->compression_block < 0)
        return nsa__error(NSA_ERR_INVALID,
                          "compression_block = %d: must be >= 1 (or 0 for compression_ratio)",
                          cfg->compression_block);
    int cmp_block = nsa_config_compression_block(cfg);
    if (cmp_block > NSA_MAX_DIM)
        return nsa__error(NSA_ERR_INVALID, "compression_block = %d: must be <= %d", cmp_block,
                          NSA_MAX_DIM);
    if (cmp_block % cfg->compression_ratio != 0)
        return nsa__error(NSA_ERR_INVALID,
                          "compression_block = %d: must be a multiple of compression_ratio (%d)",
                          cmp_block, cfg->compression_ratio);
    if ((unsigned)cfg->compress > NSA_COMPRESS_MLP)
        return nsa__error(NSA_ERR_INVALID, "compress = %d: must be mean, conv or mlp",
                          (int)cfg->compress);
    if ((unsigned)cfg->select_score > NSA_SELECT_CMP_ATTN)
        return nsa__error(NSA_ERR_INVALID, "select_score = %d: must be mean_key or cmp_attn",
                          (int)cfg->select_score);
    if ((unsigned)cfg->select_fixed > NSA_SELECT_FIXED_PAPER)
        return nsa__error(NSA_ERR_INVALID, "select_fixed = %d: must be none or paper",
                          (int)cfg->select_fixed);
    if ((unsigned)cfg->gate > NSA_GATE_TOKEN)
        return nsa__error(NSA_ERR_INVALID, "gate = %d: must be static or token", (int)cfg->gate);
    if (cfg->select_score == NSA_SELECT_CMP_ATTN && cfg->block_size % cfg->compression_ratio != 0)
        return nsa__error(NSA_ERR_INVALID,
                          "select_score = cmp_attn: needs block_size (%d) to be a multiple of "
                          "compression_ratio (%d)",
                          cfg->block_size, cfg->compression_ratio);
    if (cfg->select_fixed == NSA_SELECT_FIXED_PAPER && cfg->num_selected_blocks < 3)
        return nsa__error(NSA_ERR_INVALID,
                          "select_fixed = paper: needs num_selected_blocks >= 3 (got %d)",
                          cfg->num_selected_blocks);
    if (!(cfg->rope_theta >= 0.0) || !isfinite(cfg->rope_theta))
        return nsa__error(NSA_ERR_INVALID, "rope_theta = %g: must be >= 0 and finite (0 = off)",
                          cfg->rope_theta);
    if (cfg->rope_theta > 0.0 && cfg->head_dim % 2 != 0)
        return nsa__error(NSA_ERR_INVALID, "rope_theta = %g: needs an even head_dim (got %d)",
                          cfg->rope_theta, cfg->head_dim);
    if (cfg->vocab_size < 0 || cfg->vocab_size > NSA_MAX_DIM)
        return nsa__error(NSA_ERR_INVALID, "vocab_size = %d: must be >= 0 (0 = no language model) "
                          "and <= %d", cfg->vocab_size, NSA_MAX_DIM);
    // The whole parameter count must fit comfortably (products of validated sizes).
    double dd = cfg->hidden_size, hd = (double)cfg->num_heads * cfg->head_dim;
    double mlp = (double)cmp_block * cfg->head_dim * cfg->head_dim;
    double approx = cfg->num_layers * (12.0 * dd * dd + 4.0 * dd * hd + 2.0 * mlp + 3.0 * hd * dd) +
                    (double)cfg->embed_dim * dd + 2.0 * cfg->vocab_size * ((double)cfg->embed_dim + dd);
    if (approx > 4e9)
        return nsa__error(NSA_ERR_INVALID,
                          "the model would have about %.3g parameters: more than 4e9 is refused",
                          approx);
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// Parameter count (SPEC §4, generalised to every option)

int64_t nsa_param_count(const nsa_config *cfg)
{
    if (nsa_config_validate(cfg) != NSA_OK)
        return -1;
    int64_t E = cfg->embed_dim, D = cfg->hidden_size, H = cfg->num_heads, d = cfg->head_dim;
    int64_t G = nsa_config_kv_heads(cfg), l = nsa_config_compression_block(cfg);
    int64_t hd = H * d, gd = G * d;
    int64_t per_layer = 2 * D                    // attn_norm
                        + (D * hd + hd)          // q_proj
                        + 2 * (D * gd + gd)      // k_proj, v_proj
                        + (hd * D + D)           // o_proj
                        + 2 * D                  // ffn_norm
                        + (D * 4 * D + 4 * D)    // ffn.up
                        + (4 * D * D + D);       // ffn.down
    per_layer += cfg->gate == NSA_GATE_STATIC ? 3 : (D * 3 * H + 3 * H);
    if (cfg->compress == NSA_COMPRESS_CONV)
        per_layer += 2 * G * l * d;
    else if (cfg->compress == NSA_COMPRESS_MLP)
        per_layer += 2 * (l * d + (d * l * d + d) + (d * d + d));
    int64_t total = cfg->num_layers * per_layer + 2 * D;
    if (E != D)
        total += E * D + D;
    return total;
}

int64_t nsa_output_size(const nsa_config *cfg)
{
    if (nsa_config_validate(cfg) != NSA_OK)
        return -1;
    return cfg->hidden_size;
}

// ---------------------------------------------------------------------------------------
// Options by name

typedef enum { OPT_INT, OPT_DOUBLE, OPT_ENUM } opt_kind;

typedef struct option_desc {
    const char *name;
    opt_kind kind;
    size_t offset;
    const char *const *spellings; // OPT_ENUM: names of values 0, 1, ...; NULL-terminated
} option_desc;

static const char *const compress_names[] = {"mean", "conv", "mlp", NULL};
static const char *const select_score_names[] = {"mean_key", "cmp_attn", NULL};
static const char *const select_fixed_names[] = {"none", "paper", NULL};
static const char *const gate_names[] = {"static", "token", NULL};

#define OPT(name, kind, spell) {#name, kind, offsetof(nsa_config, name), spell}
static const option_desc options[] = {
    OPT(embed_dim, OPT_INT, NULL),
    OPT(hidden_size, OPT_INT, NULL),
    OPT(num_heads, OPT_INT, NULL),
    OPT(head_dim, OPT_INT, NULL),
    OPT(window_size, OPT_INT, NULL),
    OPT(block_size, OPT_INT, NULL),
    OPT(num_selected_blocks, OPT_INT, NULL),
    OPT(compression_ratio, OPT_INT, NULL),
    OPT(num_layers, OPT_INT, NULL),
    OPT(dropout, OPT_DOUBLE, NULL),
    OPT(seq_len, OPT_INT, NULL),
    OPT(num_kv_heads, OPT_INT, NULL),
    OPT(compression_block, OPT_INT, NULL),
    OPT(compress, OPT_ENUM, compress_names),
    OPT(select_score, OPT_ENUM, select_score_names),
    OPT(select_fixed, OPT_ENUM, select_fixed_names),
    OPT(gate, OPT_ENUM, gate_names),
    OPT(rope_theta, OPT_DOUBLE, NULL),
    OPT(vocab_size, OPT_INT, NULL),
};
#undef OPT
#define NUM_OPTIONS ((int)(sizeof options / sizeof options[0]))

int nsa_config_num_options(void)
{
    return NUM_OPTIONS;
}

const char *nsa_config_option_name(int i)
{
    return i >= 0 && i < NUM_OPTIONS ? options[i].name : NULL;
}

static const option_desc *find_option(const char *name)
{
    for (int i = 0; i < NUM_OPTIONS; i++)
        if (strcmp(options[i].name, name) == 0)
            return &options[i];
    return NULL;
}

nsa_status nsa_config_set(nsa_config *cfg, const char *name, const char *value)
{
    if (!cfg || !name || !value)
        return nsa__error(NSA_ERR_INVALID, "nsa_config_set: NULL argument");
    const option_desc *opt = find_option(name);
    if (!opt)
        return nsa__error(NSA_ERR_INVALID, "unknown option '%s'", name);
    char *field = (char *)cfg + opt->offset;
    char *end = NULL;
    errno = 0;
    switch (opt->kind) {
    case OPT_INT: {
        long v = strtol(value, &end, 10);
        if (end == value || *end != '\0' || errno == ERANGE || v < -2147483647L || v > 2147483647L)
            return nsa__error(NSA_ERR_INVALID, "%s = '%s': not an integer", name, value);
        *(int *)field = (int)v;
        return NSA_OK;
    }
    case OPT_DOUBLE: {
        double v = strtod(value, &end);
        if (end == value || *end != '\0' || errno == ERANGE)
            return nsa__error(NSA_ERR_INVALID, "%s = '%s': not a number", name, value);
        *(double *)field = v;
        return NSA_OK;
    }
    case OPT_ENUM:
        for (int i = 0; opt->spellings[i]; i++) {
            if (strcmp(opt->spellings[i], value) == 0) {
                *(int *)field = i;
                return NSA_OK;
            }
        }
        {
            char allowed[128] = "";
            for (int i = 0; opt->spellings[i]; i++) {
                strncat(allowed, i ? ", " : "", sizeof allowed - strlen(allowed) - 1);
                strncat(allowed, opt->spellings[i], sizeof allowed - strlen(allowed) - 1);
            }
            return nsa__error(NSA_ERR_INVALID, "%s = '%s': must be one of %s", name, value,
                              allowed);
        }
    }
    return nsa__error(NSA_ERR_INVALID, "option '%s': internal kind error", name);
}

nsa_status nsa_config_get(const nsa_config *cfg, const char *name, char *buf, size_t buf_size)
{
    if (!cfg || !name || !buf || buf_size == 0)
        return nsa__error(NSA_ERR_INVALID, "nsa_config_get: NULL argument");
    const option_desc *opt = find_option(name);
    if (!opt)
        return nsa__error(NSA_ERR_INVALID, "unknown option '%s'", name);
    const char *field = (const char *)cfg + opt->offset;
    int n = 0;
    switch (opt->kind) {
    case OPT_INT: {
        int v = *(const int *)field;
        // The "0 = default" options are written resolved, so files are explicit.
        if (strcmp(name, "num_kv_heads") == 0)
            v = nsa_config_kv_heads(cfg);
        else if (strcmp(name, "compression_block") == 0)
            v = nsa_config_compression_block(cfg);
        n = snprintf(buf, buf_size, "%d", v);
        break;
    }
    case OPT_DOUBLE:
        n = snprintf(buf, buf_size, "%.17g", *(const double *)field);
        break;
    case OPT_ENUM: {
        int v = *(const int *)field;
        int count = 0;
        while (opt->spellings[count])
            count++;
        if (v < 0 || v >= count)
            return nsa__error(NSA_ERR_INVALID, "%s = %d: not a valid value", name, v);
        n = snprintf(buf, buf_size, "%s", opt->spellings[v]);
        break;
    }
    }
    if (n < 0 || (size_t)n >= buf_size)
        return nsa__error(NSA_ERR_INVALID, "nsa_config_get(%s): buffer too small", name);
    return NSA_OK;
}
