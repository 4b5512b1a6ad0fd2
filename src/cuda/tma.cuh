/*
 * tma.cuh — Hopper's tensor memory accelerator (TMA) for the bf16 kernels: one thread copies
 * a whole tile of keys from global to shared memory (cp.async.bulk.tensor), the copy
 * completing on a transaction barrier (mbarrier) the consumers wait on. The tiles land in
 * the sw128 layout of wgmma.cuh (the copy engine's 128-byte swizzle is the same pattern),
 * so the products read them as they read tiles loaded by cp.async.
 *
 * Tensor maps describe X [B, Tk, G, d] bf16 (K, V, or their compressed tokens) as a 4-D
 * tensor {d, G, Tk, B} with boxes {64, 1, rows, 1}: one box is one 64-column panel of a tile
 * of `rows` keys of one kv head and batch entry. Columns past d and keys past Tk read as
 * zeros (a tile never reaches into the next batch entry's keys). Query-shaped rows (q, dO
 * [B, T, G * hpg, d]) are 5-D tensors {d, hpg, G, T, B} whose boxes hold whole positions of
 * one kv head (the key-centric dk/dv kernels' row tiles); 1-D bulk copies move their
 * per-row metadata. The encoder (cuTensorMapEncodeTiled) is the driver's, found at context
 * creation (cudaGetDriverEntryPointByVersion); without it the kernels keep their cp.async
 * loads.
 */
#ifndef NSA_CUDA_TMA_CUH
#define NSA_CUDA_TMA_CUH

#include <cuda.h>

#include "cuda/common.cuh"
#include "cuda/mma.cuh"

// The tensor map of X [B, Tk, G, d] bf16 (16-byte aligned, d % 8 == 0) with boxes of `rows`
// keys x 64 columns (rows <= 256). NSA_ERR_UNSUPPORTED when the driver has no encoder.
nsa_status nsa__cuda_tensor_map(nsa_context *ctx, CUtensorMap *map, const void *X, int B, int Tk,
                                int G, int d, int rows);

// The tensor map of query-shaped rows X [B, T, G * hpg, d] bf16 (q, dO) as the 5-D tensor
// {d, hpg, G, T, B} with boxes {64, hpg, 1, npos, 1}: one box is one 64-column panel of the
// npos * hpg rows (position-major, the rows of a tile of the key-centric kernels) of npos
// consecutive positions and one kv head. hpg * npos <= 256.
nsa_status nsa__cuda_tensor_map_rows(nsa_context *ctx, CUtensorMap *map, const void *X, int B,
                                     int T, int G, int hpg, int d, int npos);

static __device__ __forceinline__ void mbar_init(uint64_t *bar, unsigned count)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count)
                 : "memory");
}

// Makes barrier initialisations visible to the copy engine (then a __syncthreads to the
// block's threads).
static __device__ __forceinline__ void mbar_fence_init()
{
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// The barriers of an ST-stage pipeline, bars[0 .. 2 ST): `full` (i < ST), completing on one
// arrival (the expect_tx of the thread that issues the stage's copies) and the copies'
// bytes, then `empty` (ST + i), completing on `consumers` arrivals (every thread done
// reading the stage). Thread 0 initialises them; a __syncthreads must follow before other
// threads use them.
template <int ST>
static __device__ __forceinline__ void mbar_init_pipe(uint64_t *bars, unsigned consumers)
{
    if (threadIdx.x == 0) {
#pragma unroll
        for (int i = 0; i < ST; i++) {
            mbar_init(&bars[i], 1);
            mbar_init(&bars[ST + i], consumers);
        }
        mbar_fence_init();
    }
}

// The calling thread's arrival, announcing `bytes` of copies that complete on the barrier.
static __device__ __forceinline__ void mbar_expect_tx(uint64_t *bar, unsigned bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
                 "r"(bytes)
                 : "memory");
}

// The calling thread's arrival (no transaction bytes).
static __device__ __forceinline__ void mbar_arrive(uint64_t *bar)
{
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

// Waits until the barrier's phase of parity `parity` has completed.
static __device__ __forceinline__ void mbar_wait(uint64_t *bar, unsigned parity)
{
    asm volatile("{\n"
                 ".reg .pred p;\n"
                 "WAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
                 "@!p bra WAIT;\n"
                 "}\n" ::"r"(smem_addr(bar)),
                 "r"(parity)
                 : "memory");
}

// Waits until use `use` (0, 1, ..) of an ST-stage pipeline's barriers `stages` has completed:
// use i is stage i % ST's phase i / ST.
template <int ST>
static __device__ __forceinline__ void mbar_wait_use(uint64_t *stages, int use)
{
    mbar_wait(&stages[use % ST], (unsigned)(use / ST) & 1u);
}

// Box (c0, c1, c2, c3) of the tensor map (a __grid_constant__ kernel parameter) into dst,
// completing on bar.
static __device__ __forceinline__ void tma_load_4d(void *dst, const CUtensorMap *map, int c0,
                                                   int c1, int c2, int c3, uint64_t *bar)
{
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(smem_addr(dst)),
                 "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
                 "r"(smem_addr(bar))
                 : "memory");
}

// Box (c0, .., c4) of a 5-D tensor map into dst, completing on bar.
static __device__ __forceinline__ void tma_load_5d(void *dst, const CUtensorMap *map, int c0,
                                                   int c1, int c2, int c3, int c4, uint64_t *bar)
{
    asm volatile("cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3, %4, %5, %6}], [%7];\n" ::"r"(smem_addr(dst)),
                 "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
                 "r"(c4), "r"(smem_addr(bar))
                 : "memory");
}

// `bytes` (a multiple of 16) of contiguous global memory at src (16-byte aligned) into dst,
// completing on bar.
static __device__ __forceinline__ void bulk_load(void *dst, const void *src, unsigned bytes,
                                                 uint64_t *bar)
{
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1], %2, [%3];\n" ::"r"(smem_addr(dst)),
                 "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(smem_addr(bar))
                 : "memory");
}

// Keys key0 .. key0 + R - 1 of kv head g, batch entry b as an R-row sw128 tile of DP columns
// at dst (1024-byte aligned), completing on bar (which the caller told to expect R * DP * 2
// bytes).
template <int DP, int R>
static __device__ __forceinline__ void tma_tile(void *dst, const CUtensorMap *map, int g, int b,
                                                int key0, uint64_t *bar)
{
#pragma unroll
    for (int p = 0; p < DP / 64; p++)
        tma_load_4d((unsigned char *)dst + p * R * 128, map, p * 64, g, key0, b, bar);
}

#endif // NSA_CUDA_TMA_CUH
