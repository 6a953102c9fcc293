//! Synthetic long-context retrieval: prompt construction and a smoke run on models/tiny-dsa.

use indexcache_config::IndexSchedule;
use indexcache_model::{DsaModel, LoadOptions};
use indexcache_ops::cpu::CpuBackend;
use indexcache_tools::eval::{EvalConfig, Task, build_prompt, run_eval};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

const PASSKEY_INTRO: &str = "There is an important info hidden inside a lot of irrelevant text. \
                             Find it and memorize them. I will quiz you about the important information there.";
const PASSKEY_QUESTION: &str = "What is the pass key? The pass key is";

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-dsa")
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(tiny().join("tokenizer.json")).unwrap()
}

/// Filler sentences in a block of text.
fn sentences(s: &str) -> usize {
    s.matches('.').count()
}

#[test]
fn passkey_needle_at_depths_0_half_1() {
    let tok = tokenizer();
    for length in [300, 512, 2000] {
        let p0 = build_prompt(&tok, Task::Passkey, length, 0.0, 7, 0).unwrap();
        let ph = build_prompt(&tok, Task::Passkey, length, 0.5, 7, 0).unwrap();
        let p1 = build_prompt(&tok, Task::Passkey, length, 1.0, 7, 0).unwrap();
        for p in [&p0, &ph, &p1] {
            // The needle carries the 5-digit answer twice, and the prompt is exactly its tokenisation.
            assert_eq!(p.answer.len(), 5);
            assert!(p.answer.chars().all(|c| c.is_ascii_digit()));
            assert_eq!(p.needle, format!("The pass key is {0}. Remember it. {0} is the pass key.", p.answer));
            assert_eq!(p.text.matches(&p.needle).count(), 1);
            assert_eq!(p.ids, tok.encode(p.text.as_str(), true).unwrap().get_ids().to_vec());
            assert!(p.text.starts_with(PASSKEY_INTRO) && p.text.ends_with(PASSKEY_QUESTION));
            // Within bounds: never above the request, at most a couple of filler sentences below.
            assert!(p.ids.len() <= length, "{} > {length}", p.ids.len());
            assert!(p.ids.len() + 16 >= length, "{} too far below {length}", p.ids.len());
            assert!(p.filler_before + p.filler_after > 0);
        }
        // Depth 0: right after the intro.
        assert!(p0.text.starts_with(&format!("{PASSKEY_INTRO}\n{}\n", p0.needle)));
        assert_eq!(p0.filler_before, 0);
        // Depth 1: right before the question.
        assert!(p1.text.ends_with(&format!("\n{}\n{PASSKEY_QUESTION}", p1.needle)));
        assert_eq!(p1.filler_after, 0);
        // Depth 0.5: the middle, in sentences and in tokens.
        assert!(ph.filler_before.abs_diff(ph.filler_after) <= 1, "{} vs {}", ph.filler_before, ph.filler_after);
        let (before, after) = ph.text.split_once(&ph.needle).unwrap();
        assert_eq!(sentences(before) - sentences(PASSKEY_INTRO), ph.filler_before);
        assert_eq!(sentences(after), ph.filler_after); // the question has no '.'
        let rel = ph.needle_token as f64 / ph.ids.len() as f64;
        assert!((0.4..0.6).contains(&rel), "needle at {rel} of the prompt");
        // needle_token is where the needle starts in the token sequence.
        assert_eq!(tok.decode(&p0.ids[..p0.needle_token], true).unwrap(), format!("{PASSKEY_INTRO}\n"));
        assert_eq!(tok.decode(&p1.ids[p1.needle_token..], true).unwrap(), format!("{}\n{PASSKEY_QUESTION}", p1.needle));
    }
}

#[test]
fn niah_prompt() {
    let tok = tokenizer();
    let p = build_prompt(&tok, Task::Niah, 600, 0.25, 3, 1).unwrap();
    assert_eq!(p.answer.len(), 7);
    let word = p.needle.strip_prefix("One of the special magic numbers for ").unwrap().split(' ').next().unwrap();
    assert_eq!(p.needle, format!("One of the special magic numbers for {word} is: {}.", p.answer));
    assert!(p.text.starts_with("Some special magic numbers are hidden within the following text."));
    assert!(p.text.ends_with(&format!(
        "\nWhat is the special magic number for {word} mentioned in the provided text? \
         The special magic number for {word} mentioned in the provided text is"
    )));
    assert!(p.ids.len() <= 600 && p.ids.len() + 16 >= 600);
    let n = p.filler_before + p.filler_after;
    assert_eq!(p.filler_before, (0.25 * n as f64).round() as usize);
}

