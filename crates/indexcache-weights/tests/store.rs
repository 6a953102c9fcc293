//! Integration tests: safetensors files are written into a temp dir and read back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use indexcache_weights::{DType, WeightError, WeightStore, f8e4m3_to_f32, f32_to_f8e4m3};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

/// One tensor to write: (name, dtype, shape, little-endian bytes).
type T = (&'static str, Dtype, Vec<usize>, Vec<u8>);

fn write_st(path: &Path, tensors: &[T]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).expect("valid test tensor")))
        .collect();
    let bytes = safetensors::serialize(views, None).expect("serialize");
    std::fs::write(path, bytes).expect("write");
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes()).collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes()).collect()
}

fn msg(e: WeightError) -> String {
    e.to_string()
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Writes `tensors` to `dir/model.safetensors` and opens the directory.
fn store_with(dir: &Path, tensors: &[T]) -> WeightStore {
    write_st(&dir.join("model.safetensors"), tensors);
    WeightStore::open(dir).expect("open")
}

#[test]
fn roundtrip_f32_bf16_f16() {
    let d = tmp();
    let vals = [1.0f32, -2.5, 0.125, 3.0e-3, 65504.0, -0.0];
    let st = store_with(
        d.path(),
        &[
            ("a.f32", Dtype::F32, vec![2, 3], f32_bytes(&vals)),
            ("b.bf16", Dtype::BF16, vec![6], bf16_bytes(&vals)),
            ("c.f16", Dtype::F16, vec![3, 2], f16_bytes(&vals)),
            ("s.scalar", Dtype::F32, vec![], f32_bytes(&[7.5])),
        ],
    );
    assert_eq!(st.len(), 4);
    assert!(!st.is_empty());
    assert_eq!(st.names(), vec!["a.f32", "b.bf16", "c.f16", "s.scalar"]);
    assert_eq!(st.total_bytes(), 24 + 12 + 12 + 4);
    let info = st.info("b.bf16").expect("info");
    assert_eq!(info.dtype, DType::BF16);
    assert_eq!(info.shape, vec![6]);
    assert_eq!(info.file, d.path().join("model.safetensors"));
    assert!(st.contains("c.f16") && !st.contains("nope"));

    let a = st.load_f32("a.f32", &[2, 3]).expect("f32");
    assert_eq!(a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), vals.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    let b = st.load_f32("b.bf16", &[6]).expect("bf16");
    for (g, v) in b.iter().zip(vals) {
        assert_eq!(*g, half::bf16::from_f32(v).to_f32());
    }
    // bf16 of 1.0, -2.5, 0.125 is exact.
    assert_eq!(&b[..3], &[1.0, -2.5, 0.125]);
    let c = st.load_f32("c.f16", &[3, 2]).expect("f16");
    for (g, v) in c.iter().zip(vals) {
        assert_eq!(*g, half::f16::from_f32(v).to_f32());
    }
    assert_eq!(c[4], 65504.0);
    assert_eq!(st.load_f32("s.scalar", &[]).expect("scalar"), vec![7.5]);
    assert!(st.unused().is_empty());
}

#[test]
fn large_tensors_use_parallel_path_correctly() {
    let d = tmp();
    let n = 300_000;
    let vals: Vec<f32> = (0..n).map(|i| (i as f32) * 0.5 - 1000.0).collect();
    let st = store_with(
        d.path(),
        &[
            ("big.f32", Dtype::F32, vec![n], f32_bytes(&vals)),
            ("big.bf16", Dtype::BF16, vec![600, 500], bf16_bytes(&vals)),
        ],
    );
    assert_eq!(st.load_f32("big.f32", &[n]).expect("f32"), vals);
    let b = st.load_f32("big.bf16", &[600, 500]).expect("bf16");
    for (i, (g, v)) in b.iter().zip(&vals).enumerate() {
        assert_eq!(*g, half::bf16::from_f32(*v).to_f32(), "element {i}");
    }
}

/// Straightforward reference block dequantisation.
fn ref_dequant(w: &[u8], rows: usize, cols: usize, s: &[f32], block: [usize; 2]) -> Vec<f32> {
    let sc = cols.div_ceil(block[1]);
    let mut out = vec![0.0; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            out[r * cols + c] = f8e4m3_to_f32(w[r * cols + c]) * s[(r / block[0]) * sc + c / block[1]];
        }
    }
    out
}

