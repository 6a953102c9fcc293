//! A backend-generic op conformance suite, in the spirit of llama.cpp's `test-backend-ops`.
//!
//! [`run`] drives every op of [`Backend`] on fresh seeded random inputs ([`crate::random`]) and
//! compares the result with a plain host reference: the f64-accumulating references of
//! [`crate::cpu::reference`] (matmul, indexer, masked sparse attention), [`crate::cpu::route`] for
//! MoE routing, [`RopeTable::rotate`], and short textbook formulas written out here (norms, NLL,
//! copies). The references do not go through [`crate::cpu::CpuBackend`], so running the suite on
//! the CPU backend is itself a test of that backend.
//!
//! Inputs are rounded to the backend's dtype before both sides see them (a bf16 backend stores
//! bf16 — rounding the inputs on the host makes both sides start from the same numbers), so the
//! measured error is the op's own: intermediate and output rounding, accumulation order.
//!
//! Measures:
//! * tensors: relative error `‖got − want‖₂ / ‖want‖₂` (0 = bit-identical; NaN fails);
//! * selections: fraction of the reference's entries the backend also selected (rows compared as
//!   sets; the fraction of identical rows is reported alongside);
//! * expected failures (a RoPE position beyond the table, an out-of-bounds block): the op must
//!   return an error.
//!
//! Data movement (copies, gathers, seeded random weights) must be bit-exact in every dtype.

use crate::cpu::{reference, route};
use crate::{Backend, DType, Experts, Mlp, Moe, MoeRouting, OpResult, RopeLayout, RopeTable, TopK, WeightInit, random};

/// Error limits of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Relative error of ordinary ops.
    pub rel: f64,
    /// Relative error of ops with data-dependent paths or long softmax reductions (MoE, sparse
    /// attention).
    pub rel_loose: f64,
    /// Minimum fraction of shared top-k entries.
    pub topk_shared: f64,
}

impl Tolerance {
    /// F32 (exact mode): 1e-5 (1e-4 for MoE / sparse attention), 99.9 % shared top-k entries.
    /// BF16 (fast mode): 2e-2, 99 % shared top-k entries.
    pub fn for_dtype(dtype: DType) -> Self {
        match dtype {
            DType::F32 => Self { rel: 1e-5, rel_loose: 1e-4, topk_shared: 0.999 },
            DType::BF16 => Self { rel: 2e-2, rel_loose: 2e-2, topk_shared: 0.99 },
        }
    }
}

/// What a check measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    /// Relative error; passes when `value <= limit`.
    RelErr,
    /// Fraction of shared top-k entries; passes when `value >= limit`.
    Shared,
    /// The op must fail; `value` is 1 when it did.
    MustFail,
}

/// The outcome of one check.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub op: &'static str,
    pub case: String,
    pub measure: Measure,
    pub value: f64,
    pub limit: f64,
    pub passed: bool,
    /// Extra facts (identical rows of a selection), or the error an op returned.
    pub detail: String,
}

/// A fixed-width table of results, one line per check, failures marked.
pub fn table(results: &[CheckResult]) -> String {
    let mut s = format!("{:<15} {:<68} {:>11} {:>11}  {:<4} {}\n", "op", "case", "value", "limit", "ok", "detail");
    for r in results {
        let m = match r.measure {
            Measure::RelErr => "≤",
            Measure::Shared => "≥",
            Measure::MustFail => "=",
        };
        s += &format!(
            "{:<15} {:<68} {:>11.3e} {m}{:>10.1e}  {:<4} {}\n",
            r.op,
            r.case,
            r.value,
            r.limit,
            if r.passed { "ok" } else { "FAIL" },
            r.detail
        );
    }
    let failed = results.iter().filter(|r| !r.passed).count();
    s += &format!("{} checks, {failed} failed\n", results.len());
    s
}

/// `‖got − want‖₂ / ‖want‖₂` in f64 (`‖got − want‖₂` where `want` is all zeros); infinite when
/// the lengths differ, NaN when `got` holds a NaN.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        let (g, w) = (g as f64, w as f64);
        d += (g - w) * (g - w);
        n += w * w;
    }
    if n == 0.0 { d.sqrt() } else { (d / n).sqrt() }
}

fn rel_err64(got: &[f64], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let d: f64 = got.iter().zip(want).map(|(g, w)| (g - w) * (g - w)).sum();
    let n: f64 = want.iter().map(|w| w * w).sum();
    if n == 0.0 { d.sqrt() } else { (d / n).sqrt() }
}

/// Round to the nearest bf16 (ties to even), as a bf16 backend stores values.
pub fn round_bf16(x: f32) -> f32 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return f32::from_bits((u | 0x0040_0000) & 0xffff_0000);
    }
    f32::from_bits((u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) << 16)
}

