//! Top-k overlap between layers (IndexCache paper §4.1): for every pair of layers `(i, j)`, the
//! mean of `|T_i ∩ T_j| / k` over query rows, where `T_l` is the set of key positions layer
//! `l`'s lightning indexer selects for that row and `k = index_topk`.
//!
//! Every layer runs its own indexer (schedule = all Full), so the checkpoint must ship an
//! indexer on every layer and the model must be loaded with them all
//! ([`indexcache_model::IndexerSelection::All`]).
//!
//! Only rows that see **more than `k`** tokens are counted: a row with `≤ k` visible tokens
//! selects all of them in every layer, which would pull the overlap towards 1 without saying
//! anything about the indexers. Every row of every window is counted (windows start from an
//! empty cache, so row `t` sees `t + 1` tokens); pass disjoint windows (stride = ctx) to count
//! each token once.
//!
//! Memory: the top-k of all layers for one window at a time (`layers × T × k` i32) plus the
//! `layers × layers` integer sums; the intersections of a window are counted in parallel over
//! its rows. A window is prefilled in chunks of `chunk` tokens ([`DsaModel::forward_chunked`]
//! concatenates the chunks' top-k rows), so the indexer's scores stay `[chunk, T]`.

use crate::data::Window;
use crate::error::ToolError;
use indexcache_config::IndexSchedule;
use indexcache_model::{DsaModel, ForwardOptions, Logits, format_layers};
use indexcache_ops::{Backend, TopK};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// The overlap study's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OverlapReport {
    /// Number of layers (the matrix is `layers × layers`).
    pub layers: usize,
    /// `index_topk`.
    pub k: usize,
    /// Windows run.
    pub windows: usize,
    /// Query rows averaged over (those with more than `k` visible tokens).
    pub rows_counted: usize,
    /// `matrix[i][j]` = mean over counted rows of `|T_i ∩ T_j| / k`. Symmetric (the upper
    /// triangle is computed and mirrored); the diagonal is computed like any other entry, and is
    /// 1 because a row's top-k positions are distinct.
    pub matrix: Vec<Vec<f64>>,
    /// `adjacent[l]` = `matrix[l][l + 1]` (`layers - 1` entries).
    pub adjacent: Vec<f64>,
    /// `mean_with_others[l]` = mean of `matrix[l][j]` over `j ≠ l` (NaN for a 1-layer model).
    pub mean_with_others: Vec<f64>,
}

/// Query rows of `windows` that see more than `k` tokens (each window starts from an empty
/// cache: row `t` sees `t + 1` tokens).
pub fn rows_with_more_than_k(windows: &[Window], k: usize) -> usize {
    windows.iter().map(|w| w.ids.len().saturating_sub(k)).sum()
}

