//! `indexcache bench`: prefill time, time-to-first-token and decode speed per IndexCache pattern
//! and context, with the share of time spent in the lightning indexer and the peak memory.
//! Works on a checkpoint or on seeded random weights at any config's real shapes (generated where
//! they live: on the GPU for `--device cuda`).
//!
//! Per (context, pattern): one cache of `context + decode` tokens, allocated after the previous
//! one was dropped (so a 200K all-Full row and a 200K 1/4 row each need only their own cache), a
//! prefill of a fixed pseudo-random prompt in `--chunk` chunks, then `--decode` greedy one-token
//! steps; `--repeats` times, the median reported. Host clocks are read only after
//! `Backend::synchronize`, so asynchronous launches are counted; the stage split comes from the
//! backend's marks (CUDA events on a GPU).

use crate::args::{human_bytes, parse_lens, pattern_arg};
use crate::load::{ExecArgs, load_model, progress_bar, with_backend};
use anyhow::{Context, Result, bail};
use indexcache_config::{IndexSchedule, ModelConfig, ScheduleOverride};
use indexcache_model::{
    Cache, DsaModel, ForwardOptions, ForwardOutput, IndexerSelection, Logits, StageTimes, cache_bytes_per_token,
    parameter_count, sampler::argmax,
};
use indexcache_ops::Backend;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory.
    #[arg(long, short = 'm', required_unless_present = "random_weights", conflicts_with = "random_weights")]
    pub model: Option<PathBuf>,
    /// A config.json: benchmark seeded random weights at its real shapes (no checkpoint needed;
    /// generated on the device).
    #[arg(long, value_name = "CONFIG.json")]
    pub random_weights: Option<PathBuf>,
    /// With --random-weights: bf16 rounds the matrices to bf16, as a bf16 checkpoint holds them
    /// (the CPU then keeps them in bf16, half the bytes; generated on the host).
    #[arg(long, value_parser = ["f32", "bf16"], default_value = "f32", requires = "random_weights")]
    pub random_dtype: String,
    /// Prompt lengths: token counts, or multiples of 1024 with a k suffix (1k,4k,16k; note "10k"
    /// is 10240: write 10000 for ten thousand).
    #[arg(long, default_value = "1k,4k")]
    pub contexts: String,
    /// Schedules: full (plain DSA), config (the checkpoint's), N/D (uniform keep), an F/S pattern,
    /// or a pattern file (search's pattern.json). Speedups are against the all-Full row.
    #[arg(long, default_value = "full,1/2,1/4")]
    pub patterns: String,
    /// One-token decode steps after each prefill (0: prefill only).
    #[arg(long, default_value_t = 32)]
    pub decode: usize,
    /// Timed runs per (context, pattern); the median prefill and decode are reported.
    #[arg(long, default_value_t = 1, value_parser = crate::load::positive)]
    pub repeats: usize,
    /// Pick each greedy token on the host from the downloaded logits (`[vocab]` per step) instead
    /// of on the device (`Backend::argmax_rows`, the default): the older decode loop, for
    /// comparison.
    #[arg(long)]
    pub host_argmax: bool,
    /// Seed of the random prompt (and of random weights).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the report as JSON to FILE (the table is still printed), or, without FILE, print JSON
    /// instead of the table.
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub exec: ExecArgs,
}

