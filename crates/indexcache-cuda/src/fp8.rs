//! The FP8-faithful lightning-indexer transform on the GPU: Walsh–Hadamard rotation + UE8M0 e4m3
//! fake quantisation of every 128-wide head vector, in place (`kernels/fp8.cu`).
//!
//! DeepSeek-V3.2's reference indexer scores with FP8 q and k: each RoPE'd head vector is rotated
//! (`hadamard_transform`, scale `128^-½`), then quantised per 128-block to e4m3 with a power-of-two
//! scale (`act_quant(·, 128, "ue8m0")`). Since the scales are powers of two, scoring the
//! dequantised vectors `e4m3 · 2^k` with the ordinary indexer op gives the FP8 scores; this op
//! produces them, for q before scoring and for k before it is written to the indexer cache. The
//! definition and its exact f32 operation order are those of
//! `indexcache_ops::cpu::fp8_indexer` (read its module docs); results agree with it bit for bit:
//!
//! * `DType::F32` storage ≡ `fp8_indexer::hadamard_fp8_inplace`;
//! * `DType::BF16` storage ≡ `fp8_indexer::hadamard_fp8_bf16_inplace` on the widened inputs, i.e. the
//!   rotation is rounded to bf16 before the quantisation (the reference's bf16 `hadamard_transform`
//!   output); the quantised values are exact in bf16, so the store rounds nothing.
//!
//! Kernel: one warp per block (8 per CTA), each lane holding `block/32` consecutive elements (one
//! 16-byte f32 or 8-byte bf16 load for `block = 128`); the 7 butterfly stages run 2 in registers and 5
//! through `__shfl_xor_sync`, the amax through a shuffle reduction, the e4m3 rounding in integer ops.
//! Cost per element: 7 adds + ~12 ALU ops, 1 read + 1 write — memory-bound (`2 · elem_size` bytes per
//! element), so the benchmark reports GB/s against the copy ceiling.
//!
//! Blocks 32, 64 and 128 are supported (the models use 128). The tensor must be contiguous
//! (`[rows, cols]`, `cols` a multiple of `block`) and its address aligned to `block/32` elements.

use crate::dev::{Dev, blocks};
use crate::{CEILING_GBPS, KernelBench, kernels};
use cudarc::driver::LaunchConfig;
use indexcache_ops::cpu::fp8_indexer::hadamard_scale;
use indexcache_ops::{DType, OpError, OpResult};

const OP: &str = "indexer_fp8_quant";
/// Threads per CTA (`FP8_THREADS` in the .cu source): 8 warps, one block each.
const THREADS: u32 = 256;
const WARPS: usize = THREADS as usize / 32;

/// Block widths with a kernel.
pub const BLOCKS: [usize; 3] = [32, 64, 128];

fn kernel_name(dtype: DType, block: usize) -> Option<&'static str> {
    Some(match (dtype, block) {
        (DType::F32, 128) => "hadamard_fp8_f32_b128",
        (DType::F32, 64) => "hadamard_fp8_f32_b64",
        (DType::F32, 32) => "hadamard_fp8_f32_b32",
        (DType::BF16, 128) => "hadamard_fp8_bf16_b128",
        (DType::BF16, 64) => "hadamard_fp8_bf16_b64",
        (DType::BF16, 32) => "hadamard_fp8_bf16_b32",
        _ => return None,
    })
}

