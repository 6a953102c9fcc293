//! The DSA decoder (DeepSeek-V3.2 and GLM-5 share it; they differ in sizes and the indexer's
//! RoPE layout), with IndexCache: Full layers run the lightning indexer and publish their
//! top-k; Shared layers attend over the top-k of the nearest preceding Full layer.
//!
//! Reference: transformers 5.24 `modeling_deepseek_v32.py` / `modeling_glm_moe_dsa.py`.
//! Per layer, in paper order:
//! ```text
//! h = rms_norm(x)                                   input_layernorm
//! qr = rms_norm(q_a(h)); q = q_b(qr)                q latent (shared with the indexer)
//! c, k_pe = rms_norm(kv_a(h)[:R]), rope(kv_a(h)[R:])  → cache row [c | k_pe]
//! sel = Full ? topk(indexer(h, qr)) : sel(source)   IndexCache
//! o = W_UV · sparse_attn(q_nope·W_UK, rope(q_pe), cache, sel)
//! x += o_proj(o); x += ffn(rms_norm(x))             dense SwiGLU or MoE
//! ```
//! A dense llama model (a GGUF, `gguf.rs`) runs the same layer with grouped-query attention:
//! `q, k = rope(W_q h), rope(W_k h)`, `v = W_v h` into the cache, attention over all earlier keys
//! (dense) or over the selection of an indexer whose query reads `h` (DSA on a dense model).

use crate::cache::{Cache, LayerCache, LayerKv, StepGraph};
use crate::error::ModelError;
use crate::weights::{
    AttentionWeights, CheckpointSource, FfnWeights, IndexerSelection, ModelWeights, RandomSource, WeightSource,
    load_weights,
};
use indexcache_config::{IndexSchedule, LayerIndexer, ModelConfig, ScheduleOverride};
use indexcache_ops::{Backend, Positions, RopeLayout, TopK};
use indexcache_weights::WeightStore;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// transformers builds `q_a_layernorm` / `kv_a_layernorm` with the RMSNorm default eps, not
/// `rms_norm_eps`.
const LATENT_NORM_EPS: f32 = 1e-6;
/// The indexer's `k_norm` is `nn.LayerNorm(D, eps=1e-6)`.
const INDEXER_NORM_EPS: f32 = 1e-6;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Replace the checkpoint's schedule.
    pub schedule: Option<ScheduleOverride>,
    /// Which indexers to materialise.
    pub indexers: IndexerSelection,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { schedule: None, indexers: IndexerSelection::Full }
    }
}

/// What loading found in the checkpoint besides the weights it used.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Tensors of the multi-token-prediction layer(s) `model.layers.{N..}`, skipped like
    /// transformers does.
    pub skipped_mtp: Vec<String>,
    /// Other tensors the model did not use.
    pub unused: Vec<String>,
    /// Tensors read (weights and their fp8 scales).
    pub tensors_loaded: usize,
}

/// Which logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    All,
    Last,
    None,
    /// No logits: the greedy next token ([`indexcache_ops::argmax`] of the last row's logits,
    /// computed by the backend, so the `vocab` logits never leave a device) in
    /// [`ForwardOutput::tokens`].
    Greedy,
}

#[derive(Debug, Clone, Copy)]
pub struct ForwardOptions {
    pub logits: Logits,
    /// Return the top-k of every layer that ran its indexer.
    pub capture_topk: bool,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        Self { logits: Logits::Last, capture_topk: false }
    }
}

/// Device time per stage of a forward pass (summed over layers), from backend marks (CUDA events
/// on a GPU), not host clocks around asynchronous launches.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTimes {
    /// Lightning indexer: projections, scoring and top-k (Full layers only).
    pub indexer: Duration,
    /// MLA projections, cache writes and sparse attention (without the indexer).
    pub attention: Duration,
    /// Dense MLP / MoE.
    pub ffn: Duration,
}

impl StageTimes {
    pub fn add(&mut self, o: &StageTimes) {
        self.indexer += o.indexer;
        self.attention += o.attention;
        self.ffn += o.ffn;
    }
}

/// Marks recorded around one layer's stages, resolved into [`StageTimes`] after the pass.
struct LayerMarks<M> {
    start: M,
    indexer: Option<(M, M)>,
    attention_end: M,
    ffn_end: M,
}

/// What a grouped-query layer computed for one pass, on the host (distillation targets and
/// inputs): the normalised hidden states (the indexer's input) `[T, hidden]` and the rotated
/// queries `[T, H*D]` and keys `[T, Hkv*D]` of the pass's tokens.
#[derive(Debug, Clone)]
pub struct LayerTap {
    pub h: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
}

/// State carried from layer to layer within one forward pass.
pub struct StepState<B: Backend> {
    /// The top-k of the latest Full layer (the IndexCache share buffer), on the device. Shared
    /// layers (and tools that snapshot a pass) hold it by reference count.
    pub shared: Option<Arc<B::Selection>>,
    marks: Vec<LayerMarks<B::Mark>>,
    /// Collect a [`LayerTap`] per layer (grouped-query models).
    taps: Option<Vec<LayerTap>>,
}

