//! `config.json` → [`ModelConfig`].
//!
//! [`RawConfig`] mirrors the file key for key with every field optional; [`ModelConfig::from_raw`]
//! fills the gaps with the transformers 5.24 defaults of the `model_type` (`DeepseekV32Config` /
//! `GlmMoeDsaConfig`, which differ in most sizes), resolves derived values (RoPE, softmax scale,
//! MLP layer kinds, IndexCache schedule) and rejects what the engine does not implement with an
//! error naming the offending key.

use crate::rope::{RopeInputs, resolve_rope, softmax_scale};
use crate::schedule::{IndexSchedule, ScheduleError};
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use std::path::Path;
use thiserror::Error;

/// Which model family (`model_type`) the config describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `deepseek_v32`: indexer RoPE half-split (NeoX) unless `indexer_rope_interleave` says otherwise.
    DeepseekV32,
    /// `glm_moe_dsa`: indexer RoPE interleaved.
    GlmMoeDsa,
    /// `llama`: a dense GQA model (read from a GGUF file, [`ModelConfig::llama`]), optionally
    /// with lightning indexers added (DSA on a dense model).
    Llama,
}

impl Arch {
    /// The `model_type` string of `config.json`, or `None` if it is not a supported one.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "deepseek_v32" => Some(Self::DeepseekV32),
            "glm_moe_dsa" => Some(Self::GlmMoeDsa),
            "llama" => Some(Self::Llama),
            _ => None,
        }
    }

    /// The `model_type` string of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::DeepseekV32 => "deepseek_v32",
            Self::GlmMoeDsa => "glm_moe_dsa",
            Self::Llama => "llama",
        }
    }

    /// Multi-head latent attention (the DSA models) rather than grouped-query attention.
    pub fn is_mla(self) -> bool {
        !matches!(self, Self::Llama)
    }

    /// transformers' class defaults for this model type (used for keys absent from config.json).
    fn defaults(self) -> ArchDefaults {
        match self {
            // DeepseekV32Config (transformers 5.24).
            Self::DeepseekV32 => ArchDefaults {
                vocab_size: 129_280,
                hidden_size: 7168,
                intermediate_size: 18_432,
                num_hidden_layers: 61,
                num_attention_heads: 128,
                num_key_value_heads: 128,
                q_lora_rank: 1536,
                qk_nope_head_dim: 128,
                v_head_dim: 128,
                n_group: 8,
                topk_group: 4,
                max_position_embeddings: 163_840,
                rms_norm_eps: 1e-6,
                index_n_heads: 64,
                indexer_rope_interleave: false,
            },
            // GlmMoeDsaConfig (transformers 5.24).
            Self::GlmMoeDsa => ArchDefaults {
                vocab_size: 154_880,
                hidden_size: 6144,
                intermediate_size: 12_288,
                num_hidden_layers: 78,
                num_attention_heads: 64,
                num_key_value_heads: 64,
                q_lora_rank: 2048,
                qk_nope_head_dim: 192,
                v_head_dim: 256,
                n_group: 1,
                topk_group: 1,
                max_position_embeddings: 202_752,
                rms_norm_eps: 1e-5,
                index_n_heads: 32,
                indexer_rope_interleave: true,
            },
            // LlamaConfig (transformers 5.24); MLA / MoE / indexer values unused.
            Self::Llama => ArchDefaults {
                vocab_size: 32_000,
                hidden_size: 4096,
                intermediate_size: 11_008,
                num_hidden_layers: 32,
                num_attention_heads: 32,
                num_key_value_heads: 32,
                q_lora_rank: 0,
                qk_nope_head_dim: 0,
                v_head_dim: 0,
                n_group: 1,
                topk_group: 1,
                max_position_embeddings: 2048,
                rms_norm_eps: 1e-6,
                index_n_heads: 0,
                indexer_rope_interleave: true,
            },
        }
    }
}

/// The transformers defaults that differ between the two model types. Defaults shared by both
/// (moe_intermediate_size 2048, kv_lora_rank 512, qk_rope_head_dim 64, 256 routed / 1 shared
/// experts, top-8, routed_scaling_factor 2.5, index_head_dim 128, index_topk 2048, bos 0, eos 1,
/// first_k_dense_replace 3, …) are written inline in [`ModelConfig::from_raw`].
struct ArchDefaults {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    q_lora_rank: usize,
    qk_nope_head_dim: usize,
    v_head_dim: usize,
    n_group: usize,
    topk_group: usize,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    index_n_heads: usize,
    /// Not a transformers field: transformers hard-codes the layout per model class.
    indexer_rope_interleave: bool,
}

