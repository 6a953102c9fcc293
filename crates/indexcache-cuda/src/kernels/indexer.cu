// Lightning-indexer scores: I[t,s] = sum_h w[t,h] * max(scale * dot(q[t,h,:], k[s,:]), 0).
//
// Shapes (row-major): q [rows, heads*d], w [rows, heads], keys [key_rows, d], pos [rows] i32,
// scores [rows, stride] f32. Row t sees keys 0..=pos[t]; only those entries of its score row are
// written (the rest of the row is never read by the top-k). Every sum starts from +0, so no score
// is ever -0 (the top-k orders -0 below +0, as the CPU's total order does).
//
// Kernels:
// * indexer_scores_f32: exact CUDA-core path (f32 FMAs), any heads, d <= 256. A CTA scores a
//   64-query x 64-key tile: per head, the d dimensions stream through shared memory in chunks of
//   16; each thread owns a 4x4 block of dot products, folds them into its 4x4 scores after the
//   head (ReLU, x weight). Tiles wholly past the CTA rows' last position exit at once.
// * indexer_scores_bf16_m{1,2}: tensor cores (mma.sync m16n8k16 bf16 -> f32), d = 128, heads <= 64.
//   A warp owns one query row and 16*M heads as the M dimension (M = 1 or 2 m-tiles); its q
//   fragments live in registers for the whole kernel. The 8 warps of a CTA cover 8 consecutive
//   query rows (heads <= 32) or 4 rows x 2 head groups (33..64 heads, the two partial sums meet in
//   shared memory). Keys are the N dimension: 64-key x 128-dim bf16 tiles (16 KiB) stream through a
//   3-stage cp.async ring, XOR-swizzled by 16-byte chunk so ldmatrix reads are conflict-free. After
//   each tile a warp folds ReLU(scale*dot)*w over its heads and reduce-scatters across the 8 lanes
//   that hold the same columns (3 shuffle rounds), ending with 2 scores per lane (keys 2*lane,
//   2*lane+1) for one coalesced float2 store. blockIdx.y splits the keys, so decode (a handful of
//   rows) still fills the GPU; keys past the CTA's last visible position are never loaded.
//   Useful FLOPs: 2 * heads * 128 per visible (t, s) pair.
// * indexer_scores_bf16_keysplit_m{1,2}: decode layout, one query row per CTA, the 8 warps
//   splitting each tile's keys (8 each), heads <= 32.
//   All bf16 variants compute each score with the same MMA chain and the same head-sum order, so
//   they agree bit for bit (tests/indexer.rs checks it).

#define FULL 0xffffffffu

__device__ __forceinline__ float bf16_to_f32(unsigned short h) { return __uint_as_float(((unsigned)h) << 16); }

// ---------------------------------------------------------------------------------------------
// f32 path
// ---------------------------------------------------------------------------------------------

#define F_Q 64  // query rows per CTA
#define F_S 64  // keys per CTA
#define F_D 16  // dims per shared-memory chunk

__device__ __forceinline__ float ld_val(const float* p) { return *p; }
__device__ __forceinline__ float ld_val(const unsigned short* p) { return bf16_to_f32(*p); }

