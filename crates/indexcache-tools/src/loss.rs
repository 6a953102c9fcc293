//! Mean next-token negative log-likelihood of token windows under a schedule.

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

/// NLL of `ids[score_from..]` given `logits` (`[ids.len(), vocab]`, row `j` predicts `ids[j+1]`),
/// with a float64 log-sum-exp.
pub fn nll_from_logits(logits: &[f32], vocab: usize, ids: &[u32], score_from: usize) -> Nll {
    let mut nll = Nll::default();
    for j in score_from.max(1)..ids.len() {
        let row = &logits[(j - 1) * vocab..j * vocab];
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = row.iter().map(|&l| (l as f64 - m).exp()).sum();
        nll.sum += m + z.ln() - row[ids[j] as usize] as f64;
        nll.tokens += 1;
    }
    nll
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
    fn uniform_logits_give_log_vocab() {
        let vocab = 8;
        let ids = vec![1u32, 2, 3, 4];
        let logits = vec![0.5f32; ids.len() * vocab];
        let n = nll_from_logits(&logits, vocab, &ids, 1);
        assert_eq!(n.tokens, 3);
        assert!((n.mean() - (vocab as f64).ln()).abs() < 1e-12);
    }
}