#[derive(Serialize)]
struct Row {
    context: usize,
    pattern: String,
    schedule: String,
    full_layers: usize,
    /// `null` when the row ran; otherwise why it failed (e.g. out of device memory).
    error: Option<String>,
    prefill_s: f64,
    prefill_tok_s: f64,
    /// Prefill + picking the first token.
    ttft_s: f64,
    /// 1 / the median decode step (each step: one token through the model and its logits back).
    decode_tok_s: Option<f64>,
    decode_ms_per_token: Option<f64>,
    indexer_share_prefill: f64,
    indexer_share_decode: Option<f64>,
    /// Per decode step issued back to back: host ms to issue it, and ms until the device is done
    /// (issue ≈ done: the loop is bound by launching, not by the GPU).
    decode_issue_ms: Option<f64>,
    decode_done_ms: Option<f64>,
    /// Prefill seconds in the indexer / the rest of attention / the FFN (device time).
    prefill_stages_s: [f64; 3],
    /// Decode seconds in the indexer / the rest of attention / the FFN, over the steps timed with
    /// stage marks (up to 8).
    decode_stages_s: [f64; 3],
    /// Cache bytes allocated for this row (`context + decode` tokens).
    cache_bytes: u64,
    /// Most memory in use during this row, weights included: the device's allocations on a GPU,
    /// the process's resident set on the CPU; `null` where it cannot be read.
    peak_memory_bytes: Option<u64>,
    /// Against the all-Full row of the same context (`null` without one).
    prefill_speedup: Option<f64>,
    decode_speedup: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    model: String,
    backend: String,
    dtype: &'static str,
    chunk: usize,
    threads: usize,
    decode_steps: usize,
    repeats: usize,
    /// Memory in use after loading (mostly the weights): the device's allocations on a GPU, the
    /// process's resident set on the CPU; `null` where it cannot be read.
    weights_bytes: Option<u64>,
    rows: Vec<Row>,
}

fn parse_pattern<B: Backend>(spec: &str, model: &DsaModel<B>) -> Result<IndexSchedule> {
    let n = model.config().num_hidden_layers;
    let o = match spec.trim() {
        "full" | "off" => ScheduleOverride::Off,
        "config" => return Ok(model.schedule().clone()),
        s if std::path::Path::new(s).is_file() => ScheduleOverride::Pattern(pattern_arg(s)?),
        s if s.contains('/') => ScheduleOverride::parse_keep(s)?,
        s => ScheduleOverride::Pattern(s.to_string()),
    };
    Ok(o.apply(n)?)
}

/// Random weights are generated where they live: the host for the cpu (checked against
/// MemAvailable), the device for a GPU (checked against its free memory).
fn check_weights_fit<B: Backend>(cfg: &ModelConfig, backend: &B, path: &std::path::Path) -> Result<()> {
    let bytes = parameter_count(cfg) * backend.dtype().size() as u64;
    let m = backend.memory();
    let (avail, what) = match m.total {
        Some(total) => (Some(total.saturating_sub(m.current)), "free device memory"),
        None => (indexcache_tools::host_mem_available(), "available host memory"),
    };
    if let Some(avail) = avail
        && bytes > avail
    {
        bail!(
            "{}: random {} weights need {} but only {} of {what} is left",
            path.display(),
            backend.dtype().name(),
            human_bytes(bytes),
            human_bytes(avail)
        );
    }
    Ok(())
}

fn load<B: Backend>(a: &Args, backend: B) -> Result<(DsaModel<B>, String)> {
    match (&a.random_weights, &a.model) {
        (Some(cfg_path), _) => {
            let cfg = ModelConfig::from_file(cfg_path)?;
            check_weights_fit(&cfg, &backend, cfg_path)?;
            let t0 = Instant::now();
            let schedule = cfg.schedule.clone();
            let mut model = match a.random_dtype.as_str() {
                "bf16" => DsaModel::random_bf16(cfg, backend, schedule, a.seed),
                _ => DsaModel::random(cfg, backend, schedule, a.seed),
            }
            .with_context(|| format!("random weights for {}", cfg_path.display()))?;
            a.exec.configure(&mut model)?;
            model.backend().synchronize()?;
            tracing::info!("random weights in {:.2}s on {}", t0.elapsed().as_secs_f64(), model.backend().name());
            Ok((model, format!("random {} weights, {}", a.random_dtype, cfg_path.display())))
        }
        (None, Some(dir)) => {
            Ok((load_model(dir, backend, None, IndexerSelection::All, &a.exec)?, dir.display().to_string()))
        }
        (None, None) => bail!("give --model DIR or --random-weights CONFIG.json"),
    }
}

