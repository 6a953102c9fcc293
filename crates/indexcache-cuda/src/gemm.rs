//! cuBLAS GEMMs of the CUDA backend: every dense matmul of the engine is one row-major
//! `Y [T, out] = X [T, in] · Wᵀ` (weights `[out, in]` row-major, as checkpoints store them),
//! optionally batched over heads or experts with constant strides.
//!
//! # The column-major mapping
//!
//! cuBLAS is column-major. A row-major `[R, C]` matrix with row stride `L` *is* a column-major
//! `[C, R]` matrix with leading dimension `L`, so the row-major product `Y = X·Wᵀ` is the
//! column-major product `Yᵀ = W·Xᵀ` = `op(A)·op(B)` with
//!
//! | cuBLAS | our buffer | stored (col-major) | op | ld |
//! |--------|-----------|--------------------|----|----|
//! | `A` (m×k after op) | `W [out, in]` | `[in, out]` = k×m | `T` | row stride of W (≥ in) |
//! | `B` (k×n)          | `X [T, in]`   | `[in, T]` = k×n   | `N` | row stride of X (≥ in) |
//! | `C` (m×n)          | `Y [T, out]`  | `[out, T]` = m×n  | –   | row stride of Y (≥ out) |
//!
//! with `m = out`, `n = T`, `k = in`. Batched (`cublasGemmStridedBatchedEx`): per-head matmuls
//! view `X [T, H·in]` per head with ld `H·in` and stride `in`, the weight groups with stride
//! `out·in`, and write `Y [T, H·out]` with ld `H·out` and stride `out`.
//!
//! # Precision
//!
//! * f32 mode: `CUBLAS_COMPUTE_32F_PEDANTIC`: plain f32 FMAs, never TF32 (not even under
//!   `NVIDIA_TF32_OVERRIDE`), so results stay within ~1e-6 of the CPU backend.
//! * bf16 mode: bf16 `A`/`B`, f32 accumulation (`CUBLAS_COMPUTE_32F`, tensor cores), `C` in bf16
//!   or f32 (the MoE router writes f32 logits from bf16 inputs).
//!
//! A GEMM does `2·m·n·k` flops and moves `(m·k + k·n)·size + m·n·size_c` bytes at least.

use crate::dev::Dev;
use cudarc::cublas::{CudaBlas, result as blas, sys};
use indexcache_ops::{DType, OpError, OpResult};
use std::sync::Mutex;

/// One row-major `Y = X · Wᵀ`, `batch` times with constant element strides.
/// Addresses are raw device pointers (`DevBuf::ptr()` + byte offsets).
#[derive(Debug, Clone, Copy)]
pub struct MatmulT {
    /// Element type of `X` and `W` (and of `Y` unless `out_f32`).
    pub dtype: DType,
    /// Write `Y` as f32 whatever `dtype` is.
    pub out_f32: bool,
    /// `T`: rows of `X` and `Y`.
    pub rows: usize,
    /// `out`: rows of `W`, columns of `Y`.
    pub n_out: usize,
    /// `in`: columns of `X` and `W`.
    pub n_in: usize,
    pub x: u64,
    /// Row stride of `X` in elements (≥ `n_in`).
    pub ldx: usize,
    pub w: u64,
    /// Row stride of `W` in elements (≥ `n_in`).
    pub ldw: usize,
    pub y: u64,
    /// Row stride of `Y` in elements (≥ `n_out`).
    pub ldy: usize,
    /// Number of independent products (1 = a plain GEMM).
    pub batch: usize,
    /// Element strides between consecutive batch entries (ignored when `batch == 1`).
    pub stride_x: usize,
    pub stride_w: usize,
    pub stride_y: usize,
}

impl MatmulT {
    /// A single `[rows, n_in] · [n_out, n_in]ᵀ` with packed rows.
    pub fn plain(dtype: DType, rows: usize, n_out: usize, n_in: usize, x: u64, w: u64, y: u64) -> Self {
        Self {
            dtype,
            out_f32: false,
            rows,
            n_out,
            n_in,
            x,
            ldx: n_in,
            w,
            ldw: n_in,
            y,
            ldy: n_out,
            batch: 1,
            stride_x: 0,
            stride_w: 0,
            stride_y: 0,
        }
    }

    pub fn flops(&self) -> f64 {
        2.0 * self.batch as f64 * self.rows as f64 * self.n_out as f64 * self.n_in as f64
    }

    fn shapes(&self) -> String {
        format!(
            "x [{}, {}] (ld {}) · w [{}, {}]ᵀ (ld {}) → y (ld {}), batch {}, {}{}",
            self.rows,
            self.n_in,
            self.ldx,
            self.n_out,
            self.n_in,
            self.ldw,
            self.ldy,
            self.batch,
            self.dtype.name(),
            if self.out_f32 { " → f32" } else { "" }
        )
    }
}

/// The cuBLAS handle of a backend, bound to the device stream. Calls are serialised by a mutex
/// (a handle's workspace is not meant for concurrent use).
pub struct Blas {
    handle: Mutex<CudaBlas>,
    /// cuBLAS's workspace, set once so that no GEMM allocates (a CUDA graph capture cannot).
    /// Declared after `handle`: dropped after it.
    _workspace: crate::dev::DevBuf,
}

