//! The sync-free decode MoE (`moe_decode::moe_small`) against a plain f64 host computation on
//! fresh random data.
//!
//! Every test skips with a message where no GPU is present. The output and the f32 workspace are
//! poisoned with NaN (0xFF bytes) before the kernels run, the output has a poisoned guard tail that
//! must stay untouched, and the expert tensors are NaN everywhere except the experts a case
//! routes to, so an unwritten element or a wrong expert address fails the comparison.
//!
//! * f32 path: per token row, `max |gpu - ref| / max |ref| ≤ 1e-5`.
//! * bf16 path: the host runs on the bf16-rounded inputs (the kernel keeps `h` and every sum in
//!   f32, rounding once on store): `≤ 1e-2`.
//! * T = 1, 3, 16 on a tiny shape (hidden 64, I 32, E 8, top-2), an odd one (vector tails, several
//!   load steps per row) and the 30B shape (hidden 2048, I 1536, E 64, top-4); ids with random
//!   experts, a small pool shared by all tokens (up to 16 members per expert: several passes over
//!   a weight row), every token on the same experts, an expert twice within a token, and ids
//!   outside `[0, E)` (contribute zero).
//! * Half the cases pass a shared-expert output for the combine to add (before the one rounding).
//! * Determinism: two runs are bitwise equal, and a token's output is bitwise the same alone as in
//!   a batch of 16.
//!
//! Run: `cargo test --release -p indexcache-cuda --test moe_decode -- --nocapture`
//! Bench: `INDEXCACHE_BENCH=1 cargo test --release -p indexcache-cuda --test moe_decode bench -- --nocapture`

use half::bf16;
use indexcache_cuda::dev::{Dev, DevBuf};
use indexcache_cuda::moe_decode::{self, MAX_DECODE_TOKENS, MoeSmallArgs};
use indexcache_ops::DType;
use indexcache_ops::random::uniform;
use rand::{RngExt, SeedableRng, rngs::StdRng};
use std::collections::BTreeMap;

fn gpu() -> Option<Dev> {
    indexcache_cuda::dev::gpu_or_skip()
}

const F32_TOL: f64 = 1e-5;
const BF16_TOL: f64 = 1e-2;
/// Output elements past `T·hidden` that must stay poisoned.
const GUARD: usize = 64;

#[derive(Debug, Clone, Copy)]
struct Shape {
    hidden: usize,
    inter: usize,
    experts: usize,
    top_k: usize,
}

const TINY: Shape = Shape { hidden: 64, inter: 32, experts: 8, top_k: 2 };
/// Rows of 2600 elements (325 bf16 / 650 f32 vectors: a partial second/third load step),
/// I = 328 (41 bf16 vectors: most lanes idle), 5 experts, top-3.
const ODD: Shape = Shape { hidden: 2600, inter: 328, experts: 5, top_k: 3 };
const B30: Shape = Shape { hidden: 2048, inter: 1536, experts: 64, top_k: 4 };

fn round(dtype: DType, v: f32) -> f32 {
    match dtype {
        DType::F32 => v,
        DType::BF16 => bf16::from_f32(v).to_f32(),
    }
}

/// Host values of one expert (already rounded to the dtype): gate_up `[2I, hidden]`, down `[hidden, I]`.
struct ExpertW {
    gate_up: Vec<f32>,
    down: Vec<f32>,
}

fn expert_weights(dtype: DType, s: Shape, seed: u64, e: usize) -> ExpertW {
    // Bounds keep gate/up pre-activations O(1) (silu's curved part) at every hidden size.
    let b_gu = 1.7 / (s.hidden as f32).sqrt();
    let b_dn = 1.7 / (s.inter as f32).sqrt();
    let base = seed * 1000 + 2 * e as u64;
    let gate_up = (0..2 * s.inter * s.hidden).map(|i| round(dtype, b_gu * uniform(base, i as u64))).collect();
    let down = (0..s.hidden * s.inter).map(|i| round(dtype, b_dn * uniform(base + 1, i as u64))).collect();
    ExpertW { gate_up, down }
}

