//! The overlap study on the reference fixtures, and the plots it feeds.

use indexcache_config::IndexSchedule;
use indexcache_model::{DsaModel, ForwardOptions, IndexerSelection, LoadOptions, Logits};
use indexcache_ops::TopK;
use indexcache_ops::cpu::CpuBackend;
use indexcache_tools::ToolError;
use indexcache_tools::data::{Window, load_token_streams, windows};
use indexcache_tools::overlap::{OverlapReport, overlap_matrix};
use indexcache_tools::plot::{heatmap, line_plot};
use indexcache_weights::{DType, WeightStore};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn load(name: &str) -> DsaModel<CpuBackend> {
    let opts = LoadOptions { schedule: None, indexers: IndexerSelection::All };
    DsaModel::load(&fixture(name), CpuBackend::new(), &opts, &mut |_, _, _| {}).unwrap().0
}

/// The fixture's prompt (64 tokens for ds32-yarn) cut into disjoint windows of `ctx`.
fn prompt_windows(name: &str, ctx: usize) -> Vec<Window> {
    let streams = load_token_streams(&[fixture(name).join("reference.safetensors")], None).unwrap();
    windows(&streams, ctx, ctx, None)
}

fn run(model: &DsaModel<CpuBackend>, ws: &[Window]) -> Result<OverlapReport, ToolError> {
    run_chunked(model, ws, 2048)
}

fn run_chunked(model: &DsaModel<CpuBackend>, ws: &[Window], chunk: usize) -> Result<OverlapReport, ToolError> {
    let mut calls = Vec::new();
    let r = overlap_matrix(model, ws, chunk, &mut |d| calls.push(d));
    if r.is_ok() {
        assert_eq!(calls, (1..=ws.len()).collect::<Vec<_>>(), "progress after every window");
    }
    r
}

/// Rows with more than k visible tokens, counted by hand: row t of a window sees t + 1 tokens.
fn rows_past_k(ws: &[Window], k: usize) -> usize {
    ws.iter().map(|w| (0..w.ids.len()).filter(|t| t + 1 > k).count()).sum()
}

fn set(t: &TopK, row: usize) -> HashSet<i32> {
    t.row(row).iter().copied().filter(|&p| p >= 0).collect()
}

#[test]
fn matrix_is_symmetric_with_unit_diagonal_and_counts_rows_past_k() {
    let model = load("ds32-yarn");
    let k = model.config().index_topk;
    assert_eq!(k, 16);
    // 64 tokens in windows of 40: lengths 40 and 24 → 24 + 8 rows past k.
    let ws = prompt_windows("ds32-yarn", 40);
    assert_eq!(ws.iter().map(|w| w.ids.len()).collect::<Vec<_>>(), vec![40, 24]);
    let r = run(&model, &ws).unwrap();
    assert_eq!((r.layers, r.k, r.windows), (4, 16, 2));
    assert_eq!(r.rows_counted, rows_past_k(&ws, k));
    assert_eq!(r.rows_counted, 32);
    assert_eq!(r.matrix.len(), 4);
    for i in 0..4 {
        assert_eq!(r.matrix[i].len(), 4);
        assert_eq!(r.matrix[i][i], 1.0, "diagonal of layer {i}");
        for j in 0..4 {
            let v = r.matrix[i][j];
            assert!((0.0..=1.0).contains(&v), "matrix[{i}][{j}] = {v}");
            assert_eq!(v, r.matrix[j][i], "symmetry at ({i}, {j})");
        }
    }
    assert_eq!(r.adjacent, vec![r.matrix[0][1], r.matrix[1][2], r.matrix[2][3]]);
    for l in 0..4 {
        let others: f64 = (0..4).filter(|&j| j != l).map(|j| r.matrix[l][j]).sum::<f64>() / 3.0;
        assert!((r.mean_with_others[l] - others).abs() < 1e-12);
    }
    // Random indexers still agree on some positions but not on all of them.
    assert!(r.adjacent.iter().all(|&a| a > 0.0 && a < 1.0), "adjacent = {:?}", r.adjacent);
    // The report serialises.
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["rows_counted"], 32);
}

