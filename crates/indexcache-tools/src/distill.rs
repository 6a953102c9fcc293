//! Distilling lightning indexers into a dense model's attention (DSA's dense warm-up stage), and
//! IndexCache's training-aware multi-layer distillation (paper §3, Eq. 1–2).
//!
//! # The indexer (as the engine runs it on a GQA model)
//! For the normalised hidden states `h [T, hidden]` of one layer:
//! ```text
//! q = rope(h · Wqᵀ)                    [T, HI, D]    (every head, all D dims rotated)
//! k = rope(LN(h · Wkᵀ) · γ + β)        [T, D]
//! w = (h · Wpᵀ) · HI^-½                [T, HI]
//! I[t, s] = Σ_j w[t,j] · ReLU(D^-½ · q[t,j] · k[s])      s ≤ t
//! ```
//! # The loss
//! Row `t`'s target `p_t` is a distribution over the keys `s ≤ t`: the layer's own attention
//! summed over heads and renormalised (warm-up), or the mean of that of every layer a Full layer
//! serves (multi-layer, Eq. 1). The loss is the mean over rows of `KL(p_t ‖ softmax(I_t))`.
//! Proposition 1 — the gradient of `Σ_l KL(p_l ‖ Q)` equals `N ×` that of `KL(p̄ ‖ Q)` with
//! `p̄ = mean_l p_l` — holds because `∂/∂I Σ_l KL(p_l ‖ softmax I) = Σ_l (Q − p_l) = N (Q − p̄)`;
//! the tests check it numerically.
//!
//! # The backward pass (hand-written, checked against finite differences in f64)
//! With `G[t,s] = (Q[t,s] − p[t,s]) / T`, `z = D^-½ q·k`:
//! `∂w[t,j] = Σ_s G·ReLU(z)`, `∂z = G·w·[z>0]`, `∂q[t,j] = D^-½ Σ_s ∂z·k[s]`,
//! `∂k[s] = D^-½ Σ_{t,j} ∂z·q[t,j]`, then back through RoPE (the inverse rotation), the
//! LayerNorm and the three projections (`∂W = ∂yᵀ · h`).
//!
//! Everything here is host arithmetic, generic over [`Real`] (f32 for training, f64 for the
//! gradient checks).

use indexcache_ops::{RopeLayout, RopeTable};
use rayon::prelude::*;

/// The float type of the distillation arithmetic (f32 for training, f64 for gradient checks).
pub trait Real:
    'static
    + Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + std::ops::Neg<Output = Self>
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// Shapes of one indexer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Indexer heads `HI`.
    pub heads: usize,
    /// Head dim `D` (all of it rotated; `D = 2 · rope.half()`).
    pub d: usize,
    /// Model hidden size (the input of all three projections).
    pub hidden: usize,
}

/// LayerNorm epsilon of the indexer's `k_norm` (as the engine and DeepSeek's reference).
pub const LN_EPS: f64 = 1e-6;

/// One indexer's parameters, row-major as the checkpoint stores them.
#[derive(Debug, Clone, PartialEq)]
pub struct Params<R> {
    /// `wq_b [HI*D, hidden]`
    pub wq: Vec<R>,
    /// `wk [D, hidden]`
    pub wk: Vec<R>,
    /// `k_norm.weight [D]`
    pub ln_w: Vec<R>,
    /// `k_norm.bias [D]`
    pub ln_b: Vec<R>,
    /// `weights_proj [HI, hidden]`
    pub wp: Vec<R>,
}

impl<R: Real> Params<R> {
    pub fn zeros(d: Dims) -> Self {
        Params {
            wq: vec![R::ZERO; d.heads * d.d * d.hidden],
            wk: vec![R::ZERO; d.d * d.hidden],
            ln_w: vec![R::ZERO; d.d],
            ln_b: vec![R::ZERO; d.d],
            wp: vec![R::ZERO; d.heads * d.hidden],
        }
    }

