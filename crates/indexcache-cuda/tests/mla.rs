//! Sparse MLA attention on the GPU against an f64 reference (itself checked against the CPU
//! backend and `reference::sparse_mla_masked` in `reference_matches_cpu`, which needs no GPU).
//!
//! Every GPU test skips with a message where no GPU is present. Outputs are poisoned (0xFF bytes,
//! NaN in both dtypes) with a guard tail that must stay untouched; rows with 0, 1 and 3 valid
//! entries, leading / middle holes and scattered -1 entries are covered. Errors are measured per
//! query row: `max |gpu - ref| / max |ref|` over the row (empty rows must be exactly zero).

use half::bf16;
use indexcache_cuda::dev::Dev;
use indexcache_cuda::mla::{self, MlaArgs, MlaOpts, MlaPath};
use indexcache_ops::cpu::{CpuBackend, CpuTensor, reference};
use indexcache_ops::{Backend, DType, TopK};
use rand::{RngExt, SeedableRng, rngs::StdRng};

fn gpu() -> Option<Dev> {
    indexcache_cuda::dev::gpu_or_skip()
}

#[derive(Debug, Clone, Copy)]
struct Case {
    rows: usize,
    heads: usize,
    r: usize,
    p: usize,
    k: usize,
    cache_rows: usize,
    scale: f32,
}

impl Case {
    fn new(rows: usize, heads: usize, r: usize, p: usize, k: usize, cache_rows: usize) -> Self {
        Self { rows, heads, r, p, k, cache_rows, scale: 0.1 }
    }
}

struct Data {
    q_lat: Vec<f32>,
    q_pe: Vec<f32>,
    cache: Vec<f32>,
    sel: Vec<i32>,
}

/// Selection pattern of row `t`: full / empty / 1 valid / 3 valid / holes / scattered -1.
fn row_selection(rng: &mut StdRng, pattern: usize, k: usize, cache_rows: usize, perm: &mut Vec<i32>) -> Vec<i32> {
    let n_full = k.min(cache_rows);
    perm.clear();
    perm.extend(0..cache_rows as i32);
    for i in 0..n_full {
        let j = rng.random_range(i..cache_rows);
        perm.swap(i, j);
    }
    let mut row = vec![-1; k];
    let n = match pattern {
        0 | 4 | 5 | 6 => n_full,
        1 => 0,
        2 => 1.min(n_full),
        _ => 3.min(n_full),
    };
    row[..n].copy_from_slice(&perm[..n]);
    match pattern {
        // Holes at the front and in the middle, the last entry valid.
        4 if k > 4 => {
            row[0] = -1;
            row[k / 2] = -1;
        }
        // About half the entries knocked out anywhere.
        5 => {
            for v in row.iter_mut() {
                if rng.random_range(0..2) == 0 {
                    *v = -1;
                }
            }
        }
        _ => {}
    }
    row
}

fn make_data(c: &Case, seed: u64, patterns: &[usize], round_bf16: bool) -> Data {
    let mut rng = StdRng::seed_from_u64(seed);
    let w = c.r + c.p;
    let mut vals = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                let x = rng.random_range(-1.0f32..1.0);
                if round_bf16 { bf16::from_f32(x).to_f32() } else { x }
            })
            .collect()
    };
    let q_lat = vals(c.rows * c.heads * c.r);
    let q_pe = vals(c.rows * c.heads * c.p);
    let cache = vals(c.cache_rows * w);
    let mut perm = Vec::new();
    let mut sel = Vec::with_capacity(c.rows * c.k);
    for t in 0..c.rows {
        sel.extend(row_selection(&mut rng, patterns[t % patterns.len()], c.k, c.cache_rows, &mut perm));
    }
    Data { q_lat, q_pe, cache, sel }
}

/// f64 reference over the valid entries (zeros for a row without any), threaded over rows.
fn reference_f64(c: &Case, d: &Data) -> Vec<f32> {
    let (heads, r, p, k) = (c.heads, c.r, c.p, c.k);
    let w = r + p;
    let mut out = vec![0.0f32; c.rows * heads * r];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(c.rows.max(1));
    let per = c.rows.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (ci, chunk) in out.chunks_mut(per * heads * r).enumerate() {
            s.spawn(move || {
                for (tl, orow) in chunk.chunks_mut(heads * r).enumerate() {
                    let t = ci * per + tl;
                    let ids: Vec<usize> =
                        d.sel[t * k..(t + 1) * k].iter().filter(|&&s| s >= 0).map(|&s| s as usize).collect();
                    if ids.is_empty() {
                        continue;
                    }
                    for h in 0..heads {
                        let ql = &d.q_lat[(t * heads + h) * r..(t * heads + h + 1) * r];
                        let qp = &d.q_pe[(t * heads + h) * p..(t * heads + h + 1) * p];
                        let logits: Vec<f64> = ids
                            .iter()
                            .map(|&s| {
                                let row = &d.cache[s * w..(s + 1) * w];
                                let a: f64 = ql.iter().zip(&row[..r]).map(|(x, y)| *x as f64 * *y as f64).sum();
                                let b: f64 = qp.iter().zip(&row[r..]).map(|(x, y)| *x as f64 * *y as f64).sum();
                                (a + b) * c.scale as f64
                            })
                            .collect();
                        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
                        let z: f64 = e.iter().sum();
                        let mut acc = vec![0.0f64; r];
                        for (&s, &wt) in ids.iter().zip(&e) {
                            for (a, v) in acc.iter_mut().zip(&d.cache[s * w..s * w + r]) {
                                *a += wt / z * *v as f64;
                            }
                        }
                        for (o, a) in orow[h * r..(h + 1) * r].iter_mut().zip(&acc) {
                            *o = *a as f32;
                        }
                    }
                }
            });
        }
    });
    out
}

