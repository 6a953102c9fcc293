//! Attention on the CPU: sparse MLA in the absorbed (MQA) form over the selected positions, and
//! grouped-query attention (dense causal or over selected positions) for dense models.
//!
//! # Sparse MLA
//!
//! Per query row `t`: gather the `n ≤ K` selected cache rows `[c_kv | k_pe]` (`R+P` wide) once
//! — all `H` heads share them — then `logits [H, n] = Q_t [H, R+P] · Gᵀ`, a row softmax, and
//! `O_t [H, R] = softmax · G[:, :R]`. Cost O(T·K·H·(2R+P)), independent of the context length.

use super::CpuTensor;
use crate::TopK;
use gemm::{Parallelism, gemm};
use rayon::prelude::*;

/// Softmax of each `n`-wide row of `logits`, in place (max-subtracted, f32).
fn softmax_rows(logits: &mut [f32], n: usize) {
    for row in logits.chunks_mut(n) {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut z = 0.0f32;
        for v in row.iter_mut() {
            *v = (*v - m).exp();
            z += *v;
        }
        let inv = 1.0 / z;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

pub fn sparse_mla(q_lat: &CpuTensor, q_pe: &CpuTensor, cache: &CpuTensor, sel: &TopK, scale: f32) -> CpuTensor {
    let rows = q_lat.rows;
    let width = cache.cols; // R + P
    // H·R + H·P = H·(R+P)
    let heads = (q_lat.cols + q_pe.cols) / width;
    let (r, p) = (q_lat.cols / heads, q_pe.cols / heads);
    debug_assert_eq!(r + p, width);
    debug_assert_eq!(sel.rows, rows);
    // Q_t rows h0..h1: [h1-h0, R+P], head h = [q_lat_h | q_pe_h].
    let gather_q = |q: &mut Vec<f32>, t: usize, h0: usize, h1: usize| {
        q.clear();
        for h in h0..h1 {
            q.extend_from_slice(&q_lat.row(t)[h * r..(h + 1) * r]);
            q.extend_from_slice(&q_pe.row(t)[h * p..(h + 1) * p]);
        }
    };
    let gather_g = |g: &mut Vec<f32>, t: usize| {
        g.clear();
        for s in sel.valid(t) {
            g.extend_from_slice(cache.row(s));
        }
    };
    let mut out = vec![0.0f32; rows * heads * r];
    if rows == 1 {
        // One row (decode): gather its positions once, spread the heads over the threads.
        let mut g = Vec::new();
        gather_g(&mut g, 0);
        let per = heads.div_ceil(rayon::current_num_threads()).max(1);
        out.par_chunks_mut(per * r).enumerate().for_each_init(
            || (Vec::<f32>::new(), Vec::<f32>::new()),
            |(q, logits), (c, o)| {
                let (h0, h1) = (c * per, (c * per + per).min(heads));
                gather_q(q, 0, h0, h1);
                let n = g.len() / width;
                attend(q, Rows::new(&g, n, width, width), Rows::new(&g, n, r, width), scale, logits, o);
            },
        );
        return CpuTensor::new(out, rows, heads * r);
    }
    out.par_chunks_mut(heads * r).enumerate().for_each_init(
        || (Vec::<f32>::new(), Vec::<f32>::new(), Vec::<f32>::new()),
        |(q, g, logits), (t, o)| {
            gather_q(q, t, 0, heads);
            gather_g(g, t);
            let n = g.len() / width;
            attend(q, Rows::new(g, n, width, width), Rows::new(g, n, r, width), scale, logits, o);
        },
    );
    CpuTensor::new(out, rows, heads * r)
}

/// `n` rows of `width` values, `stride` apart, from the start of `data`.
#[derive(Clone, Copy)]
struct Rows<'a> {
    data: &'a [f32],
    n: usize,
    width: usize,
    stride: usize,
}

impl<'a> Rows<'a> {
    fn new(data: &'a [f32], n: usize, width: usize, stride: usize) -> Self {
        assert!(n == 0 || data.len() >= (n - 1) * stride + width, "Rows: {n} rows of {width} at stride {stride}");
        Self { data, n, width, stride }
    }
}

/// One attention block: `o [h, dv] = softmax(scale · q kᵀ) · v` for `q [h, d]` (row-major) and
/// `n` key / value rows (nothing written when `n` = 0: the caller's zeros stand).
fn attend(q: &[f32], keys: Rows, vals: Rows, scale: f32, logits: &mut Vec<f32>, o: &mut [f32]) {
    let (d, dv, n) = (keys.width, vals.width, keys.n);
    debug_assert_eq!(keys.n, vals.n);
    let heads = q.len() / d;
    debug_assert_eq!(o.len(), heads * dv);
    if n == 0 {
        return;
    }
    logits.clear();
    logits.resize(heads * n, 0.0);
    // SAFETY: q is heads×d (row stride d); the keys are n rows of d at stride keys.stride inside
    // keys.data (checked by Rows::new); logits heads×n.
    unsafe {
        gemm(
            heads,
            n,
            d,
            logits.as_mut_ptr(),
            1,
            n as isize,
            false,
            q.as_ptr(),
            1,
            d as isize,
            keys.data.as_ptr(),
            keys.stride as isize,
            1,
            0.0,
            scale,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
    softmax_rows(logits, n);
    // SAFETY: logits heads×n; the values are n rows of dv at stride vals.stride (Rows::new);
    // o is heads×dv.
    unsafe {
        gemm(
            heads,
            dv,
            n,
            o.as_mut_ptr(),
            1,
            dv as isize,
            false,
            logits.as_ptr(),
            1,
            n as isize,
            vals.data.as_ptr(),
            1,
            vals.stride as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// Grouped-query attention (see `Backend::gqa_attention`). Work item = (row `t`, KV head `g`): the
/// `rep = heads / kv_heads` query heads of the group share the keys they read, so
/// `logits [rep, n] = Q [rep, D] · K_gᵀ` and `O [rep, Dv] = softmax · V_g` are two small GEMMs
/// over the visible keys (read in place from the cache for a causal row, gathered for a
/// selection).
#[allow(clippy::too_many_arguments)]
pub fn gqa(
    q: &CpuTensor,
    k: &CpuTensor,
    v: &CpuTensor,
    heads: usize,
    kv_heads: usize,
    pos: &[usize],
    sel: Option<&TopK>,
    scale: f32,
) -> CpuTensor {
    let rows = q.rows;
    let d = q.cols / heads;
    let dv = v.cols / kv_heads;
    let rep = heads / kv_heads;
    let (kw, vw) = (k.cols, v.cols);
    let mut out = vec![0.0f32; rows * heads * dv];
    out.par_chunks_mut(rep * dv).enumerate().for_each_init(
        || (Vec::<f32>::new(), Vec::<f32>::new(), Vec::<f32>::new()),
        |(kg, vg, logits), (i, o)| {
            let (t, g) = (i / kv_heads, i % kv_heads);
            let qg = &q.row(t)[g * rep * d..(g + 1) * rep * d];
            // Keys and values of the group: in place (causal) or gathered (selection).
            let (keys, vals) = match sel {
                None => {
                    let n = pos[t] + 1;
                    (Rows::new(&k.data[g * d..], n, d, kw), Rows::new(&v.data[g * dv..], n, dv, vw))
                }
                Some(sel) => {
                    kg.clear();
                    vg.clear();
                    for s in sel.valid(t) {
                        kg.extend_from_slice(&k.row(s)[g * d..(g + 1) * d]);
                        vg.extend_from_slice(&v.row(s)[g * dv..(g + 1) * dv]);
                    }
                    let n = kg.len() / d;
                    (Rows::new(kg, n, d, d), Rows::new(vg, n, dv, dv))
                }
            };
            attend(qg, keys, vals, scale, logits, o);
        },
    );
    CpuTensor::new(out, rows, heads * dv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::reference;
    use rand::{RngExt, SeedableRng, rngs::StdRng};

    fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Sparse gather == transformers-style dense masked attention; and with every visible
    /// position selected, it is plain dense causal attention.
    #[test]
    fn matches_masked_reference() {
        let mut rng = StdRng::seed_from_u64(11);
        let (heads, r, p, s_total) = (3, 12, 4, 40);
        let cache = CpuTensor::new(rand_vec(&mut rng, s_total * (r + p)), s_total, r + p);
        let positions: Vec<usize> = (20..40).collect();
        let t = positions.len();
        let q_lat = CpuTensor::new(rand_vec(&mut rng, t * heads * r), t, heads * r);
        let q_pe = CpuTensor::new(rand_vec(&mut rng, t * heads * p), t, heads * p);
        // A random subset of visible positions per row, padded with -1; plus the dense case.
        let k = 8;
        let mut sparse = TopK { rows: t, k, data: vec![-1; t * k] };
        for (i, &pos) in positions.iter().enumerate() {
            let mut picks: Vec<i32> = (0..=pos as i32).collect();
            for j in (1..picks.len()).rev() {
                picks.swap(j, rng.random_range(0..=j));
            }
            let n = if i % 5 == 0 { 3 } else { k };
            for (j, v) in picks.iter().take(n).enumerate() {
                sparse.data[i * k + j] = *v;
            }
        }
        let kd = s_total;
        let dense = TopK {
            rows: t,
            k: kd,
            data: positions
                .iter()
                .flat_map(|&pos| (0..kd as i32).map(move |s| if s as usize <= pos { s } else { -1 }))
                .collect(),
        };
        for sel in [&sparse, &dense] {
            let got = sparse_mla(&q_lat, &q_pe, &cache, sel, 0.3);
            let want =
                reference::sparse_mla_masked(&q_lat.data, &q_pe.data, &cache.data, heads, r, p, &positions, sel, 0.3);
            for (g, w) in got.data.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "{g} vs {w}");
            }
            // One row (the decode path: heads spread over threads) gives that row's result.
            let last = t - 1;
            let one = |x: &CpuTensor| CpuTensor::new(x.row(last).to_vec(), 1, x.cols);
            let sel1 = TopK { rows: 1, k: sel.k, data: sel.data[last * sel.k..].to_vec() };
            let got1 = sparse_mla(&one(&q_lat), &one(&q_pe), &cache, &sel1, 0.3);
            for (g, w) in got1.data.iter().zip(&want[last * heads * r..]) {
                assert!((g - w).abs() < 1e-5, "one row: {g} vs {w}");
            }
        }
    }
}
