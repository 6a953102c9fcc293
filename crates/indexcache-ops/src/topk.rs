//! Exact top-k selection for the lightning indexer.

/// Selected key positions per query row: `[rows, k]` i32, `-1` = no entry (the row had fewer
/// than `k` visible positions). Kept on the host: it is small (`T·K` ints) and a GPU backend
/// that keeps it on the device can still fill this layout when asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopK {
    pub rows: usize,
    pub k: usize,
    pub data: Vec<i32>,
}

impl TopK {
    pub fn row(&self, t: usize) -> &[i32] {
        &self.data[t * self.k..(t + 1) * self.k]
    }

    /// Append `other`'s rows, padding the shorter row length with -1.
    pub fn append_rows(&mut self, other: &TopK) {
        let k = self.k.max(other.k);
        let widen = |t: &TopK| -> Vec<i32> {
            let mut v = Vec::with_capacity(t.rows * k);
            for r in 0..t.rows {
                v.extend_from_slice(t.row(r));
                v.extend(std::iter::repeat_n(-1, k - t.k));
            }
            v
        };
        let mut data = widen(self);
        data.extend(widen(other));
        *self = TopK { rows: self.rows + other.rows, k, data };
    }

    /// Valid (non-negative) positions of row `t`.
    pub fn valid(&self, t: usize) -> impl Iterator<Item = usize> + '_ {
        self.row(t).iter().filter(|&&i| i >= 0).map(|&i| i as usize)
    }
}

/// Writes into `out` (length `k`) the positions of the `min(k, scores.len())` largest scores,
/// in descending score order, ties broken by the lower position; pads with -1.
/// `scratch` is reused between calls to avoid allocation. NaN scores sort last.
pub fn select_topk(scores: &[f32], k: usize, out: &mut [i32], scratch: &mut Vec<(f32, u32)>) {
    debug_assert_eq!(out.len(), k);
    let n = scores.len();
    let take = k.min(n);
    scratch.clear();
    scratch.extend(scores.iter().enumerate().map(|(i, &s)| (s, i as u32)));
    // Order: higher score first, then lower position. total ordering keeps NaN deterministic.
    let cmp = |a: &(f32, u32), b: &(f32, u32)| {
        let (sa, sb) =
            (if a.0.is_nan() { f32::NEG_INFINITY } else { a.0 }, if b.0.is_nan() { f32::NEG_INFINITY } else { b.0 });
        sb.total_cmp(&sa).then(a.1.cmp(&b.1))
    };
    if take < n && take > 0 {
        scratch.select_nth_unstable_by(take - 1, cmp);
    }
    let sel = &mut scratch[..take];
    sel.sort_unstable_by(cmp);
    for (o, &(_, i)) in out.iter_mut().zip(sel.iter()) {
        *o = i as i32;
    }
    for o in out[take..].iter_mut() {
        *o = -1;
    }
}
