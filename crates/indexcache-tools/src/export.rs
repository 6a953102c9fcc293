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
use indexcache_config::{Arch, IndexSchedule, ModelConfig};
use indexcache_weights::WeightStore;
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
}

impl FromStr for ExportFormat {
    type Err = ToolError;
    fn from_str(s: &str) -> Result<Self, ToolError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "hf" | "transformers" | "huggingface" => Ok(Self::Hf),
            "sglang" => Ok(Self::Sglang),
            "vllm" => Ok(Self::Vllm),
            _ => Err(ToolError::Invalid(format!("unknown export format {s:?} (expected hf, sglang or vllm)"))),
        }
    }
}

impl fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Hf => "hf",
            Self::Sglang => "sglang",
            Self::Vllm => "vllm",
        })
    }
}

/// A pattern read from the command line or a file, not yet checked against a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternInput {
    /// The `F`/`S` string (whitespace removed).
    pub pattern: String,
    /// The file it came from, if any.
    pub file: Option<PathBuf>,
    /// E.g. a `pattern.json` of an unfinished search.
    pub warnings: Vec<String>,
}

/// Reads a pattern given either literally (`"FSSF…"`) or as a file: a JSON object with a
/// `"pattern"` string (such as the `pattern.json` written by `indexcache search`), a JSON string,
/// or plain text (all whitespace is removed, so long patterns may be wrapped).
///
/// An existing path is always read as a file. Otherwise an argument made only of `F`/`S` is the
/// pattern itself; anything that looks like a path (`/`, `\` or a `.json`/`.txt` ending) is a
/// missing file; the rest is passed on as a pattern so the error names the bad character.
pub fn read_pattern(arg: &str) -> Result<PatternInput, ToolError> {
    let path = Path::new(arg);
    if !arg.is_empty() && path.exists() {
        return read_pattern_file(path);
    }
    let literal: String = arg.chars().filter(|c| !c.is_whitespace()).collect();
    let looks_like_path = arg.contains('/')
        || arg.contains('\\')
        || [".json", ".txt"].iter().any(|ext| arg.to_ascii_lowercase().ends_with(ext));
    if looks_like_path && !literal.chars().all(|c| c == 'F' || c == 'S') {
        return Err(ToolError::file(path, "no such pattern file"));
    }
    Ok(PatternInput { pattern: literal, file: None, warnings: Vec::new() })
}

/// Reads a pattern file (see [`read_pattern`]).
pub fn read_pattern_file(path: &Path) -> Result<PatternInput, ToolError> {
    let text = std::fs::read_to_string(path).map_err(|e| ToolError::file(path, e))?;
    let trimmed = text.trim_start();
    let mut warnings = Vec::new();
    let pattern = if trimmed.starts_with('{') || trimmed.starts_with('"') {
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ToolError::file(path, format!("invalid JSON: {e}")))?;
        match &v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Object(m) => {
                let p = m.get("pattern").and_then(|p| p.as_str()).ok_or_else(|| {
                    ToolError::file(
                        path,
                        "JSON object has no \"pattern\" string field (expected {\"pattern\": \"FSS…\"})",
                    )
                })?;
                if m.get("done").and_then(|d| d.as_bool()) == Some(false) {
                    warnings.push(format!(
                        "{}: the search that wrote this file has not finished (\"done\": false); \
                         exporting its current pattern",
                        path.display()
                    ));
                }
                p.to_string()
            }
            _ => return Err(ToolError::file(path, "expected a JSON object with a \"pattern\" field")),
        }
    } else {
        text.clone()
    };
    let pattern: String = pattern.chars().filter(|c| !c.is_whitespace()).collect();
    if pattern.is_empty() {
        return Err(ToolError::file(path, "the pattern is empty"));
    }
    Ok(PatternInput { pattern, file: Some(path.to_path_buf()), warnings })
}

/// What to export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOptions {
    pub format: ExportFormat,
    /// The pattern, or a file holding it (see [`read_pattern`]).
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
        ExportFormat::Hf => {
            let model = model.as_ref().ok_or_else(|| ToolError::Invalid("hf export needs --model DIR".into()))?;
            let out = opts.out.as_deref().ok_or_else(|| ToolError::Invalid("hf export needs --out DIR".into()))?;
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
                return Err(ToolError::Invalid(format!("--out is only used by the hf format, not {}", opts.format)));
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

/// The model directory's config and which layers have indexer weights.
struct ModelInfo {
    dir: PathBuf,
    cfg: ModelConfig,
    raw: Value,
    has_indexer_types: bool,
    /// `None` when the weights could not be opened (a warning was recorded).
    indexer_layers: Option<Vec<bool>>,
}

fn indexer_tensor(l: usize) -> String {
    format!("model.layers.{l}.self_attn.indexer.wk.weight")
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
            Ok(store) => Some((0..cfg.num_hidden_layers).map(|l| store.contains(&indexer_tensor(l))).collect()),
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
                    indexer_tensor(l),
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
    std::fs::create_dir_all(out).map_err(|e| ToolError::file(out, e))?;

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
}
