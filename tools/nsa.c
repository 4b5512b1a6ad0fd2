/*
 * nsa.c — main() of the `nsa` program: `nsa --help`, `nsa --version`, and dispatch of
 * `nsa COMMAND ...` through the table below. A new command is one line here plus its
 * prototype in cli.h and its tools/cmd_*.c file (SPEC §7 is the contract).
 */
#include "cli.h"

#include <string.h>

// ---------------------------------------------------------------------------------------
// The commands, in the order `nsa --help` lists them.

static const cli_command commands[] = {
    {"info", cmd_info, "print a config (or a checkpoint's): options, param_count, tensors"},
    {"init", cmd_init, "create a model initialised from a seed and save it as a checkpoint"},
    {"forward", cmd_forward, "run a checkpoint on a .npy input and write the output .npy"},
    {"train", cmd_train, "train a language model on a token file or the built-in retrieval task"},
    {"eval", cmd_eval, "loss and perplexity of a checkpoint on a token file or the task"},
    {"generate", cmd_generate, "continue a prompt with a language model (cached generation)"},
    {"grad", cmd_grad, "gradients of a language model's loss on tokens, as safetensors"},
    {"bench", cmd_bench, "time NSA attention against dense attention and the machine's limits"},
};

static const size_t num_commands = sizeof commands / sizeof commands[0];

// ---------------------------------------------------------------------------------------

static void print_usage(FILE *fp)
{
    fprintf(fp, "usage: nsa COMMAND [flags]      (nsa COMMAND --help for its flags)\n"
                "       nsa --help | --version\n\n"
                "Native Sparse Attention (compressed, selected and sliding-window paths).\n\n"
                "commands:\n");
    for (size_t i = 0; i < num_commands; i++)
        fprintf(fp, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fprintf(fp, "\nModel options are --kebab-case flags of the SPEC §1 names "
                "(--embed-dim 64 --num-kv-heads 2 ...).\n"
                "Checkpoints are safetensors files, arrays are .npy files.\n"
                "Exit status: 0 success, 2 bad usage or input, 1 other failures.\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        print_usage(stderr);
        return CLI_EXIT_USAGE;
    }
    const char *name = argv[1];
    if (strcmp(name, "--help") == 0 || strcmp(name, "-h") == 0 || strcmp(name, "help") == 0) {
        if (strcmp(name, "help") == 0 && argc > 2) {
            // `nsa help CMD` is `nsa CMD --help`
            for (size_t i = 0; i < num_commands; i++) {
                if (strcmp(argv[2], commands[i].name) == 0) {
                    char *help_argv[] = {argv[2], "--help", NULL};
                    return commands[i].run(2, help_argv);
                }
            }
            return cli_error(CLI_EXIT_USAGE, "unknown command '%s' (see nsa --help)", argv[2]);
        }
        print_usage(stdout);
        return CLI_EXIT_OK;
    }
    if (strcmp(name, "--version") == 0 || strcmp(name, "version") == 0) {
        printf("nsa %s\n", nsa_version());
        return CLI_EXIT_OK;
    }
    for (size_t i = 0; i < num_commands; i++)
        if (strcmp(name, commands[i].name) == 0)
            return commands[i].run(argc - 1, argv + 1);
    if (name[0] == '-')
        return cli_error(CLI_EXIT_USAGE, "%s: a command comes first (see nsa --help)", name);
    return cli_error(CLI_EXIT_USAGE, "unknown command '%s' (see nsa --help)", name);
}
