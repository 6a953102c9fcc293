//! Loading a model with a progress bar and a report of what was skipped.

use anyhow::{Context, Result};
use indexcache_config::ScheduleOverride;
use indexcache_model::{DsaModel, IndexerSelection, LoadOptions};
use indexcache_ops::cpu::CpuBackend;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;
use std::time::Instant;

pub type Model = DsaModel<CpuBackend>;

pub fn load_model(dir: &Path, schedule: Option<ScheduleOverride>, indexers: IndexerSelection) -> Result<Model> {
    let t0 = Instant::now();
    let bar = progress_bar("loading weights", "{wide_msg}", 0);
    let opts = LoadOptions { schedule, indexers };
    let mut on_tensor = |name: &str, done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(name.to_string());
    };
    let loaded = DsaModel::load(dir, CpuBackend::new(), &opts, &mut on_tensor);
    bar.finish_and_clear();
    let (model, report) = loaded.with_context(|| format!("loading model from {}", dir.display()))?;
    if !report.skipped_mtp.is_empty() {
        tracing::info!(
            "skipped {} tensors of the multi-token-prediction layer (model.layers.{}), as transformers does",
            report.skipped_mtp.len(),
            model.config().num_hidden_layers
        );
    }
    if !report.unused.is_empty() {
        let shown: Vec<&str> = report.unused.iter().take(8).map(String::as_str).collect();
        tracing::info!(
            "{} checkpoint tensors unused by this schedule/model: {}{}",
            report.unused.len(),
            shown.join(", "),
            if report.unused.len() > 8 { ", …" } else { "" }
        );
    }
    tracing::info!(
        "loaded {} tensors in {:.2}s; schedule {} ({} Full of {}); backend {}",
        report.tensors_loaded,
        t0.elapsed().as_secs_f64(),
        model.schedule(),
        model.schedule().num_full(),
        model.schedule().len(),
        indexcache_ops::Backend::name(model.backend()),
    );
    Ok(model)
}

/// A progress bar on stderr: `{spinner} <prefix> [=====>   ] pos/len <suffix>`; hidden when
/// stderr is not a terminal.
pub fn progress_bar(prefix: &str, suffix: &str, len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let template = format!("{{spinner}} {prefix} [{{bar:30}}] {{pos}}/{{len}} {suffix}");
    // invariant: the template is built from literals with valid placeholders.
    bar.set_style(ProgressStyle::with_template(&template).expect("valid template").progress_chars("=> "));
    bar
}
