/*
 * cmd_train.c — the training commands of the `nsa` program (SPEC §7):
 *   nsa train [options] [--data FILE] [--steps N] ... [--out M] [--resume]
 *   nsa eval  --checkpoint M [--data FILE | task options] [--json]
 * The loop itself is the library's (nsa_train, src/train.c); this file turns flags into
 * its options, shows progress, handles Ctrl-C, trains the window-only baseline the
 * built-in task compares NSA against, and prints the summary.
 */
#include "cli.h"

#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

// ---------------------------------------------------------------------------------------
// TASK DEFAULTS — the model and the training `nsa train` uses for the built-in retrieval
// task when no flag says otherwise. This is the one place to tune them (the help text is
// generated from it). Data files (--data) use the same model shape with vocab_size 256,
// and the library's training defaults (nsa_train_options_default).

static const struct task_defaults_t {
    // model (SPEC §1)
    int embed_dim, hidden_size, num_heads, head_dim, num_layers;
    int window_size, block_size, num_selected_blocks, compression_ratio, compression_block;
    double dropout;
    // the task (nsa_task_config; the vocabulary is the model's)
    int seq_len, num_pairs, num_keys, num_values, vocab_size, min_distance, num_queries;
    // training
    int64_t steps;
    int batch_size;
    double lr;
    int warmup_steps, eval_every, checkpoint_every;
    int eval_sequences; // held-out sequences of the final summary
} task_defaults = {
    .embed_dim = 64,
    .hidden_size = 64,
    .num_heads = 4,
    .head_dim = 16,
    .num_layers = 2,
    .window_size = 16,
    .block_size = 8,
    .num_selected_blocks = 4,
    .compression_ratio = 4,
    .compression_block = 8,
    .dropout = 0.0,
    .seq_len = 128,
    .num_pairs = 4,
    .num_keys = 8,
    .num_values = 8,
    .vocab_size = 96,
    .min_distance = 32,
    .num_queries = 4,
    .steps = 1000,
    .batch_size = 16,
    .lr = 3e-3,
    .warmup_steps = 50,
    .eval_every = 100,
    .checkpoint_every = 100,
    .eval_sequences = 1024,
};

#define DEFAULT_OUT "nsa-model.safetensors"
#define EVAL_BATCH 32 // batch of the summary's evaluation

// ---------------------------------------------------------------------------------------
// Small helpers

static char *str_concat(const char *a, const char *b)
{
    size_t na = strlen(a), nb = strlen(b);
    char *s = malloc(na + nb + 1);
    if (s) {
        memcpy(s, a, na);
        memcpy(s + na, b, nb + 1);
    }
    return s;
}

// <out> without a trailing ".safetensors", then `suffix` ("x.safetensors" -> "x.window...").
static char *stem_with(const char *out, const char *suffix)
{
    const char *ext = ".safetensors";
    size_t n = strlen(out), m = strlen(ext);
    size_t keep = n > m && strcmp(out + n - m, ext) == 0 ? n - m : n;
    char *s = malloc(keep + strlen(suffix) + 1);
    if (s) {
        memcpy(s, out, keep);
        strcpy(s + keep, suffix);
    }
    return s;
}

static int file_exists(const char *path)
{
    return access(path, F_OK) == 0;
}

static void format_duration(char *buf, size_t size, double seconds)
{
    if (!isfinite(seconds) || seconds < 0)
        snprintf(buf, size, "?");
    else if (seconds >= 3600)
        snprintf(buf, size, "%dh%02dm", (int)(seconds / 3600), (int)fmod(seconds, 3600) / 60);
    else if (seconds >= 60)
        snprintf(buf, size, "%dm%02ds", (int)(seconds / 60), (int)fmod(seconds, 60));
    else
        snprintf(buf, size, "%.0fs", seconds);
}

// A JSON number, or null when not finite.
static void json_number(FILE *fp, double v)
{
    if (isfinite(v))
        fprintf(fp, "%.17g", v);
    else
        fprintf(fp, "null");
}

// The task options shared by train and eval (--task-*), over `base`.
static int task_from_flags(const cli_args *args, const nsa_task_config *base, nsa_task_config *task)
{
    long long v;
    *task = *base;
    struct {
        const char *flag;
        int *field;
        long long lo;
    } fields[] = {
        {"task-seq-len", &task->seq_len, 2},
        {"task-pairs", &task->num_pairs, 1},
        {"task-keys", &task->num_keys, 1},
        {"task-values", &task->num_values, 2},
        {"task-min-distance", &task->min_distance, 0},
        {"task-queries", &task->num_queries, 1},
    };
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        if (cli_get_int(args, fields[i].flag, fields[i].lo, 1 << 24, *fields[i].field, &v))
            return CLI_EXIT_USAGE;
        *fields[i].field = (int)v;
    }
    return 0;
}

static void task_default_config(nsa_task_config *task)
{
    nsa_task_config_default(task);
    task->seq_len = task_defaults.seq_len;
    task->num_pairs = task_defaults.num_pairs;
    task->num_keys = task_defaults.num_keys;
    task->num_values = task_defaults.num_values;
    task->vocab_size = task_defaults.vocab_size;
    task->min_distance = task_defaults.min_distance;
    task->num_queries = task_defaults.num_queries;
}

