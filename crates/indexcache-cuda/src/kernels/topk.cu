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
// * topk_stream: one CTA per row, one read of the row (see the streaming section below); the
//   default for topk <= TS_MAX_K. Same output as topk_rows, bit for bit.
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

// Writes the marked positions of the first n bits of `bitmap` to out[0..] in ascending order,
// then pads out[..K] with -1. `scan`: the block scan's scratch.
__device__ void emit_bits(const unsigned* bitmap, unsigned* scan, int n, int* __restrict__ out, int K) {
    const int words = (n + 31) >> 5;
    const int per = (words + TK_THREADS - 1) / TK_THREADS;
    const int w0 = threadIdx.x * per;
    unsigned c = 0;
    for (int j = 0; j < per; ++j)
        if (w0 + j < words) c += __popc(bitmap[w0 + j]);
    unsigned total;
    unsigned o = block_excl_scan(c, scan, &total);
    for (int j = 0; j < per; ++j) {
        if (w0 + j >= words) break;
        unsigned m = bitmap[w0 + j];
        while (m) {
            const int b = __ffs(m) - 1;
            m &= m - 1u;
            out[o++] = ((w0 + j) << 5) + b;
        }
    }
    for (int i = (int)total + threadIdx.x; i < K; i += blockDim.x) out[i] = -1;
}