fn fp8_fixture(rows: usize, cols: usize, block: [usize; 2]) -> (Vec<u8>, Vec<f32>, Vec<usize>) {
    // Deterministic codes covering many values, avoiding NaN (0x7F/0xFF).
    let w: Vec<u8> = (0..rows * cols)
        .map(|i| {
            let b = ((i * 37 + 11) % 256) as u8;
            if b & 0x7F == 0x7F { 0x38 } else { b }
        })
        .collect();
    let sshape = vec![rows.div_ceil(block[0]), cols.div_ceil(block[1])];
    let s: Vec<f32> =
        (0..sshape[0] * sshape[1]).map(|i| 0.25 * (i as f32 + 1.0) * if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
    (w, s, sshape)
}

#[test]
fn fp8_dequant_partial_edge_blocks() {
    let d = tmp();
    let (rows, cols, block) = (5, 7, [2, 3]);
    let (w, s, sshape) = fp8_fixture(rows, cols, block);
    assert_eq!(sshape, vec![3, 3]);
    let mut st = store_with(
        d.path(),
        &[
            ("l.weight", Dtype::F8_E4M3, vec![rows, cols], w.clone()),
            ("l.weight_scale_inv", Dtype::F32, sshape.clone(), f32_bytes(&s)),
            ("other.weight", Dtype::F32, vec![1], f32_bytes(&[1.0])),
        ],
    );
    st.set_fp8_block(block);
    assert_eq!(st.fp8_block(), Some(block));
    let got = st.load_f32("l.weight", &[rows, cols]).expect("fp8");
    let want = ref_dequant(&w, rows, cols, &s, block);
    assert_eq!(got.len(), want.len());
    for (i, (g, v)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.to_bits(), v.to_bits(), "element {i} (r {}, c {})", i / cols, i % cols);
    }
    // Spot check one element by hand: (4, 6) is in scale block (2, 2).
    let i = 4 * cols + 6;
    assert_eq!(got[i], f8e4m3_to_f32(w[i]) * s[2 * 3 + 2]);
    // The scale counts as used too.
    assert_eq!(st.unused(), vec!["other.weight".to_string()]);
}

#[test]
fn fp8_dequant_bf16_scales_and_parallel_path() {
    let d = tmp();
    let (rows, cols, block) = (300, 260, [128, 128]);
    let (w, s, sshape) = fp8_fixture(rows, cols, block);
    let s_bf: Vec<f32> = s.iter().map(|x| half::bf16::from_f32(*x).to_f32()).collect();
    let mut st = store_with(
        d.path(),
        &[
            ("q.weight", Dtype::F8_E4M3, vec![rows, cols], w.clone()),
            ("q.weight_scale_inv", Dtype::BF16, sshape, bf16_bytes(&s)),
        ],
    );
    st.set_fp8_block(block);
    let got = st.load_f32("q.weight", &[rows, cols]).expect("fp8");
    let want = ref_dequant(&w, rows, cols, &s_bf, block);
    assert!(got.iter().zip(&want).all(|(g, v)| g.to_bits() == v.to_bits()));
}

#[test]
fn fp8_lut_known_values() {
    assert_eq!(f8e4m3_to_f32(0x00), 0.0);
    assert_eq!(f8e4m3_to_f32(0x80).to_bits(), (-0.0f32).to_bits());
    assert_eq!(f8e4m3_to_f32(0x01), 2f32.powi(-9));
    assert_eq!(f8e4m3_to_f32(0x07), 7.0 * 2f32.powi(-9));
    assert_eq!(f8e4m3_to_f32(0x08), 2f32.powi(-6));
    assert_eq!(f8e4m3_to_f32(0x38), 1.0);
    assert_eq!(f8e4m3_to_f32(0x39), 1.125);
    assert_eq!(f8e4m3_to_f32(0xC0), -2.0);
    assert_eq!(f8e4m3_to_f32(0x7D), 416.0);
    assert_eq!(f8e4m3_to_f32(0x7E), 448.0);
    assert_eq!(f8e4m3_to_f32(0xFE), -448.0);
    assert!(f8e4m3_to_f32(0x7F).is_nan());
    assert!(f8e4m3_to_f32(0xFF).is_nan());
    let nan_count = (0..=255u8).filter(|&b| f8e4m3_to_f32(b).is_nan()).count();
    assert_eq!(nan_count, 2);
    assert!((0..=255u8).all(|b| !f8e4m3_to_f32(b).is_infinite()));
}

