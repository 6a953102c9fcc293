//! The model-level conformance suite, written once and run for every backend: parity with HF
//! transformers on the reference fixtures (`tests/fixtures`, made by
//! `scripts/fixtures/make_fixtures.py`), decode and chunked prefill against the full pass, and
//! the IndexCache schedule invariants.
//!
//! The CPU runs it in `tests/parity.rs`; the CUDA backend in
//! `crates/indexcache-cuda/tests/conformance.rs` (f32 and bf16 modes). Each check returns a
//! [`Check`] (what was measured, against which bound); a test asserts that all of them pass.

use crate::{DsaModel, ForwardOptions, IndexerSelection, LoadOptions, Logits, StepState};
use indexcache_config::{IndexSchedule, LayerIndexer, ScheduleOverride};
use indexcache_ops::Backend;
use indexcache_weights::{DType, WeightStore};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The fixtures with a transformers reference.
pub const FIXTURES: [&str; 4] = ["ds32-yarn", "glm5-pattern", "glm5-fp8", "glm5-bf16"];

/// Bounds for one backend mode.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    /// Logits relative error against transformers (f32 reference).
    pub logits: f64,
    /// Fraction of top-k rows whose sets equal the reference's.
    pub topk_rows: f64,
    /// Fraction of top-k entries shared with the reference.
    pub topk_entries: f64,
    /// Decode / chunked prefill against the same backend's full pass.
    pub incremental: f64,
    /// Two schedules in the dense regime (≤ index_topk visible) against each other.
    pub dense_regime: f64,
    /// A bf16 mode: on the full sequences (where a rounding can flip a top-k choice) the logits
    /// and top-k are held to transformers' own bf16 run (`reference-bf16.safetensors`, made by
    /// `scripts/fixtures/bf16_reference.py`), and to `logits` where no choice can flip (the
    /// first `index_topk` tokens).
    pub bf16: bool,
}

impl Tolerance {
    /// The CPU backend (f32, deterministic gemm).
    pub const CPU: Tolerance = Tolerance {
        logits: 1e-4,
        topk_rows: 0.999,
        topk_entries: 0.999,
        incremental: 1e-5,
        dense_regime: 1e-6,
        bf16: false,
    };
    /// A device in its exact f32 mode.
    pub const F32: Tolerance = Tolerance {
        logits: 1e-4,
        topk_rows: 0.999,
        topk_entries: 0.999,
        incremental: 1e-4,
        dense_regime: 1e-5,
        bf16: false,
    };
    /// A device in its bf16 mode. On these small random models one rounding that flips a top-k
    /// choice moves the logits far (transformers' own bf16 run is 0.14–0.30 from its f32 run), so
    /// decode/chunked prefill against the full pass are held to 0.1, and arithmetic precision is
    /// checked where no choice can flip (the dense regime, 2e-2).
    pub const BF16: Tolerance = Tolerance {
        logits: 2e-2,
        topk_rows: 0.0,
        topk_entries: 0.99,
        incremental: 0.1,
        dense_regime: 2e-2,
        bf16: true,
    };
}

/// One measured check.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub value: f64,
    pub bound: f64,
    /// `value ≤ bound` (errors) or `value ≥ bound` (fractions).
    pub pass: bool,
    pub detail: String,
}

impl Check {
    fn at_most(name: String, value: f64, bound: f64, detail: String) -> Self {
        Self { name, value, bound, pass: value <= bound, detail }
    }
    fn at_least(name: String, value: f64, bound: f64, detail: String) -> Self {
        Self { name, value, bound, pass: value >= bound, detail }
    }
    fn holds(name: String, pass: bool, detail: String) -> Self {
        Self { name, value: pass as u8 as f64, bound: 1.0, pass, detail }
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = if self.pass { "ok  " } else { "FAIL" };
        write!(f, "{mark} {:<48} {:>10.3e} (bound {:.1e}) {}", self.name, self.value, self.bound, self.detail)
    }
}

/// Where the fixtures are: `$INDEXCACHE_FIXTURES`, else the repository's `tests/fixtures`.
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("INDEXCACHE_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"),
    }
}

