//! The op interface of the engine, and its CPU implementation.
//!
//! Model code is written once against [`Backend`]; the backend is chosen once at load time and
//! the model never branches on the device. Ops are "mid-level": the ones a GPU backend fuses
//! (lightning-indexer scoring + top-k, sparse MLA attention, a whole MoE block) are single ops, so
//! each backend is free to implement them its own way.
//!
//! Dimension legend used throughout:
//! `T` query rows in this step, `S` cached key rows (positions `0..S`), `H` attention heads,
//! `R` = `kv_lora_rank` (the MLA latent), `P` = `qk_rope_head_dim`, `HI`/`D` indexer heads / head
//! dim, `K` = top-k row length.
//!
//! Every activation is a row-major 2-D matrix `[rows, cols]` in the backend's activation dtype;
//! multi-head data is packed head after head inside a row (`[T, H*d]`). Weights are
//! `[groups, out, in]` (groups = 1 for a plain matrix; per-head `W_UK`/`W_UV` and stacked MoE
//! experts use more) and stay in the dtype the backend chose at load.
//!
//! Nothing that lives on the device round-trips through the host inside a forward pass: the
//! top-k selection ([`Backend::Selection`]), norm weights ([`Backend::Vector`]), per-row positions
//! ([`Positions`]) and the RoPE table ([`Backend::Rope`]) are device objects, copied to the host
//! only when a tool asks for them.
//!
//! Every op is fallible: a device backend can run out of memory or fail a launch, and the error
//! names the op and its shapes ([`OpError`]).
//!
//! * [`cpu::CpuBackend`] — f32 compute, `gemm` + `rayon`; every fast kernel has a plain
//!   reference next to it in [`cpu::reference`] and is tested against it.

pub mod conformance;
pub mod cpu;
pub mod random;
mod rope;
mod topk;

pub use rope::{RopeLayout, RopeTable};
pub use topk::{TopK, select_topk};

/// Index of the largest value of `row`, as a left-to-right scan keeping the first strict
/// maximum finds it: the lowest index on ties; a NaN never replaces the running maximum (so it
/// is chosen only at index 0, which the scan starts from). 0 for an empty row.
pub fn argmax(row: &[f32]) -> u32 {
    let Some(&first) = row.first() else { return 0 };
    let (mut best, mut best_v) = (0usize, first);
    for (i, &v) in row.iter().enumerate().skip(1) {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

use std::time::Duration;

/// An op failed on the device: out of memory, a failed launch or copy, a kernel that did not
/// compile. Names the op and the shapes it was called with.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{op} ({shapes}): {detail}")]
pub struct OpError {
    pub op: &'static str,
    pub shapes: String,
    pub detail: String,
}

impl OpError {
    pub fn new(op: &'static str, shapes: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Self { op, shapes: shapes.into(), detail: detail.to_string() }
    }
}

pub type OpResult<T> = Result<T, OpError>;

/// Element type of activations and caches (weights follow it on devices that store bf16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
        }
    }
}

/// Where a weight's values come from.
#[derive(Debug, Clone)]
pub enum WeightInit {
    /// Host f32 values, `groups * rows * cols` of them.
    Host(Vec<f32>),
    /// Seeded uniform values in `[-bound, bound)`, generated where the weight lives (a 30B model's
    /// random weights never exist on the host). Element `i` is [`random::uniform`]`(seed, i)`
    /// × bound on every backend.
    Random { seed: u64, bound: f32 },
}

/// Absolute positions of the rows of one step, on the host (sizes, loop bounds) and on the device
/// (kernels read them). Built once per forward pass by [`Backend::positions`].
///
/// Rows are independent: a batch of sequences would add a per-row sequence id and a block table
/// here without changing the op signatures.
///
/// `bound` is the number of keys launch shapes are sized for. An eager pass sizes them for its
/// own positions (`bound` = 0, i.e. `max(position) + 1`); a recorded step (a CUDA graph, see
/// [`Backend::graph_begin`]) sizes them for the largest position it will be replayed with, and
/// kernels take each row's exact limit from the device positions.
#[derive(Debug, Clone)]
pub struct Positions<D> {
    pub host: Vec<usize>,
    pub device: D,
    pub bound: usize,
}

