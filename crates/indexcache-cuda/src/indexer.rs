//! Lightning-indexer scoring and exact top-k on the GPU (`Backend::indexer_topk`).
//!
//! Dimension legend: `T` query rows, `S` keys visible to the last row (`max_visible`), `HI` indexer
//! heads, `D` head dim, `K = min(topk, S)` selected positions per row.
//!
//! Score `I[t,s] = Σ_h w[t,h] · ReLU(scale · q[t,h]·k[s])` for `s ≤ pos[t]`, then the positions of
//! the `min(topk, pos[t]+1)` largest scores of each row, ties to the lower position, NaN ranked with
//! −∞ (exactly `indexcache_ops::select_topk`'s order), written in ascending position order and
//! padded with −1. Two steps, each its own kernel file:
//!
//! 1. **Scores** (`kernels/indexer.cu`) into an f32 workspace `[chunk, S]`:
//!    * `F32`: exact CUDA-core kernel (64×64 query×key tiles through shared memory, f32 FMAs), any
//!      `HI`, `D ≤ 256`. The conformance path: accuracy first.
//!    * `BF16`: `mma.sync.m16n8k16` bf16→f32, `D = 128`, `HI ≤ 64`. A warp keeps one query row's
//!      q (all its heads = the M dimension) in registers; 8 warps share 64-key tiles streamed through
//!      a 3-stage `cp.async` ring and read with `ldmatrix`; ReLU/weight/head-sum are folded in
//!      registers, so only the f32 score (4 bytes per visible pair) reaches memory. [`ScorePath`]:
//!      a warp per query row, or for decode (a few rows) one row per CTA with the 8 warps
//!      splitting the keys. Both give bit-identical scores.
//!
//!    Useful work: `2·HI·D` FLOPs per visible `(t, s)` pair (`Σ_t (pos[t]+1)` pairs); causal tiles
//!    past a CTA's last position are skipped, never loaded.
//! 2. **Top-k** (`kernels/topk.cu`), exact, on a 50-bit composite key (order-preserving score
//!    bits, then the inverted position), so the k largest keys *are* the answer with ties already
//!    broken; the result is built as a position bitmap and emitted in order, so it is deterministic
//!    bit for bit, and the same on every path ([`TopkPath`]):
//!    * `Stream` (default for `topk <= 4096`): one CTA per row reads the row **once** (4 bytes per
//!      element); the elements above a threshold that only rises are kept as candidates in shared
//!      memory, and a radix select over them raises the threshold whenever they fill up, then
//!      makes the exact cut at the end. ~k·ln(n/8192) + 16K candidates and ~log2(n/8192) + 1 such
//!      compactions per random row (shared memory only).
//!    * `Rows`: one CTA per row, radix select straight over the row: ~2 reads of it.
//!    * `Segmented`: a few long rows (decode): the passes over each row spread over many CTAs.
//!
//! **Workspace.** The scores of a chunk of rows, `[chunk, round_up(S, 4)]` f32, with `chunk` chosen
//! so the workspace stays under `min(4 GiB, free/8)`: at 200K context that is ~5,000 rows per
//! chunk, so an 8K-row prefill chunk runs as two score+select rounds. It is one stream-ordered
//! allocation per call (freed, stream-ordered, when the call returns; the pool makes that cheap) —
//! not a persistent buffer, since a buffer cached here would outlive or cross `Dev`s; a per-`Dev`
//! workspace would belong in `dev.rs`.
//!
//! Limits: `S ≤ 262,144` ([`MAX_KEYS`]; positions are 18 bits of the sort key).

use crate::dev::{Dev, DevBuf, blocks};
use crate::{CEILING_BF16_TFLOPS, CEILING_GBPS, KernelBench, kernels};
use cudarc::driver::LaunchConfig;
use indexcache_ops::{DType, OpError, OpResult};

/// Arguments of [`indexer_topk`]. Raw device addresses; layouts as in
/// `indexcache_ops::Backend::indexer_topk`.
#[derive(Debug, Clone, Copy)]
pub struct IndexerArgs {
    /// Element type of `q`, `head_w` and `keys`.
    pub dtype: DType,
    /// `[rows, heads*d]`
    pub q: u64,
    /// `[rows, heads]`
    pub head_w: u64,
    /// `[key_rows, d]` (rows `0..=pos[t]` visible to row `t`)
    pub keys: u64,
    /// `[rows]` i32 absolute positions
    pub pos: u64,
    pub rows: usize,
    pub heads: usize,
    pub d: usize,
    /// `max(pos) + 1`
    pub max_visible: usize,
    pub topk: usize,
    pub scale: f32,
}