/// Run every layer's indexer on each window (prefilled in chunks of `chunk` tokens) and average
/// the pairwise top-k overlap. `progress` is called with the number of windows done after each
/// window.
pub fn overlap_matrix<B: Backend>(
    model: &DsaModel<B>,
    windows: &[Window],
    chunk: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<OverlapReport, ToolError> {
    let cfg = model.config();
    let n = cfg.num_hidden_layers;
    let k = cfg.index_topk;
    if k == 0 {
        return Err(ToolError::Invalid("index_topk is 0: there is no top-k to compare".into()));
    }
    let loaded = model.layers_with_indexer();
    let missing: Vec<usize> = (0..n).filter(|l| !loaded.contains(l)).collect();
    if !missing.is_empty() {
        return Err(ToolError::Invalid(format!(
            "the overlap study runs the indexer of every layer, but no indexer is loaded for layers {} \
             (loaded: {}): either the checkpoint ships indexers only on some layers (an IndexCache \
             checkpoint whose Shared layers were stripped), or the model was loaded without them \
             (load with IndexerSelection::All)",
            format_layers(&missing),
            format_layers(&loaded)
        )));
    }
    if windows.is_empty() {
        return Err(ToolError::Invalid("no windows to run the overlap study on".into()));
    }
    let rows_counted = rows_with_more_than_k(windows, k);
    if rows_counted == 0 {
        let longest = windows.iter().map(|w| w.ids.len()).max().unwrap_or(0);
        return Err(ToolError::Invalid(format!(
            "no query row sees more than index_topk = {k} tokens (the longest window has {longest}), so \
             every indexer selects every visible token and the overlap says nothing: raise --ctx above {k}"
        )));
    }

    let schedule = IndexSchedule::all_full(n);
    let opts = ForwardOptions { logits: Logits::None, capture_topk: true };
    let mut sums = vec![0u64; n * n];
    for (wi, w) in windows.iter().enumerate() {
        let mut cache = model.new_cache_with(schedule.clone(), w.ids.len())?;
        let out = model.forward_chunked(&w.ids, &mut cache, &opts, chunk)?;
        let topk = ordered_topk(out.topk, n, k, w.ids.len(), wi)?;
        let window_sums = window_intersections(&topk, k, w.ids.len());
        for (s, ws) in sums.iter_mut().zip(window_sums) {
            *s += ws;
        }
        progress(wi + 1);
    }

    let denom = (rows_counted as f64) * (k as f64);
    let mut matrix = vec![vec![0.0f64; n]; n];
    for i in 0..n {
        for j in i..n {
            let v = sums[i * n + j] as f64 / denom;
            matrix[i][j] = v;
            matrix[j][i] = v;
        }
    }
    let adjacent = (0..n.saturating_sub(1)).map(|l| matrix[l][l + 1]).collect();
    let mean_with_others = (0..n)
        .map(|l| {
            if n < 2 {
                f64::NAN
            } else {
                (0..n).filter(|&j| j != l).map(|j| matrix[l][j]).sum::<f64>() / (n - 1) as f64
            }
        })
        .collect();
    Ok(OverlapReport { layers: n, k, windows: windows.len(), rows_counted, matrix, adjacent, mean_with_others })
}

/// The captured top-k in layer order, checked against what the counting relies on (rows of
/// `min(k, rows)` positions: a window no longer than `k` has shorter rows, and no row counted).
fn ordered_topk(
    captured: Vec<(usize, TopK)>,
    n: usize,
    k: usize,
    rows: usize,
    window: usize,
) -> Result<Vec<TopK>, ToolError> {
    let bad = |what: String| ToolError::Invalid(format!("window {window}: {what}"));
    let mut by_layer: Vec<Option<TopK>> = vec![None; n];
    for (l, t) in captured {
        let slot = by_layer.get_mut(l).ok_or_else(|| bad(format!("top-k captured for layer {l} of {n}")))?;
        let want_k = k.min(rows);
        if t.rows != rows || t.k != want_k || t.data.len() != rows * want_k {
            return Err(bad(format!(
                "layer {l} top-k is {}×{} ({} entries), expected {rows}×{want_k}",
                t.rows,
                t.k,
                t.data.len()
            )));
        }
        if let Some(&p) = t.data.iter().find(|&&p| i64::from(p) >= rows as i64) {
            return Err(bad(format!("layer {l} selected position {p}, past the window's {rows} tokens")));
        }
        *slot = Some(t);
    }
    let absent: Vec<usize> = (0..n).filter(|&l| by_layer[l].is_none()).collect();
    if !absent.is_empty() {
        return Err(bad(format!("the forward pass returned no top-k for layers {}", format_layers(&absent))));
    }
    Ok(by_layer.into_iter().flatten().collect())
}

/// `sums[i*n + j]` (`i ≤ j`) = Σ over rows `t ≥ k` (those seeing more than `k` tokens) of
/// `|T_i(t) ∩ T_j(t)|`, counting valid entries only. Rows are split over threads; each keeps
/// one membership bitmap per layer and clears only the bits it set.
fn window_intersections(topk: &[TopK], k: usize, rows: usize) -> Vec<u64> {
    let n = topk.len();
    let words = rows.div_ceil(64);
    let counted: Vec<usize> = (k..rows).collect();
    let chunk = counted.len().div_ceil(rayon::current_num_threads().max(1) * 4).max(1);
    counted
        .par_chunks(chunk)
        .map(|ts| {
            let mut sums = vec![0u64; n * n];
            let mut bits = vec![0u64; n * words];
            for &t in ts {
                for (i, tk) in topk.iter().enumerate() {
                    let b = &mut bits[i * words..(i + 1) * words];
                    for p in tk.valid(t) {
                        b[p / 64] |= 1 << (p % 64);
                    }
                }
                for i in 0..n {
                    let b = &bits[i * words..(i + 1) * words];
                    for (j, tj) in topk.iter().enumerate().skip(i) {
                        let c = tj.valid(t).filter(|&p| (b[p / 64] >> (p % 64)) & 1 == 1).count();
                        sums[i * n + j] += c as u64;
                    }
                }
                for (i, tk) in topk.iter().enumerate() {
                    let b = &mut bits[i * words..(i + 1) * words];
                    for p in tk.valid(t) {
                        b[p / 64] = 0;
                    }
                }
            }
            sums
        })
        .reduce(
            || vec![0u64; n * n],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
                a
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topk(rows: &[&[i32]]) -> TopK {
        let k = rows[0].len();
        TopK { rows: rows.len(), k, data: rows.iter().flat_map(|r| r.iter().copied()).collect() }
    }

    #[test]
    fn intersections_count_only_rows_past_k() {
        // k = 2, 4 rows: rows 0 and 1 see ≤ 2 tokens and are skipped.
        let a = topk(&[&[0, -1], &[0, 1], &[2, 0], &[3, 1]]);
        let b = topk(&[&[0, -1], &[1, 0], &[2, 1], &[0, 2]]);
        let s = window_intersections(&[a, b], 2, 4);
        // (a,a): 2 + 2; (a,b): |{2,0}∩{2,1}| + |{3,1}∩{0,2}| = 1 + 0; (b,b): 2 + 2.
        assert_eq!(s, vec![4, 1, 0, 4]);
    }

    #[test]
    fn rows_past_k() {
        let w = |len: usize| Window { ids: vec![0; len], score_from: 1 };
        assert_eq!(rows_with_more_than_k(&[w(10), w(3), w(4)], 4), 6);
    }
}
