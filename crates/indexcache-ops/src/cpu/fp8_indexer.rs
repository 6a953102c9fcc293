//! FP8-faithful lightning-indexer numerics: Walsh–Hadamard rotation + UE8M0-scaled e4m3 fake
//! quantisation, in place, on consecutive blocks of a row-major buffer.
//!
//! DeepSeek-V3.2's reference indexer (and every production engine) scores top-k candidates with
//! FP8 vectors. Per token, the RoPE'd indexer q (`[H_I, 128]`) and k (`[128]`) go through
//!
//! 1. `hadamard_transform(v, scale = 128^-0.5)`: the orthonormal Walsh–Hadamard transform in
//!    Sylvester order over each 128-wide head vector (bf16 in/out in the reference);
//! 2. `act_quant(v, block = 128, scale_fmt = "ue8m0")`: per block `amax = max(max|v|, 1e-4)`,
//!    `s = 2^ceil(log2(amax / 448))` (a power of two — "UE8M0"), `v8 = e4m3(clamp(v / s, ±448))`
//!    with round-to-nearest-even (e4m3fn: bias 7, 3 mantissa bits, max 448, subnormals down to
//!    2^-9, no infinities);
//!
//! and the score is `I[t,s] = k_s[s] · Σ_h w[t,h] · q_s[t,h] · ReLU(q8[t,h] · k8[s])`. As the
//! scales are positive powers of two this equals the ordinary indexer score on the *fake-quantised*
//! vectors `q̃ = q8 · q_s`, `k̃ = k8 · k_s` — which is what this module produces: after
//! [`hadamard_fp8_inplace`] every block holds `e4m3_value · 2^k`, exactly representable in f32 and
//! in bf16, so the existing `indexer_topk` op scores them unchanged.
//!
//! Exact definitions (the CUDA kernel `indexcache-cuda/src/kernels/fp8.cu` performs the very same
//! f32 operations in the same order, so the two agree bit for bit on f32 inputs):
//!
//! * **Hadamard** ([`hadamard_inplace`]): butterfly stages `h = 1, 2, 4, …, n/2` in that order; at
//!   stage `h` every pair `(i, i + h)` with `i & h == 0` becomes `(x[i] + x[i+h], x[i] − x[i+h])`
//!   (f32); then every element is multiplied by [`hadamard_scale`]`(n)` = `f32(n^-0.5)` (the f32
//!   nearest the f64 value, as the reference passes a Python float). The unscaled result is
//!   `Σ_j (−1)^popcount(i & j) x[j]` (Sylvester order, `scipy.linalg.hadamard`).
//! * **Scale** ([`ue8m0_scale`]): `r = f32(max(amax, 1e-4) · f32(1/448))`, then `2^ceil(log2 r)`
//!   from the bits of `r` — exactly `fast_round_scale` of the reference's `act_quant_kernel`. (For
//!   every f32 `amax` this equals `2^ceil(log2(amax / 448))` with an exact division; the fixture
//!   generator checks that over a full binade.)
//! * **Quantise** ([`quant_block_inplace`]): `v ← e4m3_round(v · (1/s)) · s` (`1/s` is an exact power
//!   of two, so the product equals the reference's `v / s`; [`e4m3_round`] saturates at ±448, which
//!   is the reference's clamp).
//! * **bf16 variant** ([`hadamard_fp8_bf16_inplace`]): as above, with the rotated values rounded to
//!   bf16 (nearest-even) before the amax and the quantisation — the reference's dataflow, where
//!   `hadamard_transform` returns bf16. The CUDA kernel does this in bf16 storage mode.
//!
//! Non-finite inputs: NaN elements stay NaN and do not take part in the amax; infinities are not
//! supported (the reference has no defined behaviour for them either).
//!
//! Cost per 128-block: 7·128 adds + 128 multiplies for the rotation, ~10 integer/float ops per
//! element for the quantisation; the op streams each element once (read + write), so it is
//! memory-bound everywhere (4 + 4 bytes per f32 element).
//!
//! Beside each fast function is a plain reference twin (`*_reference`), used by the tests.

use crate::{OpError, OpResult};
use rayon::prelude::*;

/// Largest finite e4m3fn magnitude.
pub const E4M3_MAX: f32 = 448.0;
/// `f32(1/448)`, the reference's `fp8_max_inv` (bits `0x3b124925`).
pub const E4M3_MAX_INV: f32 = 1.0 / 448.0;
/// Floor on a block's amax (`max(amax, 1e-4)` in the reference).
pub const AMAX_FLOOR: f32 = 1e-4;
/// The reference's block size (one block per indexer head vector).
pub const BLOCK: usize = 128;

const OP: &str = "indexer_fp8_quant";

/// Elements above which [`hadamard_fp8_inplace`] runs its blocks in parallel.
const PAR_MIN_ELEMS: usize = 1 << 15;