#[test]
fn deterministic_with_the_seed() {
    let tok = tokenizer();
    let a: Vec<_> = (0..4).map(|s| build_prompt(&tok, Task::Passkey, 400, 0.5, 11, s).unwrap()).collect();
    let b: Vec<_> = (0..4).map(|s| build_prompt(&tok, Task::Passkey, 400, 0.5, 11, s).unwrap()).collect();
    assert_eq!(a, b);
    // Different samples and seeds draw different keys.
    let keys: std::collections::HashSet<&String> = a.iter().map(|p| &p.answer).collect();
    assert!(keys.len() > 1);
    let c: Vec<_> = (0..4).map(|s| build_prompt(&tok, Task::Passkey, 400, 0.5, 12, s).unwrap()).collect();
    assert_ne!(a.iter().map(|p| &p.answer).collect::<Vec<_>>(), c.iter().map(|p| &p.answer).collect::<Vec<_>>());
}

#[test]
fn prompt_errors() {
    let tok = tokenizer();
    let e = build_prompt(&tok, Task::Passkey, 20, 0.5, 0, 0).unwrap_err();
    assert!(e.to_string().contains("too short"), "{e}");
    for d in [-0.1, 1.5, f64::NAN] {
        let e = build_prompt(&tok, Task::Passkey, 400, d, 0, 0).unwrap_err();
        assert!(e.to_string().contains("outside [0, 1]"), "{e}");
    }
    let e = build_prompt(&tok, Task::Niah, usize::MAX, 0.5, 0, 0).unwrap_err();
    assert!(e.to_string().contains("exceeds the limit"), "{e}");
    assert_eq!("NIAH".parse::<Task>().unwrap(), Task::Niah);
    assert!("ruler".parse::<Task>().is_err());
}

/// Prefill chunk: longer than every prompt here (one pass), unless a test says otherwise.
const CHUNK: usize = 2048;

fn model() -> DsaModel<CpuBackend> {
    DsaModel::load(&tiny(), CpuBackend::new(), &LoadOptions::default(), &mut |_, _, _| {}).unwrap().0
}

#[test]
fn smoke_run_on_tiny_dsa() {
    let m = model();
    let tok = tokenizer();
    let schedule = IndexSchedule::from_pattern("FSSSFSSS", 8).unwrap();
    let cfg = EvalConfig {
        lengths: vec![200, 256],
        depths: vec![0.0, 1.0],
        samples_per_cell: 2,
        seed: 5,
        ..EvalConfig::new(Task::Passkey)
    };
    assert_eq!(cfg.max_new_tokens, 8);
    let mut calls = Vec::new();
    let r = run_eval(&m, &schedule, &tok, &cfg, CHUNK, &mut |d, t| calls.push((d, t))).unwrap();
    assert_eq!(calls, (1..=8).map(|d| (d, 8)).collect::<Vec<_>>());
    assert_eq!(r.task, Task::Passkey);
    assert_eq!(r.pattern, "FSSSFSSS");
    assert_eq!(r.cells.len(), 4);
    assert_eq!(r.samples.len(), 8);
    assert_eq!(r.per_length.len(), 2);
    assert_eq!(r.overall.total, 8);
    for c in &r.cells {
        assert_eq!(c.score.total, 2);
        assert_eq!(c.prompt_tokens.len(), 2);
        assert!(c.prompt_tokens.iter().all(|&t| t <= c.length && t + 16 >= c.length));
    }
    for l in &r.per_length {
        assert_eq!(l.score.total, 4);
        assert!(l.max_prompt_tokens <= l.length);
    }
    let correct: usize = r.samples.iter().filter(|s| s.correct).count();
    assert_eq!(r.overall.correct, correct);
    assert!((r.overall.accuracy - correct as f64 / 8.0).abs() < 1e-12);
    // Serialises.
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["cells"][0]["length"], 200);
    assert!(json["cells"][0]["accuracy"].is_number());
    // Same inputs, same report.
    let again = run_eval(&m, &schedule, &tok, &cfg, CHUNK, &mut |_, _| {}).unwrap();
    assert_eq!(r, again);
    // A prefill in chunks of 64 tokens (4 chunks per prompt) continues every prompt the same way.
    let chunked = run_eval(&m, &schedule, &tok, &cfg, 64, &mut |_, _| {}).unwrap();
    assert_eq!(r, chunked);
}

#[test]
fn eval_config_errors() {
    let m = model();
    let tok = tokenizer();
    let s = IndexSchedule::all_full(8);
    // tiny-dsa: max_position_embeddings 16384.
    let cfg = EvalConfig { lengths: vec![16380], ..EvalConfig::new(Task::Niah) };
    let e = run_eval(&m, &s, &tok, &cfg, CHUNK, &mut |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("max_position_embeddings 16384"), "{e}");
    let cfg = EvalConfig { lengths: vec![30], ..EvalConfig::new(Task::Niah) };
    assert!(run_eval(&m, &s, &tok, &cfg, CHUNK, &mut |_, _| {}).unwrap_err().to_string().contains("too short"));
    let cfg = EvalConfig { depths: vec![], ..EvalConfig::new(Task::Niah) };
    assert!(run_eval(&m, &s, &tok, &cfg, CHUNK, &mut |_, _| {}).is_err());
    let cfg = EvalConfig { lengths: vec![256], ..EvalConfig::new(Task::Niah) };
    let e = run_eval(&m, &IndexSchedule::all_full(4), &tok, &cfg, CHUNK, &mut |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("schedule has 4 layers"), "{e}");
}
