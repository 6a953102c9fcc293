//! `indexcache distill`: train lightning indexers on a dense (GQA) model by distilling its own
//! attention — DSA's dense warm-up (every layer's indexer imitates its layer's head-averaged
//! attention), or with `--pattern/--keep` IndexCache's training-aware multi-layer distillation
//! (each Full layer's indexer imitates the mean attention of the layers it serves, paper Eq. 1).
//! The base model stays frozen; the output directory is a model directory (`config.json` naming
//! the GGUF, `indexers.safetensors`) that every command loads with `-m`.
//!
//! Reproducible: the window order is a seeded shuffle, the parameters a seeded initialisation,
//! and every reduction has a fixed order. Checkpoints every `--checkpoint-every` steps (indexers,
//! AdamW moments, the loss history); `--resume` continues from the last one bit for bit.

use crate::args::{DataArgs, ModelArgs, ScheduleArgs};
use crate::load::{ExecArgs, load_model, progress_bar};
use crate::output::{OutTensor, write_atomic, write_safetensors};
use anyhow::{Context, Result, bail};
use indexcache_model::{DsaModel, IndexerSelection};
use indexcache_ops::cpu::CpuBackend;
use indexcache_ops::{RopeLayout, RopeTable};
use indexcache_tools::distill::{Dims, TrainConfig, Trainer};
use indexcache_weights::WeightStore;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Multi-layer mode: the IndexCache schedule whose Full layers are trained (warm-up mode,
    /// every layer, when absent).
    #[command(flatten)]
    pub schedule: ScheduleArgs,
    /// Output model directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Indexer heads.
    #[arg(long, default_value_t = 4)]
    pub index_heads: usize,
    /// Top-k the trained model selects (written to its config).
    #[arg(long, default_value_t = 256)]
    pub topk: usize,
    /// Optimiser steps (one window each).
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    /// AdamW decoupled weight decay (projections only).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    /// Seed of the initial weights and of the window order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: usize,
    /// Continue the run saved in --out.
    #[arg(long)]
    pub resume: bool,
    /// Start from the indexers of another model directory (e.g. a run at a shorter --ctx) instead
    /// of a seeded initialisation; the optimiser starts fresh.
    #[arg(long, value_name = "DIR", conflicts_with = "resume")]
    pub init: Option<PathBuf>,
    /// Also write the indexers in bf16 to this file (half the size; what a repository ships).
    #[arg(long, value_name = "FILE.safetensors")]
    pub export_bf16: Option<PathBuf>,
    #[command(flatten)]
    pub exec: ExecArgs,
}

/// `state.json`: what a checkpoint needs besides the tensors.
#[derive(Serialize, Deserialize)]
struct State {
    step: usize,
    seed: u64,
    index_heads: usize,
    head_dim: usize,
    pattern: Option<String>,
    ctx: usize,
    lr: f32,
    history: Vec<f64>,
    /// AdamW steps taken per trained layer (all equal).
    adam_step: u64,
}

