//! Realistic `config.json` files (values from the published DeepSeek-V3.2 and GLM-5 configs)
//! resolve to the numbers the engine needs, and transformers' defaults and RoPE tables are
//! reproduced.

use indexcache_config::{Arch, Fp8Quant, IndexSchedule, LayerIndexer, MlpKind, ModelConfig, RopeScaling};

/// deepseek-ai/DeepSeek-V3.2 `config.json` (legacy `rope_scaling` + top-level `rope_theta`,
/// FP8 e4m3 block quantisation, plus keys the engine ignores).
const DEEPSEEK_V32: &str = r#"{
  "architectures": ["DeepseekV32ForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 0,
  "eos_token_id": 1,
  "ep_size": 1,
  "first_k_dense_replace": 3,
  "hidden_act": "silu",
  "hidden_size": 7168,
  "index_head_dim": 128,
  "index_n_heads": 64,
  "index_topk": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 18432,
  "kv_lora_rank": 512,
  "max_position_embeddings": 163840,
  "model_type": "deepseek_v32",
  "moe_intermediate_size": 2048,
  "moe_layer_freq": 1,
  "n_group": 8,
  "n_routed_experts": 256,
  "n_shared_experts": 1,
  "norm_topk_prob": true,
  "num_attention_heads": 128,
  "num_experts_per_tok": 8,
  "num_hidden_layers": 61,
  "num_key_value_heads": 128,
  "num_nextn_predict_layers": 1,
  "q_lora_rank": 1536,
  "qk_nope_head_dim": 128,
  "qk_rope_head_dim": 64,
  "quantization_config": {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "scale_fmt": "ue8m0",
    "weight_block_size": [128, 128]
  },
  "rms_norm_eps": 1e-06,
  "rope_scaling": {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 40,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096,
    "type": "yarn"
  },
  "rope_theta": 10000,
  "routed_scaling_factor": 2.5,
  "scoring_func": "sigmoid",
  "tie_word_embeddings": false,
  "topk_group": 4,
  "topk_method": "noaux_tc",
  "torch_dtype": "bfloat16",
  "transformers_version": "4.44.2",
  "use_cache": true,
  "v_head_dim": 128,
  "vocab_size": 129280
}"#;

/// zai-org/GLM-5 `config.json` (BF16, `rope_parameters`, interleaved indexer RoPE, no bos).
const GLM5: &str = r#"{
  "architectures": ["GlmMoeDsaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "dtype": "bfloat16",
  "eos_token_id": [154820, 154827, 154829],
  "first_k_dense_replace": 3,
  "head_dim": 64,
  "hidden_act": "silu",
  "hidden_size": 6144,
  "index_head_dim": 128,
  "index_n_heads": 32,
  "index_topk": 2048,
  "indexer_rope_interleave": true,
  "initializer_range": 0.02,
  "intermediate_size": 12288,
  "kv_lora_rank": 512,
  "max_position_embeddings": 202752,
  "model_type": "glm_moe_dsa",
  "moe_intermediate_size": 2048,
  "moe_layer_freq": 1,
  "n_group": 1,
  "n_routed_experts": 256,
  "n_shared_experts": 1,
  "norm_topk_prob": true,
  "num_attention_heads": 64,
  "num_experts_per_tok": 8,
  "num_hidden_layers": 78,
  "num_key_value_heads": 64,
  "num_nextn_predict_layers": 1,
  "pad_token_id": 154820,
  "q_lora_rank": 2048,
  "qk_head_dim": 256,
  "qk_nope_head_dim": 192,
  "qk_rope_head_dim": 64,
  "rms_norm_eps": 1e-05,
  "rope_interleave": true,
  "rope_parameters": {"rope_theta": 1000000, "rope_type": "default"},
  "routed_scaling_factor": 2.5,
  "scoring_func": "sigmoid",
  "tie_word_embeddings": false,
  "topk_group": 1,
  "topk_method": "noaux_tc",
  "transformers_version": "5.0.2.dev0",
  "use_cache": true,
  "v_head_dim": 256,
  "vocab_size": 154880
}"#;

