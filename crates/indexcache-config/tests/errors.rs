//! Every malformed or unsupported `config.json` input gives an error whose message names the
//! offending key (and layer / character where there is one).

use indexcache_config::{ConfigError, ModelConfig, ScheduleError};
use serde_json::{Value, json};

/// A small valid deepseek_v32 config: 4 layers (1 dense), 8 experts in 2 groups.
fn base() -> Value {
    json!({
        "model_type": "deepseek_v32",
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 32,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "index_n_heads": 4,
        "index_head_dim": 16,
        "index_topk": 8,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0
    })
}

/// `base()` with `patch`'s keys set (a `Value::Null` in the patch sets the key to null).
fn with(patch: Value) -> Value {
    let mut v = base();
    if let (Some(obj), Some(p)) = (v.as_object_mut(), patch.as_object()) {
        for (k, x) in p {
            obj.insert(k.clone(), x.clone());
        }
    }
    v
}

fn without(key: &str) -> Value {
    let mut v = base();
    v.as_object_mut().unwrap().remove(key);
    v
}

fn resolve(v: &Value) -> Result<ModelConfig, ConfigError> {
    ModelConfig::from_json_str(&v.to_string(), "test/config.json")
}

/// Asserts the config fails and the message contains every fragment; returns the error.
#[track_caller]
fn err(v: Value, fragments: &[&str]) -> ConfigError {
    let e = match resolve(&v) {
        Ok(c) => panic!("expected an error for {v}, got {c:?}"),
        Err(e) => e,
    };
    let msg = e.to_string();
    assert!(msg.starts_with("test/config.json: "), "{msg}");
    for f in fragments {
        assert!(msg.contains(f), "message {msg:?} does not contain {f:?}");
    }
    e
}

#[test]
fn base_is_valid() {
    let c = resolve(&base()).unwrap();
    assert_eq!(c.num_hidden_layers, 4);
    assert_eq!(c.schedule.num_full(), 4);
}

#[test]
fn unknown_keys_are_ignored() {
    let c = resolve(&with(json!({"some_future_key": {"x": [1, 2]}, "auto_map": {}, "rope_interleave": true})));
    assert!(c.is_ok(), "{c:?}");
}

// --- JSON / IO -----------------------------------------------------------------------------------

