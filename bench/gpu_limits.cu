// gpu_limits.cu — the memory limits the attention kernels run against, measured on the
// machine at hand: device memory (a large device-to-device copy), and reads that hit the L2
// cache (a working set well inside L2 read over and over by every SM, through registers and
// through cp.async into shared memory, as the kernels load key blocks). BENCHMARKS.md quotes
// the selected path's bytes against the cp.async L2 rate.
//
//   build/cuda/gpu_limits [--l2-mib 16] [--reps 20]
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(x)                                                                               \
    do {                                                                                       \
        cudaError_t e_ = (x);                                                                  \
        if (e_ != cudaSuccess) {                                                               \
            fprintf(stderr, "gpu_limits: %s: %s\n", #x, cudaGetErrorString(e_));               \
            return 1;                                                                          \
        }                                                                                      \
    } while (0)

// Every block reads `passes` times a window of the buffer (n16 16-byte words), its blocks
// starting at different offsets so the whole buffer stays hot in L2.
__global__ void l2_read_regs(const uint4 *buf, size_t n16, int passes, unsigned *sink)
{
    unsigned acc = 0;
    size_t start = (size_t)blockIdx.x * 4096 % n16;
    for (int p = 0; p < passes; p++)
        for (size_t i = threadIdx.x; i < 65536; i += blockDim.x) {
            uint4 v = __ldcg(buf + (start + i) % n16);
            acc ^= v.x ^ v.y ^ v.z ^ v.w;
        }
    if (acc == 0x9e3779b9u)
        *sink = acc;
}

// The same reads by cp.async.cg into a 32 KiB shared-memory ring (two stages of 16 KiB).
__global__ void l2_read_cp_async(const uint4 *buf, size_t n16, int passes, unsigned *sink)
{
    __shared__ __align__(16) uint4 ring[2][1024];
    size_t start = (size_t)blockIdx.x * 4096 % n16;
    unsigned acc = 0;
    int it = 0;
    for (int p = 0; p < passes; p++)
        for (size_t i0 = 0; i0 < 65536; i0 += 1024, it++) {
            uint4 *stage = ring[it & 1];
            for (int i = threadIdx.x; i < 1024; i += blockDim.x) {
                unsigned dst = (unsigned)__cvta_generic_to_shared(stage + i);
                const uint4 *src = buf + (start + i0 + i) % n16;
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
            }
            asm volatile("cp.async.commit_group;\n" ::);
            asm volatile("cp.async.wait_group 1;\n" ::);
            __syncthreads();
            acc ^= ring[(it + 1) & 1][threadIdx.x].x;
            __syncthreads();
        }
    asm volatile("cp.async.wait_group 0;\n" ::);
    if (acc == 0x9e3779b9u)
        *sink = acc;
}

int main(int argc, char **argv)
{
    size_t l2_mib = 16;
    int reps = 20;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--l2-mib") && i + 1 < argc)
            l2_mib = (size_t)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: gpu_limits [--l2-mib N] [--reps N]\n");
            return 2;
        }
    }
    if (l2_mib < 1 || reps < 1) {
        fprintf(stderr, "gpu_limits: --l2-mib and --reps must be positive\n");
        return 2;
    }
    int dev = 0, sms = 0, l2 = 0;
    cudaDeviceProp prop;
    CHECK(cudaGetDevice(&dev));
    CHECK(cudaGetDeviceProperties(&prop, dev));
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
    printf("device: %s, %d SMs, L2 %d MiB\n", prop.name, sms, l2 >> 20);

    cudaEvent_t e0, e1;
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
    float ms;

    // device memory: copy 1 GiB (read + write counted)
    size_t big = (size_t)1 << 30;
    void *a, *b;
    CHECK(cudaMalloc(&a, big));
    CHECK(cudaMalloc(&b, big));
    CHECK(cudaMemset(a, 1, big));
    CHECK(cudaMemcpy(b, a, big, cudaMemcpyDeviceToDevice));
    CHECK(cudaEventRecord(e0));
    for (int r = 0; r < reps; r++)
        CHECK(cudaMemcpy(b, a, big, cudaMemcpyDeviceToDevice));
    CHECK(cudaEventRecord(e1));
    CHECK(cudaEventSynchronize(e1));
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    printf("device copy:          %7.2f TB/s (1 GiB, read + write)\n",
           2.0 * big * reps / (ms * 1e-3) / 1e12);
    CHECK(cudaFree(b));

    // L2 reads: a working set of l2_mib MiB, 8 blocks of 256 threads per SM, 1 MiB per pass
    size_t n16 = (l2_mib << 20) / 16;
    unsigned *sink;
    CHECK(cudaMalloc(&sink, sizeof(unsigned)));
    int blocks = 8 * sms, passes = 8;
    double bytes = (double)blocks * passes * 65536 * 16 * reps;
    l2_read_regs<<<blocks, 256>>>((const uint4 *)a, n16, passes, sink);
    CHECK(cudaGetLastError());
    CHECK(cudaEventRecord(e0));
    for (int r = 0; r < reps; r++)
        l2_read_regs<<<blocks, 256>>>((const uint4 *)a, n16, passes, sink);
    CHECK(cudaEventRecord(e1));
    CHECK(cudaEventSynchronize(e1));
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    printf("L2 read (registers):  %7.2f TB/s (%zu MiB working set)\n",
           bytes / (ms * 1e-3) / 1e12, l2_mib);
    l2_read_cp_async<<<blocks, 256>>>((const uint4 *)a, n16, passes, sink);
    CHECK(cudaGetLastError());
    CHECK(cudaEventRecord(e0));
    for (int r = 0; r < reps; r++)
        l2_read_cp_async<<<blocks, 256>>>((const uint4 *)a, n16, passes, sink);
    CHECK(cudaEventRecord(e1));
    CHECK(cudaEventSynchronize(e1));
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    printf("L2 read (cp.async):   %7.2f TB/s (%zu MiB working set)\n",
           bytes / (ms * 1e-3) / 1e12, l2_mib);
    CHECK(cudaFree(a));
    CHECK(cudaFree(sink));
    return 0;
}
