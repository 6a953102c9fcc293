// Exact top-k of score rows: row t of `scores` ([rows, stride] f32) has n = pos[t] + 1 valid entries;
// out ([rows, K] i32) gets the positions of its min(topk, n) largest scores, ties to the lower
// position, NaN ranked with -inf, -1 padded. The selected positions come out in ascending order, so
// the result is deterministic (bit for bit) and neighbouring queries gather the cache in order.
//
// The order is a total order on one 50-bit composite key per element,
//     C = order_key(score) << 18 | (2^18 - 1 - position)      (larger C ranks first),
// where order_key maps f32 to u32 monotonically (f32::total_cmp order, NaN -> key of -inf), so the
// top-k is the set of the k largest C: unique, with no ties left to break. Positions need 18 bits,
// so rows hold at most 262,144 keys.
//
// Radix select on C, most significant digit first, five levels of 11/11/10/9/9 bits (the last two
// only matter when exact score ties straddle the cut). Each level histograms the digit of the elements
// that match the prefix chosen so far (shared-memory bins; lanes of a warp hitting the same bin are
// merged with match.any first, so a row of equal scores does not serialise on one bin), then picks
// the bin holding the k-th element counted from the top. The selection ends at the first level whose
// chosen bin is taken whole (cnt == k still needed): the answer is then "C's prefix >= P".
//
// The selected set is built as a bitmap of positions in shared memory (32 KiB for 262,144 keys) and
// emitted in position order with one block-wide scan of popcounts, so no step depends on the order in
// which threads or blocks run.
//
// Kernels:
// * topk_rows: one CTA per row. Pass 1 reads the row and histograms level 0. As soon as the elements
//   matching the prefix fit in shared memory (<= TK_CAP; short rows start there), one more pass over
//   the row marks the elements above the prefix and copies the matching ones ("candidates") to shared
//   memory; the remaining levels run there. Typically 2 reads of the row, ~3 when the top 11 bits of
//   the scores hardly vary. Global traffic: 4 bytes x n x passes per row, plus 4 x K written.
// * topk_seg_hist / topk_seg_collect / topk_seg_finish: the same for a few long rows (decode), with
//   the two passes over the row spread over many CTAs (segments): level-0 histograms are summed with
//   global atomics; the collect step marks a global bitmap and appends candidates to a global list
//   (its order varies from run to run, nothing computed from it depends on that order); the finish
//   kernel (one CTA per row) resolves the remaining levels over the candidates and emits.

#define FULL 0xffffffffu
#define TK_THREADS 512
#define TK_WARPS (TK_THREADS / 32)
#define TK_BINS 2048                 // widest level (11 bits)
#define TK_CAP 8192                  // candidates kept in shared memory
#define TK_POS_BITS 18
#define TK_MAX_POS ((1u << TK_POS_BITS) - 1)
#define TK_BITMAP_WORDS ((1 << TK_POS_BITS) / 32)  // 8192
#define TK_LEVELS 5

struct TkSel {
    unsigned hist[TK_BINS];
    unsigned scan[32];
    unsigned res[4];
};

// Dynamic shared memory of topk_rows / topk_seg_finish (the host passes sizeof(TkSmem) = 106,656 bytes).
struct TkSmem {
    TkSel sel;
    unsigned cand_n;
    unsigned pad[3];
    unsigned bitmap[TK_BITMAP_WORDS];
    unsigned cand_key[TK_CAP];
    int cand_pos[TK_CAP];
};