pub fn run(a: Args) -> Result<()> {
    let contexts = parse_lens(&a.contexts).context("--contexts")?;
    if contexts.is_empty() {
        bail!("--contexts: no context length given");
    }
    with_backend!(a.exec.backend()?, |b| run_with(load(&a, b)?, &a, &contexts))
}

fn run_with<B: Backend>((model, label): (DsaModel<B>, String), a: &Args, contexts: &[usize]) -> Result<()> {
    let b = model.backend();
    let cfg = model.config().clone();
    let chunk = a.exec.chunk(b);
    let patterns: Vec<(String, IndexSchedule)> = a
        .patterns
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| Ok((p.trim().to_string(), parse_pattern(p, &model).with_context(|| format!("--patterns {p:?}"))?)))
        .collect::<Result<_>>()?;
    if patterns.is_empty() {
        bail!("--patterns: no pattern given");
    }
    for &c in contexts {
        if c + a.decode > cfg.max_position_embeddings {
            bail!(
                "context {c} + {} decode steps exceeds max_position_embeddings {}",
                a.decode,
                cfg.max_position_embeddings
            );
        }
    }
    b.synchronize()?;
    let weights_bytes = Some(b.memory().current).filter(|&c| c > 0);
    let bar = progress_bar("bench", "{msg}", (contexts.len() * patterns.len()) as u64);
    // Warm-up (kernel compilation, first-touch page faults, thread-pool start-up stay out of the
    // numbers), on a cache of its own, dropped before the first row.
    {
        // As long as the first row (up to 8K), so every kernel variant that row takes (chosen by
        // length) is compiled and loaded before it is timed.
        let warm: Vec<u32> = synthetic_prompt(contexts[0].min(8192), cfg.vocab_size, a.seed ^ 1);
        let mut cache = model.new_cache_with(patterns[0].1.clone(), warm.len() + 2)?;
        measure(&model, &mut cache, &warm, a.decode.min(2), chunk, a.host_argmax)?;
    }
    let mut rows: Vec<Row> = Vec::new();
    for &ctx in contexts {
        let prompt = synthetic_prompt(ctx, cfg.vocab_size, a.seed);
        let first = rows.len();
        for (spec, schedule) in &patterns {
            bar.set_message(format!("{ctx} tokens, {spec}"));
            let row = bench_row(&model, schedule, &prompt, a, chunk).unwrap_or_else(|e| {
                let msg = format!("{e:#}");
                bar.println(format!("context {ctx}, {spec}: failed: {msg}"));
                failed_row(ctx, schedule, msg)
            });
            if row.error.is_none() {
                // One line per finished row, so a run cut short still reports what it measured.
                bar.println(format!(
                    "context {ctx}, {spec}: prefill {:.3} s (indexer {:.0}%, stages {:.2}/{:.2}/{:.2} s), decode {} tok/s (issue/done ms per step {}), peak {:.1} GiB",
                    row.prefill_s,
                    row.indexer_share_prefill * 100.0,
                    row.prefill_stages_s[0],
                    row.prefill_stages_s[1],
                    row.prefill_stages_s[2],
                    row.decode_tok_s.map_or("-".into(), |v| format!("{v:.1}")),
                    row.decode_issue_ms.zip(row.decode_done_ms).map_or("-".into(), |(i, d)| format!("{i:.2}/{d:.2}")),
                    row.peak_memory_bytes.unwrap_or(0) as f64 / (1u64 << 30) as f64,
                ));
            }
            rows.push(Row { pattern: spec.clone(), ..row });
            bar.inc(1);
        }
        speedups(&mut rows[first..], cfg.num_hidden_layers);
    }
    bar.finish_and_clear();
    let report = Report {
        model: label,
        backend: b.name(),
        dtype: b.dtype().name(),
        chunk,
        threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        decode_steps: a.decode,
        repeats: a.repeats,
        weights_bytes,
        rows,
    };
    let failed = report.rows.iter().filter(|r| r.error.is_some()).count();
    let json = serde_json::to_string_pretty(&report)?;
    match a.json.as_deref() {
        Some(p) if p.as_os_str() == "-" => println!("{json}"),
        Some(p) => {
            crate::output::write_atomic(p, (json + "\n").as_bytes())?;
            print_table(&report);
            println!("wrote {}", p.display());
        }
        None => print_table(&report),
    }
    if failed > 0 {
        bail!("{failed} of {} rows failed (see the error column)", report.rows.len());
    }
    Ok(())
}

