//! `indexcache demo`: the README's main job, on the tiny random model shipped in `models/`.
//! Shows the schedule, generates a little text, then times plain DSA against IndexCache 1/4
//! on a long synthetic prompt.

use crate::cmd::bench::{measure, synthetic_prompt};
use crate::cmd::generate::{SamplingArgs, generate, load_tokenizer};
use crate::load::load_model;
use anyhow::{Result, anyhow};
use indexcache_config::ScheduleOverride;
use indexcache_model::IndexerSelection;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (default: the tiny model shipped with the repository).
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,
    /// Prompt length for the timing run.
    #[arg(long, default_value_t = 4096)]
    pub context: usize,
    /// Tokens to decode in the timing run.
    #[arg(long, default_value_t = 32)]
    pub decode: usize,
}

fn default_model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-dsa")
}

pub fn run(a: Args) -> Result<()> {
    let dir = a.model.clone().unwrap_or_else(default_model_dir);
    println!("== model: {}", dir.display());
    let base = load_model(&dir, None, IndexerSelection::All)?;
    let cfg = base.config().clone();
    println!(
        "{} layers, hidden {}, {} heads, indexer {}x{} top-{}; schedule in config.json: {} ({} Full)",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.index_n_heads,
        cfg.index_head_dim,
        cfg.index_topk,
        base.schedule(),
        base.schedule().num_full()
    );

    println!("\n== generate (greedy; random weights, so the text is gibberish by design)");
    let tokenizer = load_tokenizer(&dir.join("tokenizer.json"))?;
    let prompt = "The lightning indexer picks the tokens that matter.";
    let ids = tokenizer.encode(prompt, true).map_err(|e| anyhow!("tokenizing: {e}"))?.get_ids().to_vec();
    let sampling = SamplingArgs { max_tokens: 24, temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0 };
    let (out, stats) = generate(&base, &ids, &sampling, |_| Ok(()))?;
    let text = tokenizer.decode(&out, true).map_err(|e| anyhow!("detokenizing: {e}"))?;
    println!("{prompt}{text}");
    println!("(TTFT {:.1} ms, decode {:.1} tokens/s)", stats.ttft_s * 1e3, stats.decode_tok_s());

    let context = a.context.min(cfg.max_position_embeddings - a.decode);
    println!("\n== timing: prefill {context} tokens, then decode {} tokens", a.decode);
    let long = synthetic_prompt(context, cfg.vocab_size, 0);
    // Warm-up, so first-touch page faults are not billed to the first schedule.
    measure(&base, base.schedule(), &long[..context.min(256)], 2)?;
    let mut rows = Vec::new();
    for (label, o) in
        [("DSA (all Full)", ScheduleOverride::Off), ("IndexCache 1/4", ScheduleOverride::Keep { num: 1, den: 4 })]
    {
        let schedule = o.apply(cfg.num_hidden_layers)?;
        let m = measure(&base, &schedule, &long, a.decode)?;
        rows.push((label, schedule.to_pattern(), m.prefill, a.decode as f64 / m.decode));
    }
    println!("{:<16} {:<10} {:>12} {:>14}", "schedule", "pattern", "prefill s", "decode tok/s");
    for (label, pattern, prefill, dec) in &rows {
        println!("{label:<16} {pattern:<10} {prefill:>12.3} {dec:>14.1}");
    }
    println!("IndexCache 1/4 speedup: prefill {:.2}x, decode {:.2}x", rows[0].2 / rows[1].2, rows[1].3 / rows[0].3);
    Ok(())
}
