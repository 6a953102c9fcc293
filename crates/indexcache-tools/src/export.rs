//! Export a Full/Shared pattern as configuration for other runtimes.
//!
//! * [`ExportFormat::Hf`] — a new checkpoint directory for transformers (and any engine that reads
//!   `config.json`): `config.json` with the pattern written into it, plus **hard links** (copies
//!   where linking fails, e.g. across filesystems) of every other file of the model directory, so
//!   `from_pretrained(out)` works directly and no weight bytes are duplicated. In `config.json`:
//!   - `indexer_types` (`["full", "shared", …]`) and `index_topk_pattern` (`"FSS…"`) are set — both,
//!     because `indexer_types` wins in transformers / SGLang (so a stale list from the source would
//!     silently override the pattern) and `index_topk_pattern` is what vLLM reads;
//!   - `use_index_cache: true` is set, which vLLM needs to honour the pattern (others ignore it);
//!   - `index_topk_freq` and `index_skip_topk_offset` are **removed**: the pattern overrides them
//!     everywhere we know of, but a reader that only understood the frequency rule would otherwise
//!     run a different schedule; without them such a reader falls back to all-Full (plain DSA);
//!   - every other key is kept, in its original order, written with 2-space indentation.
//!
//!   An existing non-empty output directory is refused unless `force`; the output directory can
//!   never be the model directory. Hard links share their bytes with the source checkpoint: replace
//!   such a file (as this export does with `config.json`), never edit it in place.
//! * [`ExportFormat::Sglang`] — `--json-model-override-args '{"index_topk_pattern": "FSS…"}'`.
//! * [`ExportFormat::Vllm`] — `--hf-overrides '{"use_index_cache": true, "index_topk_pattern": "FSS…"}'`.
//!
//! For the two override flags, when the model's `config.json` carries its own `indexer_types`
//! (GLM-5.2 style checkpoints) the override also sets `indexer_types`, since that key takes
//! precedence over `index_topk_pattern`.
//!
//! The pattern is validated with [`IndexSchedule::from_pattern`] (only `F`/`S`, layer 0 Full, one
//! character per layer of the model when one is given). A Full layer whose indexer weights the
//! checkpoint does not hold (`model.layers.{l}.self_attn.indexer.wk.weight`) is reported as a
//! warning: such a checkpoint can only run the pattern if the runtime has those weights elsewhere.

use crate::error::ToolError;
use crate::pattern::{PatternInput, read_pattern};
use indexcache_config::{Arch, IndexSchedule, ModelConfig};
use indexcache_model::ModelError;
use indexcache_model::gguf::{
    BASE_GGUF_KEY, GgufModelDir, INDEXERS_FILE, base_gguf_value, is_gguf_file, llama_params, read_model_dir,
};
use indexcache_model::weights::indexer_probe;
use indexcache_weights::{DType, GgufFile, WeightStore};
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where the pattern goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// A transformers checkpoint directory (`config.json` + linked weights).
    Hf,
    /// SGLang `--json-model-override-args`.
    Sglang,
    /// vLLM `--hf-overrides`.
    Vllm,
    /// A model directory for this engine with the pattern as its schedule: for a checkpoint the
    /// same as [`ExportFormat::Hf`]; for lightning indexers on a GGUF base model, `config.json`
    /// (base re-pointed, `index_topk_pattern` set) and `indexers.safetensors` holding only the
    /// Full layers' indexers.
    Indexcache,
}

impl FromStr for ExportFormat {
    type Err = ToolError;
    fn from_str(s: &str) -> Result<Self, ToolError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "hf" | "transformers" | "huggingface" => Ok(Self::Hf),
            "sglang" => Ok(Self::Sglang),
            "vllm" => Ok(Self::Vllm),
            "indexcache" => Ok(Self::Indexcache),
            _ => Err(ToolError::Invalid(format!(
                "unknown export format {s:?} (expected hf, sglang, vllm or indexcache)"
            ))),
        }
    }
}

impl fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Hf => "hf",
            Self::Sglang => "sglang",
            Self::Vllm => "vllm",
            Self::Indexcache => "indexcache",
        })
    }
}