/// cuBLAS workspace bytes (NVIDIA's recommendation for Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Blas")
    }
}

fn cuda_type(d: DType) -> sys::cudaDataType_t {
    match d {
        DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
    }
}

fn to_i32(op: &'static str, what: &str, v: usize, shapes: &dyn Fn() -> String) -> OpResult<i32> {
    i32::try_from(v).map_err(|_| OpError::new(op, shapes(), format!("{what} = {v} exceeds cuBLAS's 32-bit limit")))
}

impl Blas {
    /// Create the handle on `dev`'s stream. Fails cleanly where libcublas is missing.
    pub fn new(dev: &Dev) -> OpResult<Self> {
        // SAFETY: only tries to dlopen the library under its known names.
        if !unsafe { sys::is_culib_present() } {
            return Err(OpError::new("cublas init", "", "libcublas not found (set LD_LIBRARY_PATH)"));
        }
        let handle =
            CudaBlas::new(dev.stream.clone()).map_err(|e| OpError::new("cublas init", "", format!("{e:?}")))?;
        let workspace = dev.alloc("cublas init", WORKSPACE_BYTES)?;
        // SAFETY: the handle is live; the workspace outlives it (field order) and is used on the
        // handle's stream only.
        let status = unsafe {
            sys::cublasSetWorkspace_v2(*handle.handle(), workspace.ptr() as *mut std::ffi::c_void, WORKSPACE_BYTES)
        };
        if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(OpError::new(
                "cublas init",
                format!("{WORKSPACE_BYTES} bytes"),
                format!("set workspace: {status:?}"),
            ));
        }
        Ok(Self { handle: Mutex::new(handle), _workspace: workspace })
    }

    /// Enqueue `g` on the stream. `op` names the calling op in errors.
    pub fn matmul_t(&self, dev: &Dev, op: &'static str, g: &MatmulT) -> OpResult<()> {
        let shapes = || g.shapes();
        if g.rows == 0 || g.n_out == 0 || g.batch == 0 {
            return Ok(());
        }
        if g.n_in == 0 {
            return Err(OpError::new(op, shapes(), "inner dimension 0"));
        }
        if g.ldx < g.n_in || g.ldw < g.n_in || g.ldy < g.n_out {
            return Err(OpError::new(op, shapes(), "leading dimension smaller than the row"));
        }
        let m = to_i32(op, "out", g.n_out, &shapes)?;
        let n = to_i32(op, "rows", g.rows, &shapes)?;
        let k = to_i32(op, "in", g.n_in, &shapes)?;
        let lda = to_i32(op, "ldw", g.ldw, &shapes)?;
        let ldb = to_i32(op, "ldx", g.ldx, &shapes)?;
        let ldc = to_i32(op, "ldy", g.ldy, &shapes)?;
        let batch = to_i32(op, "batch", g.batch, &shapes)?;
        let ab = cuda_type(g.dtype);
        let c_type = if g.out_f32 { sys::cudaDataType_t::CUDA_R_32F } else { ab };
        let compute = match g.dtype {
            DType::F32 => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_PEDANTIC,
            DType::BF16 => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        };
        // Scale type of a 32F compute type is f32; pointer mode is host.
        let alpha: f32 = 1.0;
        let beta: f32 = 0.0;
        let h = self.handle.lock().map_err(|_| OpError::new(op, shapes(), "cuBLAS handle poisoned"))?;
        dev.ctx.bind_to_thread().map_err(|e| OpError::new(op, shapes(), format!("{e:?}")))?;
        let (transa, transb) = (sys::cublasOperation_t::CUBLAS_OP_T, sys::cublasOperation_t::CUBLAS_OP_N);
        let algo = sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
        // SAFETY: the addresses are live device buffers holding at least the extents described
        // by (rows, n_in, n_out, ld*, strides, batch) — the backend checks shapes before calling;
        // alpha/beta outlive the (host-pointer-mode) call, which reads them before returning.
        let r = unsafe {
            if g.batch == 1 {
                blas::gemm_ex(
                    *h.handle(),
                    transa,
                    transb,
                    m,
                    n,
                    k,
                    (&alpha) as *const f32 as *const _,
                    g.w as *const _,
                    ab,
                    lda,
                    g.x as *const _,
                    ab,
                    ldb,
                    (&beta) as *const f32 as *const _,
                    g.y as *mut _,
                    c_type,
                    ldc,
                    compute,
                    algo,
                )
            } else {
                blas::gemm_strided_batched_ex(
                    *h.handle(),
                    transa,
                    transb,
                    m,
                    n,
                    k,
                    (&alpha) as *const f32 as *const _,
                    g.w as *const _,
                    ab,
                    lda,
                    g.stride_w as i64,
                    g.x as *const _,
                    ab,
                    ldb,
                    g.stride_x as i64,
                    (&beta) as *const f32 as *const _,
                    g.y as *mut _,
                    c_type,
                    ldc,
                    g.stride_y as i64,
                    batch,
                    compute,
                    algo,
                )
            }
        };
        r.map_err(|e| OpError::new(op, shapes(), format!("cuBLAS GEMM failed: {e:?}")))
    }
}
