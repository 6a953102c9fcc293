//! The greedy search reproduces the naive Algorithm 1 computed with transformers
//! (scripts/fixtures/search_reference.py → tests/fixtures/glm5-search/search_reference.json).

use indexcache_config::IndexSchedule;
use indexcache_model::{DsaModel, IndexerSelection, LoadOptions};
use indexcache_ops::cpu::CpuBackend;
use indexcache_tools::data::{load_token_streams, windows};
use indexcache_tools::search::{SearchOptions, Target, greedy_search, schedule_loss};
use std::path::PathBuf;

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

    let st = greedy_search(
        &model,
        &w,
        &SearchOptions { target: Target::Flips(n - 1), blocks: 1 },
        "fixture".into(),
        None,
        &mut |_| Ok(()),
        &mut |_| {},
    )
    .unwrap();

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
        let loss = schedule_loss(&model, &IndexSchedule::from_pattern(p, n).unwrap(), &w).unwrap();
        assert!(close(loss, reference[key]["loss"].as_f64().unwrap()), "{key}");
    }
    // Prefix reuse: ≤ 0.55× the naive layer evaluations over the full sweep.
    let ratio = st.layer_evals as f64 / st.naive_layer_evals as f64;
    assert!(ratio <= 0.55, "{} / {} = {ratio:.3}", st.layer_evals, st.naive_layer_evals);
    eprintln!("layer evals {} vs naive {} ({ratio:.3})", st.layer_evals, st.naive_layer_evals);
}
