//! End-to-end tests of the `indexcache` binary on the reference fixtures.

use std::path::PathBuf;
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> String {
    root().join("tests/fixtures").join(name).display().to_string()
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_indexcache")).args(args).output().expect("spawn indexcache")
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(o.status.success(), "{args:?} failed:\n{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let o = run(args);
    assert!(!o.status.success(), "{args:?} should fail");
    assert_eq!(o.status.code(), Some(2), "{args:?}");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn help_everywhere() {
    for cmd in ["info", "forward", "generate", "demo", "bench", "ppl", "search", "overlap", "eval", "export"] {
        let out = ok(&[cmd, "--help"]);
        assert!(out.contains("Usage:"), "{cmd}");
    }
}

#[test]
fn info_shows_schedule_and_cache_bytes() {
    let out = ok(&["info", "-m", &fixture("glm5-pattern")]);
    assert!(out.contains("FSSFSF") && out.contains("3 Full / 6 layers"), "{out}");
    assert!(out.contains("KV bytes/token"), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["info", "-m", &fixture("ds32-yarn"), "--keep", "1/2", "--json"])).unwrap();
    assert_eq!(json["schedule"], "FSFS");
    assert_eq!(json["full_layers"], 2);
    assert!(
        json["kv_bytes_per_token"]["engine_f32_schedule"].as_u64()
            < json["kv_bytes_per_token"]["engine_f32_all_full"].as_u64()
    );
    let json: serde_json::Value = serde_json::from_str(&ok(&["info", "-m", &fixture("glm5-fp8"), "--json"])).unwrap();
    assert!(json["quantization"].as_str().unwrap().contains("fp8"));
}

#[test]
fn schedule_errors_are_clear() {
    let err = fails(&["info", "-m", &fixture("glm5-pattern"), "--pattern", "FSS"]);
    assert!(err.contains("pattern has 3 characters but the model has 6 layers"), "{err}");
    let err = fails(&["info", "-m", &fixture("glm5-pattern"), "--index-cache", "off"]);
    assert!(err.contains("layer 1 is Full") && err.contains("no indexer weights"), "{err}");
    let err = fails(&["info", "-m", &fixture("glm5-pattern"), "--keep", "5/4"]);
    assert!(err.contains("invalid keep fraction"), "{err}");
    let err = fails(&["info", "-m", &fixture("glm5-pattern"), "--keep", "1/2", "--pattern", "FSSFSF"]);
    assert!(err.contains("cannot be used with"), "{err}");
    let err = fails(&["info", "-m", "/nonexistent/model"]);
    assert!(err.contains("/nonexistent/model/config.json"), "{err}");
}

#[test]
fn forward_writes_the_contract_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let ids = (0..40).map(|i| ((i * 37 + 11) % 256).to_string()).collect::<Vec<_>>().join(",");
    ok(&[
        "forward",
        "-m",
        &fixture("glm5-pattern"),
        "--input-ids",
        &ids,
        "--decode-last",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    assert_eq!(names, ["decode_logits", "logits", "topk.layer0", "topk.layer3", "topk.layer5"]);
    assert_eq!(st.tensor("logits").unwrap().shape(), &[40, 256]);
    assert_eq!(st.tensor("topk.layer3").unwrap().shape(), &[40, 16]);
    assert_eq!(st.tensor("topk.layer3").unwrap().dtype(), safetensors::Dtype::I32);
    assert_eq!(st.tensor("decode_logits").unwrap().shape(), &[3, 256]);
    // Row 2 sees 3 tokens: 3 positions then -1 padding.
    let t = st.tensor("topk.layer0").unwrap();
    let row2: Vec<i32> =
        t.data()[2 * 16 * 4..3 * 16 * 4].chunks(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(row2.iter().filter(|&&v| v >= 0).count(), 3);
    assert!(row2[3..].iter().all(|&v| v == -1));
    // Decode logits reproduce the last rows of the full pass.
    let f = |name: &str| -> Vec<f32> {
        st.tensor(name).unwrap().data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    };
    let (full, dec) = (f("logits"), f("decode_logits"));
    for (a, b) in dec.iter().zip(&full[37 * 256..]) {
        assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
    }
    let err =
        fails(&["forward", "-m", &fixture("glm5-pattern"), "--input-ids", "1,2,999", "--out", out.to_str().unwrap()]);
    assert!(err.contains("token id 999"), "{err}");
    let err = fails(&["forward", "-m", &fixture("glm5-pattern"), "--input-ids", "1,x", "--out", out.to_str().unwrap()]);
    assert!(err.contains("--input-ids: item 1"), "{err}");
}

#[test]
fn generate_and_demo_run_on_the_shipped_model() {
    let model = root().join("models/tiny-dsa").display().to_string();
    let o = run(&[
        "generate",
        "-m",
        &model,
        "-p",
        "Hello",
        "--max-tokens",
        "6",
        "--temperature",
        "0.7",
        "--top-p",
        "0.9",
        "--seed",
        "3",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("time to first token") && err.contains("tokens/s"), "{err}");
    let out = ok(&["demo", "--context", "300", "--decode", "4"]);
    assert!(out.contains("IndexCache 1/4 speedup"), "{out}");
    let err = fails(&["generate", "-m", &model, "-p", "x", "--max-tokens", "100000"]);
    assert!(err.contains("context too long"), "{err}");
}

#[test]
fn bench_ppl_and_search_on_a_fixture() {
    let m = fixture("ds32-yarn");
    let data = root().join("tests/fixtures/ds32-yarn/reference.safetensors").display().to_string();
    let b: serde_json::Value = serde_json::from_str(&ok(&[
        "bench",
        "-m",
        &m,
        "--contexts",
        "40",
        "--patterns",
        "full,1/2",
        "--decode",
        "2",
        "--json",
    ]))
    .unwrap();
    assert_eq!(b["rows"].as_array().unwrap().len(), 2);
    assert_eq!(b["rows"][1]["schedule"], "FSFS");
    let p: serde_json::Value =
        serde_json::from_str(&ok(&["ppl", "-m", &m, "--data", &data, "--ctx", "32", "--json"])).unwrap();
    assert_eq!(p["tokens"], 62);
    assert!(p["perplexity"].as_f64().unwrap() > 1.0);

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p.json");
    let out_s = out.to_str().unwrap();
    let direct: serde_json::Value = serde_json::from_str(&ok(&[
        "search", "-m", &m, "--data", &data, "--ctx", "32", "--keep", "1/4", "--out", out_s, "--json",
    ]))
    .unwrap();
    // Interrupted after one flip, then resumed: same result.
    let out2 = dir.path().join("q.json");
    let out2_s = out2.to_str().unwrap();
    ok(&["search", "-m", &m, "--data", &data, "--ctx", "32", "--flips", "1", "--out", out2_s]);
    let err = fails(&["search", "-m", &m, "--data", &data, "--ctx", "32", "--flips", "1", "--out", out2_s]);
    assert!(err.contains("--resume"), "{err}");
    let resumed: serde_json::Value = serde_json::from_str(&ok(&[
        "search", "-m", &m, "--data", &data, "--ctx", "32", "--keep", "1/4", "--out", out2_s, "--resume", "--json",
    ]))
    .unwrap();
    assert_eq!(direct["pattern"], resumed["pattern"]);
    assert_eq!(direct["removal_order"], resumed["removal_order"]);
    assert_eq!(direct["steps"], resumed["steps"]);
    let err = fails(&[
        "search",
        "-m",
        &fixture("glm5-pattern"),
        "--data",
        &data,
        "--ctx",
        "32",
        "--keep",
        "1/2",
        "--out",
        out2_s,
    ]);
    assert!(err.contains("layer 1 is Full"), "{err}");
}

#[test]
fn overlap_export_and_eval() {
    let m = fixture("ds32-yarn");
    let data = root().join("tests/fixtures/ds32-yarn/reference.safetensors").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let ov = dir.path().join("ov");
    let report: serde_json::Value = serde_json::from_str(&ok(&[
        "overlap",
        "-m",
        &m,
        "--data",
        &data,
        "--ctx",
        "64",
        "--out",
        ov.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(report["layers"], 4);
    for f in ["overlap.json", "overlap.png", "overlap.svg", "adjacent.png", "adjacent.svg"] {
        assert!(std::fs::metadata(ov.join(f)).unwrap().len() > 0, "{f}");
    }
    let err = fails(&["overlap", "-m", &m, "--data", &data, "--ctx", "16", "--out", ov.to_str().unwrap()]);
    assert!(err.contains("--ctx"), "{err}");

    // export hf → info reads the same schedule back.
    let out = dir.path().join("exported");
    ok(&["export", "--pattern", "FSSF", "--format", "hf", "-m", &m, "--out", out.to_str().unwrap()]);
    let info: serde_json::Value = serde_json::from_str(&ok(&["info", "-m", out.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(info["schedule"], "FSSF");
    assert_eq!(
        ok(&["export", "--pattern", "FSSF", "--format", "vllm", "-m", &m]).trim(),
        r#"--hf-overrides '{"use_index_cache": true, "index_topk_pattern": "FSSF"}'"#
    );
    let err = fails(&["export", "--pattern", "SFFF", "--format", "sglang"]);
    assert!(err.contains("layer 0 must be Full"), "{err}");

    let model = root().join("models/tiny-dsa").display().to_string();
    let e: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "passkey",
        "-m",
        &model,
        "--lengths",
        "256",
        "--depths",
        "0,1",
        "--samples",
        "1",
        "--keep",
        "1/4",
        "--json",
    ]))
    .unwrap();
    assert_eq!(e["pattern"], "FSSSFSSS");
    assert_eq!(e["cells"].as_array().unwrap().len(), 2);
    let err = fails(&["eval", "niah", "-m", &model, "--lengths", "100000"]);
    assert!(err.contains("max_position_embeddings") || err.contains("too long"), "{err}");
}

/// A search killed mid-run (SIGKILL, harsher than Ctrl-C) keeps every committed flip; `--resume`
/// finishes it with the same result as an uninterrupted run.
#[test]
fn killed_search_resumes_to_the_same_result() {
    let model = root().join("models/tiny-dsa").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    // Two windows of 400 pseudo-random token ids.
    let ids: Vec<Vec<u32>> = (0..2u32).map(|w| (0..400u32).map(|i| (i * 7919 + w * 104729) % 512).collect()).collect();
    let data = dir.path().join("calib.json");
    std::fs::write(&data, serde_json::to_string(&ids).unwrap()).unwrap();
    let data = data.to_str().unwrap().to_string();
    let args = |out: &str| -> Vec<String> {
        ["search", "-m", &model, "--data", &data, "--ctx", "400", "--keep", "1/4", "--out", out, "--json"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let direct_out = dir.path().join("direct.json");
    let direct: serde_json::Value =
        serde_json::from_str(&ok(&args(direct_out.to_str().unwrap()).iter().map(String::as_str).collect::<Vec<_>>()))
            .unwrap();

    let out = dir.path().join("killed.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_indexcache"))
        .args(args(out.to_str().unwrap()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the first committed flip, then kill.
    let t0 = std::time::Instant::now();
    loop {
        let steps = std::fs::read_to_string(&out)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .map_or(0, |v| v["steps"].as_array().map_or(0, Vec::len));
        if steps >= 1 {
            break;
        }
        assert!(t0.elapsed().as_secs() < 120, "no flip committed in time");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert!(
        saved["steps"].as_array().unwrap().len() < direct["steps"].as_array().unwrap().len() || saved["done"] == true
    );

    let mut resume = args(out.to_str().unwrap());
    resume.push("--resume".into());
    let resumed: serde_json::Value =
        serde_json::from_str(&ok(&resume.iter().map(String::as_str).collect::<Vec<_>>())).unwrap();
    assert_eq!(resumed["pattern"], direct["pattern"]);
    assert_eq!(resumed["steps"], direct["steps"]);
}