impl<B: Backend> Default for StepState<B> {
    fn default() -> Self {
        Self { shared: None, marks: Vec::new(), taps: None }
    }
}

impl<B: Backend> StepState<B> {
    /// A state that starts from another pass's share buffer.
    pub fn with_shared(shared: Option<Arc<B::Selection>>) -> Self {
        Self { shared, marks: Vec::new(), taps: None }
    }

    /// Stage times of the layers run so far (waits for the device).
    pub fn times(&self, b: &B) -> Result<StageTimes, ModelError> {
        let mut t = StageTimes::default();
        for m in &self.marks {
            let indexer = match &m.indexer {
                Some((a, z)) => b.elapsed(a, z)?,
                None => Duration::ZERO,
            };
            t.indexer += indexer;
            t.attention += b.elapsed(&m.start, &m.attention_end)?.saturating_sub(indexer);
            t.ffn += b.elapsed(&m.attention_end, &m.ffn_end)?;
        }
        Ok(t)
    }
}

#[derive(Debug, Clone, Default)]
pub struct ForwardOutput {
    /// `[rows, vocab]` row-major, `rows` = T (All), 1 (Last) or 0.
    pub logits: Vec<f32>,
    pub rows: usize,
    /// The greedy next token (`Logits::Greedy`), else empty.
    pub tokens: Vec<u32>,
    /// `(layer, top-k)` for each Full layer, when captured.
    pub topk: Vec<(usize, TopK)>,
    pub times: StageTimes,
}

/// What the layers of a pass leave before the LM head.
struct Hidden<B: Backend> {
    /// Final hidden states `[T, hidden]`.
    x: B::Tensor,
    /// Top-k captured so far (logits and times are filled in by the caller).
    out: ForwardOutput,
    state: StepState<B>,
}

pub struct DsaModel<B: Backend> {
    backend: B,
    cfg: ModelConfig,
    schedule: IndexSchedule,
    weights: ModelWeights<B>,
    indexer_layout: RopeLayout,
    /// Score with the reference's FP8 numerics (Hadamard + UE8M0 e4m3 fake quantisation of the
    /// indexer q and k) instead of exact arithmetic.
    indexer_fp8: bool,
    /// Record stage marks (device events) around every layer's stages (off by default: a pass
    /// then issues no events and reports zero stage times, and decode steps can be replayed).
    stage_timing: std::sync::atomic::AtomicBool,
    /// Replay recorded decode steps where the backend records them (on by default).
    step_graphs: std::sync::atomic::AtomicBool,
    /// Identifies this model in the steps recorded over its caches.
    id: u64,
    /// Dense attention (a GQA model without indexers, or `--attention dense`): every layer
    /// attends to all earlier tokens and no indexer runs; the schedule is ignored.
    dense_attention: bool,
    /// RoPE layout of a GQA model's q/k (interleaved for a GGUF's permuted weights).
    gqa_layout: RopeLayout,
}

/// Launch shapes of a recorded decode step cover positions below this or the next power of two
/// (at most the cache capacity); a step past it records anew — at most log2(capacity/64) + 1
/// recordings per sequence, each a few milliseconds.
const STEP_BOUND_MIN: usize = 64;

