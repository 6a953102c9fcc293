//! Calibration and evaluation data: text files → token ids → fixed windows.
//!
//! Accepted inputs (`--data`): UTF-8 text files (`.txt`, or any other extension), directories
//! (every `*.txt` inside, sorted), and pre-tokenised files — `.json` (an array of ids, or an
//! array of arrays) and `.safetensors` (an integer tensor `input_ids`, 1-D or `[windows, len]`).

use crate::error::ToolError;
use indexcache_weights::{DType, WeightStore};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// A token sequence to score. Targets are `ids[score_from..]`, each predicted from the tokens
/// before it inside the window (`score_from ≥ 1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub ids: Vec<u32>,
    pub score_from: usize,
}

impl Window {
    pub fn targets(&self) -> usize {
        self.ids.len().saturating_sub(self.score_from)
    }
}

/// Token streams loaded from `paths`: one stream per text file, one per pre-tokenised row.
pub fn load_token_streams(paths: &[PathBuf], tokenizer: Option<&Tokenizer>) -> Result<Vec<Vec<u32>>, ToolError> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| ToolError::file(p, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "txt"))
                .collect();
            inside.sort();
            if inside.is_empty() {
                return Err(ToolError::file(p, "directory has no *.txt files"));
            }
            files.extend(inside);
        } else {
            files.push(p.clone());
        }
    }
    if files.is_empty() {
        return Err(ToolError::Invalid("no data files given".into()));
    }
    let mut streams = Vec::new();
    for f in &files {
        match f.extension().and_then(|x| x.to_str()) {
            Some("safetensors") => streams.extend(read_safetensors_ids(f)?),
            Some("json") => streams.extend(read_json_ids(f)?),
            _ => {
                let text = std::fs::read_to_string(f).map_err(|e| ToolError::file(f, e))?;
                let tok = tokenizer.ok_or_else(|| {
                    ToolError::file(f, "text data needs a tokenizer (tokenizer.json in the model directory)")
                })?;
                streams.push(tokenize(tok, &text).map_err(|e| ToolError::file(f, e))?);
            }
        }
    }
    Ok(streams)
}

/// Tokenise without special tokens.
pub fn tokenize(tok: &Tokenizer, text: &str) -> Result<Vec<u32>, ToolError> {
    Ok(tok.encode(text, false).map_err(|e| ToolError::Invalid(format!("tokenizing: {e}")))?.get_ids().to_vec())
}

fn read_safetensors_ids(path: &Path) -> Result<Vec<Vec<u32>>, ToolError> {
    let store = WeightStore::open_files(&[path.to_path_buf()]).map_err(|e| ToolError::file(path, e))?;
    let (dtype, shape, bytes) = store.raw("input_ids").map_err(|e| ToolError::file(path, e))?;
    let ids: Vec<i64> = match dtype {
        DType::I64 => bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
        DType::I32 => {
            bytes.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64).collect()
        }
        other => return Err(ToolError::file(path, format!("input_ids must be I32 or I64, found {other:?}"))),
    };
    let ids = to_u32(path, ids)?;
    Ok(match shape {
        [_] => vec![ids],
        [_, cols] if *cols > 0 => ids.chunks(*cols).map(<[u32]>::to_vec).collect(),
        _ => return Err(ToolError::file(path, format!("input_ids must be 1-D or 2-D, found shape {shape:?}"))),
    })
}

fn read_json_ids(path: &Path) -> Result<Vec<Vec<u32>>, ToolError> {
    let text = std::fs::read_to_string(path).map_err(|e| ToolError::file(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ToolError::file(path, e))?;
    let as_ids = |v: &serde_json::Value| -> Result<Vec<u32>, ToolError> {
        let arr = v.as_array().ok_or_else(|| ToolError::file(path, "expected an array of token ids"))?;
        let ids = arr
            .iter()
            .map(|x| x.as_i64().ok_or_else(|| ToolError::file(path, format!("not a token id: {x}"))))
            .collect::<Result<Vec<i64>, _>>()?;
        to_u32(path, ids)
    };
    match v.as_array() {
        Some(rows) if rows.first().is_some_and(|r| r.is_array()) => rows.iter().map(as_ids).collect(),
        _ => Ok(vec![as_ids(&v)?]),
    }
}

fn to_u32(path: &Path, ids: Vec<i64>) -> Result<Vec<u32>, ToolError> {
    ids.into_iter()
        .map(|i| u32::try_from(i).map_err(|_| ToolError::file(path, format!("token id {i} out of range"))))
        .collect()
}

/// Cut streams into windows of at most `ctx` tokens. With `stride < ctx` windows overlap and
/// each one scores only the tokens the previous one did not (the usual sliding-window
/// perplexity); with `stride == ctx` they are disjoint. Streams shorter than 2 tokens are
/// skipped; `max_windows` caps the total.
pub fn windows(streams: &[Vec<u32>], ctx: usize, stride: usize, max_windows: Option<usize>) -> Vec<Window> {
    assert!(ctx >= 2 && stride >= 1 && stride <= ctx, "invariant: validated by the caller");
    let mut out = Vec::new();
    'streams: for s in streams {
        if s.len() < 2 {
            continue;
        }
        let mut scored_until = 1; // first target is ids[1]
        let mut begin = 0;
        loop {
            let end = (begin + ctx).min(s.len());
            let score_from = scored_until.max(begin + 1) - begin;
            if end - begin > score_from {
                out.push(Window { ids: s[begin..end].to_vec(), score_from });
                if max_windows.is_some_and(|m| out.len() >= m) {
                    break 'streams;
                }
            }
            scored_until = end;
            if end == s.len() {
                break;
            }
            begin += stride;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disjoint_windows_score_every_token_once() {
        let s: Vec<u32> = (0..10).collect();
        let w = windows(&[s], 4, 4, None);
        assert_eq!(w.iter().map(|w| w.ids.len()).collect::<Vec<_>>(), vec![4, 4, 2]);
        // 9 targets in all: ids[1..10]... minus the first token of each later window, which has
        // no context inside its window — disjoint windows score len-1 each.
        assert_eq!(w.iter().map(Window::targets).sum::<usize>(), 3 + 3 + 1);
    }

    #[test]
    fn sliding_windows_score_each_target_exactly_once() {
        let s: Vec<u32> = (0..20).collect();
        let w = windows(&[s], 8, 3, None);
        let mut scored = Vec::new();
        let mut begin = 0;
        for win in &w {
            for j in win.score_from..win.ids.len() {
                scored.push(win.ids[j]);
            }
            assert_eq!(win.ids[0], begin as u32);
            begin += 3;
        }
        assert_eq!(scored, (1..20).collect::<Vec<u32>>());
    }

    #[test]
    fn max_windows_caps() {
        let s: Vec<u32> = (0..100).collect();
        assert_eq!(windows(&[s], 10, 10, Some(3)).len(), 3);
    }
}