/// One (context, schedule) row: a fresh cache (dropped on return), `repeats` measurements.
fn bench_row<B: Backend>(
    model: &DsaModel<B>,
    schedule: &IndexSchedule,
    prompt: &[u32],
    a: &Args,
    chunk: usize,
) -> Result<Row> {
    let b = model.backend();
    let ctx = prompt.len();
    b.synchronize()?;
    b.reset_peak_memory();
    let mut cache = model.new_cache_with(schedule.clone(), ctx + a.decode)?;
    let mut runs: Vec<Measurement> = (0..a.repeats.max(1))
        .map(|_| measure(model, &mut cache, prompt, a.decode, chunk, a.host_argmax))
        .collect::<Result<_>>()?;
    b.synchronize()?;
    let peak = b.memory().peak;
    drop(cache);
    let mid = runs.len() / 2;
    runs.sort_by(|x, y| x.prefill.total_cmp(&y.prefill));
    let (prefill, ttft, p_times) = (runs[mid].prefill, runs[mid].ttft, runs[mid].prefill_times);
    runs.sort_by(|x, y| x.decode_step_median.total_cmp(&y.decode_step_median));
    let m = &runs[mid];
    let (step, d_times, timed) = (m.decode_step_median, m.decode_times, m.decode_timed);
    let has_decode = a.decode > 0 && step > 0.0;
    let cache_f32 = cache_bytes_per_token(model.config(), schedule).engine_f32 as u64;
    Ok(Row {
        context: ctx,
        pattern: String::new(),
        schedule: schedule.to_pattern(),
        full_layers: schedule.num_full(),
        error: None,
        prefill_s: prefill,
        prefill_tok_s: ctx as f64 / prefill,
        ttft_s: ttft,
        // One token per step: 1 / the median step time.
        decode_tok_s: has_decode.then(|| 1.0 / step),
        decode_ms_per_token: has_decode.then_some(1e3 * step),
        indexer_share_prefill: share(&p_times, prefill),
        indexer_share_decode: (has_decode && timed > 0.0).then(|| share(&d_times, timed)),
        decode_issue_ms: m.decode_issue.map(|(i, _)| 1e3 * i),
        decode_done_ms: m.decode_issue.map(|(_, d)| 1e3 * d),
        prefill_stages_s: stages(&p_times),
        decode_stages_s: stages(&d_times),
        cache_bytes: cache_f32 / 4 * b.dtype().size() as u64 * (ctx + a.decode) as u64,
        peak_memory_bytes: Some(peak).filter(|&p| p > 0),
        prefill_speedup: None,
        decode_speedup: None,
    })
}

fn failed_row(ctx: usize, schedule: &IndexSchedule, error: String) -> Row {
    Row {
        context: ctx,
        pattern: String::new(),
        schedule: schedule.to_pattern(),
        full_layers: schedule.num_full(),
        error: Some(error),
        prefill_s: f64::NAN,
        prefill_tok_s: f64::NAN,
        ttft_s: f64::NAN,
        decode_tok_s: None,
        decode_ms_per_token: None,
        indexer_share_prefill: f64::NAN,
        indexer_share_decode: None,
        decode_issue_ms: None,
        decode_done_ms: None,
        prefill_stages_s: [f64::NAN; 3],
        decode_stages_s: [f64::NAN; 3],
        cache_bytes: 0,
        peak_memory_bytes: None,
        prefill_speedup: None,
        decode_speedup: None,
    }
}

