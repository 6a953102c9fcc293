//! `indexcache search`: choose which layers keep their indexer (paper Algorithm 1, greedy,
//! with exact prefix reuse), resumable, with a loss curve.

use crate::args::{DataArgs, ModelArgs, human_bytes, parse_bytes};
use crate::load::{ExecArgs, load_model, progress_bar, with_backend};
use anyhow::{Context, Result, bail};
use indexcache_config::{IndexSchedule, ScheduleOverride};
use indexcache_model::{DsaModel, IndexerSelection};
use indexcache_ops::Backend;
use indexcache_tools::data::Window;
use indexcache_tools::search::{
    SearchEvent, SearchOptions, SearchState, Target, default_memo_budget, fingerprint, greedy_search, schedule_loss,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Keep this fraction of indexers (e.g. 1/4).
    #[arg(long, value_name = "N/D", required_unless_present = "flips", conflicts_with = "flips")]
    pub keep: Option<String>,
    /// Commit this many flips.
    #[arg(long)]
    pub flips: Option<usize>,
    /// Pipeline blocks: first layer of each block stays Full, one flip per block per step.
    #[arg(long, default_value_t = 1)]
    pub blocks: usize,
    /// Result file; progress is saved here after every committed flip (its directory is created
    /// if needed).
    #[arg(long, default_value = "pattern.json")]
    pub out: PathBuf,
    /// Memory for the candidates' memos (their per-layer states, which save recomputation), e.g.
    /// 8G, 512M, 0 (no memos: plain committed-prefix reuse) or none (no limit). Results are the same
    /// for every budget. Default: a quarter of the free device memory (cuda) or of MemAvailable (cpu).
    #[arg(long, value_name = "SIZE")]
    pub memo_budget: Option<String>,
    /// Continue the search saved in --out.
    #[arg(long)]
    pub resume: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub exec: ExecArgs,
}

/// What `--out` holds: the search state plus, when done, the comparison schedules.
#[derive(Serialize, Deserialize)]
pub struct SearchFile {
    #[serde(flatten)]
    pub state: SearchState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comparison: Option<Comparison>,
}

#[derive(Serialize, Deserialize, Clone)]
pub struct Comparison {
    pub uniform_pattern: String,
    pub uniform_loss: f64,
    pub all_full_loss: f64,
    pub searched_loss: f64,
}

fn save(path: &Path, file: &SearchFile) -> Result<()> {
    crate::output::write_atomic(path, serde_json::to_string_pretty(file)?.as_bytes())
}

pub fn run(a: Args) -> Result<()> {
    let target = match (&a.keep, a.flips) {
        (Some(k), None) => match ScheduleOverride::parse_keep(k)? {
            ScheduleOverride::Keep { num, den } => Target::Keep { num, den },
            _ => unreachable!("parse_keep returns Keep"),
        },
        (None, Some(f)) => Target::Flips(f),
        _ => bail!("give exactly one of --keep and --flips"),
    };
    if a.blocks == 0 {
        bail!("--blocks must be at least 1");
    }
    // `None`: not given (the default budget); `Some(None)`: no limit.
    let memo_budget = a.memo_budget.as_deref().map(parse_bytes).transpose().context("--memo-budget")?;
    let windows = a.data.windows(&a.model.model)?;
    let config_json = std::fs::read_to_string(a.model.model.join("config.json"))?;
    let resume = if a.resume {
        let text = std::fs::read_to_string(&a.out).with_context(|| format!("--resume: reading {}", a.out.display()))?;
        let f: SearchFile =
            serde_json::from_str(&text).with_context(|| format!("--resume: parsing {}", a.out.display()))?;
        Some(f.state)
    } else {
        if a.out.exists() {
            bail!("{} exists: pass --resume to continue it, or choose another --out", a.out.display());
        }
        None
    };
    with_backend!(a.exec.backend()?, |b| {
        let model = load_model(&a.model.model, b, Some(ScheduleOverride::Off), IndexerSelection::All, &a.exec)?;
        let backend = model.backend();
        let memo_budget_bytes = memo_budget.unwrap_or_else(|| default_memo_budget(backend));
        let opts = SearchOptions { target, blocks: a.blocks, chunk: Some(a.exec.chunk(backend)), memo_budget_bytes };
        let fp = fingerprint(&config_json, &windows, &opts);
        search(&model, &a, &windows, &opts, fp, resume)
    })
}

