//! Parity with HF transformers on the reference fixtures (tests/fixtures, made by
//! scripts/fixtures/make_fixtures.py), and the cache/IndexCache invariants.

use indexcache_config::{IndexSchedule, LayerIndexer, ScheduleOverride};
use indexcache_model::{DsaModel, ForwardOptions, IndexerSelection, LoadOptions, Logits, StepState};
use indexcache_ops::cpu::CpuBackend;
use indexcache_weights::{DType, WeightStore};
use std::collections::BTreeSet;
use std::path::PathBuf;

const FIXTURES: [&str; 4] = ["ds32-yarn", "glm5-pattern", "glm5-fp8", "glm5-bf16"];

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

struct Reference {
    store: WeightStore,
    ids: Vec<u32>,
}

impl Reference {
    fn open(name: &str) -> Self {
        let store = WeightStore::open_files(&[fixture_dir(name).join("reference.safetensors")]).expect("reference");
        let (dtype, shape, bytes) = store.raw("input_ids").expect("input_ids");
        assert_eq!(dtype, DType::I64);
        let ids = bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect::<Vec<_>>();
        assert_eq!(ids.len(), shape[0]);
        Self { store, ids }
    }
    fn f32(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let shape = self.store.info(name).unwrap_or_else(|| panic!("{name} missing")).shape.clone();
        (self.store.load_f32(name, &shape).expect(name), shape)
    }
    fn topk(&self, layer: usize) -> Option<(Vec<i32>, usize)> {
        let name = format!("topk.layer{layer}");
        let (dtype, shape, bytes) = self.store.raw(&name).ok()?;
        assert_eq!(dtype, DType::I32);
        Some((bytes.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect(), shape[1]))
    }
}

fn load(name: &str, schedule: Option<ScheduleOverride>, indexers: IndexerSelection) -> DsaModel<CpuBackend> {
    let opts = LoadOptions { schedule, indexers };
    DsaModel::load(&fixture_dir(name), CpuBackend::new(), &opts, &mut |_, _, _| {}).expect("load").0
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn row_set(row: &[i32]) -> BTreeSet<i32> {
    row.iter().copied().filter(|&i| i >= 0).collect()
}

#[test]
fn logits_and_topk_match_transformers() {
    for name in FIXTURES {
        let r = Reference::open(name);
        let model = load(name, None, IndexerSelection::Full);
        let t = r.ids.len();
        let mut cache = model.new_cache(t).unwrap();
        let out =
            model.forward(&r.ids, &mut cache, &ForwardOptions { logits: Logits::All, capture_topk: true }).unwrap();
        let (want, shape) = r.f32("logits");
        assert_eq!(shape, vec![t, model.config().vocab_size]);
        let err = rel_err(&out.logits, &want);
        assert!(err <= 1e-4, "{name}: logits relative error {err:.3e} > 1e-4");

        let (mut rows, mut same) = (0usize, 0usize);
        for (layer, topk) in &out.topk {
            let (want, k) = r.topk(*layer).unwrap_or_else(|| panic!("{name}: reference has no topk.layer{layer}"));
            assert_eq!(topk.k, k, "{name} layer {layer}: row length");
            for row in 0..t {
                rows += 1;
                if row_set(topk.row(row)) == row_set(&want[row * k..(row + 1) * k]) {
                    same += 1;
                }
            }
        }
        // Every Full layer of the schedule is compared.
        assert_eq!(out.topk.len(), model.schedule().num_full(), "{name}");
        let frac = same as f64 / rows as f64;
        assert!(frac >= 0.999, "{name}: top-k sets identical on {same}/{rows} rows");
        eprintln!("{name}: logits rel err {err:.2e}, top-k identical on {same}/{rows} rows");
    }
}

/// Prefill + one-token decode, and chunked prefill, reproduce the single full pass.
#[test]
fn decode_and_chunked_prefill_match_full_pass() {
    for name in FIXTURES {
        let r = Reference::open(name);
        let model = load(name, None, IndexerSelection::Full);
        let t = r.ids.len();
        let vocab = model.config().vocab_size;
        let mut cache = model.new_cache(t).unwrap();
        let full =
            model.forward(&r.ids, &mut cache, &ForwardOptions { logits: Logits::All, capture_topk: false }).unwrap();

        // Prefill T-8, then 8 single-token steps.
        let n = 8;
        cache.clear();
        model
            .forward(&r.ids[..t - n], &mut cache, &ForwardOptions { logits: Logits::None, capture_topk: false })
            .unwrap();
        for (i, &id) in r.ids[t - n..].iter().enumerate() {
            let step = model.forward(&[id], &mut cache, &ForwardOptions::default()).unwrap();
            let row = t - n + i;
            let err = rel_err(&step.logits, &full.logits[row * vocab..(row + 1) * vocab]);
            assert!(err <= 1e-5, "{name}: decode step {i} rel err {err:.3e}");
        }

        // Chunks of 7 (several chunks, the last one partial).
        cache.clear();
        let mut got = Vec::new();
        for chunk in r.ids.chunks(7) {
            let out =
                model.forward(chunk, &mut cache, &ForwardOptions { logits: Logits::All, capture_topk: false }).unwrap();
            got.extend_from_slice(&out.logits);
        }
        assert_eq!(cache.len(), t);
        let err = rel_err(&got, &full.logits);
        assert!(err <= 1e-5, "{name}: chunked prefill rel err {err:.3e}");
    }
}

/// `--index-cache off` is plain DSA: on an all-Full checkpoint it is bit-identical to the
/// checkpoint's own schedule, and it equals an explicit all-F pattern bit for bit.
#[test]
fn index_cache_off_is_plain_dsa_bit_for_bit() {
    let r = Reference::open("ds32-yarn");
    let opts = ForwardOptions { logits: Logits::All, capture_topk: true };
    let run = |m: &DsaModel<CpuBackend>| {
        let mut cache = m.new_cache(r.ids.len()).unwrap();
        m.forward(&r.ids, &mut cache, &opts).unwrap()
    };
    let plain = run(&load("ds32-yarn", None, IndexerSelection::Full));
    let off = run(&load("ds32-yarn", Some(ScheduleOverride::Off), IndexerSelection::Full));
    assert_eq!(plain.logits, off.logits);
    assert_eq!(plain.topk, off.topk);

    let explicit = run(&load("ds32-yarn", Some(ScheduleOverride::Pattern("FFFF".into())), IndexerSelection::Full));
    assert_eq!(explicit.logits, off.logits);

    // A GLM-5.2-style checkpoint has no indexers on its Shared layers: `off` cannot run it, and
    // says which layer and what exists.
    let opts = LoadOptions { schedule: Some(ScheduleOverride::Off), indexers: IndexerSelection::Full };
    let err = DsaModel::load(&fixture_dir("glm5-pattern"), CpuBackend::new(), &opts, &mut |_, _, _| {})
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("layer 1 is Full"), "{err}");
    assert!(err.contains("model.layers.1.self_attn.indexer.wk.weight"), "{err}");
    assert!(err.contains("[0, 3, 5]"), "{err}");
}

