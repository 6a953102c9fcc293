//! The IndexCache schedule: which layers run their lightning indexer (Full) and which reuse the
//! top-k of the nearest preceding Full layer (Shared). Paper: arXiv 2603.12201 §1.2.
//!
//! A schedule is stored as one [`LayerIndexer`] per layer, but it is *built* only from the
//! Full/Shared flags: every constructor goes through [`IndexSchedule::from_full_flags`], which
//! recomputes each Shared layer's `source` as the nearest preceding Full layer. So the
//! `Shared { source }` values can never disagree with the flags.
//!
//! Sources of a schedule, in the precedence transformers uses (see [`crate::ModelConfig`]):
//! `indexer_types` ([`IndexSchedule::from_indexer_types`]) > `index_topk_pattern`
//! ([`IndexSchedule::from_pattern`]) > `index_topk_freq` + `index_skip_topk_offset`
//! ([`IndexSchedule::from_freq_offset`]); at run time a [`ScheduleOverride`] replaces it.

use std::fmt;
use thiserror::Error;

/// What one layer does for its top-k.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerIndexer {
    /// Runs its own indexer, owns an indexer-key cache, and publishes its top-k.
    Full,
    /// Runs no indexer; uses the top-k of layer `source` (the nearest preceding Full layer).
    Shared { source: usize },
}

/// A validated per-layer schedule. Invariant: non-empty, layer 0 is Full.
///
/// The one exception is [`IndexSchedule::all_full`]`(0)`, which is empty because that
/// constructor cannot fail; every fallible constructor rejects zero layers with
/// [`ScheduleError::Empty`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexSchedule {
    layers: Vec<LayerIndexer>,
}

/// A run-time override of the checkpoint's schedule (`--pattern`, `--keep`, `--index-cache off`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleOverride {
    /// An explicit "FSSF…" string, one character per layer.
    Pattern(String),
    /// Keep `num/den` of the indexers, uniformly spaced, layer 0 always Full.
    Keep { num: usize, den: usize },
    /// Every layer Full (plain DSA).
    Off,
}

/// Why a schedule could not be built.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("pattern has {got} characters but the model has {expected} layers")]
    WrongLength { expected: usize, got: usize },
    #[error("layer 0 must be Full (F): a Shared first layer has no earlier top-k to reuse")]
    SharedFirstLayer,
    #[error("invalid character {ch:?} at layer {layer} of pattern (only 'F' and 'S' are allowed)")]
    BadChar { layer: usize, ch: char },
    #[error("invalid indexer_types entry {value:?} at layer {layer} (expected \"full\" or \"shared\")")]
    BadIndexerType { layer: usize, value: String },
    #[error("invalid keep fraction {0:?}: expected N/D with 0 < N <= D, e.g. 1/4")]
    BadKeep(String),
    #[error("empty schedule")]
    Empty,
    /// `indexer_types` (a list, not a string) does not have one entry per layer.
    #[error("indexer_types has {got} entries but the model has {expected} layers")]
    WrongIndexerTypesLength { expected: usize, got: usize },
    /// A layer index past the end of the schedule (e.g. in [`IndexSchedule::with_shared`]).
    #[error("layer {layer} is out of range: the schedule has {n_layers} layers")]
    LayerOutOfRange { layer: usize, n_layers: usize },
}

impl IndexSchedule {
    /// Every layer Full: plain DSA, no sharing. `all_full(0)` is the (only) empty schedule.
    pub fn all_full(n_layers: usize) -> Self {
        Self { layers: vec![LayerIndexer::Full; n_layers] }
    }

    /// Builds a schedule from one Full (`true`) / Shared (`false`) flag per layer, computing each
    /// Shared layer's source as the nearest preceding Full layer.
    pub fn from_full_flags(full: &[bool]) -> Result<Self, ScheduleError> {
        match full.first() {
            None => return Err(ScheduleError::Empty),
            Some(false) => return Err(ScheduleError::SharedFirstLayer),
            Some(true) => {}
        }
        let mut last_full = 0;
        let layers = full
            .iter()
            .enumerate()
            .map(|(l, &is_full)| {
                if is_full {
                    last_full = l;
                    LayerIndexer::Full
                } else {
                    LayerIndexer::Shared { source: last_full }
                }
            })
            .collect();
        Ok(Self { layers })
    }