/// Expert tensors on the device: NaN everywhere, real values in the slots of `used` experts.
struct DevExperts {
    dtype: DType,
    shape: Shape,
    gate_up: DevBuf,
    down: DevBuf,
    host: BTreeMap<usize, ExpertW>,
}

fn to_bytes(dtype: DType, v: &[f32]) -> Vec<u8> {
    match dtype {
        DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::BF16 => v.iter().flat_map(|x| bf16::from_f32(*x).to_bits().to_le_bytes()).collect(),
    }
}

fn from_bytes(dtype: DType, b: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DType::BF16 => b.chunks_exact(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect(),
    }
}

/// Fill `bytes` bytes at `ptr` with 0xFF (NaN in f32 and bf16).
fn poison(dev: &Dev, ptr: u64, bytes: usize) {
    dev.ctx.bind_to_thread().expect("bind context");
    // SAFETY: `ptr` is the start of a live device allocation of at least `bytes` bytes.
    unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xFF, bytes, dev.stream.cu_stream()) }.expect("memset");
}

impl DevExperts {
    fn new(dev: &Dev, dtype: DType, shape: Shape, seed: u64, used: &[usize]) -> Self {
        let s = dtype.size();
        let (gu_one, dn_one) = (2 * shape.inter * shape.hidden, shape.hidden * shape.inter);
        let gate_up = dev.alloc("test", shape.experts * gu_one * s).expect("alloc");
        let down = dev.alloc("test", shape.experts * dn_one * s).expect("alloc");
        poison(dev, gate_up.ptr(), gate_up.bytes());
        poison(dev, down.ptr(), down.bytes());
        let mut host = BTreeMap::new();
        for &e in used {
            let w = expert_weights(dtype, shape, seed, e);
            let g = dev.upload("test", &to_bytes(dtype, &w.gate_up)).expect("upload");
            let d = dev.upload("test", &to_bytes(dtype, &w.down)).expect("upload");
            dev.copy_raw("test", gate_up.ptr() + (e * gu_one * s) as u64, g.ptr(), gu_one * s).expect("copy");
            dev.copy_raw("test", down.ptr() + (e * dn_one * s) as u64, d.ptr(), dn_one * s).expect("copy");
            dev.sync("test").expect("sync");
            host.insert(e, w);
        }
        Self { dtype, shape, gate_up, down, host }
    }
}

/// One batch: x `[T, hidden]` (rounded), ids and weights `[T, top_k]`, and optionally a
/// shared-expert output `[T, hidden]` (rounded) for the combine to add.
struct Batch {
    tokens: usize,
    x: Vec<f32>,
    ids: Vec<i32>,
    w: Vec<f32>,
    shared: Option<Vec<f32>>,
}

impl Batch {
    fn new(rng: &mut StdRng, dtype: DType, s: Shape, ids: Vec<i32>) -> Self {
        let tokens = ids.len() / s.top_k;
        let x = (0..tokens * s.hidden).map(|_| round(dtype, rng.random_range(-1.0f32..1.0))).collect();
        let w = (0..tokens * s.top_k).map(|_| rng.random_range(0.05f32..1.0)).collect();
        Self { tokens, x, ids, w, shared: None }
    }

    fn with_shared(mut self, rng: &mut StdRng, dtype: DType, s: Shape) -> Self {
        self.shared = Some((0..self.tokens * s.hidden).map(|_| round(dtype, rng.random_range(-0.5f32..0.5))).collect());
        self
    }

    /// Rows `t0..t0 + n` as a batch of their own.
    fn rows(&self, s: Shape, t0: usize, n: usize) -> Self {
        Self {
            tokens: n,
            x: self.x[t0 * s.hidden..(t0 + n) * s.hidden].to_vec(),
            ids: self.ids[t0 * s.top_k..(t0 + n) * s.top_k].to_vec(),
            w: self.w[t0 * s.top_k..(t0 + n) * s.top_k].to_vec(),
            shared: self.shared.as_ref().map(|v| v[t0 * s.hidden..(t0 + n) * s.hidden].to_vec()),
        }
    }
}