/// Most keys a row may see (the top-k packs positions into 18 bits).
pub const MAX_KEYS: usize = 1 << 18;
/// Largest head dim of the f32 path.
pub const MAX_D_F32: usize = 256;
/// The bf16 path's head dim and most heads.
pub const BF16_D: usize = 128;
pub const BF16_MAX_HEADS: usize = 64;

const OP: &str = "indexer_topk";
/// Cap on the scores workspace (bytes); also at most 1/8 of the free device memory.
const WORKSPACE_CAP: usize = 4 << 30;

// Kernel geometry (must match the .cu sources).
const F32_TILE: usize = 64; // F_Q = F_S
const BF16_WARPS: usize = 8; // B_WARPS
const BF16_KEYS: usize = 64; // B_KEYS
const BF16_SMEM: u32 = 3 * 16384 + 2 * (8 / 2) * 32 * 8; // B_SMEM_BYTES
const TK_THREADS: u32 = 512;
const TK_SMEM: u32 = 106_656; // sizeof(TkSmem); the kernels trap if given less
const TS_SMEM: u32 = 106_720; // sizeof(TsSmem) (topk_stream); static_assert'ed in topk.cu
/// Largest `topk` the streaming top-k takes (`TS_MAX_K` in topk.cu); larger ones run [`TopkPath::Rows`].
pub const STREAM_MAX_K: usize = 4096;
const TK_BINS: usize = 2048;
const TK_BITMAP_WORDS: usize = MAX_KEYS / 32;

/// Opt `f` into `smem` bytes of dynamic shared memory and hint the largest shared-memory carveout:
/// the two-CTAs-per-SM kernels (top-k stream, scoring key split) need ~210 KB and ~100 KB
/// of an SM's shared memory, and use little L1.
fn set_smem(dev: &Dev, f: &cudarc::driver::CudaFunction, smem: u32) -> OpResult<()> {
    dev.set_max_smem(f, smem)?;
    f.set_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, 100)
        .map_err(|e| OpError::new(OP, format!("{smem} bytes"), format!("shared memory carveout: {e:?}")))
}

/// Floats per row of a scores buffer for `max_visible` keys (rows 16-byte aligned for vector loads).
pub fn score_stride(max_visible: usize) -> usize {
    max_visible.next_multiple_of(4).max(4)
}

/// Row length `K` of the selection: `min(topk, max_visible)`.
pub fn selection_len(a: &IndexerArgs) -> usize {
    a.topk.min(a.max_visible)
}

fn shapes(a: &IndexerArgs) -> String {
    format!(
        "{} q [{}, {}x{}], keys [>={}, {}], topk {}",
        a.dtype.name(),
        a.rows,
        a.heads,
        a.d,
        a.max_visible,
        a.d,
        a.topk
    )
}

fn check(a: &IndexerArgs) -> OpResult<()> {
    let bad = |why: String| Err(OpError::new(OP, shapes(a), why));
    if a.max_visible > MAX_KEYS {
        return bad(format!("{} visible keys; the top-k supports at most {MAX_KEYS}", a.max_visible));
    }
    if a.rows > i32::MAX as usize || a.topk > i32::MAX as usize || a.heads == 0 || a.d == 0 {
        return bad("rows/topk must fit i32, heads and d must be > 0".into());
    }
    match a.dtype {
        _ if a.d > MAX_D_F32 && !tensor_core(a) => bad(format!("the CUDA-core path supports d <= {MAX_D_F32}")),
        DType::BF16 if tensor_core(a) && (!a.keys.is_multiple_of(16) || !a.q.is_multiple_of(4)) => {
            bad("bf16 keys must be 16-byte, q 4-byte aligned".into())
        }
        _ => Ok(()),
    }
}

/// Does this call take the tensor-core kernels (bf16, d = 128, ≤ 64 heads)? Other bf16 shapes
/// (small test models) take the CUDA-core kernel on bf16 storage.
fn tensor_core(a: &IndexerArgs) -> bool {
    a.dtype == DType::BF16 && a.d == BF16_D && a.heads <= BF16_MAX_HEADS
}

