// Shared by the standalone microbenchmarks of this folder (nvcc on the GPU machine, run.sh):
// includes, the CUDA error check, the bf16 weight loads and the 8-element bf16 dot step.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>
typedef unsigned short bf16_t;
#define CK(x)                                                                               \
    do {                                                                                    \
        cudaError_t e = (x);                                                                \
        if (e != cudaSuccess) {                                                             \
            printf("CUDA %s at %d\n", cudaGetErrorString(e), __LINE__);                     \
            exit(1);                                                                        \
        }                                                                                   \
    } while (0)

// HINT 0: the engine's load (ld.global.nc.L1::no_allocate); 1: + L2::256B; 2: + L2::128B;
// 3: coherent load + L2::256B.
template <int HINT>
__device__ __forceinline__ uint4 ldw(const void* p) {
    uint4 v;
    if (HINT == 0)
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    else if (HINT == 1)
        asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    else if (HINT == 2)
        asm volatile("ld.global.nc.L1::no_allocate.L2::128B.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    else
        asm volatile("ld.global.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ void acc8(const uint4& w, const uint4& x, float& a) {
    const unsigned* wp = (const unsigned*)&w;
    const unsigned* xp = (const unsigned*)&x;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        a = fmaf(__uint_as_float(wp[i] << 16), __uint_as_float(xp[i] << 16), a);
        a = fmaf(__uint_as_float(wp[i] & 0xffff0000u), __uint_as_float(xp[i] & 0xffff0000u), a);
    }
}