/// The MLP of one decoder layer (`mlp_layer_types` entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpKind {
    /// SwiGLU with `intermediate_size`.
    Dense,
    /// Routed experts + shared experts.
    Moe,
}

/// RoPE frequency scaling, resolved.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq_i = theta^(-2i/dim)`.
    Default,
    /// YaRN (DeepSeek-V3.2: factor 40 over an original 4096 context).
    Yarn {
        /// Context extension factor (`factor`, or `max_position_embeddings / original` when null).
        factor: f64,
        /// Pre-extension context length.
        original_max_position_embeddings: usize,
        /// Ramp boundary for extrapolation (`beta_fast`, 32 when falsy).
        beta_fast: f64,
        /// Ramp boundary for interpolation (`beta_slow`, 1 when falsy).
        beta_slow: f64,
        /// Round the correction range outwards to whole dims (`truncate`, default true).
        truncate: bool,
        /// Multiplier on cos/sin (transformers' `attention_factor`), resolved.
        attention_factor: f64,
        /// `mscale_all_dim` (0 when absent); enters the softmax scale.
        mscale_all_dim: f64,
    },
}

/// The rotary embedding shared by MLA and the indexer. See [`RopeConfig::inv_freq`] and
/// [`RopeConfig::attention_factor`] for the tables built from it.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// Base wavelength (`rope_theta`).
    pub theta: f64,
    /// Rotary dims = `qk_rope_head_dim`.
    pub dim: usize,
    /// Frequency scaling.
    pub scaling: RopeScaling,
}

/// FP8 e4m3 block quantisation (`quantization_config.quant_method == "fp8"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8Quant {
    /// `weight_block_size` = [rows (out), cols (in)], usually [128, 128].
    pub block: [usize; 2],
}

/// `eos_token_id` / token-id fields, which HF writes either as one id or as a list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// `"eos_token_id": 1`.
    One(u32),
    /// `"eos_token_id": [154820, 154827, 154829]`.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// Distinguishes a missing key (`None`) from an explicit `null` (`Some(None)`), for keys whose
/// transformers default is not null (`bos_token_id`, `eos_token_id`, `q_lora_rank`).
fn present<'de, T: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// The raw `config.json`, keys verbatim. Every field is optional: a missing key (and, for most
/// keys, an explicit `null`) takes the model type's transformers default during
/// [`ModelConfig::from_raw`]. Keys not listed here are ignored.
///
/// Dicts whose semantics depend on Python truthiness or on missing-vs-null
/// (`rope_parameters`, `rope_scaling`, `quantization_config`, `index_topk_pattern`) are kept as
/// raw JSON values.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawConfig {
    /// `deepseek_v32` or `glm_moe_dsa`.
    pub model_type: Option<String>,
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    /// Dense-layer MLP width.
    pub intermediate_size: Option<usize>,
    /// Width of each routed and shared expert.
    pub moe_intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    /// Must equal `num_attention_heads` (MLA has no GQA).
    pub num_key_value_heads: Option<usize>,
    /// `Some(None)` is an explicit `null` (no q LoRA), which is unsupported.
    #[serde(default, deserialize_with = "present")]
    pub q_lora_rank: Option<Option<usize>>,
    pub kv_lora_rank: Option<usize>,
    pub qk_nope_head_dim: Option<usize>,
    pub qk_rope_head_dim: Option<usize>,
    pub v_head_dim: Option<usize>,
    pub n_routed_experts: Option<usize>,
    /// Backward-compatible alias: when set it replaces `n_routed_experts` (transformers).
    pub num_experts: Option<usize>,
    pub n_shared_experts: Option<usize>,
    pub num_experts_per_tok: Option<usize>,
    pub n_group: Option<usize>,
    pub topk_group: Option<usize>,
    pub norm_topk_prob: Option<bool>,
    pub routed_scaling_factor: Option<f64>,
    /// Must be `"sigmoid"` when present.
    pub scoring_func: Option<String>,
    /// Must be `"noaux_tc"` when present.
    pub topk_method: Option<String>,
    /// Number of leading dense layers when `mlp_layer_types` is absent (default 3).
    pub first_k_dense_replace: Option<usize>,
    /// Per layer `"dense"` / `"sparse"`.
    pub mlp_layer_types: Option<Vec<String>>,
    /// Legacy DeepSeek-V3 key; only 1 (every layer after the dense ones is MoE) is supported.
    pub moe_layer_freq: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub hidden_act: Option<String>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub rope_theta: Option<f64>,
    /// The current RoPE dict.
    pub rope_parameters: Option<Value>,
    /// The legacy RoPE dict; wins over `rope_parameters` when non-empty (as in transformers).
    pub rope_scaling: Option<Value>,
    pub partial_rotary_factor: Option<f64>,
    /// Top-level YaRN pre-extension length; transformers gives it priority over the dict's.
    pub original_max_position_embeddings: Option<usize>,
    pub max_position_embeddings: Option<usize>,
    pub index_n_heads: Option<usize>,
    pub index_head_dim: Option<usize>,
    pub index_topk: Option<usize>,
    /// Indexer RoPE layout; default false for deepseek_v32, true for glm_moe_dsa.
    pub indexer_rope_interleave: Option<bool>,
    /// Per layer `"full"` / `"shared"`; highest-precedence schedule key.
    pub indexer_types: Option<Vec<String>>,
    /// `"FSSF…"` string (or a list of `"full"`/`"shared"`); overrides freq/offset.
    pub index_topk_pattern: Option<Value>,
    /// Default 1 (every layer Full).
    pub index_topk_freq: Option<usize>,
    /// Default 2.
    pub index_skip_topk_offset: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    pub quantization_config: Option<Value>,
    /// Missing → 0 (transformers default); `null` → no BOS.
    #[serde(default, deserialize_with = "present")]
    pub bos_token_id: Option<Option<u32>>,
    /// Missing → `[1]` (transformers default); `null` → none.
    #[serde(default, deserialize_with = "present")]
    pub eos_token_id: Option<Option<TokenIds>>,
    /// MTP layers stored after the decoder layers (not run by the engine).
    pub num_nextn_predict_layers: Option<usize>,
}

