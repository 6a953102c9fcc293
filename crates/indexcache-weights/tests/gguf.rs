//! Integration tests for the GGUF reader: files are produced by a small test-only GGUF writer
//! (below), read back and compared with values computed independently from the quants that
//! were packed into each block. Malformed files check that the error names the problem.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};

use half::f16;
use indexcache_weights::{GgmlType, GgufArray, GgufError, GgufFile, GgufValue, GgufValueType, WeightError};

// ---------------------------------------------------------------------------------------------
// Allocation tracking: the largest single allocation made by the current thread.
// ---------------------------------------------------------------------------------------------

struct TrackingAlloc;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| {
        if size > l.get() {
            l.set(size);
        }
    });
}

// SAFETY: forwards to the system allocator; only records sizes in a const-initialised,
// drop-free thread-local (which itself never allocates).
unsafe impl GlobalAlloc for TrackingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: TrackingAlloc = TrackingAlloc;

/// Runs `f` and returns its result with the largest single allocation it made on this thread.
fn largest_alloc<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    let r = f();
    (r, LARGEST.with(Cell::get))
}

// ---------------------------------------------------------------------------------------------
// Test-only GGUF writer
// ---------------------------------------------------------------------------------------------

const T_F32: u32 = 0;
const T_F16: u32 = 1;
const T_Q4_0: u32 = 2;
const T_Q4_1: u32 = 3;
const T_Q5_0: u32 = 6;
const T_Q5_1: u32 = 7;
const T_Q8_0: u32 = 8;
const T_Q8_1: u32 = 9;
const T_Q4_K: u32 = 12;
const T_BF16: u32 = 30;

