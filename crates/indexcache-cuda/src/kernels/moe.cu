// MoE routing, token sort and combine kernels of the CUDA backend (backend.rs, `moe`).
//
// Pipeline for T tokens, E experts, top_k picks per token (N = T*top_k pairs):
//   1. router GEMM (cuBLAS, f32 output)                      logits [T, E] f32
//   2. moe_route: one warp per token, DeepSeek-V3 noaux_tc    ids [T, top_k] i32, w [T, top_k] f32,
//      routing exactly as indexcache_ops::cpu::route          counts[E] += picks (atomics)
//   3. host: download counts, exclusive prefix sum -> offsets[E], upload
//   4. moe_slots: one block per expert, a stable block scan   slot_of [N], token_of_slot [N]
//      over the pairs in (t, j) order -> expert-contiguous slots, token order within an expert
//   5. gather rows (elementwise.cu gather_rows), per-expert GEMMs, SwiGLU -> Y [N, hidden]
//   6. moe_combine: out[t] = sum_j w[t,j] * Y[slot_of[t,j]] (+ shared[t]), f32, fixed j order
//
// Everything is deterministic: no atomics decide an order (the counts are order-free sums).
// No headers are included (NVRTC only); bf16 is unsigned short bits, as in elementwise.cu.

// Element types, FULL_MASK, neg_inf, bf16 <-> f32 and ld/st: common.cuh (prepended).

// Index of the largest v[i] over i < n with flag[i] == 0, ties to the lower index; -1 if none.
// Called by all 32 lanes of a warp; every lane returns the same index (the order is total).
__device__ int warp_argmax(const float* v, const int* flag, int n) {
    const int lane = threadIdx.x & 31;
    float bv = 0.0f;
    int bi = -1;
    for (int i = lane; i < n; i += 32) {  // i increases: strict '>' keeps the lower index on ties
        if (flag[i]) continue;
        const float x = v[i];
        if (bi < 0 || x > bv) {
            bv = x;
            bi = i;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
        const int oi = __shfl_xor_sync(FULL_MASK, bi, o);
        const bool take = oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi));
        if (take) {
            bv = ov;
            bi = oi;
        }
    }
    return bi;
}

// One warp per token. Dynamic shared memory per warp: score[E], choice[E] f32, flag[E] i32,
// gscore[G] f32, gflag[G] i32, pick[top_k] f32. The caller guarantees E % G == 0, E/G >= 2,
// 1 <= topk_group <= G and top_k <= topk_group * E/G, so every pick finds an expert.
//   score  = sigmoid(logit)                  (f32, 1/(1+exp(-l)) as the CPU)
//   choice = score + bias
//   group score = top-1 + top-2 choice of the group; keep the topk_group best groups
//     (ties to the lower group)
//   picks = top_k best choices among experts of kept groups (ties to the lower expert),
//     in descending order
//   weight = score (unbiased); if norm: / (sum of picked scores + 1e-20); then * scaling
extern "C" __global__ void moe_route(const float* logits, const float* bias, int* ids, float* wts, int* counts, int T,
                                     int E, int G, int topk_group, int top_k, int norm, float scaling) {
    extern __shared__ float smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t = blockIdx.x * (blockDim.x >> 5) + warp;
    if (t >= T) return;  // a whole warp leaves together; only __syncwarp below
    float* score = smem + (i64)warp * (3 * E + 2 * G + top_k);
    float* choice = score + E;
    int* flag = (int*)(choice + E);
    float* gscore = (float*)(flag + E);
    int* gflag = (int*)(gscore + G);
    float* pick = (float*)(gflag + G);

    const float* l = logits + (i64)t * E;
    for (int e = lane; e < E; e += 32) {
        const float s = 1.0f / (1.0f + expf(-l[e]));
        score[e] = s;
        choice[e] = s + bias[e];
    }
    __syncwarp();

    const int per_group = E / G;
    for (int g = lane; g < G; g += 32) {
        float m1 = neg_inf(), m2 = neg_inf();
        for (int e = g * per_group; e < (g + 1) * per_group; ++e) {
            const float c = choice[e];
            if (c > m1) {
                m2 = m1;
                m1 = c;
            } else if (c > m2) {
                m2 = c;
            }
        }
        gscore[g] = m1 + m2;
        gflag[g] = 0;
    }
    __syncwarp();
    for (int r = 0; r < topk_group; ++r) {
        const int g = warp_argmax(gscore, gflag, G);
        if (lane == 0 && g >= 0) gflag[g] = 1;  // kept (and out of the next rounds)
        __syncwarp();
    }
    for (int e = lane; e < E; e += 32) flag[e] = gflag[e / per_group] ? 0 : 1;
    __syncwarp();

    int* id_row = ids + (i64)t * top_k;
    for (int j = 0; j < top_k; ++j) {
        const int e = warp_argmax(choice, flag, E);
        if (lane == 0) {
            id_row[j] = e;
            pick[j] = e >= 0 ? score[e] : 0.0f;
            if (e >= 0) {
                flag[e] = 1;
                atomicAdd(&counts[e], 1);
            }
        }
        __syncwarp();
    }
    if (lane == 0) {
        float z = 0.0f;
        if (norm) {
            for (int j = 0; j < top_k; ++j) z += pick[j];
            z += 1e-20f;
        }
        float* w_row = wts + (i64)t * top_k;
        for (int j = 0; j < top_k; ++j) {
            float w = pick[j];
            if (norm) w = w / z;
            w_row[j] = w * scaling;
        }
    }
}

// One block per expert e (blockDim a multiple of 32, at most 1024). Walks the N pairs in order and
// gives the pairs of expert e consecutive slots offsets[e], offsets[e]+1, ... (token order):
// slot_of[pair] = slot, token_of_slot[slot] = pair / top_k.
extern "C" __global__ void moe_slots(const int* ids, const int* offsets, int* slot_of, int* token_of_slot, int n_pairs,
                                     int top_k) {
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
    moe_combine<float>(y, slot_of, w, shared, out, top_k, hidden);
}
extern "C" __global__ void moe_combine_bf16(const bf16_t* y, const int* slot_of, const float* w, const bf16_t* shared,
                                            bf16_t* out, int top_k, i64 hidden) {
    moe_combine<bf16_t>(y, slot_of, w, shared, out, top_k, hidden);
}