/// DeepSeek-V3.2's `inv_freq` from transformers 5.24 / torch 2.15 CPU
/// (`DeepseekV32RotaryEmbedding(DeepseekV32Config(**cfg)).inv_freq`, f32 bit patterns).
const DS_V32_INV_FREQ_BITS: [u32; 32] = [
    0x3f800000, 0x3f3ff911, 0x3f0ff59a, 0x3ed7e89b, 0x3ea1e89b, 0x3e72d423, 0x3e361887, 0x3e088d77, 0x3dcccccd,
    0x3d99940d, 0x3d6655c2, 0x3d1fc5ba, 0x3cdc321b, 0x3c968dc3, 0x3c4bf283, 0x3c088d77, 0x3bb43959, 0x3b697066,
    0x3b136a16, 0x3ab3a2cd, 0x3a4f3e37, 0x39d99312, 0x393a7753, 0x380bd471, 0x37d1b717, 0x379d43a3, 0x376bdcf0,
    0x3730df51, 0x3704a2b3, 0x36c6ecdd, 0x36952c42, 0x365fba4f,
];

/// `rope_parameters = {"rope_theta": 1e6, "rope_type": "default"}`, dim 64, same oracle.
const THETA_1E6_INV_FREQ_BITS: [u32; 32] = [
    0x3f800000, 0x3f263de0, 0x3ed7e89b, 0x3e8c3504, 0x3e361887, 0x3dec7fd6, 0x3d99940d, 0x3d47763f, 0x3d0186e3,
    0x3ca8398b, 0x3c5a7bf2, 0x3c0de12d, 0x3bb8449c, 0x3b6f520e, 0x3b1b690d, 0x3ac9d75c, 0x3a83126f, 0x3a2a3b44,
    0x39dd1725, 0x398f9272, 0x393a7753, 0x38f22ce2, 0x389d43a4, 0x384c3fbe, 0x3804a2b2, 0x37ac431d, 0x375fba4f,
    0x371148e3, 0x36bcb0c1, 0x36751070, 0x361f23e4, 0x35ceaf79,
];

/// Compares against transformers' f32 table, allowing `max_ulps` difference. Exact (0) for the
/// published configs; 1 where torch's SIMD `pow` (1-ulp accurate, not correctly rounded) rounds
/// `theta^(2i/dim)` the other way than the correctly rounded value this crate computes.
fn assert_ulps(got: &[f32], want: &[u32], max_ulps: u32) {
    assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits().abs_diff(w) <= max_ulps,
            "inv_freq[{i}] = {g:e}, transformers has {:e} (max {max_ulps} ulp)",
            f32::from_bits(w)
        );
    }
}

fn assert_bits(got: &[f32], want: &[u32]) {
    assert_ulps(got, want, 0);
}

