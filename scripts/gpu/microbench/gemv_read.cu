// Standalone decode-GEMV bandwidth microbenchmark (nvcc on the GPU machine; see run.sh): the
// load-path variants of a bf16 GEMV y = W x, W [n_out, n_in], one warp per output column, against
// a pure streaming read of the same bytes. Weights rotate over a 3 GB pool so they come from HBM.
// Back-to-back launches timed with CUDA events (launch and ramp included, as in a decode step).
#include "mb.cuh"

// One warp per column, U 16-byte vectors per lane per step (the engine's gemv_bf16 shape).
template <int U, int HINT>
__global__ void __launch_bounds__(128) gemv_warp(const bf16_t* x, const bf16_t* w, float* y, int n_out, int n_in) {
    const int lane = threadIdx.x & 31;
    const int j = blockIdx.x * 4 + (threadIdx.x >> 5);
    if (j >= n_out) return;
    const int nv = n_in >> 3;
    const bf16_t* wr = w + (size_t)j * n_in;
    float a = 0.f;
    for (int v0 = 0; v0 < nv; v0 += 32 * U) {
        uint4 wv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int v = v0 + u * 32 + lane;
            wv[u] = v < nv ? ldw<HINT>(wr + 8 * (size_t)v) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int v = v0 + u * 32 + lane;
            if (v < nv) acc8(wv[u], *(const uint4*)(x + 8 * (size_t)v), a);
        }
    }
    for (int o = 16; o; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
    if (lane == 0) y[j] = a;
}
// Pure streaming read of the same bytes (the floor for these sizes).
template <int HINT>
__global__ void readall(const uint4* p, size_t n, float* out) {
    float a = 0.f;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const uint4 v = ldw<HINT>(p + i);
        a += __uint_as_float(v.x);
    }
    if (a == 1234.5f) out[0] = a;  // keeps the loads
}

int main() {
    const size_t pool_bytes = (size_t)3 << 30;
    char* pool;
    CK(cudaMalloc(&pool, pool_bytes));
    CK(cudaMemset(pool, 0x11, pool_bytes));
    bf16_t* x;
    CK(cudaMalloc(&x, 1 << 20));
    CK(cudaMemset(x, 0x22, 1 << 20));
    float* y;
    CK(cudaMalloc(&y, 1 << 24));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    // The 30B decode shapes; the MoE rows as proxies (gate+up of 5 experts, down of 5 experts).
    struct Shape {
        const char* name;
        int n_out, n_in;
    } shapes[] = {{"o 2048x5120", 2048, 5120},
                  {"q_b 5120x768", 5120, 768},
                  {"moe gate/up proxy 15360x2048", 15360, 2048},
                  {"moe down proxy 10240x1536", 10240, 1536},
                  {"q_a+kv_a 1344x2048", 1344, 2048}};
    auto timeit = [&](const char* label, size_t bytes, auto launch) {
        const int per = 50;
        size_t copies = pool_bytes / bytes;
        if (copies > 64) copies = 64;
        for (int i = 0; i < 5; ++i) launch(pool + (i % copies) * bytes);
        CK(cudaEventRecord(e0));
        for (int i = 0; i < per; ++i) launch(pool + (i % copies) * bytes);
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        const double us = ms * 1000.0 / per;
        printf("%-36s %8.2f us %7.0f GB/s\n", label, us, bytes / (us * 1e-6) / 1e9);
    };
    for (auto& s : shapes) {
        const size_t bytes = (size_t)s.n_out * s.n_in * 2;
        printf("== %s (%.1f MB)\n", s.name, bytes / 1e6);
        const int grid = (s.n_out + 3) / 4;
        char lab[128];
#define RUN(U, H)                                                                                   \
    snprintf(lab, sizeof lab, "gemv_warp<U%d, hint %d>", U, H);                                     \
    timeit(lab, bytes, [&](char* w) { gemv_warp<U, H><<<grid, 128>>>(x, (const bf16_t*)w, y, s.n_out, s.n_in); });
        RUN(8, 0) RUN(8, 1) RUN(8, 2) RUN(8, 3) RUN(4, 0) RUN(4, 1) RUN(16, 1)
        timeit("readall (1056 x 512 threads)", bytes,
               [&](char* w) { readall<0><<<1056, 512>>>((const uint4*)w, bytes / 16, y); });
        timeit("readall, L2::256B", bytes,
               [&](char* w) { readall<1><<<1056, 512>>>((const uint4*)w, bytes / 16, y); });
    }
    return 0;
}
