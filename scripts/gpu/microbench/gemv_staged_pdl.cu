// PDL-chain microbenchmark (nvcc on the GPU machine; see run.sh): a light predecessor (160 CTAs
// spin for `spin` ns, then write x) followed by a bf16 GEMV y = W x, both launched with
// programmatic stream serialization, timed as pairs minus the predecessor alone. GEMV variants:
//   warp U8 / U4: one warp per column, the first step's weights loaded before griddepcontrol.wait
//                 (the engine's gemv_bf16 shape);
//   staged:       one CTA per slice of columns, the whole slice bulk-copied (cp.async.bulk, TMA)
//                 into shared memory before the wait, dot products from shared memory after it.
// `early` 1: the predecessor triggers its dependents before its own wait. Checks that the staged
// GEMV gives the warp GEMV's bits (same per-lane order).
#include "mb.cuh"

__device__ __forceinline__ void pdl_wait() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;");
}
__device__ __forceinline__ unsigned saddr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

template <bool EARLY>
__global__ void prev_kernel(bf16_t* x, int n, long long ns) {
    if (EARLY) asm volatile("griddepcontrol.launch_dependents;");
    pdl_wait();
    long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); while (t - t0 < ns);
    if (blockIdx.x == 0)
        for (int i = threadIdx.x; i < n; i += blockDim.x) x[i] = (bf16_t)(0x3f80 + (i & 7));
}
template <int U>
__global__ void __launch_bounds__(128) gemv_warp(const bf16_t* x, const bf16_t* w, float* y, int n_out, int n_in) {
    const int lane = threadIdx.x & 31, j = blockIdx.x * 4 + (threadIdx.x >> 5);
    const int nv = n_in >> 3;
    const bf16_t* wr = w + (size_t)(j < n_out ? j : 0) * n_in;
    float a = 0.f;
    uint4 wv[U];
    auto load = [&](int v0) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int v = v0 + u * 32 + lane;
            wv[u] = (j < n_out && v < nv) ? ldw<0>(wr + 8 * (size_t)v) : make_uint4(0, 0, 0, 0);
        }
    };
    load(0);
    pdl_wait();
    for (int v0 = 0; v0 < nv; v0 += 32 * U) {
        if (v0) load(v0);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int v = v0 + u * 32 + lane;
            if (v < nv) acc8(wv[u], *(const uint4*)(x + 8 * (size_t)v), a);
        }
    }
    for (int o = 16; o; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
    if (lane == 0 && j < n_out) y[j] = a;
}
// CTA b owns columns [b*cpc, min(n_out, (b+1)*cpc)): their rows are contiguous, bulk-copied in
// 32 KB pieces on one mbarrier before the wait.
__global__ void __launch_bounds__(256)
    gemv_staged(const bf16_t* x, const bf16_t* w, float* y, int n_out, int n_in, int cpc) {
    extern __shared__ __align__(128) unsigned char sm[];
    __shared__ __align__(8) unsigned long long bar;
    const int j0 = blockIdx.x * cpc, j1 = min(n_out, j0 + cpc);
    const unsigned bytes = (unsigned)(j1 - j0) * n_in * 2;
    if (threadIdx.x == 0) {
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(saddr(&bar)));
        asm volatile("fence.mbarrier_init.release.cluster;");
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(saddr(&bar)), "r"(bytes)
                     : "memory");
        const unsigned piece = 32768;
        for (unsigned off = 0; off < bytes; off += piece) {
            const unsigned b = bytes - off < piece ? bytes - off : piece;
            asm volatile(
                "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                    saddr(sm + off)),
                "l"((const unsigned char*)(w + (size_t)j0 * n_in) + off), "r"(b), "r"(saddr(&bar))
                : "memory");
        }
    }
    pdl_wait();
    __syncthreads();  // the barrier is initialised before anyone waits on it
    unsigned done = 0;
    while (!done)
        asm volatile(
            "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0; selp.u32 %0, 1, 0, p; }"
            : "=r"(done)
            : "r"(saddr(&bar))
            : "memory");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5, nv = n_in >> 3;
    for (int j = j0 + warp; j < j1; j += nw) {
        const uint4* wr = (const uint4*)(sm + (size_t)(j - j0) * n_in * 2);
        float a = 0.f;
        for (int v = lane; v < nv; v += 32) acc8(wr[v], *(const uint4*)(x + 8 * (size_t)v), a);
        for (int o = 16; o; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
        if (lane == 0) y[j] = a;
    }
}

template <typename K, typename... A>
void launch(K k, dim3 g, dim3 b, size_t smem, bool pdl, A... args) {
    cudaLaunchConfig_t c = {};
    c.gridDim = g;
    c.blockDim = b;
    c.dynamicSmemBytes = smem;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    c.attrs = at;
    c.numAttrs = pdl ? 1 : 0;
    CK(cudaLaunchKernelEx(&c, k, args...));
}