/// Ids patterns. Every expert a pattern uses must be in the `used` list of the experts.
#[derive(Debug, Clone, Copy)]
enum Route {
    /// `top_k` distinct experts per token, uniformly from `pool`.
    Random,
    /// Every token on the same `top_k` experts of `pool`.
    Same,
    /// Token t: expert `pool[t % len]` twice, then distinct ones (an expert twice within a token).
    Twice,
    /// Random, then every third pick replaced by -1 or E (outside the experts: contributes zero).
    Invalid,
}

fn make_ids(rng: &mut StdRng, s: Shape, tokens: usize, pool: &[usize], route: Route) -> Vec<i32> {
    assert!(pool.len() >= s.top_k);
    let distinct = |rng: &mut StdRng| -> Vec<i32> {
        let mut p: Vec<usize> = pool.to_vec();
        for i in 0..s.top_k {
            let j = rng.random_range(i..p.len());
            p.swap(i, j);
        }
        p[..s.top_k].iter().map(|&e| e as i32).collect()
    };
    let same = distinct(rng);
    let mut ids = Vec::with_capacity(tokens * s.top_k);
    for t in 0..tokens {
        let mut row = match route {
            Route::Random | Route::Invalid => distinct(rng),
            Route::Same => same.clone(),
            Route::Twice => {
                let mut r = distinct(rng);
                let e = pool[t % pool.len()] as i32;
                r[0] = e;
                if s.top_k > 1 {
                    r[1] = e;
                }
                r
            }
        };
        if let Route::Invalid = route {
            for (j, v) in row.iter_mut().enumerate() {
                if (t * s.top_k + j) % 3 == 1 {
                    *v = if (t + j) % 2 == 0 { -1 } else { s.experts as i32 };
                }
            }
        }
        ids.extend(row);
    }
    ids
}

/// f64 reference: `out[t] = Σ_j w[t,j] · down_e(silu(gate_e x) · up_e x) (+ shared[t])`, ids
/// outside `[0, E)` skipped.
fn reference(ex: &DevExperts, b: &Batch) -> Vec<f64> {
    let s = ex.shape;
    let (hd, it, k) = (s.hidden, s.inter, s.top_k);
    let mut out: Vec<f64> = match &b.shared {
        Some(v) => v.iter().map(|&a| a as f64).collect(),
        None => vec![0.0f64; b.tokens * hd],
    };
    for t in 0..b.tokens {
        let x = &b.x[t * hd..(t + 1) * hd];
        for j in 0..k {
            let e = b.ids[t * k + j];
            if e < 0 || e as usize >= s.experts {
                continue;
            }
            let w = &ex.host[&(e as usize)];
            let dot = |row: &[f32], v: &[f32]| -> f64 { row.iter().zip(v).map(|(a, b)| *a as f64 * *b as f64).sum() };
            let h: Vec<f64> = (0..it)
                .map(|i| {
                    let g = dot(&w.gate_up[i * hd..(i + 1) * hd], x);
                    let u = dot(&w.gate_up[(it + i) * hd..(it + i + 1) * hd], x);
                    g / (1.0 + (-g).exp()) * u
                })
                .collect();
            let wt = b.w[t * k + j] as f64;
            for r in 0..hd {
                let y: f64 = w.down[r * it..(r + 1) * it].iter().zip(&h).map(|(a, b)| *a as f64 * b).sum();
                out[t * hd + r] += wt * y;
            }
        }
    }
    out
}

