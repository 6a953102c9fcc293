//! CPU backend: f32 compute, matmuls through `gemm`, everything else parallel over rows with
//! `rayon`. Fast kernels live in the sibling modules; [`reference`](mod@reference) holds their plain twins.

mod attention;
pub mod fp8_indexer;
mod indexer;
mod linalg;
pub mod reference;

use crate::{
    Backend, DType, MemoryStats, Mlp, Moe, OpError, OpResult, Positions, RopeLayout, RopeTable, TopK, WeightInit,
};
use rayon::prelude::*;
use std::time::{Duration, Instant};

/// A row-major f32 matrix in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuTensor {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl CpuTensor {
    pub fn new(data: Vec<f32>, rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "CpuTensor: data length != rows*cols");
        Self { data, rows, cols }
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

/// The CPU backend. Stateless apart from the thread count used by `gemm`.
#[derive(Debug, Clone)]
pub struct CpuBackend {
    threads: usize,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    pub fn new() -> Self {
        Self { threads: rayon::current_num_threads().max(1) }
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// A weight `[groups, rows, cols]` in host memory, stored as bf16 when every value is exactly a
/// bf16 (a bf16 checkpoint, losslessly: half the bytes a decode step reads), else as f32.
/// Arithmetic is f32 either way.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuWeight {
    data: WeightData,
    pub groups: usize,
    pub rows: usize,
    pub cols: usize,
}

#[derive(Debug, Clone, PartialEq)]
enum WeightData {
    F32(Vec<f32>),
    /// The upper 16 bits of each f32.
    Bf16(Vec<u16>),
}

impl CpuWeight {
    /// Stores `data` (`groups * rows * cols` values), as bf16 when that loses nothing.
    pub fn new(data: Vec<f32>, groups: usize, rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), groups * rows * cols, "CpuWeight: data length != groups*rows*cols");
        let data = if data.iter().all(|v| v.to_bits() & 0xFFFF == 0) {
            WeightData::Bf16(data.iter().map(|v| (v.to_bits() >> 16) as u16).collect())
        } else {
            WeightData::F32(data)
        };
        Self { data, groups, rows, cols }
    }

    /// The storage dtype.
    pub fn dtype(&self) -> DType {
        match self.data {
            WeightData::F32(_) => DType::F32,
            WeightData::Bf16(_) => DType::BF16,
        }
    }

    /// Group `g` as a `[rows, cols]` matrix.
    pub fn group(&self, g: usize) -> linalg::Mat<'_> {
        let n = self.rows * self.cols;
        self.all().slice(g * n, n)
    }

    /// Every group, `[groups * rows, cols]`.
    pub fn all(&self) -> linalg::Mat<'_> {
        match &self.data {
            WeightData::F32(v) => linalg::Mat::F32(v),
            WeightData::Bf16(v) => linalg::Mat::Bf16(v),
        }
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type Vector = Vec<f32>;
    type Selection = TopK;
    type PosData = ();
    type Rope = RopeTable;
    type Mark = Instant;
    type Graph = ();

    fn name(&self) -> String {
        format!("cpu ({} threads, f32)", self.threads)
    }

    fn dtype(&self) -> DType {
        DType::F32
    }

    fn default_chunk(&self) -> usize {
        // Activations grow with the chunk (~100 KiB per row of small-glm5 at once) and the
        // indexer's working set with chunk × context. 1K rows: every GEMM still large (prefill as
        // fast as at 2K within noise), and a 4K prefill peaks at ~0.70 GiB instead of ~0.78
        // (bench on the 2-core VM, small-glm5 bf16; 512 rows: ~0.66 GiB, ~5 % slower).
        1024
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> OpResult<CpuTensor> {
        Ok(CpuTensor::new(data.to_vec(), rows, cols))
    }

    fn download(&self, t: &CpuTensor) -> OpResult<Vec<f32>> {
        Ok(t.data.clone())
    }

    fn dims(&self, t: &CpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn zeros(&self, rows: usize, cols: usize) -> OpResult<CpuTensor> {
        Ok(CpuTensor::new(vec![0.0; rows * cols], rows, cols))
    }

    fn copy(&self, t: &CpuTensor) -> OpResult<CpuTensor> {
        Ok(t.clone())
    }

    fn weight(&self, init: WeightInit, groups: usize, rows: usize, cols: usize) -> OpResult<CpuWeight> {
        let n = groups * rows * cols;
        let data = match init {
            WeightInit::Host(v) => {
                if v.len() != n {
                    return Err(OpError::new(
                        "weight",
                        format!("[{groups}, {rows}, {cols}]"),
                        format!("{} values given", v.len()),
                    ));
                }
                v
            }
            WeightInit::Random { seed, bound } => crate::random::fill(seed, bound, n),
        };
        Ok(CpuWeight::new(data, groups, rows, cols))
    }

    fn vector(&self, data: &[f32]) -> OpResult<Vec<f32>> {
        Ok(data.to_vec())
    }

    fn positions(&self, pos: &[usize]) -> OpResult<Positions<()>> {
        Ok(Positions { host: pos.to_vec(), device: (), bound: 0 })
    }

    fn update_positions(&self, p: &mut Positions<()>, pos: &[usize]) -> OpResult<()> {
        if pos.len() != p.len() {
            let shapes = format!("{} positions ← {}", p.len(), pos.len());
            return Err(OpError::new("update_positions", shapes, "row count differs"));
        }
        p.host.copy_from_slice(pos);
        Ok(())
    }

    fn rope_table(&self, table: &RopeTable) -> OpResult<RopeTable> {
        Ok(table.clone())
    }

    fn selection_to_host(&self, sel: &TopK) -> OpResult<TopK> {
        Ok(sel.clone())
    }

    fn selection_from_host(&self, sel: &TopK) -> OpResult<TopK> {
        Ok(sel.clone())
    }

    fn columns(&self, x: &CpuTensor, start: usize, len: usize) -> OpResult<CpuTensor> {
        debug_assert!(start + len <= x.cols);
        let mut data = Vec::with_capacity(x.rows * len);
        for r in 0..x.rows {
            data.extend_from_slice(&x.row(r)[start..start + len]);
        }
        Ok(CpuTensor::new(data, x.rows, len))
    }

    fn rows(&self, x: &CpuTensor, start: usize, len: usize) -> OpResult<CpuTensor> {
        debug_assert!(start + len <= x.rows);
        Ok(CpuTensor::new(x.data[start * x.cols..(start + len) * x.cols].to_vec(), len, x.cols))
    }

    fn head_columns(
        &self,
        x: &CpuTensor,
        heads: usize,
        stride: usize,
        offset: usize,
        len: usize,
    ) -> OpResult<CpuTensor> {
        debug_assert_eq!(x.cols, heads * stride);
        debug_assert!(offset + len <= stride);
        let mut data = Vec::with_capacity(x.rows * heads * len);
        for r in 0..x.rows {
            let row = x.row(r);
            for h in 0..heads {
                data.extend_from_slice(&row[h * stride + offset..h * stride + offset + len]);
            }
        }
        Ok(CpuTensor::new(data, x.rows, heads * len))
    }

    fn write_block(&self, dst: &mut CpuTensor, row0: usize, col0: usize, src: &CpuTensor) -> OpResult<()> {
        if row0 + src.rows > dst.rows || col0 + src.cols > dst.cols {
            return Err(OpError::new(
                "write_block",
                format!("dst [{}, {}] at ({row0}, {col0}), src [{}, {}]", dst.rows, dst.cols, src.rows, src.cols),
                "block out of bounds",
            ));
        }
        let cols = dst.cols;
        for r in 0..src.rows {
            let d = (row0 + r) * cols + col0;
            dst.data[d..d + src.cols].copy_from_slice(src.row(r));
        }
        Ok(())
    }

    fn write_rows(&self, dst: &mut CpuTensor, pos: &Positions<()>, col0: usize, src: &CpuTensor) -> OpResult<()> {
        if src.rows != pos.len() || pos.max_visible() > dst.rows || col0 + src.cols > dst.cols {
            return Err(OpError::new(
                "write_rows",
                format!(
                    "dst [{}, {}] col {col0}, src [{}, {}], {} positions",
                    dst.rows,
                    dst.cols,
                    src.rows,
                    src.cols,
                    pos.len()
                ),
                "rows out of bounds",
            ));
        }
        let cols = dst.cols;
        for (r, &p) in pos.host.iter().enumerate() {
            let d = p * cols + col0;
            dst.data[d..d + src.cols].copy_from_slice(src.row(r));
        }
        Ok(())
    }

    fn embedding(&self, table: &CpuWeight, ids: &[u32]) -> OpResult<CpuTensor> {
        let mut data = vec![0.0f32; ids.len() * table.cols];
        for (&id, dst) in ids.iter().zip(data.chunks_exact_mut(table.cols)) {
            table.all().slice(id as usize * table.cols, table.cols).to_f32_into(dst);
        }
        Ok(CpuTensor::new(data, ids.len(), table.cols))
    }

    fn add_inplace(&self, x: &mut CpuTensor, y: &CpuTensor) -> OpResult<()> {
        debug_assert_eq!((x.rows, x.cols), (y.rows, y.cols));
        x.data.par_iter_mut().zip(y.data.par_iter()).for_each(|(a, b)| *a += *b);
        Ok(())
    }

    fn scale_inplace(&self, x: &mut CpuTensor, s: f32) -> OpResult<()> {
        x.data.par_iter_mut().for_each(|a| *a *= s);
        Ok(())
    }

    fn rms_norm(&self, x: &CpuTensor, w: &Vec<f32>, eps: f32) -> OpResult<CpuTensor> {
        debug_assert_eq!(w.len(), x.cols);
        let mut out = x.clone();
        out.data.par_chunks_mut(x.cols).for_each(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for (v, g) in row.iter_mut().zip(w) {
                *v = g * (*v * inv);
            }
        });
        Ok(out)
    }

    fn layer_norm(&self, x: &CpuTensor, w: &Vec<f32>, b: &Vec<f32>, eps: f32) -> OpResult<CpuTensor> {
        debug_assert_eq!(w.len(), x.cols);
        let mut out = x.clone();
        out.data.par_chunks_mut(x.cols).for_each(|row| {
            let n = row.len() as f32;
            let mean = row.iter().sum::<f32>() / n;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
            let inv = 1.0 / (var + eps).sqrt();
            for ((v, g), bb) in row.iter_mut().zip(w).zip(b) {
                *v = (*v - mean) * inv * g + bb;
            }
        });
        Ok(out)
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
        debug_assert_eq!(x.rows, pos.len());
        debug_assert_eq!(x.cols % head_dim, 0);
        debug_assert_eq!(rot_dims, 2 * table.half());
        if pos.max_visible() > table.max_positions() {
            return Err(OpError::new(
                "rope",
                format!("[{}, {}]", x.rows, x.cols),
                format!("position {} beyond the table's {}", pos.max_visible() - 1, table.max_positions()),
            ));
        }
        x.data.par_chunks_mut(x.cols).zip(pos.host.par_iter()).for_each(|(row, &p)| {
            for head in row.chunks_mut(head_dim) {
                table.rotate(&mut head[..rot_dims], p, layout);
            }
        });
        Ok(())
    }

    fn matmul_t(&self, x: &CpuTensor, w: &CpuWeight) -> OpResult<CpuTensor> {
        debug_assert_eq!(w.groups, 1);
        debug_assert_eq!(x.cols, w.cols, "matmul_t: inner dims");
        let out = linalg::matmul_t(&x.data, x.rows, x.cols, w.all(), w.rows, self.threads);
        Ok(CpuTensor::new(out, x.rows, w.rows))
    }

    fn matmul_heads(&self, x: &CpuTensor, w: &CpuWeight) -> OpResult<CpuTensor> {
        let (heads, n_out, n_in) = (w.groups, w.rows, w.cols);
        debug_assert_eq!(x.cols, heads * n_in);
        let per_head: Vec<Vec<f32>> = (0..heads)
            .into_par_iter()
            .map(|h| {
                let mut xs = Vec::with_capacity(x.rows * n_in);
                for r in 0..x.rows {
                    xs.extend_from_slice(&x.row(r)[h * n_in..(h + 1) * n_in]);
                }
                linalg::matmul_t(&xs, x.rows, n_in, w.group(h), n_out, 1)
            })
            .collect();
        let mut out = vec![0.0f32; x.rows * heads * n_out];
        for (h, ph) in per_head.iter().enumerate() {
            for r in 0..x.rows {
                out[r * heads * n_out + h * n_out..r * heads * n_out + (h + 1) * n_out]
                    .copy_from_slice(&ph[r * n_out..(r + 1) * n_out]);
            }
        }
        Ok(CpuTensor::new(out, x.rows, heads * n_out))
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
        let shapes = || {
            format!(
                "q {:?}, head_w {:?}, keys {:?}",
                (q.rows, q.cols),
                (head_w.rows, head_w.cols),
                (keys.rows, keys.cols)
            )
        };
        let ok = head_w.rows == q.rows && q.cols == head_w.cols * keys.cols && pos.host.len() == q.rows;
        if !ok {
            return Err(OpError::new("indexer_topk", shapes(), "inconsistent shapes"));
        }
        // The scoring GEMMs read keys up to the last visible position unchecked.
        if pos.max_visible() > keys.rows {
            return Err(OpError::new("indexer_topk", shapes(), "a position beyond the key cache"));
        }
        Ok(indexer::indexer_topk(q, head_w, keys, &pos.host, topk, scale))
    }

    fn indexer_fp8_quant_inplace(&self, x: &mut CpuTensor, block: usize) -> OpResult<()> {
        let cols = x.cols;
        if !cols.is_multiple_of(block) {
            return Err(OpError::new("indexer_fp8", format!("[{}, {cols}]", x.rows), format!("block {block}")));
        }
        x.data.par_chunks_mut(cols).try_for_each(|row| fp8_indexer::hadamard_fp8_inplace(row, block))
    }

    fn sparse_mla(
        &self,
        q_lat: &CpuTensor,
        q_pe: &CpuTensor,
        cache: &CpuTensor,
        sel: &TopK,
        scale: f32,
    ) -> OpResult<CpuTensor> {
        Ok(attention::sparse_mla(q_lat, q_pe, cache, sel, scale))
    }

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
        let shapes = || {
            format!(
                "q [{}, {}], k [{}, {}], v [{}, {}], heads {heads}/{kv_heads}, {} positions",
                q.rows,
                q.cols,
                k.rows,
                k.cols,
                v.rows,
                v.cols,
                pos.len()
            )
        };
        let ok = heads > 0
            && kv_heads > 0
            && heads.is_multiple_of(kv_heads)
            && q.cols.is_multiple_of(heads)
            && k.cols == kv_heads * (q.cols / heads)
            && v.cols.is_multiple_of(kv_heads)
            && k.rows == v.rows
            && q.rows == pos.len()
            && sel.is_none_or(|s| s.rows == q.rows);
        if !ok {
            return Err(OpError::new("gqa_attention", shapes(), "inconsistent shapes"));
        }
        if pos.max_visible() > k.rows || sel.is_some_and(|s| s.data.iter().any(|&p| p >= k.rows as i32)) {
            return Err(OpError::new("gqa_attention", shapes(), "a position beyond the cache"));
        }
        Ok(attention::gqa(q, k, v, heads, kv_heads, &pos.host, sel, scale))
    }

    fn mlp(&self, x: &CpuTensor, mlp: &Mlp<CpuWeight>) -> OpResult<CpuTensor> {
        if x.rows == 1 {
            let slot = FfnSlot::of_mlp(mlp, 1.0);
            return Ok(CpuTensor::new(swiglu_token(&x.data, &[slot], self.threads), 1, x.cols));
        }
        Ok(self.swiglu(x, mlp.gate.all(), mlp.up.all(), mlp.down.all(), mlp.gate.rows))
    }

    fn moe(&self, x: &CpuTensor, moe: &Moe<CpuWeight, Vec<f32>>) -> OpResult<CpuTensor> {
        let logits = self.matmul_t(x, &moe.router)?;
        let n_exp = moe.experts.n;
        let inter = moe.experts.inter;
        // Route every token: (expert, weight) pairs.
        let route_t = |t: usize| route(&logits.data[t * n_exp..(t + 1) * n_exp], &moe.score_bias, &moe.routing);
        let routes: Vec<Vec<(usize, f32)>> =
            if x.rows == 1 { vec![route_t(0)] } else { (0..x.rows).into_par_iter().map(route_t).collect() };
        // Tokens per expert, in token order.
        let mut assigned: Vec<Vec<(usize, f32)>> = vec![Vec::new(); n_exp];
        for (t, r) in routes.iter().enumerate() {
            for &(e, w) in r {
                assigned[e].push((t, w));
            }
        }
        let hidden = x.cols;
        if x.rows == 1 {
            // One token: the routed experts (in expert order, as below) and the shared one in
            // two parallel regions instead of four per expert.
            let mut slots: Vec<FfnSlot> = assigned
                .iter()
                .enumerate()
                .filter_map(|(e, toks)| toks.first().map(|&(_, w)| (e, w)))
                .map(|(e, w)| {
                    let gu = moe.experts.gate_up.group(e);
                    FfnSlot {
                        gate: gu.slice(0, inter * hidden),
                        up: gu.slice(inter * hidden, inter * hidden),
                        down: moe.experts.down.group(e),
                        inter,
                        weight: w,
                    }
                })
                .collect();
            slots.extend(moe.shared.as_ref().map(|m| FfnSlot::of_mlp(m, 1.0)));
            return Ok(CpuTensor::new(swiglu_token(&x.data, &slots, self.threads), 1, hidden));
        }
        let mut out = vec![0.0f32; x.rows * hidden];
        for (e, toks) in assigned.iter().enumerate() {
            if toks.is_empty() {
                continue;
            }
            let mut xs = Vec::with_capacity(toks.len() * hidden);
            for &(t, _) in toks {
                xs.extend_from_slice(x.row(t));
            }
            let gu = moe.experts.gate_up.group(e);
            let (gate, up) = (gu.slice(0, inter * hidden), gu.slice(inter * hidden, inter * hidden));
            let y = self.swiglu(&CpuTensor::new(xs, toks.len(), hidden), gate, up, moe.experts.down.group(e), inter);
            for (i, &(t, w)) in toks.iter().enumerate() {
                let dst = &mut out[t * hidden..(t + 1) * hidden];
                for (d, v) in dst.iter_mut().zip(y.row(i)) {
                    *d += v * w;
                }
            }
        }
        let mut out = CpuTensor::new(out, x.rows, hidden);
        if let Some(shared) = &moe.shared {
            let s = self.mlp(x, shared)?;
            self.add_inplace(&mut out, &s)?;
        }
        Ok(out)
    }

    fn nll(&self, logits: &CpuTensor, targets: &[u32]) -> OpResult<Vec<f64>> {
        debug_assert_eq!(logits.rows, targets.len());
        Ok((0..logits.rows)
            .into_par_iter()
            .map(|t| {
                let row = logits.row(t);
                let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let z: f64 = row.iter().map(|&l| (l as f64 - m).exp()).sum();
                m + z.ln() - row[targets[t] as usize] as f64
            })
            .collect())
    }

    fn mark(&self) -> OpResult<Instant> {
        Ok(Instant::now())
    }

    fn elapsed(&self, from: &Instant, to: &Instant) -> OpResult<Duration> {
        Ok(to.saturating_duration_since(*from))
    }

    fn synchronize(&self) -> OpResult<()> {
        Ok(())
    }

    /// The process's resident memory (`VmRSS`, peak `VmHWM` from `/proc/self/status`; zeros where
    /// there is no procfs): on the CPU the model, caches and activations are all host memory.
    fn memory(&self) -> MemoryStats {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kib = |key| proc_kib(&status, key).unwrap_or(0);
        MemoryStats { current: kib("VmRSS:"), peak: kib("VmHWM:"), total: None }
    }

    /// Resets `VmHWM` to the current resident size (`/proc/self/clear_refs`, Linux ≥ 4.0).
    fn reset_peak_memory(&self) {
        let _ = std::fs::write("/proc/self/clear_refs", "5");
    }
}

