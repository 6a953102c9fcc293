//! `indexcache generate`: text in, text out, with time-to-first-token and decode speed.

use crate::args::{ModelArgs, ScheduleArgs};
use crate::load::{ExecArgs, load_model, with_backend};
use anyhow::{Context, Result, anyhow};
use indexcache_model::{DsaModel, GenStats, IndexerSelection, SamplingParams};
use indexcache_ops::Backend;
use std::io::Write;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text.
    #[arg(long, short = 'p')]
    pub prompt: String,
    #[command(flatten)]
    pub schedule: ScheduleArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// tokenizer.json (default: a GGUF model's own, or the one in the model directory).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Wrap the prompt as a user message in the model's chat template (a GGUF's
    /// `tokenizer.chat_template`) and answer it as the assistant.
    #[arg(long)]
    pub chat: bool,
    #[command(flatten)]
    pub exec: ExecArgs,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// RNG seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn params(&self) -> Result<SamplingParams> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(anyhow!("--temperature must be a finite number >= 0"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(anyhow!("--top-p must be in (0, 1]"));
        }
        Ok(SamplingParams { temperature: self.temperature, top_p: self.top_p, top_k: self.top_k, seed: self.seed })
    }
}

/// The model's tokenizer: `explicit` if given, a GGUF model's own, or the model directory's
/// `tokenizer.json`.
pub fn load_tokenizer(model: &Path, explicit: Option<&Path>) -> Result<Tokenizer> {
    indexcache_tools::gguf_tokenizer::model_tokenizer(model, explicit)?.ok_or_else(|| {
        anyhow!("{}: the model has no tokenizer (no tokenizer.json); pass --tokenizer FILE", model.display())
    })
}

/// Prefill `prompt` in chunks of `chunk` tokens, then decode until `max_tokens` or an EOS;
/// `on_token` gets each new id.
pub fn generate<B: Backend>(
    model: &DsaModel<B>,
    prompt: &[u32],
    sampling: &SamplingArgs,
    chunk: usize,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, GenStats)> {
    let params = sampling.params()?;
    let mut cache = model.new_cache(prompt.len() + sampling.max_tokens)?;
    indexcache_tools::generate::generate_chunked(
        model,
        &mut cache,
        prompt,
        sampling.max_tokens,
        params,
        &[],
        chunk,
        on_token,
    )
}

pub fn run(a: Args) -> Result<()> {
    let tokenizer = load_tokenizer(&a.model.model, a.tokenizer.as_deref())?;
    a.sampling.params()?;
    let schedule = a.schedule.to_override()?;
    with_backend!(a.exec.backend()?, |b| {
        run_with(load_model(&a.model.model, b, schedule, IndexerSelection::Full, &a.exec)?, &a, &tokenizer)
    })
}

fn run_with<B: Backend>(model: DsaModel<B>, a: &Args, tokenizer: &Tokenizer) -> Result<()> {
    // The text the model continues: the prompt, or the chat template's rendering of it (which
    // holds its own special tokens, so none are added).
    let (text, add_special) = match a.chat {
        false => (a.prompt.clone(), true),
        true => {
            use indexcache_tools::gguf_tokenizer::{ChatMessage, model_chat_template};
            let template = model_chat_template(&a.model.model)?.ok_or_else(|| {
                anyhow!("--chat: {} has no chat template (tokenizer.chat_template)", a.model.model.display())
            })?;
            (template.render(&[ChatMessage::new("user", &a.prompt)], true)?, false)
        }
    };
    let enc = tokenizer.encode(text.as_str(), add_special).map_err(|e| anyhow!("tokenizing the prompt: {e}"))?;
    let prompt: Vec<u32> = enc.get_ids().to_vec();
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{text}")?;
    let mut stream = TextStream::new(tokenizer);
    let (_, stats) = generate(&model, &prompt, &a.sampling, a.exec.chunk(model.backend()), |id| {
        let piece = stream.push(id)?;
        write!(stdout, "{piece}")?;
        stdout.flush()?;
        Ok(())
    })
    .context("generating")?;
    writeln!(stdout, "{}", stream.finish()?)?;
    eprintln!(
        "prompt {} tokens, generated {}; time to first token {:.1} ms; decode {:.1} tokens/s",
        stats.prompt_tokens,
        stats.new_tokens,
        stats.ttft_s * 1e3,
        stats.decode_tok_s()
    );
    Ok(())
}

