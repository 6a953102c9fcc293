//! Greedy layer selection (IndexCache paper, Algorithm 1), exact and cheap.
//!
//! Start all-Full. Each step tentatively flips every remaining Full layer (never layer 0) to
//! Shared, scores the mean next-token loss on the same fixed calibration windows, and commits the
//! flip with the **lowest** loss (ties → lower layer). A Shared layer takes the top-k of the
//! nearest preceding Full layer, so a commit changes the source of the Shared layers after it.
//!
//! **Prefix reuse.** Layers before a candidate `l` compute exactly what the committed pattern
//! computes, so a candidate starts from the committed hidden state (and top-k share buffer) at
//! layer `l`'s input. We go one step further and keep candidates' per-layer states (their
//! *memo*): after committing `l*`, a candidate `l < l*` is unchanged up to layer `l*`'s input and
//! resumes there; a candidate `l > l*` resumes at `l` from the new committed states (the winner's
//! own trace). Losses are bit-identical to recomputing everything — the same ops on the same
//! inputs — and the layer-evaluation count is reported against the naive algorithm's.
//!
//! **Memory.** States are kept only at the input of layers a later step can start from (the
//! remaining candidates). The committed states are always kept (`windows × candidates` snapshots
//! of `T × hidden`, plus the top-k share buffer). A candidate's memo is as large again, per
//! candidate: on a 30B model that is ~150 GB per window for all of them, so memos are kept only
//! within [`SearchOptions::memo_budget_bytes`]. Each step, candidates get a memo **lowest layer
//! first** while the estimate (from the config, the windows and the backend's dtype) fits: a low
//! candidate's memo saves the most, as it stays valid up to the next committed layer, which is
//! usually above it. A candidate without a memo starts at its layer from the committed state
//! (plain committed-prefix reuse); when the winner has none, the committed states after it are
//! recomputed. The same ops run on the same inputs whatever the budget: losses and flip order do
//! not depend on it, only the layer-evaluation count does.
//!
//! **Chunks.** A window runs through each layer in prefill chunks of
//! [`SearchOptions::chunk`] rows (chunk after chunk, as a chunked prefill does), so activations
//! and the indexer's `[chunk, T]` scores stay bounded on long windows.
//!
//! **Pipeline blocks** (`blocks = P`): layers split into P contiguous blocks whose first layer is
//! fixed Full; each step commits the best flip of every block (up to P flips per step).

use crate::data::Window;
use crate::error::ToolError;
use crate::loss::{Nll, targets};
use indexcache_config::IndexSchedule;
use indexcache_model::{DsaModel, ModelError, StepState};
use indexcache_ops::{Backend, Positions};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::sync::Arc;

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
    /// Rows per prefill chunk when a window runs through a layer (`None`: the backend's
    /// [`Backend::default_chunk`]).
    #[serde(default)]
    pub chunk: Option<usize>,
    /// Bytes the candidates' memos may hold (`None`: no limit). See the module documentation;
    /// [`default_memo_budget`] is a quarter of the free device or host memory.
    #[serde(default)]
    pub memo_budget_bytes: Option<u64>,
}

impl SearchOptions {
    /// The plain algorithm (one block), the backend's chunk, memos without limit.
    pub fn new(target: Target) -> Self {
        Self { target, blocks: 1, chunk: None, memo_budget_bytes: None }
    }
}

/// A quarter of the memory not in use: the device's (a backend that reports its capacity), or
/// the host's `MemAvailable` (the CPU backend). `None` (no limit) where neither is known.
pub fn default_memo_budget<B: Backend>(backend: &B) -> Option<u64> {
    let m = backend.memory();
    match m.total {
        Some(total) => Some(total.saturating_sub(m.current) / 4),
        None => crate::host_mem_available().map(|a| a / 4),
    }
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
    Baseline {
        loss: f64,
    },
    /// At the start of a step: how many of its candidates get a memo, and its estimated bytes.
    Memo {
        step: usize,
        memoised: usize,
        candidates: usize,
        bytes: u64,
    },
    Candidate {
        step: usize,
        layer: usize,
        loss: f64,
        done: usize,
        total: usize,
    },
    Committed {
        state: &'a SearchState,
    },
}

/// Hidden state and share buffer of one prefill chunk of a window at the input of a layer.
struct Part<B: Backend> {
    x: B::Tensor,
    shared: Option<Arc<B::Selection>>,
}