#[test]
fn malformed_json_reports_line_and_column() {
    let e = ModelConfig::from_json_str("{\n  \"model_type\": \"deepseek_v32\",\n  \"hidden_size\": \n", "c.json")
        .unwrap_err();
    assert!(matches!(e, ConfigError::Json { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.starts_with("c.json: malformed config.json: "), "{msg}");
    assert!(msg.contains("line 4 column 0"), "{msg}");
}

#[test]
fn wrong_types_are_json_errors() {
    for (key, value, expected) in [
        ("hidden_size", json!("big"), "invalid type: string \"big\", expected usize"),
        ("hidden_size", json!(-1), "invalid value: integer `-1`, expected usize"),
        ("hidden_size", json!(64.5), "expected usize"),
        ("norm_topk_prob", json!("yes"), "expected a boolean"),
        ("mlp_layer_types", json!("dense"), "expected a sequence"),
        ("indexer_types", json!([1, 2]), "expected a string"),
        ("eos_token_id", json!("</s>"), "did not match any variant"),
        ("bos_token_id", json!(-3), "expected u32"),
    ] {
        let e = resolve(&with(json!({ key: value }))).unwrap_err();
        assert!(matches!(e, ConfigError::Json { .. }), "{key}: {e:?}");
        let msg = e.to_string();
        assert!(msg.contains(expected) && msg.contains("line 1 column"), "{key}: {msg}");
    }
    let e = ModelConfig::from_json_str("[1, 2]", "c.json").unwrap_err();
    assert!(matches!(e, ConfigError::Json { .. }), "{e:?}");
}

#[test]
fn io_error_names_path() {
    let e = ModelConfig::from_file(std::path::Path::new("/nonexistent/dir/config.json")).unwrap_err();
    assert!(matches!(e, ConfigError::Io { .. }), "{e:?}");
    assert!(e.to_string().starts_with("/nonexistent/dir/config.json: "), "{e}");
}

// --- model_type ----------------------------------------------------------------------------------

#[test]
fn model_type_missing() {
    let e = err(without("model_type"), &["model_type: missing"]);
    assert!(matches!(e, ConfigError::Invalid { ref key, .. } if key == "model_type"), "{e:?}");
}

#[test]
fn model_type_unknown() {
    let e = err(with(json!({"model_type": "deepseek_v3"})), &["unsupported model_type \"deepseek_v3\""]);
    assert!(matches!(e, ConfigError::UnknownModelType { ref model_type, .. } if model_type == "deepseek_v3"));
}

// --- unsupported options -------------------------------------------------------------------------

#[test]
fn unsupported_options_name_the_key() {
    for (patch, key, fragment) in [
        (json!({"hidden_act": "gelu"}), "hidden_act", "\"gelu\""),
        (json!({"attention_bias": true}), "attention_bias", "true"),
        (json!({"mlp_bias": true}), "mlp_bias", "true"),
        (json!({"q_lora_rank": null}), "q_lora_rank", "null"),
        (json!({"num_key_value_heads": 2}), "num_key_value_heads", "2 != num_attention_heads 4"),
        (json!({"scoring_func": "softmax"}), "scoring_func", "\"softmax\""),
        (json!({"topk_method": "greedy"}), "topk_method", "\"greedy\""),
        (json!({"moe_layer_freq": 2}), "moe_layer_freq", "2"),
        (json!({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}), "rope_parameters.rope_type", "\"linear\""),
        (json!({"rope_scaling": {"type": "dynamic", "factor": 2.0}}), "rope_scaling.type", "\"dynamic\""),
        (json!({"partial_rotary_factor": 0.5}), "partial_rotary_factor", "0.5"),
        (
            json!({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25}}),
            "rope_parameters.partial_rotary_factor",
            "0.25",
        ),
        (
            json!({"quantization_config": {"quant_method": "gptq", "bits": 4}}),
            "quantization_config.quant_method",
            "\"gptq\"",
        ),
        (json!({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}), "quantization_config.fmt", "\"e5m2\""),
        (
            json!({"quantization_config": {"quant_method": "fp8", "weight_block_size": null}}),
            "quantization_config.weight_block_size",
            "per-tensor",
        ),
    ] {
        let e = err(with(patch.clone()), &[&format!("{key}: unsupported: "), fragment]);
        assert!(matches!(e, ConfigError::Unsupported { key: ref k, .. } if k == key), "{patch}: {e:?}");
    }
}

#[test]
fn supported_option_values_pass() {
    let ok = with(json!({
        "hidden_act": "silu", "attention_bias": false, "mlp_bias": false, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "moe_layer_freq": 1, "partial_rotary_factor": 1.0,
        "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", "scale_fmt": "ue8m0"}
    }));
    let c = resolve(&ok).unwrap();
    // weight_block_size absent → [128, 128].
    assert_eq!(c.quantization.unwrap().block, [128, 128]);
    let c = resolve(&with(json!({"quantization_config": null}))).unwrap();
    assert_eq!(c.quantization, None);
    let c =
        resolve(&with(json!({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 32]}}))).unwrap();
    assert_eq!(c.quantization.unwrap().block, [64, 32]);
}

#[test]
fn missing_num_key_value_heads_uses_the_transformers_default() {
    // The class default (128 for deepseek_v32) does not match 4 heads; say so.
    err(
        without("num_key_value_heads"),
        &["num_key_value_heads: unsupported: 128, the transformers default when absent"],
    );
}

// --- invalid values ------------------------------------------------------------------------------

#[test]
fn zero_dims_are_invalid() {
    for key in [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "moe_intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "q_lora_rank",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "n_routed_experts",
        "num_experts_per_tok",
        "n_group",
        "index_n_heads",
        "index_head_dim",
        "index_topk",
        "max_position_embeddings",
    ] {
        let mut patch = json!({ key: 0 });
        // Keep num_key_value_heads equal so that the zero is what gets reported.
        if key == "num_attention_heads" {
            patch["num_key_value_heads"] = json!(0);
        }
        let e = err(with(patch), &[&format!("{key}: must be > 0, got 0")]);
        assert!(matches!(e, ConfigError::Invalid { key: ref k, .. } if k == key), "{e:?}");
    }
}