// Monotone f32 -> u32 (f32::total_cmp order), NaN ranked with -inf as the CPU's select_topk does.
__device__ __forceinline__ unsigned order_key(float f) {
    if (f != f) return 0x007fffffu;  // order_key(-inf)
    const unsigned u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ unsigned long long comp_key(unsigned key, int p) {
    return ((unsigned long long)key << TK_POS_BITS) | (unsigned long long)(TK_MAX_POS - (unsigned)p);
}

// Bits of C below level l's digit; level -1 (no digit yet) matches everything (C >> 63 == 0).
__device__ __forceinline__ int lvl_shift(int l) {
    return l < 0 ? 63 : (l == 0 ? 39 : (l == 1 ? 28 : (l == 2 ? 18 : (l == 3 ? 9 : 0))));
}
__device__ __forceinline__ int lvl_bits(int l) { return l <= 1 ? 11 : (l == 2 ? 10 : 9); }

// Selection state: `level` digits resolved; the elements whose C >> lvl_shift(level - 1) equals P
// number `cnt`, and the k_rem largest of them are still to be taken (all above P are taken).
struct Sel {
    int level;
    unsigned long long P;
    unsigned k_rem;
    unsigned cnt;
};

__device__ __forceinline__ void zero_sel(Sel& st, unsigned topk, unsigned n) {
    st.level = 0;
    st.P = 0ull;
    st.k_rem = topk;
    st.cnt = n;
}

// Exclusive prefix sum over the block (blockDim.x == TK_THREADS); `total` gets the block sum.
__device__ __forceinline__ unsigned block_excl_scan(unsigned v, unsigned* scan, unsigned* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned y = __shfl_up_sync(FULL, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) scan[warp] = x;
    __syncthreads();
    if (warp == 0) {
        unsigned s = lane < TK_WARPS ? scan[lane] : 0u;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const unsigned y = __shfl_up_sync(FULL, s, o);
            if (lane >= o) s += y;
        }
        if (lane < TK_WARPS) scan[lane] = s;
    }
    __syncthreads();
    const unsigned before = warp ? scan[warp - 1] : 0u;
    *total = scan[TK_WARPS - 1];
    __syncthreads();
    return before + x - v;
}

// hist[bin] += 1 for the lanes with ok; every lane of the warp must call it.
__device__ __forceinline__ void hist_add(unsigned* hist, unsigned bin, bool ok) {
    const unsigned peers = __match_any_sync(FULL, ok ? bin : 0xffffffffu);
    if (ok && (int)(threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&hist[bin], (unsigned)__popc(peers));
}

// Picks the bin of s.hist (2^bits bins) that holds the k_rem-th element counted from the top and
// advances the state by one level. Starts and ends with all threads past their reads of s.hist.
__device__ void choose_bin(TkSel& s, int bits, Sel& st) {
    const int nbins = 1 << bits;
    const int per = nbins / TK_THREADS;  // 4, 2 or 1: thread i holds bins from the top down
    unsigned local = 0;
    for (int j = 0; j < per; ++j) local += s.hist[nbins - 1 - (threadIdx.x * per + j)];
    unsigned total;
    unsigned above = block_excl_scan(local, s.scan, &total);
    for (int j = 0; j < per; ++j) {
        const int b = nbins - 1 - (threadIdx.x * per + j);
        const unsigned h = s.hist[b];
        if (above < st.k_rem && st.k_rem <= above + h) {  // exactly one bin qualifies
            s.res[0] = (unsigned)b;
            s.res[1] = above;
            s.res[2] = h;
        }
        above += h;
    }
    __syncthreads();
    st.P = (st.P << bits) | s.res[0];
    st.k_rem -= s.res[1];
    st.cnt = s.res[2];
    st.level += 1;
    __syncthreads();
}

// f(key, pos, ok) for the scores [begin, end) of one row (begin a multiple of 4; the row is padded to a
// multiple of 4 floats). All threads call f the same number of times (ok = false past the end).
template <typename F>
__device__ __forceinline__ void row_foreach(const float* __restrict__ row, int begin, int end, F&& f) {
    const int step = blockDim.x * 16;
    for (int base = begin; base < end; base += step) {
        float4 v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int i = base + (u * blockDim.x + threadIdx.x) * 4;
            v[u] = i < end ? *reinterpret_cast<const float4*>(row + i) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int i = base + (u * blockDim.x + threadIdx.x) * 4;
            f(order_key(v[u].x), i, i < end);
            f(order_key(v[u].y), i + 1, i + 1 < end);
            f(order_key(v[u].z), i + 2, i + 2 < end);
            f(order_key(v[u].w), i + 3, i + 3 < end);
        }
    }
}

