//! A `tokenizers::Tokenizer` and a chat template built from a llama.cpp GGUF file's metadata.
//!
//! * [`tokenizer_from_gguf`] rebuilds the tokenizer that transformers builds from the same file
//!   (`AutoTokenizer.from_pretrained(dir, gguf_file=…)`, transformers 5.24,
//!   `integrations/gguf/gguf_tokenizer_mapping.py`): for `tokenizer.ggml.model = "gpt2"` a
//!   byte-level BPE over `tokenizer.ggml.tokens` / `tokenizer.ggml.merges`, GPT-2's `ByteLevel`
//!   pre-tokenizer and decoder (or a `Split` regex in front of a regex-less `ByteLevel` for the
//!   `tokenizer.ggml.pre` values transformers knows a split for), the control tokens
//!   (`token_type` 3) as special added tokens and the user-defined ones (4) as plain added tokens,
//!   and a `TemplateProcessing` post-processor adding BOS/EOS only where the file asks for it.
//! * [`tokenizer_from_gguf_with`] can instead follow llama.cpp's pre-tokenizer (see
//!   [`PreTokenizerFlavor`]); for `pre = "smollm"` the two differ on whitespace before a digit.
//! * [`ChatTemplate`] renders `tokenizer.chat_template` with minijinja, configured the way
//!   transformers configures jinja2 for `apply_chat_template` (`trim_blocks`, `lstrip_blocks`,
//!   loop controls, `raise_exception`, a `tojson` without HTML escaping, and the common Python
//!   `str`/`dict` methods templates call).
//!
//! Other tokenizer models (`llama` sentencepiece, `t5`, …) are reported as unsupported.

use std::collections::BTreeMap;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::Arc;

use indexcache_weights::{GgufError, GgufFile};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind as JinjaErrorKind, State, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::ToolError;

/// `tokenizer.ggml.model`: which tokenizer (`gpt2` = byte-level BPE, `llama` = sentencepiece, …).
pub const KEY_MODEL: &str = "tokenizer.ggml.model";
/// `tokenizer.ggml.pre`: which pre-tokenizer (llama.cpp's name for it).
pub const KEY_PRE: &str = "tokenizer.ggml.pre";
/// `tokenizer.ggml.tokens`: the vocabulary, indexed by id.
pub const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
/// `tokenizer.ggml.merges`: BPE merges, `"left right"`, best first.
pub const KEY_MERGES: &str = "tokenizer.ggml.merges";
/// `tokenizer.ggml.token_type`: llama.cpp's token type per id (1 normal, 2 unknown, 3 control,
/// 4 user-defined, 5 unused, 6 byte).
pub const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
/// `tokenizer.ggml.bos_token_id`.
pub const KEY_BOS_ID: &str = "tokenizer.ggml.bos_token_id";
/// `tokenizer.ggml.eos_token_id`.
pub const KEY_EOS_ID: &str = "tokenizer.ggml.eos_token_id";
/// `tokenizer.ggml.unknown_token_id`.
pub const KEY_UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
/// `tokenizer.ggml.padding_token_id`.
pub const KEY_PAD_ID: &str = "tokenizer.ggml.padding_token_id";
/// `tokenizer.ggml.add_bos_token`: whether encoding prepends BOS.
pub const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
/// `tokenizer.ggml.add_eos_token`: whether encoding appends EOS.
pub const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
/// `tokenizer.chat_template`: the default (jinja) chat template.
pub const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// llama.cpp's `LLAMA_TOKEN_TYPE_CONTROL`.
pub const TOKEN_TYPE_CONTROL: i32 = 3;
/// llama.cpp's `LLAMA_TOKEN_TYPE_USER_DEFINED`.
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;

// ---------------------------------------------------------------------------------------------
// Pre-tokenizer rules
// ---------------------------------------------------------------------------------------------

