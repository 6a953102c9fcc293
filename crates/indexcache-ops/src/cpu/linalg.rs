//! Dense linear algebra on host f32: `x · wᵀ` through `gemm` (runtime ISA dispatch), and a
//! row-parallel GEMV for single-token decode, where `gemm` is memory-bound and poorly threaded.

use gemm::{Parallelism, gemm};
use rayon::prelude::*;

/// `x [m, k] · wᵀ` with `w [n, k]` → `[m, n]`. `threads` > 1 lets `gemm` use rayon; pass 1 when
/// already inside a parallel loop.
pub fn matmul_t(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, threads: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    let mut out = vec![0.0f32; m * n];
    if m == 0 || n == 0 {
        return out;
    }
    if k == 0 {
        return out;
    }
    if m == 1 {
        gemv_t(x, w, k, &mut out, threads > 1);
        return out;
    }
    let par = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
    // SAFETY: the pointers cover m*k, n*k and m*n f32s (asserted above), strides describe
    // row-major x [m,k], wᵀ viewed as [k,n] (element (kk, j) at w[j*k + kk]), out [m,n].
    unsafe {
        gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
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
            par,
        );
    }
    out
}

/// `out[j] = x · w[j]` for each row `j` of `w [n, k]`.
fn gemv_t(x: &[f32], w: &[f32], k: usize, out: &mut [f32], parallel: bool) {
    const CHUNK: usize = 64;
    if parallel {
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
            for (i, v) in o.iter_mut().enumerate() {
                let j = c * CHUNK + i;
                *v = dot(x, &w[j * k..(j + 1) * k]);
            }
        });
    } else {
        for (j, v) in out.iter_mut().enumerate() {
            *v = dot(x, &w[j * k..(j + 1) * k]);
        }
    }
}

/// Dot product with 8 independent accumulators so the compiler can vectorise it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
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
    fn matmul_matches_reference_for_many_shapes() {
        let mut rng = StdRng::seed_from_u64(7);
        for &(m, k, n) in &[(1, 7, 5), (1, 300, 129), (3, 17, 9), (64, 96, 33), (130, 64, 200)] {
            let x = rand_vec(&mut rng, m * k);
            let w = rand_vec(&mut rng, n * k);
            let want = reference::matmul_t(&x, m, k, &w, n);
            for threads in [1, 2] {
                let got = matmul_t(&x, m, k, &w, n, threads);
                for (g, e) in got.iter().zip(&want) {
                    assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "m={m} k={k} n={n}: {g} vs {e}");
                }
            }
        }
    }
}