// f(key, pos, ok) over a candidate list (shared or global memory), warp-converged like row_foreach.
template <typename F>
__device__ __forceinline__ void cand_foreach(const unsigned* key, const int* pos, int m, F&& f) {
    for (int base = 0; base < m; base += blockDim.x) {
        const int i = base + threadIdx.x;
        const bool ok = i < m;
        f(ok ? key[i] : 0u, ok ? pos[i] : 0, ok);
    }
}

// One level: histogram the next digit of the elements matching st.P, then choose its bin.
template <typename Each>
__device__ void level_hist(TkSel& s, Sel& st, Each&& each) {
    const int l = st.level, sh = lvl_shift(l), bits = lvl_bits(l), msh = lvl_shift(l - 1);
    const unsigned mask = (1u << bits) - 1u;
    for (int i = threadIdx.x; i < (1 << bits); i += blockDim.x) s.hist[i] = 0u;
    __syncthreads();
    const unsigned long long P = st.P;
    if (l == 0) {  // no prefix yet: the digit is the top 11 bits of the score key
        each([&](unsigned key, int, bool ok) { hist_add(s.hist, key >> 21, ok); });
    } else {
        each([&](unsigned key, int p, bool ok) {
            const unsigned long long c = comp_key(key, p);
            hist_add(s.hist, (unsigned)(c >> sh) & mask, ok && (c >> msh) == P);
        });
    }
    __syncthreads();
    choose_bin(s, bits, st);
}

__device__ __forceinline__ void mark(unsigned* bitmap, int p) { atomicOr(&bitmap[p >> 5], 1u << (p & 31)); }

// Final step (st.cnt == st.k_rem): every element whose prefix is >= st.P is selected.
template <typename Each>
__device__ void mark_selected(unsigned* bitmap, const Sel& st, Each&& each) {
    const int msh = lvl_shift(st.level - 1);
    const unsigned long long P = st.P;
    each([&](unsigned key, int p, bool ok) {
        if (ok && (comp_key(key, p) >> msh) >= P) mark(bitmap, p);
    });
}

// Marks the elements above st.P and appends those equal to it to (ckey, cpos) at *cand_n.
template <typename Each>
__device__ void collect(unsigned* bitmap, unsigned* ckey, int* cpos, unsigned* cand_n, const Sel& st, Each&& each) {
    const int msh = lvl_shift(st.level - 1);
    const unsigned long long P = st.P;
    const int lane = threadIdx.x & 31;
    each([&](unsigned key, int p, bool ok) {
        const unsigned long long hi = comp_key(key, p) >> msh;
        if (ok && hi > P) mark(bitmap, p);
        const bool take = ok && hi == P;
        const unsigned b = __ballot_sync(FULL, take);
        if (b) {
            const int leader = __ffs(b) - 1;
            unsigned base = 0;
            if (lane == leader) base = atomicAdd(cand_n, (unsigned)__popc(b));
            base = __shfl_sync(FULL, base, leader);
            if (take) {
                const unsigned j = base + __popc(b & ((1u << lane) - 1u));
                ckey[j] = key;
                cpos[j] = p;
            }
        }
    });
}

// Resolves the remaining levels over a candidate list and marks the selected candidates.
__device__ void finish_cands(TkSmem& sm, Sel& st, const unsigned* ck, const int* cp, int m) {
    auto each = [&](auto&& f) { cand_foreach(ck, cp, m, f); };
    while (st.cnt != st.k_rem && st.level < TK_LEVELS) level_hist(sm.sel, st, each);
    mark_selected(sm.bitmap, st, each);
}

