//! Synthetic long-context retrieval: passkey (Mohtashami & Jaggi 2023) and single-needle NIAH
//! (RULER, Hsieh et al. 2024), seeded, scored by exact match of a greedy continuation.
//!
//! A prompt is `intro \n filler… \n needle \n filler… \n question`, where the filler is the
//! sentences of "The grass is green. The sky is blue. The sun is yellow. Here we go. There and
//! back again." repeated, and the needle sits at a sentence boundary at `depth` of the filler
//! (0 = right after the intro, 1 = right before the question). The number of filler sentences is
//! the largest whose **whole prompt, tokenised as one text** (with the tokenizer's special tokens)
//! has at most `length` tokens, so the prompt is exactly what a user would send and its length is
//! within one filler sentence of the request.
//!
//! * passkey: intro "There is an important info hidden inside a lot of irrelevant text. Find it
//!   and memorize them. I will quiz you about the important information there.", needle "The pass
//!   key is NNNNN. Remember it. NNNNN is the pass key." (5 random digits), question "What is the
//!   pass key? The pass key is".
//! * NIAH: intro (RULER's) "Some special magic numbers are hidden within the following text. Make
//!   sure to memorize it. I will quiz you about the numbers afterwards.", needle "One of the
//!   special magic numbers for {word} is: {7 digits}.", question "What is the special magic number
//!   for {word} mentioned in the provided text? The special magic number for {word} mentioned in
//!   the provided text is".
//!
//! A sample is correct when the answer digits appear in the decoded continuation. The random
//! values of a sample depend only on `(seed, length, depth, sample index)`, so every schedule sees
//! the same prompts and adding a cell does not change the others.

use crate::error::ToolError;
use crate::generate::generate_chunked;
use indexcache_config::IndexSchedule;
use indexcache_model::{DsaModel, SamplingParams};
use indexcache_ops::Backend;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use tokenizers::Tokenizer;

/// Longest prompt [`build_prompt`] builds (far beyond any DSA model's context).
pub const MAX_PROMPT_TOKENS: usize = 1 << 24;
const FILLER: [&str; 5] =
    ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."];
const PASSKEY_INTRO: &str = "There is an important info hidden inside a lot of irrelevant text. \
                             Find it and memorize them. I will quiz you about the important information there.";
const PASSKEY_QUESTION: &str = "What is the pass key? The pass key is";
const NIAH_INTRO: &str = "Some special magic numbers are hidden within the following text. \
                          Make sure to memorize it. I will quiz you about the numbers afterwards.";
/// Keys for NIAH needles: common, unambiguous English words.
const NIAH_WORDS: [&str; 48] = [
    "apple", "river", "candle", "garden", "pencil", "window", "mountain", "violin", "harbor", "lantern", "meadow",
    "compass", "blanket", "orchard", "thunder", "saddle", "pepper", "marble", "falcon", "biscuit", "ladder", "helmet",
    "island", "kettle", "feather", "tunnel", "castle", "banana", "mirror", "carpet", "anchor", "cabbage", "dolphin",
    "engine", "forest", "glacier", "hammer", "jacket", "lemon", "magnet", "needle", "oyster", "parrot", "quartz",
    "rocket", "sunset", "tiger", "walnut",
];

/// Which retrieval task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Passkey,
    Niah,
}

impl Task {
    /// Greedy tokens to decode by default: 8 for passkey (5 digits), 12 for NIAH (7 digits).
    pub fn default_max_new_tokens(self) -> usize {
        match self {
            Task::Passkey => 8,
            Task::Niah => 12,
        }
    }
}

impl FromStr for Task {
    type Err = ToolError;
    fn from_str(s: &str) -> Result<Self, ToolError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "passkey" => Ok(Task::Passkey),
            "niah" => Ok(Task::Niah),
            _ => Err(ToolError::Invalid(format!("unknown eval task {s:?} (expected passkey or niah)"))),
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Task::Passkey => "passkey",
            Task::Niah => "niah",
        })
    }
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalConfig {
    pub task: Task,
    /// Prompt lengths in tokens (upper bounds; each prompt is within one filler sentence below).
    pub lengths: Vec<usize>,
    /// Needle depths in [0, 1].
    pub depths: Vec<f64>,
    pub samples_per_cell: usize,
    pub seed: u64,
    pub max_new_tokens: usize,
}