/// The resolved, validated model configuration the engine uses.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub q_lora_rank: usize,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
    pub mlp_layer_types: Vec<MlpKind>,
    pub rms_norm_eps: f32,
    pub rope: RopeConfig,
    /// MLA softmax scale: `qk_head_dim^-0.5 · mscale²` (YaRN with `mscale_all_dim`).
    pub softmax_scale: f32,
    pub index_n_heads: usize,
    pub index_head_dim: usize,
    pub index_topk: usize,
    /// Indexer RoPE on interleaved pairs (2i, 2i+1) rather than half-split (i, i+d/2).
    pub indexer_rope_interleave: bool,
    pub tie_word_embeddings: bool,
    pub quantization: Option<Fp8Quant>,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The schedule the checkpoint's config declares.
    pub schedule: IndexSchedule,
    /// MTP layers in the checkpoint after the decoder layers (reported, not run). Default 0.
    pub num_nextn_predict_layers: usize,
    /// Grouped-query attention ([`Arch::Llama`]): key/value heads (= `num_attention_heads` for
    /// MLA models, where it is unused).
    pub num_key_value_heads: usize,
    /// Grouped-query attention: the q/k/v head dim (0 for MLA models).
    pub head_dim: usize,
    /// Grouped-query attention: RoPE on interleaved pairs (2i, 2i+1), as a GGUF's permuted q/k
    /// weights need; half-split (HF layout) otherwise.
    pub rope_interleave: bool,
}

/// The hyper-parameters of a llama model (read from GGUF metadata) and of the lightning
/// indexers added to it, for [`ModelConfig::llama`].
#[derive(Debug, Clone)]
pub struct LlamaParams {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub rope_interleave: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The indexers: heads, head dim (all of it rotated, with the model's RoPE), top-k, and the
    /// schedule they declare. `None`: a dense model without indexers.
    pub indexer: Option<LlamaIndexer>,
}

/// Lightning indexers on a dense model (see [`LlamaParams::indexer`]).
#[derive(Debug, Clone)]
pub struct LlamaIndexer {
    pub n_heads: usize,
    pub head_dim: usize,
    pub topk: usize,
    pub schedule: IndexSchedule,
}

/// Why `config.json` could not be turned into a [`ModelConfig`]. Every variant names where
/// (`origin`: the file, or what the caller passed) and, except `Io` / `Json`, which key.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read; the I/O error is the `source` (printed by error chains).
    #[error("{path}: cannot read config")]
    Io { path: String, source: std::io::Error },
    #[error("{origin}: malformed config.json: {message}")]
    Json { origin: String, message: String },
    #[error("{origin}: unsupported model_type {model_type:?} (supported: deepseek_v32, glm_moe_dsa)")]
    UnknownModelType { origin: String, model_type: String },
    #[error("{origin}: {key}: {message}")]
    Invalid { origin: String, key: String, message: String },
    #[error("{origin}: {key}: unsupported: {message}")]
    Unsupported { origin: String, key: String, message: String },
    /// A schedule key is malformed. When it comes from `config.json`, `origin` is
    /// `"<file>: <key>"` (e.g. `config.json: index_topk_pattern`) so the message names the key.
    #[error("{origin}: schedule: {source}")]
    Schedule { origin: String, source: crate::schedule::ScheduleError },
}

