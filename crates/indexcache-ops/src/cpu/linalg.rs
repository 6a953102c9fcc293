//! Dense linear algebra on host f32: `x · wᵀ` through `gemm` (runtime ISA dispatch), and a
//! row-parallel GEMV for single-token decode, where `gemm` is memory-bound and poorly threaded.
//! The GEMV is SIMD through `pulp` (the widest instruction set found at run time — AVX2+FMA on
//! x86-64 — never build flags) and reads bf16 weights as stored; `dot_plain` is its reference.

use gemm::{Parallelism, gemm};
use rayon::prelude::*;

/// A row-major weight matrix as stored: f32, or bf16 (the upper half of an f32's bits).
#[derive(Debug, Clone, Copy)]
pub enum Mat<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl<'a> Mat<'a> {
    pub fn len(&self) -> usize {
        match self {
            Mat::F32(v) => v.len(),
            Mat::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `start..start + len`.
    pub fn slice(self, start: usize, len: usize) -> Mat<'a> {
        match self {
            Mat::F32(v) => Mat::F32(&v[start..start + len]),
            Mat::Bf16(v) => Mat::Bf16(&v[start..start + len]),
        }
    }

    /// Writes the values as f32 into `dst` (same length).
    pub fn to_f32_into(self, dst: &mut [f32]) {
        match self {
            Mat::F32(v) => dst.copy_from_slice(v),
            Mat::Bf16(v) => dst.iter_mut().zip(v).for_each(|(d, &b)| *d = bf16_to_f32(b)),
        }
    }
}

#[inline(always)]
fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// `x [m, k] · wᵀ` with `w [n, k]` → `[m, n]`. `threads` > 1 splits the work over that many
/// rayon tasks; pass 1 when already inside a parallel loop. bf16 weights are read as stored by
/// the GEMV for m = 1; for m > 1 they go through `gemm` as f32 one panel of rows at a time (see
/// [`BF16_PANEL`]).
pub fn matmul_t(x: &[f32], m: usize, k: usize, w: Mat, n: usize, threads: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    let mut out = vec![0.0f32; m * n];
    if m == 0 || n == 0 || k == 0 {
        return out;
    }
    if m == 1 {
        gemv_t(x, w, k, &mut out, threads > 1);
        return out;
    }
    // The threads split the output columns (weight rows), each running a single-threaded GEMM
    // on its share: every weight row is read by one thread, `x` by all. `gemm`'s own threading
    // re-forks per cache block and balanced poorly at 16 threads on these 384–2816-wide weights.
    let parts = threads.min(n / MIN_PART_COLS).max(1);
    if parts == 1 {
        mul_cols(x, m, k, w, 0, n, &mut out);
        return out;
    }
    let per = n.div_ceil(parts);
    let blocks: Vec<(usize, Vec<f32>)> = (0..n)
        .step_by(per)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|j0| {
            let cols = per.min(n - j0);
            let mut part = vec![0.0f32; m * cols];
            mul_cols(x, m, k, w, j0, cols, &mut part);
            (j0, part)
        })
        .collect();
    for (j0, part) in blocks {
        let cols = part.len() / m;
        for (o, p) in out.chunks_exact_mut(n).zip(part.chunks_exact(cols)) {
            o[j0..j0 + cols].copy_from_slice(p);
        }
    }
    out
}

/// Fewest output columns a thread of [`matmul_t`] takes (below that the GEMM is too thin).
const MIN_PART_COLS: usize = 32;

/// `dst [m, cols] = x [m, k] · w[j0 .. j0 + cols]ᵀ` on this thread. bf16 weights are widened a
/// panel of rows at a time into a cache-sized buffer and multiplied while hot, instead of
/// writing (and page-faulting) an f32 copy of the whole matrix.
fn mul_cols(x: &[f32], m: usize, k: usize, w: Mat, j0: usize, cols: usize, dst: &mut [f32]) {
    match w {
        Mat::F32(w) => gemm_panel(x, m, k, &w[j0 * k..(j0 + cols) * k], cols, dst, 0),
        Mat::Bf16(w) => {
            let rows = (BF16_PANEL / k).clamp(1, cols);
            let mut panel = vec![0.0f32; rows * k];
            for c0 in (0..cols).step_by(rows) {
                let r = rows.min(cols - c0);
                let p = &mut panel[..r * k];
                Mat::Bf16(&w[(j0 + c0) * k..(j0 + c0 + r) * k]).to_f32_into(p);
                gemm_panel(x, m, k, p, cols, dst, c0);
            }
        }
    }
}

