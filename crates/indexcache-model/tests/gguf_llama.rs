//! SmolLM2-135M-Instruct (a llama GGUF, Q4_1 with a Q8_0 embedding) against transformers loading
//! the same file (`scripts/fixtures/smollm2_reference.py`: dequantised to f32, eager attention):
//! the logits of four prompts at 256 probe ids and the top-32 of every position, the log-sum-exp
//! of every row, and the greedy continuation. Skipped, with a message, until
//! `scripts/fetch_smollm2.sh` has fetched the GGUF.

use indexcache_model::{DsaModel, ForwardOptions, IndexerSelection, LoadOptions, Logits};
use indexcache_ops::cpu::CpuBackend;
use safetensors::SafeTensors;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn gguf() -> Option<PathBuf> {
    let p = root().join("data/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipped: {} absent (run scripts/fetch_smollm2.sh)", p.display());
        None
    }
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn i32s(st: &SafeTensors, name: &str) -> Vec<i32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    t.data().chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn load(path: &std::path::Path) -> DsaModel<CpuBackend> {
    let opts = LoadOptions { schedule: None, indexers: IndexerSelection::None };
    let (model, report) = DsaModel::load(path, CpuBackend::new(), &opts, &mut |_, _, _| {}).unwrap();
    assert!(report.unused.is_empty(), "unused GGUF tensors: {:?}", report.unused);
    model
}

