// FP8-faithful lightning-indexer transform (crates/indexcache-cuda/src/fp8.rs): on every consecutive
// BLOCK-wide block of a contiguous tensor, the orthonormal Walsh–Hadamard rotation, then UE8M0-scaled
// e4m3 fake quantisation (DeepSeek-V3.2's `act_quant(·, 128, scale_fmt="ue8m0")` followed by
// dequantisation), in place.
//
// The definition, and the exact sequence of f32 operations, is that of the CPU function
// `indexcache_ops::cpu::fp8_indexer::hadamard_fp8_inplace` (bf16 storage:
// `hadamard_fp8_bf16_inplace`, which rounds the rotation to bf16 before quantising, as the reference's
// bf16 `hadamard_transform` does). The two agree bit for bit:
//   * butterflies in stage order h = 1, 2, 4, ..., BLOCK/2, each pair (i, i+h), i & h == 0, becoming
//     (x[i] + x[i+h], x[i] - x[i+h]) — no multiplies, so nothing can be contracted into an FMA;
//   * then x * hscale (the host passes the CPU's `hadamard_scale(BLOCK)`), [bf16 rounding];
//   * amax = max |x| (order-free), scale exponent k from the bits of f32(max(amax, 1e-4) * f32(1/448));
//   * x = e4m3_round(x * 2^-k) * 2^k, e4m3_round being the CPU's integer-only code, transliterated.
//
// Layout: one warp per block; lane l holds the EPL = BLOCK/32 consecutive elements l*EPL .. l*EPL+EPL-1
// (one 16-byte f32 / 8-byte bf16 vector load for BLOCK = 128). Stages h < EPL run inside a lane; stage
// h = m*EPL (m = 1..16) pairs lane l with lane l ^ m through __shfl_xor_sync: the lane with bit m set
// holds the upper element and computes partner - own, the other own + partner.
//
// No CUDA headers: bf16 is an `unsigned short` bit pattern.

typedef unsigned short bf16_t;
typedef unsigned int u32;
typedef long long i64;

#define FULL_MASK 0xffffffffu
#define FP8_THREADS 256  // 8 warps = 8 blocks per CTA; must match fp8.rs

// ---- scalar helpers (see cpu/fp8_indexer.rs for the commented originals) ----------------------------

__device__ __forceinline__ float bf16_to_f32(bf16_t v) { return __uint_as_float(((u32)v) << 16); }

// Nearest-even; NaN stays a quiet NaN (same bits as half::bf16::from_f32).
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

__device__ __forceinline__ float bf16_round(float f) { return bf16_to_f32(f32_to_bf16(f)); }

// Nearest e4m3fn value (ties to even), saturating at +-448, NaN unchanged, sign kept.
__device__ __forceinline__ float e4m3_round(float x) {
    const u32 u = __float_as_uint(x);
    const u32 sign = u & 0x80000000u;
    const u32 a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return x;                                     // NaN
    if (a >= 0x43e00000u) return __uint_as_float(sign | 0x43e00000u);  // |x| >= 448, inf: 448
    u32 r;
    if (a >= 0x3c800000u) {
        // |x| >= 2^-6: e4m3 normal, keep 3 mantissa bits, nearest-even (a carry into the exponent is right).
        r = (a + 0x7ffffu + ((a >> 20) & 1u)) & 0xfff00000u;
    } else {
        // |x| < 2^-6: q * 2^-9 with q = round(sig / 2^(141 - e)), e the biased exponent (1 for subnormals).
        u32 e = a >> 23;
        u32 sig;
        if (e == 0) {
            sig = a;
            e = 1;
        } else {
            sig = (a & 0x7fffffu) | 0x800000u;
        }
        const u32 sh = 141u - e;  // >= 21
        u32 q = 0;
        if (sh < 32u) {
            q = sig >> sh;
            const u32 rem = sig & ((1u << sh) - 1u);
            const u32 half = 1u << (sh - 1u);
            q += (rem > half || (rem == half && (q & 1u))) ? 1u : 0u;
        }
        r = __float_as_uint((float)q * 0.001953125f);  // q <= 8: exact
    }
    return __uint_as_float(sign | r);
}

// log2 of the UE8M0 scale: ceil(log2(f32(max(amax, 1e-4) * f32(1/448)))) from the exponent bits, capped
// at 126 (only amax = inf gets there).
__device__ __forceinline__ int ue8m0_exponent(float amax) {
    const float r = fmaxf(amax, __uint_as_float(0x38d1b717u)) * __uint_as_float(0x3b124925u);
    const u32 b = __float_as_uint(r);
    const int e = (int)((b >> 23) & 0xffu) - 127 + ((b & 0x7fffffu) != 0u ? 1 : 0);
    return e < 126 ? e : 126;
}

// ---- lane loads / stores of EPL consecutive elements --------------------------------------------------

