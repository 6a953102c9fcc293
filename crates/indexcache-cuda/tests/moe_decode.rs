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
//! * Every case runs again with a *fused shared expert* (`shared_gate/up/down`, width I: one more
//!   expert slot per token, weight 1) against the reference plus the shared expert's f64 SwiGLU.
//!   Its gate, up and down live in one buffer with NaN blocks between them, so reading its up rows
//!   at "gate + I rows" (the stacked routed layout) or past a matrix fails.
//! * Determinism: two runs are bitwise equal, and a token's output is bitwise the same alone as in
//!   a batch of 16 (with and without the fused shared expert).
//! * `CudaBackend::moe` at T = 1, 3, 16 (f32 and bf16) with a shared expert as wide as the routed
//!   ones (fused into the decode kernels) and one twice as wide (a separate MLP), against
//!   `CpuBackend::moe` — the CPU reference with the shared expert.
//!
//! Run: `cargo test --release -p indexcache-cuda --test moe_decode -- --nocapture`
//! Bench: `INDEXCACHE_BENCH=1 cargo test --release -p indexcache-cuda --test moe_decode bench -- --nocapture`

use half::bf16;
use indexcache_cuda::CudaBackend;
use indexcache_cuda::dev::{Dev, DevBuf};
use indexcache_cuda::moe_decode::{self, MAX_DECODE_TOKENS, MoeSmallArgs};
use indexcache_ops::conformance::{Tolerance, rel_err};
use indexcache_ops::cpu::CpuBackend;
use indexcache_ops::random::{self, uniform};
use indexcache_ops::{Backend, DType, Experts, Mlp, Moe, MoeRouting, OpResult, WeightInit};
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

/// A fused shared expert of width I: gate, up `[I, hidden]` and down `[hidden, I]` (host values,
/// rounded) and their device copies, laid out in one buffer of 6 blocks of `I·hidden` elements as
/// `[gate | NaN | up | NaN | down | NaN]`.
struct DevShared {
    buf: DevBuf,
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
}

impl DevShared {
    fn new(dev: &Dev, dtype: DType, shape: Shape, seed: u64) -> Self {
        let es = dtype.size();
        let block = shape.inter * shape.hidden;
        // The same value distribution as a routed expert (expert number 400: no routed one).
        let w = expert_weights(dtype, shape, seed, 400);
        let (gate, up) = w.gate_up.split_at(block);
        let buf = dev.alloc("test", 6 * block * es).expect("alloc");
        poison(dev, buf.ptr(), buf.bytes());
        for (k, v) in [gate, up, &w.down[..]].into_iter().enumerate() {
            let d = dev.upload("test", &to_bytes(dtype, v)).expect("upload");
            dev.copy_raw("test", buf.ptr() + (2 * k * block * es) as u64, d.ptr(), block * es).expect("copy");
            dev.sync("test").expect("sync");
        }
        Self { buf, gate: gate.to_vec(), up: up.to_vec(), down: w.down }
    }

