// Sparse MLA attention in the absorbed (MQA) form over the selected cache rows.
//
// For query row t and head h, over the valid entries j of sel[t, :] (entries < 0 skipped):
//   logit_j = scale * (q_lat[t,h,:] . c_j + q_pe[t,h,:] . k_pe_j)      (cache row = [c_j | k_pe_j])
//   out[t,h,:] = sum_j softmax(logit)_j * c_j                           (zeros when no valid entry)
// Layouts: q_lat [rows, heads*r], q_pe [rows, heads*p], cache [cache_rows, r+p], out [rows, heads*r],
// sel i32 [rows, k]. bf16 values are `unsigned short` bit patterns (no CUDA headers here).
//
// Kernels (grid = (rows, head groups, splits) for the attention kernels, 256 threads):
//   mla_cc_f32 / mla_cc_bf16  exact CUDA-core path (f32 arithmetic): any r, p, heads, k.
//   mla_tc_m1 / _m2 / _m4     bf16 tensor-core path (mma.sync m16n8k16, f32 accumulate) for
//                             16 / 32 / 64 heads per CTA; r % 8 == 0, p % 8 == 0, r <= 512.
//   mla_combine_f32 / _bf16   split-k combine: out = sum_s e^{m_s-M} O_s / sum_s e^{m_s-M} l_s.
// With splits == 1 the attention kernels write `out` directly; otherwise split s of row t writes
// its unnormalised partial O (f32) to ws_o[t, s, h, :] and (m, l) (natural-log units) to
// ws_ml[t, s, h, 0..2], and the combine kernel finishes.
//
// MLA_HOST_EMU: defined only by a host-side emulator (C++ threads standing in for CUDA threads,
// ldmatrix / mma / cp.async emulated from the PTX ISA fragment layouts) used to check the index
// arithmetic without a GPU; it supplies the primitives guarded below (and `PDL_ENTRY`, which
// pdl.cuh, prepended for NVRTC, defines). NVRTC never defines it. combine.cuh (the combine's
// arithmetic, shared with moe_decode.cu's mla_combine_uv) is prepended too.

typedef unsigned short bf16_t;
typedef unsigned int u32;
typedef unsigned long long u64;

struct alignas(8) mla_f2 {
    float x, y;
};
struct alignas(16) mla_f4 {
    float x, y, z, w;
};
struct alignas(8) mla_u2 {
    u32 x, y;
};

#ifndef MLA_HOST_EMU
// ---- device primitives (inline PTX; the host emulator used in development supplies its own) ----

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u64 a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (u32)a;
}

// 16-byte async copy global -> shared; `src_bytes` of 0 writes 16 zero bytes (reads nothing).
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(u32 addr, u32 (&d)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_t(u32 addr, u32 (&d)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                 : "r"(addr));
}

// c += a (16x16, row) * b (16x8, col); bf16 in, f32 accumulate.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two f32 -> packed bf16x2 (round to nearest even); `lo` lands in the low half (lower address).
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float neg_inf() {
    return __int_as_float(0xff800000);
}
#endif  // MLA_HOST_EMU

__device__ __forceinline__ int imin(int a, int b) {
    return a < b ? a : b;
}
__device__ __forceinline__ int imax(int a, int b) {
    return a > b ? a : b;
}

__device__ __forceinline__ float bf2f(bf16_t v) {
    return __uint_as_float(((u32)v) << 16);
}

__device__ __forceinline__ bf16_t f2bf(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)0x7fc0;  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

__device__ __forceinline__ float ld_val(const float* p) {
    return *p;
}
__device__ __forceinline__ float ld_val(const bf16_t* p) {
    return bf2f(*p);
}
__device__ __forceinline__ void st_val(float* p, float v) {
    *p = v;
}
__device__ __forceinline__ void st_val(bf16_t* p, float v) {
    *p = f2bf(v);
}

// One past the last valid (>= 0) entry of sel_row[jb..je), or jb when there is none; block-wide
// (256 threads), `red` is 8 ints of shared memory. Ends with a barrier; `red` may not be reused.
__device__ __forceinline__ int valid_end(const int* sel_row, int jb, int je, int* red) {
    const int tid = threadIdx.x;
    int last = jb;
    for (int j = jb + tid; j < je; j += 256)
        if (sel_row[j] >= 0) last = j + 1;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) last = imax(last, __shfl_xor_sync(0xffffffffu, last, o));
    if ((tid & 31) == 0) red[tid >> 5] = last;
    __syncthreads();
    int n = red[0];
#pragma unroll
    for (int w = 1; w < 8; ++w) n = imax(n, red[w]);
    return n;
}