/// The state of one window at the input of one layer: one part per chunk.
struct Snapshot<B: Backend> {
    parts: Vec<Part<B>>,
}

/// One window's states: `inputs[j]` = the state at the input of layer `j`, kept only where a later
/// step can start (see [`Evaluator::needed`]); `nll` of the pass that recorded them.
struct Trace<B: Backend> {
    inputs: Vec<Option<Snapshot<B>>>,
    nll: Nll,
}

impl<B: Backend> Trace<B> {
    fn empty(n: usize) -> Self {
        Self { inputs: (0..n).map(|_| None).collect(), nll: Nll::default() }
    }
}

/// A candidate's traces (one per window), valid for the inputs of layers `..=valid`.
struct Memo<B: Backend> {
    traces: Vec<Trace<B>>,
    valid: usize,
}

fn internal(what: String) -> ToolError {
    ToolError::Invalid(format!("internal error in the search: {what}"))
}

fn op_err(e: indexcache_ops::OpError) -> ToolError {
    ModelError::from(e).into()
}

/// The rows of one prefill chunk of a window and their positions.
type ChunkRows<B> = (Range<usize>, Positions<<B as Backend>::PosData>);

/// Runs windows through layer ranges, chunk by chunk, counting layer evaluations.
struct Evaluator<'m, B: Backend> {
    model: &'m DsaModel<B>,
    windows: &'m [Window],
    /// Per window: the rows and positions of each prefill chunk.
    chunks: Vec<Vec<ChunkRows<B>>>,
    /// Layers never flipped (layer 0, the first layer of each block): no step starts there.
    fixed_full: Vec<usize>,
    layer_evals: u64,
}

impl<'m, B: Backend> Evaluator<'m, B> {
    fn new(
        model: &'m DsaModel<B>,
        windows: &'m [Window],
        chunk: usize,
        fixed_full: Vec<usize>,
    ) -> Result<Self, ToolError> {
        if chunk == 0 {
            return Err(ToolError::Invalid("the prefill chunk must be at least 1 token".into()));
        }
        let mut chunks = Vec::with_capacity(windows.len());
        for w in windows {
            let mut parts = Vec::new();
            for start in (0..w.ids.len()).step_by(chunk) {
                let rows = start..(start + chunk).min(w.ids.len());
                let pos = model.backend().positions(&rows.clone().collect::<Vec<_>>()).map_err(op_err)?;
                parts.push((rows, pos));
            }
            chunks.push(parts);
        }
        Ok(Self { model, windows, chunks, fixed_full, layer_evals: 0 })
    }

    fn layers(&self) -> usize {
        self.model.config().num_hidden_layers
    }

    /// Is the state at the input of layer `j` worth keeping under `schedule`? Only where a later
    /// step can start: at a layer that can still be flipped (a candidate starts there; a commit
    /// there is where memos resume).
    fn needed(&self, schedule: &IndexSchedule, j: usize) -> bool {
        j >= 1 && j < self.layers() && schedule.is_full(j) && !self.fixed_full.contains(&j)
    }

    /// Estimated bytes of one layer's states over all windows: `T × hidden` activations in the
    /// backend's dtype plus a `T × min(index_topk, T)` i32 share buffer.
    fn layer_bytes(&self) -> u64 {
        let cfg = self.model.config();
        let act = (cfg.hidden_size * self.model.backend().dtype().size()) as u64;
        self.windows
            .iter()
            .map(|w| {
                let t = w.ids.len() as u64;
                t * (act + 4 * cfg.index_topk.min(w.ids.len()) as u64)
            })
            .sum()
    }

    /// Estimated bytes of the states a run of `schedule` keeps at layers after `after`.
    fn trace_bytes(&self, schedule: &IndexSchedule, after: usize) -> u64 {
        let layers = (after + 1..self.layers()).filter(|&j| self.needed(schedule, j)).count() as u64;
        layers * self.layer_bytes()
    }

    /// Clear the states `schedule` never starts from again.
    fn prune(&self, schedule: &IndexSchedule, inputs: &mut [Option<Snapshot<B>>]) {
        for (j, s) in inputs.iter_mut().enumerate() {
            if !self.needed(schedule, j) {
                *s = None;
            }
        }
    }

    fn copy(&self, t: &B::Tensor) -> Result<B::Tensor, ToolError> {
        self.model.backend().copy(t).map_err(op_err)
    }

