// Grouped-query attention for dense models (`Backend::gqa_attention`), CUDA cores, f32 arithmetic.
//
// CTA = (query row t, query head h), GQA_THREADS threads; head h reads KV head h / (heads / kv_heads).
// Keys: 0..=pos[t] (nsel == 0: causal) or the entries >= 0 of sel[t, 0..nsel]. They are taken in
// chunks of GQA_THREADS, one key per thread: the thread's logit is scale * q . k[s] (q staged in
// shared memory), then an online softmax over the chunk (block max / sum, exp in f32), and the
// output accumulators (thread c owns columns c, c + GQA_THREADS, ...) are rescaled and take
// sum_j p_j v[s_j, c] (coalesced over c). out = acc / l, zeros for a row with no key.
// Correctness first: a model of the size this serves (SmolLM2: 9 heads x 64) is bound by the
// projections, not by this loop.
// Element types and ld/st: common.cuh (prepended).

#define GQA_THREADS 128
#define GQA_MAX_D 256
#define GQA_MAX_DV_PER_THREAD 4  // Dv <= 512

__device__ __forceinline__ float gqa_block_max(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float m = red[0];
    for (int w = 1; w < GQA_THREADS / 32; ++w) m = fmaxf(m, red[w]);
    return m;
}

__device__ __forceinline__ float gqa_block_sum(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float s = red[0];
    for (int w = 1; w < GQA_THREADS / 32; ++w) s += red[w];
    return s;
}

template <typename T>
__device__ void gqa_attn(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                         const int* __restrict__ pos, const int* __restrict__ sel, T* __restrict__ out, int heads,
                         int kv_heads, int d, int dv, int nsel, float scale) {
    __shared__ float sq[GQA_MAX_D];
    __shared__ float sp[GQA_THREADS];
    __shared__ int ss[GQA_THREADS];
    __shared__ float red[GQA_THREADS / 32];
    const int t = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
    const int g = h / (heads / kv_heads);
    const T* qr = q + ((i64)t * heads + h) * d;
    for (int c = tid; c < d; c += GQA_THREADS) sq[c] = ld(qr, c);
    const int n = nsel == 0 ? pos[t] + 1 : nsel;  // candidate keys (selection entries may be -1)
    const int* srow = sel + (i64)t * nsel;
    float m_run = neg_inf(), l_run = 0.0f;
    float acc[GQA_MAX_DV_PER_THREAD];
#pragma unroll
    for (int i = 0; i < GQA_MAX_DV_PER_THREAD; ++i) acc[i] = 0.0f;
    __syncthreads();
    for (int j0 = 0; j0 < n; j0 += GQA_THREADS) {
        const int j = j0 + tid;
        const int s = j < n ? (nsel == 0 ? j : srow[j]) : -1;
        float logit = neg_inf();
        if (s >= 0) {
            const T* kr = k + ((i64)s * kv_heads + g) * d;
            float dot = 0.0f;
            for (int c = 0; c < d; ++c) dot = fmaf(sq[c], ld(kr, c), dot);
            logit = dot * scale;
        }
        const float m_new = fmaxf(m_run, gqa_block_max(logit, red));
        const float p = s >= 0 ? expf(logit - m_new) : 0.0f;
        const float corr = m_new == neg_inf() ? 1.0f : expf(m_run - m_new);
        sp[tid] = p;
        ss[tid] = s;
        const float psum = gqa_block_sum(p, red);  // its barriers also publish sp / ss
        l_run = l_run * corr + psum;
        m_run = m_new;
        const int cnt = min(GQA_THREADS, n - j0);
#pragma unroll
        for (int i = 0; i < GQA_MAX_DV_PER_THREAD; ++i) {
            const int c = tid + i * GQA_THREADS;
            if (c < dv) {
                float a = acc[i] * corr;
                for (int jj = 0; jj < cnt; ++jj) {
                    const int sj = ss[jj];
                    if (sj >= 0) a = fmaf(sp[jj], ld(v, ((i64)sj * kv_heads + g) * dv + c), a);
                }
                acc[i] = a;
            }
        }
        __syncthreads();  // sp / ss are rewritten by the next chunk
    }
    const float inv = l_run > 0.0f ? 1.0f / l_run : 0.0f;
    T* orow = out + ((i64)t * heads + h) * dv;
#pragma unroll
    for (int i = 0; i < GQA_MAX_DV_PER_THREAD; ++i) {
        const int c = tid + i * GQA_THREADS;
        if (c < dv) st(orow, c, acc[i] * inv);
    }
}

extern "C" __global__ void __launch_bounds__(GQA_THREADS)
    gqa_attn_f32(const float* q, const float* k, const float* v, const int* pos, const int* sel, float* out,
                 int heads, int kv_heads, int d, int dv, int nsel, float scale) {
    PDL_ENTRY();
    gqa_attn<float>(q, k, v, pos, sel, out, heads, kv_heads, d, dv, nsel, scale);
}

extern "C" __global__ void __launch_bounds__(GQA_THREADS)
    gqa_attn_bf16(const bf16_t* q, const bf16_t* k, const bf16_t* v, const int* pos, const int* sel, bf16_t* out,
                  int heads, int kv_heads, int d, int dv, int nsel, float scale) {
    PDL_ENTRY();
    gqa_attn<bf16_t>(q, k, v, pos, sel, out, heads, kv_heads, d, dv, nsel, scale);
}
