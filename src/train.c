/*
 * train.c — the training loop behind `nsa train`, and evaluation (`nsa eval`): batches
 * from a token file or the built-in retrieval task, AdamW steps with accumulation,
 * periodic validation, atomic checkpoints, exact resumption and a CSV log.
 *
 * Everything random is a function of (seed, step): the batch of step s is the same
 * whether the run was interrupted or not, and the dropout stream continues from the
 * counter saved with the checkpoint.
 */
#include "model.h"
#include "safetensors.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define VAL_STREAM 0x5EED0F00D0000001ull  // held-out task sequences (the same for every
                                          // training seed, and for nsa_evaluate)
#define DATA_STREAM 0xDA7A000000000002ull // training windows of a data file

void nsa_train_options_default(nsa_train_options *o)
{
    memset(o, 0, sizeof *o);
    nsa_task_config_default(&o->task);
    o->batch_size = 16;
    o->seq_len = 256;
    o->steps = 1000;
    o->grad_accum = 1;
    nsa_optim_config_default(&o->optim);
    o->seed = 0;
    o->val_fraction = 0.1;
    o->eval_every = 100;
    o->eval_batches = 8;
    o->checkpoint_every = 500;
}

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// ---------------------------------------------------------------------------------------
// Batches

typedef struct batcher {
    const nsa_dataset *data; // NULL: the task
    const nsa_task_config *task;
    int B, T;
    int64_t train_tokens; // tokens [0, train_tokens) train, the rest validates
    uint64_t seed;
    int32_t *tokens; // [B*T]
    float *weights;  // [B*T] (task only)
} batcher;

static nsa_status batcher_init(batcher *bt, const nsa_dataset *data, const nsa_task_config *task,
                               int B, int T, double val_fraction, uint64_t seed)
{
    memset(bt, 0, sizeof *bt);
    bt->data = data;
    bt->task = task;
    bt->B = B;
    bt->T = data ? T : task->seq_len;
    bt->seed = seed;
    if (data) {
        int64_t n = nsa_dataset_num_tokens(data);
        int64_t val = (int64_t)((double)n * val_fraction);
        bt->train_tokens = n - val;
        if (bt->train_tokens < T)
            return nsa__error(NSA_ERR_INVALID,
                              "the data has %lld tokens, %lld for training: fewer than seq_len "
                              "(%d); use a smaller --seq-len or more data",
                              (long long)n, (long long)bt->train_tokens, T);
        if (val_fraction > 0.0 && val < T)
            return nsa__error(NSA_ERR_INVALID,
                              "the validation split (%lld tokens, val_fraction %g) is shorter "
                              "than seq_len (%d); use more data or a larger val_fraction",
                              (long long)val, val_fraction, T);
    }
    size_t M = (size_t)B * bt->T;
    bt->tokens = nsa__malloc(M * sizeof(int32_t), "batch");
    bt->weights = nsa__malloc(M * sizeof(float), "batch weights");
    if (!bt->tokens || !bt->weights)
        return NSA_ERR_NOMEM;
    return NSA_OK;
}

static void batcher_free(batcher *bt)
{
    free(bt->tokens);
    free(bt->weights);
}

// Training batch number `index` (= step * grad_accum + micro).
static nsa_status batch_train(batcher *bt, uint64_t index)
{
    for (int b = 0; b < bt->B; b++) {
        int32_t *row = bt->tokens + (size_t)b * bt->T;
        uint64_t item = index * (uint64_t)bt->B + (uint64_t)b;
        if (bt->data) {
            uint64_t span = (uint64_t)(bt->train_tokens - bt->T + 1);
            int64_t start = (int64_t)(nsa__hash64(bt->seed ^ nsa__hash64(DATA_STREAM + item)) % span);
            for (int t = 0; t < bt->T; t++)
                row[t] = nsa_dataset_token(bt->data, start + t);
        } else {
            NSA_TRY(nsa_task_sample(bt->task, bt->seed, item, row, bt->weights + (size_t)b * bt->T,
                                    NULL));
        }
    }
    return NSA_OK;
}