    /// Window `w`'s embeddings, chunk by chunk (the state at the input of layer 0).
    fn embed(&self, schedule: &IndexSchedule, w: usize) -> Result<Snapshot<B>, ToolError> {
        let ids = &self.windows[w].ids;
        let longest = self.chunks[w].iter().map(|(r, _)| r.len()).max().unwrap_or(0);
        // `begin` validates the ids against the vocabulary and a cache; only its embedding is used.
        let cache = self.model.new_cache_with(schedule.clone(), longest.max(1))?;
        let parts = self.chunks[w]
            .iter()
            .map(|(rows, _)| Ok(Part { x: self.model.begin(&ids[rows.clone()], &cache)?.0, shared: None }))
            .collect::<Result<_, ToolError>>()?;
        Ok(Snapshot { parts })
    }

    /// Run layers `from..N` of `schedule` on window `w` from `start`, each layer chunk after
    /// chunk. With `record`, store the state at the input of every later layer that is
    /// [`Self::needed`] and clear the others. Returns the window's NLL (reduced on the device).
    fn run(
        &mut self,
        schedule: &IndexSchedule,
        w: usize,
        from: usize,
        start: &Snapshot<B>,
        mut record: Option<&mut [Option<Snapshot<B>>]>,
    ) -> Result<Nll, ToolError> {
        let model = self.model;
        let n = self.layers();
        let mut cache = model.new_cache_with(schedule.clone(), self.windows[w].ids.len())?;
        let mut parts: Vec<(B::Tensor, StepState<B>)> = start
            .parts
            .iter()
            .map(|p| Ok((self.copy(&p.x)?, StepState::with_shared(p.shared.clone()))))
            .collect::<Result<_, ToolError>>()?;
        for l in from..n {
            for ((x, state), (_, pos)) in parts.iter_mut().zip(&self.chunks[w]) {
                model.layer(l, x, &mut cache, pos, state)?;
            }
            self.layer_evals += 1;
            if let Some(inputs) = record.as_deref_mut()
                && l + 1 < n
            {
                inputs[l + 1] = match self.needed(schedule, l + 1) {
                    true => Some(Snapshot {
                        parts: parts
                            .iter()
                            .map(|(x, st)| Ok(Part { x: self.copy(x)?, shared: st.shared.clone() }))
                            .collect::<Result<_, ToolError>>()?,
                    }),
                    false => None,
                };
            }
        }
        let targets = targets(&self.windows[w]);
        let mut nll = Nll::default();
        for ((x, _), (rows, _)) in parts.iter().zip(&self.chunks[w]) {
            nll.add(Nll::from_rows(&model.nll_rows(x, &targets[rows.clone()])?));
        }
        Ok(nll)
    }

    /// `schedule` on every window from the embeddings; with `record`, the states kept.
    fn baseline(&mut self, schedule: &IndexSchedule, record: bool) -> Result<Vec<Trace<B>>, ToolError> {
        let mut traces = Vec::with_capacity(self.windows.len());
        for w in 0..self.windows.len() {
            let start = self.embed(schedule, w)?;
            let mut t = Trace::empty(self.layers());
            t.nll = self.run(schedule, w, 0, &start, record.then_some(&mut t.inputs[..]))?;
            traces.push(t);
        }
        Ok(traces)
    }
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

/// The search between steps: the committed schedule and states, and the candidates' memos.
struct Search<'m, B: Backend> {
    ev: Evaluator<'m, B>,
    schedule: IndexSchedule,
    committed: Vec<Trace<B>>,
    /// Per layer: the memo of the candidate that flips it.
    memos: Vec<Option<Memo<B>>>,
    budget: u64,
}