#[test]
fn fp8_encode_roundtrips_all_finite_codes() {
    let mut n = 0;
    for b in 0..=255u8 {
        if b & 0x7F == 0x7F {
            continue;
        }
        let x = f8e4m3_to_f32(b);
        assert_eq!(f32_to_f8e4m3(x), b, "code {b:#04x} = {x}");
        n += 1;
    }
    assert_eq!(n, 254);
    assert_eq!(f32_to_f8e4m3(1000.0), 0x7E);
    assert_eq!(f32_to_f8e4m3(-1000.0), 0xFE);
}

#[test]
fn shape_mismatch_message() {
    let d = tmp();
    let st = store_with(d.path(), &[("w", Dtype::F32, vec![2, 3], f32_bytes(&[0.0; 6]))]);
    let e = st.load_f32("w", &[3, 2]).expect_err("shape");
    assert!(matches!(e, WeightError::Shape { .. }));
    let m = msg(e);
    assert!(m.contains("\"w\""), "{m}");
    assert!(m.contains("model.safetensors"), "{m}");
    assert!(m.contains("expected shape [3, 2]"), "{m}");
    assert!(m.contains("found [2, 3]"), "{m}");
    // A failed load does not mark the tensor used.
    assert_eq!(st.unused(), vec!["w".to_string()]);
}

#[test]
fn missing_tensor_message() {
    let d = tmp();
    let st = store_with(d.path(), &[("w", Dtype::F32, vec![1], f32_bytes(&[0.0]))]);
    let e = st.load_f32("model.norm.weight", &[1]).expect_err("missing");
    assert!(matches!(e, WeightError::Missing { .. }));
    let m = msg(e);
    assert!(m.contains("\"model.norm.weight\"") && m.contains("not found"), "{m}");
    assert!(st.raw("model.norm.weight").is_err());
    assert!(st.info("model.norm.weight").is_none());
}

#[test]
fn fp8_missing_scale_inv() {
    let d = tmp();
    let mut st = store_with(d.path(), &[("a.weight", Dtype::F8_E4M3, vec![2, 2], vec![0x38; 4])]);
    st.set_fp8_block([128, 128]);
    let m = msg(st.load_f32("a.weight", &[2, 2]).expect_err("no scale"));
    assert!(m.contains("\"a.weight\""), "{m}");
    assert!(m.contains("\"a.weight_scale_inv\""), "{m}");
    assert!(m.contains("block scales"), "{m}");
}

#[test]
fn fp8_wrong_scale_shape() {
    let d = tmp();
    let mut st = store_with(
        d.path(),
        &[
            ("a.weight", Dtype::F8_E4M3, vec![5, 7], vec![0x38; 35]),
            ("a.weight_scale_inv", Dtype::F32, vec![2, 2], f32_bytes(&[1.0; 4])),
        ],
    );
    st.set_fp8_block([2, 3]);
    let e = st.load_f32("a.weight", &[5, 7]).expect_err("scale shape");
    assert!(matches!(e, WeightError::Invalid { .. }));
    let m = msg(e);
    assert!(m.contains("\"a.weight\""), "{m}");
    assert!(m.contains("a.weight_scale_inv"), "{m}");
    assert!(m.contains("have shape [2, 2], expected [3, 3]"), "{m}");
    assert!(m.contains("block [2, 3]"), "{m}");
    assert_eq!(st.unused().len(), 2);
}

#[test]
fn fp8_without_block_size() {
    let d = tmp();
    let st = store_with(
        d.path(),
        &[
            ("a.weight", Dtype::F8_E4M3, vec![2, 2], vec![0x38; 4]),
            ("a.weight_scale_inv", Dtype::F32, vec![1, 1], f32_bytes(&[1.0])),
        ],
    );
    let m = msg(st.load_f32("a.weight", &[2, 2]).expect_err("no block"));
    assert!(m.contains("\"a.weight\""), "{m}");
    assert!(m.contains("no fp8 block size is set"), "{m}");
}