const GUARD: usize = 256;

/// Runs the GPU op on `d` (uploaded as `dtype`) and returns the output as f32.
fn run_gpu(dev: &Dev, c: &Case, d: &Data, dtype: DType, opts: MlaOpts) -> Vec<f32> {
    const OP: &str = "test";
    let to_bf16 = |v: &[f32]| -> Vec<u16> { v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect() };
    let (q_lat, q_pe, cache) = match dtype {
        DType::F32 => (dev.upload(OP, &d.q_lat), dev.upload(OP, &d.q_pe), dev.upload(OP, &d.cache)),
        DType::BF16 => {
            (dev.upload(OP, &to_bf16(&d.q_lat)), dev.upload(OP, &to_bf16(&d.q_pe)), dev.upload(OP, &to_bf16(&d.cache)))
        }
    };
    let (q_lat, q_pe, cache) = (q_lat.unwrap(), q_pe.unwrap(), cache.unwrap());
    let sel = dev.upload(OP, &d.sel).unwrap();
    let n_out = c.rows * c.heads * c.r;
    let out_bytes = n_out * dtype.size();
    let out = dev.upload(OP, &vec![0xFFu8; out_bytes + GUARD]).unwrap();
    let a = MlaArgs {
        dtype,
        q_lat: q_lat.ptr(),
        q_pe: q_pe.ptr(),
        cache: cache.ptr(),
        sel: sel.ptr(),
        rows: c.rows,
        heads: c.heads,
        r: c.r,
        p: c.p,
        k: c.k,
        scale: c.scale,
        out: out.ptr(),
    };
    mla::sparse_mla_with(dev, &a, opts).unwrap_or_else(|e| panic!("{c:?} {dtype:?} {opts:?}: {e}"));
    let raw: Vec<u8> = dev.download(OP, &out, out_bytes + GUARD).unwrap();
    assert!(raw[out_bytes..].iter().all(|&b| b == 0xFF), "{c:?} {dtype:?} {opts:?}: wrote past the output");
    match dtype {
        DType::F32 => raw[..out_bytes].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        DType::BF16 => raw[..out_bytes]
            .chunks_exact(2)
            .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
    }
}

/// Per-row relative error; empty rows must be exactly zero; everything finite.
fn check(c: &Case, d: &Data, got: &[f32], want: &[f32], tol: f64, what: &str) {
    let n = c.heads * c.r;
    let mut worst = 0.0f64;
    for t in 0..c.rows {
        let (g, w) = (&got[t * n..(t + 1) * n], &want[t * n..(t + 1) * n]);
        if let Some(i) = g.iter().position(|v| !v.is_finite()) {
            panic!("{what} {c:?}: row {t} element {i} is {} (unwritten or NaN)", g[i]);
        }
        let empty = d.sel[t * c.k..(t + 1) * c.k].iter().all(|&s| s < 0);
        if empty {
            assert!(g.iter().all(|&v| v == 0.0), "{what} {c:?}: row {t} has no valid entry but is not zero");
            continue;
        }
        let max_ref = w.iter().fold(0.0f64, |m, &v| m.max(v.abs() as f64));
        let max_err = g.iter().zip(w).fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
        let rel = max_err / max_ref.max(1e-30);
        worst = worst.max(rel);
        assert!(rel <= tol, "{what} {c:?}: row {t} rel err {rel:.3e} > {tol:.0e} (max ref {max_ref:.3e})");
    }
    eprintln!("{what} {c:?}: worst row rel err {worst:.3e}");
}

const ALL_PATTERNS: &[usize] = &[0, 1, 2, 3, 4, 5, 6];
const F32_TOL: f64 = 1e-5;
const BF16_TOL: f64 = 1e-2;

fn opts(path: MlaPath, splits: Option<usize>) -> MlaOpts {
    MlaOpts { path, splits, ..MlaOpts::default() }
}