    /// The tensors in a fixed order (names as in the checkpoint, without the layer prefix).
    pub fn tensors(&self) -> [(&'static str, &Vec<R>); 5] {
        [
            ("wq_b.weight", &self.wq),
            ("wk.weight", &self.wk),
            ("k_norm.weight", &self.ln_w),
            ("k_norm.bias", &self.ln_b),
            ("weights_proj.weight", &self.wp),
        ]
    }

    /// The shapes of [`Self::tensors`], in the same order.
    pub fn shapes(d: Dims) -> [Vec<usize>; 5] {
        [vec![d.heads * d.d, d.hidden], vec![d.d, d.hidden], vec![d.d], vec![d.d], vec![d.heads, d.hidden]]
    }

    pub fn tensors_mut(&mut self) -> [&mut Vec<R>; 5] {
        [&mut self.wq, &mut self.wk, &mut self.ln_w, &mut self.ln_b, &mut self.wp]
    }
}

/// Seeded initial parameters: projections ~ U(±1/√hidden) (the engine's random-weight rule),
/// LayerNorm γ = 1, β = 0. Each tensor has its own stream (`layer`, name).
pub fn init_params(d: Dims, seed: u64, layer: usize) -> Params<f32> {
    let bound = 1.0 / (d.hidden as f32).sqrt();
    let fill = |name: &str, n: usize| {
        let s = indexcache_ops::random::seed_for(seed, &format!("model.layers.{layer}.self_attn.indexer.{name}"));
        indexcache_ops::random::fill(s, bound, n)
    };
    Params {
        wq: fill("wq_b.weight", d.heads * d.d * d.hidden),
        wk: fill("wk.weight", d.d * d.hidden),
        ln_w: vec![1.0; d.d],
        ln_b: vec![0.0; d.d],
        wp: fill("weights_proj.weight", d.heads * d.hidden),
    }
}

/// `C [m, n] = beta · A · B` for strided operands: element `(i, j)` of a matrix at
/// `base + i·rs + j·cs` (row-major `[r, c]`: `rs = c, cs = 1`; its transpose: `rs = 1, cs = c`).
#[allow(clippy::too_many_arguments)]
fn mm<R: Real>(m: usize, n: usize, k: usize, a: (&[R], usize, usize), b: (&[R], usize, usize), c: &mut [R], beta: R) {
    debug_assert!(c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c[..m * n].iter_mut().for_each(|v| *v = R::ZERO);
        return;
    }
    // SAFETY: the callers pass operands whose strided extents lie inside the slices (checked in
    // debug builds by the slice lengths below) and a row-major [m, n] output.
    debug_assert!((m - 1) * a.1 + (k - 1) * a.2 < a.0.len());
    debug_assert!((k - 1) * b.1 + (n - 1) * b.2 < b.0.len());
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.0.as_ptr(),
            a.2 as isize,
            a.1 as isize,
            b.0.as_ptr(),
            b.2 as isize,
            b.1 as isize,
            R::ZERO,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}

/// `y [T, out] = x [T, in] · wᵀ` (`w [out, in]`).
fn linear<R: Real>(x: &[R], t: usize, n_in: usize, w: &[R], n_out: usize) -> Vec<R> {
    let mut y = vec![R::ZERO; t * n_out];
    mm(t, n_out, n_in, (x, n_in, 1), (w, 1, n_in), &mut y, R::ONE);
    y
}

/// `∂w [out, in] = ∂yᵀ [out, T] · x [T, in]`.
fn linear_grad_w<R: Real>(dy: &[R], x: &[R], t: usize, n_in: usize, n_out: usize) -> Vec<R> {
    let mut g = vec![R::ZERO; n_out * n_in];
    mm(n_out, n_in, t, (dy, 1, n_out), (x, n_in, 1), &mut g, R::ONE);
    g
}

/// Rotate (`inverse` = false) or un-rotate one `2·half`-dim head at position `pos`.
fn rotate<R: Real>(x: &mut [R], table: &RopeTable, pos: usize, layout: RopeLayout, inverse: bool) {
    let (cos, sin) = table.at(pos);
    let h = table.half();
    for i in 0..h {
        let (ia, ib) = match layout {
            RopeLayout::Interleaved => (2 * i, 2 * i + 1),
            RopeLayout::HalfSplit => (i, i + h),
        };
        let (c, s) = (R::from_f64(cos[i] as f64), R::from_f64(sin[i] as f64));
        let s = if inverse { -s } else { s };
        let (a, b) = (x[ia], x[ib]);
        x[ia] = a * c - b * s;
        x[ib] = b * c + a * s;
    }
}

/// What the forward pass keeps for the backward pass.
struct Forward<R> {
    /// `[T, HI*D]` rotated queries.
    q: Vec<R>,
    /// `[T, D]` rotated keys.
    k: Vec<R>,
    /// `[T, D]` normalised keys before the affine map (x̂) and `1/σ` per row.
    khat: Vec<R>,
    kinv: Vec<R>,
    /// `[T, HI]` head weights (× HI^-½).
    w: Vec<R>,
}

fn forward<R: Real>(p: &Params<R>, dm: Dims, h: &[R], t: usize, table: &RopeTable, layout: RopeLayout) -> Forward<R> {
    let (hi, d, hid) = (dm.heads, dm.d, dm.hidden);
    let mut q = linear(h, t, hid, &p.wq, hi * d);
    for r in 0..t {
        for j in 0..hi {
            rotate(&mut q[(r * hi + j) * d..(r * hi + j + 1) * d], table, r, layout, false);
        }
    }
    let kraw = linear(h, t, hid, &p.wk, d);
    let mut khat = vec![R::ZERO; t * d];
    let mut kinv = vec![R::ZERO; t];
    let mut k = vec![R::ZERO; t * d];
    let dn = R::from_f64(d as f64);
    for r in 0..t {
        let x = &kraw[r * d..(r + 1) * d];
        let mut mean = R::ZERO;
        for &v in x {
            mean += v;
        }
        mean = mean / dn;
        let mut var = R::ZERO;
        for &v in x {
            var += (v - mean) * (v - mean);
        }
        let inv = R::ONE / (var / dn + R::from_f64(LN_EPS)).sqrt();
        kinv[r] = inv;
        for c in 0..d {
            let xh = (x[c] - mean) * inv;
            khat[r * d + c] = xh;
            k[r * d + c] = xh * p.ln_w[c] + p.ln_b[c];
        }
        rotate(&mut k[r * d..(r + 1) * d], table, r, layout, false);
    }
    let mut w = linear(h, t, hid, &p.wp, hi);
    let ws = R::from_f64((hi as f64).powf(-0.5));
    for v in w.iter_mut() {
        *v = *v * ws;
    }
    Forward { q, k, khat, kinv, w }
}

/// `z [T·HI, T] = D^-½ · q · kᵀ` (row `t·HI + j`: head `j` of query `t` against every key).
fn logits_z<R: Real>(f: &Forward<R>, t: usize, hi: usize, d: usize) -> Vec<R> {
    let mut z = vec![R::ZERO; t * hi * t];
    mm(t * hi, t, d, (&f.q, d, 1), (&f.k, 1, d), &mut z, R::from_f64((d as f64).powf(-0.5)));
    z
}

/// `I[t, s] = Σ_j w[t,j] · ReLU(z[t,j,s])` for `s < n`, from row `t`'s head logits
/// `zr [HI, T]` and head weights `wr [HI]`.
fn causal_scores<R: Real>(zr: &[R], wr: &[R], n: usize, t: usize) -> Vec<R> {
    let mut out = vec![R::ZERO; n];
    for (j, &wj) in wr.iter().enumerate() {
        for (o, &zz) in out.iter_mut().zip(&zr[j * t..j * t + n]) {
            if zz > R::ZERO {
                *o += wj * zz;
            }
        }
    }
    out
}

/// The indexer scores `I [T, T]` (row `t` valid at `s ≤ t`, the rest 0) of the parameters `p`.
pub fn scores<R: Real>(p: &Params<R>, dm: Dims, h: &[R], t: usize, table: &RopeTable, layout: RopeLayout) -> Vec<R> {
    let f = forward(p, dm, h, t, table, layout);
    let z = logits_z(&f, t, dm.heads, dm.d);
    let mut out = vec![R::ZERO; t * t];
    out.par_chunks_mut(t).enumerate().for_each(|(r, row)| {
        let hi = dm.heads;
        row[..r + 1].copy_from_slice(&causal_scores(
            &z[r * hi * t..(r + 1) * hi * t],
            &f.w[r * hi..(r + 1) * hi],
            r + 1,
            t,
        ));
    });
    out
}

/// Mean over rows of `KL(p_t ‖ softmax(I_t))` over `s ≤ t`, and its gradient with respect to
/// every parameter. `target [T, T]`: row `t` a distribution over `s ≤ t` (entries past `t`
/// ignored). `h [T, hidden]`: the layer's normalised hidden states, row `t` at position `t`.
pub fn loss_and_grad<R: Real>(
    p: &Params<R>,
    dm: Dims,
    h: &[R],
    t: usize,
    target: &[R],
    table: &RopeTable,
    layout: RopeLayout,
) -> (f64, Params<R>) {
    let (hi, d, hid) = (dm.heads, dm.d, dm.hidden);
    let f = forward(p, dm, h, t, table, layout);
    let scale = R::from_f64((d as f64).powf(-0.5));
    let inv_t = R::from_f64(1.0 / t as f64);
    // Head logits z, then per row: the loss, ∂w, and ∂z (in place of z: G·w·[z>0], zero past t).
    let mut z = logits_z(&f, t, hi, d);
    let mut dw = vec![R::ZERO; t * hi];
    let losses: Vec<f64> = z
        .par_chunks_mut(hi * t)
        .zip(dw.par_chunks_mut(hi))
        .enumerate()
        .map(|(r, (zr, dwr))| {
            let n = r + 1;
            let logits = causal_scores(zr, &f.w[r * hi..(r + 1) * hi], n, t);
            let m = logits.iter().fold(logits[0], |a, &b| if b > a { b } else { a });
            let e: Vec<R> = logits.iter().map(|&v| (v - m).exp()).collect();
            let mut zsum = R::ZERO;
            for &v in &e {
                zsum += v;
            }
            let log_z = zsum.to_f64().ln() + m.to_f64();
            let pt = &target[r * t..r * t + n];
            let mut loss = 0.0f64;
            for s in 0..n {
                let ps = pt[s].to_f64();
                if ps > 0.0 {
                    loss += ps * (ps.ln() - (logits[s].to_f64() - log_z));
                }
            }
            for j in 0..hi {
                let wj = f.w[r * hi + j];
                let row = &mut zr[j * t..(j + 1) * t];
                let mut acc = R::ZERO;
                for s in 0..n {
                    let g = (e[s] / zsum - pt[s]) * inv_t;
                    if row[s] > R::ZERO {
                        acc += g * row[s];
                        row[s] = g * wj;
                    } else {
                        row[s] = R::ZERO;
                    }
                }
                row[n..].iter_mut().for_each(|v| *v = R::ZERO);
                dwr[j] = acc;
            }
            loss / t as f64
        })
        .collect();
    let loss: f64 = losses.iter().sum();
    // ∂q = D^-½ ∂z · k, ∂k = D^-½ ∂zᵀ · q.
    let mut dq = vec![R::ZERO; t * hi * d];
    mm(t * hi, d, t, (&z, t, 1), (&f.k, d, 1), &mut dq, scale);
    let mut dk = vec![R::ZERO; t * d];
    mm(t, d, t * hi, (&z, 1, t), (&f.q, d, 1), &mut dk, scale);
    // Back through RoPE (the inverse rotation is the transpose).
    for r in 0..t {
        for j in 0..hi {
            rotate(&mut dq[(r * hi + j) * d..(r * hi + j + 1) * d], table, r, layout, true);
        }
        rotate(&mut dk[r * d..(r + 1) * d], table, r, layout, true);
    }
    // Back through the affine LayerNorm.
    let mut g = Params::zeros(dm);
    let mut dkraw = vec![R::ZERO; t * d];
    let dn = R::from_f64(d as f64);
    for r in 0..t {
        let dy = &dk[r * d..(r + 1) * d];
        let xh = &f.khat[r * d..(r + 1) * d];
        let mut dxh = vec![R::ZERO; d];
        let (mut mean_dxh, mut mean_dxh_xh) = (R::ZERO, R::ZERO);
        for c in 0..d {
            g.ln_w[c] += dy[c] * xh[c];
            g.ln_b[c] += dy[c];
            dxh[c] = dy[c] * p.ln_w[c];
            mean_dxh += dxh[c];
            mean_dxh_xh += dxh[c] * xh[c];
        }
        mean_dxh = mean_dxh / dn;
        mean_dxh_xh = mean_dxh_xh / dn;
        for c in 0..d {
            dkraw[r * d + c] = f.kinv[r] * (dxh[c] - mean_dxh - xh[c] * mean_dxh_xh);
        }
    }
    let ws = R::from_f64((hi as f64).powf(-0.5));
    for v in dw.iter_mut() {
        *v = *v * ws;
    }
    g.wq = linear_grad_w(&dq, h, t, hid, hi * d);
    g.wk = linear_grad_w(&dkraw, h, t, hid, d);
    g.wp = linear_grad_w(&dw, h, t, hid, hi);
    (loss, g)
}

/// The attention distribution of a GQA layer, summed over its query heads and renormalised:
/// `p[t, s] = mean_h softmax_s(scale · q_h[t] · k_g(h)[s])`, `s ≤ t`, as `[T, T]` (zeros past `t`).
/// `q [T, H*D]` and `k [T, Hkv*D]` are the layer's rotated queries and keys.
pub fn attention_target(
    q: &[f32],
    k: &[f32],
    t: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    scale: f32,
) -> Vec<f32> {
    let rep = heads / kv_heads;
    let mut out = vec![0.0f32; t * t];
    let mut logits = vec![0.0f32; t * t];
    for h in 0..heads {
        let g = h / rep;
        // S_h = scale · Q_h · K_gᵀ; Q_h rows at q[t·H·D + h·D], K_g rows at k[s·Hkv·D + g·D].
        mm(t, t, d, (&q[h * d..], heads * d, 1), (&k[g * d..], 1, kv_heads * d), &mut logits, scale);
        out.par_chunks_mut(t).zip(logits.par_chunks(t)).enumerate().for_each(|(r, (row, l))| {
            let l = &l[..r + 1];
            let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = l.iter().map(|&x| (x - m).exp()).sum();
            for (o, &x) in row.iter_mut().zip(l) {
                *o += (x - m).exp() / z / heads as f32;
            }
        });
    }
    out
}

/// AdamW (decoupled weight decay) over a parameter set, with bias correction.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Steps taken.
    pub step: u64,
    /// First and second moments, one pair per parameter tensor.
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl AdamW {
    pub fn new(lr: f32, weight_decay: f32) -> Self {
        AdamW { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay, step: 0, m: Vec::new(), v: Vec::new() }
    }

    /// One update of `params` (tensors in a fixed order) with gradients `grads`. LayerNorm
    /// parameters (1-D tensors) get no weight decay.
    pub fn update(&mut self, params: &mut [&mut Vec<f32>], grads: &[&Vec<f32>]) {
        if self.m.is_empty() {
            self.m = params.iter().map(|p| vec![0.0; p.len()]).collect();
            self.v = self.m.clone();
        }
        self.step += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(self.step as i32);
        let c2 = 1.0 - b2.powi(self.step as i32);
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let decay = if p.len() > 1 && self.m[i].len() > 256 { self.weight_decay } else { 0.0 };
            for ((x, &gi), (m, v)) in p.iter_mut().zip(g.iter()).zip(self.m[i].iter_mut().zip(self.v[i].iter_mut())) {
                *m = b1 * *m + (1.0 - b1) * gi;
                *v = b2 * *v + (1.0 - b2) * gi * gi;
                let upd = (*m / c1) / ((*v / c2).sqrt() + self.eps);
                *x -= self.lr * (upd + decay * *x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(d: usize, t: usize) -> RopeTable {
        let inv: Vec<f32> = (0..d / 2).map(|i| 10000f32.powf(-((2 * i) as f32) / d as f32)).collect();
        RopeTable::new(&inv, 1.0, t)
    }

    fn to64(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }

    fn params64(p: &Params<f32>) -> Params<f64> {
        Params { wq: to64(&p.wq), wk: to64(&p.wk), ln_w: to64(&p.ln_w), ln_b: to64(&p.ln_b), wp: to64(&p.wp) }
    }

    /// A random causal target (rows sum to 1 over s ≤ t).
    fn target(t: usize, seed: u64) -> Vec<f64> {
        let r = indexcache_ops::random::fill(seed, 1.0, t * t);
        let mut p = vec![0.0f64; t * t];
        for row in 0..t {
            let w: Vec<f64> = (0..=row).map(|s| (2.0 * r[row * t + s] as f64).exp()).collect();
            let z: f64 = w.iter().sum();
            for s in 0..=row {
                p[row * t + s] = w[s] / z;
            }
        }
        p
    }

    /// Every gradient entry (a sample of the large ones) against central differences in f64.
    #[test]
    fn gradient_matches_finite_differences() {
        let dm = Dims { heads: 3, d: 8, hidden: 12 };
        let t = 10;
        let tb = table(dm.d, t);
        let mut p32 = init_params(dm, 7, 0);
        // Non-trivial LayerNorm affine.
        for (i, v) in p32.ln_w.iter_mut().enumerate() {
            *v = 0.5 + 0.1 * i as f32;
        }
        for (i, v) in p32.ln_b.iter_mut().enumerate() {
            *v = 0.05 * i as f32 - 0.2;
        }
        let p = params64(&p32);
        let h = to64(&indexcache_ops::random::fill(3, 1.0, t * dm.hidden));
        let tg = target(t, 5);
        for layout in [RopeLayout::Interleaved, RopeLayout::HalfSplit] {
            let (_, g) = loss_and_grad(&p, dm, &h, t, &tg, &tb, layout);
            let names = ["wq", "wk", "ln_w", "ln_b", "wp"];
            let grads = [&g.wq, &g.wk, &g.ln_w, &g.ln_b, &g.wp];
            let mut worst = 0.0f64;
            for (ti, name) in names.iter().enumerate() {
                let n = grads[ti].len();
                for i in (0..n).step_by((n / 17).max(1)) {
                    let eps = 1e-6;
                    let mut pp = p.clone();
                    pp.tensors_mut()[ti][i] += eps;
                    let lp = loss_and_grad(&pp, dm, &h, t, &tg, &tb, layout).0;
                    pp.tensors_mut()[ti][i] -= 2.0 * eps;
                    let lm = loss_and_grad(&pp, dm, &h, t, &tg, &tb, layout).0;
                    let fd = (lp - lm) / (2.0 * eps);
                    let an = grads[ti][i];
                    let err = (fd - an).abs() / (fd.abs() + an.abs()).max(1e-7);
                    assert!(err < 1e-5, "{layout:?} {name}[{i}]: analytic {an:e} vs finite difference {fd:e}");
                    worst = worst.max(err);
                }
            }
            eprintln!("{layout:?}: worst relative gradient error {worst:.2e}");
        }
    }

    /// Proposition 1: Σ_l ∇KL(p_l ‖ Q) = N · ∇KL(p̄ ‖ Q) with p̄ the mean target.
    #[test]
    fn multi_layer_gradient_is_the_averaged_targets_gradient() {
        let dm = Dims { heads: 2, d: 8, hidden: 10 };
        let t = 9;
        let tb = table(dm.d, t);
        let p = params64(&init_params(dm, 11, 3));
        let h = to64(&indexcache_ops::random::fill(4, 1.0, t * dm.hidden));
        let targets: Vec<Vec<f64>> = (0..3).map(|i| target(t, 20 + i)).collect();
        let mean: Vec<f64> = (0..t * t).map(|i| targets.iter().map(|tg| tg[i]).sum::<f64>() / 3.0).collect();
        let mut sum: Params<f64> = Params::zeros(dm);
        for tg in &targets {
            let (_, g) = loss_and_grad(&p, dm, &h, t, tg, &tb, RopeLayout::Interleaved);
            for (acc, gi) in sum.tensors_mut().into_iter().zip(g.tensors()) {
                for (a, b) in acc.iter_mut().zip(gi.1) {
                    *a += b;
                }
            }
        }
        let (_, gm) = loss_and_grad(&p, dm, &h, t, &mean, &tb, RopeLayout::Interleaved);
        for ((name, a), (_, b)) in sum.tensors().into_iter().zip(gm.tensors()) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - 3.0 * y).abs() <= 1e-12 + 1e-9 * x.abs(), "{name}: {x} vs 3 × {y}");
            }
        }
    }