/// Speedups of one context's rows against its (first) all-Full row that ran.
fn speedups(rows: &mut [Row], layers: usize) {
    let Some((p, d)) =
        rows.iter().find(|r| r.full_layers == layers && r.error.is_none()).map(|r| (r.prefill_s, r.decode_tok_s))
    else {
        return;
    };
    for r in rows.iter_mut().filter(|r| r.error.is_none()) {
        r.prefill_speedup = Some(p / r.prefill_s);
        r.decode_speedup = match (r.decode_tok_s, d) {
            (Some(x), Some(base)) if base > 0.0 => Some(x / base),
            _ => None,
        };
    }
}

fn share(t: &StageTimes, total: f64) -> f64 {
    if total > 0.0 { t.indexer.as_secs_f64() / total } else { 0.0 }
}

fn stages(t: &StageTimes) -> [f64; 3] {
    [t.indexer.as_secs_f64(), t.attention.as_secs_f64(), t.ffn.as_secs_f64()]
}

fn print_table(r: &Report) {
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("—".to_string(), f);
    println!(
        "model: {}; backend: {}; chunk {}; decode steps: {}; repeats: {}{}",
        r.model,
        r.backend,
        r.chunk,
        r.decode_steps,
        r.repeats,
        r.weights_bytes.map_or(String::new(), |w| format!("; weights {}", human_bytes(w)))
    );
    println!(
        "| context | pattern | schedule | prefill s | TTFT s | prefill tok/s | decode tok/s | indexer share (prefill / decode) | peak memory | speedup (prefill / decode) |"
    );
    println!("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for row in &r.rows {
        if let Some(e) = &row.error {
            println!("| {} | {} | {} | failed: {e} | | | | | | |", row.context, row.pattern, row.schedule);
            continue;
        }
        println!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.1} | {} | {:.0}% / {} | {} | {} / {} |",
            row.context,
            row.pattern,
            row.schedule,
            row.prefill_s,
            row.ttft_s,
            row.prefill_tok_s,
            opt(row.decode_tok_s, &|v| format!("{v:.2}")),
            100.0 * row.indexer_share_prefill,
            opt(row.indexer_share_decode, &|v| format!("{:.0}%", 100.0 * v)),
            row.peak_memory_bytes.map_or("—".to_string(), human_bytes),
            opt(row.prefill_speedup, &|v| format!("{v:.2}x")),
            opt(row.decode_speedup, &|v| format!("{v:.2}x")),
        );
    }
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

/// One prefill of `prompt` and `decode` greedy steps.
pub struct Measurement {
    /// Seconds to the prefill's last logits.
    pub prefill: f64,
    /// Seconds to the first token (prefill + sampling it).
    pub ttft: f64,
    /// Median seconds of one of those steps (robust to the odd slow step of a launch-bound loop).
    pub decode_step_median: f64,
    pub prefill_times: StageTimes,
    /// Stage times of the few steps run with stage marks on, and their wall seconds.
    pub decode_times: StageTimes,
    pub decode_timed: f64,
    /// Per step, seconds for the host to issue a step without waiting for it, and seconds until the
    /// device finished (a few steps with no logits read back): issue ≈ done means launch-bound.
    pub decode_issue: Option<(f64, f64)>,
}

impl Measurement {
    /// Decode tokens per second: one token per step, 1 / the median step.
    pub fn decode_tok_s(&self) -> f64 {
        if self.decode_step_median > 0.0 { 1.0 / self.decode_step_median } else { 0.0 }
    }
}