impl EvalConfig {
    /// Defaults: lengths 1024/2048/4096, depths 0/0.25/0.5/0.75/1, 5 samples per cell, seed 0,
    /// the task's default decode length.
    pub fn new(task: Task) -> Self {
        Self {
            task,
            lengths: vec![1024, 2048, 4096],
            depths: vec![0.0, 0.25, 0.5, 0.75, 1.0],
            samples_per_cell: 5,
            seed: 0,
            max_new_tokens: task.default_max_new_tokens(),
        }
    }
}

/// One prompt, ready to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub text: String,
    /// `tokenizer.encode(text, add_special_tokens = true)`.
    pub ids: Vec<u32>,
    /// The digits that must appear in the continuation.
    pub answer: String,
    /// The needle sentence as it appears in `text`.
    pub needle: String,
    /// Index of the first token that overlaps the needle.
    pub needle_token: usize,
    /// Filler sentences before and after the needle.
    pub filler_before: usize,
    pub filler_after: usize,
}

/// The random values of one sample.
fn sample_seed(seed: u64, length: usize, depth: f64, sample: usize) -> u64 {
    let mut h = splitmix(seed ^ 0x5EED_1DEA_CACE_u64);
    for x in [length as u64, depth.to_bits(), sample as u64] {
        h = splitmix(h ^ x);
    }
    h
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Intro, needle, question and answer of one sample.
struct Parts {
    intro: &'static str,
    needle: String,
    question: String,
    answer: String,
}

fn parts(task: Task, rng_seed: u64) -> Parts {
    let r1 = splitmix(rng_seed);
    let r2 = splitmix(r1);
    match task {
        Task::Passkey => {
            let key = (10_000 + r1 % 90_000).to_string();
            Parts {
                intro: PASSKEY_INTRO,
                needle: format!("The pass key is {key}. Remember it. {key} is the pass key."),
                question: PASSKEY_QUESTION.to_string(),
                answer: key,
            }
        }
        Task::Niah => {
            let number = (1_000_000 + r1 % 9_000_000).to_string();
            let word = NIAH_WORDS[(r2 % NIAH_WORDS.len() as u64) as usize];
            Parts {
                intro: NIAH_INTRO,
                needle: format!("One of the special magic numbers for {word} is: {number}."),
                question: format!(
                    "What is the special magic number for {word} mentioned in the provided text? \
                     The special magic number for {word} mentioned in the provided text is"
                ),
                answer: number,
            }
        }
    }
}

/// The prompt text with `n` filler sentences and the needle after `before` of them; returns the
/// text and the byte offset of the needle.
fn assemble(p: &Parts, n: usize, before: usize) -> (String, usize) {
    let filler = |range: std::ops::Range<usize>| range.map(|i| FILLER[i % FILLER.len()]).collect::<Vec<_>>().join(" ");
    let mut text = String::from(p.intro);
    let push = |s: &str, text: &mut String| {
        if !s.is_empty() {
            text.push('\n');
            text.push_str(s);
        }
    };
    push(&filler(0..before), &mut text);
    text.push('\n');
    let at = text.len();
    text.push_str(&p.needle);
    push(&filler(before..n), &mut text);
    push(&p.question, &mut text);
    (text, at)
}

fn depth_index(depth: f64, n: usize) -> usize {
    ((depth * n as f64).round() as usize).min(n)
}

fn check_depth(depth: f64) -> Result<(), ToolError> {
    if depth.is_finite() && (0.0..=1.0).contains(&depth) {
        Ok(())
    } else {
        Err(ToolError::Invalid(format!("needle depth {depth} is outside [0, 1]")))
    }
}

fn encode(tok: &Tokenizer, text: &str) -> Result<tokenizers::Encoding, ToolError> {
    tok.encode(text, true).map_err(|e| ToolError::Invalid(format!("tokenizing the prompt: {e}")))
}

/// Builds the prompt of sample `sample` of cell `(length, depth)` for `seed` (see the module
/// documentation). Errors when even a prompt without filler exceeds `length` tokens.
pub fn build_prompt(
    tokenizer: &Tokenizer,
    task: Task,
    length: usize,
    depth: f64,
    seed: u64,
    sample: usize,
) -> Result<Prompt, ToolError> {
    check_depth(depth)?;
    if length > MAX_PROMPT_TOKENS {
        return Err(ToolError::Invalid(format!(
            "prompt length {length} exceeds the limit of {MAX_PROMPT_TOKENS} tokens"
        )));
    }
    let p = parts(task, sample_seed(seed, length, depth, sample));
    let build = |n: usize| -> Result<(String, usize, tokenizers::Encoding), ToolError> {
        let (text, at) = assemble(&p, n, depth_index(depth, n));
        let enc = encode(tokenizer, &text)?;
        Ok((text, at, enc))
    };

    let base = build(0)?;
    if base.2.len() > length {
        return Err(ToolError::Invalid(format!(
            "{task} prompt length {length} is too short: without any filler the prompt already has {} tokens",
            base.2.len()
        )));
    }
    // Tokens per filler sentence, from one tokenised cycle of the filler.
    let cycle = encode(tokenizer, &FILLER.join(" "))?.len().max(1) as f64 / FILLER.len() as f64;
    // Largest n whose prompt fits: `lo` fits, `hi` (if known) does not; guesses extrapolate from
    // the last measured length and stay strictly inside (lo, hi).
    let (mut lo, mut lo_len, mut best) = (0usize, base.2.len(), base);
    let mut hi: Option<usize> = None;
    let mut guess = ((length - lo_len) as f64 / cycle).floor() as usize;
    loop {
        let upper = hi.map_or(usize::MAX, |h| h - 1);
        let n = guess.clamp(lo + 1, upper.max(lo + 1));
        if hi.is_some_and(|h| n >= h) {
            break;
        }
        let cand = build(n)?;
        let len = cand.2.len();
        if len <= length {
            lo = n;
            lo_len = len;
            best = cand;
            guess = n + (((length - lo_len) as f64 / cycle).floor() as usize).max(1);
        } else {
            hi = Some(n);
            guess = n.saturating_sub((((len - length) as f64 / cycle).ceil() as usize).max(1));
        }
        if hi == Some(lo + 1) {
            break;
        }
    }
    let n = lo;
    let before = depth_index(depth, n);
    let (text, at, enc) = best;
    let needle_token = enc.get_offsets().iter().position(|&(_, end)| end > at).unwrap_or(0);
    Ok(Prompt {
        ids: enc.get_ids().to_vec(),
        text,
        answer: p.answer,
        needle: p.needle,
        needle_token,
        filler_before: before,
        filler_after: n - before,
    })
}

/// Correct / total.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Score {
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
}