// Any --task-* flag given.
static const char *first_task_flag(const cli_args *args)
{
    static const char *names[] = {"task-seq-len", "task-pairs", "task-keys", "task-values",
                                  "task-min-distance", "task-queries"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (cli_has(args, names[i]))
            return names[i];
    return NULL;
}

#define TASK_FLAGS                                                                         \
    {"task-seq-len", "N", "retrieval task: sequence length (same as --seq-len for the task)"}, \
        {"task-pairs", "N", "retrieval task: key-value pairs per sequence"},                \
        {"task-keys", "N", "retrieval task: distinct keys (>= pairs)"},                     \
        {"task-values", "N", "retrieval task: distinct values; chance = 1/values"},         \
        {"task-min-distance", "N",                                                          \
         "retrieval task: every pair lies more than N tokens before the queries"},          \
        {"task-queries", "N", "retrieval task: queries at the end (<= pairs)"}

// ---------------------------------------------------------------------------------------
// Which model options the command line states (cli_args keeps only their values).

// Walks argv as cli_parse did (it succeeded, so every valued flag has its value) and
// marks given[i] for each model option i = nsa_config_option_name(i); *preset = the
// --preset value or NULL.
static void scan_model_options(const cli_spec *spec, int argc, char **argv, int *given,
                               const char **preset)
{
    *preset = NULL;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "--") == 0)
            break;
        if (strncmp(arg, "--", 2) != 0)
            continue;
        char kebab[64], snake[64];
        size_t n = strcspn(arg + 2, "=");
        if (n == 0 || n >= sizeof kebab)
            continue;
        for (size_t c = 0; c < n; c++) {
            kebab[c] = arg[2 + c] == '_' ? '-' : arg[2 + c];
            snake[c] = kebab[c] == '-' ? '_' : kebab[c];
        }
        kebab[n] = snake[n] = '\0';
        int has_value_inline = arg[2 + n] == '=';
        const char *inline_value = has_value_inline ? arg + 3 + n : NULL;
        int own = -1;
        for (int k = 0; spec->flags[k].name; k++)
            if (strcmp(spec->flags[k].name, kebab) == 0)
                own = k;
        if (own >= 0) {
            if (spec->flags[own].metavar && !has_value_inline)
                i++;
            continue;
        }
        if (strcmp(kebab, "preset") == 0) {
            *preset = inline_value ? inline_value : (i + 1 < argc ? argv[i + 1] : NULL);
            if (!has_value_inline)
                i++;
            continue;
        }
        int num = nsa_config_num_options();
        for (int k = 0; k < num; k++) {
            const char *name = nsa_config_option_name(k);
            if (name && strcmp(name, snake) == 0)
                given[k] = 1;
        }
        if (!has_value_inline) // --threads, --device and model options take a value
            i++;
    }
}

// ---------------------------------------------------------------------------------------
// Progress: a live bar on a terminal, plain lines otherwise, nothing with --quiet.

typedef enum { SHOW_QUIET, SHOW_LINES, SHOW_BAR } show_mode;

typedef struct progress_state {
    show_mode mode;
    const char *label; // prefix of each line: "" (NSA) or "baseline "
    int every;         // plain lines every this many steps
    // Printed before the first step (not before, so that a run failing at its start
    // prints its error alone): the header once per command, then what this run does.
    char *header;      // NULL once printed
    const char *what;  // "NSA", "train", "window-only baseline ..."
    const nsa_train_options *opts;
    int tokens_per_row;
    int started;
    int64_t step0;     // the step before the first of this process
    double last_draw;
    int on_screen;     // a bar is drawn (a newline is due before other output)
    int width;         // length of the last bar drawn
} progress_state;

static double wall_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void draw_bar(progress_state *ps, const nsa_train_progress *p)
{
    char line[256], eta[32], extra[96] = "";
    int cells = 20;
    int done = p->total_steps > 0 ? (int)(cells * p->step / p->total_steps) : cells;
    char bar[32];
    for (int i = 0; i < cells; i++)
        bar[i] = i < done ? '#' : '.';
    bar[cells] = '\0';
    double rate = p->elapsed_seconds > 0 ? (double)(p->step - ps->step0) / p->elapsed_seconds : 0;
    format_duration(eta, sizeof eta, rate > 0 ? (double)(p->total_steps - p->step) / rate : NAN);
    size_t n = 0;
    if (isfinite(p->val_loss))
        n += (size_t)snprintf(extra + n, sizeof extra - n, "  val %.3f", p->val_loss);
    if (isfinite(p->val_accuracy))
        snprintf(extra + n, sizeof extra - n, "  acc %.2f", p->val_accuracy);
    int len = snprintf(line, sizeof line, "%s[%s] step %lld/%lld  loss %.3f%s  %.0f tok/s  ETA %s",
                       ps->label, bar, (long long)p->step, (long long)p->total_steps, p->loss,
                       extra, p->tokens_per_second, eta);
    if (len < 0)
        return;
    if (len >= (int)sizeof line)
        len = (int)sizeof line - 1;
    fprintf(stderr, "\r%s%*s", line, ps->width > len ? ps->width - len : 0, "");
    fflush(stderr);
    ps->width = len;
    ps->on_screen = 1;
}

static void print_line(const progress_state *ps, const nsa_train_progress *p)
{
    fprintf(stderr, "%sstep %lld/%lld loss %.4f", ps->label, (long long)p->step,
            (long long)p->total_steps, p->loss);
    if (isfinite(p->val_loss))
        fprintf(stderr, " val_loss %.4f", p->val_loss);
    if (isfinite(p->val_accuracy))
        fprintf(stderr, " val_acc %.3f", p->val_accuracy);
    fprintf(stderr, " lr %.3g tok/s %.0f elapsed %.1fs\n", p->lr, p->tokens_per_second,
            p->elapsed_seconds);
    fflush(stderr);
}

static void print_intro(progress_state *ps)
{
    if (ps->header && ps->header[0]) {
        fputs(ps->header, stderr);
        ps->header[0] = '\0';
    }
    const nsa_train_options *o = ps->opts;
    if (ps->step0 > 0)
        fprintf(stderr, "%s: resuming %s at step %lld of %lld, batch %d x %d tokens\n",
                ps->what, o->out_path, (long long)ps->step0, (long long)o->steps, o->batch_size,
                ps->tokens_per_row);
    else
        fprintf(stderr, "%s: %lld steps, batch %d x %d tokens, lr %g -> %s\n", ps->what,
                (long long)o->steps, o->batch_size, ps->tokens_per_row, o->optim.lr,
                o->out_path);
    fflush(stderr);
}

