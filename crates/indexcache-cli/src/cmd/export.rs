//! `indexcache export`: a pattern as configuration for transformers, SGLang, vLLM or this engine.

use anyhow::{Result, bail};
use indexcache_tools::export::{ExportFormat, ExportOptions, export};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The pattern ("FSSF…") or a file holding it (a `search` result pattern.json, or plain text).
    #[arg(long)]
    pub pattern: String,
    /// hf: a copy of the checkpoint directory with the pattern in config.json (hard links for the
    /// weights); sglang: `--json-model-override-args`; vllm: `--hf-overrides`; indexcache: a model
    /// directory for this engine with the pattern as its schedule (for a checkpoint the same as hf;
    /// for indexers on a GGUF base model, config.json + only the Full layers' indexers).
    #[arg(long, value_parser = ["hf", "sglang", "vllm", "indexcache"])]
    pub format: String,
    /// The model (required for hf and indexcache; checks length and indexer weights otherwise).
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,
    /// Output directory (hf and indexcache).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Allow writing into a non-empty --out.
    #[arg(long)]
    pub force: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let format: ExportFormat = a.format.parse()?;
    if matches!(format, ExportFormat::Hf | ExportFormat::Indexcache) && (a.model.is_none() || a.out.is_none()) {
        bail!("--format {format} needs --model DIR and --out DIR");
    }
    let r = export(&ExportOptions { format, pattern: a.pattern, model: a.model, out: a.out, force: a.force })?;
    for w in &r.warnings {
        tracing::warn!("{w}");
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    match (&r.args, &r.out) {
        (Some(args), _) => println!("{args}"),
        (None, Some(out)) => {
            println!(
                "wrote {} ({} files) with pattern {} ({} Full / {})",
                out.display(),
                r.files.len(),
                r.pattern,
                r.full_layers.len(),
                r.layers
            );
        }
        (None, None) => println!("{}", r.pattern),
    }
    Ok(())
}