#[test]
fn entries_match_a_hand_count_over_the_captured_topk() {
    let model = load("ds32-yarn");
    let k = model.config().index_topk;
    let ws = prompt_windows("ds32-yarn", 64);
    assert_eq!(ws.len(), 1);
    let w = &ws[0];
    let r = run(&model, &ws).unwrap();
    assert_eq!(r.rows_counted, 64 - k);

    let mut cache = model.new_cache_with(IndexSchedule::all_full(4), w.ids.len()).unwrap();
    let out = model.forward(&w.ids, &mut cache, &ForwardOptions { logits: Logits::None, capture_topk: true }).unwrap();
    assert_eq!(out.topk.iter().map(|(l, _)| *l).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    let by_layer: Vec<&TopK> = out.topk.iter().map(|(_, t)| t).collect();
    let hand = |i: usize, j: usize| {
        let rows: Vec<usize> = (0..w.ids.len()).filter(|t| t + 1 > k).collect();
        let sum: f64 = rows
            .iter()
            .map(|&t| set(by_layer[i], t).intersection(&set(by_layer[j], t)).count() as f64 / k as f64)
            .sum();
        sum / rows.len() as f64
    };
    for (i, j) in [(0, 2), (1, 3), (2, 2)] {
        assert!((r.matrix[i][j] - hand(i, j)).abs() < 1e-12, "({i}, {j}): {} vs {}", r.matrix[i][j], hand(i, j));
    }

    // And against the top-k sets HF transformers dumped for the same prompt.
    let store = WeightStore::open_files(&[fixture("ds32-yarn").join("reference.safetensors")]).unwrap();
    let reference = |l: usize| {
        let (dtype, shape, bytes) = store.raw(&format!("topk.layer{l}")).unwrap();
        assert_eq!(dtype, DType::I32);
        let data = bytes.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect();
        TopK { rows: shape[0], k: shape[1], data }
    };
    let (a, b) = (reference(0), reference(1));
    let rows: Vec<usize> = (k..w.ids.len()).collect();
    let hf: f64 = rows.iter().map(|&t| set(&a, t).intersection(&set(&b, t)).count() as f64 / k as f64).sum::<f64>()
        / rows.len() as f64;
    assert!((r.matrix[0][1] - hf).abs() < 1e-12, "layers 0/1: {} vs HF {hf}", r.matrix[0][1]);
}

#[test]
fn chunked_prefill_captures_the_same_topk() {
    let model = load("ds32-yarn");
    // 64 tokens in windows of 56: lengths 56 and 8; the short window (8 ≤ k = 16) has 8-wide
    // top-k rows and no counted row.
    let ws = prompt_windows("ds32-yarn", 56);
    assert_eq!(ws.iter().map(|w| w.ids.len()).collect::<Vec<_>>(), vec![56, 8]);
    let whole = run(&model, &ws).unwrap();
    assert_eq!(whole.rows_counted, 56 - 16);
    for chunk in [1, 7, 16, 50] {
        let r = run_chunked(&model, &ws, chunk).unwrap();
        assert_eq!(r, whole, "chunk {chunk}");
    }
}

#[test]
fn checkpoint_without_every_indexer_is_a_clear_error() {
    let model = load("glm5-pattern");
    assert_eq!(model.layers_with_indexer(), vec![0, 3, 5]);
    let ws = prompt_windows("glm5-pattern", 56);
    let e = run(&model, &ws).unwrap_err().to_string();
    assert!(e.contains("layers [1, 2, 4]"), "{e}");
    assert!(e.contains("[0, 3, 5]"), "{e}");
}

#[test]
fn windows_no_longer_than_k_are_a_clear_error() {
    let model = load("ds32-yarn");
    let ws = prompt_windows("ds32-yarn", 16);
    assert_eq!(ws.len(), 4);
    let e = run(&model, &ws).unwrap_err().to_string();
    assert!(e.contains("--ctx") && e.contains("index_topk = 16"), "{e}");
    let e = run(&model, &[]).unwrap_err().to_string();
    assert!(e.contains("no windows"), "{e}");
}

fn assert_plots(stem: &Path) {
    let png = std::fs::read(stem.with_extension("png")).unwrap();
    assert!(png.len() > 1000, "PNG of {} bytes", png.len());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let svg = std::fs::read_to_string(stem.with_extension("svg")).unwrap();
    assert!(svg.contains("<svg"), "{svg}");
}

#[test]
fn plots_are_written() {
    let model = load("ds32-yarn");
    let r = run(&model, &prompt_windows("ds32-yarn", 64)).unwrap();
    let dir = tempfile::tempdir().unwrap();

    let stem = dir.path().join("plots/overlap");
    heatmap(&r.matrix, "top-k overlap |T_i ∩ T_j| / k", &stem).unwrap();
    assert_plots(&stem);
    let svg = std::fs::read_to_string(stem.with_extension("svg")).unwrap();
    assert!(svg.contains("layer"), "axis labels are text in the SVG");

    let adjacent: Vec<(f64, f64)> = r.adjacent.iter().enumerate().map(|(l, &v)| (l as f64, v)).collect();
    let stem = dir.path().join("adjacent");
    line_plot(&[("l vs l+1".to_string(), adjacent)], "adjacent-layer overlap", "layer l", "overlap", &stem).unwrap();
    assert_plots(&stem);

    // Several series, one without a name, a constant one, and non-finite points skipped.
    let stem = dir.path().join("loss");
    let series = vec![
        ("greedy".to_string(), vec![(0.0, 2.5), (1.0, 2.51), (2.0, f64::NAN), (3.0, 2.6)]),
        (String::new(), vec![(0.0, 2.55), (3.0, 2.55)]),
    ];
    line_plot(&series, "search loss", "flips", "mean NLL", &stem).unwrap();
    assert_plots(&stem);

    // A large matrix (no cell annotations, thinned tick labels) and values outside [0, 1].
    let big: Vec<Vec<f64>> = (0..78).map(|i| (0..78).map(|j| (i as f64 - j as f64) / 10.0).collect()).collect();
    let stem = dir.path().join("big");
    heatmap(&big, "big", &stem).unwrap();
    assert_plots(&stem);
}

#[test]
fn bad_plot_inputs_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("x");
    let e = heatmap(&[], "t", &stem).unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");
    let e = heatmap(&[vec![0.1, 0.2], vec![0.3]], "t", &stem).unwrap_err().to_string();
    assert!(e.contains("row 1 has 1 values"), "{e}");
    let e = heatmap(&[vec![f64::NAN]], "t", &stem).unwrap_err().to_string();
    assert!(e.contains("no finite value"), "{e}");
    let e = line_plot(&[], "t", "x", "y", &stem).unwrap_err().to_string();
    assert!(e.contains("no finite point"), "{e}");
    let e = line_plot(&[("a".into(), vec![(f64::INFINITY, 1.0)])], "t", "x", "y", &stem).unwrap_err().to_string();
    assert!(e.contains("no finite point"), "{e}");
    // A single point and a constant matrix still plot.
    line_plot(&[("a".into(), vec![(1.0, 1.0)])], "t", "x", "y", &stem).unwrap();
    heatmap(&[vec![3.0, 3.0]], "t", &dir.path().join("c")).unwrap();
    // A stem whose parent is a file cannot be written: an error naming the path.
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let e = heatmap(&[vec![0.5]], "t", &file.join("plot")).unwrap_err();
    assert!(matches!(e, ToolError::File { .. }), "{e}");
}
