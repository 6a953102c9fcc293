//! The model's weights, named exactly as in the HF checkpoints, and their loading.
//!
//! MLA's `kv_b_proj` is split per head at load into `W_UK` (keys) and `W_UV` (values) so
//! attention can run in the absorbed form over the cached latent.

use crate::error::ModelError;
use indexcache_config::{MlpKind, ModelConfig};
use indexcache_ops::{Backend, Mlp, Moe, MoeRouting};
use indexcache_weights::WeightStore;

/// Lightning indexer of one Full layer.
pub struct IndexerWeights<B: Backend> {
    /// `[HI*D, q_lora]` — on the MLA q latent.
    pub wq_b: B::Weight,
    /// `[D, hidden]`
    pub wk: B::Weight,
    /// LayerNorm `k_norm` weight and bias `[D]`.
    pub k_norm_w: Vec<f32>,
    pub k_norm_b: Vec<f32>,
    /// `[HI, hidden]`
    pub weights_proj: B::Weight,
}

/// Multi-head latent attention of one layer.
pub struct AttentionWeights<B: Backend> {
    /// `[q_lora, hidden]`
    pub q_a: B::Weight,
    pub q_a_norm: Vec<f32>,
    /// `[H*(nope+rope), q_lora]`
    pub q_b: B::Weight,
    /// `[R+P, hidden]`
    pub kv_a: B::Weight,
    pub kv_a_norm: Vec<f32>,
    /// Per head `[R, nope]`: `q_lat_h = q_nope_h · W_UK_hᵀ`... stored so that `matmul_heads`
    /// computes `q_nope_h [T, nope] → [T, R]`.
    pub w_uk: Vec<B::Weight>,
    /// Per head `[v, R]`: `o_h = o_lat_h [T, R] → [T, v]`.
    pub w_uv: Vec<B::Weight>,
    /// `[hidden, H*v]`
    pub o: B::Weight,
    /// `None` on layers whose indexer is not loaded (Shared layers, or absent in the checkpoint).
    pub indexer: Option<IndexerWeights<B>>,
}

pub enum FfnWeights<B: Backend> {
    Dense(Mlp<B::Weight>),
    Moe(Moe<B::Weight>),
}

pub struct LayerWeights<B: Backend> {
    pub input_norm: Vec<f32>,
    pub attn: AttentionWeights<B>,
    pub post_attn_norm: Vec<f32>,
    pub ffn: FfnWeights<B>,
}

pub struct ModelWeights<B: Backend> {
    pub embed: B::Weight,
    pub layers: Vec<LayerWeights<B>>,
    pub norm: Vec<f32>,
    /// `None` when `tie_word_embeddings` (the embedding matrix is used).
    pub lm_head: Option<B::Weight>,
}

/// Where weights come from: a checkpoint, or a seeded random generator (benchmarks of any
/// published config without downloading it).
pub trait WeightSource {
    /// Is this tensor present?
    fn has(&self, name: &str) -> bool;
    /// The tensor as f32 with exactly `shape`.
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError>;
}

/// A checkpoint on disk, with a progress callback per loaded tensor.
pub struct CheckpointSource<'a> {
    pub store: &'a WeightStore,
    pub on_tensor: &'a mut dyn FnMut(&str),
}

impl WeightSource for CheckpointSource<'_> {
    fn has(&self, name: &str) -> bool {
        self.store.contains(name)
    }
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let v = self.store.load_f32(name, shape)?;
        (self.on_tensor)(name);
        Ok(v)
    }
}

/// Seeded random weights at the config's real shapes: matrices ~ U(-a, a) with
/// a = 1/sqrt(fan_in), norms = 1, biases = 0. Indexers exist on every layer.
pub struct RandomSource {
    state: u64,
}