    /// The f32 training path agrees with f64 and the scores are those the loss used.
    #[test]
    fn f32_and_f64_agree() {
        let dm = Dims { heads: 2, d: 16, hidden: 24 };
        let t = 12;
        let tb = table(dm.d, t);
        let p32 = init_params(dm, 1, 2);
        let h32 = indexcache_ops::random::fill(9, 1.0, t * dm.hidden);
        let tg64 = target(t, 30);
        let tg32: Vec<f32> = tg64.iter().map(|&v| v as f32).collect();
        let (l32, g32) = loss_and_grad(&p32, dm, &h32, t, &tg32, &tb, RopeLayout::Interleaved);
        let (l64, g64) = loss_and_grad(&params64(&p32), dm, &to64(&h32), t, &tg64, &tb, RopeLayout::Interleaved);
        assert!((l32 - l64).abs() < 1e-5 * l64.abs().max(1.0), "{l32} vs {l64}");
        for ((name, a), (_, b)) in g32.tensors().into_iter().zip(g64.tensors()) {
            let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).powi(2)).sum();
            let den: f64 = b.iter().map(|y| y * y).sum();
            assert!((num / den.max(1e-30)).sqrt() < 1e-4, "{name}");
        }
    }

    /// The GEMM attention target against a plain per-head softmax (GQA 6/2).
    #[test]
    fn attention_target_is_the_head_mean_of_causal_softmaxes() {
        let (t, heads, kv, d) = (11usize, 6usize, 2usize, 8usize);
        let q = indexcache_ops::random::fill(1, 1.0, t * heads * d);
        let k = indexcache_ops::random::fill(2, 1.0, t * kv * d);
        let got = attention_target(&q, &k, t, heads, kv, d, 0.5);
        for r in 0..t {
            let mut want = vec![0.0f64; r + 1];
            for h in 0..heads {
                let g = h / (heads / kv);
                let l: Vec<f64> = (0..=r)
                    .map(|s| {
                        0.5 * (0..d)
                            .map(|c| q[(r * heads + h) * d + c] as f64 * k[(s * kv + g) * d + c] as f64)
                            .sum::<f64>()
                    })
                    .collect();
                let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = l.iter().map(|x| (x - m).exp()).sum();
                for s in 0..=r {
                    want[s] += (l[s] - m).exp() / z / heads as f64;
                }
            }
            for s in 0..t {
                let w = if s <= r { want[s] } else { 0.0 };
                assert!((got[r * t + s] as f64 - w).abs() < 1e-6, "row {r} key {s}: {} vs {w}", got[r * t + s]);
            }
        }
    }

    /// A few AdamW steps on one fixed target lower the loss, and the same seed gives the same
    /// weights.
    #[test]
    fn adamw_lowers_the_loss_reproducibly() {
        let dm = Dims { heads: 2, d: 8, hidden: 16 };
        let t = 16;
        let tb = table(dm.d, t);
        let h = indexcache_ops::random::fill(2, 1.0, t * dm.hidden);
        let tg: Vec<f32> = target(t, 40).iter().map(|&v| v as f32).collect();
        let run = || {
            let mut p = init_params(dm, 5, 0);
            let mut opt = AdamW::new(1e-2, 0.0);
            let first = loss_and_grad(&p, dm, &h, t, &tg, &tb, RopeLayout::Interleaved).0;
            let mut last = first;
            for _ in 0..60 {
                let (l, g) = loss_and_grad(&p, dm, &h, t, &tg, &tb, RopeLayout::Interleaved);
                last = l;
                let grads: Vec<&Vec<f32>> = g.tensors().into_iter().map(|x| x.1).collect();
                opt.update(&mut p.tensors_mut(), &grads);
            }
            (first, last, p)
        };
        let (first, last, p1) = run();
        let (_, _, p2) = run();
        eprintln!("loss {first:.4} -> {last:.4}");
        assert!(last < 0.7 * first, "{first} -> {last}");
        assert_eq!(p1, p2);
    }
}

