//! Generation with a chunked prefill: [`indexcache_model::generate()`] after the prompt's leading
//! chunks went through [`DsaModel::forward_chunked`], so a long prompt's activations and the
//! indexer's `[chunk, context]` scores stay bounded.

use indexcache_model::{Cache, DsaModel, ForwardOptions, GenStats, Logits, ModelError, SamplingParams};
use indexcache_ops::Backend;
use std::time::Instant;

/// Like [`indexcache_model::generate()`] (same arguments, same result), with the prompt prefilled in
/// chunks of at most `chunk` tokens, laid out as [`DsaModel::forward_chunked`] lays them out: the
/// full chunks run without logits, the last (partial or full) chunk goes to `generate`, whose
/// last-row logits pick the first new token. `stats` cover the whole prompt.
#[allow(clippy::too_many_arguments)]
pub fn generate_chunked<B: Backend, E: From<ModelError>>(
    model: &DsaModel<B>,
    cache: &mut Cache<B>,
    prompt: &[u32],
    max_tokens: usize,
    params: SamplingParams,
    stop: &[u32],
    chunk: usize,
    on_token: impl FnMut(u32) -> Result<(), E>,
) -> Result<(Vec<u32>, GenStats), E> {
    let chunk = chunk.max(1);
    // Start of the last chunk: everything before it is whole chunks.
    let split = (prompt.len().saturating_sub(1) / chunk) * chunk;
    let t0 = Instant::now();
    if split > 0 {
        let opts = ForwardOptions { logits: Logits::None, capture_topk: false };
        model.forward_chunked(&prompt[..split], cache, &opts, chunk)?;
    }
    // Host time of the queued head; `generate`'s TTFT waits for it (the device runs in order), so
    // the sum is the wall time to the first token.
    let head_s = t0.elapsed().as_secs_f64();
    let (ids, mut stats) =
        indexcache_model::generate(model, cache, &prompt[split..], max_tokens, params, stop, on_token)?;
    stats.prompt_tokens = prompt.len();
    stats.ttft_s += head_s;
    Ok((ids, stats))
}
