/*
 * nsa.h — Native Sparse Attention in C. The one public header of libnsa.
 *
 * Read top to bottom, this is the manual. The math every function computes is
 * shared/SPEC.md (the "SPEC" below); section numbers refer to it.
 *
 * Conventions
 *   - Every function that can fail returns nsa_status (0 = NSA_OK, negative = error)
 *     and leaves a message for nsa_last_error() (per thread).
 *   - Arrays are dense, row-major, float32 unless said otherwise; shapes are given in
 *     brackets: x [B,T,E] means x[(b*T + t)*E + e].
 *   - All pointers passed to and returned from the API are host memory, whatever the
 *     device: the library copies to and from the device itself.
 *   - The caller owns what it allocates; objects made by *_create / *_load are freed by
 *     the matching *_free (which accepts NULL).
 *   - The library never prints, never exits and never aborts on bad input.
 */
#ifndef NSA_H
#define NSA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(NSA_BUILD_SHARED)
#define NSA_API __declspec(dllexport)
#elif defined(__GNUC__)
#define NSA_API __attribute__((visibility("default")))
#else
#define NSA_API
#endif

#define NSA_VERSION_MAJOR 0
#define NSA_VERSION_MINOR 1
#define NSA_VERSION_PATCH 0
NSA_API const char *nsa_version(void);

// ---------------------------------------------------------------------------------------
// Status codes and errors

typedef enum nsa_status {
    NSA_OK = 0,
    NSA_ERR_INVALID = -1,     // an argument or option breaks a rule (the message names it)
    NSA_ERR_SHAPE = -2,       // an array has the wrong shape or dtype
    NSA_ERR_NUMERIC = -3,     // NaN or Inf found in input data (or produced by training)
    NSA_ERR_IO = -4,          // a file could not be opened, read, written or renamed
    NSA_ERR_FORMAT = -5,      // a file is truncated, corrupt or not what was expected
    NSA_ERR_NOMEM = -6,       // an allocation failed (host or device)
    NSA_ERR_BACKEND = -7,     // the device (CUDA, cuBLAS) reported an error
    NSA_ERR_UNSUPPORTED = -8, // valid request this build cannot serve (e.g. no CUDA)
    NSA_ERR_INTERRUPTED = -9, // a long call stopped early because it was asked to
} nsa_status;

// A static string describing a status code ("invalid argument", ...).
NSA_API const char *nsa_status_str(nsa_status status);
// The message of the last error raised on this thread ("" if none). Valid until the
// next failing call on the same thread.
NSA_API const char *nsa_last_error(void);

// ---------------------------------------------------------------------------------------
// Configuration (SPEC §1)

typedef enum nsa_compress {
    NSA_COMPRESS_MEAN = 0, // mean of the l keys/values of a compression block (no params)
    NSA_COMPRESS_CONV = 1, // per-channel weighted sum, weights [G,l,d], init 1/l
    NSA_COMPRESS_MLP = 2,  // fc2(GELU(fc1(vec(block + pos)))), the paper's phi
} nsa_compress;

typedef enum nsa_select_score {
    NSA_SELECT_MEAN_KEY = 0, // q . mean of the block's causal keys (seed)
    NSA_SELECT_CMP_ATTN = 1, // compressed-attention probabilities mapped to blocks (paper)
} nsa_select_score;

typedef enum nsa_select_fixed {
    NSA_SELECT_FIXED_NONE = 0,
    NSA_SELECT_FIXED_PAPER = 1, // block 0 and the 2 most recent candidates always selected
} nsa_select_fixed;

typedef enum nsa_gate {
    NSA_GATE_STATIC = 0, // softmax of 3 learned scalars per layer
    NSA_GATE_TOKEN = 1,  // sigmoid(Linear(D -> 3H)) per token and head
} nsa_gate;