/// A fixture's transformers outputs (`reference.safetensors`).
pub struct Reference {
    store: WeightStore,
    pub ids: Vec<u32>,
}

type R<T> = Result<T, String>;

impl Reference {
    pub fn open(dir: &Path) -> R<Self> {
        let store = WeightStore::open_files(&[dir.join("reference.safetensors")]).map_err(|e| e.to_string())?;
        let (dtype, shape, bytes) = store.raw("input_ids").map_err(|e| e.to_string())?;
        if dtype != DType::I64 {
            return Err(format!("input_ids is {dtype:?}, expected I64"));
        }
        let ids: Vec<u32> =
            bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as u32).collect();
        if ids.len() != shape[0] {
            return Err("input_ids length".into());
        }
        Ok(Self { store, ids })
    }

    pub fn f32(&self, name: &str) -> R<(Vec<f32>, Vec<usize>)> {
        let shape = self.store.info(name).ok_or_else(|| format!("{name} missing"))?.shape.clone();
        Ok((self.store.load_f32(name, &shape).map_err(|e| e.to_string())?, shape))
    }

    /// Layer `layer`'s top-k `[T, k]` and `k`.
    pub fn topk(&self, layer: usize) -> Option<(Vec<i32>, usize)> {
        let (dtype, shape, bytes) = self.store.raw(&format!("topk.layer{layer}")).ok()?;
        (dtype == DType::I32).then(|| {
            (bytes.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes"))).collect(), shape[1])
        })
    }
}

pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    let e = (num / den).sqrt();
    if e.is_nan() { f64::INFINITY } else { e }
}

pub fn row_set(row: &[i32]) -> BTreeSet<i32> {
    row.iter().copied().filter(|&i| i >= 0).collect()
}

/// Runs the suite with backends from `make` (one per loaded model).
pub struct Suite<'a, B: Backend> {
    pub make: &'a dyn Fn() -> R<B>,
    pub tol: Tolerance,
    pub fixtures: PathBuf,
    /// The backend records decode steps (CUDA graphs): [`Suite::recorded_decode`] then also
    /// checks that steps were recorded, not silently run op by op.
    pub records_steps: bool,
}