/// A metadata value to write.
#[derive(Clone)]
enum V {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// Element type id and elements (all of that type; nested arrays as `V::Arr`).
    Arr(u32, Vec<V>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl V {
    fn type_id(&self) -> u32 {
        match self {
            V::U8(_) => 0,
            V::I8(_) => 1,
            V::U16(_) => 2,
            V::I16(_) => 3,
            V::U32(_) => 4,
            V::I32(_) => 5,
            V::F32(_) => 6,
            V::Bool(_) => 7,
            V::Str(_) => 8,
            V::Arr(..) => 9,
            V::U64(_) => 10,
            V::I64(_) => 11,
            V::F64(_) => 12,
        }
    }

    /// The value's payload (without its type tag).
    fn payload(&self, out: &mut Vec<u8>) {
        match self {
            V::U8(x) => out.push(*x),
            V::I8(x) => out.extend(x.to_le_bytes()),
            V::U16(x) => out.extend(x.to_le_bytes()),
            V::I16(x) => out.extend(x.to_le_bytes()),
            V::U32(x) => out.extend(x.to_le_bytes()),
            V::I32(x) => out.extend(x.to_le_bytes()),
            V::F32(x) => out.extend(x.to_le_bytes()),
            V::Bool(x) => out.push(u8::from(*x)),
            V::Str(s) => put_str(out, s),
            V::Arr(elem, items) => {
                out.extend(elem.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for it in items {
                    assert_eq!(it.type_id(), *elem, "test writer: mixed array");
                    it.payload(out);
                }
            }
            V::U64(x) => out.extend(x.to_le_bytes()),
            V::I64(x) => out.extend(x.to_le_bytes()),
            V::F64(x) => out.extend(x.to_le_bytes()),
        }
    }
}

fn s(x: &str) -> V {
    V::Str(x.to_string())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// A tensor to write: ggml dims, type id and data bytes; `offset` overrides the computed one.
struct T {
    name: String,
    dims: Vec<u64>,
    type_id: u32,
    data: Vec<u8>,
    offset: Option<u64>,
}

/// Byte positions in a written file, for tests that corrupt it.
#[derive(Debug)]
struct Written {
    bytes: Vec<u8>,
    /// Position of each metadata entry's value type tag.
    kv_value_pos: Vec<usize>,
    /// Position of each tensor info (its name length).
    tensor_info_pos: Vec<usize>,
    /// Absolute start of the data section.
    data_offset: usize,
}

struct Writer {
    version: u32,
    alignment: usize,
    kvs: Vec<(String, V)>,
    tensors: Vec<T>,
}

impl Writer {
    fn new() -> Self {
        Self { version: 3, alignment: 32, kvs: Vec::new(), tensors: Vec::new() }
    }

    /// Sets the layout alignment and writes it as `general.alignment`.
    fn alignment(mut self, a: u32) -> Self {
        self.alignment = a as usize;
        self.kvs.push(("general.alignment".to_string(), V::U32(a)));
        self
    }

    fn kv(mut self, key: &str, v: V) -> Self {
        self.kvs.push((key.to_string(), v));
        self
    }

    fn tensor(mut self, name: &str, dims: &[u64], type_id: u32, data: Vec<u8>) -> Self {
        self.tensors.push(T { name: name.to_string(), dims: dims.to_vec(), type_id, data, offset: None });
        self
    }

    fn tensor_at(mut self, name: &str, dims: &[u64], type_id: u32, data: Vec<u8>, offset: u64) -> Self {
        self.tensors.push(T { name: name.to_string(), dims: dims.to_vec(), type_id, data, offset: Some(offset) });
        self
    }

    fn build(&self) -> Written {
        let align = |x: usize| x.div_ceil(self.alignment) * self.alignment;
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kvs.len() as u64).to_le_bytes());
        let mut kv_value_pos = Vec::new();
        for (k, v) in &self.kvs {
            put_str(&mut out, k);
            kv_value_pos.push(out.len());
            out.extend(v.type_id().to_le_bytes());
            v.payload(&mut out);
        }
        // Data offsets: packed in order, each aligned.
        let mut offsets = Vec::new();
        let mut next = 0usize;
        for t in &self.tensors {
            offsets.push(t.offset.unwrap_or(next as u64));
            next = align(next + t.data.len());
        }
        let mut tensor_info_pos = Vec::new();
        for (t, off) in self.tensors.iter().zip(&offsets) {
            tensor_info_pos.push(out.len());
            put_str(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.type_id.to_le_bytes());
            out.extend(off.to_le_bytes());
        }
        let data_offset = align(out.len());
        out.resize(data_offset, 0);
        let mut next = 0usize;
        for t in &self.tensors {
            out.resize(data_offset + next, 0);
            out.extend(&t.data);
            next = align(next + t.data.len());
        }
        Written { bytes: out, kv_value_pos, tensor_info_pos, data_offset }
    }
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write");
    p
}

/// Writes `bytes` and returns the message of the error from opening them.
fn open_err(bytes: &[u8]) -> String {
    let d = tmp();
    let p = write_file(d.path(), "bad.gguf", bytes);
    let e = GgufFile::open(&p).expect_err("malformed file must not open").to_string();
    assert!(e.contains("bad.gguf"), "error does not name the file: {e}");
    e
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} does not mention {p:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Block packing: quants -> bytes, and the expected values computed from the quants directly.
// ---------------------------------------------------------------------------------------------

fn h(x: f32) -> f16 {
    f16::from_f32(x)
}

fn le16(x: f16) -> [u8; 2] {
    x.to_bits().to_le_bytes()
}

/// Q8_0 block from scale `d` and 32 signed quants; expected values `q * d`.
fn q8_0_block(d: f16, q: &[i8; 32], bytes: &mut Vec<u8>, expect: &mut Vec<f32>) {
    bytes.extend(le16(d));
    bytes.extend(q.iter().map(|&x| x as u8));
    expect.extend(q.iter().map(|&x| x as f32 * d.to_f32()));
}

/// Q8_1 block: `{d, s, qs}`; expected values `q * d`.
fn q8_1_block(d: f16, q: &[i8; 32], bytes: &mut Vec<u8>, expect: &mut Vec<f32>) {
    bytes.extend(le16(d));
    let sum: i32 = q.iter().map(|&x| i32::from(x)).sum();
    bytes.extend(le16(h(d.to_f32() * sum as f32)));
    bytes.extend(q.iter().map(|&x| x as u8));
    expect.extend(q.iter().map(|&x| x as f32 * d.to_f32()));
}

/// Packs 32 nibbles: byte j holds element j (low) and element j + 16 (high).
fn pack_nibbles(q: &[u8; 32]) -> Vec<u8> {
    (0..16).map(|j| (q[j] & 0xF) | ((q[j + 16] & 0xF) << 4)).collect()
}

/// Q4_0 block from `d` and 32 unsigned nibbles; expected `(q - 8) * d`.
fn q4_0_block(d: f16, q: &[u8; 32], bytes: &mut Vec<u8>, expect: &mut Vec<f32>) {
    bytes.extend(le16(d));
    bytes.extend(pack_nibbles(q));
    expect.extend(q.iter().map(|&x| (x as f32 - 8.0) * d.to_f32()));
}

/// Q4_1 block; expected `q * d + m`.
fn q4_1_block(d: f16, m: f16, q: &[u8; 32], bytes: &mut Vec<u8>, expect: &mut Vec<f32>) {
    bytes.extend(le16(d));
    bytes.extend(le16(m));
    bytes.extend(pack_nibbles(q));
    expect.extend(q.iter().map(|&x| x as f32 * d.to_f32() + m.to_f32()));
}

/// The `qh` word of a Q5 block: bit i is bit 4 of quant i.
fn q5_high(q: &[u8; 32]) -> [u8; 4] {
    let mut qh = 0u32;
    for (i, &x) in q.iter().enumerate() {
        qh |= u32::from((x >> 4) & 1) << i;
    }
    qh.to_le_bytes()
}

/// Q5_0 block from `d` and 32 5-bit quants; expected `(q - 16) * d`.
fn q5_0_block(d: f16, q: &[u8; 32], bytes: &mut Vec<u8>, expect: &mut Vec<f32>) {
    bytes.extend(le16(d));
    bytes.extend(q5_high(q));
    bytes.extend(pack_nibbles(q));
    expect.extend(q.iter().map(|&x| (x as f32 - 16.0) * d.to_f32()));
}

/// Q5_1 block; expected `q * d + m`.
fn q5_1_block(d: f16, m: f16, q: &[u8; 32], bytes: &mut Vec<u8>, expect: &mut Vec<f32>) {
    bytes.extend(le16(d));
    bytes.extend(le16(m));
    bytes.extend(q5_high(q));
    bytes.extend(pack_nibbles(q));
    expect.extend(q.iter().map(|&x| x as f32 * d.to_f32() + m.to_f32()));
}

/// Deterministic pseudo-random bytes (xorshift).
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn arr32<T: Copy + Default>(v: impl IntoIterator<Item = T>) -> [T; 32] {
    let mut a = [T::default(); 32];
    for (o, x) in a.iter_mut().zip(v) {
        *o = x;
    }
    a
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn assert_bits_eq(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}[{i}]: got {g}, want {w}");
    }
}

// ---------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------

#[test]
fn float_tensors_roundtrip() {
    let vals = [1.0f32, -2.5, 0.125, 3.0e-3, 65504.0, -0.0, 1.0e-7, 7.0];
    let f16b: Vec<u8> = vals.iter().flat_map(|&x| le16(h(x))).collect();
    let bf16b: Vec<u8> = vals.iter().flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes()).collect();
    let w = Writer::new()
        .tensor("a.f32", &[4, 2], T_F32, f32_bytes(&vals))
        .tensor("b.f16", &[8], T_F16, f16b)
        .tensor("c.bf16", &[2, 2, 2], T_BF16, bf16b)
        .tensor("d.scalar", &[], T_F32, f32_bytes(&[42.5]))
        .build();
    let d = tmp();
    let p = write_file(d.path(), "m.gguf", &w.bytes);
    let g = GgufFile::open(&p).expect("open");
    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 32);
    assert_eq!(g.data_offset(), w.data_offset);
    assert_eq!(g.data_offset() % 32, 0);
    assert_eq!(g.names(), ["a.f32", "b.f16", "c.bf16", "d.scalar"]);
    assert_eq!(g.len(), 4);