/// Rotate and fake-quantise, in place, every consecutive `block`-wide block of the contiguous
/// `[rows, cols]` tensor at device address `x` (element type `dtype`; `cols` a multiple of `block`;
/// `block` ∈ {32, 64, 128}; `x` aligned to `block/32` elements). Asynchronous on `dev.stream`.
pub fn hadamard_fp8_inplace(dev: &Dev, dtype: DType, x: u64, rows: usize, cols: usize, block: usize) -> OpResult<()> {
    let shapes = || format!("{} [{rows}, {cols}] in blocks of {block}", dtype.name());
    let bad = |why: String| Err(OpError::new(OP, shapes(), why));
    let Some(name) = kernel_name(dtype, block) else {
        return bad(format!("block must be one of {BLOCKS:?}"));
    };
    if !cols.is_multiple_of(block) {
        return bad(format!("cols must be a multiple of the block ({block})"));
    }
    let Some(n) = rows.checked_mul(cols) else {
        return bad("rows * cols overflows".into());
    };
    let nblocks = n / block;
    if nblocks == 0 {
        return Ok(());
    }
    let align = (block / 32 * dtype.size()) as u64;
    if x == 0 || !x.is_multiple_of(align) {
        return bad(format!("address {x:#x} must be non-null and {align}-byte aligned"));
    }
    let grid = nblocks.div_ceil(WARPS);
    if grid > i32::MAX as usize {
        return bad(format!("{nblocks} blocks exceed the grid limit"));
    }
    let f = dev.function(&kernels::FP8, name)?;
    let nb = nblocks as i64;
    let hs = hadamard_scale(block);
    let mut b = dev.builder(&f);
    b.arg(&x).arg(&nb).arg(&hs);
    let cfg =
        LaunchConfig { grid_dim: (blocks(nblocks, WARPS), 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    dev.launch(b, cfg, OP, shapes)
}

// ---- benchmarks ---------------------------------------------------------------------------------

fn bench_err(e: impl std::fmt::Debug) -> OpError {
    OpError::new("fp8 bench", "", format!("{e:?}"))
}

/// Median device time (ms) of `run()` over `repeats` runs after one warm-up, CUDA events.
fn time_ms(dev: &Dev, repeats: usize, mut run: impl FnMut() -> OpResult<()>) -> OpResult<f64> {
    use cudarc::driver::sys::CUevent_flags;
    run()?;
    dev.sync("fp8 bench")?;
    let mut ms = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        // Timing events need CU_EVENT_DEFAULT: cudarc's `None` creates them with timing disabled.
        let e0 = dev.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(bench_err)?;
        run()?;
        let e1 = dev.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(bench_err)?;
        ms.push(e0.elapsed_ms(&e1).map_err(bench_err)? as f64);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

/// The q-side transform at prefill size: `[16384, 64·128]` bf16 (DeepSeek-V3.2's 64 indexer heads,
/// 256 MiB — 5× the L2, so every run streams from HBM) and `[8192, 64·128]` f32 (256 MiB), and the
/// k side `[65536, 128]` bf16 (16 MiB, L2-resident: an upper bound). In place, so repeats re-read the
/// previous output (bounded: the rotation is orthonormal and the quantisation relative).
pub fn bench(dev: &Dev) -> OpResult<Vec<KernelBench>> {
    const REPEATS: usize = 9;
    let mut out = Vec::new();
    // A 1M-element random pattern, tiled (the data only has to be realistic, not unique).
    let pattern: Vec<f32> = (0..1 << 20).map(|i| indexcache_ops::random::uniform(17, i as u64) * 3.0).collect();
    for (dtype, rows, cols, what) in [
        (DType::BF16, 16_384usize, 64 * 128usize, "q, 64 heads"),
        (DType::F32, 8192, 64 * 128, "q, 64 heads"),
        (DType::BF16, 65_536, 128, "k (L2-resident)"),
    ] {
        let n = rows * cols;
        let buf = match dtype {
            DType::F32 => {
                let host: Vec<f32> = (0..n).map(|i| pattern[i % pattern.len()]).collect();
                dev.upload("fp8 bench", &host)?
            }
            DType::BF16 => {
                let host: Vec<u16> =
                    (0..n).map(|i| half::bf16::from_f32(pattern[i % pattern.len()]).to_bits()).collect();
                dev.upload("fp8 bench", &host)?
            }
        };
        let ms = time_ms(dev, REPEATS, || hadamard_fp8_inplace(dev, dtype, buf.ptr(), rows, cols, 128))?;
        let bytes = 2.0 * (n * dtype.size()) as f64;
        let gbps = bytes / (ms * 1e-3) / 1e9;
        out.push(KernelBench {
            kernel: format!("hadamard+fp8 quant {} (in place)", dtype.name()),
            shape: format!("[{rows}, {cols}] {what}"),
            ms,
            tflops: 0.0,
            gbps,
            of_ceiling: gbps / CEILING_GBPS,
        });
    }
    Ok(out)
}
