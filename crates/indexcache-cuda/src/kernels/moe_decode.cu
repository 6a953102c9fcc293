// Sync-free MoE expert FFN for decode-sized batches (moe_decode.rs, `moe_small`).
//
// Inputs (raw device addresses): x [T, hidden], ids [T, top_k] i32 and w [T, top_k] f32 from the
// routing kernel (moe.cu `moe_route`), stacked expert weights gate_up [E, 2I, hidden] (rows 0..I
// gate, I..2I up) and down [E, hidden, I], and optionally one shared expert of the same width I:
// sg [I, hidden] (gate), su [I, hidden] (up), sd [hidden, I] (down) (null pointers: none). Output
// out[t] = sum_j w[t,j] * down_e(silu(gate_e x) * up_e x), e = ids[t,j], summed in f32 in j order,
// + the shared expert's down_s(silu(gate_s x) * up_s x) (weight 1) when sg/sd are given, + an
// optional precomputed shared-expert output (added in f32 before the one rounding, as moe.cu's
// moe_combine does). Nothing goes to the host: the work list is built on the device, inside every
// CTA, from the N = T*top_k ids.
//
// Slots: q < N is the routed pair (t, j) = (q / top_k, q % top_k); with a shared expert, slot
// N + t is token t's shared-expert slot (NS = T of them), whose "expert id" is E in the plan (a
// pseudo-expert after the routed ones) and whose weight rows come from sg/su/sd instead of the
// stacked tensors. h and the combine's y are indexed by slot, so the shared expert is one more
// expert with T members, read once per call like any routed one.
//
// Plan (`make_plan`, every CTA, N <= MAX_PAIRS, NS <= MAX_TOKENS): a slot is a *leader* if no
// earlier slot has its expert; next[q] chains the later slots with the same expert. Each expert's
// weights are read once per call, whatever number of slots use it (they are the "members" of its
// leader); members go through a weight row in passes of at most MAXM (a later pass re-reads the
// row, from L2). A pair with an expert id outside [0, E) contributes zero.
//
// Kernel 1, gate/up (persistent warps): a unit is (leader, intermediate row i). Warp-units are
// strided over all warps of the grid; a warp loads gate row i and up row i of the expert with
// 16-byte streaming loads (L1 bypassed), `UNR` vectors per lane per step, lane-interleaved (a warp
// reads 512 contiguous bytes per load instruction), dots them with x[t] of every member in f32,
// reduces with warp shuffles and writes h[q, i] = silu(g) * u (f32) to the [N + NS, I] workspace.
//
// Kernel 2, down + combine: a CTA owns a slice of DN_ROWS output rows and computes, for every leader
// and every row of the slice, y[q, r] = down_e[r, :] . h[q, :] for the members q (one warp per
// (leader, row) unit), into shared memory; then out[t, r] = sum_j w[t,j] * y[t*top_k + j, r] in j
// order (f32), plus y[N + t, r] of the fused shared expert (weight 1), plus shared[t, r] if a
// shared-expert output is given (as moe.cu's moe_combine), converted to the storage type once. The
// combine is fused and deterministic: no atomics, every sum has a fixed order, and a slot's dot
// products do not depend on which other slots share its expert (the result for a token is bitwise
// independent of the rest of the batch).
//
// Optional L2 prefetch (`pf` units ahead, cp.async.bulk.prefetch.L2, one instruction per weight row)
// keeps more bytes in flight than a warp's registers hold.
//
// No headers are included (NVRTC only); bf16 is unsigned short bits, as in elementwise.cu.

// Element types, FULL_MASK, bf16 <-> f32 and ld/st: common.cuh (prepended).

#define MAX_PAIRS 256  // most (token, pick) pairs per call; moe_decode.rs MAX_PAIRS
#define MAX_TOKENS 16  // most tokens per call; moe_decode.rs MAX_DECODE_TOKENS
#define MAX_SLOTS (MAX_PAIRS + MAX_TOKENS)  // routed pairs + one shared-expert slot per token
#define DN_ROWS 4      // output rows per slice of the down kernel; moe_decode.rs DN_ROWS
#define UNR 8          // 16-byte vectors per lane per step
#define MAXM 4         // members per pass over a weight row
#define THREADS 128    // threads per CTA of both kernels; moe_decode.rs THREADS
#define MIN_CTAS 4     // resident CTAs per SM the register budget is sized for (<= 128 registers)


// 16-byte load of weights read once per call: non-coherent path, no L1 allocation.
__device__ __forceinline__ uint4 ld_stream(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// 16-byte load of small read-only activations (x, h), reused across warps: cached in L1.
// Not volatile: a pure function of the address, the compiler may schedule it freely.
__device__ __forceinline__ uint4 ld_act(const void* p) {
    uint4 v;
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// Prefetch `bytes` (a multiple of 16, 16-byte aligned address) into L2; no registers, no waiting.
__device__ __forceinline__ void prefetch_l2(const void* p, unsigned bytes) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes) : "memory");
}

// warp_sum (a butterfly: every lane ends with the same value), block_sum and the row RMSNorm
// norm_row: norm.cuh (prepended).

// `v` rounded to the storage type T and back (identity for f32).
template <typename T>
__device__ __forceinline__ float round_to(float v);
template <>
__device__ __forceinline__ float round_to<float>(float v) {
    return v;
}
template <>
__device__ __forceinline__ float round_to<bf16_t>(float v) {
    return bf16_to_f32(f32_to_bf16(v));
}

