//! `indexcache forward`: logits and per-layer top-k for given token ids, as safetensors.
//!
//! Output tensors (names are a contract; external checks read them):
//! * `logits` f32 `[T, vocab]` — every row of one prefill (run in `--chunk` chunks);
//! * `topk.layer{N}` i32 `[T, min(index_topk, T)]` for every layer that ran its indexer, rows
//!   with fewer visible tokens padded with -1;
//! * with `--decode-last N`: `decode_logits` f32 `[N, vocab]` from a prefill of T−N tokens
//!   followed by N one-token steps.

use crate::args::{ModelArgs, ScheduleArgs, parse_ids};
use crate::load::{ExecArgs, load_model, with_backend};
use crate::output::{OutTensor, write_safetensors};
use anyhow::{Result, bail};
use indexcache_model::{DsaModel, ForwardOptions, IndexerSelection, Logits};
use indexcache_ops::Backend;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Comma-separated token ids, e.g. 3,17,42.
    #[arg(long, value_name = "IDS")]
    pub input_ids: String,
    #[command(flatten)]
    pub schedule: ScheduleArgs,
    /// Also decode the last N tokens one at a time after a prefill of the rest.
    #[arg(long, value_name = "N")]
    pub decode_last: Option<usize>,
    /// Output file (.safetensors); its directory is created if needed.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub exec: ExecArgs,
}

pub fn run(a: Args) -> Result<()> {
    let ids = parse_ids(&a.input_ids)?;
    if ids.is_empty() {
        bail!("--input-ids: no token ids given");
    }
    if let Some(n) = a.decode_last
        && (n == 0 || n >= ids.len())
    {
        bail!("--decode-last {n}: must be between 1 and the number of input ids minus one ({})", ids.len() - 1);
    }
    let schedule = a.schedule.to_override()?;
    with_backend!(a.exec.backend()?, |b| {
        run_with(load_model(&a.model.model, b, schedule, IndexerSelection::Full, &a.exec)?, &a, &ids)
    })
}

fn run_with<B: Backend>(model: DsaModel<B>, a: &Args, ids: &[u32]) -> Result<()> {
    let vocab = model.config().vocab_size;
    let t = ids.len();
    let chunk = a.exec.chunk(model.backend());

    let mut cache = model.new_cache(t)?;
    let opts = ForwardOptions { logits: Logits::All, capture_topk: true };
    let full = model.forward_chunked(ids, &mut cache, &opts, chunk)?;
    let mut tensors = vec![OutTensor::F32 { name: "logits".into(), shape: vec![t, vocab], data: full.logits }];
    for (layer, topk) in full.topk {
        tensors.push(OutTensor::I32 {
            name: format!("topk.layer{layer}"),
            shape: vec![topk.rows, topk.k],
            data: topk.data,
        });
    }

    if let Some(n) = a.decode_last {
        cache.clear();
        let prefill = ForwardOptions { logits: Logits::None, capture_topk: false };
        model.forward_chunked(&ids[..t - n], &mut cache, &prefill, chunk)?;
        let mut data = Vec::with_capacity(n * vocab);
        for &id in &ids[t - n..] {
            let step = model.forward(&[id], &mut cache, &ForwardOptions::default())?;
            data.extend_from_slice(&step.logits);
        }
        tensors.push(OutTensor::F32 { name: "decode_logits".into(), shape: vec![n, vocab], data });
    }
    write_safetensors(&a.out, &tensors)?;
    tracing::info!("wrote {} tensors to {}", tensors.len(), a.out.display());
    Ok(())
}