// The CUDA-core scorer over f32 or bf16 storage (f32 arithmetic either way): the exact path, and
// the bf16 fallback for shapes the tensor-core kernels do not take (d != 128 or > 64 heads).
template <typename T>
__device__ __forceinline__ void scores_cc(
    const T* __restrict__ q, const T* __restrict__ w, const T* __restrict__ keys,
    const int* __restrict__ pos, float* __restrict__ scores, int rows, int heads, int d, long long stride,
    float scale) {
    // Transposed tiles: [dim][row], padded to keep float4 alignment and spread the stores.
    __shared__ __align__(16) float qs[F_D][F_Q + 4];
    __shared__ __align__(16) float ks[F_D][F_S + 4];
    __shared__ int tile_max;
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int row0 = blockIdx.y * F_Q;
    const int s0 = blockIdx.x * F_S;
    if (tid == 0) tile_max = -1;
    __syncthreads();
    if (tid < F_Q && row0 + tid < rows) atomicMax(&tile_max, pos[row0 + tid]);
    __syncthreads();
    const int kend = tile_max + 1;  // no row of this tile sees keys >= kend
    if (s0 >= kend) return;

    int my_pos[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int t = row0 + ty * 4 + i;
        my_pos[i] = t < rows ? pos[t] : -1;
    }
    const long long qstride = (long long)heads * d;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

    for (int h = 0; h < heads; ++h) {
        float dot[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) dot[i][j] = 0.f;
        for (int d0 = 0; d0 < d; d0 += F_D) {
#pragma unroll
            for (int l = 0; l < (F_Q * F_D) / 256; ++l) {
                const int e = tid + 256 * l, r = e >> 4, c = e & 15, dd = d0 + c;
                const int t = row0 + r, s = s0 + r;
                qs[c][r] = (t < rows && dd < d) ? ld_val(q + t * qstride + (long long)h * d + dd) : 0.f;
                ks[c][r] = (s < kend && dd < d) ? ld_val(keys + (long long)s * d + dd) : 0.f;
            }
            __syncthreads();
#pragma unroll
            for (int c = 0; c < F_D; ++c) {
                const float4 a4 = *reinterpret_cast<const float4*>(&qs[c][ty * 4]);
                const float4 b4 = *reinterpret_cast<const float4*>(&ks[c][tx * 4]);
                const float av[4] = {a4.x, a4.y, a4.z, a4.w};
                const float bv[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j) dot[i][j] = fmaf(av[i], bv[j], dot[i][j]);
            }
            __syncthreads();
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int t = row0 + ty * 4 + i;
            const float wv = t < rows ? ld_val(w + (long long)t * heads + h) : 0.f;
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(wv, fmaxf(dot[i][j] * scale, 0.f), acc[i][j]);
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int t = row0 + ty * 4 + i;
        const int s = s0 + tx * 4;
        if (s > my_pos[i]) continue;  // also skips rows past `rows` (my_pos = -1)
        float* dst = scores + (long long)t * stride + s;
        if (s + 3 <= my_pos[i]) {
            *reinterpret_cast<float4*>(dst) = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j)
                if (s + j <= my_pos[i]) dst[j] = acc[i][j];
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) indexer_scores_f32(
    const float* __restrict__ q, const float* __restrict__ w, const float* __restrict__ keys,
    const int* __restrict__ pos, float* __restrict__ scores, int rows, int heads, int d, long long stride,
    float scale) {
    PDL_ENTRY();
    scores_cc<float>(q, w, keys, pos, scores, rows, heads, d, stride, scale);
}

extern "C" __global__ void __launch_bounds__(256) indexer_scores_cc_bf16(
    const unsigned short* __restrict__ q, const unsigned short* __restrict__ w,
    const unsigned short* __restrict__ keys, const int* __restrict__ pos, float* __restrict__ scores, int rows,
    int heads, int d, long long stride, float scale) {
    PDL_ENTRY();
    scores_cc<unsigned short>(q, w, keys, pos, scores, rows, heads, d, stride, scale);
}

// ---------------------------------------------------------------------------------------------
// bf16 tensor-core path
// ---------------------------------------------------------------------------------------------

#define B_D 128                            // head dim
#define B_KEYS 64                          // keys per tile
#define B_ROWB (B_D * 2)                   // bytes per key row
#define B_TILE_BYTES (B_KEYS * B_ROWB)     // 16 KiB
#define B_STAGES 3
#define B_WARPS 8
#define B_THREADS (B_WARPS * 32)
// Dynamic shared memory: the key ring, then the head-group exchange [2 parities][B_WARPS/2 rows][32 lanes] float2.
#define B_SMEM_BYTES (B_STAGES * B_TILE_BYTES + 2 * (B_WARPS / 2) * 32 * 8)

__device__ __forceinline__ unsigned smem_u32(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// 16-byte async copy global -> shared; `bytes` = 0 zero-fills without reading.
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, unsigned bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_1() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }

__device__ __forceinline__ void ldsm_x4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr)
                 : "memory");
}