fn next_model_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl<B: Backend> DsaModel<B> {
    /// Load `config.json` + safetensors from `dir`. `on_tensor(name, done, total)` is called
    /// after each tensor (for a progress bar).
    pub fn load(
        dir: &Path,
        backend: B,
        opts: &LoadOptions,
        on_tensor: &mut dyn FnMut(&str, usize, usize),
    ) -> Result<(Self, LoadReport), ModelError> {
        // A llama GGUF file, or a directory whose config.json names one (DSA on a dense model).
        if crate::gguf::is_gguf_file(dir) {
            return Self::load_gguf(dir, None, backend, opts, on_tensor);
        }
        if let Some(md) = crate::gguf::read_model_dir(dir)? {
            return Self::load_gguf(&md.gguf, Some(&md), backend, opts, on_tensor);
        }
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let mut store = WeightStore::open(dir)?;
        if let Some(q) = cfg.quantization {
            store.set_fp8_block(q.block);
        }
        let schedule = match &opts.schedule {
            Some(o) => o.apply(cfg.num_hidden_layers)?,
            None => cfg.schedule.clone(),
        };
        check_indexers(&cfg, &schedule, |n| store.contains(n))?;

        let n_layers = cfg.num_hidden_layers;
        let is_mtp = |name: &str| layer_of(name).is_some_and(|l| l >= n_layers);
        // One progress tick per weight read (an fp8 weight's `_scale_inv` is read with it).
        let total = store.names().into_iter().filter(|n| !is_mtp(n) && !n.ends_with("_scale_inv")).count();
        let mut done = 0usize;
        let mut progress = |name: &str| {
            done += 1;
            on_tensor(name, done, total);
        };
        let mut src = CheckpointSource { store: &store, on_tensor: &mut progress };
        let model = Self::from_source(cfg, backend, schedule, &mut src, opts.indexers)?;

        let mut report = LoadReport::default();
        for name in store.unused() {
            if is_mtp(&name) {
                report.skipped_mtp.push(name);
            } else {
                report.unused.push(name);
            }
        }
        report.tensors_loaded = store.len() - report.skipped_mtp.len() - report.unused.len();
        Ok((model, report))
    }

    /// A llama model from its GGUF file; `dir` adds the indexers a model directory declares.
    fn load_gguf(
        path: &Path,
        dir: Option<&crate::gguf::GgufModelDir>,
        backend: B,
        opts: &LoadOptions,
        on_tensor: &mut dyn FnMut(&str, usize, usize),
    ) -> Result<(Self, LoadReport), ModelError> {
        use crate::gguf::{GgufSource, llama_params, with_indexer};
        if !path.exists() {
            return Err(ModelError::Invalid(format!(
                "{}: no such GGUF file (the default model is fetched by `bash scripts/fetch_smollm2.sh`)",
                path.display()
            )));
        }
        let g = indexcache_weights::GgufFile::open(path).map_err(|e| ModelError::Weights(e.into()))?;
        let origin = path.display().to_string();
        let mut params = llama_params(&g)?;
        if let Some((md, spec)) = dir.and_then(|md| md.indexer.as_ref().map(|s| (md, s))) {
            params = with_indexer(params, spec, &md.gguf.display().to_string())?;
        }
        let cfg = ModelConfig::llama(&params, &origin)?;
        let side = match dir.and_then(|md| md.indexers.as_ref()) {
            Some(file) => Some(WeightStore::open(file.parent().unwrap_or(Path::new(".")))?),
            None => None,
        };
        let schedule = match &opts.schedule {
            Some(o) => o.apply(cfg.num_hidden_layers)?,
            None => cfg.schedule.clone(),
        };
        let total = g.len() + side.as_ref().map_or(0, |s| s.len());
        let mut loaded = std::collections::HashSet::new();
        let mut progress = |name: &str| {
            loaded.insert(name.to_string());
            on_tensor(name, loaded.len(), total);
        };
        let mut src = GgufSource { gguf: &g, side: side.as_ref(), on_tensor: &mut progress };
        let model = Self::from_source(cfg, backend, schedule, &mut src, opts.indexers)?;
        let mut report = LoadReport { tensors_loaded: loaded.len(), ..Default::default() };
        report.unused = g.names().into_iter().filter(|n| !loaded.contains(*n)).map(str::to_string).collect();
        if let Some(side) = &side {
            report.unused.extend(side.unused());
        }
        Ok((model, report))
    }

    /// Build from any weight source (checkpoint or random).
    pub fn from_source(
        cfg: ModelConfig,
        backend: B,
        schedule: IndexSchedule,
        src: &mut dyn WeightSource,
        indexers: IndexerSelection,
    ) -> Result<Self, ModelError> {
        if schedule.len() != cfg.num_hidden_layers {
            return Err(ModelError::ScheduleLength { expected: cfg.num_hidden_layers, got: schedule.len() });
        }
        let dense_attention = indexers == IndexerSelection::None || cfg.index_n_heads == 0;
        if dense_attention && cfg.arch.is_mla() {
            return Err(ModelError::Invalid(format!(
                "dense attention needs a grouped-query (llama) model; {} attends sparsely over its indexers",
                cfg.arch.model_type()
            )));
        }
        let full: Vec<bool> = match dense_attention {
            true => vec![false; cfg.num_hidden_layers],
            false => {
                check_indexers(&cfg, &schedule, |n| src.has(n))?;
                (0..cfg.num_hidden_layers).map(|l| schedule.is_full(l)).collect()
            }
        };
        let weights = load_weights(&backend, &cfg, src, &full, indexers)?;
        let gqa_layout = if cfg.rope_interleave { RopeLayout::Interleaved } else { RopeLayout::HalfSplit };
        let indexer_layout = if cfg.indexer_rope_interleave { RopeLayout::Interleaved } else { RopeLayout::HalfSplit };
        Ok(Self {
            backend,
            cfg,
            schedule,
            weights,
            indexer_layout,
            indexer_fp8: false,
            stage_timing: std::sync::atomic::AtomicBool::new(false),
            step_graphs: std::sync::atomic::AtomicBool::new(true),
            id: next_model_id(),
            dense_attention,
            gqa_layout,
        })
    }

    /// Seeded random weights at the config's shapes, with an indexer on every layer.
    pub fn random(cfg: ModelConfig, backend: B, schedule: IndexSchedule, seed: u64) -> Result<Self, ModelError> {
        Self::from_source(cfg, backend, schedule, &mut RandomSource::new(seed), IndexerSelection::All)
    }

    /// [`Self::random`] with the matrices rounded to bf16 ([`RandomSource::bf16`]).
    pub fn random_bf16(cfg: ModelConfig, backend: B, schedule: IndexSchedule, seed: u64) -> Result<Self, ModelError> {
        Self::from_source(cfg, backend, schedule, &mut RandomSource::bf16(seed), IndexerSelection::All)
    }

    /// Select top-k with the FP8 indexer numerics of DeepSeek's reference implementation (as
    /// production engines do) instead of exact scores. A cache filled in one mode must not be
    /// continued in the other (its keys are stored as scored).
    pub fn set_fp8_indexer(&mut self, on: bool) -> Result<(), ModelError> {
        if on && !self.cfg.index_head_dim.is_power_of_two() {
            return Err(ModelError::Invalid(format!(
                "the FP8 indexer needs a power-of-two index_head_dim, this model has {}",
                self.cfg.index_head_dim
            )));
        }
        self.indexer_fp8 = on;
        Ok(())
    }

    /// Turn the per-stage marks on or off (off by default). Off, [`ForwardOutput::times`] is zero.
    pub fn set_stage_timing(&self, on: bool) {
        self.stage_timing.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Replay recorded one-token steps (CUDA graphs) where the backend can record them; on by
    /// default. A step is recorded only while stage timing is off (marks are host work).
    pub fn set_step_graphs(&self, on: bool) {
        self.step_graphs.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn mark(&self) -> Result<Option<B::Mark>, ModelError> {
        match self.stage_timing.load(std::sync::atomic::Ordering::Relaxed) {
            true => Ok(Some(self.backend.mark()?)),
            false => Ok(None),
        }
    }

    pub fn fp8_indexer(&self) -> bool {
        self.indexer_fp8
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The schedule caches get by default.
    pub fn schedule(&self) -> &IndexSchedule {
        &self.schedule
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Layers whose indexer weights are loaded.
    pub fn layers_with_indexer(&self) -> Vec<usize> {
        (0..self.cfg.num_hidden_layers).filter(|&l| self.weights.layers[l].indexer.is_some()).collect()
    }

    /// A cache for `capacity` tokens with the model's schedule.
    pub fn new_cache(&self, capacity: usize) -> Result<Cache<B>, ModelError> {
        self.new_cache_with(self.schedule.clone(), capacity)
    }

    /// A cache with another schedule (every Full layer needs its indexer loaded).
    pub fn new_cache_with(&self, schedule: IndexSchedule, capacity: usize) -> Result<Cache<B>, ModelError> {
        self.check_schedule(&schedule)?;
        Cache::new(&self.backend, &self.cfg, schedule, capacity, !self.dense_attention)
    }

    /// Does every layer attend densely (no indexer runs)?
    pub fn dense_attention(&self) -> bool {
        self.dense_attention
    }

    /// Can this model run `schedule`? Right length, and every Full layer's indexer loaded
    /// (anything goes under dense attention, which ignores the schedule).
    pub fn check_schedule(&self, schedule: &IndexSchedule) -> Result<(), ModelError> {
        if schedule.len() != self.cfg.num_hidden_layers {
            return Err(ModelError::ScheduleLength { expected: self.cfg.num_hidden_layers, got: schedule.len() });
        }
        if self.dense_attention {
            return Ok(());
        }
        let loaded = self.layers_with_indexer();
        match schedule.full_layers().into_iter().find(|l| !loaded.contains(l)) {
            Some(l) => Err(ModelError::MissingIndexer {
                layer: l,
                tensor: format!("model.layers.{l}.self_attn.indexer.*"),
                available: format_layers(&loaded),
            }),
            None => Ok(()),
        }
    }

    /// Run `ids` (the next tokens of the sequence in `cache`) through the model.
    pub fn forward(
        &self,
        ids: &[u32],
        cache: &mut Cache<B>,
        opts: &ForwardOptions,
    ) -> Result<ForwardOutput, ModelError> {
        use std::sync::atomic::Ordering::Relaxed;
        if ids.len() == 1
            && matches!(opts.logits, Logits::Last | Logits::Greedy)
            && !opts.capture_topk
            && !self.stage_timing.load(Relaxed)
            && self.step_graphs.load(Relaxed)
            && !cache.step_failed
            && let Some(out) = self.forward_recorded(ids[0], cache, opts.logits == Logits::Greedy)?
        {
            return Ok(out);
        }
        let Hidden { x, mut out, state } = self.forward_hidden(ids, cache, opts.capture_topk)?;
        let b = &self.backend;
        let x = match opts.logits {
            Logits::None => {
                out.times = state.times(b)?;
                return Ok(out);
            }
            Logits::All => x,
            Logits::Last | Logits::Greedy => b.rows(&x, ids.len() - 1, 1)?,
        };
        let logits = self.logits(&x)?;
        if opts.logits == Logits::Greedy {
            out.tokens = b.argmax_rows(&logits)?;
            out.times = state.times(b)?;
            return Ok(out);
        }
        out.rows = b.dims(&logits).0;
        out.logits = b.download(&logits)?;
        out.times = state.times(b)?;
        Ok(out)
    }

    /// One decode step by replaying the step recorded over `cache` (recording it first when
    /// there is none, it was recorded for another model or numerics, or the position has
    /// outgrown its launch shapes). `None`: the backend does not record, or recording failed
    /// (logged once; the cache then decodes op by op). Same result as the op-by-op pass: the
    /// same kernels run, only their launch shapes cover up to the step's bound. `greedy`: return
    /// the argmax token instead of the logits.
    fn forward_recorded(
        &self,
        id: u32,
        cache: &mut Cache<B>,
        greedy: bool,
    ) -> Result<Option<ForwardOutput>, ModelError> {
        let b = &self.backend;
        if id as usize >= self.cfg.vocab_size {
            return Err(ModelError::TokenOutOfRange { id, index: 0, vocab: self.cfg.vocab_size });
        }
        let pos = cache.len();
        if pos + 1 > cache.capacity() {
            return Err(ModelError::ContextTooLong {
                needed: pos + 1,
                limit: cache.capacity(),
                what: "cache capacity",
            });
        }
        let key = (self.id, self.indexer_fp8);
        if cache.step.as_ref().is_none_or(|g| g.key != key || pos + 1 > g.bound) {
            cache.step = None; // its graph memory goes back before the new recording
            match self.record_step(cache, pos, key) {
                Ok(Some(g)) => {
                    cache.step = Some(g);
                    cache.step_recordings += 1;
                }
                Ok(None) => {
                    cache.step_failed = true; // the backend does not record: do not ask again
                    return Ok(None);
                }
                Err(e) => {
                    tracing::warn!("recording the decode step failed, decoding op by op: {e}");
                    cache.step_failed = true;
                    return Ok(None);
                }
            }
        }
        let g = cache.step.as_mut().expect("recorded above");
        b.update_positions(&mut g.positions, &[pos])?;
        let x = b.embedding(&self.weights.embed, &[id])?;
        b.write_block(&mut g.x, 0, 0, &x)?;
        b.graph_replay(&mut g.graph)?;
        let out = if greedy {
            ForwardOutput { tokens: b.argmax_rows(&g.logits)?, ..Default::default() }
        } else {
            ForwardOutput { logits: b.download(&g.logits)?, rows: 1, ..Default::default() }
        };
        cache.advance(1);
        Ok(Some(out))
    }

    /// Record one decode step at `pos` over `cache` (nothing runs; the cache is untouched).
    fn record_step(
        &self,
        cache: &mut Cache<B>,
        pos: usize,
        key: (u64, bool),
    ) -> Result<Option<StepGraph<B>>, ModelError> {
        let b = &self.backend;
        let bound = (pos + 1).max(STEP_BOUND_MIN).next_power_of_two().min(cache.capacity());
        let mut positions = b.positions(&[pos])?;
        positions.bound = bound;
        let x = b.zeros(1, self.cfg.hidden_size)?;
        let mut logits = b.zeros(1, self.cfg.vocab_size)?;
        if !b.graph_begin()? {
            return Ok(None);
        }
        let recorded = (|| -> Result<(), ModelError> {
            let mut h = b.copy(&x)?;
            let mut state = StepState::default();
            for l in 0..self.cfg.num_hidden_layers {
                self.layer(l, &mut h, cache, &positions, &mut state)?;
            }
            b.write_block(&mut logits, 0, 0, &self.logits(&h)?)?;
            Ok(())
        })();
        let graph = b.graph_end();
        recorded?;
        Ok(Some(StepGraph { graph: graph?, bound, positions, x, logits, key }))
    }

    /// [`Self::forward`] in chunks of at most `chunk` tokens (a long prompt's activations and the
    /// indexer's `[chunk, context]` scores stay bounded). Same result as one pass: logits of every
    /// chunk (`Logits::All`) or of the last token, top-k rows of every chunk (padded with -1 to the
    /// longest row), stage times summed.
    pub fn forward_chunked(
        &self,
        ids: &[u32],
        cache: &mut Cache<B>,
        opts: &ForwardOptions,
        chunk: usize,
    ) -> Result<ForwardOutput, ModelError> {
        let chunk = chunk.max(1);
        if ids.len() <= chunk {
            return self.forward(ids, cache, opts);
        }
        let mut total = ForwardOutput::default();
        let n_chunks = ids.len().div_ceil(chunk);
        for (i, part) in ids.chunks(chunk).enumerate() {
            let last = i + 1 == n_chunks;
            let logits = match opts.logits {
                Logits::All => Logits::All,
                Logits::Last if last => Logits::Last,
                Logits::Greedy if last => Logits::Greedy,
                _ => Logits::None,
            };
            let out = self.forward(part, cache, &ForwardOptions { logits, ..*opts })?;
            total.logits.extend_from_slice(&out.logits);
            total.tokens.extend_from_slice(&out.tokens);
            total.rows += out.rows;
            total.times.add(&out.times);
            if opts.capture_topk {
                if total.topk.is_empty() {
                    total.topk = out.topk;
                } else {
                    for ((_, acc), (_, t)) in total.topk.iter_mut().zip(out.topk) {
                        acc.append_rows(&t);
                    }
                }
            }
        }
        Ok(total)
    }

    /// Run `ids` and return the per-token NLL of `targets` (`targets[i]` is the token after
    /// `ids[i]`; `None` = not scored), computed on the device so the `[T, vocab]` logits never
    /// leave it. The cache advances as in [`Self::forward`].
    pub fn forward_nll(
        &self,
        ids: &[u32],
        targets: &[Option<u32>],
        cache: &mut Cache<B>,
    ) -> Result<Vec<Option<f64>>, ModelError> {
        if targets.len() != ids.len() {
            return Err(ModelError::Invalid(format!("{} targets for {} tokens", targets.len(), ids.len())));
        }
        let hidden = self.forward_hidden(ids, cache, false)?;
        self.nll_rows(&hidden.x, targets)
    }

    /// Run `ids` and return every layer's [`LayerTap`] (grouped-query models; the cache
    /// advances as in [`Self::forward`]). From an empty cache, the taps' keys are all the keys
    /// the pass's queries attend to.
    pub fn forward_taps(&self, ids: &[u32], cache: &mut Cache<B>) -> Result<Vec<LayerTap>, ModelError> {
        if self.cfg.arch.is_mla() {
            return Err(ModelError::Invalid("layer taps are implemented for grouped-query models only".into()));
        }
        let (mut x, positions) = self.begin(ids, cache)?;
        let mut state = StepState { taps: Some(Vec::new()), ..StepState::default() };
        for l in 0..self.cfg.num_hidden_layers {
            self.layer(l, &mut x, cache, &positions, &mut state)?;
        }
        cache.advance(ids.len());
        Ok(state.taps.unwrap_or_default())
    }

    /// Per-row NLL of `targets` from final hidden states `x` (`None` rows are skipped).
    pub fn nll_rows(&self, x: &B::Tensor, targets: &[Option<u32>]) -> Result<Vec<Option<f64>>, ModelError> {
        let b = &self.backend;
        let rows: Vec<usize> = (0..targets.len()).filter(|&i| targets[i].is_some()).collect();
        let mut out = vec![None; targets.len()];
        if rows.is_empty() {
            return Ok(out);
        }
        // Scored rows are a suffix in every tool (score_from..); take the contiguous span.
        let (first, last) = (rows[0], *rows.last().expect("non-empty"));
        let span = b.rows(x, first, last - first + 1)?;
        let logits = self.logits(&span)?;
        let want: Vec<u32> = (first..=last).map(|i| targets[i].unwrap_or(0)).collect();
        let nll = b.nll(&logits, &want)?;
        for (i, v) in (first..=last).zip(nll) {
            if targets[i].is_some() {
                out[i] = Some(v);
            }
        }
        Ok(out)
    }

    /// The layers of a forward pass without the LM head.
    fn forward_hidden(&self, ids: &[u32], cache: &mut Cache<B>, capture_topk: bool) -> Result<Hidden<B>, ModelError> {
        let (mut x, positions) = self.begin(ids, cache)?;
        let mut out = ForwardOutput::default();
        let mut state = StepState::default();
        for l in 0..self.cfg.num_hidden_layers {
            self.layer(l, &mut x, cache, &positions, &mut state)?;
            if capture_topk
                && cache.schedule.is_full(l)
                && let Some(t) = &state.shared
            {
                out.topk.push((l, self.backend.selection_to_host(t)?));
            }
        }
        cache.advance(ids.len());
        Ok(Hidden { x, out, state })
    }

    /// Validate `ids` against the vocabulary and the cache, embed them, and return their
    /// absolute positions. Building block for tools that drive layers one by one.
    #[allow(clippy::type_complexity)]
    pub fn begin(&self, ids: &[u32], cache: &Cache<B>) -> Result<(B::Tensor, Positions<B::PosData>), ModelError> {
        if ids.is_empty() {
            return Err(ModelError::EmptyInput);
        }
        if let Some((index, &id)) = ids.iter().enumerate().find(|(_, id)| **id as usize >= self.cfg.vocab_size) {
            return Err(ModelError::TokenOutOfRange { id, index, vocab: self.cfg.vocab_size });
        }
        let needed = cache.len() + ids.len();
        if needed > cache.capacity() {
            return Err(ModelError::ContextTooLong { needed, limit: cache.capacity(), what: "cache capacity" });
        }
        let x = self.backend.embedding(&self.weights.embed, ids)?;
        let pos: Vec<usize> = (cache.len()..needed).collect();
        Ok((x, self.backend.positions(&pos)?))
    }

    /// One decoder layer, in place on `x`. `state.shared` carries the latest Full layer's
    /// top-k. The caller advances the cache after the last layer (see [`Self::forward`]).
    pub fn layer(
        &self,
        l: usize,
        x: &mut B::Tensor,
        cache: &mut Cache<B>,
        positions: &Positions<B::PosData>,
        state: &mut StepState<B>,
    ) -> Result<(), ModelError> {
        let b = &self.backend;
        let lw = &self.weights.layers[l];
        let eps = self.cfg.rms_norm_eps;
        let start = self.mark()?;
        let h = b.rms_norm(x, &lw.input_norm, eps)?;
        let (attn, indexer) = self.attention(l, &h, cache, positions, &mut state.shared, state.taps.as_mut())?;
        // The post-attention residual add and norm: part of the FFN stage's time (a MoE block
        // may run them inside its routing kernel).
        let attention_end = self.mark()?;
        match &lw.ffn {
            FfnWeights::Dense(m) => {
                let h = b.add_rms_norm(x, &attn, &lw.post_attn_norm, eps)?;
                b.add_inplace(x, &b.mlp(&h, m)?)?
            }
            FfnWeights::Moe(m) => b.add_rms_norm_moe(x, &attn, &lw.post_attn_norm, eps, m)?,
        }
        if let (Some(start), Some(attention_end), Some(ffn_end)) = (start, attention_end, self.mark()?) {
            state.marks.push(LayerMarks { start, indexer, attention_end, ffn_end });
        }
        Ok(())
    }

    /// Final norm + LM head: `[T, hidden]` → `[T, vocab]`.
    pub fn logits(&self, x: &B::Tensor) -> Result<B::Tensor, ModelError> {
        let b = &self.backend;
        let h = b.rms_norm(x, &self.weights.norm, self.cfg.rms_norm_eps)?;
        Ok(b.matmul_t(&h, self.weights.lm_head.as_ref().unwrap_or(&self.weights.embed))?)
    }

    #[allow(clippy::type_complexity)]
    fn attention(
        &self,
        l: usize,
        h: &B::Tensor,
        cache: &mut Cache<B>,
        positions: &Positions<B::PosData>,
        shared: &mut Option<Arc<B::Selection>>,
        taps: Option<&mut Vec<LayerTap>>,
    ) -> Result<(B::Tensor, Option<(B::Mark, B::Mark)>), ModelError> {
        let b = &self.backend;
        let c = &self.cfg;
        let lw = &self.weights.layers[l];
        let p = c.qk_rope_head_dim;
        let Cache { schedule, layers, rope, .. } = cache;
        let lc: &mut LayerCache<B> = &mut layers[l];

        // Queries and this step's keys/values (into the cache); `q_in` feeds the indexer's
        // query projection: the MLA q latent, or the normalised hidden state of a dense model.
        enum Q<T> {
            Mla { q_lat: T, q_pe: T, qr: T },
            Gqa { q: T },
        }
        let q = match (&lw.attn, &mut lc.kv) {
            (AttentionWeights::Mla(w), LayerKv::Latent(latent)) => {
                let (heads, nope, r) = (c.num_attention_heads, c.qk_nope_head_dim, c.kv_lora_rank);
                // Latent qr (shared with the indexer), then per head [nope | rope].
                // q_a and kv_a read the same input: one launch where the backend can.
                let (q_a, kv) = b.matmul_t2(h, &w.q_a, &w.kv_a)?; // [T, q_lora], [T, R+P]
                // qr = rms_norm(q_a) [T, q_lora]; the latent row [rms_norm(c_kv) | rope(k_pe)]
                // goes straight into the cache (both norms in one step).
                let il = RopeLayout::Interleaved;
                let (eps, norms) = (LATENT_NORM_EPS, (&w.q_a_norm, &w.kv_a_norm));
                let qr = b.mla_norms(&q_a, norms.0, &kv, r, norms.1, eps, il, positions, rope, latent)?;
                let q = b.matmul_t(&qr, &w.q_b)?; // [T, H*(nope+P)]
                // q_nope [T, H*nope], q_pe [T, H*P] (RoPE'd)
                let (q_nope, q_pe) = b.split_heads_rope(&q, heads, nope, p, il, positions, rope)?;
                let q_lat = b.matmul_heads(&q_nope, &w.w_uk)?; // [T, H*R] absorbed
                Q::Mla { q_lat, q_pe, qr }
            }
            (AttentionWeights::Gqa(w), LayerKv::Gqa { k: kc, v: vc }) => {
                let d = c.head_dim;
                let mut q = b.matmul_t(h, &w.q)?; // [T, H*D]
                b.rope_inplace(&mut q, d, d, self.gqa_layout, positions, rope)?;
                let mut k = b.matmul_t(h, &w.k)?; // [T, Hkv*D]
                b.rope_inplace(&mut k, d, d, self.gqa_layout, positions, rope)?;
                b.write_rows(kc, positions, 0, &k)?;
                b.write_rows(vc, positions, 0, &b.matmul_t(h, &w.v)?)?;
                if let Some(taps) = taps {
                    taps.push(LayerTap { h: b.download(h)?, q: b.download(&q)?, k: b.download(&k)? });
                }
                Q::Gqa { q }
            }
            _ => return Err(ModelError::Invalid(format!("layer {l}: the cache does not match the attention kind"))),
        };

        // IndexCache: a Full layer runs its indexer and publishes the top-k; a Shared layer
        // reuses it. Dense attention runs no indexer.
        let mut indexer_marks = None;
        if !self.dense_attention && schedule.layer(l) == LayerIndexer::Full {
            let (Some(ix), Some(keys)) = (&lw.indexer, lc.index_keys.as_mut()) else {
                return Err(ModelError::Invalid(format!("layer {l} is Full but has no indexer loaded")));
            };
            let m0 = self.mark()?;
            let (hi, d) = (c.index_n_heads, c.index_head_dim);
            let q_in = match &q {
                Q::Mla { qr, .. } => qr,
                Q::Gqa { .. } => h,
            };
            let mut qi = b.matmul_t(q_in, &ix.wq_b)?; // [T, HI*D]
            b.rope_inplace(&mut qi, d, p, self.indexer_layout, positions, rope)?;
            let mut ki = b.layer_norm(&b.matmul_t(h, &ix.wk)?, &ix.k_norm_w, &ix.k_norm_b, INDEXER_NORM_EPS)?;
            b.rope_inplace(&mut ki, d, p, self.indexer_layout, positions, rope)?;
            if self.indexer_fp8 {
                b.indexer_fp8_quant_inplace(&mut qi, d)?;
                b.indexer_fp8_quant_inplace(&mut ki, d)?;
            }
            b.write_rows(keys, positions, 0, &ki)?;
            let mut head_w = b.matmul_t(h, &ix.weights_proj)?; // [T, HI]
            b.scale_inplace(&mut head_w, (hi as f32).powf(-0.5))?;
            let sel = b.indexer_topk(&qi, &head_w, keys, positions, c.index_topk, (d as f32).powf(-0.5))?;
            *shared = Some(Arc::new(sel));
            indexer_marks = m0.zip(self.mark()?);
        }
        let sel =
            match self.dense_attention {
                true => None,
                false => Some(shared.as_ref().ok_or_else(|| {
                    ModelError::Invalid(format!("layer {l} is Shared but no Full layer precedes it"))
                })?),
            };

        let out = match (q, &lw.attn, &lc.kv) {
            (Q::Mla { q_lat, q_pe, .. }, AttentionWeights::Mla(w), LayerKv::Latent(latent)) => {
                let sel = sel.ok_or_else(|| ModelError::Invalid("MLA attention needs a selection".into()))?;
                // softmax over the selection in the latent space [T, H*R], then W_UV → [T, H*v]
                let o = b.sparse_mla_uv(&q_lat, &q_pe, latent, sel, c.softmax_scale, &w.w_uv)?;
                b.matmul_t(&o, &w.o)?
            }
            (Q::Gqa { q }, AttentionWeights::Gqa(w), LayerKv::Gqa { k, v }) => {
                let (heads, kv_heads) = (c.num_attention_heads, c.num_key_value_heads);
                let o = b.gqa_attention(&q, k, v, heads, kv_heads, positions, sel.map(|s| &**s), c.softmax_scale)?;
                b.matmul_t(&o, &w.o)?
            }
            _ => return Err(ModelError::Invalid(format!("layer {l}: the cache does not match the attention kind"))),
        };
        Ok((out, indexer_marks))
    }
}

/// Every Full layer of `schedule` needs its indexer weights (`wk` is the probe); `has` says
/// whether the checkpoint holds a tensor.
pub fn check_indexers(
    cfg: &ModelConfig,
    schedule: &IndexSchedule,
    has: impl Fn(&str) -> bool,
) -> Result<(), ModelError> {
    let name = crate::weights::indexer_probe;
    for l in schedule.full_layers() {
        if !has(&name(l)) {
            let available: Vec<usize> = (0..cfg.num_hidden_layers).filter(|&l| has(&name(l))).collect();
            return Err(ModelError::MissingIndexer { layer: l, tensor: name(l), available: format_layers(&available) });
        }
    }
    Ok(())
}

/// Layer numbers for messages: `[0, 4, 8]`, or `(none)`.
pub fn format_layers(ls: &[usize]) -> String {
    if ls.is_empty() {
        return "(none)".into();
    }
    let v: Vec<String> = ls.iter().map(|l| l.to_string()).collect();
    format!("[{}]", v.join(", "))
}

/// `model.layers.{N}.…` → N.
pub(crate) fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}