impl RandomSource {
    pub fn new(seed: u64) -> Self {
        Self { state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1 }
    }
    fn next_f32(&mut self) -> f32 {
        // xorshift64*: fast, deterministic, good enough for synthetic weights.
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        let v = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((v >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

impl WeightSource for RandomSource {
    fn has(&self, _name: &str) -> bool {
        true
    }
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let n: usize = shape.iter().product();
        if shape.len() == 1 {
            let fill = if name.ends_with(".bias") || name.ends_with("e_score_correction_bias") { 0.0 } else { 1.0 };
            return Ok(vec![fill; n]);
        }
        let a = 1.0 / (shape[1] as f32).sqrt();
        Ok((0..n).map(|_| self.next_f32() * a).collect())
    }
}

/// Which indexers to materialise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexerSelection {
    /// Only those of the layers that are Full in the given schedule (no memory for the rest).
    Full,
    /// Every indexer the checkpoint has (needed to evaluate several schedules, e.g. search).
    All,
}

pub(crate) fn load_weights<B: Backend>(
    b: &B,
    cfg: &ModelConfig,
    src: &mut dyn WeightSource,
    full_layers: &[bool],
    selection: IndexerSelection,
) -> Result<ModelWeights<B>, ModelError> {
    let hid = cfg.hidden_size;
    let embed = src.get("model.embed_tokens.weight", &[cfg.vocab_size, hid])?;
    let embed = b.weight(embed, cfg.vocab_size, hid);
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for (l, &full) in full_layers.iter().enumerate() {
        let want_indexer = match selection {
            IndexerSelection::Full => full,
            IndexerSelection::All => full || src.has(&format!("model.layers.{l}.self_attn.indexer.wk.weight")),
        };
        layers.push(load_layer(b, cfg, src, l, want_indexer)?);
    }
    let norm = src.get("model.norm.weight", &[hid])?;
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        Some(b.weight(src.get("lm_head.weight", &[cfg.vocab_size, hid])?, cfg.vocab_size, hid))
    };
    Ok(ModelWeights { embed, layers, norm, lm_head })
}

fn matrix<B: Backend>(
    b: &B,
    src: &mut dyn WeightSource,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<B::Weight, ModelError> {
    Ok(b.weight(src.get(name, &[rows, cols])?, rows, cols))
}

fn load_layer<B: Backend>(
    b: &B,
    cfg: &ModelConfig,
    src: &mut dyn WeightSource,
    l: usize,
    want_indexer: bool,
) -> Result<LayerWeights<B>, ModelError> {
    let p = format!("model.layers.{l}");
    let hid = cfg.hidden_size;
    let h = cfg.num_attention_heads;
    let (nope, rope, v, r) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
    let a = format!("{p}.self_attn");

    let indexer = if want_indexer {
        let ip = format!("{a}.indexer");
        let (hi, d) = (cfg.index_n_heads, cfg.index_head_dim);
        Some(IndexerWeights {
            wq_b: matrix(b, src, &format!("{ip}.wq_b.weight"), hi * d, cfg.q_lora_rank)?,
            wk: matrix(b, src, &format!("{ip}.wk.weight"), d, hid)?,
            k_norm_w: src.get(&format!("{ip}.k_norm.weight"), &[d])?,
            k_norm_b: src.get(&format!("{ip}.k_norm.bias"), &[d])?,
            weights_proj: matrix(b, src, &format!("{ip}.weights_proj.weight"), hi, hid)?,
        })
    } else {
        None
    };

    // kv_b_proj: [H*(nope+v), R]; head h rows [h*(nope+v), +nope) are W_UK_h, the next v are W_UV_h.
    let kv_b = src.get(&format!("{a}.kv_b_proj.weight"), &[h * (nope + v), r])?;
    let mut w_uk = Vec::with_capacity(h);
    let mut w_uv = Vec::with_capacity(h);
    for head in 0..h {
        let base = head * (nope + v);
        // W_UK_h is [nope, R]; store its transpose [R, nope] so q_lat = q_nope · (W_UKᵀ)ᵀ.
        let mut uk_t = vec![0.0f32; r * nope];
        for i in 0..nope {
            for j in 0..r {
                uk_t[j * nope + i] = kv_b[(base + i) * r + j];
            }
        }
        w_uk.push(b.weight(uk_t, r, nope));
        let uv = kv_b[(base + nope) * r..(base + nope + v) * r].to_vec();
        w_uv.push(b.weight(uv, v, r));
    }

    let attn = AttentionWeights {
        q_a: matrix(b, src, &format!("{a}.q_a_proj.weight"), cfg.q_lora_rank, hid)?,
        q_a_norm: src.get(&format!("{a}.q_a_layernorm.weight"), &[cfg.q_lora_rank])?,
        q_b: matrix(b, src, &format!("{a}.q_b_proj.weight"), h * (nope + rope), cfg.q_lora_rank)?,
        kv_a: matrix(b, src, &format!("{a}.kv_a_proj_with_mqa.weight"), r + rope, hid)?,
        kv_a_norm: src.get(&format!("{a}.kv_a_layernorm.weight"), &[r])?,
        w_uk,
        w_uv,
        o: matrix(b, src, &format!("{a}.o_proj.weight"), hid, h * v)?,
        indexer,
    };

    let ffn = match cfg.mlp_layer_types[l] {
        MlpKind::Dense => FfnWeights::Dense(load_mlp(b, src, &format!("{p}.mlp"), cfg.intermediate_size, hid)?),
        MlpKind::Moe => {
            let e = cfg.n_routed_experts;
            let mi = cfg.moe_intermediate_size;
            let router = matrix(b, src, &format!("{p}.mlp.gate.weight"), e, hid)?;
            let score_bias = src.get(&format!("{p}.mlp.gate.e_score_correction_bias"), &[e])?;
            let experts = load_experts(b, src, &format!("{p}.mlp.experts"), e, mi, hid)?;
            let shared = if cfg.n_shared_experts > 0 {
                Some(load_mlp(b, src, &format!("{p}.mlp.shared_experts"), mi * cfg.n_shared_experts, hid)?)
            } else {
                None
            };
            FfnWeights::Moe(Moe {
                router,
                score_bias,
                experts,
                shared,
                routing: MoeRouting {
                    n_group: cfg.n_group,
                    topk_group: cfg.topk_group,
                    top_k: cfg.num_experts_per_tok,
                    norm_topk_prob: cfg.norm_topk_prob,
                    routed_scaling_factor: cfg.routed_scaling_factor,
                },
            })
        }
    };

    Ok(LayerWeights {
        input_norm: src.get(&format!("{p}.input_layernorm.weight"), &[hid])?,
        attn,
        post_attn_norm: src.get(&format!("{p}.post_attention_layernorm.weight"), &[hid])?,
        ffn,
    })
}

fn load_mlp<B: Backend>(
    b: &B,
    src: &mut dyn WeightSource,
    prefix: &str,
    inter: usize,
    hid: usize,
) -> Result<Mlp<B::Weight>, ModelError> {
    Ok(Mlp {
        gate: matrix(b, src, &format!("{prefix}.gate_proj.weight"), inter, hid)?,
        up: matrix(b, src, &format!("{prefix}.up_proj.weight"), inter, hid)?,
        down: matrix(b, src, &format!("{prefix}.down_proj.weight"), hid, inter)?,
    })
}

/// Experts in the hub layout (`experts.{e}.{gate,up,down}_proj.weight`) or in transformers'
/// fused in-memory layout (`experts.gate_up_proj [E, 2I, hidden]`, `experts.down_proj [E, hidden, I]`).
fn load_experts<B: Backend>(
    b: &B,
    src: &mut dyn WeightSource,
    prefix: &str,
    n: usize,
    inter: usize,
    hid: usize,
) -> Result<Vec<Mlp<B::Weight>>, ModelError> {
    let fused = format!("{prefix}.gate_up_proj");
    if !src.has(&format!("{prefix}.0.gate_proj.weight")) && src.has(&fused) {
        let gate_up = src.get(&fused, &[n, 2 * inter, hid])?;
        let down = src.get(&format!("{prefix}.down_proj"), &[n, hid, inter])?;
        return Ok((0..n)
            .map(|e| {
                let gu = &gate_up[e * 2 * inter * hid..(e + 1) * 2 * inter * hid];
                Mlp {
                    gate: b.weight(gu[..inter * hid].to_vec(), inter, hid),
                    up: b.weight(gu[inter * hid..].to_vec(), inter, hid),
                    down: b.weight(down[e * hid * inter..(e + 1) * hid * inter].to_vec(), hid, inter),
                }
            })
            .collect());
    }
    (0..n).map(|e| load_mlp(b, src, &format!("{prefix}.{e}"), inter, hid)).collect()
}

/// Parameters of the model described by `cfg` (embedding, layers with an indexer on every
/// layer, final norm, LM head unless tied); MTP layers excluded.
pub fn parameter_count(cfg: &ModelConfig) -> u64 {
    let (hid, h) = (cfg.hidden_size as u64, cfg.num_attention_heads as u64);
    let (nope, rope, v, r) =
        (cfg.qk_nope_head_dim as u64, cfg.qk_rope_head_dim as u64, cfg.v_head_dim as u64, cfg.kv_lora_rank as u64);
    let ql = cfg.q_lora_rank as u64;
    let (hi, d) = (cfg.index_n_heads as u64, cfg.index_head_dim as u64);
    let attn = hid * ql + ql + ql * h * (nope + rope) + hid * (r + rope) + r + r * h * (nope + v) + h * v * hid;
    let indexer = ql * hi * d + hid * d + 2 * d + hi * hid;
    let mlp = |inter: u64| 3 * hid * inter;
    let mut total = cfg.vocab_size as u64 * hid + hid;
    if !cfg.tie_word_embeddings {
        total += cfg.vocab_size as u64 * hid;
    }
    for kind in &cfg.mlp_layer_types {
        total += 2 * hid + attn + indexer;
        total += match kind {
            MlpKind::Dense => mlp(cfg.intermediate_size as u64),
            MlpKind::Moe => {
                let e = cfg.n_routed_experts as u64;
                e * hid
                    + e
                    + e * mlp(cfg.moe_intermediate_size as u64)
                    + mlp(cfg.moe_intermediate_size as u64 * cfg.n_shared_experts as u64)
            }
        };
    }
    total
}
