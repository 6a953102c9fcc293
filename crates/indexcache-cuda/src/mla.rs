//! Sparse MLA attention in the absorbed (MQA) form on the GPU (`kernels/mla.cu`).
//!
//! For query row `t`, head `h` and the valid entries `j` of `sel[t, :]` (entries < 0 skipped),
//! with cache rows `[c_j | k_pe_j]` (`r + p` wide):
//! `logit_j = scale·(q_lat[t,h]·c_j + q_pe[t,h]·k_pe_j)`, `out[t,h] = Σ_j softmax(logit)_j · c_j`
//! (zeros where a row has no valid entry). All heads of a row share the gathered rows, so one CTA
//! handles one query row (and a group of heads), gathering each selected row once.
//!
//! Two paths, same semantics:
//! * **CUDA cores** (`mla_cc_*`, f32 arithmetic, any shape): blocks of 16 gathered rows staged in
//!   shared memory, one warp per (head, key) dot product, exact online softmax (`expf`), output
//!   accumulated in shared memory. The f32 dtype always takes it (conformance mode), and bf16
//!   shapes the tensor-core kernel does not cover.
//! * **Tensor cores** (`mla_tc_m{1,2,4}`, bf16, `r % 8 == 0`, `p % 8 == 0`, `r ≤ 512`):
//!   FlashMLA-style with `mma.sync.m16n8k16` (bf16 → f32). `Q_t` = `[16·MT heads, r+p]` sits in
//!   shared memory; the selected rows are gathered with `cp.async` (16-byte chunks, a 576-wide row
//!   is 1152 bytes) in tiles of 64 (32 for 64 heads), double-buffered; per tile
//!   `S = Q·Gᵀ` (8 warps = 2 blocks × 4 K-splits), an online softmax in f32 (log2 domain),
//!   `O += P·G[:, :r]` with `P` in bf16 and `G` through `ldmatrix.trans`, the 512 output columns
//!   split across the 8 warps (accumulators in registers). 20 heads pad to 32, 64 heads fill one
//!   CTA, 128 heads take two CTAs per row.
//!
//! **Split-k** (decode): when `rows × head groups` CTAs cannot fill the GPU, the `k` entries of a
//! row are split across CTAs; each writes its unnormalised partial output (f32) and its softmax
//! max / sum, and `mla_combine_*` merges them with the log-sum-exp weights. Decode-sized calls
//! (at most 32 heads, one or two CTAs per SM) take `mla_dec_m{1,2}`: one tile of [`DEC_TILE`]
//! entries per CTA, no pipelining or rescaling (64 splits at k = 2048; ncu on the H200, 30B decode
//! step: 7.2 µs against 9.6 µs for `mla_tc_m2` over 32 splits of 64). `INDEXCACHE_MLA_DEC=0` (the
//! backend's switch) keeps `mla_tc`.
//!
//! **Cost** per valid selected entry: `2·heads·((r+p) + r)` useful FLOPs (43.5 KFLOP at 20 heads,
//! so 89 MFLOP per query row with 2048 entries) and one `(r+p)`-wide row gathered per CTA (1152
//! bytes in bf16). The tensor-core kernel issues `2·16·MT·(Wp + r)` FLOPs per entry (20 heads pad
//! to 32: 62.5 % of the issued MMA work is useful). At 20 heads the gathers dominate: 4096 rows ×
//! 2048 entries move 9.7 GB (mostly L2 hits when neighbouring rows select the same recent
//! positions), i.e. ~5 TB/s at 200 TFLOP/s useful; at 64 heads the MMAs (issued through
//! `mma.sync`, not `wgmma`) and the shared-memory fragment traffic dominate.
//!
//! Shared memory (r = 512, p = 64): 229 KB (20 heads: Q 37 KB, 2 × 64 gathered rows 150 KB,
//! partial logits 37 KB), 196 KB (64 heads: Q 75 KB, 2 × 32 rows 75 KB, partials 41 KB): one CTA
//! of 8 warps per SM, 180 / 238 registers per thread, no spills.

use crate::dev::{Dev, DevBuf};
use crate::kernels::MLA;
use crate::{CEILING_BF16_TFLOPS, CEILING_GBPS, KernelBench};
use cudarc::driver::LaunchConfig;
use indexcache_ops::{DType, OpError, OpResult};