static void on_step(const nsa_train_progress *p, void *user)
{
    progress_state *ps = user;
    if (!ps->started) {
        ps->started = 1;
        ps->step0 = p->step - 1;
        if (ps->mode != SHOW_QUIET)
            print_intro(ps);
    }
    int last = p->step == p->total_steps;
    if (ps->mode == SHOW_BAR) {
        double now = wall_seconds();
        if (now - ps->last_draw >= 0.1 || p->evaluated || last) {
            ps->last_draw = now;
            draw_bar(ps, p);
        }
    } else if (ps->mode == SHOW_LINES) {
        if ((ps->every > 0 && p->step % ps->every == 0) || last)
            print_line(ps, p);
    }
}

// Ends the bar's line, so what follows starts on a fresh one.
static void progress_end(progress_state *ps)
{
    if (ps->on_screen) {
        fputc('\n', stderr);
        fflush(stderr);
        ps->on_screen = 0;
    }
}

// ---------------------------------------------------------------------------------------
// Ctrl-C: the first asks the loop to checkpoint and stop; the handler resets itself
// (SA_RESETHAND), so a second one ends the program at once.

static volatile int stop_requested;

static void on_sigint(int sig)
{
    (void)sig;
    stop_requested = 1;
}

static void catch_sigint(int on)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sigemptyset(&sa.sa_mask);
    sa.sa_handler = on ? on_sigint : SIG_DFL;
    sa.sa_flags = on ? SA_RESETHAND : 0;
    sigaction(SIGINT, &sa, NULL);
}

// ---------------------------------------------------------------------------------------
// nsa train

static const cli_flag train_flags[] = {
    {"data", "FILE",
     "train on a token file: *.npy (int32, int64 or uint16 ids), *.bin (raw little-endian "
     "uint16 ids) or any other file read as bytes (vocabulary 256). Without it: the built-in "
     "retrieval task"},
    {"vocab-size", "V",
     "the model's vocabulary (default 256 with --data, the task's vocabulary without); every "
     "token must be below it"},
    {"steps", "N", "total optimizer steps, counting those before a --resume"},
    {"batch-size", "B", "sequences per micro-batch"},
    {"seq-len", "T",
     "tokens per training window of --data (default 256; on --resume the checkpoint's); for "
     "the task the same as --task-seq-len"},
    {"lr", "X", "peak learning rate, > 0 (warmup, then cosine decay to --min-lr)"},
    {"min-lr", "X", "floor of the cosine decay (default lr/10)"},
    {"warmup", "N", "linear warmup steps"},
    {"weight-decay", "X", "AdamW decoupled weight decay of the matrices (default 0.1)"},
    {"clip", "X", "clip the global gradient norm to X; 0 = off (default 1)"},
    {"grad-accum", "K", "micro-batches per step (default 1)"},
    {"seed", "S", "seed of the initialisation, data order and dropout (default 0)"},
    {"val-fraction", "F", "share of --data held out for validation, 0 <= F < 1 (default 0.1)"},
    {"eval-every", "N", "steps between validations (0: only at the end)"},
    {"eval-batches", "N", "batches per validation (default 8)"},
    {"checkpoint-every", "N", "steps between checkpoints (0: only at the end)"},
    {"out", "M",
     "the checkpoint (default " DEFAULT_OUT "); the optimizer state goes to M.opt, the "
     "window-only baseline of the task to <M without .safetensors>.window.safetensors (its "
     "final checkpoint has the gates set to the window alone, so it runs as trained)"},
    {"resume", NULL,
     "continue the run of --out exactly (its model options come from the checkpoint; the "
     "other flags must be those of the first run); a finished run is a no-op"},
    {"log", "FILE", "CSV of every step (default M.csv; the baseline's: its checkpoint + .csv)"},
    {"no-baseline", NULL, "task only: do not train the window-only baseline"},
    {"eval-sequences", "N", "task only: held-out sequences of the final accuracy"},
    TASK_FLAGS,
    {"quiet", NULL, "print only the final summary"},
    {NULL, NULL, NULL},
};

static char train_description[4096];

static cli_spec train_spec = {
    "train",
    "nsa train [options] [--data FILE] [--vocab-size V] [--steps N] [--batch-size B]\n"
    "                 [--seq-len T] [--lr X] [--seed S] [--out M] [--resume] [--device cpu|cuda]",
    train_description,
    train_flags,
    CLI_MODEL_OPTIONS | CLI_CONTEXT,
};

static void describe_train(void)
{
    const struct task_defaults_t *d = &task_defaults;
    snprintf(train_description, sizeof train_description,
             "Trains a language model (SPEC §5) with AdamW and writes checkpoint M (and M.opt,\n"
             "the state --resume continues from; M.csv, the log of every step).\n\n"
             "Without --data: the built-in long-context retrieval task (pairs 'key k holds\n"
             "value v' lie more than min_distance tokens before the queries, so a sliding\n"
             "window cannot see them). Then, unless --no-baseline, the same model from the\n"
             "same seed is trained again with its gates forced to the sliding window alone,\n"
             "and the summary compares the held-out accuracy of both with chance.\n\n"
             "Defaults for the task (model options and flags override them):\n"
             "  model: embed_dim %d, hidden_size %d, num_heads %d, head_dim %d, num_layers %d,\n"
             "         window_size %d, block_size %d, num_selected_blocks %d,\n"
             "         compression_ratio %d, compression_block %d, dropout %g,\n"
             "         vocab_size = the task's (%d)\n"
             "  task:  seq_len %d, pairs %d, keys %d, values %d, min_distance %d, queries %d\n"
             "  train: steps %lld, batch_size %d, lr %g, warmup %d, eval_every %d,\n"
             "         checkpoint_every %d, eval_sequences %d\n"
             "With --data the model has the same shape (vocab_size 256 unless --vocab-size) and\n"
             "the training the library's defaults (steps 1000, batch 16, seq_len 256, lr 3e-3,\n"
             "warmup 100, eval_every 100, checkpoint_every 500). --preset seed|paper starts\n"
             "the model from that preset instead (embed_dim %d unless given).\n\n"
             "(The defaults listed under model options below are the library's; --seq-len\n"
             "and --vocab-size there are the flags above.)\n\n"
             "Progress goes to stderr (a live bar on a terminal, a line per --eval-every\n"
             "steps otherwise), the summary to stdout. Ctrl-C saves a checkpoint and exits\n"
             "130 (continue with --resume); a second Ctrl-C exits at once.",
             d->embed_dim, d->hidden_size, d->num_heads, d->head_dim, d->num_layers,
             d->window_size, d->block_size, d->num_selected_blocks, d->compression_ratio,
             d->compression_block, d->dropout, d->vocab_size, d->seq_len, d->num_pairs,
             d->num_keys, d->num_values, d->min_distance, d->num_queries, (long long)d->steps,
             d->batch_size, d->lr, d->warmup_steps, d->eval_every, d->checkpoint_every,
             d->eval_sequences, d->embed_dim);
}