/// Builds the errors of one resolution pass, all tagged with the same origin.
struct Errs<'a> {
    origin: &'a str,
}

impl Errs<'_> {
    fn invalid(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { origin: self.origin.to_string(), key: key.into(), message: message.into() }
    }

    fn unsupported(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Unsupported { origin: self.origin.to_string(), key: key.into(), message: message.into() }
    }

    fn schedule(&self, key: &str, source: ScheduleError) -> ConfigError {
        ConfigError::Schedule { origin: format!("{}: {key}", self.origin), source }
    }

    /// Rejects a zero size.
    fn nonzero(&self, key: &str, value: usize) -> Result<usize, ConfigError> {
        if value == 0 { Err(self.invalid(key, "must be > 0, got 0")) } else { Ok(value) }
    }
}

impl ModelConfig {
    /// Reads and resolves a `config.json`. I/O errors name the path; all other errors name
    /// the path as their origin.
    pub fn from_file(path: &Path) -> Result<ModelConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Io { path: path.display().to_string(), source })?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses and resolves `config.json` text; `origin` (a path or a label) prefixes every error.
    /// Malformed JSON and wrong value types give [`ConfigError::Json`] with serde's message,
    /// which includes line and column.
    pub fn from_json_str(json: &str, origin: &str) -> Result<ModelConfig, ConfigError> {
        let raw: RawConfig = serde_json::from_str(json)
            .map_err(|e| ConfigError::Json { origin: origin.to_string(), message: e.to_string() })?;
        Self::from_raw(&raw, origin)
    }

    /// `qk_nope_head_dim + qk_rope_head_dim` (192 for DeepSeek-V3.2, 256 for GLM-5).
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Resolves a parsed [`RawConfig`]: transformers defaults for missing keys, derived values,
    /// and validation (see the crate docs for the rules).
    pub fn from_raw(raw: &RawConfig, origin: &str) -> Result<ModelConfig, ConfigError> {
        let e = Errs { origin };

        let model_type = raw
            .model_type
            .as_deref()
            .ok_or_else(|| e.invalid("model_type", "missing (expected \"deepseek_v32\" or \"glm_moe_dsa\")"))?;
        let arch = Arch::from_model_type(model_type).ok_or_else(|| ConfigError::UnknownModelType {
            origin: origin.to_string(),
            model_type: model_type.to_string(),
        })?;
        if arch == Arch::Llama {
            return Err(e.unsupported(
                "model_type",
                "\"llama\" is read from its GGUF file (`-m model.gguf`, or a model directory whose config names one)",
            ));
        }
        let d = arch.defaults();

        reject_unsupported(raw, &e)?;

        let q_lora_rank = match raw.q_lora_rank {
            None => d.q_lora_rank,
            Some(Some(r)) => r,
            Some(None) => {
                return Err(e.unsupported("q_lora_rank", "null (a full-rank q projection is not supported)"));
            }
        };

        let num_hidden_layers = e.nonzero("num_hidden_layers", raw.num_hidden_layers.unwrap_or(d.num_hidden_layers))?;
        let num_attention_heads =
            e.nonzero("num_attention_heads", raw.num_attention_heads.unwrap_or(d.num_attention_heads))?;
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(d.num_key_value_heads);
        if num_key_value_heads != num_attention_heads {
            let how = if raw.num_key_value_heads.is_some() { "" } else { ", the transformers default when absent" };
            return Err(e.unsupported(
                "num_key_value_heads",
                format!("{num_key_value_heads}{how} != num_attention_heads {num_attention_heads} (MLA needs one KV head per head)"),
            ));
        }

        let vocab_size = e.nonzero("vocab_size", raw.vocab_size.unwrap_or(d.vocab_size))?;
        let hidden_size = e.nonzero("hidden_size", raw.hidden_size.unwrap_or(d.hidden_size))?;
        let intermediate_size = e.nonzero("intermediate_size", raw.intermediate_size.unwrap_or(d.intermediate_size))?;
        let moe_intermediate_size = e.nonzero("moe_intermediate_size", raw.moe_intermediate_size.unwrap_or(2048))?;
        let q_lora_rank = e.nonzero("q_lora_rank", q_lora_rank)?;
        let kv_lora_rank = e.nonzero("kv_lora_rank", raw.kv_lora_rank.unwrap_or(512))?;
        let qk_nope_head_dim = e.nonzero("qk_nope_head_dim", raw.qk_nope_head_dim.unwrap_or(d.qk_nope_head_dim))?;
        let qk_rope_head_dim = e.nonzero("qk_rope_head_dim", raw.qk_rope_head_dim.unwrap_or(64))?;
        let v_head_dim = e.nonzero("v_head_dim", raw.v_head_dim.unwrap_or(d.v_head_dim))?;
        let max_position_embeddings =
            e.nonzero("max_position_embeddings", raw.max_position_embeddings.unwrap_or(d.max_position_embeddings))?;
        let index_n_heads = e.nonzero("index_n_heads", raw.index_n_heads.unwrap_or(d.index_n_heads))?;
        let index_head_dim = e.nonzero("index_head_dim", raw.index_head_dim.unwrap_or(128))?;
        let index_topk = e.nonzero("index_topk", raw.index_topk.unwrap_or(2048))?;

        // RoPE rotates (x_2i, x_2i+1) / (x_i, x_i+d/2) pairs.
        if qk_rope_head_dim % 2 != 0 {
            return Err(e.invalid("qk_rope_head_dim", format!("must be even, got {qk_rope_head_dim}")));
        }
        // The indexer ropes the first qk_rope_head_dim dims of each index head.
        if index_head_dim < qk_rope_head_dim {
            return Err(e.invalid(
                "index_head_dim",
                format!("{index_head_dim} is smaller than qk_rope_head_dim {qk_rope_head_dim}"),
            ));
        }

        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(d.rms_norm_eps);
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
            return Err(e.invalid("rms_norm_eps", format!("must be a finite number > 0, got {rms_norm_eps}")));
        }
        let routed_scaling_factor = raw.routed_scaling_factor.unwrap_or(2.5);
        if !routed_scaling_factor.is_finite() {
            return Err(e.invalid("routed_scaling_factor", format!("must be finite, got {routed_scaling_factor}")));
        }

        let mlp_layer_types = resolve_mlp_layer_types(raw, num_hidden_layers, &e)?;
        let has_moe = mlp_layer_types.contains(&MlpKind::Moe);

        let Routing { n_routed_experts, n_shared_experts, num_experts_per_tok, n_group, topk_group } =
            resolve_routing(raw, &d, has_moe, &e)?;

        let rope = resolve_rope(&RopeInputs {
            origin,
            rope_scaling: raw.rope_scaling.as_ref(),
            rope_parameters: raw.rope_parameters.as_ref(),
            rope_theta: raw.rope_theta,
            partial_rotary_factor: raw.partial_rotary_factor,
            original_max_position_embeddings: raw.original_max_position_embeddings,
            max_position_embeddings,
            dim: qk_rope_head_dim,
        })?;
        let softmax_scale = softmax_scale(qk_nope_head_dim + qk_rope_head_dim, &rope);

        let quantization = resolve_quantization(raw.quantization_config.as_ref(), &e)?;
        let schedule = resolve_schedule(raw, num_hidden_layers, &e)?;

        let bos_token_id = raw.bos_token_id.unwrap_or(Some(0));
        let eos_token_ids = match &raw.eos_token_id {
            None => vec![1],
            Some(None) => Vec::new(),
            Some(Some(ids)) => ids.to_vec(),
        };

        Ok(ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size,
            moe_intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            q_lora_rank,
            kv_lora_rank,
            qk_nope_head_dim,
            qk_rope_head_dim,
            v_head_dim,
            n_routed_experts,
            n_shared_experts,
            num_experts_per_tok,
            n_group,
            topk_group,
            norm_topk_prob: raw.norm_topk_prob.unwrap_or(true),
            routed_scaling_factor: routed_scaling_factor as f32,
            mlp_layer_types,
            rms_norm_eps: rms_norm_eps as f32,
            rope,
            softmax_scale,
            index_n_heads,
            index_head_dim,
            index_topk,
            indexer_rope_interleave: raw.indexer_rope_interleave.unwrap_or(d.indexer_rope_interleave),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            quantization,
            max_position_embeddings,
            bos_token_id,
            eos_token_ids,
            schedule,
            num_nextn_predict_layers: raw.num_nextn_predict_layers.unwrap_or(0),
            num_key_value_heads: num_attention_heads,
            head_dim: 0,
            rope_interleave: false,
        })
    }

    /// A dense llama model (GQA, SwiGLU, RMSNorm, plain RoPE over the whole head), with the
    /// lightning indexers of `p.indexer` if any. `origin` names where the values come from (the
    /// GGUF file) in errors.
    pub fn llama(p: &LlamaParams, origin: &str) -> Result<ModelConfig, ConfigError> {
        let e = Errs { origin };
        let hidden_size = e.nonzero("hidden_size", p.hidden_size)?;
        let num_hidden_layers = e.nonzero("num_hidden_layers", p.num_hidden_layers)?;
        let heads = e.nonzero("num_attention_heads", p.num_attention_heads)?;
        let kv_heads = e.nonzero("num_key_value_heads", p.num_key_value_heads)?;
        let head_dim = e.nonzero("head_dim", p.head_dim)?;
        e.nonzero("vocab_size", p.vocab_size)?;
        e.nonzero("intermediate_size", p.intermediate_size)?;
        if !heads.is_multiple_of(kv_heads) {
            return Err(
                e.invalid("num_key_value_heads", format!("{kv_heads} does not divide num_attention_heads {heads}"))
            );
        }
        if !head_dim.is_multiple_of(2) {
            return Err(e.invalid("head_dim", format!("{head_dim} is odd; RoPE rotates pairs")));
        }
        if p.rope_theta.is_nan() || p.rope_theta <= 0.0 {
            return Err(e.invalid("rope_theta", format!("{} (must be > 0)", p.rope_theta)));
        }
        let rope = RopeConfig { theta: p.rope_theta, dim: head_dim, scaling: RopeScaling::Default };
        let (index_n_heads, index_head_dim, index_topk, schedule) = match &p.indexer {
            Some(ix) => {
                if ix.head_dim != head_dim {
                    return Err(e.invalid(
                        "index_head_dim",
                        format!(
                            "{} must equal the model's head_dim {head_dim} (the indexer shares its RoPE)",
                            ix.head_dim
                        ),
                    ));
                }
                e.nonzero("index_n_heads", ix.n_heads)?;
                e.nonzero("index_topk", ix.topk)?;
                if ix.schedule.len() != num_hidden_layers {
                    return Err(e.invalid(
                        "index_topk_pattern",
                        format!("{} layers for a {num_hidden_layers}-layer model", ix.schedule.len()),
                    ));
                }
                (ix.n_heads, ix.head_dim, ix.topk, ix.schedule.clone())
            }
            None => (0, 0, 0, IndexSchedule::all_full(num_hidden_layers)),
        };
        Ok(ModelConfig {
            arch: Arch::Llama,
            vocab_size: p.vocab_size,
            hidden_size,
            intermediate_size: p.intermediate_size,
            moe_intermediate_size: 0,
            num_hidden_layers,
            num_attention_heads: heads,
            q_lora_rank: 0,
            kv_lora_rank: 0,
            qk_nope_head_dim: 0,
            qk_rope_head_dim: head_dim,
            v_head_dim: head_dim,
            n_routed_experts: 0,
            n_shared_experts: 0,
            num_experts_per_tok: 0,
            n_group: 1,
            topk_group: 1,
            norm_topk_prob: false,
            routed_scaling_factor: 1.0,
            mlp_layer_types: vec![MlpKind::Dense; num_hidden_layers],
            rms_norm_eps: p.rms_norm_eps,
            softmax_scale: (head_dim as f64).powf(-0.5) as f32,
            rope,
            index_n_heads,
            index_head_dim,
            index_topk,
            indexer_rope_interleave: p.rope_interleave,
            tie_word_embeddings: p.tie_word_embeddings,
            quantization: None,
            max_position_embeddings: p.max_position_embeddings,
            bos_token_id: p.bos_token_id,
            eos_token_ids: p.eos_token_ids.clone(),
            schedule,
            num_nextn_predict_layers: 0,
            num_key_value_heads: kv_heads,
            head_dim,
            rope_interleave: p.rope_interleave,
        })
    }
}