impl<D> Positions<D> {
    pub fn len(&self) -> usize {
        self.host.len()
    }
    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }
    /// Keys the launch shapes cover: `max(position) + 1`, or [`Self::bound`] when larger.
    pub fn max_visible(&self) -> usize {
        self.host.iter().max().map_or(0, |&p| p + 1).max(self.bound)
    }
}

/// Dense SwiGLU MLP weights: `down(silu(gate(x)) * up(x))`.
#[derive(Debug)]
pub struct Mlp<W> {
    /// `[I, hidden]`
    pub gate: W,
    /// `[I, hidden]`
    pub up: W,
    /// `[hidden, I]`
    pub down: W,
}

/// Routed experts, stacked for grouped GEMMs.
#[derive(Debug)]
pub struct Experts<W> {
    /// `[E, 2I, hidden]`: rows `0..I` of group `e` are expert `e`'s gate, rows `I..2I` its up.
    pub gate_up: W,
    /// `[E, hidden, I]`
    pub down: W,
    pub n: usize,
    pub inter: usize,
}

/// A DeepSeek-V3 style MoE block: sigmoid router with `e_score_correction_bias`,
/// group-limited expert choice, normalised weights × `routed_scaling_factor`, shared experts.
#[derive(Debug)]
pub struct Moe<W, V> {
    /// Router weight `[E, hidden]` (kept f32, as transformers does).
    pub router: W,
    /// `e_score_correction_bias` `[E]`; biases the *choice* only, not the weights.
    pub score_bias: V,
    pub experts: Experts<W>,
    /// `n_shared_experts` fused into one MLP of width `moe_intermediate_size * n_shared`.
    pub shared: Option<Mlp<W>>,
    pub routing: MoeRouting,
}

/// Router hyper-parameters (from the model config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoeRouting {
    pub n_group: usize,
    pub topk_group: usize,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
}

/// Memory the backend holds on its device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes allocated by this backend now.
    pub current: u64,
    /// Most bytes allocated at once since the last [`Backend::reset_peak_memory`].
    pub peak: u64,
    /// Device capacity, where known.
    pub total: Option<u64>,
}

/// The op interface. One implementation per device; activations are `[rows, cols]`.
///
/// Shapes are validated when the model is loaded and the cache is sized, so a shape mismatch
/// inside an op is a bug (ops `debug_assert!` them); what can fail at run time on a device
/// (allocation, launch, copy) is an [`OpError`].
pub trait Backend: Send + Sync {
    /// An activation matrix on the device.
    type Tensor: Send + Sync;
    /// A weight `[groups, out, in]` in the device's storage format.
    type Weight: Send + Sync;
    /// A 1-D f32 parameter on the device (norm weights, biases).
    type Vector: Send + Sync;
    /// Top-k selection `[T, K]` (i32 positions, -1 padded) on the device.
    type Selection: Send + Sync;
    /// The device half of [`Positions`].
    type PosData: Send + Sync;
    /// A RoPE cos/sin table on the device.
    type Rope: Send + Sync;
    /// A point in the device's timeline (an event on a GPU, an instant on the CPU).
    type Mark;
    /// A recorded sequence of ops that can be replayed (a CUDA graph); `()` where the backend
    /// does not record.
    type Graph: Send;

    fn name(&self) -> String;
    /// Activation and cache dtype.
    fn dtype(&self) -> DType;
    /// Default prefill chunk (tokens per forward) for long prompts on this device.
    fn default_chunk(&self) -> usize;

