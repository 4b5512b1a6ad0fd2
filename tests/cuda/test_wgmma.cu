/*
 * test_wgmma.cu — the Hopper warpgroup MMA building blocks of src/cuda/wgmma.cuh against a
 * float64 product on the host: the sw128 tile layout, the K-major and MN-major descriptors,
 * and the three product shapes (shared x shared 64x64, registers x shared 64x64 K-major,
 * registers x shared 64x128 MN-major), for the head dims 128 and 64. Skips (exit 0) without
 * a GPU or on a GPU older than sm_90, and says so; the kernels are empty in the sm_90
 * (non-"a") build, which the test detects and reports as a failure on an H100.
 */
#include "cuda/wgmma.cuh"

#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

typedef __nv_bfloat16 bf16;

// A, B: [64, DP] row-major bf16. c1 = A B^T [64, 64]; c2 = A[:, :64] B[:, :DP] ([64 x 64] x
// [64 x DP], B MN-major) [64, DP]; c3 = A B^T with A from registers [64, 64].
template <int DP>
__global__ void probe_kernel(const bf16 *A, const bf16 *B, float *c1, float *c2, float *c3,
                             int *ran)
{
#if NSA_WGMMA
    __shared__ __align__(1024) unsigned char sm[2 * 64 * DP * 2];
    unsigned char *As = sm, *Bs = sm + 64 * DP * 2;
    for (int e = threadIdx.x; e < 64 * DP; e += 128) {
        int r = e / DP, c = e % DP;
        *(bf16 *)(As + sw128_off(64, r, c)) = A[e];
        *(bf16 *)(Bs + sw128_off(64, r, c)) = B[e];
    }
    fence_async_smem();
    __syncthreads();
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    int mi = lane / 8, r = lane % 8;
    uint32_t af[DP / 16][4];
    for (int ks = 0; ks < DP / 16; ks++)
        ldmatrix_x4(af[ks],
                    As + sw128_off(64, warp * 16 + (mi % 2) * 8 + r, ks * 16 + (mi / 2) * 8));
    float d1[8][4], d2[DP / 8][4], d3[8][4];
    wgmma_fence();
    for (int ks = 0; ks < DP / 16; ks++)
        wgmma_ss_n64(d1, desc_k(As, 64, ks), desc_k(Bs, 64, ks), ks > 0);
    for (int ks = 0; ks < DP / 16; ks++)
        wgmma_rs_n64<0>(d3, af[ks], desc_k(Bs, 64, ks), ks > 0);
    for (int ks = 0; ks < 4; ks++) {
        if constexpr (DP == 128)
            wgmma_rs_n128<1>(d2, af[ks], desc_mn(Bs, 64, ks), ks > 0);
        else
            wgmma_rs_n64<1>(d2, af[ks], desc_mn(Bs, 64, ks), ks > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    for (int j = 0; j < DP / 8; j++)
        for (int e = 0; e < 4; e++) {
            int row = warp * 16 + g + 8 * (e / 2), col = 8 * j + 2 * q + (e & 1);
            c2[row * DP + col] = d2[j][e];
            if (j < 8) {
                c1[row * 64 + col] = d1[j][e];
                c3[row * 64 + col] = d3[j][e];
            }
        }
    if (threadIdx.x == 0)
        *ran = 1;
#endif
}

static double bf(float x) { return (double)__bfloat162float(__float2bfloat16(x)); }

template <int DP> static int run(void)
{
    size_t n = 64 * DP;
    bf16 *hA = (bf16 *)malloc(n * 2), *hB = (bf16 *)malloc(n * 2);
    double *a = (double *)malloc(n * 8), *b = (double *)malloc(n * 8);
    unsigned s = 12345u + DP;
    for (size_t i = 0; i < n; i++) {
        s = s * 1664525u + 1013904223u;
        float x = (float)((s >> 8) % 2001) / 1000.0f - 1.0f;
        s = s * 1664525u + 1013904223u;
        float y = (float)((s >> 8) % 2001) / 1000.0f - 1.0f;
        hA[i] = __float2bfloat16(x);
        hB[i] = __float2bfloat16(y);
        a[i] = bf(x);
        b[i] = bf(y);
    }
    bf16 *dA, *dB;
    float *d1, *d2, *d3;
    int *dran, ran = 0;
    cudaMalloc(&dA, n * 2);
    cudaMalloc(&dB, n * 2);
    cudaMalloc(&d1, 64 * 64 * 4);
    cudaMalloc(&d2, n * 4);
    cudaMalloc(&d3, 64 * 64 * 4);
    cudaMalloc(&dran, 4);
    cudaMemset(dran, 0, 4);
    cudaMemcpy(dA, hA, n * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(dB, hB, n * 2, cudaMemcpyHostToDevice);
    probe_kernel<DP><<<1, 128>>>(dA, dB, d1, d2, d3, dran);
    cudaError_t err = cudaDeviceSynchronize();
    float *h1 = (float *)malloc(64 * 64 * 4), *h2 = (float *)malloc(n * 4),
          *h3 = (float *)malloc(64 * 64 * 4);
    cudaMemcpy(h1, d1, 64 * 64 * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(h2, d2, n * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(h3, d3, 64 * 64 * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(&ran, dran, 4, cudaMemcpyDeviceToHost);
    int fail = 0;
    if (err != cudaSuccess || !ran) {
        printf("FAIL wgmma DP=%d: %s\n", DP,
               err != cudaSuccess ? cudaGetErrorString(err) : "kernel has no sm_90a code");
        fail = 1;
    } else {
        double e1 = 0, e2 = 0, e3 = 0, m1 = 0, m2 = 0;
        for (int i = 0; i < 64; i++)
            for (int j = 0; j < 64; j++) {
                double ref = 0;
                for (int k = 0; k < DP; k++)
                    ref += a[i * DP + k] * b[j * DP + k];
                e1 = fmax(e1, fabs(h1[i * 64 + j] - ref));
                e3 = fmax(e3, fabs(h3[i * 64 + j] - ref));
                m1 = fmax(m1, fabs(ref));
            }
        for (int i = 0; i < 64; i++)
            for (int j = 0; j < DP; j++) {
                double ref = 0;
                for (int k = 0; k < 64; k++)
                    ref += a[i * DP + k] * b[k * DP + j];
                e2 = fmax(e2, fabs(h2[i * DP + j] - ref));
                m2 = fmax(m2, fabs(ref));
            }
        e1 /= m1, e3 /= m1, e2 /= m2;
        fail = !(e1 < 1e-5 && e2 < 1e-5 && e3 < 1e-5);
        printf("%s wgmma DP=%d: max rel err ss_n64 %.2e, rs_n64 K-major %.2e, rs MN-major %.2e\n",
               fail ? "FAIL" : "ok", DP, e1, e3, e2);
    }
    cudaFree(dA), cudaFree(dB), cudaFree(d1), cudaFree(d2), cudaFree(d3), cudaFree(dran);
    free(hA), free(hB), free(a), free(b), free(h1), free(h2), free(h3);
    return fail;
}

int main(void)
{
    int n = 0;
    cudaDeviceProp p;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        printf("skip: no CUDA device\n");
        return 0;
    }
    cudaGetDeviceProperties(&p, 0);
    if (p.major < 9) {
        printf("skip: %s is sm_%d%d, wgmma needs sm_90\n", p.name, p.major, p.minor);
        return 0;
    }
    int fail = run<128>() + run<64>();
    printf("RESULT: %s\n", fail ? "FAIL" : "all passed");
    return fail ? 1 : 0;
}
