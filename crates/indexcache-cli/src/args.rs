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
    let input = indexcache_tools::export::read_pattern(arg)?;
    for w in &input.warnings {
        tracing::warn!("{w}");
    }
    Ok(input.pattern)
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
    /// tokenizer.json (default: the model directory's).
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
        let tok_path = self.tokenizer.clone().unwrap_or_else(|| model_dir.join("tokenizer.json"));
        let tokenizer = if tok_path.is_file() {
            Some(
                tokenizers::Tokenizer::from_file(&tok_path)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?,
            )
        } else {
            None
        };
        let streams = indexcache_tools::data::load_token_streams(&self.data, tokenizer.as_ref())?;
        let w = indexcache_tools::data::windows(&streams, self.ctx, stride, self.max_windows);
        if w.is_empty() {
            bail!("the data yields no window with at least 2 tokens");
        }
        Ok(w)
    }
}