/// f32 values in a widened bf16 weight panel of [`mul_cols`] (1 MiB: stays in cache while
/// `gemm` packs it; widening it costs ~1 % of multiplying it by a 64-row chunk).
const BF16_PANEL: usize = 1 << 18;

/// `out[:, j0 .. j0 + w.len() / k] = x [m, k] · wᵀ` (`out` is `[m, n]` row-major), on this thread.
/// `k = 0` leaves `out` as it is (every caller passes zeroed outputs).
pub(super) fn gemm_panel(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32], j0: usize) {
    if k == 0 {
        return;
    }
    let cols = w.len() / k;
    assert!(w.len() == cols * k && j0 + cols <= n && out.len() == m * n && x.len() == m * k);
    // SAFETY: x is [m, k] row-major; w holds `cols` rows of k (wᵀ viewed as [k, cols], element
    // (kk, j) at w[j*k + kk]); out + j0 with row stride n addresses columns j0..j0+cols ≤ n of
    // the m rows of out.
    unsafe {
        gemm(
            m,
            cols,
            k,
            out.as_mut_ptr().add(j0),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// Most rows per parallel task of the GEMV (one SIMD dispatch each); fewer when that would
/// leave threads idle (a 512-row expert projection on 16 threads).
const GEMV_ROWS: usize = 64;

/// `out[j] = x · w[j]` for each row `j` of `w [n, k]`.
fn gemv_t(x: &[f32], w: Mat, k: usize, out: &mut [f32], parallel: bool) {
    let rows = if parallel { (out.len() / (4 * rayon::current_num_threads())).clamp(4, GEMV_ROWS) } else { GEMV_ROWS };
    let task = |c: usize, o: &mut [f32]| gemv_serial(x, w.slice(c * rows * k, o.len() * k), o);
    if parallel {
        out.par_chunks_mut(rows).enumerate().for_each(|(c, o)| task(c, o));
    } else {
        out.chunks_mut(rows).enumerate().for_each(|(c, o)| task(c, o));
    }
}

/// `out[j] = x · w[j]` for the rows of `w [out.len(), x.len()]`, on this thread (a task of a
/// caller's parallel loop).
pub fn gemv_serial(x: &[f32], w: Mat, out: &mut [f32]) {
    debug_assert_eq!(w.len(), x.len() * out.len());
    pulp::Arch::new().dispatch(Gemv { x, w, out });
}

/// One block of GEMV rows at the SIMD width chosen at run time.
struct Gemv<'a> {
    x: &'a [f32],
    w: Mat<'a>,
    out: &'a mut [f32],
}

/// bf16 elements widened per step of the bf16 GEMV (stays in L1).
const WIDEN: usize = 256;

impl pulp::WithSimd for Gemv<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let k = self.x.len();
        match self.w {
            Mat::F32(w) => {
                for (j, o) in self.out.iter_mut().enumerate() {
                    *o = dot_simd(simd, self.x, &w[j * k..(j + 1) * k]);
                }
            }
            Mat::Bf16(w) => {
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // Four rows at a time: four weight streams in flight and one load of x per
                    // four rows; the leftover rows one by one.
                    let quads = self.out.len() / 4;
                    let (head, tail) = self.out.split_at_mut(4 * quads);
                    let avx512 = std::arch::is_x86_feature_detected!("avx512f");
                    for (q, o) in head.chunks_exact_mut(4).enumerate() {
                        let r = |i: usize| &w[(4 * q + i) * k..(4 * q + i + 1) * k];
                        let rows = [r(0), r(1), r(2), r(3)];
                        // SAFETY: AVX2 and FMA were detected just above, AVX-512F where it is used.
                        o.copy_from_slice(&unsafe {
                            if avx512 { x86::dot4_bf16_avx512(self.x, rows) } else { x86::dot4_bf16_avx2(self.x, rows) }
                        });
                    }
                    for (j, o) in tail.iter_mut().enumerate() {
                        let j = 4 * quads + j;
                        // SAFETY: as above.
                        *o = unsafe { x86::dot_bf16_avx2(self.x, &w[j * k..(j + 1) * k]) };
                    }
                    return;
                }
                let mut buf = [0.0f32; WIDEN];
                for (j, o) in self.out.iter_mut().enumerate() {
                    let row = &w[j * k..(j + 1) * k];
                    let mut acc = 0.0f32;
                    for (xs, ws) in self.x.chunks(WIDEN).zip(row.chunks(WIDEN)) {
                        let b = &mut buf[..ws.len()];
                        for (d, &v) in b.iter_mut().zip(ws) {
                            *d = bf16_to_f32(v);
                        }
                        acc += dot_simd(simd, xs, b);
                    }
                    *o = acc;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `x · w` for a bf16 row `w`: 8 bf16 widened to f32 per load (zero-extend, shift left 16),
    /// eight FMA accumulators (64 weights per step), the tail in scalar.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_bf16_avx2(x: &[f32], w: &[u16]) -> f32 {
        debug_assert_eq!(x.len(), w.len());
        let n = x.len();
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let widen = |i: usize| {
            // SAFETY: callers pass i + 8 <= n.
            unsafe {
                let h = _mm_loadu_si128(wp.add(i) as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
        };
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut i = 0;
        while i + 64 <= n {
            for (a, acc) in acc.iter_mut().enumerate() {
                let o = i + 8 * a;
                // SAFETY: o + 8 <= i + 64 <= n.
                *acc = _mm256_fmadd_ps(unsafe { _mm256_loadu_ps(xp.add(o)) }, widen(o), *acc);
            }
            i += 64;
        }
        while i + 8 <= n {
            // SAFETY: i + 8 <= n.
            acc[0] = _mm256_fmadd_ps(unsafe { _mm256_loadu_ps(xp.add(i)) }, widen(i), acc[0]);
            i += 8;
        }
        let v = _mm256_add_ps(
            _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])),
            _mm256_add_ps(_mm256_add_ps(acc[4], acc[5]), _mm256_add_ps(acc[6], acc[7])),
        );
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_add_ss(q, _mm_shuffle_ps::<1>(q, q));
        let mut s = _mm_cvtss_f32(q);
        while i < n {
            s += x[i] * super::bf16_to_f32(w[i]);
            i += 1;
        }
        s
    }

    /// `x · w[r]` for four bf16 rows at once: each 16-element step loads x once and the four
    /// rows' weights (four sequential streams, which a single core reads from memory faster
    /// than one), two FMA accumulators per row; the tail in scalar.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4_bf16_avx2(x: &[f32], w: [&[u16]; 4]) -> [f32; 4] {
        let n = x.len();
        debug_assert!(w.iter().all(|r| r.len() == n));
        let xp = x.as_ptr();
        let widen = |r: &[u16], i: usize| {
            // SAFETY: callers pass i + 8 <= n = r.len().
            unsafe {
                let h = _mm_loadu_si128(r.as_ptr().add(i) as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
        };
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n.
            let (x0, x1) = unsafe { (_mm256_loadu_ps(xp.add(i)), _mm256_loadu_ps(xp.add(i + 8))) };
            for (a, r) in acc.iter_mut().zip(w) {
                if i % 32 == 0 {
                    // One hint per cache line of the row (never faults), PREFETCH bf16 ahead.
                    _mm_prefetch::<_MM_HINT_T0>(r.as_ptr().wrapping_add(i + PREFETCH) as *const i8);
                }
                a[0] = _mm256_fmadd_ps(x0, widen(r, i), a[0]);
                a[1] = _mm256_fmadd_ps(x1, widen(r, i + 8), a[1]);
            }
            i += 16;
        }
        if i + 8 <= n {
            // SAFETY: i + 8 <= n.
            let x0 = unsafe { _mm256_loadu_ps(xp.add(i)) };
            for (a, r) in acc.iter_mut().zip(w) {
                a[0] = _mm256_fmadd_ps(x0, widen(r, i), a[0]);
            }
            i += 8;
        }
        finish4(x, w, i, &acc)
    }

    /// [`dot4_bf16_avx2`] at 512 bits: 16 bf16 widened per load, 32 elements per row per step
    /// (64 bytes of each row: one cache line), the 256-bit kernel's accumulators (so the tail and
    /// the reduction are shared) fed by the two halves of each 512-bit product.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn dot4_bf16_avx512(x: &[f32], w: [&[u16]; 4]) -> [f32; 4] {
        let n = x.len();
        debug_assert!(w.iter().all(|r| r.len() == n));
        let xp = x.as_ptr();
        let widen = |r: &[u16], i: usize| {
            // SAFETY: callers pass i + 16 <= n = r.len().
            unsafe {
                let h = _mm256_loadu_si256(r.as_ptr().add(i) as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
        };
        let mut acc = [[_mm512_setzero_ps(); 2]; 4];
        let mut i = 0;
        while i + 32 <= n {
            // SAFETY: i + 32 <= n.
            let (x0, x1) = unsafe { (_mm512_loadu_ps(xp.add(i)), _mm512_loadu_ps(xp.add(i + 16))) };
            for (a, r) in acc.iter_mut().zip(w) {
                // A hint only (never faults): the line PREFETCH bf16 ahead in this row.
                _mm_prefetch::<_MM_HINT_T0>(r.as_ptr().wrapping_add(i + PREFETCH) as *const i8);
                a[0] = _mm512_fmadd_ps(x0, widen(r, i), a[0]);
                a[1] = _mm512_fmadd_ps(x1, widen(r, i + 16), a[1]);
            }
            i += 32;
        }
        // Fold each row's two 512-bit accumulators into the 256-bit layout of `finish4`.
        let half = |v: __m512| {
            let lo = _mm512_castps512_ps256(v);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
            _mm256_add_ps(lo, hi)
        };
        let mut acc8 = [[_mm256_setzero_ps(); 2]; 4];
        for (a8, a) in acc8.iter_mut().zip(&acc) {
            *a8 = [half(a[0]), half(a[1])];
        }
        while i + 8 <= n {
            // SAFETY: i + 8 <= n.
            let x0 = unsafe { _mm256_loadu_ps(xp.add(i)) };
            for (a, r) in acc8.iter_mut().zip(w) {
                // SAFETY: i + 8 <= n = r.len().
                let h = unsafe { _mm_loadu_si128(r.as_ptr().add(i) as *const __m128i) };
                let wv = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)));
                a[0] = _mm256_fmadd_ps(x0, wv, a[0]);
            }
            i += 8;
        }
        finish4(x, w, i, &acc8)
    }

    /// How far ahead (bf16 elements, 2 KiB) the four-row kernels prefetch each row. Decode at 2
    /// threads on the project's VM (`bench --contexts 256`, small-glm5 bf16): 1 KiB ahead +18 %
    /// over no prefetch, 2 KiB another +10 %, 4 KiB no better — the hardware prefetchers alone
    /// do not keep four streams per core far enough ahead.
    const PREFETCH: usize = 1024;

    /// Horizontal sums of four rows' two accumulators, plus the scalar tail from `i`.
    #[target_feature(enable = "avx2,fma")]
    fn finish4(x: &[f32], w: [&[u16]; 4], i: usize, acc: &[[__m256; 2]; 4]) -> [f32; 4] {
        let n = x.len();
        let mut out = [0.0f32; 4];
        for ((o, a), r) in out.iter_mut().zip(acc).zip(w) {
            let v = _mm256_add_ps(a[0], a[1]);
            let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
            let q = _mm_add_ss(q, _mm_shuffle_ps::<1>(q, q));
            *o = _mm_cvtss_f32(q);
            for j in i..n {
                *o += x[j] * super::bf16_to_f32(r[j]);
            }
        }
        out
    }
}