template <int EPL>
__device__ __forceinline__ void load(const float* p, float* v) {
    if constexpr (EPL == 4) {
        const float4 t = *reinterpret_cast<const float4*>(p);
        v[0] = t.x;
        v[1] = t.y;
        v[2] = t.z;
        v[3] = t.w;
    } else if constexpr (EPL == 2) {
        const float2 t = *reinterpret_cast<const float2*>(p);
        v[0] = t.x;
        v[1] = t.y;
    } else {
        v[0] = p[0];
    }
}

template <int EPL>
__device__ __forceinline__ void store(float* p, const float* v) {
    if constexpr (EPL == 4) {
        *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    } else if constexpr (EPL == 2) {
        *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
    } else {
        p[0] = v[0];
    }
}

// Little-endian: element 2j is the low half of 32-bit word j.
template <int EPL>
__device__ __forceinline__ void load(const bf16_t* p, float* v) {
    if constexpr (EPL == 4) {
        const uint2 t = *reinterpret_cast<const uint2*>(p);
        v[0] = __uint_as_float(t.x << 16);
        v[1] = __uint_as_float(t.x & 0xffff0000u);
        v[2] = __uint_as_float(t.y << 16);
        v[3] = __uint_as_float(t.y & 0xffff0000u);
    } else if constexpr (EPL == 2) {
        const u32 t = *reinterpret_cast<const u32*>(p);
        v[0] = __uint_as_float(t << 16);
        v[1] = __uint_as_float(t & 0xffff0000u);
    } else {
        v[0] = bf16_to_f32(p[0]);
    }
}

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16);
}

template <int EPL>
__device__ __forceinline__ void store(bf16_t* p, const float* v) {
    if constexpr (EPL == 4) {
        *reinterpret_cast<uint2*>(p) = make_uint2(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]));
    } else if constexpr (EPL == 2) {
        *reinterpret_cast<u32*>(p) = pack_bf16(v[0], v[1]);
    } else {
        p[0] = f32_to_bf16(v[0]);
    }
}

// ---- the transform --------------------------------------------------------------------------------------

// One warp per block of 32*EPL elements. `nblocks` = elements / (32*EPL); the warp index is uniform across
// the warp, so a warp past the end leaves as a whole and every shuffle below runs with all 32 lanes.
template <typename T, int EPL, bool BF16_ROTATION>
__device__ __forceinline__ void hadamard_fp8(T* __restrict__ x, i64 nblocks, float hscale) {
    const int lane = threadIdx.x & 31;
    const i64 b = (i64)blockIdx.x * (FP8_THREADS / 32) + (threadIdx.x >> 5);
    if (b >= nblocks) return;
    T* p = x + b * (32 * EPL) + lane * EPL;
    float v[EPL];
    load<EPL>(p, v);

    // In-lane stages h = 1 .. EPL/2.
#pragma unroll
    for (int h = 1; h < EPL; h <<= 1) {
#pragma unroll
        for (int i = 0; i < EPL; ++i) {
            if ((i & h) == 0) {
                const float lo = v[i], hi = v[i + h];
                v[i] = lo + hi;
                v[i + h] = lo - hi;
            }
        }
    }
    // Cross-lane stages h = m*EPL, m = 1, 2, 4, 8, 16.
#pragma unroll
    for (int m = 1; m < 32; m <<= 1) {
        const bool upper = (lane & m) != 0;
#pragma unroll
        for (int i = 0; i < EPL; ++i) {
            const float other = __shfl_xor_sync(FULL_MASK, v[i], m);
            v[i] = upper ? (other - v[i]) : (v[i] + other);
        }
    }

    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
        v[i] = v[i] * hscale;
        if (BF16_ROTATION) v[i] = bf16_round(v[i]);
        amax = fmaxf(amax, fabsf(v[i]));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(FULL_MASK, amax, o));

    const int k = ue8m0_exponent(amax);
    const float s = __uint_as_float((u32)(k + 127) << 23);
    const float inv = __uint_as_float((u32)(127 - k) << 23);
#pragma unroll
    for (int i = 0; i < EPL; ++i) v[i] = e4m3_round(v[i] * inv) * s;
    store<EPL>(p, v);
}

#define FP8_ENTRY(NAME, T, EPL, ROT)                                                          \
    extern "C" __global__ void __launch_bounds__(FP8_THREADS) NAME(T* __restrict__ x, i64 nblocks, \
                                                                    float hscale) { \
        PDL_ENTRY();                                                                          \
        hadamard_fp8<T, EPL, ROT>(x, nblocks, hscale);                                        \
    }

FP8_ENTRY(hadamard_fp8_f32_b128, float, 4, false)
FP8_ENTRY(hadamard_fp8_f32_b64, float, 2, false)
FP8_ENTRY(hadamard_fp8_f32_b32, float, 1, false)
FP8_ENTRY(hadamard_fp8_bf16_b128, bf16_t, 4, true)
FP8_ENTRY(hadamard_fp8_bf16_b64, bf16_t, 2, true)
FP8_ENTRY(hadamard_fp8_bf16_b32, bf16_t, 1, true)
