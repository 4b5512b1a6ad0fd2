/*
 * scan.cu — exclusive prefix sums of int arrays on the device (CUB's single-pass scan),
 * for index builds too large for one thread block's scan (the chunked selection index of
 * attention_bf16_slc_kc.cu). In a file of its own: CUB's headers are heavy to compile, and
 * the other files' kernels stay as they were.
 */
#include "cuda/attention.cuh"

#include <cub/device/device_scan.cuh>

size_t nsa__cuda_scan_ws_bytes(size_t n)
{
    size_t bytes = 0;
    if (n > (size_t)INT32_MAX ||
        cub::DeviceScan::ExclusiveSum(NULL, bytes, (const int *)NULL, (int *)NULL, (int)n) !=
            cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return bytes;
}

nsa_status nsa__cuda_scan_ints(nsa_context *ctx, int *dst, const int *src, size_t n, void *ws)
{
    size_t bytes = nsa__cuda_scan_ws_bytes(n);
    if (bytes == 0)
        return nsa__error(NSA_ERR_UNSUPPORTED, "cuda scan of %zu ints: too many", n);
    NSA_CUDA_TRY(cub::DeviceScan::ExclusiveSum(ws, bytes, src, dst, (int)n,
                                               nsa__cuda_stream(ctx)));
    NSA_CUDA_LAUNCHED("cub::DeviceScan::ExclusiveSum");
    return NSA_OK;
}
