//! Lightning-indexer scoring + exact top-k on the CPU.
//!
//! For a block of `TB` query rows and a tile of keys, the per-head dot products are one GEMM,
//! `[TB*HI, D] · [D, S_tile]` (the q rows of all heads are already contiguous); the tile is then
//! folded into the rows' scores (ReLU, × head weight, summed over heads) while it is still in
//! cache, and each row ends with an exact selection. Blocks of rows run in parallel; keys stop at
//! the last position visible to the block (causality), so a causal prefill does about half the
//! work of the full square.

use super::{CpuTensor, linalg};
use crate::TopK;
use crate::topk::select_topk;
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
    let tiles = Tiles { q, head_w, keys, positions, heads, d, scale };
    let blocks = rows.div_ceil(BLOCK_ROWS);
    if blocks < rayon::current_num_threads() {
        // Few query rows (decode, short chunks): the threads split the keys instead, one tile
        // each with a single-threaded GEMM (a threaded GEMM per 512-key tile spent most of a
        // decode step handing work to threads).
        let s_len = positions.iter().max().map_or(0, |&p| p + 1);
        let mut scores = vec![0.0f32; rows * s_len];
        let parts: Vec<Vec<f32>> = (0..s_len)
            .step_by(key_tile)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map_init(Vec::new, |dots, s0| {
                let n = key_tile.min(s_len - s0);
                let mut part = vec![0.0f32; rows * n];
                tiles.fold(0, rows, s0, n, dots, &mut part, n);
                part
            })
            .collect();
        for (t, part) in parts.iter().enumerate() {
            let (s0, n) = (t * key_tile, part.len() / rows);
            for i in 0..rows {
                scores[i * s_len + s0..i * s_len + s0 + n].copy_from_slice(&part[i * n..(i + 1) * n]);
            }
        }
        data.par_chunks_mut(k).enumerate().for_each_init(Vec::new, |scratch, (i, out)| {
            select_topk(&scores[i * s_len..i * s_len + positions[i] + 1], k, out, scratch);
        });
        return TopK { rows, k, data };
    }
    data.par_chunks_mut(BLOCK_ROWS * k).enumerate().for_each_init(
        || (Vec::<f32>::new(), Vec::<f32>::new(), Vec::<(f32, u32)>::new()),
        |(dots, scores, scratch), (b, out)| {
            let t0 = b * BLOCK_ROWS;
            let tb = out.len() / k;
            let s_len = positions[t0..t0 + tb].iter().max().map_or(0, |&p| p + 1);
            debug_assert!(s_len <= keys.rows);
            // scores: [tb, s_len], row i valid up to positions[t0+i].
            scores.clear();
            scores.resize(tb * s_len, 0.0);
            for s0 in (0..s_len).step_by(key_tile) {
                let n = key_tile.min(s_len - s0);
                tiles.fold(t0, tb, s0, n, dots, &mut scores[s0..], s_len);
            }
            for i in 0..tb {
                let visible = positions[t0 + i] + 1;
                select_topk(&scores[i * s_len..i * s_len + visible], k, &mut out[i * k..(i + 1) * k], scratch);
            }
        },
    );
    TopK { rows, k, data }
}

/// The operands of one indexer call, for scoring tiles of (query rows × keys).
struct Tiles<'a> {
    q: &'a CpuTensor,
    head_w: &'a CpuTensor,
    keys: &'a CpuTensor,
    positions: &'a [usize],
    heads: usize,
    d: usize,
    scale: f32,
}

impl Tiles<'_> {
    /// Adds the scores of query rows `t0..t0+tb` against keys `s0..s0+n` into `acc` (row `i` at
    /// `acc[i * stride ..][..n]`): one single-threaded `[tb*HI, D] · [D, n]` GEMM into `dots`,
    /// then ReLU, × head weight, summed over heads, up to each row's last visible key.
    #[allow(clippy::too_many_arguments)]
    fn fold(&self, t0: usize, tb: usize, s0: usize, n: usize, dots: &mut Vec<f32>, acc: &mut [f32], stride: usize) {
        let (heads, d) = (self.heads, self.d);
        let m = tb * heads;
        dots.clear();
        dots.resize(m * n, 0.0);
        let q = &self.q.data[t0 * heads * d..(t0 + tb) * heads * d];
        linalg::gemm_panel(q, m, d, &self.keys.data[s0 * d..(s0 + n) * d], n, dots, 0);
        for i in 0..tb {
            let visible = self.positions[t0 + i] + 1;
            if visible <= s0 {
                continue;
            }
            let len = n.min(visible - s0);
            let row_acc = &mut acc[i * stride..i * stride + len];
            for h in 0..heads {
                let w = self.head_w.data[(t0 + i) * heads + h];
                let row = &dots[(i * heads + h) * n..(i * heads + h) * n + len];
                for (a, &v) in row_acc.iter_mut().zip(row) {
                    *a += w * (v * self.scale).max(0.0);
                }
            }
        }
    }
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
        // A full prefill from 0, a later chunk starting at position 50 and a decode row; on one
        // thread (rows in blocks) and on eight (few blocks: the threads split the keys).
        let cases = [(0..n_keys).collect::<Vec<_>>(), (50..70).collect(), vec![89]];
        for (positions, threads) in cases.iter().flat_map(|p| [(p, 1), (p, 8)]) {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let t = positions.len();
            let q: Vec<f32> = (0..t * heads * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let w: Vec<f32> = (0..t * heads).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            for (topk, tile) in [(1, KEY_TILE), (8, KEY_TILE), (8, 16), (200, 7)] {
                let fast = pool.install(|| {
                    indexer_topk_tiled(
                        &CpuTensor::new(q.clone(), t, heads * d),
                        &CpuTensor::new(w.clone(), t, heads),
                        &keys,
                        positions,
                        topk,
                        0.25,
                        tile,
                    )
                });
                let want = reference::indexer_topk(&q, &w, &keys.data, heads, d, positions, topk, 0.25);
                assert_eq!((fast.rows, fast.k), (want.rows, want.k));
                for (r, &pos) in positions.iter().enumerate() {
                    let mut a: Vec<i32> = fast.row(r).to_vec();
                    let mut b: Vec<i32> = want.row(r).to_vec();
                    a.sort();
                    b.sort();
                    assert_eq!(a, b, "row {r} topk {topk} tile {tile} threads {threads}");
                    // Never a position the row cannot see.
                    assert!(fast.valid(r).all(|s| s <= pos));
                }
            }
        }
    }
}
