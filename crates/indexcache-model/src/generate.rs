//! Autoregressive generation: prefill the prompt, then one token at a time.

use crate::cache::Cache;
use crate::error::ModelError;
use crate::model::{DsaModel, ForwardOptions, ForwardOutput, Logits};
use crate::sampler::{Sampler, SamplingParams};
use indexcache_ops::Backend;
use std::time::Instant;

/// Timings of one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Prefill + first sampled token.
    pub ttft_s: f64,
    /// Time after the first token until the last.
    pub decode_s: f64,
}

impl GenStats {
    /// Tokens per second after the first one.
    pub fn decode_tok_s(&self) -> f64 {
        if self.new_tokens > 1 && self.decode_s > 0.0 { (self.new_tokens - 1) as f64 / self.decode_s } else { 0.0 }
    }
}

/// Generate up to `max_tokens` after `prompt` into a fresh region of `cache` (which must be empty
/// and large enough), stopping after an EOS id of the config or in `stop`. `on_token` sees each
/// new id as it is produced and may abort by returning an error.
pub fn generate<B: Backend, E: From<ModelError>>(
    model: &DsaModel<B>,
    cache: &mut Cache<B>,
    prompt: &[u32],
    max_tokens: usize,
    params: SamplingParams,
    stop: &[u32],
    mut on_token: impl FnMut(u32) -> Result<(), E>,
) -> Result<(Vec<u32>, GenStats), E> {
    let mut sampler = Sampler::new(params);
    // Greedy: the backend picks the token (only it comes back); sampling needs the logits.
    let greedy = params.temperature <= 0.0;
    let opts = ForwardOptions { logits: if greedy { Logits::Greedy } else { Logits::Last }, capture_topk: false };
    let mut pick = |o: &ForwardOutput| -> Result<u32, ModelError> {
        match greedy {
            true => o.tokens.first().copied().ok_or_else(|| ModelError::Invalid("no greedy token".into())),
            false => Ok(sampler.sample(&o.logits)),
        }
    };
    let eos = &model.config().eos_token_ids;
    let t0 = Instant::now();
    let out = model.forward(prompt, cache, &opts)?;
    let mut next = pick(&out)?;
    let ttft = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut generated = Vec::new();
    while generated.len() < max_tokens {
        generated.push(next);
        on_token(next)?;
        if eos.contains(&next) || stop.contains(&next) || generated.len() == max_tokens {
            break;
        }
        let out = model.forward(&[next], cache, &opts)?;
        next = pick(&out)?;
    }
    let stats = GenStats {
        prompt_tokens: prompt.len(),
        new_tokens: generated.len(),
        ttft_s: ttft,
        decode_s: t1.elapsed().as_secs_f64(),
    };
    Ok((generated, stats))
}