/// The value of a `Key:   123 kB` line of a procfs file (`/proc/self/status`, `/proc/meminfo`),
/// in bytes.
pub fn proc_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|k| k * 1024)
}

impl CpuBackend {
    /// `down(silu(x·gateᵀ) * x·upᵀ)` with `gate`/`up` `[inter, hidden]`, `down` `[hidden, inter]`.
    fn swiglu(&self, x: &CpuTensor, gate: linalg::Mat, up: linalg::Mat, down: linalg::Mat, inter: usize) -> CpuTensor {
        let mut a = linalg::matmul_t(&x.data, x.rows, x.cols, gate, inter, self.threads);
        let u = linalg::matmul_t(&x.data, x.rows, x.cols, up, inter, self.threads);
        a.par_iter_mut().zip(u.par_iter()).for_each(|(gv, uv)| *gv = silu(*gv) * uv);
        let y = linalg::matmul_t(&a, x.rows, inter, down, x.cols, self.threads);
        CpuTensor::new(y, x.rows, x.cols)
    }
}

/// One SwiGLU FFN applied to a token, scaled by `weight` in [`swiglu_token`]'s sum.
struct FfnSlot<'a> {
    /// `[inter, hidden]`
    gate: linalg::Mat<'a>,
    /// `[inter, hidden]`
    up: linalg::Mat<'a>,
    /// `[hidden, inter]`
    down: linalg::Mat<'a>,
    inter: usize,
    weight: f32,
}