typedef struct nsa_config {
    int embed_dim;           // E, required (>= 1); nsa_config_default leaves it 0
    int hidden_size;         // D
    int num_heads;           // H
    int head_dim;            // d
    int window_size;         // w
    int block_size;          // b
    int num_selected_blocks; // n
    int compression_ratio;   // r (stride)
    int num_layers;          // N
    double dropout;          // p, 0 <= p < 1
    int seq_len;             // expected T (sizing hints, benchmarks); any T >= 1 runs
    int num_kv_heads;        // G; 0 means "= num_heads"
    int compression_block;   // l; 0 means "= compression_ratio"
    nsa_compress compress;
    nsa_select_score select_score;
    nsa_select_fixed select_fixed;
    nsa_gate gate;
    double rope_theta; // 0 = off
    int vocab_size;    // V; > 0 adds the language-model wrapper (SPEC §5)
} nsa_config;

// The seed's defaults (SPEC §1 table). embed_dim is left 0: set it before use.
NSA_API void nsa_config_default(nsa_config *cfg);
// Same as nsa_config_default (the seed's recommended list).
NSA_API void nsa_recommended_defaults(nsa_config *cfg);
// The paper's shape scaled to a small model: G = H/4, l = 32, r = 16, b = 64, n = 16,
// select_fixed paper, w = 512, compress mlp, select_score cmp_attn, gate token,
// rope_theta 10000. embed_dim is left 0.
NSA_API void nsa_paper_defaults(nsa_config *cfg);

// Checks every rule of SPEC §1. On failure returns NSA_ERR_INVALID with a message that
// names the option, its value and the rule ("num_kv_heads = 3: must divide num_heads (8)").
NSA_API nsa_status nsa_config_validate(const nsa_config *cfg);
// The effective G and l (resolving the 0 = default convention).
NSA_API int nsa_config_kv_heads(const nsa_config *cfg);
NSA_API int nsa_config_compression_block(const nsa_config *cfg);

// Exact number of trained scalars of the model of SPEC §2 (not embed or lm_head).
// -1 if the config is invalid (see nsa_last_error).
NSA_API int64_t nsa_param_count(const nsa_config *cfg);
// Size of the model's output feature vector (= hidden_size); -1 if invalid.
NSA_API int64_t nsa_output_size(const nsa_config *cfg);

// Options by their snake_case names (SPEC §1), as strings: what checkpoints store in
// their metadata and what the command line parses. nsa_config_set accepts the names of
// nsa_config_option_name(); enum options take their spelled values ("mlp", "cmp_attn",
// "paper", "token", "none", ...). Errors name the option and the value.
NSA_API int nsa_config_num_options(void);
NSA_API const char *nsa_config_option_name(int i);
NSA_API nsa_status nsa_config_set(nsa_config *cfg, const char *name, const char *value);
// Writes the value of option `name` into buf (always NUL-terminated).
NSA_API nsa_status nsa_config_get(const nsa_config *cfg, const char *name, char *buf, size_t buf_size);

// ---------------------------------------------------------------------------------------
// Context: the device, its threads and handles. No global state lives outside it.

typedef enum nsa_device {
    NSA_DEVICE_CPU = 0,
    NSA_DEVICE_CUDA = 1,
} nsa_device;

typedef struct nsa_context nsa_context;

// num_threads: CPU threads (0 = OpenMP's default). Fails with NSA_ERR_UNSUPPORTED when
// the device is not compiled in or not present.
NSA_API nsa_status nsa_context_create(nsa_context **out, nsa_device device, int num_threads);
NSA_API void nsa_context_free(nsa_context *ctx);
NSA_API nsa_device nsa_context_device(const nsa_context *ctx);
// 1 if the device can be used by this build on this machine.
NSA_API int nsa_device_available(nsa_device device);
// Parses "cpu" / "cuda".
NSA_API nsa_status nsa_device_parse(const char *name, nsa_device *out);

// Precision of the context's dense products and attention. NSA_PRECISION_FP32 (the
// default): fp32 everywhere. NSA_PRECISION_BF16: the operands of the dense products and of
// the three attention paths are rounded to bf16 and multiplied on tensor cores with fp32
// accumulation; parameters (the master weights), optimizer state, activations, outputs and
// gradients stay fp32. BF16 needs the CUDA backend (NSA_ERR_UNSUPPORTED on the CPU);
// attention shapes the bf16 kernels do not cover (head_dim not a multiple of 8, or above
// 128) run in fp32.
typedef enum nsa_precision {
    NSA_PRECISION_FP32 = 0,
    NSA_PRECISION_BF16 = 1,
} nsa_precision;