/// `(shared, identical_rows)` fractions of selection `got` against `want` (rows as sets of valid
/// positions). Shapes that differ score 0.
pub fn selection_overlap(got: &TopK, want: &TopK) -> (f64, f64) {
    if got.rows != want.rows || got.k != want.k || got.data.len() != want.data.len() {
        return (0.0, 0.0);
    }
    let (mut shared, mut total, mut identical) = (0usize, 0usize, 0usize);
    for t in 0..want.rows {
        let mut w: Vec<usize> = want.valid(t).collect();
        let mut g: Vec<usize> = got.valid(t).collect();
        w.sort_unstable();
        g.sort_unstable();
        g.dedup();
        total += w.len();
        shared += w.iter().filter(|p| g.binary_search(p).is_ok()).count();
        identical += usize::from(g == w && got.valid(t).count() == g.len());
    }
    let shared = if total == 0 { 1.0 } else { shared as f64 / total as f64 };
    (shared, if want.rows == 0 { 1.0 } else { identical as f64 / want.rows as f64 })
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `down(silu(x·gateᵀ) * x·upᵀ)` with the f64-accumulating reference matmul.
fn ref_swiglu(x: &[f32], t: usize, hidden: usize, gate: &[f32], up: &[f32], down: &[f32], inter: usize) -> Vec<f32> {
    let g = reference::matmul_t(x, t, hidden, gate, inter);
    let u = reference::matmul_t(x, t, hidden, up, inter);
    let a: Vec<f32> = g.iter().zip(&u).map(|(&g, &u)| silu(g) * u).collect();
    reference::matmul_t(&a, t, inter, down, hidden)
}

/// Shared-expert MLP weights: gate, up (`[width, hidden]`), down (`[hidden, width]`), width.
type SharedData = (Vec<f32>, Vec<f32>, Vec<f32>, usize);

/// One MoE case's host data.
struct MoeData {
    t: usize,
    hidden: usize,
    n_exp: usize,
    inter: usize,
    x: Vec<f32>,
    router: Vec<f32>,
    bias: Vec<f32>,
    gate_up: Vec<f32>,
    down: Vec<f32>,
    shared: Option<SharedData>,
    routing: MoeRouting,
}

fn ref_moe(m: &MoeData) -> Vec<f32> {
    let (h, i) = (m.hidden, m.inter);
    let logits = reference::matmul_t(&m.x, m.t, h, &m.router, m.n_exp);
    let mut out = vec![0.0f32; m.t * h];
    for t in 0..m.t {
        let xt = &m.x[t * h..(t + 1) * h];
        let o = &mut out[t * h..(t + 1) * h];
        for (e, w) in route(&logits[t * m.n_exp..(t + 1) * m.n_exp], &m.bias, &m.routing) {
            let gu = &m.gate_up[e * 2 * i * h..(e + 1) * 2 * i * h];
            let y = ref_swiglu(xt, 1, h, &gu[..i * h], &gu[i * h..], &m.down[e * h * i..(e + 1) * h * i], i);
            for (d, v) in o.iter_mut().zip(&y) {
                *d += v * w;
            }
        }
        if let Some((g, u, d, si)) = &m.shared {
            let y = ref_swiglu(xt, 1, h, g, u, d, *si);
            for (o, v) in o.iter_mut().zip(&y) {
                *o += v;
            }
        }
    }
    out
}

/// A deterministic permutation of `0..n` (Fisher–Yates on [`random::hash`]).
fn shuffle(seed: u64, n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (random::hash(seed, i as u64) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

struct Suite<'a, B: Backend> {
    b: &'a B,
    tol: Tolerance,
    out: Vec<CheckResult>,
}

impl<'a, B: Backend> Suite<'a, B> {
    /// Round host values to the backend dtype.
    fn q(&self, mut v: Vec<f32>) -> Vec<f32> {
        if self.b.dtype() == DType::BF16 {
            v.iter_mut().for_each(|x| *x = round_bf16(*x));
        }
        v
    }

    /// `n` seeded uniform values in `[-bound, bound)`, rounded to the backend dtype.
    fn data(&self, seed: u64, n: usize, bound: f32) -> Vec<f32> {
        self.q(random::fill(seed, bound, n))
    }

    fn up(&self, v: &[f32], rows: usize, cols: usize) -> OpResult<B::Tensor> {
        self.b.upload(v, rows, cols)
    }

    fn wt(&self, v: &[f32], groups: usize, rows: usize, cols: usize) -> OpResult<B::Weight> {
        self.b.weight(WeightInit::Host(v.to_vec()), groups, rows, cols)
    }

    fn push(&mut self, op: &'static str, case: String, measure: Measure, value: f64, limit: f64, detail: String) {
        let passed = match measure {
            Measure::RelErr => value <= limit,
            Measure::Shared => value >= limit,
            Measure::MustFail => value == 1.0,
        };
        self.out.push(CheckResult { op, case, measure, value, limit, passed, detail });
    }

    fn failed(&mut self, op: &'static str, case: String, measure: Measure, limit: f64, e: impl std::fmt::Display) {
        let value = if measure == Measure::Shared { 0.0 } else { f64::INFINITY };
        self.out.push(CheckResult { op, case, measure, value, limit, passed: false, detail: format!("error: {e}") });
    }

    /// Run `f` → `(got, want)` and record their relative error against `limit`.
    fn rel(
        &mut self,
        op: &'static str,
        case: String,
        limit: f64,
        f: impl FnOnce(&Self) -> OpResult<(Vec<f32>, Vec<f32>)>,
    ) {
        match f(self) {
            Ok((got, want)) => {
                let detail = if got.len() == want.len() {
                    String::new()
                } else {
                    format!("{} values, expected {}", got.len(), want.len())
                };
                self.push(op, case, Measure::RelErr, rel_err(&got, &want), limit, detail)
            }
            Err(e) => self.failed(op, case, Measure::RelErr, limit, e),
        }
    }

    /// `f` must return an error.
    fn must_fail<T>(&mut self, op: &'static str, case: String, f: impl FnOnce(&Self) -> OpResult<T>) {
        let (value, detail) = match f(self) {
            Ok(_) => (0.0, "the op succeeded".to_string()),
            Err(e) => (1.0, format!("error as expected: {e}")),
        };
        self.push(op, case, Measure::MustFail, value, 1.0, detail);
    }

    fn selection(&mut self, op: &'static str, case: String, f: impl FnOnce(&Self) -> OpResult<(TopK, TopK)>) {
        let limit = self.tol.topk_shared;
        match f(self) {
            Ok((got, want)) => {
                let (shared, identical) = selection_overlap(&got, &want);
                let detail = if (got.rows, got.k) != (want.rows, want.k) {
                    format!("shape [{}, {}], expected [{}, {}]", got.rows, got.k, want.rows, want.k)
                } else {
                    format!("identical rows {:.1} %", identical * 100.0)
                };
                self.push(op, case, Measure::Shared, shared, limit, detail);
            }
            Err(e) => self.failed(op, case, Measure::Shared, limit, e),
        }
    }

    // ---- data movement ------------------------------------------------------------------------

    fn data_movement(&mut self) {
        let (r, c) = (37, 53);
        self.rel("upload", format!("[{r}, {c}] roundtrip"), 0.0, |s| {
            let x = s.data(1, r * c, 3.0);
            let t = s.up(&x, r, c)?;
            let dims_ok = s.b.dims(&t) == (r, c);
            let mut got = s.b.download(&t)?;
            if !dims_ok {
                got.push(f32::NAN);
            }
            Ok((got, x))
        });
        self.rel("zeros", "[5, 7]".into(), 0.0, |s| Ok((s.b.download(&s.b.zeros(5, 7)?)?, vec![0.0; 35])));
        self.rel("copy", "[9, 31]".into(), 0.0, |s| {
            let x = s.data(2, 9 * 31, 1.0);
            Ok((s.b.download(&s.b.copy(&s.up(&x, 9, 31)?)?)?, x))
        });
        self.rel("rows", "[10, 12] rows 3..7".into(), 0.0, |s| {
            let x = s.data(3, 120, 1.0);
            Ok((s.b.download(&s.b.rows(&s.up(&x, 10, 12)?, 3, 4)?)?, x[36..84].to_vec()))
        });
        self.rel("columns", "[10, 12] columns 5..11".into(), 0.0, |s| {
            let x = s.data(4, 120, 1.0);
            let want: Vec<f32> = (0..10).flat_map(|r| x[r * 12 + 5..r * 12 + 11].to_vec()).collect();
            Ok((s.b.download(&s.b.columns(&s.up(&x, 10, 12)?, 5, 6)?)?, want))
        });
        self.rel("head_columns", "[4, 3×10] offset 2 len 5".into(), 0.0, |s| {
            let x = s.data(5, 120, 1.0);
            let want: Vec<f32> = (0..4)
                .flat_map(|r| (0..3).flat_map(move |h| (2..7).map(move |j| r * 30 + h * 10 + j)))
                .map(|i| x[i])
                .collect();
            Ok((s.b.download(&s.b.head_columns(&s.up(&x, 4, 30)?, 3, 10, 2, 5)?)?, want))
        });
        self.rel("write_block", "dst [8, 20] at (2, 7) ← [3, 9]".into(), 0.0, |s| {
            let d = s.data(6, 160, 1.0);
            let src = s.data(7, 27, 1.0);
            let mut dst = s.up(&d, 8, 20)?;
            s.b.write_block(&mut dst, 2, 7, &s.up(&src, 3, 9)?)?;
            let mut want = d.clone();
            for r in 0..3 {
                want[(2 + r) * 20 + 7..(2 + r) * 20 + 16].copy_from_slice(&src[r * 9..(r + 1) * 9]);
            }
            Ok((s.b.download(&dst)?, want))
        });
        self.must_fail("write_block", "out of bounds: [3, 9] at (6, 7) of [8, 20]".into(), |s| {
            let mut dst = s.b.zeros(8, 20)?;
            let src = s.up(&s.data(8, 27, 1.0), 3, 9)?;
            s.b.write_block(&mut dst, 6, 7, &src)
        });
        self.rel("write_rows", "dst [12, 20] col 7 ← [3, 9] at positions 9, 2, 5 (then 0, 11, 4)".into(), 0.0, |s| {
            let d = s.data(30, 240, 1.0);
            let (a, b) = (s.data(31, 27, 1.0), s.data(32, 27, 1.0));
            let mut dst = s.up(&d, 12, 20)?;
            let mut pos = s.b.positions(&[9, 2, 5])?;
            s.b.write_rows(&mut dst, &pos, 7, &s.up(&a, 3, 9)?)?;
            // The same positions object, updated in place (what a replayed step does).
            s.b.update_positions(&mut pos, &[0, 11, 4])?;
            s.b.write_rows(&mut dst, &pos, 7, &s.up(&b, 3, 9)?)?;
            let mut want = d.clone();
            for (src, ps) in [(&a, [9, 2, 5]), (&b, [0, 11, 4])] {
                for (r, p) in ps.into_iter().enumerate() {
                    want[p * 20 + 7..p * 20 + 16].copy_from_slice(&src[r * 9..(r + 1) * 9]);
                }
            }
            Ok((s.b.download(&dst)?, want))
        });
        self.must_fail("write_rows", "position 12 of a [12, 20] destination".into(), |s| {
            let mut dst = s.b.zeros(12, 20)?;
            let src = s.up(&s.data(33, 18, 1.0), 2, 9)?;
            s.b.write_rows(&mut dst, &s.b.positions(&[3, 12])?, 0, &src)
        });
        self.must_fail("update_positions", "3 positions ← 2".into(), |s| {
            let mut pos = s.b.positions(&[1, 2, 3])?;
            s.b.update_positions(&mut pos, &[4, 5])
        });
        self.rel("selection", "[3, 5] host → device → host".into(), 0.0, |s| {
            let sel = TopK { rows: 3, k: 5, data: vec![4, 0, 2, -1, -1, 7, 1, 3, 9, 5, 0, -1, -1, -1, -1] };
            let back = s.b.selection_to_host(&s.b.selection_from_host(&sel)?)?;
            let same = back == sel;
            Ok((vec![f32::from(u8::from(!same))], vec![0.0]))
        });
        self.rel("embedding", "table [50, 40], 6 ids".into(), 0.0, |s| {
            let table = s.data(9, 50 * 40, 1.0);
            let ids = [3u32, 0, 49, 3, 17, 28];
            let want: Vec<f32> =
                ids.iter().flat_map(|&i| table[i as usize * 40..(i as usize + 1) * 40].to_vec()).collect();
            Ok((s.b.download(&s.b.embedding(&s.wt(&table, 1, 50, 40)?, &ids)?)?, want))
        });
        self.rel("random weight", "[1, 300, 64] seed 99 bound 0.02 = random::fill".into(), 0.0, |s| {
            let w = s.b.weight(WeightInit::Random { seed: 99, bound: 0.02 }, 1, 300, 64)?;
            let ids: Vec<u32> = (0..300).collect();
            Ok((s.b.download(&s.b.embedding(&w, &ids)?)?, s.q(random::fill(99, 0.02, 300 * 64))))
        });
    }

    // ---- elementwise / norms ------------------------------------------------------------------

    fn elementwise(&mut self) {
        let tol = self.tol.rel;
        self.rel("add", "[9, 33]".into(), tol, |s| {
            let (x, y) = (s.data(10, 297, 2.0), s.data(11, 297, 2.0));
            let mut t = s.up(&x, 9, 33)?;
            s.b.add_inplace(&mut t, &s.up(&y, 9, 33)?)?;
            Ok((s.b.download(&t)?, x.iter().zip(&y).map(|(a, b)| a + b).collect()))
        });
        self.rel("scale", "[9, 33] × 0.37".into(), tol, |s| {
            let x = s.data(12, 297, 2.0);
            let mut t = s.up(&x, 9, 33)?;
            s.b.scale_inplace(&mut t, 0.37)?;
            Ok((s.b.download(&t)?, x.iter().map(|a| a * 0.37).collect()))
        });
        for (rows, cols) in [(7usize, 96usize), (3, 1000)] {
            self.rel("rms_norm", format!("[{rows}, {cols}] eps 1e-6"), tol, |s| {
                let x = s.data(13, rows * cols, 2.0);
                let w: Vec<f32> = random::fill(14, 0.5, cols).iter().map(|v| 1.0 + v).collect();
                let mut want = vec![0.0f32; rows * cols];
                for r in 0..rows {
                    let row = &x[r * cols..(r + 1) * cols];
                    let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / cols as f64;
                    let inv = 1.0 / (ms + 1e-6).sqrt();
                    for c in 0..cols {
                        want[r * cols + c] = (w[c] as f64 * row[c] as f64 * inv) as f32;
                    }
                }
                let got = s.b.rms_norm(&s.up(&x, rows, cols)?, &s.b.vector(&w)?, 1e-6)?;
                Ok((s.b.download(&got)?, want))
            });
        }
        self.rel("layer_norm", "[5, 130] mean ≈ 3, eps 1e-5".into(), tol, |s| {
            let (rows, cols) = (5, 130);
            let x = s.q(random::fill(15, 1.5, rows * cols).iter().map(|v| v + 3.0).collect());
            let w: Vec<f32> = random::fill(16, 0.5, cols).iter().map(|v| 1.0 + v).collect();
            let b = random::fill(17, 0.5, cols);
            let mut want = vec![0.0f32; rows * cols];
            for r in 0..rows {
                let row = &x[r * cols..(r + 1) * cols];
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
                let inv = 1.0 / (var + 1e-5).sqrt();
                for c in 0..cols {
                    want[r * cols + c] = ((row[c] as f64 - mean) * inv * w[c] as f64 + b[c] as f64) as f32;
                }
            }
            let got = s.b.layer_norm(&s.up(&x, rows, cols)?, &s.b.vector(&w)?, &s.b.vector(&b)?, 1e-5)?;
            Ok((s.b.download(&got)?, want))
        });
    }

    fn rope(&mut self) {
        let tol = self.tol.rel;
        // (rows, heads, head_dim, rot_dims, first position, table positions)
        let cases = [(6usize, 3usize, 24usize, 16usize, 5usize, 64usize), (5, 2, 16, 16, 100, 128)];
        for layout in [RopeLayout::Interleaved, RopeLayout::HalfSplit] {
            for (rows, heads, hd, rot, p0, max_pos) in cases {
                let case = format!("{layout:?} [{rows}, {heads}×{hd}] rot {rot}, positions {p0}..{}", p0 + rows);
                self.rel("rope", case, tol, |s| {
                    let inv: Vec<f32> = (0..rot / 2).map(|i| 10000f32.powf(-((2 * i) as f32) / rot as f32)).collect();
                    let table = RopeTable::new(&inv, 1.1, max_pos);
                    let cols = heads * hd;
                    let x = s.data(18, rows * cols, 1.0);
                    let positions: Vec<usize> = (p0..p0 + rows).collect();
                    let mut want = x.clone();
                    for (r, &p) in positions.iter().enumerate() {
                        for h in 0..heads {
                            table.rotate(&mut want[r * cols + h * hd..r * cols + h * hd + rot], p, layout);
                        }
                    }
                    let mut t = s.up(&x, rows, cols)?;
                    s.b.rope_inplace(&mut t, hd, rot, layout, &s.b.positions(&positions)?, &s.b.rope_table(&table)?)?;
                    Ok((s.b.download(&t)?, want))
                });
            }
        }
        self.must_fail("rope", "position 70 beyond a 64-position table".into(), |s| {
            let table = RopeTable::new(&[1.0, 0.1, 0.01, 0.001], 1.0, 64);
            let mut t = s.up(&s.data(19, 16, 1.0), 2, 8)?;
            s.b.rope_inplace(&mut t, 8, 8, RopeLayout::Interleaved, &s.b.positions(&[3, 70])?, &s.b.rope_table(&table)?)
        });
    }

    // ---- fused steps: against the plain ops they stand for, on the same backend, exactly -------

    fn fused(&mut self) {
        let bf16 = RopeTable::new(&[1.0, 0.3, 0.05, 0.01, 0.002, 0.0004, 0.0001, 0.00002], 1.2, 300);
        for (rows, cols) in [(1usize, 2048usize), (5, 700)] {
            self.rel("add_rms_norm", format!("[{rows}, {cols}] = add + rms_norm"), 0.0, |s| {
                let (x, y, w) = (s.data(40, rows * cols, 2.0), s.data(41, rows * cols, 2.0), s.data(42, cols, 1.0));
                let wv = s.b.vector(&w)?;
                let mut a = s.up(&x, rows, cols)?;
                let h = s.b.add_rms_norm(&mut a, &s.up(&y, rows, cols)?, &wv, 1e-6)?;
                let mut b = s.up(&x, rows, cols)?;
                s.b.add_inplace(&mut b, &s.up(&y, rows, cols)?)?;
                let want_h = s.b.rms_norm(&b, &wv, 1e-6)?;
                let mut got = s.b.download(&h)?;
                got.extend(s.b.download(&a)?);
                let mut want = s.b.download(&want_h)?;
                want.extend(s.b.download(&b)?);
                Ok((got, want))
            });
        }
        for (rows, heads, keep, rot, layout) in
            [(1usize, 20usize, 192usize, 16usize, RopeLayout::Interleaved), (3, 4, 24, 16, RopeLayout::HalfSplit)]
        {
            let case = format!("[{rows}, {heads}×({keep}+{rot})] {layout:?} = head_columns + rope");
            self.rel("split_heads_rope", case, 0.0, |s| {
                let cols = heads * (keep + rot);
                let x = s.up(&s.data(43, rows * cols, 1.0), rows, cols)?;
                let pos = s.b.positions(&(200..200 + rows).rev().collect::<Vec<_>>())?;
                let table = s.b.rope_table(&bf16)?;
                let (a, b) = s.b.split_heads_rope(&x, heads, keep, rot, layout, &pos, &table)?;
                let wa = s.b.head_columns(&x, heads, keep + rot, 0, keep)?;
                let mut wb = s.b.head_columns(&x, heads, keep + rot, keep, rot)?;
                s.b.rope_inplace(&mut wb, rot, rot, layout, &pos, &table)?;
                let mut got = s.b.download(&a)?;
                got.extend(s.b.download(&b)?);
                let mut want = s.b.download(&wa)?;
                want.extend(s.b.download(&wb)?);
                Ok((got, want))
            });
        }
        for (rows, r, p) in [(1usize, 512usize, 16usize), (4, 40, 16)] {
            let case = format!("{rows} rows of [{r} | {p}] into [64, {}] = rms_norm + rope + write_rows", r + p);
            self.rel("latent_store", case, 0.0, |s| {
                let kv = s.up(&s.data(44, rows * (r + p), 2.0), rows, r + p)?;
                let w = s.b.vector(&s.data(45, r, 1.0))?;
                let pos = s.b.positions(&[9, 40, 3, 63][..rows])?;
                let table = s.b.rope_table(&bf16)?;
                let init = s.data(46, 64 * (r + p), 1.0);
                let mut got = s.up(&init, 64, r + p)?;
                s.b.latent_store(&kv, r, &w, 1e-6, RopeLayout::Interleaved, &pos, &table, &mut got)?;
                let mut want = s.up(&init, 64, r + p)?;
                let c = s.b.rms_norm(&s.b.columns(&kv, 0, r)?, &w, 1e-6)?;
                let mut k_pe = s.b.columns(&kv, r, p)?;
                s.b.rope_inplace(&mut k_pe, p, p, RopeLayout::Interleaved, &pos, &table)?;
                s.b.write_rows(&mut want, &pos, 0, &c)?;
                s.b.write_rows(&mut want, &pos, r, &k_pe)?;
                Ok((s.b.download(&got)?, s.b.download(&want)?))
            });
        }
        for (rows, q_cols, r, p) in [(1usize, 768usize, 512usize, 64usize), (4, 40, 40, 16)] {
            let case = format!("{rows} rows: q_a [{q_cols}], kv [{r} | {p}] = rms_norm + latent_store");
            self.rel("mla_norms", case, 0.0, |s| {
                let q_a = s.up(&s.data(47, rows * q_cols, 2.0), rows, q_cols)?;
                let qw = s.b.vector(&s.data(48, q_cols, 1.0))?;
                let kv = s.up(&s.data(49, rows * (r + p), 2.0), rows, r + p)?;
                let kw = s.b.vector(&s.data(50, r, 1.0))?;
                let pos = s.b.positions(&[9, 40, 3, 63][..rows])?;
                let table = s.b.rope_table(&RopeTable::new(&vec![0.01; p / 2], 1.0, 64))?;
                let init = s.data(51, 64 * (r + p), 1.0);
                let il = RopeLayout::Interleaved;
                let mut got_c = s.up(&init, 64, r + p)?;
                let qr = s.b.mla_norms(&q_a, &qw, &kv, r, &kw, 1e-6, il, &pos, &table, &mut got_c)?;
                let mut want_c = s.up(&init, 64, r + p)?;
                let want_qr = s.b.rms_norm(&q_a, &qw, 1e-6)?;
                s.b.latent_store(&kv, r, &kw, 1e-6, il, &pos, &table, &mut want_c)?;
                let mut got = s.b.download(&qr)?;
                got.extend(s.b.download(&got_c)?);
                let mut want = s.b.download(&want_qr)?;
                want.extend(s.b.download(&want_c)?);
                Ok((got, want))
            });
        }
    }

    // ---- matmuls ------------------------------------------------------------------------------

    fn matmuls(&mut self) {
        let tol = self.tol.rel;
        // One to four rows are the decode shapes (a GPU backend may take a GEMV path for them;
        // rows longer than 2048 a long-row variant).
        let shapes = [
            (1usize, 64usize, 96usize),
            (2, 37, 24),
            (4, 200, 512),
            (1, 13, 200),
            (2, 51, 768),
            (1, 40, 5120),
            (3, 24, 2056),
            (5, 33, 17),
            (64, 256, 192),
            (130, 48, 40),
        ];
        for (t, n_out, n_in) in shapes {
            self.rel("matmul_t", format!("[{t}, {n_in}] · [{n_out}, {n_in}]ᵀ"), tol, |s| {
                let x = s.data(20, t * n_in, 1.0);
                let w = s.data(21, n_out * n_in, 1.0);
                let want = reference::matmul_t(&x, t, n_in, &w, n_out);
                Ok((s.b.download(&s.b.matmul_t(&s.up(&x, t, n_in)?, &s.wt(&w, 1, n_out, n_in)?)?)?, want))
            });
        }
        // matmul_t2: each result equals its own matmul_t exactly (decode rows, odd widths).
        for (t, n1, n2, n_in) in [(1usize, 96usize, 72usize, 256usize), (3, 40, 24, 64), (6, 33, 17, 24)] {
            self.rel(
                "matmul_t2",
                format!("[{t}, {n_in}] · ([{n1}, {n_in}], [{n2}, {n_in}])ᵀ = matmul_t x2"),
                0.0,
                |s| {
                    let x = s.up(&s.data(25, t * n_in, 1.0), t, n_in)?;
                    let w1 = s.wt(&s.data(26, n1 * n_in, 1.0), 1, n1, n_in)?;
                    let w2 = s.wt(&s.data(27, n2 * n_in, 1.0), 1, n2, n_in)?;
                    let (y1, y2) = s.b.matmul_t2(&x, &w1, &w2)?;
                    let mut got = s.b.download(&y1)?;
                    got.extend(s.b.download(&y2)?);
                    let mut want = s.b.download(&s.b.matmul_t(&x, &w1)?)?;
                    want.extend(s.b.download(&s.b.matmul_t(&x, &w2)?)?);
                    Ok((got, want))
                },
            );
        }
        self.rel("matmul_t", "[3, 70] · [50, 70]ᵀ, random weight".into(), tol, |s| {
            let x = s.data(22, 3 * 70, 1.0);
            let w = s.q(random::fill(23, 0.1, 50 * 70));
            let dw = s.b.weight(WeightInit::Random { seed: 23, bound: 0.1 }, 1, 50, 70)?;
            Ok((s.b.download(&s.b.matmul_t(&s.up(&x, 3, 70)?, &dw)?)?, reference::matmul_t(&x, 3, 70, &w, 50)))
        });
        for (t, heads, n_in, n_out, random_w) in [
            (5usize, 4usize, 24usize, 40usize, false),
            (1, 16, 32, 16, false),
            (2, 5, 64, 24, false),
            (3, 3, 16, 20, true),
        ] {
            let case = format!(
                "[{t}, {heads}×{n_in}] · [{heads}, {n_out}, {n_in}]ᵀ{}",
                if random_w { ", random weight" } else { "" }
            );
            self.rel("matmul_heads", case, tol, |s| {
                let x = s.data(24, t * heads * n_in, 1.0);
                let (w, dw) = if random_w {
                    let dw = s.b.weight(WeightInit::Random { seed: 25, bound: 0.2 }, heads, n_out, n_in)?;
                    (s.q(random::fill(25, 0.2, heads * n_out * n_in)), dw)
                } else {
                    let w = s.data(25, heads * n_out * n_in, 1.0);
                    let dw = s.wt(&w, heads, n_out, n_in)?;
                    (w, dw)
                };
                let mut want = vec![0.0f32; t * heads * n_out];
                for h in 0..heads {
                    let xh: Vec<f32> = (0..t)
                        .flat_map(|r| x[r * heads * n_in + h * n_in..r * heads * n_in + (h + 1) * n_in].to_vec())
                        .collect();
                    let yh = reference::matmul_t(&xh, t, n_in, &w[h * n_out * n_in..(h + 1) * n_out * n_in], n_out);
                    for r in 0..t {
                        want[r * heads * n_out + h * n_out..r * heads * n_out + (h + 1) * n_out]
                            .copy_from_slice(&yh[r * n_out..(r + 1) * n_out]);
                    }
                }
                Ok((s.b.download(&s.b.matmul_heads(&s.up(&x, t, heads * n_in)?, &dw)?)?, want))
            });
        }
    }

    // ---- FFN ----------------------------------------------------------------------------------

    fn ffn(&mut self) {
        let tol = self.tol.rel;
        for (t, hidden, inter) in [(1usize, 48usize, 80usize), (17, 64, 96)] {
            self.rel("mlp", format!("T {t}, hidden {hidden}, I {inter}"), tol, |s| {
                let bh = 1.0 / (hidden as f32).sqrt();
                let bi = 1.0 / (inter as f32).sqrt();
                let x = s.data(26, t * hidden, 1.0);
                let (g, u, d) = (
                    s.data(27, inter * hidden, 2.0 * bh),
                    s.data(28, inter * hidden, 2.0 * bh),
                    s.data(29, hidden * inter, bi),
                );
                let want = ref_swiglu(&x, t, hidden, &g, &u, &d, inter);
                let m = Mlp {
                    gate: s.wt(&g, 1, inter, hidden)?,
                    up: s.wt(&u, 1, inter, hidden)?,
                    down: s.wt(&d, 1, hidden, inter)?,
                };
                Ok((s.b.download(&s.b.mlp(&s.up(&x, t, hidden)?, &m)?)?, want))
            });
        }
        let loose = self.tol.rel_loose;
        // (T, E, groups, kept groups, norm, shared expert width (0: none), hidden); E > 32 puts
        // several experts on a lane of a register-resident router. The 2048-wide case with a
        // 48-wide shared expert is a decode batch whose rows are too wide for a device's fused
        // add + norm + router kernel; shared experts as wide as the routed ones (32) are the
        // ones a device may fuse into its expert kernels.
        let cases = [
            (64usize, 16usize, 4usize, 2usize, true, 48usize, 64usize),
            (1, 16, 4, 2, false, 48, 64),
            (64, 16, 4, 2, false, 0, 64),
            (1, 16, 4, 3, true, 0, 64),
            (64, 16, 1, 1, true, 48, 64),
            (1, 72, 1, 1, true, 48, 64),
            (3, 80, 8, 3, true, 0, 64),
            (4, 16, 1, 1, true, 48, 2048),
            (1, 64, 1, 1, true, 32, 2048),
            (3, 16, 4, 2, false, 32, 64),
        ];
        for (ci, (t, n_exp, n_group, topk_group, norm, sh_i, hidden)) in cases.into_iter().enumerate() {
            let shared = sh_i > 0;
            let case = format!(
                "T {t}, E {n_exp}, groups {n_group} keep {topk_group}, top-4, norm {norm}, {}, hidden {hidden}",
                if shared { format!("shared {sh_i}") } else { "no shared".into() }
            );
            self.rel("moe", case, loose, |s| {
                let inter = 32usize;
                let seed = 100 + 10 * ci as u64;
                let bh = 1.0 / (hidden as f32).sqrt();
                let m = MoeData {
                    t,
                    hidden,
                    n_exp,
                    inter,
                    x: s.data(seed, t * hidden, 1.0),
                    router: s.data(seed + 1, n_exp * hidden, 2.0 * bh),
                    bias: random::fill(seed + 2, 0.1, n_exp),
                    gate_up: s.data(seed + 3, n_exp * 2 * inter * hidden, 2.0 * bh),
                    down: s.data(seed + 4, n_exp * hidden * inter, 1.0 / (inter as f32).sqrt()),
                    shared: shared.then(|| {
                        (
                            s.data(seed + 5, sh_i * hidden, 2.0 * bh),
                            s.data(seed + 6, sh_i * hidden, 2.0 * bh),
                            s.data(seed + 7, hidden * sh_i, 1.0 / (sh_i as f32).sqrt()),
                            sh_i,
                        )
                    }),
                    routing: MoeRouting {
                        n_group,
                        topk_group,
                        top_k: 4,
                        norm_topk_prob: norm,
                        routed_scaling_factor: 2.5,
                    },
                };
                let want = ref_moe(&m);
                let moe = s.moe_weights(&m)?;
                let x = s.up(&m.x, t, hidden)?;
                // moe_residual: exactly moe then add_inplace (a device may fuse the add).
                let r0 = s.data(seed + 8, t * hidden, 1.0);
                let mut fused = s.up(&r0, t, hidden)?;
                s.b.moe_residual(&mut fused, &x, &moe)?;
                let mut plain = s.up(&r0, t, hidden)?;
                let y = s.b.moe(&x, &moe)?;
                s.b.add_inplace(&mut plain, &y)?;
                let (fused, plain) = (s.b.download(&fused)?, s.b.download(&plain)?);
                if fused.iter().zip(&plain).any(|(a, b)| a.to_bits() != b.to_bits()) {
                    return Err(crate::OpError::new("moe_residual", "", "differs from moe + add_inplace"));
                }
                // add_rms_norm_moe: exactly add_rms_norm then moe_residual (a device may run the
                // add and norm in the router kernel).
                let attn = s.up(&s.data(seed + 9, t * hidden, 1.0), t, hidden)?;
                let w = s.b.vector(&s.data(seed + 10, hidden, 1.0))?;
                let mut fused = s.up(&r0, t, hidden)?;
                s.b.add_rms_norm_moe(&mut fused, &attn, &w, 1e-6, &moe)?;
                let mut plain = s.up(&r0, t, hidden)?;
                let h = s.b.add_rms_norm(&mut plain, &attn, &w, 1e-6)?;
                s.b.moe_residual(&mut plain, &h, &moe)?;
                let (fused, plain) = (s.b.download(&fused)?, s.b.download(&plain)?);
                if fused.iter().zip(&plain).any(|(a, b)| a.to_bits() != b.to_bits()) {
                    return Err(crate::OpError::new(
                        "add_rms_norm_moe",
                        "",
                        "differs from add_rms_norm + moe_residual",
                    ));
                }
                Ok((s.b.download(&y)?, want))
            });
        }
    }

    fn moe_weights(&self, m: &MoeData) -> OpResult<Moe<B::Weight, B::Vector>> {
        let (n_exp, hidden, inter) = (m.n_exp, m.hidden, m.inter);
        Ok(Moe {
            router: self.wt(&m.router, 1, n_exp, hidden)?,
            score_bias: self.b.vector(&m.bias)?,
            experts: Experts {
                gate_up: self.wt(&m.gate_up, n_exp, 2 * inter, hidden)?,
                down: self.wt(&m.down, n_exp, hidden, inter)?,
                n: n_exp,
                inter,
            },
            shared: match &m.shared {
                Some((g, u, d, si)) => Some(Mlp {
                    gate: self.wt(g, 1, *si, hidden)?,
                    up: self.wt(u, 1, *si, hidden)?,
                    down: self.wt(d, 1, hidden, *si)?,
                }),
                None => None,
            },
            routing: m.routing,
        })
    }

    // ---- DSA ----------------------------------------------------------------------------------

    fn dsa(&mut self) {
        let (heads, d) = (8usize, 64usize);
        // (name, first position, rows, key rows, topk)
        let cases = [
            ("prefill from 0", 0usize, 64usize, 64usize, 16usize),
            ("chunk at 50", 50, 32, 100, 40),
            ("decode", 150, 1, 160, 64),
            ("decode, fewer keys than top-k", 10, 1, 16, 64),
        ];
        for (ci, (name, p0, rows, key_rows, topk)) in cases.into_iter().enumerate() {
            let case = format!("{name}: positions {p0}..{}, HI {heads}, D {d}, top-{topk}", p0 + rows);
            self.selection("indexer_topk", case, |s| {
                let seed = 200 + 10 * ci as u64;
                let q = s.data(seed, rows * heads * d, 1.0);
                let hw = s.data(seed + 1, rows * heads, 1.0 / (heads as f32).sqrt());
                let keys = s.data(seed + 2, key_rows * d, 1.0);
                let positions: Vec<usize> = (p0..p0 + rows).collect();
                let scale = 1.0 / (d as f32).sqrt();
                let want = reference::indexer_topk(&q, &hw, &keys, heads, d, &positions, topk, scale);
                let sel = s.b.indexer_topk(
                    &s.up(&q, rows, heads * d)?,
                    &s.up(&hw, rows, heads)?,
                    &s.up(&keys, key_rows, d)?,
                    &s.b.positions(&positions)?,
                    topk,
                    scale,
                )?;
                Ok((s.b.selection_to_host(&sel)?, want))
            });
        }

        let loose = self.tol.rel_loose;
        let (h, r, p, rows, k) = (4usize, 64usize, 16usize, 6usize, 24usize);
        for scattered in [false, true] {
            let case = format!(
                "T {rows}, H {h}, R {r}, P {p}, K {k}, -1 padding {}",
                if scattered { "scattered" } else { "trailing" }
            );
            self.rel("sparse_mla", case, loose, |s| {
                let seed = if scattered { 300 } else { 310 };
                let cache_rows = 90;
                let positions: Vec<usize> = (0..rows).map(|t| 30 + 9 * t).collect();
                let q_lat = s.data(seed, rows * h * r, 3.0);
                let q_pe = s.data(seed + 1, rows * h * p, 3.0);
                let cache = s.data(seed + 2, cache_rows * (r + p), 1.0);
                let mut data = vec![-1i32; rows * k];
                for (t, &pos) in positions.iter().enumerate() {
                    let valid = k.min(pos + 1) - t % 3 * 4; // some rows padded although keys remain
                    let picks = shuffle(seed + 10 + t as u64, pos + 1);
                    let slots = if scattered { shuffle(seed + 50 + t as u64, k) } else { (0..k).collect() };
                    for (i, &slot) in slots.iter().take(valid).enumerate() {
                        data[t * k + slot] = picks[i] as i32;
                    }
                }
                let sel = TopK { rows, k, data };
                let scale = 1.0 / ((r + p) as f32).sqrt();
                let want = reference::sparse_mla_masked(&q_lat, &q_pe, &cache, h, r, p, &positions, &sel, scale);
                let got = s.b.sparse_mla(
                    &s.up(&q_lat, rows, h * r)?,
                    &s.up(&q_pe, rows, h * p)?,
                    &s.up(&cache, cache_rows, r + p)?,
                    &s.b.selection_from_host(&sel)?,
                    scale,
                )?;
                Ok((s.b.download(&got)?, want))
            });
        }
        // sparse_mla_uv: exactly sparse_mla then matmul_heads (a device may merge the projection
        // into the split-k combine: decode rows over many selected positions).
        for (rows, h, r, p, k, n_out) in
            [(1usize, 20usize, 512usize, 64usize, 2048usize, 256usize), (3, 4, 64, 16, 256, 24)]
        {
            let case =
                format!("T {rows}, H {h}, R {r}, P {p}, K {k}, W_UV [{h}, {n_out}, {r}] = sparse_mla + matmul_heads");
            self.rel("sparse_mla_uv", case, 0.0, |s| {
                let cache_rows = k + 8;
                let q_lat = s.up(&s.data(320, rows * h * r, 3.0), rows, h * r)?;
                let q_pe = s.up(&s.data(321, rows * h * p, 3.0), rows, h * p)?;
                let cache = s.up(&s.data(322, cache_rows * (r + p), 1.0), cache_rows, r + p)?;
                let w = s.wt(&s.data(323, h * n_out * r, 1.0 / (r as f32).sqrt()), h, n_out, r)?;
                let mut data = Vec::with_capacity(rows * k);
                for t in 0..rows {
                    let picks = shuffle(324 + t as u64, cache_rows);
                    data.extend(
                        picks.iter().take(k).enumerate().map(|(i, &q)| if i % 97 == 5 { -1 } else { q as i32 }),
                    );
                }
                let sel = s.b.selection_from_host(&TopK { rows, k, data })?;
                let scale = 1.0 / ((r + p) as f32).sqrt();
                let got = s.b.sparse_mla_uv(&q_lat, &q_pe, &cache, &sel, scale, &w)?;
                let want = s.b.matmul_heads(&s.b.sparse_mla(&q_lat, &q_pe, &cache, &sel, scale)?, &w)?;
                Ok((s.b.download(&got)?, s.b.download(&want)?))
            });
        }
    }

    // ---- grouped-query attention (dense models) -------------------------------------------------

    fn gqa(&mut self) {
        let loose = self.tol.rel_loose;
        // (name, heads, kv heads, D, Dv, first position, rows, cache rows, selected per row)
        let cases = [
            ("prefill, GQA 9/3", 9usize, 3usize, 64usize, 64usize, 0usize, 24usize, 40usize, None),
            ("chunk at 17, GQA 6/2", 6, 2, 16, 16, 17, 5, 30, None),
            ("decode, GQA 9/3", 9, 3, 64, 64, 300, 1, 320, None),
            ("MHA 4/4, Dv 8 != D 24", 4, 4, 24, 8, 3, 6, 12, None),
            ("selected, GQA 6/2, -1 padded", 6, 2, 32, 32, 40, 4, 50, Some(12usize)),
        ];
        for (ci, (name, heads, kv, d, dv, p0, rows, cache_rows, picks)) in cases.into_iter().enumerate() {
            let case = format!("{name}: positions {p0}..{}, D {d}, Dv {dv}", p0 + rows);
            self.rel("gqa_attention", case, loose, |s| {
                let seed = 500 + 10 * ci as u64;
                let q = s.data(seed, rows * heads * d, 2.0);
                let k = s.data(seed + 1, cache_rows * kv * d, 2.0);
                let v = s.data(seed + 2, cache_rows * kv * dv, 1.0);
                let positions: Vec<usize> = (p0..p0 + rows).collect();
                let sel = picks.map(|n| {
                    let mut data = vec![-1i32; rows * n];
                    for (t, &p) in positions.iter().enumerate() {
                        let valid = n.min(p + 1) - t; // rows padded with -1 at different lengths
                        for (i, &pick) in shuffle(seed + 20 + t as u64, p + 1).iter().take(valid).enumerate() {
                            data[t * n + i] = pick as i32;
                        }
                    }
                    TopK { rows, k: n, data }
                });
                let scale = 1.0 / (d as f32).sqrt();
                let want = reference::gqa_attention(&q, &k, &v, heads, kv, d, dv, &positions, sel.as_ref(), scale);
                let dev_sel = match &sel {
                    Some(t) => Some(s.b.selection_from_host(t)?),
                    None => None,
                };
                let got = s.b.gqa_attention(
                    &s.up(&q, rows, heads * d)?,
                    &s.up(&k, cache_rows, kv * d)?,
                    &s.up(&v, cache_rows, kv * dv)?,
                    heads,
                    kv,
                    &s.b.positions(&positions)?,
                    dev_sel.as_ref(),
                    scale,
                )?;
                Ok((s.b.download(&got)?, want))
            });
        }
        self.must_fail("gqa_attention", "position 12 of a 12-row cache".into(), |s| {
            let q = s.up(&s.data(590, 2 * 4 * 8, 1.0), 2, 32)?;
            let k = s.up(&s.data(591, 12 * 2 * 8, 1.0), 12, 16)?;
            let v = s.up(&s.data(592, 12 * 2 * 8, 1.0), 12, 16)?;
            s.b.gqa_attention(&q, &k, &v, 4, 2, &s.b.positions(&[11, 12])?, None, 1.0)
        });
        self.must_fail("gqa_attention", "heads 4 not a multiple of kv heads 3".into(), |s| {
            let q = s.up(&s.data(593, 4 * 8, 1.0), 1, 32)?;
            let kv = s.up(&s.data(594, 12 * 3 * 8, 1.0), 12, 24)?;
            s.b.gqa_attention(&q, &kv, &kv, 4, 3, &s.b.positions(&[5])?, None, 1.0)
        });
    }

    // ---- loss ---------------------------------------------------------------------------------

    fn loss(&mut self) {
        let tol = self.tol.rel;
        for (rows, vocab) in [(5usize, 1000usize), (2, 50_000)] {
            let case = format!("[{rows}, {vocab}]");
            let r = (|| -> OpResult<(Vec<f64>, Vec<f64>)> {
                let x = self.data(400 + vocab as u64, rows * vocab, 4.0);
                let targets: Vec<u32> = (0..rows).map(|t| ((t * 7919 + 13) % vocab) as u32).collect();
                let want: Vec<f64> = (0..rows)
                    .map(|t| {
                        let row = &x[t * vocab..(t + 1) * vocab];
                        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                        let z: f64 = row.iter().map(|&l| (l as f64 - m).exp()).sum();
                        m + z.ln() - row[targets[t] as usize] as f64
                    })
                    .collect();
                Ok((self.b.nll(&self.up(&x, rows, vocab)?, &targets)?, want))
            })();
            match r {
                Ok((got, want)) => self.push("nll", case, Measure::RelErr, rel_err64(&got, &want), tol, String::new()),
                Err(e) => self.failed("nll", case, Measure::RelErr, tol, e),
            }
        }
        // argmax_rows: exactly the host scan (`crate::argmax`) of the stored values (ties to the
        // lower index; NaN wins only at index 0): random rows, a repeated maximum, -inf, NaN.
        self.rel("argmax_rows", "[4, 154880]: random, repeated maximum, NaN at 0, NaN inside".into(), 0.0, |s| {
            let (rows, vocab) = (4usize, 154_880usize);
            let mut x = s.data(450, rows * vocab, 8.0);
            x[vocab + 77] = 100.0; // row 1: the maximum twice
            x[vocab + 90_000] = 100.0;
            x[2 * vocab] = f32::NAN; // row 2: NaN first (the scan keeps index 0)
            x[3 * vocab + 5] = f32::NAN; // row 3: NaN inside, -inf around the maximum
            x[3 * vocab + 6] = f32::NEG_INFINITY;
            let t = s.up(&x, rows, vocab)?;
            let got: Vec<f32> = s.b.argmax_rows(&t)?.into_iter().map(|i| i as f32).collect();
            let stored = s.b.download(&t)?;
            let want: Vec<f32> = stored.chunks(vocab).map(|r| crate::argmax(r) as f32).collect();
            Ok((got, want))
        });
        self.rel("argmax_rows", "[2, 3], all -inf".into(), 0.0, |s| {
            let x = [f32::NEG_INFINITY; 6];
            let got: Vec<f32> = s.b.argmax_rows(&s.up(&x, 2, 3)?)?.into_iter().map(|i| i as f32).collect();
            Ok((got, vec![0.0, 0.0]))
        });
    }
}

/// Run every check on `b` with limits `tol`; one result per check, in a fixed order.
pub fn run<B: Backend>(b: &B, tol: Tolerance) -> Vec<CheckResult> {
    let mut s = Suite { b, tol, out: Vec::new() };
    s.data_movement();
    s.elementwise();
    s.rope();
    s.fused();
    s.matmuls();
    s.ffn();
    s.dsa();
    s.gqa();
    s.loss();
    s.out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{CpuBackend, CpuTensor, CpuWeight};
    use crate::{MemoryStats, Positions};
    use std::collections::BTreeSet;
    use std::time::{Duration, Instant};

    #[test]
    fn cpu_backend_passes() {
        let results = run(&CpuBackend::new(), Tolerance::for_dtype(DType::F32));
        println!("{}", table(&results));
        assert!(results.len() > 40, "only {} checks", results.len());
        let failed: Vec<_> = results.iter().filter(|r| !r.passed).collect();
        assert!(failed.is_empty(), "{}", table(&results));
    }

    #[test]
    fn measures() {
        assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((rel_err(&[1.0, 2.0], &[1.0, 1.0]) - (0.5f64).sqrt()).abs() < 1e-12);
        assert!(rel_err(&[f32::NAN], &[1.0]).is_nan());
        assert_eq!(rel_err(&[1.0], &[1.0, 2.0]), f64::INFINITY);
        assert_eq!(rel_err(&[0.5], &[0.0]), 0.5);
        let want = TopK { rows: 2, k: 3, data: vec![3, 1, 2, 0, -1, -1] };
        let got = TopK { rows: 2, k: 3, data: vec![1, 2, 4, -1, 0, -1] };
        let (shared, identical) = selection_overlap(&got, &want);
        assert!((shared - 3.0 / 4.0).abs() < 1e-12);
        assert!((identical - 0.5).abs() < 1e-12);
        assert_eq!(round_bf16(1.0), 1.0);
        assert_eq!(round_bf16(f32::from_bits(0x3f80_8000)), 1.0); // tie → even
        assert_eq!(round_bf16(f32::from_bits(0x3f81_8000)).to_bits(), 0x3f82_0000); // tie → even (up)
        assert_eq!(round_bf16(f32::from_bits(0x3f80_8001)).to_bits(), 0x3f81_0000);
        assert!(round_bf16(f32::NAN).is_nan());
        let t = Tolerance::for_dtype(DType::BF16);
        assert_eq!((t.rel, t.topk_shared), (2e-2, 0.99));
    }

    /// The CPU backend with deliberate bugs in five ops: the suite must flag exactly those.
    struct Faulty(CpuBackend);

    impl Backend for Faulty {
        type Tensor = CpuTensor;
        type Weight = CpuWeight;
        type Vector = Vec<f32>;
        type Selection = TopK;
        type PosData = ();
        type Rope = RopeTable;
        type Mark = Instant;
        type Graph = ();

        fn name(&self) -> String {
            "faulty cpu".into()
        }
        fn dtype(&self) -> DType {
            self.0.dtype()
        }
        fn default_chunk(&self) -> usize {
            self.0.default_chunk()
        }
        fn upload(&self, data: &[f32], rows: usize, cols: usize) -> OpResult<CpuTensor> {
            self.0.upload(data, rows, cols)
        }
        fn download(&self, t: &CpuTensor) -> OpResult<Vec<f32>> {
            self.0.download(t)
        }
        fn dims(&self, t: &CpuTensor) -> (usize, usize) {
            self.0.dims(t)
        }
        fn zeros(&self, rows: usize, cols: usize) -> OpResult<CpuTensor> {
            self.0.zeros(rows, cols)
        }
        fn copy(&self, t: &CpuTensor) -> OpResult<CpuTensor> {
            self.0.copy(t)
        }
        fn weight(&self, init: WeightInit, groups: usize, rows: usize, cols: usize) -> OpResult<CpuWeight> {
            self.0.weight(init, groups, rows, cols)
        }
        fn vector(&self, data: &[f32]) -> OpResult<Vec<f32>> {
            self.0.vector(data)
        }
        fn positions(&self, pos: &[usize]) -> OpResult<Positions<()>> {
            self.0.positions(pos)
        }
        fn update_positions(&self, p: &mut Positions<()>, pos: &[usize]) -> OpResult<()> {
            self.0.update_positions(p, pos)
        }
        fn write_rows(&self, dst: &mut CpuTensor, pos: &Positions<()>, col0: usize, src: &CpuTensor) -> OpResult<()> {
            self.0.write_rows(dst, pos, col0, src)
        }
        #[allow(clippy::too_many_arguments)]
        fn gqa_attention(
            &self,
            q: &CpuTensor,
            k: &CpuTensor,
            v: &CpuTensor,
            heads: usize,
            kv_heads: usize,
            pos: &Positions<()>,
            sel: Option<&TopK>,
            scale: f32,
        ) -> OpResult<CpuTensor> {
            self.0.gqa_attention(q, k, v, heads, kv_heads, pos, sel, scale)
        }
        fn rope_table(&self, table: &RopeTable) -> OpResult<RopeTable> {
            self.0.rope_table(table)
        }
        fn selection_to_host(&self, sel: &TopK) -> OpResult<TopK> {
            self.0.selection_to_host(sel)
        }
        fn selection_from_host(&self, sel: &TopK) -> OpResult<TopK> {
            self.0.selection_from_host(sel)
        }
        fn columns(&self, x: &CpuTensor, start: usize, len: usize) -> OpResult<CpuTensor> {
            // Bug: one element is never written.
            let mut t = self.0.columns(x, start, len)?;
            t.data[0] = f32::NAN;
            Ok(t)
        }
        fn rows(&self, x: &CpuTensor, start: usize, len: usize) -> OpResult<CpuTensor> {
            self.0.rows(x, start, len)
        }
        fn head_columns(
            &self,
            x: &CpuTensor,
            heads: usize,
            stride: usize,
            offset: usize,
            len: usize,
        ) -> OpResult<CpuTensor> {
            self.0.head_columns(x, heads, stride, offset, len)
        }
        fn write_block(&self, dst: &mut CpuTensor, row0: usize, col0: usize, src: &CpuTensor) -> OpResult<()> {
            self.0.write_block(dst, row0, col0, src)
        }
        fn embedding(&self, table: &CpuWeight, ids: &[u32]) -> OpResult<CpuTensor> {
            self.0.embedding(table, ids)
        }
        fn add_inplace(&self, x: &mut CpuTensor, y: &CpuTensor) -> OpResult<()> {
            self.0.add_inplace(x, y)
        }
        fn scale_inplace(&self, x: &mut CpuTensor, s: f32) -> OpResult<()> {
            // Bug: 0.1 % off.
            self.0.scale_inplace(x, s * 1.001)
        }
        fn rms_norm(&self, x: &CpuTensor, w: &Vec<f32>, eps: f32) -> OpResult<CpuTensor> {
            // Bug: eps 1000× too large.
            self.0.rms_norm(x, w, eps * 1e3)
        }
        fn layer_norm(&self, x: &CpuTensor, w: &Vec<f32>, b: &Vec<f32>, eps: f32) -> OpResult<CpuTensor> {
            self.0.layer_norm(x, w, b, eps)
        }
        fn rope_inplace(
            &self,
            x: &mut CpuTensor,
            head_dim: usize,
            rot_dims: usize,
            layout: RopeLayout,
            pos: &Positions<()>,
            table: &RopeTable,
        ) -> OpResult<()> {
            self.0.rope_inplace(x, head_dim, rot_dims, layout, pos, table)
        }
        fn matmul_t(&self, x: &CpuTensor, w: &CpuWeight) -> OpResult<CpuTensor> {
            self.0.matmul_t(x, w)
        }
        fn matmul_heads(&self, x: &CpuTensor, w: &CpuWeight) -> OpResult<CpuTensor> {
            self.0.matmul_heads(x, w)
        }
        fn indexer_topk(
            &self,
            q: &CpuTensor,
            head_w: &CpuTensor,
            keys: &CpuTensor,
            pos: &Positions<()>,
            topk: usize,
            scale: f32,
        ) -> OpResult<TopK> {
            // Bug: the last selected position of every row is dropped.
            let mut sel = self.0.indexer_topk(q, head_w, keys, pos, topk, scale)?;
            let k = sel.k;
            for row in sel.data.chunks_mut(k) {
                if let Some(last) = row.iter_mut().rev().find(|v| **v >= 0) {
                    *last = -1;
                }
            }
            Ok(sel)
        }
        fn indexer_fp8_quant_inplace(&self, x: &mut CpuTensor, block: usize) -> OpResult<()> {
            self.0.indexer_fp8_quant_inplace(x, block)
        }
        fn sparse_mla(
            &self,
            q_lat: &CpuTensor,
            q_pe: &CpuTensor,
            cache: &CpuTensor,
            sel: &TopK,
            scale: f32,
        ) -> OpResult<CpuTensor> {
            self.0.sparse_mla(q_lat, q_pe, cache, sel, scale)
        }
        fn mlp(&self, x: &CpuTensor, mlp: &Mlp<CpuWeight>) -> OpResult<CpuTensor> {
            self.0.mlp(x, mlp)
        }
        fn moe(&self, x: &CpuTensor, moe: &Moe<CpuWeight, Vec<f32>>) -> OpResult<CpuTensor> {
            // Bug: norm_topk_prob ignored (inverted).
            let m = Moe {
                router: moe.router.clone(),
                score_bias: moe.score_bias.clone(),
                experts: Experts {
                    gate_up: moe.experts.gate_up.clone(),
                    down: moe.experts.down.clone(),
                    n: moe.experts.n,
                    inter: moe.experts.inter,
                },
                shared: moe.shared.as_ref().map(|s| Mlp {
                    gate: s.gate.clone(),
                    up: s.up.clone(),
                    down: s.down.clone(),
                }),
                routing: MoeRouting { norm_topk_prob: !moe.routing.norm_topk_prob, ..moe.routing },
            };
            self.0.moe(x, &m)
        }
        fn nll(&self, logits: &CpuTensor, targets: &[u32]) -> OpResult<Vec<f64>> {
            self.0.nll(logits, targets)
        }
        fn mark(&self) -> OpResult<Instant> {
            self.0.mark()
        }
        fn elapsed(&self, from: &Instant, to: &Instant) -> OpResult<Duration> {
            self.0.elapsed(from, to)
        }
        fn synchronize(&self) -> OpResult<()> {
            self.0.synchronize()
        }
        fn memory(&self) -> MemoryStats {
            self.0.memory()
        }
        fn reset_peak_memory(&self) {
            self.0.reset_peak_memory()
        }
    }

    #[test]
    fn faulty_backend_fails_exactly_its_broken_ops() {
        let results = run(&Faulty(CpuBackend::new()), Tolerance::for_dtype(DType::F32));
        println!("{}", table(&results));
        let failed: BTreeSet<&str> = results.iter().filter(|r| !r.passed).map(|r| r.op).collect();
        // `latent_store` and `mla_norms` fall with them: their defaults are built from the broken
        // `columns` (which yields NaN, never equal to itself); the fused checks compare against
        // the plain ops.
        let want: BTreeSet<&str> =
            ["columns", "scale", "rms_norm", "indexer_topk", "moe", "latent_store", "mla_norms"].into();
        assert_eq!(failed, want, "{}", table(&results));
        // Every check of a broken op fails (each case exercises the bug).
        for r in results.iter().filter(|r| want.contains(r.op)) {
            assert!(!r.passed, "{} / {} passed despite the bug", r.op, r.case);
        }
    }

    /// Tighter than any real backend: a bf16-rounded copy of a correct f32 result fails the F32
    /// limits and passes the BF16 ones.
    #[test]
    fn bf16_rounding_is_caught_by_f32_limits_only() {
        let want = random::fill(1, 1.0, 4096);
        let got: Vec<f32> = want.iter().map(|&x| round_bf16(x)).collect();
        let e = rel_err(&got, &want);
        assert!(e > Tolerance::for_dtype(DType::F32).rel && e < Tolerance::for_dtype(DType::BF16).rel, "{e}");
    }
}
