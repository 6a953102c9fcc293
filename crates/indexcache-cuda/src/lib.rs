//! The NVIDIA backend of the engine (`--device cuda`).
//!
//! Built with cudarc's dynamic loading: the binary links no CUDA library and runs on machines
//! without one; [`dev::Dev::open`] fails with a clear error there, and nothing touches CUDA until
//! it is called.
//!
//! Every kernel has a CPU reference (`indexcache_ops::cpu`) and a test against it on random data
//! (`tests/`, skipped with a message where no GPU is present), and a micro-benchmark reporting
//! its rate against the H200's measured ceilings ([`KernelBench`]).
//!
//! # Environment switches
//!
//! Read once per process; each default is the fastest measured path, and every `=0` switch gives
//! the same results as the default unless said otherwise (they exist for same-lease A/B runs,
//! `scripts/gpu/ab.sh`; numbers in docs/PERF.md).
//!
//! | variable | default | effect of the other value |
//! |---|---|---|
//! | `INDEXCACHE_CUDA_GRAPH` | on | `0`: decode steps launched op by op, not replayed as CUDA graphs |
//! | `INDEXCACHE_GRAPH_ARENA_MB` | 512 | size of the arena a recorded decode graph takes its buffers from |
//! | `INDEXCACHE_PDL` | on | `0`: plain launches instead of programmatic dependent launches |
//! | `INDEXCACHE_GEMV` | on | `0`: bf16 matmuls of ≤ 4 rows on cuBLAS instead of the decode GEMV (other sums) |
//! | `INDEXCACHE_GEMV_U4` | on | `0`: the one-column GEMVs at 8 vectors per lane per step |
//! | `INDEXCACHE_FUSE` | on | `0`: the fused decode ops (latent norms + store, add + norm in the router, the MLA combine in the W_UV GEMV) as plain launches |
//! | `INDEXCACHE_MOE_DECODE` | on | `0`: decode-sized MoE on the grouped-GEMM path (a host sync per layer) |
//! | `INDEXCACHE_MOE_EARLY` | on | `0`: the MoE gate/up kernel loads no shared-expert rows before its wait |
//! | `INDEXCACHE_MOE_PRE` | on | `0`: the router kernel stores the post-attention add + norm; the MoE kernels do not redo it |
//! | `INDEXCACHE_MLA_DEC` | on | `0`: decode-sized sparse MLA on the split prefill kernel (`mla_tc`; other sums) |
//! | `INDEXCACHE_UV_CLUSTER` | on | `0`: `mla_combine_uv` without thread-block clusters |
//! | `INDEXCACHE_TOPK` | auto | `rows` / `segmented`: force the indexer's top-k kernel |
//! | `INDEXCACHE_SCORE` | auto | `whole`: force the whole-tile indexer scoring kernel |
//!
//! Tests and tools: `INDEXCACHE_FIXTURES` (the fixture directory), `INDEXCACHE_REQUIRE_NVRTC=1`
//! (CI: a missing NVRTC fails the compile test instead of skipping it), `INDEXCACHE_BENCH=1` (the
//! long kernel benchmarks inside the test binaries), `INDEXCACHE_PROFILE_DECODE=N` (`bench`: an
//! attached profiler collects N decode steps).

pub mod backend;
pub mod dev;
pub mod fp8;
pub mod gemm;
pub mod indexer;
pub mod kernels;
pub mod mla;
pub mod moe_decode;

pub use backend::CudaBackend;

/// One kernel benchmark: time (median of repeats, CUDA events) and achieved rate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelBench {
    pub kernel: String,
    pub shape: String,
    pub ms: f64,
    /// Useful floating-point operations per second (0 where not meaningful).
    pub tflops: f64,
    /// Bytes moved per second, counting each input read once and each output written once.
    pub gbps: f64,
    /// Achieved / ceiling for the bound that applies (see `CEILING_*`).
    pub of_ceiling: f64,
}

/// Measured on the project's H200 (../shared/research/h200-baselines.md).
pub const CEILING_BF16_TFLOPS: f64 = 790.0;
pub const CEILING_FP8_TFLOPS: f64 = 1455.0;
pub const CEILING_GBPS: f64 = 4245.0;