/// Whose pre-tokenizer to follow where transformers and llama.cpp disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PreTokenizerFlavor {
    /// What transformers builds from the GGUF (the reference for token ids): GPT-2's `ByteLevel`
    /// regex for every `pre` it has no split for, `smollm` included.
    #[default]
    Transformers,
    /// What llama.cpp runs: for `smollm` (and `starcoder`, `refact`, `command-r`, `codeshell`,
    /// `exaone`, `minerva-7b`) every `\p{N}` is isolated before GPT-2's regex, which is also what
    /// the original SmolLM2 `tokenizer.json` does (`Digits(individual_digits)` + `ByteLevel`).
    /// It differs from [`Transformers`](Self::Transformers) on whitespace runs before a digit
    /// (`"  1"`: `["ĠĠ", "1"]` here, `["Ġ", "Ġ", "1"]` there).
    LlamaCpp,
}

/// How text is cut into chunks before byte-level BPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SplitRule {
    /// `ByteLevel(use_regex = true)`: GPT-2's regex.
    Gpt2,
    /// Every numeric character on its own, then GPT-2's regex.
    DigitsThenGpt2,
    /// `Split(regex, isolated)` then `ByteLevel(use_regex = false)`.
    Regex(&'static str),
}

// The splits transformers 5.24 (`GGUF_PRE_TOKENIZER_SPLITS`) puts in front of `ByteLevel`.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.pre` values accepted, and how each cuts text.
fn split_rule(pre: &str, flavor: PreTokenizerFlavor) -> Option<SplitRule> {
    Some(match pre {
        // llama.cpp's GPT-2 family (`default` is what a file without a detected pre says).
        "default" | "gpt2" | "gpt-2" => SplitRule::Gpt2,
        // llama.cpp: `\p{N}` then GPT-2's regex; transformers: GPT-2's regex alone.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => match flavor {
            PreTokenizerFlavor::Transformers => SplitRule::Gpt2,
            PreTokenizerFlavor::LlamaCpp => SplitRule::DigitsThenGpt2,
        },
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" | "dbrx" | "smaug-bpe" => SplitRule::Regex(LLAMA3_SPLIT),
        "tekken" => SplitRule::Regex(TEKKEN_SPLIT),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => SplitRule::Regex(QWEN2_SPLIT),
        "qwen35" => SplitRule::Regex(QWEN35_SPLIT),
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => SplitRule::Regex(GPT4O_SPLIT),
        _ => return None,
    })
}

/// Every accepted `tokenizer.ggml.pre` value, for error messages.
const SUPPORTED_PRE: &[&str] = &[
    "default",
    "gpt2",
    "gpt-2",
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva-7b",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "jina-v5-nano",
    "dbrx",
    "smaug-bpe",
    "tekken",
    "qwen2",
    "deepseek-r1-qwen",
    "kormo",
    "f2llmv2",
    "megrez",
    "qwen35",
    "gpt-4o",
    "llama4",
    "kanana2",
    "talkie",
    "minimax-m2",
];

// ---------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------

fn meta_err(g: &GgufFile, key: &str, message: impl Into<String>) -> ToolError {
    ToolError::from(GgufError::Metadata {
        path: g.path().display().to_string(),
        key: key.to_string(),
        message: message.into(),
    })
}

/// GPT-2's byte → printable-character table (`bytes_to_unicode`).
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            u32::from(b)
        } else {
            let c = next;
            next += 1;
            c
        };
        table[usize::from(b)] = char::from_u32(code).expect("code points below 0x200 are valid");
    }
    table
}

/// An optional token id: absent key → `None`; present → must be an integer naming a token.
fn token_id(g: &GgufFile, key: &str, n_tokens: usize) -> Result<Option<u32>, ToolError> {
    if g.get(key).is_none() {
        return Ok(None);
    }
    let id = g.get_u32(key)?;
    if id as usize >= n_tokens {
        return Err(meta_err(g, key, format!("token id {id} is out of range (the vocabulary has {n_tokens} tokens)")));
    }
    Ok(Some(id))
}

