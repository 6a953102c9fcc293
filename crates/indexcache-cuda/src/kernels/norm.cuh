// Shared by elementwise.cu and moe_decode.cu (prepended after common.cuh by kernels.rs): warp and
// block reductions and the row RMSNorm `norm_row`, so a kernel of either module that normalises a
// row (rms_norm, add_rms_norm, latent_store, mla_norms, add_norm_router_route) gets the same bits.

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
// `red` is a 33-float shared scratch; the trailing barrier lets the caller reuse it at once.
__device__ float block_sum(float v, float* red) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    if (lane == 0) red[w] = v;
    __syncthreads();
    if (w == 0) {
        float t = lane < nw ? red[lane] : 0.0f;
        t = warp_sum(t);
        if (lane == 0) red[32] = t;
    }
    __syncthreads();
    const float r = red[32];
    __syncthreads();
    return r;
}

__device__ float block_max(float v, float* red) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    if (lane == 0) red[w] = v;
    __syncthreads();
    if (w == 0) {
        float t = lane < nw ? red[lane] : neg_inf();
        t = warp_max(t);
        if (lane == 0) red[32] = t;
    }
    __syncthreads();
    const float r = red[32];
    __syncthreads();
    return r;
}

// Row RMSNorm, shared by rms_norm, add_rms_norm and latent_store so the fused kernels stay
// bit-identical to the plain ones. The sum of squares runs in one fixed order: thread t adds
// columns t, t + blockDim, ... in turn, then `block_sum`. Rows of up to NORM_SMEM columns are
// moved in 16-byte vectors (8-column chunks, chunk k by thread k mod blockDim) through a shared
// f32 copy of the row, which the strided sum then reads; the norm weights are loaded before the
// reduction. Longer rows read x element by element, in the same order.
// ADD: x += y first (rounded to T; stored unless `store_x` is false: the CTAs of a kernel that all
// need the norm, where one of them stores the sum after every CTA has read x) and the norm is of
// the sum as stored. `o` may be a shared-memory
// row (generic stores).

#define NORM_SMEM 8192   // columns staged in shared memory (32 KB)
#define NORM_CHUNKS 4    // 8-column chunks a thread keeps the weights of in registers

__device__ __forceinline__ bool aligned16(const void* p) { return ((u64)p & 15) == 0; }

// v as stored in T (rounded once for bf16).
__device__ __forceinline__ float as_stored(float v, const float*) { return v; }
__device__ __forceinline__ float as_stored(float v, const bf16_t*) { return bf16_to_f32(f32_to_bf16(v)); }

// Elements c0..c0+7 of a row of `cols` as f32 (zero past the end).
template <typename T>
__device__ __forceinline__ void load8(const T* p, i64 c0, i64 cols, float* v) {
    if (c0 + 8 <= cols && aligned16(p + c0)) {
        constexpr int N = VecT<T>::N;
#pragma unroll
        for (int i = 0; i < 8 / N; ++i) VecT<T>::unpack(*(const uint4*)(p + c0 + i * N), v + i * N);
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = c0 + e < cols ? ld(p, c0 + e) : 0.0f;
    }
}

__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    return (unsigned)f32_to_bf16(lo) | ((unsigned)f32_to_bf16(hi) << 16);
}

// Store v[0..8) (rounded to T) at columns c0.. of a row of `cols` (nothing past the end).
__device__ __forceinline__ void store8(bf16_t* p, i64 c0, i64 cols, const float* v) {
    if (c0 + 8 <= cols && aligned16(p + c0)) {
        *(uint4*)(p + c0) = make_uint4(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]), pack_bf16x2(v[4], v[5]),
                                       pack_bf16x2(v[6], v[7]));
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e)
            if (c0 + e < cols) st(p, c0 + e, v[e]);
    }
}
__device__ __forceinline__ void store8(float* p, i64 c0, i64 cols, const float* v) {
    if (c0 + 8 <= cols && aligned16(p + c0)) {
        *(float4*)(p + c0) = make_float4(v[0], v[1], v[2], v[3]);
        *(float4*)(p + c0 + 4) = make_float4(v[4], v[5], v[6], v[7]);
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e)
            if (c0 + e < cols) p[c0 + e] = v[e];
    }
}

// Chunk k of the row into the shared copy xs (f32), after x += y (stored) when ADD.
template <typename T, bool ADD>
__device__ __forceinline__ void stage_chunk(T* x, const T* y, int k, i64 cols, float* xs, bool store_x) {
    float v[8];
    load8(x, 8 * (i64)k, cols, v);
    if (ADD) {
        float yv[8];
        load8(y, 8 * (i64)k, cols, yv);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = as_stored(v[e] + yv[e], x);
        if (store_x) store8(x, 8 * (i64)k, cols, v);
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) xs[8 * k + e] = v[e];
}

template <typename T, bool ADD>
__device__ void norm_row(T* x, const T* y, const float* w, T* o, i64 cols, float eps, float* red,
                         bool store_x = true) {
    __shared__ float xs[NORM_SMEM];
    const i64 stride = blockDim.x;
    if (cols > NORM_SMEM) {  // long rows: element by element, the same order
        float ss = 0.0f;
        for (i64 c = threadIdx.x; c < cols; c += stride) {
            float v = ld(x, c);
            if (ADD) {
                v = as_stored(v + ld(y, c), x);
                if (store_x) st(x, c, v);
            }
            ss += v * v;
        }
        ss = block_sum(ss, red);
        const float inv = 1.0f / sqrtf(ss / (float)cols + eps);
        // Without store_x the sum is recomputed as stored (x and y are not written in this kernel).
        for (i64 c = threadIdx.x; c < cols; c += stride) {
            const float v = ADD && !store_x ? as_stored(ld(x, c) + ld(y, c), x) : ld(x, c);
            st(o, c, w[c] * (v * inv));
        }
        return;
    }
    const int chunks = (int)((cols + 7) >> 3);
    float wv[NORM_CHUNKS][8];
#pragma unroll
    for (int i = 0; i < NORM_CHUNKS; ++i) {
        const int k = threadIdx.x + i * (int)stride;
        if (k < chunks) {
            load8(w, 8 * (i64)k, cols, wv[i]);
            stage_chunk<T, ADD>(x, y, k, cols, xs, store_x);
        }
    }
    for (int k = threadIdx.x + NORM_CHUNKS * (int)stride; k < chunks; k += (int)stride)
        stage_chunk<T, ADD>(x, y, k, cols, xs, store_x);
    __syncthreads();
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += (int)stride) ss += xs[c] * xs[c];
    ss = block_sum(ss, red);
    const float inv = 1.0f / sqrtf(ss / (float)cols + eps);
#pragma unroll
    for (int i = 0; i < NORM_CHUNKS; ++i) {
        const int k = threadIdx.x + i * (int)stride;
        if (k < chunks) {
            float r[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) r[e] = wv[i][e] * (xs[8 * k + e] * inv);
            store8(o, 8 * (i64)k, cols, r);
        }
    }
    for (int k = threadIdx.x + NORM_CHUNKS * (int)stride; k < chunks; k += (int)stride) {
        float wk[8], r[8];
        load8(w, 8 * (i64)k, cols, wk);
#pragma unroll
        for (int e = 0; e < 8; ++e) r[e] = wk[e] * (xs[8 * k + e] * inv);
        store8(o, 8 * (i64)k, cols, r);
    }
}

