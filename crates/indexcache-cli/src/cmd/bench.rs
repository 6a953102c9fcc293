//! `indexcache bench`: time-to-first-token and decode speed per IndexCache pattern, with the
//! share of time spent in the lightning indexer. Works on a checkpoint or on seeded random
//! weights at any config's real shapes.

use crate::load::{Model, load_model, progress_bar};
use anyhow::{Context, Result, bail};
use indexcache_config::{IndexSchedule, ModelConfig, ScheduleOverride};
use indexcache_model::{DsaModel, ForwardOptions, IndexerSelection, Logits, StageTimes, parameter_count};
use indexcache_ops::cpu::CpuBackend;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory.
    #[arg(long, short = 'm', required_unless_present = "random_weights", conflicts_with = "random_weights")]
    pub model: Option<PathBuf>,
    /// A config.json: benchmark seeded random weights at its real shapes (no checkpoint needed).
    #[arg(long, value_name = "CONFIG.json")]
    pub random_weights: Option<PathBuf>,
    /// Prompt lengths, e.g. 1k,4k,16k (k = 1024).
    #[arg(long, default_value = "1k,4k")]
    pub contexts: String,
    /// Schedules: full (plain DSA), config (the checkpoint's), N/D (uniform keep), an F/S pattern,
    /// or a pattern file (search's pattern.json).
    #[arg(long, default_value = "full,1/2,1/4")]
    pub patterns: String,
    /// One-token decode steps after each prefill.
    #[arg(long, default_value_t = 32)]
    pub decode: usize,
    /// Timed runs per (context, pattern); the median prefill and decode are reported.
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// Seed of the random prompt (and of random weights).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Row {
    context: usize,
    pattern: String,
    schedule: String,
    full_layers: usize,
    prefill_s: f64,
    prefill_tok_s: f64,
    ttft_s: f64,
    decode_tok_s: f64,
    indexer_share_prefill: f64,
    indexer_share_decode: f64,
    /// Prefill seconds in the indexer / the rest of attention / the FFN.
    prefill_stages_s: [f64; 3],
    prefill_speedup: f64,
    decode_speedup: f64,
}

#[derive(Serialize)]
struct Report {
    model: String,
    backend: String,
    threads: usize,
    decode_steps: usize,
    rows: Vec<Row>,
}

/// "4k" → 4096, "1000" → 1000.
pub fn parse_len(s: &str) -> Result<usize> {
    let s = s.trim().to_ascii_lowercase();
    let (num, mul) = match s.strip_suffix('k') {
        Some(n) => (n, 1024),
        None => (s.as_str(), 1),
    };
    let n: usize = num.parse().with_context(|| format!("invalid length {s:?} (examples: 512, 4k)"))?;
    if n == 0 {
        bail!("length must be positive: {s:?}");
    }
    Ok(n * mul)
}

fn parse_pattern(spec: &str, model: &Model) -> Result<IndexSchedule> {
    let n = model.config().num_hidden_layers;
    let o = match spec.trim() {
        "full" | "off" => ScheduleOverride::Off,
        "config" => return Ok(model.schedule().clone()),
        s if std::path::Path::new(s).is_file() => ScheduleOverride::Pattern(crate::args::pattern_arg(s)?),
        s if s.contains('/') => ScheduleOverride::parse_keep(s)?,
        s => ScheduleOverride::Pattern(s.to_string()),
    };
    Ok(o.apply(n)?)
}

fn load(a: &Args) -> Result<(Model, String)> {
    if let Some(cfg_path) = &a.random_weights {
        let cfg = ModelConfig::from_file(cfg_path)?;
        let bytes = parameter_count(&cfg) * 4;
        if let Some(avail) = mem_available()
            && bytes > avail
        {
            bail!(
                "{}: random f32 weights need {:.1} GiB but only {:.1} GiB of memory is available",
                cfg_path.display(),
                bytes as f64 / (1u64 << 30) as f64,
                avail as f64 / (1u64 << 30) as f64
            );
        }
        let schedule = cfg.schedule.clone();
        let model = DsaModel::random(cfg, CpuBackend::new(), schedule, a.seed)?;
        Ok((model, format!("random weights, {}", cfg_path.display())))
    } else {
        let dir = a.model.as_ref().expect("clap: model or random_weights");
        Ok((load_model(dir, None, IndexerSelection::All)?, dir.display().to_string()))
    }
}

fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn share(t: &StageTimes, total: f64) -> f64 {
    if total > 0.0 { t.indexer.as_secs_f64() / total } else { 0.0 }
}