/// Arguments of [`sparse_mla`]. Raw device addresses; layouts as in
/// `indexcache_ops::Backend::sparse_mla`.
#[derive(Debug, Clone, Copy)]
pub struct MlaArgs {
    /// Element type of `q_lat`, `q_pe`, `cache` and `out`.
    pub dtype: DType,
    /// `[rows, heads*r]`
    pub q_lat: u64,
    /// `[rows, heads*p]`
    pub q_pe: u64,
    /// `[cache_rows, r+p]`
    pub cache: u64,
    /// `[rows, k]` i32, entries < 0 skipped
    pub sel: u64,
    pub rows: usize,
    pub heads: usize,
    pub r: usize,
    pub p: usize,
    pub k: usize,
    pub scale: f32,
    /// `[rows, heads*r]` output
    pub out: u64,
}

/// Which kernel family runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MlaPath {
    /// Tensor cores where the shape allows (bf16), CUDA cores otherwise.
    #[default]
    Auto,
    /// The exact CUDA-core kernel (any dtype and shape).
    CudaCore,
    /// The bf16 tensor-core kernel; an error where the shape or dtype does not allow it.
    TensorCore,
    /// The bf16 tensor-core decode kernel (`mla_dec_m{1,2}`: one tile of [`DEC_TILE`] entries
    /// per split); an error where the shape or dtype does not allow it.
    Decode,
}

/// Overrides for tests and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct MlaOpts {
    pub path: MlaPath,
    /// Force the number of k-splits (clamped to `1..=tiles`); `None` picks one from the SM count.
    pub splits: Option<usize>,
    /// Never pick the decode kernel on its own (`INDEXCACHE_MLA_DEC=0`: the backend's A/B switch).
    pub no_decode: bool,
    /// `mla_combine_uv` without thread-block clusters: every CTA combines the whole row
    /// (`INDEXCACHE_UV_CLUSTER=0`; the same bits).
    pub no_cluster: bool,
}

/// How one call is launched (pure function of the shapes; see [`plan`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlaPlan {
    pub kernel: &'static str,
    pub tensor_cores: bool,
    /// Heads per CTA (padded to 16·MT on the tensor-core path).
    pub head_group: usize,
    pub head_groups: usize,
    /// Selected entries per tile (per gathered block).
    pub tile: usize,
    pub splits: usize,
    /// Entries of `sel` per split (a multiple of `tile`; 0 when `k == 0`).
    pub split_len: usize,
    /// Dynamic shared memory of the attention kernel, bytes.
    pub smem: usize,
}

const THREADS: u32 = 256;
const CC_BLOCK: usize = 16;
const COMBINE_THREADS: u32 = 128;
/// Largest grid y / z dimension.
const GRID_YZ: usize = 65_535;

/// Shared memory of `mla_tc_m{mt}` for row width `w` (mirrors the carve-up in `mla.cu`).
fn tc_smem(mt: usize, w: usize) -> usize {
    let hp = 16 * mt;
    let nt = if mt == 4 { 32 } else { 64 };
    let ws = w.div_ceil(16) * 16 + 8;
    hp * ws * 2 + 2 * nt * ws * 2 + 4 * hp * (nt + 8) * 4 + hp * (nt + 8) * 2 + hp * 4 + 2 * hp * 4 + 8 * 4
}

/// Selected entries per CTA of the decode kernel (`DEC_NT` in `mla.cu`).
pub const DEC_TILE: usize = 32;

/// Shared memory of `mla_dec_m{mt}` for row width `w` (mirrors the carve-up in `mla.cu`).
fn dec_smem(mt: usize, w: usize) -> usize {
    let hp = 16 * mt;
    let ws = w.div_ceil(16) * 16 + 8;
    let (ss, ps) = (DEC_TILE + 8, DEC_TILE + 8);
    hp * ws * 2 + DEC_TILE * ws * 2 + 64 * ss * 4 + hp * ps * 2 + 2 * hp * 4 + DEC_TILE * 4
}

/// Shared memory of `mla_cc_*` for `hg` heads per CTA and blocks of `nb` rows.
fn cc_smem(hg: usize, nb: usize, r: usize, w: usize) -> usize {
    (nb * w + hg * w + hg * r + hg * nb + 3 * hg + nb + 8) * 4
}

/// `(splits, split_len)` for `k` entries in tiles of `tile` when `ctas` CTAs exist per split.
fn split_plan(k: usize, tile: usize, ctas: usize, sm_count: usize, forced: Option<usize>) -> (usize, usize) {
    if k == 0 {
        return (1, 0);
    }
    let tiles = k.div_ceil(tile);
    let want = forced.unwrap_or(if ctas >= sm_count { 1 } else { sm_count.div_ceil(ctas.max(1)) });
    let s = want.clamp(1, tiles.min(GRID_YZ));
    let split_len = tiles.div_ceil(s) * tile;
    (k.div_ceil(split_len), split_len)
}

