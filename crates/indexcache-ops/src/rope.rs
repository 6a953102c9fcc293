//! Rotary position embedding tables and the two pair layouts DSA models use.

/// Which dimensions form a rotation pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs `(2i, 2i+1)` — MLA RoPE in both models; the GLM-5 indexer.
    Interleaved,
    /// Pairs `(i, i + d/2)` ("rotate_half", NeoX) — the DeepSeek-V3.2 indexer.
    HalfSplit,
}

/// `cos`/`sin` per position and frequency, computed as transformers does: the angle
/// `position · inv_freq` is formed in f32, and cos/sin are scaled by `attention_factor`.
#[derive(Debug, Clone)]
pub struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Table for positions `0..max_positions`; `inv_freq` has `dim/2` entries.
    pub fn new(inv_freq: &[f32], attention_factor: f32, max_positions: usize) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(half * max_positions);
        let mut sin = Vec::with_capacity(half * max_positions);
        for p in 0..max_positions {
            for &f in inv_freq {
                let angle = p as f32 * f; // f32 product, as torch computes it
                cos.push((angle as f64).cos() as f32 * attention_factor);
                sin.push((angle as f64).sin() as f32 * attention_factor);
            }
        }
        Self { half, cos, sin }
    }

    /// Number of frequencies (`rot_dims / 2`).
    pub fn half(&self) -> usize {
        self.half
    }

    /// Positions covered.
    pub fn max_positions(&self) -> usize {
        self.cos.len().checked_div(self.half).unwrap_or(0)
    }

    /// `(cos, sin)` slices of length `half` for one position.
    pub fn at(&self, pos: usize) -> (&[f32], &[f32]) {
        let r = pos * self.half..(pos + 1) * self.half;
        (&self.cos[r.clone()], &self.sin[r])
    }

    /// Rotate `x[..2*half]` in place for position `pos`.
    pub fn rotate(&self, x: &mut [f32], pos: usize, layout: RopeLayout) {
        let (cos, sin) = self.at(pos);
        let h = self.half;
        match layout {
            RopeLayout::Interleaved => {
                for i in 0..h {
                    let (a, b) = (x[2 * i], x[2 * i + 1]);
                    x[2 * i] = a * cos[i] - b * sin[i];
                    x[2 * i + 1] = b * cos[i] + a * sin[i];
                }
            }
            RopeLayout::HalfSplit => {
                for i in 0..h {
                    let (a, b) = (x[i], x[i + h]);
                    x[i] = a * cos[i] - b * sin[i];
                    x[i + h] = b * cos[i] + a * sin[i];
                }
            }
        }
    }
}
