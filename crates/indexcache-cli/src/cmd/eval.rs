//! `indexcache eval passkey|niah`: synthetic long-context retrieval under a schedule.

use crate::args::{ModelArgs, ScheduleArgs, parse_lens};
use crate::cmd::generate::load_tokenizer;
use crate::load::{ExecArgs, load_model, progress_bar, with_backend};
use anyhow::{Context, Result};
use indexcache_model::{DsaModel, IndexerSelection};
use indexcache_ops::Backend;
use indexcache_tools::eval::{EvalConfig, Task, run_eval};
use std::path::PathBuf;
use tokenizers::Tokenizer;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// passkey (Mohtashami & Jaggi) or niah (RULER-style needle in a haystack).
    #[arg(value_parser = ["passkey", "niah"])]
    pub task: String,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt lengths: token counts, or multiples of 1024 with a k suffix (1k = 1024).
    #[arg(long, default_value = "1k,2k,4k")]
    pub lengths: String,
    /// Needle depths in [0, 1] (0 = start of the haystack).
    #[arg(long, default_value = "0,0.25,0.5,0.75,1")]
    pub depths: String,
    /// Prompts per (length, depth) cell.
    #[arg(long, default_value_t = 5)]
    pub samples: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Greedy tokens to decode (default: 8 passkey, 12 niah).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    #[command(flatten)]
    pub schedule: ScheduleArgs,
    /// tokenizer.json (default: the model directory's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Print JSON (with every sample's output).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub exec: ExecArgs,
}

pub fn run(a: Args) -> Result<()> {
    let task: Task = a.task.parse()?;
    let mut cfg = EvalConfig::new(task);
    cfg.lengths = parse_lens(&a.lengths).context("--lengths")?;
    cfg.depths = a
        .depths
        .split(',')
        .map(|d| d.trim().parse::<f64>().with_context(|| format!("--depths: {d:?} is not a number")))
        .collect::<Result<_>>()?;
    cfg.samples_per_cell = a.samples;
    cfg.seed = a.seed;
    if let Some(n) = a.max_new_tokens {
        cfg.max_new_tokens = n;
    }
    let tok = load_tokenizer(&a.model.model, a.tokenizer.as_deref())?;
    let schedule = a.schedule.to_override()?;
    with_backend!(a.exec.backend()?, |b| {
        run_with(load_model(&a.model.model, b, schedule, IndexerSelection::Full, &a.exec)?, &a, &cfg, &tok)
    })
}

fn run_with<B: Backend>(model: DsaModel<B>, a: &Args, cfg: &EvalConfig, tok: &Tokenizer) -> Result<()> {
    let task = cfg.task;
    let bar = progress_bar("eval", "prompts {eta}", 0);
    let chunk = a.exec.chunk(model.backend());
    let report = run_eval(&model, model.schedule(), tok, cfg, chunk, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("{task} accuracy, schedule {} ({} samples per cell)", report.pattern, cfg.samples_per_cell);
    let mut header = format!("{:>8}", "length");
    for d in &cfg.depths {
        header += &format!(" {:>7}", format!("d={d}"));
    }
    println!("{header} {:>8}", "mean");
    for l in &report.per_length {
        let mut line = format!("{:>8}", l.length);
        for c in report.cells.iter().filter(|c| c.length == l.length) {
            line += &format!(" {:>7.2}", c.score.accuracy);
        }
        println!("{line} {:>8.2}", l.score.accuracy);
    }
    println!("overall {:.3} ({}/{})", report.overall.accuracy, report.overall.correct, report.overall.total);
    Ok(())
}