/// f32 (CUDA cores) and bf16 (tensor cores where allowed, and CUDA cores) against the reference,
/// for each split setting.
fn check_all(dev: &Dev, c: Case, seed: u64, patterns: &[usize], splits: &[Option<usize>]) {
    let d = make_data(&c, seed, patterns, false);
    let want = reference_f64(&c, &d);
    for &s in splits {
        let got = run_gpu(dev, &c, &d, DType::F32, opts(MlaPath::Auto, s));
        check(&c, &d, &got, &want, F32_TOL, &format!("f32 splits {s:?}"));
    }
    let db = make_data(&c, seed, patterns, true);
    let want = reference_f64(&c, &db);
    let tc = c.r.is_multiple_of(8) && c.p.is_multiple_of(8) && c.r <= 512;
    for &s in splits {
        for path in [MlaPath::Auto, MlaPath::CudaCore, MlaPath::TensorCore] {
            if path == MlaPath::TensorCore && !tc {
                continue;
            }
            let got = run_gpu(dev, &c, &db, DType::BF16, opts(path, s));
            check(&c, &db, &got, &want, BF16_TOL, &format!("bf16 {path:?} splits {s:?}"));
        }
    }
    // The one-tile decode kernel (its own split count) wherever its shapes allow.
    if tc && c.heads <= 32 && c.k > 0 {
        let got = run_gpu(dev, &c, &db, DType::BF16, opts(MlaPath::Decode, None));
        check(&c, &db, &got, &want, BF16_TOL, "bf16 decode kernel");
    }
}

#[test]
fn reference_matches_cpu() {
    let c = Case::new(14, 3, 16, 8, 12, 40);
    let d = make_data(&c, 1, ALL_PATTERNS, false);
    let want = reference_f64(&c, &d);
    let sel = TopK { rows: c.rows, k: c.k, data: d.sel.clone() };
    let cpu = CpuBackend::new()
        .sparse_mla(
            &CpuTensor::new(d.q_lat.clone(), c.rows, c.heads * c.r),
            &CpuTensor::new(d.q_pe.clone(), c.rows, c.heads * c.p),
            &CpuTensor::new(d.cache.clone(), c.cache_rows, c.r + c.p),
            &sel,
            c.scale,
        )
        .unwrap();
    for (g, w) in cpu.data.iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "cpu backend {g} vs {w}");
    }
    // The masked (dense) reference, all positions visible; it is NaN for empty rows.
    let positions = vec![c.cache_rows - 1; c.rows];
    let masked =
        reference::sparse_mla_masked(&d.q_lat, &d.q_pe, &d.cache, c.heads, c.r, c.p, &positions, &sel, c.scale);
    let n = c.heads * c.r;
    for t in 0..c.rows {
        if sel.valid(t).next().is_none() {
            continue;
        }
        for (g, w) in masked[t * n..(t + 1) * n].iter().zip(&want[t * n..(t + 1) * n]) {
            assert!((g - w).abs() < 1e-5, "masked reference {g} vs {w}");
        }
    }
}

#[test]
fn tiny_shapes() {
    let Some(dev) = gpu() else { return };
    // r 16, p 8, 3 heads, k 8: all three paths, each selection pattern.
    check_all(&dev, Case::new(14, 3, 16, 8, 8, 40), 2, ALL_PATTERNS, &[None, Some(1)]);
    // Longer rows: several tiles, forced k-splits (split-k + combine on prefill-sized grids).
    check_all(&dev, Case::new(14, 3, 16, 8, 200, 300), 3, ALL_PATTERNS, &[Some(1), Some(2), Some(5), None]);
    check_all(&dev, Case::new(7, 8, 64, 16, 64, 100), 4, ALL_PATTERNS, &[Some(1), None]);
    check_all(&dev, Case::new(7, 2, 32, 8, 33, 50), 5, ALL_PATTERNS, &[Some(1), Some(3)]);
}

#[test]
fn odd_shapes() {
    let Some(dev) = gpu() else { return };
    // f32 takes any r, p; bf16 with r or p not a multiple of 8 falls back to the CUDA cores.
    check_all(&dev, Case::new(7, 5, 20, 7, 33, 60), 6, ALL_PATTERNS, &[Some(1), Some(2)]);
    check_all(&dev, Case::new(7, 3, 12, 4, 20, 60), 7, ALL_PATTERNS, &[Some(1)]);
    // Tensor cores: odd number of n8 column tiles, 2 head groups, 40 heads in a 64-head CTA,
    // W not a multiple of 16 (zero-padded K), r = p = 8.
    check_all(&dev, Case::new(7, 70, 24, 8, 70, 200), 8, ALL_PATTERNS, &[Some(1), Some(2)]);
    check_all(&dev, Case::new(7, 40, 32, 16, 70, 200), 9, ALL_PATTERNS, &[Some(1), None]);
    check_all(&dev, Case::new(7, 13, 16, 8, 70, 200), 10, ALL_PATTERNS, &[Some(1)]);
    check_all(&dev, Case::new(7, 17, 8, 8, 70, 200), 11, ALL_PATTERNS, &[Some(1)]);
}