// =============================================================================================
// CUDA-core path: exact f32 arithmetic, any shape.
//
// CTA = (row t, head group [h0, h0+nh), split). Shared memory (f32):
//   sG [NB, W] gathered rows | sQ [HG, W] | sO [HG, r] running output | sP [HG, NB] logits then
//   probabilities | sM, sL, sCorr [HG] | sValid [NB] (int) | red [8] (int).
// Per block of NB selected entries: gather (invalid -> zeros), logits (one warp per (head, key)
// dot product, lane-strided + tree reduce), online-softmax update (one thread per head), then
// O = O * corr + P . G (one thread per output element).
// =============================================================================================
template <typename T>
__device__ __forceinline__ void mla_cc(const T* __restrict__ q_lat, const T* __restrict__ q_pe,
                                       const T* __restrict__ cache, const int* __restrict__ sel, T* __restrict__ out,
                                       float* __restrict__ ws_o, float* __restrict__ ws_ml, int heads, int r, int p,
                                       int k, float scale, int hg, int nb, int split_len, int splits,
                                       unsigned char* smem) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int t = blockIdx.x;
    const int h0 = blockIdx.y * hg;
    const int nh = imin(hg, heads - h0);
    const int split = blockIdx.z;
    const int W = r + p;
    const int jb = imin(k, split * split_len);
    const int je = imin(k, jb + split_len);
    const int* sel_row = sel + (u64)t * k;

    float* sG = (float*)smem;
    float* sQ = sG + nb * W;
    float* sO = sQ + hg * W;
    float* sP = sO + hg * r;
    float* sM = sP + hg * nb;
    float* sL = sM + hg;
    float* sCorr = sL + hg;
    int* sValid = (int*)(sCorr + hg);
    int* red = sValid + nb;

    const int n_end = valid_end(sel_row, jb, je, red);

    for (int i = tid; i < nh * W; i += 256) {
        const int h = i / W, c = i - h * W;
        const u64 qrow = (u64)t * heads + h0 + h;
        sQ[i] = c < r ? ld_val(q_lat + qrow * r + c) : ld_val(q_pe + qrow * p + (c - r));
    }
    for (int i = tid; i < nh * r; i += 256) sO[i] = 0.0f;
    for (int h = tid; h < nh; h += 256) {
        sM[h] = neg_inf();
        sL[h] = 0.0f;
    }

    for (int b0 = jb; b0 < n_end; b0 += nb) {
        __syncthreads();  // previous block's readers of sG / sP are done; init visible
        for (int jj = tid; jj < nb; jj += 256) {
            const int j = b0 + jj;
            sValid[jj] = j < n_end ? sel_row[j] : -1;
        }
        __syncthreads();
        for (int i = tid; i < nb * W; i += 256) {
            const int jj = i / W, c = i - jj * W;
            const int s = sValid[jj];
            sG[i] = s >= 0 ? ld_val(cache + (u64)s * W + c) : 0.0f;
        }
        __syncthreads();
        for (int pr = warp; pr < nh * nb; pr += 8) {
            const int h = pr / nb, jj = pr - h * nb;
            if (sValid[jj] < 0) {
                if (lane == 0) sP[pr] = neg_inf();
                continue;
            }
            const float* q = sQ + h * W;
            const float* g = sG + jj * W;
            float acc = 0.0f;
            for (int c = lane; c < W; c += 32) acc = fmaf(q[c], g[c], acc);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
            if (lane == 0) sP[pr] = acc * scale;
        }
        __syncthreads();
        for (int h = tid; h < nh; h += 256) {
            float* lg = sP + h * nb;
            const float m_old = sM[h];
            float mx = m_old;
            for (int jj = 0; jj < nb; ++jj) mx = fmaxf(mx, lg[jj]);
            float corr = 1.0f, sum = 0.0f;
            if (mx != neg_inf()) {
                corr = expf(m_old - mx);
                for (int jj = 0; jj < nb; ++jj) {
                    const float e = expf(lg[jj] - mx);
                    lg[jj] = e;
                    sum += e;
                }
            } else {
                for (int jj = 0; jj < nb; ++jj) lg[jj] = 0.0f;
            }
            sM[h] = mx;
            sL[h] = sL[h] * corr + sum;
            sCorr[h] = corr;
        }
        __syncthreads();
        for (int i = tid; i < nh * r; i += 256) {
            const int h = i / r, c = i - h * r;
            const float* pr = sP + h * nb;
            float o = sO[i] * sCorr[h];
            for (int jj = 0; jj < nb; ++jj) o = fmaf(pr[jj], sG[jj * W + c], o);
            sO[i] = o;
        }
    }
    __syncthreads();

    for (int i = tid; i < nh * r; i += 256) {
        const int h = i / r, c = i - h * r;
        const u64 orow = (u64)t * heads + h0 + h;
        if (splits == 1) {
            const float l = sL[h];
            st_val(out + orow * r + c, l > 0.0f ? sO[i] / l : 0.0f);
        } else {
            const u64 wrow = ((u64)t * splits + split) * heads + h0 + h;
            ws_o[wrow * r + c] = sO[i];
            if (c == 0) {
                ws_ml[wrow * 2] = sM[h];
                ws_ml[wrow * 2 + 1] = sL[h];
            }
        }
    }
}

#ifndef MLA_HOST_EMU
extern __shared__ __align__(16) unsigned char mla_dyn_smem[];
#define MLA_SMEM mla_dyn_smem
#endif

extern "C" __global__ void __launch_bounds__(256) mla_cc_f32(const float* q_lat, const float* q_pe, const float* cache,
                                                             const int* sel, float* out, float* ws_o, float* ws_ml,
                                                             int heads, int r, int p, int k, float scale, int hg,
                                                             int nb, int split_len, int splits) {
    PDL_ENTRY();
    mla_cc<float>(q_lat, q_pe, cache, sel, out, ws_o, ws_ml, heads, r, p, k, scale, hg, nb, split_len, splits,
                  MLA_SMEM);
}

extern "C" __global__ void __launch_bounds__(256) mla_cc_bf16(const bf16_t* q_lat, const bf16_t* q_pe,
                                                              const bf16_t* cache, const int* sel, bf16_t* out,
                                                              float* ws_o, float* ws_ml, int heads, int r, int p,
                                                              int k, float scale, int hg, int nb, int split_len,
                                                              int splits) {
    PDL_ENTRY();
    mla_cc<bf16_t>(q_lat, q_pe, cache, sel, out, ws_o, ws_ml, heads, r, p, k, scale, hg, nb, split_len, splits,
                   MLA_SMEM);
}