/// Incremental detokenisation for streaming: each new token decodes only the few tokens since the
/// last printed piece (text-generation-inference's `decode_token`), so n tokens cost O(n), not
/// the O(n²) of re-decoding the whole continuation. Decoding from `prefix` (a token boundary
/// already printed) and diffing against the decode of `prefix..read` keeps what a decoder does
/// at the start of a sequence (a stripped leading space) out of the output, and a piece that
/// ends inside a multi-byte character (U+FFFD) waits for the next token.
pub struct TextStream<'t> {
    tokenizer: &'t Tokenizer,
    ids: Vec<u32>,
    /// Start of the decode window.
    prefix: usize,
    /// End of what has been printed.
    read: usize,
}

impl<'t> TextStream<'t> {
    pub fn new(tokenizer: &'t Tokenizer) -> Self {
        Self { tokenizer, ids: Vec::new(), prefix: 0, read: 0 }
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|e| anyhow!("detokenizing: {e}"))
    }

    /// Add a token; returns the new text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = self.decode(&self.ids[self.prefix..self.read])?;
        let now = self.decode(&self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            let piece = match now.strip_prefix(before.as_str()) {
                Some(p) => p.to_string(),
                None => now.get(before.len()..).unwrap_or_default().to_string(),
            };
            self.prefix = self.read;
            self.read = self.ids.len();
            return Ok(piece);
        }
        Ok(String::new())
    }

    /// What is left unprinted at the end (e.g. an incomplete character, as U+FFFD).
    pub fn finish(&mut self) -> Result<String> {
        let before = self.decode(&self.ids[self.prefix..self.read])?;
        let now = self.decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now.strip_prefix(before.as_str()).map(str::to_string).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_tokenizer() -> Tokenizer {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-dsa");
        load_tokenizer(&p, None).unwrap()
    }

    fn streamed(tok: &Tokenizer, ids: &[u32]) -> String {
        let mut s = TextStream::new(tok);
        let mut out = String::new();
        for &id in ids {
            out += &s.push(id).unwrap();
        }
        out + &s.finish().unwrap()
    }

    #[test]
    fn streaming_reproduces_the_whole_decode() {
        let tok = tiny_tokenizer();
        for text in [
            "The lightning indexer picks the tokens that matter.",
            "  leading spaces, tabs\tand\nnew lines ",
            "héllo wörld — ✓ 日本語のテキスト 🙂 done",
        ] {
            let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(streamed(&tok, &ids), tok.decode(&ids, true).unwrap(), "{text:?}");
        }
        // Arbitrary ids (byte tokens that never form valid UTF-8 included): no panic, and the
        // valid text comes out.
        let ids: Vec<u32> = (0..300u32).map(|i| (i * 7919 + 13) % 512).collect();
        let all = tok.decode(&ids, true).unwrap();
        let s = streamed(&tok, &ids);
        assert_eq!(s.replace('\u{FFFD}', ""), all.replace('\u{FFFD}', ""));
    }

    #[test]
    fn decode_work_per_token_stays_bounded() {
        let tok = tiny_tokenizer();
        let ids = tok.encode("abc def ghi jkl ".repeat(200).as_str(), false).unwrap().get_ids().to_vec();
        let mut s = TextStream::new(&tok);
        for &id in &ids {
            s.push(id).unwrap();
            assert!(s.ids.len() - s.prefix <= 8, "decode window of {} tokens", s.ids.len() - s.prefix);
        }
    }
}