// What the flags say, before any model exists.
typedef struct train_plan {
    const char *data;
    const char *out;
    const char *log;
    int resume, baseline, quiet;
    int vocab_given, seq_len_given;
    long long vocab, seq_len;
    int eval_sequences;
    nsa_task_config task;
    nsa_train_options opts;
} train_plan;

static int read_train_flags(const cli_args *args, train_plan *p)
{
    const struct task_defaults_t *d = &task_defaults;
    long long v;
    double x;
    uint64_t seed;
    memset(p, 0, sizeof *p);
    nsa_train_options_default(&p->opts);
    p->data = cli_get(args, "data");
    p->out = cli_has(args, "out") ? cli_get(args, "out") : DEFAULT_OUT;
    p->log = cli_get(args, "log");
    p->resume = cli_has(args, "resume");
    p->quiet = cli_has(args, "quiet");
    p->baseline = !p->data && !cli_has(args, "no-baseline");
    nsa_train_options *o = &p->opts;
    int task = p->data == NULL;
    if (p->data) {
        const char *flag = first_task_flag(args);
        if (flag)
            return cli_error(CLI_EXIT_USAGE, "--%s: task options do not apply with --data", flag);
        if (cli_has(args, "eval-sequences"))
            return cli_error(CLI_EXIT_USAGE, "--eval-sequences: applies to the task, not --data");
    }
    if (task) {
        o->steps = d->steps;
        o->batch_size = d->batch_size;
        o->optim.lr = d->lr;
        o->optim.warmup_steps = d->warmup_steps;
        o->eval_every = d->eval_every;
        o->checkpoint_every = d->checkpoint_every;
    }
    p->vocab_given = cli_has(args, "vocab-size");
    p->seq_len_given = cli_has(args, "seq-len");
    if (cli_get_int(args, "vocab-size", 1, INT_MAX, 0, &p->vocab) ||
        cli_get_int(args, "seq-len", 2, 1 << 24, 0, &p->seq_len))
        return CLI_EXIT_USAGE;
    if (cli_get_int(args, "steps", 1, INT_MAX, o->steps, &v))
        return CLI_EXIT_USAGE;
    o->steps = v;
    if (cli_get_int(args, "batch-size", 1, 1 << 20, o->batch_size, &v))
        return CLI_EXIT_USAGE;
    o->batch_size = (int)v;
    if (cli_get_double(args, "lr", -INFINITY, INFINITY, o->optim.lr, &x))
        return CLI_EXIT_USAGE;
    if (!(x > 0))
        return cli_error(CLI_EXIT_USAGE, "--lr %s: must be > 0", cli_get(args, "lr"));
    o->optim.lr = x;
    if (cli_get_double(args, "min-lr", 0, INFINITY, x / 10, &o->optim.min_lr))
        return CLI_EXIT_USAGE;
    if (o->optim.min_lr > o->optim.lr)
        return cli_error(CLI_EXIT_USAGE, "--min-lr %g: must be <= --lr (%g)", o->optim.min_lr,
                         o->optim.lr);
    if (cli_get_int(args, "warmup", 0, INT_MAX, o->optim.warmup_steps, &v))
        return CLI_EXIT_USAGE;
    o->optim.warmup_steps = (int)v;
    if (cli_get_double(args, "weight-decay", 0, INFINITY, o->optim.weight_decay,
                       &o->optim.weight_decay) ||
        cli_get_double(args, "clip", 0, INFINITY, o->optim.clip_norm, &o->optim.clip_norm))
        return CLI_EXIT_USAGE;
    if (cli_get_int(args, "grad-accum", 1, 1 << 16, o->grad_accum, &v))
        return CLI_EXIT_USAGE;
    o->grad_accum = (int)v;
    if (cli_get_u64(args, "seed", 0, &seed))
        return CLI_EXIT_USAGE;
    o->seed = seed;
    if (cli_get_double(args, "val-fraction", 0, 1, o->val_fraction, &o->val_fraction))
        return CLI_EXIT_USAGE;
    if (o->val_fraction >= 1)
        return cli_error(CLI_EXIT_USAGE, "--val-fraction %s: must be < 1",
                         cli_get(args, "val-fraction"));
    if (cli_get_int(args, "eval-every", 0, INT_MAX, o->eval_every, &v))
        return CLI_EXIT_USAGE;
    o->eval_every = (int)v;
    if (cli_get_int(args, "eval-batches", 1, 1 << 20, o->eval_batches, &v))
        return CLI_EXIT_USAGE;
    o->eval_batches = (int)v;
    if (cli_get_int(args, "checkpoint-every", 0, INT_MAX, o->checkpoint_every, &v))
        return CLI_EXIT_USAGE;
    o->checkpoint_every = (int)v;
    if (cli_get_int(args, "eval-sequences", 1, 1 << 24, d->eval_sequences, &v))
        return CLI_EXIT_USAGE;
    p->eval_sequences = (int)v;
    nsa_task_config base;
    task_default_config(&base);
    if (task_from_flags(args, &base, &p->task))
        return CLI_EXIT_USAGE;
    if (task && p->seq_len_given && cli_has(args, "task-seq-len") &&
        p->seq_len != p->task.seq_len)
        return cli_error(CLI_EXIT_USAGE, "--seq-len %lld and --task-seq-len %d disagree (for the "
                         "task they are the same option)", p->seq_len, p->task.seq_len);
    if (task && p->seq_len_given)
        p->task.seq_len = (int)p->seq_len;
    return 0;
}

