//! The per-token NLL reduced on the device (`Backend::nll`, what `ppl` and `search` use) equals a
//! float64 log-softmax computed on the host from downloaded logits, and transformers' logits.

use indexcache_model::{DsaModel, ForwardOptions, IndexerSelection, LoadOptions, Logits};
use indexcache_ops::cpu::CpuBackend;
use indexcache_tools::data::{Window, load_token_streams, windows};
use indexcache_tools::loss::{Nll, window_nll};
use indexcache_weights::{DType, WeightStore};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

/// NLL of `ids[score_from..]` from `[ids.len(), vocab]` logits (row `j` predicts `ids[j + 1]`), with
/// a float64 log-sum-exp: the host-side definition the device path must reproduce.
fn host_nll(logits: &[f32], vocab: usize, w: &Window) -> Nll {
    let mut nll = Nll::default();
    for j in w.score_from.max(1)..w.ids.len() {
        let row = &logits[(j - 1) * vocab..j * vocab];
        let m = row.iter().map(|&l| l as f64).fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = row.iter().map(|&l| (l as f64 - m).exp()).sum();
        nll.sum += m + z.ln() - row[w.ids[j] as usize] as f64;
        nll.tokens += 1;
    }
    nll
}

#[test]
fn uniform_logits_give_log_vocab() {
    let w = Window { ids: vec![1, 2, 3, 4], score_from: 1 };
    let n = host_nll(&[0.5f32; 4 * 8], 8, &w);
    assert_eq!(n.tokens, 3);
    assert!((n.mean() - 8f64.ln()).abs() < 1e-12);
}

#[test]
fn device_nll_equals_host_log_softmax_of_downloaded_logits() {
    for name in ["ds32-yarn", "glm5-pattern"] {
        let dir = fixture(name);
        let opts = LoadOptions { schedule: None, indexers: IndexerSelection::Full };
        let (model, _) = DsaModel::load(&dir, CpuBackend::new(), &opts, &mut |_, _, _| {}).unwrap();
        let vocab = model.config().vocab_size;
        let streams = load_token_streams(&[dir.join("reference.safetensors")], None).unwrap();
        let t = streams[0].len();
        for score_from in [1, t / 3] {
            let w = Window { ids: streams[0].clone(), score_from };
            // Host path: download all [T, vocab] logits.
            let mut cache = model.new_cache(t).unwrap();
            let out = model.forward(&w.ids, &mut cache, &ForwardOptions { logits: Logits::All, capture_topk: false });
            let host = host_nll(&out.unwrap().logits, vocab, &w);
            assert_eq!(host.tokens, t - score_from.max(1));
            // Device path, one pass: the same logits, reduced on the device.
            let device = window_nll(&model, model.schedule(), &w, t).unwrap();
            assert_eq!(device.tokens, host.tokens);
            assert!(
                (device.sum - host.sum).abs() <= 1e-9 * host.sum.abs(),
                "{name} from {score_from}: device {} vs host {}",
                device.sum,
                host.sum
            );
            // Chunked prefill: logits of fewer rows at a time, rounding differently.
            for chunk in [1, 7, t / 2] {
                let c = window_nll(&model, model.schedule(), &w, chunk).unwrap();
                assert_eq!(c.tokens, host.tokens);
                assert!((c.mean() - host.mean()).abs() <= 1e-5 * host.mean(), "{name} chunk {chunk}");
            }
        }
        // And transformers' logits for the same prompt (positions 0..T, the checkpoint's schedule).
        let store = WeightStore::open_files(&[dir.join("reference.safetensors")]).unwrap();
        let (dtype, shape, bytes) = store.raw("logits").unwrap();
        assert_eq!((dtype, shape), (DType::F32, &[t, vocab][..]));
        let hf: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        let w = &windows(&streams, t, t, None)[0];
        let reference = host_nll(&hf, vocab, w);
        let ours = window_nll(&model, model.schedule(), w, 2048).unwrap();
        assert!(
            (ours.mean() - reference.mean()).abs() <= 1e-4 * reference.mean(),
            "{name}: {} vs transformers {}",
            ours.mean(),
            reference.mean()
        );
    }
}