// Validation batch `index` of `count`: evenly spaced windows of the held-out split, or
// held-out task sequences. Returns the number of rows filled (0 when none remain).
static int batch_val(batcher *bt, int index, int count, nsa_status *st)
{
    *st = NSA_OK;
    for (int b = 0; b < bt->B; b++) {
        int32_t *row = bt->tokens + (size_t)b * bt->T;
        int64_t item = (int64_t)index * bt->B + b;
        if (bt->data) {
            int64_t n = nsa_dataset_num_tokens(bt->data);
            int64_t first = bt->train_tokens, span = n - first - bt->T;
            int64_t total = (int64_t)count * bt->B;
            int64_t start = first + (total > 1 ? span * item / (total - 1) : 0);
            for (int t = 0; t < bt->T; t++)
                row[t] = nsa_dataset_token(bt->data, start + t);
        } else {
            *st = nsa_task_sample(bt->task, VAL_STREAM, (uint64_t)item, row,
                                  bt->weights + (size_t)b * bt->T, NULL);
            if (*st != NSA_OK)
                return 0;
        }
    }
    return bt->B;
}

// Answers right at the weighted positions of a task batch: argmax of the logits at a
// query's key [.., t, V] against the token that follows. Adds to *correct and *total.
static void count_correct(const int32_t *tokens, const float *weights, const float *logits, int B,
                          int T, int V, int64_t *correct, int64_t *total)
{
    for (int b = 0; b < B; b++) {
        for (int t = 0; t + 1 < T; t++) {
            size_t row = (size_t)b * T + t;
            if (weights[row] <= 0.0f)
                continue;
            const float *z = logits + row * V;
            int best = 0;
            for (int i = 1; i < V; i++)
                if (z[i] > z[best])
                    best = i;
            *correct += best == tokens[row + 1];
            (*total)++;
        }
    }
}

static nsa_status validate(nsa_model *m, batcher *bt, int batches, double *loss, double *accuracy)
{
    int V = m->cfg.vocab_size;
    float *logits = NULL;
    if (!bt->data) {
        logits = nsa__malloc((size_t)bt->B * bt->T * V * sizeof(float), "validation logits");
        if (!logits)
            return NSA_ERR_NOMEM;
    }
    double sum = 0.0;
    int64_t correct = 0, answered = 0;
    int seen = 0;
    nsa_status st = NSA_OK;
    for (int i = 0; i < batches && st == NSA_OK; i++) {
        int rows = batch_val(bt, i, batches, &st);
        if (st != NSA_OK || rows == 0)
            break;
        float l = 0.0f;
        st = nsa_lm_forward_weighted(m, bt->tokens, bt->data ? NULL : bt->weights, bt->B, bt->T, 0,
                                     logits, &l);
        if (st == NSA_OK) {
            sum += l;
            if (logits)
                count_correct(bt->tokens, bt->weights, logits, bt->B, bt->T, V, &correct,
                              &answered);
            seen += rows;
        }
    }
    free(logits);
    NSA_TRY(st);
    *loss = seen ? sum / (seen / bt->B) : NAN;
    *accuracy = bt->data || !answered ? NAN : (double)correct / (double)answered;
    return NSA_OK;
}

// ---------------------------------------------------------------------------------------
// Checkpoints: the model file (for users) and <out>.opt (everything to resume exactly).

static nsa_status opt_path(const char *out, char **path)
{
    size_t n = strlen(out) + 5;
    *path = nsa__malloc(n, "path");
    if (!*path)
        return NSA_ERR_NOMEM;
    snprintf(*path, n, "%s.opt", out);
    return NSA_OK;
}

static nsa_status save_checkpoint(nsa_model *m, nsa_optimizer *opt, const nsa_train_options *o)
{
    if (!o->out_path)
        return NSA_OK;
    char *op = NULL;
    NSA_TRY(opt_path(o->out_path, &op));
    uint64_t seed, counter;
    nsa_model_get_rng(m, &seed, &counter);
    char seed_buf[32], counter_buf[32], steps_buf[32];
    snprintf(seed_buf, sizeof seed_buf, "%llu", (unsigned long long)seed);
    snprintf(counter_buf, sizeof counter_buf, "%llu", (unsigned long long)counter);
    snprintf(steps_buf, sizeof steps_buf, "%lld", (long long)o->steps);
    const char *keys[] = {"rng_seed", "rng_counter", "data_seed", "total_steps"};
    char data_seed[32];
    snprintf(data_seed, sizeof data_seed, "%llu", (unsigned long long)o->seed);
    const char *values[] = {seed_buf, counter_buf, data_seed, steps_buf};
    // The resume state first, then the model: each is written atomically, and a resume
    // reads only the state file, which holds the parameters too.
    nsa_status st = nsa_optimizer_save(opt, op, keys, values, 4);
    if (st == NSA_OK)
        st = nsa_model_save(m, o->out_path);
    free(op);
    return st;
}