int main() {
    const size_t pool_bytes = (size_t)2 << 30;
    char* pool;
    CK(cudaMalloc(&pool, pool_bytes));
    CK(cudaMemset(pool, 0x11, pool_bytes));
    bf16_t* x;
    CK(cudaMalloc(&x, 1 << 20));
    float* y;
    CK(cudaMalloc(&y, 1 << 24));
    CK(cudaFuncSetAttribute(gemv_staged, cudaFuncAttributeMaxDynamicSharedMemorySize, 220 * 1024));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    struct Shape {
        const char* name;
        int n_out, n_in;
    } shapes[] = {{"o 2048x5120", 2048, 5120},
                  {"q_b 5120x768", 5120, 768},
                  {"q_a+kv_a 1344x2048", 1344, 2048},
                  {"W_UV-sized 5120x512", 5120, 512}};
    const int sms = 132;
    for (auto& s : shapes) {
        const size_t bytes = (size_t)s.n_out * s.n_in * 2;
        size_t copies = pool_bytes / bytes;
        if (copies > 64) copies = 64;
        const int cpc = (s.n_out + sms - 1) / sms, sgrid = (s.n_out + cpc - 1) / cpc;
        const size_t ssm = (size_t)cpc * s.n_in * 2;
        printf("== %s (%.1f MB), staged: %d CTAs x %d columns, %zu KB shared\n", s.name, bytes / 1e6, sgrid, cpc,
               ssm / 1024);
        for (long long spin : {0LL, 3000LL, 6000LL})
            for (int early : {0, 1})
                for (int var : {0, 1, 2}) {
                    auto one = [&](int i) {
                        char* w = pool + (i % copies) * bytes;
                        if (early)
                            launch(prev_kernel<true>, dim3(160), dim3(256), 0, true, x, s.n_in, spin);
                        else
                            launch(prev_kernel<false>, dim3(160), dim3(256), 0, true, x, s.n_in, spin);
                        const dim3 g((s.n_out + 3) / 4);
                        if (var == 0)
                            launch(gemv_warp<8>, g, dim3(128), 0, true, (const bf16_t*)x, (const bf16_t*)w, y, s.n_out,
                                   s.n_in);
                        else if (var == 1)
                            launch(gemv_warp<4>, g, dim3(128), 0, true, (const bf16_t*)x, (const bf16_t*)w, y, s.n_out,
                                   s.n_in);
                        else
                            launch(gemv_staged, dim3(sgrid), dim3(256), ssm, true, (const bf16_t*)x, (const bf16_t*)w,
                                   y, s.n_out, s.n_in, cpc);
                    };
                    for (int i = 0; i < 5; ++i) one(i);
                    const int per = 60;
                    CK(cudaEventRecord(e0));
                    for (int i = 0; i < per; ++i) one(i);
                    CK(cudaEventRecord(e1));
                    CK(cudaEventSynchronize(e1));
                    float ms, ms0;
                    CK(cudaEventElapsedTime(&ms, e0, e1));
                    CK(cudaEventRecord(e0));
                    for (int i = 0; i < per; ++i)
                        launch(prev_kernel<false>, dim3(160), dim3(256), 0, true, x, s.n_in, spin);
                    CK(cudaEventRecord(e1));
                    CK(cudaEventSynchronize(e1));
                    CK(cudaEventElapsedTime(&ms0, e0, e1));
                    const char* vn[] = {"warp U8", "warp U4", "staged"};
                    printf("spin %4lld ns early %d %-8s pair %7.2f us, predecessor alone %6.2f us -> GEMV adds %6.2f us\n",
                           spin, early, vn[var], ms * 1000 / per, ms0 * 1000 / per, (ms - ms0) * 1000 / per);
                }
        launch(prev_kernel<false>, dim3(160), dim3(256), 0, false, x, s.n_in, 0LL);
        launch(gemv_warp<8>, dim3((s.n_out + 3) / 4), dim3(128), 0, false, (const bf16_t*)x, (const bf16_t*)pool, y,
               s.n_out, s.n_in);
        launch(gemv_staged, dim3(sgrid), dim3(256), ssm, false, (const bf16_t*)x, (const bf16_t*)pool, y + s.n_out,
               s.n_out, s.n_in, cpc);
        CK(cudaDeviceSynchronize());
        static float hy[2 * 8192];
        CK(cudaMemcpy(hy, y, 2 * s.n_out * 4, cudaMemcpyDeviceToHost));
        int bad = 0;
        for (int j = 0; j < s.n_out; ++j) bad += hy[j] != hy[s.n_out + j];
        printf("staged == warp: %d of %d columns differ\n", bad, s.n_out);
    }
    return 0;
}