#[test]
fn deepseek_v32_resolves() {
    let c = ModelConfig::from_json_str(DEEPSEEK_V32, "DeepSeek-V3.2/config.json").unwrap();
    assert_eq!(c.arch, Arch::DeepseekV32);
    assert_eq!(c.vocab_size, 129_280);
    assert_eq!(c.hidden_size, 7168);
    assert_eq!(c.intermediate_size, 18_432);
    assert_eq!(c.moe_intermediate_size, 2048);
    assert_eq!(c.num_hidden_layers, 61);
    assert_eq!(c.num_attention_heads, 128);
    assert_eq!((c.q_lora_rank, c.kv_lora_rank), (1536, 512));
    assert_eq!((c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim), (128, 64, 128));
    assert_eq!(c.qk_head_dim(), 192);
    assert_eq!((c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok), (256, 1, 8));
    assert_eq!((c.n_group, c.topk_group), (8, 4));
    assert!(c.norm_topk_prob);
    assert_eq!(c.routed_scaling_factor, 2.5);
    assert_eq!(c.mlp_layer_types.len(), 61);
    assert_eq!(c.mlp_layer_types[..3], [MlpKind::Dense; 3]);
    assert!(c.mlp_layer_types[3..].iter().all(|&k| k == MlpKind::Moe));
    assert_eq!(c.rms_norm_eps, 1e-6);
    assert_eq!((c.index_n_heads, c.index_head_dim, c.index_topk), (64, 128, 2048));
    assert!(!c.indexer_rope_interleave);
    assert!(!c.tie_word_embeddings);
    assert_eq!(c.quantization, Some(Fp8Quant { block: [128, 128] }));
    assert_eq!(c.max_position_embeddings, 163_840);
    assert_eq!(c.bos_token_id, Some(0));
    assert_eq!(c.eos_token_ids, vec![1]);
    assert_eq!(c.num_nextn_predict_layers, 1);
    assert_eq!(c.schedule, IndexSchedule::all_full(61));

    assert_eq!(c.rope.theta, 10_000.0);
    assert_eq!(c.rope.dim, 64);
    assert_eq!(
        c.rope.scaling,
        RopeScaling::Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            truncate: true,
            attention_factor: 1.0,
            mscale_all_dim: 1.0,
        }
    );
    assert_eq!(c.rope.attention_factor(), 1.0);
    // 192^-0.5 · (1 + 0.1 ln 40)²; transformers: 0.1352337788608801.
    assert!((c.softmax_scale - 0.135_234).abs() < 1e-6, "{}", c.softmax_scale);
    assert_eq!(c.softmax_scale, 0.135_233_778_860_880_1_f64 as f32);
    assert_bits(&c.rope.inv_freq(), &DS_V32_INV_FREQ_BITS);
}

#[test]
fn glm5_resolves() {
    let c = ModelConfig::from_json_str(GLM5, "GLM-5/config.json").unwrap();
    assert_eq!(c.arch, Arch::GlmMoeDsa);
    assert_eq!(c.vocab_size, 154_880);
    assert_eq!(c.hidden_size, 6144);
    assert_eq!(c.intermediate_size, 12_288);
    assert_eq!(c.moe_intermediate_size, 2048);
    assert_eq!(c.num_hidden_layers, 78);
    assert_eq!(c.num_attention_heads, 64);
    assert_eq!((c.q_lora_rank, c.kv_lora_rank), (2048, 512));
    assert_eq!((c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim), (192, 64, 256));
    assert_eq!(c.qk_head_dim(), 256);
    assert_eq!((c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok), (256, 1, 8));
    assert_eq!((c.n_group, c.topk_group), (1, 1));
    assert_eq!(c.mlp_layer_types.iter().filter(|&&k| k == MlpKind::Dense).count(), 3);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!((c.index_n_heads, c.index_head_dim, c.index_topk), (32, 128, 2048));
    assert!(c.indexer_rope_interleave);
    assert_eq!(c.quantization, None);
    assert_eq!(c.max_position_embeddings, 202_752);
    // No bos_token_id key: transformers' class default 0.
    assert_eq!(c.bos_token_id, Some(0));
    assert_eq!(c.eos_token_ids, vec![154_820, 154_827, 154_829]);
    assert_eq!(c.num_nextn_predict_layers, 1);
    assert_eq!(c.schedule.num_full(), 78);

    assert_eq!(c.rope.theta, 1_000_000.0);
    assert_eq!(c.rope.scaling, RopeScaling::Default);
    assert_eq!(c.rope.attention_factor(), 1.0);
    assert_eq!(c.softmax_scale, 0.0625);
    assert_bits(&c.rope.inv_freq(), &THETA_1E6_INV_FREQ_BITS);
}

#[test]
fn glm5_fp8_variant() {
    let json = GLM5.replace(
        r#""dtype": "bfloat16","#,
        r#""quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]},"#,
    );
    let c = ModelConfig::from_json_str(&json, "GLM-5-FP8/config.json").unwrap();
    assert_eq!(c.quantization, Some(Fp8Quant { block: [128, 128] }));
}