static nsa_status parse_u64_meta(const char *path, const char *key, uint64_t *out)
{
    char buf[64];
    NSA_TRY(nsa_optimizer_file_meta(path, key, buf, sizeof buf));
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(buf, &end, 10);
    if (end == buf || *end != '\0' || errno)
        return nsa__error(NSA_ERR_FORMAT, "%s: metadata %s = '%s' is not a number", path, key, buf);
    *out = v;
    return NSA_OK;
}

static nsa_status resume_from(nsa_model *m, nsa_optimizer *opt, const nsa_train_options *o)
{
    char *op = NULL;
    NSA_TRY(opt_path(o->out_path, &op));
    uint64_t seed = 0, counter = 0, data_seed = 0;
    nsa_status st = nsa_optimizer_load(opt, op);
    if (st == NSA_OK)
        st = parse_u64_meta(op, "rng_seed", &seed);
    if (st == NSA_OK)
        st = parse_u64_meta(op, "rng_counter", &counter);
    if (st == NSA_OK)
        st = parse_u64_meta(op, "data_seed", &data_seed);
    if (st == NSA_OK && data_seed != o->seed)
        st = nsa__error(NSA_ERR_INVALID, "--resume: the run was started with seed %llu, not %llu",
                        (unsigned long long)data_seed, (unsigned long long)o->seed);
    if (st == NSA_OK)
        nsa_model_set_rng(m, seed, counter);
    free(op);
    return st;
}

// ---------------------------------------------------------------------------------------
// The loop

static nsa_status check_options(const nsa_model *m, const nsa_train_options *o)
{
    if (m->cfg.vocab_size <= 0)
        return nsa__error(NSA_ERR_INVALID, "training needs a language model: vocab_size = 0");
    if (o->batch_size < 1)
        return nsa__error(NSA_ERR_INVALID, "batch_size = %d: must be >= 1", o->batch_size);
    if (o->data_path && o->seq_len < 2)
        return nsa__error(NSA_ERR_INVALID, "seq_len = %d: must be >= 2", o->seq_len);
    if (o->steps < 1)
        return nsa__error(NSA_ERR_INVALID, "steps = %lld: must be >= 1", (long long)o->steps);
    if (o->grad_accum < 1)
        return nsa__error(NSA_ERR_INVALID, "grad_accum = %d: must be >= 1", o->grad_accum);
    if (!(o->val_fraction >= 0.0 && o->val_fraction < 1.0))
        return nsa__error(NSA_ERR_INVALID, "val_fraction = %g: must satisfy 0 <= f < 1",
                          o->val_fraction);
    if (o->eval_every < 0 || o->eval_batches < 1)
        return nsa__error(NSA_ERR_INVALID, "eval_every = %d, eval_batches = %d: need >= 0 and >= 1",
                          o->eval_every, o->eval_batches);
    if (o->checkpoint_every < 0)
        return nsa__error(NSA_ERR_INVALID, "checkpoint_every = %d: must be >= 0",
                          o->checkpoint_every);
    if (o->resume && !o->out_path)
        return nsa__error(NSA_ERR_INVALID, "--resume needs --out (the checkpoint to resume)");
    if (!o->data_path) {
        NSA_TRY(nsa_task_config_validate(&o->task));
        if (o->task.vocab_size != m->cfg.vocab_size)
            return nsa__error(NSA_ERR_INVALID, "the retrieval task has vocab_size %d but the model "
                                               "%d",
                              o->task.vocab_size, m->cfg.vocab_size);
    }
    return nsa_optim_config_validate(&o->optim);
}

// On a resume, drops the log rows of steps after `step` (written after the checkpoint the
// run resumes from, by the interrupted process), so every step appears once.
static nsa_status trim_log(const char *path, int64_t step)
{
    FILE *in = fopen(path, "r");
    if (!in)
        return NSA_OK; // no log yet: nothing to trim
    nsa__atomic_file af;
    nsa_status st = nsa__atomic_open(&af, path);
    if (st != NSA_OK) {
        fclose(in);
        return st;
    }
    char line[1024];
    int header = 1;
    while (fgets(line, sizeof line, in)) {
        if (!header && strtoll(line, NULL, 10) > step)
            continue;
        header = 0;
        fputs(line, (FILE *)af.fp);
    }
    fclose(in);
    return nsa__atomic_commit(&af);
}