NSA_API nsa_status nsa_context_set_precision(nsa_context *ctx, nsa_precision precision);
NSA_API nsa_precision nsa_context_precision(const nsa_context *ctx);
// Parses "fp32" / "bf16".
NSA_API nsa_status nsa_precision_parse(const char *name, nsa_precision *out);

// ---------------------------------------------------------------------------------------
// The model (SPEC §2-§5)

typedef struct nsa_model nsa_model;

// Builds a model for cfg (validated) on ctx, with every parameter zero. The context must
// outlive the model. Call nsa_model_init or load weights before use.
NSA_API nsa_status nsa_model_create(nsa_model **out, nsa_context *ctx, const nsa_config *cfg);
NSA_API void nsa_model_free(nsa_model *model);
// Initialises every parameter as SPEC §2 says (Glorot-uniform linears, zero biases,
// LayerNorm ones/zeros, static gates 0, conv 1/l, mlp positions 0; embedding N(0,1)),
// from a deterministic generator seeded by `seed`.
NSA_API nsa_status nsa_model_init(nsa_model *model, uint64_t seed);
NSA_API const nsa_config *nsa_model_config(const nsa_model *model);

// Checkpoints are safetensors files (SPEC §7). nsa_model_load reads the config from the
// metadata, validates it and every tensor's name, dtype (F32 or BF16) and shape. Truncated,
// corrupt or absurd files give NSA_ERR_FORMAT; a missing file NSA_ERR_IO.
NSA_API nsa_status nsa_model_load(nsa_model **out, nsa_context *ctx, const char *path);
// Writes atomically (temporary file in the same directory, then rename).
NSA_API nsa_status nsa_model_save(const nsa_model *model, const char *path);

// The parameter table: every trained tensor, in checkpoint order, inside one contiguous
// buffer (the gradients live in a twin buffer with the same offsets).
typedef struct nsa_tensor_info {
    const char *name; // SPEC §7 name, e.g. "layers.0.attn.q_proj.weight"
    int ndim;
    int64_t shape[4];
    size_t offset; // in floats, into the parameter (and gradient) buffer
    size_t numel;
    int decay; // 1 if AdamW applies weight decay (matrices; not norms, biases, gates)
} nsa_tensor_info;

NSA_API size_t nsa_model_num_tensors(const nsa_model *model);
NSA_API nsa_status nsa_model_tensor(const nsa_model *model, size_t i, nsa_tensor_info *out);
// Index of the tensor called `name`, or -1.
NSA_API int64_t nsa_model_find_tensor(const nsa_model *model, const char *name);
// Total floats in the buffer: param_count plus embed and lm_head when vocab_size > 0,
// plus alignment gaps (each tensor starts on a 64-byte boundary; gaps stay zero).
NSA_API size_t nsa_model_buffer_size(const nsa_model *model);
// Copy all parameters (or gradients) to / from host memory of buffer_size floats.
NSA_API nsa_status nsa_model_get_params(const nsa_model *model, float *dst);
NSA_API nsa_status nsa_model_set_params(nsa_model *model, const float *src);
NSA_API nsa_status nsa_model_get_grads(const nsa_model *model, float *dst);
NSA_API nsa_status nsa_model_zero_grads(nsa_model *model);

// Forward flags.
#define NSA_FWD_ALL_POSITIONS 1u // output every position [B,T,D] instead of the last [B,D]
#define NSA_FWD_TRAIN 2u         // dropout on (seeded, see nsa_model_set_rng) and keep the
                                 // activations that nsa_model_backward needs
#define NSA_FWD_KEEP 4u          // keep activations for backward, dropout off

// The whole model (Edifice's build): x [B,T,E] -> out [B,D] (last position) or [B,T,D]
// (NSA_FWD_ALL_POSITIONS). Any T >= 1. NaN/Inf in x gives NSA_ERR_NUMERIC.
NSA_API nsa_status nsa_model_forward(nsa_model *model, const float *x, int batch, int seq_len,
                                     unsigned flags, float *out);