/// Run `moe_small_ws` on the device (poisoned output + guard and workspace); returns the output
/// (and asserts the guard is untouched).
fn run_gpu(dev: &Dev, ex: &DevExperts, b: &Batch) -> Vec<f32> {
    let s = ex.shape;
    let es = ex.dtype.size();
    let x = dev.upload("test", &to_bytes(ex.dtype, &b.x)).expect("upload");
    let ids = dev.upload("test", &b.ids).expect("upload");
    let w = dev.upload("test", &b.w).expect("upload");
    let shared = b.shared.as_ref().map(|v| dev.upload("test", &to_bytes(ex.dtype, v)).expect("upload"));
    let n_out = b.tokens * s.hidden + GUARD;
    let out = dev.alloc("test", n_out * es).expect("alloc");
    poison(dev, out.ptr(), out.bytes());
    let a = MoeSmallArgs {
        dtype: ex.dtype,
        x: x.ptr(),
        ids: ids.ptr(),
        weights: w.ptr(),
        gate_up: ex.gate_up.ptr(),
        down: ex.down.ptr(),
        shared: shared.as_ref().map_or(0, |b| b.ptr()),
        out: out.ptr(),
        tokens: b.tokens,
        hidden: s.hidden,
        inter: s.inter,
        n_experts: s.experts,
        top_k: s.top_k,
    };
    let ws = dev.alloc("test", moe_decode::workspace_bytes(&a).max(16)).expect("alloc");
    poison(dev, ws.ptr(), ws.bytes());
    moe_decode::moe_small_ws(dev, &a, ws.ptr()).unwrap_or_else(|e| panic!("moe_small: {e}"));
    let bytes = dev.download::<u8>("test", &out, n_out * es).expect("download");
    let (body, guard) = bytes.split_at(b.tokens * s.hidden * es);
    assert!(guard.iter().all(|&v| v == 0xFF), "moe_small wrote past its output");
    from_bytes(ex.dtype, body)
}

/// Per token row `max |got - want| / max |want|`; asserts ≤ `tol` and that nothing is NaN.
fn check(what: &str, hidden: usize, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    let mut worst = 0.0f64;
    for (t, (g, w)) in got.chunks(hidden).zip(want.chunks(hidden)).enumerate() {
        let scale = w.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{what}: token {t} has an all-zero reference (degenerate case)");
        let mut err = 0.0f64;
        for (c, (a, b)) in g.iter().zip(w).enumerate() {
            assert!(a.is_finite(), "{what}: token {t} col {c} is {a} (unwritten or wrong expert)");
            err = err.max((*a as f64 - b).abs());
        }
        let rel = err / scale;
        assert!(rel <= tol, "{what}: token {t} rel err {rel:.3e} > {tol:.0e}");
        worst = worst.max(rel);
    }
    eprintln!("{what}: max rel err {worst:.2e}");
}

fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => F32_TOL,
        DType::BF16 => BF16_TOL,
    }
}

/// Every routing pattern at T = 1, 3, 16 on `shape`, with the experts of `pool` present.
fn suite(dev: &Dev, dtype: DType, shape: Shape, pool: &[usize], seed: u64, tokens_list: &[usize]) {
    let ex = DevExperts::new(dev, dtype, shape, seed, pool);
    let mut rng = StdRng::seed_from_u64(seed);
    for &tokens in tokens_list {
        for route in [Route::Random, Route::Same, Route::Twice, Route::Invalid] {
            if tokens == 1 && matches!(route, Route::Same) {
                continue; // the same as Random at one token
            }
            let ids = make_ids(&mut rng, shape, tokens, pool, route);
            let mut b = Batch::new(&mut rng, dtype, shape, ids);
            // Every other pattern with a shared-expert output to add.
            let with_shared = matches!(route, Route::Random | Route::Twice);
            if with_shared {
                b = b.with_shared(&mut rng, dtype, shape);
            }
            let want = reference(&ex, &b);
            let got = run_gpu(dev, &ex, &b);
            let what = format!("{} {shape:?} T {tokens} {route:?} shared {with_shared}", dtype.name());
            check(&what, shape.hidden, &got, &want, tol(dtype));
        }
    }
}

#[test]
fn tiny_f32() {
    let Some(dev) = gpu() else { return };
    suite(&dev, DType::F32, TINY, &(0..TINY.experts).collect::<Vec<_>>(), 1, &[1, 3, 16]);
}

#[test]
fn tiny_bf16() {
    let Some(dev) = gpu() else { return };
    suite(&dev, DType::BF16, TINY, &(0..TINY.experts).collect::<Vec<_>>(), 2, &[1, 3, 16]);
}