fn optional_bool(g: &GgufFile, key: &str) -> Result<Option<bool>, ToolError> {
    match g.get(key) {
        None => Ok(None),
        Some(_) => Ok(Some(g.get_bool(key)?)),
    }
}

/// The tokenizer transformers builds from this GGUF (see the [module docs](self)).
///
/// Errors name the file and the metadata key: a missing or mistyped key, an unsupported
/// `tokenizer.ggml.model` or `tokenizer.ggml.pre`, a malformed merge, an out-of-range special
/// token id.
pub fn tokenizer_from_gguf(g: &GgufFile) -> Result<Tokenizer, ToolError> {
    tokenizer_from_gguf_with(g, PreTokenizerFlavor::Transformers)
}

/// [`tokenizer_from_gguf`] with a choice of whose pre-tokenizer to follow.
pub fn tokenizer_from_gguf_with(g: &GgufFile, flavor: PreTokenizerFlavor) -> Result<Tokenizer, ToolError> {
    let model = g.get_str(KEY_MODEL)?;
    match model {
        "gpt2" => byte_level_bpe(g, flavor),
        other => Err(meta_err(
            g,
            KEY_MODEL,
            format!(
                "unsupported tokenizer model {other:?} (only \"gpt2\", byte-level BPE, can be built; \
                 sentencepiece \"llama\", \"t5\" and others are not supported)"
            ),
        )),
    }
}