/// Chooses the kernel, head grouping and k-splits. `smem_max` is the per-block opt-in limit.
pub fn plan(a: &MlaArgs, opts: MlaOpts, sm_count: usize, smem_max: usize) -> Result<MlaPlan, String> {
    let w = a.r + a.p;
    let aligned = [a.q_lat, a.q_pe, a.cache].iter().all(|x| x.is_multiple_of(16));
    let tc_ok = a.dtype == DType::BF16 && a.r.is_multiple_of(8) && a.p.is_multiple_of(8) && a.r <= 512 && aligned;
    let mt = match a.heads {
        0..=16 => 1,
        17..=32 => 2,
        _ => 4,
    };
    // The decode kernel: one tile per CTA, when the row's tiles spread over the GPU (at most two
    // CTAs per SM) and nobody asked for another split count.
    let dec_ctas = a.rows * a.heads.div_ceil(16 * mt) * a.k.div_ceil(DEC_TILE);
    let dec_fits = tc_ok && mt <= 2 && a.k > 0 && dec_smem(mt, w) <= smem_max;
    let use_dec = match opts.path {
        MlaPath::Decode => {
            if !dec_fits {
                return Err(format!(
                    "decode path needs the tensor-core path's shapes, at most 32 heads and k > 0 \
                     (dtype {}, heads {}, r {}, p {}, k {})",
                    a.dtype.name(),
                    a.heads,
                    a.r,
                    a.p,
                    a.k
                ));
            }
            true
        }
        MlaPath::Auto => dec_fits && !opts.no_decode && opts.splits.is_none() && dec_ctas <= 2 * sm_count,
        _ => false,
    };
    if use_dec {
        let hp = 16 * mt;
        let head_groups = a.heads.div_ceil(hp);
        return Ok(MlaPlan {
            kernel: if mt == 1 { "mla_dec_m1" } else { "mla_dec_m2" },
            tensor_cores: true,
            head_group: hp,
            head_groups,
            tile: DEC_TILE,
            splits: a.k.div_ceil(DEC_TILE),
            split_len: DEC_TILE,
            smem: dec_smem(mt, w),
        });
    }
    let use_tc = match opts.path {
        MlaPath::CudaCore | MlaPath::Decode => false,
        MlaPath::Auto => tc_ok && tc_smem(mt, w) <= smem_max,
        MlaPath::TensorCore => {
            if !tc_ok {
                return Err(format!(
                    "tensor-core path needs bf16, r % 8 == 0, p % 8 == 0, r <= 512 and 16-byte aligned inputs \
                     (dtype {}, r {}, p {})",
                    a.dtype.name(),
                    a.r,
                    a.p
                ));
            }
            if tc_smem(mt, w) > smem_max {
                return Err(format!("row width {w} needs {} bytes of shared memory", tc_smem(mt, w)));
            }
            true
        }
    };
    if use_tc {
        let hp = 16 * mt;
        let head_groups = a.heads.div_ceil(hp);
        let tile = if mt == 4 { 32 } else { 64 };
        let (splits, split_len) = split_plan(a.k, tile, a.rows * head_groups, sm_count, opts.splits);
        let kernel = match mt {
            1 => "mla_tc_m1",
            2 => "mla_tc_m2",
            _ => "mla_tc_m4",
        };
        return Ok(MlaPlan {
            kernel,
            tensor_cores: true,
            head_group: hp,
            head_groups,
            tile,
            splits,
            split_len,
            smem: tc_smem(mt, w),
        });
    }
    let nb = CC_BLOCK;
    let fixed = cc_smem(0, nb, a.r, w);
    let per_head = cc_smem(1, nb, a.r, w) - fixed;
    let hg_max = (smem_max.saturating_sub(fixed) / per_head).min(256).min(a.heads.max(1));
    if hg_max == 0 {
        return Err(format!("row width {w} is too wide for the shared-memory staging ({smem_max} bytes)"));
    }
    let head_groups = a.heads.div_ceil(hg_max);
    let hg = a.heads.div_ceil(head_groups).max(1);
    let (splits, split_len) = split_plan(a.k, nb, a.rows * head_groups, sm_count, opts.splits);
    let kernel = if a.dtype == DType::F32 { "mla_cc_f32" } else { "mla_cc_bf16" };
    Ok(MlaPlan {
        kernel,
        tensor_cores: false,
        head_group: hg,
        head_groups,
        tile: nb,
        splits,
        split_len,
        smem: cc_smem(hg, nb, a.r, w),
    })
}