// c += a (16x16, row) * b (16x8, col); bf16 inputs, f32 accumulate.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Fold one 64-key tile: acc[mt][nt] is the m16n8 C fragment of heads mt*16.. x keys nt*8.. (lane holds
// heads g = lane/4 and g+8, keys 2*(lane%4)+{0,1}). Returns the head-summed scores of keys 2*lane and
// 2*lane+1 of the tile (summed over the 8 lanes with equal lane%4 by a reduce-scatter: each round
// halves the n-tiles a lane keeps, so 8+4+2 shuffles instead of 3 per value).
template <int MT>
__device__ __forceinline__ float2 fold_heads(const float (&acc)[MT][8][4], const float (&ws)[MT][2], int lane) {
    float p[8][2];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            float x = 0.f;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                x = fmaf(ws[mt][0], fmaxf(acc[mt][nt][c], 0.f), x);
                x = fmaf(ws[mt][1], fmaxf(acc[mt][nt][2 + c], 0.f), x);
            }
            p[nt][c] = x;
        }
    const bool b4 = (lane & 16) != 0, b3 = (lane & 8) != 0, b2 = (lane & 4) != 0;
    float p4[4][2];  // n-tiles j + 4*b4
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            const float send = b4 ? p[j][c] : p[j + 4][c];
            const float keep = b4 ? p[j + 4][c] : p[j][c];
            p4[j][c] = keep + __shfl_xor_sync(FULL, send, 16);
        }
    float p2[2][2];  // n-tiles j + 2*b3 + 4*b4
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            const float send = b3 ? p4[j][c] : p4[j + 2][c];
            const float keep = b3 ? p4[j + 2][c] : p4[j][c];
            p2[j][c] = keep + __shfl_xor_sync(FULL, send, 8);
        }
    float out[2];  // n-tile b2 + 2*b3 + 4*b4 = lane/4: keys 8*(lane/4) + 2*(lane%4) + c = 2*lane + c
#pragma unroll
    for (int c = 0; c < 2; ++c) {
        const float send = b2 ? p2[0][c] : p2[1][c];
        const float keep = b2 ? p2[1][c] : p2[0][c];
        out[c] = keep + __shfl_xor_sync(FULL, send, 4);
    }
    return make_float2(out[0], out[1]);
}