    /// Parses an `index_topk_pattern` / `--pattern` string: exactly one `F` or `S` per layer,
    /// layer 0 `F` (e.g. `"FSSSFSSS"`).
    pub fn from_pattern(pattern: &str, n_layers: usize) -> Result<Self, ScheduleError> {
        let got = pattern.chars().count();
        if got != n_layers {
            return Err(ScheduleError::WrongLength { expected: n_layers, got });
        }
        let flags = pattern
            .chars()
            .enumerate()
            .map(|(layer, ch)| match ch {
                'F' => Ok(true),
                'S' => Ok(false),
                _ => Err(ScheduleError::BadChar { layer, ch }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_full_flags(&flags)
    }

    /// Builds a schedule from GLM's per-layer `indexer_types` list (`"full"` / `"shared"`).
    pub fn from_indexer_types(types: &[String], n_layers: usize) -> Result<Self, ScheduleError> {
        if types.len() != n_layers {
            return Err(ScheduleError::WrongIndexerTypesLength { expected: n_layers, got: types.len() });
        }
        let flags = types
            .iter()
            .enumerate()
            .map(|(layer, t)| match t.as_str() {
                "full" => Ok(true),
                "shared" => Ok(false),
                _ => Err(ScheduleError::BadIndexerType { layer, value: t.clone() }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_full_flags(&flags)
    }

    /// The transformers / vLLM frequency rule: layer `i` is Full iff
    /// `max(i - offset + 1, 0) % max(freq, 1) == 0`.
    ///
    /// `freq = 1` (the default) makes every layer Full. With the default `offset = 2` and
    /// `freq = 4` the Full layers are 0, 1, 5, 9, …; GLM-5.2 ships `freq = 4, offset = 3`
    /// (0, 1, 2, 6, 10, …). `offset = 0` with `freq > 1` makes layer 0 Shared, which is an error.
    pub fn from_freq_offset(freq: usize, offset: usize, n_layers: usize) -> Result<Self, ScheduleError> {
        let freq = freq.max(1);
        // `max(i - offset + 1, 0)` in unsigned arithmetic.
        let flags: Vec<bool> = (0..n_layers).map(|i| (i + 1).saturating_sub(offset) % freq == 0).collect();
        Self::from_full_flags(&flags)
    }

    /// Keeps `num/den` of the indexers, uniformly spaced (the paper's "uniform" baseline).
    ///
    /// `n_full = max(1, ceil(n·num/den))` and the Full layers are `floor(i·n/n_full)` for
    /// `i in 0..n_full`, so layer 0 is always Full; 8 layers at 1/4 give `FSSSFSSS`.
    pub fn uniform_keep(num: usize, den: usize, n_layers: usize) -> Result<Self, ScheduleError> {
        if num == 0 || den == 0 || num > den {
            return Err(ScheduleError::BadKeep(format!("{num}/{den}")));
        }
        if n_layers == 0 {
            return Err(ScheduleError::Empty);
        }
        // u128 so that user-supplied fractions like 10^12/10^12 cannot overflow.
        let n = n_layers as u128;
        let n_full = (n * num as u128).div_ceil(den as u128).max(1);
        let mut flags = vec![false; n_layers];
        for i in 0..n_full {
            // i < n_full <= n, so i·n/n_full < n: always a valid layer index.
            let layer = (i * n / n_full) as usize;
            flags[layer] = true;
        }
        Self::from_full_flags(&flags)
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// True only for `all_full(0)`.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// What layer `l` does. Panics if `l >= len()` (a caller bug, like slice indexing).
    pub fn layer(&self, l: usize) -> LayerIndexer {
        self.layers[l]
    }

    /// All layers in order.
    pub fn layers(&self) -> &[LayerIndexer] {
        &self.layers
    }

    /// Whether layer `l` runs its own indexer. Panics if `l >= len()`.
    pub fn is_full(&self, l: usize) -> bool {
        matches!(self.layers[l], LayerIndexer::Full)
    }

    /// The layer whose top-k layer `l` uses: `l` itself when Full. Panics if `l >= len()`.
    pub fn source(&self, l: usize) -> usize {
        match self.layers[l] {
            LayerIndexer::Full => l,
            LayerIndexer::Shared { source } => source,
        }
    }

    /// Number of Full layers (indexers that run, and indexer-key caches to keep).
    pub fn num_full(&self) -> usize {
        self.layers.iter().filter(|x| matches!(x, LayerIndexer::Full)).count()
    }

    /// Indices of the Full layers, ascending.
    pub fn full_layers(&self) -> Vec<usize> {
        (0..self.layers.len()).filter(|&l| self.is_full(l)).collect()
    }

    /// The schedule as an `F`/`S` string, one character per layer (round-trips through
    /// [`IndexSchedule::from_pattern`]).
    pub fn to_pattern(&self) -> String {
        self.layers
            .iter()
            .map(|x| match x {
                LayerIndexer::Full => 'F',
                LayerIndexer::Shared { .. } => 'S',
            })
            .collect()
    }

    /// A copy with layer `l` switched to Shared (no-op if it already is), with the sources of
    /// the later layers recomputed. This is one tentative flip of the greedy search.
    pub fn with_shared(&self, l: usize) -> Result<Self, ScheduleError> {
        if l >= self.layers.len() {
            return Err(ScheduleError::LayerOutOfRange { layer: l, n_layers: self.layers.len() });
        }
        if l == 0 {
            return Err(ScheduleError::SharedFirstLayer);
        }
        let mut flags: Vec<bool> = (0..self.layers.len()).map(|i| self.is_full(i)).collect();
        flags[l] = false;
        Self::from_full_flags(&flags)
    }
}

impl fmt::Display for IndexSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_pattern())
    }
}

impl ScheduleOverride {
    /// Parses a `--keep` fraction such as `"1/4"` into [`ScheduleOverride::Keep`]
    /// (`0 < N <= D`; surrounding whitespace is ignored).
    pub fn parse_keep(s: &str) -> Result<Self, ScheduleError> {
        let bad = || ScheduleError::BadKeep(s.to_string());
        let (num, den) = s.trim().split_once('/').ok_or_else(bad)?;
        let num: usize = num.trim().parse().map_err(|_| bad())?;
        let den: usize = den.trim().parse().map_err(|_| bad())?;
        if num == 0 || num > den {
            return Err(bad());
        }
        Ok(Self::Keep { num, den })
    }

    /// The schedule this override gives for a model with `n_layers` layers.
    pub fn apply(&self, n_layers: usize) -> Result<IndexSchedule, ScheduleError> {
        match self {
            Self::Pattern(p) => IndexSchedule::from_pattern(p, n_layers),
            Self::Keep { num, den } => IndexSchedule::uniform_keep(*num, *den, n_layers),
            Self::Off if n_layers == 0 => Err(ScheduleError::Empty),
            Self::Off => Ok(IndexSchedule::all_full(n_layers)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paper's searched GLM-5 1/4 pattern (Appendix B), 78 layers, 22 Full.
    const GLM5_QUARTER: &str = "FFSFSSSFSSFSFSSSSSSSFSSSSSSFSSSFSFSSSSFFFFFSSSFFSSSFSSSSSSSSFSSSFSSSSSSFSFSSSS";
    /// The paper's searched GLM-5 1/2 pattern, 78 layers, 40 Full.
    const GLM5_HALF: &str = "FFSFSSSFSSFFFSSSFFFSFSSSSSSFFSFFSFFSSFFFFFFSFFFFFSFFSSSSSSFSFFFSFSSSFSFFSFFSSS";

    #[test]
    fn all_full_is_plain_dsa() {
        let s = IndexSchedule::all_full(4);
        assert_eq!(s.to_pattern(), "FFFF");
        assert_eq!(s.num_full(), 4);
        assert_eq!((0..4).map(|l| s.source(l)).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        assert!(IndexSchedule::all_full(0).is_empty());
    }

    #[test]
    fn pattern_sources_are_nearest_preceding_full() {
        let s = IndexSchedule::from_pattern("FSSFSF", 6).unwrap();
        assert_eq!(
            s.layers(),
            &[
                LayerIndexer::Full,
                LayerIndexer::Shared { source: 0 },
                LayerIndexer::Shared { source: 0 },
                LayerIndexer::Full,
                LayerIndexer::Shared { source: 3 },
                LayerIndexer::Full,
            ]
        );
        assert_eq!(s.source(4), 3);
        assert_eq!(s.source(5), 5);
        assert!(s.is_full(3) && !s.is_full(4));
        assert_eq!(s.full_layers(), vec![0, 3, 5]);
        assert_eq!(s.to_string(), "FSSFSF");
        assert_eq!(s.len(), 6);
    }

    #[test]
    fn pattern_wrong_length() {
        let e = IndexSchedule::from_pattern("FSSSFSS", 8).unwrap_err();
        assert_eq!(e, ScheduleError::WrongLength { expected: 8, got: 7 });
        assert!(e.to_string().contains("pattern has 7 characters but the model has 8 layers"), "{e}");
    }

    #[test]
    fn pattern_bad_char_names_layer_and_char() {
        let e = IndexSchedule::from_pattern("FSXS", 4).unwrap_err();
        assert_eq!(e, ScheduleError::BadChar { layer: 2, ch: 'X' });
        assert!(e.to_string().contains("invalid character 'X' at layer 2"), "{e}");
        // Lower case is not accepted either (transformers maps only "F" and "S").
        let e = IndexSchedule::from_pattern("Fs", 2).unwrap_err();
        assert!(e.to_string().contains("invalid character 's' at layer 1"), "{e}");
    }

    #[test]
    fn pattern_shared_first_layer() {
        let e = IndexSchedule::from_pattern("SFFF", 4).unwrap_err();
        assert_eq!(e, ScheduleError::SharedFirstLayer);
        assert!(e.to_string().contains("layer 0 must be Full"), "{e}");
    }

    #[test]
    fn pattern_empty() {
        assert_eq!(IndexSchedule::from_pattern("", 0).unwrap_err(), ScheduleError::Empty);
        assert!(IndexSchedule::from_pattern("", 0).unwrap_err().to_string().contains("empty schedule"));
    }

    #[test]
    fn paper_glm5_patterns() {
        let q = IndexSchedule::from_pattern(GLM5_QUARTER, 78).unwrap();
        assert_eq!(q.num_full(), 22);
        assert_eq!(q.to_pattern(), GLM5_QUARTER);
        let h = IndexSchedule::from_pattern(GLM5_HALF, 78).unwrap();
        assert_eq!(h.num_full(), 40);
    }

    #[test]
    fn indexer_types() {
        let t: Vec<String> = ["full", "shared", "shared", "full"].iter().map(|s| s.to_string()).collect();
        let s = IndexSchedule::from_indexer_types(&t, 4).unwrap();
        assert_eq!(s.to_pattern(), "FSSF");
        assert_eq!(s.source(2), 0);

        let e = IndexSchedule::from_indexer_types(&t, 5).unwrap_err();
        assert!(e.to_string().contains("indexer_types has 4 entries but the model has 5 layers"), "{e}");

        let bad: Vec<String> = ["full", "Full"].iter().map(|s| s.to_string()).collect();
        let e = IndexSchedule::from_indexer_types(&bad, 2).unwrap_err();
        assert!(e.to_string().contains("invalid indexer_types entry \"Full\" at layer 1"), "{e}");

        let first_shared: Vec<String> = ["shared", "full"].iter().map(|s| s.to_string()).collect();
        let e = IndexSchedule::from_indexer_types(&first_shared, 2).unwrap_err();
        assert!(e.to_string().contains("layer 0 must be Full"), "{e}");
    }

    #[test]
    fn freq_offset_default_rule() {
        // freq 1 (default): every layer Full.
        assert_eq!(IndexSchedule::from_freq_offset(1, 2, 5).unwrap().to_pattern(), "FFFFF");
        // freq 0 behaves like 1 (transformers clamps with max(freq, 1)).
        assert_eq!(IndexSchedule::from_freq_offset(0, 2, 3).unwrap().to_pattern(), "FFF");
        // freq 4, offset 2: F at 0, 1, 5, 9, … (the official off-by-one rule).
        let s = IndexSchedule::from_freq_offset(4, 2, 12).unwrap();
        assert_eq!(s.to_pattern(), "FFSSSFSSSFSS");
        assert_eq!(s.full_layers(), vec![0, 1, 5, 9]);
        // offset 1: the paper's uniform FSSS….
        assert_eq!(IndexSchedule::from_freq_offset(4, 1, 8).unwrap().to_pattern(), "FSSSFSSS");
    }

    #[test]
    fn freq_offset_glm52() {
        let s = IndexSchedule::from_freq_offset(4, 3, 78).unwrap();
        let mut expected = vec![0, 1];
        expected.extend((2..78).step_by(4));
        assert_eq!(s.full_layers(), expected);
        assert_eq!(s.num_full(), 21);
        assert_eq!(*s.full_layers().last().unwrap(), 74);
        assert_eq!(s.source(77), 74);
    }

    #[test]
    fn freq_offset_zero_offset_rejected() {
        let e = IndexSchedule::from_freq_offset(4, 0, 8).unwrap_err();
        assert_eq!(e, ScheduleError::SharedFirstLayer);
        assert_eq!(IndexSchedule::from_freq_offset(4, 2, 0).unwrap_err(), ScheduleError::Empty);
    }

    #[test]
    fn uniform_keep_spacing() {
        assert_eq!(IndexSchedule::uniform_keep(1, 4, 8).unwrap().to_pattern(), "FSSSFSSS");
        assert_eq!(IndexSchedule::uniform_keep(1, 2, 6).unwrap().to_pattern(), "FSFSFS");
        assert_eq!(IndexSchedule::uniform_keep(1, 1, 3).unwrap().to_pattern(), "FFF");
        // Tiny fractions keep at least layer 0.
        assert_eq!(IndexSchedule::uniform_keep(1, 100, 5).unwrap().to_pattern(), "FSSSS");
        // 78 layers at 1/4: ceil(19.5) = 20 Full, layer 0 first.
        let s = IndexSchedule::uniform_keep(1, 4, 78).unwrap();
        assert_eq!(s.num_full(), 20);
        assert!(s.is_full(0));
        // 61 layers at 1/2: 31 Full.
        assert_eq!(IndexSchedule::uniform_keep(1, 2, 61).unwrap().num_full(), 31);
        // Huge fractions do not overflow.
        let big = 1usize << 62;
        assert_eq!(IndexSchedule::uniform_keep(big, big, 4).unwrap().to_pattern(), "FFFF");
    }

    #[test]
    fn uniform_keep_errors() {
        for (n, d) in [(0, 4), (5, 4), (1, 0)] {
            let e = IndexSchedule::uniform_keep(n, d, 8).unwrap_err();
            assert_eq!(e, ScheduleError::BadKeep(format!("{n}/{d}")));
        }
        assert_eq!(IndexSchedule::uniform_keep(1, 4, 0).unwrap_err(), ScheduleError::Empty);
    }

    #[test]
    fn with_shared_recomputes_sources() {
        let s = IndexSchedule::all_full(5);
        let s = s.with_shared(2).unwrap();
        assert_eq!(s.to_pattern(), "FFSFF");
        assert_eq!(s.source(2), 1);
        let s = s.with_shared(1).unwrap();
        assert_eq!(s.to_pattern(), "FSSFF");
        // Layer 2's source moved from 1 to 0 when layer 1 was flipped.
        assert_eq!(s.source(2), 0);
        let s = s.with_shared(3).unwrap();
        assert_eq!((0..5).map(|l| s.source(l)).collect::<Vec<_>>(), vec![0, 0, 0, 0, 4]);
        // Idempotent on an already Shared layer.
        assert_eq!(s.with_shared(3).unwrap(), s);

        assert_eq!(s.with_shared(0).unwrap_err(), ScheduleError::SharedFirstLayer);
        let e = s.with_shared(5).unwrap_err();
        assert!(e.to_string().contains("layer 5 is out of range: the schedule has 5 layers"), "{e}");
    }

    #[test]
    fn parse_keep() {
        assert_eq!(ScheduleOverride::parse_keep("1/4").unwrap(), ScheduleOverride::Keep { num: 1, den: 4 });
        assert_eq!(ScheduleOverride::parse_keep(" 3 / 8 ").unwrap(), ScheduleOverride::Keep { num: 3, den: 8 });
        assert_eq!(ScheduleOverride::parse_keep("1/1").unwrap(), ScheduleOverride::Keep { num: 1, den: 1 });
        for bad in ["", "1", "1/", "/4", "0/4", "5/4", "1/0", "a/b", "-1/4", "1/4/2", "0.25"] {
            let e = ScheduleOverride::parse_keep(bad).unwrap_err();
            assert_eq!(e, ScheduleError::BadKeep(bad.to_string()), "{bad}");
            assert!(e.to_string().contains("invalid keep fraction"), "{e}");
        }
    }

    #[test]
    fn override_apply() {
        assert_eq!(ScheduleOverride::Off.apply(3).unwrap().to_pattern(), "FFF");
        assert_eq!(ScheduleOverride::Off.apply(0).unwrap_err(), ScheduleError::Empty);
        assert_eq!(ScheduleOverride::Keep { num: 1, den: 4 }.apply(8).unwrap().to_pattern(), "FSSSFSSS");
        assert_eq!(ScheduleOverride::Pattern("FSF".into()).apply(3).unwrap().to_pattern(), "FSF");
        assert_eq!(
            ScheduleOverride::Pattern("FSF".into()).apply(4).unwrap_err(),
            ScheduleError::WrongLength { expected: 4, got: 3 }
        );
    }
}