#[test]
fn odd_shape_both_dtypes() {
    let Some(dev) = gpu() else { return };
    let pool: Vec<usize> = (0..ODD.experts).collect();
    suite(&dev, DType::F32, ODD, &pool, 3, &[1, 3, 16]);
    suite(&dev, DType::BF16, ODD, &pool, 4, &[1, 3, 16]);
}

/// Experts used on the 30B shape: 7 spread over 0..64 (first and last included), so at T = 16
/// each is shared by ~9 tokens (three passes over its rows).
const B30_POOL: [usize; 7] = [0, 5, 17, 31, 42, 58, 63];

#[test]
fn shape_30b_bf16() {
    let Some(dev) = gpu() else { return };
    suite(&dev, DType::BF16, B30, &B30_POOL, 5, &[1, 3, 16]);
}

#[test]
fn shape_30b_f32() {
    let Some(dev) = gpu() else { return };
    suite(&dev, DType::F32, B30, &B30_POOL, 6, &[1, 3, 16]);
}

/// Bitwise: two runs agree, and each token alone gives the same bits as inside a batch of 16 with
/// heavy expert sharing (a pair's sums do not depend on the rest of the batch).
#[test]
fn deterministic_and_batch_invariant() {
    let Some(dev) = gpu() else { return };
    for (dtype, shape, pool) in
        [(DType::BF16, B30, B30_POOL.to_vec()), (DType::F32, ODD, (0..ODD.experts).collect::<Vec<_>>())]
    {
        let ex = DevExperts::new(&dev, dtype, shape, 7, &pool);
        let mut rng = StdRng::seed_from_u64(7);
        let ids = make_ids(&mut rng, shape, MAX_DECODE_TOKENS, &pool, Route::Random);
        let b = Batch::new(&mut rng, dtype, shape, ids).with_shared(&mut rng, dtype, shape);
        let first = run_gpu(&dev, &ex, &b);
        let second = run_gpu(&dev, &ex, &b);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&first), bits(&second), "{}: two runs differ", dtype.name());
        for t in [0, 5, MAX_DECODE_TOKENS - 1] {
            let alone = run_gpu(&dev, &ex, &b.rows(shape, t, 1));
            let h = shape.hidden;
            assert_eq!(bits(&alone), bits(&first[t * h..(t + 1) * h]), "{}: token {t} alone vs batch", dtype.name());
        }
    }
}

/// Shapes the kernels do not take are rejected before any launch.
#[test]
fn rejects_unsupported_arguments() {
    let Some(dev) = gpu() else { return };
    let a = MoeSmallArgs {
        dtype: DType::BF16,
        x: 0,
        ids: 0,
        weights: 0,
        gate_up: 0,
        down: 0,
        shared: 0,
        out: 0,
        tokens: MAX_DECODE_TOKENS + 1,
        hidden: 2048,
        inter: 1536,
        n_experts: 64,
        top_k: 4,
    };
    assert!(moe_decode::moe_small(&dev, &a).is_err());
    assert!(moe_decode::moe_small(&dev, &MoeSmallArgs { tokens: 1, hidden: 2044, ..a }).is_err());
    // Zero tokens: nothing to do, nothing touched.
    assert!(moe_decode::moe_small(&dev, &MoeSmallArgs { tokens: 0, ..a }).is_ok());
}

#[test]
fn bench() {
    // Allocates 1.2 GB of expert weights: only with INDEXCACHE_BENCH=1.
    if std::env::var("INDEXCACHE_BENCH").as_deref() != Ok("1") {
        eprintln!("skipped: set INDEXCACHE_BENCH=1 to run the moe_small benchmark");
        return;
    }
    let Some(dev) = gpu() else { return };
    for b in moe_decode::bench(&dev).unwrap_or_else(|e| panic!("bench: {e}")) {
        eprintln!(
            "{:<44} {:<64} {:>9.4} ms {:>7.2} TFLOP/s {:>7.0} GB/s {:>5.1}% of ceiling",
            b.kernel,
            b.shape,
            b.ms,
            b.tflops,
            b.gbps,
            100.0 * b.of_ceiling
        );
    }
}