impl Score {
    fn add(&mut self, ok: bool) {
        self.correct += usize::from(ok);
        self.total += 1;
        self.accuracy = self.correct as f64 / self.total as f64;
    }
}

/// One (length, depth) cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellReport {
    pub length: usize,
    pub depth: f64,
    #[serde(flatten)]
    pub score: Score,
    /// Token length of each sample's prompt.
    pub prompt_tokens: Vec<usize>,
}

/// All depths of one length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LengthReport {
    pub length: usize,
    #[serde(flatten)]
    pub score: Score,
    pub min_prompt_tokens: usize,
    pub max_prompt_tokens: usize,
}

/// One sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleResult {
    pub length: usize,
    pub depth: f64,
    pub sample: usize,
    pub prompt_tokens: usize,
    /// First token of the needle; `needle_token / prompt_tokens` is the depth in tokens.
    pub needle_token: usize,
    pub answer: String,
    /// The decoded continuation.
    pub output: String,
    pub correct: bool,
}

/// The result of [`run_eval`]; identical for identical inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub task: Task,
    /// The schedule evaluated.
    pub pattern: String,
    pub config: EvalConfig,
    /// Lengths outer, depths inner, in the order of the config.
    pub cells: Vec<CellReport>,
    pub per_length: Vec<LengthReport>,
    pub overall: Score,
    pub samples: Vec<SampleResult>,
}

fn validate(cfg: &EvalConfig, max_position: usize) -> Result<(), ToolError> {
    if cfg.lengths.is_empty() || cfg.depths.is_empty() || cfg.samples_per_cell == 0 {
        return Err(ToolError::Invalid("eval needs at least one length, one depth and one sample per cell".into()));
    }
    if cfg.max_new_tokens == 0 {
        return Err(ToolError::Invalid("max_new_tokens must be at least 1".into()));
    }
    for &d in &cfg.depths {
        check_depth(d)?;
    }
    for &l in &cfg.lengths {
        if l.saturating_add(cfg.max_new_tokens) > max_position {
            return Err(ToolError::Invalid(format!(
                "prompt length {l} + {} new tokens exceeds the model's max_position_embeddings {max_position} \
                 (longest prompt possible: {})",
                cfg.max_new_tokens,
                max_position.saturating_sub(cfg.max_new_tokens)
            )));
        }
    }
    Ok(())
}