/// What to export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOptions {
    pub format: ExportFormat,
    /// The pattern, or a file holding it (see [`crate::pattern::read_pattern`]).
    pub pattern: String,
    /// The checkpoint directory: required for [`ExportFormat::Hf`]; for the override flags it
    /// enables the length check, the indexer-weight check and the `indexer_types` precedence fix.
    pub model: Option<PathBuf>,
    /// Output directory ([`ExportFormat::Hf`] only).
    pub out: Option<PathBuf>,
    /// Write into an existing non-empty output directory (files of the same name are replaced).
    pub force: bool,
}

/// How one checkpoint file reached the output directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileAction {
    /// Written by the export (`config.json`).
    Written,
    HardLinked,
    /// Hard linking failed (e.g. another filesystem); the bytes were copied.
    Copied,
    /// Not a regular file (e.g. a subdirectory); left out.
    Skipped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedFile {
    pub name: String,
    pub action: FileAction,
}

/// The result of [`export`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportResult {
    pub format: ExportFormat,
    pub pattern: String,
    pub layers: usize,
    pub full_layers: Vec<usize>,
    /// The command-line flag for [`ExportFormat::Sglang`] / [`ExportFormat::Vllm`].
    pub args: Option<String>,
    /// The output directory for [`ExportFormat::Hf`].
    pub out: Option<PathBuf>,
    /// What happened to each file of the model directory ([`ExportFormat::Hf`]).
    pub files: Vec<ExportedFile>,
    pub warnings: Vec<String>,
}

/// Validates the pattern and exports it (see the module documentation).
pub fn export(opts: &ExportOptions) -> Result<ExportResult, ToolError> {
    let input = read_pattern(&opts.pattern)?;
    if let Some(m) = &opts.model
        && let Some(base) = gguf_base(m)?
    {
        return export_gguf(opts, m, base, input);
    }
    let mut warnings = input.warnings.clone();

    let model = match &opts.model {
        Some(dir) => Some(ModelInfo::read(dir, &mut warnings)?),
        None => None,
    };
    let n_layers = model.as_ref().map_or(input.pattern.chars().count(), |m| m.cfg.num_hidden_layers);
    let schedule = IndexSchedule::from_pattern(&input.pattern, n_layers)?;
    let pattern = schedule.to_pattern();
    if let Some(m) = &model {
        warnings.extend(m.missing_indexer_warnings(&schedule));
    }

    let mut result = ExportResult {
        format: opts.format,
        pattern: pattern.clone(),
        layers: n_layers,
        full_layers: schedule.full_layers(),
        args: None,
        out: None,
        files: Vec::new(),
        warnings: Vec::new(),
    };

    match opts.format {
        ExportFormat::Hf | ExportFormat::Indexcache => {
            let needs = |what| ToolError::Invalid(format!("{} export needs {what}", opts.format));
            let model = model.as_ref().ok_or_else(|| needs("--model DIR"))?;
            let out = opts.out.as_deref().ok_or_else(|| needs("--out DIR"))?;
            if model.cfg.arch == Arch::DeepseekV32 {
                warnings.push(
                    "model_type deepseek_v32: transformers added the IndexCache keys for glm_moe_dsa \
                     (transformers#45424); check that your transformers version reads indexer_types / \
                     index_topk_pattern for deepseek_v32 (vLLM, SGLang and this engine do)"
                        .into(),
                );
            }
            result.files = write_hf(model, &schedule, out, opts.force)?;
            result.out = Some(out.to_path_buf());
        }
        ExportFormat::Sglang | ExportFormat::Vllm => {
            if opts.out.is_some() {
                return Err(ToolError::Invalid(format!(
                    "--out is only used by the hf and indexcache formats, not {}",
                    opts.format
                )));
            }
            let mut entries: Vec<(&str, Value)> = Vec::new();
            if opts.format == ExportFormat::Vllm {
                entries.push(("use_index_cache", Value::Bool(true)));
            }
            entries.push(("index_topk_pattern", Value::String(pattern.clone())));
            match &model {
                Some(m) if m.has_indexer_types => {
                    entries.push(("indexer_types", indexer_types(&schedule)));
                    warnings.push(
                        "the model's config.json has indexer_types, which takes precedence over \
                         index_topk_pattern; the override sets it too"
                            .into(),
                    );
                }
                Some(_) => {}
                None => warnings.push(format!(
                    "no --model given: the pattern's length ({n_layers}) and the checkpoint's indexer weights \
                     were not checked, and if its config.json has indexer_types that list would take precedence \
                     over index_topk_pattern"
                )),
            }
            let flag = match opts.format {
                ExportFormat::Sglang => "--json-model-override-args",
                _ => "--hf-overrides",
            };
            result.args = Some(format!("{flag} '{}'", inline_json(&entries)));
        }
    }
    result.warnings = warnings;
    Ok(result)
}