// The model config of a fresh run: the task defaults (or --preset), then the model
// options given, then the vocabulary and the sequence length.
static int fresh_config(const cli_args *args, const int *given, const char *preset,
                        int vocab, int seq_len, nsa_config *out)
{
    const struct task_defaults_t *d = &task_defaults;
    nsa_config cfg;
    if (preset) {
        cfg = args->config; // the preset with the options given applied
        if (!args->embed_dim_given)
            cfg.embed_dim = d->embed_dim;
    } else {
        nsa_config_default(&cfg);
        cfg.embed_dim = d->embed_dim;
        cfg.hidden_size = d->hidden_size;
        cfg.num_heads = d->num_heads;
        cfg.head_dim = d->head_dim;
        cfg.num_layers = d->num_layers;
        cfg.window_size = d->window_size;
        cfg.block_size = d->block_size;
        cfg.num_selected_blocks = d->num_selected_blocks;
        cfg.compression_ratio = d->compression_ratio;
        cfg.compression_block = d->compression_block;
        cfg.dropout = d->dropout;
        int num = nsa_config_num_options();
        for (int i = 0; i < num; i++) {
            const char *name = nsa_config_option_name(i);
            char value[128];
            if (!given[i] || !name)
                continue;
            nsa_status st = nsa_config_get(&args->config, name, value, sizeof value);
            if (st == NSA_OK)
                st = nsa_config_set(&cfg, name, value);
            if (st != NSA_OK)
                return cli_lib_error(st, 0);
        }
    }
    cfg.vocab_size = vocab;
    cfg.seq_len = seq_len;
    nsa_status st = nsa_config_validate(&cfg);
    if (st != NSA_OK)
        return cli_lib_error(st, 0);
    *out = cfg;
    return 0;
}

// A double option as people write it: the shortest spelling that reads back the same.
static void shorten_number(char *buf, size_t size)
{
    char *end;
    double v = strtod(buf, &end);
    if (end == buf || *end != '\0' || !strpbrk(buf, ".eE"))
        return;
    for (int digits = 1; digits <= 17; digits++) {
        char shorter[64];
        snprintf(shorter, sizeof shorter, "%.*g", digits, v);
        if (strtod(shorter, NULL) == v) {
            snprintf(buf, size, "%s", shorter);
            return;
        }
    }
}

// On --resume: every model option the command line states must match the checkpoint.
static int check_resume_conflicts(const cli_args *args, const int *given, const char *preset,
                                  const train_plan *p, const nsa_config *saved)
{
    if (p->vocab_given && p->vocab != saved->vocab_size)
        return cli_error(CLI_EXIT_USAGE, "--vocab-size %lld conflicts with the checkpoint %s "
                         "(vocab_size %d); on --resume the model options come from the checkpoint",
                         p->vocab, p->out, saved->vocab_size);
    int num = nsa_config_num_options();
    for (int i = 0; i < num; i++) {
        const char *name = nsa_config_option_name(i);
        if (!name)
            continue;
        int preset_states = preset && strcmp(name, "embed_dim") && strcmp(name, "vocab_size") &&
                            strcmp(name, "seq_len");
        if (!given[i] && !preset_states)
            continue;
        char want[128], have[128];
        if (nsa_config_get(&args->config, name, want, sizeof want) != NSA_OK ||
            nsa_config_get(saved, name, have, sizeof have) != NSA_OK)
            continue;
        if (strcmp(want, have) == 0)
            continue;
        shorten_number(want, sizeof want);
        shorten_number(have, sizeof have);
        char kebab[64];
        size_t k = 0;
        for (; name[k] && k + 1 < sizeof kebab; k++)
            kebab[k] = name[k] == '_' ? '-' : name[k];
        kebab[k] = '\0';
        if (given[i])
            return cli_error(CLI_EXIT_USAGE, "--%s %s conflicts with the checkpoint %s (%s %s); "
                             "on --resume the model options come from the checkpoint: leave "
                             "them out", kebab, want, p->out, name, have);
        return cli_error(CLI_EXIT_USAGE, "--preset %s conflicts with the checkpoint %s (%s is %s, "
                         "the preset says %s); on --resume the model options come from the "
                         "checkpoint: leave them out", preset, p->out, name, have, want);
    }
    return 0;
}

typedef struct run_result {
    nsa_train_result train;
    int ran;          // steps were taken in this process
    double loss, acc; // held-out, task only
} run_result;

// One training run (NSA or the baseline) with progress; `header` is printed (and
// emptied) before its first step. Returns 0, 130 (interrupted, message printed) or an
// exit status.
static int run_training(nsa_model *model, const train_plan *p, const char *out, const char *log,
                        int resume, const char *what, const char *label, char *header,
                        show_mode mode, run_result *res)
{
    nsa_train_options opts = p->opts;
    opts.data_path = p->data;
    opts.task = p->task;
    opts.out_path = out;
    opts.log_path = log;
    opts.resume = resume;
    progress_state ps;
    memset(&ps, 0, sizeof ps);
    ps.mode = mode;
    ps.label = label;
    ps.every = opts.eval_every > 0 ? opts.eval_every : 100;
    ps.header = header;
    ps.what = what;
    ps.opts = &opts;
    ps.tokens_per_row = p->data ? opts.seq_len : p->task.seq_len;
    opts.on_step = on_step;
    opts.user = &ps;
    opts.stop = &stop_requested;
    memset(res, 0, sizeof *res);
    nsa_status st = nsa_train(model, &opts, &res->train);
    progress_end(&ps);
    res->ran = ps.started;
    if (st == NSA_ERR_INTERRUPTED) {
        fprintf(stderr, "nsa: interrupted at step %lld%s; checkpoint saved to %s; continue with "
                "--resume\n", (long long)res->train.steps_done,
                label[0] ? " of the window-only baseline" : "", out);
        return 130;
    }
    if (st != NSA_OK) // the data and the resume state were read before: I/O now is a write
        return cli_lib_error(st, 1);
    if (!ps.started && mode != SHOW_QUIET) {
        if (header[0]) {
            fputs(header, stderr);
            header[0] = '\0';
        }
        fprintf(stderr, "%s: %s already trained (%lld of %lld steps), nothing to do\n", what,
                out, (long long)res->train.steps_done, (long long)opts.steps);
    }
    return 0;
}

