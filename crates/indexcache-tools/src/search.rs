//! Greedy layer selection (IndexCache paper, Algorithm 1), exact and cheap.
//!
//! Start all-Full. Each step tentatively flips every remaining Full layer (never layer 0) to
//! Shared, scores the mean next-token loss on the same fixed calibration windows, and commits the
//! flip with the **lowest** loss (ties → lower layer). A Shared layer takes the top-k of the
//! nearest preceding Full layer, so a commit changes the source of the Shared layers after it.
//!
//! **Prefix reuse.** Layers before a candidate `l` compute exactly what the committed pattern
//! computes, so a candidate starts from the committed hidden state (and top-k share buffer) at
//! layer `l`'s input. We go one step further and keep every candidate's per-layer states: after
//! committing `l*`, a candidate `l < l*` is unchanged up to layer `l*`'s input and resumes
//! there; a candidate `l > l*` resumes at `l` from the new committed states (the winner's own
//! trace). Losses are bit-identical to recomputing everything — the same ops on the same inputs —
//! and the layer-evaluation count is reported against the naive algorithm's.
//!
//! **Pipeline blocks** (`blocks = P`): layers split into P contiguous blocks whose first layer is
//! fixed Full; each step commits the best flip of every block (up to P flips per step).

use crate::data::Window;
use crate::error::ToolError;
use crate::loss::Nll;
use indexcache_config::IndexSchedule;
use indexcache_model::{DsaModel, StepState};
use indexcache_ops::Backend;
use std::sync::Arc;
use serde::{Deserialize, Serialize};

/// When to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// Keep `num/den` of the indexers: stop at `max(1, ceil(N·num/den))` Full layers.
    Keep { num: usize, den: usize },
    /// Commit this many flips.
    Flips(usize),
}

impl Target {
    /// Flips needed for an `n`-layer model.
    pub fn flips(&self, n: usize) -> usize {
        match *self {
            Target::Keep { num, den } => n - (n * num).div_ceil(den).clamp(1, n),
            Target::Flips(k) => k,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchOptions {
    pub target: Target,
    /// Pipeline blocks (1 = the plain algorithm).
    pub blocks: usize,
}

/// One committed flip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub step: usize,
    pub flipped: usize,
    /// Pattern after the flip.
    pub pattern: String,
    /// Mean NLL after the flip.
    pub loss: f64,
    /// Every candidate's loss at this step (layer, loss).
    pub candidates: Vec<(usize, f64)>,
}

/// Search progress and result; saved after every committed flip so a run can resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchState {
    /// Fingerprint of model config + calibration tokens + options (resume guard).
    pub fingerprint: String,
    pub options: SearchOptions,
    pub layers: usize,
    pub all_full_loss: f64,
    pub steps: Vec<Step>,
    /// Current (final, when `done`) pattern.
    pub pattern: String,
    pub removal_order: Vec<usize>,
    pub done: bool,
    /// Layer evaluations performed by this run (all sessions, including the all-Full pass and
    /// the replay of a resume) and by the naive algorithm for the same outputs (all-Full pass +
    /// every candidate from scratch).
    pub layer_evals: u64,
    pub naive_layer_evals: u64,
    pub calibration_tokens: usize,
}

/// Events for progress reporting.
pub enum SearchEvent<'a> {
    Baseline { loss: f64 },
    Candidate { step: usize, layer: usize, loss: f64, done: usize, total: usize },
    Committed { state: &'a SearchState },
}

/// Hidden state and share buffer at the input of one layer, for one window.
struct Snapshot<B: Backend> {
    x: B::Tensor,
    shared: Option<Arc<B::Selection>>,
}

/// Per window: `inputs[j]` = state at the input of layer `j` (`j = N` is the final hidden state),
/// `None` where not computed/valid.
struct Trace<B: Backend> {
    inputs: Vec<Option<Snapshot<B>>>,
    nll: Nll,
}

/// One candidate's traces (one per window) and the last layer whose input state is valid.
type CandidateTraces<B> = (Vec<Trace<B>>, usize);

struct Evaluator<'m, B: Backend> {
    model: &'m DsaModel<B>,
    windows: &'m [Window],
    layer_evals: u64,
}