    let a = g.tensor_info("a.f32").expect("a");
    assert_eq!(a.dims, [4, 2]);
    assert_eq!(a.shape(), [2, 4]);
    assert_eq!(a.ggml_type, GgmlType::F32);
    assert_eq!(a.n_bytes, 32);
    assert_bits_eq(&g.load_f32("a.f32").expect("a"), &vals, "f32");

    let want16: Vec<f32> = vals.iter().map(|&x| h(x).to_f32()).collect();
    assert_bits_eq(&g.load_f32("b.f16").expect("b"), &want16, "f16");

    let wantbf: Vec<f32> = vals.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
    assert_eq!(g.tensor_info("c.bf16").expect("c").shape(), [2, 2, 2]);
    assert_bits_eq(&g.load_f32("c.bf16").expect("c"), &wantbf, "bf16");

    let sc = g.tensor_info("d.scalar").expect("d");
    assert_eq!(sc.shape(), Vec::<usize>::new());
    assert_eq!(sc.numel(), 1);
    assert_eq!(g.load_f32("d.scalar").expect("d"), [42.5]);

    // Shape-checked load and raw bytes.
    assert_eq!(g.load_f32_checked("a.f32", &[2, 4]).expect("checked").len(), 8);
    let e = g.load_f32_checked("a.f32", &[4, 2]).expect_err("wrong shape").to_string();
    assert_has(&e, &["a.f32", "expected shape [4, 2]", "found [2, 4]"]);
    let (info, raw) = g.raw("a.f32").expect("raw");
    assert_eq!(info.name, "a.f32");
    assert_eq!(raw, f32_bytes(&vals).as_slice());
    let e = g.load_f32("nope").expect_err("missing");
    assert!(matches!(e, GgufError::MissingTensor { .. }));
    assert_has(&e.to_string(), &["m.gguf", "\"nope\"", "not found"]);
}

#[test]
fn q8_0_roundtrip() {
    let (mut bytes, mut want) = (Vec::new(), Vec::new());
    // Row 0: two blocks; row 1: two blocks. Extremes -128 and 127 included.
    q8_0_block(h(0.5), &arr32((0..32).map(|i| (i as i8) - 16)), &mut bytes, &mut want);
    q8_0_block(h(-0.03125), &arr32((0..32).map(|i| if i % 2 == 0 { 127 } else { -128 })), &mut bytes, &mut want);
    q8_0_block(h(0.0123), &arr32(noise(1, 32).into_iter().map(|b| b as i8)), &mut bytes, &mut want);
    q8_0_block(h(3.0), &[0i8; 32], &mut bytes, &mut want);
    assert_eq!(bytes.len(), 4 * 34);
    let w = Writer::new().tensor("w.q8", &[64, 2], T_Q8_0, bytes).build();
    let d = tmp();
    let g = GgufFile::open(write_file(d.path(), "q8.gguf", &w.bytes)).expect("open");
    let info = g.tensor_info("w.q8").expect("info");
    assert_eq!(info.ggml_type, GgmlType::Q8_0);
    assert_eq!(info.shape(), [2, 64]);
    assert_eq!(info.n_bytes, 136);
    let got = g.load_f32("w.q8").expect("load");
    assert_bits_eq(&got, &want, "q8_0");
    // Spot checks against hand-computed numbers.
    assert_eq!(got[0], -8.0); // -16 * 0.5
    assert_eq!(got[31], 7.5); // 15 * 0.5
    assert_eq!(got[32], 127.0 * -0.03125);
    assert_eq!(got[33], 4.0); // -128 * -0.03125
}

#[test]
fn q4_0_literal_block() {
    // d = 1.0 (f16 0x3C00). qs[0] = 0x1F: element 0 = 0xF - 8 = 7, element 16 = 0x1 - 8 = -7.
    // qs[15] = 0x80: element 15 = 0 - 8 = -8, element 31 = 8 - 8 = 0. Others 0x88 -> 0.
    let mut block = vec![0x00, 0x3C];
    let mut qs = [0x88u8; 16];
    qs[0] = 0x1F;
    qs[15] = 0x80;
    block.extend(qs);
    let w = Writer::new().tensor("lit", &[32], T_Q4_0, block).build();
    let d = tmp();
    let g = GgufFile::open(write_file(d.path(), "lit.gguf", &w.bytes)).expect("open");
    let got = g.load_f32("lit").expect("load");
    let mut want = [0f32; 32];
    want[0] = 7.0;
    want[16] = -7.0;
    want[15] = -8.0;
    want[31] = 0.0;
    assert_bits_eq(&got, &want, "q4_0 literal");
}

#[test]
fn q4_0_q4_1_roundtrip() {
    let (mut b0, mut w0) = (Vec::new(), Vec::new());
    q4_0_block(h(0.25), &arr32((0..32).map(|i| (i % 16) as u8)), &mut b0, &mut w0);
    q4_0_block(h(-1.5), &arr32(noise(2, 32).into_iter().map(|b| b & 0xF)), &mut b0, &mut w0);
    q4_0_block(h(0.0071), &arr32((0..32).map(|i| 15 - (i % 16) as u8)), &mut b0, &mut w0);
    let (mut b1, mut w1) = (Vec::new(), Vec::new());
    q4_1_block(h(0.5), h(-3.0), &arr32((0..32).map(|i| (i / 2) as u8)), &mut b1, &mut w1);
    q4_1_block(h(0.0371), h(1.25), &arr32(noise(3, 32).into_iter().map(|b| b & 0xF)), &mut b1, &mut w1);
    let w = Writer::new().tensor("q40", &[32, 3], T_Q4_0, b0).tensor("q41", &[64], T_Q4_1, b1).build();
    let d = tmp();
    let g = GgufFile::open(write_file(d.path(), "q4.gguf", &w.bytes)).expect("open");
    assert_eq!(g.tensor_info("q40").expect("q40").shape(), [3, 32]);
    assert_eq!(g.tensor_info("q40").expect("q40").n_bytes, 54);
    assert_eq!(g.tensor_info("q41").expect("q41").n_bytes, 40);
    let got0 = g.load_f32("q40").expect("q40");
    assert_bits_eq(&got0, &w0, "q4_0");
    assert_eq!(&got0[..3], &[-2.0, -1.75, -1.5]); // (0 - 8) * 0.25, ...
    let got1 = g.load_f32("q41").expect("q41");
    assert_bits_eq(&got1, &w1, "q4_1");
    assert_eq!(&got1[..3], &[-3.0, -3.0, -2.5]); // q = 0, 0, 1: q * 0.5 - 3
    assert_eq!(got1[31], 4.5); // q = 15
}

