//! [`CudaBackend`]: the [`Backend`] of the engine on an NVIDIA GPU.
//!
//! # Modes
//!
//! * [`DType::F32`] — *exact mode*: activations, weights and caches in f32, GEMMs with
//!   `CUBLAS_COMPUTE_32F_PEDANTIC` (never TF32). Every op agrees with the CPU backend to ~1e-6
//!   relative, so a GPU run can be compared number for number with a CPU run.
//! * [`DType::BF16`] — *fast mode*: activations, weights and caches in bf16 (host f32 rounded to
//!   nearest-even once, at upload), GEMMs on tensor cores with f32 accumulation. Norms, softmax,
//!   RoPE, SwiGLU, routing and losses read bf16, compute in f32 inside the kernels and round once
//!   on store.
//!
//! # Execution model
//!
//! One context, one stream ([`Dev`]): every op only *enqueues* work (kernels from
//! `kernels/elementwise.cu` and `kernels/moe.cu`, cuBLAS GEMMs from [`crate::gemm`], the indexer
//! and attention kernels of [`crate::indexer`] / [`crate::mla`]) and returns; the host waits only
//! where a result must come back: [`Backend::download`], [`Backend::nll`] (`T` floats),
//! [`Backend::selection_to_host`], marks, and once per MoE layer for the `E` per-expert token
//! counts that size the expert GEMMs.
//!
//! # Recorded steps
//!
//! [`Backend::graph_begin`] starts capturing the device's stream (relaxed mode) and
//! [`Backend::graph_end`] instantiates a CUDA graph of everything enqueued in between; the model
//! records a decode step once per cache and replays it per token. Allocations made while capturing
//! come from an arena the recording owns ([`crate::dev::CaptureArena`]), so the graph holds
//! kernels only; host reads and synchronisation are refused with an error while capturing; cuBLAS
//! runs on a fixed workspace so no GEMM allocates. `INDEXCACHE_CUDA_GRAPH=0` turns recording off
//! (every step then runs op by op).
//!
//! Every kernel is launched with programmatic dependent launch ([`Dev::launch`]) and waits for its
//! predecessor at entry (`kernels/pdl.cuh`), the decode GEMVs after loading their first weight
//! vectors: results are those of stream order, the next launch overlaps the current kernel.
//! `INDEXCACHE_PDL=0` launches plainly.
//!
//! # Memory
//!
//! Every buffer comes from [`Dev::alloc`], i.e. (outside recordings) cudarc's stream-ordered `cuMemAllocAsync` /
//! `cuMemFreeAsync` on the device's default memory pool. A temporary dropped at the end of an op is
//! returned to the pool *in stream order* (after the kernels enqueued before the drop), and the
//! next op's allocation of the same size is served from the pool without a driver round trip or a
//! synchronisation. That is why ops simply allocate their outputs and scratch: there is no
//! per-op `cudaMalloc`, and no hand-written arena to get wrong. Current and peak bytes are counted
//! by [`Dev`] and reported by [`Backend::memory`].
//!
//! # Ops and their cost (`n` = elements, `s` = bytes per element)
//!
//! | op | kernel | bytes moved |
//! |----|--------|-------------|
//! | upload (bf16) | f32 staging (≤ 64 MiB chunks) → `convert_f32_to_bf16` | `6n` |
//! | copies, `columns`, `head_columns`, `write_block` | `copy2d` / `cuMemcpyDtoDAsync` | `2ns` |
//! | embedding | `gather_rows` (ids uploaded per call) | `2·T·hidden·s` |
//! | add / scale | grid-stride | `3ns` / `2ns` |
//! | rms_norm / layer_norm | one block per row, block reductions | `2ns` (+ re-reads from L1/L2) |
//! | rope | one block per row, one thread per pair | `2ns` |
//! | matmul_t / matmul_heads | cuBLAS (strided-batched for heads); bf16 with T ≤ 4: `gemv` (one warp per output column, 4 vectors per lane per step; 2 or 4 columns for rows of ≤ 1024 / 512) | `2·T·in·out` flops |
//! | matmul_t2 | bf16 with T ≤ 4: `gemv2_bf16`, both products in one launch; else two matmul_t | as two matmul_t |
//! | mlp | 2 GEMMs, `silu_mul`, 1 GEMM | `6·T·hidden·I` flops |
//! | moe | router GEMM (f32 out), `moe_route`, counts → host, `moe_slots`, gather, per-expert GEMMs, `silu_mul`, `moe_combine`; T ≤ 16: `router_route` (T ≤ 4) or router GEMV + `moe_route`, then `moe_decode` (2 launches, no host sync) | `6·T·top_k·hidden·I` flops + shared MLP |
//! | moe_residual | decode: `moe_decode`'s down kernel adds into the residual; else moe + add | as moe |
//! | add_rms_norm_moe | decode (bf16, T ≤ 4, the norm rows beside norm_row's staging in 48 KB): `add_norm_router_route` — the post-attention add + RMSNorm in every router CTA, router GEMV, routing in the last CTA — then `moe_decode`, whose gate/up kernel redoes the add + norm and runs a fused shared expert before the routing is known (`moe_decode_gate_up_pre_bf16`; its down kernel stores x + y with the sum); else add_rms_norm + moe_residual | as both |
//! | mla_norms | `mla_norms`: rms_norm of the q latent and latent_store in one launch (grid y picks) | as both |
//! | sparse_mla_uv | bf16 split-k decode where W_UV runs on the GEMV: the split combine merged into the W_UV GEMV (`mla_combine_uv`); else sparse_mla + matmul_heads | as both |
//! | nll | one block per row: max, Σexp | `T·vocab·s` |
//! | argmax_rows | one block of 1024 threads per row; `T` indices come back | `T·vocab·s` |
//!
//! Every launch is checked; a failure (or an out-of-memory allocation) becomes an [`OpError`]
//! naming the op and its shapes.

use crate::dev::{self, Dev, DevBuf, Source};
use crate::gemm::{Blas, MatmulT};
use crate::{CEILING_BF16_TFLOPS, CEILING_GBPS, KernelBench, indexer, kernels, mla, moe_decode};
use cudarc::driver::{CudaEvent, LaunchConfig};
use indexcache_ops::{
    Backend, DType, MemoryStats, Mlp, Moe, OpError, OpResult, Positions, RopeLayout, RopeTable, TopK, WeightInit,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

// ---- device objects -----------------------------------------------------------------------------

/// An activation `[rows, cols]`, row-major, in the backend dtype.
#[derive(Debug)]
pub struct CudaTensor {
    pub buf: DevBuf,
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
}

impl CudaTensor {
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn ptr(&self) -> u64 {
        self.buf.ptr()
    }
    fn shape(&self) -> String {
        format!("[{}, {}] {}", self.rows, self.cols, self.dtype.name())
    }
}

/// A weight `[groups, rows, cols]`, row-major, in the backend dtype.
#[derive(Debug)]
pub struct CudaWeight {
    pub buf: DevBuf,
    pub groups: usize,
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
}

impl CudaWeight {
    pub fn ptr(&self) -> u64 {
        self.buf.ptr()
    }
    /// Address of group `g` (`[rows, cols]`).
    pub fn group_ptr(&self, g: usize) -> u64 {
        self.buf.ptr() + (g * self.rows * self.cols * self.dtype.size()) as u64
    }
    fn shape(&self) -> String {
        format!("[{}, {}, {}] {}", self.groups, self.rows, self.cols, self.dtype.name())
    }
}

/// A 1-D f32 parameter (norm weights, biases), whatever the backend dtype.
#[derive(Debug)]
pub struct CudaVector {
    pub buf: DevBuf,
    pub len: usize,
}

/// A top-k selection `[rows, k]` of i32 positions, -1 padded.
#[derive(Debug)]
pub struct CudaSelection {
    pub buf: DevBuf,
    pub rows: usize,
    pub k: usize,
}

/// A RoPE table on the device: `cos`, `sin` are `[max_positions, half]` f32.
#[derive(Debug)]
pub struct CudaRope {
    pub cos: DevBuf,
    pub sin: DevBuf,
    pub half: usize,
    pub max_positions: usize,
}

// ---- kernels and their signatures ---------------------------------------------------------------

/// Type of one kernel parameter (checked against every launch, and against the PTX in a test).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ty {
    /// A device address (`T*`).
    Ptr,
    /// `int`
    I32,
    /// `long long`
    I64,
    /// `float`
    F32,
    /// `unsigned long long`
    U64,
}

/// A kernel argument.
#[derive(Debug, Clone, Copy)]
enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
    U64(u64),
}

impl Arg {
    fn ty(&self) -> Ty {
        match self {
            Arg::Ptr(_) => Ty::Ptr,
            Arg::I32(_) => Ty::I32,
            Arg::I64(_) => Ty::I64,
            Arg::F32(_) => Ty::F32,
            Arg::U64(_) => Ty::U64,
        }
    }
}

fn i64a(v: usize) -> Arg {
    Arg::I64(v as i64)
}

