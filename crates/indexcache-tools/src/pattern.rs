//! Reading a Full/Shared pattern as every `--pattern` option takes it: literally (`"FSSF…"`) or
//! from a file (a search's `pattern.json`, a JSON string, or plain text). Checking it against a
//! model is [`indexcache_config::IndexSchedule::from_pattern`]'s job.

use crate::error::ToolError;
use std::path::{Path, PathBuf};

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
