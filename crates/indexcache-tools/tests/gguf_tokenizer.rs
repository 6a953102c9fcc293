//! The tokenizer and chat template built from a GGUF's metadata.
//!
//! * Synthetic files (a metadata-only GGUF written below) check the construction rule by rule —
//!   byte-level respelling, merges, control/user-defined tokens, BOS, the two pre-tokenizer
//!   flavours — and that every unsupported or malformed input is an error naming the file and key.
//! * The real SmolLM2-135M-Instruct GGUF (`data/models/smollm2/`, fetched by
//!   `scripts/fetch_smollm2.sh`) is compared with what transformers 5.24 builds from it
//!   (`tests/fixtures/smollm2/reference.json` and `reference.safetensors`, written by
//!   `scripts/fixtures/smollm2_reference.py`): ids, decoding and the rendered chat template must
//!   be identical. These tests skip, saying so, when the GGUF or the fixture is absent.

use std::path::{Path, PathBuf};

use indexcache_tools::ToolError;
use indexcache_tools::gguf_tokenizer::{
    ChatMessage, ChatTemplate, PreTokenizerFlavor, tokenizer_from_gguf, tokenizer_from_gguf_with,
};
use indexcache_weights::GgufFile;
use tokenizers::Tokenizer;

// ---------------------------------------------------------------------------------------------
// A metadata-only GGUF writer
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
enum V {
    U32(u32),
    I32(i32),
    Bool(bool),
    Str(String),
    StrArr(Vec<String>),
    I32Arr(Vec<i32>),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn gguf_bytes(kvs: &[(&str, V)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend(0u64.to_le_bytes()); // tensors
    out.extend((kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        put_str(&mut out, k);
        match v {
            V::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            V::I32(x) => {
                out.extend(5u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            V::Bool(b) => {
                out.extend(7u32.to_le_bytes());
                out.push(u8::from(*b));
            }
            V::Str(s) => {
                out.extend(8u32.to_le_bytes());
                put_str(&mut out, s);
            }
            V::StrArr(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for s in items {
                    put_str(&mut out, s);
                }
            }
            V::I32Arr(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for x in items {
                    out.extend(x.to_le_bytes());
                }
            }
        }
    }
    out.resize(out.len().div_ceil(32) * 32, 0);
    out
}

/// Writes the file into `dir` and opens it.
fn open_gguf(dir: &Path, name: &str, kvs: &[(&str, V)]) -> GgufFile {
    let p = dir.join(name);
    std::fs::write(&p, gguf_bytes(kvs)).expect("write gguf");
    GgufFile::open(&p).expect("open gguf")
}

/// GPT-2's byte → character table.
fn byte_char(b: u8) -> char {
    let mut next = 256u32;
    for x in 0..=255u8 {
        let printable = matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            u32::from(x)
        } else {
            next += 1;
            next - 1
        };
        if x == b {
            return char::from_u32(code).unwrap();
        }
    }
    unreachable!()
}

fn spell(s: &str) -> String {
    s.bytes().map(byte_char).collect()
}

// Ids of the tiny vocabulary: the 256 byte tokens in byte order, then these.
const IM_START: u32 = 256;
const THINK: u32 = 257;
const HE: u32 = 258;
const LL: u32 = 259;
const HELL: u32 = 260;
const HELLO: u32 = 261;
const SPACE2: u32 = 262;
const NICHI: u32 = 263; // "日", written raw: not in the byte alphabet
const NICHI_PREFIX: u32 = 264;
const ENDOFTEXT: u32 = 265;

/// A tiny byte-level vocabulary: tokens, token types and merges.
fn tiny_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    let nichi = spell("日");
    let nichi_prefix: String = nichi.chars().take(2).collect();
    let nichi_last: String = nichi.chars().skip(2).collect();
    tokens.extend(
        ["<|im_start|>", "<think>", "he", "ll", "hell", "hello", "ĠĠ", "日", nichi_prefix.as_str(), "<|endoftext|>"]
            .map(String::from),
    );
    let mut types = vec![1; tokens.len()];
    types[IM_START as usize] = 3;
    types[THINK as usize] = 4;
    types[ENDOFTEXT as usize] = 3;
    let n0: String = nichi.chars().next().unwrap().to_string();
    let n1: String = nichi.chars().nth(1).unwrap().to_string();
    let merges = vec![
        "h e".to_string(),
        "l l".to_string(),
        "he ll".to_string(),
        "hell o".to_string(),
        "Ġ Ġ".to_string(),
        format!("{n0} {n1}"),
        format!("{nichi_prefix} {nichi_last}"),
    ];
    (tokens, types, merges)
}

fn tiny_kvs(pre: &str) -> Vec<(&'static str, V)> {
    let (tokens, types, merges) = tiny_vocab();
    vec![
        ("general.architecture", V::Str("llama".into())),
        ("tokenizer.ggml.model", V::Str("gpt2".into())),
        ("tokenizer.ggml.pre", V::Str(pre.into())),
        ("tokenizer.ggml.tokens", V::StrArr(tokens)),
        ("tokenizer.ggml.token_type", V::I32Arr(types)),
        ("tokenizer.ggml.merges", V::StrArr(merges)),
        ("tokenizer.ggml.bos_token_id", V::U32(IM_START)),
        ("tokenizer.ggml.eos_token_id", V::U32(ENDOFTEXT)),
        ("tokenizer.ggml.add_bos_token", V::Bool(false)),
    ]
}

fn replace(kvs: &mut Vec<(&'static str, V)>, key: &'static str, v: Option<V>) {
    kvs.retain(|(k, _)| *k != key);
    if let Some(v) = v {
        kvs.push((key, v));
    }
}

fn ids(tok: &Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, true).expect("encode").get_ids().to_vec()
}

fn err_text(r: Result<Tokenizer, ToolError>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} should mention {p:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Synthetic files
// ---------------------------------------------------------------------------------------------

#[test]
fn tiny_byte_level_bpe() {
    let d = tempfile::tempdir().unwrap();
    let g = open_gguf(d.path(), "tiny.gguf", &tiny_kvs("smollm"));
    let tok = tokenizer_from_gguf(&g).expect("tokenizer");

    let sp = u32::from(b' ');
    // Merges apply; the control token is one id; a raw token outside the byte alphabet is found
    // under its byte-level spelling; the user-defined token is one id; GPT-2's regex gives the
    // space before a digit to the digit's chunk.
    let text = "hello<|im_start|>日 <think>  1";
    let got = ids(&tok, text);
    assert_eq!(got, [HELLO, IM_START, NICHI, sp, THINK, sp, sp, u32::from(b'1')]);
    assert_eq!(tok.decode(&got, false).unwrap(), text);
    // Only the control token is special.
    assert_eq!(tok.decode(&got, true).unwrap(), "hello日 <think>  1");
    assert_eq!(ids(&tok, "hell"), [HELL]);
    assert_eq!(ids(&tok, "he ll"), [HE, sp, LL]);
    assert_eq!(ids(&tok, "   x"), [SPACE2, sp, u32::from(b'x')]);
    // Added tokens keep their ids; nothing was appended to the vocabulary.
    assert_eq!(tok.get_vocab_size(true), 266);
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(ENDOFTEXT));
    assert_eq!(tok.token_to_id(&spell("日")), Some(NICHI));
    assert_eq!(tok.token_to_id(&spell("日").chars().take(2).collect::<String>()), Some(NICHI_PREFIX));

    // llama.cpp's smollm rule isolates digits first: the two spaces stay one chunk.
    let llama = tokenizer_from_gguf_with(&g, PreTokenizerFlavor::LlamaCpp).expect("llama.cpp flavour");
    assert_eq!(ids(&llama, "  1"), [SPACE2, u32::from(b'1')]);
    assert_eq!(ids(&tok, "  1"), [sp, sp, u32::from(b'1')]);
    assert_eq!(ids(&llama, "hello12"), [HELLO, u32::from(b'1'), u32::from(b'2')]);
}

#[test]
fn gpt2_and_default_pre_match_smollm_under_transformers() {
    let d = tempfile::tempdir().unwrap();
    let reference = tokenizer_from_gguf(&open_gguf(d.path(), "s.gguf", &tiny_kvs("smollm"))).unwrap();
    for pre in ["gpt2", "default"] {
        let tok = tokenizer_from_gguf(&open_gguf(d.path(), &format!("{pre}.gguf"), &tiny_kvs(pre))).unwrap();
        for text in ["hello  1 world", "日日 <|im_start|>x", "\t\t42"] {
            assert_eq!(ids(&tok, text), ids(&reference, text), "pre={pre} text={text:?}");
        }
    }
    // With no `pre` key at all, `default` is assumed.
    let mut kvs = tiny_kvs("x");
    replace(&mut kvs, "tokenizer.ggml.pre", None);
    let tok = tokenizer_from_gguf(&open_gguf(d.path(), "nopre.gguf", &kvs)).unwrap();
    assert_eq!(ids(&tok, "hello  1"), ids(&reference, "hello  1"));
}

#[test]
fn split_regex_pre_tokenizers() {
    // llama3's split keeps a non-letter prefix with the letters ("(x" stays together) and
    // groups digits by three.
    let d = tempfile::tempdir().unwrap();
    let tok = tokenizer_from_gguf(&open_gguf(d.path(), "l3.gguf", &tiny_kvs("llama-bpe"))).unwrap();
    let enc = tok.encode("f(hello 12345", false).unwrap();
    let words: Vec<Option<u32>> = enc.get_word_ids().to_vec();
    // "f", "(hello", " ", "123", "45" → word ids 0, 1×2, 2, 3×3, 4×2.
    let first_of_word: Vec<u32> = enc.get_ids().to_vec();
    assert_eq!(first_of_word[..3], [u32::from(b'f'), u32::from(b'('), HELLO]);
    assert_eq!(words, [Some(0), Some(1), Some(1), Some(2), Some(3), Some(3), Some(3), Some(4), Some(4)]);
}

#[test]
fn add_bos_token_prepends_bos() {
    let d = tempfile::tempdir().unwrap();
    let mut kvs = tiny_kvs("smollm");
    replace(&mut kvs, "tokenizer.ggml.add_bos_token", Some(V::Bool(true)));
    let tok = tokenizer_from_gguf(&open_gguf(d.path(), "bos.gguf", &kvs)).unwrap();
    assert_eq!(ids(&tok, "hello"), [IM_START, HELLO]);
    assert_eq!(tok.encode("hello", false).unwrap().get_ids(), [HELLO]);

    replace(&mut kvs, "tokenizer.ggml.add_eos_token", Some(V::Bool(true)));
    let tok = tokenizer_from_gguf(&open_gguf(d.path(), "eos.gguf", &kvs)).unwrap();
    assert_eq!(ids(&tok, "hello"), [IM_START, HELLO, ENDOFTEXT]);
}

#[test]
fn named_special_token_that_is_not_control_becomes_special() {
    // "hello" is a normal token; naming it as EOS makes it an added special token, so it is
    // matched whole in text and skipped when decoding with skip_special_tokens.
    let d = tempfile::tempdir().unwrap();
    let mut kvs = tiny_kvs("smollm");
    replace(&mut kvs, "tokenizer.ggml.eos_token_id", Some(V::U32(HELLO)));
    let tok = tokenizer_from_gguf(&open_gguf(d.path(), "named.gguf", &kvs)).unwrap();
    assert_eq!(ids(&tok, "xhellox"), [u32::from(b'x'), HELLO, u32::from(b'x')]);
    assert_eq!(tok.decode(&[u32::from(b'x'), HELLO], true).unwrap(), "x");
}

#[test]
fn unsupported_and_malformed_files_are_errors_naming_file_and_key() {
    let d = tempfile::tempdir().unwrap();
    let path_of = |name: &str| d.path().join(name).display().to_string();

    let mut kvs = tiny_kvs("smollm");
    replace(&mut kvs, "tokenizer.ggml.model", Some(V::Str("llama".into())));
    let msg = err_text(tokenizer_from_gguf(&open_gguf(d.path(), "spm.gguf", &kvs)));
    assert_has(&msg, &[&path_of("spm.gguf"), "tokenizer.ggml.model", "\"llama\"", "unsupported"]);

    let msg = err_text(tokenizer_from_gguf(&open_gguf(d.path(), "pre.gguf", &tiny_kvs("no-such-pre"))));
    assert_has(&msg, &[&path_of("pre.gguf"), "tokenizer.ggml.pre", "\"no-such-pre\"", "smollm"]);

    let mut kvs = tiny_kvs("smollm");
    replace(&mut kvs, "tokenizer.ggml.model", None);
    let msg = err_text(tokenizer_from_gguf(&open_gguf(d.path(), "nomodel.gguf", &kvs)));
    assert_has(&msg, &[&path_of("nomodel.gguf"), "tokenizer.ggml.model", "not found"]);

    let mut kvs = tiny_kvs("smollm");
    replace(&mut kvs, "tokenizer.ggml.merges", None);
    let msg = err_text(tokenizer_from_gguf(&open_gguf(d.path(), "nomerges.gguf", &kvs)));
    assert_has(&msg, &[&path_of("nomerges.gguf"), "tokenizer.ggml.merges", "not found"]);

    let mut kvs = tiny_kvs("smollm");
    replace(&mut kvs, "tokenizer.ggml.merges", Some(V::StrArr(vec!["h e".into(), "a b c".into()])));
    let msg = err_text(tokenizer_from_gguf(&open_gguf(d.path(), "badmerge.gguf", &kvs)));
    assert_has(&msg, &[&path_of("badmerge.gguf"), "tokenizer.ggml.merges", "merge 1", "a b c"]);

    let mut kvs = tiny_kvs("smollm");
    replace(&mut kvs, "tokenizer.ggml.merges", Some(V::StrArr(vec!["h zz".into()])));
    let msg = err_text(tokenizer_from_gguf(&open_gguf(d.path(), "oov.gguf", &kvs)));
    assert_has(&msg, &[&path_of("oov.gguf"), "tokenizer.ggml.merges", "zz"]);

    let mut kvs = tiny_kvs("smollm");
    replace(&mut kvs, "tokenizer.ggml.token_type", Some(V::I32Arr(vec![1; 10])));
    let msg = err_text(tokenizer_from_gguf(&open_gguf(d.path(), "types.gguf", &kvs)));
    assert_has(&msg, &[&path_of("types.gguf"), "tokenizer.ggml.token_type", "10", "266"]);

    let mut kvs = tiny_kvs("smollm");
    replace(&mut kvs, "tokenizer.ggml.bos_token_id", Some(V::U32(9999)));
    let msg = err_text(tokenizer_from_gguf(&open_gguf(d.path(), "bosid.gguf", &kvs)));
    assert_has(&msg, &[&path_of("bosid.gguf"), "tokenizer.ggml.bos_token_id", "9999", "out of range"]);

    let mut kvs = tiny_kvs("smollm");
    replace(&mut kvs, "tokenizer.ggml.bos_token_id", Some(V::I32(-1)));
    let msg = err_text(tokenizer_from_gguf(&open_gguf(d.path(), "negbos.gguf", &kvs)));
    assert_has(&msg, &[&path_of("negbos.gguf"), "tokenizer.ggml.bos_token_id"]);

    let mut kvs = tiny_kvs("smollm");
    replace(&mut kvs, "tokenizer.ggml.tokens", Some(V::Str("oops".into())));
    let msg = err_text(tokenizer_from_gguf(&open_gguf(d.path(), "tokstr.gguf", &kvs)));
    assert_has(&msg, &[&path_of("tokstr.gguf"), "tokenizer.ggml.tokens", "array of string"]);
}

// ---------------------------------------------------------------------------------------------
// Chat templates
// ---------------------------------------------------------------------------------------------

const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn msgs(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
    pairs.iter().map(|(r, c)| ChatMessage::new(*r, *c)).collect()
}

#[test]
fn chat_template_from_gguf() {
    let d = tempfile::tempdir().unwrap();
    let g = open_gguf(d.path(), "nochat.gguf", &tiny_kvs("smollm"));
    assert!(ChatTemplate::from_gguf(&g).unwrap().is_none());

    let mut kvs = tiny_kvs("smollm");
    kvs.push(("tokenizer.chat_template", V::Str("{{ bos_token }}|{{ eos_token }}|{{ messages[0].content }}".into())));
    let g = open_gguf(d.path(), "chat.gguf", &kvs);
    let t = ChatTemplate::from_gguf(&g).unwrap().expect("template");
    assert_eq!(t.bos_token(), Some("<|im_start|>"));
    assert_eq!(t.eos_token(), Some("<|endoftext|>"));
    assert_eq!(t.render(&msgs(&[("user", "hi")]), false).unwrap(), "<|im_start|>|<|endoftext|>|hi");

    let mut kvs = tiny_kvs("smollm");
    kvs.push(("tokenizer.chat_template", V::Str("{% for m in messages %}".into())));
    let g = open_gguf(d.path(), "badchat.gguf", &kvs);
    let msg = ChatTemplate::from_gguf(&g).unwrap_err().to_string();
    assert_has(&msg, &[&d.path().join("badchat.gguf").display().to_string(), "tokenizer.chat_template"]);
}

#[test]
fn chatml_renders_like_transformers() {
    let t = ChatTemplate::new(CHATML, Some("<|im_start|>".into()), Some("<|im_end|>".into())).unwrap();
    assert_eq!(
        t.render(&msgs(&[("user", "Hi")]), true).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        t.render(&msgs(&[("system", "S"), ("user", "U"), ("assistant", "A")]), false).unwrap(),
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    );
}

#[test]
fn template_features_transformers_provides() {
    // trim_blocks + lstrip_blocks: block tags leave no newline or indentation behind; the final
    // newline of the template is dropped (keep_trailing_newline=False).
    let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content.strip() }}]\n    {% endif %}\n{% endfor %}\n";
    let t = ChatTemplate::new(src, None, None).unwrap();
    assert_eq!(t.render(&msgs(&[("user", "  a  "), ("x", "b"), ("user", "c")]), false).unwrap(), "[a]\n[c]\n");