// ---- scalar helpers -----------------------------------------------------------------------------

/// Round `x` to the nearest e4m3fn value (ties to even), saturating: `|x| ≥ 448` (and ±∞) gives
/// ±448; NaN is returned unchanged; the sign is kept (tiny negatives give −0.0). Values below
/// 2^-6 round to multiples of 2^-9 (e4m3 subnormals). Integer-only bit manipulation (the CUDA
/// kernel runs the same code).
#[inline]
pub fn e4m3_round(x: f32) -> f32 {
    let u = x.to_bits();
    let sign = u & 0x8000_0000;
    let a = u & 0x7fff_ffff;
    if a > 0x7f80_0000 {
        return x; // NaN
    }
    if a >= 0x43e0_0000 {
        return f32::from_bits(sign | 0x43e0_0000); // |x| >= 448 (incl. inf): saturate
    }
    let r = if a >= 0x3c80_0000 {
        // |x| >= 2^-6: an e4m3 normal; keep 3 of the 23 mantissa bits, nearest-even. A carry
        // into the exponent is the correct result; below 448 it cannot pass 448.
        (a + 0x7_ffff + ((a >> 20) & 1)) & 0xfff0_0000
    } else {
        // |x| < 2^-6: the result is q · 2^-9, q in 0..=8. |x| = sig · 2^(e - 150) (e = biased
        // exponent, subnormals as e = 1), so q = round(sig / 2^(141 - e)).
        let e = a >> 23;
        let (sig, e) = if e == 0 { (a, 1) } else { ((a & 0x7f_ffff) | 0x80_0000, e) };
        let sh = 141 - e; // >= 21
        let q = if sh >= 32 {
            0
        } else {
            let q = sig >> sh;
            let rem = sig & ((1u32 << sh) - 1);
            let half = 1u32 << (sh - 1);
            q + u32::from(rem > half || (rem == half && q & 1 == 1))
        };
        (q as f32 * (1.0 / 512.0)).to_bits()
    };
    f32::from_bits(sign | r)
}

/// Plain twin of [`e4m3_round`]: f64 arithmetic (quantum from `log2`, `round_ties_even`).
pub fn e4m3_round_reference(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let a = (x as f64).abs();
    let mag = if a >= E4M3_MAX as f64 {
        E4M3_MAX as f64
    } else {
        // Spacing of e4m3 values around a: 2^(floor(log2 a) - 3) for normals, 2^-9 below 2^-6.
        let quantum = if a < 2f64.powi(-6) { 2f64.powi(-9) } else { 2f64.powf(a.log2().floor() - 3.0) };
        ((a / quantum).round_ties_even() * quantum).min(E4M3_MAX as f64)
    };
    (mag as f32).copysign(x)
}

/// The value of e4m3fn code `c` (sign bit 7, exponent bits 6..3 with bias 7, mantissa bits 2..0);
/// codes `0x7f` and `0xff` are NaN (e4m3fn has no infinities).
pub fn e4m3_decode(c: u8) -> f32 {
    let sign = if c & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((c >> 3) & 0xf) as i32;
    let m = (c & 7) as f64;
    let v = if e == 15 && m == 7.0 {
        f64::NAN
    } else if e == 0 {
        m / 8.0 * 2f64.powi(-6)
    } else {
        (1.0 + m / 8.0) * 2f64.powi(e - 7)
    };
    (sign * v) as f32
}

/// The UE8M0 (power-of-two) scale of a block whose largest magnitude is `amax`:
/// `2^ceil(log2(f32(max(amax, 1e-4) · f32(1/448))))`, via the exponent bits as the reference's
/// `fast_round_scale` does. The exponent is capped at 126 (only reachable for `amax = ∞`), so both
/// the scale and its reciprocal are normal floats.
#[inline]
pub fn ue8m0_scale(amax: f32) -> f32 {
    f32::from_bits(((ue8m0_exponent(amax) + 127) as u32) << 23)
}

/// `log2` of [`ue8m0_scale`]`(amax)`, in `-22..=126` for finite `amax`.
#[inline]
pub fn ue8m0_exponent(amax: f32) -> i32 {
    let r = (amax.max(AMAX_FLOOR) * E4M3_MAX_INV).to_bits();
    let e = ((r >> 23) & 0xff) as i32 - 127 + i32::from(r & 0x7f_ffff != 0);
    e.min(126)
}

/// Plain twin of [`ue8m0_scale`]: `2^ceil(log2 r)` in f64 with the same `r`.
pub fn ue8m0_scale_reference(amax: f32) -> f32 {
    let r = (amax.max(AMAX_FLOOR) * E4M3_MAX_INV) as f64;
    2f64.powf(r.log2().ceil().min(126.0)) as f32
}

