/*
 * cli.h — shared pieces of the `nsa` program (tools/): the command table, the flag
 * parser (every SPEC §1 option as a --kebab-case flag, kept in sync with the library
 * through nsa_config_option_name), help printing, errors and exit codes, and the
 * --threads / --device / --precision handling that creates the nsa_context.
 *
 * A subcommand lives in tools/cmd_<group>.c as `int cmd_<name>(int argc, char **argv)`
 * (argv[0] is the command name) returning the exit status; add its prototype below and
 * one line to the table in tools/nsa.c.
 */
#ifndef NSA_CLI_H
#define NSA_CLI_H

#include "nsa.h"

#include <stdint.h>
#include <stdio.h>

#if defined(__GNUC__)
#define CLI_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define CLI_PRINTF(a, b)
#endif

// ---------------------------------------------------------------------------------------
// Exit statuses (SPEC §7)

#define CLI_EXIT_OK 0
#define CLI_EXIT_FAILURE 1 // I/O while writing, out of memory, device errors
#define CLI_EXIT_USAGE 2   // bad usage or bad input

// ---------------------------------------------------------------------------------------
// Commands

typedef int (*cli_command_fn)(int argc, char **argv);

typedef struct cli_command {
    const char *name;    // "forward"
    cli_command_fn run;  // returns the exit status
    const char *summary; // one line for `nsa --help`
} cli_command;

int cmd_info(int argc, char **argv);
int cmd_init(int argc, char **argv);
int cmd_forward(int argc, char **argv);
int cmd_train(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_grad(int argc, char **argv);
int cmd_generate(int argc, char **argv);
int cmd_bench(int argc, char **argv);

// ---------------------------------------------------------------------------------------
// Flags of one command

typedef struct cli_flag {
    const char *name;    // kebab-case, without the leading "--": "out"
    const char *metavar; // "M"; NULL for a switch that takes no value
    const char *help;    // may hold several lines separated by '\n'
} cli_flag;

// What a command accepts besides its own flags.
#define CLI_MODEL_OPTIONS 1u // every SPEC §1 option, plus --preset seed|paper
#define CLI_CONTEXT 2u       // --threads N, --device cpu|cuda, --precision fp32|bf16

typedef struct cli_spec {
    const char *command;     // "init"
    const char *usage;       // "nsa init [options] [--seed S] --out M"
    const char *description; // a paragraph (lines separated by '\n')
    const cli_flag *flags;   // its own flags, ended by an entry with name NULL
    unsigned features;       // CLI_MODEL_OPTIONS | CLI_CONTEXT
} cli_spec;

#define CLI_MAX_FLAGS 32

typedef struct cli_args {
    const cli_spec *spec;
    const char *values[CLI_MAX_FLAGS]; // per spec->flags entry: the value (a switch: "")
    nsa_config config;    // the preset, then the model options in command-line order
    int num_model_options;            // how many model options were given
    const char *first_model_option;   // the first one as written ("--hidden-size")
    int embed_dim_given;
    const char *device;  // --device, NULL if absent
    const char *precision; // --precision, NULL if absent
    const char *threads; // --threads, NULL if absent
} cli_args;

// Parses argv[1..argc) (argv[0] is the command name). Returns 1 to go on; returns 0
// when the command should exit now with *exit_code: after --help (0) or after printing
// an error (2).
int cli_parse(cli_args *args, const cli_spec *spec, int argc, char **argv, int *exit_code);

// The value of the command's own flag `name` (kebab-case), NULL when absent.
const char *cli_get(const cli_args *args, const char *name);
// 1 when the flag (switch or valued) was given.
int cli_has(const cli_args *args, const char *name);

// Strict number parsing of the value of flag `name`: the whole string, in [lo, hi].
// Absent flag: *out = fallback. Returns 0, or prints an error and returns 2.
int cli_get_int(const cli_args *args, const char *name, long long lo, long long hi,
                long long fallback, long long *out);
int cli_get_u64(const cli_args *args, const char *name, uint64_t fallback, uint64_t *out);
int cli_get_double(const cli_args *args, const char *name, double lo, double hi,
                   double fallback, double *out);
// A required valued flag: 0 and *out set, or prints "--name M is required" and returns 2.
int cli_require(const cli_args *args, const char *name, const char **out);

// The model config from the command line: embed_dim must have been given (the error
// names --embed-dim) and every rule of SPEC §1 holds. Returns 0 or an exit status.
int cli_model_config(const cli_args *args, nsa_config *out);
// Refuses model options (the config comes from a checkpoint). 0 or 2.
int cli_no_model_options(const cli_args *args, const char *why);

// Creates the context from --device (default cpu), --threads (default 0 = OpenMP's) and
// --precision (default fp32).
// Returns 0 or an exit status (message printed).
int cli_context(const cli_args *args, nsa_context **out);

// ---------------------------------------------------------------------------------------
// Errors

// Prints "nsa: <message>\n" to stderr and returns `code`.
int cli_error(int code, const char *fmt, ...) CLI_PRINTF(2, 3);
// The exit status for a library status: 2 for bad input (invalid, shape, numeric, format,
// and I/O while reading), 1 for the rest (and I/O while writing: writing = 1).
int cli_exit_code(nsa_status status, int writing);
// Prints "nsa: <nsa_last_error()>" (or the status string when empty) and returns
// cli_exit_code(status, writing).
int cli_lib_error(nsa_status status, int writing);
// Same, for a failure about the file `path`: the message is prefixed with "path: "
// unless it already names it.
int cli_lib_error_path(nsa_status status, int writing, const char *path);

// ---------------------------------------------------------------------------------------
// Help and output helpers

void cli_print_help(const cli_spec *spec, FILE *fp);
// Writes s as a JSON string literal (quotes included).
void cli_json_string(FILE *fp, const char *s);
// 1 if s is a JSON number as written ("-1.5e3"), so it can be printed bare.
int cli_is_json_number(const char *s);
// Writes a shape as "[2, 3, 4]" into buf (always NUL-terminated).
void cli_format_shape(char *buf, size_t size, int ndim, const int64_t *shape);
// "float32", "int64", ...
const char *cli_dtype_name(nsa_dtype dtype);

#endif // NSA_CLI_H
