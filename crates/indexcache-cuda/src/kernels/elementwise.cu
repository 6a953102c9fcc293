// Elementwise, normalisation, copy, RoPE, loss and fill kernels of the CUDA backend
// (crates/indexcache-cuda/src/backend.rs).
//
// Every op has two extern "C" entry points, `<op>_f32` and `<op>_bf16`, instantiating one template
// over the storage type: `float`, or `bf16_t` (= unsigned short holding a bfloat16 bit pattern; no
// CUDA headers are included, so NVRTC alone compiles this file). Arithmetic is always f32: values
// are widened on load (exact) and rounded to nearest-even on store, bit-identical to the `half`
// crate's `bf16::from_f32`, so a bf16 result is the f32 result rounded once.
//
// The formulas are those of the CPU backend (crates/indexcache-ops/src/cpu/mod.rs); sums run in a
// fixed order for a given launch shape (warp butterflies, then warp partials in order), so results
// are deterministic run to run.
//
// Index arithmetic is 64-bit wherever a product of two dimensions can exceed 2^31.

// Element types, FULL_MASK, neg_inf, bf16 <-> f32 and ld/st: common.cuh (prepended).

// ---- reductions ---------------------------------------------------------------------------------

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

__device__ __forceinline__ i64 global_thread() { return (i64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ i64 grid_threads() { return (i64)gridDim.x * blockDim.x; }

// ---- conversion ---------------------------------------------------------------------------------

extern "C" __global__ void convert_f32_to_bf16(const float* in, bf16_t* out, i64 n) {
    for (i64 i = global_thread(); i < n; i += grid_threads()) out[i] = f32_to_bf16(in[i]);
}

extern "C" __global__ void convert_bf16_to_f32(const bf16_t* in, float* out, i64 n) {
    for (i64 i = global_thread(); i < n; i += grid_threads()) out[i] = bf16_to_f32(in[i]);
}

// ---- seeded random fill -------------------------------------------------------------------------
// indexcache_ops::random::uniform(seed, i) * bound, bit-exact: SplitMix64 in 64-bit integer math,
// 24 random bits -> an exact f32 in [0, 2), minus 1 (exact), times bound (one rounding).

__device__ __forceinline__ u64 splitmix(u64 seed, u64 i) {
    u64 z = (seed * 0x9E3779B97F4A7C15ull) ^ (i + 0xD1B54A32D192ED03ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

template <typename T>
__device__ void random_fill(T* out, i64 n, u64 seed, float bound) {
    for (i64 i = global_thread(); i < n; i += grid_threads()) {
        const float bits24 = (float)(unsigned)(splitmix(seed, (u64)i) >> 40);
        const float u = __fsub_rn(__fmul_rn(bits24, 1.0f / 8388608.0f), 1.0f);
        st(out, i, __fmul_rn(u, bound));
    }
}

extern "C" __global__ void random_fill_f32(float* out, i64 n, u64 seed, float bound) {
    random_fill<float>(out, n, seed, bound);
}
extern "C" __global__ void random_fill_bf16(bf16_t* out, i64 n, u64 seed, float bound) {
    random_fill<bf16_t>(out, n, seed, bound);
}

// ---- strided 2-D copy ---------------------------------------------------------------------------
// dst[r * dst_stride + c] = src[r * src_stride + c] for r < rows, c < cols (raw element copy).
// Serves columns / head_columns (rows = T*heads) / write_block. Blocks of 32x8 threads: x walks the
// columns (a warp reads 32 consecutive elements), y the rows; both grid-stride, so no index
// division and any grid size covers any shape.

template <typename T>
__device__ void copy2d(const T* src, T* dst, i64 rows, i64 cols, i64 src_stride, i64 dst_stride) {
    for (i64 r = (i64)blockIdx.y * blockDim.y + threadIdx.y; r < rows; r += (i64)gridDim.y * blockDim.y) {
        const T* s = src + r * src_stride;
        T* d = dst + r * dst_stride;
        for (i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += (i64)gridDim.x * blockDim.x) d[c] = s[c];
    }
}

extern "C" __global__ void copy2d_f32(const float* src, float* dst, i64 rows, i64 cols, i64 ss, i64 ds) {
    copy2d<float>(src, dst, rows, cols, ss, ds);
}
extern "C" __global__ void copy2d_bf16(const bf16_t* src, bf16_t* dst, i64 rows, i64 cols, i64 ss, i64 ds) {
    copy2d<bf16_t>(src, dst, rows, cols, ss, ds);
}

// ---- row scatter (cache writes at the step's positions) -----------------------------------------
// dst[pos[r] * dst_stride + c] = src[r * cols + c]; `dst` already offset to the first column.
// Positions come from the device, so a captured step writes where it is replayed.

template <typename T>
__device__ void scatter_rows(const T* src, const int* pos, T* dst, i64 rows, i64 cols, i64 dst_stride) {
    for (i64 r = (i64)blockIdx.y * blockDim.y + threadIdx.y; r < rows; r += (i64)gridDim.y * blockDim.y) {
        const T* s = src + r * cols;
        T* d = dst + (i64)pos[r] * dst_stride;
        for (i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += (i64)gridDim.x * blockDim.x) d[c] = s[c];
    }
}

extern "C" __global__ void scatter_rows_f32(const float* src, const int* pos, float* dst, i64 rows, i64 cols, i64 ds) {
    scatter_rows<float>(src, pos, dst, rows, cols, ds);
}
extern "C" __global__ void scatter_rows_bf16(const bf16_t* src, const int* pos, bf16_t* dst, i64 rows, i64 cols,
                                             i64 ds) {
    scatter_rows<bf16_t>(src, pos, dst, rows, cols, ds);
}

// ---- row gather (embedding; MoE token gather) ---------------------------------------------------
// One block per output row: out[r] = table[ids[r]]. Ids are validated by the caller.

template <typename T>
__device__ void gather_rows(const T* table, const unsigned* ids, T* out, i64 cols) {
    const i64 r = blockIdx.x;
    const T* src = table + (i64)ids[r] * cols;
    T* dst = out + r * cols;
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
}

extern "C" __global__ void gather_rows_f32(const float* table, const unsigned* ids, float* out, i64 cols) {
    gather_rows<float>(table, ids, out, cols);
}
extern "C" __global__ void gather_rows_bf16(const bf16_t* table, const unsigned* ids, bf16_t* out, i64 cols) {
    gather_rows<bf16_t>(table, ids, out, cols);
}

// ---- add / scale --------------------------------------------------------------------------------

template <typename T>
__device__ void add_inplace(T* x, const T* y, i64 n) {
    for (i64 i = global_thread(); i < n; i += grid_threads()) st(x, i, ld(x, i) + ld(y, i));
}
extern "C" __global__ void add_f32(float* x, const float* y, i64 n) { add_inplace<float>(x, y, n); }
extern "C" __global__ void add_bf16(bf16_t* x, const bf16_t* y, i64 n) { add_inplace<bf16_t>(x, y, n); }

template <typename T>
__device__ void scale_inplace(T* x, float s, i64 n) {
    for (i64 i = global_thread(); i < n; i += grid_threads()) st(x, i, ld(x, i) * s);
}
extern "C" __global__ void scale_f32(float* x, float s, i64 n) { scale_inplace<float>(x, s, n); }
extern "C" __global__ void scale_bf16(bf16_t* x, float s, i64 n) { scale_inplace<bf16_t>(x, s, n); }

// ---- SwiGLU -------------------------------------------------------------------------------------
// out[r, c] = silu(g[r*gs + c]) * u[r*us + c], silu(x) = x / (1 + exp(-x)), out row stride = cols.
// Dense MLP: g, u separate [T, I] (gs = us = I). MoE: one [N, 2I] buffer, u = g + I, gs = us = 2I.

template <typename T>
__device__ void silu_mul(const T* g, i64 gs, const T* u, i64 us, T* out, i64 rows, i64 cols) {
    // 32x8 blocks, grid-stride over rows (y) and columns (x), as copy2d.
    for (i64 r = (i64)blockIdx.y * blockDim.y + threadIdx.y; r < rows; r += (i64)gridDim.y * blockDim.y) {
        for (i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += (i64)gridDim.x * blockDim.x) {
            const float a = ld(g, r * gs + c), b = ld(u, r * us + c);
            st(out, r * cols + c, (a / (1.0f + expf(-a))) * b);
        }
    }
}
extern "C" __global__ void silu_mul_f32(const float* g, i64 gs, const float* u, i64 us, float* out, i64 rows,
                                        i64 cols) {
    silu_mul<float>(g, gs, u, us, out, rows, cols);
}
extern "C" __global__ void silu_mul_bf16(const bf16_t* g, i64 gs, const bf16_t* u, i64 us, bf16_t* out, i64 rows,
                                         i64 cols) {
    silu_mul<bf16_t>(g, gs, u, us, out, rows, cols);
}

// ---- RMSNorm / LayerNorm (one block per row) ----------------------------------------------------
// rms:   inv = 1 / sqrt(sum(x^2)/n + eps);           out = w * (x * inv)
// layer: mean = sum(x)/n; var = sum((x-mean)^2)/n;    out = (x - mean) * inv * w + b   (two passes)

template <typename T>
__device__ void rms_norm(const T* x, const float* w, T* out, i64 cols, float eps) {
    __shared__ float red[33];
    const i64 row = blockIdx.x;
    const T* xr = x + row * cols;
    T* o = out + row * cols;
    float ss = 0.0f;
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = ld(xr, c);
        ss += v * v;
    }
    ss = block_sum(ss, red);
    const float inv = 1.0f / sqrtf(ss / (float)cols + eps);
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) st(o, c, w[c] * (ld(xr, c) * inv));
}
extern "C" __global__ void rms_norm_f32(const float* x, const float* w, float* out, i64 cols, float eps) {
    rms_norm<float>(x, w, out, cols, eps);
}
extern "C" __global__ void rms_norm_bf16(const bf16_t* x, const float* w, bf16_t* out, i64 cols, float eps) {
    rms_norm<bf16_t>(x, w, out, cols, eps);
}

template <typename T>
__device__ void layer_norm(const T* x, const float* w, const float* b, T* out, i64 cols, float eps) {
    __shared__ float red[33];
    const i64 row = blockIdx.x;
    const T* xr = x + row * cols;
    T* o = out + row * cols;
    float s = 0.0f;
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) s += ld(xr, c);
    const float mean = block_sum(s, red) / (float)cols;
    float sq = 0.0f;
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
        const float d = ld(xr, c) - mean;
        sq += d * d;
    }
    const float var = block_sum(sq, red) / (float)cols;
    const float inv = 1.0f / sqrtf(var + eps);
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) st(o, c, (ld(xr, c) - mean) * inv * w[c] + b[c]);
}
extern "C" __global__ void layer_norm_f32(const float* x, const float* w, const float* b, float* out, i64 cols,
                                          float eps) {
    layer_norm<float>(x, w, b, out, cols, eps);
}
extern "C" __global__ void layer_norm_bf16(const bf16_t* x, const float* w, const float* b, bf16_t* out, i64 cols,
                                           float eps) {
    layer_norm<bf16_t>(x, w, b, out, cols, eps);
}