#[test]
fn q5_q8_1_roundtrip() {
    let (mut b50, mut w50) = (Vec::new(), Vec::new());
    q5_0_block(h(0.5), &arr32((0..32).map(|i| i as u8)), &mut b50, &mut w50);
    q5_0_block(h(-0.0625), &arr32(noise(4, 32).into_iter().map(|b| b & 0x1F)), &mut b50, &mut w50);
    let (mut b51, mut w51) = (Vec::new(), Vec::new());
    q5_1_block(h(0.25), h(-1.0), &arr32((0..32).map(|i| 31 - i as u8)), &mut b51, &mut w51);
    q5_1_block(h(0.0137), h(0.5), &arr32(noise(5, 32).into_iter().map(|b| b & 0x1F)), &mut b51, &mut w51);
    let (mut b81, mut w81) = (Vec::new(), Vec::new());
    q8_1_block(h(0.125), &arr32(noise(6, 32).into_iter().map(|b| b as i8)), &mut b81, &mut w81);
    let w = Writer::new()
        .tensor("q50", &[64], T_Q5_0, b50)
        .tensor("q51", &[32, 2], T_Q5_1, b51)
        .tensor("q81", &[32], T_Q8_1, b81)
        .build();
    let d = tmp();
    let g = GgufFile::open(write_file(d.path(), "q5.gguf", &w.bytes)).expect("open");
    let got = g.load_f32("q50").expect("q50");
    assert_bits_eq(&got, &w50, "q5_0");
    assert_eq!((got[0], got[16], got[31]), (-8.0, 0.0, 7.5));
    assert_bits_eq(&g.load_f32("q51").expect("q51"), &w51, "q5_1");
    assert_bits_eq(&g.load_f32("q81").expect("q81"), &w81, "q8_1");
}

#[test]
fn large_tensor_uses_parallel_path_and_matches() {
    // 256 x 512 Q4_0 = 131072 elements (above the parallel threshold), 4096 blocks.
    let (mut bytes, mut want) = (Vec::new(), Vec::new());
    let qs = noise(7, 4096 * 32);
    let ds = noise(8, 4096);
    for b in 0..4096 {
        let q = arr32(qs[b * 32..b * 32 + 32].iter().map(|x| x & 0xF));
        q4_0_block(h((ds[b] as f32 - 128.0) / 64.0), &q, &mut bytes, &mut want);
    }
    let w = Writer::new().tensor("big", &[256, 512], T_Q4_0, bytes).build();
    let d = tmp();
    let g = GgufFile::open(write_file(d.path(), "big.gguf", &w.bytes)).expect("open");
    assert_eq!(g.tensor_info("big").expect("big").shape(), [512, 256]);
    assert_bits_eq(&g.load_f32("big").expect("big"), &want, "big q4_0");
}

