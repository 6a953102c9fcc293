//! The op interface of the engine, and its CPU implementation.
//!
//! Model code is written once against [`Backend`]; the backend is chosen once at load time and
//! the model never branches on the device. Ops are "mid-level": the ones a GPU backend would fuse
//! (lightning-indexer scoring + top-k, sparse MLA attention, a whole MoE block) are single ops, so
//! each backend is free to implement them its own way.
//!
//! Dimension legend used throughout:
//! `T` query rows in this step, `S` cached key rows (positions `0..S`), `H` attention heads,
//! `R` = `kv_lora_rank` (the MLA latent), `P` = `qk_rope_head_dim`, `HI`/`D` indexer heads / head
//! dim, `K` = top-k row length.
//!
//! Every tensor is a row-major 2-D matrix `[rows, cols]`; multi-head data is packed head after
//! head inside a row (`[T, H*d]`).
//!
//! * [`cpu::CpuBackend`] — f32 compute, `gemm` + `rayon`; every fast kernel has a plain
//!   reference next to it in [`cpu::reference`] and is tested against it.

pub mod cpu;
mod rope;
mod topk;

pub use rope::{RopeLayout, RopeTable};
pub use topk::TopK;

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

/// A DeepSeek-V3 style MoE block: sigmoid router with `e_score_correction_bias`,
/// group-limited expert choice, normalised weights × `routed_scaling_factor`, shared experts.
#[derive(Debug)]
pub struct Moe<W> {
    /// Router weight `[E, hidden]` (kept f32, as transformers does).
    pub router: W,
    /// `e_score_correction_bias` `[E]`; biases the *choice* only, not the weights.
    pub score_bias: Vec<f32>,
    pub experts: Vec<Mlp<W>>,
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

/// The op interface. One implementation per device; all shapes are `[rows, cols]`.
///
/// Errors are not part of the signatures: shapes are validated when the model is loaded and
/// the cache is sized, so a shape mismatch inside an op is a bug (ops `debug_assert!` them).
pub trait Backend: Send + Sync {
    /// An activation matrix on the device.
    type Tensor: Send + Sync;
    /// A weight matrix `[out, in]` in the device's preferred format.
    type Weight: Send + Sync;

    fn name(&self) -> String;

    // ---- data movement -------------------------------------------------------------------
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Self::Tensor;
    fn download(&self, t: &Self::Tensor) -> Vec<f32>;
    fn dims(&self, t: &Self::Tensor) -> (usize, usize);
    fn zeros(&self, rows: usize, cols: usize) -> Self::Tensor;
    /// Convert a host f32 matrix `[rows, cols]` into a weight.
    fn weight(&self, data: Vec<f32>, rows: usize, cols: usize) -> Self::Weight;
    fn weight_dims(&self, w: &Self::Weight) -> (usize, usize);
    /// Copy of columns `start..start+len` of every row.
    fn columns(&self, x: &Self::Tensor, start: usize, len: usize) -> Self::Tensor;
    /// Copy of rows `start..start+len`.
    fn rows(&self, x: &Self::Tensor, start: usize, len: usize) -> Self::Tensor;
    /// Per-head column slice: from `[T, heads*stride]` take `offset..offset+len` of each head,
    /// packed into `[T, heads*len]`.
    fn head_columns(&self, x: &Self::Tensor, heads: usize, stride: usize, offset: usize, len: usize) -> Self::Tensor;
    /// `dst[row0 + i, col0 + j] = src[i, j]`.
    fn write_block(&self, dst: &mut Self::Tensor, row0: usize, col0: usize, src: &Self::Tensor);

    // ---- elementwise / norms -------------------------------------------------------------
    /// Gather rows of an embedding table.
    fn embedding(&self, table: &Self::Weight, ids: &[u32]) -> Self::Tensor;
    fn add_inplace(&self, x: &mut Self::Tensor, y: &Self::Tensor);
    fn scale_inplace(&self, x: &mut Self::Tensor, s: f32);
    /// `x * rsqrt(mean(x²) + eps) * w` per row.
    fn rms_norm(&self, x: &Self::Tensor, w: &[f32], eps: f32) -> Self::Tensor;
    /// `(x - mean) * rsqrt(var + eps) * w + b` per row (biased variance).
    fn layer_norm(&self, x: &Self::Tensor, w: &[f32], b: &[f32], eps: f32) -> Self::Tensor;
    /// Rotate the first `rot_dims` of each `head_dim`-wide head of every row in place; row `t`
    /// is at absolute position `positions[t]`.
    fn rope_inplace(
        &self,
        x: &mut Self::Tensor,
        head_dim: usize,
        rot_dims: usize,
        layout: RopeLayout,
        positions: &[usize],
        table: &RopeTable,
    );

    // ---- matmuls ------------------------------------------------------------------------
    /// `x [T, in] · wᵀ` → `[T, out]`.
    fn matmul_t(&self, x: &Self::Tensor, w: &Self::Weight) -> Self::Tensor;
    /// Per-head matmul: `x [T, H*in]`, `ws[h]: [out, in]` → `[T, H*out]`.
    fn matmul_heads(&self, x: &Self::Tensor, ws: &[Self::Weight]) -> Self::Tensor;

    // ---- DSA ----------------------------------------------------------------------------
    /// Lightning indexer + exact top-k. `q: [T, HI*D]` (RoPE applied), `head_w: [T, HI]`
    /// (already × HI^-½), `keys: [≥S, D]` (rows `0..=positions[t]` visible to row `t`).
    /// Score `I[t,s] = Σ_h head_w[t,h] · ReLU(scale · q[t,h]·k[s])`; keeps
    /// `min(topk, visible)` positions per row (ties → lower position), row length
    /// `K = min(topk, max visible)`, padded with -1.
    fn indexer_topk(
        &self,
        q: &Self::Tensor,
        head_w: &Self::Tensor,
        keys: &Self::Tensor,
        positions: &[usize],
        topk: usize,
        scale: f32,
    ) -> TopK;
    /// Sparse MLA attention in the absorbed (MQA) form over the selected positions only.
    /// `q_lat: [T, H*R]` (q_nope·W_UK), `q_pe: [T, H*P]` (RoPE applied), `cache: [≥S, R+P]`
    /// rows `[c_kv | k_pe]`. Returns the latent output `[T, H*R]` = softmax(scale·(q_lat·c +
    /// q_pe·k_pe)) · c over `sel` (entries < 0 skipped).
    fn sparse_mla(
        &self,
        q_lat: &Self::Tensor,
        q_pe: &Self::Tensor,
        cache: &Self::Tensor,
        sel: &TopK,
        scale: f32,
    ) -> Self::Tensor;

    // ---- FFN ----------------------------------------------------------------------------
    fn mlp(&self, x: &Self::Tensor, mlp: &Mlp<Self::Weight>) -> Self::Tensor;
    fn moe(&self, x: &Self::Tensor, moe: &Moe<Self::Weight>) -> Self::Tensor;
}
