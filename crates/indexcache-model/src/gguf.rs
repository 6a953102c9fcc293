//! Dense llama models from GGUF files (llama.cpp's format), optionally with lightning indexers
//! added from a side safetensors file (DSA on a dense model).
//!
//! * [`llama_params`] reads the hyper-parameters from the GGUF metadata (`llama.*` keys).
//! * [`GgufSource`] serves the engine's HF-style tensor names from the GGUF
//!   (`model.layers.{l}.self_attn.q_proj.weight` ← `blk.{l}.attn_q.weight`, …), dequantised to
//!   f32, and the indexer tensors from the side file.
//!
//! **RoPE layout.** llama.cpp's converter permutes the rows of `attn_q` / `attn_k` so that
//! rotating *adjacent* pairs (2i, 2i+1) reproduces HF's rotate-half on the original weights; the
//! engine keeps the GGUF weights as stored and rotates adjacent pairs (`rope_interleave`).
//!
//! **A model directory** (`models/smollm2-135m-dsa/`) holds `config.json` naming the GGUF
//! (`"base_gguf"`, relative to the directory) and the indexers (`index_n_heads`,
//! `index_head_dim`, `index_topk`, `index_topk_pattern`), and `indexers.safetensors`.

use crate::error::ModelError;
use crate::weights::WeightSource;
use indexcache_config::{IndexSchedule, LlamaIndexer, LlamaParams};
use indexcache_weights::{GgufFile, WeightStore};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The key of a model directory's `config.json` that names its GGUF base model.
pub const BASE_GGUF_KEY: &str = "base_gguf";
/// The indexer weights of a model directory built on a GGUF.
pub const INDEXERS_FILE: &str = "indexers.safetensors";

fn invalid(g: &GgufFile, what: impl std::fmt::Display) -> ModelError {
    ModelError::Invalid(format!("{}: {what}", g.path().display()))
}

/// The hyper-parameters of the `llama` model in `g` (no indexers).
pub fn llama_params(g: &GgufFile) -> Result<LlamaParams, ModelError> {
    let w = |e: indexcache_weights::GgufError| ModelError::Weights(e.into());
    let arch = g.get_str("general.architecture").map_err(w)?;
    if arch != "llama" {
        return Err(invalid(g, format!("general.architecture {arch:?}: only \"llama\" GGUF models are supported")));
    }
    let hidden = g.get_usize("llama.embedding_length").map_err(w)?;
    let heads = g.get_usize("llama.attention.head_count").map_err(w)?;
    let kv_heads = match g.get("llama.attention.head_count_kv") {
        Some(_) => g.get_usize("llama.attention.head_count_kv").map_err(w)?,
        None => heads,
    };
    if heads == 0 || !hidden.is_multiple_of(heads) && g.get("llama.attention.key_length").is_none() {
        return Err(invalid(g, format!("embedding_length {hidden} is not a multiple of head_count {heads}")));
    }
    let head_dim = match g.get("llama.attention.key_length") {
        Some(_) => g.get_usize("llama.attention.key_length").map_err(w)?,
        None => hidden / heads,
    };
    if let Some(_) = g.get("llama.attention.value_length")
        && g.get_usize("llama.attention.value_length").map_err(w)? != head_dim
    {
        return Err(invalid(g, "llama.attention.value_length differs from key_length: not supported"));
    }
    if let Some(_) = g.get("llama.rope.dimension_count")
        && g.get_usize("llama.rope.dimension_count").map_err(w)? != head_dim
    {
        return Err(invalid(g, "llama.rope.dimension_count below the head dim (partial RoPE): not supported"));
    }
    if g.get("llama.rope.scaling.type").is_some_and(|v| v.as_str().is_some_and(|s| s != "none")) {
        return Err(invalid(g, "llama.rope.scaling.type: RoPE scaling is not supported"));
    }
    let embd = g.tensor_info("token_embd.weight").ok_or_else(|| invalid(g, "no tensor token_embd.weight"))?;
    let shape = embd.shape();
    if shape.len() != 2 || shape[1] != hidden {
        return Err(invalid(g, format!("token_embd.weight has shape {shape:?}, expected [vocab, {hidden}]")));
    }
    let opt_u32 = |key: &str| -> Result<Option<u32>, ModelError> {
        match g.get(key) {
            Some(_) => Ok(Some(g.get_u32(key).map_err(w)?)),
            None => Ok(None),
        }
    };
    Ok(LlamaParams {
        vocab_size: shape[0],
        hidden_size: hidden,
        intermediate_size: g.get_usize("llama.feed_forward_length").map_err(w)?,
        num_hidden_layers: g.get_usize("llama.block_count").map_err(w)?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: g.get_f32("llama.attention.layer_norm_rms_epsilon").map_err(w)?,
        rope_theta: match g.get("llama.rope.freq_base") {
            Some(_) => g.get_f32("llama.rope.freq_base").map_err(w)? as f64,
            None => 10_000.0,
        },
        max_position_embeddings: g.get_usize("llama.context_length").map_err(w)?,
        tie_word_embeddings: !g.contains("output.weight"),
        rope_interleave: true,
        bos_token_id: opt_u32("tokenizer.ggml.bos_token_id")?,
        eos_token_ids: opt_u32("tokenizer.ggml.eos_token_id")?.into_iter().collect(),
        indexer: None,
    })
}