    /// Device addresses of gate, up and down.
    fn ptrs(&self, dtype: DType) -> [u64; 3] {
        let block = (self.gate.len() * dtype.size()) as u64;
        [0, 2, 4].map(|k| self.buf.ptr() + k * block)
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

/// f64 `down · (silu(gate · x) ⊙ (up · x))` of one token: gate, up `[it, hd]`, down `[hd, it]`.
fn swiglu_f64(x: &[f32], gate: &[f32], up: &[f32], down: &[f32], hd: usize, it: usize) -> Vec<f64> {
    let dot = |row: &[f32], v: &[f32]| -> f64 { row.iter().zip(v).map(|(a, b)| *a as f64 * *b as f64).sum() };
    let h: Vec<f64> = (0..it)
        .map(|i| {
            let g = dot(&gate[i * hd..(i + 1) * hd], x);
            let u = dot(&up[i * hd..(i + 1) * hd], x);
            g / (1.0 + (-g).exp()) * u
        })
        .collect();
    (0..hd).map(|r| down[r * it..(r + 1) * it].iter().zip(&h).map(|(a, b)| *a as f64 * b).sum()).collect()
}

/// f64 reference: `out[t] = Σ_j w[t,j] · down_e(silu(gate_e x) · up_e x) (+ shared[t])
/// (+ down_s(silu(gate_s x) · up_s x))`, ids outside `[0, E)` skipped, `s` the fused shared expert.
fn reference(ex: &DevExperts, b: &Batch, fused: Option<&DevShared>) -> Vec<f64> {
    let s = ex.shape;
    let (hd, it, k) = (s.hidden, s.inter, s.top_k);
    let mut out: Vec<f64> = match &b.shared {
        Some(v) => v.iter().map(|&a| a as f64).collect(),
        None => vec![0.0f64; b.tokens * hd],
    };
    for t in 0..b.tokens {
        let x = &b.x[t * hd..(t + 1) * hd];
        let o = &mut out[t * hd..(t + 1) * hd];
        for j in 0..k {
            let e = b.ids[t * k + j];
            if e < 0 || e as usize >= s.experts {
                continue;
            }
            let w = &ex.host[&(e as usize)];
            let y = swiglu_f64(x, &w.gate_up[..it * hd], &w.gate_up[it * hd..], &w.down, hd, it);
            let wt = b.w[t * k + j] as f64;
            for (o, y) in o.iter_mut().zip(y) {
                *o += wt * y;
            }
        }
        if let Some(sh) = fused {
            for (o, y) in o.iter_mut().zip(swiglu_f64(x, &sh.gate, &sh.up, &sh.down, hd, it)) {
                *o += y;
            }
        }
    }
    out
}

/// Run `moe_small_ws` on the device (poisoned output + guard and workspace), with the fused shared
/// expert `fused` if given; returns the output (and asserts the guard is untouched).
fn run_gpu(dev: &Dev, ex: &DevExperts, b: &Batch, fused: Option<&DevShared>) -> Vec<f32> {
    let s = ex.shape;
    let es = ex.dtype.size();
    let x = dev.upload("test", &to_bytes(ex.dtype, &b.x)).expect("upload");
    let ids = dev.upload("test", &b.ids).expect("upload");
    let w = dev.upload("test", &b.w).expect("upload");
    let shared = b.shared.as_ref().map(|v| dev.upload("test", &to_bytes(ex.dtype, v)).expect("upload"));
    let n_out = b.tokens * s.hidden + GUARD;
    let out = dev.alloc("test", n_out * es).expect("alloc");
    poison(dev, out.ptr(), out.bytes());
    let [shared_gate, shared_up, shared_down] = fused.map_or([0; 3], |f| f.ptrs(ex.dtype));
    let a = MoeSmallArgs {
        dtype: ex.dtype,
        x: x.ptr(),
        ids: ids.ptr(),
        weights: w.ptr(),
        gate_up: ex.gate_up.ptr(),
        down: ex.down.ptr(),
        shared: shared.as_ref().map_or(0, |b| b.ptr()),
        shared_gate,
        shared_up,
        shared_down,
        out: out.ptr(),
        accumulate: false,
        pre_y: 0,
        pre_w: 0,
        pre_eps: 0.0,
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

/// Every routing pattern at T = 1, 3, 16 on `shape`, with the experts of `pool` present; each case
/// without and with a fused shared expert.
fn suite(dev: &Dev, dtype: DType, shape: Shape, pool: &[usize], seed: u64, tokens_list: &[usize]) {
    let ex = DevExperts::new(dev, dtype, shape, seed, pool);
    let sh = DevShared::new(dev, dtype, shape, seed);
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
            let what = format!("{} {shape:?} T {tokens} {route:?} shared {with_shared}", dtype.name());
            for fused in [None, Some(&sh)] {
                let want = reference(&ex, &b, fused);
                let got = run_gpu(dev, &ex, &b, fused);
                let what = format!("{what} fused shared expert {}", fused.is_some());
                check(&what, shape.hidden, &got, &want, tol(dtype));
            }
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
        let sh = DevShared::new(&dev, dtype, shape, 7);
        let mut rng = StdRng::seed_from_u64(7);
        let ids = make_ids(&mut rng, shape, MAX_DECODE_TOKENS, &pool, Route::Random);
        let b = Batch::new(&mut rng, dtype, shape, ids).with_shared(&mut rng, dtype, shape);
        for fused in [None, Some(&sh)] {
            let what = format!("{} fused shared expert {}", dtype.name(), fused.is_some());
            let first = run_gpu(&dev, &ex, &b, fused);
            let second = run_gpu(&dev, &ex, &b, fused);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&first), bits(&second), "{what}: two runs differ");
            for t in [0, 5, MAX_DECODE_TOKENS - 1] {
                let alone = run_gpu(&dev, &ex, &b.rows(shape, t, 1), fused);
                let h = shape.hidden;
                assert_eq!(bits(&alone), bits(&first[t * h..(t + 1) * h]), "{what}: token {t} alone vs batch");
            }
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
        shared_gate: 0,
        shared_up: 0,
        shared_down: 0,
        out: 0,
        accumulate: false,
        pre_y: 0,
        pre_w: 0,
        pre_eps: 0.0,
        tokens: MAX_DECODE_TOKENS + 1,
        hidden: 2048,
        inter: 1536,
        n_experts: 64,
        top_k: 4,
    };
    assert!(moe_decode::moe_small(&dev, &a).is_err());
    assert!(moe_decode::moe_small(&dev, &MoeSmallArgs { tokens: 1, hidden: 2044, ..a }).is_err());
    // A fused shared expert needs all three of its weight pointers.
    assert!(moe_decode::moe_small(&dev, &MoeSmallArgs { tokens: 1, shared_gate: 256, shared_up: 512, ..a }).is_err());
    // Zero tokens: nothing to do, nothing touched.
    assert!(moe_decode::moe_small(&dev, &MoeSmallArgs { tokens: 0, ..a }).is_ok());
}

/// Host values of a MoE block with a shared expert of width `sh_i` (rounded to the dtype).
struct MoeHost {
    hidden: usize,
    n_exp: usize,
    inter: usize,
    sh_i: usize,
    routing: MoeRouting,
    router: Vec<f32>,
    bias: Vec<f32>,
    gate_up: Vec<f32>,
    down: Vec<f32>,
    shared: [Vec<f32>; 3],
}

/// `be.moe(x)` for the block `m` (weights uploaded to `be`), downloaded.
fn moe_on<B: Backend>(be: &B, m: &MoeHost, x: &[f32], t: usize) -> OpResult<Vec<f32>> {
    let host = |v: &Vec<f32>| WeightInit::Host(v.clone());
    let (hidden, n_exp, inter, sh_i) = (m.hidden, m.n_exp, m.inter, m.sh_i);
    let moe = Moe {
        router: be.weight(host(&m.router), 1, n_exp, hidden)?,
        score_bias: be.vector(&m.bias)?,
        experts: Experts {
            gate_up: be.weight(host(&m.gate_up), n_exp, 2 * inter, hidden)?,
            down: be.weight(host(&m.down), n_exp, hidden, inter)?,
            n: n_exp,
            inter,
        },
        shared: Some(Mlp {
            gate: be.weight(host(&m.shared[0]), 1, sh_i, hidden)?,
            up: be.weight(host(&m.shared[1]), 1, sh_i, hidden)?,
            down: be.weight(host(&m.shared[2]), 1, hidden, sh_i)?,
        }),
        routing: m.routing,
    };
    be.download(&be.moe(&be.upload(x, t, hidden)?, &moe)?)
}

/// `CudaBackend::moe` on decode-sized batches (T = 1, 3, 16: the `moe_decode` path) with a shared
/// expert, against `CpuBackend::moe` (the CPU reference, shared expert included) on the same
/// dtype-rounded values, per token. The shared expert is as wide as the routed experts (fused
/// into the decode kernels as one more slot per token) or twice as wide (`n_shared_experts = 2`:
/// the separate MLP whose output the combine adds). Tolerance: the conformance suite's MoE one.
/// The router logits differ from the CPU's in the last bits, so a near-tie of two experts' choice
/// scores can legitimately swap one expert of one token; one such token per case is tolerated
/// (as in `core.rs`'s routing test). Outputs are poisoned (NaN) first and must all be finite.
#[test]
fn backend_moe_with_shared_expert_matches_cpu() {
    if gpu().is_none() {
        return;
    }
    let cpu = CpuBackend::new();
    let (hidden, n_exp, inter) = (256usize, 16usize, 64usize);
    let routing = MoeRouting { n_group: 4, topk_group: 2, top_k: 4, norm_topk_prob: true, routed_scaling_factor: 2.5 };
    for dtype in [DType::F32, DType::BF16] {
        let b = CudaBackend::new(0, dtype).unwrap_or_else(|e| panic!("CudaBackend: {e}"));
        b.set_poison(true);
        let tol = Tolerance::for_dtype(dtype).rel_loose;
        let q = |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(|x| round(dtype, x)).collect() };
        for (ci, sh_i) in [inter, 2 * inter].into_iter().enumerate() {
            let seed = 40 + 10 * ci as u64;
            let bh = 2.0 / (hidden as f32).sqrt();
            let m = MoeHost {
                hidden,
                n_exp,
                inter,
                sh_i,
                routing,
                router: q(random::fill(seed, bh, n_exp * hidden)),
                bias: random::fill(seed + 1, 0.1, n_exp),
                gate_up: q(random::fill(seed + 2, bh, n_exp * 2 * inter * hidden)),
                down: q(random::fill(seed + 3, 1.0 / (inter as f32).sqrt(), n_exp * hidden * inter)),
                shared: [
                    q(random::fill(seed + 4, bh, sh_i * hidden)),
                    q(random::fill(seed + 5, bh, sh_i * hidden)),
                    q(random::fill(seed + 6, 1.0 / (sh_i as f32).sqrt(), hidden * sh_i)),
                ],
            };
            for t in [1usize, 3, MAX_DECODE_TOKENS] {
                let x = q(random::fill(seed + 7 + t as u64, 1.0, t * hidden));
                let what = format!("{} T {t}, shared expert of {sh_i} (routed {inter})", dtype.name());
                let got = moe_on(&b, &m, &x, t).unwrap_or_else(|e| panic!("{what}: gpu moe: {e}"));
                let want = moe_on(&cpu, &m, &x, t).unwrap_or_else(|e| panic!("{what}: cpu moe: {e}"));
                assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite output (unwritten?)");
                let row = |v: &[f32], i: usize| v[i * hidden..(i + 1) * hidden].to_vec();
                let errs: Vec<f64> = (0..t).map(|i| rel_err(&row(&got, i), &row(&want, i))).collect();
                let bad: Vec<(usize, f64)> = errs.iter().copied().enumerate().filter(|&(_, e)| e > tol).collect();
                assert!(bad.len() <= 1, "{what}: {} of {t} tokens differ: {bad:?}", bad.len());
                if let Some(&(i, e)) = bad.first() {
                    eprintln!("{what}: token {i} differs ({e:e}), taken as a routing near-tie");
                }
                let worst = errs.iter().filter(|&&e| e <= tol).fold(0.0f64, |a, &e| a.max(e));
                eprintln!("{what}: max rel err {worst:.2e}");
            }
        }
    }
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
