//! Bad checkpoints and bad requests give clear errors naming the file, tensor or layer —
//! never a panic.

use indexcache_config::ScheduleOverride;
use indexcache_model::{DsaModel, ForwardOptions, IndexerSelection, LoadOptions, ModelError};
use indexcache_ops::cpu::CpuBackend;
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

/// Copy a fixture's checkpoint (not its reference dump) into a temp dir.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(name).join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn load(dir: &Path, schedule: Option<ScheduleOverride>) -> Result<DsaModel<CpuBackend>, ModelError> {
    let opts = LoadOptions { schedule, indexers: IndexerSelection::Full };
    DsaModel::load(dir, CpuBackend::new(), &opts, &mut |_, _, _| {}).map(|(m, _)| m)
}

fn err(dir: &Path, schedule: Option<ScheduleOverride>) -> String {
    match load(dir, schedule) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrite model.safetensors keeping only the tensors `keep` accepts.
fn rewrite_without(dir: &Path, drop: &str) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        st.tensors().into_iter().filter(|(n, _)| n != drop).collect();
    let out = safetensors::serialize(kept, None).unwrap();
    std::fs::write(&path, out).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture("glm5-pattern");
    rewrite_without(dir.path(), "model.layers.1.mlp.down_proj.weight");
    let e = err(dir.path(), None);
    assert!(e.contains("model.layers.1.mlp.down_proj.weight") && e.contains("not found"), "{e}");
}

#[test]
fn config_weight_mismatch_names_tensor_and_shapes() {
    let dir = copy_fixture("glm5-pattern");
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["intermediate_size"] = serde_json::json!(100);
    std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
    let e = err(dir.path(), None);
    assert!(e.contains("model.layers.0.mlp.gate_proj.weight"), "{e}");
    assert!(e.contains("[100, 48]"), "{e}");
}

#[test]
fn truncated_checkpoint_names_file() {
    let dir = copy_fixture("glm5-pattern");
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len / 2).unwrap();
    let e = err(dir.path(), None);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn invalid_patterns_are_rejected_with_reasons() {
    let dir = fixture("glm5-pattern");
    let e = err(&dir, Some(ScheduleOverride::Pattern("FSS".into())));
    assert!(e.contains("pattern has 3 characters but the model has 6 layers"), "{e}");
    let e = err(&dir, Some(ScheduleOverride::Pattern("SSSFSF".into())));
    assert!(e.contains("layer 0 must be Full"), "{e}");
    let e = err(&dir, Some(ScheduleOverride::Pattern("FSXFSF".into())));
    assert!(e.contains("invalid character 'X' at layer 2"), "{e}");
    // Full where the checkpoint ships no indexer (GLM-5.2 style).
    let e = err(&dir, Some(ScheduleOverride::Pattern("FFSFSF".into())));
    assert!(e.contains("layer 1 is Full") && e.contains("[0, 3, 5]"), "{e}");
}

#[test]
fn context_too_long_and_bad_tokens() {
    let model = load(&fixture("glm5-pattern"), None).unwrap();
    let max = model.config().max_position_embeddings;
    let e = model.new_cache(max + 1).err().expect("too long").to_string();
    assert!(e.contains("context too long") && e.contains(&max.to_string()), "{e}");

    let mut cache = model.new_cache(4).unwrap();
    let e = model.forward(&[1, 2, 3, 4, 5], &mut cache, &ForwardOptions::default()).unwrap_err().to_string();
    assert!(e.contains("5 tokens needed but the cache capacity allows 4"), "{e}");
    assert_eq!(cache.len(), 0, "a refused request leaves the cache untouched");

    let e = model.forward(&[1, 9999], &mut cache, &ForwardOptions::default()).unwrap_err().to_string();
    assert!(e.contains("token id 9999 at input position 1 is out of range for vocabulary size 256"), "{e}");
    let e = model.forward(&[], &mut cache, &ForwardOptions::default()).unwrap_err().to_string();
    assert!(e.contains("empty input"), "{e}");
}

#[test]
fn malformed_config_is_named() {
    let dir = copy_fixture("glm5-pattern");
    std::fs::write(dir.path().join("config.json"), "{\"model_type\": \"glm_moe_dsa\", \"hidden_size\": }").unwrap();
    let e = err(dir.path(), None);
    assert!(e.contains("config.json") && e.contains("malformed"), "{e}");
    std::fs::write(dir.path().join("config.json"), "{\"model_type\": \"mistral\"}").unwrap();
    let e = err(dir.path(), None);
    assert!(e.contains("unsupported model_type \"mistral\""), "{e}");
    // llama is read from its GGUF file, and the message says so.
    std::fs::write(dir.path().join("config.json"), "{\"model_type\": \"llama\"}").unwrap();
    let e = err(dir.path(), None);
    assert!(e.contains("model_type") && e.contains("\"llama\" is read from its GGUF file"), "{e}");
}

/// Tensors of the MTP layer (`model.layers.{num_hidden_layers}`) are skipped and reported, like
/// transformers' `_keys_to_ignore_on_load_unexpected`; other unknown tensors are reported too.
#[test]
fn mtp_layer_is_skipped_and_reported() {
    let dir = copy_fixture("glm5-pattern");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let extra: Vec<u8> = [1.0f32; 4].iter().flat_map(|f| f.to_le_bytes()).collect();
    let extra_bytes: &[u8] = &extra;
    let mut tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors();
    for name in ["model.layers.6.eh_proj.weight", "model.layers.6.enorm.weight", "model.something_else"] {
        tensors.push((
            name.into(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], extra_bytes).unwrap(),
        ));
    }
    let out = safetensors::serialize(tensors, None).unwrap();
    std::fs::write(&path, out).unwrap();
    let opts = LoadOptions::default();
    let (_, report) = DsaModel::load(dir.path(), CpuBackend::new(), &opts, &mut |_, _, _| {}).unwrap();
    assert_eq!(report.skipped_mtp, vec!["model.layers.6.eh_proj.weight", "model.layers.6.enorm.weight"]);
    assert_eq!(report.unused, vec!["model.something_else"]);
}
