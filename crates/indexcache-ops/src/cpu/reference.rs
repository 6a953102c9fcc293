//! Plain, obviously-correct versions of the CPU kernels. The fast kernels in this module's
//! siblings are tested against these; nothing in the engine's hot path calls them.

use crate::{TopK, topk::select_topk};

/// `x [t, n_in] · wᵀ` with `w [n_out, n_in]` → `[t, n_out]`, f64 accumulation.
pub fn matmul_t(x: &[f32], t: usize, n_in: usize, w: &[f32], n_out: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; t * n_out];
    for i in 0..t {
        for o in 0..n_out {
            let mut acc = 0.0f64;
            for k in 0..n_in {
                acc += x[i * n_in + k] as f64 * w[o * n_in + k] as f64;
            }
            out[i * n_out + o] = acc as f32;
        }
    }
    out
}

/// Lightning indexer scores for one query row against keys `0..=pos`, then top-k.
#[allow(clippy::too_many_arguments)]
pub fn indexer_topk(
    q: &[f32],
    head_w: &[f32],
    keys: &[f32],
    heads: usize,
    d: usize,
    positions: &[usize],
    topk: usize,
    scale: f32,
) -> TopK {
    let rows = positions.len();
    let k = positions.iter().map(|&p| topk.min(p + 1)).max().unwrap_or(0);
    let mut data = vec![-1i32; rows * k];
    let mut scratch = Vec::new();
    for (t, &pos) in positions.iter().enumerate() {
        let scores: Vec<f32> = (0..=pos)
            .map(|s| {
                let mut total = 0.0f64;
                for h in 0..heads {
                    let qh = &q[(t * heads + h) * d..(t * heads + h + 1) * d];
                    let ks = &keys[s * d..(s + 1) * d];
                    let dotp: f64 = qh.iter().zip(ks).map(|(a, b)| *a as f64 * *b as f64).sum();
                    total += head_w[t * heads + h] as f64 * (dotp * scale as f64).max(0.0);
                }
                total as f32
            })
            .collect();
        select_topk(&scores, k, &mut data[t * k..(t + 1) * k], &mut scratch);
    }
    TopK { rows, k, data }
}

/// Sparse MLA written as transformers does it: dense scores over every visible position, with
/// the positions not selected masked out before the softmax.
#[allow(clippy::too_many_arguments)]
pub fn sparse_mla_masked(
    q_lat: &[f32],
    q_pe: &[f32],
    cache: &[f32],
    heads: usize,
    r: usize,
    p: usize,
    positions: &[usize],
    sel: &TopK,
    scale: f32,
) -> Vec<f32> {
    let rows = positions.len();
    let mut out = vec![0.0f32; rows * heads * r];
    for (t, &pos) in positions.iter().enumerate() {
        let mut selected = vec![false; pos + 1];
        for s in sel.valid(t) {
            if s <= pos {
                selected[s] = true;
            }
        }
        for h in 0..heads {
            let ql = &q_lat[(t * heads + h) * r..(t * heads + h + 1) * r];
            let qp = &q_pe[(t * heads + h) * p..(t * heads + h + 1) * p];
            let logits: Vec<f64> = (0..=pos)
                .map(|s| {
                    if !selected[s] {
                        return f64::NEG_INFINITY;
                    }
                    let row = &cache[s * (r + p)..(s + 1) * (r + p)];
                    let a: f64 = ql.iter().zip(&row[..r]).map(|(x, y)| *x as f64 * *y as f64).sum();
                    let b: f64 = qp.iter().zip(&row[r..]).map(|(x, y)| *x as f64 * *y as f64).sum();
                    (a + b) * scale as f64
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
            let z: f64 = e.iter().sum();
            let o = &mut out[(t * heads + h) * r..(t * heads + h + 1) * r];
            for (s, w) in e.iter().enumerate() {
                if *w == 0.0 {
                    continue;
                }
                let row = &cache[s * (r + p)..s * (r + p) + r];
                for (oi, ci) in o.iter_mut().zip(row) {
                    *oi += (w / z * *ci as f64) as f32;
                }
            }
        }
    }
    out
}

/// Plain f64 grouped-query attention (the conformance reference of `Backend::gqa_attention`):
/// row `t`, head `h` attends to keys `0..=pos[t]`, or to the valid entries of `sel` row `t`.
#[allow(clippy::too_many_arguments)]
pub fn gqa_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    heads: usize,
    kv_heads: usize,
    d: usize,
    dv: usize,
    pos: &[usize],
    sel: Option<&crate::TopK>,
    scale: f32,
) -> Vec<f32> {
    let rows = pos.len();
    let rep = heads / kv_heads;
    let mut out = vec![0.0f32; rows * heads * dv];
    for t in 0..rows {
        let keys: Vec<usize> = match sel {
            None => (0..=pos[t]).collect(),
            Some(s) => s.valid(t).collect(),
        };
        for h in 0..heads {
            let g = h / rep;
            let qh = &q[(t * heads + h) * d..(t * heads + h + 1) * d];
            let logits: Vec<f64> = keys
                .iter()
                .map(|&s| {
                    let kr = &k[(s * kv_heads + g) * d..(s * kv_heads + g + 1) * d];
                    scale as f64 * qh.iter().zip(kr).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = logits.iter().map(|&l| (l - m).exp()).collect();
            let z: f64 = w.iter().sum();
            for c in 0..dv {
                let acc: f64 = keys.iter().zip(&w).map(|(&s, &wi)| wi * v[(s * kv_heads + g) * dv + c] as f64).sum();
                out[(t * heads + h) * dv + c] = if keys.is_empty() { 0.0 } else { (acc / z) as f32 };
            }
        }
    }
    out
}
