//! `indexcache export`: a pattern as configuration for transformers, SGLang or vLLM.

use anyhow::{Result, bail};
use indexcache_tools::export::{ExportFormat, ExportOptions, export};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The pattern ("FSSF…") or a file holding it (a `search` result pattern.json, or plain text).
    #[arg(long)]
    pub pattern: String,
    /// hf: a copy of the checkpoint directory with the pattern in config.json (hard links for the
    /// weights); sglang: `--json-model-override-args`; vllm: `--hf-overrides`.
    #[arg(long, value_parser = ["hf", "sglang", "vllm"])]
    pub format: String,
    /// The checkpoint (required for hf; checks length and indexer weights otherwise).
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,
    /// Output directory (hf only).
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
    if matches!(format, ExportFormat::Hf) && (a.model.is_none() || a.out.is_none()) {
        bail!("--format hf needs --model DIR and --out DIR");
    }
    if let Some(m) = &a.model
        && indexcache_tools::gguf_tokenizer::model_gguf(m)?.is_some()
    {
        bail!(
            "{}: export writes DeepSeek-V3.2 / GLM-5 checkpoints and serving flags; a GGUF model (or lightning \
             indexers added to one) has no transformers, SGLang or vLLM format to export to — use its pattern \
             file with this engine (`--pattern FILE`)",
            m.display()
        );
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