/// Scores + exact top-k; returns the `[rows, K]` i32 selection with `K = min(topk, max_visible)`,
/// -1 padded, ties to the lower position.
pub fn indexer_topk(dev: &Dev, a: &IndexerArgs) -> OpResult<DevBuf> {
    let out = dev.alloc(OP, a.rows * selection_len(a) * 4)?;
    indexer_topk_into(dev, a, out.ptr())?;
    Ok(out)
}

/// [`indexer_topk`] into a caller's `[rows, K]` i32 buffer at `out`.
pub fn indexer_topk_into(dev: &Dev, a: &IndexerArgs, out: u64) -> OpResult<()> {
    let (free, _) = dev.ctx.mem_get_info().map_err(|e| OpError::new(OP, shapes(a), format!("{e:?}")))?;
    indexer_topk_budget(dev, a, out, WORKSPACE_CAP.min(free / 8))
}

/// [`indexer_topk_into`] with the scores workspace limited to `budget` bytes (at least one row is
/// always processed at a time); rows run in chunks of `budget / (4·round_up(S, 4))`. Public so the
/// tests can force many chunks.
pub fn indexer_topk_budget(dev: &Dev, a: &IndexerArgs, out: u64, budget: usize) -> OpResult<()> {
    check(a)?;
    let k = selection_len(a);
    if a.rows == 0 || k == 0 {
        return Ok(());
    }
    let stride = score_stride(a.max_visible);
    let row_bytes = stride * 4;
    let mut chunk = (budget / row_bytes).clamp(1, a.rows);
    if chunk < a.rows && chunk >= F32_TILE {
        chunk -= chunk % F32_TILE; // whole CTAs of both scoring kernels
    }
    let scores = dev.alloc(OP, chunk * row_bytes)?;
    let es = a.dtype.size() as u64;
    for c0 in (0..a.rows).step_by(chunk) {
        let n = chunk.min(a.rows - c0);
        let c = c0 as u64;
        let sub = IndexerArgs {
            q: a.q + c * (a.heads * a.d) as u64 * es,
            head_w: a.head_w + c * a.heads as u64 * es,
            pos: a.pos + c * 4,
            rows: n,
            ..*a
        };
        indexer_scores(dev, &sub, scores.ptr(), stride)?;
        topk(
            dev,
            &TopkArgs {
                scores: scores.ptr(),
                stride,
                pos: sub.pos,
                rows: n,
                max_visible: a.max_visible,
                topk: a.topk,
                out: out + c * k as u64 * 4,
                path: TopkPath::Auto,
            },
        )?;
    }
    Ok(())
}

/// Which bf16 tensor-core scoring kernel runs; all give bit-identical scores (the same MMA chain
/// per score, and the same order of the head sum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScorePath {
    /// [`ScorePath::KeySplit`] for up to [`KEYSPLIT_MAX_ROWS`] rows of `≤ 32` heads (decode), else
    /// [`ScorePath::Whole`].
    Auto,
    /// A warp per query row, 64-key tiles multiplied and folded whole: ~209 registers, one CTA
    /// (8 warps) per SM.
    Whole,
    /// One query row per CTA, its 8 warps splitting each key tile (8 keys each): for decode, where
    /// the row-per-warp kernels leave 7 of 8 warps idle. `≤ 32` heads. Every row streams all its
    /// keys from memory, so this only pays for a handful of rows.
    KeySplit,
}