    // ---- data movement -------------------------------------------------------------------
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> OpResult<Self::Tensor>;
    fn download(&self, t: &Self::Tensor) -> OpResult<Vec<f32>>;
    fn dims(&self, t: &Self::Tensor) -> (usize, usize);
    fn zeros(&self, rows: usize, cols: usize) -> OpResult<Self::Tensor>;
    fn copy(&self, t: &Self::Tensor) -> OpResult<Self::Tensor>;
    /// A weight `[groups, rows, cols]`.
    fn weight(&self, init: WeightInit, groups: usize, rows: usize, cols: usize) -> OpResult<Self::Weight>;
    fn vector(&self, data: &[f32]) -> OpResult<Self::Vector>;
    fn positions(&self, pos: &[usize]) -> OpResult<Positions<Self::PosData>>;
    /// Overwrite the positions of `p` in place (same row count; the device half keeps its
    /// address, so a recorded step replays with the new values). Not while recording.
    fn update_positions(&self, p: &mut Positions<Self::PosData>, pos: &[usize]) -> OpResult<()>;
    fn rope_table(&self, table: &RopeTable) -> OpResult<Self::Rope>;
    fn selection_to_host(&self, sel: &Self::Selection) -> OpResult<TopK>;
    fn selection_from_host(&self, sel: &TopK) -> OpResult<Self::Selection>;
    /// Copy of columns `start..start+len` of every row.
    fn columns(&self, x: &Self::Tensor, start: usize, len: usize) -> OpResult<Self::Tensor>;
    /// Copy of rows `start..start+len`.
    fn rows(&self, x: &Self::Tensor, start: usize, len: usize) -> OpResult<Self::Tensor>;
    /// Per-head column slice: from `[T, heads*stride]` take `offset..offset+len` of each head,
    /// packed into `[T, heads*len]`.
    fn head_columns(
        &self,
        x: &Self::Tensor,
        heads: usize,
        stride: usize,
        offset: usize,
        len: usize,
    ) -> OpResult<Self::Tensor>;
    /// `dst[row0 + i, col0 + j] = src[i, j]`.
    fn write_block(&self, dst: &mut Self::Tensor, row0: usize, col0: usize, src: &Self::Tensor) -> OpResult<()>;
    /// `dst[pos[i], col0 + j] = src[i, j]`: scatter rows to the positions of a step (cache
    /// writes; the device reads the positions, so a recorded step writes where it is replayed).
    fn write_rows(
        &self,
        dst: &mut Self::Tensor,
        pos: &Positions<Self::PosData>,
        col0: usize,
        src: &Self::Tensor,
    ) -> OpResult<()>;

    // ---- elementwise / norms -------------------------------------------------------------
    /// Gather rows of an embedding table (a `[1, vocab, hidden]` weight).
    fn embedding(&self, table: &Self::Weight, ids: &[u32]) -> OpResult<Self::Tensor>;
    fn add_inplace(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> OpResult<()>;
    fn scale_inplace(&self, x: &mut Self::Tensor, s: f32) -> OpResult<()>;
    /// `x * rsqrt(mean(x²) + eps) * w` per row (f32 arithmetic).
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Vector, eps: f32) -> OpResult<Self::Tensor>;
    /// `(x - mean) * rsqrt(var + eps) * w + b` per row (biased variance, f32 arithmetic).
    fn layer_norm(&self, x: &Self::Tensor, w: &Self::Vector, b: &Self::Vector, eps: f32) -> OpResult<Self::Tensor>;
    /// Rotate the first `rot_dims` of each `head_dim`-wide head of every row in place; row `t`
    /// is at absolute position `pos.host[t]`.
    fn rope_inplace(
        &self,
        x: &mut Self::Tensor,
        head_dim: usize,
        rot_dims: usize,
        layout: RopeLayout,
        pos: &Positions<Self::PosData>,
        table: &Self::Rope,
    ) -> OpResult<()>;