/// Round to the nearest bf16 (ties to even), returned as f32; NaN stays a quiet NaN (the same
/// bits as `half::bf16::from_f32` and the CUDA kernels' `f32_to_bf16`).
#[inline]
pub fn bf16_round(x: f32) -> f32 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return f32::from_bits((u | 0x0040_0000) & 0xffff_0000);
    }
    f32::from_bits((u.wrapping_add(0x7fff + ((u >> 16) & 1))) & 0xffff_0000)
}

/// The orthonormal Walsh–Hadamard scale for `n` elements: `f32(n^-0.5)` rounded from f64
/// (`0x3db504f3` for 128). The CUDA kernel receives this very value.
pub fn hadamard_scale(n: usize) -> f32 {
    (n as f64).powf(-0.5) as f32
}

// ---- one block ----------------------------------------------------------------------------------

/// Orthonormal Walsh–Hadamard transform (Sylvester order) of one block, in place. `x.len()` must
/// be a power of two. Stage order and operand order are part of the contract (see the module docs).
pub fn hadamard_inplace(x: &mut [f32]) {
    let n = x.len();
    debug_assert!(n.is_power_of_two());
    let mut h = 1;
    while h < n {
        for base in (0..n).step_by(2 * h) {
            let (lo, hi) = x[base..base + 2 * h].split_at_mut(h);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (u, v) = (*a, *b);
                *a = u + v;
                *b = u - v;
            }
        }
        h *= 2;
    }
    let s = hadamard_scale(n);
    for v in x.iter_mut() {
        *v *= s;
    }
}

/// Plain twin of [`hadamard_inplace`]: the explicit Sylvester matrix `H[i][j] = (−1)^popcount(i&j)`,
/// each row sum accumulated in f64, rounded to f32, times [`hadamard_scale`]. Equal bit for bit to
/// the fast version whenever the f32 butterfly sums are exact (e.g. all inputs multiples of `2^q`
/// with `Σ|x| < 2^(24+q)`); otherwise within a few f32 ulps of `‖x‖·n^-½`.
pub fn hadamard_reference(x: &mut [f32]) {
    let n = x.len();
    let s = hadamard_scale(n);
    let y: Vec<f32> = (0..n)
        .map(|i| {
            let sum: f64 =
                (0..n).map(|j| if (i & j).count_ones().is_multiple_of(2) { x[j] as f64 } else { -(x[j] as f64) }).sum();
            (sum as f32) * s
        })
        .collect();
    x.copy_from_slice(&y);
}

/// UE8M0 e4m3 fake quantisation of one block in place (`act_quant` followed by dequantisation);
/// returns the block's scale `s` (the e4m3 codes are `v / s`).
#[inline]
pub fn quant_block_inplace(x: &mut [f32]) -> f32 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let k = ue8m0_exponent(amax);
    let s = f32::from_bits(((k + 127) as u32) << 23);
    let inv = f32::from_bits(((127 - k) as u32) << 23);
    for v in x.iter_mut() {
        *v = e4m3_round(*v * inv) * s;
    }
    s
}

/// Plain twin of [`quant_block_inplace`], written as the reference reads:
/// `clamp(v / s, −448, 448)` → e4m3 → `· s`.
pub fn quant_block_reference(x: &mut [f32]) -> f32 {
    let mut amax = 0.0f32;
    for v in x.iter() {
        if v.abs() > amax {
            amax = v.abs();
        }
    }
    let s = ue8m0_scale_reference(amax);
    for v in x.iter_mut() {
        *v = e4m3_round_reference((*v / s).clamp(-E4M3_MAX, E4M3_MAX)) * s;
    }
    s
}

// ---- whole buffers ------------------------------------------------------------------------------

fn check(len: usize, block: usize) -> OpResult<()> {
    if block == 0 || !block.is_power_of_two() || !len.is_multiple_of(block) {
        return Err(OpError::new(
            OP,
            format!("[{len}] in blocks of {block}"),
            "the block must be a power of two dividing the buffer length",
        ));
    }
    Ok(())
}

fn for_each_block(x: &mut [f32], block: usize, f: impl Fn(&mut [f32]) + Sync) {
    if x.len() >= PAR_MIN_ELEMS {
        x.par_chunks_mut(block.max(PAR_MIN_ELEMS / 8 / block * block)).for_each(|c| c.chunks_mut(block).for_each(&f));
    } else {
        x.chunks_mut(block).for_each(f);
    }
}

/// The FP8-faithful indexer transform on every consecutive `block`-wide block of `x` (a row-major
/// `[rows, heads·block]` q or `[rows, block]` k): Hadamard rotation, then UE8M0 e4m3 fake
/// quantisation, all in f32. `block` must be a power of two dividing `x.len()` (128 for the
/// models; smaller powers of two for tests).
pub fn hadamard_fp8_inplace(x: &mut [f32], block: usize) -> OpResult<()> {
    check(x.len(), block)?;
    for_each_block(x, block, |b| {
        hadamard_inplace(b);
        quant_block_inplace(b);
    });
    Ok(())
}

