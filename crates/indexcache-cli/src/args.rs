//! Options shared by several commands.

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use indexcache_config::ScheduleOverride;
use std::path::PathBuf;

/// Where the model is.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model directory (config.json + *.safetensors [+ tokenizer.json]).
    #[arg(long, short = 'm')]
    pub model: PathBuf,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnOff {
    On,
    Off,
}

/// Override the checkpoint's IndexCache schedule (at most one of these).
#[derive(Args, Debug, Clone, Default)]
pub struct ScheduleArgs {
    /// Per-layer pattern, one F (Full: runs its indexer) or S (Shared) per layer, layer 0 F; or a
    /// file holding one (e.g. the pattern.json written by `search`).
    #[arg(long, value_name = "FSSF…", conflicts_with_all = ["keep", "index_cache"])]
    pub pattern: Option<String>,
    /// Keep this fraction of indexers, uniformly spaced, layer 0 always Full (e.g. 1/4).
    #[arg(long, value_name = "N/D", conflicts_with = "index_cache")]
    pub keep: Option<String>,
    /// `off`: every layer runs its indexer (plain DSA). `on`: the checkpoint's schedule (default).
    #[arg(long, value_enum, value_name = "on|off")]
    pub index_cache: Option<OnOff>,
}

impl ScheduleArgs {
    pub fn to_override(&self) -> Result<Option<ScheduleOverride>> {
        Ok(match (&self.pattern, &self.keep, self.index_cache) {
            (Some(p), None, None) => Some(ScheduleOverride::Pattern(pattern_arg(p)?)),
            (None, Some(k), None) => Some(ScheduleOverride::parse_keep(k)?),
            (None, None, Some(OnOff::Off)) => Some(ScheduleOverride::Off),
            (None, None, Some(OnOff::On)) | (None, None, None) => None,
            _ => bail!("--pattern, --keep and --index-cache are mutually exclusive"),
        })
    }
}

/// A pattern given literally or as a file (pattern.json from `search`, or plain text).
pub fn pattern_arg(arg: &str) -> Result<String> {
    let input = indexcache_tools::pattern::read_pattern(arg)?;
    for w in &input.warnings {
        tracing::warn!("{w}");
    }
    Ok(input.pattern)
}

/// A length: a plain number of tokens ("10000") or a multiple of 1024 ("4k" = 4096, so "10k" is
/// 10240; write 10000 for exactly ten thousand).
pub fn parse_len(s: &str) -> Result<usize> {
    let s = s.trim().to_ascii_lowercase();
    let (num, mul) = match s.strip_suffix('k') {
        Some(n) => (n, 1024),
        None => (s.as_str(), 1),
    };
    let n: usize = num.trim().parse().map_err(|e| anyhow::anyhow!("invalid length {s:?} (examples: 512, 4k): {e}"))?;
    if n == 0 {
        bail!("length must be positive: {s:?}");
    }
    n.checked_mul(mul).ok_or_else(|| anyhow::anyhow!("length {s:?} is too large"))
}

/// A comma-separated list of lengths (see [`parse_len`]).
pub fn parse_lens(s: &str) -> Result<Vec<usize>> {
    s.split(',').filter(|t| !t.trim().is_empty()).map(parse_len).collect()
}

/// A byte count: "8G", "512M", "1.5G", "4096" (K/M/G/T = 1024-based, an optional trailing "B"
/// or "iB"), or "none"/"unlimited" (`None`).
pub fn parse_bytes(s: &str) -> Result<Option<u64>> {
    let t = s.trim().to_ascii_lowercase();
    if t == "none" || t == "unlimited" {
        return Ok(None);
    }
    let t = t.strip_suffix("ib").or_else(|| t.strip_suffix('b')).unwrap_or(&t);
    let (num, shift) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 10),
        Some('m') => (&t[..t.len() - 1], 20),
        Some('g') => (&t[..t.len() - 1], 30),
        Some('t') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let v: f64 = num.trim().parse().map_err(|_| anyhow::anyhow!("invalid size {s:?} (examples: 8G, 512M, none)"))?;
    if !(v.is_finite() && v >= 0.0) {
        bail!("invalid size {s:?}: must be a non-negative number");
    }
    Ok(Some((v * (1u64 << shift) as f64) as u64))
}

/// Bytes in the largest binary unit that keeps the number ≥ 1: "512 B", "20.0 KiB", "1.50 GiB".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ => format!("{v:.2} {}", UNITS[unit]),
    }
}

/// Parse "3,17,42" (spaces allowed).
pub fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .enumerate()
        .map(|(i, t)| t.parse::<u32>().map_err(|e| anyhow::anyhow!("--input-ids: item {i} ({t:?}): {e}")))
        .collect()
}

/// Calibration / evaluation text.
#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// Text files or directories of *.txt (tokenised with the model's tokenizer.json), or
    /// pre-tokenised .json / .safetensors (`input_ids`) files.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Window start spacing (default: --ctx, i.e. disjoint windows).
    #[arg(long)]
    pub stride: Option<usize>,
    /// Use at most this many windows.
    #[arg(long)]
    pub max_windows: Option<usize>,
    /// tokenizer.json (default: a GGUF model's own, or the model directory's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

impl DataArgs {
    /// Load, tokenise and window the data.
    pub fn windows(&self, model_dir: &std::path::Path) -> Result<Vec<indexcache_tools::data::Window>> {
        let stride = self.stride.unwrap_or(self.ctx);
        if self.ctx < 2 {
            bail!("--ctx must be at least 2");
        }
        if stride == 0 || stride > self.ctx {
            bail!("--stride must be between 1 and --ctx ({})", self.ctx);
        }
        let tokenizer = indexcache_tools::gguf_tokenizer::model_tokenizer(model_dir, self.tokenizer.as_deref())?;
        let streams = indexcache_tools::data::load_token_streams(&self.data, tokenizer.as_ref())?;
        let w = indexcache_tools::data::windows(&streams, self.ctx, stride, self.max_windows);
        if w.is_empty() {
            bail!("the data yields no window with at least 2 tokens");
        }
        Ok(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_sizes() {
        assert_eq!(parse_len("4k").unwrap(), 4096);
        assert_eq!(parse_len(" 10K ").unwrap(), 10240);
        assert_eq!(parse_len("10000").unwrap(), 10000);
        assert_eq!(parse_lens("10k,60000, 200k").unwrap(), vec![10240, 60000, 204800]);
        assert!(parse_len("0").is_err() && parse_len("k").is_err() && parse_len("1.5k").is_err());
        assert_eq!(parse_bytes("8G").unwrap(), Some(8 << 30));
        assert_eq!(parse_bytes("512MiB").unwrap(), Some(512 << 20));
        assert_eq!(parse_bytes("1.5g").unwrap(), Some(3 << 29));
        assert_eq!(parse_bytes("4096").unwrap(), Some(4096));
        assert_eq!(parse_bytes("0").unwrap(), Some(0));
        assert_eq!(parse_bytes("none").unwrap(), None);
        assert!(parse_bytes("-1G").is_err() && parse_bytes("lots").is_err());
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(20 << 10), "20.00 KiB");
        assert_eq!(human_bytes(3 << 29), "1.50 GiB");
    }
}
