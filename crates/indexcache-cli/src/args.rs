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
    /// Explicit per-layer pattern, one F (Full: runs its indexer) or S (Shared) per layer; layer 0 must be F.
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
            (Some(p), None, None) => Some(ScheduleOverride::Pattern(p.clone())),
            (None, Some(k), None) => Some(ScheduleOverride::parse_keep(k)?),
            (None, None, Some(OnOff::Off)) => Some(ScheduleOverride::Off),
            (None, None, Some(OnOff::On)) | (None, None, None) => None,
            _ => bail!("--pattern, --keep and --index-cache are mutually exclusive"),
        })
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