#[test]
fn fp8_must_be_2d() {
    let d = tmp();
    let mut st = store_with(d.path(), &[("v", Dtype::F8_E4M3, vec![4], vec![0x38; 4])]);
    st.set_fp8_block([2, 2]);
    let m = msg(st.load_f32("v", &[4]).expect_err("1-D fp8"));
    assert!(m.contains("\"v\"") && m.contains("must be 2-D"), "{m}");
}

#[test]
fn unsupported_dtype_i64() {
    let d = tmp();
    let st = store_with(
        d.path(),
        &[("idx.weight", Dtype::I64, vec![2], [1i64, 2].iter().flat_map(|x| x.to_le_bytes()).collect())],
    );
    assert_eq!(st.info("idx.weight").map(|i| i.dtype), Some(DType::I64));
    let e = st.load_f32("idx.weight", &[2]).expect_err("i64");
    assert!(matches!(e, WeightError::DType { .. }));
    let m = msg(e);
    assert!(m.contains("\"idx.weight\""), "{m}");
    assert!(m.contains("unsupported dtype I64"), "{m}");
    assert!(m.contains("model.safetensors"), "{m}");
    // raw() still gives the bytes.
    let (dt, shape, bytes) = st.raw("idx.weight").expect("raw");
    assert_eq!(dt, DType::I64);
    assert_eq!(shape, &[2]);
    assert_eq!(bytes.len(), 16);
    assert_eq!(i64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")), 2);
}

#[test]
fn raw_view_and_other_dtypes() {
    let d = tmp();
    let st = store_with(
        d.path(),
        &[("u", Dtype::U8, vec![3], vec![1, 2, 3]), ("w", Dtype::F8_E4M3, vec![1, 2], vec![0x38, 0xC0])],
    );
    let (dt, shape, bytes) = st.raw("u").expect("raw u8");
    assert_eq!((dt, shape, bytes), (DType::Other, &[3usize][..], &[1u8, 2, 3][..]));
    assert_eq!(st.dtype_name("u"), Some("U8"));
    let m = msg(st.load_f32("u", &[3]).expect_err("u8"));
    assert!(m.contains("unsupported dtype U8"), "{m}");
    assert_eq!(st.unused(), vec!["w".to_string()]);
    let (dt, _, bytes) = st.raw("w").expect("raw fp8");
    assert_eq!(dt, DType::F8E4M3);
    assert_eq!(bytes, &[0x38, 0xC0]);
    assert!(st.unused().is_empty());
}

#[test]
fn truncated_file() {
    let d = tmp();
    let p = d.path().join("model.safetensors");
    write_st(&p, &[("w", Dtype::F32, vec![4, 4], f32_bytes(&[1.0; 16]))]);
    let full = std::fs::read(&p).expect("read");
    std::fs::write(&p, &full[..full.len() - 10]).expect("truncate");
    let m = msg(WeightStore::open(d.path()).expect_err("truncated"));
    assert!(m.contains(&p.display().to_string()), "{m}");
    assert!(m.contains("\"w\""), "{m}");
    assert!(m.contains("truncated"), "{m}");
}

#[test]
fn header_length_larger_than_file() {
    let d = tmp();
    let p = d.path().join("x.safetensors");
    let mut bytes = 1_000_000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&p, bytes).expect("write");
    let m = msg(WeightStore::open_files(std::slice::from_ref(&p)).expect_err("header len"));
    assert!(m.contains(&p.display().to_string()), "{m}");
    assert!(m.contains("header length 1000000 exceeds"), "{m}");

    // A file too small to hold even the length prefix.
    std::fs::write(&p, [1u8, 2, 3]).expect("write");
    let m = msg(WeightStore::open_files(std::slice::from_ref(&p)).expect_err("tiny"));
    assert!(m.contains(&p.display().to_string()) && m.contains("too small"), "{m}");
}