// groups = head groups of 16*MT heads (1, or 2 when MT = 2 and heads > 32); split = keys per blockIdx.y
// (a multiple of B_KEYS). The grid's x runs over row blocks, heaviest (latest rows) first.
// (A variant folding each tile as two 32-key halves at two CTAs per SM measured no faster on the
// H200 — 360 against 362 TFLOP/s — and was removed.)
template <int MT>
__device__ __forceinline__ void scores_bf16_body(const unsigned short* __restrict__ q,
                                                 const unsigned short* __restrict__ w,
                                                 const unsigned short* __restrict__ keys,
                                                 const int* __restrict__ pos, float* __restrict__ scores, int rows,
                                                 int heads, int groups, long long stride, int split, float scale) {
    extern __shared__ __align__(128) unsigned char smem[];
    float2* comb = reinterpret_cast<float2*>(smem + B_STAGES * B_TILE_BYTES);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int R = B_WARPS / groups;  // query rows per CTA
    const int row0 = (gridDim.x - 1 - blockIdx.x) * R;
    const int r = warp % R, grp = warp / R;
    const int t = row0 + r;
    const bool row_ok = t < rows;

    int cta_max = -1;
    for (int i = 0; i < R; ++i)
        if (row0 + i < rows) cta_max = max(cta_max, pos[row0 + i]);
    const int my_pos = row_ok ? pos[t] : -1;
    const long long kb = (long long)blockIdx.y * split;
    const long long ke = min(kb + (long long)split, (long long)cta_max + 1);  // keys [kb, ke)
    if (ke <= kb) return;  // uniform over the CTA
    const int ntiles = (int)((ke - kb + B_KEYS - 1) / B_KEYS);

    // q fragments (A, row-major 16x16 per m-tile and k-step): reg0 (head g, dims 2qd..), reg1 (head
    // g+8, same dims), reg2/reg3 the same at dims +8. For scale < 0 the sign moves into q (exact):
    // ReLU(scale*x) = |scale| * ReLU(-x). Padded heads get zero q and zero weight.
    const int g = lane >> 2, qd = lane & 3;
    const unsigned flip = scale < 0.f ? 0x80008000u : 0u;
    const float sabs = fabsf(scale);
    unsigned a[MT][8][4];
    float ws[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int h = grp * (MT * 16) + mt * 16 + g + 8 * hf;
            const bool ok = row_ok && h < heads;
            ws[mt][hf] = ok ? bf16_to_f32(w[(long long)t * heads + h]) * sabs : 0.f;
            const unsigned* qrow = reinterpret_cast<const unsigned*>(q + ((long long)t * heads + h) * B_D);
#pragma unroll
            for (int ks = 0; ks < 8; ++ks) {
                a[mt][ks][hf] = ok ? (qrow[ks * 8 + qd] ^ flip) : 0u;
                a[mt][ks][2 + hf] = ok ? (qrow[ks * 8 + 4 + qd] ^ flip) : 0u;
            }
        }

    const unsigned sbase = smem_u32(smem);
    // Stage tile i: 64 rows x 16 chunks of 16 B; chunk c of row rr lands at chunk c ^ (rr & 7).
    auto load_tile = [&](int i) {
        const long long s0 = kb + (long long)i * B_KEYS;
        const unsigned st = sbase + (unsigned)((i % B_STAGES) * B_TILE_BYTES);
#pragma unroll
        for (int l = 0; l < (B_KEYS * 16) / B_THREADS; ++l) {
            const int e = tid + l * B_THREADS, rr = e >> 4, c = e & 15;
            const long long s = s0 + rr;
            const bool ok = s < ke;
            cp_async16(st + rr * B_ROWB + ((c ^ (rr & 7)) << 4), keys + (ok ? s * B_D + c * 8 : 0), ok ? 16u : 0u);
        }
    };

    load_tile(0);
    cp_async_commit();
    if (ntiles > 1) load_tile(1);
    cp_async_commit();

    // ldmatrix.x4 lanes: matrix mi = lane/8 (n-tile 2np + mi/2, dims half mi%2), row rr8 = lane%8.
    const int mi = lane >> 3, rr8 = lane & 7;
    const unsigned lane_off = (unsigned)((((mi >> 1) * 8) + rr8) * B_ROWB);
    for (int i = 0; i < ntiles; ++i) {
        cp_async_wait_1();  // tile i has landed (only tile i+1 may still be in flight)
        __syncthreads();    // ... for every thread; and everyone is done with tile i-1's stage
        if (i + 2 < ntiles) load_tile(i + 2);
        cp_async_commit();

        const long long s0 = kb + (long long)i * B_KEYS;
        const bool live = s0 <= my_pos;  // warp-uniform: this row sees part of the tile
        float2 v = make_float2(0.f, 0.f);
        if (live) {
            const unsigned st = sbase + (unsigned)((i % B_STAGES) * B_TILE_BYTES) + lane_off;
            float acc[MT][8][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
#pragma unroll
            for (int ks = 0; ks < 8; ++ks) {
                const unsigned koff = (unsigned)(((ks * 2 + (mi & 1)) ^ rr8) << 4);
#pragma unroll
                for (int np = 0; np < 4; ++np) {
                    unsigned b0, b1, b2, b3;
                    ldsm_x4(st + np * 16 * B_ROWB + koff, b0, b1, b2, b3);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma_bf16(acc[mt][2 * np], a[mt][ks], b0, b1);
                        mma_bf16(acc[mt][2 * np + 1], a[mt][ks], b2, b3);
                    }
                }
            }
            v = fold_heads<MT>(acc, ws, lane);
        }
        if (groups == 2) {  // uniform: group 1 hands its partial sums to group 0 of the same row
            float2* cb = comb + ((i & 1) * (B_WARPS / 2) + r) * 32;
            if (grp == 1 && live) cb[lane] = v;
            __syncthreads();
            if (grp == 1 || !live) continue;
            const float2 o = cb[lane];
            v.x += o.x;
            v.y += o.y;
        } else if (!live) {
            continue;
        }
        const long long s = s0 + 2 * lane;
        float* dst = scores + (long long)t * stride + s;
        if (s + 1 <= my_pos) {
            *reinterpret_cast<float2*>(dst) = v;
        } else if (s <= my_pos) {
            dst[0] = v.x;
        }
    }
}