impl<B: Backend> Suite<'_, B> {
    pub fn load(&self, name: &str, schedule: Option<ScheduleOverride>, indexers: IndexerSelection) -> R<DsaModel<B>> {
        let opts = LoadOptions { schedule, indexers };
        let b = (self.make)()?;
        DsaModel::load(&self.fixtures.join(name), b, &opts, &mut |_, _, _| {})
            .map(|m| m.0)
            .map_err(|e| format!("{name}: {e}"))
    }

    fn reference(&self, name: &str) -> R<Reference> {
        Reference::open(&self.fixtures.join(name))
    }

    /// Every check, every fixture.
    pub fn run_all(&self) -> R<Vec<Check>> {
        let mut out = Vec::new();
        for name in FIXTURES {
            out.extend(self.parity(name)?);
            out.extend(self.incremental(name)?);
            out.extend(self.recorded_decode(name)?);
        }
        out.extend(self.index_cache_off()?);
        out.extend(self.shared_layers()?);
        out.extend(self.short_context()?);
        if !self.tol.bf16 {
            // The bf16 FP8 path rounds the rotation to bf16 as the reference does; the CPU's is f32.
            out.extend(self.fp8_indexer()?);
        }
        Ok(out)
    }

    /// Logits and top-k sets against transformers.
    pub fn parity(&self, name: &str) -> R<Vec<Check>> {
        let r = self.reference(name)?;
        let model = self.load(name, None, IndexerSelection::Full)?;
        let t = r.ids.len();
        let mut cache = model.new_cache(t).map_err(|e| e.to_string())?;
        let out = model
            .forward(&r.ids, &mut cache, &ForwardOptions { logits: Logits::All, capture_topk: true })
            .map_err(|e| e.to_string())?;
        let (want, shape) = r.f32("logits")?;
        if shape != vec![t, model.config().vocab_size] {
            return Err(format!("{name}: reference logits shape {shape:?}"));
        }
        let err = rel_err(&out.logits, &want);
        let (mut rows, mut same, mut entries, mut shared) = (0usize, 0usize, 0usize, 0usize);
        for (layer, topk) in &out.topk {
            let (want, k) = r.topk(*layer).ok_or_else(|| format!("{name}: reference has no topk.layer{layer}"))?;
            if topk.k != k {
                return Err(format!("{name} layer {layer}: row length {} vs {k}", topk.k));
            }
            for row in 0..t {
                let (a, b) = (row_set(topk.row(row)), row_set(&want[row * k..(row + 1) * k]));
                rows += 1;
                same += (a == b) as usize;
                entries += b.len();
                shared += a.intersection(&b).count();
            }
        }
        let full = model.schedule().num_full();
        let mut checks = Vec::new();
        let (mut logits_bound, mut entries_bound, mut note) = (self.tol.logits, self.tol.topk_entries, String::new());
        if self.tol.bf16 {
            let hf = transformers_bf16(&self.fixtures.join(name), &r, &want)?;
            logits_bound = logits_bound.max(1.25 * hf.err);
            entries_bound = entries_bound.min(hf.shared);
            note = format!("transformers bf16: {:.3e}, top-k shared {:.4}", hf.err, hf.shared);
            // Where every row sees ≤ index_topk tokens no top-k choice can flip (MoE routing still
            // can): held to 2e-2, or to transformers' own bf16 run on those rows if that is worse.
            let n = model.config().index_topk.min(t);
            let mut cache = model.new_cache(n).map_err(|e| e.to_string())?;
            let dense = model
                .forward(&r.ids[..n], &mut cache, &ForwardOptions { logits: Logits::All, capture_topk: false })
                .map_err(|e| e.to_string())?;
            let v = model.config().vocab_size;
            let hf_dense = rel_err(&hf.logits[..n * v], &want[..n * v]);
            checks.push(Check::at_most(
                format!("{name}: dense-regime logits vs transformers"),
                rel_err(&dense.logits, &want[..n * v]),
                self.tol.logits.max(1.25 * hf_dense),
                format!("first {n} tokens (no top-k choice); transformers bf16: {hf_dense:.3e}"),
            ));
        }
        checks.extend(vec![
            Check::at_most(format!("{name}: logits vs transformers"), err, logits_bound, note),
            Check::holds(
                format!("{name}: every Full layer compared"),
                out.topk.len() == full,
                format!("{}/{full}", out.topk.len()),
            ),
            Check::at_least(
                format!("{name}: top-k rows identical"),
                same as f64 / rows.max(1) as f64,
                self.tol.topk_rows,
                format!("{same}/{rows} rows"),
            ),
            Check::at_least(
                format!("{name}: top-k entries shared"),
                shared as f64 / entries.max(1) as f64,
                entries_bound,
                format!("{shared}/{entries}"),
            ),
        ]);
        Ok(checks)
    }

    /// Prefill T−8 then 8 one-token steps, and chunks of 7, against one full pass.
    pub fn incremental(&self, name: &str) -> R<Vec<Check>> {
        let r = self.reference(name)?;
        let model = self.load(name, None, IndexerSelection::Full)?;
        let e = |e: crate::ModelError| e.to_string();
        let t = r.ids.len();
        let vocab = model.config().vocab_size;
        let all = ForwardOptions { logits: Logits::All, capture_topk: false };
        let mut cache = model.new_cache(t).map_err(e)?;
        let full = model.forward(&r.ids, &mut cache, &all).map_err(e)?;

        let n = 8;
        cache.clear();
        let none = ForwardOptions { logits: Logits::None, capture_topk: false };
        model.forward(&r.ids[..t - n], &mut cache, &none).map_err(e)?;
        let mut worst = 0.0f64;
        for (i, &id) in r.ids[t - n..].iter().enumerate() {
            let step = model.forward(&[id], &mut cache, &ForwardOptions::default()).map_err(e)?;
            let row = t - n + i;
            worst = worst.max(rel_err(&step.logits, &full.logits[row * vocab..(row + 1) * vocab]));
        }

        cache.clear();
        let chunked = model.forward_chunked(&r.ids, &mut cache, &all, 7).map_err(e)?;
        Ok(vec![
            Check::at_most(format!("{name}: 8 decode steps vs full pass"), worst, self.tol.incremental, String::new()),
            Check::at_most(
                format!("{name}: chunks of 7 vs full pass"),
                rel_err(&chunked.logits, &full.logits),
                self.tol.incremental,
                format!("cache len {}", cache.len()),
            ),
        ])
    }

    /// Decode steps replayed from a recording (stage timing off) against the same steps run op
    /// by op: bit-identical (the same kernels run; only launch shapes cover up to the recording's
    /// bound). Decodes the second half of the sequence (crossing a recording bound where the
    /// fixture is long enough), then truncates back and decodes it again over the same recording.
    pub fn recorded_decode(&self, name: &str) -> R<Vec<Check>> {
        let r = self.reference(name)?;
        let model = self.load(name, None, IndexerSelection::Full)?;
        let e = |e: crate::ModelError| e.to_string();
        let t = r.ids.len();
        let p0 = t / 2;
        let none = ForwardOptions { logits: Logits::None, capture_topk: false };
        let decode = |cache: &mut crate::Cache<B>| -> R<Vec<f32>> {
            let mut out = Vec::new();
            for &id in &r.ids[p0..] {
                out.extend(model.forward(&[id], cache, &ForwardOptions::default()).map_err(e)?.logits);
            }
            Ok(out)
        };
        // Stage marks on: every step runs op by op.
        model.set_stage_timing(true);
        let mut cache = model.new_cache(t).map_err(e)?;
        model.forward(&r.ids[..p0], &mut cache, &none).map_err(e)?;
        let eager = decode(&mut cache)?;

        model.set_stage_timing(false);
        let mut cache = model.new_cache(t).map_err(e)?;
        model.forward(&r.ids[..p0], &mut cache, &none).map_err(e)?;
        let first = decode(&mut cache)?;
        cache.truncate(p0);
        let again = decode(&mut cache)?;
        let recordings = cache.step_recordings();
        // The same steps asking for the greedy token only (picked by the backend): each is the
        // argmax of the logits the step returns.
        let greedy = ForwardOptions { logits: Logits::Greedy, capture_topk: false };
        let mut cache = model.new_cache(t).map_err(e)?;
        model.forward(&r.ids[..p0], &mut cache, &none).map_err(e)?;
        let mut tokens = Vec::new();
        for &id in &r.ids[p0..] {
            tokens.extend(model.forward(&[id], &mut cache, &greedy).map_err(e)?.tokens);
        }
        let vocab = model.config().vocab_size;
        let want: Vec<u32> = first.chunks(vocab).map(indexcache_ops::argmax).collect();

        let mut checks = vec![
            Check::at_most(
                format!("{name}: recorded decode vs op by op"),
                rel_err(&first, &eager),
                0.0,
                format!("{} steps from position {p0}, {recordings} recording(s)", t - p0),
            ),
            Check::at_most(
                format!("{name}: recorded decode after truncate"),
                rel_err(&again, &eager),
                0.0,
                "same recording, positions rewound".into(),
            ),
            Check::holds(
                format!("{name}: greedy steps pick the logits' argmax"),
                tokens == want,
                format!("{} tokens", tokens.len()),
            ),
        ];
        if self.records_steps {
            checks.push(Check::holds(
                format!("{name}: decode steps were recorded"),
                recordings >= 1,
                format!("{recordings} recording(s)"),
            ));
        }
        Ok(checks)
    }

    /// `--index-cache off` is plain DSA, bit for bit, and equals an explicit all-F pattern.
    pub fn index_cache_off(&self) -> R<Vec<Check>> {
        let r = self.reference("ds32-yarn")?;
        let opts = ForwardOptions { logits: Logits::All, capture_topk: true };
        let run = |m: &DsaModel<B>| -> R<crate::ForwardOutput> {
            let mut cache = m.new_cache(r.ids.len()).map_err(|e| e.to_string())?;
            m.forward(&r.ids, &mut cache, &opts).map_err(|e| e.to_string())
        };
        let plain = run(&self.load("ds32-yarn", None, IndexerSelection::Full)?)?;
        let off = run(&self.load("ds32-yarn", Some(ScheduleOverride::Off), IndexerSelection::Full)?)?;
        let explicit =
            run(&self.load("ds32-yarn", Some(ScheduleOverride::Pattern("FFFF".into())), IndexerSelection::Full)?)?;
        Ok(vec![
            Check::holds(
                "ds32-yarn: --index-cache off bit-identical".into(),
                plain.logits == off.logits && plain.topk == off.topk,
                String::new(),
            ),
            Check::holds("ds32-yarn: all-F pattern bit-identical".into(), explicit.logits == off.logits, String::new()),
        ])
    }

    /// A Shared layer attends over exactly its source layer's indices; Shared layers hold no
    /// indexer weights.
    pub fn shared_layers(&self) -> R<Vec<Check>> {
        let r = self.reference("glm5-pattern")?;
        let model = self.load("glm5-pattern", None, IndexerSelection::Full)?;
        let e = |e: crate::ModelError| e.to_string();
        let schedule = model.schedule().clone();
        let mut cache = model.new_cache(r.ids.len()).map_err(e)?;
        let (mut x, positions) = model.begin(&r.ids, &cache).map_err(e)?;
        let mut state = StepState::default();
        let mut published = Vec::new();
        for l in 0..schedule.len() {
            model.layer(l, &mut x, &mut cache, &positions, &mut state).map_err(e)?;
            let sel = state.shared.as_ref().ok_or("no selection published")?;
            published.push(model.backend().selection_to_host(sel).map_err(|e| e.to_string())?);
        }
        let mut ok = true;
        let mut detail = String::new();
        for l in 0..schedule.len() {
            if let LayerIndexer::Shared { source } = schedule.layer(l)
                && published[l] != published[source]
            {
                ok = false;
                detail += &format!("layer {l} differs from source {source}; ");
            }
        }
        Ok(vec![
            Check::holds("glm5-pattern: Shared layers reuse the source top-k".into(), ok, detail),
            Check::holds(
                "glm5-pattern: indexers only on Full layers".into(),
                model.layers_with_indexer() == vec![0, 3, 5],
                format!("{:?}", model.layers_with_indexer()),
            ),
        ])
    }

    /// The FP8-faithful indexer selects like the CPU's FP8 indexer (the same quantised q and k;
    /// only the f32 summation order differs), and like the exact indexer on most entries.
    pub fn fp8_indexer(&self) -> R<Vec<Check>> {
        // The fixtures' indexer heads are 24 wide; the FP8 blocks need a power of two: the
        // glm5-bf16 shape with 64-wide indexer heads and seeded random weights.
        let name = "glm5-bf16";
        let mut cfg = indexcache_config::ModelConfig::from_file(&self.fixtures.join(name).join("config.json"))
            .map_err(|e| e.to_string())?;
        cfg.index_head_dim = 64;
        let ids: Vec<u32> =
            (0..96u64).map(|i| (indexcache_ops::random::hash(3, i) % cfg.vocab_size as u64) as u32).collect();
        let opts = ForwardOptions { logits: Logits::All, capture_topk: true };
        let run = |b_: Result<B, String>| -> R<crate::ForwardOutput> { run_fp8(cfg.clone(), b_?, &ids, &opts) };
        let fp8 = run((self.make)())?;
        let cpu = run_fp8(cfg.clone(), indexcache_ops::cpu::CpuBackend::new(), &ids, &opts)?;
        let (mut n, mut s) = (0usize, 0usize);
        for ((_, x), (_, y)) in fp8.topk.iter().zip(&cpu.topk) {
            for row in 0..x.rows {
                let (p, q) = (row_set(x.row(row)), row_set(y.row(row)));
                n += q.len();
                s += p.intersection(&q).count();
            }
        }
        Ok(vec![
            Check::at_least(
                format!("{name}(D=64, random): FP8 indexer top-k entries shared with the CPU's"),
                s as f64 / n.max(1) as f64,
                self.tol.topk_entries,
                format!("{s}/{n}"),
            ),
            Check::at_most(
                format!("{name}(D=64, random): FP8-indexer logits vs the CPU's"),
                rel_err(&fp8.logits, &cpu.logits),
                self.tol.logits,
                String::new(),
            ),
        ])
    }

    /// With ≤ index_topk visible tokens DSA is dense causal attention and the schedule cannot
    /// change the result.
    pub fn short_context(&self) -> R<Vec<Check>> {
        let r = self.reference("ds32-yarn")?; // index_topk 16, indexers on every layer
        let ids = &r.ids[..16];
        let e = |e: crate::ModelError| e.to_string();
        let all = self.load("ds32-yarn", Some(ScheduleOverride::Off), IndexerSelection::All)?;
        let opts = ForwardOptions { logits: Logits::All, capture_topk: true };
        let mut cache = all.new_cache(ids.len()).map_err(e)?;
        let dense = all.forward(ids, &mut cache, &opts).map_err(e)?;
        let mut all_visible = true;
        for (_, topk) in &dense.topk {
            for row in 0..ids.len() {
                all_visible &= row_set(topk.row(row)) == (0..=row as i32).collect::<BTreeSet<_>>();
            }
        }
        let sched = IndexSchedule::from_pattern("FSSS", 4).map_err(|e| e.to_string())?;
        let mut cache = all.new_cache_with(sched, ids.len()).map_err(e)?;
        let shared = all.forward(ids, &mut cache, &opts).map_err(e)?;
        Ok(vec![
            Check::holds("ds32-yarn: short rows select every visible position".into(), all_visible, String::new()),
            Check::at_most(
                "ds32-yarn: schedule cannot change a dense-regime result".into(),
                rel_err(&shared.logits, &dense.logits),
                self.tol.dense_regime,
                String::new(),
            ),
        ])
    }
}

