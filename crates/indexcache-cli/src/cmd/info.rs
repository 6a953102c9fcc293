//! `indexcache info`: what a checkpoint is, without loading its weights.

use crate::args::{ModelArgs, ScheduleArgs};
use anyhow::{Context, Result};
use indexcache_config::{IndexSchedule, ModelConfig};
use indexcache_model::{cache_bytes_per_token, check_indexers};
use indexcache_weights::WeightStore;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub schedule: ScheduleArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Info {
    model_type: &'static str,
    layers: usize,
    hidden_size: usize,
    heads: usize,
    vocab_size: usize,
    parameters: u64,
    dtypes: BTreeMap<String, usize>,
    quantization: Option<String>,
    index_topk: usize,
    indexer: String,
    schedule: String,
    full_layers: usize,
    indexer_weights_on_layers: Vec<usize>,
    kv_bytes_per_token: KvBytes,
}

#[derive(Serialize)]
struct KvBytes {
    engine_f32_all_full: usize,
    engine_f32_schedule: usize,
    production_fp8_all_full: usize,
    production_fp8_schedule: usize,
}

/// Config, parameter count, tensor types and the layers with indexer weights.
type GgufInfo = (ModelConfig, u64, BTreeMap<String, usize>, Vec<usize>);

/// A GGUF llama model (file, or model directory naming one): its config, the tensors' types and
/// parameter count, and the layers whose indexer weights the directory holds.
fn gguf_model(model: &std::path::Path) -> Result<Option<GgufInfo>> {
    use indexcache_model::gguf::{llama_params, read_model_dir, with_indexer};
    let Some(path) = indexcache_tools::gguf_tokenizer::model_gguf(model)? else {
        return Ok(None);
    };
    let g = indexcache_weights::GgufFile::open(&path)?;
    let mut params = llama_params(&g)?;
    let dir = read_model_dir(model)?;
    if let Some(spec) = dir.as_ref().and_then(|d| d.indexer.as_ref()) {
        params = with_indexer(params, spec, &path.display().to_string())?;
    }
    let cfg = ModelConfig::llama(&params, &path.display().to_string())?;
    let mut parameters = 0u64;
    let mut dtypes = BTreeMap::new();
    for t in g.tensors() {
        parameters += t.numel() as u64;
        *dtypes.entry(t.ggml_type.name().to_string()).or_insert(0) += 1;
    }
    let mut with_indexer = Vec::new();
    if let Some(side) = dir.and_then(|d| d.indexers) {
        let store = WeightStore::open(side.parent().unwrap_or(std::path::Path::new(".")))?;
        for name in store.names() {
            if let Some(info) = store.info(name) {
                parameters += info.shape.iter().product::<usize>() as u64;
                *dtypes.entry(format!("{:?}", info.dtype)).or_insert(0) += 1;
            }
        }
        with_indexer = (0..cfg.num_hidden_layers)
            .filter(|l| store.contains(&indexcache_model::weights::indexer_probe(*l)))
            .collect();
    }
    Ok(Some((cfg, parameters, dtypes, with_indexer)))
}

pub fn run(a: Args) -> Result<()> {
    let dir = &a.model.model;
    if let Some((cfg, parameters, dtypes, with_indexer)) = gguf_model(dir)? {
        let schedule = match a.schedule.to_override()? {
            Some(o) => o.apply(cfg.num_hidden_layers)?,
            None => cfg.schedule.clone(),
        };
        return report(&a, &cfg, &schedule, parameters, dtypes, with_indexer);
    }
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let store = WeightStore::open(dir).with_context(|| format!("reading checkpoint in {}", dir.display()))?;
    let schedule = match a.schedule.to_override()? {
        Some(o) => o.apply(cfg.num_hidden_layers)?,
        None => cfg.schedule.clone(),
    };
    check_indexers(&cfg, &schedule, |n| store.contains(n))?;

    let n_layers = cfg.num_hidden_layers;
    let mut parameters = 0u64;
    let mut dtypes = BTreeMap::new();
    for name in store.names() {
        let layer =
            name.strip_prefix("model.layers.").and_then(|r| r.split('.').next()).and_then(|s| s.parse::<usize>().ok());
        if layer.is_some_and(|l| l >= n_layers) || name.ends_with("_scale_inv") {
            continue;
        }
        if let Some(info) = store.info(name) {
            parameters += info.shape.iter().product::<usize>() as u64;
            *dtypes.entry(format!("{:?}", info.dtype)).or_insert(0) += 1;
        }
    }
    let with_indexer: Vec<usize> =
        (0..n_layers).filter(|l| store.contains(&indexcache_model::weights::indexer_probe(*l))).collect();
    report(&a, &cfg, &schedule, parameters, dtypes, with_indexer)
}