// Decode layout: one query row per CTA (blockIdx.x = row, blockIdx.y = key range of `split` keys),
// the 8 warps splitting each 64-key tile by n-tile (warp w: keys 8w..8w+7). A tile costs a warp 4
// ldmatrix.x4 + 8*MT MMAs, so one row streams keys at memory speed instead of one warp doing every
// MMA while seven wait. Every warp holds the row's q fragments. Each score is the same MMA chain
// (k-steps 0..7 in order) and the same head sum (lane partials, then lanes ^16, ^8, ^4) as in
// fold_heads: bit-identical to the kernels above. heads <= 32 (one head group).
template <int MT>
__device__ __forceinline__ void scores_bf16_keysplit_body(const unsigned short* __restrict__ q,
                                                          const unsigned short* __restrict__ w,
                                                          const unsigned short* __restrict__ keys,
                                                          const int* __restrict__ pos, float* __restrict__ scores,
                                                          int heads, long long stride, int split, float scale) {
    extern __shared__ __align__(128) unsigned char smem[];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int t = blockIdx.x;
    const int my_pos = pos[t];
    const long long kb = (long long)blockIdx.y * split;
    const long long ke = min(kb + (long long)split, (long long)my_pos + 1);  // keys [kb, ke)
    if (ke <= kb) return;  // uniform over the CTA
    const int ntiles = (int)((ke - kb + B_KEYS - 1) / B_KEYS);

    // q fragments and weights exactly as in scores_bf16_body (one head group).
    const int g = lane >> 2, qd = lane & 3;
    const unsigned flip = scale < 0.f ? 0x80008000u : 0u;
    const float sabs = fabsf(scale);
    unsigned a[MT][8][4];
    float ws[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int h = mt * 16 + g + 8 * hf;
            const bool ok = h < heads;
            ws[mt][hf] = ok ? bf16_to_f32(w[(long long)t * heads + h]) * sabs : 0.f;
            const unsigned* qrow = reinterpret_cast<const unsigned*>(q + ((long long)t * heads + h) * B_D);
#pragma unroll
            for (int ks = 0; ks < 8; ++ks) {
                a[mt][ks][hf] = ok ? (qrow[ks * 8 + qd] ^ flip) : 0u;
                a[mt][ks][2 + hf] = ok ? (qrow[ks * 8 + 4 + qd] ^ flip) : 0u;
            }
        }

    const unsigned sbase = smem_u32(smem);
    auto load_tile = [&](int i) {  // as in scores_bf16_body
        const long long s0 = kb + (long long)i * B_KEYS;
        const unsigned st = sbase + (unsigned)((i % B_STAGES) * B_TILE_BYTES);
#pragma unroll
        for (int l = 0; l < (B_KEYS * 16) / B_THREADS; ++l) {
            const int e = tid + l * B_THREADS, rr = e >> 4, c = e & 15;
            const long long s = s0 + rr;
            const bool ok = s < ke;
            cp_async16(st + rr * B_ROWB + ((c ^ (rr & 7)) << 4), keys + (ok ? s * B_D + c * 8 : 0), ok ? 16u : 0u);
        }
    };
    load_tile(0);
    cp_async_commit();
    if (ntiles > 1) load_tile(1);
    cp_async_commit();

    // ldmatrix.x4 lanes: matrix mi = lane/8 is k-step 2*kp + mi/2, dims half mi%2, of this warp's
    // n-tile (16-byte chunk 4*kp + mi of key row 8*warp + rr8); row rr8 = lane%8.
    const int mi = lane >> 3, rr8 = lane & 7;
    const unsigned lane_off = (unsigned)((warp * 8 + rr8) * B_ROWB);
    for (int i = 0; i < ntiles; ++i) {
        cp_async_wait_1();  // tile i has landed (only tile i+1 may still be in flight)
        __syncthreads();    // ... for every thread; and everyone is done with tile i-1's stage
        if (i + 2 < ntiles) load_tile(i + 2);
        cp_async_commit();

        const long long s0 = kb + (long long)i * B_KEYS + warp * 8;  // this warp's first key
        if (s0 > my_pos) continue;                                    // warp-uniform
        const unsigned st = sbase + (unsigned)((i % B_STAGES) * B_TILE_BYTES) + lane_off;
        float acc[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][e] = 0.f;
#pragma unroll
        for (int kp = 0; kp < 4; ++kp) {
            unsigned b0, b1, b2, b3;
            ldsm_x4(st + (unsigned)(((4 * kp + mi) ^ rr8) << 4), b0, b1, b2, b3);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) mma_bf16(acc[mt], a[mt][2 * kp], b0, b1);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) mma_bf16(acc[mt], a[mt][2 * kp + 1], b2, b3);
        }
        float p[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            float x = 0.f;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                x = fmaf(ws[mt][0], fmaxf(acc[mt][c], 0.f), x);
                x = fmaf(ws[mt][1], fmaxf(acc[mt][2 + c], 0.f), x);
            }
            p[c] = x;
        }
        const bool b4 = (lane & 16) != 0;
        float v = (b4 ? p[1] : p[0]) + __shfl_xor_sync(FULL, b4 ? p[0] : p[1], 16);  // column b4
        v = v + __shfl_xor_sync(FULL, v, 8);
        v = v + __shfl_xor_sync(FULL, v, 4);
        const long long s = s0 + 2 * qd + (b4 ? 1 : 0);  // lanes 0-3 and 16-19 store the 8 keys
        if ((lane & 12) == 0 && s <= my_pos) scores[(long long)t * stride + s] = v;
    }
}