// Backward of the last nsa_model_forward made with NSA_FWD_TRAIN or NSA_FWD_KEEP:
// dout has the shape of that forward's out. Gradients are accumulated (+=) into the
// gradient buffer; dx [B,T,E] (may be NULL) is overwritten.
NSA_API nsa_status nsa_model_backward(nsa_model *model, const float *dout, float *dx);

// One block (Edifice's build_nsa_block), inference: x [B,T,D] -> out [B,T,D].
NSA_API nsa_status nsa_model_block_forward(nsa_model *model, int layer, const float *x, int batch,
                                           int seq_len, float *out);
// The attention layer alone (Edifice's build_nsa_attention), inference, layer `layer`'s
// weights: z [B,T,D] (the normalised block input) -> out [B,T,D] (after o_proj).
NSA_API nsa_status nsa_model_attention_forward(nsa_model *model, int layer, const float *z,
                                               int batch, int seq_len, float *out);

// Dropout randomness: a counter-based generator; (seed, counter) is the whole state,
// so saving and restoring it continues a run exactly.
NSA_API void nsa_model_set_rng(nsa_model *model, uint64_t seed, uint64_t counter);
NSA_API void nsa_model_get_rng(const nsa_model *model, uint64_t *seed, uint64_t *counter);

// ---------------------------------------------------------------------------------------
// Language model wrapper (SPEC §5); needs vocab_size > 0.

// tokens [B,T] int32 in [0,V) -> logits [B,T,V] (may be NULL) and the mean next-token
// cross-entropy over the B*(T-1) predictions (loss may be NULL; needs T >= 2).
// flags: NSA_FWD_TRAIN or NSA_FWD_KEEP keep what nsa_lm_backward needs.
NSA_API nsa_status nsa_lm_forward(nsa_model *model, const int32_t *tokens, int batch, int seq_len,
                                  unsigned flags, float *logits, float *loss);
// Gradient of the loss of the last nsa_lm_forward, times `scale` (1 for a plain step;
// 1/k for k accumulated micro-batches), accumulated (+=) into the gradient buffer.
NSA_API nsa_status nsa_lm_backward(nsa_model *model, float scale);

// As nsa_lm_forward, with per-position loss weights [B,T] (weight[b,t] weighs the
// prediction of tokens[b,t+1] made at position t; the last position's weight is unused):
// loss = sum(w * ce) / sum(w). NULL weights = all ones. nsa_lm_backward follows it too.
NSA_API nsa_status nsa_lm_forward_weighted(nsa_model *model, const int32_t *tokens,
                                           const float *weights, int batch, int seq_len,
                                           unsigned flags, float *logits, float *loss);

// ---------------------------------------------------------------------------------------
// Cached generation (SPEC §5): one token at a time, keeping each layer's keys, values and
// compressed tokens, so step t costs O(t) attention instead of a whole forward. The logits
// equal those of nsa_lm_forward on the same prefix. One sequence per generator.

typedef struct nsa_generator nsa_generator;

// max_len: the longest sequence the caches hold (prompt and generated tokens together).
NSA_API nsa_status nsa_generator_create(nsa_generator **out, nsa_model *model, int max_len);
NSA_API void nsa_generator_free(nsa_generator *gen);
// Appends `token` at the next position and writes the logits [V] of the token after it.
// NSA_ERR_INVALID when the generator is full (max_len tokens) or the token is out of range.
NSA_API nsa_status nsa_generator_step(nsa_generator *gen, int32_t token, float *logits);
// Number of tokens appended so far.
NSA_API int nsa_generator_length(const nsa_generator *gen);
// Forgets the sequence (the caches are kept for reuse).
NSA_API void nsa_generator_reset(nsa_generator *gen);
// Draws a token from logits [V] at `temperature` (0 = argmax, ties to the lowest id) with
// a uniform number u in [0,1) supplied by the caller (so the caller owns the randomness).
NSA_API int32_t nsa_sample_token(const float *logits, int vocab_size, double temperature, double u);