#[test]
fn invalid_values_name_the_key() {
    for (patch, fragment) in [
        (json!({"qk_rope_head_dim": 7}), "qk_rope_head_dim: must be even, got 7"),
        (json!({"index_head_dim": 4}), "index_head_dim: 4 is smaller than qk_rope_head_dim 8"),
        (json!({"n_routed_experts": 9}), "n_group: n_routed_experts 9 is not divisible by n_group 2"),
        (json!({"num_experts": 9}), "n_group: num_experts 9 is not divisible by n_group 2"),
        (json!({"topk_group": 0}), "topk_group: must be in 1..=2 (n_group), got 0"),
        (json!({"topk_group": 3}), "topk_group: must be in 1..=2 (n_group), got 3"),
        (json!({"num_experts_per_tok": 5}), "num_experts_per_tok: 5 exceeds the 4 experts in topk_group 1 groups of 4"),
        (
            json!({"n_group": 8, "topk_group": 4, "num_experts_per_tok": 2}),
            "n_group: n_routed_experts 8 / n_group 8 leaves 1 expert per group; the router scores each group by its top-2",
        ),
        (json!({"rms_norm_eps": 0.0}), "rms_norm_eps: must be a finite number > 0, got 0"),
        (
            json!({"mlp_layer_types": ["dense", "sparse", "sparse"]}),
            "mlp_layer_types: has 3 entries but num_hidden_layers is 4",
        ),
        (
            json!({"mlp_layer_types": ["dense", "moe", "sparse", "sparse"]}),
            "mlp_layer_types: invalid entry \"moe\" at layer 1",
        ),
        (json!({"rope_parameters": "yarn"}), "rope_parameters: expected an object"),
        (json!({"rope_parameters": {"rope_type": 3}}), "rope_parameters.rope_type: expected a string"),
        (json!({"rope_parameters": {"rope_theta": "big"}}), "rope_parameters.rope_theta: expected a number"),
        (json!({"rope_parameters": {"rope_theta": null}}), "rope_parameters.rope_theta: must be a number, got null"),
        (json!({"rope_theta": 1.0}), "rope_theta: must be a finite number > 1, got 1"),
        (
            json!({"rope_parameters": {"rope_type": "yarn"}}),
            "rope_parameters.factor: missing (required for rope type \"yarn\")",
        ),
        (
            json!({"rope_parameters": {"rope_type": "yarn", "factor": -2}}),
            "rope_parameters.factor: must be > 0, got -2",
        ),
        (json!({"rope_parameters": {"rope_type": "yarn", "factor": "x"}}), "rope_parameters.factor: expected a number"),
        (
            json!({"rope_scaling": {"type": "yarn", "factor": 4, "beta_fast": -1}}),
            "rope_scaling.beta_fast: must be > 0, got -1",
        ),
        (
            json!({"rope_scaling": {"type": "yarn", "factor": 4, "mscale": "one"}}),
            "rope_scaling.mscale: expected a number",
        ),
        (
            json!({"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 10.5}}),
            "rope_scaling.original_max_position_embeddings: must be a positive integer, got 10.5",
        ),
        (
            json!({"rope_scaling": {"type": "yarn", "factor": 4, "truncate": "no"}}),
            "rope_scaling.truncate: expected a number",
        ),
        (json!({"quantization_config": "fp8"}), "quantization_config: expected an object"),
        (json!({"quantization_config": {"fmt": "e4m3"}}), "quantization_config.quant_method: missing"),
        (json!({"quantization_config": {"quant_method": 8}}), "quantization_config.quant_method: expected a string"),
        (
            json!({"quantization_config": {"quant_method": "fp8", "fmt": 4}}),
            "quantization_config.fmt: expected a string",
        ),
        (
            json!({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}}),
            "quantization_config.weight_block_size: expected [rows, cols] of two positive integers, got [128]",
        ),
        (
            json!({"quantization_config": {"quant_method": "fp8", "weight_block_size": [0, 128]}}),
            "quantization_config.weight_block_size: expected [rows, cols] of two positive integers",
        ),
        (
            json!({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, "128"]}}),
            "quantization_config.weight_block_size: expected [rows, cols]",
        ),
        (
            json!({"quantization_config": {"quant_method": "fp8", "weight_block_size": 128}}),
            "quantization_config.weight_block_size: expected [rows, cols], got 128",
        ),
        (json!({"index_topk_pattern": 5}), "index_topk_pattern: expected a string of F/S"),
        (json!({"index_topk_pattern": ["full", 1, "full", "full"]}), "index_topk_pattern: expected a string of F/S"),
    ] {
        let e = err(with(patch.clone()), &[fragment]);
        assert!(matches!(e, ConfigError::Invalid { .. }), "{patch}: {e:?}");
    }
}