fn smem_optin(dev: &Dev) -> usize {
    dev.ctx
        .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .map(|v| v as usize)
        .unwrap_or(232_448)
}

/// Sparse MLA attention (see the module docs); writes `a.out`. Asynchronous on `dev.stream`.
pub fn sparse_mla(dev: &Dev, a: &MlaArgs) -> OpResult<()> {
    sparse_mla_with(dev, a, MlaOpts::default())
}

/// [`sparse_mla`] with an explicit path / split count (tests, benchmarks).
pub fn sparse_mla_with(dev: &Dev, a: &MlaArgs, opts: MlaOpts) -> OpResult<()> {
    run(dev, a, opts, None).map(|_| ())
}

/// The per-head value projection a split-k call can merge into its combine
/// (`moe_decode.cu` `mla_combine_uv`): `y[t, h·n_out + j] = out[t, h, :] · w[h, j, :]`.
#[derive(Debug, Clone, Copy)]
pub struct UvArgs {
    /// `[heads, n_out, r]` bf16, 16-byte aligned
    pub w: u64,
    pub n_out: usize,
    /// `[rows, heads·n_out]` bf16
    pub y: u64,
}

/// Warps per CTA of `mla_combine_uv` (`CU_WARPS` in moe_decode.cu), 4 output columns each.
const CU_WARPS: usize = 8;

/// [`sparse_mla`], then `uv`'s projection inside the split combine where it can run there (bf16,
/// more than one split, `r` in whole 16-byte vectors): returns `true` when `uv.y` was written —
/// the combined rows never reach `a.out` — and `false` when only `a.out` was (the caller then
/// projects it). The projection's sums are those of the decode GEMV (`moe_decode.cu` `gemv`).
pub fn sparse_mla_uv(dev: &Dev, a: &MlaArgs, uv: UvArgs) -> OpResult<bool> {
    sparse_mla_uv_with(dev, a, uv, MlaOpts::default())
}

/// [`sparse_mla_uv`] with an explicit path / split count.
pub fn sparse_mla_uv_with(dev: &Dev, a: &MlaArgs, uv: UvArgs, opts: MlaOpts) -> OpResult<bool> {
    run(dev, a, opts, Some(uv))
}