// ---------------------------------------------------------------------------------------
// Optimisation: AdamW with global-norm clipping and a warmup + cosine learning rate.

typedef struct nsa_optim_config {
    double lr;            // peak learning rate (default 3e-3)
    double min_lr;        // floor of the cosine decay (default lr / 10)
    int warmup_steps;     // linear warmup from 0 (default 100)
    int total_steps;      // length of the schedule (default 1000)
    double beta1, beta2;  // default 0.9, 0.95
    double eps;           // default 1e-8
    double weight_decay;  // decoupled; matrices only (not norms, biases, gates); default 0.1
    double clip_norm;     // clip the global gradient norm to this; 0 = off; default 1.0
} nsa_optim_config;

NSA_API void nsa_optim_config_default(nsa_optim_config *cfg);
NSA_API nsa_status nsa_optim_config_validate(const nsa_optim_config *cfg);
// The learning rate of step `step` (0-based): warmup then cosine decay to min_lr.
NSA_API double nsa_optim_lr(const nsa_optim_config *cfg, int64_t step);

typedef struct nsa_optimizer nsa_optimizer;

NSA_API nsa_status nsa_optimizer_create(nsa_optimizer **out, nsa_model *model,
                                        const nsa_optim_config *cfg);
NSA_API void nsa_optimizer_free(nsa_optimizer *opt);
// One step from the model's gradient buffer (as accumulated by the backward calls; the
// caller zeroes it between steps): clip, AdamW update with the schedule's lr. Reports the
// gradient norm before clipping and the lr used (either may be NULL). A NaN/Inf gradient
// gives NSA_ERR_NUMERIC and leaves the parameters unchanged.
NSA_API nsa_status nsa_optimizer_step(nsa_optimizer *opt, double *grad_norm, double *lr);
NSA_API int64_t nsa_optimizer_num_steps(const nsa_optimizer *opt);
// The training state — the model's parameters, the moments and the step — as one
// safetensors file, written atomically, with extra metadata key/value strings (the trainer
// stores its RNG state and data position). One file, so a resume never mixes steps.
NSA_API nsa_status nsa_optimizer_save(const nsa_optimizer *opt, const char *path,
                                      const char *const *keys, const char *const *values,
                                      int num_meta);
// Restores the state, the model's parameters included; the file must match the model's
// parameter buffer size.
NSA_API nsa_status nsa_optimizer_load(nsa_optimizer *opt, const char *path);
// Metadata value of an optimizer file written by nsa_optimizer_save (copied into buf).
NSA_API nsa_status nsa_optimizer_file_meta(const char *path, const char *key, char *buf,
                                           size_t buf_size);

// Forces the gates of every layer to fixed values (g_cmp, g_slc, g_win), each in [0,1] and
// summing to 1, instead of the learned ones (which then get no gradient): e.g. {0, 0, 1} trains and runs
// the model with the sliding window alone, the baseline NSA is compared against. NULL
// restores the learned gates.
NSA_API nsa_status nsa_model_set_gate_override(nsa_model *model, const float *gates3);

// ---------------------------------------------------------------------------------------
// Training data

typedef struct nsa_dataset nsa_dataset;

// Token data from a file, chosen by its name:
//   *.npy  — int32, int64 or uint16 token ids (any shape, read flat);
//   *.bin  — raw little-endian uint16 token ids (what GPT data pipelines write);
//   anything else — the file's bytes, vocabulary 256.
// vocab_size: the model's vocabulary; every token must be below it (the error names the
// first offender). The file must hold at least 2 tokens.
NSA_API nsa_status nsa_dataset_load(nsa_dataset **out, const char *path, int vocab_size);
NSA_API void nsa_dataset_free(nsa_dataset *ds);
NSA_API int64_t nsa_dataset_num_tokens(const nsa_dataset *ds);
// Token i (0 <= i < num_tokens).
NSA_API int32_t nsa_dataset_token(const nsa_dataset *ds, int64_t i);