// Writes the window-only gates into the baseline's parameters and saves its checkpoint,
// so that the file runs as the model it is without the override (nsa eval, nsa forward):
// static gates get the logits (-1e4, -1e4, 0), whose softmax is exactly (0, 0, 1); token
// gates a zero gate_proj weight and the biases (-1e4, -1e4, +1e4), sigmoid exactly 0, 0, 1.
// The override stays set, so nothing else changes; the resume state (.opt) keeps the
// parameters as trained.
static int save_window_baseline(nsa_model *m, const char *path)
{
    const nsa_config *c = nsa_model_config(m);
    size_t n = nsa_model_buffer_size(m);
    float *params = malloc(n * sizeof *params);
    if (!params)
        return cli_error(CLI_EXIT_FAILURE, "out of memory");
    nsa_status st = nsa_model_get_params(m, params);
    for (int layer = 0; st == NSA_OK && layer < c->num_layers; layer++) {
        static const char *parts[2][2] = {{"gate", NULL}, {"gate_proj.weight", "gate_proj.bias"}};
        int token = c->gate == NSA_GATE_TOKEN;
        nsa_tensor_info t[2];
        for (int k = 0; k < 2 && st == NSA_OK; k++) {
            char name[96];
            if (!parts[token][k])
                continue;
            snprintf(name, sizeof name, "layers.%d.attn.%s", layer, parts[token][k]);
            int64_t i = nsa_model_find_tensor(m, name);
            if (i < 0) {
                free(params);
                return cli_error(CLI_EXIT_FAILURE, "the baseline has no tensor %s", name);
            }
            st = nsa_model_tensor(m, (size_t)i, &t[k]);
        }
        if (st != NSA_OK)
            break;
        if (!token) {
            float *g = params + t[0].offset;
            g[0] = g[1] = -1e4f;
            g[2] = 0.0f;
        } else {
            memset(params + t[0].offset, 0, t[0].numel * sizeof(float));
            float *bias = params + t[1].offset;
            for (size_t i = 0; i < t[1].numel; i++)
                bias[i] = i % 3 == 2 ? 1e4f : -1e4f;
        }
    }
    if (st == NSA_OK)
        st = nsa_model_set_params(m, params);
    free(params);
    if (st != NSA_OK)
        return cli_lib_error(st, 0);
    if ((st = nsa_model_save(m, path)) != NSA_OK)
        return cli_lib_error_path(st, 1, path);
    return 0;
}

// The lines that open the progress output: the data or the task, and the model.
static void format_header(char *buf, size_t size, const train_plan *p, const nsa_model *model,
                          int64_t data_tokens)
{
    const nsa_config *c = nsa_model_config(model);
    size_t n;
    if (p->data)
        n = (size_t)snprintf(buf, size, "data: %s, %lld tokens, vocab_size %d, seq_len %d, "
                             "val_fraction %g\n", p->data, (long long)data_tokens,
                             c->vocab_size, p->opts.seq_len, p->opts.val_fraction);
    else
        n = (size_t)snprintf(buf, size, "task: retrieval, seq_len %d, %d pairs, %d keys, %d "
                             "values, min_distance %d, %d queries (chance %.3f)\n",
                             p->task.seq_len, p->task.num_pairs, p->task.num_keys,
                             p->task.num_values, p->task.min_distance, p->task.num_queries,
                             1.0 / p->task.num_values);
    if (n < size)
        snprintf(buf + n, size - n, "model: embed_dim %d, hidden_size %d, %d heads x %d, %d "
                 "layers, window %d, block %d, %d selected, compression %d/%d, vocab %d; %lld "
                 "params\n", c->embed_dim, c->hidden_size, c->num_heads, c->head_dim,
                 c->num_layers, c->window_size, c->block_size, c->num_selected_blocks,
                 nsa_config_compression_block(c), c->compression_ratio, c->vocab_size,
                 (long long)nsa_param_count(c));
    n = strlen(buf);
    if (!p->data && c->window_size > p->task.min_distance && n < size)
        snprintf(buf + n, size - n, "note: window_size %d > task min_distance %d: the sliding "
                 "window alone can reach some pairs\n", c->window_size, p->task.min_distance);
}