// The per-call work list, built by every CTA from the ids.
struct Plan {
    int id[MAX_SLOTS];    // expert of slot q: ids[q] (-1 if outside [0, E)), E for a shared slot
    int next[MAX_SLOTS];  // next slot after q with the same expert, -1 if none
    int flag[MAX_SLOTS];  // q is a leader (first slot of its expert)
    int lead[MAX_SLOTS];  // the leaders, in slot order (the shared expert's, slot n, last)
    int n_lead;
};

// Called by all threads of the block (blockDim.x a multiple of 32); ends with a barrier.
// Slots 0..n are the routed pairs, n..slots the shared expert's (expert id E: they chain into one
// leader). O(slots) per slot; n <= MAX_PAIRS, slots - n <= MAX_TOKENS.
__device__ void make_plan(Plan& p, const int* ids, int n, int slots, int E) {
    for (int q = threadIdx.x; q < slots; q += blockDim.x) {
        if (q < n) {
            const int e = ids[q];
            p.id[q] = (e >= 0 && e < E) ? e : -1;
        } else {
            p.id[q] = E;
        }
    }
    __syncthreads();
    for (int q = threadIdx.x; q < slots; q += blockDim.x) {
        const int e = p.id[q];
        int first = e >= 0, nx = -1;
        if (e >= 0) {
            for (int r = 0; r < q; ++r) {
                if (p.id[r] == e) {
                    first = 0;
                    break;
                }
            }
            for (int r = q + 1; r < slots; ++r) {
                if (p.id[r] == e) {
                    nx = r;
                    break;
                }
            }
        }
        p.flag[q] = first;
        p.next[q] = nx;
    }
    __syncthreads();
    if (threadIdx.x < 32) {  // warp 0: ordered compaction of the leaders
        const int lane = threadIdx.x;
        int base = 0;
        for (int q0 = 0; q0 < slots; q0 += 32) {
            const int q = q0 + lane;
            const bool f = q < slots && p.flag[q];
            const unsigned m = __ballot_sync(FULL_MASK, f);
            if (f) p.lead[base + __popc(m & ((1u << lane) - 1u))] = q;
            base += __popc(m);
        }
        if (lane == 0) p.n_lead = base;
    }
    __syncthreads();
}

// Token of slot q: routed pair q < n is token q / top_k, shared slot n + t is token t.
__device__ __forceinline__ int token_of(int q, int n, int top_k) { return q < n ? q / top_k : q - n; }

// The next up-to-MAXM members of a chain starting at q (-1 padded); returns the pair after them.
__device__ __forceinline__ int take_members(const Plan& p, int q, int (&mq)[MAXM]) {
#pragma unroll
    for (int m = 0; m < MAXM; ++m) {
        mq[m] = q;
        if (q >= 0) q = p.next[q];
    }
    return q;
}