#[test]
fn deepseek_v32_defaults_from_minimal_config() {
    let c = ModelConfig::from_json_str(r#"{"model_type": "deepseek_v32"}"#, "min").unwrap();
    let full = ModelConfig::from_json_str(DEEPSEEK_V32, "full").unwrap();
    // The class defaults are DeepSeek-V3.2 itself, except for what only the checkpoint declares.
    assert_eq!(c.hidden_size, 7168);
    assert_eq!(c.index_n_heads, 64);
    assert_eq!(c.rms_norm_eps, 1e-6);
    assert_eq!((c.n_group, c.topk_group), (8, 4));
    assert_eq!((c.qk_nope_head_dim, c.v_head_dim, c.q_lora_rank), (128, 128, 1536));
    assert_eq!(c.vocab_size, 129_280);
    assert_eq!(c.max_position_embeddings, 163_840);
    assert_eq!((c.intermediate_size, c.moe_intermediate_size), (18_432, 2048));
    assert!(!c.indexer_rope_interleave);
    assert_eq!(c.bos_token_id, Some(0));
    assert_eq!(c.eos_token_ids, vec![1]);
    assert_eq!(c.num_nextn_predict_layers, 0);
    assert_eq!(c.quantization, None);
    // No RoPE keys at all: default RoPE with theta 10000, plain 192^-0.5 softmax scale.
    assert_eq!(c.rope.scaling, RopeScaling::Default);
    assert_eq!(c.rope.theta, 10_000.0);
    assert_eq!(c.softmax_scale, (192f64).powf(-0.5) as f32);
    assert_eq!(c.mlp_layer_types, full.mlp_layer_types);
    assert_eq!(c.schedule, full.schedule);
}

#[test]
fn glm_defaults_from_minimal_config() {
    let c = ModelConfig::from_json_str(r#"{"model_type": "glm_moe_dsa"}"#, "min").unwrap();
    assert_eq!(c.hidden_size, 6144);
    assert_eq!(c.index_n_heads, 32);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!((c.n_group, c.topk_group), (1, 1));
    assert_eq!((c.qk_nope_head_dim, c.v_head_dim, c.q_lora_rank), (192, 256, 2048));
    assert_eq!(c.vocab_size, 154_880);
    assert_eq!(c.max_position_embeddings, 202_752);
    assert_eq!((c.intermediate_size, c.moe_intermediate_size), (12_288, 2048));
    assert_eq!(c.num_hidden_layers, 78);
    assert_eq!(c.num_attention_heads, 64);
    assert!(c.indexer_rope_interleave);
    assert_eq!(c.rope.theta, 10_000.0);
    assert_eq!(c.softmax_scale, 0.0625);
}

#[test]
fn indexer_rope_interleave_key_is_honoured() {
    let ds =
        ModelConfig::from_json_str(r#"{"model_type": "deepseek_v32", "indexer_rope_interleave": true}"#, "x").unwrap();
    assert!(ds.indexer_rope_interleave);
    let glm =
        ModelConfig::from_json_str(r#"{"model_type": "glm_moe_dsa", "indexer_rope_interleave": false}"#, "x").unwrap();
    assert!(!glm.indexer_rope_interleave);
}

#[test]
fn legacy_rope_scaling_equals_rope_parameters() {
    let legacy = ModelConfig::from_json_str(DEEPSEEK_V32, "legacy").unwrap();
    let modern_json = DEEPSEEK_V32
        .replace(r#""rope_scaling": {"#, r#""rope_parameters": {"rope_theta": 10000,"#)
        .replace(r#""type": "yarn""#, r#""rope_type": "yarn""#);
    assert!(!modern_json.contains("rope_scaling"));
    let modern = ModelConfig::from_json_str(&modern_json, "modern").unwrap();
    assert_eq!(legacy.rope, modern.rope);
    assert_eq!(legacy.softmax_scale, modern.softmax_scale);
    assert_eq!(legacy, modern);
}

#[test]
fn glm52_freq_offset_schedule() {
    let json = GLM5
        .replace(r#""index_topk": 2048,"#, r#""index_topk": 2048, "index_topk_freq": 4, "index_skip_topk_offset": 3,"#);
    let c = ModelConfig::from_json_str(&json, "GLM-5.2").unwrap();
    let mut expected = vec![0, 1];
    expected.extend((2..=74).step_by(4));
    assert_eq!(c.schedule.full_layers(), expected);
    assert_eq!(c.schedule.num_full(), 21);
    assert_eq!(c.schedule.layer(77), LayerIndexer::Shared { source: 74 });
}

#[test]
fn freq_with_default_offset() {
    let json = GLM5.replace(r#""index_topk": 2048,"#, r#""index_topk": 2048, "index_topk_freq": 4,"#);
    let c = ModelConfig::from_json_str(&json, "x").unwrap();
    assert_eq!(&c.schedule.full_layers()[..4], &[0, 1, 5, 9]);
    assert!(c.schedule.to_pattern().starts_with("FFSSSFSSSF"));
    // The same keys apply to deepseek_v32.
    let json = DEEPSEEK_V32.replace(r#""index_topk": 2048,"#, r#""index_topk": 2048, "index_topk_freq": 4,"#);
    let c = ModelConfig::from_json_str(&json, "x").unwrap();
    assert_eq!(&c.schedule.full_layers()[..4], &[0, 1, 5, 9]);
    assert_eq!(c.schedule.len(), 61);
}

/// The paper's searched GLM-5 1/4 pattern (Appendix B).
const GLM5_QUARTER: &str = "FFSFSSSFSSFSFSSSSSSSFSSSSSSFSSSFSFSSSSFFFFFSSSFFSSSFSSSSSSSSFSSSFSSSSSSFSFSSSS";

#[test]
fn paper_glm5_quarter_pattern() {
    let json = GLM5
        .replace(r#""index_topk": 2048,"#, &format!(r#""index_topk": 2048, "index_topk_pattern": "{GLM5_QUARTER}","#));
    let c = ModelConfig::from_json_str(&json, "x").unwrap();
    assert_eq!(c.schedule.num_full(), 22);
    assert_eq!(c.schedule.to_pattern(), GLM5_QUARTER);
    assert_eq!(c.schedule.source(2), 1);
}

#[test]
fn schedule_precedence() {
    let base = r#"{"model_type": "glm_moe_dsa", "num_hidden_layers": 4, "first_k_dense_replace": 4"#;
    // indexer_types > index_topk_pattern > freq/offset.
    let all = format!(
        r#"{base}, "indexer_types": ["full", "shared", "full", "shared"], "index_topk_pattern": "FFSS",
            "index_topk_freq": 2, "index_skip_topk_offset": 1}}"#
    );
    assert_eq!(ModelConfig::from_json_str(&all, "x").unwrap().schedule.to_pattern(), "FSFS");
    let no_types =
        format!(r#"{base}, "index_topk_pattern": "FFSS", "index_topk_freq": 2, "index_skip_topk_offset": 1}}"#);
    assert_eq!(ModelConfig::from_json_str(&no_types, "x").unwrap().schedule.to_pattern(), "FFSS");
    let freq_only = format!(r#"{base}, "index_topk_freq": 2, "index_skip_topk_offset": 1}}"#);
    assert_eq!(ModelConfig::from_json_str(&freq_only, "x").unwrap().schedule.to_pattern(), "FSFS");
    // A null pattern falls through to freq/offset, like transformers' `is not None`.
    let null_pattern =
        format!(r#"{base}, "index_topk_pattern": null, "index_topk_freq": 2, "index_skip_topk_offset": 1}}"#);
    assert_eq!(ModelConfig::from_json_str(&null_pattern, "x").unwrap().schedule.to_pattern(), "FSFS");
    // transformers also accepts a list for index_topk_pattern.
    let list_pattern = format!(r#"{base}, "index_topk_pattern": ["full", "full", "shared", "full"]}}"#);
    assert_eq!(ModelConfig::from_json_str(&list_pattern, "x").unwrap().schedule.to_pattern(), "FFSF");
}

#[test]
fn token_ids() {
    let c =
        ModelConfig::from_json_str(r#"{"model_type": "glm_moe_dsa", "bos_token_id": null, "eos_token_id": 7}"#, "x")
            .unwrap();
    assert_eq!(c.bos_token_id, None);
    assert_eq!(c.eos_token_ids, vec![7]);
    let c =
        ModelConfig::from_json_str(r#"{"model_type": "glm_moe_dsa", "bos_token_id": 5, "eos_token_id": null}"#, "x")
            .unwrap();
    assert_eq!(c.bos_token_id, Some(5));
    assert!(c.eos_token_ids.is_empty());
    let c = ModelConfig::from_json_str(r#"{"model_type": "glm_moe_dsa", "eos_token_id": [3, 4]}"#, "x").unwrap();
    assert_eq!(c.eos_token_ids, vec![3, 4]);
}

#[test]
fn mlp_layer_types_and_first_k_dense() {
    let c = ModelConfig::from_json_str(
        r#"{"model_type": "deepseek_v32", "num_hidden_layers": 3, "mlp_layer_types": ["sparse", "dense", "sparse"],
            "first_k_dense_replace": 3}"#,
        "x",
    )
    .unwrap();
    assert_eq!(c.mlp_layer_types, vec![MlpKind::Moe, MlpKind::Dense, MlpKind::Moe]);
    let c = ModelConfig::from_json_str(
        r#"{"model_type": "deepseek_v32", "num_hidden_layers": 2, "first_k_dense_replace": 5}"#,
        "x",
    )
    .unwrap();
    assert_eq!(c.mlp_layer_types, vec![MlpKind::Dense; 2]);
    let c = ModelConfig::from_json_str(
        r#"{"model_type": "deepseek_v32", "num_hidden_layers": 2, "first_k_dense_replace": 0}"#,
        "x",
    )
    .unwrap();
    assert_eq!(c.mlp_layer_types, vec![MlpKind::Moe; 2]);
}

#[test]
fn num_experts_alias_replaces_n_routed_experts() {
    let c =
        ModelConfig::from_json_str(r#"{"model_type": "glm_moe_dsa", "n_routed_experts": 256, "num_experts": 64}"#, "x")
            .unwrap();
    assert_eq!(c.n_routed_experts, 64);
}

#[test]
fn from_file_reads_and_names_path() {
    let dir = std::env::temp_dir().join(format!("indexcache-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("config.json");
    std::fs::write(&good, DEEPSEEK_V32).unwrap();
    let c = ModelConfig::from_file(&good).unwrap();
    assert_eq!(c, ModelConfig::from_json_str(DEEPSEEK_V32, "other origin").unwrap());

    let bad = dir.join("bad.json");
    std::fs::write(&bad, r#"{"model_type": "deepseek_v32", "hidden_size": 0}"#).unwrap();
    let msg = ModelConfig::from_file(&bad).unwrap_err().to_string();
    assert!(msg.starts_with(&bad.display().to_string()), "{msg}");
    assert!(msg.contains("hidden_size"), "{msg}");

    let missing = dir.join("does-not-exist.json");
    let msg = ModelConfig::from_file(&missing).unwrap_err().to_string();
    assert!(msg.contains("does-not-exist.json"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

// --- RoPE against transformers 5.24 (torch 2.15 CPU) on non-default settings. -----------------

/// Resolves `rope_parameters` on top of a deepseek_v32 config with transformers' defaults.
fn rope_case(extra: &str) -> ModelConfig {
    ModelConfig::from_json_str(&format!(r#"{{"model_type": "deepseek_v32", {extra}}}"#), "rope case").unwrap()
}

#[test]
fn yarn_without_truncation() {
    // attention_factor: mscale without mscale_all_dim → get_mscale(factor) = 1 + 0.1 ln 8.
    let c = rope_case(
        r#""max_position_embeddings": 16384, "rope_parameters": {"rope_type": "yarn", "factor": 8.0,
            "original_max_position_embeddings": 2048, "truncate": false, "mscale": 0.707}"#,
    );
    assert_eq!(c.rope.attention_factor(), 1.207_944_154_167_983_6_f64 as f32);
    // No mscale_all_dim: plain 192^-0.5 (transformers: 0.07216878364870322).
    assert_eq!(c.softmax_scale, 0.072_168_783_648_703_22_f64 as f32);
    assert_bits(
        &c.rope.inv_freq(),
        &[
            0x3f800000, 0x3f3ff911, 0x3f0ff59a, 0x3ed7e89b, 0x3ea1e89b, 0x3e72d423, 0x3e361887, 0x3e088d77, 0x3dcccccd,
            0x3d8f21ea, 0x3d45ee3e, 0x3d07e01f, 0x3cb8f5b4, 0x3c792adc, 0x3c25ad6a, 0x3bd8ba4f, 0x3b8ab619, 0x3b2c5347,
            0x3acce3f9, 0x3a62f65f, 0x39dbeadd, 0x399b690d, 0x39691528, 0x392ec98e, 0x3903126f, 0x38c4948c, 0x38936a16,
            0x385d1725, 0x3825cb60, 0x37f8a815, 0x37ba7753, 0x378bd472,
        ],
    );
}

#[test]
fn yarn_null_factor_falsy_betas_and_top_level_theta() {
    // factor null → 65536 / 4096 = 16; beta_fast 0 → 32, beta_slow null → 1; theta from the
    // top-level key; attention_factor = get_mscale(16, 2) / get_mscale(16, 1).
    let c = rope_case(
        r#""max_position_embeddings": 65536, "rope_theta": 50000.0, "rope_parameters": {"rope_type": "yarn",
            "factor": null, "original_max_position_embeddings": 4096, "beta_fast": 0, "beta_slow": null,
            "mscale": 2.0, "mscale_all_dim": 1.0}"#,
    );
    match c.rope.scaling {
        RopeScaling::Yarn { factor, beta_fast, beta_slow, .. } => {
            assert_eq!((factor, beta_fast, beta_slow), (16.0, 32.0, 1.0))
        }
        RopeScaling::Default => panic!("expected yarn"),
    }
    assert_eq!(c.rope.theta, 50_000.0);
    assert_eq!(c.rope.attention_factor(), 1.217_073_357_839_520_5_f64 as f32);
    // transformers crashes here (yarn_apply_mscale reads the null factor); we use the resolved 16.
    let m = 1.0 + 0.1 * 16f64.ln();
    assert_eq!(c.softmax_scale, ((192f64).powf(-0.5) * m * m) as f32);
    // Entry 5 is 1 ulp off torch's pow (see assert_ulps); the rest are bit-exact.
    assert_ulps(
        &c.rope.inv_freq(),
        &[
            0x3f800000, 0x3f368e73, 0x3f022edb, 0x3eb9ab7f, 0x3e84673d, 0x3e3cd623, 0x3e06a951, 0x3dc00e9b, 0x3d88f541,
            0x3d34127c, 0x3ceb0eec, 0x3c981a21, 0x3c42cba5, 0x3bf64042, 0x3b991748, 0x3b3a3b8f, 0x3adbd07e, 0x3a7830da,
            0x3a026976, 0x396f2362, 0x38979588, 0x3858314f, 0x381a2b5b, 0x37dbe137, 0x379ccc77, 0x375fa138, 0x371f790d,
            0x36e37198, 0x36a23151, 0x366752a0, 0x3624f575, 0x35eb4496,
        ],
        1,
    );
}

#[test]
fn yarn_collapsed_ramp_guard() {
    // beta_fast == beta_slow without truncation: low == high, transformers adds 0.001.
    let c = rope_case(
        r#""max_position_embeddings": 32, "qk_rope_head_dim": 16, "rope_parameters": {"rope_type": "yarn",
            "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 2.0, "beta_slow": 2.0,
            "truncate": false}"#,
    );
    assert_eq!(c.rope.attention_factor(), 1.138_629_436_111_989_f64 as f32);
    assert_eq!(c.softmax_scale, (1.0f64 / 12.0) as f32);
    assert_bits(
        &c.rope.inv_freq(),
        &[0x3f800000, 0x3ea1e89b, 0x3ccccccd, 0x3c0186e3, 0x3b23d70a, 0x3a4f3e38, 0x3983126f, 0x38a5cb60],
    );
}

#[test]
fn yarn_top_level_original_max_position_embeddings_wins() {
    // transformers' standardize_rope_params (re-run when the rotary embedding is built) copies a
    // top-level original_max_position_embeddings over the dict's value.
    let c = rope_case(
        r#""original_max_position_embeddings": 8192, "rope_scaling": {"beta_fast": 32, "beta_slow": 1,
            "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
            "type": "yarn"}"#,
    );
    match c.rope.scaling {
        RopeScaling::Yarn { original_max_position_embeddings, .. } => {
            assert_eq!(original_max_position_embeddings, 8192)
        }
        RopeScaling::Default => panic!("expected yarn"),
    }
    assert_bits(
        &c.rope.inv_freq(),
        &[
            0x3f800000, 0x3f3ff911, 0x3f0ff59a, 0x3ed7e89b, 0x3ea1e89b, 0x3e72d423, 0x3e361887, 0x3e088d77, 0x3dcccccd,
            0x3d99940d, 0x3d6655c2, 0x3d2cba15, 0x3d0186e3, 0x3cb3b176, 0x3c77a67b, 0x3c295342, 0x3be56042, 0x3b99940e,
            0x3b4ab1df, 0x3b0345bd, 0x3aa5cb5f, 0x3a4a0891, 0x39e91527, 0x3974b3c6, 0x38d1b717, 0x379d43a3, 0x376bdcf0,
            0x3730df51, 0x3704a2b3, 0x36c6ecdd, 0x36952c42, 0x365fba4f,
        ],
    );
    // Without the top-level key the dict's value applies; without either, max_position_embeddings.
    let c = rope_case(r#""max_position_embeddings": 1000, "rope_parameters": {"rope_type": "yarn", "factor": 2}"#);
    match c.rope.scaling {
        RopeScaling::Yarn { original_max_position_embeddings, .. } => {
            assert_eq!(original_max_position_embeddings, 1000)
        }
        RopeScaling::Default => panic!("expected yarn"),
    }
}

#[test]
fn yarn_explicit_attention_factor_and_truncate_default() {
    let c = rope_case(
        r#""rope_parameters": {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 4096,
            "attention_factor": 0.5, "mscale": 1, "mscale_all_dim": 1}"#,
    );
    match c.rope.scaling {
        RopeScaling::Yarn { attention_factor, truncate, .. } => assert_eq!((attention_factor, truncate), (0.5, true)),
        RopeScaling::Default => panic!("expected yarn"),
    }
    assert_eq!(c.rope.attention_factor(), 0.5);
}

#[test]
fn empty_legacy_rope_scaling_falls_through() {
    // `rope_scaling or rope_parameters`: an empty dict is falsy in Python.
    let c = rope_case(r#""rope_scaling": {}, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}"#);
    assert_eq!(c.rope.theta, 500_000.0);
    let c = rope_case(r#""rope_scaling": null, "rope_theta": 20000"#);
    assert_eq!(c.rope.theta, 20_000.0);
    // Dict theta beats the top-level one.
    let c = rope_case(r#""rope_theta": 1, "rope_parameters": {"rope_theta": 30000}"#);
    assert_eq!(c.rope.theta, 30_000.0);
}