int cmd_train(int argc, char **argv)
{
    cli_args args;
    int rc;
    describe_train();
    if (!cli_parse(&args, &train_spec, argc, argv, &rc))
        return rc;
    int num_options = nsa_config_num_options();
    int *given = calloc((size_t)(num_options > 0 ? num_options : 1), sizeof *given);
    if (!given)
        return cli_error(CLI_EXIT_FAILURE, "out of memory");
    const char *preset = NULL;
    scan_model_options(&train_spec, argc, argv, given, &preset);
    train_plan p;
    if ((rc = read_train_flags(&args, &p))) {
        free(given);
        return rc;
    }

    nsa_context *ctx = NULL;
    nsa_model *model = NULL, *window = NULL;
    char *opt_file = NULL, *log = NULL, *window_out = NULL, *window_log = NULL,
         *window_opt = NULL;
    nsa_dataset *ds = NULL;
    int64_t data_tokens = 0;
    nsa_status st;
    show_mode mode = p.quiet ? SHOW_QUIET : isatty(STDERR_FILENO) ? SHOW_BAR : SHOW_LINES;
    if ((rc = cli_context(&args, &ctx)))
        goto done;
    opt_file = str_concat(p.out, ".opt");
    log = p.log ? str_concat(p.log, "") : str_concat(p.out, ".csv");
    window_out = stem_with(p.out, ".window.safetensors");
    window_log = window_out ? str_concat(window_out, ".csv") : NULL;
    window_opt = window_out ? str_concat(window_out, ".opt") : NULL;
    if (!opt_file || !log || !window_out || !window_log || !window_opt) {
        rc = cli_error(CLI_EXIT_FAILURE, "out of memory");
        goto done;
    }

    // The model: from the checkpoint (--resume) or from the flags.
    if (p.resume) {
        if (!file_exists(p.out)) {
            rc = cli_error(CLI_EXIT_USAGE, "--resume: no checkpoint %s to resume (run without "
                           "--resume to start, or give --out)", p.out);
            goto done;
        }
        if (!file_exists(opt_file)) {
            rc = cli_error(CLI_EXIT_USAGE, "--resume: %s has no training state %s (it was not "
                           "written by nsa train); run without --resume to start", p.out,
                           opt_file);
            goto done;
        }
        if ((st = nsa_model_load(&model, ctx, p.out)) != NSA_OK) {
            model = NULL;
            rc = cli_lib_error_path(st, 0, p.out);
            goto done;
        }
        if ((rc = check_resume_conflicts(&args, given, preset, &p, nsa_model_config(model))))
            goto done;
        const nsa_config *saved = nsa_model_config(model);
        if (!p.seq_len_given && !cli_has(&args, "task-seq-len")) {
            p.task.seq_len = saved->seq_len;
            p.opts.seq_len = saved->seq_len;
        }
    } else {
        int vocab = p.vocab_given ? (int)p.vocab : p.data ? 256 : p.task.vocab_size;
        int seq_len = p.data ? (p.seq_len_given ? (int)p.seq_len : p.opts.seq_len)
                             : p.task.seq_len;
        nsa_config cfg;
        if ((rc = fresh_config(&args, given, preset, vocab, seq_len, &cfg)))
            goto done;
        if ((st = nsa_model_create(&model, ctx, &cfg)) != NSA_OK) {
            model = NULL;
            rc = cli_lib_error(st, 0);
            goto done;
        }
        if ((st = nsa_model_init(model, p.opts.seed)) != NSA_OK) {
            rc = cli_lib_error(st, 0);
            goto done;
        }
    }
    const nsa_config *cfg = nsa_model_config(model);
    if (p.seq_len_given)
        p.opts.seq_len = (int)p.seq_len;
    p.task.vocab_size = cfg->vocab_size;

    // The data (read here too, so its errors are told apart from write errors later).
    if (p.data) {
        if ((st = nsa_dataset_load(&ds, p.data, cfg->vocab_size)) != NSA_OK) {
            ds = NULL;
            rc = cli_lib_error_path(st, 0, p.data);
            goto done;
        }
        data_tokens = nsa_dataset_num_tokens(ds);
        nsa_dataset_free(ds);
        ds = NULL;
    } else if ((st = nsa_task_config_validate(&p.task)) != NSA_OK) {
        rc = cli_lib_error(st, 0);
        goto done;
    }
    char header[1024];
    format_header(header, sizeof header, &p, model, data_tokens);

    // NSA
    run_result nsa_res, window_res;
    memset(&window_res, 0, sizeof window_res);
    stop_requested = 0;
    catch_sigint(1);
    rc = run_training(model, &p, p.out, log, p.resume, p.baseline ? "NSA" : "train", "", header,
                      mode, &nsa_res);

    // The window-only baseline: the same config and seed, the gates forced to the window.
    if (rc == 0 && p.baseline) {
        static const float window_only[3] = {0.0f, 0.0f, 1.0f};
        int resume_window = p.resume && file_exists(window_out) && file_exists(window_opt);
        st = resume_window ? nsa_model_load(&window, ctx, window_out)
                           : nsa_model_create(&window, ctx, cfg);
        if (st == NSA_OK && !resume_window)
            st = nsa_model_init(window, p.opts.seed);
        if (st == NSA_OK)
            st = nsa_model_set_gate_override(window, window_only);
        if (st != NSA_OK) {
            rc = resume_window ? cli_lib_error_path(st, 0, window_out) : cli_lib_error(st, 0);
        } else {
            rc = run_training(window, &p, window_out, window_log, resume_window,
                              "window-only baseline (gates 0, 0, 1)",
                              mode == SHOW_BAR ? "window " : "baseline ", header, mode,
                              &window_res);
            if (rc == 0)
                rc = save_window_baseline(window, window_out);
        }
    }
    catch_sigint(0);
    if (rc != 0)
        goto done;

    // The summary.
    if (p.data) {
        const nsa_train_result *r = &nsa_res.train;
        if (!nsa_res.ran) {
            printf("trained %lld steps on %s (already done); checkpoint %s\n",
                   (long long)r->steps_done, p.data, p.out);
        } else {
            printf("trained %lld steps on %s: loss %.4f", (long long)r->steps_done, p.data,
                   r->final_loss);
            if (isfinite(r->val_loss))
                printf(", val_loss %.4f (perplexity %.3f)", r->val_loss, exp(r->val_loss));
            else
                printf(", no validation (--val-fraction 0)");
            printf(", %.0f tok/s; checkpoint %s\n", r->tokens_per_second, p.out);
        }
    } else {
        int64_t max_tokens = (int64_t)p.eval_sequences * p.task.seq_len;
        if (mode != SHOW_QUIET) {
            fprintf(stderr, "evaluating on %d held-out sequences...\n", p.eval_sequences);
            fflush(stderr);
        }
        st = nsa_evaluate(model, NULL, &p.task, EVAL_BATCH, p.task.seq_len, max_tokens,
                          &nsa_res.loss, &nsa_res.acc);
        if (st == NSA_OK && window)
            st = nsa_evaluate(window, NULL, &p.task, EVAL_BATCH, p.task.seq_len, max_tokens,
                              &window_res.loss, &window_res.acc);
        if (st != NSA_OK) {
            rc = cli_lib_error(st, 0);
            goto done;
        }
        printf("held-out retrieval accuracy (%d sequences, %d queries each, answer among %d "
               "values):\n", p.eval_sequences, p.task.num_queries, p.task.num_values);
        printf("  %-17s %.4f   loss %.4f   %s\n", "NSA", nsa_res.acc, nsa_res.loss, p.out);
        if (window)
            printf("  %-17s %.4f   loss %.4f   %s\n", "window baseline", window_res.acc,
                   window_res.loss, window_out);
        printf("  %-17s %.4f\n", "chance", 1.0 / p.task.num_values);
    }
    if (fflush(stdout) != 0 || ferror(stdout))
        rc = cli_error(CLI_EXIT_FAILURE, "error writing to standard output");

done:
    nsa_model_free(window);
    nsa_model_free(model);
    nsa_context_free(ctx);
    free(opt_file);
    free(log);
    free(window_out);
    free(window_log);
    free(window_opt);
    free(given);
    return rc;
}