pub fn run(a: Args) -> Result<()> {
    let contexts: Vec<usize> = a.contexts.split(',').map(parse_len).collect::<Result<_>>()?;
    let (model, label) = load(&a)?;
    let cfg = model.config().clone();
    let patterns: Vec<(String, IndexSchedule)> = a
        .patterns
        .split(',')
        .map(|p| Ok((p.trim().to_string(), parse_pattern(p, &model).with_context(|| format!("--patterns {p:?}"))?)))
        .collect::<Result<_>>()?;
    for &c in &contexts {
        if c + a.decode > cfg.max_position_embeddings {
            bail!(
                "context {c} + {} decode steps exceeds max_position_embeddings {}",
                a.decode,
                cfg.max_position_embeddings
            );
        }
    }
    let bar = progress_bar("bench", "{msg}", (contexts.len() * patterns.len()) as u64);
    // Warm-up: first-touch page faults and thread-pool start-up stay out of the numbers.
    let warm: Vec<u32> = (0..contexts[0].min(256) as u32).map(|i| i % cfg.vocab_size as u32).collect();
    measure(&model, &patterns[0].1, &warm, a.decode.min(2))?;
    let mut rows: Vec<Row> = Vec::new();
    for &ctx in &contexts {
        let prompt = synthetic_prompt(ctx, cfg.vocab_size, a.seed);
        let mut baseline: Option<(f64, f64)> = None;
        for (spec, schedule) in &patterns {
            bar.set_message(format!("{ctx} tokens, {spec}"));
            let mut runs: Vec<Measurement> =
                (0..a.repeats.max(1)).map(|_| measure(&model, schedule, &prompt, a.decode)).collect::<Result<_>>()?;
            runs.sort_by(|x, y| x.prefill.total_cmp(&y.prefill));
            let mid = runs.len() / 2;
            let (prefill, ttft, out_times) = (runs[mid].prefill, runs[mid].ttft, runs[mid].prefill_times);
            runs.sort_by(|x, y| x.decode.total_cmp(&y.decode));
            let (decode, dec_times) = (runs[mid].decode, runs[mid].decode_times);
            let decode_tok_s = if a.decode > 0 { a.decode as f64 / decode } else { 0.0 };
            let (base_prefill, base_decode) = *baseline.get_or_insert((prefill, decode_tok_s));
            rows.push(Row {
                context: ctx,
                pattern: spec.clone(),
                schedule: schedule.to_pattern(),
                full_layers: schedule.num_full(),
                prefill_s: prefill,
                prefill_tok_s: ctx as f64 / prefill,
                ttft_s: ttft,
                decode_tok_s,
                indexer_share_prefill: share(&out_times, prefill),
                indexer_share_decode: share(&dec_times, decode),
                prefill_stages_s: [
                    out_times.indexer.as_secs_f64(),
                    out_times.attention.as_secs_f64(),
                    out_times.ffn.as_secs_f64(),
                ],
                prefill_speedup: base_prefill / prefill,
                decode_speedup: if base_decode > 0.0 { decode_tok_s / base_decode } else { 0.0 },
            });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let report = Report {
        model: label,
        backend: indexcache_ops::Backend::name(model.backend()),
        threads: rayon_threads(),
        decode_steps: a.decode,
        rows,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("model: {}; backend: {}; decode steps: {}", report.model, report.backend, report.decode_steps);
    println!(
        "| context | pattern | schedule | prefill s | prefill tok/s | decode tok/s | indexer share (prefill / decode) | speedup (prefill / decode) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &report.rows {
        println!(
            "| {} | {} | {} | {:.3} | {:.1} | {:.2} | {:.0}% / {:.0}% | {:.2}x / {:.2}x |",
            r.context,
            r.pattern,
            r.schedule,
            r.prefill_s,
            r.prefill_tok_s,
            r.decode_tok_s,
            100.0 * r.indexer_share_prefill,
            100.0 * r.indexer_share_decode,
            r.prefill_speedup,
            r.decode_speedup
        );
    }
    Ok(())
}

/// A fixed pseudo-random prompt (an LCG over the vocabulary): the same for every schedule.
pub fn synthetic_prompt(len: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// One prefill of `prompt` and `decode` greedy steps on a fresh cache.
pub struct Measurement {
    pub prefill: f64,
    pub ttft: f64,
    pub decode: f64,
    pub prefill_times: StageTimes,
    pub decode_times: StageTimes,
}

pub fn measure(model: &Model, schedule: &IndexSchedule, prompt: &[u32], decode: usize) -> Result<Measurement> {
    let mut cache = model.new_cache_with(schedule.clone(), prompt.len() + decode)?;
    let t0 = Instant::now();
    let out = model.forward(prompt, &mut cache, &ForwardOptions { logits: Logits::Last, capture_topk: false })?;
    let prefill = t0.elapsed().as_secs_f64();
    let mut next = indexcache_model::sampler::argmax(&out.logits);
    let ttft = t0.elapsed().as_secs_f64();
    let mut decode_times = StageTimes::default();
    let t1 = Instant::now();
    for _ in 0..decode {
        let o = model.forward(&[next], &mut cache, &ForwardOptions::default())?;
        decode_times.add(&o.times);
        next = indexcache_model::sampler::argmax(&o.logits);
    }
    Ok(Measurement { prefill, ttft, decode: t1.elapsed().as_secs_f64(), prefill_times: out.times, decode_times })
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