// ---- RoPE (one block per row, in place) ---------------------------------------------------------
// Row r is at position pos[r] (< table rows, checked by the caller); table cos/sin are
// [positions, half] f32. Pairs: layout 0 = interleaved (2i, 2i+1), layout 1 = half-split (i, i+half),
// within the first 2*half dims of each head_dim-wide head. One thread per pair: no aliasing.
// Products are rounded separately (no FMA contraction), exactly as RopeTable::rotate computes.

template <typename T>
__device__ void rope(T* x, const int* pos, const float* cos_t, const float* sin_t, i64 cols, int head_dim, int half,
                     int layout) {
    const i64 row = blockIdx.x;
    const i64 p = pos[row];
    const float* cs = cos_t + p * half;
    const float* sn = sin_t + p * half;
    const int heads = (int)(cols / head_dim);
    T* xr = x + row * cols;
    for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
        const int h = i / half, j = i - h * half;
        const i64 ia = (i64)h * head_dim + (layout == 0 ? 2 * j : j);
        const i64 ib = ia + (layout == 0 ? 1 : half);
        const float a = ld(xr, ia), b = ld(xr, ib), c = cs[j], s = sn[j];
        st(xr, ia, __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)));
        st(xr, ib, __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s)));
    }
}
extern "C" __global__ void rope_f32(float* x, const int* pos, const float* cos_t, const float* sin_t, i64 cols,
                                    int head_dim, int half, int layout) {
    rope<float>(x, pos, cos_t, sin_t, cols, head_dim, half, layout);
}
extern "C" __global__ void rope_bf16(bf16_t* x, const int* pos, const float* cos_t, const float* sin_t, i64 cols,
                                     int head_dim, int half, int layout) {
    rope<bf16_t>(x, pos, cos_t, sin_t, cols, head_dim, half, layout);
}