// ---- training driver ---------------------------------------------------------------------------

/// How a distillation run is set up.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub dims: Dims,
    /// Which layers keep an indexer and which layers each serves: `None` = warm-up (every layer
    /// its own indexer, trained on its own attention); `Some(schedule)` = multi-layer (each Full
    /// layer trained on the mean attention of itself and the Shared layers after it).
    pub schedule: Option<indexcache_config::IndexSchedule>,
    pub lr: f32,
    pub weight_decay: f32,
    pub seed: u64,
}

/// The layers trained and, for each, the layers whose attention it imitates.
pub fn served_layers(n_layers: usize, schedule: Option<&indexcache_config::IndexSchedule>) -> Vec<(usize, Vec<usize>)> {
    match schedule {
        None => (0..n_layers).map(|l| (l, vec![l])).collect(),
        Some(s) => {
            let mut out: Vec<(usize, Vec<usize>)> = Vec::new();
            for l in 0..n_layers {
                if s.is_full(l) {
                    out.push((l, vec![l]));
                } else if let Some(last) = out.last_mut() {
                    last.1.push(l);
                }
            }
            out
        }
    }
}

/// Indexers being trained: parameters and optimiser state per trained layer.
pub struct Trainer {
    pub cfg: TrainConfig,
    /// `(layer, served layers, params, optimiser)`.
    pub layers: Vec<(usize, Vec<usize>, Params<f32>, AdamW)>,
    /// Mean loss of every step (over the trained layers).
    pub history: Vec<f64>,
}