/// Runs every (length, depth, sample) with `schedule`, greedy, one sequence at a time, each
/// prompt prefilled in chunks of `chunk` tokens. `progress(done, total)` is called after each
/// sample.
pub fn run_eval<B: Backend>(
    model: &DsaModel<B>,
    schedule: &IndexSchedule,
    tokenizer: &Tokenizer,
    cfg: &EvalConfig,
    chunk: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalReport, ToolError> {
    validate(cfg, model.config().max_position_embeddings)?;
    if schedule.len() != model.config().num_hidden_layers {
        return Err(ToolError::Invalid(format!(
            "schedule has {} layers but the model has {}",
            schedule.len(),
            model.config().num_hidden_layers
        )));
    }
    // Fail early on a length too short for the prompt template.
    let shortest = cfg.lengths.iter().copied().min().unwrap_or(0);
    build_prompt(tokenizer, cfg.task, shortest, cfg.depths[0], cfg.seed, 0)?;

    let total = cfg.lengths.len() * cfg.depths.len() * cfg.samples_per_cell;
    let mut done = 0;
    let mut cells = Vec::new();
    let mut samples = Vec::new();
    for &length in &cfg.lengths {
        for &depth in &cfg.depths {
            let mut cell = CellReport { length, depth, score: Score::default(), prompt_tokens: Vec::new() };
            for sample in 0..cfg.samples_per_cell {
                let prompt = build_prompt(tokenizer, cfg.task, length, depth, cfg.seed, sample)?;
                let mut cache = model.new_cache_with(schedule.clone(), prompt.ids.len() + cfg.max_new_tokens)?;
                let (new_ids, _) = generate_chunked(
                    model,
                    &mut cache,
                    &prompt.ids,
                    cfg.max_new_tokens,
                    SamplingParams::default(),
                    &[],
                    chunk,
                    |_| Ok::<(), ToolError>(()),
                )?;
                let output = tokenizer
                    .decode(&new_ids, true)
                    .map_err(|e| ToolError::Invalid(format!("decoding the continuation: {e}")))?;
                let correct = output.contains(&prompt.answer);
                cell.score.add(correct);
                cell.prompt_tokens.push(prompt.ids.len());
                samples.push(SampleResult {
                    length,
                    depth,
                    sample,
                    prompt_tokens: prompt.ids.len(),
                    needle_token: prompt.needle_token,
                    answer: prompt.answer,
                    output,
                    correct,
                });
                done += 1;
                progress(done, total);
            }
            cells.push(cell);
        }
    }

    let mut per_length = Vec::new();
    let mut overall = Score::default();
    for &length in &cfg.lengths {
        let mut score = Score::default();
        let (mut min_t, mut max_t) = (usize::MAX, 0);
        for s in samples.iter().filter(|s| s.length == length) {
            score.add(s.correct);
            overall.add(s.correct);
            min_t = min_t.min(s.prompt_tokens);
            max_t = max_t.max(s.prompt_tokens);
        }
        per_length.push(LengthReport { length, score, min_prompt_tokens: min_t, max_prompt_tokens: max_t });
    }
    Ok(EvalReport {
        task: cfg.task,
        pattern: schedule.to_pattern(),
        config: cfg.clone(),
        cells,
        per_length,
        overall,
        samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_index_bounds() {
        assert_eq!(depth_index(0.0, 10), 0);
        assert_eq!(depth_index(1.0, 10), 10);
        assert_eq!(depth_index(0.5, 10), 5);
        assert_eq!(depth_index(0.5, 0), 0);
    }

    #[test]
    fn assemble_layout() {
        let p = parts(Task::Passkey, 1);
        let (text, at) = assemble(&p, 3, 1);
        assert!(text.starts_with(PASSKEY_INTRO));
        assert_eq!(&text[at..at + p.needle.len()], p.needle);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [PASSKEY_INTRO, FILLER[0], p.needle.as_str(), "The sky is blue. The sun is yellow.", PASSKEY_QUESTION]
        );
        // Depth 0 and 1: no empty lines.
        let (t0, _) = assemble(&p, 2, 0);
        assert!(!t0.contains("\n\n"));
        let (t1, _) = assemble(&p, 2, 2);
        assert!(t1.ends_with(&format!("{}\n{}", p.needle, PASSKEY_QUESTION)));
    }

    #[test]
    fn answers_have_the_right_digits() {
        for s in 0..50 {
            let a = parts(Task::Passkey, s).answer;
            assert_eq!(a.len(), 5);
            let b = parts(Task::Niah, s).answer;
            assert_eq!(b.len(), 7);
        }
    }
}