/// The GGUF base of a model path: `Some` for a model directory whose `config.json` names one;
/// a bare `.gguf` file is refused (it has no indexers to schedule).
fn gguf_base(model: &Path) -> Result<Option<GgufModelDir>, ToolError> {
    if is_gguf_file(model) {
        return Err(ToolError::file(
            model,
            "a GGUF file is a dense model without lightning indexers, so it has no pattern to export; \
             `indexcache distill` adds indexers and writes a model directory",
        ));
    }
    Ok(read_model_dir(model)?)
}

/// The layer a tensor name belongs to (`model.layers.{l}.…`).
fn tensor_layer(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

/// [`ExportFormat::Indexcache`] for lightning indexers on a GGUF base model; the other formats
/// are refused with the reason (no transformers, SGLang or vLLM architecture is llama + indexers).
fn export_gguf(
    opts: &ExportOptions,
    dir: &Path,
    base: GgufModelDir,
    input: PatternInput,
) -> Result<ExportResult, ToolError> {
    if opts.format != ExportFormat::Indexcache {
        return Err(ToolError::file(
            dir,
            format!(
                "lightning indexers on a GGUF base model have no {} format (transformers, SGLang and vLLM serve \
                 DeepSeek-V3.2 / GLM-5 checkpoints); `--format indexcache --out DIR` writes a model directory with \
                 the pattern for this engine, or pass the pattern file to any command (`--pattern FILE`)",
                opts.format
            ),
        ));
    }
    let out = opts.out.as_deref().ok_or_else(|| ToolError::Invalid("indexcache export needs --out DIR".into()))?;
    let config_path = dir.join("config.json");
    let (Some(_), Some(side_path)) = (&base.indexer, &base.indexers) else {
        return Err(ToolError::file(
            &config_path,
            format!("declares no lightning indexers (index_* keys and {INDEXERS_FILE}); nothing to schedule"),
        ));
    };
    let gguf = GgufFile::open(&base.gguf)?;
    let n_layers = llama_params(&gguf)?.num_hidden_layers;
    let schedule = IndexSchedule::from_pattern(&input.pattern, n_layers)?;
    let side = WeightStore::open_files(std::slice::from_ref(side_path)).map_err(ModelError::from)?;
    for l in schedule.full_layers() {
        if !side.contains(&indexer_probe(l)) {
            return Err(ToolError::file(
                side_path,
                format!("layer {l} is Full in the pattern but {} is missing", indexer_probe(l)),
            ));
        }
    }
    let same = matches!((dir.canonicalize(), out.canonicalize()), (Ok(a), Ok(b)) if a == b);
    if same {
        return Err(ToolError::file(out, "the output directory is the model directory; choose another --out"));
    }
    prepare_out(out, opts.force)?;

    // indexers.safetensors: the Full layers' tensors (and any not tied to a layer), bytes as stored.
    let mut kept = Vec::new();
    let mut dropped = 0usize;
    for name in side.names() {
        if tensor_layer(name).is_some_and(|l| l >= n_layers || !schedule.is_full(l)) {
            dropped += 1;
            continue;
        }
        let (dtype, shape, bytes) = side.raw(name).map_err(ModelError::from)?;
        let dtype = match dtype {
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
            DType::F8E4M3 => Dtype::F8_E4M3,
            DType::I32 => Dtype::I32,
            DType::I64 => Dtype::I64,
            DType::Other => return Err(ToolError::file(side_path, format!("{name}: unsupported dtype"))),
        };
        let view = TensorView::new(dtype, shape.to_vec(), bytes)
            .map_err(|e| ToolError::file(side_path, format!("{name}: {e}")))?;
        kept.push((name.to_string(), view));
    }
    let side_out = out.join(INDEXERS_FILE);
    let bytes =
        safetensors::serialize(kept, None).map_err(|e| ToolError::file(&side_out, format!("serialising: {e}")))?;
    remove_existing(&side_out)?;
    std::fs::write(&side_out, bytes).map_err(|e| ToolError::file(&side_out, e))?;

    // config.json: the same keys, the base re-pointed from the new directory, the pattern set.
    let text = std::fs::read_to_string(&config_path).map_err(|e| ToolError::file(&config_path, e))?;
    let mut cfg: Value = serde_json::from_str(&text).map_err(|e| ToolError::file(&config_path, e))?;
    let Value::Object(entries) = &mut cfg else {
        return Err(ToolError::file(&config_path, "config.json is not a JSON object"));
    };
    let gguf_abs = base.gguf.canonicalize().map_err(|e| ToolError::file(&base.gguf, e))?;
    set_key(entries, BASE_GGUF_KEY, Value::String(base_gguf_value(&gguf_abs, out)));
    set_key(entries, "index_topk_pattern", Value::String(schedule.to_pattern()));
    let config_out = out.join("config.json");
    let text =
        serde_json::to_string_pretty(&cfg).map_err(|e| ToolError::Invalid(format!("writing config.json: {e}")))?;
    remove_existing(&config_out)?;
    std::fs::write(&config_out, text + "\n").map_err(|e| ToolError::file(&config_out, e))?;

    // The engine must read back exactly this base and schedule.
    let back = read_model_dir(out)?.ok_or_else(|| ToolError::file(&config_out, "does not read back"))?;
    let back_pattern = back.indexer.as_ref().and_then(|i| i.3.clone());
    let back_gguf = back.gguf.canonicalize().ok();
    if back_pattern.as_deref() != Some(schedule.to_pattern().as_str()) || back_gguf.as_deref() != Some(&*gguf_abs) {
        return Err(ToolError::file(&config_out, "does not read back as the exported base and pattern"));
    }
    let mut warnings = input.warnings;
    if dropped > 0 {
        warnings.push(format!(
            "{dropped} indexer tensors of the {} Shared layers left out: the directory runs this pattern, or \
             schedules whose Full layers are among [{}]",
            n_layers - schedule.num_full(),
            schedule.full_layers().iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(ExportResult {
        format: opts.format,
        pattern: schedule.to_pattern(),
        layers: n_layers,
        full_layers: schedule.full_layers(),
        args: None,
        out: Some(out.to_path_buf()),
        files: vec![
            ExportedFile { name: "config.json".into(), action: FileAction::Written },
            ExportedFile { name: INDEXERS_FILE.into(), action: FileAction::Written },
        ],
        warnings,
    })
}

/// The model directory's config and which layers have indexer weights.
struct ModelInfo {
    dir: PathBuf,
    cfg: ModelConfig,
    raw: Value,
    has_indexer_types: bool,
    /// `None` when the weights could not be opened (a warning was recorded).
    indexer_layers: Option<Vec<bool>>,
}

impl ModelInfo {
    fn read(dir: &Path, warnings: &mut Vec<String>) -> Result<Self, ToolError> {
        if !dir.is_dir() {
            return Err(ToolError::file(dir, "not a model directory"));
        }
        let config_path = dir.join("config.json");
        let cfg = ModelConfig::from_file(&config_path)?;
        let text = std::fs::read_to_string(&config_path).map_err(|e| ToolError::file(&config_path, e))?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| ToolError::file(&config_path, e))?;
        let has_indexer_types = raw.get("indexer_types").is_some_and(|v| !matches!(v, Value::Null));
        let indexer_layers = match WeightStore::open(dir) {
            Ok(store) => Some((0..cfg.num_hidden_layers).map(|l| store.contains(&indexer_probe(l))).collect()),
            Err(e) => {
                warnings.push(format!("could not open the checkpoint's weights to check its indexers: {e}"));
                None
            }
        };
        Ok(Self { dir: dir.to_path_buf(), cfg, raw, has_indexer_types, indexer_layers })
    }

    fn missing_indexer_warnings(&self, schedule: &IndexSchedule) -> Vec<String> {
        let Some(has) = &self.indexer_layers else { return Vec::new() };
        let missing: Vec<usize> = schedule.full_layers().into_iter().filter(|&l| !has[l]).collect();
        if missing.is_empty() {
            return Vec::new();
        }
        let available: Vec<String> = (0..has.len()).filter(|&l| has[l]).map(|l| l.to_string()).collect();
        missing
            .iter()
            .map(|&l| {
                format!(
                    "layer {l} is Full in the pattern but the checkpoint has no indexer weights for it ({} is missing; \
                     layers with indexers: [{}]); runtimes that build indexers only where the checkpoint has them \
                     will fail or run an uninitialised indexer",
                    indexer_probe(l),
                    available.join(", ")
                )
            })
            .collect()
    }
}

fn indexer_types(schedule: &IndexSchedule) -> Value {
    Value::Array(
        (0..schedule.len())
            .map(|l| Value::String(if schedule.is_full(l) { "full" } else { "shared" }.into()))
            .collect(),
    )
}

fn write_hf(
    model: &ModelInfo,
    schedule: &IndexSchedule,
    out: &Path,
    force: bool,
) -> Result<Vec<ExportedFile>, ToolError> {
    let same = match (std::fs::canonicalize(&model.dir), std::fs::canonicalize(out)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(ToolError::file(out, "the output directory is the model directory; choose another --out"));
    }
    prepare_out(out, force)?;

    // config.json
    let mut cfg = model.raw.clone();
    let Value::Object(entries) = &mut cfg else {
        return Err(ToolError::file(&model.dir.join("config.json"), "config.json is not a JSON object"));
    };
    set_key(entries, "indexer_types", indexer_types(schedule));
    set_key(entries, "index_topk_pattern", Value::String(schedule.to_pattern()));
    set_key(entries, "use_index_cache", Value::Bool(true));
    entries.retain(|k, _| k != "index_topk_freq" && k != "index_skip_topk_offset");
    let text =
        serde_json::to_string_pretty(&cfg).map_err(|e| ToolError::Invalid(format!("writing config.json: {e}")))?;
    let config_out = out.join("config.json");
    remove_existing(&config_out)?;
    std::fs::write(&config_out, text + "\n").map_err(|e| ToolError::file(&config_out, e))?;
    let mut files = vec![ExportedFile { name: "config.json".into(), action: FileAction::Written }];

    // Everything else: hard links, falling back to copies.
    let mut names: Vec<(String, PathBuf)> = Vec::new();
    for ent in std::fs::read_dir(&model.dir).map_err(|e| ToolError::file(&model.dir, e))? {
        let ent = ent.map_err(|e| ToolError::file(&model.dir, e))?;
        let Some(name) = ent.file_name().to_str().map(str::to_string) else {
            return Err(ToolError::file(&ent.path(), "file name is not valid UTF-8"));
        };
        if name != "config.json" {
            names.push((name, ent.path()));
        }
    }
    names.sort();
    for (name, src) in names {
        let dst = out.join(&name);
        if !src.is_file() {
            files.push(ExportedFile { name, action: FileAction::Skipped });
            continue;
        }
        // Link the file itself, not a symlink to it (HF cache snapshots are symlinks to blobs).
        let real = std::fs::canonicalize(&src).map_err(|e| ToolError::file(&src, e))?;
        remove_existing(&dst)?;
        let action = match std::fs::hard_link(&real, &dst) {
            Ok(()) => FileAction::HardLinked,
            Err(_) => {
                std::fs::copy(&real, &dst)
                    .map_err(|e| ToolError::file(&dst, format!("copying {}: {e}", src.display())))?;
                FileAction::Copied
            }
        };
        files.push(ExportedFile { name, action });
    }

    // The engine must read back exactly this schedule.
    let check = ModelConfig::from_file(&config_out)?;
    if check.schedule != *schedule {
        return Err(ToolError::file(
            &config_out,
            format!("reads back as {} instead of {}", check.schedule.to_pattern(), schedule.to_pattern()),
        ));
    }
    Ok(files)
}

/// Creates `out`, refusing an existing non-empty directory unless `force`.
fn prepare_out(out: &Path, force: bool) -> Result<(), ToolError> {
    if out.exists() {
        if !out.is_dir() {
            return Err(ToolError::file(out, "exists and is not a directory"));
        }
        let non_empty = std::fs::read_dir(out).map_err(|e| ToolError::file(out, e))?.next().is_some();
        if non_empty && !force {
            return Err(ToolError::file(
                out,
                "output directory exists and is not empty (use --force to write into it)",
            ));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| ToolError::file(out, e))
}

/// Removes a file (or link) at `p` so that a new one never writes through an old hard link.
fn remove_existing(p: &Path) -> Result<(), ToolError> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => Err(ToolError::file(p, "is a directory; refusing to replace it")),
        Ok(_) => std::fs::remove_file(p).map_err(|e| ToolError::file(p, e)),
        Err(_) => Ok(()),
    }
}

/// Replaces `key` in place, or inserts it: in sorted position when the keys are sorted (as
/// transformers writes them), else at the end. (serde_json's `preserve_order` keeps file order.)
fn set_key(entries: &mut Map<String, Value>, key: &str, value: Value) {
    if let Some(v) = entries.get_mut(key) {
        *v = value;
        return;
    }
    let keys: Vec<&String> = entries.keys().collect();
    let sorted = keys.windows(2).all(|w| w[0] <= w[1]);
    let at = if sorted { keys.partition_point(|k| k.as_str() < key) } else { keys.len() };
    entries.shift_insert(at, key.to_string(), value);
}

/// `{"a": true, "b": "x", "c": ["p", "q"]}` — one line, Python `json.dumps` spacing.
fn inline_json(entries: &[(&str, Value)]) -> String {
    fn value(v: &Value) -> String {
        match v {
            Value::Array(items) => format!("[{}]", items.iter().map(value).collect::<Vec<_>>().join(", ")),
            other => serde_json::to_string(other).unwrap_or_default(),
        }
    }
    let body: Vec<String> = entries
        .iter()
        .map(|(k, v)| format!("{}: {}", serde_json::to_string(k).unwrap_or_default(), value(v)))
        .collect();
    format!("{{{}}}", body.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_keeps_key_order_and_values() {
        let text =
            r#"{"z": 1, "a": {"y": [1, 2.5, null], "b": "s"}, "m": true, "f": 1e-05, "big": 18446744073709551615}"#;
        let v: Value = serde_json::from_str(text).unwrap();
        let out = serde_json::to_string(&v).unwrap();
        assert!(out.starts_with(r#"{"z":1,"a":{"y":[1,2.5,null],"b":"s"},"m":true,"f":"#), "{out}");
        assert!(out.ends_with(r#","big":18446744073709551615}"#), "{out}");
        let a: serde_json::Value = serde_json::from_str(text).unwrap();
        let b: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn set_key_sorted_and_unsorted() {
        let map = |keys: &[&str]| -> Map<String, Value> { keys.iter().map(|k| (k.to_string(), Value::Null)).collect() };
        let mut e = map(&["a", "c"]);
        set_key(&mut e, "b", Value::Bool(true));
        assert_eq!(e.keys().map(String::as_str).collect::<Vec<_>>(), ["a", "b", "c"]);
        set_key(&mut e, "a", Value::Bool(false));
        assert_eq!(e["a"], Value::Bool(false));
        assert_eq!(e.keys().next().map(String::as_str), Some("a"));
        let mut u = map(&["c", "a"]);
        set_key(&mut u, "b", Value::Null);
        assert_eq!(u.keys().map(String::as_str).collect::<Vec<_>>(), ["c", "a", "b"]);
    }

    #[test]
    fn inline_json_spacing() {
        let s = inline_json(&[
            ("use_index_cache", Value::Bool(true)),
            ("indexer_types", Value::Array(vec![Value::String("full".into()), Value::String("shared".into())])),
        ]);
        assert_eq!(s, r#"{"use_index_cache": true, "indexer_types": ["full", "shared"]}"#);
    }

    #[test]
    fn layer_of_tensor_names() {
        assert_eq!(tensor_layer("model.layers.12.self_attn.indexer.wk.weight"), Some(12));
        assert_eq!(tensor_layer("model.norm.weight"), None);
        assert_eq!(tensor_layer("model.layers.x.y"), None);
    }
}