static FILE *open_log(const nsa_train_options *o, int64_t step, nsa_status *st)
{
    *st = NSA_OK;
    if (!o->log_path)
        return NULL;
    if (o->resume && (*st = trim_log(o->log_path, step)) != NSA_OK)
        return NULL;
    FILE *f = fopen(o->log_path, o->resume ? "a" : "w");
    if (!f) {
        *st = nsa__error(NSA_ERR_IO, "%s: cannot open the log: %s", o->log_path, strerror(errno));
        return NULL;
    }
    if (!o->resume || ftell(f) == 0)
        fprintf(f, "step,loss,val_loss,val_accuracy,lr,grad_norm,tokens_per_second,elapsed_s\n");
    return f;
}

nsa_status nsa_train(nsa_model *m, const nsa_train_options *o, nsa_train_result *result)
{
    if (!m || !o)
        return nsa__error(NSA_ERR_INVALID, "nsa_train: model and options must not be NULL");
    NSA_TRY(check_options(m, o));
    nsa_dataset *data = NULL;
    if (o->data_path)
        NSA_TRY(nsa_dataset_load(&data, o->data_path, m->cfg.vocab_size));
    nsa_optim_config optim = o->optim;
    optim.total_steps = (int)(o->steps < 0x7fffffff ? o->steps : 0x7fffffff);
    batcher bt;
    nsa_optimizer *opt = NULL;
    FILE *log = NULL;
    nsa_status st = batcher_init(&bt, data, &o->task, o->batch_size, o->seq_len, o->val_fraction,
                                 o->seed);
    if (st == NSA_OK)
        st = nsa_optimizer_create(&opt, m, &optim);
    if (st == NSA_OK) {
        if (o->resume)
            st = resume_from(m, opt, o);
        else
            nsa_model_set_rng(m, o->seed, 0);
    }
    if (st == NSA_OK)
        log = open_log(o, nsa_optimizer_num_steps(opt), &st);

    nsa_train_progress pr;
    memset(&pr, 0, sizeof pr);
    pr.loss = NAN;
    pr.val_loss = NAN;
    pr.val_accuracy = NAN;
    pr.total_steps = o->steps;
    double start = now_seconds(), tokens = 0.0;
    int64_t step = opt ? nsa_optimizer_num_steps(opt) : 0;
    int validate_split = o->data_path == NULL || o->val_fraction > 0.0;
    while (st == NSA_OK && step < o->steps) {
        if (o->stop && *o->stop) {
            st = save_checkpoint(m, opt, o);
            if (st == NSA_OK)
                st = nsa__error(NSA_ERR_INTERRUPTED, "interrupted at step %lld: checkpoint saved",
                                (long long)step);
            break;
        }
        st = nsa_model_zero_grads(m);
        double loss_sum = 0.0;
        for (int micro = 0; st == NSA_OK && micro < o->grad_accum; micro++) {
            st = batch_train(&bt, (uint64_t)step * o->grad_accum + micro);
            float loss = 0.0f;
            if (st == NSA_OK)
                st = nsa_lm_forward_weighted(m, bt.tokens, data ? NULL : bt.weights, bt.B, bt.T,
                                             NSA_FWD_TRAIN, NULL, &loss);
            if (st == NSA_OK)
                st = nsa_lm_backward(m, 1.0f / (float)o->grad_accum);
            loss_sum += loss;
            tokens += (double)bt.B * bt.T;
        }
        if (st == NSA_OK && !isfinite(loss_sum))
            st = nsa__error(NSA_ERR_NUMERIC, "step %lld: the loss is NaN or Inf (lower --lr?)",
                            (long long)step);
        if (st == NSA_OK)
            st = nsa_optimizer_step(opt, &pr.grad_norm, &pr.lr);
        if (st != NSA_OK)
            break;
        step++;
        pr.step = step;
        pr.loss = loss_sum / o->grad_accum;
        pr.evaluated = pr.checkpointed = 0;
        int last = step == o->steps;
        if (validate_split && ((o->eval_every > 0 && step % o->eval_every == 0) || last)) {
            st = validate(m, &bt, o->eval_batches, &pr.val_loss, &pr.val_accuracy);
            pr.evaluated = 1;
        }
        if (st == NSA_OK && o->out_path &&
            ((o->checkpoint_every > 0 && step % o->checkpoint_every == 0) || last)) {
            st = save_checkpoint(m, opt, o);
            pr.checkpointed = 1;
        }
        pr.elapsed_seconds = now_seconds() - start;
        pr.tokens_per_second = pr.elapsed_seconds > 0 ? tokens / pr.elapsed_seconds : 0.0;
        if (log) {
            fprintf(log, "%lld,%.6f,%.6f,%.4f,%.6g,%.6g,%.1f,%.3f\n", (long long)step, pr.loss,
                    pr.evaluated ? pr.val_loss : NAN, pr.evaluated ? pr.val_accuracy : NAN, pr.lr,
                    pr.grad_norm, pr.tokens_per_second, pr.elapsed_seconds);
            fflush(log);
        }
        if (o->on_step)
            o->on_step(&pr, o->user);
    }
    if (result) {
        result->steps_done = step;
        result->final_loss = pr.loss;
        result->val_loss = pr.val_loss;
        result->val_accuracy = pr.val_accuracy;
        result->tokens_per_second = pr.tokens_per_second;
    }
    if (log && fclose(log) != 0 && st == NSA_OK)
        st = nsa__error(NSA_ERR_IO, "%s: error closing the log", o->log_path);
    nsa_optimizer_free(opt);
    batcher_free(&bt);
    nsa_dataset_free(data);
    return st;
}

