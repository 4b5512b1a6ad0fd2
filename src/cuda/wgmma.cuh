/*
 * wgmma.cuh — Hopper warpgroup MMA (wgmma.mma_async, sm_90a) for the bf16 attention kernels:
 * the swizzled shared-memory tile it reads, its matrix descriptors, and the three product
 * shapes the kernels use. A warpgroup is the 4 warps of a 128-thread block; one wgmma
 * multiplies a 64-row A by a 16 x N slice of B on all four tensor cores of the SM at once.
 *
 * Tile layout ("sw128"): a tile of R rows x DP bf16 columns is stored as DP / 64 panels of
 * R rows x 64 columns (128 bytes a row), panel after panel; in row r the 16-byte chunk c
 * (columns 8c .. 8c + 7 of the panel) sits at chunk position c ^ (r % 8). This is the
 * 128-byte swizzle of the wgmma descriptor (bank-conflict free for 8-row ldmatrix reads
 * and cp.async writes alike), and one tile serves both operand majors:
 *   K-major (rows = M or N, columns = K): 8-row groups 1024 bytes apart (SBO), a k-step of
 *     16 columns 32 bytes further in the panel, the next 64 columns one panel further;
 *   MN-major (rows = K, columns = N): 64-column panels R * 128 bytes apart (LBO), 8-row
 *     groups 1024 bytes apart (SBO), a k-step of 16 rows 2048 bytes further.
 * Tiles must start on 1024-byte boundaries (the swizzle is taken from address bits 4-9).
 *
 * Accumulators use the mma.sync C layout per 8-column block: d[j][0..1] row g, columns
 * 8j + 2c, +1; d[j][2..3] row g + 8 (g = lane / 4, c = lane % 4, rows of warp w start at
 * 16w). Register A operands are the mma.sync m16n8k16 A fragments of the warp's 16 rows.
 *
 * Order: the shared-memory writes (cp.async) complete, fence_async_smem() by each writing
 * thread, __syncthreads(), then wgmma_fence(), the products, wgmma_commit(),
 * wgmma_wait<0>() before the accumulators are read or the tiles overwritten.
 *
 * Only compiled for sm_90a (NSA_WGMMA); the sm_90 build keeps the mma.sync kernels.
 */
#ifndef NSA_CUDA_WGMMA_CUH
#define NSA_CUDA_WGMMA_CUH

#include "cuda/mma.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NSA_WGMMA 1
#else
#define NSA_WGMMA 0
#endif

// Byte offset of element (row, col) in a sw128 tile of R rows.
static __device__ __forceinline__ uint32_t sw128_off(int R, int row, int col)
{
    return (uint32_t)((col >> 6) * R * 128 + row * 128 + ((((col >> 3) & 7) ^ (row & 7)) << 4) +
                      (col & 7) * 2);
}

// Descriptor of a sw128 operand starting at byte address a (shared window).
static __device__ __forceinline__ uint64_t gmma_desc(uint32_t a, uint32_t lbo)
{
    return (uint64_t)((a & 0x3FFFF) >> 4) | ((uint64_t)((lbo >> 4) & 0x3FFF) << 16) |
           ((uint64_t)(1024 >> 4) << 32) | (1ull << 62);
}

// K-major operand: rows of the tile are M (or N), k-step ks covers columns 16ks .. 16ks + 15.
// The address field holds (address >> 4) in 14 bits and shared addresses stay below 256 KiB,
// so an offset adds to the descriptor of the tile's start (constants in unrolled loops).
static __device__ __forceinline__ uint64_t desc_k(const void *tile, int R, int ks)
{
    return gmma_desc(smem_addr(tile), 16) + (uint64_t)(((ks >> 2) * R * 128 + (ks & 3) * 32) >> 4);
}

// MN-major operand: rows of the tile are K, k-step ks covers rows 16ks .. 16ks + 15.
static __device__ __forceinline__ uint64_t desc_mn(const void *tile, int R, int ks)
{
    return gmma_desc(smem_addr(tile), (uint32_t)R * 128) + (uint64_t)(ks * 2048 >> 4);
}

// The warpgroup of the calling thread, as a warp-uniform value (a shuffle from lane 0: the
// compiler can then keep what derives from it, such as tile addresses and descriptors, in
// uniform registers).
static __device__ __forceinline__ int warpgroup_index()
{
    return __shfl_sync(0xffffffffu, (int)(threadIdx.x / 128), 0);
}