    // ---- fused steps (defaults: the plain ops they stand for, the reference) -------------
    /// `x += y`, then `rms_norm(x, w, eps)` of the sum as stored (one pass on a GPU).
    fn add_rms_norm(
        &self,
        x: &mut Self::Tensor,
        y: &Self::Tensor,
        w: &Self::Vector,
        eps: f32,
    ) -> OpResult<Self::Tensor> {
        self.add_inplace(x, y)?;
        self.rms_norm(x, w, eps)
    }
    /// Split every head of `x [T, heads*(keep+rot)]` into `[T, heads*keep]` (columns
    /// `0..keep`) and `[T, heads*rot]` (columns `keep..`, rotated by RoPE over all `rot` dims at
    /// the step's positions): the MLA query's nope / rope parts.
    #[allow(clippy::too_many_arguments)]
    fn split_heads_rope(
        &self,
        x: &Self::Tensor,
        heads: usize,
        keep: usize,
        rot: usize,
        layout: RopeLayout,
        pos: &Positions<Self::PosData>,
        table: &Self::Rope,
    ) -> OpResult<(Self::Tensor, Self::Tensor)> {
        let a = self.head_columns(x, heads, keep + rot, 0, keep)?;
        let mut b = self.head_columns(x, heads, keep + rot, keep, rot)?;
        self.rope_inplace(&mut b, rot, rot, layout, pos, table)?;
        Ok((a, b))
    }
    /// Store a step's MLA latent rows: `cache[pos[t], ..r] = rms_norm(kv[t, ..r], w, eps)` and
    /// `cache[pos[t], r..] = rope(kv[t, r..])` (one head of `kv.cols - r` dims).
    #[allow(clippy::too_many_arguments)]
    fn latent_store(
        &self,
        kv: &Self::Tensor,
        r: usize,
        w: &Self::Vector,
        eps: f32,
        layout: RopeLayout,
        pos: &Positions<Self::PosData>,
        table: &Self::Rope,
        cache: &mut Self::Tensor,
    ) -> OpResult<()> {
        let p = self
            .dims(kv)
            .1
            .checked_sub(r)
            .ok_or_else(|| OpError::new("latent_store", format!("r {r}"), "r > columns"))?;
        let c = self.rms_norm(&self.columns(kv, 0, r)?, w, eps)?;
        let mut k_pe = self.columns(kv, r, p)?;
        self.rope_inplace(&mut k_pe, p, p, layout, pos, table)?;
        self.write_rows(cache, pos, 0, &c)?;
        self.write_rows(cache, pos, r, &k_pe)
    }

    /// The MLA's two latent norms of a step: returns `rms_norm(q_a, q_w, eps)` (the q latent)
    /// and stores the KV latent rows as [`Backend::latent_store`] does (`kv_w`, the same `eps`).
    /// A device may run both in one launch; the results equal the two ops exactly.
    #[allow(clippy::too_many_arguments)]
    fn mla_norms(
        &self,
        q_a: &Self::Tensor,
        q_w: &Self::Vector,
        kv: &Self::Tensor,
        r: usize,
        kv_w: &Self::Vector,
        eps: f32,
        layout: RopeLayout,
        pos: &Positions<Self::PosData>,
        table: &Self::Rope,
        cache: &mut Self::Tensor,
    ) -> OpResult<Self::Tensor> {
        let qr = self.rms_norm(q_a, q_w, eps)?;
        self.latent_store(kv, r, kv_w, eps, layout, pos, table, cache)?;
        Ok(qr)
    }
    /// The MoE half of a layer: `x += y`, `h = rms_norm(x, w, eps)`, `x += moe(h)`
    /// ([`Backend::add_rms_norm`] then [`Backend::moe_residual`]). A device may compute the add
    /// and the norm inside the MoE's routing kernel; the result equals the two ops exactly.
    fn add_rms_norm_moe(
        &self,
        x: &mut Self::Tensor,
        y: &Self::Tensor,
        w: &Self::Vector,
        eps: f32,
        moe: &Moe<Self::Weight, Self::Vector>,
    ) -> OpResult<()> {
        let h = self.add_rms_norm(x, y, w, eps)?;
        self.moe_residual(x, &h, moe)
    }