impl Trainer {
    pub fn new(cfg: TrainConfig, n_layers: usize) -> Self {
        let layers = served_layers(n_layers, cfg.schedule.as_ref())
            .into_iter()
            .map(|(l, served)| (l, served, init_params(cfg.dims, cfg.seed, l), AdamW::new(cfg.lr, cfg.weight_decay)))
            .collect();
        Trainer { cfg, layers, history: Vec::new() }
    }

    /// One step on one window's taps (`taps[l]` of every layer of a pass over `t` tokens from an
    /// empty cache): per trained layer, its target, loss, gradient and AdamW update. Returns the
    /// per-layer losses.
    pub fn step(
        &mut self,
        taps: &[indexcache_model::LayerTap],
        t: usize,
        attn: (usize, usize, usize, f32),
        table: &RopeTable,
        layout: RopeLayout,
    ) -> Vec<f64> {
        let (heads, kv_heads, d, scale) = attn;
        let dims = self.cfg.dims;
        let mut losses = Vec::with_capacity(self.layers.len());
        for (l, served, params, opt) in self.layers.iter_mut() {
            let mut target = vec![0.0f32; t * t];
            for &m in served.iter() {
                let p = attention_target(&taps[m].q, &taps[m].k, t, heads, kv_heads, d, scale);
                for (a, b) in target.iter_mut().zip(&p) {
                    *a += b / served.len() as f32;
                }
            }
            let (loss, g) = loss_and_grad(params, dims, &taps[*l].h, t, &target, table, layout);
            let grads: Vec<&Vec<f32>> = g.tensors().into_iter().map(|x| x.1).collect();
            opt.update(&mut params.tensors_mut(), &grads);
            losses.push(loss);
        }
        self.history.push(losses.iter().sum::<f64>() / losses.len().max(1) as f64);
        losses
    }

    /// The trained indexers as checkpoint tensors (`model.layers.{l}.self_attn.indexer.*`).
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, &Vec<f32>)> {
        let d = self.cfg.dims;
        let shapes = Params::<f32>::shapes(d);
        let mut out = Vec::new();
        for (l, _, p, _) in &self.layers {
            for ((name, v), shape) in p.tensors().into_iter().zip(&shapes) {
                out.push((format!("model.layers.{l}.self_attn.indexer.{name}"), shape.clone(), v));
            }
        }
        out
    }
}