pub fn run(a: Args) -> Result<()> {
    if a.exec.device.is_some_and(|d| d != crate::load::Device::Cpu) {
        bail!("distill runs on the cpu (its backward pass is host code); drop --device");
    }
    let base = indexcache_tools::gguf_tokenizer::model_gguf(&a.model.model)?
        .with_context(|| format!("{}: distill needs a GGUF base model (a dense llama)", a.model.model.display()))?;
    let model = load_model(&base, CpuBackend::new(), None, IndexerSelection::None, &a.exec)?;
    let cfg = model.config().clone();
    let schedule = match a.schedule.to_override()? {
        Some(o) => Some(o.apply(cfg.num_hidden_layers)?),
        None => None,
    };
    let dims = Dims { heads: a.index_heads, d: cfg.head_dim, hidden: cfg.hidden_size };
    let tcfg = TrainConfig { dims, schedule: schedule.clone(), lr: a.lr, weight_decay: a.weight_decay, seed: a.seed };
    let mut trainer = Trainer::new(tcfg, cfg.num_hidden_layers);
    let pattern = schedule.as_ref().map(|s| s.to_pattern());

    let windows = a.data.windows(&a.model.model)?;
    let t = a.data.ctx;
    let mut order: Vec<usize> = (0..windows.len()).filter(|&i| windows[i].ids.len() == t).collect();
    if order.is_empty() {
        bail!("no window of the data has {t} tokens (--ctx); give more text or a smaller --ctx");
    }
    shuffle(&mut order, a.seed);

    let mut start = 0;
    if let Some(dir) = &a.init {
        load_params(dir, &mut trainer).with_context(|| format!("--init {}", dir.display()))?;
        tracing::info!("indexers initialised from {}", dir.display());
    }
    if a.resume {
        start = resume(&a.out, &mut trainer, &State::expected(&a, cfg.head_dim, pattern.clone()))?;
        tracing::info!("resumed at step {start} from {}", a.out.display());
    }

    let table = RopeTable::new(&cfg.rope.inv_freq(), cfg.rope.attention_factor(), t);
    let layout = if cfg.rope_interleave { RopeLayout::Interleaved } else { RopeLayout::HalfSplit };
    let attn = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.softmax_scale);
    let bar = progress_bar("distilling", "{msg}", a.steps as u64);
    bar.set_position(start as u64);
    for step in start..a.steps {
        let w = &windows[order[step % order.len()]];
        let taps = forward_taps(&model, &w.ids)?;
        let losses = trainer.step(&taps, t, attn, &table, layout);
        let mean = losses.iter().sum::<f64>() / losses.len() as f64;
        bar.set_message(format!("KL {mean:.4}"));
        bar.inc(1);
        tracing::debug!("step {} mean KL {mean:.5}", step + 1);
        if (step + 1) % a.checkpoint_every.max(1) == 0 || step + 1 == a.steps {
            save(&a, &base, &trainer, step + 1, cfg.head_dim, pattern.clone())?;
        }
    }
    bar.finish_and_clear();
    if start >= a.steps {
        // Nothing to train (e.g. `--init DIR --steps 0 --export-bf16 FILE`): write what we have.
        save(&a, &base, &trainer, start, cfg.head_dim, pattern.clone())?;
    }
    let h = &trainer.history;
    if let (Some(first), Some(last)) = (h.first(), h.last()) {
        println!("distilled {} indexers over {} steps: mean KL {first:.4} -> {last:.4}", trainer.layers.len(), h.len());
    }
    println!("wrote {}", a.out.display());
    Ok(())
}

fn forward_taps(model: &DsaModel<CpuBackend>, ids: &[u32]) -> Result<Vec<indexcache_model::LayerTap>> {
    let mut cache = model.new_cache(ids.len())?;
    Ok(model.forward_taps(ids, &mut cache)?)
}

/// Seeded Fisher–Yates.
fn shuffle(v: &mut [usize], seed: u64) {
    for i in (1..v.len()).rev() {
        let r = indexcache_ops::random::uniform(seed ^ 0xD15_7111, i as u64);
        let j = (((r + 1.0) / 2.0) as f64 * (i + 1) as f64) as usize;
        v.swap(i, j.min(i));
    }
}

impl State {
    fn expected(a: &Args, head_dim: usize, pattern: Option<String>) -> State {
        State {
            step: 0,
            seed: a.seed,
            index_heads: a.index_heads,
            head_dim,
            pattern,
            ctx: a.data.ctx,
            lr: a.lr,
            history: Vec::new(),
            adam_step: 0,
        }
    }
}