impl<B: Backend> Search<'_, B> {
    /// Which of `remaining` (ascending) keep a memo this step: lowest layers first while the
    /// estimate fits the budget (a candidate holding a memo also holds its resume state).
    /// Returns the plan and its estimated bytes.
    fn plan(&self, remaining: &[usize]) -> Result<(Vec<bool>, u64), ToolError> {
        let mut used = 0u64;
        let mut keep = Vec::with_capacity(remaining.len());
        for &l in remaining {
            let trial = self.schedule.with_shared(l)?;
            let resume = if self.memos[l].is_some() { self.ev.layer_bytes() } else { 0 };
            let need = self.ev.trace_bytes(&trial, l) + resume;
            let fits = used.saturating_add(need) <= self.budget;
            if fits {
                used += need;
            }
            keep.push(fits);
        }
        Ok((keep, used))
    }

    /// Mean loss of flipping `l`: from its memo where valid, else from the committed state at
    /// `l`. With `keep`, its states are kept as its new memo.
    fn evaluate(&mut self, l: usize, keep: bool) -> Result<f64, ToolError> {
        let n = self.ev.layers();
        let trial = self.schedule.with_shared(l)?;
        let memo = self.memos[l].take();
        let from = memo.as_ref().map_or(l, |m| m.valid);
        let mut traces = match memo {
            Some(m) => m.traces,
            None => (0..self.ev.windows.len()).map(|_| Trace::empty(n)).collect(),
        };
        let mut sum = Nll::default();
        for (w, trace) in traces.iter_mut().enumerate() {
            let resume = trace.inputs[from].take();
            let start = match &resume {
                Some(s) => s,
                None if from == l => self.committed[w].inputs[l]
                    .as_ref()
                    .ok_or_else(|| internal(format!("no committed state at layer {l}")))?,
                None => return Err(internal(format!("the memo of layer {l} has no state at layer {from}"))),
            };
            trace.nll = self.ev.run(&trial, w, from, start, keep.then_some(&mut trace.inputs[..]))?;
            sum.add(trace.nll);
        }
        if keep {
            for t in &mut traces {
                self.ev.prune(&trial, &mut t.inputs);
            }
            self.memos[l] = Some(Memo { traces, valid: n });
        }
        Ok(sum.mean())
    }

    /// Commit `flips` (layer, candidate loss) together; returns the loss after them. One flip
    /// with a memo: its traces become the committed states. Otherwise (several flips, whose joint
    /// loss is new, or a winner without a memo) the committed states are recomputed from the
    /// first flipped layer on.
    fn commit(&mut self, flips: &[(usize, f64)]) -> Result<f64, ToolError> {
        let first = flips.iter().map(|c| c.0).min().ok_or_else(|| internal("empty commit".into()))?;
        for &(l, _) in flips {
            self.schedule = self.schedule.with_shared(l)?;
        }
        let loss = match (flips, self.memos[first].take()) {
            ([(_, loss)], Some(memo)) => {
                for (c, t) in self.committed.iter_mut().zip(memo.traces) {
                    for (j, s) in t.inputs.into_iter().enumerate().skip(first + 1) {
                        c.inputs[j] = s;
                    }
                    c.nll = t.nll;
                }
                *loss
            }
            (_, _) => {
                for w in 0..self.committed.len() {
                    let start = self.committed[w].inputs[first]
                        .take()
                        .ok_or_else(|| internal(format!("no committed state at layer {first}")))?;
                    let c = &mut self.committed[w];
                    c.nll = self.ev.run(&self.schedule, w, first, &start, Some(&mut c.inputs))?;
                }
                let joint = total(&self.committed).mean();
                if let [(_, loss)] = flips { *loss } else { joint }
            }
        };
        for c in &mut self.committed {
            self.ev.prune(&self.schedule, &mut c.inputs);
        }
        // Memos of layers below the first flip stay valid up to it; the others are stale.
        for (l, m) in self.memos.iter_mut().enumerate() {
            match m {
                Some(memo) if l < first => memo.valid = memo.valid.min(first),
                _ => *m = None,
            }
        }
        Ok(loss)
    }
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
    let chunk = opts.chunk.unwrap_or_else(|| model.backend().default_chunk());
    let mut ev = Evaluator::new(model, windows, chunk, fixed_full.clone())?;

    let (mut state, schedule) = start_state(resume, fingerprint, opts, n, windows)?;
    // Committed states of the current schedule (on resume: recomputed once).
    let committed = ev.baseline(&schedule, true)?;
    if state.steps.is_empty() {
        // The naive algorithm also needs the all-Full pass to report its loss.
        state.naive_layer_evals += (n * windows.len()) as u64;
        state.all_full_loss = total(&committed).mean();
        on_event(SearchEvent::Baseline { loss: state.all_full_loss });
    }
    let budget = opts.memo_budget_bytes.unwrap_or(u64::MAX);
    let mut search = Search { ev, schedule, committed, memos: (0..n).map(|_| None).collect(), budget };
    state.layer_evals += std::mem::take(&mut search.ev.layer_evals);
    save(&state)?;

    while state.removal_order.len() < k_total {
        // Steps commit one flip each, or one per block with pipeline blocks.
        let step = state.steps.last().map_or(1, |s| s.step + 1);
        let remaining: Vec<usize> =
            (1..n).filter(|&l| search.schedule.is_full(l) && !fixed_full.contains(&l)).collect();
        let (plan, bytes) = search.plan(&remaining)?;
        let memoised = plan.iter().filter(|&&k| k).count();
        on_event(SearchEvent::Memo { step, memoised, candidates: remaining.len(), bytes });
        let mut results: Vec<(usize, f64)> = Vec::with_capacity(remaining.len());
        for (i, (&l, &keep)) in remaining.iter().zip(&plan).enumerate() {
            let loss = search.evaluate(l, keep)?;
            results.push((l, loss));
            on_event(SearchEvent::Candidate { step, layer: l, loss, done: i + 1, total: remaining.len() });
        }
        state.naive_layer_evals += (remaining.len() * n * windows.len()) as u64;

        let commits = block_commits(&results, n, opts.blocks, k_total - state.removal_order.len());
        if commits.is_empty() {
            break;
        }
        let loss = search.commit(&commits)?;
        for (i, &(l, _)) in commits.iter().enumerate() {
            state.removal_order.push(l);
            state.steps.push(Step {
                step,
                flipped: l,
                pattern: search.schedule.to_pattern(),
                loss,
                candidates: if i == 0 { results.clone() } else { Vec::new() },
            });
        }
        state.pattern = search.schedule.to_pattern();
        state.layer_evals += std::mem::take(&mut search.ev.layer_evals);
        state.done = state.removal_order.len() >= k_total;
        save(&state)?;
        on_event(SearchEvent::Committed { state: &state });
    }
    state.done = true;
    save(&state)?;
    Ok(state)
}