impl<'a> FfnSlot<'a> {
    fn of_mlp(m: &'a Mlp<CpuWeight>, weight: f32) -> Self {
        FfnSlot { gate: m.gate.all(), up: m.up.all(), down: m.down.all(), inter: m.gate.rows, weight }
    }
}

/// `Σ_s weight_s · down_s(silu(gate_s · x) * up_s · x)` for one token `x [hidden]`, the slots
/// summed in order into an f32 accumulator starting at zero (what the per-FFN path computes: its
/// weighted sum, then `+` the shared expert at weight 1). Two parallel regions whatever the
/// number of slots — gate and up rows of every slot, then output rows of every slot's down —
/// where the per-FFN path has four per FFN: at one token those hand-offs cost more than the
/// weights take to read on many cores.
fn swiglu_token(x: &[f32], slots: &[FfnSlot], threads: usize) -> Vec<f32> {
    let hidden = x.len();
    let total: usize = slots.iter().map(|s| s.inter).sum();
    let rows = (total / (4 * threads.max(1))).clamp(4, 64);
    // act[s] = silu(gate_s · x) * (up_s · x), blocks of `rows` that never straddle two slots.
    let mut act: Vec<Vec<f32>> = slots.iter().map(|s| vec![0.0f32; s.inter]).collect();
    let mut tasks: Vec<(&FfnSlot, usize, &mut [f32])> = Vec::new();
    for (s, h) in slots.iter().zip(act.iter_mut()) {
        for (c, block) in h.chunks_mut(rows).enumerate() {
            tasks.push((s, c * rows, block));
        }
    }
    tasks.into_par_iter().for_each(|(s, r0, block)| {
        let n = block.len();
        let mut up = [0.0f32; 64];
        let up = &mut up[..n];
        linalg::gemv_serial(x, s.gate.slice(r0 * hidden, n * hidden), block);
        linalg::gemv_serial(x, s.up.slice(r0 * hidden, n * hidden), up);
        block.iter_mut().zip(up.iter()).for_each(|(g, u)| *g = silu(*g) * u);
    });
    let mut out = vec![0.0f32; hidden];
    let rows = (hidden / (4 * threads.max(1))).clamp(4, 64);
    out.par_chunks_mut(rows).enumerate().for_each(|(c, o)| {
        let r0 = c * rows;
        let mut y = [0.0f32; 64];
        let y = &mut y[..o.len()];
        for (s, h) in slots.iter().zip(&act) {
            linalg::gemv_serial(h, s.down.slice(r0 * s.inter, o.len() * s.inter), y);
            o.iter_mut().zip(y.iter()).for_each(|(acc, v)| *acc += v * s.weight);
        }
    });
    out
}

