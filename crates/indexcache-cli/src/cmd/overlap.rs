//! `indexcache overlap`: how much the layers' top-k selections agree, |T_i ∩ T_j| / k.

use crate::args::{DataArgs, ModelArgs};
use crate::load::{ExecArgs, load_model, progress_bar, with_backend};
use anyhow::{Context, Result};
use indexcache_config::ScheduleOverride;
use indexcache_model::{DsaModel, IndexerSelection};
use indexcache_ops::Backend;
use indexcache_tools::data::Window;
use indexcache_tools::{overlap::overlap_matrix, plot};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Output directory: overlap.json, overlap.{png,svg} (heatmap), adjacent.{png,svg}.
    #[arg(long)]
    pub out: PathBuf,
    /// Also print the JSON report.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub exec: ExecArgs,
}

pub fn run(a: Args) -> Result<()> {
    let windows = a.data.windows(&a.model.model)?;
    with_backend!(a.exec.backend()?, |b| {
        run_with(
            load_model(&a.model.model, b, Some(ScheduleOverride::Off), IndexerSelection::All, &a.exec)?,
            &a,
            &windows,
        )
    })
}

fn run_with<B: Backend>(model: DsaModel<B>, a: &Args, windows: &[Window]) -> Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let bar = progress_bar("overlap", "windows {eta}", windows.len() as u64);
    let chunk = a.exec.chunk(model.backend());
    let report = overlap_matrix(&model, windows, chunk, &mut |i| bar.set_position(i as u64))?;
    bar.finish_and_clear();
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(a.out.join("overlap.json"), &json)?;
    plot::heatmap(&report.matrix, "top-k overlap |Ti ∩ Tj| / k", &a.out.join("overlap"))?;
    let curve: Vec<(f64, f64)> = report.adjacent.iter().enumerate().map(|(l, &v)| (l as f64, v)).collect();
    plot::line_plot(
        &[("layer l vs l+1".to_string(), curve)],
        "adjacent-layer top-k overlap",
        "layer l",
        "overlap",
        &a.out.join("adjacent"),
    )?;
    if a.json {
        println!("{json}");
        return Ok(());
    }
    println!(
        "{} layers, k = {}, {} query rows with more than k visible tokens",
        report.layers, report.k, report.rows_counted
    );
    println!("adjacent overlap (l, l+1):");
    for (l, v) in report.adjacent.iter().enumerate() {
        println!("  {l:>3}-{:<3} {v:.3}", l + 1);
    }
    println!("wrote {}/overlap.json, overlap.png/.svg, adjacent.png/.svg", a.out.display());
    Ok(())
}
