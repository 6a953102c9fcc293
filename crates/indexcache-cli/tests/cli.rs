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
    for cmd in ["info", "forward", "generate", "demo", "bench", "ppl", "search", "overlap", "eval", "export", "distill"]
    {
        let out = ok(&[cmd, "--help"]);
        assert!(out.contains(&format!("Usage: indexcache {cmd}")), "{cmd}: {out}");
        // Every command that loads a model chooses its device, dtype and prefill chunk.
        let loads = !matches!(cmd, "info" | "export");
        for opt in ["--device <DEVICE>", "--dtype <DTYPE>", "--chunk <TOKENS>"] {
            assert_eq!(out.contains(opt), loads, "{cmd} {opt}: {out}");
        }
    }
    let top = ok(&["--help"]);
    for cmd in ["info", "forward", "generate", "demo", "bench", "ppl", "search", "overlap", "eval", "export", "distill"]
    {
        assert!(top.contains(cmd), "{cmd} missing from the top-level help");
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
    // --out into a directory that does not exist yet.
    let out = dir.path().join("new/out.safetensors");
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
    // A chunked prefill (--chunk 16: three chunks) writes the same tensors: top-k rows of every
    // chunk concatenated, same logits up to rounding.
    let out2 = dir.path().join("chunked.safetensors");
    ok(&[
        "forward",
        "-m",
        &fixture("glm5-pattern"),
        "--input-ids",
        &ids,
        "--chunk",
        "16",
        "--out",
        out2.to_str().unwrap(),
    ]);
    let bytes2 = std::fs::read(&out2).unwrap();
    let st2 = safetensors::SafeTensors::deserialize(&bytes2).unwrap();
    for l in [0, 3, 5] {
        let name = format!("topk.layer{l}");
        let (a, b) = (st.tensor(&name).unwrap(), st2.tensor(&name).unwrap());
        assert_eq!(a.shape(), b.shape(), "{name}");
        assert_eq!(a.data(), b.data(), "{name}");
    }
    let chunked: Vec<f32> =
        st2.tensor("logits").unwrap().data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(chunked.len(), full.len());
    for (a, b) in chunked.iter().zip(&full) {
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

/// Token ids and `[T, vocab]` logits of a safetensors file (`input_ids` i64, `logits` f32).
fn ids_and_logits(path: &std::path::Path, ids_name: &str) -> (Vec<u32>, Vec<f32>, usize) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = match st.tensor(ids_name) {
        Ok(t) => t.data().chunks(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect(),
        Err(_) => Vec::new(),
    };
    let t = st.tensor("logits").unwrap();
    let vocab = t.shape()[1];
    let logits = t.data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    (ids, logits, vocab)
}

/// Summed NLL of `ids[1..]` from `logits` rows `0..len-1`, float64 log-softmax.
fn nll_sum(logits: &[f32], vocab: usize, ids: &[u32]) -> f64 {
    (1..ids.len())
        .map(|j| {
            let row = &logits[(j - 1) * vocab..j * vocab];
            let m = row.iter().map(|&v| v as f64).fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
            m + z.ln() - row[ids[j] as usize] as f64
        })
        .sum()
}

#[test]
fn bench_on_a_fixture() {
    let m = fixture("ds32-yarn");
    let b: serde_json::Value = serde_json::from_str(&ok(&[
        "bench",
        "-m",
        &m,
        "--contexts",
        "40",
        "--patterns",
        "1/2,full",
        "--decode",
        "2",
        "--chunk",
        "16",
        "--json",
    ]))
    .unwrap();
    let rows = b["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["schedule"], "FSFS");
    assert_eq!(b["chunk"], 16);
    // Speedups are against the all-Full row, wherever it is in --patterns.
    assert_eq!(rows[1]["schedule"], "FFFF");
    assert_eq!(rows[1]["prefill_speedup"], 1.0);
    assert_eq!(rows[1]["decode_speedup"], 1.0);
    for r in rows {
        assert!(r["error"].is_null(), "{r}");
        assert!(r["prefill_s"].as_f64().unwrap() > 0.0 && r["ttft_s"].as_f64() >= r["prefill_s"].as_f64());
        assert!(r["decode_tok_s"].as_f64().unwrap() > 0.0);
        assert!(r["cache_bytes"].as_u64().unwrap() > 0);
        // On the CPU: the process's peak resident set (Linux procfs), at least the cache.
        if cfg!(target_os = "linux") {
            assert!(r["peak_memory_bytes"].as_u64().unwrap() > r["cache_bytes"].as_u64().unwrap(), "{r}");
        }
        let share = r["indexer_share_prefill"].as_f64().unwrap();
        assert!((0.0..1.0).contains(&share), "{share}");
    }
    assert!(rows[0]["cache_bytes"].as_u64() < rows[1]["cache_bytes"].as_u64(), "Shared layers keep no indexer keys");

    // --json FILE into a directory that does not exist yet: the table is printed too. Plain
    // token counts and k (= 1024) lengths; --decode 0 = prefill only.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("new/dir/bench.json");
    let table = ok(&[
        "bench",
        "--random-weights",
        &root().join("models/tiny-dsa/config.json").display().to_string(),
        "--contexts",
        "24,1k",
        "--patterns",
        "full",
        "--decode",
        "0",
        "--json",
        out.to_str().unwrap(),
    ]);
    assert!(table.contains("| 1024 | full | FFFFFFFF |") && table.contains("| 24 | full |"), "{table}");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(j["rows"][1]["context"], 1024);
    assert!(j["rows"][0]["decode_tok_s"].is_null() && j["decode_steps"] == 0);
    let err = fails(&["bench", "-m", &m, "--contexts", "100000"]);
    assert!(err.contains("max_position_embeddings"), "{err}");
    let err = fails(&["bench", "-m", &m, "--contexts", "0"]);
    assert!(err.contains("positive"), "{err}");
}

#[test]
fn ppl_value_and_search_on_a_fixture() {
    let m = fixture("ds32-yarn");
    let reference = root().join("tests/fixtures/ds32-yarn/reference.safetensors");
    let data = reference.display().to_string();
    let (ids, hf_logits, vocab) = ids_and_logits(&reference, "input_ids");
    assert_eq!(ids.len(), 64);

    // One 64-token window: transformers' logits give the NLL directly.
    let p: serde_json::Value =
        serde_json::from_str(&ok(&["ppl", "-m", &m, "--data", &data, "--ctx", "64", "--json"])).unwrap();
    assert_eq!(p["tokens"], 63);
    let want = nll_sum(&hf_logits, vocab, &ids) / 63.0;
    let got = p["mean_nll"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-4 * want, "ppl mean NLL {got} vs transformers {want}");
    assert!((p["perplexity"].as_f64().unwrap() - want.exp()).abs() < 1e-3 * want.exp());

    // Two 32-token windows, each from an empty cache: the first is a prefix of the reference
    // sequence (same logits); the second's logits come from `forward` on its own.
    let dir = tempfile::tempdir().unwrap();
    let second = dir.path().join("second.safetensors");
    let ids2: Vec<String> = ids[32..].iter().map(u32::to_string).collect();
    ok(&["forward", "-m", &m, "--input-ids", &ids2.join(","), "--out", second.to_str().unwrap()]);
    let (_, logits2, _) = ids_and_logits(&second, "input_ids");
    let want = (nll_sum(&hf_logits[..32 * vocab], vocab, &ids[..32]) + nll_sum(&logits2, vocab, &ids[32..])) / 62.0;
    for chunk in ["2048", "5"] {
        let p: serde_json::Value =
            serde_json::from_str(&ok(&["ppl", "-m", &m, "--data", &data, "--ctx", "32", "--chunk", chunk, "--json"]))
                .unwrap();
        assert_eq!(p["tokens"], 62);
        let got = p["mean_nll"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-4 * want, "--chunk {chunk}: {got} vs {want}");
    }

    // search --out into a directory that does not exist yet.
    let out = dir.path().join("runs/a/p.json");
    let out_s = out.to_str().unwrap();
    let direct: serde_json::Value = serde_json::from_str(&ok(&[
        "search", "-m", &m, "--data", &data, "--ctx", "32", "--keep", "1/4", "--out", out_s, "--json",
    ]))
    .unwrap();
    assert!(out.is_file() && out.with_extension("loss.png").is_file());
    // Without memos: the same steps, bit for bit (the JSON numbers round-trip exactly).
    let no_memo: serde_json::Value = serde_json::from_str(&ok(&[
        "search",
        "-m",
        &m,
        "--data",
        &data,
        "--ctx",
        "32",
        "--keep",
        "1/4",
        "--memo-budget",
        "0",
        "--out",
        dir.path().join("runs/b.json").to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(no_memo["steps"], direct["steps"]);
    assert_eq!(no_memo["options"]["memo_budget_bytes"], 0);
    assert!(no_memo["layer_evals"].as_u64() > direct["layer_evals"].as_u64());
    let err = fails(&["search", "-m", &m, "--data", &data, "--keep", "1/4", "--memo-budget", "lots", "--out", out_s]);
    assert!(err.contains("--memo-budget"), "{err}");
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
    let out3 = dir.path().join("r.json");
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
        out3.to_str().unwrap(),
    ]);
    assert!(err.contains("layer 1 is Full"), "{err}");
}

#[test]
fn device_dtype_and_chunk_errors_are_clear() {
    let m = fixture("ds32-yarn");
    let data = root().join("tests/fixtures/ds32-yarn/reference.safetensors").display().to_string();
    let ppl = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> =
            ["ppl", "-m", &m, "--data", &data, "--ctx", "32"].iter().map(|s| s.to_string()).collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    fn args(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let err = fails(&args(&ppl(&["--device", "cpu", "--dtype", "bf16"])));
    assert!(err.contains("--dtype bf16 needs --device cuda"), "{err}");
    let err = fails(&args(&ppl(&["--chunk", "0"])));
    assert!(err.contains("--chunk") && err.contains("at least 1"), "{err}");
    let err = fails(&args(&ppl(&["--device", "gpu"])));
    assert!(err.contains("possible values: cpu, cuda"), "{err}");
    // The explicit cpu device and f32 work everywhere.
    ok(&args(&ppl(&["--device", "cpu", "--dtype", "f32"])));
    // The FP8 indexer needs power-of-two indexer heads: the fixture's are 24 wide.
    let err = fails(&args(&ppl(&["--indexer-numerics", "fp8"])));
    assert!(err.contains("--indexer-numerics fp8") && err.contains("power-of-two"), "{err}");
    if !cfg!(feature = "cuda") {
        let err = fails(&args(&ppl(&["--device", "cuda"])));
        assert!(err.contains("built without CUDA support") && err.contains("--features cuda"), "{err}");
        // Without --device, a build without CUDA runs on the cpu; bf16 then has nowhere to run.
        let err = fails(&args(&ppl(&["--dtype", "bf16"])));
        assert!(err.contains("--dtype bf16 needs --device cuda"), "{err}");
    }
}

#[test]
fn demo_decode_errors_are_clear() {
    let err = fails(&["demo", "--decode", "0"]);
    assert!(err.contains("--decode must be at least 1"), "{err}");
    // tiny-dsa: 16384 positions (the default model is SmolLM2-135M-DSA once its GGUF is fetched).
    let tiny = root().join("models/tiny-dsa").display().to_string();
    let err = fails(&["demo", "-m", &tiny, "--decode", "20000"]);
    assert!(err.contains("leaves no room for a prompt") && err.contains("16384"), "{err}");
    let err = fails(&["demo", "--context", "0"]);
    assert!(err.contains("at least 1"), "{err}");
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

/// With `--features cuda`: on a machine with a GPU, the cuda device reproduces the cpu end to end
/// (ppl, forward, search, bench); without one, `--device cuda` is a clear error.
#[cfg(feature = "cuda")]
#[test]
fn cuda_device_end_to_end() {
    let m = fixture("ds32-yarn");
    let data = root().join("tests/fixtures/ds32-yarn/reference.safetensors").display().to_string();
    let ppl = |device: &str, dtype: &str, chunk: &str| -> Output {
        run(&[
            "ppl", "-m", &m, "--data", &data, "--ctx", "64", "--device", device, "--dtype", dtype, "--chunk", chunk,
            "--json",
        ])
    };
    let probe = ppl("cuda", "f32", "2048");
    if !probe.status.success() {
        let err = String::from_utf8_lossy(&probe.stderr);
        assert!(err.contains("--device cuda:") && !err.contains("panicked"), "{err}");
        eprintln!("skipped: no usable GPU ({})", err.trim());
        return;
    }
    let value = |o: &Output| -> f64 {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["tokens"], 63);
        v["mean_nll"].as_f64().unwrap()
    };
    let cpu = value(&ppl("cpu", "f32", "2048"));
    let f32_ = value(&probe);
    assert!((f32_ - cpu).abs() < 1e-4 * cpu, "cuda f32 {f32_} vs cpu {cpu}");
    let chunked = value(&ppl("cuda", "f32", "7"));
    assert!((chunked - cpu).abs() < 1e-4 * cpu, "cuda f32 chunk 7 {chunked} vs cpu {cpu}");
    let bf16 = value(&ppl("cuda", "bf16", "16"));
    assert!((bf16 - cpu).abs() < 3e-2 * cpu, "cuda bf16 {bf16} vs cpu {cpu}");
    // The default device is the GPU when there is one (bf16).
    let default: serde_json::Value =
        serde_json::from_str(&ok(&["ppl", "-m", &m, "--data", &data, "--ctx", "64", "--json"])).unwrap();
    assert!(!default["backend"].as_str().unwrap().starts_with("cpu"), "{default}");

    // forward in exact mode: the same logits as the cpu.
    let dir = tempfile::tempdir().unwrap();
    let ids = (0..40).map(|i| ((i * 37 + 11) % 256).to_string()).collect::<Vec<_>>().join(",");
    let fwd = |device: &str, name: &str| -> Vec<f32> {
        let out = dir.path().join(name);
        ok(&[
            "forward",
            "-m",
            &m,
            "--input-ids",
            &ids,
            "--device",
            device,
            "--dtype",
            "f32",
            "--out",
            out.to_str().unwrap(),
        ]);
        ids_and_logits(&out, "input_ids").1
    };
    let (c, g) = (fwd("cpu", "cpu.safetensors"), fwd("cuda", "gpu.safetensors"));
    for (a, b) in g.iter().zip(&c) {
        assert!((a - b).abs() < 1e-3 * (1.0 + b.abs()), "cuda {a} vs cpu {b}");
    }

    // search in exact mode: the same flips.
    let search = |device: &str, budget: &str| -> serde_json::Value {
        let out = dir.path().join(format!("search-{device}-{budget}.json"));
        serde_json::from_str(&ok(&[
            "search",
            "-m",
            &m,
            "--data",
            &data,
            "--ctx",
            "32",
            "--keep",
            "1/4",
            "--device",
            device,
            "--dtype",
            "f32",
            "--memo-budget",
            budget,
            "--out",
            out.to_str().unwrap(),
            "--json",
        ]))
        .unwrap()
    };
    let (sc, sg, sg0) = (search("cpu", "none"), search("cuda", "none"), search("cuda", "0"));
    assert_eq!(sg["removal_order"], sc["removal_order"]);
    assert_eq!(sg0["steps"], sg["steps"], "memo budget changes nothing on the GPU either");

    // bench: peak device memory per row, speedups against the all-Full row.
    let b: serde_json::Value = serde_json::from_str(&ok(&[
        "bench",
        "-m",
        &m,
        "--device",
        "cuda",
        "--contexts",
        "64",
        "--patterns",
        "full,1/2",
        "--decode",
        "4",
        "--json",
    ]))
    .unwrap();
    for r in b["rows"].as_array().unwrap() {
        assert!(r["error"].is_null(), "{r}");
        assert!(r["peak_memory_bytes"].as_u64().unwrap() > r["cache_bytes"].as_u64().unwrap(), "{r}");
        assert!(r["decode_tok_s"].as_f64().unwrap() > 0.0);
    }
    assert!(b["weights_bytes"].as_u64().unwrap() > 0);
    assert_eq!(b["dtype"], "bf16");
}

/// `--indexer-numerics fp8` runs (the shipped model's indexer heads are 64 wide) and changes the
/// perplexity a little, not a lot.
#[test]
fn fp8_indexer_numerics_run_and_stay_close() {
    let m = root().join("models/tiny-dsa").display().to_string();
    let data = root().join("README.md").display().to_string();
    let ppl = |numerics: &str| -> f64 {
        let out = ok(&[
            "ppl",
            "-m",
            &m,
            "--data",
            &data,
            "--ctx",
            "512",
            "--max-windows",
            "2",
            "--json",
            "--indexer-numerics",
            numerics,
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        v["mean_nll"].as_f64().expect("mean_nll")
    };
    let (exact, fp8) = (ppl("exact"), ppl("fp8"));
    assert!(exact.is_finite() && fp8.is_finite());
    assert!((exact - fp8).abs() / exact < 0.05, "exact {exact} vs fp8 {fp8}");
}

/// The default model's GGUF, when `scripts/fetch_smollm2.sh` has run (CI runs it).
fn smollm2() -> Option<String> {
    let p = root().join("data/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p.display().to_string())
    } else {
        eprintln!("skipped: {} absent (run scripts/fetch_smollm2.sh)", p.display());
        None
    }
}

/// A real model answers through its chat template and stops at its end-of-turn token.
#[test]
fn smollm2_chat_answers() {
    let Some(m) = smollm2() else { return };
    let out = ok(&[
        "generate",
        "-m",
        &m,
        "--device",
        "cpu",
        "--chat",
        "-p",
        "What is the capital of France?",
        "--max-tokens",
        "24",
    ]);
    assert!(out.contains("<|im_start|>assistant\n"), "{out}");
    let answer = out.rsplit("<|im_start|>assistant\n").next().unwrap();
    assert!(answer.contains("Paris"), "{answer}");
}

/// export on a GGUF-based model: the serving formats are refused with the reason; `--format
/// indexcache` writes a directory with the pattern and only the Full layers' indexers, which runs
/// that pattern exactly as the source model does with `--pattern`, and names the missing indexer
/// when asked for a schedule it cannot run.
#[test]
fn smollm2_export_indexcache_dir() {
    let Some(_) = smollm2() else { return };
    let dir = root().join("models/smollm2-135m-dsa").display().to_string();
    let pattern = format!("FSSFSSSF{}", "S".repeat(22));
    let err = fails(&["export", "--pattern", &pattern, "--format", "vllm", "-m", &dir]);
    assert!(err.contains("no vllm format") && err.contains("--format indexcache"), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ic");
    let o = out.display().to_string();
    ok(&["export", "--pattern", &pattern, "--format", "indexcache", "-m", &dir, "--out", &o]);
    let info: serde_json::Value = serde_json::from_str(&ok(&["info", "-m", &o, "--json"])).unwrap();
    assert_eq!(info["schedule"], pattern.as_str());
    assert_eq!(info["indexer_weights_on_layers"], serde_json::json!([0, 3, 7]));

    let text = tmp.path().join("text.txt");
    std::fs::write(&text, std::fs::read_to_string(root().join("README.md")).unwrap()).unwrap();
    let t = text.display().to_string();
    let ppl = |args: &[&str]| -> f64 {
        let mut v = vec!["ppl", "--data", &t, "--ctx", "256", "--max-windows", "2", "--json"];
        v.extend_from_slice(args);
        serde_json::from_str::<serde_json::Value>(&ok(&v)).unwrap()["mean_nll"].as_f64().unwrap()
    };
    assert_eq!(ppl(&["-m", &o]), ppl(&["-m", &dir, "--pattern", &pattern]));
    let err = fails(&["ppl", "-m", &o, "--data", &t, "--ctx", "64", "--index-cache", "off"]);
    assert!(err.contains("model.layers.1.self_attn.indexer"), "{err}");
}

/// distill: a short warm-up run, interrupted and resumed, gives the same bytes as one run; the
/// result is a model directory every command loads (sparse attention with its indexers, or
/// --attention dense).
#[test]
fn smollm2_distill_resumes_bit_for_bit_and_loads() {
    let Some(m) = smollm2() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("text.txt");
    std::fs::write(&text, std::fs::read_to_string(root().join("README.md")).unwrap().repeat(3)).unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let base = |out: &std::path::Path, steps: &str| {
        vec![
            "distill".to_string(),
            "-m".into(),
            m.clone(),
            "--data".into(),
            text.display().to_string(),
            "--ctx".into(),
            "64".into(),
            "--max-windows".into(),
            "8".into(),
            "--steps".into(),
            steps.into(),
            "--checkpoint-every".into(),
            "2".into(),
            "--index-heads".into(),
            "2".into(),
            "--topk".into(),
            "16".into(),
            "--out".into(),
            out.display().to_string(),
        ]
    };
    let call = |v: Vec<String>| ok(&v.iter().map(String::as_str).collect::<Vec<_>>());
    call(base(&a, "4"));
    call(base(&b, "2"));
    let mut resumed = base(&b, "4");
    resumed.push("--resume".into());
    call(resumed);
    let (fa, fb) = (
        std::fs::read(a.join("indexers.safetensors")).unwrap(),
        std::fs::read(b.join("indexers.safetensors")).unwrap(),
    );
    assert!(fa == fb, "a resumed run must equal an uninterrupted one");

    let dir = a.display().to_string();
    let sparse = ok(&[
        "ppl",
        "-m",
        &dir,
        "--device",
        "cpu",
        "--data",
        &text.display().to_string(),
        "--ctx",
        "64",
        "--max-windows",
        "2",
        "--json",
    ]);
    let dense = ok(&[
        "ppl",
        "-m",
        &dir,
        "--device",
        "cpu",
        "--attention",
        "dense",
        "--data",
        &text.display().to_string(),
        "--ctx",
        "64",
        "--max-windows",
        "2",
        "--json",
    ]);
    let nll = |out: &str| serde_json::from_str::<serde_json::Value>(out).unwrap()["mean_nll"].as_f64().unwrap();
    let (ns, nd) = (nll(&sparse), nll(&dense));
    assert!(ns.is_finite() && nd.is_finite() && ns != nd, "top-16 of 64 keys must change the loss: {ns} vs {nd}");
}