#[test]
fn k_zero_writes_zeros() {
    let Some(dev) = gpu() else { return };
    let c = Case::new(3, 4, 16, 8, 0, 10);
    let d = make_data(&c, 12, &[0], false);
    for (dtype, path) in
        [(DType::F32, MlaPath::Auto), (DType::BF16, MlaPath::TensorCore), (DType::BF16, MlaPath::CudaCore)]
    {
        let got = run_gpu(&dev, &c, &d, dtype, opts(path, None));
        assert!(got.iter().all(|&v| v == 0.0), "{dtype:?} {path:?}");
    }
}

#[test]
fn real_shapes_bf16() {
    let Some(dev) = gpu() else { return };
    for (heads, seed) in [(20, 20), (64, 21), (128, 22)] {
        let c = Case::new(6, heads, 512, 64, 2048, 8192);
        let d = make_data(&c, seed, &[0, 3, 1, 0, 4, 5], true);
        let want = reference_f64(&c, &d);
        for s in [Some(1), None] {
            let got = run_gpu(&dev, &c, &d, DType::BF16, opts(MlaPath::TensorCore, s));
            check(&c, &d, &got, &want, BF16_TOL, &format!("bf16 tensor cores splits {s:?}"));
        }
        if heads == 20 {
            let got = run_gpu(&dev, &c, &d, DType::BF16, opts(MlaPath::CudaCore, Some(1)));
            check(&c, &d, &got, &want, BF16_TOL, "bf16 cuda cores");
        }
    }
}

#[test]
fn real_shapes_f32() {
    let Some(dev) = gpu() else { return };
    let c = Case::new(4, 20, 512, 64, 2048, 8192);
    let d = make_data(&c, 30, &[0, 2, 4, 1], false);
    let want = reference_f64(&c, &d);
    for s in [Some(1), None] {
        let got = run_gpu(&dev, &c, &d, DType::F32, opts(MlaPath::Auto, s));
        check(&c, &d, &got, &want, F32_TOL, &format!("f32 splits {s:?}"));
    }
}

#[test]
fn decode_rows() {
    let Some(dev) = gpu() else { return };
    for rows in 1..=4 {
        for heads in [20, 64] {
            let c = Case::new(rows, heads, 512, 64, 2048, 8192);
            let seed = 40 + rows as u64 * 3 + heads as u64;
            let d = make_data(&c, seed, &[0, 3, 0, 4], true);
            let want = reference_f64(&c, &d);
            // Auto picks split-k here (the decode kernel at 20 heads); the single-split kernel
            // and the split prefill kernel must agree.
            let dec = c.heads <= 32;
            let got = run_gpu(&dev, &c, &d, DType::BF16, MlaOpts { no_decode: true, ..MlaOpts::default() });
            check(&c, &d, &got, &want, BF16_TOL, "decode bf16 without the decode kernel");
            if dec {
                let got = run_gpu(&dev, &c, &d, DType::BF16, opts(MlaPath::Decode, None));
                check(&c, &d, &got, &want, BF16_TOL, "decode bf16, the decode kernel");
            }
            for s in [None, Some(1)] {
                let got = run_gpu(&dev, &c, &d, DType::BF16, opts(MlaPath::Auto, s));
                check(&c, &d, &got, &want, BF16_TOL, &format!("decode bf16 splits {s:?}"));
            }
            if heads == 20 {
                let d = make_data(&c, seed, &[0, 3, 0, 4], false);
                let want = reference_f64(&c, &d);
                let got = run_gpu(&dev, &c, &d, DType::F32, opts(MlaPath::Auto, None));
                check(&c, &d, &got, &want, F32_TOL, "decode f32 split-k");
            }
        }
    }
}

#[test]
fn bench_runs() {
    // The benchmark is long (hundreds of MB of inputs): only with INDEXCACHE_BENCH=1.
    if std::env::var("INDEXCACHE_BENCH").as_deref() != Ok("1") {
        eprintln!("skipped: set INDEXCACHE_BENCH=1 to run the sparse_mla benchmark");
        return;
    }
    let Some(dev) = gpu() else { return };
    for b in mla::bench(&dev).unwrap() {
        eprintln!(
            "{:<48} {:<70} {:>9.4} ms {:>7.1} TFLOP/s {:>7.0} GB/s {:>5.1}% of ceiling",
            b.kernel,
            b.shape,
            b.ms,
            b.tflops,
            b.gbps,
            100.0 * b.of_ceiling
        );
    }
}
