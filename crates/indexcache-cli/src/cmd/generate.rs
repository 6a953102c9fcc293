//! `indexcache generate`: text in, text out, with time-to-first-token and decode speed.

use crate::args::{ModelArgs, ScheduleArgs};
use crate::load::{Model, load_model};
use anyhow::{Context, Result, anyhow};
use indexcache_model::{GenStats, IndexerSelection, SamplingParams};
use std::io::Write;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text.
    #[arg(long, short = 'p')]
    pub prompt: String,
    #[command(flatten)]
    pub schedule: ScheduleArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// tokenizer.json (default: the one in the model directory).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// RNG seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn params(&self) -> Result<SamplingParams> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(anyhow!("--temperature must be a finite number >= 0"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(anyhow!("--top-p must be in (0, 1]"));
        }
        Ok(SamplingParams { temperature: self.temperature, top_p: self.top_p, top_k: self.top_k, seed: self.seed })
    }
}

pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Prefill `prompt`, then decode until `max_tokens` or an EOS; `on_token` gets each new id.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    sampling: &SamplingArgs,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, GenStats)> {
    let params = sampling.params()?;
    let mut cache = model.new_cache(prompt.len() + sampling.max_tokens)?;
    indexcache_model::generate(model, &mut cache, prompt, sampling.max_tokens, params, &[], on_token)
}

pub fn run(a: Args) -> Result<()> {
    let tok_path = a.tokenizer.clone().unwrap_or_else(|| a.model.model.join("tokenizer.json"));
    let tokenizer = load_tokenizer(&tok_path)?;
    let model = load_model(&a.model.model, a.schedule.to_override()?, IndexerSelection::Full)?;
    let enc = tokenizer.encode(a.prompt.as_str(), true).map_err(|e| anyhow!("tokenizing the prompt: {e}"))?;
    let prompt: Vec<u32> = enc.get_ids().to_vec();
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{}", a.prompt)?;
    let mut all: Vec<u32> = Vec::new();
    let mut printed = String::new();
    let (_, stats) = generate(&model, &prompt, &a.sampling, |id| {
        all.push(id);
        // Decode the whole continuation and print what is new (keeps multi-byte tokens intact).
        let text = tokenizer.decode(&all, true).map_err(|e| anyhow!("detokenizing: {e}"))?;
        if let Some(new) = text.strip_prefix(printed.as_str()) {
            write!(stdout, "{new}")?;
            stdout.flush()?;
        }
        printed = text;
        Ok(())
    })
    .context("generating")?;
    writeln!(stdout)?;
    eprintln!(
        "prompt {} tokens, generated {}; time to first token {:.1} ms; decode {:.1} tokens/s",
        stats.prompt_tokens,
        stats.new_tokens,
        stats.ttft_s * 1e3,
        stats.decode_tok_s()
    );
    Ok(())
}