    // raise_exception aborts with the template's message.
    let t = ChatTemplate::new(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must start with user') }}{% endif %}ok",
        None,
        None,
    )
    .unwrap();
    assert_eq!(t.render(&msgs(&[("user", "x")]), false).unwrap(), "ok");
    let msg = t.render(&msgs(&[("assistant", "x")]), false).unwrap_err().to_string();
    assert!(msg.contains("Conversation roles must start with user"), "{msg}");

    // Loop controls, Python string/dict methods, tojson without HTML escaping.
    let t = ChatTemplate::new(
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}\
         {% if m.content.startswith('skip') %}{% continue %}{% endif %}\
         {{ m.role.upper() }}={{ m.content.split(',')|join('+') }};{% endfor %}\
         {{ messages[0] | tojson }}|{{ {'a': 1}.get('b', 'dflt') }}|\
         {% for k, v in messages[0].items() %}{{ k }}:{{ v }} {% endfor %}|{{ '<x>'|tojson }}",
        None,
        None,
    )
    .unwrap();
    let out = t.render(&msgs(&[("user", "a,b"), ("sys", "skip me"), ("late", "never")]), false).unwrap();
    assert_eq!(out, "USER=a+b;{\"role\": \"user\", \"content\": \"a,b\"}|dflt|role:user content:a,b |\"<x>\"");

    // Undefined names are empty, as with jinja2's default Undefined.
    let t = ChatTemplate::new("[{{ tools }}]{% if tools %}T{% endif %}", None, None).unwrap();
    assert_eq!(t.render(&[], true).unwrap(), "[]");
}