#[test]
fn garbage_header() {
    let d = tmp();
    let p = d.path().join("model.safetensors");
    let junk = b"this is not json {{{";
    let mut bytes = (junk.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(junk);
    std::fs::write(&p, bytes).expect("write");
    let e = WeightStore::open(d.path()).expect_err("garbage");
    assert!(matches!(e, WeightError::File { .. }));
    let m = msg(e);
    assert!(m.contains(&p.display().to_string()), "{m}");
    assert!(m.contains("header is not valid safetensors JSON"), "{m}");
}

/// Hand-built header: the byte size does not match shape × dtype.
#[test]
fn tensor_size_not_matching_shape() {
    let d = tmp();
    let p = d.path().join("model.safetensors");
    let header = br#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 12]);
    std::fs::write(&p, bytes).expect("write");
    let m = msg(WeightStore::open(d.path()).expect_err("size"));
    assert!(m.contains(&p.display().to_string()), "{m}");
    assert!(m.contains("\"w\""), "{m}");
    assert!(m.contains("needs 16 bytes"), "{m}");
    assert!(m.contains("hold 12"), "{m}");
}

/// Overlapping offsets pass the per-tensor checks; safetensors' own validation catches them
/// and the message still names the file.
#[test]
fn safetensors_validation_is_wrapped_with_path() {
    let d = tmp();
    let p = d.path().join("model.safetensors");
    let header = br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 4]);
    std::fs::write(&p, bytes).expect("write");
    let m = msg(WeightStore::open(d.path()).expect_err("overlap"));
    assert!(m.contains(&p.display().to_string()), "{m}");
    assert!(m.contains("invalid safetensors file"), "{m}");
}

fn write_index(dir: &Path, map: &[(&str, &str)]) {
    let wm: HashMap<&str, &str> = map.iter().copied().collect();
    let json = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": wm });
    std::fs::write(dir.join("model.safetensors.index.json"), json.to_string()).expect("index");
}

#[test]
fn sharded_index_ok() {
    let d = tmp();
    write_st(&d.path().join("model-00001-of-00002.safetensors"), &[("a", Dtype::F32, vec![1], f32_bytes(&[1.0]))]);
    write_st(&d.path().join("model-00002-of-00002.safetensors"), &[("b", Dtype::F32, vec![1], f32_bytes(&[2.0]))]);
    write_index(d.path(), &[("a", "model-00001-of-00002.safetensors"), ("b", "model-00002-of-00002.safetensors")]);
    let st = WeightStore::open(d.path()).expect("open sharded");
    assert_eq!(st.names(), vec!["a", "b"]);
    assert_eq!(st.files().len(), 2);
    assert_eq!(st.info("b").map(|i| i.file.clone()), Some(d.path().join("model-00002-of-00002.safetensors")));
    assert_eq!(st.load_f32("b", &[1]).expect("b"), vec![2.0]);
}

#[test]
fn sharded_index_missing_shard() {
    let d = tmp();
    write_st(&d.path().join("model-00001-of-00002.safetensors"), &[("a", Dtype::F32, vec![1], f32_bytes(&[1.0]))]);
    write_index(d.path(), &[("a", "model-00001-of-00002.safetensors"), ("b", "model-00002-of-00002.safetensors")]);
    let m = msg(WeightStore::open(d.path()).expect_err("missing shard"));
    assert!(m.contains("model-00002-of-00002.safetensors"), "{m}");
    assert!(m.contains("does not exist"), "{m}");
    assert!(m.contains("model.safetensors.index.json"), "{m}");
}

#[test]
fn sharded_index_tensor_not_in_shard() {
    let d = tmp();
    write_st(&d.path().join("model-00001-of-00002.safetensors"), &[("a", Dtype::F32, vec![1], f32_bytes(&[1.0]))]);
    write_st(&d.path().join("model-00002-of-00002.safetensors"), &[("b", Dtype::F32, vec![1], f32_bytes(&[2.0]))]);
    write_index(
        d.path(),
        &[
            ("a", "model-00001-of-00002.safetensors"),
            ("b", "model-00002-of-00002.safetensors"),
            ("c.weight", "model-00002-of-00002.safetensors"),
        ],
    );
    let m = msg(WeightStore::open(d.path()).expect_err("tensor not in shard"));
    assert!(m.contains("\"c.weight\""), "{m}");
    assert!(m.contains("model-00002-of-00002.safetensors"), "{m}");
    assert!(m.contains("not present"), "{m}");

    // Mapped to the wrong shard: the message says where it really is.
    write_index(d.path(), &[("a", "model-00002-of-00002.safetensors"), ("b", "model-00001-of-00002.safetensors")]);
    let m = msg(WeightStore::open(d.path()).expect_err("wrong shard"));
    assert!(m.contains("\"a\""), "{m}");
    assert!(m.contains("it is in") && m.contains("model-00001-of-00002"), "{m}");
}