fn search<B: Backend>(
    model: &DsaModel<B>,
    a: &Args,
    windows: &[Window],
    opts: &SearchOptions,
    fp: String,
    resume: Option<SearchState>,
) -> Result<()> {
    let n = model.config().num_hidden_layers;
    let flips = opts.target.flips(n);
    let chunk = opts.chunk.unwrap_or_else(|| model.backend().default_chunk());
    tracing::info!(
        "memo budget {}; prefill chunk {chunk}; backend {}",
        opts.memo_budget_bytes.map_or("unlimited".into(), human_bytes),
        model.backend().name()
    );
    let bar = progress_bar("search step {msg}", "", 0);
    let out = a.out.clone();
    let mut saver = |s: &SearchState| {
        save(&out, &SearchFile { state: s.clone(), comparison: None })
            .map_err(|e| indexcache_tools::ToolError::Invalid(format!("{e:#}")))
    };
    let mut on_event = |e: SearchEvent<'_>| match e {
        SearchEvent::Baseline { loss } => bar.println(format!("all-Full loss {loss:.6}")),
        SearchEvent::Memo { step, memoised, candidates, bytes } => {
            let msg =
                format!("step {step}: {memoised} of {candidates} candidates keep a memo (~{})", human_bytes(bytes));
            if step == 1 { tracing::info!("{msg}") } else { tracing::debug!("{msg}") }
        }
        SearchEvent::Candidate { step, done, total, .. } => {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(format!("{step}/{flips}"));
        }
        SearchEvent::Committed { state } => {
            let last = state.steps.last().expect("a committed step");
            bar.println(format!(
                "step {}: layer {} → S, loss {:.6}, {}",
                last.step, last.flipped, last.loss, state.pattern
            ));
        }
    };
    let state = greedy_search(model, windows, opts, fp, resume, &mut saver, &mut on_event)?;
    bar.finish_and_clear();

    let searched = IndexSchedule::from_pattern(&state.pattern, n)?;
    let uniform = ScheduleOverride::Keep { num: searched.num_full(), den: n }.apply(n)?;
    let comparison = Comparison {
        uniform_loss: schedule_loss(model, &uniform, windows, chunk)?,
        uniform_pattern: uniform.to_pattern(),
        all_full_loss: state.all_full_loss,
        searched_loss: state.steps.last().map_or(state.all_full_loss, |s| s.loss),
    };
    let file = SearchFile { state, comparison: Some(comparison.clone()) };
    save(&a.out, &file)?;
    let curve_stem = a.out.with_extension("loss");
    plot_curve(&file, &curve_stem)?;
    let st = &file.state;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&file)?);
        return Ok(());
    }
    println!("pattern         {}  ({} Full / {n})", st.pattern, searched.num_full());
    println!("removal order   {:?}", st.removal_order);
    for s in &st.steps {
        println!("  step {:>2}: layer {:>3} → S   loss {:.6}", s.step, s.flipped, s.loss);
    }
    println!("all-Full loss   {:.6}", comparison.all_full_loss);
    println!("searched loss   {:.6}", comparison.searched_loss);
    println!("uniform loss    {:.6}  ({})", comparison.uniform_loss, comparison.uniform_pattern);
    println!(
        "layer evals     {} vs {} for naive Algorithm 1 ({:.2}x)",
        st.layer_evals,
        st.naive_layer_evals,
        st.layer_evals as f64 / st.naive_layer_evals.max(1) as f64
    );
    println!("saved           {} (+ loss curve {}.png/.svg)", a.out.display(), curve_stem.display());
    Ok(())
}

/// Loss after each committed flip (x = flips so far), with the all-Full and uniform levels.
fn plot_curve(file: &SearchFile, stem: &Path) -> Result<()> {
    let st = &file.state;
    let mut pts = vec![(0.0, st.all_full_loss)];
    pts.extend(st.steps.iter().enumerate().map(|(i, s)| ((i + 1) as f64, s.loss)));
    let flips = st.steps.len() as f64;
    let mut series = vec![("greedy search".to_string(), pts)];
    if let Some(c) = &file.comparison {
        series.push((format!("uniform {}", c.uniform_pattern), vec![(flips, c.uniform_loss)]));
    }
    indexcache_tools::plot::line_plot(&series, "greedy IndexCache search", "flips committed", "mean NLL", stem)?;
    Ok(())
}
