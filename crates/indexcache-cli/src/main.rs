//! `indexcache`: run DSA checkpoints (DeepSeek-V3.2, GLM-5) with IndexCache, and the tools to
//! choose, check and export IndexCache patterns.

mod args;
mod cmd;
mod load;
mod output;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "indexcache", version, about = "Sparse-attention (DSA) engine and IndexCache toolkit", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Architecture, parameters, dtypes, the IndexCache schedule and KV-cache bytes per token.
    Info(cmd::info::Args),
    /// Run token ids through the model and write logits and per-layer top-k to safetensors.
    Forward(cmd::forward::Args),
    /// Generate text from a prompt (greedy or sampled), reporting TTFT and decode speed.
    Generate(cmd::generate::Args),
    /// The built-in demo: schedule, generation, and DSA vs IndexCache timing on a tiny model.
    Demo(cmd::demo::Args),
    /// Prefill time, TTFT and decode tokens/s per context and IndexCache pattern, with the indexer's
    /// share and peak device memory.
    Bench(cmd::bench::Args),
    /// Mean next-token NLL and perplexity over windows of text.
    Ppl(cmd::ppl::Args),
    /// Train lightning indexers on a dense GGUF model by distilling its attention (warm-up, or
    /// multi-layer IndexCache distillation with --pattern/--keep).
    Distill(cmd::distill::Args),
    /// Greedy search for the layers that keep their indexer (paper Algorithm 1).
    Search(cmd::search::Args),
    /// Top-k overlap between every pair of layers (all indexers run), with heatmap and curve.
    Overlap(cmd::overlap::Args),
    /// Synthetic long-context retrieval: passkey or needle-in-a-haystack accuracy per length × depth.
    Eval(cmd::eval::Args),
    /// Export a pattern for transformers (config.json), SGLang or vLLM.
    Export(cmd::export::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,indexcache=info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Info(a) => cmd::info::run(a),
        Command::Forward(a) => cmd::forward::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Ppl(a) => cmd::ppl::run(a),
        Command::Distill(a) => cmd::distill::run(a),
        Command::Search(a) => cmd::search::run(a),
        Command::Overlap(a) => cmd::overlap::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Export(a) => cmd::export::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::BrokenPipe
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
