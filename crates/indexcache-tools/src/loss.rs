//! Mean next-token negative log-likelihood of token windows under a schedule.
//!
//! The per-token NLL is reduced by the backend ([`indexcache_ops::Backend::nll`], through
//! [`DsaModel::forward_nll`]): only one number per token leaves the device, never the `[T, vocab]`
//! logits. `tests/loss.rs` checks it against a float64 log-softmax of downloaded logits.

use crate::data::Window;
use crate::error::ToolError;
use indexcache_config::IndexSchedule;
use indexcache_model::DsaModel;
use indexcache_ops::Backend;

/// A sum of NLLs and how many targets it covers.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Nll {
    pub sum: f64,
    pub tokens: usize,
}

impl Nll {
    pub fn add(&mut self, o: Nll) {
        self.sum += o.sum;
        self.tokens += o.tokens;
    }
    pub fn mean(&self) -> f64 {
        if self.tokens == 0 { f64::NAN } else { self.sum / self.tokens as f64 }
    }
    pub fn perplexity(&self) -> f64 {
        self.mean().exp()
    }
    /// Sum of per-row NLLs (`None` = row not scored).
    pub fn from_rows(rows: &[Option<f64>]) -> Nll {
        let mut n = Nll::default();
        for v in rows.iter().flatten() {
            n.sum += v;
            n.tokens += 1;
        }
        n
    }
}

/// Per input row, the token it predicts if that token is scored: row `j` predicts `ids[j+1]`,
/// scored when `j + 1 ≥ max(score_from, 1)`.
pub fn targets(w: &Window) -> Vec<Option<u32>> {
    let from = w.score_from.max(1);
    (0..w.ids.len()).map(|j| (j + 1 < w.ids.len() && j + 1 >= from).then(|| w.ids[j + 1])).collect()
}

/// NLL of one window from a fresh cache, prefilled in chunks of `chunk` tokens; the per-token
/// NLL is reduced on the device (the window's `[T, vocab]` logits are never downloaded).
pub fn window_nll<B: Backend>(
    model: &DsaModel<B>,
    schedule: &IndexSchedule,
    w: &Window,
    chunk: usize,
) -> Result<Nll, ToolError> {
    let mut cache = model.new_cache_with(schedule.clone(), w.ids.len())?;
    let targets = targets(w);
    let chunk = chunk.max(1);
    let mut total = Nll::default();
    for (ids, tg) in w.ids.chunks(chunk).zip(targets.chunks(chunk)) {
        total.add(Nll::from_rows(&model.forward_nll(ids, tg, &mut cache)?));
    }
    Ok(total)
}

/// Summed NLL over `windows`; `progress` is called after each window.
pub fn dataset_nll<B: Backend>(
    model: &DsaModel<B>,
    schedule: &IndexSchedule,
    windows: &[Window],
    chunk: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Nll, ToolError> {
    let mut total = Nll::default();
    for (i, w) in windows.iter().enumerate() {
        total.add(window_nll(model, schedule, w, chunk)?);
        progress(i + 1);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_start_at_score_from_and_skip_the_last_row() {
        let w = Window { ids: vec![5, 6, 7, 8], score_from: 2 };
        assert_eq!(targets(&w), vec![None, Some(7), Some(8), None]);
        let w = Window { ids: vec![5, 6, 7], score_from: 0 };
        assert_eq!(targets(&w), vec![Some(6), Some(7), None]);
        let n = Nll::from_rows(&[None, Some(1.0), Some(2.0)]);
        assert_eq!((n.sum, n.tokens, n.mean()), (3.0, 2, 1.5));
        assert!(Nll::default().mean().is_nan());
    }
}