/// An environment override of what `Auto` picks (`INDEXCACHE_TOPK=rows|segmented`,
/// `INDEXCACHE_SCORE=whole`), for A/B runs on a GPU; read once.
fn auto_override(var: &'static str) -> Option<&'static str> {
    use std::sync::OnceLock;
    static TOPK: OnceLock<Option<String>> = OnceLock::new();
    static SCORE: OnceLock<Option<String>> = OnceLock::new();
    let cell = if var == "INDEXCACHE_TOPK" { &TOPK } else { &SCORE };
    cell.get_or_init(|| std::env::var(var).ok()).as_deref()
}

/// Most rows for which [`ScorePath::Auto`] takes [`ScorePath::KeySplit`].
pub const KEYSPLIT_MAX_ROWS: usize = 8;

/// Scores only: row `t` of the `[rows, stride]` f32 buffer at `scores` gets `I[t, s]` for
/// `s ≤ pos[t]` (the rest of the row is not written). `stride` a multiple of 4, `≥ max_visible`.
pub fn indexer_scores(dev: &Dev, a: &IndexerArgs, scores: u64, stride: usize) -> OpResult<()> {
    indexer_scores_path(dev, a, scores, stride, ScorePath::Auto)
}

/// [`indexer_scores`] with the bf16 tensor-core kernel chosen (other shapes ignore `path`).
pub fn indexer_scores_path(dev: &Dev, a: &IndexerArgs, scores: u64, stride: usize, path: ScorePath) -> OpResult<()> {
    check(a)?;
    if !stride.is_multiple_of(4) || stride < a.max_visible {
        return Err(OpError::new(OP, shapes(a), format!("score stride {stride}")));
    }
    if a.rows == 0 || a.max_visible == 0 {
        return Ok(());
    }
    let (rows, heads, stride_i) = (a.rows as i32, a.heads as i32, stride as i64);
    let path = match (path, auto_override("INDEXCACHE_SCORE")) {
        (ScorePath::Auto, Some("whole")) => ScorePath::Whole,
        (p, _) => p,
    };
    match a.dtype {
        DType::F32 | DType::BF16 if !tensor_core(a) => {
            let name = if a.dtype == DType::F32 { "indexer_scores_f32" } else { "indexer_scores_cc_bf16" };
            let f = dev.function(&kernels::INDEXER, name)?;
            let d = a.d as i32;
            let cfg = LaunchConfig {
                grid_dim: (blocks(a.max_visible, F32_TILE), blocks(a.rows, F32_TILE), 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = dev.builder(&f);
            b.arg(&a.q).arg(&a.head_w).arg(&a.keys).arg(&a.pos).arg(&scores);
            b.arg(&rows).arg(&heads).arg(&d).arg(&stride_i).arg(&a.scale);
            dev.launch(b, cfg, OP, || shapes(a))
        }
        _ if path == ScorePath::KeySplit
            || (path == ScorePath::Auto && a.rows <= KEYSPLIT_MAX_ROWS && a.heads <= 32) =>
        {
            if a.heads > 32 {
                return Err(OpError::new(OP, shapes(a), "the key-split scoring kernel takes <= 32 heads"));
            }
            let name =
                if a.heads <= 16 { "indexer_scores_bf16_keysplit_m1" } else { "indexer_scores_bf16_keysplit_m2" };
            let f = dev.function(&kernels::INDEXER, name)?;
            set_smem(dev, &f, BF16_SMEM)?;
            // ~2 CTAs per SM over all rows (the kernel fits two per SM), >= 4 tiles each.
            let tiles = a.max_visible.div_ceil(BF16_KEYS);
            let splits = (2 * dev.sm_count as usize).div_ceil(a.rows).clamp(1, tiles.div_ceil(4));
            let split = tiles.div_ceil(splits) * BF16_KEYS;
            let cfg = LaunchConfig {
                grid_dim: (a.rows as u32, blocks(a.max_visible, split), 1),
                block_dim: (32 * BF16_WARPS as u32, 1, 1),
                shared_mem_bytes: BF16_SMEM,
            };
            let (groups, split) = (1i32, split as i32);
            let mut b = dev.builder(&f);
            b.arg(&a.q).arg(&a.head_w).arg(&a.keys).arg(&a.pos).arg(&scores);
            b.arg(&rows).arg(&heads).arg(&groups).arg(&stride_i).arg(&split).arg(&a.scale);
            dev.launch(b, cfg, OP, || shapes(a))
        }
        _ => {
            let (name, groups) = match a.heads {
                0..=16 => ("indexer_scores_bf16_m1", 1),
                17..=32 => ("indexer_scores_bf16_m2", 1),
                _ => ("indexer_scores_bf16_m2", 2),
            };
            let f = dev.function(&kernels::INDEXER, name)?;
            set_smem(dev, &f, BF16_SMEM)?;
            let row_blocks = a.rows.div_ceil(BF16_WARPS / groups);
            // Split the keys so that ~4 CTAs per SM exist even for decode, but keep ≥ 8 tiles each.
            let tiles = a.max_visible.div_ceil(BF16_KEYS);
            let want = (4 * dev.sm_count as usize).div_ceil(row_blocks);
            let splits = want.clamp(1, tiles.div_ceil(8));
            let split = tiles.div_ceil(splits) * BF16_KEYS;
            let cfg = LaunchConfig {
                grid_dim: (row_blocks as u32, blocks(a.max_visible, split), 1),
                block_dim: (32 * BF16_WARPS as u32, 1, 1),
                shared_mem_bytes: BF16_SMEM,
            };
            let (groups, split) = (groups as i32, split as i32);
            let mut b = dev.builder(&f);
            b.arg(&a.q).arg(&a.head_w).arg(&a.keys).arg(&a.pos).arg(&scores);
            b.arg(&rows).arg(&heads).arg(&groups).arg(&stride_i).arg(&split).arg(&a.scale);
            dev.launch(b, cfg, OP, || shapes(a))
        }
    }
}

/// Which top-k kernels run. All of them give the same output, bit for bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkPath {
    /// [`TopkPath::Segmented`] for a few long rows (decode), else [`TopkPath::Stream`] (or
    /// [`TopkPath::Rows`] when `topk > STREAM_MAX_K`).
    Auto,
    /// One CTA per row, radix select reading the row ~2 times (`topk_rows`).
    Rows,
    /// One CTA per row, one read of the row: candidates above a rising threshold stay in shared
    /// memory (`topk_stream`); `topk <= STREAM_MAX_K`.
    Stream,
    /// Histogram and collection passes spread over segments of each row, then one CTA per row.
    Segmented,
}

/// Arguments of [`topk`].
#[derive(Debug, Clone, Copy)]
pub struct TopkArgs {
    /// `[rows, stride]` f32; row `t` valid at `0..=pos[t]`
    pub scores: u64,
    /// floats per row, a multiple of 4
    pub stride: usize,
    /// `[rows]` i32
    pub pos: u64,
    pub rows: usize,
    /// `max(pos) + 1` (fixes the output row length `K = min(topk, max_visible)`)
    pub max_visible: usize,
    pub topk: usize,
    /// `[rows, K]` i32 output
    pub out: u64,
    pub path: TopkPath,
}

fn topk_shapes(a: &TopkArgs) -> String {
    format!("scores [{}, {}], visible {}, topk {}, {:?}", a.rows, a.stride, a.max_visible, a.topk, a.path)
}

/// Exact top-k of each score row (see the module docs); positions in ascending order.
pub fn topk(dev: &Dev, a: &TopkArgs) -> OpResult<()> {
    const TOP: &str = "topk";
    let k = a.topk.min(a.max_visible);
    if !a.stride.is_multiple_of(4) || a.stride < a.max_visible || a.max_visible > MAX_KEYS || a.topk > i32::MAX as usize
    {
        return Err(OpError::new(TOP, topk_shapes(a), "bad stride or too many keys"));
    }
    if a.rows == 0 || k == 0 {
        return Ok(());
    }
    let path = match (a.path, auto_override("INDEXCACHE_TOPK")) {
        (TopkPath::Auto, Some("rows")) => TopkPath::Rows,
        (TopkPath::Auto, Some("segmented")) => TopkPath::Segmented,
        (p, _) => p,
    };
    let path = match path {
        TopkPath::Auto if a.rows * 8 <= dev.sm_count as usize && a.max_visible >= 16384 => TopkPath::Segmented,
        TopkPath::Auto | TopkPath::Stream if a.topk <= STREAM_MAX_K => TopkPath::Stream,
        TopkPath::Auto => TopkPath::Rows,
        TopkPath::Stream => {
            return Err(OpError::new(TOP, topk_shapes(a), format!("the streaming path takes topk <= {STREAM_MAX_K}")));
        }
        p => p,
    };
    let (stride, k_i, topk_i) = (a.stride as i64, k as i32, a.topk as i32);
    let one_cta_per_row =
        |grid: u32| LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (TK_THREADS, 1, 1), shared_mem_bytes: TK_SMEM };
    if path != TopkPath::Segmented {
        let (name, smem) = if path == TopkPath::Stream { ("topk_stream", TS_SMEM) } else { ("topk_rows", TK_SMEM) };
        let f = dev.function(&kernels::TOPK, name)?;
        set_smem(dev, &f, smem)?;
        let mut b = dev.builder(&f);
        b.arg(&a.scores).arg(&stride).arg(&a.pos).arg(&a.out).arg(&k_i).arg(&topk_i);
        let cfg = LaunchConfig { shared_mem_bytes: smem, ..one_cta_per_row(a.rows as u32) };
        return dev.launch(b, cfg, TOP, || topk_shapes(a));
    }
    if a.rows > 65535 {
        return Err(OpError::new(TOP, topk_shapes(a), "the segmented path takes at most 65535 rows"));
    }
    // Segments: ~2 CTAs per SM over all rows, 2048..65536 elements each.
    let per_cta = (a.rows * a.max_visible).div_ceil(2 * dev.sm_count as usize);
    let seg = per_cta.next_multiple_of(2048).clamp(2048, 65536);
    let seg_cfg = LaunchConfig {
        grid_dim: (blocks(a.max_visible, seg), a.rows as u32, 1),
        block_dim: (TK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // Zeroed: histograms, bitmaps, candidate counts. Candidates: `cap` keys + `cap` positions per row.
    let zeroed = dev.alloc_zeroed(TOP, a.rows * (TK_BINS + TK_BITMAP_WORDS + 1) * 4)?;
    let cap = a.stride;
    let cands = dev.alloc(TOP, a.rows * cap * 8)?;
    let ghist = zeroed.ptr();
    let gbitmap = ghist + (a.rows * TK_BINS * 4) as u64;
    let gcand_n = gbitmap + (a.rows * TK_BITMAP_WORDS * 4) as u64;
    let (gcand_key, gcand_pos) = (cands.ptr(), cands.ptr() + (a.rows * cap * 4) as u64);
    let (seg_i, cap_i) = (seg as i32, cap as i64);

    let f = dev.function(&kernels::TOPK, "topk_seg_hist")?;
    let mut b = dev.builder(&f);
    b.arg(&a.scores).arg(&stride).arg(&a.pos).arg(&topk_i).arg(&seg_i).arg(&ghist);
    dev.launch(b, seg_cfg, TOP, || topk_shapes(a))?;

    let f = dev.function(&kernels::TOPK, "topk_seg_collect")?;
    let mut b = dev.builder(&f);
    b.arg(&a.scores).arg(&stride).arg(&a.pos).arg(&topk_i).arg(&seg_i).arg(&ghist);
    b.arg(&gbitmap).arg(&gcand_n).arg(&gcand_key).arg(&gcand_pos).arg(&cap_i);
    dev.launch(b, seg_cfg, TOP, || topk_shapes(a))?;

    let f = dev.function(&kernels::TOPK, "topk_seg_finish")?;
    dev.set_max_smem(&f, TK_SMEM)?;
    let mut b = dev.builder(&f);
    b.arg(&a.pos).arg(&a.out).arg(&k_i).arg(&topk_i).arg(&ghist).arg(&gbitmap);
    b.arg(&gcand_key).arg(&gcand_pos).arg(&cap_i);
    dev.launch(b, one_cta_per_row(a.rows as u32), TOP, || topk_shapes(a))
    // `zeroed` and `cands` are freed stream-ordered, after the kernels.
}

// ---- benchmarks ---------------------------------------------------------------------------------

fn bench_err(e: impl std::fmt::Debug) -> OpError {
    OpError::new("indexer bench", "", format!("{e:?}"))
}

/// Median device time (ms) of `run(i)` over `repeats` runs after one warm-up, CUDA events.
fn time_ms(dev: &Dev, repeats: usize, mut run: impl FnMut(usize) -> OpResult<()>) -> OpResult<f64> {
    use cudarc::driver::sys::CUevent_flags;
    run(0)?;
    dev.sync("indexer bench")?;
    let mut ms = Vec::with_capacity(repeats);
    for i in 0..repeats {
        // Timing events need CU_EVENT_DEFAULT: cudarc's `None` creates them with timing disabled.
        let e0 = dev.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(bench_err)?;
        run(i + 1)?;
        let e1 = dev.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(bench_err)?;
        ms.push(e0.elapsed_ms(&e1).map_err(bench_err)? as f64);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

/// Seeded uniform values in `[-1, 1)` as bf16 bits (host; the same helper the CPU weights use).
fn random_bf16(seed: u64, n: usize) -> Vec<u16> {
    (0..n).map(|i| half::bf16::from_f32(indexcache_ops::random::uniform(seed, i as u64)).to_bits()).collect()
}

/// bf16 scoring (32 heads × 128, 4096 causal rows at the end of 32K and 128K contexts), top-k alone
/// on `[4096, 131072]` f32 rows and on 4096 causal rows of up to 131072 (both top-k paths, `Rows`
/// and `Stream`, for A/B), f32 scoring (the conformance path), and one decode row at 200K (every
/// top-k path). Top-k GB/s count each visible score read once and the selection written once.
pub fn bench(dev: &Dev) -> OpResult<Vec<KernelBench>> {
    const REPEATS: usize = 7;
    let (heads, d, top, rows) = (32usize, 128usize, 2048usize, 4096usize);
    let flops_per_pair = (2 * heads * d) as f64;
    let mut out = Vec::new();
    let s_max = 131_072usize;
    let q = dev.upload("bench", &random_bf16(1, rows * heads * d))?;
    let w = dev.upload("bench", &random_bf16(2, rows * heads))?;
    let keys = dev.upload("bench", &random_bf16(3, s_max * d))?;
    let stride = score_stride(s_max);
    let scores = dev.alloc("bench", rows * stride * 4)?;
    let sel = dev.alloc("bench", rows * top * 4)?;
    let args = |pos: u64, rows: usize, s: usize, dtype: DType, q: u64, w: u64, keys: u64| IndexerArgs {
        dtype,
        q,
        head_w: w,
        keys,
        pos,
        rows,
        heads,
        d,
        max_visible: s,
        topk: top,
        scale: 1.0 / (d as f32).sqrt(),
    };

    for s in [32_768usize, s_max] {
        let pos: Vec<i32> = (s - rows..s).map(|p| p as i32).collect();
        let pos_d = dev.upload("bench", &pos)?;
        let a = args(pos_d.ptr(), rows, s, DType::BF16, q.ptr(), w.ptr(), keys.ptr());
        let pairs: f64 = pos.iter().map(|&p| p as f64 + 1.0).sum();
        let ms = time_ms(dev, REPEATS, |_| indexer_scores_path(dev, &a, scores.ptr(), stride, ScorePath::Whole))?;
        let tflops = pairs * flops_per_pair / (ms * 1e-3) / 1e12;
        out.push(KernelBench {
            kernel: "indexer scores bf16 (mma.sync)".into(),
            shape: format!("{heads}x{d}, {rows} rows at pos {}..{s}, causal", s - rows),
            ms,
            tflops,
            gbps: 0.0,
            of_ceiling: tflops / CEILING_BF16_TFLOPS,
        });
    }

    // Top-k alone on full rows of real scores (filled once by the bf16 kernel, every row seeing all keys).
    let full = dev.upload("bench", &vec![(s_max - 1) as i32; rows])?;
    let a = args(full.ptr(), rows, s_max, DType::BF16, q.ptr(), w.ptr(), keys.ptr());
    indexer_scores(dev, &a, scores.ptr(), stride)?;
    // Then causal rows over the same scores: row t sees (t+1)*S/rows of them (mean ~S/2).
    let causal: Vec<i32> = (0..rows).map(|t| ((t + 1) * s_max / rows - 1) as i32).collect();
    let causal_d = dev.upload("bench", &causal)?;
    let causal_elems: usize = causal.iter().map(|&p| p as usize + 1).sum();
    for (pos, elems, what) in [
        (full.ptr(), rows * s_max, format!("[{rows}, {s_max}] f32")),
        (causal_d.ptr(), causal_elems, format!("{rows} causal rows of <= {s_max} f32")),
    ] {
        for (path, name) in [(TopkPath::Rows, "topk rows (radix select)"), (TopkPath::Stream, "topk rows (stream)")] {
            let t = TopkArgs {
                scores: scores.ptr(),
                stride,
                pos,
                rows,
                max_visible: s_max,
                topk: top,
                out: sel.ptr(),
                path,
            };
            let ms = time_ms(dev, REPEATS, |_| topk(dev, &t))?;
            let gbps = ((elems * 4 + rows * top * 4) as f64) / (ms * 1e-3) / 1e9;
            out.push(KernelBench {
                kernel: name.into(),
                shape: format!("{what}, k {top}"),
                ms,
                tflops: 0.0,
                gbps,
                of_ceiling: gbps / CEILING_GBPS,
            });
        }
    }

    // f32 scoring (conformance path), 1024 causal rows at the end of 16K.
    {
        let (r32, s32) = (1024usize, 16_384usize);
        let qf: Vec<f32> = (0..r32 * heads * d).map(|i| indexcache_ops::random::uniform(4, i as u64)).collect();
        let wf: Vec<f32> = (0..r32 * heads).map(|i| indexcache_ops::random::uniform(5, i as u64)).collect();
        let kf: Vec<f32> = (0..s32 * d).map(|i| indexcache_ops::random::uniform(6, i as u64)).collect();
        let (qf, wf, kf) = (dev.upload("bench", &qf)?, dev.upload("bench", &wf)?, dev.upload("bench", &kf)?);
        let pos: Vec<i32> = (s32 - r32..s32).map(|p| p as i32).collect();
        let pos_d = dev.upload("bench", &pos)?;
        let a = args(pos_d.ptr(), r32, s32, DType::F32, qf.ptr(), wf.ptr(), kf.ptr());
        let st = score_stride(s32);
        let ms = time_ms(dev, REPEATS, |_| indexer_scores(dev, &a, scores.ptr(), st))?;
        let pairs: f64 = pos.iter().map(|&p| p as f64 + 1.0).sum();
        out.push(KernelBench {
            kernel: "indexer scores f32 (CUDA cores)".into(),
            shape: format!("{heads}x{d}, {r32} rows at pos {}..{s32}, causal", s32 - r32),
            ms,
            tflops: pairs * flops_per_pair / (ms * 1e-3) / 1e12,
            gbps: 0.0,
            of_ceiling: 0.0,
        });
    }

    // Decode: one row at 200K; three key caches (51 MB each) rotate so the keys come from HBM.
    let s_dec = 200_000usize;
    let dec_keys: Vec<DevBuf> =
        (0..3).map(|i| dev.upload("bench", &random_bf16(10 + i, s_dec * d))).collect::<OpResult<_>>()?;
    let dec_pos = dev.upload("bench", &[(s_dec - 1) as i32])?;
    let dec_stride = score_stride(s_dec);
    let dec = |i: usize| args(dec_pos.ptr(), 1, s_dec, DType::BF16, q.ptr(), w.ptr(), dec_keys[i % 3].ptr());
    let key_bytes = (s_dec * d * 2) as f64;
    for (path, name) in [
        (ScorePath::Whole, "indexer scores bf16 decode"),
        (ScorePath::KeySplit, "indexer scores bf16 decode (key split)"),
    ] {
        let ms = time_ms(dev, REPEATS, |i| indexer_scores_path(dev, &dec(i), scores.ptr(), dec_stride, path))?;
        let gbps = key_bytes / (ms * 1e-3) / 1e9;
        out.push(KernelBench {
            kernel: name.into(),
            shape: format!("1 row, {s_dec} keys, {heads}x{d}"),
            ms,
            tflops: s_dec as f64 * flops_per_pair / (ms * 1e-3) / 1e12,
            gbps,
            of_ceiling: gbps / CEILING_GBPS,
        });
    }
    for path in [TopkPath::Segmented, TopkPath::Rows, TopkPath::Stream] {
        let t = TopkArgs {
            scores: scores.ptr(),
            stride: dec_stride,
            pos: dec_pos.ptr(),
            rows: 1,
            max_visible: s_dec,
            topk: top,
            out: sel.ptr(),
            path,
        };
        let ms = time_ms(dev, REPEATS, |_| topk(dev, &t))?;
        let gbps = (s_dec * 4) as f64 / (ms * 1e-3) / 1e9;
        out.push(KernelBench {
            kernel: format!("topk decode ({path:?})"),
            shape: format!("1 row, {s_dec} keys, k {top}"),
            ms,
            tflops: 0.0,
            gbps,
            of_ceiling: gbps / CEILING_GBPS,
        });
    }
    let ms = time_ms(dev, REPEATS, |i| indexer_topk_into(dev, &dec(i), sel.ptr()))?;
    out.push(KernelBench {
        kernel: "indexer_topk decode (scores + top-k, with workspace alloc)".into(),
        shape: format!("1 row, {s_dec} keys, {heads}x{d}, k {top}"),
        ms,
        tflops: 0.0,
        gbps: key_bytes / (ms * 1e-3) / 1e9,
        of_ceiling: 0.0,
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use crate::{dev, kernels};

    /// Both kernel files compile with NVRTC (no GPU needed); skipped where libnvrtc is absent.
    #[test]
    fn indexer_and_topk_kernels_compile() {
        if !dev::nvrtc_present() {
            eprintln!("skipped: libnvrtc not found");
            return;
        }
        for src in [&kernels::INDEXER, &kernels::TOPK] {
            if let Err(e) = dev::compile(src) {
                panic!("{e}");
            }
        }
    }
}