// ---------------------------------------------------------------------------------------
// The built-in task: long-context key-value retrieval
//
// A sequence of seq_len tokens: random filler with num_pairs "pair tokens" scattered
// through its first part — each says "key k holds value v" — then num_queries queries of
// 3 tokens: the marker, a key of a pair, and that key's value, which the model must
// predict. Every pair lies more than `min_distance` tokens before the queries, so a sliding window of at most that size
// cannot see it: only long-range retrieval answers better than chance (1/num_values).
// Token ids: 0 = query marker, [1, 1+K) keys, [1+K, 1+K+V) values, then K*V pair tokens
// (key k, value v at 1+K+V + k*V + v), the rest up to vocab_size filler.

typedef struct nsa_task_config {
    int seq_len;      // default 256
    int num_pairs;    // default 4
    int num_keys;     // K, default 8 (at most 4096)
    int num_values;   // V, default 8 (at most 4096)
    int vocab_size;   // default 96
    int min_distance; // default 64: pairs lie more than this before the first query
    int num_queries;  // default 4, at most num_pairs: distinct pairs asked at the end
} nsa_task_config;

NSA_API void nsa_task_config_default(nsa_task_config *cfg);
NSA_API nsa_status nsa_task_config_validate(const nsa_task_config *cfg);
// Sequence number `index` of the stream `seed` (deterministic): tokens [seq_len] ending
// with the queries; loss weights [seq_len] (may be NULL): 1 at each query's key, the
// position that predicts the answer, 0 elsewhere; *answer (may be NULL) = the last answer
// (tokens[seq_len-1]). Accuracy = share of weighted positions whose argmax is the answer.
NSA_API nsa_status nsa_task_sample(const nsa_task_config *cfg, uint64_t seed, uint64_t index,
                                   int32_t *tokens, float *weights, int32_t *answer);

// ---------------------------------------------------------------------------------------
// The training loop (what `nsa train` runs)

typedef struct nsa_train_progress {
    int64_t step, total_steps;
    double loss;          // training loss of this step
    double val_loss;      // last validation loss (NAN before the first evaluation)
    double val_accuracy;  // retrieval task: last held-out accuracy (NAN otherwise)
    double lr, grad_norm;
    double tokens_per_second; // over the run so far (this process)
    double elapsed_seconds;
    int evaluated;        // 1 when val_loss was computed at this step
    int checkpointed;     // 1 when a checkpoint was written at this step
} nsa_train_progress;

typedef struct nsa_train_options {
    const char *data_path; // NULL: the built-in retrieval task (task below)
    nsa_task_config task;
    int batch_size;        // default 16
    int seq_len;           // default 256 (data files; the task uses task.seq_len)
    int64_t steps;         // default 1000 (total, counting steps done before a resume)
    int grad_accum;        // micro-batches per step, default 1
    nsa_optim_config optim;
    uint64_t seed;         // data order, dropout, init (default 0)
    double val_fraction;   // share of a data file held out, default 0.1
    int eval_every;        // steps between validations, default 100 (0 = only at the end)
    int eval_batches;      // batches per validation, default 8
    int checkpoint_every;  // steps between checkpoints, default 500 (0 = only at the end)
    const char *out_path;  // checkpoint (model); the optimizer state goes to out_path + ".opt"
    int resume;            // continue from out_path (and its .opt) exactly
    const char *log_path;  // CSV of every step (NULL = none)
    // Called after every step (may be NULL).
    void (*on_step)(const nsa_train_progress *progress, void *user);
    void *user;
    // Polled between steps: when non-zero the loop checkpoints and returns
    // NSA_ERR_INTERRUPTED (SIGINT handlers set it).
    volatile int *stop;
} nsa_train_options;

NSA_API void nsa_train_options_default(nsa_train_options *opts);

typedef struct nsa_train_result {
    int64_t steps_done;
    double final_loss, val_loss, val_accuracy; // val_accuracy: retrieval task only
    double tokens_per_second;
} nsa_train_result;