/// Write the model directory: config.json, indexers.safetensors, the loss curve, and the
/// training state in train/ (optimizer.safetensors, state.json).
fn save(a: &Args, base: &Path, tr: &Trainer, step: usize, head_dim: usize, pattern: Option<String>) -> Result<()> {
    let out = &a.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let base_ref = indexcache_model::gguf::base_gguf_value(base, out);
    let mut config = serde_json::json!({
        "base_gguf": base_ref,
        "index_n_heads": a.index_heads,
        "index_head_dim": head_dim,
        "index_topk": a.topk,
    });
    if let Some(p) = &pattern {
        config["index_topk_pattern"] = serde_json::Value::String(p.clone());
    }
    write_atomic(&out.join("config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
    let tensors: Vec<OutTensor> = tr
        .tensors()
        .into_iter()
        .map(|(name, shape, data)| OutTensor::F32 { name, shape, data: data.clone() })
        .collect();
    write_safetensors(&out.join(indexcache_model::gguf::INDEXERS_FILE), &tensors)?;
    if let Some(path) = &a.export_bf16 {
        let bf16: Vec<OutTensor> = tr
            .tensors()
            .into_iter()
            .map(|(name, shape, data)| OutTensor::BF16 {
                name,
                shape,
                data: data.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect(),
            })
            .collect();
        write_safetensors(path, &bf16)?;
    }
    let mut moments = Vec::new();
    for (l, _, _, opt) in &tr.layers {
        for (i, (m, v)) in opt.m.iter().zip(&opt.v).enumerate() {
            moments.push(OutTensor::F32 { name: format!("{l}.{i}.m"), shape: vec![m.len()], data: m.clone() });
            moments.push(OutTensor::F32 { name: format!("{l}.{i}.v"), shape: vec![v.len()], data: v.clone() });
        }
    }
    // Training state in train/ (a model directory's *.safetensors are all read as weights).
    write_safetensors(&out.join("train/optimizer.safetensors"), &moments)?;
    let state = State {
        step,
        history: tr.history.clone(),
        adam_step: tr.layers.first().map_or(0, |x| x.3.step),
        ..State::expected(a, head_dim, pattern)
    };
    write_atomic(&out.join("train/state.json"), serde_json::to_string_pretty(&state)?.as_bytes())?;
    let pts: Vec<(f64, f64)> = tr.history.iter().enumerate().map(|(i, &v)| ((i + 1) as f64, v)).collect();
    if !pts.is_empty() {
        indexcache_tools::plot::line_plot(
            &[("mean KL(attention ‖ indexer)".into(), pts)],
            "indexer distillation",
            "step",
            "KL",
            &out.join("loss"),
        )?;
    }
    Ok(())
}

/// Load the checkpoint in `out` into `tr`; returns the step to continue from.
fn resume(out: &Path, tr: &mut Trainer, want: &State) -> Result<usize> {
    let state_path = out.join("train/state.json");
    let text =
        std::fs::read_to_string(&state_path).with_context(|| format!("--resume: reading {}", state_path.display()))?;
    let st: State = serde_json::from_str(&text).context("--resume: malformed state.json")?;
    let same = st.seed == want.seed
        && st.index_heads == want.index_heads
        && st.head_dim == want.head_dim
        && st.pattern == want.pattern
        && st.ctx == want.ctx
        && st.lr == want.lr;
    if !same {
        bail!(
            "--resume: {} was written with other settings (seed, heads, pattern, --ctx or --lr differ)",
            out.display()
        );
    }
    load_params(out, tr)?;
    let moments = WeightStore::open(&out.join("train"))?;
    for (l, _, params, opt) in tr.layers.iter_mut() {
        opt.step = st.adam_step;
        opt.m.clear();
        opt.v.clear();
        for (i, p) in params.tensors_mut().into_iter().enumerate() {
            opt.m.push(moments.load_f32(&format!("{l}.{i}.m"), &[p.len()])?);
            opt.v.push(moments.load_f32(&format!("{l}.{i}.v"), &[p.len()])?);
        }
    }
    tr.history = st.history;
    Ok(st.step)
}

/// Read the indexers of the trained layers from the model directory `dir`.
fn load_params(dir: &Path, tr: &mut Trainer) -> Result<()> {
    let store = WeightStore::open(dir)?;
    let shapes = indexcache_tools::distill::Params::<f32>::shapes(tr.cfg.dims);
    for (l, _, params, _) in tr.layers.iter_mut() {
        let names: Vec<&str> = params.tensors().iter().map(|t| t.0).collect();
        for ((dst, name), shape) in params.tensors_mut().into_iter().zip(names).zip(&shapes) {
            *dst = store.load_f32(&format!("model.layers.{l}.self_attn.indexer.{name}"), shape)?;
        }
    }
    Ok(())
}