#[test]
fn metadata_of_every_type() {
    let nested = V::Arr(9, vec![V::Arr(4, vec![V::U32(1), V::U32(2)]), V::Arr(4, vec![V::U32(3)]), V::Arr(4, vec![])]);
    let nested_str = V::Arr(9, vec![V::Arr(8, vec![s("a"), s("")]), V::Arr(8, vec![s("ü→✓")])]);
    let w = Writer::new()
        .kv("general.architecture", s("llama"))
        .kv("t.u8", V::U8(200))
        .kv("t.i8", V::I8(-100))
        .kv("t.u16", V::U16(60000))
        .kv("t.i16", V::I16(-30000))
        .kv("t.u32", V::U32(4_000_000_000))
        .kv("t.i32", V::I32(-2_000_000_000))
        .kv("t.f32", V::F32(1.0e-5))
        .kv("t.bool", V::Bool(true))
        .kv("t.str", s("héllo wörld"))
        .kv("t.empty_str", s(""))
        .kv("t.u64", V::U64(u64::MAX))
        .kv("t.i64", V::I64(i64::MIN))
        .kv("t.f64", V::F64(std::f64::consts::PI))
        .kv("t.arr_u8", V::Arr(0, vec![V::U8(1), V::U8(255)]))
        .kv("t.arr_i8", V::Arr(1, vec![V::I8(-1), V::I8(2)]))
        .kv("t.arr_u16", V::Arr(2, vec![V::U16(65535)]))
        .kv("t.arr_i16", V::Arr(3, vec![V::I16(-2)]))
        .kv("t.arr_u32", V::Arr(4, vec![V::U32(7), V::U32(8)]))
        .kv("t.arr_i32", V::Arr(5, vec![V::I32(-1), V::I32(0), V::I32(1)]))
        .kv("t.arr_f32", V::Arr(6, vec![V::F32(0.5), V::F32(-1.5)]))
        .kv("t.arr_bool", V::Arr(7, vec![V::Bool(true), V::Bool(false)]))
        .kv("t.arr_str", V::Arr(8, vec![s("<s>"), s("</s>"), s("▁the")]))
        .kv("t.arr_u64", V::Arr(10, vec![V::U64(1 << 40)]))
        .kv("t.arr_i64", V::Arr(11, vec![V::I64(-5)]))
        .kv("t.arr_f64", V::Arr(12, vec![V::F64(0.25)]))
        .kv("t.arr_empty", V::Arr(6, vec![]))
        .kv("t.nested", nested)
        .kv("t.nested_str", nested_str)
        .tensor("x", &[1], T_F32, f32_bytes(&[1.0]))
        .build();
    let d = tmp();
    let g = GgufFile::open(write_file(d.path(), "meta.gguf", &w.bytes)).expect("open");
    assert_eq!(g.metadata_len(), 29);
    let keys: Vec<&str> = g.keys().collect();
    assert_eq!(keys[0], "general.architecture");
    assert_eq!(keys[28], "t.nested_str");
    assert_eq!(g.metadata().count(), 29);

    // Raw values.
    assert_eq!(g.get("t.u8"), Some(&GgufValue::U8(200)));
    assert_eq!(g.get("t.i8"), Some(&GgufValue::I8(-100)));
    assert_eq!(g.get("t.u16"), Some(&GgufValue::U16(60000)));
    assert_eq!(g.get("t.i16"), Some(&GgufValue::I16(-30000)));
    assert_eq!(g.get("t.u32"), Some(&GgufValue::U32(4_000_000_000)));
    assert_eq!(g.get("t.i32"), Some(&GgufValue::I32(-2_000_000_000)));
    assert_eq!(g.get("t.f32"), Some(&GgufValue::F32(1.0e-5)));
    assert_eq!(g.get("t.bool"), Some(&GgufValue::Bool(true)));
    assert_eq!(g.get("t.str"), Some(&GgufValue::String("héllo wörld".into())));
    assert_eq!(g.get("t.u64"), Some(&GgufValue::U64(u64::MAX)));
    assert_eq!(g.get("t.i64"), Some(&GgufValue::I64(i64::MIN)));
    assert_eq!(g.get("t.f64"), Some(&GgufValue::F64(std::f64::consts::PI)));
    assert_eq!(g.get("t.arr_u8"), Some(&GgufValue::Array(GgufArray::U8(vec![1, 255]))));
    assert_eq!(g.get("t.arr_i8"), Some(&GgufValue::Array(GgufArray::I8(vec![-1, 2]))));
    assert_eq!(g.get("t.arr_u16"), Some(&GgufValue::Array(GgufArray::U16(vec![65535]))));
    assert_eq!(g.get("t.arr_i16"), Some(&GgufValue::Array(GgufArray::I16(vec![-2]))));
    assert_eq!(g.get("t.arr_bool"), Some(&GgufValue::Array(GgufArray::Bool(vec![true, false]))));
    assert_eq!(g.get("t.arr_u64"), Some(&GgufValue::Array(GgufArray::U64(vec![1 << 40]))));
    assert_eq!(g.get("t.arr_i64"), Some(&GgufValue::Array(GgufArray::I64(vec![-5]))));
    assert_eq!(g.get("t.arr_f64"), Some(&GgufValue::Array(GgufArray::F64(vec![0.25]))));
    assert_eq!(g.get("t.arr_empty"), Some(&GgufValue::Array(GgufArray::F32(vec![]))));
    assert_eq!(
        g.get("t.nested"),
        Some(&GgufValue::Array(GgufArray::Array(vec![
            GgufArray::U32(vec![1, 2]),
            GgufArray::U32(vec![3]),
            GgufArray::U32(vec![]),
        ])))
    );
    assert_eq!(
        g.get("t.nested_str"),
        Some(&GgufValue::Array(GgufArray::Array(vec![
            GgufArray::String(vec!["a".into(), "".into()]),
            GgufArray::String(vec!["ü→✓".into()]),
        ])))
    );
    assert_eq!(g.get("missing"), None);
    assert_eq!(g.get("t.u8").map(GgufValue::value_type), Some(GgufValueType::U8));
    assert_eq!(g.get("t.nested").map(GgufValue::type_description).as_deref(), Some("array of array of u32"));

    // Typed getters.
    assert_eq!(g.get_str("general.architecture").expect("arch"), "llama");
    assert_eq!(g.get_str("t.empty_str").expect("empty"), "");
    assert_eq!(g.get_u32("t.u32").expect("u32"), 4_000_000_000);
    assert_eq!(g.get_u32("t.u8").expect("u8 widens"), 200);
    assert_eq!(g.get_u32("t.u16").expect("u16 widens"), 60000);
    assert_eq!(g.get_i32("t.i16").expect("i16 widens"), -30000);
    assert_eq!(g.get_i32("t.i8").expect("i8"), -100);
    assert_eq!(g.get_i64("t.i64").expect("i64"), i64::MIN);
    assert_eq!(g.get_u64("t.u64").expect("u64"), u64::MAX);
    assert_eq!(g.get_usize("t.u32").expect("usize"), 4_000_000_000);
    assert_eq!(g.get_f32("t.f32").expect("f32"), 1.0e-5);
    assert_eq!(g.get_f32("t.f64").expect("f64 narrows"), std::f32::consts::PI);
    assert_eq!(g.get_f64("t.f64").expect("f64"), std::f64::consts::PI);
    assert!(g.get_bool("t.bool").expect("bool"));
    assert_eq!(g.get_str_array("t.arr_str").expect("strs"), ["<s>", "</s>", "▁the"]);
    assert_eq!(g.get_f32_array("t.arr_f32").expect("f32s"), [0.5, -1.5]);
    assert_eq!(g.get_f32_array("t.arr_f64").expect("f64s"), [0.25]);
    assert_eq!(g.get_f32_array("t.arr_empty").expect("empty"), Vec::<f32>::new());
    assert_eq!(g.get_i32_array("t.arr_i32").expect("i32s"), [-1, 0, 1]);
    assert_eq!(g.get_i32_array("t.arr_u8").expect("u8s widen"), [1, 255]);
    assert_eq!(g.get_u32_array("t.arr_u32").expect("u32s"), [7, 8]);
    let nested = g.get_array("t.nested").expect("nested");
    assert_eq!((nested.len(), nested.elem_type()), (3, GgufValueType::Array));

    // Typed-getter errors name the key and both types.
    let e = g.get_u32("t.str").expect_err("string as u32");
    assert!(matches!(e, GgufError::KeyType { .. }));
    assert_has(&e.to_string(), &["meta.gguf", "\"t.str\"", "expected u32", "found string"]);
    let e = g.get_str("t.u32").expect_err("u32 as string").to_string();
    assert_has(&e, &["\"t.u32\"", "expected string", "found u32"]);
    let e = g.get_str_array("t.arr_u32").expect_err("u32s as strings").to_string();
    assert_has(&e, &["\"t.arr_u32\"", "expected array of string", "found array of u32"]);
    let e = g.get_f32_array("t.nested").expect_err("nested as f32s").to_string();
    assert_has(&e, &["\"t.nested\"", "expected array of f32", "found array of array of u32"]);
    let e = g.get_f32("t.i32").expect_err("int as float").to_string();
    assert_has(&e, &["\"t.i32\"", "expected f32", "found i32"]);
    let e = g.get_bool("t.u8").expect_err("u8 as bool").to_string();
    assert_has(&e, &["expected bool", "found u8"]);
    let e = g.get_u32("t.i32").expect_err("negative as u32").to_string();
    assert_has(&e, &["\"t.i32\"", "-2000000000", "does not fit in u32"]);
    let e = g.get_i32("t.u32").expect_err("too big for i32").to_string();
    assert_has(&e, &["\"t.u32\"", "4000000000", "does not fit in i32"]);
    let e = g.get_u32_array("t.arr_i32").expect_err("negative element").to_string();
    assert_has(&e, &["\"t.arr_i32\"", "element 0 = -1", "does not fit in u32"]);
    let e = g.get_u32("nope").expect_err("missing");
    assert!(matches!(e, GgufError::MissingKey { .. }));
    assert_has(&e.to_string(), &["meta.gguf", "\"nope\"", "not found"]);
}