fn run(dev: &Dev, a: &MlaArgs, opts: MlaOpts, uv: Option<UvArgs>) -> OpResult<bool> {
    const OP: &str = "sparse_mla";
    let shapes = || format!("{a:?}");
    if a.rows == 0 || a.heads == 0 || a.r == 0 {
        return Ok(false);
    }
    if a.k > (i32::MAX / 2) as usize || a.heads > i32::MAX as usize || a.r + a.p > (i32::MAX / 4) as usize {
        return Err(OpError::new(OP, shapes(), "shape out of range"));
    }
    let pl = plan(a, opts, dev.sm_count as usize, smem_optin(dev)).map_err(|e| OpError::new(OP, shapes(), e))?;
    if pl.head_groups > GRID_YZ || a.rows > i32::MAX as usize || (pl.splits > 1 && a.heads > GRID_YZ) {
        return Err(OpError::new(OP, shapes(), "grid too large"));
    }

    // Split-k workspace: partial outputs [rows, splits, heads, r] f32, then (m, l) pairs.
    let ws_o_len = a.rows * pl.splits * a.heads * a.r;
    let ws_ml_len = a.rows * pl.splits * a.heads * 2;
    let ws: Option<DevBuf> = if pl.splits > 1 { Some(dev.alloc(OP, (ws_o_len + ws_ml_len) * 4 + 256)?) } else { None };
    let (ws_o, ws_ml) = match &ws {
        Some(b) => (b.ptr(), b.ptr() + (ws_o_len * 4).next_multiple_of(256) as u64),
        None => (0u64, 0u64),
    };
    if let Some(b) = &ws
        && ws_ml + (ws_ml_len * 4) as u64 > b.ptr() + b.bytes() as u64
    {
        return Err(OpError::new(OP, shapes(), "workspace layout"));
    }

    let f = dev.function(&MLA, pl.kernel)?;
    dev.set_max_smem(&f, pl.smem as u32)?;
    let (heads, r, p, k) = (a.heads as i32, a.r as i32, a.p as i32, a.k as i32);
    let (split_len, splits) = (pl.split_len as i32, pl.splits as i32);
    let hg = pl.head_group as i32;
    let nb = pl.tile as i32;
    let cfg = LaunchConfig {
        grid_dim: (a.rows as u32, pl.head_groups as u32, pl.splits as u32),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: pl.smem as u32,
    };
    let mut b = dev.builder(&f);
    b.arg(&a.q_lat).arg(&a.q_pe).arg(&a.cache).arg(&a.sel).arg(&a.out).arg(&ws_o).arg(&ws_ml);
    b.arg(&heads).arg(&r).arg(&p).arg(&k).arg(&a.scale);
    if !pl.tensor_cores {
        b.arg(&hg).arg(&nb);
    }
    b.arg(&split_len).arg(&splits);
    dev.launch(b, cfg, OP, || format!("{} {pl:?} {a:?}", pl.kernel))?;

    let uv = uv.filter(|u| {
        let smem = pl.splits.next_multiple_of(4) * 4 + a.r * 2;
        pl.splits > 1
            && a.dtype == DType::BF16
            && a.r.is_multiple_of(8)
            && u.w.is_multiple_of(16)
            && u.n_out > 0
            && u.n_out <= (i32::MAX as usize) / a.r.max(1)
            && smem <= 48 * 1024
    });
    if let Some(u) = uv {
        let f = dev.function(&crate::kernels::MOE_DECODE, "mla_combine_uv")?;
        let z = u.n_out.div_ceil(4 * CU_WARPS);
        // A (row, head)'s z CTAs as one cluster (each combines a chunk of the row) where they fit
        // one: at most 8 CTAs, the portable cluster size.
        let cz = if (2..=8).contains(&z) && !opts.no_cluster { z } else { 1 };
        let cfg = LaunchConfig {
            grid_dim: (a.rows as u32, a.heads as u32, z as u32),
            block_dim: (32 * CU_WARPS as u32, 1, 1),
            shared_mem_bytes: (pl.splits.next_multiple_of(4) * 4 + a.r * 2) as u32,
        };
        let (splits, n_out, cz32) = (pl.splits as i32, u.n_out as i32, cz as i32);
        let mut b = dev.builder(&f);
        b.arg(&ws_o).arg(&ws_ml).arg(&heads).arg(&r).arg(&splits).arg(&u.w).arg(&n_out).arg(&u.y).arg(&cz32);
        let shapes = || format!("mla_combine_uv {pl:?} {a:?} {u:?} cluster {cz}");
        if cz > 1 {
            dev.launch_cluster(b, cfg, (1, 1, cz as u32), OP, shapes)?;
        } else {
            dev.launch(b, cfg, OP, shapes)?;
        }
    } else if pl.splits > 1 {
        let name = if a.dtype == DType::F32 { "mla_combine_f32" } else { "mla_combine_bf16" };
        let f = dev.function(&MLA, name)?;
        // One CTA per (row, head, 128 output columns): 80 CTAs for one decode row of 20 heads.
        let cfg = LaunchConfig {
            grid_dim: (a.rows as u32, a.heads as u32, a.r.div_ceil(COMBINE_THREADS as usize) as u32),
            block_dim: (COMBINE_THREADS, 1, 1),
            shared_mem_bytes: (pl.splits * 4) as u32,
        };
        let mut b = dev.builder(&f);
        b.arg(&ws_o).arg(&ws_ml).arg(&a.out).arg(&heads).arg(&r).arg(&splits);
        dev.launch(b, cfg, OP, || format!("{name} {pl:?} {a:?}"))?;
    }
    // `ws` is freed stream-ordered after the kernels that use it.
    drop(ws);
    Ok(uv.is_some())
}

// ---- benchmark ------------------------------------------------------------------------------