/// The search's state and schedule to start from: the saved search (`resume`, which must have
/// the same fingerprint) with its committed flips applied, or a fresh all-Full one.
fn start_state(
    resume: Option<SearchState>,
    fingerprint: String,
    opts: &SearchOptions,
    n: usize,
    windows: &[Window],
) -> Result<(SearchState, IndexSchedule), ToolError> {
    let mut schedule = IndexSchedule::all_full(n);
    let state = match resume {
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
    Ok((state, schedule))
}

/// The flips a step commits from its candidates' `(layer, loss)`: the best of each pipeline block
/// (one block = the plain algorithm), lowest loss first (ties to the lower layer), at most `limit`.
fn block_commits(results: &[(usize, f64)], n: usize, n_blocks: usize, limit: usize) -> Vec<(usize, f64)> {
    let order = |a: &(usize, f64), b: &(usize, f64)| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0));
    let mut commits: Vec<(usize, f64)> = blocks(n, n_blocks)
        .iter()
        .filter_map(|&(start, end)| results.iter().filter(|(l, _)| (start..end).contains(l)).min_by(|a, b| order(a, b)))
        .copied()
        .collect();
    commits.sort_by(order);
    commits.truncate(limit);
    commits
}

/// Mean loss of an arbitrary schedule on the windows (for the uniform / all-Full comparisons),
/// each window run in prefill chunks of `chunk` rows as the search runs it.
pub fn schedule_loss<B: Backend>(
    model: &DsaModel<B>,
    schedule: &IndexSchedule,
    windows: &[Window],
    chunk: usize,
) -> Result<f64, ToolError> {
    let mut ev = Evaluator::new(model, windows, chunk, vec![0])?;
    Ok(total(&ev.baseline(schedule, false)?).mean())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_commits_take_each_blocks_best_lowest_first() {
        // 8 layers in 2 blocks [0, 4) and [4, 8); layer 2 and 3 tie, the lower layer wins.
        let results = [(1, 3.0), (2, 2.5), (3, 2.5), (5, 2.0), (6, 2.7)];
        assert_eq!(block_commits(&results, 8, 2, 8), [(5, 2.0), (2, 2.5)]);
        assert_eq!(block_commits(&results, 8, 2, 1), [(5, 2.0)]);
        // One block: the plain algorithm's single best flip.
        assert_eq!(block_commits(&results, 8, 1, 8), [(5, 2.0)]);
        // A block without candidates commits nothing.
        assert_eq!(block_commits(&[(1, 1.0)], 8, 2, 8), [(1, 1.0)]);
        assert!(block_commits(&[], 8, 2, 8).is_empty());
    }
}