/// One kernel: its source, its entry points for f32 and bf16 storage (the same name for kernels
/// without a storage type) and its parameter list.
pub(crate) struct Kernel {
    pub src: &'static Source,
    pub names: [&'static str; 2],
    pub sig: &'static [Ty],
}

use Ty::{F32 as TF, I32 as TI, I64 as TL, Ptr as TP, U64 as TU};

const CONVERT_TO_BF16: Kernel =
    Kernel { src: &kernels::ELEMENTWISE, names: ["convert_f32_to_bf16"; 2], sig: &[TP, TP, TL] };
const CONVERT_TO_F32: Kernel =
    Kernel { src: &kernels::ELEMENTWISE, names: ["convert_bf16_to_f32"; 2], sig: &[TP, TP, TL] };
const RANDOM_FILL: Kernel =
    Kernel { src: &kernels::ELEMENTWISE, names: ["random_fill_f32", "random_fill_bf16"], sig: &[TP, TL, TU, TF] };
const COPY2D: Kernel =
    Kernel { src: &kernels::ELEMENTWISE, names: ["copy2d_f32", "copy2d_bf16"], sig: &[TP, TP, TL, TL, TL, TL] };
const SCATTER_ROWS: Kernel = Kernel {
    src: &kernels::ELEMENTWISE,
    names: ["scatter_rows_f32", "scatter_rows_bf16"],
    sig: &[TP, TP, TP, TL, TL, TL],
};
const GATHER_ROWS: Kernel =
    Kernel { src: &kernels::ELEMENTWISE, names: ["gather_rows_f32", "gather_rows_bf16"], sig: &[TP, TP, TP, TL] };
const ADD: Kernel = Kernel { src: &kernels::ELEMENTWISE, names: ["add_f32", "add_bf16"], sig: &[TP, TP, TL] };
const SCALE: Kernel = Kernel { src: &kernels::ELEMENTWISE, names: ["scale_f32", "scale_bf16"], sig: &[TP, TF, TL] };
const SILU_MUL: Kernel =
    Kernel { src: &kernels::ELEMENTWISE, names: ["silu_mul_f32", "silu_mul_bf16"], sig: &[TP, TL, TP, TL, TP, TL, TL] };
const RMS_NORM: Kernel =
    Kernel { src: &kernels::ELEMENTWISE, names: ["rms_norm_f32", "rms_norm_bf16"], sig: &[TP, TP, TP, TL, TF] };
const LAYER_NORM: Kernel =
    Kernel { src: &kernels::ELEMENTWISE, names: ["layer_norm_f32", "layer_norm_bf16"], sig: &[TP, TP, TP, TP, TL, TF] };
const ROPE: Kernel =
    Kernel { src: &kernels::ELEMENTWISE, names: ["rope_f32", "rope_bf16"], sig: &[TP, TP, TP, TP, TL, TI, TI, TI] };
const ADD_RMS_NORM: Kernel = Kernel {
    src: &kernels::ELEMENTWISE,
    names: ["add_rms_norm_f32", "add_rms_norm_bf16"],
    sig: &[TP, TP, TP, TP, TL, TF],
};
const SPLIT_HEADS_ROPE: Kernel = Kernel {
    src: &kernels::ELEMENTWISE,
    names: ["split_heads_rope_f32", "split_heads_rope_bf16"],
    sig: &[TP, TP, TP, TP, TP, TP, TI, TI, TI, TI],
};
const LATENT_STORE: Kernel = Kernel {
    src: &kernels::ELEMENTWISE,
    names: ["latent_store_f32", "latent_store_bf16"],
    sig: &[TP, TP, TP, TP, TP, TP, TI, TI, TI, TF],
};
/// `rms_norm` and `latent_store` of one MLA step in one launch (grid y picks the op).
const MLA_NORMS: Kernel = Kernel {
    src: &kernels::ELEMENTWISE,
    names: ["mla_norms_f32", "mla_norms_bf16"],
    sig: &[TP, TP, TP, TL, TP, TP, TP, TP, TP, TP, TI, TI, TI, TF],
};
const GQA_ATTN: Kernel = Kernel {
    src: &kernels::GQA,
    names: ["gqa_attn_f32", "gqa_attn_bf16"],
    sig: &[TP, TP, TP, TP, TP, TP, TI, TI, TI, TI, TI, TF],
};
const NLL: Kernel = Kernel { src: &kernels::ELEMENTWISE, names: ["nll_f32", "nll_bf16"], sig: &[TP, TP, TP, TL] };
const ARGMAX_ROWS: Kernel =
    Kernel { src: &kernels::ELEMENTWISE, names: ["argmax_rows_f32", "argmax_rows_bf16"], sig: &[TP, TP, TL] };
const MOE_ROUTE: Kernel =
    Kernel { src: &kernels::MOE, names: ["moe_route"; 2], sig: &[TP, TP, TP, TP, TP, TI, TI, TI, TI, TI, TI, TF] };
/// The decode router GEMV with the routing in its last CTA (`moe_decode.cu`).
const ROUTER_ROUTE: Kernel = Kernel {
    src: &kernels::MOE_DECODE,
    names: ["router_route"; 2],
    sig: &[TP, TI, TI, TP, TP, TP, TP, TP, TP, TI, TI, TI, TI, TI, TF],
};
/// The post-attention add + RMSNorm, the router GEMV and the routing in one launch
/// (`add_rms_norm_moe` at decode).
const ADD_NORM_ROUTER_ROUTE: Kernel = Kernel {
    src: &kernels::MOE_DECODE,
    names: ["add_norm_router_route"; 2],
    sig: &[TP, TP, TP, TF, TP, TI, TI, TP, TP, TP, TP, TP, TP, TI, TI, TI, TI, TI, TF, TI, TI],
};
const MOE_SLOTS: Kernel = Kernel { src: &kernels::MOE, names: ["moe_slots"; 2], sig: &[TP, TP, TP, TP, TI, TI] };
const MOE_COMBINE: Kernel =
    Kernel { src: &kernels::MOE, names: ["moe_combine_f32", "moe_combine_bf16"], sig: &[TP, TP, TP, TP, TP, TI, TL] };
/// The decode GEMV (bf16 inputs only; the names pick the output type, not the storage type).
const GEMV: Kernel = Kernel {
    src: &kernels::MOE_DECODE,
    names: ["gemv_bf16"; 2],
    sig: &[TP, TL, TL, TP, TL, TL, TP, TL, TL, TI, TI, TI],
};
const GEMV_F32_OUT: Kernel = Kernel { names: ["gemv_bf16_f32"; 2], ..GEMV };
/// The GEMV for short rows: 2 / 4 output columns per warp.
const GEMV_C2: Kernel = Kernel { names: ["gemv_bf16_c2"; 2], ..GEMV };
/// 4 vectors per lane per step (the default; `INDEXCACHE_GEMV_U4=0`: `GEMV`; same bits).
const GEMV_U4: Kernel = Kernel { names: ["gemv_bf16_u4"; 2], ..GEMV };
const GEMV_C4: Kernel = Kernel { names: ["gemv_bf16_c4"; 2], ..GEMV };
/// Two decode GEMVs of one input in one launch (`matmul_t2`).
const GEMV2: Kernel =
    Kernel { src: &kernels::MOE_DECODE, names: ["gemv2_bf16"; 2], sig: &[TP, TI, TI, TP, TP, TI, TP, TP, TI] };
const GEMV2_U4: Kernel = Kernel { names: ["gemv2_bf16_u4"; 2], ..GEMV2 };

/// Every kernel this module launches (the PTX signature test walks this list).
#[cfg(test)]
pub(crate) const ALL_KERNELS: &[&Kernel] = &[
    &CONVERT_TO_BF16,
    &CONVERT_TO_F32,
    &RANDOM_FILL,
    &COPY2D,
    &SCATTER_ROWS,
    &GATHER_ROWS,
    &ADD,
    &SCALE,
    &SILU_MUL,
    &RMS_NORM,
    &LAYER_NORM,
    &ROPE,
    &ADD_RMS_NORM,
    &SPLIT_HEADS_ROPE,
    &LATENT_STORE,
    &MLA_NORMS,
    &GQA_ATTN,
    &NLL,
    &ARGMAX_ROWS,
    &MOE_ROUTE,
    &MOE_SLOTS,
    &MOE_COMBINE,
    &GEMV,
    &GEMV_F32_OUT,
    &GEMV_C2,
    &GEMV_C4,
    &GEMV_U4,
    &GEMV2,
    &GEMV2_U4,
    &ROUTER_ROUTE,
    &ADD_NORM_ROUTER_ROUTE,
];

/// Threads per block of the row and grid-stride kernels.
const THREADS: u32 = 256;
/// Grid-stride kernels never launch more blocks than this (each thread then loops).
const MAX_BLOCKS: u32 = 1 << 16;
/// Elements per f32 staging chunk of a bf16 upload (64 MiB of f32).
const UPLOAD_CHUNK: usize = 16 << 20;
/// Warps (tokens) per block of `moe_route` (as many as `router_route` has: the same shared-memory
/// bound applies to both).
const ROUTE_WARPS: usize = GEMV_WARPS;
/// Most routed experts `moe_route` holds in registers (`moe.cu` 32 × ROUTE_PER_LANE).
const ROUTE_MAX_EXPERTS: usize = 256;
/// Most rows of `x` a bf16 matmul sends to the decode GEMV instead of cuBLAS (`moe_decode.cu`
/// GEMV_ROWS): at one to four rows cuBLAS's kernels read the weights at a fraction of the memory
/// bandwidth (5–10 µs for 3–21 MB at the 30B shape's decode, where 1–2 µs is the bound).
const GEMV_ROWS: usize = 4;
/// Output columns (warps) per CTA of the GEMV (`moe_decode.cu` GEMV_WARPS).
const GEMV_WARPS: usize = 4;
/// Warps per CTA of `add_norm_router_route` (`moe_decode.cu` ROUTER_WARPS): 256 threads, the
/// block of `add_rms_norm`, so its norm has the same bits.
const ROUTER_WARPS: usize = 8;
/// Static shared memory of `add_norm_router_route` (norm_row's 32 KB row staging, the reduction
/// scratch), rounded up; its dynamic part must fit beside it in 48 KB.
const ROUTER_NORM_STATIC_SMEM: usize = 33 * 1024;
/// `split_heads_rope` blocks: threads per head and heads per block (`elementwise.cu`).
const SPLIT_THREADS: u32 = 64;
const SPLIT_HEADS: usize = 4;

fn flat_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (dev::blocks(n, THREADS as usize).min(MAX_BLOCKS), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// 32×8-thread blocks for the 2-D grid-stride kernels (`copy2d`, `silu_mul`): x over columns,
/// y over rows; the grid is capped (each thread then loops), so every shape launches.
fn grid2d_cfg(rows: usize, cols: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (dev::blocks(cols, 32).min(64), dev::blocks(rows, 8).min(65535), 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    }
}

fn row_cfg(op: &'static str, rows: usize, threads: u32) -> OpResult<LaunchConfig> {
    let grid =
        u32::try_from(rows).map_err(|_| OpError::new(op, format!("{rows} rows"), "too many rows for one grid"))?;
    Ok(LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 })
}

/// The `layout` argument of the RoPE kernels.
fn rope_layout_id(layout: RopeLayout) -> i32 {
    match layout {
        RopeLayout::Interleaved => 0,
        RopeLayout::HalfSplit => 1,
    }
}

fn bad(op: &'static str, shapes: impl Into<String>, detail: impl std::fmt::Display) -> OpError {
    OpError::new(op, shapes, detail)
}

// ---- the backend ---------------------------------------------------------------------------------

/// The CUDA backend: a device, a cuBLAS handle on its stream, and the storage dtype.
pub struct CudaBackend {
    dev: Arc<Dev>,
    blas: Blas,
    dtype: DType,
    poison: AtomicBool,
    /// Use the sync-free grouped-GEMV MoE for decode-sized inputs (`INDEXCACHE_MOE_DECODE=0`: off).
    moe_decode: bool,
    /// Record decode steps as CUDA graphs (`INDEXCACHE_CUDA_GRAPH=0`: off).
    graphs: bool,
    /// Send bf16 matmuls of at most [`GEMV_ROWS`] rows to the decode GEMV (`INDEXCACHE_GEMV=0`:
    /// always cuBLAS).
    gemv: bool,
    /// The one-column GEMVs at 4 vectors per lane per step (`INDEXCACHE_GEMV_U4=0`: 8, the
    /// previous shape; same bits).
    gemv_u4: bool,
    /// Fused launches across op boundaries (`mla_norms` in one launch, the post-attention
    /// add + norm inside the MoE router kernel, the sparse-MLA combine inside the W_UV GEMV);
    /// `INDEXCACHE_FUSE=0`: the plain launches (same bits).
    fuse: bool,
    /// Decode-shaped sparse MLA on the one-tile kernel (`mla_dec_*`; `INDEXCACHE_MLA_DEC=0`: the
    /// split prefill kernel, as before).
    mla_dec: bool,
    /// `mla_combine_uv` as thread-block clusters (`INDEXCACHE_UV_CLUSTER=0`: off; same bits).
    uv_cluster: bool,
    /// At decode, the post-attention add + RMSNorm redone inside the MoE gate/up kernel, whose
    /// shared-expert rows then run while the router kernel still routes
    /// (`moe_decode_gate_up_pre_bf16`; `INDEXCACHE_MOE_PRE=0`: off; the same bits).
    moe_pre: bool,
    /// `router_route`'s count of finished CTAs (zero between launches; its last CTA resets it).
    route_done: DevBuf,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend").field("device", &self.dev.device_name).field("dtype", &self.dtype).finish()
    }
}

impl CudaBackend {
    /// Open GPU `ordinal` in `dtype` mode (F32 = exact, BF16 = fast). Fails cleanly without a GPU,
    /// a driver, cuBLAS or NVRTC (the element-wise kernels are compiled here, once).
    pub fn new(ordinal: usize, dtype: DType) -> OpResult<Self> {
        Self::from_dev(Arc::new(Dev::open(ordinal)?), dtype)
    }

    /// A backend on an already opened device (shares its stream, module cache and counters).
    pub fn from_dev(dev: Arc<Dev>, dtype: DType) -> OpResult<Self> {
        let blas = Blas::new(&dev)?;
        // Compile the element-wise module now, so a missing NVRTC fails at load, not mid-run.
        dev.function(&kernels::ELEMENTWISE, ADD.names[0])?;
        let moe_decode = std::env::var("INDEXCACHE_MOE_DECODE").map_or(true, |v| v != "0");
        let graphs = std::env::var("INDEXCACHE_CUDA_GRAPH").map_or(true, |v| v != "0");
        let gemv = std::env::var("INDEXCACHE_GEMV").map_or(true, |v| v != "0");
        let gemv_u4 = std::env::var("INDEXCACHE_GEMV_U4").map_or(true, |v| v != "0");
        let fuse = std::env::var("INDEXCACHE_FUSE").map_or(true, |v| v != "0");
        let mla_dec = std::env::var("INDEXCACHE_MLA_DEC").map_or(true, |v| v != "0");
        let uv_cluster = std::env::var("INDEXCACHE_UV_CLUSTER").map_or(true, |v| v != "0");
        let moe_pre = std::env::var("INDEXCACHE_MOE_PRE").map_or(true, |v| v != "0");
        let route_done = dev.alloc_zeroed("cuda init", 4)?;
        Ok(Self {
            dev,
            blas,
            dtype,
            poison: AtomicBool::new(false),
            moe_decode,
            graphs,
            gemv,
            gemv_u4,
            fuse,
            mla_dec,
            uv_cluster,
            moe_pre,
            route_done,
        })
    }

    /// The sparse-MLA launch options this backend's switches select.
    fn mla_opts(&self) -> mla::MlaOpts {
        mla::MlaOpts { no_decode: !self.mla_dec, no_cluster: !self.uv_cluster, ..mla::MlaOpts::default() }
    }

    pub fn dev(&self) -> &Arc<Dev> {
        &self.dev
    }

    pub fn blas(&self) -> &Blas {
        &self.blas
    }

    /// Testing aid: fill every freshly allocated op output with 0xFF bytes (NaN in f32 and bf16)
    /// before the kernels run, so an element a kernel forgets to write shows up as NaN.
    pub fn set_poison(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }

    // ---- helpers ------------------------------------------------------------------------------