// ---- fused steps (one block of 256 threads per row) ---------------------------------------------
// Bit-identical to the plain kernels they replace: the same per-thread column strides, the same
// block reductions, values read back as stored (bf16-rounded) where the plain path stores them.

// x += y; out = rms_norm(x) (add_f32/bf16 then rms_norm_f32/bf16).
template <typename T>
__device__ void add_rms_norm(T* x, const T* y, const float* w, T* out, i64 cols, float eps) {
    __shared__ float red[33];
    const i64 row = blockIdx.x;
    T* xr = x + row * cols;
    const T* yr = y + row * cols;
    T* o = out + row * cols;
    float ss = 0.0f;
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
        st(xr, c, ld(xr, c) + ld(yr, c));
        const float v = ld(xr, c);  // the sum as stored
        ss += v * v;
    }
    ss = block_sum(ss, red);
    const float inv = 1.0f / sqrtf(ss / (float)cols + eps);
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) st(o, c, w[c] * (ld(xr, c) * inv));
}
extern "C" __global__ void add_rms_norm_f32(float* x, const float* y, const float* w, float* out, i64 cols,
                                            float eps) {
    add_rms_norm<float>(x, y, w, out, cols, eps);
}
extern "C" __global__ void add_rms_norm_bf16(bf16_t* x, const bf16_t* y, const float* w, bf16_t* out, i64 cols,
                                             float eps) {
    add_rms_norm<bf16_t>(x, y, w, out, cols, eps);
}

