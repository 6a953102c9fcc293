//! `indexcache ppl`: mean next-token NLL and perplexity of text under a schedule.

use crate::args::{DataArgs, ModelArgs, ScheduleArgs};
use crate::load::{ExecArgs, load_model, progress_bar, with_backend};
use anyhow::Result;
use indexcache_model::{DsaModel, IndexerSelection};
use indexcache_ops::Backend;
use indexcache_tools::loss::dataset_nll;
use serde::Serialize;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub schedule: ScheduleArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub exec: ExecArgs,
}

#[derive(Serialize)]
struct Report {
    backend: String,
    chunk: usize,
    schedule: String,
    full_layers: usize,
    windows: usize,
    tokens: usize,
    mean_nll: f64,
    perplexity: f64,
    seconds: f64,
}

pub fn run(a: Args) -> Result<()> {
    let schedule = a.schedule.to_override()?;
    let windows = a.data.windows(&a.model.model)?;
    with_backend!(a.exec.backend()?, |b| {
        run_with(load_model(&a.model.model, b, schedule, IndexerSelection::Full, &a.exec)?, &a, &windows)
    })
}

/// The per-token NLL is reduced on the device (`Backend::nll`): the logits never leave it.
fn run_with<B: Backend>(model: DsaModel<B>, a: &Args, windows: &[indexcache_tools::data::Window]) -> Result<()> {
    let bar = progress_bar("ppl", "windows {eta}", windows.len() as u64);
    let t0 = Instant::now();
    let chunk = a.exec.chunk(model.backend());
    let nll = dataset_nll(&model, model.schedule(), windows, chunk, &mut |i| bar.set_position(i as u64))?;
    bar.finish_and_clear();
    let r = Report {
        backend: model.backend().name(),
        chunk,
        schedule: model.schedule().to_pattern(),
        full_layers: model.schedule().num_full(),
        windows: windows.len(),
        tokens: nll.tokens,
        mean_nll: nll.mean(),
        perplexity: nll.perplexity(),
        seconds: t0.elapsed().as_secs_f64(),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "schedule {} ({} Full): {} windows, {} tokens: mean NLL {:.5}, perplexity {:.4} ({:.1}s)",
            r.schedule, r.full_layers, r.windows, r.tokens, r.mean_nll, r.perplexity, r.seconds
        );
    }
    Ok(())
}
