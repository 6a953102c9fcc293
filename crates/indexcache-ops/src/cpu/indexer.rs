//! Lightning-indexer scoring + exact top-k on the CPU.
//!
//! For a block of `TB` query rows the per-head dot products are one GEMM,
//! `[TB*HI, D] · [D, S_blk]` (the q rows of all heads are already contiguous), followed by the
//! ReLU · head-weight reduction over heads and a per-row selection. Rows are processed in
//! parallel blocks; `S_blk` stops at the last position visible to the block (causality), so a
//! causal prefill does about half the work of the full square.

use super::CpuTensor;
use crate::TopK;
use crate::topk::select_topk;
use gemm::{Parallelism, gemm};
use rayon::prelude::*;

/// Query rows per block: big enough for an efficient GEMM, small enough that the
/// `[TB*HI, S]` f32 score buffer stays modest at long context.
const BLOCK_ROWS: usize = 32;

pub fn indexer_topk(
    q: &CpuTensor,
    head_w: &CpuTensor,
    keys: &CpuTensor,
    positions: &[usize],
    topk: usize,
    scale: f32,
) -> TopK {
    let rows = q.rows;
    let heads = head_w.cols;
    let d = keys.cols;
    debug_assert_eq!(q.cols, heads * d);
    debug_assert_eq!(positions.len(), rows);
    let k = positions.iter().map(|&p| topk.min(p + 1)).max().unwrap_or(0);
    let mut data = vec![-1i32; rows * k];
    if k == 0 {
        return TopK { rows, k, data };
    }
    // Few query blocks (decode, short chunks): let the GEMM itself use the threads instead.
    let blocks = rows.div_ceil(BLOCK_ROWS);
    let threads = rayon::current_num_threads();
    let gemm_par = if blocks < threads { Parallelism::Rayon(threads) } else { Parallelism::None };
    data.par_chunks_mut(BLOCK_ROWS * k).enumerate().for_each_init(
        || (Vec::<f32>::new(), Vec::<f32>::new(), Vec::<(f32, u32)>::new()),
        |(dots, scores, scratch), (b, out)| {
            let t0 = b * BLOCK_ROWS;
            let tb = out.len() / k;
            let s_len = positions[t0..t0 + tb].iter().max().map_or(0, |&p| p + 1);
            debug_assert!(s_len <= keys.rows);
            let m = tb * heads;
            dots.clear();
            dots.resize(m * s_len, 0.0);
            // SAFETY: q rows t0..t0+tb hold m = tb*heads contiguous vectors of length d; keys
            // has ≥ s_len rows of d; dots is m × s_len row-major.
            unsafe {
                gemm(
                    m,
                    s_len,
                    d,
                    dots.as_mut_ptr(),
                    1,
                    s_len as isize,
                    false,
                    q.data[t0 * heads * d..].as_ptr(),
                    1,
                    d as isize,
                    keys.data.as_ptr(),
                    d as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm_par,
                );
            }
            for i in 0..tb {
                let t = t0 + i;
                let visible = positions[t] + 1;
                scores.clear();
                scores.resize(visible, 0.0);
                for h in 0..heads {
                    let w = head_w.data[t * heads + h];
                    let row = &dots[(i * heads + h) * s_len..(i * heads + h) * s_len + visible];
                    for (acc, &v) in scores.iter_mut().zip(row) {
                        *acc += w * (v * scale).max(0.0);
                    }
                }
                select_topk(scores, k, &mut out[i * k..(i + 1) * k], scratch);
            }
        },
    );
    TopK { rows, k, data }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::reference;
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    #[test]
    fn matches_reference_sets_prefill_and_chunk() {
        let mut rng = StdRng::seed_from_u64(3);
        let (heads, d, n_keys) = (4, 16, 90);
        let keys: Vec<f32> = (0..n_keys * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let keys = CpuTensor::new(keys, n_keys, d);
        // A full prefill from 0, and a later chunk starting at position 50.
        for positions in [(0..n_keys).collect::<Vec<_>>(), (50..70).collect()] {
            let t = positions.len();
            let q: Vec<f32> = (0..t * heads * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let w: Vec<f32> = (0..t * heads).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            for topk in [1, 8, 200] {
                let fast = indexer_topk(
                    &CpuTensor::new(q.clone(), t, heads * d),
                    &CpuTensor::new(w.clone(), t, heads),
                    &keys,
                    &positions,
                    topk,
                    0.25,
                );
                let want = reference::indexer_topk(&q, &w, &keys.data, heads, d, &positions, topk, 0.25);
                assert_eq!((fast.rows, fast.k), (want.rows, want.k));
                for (r, &pos) in positions.iter().enumerate() {
                    let mut a: Vec<i32> = fast.row(r).to_vec();
                    let mut b: Vec<i32> = want.row(r).to_vec();
                    a.sort();
                    b.sort();
                    assert_eq!(a, b, "row {r} topk {topk}");
                    // Never a position the row cannot see.
                    assert!(fast.valid(r).all(|s| s <= pos));
                }
            }
        }
    }
}