fn byte_level_bpe(g: &GgufFile, flavor: PreTokenizerFlavor) -> Result<Tokenizer, ToolError> {
    // `pre` first: an unknown one is the likeliest failure and the cheapest to report.
    let pre = match g.get(KEY_PRE) {
        None => "default",
        Some(_) => g.get_str(KEY_PRE)?,
    };
    let rule = split_rule(pre, flavor).ok_or_else(|| {
        meta_err(
            g,
            KEY_PRE,
            format!(
                "unsupported pre-tokenizer {pre:?} for a \"gpt2\" tokenizer (supported: {})",
                SUPPORTED_PRE.join(", ")
            ),
        )
    })?;

    let tokens = g.get_str_array(KEY_TOKENS)?;
    if tokens.is_empty() {
        return Err(meta_err(g, KEY_TOKENS, "the vocabulary is empty"));
    }
    let n = tokens.len();
    let token_type = match g.get(KEY_TOKEN_TYPE) {
        None => Vec::new(),
        Some(_) => g.get_i32_array(KEY_TOKEN_TYPE)?,
    };
    if !token_type.is_empty() && token_type.len() != n {
        return Err(meta_err(g, KEY_TOKEN_TYPE, format!("has {} entries but {KEY_TOKENS} has {n}", token_type.len())));
    }
    let merges_raw = g.get_str_array(KEY_MERGES).map_err(|e| match e {
        GgufError::MissingKey { .. } => {
            meta_err(g, KEY_MERGES, "not found (a \"gpt2\" tokenizer without merges is not supported)")
        }
        other => other.into(),
    })?;

    // The vocabulary as the merges spell it: llama.cpp writes GPT-2's byte-level spelling, but a
    // token whose bytes were not valid UTF-8 may come back raw; transformers respells any token
    // using a character outside the byte alphabet from its UTF-8 bytes.
    let spelling = bytes_to_unicode();
    let alphabet: HashSet<char> = spelling.iter().copied().collect();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let key =
                if in_alphabet(t) { t.to_string() } else { t.bytes().map(|b| spelling[usize::from(b)]).collect() };
            (key, i as u32)
        })
        .collect();

    let mut merges: Merges = Vec::with_capacity(merges_raw.len());
    for (i, m) in merges_raw.iter().enumerate() {
        let mut parts = m.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
            _ => {
                return Err(meta_err(
                    g,
                    KEY_MERGES,
                    format!("merge {i} ({m:?}) is not two tokens separated by one space"),
                ));
            }
        }
    }

    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(String::new())
        .fuse_unk(false)
        .build()
        .map_err(|e| meta_err(g, KEY_MERGES, format!("cannot build the BPE model: {e}")))?;

    let mut tok = Tokenizer::new(bpe);
    let pre_tokenizer: PreTokenizerWrapper = match rule {
        SplitRule::Gpt2 => ByteLevel::new(false, true, true).into(),
        SplitRule::DigitsThenGpt2 => {
            PreSequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into()
        }
        SplitRule::Regex(re) => {
            let split = Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| meta_err(g, KEY_PRE, format!("cannot compile the split regex for {pre:?}: {e}")))?;
            PreSequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
        }
    };
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(ByteLevelDecoder::default()));

    // Control tokens → special added tokens (a "control" token outside the byte alphabet is a
    // llama.cpp mislabel of a byte sequence: transformers leaves it to the merges).
    let of_type = |kind: i32| tokens.iter().zip(&token_type).filter(move |&(_, &k)| k == kind).map(|(&t, _)| t);
    let control: Vec<AddedToken> = of_type(TOKEN_TYPE_CONTROL)
        .filter(|t| in_alphabet(t))
        .map(|t| AddedToken::from(t.to_string(), true).normalized(false))
        .collect();
    if !control.is_empty() {
        tok.add_special_tokens(control)
            .map_err(|e| meta_err(g, KEY_TOKEN_TYPE, format!("cannot add the control tokens: {e}")))?;
    }
    // User-defined tokens → plain added tokens, where the vocabulary spells them as written.
    let user_defined: Vec<AddedToken> = of_type(TOKEN_TYPE_USER_DEFINED)
        .filter(|t| tok.token_to_id(t).is_some())
        .map(|t| AddedToken::from(t.to_string(), false).normalized(false))
        .collect();
    if !user_defined.is_empty() {
        tok.add_tokens(user_defined)
            .map_err(|e| meta_err(g, KEY_TOKEN_TYPE, format!("cannot add the user-defined tokens: {e}")))?;
    }

    // The named special tokens (bos/eos/unk/pad) are special even where the file does not say
    // they are control tokens.
    let ids = [KEY_BOS_ID, KEY_EOS_ID, KEY_UNK_ID, KEY_PAD_ID].map(|k| token_id(g, k, n));
    let [bos, eos, unk, pad] = ids;
    let (bos, eos, unk, pad) = (bos?, eos?, unk?, pad?);
    let added: HashSet<String> = tok.get_added_vocabulary().get_vocab().keys().cloned().collect();
    let mut named: Vec<AddedToken> = Vec::new();
    for id in [bos, eos, unk, pad].into_iter().flatten() {
        let t = tokens[id as usize];
        if !added.contains(t) && !named.iter().any(|a| a.content == t) {
            named.push(AddedToken::from(t.to_string(), true));
        }
    }
    if !named.is_empty() {
        tok.add_special_tokens(named)
            .map_err(|e| meta_err(g, KEY_TOKENS, format!("cannot add the bos/eos/unk/pad tokens: {e}")))?;
    }

    // BOS/EOS only where the file asks (byte-level files default to neither).
    let add_bos = optional_bool(g, KEY_ADD_BOS)?.unwrap_or(false) && bos.is_some();
    let add_eos = optional_bool(g, KEY_ADD_EOS)?.unwrap_or(false) && eos.is_some();
    let special = |id: Option<u32>| {
        id.map(|i| (tokens[i as usize].to_string(), tok.token_to_id(tokens[i as usize]).unwrap_or(i)))
    };
    let post =
        template_processing(if add_bos { special(bos) } else { None }, if add_eos { special(eos) } else { None })
            .map_err(|e| meta_err(g, KEY_ADD_BOS, format!("cannot build the post-processor: {e}")))?;
    tok.with_post_processor(Some(post));
    Ok(tok)
}