// ---------------------------------------------------------------------------------------
// Evaluation

nsa_status nsa_evaluate(nsa_model *m, const char *data_path, const nsa_task_config *task,
                        int batch_size, int seq_len, int64_t max_tokens, double *loss,
                        double *accuracy)
{
    if (!m || !loss || !accuracy || (!data_path && !task))
        return nsa__error(NSA_ERR_INVALID, "nsa_evaluate: bad arguments");
    if (m->cfg.vocab_size <= 0)
        return nsa__error(NSA_ERR_INVALID, "evaluation needs a language model: vocab_size = 0");
    if (batch_size < 1 || (data_path && seq_len < 2) || max_tokens < 0)
        return nsa__error(NSA_ERR_INVALID, "batch_size = %d, seq_len = %d, max_tokens = %lld: "
                                           "need >= 1, >= 2, >= 0",
                          batch_size, seq_len, (long long)max_tokens);
    nsa_dataset *data = NULL;
    if (data_path)
        NSA_TRY(nsa_dataset_load(&data, data_path, m->cfg.vocab_size));
    if (!data_path)
        NSA_TRY(nsa_task_config_validate(task));
    int T = data ? seq_len : task->seq_len;
    int64_t n = data ? nsa_dataset_num_tokens(data) : 0;
    if (data && n < T)
        T = (int)n; // a short file is evaluated as one window
    int64_t windows = data ? n / T : (max_tokens > 0 ? max_tokens / T : 64);
    if (data && max_tokens > 0 && max_tokens / T < windows)
        windows = max_tokens / T > 0 ? max_tokens / T : 1;
    if (windows < 1)
        windows = 1;
    int V = m->cfg.vocab_size;
    int32_t *tokens = nsa__malloc((size_t)batch_size * T * sizeof(int32_t), "eval batch");
    float *weights = nsa__malloc((size_t)batch_size * T * sizeof(float), "eval weights");
    float *logits = data ? NULL : nsa__malloc((size_t)batch_size * T * V * sizeof(float), "logits");
    nsa_status st = tokens && weights && (data || logits) ? NSA_OK : NSA_ERR_NOMEM;
    double weighted = 0.0, weight_total = 0.0;
    int64_t correct = 0, answered = 0;
    for (int64_t w0 = 0; st == NSA_OK && w0 < windows; w0 += batch_size) {
        int rows = (int)(windows - w0 < batch_size ? windows - w0 : batch_size);
        for (int b = 0; st == NSA_OK && b < rows; b++) {
            if (data) {
                for (int t = 0; t < T; t++)
                    tokens[(size_t)b * T + t] = nsa_dataset_token(data, (w0 + b) * T + t);
            } else {
                st = nsa_task_sample(task, VAL_STREAM, (uint64_t)(w0 + b), tokens + (size_t)b * T,
                                     weights + (size_t)b * T, NULL);
            }
        }
        float l = 0.0f;
        if (st == NSA_OK)
            st = nsa_lm_forward_weighted(m, tokens, data ? NULL : weights, rows, T, 0, logits, &l);
        if (st != NSA_OK)
            break;
        double wsum = data ? (double)rows * (T - 1) : (double)rows * task->num_queries;
        weighted += l * wsum;
        weight_total += wsum;
        if (!data)
            count_correct(tokens, weights, logits, rows, T, V, &correct, &answered);
    }
    free(tokens);
    free(weights);
    free(logits);
    nsa_dataset_free(data);
    NSA_TRY(st);
    *loss = weighted / weight_total;
    *accuracy = data ? NAN : (double)correct / (double)answered;
    return NSA_OK;
}
