//! Lightning-indexer scoring + exact top-k on the CPU.
//!
//! For a block of `TB` query rows and a tile of keys, the per-head dot products are one GEMM,
//! `[TB*HI, D] · [D, S_tile]` (the q rows of all heads are already contiguous); the tile is then
//! folded into the rows' scores (ReLU, × head weight, summed over heads) while it is still in
//! cache, and each row ends with an exact selection. Blocks of rows run in parallel; keys stop at
//! the last position visible to the block (causality), so a causal prefill does about half the
//! work of the full square.

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
    indexer_topk_tiled(q, head_w, keys, positions, topk, scale, KEY_TILE)
}

/// Keys per GEMM tile: the `[BLOCK_ROWS*HI, KEY_TILE]` dot products (512 KiB for 8 heads) stay in
/// cache while they are folded into the scores, instead of streaming a `[TB*HI, S]` buffer
/// through memory (at 16K context that buffer traffic cost as much as the GEMM).
const KEY_TILE: usize = 512;

#[allow(clippy::too_many_arguments)]
fn indexer_topk_tiled(
    q: &CpuTensor,
    head_w: &CpuTensor,
    keys: &CpuTensor,
    positions: &[usize],
    topk: usize,
    scale: f32,
    key_tile: usize,
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
            // scores: [tb, s_len], row i valid up to positions[t0+i].
            scores.clear();
            scores.resize(tb * s_len, 0.0);
            for s0 in (0..s_len).step_by(key_tile) {
                let n = key_tile.min(s_len - s0);
                dots.clear();
                dots.resize(m * n, 0.0);
                // SAFETY: q rows t0..t0+tb hold m = tb*heads contiguous vectors of length d; keys
                // rows s0..s0+n exist (s0+n ≤ s_len ≤ keys.rows); dots is m × n row-major.
                unsafe {
                    gemm(
                        m,
                        n,
                        d,
                        dots.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        q.data[t0 * heads * d..].as_ptr(),
                        1,
                        d as isize,
                        keys.data[s0 * d..].as_ptr(),
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
                    let visible = positions[t0 + i] + 1;
                    if visible <= s0 {
                        continue;
                    }
                    let len = n.min(visible - s0);
                    let acc = &mut scores[i * s_len + s0..i * s_len + s0 + len];
                    for h in 0..heads {
                        let w = head_w.data[(t0 + i) * heads + h];
                        let row = &dots[(i * heads + h) * n..(i * heads + h) * n + len];
                        for (a, &v) in acc.iter_mut().zip(row) {
                            *a += w * (v * scale).max(0.0);
                        }
                    }
                }
            }
            for i in 0..tb {
                let visible = positions[t0 + i] + 1;
                select_topk(&scores[i * s_len..i * s_len + visible], k, &mut out[i * k..(i + 1) * k], scratch);
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
            for (topk, tile) in [(1, KEY_TILE), (8, KEY_TILE), (8, 16), (200, 7)] {
                let fast = indexer_topk_tiled(
                    &CpuTensor::new(q.clone(), t, heads * d),
                    &CpuTensor::new(w.clone(), t, heads),
                    &keys,
                    &positions,
                    topk,
                    0.25,
                    tile,
                );
                let want = reference::indexer_topk(&q, &w, &keys.data, heads, d, &positions, topk, 0.25);
                assert_eq!((fast.rows, fast.k), (want.rows, want.k));
                for (r, &pos) in positions.iter().enumerate() {
                    let mut a: Vec<i32> = fast.row(r).to_vec();
                    let mut b: Vec<i32> = want.row(r).to_vec();
                    a.sort();
                    b.sort();
                    assert_eq!(a, b, "row {r} topk {topk} tile {tile}");
                    // Never a position the row cannot see.
                    assert!(fast.valid(r).all(|s| s <= pos));
                }
            }
        }
    }
}