/// As [`hadamard_fp8_inplace`], with the rotated values rounded to bf16 before quantisation (the
/// reference's bf16 `hadamard_transform` output). The CUDA kernel's bf16 storage mode computes
/// exactly this on the widened bf16 inputs.
pub fn hadamard_fp8_bf16_inplace(x: &mut [f32], block: usize) -> OpResult<()> {
    check(x.len(), block)?;
    for_each_block(x, block, |b| {
        hadamard_inplace(b);
        for v in b.iter_mut() {
            *v = bf16_round(*v);
        }
        quant_block_inplace(b);
    });
    Ok(())
}

/// Plain twin of [`hadamard_fp8_inplace`] / [`hadamard_fp8_bf16_inplace`] (`bf16_rotation`), one
/// block after another with the reference helpers.
pub fn hadamard_fp8_reference(x: &mut [f32], block: usize, bf16_rotation: bool) -> OpResult<()> {
    check(x.len(), block)?;
    for b in x.chunks_mut(block) {
        hadamard_reference(b);
        if bf16_rotation {
            for v in b.iter_mut() {
                *v = bf16_round(*v);
            }
        }
        quant_block_reference(b);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    fn finite_codes() -> impl Iterator<Item = u8> {
        (0..=255u8).filter(|&c| c & 0x7f != 0x7f)
    }

    /// Positive finite e4m3 values in increasing order with their codes (0x00..=0x7e).
    fn positive_table() -> Vec<(u8, f32)> {
        (0..0x7fu8).map(|c| (c, e4m3_decode(c))).collect()
    }

    #[test]
    fn decode_table_is_the_e4m3fn_format() {
        let t = positive_table();
        assert_eq!(t[0].1, 0.0);
        assert_eq!(t[1].1, 2f32.powi(-9), "smallest subnormal");
        assert_eq!(t[8].1, 2f32.powi(-6), "smallest normal");
        assert_eq!(t[0x7e].1, 448.0);
        assert_eq!(e4m3_decode(0x38), 1.0);
        assert!(e4m3_decode(0x7f).is_nan() && e4m3_decode(0xff).is_nan());
        assert_eq!(e4m3_decode(0x80).to_bits(), (-0.0f32).to_bits());
        for w in t.windows(2) {
            assert!(w[0].1 < w[1].1, "codes must be monotone: {:?}", w);
        }
        for c in finite_codes() {
            assert_eq!(e4m3_decode(c | 0x80), -e4m3_decode(c & 0x7f));
        }
    }

    #[test]
    fn every_code_point_rounds_to_itself() {
        for c in finite_codes() {
            let v = e4m3_decode(c);
            assert_eq!(e4m3_round(v).to_bits(), v.to_bits(), "code {c:#04x} = {v}");
            assert_eq!(e4m3_round_reference(v).to_bits(), v.to_bits(), "reference, code {c:#04x}");
        }
    }

    #[test]
    fn midpoints_round_to_even_and_neighbours_to_nearest() {
        let t = positive_table();
        for w in t.windows(2) {
            let ((c0, v0), (c1, v1)) = (w[0], w[1]);
            let mid = (v0 + v1) / 2.0; // exact in f32
            assert_eq!((mid as f64), (v0 as f64 + v1 as f64) / 2.0);
            let even = if c0.is_multiple_of(2) { v0 } else { v1 };
            for sign in [1.0f32, -1.0] {
                let m = sign * mid;
                assert_eq!(e4m3_round(m), sign * even, "midpoint {m} of codes {c0:#x},{c1:#x}");
                assert_eq!(e4m3_round_reference(m), sign * even, "reference midpoint {m}");
                let below = f32::from_bits(mid.to_bits() - 1) * sign;
                let above = f32::from_bits(mid.to_bits() + 1) * sign;
                assert_eq!(e4m3_round(below), sign * v0, "just below {m}");
                assert_eq!(e4m3_round(above), sign * v1, "just above {m}");
            }
        }
    }

    #[test]
    fn saturation_nan_and_signed_zero() {
        for x in [448.0f32, 448.001, 455.9, 463.99, 464.0, 464.01, 479.0, 480.0, 1e6, f32::MAX, f32::INFINITY] {
            assert_eq!(e4m3_round(x), 448.0, "{x}");
            assert_eq!(e4m3_round(-x), -448.0, "{x}");
            assert_eq!(e4m3_round_reference(x), 448.0, "reference {x}");
        }
        assert_eq!(e4m3_round(447.99), 448.0);
        assert_eq!(e4m3_round(431.99), 416.0);
        assert_eq!(e4m3_round(432.0), 448.0, "tie 416|448 goes to even code 0x7e");
        assert!(e4m3_round(f32::NAN).is_nan());
        let payload = f32::from_bits(0x7fc0_1234);
        assert_eq!(e4m3_round(payload).to_bits(), payload.to_bits(), "NaN preserved");
        assert_eq!(e4m3_round(-1e-30).to_bits(), (-0.0f32).to_bits());
        assert_eq!(e4m3_round(-0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!(e4m3_round(2f32.powi(-10)), 0.0, "tie 0|2^-9 goes to 0");
        assert_eq!(e4m3_round(f32::from_bits(0x3a80_0001)), 2f32.powi(-9));
        assert_eq!(e4m3_round(f32::from_bits(1)), 0.0, "f32 subnormal");
    }

    /// The nearest table value (ties to the even code), found by scanning all 127 magnitudes.
    fn brute_force(x: f32, t: &[(u8, f32)]) -> f32 {
        let a = x.abs().min(E4M3_MAX) as f64;
        let mut best = t[0];
        for &(c, v) in t {
            let (d, db) = ((v as f64 - a).abs(), (best.1 as f64 - a).abs());
            if d < db || (d == db && c.is_multiple_of(2)) {
                best = (c, v);
            }
        }
        best.1.copysign(x)
    }

    #[test]
    fn e4m3_round_matches_brute_force_and_reference() {
        let t = positive_table();
        let mut rng = StdRng::seed_from_u64(7);
        for i in 0..200_000u32 {
            // Log-uniform magnitudes over the whole e4m3 range and beyond, plus raw bit patterns.
            let x = if i % 2 == 0 {
                let m = 2f32.powf(rng.random_range(-14.0f32..10.0)) * rng.random_range(1.0f32..2.0);
                if rng.random_bool(0.5) { -m } else { m }
            } else {
                f32::from_bits(rng.random::<u32>() & 0xc3ff_ffff) // |x| < 512 or tiny
            };
            if x.is_nan() {
                continue;
            }
            let want = brute_force(x, &t);
            assert_eq!(e4m3_round(x).to_bits(), want.to_bits(), "x = {x:e} ({:#x})", x.to_bits());
            assert_eq!(e4m3_round_reference(x).to_bits(), want.to_bits(), "reference, x = {x:e}");
        }
        // Every f32 bit pattern of a dense stride over [0, 2^9), both signs: fast == reference.
        for u in (0..0x4400_0000u32).step_by(997) {
            for x in [f32::from_bits(u), -f32::from_bits(u)] {
                assert_eq!(e4m3_round(x).to_bits(), e4m3_round_reference(x).to_bits(), "{x:e}");
            }
        }
    }

    #[test]
    fn ue8m0_scale_is_the_smallest_sufficient_power_of_two() {
        assert_eq!(E4M3_MAX_INV.to_bits(), 0x3b12_4925);
        assert_eq!(AMAX_FLOOR.to_bits(), 0x38d1_b717);
        let mut rng = StdRng::seed_from_u64(3);
        let mut amaxes: Vec<f32> = (0..100_000).map(|_| 2f32.powf(rng.random_range(-30.0f32..120.0))).collect();
        for k in -20..100 {
            let b = 448.0 * 2f32.powi(k);
            amaxes.extend([b, f32::from_bits(b.to_bits() - 1), f32::from_bits(b.to_bits() + 1)]);
        }
        amaxes.extend([0.0, 1e-30, 1e-4, 9e-5, f32::MAX]);
        for &a in &amaxes {
            let s = ue8m0_scale(a);
            assert_eq!(s.to_bits() & 0x7f_ffff, 0, "power of two, amax {a:e}");
            assert_eq!(s.to_bits(), ue8m0_scale_reference(a).to_bits(), "amax {a:e}");
            let af = a.max(AMAX_FLOOR) as f64;
            assert!(af / s as f64 <= 448.0, "amax {a:e} / s {s:e} > 448");
            assert!(af / s as f64 > 224.0, "amax {a:e}: s {s:e} not the smallest");
            assert_eq!(s, 2f32.powi(ue8m0_exponent(a)));
        }
        for k in -20..100 {
            assert_eq!(ue8m0_scale(448.0 * 2f32.powi(k)), 2f32.powi(k), "boundary amax = 448·2^{k}");
        }
        assert_eq!(ue8m0_scale(0.0), 2f32.powi(-22), "floor 1e-4 → 2^ceil(log2(1e-4/448)) = 2^-22");
        assert_eq!(ue8m0_exponent(f32::MAX), 120);
    }

    #[test]
    fn bf16_round_is_nearest_even() {
        assert_eq!(bf16_round(1.0), 1.0);
        assert_eq!(bf16_round(f32::from_bits(0x3f80_8000)), 1.0, "tie to even (down)");
        assert_eq!(bf16_round(f32::from_bits(0x3f81_8000)), f32::from_bits(0x3f82_0000), "tie to even (up)");
        assert_eq!(bf16_round(f32::from_bits(0x3f80_8001)), f32::from_bits(0x3f81_0000));
        assert!(bf16_round(f32::NAN).is_nan());
        assert_eq!(bf16_round(f32::from_bits(0x7f80_0001)).to_bits(), 0x7fc0_0000);
    }

    fn sylvester(n: usize) -> Vec<f32> {
        (0..n * n).map(|k| if ((k / n) & (k % n)).count_ones().is_multiple_of(2) { 1.0 } else { -1.0 }).collect()
    }

    #[test]
    fn hadamard_is_sylvester_ordered_and_orthonormal() {
        for n in [1usize, 2, 4, 8, 16, 32, 64, 128, 256] {
            let h = sylvester(n);
            let s = hadamard_scale(n);
            for j in 0..n {
                // H e_j = column j (scaled): the Sylvester order.
                let mut e = vec![0.0f32; n];
                e[j] = 1.0;
                hadamard_inplace(&mut e);
                for i in 0..n {
                    assert_eq!(e[i], h[i * n + j] * s, "n {n}, H[{i}][{j}]");
                }
                // H H e_j = e_j (exact when n is a power of 4, else within f32 rounding of s²).
                hadamard_inplace(&mut e);
                for (i, &v) in e.iter().enumerate() {
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((v - want).abs() <= 1e-6, "n {n}: (HH)[{i}][{j}] = {v}");
                    if n.trailing_zeros() % 2 == 0 {
                        assert_eq!(v, want, "n {n} (power of 4): HH = I exactly");
                    }
                }
            }
            // Norm preserved; fast == explicit matrix within rounding.
            let mut rng = StdRng::seed_from_u64(n as u64);
            for _ in 0..20 {
                let x: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0f32..3.0)).collect();
                let (mut a, mut b) = (x.clone(), x.clone());
                hadamard_inplace(&mut a);
                hadamard_reference(&mut b);
                let norm = |v: &[f32]| v.iter().map(|&t| t as f64 * t as f64).sum::<f64>().sqrt();
                assert!((norm(&a) - norm(&x)).abs() <= 1e-5 * norm(&x), "n {n}: ‖Hx‖ != ‖x‖");
                for (p, q) in a.iter().zip(&b) {
                    assert!((p - q).abs() <= 1e-5 * norm(&x) as f32, "n {n}: fast {p} vs matrix {q}");
                }
            }
        }
    }

    #[test]
    fn hadamard_matches_matrix_exactly_when_sums_are_exact() {
        let mut rng = StdRng::seed_from_u64(11);
        for n in [16usize, 128] {
            for _ in 0..50 {
                // Multiples of 2^-10 below 2^7: |partial sums| < 2^14, so all are exact in f32.
                let x: Vec<f32> = (0..n).map(|_| rng.random_range(-131_072i32..131_072) as f32 / 1024.0).collect();
                let (mut a, mut b) = (x.clone(), x);
                hadamard_inplace(&mut a);
                hadamard_reference(&mut b);
                assert_eq!(
                    a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
            }
        }
    }

    /// Random blocks with very different magnitudes (and a few special ones).
    fn test_data(seed: u64, blocks: usize, block: usize) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut x = Vec::with_capacity(blocks * block);
        for b in 0..blocks {
            let mag = 10f32.powf(rng.random_range(-7.0f32..6.0));
            for i in 0..block {
                let v = match b % 7 {
                    0 if i == 3 => 500.0 * mag,                 // one outlier
                    1 => rng.random_range(-1.0f32..1.0) * 1e-7, // below the amax floor
                    _ => rng.random_range(-1.0f32..1.0) * mag,
                };
                x.push(v);
            }
        }
        x
    }

    #[test]
    fn fast_pipeline_equals_reference_pipeline() {
        for block in [4usize, 32, 64, 128] {
            for bf16 in [false, true] {
                let x = test_data(block as u64 + bf16 as u64, 300, block);
                let (mut fast, mut slow) = (x.clone(), x.clone());
                if bf16 {
                    hadamard_fp8_bf16_inplace(&mut fast, block).unwrap();
                } else {
                    hadamard_fp8_inplace(&mut fast, block).unwrap();
                }
                // The fast and matrix Hadamards may differ in the last f32 bit; compare the
                // quantised outputs after applying the reference quantiser to the fast rotation.
                let mut rot = x.clone();
                for b in rot.chunks_mut(block) {
                    hadamard_inplace(b);
                    if bf16 {
                        b.iter_mut().for_each(|v| *v = bf16_round(*v));
                    }
                    quant_block_reference(b);
                }
                assert_eq!(bits(&fast), bits(&rot), "block {block}, bf16 {bf16}: fast quantiser vs reference");
                hadamard_fp8_reference(&mut slow, block, bf16).unwrap();
                let mut differ = 0;
                for (p, q) in fast.iter().zip(&slow) {
                    if p.to_bits() != q.to_bits() {
                        differ += 1;
                        // One e4m3 step at most (a rotation ulp straddling a rounding boundary).
                        assert!((p - q).abs() <= 0.125 * p.abs().max(q.abs()) + 1e-30, "{p} vs {q}");
                    }
                }
                assert!(differ * 1000 <= fast.len(), "block {block}: {differ} of {} differ", fast.len());
            }
        }
    }

    #[test]
    fn outputs_are_e4m3_times_a_power_of_two_and_bf16_exact() {
        let x = test_data(5, 64, 128);
        let mut y = x.clone();
        hadamard_fp8_inplace(&mut y, 128).unwrap();
        for b in y.chunks(128) {
            let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let s = ue8m0_scale(amax); // the output amax maps to the same scale
            for &v in b {
                assert_eq!(e4m3_round(v / s) * s, v, "not on the e4m3 grid");
                assert_eq!(bf16_round(v), v, "not exact in bf16");
            }
        }
        // Parallel and sequential paths agree.
        let mut big = test_data(6, 4096, 128);
        let mut seq = big.clone();
        hadamard_fp8_inplace(&mut big, 128).unwrap();
        for b in seq.chunks_mut(128) {
            hadamard_inplace(b);
            quant_block_inplace(b);
        }
        assert_eq!(bits(&big), bits(&seq));
    }

    #[test]
    fn bad_blocks_are_errors() {
        let mut x = vec![1.0f32; 256];
        assert!(hadamard_fp8_inplace(&mut x, 0).is_err());
        assert!(hadamard_fp8_inplace(&mut x, 96).is_err());
        assert!(hadamard_fp8_inplace(&mut x[..200], 128).is_err());
        assert!(hadamard_fp8_bf16_inplace(&mut x, 512).is_err());
        assert!(hadamard_fp8_inplace(&mut x, 256).is_ok());
        assert!(hadamard_fp8_inplace(&mut [], 128).is_ok());
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    // ---- the committed reference vectors (scripts/fixtures/fp8_reference.py) --------------------

    const VECTORS: &str = include_str!("../../../../tests/fixtures/fp8/vectors.json");

    /// Just enough JSON for the vector file: objects, arrays, strings, numbers, literals.
    #[derive(Debug, Clone)]
    enum Json {
        Null,
        Bool(bool),
        Num(f64),
        Str(String),
        Arr(Vec<Json>),
        Obj(Vec<(String, Json)>),
    }

    impl Json {
        fn get(&self, key: &str) -> &Json {
            match self {
                Json::Obj(kv) => &kv.iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("no key {key}")).1,
                _ => panic!("not an object looking up {key}"),
            }
        }
        fn arr(&self) -> &[Json] {
            match self {
                Json::Arr(a) => a,
                _ => panic!("not an array"),
            }
        }
        fn num(&self) -> f64 {
            match self {
                Json::Num(n) => *n,
                _ => panic!("not a number: {self:?}"),
            }
        }
        fn str(&self) -> &str {
            match self {
                Json::Str(s) => s,
                _ => panic!("not a string"),
            }
        }
        fn bool(&self) -> bool {
            match self {
                Json::Bool(b) => *b,
                _ => panic!("not a bool"),
            }
        }
        fn ints(&self) -> Vec<i64> {
            self.arr().iter().map(|v| v.num() as i64).collect()
        }
    }

    fn parse_json(s: &str) -> Json {
        fn ws(b: &[u8], i: &mut usize) {
            while *i < b.len() && b[*i].is_ascii_whitespace() {
                *i += 1;
            }
        }
        fn value(b: &[u8], i: &mut usize) -> Json {
            ws(b, i);
            match b[*i] {
                b'{' => {
                    *i += 1;
                    let mut kv = Vec::new();
                    loop {
                        ws(b, i);
                        if b[*i] == b'}' {
                            *i += 1;
                            return Json::Obj(kv);
                        }
                        let Json::Str(k) = value(b, i) else { panic!("object key at {i}") };
                        ws(b, i);
                        assert_eq!(b[*i], b':');
                        *i += 1;
                        kv.push((k, value(b, i)));
                        ws(b, i);
                        if b[*i] == b',' {
                            *i += 1;
                        }
                    }
                }
                b'[' => {
                    *i += 1;
                    let mut a = Vec::new();
                    loop {
                        ws(b, i);
                        if b[*i] == b']' {
                            *i += 1;
                            return Json::Arr(a);
                        }
                        a.push(value(b, i));
                        ws(b, i);
                        if b[*i] == b',' {
                            *i += 1;
                        }
                    }
                }
                b'"' => {
                    *i += 1;
                    let mut out = String::new();
                    while b[*i] != b'"' {
                        if b[*i] == b'\\' {
                            *i += 1;
                            out.push(match b[*i] {
                                b'n' => '\n',
                                b't' => '\t',
                                c => c as char,
                            });
                        } else {
                            out.push(b[*i] as char);
                        }
                        *i += 1;
                    }
                    *i += 1;
                    Json::Str(out)
                }
                b't' => {
                    *i += 4;
                    Json::Bool(true)
                }
                b'f' => {
                    *i += 5;
                    Json::Bool(false)
                }
                b'n' => {
                    *i += 4;
                    Json::Null
                }
                _ => {
                    let start = *i;
                    while *i < b.len() && matches!(b[*i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
                        *i += 1;
                    }
                    let t = std::str::from_utf8(&b[start..*i]).unwrap();
                    Json::Num(t.parse().unwrap_or_else(|_| panic!("bad number {t:?} at {start}")))
                }
            }
        }
        let mut i = 0;
        value(s.as_bytes(), &mut i)
    }

    #[test]
    fn json_parser_reads_what_it_needs() {
        let j = parse_json(r#"{"a": [1, -2, 3e2], "b": {"c": "x\"y"}, "d": true, "e": null, "f": false}"#);
        assert_eq!(j.get("a").ints(), vec![1, -2, 300]);
        assert_eq!(j.get("b").get("c").str(), "x\"y");
        assert!(j.get("d").bool() && !j.get("f").bool());
        assert!(matches!(j.get("e"), Json::Null));
    }

    #[test]
    fn decode_table_matches_torch_float8_e4m3fn() {
        let v = parse_json(VECTORS);
        let table = v.get("e4m3_table_f32_bits").ints();
        assert_eq!(table.len(), 256);
        for (c, &b) in table.iter().enumerate() {
            let want = f32::from_bits(b as u32);
            let got = e4m3_decode(c as u8);
            if want.is_nan() {
                assert!(got.is_nan(), "code {c:#x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "code {c:#x}");
            }
        }
    }

    #[test]
    fn matches_the_committed_reference_vectors_exactly() {
        let v = parse_json(VECTORS);
        let cases = v.get("cases").arr();
        assert!(cases.len() >= 6, "{} cases", cases.len());
        let mut blocks_checked = 0;
        for case in cases {
            let name = case.get("name").str();
            let block = case.get("block").num() as usize;
            let hadamard = case.get("hadamard").bool();
            let bf16_rot = case.get("bf16_rotation").bool();
            let input: Vec<f32> = match case.get("input_dtype").str() {
                "f32" => case.get("input_bits").ints().iter().map(|&b| f32::from_bits(b as u32)).collect(),
                "bf16" => case.get("input_bits").ints().iter().map(|&b| f32::from_bits((b as u32) << 16)).collect(),
                d => panic!("{name}: dtype {d}"),
            };
            let codes = case.get("codes").ints();
            let exps = case.get("scale_exp").ints();
            assert_eq!(codes.len(), input.len(), "{name}");
            assert_eq!(exps.len() * block, input.len(), "{name}");
            let expect: Vec<f32> = codes
                .iter()
                .enumerate()
                .map(|(i, &c)| e4m3_decode(c as u8) * 2f32.powi(exps[i / block] as i32))
                .collect();

            // Block by block through the public pieces, checking each block's scale.
            let mut x = input.clone();
            for (b, blk) in x.chunks_mut(block).enumerate() {
                if hadamard {
                    hadamard_inplace(blk);
                    if bf16_rot {
                        blk.iter_mut().for_each(|v| *v = bf16_round(*v));
                    }
                }
                let s = quant_block_inplace(blk);
                assert_eq!(s, 2f32.powi(exps[b] as i32), "{name}: block {b} scale");
                blocks_checked += 1;
            }
            for (i, (g, w)) in x.iter().zip(&expect).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{name}: element {i} (block {}): {g} vs {w}", i / block);
            }
            // The whole-buffer entry points and the reference pipeline agree.
            if hadamard {
                let mut y = input.clone();
                if bf16_rot {
                    hadamard_fp8_bf16_inplace(&mut y, block).unwrap();
                } else {
                    hadamard_fp8_inplace(&mut y, block).unwrap();
                }
                assert_eq!(bits(&y), bits(&expect), "{name}: hadamard_fp8 entry point");
                let mut r = input.clone();
                hadamard_fp8_reference(&mut r, block, bf16_rot).unwrap();
                assert_eq!(bits(&r), bits(&expect), "{name}: reference pipeline");
            } else {
                let mut r = input.clone();
                for blk in r.chunks_mut(block) {
                    quant_block_reference(blk);
                }
                assert_eq!(bits(&r), bits(&expect), "{name}: reference quantiser");
            }
        }
        assert!(blocks_checked >= 50, "{blocks_checked} blocks");
    }
}