#[test]
fn smollm2_logits_match_transformers() {
    let Some(path) = gguf() else { return };
    let model = load(&path);
    assert!(model.dense_attention());
    let bytes = std::fs::read(root().join("tests/fixtures/smollm2/reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let probe: Vec<usize> = i32s(&st, "probe_ids").into_iter().map(|i| i as usize).collect();
    let vocab = model.config().vocab_size;
    for p in 0..4 {
        let ids: Vec<u32> = i32s(&st, &format!("p{p}.input_ids")).into_iter().map(|i| i as u32).collect();
        let t = ids.len();
        let mut cache = model.new_cache(t).unwrap();
        let out =
            model.forward(&ids, &mut cache, &ForwardOptions { logits: Logits::All, capture_topk: false }).unwrap();
        let (want_probe, want_top_ids, want_top) = (
            f32s(&st, &format!("p{p}.probe_logits")),
            i32s(&st, &format!("p{p}.top_ids")),
            f32s(&st, &format!("p{p}.top_logits")),
        );
        let want_lse = f32s(&st, &format!("p{p}.lse"));
        let (mut num, mut den, mut worst_lse, mut top1) = (0f64, 0f64, 0f64, 0usize);
        for r in 0..t {
            let row = &out.logits[r * vocab..(r + 1) * vocab];
            for (j, &v) in probe.iter().enumerate() {
                let (a, b) = (row[v] as f64, want_probe[r * 256 + j] as f64);
                num += (a - b) * (a - b);
                den += b * b;
            }
            for j in 0..32 {
                let (a, b) = (row[want_top_ids[r * 32 + j] as usize] as f64, want_top[r * 32 + j] as f64);
                num += (a - b) * (a - b);
                den += b * b;
            }
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            worst_lse = worst_lse.max((lse - want_lse[r] as f64).abs());
            let arg = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
            top1 += (arg as i32 == want_top_ids[r * 32]) as usize;
        }
        let rel = (num / den).sqrt();
        eprintln!("prompt {p}: {t} tokens, logits rel err {rel:.3e}, |lse diff| ≤ {worst_lse:.3e}, top-1 {top1}/{t}");
        assert!(rel < 1e-4, "prompt {p}: logits rel err {rel}");
        assert!(worst_lse < 1e-3, "prompt {p}: log-sum-exp off by {worst_lse}");
        assert_eq!(top1, t, "prompt {p}: argmax differs");
    }
}

#[test]
fn smollm2_greedy_continuation_matches_transformers() {
    let Some(path) = gguf() else { return };
    let model = load(&path);
    let bytes = std::fs::read(root().join("tests/fixtures/smollm2/reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let prompt: Vec<u32> = i32s(&st, "p0.input_ids").into_iter().map(|i| i as u32).collect();
    let want: Vec<u32> = i32s(&st, "p0.greedy_ids").into_iter().map(|i| i as u32).collect();
    let mut cache = model.new_cache(prompt.len() + want.len()).unwrap();
    let mut out = model.forward(&prompt, &mut cache, &ForwardOptions::default()).unwrap();
    let mut got = Vec::new();
    for _ in 0..want.len() {
        let next = out.logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
        got.push(next);
        out = model.forward(&[next], &mut cache, &ForwardOptions::default()).unwrap();
    }
    assert_eq!(got, want);
}

/// A model directory on the GGUF with seeded random indexers on every layer (`index_topk` k,
/// schedule `pattern`).
fn dsa_dir(k: usize, pattern: &str) -> tempfile::TempDir {
    use safetensors::{Dtype, tensor::TensorView};
    let dir = tempfile::tempdir().unwrap();
    let gguf = gguf().unwrap();
    let (layers, hidden, heads, d) = (30usize, 576usize, 2usize, 64usize);
    let config = serde_json::json!({
        "base_gguf": gguf.to_str().unwrap(),
        "index_n_heads": heads,
        "index_head_dim": d,
        "index_topk": k,
        "index_topk_pattern": pattern,
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let rand = |seed: u64, n: usize, bound: f32| -> Vec<u8> {
        indexcache_ops::random::fill(seed, bound, n).iter().flat_map(|v| v.to_le_bytes()).collect()
    };
    for l in 0..layers {
        let p = format!("model.layers.{l}.self_attn.indexer");
        let a = 1.0 / (hidden as f32).sqrt();
        tensors.push((
            format!("{p}.wq_b.weight"),
            vec![heads * d, hidden],
            rand(10 * l as u64 + 1, heads * d * hidden, a),
        ));
        tensors.push((format!("{p}.wk.weight"), vec![d, hidden], rand(10 * l as u64 + 2, d * hidden, a)));
        tensors.push((
            format!("{p}.k_norm.weight"),
            vec![d],
            vec![1f32; d].iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
        tensors.push((
            format!("{p}.k_norm.bias"),
            vec![d],
            vec![0f32; d].iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
        tensors.push((
            format!("{p}.weights_proj.weight"),
            vec![heads, hidden],
            rand(10 * l as u64 + 3, heads * hidden, a),
        ));
    }
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
    std::fs::write(dir.path().join("indexers.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    dir
}

fn logits_of(model: &DsaModel<CpuBackend>, ids: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache(ids.len()).unwrap();
    model.forward(ids, &mut cache, &ForwardOptions { logits: Logits::All, capture_topk: false }).unwrap().logits
}

/// DSA on the dense model: with a top-k as large as the context every row keeps every key, so
/// sparse attention equals dense attention; with k = 16 it does not; IndexCache Shared layers run.
#[test]
fn smollm2_with_indexers_reduces_to_dense_when_k_covers_the_context() {
    let Some(path) = gguf() else { return };
    let bytes = std::fs::read(root().join("tests/fixtures/smollm2/reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids: Vec<u32> = i32s(&st, "p3.input_ids").into_iter().map(|i| i as u32).collect();
    let dense = logits_of(&load(&path), &ids);
    let all_full = "F".repeat(30);
    let opts = LoadOptions { schedule: None, indexers: IndexerSelection::Full };
    let load_dir = |k: usize, pattern: &str| {
        let dir = dsa_dir(k, pattern);
        let m = DsaModel::load(dir.path(), CpuBackend::new(), &opts, &mut |_, _, _| {}).unwrap().0;
        assert!(!m.dense_attention());
        (m, dir)
    };
    let rel = |a: &[f32], b: &[f32]| indexcache_model::conformance::rel_err(a, b);

    let (wide, _d1) = load_dir(64, &all_full);
    let e = rel(&logits_of(&wide, &ids), &dense);
    eprintln!("k 64 over {} tokens vs dense: {e:.3e}", ids.len());
    // Same keys, same order; only the GEMM's summation order differs (gathered vs in-place
    // keys), the f32 noise floor that also separates us from transformers (~2e-6).
    assert!(e < 1e-5, "k covering the context must equal dense attention: {e}");

    let (narrow, _d2) = load_dir(16, &all_full);
    let e16 = rel(&logits_of(&narrow, &ids), &dense);
    eprintln!("k 16 vs dense: {e16:.3e}");
    assert!(e16 > 1e-3, "k 16 of {} keys changed nothing: {e16}", ids.len());

    let shared = "FS".repeat(15);
    let (ic, _d3) = load_dir(16, &shared);
    let eic = rel(&logits_of(&ic, &ids), &dense);
    eprintln!("k 16, IndexCache FS… vs dense: {eic:.3e}");
    assert!(eic.is_finite() && eic != e16, "Shared layers must change the result");
}
