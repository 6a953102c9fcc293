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

// Reductions (warp_sum, block_sum, ...) and the row RMSNorm `norm_row`: norm.cuh (prepended).

__device__ __forceinline__ i64 global_thread() { return (i64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ i64 grid_threads() { return (i64)gridDim.x * blockDim.x; }

// ---- conversion ---------------------------------------------------------------------------------

extern "C" __global__ void convert_f32_to_bf16(const float* in, bf16_t* out, i64 n) {
    PDL_ENTRY();
    for (i64 i = global_thread(); i < n; i += grid_threads()) out[i] = f32_to_bf16(in[i]);
}

extern "C" __global__ void convert_bf16_to_f32(const bf16_t* in, float* out, i64 n) {
    PDL_ENTRY();
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
    PDL_ENTRY();
    random_fill<float>(out, n, seed, bound);
}
extern "C" __global__ void random_fill_bf16(bf16_t* out, i64 n, u64 seed, float bound) {
    PDL_ENTRY();
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
    PDL_ENTRY();
    copy2d<float>(src, dst, rows, cols, ss, ds);
}
extern "C" __global__ void copy2d_bf16(const bf16_t* src, bf16_t* dst, i64 rows, i64 cols, i64 ss, i64 ds) {
    PDL_ENTRY();
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
    PDL_ENTRY();
    scatter_rows<float>(src, pos, dst, rows, cols, ds);
}
extern "C" __global__ void scatter_rows_bf16(const bf16_t* src, const int* pos, bf16_t* dst, i64 rows, i64 cols,
                                             i64 ds) {
    PDL_ENTRY();
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
    PDL_ENTRY();
    gather_rows<float>(table, ids, out, cols);
}
extern "C" __global__ void gather_rows_bf16(const bf16_t* table, const unsigned* ids, bf16_t* out, i64 cols) {
    PDL_ENTRY();
    gather_rows<bf16_t>(table, ids, out, cols);
}

// ---- add / scale --------------------------------------------------------------------------------

template <typename T>
__device__ void add_inplace(T* x, const T* y, i64 n) {
    for (i64 i = global_thread(); i < n; i += grid_threads()) st(x, i, ld(x, i) + ld(y, i));
}
extern "C" __global__ void add_f32(float* x, const float* y, i64 n) {
    PDL_ENTRY(); add_inplace<float>(x, y, n); }
extern "C" __global__ void add_bf16(bf16_t* x, const bf16_t* y, i64 n) {
    PDL_ENTRY(); add_inplace<bf16_t>(x, y, n); }

template <typename T>
__device__ void scale_inplace(T* x, float s, i64 n) {
    for (i64 i = global_thread(); i < n; i += grid_threads()) st(x, i, ld(x, i) * s);
}
extern "C" __global__ void scale_f32(float* x, float s, i64 n) {
    PDL_ENTRY(); scale_inplace<float>(x, s, n); }
extern "C" __global__ void scale_bf16(bf16_t* x, float s, i64 n) {
    PDL_ENTRY(); scale_inplace<bf16_t>(x, s, n); }

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
    PDL_ENTRY();
    silu_mul<float>(g, gs, u, us, out, rows, cols);
}
extern "C" __global__ void silu_mul_bf16(const bf16_t* g, i64 gs, const bf16_t* u, i64 us, bf16_t* out, i64 rows,
                                         i64 cols) {
    PDL_ENTRY();
    silu_mul<bf16_t>(g, gs, u, us, out, rows, cols);
}

// ---- RMSNorm / LayerNorm (one block per row) ----------------------------------------------------
// rms:   inv = 1 / sqrt(sum(x^2)/n + eps);           out = w * (x * inv)
// layer: mean = sum(x)/n; var = sum((x-mean)^2)/n;    out = (x - mean) * inv * w + b   (two passes)

template <typename T>
__device__ void rms_norm(const T* x, const float* w, T* out, i64 cols, float eps) {
    __shared__ float red[33];
    const i64 row = blockIdx.x;
    norm_row<T, false>(const_cast<T*>(x + row * cols), (const T*)nullptr, w, out + row * cols, cols, eps, red);
}
extern "C" __global__ void rms_norm_f32(const float* x, const float* w, float* out, i64 cols, float eps) {
    PDL_ENTRY();
    rms_norm<float>(x, w, out, cols, eps);
}
extern "C" __global__ void rms_norm_bf16(const bf16_t* x, const float* w, bf16_t* out, i64 cols, float eps) {
    PDL_ENTRY();
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
    PDL_ENTRY();
    layer_norm<float>(x, w, b, out, cols, eps);
}
extern "C" __global__ void layer_norm_bf16(const bf16_t* x, const float* w, const float* b, bf16_t* out, i64 cols,
                                           float eps) {
    PDL_ENTRY();
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
    PDL_ENTRY();
    rope<float>(x, pos, cos_t, sin_t, cols, head_dim, half, layout);
}
extern "C" __global__ void rope_bf16(bf16_t* x, const int* pos, const float* cos_t, const float* sin_t, i64 cols,
                                     int head_dim, int half, int layout) {
    PDL_ENTRY();
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
    norm_row<T, true>(x + row * cols, y + row * cols, w, out + row * cols, cols, eps, red);
}
extern "C" __global__ void add_rms_norm_f32(float* x, const float* y, const float* w, float* out, i64 cols,
                                            float eps) {
    PDL_ENTRY();
    add_rms_norm<float>(x, y, w, out, cols, eps);
}
extern "C" __global__ void add_rms_norm_bf16(bf16_t* x, const bf16_t* y, const float* w, bf16_t* out, i64 cols,
                                             float eps) {
    PDL_ENTRY();
    add_rms_norm<bf16_t>(x, y, w, out, cols, eps);
}

// The RoPE pair rotation of `rope` (separately rounded products, no FMA contraction).
__device__ __forceinline__ void rotate_pair(float a, float b, float c, float s, float& ra, float& rb) {
    ra = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    rb = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

// x [rows, heads*(keep+rot)] -> a [rows, heads*keep] (copy), b [rows, heads*rot] (RoPE over all rot
// dims at pos[row]; rot = 2*half). head_columns x2 then rope. Block (x: SPLIT_THREADS, y: SPLIT_HEADS)
// per (row = blockIdx.x, SPLIT_HEADS heads from blockIdx.y * SPLIT_HEADS): a decode row spreads
// over several SMs; the copy moves 16-byte vectors where both sides allow it.
#define SPLIT_THREADS 64  // backend.rs SPLIT_THREADS
#define SPLIT_HEADS 4     // backend.rs SPLIT_HEADS
template <typename T>
__device__ void split_heads_rope(const T* x, T* a, T* b, const int* pos, const float* cos_t, const float* sin_t,
                                 int heads, int keep, int half, int layout) {
    const i64 row = blockIdx.x;
    const int h = blockIdx.y * blockDim.y + threadIdx.y;
    if (h >= heads) return;
    const int rot = 2 * half, hd = keep + rot;
    const T* xh = x + (row * heads + h) * (i64)hd;
    T* ah = a + (row * heads + h) * (i64)keep;
    T* bh = b + (row * heads + h) * (i64)rot;
    constexpr int N = 16 / sizeof(T);
    if (keep % N == 0 && aligned16(xh) && aligned16(ah)) {
        for (int i = threadIdx.x; i < keep / N; i += blockDim.x) ((uint4*)ah)[i] = ((const uint4*)xh)[i];
    } else {
        for (int i = threadIdx.x; i < keep; i += blockDim.x) ah[i] = xh[i];
    }
    const i64 p = pos[row];
    const float* cs = cos_t + p * half;
    const float* sn = sin_t + p * half;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        const int ia = layout == 0 ? 2 * j : j, ib = ia + (layout == 0 ? 1 : half);
        float ra, rb;
        rotate_pair(ld(xh, keep + ia), ld(xh, keep + ib), cs[j], sn[j], ra, rb);
        st(bh, ia, ra);
        st(bh, ib, rb);
    }
}
extern "C" __global__ void split_heads_rope_f32(const float* x, float* a, float* b, const int* pos,
                                                const float* cos_t, const float* sin_t, int heads, int keep,
                                                int half, int layout) {
    PDL_ENTRY();
    split_heads_rope<float>(x, a, b, pos, cos_t, sin_t, heads, keep, half, layout);
}
extern "C" __global__ void split_heads_rope_bf16(const bf16_t* x, bf16_t* a, bf16_t* b, const int* pos,
                                                 const float* cos_t, const float* sin_t, int heads, int keep,
                                                 int half, int layout) {
    PDL_ENTRY();
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
    norm_row<T, false>(const_cast<T*>(xr), (const T*)nullptr, w, dst, r, eps, red);
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
    PDL_ENTRY();
    latent_store<float>(kv, w, cache, pos, cos_t, sin_t, r, half, layout, eps);
}
extern "C" __global__ void latent_store_bf16(const bf16_t* kv, const float* w, bf16_t* cache, const int* pos,
                                             const float* cos_t, const float* sin_t, int r, int half, int layout,
                                             float eps) {
    PDL_ENTRY();
    latent_store<bf16_t>(kv, w, cache, pos, cos_t, sin_t, r, half, layout, eps);
}

// The MLA's two latent norms of a step in one launch (backend.rs `mla_norms`): grid (rows, 2),
// blocks y = 0 compute qr = rms_norm(q_a) (as rms_norm), blocks y = 1 store the latent rows (as
// latent_store); the same block size as those kernels, so the same bits.
template <typename T>
__device__ void mla_norms(const T* q_a, const float* qw, T* qr, i64 q_cols, const T* kv, const float* kvw, T* cache,
                          const int* pos, const float* cos_t, const float* sin_t, int r, int half, int layout,
                          float eps) {
    if (blockIdx.y == 0)
        rms_norm<T>(q_a, qw, qr, q_cols, eps);
    else
        latent_store<T>(kv, kvw, cache, pos, cos_t, sin_t, r, half, layout, eps);
}
extern "C" __global__ void mla_norms_f32(const float* q_a, const float* qw, float* qr, i64 q_cols, const float* kv,
                                         const float* kvw, float* cache, const int* pos, const float* cos_t,
                                         const float* sin_t, int r, int half, int layout, float eps) {
    PDL_ENTRY();
    mla_norms<float>(q_a, qw, qr, q_cols, kv, kvw, cache, pos, cos_t, sin_t, r, half, layout, eps);
}
extern "C" __global__ void mla_norms_bf16(const bf16_t* q_a, const float* qw, bf16_t* qr, i64 q_cols,
                                          const bf16_t* kv, const float* kvw, bf16_t* cache, const int* pos,
                                          const float* cos_t, const float* sin_t, int r, int half, int layout,
                                          float eps) {
    PDL_ENTRY();
    mla_norms<bf16_t>(q_a, qw, qr, q_cols, kv, kvw, cache, pos, cos_t, sin_t, r, half, layout, eps);
}

// ---- greedy argmax (one block per row) ----------------------------------------------------------
// out[r] = indexcache_ops::argmax(x[r, :]): the first index of the row's maximum over its non-NaN
// values (ties -> lower index), or 0 when x[r, 0] is NaN (the scan that argmax defines starts
// there and no value is > NaN). Thread t keeps the first maximum of columns t, t + blockDim, ...;
// the (value, index) pairs then reduce with "larger value, else lower index".

__device__ __forceinline__ bool argmax_better(float v, int i, float bv, int bi) {
    return i >= 0 && (bi < 0 || v > bv || (v == bv && i < bi));
}

// The warp's best (value, index) pair in every lane (bi < 0: none).
__device__ __forceinline__ void warp_argmax_pair(float& bv, int& bi) {
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
        const int oi = __shfl_xor_sync(FULL_MASK, bi, o);
        if (argmax_better(ov, oi, bv, bi)) {
            bv = ov;
            bi = oi;
        }
    }
}