static __device__ __forceinline__ void fence_async_smem()
{
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

static __device__ __forceinline__ void wgmma_fence()
{
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

static __device__ __forceinline__ void wgmma_commit()
{
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

template <int N> static __device__ __forceinline__ void wgmma_wait()
{
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// After a wait: ties the accumulators to this point, so the compiler cannot move their
// reads above the wait (no instruction; CUTLASS's warpgroup_fence_operand).
template <int NT> static __device__ __forceinline__ void wgmma_hold(float (&d)[NT][4])
{
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            asm volatile("" : "+f"(d[j][e])::"memory");
}

#if NSA_WGMMA
// The accumulator operands of the products below, which PTX names register by register: d's
// fragments as "+f" operands (32 for n = 64, 64 for n = 128) and their placeholders in the
// instruction text, which the inputs' placeholders follow (%32 .. or %64 ..).
#define WGMMA_D4(d, i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define WGMMA_D_N64(d)                                                                             \
    WGMMA_D4(d, 0), WGMMA_D4(d, 1), WGMMA_D4(d, 2), WGMMA_D4(d, 3), WGMMA_D4(d, 4),                \
        WGMMA_D4(d, 5), WGMMA_D4(d, 6), WGMMA_D4(d, 7)
#define WGMMA_D_N128(d)                                                                            \
    WGMMA_D_N64(d), WGMMA_D4(d, 8), WGMMA_D4(d, 9), WGMMA_D4(d, 10), WGMMA_D4(d, 11),              \
        WGMMA_D4(d, 12), WGMMA_D4(d, 13), WGMMA_D4(d, 14), WGMMA_D4(d, 15)
#define WGMMA_R_0_31                                                                               \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "        \
    "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define WGMMA_R_N64 "{" WGMMA_R_0_31 "}"
#define WGMMA_R_N128                                                                               \
    "{" WGMMA_R_0_31 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, "         \
    "%45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, "        \
    "%62, %63}"

// d (64 x 64, fp32) = A B (accumulate = 0) or d += A B: A and B in shared memory
// (descriptors), A K-major, B K-major (TB = 0) or MN-major (N contiguous, TB = 1).
template <int TB = 0>
static __device__ __forceinline__ void wgmma_ss_n64(float (&d)[8][4], uint64_t da, uint64_t db,
                                                    int accumulate)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WGMMA_R_N64
                 ", %32, %33, p, 1, 1, 0, %35;\n}\n"
                 : WGMMA_D_N64(d)
                 : "l"(da), "l"(db), "r"(accumulate), "n"(TB));
}

// d (64 x 128, fp32) = A B (accumulate = 0) or d += A B: A and B in shared memory
// (descriptors), both K-major.
static __device__ __forceinline__ void wgmma_ss_n128(float (&d)[16][4], uint64_t da, uint64_t db,
                                                     int accumulate)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " WGMMA_R_N128
                 ", %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : WGMMA_D_N128(d)
                 : "l"(da), "l"(db), "r"(accumulate));
}

// d (64 x 64, fp32) = A B (accumulate = 0) or d += A B: A (64 x 16) from registers
// (each warp its 16 rows as the mma.sync A fragment), B in shared memory, MN-major (N
// contiguous) when TB = 1, K-major when TB = 0.
template <int TB>
static __device__ __forceinline__ void wgmma_rs_n64(float (&d)[8][4], const uint32_t (&a)[4],
                                                    uint64_t db, int accumulate)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WGMMA_R_N64
                 ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
                 : WGMMA_D_N64(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate),
                   "n"(TB));
}

// d (64 x 128, fp32) = A B (accumulate = 0) or d += A B: A (64 x 16) from registers
// (each warp its 16 rows as the mma.sync A fragment), B in shared memory, MN-major (N
// contiguous) when TB = 1, K-major when TB = 0.
template <int TB>
static __device__ __forceinline__ void wgmma_rs_n128(float (&d)[16][4], const uint32_t (&a)[4],
                                                     uint64_t db, int accumulate)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " WGMMA_R_N128
                 ", {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
                 : WGMMA_D_N128(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate),
                   "n"(TB));
}
#endif // NSA_WGMMA

#endif // NSA_CUDA_WGMMA_CUH
