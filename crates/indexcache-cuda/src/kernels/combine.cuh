// The sparse-MLA split-k combine's arithmetic, shared by mla.cu (`mla_combine`) and moe_decode.cu
// (`mla_combine_uv`, the combine merged into the W_UV projection), so both give the same bits.
// Prepended to both by kernels.rs; no dependencies (plain CUDA built-ins).
//
// Split s of (row t, head h) left an unnormalised partial O_s [r] at ws_o[(base + s*heads)*r ..]
// and (m_s, l_s) at ws_ml[(base + s*heads)*2 ..] (base = t*splits*heads + h; l_s == 0: empty).
// out[c] = sum_s e^{m_s - M} O_s[c] / sum_s e^{m_s - M} l_s, M the largest m_s of a non-empty split.

// The split weights e^{m_s - M} into sw[0..splits) and 1 / sum_s e^{m_s - M} l_s (0 if all are
// empty). Reductions as a block of `nt` threads (a multiple of 32, <= blockDim.x) would do them:
// thread i < nt takes splits i, i + nt, ...; warp butterflies; warp partials in warp order. Called
// by every thread of the block (barriers inside); `red` is 32 floats of shared memory. Ends with a
// barrier: sw is complete.
__device__ __forceinline__ float combine_weights(const float* __restrict__ ws_ml, unsigned long long base, int heads,
                                                 int splits, float* sw, float* red, int nt) {
    const int tid = threadIdx.x, nw = nt >> 5;
    const bool in = tid < nt;
    float M = __int_as_float(0xff800000);
    for (int s = tid; in && s < splits; s += nt) {
        const unsigned long long w = base + (unsigned long long)s * heads;
        if (ws_ml[w * 2 + 1] > 0.0f) M = fmaxf(M, ws_ml[w * 2]);
    }
    for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    if (in && (tid & 31) == 0) red[tid >> 5] = M;
    __syncthreads();
    M = red[0];
    for (int i = 1; i < nw; ++i) M = fmaxf(M, red[i]);
    __syncthreads();  // everyone has read red before it is reused
    float L = 0.0f;
    for (int s = tid; in && s < splits; s += nt) {
        const unsigned long long w = base + (unsigned long long)s * heads;
        const float l = ws_ml[w * 2 + 1];
        const float e = l > 0.0f ? expf(ws_ml[w * 2] - M) : 0.0f;
        sw[s] = e;
        L += e * l;
    }
    for (int o = 16; o > 0; o >>= 1) L += __shfl_xor_sync(0xffffffffu, L, o);
    if (in && (tid & 31) == 0) red[tid >> 5] = L;
    __syncthreads();
    // The same summation order in every thread (warp partials in warp order).
    L = red[0];
    for (int i = 1; i < nw; ++i) L += red[i];
    __syncthreads();  // red free again, sw visible to all
    return L > 0.0f ? 1.0f / L : 0.0f;
}

// Column c of the combined output before the 1/L scaling: splits in order, a split of weight 0
// skipped (its value is loaded, not added), loads in groups of UNR so they are in flight together
// (the group size changes which loads overlap, not the sums).
#define COMBINE_UNR 8
template <int UNR = COMBINE_UNR>
__device__ __forceinline__ float combine_col(const float* __restrict__ ws_o, unsigned long long base, int heads, int r,
                                             int splits, const float* sw, int c, int s = 0, float acc = 0.0f) {
    for (; s + UNR <= splits; s += UNR) {
        float v[UNR];
#pragma unroll
        for (int u = 0; u < UNR; ++u) v[u] = ws_o[(base + (unsigned long long)(s + u) * heads) * r + c];
#pragma unroll
        for (int u = 0; u < UNR; ++u) {
            const float w = sw[s + u];
            if (w != 0.0f) acc = fmaf(w, v[u], acc);
        }
    }
    for (; s < splits; ++s) {
        const float w = sw[s];
        if (w != 0.0f) acc = fmaf(w, ws_o[(base + (unsigned long long)s * heads) * r + c], acc);
    }
    return acc;
}