// The RoPE pair rotation of `rope` (separately rounded products, no FMA contraction).
__device__ __forceinline__ void rotate_pair(float a, float b, float c, float s, float& ra, float& rb) {
    ra = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    rb = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

// x [rows, heads*(keep+rot)] -> a [rows, heads*keep] (copy), b [rows, heads*rot] (RoPE over all rot
// dims at pos[row]; rot = 2*half). head_columns x2 then rope.
template <typename T>
__device__ void split_heads_rope(const T* x, T* a, T* b, const int* pos, const float* cos_t, const float* sin_t,
                                 int heads, int keep, int half, int layout) {
    const i64 row = blockIdx.x;
    const int rot = 2 * half, hd = keep + rot;
    const T* xr = x + row * (i64)heads * hd;
    T* ar = a + row * (i64)heads * keep;
    T* br = b + row * (i64)heads * rot;
    for (int i = threadIdx.x; i < heads * keep; i += blockDim.x) {
        const int h = i / keep, j = i - h * keep;
        ar[i] = xr[h * hd + j];
    }
    const i64 p = pos[row];
    const float* cs = cos_t + p * half;
    const float* sn = sin_t + p * half;
    for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
        const int h = i / half, j = i - h * half;
        const int ia = layout == 0 ? 2 * j : j, ib = ia + (layout == 0 ? 1 : half);
        float ra, rb;
        rotate_pair(ld(xr, h * hd + keep + ia), ld(xr, h * hd + keep + ib), cs[j], sn[j], ra, rb);
        st(br, h * rot + ia, ra);
        st(br, h * rot + ib, rb);
    }
}
extern "C" __global__ void split_heads_rope_f32(const float* x, float* a, float* b, const int* pos,
                                                const float* cos_t, const float* sin_t, int heads, int keep,
                                                int half, int layout) {
    split_heads_rope<float>(x, a, b, pos, cos_t, sin_t, heads, keep, half, layout);
}
extern "C" __global__ void split_heads_rope_bf16(const bf16_t* x, bf16_t* a, bf16_t* b, const int* pos,
                                                 const float* cos_t, const float* sin_t, int heads, int keep,
                                                 int half, int layout) {
    split_heads_rope<bf16_t>(x, a, b, pos, cos_t, sin_t, heads, keep, half, layout);
}

