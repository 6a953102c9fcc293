//! The greedy search reproduces the naive Algorithm 1 computed with transformers
//! (scripts/fixtures/search_reference.py → tests/fixtures/glm5-search/search_reference.json).

use indexcache_config::IndexSchedule;
use indexcache_model::{DsaModel, IndexerSelection, LoadOptions};
use indexcache_ops::cpu::CpuBackend;
use indexcache_tools::data::{load_token_streams, windows};
use indexcache_tools::loss::dataset_nll;
use indexcache_tools::search::{SearchOptions, Target, greedy_search, schedule_loss};
use std::path::PathBuf;

/// The CPU backend's default prefill chunk (one chunk per 48-token window).
const CHUNK: usize = 2048;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * b.abs()
}

#[test]
fn committed_flips_match_transformers_naive_algorithm_1() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/glm5-search");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("search_reference.json")).unwrap()).unwrap();
    let opts = LoadOptions { schedule: None, indexers: IndexerSelection::All };
    let (model, _) = DsaModel::load(&dir, CpuBackend::new(), &opts, &mut |_, _, _| {}).unwrap();
    let streams = load_token_streams(&[dir.join("calibration.safetensors")], None).unwrap();
    let w = windows(&streams, 48, 48, None);
    assert_eq!(w.len(), 2);
    let n = model.config().num_hidden_layers;

    let run = |budget: Option<u64>| {
        let opts = SearchOptions { memo_budget_bytes: budget, ..SearchOptions::new(Target::Flips(n - 1)) };
        greedy_search(&model, &w, &opts, "fixture".into(), None, &mut |_| Ok(()), &mut |_| {}).unwrap()
    };
    let st = run(None);
    // Without memos (plain committed-prefix reuse): the same flips and losses, bit for bit.
    let no_memo = run(Some(0));
    assert_eq!(no_memo.steps, st.steps);
    assert_eq!(no_memo.all_full_loss.to_bits(), st.all_full_loss.to_bits());
    assert!(no_memo.layer_evals > st.layer_evals);
    assert!(no_memo.layer_evals < no_memo.naive_layer_evals);

    assert!(close(st.all_full_loss, reference["all_full_loss"].as_f64().unwrap()));
    let ref_steps = reference["steps"].as_array().unwrap();
    assert_eq!(st.steps.len(), ref_steps.len());
    for (ours, theirs) in st.steps.iter().zip(ref_steps) {
        assert_eq!(ours.flipped as u64, theirs["flipped"].as_u64().unwrap(), "step {}", ours.step);
        assert_eq!(ours.pattern, theirs["pattern"].as_str().unwrap());
        assert!(close(ours.loss, theirs["loss"].as_f64().unwrap()), "step {} loss", ours.step);
        let cands = theirs["candidates"].as_object().unwrap();
        assert_eq!(ours.candidates.len(), cands.len());
        for (layer, loss) in &ours.candidates {
            let want = cands[&layer.to_string()].as_f64().unwrap();
            assert!(close(*loss, want), "step {} candidate {layer}: {loss} vs {want}", ours.step);
        }
    }
    for key in ["uniform_1_4", "uniform_1_2"] {
        let p = reference[key]["pattern"].as_str().unwrap();
        let schedule = IndexSchedule::from_pattern(p, n).unwrap();
        let loss = schedule_loss(&model, &schedule, &w, CHUNK).unwrap();
        assert!(close(loss, reference[key]["loss"].as_f64().unwrap()), "{key}");
        // The search's NLL (final hidden states of a layer-by-layer run) and ppl's (a chunked
        // forward pass) are the same numbers.
        let ppl = dataset_nll(&model, &schedule, &w, CHUNK, &mut |_| {}).unwrap();
        assert_eq!(ppl.tokens, 2 * 47);
        assert!((ppl.mean() - loss).abs() <= 1e-12 * loss, "{key}: ppl {} vs search {loss}", ppl.mean());
    }
    // Prefix reuse with memos: ≤ 0.5× the naive layer evaluations over the full sweep.
    let ratio = st.layer_evals as f64 / st.naive_layer_evals as f64;
    eprintln!(
        "layer evals {} (without memos {}) vs naive {} ({ratio:.3})",
        st.layer_evals, no_memo.layer_evals, st.naive_layer_evals
    );
    assert!(ratio <= 0.5, "{} / {} = {ratio:.3}", st.layer_evals, st.naive_layer_evals);
}