/// A Shared layer attends over exactly the indices of its source layer, and runs no indexer.
#[test]
fn shared_layer_uses_its_source_layer_indices() {
    let r = Reference::open("glm5-pattern");
    let model = load("glm5-pattern", None, IndexerSelection::Full);
    let schedule = model.schedule().clone();
    assert_eq!(schedule.to_pattern(), "FSSFSF");
    let mut cache = model.new_cache(r.ids.len()).unwrap();
    let (mut x, positions) = model.begin(&r.ids, &cache).unwrap();
    let mut state = StepState::default();
    let mut published = Vec::new();
    for l in 0..schedule.len() {
        model.layer(l, &mut x, &mut cache, &positions, &mut state).unwrap();
        published.push(state.shared.clone().unwrap());
    }
    for l in 0..schedule.len() {
        if let LayerIndexer::Shared { source } = schedule.layer(l) {
            assert_eq!(published[l], published[source], "layer {l} must reuse layer {source}'s top-k");
        }
    }
    // Shared layers hold no indexer weights and no indexer-key cache.
    assert_eq!(model.layers_with_indexer(), vec![0, 3, 5]);
}

/// When every row sees at most `index_topk` tokens, DSA is dense causal attention: the top-k of
/// every row is all of its visible positions, and the schedule cannot change the result.
#[test]
fn short_context_is_dense_causal_attention() {
    let r = Reference::open("ds32-yarn"); // index_topk 16, indexers on every layer
    let ids = &r.ids[..16];
    let all = load("ds32-yarn", Some(ScheduleOverride::Off), IndexerSelection::All);
    let opts = ForwardOptions { logits: Logits::All, capture_topk: true };
    let mut cache = all.new_cache(ids.len()).unwrap();
    let dense = all.forward(ids, &mut cache, &opts).unwrap();
    for (_, topk) in &dense.topk {
        for row in 0..ids.len() {
            assert_eq!(row_set(topk.row(row)), (0..=row as i32).collect::<BTreeSet<_>>());
        }
    }
    let mut cache = all.new_cache_with(IndexSchedule::from_pattern("FSSS", 4).unwrap(), ids.len()).unwrap();
    let shared = all.forward(ids, &mut cache, &opts).unwrap();
    let err = rel_err(&shared.logits, &dense.logits);
    assert!(err < 1e-6, "schedule changed a dense-regime result: {err:.3e}");
}
