// MoE routing, token sort and combine kernels of the CUDA backend (backend.rs, `moe`).
//
// Pipeline for T tokens, E experts, top_k picks per token (N = T*top_k pairs):
//   1. router GEMM (cuBLAS, f32 output)                      logits [T, E] f32
//   2. moe_route: one warp per token (route.cuh), DeepSeek-V3 noaux_tc    ids [T, top_k] i32, w [T, top_k] f32,
//      routing exactly as indexcache_ops::cpu::route          counts[E] += picks (atomics)
//   3. host: download counts, exclusive prefix sum -> offsets[E], upload
//   4. moe_slots: one block per expert, a stable block scan   slot_of [N], token_of_slot [N]
//      over the pairs in (t, j) order -> expert-contiguous slots, token order within an expert
//   5. gather rows (elementwise.cu gather_rows), per-expert GEMMs, SwiGLU -> Y [N, hidden]
//   6. moe_combine: out[t] = sum_j w[t,j] * Y[slot_of[t,j]] (+ shared[t]), f32, fixed j order
//
// Everything is deterministic: no atomics decide an order (the counts are order-free sums).
// No headers are included (NVRTC only); bf16 is unsigned short bits, as in elementwise.cu.

// Element types, FULL_MASK, neg_inf, bf16 <-> f32 and ld/st: common.cuh; the routing: route.cuh
// (both prepended).

// One warp per token (`route_token`, route.cuh). Dynamic shared memory per warp: 3E + 2G + top_k
// floats.
extern "C" __global__ void moe_route(const float* logits, const float* bias, int* ids, float* wts, int* counts, int T,
                                     int E, int G, int topk_group, int top_k, int norm, float scaling) {
    PDL_ENTRY();
    extern __shared__ float smem[];
    const int warp = threadIdx.x >> 5;
    const int t = blockIdx.x * (blockDim.x >> 5) + warp;
    if (t >= T) return;  // a whole warp leaves together
    float b[ROUTE_PER_LANE];
    route_bias(bias, E, b);
    route_token(logits, b, ids, wts, counts, t, E, G, topk_group, top_k, norm, scaling,
                smem + (i64)warp * (3 * E + 2 * G + top_k));
}

// One block per expert e (blockDim a multiple of 32, at most 1024). Walks the N pairs in order and
// gives the pairs of expert e consecutive slots offsets[e], offsets[e]+1, ... (token order):
// slot_of[pair] = slot, token_of_slot[slot] = pair / top_k.
extern "C" __global__ void moe_slots(const int* ids, const int* offsets, int* slot_of, int* token_of_slot, int n_pairs,
                                     int top_k) {
    PDL_ENTRY();
    __shared__ int wsum[32];
    const int e = blockIdx.x;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int base = offsets[e];
    for (int start = 0; start < n_pairs; start += blockDim.x) {
        const int i = start + threadIdx.x;
        const bool hit = i < n_pairs && ids[i] == e;
        const unsigned mask = __ballot_sync(FULL_MASK, hit);
        if (lane == 0) wsum[w] = __popc(mask);
        __syncthreads();
        int before = 0, total = 0;
        for (int k = 0; k < nw; ++k) {
            if (k < w) before += wsum[k];
            total += wsum[k];
        }
        if (hit) {
            const int s = base + before + __popc(mask & ((1u << lane) - 1u));
            slot_of[i] = s;
            token_of_slot[s] = i / top_k;
        }
        base += total;
        __syncthreads();  // wsum is rewritten next round
    }
}

// One block per token: out[t, c] = sum_j w[t,j] * Y[slot_of[t,j], c] (+ shared[t, c] if given), f32.
template <typename T>
__device__ void moe_combine(const T* y, const int* slot_of, const float* w, const T* shared, T* out, int top_k,
                            i64 hidden) {
    const i64 t = blockIdx.x;
    const int* slots = slot_of + t * top_k;
    const float* wt = w + t * top_k;
    for (i64 c = threadIdx.x; c < hidden; c += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < top_k; ++j) acc += wt[j] * ld(y, (i64)slots[j] * hidden + c);
        if (shared) acc += ld(shared, t * hidden + c);
        st(out, t * hidden + c, acc);
    }
}
extern "C" __global__ void moe_combine_f32(const float* y, const int* slot_of, const float* w, const float* shared,
                                           float* out, int top_k, i64 hidden) {
    PDL_ENTRY();
    moe_combine<float>(y, slot_of, w, shared, out, top_k, hidden);
}
extern "C" __global__ void moe_combine_bf16(const bf16_t* y, const int* slot_of, const float* w, const bf16_t* shared,
                                            bf16_t* out, int top_k, i64 hidden) {
    PDL_ENTRY();
    moe_combine<bf16_t>(y, slot_of, w, shared, out, top_k, hidden);
}