// =============================================================================================
// Tensor-core path (bf16 in, f32 accumulate), FlashMLA-like with mma.sync.m16n8k16.
//
// CTA = (row t, head group of HP = 16*MT heads, split), 8 warps. Shared memory (runtime W = r+p,
// Wp = W rounded up to 16, row stride WS = Wp + 8 elements so ldmatrix rows hit distinct banks):
//   sQ [HP, WS] bf16    Q_t = [q_lat_h | q_pe_h | 0-pad] per head, rows >= nh zero
//   sG [2][NT, WS] bf16 double-buffered tile of NT gathered cache rows (cp.async, 16-B chunks;
//                       invalid entries zero-filled)
//   sS [4][HP, NT+8] f32 partial logits of the 4 K-splits
//   sP [HP, NT+8] bf16  probabilities of the tile
//   sCorr [HP], sML [2, HP] f32, red [8] int
// Per tile of NT selected entries (loads of tile i+1 overlap the math of tile i):
//   S phase: S = Q . G^T (K = Wp). 8 warps = 2 output blocks x 4 K-splits; each warp computes a
//            (16*WMT) x 32 block over a quarter of the k16 steps (A = Q via ldmatrix, B = G via
//            ldmatrix: rows of G are the n index), and stores its partial to sS.
//   softmax: 256/HP threads per head row sum the 4 partials, mask invalid entries, update the
//            running max / sum (log2 domain, in registers), write P (bf16) and the rescale factor.
//   O phase: O[HP, r] += P . G[:, :r]; warp w owns the n8 column tiles w, w+8, ... (<= 8 tiles,
//            so r <= 512) for all HP rows, accumulators in registers (MT*8*4 f32 per thread);
//            A = P via ldmatrix, B = G via ldmatrix.trans (rows of G are the k index).
// FLOPs per valid entry: 2*HP*(Wp + r) issued, 2*heads*(W + r) useful.
// =============================================================================================
// A tensor-core CTA's place and its rows' geometry (mla_tc, mla_dec): query row t, heads h0 ..
// h0 + nh of a head group of HP, k-split `split`; cache rows of W = r + p bf16, padded to Wp (a
// multiple of 16, the MMA K) and strided WS = Wp + 8 in shared memory (ldmatrix rows on distinct
// banks), CPR 16-byte chunks each; KSTEPS k16 steps of the S phase, NR n8 tiles of O.
struct TcGeom {
    int t, h0, nh, split, W, Wp, WS, CPR, KSTEPS, NR;
};
__device__ __forceinline__ TcGeom tc_geom(int HP, int heads, int r, int p) {
    TcGeom g;
    g.t = blockIdx.x;
    g.h0 = blockIdx.y * HP;
    g.nh = imin(HP, heads - g.h0);
    g.split = blockIdx.z;
    g.W = r + p;
    g.Wp = (g.W + 15) & ~15;
    g.WS = g.Wp + 8;
    g.CPR = g.W >> 3;
    g.KSTEPS = g.Wp >> 4;
    g.NR = r >> 3;
    return g;
}

// Shared memory of the tensor-core kernels that cp.async never writes, zeroed (256 threads): Q
// rows h >= nh of sQ [HP, ws] and columns [W, Wp) of the HP Q rows and the `g_rows` rows of sG
// (contiguous after sQ).
__device__ __forceinline__ void tc_zero_pad(bf16_t* sQ, int HP, int nh, int g_rows, int W, int Wp, int ws) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int h = nh + warp; h < HP; h += 8)
        for (int c = lane; c < (Wp >> 1); c += 32) ((u32*)(sQ + h * ws))[c] = 0u;
    if (Wp > W) {
        for (int row = threadIdx.x; row < HP + g_rows; row += 256) {
            bf16_t* rp = sQ + row * ws;
            for (int c = W; c < Wp; ++c) rp[c] = 0;
        }
    }
}

// Q_t = [q_lat_h | q_pe_h] of heads h0 .. h0 + nh into sQ rows (cp.async, one warp per row; the
// caller commits).
__device__ __forceinline__ void tc_load_q(bf16_t* sQ, const bf16_t* q_lat, const bf16_t* q_pe, int t, int heads, int h0,
                                          int nh, int r, int p, int ws) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int CPR = (r + p) >> 3, RCH = r >> 3;  // 16-byte chunks per row, of the q_lat part
    for (int h = warp; h < nh; h += 8) {
        const u64 qrow = (u64)t * heads + h0 + h;
        const bf16_t* ql = q_lat + qrow * r;
        const bf16_t* qp = q_pe + qrow * p;
        const u32 dst = smem_addr(sQ + h * ws);
        for (int c = lane; c < CPR; c += 32) cp_async16(dst + c * 16, c < RCH ? ql + c * 8 : qp + (c - RCH) * 8, 16);
    }
}