    // ---- matmuls ------------------------------------------------------------------------
    /// `x [T, in] · wᵀ` → `[T, out]` for a `[1, out, in]` weight.
    fn matmul_t(&self, x: &Self::Tensor, w: &Self::Weight) -> OpResult<Self::Tensor>;
    /// Two matmuls of one input, `(x · w1ᵀ, x · w2ᵀ)` (the MLA's q_a and kv_a): a device may run
    /// them as one launch; each result equals its own `matmul_t` exactly.
    fn matmul_t2(
        &self,
        x: &Self::Tensor,
        w1: &Self::Weight,
        w2: &Self::Weight,
    ) -> OpResult<(Self::Tensor, Self::Tensor)> {
        Ok((self.matmul_t(x, w1)?, self.matmul_t(x, w2)?))
    }
    /// Per-head matmul: `x [T, H*in]`, `w [H, out, in]` → `[T, H*out]` (one strided-batched GEMM).
    fn matmul_heads(&self, x: &Self::Tensor, w: &Self::Weight) -> OpResult<Self::Tensor>;

    // ---- DSA ----------------------------------------------------------------------------
    /// Lightning indexer + exact top-k. `q: [T, HI*D]` (RoPE applied), `head_w: [T, HI]`
    /// (already × HI^-½), `keys: [≥S, D]` (rows `0..=pos[t]` visible to row `t`).
    /// Score `I[t,s] = Σ_h head_w[t,h] · ReLU(scale · q[t,h]·k[s])`; keeps
    /// `min(topk, visible)` positions per row (ties → lower position), row length
    /// `K = min(topk, max visible)`, padded with -1.
    fn indexer_topk(
        &self,
        q: &Self::Tensor,
        head_w: &Self::Tensor,
        keys: &Self::Tensor,
        pos: &Positions<Self::PosData>,
        topk: usize,
        scale: f32,
    ) -> OpResult<Self::Selection>;
    /// The FP8-faithful indexer numerics of DeepSeek's reference (an option): per `block`-wide
    /// block of every row (a 128-dim indexer head of q, or a key), the orthonormal Walsh–Hadamard
    /// rotation, then e4m3 fake quantisation with a power-of-two (UE8M0) scale
    /// (`cpu::fp8_indexer`). Applied to q and k before scoring, the scores equal the reference's
    /// FP8 `fp8_index` up to f32 summation order. In place.
    fn indexer_fp8_quant_inplace(&self, x: &mut Self::Tensor, block: usize) -> OpResult<()>;
    /// Sparse MLA attention in the absorbed (MQA) form over the selected positions only.
    /// `q_lat: [T, H*R]` (q_nope·W_UK), `q_pe: [T, H*P]` (RoPE applied), `cache: [≥S, R+P]`
    /// rows `[c_kv | k_pe]`. Returns the latent output `[T, H*R]` = softmax(scale·(q_lat·c +
    /// q_pe·k_pe)) · c over `sel` (entries < 0 skipped).
    fn sparse_mla(
        &self,
        q_lat: &Self::Tensor,
        q_pe: &Self::Tensor,
        cache: &Self::Tensor,
        sel: &Self::Selection,
        scale: f32,
    ) -> OpResult<Self::Tensor>;
    /// [`Backend::sparse_mla`] then the per-head value projection `matmul_heads(·, w_uv)`
    /// (`w_uv [H, out, R]`) → `[T, H*out]`. A device may merge the projection into the
    /// attention's last kernel; the result equals the two ops exactly.
    fn sparse_mla_uv(
        &self,
        q_lat: &Self::Tensor,
        q_pe: &Self::Tensor,
        cache: &Self::Tensor,
        sel: &Self::Selection,
        scale: f32,
        w_uv: &Self::Weight,
    ) -> OpResult<Self::Tensor> {
        let o = self.sparse_mla(q_lat, q_pe, cache, sel, scale)?;
        self.matmul_heads(&o, w_uv)
    }