// ---------------------------------------------------------------------------------------------
// The real SmolLM2 GGUF against transformers
// ---------------------------------------------------------------------------------------------

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn smollm2() -> Option<GgufFile> {
    let p = root().join("data/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !p.is_file() {
        eprintln!("SKIP: {} is absent (run scripts/fetch_smollm2.sh)", p.display());
        return None;
    }
    Some(GgufFile::open(&p).expect("open SmolLM2 GGUF"))
}

fn reference() -> Option<serde_json::Value> {
    let p = root().join("tests/fixtures/smollm2/reference.json");
    if !p.is_file() {
        eprintln!("SKIP: {} is absent", p.display());
        return None;
    }
    Some(serde_json::from_str(&std::fs::read_to_string(&p).expect("read reference.json")).expect("parse"))
}

fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

#[test]
fn smollm2_metadata_and_special_tokens() {
    let Some(g) = smollm2() else { return };
    assert_eq!(g.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
    let tok = tokenizer_from_gguf(&g).expect("tokenizer");
    assert_eq!(tok.get_vocab_size(true), 49152);
    for (t, id) in [("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2), ("<empty_output>", 16)] {
        assert_eq!(tok.token_to_id(t), Some(id), "{t}");
        assert_eq!(ids(&tok, t), [id], "{t} encodes as one id");
    }
    // add_bos_token = false: nothing is added around the text.
    assert_eq!(ids(&tok, "Hello world"), tok.encode("Hello world", false).unwrap().get_ids());

    let Some(r) = reference() else { return };
    let t = &r["tokenizer"];
    for (name, id_key) in [("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "pad_token_id")]
    {
        let token = t[name].as_str().expect(name);
        assert_eq!(tok.token_to_id(token), t[id_key].as_u64().map(|x| x as u32), "{name}");
    }
    assert_eq!(tok.token_to_id(t["unk_token"].as_str().unwrap()), Some(0));
    assert_eq!(tok.get_vocab_size(true) as u64, t["len"].as_u64().unwrap());
    assert_eq!(t["adds_bos"].as_bool(), Some(false));
}

#[test]
fn smollm2_tokenizer_matches_transformers() {
    let (Some(g), Some(r)) = (smollm2(), reference()) else { return };
    let tok = tokenizer_from_gguf(&g).expect("tokenizer");
    let llama = tokenizer_from_gguf_with(&g, PreTokenizerFlavor::LlamaCpp).expect("llama.cpp flavour");
    let checks = r["tokenizer_checks"].as_array().expect("tokenizer_checks");
    assert!(!checks.is_empty());
    let (mut matched, mut digit_split) = (0, 0);
    for c in checks {
        let text = c["text"].as_str().expect("text");
        let want = u32s(&c["ids"]);
        let got = ids(&tok, text);
        assert_eq!(got, want, "ids of {text:?}");
        let decoded = tok.decode(&got, false).expect("decode");
        assert_eq!(decoded, c["decoded"].as_str().expect("decoded"), "decode of {text:?}");
        matched += 1;
        // The llama.cpp / original tokenizer.json rule differs only where the fixture says so.
        let want_llama = c.get("ids_digits_split").map_or_else(|| want.clone(), u32s);
        assert_eq!(ids(&llama, text), want_llama, "llama.cpp-flavour ids of {text:?}");
        digit_split += usize::from(c.get("ids_digits_split").is_some());
    }
    eprintln!(
        "{matched}/{} tokenizer_checks strings match transformers (ids and decode); \
         {digit_split} differ under llama.cpp's digit split, as the fixture records",
        checks.len()
    );
}

#[test]
fn smollm2_prompts_greedy_text_and_chat_match_transformers() {
    let (Some(g), Some(r)) = (smollm2(), reference()) else { return };
    let st_path = root().join("tests/fixtures/smollm2/reference.safetensors");
    if !st_path.is_file() {
        eprintln!("SKIP: {} is absent", st_path.display());
        return;
    }
    let bytes = std::fs::read(&st_path).expect("read reference.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse reference.safetensors");
    let tensor_ids = |name: &str| -> Vec<u32> {
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), safetensors::Dtype::I32, "{name}");
        t.data().chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap()) as u32).collect()
    };
    let tok = tokenizer_from_gguf(&g).expect("tokenizer");

    let prompts = r["prompts"].as_array().expect("prompts");
    for p in prompts {
        let i = p["index"].as_u64().expect("index");
        let text = p["text"].as_str().expect("text");
        let want = tensor_ids(&format!("p{i}.input_ids"));
        assert_eq!(want.len() as u64, p["tokens"].as_u64().unwrap());
        assert_eq!(ids(&tok, text), want, "prompt {i}");
        assert_eq!(tok.decode(&want, false).unwrap(), text, "prompt {i} decodes back");
    }

    let greedy = &r["greedy"];
    let gids = u32s(&greedy["ids"]);
    let prompt = greedy["prompt"].as_u64().unwrap();
    assert_eq!(gids, tensor_ids(&format!("p{prompt}.greedy_ids")));
    assert_eq!(tok.decode(&gids, false).unwrap(), greedy["text"].as_str().unwrap());

    let chat = &r["chat"];
    let messages: Vec<ChatMessage> = chat["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    let template = ChatTemplate::from_gguf(&g).expect("chat template").expect("SmolLM2 has a chat template");
    let rendered = template.render(&messages, chat["add_generation_prompt"].as_bool().unwrap()).expect("render");
    assert_eq!(rendered, chat["rendered"].as_str().unwrap());
    // A prompt that is the rendered chat tokenizes as transformers tokenized it.
    if let Some(p) = prompts.iter().find(|p| p["text"].as_str() == Some(rendered.as_str())) {
        let i = p["index"].as_u64().unwrap();
        assert_eq!(ids(&tok, &rendered), tensor_ids(&format!("p{i}.input_ids")));
    }
    eprintln!("{} prompts, the greedy continuation and the chat render match transformers", prompts.len());
}
