//! Model configuration for DeepSeek Sparse Attention checkpoints, and the IndexCache schedule.
//!
//! Two stages, like candle's llama config: [`RawConfig`] mirrors `config.json` key for key
//! (every key optional, unknown keys ignored), and [`ModelConfig`] is the resolved, validated
//! form the engine uses — missing keys take the transformers 5.24 class defaults of the model
//! type (`DeepseekV32Config` / `GlmMoeDsaConfig` differ), no `Option`s left where transformers
//! has a default.
//!
//! * [`ModelConfig::from_file`] — parse + resolve `config.json` for `model_type`
//!   `deepseek_v32` or `glm_moe_dsa`; anything else is a [`ConfigError`] naming the key.
//! * [`RopeConfig::inv_freq`] / [`RopeConfig::attention_factor`] — the RoPE tables transformers
//!   builds (default or YaRN), and [`ModelConfig::softmax_scale`] with YaRN's mscale².
//! * [`IndexSchedule`] — per layer Full (runs its indexer) or Shared (reuses the top-k of the
//!   nearest preceding Full layer), resolved as transformers does:
//!   `indexer_types` > `index_topk_pattern` > `index_topk_freq` + `index_skip_topk_offset`,
//!   and overridable at run time by [`ScheduleOverride`].

mod config;
mod rope;
mod schedule;

pub use config::{
    Arch, ConfigError, Fp8Quant, LlamaIndexer, LlamaParams, MlpKind, ModelConfig, RawConfig, RopeConfig, RopeScaling,
    TokenIds,
};
pub use schedule::{IndexSchedule, LayerIndexer, ScheduleError, ScheduleOverride};