impl<B: Backend> Evaluator<'_, B> {
    fn copy(&self, t: &B::Tensor) -> Result<B::Tensor, ToolError> {
        Ok(self.model.backend().copy(t).map_err(indexcache_model::ModelError::from)?)
    }

    /// Run layers `from..N` of `schedule` on window `w` starting from `start`, recording the
    /// state at every later layer input into `trace` (whose entries `..=from` are kept).
    fn run(
        &mut self,
        schedule: &IndexSchedule,
        w: usize,
        from: usize,
        start: &Snapshot<B>,
        trace: &mut Trace<B>,
    ) -> Result<(), ToolError> {
        let model = self.model;
        let n = model.config().num_hidden_layers;
        let ids = &self.windows[w].ids;
        let mut cache = model.new_cache_with(schedule.clone(), ids.len())?;
        let positions = model.backend().positions(&(0..ids.len()).collect::<Vec<_>>()).map_err(model_err)?;
        let mut x = self.copy(&start.x)?;
        let mut state = StepState::<B>::with_shared(start.shared.clone());
        for l in from..n {
            model.layer(l, &mut x, &mut cache, &positions, &mut state)?;
            self.layer_evals += 1;
            trace.inputs[l + 1] = Some(Snapshot { x: self.copy(&x)?, shared: state.shared.clone() });
        }
        trace.nll = window_nll_from_hidden(model, &x, &self.windows[w])?;
        Ok(())
    }

    /// Full traces of `schedule` for every window.
    fn baseline(&mut self, schedule: &IndexSchedule) -> Result<Vec<Trace<B>>, ToolError> {
        let n = self.model.config().num_hidden_layers;
        let mut traces = Vec::new();
        for w in 0..self.windows.len() {
            let cache = self.model.new_cache_with(schedule.clone(), self.windows[w].ids.len())?;
            let (x, _) = self.model.begin(&self.windows[w].ids, &cache)?;
            let start = Snapshot { x, shared: None };
            let mut trace = Trace { inputs: (0..=n).map(|_| None).collect(), nll: Nll::default() };
            self.run(schedule, w, 0, &start, &mut trace)?;
            trace.inputs[0] = Some(start);
            traces.push(trace);
        }
        Ok(traces)
    }
}

fn model_err(e: indexcache_ops::OpError) -> ToolError {
    indexcache_model::ModelError::from(e).into()
}

/// NLL of a window's scored tokens from the final hidden states, reduced on the device.
fn window_nll_from_hidden<B: Backend>(model: &DsaModel<B>, x: &B::Tensor, w: &Window) -> Result<Nll, ToolError> {
    let nll = model.nll_rows(x, &crate::loss::targets(w))?;
    Ok(Nll::from_rows(&nll))
}

fn total<B: Backend>(traces: &[Trace<B>]) -> Nll {
    let mut t = Nll::default();
    for tr in traces {
        t.add(tr.nll);
    }
    t
}

/// Blocks of layers `[start, end)`; the first layer of each block is never a candidate.
fn blocks(n: usize, p: usize) -> Vec<(usize, usize)> {
    let p = p.clamp(1, n);
    (0..p).map(|i| (i * n / p, (i + 1) * n / p)).collect()
}

/// A stable fingerprint (FNV-1a) of what determines the search result.
pub fn fingerprint(config_json: &str, windows: &[Window], opts: &SearchOptions) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(config_json.as_bytes());
    for w in windows {
        eat(&(w.score_from as u64).to_le_bytes());
        for id in &w.ids {
            eat(&id.to_le_bytes());
        }
        eat(b"|");
    }
    // The target is left out on purpose: a finished 1/4 search can be resumed towards 1/8.
    eat(&(opts.blocks as u64).to_le_bytes());
    format!("{h:016x}")
}