__device__ __forceinline__ void emit_bitmap(TkSmem& sm, int n, int* __restrict__ out, int K) {
    emit_bits(sm.bitmap, sm.sel.scan, n, out, K);
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
    PDL_ENTRY();
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

// ---- streaming path (many rows, one read of each) ----------------------------------------------
// topk_stream: one CTA per row, the row read once (4 bytes per element; the old path reads it ~2x).
// The candidates are, at all times, a superset of the row's top-k among the elements seen so far:
// their composite keys C live in shared memory (at most TS_CAP). The row streams through in batches
// of TS_BATCH elements (8 per thread: two 16-byte loads; three batches in flight per thread).
// * Until the first compaction every element is appended. After it, an element is appended iff
//   its score's key exceeds tk, the key part of the threshold thr: one float compare, f >= fge.
//   Elements with key == tk are never needed: they come after every candidate (positions only grow
//   along the stream) and >= topk candidates have C >= thr, i.e. a larger key or the same key at a
//   lower position. So an all-equal row appends nothing after its first compaction.
// * A thread with candidates reserves slots with one shared atomic and stores their C one by one
//   (~k/seen of the elements: a few per warp and batch once thr is good).
// * When a batch leaves less than a batch of room, a compaction raises thr: a radix select over
//   the candidates (11-bit digits starting below the common prefix of thr and the candidates' max,
//   which every thread tracks for the scores it appended, so a smooth distribution resolves in one
//   histogram) finds a prefix P with topk..target candidates at or above it; thr = P << shift, the
//   others are dropped (the survivors are staged in the bitmap's space and copied back).
// * At the end the same select, run to the exact cut, marks the top-k in the position bitmap,
//   which is emitted in order as in topk_rows.
// Nothing depends on the order in which threads append (thresholds and the result are functions of
// the candidate *set*), so the output is deterministic, and equal to topk_rows' bit for bit.
// Cost on a random row: appends ~2*TS_CAP + k*ln(n/TS_CAP); compactions ~log2(n/TS_CAP) + 1, each
// ~2 passes over <= TS_CAP shared-memory keys. Rising scores (each batch beats the last) compact
// after every batch: still one read, ~3x the instructions. topk <= TS_MAX_K (the host takes
// topk_rows otherwise).

#define TS_PER 8                           // floats per thread per batch
#define TS_BATCH (TK_THREADS * TS_PER)     // 4096
#define TS_CAP 8192                        // candidates in shared memory
#define TS_STAGE 4096                      // compaction staging (aliases the bitmap)
#define TS_MAX_K (TS_CAP - TS_BATCH)       // 4096: a compaction always leaves a batch of room
#define TS_NEG_INF_KEY 0x007fffffu         // order_key(-inf) == order_key(NaN)

// Dynamic shared memory of topk_stream (the host passes sizeof(TsSmem) = 106,720 bytes).
struct TsSmem {
    TkSel sel;
    unsigned whi[TK_WARPS];
    unsigned cand_n, stage_n, pad[2];
    unsigned long long cand[TS_CAP];  // composite keys C
    union {
        unsigned bitmap[TK_BITMAP_WORDS];     // the final selection
        unsigned long long stage[TS_STAGE];  // survivors of a compaction
    } u;
};
static_assert(sizeof(TkSmem) == 106656, "TK_SMEM in indexer.rs");
static_assert(sizeof(TsSmem) == 106720, "TS_SMEM in indexer.rs");
static_assert(TS_STAGE * 8 == TK_BITMAP_WORDS * 4 && TS_MAX_K <= TS_STAGE, "stage layout");

// 16-byte streaming load (read once: no L1 allocation, 256-byte L2 prefetch).
__device__ __forceinline__ float4 ld_stream(const float* p) {
    float4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.f32 {%0,%1,%2,%3}, [%4];\n"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ int comp_pos(unsigned long long c) { return (int)(TK_MAX_POS - (unsigned)(c & TK_MAX_POS)); }

// The bin of s.hist[0..TK_BINS) holding the k_rem-th element counted from the top: its index, the
// count in the bins above it and its own count. Starts and ends with all threads past their reads
// of s.hist (the caller synchronises after filling it).
__device__ void pick_bin(TkSel& s, unsigned k_rem, unsigned& bin, unsigned& above_out, unsigned& cnt) {
    const int per = TK_BINS / TK_THREADS;  // thread i holds bins from the top down
    unsigned local = 0;
    for (int j = 0; j < per; ++j) local += s.hist[TK_BINS - 1 - (threadIdx.x * per + j)];
    unsigned total;
    unsigned above = block_excl_scan(local, s.scan, &total);
    for (int j = 0; j < per; ++j) {
        const int b = TK_BINS - 1 - (threadIdx.x * per + j);
        const unsigned h = s.hist[b];
        if (above < k_rem && k_rem <= above + h) {  // exactly one bin qualifies
            s.res[0] = (unsigned)b;
            s.res[1] = above;
            s.res[2] = h;
        }
        above += h;
    }
    __syncthreads();
    bin = s.res[0];
    above_out = s.res[1];
    cnt = s.res[2];
    __syncthreads();
}

// Radix select over the m candidates of sm, all with lo <= C <= hi (1 <= k <= m; the C are
// distinct): returns thr such that the candidates with C >= thr number between k and max(k, target);
// exactly k when target == k. Digits of 11 bits start below the common prefix of lo and hi.
// Histograms use plain shared atomics: the digits are spread over the candidates' range, so lanes
// rarely collide.
__device__ unsigned long long ts_select(TsSmem& sm, int m, unsigned k, unsigned target, unsigned long long lo,
                                        unsigned long long hi) {
    // Active set: the candidates with C >> top == P (initially all); the k_rem largest of them are
    // still wanted, the k - k_rem above them are taken.
    int top = lo == hi ? 0 : 64 - __clzll((long long)(lo ^ hi));
    unsigned long long P = lo >> top;
    unsigned k_rem = k, cnt = (unsigned)m;
    // cnt == k_rem ends it at the latest when top reaches 0 (a single candidate is active then).
    while (k - k_rem + cnt > target && cnt != k_rem) {
        const int bits = top < 11 ? top : 11, sh = top - bits;
        const unsigned mask = (1u << bits) - 1u;
        for (int i = threadIdx.x; i < TK_BINS; i += TK_THREADS) sm.sel.hist[i] = 0u;
        __syncthreads();
        for (int i = threadIdx.x; i < m; i += TK_THREADS) {
            const unsigned long long c = sm.cand[i];
            if ((c >> top) == P) atomicAdd(&sm.sel.hist[(unsigned)(c >> sh) & mask], 1u);
        }
        __syncthreads();
        unsigned b, above, h;
        pick_bin(sm.sel, k_rem, b, above, h);
        P = (P << bits) | b;
        k_rem -= above;
        cnt = h;
        top = sh;
    }
    return P << top;
}

// Keeps the m candidates with C >= thr (at most TS_STAGE of them), through the staging area.
__device__ void ts_compact(TsSmem& sm, int m, unsigned long long thr) {
    const int lane = threadIdx.x & 31;
    if (threadIdx.x == 0) sm.stage_n = 0u;
    __syncthreads();
    for (int base = 0; base < m; base += TK_THREADS) {
        const int i = base + threadIdx.x;
        const unsigned long long c = i < m ? sm.cand[i] : 0ull;
        const bool take = i < m && c >= thr;
        const unsigned bal = __ballot_sync(FULL, take);
        if (bal) {
            unsigned at = 0u;
            if (lane == 0) at = atomicAdd(&sm.stage_n, (unsigned)__popc(bal));
            at = __shfl_sync(FULL, at, 0) + (unsigned)__popc(bal & ((1u << lane) - 1u));
            if (take) sm.u.stage[at] = c;
        }
    }
    __syncthreads();
    const int kept = (int)sm.stage_n;
    for (int i = threadIdx.x; i < kept; i += TK_THREADS) sm.cand[i] = sm.u.stage[i];
    if (threadIdx.x == 0) sm.cand_n = (unsigned)kept;
    __syncthreads();
}

// The least C above every candidate: from each thread's running max of the scores it appended
// (+1 on the score key covers -0 / +0, which fmaxf does not order).
__device__ unsigned long long ts_hi(TsSmem& sm, float vmax) {
    const unsigned w = __reduce_max_sync(FULL, order_key(vmax));
    if ((threadIdx.x & 31) == 0) sm.whi[threadIdx.x >> 5] = w;
    __syncthreads();
    unsigned hk = 0u;
    for (int i = 0; i < TK_WARPS; ++i) hk = sm.whi[i] > hk ? sm.whi[i] : hk;
    return ((unsigned long long)(hk + 1u) << TK_POS_BITS) - 1ull;  // hk <= order_key(+inf): no overflow
}

// One CTA (TK_THREADS) per row; dynamic shared memory sizeof(TsSmem); topk <= TS_MAX_K.
extern "C" __global__ void __launch_bounds__(TK_THREADS, 2)
    topk_stream(const float* __restrict__ scores, long long stride, const int* __restrict__ pos,
                int* __restrict__ out, int K, int topk) {
    PDL_ENTRY();
    extern __shared__ __align__(16) unsigned char tk_raw[];
    if (dynamic_smem_bytes() < sizeof(TsSmem) || topk > TS_MAX_K) __trap();
    TsSmem& sm = *reinterpret_cast<TsSmem*>(tk_raw);
    const int row = blockIdx.x;
    const int n = pos[row] + 1;
    int* o = out + (long long)row * K;
    if (n <= topk) {
        emit_all(n, o, K);
        return;
    }
    // Element e = 4*j + c (j = 0, 1; c = 0..3) of this thread's batch b is at position
    // b*TS_BATCH + j*4*TK_THREADS + 4*threadIdx.x + c: each load is a coalesced 16 bytes per lane.
    const float* src = scores + (long long)row * stride + threadIdx.x * 4;
    // Opaque to the compiler, so it keeps the pointer (at worst in an 8-byte spill slot, one L1 load
    // per batch) instead of rebuilding it from the kernel parameters for every load (~20 instructions).
    asm("" : "+l"(src));
    const int nb = (n + TS_BATCH - 1) / TS_BATCH;
    const unsigned target = ((unsigned)topk + TS_STAGE) / 2u;
    if (threadIdx.x == 0) sm.cand_n = 0u;
    __syncthreads();

    // The threshold thr (a C value) and fge, the least score whose key exceeds thr's key tk (NaN
    // when tk is +inf's key: nothing passes). Until the first compaction every element is a
    // candidate. After it, the test is f >= fge, i.e. key > tk: elements with key == tk are
    // rejected, and rightly so: they come after all the candidates (positions only grow along the
    // stream), >= topk of which have C >= thr, i.e. key > tk or key == tk with a lower position, so
    // they all rank below topk of the candidates. (+0 / -0: f >= fge may admit a zero of key <= tk:
    // a harmless extra candidate; NaN never passes, and needs not: its key is -inf's <= tk.)
    unsigned long long thr = (unsigned long long)TS_NEG_INF_KEY << TK_POS_BITS;
    float fge = 0.f;
    bool first = true;
    float vmax = __uint_as_float(0xff800000u);  // max score this thread appended (fmaxf skips NaN)

    auto load = [&](float4(&v)[2], int b) {
        const int i = b * TS_BATCH + (int)threadIdx.x * 4;
        const float* p = src + b * TS_BATCH;
        v[0] = i < n ? ld_stream(p) : make_float4(0.f, 0.f, 0.f, 0.f);
        v[1] = i + 4 * TK_THREADS < n ? ld_stream(p + 4 * TK_THREADS) : make_float4(0.f, 0.f, 0.f, 0.f);
    };
    // Appends batch b's candidates from v, then refills v with batch b + 3 (before the barrier, so
    // the loads are in flight while the warps wait); true (on every thread) when the candidates may
    // lack room for another batch. A thread with candidates reserves slots with one shared atomic
    // and stores them one by one (few per thread once thr is good: ~k/seen of the elements).
    auto consume = [&](float4(&v)[2], int b) -> bool {
        const float f[TS_PER] = {v[0].x, v[0].y, v[0].z, v[0].w, v[1].x, v[1].y, v[1].z, v[1].w};
        const int i0 = b * TS_BATCH + threadIdx.x * 4;  // element e at i0 + (e>>2)*4*TK_THREADS + (e&3)
        unsigned okm = 0xffu;                           // bit e: element e is a candidate
        if (!first) {
            okm = 0u;
#pragma unroll
            for (int e = 0; e < TS_PER; ++e) okm |= (unsigned)(f[e] >= fge) << e;
        }
        if (b == nb - 1) {  // uniform: drop the elements past the row's end
            const int left = n - i0, l0 = min(max(left, 0), 4), l1 = min(max(left - 4 * TK_THREADS, 0), 4);
            okm &= ((1u << l0) - 1u) | (((1u << l1) - 1u) << 4);
        }
        int full = 0;
        if (okm) {
            const unsigned cnt = (unsigned)__popc(okm);
            unsigned at = atomicAdd(&sm.cand_n, cnt);
            full = at + cnt > TS_CAP - TS_BATCH;
            do {
                const int e = __ffs(okm) - 1;
                okm &= okm - 1u;
                // f[e] by a select tree (a dynamic index would put f in local memory).
                const float x01 = (e & 1) ? f[1] : f[0], x23 = (e & 1) ? f[3] : f[2];
                const float x45 = (e & 1) ? f[5] : f[4], x67 = (e & 1) ? f[7] : f[6];
                const float x0123 = (e & 2) ? x23 : x01, x4567 = (e & 2) ? x67 : x45;
                const float x = (e & 4) ? x4567 : x0123;
                sm.cand[at++] = comp_key(order_key(x), i0 + (e >> 2) * 4 * TK_THREADS + (e & 3));
                vmax = fmaxf(vmax, x);
            } while (okm);
        }
        load(v, b + 3);
        return __syncthreads_or(full) != 0;
    };
    auto compact = [&]() {
        const int m = (int)sm.cand_n;  // stable: every append is behind the barrier in consume
        const unsigned long long hi = ts_hi(sm, vmax);
        thr = ts_select(sm, m, (unsigned)topk, target, thr, hi);
        ts_compact(sm, m, thr);
        // key tk + 1 back to a score: keys with the top bit set are non-negative scores.
        const unsigned k1 = (unsigned)(thr >> TK_POS_BITS) + 1u;
        fge = __uint_as_float((k1 & 0x80000000u) ? (k1 & 0x7fffffffu) : ~k1);
        first = false;
    };

    // Three register sets in rotation: while one batch is examined the next two are in flight.
    float4 va[2], vb[2], vc[2];
    load(va, 0);
    load(vb, 1);
    load(vc, 2);
    for (int b = 0; b < nb; b += 3) {
        if (consume(va, b)) compact();
        if (b + 1 >= nb) break;
        if (consume(vb, b + 1)) compact();
        if (b + 2 >= nb) break;
        if (consume(vc, b + 2)) compact();
    }

    // The exact cut over the final candidates, marked in the position bitmap (the staging area is
    // free: the last compaction ended with a barrier).
    const int m = (int)sm.cand_n;
    const unsigned long long hi = ts_hi(sm, vmax);
    const unsigned long long t = ts_select(sm, m, (unsigned)topk, (unsigned)topk, thr, hi);
    for (int i = threadIdx.x; i < ((n + 31) >> 5); i += TK_THREADS) sm.u.bitmap[i] = 0u;
    __syncthreads();
    for (int i = threadIdx.x; i < m; i += TK_THREADS) {
        const unsigned long long c = sm.cand[i];
        if (c >= t) mark(sm.u.bitmap, comp_pos(c));
    }
    __syncthreads();
    emit_bits(sm.u.bitmap, sm.sel.scan, n, o, K);
}

// ---- segmented path (few long rows) -----------------------------------------------------------
// Workspace per row (zeroed by the host unless noted): ghist [2048] u32, gbitmap [TK_BITMAP_WORDS]
// u32, gcand_n u32, and (not zeroed) gcand_key / gcand_pos [cap] each, cap >= the row's n.
// Grid of the first two: (segments, rows), segment = `seg` elements (a multiple of 16).

extern "C" __global__ void __launch_bounds__(TK_THREADS)
    topk_seg_hist(const float* __restrict__ scores, long long stride, const int* __restrict__ pos, int topk, int seg,
                  unsigned* __restrict__ ghist) {
    PDL_ENTRY();
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
    PDL_ENTRY();
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
    PDL_ENTRY();
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