template <typename T>
__device__ void argmax_rows(const T* x, unsigned* out, i64 cols) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const i64 row = blockIdx.x;
    const T* xr = x + row * cols;
    float bv = 0.0f;
    int bi = -1;
    for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = ld(xr, c);
        if (v == v && (bi < 0 || v > bv)) {  // v == v: not NaN
            bv = v;
            bi = (int)c;
        }
    }
    warp_argmax_pair(bv, bi);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    if (lane == 0) {
        sv[w] = bv;
        si[w] = bi;
    }
    __syncthreads();
    if (w == 0) {
        bv = lane < nw ? sv[lane] : 0.0f;
        bi = lane < nw ? si[lane] : -1;
        warp_argmax_pair(bv, bi);
        if (lane == 0) {
            const float first = cols > 0 ? ld(xr, 0) : 0.0f;
            out[row] = (first != first || bi < 0) ? 0u : (unsigned)bi;
        }
    }
}
extern "C" __global__ void argmax_rows_f32(const float* x, unsigned* out, i64 cols) {
    PDL_ENTRY();
    argmax_rows<float>(x, out, cols);
}
extern "C" __global__ void argmax_rows_bf16(const bf16_t* x, unsigned* out, i64 cols) {
    PDL_ENTRY();
    argmax_rows<bf16_t>(x, out, cols);
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
    PDL_ENTRY();
    nll<float>(logits, targets, out, vocab);
}
extern "C" __global__ void nll_bf16(const bf16_t* logits, const unsigned* targets, float* out, i64 vocab) {
    PDL_ENTRY();
    nll<bf16_t>(logits, targets, out, vocab);
}