/// Deterministic pseudo-random stream for benchmark inputs (no `rand` in the library).
struct Rng(u64, u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.1 += 1;
        indexcache_ops::random::hash(self.0, self.1)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Random bf16 bits, uniform in [-1, 1).
fn bf16_values(seed: u64, n: usize) -> Vec<u16> {
    (0..n as u64).map(|i| half::bf16::from_f32(indexcache_ops::random::uniform(seed, i)).to_bits()).collect()
}

/// DSA-like selections for query rows at positions `ctx - rows .. ctx`: 3/4 distinct positions
/// from the 8192 most recent, 1/4 distinct far ones, in random (score-like) order.
fn bench_selection(rows: usize, k: usize, ctx: usize, seed: u64) -> Vec<i32> {
    let mut rng = Rng(seed, 0);
    let mut out = Vec::with_capacity(rows * k);
    let window = 8192usize;
    let mut recent: Vec<i32> = Vec::with_capacity(window);
    let mut seen = std::collections::HashSet::new();
    for t in 0..rows {
        let pos = ctx - rows + t;
        let lo = (pos + 1).saturating_sub(window);
        recent.clear();
        recent.extend(lo as i32..=pos as i32);
        let n_recent = (k * 3 / 4).min(recent.len());
        for i in 0..n_recent {
            let j = i + rng.below(recent.len() - i);
            recent.swap(i, j);
        }
        let row_start = out.len();
        out.extend_from_slice(&recent[..n_recent]);
        seen.clear();
        let n_far = (k - n_recent).min(lo);
        while seen.len() < n_far {
            let s = rng.below(lo) as i32;
            if seen.insert(s) {
                out.push(s);
            }
        }
        out.resize(row_start + k, -1);
        let row = &mut out[row_start..row_start + n_recent + n_far];
        for i in (1..row.len()).rev() {
            row.swap(i, rng.below(i + 1));
        }
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Times `run` (`per` calls per timed batch) with CUDA events: 2 warm-ups, median of 7.
fn time_ms(dev: &Dev, per: usize, mut run: impl FnMut(usize) -> OpResult<()>) -> OpResult<f64> {
    const OP: &str = "sparse_mla bench";
    let ev = |e| OpError::new(OP, "events", format!("{e:?}"));
    let mut times = Vec::new();
    for rep in 0..9 {
        let start = dev.stream.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(ev)?;
        for i in 0..per {
            run(i)?;
        }
        let end = dev.stream.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(ev)?;
        let ms = start.elapsed_ms(&end).map_err(ev)? as f64;
        if rep >= 2 {
            times.push(ms / per as f64);
        }
    }
    Ok(median(times))
}

/// bf16 prefill at 20 and 64 heads (4096 query rows, k 2048, 128K cache rows) and decode (one
/// row, 20 heads, split-k). FLOPs count `2·heads·((r+p) + r)` per valid entry; bytes count the
/// gathered rows once per CTA plus q, sel and out.
pub fn bench(dev: &Dev) -> OpResult<Vec<KernelBench>> {
    const OP: &str = "sparse_mla bench";
    let (rows, k, ctx, r, p) = (4096usize, 2048usize, 131_072usize, 512usize, 64usize);
    let w = r + p;
    let max_heads = 64;
    let cache = dev.upload(OP, &bf16_values(11, ctx * w))?;
    let q_lat = dev.upload(OP, &bf16_values(12, rows * max_heads * r))?;
    let q_pe = dev.upload(OP, &bf16_values(13, rows * max_heads * p))?;
    let sel_host = bench_selection(rows, k, ctx, 14);
    let valid = sel_host.iter().filter(|&&s| s >= 0).count();
    let sel = dev.upload(OP, &sel_host)?;
    let out = dev.alloc(OP, rows * max_heads * r * 2)?;
    let scale = 1.0 / ((w as f32).sqrt());
    let mut res = Vec::new();

    for heads in [20usize, 64] {
        let a = MlaArgs {
            dtype: DType::BF16,
            q_lat: q_lat.ptr(),
            q_pe: q_pe.ptr(),
            cache: cache.ptr(),
            sel: sel.ptr(),
            rows,
            heads,
            r,
            p,
            k,
            scale,
            out: out.ptr(),
        };
        let pl = plan(&a, MlaOpts::default(), dev.sm_count as usize, smem_optin(dev))
            .map_err(|e| OpError::new(OP, "", e))?;
        let ms = time_ms(dev, 1, |_| sparse_mla(dev, &a))?;
        let flops = 2.0 * heads as f64 * (w + r) as f64 * valid as f64;
        let gather = (valid * w * 2 * pl.head_groups) as f64;
        let bytes = gather + (rows * heads * (w + r) * 2 + rows * k * 4) as f64;
        let tflops = flops / (ms * 1e-3) / 1e12;
        res.push(KernelBench {
            kernel: format!("sparse_mla bf16 prefill ({})", pl.kernel),
            shape: format!(
                "rows={rows} heads={heads} r={r} p={p} k={k} cache={ctx}; gather {:.0} GB/s",
                gather / (ms * 1e-3) / 1e9
            ),
            ms,
            tflops,
            gbps: bytes / (ms * 1e-3) / 1e9,
            of_ceiling: tflops / CEILING_BF16_TFLOPS,
        });
    }

    // Decode: one row per call, rotating through 64 rows (different selections, far-apart rows).
    let heads = 20;
    let per = 64;
    let stride = rows / per;
    let a0 = MlaArgs {
        dtype: DType::BF16,
        q_lat: q_lat.ptr(),
        q_pe: q_pe.ptr(),
        cache: cache.ptr(),
        sel: sel.ptr(),
        rows: 1,
        heads,
        r,
        p,
        k,
        scale,
        out: out.ptr(),
    };
    let valid1 = (0..per).map(|i| sel_host[i * stride * k..(i * stride + 1) * k].iter().filter(|&&s| s >= 0).count());
    let valid1 = valid1.sum::<usize>() as f64 / per as f64;
    let flops = 2.0 * heads as f64 * (w + r) as f64 * valid1;
    let bytes = valid1 * (w * 2) as f64 + (heads * (w + r) * 2 + k * 4) as f64;
    // The default plan, then forced split counts (A/B for the decode plan).
    let tc = |splits| MlaOpts { splits, no_decode: true, ..MlaOpts::default() };
    for opts in [MlaOpts::default(), tc(None), tc(Some(8)), tc(Some(16))] {
        let splits = opts.splits;
        let pl = plan(&a0, opts, dev.sm_count as usize, smem_optin(dev)).map_err(|e| OpError::new(OP, "", e))?;
        let ms = time_ms(dev, per, |i| {
            let t = i * stride;
            let a = MlaArgs {
                q_lat: a0.q_lat + (t * heads * r * 2) as u64,
                q_pe: a0.q_pe + (t * heads * p * 2) as u64,
                sel: a0.sel + (t * k * 4) as u64,
                out: a0.out + (t * heads * r * 2) as u64,
                ..a0
            };
            sparse_mla_with(dev, &a, opts)
        })?;
        let gbps = bytes / (ms * 1e-3) / 1e9;
        let how = match (splits, opts.no_decode) {
            (Some(_), _) => "forced",
            (None, false) => "plan",
            (None, true) => "plan without the decode kernel",
        };
        res.push(KernelBench {
            kernel: format!("sparse_mla bf16 decode ({} + combine, {} splits, {how})", pl.kernel, pl.splits),
            shape: format!("rows=1 heads={heads} r={r} p={p} k={k} cache={ctx}"),
            ms,
            tflops: flops / (ms * 1e-3) / 1e12,
            gbps,
            of_ceiling: gbps / CEILING_GBPS,
        });
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev;

    #[test]
    fn kernels_compile() {
        if !dev::nvrtc_present() {
            eprintln!("skipped: libnvrtc not found");
            return;
        }
        dev::compile(&MLA).unwrap();
    }

    fn args(dtype: DType, rows: usize, heads: usize, r: usize, p: usize, k: usize) -> MlaArgs {
        MlaArgs { dtype, q_lat: 0, q_pe: 0, cache: 0, sel: 0, rows, heads, r, p, k, scale: 0.1, out: 0 }
    }

    #[test]
    fn plans() {
        let smem = 232_448;
        // The real shapes take the tensor cores and fit in shared memory.
        for (heads, mt_kernel, groups) in
            [(16, "mla_tc_m1", 1), (20, "mla_tc_m2", 1), (64, "mla_tc_m4", 1), (128, "mla_tc_m4", 2)]
        {
            let pl = plan(&args(DType::BF16, 4096, heads, 512, 64, 2048), MlaOpts::default(), 132, smem).unwrap();
            assert_eq!((pl.kernel, pl.head_groups, pl.splits, pl.split_len), (mt_kernel, groups, 1, 2048));
            assert!(pl.smem <= smem, "{pl:?}");
        }
        // Decode takes the one-tile kernel: a split per tile of 32 entries.
        let pl = plan(&args(DType::BF16, 1, 20, 512, 64, 2048), MlaOpts::default(), 132, smem).unwrap();
        assert_eq!((pl.kernel, pl.splits, pl.split_len), ("mla_dec_m2", 64, 32));
        let pl = plan(&args(DType::BF16, 4, 16, 512, 64, 2048), MlaOpts::default(), 132, smem).unwrap();
        assert_eq!((pl.kernel, pl.splits, pl.split_len), ("mla_dec_m1", 64, 32));
        assert!(pl.smem <= smem / 2, "two CTAs per SM: {pl:?}");
        // More rows than two CTAs per SM take, a forced split count or the switch: split mla_tc,
        // entries split across the SMs in whole tiles.
        let pl = plan(&args(DType::BF16, 5, 20, 512, 64, 2048), MlaOpts::default(), 132, smem).unwrap();
        assert_eq!(pl.kernel, "mla_tc_m2");
        let off = MlaOpts { no_decode: true, ..MlaOpts::default() };
        let pl = plan(&args(DType::BF16, 1, 20, 512, 64, 2048), off, 132, smem).unwrap();
        assert_eq!((pl.kernel, pl.splits, pl.split_len), ("mla_tc_m2", 32, 64));
        let forced = MlaOpts { splits: Some(8), ..MlaOpts::default() };
        assert_eq!(plan(&args(DType::BF16, 1, 20, 512, 64, 2048), forced, 132, smem).unwrap().kernel, "mla_tc_m2");
        let dec = MlaOpts { path: MlaPath::Decode, ..MlaOpts::default() };
        assert!(plan(&args(DType::BF16, 1, 64, 512, 64, 2048), dec, 132, smem).is_err(), "64 heads");
        assert!(plan(&args(DType::BF16, 1, 20, 512, 64, 0), dec, 132, smem).is_err(), "k = 0");
        assert!(plan(&args(DType::F32, 1, 20, 512, 64, 2048), dec, 132, smem).is_err(), "f32");
        let pl = plan(&args(DType::BF16, 2, 128, 512, 64, 2048), MlaOpts::default(), 132, smem).unwrap();
        assert_eq!(pl.head_groups, 2);
        assert!(pl.splits * pl.split_len >= 2048 && (pl.splits - 1) * pl.split_len < 2048, "{pl:?}");
        // f32 and odd bf16 shapes take the CUDA cores; all heads share one CTA when they fit.
        let pl = plan(&args(DType::F32, 4096, 20, 512, 64, 2048), MlaOpts::default(), 132, smem).unwrap();
        assert_eq!((pl.kernel, pl.head_groups, pl.head_group), ("mla_cc_f32", 1, 20));
        assert!(pl.smem <= smem);
        let pl = plan(&args(DType::F32, 4096, 128, 512, 64, 2048), MlaOpts::default(), 132, smem).unwrap();
        assert!(pl.head_group * pl.head_groups >= 128 && pl.smem <= smem, "{pl:?}");
        let pl = plan(&args(DType::BF16, 8, 3, 12, 4, 8), MlaOpts::default(), 132, smem).unwrap();
        assert_eq!(pl.kernel, "mla_cc_bf16");
        assert!(
            plan(
                &args(DType::F32, 8, 3, 16, 8, 8),
                MlaOpts { path: MlaPath::TensorCore, ..MlaOpts::default() },
                132,
                smem
            )
            .is_err()
        );
        // k = 0: one empty split (the kernels write zeros).
        let pl = plan(&args(DType::BF16, 1, 3, 16, 8, 0), MlaOpts::default(), 132, smem).unwrap();
        assert_eq!((pl.splits, pl.split_len), (1, 0));
        // The tensor-core shared-memory carve-up matches the kernel's (hand-computed for 576).
        assert_eq!(tc_smem(2, 576), 32 * 584 * 2 + 2 * 64 * 584 * 2 + 4 * 32 * 72 * 4 + 32 * 72 * 2 + 32 * 12 + 32);
        assert_eq!(dec_smem(2, 576), 32 * 584 * 2 + 32 * 584 * 2 + 64 * 40 * 4 + 32 * 40 * 2 + 2 * 32 * 4 + 32 * 4);
    }

    #[test]
    fn bench_selection_is_distinct_and_causal() {
        let (rows, k, ctx) = (64, 256, 20_000);
        let sel = bench_selection(rows, k, ctx, 3);
        for t in 0..rows {
            let row = &sel[t * k..(t + 1) * k];
            let pos = (ctx - rows + t) as i32;
            let mut v: Vec<i32> = row.iter().copied().filter(|&s| s >= 0).collect();
            assert_eq!(v.len(), k);
            assert!(v.iter().all(|&s| s <= pos));
            v.sort();
            v.dedup();
            assert_eq!(v.len(), k);
        }
    }
}
