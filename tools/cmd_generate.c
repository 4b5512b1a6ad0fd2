/*
 * cmd_generate.c — `nsa generate`: continues a prompt with a language-model checkpoint,
 * one token at a time through the library's cached generator (SPEC §5).
 */
#include "cli.h"

#include <stdlib.h>
#include <string.h>

static const cli_flag generate_flags[] = {
    {"checkpoint", "M", "language-model checkpoint (vocab_size > 0)"},
    {"prompt", "TEXT", "the prompt as text: its bytes are the tokens (vocab_size 256 models)"},
    {"prompt-tokens", "IDS", "the prompt as comma-separated token ids (any vocabulary)"},
    {"max-tokens", "N", "tokens to generate (default 200)"},
    {"temperature", "X", "sampling temperature; 0 = greedy (default 0.8)"},
    {"seed", "S", "seed of the sampling (default 0)"},
    {"ids", NULL, "print the generated token ids instead of the text"},
    {NULL, NULL, NULL},
};

static const cli_spec generate_spec = {
    "generate",
    "nsa generate --checkpoint M (--prompt TEXT | --prompt-tokens IDS) [--max-tokens N]\n"
    "             [--temperature X] [--seed S] [--ids]",
    "Feeds the prompt to the model one token at a time, keeping the keys, values and\n"
    "compressed tokens of every layer (so each new token costs one query of attention),\n"
    "then samples --max-tokens more. Text goes to stdout: the prompt, then the continuation\n"
    "as it is generated (bytes for vocab_size 256 models, else ids with --ids).",
    generate_flags,
    CLI_CONTEXT,
};

// Parses "1,2,3" into tokens (allocated). Returns 0 or 2.
static int parse_ids(const char *text, int vocab_size, int32_t **out, int *count)
{
    size_t cap = strlen(text) / 2 + 1;
    int32_t *ids = malloc(cap * sizeof *ids);
    if (!ids)
        return cli_error(CLI_EXIT_FAILURE, "out of memory");
    int n = 0;
    const char *p = text;
    while (*p) {
        char *end = NULL;
        long v = strtol(p, &end, 10);
        if (end == p || (*end != ',' && *end != '\0') || v < 0 || v >= vocab_size) {
            free(ids);
            return cli_error(CLI_EXIT_USAGE, "--prompt-tokens: '%s' is not a list of token ids "
                             "in [0, %d) separated by commas", text, vocab_size);
        }
        ids[n++] = (int32_t)v;
        p = *end == ',' ? end + 1 : end;
    }
    if (n == 0) {
        free(ids);
        return cli_error(CLI_EXIT_USAGE, "--prompt-tokens: no token ids");
    }
    *out = ids;
    *count = n;
    return 0;
}

static uint64_t splitmix(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void emit(int32_t token, int as_ids, int *first)
{
    if (as_ids)
        printf("%s%d", *first ? "" : ",", (int)token);
    else
        putchar((int)token);
    *first = 0;
    fflush(stdout);
}

int cmd_generate(int argc, char **argv)
{
    cli_args args;
    int rc;
    if (!cli_parse(&args, &generate_spec, argc, argv, &rc))
        return rc;
    const char *checkpoint;
    if ((rc = cli_require(&args, "checkpoint", &checkpoint)))
        return rc;
    const char *prompt = cli_get(&args, "prompt"), *prompt_ids = cli_get(&args, "prompt-tokens");
    if (!prompt == !prompt_ids)
        return cli_error(CLI_EXIT_USAGE, "give exactly one of --prompt TEXT and --prompt-tokens IDS");
    long long max_tokens;
    double temperature;
    uint64_t seed;
    if ((rc = cli_get_int(&args, "max-tokens", 0, 1 << 20, 200, &max_tokens)) ||
        (rc = cli_get_double(&args, "temperature", 0.0, 100.0, 0.8, &temperature)) ||
        (rc = cli_get_u64(&args, "seed", 0, &seed)))
        return rc;
    int as_ids = cli_has(&args, "ids");

    nsa_context *ctx = NULL;
    nsa_model *model = NULL;
    nsa_generator *gen = NULL;
    int32_t *tokens = NULL;
    float *logits = NULL;
    int count = 0;
    if ((rc = cli_context(&args, &ctx)))
        return rc;
    nsa_status st = nsa_model_load(&model, ctx, checkpoint);
    if (st != NSA_OK) {
        rc = cli_lib_error_path(st, 0, checkpoint);
        goto done;
    }
    int V = nsa_model_config(model)->vocab_size;
    if (V <= 0) {
        rc = cli_error(CLI_EXIT_USAGE, "%s: not a language model (vocab_size = 0)", checkpoint);
        goto done;
    }
    if (prompt) {
        if (V < 256) {
            rc = cli_error(CLI_EXIT_USAGE, "--prompt TEXT needs a byte-level model (vocab_size "
                           ">= 256, this one has %d): use --prompt-tokens", V);
            goto done;
        }
        count = (int)strlen(prompt);
        if (count == 0) {
            rc = cli_error(CLI_EXIT_USAGE, "--prompt is empty");
            goto done;
        }
        tokens = malloc((size_t)count * sizeof *tokens);
        if (!tokens) {
            rc = cli_error(CLI_EXIT_FAILURE, "out of memory");
            goto done;
        }
        for (int i = 0; i < count; i++)
            tokens[i] = (unsigned char)prompt[i];
    } else if ((rc = parse_ids(prompt_ids, V, &tokens, &count))) {
        goto done;
    }
    if (!as_ids && V > 256)
        as_ids = 1; // ids beyond a byte cannot be printed as text
    logits = malloc((size_t)V * sizeof *logits);
    if (!logits) {
        rc = cli_error(CLI_EXIT_FAILURE, "out of memory");
        goto done;
    }
    st = nsa_generator_create(&gen, model, count + (int)max_tokens);
    if (st != NSA_OK) {
        rc = cli_lib_error(st, 0);
        goto done;
    }
    int first = 1;
    for (int i = 0; i < count && st == NSA_OK; i++) {
        st = nsa_generator_step(gen, tokens[i], logits);
        emit(tokens[i], as_ids, &first);
    }
    uint64_t rng = seed;
    for (long long i = 0; i < max_tokens && st == NSA_OK; i++) {
        double u = (double)(splitmix(&rng) >> 11) * (1.0 / 9007199254740992.0);
        int32_t next = nsa_sample_token(logits, V, temperature, u);
        emit(next, as_ids, &first);
        if (i + 1 < max_tokens)
            st = nsa_generator_step(gen, next, logits);
    }
    printf("\n");
    if (st != NSA_OK)
        rc = cli_lib_error(st, 0);
done:
    nsa_generator_free(gen);
    free(tokens);
    free(logits);
    nsa_model_free(model);
    nsa_context_free(ctx);
    return rc;
}