/// A seeded random model of `cfg` on `b`, FP8 indexer on, one pass over `ids`.
fn run_fp8<B: Backend>(
    cfg: indexcache_config::ModelConfig,
    b: B,
    ids: &[u32],
    opts: &ForwardOptions,
) -> R<crate::ForwardOutput> {
    let e = |e: crate::ModelError| e.to_string();
    let schedule = cfg.schedule.clone();
    let mut m = DsaModel::random(cfg, b, schedule, 7).map_err(e)?;
    m.set_fp8_indexer(true).map_err(e)?;
    let mut cache = m.new_cache(ids.len()).map_err(e)?;
    m.forward(ids, &mut cache, opts).map_err(e)
}

/// transformers' bf16 run of a fixture (`reference-bf16.safetensors`) against its f32 reference.
struct TransformersBf16 {
    logits: Vec<f32>,
    /// Logits relative error over the whole sequence.
    err: f64,
    /// Fraction of the f32 run's top-k entries its bf16 run also selects.
    shared: f64,
}

fn transformers_bf16(dir: &Path, r: &Reference, want: &[f32]) -> R<TransformersBf16> {
    let path = dir.join("reference-bf16.safetensors");
    let store = WeightStore::open_files(std::slice::from_ref(&path)).map_err(|e| format!("{}: {e}", path.display()))?;
    let shape = store.info("logits").ok_or("reference-bf16: no logits")?.shape.clone();
    let logits = store.load_f32("logits", &shape).map_err(|e| e.to_string())?;
    let (mut n, mut s) = (0usize, 0usize);
    for name in store.names() {
        let Some(layer) = name.strip_prefix("topk.layer").and_then(|l| l.parse::<usize>().ok()) else { continue };
        let (dtype, shape, bytes) = store.raw(name).map_err(|e| e.to_string())?;
        if dtype != DType::I32 {
            return Err(format!("{name}: {dtype:?}"));
        }
        let got: Vec<i32> = bytes.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        let (want_k, k) = r.topk(layer).ok_or_else(|| format!("reference has no topk.layer{layer}"))?;
        for row in 0..shape[0] {
            let a = row_set(&got[row * shape[1]..(row + 1) * shape[1]]);
            let b = row_set(&want_k[row * k..(row + 1) * k]);
            n += b.len();
            s += a.intersection(&b).count();
        }
    }
    let err = rel_err(&logits, want);
    Ok(TransformersBf16 { logits, err, shared: s as f64 / n.max(1) as f64 })
}