#[test]
fn alignment_other_than_32() {
    for align in [64u32, 8, 4096] {
        let w = Writer::new()
            .alignment(align)
            .kv("pad", s("xyz")) // make the table end unaligned
            .tensor("a", &[3], T_F32, f32_bytes(&[1.0, 2.0, 3.0]))
            .tensor("b", &[5], T_F32, f32_bytes(&[4.0, 5.0, 6.0, 7.0, 8.0]))
            .tensor("c", &[32], T_Q8_0, {
                let (mut b, mut e) = (Vec::new(), Vec::new());
                q8_0_block(h(2.0), &arr32((0..32).map(|i| i as i8)), &mut b, &mut e);
                b
            })
            .build();
        let d = tmp();
        let g = GgufFile::open(write_file(d.path(), "al.gguf", &w.bytes)).expect("open");
        let a = align as usize;
        assert_eq!(g.alignment(), a);
        assert_eq!(g.get_u32("general.alignment").expect("alignment"), align);
        assert_eq!(g.data_offset(), w.data_offset);
        assert_eq!(g.data_offset() % a, 0);
        for t in g.tensors() {
            assert_eq!(t.offset % a, 0, "{}", t.name);
            assert_eq!(t.data_start, g.data_offset() + t.offset);
        }
        assert_eq!(g.tensor_info("b").expect("b").offset, a.max(16).div_ceil(a) * a);
        assert_eq!(g.load_f32("a").expect("a"), [1.0, 2.0, 3.0]);
        assert_eq!(g.load_f32("b").expect("b"), [4.0, 5.0, 6.0, 7.0, 8.0]);
        assert_eq!(g.load_f32("c").expect("c")[31], 62.0);
    }
}

#[test]
fn version_2_and_empty_files_are_accepted() {
    let mut w = Writer::new().kv("k", V::U32(1)).tensor("t", &[2], T_F32, f32_bytes(&[1.0, 2.0]));
    w.version = 2;
    let d = tmp();
    let g = GgufFile::open(write_file(d.path(), "v2.gguf", &w.build().bytes)).expect("v2");
    assert_eq!(g.version(), 2);
    assert_eq!(g.load_f32("t").expect("t"), [1.0, 2.0]);

    // No tensors and no metadata: just the header.
    let g = GgufFile::open(write_file(d.path(), "empty.gguf", &Writer::new().build().bytes)).expect("empty");
    assert!(g.is_empty());
    assert_eq!(g.metadata_len(), 0);
}

#[test]
fn zero_sized_tensor_loads_empty() {
    let w = Writer::new().tensor("z", &[32, 0], T_Q8_0, vec![]).tensor("t", &[1], T_F32, f32_bytes(&[9.0])).build();
    let d = tmp();
    let g = GgufFile::open(write_file(d.path(), "z.gguf", &w.bytes)).expect("open");
    assert_eq!(g.tensor_info("z").expect("z").shape(), [0, 32]);
    assert!(g.load_f32("z").expect("z").is_empty());
    assert_eq!(g.load_f32("t").expect("t"), [9.0]);
}

#[test]
fn unsupported_known_type_errors_at_load() {
    // One Q4_K super-block (256 elements, 144 bytes): sized correctly, so the file opens, but
    // load_f32 cannot dequantise it.
    let w = Writer::new().tensor("blk.0.ffn_up.weight", &[256], T_Q4_K, vec![0; 144]).build();
    let d = tmp();
    let g = GgufFile::open(write_file(d.path(), "k.gguf", &w.bytes)).expect("open");
    let info = g.tensor_info("blk.0.ffn_up.weight").expect("info");
    assert_eq!((info.ggml_type, info.n_bytes), (GgmlType::Q4_K, 144));
    assert!(!info.ggml_type.can_dequantize());
    let e = g.load_f32("blk.0.ffn_up.weight").expect_err("unsupported");
    assert!(matches!(e, GgufError::UnsupportedType { type_id: 12, .. }));
    assert_has(&e.to_string(), &["k.gguf", "\"blk.0.ffn_up.weight\"", "Q4_K", "type id 12"]);
    // Converted into the crate's WeightError it keeps the tensor and type.
    let we = WeightError::from(e);
    assert!(matches!(we, WeightError::DType { ref dtype, .. } if dtype == "Q4_K"), "{we}");
    assert_eq!(g.raw("blk.0.ffn_up.weight").expect("raw").1.len(), 144);
}

// ---------------------------------------------------------------------------------------------
// Malformed files
// ---------------------------------------------------------------------------------------------

fn two_tensor_file() -> Written {
    Writer::new()
        .kv("general.architecture", s("llama"))
        .tensor("first", &[8], T_F32, f32_bytes(&[1.0; 8]))
        .tensor("second.weight", &[64], T_Q8_0, vec![0; 68])
        .build()
}

#[test]
fn truncated_tensor_data() {
    let w = two_tensor_file();
    let cut = &w.bytes[..w.bytes.len() - 10];
    let e = open_err(cut);
    assert_has(&e, &["\"second.weight\"", "extends past the end of the file", "truncated"]);
    // Cut into the data section before any tensor data: the first tensor is named.
    let e = open_err(&w.bytes[..w.data_offset + 4]);
    assert_has(&e, &["\"first\"", "extends past the end of the file"]);
}