// Trains `model` (freshly initialised by the caller, or loaded) as `opts` say. With
// opts->resume the model's weights, the optimizer state, the step, the RNG and the data
// position are restored from out_path; the run then ends exactly as an uninterrupted one.
NSA_API nsa_status nsa_train(nsa_model *model, const nsa_train_options *opts,
                             nsa_train_result *result);

// Validation of a model on a file (loss over consecutive windows of seq_len tokens, up to
// max_tokens of them, 0 = all) or on the retrieval task (max_tokens / seq_len sequences):
// mean next-token loss and, for the task, answer accuracy (NAN for files).
NSA_API nsa_status nsa_evaluate(nsa_model *model, const char *data_path, const nsa_task_config *task,
                                int batch_size, int seq_len, int64_t max_tokens, double *loss,
                                double *accuracy);

// ---------------------------------------------------------------------------------------
// The attention op alone (SPEC §6)

typedef struct nsa_attention_desc {
    int batch;               // B
    int seq_len;             // T
    int num_heads;           // H
    int num_kv_heads;        // G, divides H
    int head_dim;            // d
    int block_size;          // b
    int window_size;         // w
    int compression_ratio;   // r
    int compression_block;   // l, multiple of r
    int num_selected_blocks; // n
    nsa_select_score select_score;
    nsa_select_fixed select_fixed;
    float scale; // 0 = 1/sqrt(d)
} nsa_attention_desc;

// Fills a desc from a model config (B and T left 0).
NSA_API void nsa_attention_desc_from_config(nsa_attention_desc *desc, const nsa_config *cfg);

// The three-path attention with mean compression of k and v:
//   q [B,T,H,d], k, v [B,T,G,d], gates [B,T,H,3] (cmp, slc, win; already activated),
//   block_indices [B,T,G,n] int32 or NULL (-1 = unused slot; replaces scoring and top-k),
//   out [B,T,H,d]; indices_out [B,T,G,n] (may be NULL) receives the selection used:
//   the selected block indices of each (b,t,g) in ascending order, -1 in unused slots.
// Given block_indices must be, per (b,t,g), distinct candidates (0 <= i, i*b <= t) or -1.
NSA_API nsa_status nsa_attention_forward(nsa_context *ctx, const nsa_attention_desc *desc,
                                         const float *q, const float *k, const float *v,
                                         const float *gates, const int32_t *block_indices,
                                         float *out, int32_t *indices_out);
// Its backward (recomputes the forward): dout [B,T,H,d] -> dq [B,T,H,d], dk, dv [B,T,G,d],
// dgates [B,T,H,3], all overwritten. The selection is not differentiated.
NSA_API nsa_status nsa_attention_backward(nsa_context *ctx, const nsa_attention_desc *desc,
                                          const float *q, const float *k, const float *v,
                                          const float *gates, const int32_t *block_indices,
                                          const float *dout, float *dq, float *dk, float *dv,
                                          float *dgates);

// ---------------------------------------------------------------------------------------
// Arrays as .npy files

typedef enum nsa_dtype {
    NSA_DTYPE_F32 = 0,
    NSA_DTYPE_F64 = 1,
    NSA_DTYPE_I32 = 2,
    NSA_DTYPE_I64 = 3,
    NSA_DTYPE_U16 = 4,
    NSA_DTYPE_BF16 = 5,
} nsa_dtype;

typedef struct nsa_array {
    nsa_dtype dtype;
    int ndim;
    int64_t shape[8];
    void *data; // owned; free with nsa_array_free
} nsa_array;

NSA_API size_t nsa_dtype_size(nsa_dtype dtype);
NSA_API int64_t nsa_array_numel(const nsa_array *a);
// Reads a little-endian, C-order .npy (versions 1-3) of f4, f8, i4, i8, u2. Malformed,
// truncated or unsupported files give NSA_ERR_FORMAT with the reason.
NSA_API nsa_status nsa_npy_load(const char *path, nsa_array *out);
// Writes atomically (temporary name, then rename).
NSA_API nsa_status nsa_npy_save(const char *path, const nsa_array *a);
NSA_API void nsa_array_free(nsa_array *a);

#ifdef __cplusplus
}
#endif
#endif // NSA_H
