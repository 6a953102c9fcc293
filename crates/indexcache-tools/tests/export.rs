//! Pattern export: transformers checkpoint directory, SGLang and vLLM override flags.

use indexcache_config::{ModelConfig, ScheduleError};
use indexcache_tools::ToolError;
use indexcache_tools::export::{ExportFormat, ExportOptions, FileAction, export};
use indexcache_tools::pattern::read_pattern;
use indexcache_weights::WeightStore;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn opts(format: ExportFormat, pattern: &str, model: Option<&str>, out: Option<&Path>) -> ExportOptions {
    ExportOptions {
        format,
        pattern: pattern.to_string(),
        model: model.map(fixture),
        out: out.map(Path::to_path_buf),
        force: false,
    }
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn hf_round_trip_keeps_everything_else() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let r = export(&opts(ExportFormat::Hf, "FSSF", Some("ds32-yarn"), Some(&out))).unwrap();
    assert_eq!(r.pattern, "FSSF");
    assert_eq!(r.full_layers, vec![0, 3]);
    assert!(r.warnings.iter().all(|w| !w.contains("indexer weights")), "{:?}", r.warnings);
    assert_eq!(r.args, None);

    // The engine reads the pattern back.
    let cfg = ModelConfig::from_file(&out.join("config.json")).unwrap();
    assert_eq!(cfg.schedule.to_pattern(), "FSSF");

    // Every other key is unchanged; the pattern keys are set.
    let src_text = std::fs::read_to_string(fixture("ds32-yarn/config.json")).unwrap();
    let out_text = std::fs::read_to_string(out.join("config.json")).unwrap();
    let mut a = json(&fixture("ds32-yarn/config.json"));
    let mut b = json(&out.join("config.json"));
    assert_eq!(b["indexer_types"], serde_json::json!(["full", "shared", "shared", "full"]));
    assert_eq!(b["index_topk_pattern"], "FSSF");
    assert_eq!(b["use_index_cache"], true);
    for k in ["indexer_types", "index_topk_pattern", "use_index_cache", "index_topk_freq", "index_skip_topk_offset"] {
        a.as_object_mut().unwrap().remove(k);
        b.as_object_mut().unwrap().remove(k);
    }
    assert_eq!(a, b);

    // Two-space indentation, original key order.
    assert!(out_text.starts_with("{\n  \"architectures\": [\n    \"DeepseekV32ForCausalLM\"\n  ],\n"), "{out_text}");
    assert!(out_text.ends_with("}\n"));
    let mut keys: Vec<&String> = a.as_object().unwrap().keys().collect();
    keys.sort_by_key(|k| src_text.find(&format!("\n  \"{k}\":")).unwrap());
    let positions: Vec<usize> = keys.iter().map(|k| out_text.find(&format!("\n  \"{k}\":")).unwrap()).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "key order changed");

    // The other files are there (hard-linked on the same filesystem) and the weights open.
    for name in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    {
        let f = r.files.iter().find(|f| f.name == name).unwrap_or_else(|| panic!("{name} missing"));
        assert!(matches!(f.action, FileAction::HardLinked | FileAction::Copied));
        assert_eq!(std::fs::read(out.join(name)).unwrap(), std::fs::read(fixture("ds32-yarn").join(name)).unwrap());
    }
    assert!(WeightStore::open(&out).unwrap().contains("model.layers.3.self_attn.indexer.wk.weight"));
    // The source config is untouched.
    assert_eq!(std::fs::read_to_string(fixture("ds32-yarn/config.json")).unwrap(), src_text);
}

#[test]
fn hf_replaces_indexer_types_and_drops_freq() {
    // glm5-fp8 has index_topk_freq 2 and its own indexer_types (FFSF).
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let r = export(&opts(ExportFormat::Hf, "FSSF", Some("glm5-fp8"), Some(&out)));
    let r = r.unwrap();
    let b = json(&out.join("config.json"));
    assert_eq!(b["indexer_types"], serde_json::json!(["full", "shared", "shared", "full"]));
    assert!(b.get("index_topk_freq").is_none());
    assert_eq!(ModelConfig::from_file(&out.join("config.json")).unwrap().schedule.to_pattern(), "FSSF");
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

#[test]
fn hf_refuses_non_empty_out_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    export(&opts(ExportFormat::Hf, "FSSF", Some("ds32-yarn"), Some(&out))).unwrap();
    let e = export(&opts(ExportFormat::Hf, "FFSF", Some("ds32-yarn"), Some(&out))).unwrap_err();
    assert!(e.to_string().contains("not empty"), "{e}");
    let mut o = opts(ExportFormat::Hf, "FFSF", Some("ds32-yarn"), Some(&out));
    o.force = true;
    export(&o).unwrap();
    assert_eq!(ModelConfig::from_file(&out.join("config.json")).unwrap().schedule.to_pattern(), "FFSF");
    // The source config was not written through a link.
    assert!(json(&fixture("ds32-yarn/config.json")).get("index_topk_pattern").is_none());

    // Never into the model directory itself, even with --force.
    let mut o = opts(ExportFormat::Hf, "FSSF", Some("ds32-yarn"), Some(&fixture("ds32-yarn")));
    o.force = true;
    let e = export(&o).unwrap_err();
    assert!(e.to_string().contains("is the model directory"), "{e}");
}