fn report(
    a: &Args,
    cfg: &ModelConfig,
    schedule: &IndexSchedule,
    parameters: u64,
    dtypes: BTreeMap<String, usize>,
    with_indexer: Vec<usize>,
) -> Result<()> {
    let n_layers = cfg.num_hidden_layers;
    let all_full = IndexSchedule::all_full(n_layers);
    let (full_b, sched_b) = (cache_bytes_per_token(cfg, &all_full), cache_bytes_per_token(cfg, schedule));
    let info = Info {
        model_type: cfg.arch.model_type(),
        layers: n_layers,
        hidden_size: cfg.hidden_size,
        heads: cfg.num_attention_heads,
        vocab_size: cfg.vocab_size,
        parameters,
        dtypes,
        quantization: cfg.quantization.map(|q| format!("fp8 e4m3, {}x{} block scales", q.block[0], q.block[1])),
        index_topk: cfg.index_topk,
        indexer: format!(
            "{} heads x {} dims, RoPE {}",
            cfg.index_n_heads,
            cfg.index_head_dim,
            if cfg.indexer_rope_interleave { "interleaved" } else { "half-split" }
        ),
        schedule: schedule.to_pattern(),
        full_layers: schedule.num_full(),
        indexer_weights_on_layers: with_indexer,
        kv_bytes_per_token: KvBytes {
            engine_f32_all_full: full_b.engine_f32,
            engine_f32_schedule: sched_b.engine_f32,
            production_fp8_all_full: full_b.production_fp8,
            production_fp8_schedule: sched_b.production_fp8,
        },
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    println!("model_type      {}", info.model_type);
    if !cfg.arch.is_mla() {
        println!(
            "architecture    {} layers, hidden {}, {} heads / {} KV heads x {} (GQA), FFN {}, vocab {}",
            n_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.intermediate_size,
            cfg.vocab_size
        );
    } else {
        println!(
            "architecture    {} layers, hidden {}, {} heads (MLA q_lora {}, kv_lora {}, nope {}, rope {}, v {}), vocab {}",
            n_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.q_lora_rank,
            cfg.kv_lora_rank,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            cfg.vocab_size
        );
        println!(
            "ffn             {} dense + {} MoE layers ({} experts, top-{}, {} groups / top-{}, {} shared)",
            cfg.mlp_layer_types.iter().filter(|k| matches!(k, indexcache_config::MlpKind::Dense)).count(),
            cfg.mlp_layer_types.iter().filter(|k| matches!(k, indexcache_config::MlpKind::Moe)).count(),
            cfg.n_routed_experts,
            cfg.num_experts_per_tok,
            cfg.n_group,
            cfg.topk_group,
            cfg.n_shared_experts
        );
    }
    println!("parameters      {} ({:.3} B)", info.parameters, info.parameters as f64 / 1e9);
    let dt: Vec<String> = info.dtypes.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    println!("dtypes          {}", dt.join(", "));
    if let Some(q) = &info.quantization {
        println!("quantization    {q}");
    }
    println!("indexer         {}, top-k {}", info.indexer, info.index_topk);
    println!("schedule        {}  ({} Full / {} layers)", info.schedule, info.full_layers, n_layers);
    println!(
        "KV bytes/token  engine f32: {} all-Full, {} with this schedule ({:.1}% saved)",
        full_b.engine_f32,
        sched_b.engine_f32,
        100.0 * (1.0 - sched_b.engine_f32 as f64 / full_b.engine_f32 as f64)
    );
    let layout = if cfg.arch.is_mla() { "656 B latent + 132 B indexer @ DS dims" } else { "e4m3 K/V + indexer key" };
    println!(
        "                production FP8 ({layout}): {} all-Full, {} with this schedule",
        full_b.production_fp8, sched_b.production_fp8
    );
    Ok(())
}