    fn launch(
        &self,
        k: &Kernel,
        dtype: DType,
        cfg: LaunchConfig,
        op: &'static str,
        shapes: impl FnOnce() -> String,
        args: &[Arg],
    ) -> OpResult<()> {
        let name = match dtype {
            DType::F32 => k.names[0],
            DType::BF16 => k.names[1],
        };
        if args.len() != k.sig.len() || args.iter().zip(k.sig).any(|(a, t)| a.ty() != *t) {
            return Err(bad(op, shapes(), format!("kernel {name}: arguments {args:?} do not match {:?}", k.sig)));
        }
        let f = self.dev.function(k.src, name)?;
        let mut b = self.dev.builder(&f);
        for a in args {
            match a {
                Arg::Ptr(v) | Arg::U64(v) => b.arg(v),
                Arg::I32(v) => b.arg(v),
                Arg::I64(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        self.dev.launch(b, cfg, op, shapes)
    }

    fn memset(&self, op: &'static str, ptr: u64, byte: u8, bytes: usize) -> OpResult<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.dev.ctx.bind_to_thread().map_err(|e| bad(op, format!("memset {bytes} bytes"), format!("{e:?}")))?;
        // SAFETY: `ptr` is the start of a live allocation of at least `bytes` bytes (callers pass
        // buffers they just allocated with that size), used on this stream only.
        unsafe { cudarc::driver::result::memset_d8_async(ptr, byte, bytes, self.dev.stream.cu_stream()) }
            .map_err(|e| bad(op, format!("memset {bytes} bytes"), format!("{e:?}")))
    }

    /// An op output or scratch buffer of `bytes` (poisoned when [`Self::set_poison`] is on).
    fn out_buf(&self, op: &'static str, bytes: usize) -> OpResult<DevBuf> {
        let b = self.dev.alloc(op, bytes)?;
        if self.poison.load(Ordering::Relaxed) {
            self.memset(op, b.ptr(), 0xFF, bytes)?;
        }
        Ok(b)
    }

    fn tensor_out(&self, op: &'static str, rows: usize, cols: usize) -> OpResult<CudaTensor> {
        let buf = self.out_buf(op, rows * cols * self.dtype.size())?;
        Ok(CudaTensor { buf, rows, cols, dtype: self.dtype })
    }

    /// Host f32 values to a new buffer in the backend dtype. bf16: f32 chunks are staged on the
    /// device and rounded to nearest-even there (bit-identical to `half::bf16::from_f32`).
    fn upload_values(&self, op: &'static str, data: &[f32]) -> OpResult<DevBuf> {
        match self.dtype {
            DType::F32 => self.dev.upload(op, data),
            DType::BF16 => {
                let out = self.dev.alloc(op, data.len() * 2)?;
                for (i, chunk) in data.chunks(UPLOAD_CHUNK).enumerate() {
                    let staging = self.dev.upload(op, chunk)?;
                    let dst = out.ptr() + (i * UPLOAD_CHUNK * 2) as u64;
                    self.launch(
                        &CONVERT_TO_BF16,
                        DType::F32,
                        flat_cfg(chunk.len()),
                        op,
                        || format!("{} values to bf16", data.len()),
                        &[Arg::Ptr(staging.ptr()), Arg::Ptr(dst), i64a(chunk.len())],
                    )?;
                    // `staging` goes back to the pool in stream order, after the conversion.
                }
                Ok(out)
            }
        }
    }

    /// `n` values of the backend dtype at the start of `buf`, as f32 on the host (synchronises).
    fn download_values(&self, op: &'static str, buf: &DevBuf, n: usize) -> OpResult<Vec<f32>> {
        match self.dtype {
            DType::F32 => self.dev.download::<f32>(op, buf, n),
            DType::BF16 => {
                let tmp = self.dev.alloc(op, n * 4)?;
                self.launch(
                    &CONVERT_TO_F32,
                    DType::F32,
                    flat_cfg(n),
                    op,
                    || format!("{n} bf16 values to f32"),
                    &[Arg::Ptr(buf.ptr()), Arg::Ptr(tmp.ptr()), i64a(n)],
                )?;
                self.dev.download::<f32>(op, &tmp, n)
            }
        }
    }

    /// `dst[r*ds + c] = src[r*ss + c]`, elements of the backend dtype.
    #[allow(clippy::too_many_arguments)]
    fn copy2d(
        &self,
        op: &'static str,
        src: u64,
        dst: u64,
        rows: usize,
        cols: usize,
        src_stride: usize,
        dst_stride: usize,
        shapes: impl FnOnce() -> String,
    ) -> OpResult<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        if cols == src_stride && cols == dst_stride {
            // `Dev::copy_raw` does not make the context current; this thread may not have yet.
            self.dev.ctx.bind_to_thread().map_err(|e| bad(op, shapes(), format!("{e:?}")))?;
            return self.dev.copy_raw(op, dst, src, rows * cols * self.dtype.size());
        }
        self.launch(
            &COPY2D,
            self.dtype,
            grid2d_cfg(rows, cols),
            op,
            shapes,
            &[Arg::Ptr(src), Arg::Ptr(dst), i64a(rows), i64a(cols), i64a(src_stride), i64a(dst_stride)],
        )
    }

    /// `y = x · wᵀ` for packed row-major buffers (`x [rows, n_in]`, `w [n_out, n_in]`).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        op: &'static str,
        x: u64,
        rows: usize,
        n_in: usize,
        w: u64,
        n_out: usize,
        y: u64,
        out_f32: bool,
    ) -> OpResult<()> {
        let mut g = MatmulT::plain(self.dtype, rows, n_out, n_in, x, w, y);
        g.out_f32 = out_f32;
        self.matmul(op, &g)
    }

    /// Does `g` run on the decode GEMV: bf16, at most [`GEMV_ROWS`] rows, rows and strides in
    /// whole 16-byte vectors (and the GEMV not switched off)?
    fn gemv_applies(&self, g: &MatmulT) -> bool {
        let v8 = |n: usize| n.is_multiple_of(8);
        self.gemv
            && g.dtype == DType::BF16
            && (1..=GEMV_ROWS).contains(&g.rows)
            && g.n_out > 0
            && v8(g.n_in)
            && v8(g.ldx)
            && v8(g.ldw)
            && (g.batch == 1 || (v8(g.stride_x) && v8(g.stride_w)))
            && g.x.is_multiple_of(16)
            && g.w.is_multiple_of(16)
            && g.n_out <= i32::MAX as usize
            && g.n_in <= i32::MAX as usize
            && (1..=65535).contains(&g.batch)
    }

    /// Enqueue `g`: the decode GEMV where it applies (bf16, at most `GEMV_ROWS` (4) rows, rows and
    /// strides in whole 16-byte vectors), cuBLAS otherwise.
    pub fn matmul(&self, op: &'static str, g: &MatmulT) -> OpResult<()> {
        if !self.gemv_applies(g) {
            return self.blas.matmul_t(&self.dev, op, g);
        }
        // Short rows: several output columns per warp (`gemv_bf16_c2` / `_c4`, same bits).
        let (kernel, cols) = match (g.out_f32, g.n_in / 8) {
            (true, _) => (&GEMV_F32_OUT, 1),
            (false, v) if v <= 64 => (&GEMV_C4, 4),
            (false, v) if v <= 128 => (&GEMV_C2, 2),
            (false, _) if self.gemv_u4 => (&GEMV_U4, 1),
            (false, _) => (&GEMV, 1),
        };
        let warps = g.n_out.div_ceil(cols);
        let cfg = LaunchConfig {
            grid_dim: (dev::blocks(warps, GEMV_WARPS), g.batch as u32, 1),
            block_dim: (32 * GEMV_WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let single = |v: usize| if g.batch == 1 { 0 } else { v };
        self.launch(
            kernel,
            DType::BF16,
            cfg,
            op,
            || format!("gemv x [{}, {}] · w [{}, {}]ᵀ, batch {}", g.rows, g.n_in, g.n_out, g.n_in, g.batch),
            &[
                Arg::Ptr(g.x),
                i64a(g.ldx),
                i64a(single(g.stride_x)),
                Arg::Ptr(g.w),
                i64a(g.ldw),
                i64a(single(g.stride_w)),
                Arg::Ptr(g.y),
                i64a(g.ldy),
                i64a(single(g.stride_y)),
                Arg::I32(g.rows as i32),
                Arg::I32(g.n_out as i32),
                Arg::I32(g.n_in as i32),
            ],
        )
    }

    /// `out [rows, cols] = silu(g) * u` with row strides `gs`, `us`.
    #[allow(clippy::too_many_arguments)]
    fn silu_mul(
        &self,
        op: &'static str,
        g: u64,
        gs: usize,
        u: u64,
        us: usize,
        out: u64,
        rows: usize,
        cols: usize,
    ) -> OpResult<()> {
        self.launch(
            &SILU_MUL,
            self.dtype,
            grid2d_cfg(rows, cols),
            op,
            || format!("silu_mul [{rows}, {cols}]"),
            &[Arg::Ptr(g), i64a(gs), Arg::Ptr(u), i64a(us), Arg::Ptr(out), i64a(rows), i64a(cols)],
        )
    }

    /// Dense SwiGLU on raw weight addresses: `down(silu(x·gateᵀ) * x·upᵀ)`, gate/up `[inter, hidden]`,
    /// down `[hidden, inter]`; writes `[rows, hidden]` at `out`.
    #[allow(clippy::too_many_arguments)]
    fn swiglu(
        &self,
        op: &'static str,
        x: u64,
        rows: usize,
        hidden: usize,
        gate: u64,
        up: u64,
        down: u64,
        inter: usize,
        out: u64,
    ) -> OpResult<()> {
        let s = self.dtype.size();
        let g = self.out_buf(op, rows * inter * s)?;
        let u = self.out_buf(op, rows * inter * s)?;
        self.gemm(op, x, rows, hidden, gate, inter, g.ptr(), false)?;
        self.gemm(op, x, rows, hidden, up, inter, u.ptr(), false)?;
        // silu(g) * u in place into g (each element read then written by the same thread).
        self.silu_mul(op, g.ptr(), inter, u.ptr(), inter, g.ptr(), rows, inter)?;
        drop(u);
        self.gemm(op, g.ptr(), rows, inter, down, hidden, out, false)
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type Vector = CudaVector;
    type Selection = CudaSelection;
    type PosData = DevBuf;
    type Rope = CudaRope;
    type Mark = CudaEvent;
    type Graph = CudaStepGraph;

    fn name(&self) -> String {
        format!("cuda ({}, {})", self.dev.device_name, self.dtype.name())
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn default_chunk(&self) -> usize {
        8192
    }

    // ---- data movement ----------------------------------------------------------------------

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> OpResult<CudaTensor> {
        if data.len() != rows * cols {
            return Err(bad("upload", format!("[{rows}, {cols}]"), format!("{} values given", data.len())));
        }
        Ok(CudaTensor { buf: self.upload_values("upload", data)?, rows, cols, dtype: self.dtype })
    }

    fn download(&self, t: &CudaTensor) -> OpResult<Vec<f32>> {
        self.download_values("download", &t.buf, t.len())
    }

    fn dims(&self, t: &CudaTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn zeros(&self, rows: usize, cols: usize) -> OpResult<CudaTensor> {
        let bytes = rows * cols * self.dtype.size();
        let buf = self.dev.alloc("zeros", bytes)?;
        self.memset("zeros", buf.ptr(), 0, bytes)?;
        Ok(CudaTensor { buf, rows, cols, dtype: self.dtype })
    }

    fn copy(&self, t: &CudaTensor) -> OpResult<CudaTensor> {
        let out = self.tensor_out("copy", t.rows, t.cols)?;
        self.dev.copy_raw("copy", out.ptr(), t.ptr(), t.len() * self.dtype.size())?;
        Ok(out)
    }

    fn weight(&self, init: WeightInit, groups: usize, rows: usize, cols: usize) -> OpResult<CudaWeight> {
        let n = groups * rows * cols;
        let shapes = || format!("[{groups}, {rows}, {cols}] {}", self.dtype.name());
        let buf = match init {
            WeightInit::Host(v) => {
                if v.len() != n {
                    return Err(bad("weight", shapes(), format!("{} values given", v.len())));
                }
                self.upload_values("weight", &v)?
            }
            WeightInit::Random { seed, bound } => {
                let buf = self.out_buf("weight", n * self.dtype.size())?;
                self.launch(
                    &RANDOM_FILL,
                    self.dtype,
                    flat_cfg(n),
                    "weight",
                    shapes,
                    &[Arg::Ptr(buf.ptr()), i64a(n), Arg::U64(seed), Arg::F32(bound)],
                )?;
                buf
            }
        };
        Ok(CudaWeight { buf, groups, rows, cols, dtype: self.dtype })
    }

    fn vector(&self, data: &[f32]) -> OpResult<CudaVector> {
        Ok(CudaVector { buf: self.dev.upload("vector", data)?, len: data.len() })
    }

    fn positions(&self, pos: &[usize]) -> OpResult<Positions<DevBuf>> {
        let dev: Vec<i32> = pos
            .iter()
            .map(|&p| i32::try_from(p))
            .collect::<Result<_, _>>()
            .map_err(|_| bad("positions", format!("{} rows", pos.len()), "position beyond i32"))?;
        Ok(Positions { host: pos.to_vec(), device: self.dev.upload("positions", &dev)?, bound: 0 })
    }

    fn update_positions(&self, p: &mut Positions<DevBuf>, pos: &[usize]) -> OpResult<()> {
        const OP: &str = "update_positions";
        if pos.len() != p.len() {
            return Err(bad(OP, format!("{} positions ← {}", p.len(), pos.len()), "row count differs"));
        }
        if self.dev.capturing() {
            return Err(bad(OP, format!("{} positions", pos.len()), "called while recording a graph"));
        }
        let dev: Vec<i32> = pos
            .iter()
            .map(|&p| i32::try_from(p))
            .collect::<Result<_, _>>()
            .map_err(|_| bad(OP, format!("{} rows", pos.len()), "position beyond i32"))?;
        self.dev.write(OP, &mut p.device, &dev)?;
        p.host.copy_from_slice(pos);
        Ok(())
    }

    fn rope_table(&self, table: &RopeTable) -> OpResult<CudaRope> {
        let (half, n) = (table.half(), table.max_positions());
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            let (c, s) = table.at(p);
            cos.extend_from_slice(c);
            sin.extend_from_slice(s);
        }
        Ok(CudaRope {
            cos: self.dev.upload("rope_table", &cos)?,
            sin: self.dev.upload("rope_table", &sin)?,
            half,
            max_positions: n,
        })
    }

    fn selection_to_host(&self, sel: &CudaSelection) -> OpResult<TopK> {
        let data = self.dev.download::<i32>("selection_to_host", &sel.buf, sel.rows * sel.k)?;
        Ok(TopK { rows: sel.rows, k: sel.k, data })
    }

    fn selection_from_host(&self, sel: &TopK) -> OpResult<CudaSelection> {
        if sel.data.len() != sel.rows * sel.k {
            return Err(bad("selection_from_host", format!("[{}, {}]", sel.rows, sel.k), "data length != rows*k"));
        }
        Ok(CudaSelection { buf: self.dev.upload("selection_from_host", &sel.data)?, rows: sel.rows, k: sel.k })
    }

    fn columns(&self, x: &CudaTensor, start: usize, len: usize) -> OpResult<CudaTensor> {
        let shapes = || format!("{} columns {start}..{}", x.shape(), start + len);
        if start + len > x.cols {
            return Err(bad("columns", shapes(), "out of bounds"));
        }
        let out = self.tensor_out("columns", x.rows, len)?;
        let src = x.ptr() + (start * self.dtype.size()) as u64;
        self.copy2d("columns", src, out.ptr(), x.rows, len, x.cols, len, shapes)?;
        Ok(out)
    }

    fn rows(&self, x: &CudaTensor, start: usize, len: usize) -> OpResult<CudaTensor> {
        if start + len > x.rows {
            return Err(bad("rows", format!("{} rows {start}..{}", x.shape(), start + len), "out of bounds"));
        }
        let out = self.tensor_out("rows", len, x.cols)?;
        let s = self.dtype.size();
        self.dev.copy_raw("rows", out.ptr(), x.ptr() + (start * x.cols * s) as u64, len * x.cols * s)?;
        Ok(out)
    }

    fn head_columns(
        &self,
        x: &CudaTensor,
        heads: usize,
        stride: usize,
        offset: usize,
        len: usize,
    ) -> OpResult<CudaTensor> {
        let shapes = || format!("{} heads {heads} stride {stride} offset {offset} len {len}", x.shape());
        if x.cols != heads * stride || offset + len > stride {
            return Err(bad("head_columns", shapes(), "inconsistent head layout"));
        }
        let out = self.tensor_out("head_columns", x.rows, heads * len)?;
        // [T, H*stride] is [T*H, stride]; take columns offset..offset+len of every (row, head).
        let src = x.ptr() + (offset * self.dtype.size()) as u64;
        self.copy2d("head_columns", src, out.ptr(), x.rows * heads, len, stride, len, shapes)?;
        Ok(out)
    }

    fn write_block(&self, dst: &mut CudaTensor, row0: usize, col0: usize, src: &CudaTensor) -> OpResult<()> {
        let shapes = || format!("dst {} at ({row0}, {col0}), src {}", dst.shape(), src.shape());
        if row0 + src.rows > dst.rows || col0 + src.cols > dst.cols {
            return Err(bad("write_block", shapes(), "block out of bounds"));
        }
        let d = dst.ptr() + ((row0 * dst.cols + col0) * self.dtype.size()) as u64;
        self.copy2d("write_block", src.ptr(), d, src.rows, src.cols, src.cols, dst.cols, shapes)
    }

    fn write_rows(&self, dst: &mut CudaTensor, pos: &Positions<DevBuf>, col0: usize, src: &CudaTensor) -> OpResult<()> {
        let shapes = || format!("dst {} col {col0}, src {}, {} positions", dst.shape(), src.shape(), pos.len());
        if src.rows != pos.len() || pos.max_visible() > dst.rows || col0 + src.cols > dst.cols {
            return Err(bad("write_rows", shapes(), "rows out of bounds"));
        }
        if src.rows == 0 || src.cols == 0 {
            return Ok(());
        }
        let d = dst.ptr() + (col0 * self.dtype.size()) as u64;
        self.launch(
            &SCATTER_ROWS,
            self.dtype,
            grid2d_cfg(src.rows, src.cols),
            "write_rows",
            shapes,
            &[
                Arg::Ptr(src.ptr()),
                Arg::Ptr(pos.device.ptr()),
                Arg::Ptr(d),
                i64a(src.rows),
                i64a(src.cols),
                i64a(dst.cols),
            ],
        )
    }

    // ---- elementwise / norms ----------------------------------------------------------------

    fn embedding(&self, table: &CudaWeight, ids: &[u32]) -> OpResult<CudaTensor> {
        let shapes = || format!("table {}, {} ids", table.shape(), ids.len());
        if table.groups != 1 {
            return Err(bad("embedding", shapes(), "table must have one group"));
        }
        if let Some(&bad_id) = ids.iter().find(|&&i| i as usize >= table.rows) {
            return Err(bad("embedding", shapes(), format!("token id {bad_id} ≥ vocabulary {}", table.rows)));
        }
        let out = self.tensor_out("embedding", ids.len(), table.cols)?;
        if ids.is_empty() {
            return Ok(out);
        }
        let dev_ids = self.dev.upload("embedding", ids)?;
        self.launch(
            &GATHER_ROWS,
            self.dtype,
            row_cfg("embedding", ids.len(), THREADS)?,
            "embedding",
            shapes,
            &[Arg::Ptr(table.ptr()), Arg::Ptr(dev_ids.ptr()), Arg::Ptr(out.ptr()), i64a(table.cols)],
        )?;
        Ok(out)
    }

    fn add_inplace(&self, x: &mut CudaTensor, y: &CudaTensor) -> OpResult<()> {
        let shapes = || format!("{} += {}", x.shape(), y.shape());
        if (x.rows, x.cols) != (y.rows, y.cols) {
            return Err(bad("add", shapes(), "shape mismatch"));
        }
        let n = x.len();
        self.launch(&ADD, self.dtype, flat_cfg(n), "add", shapes, &[Arg::Ptr(x.ptr()), Arg::Ptr(y.ptr()), i64a(n)])
    }

    fn scale_inplace(&self, x: &mut CudaTensor, s: f32) -> OpResult<()> {
        let n = x.len();
        self.launch(
            &SCALE,
            self.dtype,
            flat_cfg(n),
            "scale",
            || format!("{} × {s}", x.shape()),
            &[Arg::Ptr(x.ptr()), Arg::F32(s), i64a(n)],
        )
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaVector, eps: f32) -> OpResult<CudaTensor> {
        let shapes = || format!("{}, w [{}]", x.shape(), w.len);
        if w.len != x.cols {
            return Err(bad("rms_norm", shapes(), "weight length != columns"));
        }
        let out = self.tensor_out("rms_norm", x.rows, x.cols)?;
        self.launch(
            &RMS_NORM,
            self.dtype,
            row_cfg("rms_norm", x.rows, THREADS)?,
            "rms_norm",
            shapes,
            &[Arg::Ptr(x.ptr()), Arg::Ptr(w.buf.ptr()), Arg::Ptr(out.ptr()), i64a(x.cols), Arg::F32(eps)],
        )?;
        Ok(out)
    }

    fn layer_norm(&self, x: &CudaTensor, w: &CudaVector, b: &CudaVector, eps: f32) -> OpResult<CudaTensor> {
        let shapes = || format!("{}, w [{}], b [{}]", x.shape(), w.len, b.len);
        if w.len != x.cols || b.len != x.cols {
            return Err(bad("layer_norm", shapes(), "weight/bias length != columns"));
        }
        let out = self.tensor_out("layer_norm", x.rows, x.cols)?;
        self.launch(
            &LAYER_NORM,
            self.dtype,
            row_cfg("layer_norm", x.rows, THREADS)?,
            "layer_norm",
            shapes,
            &[
                Arg::Ptr(x.ptr()),
                Arg::Ptr(w.buf.ptr()),
                Arg::Ptr(b.buf.ptr()),
                Arg::Ptr(out.ptr()),
                i64a(x.cols),
                Arg::F32(eps),
            ],
        )?;
        Ok(out)
    }

    fn rope_inplace(
        &self,
        x: &mut CudaTensor,
        head_dim: usize,
        rot_dims: usize,
        layout: RopeLayout,
        pos: &Positions<DevBuf>,
        table: &CudaRope,
    ) -> OpResult<()> {
        let shapes =
            || format!("{}, head_dim {head_dim}, rot_dims {rot_dims}, {layout:?}, {} positions", x.shape(), pos.len());
        if x.rows != pos.len() || head_dim == 0 || !x.cols.is_multiple_of(head_dim) || rot_dims > head_dim {
            return Err(bad("rope", shapes(), "inconsistent shapes"));
        }
        if rot_dims != 2 * table.half {
            return Err(bad("rope", shapes(), format!("table has {} frequencies", table.half)));
        }
        if pos.max_visible() > table.max_positions {
            return Err(bad(
                "rope",
                shapes(),
                format!("position {} beyond the table's {}", pos.max_visible() - 1, table.max_positions),
            ));
        }
        let layout_id = rope_layout_id(layout);
        self.launch(
            &ROPE,
            self.dtype,
            row_cfg("rope", x.rows, THREADS)?,
            "rope",
            shapes,
            &[
                Arg::Ptr(x.ptr()),
                Arg::Ptr(pos.device.ptr()),
                Arg::Ptr(table.cos.ptr()),
                Arg::Ptr(table.sin.ptr()),
                i64a(x.cols),
                Arg::I32(head_dim as i32),
                Arg::I32(table.half as i32),
                Arg::I32(layout_id),
            ],
        )
    }

    // ---- fused steps -------------------------------------------------------------------------

    fn add_rms_norm(&self, x: &mut CudaTensor, y: &CudaTensor, w: &CudaVector, eps: f32) -> OpResult<CudaTensor> {
        let shapes = || format!("{} += {}, w [{}]", x.shape(), y.shape(), w.len);
        if (x.rows, x.cols) != (y.rows, y.cols) || w.len != x.cols {
            return Err(bad("add_rms_norm", shapes(), "shape mismatch"));
        }
        let out = self.tensor_out("add_rms_norm", x.rows, x.cols)?;
        self.add_rms_norm_to(x, y, w, eps, &out)?;
        Ok(out)
    }

    fn add_rms_norm_moe(
        &self,
        x: &mut CudaTensor,
        y: &CudaTensor,
        w: &CudaVector,
        eps: f32,
        moe: &Moe<CudaWeight, CudaVector>,
    ) -> OpResult<()> {
        if (x.rows, x.cols) != (y.rows, y.cols) || w.len != x.cols {
            let shapes = format!("{} += {}, w [{}]", x.shape(), y.shape(), w.len);
            return Err(bad("add_rms_norm", shapes, "shape mismatch"));
        }
        // h = rms_norm(x + y) is computed inside the MoE (its router kernel, or a separate
        // add_rms_norm launch where that kernel does not apply).
        let h = self.tensor_out("add_rms_norm", x.rows, x.cols)?;
        if let Some(out) = self.moe_into(&h, moe, Some(x), Some(PreNorm { y, w, eps }))? {
            self.add_inplace(x, &out)?;
        }
        Ok(())
    }

    fn split_heads_rope(
        &self,
        x: &CudaTensor,
        heads: usize,
        keep: usize,
        rot: usize,
        layout: RopeLayout,
        pos: &Positions<DevBuf>,
        table: &CudaRope,
    ) -> OpResult<(CudaTensor, CudaTensor)> {
        const OP: &str = "split_heads_rope";
        let shapes =
            || format!("{} heads {heads} keep {keep} rot {rot} {layout:?}, {} positions", x.shape(), pos.len());
        if x.cols != heads * (keep + rot) || x.rows != pos.len() || rot != 2 * table.half || keep == 0 {
            return Err(bad(OP, shapes(), format!("inconsistent shapes (table has {} frequencies)", table.half)));
        }
        if pos.max_visible() > table.max_positions {
            return Err(bad(OP, shapes(), format!("position beyond the table's {}", table.max_positions)));
        }
        let a = self.tensor_out(OP, x.rows, heads * keep)?;
        let b = self.tensor_out(OP, x.rows, heads * rot)?;
        let i32a = |v: usize| Arg::I32(v as i32);
        self.launch(
            &SPLIT_HEADS_ROPE,
            self.dtype,
            LaunchConfig {
                grid_dim: (row_cfg(OP, x.rows, 1)?.grid_dim.0, dev::blocks(heads, SPLIT_HEADS), 1),
                block_dim: (SPLIT_THREADS, SPLIT_HEADS as u32, 1),
                shared_mem_bytes: 0,
            },
            OP,
            shapes,
            &[
                Arg::Ptr(x.ptr()),
                Arg::Ptr(a.ptr()),
                Arg::Ptr(b.ptr()),
                Arg::Ptr(pos.device.ptr()),
                Arg::Ptr(table.cos.ptr()),
                Arg::Ptr(table.sin.ptr()),
                i32a(heads),
                i32a(keep),
                i32a(table.half),
                Arg::I32(rope_layout_id(layout)),
            ],
        )?;
        Ok((a, b))
    }

    fn latent_store(
        &self,
        kv: &CudaTensor,
        r: usize,
        w: &CudaVector,
        eps: f32,
        layout: RopeLayout,
        pos: &Positions<DevBuf>,
        table: &CudaRope,
        cache: &mut CudaTensor,
    ) -> OpResult<()> {
        const OP: &str = "latent_store";
        let shapes = || format!("kv {} r {r}, cache {}, {} positions", kv.shape(), cache.shape(), pos.len());
        let args = latent_store_args(OP, kv, r, w, eps, layout, pos, table, cache)?;
        self.launch(&LATENT_STORE, self.dtype, row_cfg(OP, kv.rows, THREADS)?, OP, shapes, &args)
    }

    fn mla_norms(
        &self,
        q_a: &CudaTensor,
        q_w: &CudaVector,
        kv: &CudaTensor,
        r: usize,
        kv_w: &CudaVector,
        eps: f32,
        layout: RopeLayout,
        pos: &Positions<DevBuf>,
        table: &CudaRope,
        cache: &mut CudaTensor,
    ) -> OpResult<CudaTensor> {
        const OP: &str = "mla_norms";
        let shapes = || {
            format!("q_a {}, kv {} r {r}, cache {}, {} positions", q_a.shape(), kv.shape(), cache.shape(), pos.len())
        };
        if !self.fuse || q_a.rows != kv.rows {
            let qr = self.rms_norm(q_a, q_w, eps)?;
            self.latent_store(kv, r, kv_w, eps, layout, pos, table, cache)?;
            return Ok(qr);
        }
        if q_w.len != q_a.cols {
            return Err(bad(OP, shapes(), "q norm weight length != columns"));
        }
        let store = latent_store_args(OP, kv, r, kv_w, eps, layout, pos, table, cache)?;
        let qr = self.tensor_out(OP, q_a.rows, q_a.cols)?;
        let mut cfg = row_cfg(OP, kv.rows, THREADS)?;
        cfg.grid_dim.1 = 2;
        let mut args = vec![Arg::Ptr(q_a.ptr()), Arg::Ptr(q_w.buf.ptr()), Arg::Ptr(qr.ptr()), i64a(q_a.cols)];
        args.extend(store);
        self.launch(&MLA_NORMS, self.dtype, cfg, OP, shapes, &args)?;
        Ok(qr)
    }

    // ---- matmuls ----------------------------------------------------------------------------

    fn matmul_t(&self, x: &CudaTensor, w: &CudaWeight) -> OpResult<CudaTensor> {
        if w.groups != 1 || x.cols != w.cols {
            return Err(bad("matmul_t", format!("x {} · w {}ᵀ", x.shape(), w.shape()), "inner dims"));
        }
        let out = self.tensor_out("matmul_t", x.rows, w.rows)?;
        self.gemm("matmul_t", x.ptr(), x.rows, x.cols, w.ptr(), w.rows, out.ptr(), false)?;
        Ok(out)
    }

    fn matmul_t2(&self, x: &CudaTensor, w1: &CudaWeight, w2: &CudaWeight) -> OpResult<(CudaTensor, CudaTensor)> {
        const OP: &str = "matmul_t2";
        let shapes = || format!("x {} · w1 {}ᵀ, w2 {}ᵀ", x.shape(), w1.shape(), w2.shape());
        if w1.groups != 1 || w2.groups != 1 || x.cols != w1.cols || x.cols != w2.cols {
            return Err(bad(OP, shapes(), "inner dims"));
        }
        // One launch where both would run the decode GEMV (the same per-column arithmetic).
        let one = |w: &CudaWeight| MatmulT::plain(self.dtype, x.rows, w.rows, x.cols, x.ptr(), w.ptr(), 0);
        let (g1, g2) = (one(w1), one(w2));
        if !(self.gemv_applies(&g1) && self.gemv_applies(&g2) && w1.rows + w2.rows <= i32::MAX as usize) {
            return Ok((self.matmul_t(x, w1)?, self.matmul_t(x, w2)?));
        }
        let y1 = self.tensor_out(OP, x.rows, w1.rows)?;
        let y2 = self.tensor_out(OP, x.rows, w2.rows)?;
        let i32a = |v: usize| Arg::I32(v as i32);
        self.launch(
            if self.gemv_u4 { &GEMV2_U4 } else { &GEMV2 },
            DType::BF16,
            LaunchConfig {
                grid_dim: (dev::blocks(w1.rows + w2.rows, GEMV_WARPS), 1, 1),
                block_dim: (32 * GEMV_WARPS as u32, 1, 1),
                shared_mem_bytes: 0,
            },
            OP,
            shapes,
            &[
                Arg::Ptr(x.ptr()),
                i32a(x.rows),
                i32a(x.cols),
                Arg::Ptr(w1.ptr()),
                Arg::Ptr(y1.ptr()),
                i32a(w1.rows),
                Arg::Ptr(w2.ptr()),
                Arg::Ptr(y2.ptr()),
                i32a(w2.rows),
            ],
        )?;
        Ok((y1, y2))
    }

    fn matmul_heads(&self, x: &CudaTensor, w: &CudaWeight) -> OpResult<CudaTensor> {
        let (heads, n_out, n_in) = (w.groups, w.rows, w.cols);
        if x.cols != heads * n_in {
            return Err(bad("matmul_heads", format!("x {} · w {}ᵀ", x.shape(), w.shape()), "x.cols != heads·in"));
        }
        let out = self.tensor_out("matmul_heads", x.rows, heads * n_out)?;
        self.matmul("matmul_heads", &self.heads_gemm(x.rows, x.ptr(), w, out.ptr()))?;
        Ok(out)
    }

    // ---- DSA --------------------------------------------------------------------------------

    fn indexer_topk(
        &self,
        q: &CudaTensor,
        head_w: &CudaTensor,
        keys: &CudaTensor,
        pos: &Positions<DevBuf>,
        topk: usize,
        scale: f32,
    ) -> OpResult<CudaSelection> {
        let heads = head_w.cols;
        let shapes = || format!("q {}, head_w {}, keys {}, topk {topk}", q.shape(), head_w.shape(), keys.shape());
        if heads == 0 || !q.cols.is_multiple_of(heads) || q.cols / heads != keys.cols || q.rows != head_w.rows {
            return Err(bad("indexer_topk", shapes(), "inconsistent shapes"));
        }
        if q.rows != pos.len() || pos.max_visible() > keys.rows {
            return Err(bad("indexer_topk", shapes(), format!("{} keys visible", pos.max_visible())));
        }
        let args = indexer::IndexerArgs {
            dtype: self.dtype,
            q: q.ptr(),
            head_w: head_w.ptr(),
            keys: keys.ptr(),
            pos: pos.device.ptr(),
            rows: q.rows,
            heads,
            d: keys.cols,
            max_visible: pos.max_visible(),
            topk,
            scale,
        };
        let buf = indexer::indexer_topk(&self.dev, &args)?;
        Ok(CudaSelection { buf, rows: q.rows, k: topk.min(pos.max_visible()) })
    }

    fn indexer_fp8_quant_inplace(&self, x: &mut CudaTensor, block: usize) -> OpResult<()> {
        crate::fp8::hadamard_fp8_inplace(&self.dev, x.dtype, x.ptr(), x.rows, x.cols, block)
    }

    fn sparse_mla(
        &self,
        q_lat: &CudaTensor,
        q_pe: &CudaTensor,
        cache: &CudaTensor,
        sel: &CudaSelection,
        scale: f32,
    ) -> OpResult<CudaTensor> {
        let mut args = self.mla_args(q_lat, q_pe, cache, sel, scale)?;
        let out = self.tensor_out("sparse_mla", args.rows, args.heads * args.r)?;
        args.out = out.ptr();
        mla::sparse_mla_with(&self.dev, &args, self.mla_opts())?;
        Ok(out)
    }

    fn sparse_mla_uv(
        &self,
        q_lat: &CudaTensor,
        q_pe: &CudaTensor,
        cache: &CudaTensor,
        sel: &CudaSelection,
        scale: f32,
        w_uv: &CudaWeight,
    ) -> OpResult<CudaTensor> {
        let mut args = self.mla_args(q_lat, q_pe, cache, sel, scale)?;
        let (heads, n_out, n_in) = (w_uv.groups, w_uv.rows, w_uv.cols);
        if heads != args.heads || n_in != args.r {
            let shapes = format!("sparse_mla [{}, {}×{}] · w_uv {}ᵀ", args.rows, args.heads, args.r, w_uv.shape());
            return Err(bad("matmul_heads", shapes, "x.cols != heads·in"));
        }
        let o_lat = self.tensor_out("sparse_mla", args.rows, args.heads * args.r)?;
        args.out = o_lat.ptr();
        let out = self.tensor_out("matmul_heads", args.rows, heads * n_out)?;
        let g = self.heads_gemm(args.rows, o_lat.ptr(), w_uv, out.ptr());
        // The combine merged into the projection only where the projection is the decode GEMV
        // (the same sums); otherwise, or without split-k, the two ops.
        let projected = if self.fuse && self.gemv_applies(&g) {
            let uv = mla::UvArgs { w: w_uv.ptr(), n_out, y: out.ptr() };
            mla::sparse_mla_uv_with(&self.dev, &args, uv, self.mla_opts())? // the attention ran; projected or not
        } else {
            mla::sparse_mla_with(&self.dev, &args, self.mla_opts())?;
            false
        };
        if !projected {
            self.matmul("matmul_heads", &g)?;
        }
        Ok(out)
    }

    fn gqa_attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        heads: usize,
        kv_heads: usize,
        pos: &Positions<DevBuf>,
        sel: Option<&CudaSelection>,
        scale: f32,
    ) -> OpResult<CudaTensor> {
        const OP: &str = "gqa_attention";
        let shapes = || {
            format!(
                "q {}, k {}, v {}, heads {heads}/{kv_heads}, {} positions{}",
                q.shape(),
                k.shape(),
                v.shape(),
                pos.len(),
                sel.map_or(String::new(), |s| format!(", selection [{}, {}]", s.rows, s.k))
            )
        };
        let ok = heads > 0
            && kv_heads > 0
            && heads.is_multiple_of(kv_heads)
            && q.cols.is_multiple_of(heads)
            && k.cols == kv_heads * (q.cols / heads)
            && v.cols.is_multiple_of(kv_heads)
            && k.rows == v.rows
            && q.rows == pos.len()
            && sel.is_none_or(|s| s.rows == q.rows);
        if !ok {
            return Err(bad(OP, shapes(), "inconsistent shapes"));
        }
        let (d, dv) = (q.cols / heads, v.cols / kv_heads);
        if d > 256 || dv > 512 {
            return Err(bad(OP, shapes(), "head dims above 256 (q/k) or 512 (v) are not supported"));
        }
        if pos.max_visible() > k.rows {
            return Err(bad(OP, shapes(), "a position beyond the cache"));
        }
        let out = self.tensor_out(OP, q.rows, heads * dv)?;
        if q.rows == 0 {
            return Ok(out);
        }
        let heads_u32 = u32::try_from(heads).map_err(|_| bad(OP, shapes(), "too many heads"))?;
        let cfg = LaunchConfig { grid_dim: (q.rows as u32, heads_u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let (sel_ptr, nsel) = sel.map_or((0, 0), |s| (s.buf.ptr(), s.k));
        let i32a = |x: usize| Arg::I32(x as i32);
        self.launch(
            &GQA_ATTN,
            self.dtype,
            cfg,
            OP,
            shapes,
            &[
                Arg::Ptr(q.ptr()),
                Arg::Ptr(k.ptr()),
                Arg::Ptr(v.ptr()),
                Arg::Ptr(pos.device.ptr()),
                Arg::Ptr(sel_ptr),
                Arg::Ptr(out.ptr()),
                i32a(heads),
                i32a(kv_heads),
                i32a(d),
                i32a(dv),
                i32a(nsel),
                Arg::F32(scale),
            ],
        )?;
        Ok(out)
    }

    // ---- FFN --------------------------------------------------------------------------------

    fn mlp(&self, x: &CudaTensor, mlp: &Mlp<CudaWeight>) -> OpResult<CudaTensor> {
        let inter = mlp.gate.rows;
        let hidden = x.cols;
        let ok = [&mlp.gate, &mlp.up].iter().all(|w| w.groups == 1 && w.rows == inter && w.cols == hidden)
            && mlp.down.groups == 1
            && mlp.down.rows == hidden
            && mlp.down.cols == inter;
        if !ok {
            return Err(bad(
                "mlp",
                format!("x {}, gate {}, up {}, down {}", x.shape(), mlp.gate.shape(), mlp.up.shape(), mlp.down.shape()),
                "inconsistent shapes",
            ));
        }
        let out = self.tensor_out("mlp", x.rows, hidden)?;
        self.swiglu("mlp", x.ptr(), x.rows, hidden, mlp.gate.ptr(), mlp.up.ptr(), mlp.down.ptr(), inter, out.ptr())?;
        Ok(out)
    }

    fn moe(&self, x: &CudaTensor, moe: &Moe<CudaWeight, CudaVector>) -> OpResult<CudaTensor> {
        self.moe_into(x, moe, None, None)?.ok_or_else(|| bad("moe", x.shape(), "no output"))
    }

    fn moe_residual(
        &self,
        residual: &mut CudaTensor,
        x: &CudaTensor,
        moe: &Moe<CudaWeight, CudaVector>,
    ) -> OpResult<()> {
        if (residual.rows, residual.cols) != (x.rows, x.cols) {
            return Err(bad("moe", format!("residual {} += moe(x {})", residual.shape(), x.shape()), "shape mismatch"));
        }
        if let Some(y) = self.moe_into(x, moe, Some(residual), None)? {
            self.add_inplace(residual, &y)?;
        }
        Ok(())
    }

    // ---- sampling ---------------------------------------------------------------------------

    fn argmax_rows(&self, x: &CudaTensor) -> OpResult<Vec<u32>> {
        const OP: &str = "argmax_rows";
        if x.rows == 0 {
            return Ok(Vec::new());
        }
        if x.cols > i32::MAX as usize {
            return Err(bad(OP, x.shape(), "rows longer than the kernel's i32 indices"));
        }
        let out = self.out_buf(OP, x.rows * 4)?;
        self.launch(
            &ARGMAX_ROWS,
            self.dtype,
            row_cfg(OP, x.rows, 1024)?,
            OP,
            || x.shape(),
            &[Arg::Ptr(x.ptr()), Arg::Ptr(out.ptr()), i64a(x.cols)],
        )?;
        self.dev.download::<u32>(OP, &out, x.rows)
    }

    // ---- loss -------------------------------------------------------------------------------

    fn nll(&self, logits: &CudaTensor, targets: &[u32]) -> OpResult<Vec<f64>> {
        let shapes = || format!("logits {}, {} targets", logits.shape(), targets.len());
        if targets.len() != logits.rows {
            return Err(bad("nll", shapes(), "one target per row"));
        }
        if let Some(&t) = targets.iter().find(|&&t| t as usize >= logits.cols) {
            return Err(bad("nll", shapes(), format!("target {t} ≥ vocabulary {}", logits.cols)));
        }
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let tg = self.dev.upload("nll", targets)?;
        let out = self.out_buf("nll", targets.len() * 4)?;
        self.launch(
            &NLL,
            self.dtype,
            row_cfg("nll", logits.rows, 1024)?,
            "nll",
            shapes,
            &[Arg::Ptr(logits.ptr()), Arg::Ptr(tg.ptr()), Arg::Ptr(out.ptr()), i64a(logits.cols)],
        )?;
        let v = self.dev.download::<f32>("nll", &out, targets.len())?;
        Ok(v.into_iter().map(f64::from).collect())
    }

    // ---- timing and memory ------------------------------------------------------------------

    fn mark(&self) -> OpResult<CudaEvent> {
        self.dev
            .stream
            .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| bad("mark", "", format!("{e:?}")))
    }

    fn elapsed(&self, from: &CudaEvent, to: &CudaEvent) -> OpResult<Duration> {
        let ms = from.elapsed_ms(to).map_err(|e| bad("elapsed", "", format!("{e:?}")))?;
        Ok(Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3))
    }

    fn synchronize(&self) -> OpResult<()> {
        self.dev.sync("synchronize")
    }

    fn memory(&self) -> MemoryStats {
        let m = self.dev.mem();
        MemoryStats { current: m.current(), peak: m.peak(), total: Some(self.dev.total_memory) }
    }

    fn reset_peak_memory(&self) {
        self.dev.mem().reset_peak();
    }

    fn profiler(&self, on: bool) -> OpResult<()> {
        let r = if on { cudarc::driver::profiler_start() } else { cudarc::driver::profiler_stop() };
        r.map_err(|e| bad("profiler", if on { "start" } else { "stop" }, format!("{e:?}")))
    }

    fn graph_begin(&self) -> OpResult<bool> {
        if !self.graphs {
            return Ok(false);
        }
        // The recording's arena: a decode step's live buffers (the largest are the indexer's and the
        // sparse MLA's workspaces, a few MB) with room to spare, within an eighth of free memory.
        let mb = std::env::var("INDEXCACHE_GRAPH_ARENA_MB").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(512);
        let free = self.dev.ctx.mem_get_info().map_or(usize::MAX, |(f, _)| f);
        self.dev.begin_capture((mb << 20).min(free / 8))?;
        Ok(true)
    }

    fn graph_end(&self) -> OpResult<CudaStepGraph> {
        let (graph, arena) = self.dev.end_capture()?;
        Ok(CudaStepGraph { graph, _arena: arena })
    }

    fn graph_replay(&self, g: &mut CudaStepGraph) -> OpResult<()> {
        g.graph.launch().map_err(|e| bad("graph_replay", "", format!("{e:?}")))
    }
}

/// A recorded decode step: a CUDA graph on the backend's stream and the arena its buffers live in
/// (dropped after the graph).
pub struct CudaStepGraph {
    graph: cudarc::driver::CudaGraph,
    _arena: Arc<crate::dev::CaptureArena>,
}

// SAFETY: the graph and its executable are only touched through `&mut CudaStepGraph`
// ([`Backend::graph_replay`]) or when dropped, so no two threads use them at once; the CUDA
// driver API is callable from any thread with the context bound (cudarc binds it).
unsafe impl Send for CudaStepGraph {}

/// The checked kernel arguments of a latent store (`latent_store`, and the second half of
/// `mla_norms`): kv, w, cache, positions, RoPE table, r, half, layout, eps.
#[allow(clippy::too_many_arguments)]
fn latent_store_args(
    op: &'static str,
    kv: &CudaTensor,
    r: usize,
    w: &CudaVector,
    eps: f32,
    layout: RopeLayout,
    pos: &Positions<DevBuf>,
    table: &CudaRope,
    cache: &CudaTensor,
) -> OpResult<[Arg; 10]> {
    let shapes = || format!("kv {} r {r}, cache {}, {} positions", kv.shape(), cache.shape(), pos.len());
    if kv.cols != r + 2 * table.half || cache.cols != kv.cols || w.len != r || kv.rows != pos.len() || r == 0 {
        return Err(bad(op, shapes(), format!("inconsistent shapes (table has {} frequencies)", table.half)));
    }
    if pos.max_visible() > cache.rows || pos.max_visible() > table.max_positions {
        return Err(bad(op, shapes(), "position beyond the cache or the RoPE table"));
    }
    Ok([
        Arg::Ptr(kv.ptr()),
        Arg::Ptr(w.buf.ptr()),
        Arg::Ptr(cache.ptr()),
        Arg::Ptr(pos.device.ptr()),
        Arg::Ptr(table.cos.ptr()),
        Arg::Ptr(table.sin.ptr()),
        Arg::I32(r as i32),
        Arg::I32(table.half as i32),
        Arg::I32(rope_layout_id(layout)),
        Arg::F32(eps),
    ])
}

/// The residual add + norm a MoE block starts with (`add_rms_norm_moe`).
#[derive(Clone, Copy)]
struct PreNorm<'a> {
    y: &'a CudaTensor,
    w: &'a CudaVector,
    eps: f32,
}

/// Exclusive prefix sum of the per-expert counts: `E + 1` entries, the last one the total.
fn expert_offsets(counts: &[i32]) -> Vec<i32> {
    let mut off = Vec::with_capacity(counts.len() + 1);
    let mut acc = 0i32;
    off.push(0);
    for &c in counts {
        acc += c;
        off.push(acc);
    }
    off
}

impl CudaBackend {
    /// The per-head product `x [rows, H·in] · w [H, out, in]ᵀ → y [rows, H·out]` as one batched
    /// matmul (`matmul_heads`, and the W_UV projection of `sparse_mla_uv`).
    fn heads_gemm(&self, rows: usize, x: u64, w: &CudaWeight, y: u64) -> MatmulT {
        let (heads, n_out, n_in) = (w.groups, w.rows, w.cols);
        MatmulT {
            dtype: self.dtype,
            out_f32: false,
            rows,
            n_out,
            n_in,
            x,
            ldx: heads * n_in,
            w: w.ptr(),
            ldw: n_in,
            y,
            ldy: heads * n_out,
            batch: heads,
            stride_x: n_in,
            stride_w: n_out * n_in,
            stride_y: n_out,
        }
    }

    /// The checked arguments of a sparse-MLA call (`out` left 0 for the caller).
    fn mla_args(
        &self,
        q_lat: &CudaTensor,
        q_pe: &CudaTensor,
        cache: &CudaTensor,
        sel: &CudaSelection,
        scale: f32,
    ) -> OpResult<mla::MlaArgs> {
        let shapes = || format!("q_lat {}, q_pe {}, cache {}", q_lat.shape(), q_pe.shape(), cache.shape());
        let width = cache.cols;
        let heads = (q_lat.cols + q_pe.cols).checked_div(width).unwrap_or(0);
        if heads == 0
            || !q_lat.cols.is_multiple_of(heads)
            || !q_pe.cols.is_multiple_of(heads)
            || q_lat.rows != q_pe.rows
        {
            return Err(bad("sparse_mla", shapes(), "inconsistent shapes"));
        }
        let (r, p) = (q_lat.cols / heads, q_pe.cols / heads);
        if r + p != width || sel.rows != q_lat.rows {
            return Err(bad("sparse_mla", shapes(), format!("R {r} + P {p} != {width}, or selection rows")));
        }
        Ok(mla::MlaArgs {
            dtype: self.dtype,
            q_lat: q_lat.ptr(),
            q_pe: q_pe.ptr(),
            cache: cache.ptr(),
            sel: sel.buf.ptr(),
            rows: q_lat.rows,
            heads,
            r,
            p,
            k: sel.k,
            scale,
            out: 0,
        })
    }

    /// `x += y; out = rms_norm(x)` into a given output (`add_rms_norm`, and the MoE's pre-norm
    /// where its router kernel cannot take it). Shapes are checked by the callers.
    fn add_rms_norm_to(
        &self,
        x: &mut CudaTensor,
        y: &CudaTensor,
        w: &CudaVector,
        eps: f32,
        out: &CudaTensor,
    ) -> OpResult<()> {
        let shapes = || format!("{} += {}, w [{}]", x.shape(), y.shape(), w.len);
        self.launch(
            &ADD_RMS_NORM,
            self.dtype,
            row_cfg("add_rms_norm", x.rows, THREADS)?,
            "add_rms_norm",
            shapes,
            &[
                Arg::Ptr(x.ptr()),
                Arg::Ptr(y.ptr()),
                Arg::Ptr(w.buf.ptr()),
                Arg::Ptr(out.ptr()),
                i64a(x.cols),
                Arg::F32(eps),
            ],
        )
    }

    /// The MoE block: its output (`Some`), or — decode-sized, with `residual` given — nothing,
    /// the output added to `residual` inside the MoE's last kernel (as `add_inplace` would).
    /// With `pre` (and `residual`), `x` is an output: first `residual += pre.y`, `x =
    /// rms_norm(residual, pre.w)` (`add_rms_norm`), inside the router kernel where it applies.
    fn moe_into(
        &self,
        x: &CudaTensor,
        moe: &Moe<CudaWeight, CudaVector>,
        mut residual: Option<&mut CudaTensor>,
        pre: Option<PreNorm<'_>>,
    ) -> OpResult<Option<CudaTensor>> {
        const OP: &str = "moe";
        let (t, hidden) = (x.rows, x.cols);
        let (n_exp, inter) = (moe.experts.n, moe.experts.inter);
        let r = moe.routing;
        let shapes = || {
            format!(
                "x {}, router {}, gate_up {}, down {}, {r:?}",
                x.shape(),
                moe.router.shape(),
                moe.experts.gate_up.shape(),
                moe.experts.down.shape()
            )
        };
        let (gu, dn) = (&moe.experts.gate_up, &moe.experts.down);
        let shapes_ok = moe.router.groups == 1
            && moe.router.rows == n_exp
            && moe.router.cols == hidden
            && moe.score_bias.len == n_exp
            && (gu.groups, gu.rows, gu.cols) == (n_exp, 2 * inter, hidden)
            && (dn.groups, dn.rows, dn.cols) == (n_exp, hidden, inter);
        if !shapes_ok {
            return Err(bad(OP, shapes(), "inconsistent shapes"));
        }
        let per_group = n_exp.checked_div(r.n_group).unwrap_or(0);
        if r.n_group == 0
            || !n_exp.is_multiple_of(r.n_group)
            || per_group < 2
            || r.topk_group == 0
            || r.topk_group > r.n_group
            || r.top_k == 0
            || r.top_k > r.topk_group * per_group
            || n_exp > ROUTE_MAX_EXPERTS
        {
            return Err(bad(OP, shapes(), "unsupported routing parameters"));
        }
        if t == 0 {
            return self.zeros(0, hidden).map(Some);
        }
        let s = self.dtype.size();
        let k = r.top_k;
        let n_pairs = t * k;

        // Decode-sized inputs: grouped GEMVs that read the expert ids on the device — no host
        // synchronisation, three launches (`moe_decode`). `INDEXCACHE_MOE_DECODE=0` turns it off.
        // A shared expert as wide as the routed ones (`[inter, hidden]` gate/up, `[hidden, inter]`
        // down) is fused into the same two kernels as one more expert slot per token (weight 1);
        // one of another shape runs as a separate MLP whose output the combine adds.
        let fused = moe.shared.as_ref().filter(|m| {
            let dims = |w: &CudaWeight| (w.groups, w.rows, w.cols, w.dtype);
            dims(&m.gate) == (1, inter, hidden, self.dtype)
                && dims(&m.up) == (1, inter, hidden, self.dtype)
                && dims(&m.down) == (1, hidden, inter, self.dtype)
        });
        let mut args = moe_decode::MoeSmallArgs {
            dtype: self.dtype,
            x: x.ptr(),
            ids: 0, // set below (fresh buffers: aligned, as `check` asks)
            weights: 0,
            gate_up: gu.ptr(),
            down: dn.ptr(),
            shared: 0,
            shared_gate: fused.map_or(0, |m| m.gate.ptr()),
            shared_up: fused.map_or(0, |m| m.up.ptr()),
            shared_down: fused.map_or(0, |m| m.down.ptr()),
            out: 0,
            accumulate: false,
            pre_y: 0,
            pre_w: 0,
            pre_eps: 0.0,
            tokens: t,
            hidden,
            inter,
            n_experts: n_exp,
            top_k: k,
        };
        let decode = t <= moe_decode::MAX_DECODE_TOKENS && self.moe_decode && moe_decode::check(&args).is_ok();

        // 1-2. Router logits in f32, routing: ids/weights [T, k] (and counts per expert for the
        // grouped-GEMM path). Decode rows on the GEMV: one launch (`router_route`).
        let logits = self.out_buf(OP, t * n_exp * 4)?;
        let ids = self.out_buf(OP, n_pairs * 4)?;
        let wts = self.out_buf(OP, n_pairs * 4)?;
        let per_warp_bytes = (3 * n_exp + 2 * r.n_group + k) * 4;
        if per_warp_bytes > 48 * 1024 / GEMV_WARPS {
            return Err(bad(OP, shapes(), "too many experts for the routing kernel's shared memory"));
        }
        let mut router = MatmulT::plain(self.dtype, t, n_exp, hidden, x.ptr(), moe.router.ptr(), logits.ptr());
        router.out_f32 = true;
        let route_args = [Arg::Ptr(moe.score_bias.buf.ptr()), Arg::Ptr(ids.ptr()), Arg::Ptr(wts.ptr())];
        let routing = [
            Arg::I32(n_exp as i32),
            Arg::I32(r.n_group as i32),
            Arg::I32(r.topk_group as i32),
            Arg::I32(k as i32),
            Arg::I32(r.norm_topk_prob as i32),
            Arg::F32(r.routed_scaling_factor),
        ];
        // With a pre-norm (`add_rms_norm_moe`): inside the router kernel where it applies (its
        // shared memory holds the normalised rows next to norm_row's 32 KB staging), else first.
        let router_gemv = decode && t <= GEMV_WARPS && self.gemv_applies(&router);
        let scratch_floats = (GEMV_WARPS * per_warp_bytes / 4).next_multiple_of(4);
        let fused_smem = scratch_floats * 4 + t * hidden * s;
        let fused_pre = pre.filter(|_| {
            router_gemv && self.fuse && residual.is_some() && fused_smem + ROUTER_NORM_STATIC_SMEM <= 48 * 1024
        });
        // With the fused pre-norm at decode, the expert kernels may redo it themselves
        // (`MoeSmallArgs::pre_y`): the router kernel then leaves x and h unwritten.
        let experts_pre = fused_pre.filter(|p| {
            let res = residual.as_ref().map_or(0, |r| r.ptr());
            let a = moe_decode::MoeSmallArgs {
                x: res,
                out: res,
                accumulate: true,
                pre_y: p.y.ptr(),
                pre_w: p.w.buf.ptr(),
                pre_eps: p.eps,
                ..args
            };
            self.moe_pre && (moe.shared.is_none() || fused.is_some()) && moe_decode::check(&a).is_ok()
        });
        if let (Some(p), None) = (pre, fused_pre) {
            let res = residual.as_deref_mut().ok_or_else(|| bad(OP, shapes(), "a pre-norm needs the residual"))?;
            self.add_rms_norm_to(res, p.y, p.w, p.eps, x)?;
        }
        // The arguments both router-GEMV kernels take after their input rows: [T, hidden], the
        // router weight, the logits, the routing outputs, the done counter, the routing parameters.
        let gemv_route = || {
            let head =
                [Arg::I32(t as i32), Arg::I32(hidden as i32), Arg::Ptr(moe.router.ptr()), Arg::Ptr(logits.ptr())];
            head.into_iter().chain(route_args).chain([Arg::Ptr(self.route_done.ptr())]).chain(routing)
        };
        let counts = if let (Some(p), Some(res)) = (fused_pre, residual.as_deref_mut()) {
            let mut a = vec![
                Arg::Ptr(res.ptr()),
                Arg::Ptr(p.y.ptr()),
                Arg::Ptr(p.w.buf.ptr()),
                Arg::F32(p.eps),
                Arg::Ptr(x.ptr()),
            ];
            a.extend(gemv_route());
            a.push(Arg::I32(scratch_floats as i32));
            a.push(Arg::I32(i32::from(experts_pre.is_none()))); // store x + y and h
            let cfg = LaunchConfig {
                grid_dim: (dev::blocks(n_exp, ROUTER_WARPS), 1, 1),
                block_dim: (32 * ROUTER_WARPS as u32, 1, 1),
                shared_mem_bytes: fused_smem as u32,
            };
            self.launch(&ADD_NORM_ROUTER_ROUTE, DType::F32, cfg, OP, shapes, &a)?;
            None
        } else if router_gemv {
            let mut a = vec![Arg::Ptr(x.ptr())];
            a.extend(gemv_route());
            let cfg = LaunchConfig {
                grid_dim: (dev::blocks(n_exp, GEMV_WARPS), 1, 1),
                block_dim: (32 * GEMV_WARPS as u32, 1, 1),
                shared_mem_bytes: (GEMV_WARPS * per_warp_bytes) as u32,
            };
            self.launch(&ROUTER_ROUTE, DType::F32, cfg, OP, shapes, &a)?;
            None
        } else {
            self.gemm(OP, x.ptr(), t, hidden, moe.router.ptr(), n_exp, logits.ptr(), true)?;
            // Per-expert counts only where the host needs them (the grouped-GEMM path below).
            let counts = if decode { None } else { Some(self.dev.alloc_zeroed(OP, n_exp * 4)?) };
            let warps = ROUTE_WARPS;
            let cfg = LaunchConfig {
                grid_dim: (dev::blocks(t, warps), 1, 1),
                block_dim: (32 * warps as u32, 1, 1),
                shared_mem_bytes: (warps * per_warp_bytes) as u32,
            };
            let mut a = vec![Arg::Ptr(logits.ptr())];
            a.extend(route_args);
            a.push(Arg::Ptr(counts.as_ref().map_or(0, |c| c.ptr())));
            a.push(Arg::I32(t as i32));
            a.extend(routing);
            self.launch(&MOE_ROUTE, DType::F32, cfg, OP, shapes, &a)?;
            counts
        };
        drop(logits);

        if decode {
            args.ids = ids.ptr();
            args.weights = wts.ptr();
            let shared = match (&moe.shared, fused) {
                (Some(m), None) => Some(self.mlp(x, m)?),
                _ => None,
            };
            args.shared = shared.as_ref().map_or(0, |s| s.ptr());
            if let Some(res) = residual {
                args.out = res.ptr();
                args.accumulate = true;
                if let Some(p) = experts_pre {
                    (args.x, args.pre_y, args.pre_w, args.pre_eps) = (res.ptr(), p.y.ptr(), p.w.buf.ptr(), p.eps);
                }
                moe_decode::moe_small(&self.dev, &args)?;
                return Ok(None);
            }
            let out = self.tensor_out(OP, t, hidden)?;
            args.out = out.ptr();
            moe_decode::moe_small(&self.dev, &args)?;
            return Ok(Some(out));
        }
        let counts = counts.ok_or_else(|| bad(OP, shapes(), "routing counts missing"))?;

        // 3. Counts to the host (the one synchronisation of the layer), offsets back.
        let counts_h = self.dev.download::<i32>(OP, &counts, n_exp)?;
        let offsets = expert_offsets(&counts_h);
        if offsets[n_exp] as usize != n_pairs {
            return Err(bad(OP, shapes(), format!("routing produced {} picks for {n_pairs}", offsets[n_exp])));
        }
        let offsets_d = self.dev.upload(OP, &offsets[..n_exp])?;

        // 4. Stable slots: expert-contiguous, token order within an expert.
        let slot_of = self.out_buf(OP, n_pairs * 4)?;
        let token_of_slot = self.out_buf(OP, n_pairs * 4)?;
        self.launch(
            &MOE_SLOTS,
            DType::F32,
            row_cfg(OP, n_exp, THREADS)?,
            OP,
            shapes,
            &[
                Arg::Ptr(ids.ptr()),
                Arg::Ptr(offsets_d.ptr()),
                Arg::Ptr(slot_of.ptr()),
                Arg::Ptr(token_of_slot.ptr()),
                Arg::I32(n_pairs as i32),
                Arg::I32(k as i32),
            ],
        )?;
        drop(ids);

        // 5. Gather the token rows, expert GEMMs, SwiGLU.
        let xs = self.out_buf(OP, n_pairs * hidden * s)?;
        self.launch(
            &GATHER_ROWS,
            self.dtype,
            row_cfg(OP, n_pairs, THREADS)?,
            OP,
            shapes,
            &[Arg::Ptr(x.ptr()), Arg::Ptr(token_of_slot.ptr()), Arg::Ptr(xs.ptr()), i64a(hidden)],
        )?;
        drop(token_of_slot);
        let h = self.out_buf(OP, n_pairs * 2 * inter * s)?;
        for e in (0..n_exp).filter(|&e| counts_h[e] > 0) {
            let (off, n) = (offsets[e] as usize, counts_h[e] as usize);
            let xe = xs.ptr() + (off * hidden * s) as u64;
            let he = h.ptr() + (off * 2 * inter * s) as u64;
            self.gemm(OP, xe, n, hidden, gu.group_ptr(e), 2 * inter, he, false)?;
        }
        drop(xs);
        let a = self.out_buf(OP, n_pairs * inter * s)?;
        self.silu_mul(OP, h.ptr(), 2 * inter, h.ptr() + (inter * s) as u64, 2 * inter, a.ptr(), n_pairs, inter)?;
        drop(h);
        let y = self.out_buf(OP, n_pairs * hidden * s)?;
        for e in (0..n_exp).filter(|&e| counts_h[e] > 0) {
            let (off, n) = (offsets[e] as usize, counts_h[e] as usize);
            let ae = a.ptr() + (off * inter * s) as u64;
            let ye = y.ptr() + (off * hidden * s) as u64;
            self.gemm(OP, ae, n, inter, dn.group_ptr(e), hidden, ye, false)?;
        }
        drop(a);

        // 6. Shared experts, then the weighted combine (+ shared) in f32.
        let shared = match &moe.shared {
            Some(m) => Some(self.mlp(x, m)?),
            None => None,
        };
        let out = self.tensor_out(OP, t, hidden)?;
        self.launch(
            &MOE_COMBINE,
            self.dtype,
            row_cfg(OP, t, THREADS)?,
            OP,
            shapes,
            &[
                Arg::Ptr(y.ptr()),
                Arg::Ptr(slot_of.ptr()),
                Arg::Ptr(wts.ptr()),
                Arg::Ptr(shared.as_ref().map_or(0, |s| s.ptr())),
                Arg::Ptr(out.ptr()),
                Arg::I32(k as i32),
                i64a(hidden),
            ],
        )?;
        Ok(Some(out))
    }
}

// ---- benchmarks -----------------------------------------------------------------------------------

/// Median device time of `f` over `reps` runs (after two warm-up runs), in ms, timed with events.
fn time_ms(b: &CudaBackend, reps: usize, mut f: impl FnMut() -> OpResult<()>) -> OpResult<f64> {
    for _ in 0..2 {
        f()?;
    }
    let mut ms = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = b.mark()?;
        f()?;
        let end = b.mark()?;
        ms.push(b.elapsed(&start, &end)?.as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

fn mem_bench(kernel: &str, shape: String, ms: f64, bytes: f64) -> KernelBench {
    let gbps = bytes / (ms * 1e-3) / 1e9;
    KernelBench { kernel: kernel.into(), shape, ms, tflops: 0.0, gbps, of_ceiling: gbps / CEILING_GBPS }
}

fn flop_bench(kernel: &str, shape: String, ms: f64, flops: f64, bytes: f64) -> KernelBench {
    let tflops = flops / (ms * 1e-3) / 1e12;
    let gbps = bytes / (ms * 1e-3) / 1e9;
    KernelBench { kernel: kernel.into(), shape, ms, tflops, gbps, of_ceiling: tflops / CEILING_BF16_TFLOPS }
}

/// Benchmarks of this module's ops at DeepSeek-V3.2-like shapes, in bf16 (fast mode): memory-bound
/// kernels against the copy ceiling, GEMM-bound ops against the bf16 tensor-core ceiling. Every
/// input is bigger than L2 (50 MB) except where noted in the shape. Median of 7 repeats.
pub fn bench(dev: &Arc<Dev>) -> OpResult<Vec<KernelBench>> {
    let b = CudaBackend::from_dev(dev.clone(), DType::BF16)?;
    let rnd = |seed: u64, groups: usize, rows: usize, cols: usize, bound: f32| {
        b.weight(WeightInit::Random { seed, bound }, groups, rows, cols)
    };
    // Activations come from a random [1, rows, cols] weight through `rows` (a device copy).
    let act = |seed: u64, rows: usize, cols: usize| -> OpResult<CudaTensor> {
        let w = rnd(seed, 1, rows, cols, 1.0)?;
        Ok(CudaTensor { buf: w.buf, rows, cols, dtype: DType::BF16 })
    };
    const REPS: usize = 7;
    let mut out = Vec::new();
    let (t, hidden) = (8192usize, 7168usize);
    let n = (t * hidden) as f64;

    let x = act(1, t, hidden)?;
    let y = act(2, t, hidden)?;
    let mut xm = b.copy(&x)?;
    let ms = time_ms(&b, REPS, || b.add_inplace(&mut xm, &y))?;
    out.push(mem_bench("add", format!("[{t}, {hidden}] bf16"), ms, 3.0 * n * 2.0));

    let w = b.vector(&vec![1.0; hidden])?;
    let ms = time_ms(&b, REPS, || b.rms_norm(&x, &w, 1e-6).map(drop))?;
    out.push(mem_bench("rms_norm", format!("[{t}, {hidden}] bf16"), ms, 2.0 * n * 2.0));

    let (heads, p) = (128usize, 64usize);
    let table =
        RopeTable::new(&(0..p / 2).map(|i| 10000f32.powf(-((2 * i) as f32) / p as f32)).collect::<Vec<_>>(), 1.0, t);
    let rope = b.rope_table(&table)?;
    let pos = b.positions(&(0..t).collect::<Vec<_>>())?;
    let mut q_pe = act(3, t, heads * p)?;
    let ms = time_ms(&b, REPS, || b.rope_inplace(&mut q_pe, p, p, RopeLayout::Interleaved, &pos, &rope))?;
    out.push(mem_bench("rope", format!("[{t}, {heads}×{p}] interleaved bf16"), ms, 2.0 * (t * heads * p) as f64 * 2.0));

    let q = act(4, t, heads * 192)?;
    let ms = time_ms(&b, REPS, || b.head_columns(&q, heads, 192, 0, 128).map(drop))?;
    out.push(mem_bench(
        "head_columns",
        format!("[{t}, {heads}×192] → ×128 bf16"),
        ms,
        2.0 * (t * heads * 128) as f64 * 2.0,
    ));

    let vocab = 129_280usize;
    let table_w = rnd(5, 1, vocab, hidden, 1.0)?;
    let ids: Vec<u32> = (0..t as u32).map(|i| i.wrapping_mul(2_654_435_761) % vocab as u32).collect();
    let ms = time_ms(&b, REPS, || b.embedding(&table_w, &ids).map(drop))?;
    out.push(mem_bench("embedding", format!("{t} ids of [{vocab}, {hidden}] bf16"), ms, 2.0 * n * 2.0));
    drop(table_w);

    let ms = time_ms(&b, REPS, || rnd(6, 1, 18432, hidden, 0.02).map(drop))?;
    out.push(mem_bench("random weight", format!("[18432, {hidden}] bf16"), ms, (18432 * hidden * 2) as f64));

    let lt = 4096usize;
    let logits = act(7, lt, vocab)?;
    let targets: Vec<u32> = (0..lt as u32).map(|i| i * 31 % vocab as u32).collect();
    let ms = time_ms(&b, REPS, || b.nll(&logits, &targets).map(drop))?;
    out.push(mem_bench("nll", format!("[{lt}, {vocab}] bf16"), ms, (lt * vocab * 2) as f64));
    drop(logits);

    for (n_out, n_in) in [(1536usize, hidden), (18432, hidden), (hidden, 18432)] {
        let xin = act(8, t, n_in)?;
        let wt = rnd(9, 1, n_out, n_in, 0.02)?;
        let ms = time_ms(&b, REPS, || b.matmul_t(&xin, &wt).map(drop))?;
        let flops = 2.0 * (t * n_out * n_in) as f64;
        let bytes = ((t * n_in + n_out * n_in + t * n_out) * 2) as f64;
        out.push(flop_bench("matmul_t", format!("[{t}, {n_in}] · [{n_out}, {n_in}]ᵀ bf16"), ms, flops, bytes));
    }

    // Decode projections of the 30B shape (q_a, q_b, o, LM head) at one row: the GEMV against
    // cuBLAS on the same operands; weights larger than L2 are cycled so every run reads DRAM.
    for (n_out, n_in) in [(768usize, 2048usize), (5120, 768), (2048, 5120), (154_880, 2048)] {
        let copies = (256usize << 20).div_ceil(n_out * n_in * 2).clamp(1, 16);
        let ws: Vec<CudaWeight> =
            (0..copies).map(|c| rnd(30 + c as u64, 1, n_out, n_in, 0.02)).collect::<OpResult<_>>()?;
        let x1 = act(29, 1, n_in)?;
        let y1 = b.zeros(1, n_out)?;
        let bytes = (n_out * n_in * 2) as f64;
        let mut i = 0;
        let ms = time_ms(&b, REPS * copies, || {
            i += 1;
            b.matmul_t(&x1, &ws[i % copies]).map(drop)
        })?;
        out.push(mem_bench("matmul_t decode (gemv)", format!("[1, {n_in}] · [{n_out}, {n_in}]ᵀ bf16"), ms, bytes));
        let ms = time_ms(&b, REPS * copies, || {
            i += 1;
            let g = MatmulT::plain(DType::BF16, 1, n_out, n_in, x1.ptr(), ws[i % copies].ptr(), y1.ptr());
            b.blas.matmul_t(&b.dev, "bench", &g)
        })?;
        out.push(mem_bench("matmul_t decode (cuBLAS)", format!("[1, {n_in}] · [{n_out}, {n_in}]ᵀ bf16"), ms, bytes));
    }

    let (hh, din, dout) = (128usize, 128usize, 512usize);
    let xh = act(10, t, hh * din)?;
    let wh = rnd(11, hh, dout, din, 0.05)?;
    let ms = time_ms(&b, REPS, || b.matmul_heads(&xh, &wh).map(drop))?;
    let flops = 2.0 * (t * hh * dout * din) as f64;
    let bytes = ((t * hh * din + hh * dout * din + t * hh * dout) * 2) as f64;
    out.push(flop_bench("matmul_heads", format!("[{t}, {hh}×{din}] · [{hh}, {dout}, {din}]ᵀ bf16"), ms, flops, bytes));

    let inter = 18432usize;
    let mlp = Mlp {
        gate: rnd(12, 1, inter, hidden, 0.02)?,
        up: rnd(13, 1, inter, hidden, 0.02)?,
        down: rnd(14, 1, hidden, inter, 0.02)?,
    };
    let ms = time_ms(&b, REPS, || b.mlp(&x, &mlp).map(drop))?;
    let flops = 6.0 * (t * hidden * inter) as f64;
    out.push(flop_bench(
        "mlp",
        format!("T {t}, hidden {hidden}, I {inter} bf16"),
        ms,
        flops,
        (3 * hidden * inter * 2) as f64,
    ));
    drop(mlp);

    let (mt, n_exp, mi) = (4096usize, 64usize, 2048usize);
    let xm = act(15, mt, hidden)?;
    let moe = Moe {
        router: rnd(16, 1, n_exp, hidden, 0.05)?,
        score_bias: b.vector(&indexcache_ops::random::fill(17, 0.01, n_exp))?,
        experts: indexcache_ops::Experts {
            gate_up: rnd(18, n_exp, 2 * mi, hidden, 0.02)?,
            down: rnd(19, n_exp, hidden, mi, 0.02)?,
            n: n_exp,
            inter: mi,
        },
        shared: Some(Mlp {
            gate: rnd(20, 1, mi, hidden, 0.02)?,
            up: rnd(21, 1, mi, hidden, 0.02)?,
            down: rnd(22, 1, hidden, mi, 0.02)?,
        }),
        routing: indexcache_ops::MoeRouting {
            n_group: 8,
            topk_group: 4,
            top_k: 8,
            norm_topk_prob: true,
            routed_scaling_factor: 2.5,
        },
    };
    let ms = time_ms(&b, REPS, || b.moe(&xm, &moe).map(drop))?;
    let flops = 6.0 * (mt * 8 * hidden * mi) as f64 + 6.0 * (mt * hidden * mi) as f64;
    let bytes = ((n_exp + 1) * 3 * hidden * mi * 2) as f64;
    out.push(flop_bench(
        "moe",
        format!("T {mt}, hidden {hidden}, E {n_exp}, top-8, I {mi}, shared bf16"),
        ms,
        flops,
        bytes,
    ));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_an_exclusive_prefix_sum() {
        assert_eq!(expert_offsets(&[2, 0, 3, 1]), vec![0, 2, 2, 5, 6]);
        assert_eq!(expert_offsets(&[]), vec![0]);
    }

    /// The PTX parameter list of `.entry name(`: one width class per parameter.
    fn ptx_params(ptx: &str, name: &str) -> Option<Vec<&'static str>> {
        let start = ptx.find(&format!(".entry {name}("))?;
        let rest = &ptx[start..];
        let end = rest.find(')')?;
        Some(
            rest[..end]
                .lines()
                .filter_map(|l| l.trim().strip_prefix(".param ."))
                .map(|l| match l.split_whitespace().next().unwrap_or("") {
                    "u64" | "s64" | "b64" => "64-bit int",
                    "u32" | "s32" | "b32" => "32-bit int",
                    "f32" => "f32",
                    _ => "other",
                })
                .collect(),
        )
    }

    /// Compiles `elementwise.cu`, `moe.cu`, `gqa.cu` and `moe_decode.cu` with NVRTC (no GPU needed) and checks that every
    /// entry point this module launches exists with exactly the parameter list it is launched with.
    #[test]
    fn kernels_compile_with_the_signatures_launched() {
        if !dev::nvrtc_present() {
            eprintln!("skipped: NVRTC not found (set LD_LIBRARY_PATH to a CUDA 13 lib/ directory)");
            return;
        }
        let mut ptx = std::collections::HashMap::new();
        for src in [&kernels::ELEMENTWISE, &kernels::MOE, &kernels::GQA, &kernels::MOE_DECODE] {
            let p = dev::compile(src).unwrap_or_else(|e| panic!("{e}"));
            ptx.insert(src.name, p.to_src());
        }
        for k in ALL_KERNELS {
            let code = &ptx[k.src.name];
            let want: Vec<&str> = k
                .sig
                .iter()
                .map(|t| match t {
                    Ty::Ptr | Ty::I64 | Ty::U64 => "64-bit int",
                    Ty::I32 => "32-bit int",
                    Ty::F32 => "f32",
                })
                .collect();
            for name in k.names {
                let got = ptx_params(code, name).unwrap_or_else(|| panic!("{}.cu has no entry {name}", k.src.name));
                assert_eq!(got, want, "{name}: PTX parameters vs the launch signature");
            }
        }
    }

    #[test]
    fn bf16_rounding_matches_half() {
        // The kernels' rounding (f32_to_bf16 in the .cu files), written out in Rust, agrees with
        // half::bf16::from_f32 on ties, carries, overflow, infinities and NaN.
        fn kernel_round(f: f32) -> u16 {
            let u = f.to_bits();
            if u & 0x7fff_ffff > 0x7f80_0000 {
                return ((u >> 16) | 0x40) as u16;
            }
            (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
        }
        let mut vals = vec![
            0.0f32,
            -0.0,
            1.0,
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x3f80_8001),
            f32::from_bits(0x7f7f_ffff),
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
            1e-40,
        ];
        vals.extend(indexcache_ops::random::fill(3, 100.0, 10_000));
        for v in vals {
            assert_eq!(kernel_round(v), half::bf16::from_f32(v).to_bits(), "{v:e} ({:#010x})", v.to_bits());
        }
    }
}