#[test]
fn indexcache_format_on_a_checkpoint_is_the_hf_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("hf"), tmp.path().join("ic"));
    let ra = export(&opts(ExportFormat::Hf, "FSSF", Some("ds32-yarn"), Some(&a))).unwrap();
    let rb = export(&opts(ExportFormat::Indexcache, "FSSF", Some("ds32-yarn"), Some(&b))).unwrap();
    assert_eq!(ra.files, rb.files);
    assert_eq!(std::fs::read(a.join("config.json")).unwrap(), std::fs::read(b.join("config.json")).unwrap());
    let e = export(&opts(ExportFormat::Indexcache, "FSSF", Some("ds32-yarn"), None)).unwrap_err();
    assert!(e.to_string().contains("indexcache export needs --out"), "{e}");
}

#[test]
fn hf_needs_model_and_out() {
    let e = export(&opts(ExportFormat::Hf, "FSSF", None, Some(Path::new("/tmp/x")))).unwrap_err();
    assert!(e.to_string().contains("--model"), "{e}");
    let e = export(&opts(ExportFormat::Hf, "FSSF", Some("ds32-yarn"), None)).unwrap_err();
    assert!(e.to_string().contains("--out"), "{e}");
}

#[test]
fn sglang_and_vllm_strings() {
    let r = export(&opts(ExportFormat::Sglang, "FSSF", Some("ds32-yarn"), None)).unwrap();
    assert_eq!(r.args.as_deref(), Some(r#"--json-model-override-args '{"index_topk_pattern": "FSSF"}'"#));
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let r = export(&opts(ExportFormat::Vllm, "FSSF", Some("ds32-yarn"), None)).unwrap();
    assert_eq!(r.args.as_deref(), Some(r#"--hf-overrides '{"use_index_cache": true, "index_topk_pattern": "FSSF"}'"#));
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);

    // Without a model: the same strings, with a warning that nothing was checked.
    let r = export(&opts(ExportFormat::Sglang, "FSSSFSSS", None, None)).unwrap();
    assert_eq!(r.args.as_deref(), Some(r#"--json-model-override-args '{"index_topk_pattern": "FSSSFSSS"}'"#));
    assert_eq!(r.warnings.len(), 1);
    assert!(r.warnings[0].contains("no --model"), "{:?}", r.warnings);
}

#[test]
fn overrides_also_set_indexer_types_when_the_checkpoint_has_them() {
    // glm5-pattern's config has indexer_types, which wins over index_topk_pattern.
    let r = export(&opts(ExportFormat::Sglang, "FSSFSF", Some("glm5-pattern"), None)).unwrap();
    assert_eq!(
        r.args.as_deref(),
        Some(
            r#"--json-model-override-args '{"index_topk_pattern": "FSSFSF", "indexer_types": ["full", "shared", "shared", "full", "shared", "full"]}'"#
        )
    );
    assert!(r.warnings.iter().any(|w| w.contains("precedence")), "{:?}", r.warnings);
}

#[test]
fn warns_when_a_full_layer_has_no_indexer_weights() {
    // glm5-pattern holds indexers only on layers 0, 3, 5.
    for format in [ExportFormat::Sglang, ExportFormat::Vllm] {
        let r = export(&opts(format, "FFSFSF", Some("glm5-pattern"), None)).unwrap();
        let missing: Vec<&String> = r.warnings.iter().filter(|w| w.contains("no indexer weights")).collect();
        assert_eq!(missing.len(), 1, "{:?}", r.warnings);
        assert!(missing[0].contains("layer 1 ") && missing[0].contains("model.layers.1.self_attn.indexer.wk.weight"));
        assert!(missing[0].contains("[0, 3, 5]"), "{}", missing[0]);
    }
    let r = export(&opts(ExportFormat::Vllm, "FFFFFF", Some("glm5-pattern"), None)).unwrap();
    assert_eq!(r.warnings.iter().filter(|w| w.contains("no indexer weights")).count(), 3);
    // The checkpoint's own pattern: no indexer warning.
    let r = export(&opts(ExportFormat::Vllm, "FSSFSF", Some("glm5-pattern"), None)).unwrap();
    assert!(r.warnings.iter().all(|w| !w.contains("no indexer weights")), "{:?}", r.warnings);
    // hf export still writes, with the warning.
    let tmp = tempfile::tempdir().unwrap();
    let r = export(&opts(ExportFormat::Hf, "FFSFSF", Some("glm5-pattern"), Some(tmp.path()))).unwrap();
    assert!(r.warnings.iter().any(|w| w.contains("layer 1 ")), "{:?}", r.warnings);
}

#[test]
fn bad_patterns_are_errors() {
    let sched = |e: ToolError| match e {
        ToolError::Schedule(s) => s,
        other => panic!("expected a schedule error, got {other}"),
    };
    let e = export(&opts(ExportFormat::Vllm, "FSS", Some("ds32-yarn"), None)).unwrap_err();
    assert_eq!(sched(e), ScheduleError::WrongLength { expected: 4, got: 3 });
    let e = export(&opts(ExportFormat::Vllm, "SFFF", None, None)).unwrap_err();
    assert_eq!(sched(e), ScheduleError::SharedFirstLayer);
    let e = export(&opts(ExportFormat::Sglang, "FSXF", None, None)).unwrap_err();
    assert_eq!(sched(e), ScheduleError::BadChar { layer: 2, ch: 'X' });
    let e = export(&opts(ExportFormat::Sglang, "fssf", None, None)).unwrap_err();
    assert_eq!(sched(e), ScheduleError::BadChar { layer: 0, ch: 'f' });
    let e = export(&opts(ExportFormat::Sglang, "", None, None)).unwrap_err();
    assert_eq!(sched(e), ScheduleError::Empty);
    // A path that does not exist is a missing file, not a bad pattern.
    let e = export(&opts(ExportFormat::Sglang, "runs/pattern.json", None, None)).unwrap_err();
    assert!(e.to_string().contains("no such pattern file"), "{e}");
    // --out makes no sense for the override flags.
    let e = export(&opts(ExportFormat::Sglang, "FS", None, Some(Path::new("x")))).unwrap_err();
    assert!(e.to_string().contains("only used by the hf and indexcache formats"), "{e}");
    assert!("onnx".parse::<ExportFormat>().is_err());
    assert_eq!("vLLM".parse::<ExportFormat>().unwrap(), ExportFormat::Vllm);
}

#[test]
fn pattern_files() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |name: &str, body: &str| {
        let path = tmp.path().join(name);
        std::fs::write(&path, body).unwrap();
        path.to_str().unwrap().to_string()
    };
    // A search result.
    let f = p("pattern.json", r#"{"fingerprint": "x", "layers": 4, "pattern": "FSSF", "done": true, "steps": []}"#);
    let r = read_pattern(&f).unwrap();
    assert_eq!(r.pattern, "FSSF");
    assert!(r.warnings.is_empty());
    let out = export(&opts(ExportFormat::Sglang, &f, Some("ds32-yarn"), None)).unwrap();
    assert_eq!(out.pattern, "FSSF");
    // An unfinished search: exported, with a warning.
    let f = p("running.json", r#"{"pattern": "FFSF", "done": false}"#);
    let out = export(&opts(ExportFormat::Vllm, &f, Some("ds32-yarn"), None)).unwrap();
    assert_eq!(out.pattern, "FFSF");
    assert!(out.warnings.iter().any(|w| w.contains("not finished")), "{:?}", out.warnings);
    // Plain text, wrapped.
    let f = p("pattern.txt", "FSS\nF\n");
    assert_eq!(read_pattern(&f).unwrap().pattern, "FSSF");
    // Not usable.
    let f = p("nopattern.json", r#"{"patern": "FSSF"}"#);
    assert!(read_pattern(&f).unwrap_err().to_string().contains("no \"pattern\" string field"));
    let f = p("broken.json", r#"{"pattern": "FSSF""#);
    assert!(read_pattern(&f).unwrap_err().to_string().contains("invalid JSON"));
    let f = p("empty.txt", "\n");
    assert!(read_pattern(&f).unwrap_err().to_string().contains("empty"));
    // A literal.
    assert_eq!(read_pattern(" FSSF ").unwrap().pattern, "FSSF");
}