#[test]
fn truncated_header_and_metadata() {
    let w = Writer::new()
        .kv("general.architecture", s("llama"))
        .kv("general.name", s("a rather long model name"))
        .tensor("t", &[2], T_F32, f32_bytes(&[1.0, 2.0]))
        .build();
    // Shorter than the fixed header.
    let e = open_err(&w.bytes[..20]);
    assert_has(&e, &["20 bytes", "too small for a GGUF header"]);
    // Inside the second metadata value (its string): the key is named.
    let e = open_err(&w.bytes[..w.kv_value_pos[1] + 4 + 8 + 5]);
    assert_has(&e, &["\"general.name\"", "length 24 exceeds the 5 bytes remaining", "truncated"]);
    // Inside the second key.
    let e = open_err(&w.bytes[..w.kv_value_pos[0] + 4 + 8 + 5 + 8 + 3]);
    assert_has(&e, &["metadata entry 1 (of 2): key: length 12 exceeds the 3 bytes remaining", "truncated"]);
    // Inside the tensor table (in the dims): the tensor is named.
    let e = open_err(&w.bytes[..w.tensor_info_pos[0] + 8 + 1 + 4 + 3]);
    assert_has(&e, &["tensor \"t\"", "unexpected end of file", "dim 0"]);
}

#[test]
fn bad_magic() {
    let mut b = two_tensor_file().bytes;
    b[..4].copy_from_slice(b"GGML");
    let e = open_err(&b);
    assert_has(&e, &["not a GGUF file", "magic", "GGML"]);
    // Even a tiny file says it is not GGUF rather than just "too small".
    assert_has(&open_err(b"PK\x03\x04zip"), &["not a GGUF file"]);
    b[..4].copy_from_slice(b"FUGG");
    assert_has(&open_err(&b), &["big-endian"]);
}

#[test]
fn unsupported_version() {
    for (v, extra) in [(4u32, ""), (1, "v1"), (0, ""), (0x0300_0000, "big-endian")] {
        let mut w = two_tensor_file();
        w.bytes[4..8].copy_from_slice(&v.to_le_bytes());
        let e = open_err(&w.bytes);
        assert_has(&e, &[&format!("unsupported GGUF version {v}"), "versions 2 and 3", extra]);
    }
}

#[test]
fn unknown_tensor_type_id() {
    let w = Writer::new().tensor("mystery.weight", &[4], 99, vec![0; 16]).build();
    let e = open_err(&w.bytes);
    assert_has(&e, &["\"mystery.weight\"", "unsupported ggml type unknown", "type id 99"]);
    // A removed ggml type id (Q4_2 = 4) is unknown too.
    let w = Writer::new().tensor("old", &[32], 4, vec![0; 20]).build();
    assert_has(&open_err(&w.bytes), &["\"old\"", "type id 4"]);
}

#[test]
fn inconsistent_sizes() {
    // 33 elements per row is not a whole number of 32-element Q8_0 blocks.
    let w = Writer::new().tensor("odd.q8", &[33, 2], T_Q8_0, vec![0; 68]).build();
    let e = open_err(&w.bytes);
    assert_has(&e, &["\"odd.q8\"", "row length (dims[0]) 33", "not a multiple of the Q8_0 block size 32"]);
    let w = Writer::new().tensor("odd.q4", &[48], T_Q4_1, vec![0; 40]).build();
    assert_has(&open_err(&w.bytes), &["\"odd.q4\"", "Q4_1 block size 32"]);
    // Too many dims.
    let w = Writer::new().tensor("5d", &[1, 1, 1, 1, 1], T_F32, vec![0; 4]).build();
    assert_has(&open_err(&w.bytes), &["\"5d\"", "5 dims", "at most 4"]);
    // Dims whose product overflows.
    let w = Writer::new().tensor("huge", &[1 << 40, 1 << 40], T_F32, vec![]).build();
    assert_has(&open_err(&w.bytes), &["\"huge\"", "overflow"]);
    // Valid product, but far more data than the file holds.
    let w = Writer::new().tensor("big", &[1 << 20, 1 << 20], T_F32, vec![0; 4]).build();
    assert_has(&open_err(&w.bytes), &["\"big\"", "extends past the end of the file"]);
}

#[test]
fn tensor_offset_out_of_range() {
    let w = Writer::new()
        .tensor("ok", &[4], T_F32, f32_bytes(&[1.0; 4]))
        .tensor_at("far", &[4], T_F32, f32_bytes(&[1.0; 4]), 1 << 40)
        .build();
    assert_has(&open_err(&w.bytes), &["\"far\"", "offset 1099511627776", "extends past the end of the file"]);
    // An offset so large that data section + offset overflows u64.
    let w = Writer::new().tensor_at("wrap", &[4], T_F32, vec![0; 16], u64::MAX - 31).build();
    assert_has(&open_err(&w.bytes), &["\"wrap\"", "extends past the end of the file"]);
    // Misaligned offset.
    let w = Writer::new()
        .tensor("a", &[4], T_F32, f32_bytes(&[1.0; 4]))
        .tensor_at("b", &[1], T_F32, f32_bytes(&[2.0]), 4)
        .build();
    assert_has(&open_err(&w.bytes), &["\"b\"", "data offset 4 is not a multiple of the alignment 32"]);
    // Overlapping tensors.
    let w = Writer::new()
        .tensor("a", &[16], T_F32, f32_bytes(&[1.0; 16]))
        .tensor_at("b", &[8], T_F32, f32_bytes(&[2.0; 8]), 32)
        .build();
    assert_has(&open_err(&w.bytes), &["\"b\"", "overlaps tensor \"a\""]);
}

#[test]
fn duplicate_tensor_name() {
    let w = Writer::new()
        .tensor("blk.0.attn_q.weight", &[1], T_F32, f32_bytes(&[1.0]))
        .tensor("blk.0.attn_q.weight", &[1], T_F32, f32_bytes(&[2.0]))
        .build();
    assert_has(&open_err(&w.bytes), &["\"blk.0.attn_q.weight\"", "duplicate tensor name"]);
}

