// MoE routing of one token by one warp, shared by moe.cu (`moe_route`) and moe_decode.cu
// (`router_route`, the router GEMV with the routing in its last CTA). Prepended after common.cuh.

// Load bypassing L1 (values another CTA of the same launch may have written).
__device__ __forceinline__ float ld_cg(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];\n" : "=f"(v) : "l"(p));
    return v;
}

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

// Routes token t with one warp (all 32 lanes call it): lane l holds experts l, l + 32, ... (at
// most ROUTE_PER_LANE each, so E <= 32 * ROUTE_PER_LANE, checked by the caller) in registers.
// `smem`, the warp's scratch: choice[E] f32 (group scores only), gscore[G] f32, gflag[G] i32,
// pick[top_k] f32 (callers size it 3E + 2G + top_k floats). The caller guarantees E % G == 0, E/G >= 2,
// 1 <= topk_group <= G and top_k <= topk_group * E/G, so every pick finds an expert.
//   score  = sigmoid(logit)                  (f32, 1/(1+exp(-l)) as the CPU)
//   choice = score + bias
//   group score = top-1 + top-2 choice of the group; keep the topk_group best groups
//     (ties to the lower group); with topk_group == G every group is kept (no selection)
//   picks = top_k best choices among experts of kept groups (ties to the lower expert),
//     in descending order
//   weight = score (unbiased); if norm: / (sum of picked scores + 1e-20); then * scaling
// counts[e] += picks of e (atomics) when `counts` is not null (the grouped-GEMM path needs them).
#define ROUTE_PER_LANE 8  // backend.rs ROUTE_MAX_EXPERTS = 32 * this
// The lane's biases (experts lane, lane + 32, ...), loadable before the logits exist.
__device__ __forceinline__ void route_bias(const float* bias, int E, float (&b)[ROUTE_PER_LANE]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < ROUTE_PER_LANE; ++i) b[i] = lane + 32 * i < E ? bias[lane + 32 * i] : 0.0f;
}

__device__ void route_token(const float* logits, const float (&bias)[ROUTE_PER_LANE], int* ids, float* wts,
                            int* counts, int t, int E,
                            int G, int topk_group, int top_k, int norm, float scaling, float* smem) {
    const int lane = threadIdx.x & 31;
    float* choice_s = smem;
    float* gscore = choice_s + E;
    int* gflag = (int*)(gscore + G);
    float* pick = (float*)(gflag + G);

    const float* l = logits + (i64)t * E;
    float sc[ROUTE_PER_LANE], ch[ROUTE_PER_LANE];
    bool live[ROUTE_PER_LANE];
#pragma unroll
    for (int i = 0; i < ROUTE_PER_LANE; ++i) {
        const int e = lane + 32 * i;
        live[i] = e < E;
        sc[i] = 0.0f;
        ch[i] = 0.0f;
        if (live[i]) {
            sc[i] = 1.0f / (1.0f + expf(-ld_cg(l + e)));
            ch[i] = sc[i] + bias[i];
        }
    }

    const int per_group = E / G;
    if (topk_group < G) {
#pragma unroll
        for (int i = 0; i < ROUTE_PER_LANE; ++i)
            if (live[i]) choice_s[lane + 32 * i] = ch[i];
        __syncwarp();
        for (int g = lane; g < G; g += 32) {
            float m1 = neg_inf(), m2 = neg_inf();
            for (int e = g * per_group; e < (g + 1) * per_group; ++e) {
                const float c = choice_s[e];
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
#pragma unroll
        for (int i = 0; i < ROUTE_PER_LANE; ++i)
            if (live[i]) live[i] = gflag[(lane + 32 * i) / per_group] != 0;
    }

    int* id_row = ids + (i64)t * top_k;
    for (int j = 0; j < top_k; ++j) {
        // The largest live choice, ties to the lower expert (lanes scan their experts upwards).
        float bv = 0.0f;
        int bi = -1;
#pragma unroll
        for (int i = 0; i < ROUTE_PER_LANE; ++i) {
            if (live[i] && (bi < 0 || ch[i] > bv)) {
                bv = ch[i];
                bi = lane + 32 * i;
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
            const int oi = __shfl_xor_sync(FULL_MASK, bi, o);
            if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) {
                bv = ov;
                bi = oi;
            }
        }
        float mine = 0.0f;  // the winner's score, from the lane that holds it
#pragma unroll
        for (int i = 0; i < ROUTE_PER_LANE; ++i) {
            if (lane + 32 * i == bi) {
                mine = sc[i];
                live[i] = false;
            }
        }
        const float s = __shfl_sync(FULL_MASK, mine, bi >= 0 ? bi & 31 : 0);
        if (lane == 0) {
            id_row[j] = bi;
            pick[j] = bi >= 0 ? s : 0.0f;
            if (bi >= 0 && counts) atomicAdd(&counts[bi], 1);
        }
    }
    __syncwarp();
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