// ---------------------------------------------------------------------------------------
// nsa eval

static const cli_flag eval_flags[] = {
    {"checkpoint", "M", "the model (a language model: vocab_size > 0); required"},
    {"data", "FILE",
     "the tokens to score (*.npy, *.bin or bytes, as nsa train reads them), in consecutive "
     "windows of --seq-len; without it: held-out sequences of the retrieval task"},
    {"batch-size", "B", "windows per forward (default 16)"},
    {"seq-len", "T", "tokens per window (default: the checkpoint's seq_len)"},
    {"max-tokens", "N",
     "score at most N tokens (default: the whole file; the task: 1024 sequences)"},
    TASK_FLAGS,
    {"json", NULL, "print one JSON object: checkpoint, data, loss, perplexity, accuracy, chance"},
    {NULL, NULL, NULL},
};

static const cli_spec eval_spec = {
    "eval",
    "nsa eval --checkpoint M [--data FILE | task options] [--batch-size B] [--seq-len T]\n"
    "                [--max-tokens N] [--json]",
    "Scores checkpoint M: the mean next-token loss and the perplexity exp(loss) over a token\n"
    "file, or over held-out sequences of the built-in retrieval task (also the accuracy of\n"
    "its answers, and chance = 1/values). Task options default to nsa train's, with the\n"
    "checkpoint's vocab_size and seq_len.",
    eval_flags,
    CLI_CONTEXT,
};

int cmd_eval(int argc, char **argv)
{
    cli_args args;
    int rc;
    if (!cli_parse(&args, &eval_spec, argc, argv, &rc))
        return rc;
    const char *checkpoint, *data = cli_get(&args, "data");
    long long batch, seq_len, max_tokens;
    if ((rc = cli_require(&args, "checkpoint", &checkpoint)) ||
        (rc = cli_get_int(&args, "batch-size", 1, 1 << 20, 16, &batch)) ||
        (rc = cli_get_int(&args, "seq-len", 2, 1 << 24, 0, &seq_len)) ||
        (rc = cli_get_int(&args, "max-tokens", 1, LLONG_MAX, 0, &max_tokens)))
        return rc;
    const char *task_flag = first_task_flag(&args);
    if (data && task_flag)
        return cli_error(CLI_EXIT_USAGE, "--%s: task options do not apply with --data", task_flag);

    nsa_context *ctx = NULL;
    nsa_model *model = NULL;
    if ((rc = cli_context(&args, &ctx)))
        return rc;
    nsa_status st = nsa_model_load(&model, ctx, checkpoint);
    if (st != NSA_OK) {
        model = NULL;
        rc = cli_lib_error_path(st, 0, checkpoint);
        goto done;
    }
    const nsa_config *cfg = nsa_model_config(model);
    if (cfg->vocab_size <= 0) {
        rc = cli_error(CLI_EXIT_USAGE, "%s: not a language model (vocab_size 0); eval scores "
                       "token predictions", checkpoint);
        goto done;
    }
    nsa_task_config task, base;
    task_default_config(&base);
    base.vocab_size = cfg->vocab_size;
    base.seq_len = seq_len ? (int)seq_len : cfg->seq_len;
    if (!data) {
        if (seq_len && cli_has(&args, "task-seq-len") &&
            atoi(cli_get(&args, "task-seq-len")) != seq_len) {
            rc = cli_error(CLI_EXIT_USAGE, "--seq-len and --task-seq-len disagree (for the task "
                           "they are the same option)");
            goto done;
        }
        if ((rc = task_from_flags(&args, &base, &task)))
            goto done;
        if ((st = nsa_task_config_validate(&task)) != NSA_OK) {
            rc = cli_lib_error(st, 0);
            goto done;
        }
    }
    int T = data ? (seq_len ? (int)seq_len : cfg->seq_len) : task.seq_len;
    if (!data && !max_tokens)
        max_tokens = (long long)task_defaults.eval_sequences * T;
    double loss = NAN, accuracy = NAN;
    st = nsa_evaluate(model, data, data ? NULL : &task, (int)batch, T, max_tokens, &loss,
                      &accuracy);
    if (st != NSA_OK) {
        rc = data ? cli_lib_error_path(st, 0, data) : cli_lib_error(st, 0);
        goto done;
    }
    double chance = data ? NAN : 1.0 / task.num_values;
    if (cli_has(&args, "json")) {
        printf("{\"checkpoint\": ");
        cli_json_string(stdout, checkpoint);
        printf(", \"data\": ");
        if (data)
            cli_json_string(stdout, data);
        else
            printf("null");
        printf(", \"seq_len\": %d, \"loss\": ", T);
        json_number(stdout, loss);
        printf(", \"perplexity\": ");
        json_number(stdout, exp(loss));
        printf(", \"accuracy\": ");
        json_number(stdout, accuracy);
        printf(", \"chance\": ");
        json_number(stdout, chance);
        printf("}\n");
    } else {
        printf("loss %.6f perplexity %.4f", loss, exp(loss));
        if (!data)
            printf(" accuracy %.4f chance %.4f", accuracy, chance);
        printf("\n");
    }
    if (fflush(stdout) != 0 || ferror(stdout))
        rc = cli_error(CLI_EXIT_FAILURE, "error writing to standard output");
done:
    nsa_model_free(model);
    nsa_context_free(ctx);
    return rc;
}