/// transformers' `update_post_processor`: `[bos] $A [eos]` and `[bos] $A [eos] [bos] $B [eos]`,
/// built from JSON so that a token containing `:` or a space cannot be misparsed.
fn template_processing(bos: Option<(String, u32)>, eos: Option<(String, u32)>) -> Result<TemplateProcessing, String> {
    let special =
        |t: &(String, u32), type_id: u32| serde_json::json!({"SpecialToken": {"id": t.0, "type_id": type_id}});
    let seq = |id: &str, type_id: u32| serde_json::json!({"Sequence": {"id": id, "type_id": type_id}});
    let side = |id: &str, type_id: u32| {
        let mut v = Vec::new();
        if let Some(b) = &bos {
            v.push(special(b, type_id));
        }
        v.push(seq(id, type_id));
        if let Some(e) = &eos {
            v.push(special(e, type_id));
        }
        v
    };
    let single = side("A", 0);
    let mut pair = side("A", 0);
    pair.extend(side("B", 1));
    let mut specials = serde_json::Map::new();
    for (content, id) in bos.iter().chain(eos.iter()) {
        specials.insert(content.clone(), serde_json::json!({"id": content, "ids": [id], "tokens": [content]}));
    }
    let json = serde_json::json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": specials,
    });
    serde_json::from_value(json).map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Chat template
// ---------------------------------------------------------------------------------------------

/// One chat message as `apply_chat_template` receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, …
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with this role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

const TEMPLATE_NAME: &str = "chat_template";

/// A GGUF's jinja chat template, rendered as transformers' `apply_chat_template(…, tokenize=False)`
/// renders it.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    origin: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    unk_token: Option<String>,
    pad_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// The file's `tokenizer.chat_template` (`None` when it has none), with its BOS/EOS/UNK/PAD
    /// token strings from `tokenizer.ggml.*_token_id`.
    pub fn from_gguf(g: &GgufFile) -> Result<Option<Self>, ToolError> {
        if g.get(KEY_CHAT_TEMPLATE).is_none() {
            return Ok(None);
        }
        let source = g.get_str(KEY_CHAT_TEMPLATE)?.to_string();
        let tokens = g.get_str_array(KEY_TOKENS)?;
        let named = |key: &str| -> Result<Option<String>, ToolError> {
            Ok(token_id(g, key, tokens.len())?.map(|id| tokens[id as usize].to_string()))
        };
        let origin = format!("{}: metadata key {KEY_CHAT_TEMPLATE:?}", g.path().display());
        let mut t = Self::build(source, origin)?;
        t.bos_token = named(KEY_BOS_ID)?;
        t.eos_token = named(KEY_EOS_ID)?;
        t.unk_token = named(KEY_UNK_ID)?;
        t.pad_token = named(KEY_PAD_ID)?;
        Ok(Some(t))
    }

    /// A template from its jinja source, with the given BOS/EOS token strings.
    pub fn new(
        source: impl Into<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, ToolError> {
        let mut t = Self::build(source.into(), "chat template".to_string())?;
        t.bos_token = bos_token;
        t.eos_token = eos_token;
        Ok(t)
    }

    fn build(source: String, origin: String) -> Result<Self, ToolError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| ToolError::Invalid(format!("{origin}: {}", jinja_message(&e))))?;
        env.set_syntax(syntax);
        env.add_function("raise_exception", |message: String| -> Result<Value, JinjaError> {
            Err(JinjaError::new(JinjaErrorKind::InvalidOperation, message))
        });
        env.add_filter("tojson", tojson_filter);
        env.set_unknown_method_callback(python_method);
        env.add_template_owned(TEMPLATE_NAME, source.clone()).map_err(|e| {
            ToolError::Invalid(format!("{origin}: cannot parse the chat template: {}", jinja_message(&e)))
        })?;
        Ok(ChatTemplate { env, source, origin, bos_token: None, eos_token: None, unk_token: None, pad_token: None })
    }

    /// The template's jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The BOS token string passed to the template as `bos_token`.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The EOS token string passed to the template as `eos_token`.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Renders `messages` with `add_generation_prompt`, `bos_token`, `eos_token`, `unk_token`
    /// and `pad_token` (the latter four as `none` where the file names no such token).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ToolError> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_object(MessageObject {
                    role: Value::from(m.role.as_str()),
                    content: Value::from(m.content.as_str()),
                })
            })
            .collect();
        let opt = |s: &Option<String>| s.as_deref().map_or(Value::from(()), Value::from);
        let mut ctx = BTreeMap::new();
        ctx.insert("messages".to_string(), Value::from(messages));
        ctx.insert("add_generation_prompt".to_string(), Value::from(add_generation_prompt));
        ctx.insert("bos_token".to_string(), opt(&self.bos_token));
        ctx.insert("eos_token".to_string(), opt(&self.eos_token));
        ctx.insert("unk_token".to_string(), opt(&self.unk_token));
        ctx.insert("pad_token".to_string(), opt(&self.pad_token));
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ToolError::Invalid(format!("{}: {}", self.origin, jinja_message(&e))))?;
        template.render(Value::from(ctx)).map_err(|e| {
            ToolError::Invalid(format!("{}: rendering the chat template failed: {}", self.origin, jinja_message(&e)))
        })
    }
}