/// `quantization_config`: absent / null → BF16 weights; `fp8` e4m3 with block scales → [`Fp8Quant`].
fn resolve_quantization(value: Option<&Value>, e: &Errs<'_>) -> Result<Option<Fp8Quant>, ConfigError> {
    let map = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(m)) => m,
        Some(other) => {
            return Err(e.invalid("quantization_config", format!("expected an object, got {other}")));
        }
    };
    match map.get("quant_method") {
        Some(Value::String(m)) if m == "fp8" => {}
        Some(Value::String(m)) => {
            return Err(e.unsupported(
                "quantization_config.quant_method",
                format!("{m:?} (only \"fp8\" block quantisation is supported)"),
            ));
        }
        None | Some(Value::Null) => {
            return Err(e.invalid("quantization_config.quant_method", "missing"));
        }
        Some(other) => {
            return Err(e.invalid("quantization_config.quant_method", format!("expected a string, got {other}")));
        }
    }
    match map.get("fmt") {
        None | Some(Value::Null) => {}
        Some(Value::String(f)) if f == "e4m3" => {}
        Some(Value::String(f)) => {
            return Err(e.unsupported("quantization_config.fmt", format!("{f:?} (only \"e4m3\" is supported)")));
        }
        Some(other) => {
            return Err(e.invalid("quantization_config.fmt", format!("expected a string, got {other}")));
        }
    }
    let key = "quantization_config.weight_block_size";
    let block = match map.get("weight_block_size") {
        None => [128, 128],
        Some(Value::Null) => {
            return Err(e.unsupported(key, "null (per-tensor FP8 scales; only block scales are supported)"));
        }
        Some(Value::Array(items)) => {
            let dims: Option<Vec<usize>> =
                items.iter().map(|v| v.as_u64().and_then(|x| usize::try_from(x).ok()).filter(|&x| x > 0)).collect();
            match dims.as_deref() {
                Some(&[rows, cols]) => [rows, cols],
                _ => {
                    return Err(e.invalid(
                        key,
                        format!("expected [rows, cols] of two positive integers, got {}", Value::Array(items.clone())),
                    ));
                }
            }
        }
        Some(other) => return Err(e.invalid(key, format!("expected [rows, cols], got {other}"))),
    };
    // `activation_scheme` ("dynamic") and `scale_fmt` ("ue8m0") are accepted and ignored: the
    // engine dequantises FP8 weights at load and keeps activations in f32 (CPU) or bf16 (GPU).
    Ok(Some(Fp8Quant { block }))
}