// ---- kernel 1: gate/up GEMV + SwiGLU ------------------------------------------------------------
// Grid: any number of CTAs (persistent; the host sizes it to the resident capacity), blockDim.x a
// multiple of 32. sg, su: the shared expert's gate and up [I, hidden], or null (both) for none.
// early: load the shared expert's first weights before the PDL wait (below).
// h: [n + ns, I] f32, ns = n / top_k with a shared expert, else 0.
// PRE (moe_decode_gate_up_pre_bf16): x is the residual stream before the post-attention add, and
// the input rows are rms_norm(x + y) (weights nw), which every CTA computes into `hs` (shared
// memory) with norm_row at 256 threads — add_rms_norm's bits — before waiting for the routing
// kernel; the shared expert's units (which need no routing) also run before that wait. Nothing
// here writes x: the down kernel stores x + y with its sum (`ypre`).
template <typename T, bool PRE = false>
__device__ __forceinline__ void gate_up_impl(const T* __restrict__ x, const int* __restrict__ ids,
                                             const T* __restrict__ gu, const T* __restrict__ sg,
                                             const T* __restrict__ su, float* __restrict__ h, int n, int top_k, int E,
                                             int hidden, int I, int pf, int early, const T* __restrict__ y = nullptr,
                                             const float* __restrict__ nw = nullptr, float eps = 0.0f,
                                             T* hs = nullptr) {
    __shared__ Plan plan;
    if (n <= 0 || n > MAX_PAIRS || top_k <= 0) return;  // uniform; the host rejects these
    const int ns = sg ? n / top_k : 0;                   // shared-expert slots, one per token
    if (ns > MAX_TOKENS) return;                         // uniform; the host rejects these
    constexpr int N = VecT<T>::N;
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const int nvec = hidden / N;  // 16-byte vectors per weight row (the host checks hidden % N == 0)
    const i64 step = (i64)gridDim.x * warps;
    const i64 first = (i64)blockIdx.x * warps + (threadIdx.x >> 5);
    const unsigned row_bytes = (unsigned)hidden * sizeof(T);
    // With a shared expert its units come first (units 0 .. I-1; its leader is the plan's last):
    // they need no routing, so a warp whose first unit is one loads that unit's first step of
    // weights before waiting for the routing kernel (`pdl_wait`) and building the plan. Which warp
    // computes a unit never changes its result.
    uint4 wg[UNR], wu[UNR];
    bool preloaded = false;
    auto load_step = [&](const T* grow, const T* urow, int c0) {
#pragma unroll
        for (int k = 0; k < UNR; ++k) {
            const int c = c0 + k * 32 + lane;
            if (c < nvec) {
                wg[k] = ld_stream(grow + (i64)c * N);
                wu[k] = ld_stream(urow + (i64)c * N);
            } else {
                wg[k] = wu[k] = make_uint4(0u, 0u, 0u, 0u);
            }
        }
    };
    // Members mq of weight rows grow / urow (intermediate row i): h[mq[m], i] for each.
    auto unit = [&](const T* grow, const T* urow, int i, const int (&mq)[MAXM]) {
        float ga[MAXM], ua[MAXM];
#pragma unroll
        for (int m = 0; m < MAXM; ++m) ga[m] = ua[m] = 0.0f;
        for (int c0 = 0; c0 < nvec; c0 += 32 * UNR) {
            if (preloaded)
                preloaded = false;  // the first step of the first unit: loaded before the wait
            else
                load_step(grow, urow, c0);
#pragma unroll
            for (int m = 0; m < MAXM; ++m) {
                if (mq[m] < 0) break;  // the chain ended (uniform)
                const T* xr = (PRE ? hs : x) + (i64)token_of(mq[m], n, top_k) * hidden;
#pragma unroll
                for (int k = 0; k < UNR; ++k) {
                    const int c = c0 + k * 32 + lane;
                    if (c < nvec) {
                        float xf[N], gf[N], uf[N];
                        VecT<T>::unpack(PRE ? *(const uint4*)(xr + (i64)c * N) : ld_act(xr + (i64)c * N), xf);
                        VecT<T>::unpack(wg[k], gf);
                        VecT<T>::unpack(wu[k], uf);
#pragma unroll
                        for (int v = 0; v < N; ++v) {
                            ga[m] = fmaf(gf[v], xf[v], ga[m]);
                            ua[m] = fmaf(uf[v], xf[v], ua[m]);
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int m = 0; m < MAXM; ++m) {
            if (mq[m] < 0) break;
            float g = warp_sum(ga[m]), up = warp_sum(ua[m]);
            if (mq[m] >= n) {
                // The shared expert rounds like the dense MLP it replaces (gate, up and
                // silu(g)*u stored in T there), so decode matches the prefill path's numerics.
                g = round_to<T>(g);
                up = round_to<T>(up);
                if (lane == 0) h[(i64)mq[m] * I + i] = round_to<T>((g / (1.0f + expf(-g))) * up);
            } else if (lane == 0) {
                h[(i64)mq[m] * I + i] = (g / (1.0f + expf(-g))) * up;
            }
        }
    };
    if (PRE) {
        __shared__ float red[33];
        for (int t = 0; t < n / top_k; ++t) {
            const i64 o = (i64)t * hidden;
            norm_row<T, true>(const_cast<T*>(x) + o, y + o, nw, hs + o, hidden, eps, red, false);
            __syncthreads();  // norm_row's staging is reused by the next row; hs complete
        }
        // The shared expert's units (0 .. I-1 of the plan's order below), its slots n .. n+ns-1.
        for (i64 u = first; ns > 0 && u < I; u += step) {
            const int i = (int)u;
            for (int q0 = 0; q0 < ns; q0 += MAXM) {
                int mq[MAXM];
#pragma unroll
                for (int m = 0; m < MAXM; ++m) mq[m] = q0 + m < ns ? n + q0 + m : -1;
                unit(sg + (i64)i * hidden, su + (i64)i * hidden, i, mq);
            }
        }
    } else if (early && ns > 0 && first < I) {
        load_step(sg + first * hidden, su + first * hidden, 0);
        preloaded = true;
    }
    pdl_wait();
    make_plan(plan, ids, n, n + ns, E);
    const i64 units = (i64)plan.n_lead * I;
    // Leader of unit u (the shared expert's first).
    auto leader_of = [&](i64 u) {
        const int li = (int)(u / I);
        return ns > 0 ? (li + plan.n_lead - 1) % plan.n_lead : li;
    };
    // Gate and up rows of unit u: a routed expert's up row is I rows after its gate row in the
    // stacked tensor; the shared expert (id E) has separate gate and up matrices.
    auto rows_of = [&](i64 u, const T*& g, const T*& up) {
        const int i = (int)(u % I);
        const int e = plan.id[plan.lead[leader_of(u)]];
        if (e < E) {
            g = gu + ((i64)e * 2 * I + i) * hidden;
            up = g + (i64)I * hidden;
        } else {
            g = sg + (i64)i * hidden;
            up = su + (i64)i * hidden;
        }
    };
    if (lane == 0) {
        for (int k = 1; k < pf; ++k) {
            const i64 v = first + k * step;
            if (v < units) {
                const T *g, *up;
                rows_of(v, g, up);
                prefetch_l2(g, row_bytes);
                prefetch_l2(up, row_bytes);
            }
        }
    }
    // PRE: the shared expert's units ran before the wait.
    for (i64 u = first + (PRE && ns > 0 ? I : 0); u < units; u += step) {
        if (lane == 0 && pf > 0) {
            const i64 v = u + pf * step;
            if (v < units) {
                const T *g, *up;
                rows_of(v, g, up);
                prefetch_l2(g, row_bytes);
                prefetch_l2(up, row_bytes);
            }
        }
        const int i = (int)(u % I);
        const T *grow, *urow;
        rows_of(u, grow, urow);
        int q = plan.lead[leader_of(u)];
        while (q >= 0) {  // uniform over the warp
            int mq[MAXM];
            q = take_members(plan, q, mq);
            unit(grow, urow, i, mq);
        }
    }
}

#define ENTRY extern "C" __global__ void __launch_bounds__(THREADS, MIN_CTAS)

ENTRY moe_decode_gate_up_f32(const float* x, const int* ids, const float* gu, const float* sg, const float* su,
                             float* h, int n, int top_k, int E, int hidden, int I, int pf, int early) {
    gate_up_impl<float>(x, ids, gu, sg, su, h, n, top_k, E, hidden, I, pf, early);
}
ENTRY moe_decode_gate_up_bf16(const bf16_t* x, const int* ids, const bf16_t* gu, const bf16_t* sg, const bf16_t* su,
                              float* h, int n, int top_k, int E, int hidden, int I, int pf, int early) {
    gate_up_impl<bf16_t>(x, ids, gu, sg, su, h, n, top_k, E, hidden, I, pf, early);
}
// The PRE mode (above): 256 threads (norm_row's reduction shape in add_rms_norm), res and y
// [n / top_k, hidden], nw [hidden] f32. Dynamic shared memory: the normalised rows, bf16.
#define PRE_THREADS 256  // moe_decode.rs PRE_THREADS
extern "C" __global__ void __launch_bounds__(PRE_THREADS, 2)
    moe_decode_gate_up_pre_bf16(const bf16_t* res, const bf16_t* y, const float* nw, float eps, const int* ids,
                                const bf16_t* gu, const bf16_t* sg, const bf16_t* su, float* h, int n, int top_k,
                                int E, int hidden, int I, int pf) {
    extern __shared__ uint4 gu_rows[];
    gate_up_impl<bf16_t, true>(res, ids, gu, sg, su, h, n, top_k, E, hidden, I, pf, 0, y, nw, eps,
                               (bf16_t*)gu_rows);
}

// ---- kernel 2: down GEMV + weighted combine -----------------------------------------------------
// Grid: any number of CTAs, each striding over slices of DN_ROWS output rows; blockDim.x a multiple
// of 32. h: [n + ns, I] f32 from kernel 1 (ns = n / top_k with a shared expert, else 0); w: [n]
// f32; sd: the shared expert's down [hidden, I], or null for none (then kernel 1 had none either);
// shared (may be null) and out: [n / top_k, hidden].
template <typename T>
__device__ __forceinline__ void down_impl(const float* __restrict__ h, const int* __restrict__ ids,
                                          const float* __restrict__ wts, const T* __restrict__ dn,
                                          const T* __restrict__ sd, const T* __restrict__ shared,
                                          T* __restrict__ out, int n, int top_k, int E, int hidden, int I, int pf,
                                          int accumulate, const T* __restrict__ ypre) {
    __shared__ Plan plan;
    __shared__ float ys[MAX_SLOTS][DN_ROWS];
    if (n <= 0 || n > MAX_PAIRS || top_k <= 0) return;  // uniform; the host rejects these
    const int ns = sd ? n / top_k : 0;                   // shared-expert slots, one per token
    if (ns > MAX_TOKENS) return;                         // uniform; the host rejects these
    make_plan(plan, ids, n, n + ns, E);
    constexpr int N = VecT<T>::N;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int nvec = I / N;  // 16-byte vectors per weight row (the host checks I % N == 0)
    const int tokens = n / top_k;
    const int slices = (hidden + DN_ROWS - 1) / DN_ROWS;
    const unsigned row_bytes = (unsigned)I * sizeof(T);
    for (int s = blockIdx.x; s < slices; s += gridDim.x) {
        const int r0 = s * DN_ROWS;
        const int rows = min(DN_ROWS, hidden - r0);
        const int units = plan.n_lead * rows;  // unit v: leader v / rows, row r0 + v % rows
        auto row_of = [&](int v) -> const T* {
            const int li = v / rows, r = v - li * rows;
            const int e = plan.id[plan.lead[li]];
            return e < E ? dn + ((i64)e * hidden + r0 + r) * I : sd + (i64)(r0 + r) * I;  // E: shared expert
        };
        if (lane == 0) {
            for (int k = 1; k < pf; ++k) {
                const int v = warp + k * warps;
                if (v < units) prefetch_l2(row_of(v), row_bytes);
            }
        }
        for (int v = warp; v < units; v += warps) {
            if (lane == 0 && pf > 0) {
                const int vn = v + pf * warps;
                if (vn < units) prefetch_l2(row_of(vn), row_bytes);
            }
            const int li = v / rows, r = v - li * rows;
            const T* wrow = row_of(v);
            int q = plan.lead[li];
            while (q >= 0) {  // uniform over the warp
                int mq[MAXM];
                q = take_members(plan, q, mq);
                float acc[MAXM];
#pragma unroll
                for (int m = 0; m < MAXM; ++m) acc[m] = 0.0f;
                for (int c0 = 0; c0 < nvec; c0 += 32 * UNR) {
                    uint4 wv[UNR];
#pragma unroll
                    for (int k = 0; k < UNR; ++k) {
                        const int c = c0 + k * 32 + lane;
                        wv[k] = c < nvec ? ld_stream(wrow + (i64)c * N) : make_uint4(0u, 0u, 0u, 0u);
                    }
#pragma unroll
                    for (int m = 0; m < MAXM; ++m) {
                        if (mq[m] < 0) break;  // uniform
                        const float* hr = h + (i64)mq[m] * I;
#pragma unroll
                        for (int k = 0; k < UNR; ++k) {
                            const int c = c0 + k * 32 + lane;
                            if (c < nvec) {
                                float wf[N], hf[N];
                                VecT<T>::unpack(wv[k], wf);
#pragma unroll
                                for (int a = 0; a < N / 4; ++a) {
                                    VecT<float>::unpack(ld_act(hr + (i64)c * N + 4 * a), hf + 4 * a);
                                }
#pragma unroll
                                for (int e = 0; e < N; ++e) acc[m] = fmaf(wf[e], hf[e], acc[m]);
                            }
                        }
                    }
                }
#pragma unroll
                for (int m = 0; m < MAXM; ++m) {
                    if (mq[m] < 0) break;
                    const float y = warp_sum(acc[m]);
                    if (lane == 0) ys[mq[m]][r] = y;
                }
            }
        }
        __syncthreads();
        // Every valid slot's ys entry was written by its leader's warps; invalid pairs are skipped.
        for (int idx = threadIdx.x; idx < tokens * rows; idx += blockDim.x) {
            const int t = idx / rows, r = idx - t * rows;
            float acc = 0.0f;
            for (int j = 0; j < top_k; ++j) {
                const int q = t * top_k + j;
                if (plan.id[q] >= 0) acc = fmaf(wts[q], ys[q][r], acc);
            }
            if (ns) acc += round_to<T>(ys[n + t][r]);  // the fused shared expert (stored in T by the MLP path)
            const i64 o = (i64)t * hidden + r0 + r;
            if (shared) acc += ld(shared, o);
            // out += result, as a separate add; with ypre, out = (out + ypre) + result, the first sum
            // stored as add_rms_norm stores it (the PRE gate/up kernel left out unchanged)
            if (accumulate) acc = (ypre ? round_to<T>(ld(out, o) + ld(ypre, o)) : ld(out, o)) + round_to<T>(acc);
            st(out, o, acc);
        }
        __syncthreads();  // ys is rewritten by the next slice
    }
}

ENTRY moe_decode_down_f32(const float* h, const int* ids, const float* w, const float* dn, const float* sd,
                          const float* shared, float* out, int n, int top_k, int E, int hidden, int I, int pf,
                          int accumulate, const float* ypre) {
    PDL_ENTRY();
    down_impl<float>(h, ids, w, dn, sd, shared, out, n, top_k, E, hidden, I, pf, accumulate, ypre);
}
ENTRY moe_decode_down_bf16(const float* h, const int* ids, const float* w, const bf16_t* dn, const bf16_t* sd,
                           const bf16_t* shared, bf16_t* out, int n, int top_k, int E, int hidden, int I, int pf,
                           int accumulate, const bf16_t* ypre) {
    PDL_ENTRY();
    down_impl<bf16_t>(h, ids, w, dn, sd, shared, out, n, top_k, E, hidden, I, pf, accumulate, ypre);
}

// ---- Dense decode GEMV (backend.rs `matmul`: bf16, at most GEMV_ROWS rows) ----------------------
// y[b][t, j] = sum_c x[b][t, c] * w[b][j, c] for t < rows, j < n_out, batch entry b = blockIdx.y
// (element strides sx, sw, sy between entries), f32 accumulation, y rounded to its type once.
// One warp per output column j: the lanes read w's row j as 16-byte streaming vectors,
// lane-interleaved, UNR per lane per step (a 2048-wide row in one step), and the same vectors of
// every x row (cached: x is shared by all warps). Per lane the sum runs over its vectors in order,
// then a butterfly across lanes: deterministic, independent of the launch shape.
// The caller guarantees n_in, ldx, ldw, sx, sw multiples of 8 and 16-byte aligned x and w.

#define GEMV_ROWS 4   // backend.rs GEMV_ROWS
#define GEMV_WARPS 4  // output columns per CTA; backend.rs GEMV_WARPS

// Columns j0 .. j0 + nc - 1 (nc <= C) of one GEMV: y[t, j] = x[t, :] . w[j, :] for t < rows, w0 =
// w's row j0 (rows ldw apart). U vectors per lane per step and row: a lane's sum for a column runs
// over its vectors lane, lane + 32, ... in order whatever U and C are, so every (U, C) gives the
// same bits. C > 1 serves short rows: a warp then keeps C rows in flight instead of one short row
// (and the grid needs C times fewer warps).
// `pre()` runs between the first weight loads and the first read of x (every caller but
// add_norm_router_route: `pdl_wait`); XS: x is in shared memory (generic loads) instead of global.
template <int U, int C, typename TO, bool XS = false, typename Pre>
__device__ __forceinline__ void gemv_cols_pre(const bf16_t* x, i64 ldx, const bf16_t* w0, i64 ldw, TO* y, i64 ldy,
                                              int j0, int nc, int rows, int n_in, Pre pre) {
    const int lane = threadIdx.x & 31;
    const int nv = n_in >> 3;
    float acc[C][GEMV_ROWS];
#pragma unroll
    for (int c = 0; c < C; ++c)
#pragma unroll
        for (int t = 0; t < GEMV_ROWS; ++t) acc[c][t] = 0.0f;
    uint4 wv[C][U];
    auto load = [&](int v0) {
#pragma unroll
        for (int c = 0; c < C; ++c)
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int v = v0 + u * 32 + lane;
                wv[c][u] = c < nc && v < nv ? ld_stream(w0 + c * ldw + 8 * (i64)v) : make_uint4(0, 0, 0, 0);
            }
    };
    // The first step's weights are loaded before waiting for the kernel that wrote x (`pdl_wait`):
    // under PDL their fetch overlaps that kernel's end.
    load(0);
    pre();
    for (int v0 = 0; v0 < nv; v0 += 32 * U) {
        if (v0 > 0) load(v0);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int v = v0 + u * 32 + lane;
            if (v >= nv) break;
#pragma unroll
            for (int t = 0; t < GEMV_ROWS; ++t) {
                if (t < rows) {
                    float xf[8];
                    const bf16_t* xv = x + t * ldx + 8 * (i64)v;
                    VecT<bf16_t>::unpack(XS ? *(const uint4*)xv : ld_act(xv), xf);
#pragma unroll
                    for (int c = 0; c < C; ++c) {
                        float wf[8];
                        VecT<bf16_t>::unpack(wv[c][u], wf);
#pragma unroll
                        for (int e = 0; e < 8; ++e) acc[c][t] = fmaf(wf[e], xf[e], acc[c][t]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int c = 0; c < C; ++c) {
#pragma unroll
        for (int t = 0; t < GEMV_ROWS; ++t) {
            if (c < nc && t < rows) {
                const float s = warp_sum(acc[c][t]);
                if (lane == 0) st(y, t * ldy + j0 + c, s);
            }
        }
    }
}

template <int U, int C, typename TO>
__device__ __forceinline__ void gemv_cols(const bf16_t* x, i64 ldx, const bf16_t* w0, i64 ldw, TO* y, i64 ldy,
                                          int j0, int nc, int rows, int n_in) {
    gemv_cols_pre<U, C, TO>(x, ldx, w0, ldw, y, ldy, j0, nc, rows, n_in, [] { pdl_wait(); });
}

// One column (gemv2_bf16, router_route).
template <int U, typename TO>
__device__ __forceinline__ void gemv_col(const bf16_t* x, i64 ldx, const bf16_t* wr, TO* y, i64 ldy, int j,
                                         int rows, int n_in) {
    gemv_cols<U, 1, TO>(x, ldx, wr, 0, y, ldy, j, 1, rows, n_in);
}

// Warp w of the grid computes columns w*C .. w*C + C - 1 of batch entry blockIdx.y.
template <int U, int C, typename TO>
__device__ void gemv(const bf16_t* x, i64 ldx, i64 sx, const bf16_t* w, i64 ldw, i64 sw, TO* y, i64 ldy, i64 sy,
                     int rows, int n_out, int n_in) {
    const int j0 = (blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5)) * C;
    if (j0 >= n_out) return;  // the whole warp: j0 is the same for its lanes
    const i64 b = blockIdx.y;
    gemv_cols<U, C, TO>(x + b * sx, ldx, w + b * sw + (i64)j0 * ldw, ldw, y + b * sy, ldy, j0, min(C, n_out - j0),
                        rows, n_in);
}

// UNR vectors per lane per step: a 2048-wide row in one step. (Measured on the H200: 24 per lane
// for the 5120-wide o rows made that GEMV slower, 11.9 -> 15.6 us: the loads were already in
// flight as far as the memory system takes them.)
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_bf16(const bf16_t* x, i64 ldx, i64 sx, const bf16_t* w, i64 ldw, i64 sw, bf16_t* y, i64 ldy, i64 sy, int rows,
              int n_out, int n_in) {
    gemv<UNR, 1, bf16_t>(x, ldx, sx, w, ldw, sw, y, ldy, sy, rows, n_out, n_in);
}
// 4 vectors per lane per step (backend.rs `gemv_u4`, the default; same bits): a standalone H200
// microbenchmark read the 5120-wide o rows in 9.8 us at 4 against 10.8 at 8, and the 30B decode
// step measured +0.6 % (4K) / +2.8 % (200K, paper 1/4) with it.
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_bf16_u4(const bf16_t* x, i64 ldx, i64 sx, const bf16_t* w, i64 ldw, i64 sw, bf16_t* y, i64 ldy, i64 sy,
                 int rows, int n_out, int n_in) {
    gemv<4, 1, bf16_t>(x, ldx, sx, w, ldw, sw, y, ldy, sy, rows, n_out, n_in);
}
// Short rows (backend.rs `gemv_cols`): 2 columns per warp for rows of up to 128 vectors (4 per
// lane), 4 for rows of up to 64, the same register budget as one long row.
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_bf16_c2(const bf16_t* x, i64 ldx, i64 sx, const bf16_t* w, i64 ldw, i64 sw, bf16_t* y, i64 ldy, i64 sy,
                 int rows, int n_out, int n_in) {
    gemv<4, 2, bf16_t>(x, ldx, sx, w, ldw, sw, y, ldy, sy, rows, n_out, n_in);
}
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_bf16_c4(const bf16_t* x, i64 ldx, i64 sx, const bf16_t* w, i64 ldw, i64 sw, bf16_t* y, i64 ldy, i64 sy,
                 int rows, int n_out, int n_in) {
    gemv<2, 4, bf16_t>(x, ldx, sx, w, ldw, sw, y, ldy, sy, rows, n_out, n_in);
}
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_bf16_f32(const bf16_t* x, i64 ldx, i64 sx, const bf16_t* w, i64 ldw, i64 sw, float* y, i64 ldy, i64 sy,
                  int rows, int n_out, int n_in) {
    gemv<UNR, 1, float>(x, ldx, sx, w, ldw, sw, y, ldy, sy, rows, n_out, n_in);
}

// Two GEMVs of one input in one launch (backend.rs `matmul_t2`): warps j < n1 compute y1 from w1,
// the rest y2 from w2, each column exactly as `gemv_bf16` computes it. x [rows, n_in] contiguous.
template <int U>
__device__ __forceinline__ void gemv2(const bf16_t* x, int rows, int n_in, const bf16_t* w1, bf16_t* y1, int n1,
                                      const bf16_t* w2, bf16_t* y2, int n2) {
    const int j = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (j < n1) {
        gemv_col<U, bf16_t>(x, n_in, w1 + (i64)j * n_in, y1, n1, j, rows, n_in);
    } else if (j < n1 + n2) {
        const int k = j - n1;
        gemv_col<U, bf16_t>(x, n_in, w2 + (i64)k * n_in, y2, n2, k, rows, n_in);
    }
}
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv2_bf16(const bf16_t* x, int rows, int n_in, const bf16_t* w1, bf16_t* y1, int n1, const bf16_t* w2,
               bf16_t* y2, int n2) {
    gemv2<UNR>(x, rows, n_in, w1, y1, n1, w2, y2, n2);
}
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv2_bf16_u4(const bf16_t* x, int rows, int n_in, const bf16_t* w1, bf16_t* y1, int n1, const bf16_t* w2,
                  bf16_t* y2, int n2) {
    gemv2<4>(x, rows, n_in, w1, y1, n1, w2, y2, n2);
}

// The router GEMV and the routing in one launch (backend.rs `moe`, decode rows): the CTAs compute
// the router logits [rows, E] f32 into `logits`, each column exactly as `gemv_bf16_f32` does; the
// last CTA to finish (the device counter `done` counts finished CTAs; that CTA resets it for the
// next launch) routes every row as `moe_route` does, one warp per row (rows <= GEMV_WARPS).
// Dynamic shared memory: GEMV_WARPS * (3E + 2G + top_k) floats.
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
    router_route(const bf16_t* x, int rows, int n_in, const bf16_t* w, float* logits, const float* bias, int* ids,
                 float* wts, unsigned* done, int E, int G, int topk_group, int top_k, int norm, float scaling) {
    extern __shared__ float smem[];
    __shared__ int last;
    const int warp = threadIdx.x >> 5;
    const int j = blockIdx.x * GEMV_WARPS + warp;
    float b[ROUTE_PER_LANE];  // constant: loaded now, in case this CTA is the one that routes
    if (warp < rows) route_bias(bias, E, b);
    if (j < E)
        gemv_col<UNR, float>(x, n_in, w + (i64)j * n_in, logits, E, j, rows, n_in);  // waits (pdl_wait)
    else
        pdl_wait();
    __threadfence();  // this CTA's logits are visible device-wide before it counts itself done
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(done, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;  // the others' logits: fenced before they counted, read past L1 (ld_cg)
    if (warp < rows)
        route_token(logits, b, ids, wts, nullptr, warp, E, G, topk_group, top_k, norm, scaling,
                    smem + (i64)warp * (3 * E + 2 * G + top_k));
    if (threadIdx.x == 0) *done = 0u;
}

// The post-attention residual add + RMSNorm, the router GEMV and the routing in one launch
// (backend.rs `add_rms_norm_moe`, decode rows): add_rms_norm_bf16 then router_route, the same bits.
// Every CTA (ROUTER_WARPS warps, as many threads as the add_rms_norm kernel, so the same norm
// reduction) computes h = rms_norm(x + y) of every row into shared memory — nobody writes x yet —
// then its warps compute router columns from that copy, each exactly as router_route does. The
// last CTA to finish (device counter `done`, reset by that CTA) then routes (warps < rows, as
// router_route) and, with `store`, stores x += y and h (the other warps): every CTA has read x by
// then. store == 0: neither (the PRE gate/up kernel computes h itself, the down kernel x + y).
// Dynamic shared memory: GEMV_WARPS * (3E + 2G + top_k) floats of routing scratch (a multiple of 4
// floats, the host rounds it up), then h [rows, hidden] bf16.
#define ROUTER_WARPS 8  // 256 threads: add_rms_norm's block (backend.rs ROUTER_WARPS)
extern "C" __global__ void __launch_bounds__(ROUTER_WARPS * 32)
    add_norm_router_route(bf16_t* res, const bf16_t* y, const float* nw, float eps, bf16_t* h_out, int rows,
                          int hidden, const bf16_t* w, float* logits, const float* bias, int* ids, float* wts,
                          unsigned* done, int E, int G, int topk_group, int top_k, int norm, float scaling,
                          int scratch_floats, int store) {
    extern __shared__ float smem[];
    __shared__ float red[33];
    __shared__ int last;
    bf16_t* hs = (bf16_t*)(smem + scratch_floats);
    const int warp = threadIdx.x >> 5;
    const int j = blockIdx.x * ROUTER_WARPS + warp;
    float b[ROUTE_PER_LANE];  // constant: loaded now, in case this CTA is the one that routes
    if (warp < rows) route_bias(bias, E, b);
    auto pre = [&] {
        pdl_wait();
        for (int t = 0; t < rows; ++t) {
            const i64 o = (i64)t * hidden;
            norm_row<bf16_t, true>(res + o, y + o, nw, hs + o, hidden, eps, red, false);
            __syncthreads();  // xs (norm_row's staging) is reused by the next row; hs complete
        }
    };
    // Warps past the last column load nothing and store nothing (nc = 0) but take part in the norm.
    gemv_cols_pre<UNR, 1, float, true>(hs, hidden, w + (i64)min(j, E - 1) * hidden, 0, logits, E, j, j < E ? 1 : 0,
                                       rows, hidden, pre);
    __threadfence();  // this CTA's logits are visible device-wide before it counts itself done
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(done, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    if (warp < rows) {
        route_token(logits, b, ids, wts, nullptr, warp, E, G, topk_group, top_k, norm, scaling,
                    smem + (i64)warp * (3 * E + 2 * G + top_k));
    } else if (store && warp >= GEMV_ROWS) {
        // x += y as add_rms_norm stores it (every CTA has read x), and h for the expert kernels
        // (store == 0: the PRE gate/up kernel normalises for itself, the down kernel adds).
        const int n = rows * hidden, tid = threadIdx.x - GEMV_ROWS * 32, nt = blockDim.x - GEMV_ROWS * 32;
        for (int i = tid; i < n; i += nt) {
            res[i] = f32_to_bf16(bf16_to_f32(res[i]) + bf16_to_f32(y[i]));
            h_out[i] = hs[i];
        }
    }
    if (threadIdx.x == 0) *done = 0u;
}

// The sparse-MLA split combine merged into the per-head W_UV GEMV (backend.rs `sparse_mla_uv`,
// decode rows): mla_combine_bf16 then gemv on the [rows, heads*r] output, the same bits, without
// the combined rows' round trip through memory and one launch fewer. Grid (rows, heads, column
// blocks of CU_WARPS * 4 outputs). The combined row of (row t, head h) — split weights as
// mla_combine's 128-thread block computes them (combine.cuh), each column rounded to bf16 as
// mla_combine stores it — lands in every CTA's shared memory, then its warps compute 4 output
// columns each from that copy, as the GEMV does (their weight rows are loaded before the PDL wait).
// cz > 1: the grid's z CTAs of a (row, head) are one thread-block cluster of cz = gridDim.z CTAs;
// CTA z combines the columns of chunk z only and reads the others from its peers' shared memory,
// so each partial is read once, not cz times. cz == 1: every CTA combines the whole row.
// A thread's first column's partials of the first CU_PRE splits are loaded before the split
// weights are reduced (they do not depend on them, so the latencies overlap, as in mla_combine);
// a column's sum runs over the splits in order either way.
// w: [heads, n_out, r] bf16; y: [rows, heads * n_out] bf16. Dynamic shared memory: `splits` floats
// rounded up to a multiple of 4, then the combined row, r bf16 (r % 8 == 0).
#define CU_WARPS 8  // mla.rs CU_WARPS
#define CU_PRE 32  // with the GEMV's preloaded weights, <= 128 registers: two CTAs per SM
#define COMBINE_BLOCK_THREADS 128  // mla.rs COMBINE_THREADS: the combine's reduction shape

__device__ __forceinline__ void cluster_barrier() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

// 16 bytes at the same shared-memory offset as `local` in cluster CTA `rank`.
__device__ __forceinline__ uint4 ld_peer16(const void* local, unsigned rank) {
    unsigned long long g;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(g) : "l"(local));
    unsigned a;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(a) : "r"((unsigned)g), "r"(rank));
    uint4 v;
    asm volatile("ld.shared::cluster.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a) : "memory");
    return v;
}

extern "C" __global__ void __launch_bounds__(CU_WARPS * 32, 2)
    mla_combine_uv(const float* ws_o, const float* ws_ml, int heads, int r, int splits, const bf16_t* w, int n_out,
                   bf16_t* y, int cz) {
    extern __shared__ float smem[];
    __shared__ float red[32];
    float* sw = smem;
    bf16_t* xs = (bf16_t*)(smem + ((splits + 3) & ~3));
    const int t = blockIdx.x, h = blockIdx.y;
    const int j0 = (blockIdx.z * CU_WARPS + (threadIdx.x >> 5)) * 4;
    const unsigned long long base = (unsigned long long)t * splits * heads + h;
    auto pre = [&] {
        pdl_wait();
        const int chunk = cz > 1 ? (((r + cz - 1) / cz + 7) & ~7) : r;
        const int cb = cz > 1 ? (int)blockIdx.z * chunk : 0, ce = min(r, cb + chunk);
        const int c0 = cb + threadIdx.x;
        const int npre = c0 < ce ? min(splits, CU_PRE) : 0;
        float pv[CU_PRE];
#pragma unroll
        for (int u = 0; u < CU_PRE; ++u) pv[u] = u < npre ? ws_o[(base + (unsigned long long)u * heads) * r + c0] : 0.0f;
        const float inv = combine_weights(ws_ml, base, heads, splits, sw, red, COMBINE_BLOCK_THREADS);
        for (int c = c0; c < ce; c += blockDim.x) {
            float acc = 0.0f;
            int s = 0;
            if (c == c0) {  // splits 0 .. npre from the preloaded values, in order (combine.cuh)
#pragma unroll
                for (int u = 0; u < CU_PRE; ++u) {
                    if (u < npre) {
                        const float wt = sw[u];
                        if (wt != 0.0f) acc = fmaf(wt, pv[u], acc);
                    }
                }
                s = npre;
            }
            xs[c] = f32_to_bf16(combine_col<32>(ws_o, base, heads, r, splits, sw, c, s, acc) * inv);
        }
        if (cz > 1) {
            cluster_barrier();  // every CTA's chunk is in its shared memory
            for (int v = threadIdx.x; v < (r >> 3); v += blockDim.x) {
                const int owner = (8 * v) / chunk;
                if (owner != (int)blockIdx.z) *(uint4*)(xs + 8 * v) = ld_peer16(xs + 8 * v, (unsigned)owner);
            }
            cluster_barrier();  // no CTA reads a peer's row after this (a peer may exit)
        }
        __syncthreads();
    };
    // Warps past the last column load and store nothing (nc = 0) but take part in the combine.
    const int nc = max(0, min(4, n_out - j0));
    gemv_cols_pre<2, 4, bf16_t, true>(xs, r, w + ((i64)h * n_out + min(j0, n_out - 1)) * r, r,
                                      y + ((i64)t * heads + h) * n_out, 0, j0, nc, 1, r, pre);
}