extern "C" __global__ void __launch_bounds__(B_THREADS, 1)
    indexer_scores_bf16_m1(const unsigned short* __restrict__ q, const unsigned short* __restrict__ w,
                           const unsigned short* __restrict__ keys, const int* __restrict__ pos,
                           float* __restrict__ scores, int rows, int heads, int groups, long long stride, int split,
                           float scale) {
    PDL_ENTRY();
    scores_bf16_body<1>(q, w, keys, pos, scores, rows, heads, groups, stride, split, scale);
}

extern "C" __global__ void __launch_bounds__(B_THREADS, 1)
    indexer_scores_bf16_m2(const unsigned short* __restrict__ q, const unsigned short* __restrict__ w,
                           const unsigned short* __restrict__ keys, const int* __restrict__ pos,
                           float* __restrict__ scores, int rows, int heads, int groups, long long stride, int split,
                           float scale) {
    PDL_ENTRY();
    scores_bf16_body<2>(q, w, keys, pos, scores, rows, heads, groups, stride, split, scale);
}

// One query row per CTA, warps splitting the keys (decode; see scores_bf16_keysplit_body).
extern "C" __global__ void __launch_bounds__(B_THREADS, 2)
    indexer_scores_bf16_keysplit_m1(const unsigned short* __restrict__ q, const unsigned short* __restrict__ w,
                                    const unsigned short* __restrict__ keys, const int* __restrict__ pos,
                                    float* __restrict__ scores, int rows, int heads, int groups, long long stride,
                                    int split, float scale) {
    PDL_ENTRY();
    scores_bf16_keysplit_body<1>(q, w, keys, pos, scores, heads, stride, split, scale);
}

extern "C" __global__ void __launch_bounds__(B_THREADS, 2)
    indexer_scores_bf16_keysplit_m2(const unsigned short* __restrict__ q, const unsigned short* __restrict__ w,
                                    const unsigned short* __restrict__ keys, const int* __restrict__ pos,
                                    float* __restrict__ scores, int rows, int heads, int groups, long long stride,
                                    int split, float scale) {
    PDL_ENTRY();
    scores_bf16_keysplit_body<2>(q, w, keys, pos, scores, heads, stride, split, scale);
}