/// Options the engine does not implement (transformers would build a different model).
fn reject_unsupported(raw: &RawConfig, e: &Errs<'_>) -> Result<(), ConfigError> {
    if let Some(act) = &raw.hidden_act
        && act != "silu"
    {
        return Err(e.unsupported("hidden_act", format!("{act:?} (only \"silu\" is supported)")));
    }
    if raw.attention_bias == Some(true) {
        return Err(e.unsupported("attention_bias", "true (attention projections have no bias)"));
    }
    if raw.mlp_bias == Some(true) {
        return Err(e.unsupported("mlp_bias", "true (MLP projections have no bias)"));
    }
    if let Some(f) = &raw.scoring_func
        && f != "sigmoid"
    {
        return Err(e.unsupported("scoring_func", format!("{f:?} (only \"sigmoid\" is supported)")));
    }
    if let Some(m) = &raw.topk_method
        && m != "noaux_tc"
    {
        return Err(e.unsupported("topk_method", format!("{m:?} (only \"noaux_tc\" is supported)")));
    }
    if let Some(freq) = raw.moe_layer_freq
        && freq != 1
    {
        return Err(e.unsupported("moe_layer_freq", format!("{freq} (only 1 is supported)")));
    }
    Ok(())
}

/// MLP layer kinds: the explicit `mlp_layer_types` list, else the first `first_k_dense_replace`
/// layers dense and the rest MoE.
fn resolve_mlp_layer_types(raw: &RawConfig, n_layers: usize, e: &Errs<'_>) -> Result<Vec<MlpKind>, ConfigError> {
    let Some(types) = &raw.mlp_layer_types else {
        let n_dense = raw.first_k_dense_replace.unwrap_or(3).min(n_layers);
        let mut kinds = vec![MlpKind::Dense; n_dense];
        kinds.resize(n_layers, MlpKind::Moe);
        return Ok(kinds);
    };
    if types.len() != n_layers {
        return Err(
            e.invalid("mlp_layer_types", format!("has {} entries but num_hidden_layers is {n_layers}", types.len()))
        );
    }
    types
        .iter()
        .enumerate()
        .map(|(i, t)| match t.as_str() {
            "dense" => Ok(MlpKind::Dense),
            "sparse" => Ok(MlpKind::Moe),
            other => Err(e.invalid(
                "mlp_layer_types",
                format!("invalid entry {other:?} at layer {i} (expected \"dense\" or \"sparse\")"),
            )),
        })
        .collect()
}