/// Run (or resume) the greedy search. `save` is called after the baseline and after every
/// committed flip with the state to persist; `on_event` reports progress.
pub fn greedy_search<B: Backend>(
    model: &DsaModel<B>,
    windows: &[Window],
    opts: &SearchOptions,
    fingerprint: String,
    resume: Option<SearchState>,
    save: &mut dyn FnMut(&SearchState) -> Result<(), ToolError>,
    on_event: &mut dyn FnMut(SearchEvent<'_>),
) -> Result<SearchState, ToolError> {
    let n = model.config().num_hidden_layers;
    if windows.is_empty() {
        return Err(ToolError::Invalid("no calibration windows".into()));
    }
    // The search starts all-Full: every layer's indexer must be loaded.
    model.check_schedule(&IndexSchedule::all_full(n))?;
    let k_total = opts.target.flips(n);
    if k_total > n - 1 || (opts.blocks > 1 && k_total > n - blocks(n, opts.blocks).len()) {
        return Err(ToolError::Invalid(format!(
            "cannot commit {k_total} flips on {n} layers with {} block(s) (first layer of each block stays Full)",
            opts.blocks.max(1)
        )));
    }
    let fixed_full: Vec<usize> = blocks(n, opts.blocks).iter().map(|b| b.0).collect();

    let mut ev = Evaluator { model, windows, layer_evals: 0 };
    let mut schedule = IndexSchedule::all_full(n);
    let mut state = match resume {
        Some(s) => {
            if s.fingerprint != fingerprint {
                return Err(ToolError::Invalid(
                    "--resume: the saved search used a different model, calibration data or options".into(),
                ));
            }
            for st in &s.steps {
                schedule = schedule.with_shared(st.flipped)?;
            }
            SearchState { options: opts.clone(), done: false, ..s }
        }
        None => SearchState {
            fingerprint,
            options: opts.clone(),
            layers: n,
            all_full_loss: f64::NAN,
            steps: Vec::new(),
            pattern: schedule.to_pattern(),
            removal_order: Vec::new(),
            done: false,
            layer_evals: 0,
            naive_layer_evals: 0,
            calibration_tokens: windows.iter().map(Window::targets).sum(),
        },
    };
    // Committed traces of the current schedule (on resume: recomputed once).
    let mut committed = ev.baseline(&schedule)?;
    if state.steps.is_empty() {
        // The naive algorithm also needs the all-Full pass to report its loss.
        state.naive_layer_evals += (n * windows.len()) as u64;
        state.all_full_loss = total(&committed).mean();
        on_event(SearchEvent::Baseline { loss: state.all_full_loss });
    }
    // Per candidate layer: its traces, valid for the inputs of layers `..=valid_until`.
    let mut cand: Vec<Option<CandidateTraces<B>>> = (0..n).map(|_| None).collect();
    state.layer_evals += ev.layer_evals;
    ev.layer_evals = 0;
    save(&state)?;

    while state.removal_order.len() < k_total {
        let step = state.steps.len() + 1;
        let remaining: Vec<usize> = (1..n).filter(|&l| schedule.is_full(l) && !fixed_full.contains(&l)).collect();
        let mut results: Vec<(usize, f64)> = Vec::with_capacity(remaining.len());
        for (i, &l) in remaining.iter().enumerate() {
            let trial = schedule.with_shared(l)?;
            let (mut traces, from) = match cand[l].take() {
                Some((t, valid)) => (t, valid),
                None => {
                    let t = (0..windows.len())
                        .map(|_| Trace { inputs: (0..=n).map(|_| None).collect(), nll: Nll::default() })
                        .collect();
                    (t, l)
                }
            };
            for (w, trace) in traces.iter_mut().enumerate() {
                // Resume point: the candidate's own state, or the committed state at `l`.
                let start = match trace.inputs[from].take() {
                    Some(s) => s,
                    None => {
                        let c = committed[w].inputs[l]
                            .as_ref()
                            .ok_or_else(|| ToolError::Invalid(format!("internal: no committed state at layer {l}")))?;
                        Snapshot { x: ev.copy(&c.x)?, shared: c.shared.clone() }
                    }
                };
                ev.run(&trial, w, from, &start, trace)?;
                trace.inputs[from] = Some(start);
            }
            let loss = total(&traces).mean();
            results.push((l, loss));
            cand[l] = Some((traces, n));
            on_event(SearchEvent::Candidate { step, layer: l, loss, done: i + 1, total: remaining.len() });
        }
        state.naive_layer_evals += (remaining.len() * n * windows.len()) as u64;

        // Commit the best flip of each block (one block = the plain algorithm).
        let mut commits: Vec<(usize, f64)> = Vec::new();
        for &(start, end) in &blocks(n, opts.blocks) {
            let best = results
                .iter()
                .filter(|(l, _)| (start..end).contains(l))
                .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
            if let Some(&b) = best {
                commits.push(b);
            }
        }
        commits.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        commits.truncate(k_total - state.removal_order.len());
        if commits.is_empty() {
            break;
        }
        let first = commits.iter().map(|c| c.0).min().expect("non-empty");
        if commits.len() == 1 {
            let (l, loss) = commits[0];
            // The winner's traces are the new committed states from layer l on.
            let (traces, _) = cand[l].take().expect("evaluated this step");
            for (w, t) in traces.into_iter().enumerate() {
                for (j, s) in t.inputs.into_iter().enumerate().skip(l + 1) {
                    committed[w].inputs[j] = s;
                }
                committed[w].nll = t.nll;
            }
            schedule = schedule.with_shared(l)?;
            state.removal_order.push(l);
            state.steps.push(Step {
                step,
                flipped: l,
                pattern: schedule.to_pattern(),
                loss,
                candidates: results.clone(),
            });
        } else {
            // Several flips at once: their joint loss is new; recompute from the first one.
            for &(l, _) in &commits {
                schedule = schedule.with_shared(l)?;
                state.removal_order.push(l);
                cand[l] = None;
            }
            for (w, tr) in committed.iter_mut().enumerate() {
                let s = tr.inputs[first].take().expect("committed prefix");
                ev.run(&schedule, w, first, &s, tr)?;
                tr.inputs[first] = Some(s);
            }
            let loss = total(&committed).mean();
            for (i, &(l, _)) in commits.iter().enumerate() {
                state.steps.push(Step {
                    step,
                    flipped: l,
                    pattern: schedule.to_pattern(),
                    loss,
                    candidates: if i == 0 { results.clone() } else { Vec::new() },
                });
            }
        }
        // Invalidate candidate traces past the first changed layer.
        for (l, c) in cand.iter_mut().enumerate() {
            match c {
                Some((_, valid)) if l < first => *valid = (*valid).min(first),
                _ => *c = None,
            }
        }
        state.pattern = schedule.to_pattern();
        state.layer_evals += ev.layer_evals;
        ev.layer_evals = 0;
        state.done = state.removal_order.len() >= k_total;
        save(&state)?;
        on_event(SearchEvent::Committed { state: &state });
    }
    state.done = true;
    save(&state)?;
    Ok(state)
}

/// Mean loss of an arbitrary schedule on the windows (for the uniform / all-Full comparisons).
pub fn schedule_loss<B: Backend>(
    model: &DsaModel<B>,
    schedule: &IndexSchedule,
    windows: &[Window],
) -> Result<f64, ToolError> {
    let mut ev = Evaluator { model, windows, layer_evals: 0 };
    Ok(total(&ev.baseline(schedule)?).mean())
}