// kv [rows, r + 2*half] -> cache[pos[row], :r] = rms_norm(kv[row, :r]) * w,
// cache[pos[row], r:] = rope(kv[row, r:]). columns, rms_norm, columns, rope, write_rows x2.
template <typename T>
__device__ void latent_store(const T* kv, const float* w, T* cache, const int* pos, const float* cos_t,
                             const float* sin_t, int r, int half, int layout, float eps) {
    __shared__ float red[33];
    const i64 row = blockIdx.x;
    const int width = r + 2 * half;
    const T* xr = kv + row * width;
    const i64 p = pos[row];
    T* dst = cache + p * width;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < r; c += blockDim.x) {
        const float v = ld(xr, c);
        ss += v * v;
    }
    ss = block_sum(ss, red);
    const float inv = 1.0f / sqrtf(ss / (float)r + eps);
    for (int c = threadIdx.x; c < r; c += blockDim.x) st(dst, c, w[c] * (ld(xr, c) * inv));
    const float* cs = cos_t + p * half;
    const float* sn = sin_t + p * half;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        const int ia = layout == 0 ? 2 * j : j, ib = ia + (layout == 0 ? 1 : half);
        float ra, rb;
        rotate_pair(ld(xr, r + ia), ld(xr, r + ib), cs[j], sn[j], ra, rb);
        st(dst, r + ia, ra);
        st(dst, r + ib, rb);
    }
}
extern "C" __global__ void latent_store_f32(const float* kv, const float* w, float* cache, const int* pos,
                                            const float* cos_t, const float* sin_t, int r, int half, int layout,
                                            float eps) {
    latent_store<float>(kv, w, cache, pos, cos_t, sin_t, r, half, layout, eps);
}
extern "C" __global__ void latent_store_bf16(const bf16_t* kv, const float* w, bf16_t* cache, const int* pos,
                                             const float* cos_t, const float* sin_t, int r, int half, int layout,
                                             float eps) {
    latent_store<bf16_t>(kv, w, cache, pos, cos_t, sin_t, r, half, layout, eps);
}

// ---- NLL (one block per row) --------------------------------------------------------------------
// out[r] = (max - logit[target]) + log(sum(exp(logit - max))), f32, two passes over the row.
// Targets are validated (< vocab) by the caller.

template <typename T>
__device__ void nll(const T* logits, const unsigned* targets, float* out, i64 vocab) {
    __shared__ float red[33];
    const i64 row = blockIdx.x;
    const T* l = logits + row * vocab;
    float m = neg_inf();
    for (i64 c = threadIdx.x; c < vocab; c += blockDim.x) m = fmaxf(m, ld(l, c));
    m = block_max(m, red);
    float z = 0.0f;
    for (i64 c = threadIdx.x; c < vocab; c += blockDim.x) z += expf(ld(l, c) - m);
    z = block_sum(z, red);
    if (threadIdx.x == 0) out[row] = (m - ld(l, (i64)targets[row])) + logf(z);
}
extern "C" __global__ void nll_f32(const float* logits, const unsigned* targets, float* out, i64 vocab) {
    nll<float>(logits, targets, out, vocab);
}
extern "C" __global__ void nll_bf16(const bf16_t* logits, const unsigned* targets, float* out, i64 vocab) {
    nll<bf16_t>(logits, targets, out, vocab);
}