/// A message as the template sees it: a map with `role` then `content`, in that order (a Python
/// dict keeps insertion order, which `tojson` and `.items()` show).
#[derive(Debug)]
struct MessageObject {
    role: Value,
    content: Value,
}

impl Object for MessageObject {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(self.role.clone()),
            "content" => Some(self.content.clone()),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

/// A minijinja error with its chain of causes.
fn jinja_message(e: &JinjaError) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        let _ = write!(s, ": {inner}");
        source = inner.source();
    }
    s
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=…, separators=…, sort_keys=…)`
/// (jinja2's own escapes HTML characters, which chat templates do not want).
fn tojson_filter(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, JinjaError> {
    let indent_kw: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent.or(indent_kw) {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_i64() {
            Some(n) if n >= 0 => Some(" ".repeat(n as usize)),
            _ => Some(v.as_str().map(str::to_string).ok_or_else(|| {
                JinjaError::new(JinjaErrorKind::InvalidOperation, "tojson: indent must be an integer or a string")
            })?),
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if !s.is_none() => {
            let a = s.get_item_by_index(0)?;
            let b = s.get_item_by_index(1)?;
            match (a.as_str(), b.as_str()) {
                (Some(a), Some(b)) => (a.to_string(), b.to_string()),
                _ => {
                    return Err(JinjaError::new(
                        JinjaErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ));
                }
            }
        }
        _ => (if indent.is_some() { ",".to_string() } else { ", ".to_string() }, ": ".to_string()),
    };
    let opts = JsonOpts { indent, item_sep, key_sep, sort_keys: sort_keys.unwrap_or(false) };
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOpts {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_json(out: &mut String, v: &Value, o: &JsonOpts, depth: usize) -> Result<(), JinjaError> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            let s = v.to_string();
            out.push_str(match s.as_str() {
                "inf" => "Infinity",
                "-inf" => "-Infinity",
                "nan" => "NaN",
                _ => &s,
            });
        }
        ValueKind::String => json_string(out, v.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, o, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if o.sort_keys {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                match k.as_str() {
                    Some(s) => json_string(out, s),
                    None => json_string(out, &k.to_string()),
                }
                out.push_str(&o.key_sep);
                write_json(out, &v.get_item(k)?, o, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => json_string(out, &v.to_string()),
    }
    Ok(())
}

fn bad_args(method: &str, why: &str) -> JinjaError {
    JinjaError::new(JinjaErrorKind::InvalidOperation, format!("{method}(): {why}"))
}

fn str_arg<'a>(args: &'a [Value], i: usize, method: &str) -> Result<Option<&'a str>, JinjaError> {
    match args.get(i) {
        None => Ok(None),
        Some(v) if v.is_none() => Ok(None),
        Some(v) => v.as_str().map(Some).ok_or_else(|| bad_args(method, "expected a string argument")),
    }
}

/// The Python `str` and `dict` methods chat templates call on values (jinja2 runs real Python
/// objects; minijinja needs them spelled out).
fn python_method(_state: &mut State, value: &Value, method: &str, args: &[Value]) -> Result<Value, JinjaError> {
    let unknown =
        || JinjaError::new(JinjaErrorKind::UnknownMethod, format!("{} has no method named {method}", value.kind()));
    if let Some(s) = value.as_str() {
        let strip_set = |i: usize| -> Result<Option<Vec<char>>, JinjaError> {
            Ok(str_arg(args, i, method)?.map(|c| c.chars().collect()))
        };
        let rv: Value = match method {
            "strip" | "lstrip" | "rstrip" => {
                let set = strip_set(0)?;
                let is_strip = |c: char| set.as_ref().map_or(c.is_whitespace(), |set| set.contains(&c));
                Value::from(match method {
                    "strip" => s.trim_matches(is_strip),
                    "lstrip" => s.trim_start_matches(is_strip),
                    _ => s.trim_end_matches(is_strip),
                })
            }
            "startswith" | "endswith" => {
                let arg = args.first().ok_or_else(|| bad_args(method, "missing argument"))?;
                let candidates: Vec<String> = if let Some(p) = arg.as_str() {
                    vec![p.to_string()]
                } else {
                    arg.try_iter()?.map(|v| v.as_str().map(str::to_string).unwrap_or_default()).collect()
                };
                let hit = candidates
                    .iter()
                    .any(|p| if method == "startswith" { s.starts_with(p.as_str()) } else { s.ends_with(p.as_str()) });
                Value::from(hit)
            }
            "upper" => Value::from(s.to_uppercase()),
            "lower" => Value::from(s.to_lowercase()),
            "capitalize" => {
                let mut cs = s.chars();
                Value::from(match cs.next() {
                    Some(first) => first.to_uppercase().chain(cs.flat_map(char::to_lowercase)).collect::<String>(),
                    None => String::new(),
                })
            }
            "title" => {
                let mut out = String::with_capacity(s.len());
                let mut prev_cased = false;
                for c in s.chars() {
                    if prev_cased {
                        out.extend(c.to_lowercase());
                    } else {
                        out.extend(c.to_uppercase());
                    }
                    prev_cased = c.is_alphabetic();
                }
                Value::from(out)
            }
            "replace" => {
                let old = str_arg(args, 0, method)?.ok_or_else(|| bad_args(method, "missing argument"))?;
                let new = str_arg(args, 1, method)?.ok_or_else(|| bad_args(method, "missing argument"))?;
                match args.get(2).and_then(Value::as_i64) {
                    Some(n) if n >= 0 => Value::from(s.replacen(old, new, n as usize)),
                    _ => Value::from(s.replace(old, new)),
                }
            }
            "split" | "rsplit" => {
                let sep = str_arg(args, 0, method)?;
                let max = args.get(1).and_then(Value::as_i64).filter(|&n| n >= 0).map(|n| n as usize);
                let parts: Vec<Value> = match (sep, max, method) {
                    (None, None, _) => s.split_whitespace().map(Value::from).collect(),
                    (None, Some(_), _) => {
                        return Err(bad_args(method, "maxsplit without a separator is not supported"));
                    }
                    (Some(""), _, _) => return Err(bad_args(method, "empty separator")),
                    (Some(sep), None, _) => s.split(sep).map(Value::from).collect(),
                    (Some(sep), Some(n), "split") => s.splitn(n + 1, sep).map(Value::from).collect(),
                    (Some(sep), Some(n), _) => {
                        let mut v: Vec<Value> = s.rsplitn(n + 1, sep).map(Value::from).collect();
                        v.reverse();
                        v
                    }
                };
                Value::from(parts)
            }
            "find" => {
                let sub = str_arg(args, 0, method)?.ok_or_else(|| bad_args(method, "missing argument"))?;
                Value::from(s.find(sub).map_or(-1, |b| s[..b].chars().count() as i64))
            }
            "count" => {
                let sub = str_arg(args, 0, method)?.ok_or_else(|| bad_args(method, "missing argument"))?;
                Value::from(if sub.is_empty() { s.chars().count() + 1 } else { s.matches(sub).count() })
            }
            "isdigit" => Value::from(!s.is_empty() && s.chars().all(|c| c.is_numeric())),
            "isspace" => Value::from(!s.is_empty() && s.chars().all(char::is_whitespace)),
            "join" => {
                let arg = args.first().ok_or_else(|| bad_args(method, "missing argument"))?;
                let parts: Vec<String> = arg.try_iter()?.map(|v| v.to_string()).collect();
                Value::from(parts.join(s))
            }
            _ => return Err(unknown()),
        };
        return Ok(rv);
    }
    if value.kind() == ValueKind::Map {
        return match method {
            "items" => {
                let pairs: Result<Vec<Value>, JinjaError> =
                    value.try_iter()?.map(|k| Ok(Value::from(vec![k.clone(), value.get_item(&k)?]))).collect();
                Ok(Value::from(pairs?))
            }
            "keys" => Ok(Value::from(value.try_iter()?.collect::<Vec<_>>())),
            "values" => {
                let vals: Result<Vec<Value>, JinjaError> = value.try_iter()?.map(|k| value.get_item(&k)).collect();
                Ok(Value::from(vals?))
            }
            "get" => {
                let key = args.first().ok_or_else(|| bad_args(method, "missing argument"))?;
                let v = value.get_item(key)?;
                Ok(if v.is_undefined() { args.get(1).cloned().unwrap_or(Value::from(())) } else { v })
            }
            _ => Err(unknown()),
        };
    }
    Err(unknown())
}

/// The GGUF a model path stands for: the path itself (a `.gguf` file), or the base model a
/// model directory's `config.json` names; `None` for a safetensors checkpoint directory.
pub fn model_gguf(model: &std::path::Path) -> Result<Option<std::path::PathBuf>, ToolError> {
    if indexcache_model::gguf::is_gguf_file(model) {
        return Ok(Some(model.to_path_buf()));
    }
    Ok(indexcache_model::gguf::read_model_dir(model)?.map(|d| d.gguf))
}

/// The tokenizer of a model: `explicit` (a `tokenizer.json`) when given; a GGUF model's own
/// (built from its metadata); else the checkpoint directory's `tokenizer.json`. `None` when the
/// model has none.
pub fn model_tokenizer(
    model: &std::path::Path,
    explicit: Option<&std::path::Path>,
) -> Result<Option<Tokenizer>, ToolError> {
    if let Some(p) = explicit {
        return Tokenizer::from_file(p).map(Some).map_err(|e| ToolError::file(p, e));
    }
    if let Some(g) = model_gguf(model)? {
        return Ok(Some(tokenizer_from_gguf(&GgufFile::open(&g)?)?));
    }
    let p = model.join("tokenizer.json");
    match p.is_file() {
        true => Tokenizer::from_file(&p).map(Some).map_err(|e| ToolError::file(&p, e)),
        false => Ok(None),
    }
}

/// A GGUF model's chat template (`tokenizer.chat_template`), if it has one.
pub fn model_chat_template(model: &std::path::Path) -> Result<Option<ChatTemplate>, ToolError> {
    match model_gguf(model)? {
        Some(g) => ChatTemplate::from_gguf(&GgufFile::open(&g)?),
        None => Ok(None),
    }
}