#[test]
fn duplicate_metadata_key() {
    let w = Writer::new().kv("general.name", s("a")).kv("general.name", s("b")).build();
    assert_has(&open_err(&w.bytes), &["\"general.name\"", "duplicate key"]);
}

#[test]
fn bad_alignment_values() {
    for (a, want) in [(48u32, "alignment 48 must be a power of two"), (0, "alignment 0"), (1 << 21, "2097152")] {
        let w = Writer { alignment: 32, ..Writer::new() }.kv("general.alignment", V::U32(a)).build();
        assert_has(&open_err(&w.bytes), &["\"general.alignment\"", want]);
    }
    let w = Writer::new().kv("general.alignment", V::U64(32)).build();
    assert_has(&open_err(&w.bytes), &["\"general.alignment\"", "expected u32, found u64"]);
}

#[test]
fn malformed_metadata_values() {
    // Unknown value type tag 13.
    let mut w = Writer::new().kv("k.bad_type", V::U32(0)).build();
    let p = w.kv_value_pos[0];
    w.bytes[p..p + 4].copy_from_slice(&13u32.to_le_bytes());
    assert_has(&open_err(&w.bytes), &["\"k.bad_type\"", "unknown value type 13"]);
    // Bool byte 2.
    let mut w = Writer::new().kv("k.bool", V::Bool(true)).build();
    let p = w.kv_value_pos[0] + 4;
    w.bytes[p] = 2;
    assert_has(&open_err(&w.bytes), &["\"k.bool\"", "invalid bool byte 2"]);
    // Invalid UTF-8 in a string value.
    let mut w = Writer::new().kv("k.str", s("abc")).build();
    let p = w.kv_value_pos[0] + 4 + 8;
    w.bytes[p] = 0xFF;
    assert_has(&open_err(&w.bytes), &["\"k.str\"", "not valid UTF-8"]);
    // Arrays nested too deep.
    let mut v = V::Arr(4, vec![V::U32(1)]);
    for _ in 0..10 {
        v = V::Arr(9, vec![v]);
    }
    let w = Writer::new().kv("k.deep", v).build();
    assert_has(&open_err(&w.bytes), &["\"k.deep\"", "array nesting depth 9 exceeds the limit of 8"]);
}

#[test]
fn absurd_counts_are_rejected_without_allocating() {
    const HUGE: u64 = 1 << 60;
    let limit = 1 << 20;
    let d = tmp();
    // The tracker sees large allocations.
    let (v, peak) = largest_alloc(|| vec![0u8; 2 * limit]);
    assert!(peak >= 2 * limit && v.len() == 2 * limit, "allocation tracking is not working");

    // Header: n_tensors = 2^60.
    let mut w = two_tensor_file();
    w.bytes[8..16].copy_from_slice(&HUGE.to_le_bytes());
    let p = write_file(d.path(), "nt.gguf", &w.bytes);
    let (r, peak) = largest_alloc(|| GgufFile::open(&p));
    let e = r.expect_err("absurd tensor count").to_string();
    assert_has(&e, &["nt.gguf", "tensor count", "1152921504606846976"]);
    assert!(peak < limit, "opening allocated {peak} bytes at once");

    // Header: n_kv = 2^60.
    let mut w = two_tensor_file();
    w.bytes[16..24].copy_from_slice(&HUGE.to_le_bytes());
    let p = write_file(d.path(), "nkv.gguf", &w.bytes);
    let (r, peak) = largest_alloc(|| GgufFile::open(&p));
    assert_has(&r.expect_err("absurd kv count").to_string(), &["metadata count", "1152921504606846976"]);
    assert!(peak < limit, "opening allocated {peak} bytes at once");

    // An array claiming 2^60 strings.
    let mut w = Writer::new().kv("tokenizer.ggml.tokens", V::Arr(8, vec![s("a")])).build();
    let p0 = w.kv_value_pos[0] + 4 + 4;
    w.bytes[p0..p0 + 8].copy_from_slice(&HUGE.to_le_bytes());
    let p = write_file(d.path(), "arr.gguf", &w.bytes);
    let (r, peak) = largest_alloc(|| GgufFile::open(&p));
    assert_has(
        &r.expect_err("absurd array").to_string(),
        &["\"tokenizer.ggml.tokens\"", "array of string", "1152921504606846976"],
    );
    assert!(peak < limit, "opening allocated {peak} bytes at once");

    // A string claiming 2^60 bytes.
    let mut w = Writer::new().kv("general.name", s("abc")).build();
    let p0 = w.kv_value_pos[0] + 4;
    w.bytes[p0..p0 + 8].copy_from_slice(&HUGE.to_le_bytes());
    let p = write_file(d.path(), "str.gguf", &w.bytes);
    let (r, peak) = largest_alloc(|| GgufFile::open(&p));
    assert_has(&r.expect_err("absurd string").to_string(), &["\"general.name\"", "1152921504606846976"]);
    assert!(peak < limit, "opening allocated {peak} bytes at once");

    // A tensor name claiming 2^60 bytes.
    let mut w = two_tensor_file();
    let p0 = w.tensor_info_pos[0];
    w.bytes[p0..p0 + 8].copy_from_slice(&HUGE.to_le_bytes());
    let p = write_file(d.path(), "name.gguf", &w.bytes);
    let (r, peak) = largest_alloc(|| GgufFile::open(&p));
    assert_has(&r.expect_err("absurd name").to_string(), &["tensor info 0", "1152921504606846976"]);
    assert!(peak < limit, "opening allocated {peak} bytes at once");
}

#[test]
fn errors_convert_to_weight_error() {
    let e = GgufError::Tensor { path: "f.gguf".into(), name: "t".into(), message: "bad".into() };
    assert!(matches!(WeightError::from(e), WeightError::Invalid { ref name, .. } if name == "t"));
    let e = GgufError::MissingKey { path: "f.gguf".into(), key: "k".into() };
    let we = WeightError::from(e);
    assert_eq!(we.to_string(), "f.gguf: metadata key \"k\" not found");
}