// O += P . G[:, :r] for one k16 step `kk` of a tile (mla_tc, mla_dec): warp w owns the n8 column
// tiles w, w+8, ... (NTW of them, so r <= 64 * NTW) for all 16*MT rows; A = P via ldmatrix (pa:
// this lane's row address in sP, row stride ps), B = G via ldmatrix.trans (rows of G are the k
// index, stride ws).
template <int MT, int NTW>
__device__ __forceinline__ void o_step(float (&o)[MT][NTW][4], u32 pa, int ps, const bf16_t* G, int ws, int kk, int warp,
                                       int lane, int NR) {
    u32 a[MT][4];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) ldsm_x4(pa + (mi * 16 * ps + kk * 16) * 2, a[mi]);
#pragma unroll
    for (int i = 0; i < NTW; i += 2) {
        const int nt0 = warp + 8 * i, nt1 = warp + 8 * (i + 1);
        if (nt0 < NR) {
            const int ntl = (lane < 16 || nt1 >= NR) ? nt0 : nt1;
            u32 x[4];
            ldsm_x4_t(smem_addr(G + (kk * 16 + (lane & 15)) * ws + ntl * 8), x);
            const u32 b0[2] = {x[0], x[1]};
            const u32 b1[2] = {x[2], x[3]};
#pragma unroll
            for (int mi = 0; mi < MT; ++mi) mma_bf16(o[mi][i], a[mi], b0);
            if (nt1 < NR) {
#pragma unroll
                for (int mi = 0; mi < MT; ++mi) mma_bf16(o[mi][i + 1], a[mi], b1);
            }
        }
    }
}

// The attention kernels' epilogue: head rows h < nh of the accumulators (layout of o_step) with
// their softmax max (natural log) / sum in sML[h] / sML[HP + h]. One split: the normalised row to
// `out` (bf16); else the unnormalised partial and (m, l) to the split-k workspace.
template <int MT, int NTW>
__device__ __forceinline__ void tc_store(const float (&o)[MT][NTW][4], const float* sML, int HP, int nh, bf16_t* out,
                                         float* ws_o, float* ws_ml, int t, int heads, int h0, int r, int split,
                                         int splits, int warp, int lane, int NR) {
    const int g = lane >> 2, tg = lane & 3;
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int h = mi * 16 + g + 8 * hh;
            if (h >= nh) continue;
            const float l = sML[HP + h];
            if (splits == 1) {
                const float inv = l > 0.0f ? 1.0f / l : 0.0f;
                bf16_t* orow = out + ((u64)t * heads + h0 + h) * r;
#pragma unroll
                for (int i = 0; i < NTW; ++i) {
                    const int nt = warp + 8 * i;
                    if (nt < NR)
                        *(u32*)&orow[nt * 8 + 2 * tg] =
                            pack_bf16x2(o[mi][i][2 * hh] * inv, o[mi][i][2 * hh + 1] * inv);
                }
            } else {
                const u64 wrow = ((u64)t * splits + split) * heads + h0 + h;
                float* orow = ws_o + wrow * r;
#pragma unroll
                for (int i = 0; i < NTW; ++i) {
                    const int nt = warp + 8 * i;
                    if (nt < NR) *(mla_f2*)&orow[nt * 8 + 2 * tg] = mla_f2{o[mi][i][2 * hh], o[mi][i][2 * hh + 1]};
                }
                if (warp == 0 && tg == 0) {
                    ws_ml[wrow * 2] = sML[h];
                    ws_ml[wrow * 2 + 1] = l;
                }
            }
        }
}

template <int MT>
struct TcCfg {
    static constexpr int HP = 16 * MT;
    static constexpr int NT = (MT == 4) ? 32 : 64;  // keys per tile
    static constexpr int STAGES = 2;
    static constexpr int KS = 4;                    // K-splits of the S phase
    static constexpr int WMT = (MT >= 2) ? 2 : 1;   // m16 tiles per S warp block
    static constexpr int TPR = 256 / HP;            // softmax threads per head row
    static constexpr int KPT = NT / TPR;            // keys per softmax thread (multiple of 4)
    static constexpr int NTW = 8;                   // O column tiles per warp (r <= 512)
    static constexpr int SS = NT + 8;               // sS row stride (f32)
    static constexpr int PS = NT + 8;               // sP row stride (bf16)
};