/// `a · b` with eight SIMD accumulators (fused multiply-add where the CPU has it), enough
/// independent chains to cover the FMA latency and keep loads in flight.
#[inline(always)]
fn dot_simd<S: pulp::Simd>(simd: S, a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let (va, ta) = S::as_simd_f32s(a);
    let (vb, tb) = S::as_simd_f32s(b);
    let zero = simd.splat_f32s(0.0);
    let mut acc = [zero; 8];
    let (ca, cb) = (va.chunks_exact(8), vb.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] = simd.mul_add_e_f32s(x[i], y[i], acc[i]);
        }
    }
    for (i, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[i] = simd.mul_add_e_f32s(*x, *y, acc[i]);
    }
    let pair = |i: usize| simd.add_f32s(acc[i], acc[i + 1]);
    let v = simd.add_f32s(simd.add_f32s(pair(0), pair(2)), simd.add_f32s(pair(4), pair(6)));
    let mut s = simd.reduce_sum_f32s(v);
    for (x, y) in ta.iter().zip(tb) {
        s += x * y;
    }
    s
}

/// The plain dot product the SIMD GEMV is checked against.
#[cfg(test)]
fn dot_plain(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::reference;
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn simd_dot_matches_plain() {
        let mut rng = StdRng::seed_from_u64(3);
        for n in [0, 1, 7, 8, 31, 64, 257, 1024, 1031] {
            let (a, b) = (rand_vec(&mut rng, n), rand_vec(&mut rng, n));
            let want = dot_plain(&a, &b);
            let got = dot_simd(pulp::Scalar::new(), &a, &b); // the fallback ISA
            assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "n={n}: {got} vs {want}");
            let mut out = [0.0f32];
            pulp::Arch::new().dispatch(Gemv { x: &a, w: Mat::F32(&b), out: &mut out });
            assert!((out[0] - want).abs() <= 1e-5 * (1.0 + want.abs()), "n={n}: {} vs {want}", out[0]);
        }
    }

    #[test]
    fn bf16_gemv_kernels_match_plain() {
        let mut rng = StdRng::seed_from_u64(5);
        for n in [0, 1, 7, 8, 31, 33, 64, 257, 1024, 1031] {
            let x = rand_vec(&mut rng, n);
            let w16: Vec<u16> = rand_vec(&mut rng, n).iter().map(|v| (v.to_bits() >> 16) as u16).collect();
            let wf: Vec<f32> = w16.iter().map(|&b| bf16_to_f32(b)).collect();
            let want = dot_plain(&x, &wf);
            let mut out = [0.0f32];
            pulp::Arch::new().dispatch(Gemv { x: &x, w: Mat::Bf16(&w16), out: &mut out });
            assert!((out[0] - want).abs() <= 1e-5 * (1.0 + want.abs()), "n={n}: {} vs {want}", out[0]);
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: detected.
                let got = unsafe { x86::dot_bf16_avx2(&x, &w16) };
                assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "avx2 n={n}: {got} vs {want}");
                // Four rows: the same row in every slot but one, a reversed copy in slot 2.
                let rev: Vec<u16> = w16.iter().rev().copied().collect();
                let want_rev = dot_plain(&x, &rev.iter().map(|&b| bf16_to_f32(b)).collect::<Vec<_>>());
                // SAFETY: detected.
                let got4 = unsafe { x86::dot4_bf16_avx2(&x, [&w16, &w16, &rev, &w16]) };
                for (slot, (g, e)) in got4.iter().zip([want, want, want_rev, want]).enumerate() {
                    assert!((g - e).abs() <= 1e-5 * (1.0 + e.abs()), "avx2x4 n={n} slot {slot}: {g} vs {e}");
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: detected.
                    let got4 = unsafe { x86::dot4_bf16_avx512(&x, [&w16, &rev, &w16, &w16]) };
                    for (slot, (g, e)) in got4.iter().zip([want, want_rev, want, want]).enumerate() {
                        assert!((g - e).abs() <= 1e-5 * (1.0 + e.abs()), "avx512x4 n={n} slot {slot}: {g} vs {e}");
                    }
                } else {
                    eprintln!("AVX-512F not present: its GEMV kernel is not exercised here");
                }
            }
        }
    }

    #[test]
    fn bf16_weights_are_stored_compact_only_when_lossless() {
        use crate::DType;
        use crate::cpu::CpuWeight;
        let exact: Vec<f32> = [1.0f32, -0.5, 3.0, 0.0].repeat(3);
        assert_eq!(CpuWeight::new(exact, 1, 3, 4).dtype(), DType::BF16);
        let mut inexact: Vec<f32> = [1.0f32, -0.5, 3.0, 0.0].repeat(3);
        inexact[5] = 0.1;
        assert_eq!(CpuWeight::new(inexact, 1, 3, 4).dtype(), DType::F32);
    }

    #[test]
    fn matmul_matches_reference_for_many_shapes() {
        let mut rng = StdRng::seed_from_u64(7);
        for &(m, k, n) in &[
            (1, 7, 5),
            (1, 300, 129),
            (1, 1029, 70),
            (3, 17, 9),
            (64, 96, 33),
            (130, 64, 200),
            (5, 1029, 600),
            (7, 40, 97),
        ] {
            let x = rand_vec(&mut rng, m * k);
            let w = rand_vec(&mut rng, n * k);
            // The same values as bf16, exactly: the bf16 path must give the f32 path's numbers.
            let w16: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
            let wr: Vec<f32> = w16.iter().map(|&b| bf16_to_f32(b)).collect();
            for (w, stored) in [(&w, Mat::F32(&w)), (&wr, Mat::Bf16(&w16))] {
                let want = reference::matmul_t(&x, m, k, w, n);
                for threads in [1, 2] {
                    let got = matmul_t(&x, m, k, stored, n, threads);
                    for (g, e) in got.iter().zip(&want) {
                        assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "m={m} k={k} n={n}: {g} vs {e}");
                    }
                }
            }
        }
    }
}
