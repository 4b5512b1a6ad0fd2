/*
 * context.c — the context: which device runs the ops, its threads and handles.
 */
#include "backend.h"
#include "internal.h"

#include <stdlib.h>
#include <string.h>

int nsa_device_available(nsa_device device)
{
    if (device == NSA_DEVICE_CPU)
        return 1;
#ifdef NSA_HAVE_CUDA
    if (device == NSA_DEVICE_CUDA)
        return nsa__cuda_available();
#endif
    return 0;
}

nsa_status nsa_device_parse(const char *name, nsa_device *out)
{
    if (name && strcmp(name, "cpu") == 0) {
        *out = NSA_DEVICE_CPU;
        return NSA_OK;
    }
    if (name && strcmp(name, "cuda") == 0) {
        *out = NSA_DEVICE_CUDA;
        return NSA_OK;
    }
    return nsa__error(NSA_ERR_INVALID, "device '%s': must be cpu or cuda", name ? name : "(null)");
}

nsa_status nsa_context_create(nsa_context **out, nsa_device device, int num_threads)
{
    if (!out)
        return nsa__error(NSA_ERR_INVALID, "nsa_context_create: out is NULL");
    *out = NULL;
    nsa_context *ctx = nsa__calloc(1, sizeof *ctx, "context");
    if (!ctx)
        return NSA_ERR_NOMEM;
    ctx->device = device;
    nsa_status st;
    if (device == NSA_DEVICE_CPU) {
        st = nsa__cpu_backend_init(ctx, num_threads);
    } else if (device == NSA_DEVICE_CUDA) {
#ifdef NSA_HAVE_CUDA
        st = nsa__cuda_backend_init(ctx, num_threads);
#else
        st = nsa__error(NSA_ERR_UNSUPPORTED,
                        "device cuda: this build of libnsa has no CUDA backend (build with "
                        "`make cuda` on a machine with nvcc)");
#endif
    } else {
        st = nsa__error(NSA_ERR_INVALID, "device = %d: must be NSA_DEVICE_CPU or NSA_DEVICE_CUDA",
                        (int)device);
    }
    if (st != NSA_OK) {
        free(ctx);
        return st;
    }
    *out = ctx;
    return NSA_OK;
}

void nsa_context_free(nsa_context *ctx)
{
    if (!ctx)
        return;
    if (ctx->ops && ctx->ops->destroy)
        ctx->ops->destroy(ctx);
    free(ctx);
}

nsa_device nsa_context_device(const nsa_context *ctx)
{
    return ctx->device;
}

nsa_status nsa_context_set_precision(nsa_context *ctx, nsa_precision precision)
{
    if (!ctx)
        return nsa__error(NSA_ERR_INVALID, "nsa_context_set_precision: ctx is NULL");
    if (precision != NSA_PRECISION_FP32 && precision != NSA_PRECISION_BF16)
        return nsa__error(NSA_ERR_INVALID,
                          "precision = %d: must be NSA_PRECISION_FP32 or NSA_PRECISION_BF16",
                          (int)precision);
    if (precision == NSA_PRECISION_BF16 && !ctx->ops->attn_forward_bf16)
        return nsa__error(NSA_ERR_UNSUPPORTED,
                          "precision bf16: the %s backend has no bf16 kernels (use --device cuda)",
                          ctx->ops->name);
    ctx->precision = precision;
    return NSA_OK;
}

nsa_precision nsa_context_precision(const nsa_context *ctx)
{
    return ctx->precision;
}

nsa_status nsa_precision_parse(const char *name, nsa_precision *out)
{
    if (name && strcmp(name, "fp32") == 0) {
        *out = NSA_PRECISION_FP32;
        return NSA_OK;
    }
    if (name && strcmp(name, "bf16") == 0) {
        *out = NSA_PRECISION_BF16;
        return NSA_OK;
    }
    return nsa__error(NSA_ERR_INVALID, "precision '%s': must be fp32 or bf16",
                      name ? name : "(null)");
}
