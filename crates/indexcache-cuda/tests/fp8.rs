//! The FP8 indexer transform on the GPU (`indexcache_cuda::fp8`) against the CPU function
//! (`indexcache_ops::cpu::fp8_indexer`), bit for bit, on fresh random data:
//! * f32 storage ≡ `hadamard_fp8_inplace`;
//! * bf16 storage ≡ `hadamard_fp8_bf16_inplace` on the widened bf16 inputs (the rotation rounded to
//!   bf16 before quantising), whose outputs are exact bf16 values.
//!
//! Every tensor sits inside a larger buffer whose lead and tail are poisoned (0xFF bytes) and must
//! come back untouched; the tensor itself is random, so an unwritten element would keep its input
//! and fail the comparison. Skipped with a message where no GPU is present.

use indexcache_cuda::dev::Dev;
use indexcache_cuda::fp8;
use indexcache_ops::DType;
use indexcache_ops::cpu::fp8_indexer as cpu;
use rand::{RngExt, SeedableRng, rngs::StdRng};

fn gpu() -> Option<Dev> {
    indexcache_cuda::dev::gpu_or_skip()
}

/// Poisoned elements before and after the tensor (keeps every vector alignment).
const LEAD: usize = 64;
const TAIL: usize = 256;

/// Random blocks of very different magnitudes; some with one outlier channel, some entirely below
/// the 1e-4 amax floor, a few with exact zeros and negative zeros.
fn random_data(seed: u64, n: usize, block: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut x = Vec::with_capacity(n);
    for b in 0..n / block {
        let mag = 10f32.powf(rng.random_range(-7.0f32..6.0));
        let kind = b % 9;
        let outlier = rng.random_range(0..block);
        for i in 0..block {
            let u = rng.random_range(-1.0f32..1.0);
            x.push(match kind {
                0 if i == outlier => 300.0 * mag,
                1 => u * 1e-7,
                2 if i % 5 == 0 => -0.0,
                3 if i % 7 == 0 => 0.0,
                _ => u * mag,
            });
        }
    }
    x
}

fn first_mismatches<T: PartialEq + std::fmt::LowerHex + Copy>(got: &[T], want: &[T], block: usize) -> String {
    let bad: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
    let shown: Vec<String> = bad
        .iter()
        .take(8)
        .map(|&i| format!("[{i}] (block {}) got {:#x} want {:#x}", i / block, got[i], want[i]))
        .collect();
    format!("{} of {} differ: {}", bad.len(), got.len(), shown.join(", "))
}

fn run_f32(dev: &Dev, x: &[f32], rows: usize, cols: usize, block: usize) -> Vec<f32> {
    let poison = f32::from_bits(0xffff_ffff);
    let mut host = vec![poison; LEAD];
    host.extend_from_slice(x);
    host.extend(std::iter::repeat_n(poison, TAIL));
    let buf = dev.upload("test", &host).expect("upload");
    fp8::hadamard_fp8_inplace(dev, DType::F32, buf.ptr() + (LEAD * 4) as u64, rows, cols, block).expect("kernel");
    let back: Vec<f32> = dev.download("test", &buf, host.len()).expect("download");
    let n = x.len();
    assert!(back[..LEAD].iter().all(|v| v.to_bits() == 0xffff_ffff), "wrote before the tensor");
    assert!(back[LEAD + n..].iter().all(|v| v.to_bits() == 0xffff_ffff), "wrote after the tensor");
    back[LEAD..LEAD + n].to_vec()
}

fn run_bf16(dev: &Dev, x: &[u16], rows: usize, cols: usize, block: usize) -> Vec<u16> {
    let mut host = vec![0xffffu16; LEAD];
    host.extend_from_slice(x);
    host.extend(std::iter::repeat_n(0xffffu16, TAIL));
    let buf = dev.upload("test", &host).expect("upload");
    fp8::hadamard_fp8_inplace(dev, DType::BF16, buf.ptr() + (LEAD * 2) as u64, rows, cols, block).expect("kernel");
    let back: Vec<u16> = dev.download("test", &buf, host.len()).expect("download");
    let n = x.len();
    assert!(back[..LEAD].iter().all(|&v| v == 0xffff), "wrote before the tensor");
    assert!(back[LEAD + n..].iter().all(|&v| v == 0xffff), "wrote after the tensor");
    back[LEAD..LEAD + n].to_vec()
}

/// (rows, cols, block): q-like `[T, heads·128]`, k-like `[T, 128]`, the small blocks, and one
/// shape whose block count is not a multiple of the 8 warps of a CTA.
const SHAPES: [(usize, usize, usize); 7] = [
    (37, 64 * 128, 128),
    (1000, 128, 128),
    (2048, 32 * 128, 128),
    (13, 5 * 128, 128),
    (5, 32 * 64, 64),
    (7, 96, 32),
    (301, 64, 64),
];

