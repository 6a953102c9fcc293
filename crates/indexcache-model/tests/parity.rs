//! Parity with HF transformers on the reference fixtures, decode/chunked prefill and the
//! IndexCache invariants, on the CPU backend: the backend-generic suite in
//! `indexcache_model::conformance` (the CUDA backend runs the same suite), plus CPU-only checks.

use indexcache_config::ScheduleOverride;
use indexcache_model::conformance::{Check, FIXTURES, Suite, Tolerance, fixtures_dir};
use indexcache_model::{DsaModel, IndexerSelection, LoadOptions};
use indexcache_ops::cpu::CpuBackend;

fn suite() -> Suite<'static, CpuBackend> {
    Suite { make: &|| Ok(CpuBackend::new()), tol: Tolerance::CPU, fixtures: fixtures_dir(), records_steps: false }
}

fn assert_all(checks: Vec<Check>) {
    for c in &checks {
        eprintln!("{c}");
    }
    let failed: Vec<String> = checks.iter().filter(|c| !c.pass).map(|c| c.to_string()).collect();
    assert!(failed.is_empty(), "failed checks:\n{}", failed.join("\n"));
}

#[test]
fn logits_and_topk_match_transformers() {
    for name in FIXTURES {
        assert_all(suite().parity(name).unwrap());
    }
}

/// Prefill + one-token decode, and chunked prefill, reproduce the single full pass.
#[test]
fn decode_and_chunked_prefill_match_full_pass() {
    for name in FIXTURES {
        assert_all(suite().incremental(name).unwrap());
    }
}

/// Decode with stage timing off (where a GPU replays recorded steps) equals op-by-op decode,
/// also after rewinding the cache; the CPU records nothing.
#[test]
fn recorded_decode_matches_op_by_op() {
    for name in FIXTURES {
        let checks = suite().recorded_decode(name).unwrap();
        assert!(checks.iter().any(|c| c.detail.contains("0 recording(s)")));
        assert_all(checks);
    }
}

/// `--index-cache off` is plain DSA: on an all-Full checkpoint it is bit-identical to the
/// checkpoint's own schedule, and it equals an explicit all-F pattern bit for bit.
#[test]
fn index_cache_off_is_plain_dsa_bit_for_bit() {
    assert_all(suite().index_cache_off().unwrap());

    // A GLM-5.2-style checkpoint has no indexers on its Shared layers: `off` cannot run it, and
    // says which layer and what exists.
    let opts = LoadOptions { schedule: Some(ScheduleOverride::Off), indexers: IndexerSelection::Full };
    let err = DsaModel::load(&fixtures_dir().join("glm5-pattern"), CpuBackend::new(), &opts, &mut |_, _, _| {})
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
    assert_all(suite().shared_layers().unwrap());
}

/// When every row sees at most `index_topk` tokens, DSA is dense causal attention: the top-k of
/// every row is all of its visible positions, and the schedule cannot change the result.
#[test]
fn short_context_is_dense_causal_attention() {
    assert_all(suite().short_context().unwrap());
}

/// The suite can fail: a perturbed backend output is caught.
#[test]
fn suite_detects_a_wrong_result() {
    let a = vec![1.0f32, 2.0, 3.0];
    let b = vec![1.0f32, 2.0, 3.1];
    assert!(indexcache_model::conformance::rel_err(&a, &b) > 1e-4);
    assert_eq!(indexcache_model::conformance::rel_err(&a, &[f32::NAN; 3]), f64::INFINITY);
}

/// The FP8-faithful indexer is really on (it changes some selections — e4m3 keeps 3 mantissa
/// bits), stays close to the exact indexer, and refuses heads that are not a power of two.
#[test]
fn fp8_indexer_is_close_to_exact_but_not_identical() {
    use indexcache_model::{ForwardOptions, Logits};
    let mut m = suite().load("glm5-bf16", None, IndexerSelection::Full).unwrap();
    let err = m.set_fp8_indexer(true).unwrap_err().to_string();
    assert!(err.contains("power-of-two index_head_dim") && err.contains("24"), "{err}");

    let mut cfg =
        indexcache_config::ModelConfig::from_file(&fixtures_dir().join("glm5-bf16").join("config.json")).unwrap();
    cfg.index_head_dim = 64;
    let ids: Vec<u32> =
        (0..96u64).map(|i| (indexcache_ops::random::hash(3, i) % cfg.vocab_size as u64) as u32).collect();
    let opts = ForwardOptions { logits: Logits::All, capture_topk: true };
    let run = |fp8: bool| {
        let mut m = DsaModel::random(cfg.clone(), CpuBackend::new(), cfg.schedule.clone(), 7).unwrap();
        m.set_fp8_indexer(fp8).unwrap();
        let mut cache = m.new_cache(ids.len()).unwrap();
        m.forward(&ids, &mut cache, &opts).unwrap()
    };
    let (exact, fp8) = (run(false), run(true));
    let (mut n, mut same) = (0usize, 0usize);
    for ((_, a), (_, b)) in exact.topk.iter().zip(&fp8.topk) {
        for row in 0..a.rows {
            let (x, y) = (
                indexcache_model::conformance::row_set(a.row(row)),
                indexcache_model::conformance::row_set(b.row(row)),
            );
            n += x.len();
            same += x.intersection(&y).count();
        }
    }
    let frac = same as f64 / n as f64;
    eprintln!("FP8 vs exact indexer: {same}/{n} top-k entries shared ({frac:.4})");
    assert!(frac < 1.0, "the FP8 indexer changed nothing");
    assert!(frac > 0.9, "the FP8 indexer diverged: {frac}");
}

/// The bf16 suite's extra inputs exist and are read: transformers' own bf16 run of every fixture
/// (its error against its f32 run is what the bf16 mode is held to on full sequences).
#[test]
fn bf16_suite_reads_the_transformers_bf16_floor() {
    let s =
        Suite { make: &|| Ok(CpuBackend::new()), tol: Tolerance::BF16, fixtures: fixtures_dir(), records_steps: false };
    for name in FIXTURES {
        let checks = s.parity(name).unwrap();
        let full = checks.iter().find(|c| c.name.ends_with(": logits vs transformers")).unwrap();
        assert!(full.detail.contains("transformers bf16"), "{}", full.detail);
        // transformers' bf16 run is far from its f32 run on these chaotic random models.
        assert!(full.bound > 0.1, "{name}: bound {}", full.bound);
        assert!(checks.iter().any(|c| c.name.contains("dense-regime")));
        assert_all(checks);
    }
}