    /// Multi-head attention with grouped KV heads (GQA; MHA when `kv_heads == heads`):
    /// `q [T, heads*D]` (RoPE applied), caches `k [≥S, kv_heads*D]`, `v [≥S, kv_heads*Dv]`; query
    /// head `h` reads KV head `h / (heads / kv_heads)`. Row `t` attends to keys `0..=pos[t]`
    /// (`sel` = `None`: causal dense) or to its selected positions (`sel[t, :]`, entries < 0
    /// skipped: sparse, as DSA on a dense model). Returns `[T, heads*Dv]` = softmax(scale·q·kᵀ)·v
    /// in f32 arithmetic (zeros for a row with nothing to attend to).
    #[allow(clippy::too_many_arguments)]
    fn gqa_attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        heads: usize,
        kv_heads: usize,
        pos: &Positions<Self::PosData>,
        sel: Option<&Self::Selection>,
        scale: f32,
    ) -> OpResult<Self::Tensor>;

    // ---- FFN ----------------------------------------------------------------------------
    fn mlp(&self, x: &Self::Tensor, mlp: &Mlp<Self::Weight>) -> OpResult<Self::Tensor>;
    fn moe(&self, x: &Self::Tensor, moe: &Moe<Self::Weight, Self::Vector>) -> OpResult<Self::Tensor>;
    /// `residual += moe(x)` (the MoE block's output added to the residual stream): a device may
    /// fuse the add into the MoE's last kernel; the result equals `moe` then `add_inplace` exactly.
    fn moe_residual(
        &self,
        residual: &mut Self::Tensor,
        x: &Self::Tensor,
        moe: &Moe<Self::Weight, Self::Vector>,
    ) -> OpResult<()> {
        let y = self.moe(x, moe)?;
        self.add_inplace(residual, &y)
    }

    // ---- sampling -----------------------------------------------------------------------
    /// Greedy tokens: [`argmax`] of every row of `x [T, vocab]`, computed on the device: only `T`
    /// indices come back, not the logits.
    fn argmax_rows(&self, x: &Self::Tensor) -> OpResult<Vec<u32>> {
        let (rows, cols) = self.dims(x);
        let v = self.download(x)?;
        Ok((0..rows).map(|r| argmax(&v[r * cols..(r + 1) * cols])).collect())
    }

    // ---- loss ---------------------------------------------------------------------------
    /// Per-row negative log-likelihood `-log softmax(logits[t])[targets[t]]` of `[T, vocab]`
    /// logits, reduced on the device: only `T` numbers come back.
    fn nll(&self, logits: &Self::Tensor, targets: &[u32]) -> OpResult<Vec<f64>>;

    // ---- timing and memory --------------------------------------------------------------
    fn mark(&self) -> OpResult<Self::Mark>;
    /// Device time between two marks (waits for the later one).
    fn elapsed(&self, from: &Self::Mark, to: &Self::Mark) -> OpResult<Duration>;
    /// Wait for all queued work.
    fn synchronize(&self) -> OpResult<()>;
    fn memory(&self) -> MemoryStats;
    fn reset_peak_memory(&self);
    /// Start (`true`) or stop collection by an attached profiler (`cuProfilerStart/Stop` under
    /// Nsight Compute's `--profile-from-start off`); nothing elsewhere.
    fn profiler(&self, _on: bool) -> OpResult<()> {
        Ok(())
    }

    // ---- recorded steps -----------------------------------------------------------------
    /// Start recording: ops issued until [`Self::graph_end`] are recorded, not run. Returns
    /// `false` (and records nothing) where the backend cannot record. While recording, ops must
    /// not read results back to the host, and everything allocated must be freed before the end.
    fn graph_begin(&self) -> OpResult<bool> {
        Ok(false)
    }
    /// Stop recording and build the graph. Call after a `graph_begin` that returned `true`,
    /// also when an op failed in between (the recording is then discarded by the caller).
    fn graph_end(&self) -> OpResult<Self::Graph> {
        Err(OpError::new("graph_end", "", "this backend does not record graphs"))
    }
    /// Run a recorded graph once, reading its inputs (positions, input buffers) as they are now.
    fn graph_replay(&self, _g: &mut Self::Graph) -> OpResult<()> {
        Err(OpError::new("graph_replay", "", "this backend does not record graphs"))
    }
}