/// Prefill `prompt` into `cache` (cleared first; capacity ≥ prompt + decode) in chunks of
/// `chunk` tokens, then `decode` greedy one-token steps: most of them with stage marks off (the
/// tok/s), up to 8 with marks on (the stage shares) and up to 4 issued back to back without
/// reading logits (host issue time against device time). Host clocks are read after
/// [`Backend::synchronize`], so queued device work is counted. Greedy tokens are picked by the
/// backend (`Logits::Greedy`: only the token comes back), or with `host_argmax` on the host from
/// the downloaded logits.
pub fn measure<B: Backend>(
    model: &DsaModel<B>,
    cache: &mut Cache<B>,
    prompt: &[u32],
    decode: usize,
    chunk: usize,
    host_argmax: bool,
) -> Result<Measurement> {
    let b = model.backend();
    let step = ForwardOptions { logits: if host_argmax { Logits::Last } else { Logits::Greedy }, capture_topk: false };
    let pick = |o: &ForwardOutput| -> Result<u32> {
        match host_argmax {
            true => Ok(argmax(&o.logits)),
            false => o.tokens.first().copied().context("the forward pass returned no token"),
        }
    };
    cache.clear();
    model.set_stage_timing(true);
    b.synchronize()?;
    let t0 = Instant::now();
    let out = model.forward_chunked(prompt, cache, &step, chunk)?;
    b.synchronize()?;
    let prefill = t0.elapsed().as_secs_f64();
    let mut next = pick(&out)?;
    let ttft = t0.elapsed().as_secs_f64();
    let (n_issue, n_timed) = ((decode / 8).min(4), (decode / 4).min(8));
    let n_speed = decode - n_issue - n_timed;

    // Speed: no stage marks (every event is host work in a launch-bound loop).
    model.set_stage_timing(false);
    let mut steps = Vec::with_capacity(n_speed);
    // INDEXCACHE_PROFILE_DECODE=N: an attached profiler collects decode steps 2..2+N (the first
    // may record the step), e.g. `ncu --profile-from-start off --graph-profiling node`.
    let profile: usize = std::env::var("INDEXCACHE_PROFILE_DECODE").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let speed = (|| -> Result<()> {
        for i in 0..n_speed {
            if profile > 0 && (i == 1 || i == 1 + profile) {
                b.profiler(i == 1)?;
            }
            let ts = Instant::now();
            let o = model.forward(&[next], cache, &step)?;
            next = pick(&o)?; // reading the token (or the logits) back waits for the step
            steps.push(ts.elapsed().as_secs_f64());
        }
        Ok(())
    })();
    model.set_stage_timing(true);
    speed?;
    steps.sort_by(f64::total_cmp);
    let decode_step_median = steps.get(steps.len() / 2).copied().unwrap_or(0.0);

    // Stage shares: a few steps with marks on.
    let mut decode_times = StageTimes::default();
    let t2 = Instant::now();
    for _ in 0..n_timed {
        let o = model.forward(&[next], cache, &step)?;
        decode_times.add(&o.times);
        next = pick(&o)?;
    }
    let decode_timed = t2.elapsed().as_secs_f64();

    // Launch-bound or device-bound: issue steps back to back without reading anything back.
    let mut decode_issue = None;
    if n_issue > 0 {
        model.set_stage_timing(false);
        b.synchronize()?;
        let t3 = Instant::now();
        let issued = (|| -> Result<f64> {
            for _ in 0..n_issue {
                model.forward(&[next], cache, &ForwardOptions { logits: Logits::None, capture_topk: false })?;
            }
            Ok(t3.elapsed().as_secs_f64())
        })();
        model.set_stage_timing(true);
        let issued = issued?;
        b.synchronize()?;
        let done = t3.elapsed().as_secs_f64();
        decode_issue = Some((issued / n_issue as f64, done / n_issue as f64));
    }
    b.synchronize()?;
    Ok(Measurement {
        prefill,
        ttft,
        decode_step_median,
        prefill_times: out.times,
        decode_times,
        decode_timed,
        decode_issue,
    })
}
