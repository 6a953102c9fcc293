//! The NVIDIA backend of the engine (`--device cuda`).
//!
//! Built with cudarc's dynamic loading: the binary links no CUDA library and runs on machines
//! without one; [`dev::Dev::open`] fails with a clear error there, and nothing touches CUDA until
//! it is called.
//!
//! Every kernel has a CPU reference (`indexcache_ops::cpu`) and a test against it on random data
//! (`tests/`, skipped with a message where no GPU is present), and a micro-benchmark reporting
//! its rate against the H200's measured ceilings ([`KernelBench`]).

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