#[test]
fn f32_matches_cpu_bit_for_bit() {
    let Some(dev) = gpu() else { return };
    for (k, &(rows, cols, block)) in SHAPES.iter().enumerate() {
        let x = random_data(100 + k as u64, rows * cols, block);
        let got = run_f32(&dev, &x, rows, cols, block);
        let mut want = x.clone();
        cpu::hadamard_fp8_inplace(&mut want, block).expect("cpu");
        let (g, w): (Vec<u32>, Vec<u32>) =
            (got.iter().map(|v| v.to_bits()).collect(), want.iter().map(|v| v.to_bits()).collect());
        assert!(g == w, "f32 [{rows}, {cols}] block {block}: {}", first_mismatches(&g, &w, block));
        // Sanity: the data really was transformed (not a no-op that happens to agree).
        let changed = x.iter().zip(&got).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert!(changed * 2 > x.len(), "only {changed} of {} elements changed", x.len());
        eprintln!("f32 [{rows}, {cols}] block {block}: {} elements bit-identical", x.len());
    }
}

#[test]
fn bf16_matches_cpu_on_bf16_inputs() {
    let Some(dev) = gpu() else { return };
    for (k, &(rows, cols, block)) in SHAPES.iter().enumerate() {
        let xf = random_data(200 + k as u64, rows * cols, block);
        let x: Vec<u16> = xf.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
        let got = run_bf16(&dev, &x, rows, cols, block);
        let mut wide: Vec<f32> = x.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect();
        cpu::hadamard_fp8_bf16_inplace(&mut wide, block).expect("cpu");
        let want: Vec<u16> = wide
            .iter()
            .map(|&v| {
                let b = half::bf16::from_f32(v);
                assert_eq!(b.to_f32().to_bits(), v.to_bits(), "CPU output {v} not exact in bf16");
                b.to_bits()
            })
            .collect();
        assert!(got == want, "bf16 [{rows}, {cols}] block {block}: {}", first_mismatches(&got, &want, block));
        eprintln!("bf16 [{rows}, {cols}] block {block}: {} elements bit-identical", x.len());
    }
}

/// The f32 kernel on bf16-valued inputs and the bf16 kernel differ exactly by the rotation's bf16
/// rounding: check the f32 kernel against the CPU f32 function there too (the q-cache dataflow of
/// an f32 engine fed bf16 activations).
#[test]
fn f32_kernel_on_bf16_valued_inputs() {
    let Some(dev) = gpu() else { return };
    let (rows, cols, block) = (64, 16 * 128, 128);
    let x: Vec<f32> = random_data(300, rows * cols, block).iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
    let got = run_f32(&dev, &x, rows, cols, block);
    let mut want = x.clone();
    cpu::hadamard_fp8_inplace(&mut want, block).expect("cpu");
    let (g, w): (Vec<u32>, Vec<u32>) =
        (got.iter().map(|v| v.to_bits()).collect(), want.iter().map(|v| v.to_bits()).collect());
    assert!(g == w, "{}", first_mismatches(&g, &w, block));
}

#[test]
fn bad_arguments_are_errors_not_launches() {
    let Some(dev) = gpu() else { return };
    let buf = dev.alloc("test", 1 << 16).expect("alloc");
    let p = buf.ptr();
    for (dtype, ptr, rows, cols, block, why) in [
        (DType::F32, p, 4, 256, 256, "block 256 has no kernel"),
        (DType::F32, p, 4, 200, 100, "block not a power of two"),
        (DType::BF16, p, 4, 192, 128, "cols not a multiple of the block"),
        (DType::F32, p + 4, 4, 128, 128, "misaligned f32 address"),
        (DType::BF16, p + 2, 4, 128, 128, "misaligned bf16 address"),
        (DType::F32, 0, 4, 128, 128, "null address"),
        (DType::F32, p, usize::MAX, 128, 128, "rows * cols overflows"),
    ] {
        let r = fp8::hadamard_fp8_inplace(&dev, dtype, ptr, rows, cols, block);
        assert!(r.is_err(), "{why}: accepted");
        eprintln!("{why}: {}", r.unwrap_err());
    }
    fp8::hadamard_fp8_inplace(&dev, DType::F32, p, 0, 128, 128).expect("empty tensor is a no-op");
    dev.sync("test").expect("no launch error left behind");
}

/// The benchmark runs and reports plausible rates (the numbers themselves go to kernel_bench).
#[test]
fn bench_runs() {
    let Some(dev) = gpu() else { return };
    let rows = fp8::bench(&dev).expect("bench");
    for r in &rows {
        eprintln!(
            "{:<40} {:<32} {:>8.4} ms {:>8.1} GB/s {:>5.0}%",
            r.kernel,
            r.shape,
            r.ms,
            r.gbps,
            r.of_ceiling * 100.0
        );
        assert!(r.ms > 0.0 && r.gbps.is_finite());
    }
}