template <int MT>
__device__ __forceinline__ void mla_tc(const bf16_t* __restrict__ q_lat, const bf16_t* __restrict__ q_pe,
                                       const bf16_t* __restrict__ cache, const int* __restrict__ sel,
                                       bf16_t* __restrict__ out, float* __restrict__ ws_o,
                                       float* __restrict__ ws_ml, int heads, int r, int p, int k, float scale,
                                       int split_len, int splits, unsigned char* smem) {
    typedef TcCfg<MT> C;
    constexpr int HP = C::HP, NT = C::NT, STAGES = C::STAGES, KS = C::KS, WMT = C::WMT, TPR = C::TPR,
                  KPT = C::KPT, NTW = C::NTW, SS = C::SS, PS = C::PS;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const TcGeom g0 = tc_geom(HP, heads, r, p);
    const int t = g0.t, h0 = g0.h0, nh = g0.nh, split = g0.split, W = g0.W, Wp = g0.Wp, WS = g0.WS,
              CPR = g0.CPR, KSTEPS = g0.KSTEPS, NR = g0.NR;
    const int jb = imin(k, split * split_len);
    const int je = imin(k, jb + split_len);
    const int* sel_row = sel + (u64)t * k;

    bf16_t* sQ = (bf16_t*)smem;
    bf16_t* sG = sQ + HP * WS;
    float* sS = (float*)(sG + STAGES * NT * WS);
    bf16_t* sP = (bf16_t*)(sS + KS * HP * SS);
    float* sCorr = (float*)(sP + HP * PS);
    float* sML = sCorr + HP;
    int* red = (int*)(sML + 2 * HP);

    const int n_end = valid_end(sel_row, jb, je, red);
    const int ntiles = (n_end - jb + NT - 1) / NT;

    // Zero what cp.async never writes: Q rows >= nh, and columns [W, Wp) of every Q / G row.
    tc_zero_pad(sQ, HP, nh, STAGES * NT, W, Wp, WS);
    // Q rows via cp.async (joins the first commit group).
    tc_load_q(sQ, q_lat, q_pe, t, heads, h0, nh, r, p, WS);

    // Gather tile `it` (entries jb + it*NT ..) into stage `st`: one warp per row, lanes over chunks.
    auto load_tile = [&](int it, int st) {
        const int j0 = jb + it * NT;
        bf16_t* base = sG + st * NT * WS;
        int idx[NT / 8];  // all index loads first, so their latencies overlap
#pragma unroll
        for (int i = 0; i < NT / 8; ++i) {
            const int j = j0 + warp + 8 * i;
            idx[i] = j < n_end ? sel_row[j] : -1;
        }
#pragma unroll
        for (int i = 0; i < NT / 8; ++i) {
            const bf16_t* src = cache + (u64)(idx[i] < 0 ? 0 : idx[i]) * W;
            const int bytes = idx[i] < 0 ? 0 : 16;
            const u32 dst = smem_addr(base + (warp + 8 * i) * WS);
            for (int c = lane; c < CPR; c += 32) cp_async16(dst + c * 16, src + c * 8, bytes);
        }
    };

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ntiles) load_tile(s, s);
        cp_async_commit();
    }

    const float sl2 = scale * 1.4426950408889634f;  // logits in log2 units
    const int srow = tid / TPR, sq = tid % TPR;     // this thread's softmax row / slot
    float m_run = neg_inf(), l_run = 0.0f;

    float o[MT][NTW][4];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int i = 0; i < NTW; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mi][i][e] = 0.0f;

    const int g = lane >> 2, tg = lane & 3;

    for (int it = 0; it < ntiles; ++it) {
        const int st = it % STAGES;
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // (A) tile `it` landed for all threads; everyone is done with tile it-1
        {
            const int nx = it + STAGES - 1;
            if (nx < ntiles) load_tile(nx, nx % STAGES);
            cp_async_commit();
        }
        const bf16_t* G = sG + st * NT * WS;

        // Validity of this thread's softmax entries, loaded now so the latency hides under the S phase.
        u32 okmask = 0;
        {
            const int j0 = jb + it * NT;
#pragma unroll
            for (int u = 0; u < KPT / 4; ++u)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int j = j0 + 4 * sq + 4 * TPR * u + e;
                    if (j < n_end && sel_row[j] >= 0) okmask |= 1u << (4 * u + e);
                }
        }

        // ---- S phase ----
        {
            const int ks = warp >> 1, wt = warp & 1;
            const int m0 = (MT == 4) ? wt * 32 : 0;
            const int n0 = (MT == 4) ? 0 : wt * 32;
            const int per = (KSTEPS + KS - 1) / KS;
            const int kb = ks * per, ke = imin(KSTEPS, kb + per);
            float sacc[WMT][4][4];
#pragma unroll
            for (int mi = 0; mi < WMT; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                    for (int e = 0; e < 4; ++e) sacc[mi][ni][e] = 0.0f;
            const u32 qa = smem_addr(sQ + (m0 + (lane & 15)) * WS + (lane >> 4) * 8);
            const u32 ga = smem_addr(G + (n0 + (lane & 7) + ((lane >> 4) << 3)) * WS + ((lane >> 3) & 1) * 8);
            for (int kk = kb; kk < ke; ++kk) {
                u32 a[WMT][4];
#pragma unroll
                for (int mi = 0; mi < WMT; ++mi) ldsm_x4(qa + (mi * 16 * WS + kk * 16) * 2, a[mi]);
                u32 b[4][2];
#pragma unroll
                for (int nj = 0; nj < 2; ++nj) {
                    u32 x[4];
                    ldsm_x4(ga + (nj * 16 * WS + kk * 16) * 2, x);
                    b[2 * nj][0] = x[0];
                    b[2 * nj][1] = x[1];
                    b[2 * nj + 1][0] = x[2];
                    b[2 * nj + 1][1] = x[3];
                }
#pragma unroll
                for (int mi = 0; mi < WMT; ++mi)
#pragma unroll
                    for (int ni = 0; ni < 4; ++ni) mma_bf16(sacc[mi][ni], a[mi], b[ni]);
            }
            float* S = sS + ks * HP * SS;
#pragma unroll
            for (int mi = 0; mi < WMT; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) {
                    const int row = m0 + mi * 16 + g, col = n0 + ni * 8 + 2 * tg;
                    *(mla_f2*)&S[row * SS + col] = mla_f2{sacc[mi][ni][0], sacc[mi][ni][1]};
                    *(mla_f2*)&S[(row + 8) * SS + col] = mla_f2{sacc[mi][ni][2], sacc[mi][ni][3]};
                }
        }
        __syncthreads();  // (B) partial logits complete

        // ---- online softmax (log2 domain) ----
        {
            float x[KPT];
#pragma unroll
            for (int u = 0; u < KPT / 4; ++u) {
                const int jj = 4 * sq + 4 * TPR * u;
                mla_f4 v = *(const mla_f4*)&sS[srow * SS + jj];
#pragma unroll
                for (int ks = 1; ks < KS; ++ks) {
                    const mla_f4 w = *(const mla_f4*)&sS[(ks * HP + srow) * SS + jj];
                    v.x += w.x;
                    v.y += w.y;
                    v.z += w.z;
                    v.w += w.w;
                }
                const float vv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                for (int e = 0; e < 4; ++e) x[4 * u + e] = (okmask >> (4 * u + e)) & 1u ? vv[e] * sl2 : neg_inf();
            }
            float mx = x[0];
#pragma unroll
            for (int i = 1; i < KPT; ++i) mx = fmaxf(mx, x[i]);
#pragma unroll
            for (int off = TPR / 2; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
            const float m_new = fmaxf(m_run, mx);
            float corr = 1.0f, sum = 0.0f;
            if (m_new != neg_inf()) {
                corr = exp2f(m_run - m_new);
#pragma unroll
                for (int i = 0; i < KPT; ++i) {
                    x[i] = exp2f(x[i] - m_new);
                    sum += x[i];
                }
            } else {
#pragma unroll
                for (int i = 0; i < KPT; ++i) x[i] = 0.0f;
            }
#pragma unroll
            for (int off = TPR / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
            l_run = l_run * corr + sum;
            m_run = m_new;
#pragma unroll
            for (int u = 0; u < KPT / 4; ++u) {
                const int jj = 4 * sq + 4 * TPR * u;
                *(mla_u2*)&sP[srow * PS + jj] =
                    mla_u2{pack_bf16x2(x[4 * u], x[4 * u + 1]), pack_bf16x2(x[4 * u + 2], x[4 * u + 3])};
            }
            if (sq == 0) sCorr[srow] = corr;
        }
        __syncthreads();  // (C) P and the rescale factors are complete

        // ---- O phase ----
        {
#pragma unroll
            for (int mi = 0; mi < MT; ++mi) {
                const float c0 = sCorr[mi * 16 + g], c1 = sCorr[mi * 16 + g + 8];
#pragma unroll
                for (int i = 0; i < NTW; ++i) {
                    o[mi][i][0] *= c0;
                    o[mi][i][1] *= c0;
                    o[mi][i][2] *= c1;
                    o[mi][i][3] *= c1;
                }
            }
            const u32 pa = smem_addr(sP + (lane & 15) * PS + (lane >> 4) * 8);
#pragma unroll
            for (int kk = 0; kk < NT / 16; ++kk) o_step<MT, NTW>(o, pa, PS, G, WS, kk, warp, lane, NR);
        }
    }
    cp_async_wait<0>();

    // ---- epilogue ----
    if (sq == 0) {
        sML[srow] = m_run * 0.6931471805599453f;  // natural-log units
        sML[HP + srow] = l_run;
    }
    __syncthreads();
    tc_store<MT, NTW>(o, sML, HP, nh, out, ws_o, ws_ml, t, heads, h0, r, split, splits, warp, lane, NR);
}

extern "C" __global__ void __launch_bounds__(256, 1)
    mla_tc_m1(const bf16_t* q_lat, const bf16_t* q_pe, const bf16_t* cache, const int* sel, bf16_t* out,
              float* ws_o, float* ws_ml, int heads, int r, int p, int k, float scale, int split_len, int splits) {
    PDL_ENTRY();
    mla_tc<1>(q_lat, q_pe, cache, sel, out, ws_o, ws_ml, heads, r, p, k, scale, split_len, splits, MLA_SMEM);
}

extern "C" __global__ void __launch_bounds__(256, 1)
    mla_tc_m2(const bf16_t* q_lat, const bf16_t* q_pe, const bf16_t* cache, const int* sel, bf16_t* out,
              float* ws_o, float* ws_ml, int heads, int r, int p, int k, float scale, int split_len, int splits) {
    PDL_ENTRY();
    mla_tc<2>(q_lat, q_pe, cache, sel, out, ws_o, ws_ml, heads, r, p, k, scale, split_len, splits, MLA_SMEM);
}

extern "C" __global__ void __launch_bounds__(256, 1)
    mla_tc_m4(const bf16_t* q_lat, const bf16_t* q_pe, const bf16_t* cache, const int* sel, bf16_t* out,
              float* ws_o, float* ws_ml, int heads, int r, int p, int k, float scale, int split_len, int splits) {
    PDL_ENTRY();
    mla_tc<4>(q_lat, q_pe, cache, sel, out, ws_o, ws_ml, heads, r, p, k, scale, split_len, splits, MLA_SMEM);
}

// =============================================================================================
// Decode path (bf16, tensor cores): one tile of DEC_NT selected entries per CTA, nothing else.
//
// At decode a row's k entries are split across many CTAs (split_len == DEC_NT, the host's plan),
// so each CTA runs one tile: the prefill kernel's double buffering, online-softmax rescaling and
// loop bookkeeping are pure latency there. CTA = (row t, head group of HP = 16*MT heads, split),
// 8 warps, two CTAs per SM. Shared memory (WS as in mla_tc):
//   sQ [HP, WS] bf16 | sG [DEC_NT, WS] bf16 | sS [64, SS] f32 (K-split partial logits) |
//   sP [HP, PS] bf16 | sML [2, HP] f32 | sOk [DEC_NT] int
// Steps: Q and the tile's rows land with cp.async (invalid entries zero-filled, flagged in sOk);
//   S = Q . G^T, warp w = (k-split, m16 tile, n16 half): 4 / MT k-splits, summed in split order;
//   softmax of the tile per head (max, exp2, sum in f32; P rounded to bf16);
//   O = P . G[:, :r], warp w owns the n8 column tiles w, w+8, ... for all HP rows (as mla_tc);
//   epilogue as mla_tc: split-k partials (O, m, l) or, with one split, the normalised row.
// Same semantics as mla_tc with one tile per split; the partial sums run in another order.
// =============================================================================================
#define DEC_NT 32
#define DEC_SS (DEC_NT + 8)  // sS row stride (f32)
#define DEC_PS (DEC_NT + 8)  // sP row stride (bf16): 80-byte rows, ldmatrix conflict-free

template <int MT>
__device__ __forceinline__ void mla_dec(const bf16_t* __restrict__ q_lat, const bf16_t* __restrict__ q_pe,
                                        const bf16_t* __restrict__ cache, const int* __restrict__ sel,
                                        bf16_t* __restrict__ out, float* __restrict__ ws_o,
                                        float* __restrict__ ws_ml, int heads, int r, int p, int k, float scale,
                                        int split_len, int splits, unsigned char* smem) {
    constexpr int HP = 16 * MT, NT = DEC_NT, SS = DEC_SS, PS = DEC_PS, NTW = 8;
    constexpr int KS = 4 / MT;         // k-splits of the S phase: 8 warps = KS x MT x 2
    constexpr int TPR = 256 / HP;      // softmax threads per head row
    constexpr int KPT = NT / TPR;      // entries per softmax thread
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const TcGeom g0 = tc_geom(HP, heads, r, p);
    const int t = g0.t, h0 = g0.h0, nh = g0.nh, split = g0.split, W = g0.W, Wp = g0.Wp, WS = g0.WS,
              CPR = g0.CPR, KSTEPS = g0.KSTEPS, NR = g0.NR;
    const int jb = split * split_len;
    const int je = imin(k, jb + imin(split_len, NT));
    const int* sel_row = sel + (u64)t * k;

    bf16_t* sQ = (bf16_t*)smem;
    bf16_t* sG = sQ + HP * WS;
    float* sS = (float*)(sG + NT * WS);
    bf16_t* sP = (bf16_t*)(sS + 64 * SS);
    float* sML = (float*)(sP + HP * PS);
    int* sOk = (int*)(sML + 2 * HP);

    // Shared memory only, before the wait: zero Q rows >= nh and the K padding [W, Wp).
    tc_zero_pad(sQ, HP, nh, NT, W, Wp, WS);
    PDL_ENTRY();

    int idx[NT / 8];  // entry warp + 8 i of the tile; index loads first, so their latencies overlap
#pragma unroll
    for (int i = 0; i < NT / 8; ++i) {
        const int j = jb + warp + 8 * i;
        idx[i] = j < je ? sel_row[j] : -1;
    }
    tc_load_q(sQ, q_lat, q_pe, t, heads, h0, nh, r, p, WS);
#pragma unroll
    for (int i = 0; i < NT / 8; ++i) {
        const int e = warp + 8 * i;
        const bf16_t* src = cache + (u64)(idx[i] < 0 ? 0 : idx[i]) * W;
        const int bytes = idx[i] < 0 ? 0 : 16;
        const u32 dst = smem_addr(sG + e * WS);
        for (int c = lane; c < CPR; c += 32) cp_async16(dst + c * 16, src + c * 8, bytes);
        if (lane == 0) sOk[e] = idx[i] >= 0;
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    const int g = lane >> 2, tg = lane & 3;
    // ---- S phase: warp = (k-split ks, m16 tile mi, n16 half nj) ----
    {
        const int ks = warp / (2 * MT), mi = (warp >> 1) % MT, nj = warp & 1;
        const int per = (KSTEPS + KS - 1) / KS;
        const int kb = ks * per, ke = imin(KSTEPS, kb + per);
        float acc[2][4];
#pragma unroll
        for (int ni = 0; ni < 2; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[ni][e] = 0.0f;
        const u32 qa = smem_addr(sQ + (mi * 16 + (lane & 15)) * WS + (lane >> 4) * 8);
        const u32 ga = smem_addr(sG + (nj * 16 + (lane & 7) + ((lane >> 4) << 3)) * WS + ((lane >> 3) & 1) * 8);
        for (int kk = kb; kk < ke; ++kk) {
            u32 a[4], x[4];
            ldsm_x4(qa + kk * 32, a);
            ldsm_x4(ga + kk * 32, x);
            const u32 b0[2] = {x[0], x[1]};
            const u32 b1[2] = {x[2], x[3]};
            mma_bf16(acc[0], a, b0);
            mma_bf16(acc[1], a, b1);
        }
        float* S = sS + ks * HP * SS;
#pragma unroll
        for (int ni = 0; ni < 2; ++ni) {
            const int row = mi * 16 + g, col = nj * 16 + ni * 8 + 2 * tg;
            *(mla_f2*)&S[row * SS + col] = mla_f2{acc[ni][0], acc[ni][1]};
            *(mla_f2*)&S[(row + 8) * SS + col] = mla_f2{acc[ni][2], acc[ni][3]};
        }
    }
    __syncthreads();

    // ---- softmax of the tile (log2 domain), TPR threads per head row ----
    {
        const int srow = tid / TPR, sq = tid % TPR;
        const float sl2 = scale * 1.4426950408889634f;
        float x[KPT];
#pragma unroll
        for (int e = 0; e < KPT; ++e) {
            const int j = sq * KPT + e;
            float v = sS[srow * SS + j];
#pragma unroll
            for (int ks = 1; ks < KS; ++ks) v += sS[(ks * HP + srow) * SS + j];
            x[e] = sOk[j] ? v * sl2 : neg_inf();
        }
        float mx = x[0];
#pragma unroll
        for (int e = 1; e < KPT; ++e) mx = fmaxf(mx, x[e]);
#pragma unroll
        for (int off = TPR / 2; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        float sum = 0.0f;
#pragma unroll
        for (int e = 0; e < KPT; ++e) {
            x[e] = mx == neg_inf() ? 0.0f : exp2f(x[e] - mx);
            sum += x[e];
        }
#pragma unroll
        for (int off = TPR / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
#pragma unroll
        for (int e = 0; e < KPT; e += 2) *(u32*)&sP[srow * PS + sq * KPT + e] = pack_bf16x2(x[e], x[e + 1]);
        if (sq == 0) {
            sML[srow] = mx * 0.6931471805599453f;  // natural-log units
            sML[HP + srow] = sum;
        }
    }
    __syncthreads();

    // ---- O phase ----
    float o[MT][NTW][4];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int i = 0; i < NTW; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mi][i][e] = 0.0f;
    const u32 pa = smem_addr(sP + (lane & 15) * PS + (lane >> 4) * 8);
#pragma unroll
    for (int kk = 0; kk < NT / 16; ++kk) o_step<MT, NTW>(o, pa, PS, sG, WS, kk, warp, lane, NR);

    tc_store<MT, NTW>(o, sML, HP, nh, out, ws_o, ws_ml, t, heads, h0, r, split, splits, warp, lane, NR);
}

extern "C" __global__ void __launch_bounds__(256, 2)
    mla_dec_m1(const bf16_t* q_lat, const bf16_t* q_pe, const bf16_t* cache, const int* sel, bf16_t* out,
               float* ws_o, float* ws_ml, int heads, int r, int p, int k, float scale, int split_len, int splits) {
    mla_dec<1>(q_lat, q_pe, cache, sel, out, ws_o, ws_ml, heads, r, p, k, scale, split_len, splits, MLA_SMEM);
}

extern "C" __global__ void __launch_bounds__(256, 2)
    mla_dec_m2(const bf16_t* q_lat, const bf16_t* q_pe, const bf16_t* cache, const int* sel, bf16_t* out,
               float* ws_o, float* ws_ml, int heads, int r, int p, int k, float scale, int split_len, int splits) {
    mla_dec<2>(q_lat, q_pe, cache, sel, out, ws_o, ws_ml, heads, r, p, k, scale, split_len, splits, MLA_SMEM);
}

// =============================================================================================
// Split-k combine. Grid (rows, heads, column chunks), 128 threads; dynamic shared memory: `splits`
// floats. Every CTA of a (row, head) computes the same split weights (a few loads) for its columns.
// =============================================================================================
template <typename T>
__device__ __forceinline__ void mla_combine(const float* __restrict__ ws_o, const float* __restrict__ ws_ml,
                                            T* __restrict__ out, int heads, int r, int splits, float* sw) {
    // The weights of all splits in parallel (block max, then block sum: combine.cuh), not in one
    // thread: the (m, l) loads of the splits are independent, and a serial loop waits on each in turn.
    __shared__ float red[32];
    const int t = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
    const u64 base = (u64)t * splits * heads + h;  // entry (t, s, h) = base + s * heads
    // A thread's first column of partial outputs, loaded before the reductions below (they do not
    // depend on them): the loads' latency overlaps the weights' computation.
    constexpr int COMBINE_PRE = 32;
    const int c_first = blockIdx.z * blockDim.x + tid;
    const bool pre = splits <= COMBINE_PRE && c_first < r;
    float pv[COMBINE_PRE];
#pragma unroll
    for (int u = 0; u < COMBINE_PRE; ++u) pv[u] = pre && u < splits ? ws_o[(base + (u64)u * heads) * r + c_first] : 0.0f;
    const float inv = combine_weights(ws_ml, base, heads, splits, sw, red, blockDim.x);
    for (int c = blockIdx.z * blockDim.x + tid; c < r; c += gridDim.z * blockDim.x) {
        // Splits in order (combine.cuh); the thread's first column from its preloaded values.
        float acc = 0.0f;
        int s = 0;
        if (pre && c == c_first) {
#pragma unroll
            for (int u = 0; u < COMBINE_PRE; ++u) {
                if (u < splits) {
                    const float w = sw[u];
                    if (w != 0.0f) acc = fmaf(w, pv[u], acc);
                }
            }
            s = splits;
        }
        acc = combine_col<32>(ws_o, base, heads, r, splits, sw, c, s, acc);
        st_val(out + ((u64)t * heads + h) * r + c, acc * inv);
    }
}

extern "C" __global__ void mla_combine_f32(const float* ws_o, const float* ws_ml, float* out, int heads, int r,
                                           int splits) {
    PDL_ENTRY();
    mla_combine<float>(ws_o, ws_ml, out, heads, r, splits, (float*)MLA_SMEM);
}

extern "C" __global__ void mla_combine_bf16(const float* ws_o, const float* ws_ml, bf16_t* out, int heads, int r,
                                            int splits) {
    PDL_ENTRY();
    mla_combine<bf16_t>(ws_o, ws_ml, out, heads, r, splits, (float*)MLA_SMEM);
}