#[test]
fn moe_group_check_skipped_without_moe_layers() {
    // One expert per group cannot be routed, but with every layer dense it is never used.
    let dense = with(json!({"n_group": 8, "topk_group": 4, "num_experts_per_tok": 2, "first_k_dense_replace": 4}));
    assert!(resolve(&dense).is_ok());
}

// --- schedule keys -------------------------------------------------------------------------------

#[track_caller]
fn schedule_err(patch: Value, key: &str, expected: ScheduleError, fragment: &str) {
    let e = err(with(patch), &[&format!("test/config.json: {key}: schedule: "), fragment]);
    match e {
        ConfigError::Schedule { source, .. } => assert_eq!(source, expected),
        other => panic!("expected a schedule error, got {other:?}"),
    }
}

#[test]
fn schedule_errors_name_key_layer_and_char() {
    schedule_err(
        json!({"index_topk_pattern": "FSS"}),
        "index_topk_pattern",
        ScheduleError::WrongLength { expected: 4, got: 3 },
        "pattern has 3 characters but the model has 4 layers",
    );
    schedule_err(
        json!({"index_topk_pattern": "FSXS"}),
        "index_topk_pattern",
        ScheduleError::BadChar { layer: 2, ch: 'X' },
        "invalid character 'X' at layer 2",
    );
    schedule_err(
        json!({"index_topk_pattern": "SFFF"}),
        "index_topk_pattern",
        ScheduleError::SharedFirstLayer,
        "layer 0 must be Full",
    );
    schedule_err(
        json!({"indexer_types": ["full", "shared", "skip", "full"]}),
        "indexer_types",
        ScheduleError::BadIndexerType { layer: 2, value: "skip".into() },
        "invalid indexer_types entry \"skip\" at layer 2",
    );
    schedule_err(
        json!({"indexer_types": ["full", "shared"]}),
        "indexer_types",
        ScheduleError::WrongIndexerTypesLength { expected: 4, got: 2 },
        "indexer_types has 2 entries but the model has 4 layers",
    );
    schedule_err(
        json!({"indexer_types": ["shared", "full", "full", "full"]}),
        "indexer_types",
        ScheduleError::SharedFirstLayer,
        "layer 0 must be Full",
    );
    schedule_err(
        json!({"index_topk_pattern": ["full", "shared", "shared"]}),
        "index_topk_pattern",
        ScheduleError::WrongIndexerTypesLength { expected: 4, got: 3 },
        "indexer_types has 3 entries",
    );
    schedule_err(
        json!({"index_topk_freq": 2, "index_skip_topk_offset": 0}),
        "index_skip_topk_offset",
        ScheduleError::SharedFirstLayer,
        "layer 0 must be Full",
    );
}

#[test]
fn eight_layer_pattern_length_message() {
    let v = with(json!({"num_hidden_layers": 8, "index_topk_pattern": "FSSSFSS"}));
    err(v, &["index_topk_pattern: schedule: pattern has 7 characters but the model has 8 layers"]);
}