/// The MoE's expert counts and grouped routing (`resolve_routing`).
struct Routing {
    n_routed_experts: usize,
    n_shared_experts: usize,
    num_experts_per_tok: usize,
    n_group: usize,
    topk_group: usize,
}

/// MoE routing: n_group groups of experts, the best topk_group groups (scored by the sum of
/// their top-2 experts), then num_experts_per_tok experts among those groups. `has_moe`: a model
/// with no MoE layer may leave groups of one expert.
fn resolve_routing(raw: &RawConfig, d: &ArchDefaults, has_moe: bool, e: &Errs<'_>) -> Result<Routing, ConfigError> {
    let n_routed_experts = e.nonzero("n_routed_experts", raw.num_experts.or(raw.n_routed_experts).unwrap_or(256))?;
    let n_routed_key = if raw.num_experts.is_some() { "num_experts" } else { "n_routed_experts" };
    let n_shared_experts = raw.n_shared_experts.unwrap_or(1);
    let num_experts_per_tok = e.nonzero("num_experts_per_tok", raw.num_experts_per_tok.unwrap_or(8))?;
    let n_group = e.nonzero("n_group", raw.n_group.unwrap_or(d.n_group))?;
    let topk_group = raw.topk_group.unwrap_or(d.topk_group);
    if n_routed_experts % n_group != 0 {
        return Err(
            e.invalid("n_group", format!("{n_routed_key} {n_routed_experts} is not divisible by n_group {n_group}"))
        );
    }
    if topk_group == 0 || topk_group > n_group {
        return Err(e.invalid("topk_group", format!("must be in 1..={n_group} (n_group), got {topk_group}")));
    }
    let per_group = n_routed_experts / n_group;
    if num_experts_per_tok > topk_group * per_group {
        return Err(e.invalid(
            "num_experts_per_tok",
            format!(
                "{num_experts_per_tok} exceeds the {} experts in topk_group {topk_group} groups of {per_group}",
                topk_group * per_group
            ),
        ));
    }
    if has_moe && per_group < 2 {
        return Err(e.invalid(
            "n_group",
            format!(
                "{n_routed_key} {n_routed_experts} / n_group {n_group} leaves {per_group} expert per group; \
                 the router scores each group by its top-2 experts"
            ),
        ));
    }
    Ok(Routing { n_routed_experts, n_shared_experts, num_experts_per_tok, n_group, topk_group })
}