// Writes the marked positions of the first n bits of the bitmap to out[0..] in ascending order,
// then pads out[..K] with -1.
__device__ void emit_bitmap(TkSmem& sm, int n, int* __restrict__ out, int K) {
    const int words = (n + 31) >> 5;
    const int per = (words + TK_THREADS - 1) / TK_THREADS;
    const int w0 = threadIdx.x * per;
    unsigned c = 0;
    for (int j = 0; j < per; ++j)
        if (w0 + j < words) c += __popc(sm.bitmap[w0 + j]);
    unsigned total;
    unsigned o = block_excl_scan(c, sm.sel.scan, &total);
    for (int j = 0; j < per; ++j) {
        if (w0 + j >= words) break;
        unsigned m = sm.bitmap[w0 + j];
        while (m) {
            const int b = __ffs(m) - 1;
            m &= m - 1u;
            out[o++] = ((w0 + j) << 5) + b;
        }
    }
    for (int i = (int)total + threadIdx.x; i < K; i += blockDim.x) out[i] = -1;
}

__device__ __forceinline__ unsigned dynamic_smem_bytes() {
    unsigned r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}

// Rows with n <= topk keep everything: 0..n, then -1.
__device__ __forceinline__ void emit_all(int n, int* __restrict__ out, int K) {
    for (int i = threadIdx.x; i < K; i += blockDim.x) out[i] = i < n ? i : -1;
}

__device__ __forceinline__ void zero_bitmap(TkSmem& sm, int n) {
    for (int i = threadIdx.x; i < ((n + 31) >> 5); i += blockDim.x) sm.bitmap[i] = 0u;
}

// One CTA (TK_THREADS) per row; dynamic shared memory sizeof(TkSmem).
extern "C" __global__ void __launch_bounds__(TK_THREADS, 2)
    topk_rows(const float* __restrict__ scores, long long stride, const int* __restrict__ pos,
              int* __restrict__ out, int K, int topk) {
    extern __shared__ __align__(16) unsigned char tk_raw[];
    if (dynamic_smem_bytes() < sizeof(TkSmem)) __trap();
    TkSmem& sm = *reinterpret_cast<TkSmem*>(tk_raw);
    const int row = blockIdx.x;
    const int n = pos[row] + 1;
    int* o = out + (long long)row * K;
    if (n <= topk) {
        emit_all(n, o, K);
        return;
    }
    const float* src = scores + (long long)row * stride;
    zero_bitmap(sm, n);
    if (threadIdx.x == 0) sm.cand_n = 0u;
    __syncthreads();
    Sel st;
    zero_sel(st, (unsigned)topk, (unsigned)n);
    auto row_each = [&](auto&& f) { row_foreach(src, 0, n, f); };
    while (st.cnt != st.k_rem && st.cnt > TK_CAP) level_hist(sm.sel, st, row_each);
    if (st.cnt == st.k_rem) {
        mark_selected(sm.bitmap, st, row_each);
    } else {
        collect(sm.bitmap, sm.cand_key, sm.cand_pos, &sm.cand_n, st, row_each);
        __syncthreads();
        finish_cands(sm, st, sm.cand_key, sm.cand_pos, (int)st.cnt);
    }
    __syncthreads();
    emit_bitmap(sm, n, o, K);
}

// ---- segmented path (few long rows) -----------------------------------------------------------
// Workspace per row (zeroed by the host unless noted): ghist [2048] u32, gbitmap [TK_BITMAP_WORDS]
// u32, gcand_n u32, and (not zeroed) gcand_key / gcand_pos [cap] each, cap >= the row's n.
// Grid of the first two: (segments, rows), segment = `seg` elements (a multiple of 16).

