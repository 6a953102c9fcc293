//! Per-sequence state: the MLA latent cache of every layer and the indexer-key cache of Full
//! layers only, preallocated for a fixed capacity and a fixed schedule.
//!
//! **What is cached.** Each layer stores, per token, the *absorbed* MLA form: the normalised
//! latent `c_kv` (`R` = `kv_lora_rank`) followed by the RoPE'd shared key `k_pe` (`P`), i.e.
//! `R+P` numbers (576 for DeepSeek-V3.2 / GLM-5). That is what sparse kernels (FlashMLA) gather
//! per selected position — one row shared by all heads — and it is `2·H·(nope+v)/(R+P)`× smaller
//! than expanded K/V (≈ 57× for DeepSeek-V3.2). Queries are absorbed instead (`q_nope·W_UK`).
//! A grouped-query (llama) layer caches its RoPE'd keys and its values, `Hkv·D` each.
//!
//! **IndexCache.** Only Full layers own an indexer-key cache (`D` per token). The schedule is
//! fixed for the life of the cache: a Shared layer has no keys to fall back on.

use crate::error::ModelError;
use indexcache_config::{IndexSchedule, ModelConfig};
use indexcache_ops::{Backend, Positions, RopeTable};

/// What a layer caches per token for its attention.
pub enum LayerKv<B: Backend> {
    /// MLA: `[capacity, R+P]`, rows `[c_kv | k_pe]`.
    Latent(B::Tensor),
    /// Grouped-query attention: keys (RoPE applied) and values, `[capacity, Hkv*D]` each.
    Gqa { k: B::Tensor, v: B::Tensor },
}

pub struct LayerCache<B: Backend> {
    pub kv: LayerKv<B>,
    /// `[capacity, D]` on Full layers; `None` on Shared layers (and under dense attention).
    pub index_keys: Option<B::Tensor>,
}

/// A recorded one-token decode step over this cache (a CUDA graph): replayed with a new token
/// and position instead of issuing every op again. See `DsaModel::forward`.
pub(crate) struct StepGraph<B: Backend> {
    pub graph: B::Graph,
    /// Launch shapes cover positions `< bound`; a later position records a new step.
    pub bound: usize,
    /// The step's position (updated in place before each replay).
    pub positions: Positions<B::PosData>,
    /// Input: the token's embedding `[1, hidden]` (written before each replay).
    pub x: B::Tensor,
    /// Output: the logits `[1, vocab]`.
    pub logits: B::Tensor,
    /// The model (and its indexer numerics) the step was recorded for.
    pub key: (u64, bool),
}

pub struct Cache<B: Backend> {
    pub(crate) schedule: IndexSchedule,
    pub(crate) layers: Vec<LayerCache<B>>,
    /// cos/sin for positions `0..capacity`, on the device.
    pub(crate) rope: B::Rope,
    /// The recorded decode step, once one was recorded.
    pub(crate) step: Option<StepGraph<B>>,
    /// Recording failed once on this cache: decode runs op by op.
    pub(crate) step_failed: bool,
    /// Decode steps recorded over this cache so far.
    pub(crate) step_recordings: usize,
    len: usize,
    capacity: usize,
}

impl<B: Backend> Cache<B> {
    pub(crate) fn new(
        b: &B,
        cfg: &ModelConfig,
        schedule: IndexSchedule,
        capacity: usize,
        index_keys: bool,
    ) -> Result<Self, ModelError> {
        if capacity > cfg.max_position_embeddings {
            return Err(ModelError::ContextTooLong {
                needed: capacity,
                limit: cfg.max_position_embeddings,
                what: "model's max_position_embeddings",
            });
        }
        let width = cfg.kv_lora_rank + cfg.qk_rope_head_dim;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let cache_err = |e| ModelError::Cache { layer: l, capacity, source: e };
            let kv = match cfg.arch.is_mla() {
                true => LayerKv::Latent(b.zeros(capacity, width).map_err(cache_err)?),
                false => {
                    let w = cfg.num_key_value_heads * cfg.head_dim;
                    LayerKv::Gqa {
                        k: b.zeros(capacity, w).map_err(cache_err)?,
                        v: b.zeros(capacity, w).map_err(cache_err)?,
                    }
                }
            };
            let index_keys = match index_keys && schedule.is_full(l) {
                true => Some(b.zeros(capacity, cfg.index_head_dim).map_err(cache_err)?),
                false => None,
            };
            layers.push(LayerCache { kv, index_keys });
        }
        let table = RopeTable::new(&cfg.rope.inv_freq(), cfg.rope.attention_factor(), capacity);
        let rope = b.rope_table(&table)?;
        Ok(Self { schedule, layers, rope, step: None, step_failed: false, step_recordings: 0, len: 0, capacity })
    }

    /// Tokens cached so far (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn schedule(&self) -> &IndexSchedule {
        &self.schedule
    }

    /// How many times a decode step was recorded (as a CUDA graph) over this cache; 0 where the
    /// backend does not record.
    pub fn step_recordings(&self) -> usize {
        self.step_recordings
    }

    /// Forget all tokens (keeps the allocation).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Roll back to `len` tokens (e.g. to re-run a suffix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

/// Cache bytes per token for a schedule, in two storage formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheBytes {
    /// This engine's cache in f32 (the CPU, and the GPU's exact mode); half of it in bf16.
    pub engine_f32: usize,
    /// The production layout (FlashMLA FP8 latent 656 B + DeepGEMM FP8 indexer key 132 B, for
    /// R=512,P=64,D=128; generalised as R + 4·R/128 + 2·P and D + 4).
    pub production_fp8: usize,
}

pub fn cache_bytes_per_token(cfg: &ModelConfig, schedule: &IndexSchedule) -> CacheBytes {
    let (r, p, d) = (cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim);
    let layers = cfg.num_hidden_layers;
    let full = if cfg.index_n_heads > 0 { schedule.num_full() } else { 0 };
    if !cfg.arch.is_mla() {
        // K and V of every KV head; the FP8 layout stores them as e4m3 (+ the indexer key).
        let kv = 2 * cfg.num_key_value_heads * cfg.head_dim;
        return CacheBytes { engine_f32: 4 * (kv * layers + d * full), production_fp8: kv * layers + (d + 4) * full };
    }
    CacheBytes {
        engine_f32: 4 * ((r + p) * layers + d * full),
        production_fp8: (r + 4 * r.div_ceil(128) + 2 * p) * layers + (d + 4) * full,
    }
}