/// The GGUF tensor that holds an engine (HF-style) tensor name, if it is one of the base model's.
pub fn gguf_name(name: &str) -> Option<String> {
    match name {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let l: usize = layer.parse().ok()?;
    let t = match tail {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{l}.{t}"))
}

/// Weights from a GGUF base model (dequantised to f32) plus, optionally, indexers from a
/// safetensors side file.
pub struct GgufSource<'a> {
    pub gguf: &'a GgufFile,
    pub side: Option<&'a WeightStore>,
    pub on_tensor: &'a mut dyn FnMut(&str),
}

impl WeightSource for GgufSource<'_> {
    fn has(&self, name: &str) -> bool {
        match gguf_name(name) {
            Some(g) => self.gguf.contains(&g),
            None => self.side.is_some_and(|s| s.contains(name)),
        }
    }

    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let v = match (gguf_name(name), self.side) {
            (Some(g), _) => {
                let v = self.gguf.load_f32_checked(&g, shape).map_err(|e| ModelError::Weights(e.into()))?;
                (self.on_tensor)(&g);
                v
            }
            (None, Some(side)) => {
                let v = side.load_f32(name, shape)?;
                (self.on_tensor)(name);
                v
            }
            (None, None) => {
                return Err(ModelError::Invalid(format!(
                    "{}: the model needs {name}, which a GGUF base model does not hold (indexers come from {INDEXERS_FILE})",
                    self.gguf.path().display()
                )));
            }
        };
        Ok(v)
    }
}

/// What a model directory built on a GGUF declares (`config.json` with [`BASE_GGUF_KEY`]).
#[derive(Debug, Clone)]
pub struct GgufModelDir {
    pub gguf: PathBuf,
    /// `indexers.safetensors` when present.
    pub indexers: Option<PathBuf>,
    pub indexer: Option<(usize, usize, usize, Option<String>)>,
}

/// `Some` when `dir/config.json` names a GGUF base model; its indexer keys are read here.
pub fn read_model_dir(dir: &Path) -> Result<Option<GgufModelDir>, ModelError> {
    let path = dir.join("config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let bad = |m: String| ModelError::Invalid(format!("{}: {m}", path.display()));
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(format!("malformed JSON: {e}")))?;
    let Some(base) = v.get(BASE_GGUF_KEY) else {
        return Ok(None);
    };
    let base = base.as_str().ok_or_else(|| bad(format!("{BASE_GGUF_KEY} must be a path string")))?;
    let get = |k: &str| -> Result<Option<usize>, ModelError> {
        match v.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => {
                x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| bad(format!("{k} must be a non-negative integer")))
            }
        }
    };
    let indexer = match (get("index_n_heads")?, get("index_head_dim")?, get("index_topk")?) {
        (Some(h), Some(d), Some(k)) => {
            let pattern = match v.get("index_topk_pattern") {
                None | Some(Value::Null) => None,
                Some(Value::String(p)) => Some(p.clone()),
                Some(_) => return Err(bad("index_topk_pattern must be a string of F/S".into())),
            };
            Some((h, d, k, pattern))
        }
        (None, None, None) => None,
        _ => return Err(bad("index_n_heads, index_head_dim and index_topk go together".into())),
    };
    let side = dir.join(INDEXERS_FILE);
    Ok(Some(GgufModelDir { gguf: dir.join(base), indexers: side.exists().then_some(side), indexer }))
}

/// Whether a model path names a GGUF file itself (an existing file, or a `.gguf` path that may
/// not exist yet, so its error names the file) rather than a model directory.
pub fn is_gguf_file(model: &Path) -> bool {
    model.is_file() || model.extension().is_some_and(|e| e == "gguf")
}

/// The [`BASE_GGUF_KEY`] value for a model directory `dir` built on `gguf`: the GGUF's path as
/// seen from `dir` (`../../data/m.gguf`), or its path as given when either cannot be resolved.
pub fn base_gguf_value(gguf: &Path, dir: &Path) -> String {
    let (Ok(p), Ok(d)) = (gguf.canonicalize(), dir.canonicalize()) else {
        return gguf.display().to_string();
    };
    let (pc, dc): (Vec<_>, Vec<_>) = (p.components().collect(), d.components().collect());
    let common = pc.iter().zip(&dc).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..dc.len() {
        rel.push("..");
    }
    for c in &pc[common..] {
        rel.push(c);
    }
    rel.display().to_string()
}

/// [`LlamaParams`] with the indexers a model directory declares.
pub fn with_indexer(
    mut p: LlamaParams,
    spec: &(usize, usize, usize, Option<String>),
    origin: &str,
) -> Result<LlamaParams, ModelError> {
    let (n_heads, head_dim, topk, pattern) = spec;
    let schedule = match pattern {
        Some(pat) => IndexSchedule::from_pattern(pat, p.num_hidden_layers)
            .map_err(|e| ModelError::Invalid(format!("{origin}: index_topk_pattern: {e}")))?,
        None => IndexSchedule::all_full(p.num_hidden_layers),
    };
    p.indexer = Some(LlamaIndexer { n_heads: *n_heads, head_dim: *head_dim, topk: *topk, schedule });
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_gguf_is_relative_to_the_model_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let (data, out) = (tmp.path().join("data"), tmp.path().join("runs/out"));
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        let g = data.join("m.gguf");
        std::fs::write(&g, b"").unwrap();
        assert_eq!(base_gguf_value(&g, &out), "../../data/m.gguf");
        assert_eq!(base_gguf_value(&g, &data), "m.gguf");
        let missing = tmp.path().join("nope.gguf");
        assert_eq!(base_gguf_value(&missing, &out), missing.display().to_string());
    }
}