extern "C" __global__ void __launch_bounds__(TK_THREADS)
    topk_seg_hist(const float* __restrict__ scores, long long stride, const int* __restrict__ pos, int topk, int seg,
                  unsigned* __restrict__ ghist) {
    __shared__ unsigned hist[TK_BINS];
    const int row = blockIdx.y;
    const int n = pos[row] + 1;
    const int begin = blockIdx.x * seg;
    if (n <= topk || begin >= n) return;
    const int end = min(n, begin + seg);
    for (int i = threadIdx.x; i < TK_BINS; i += blockDim.x) hist[i] = 0u;
    __syncthreads();
    row_foreach(scores + (long long)row * stride, begin, end,
                [&](unsigned key, int, bool ok) { hist_add(hist, key >> 21, ok); });
    __syncthreads();
    for (int i = threadIdx.x; i < TK_BINS; i += blockDim.x)
        if (hist[i]) atomicAdd(&ghist[(long long)row * TK_BINS + i], hist[i]);
}

// Level-0 state of a row from its summed histogram (every CTA of the row computes the same).
__device__ __forceinline__ void seg_level0(TkSel& s, const unsigned* __restrict__ ghist, int row, int topk, int n,
                                           Sel& st) {
    for (int i = threadIdx.x; i < TK_BINS; i += blockDim.x) s.hist[i] = ghist[(long long)row * TK_BINS + i];
    __syncthreads();
    zero_sel(st, (unsigned)topk, (unsigned)n);
    choose_bin(s, lvl_bits(0), st);
}

extern "C" __global__ void __launch_bounds__(TK_THREADS)
    topk_seg_collect(const float* __restrict__ scores, long long stride, const int* __restrict__ pos, int topk,
                     int seg, const unsigned* __restrict__ ghist, unsigned* __restrict__ gbitmap,
                     unsigned* __restrict__ gcand_n, unsigned* __restrict__ gcand_key, int* __restrict__ gcand_pos,
                     long long cap) {
    __shared__ TkSel s;
    const int row = blockIdx.y;
    const int n = pos[row] + 1;
    const int begin = blockIdx.x * seg;
    if (n <= topk || begin >= n) return;
    const int end = min(n, begin + seg);
    Sel st;
    seg_level0(s, ghist, row, topk, n, st);
    collect(gbitmap + (long long)row * TK_BITMAP_WORDS, gcand_key + row * cap, gcand_pos + row * cap, gcand_n + row,
            st, [&](auto&& f) { row_foreach(scores + (long long)row * stride, begin, end, f); });
}

// One CTA per row; dynamic shared memory sizeof(TkSmem).
extern "C" __global__ void __launch_bounds__(TK_THREADS, 2)
    topk_seg_finish(const int* __restrict__ pos, int* __restrict__ out, int K, int topk,
                    const unsigned* __restrict__ ghist, const unsigned* __restrict__ gbitmap,
                    const unsigned* __restrict__ gcand_key, const int* __restrict__ gcand_pos, long long cap) {
    extern __shared__ __align__(16) unsigned char tk_raw[];
    if (dynamic_smem_bytes() < sizeof(TkSmem)) __trap();
    TkSmem& sm = *reinterpret_cast<TkSmem*>(tk_raw);
    const int row = blockIdx.x;
    const int n = pos[row] + 1;
    int* o = out + (long long)row * K;
    if (n <= topk) {
        emit_all(n, o, K);
        return;
    }
    for (int i = threadIdx.x; i < ((n + 31) >> 5); i += blockDim.x)
        sm.bitmap[i] = gbitmap[(long long)row * TK_BITMAP_WORDS + i];
    Sel st;
    seg_level0(sm.sel, ghist, row, topk, n, st);  // syncs: the bitmap copy is complete after it
    const int m = (int)st.cnt;                    // == the row's gcand_n
    const unsigned* ck = gcand_key + row * cap;
    const int* cp = gcand_pos + row * cap;
    if (m <= TK_CAP) {
        for (int i = threadIdx.x; i < m; i += blockDim.x) {
            sm.cand_key[i] = ck[i];
            sm.cand_pos[i] = cp[i];
        }
        __syncthreads();
        ck = sm.cand_key;
        cp = sm.cand_pos;
    }
    finish_cands(sm, st, ck, cp, m);
    __syncthreads();
    emit_bitmap(sm, n, o, K);
}