/// The checkpoint's schedule, by transformers' precedence:
/// `indexer_types` > `index_topk_pattern` > `index_topk_freq` + `index_skip_topk_offset`.
fn resolve_schedule(raw: &RawConfig, n_layers: usize, e: &Errs<'_>) -> Result<IndexSchedule, ConfigError> {
    if let Some(types) = &raw.indexer_types {
        return IndexSchedule::from_indexer_types(types, n_layers).map_err(|s| e.schedule("indexer_types", s));
    }
    let key = "index_topk_pattern";
    match &raw.index_topk_pattern {
        None | Some(Value::Null) => {}
        Some(Value::String(p)) => {
            return IndexSchedule::from_pattern(p, n_layers).map_err(|s| e.schedule(key, s));
        }
        // transformers also takes a list, used as `indexer_types` verbatim.
        Some(Value::Array(items)) => {
            let types = items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| e.invalid(key, "expected a string of F/S or a list of \"full\"/\"shared\""))?;
            return IndexSchedule::from_indexer_types(&types, n_layers).map_err(|s| e.schedule(key, s));
        }
        Some(other) => {
            return Err(
                e.invalid(key, format!("expected a string of F/S or a list of \"full\"/\"shared\", got {other}"))
            );
        }
    }
    let freq = raw.index_topk_freq.unwrap_or(1);
    let offset = raw.index_skip_topk_offset.unwrap_or(2);
    IndexSchedule::from_freq_offset(freq, offset, n_layers).map_err(|s| e.schedule("index_skip_topk_offset", s))
}