#[test]
fn bad_index_json() {
    let d = tmp();
    std::fs::write(d.path().join("model.safetensors.index.json"), "{ nope").expect("write");
    let m = msg(WeightStore::open(d.path()).expect_err("bad index"));
    assert!(m.contains("model.safetensors.index.json") && m.contains("invalid shard index"), "{m}");
}

#[test]
fn duplicate_names_across_files() {
    let d = tmp();
    write_st(&d.path().join("a.safetensors"), &[("dup", Dtype::F32, vec![1], f32_bytes(&[1.0]))]);
    write_st(&d.path().join("b.safetensors"), &[("dup", Dtype::F32, vec![1], f32_bytes(&[2.0]))]);
    let m = msg(WeightStore::open(d.path()).expect_err("dup"));
    assert!(m.contains("\"dup\"") && m.contains("duplicate"), "{m}");
    assert!(m.contains("a.safetensors") && m.contains("b.safetensors"), "{m}");
}

#[test]
fn unsharded_dir_opens_all_files_sorted() {
    let d = tmp();
    write_st(&d.path().join("z.safetensors"), &[("z", Dtype::F32, vec![1], f32_bytes(&[1.0]))]);
    write_st(&d.path().join("a.safetensors"), &[("a", Dtype::F32, vec![1], f32_bytes(&[1.0]))]);
    std::fs::write(d.path().join("config.json"), "{}").expect("config");
    let st = WeightStore::open(d.path()).expect("open");
    let files: Vec<PathBuf> = st.files().to_vec();
    assert_eq!(files, vec![d.path().join("a.safetensors"), d.path().join("z.safetensors")]);
    assert_eq!(st.names(), vec!["a", "z"]);
}

#[test]
fn unused_after_partial_loads() {
    let d = tmp();
    let mut st = store_with(
        d.path(),
        &[
            ("c", Dtype::F32, vec![1], f32_bytes(&[1.0])),
            ("a", Dtype::BF16, vec![1], bf16_bytes(&[1.0])),
            ("b", Dtype::F32, vec![1], f32_bytes(&[1.0])),
            ("l.weight", Dtype::F8_E4M3, vec![1, 1], vec![0x38]),
            ("l.weight_scale_inv", Dtype::F32, vec![1, 1], f32_bytes(&[2.0])),
        ],
    );
    st.set_fp8_block([128, 128]);
    assert_eq!(st.unused(), vec!["a", "b", "c", "l.weight", "l.weight_scale_inv"]);
    st.load_f32("b", &[1]).expect("b");
    assert_eq!(st.unused(), vec!["a", "c", "l.weight", "l.weight_scale_inv"]);
    assert_eq!(st.load_f32("l.weight", &[1, 1]).expect("fp8"), vec![2.0]);
    assert_eq!(st.unused(), vec!["a", "c"]);
    assert!(st.mark_used("c"));
    assert!(!st.mark_used("nope"));
    assert_eq!(st.unused(), vec!["a"]);
    // Loading from several threads at once works (Sync) and marks used.
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| st.load_f32("a", &[1]).expect("a"));
        }
    });
    assert!(st.unused().is_empty());
}

#[test]
fn empty_directory() {
    let d = tmp();
    let e = WeightStore::open(d.path()).expect_err("empty");
    assert!(matches!(e, WeightError::File { .. }));
    let m = msg(e);
    assert!(m.contains(&d.path().display().to_string()), "{m}");
    assert!(m.contains("no *.safetensors files"), "{m}");

    let m = msg(WeightStore::open(&d.path().join("absent")).expect_err("absent dir"));
    assert!(m.contains("absent") && m.contains("cannot read checkpoint directory"), "{m}");

    let st = WeightStore::open_files(&[]).expect("empty list");
    assert!(st.is_empty() && st.names().is_empty() && st.total_bytes() == 0);
}

#[test]
fn model_safetensors_wins_over_other_files_in_the_directory() {
    let d = tmp();
    write_st(&d.path().join("model.safetensors"), &[("w", Dtype::F32, vec![1], f32_bytes(&[2.0]))]);
    write_st(&d.path().join("reference.safetensors"), &[("logits", Dtype::F32, vec![1], f32_bytes(&[1.0]))]);
    let st = WeightStore::open(d.path()).expect("open");
    assert_eq!(st.names(), vec!["w"]);
}
