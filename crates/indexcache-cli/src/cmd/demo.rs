//! `indexcache demo`: the README's main job. On SmolLM2-135M-DSA (`models/smollm2-135m-dsa`: the
//! SmolLM2 GGUF fetched by `scripts/fetch_smollm2.sh` + the lightning indexers distilled into it,
//! shipped in the repository) it answers a question through the chat template with sparse
//! attention and IndexCache, then times plain DSA against IndexCache 1/4 (the searched pattern
//! when the directory has one) on a long prompt. Without the GGUF it runs the tiny random model
//! (`models/tiny-dsa`) and says how to fetch the real one.

use crate::cmd::bench::{measure, synthetic_prompt};
use crate::cmd::generate::{SamplingArgs, generate, load_tokenizer};
use crate::load::{ExecArgs, load_model, with_backend};
use anyhow::{Result, anyhow, bail};
use indexcache_config::ScheduleOverride;
use indexcache_model::{DsaModel, IndexerSelection};
use indexcache_ops::Backend;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (default: the tiny model shipped with the repository).
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,
    /// Prompt length for the timing run (capped so prompt + decode fit the model's context).
    #[arg(long, default_value_t = 4096, value_parser = crate::load::positive)]
    pub context: usize,
    /// Tokens to decode in the timing run (at least 1).
    #[arg(long, default_value_t = 32)]
    pub decode: usize,
    #[command(flatten)]
    pub exec: ExecArgs,
}

fn models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

/// SmolLM2-135M-DSA when its GGUF has been fetched, else the tiny random model.
fn default_model_dir() -> Result<PathBuf> {
    let real = models().join("smollm2-135m-dsa");
    if let Some(md) = indexcache_model::gguf::read_model_dir(&real)?
        && md.gguf.exists()
    {
        return Ok(real);
    }
    println!(
        "(the default model, SmolLM2-135M-DSA, needs its GGUF: `bash scripts/fetch_smollm2.sh`; \
         running the tiny random model instead)"
    );
    Ok(models().join("tiny-dsa"))
}

pub fn run(a: Args) -> Result<()> {
    if a.decode == 0 {
        bail!("--decode must be at least 1: the timing run reports decode tokens/s");
    }
    let dir = match &a.model {
        Some(m) => m.clone(),
        None => default_model_dir()?,
    };
    println!("== model: {}", dir.display());
    with_backend!(a.exec.backend()?, |b| run_with(load_model(&dir, b, None, IndexerSelection::All, &a.exec)?, &a, &dir))
}

fn run_with<B: Backend>(base: DsaModel<B>, a: &Args, dir: &Path) -> Result<()> {
    let cfg = base.config().clone();
    let chunk = a.exec.chunk(base.backend());
    // The timing run needs at least one prompt token before the decode steps.
    if a.decode >= cfg.max_position_embeddings {
        bail!(
            "--decode {} leaves no room for a prompt: the model's context (max_position_embeddings) is {} tokens",
            a.decode,
            cfg.max_position_embeddings
        );
    }
    println!(
        "{} layers, hidden {}, {} heads, indexer {}x{} top-{}; schedule in config.json: {} ({} Full); backend {}",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.index_n_heads,
        cfg.index_head_dim,
        cfg.index_topk,
        base.schedule(),
        base.schedule().num_full(),
        base.backend().name()
    );

    let tokenizer = load_tokenizer(dir, None)?;
    let template = indexcache_tools::gguf_tokenizer::model_chat_template(dir)?;
    let (prompt, ids) = match &template {
        Some(t) => {
            println!("\n== chat (greedy, sparse attention with this schedule)");
            let msg = indexcache_tools::gguf_tokenizer::ChatMessage::new("user", "What is the capital of France?");
            let text = t.render(&[msg], true)?;
            let ids = tokenizer.encode(text.as_str(), false).map_err(|e| anyhow!("tokenizing: {e}"))?;
            (text, ids.get_ids().to_vec())
        }
        None => {
            println!("\n== generate (greedy; random weights, so the text is gibberish by design)");
            let text = "The lightning indexer picks the tokens that matter.".to_string();
            let ids = tokenizer.encode(text.as_str(), true).map_err(|e| anyhow!("tokenizing: {e}"))?;
            (text, ids.get_ids().to_vec())
        }
    };
    let sampling = SamplingArgs { max_tokens: 48, temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0 };
    let (out, stats) = generate(&base, &ids, &sampling, chunk, |_| Ok(()))?;
    let text = tokenizer.decode(&out, true).map_err(|e| anyhow!("detokenizing: {e}"))?;
    println!("{prompt}{text}");
    println!("(TTFT {:.1} ms, decode {:.1} tokens/s)", stats.ttft_s * 1e3, stats.decode_tok_s());

    let context = a.context.min(cfg.max_position_embeddings - a.decode);
    if context < a.context {
        println!(
            "\n(--context {} + --decode {} exceed the model's {} positions)",
            a.context, a.decode, cfg.max_position_embeddings
        );
    }
    println!("\n== timing: prefill {context} tokens, then decode {} tokens", a.decode);
    let long = synthetic_prompt(context, cfg.vocab_size, 0);
    // Warm-up, so first-touch page faults are not billed to the first schedule.
    {
        let warm = &long[..context.min(256)];
        let mut cache = base.new_cache_with(base.schedule().clone(), warm.len() + 2)?;
        measure(&base, &mut cache, warm, 2, chunk, false)?;
    }
    let mut rows = Vec::new();
    // The searched 1/4 pattern when the model directory ships one, else uniform 1/4.
    let searched = dir.join("pattern-1-4.json");
    let quarter = match searched.is_file() {
        true => ScheduleOverride::Pattern(crate::args::pattern_arg(&searched.display().to_string())?),
        false => ScheduleOverride::Keep { num: 1, den: 4 },
    };
    for (label, o) in [("DSA (all Full)", ScheduleOverride::Off), ("IndexCache 1/4", quarter)] {
        let schedule = o.apply(cfg.num_hidden_layers)?;
        let mut cache = base.new_cache_with(schedule.clone(), context + a.decode)?;
        let m = measure(&base, &mut cache, &long, a.decode, chunk, false)?;
        rows.push((label, schedule.to_pattern(), m.prefill, m.decode_tok_s()));
    }
    println!("{:<16} {:<10} {:>12} {:>14}", "schedule", "pattern", "prefill s", "decode tok/s");
    for (label, pattern, prefill, dec) in &rows {
        println!("{label:<16} {pattern:<10} {prefill:>12.3} {dec:>14.1}");
    }
    println!("IndexCache 1/4 speedup: prefill {:.2}x, decode {:.2}x", rows[0].2 / rows[1].2, rows[1].3 / rows[0].3);
    Ok(())
}