/// DeepSeek-V3 `noaux_tc` routing for one token: sigmoid scores, bias for the choice only,
/// group-limited (sum of the top-2 biased scores per group, keep `topk_group` groups), top-k
/// experts, weights = unbiased scores normalised (+1e-20, as transformers) × scaling factor.
pub fn route(logits: &[f32], bias: &[f32], r: &crate::MoeRouting) -> Vec<(usize, f32)> {
    let n = logits.len();
    let scores: Vec<f32> = logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect();
    let choice: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
    let per_group = n / r.n_group;
    let mut group_score: Vec<(f32, usize)> = (0..r.n_group)
        .map(|g| {
            let mut v: Vec<f32> = choice[g * per_group..(g + 1) * per_group].to_vec();
            v.sort_unstable_by(|a, b| b.total_cmp(a));
            (v[0] + v[1], g)
        })
        .collect();
    group_score.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut allowed = vec![false; r.n_group];
    for &(_, g) in group_score.iter().take(r.topk_group) {
        allowed[g] = true;
    }
    let mut cand: Vec<(f32, usize)> = (0..n).filter(|e| allowed[e / per_group]).map(|e| (choice[e], e)).collect();
    cand.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    cand.truncate(r.top_k);
    let mut picked: Vec<(usize, f32)> = cand.iter().map(|&(_, e)| (e, scores[e])).collect();
    if r.norm_topk_prob {
        let z: f32 = picked.iter().map(|p| p.1).sum::<f32>() + 1e-20;
        for p in picked.iter_mut() {
            p.1 /= z;
        }
    }
    for p in picked.iter_mut() {
        p.1 *= r.routed_scaling_factor;
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn procfs_sizes_parse_and_track_the_process() {
        let status = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t   1024 kB\n";
        assert_eq!(proc_kib(status, "VmRSS:"), Some(1024 * 1024));
        assert_eq!(proc_kib(status, "VmHWM:"), Some(2048 * 1024));
        assert_eq!(proc_kib(status, "VmSwap:"), None);
        let m = CpuBackend::new().memory();
        if cfg!(target_os = "linux") {
            assert!(m.current > 0 && m.peak >= m.current, "{m:?}");
        }
    }

    #[test]
    fn indexer_rejects_positions_past_the_keys_and_bad_shapes() {
        let b = CpuBackend::new();
        let (heads, d) = (2, 4);
        let q = CpuTensor::new(vec![0.5; heads * d], 1, heads * d);
        let w = CpuTensor::new(vec![1.0; heads], 1, heads);
        let keys = CpuTensor::new(vec![0.25; 3 * d], 3, d);
        assert!(b.indexer_topk(&q, &w, &keys, &b.positions(&[2]).unwrap(), 2, 1.0).is_ok());
        let e = b.indexer_topk(&q, &w, &keys, &b.positions(&[3]).unwrap(), 2, 1.0).unwrap_err();
        assert!(e.to_string().contains("indexer_topk") && e.to_string().contains("beyond"), "{e}");
        let w3 = CpuTensor::new(vec![1.0; 3], 1, 3);
        let e = b.indexer_topk(&q, &w3, &keys, &b.positions(&[2]).unwrap(), 2, 1.0).unwrap_err();
        assert!(e.to_string().contains("inconsistent shapes"), "{e}");
    }
}
