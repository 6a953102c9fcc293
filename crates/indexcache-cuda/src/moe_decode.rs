//! A MoE expert FFN for decode-sized batches that never leaves the device ([`moe_small`]).
//!
//! [`crate::backend`]'s general `moe` downloads the per-expert token counts (one host sync per MoE
//! layer) and launches one cuBLAS GEMM pair per non-empty expert. For `T ≤ `[`MAX_DECODE_TOKENS`]
//! tokens this path replaces everything after the routing kernel with two kernel launches and no
//! synchronisation (`kernels/moe_decode.cu`):
//!
//! 1. **gate/up** (`moe_decode_gate_up_*`): every CTA builds the work list from the `[T, top_k]`
//!    expert ids in shared memory — a slot `q` *leads* its expert if no earlier slot uses it, later
//!    slots with that expert are its *members*. Slots `q = t·top_k + j < T·top_k` are the routed
//!    pairs; with a fused shared expert, slot `T·top_k + t` is token `t`'s shared-expert slot (a
//!    pseudo-expert `E` with `T` members and its own gate/up/down base pointers, see below). A unit
//!    of work is (leader, intermediate row `i`), one warp each, strided over a persistent grid sized
//!    to the resident capacity. The warp streams gate row `i` and up row `i` of the expert (16-byte
//!    loads, L1 bypassed, 512 contiguous bytes per warp instruction), dots them with `x[t]` of every
//!    member in f32, reduces with warp shuffles and writes `h[q, i] = silu(g)·u` (f32) to a
//!    `[slots, I]` workspace. An expert's weights — the shared expert's included — are read **once
//!    per call** however many tokens route to it.
//! 2. **down + combine** (`moe_decode_down_*`): a CTA owns a slice of 4 output rows; one warp per
//!    (leader, row) computes `y[q, r] = down_e[r]·h[q]` for the members into shared memory, then
//!    `out[t, r] = Σ_j w[t,j]·y[t·top_k + j, r]` in `j` order (f32), plus `y[T·top_k + t, r]` of the
//!    fused shared expert (weight 1), plus a precomputed shared-expert output if one is given (in
//!    f32, as `moe.cu`'s `moe_combine`), is converted and stored.
//!
//! **Fused shared expert.** A DeepSeek-style block's shared expert (`Moe::shared`, width `Is`) is a
//! dense SwiGLU MLP every token goes through. When `Is == I`, [`MoeSmallArgs::shared_gate`],
//! [`MoeSmallArgs::shared_up`] (`[I, hidden]` each) and [`MoeSmallArgs::shared_down`]
//! (`[hidden, I]`) make it one more expert slot per token with weight 1.0, computed by the same two
//! launches: no separate 4-launch MLP (2 GEMMs, silu_mul, 1 GEMM) per layer, and its output is
//! added in f32 before the one rounding instead of being rounded to the storage type first. In the
//! plan it is expert id `E`; a routed expert's up row is `I` rows after its gate row in the stacked
//! `gate_up`, the shared expert's gate and up rows come from their own matrices.
//!
//! **Early loads.** With a fused shared expert, the gate/up kernel puts the shared expert's units
//! first in its work order: they need no routing, so a warp whose first unit is one loads that
//! row pair before waiting for the routing kernel (programmatic dependent launch), while the
//! router still runs. Which warp computes a unit never changes its bits.
//!
//! Both kernels can prefetch the weight rows a warp will read `pf` units ahead into L2
//! (`cp.async.bulk.prefetch.L2`, one instruction per row, no registers).
//!
//! **Resources.** 128-thread CTAs, `__launch_bounds__(128, 4)`: ≤ 128 registers, no spills (ptxas
//! 13.0, sm_90a: gate/up 117 bf16 / 128 f32, down 128 / 119), 4.3 KB (gate/up) and 8.5 KB (down) of
//! static shared memory (work lists and `y` sized for 256 pairs + 16 shared slots) — 16 resident
//! warps per SM, each keeping a 4 KB gate row + 4 KB up row (gate/up) or a 3 KB down row plus 2
//! prefetched ones in flight. Grids are sized from the occupancy query.
//!
//! **Determinism.** No atomics; every sum has a fixed order; a slot's dot products do not depend
//! on which other slots share its expert, so a token's output is bitwise independent of the rest of
//! the batch, with or without the fused shared expert (tested).
//!
//! **Cost** (per call; `D` distinct experts among the `T·top_k` picks, `S` = 1 with a fused shared
//! expert else 0, `s` bytes per element): weights `(D + S) · 3·hidden·I·s` bytes read once (a slot
//! beyond the 4th member of an expert re-reads the row from L2), `2·T·(top_k + S)·3·hidden·I`
//! FLOPs. On the 30B benchmark shape (hidden 2048, I 1536, E 64, top-4, bf16) one expert is
//! `3·2048·1536·2 B = 18.87 MB` (12.58 MB gate/up + 6.29 MB down), so a decode token reads
//! `4 × 18.87 = 75.5 MB` per layer for the routed experts: 17.8 µs at the 4245 GB/s copy ceiling,
//! 29.6 µs at 60 % of it; with the fused shared expert (`Is` = 1536) `5 × 18.87 = 94.4 MB`: 22.2 µs
//! at the ceiling, 37.1 µs at 60 %. [`bench()`] reports T = 1, 8 and 16, T = 1 with the fused shared
//! expert, and each kernel alone.
//!
//! Ids outside `[0, E)` contribute zero (the routing kernel never produces them). A shared expert
//! of another width (or any precomputed shared term) can still be run by the caller
//! (`Backend::mlp`) and passed as [`MoeSmallArgs::shared`], which the combine adds before the one
//! rounding, exactly as the general path's `moe_combine` does.

use crate::dev::{Dev, DevBuf};
use crate::{CEILING_GBPS, KernelBench, kernels};
use cudarc::driver::{CudaFunction, LaunchConfig};
use indexcache_ops::{DType, OpError, OpResult};
use std::sync::Mutex;

/// Most tokens [`moe_small`] takes; the backend uses the general path above this.
pub const MAX_DECODE_TOKENS: usize = 16;
/// Most `(token, pick)` pairs, `T·top_k` (the per-CTA work list; `MAX_PAIRS` in the .cu file).
pub const MAX_PAIRS: usize = 256;

const OP: &str = "moe_small";
/// Threads per CTA of both kernels (`THREADS` in the .cu file: the launch bounds).
const THREADS: u32 = 128;
/// Output rows per slice of the down kernel (`DN_ROWS` in the .cu file).
const DN_ROWS: usize = 4;
/// L2 prefetch distance (units ahead per warp) of the gate/up and down kernels. Measured on the
/// H200 (kernel_bench, 2026-12-01, T 1 on the 30B shape): prefetch off is fastest for both
/// (gate/up 18.5 µs vs 22.2 at 1; down+combine 12.1 µs vs 13.8 at 1 and 14.7 at 2).
const GU_PREFETCH: i32 = 0;
const DN_PREFETCH: i32 = 0;
/// Copies of the fused shared expert [`bench`] rotates over (each 18.9 MB at the 30B shape), so
/// consecutive calls, like consecutive layers, read it from HBM rather than L2.
const SHARED_SETS: usize = 4;

/// Arguments of [`moe_small`]: raw device addresses, row-major.
#[derive(Debug, Clone, Copy)]
pub struct MoeSmallArgs {
    /// Element type of `x`, `gate_up`, `down` and `out` (f32 or bf16).
    pub dtype: DType,
    /// `[tokens, hidden]`
    pub x: u64,
    /// `[tokens, top_k]` i32 expert ids (`moe_route`'s `ids`)
    pub ids: u64,
    /// `[tokens, top_k]` f32 combine weights (`moe_route`'s `wts`)
    pub weights: u64,
    /// `[n_experts, 2·inter, hidden]`: rows `0..inter` gate, `inter..2·inter` up
    pub gate_up: u64,
    /// `[n_experts, hidden, inter]`
    pub down: u64,
    /// `[tokens, hidden]` shared-expert output added before the one rounding (as `moe_combine`
    /// does), or 0 for none
    pub shared: u64,
    /// Fused shared expert (one more expert slot per token, weight 1.0): gate `[inter, hidden]`,
    /// or 0 for none. Its width must be `inter`. `shared_gate`, `shared_up` and `shared_down` are
    /// all 0 or all set.
    pub shared_gate: u64,
    /// Fused shared expert's up `[inter, hidden]`, or 0.
    pub shared_up: u64,
    /// Fused shared expert's down `[hidden, inter]`, or 0.
    pub shared_down: u64,
    /// `[tokens, hidden]` output: overwritten, or added to (`accumulate`)
    pub out: u64,
    /// `out += result` (the result rounded to the element type first, as a separate add would
    /// see it) instead of `out = result`
    pub accumulate: bool,
    /// The post-attention add + RMSNorm done by the kernels (0: off): `x` is then the residual
    /// stream before the add, `out == x` with `accumulate`, and the expert input is
    /// `rms_norm(x + pre_y)` with weights `pre_w` (f32 `[hidden]`), computed by every gate/up CTA
    /// (`moe_decode_gate_up_pre_bf16`, bf16 only) while the routing kernel still runs — the fused
    /// shared expert's rows before its result — and `x + pre_y` stored by the down kernel with
    /// the expert sum (the same bits as add_rms_norm then the MoE).
    pub pre_y: u64,
    pub pre_w: u64,
    pub pre_eps: f32,
    pub tokens: usize,
    pub hidden: usize,
    pub inter: usize,
    pub n_experts: usize,
    pub top_k: usize,
}

fn shapes(a: &MoeSmallArgs) -> String {
    let fused =
        if fused_shared(a) { format!(", fused shared expert [{}, {}]", a.inter, a.hidden) } else { String::new() };
    format!(
        "{} x [{}, {}], ids [{}, {}], gate_up [{}, {}, {}], down [{}, {}, {}]{fused}",
        a.dtype.name(),
        a.tokens,
        a.hidden,
        a.tokens,
        a.top_k,
        a.n_experts,
        2 * a.inter,
        a.hidden,
        a.n_experts,
        a.hidden,
        a.inter
    )
}

/// Is a shared expert fused into the kernels (any of its weight pointers set; [`check`] requires
/// all three)?
fn fused_shared(a: &MoeSmallArgs) -> bool {
    a.shared_gate != 0 || a.shared_up != 0 || a.shared_down != 0
}

/// Expert slots of a call: `tokens·top_k` routed pairs, plus one per token for a fused shared
/// expert (the rows of the workspace).
fn slots(a: &MoeSmallArgs) -> usize {
    a.tokens * a.top_k + if fused_shared(a) { a.tokens } else { 0 }
}

/// Bytes of the f32 `[slots, inter]` workspace of [`moe_small_ws`]: `slots = tokens·top_k`, plus
/// `tokens` with a fused shared expert.
pub fn workspace_bytes(a: &MoeSmallArgs) -> usize {
    slots(a) * a.inter * 4
}

/// Does [`moe_small`] take these arguments? (Host-only checks; the backend can test this first
/// and fall back to the general path.) Requirements: `tokens ≤ MAX_DECODE_TOKENS`,
/// `1 ≤ tokens·top_k ≤ MAX_PAIRS`, `hidden` and `inter` multiples of 8 (bf16) / 4 (f32), every
/// tensor address 16-byte aligned (ids and weights 4-byte), sizes within i32, and the fused shared
/// expert's three weight pointers all 0 or all set.
pub fn check(a: &MoeSmallArgs) -> OpResult<()> {
    let bad = |why: String| Err(OpError::new(OP, shapes(a), why));
    let per_vec = 16 / a.dtype.size();
    let n = a.tokens.saturating_mul(a.top_k);
    if a.tokens > MAX_DECODE_TOKENS {
        return bad(format!("{} tokens; the decode path takes at most {MAX_DECODE_TOKENS}", a.tokens));
    }
    if a.top_k == 0 || n > MAX_PAIRS {
        return bad(format!("top_k {} (tokens·top_k must be 1..={MAX_PAIRS})", a.top_k));
    }
    if a.hidden == 0 || a.inter == 0 || a.n_experts == 0 {
        return bad("empty hidden, inter or expert dimension".into());
    }
    if !a.hidden.is_multiple_of(per_vec) || !a.inter.is_multiple_of(per_vec) {
        return bad(format!("hidden and inter must be multiples of {per_vec} (16-byte vectors)"));
    }
    let max = i32::MAX as usize;
    let row_bytes = a.hidden.max(a.inter).saturating_mul(a.dtype.size());
    if a.hidden > max || a.inter > max / 2 || a.n_experts > max || row_bytes > u32::MAX as usize {
        return bad("dimension too large for the kernels' i32 arguments".into());
    }
    let aligned16 = [a.x, a.gate_up, a.down, a.out].iter().all(|p| p.is_multiple_of(16));
    if !aligned16 || !a.ids.is_multiple_of(4) || !a.weights.is_multiple_of(4) {
        return bad("x, gate_up, down, out must be 16-byte aligned, ids and weights 4-byte".into());
    }
    if !a.shared.is_multiple_of(a.dtype.size() as u64) {
        return bad("shared must be aligned to its element size".into());
    }
    let fused = [a.shared_gate, a.shared_up, a.shared_down];
    if fused.iter().any(|&p| p != 0) && fused.contains(&0) {
        return bad("shared_gate, shared_up and shared_down must be all 0 or all set".into());
    }
    if !fused.iter().all(|p| p.is_multiple_of(16)) {
        return bad("shared_gate, shared_up, shared_down must be 16-byte aligned".into());
    }
    if a.pre_y != 0 {
        if a.dtype != DType::BF16 || !a.accumulate || a.out != a.x || a.shared != 0 {
            return bad("the pre-norm mode takes bf16, out == x with accumulate and no separate shared output".into());
        }
        if !a.pre_y.is_multiple_of(16) || !a.pre_w.is_multiple_of(4) || a.pre_w == 0 {
            return bad("pre_y must be 16-byte aligned and pre_w 4-byte aligned".into());
        }
        if pre_smem(a) > PRE_SMEM_MAX {
            return bad(format!("the normalised rows need {} bytes of shared memory", pre_smem(a)));
        }
    }
    Ok(())
}

/// Threads per CTA of the pre-norm gate/up kernel (`PRE_THREADS` in moe_decode.cu: the 256 of
/// add_rms_norm, whose reduction it repeats).
const PRE_THREADS: u32 = 256;
/// Dynamic shared memory the pre-norm gate/up kernel may ask for: with its ~37 KB static (norm
/// staging, plan) two CTAs still fit an SM.
const PRE_SMEM_MAX: usize = 64 * 1024;

/// Dynamic shared memory of the pre-norm gate/up kernel: the normalised rows, bf16.
fn pre_smem(a: &MoeSmallArgs) -> usize {
    a.tokens * a.hidden * 2
}

/// `out[t] = Σ_j w[t,j] · down_e(silu(gate_e x[t]) ⊙ up_e x[t]) (+ down_s(silu(gate_s x[t]) ⊙
/// up_s x[t])) (+ shared[t])`, `e = ids[t,j]`, `s` the fused shared expert, summed in f32 in `j`
/// order then the shared terms, rounded once; enqueued on `dev.stream` with no host
/// synchronisation. Allocates the f32 workspace (stream-ordered, freed after the kernels).
/// `tokens == 0` does nothing.
pub fn moe_small(dev: &Dev, a: &MoeSmallArgs) -> OpResult<()> {
    check(a)?;
    if a.tokens == 0 {
        return Ok(());
    }
    let ws = dev.alloc(OP, workspace_bytes(a))?;
    moe_small_ws(dev, a, ws.ptr())
}

/// [`moe_small`] with a caller's workspace of [`workspace_bytes`] bytes at `ws` (16-byte aligned).
pub fn moe_small_ws(dev: &Dev, a: &MoeSmallArgs, ws: u64) -> OpResult<()> {
    check(a)?;
    if !ws.is_multiple_of(16) {
        return Err(OpError::new(OP, shapes(a), "workspace must be 16-byte aligned"));
    }
    if a.tokens == 0 {
        return Ok(());
    }
    gate_up(dev, a, ws, GU_PREFETCH)?;
    down(dev, a, ws, DN_PREFETCH)
}

fn kernel_name(a: &MoeSmallArgs, stage: &str) -> &'static str {
    match (stage, a.dtype) {
        ("gate_up", DType::F32) => "moe_decode_gate_up_f32",
        ("gate_up", DType::BF16) => "moe_decode_gate_up_bf16",
        (_, DType::F32) => "moe_decode_down_f32",
        (_, DType::BF16) => "moe_decode_down_bf16",
    }
}

/// Resident CTAs per SM of `f` at `threads` threads and `smem` bytes of dynamic shared memory
/// (cached per device, kernel and shared memory; the grid size only affects speed, never results).
fn blocks_per_sm(dev: &Dev, f: &CudaFunction, name: &'static str, threads: u32, smem: usize) -> OpResult<usize> {
    type Key = (usize, &'static str, usize); // device, kernel, dynamic shared memory
    static CACHE: Mutex<Vec<(Key, usize)>> = Mutex::new(Vec::new());
    let key = (dev.ctx.ordinal(), name, smem);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&(_, v)) = cache.iter().find(|(k, _)| *k == key) {
        return Ok(v);
    }
    let v = f
        .occupancy_max_active_blocks_per_multiprocessor(threads, smem, None)
        .map_err(|e| OpError::new(OP, name, format!("occupancy query: {e:?}")))? as usize;
    let v = v.max(1);
    cache.push((key, v));
    Ok(v)
}

/// The gate/up kernel loads the fused shared expert's first weight rows before waiting for the
/// routing kernel (PDL), its units first in the work order; `INDEXCACHE_MOE_EARLY=0` turns the
/// early loads off (same bits either way). 1 = on. (The same change to the down kernel measured
/// 14.6 -> 20.2 us per layer on the H200 — its rewritten loop lost its loads in flight — and was
/// reverted.)
fn early_loads() -> i32 {
    static ON: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("INDEXCACHE_MOE_EARLY").map_or(1, |v| i32::from(v != "0")))
}

/// Kernel 1: `h[q, i] = silu(gate_e[i]·x[t]) · (up_e[i]·x[t])` into the workspace at `ws` (slot
/// `q` of every routed pair and of the fused shared expert).
fn gate_up(dev: &Dev, a: &MoeSmallArgs, ws: u64, pf: i32) -> OpResult<()> {
    let pre = a.pre_y != 0;
    let name = if pre { "moe_decode_gate_up_pre_bf16" } else { kernel_name(a, "gate_up") };
    let f = dev.function(&kernels::MOE_DECODE, name)?;
    let (threads, smem) = if pre { (PRE_THREADS, pre_smem(a)) } else { (THREADS, 0) };
    if pre {
        dev.set_max_smem(&f, smem as u32)?; // beyond 48 KB with the static norm staging and plan
    }
    let n = a.tokens * a.top_k;
    // Units: (distinct expert, intermediate row), one warp each; at most min(n, E) routed experts
    // plus the fused shared expert.
    let max_units = (n.min(a.n_experts) + usize::from(fused_shared(a))) * a.inter;
    let warps = threads as usize / 32;
    let resident = dev.sm_count as usize * blocks_per_sm(dev, &f, name, threads, smem)?;
    let grid = resident.min(max_units.div_ceil(warps)).max(1);
    let cfg = LaunchConfig { grid_dim: (grid as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem as u32 };
    let (n_i, k_i, e_i, hid_i, int_i) = (n as i32, a.top_k as i32, a.n_experts as i32, a.hidden as i32, a.inter as i32);
    let early = early_loads();
    let mut b = dev.builder(&f);
    if pre {
        b.arg(&a.x).arg(&a.pre_y).arg(&a.pre_w).arg(&a.pre_eps);
        b.arg(&a.ids).arg(&a.gate_up).arg(&a.shared_gate).arg(&a.shared_up).arg(&ws);
        b.arg(&n_i).arg(&k_i).arg(&e_i).arg(&hid_i).arg(&int_i).arg(&pf);
    } else {
        b.arg(&a.x).arg(&a.ids).arg(&a.gate_up).arg(&a.shared_gate).arg(&a.shared_up).arg(&ws);
        b.arg(&n_i).arg(&k_i).arg(&e_i).arg(&hid_i).arg(&int_i).arg(&pf).arg(&early);
    }
    dev.launch(b, cfg, OP, || shapes(a))
}

/// Kernel 2: `out[t] = Σ_j w[t,j] · down_e·h[t·top_k + j] (+ down_s·h[T·top_k + t]) (+ shared[t])`
/// from the workspace at `ws`.
fn down(dev: &Dev, a: &MoeSmallArgs, ws: u64, pf: i32) -> OpResult<()> {
    let name = kernel_name(a, "down");
    let f = dev.function(&kernels::MOE_DECODE, name)?;
    let n = a.tokens * a.top_k;
    let slices = a.hidden.div_ceil(DN_ROWS);
    let grid = (dev.sm_count as usize * blocks_per_sm(dev, &f, name, THREADS, 0)?).min(slices).max(1);
    let cfg = LaunchConfig { grid_dim: (grid as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let (n_i, k_i, e_i, hid_i, int_i) = (n as i32, a.top_k as i32, a.n_experts as i32, a.hidden as i32, a.inter as i32);
    let mut b = dev.builder(&f);
    let acc_i = a.accumulate as i32;
    b.arg(&ws).arg(&a.ids).arg(&a.weights).arg(&a.down).arg(&a.shared_down).arg(&a.shared).arg(&a.out);
    b.arg(&n_i).arg(&k_i).arg(&e_i).arg(&hid_i).arg(&int_i).arg(&pf).arg(&acc_i).arg(&a.pre_y);
    dev.launch(b, cfg, OP, || shapes(a))
}

// ---- benchmark ----------------------------------------------------------------------------------

fn bench_err(e: impl std::fmt::Debug) -> OpError {
    OpError::new("moe_small bench", "", format!("{e:?}"))
}

/// Median device time (ms) of one `run(i)`: 9 rounds of `per` calls between two CUDA events (the
/// first 2 rounds warm up), `i` counting every call so inputs rotate.
fn time_ms(dev: &Dev, per: usize, mut run: impl FnMut(usize) -> OpResult<()>) -> OpResult<f64> {
    use cudarc::driver::sys::CUevent_flags;
    let mut times = Vec::new();
    let mut i = 0;
    for round in 0..9 {
        // Timing events need CU_EVENT_DEFAULT: cudarc's `None` creates them with timing disabled.
        let e0 = dev.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(bench_err)?;
        for _ in 0..per {
            run(i)?;
            i += 1;
        }
        let e1 = dev.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(bench_err)?;
        let ms = e0.elapsed_ms(&e1).map_err(bench_err)? as f64;
        if round >= 2 {
            times.push(ms / per as f64);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Seeded uniform bf16 values in `[-bound, bound)` written on the device (elementwise.cu).
fn random_fill_bf16(dev: &Dev, ptr: u64, n: usize, seed: u64, bound: f32) -> OpResult<()> {
    let f = dev.function(&kernels::ELEMENTWISE, "random_fill_bf16")?;
    let cfg = LaunchConfig { grid_dim: (1024, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let n_i = n as i64;
    let mut b = dev.builder(&f);
    b.arg(&ptr).arg(&n_i).arg(&seed).arg(&bound);
    dev.launch(b, cfg, "moe_small bench", || format!("random fill {n}"))
}

/// Ids of `tokens` tokens over `distinct` consecutive experts from `base` (mod `n_exp`): token `t`
/// picks `a_t .. a_t + top_k` with `a_t` spread over `0..=distinct - top_k`, so every expert of the
/// window is used and neighbouring tokens share experts.
fn bench_ids(tokens: usize, top_k: usize, distinct: usize, base: usize, n_exp: usize) -> Vec<i32> {
    let mut ids = Vec::with_capacity(tokens * top_k);
    for t in 0..tokens {
        let a = if tokens > 1 { t * (distinct - top_k) / (tokens - 1) } else { 0 };
        ids.extend((0..top_k).map(|j| ((base + a + j) % n_exp) as i32));
    }
    ids
}

/// The 30B decode shape (hidden 2048, I 1536, 64 experts, top-4, bf16): the whole call at T = 1, 8
/// and 16 (4, 24 and 40 distinct experts), the whole call at T = 1 with a fused shared expert of
/// width 1536 (rotating over `SHARED_SETS` copies, as every layer has its own), and each kernel
/// alone at T = 1 with and without L2 prefetch. GB/s count the distinct experts' weights (and the
/// shared expert's) read once; consecutive calls use disjoint experts (the expert tensors are
/// 1.2 GB, far beyond L2), so the weights come from HBM.
pub fn bench(dev: &Dev) -> OpResult<Vec<KernelBench>> {
    const PER: usize = 20;
    let (hidden, inter, n_exp, top_k) = (2048usize, 1536usize, 64usize, 4usize);
    let gu_elems = n_exp * 2 * inter * hidden;
    let dn_elems = n_exp * hidden * inter;
    let gu = dev.alloc("moe_small bench", gu_elems * 2)?;
    let dn = dev.alloc("moe_small bench", dn_elems * 2)?;
    random_fill_bf16(dev, gu.ptr(), gu_elems, 11, 0.05)?;
    random_fill_bf16(dev, dn.ptr(), dn_elems, 12, 0.05)?;
    let tmax = MAX_DECODE_TOKENS;
    let xs: Vec<u16> = (0..tmax * hidden)
        .map(|i| half::bf16::from_f32(indexcache_ops::random::uniform(13, i as u64)).to_bits())
        .collect();
    let x = dev.upload("moe_small bench", &xs)?;
    let w: Vec<f32> = (0..tmax * top_k).map(|i| 0.5 + 0.5 * indexcache_ops::random::uniform(14, i as u64)).collect();
    let w = dev.upload("moe_small bench", &w)?;
    let out = dev.alloc("moe_small bench", tmax * hidden * 2)?;
    let ws = dev.alloc_zeroed("moe_small bench", tmax * (top_k + 1) * inter * 4)?;
    // Fused shared experts (width `inter`): SHARED_SETS copies of gate, up `[inter, hidden]` and
    // down `[hidden, inter]`, one buffer each.
    let sh_elems = inter * hidden;
    let sh: Vec<[DevBuf; 3]> = (0..SHARED_SETS)
        .map(|k| -> OpResult<[DevBuf; 3]> {
            let one = || dev.alloc("moe_small bench", sh_elems * 2);
            let m = [one()?, one()?, one()?];
            for (j, b) in m.iter().enumerate() {
                random_fill_bf16(dev, b.ptr(), sh_elems, 20 + 3 * k as u64 + j as u64, 0.05)?;
            }
            Ok(m)
        })
        .collect::<OpResult<_>>()?;
    let expert_bytes = (3 * hidden * inter * 2) as f64;
    let args = |tokens: usize, ids: &DevBuf| MoeSmallArgs {
        dtype: DType::BF16,
        x: x.ptr(),
        ids: ids.ptr(),
        weights: w.ptr(),
        gate_up: gu.ptr(),
        down: dn.ptr(),
        shared: 0,
        shared_gate: 0,
        shared_up: 0,
        shared_down: 0,
        out: out.ptr(),
        accumulate: false,
        pre_y: 0,
        pre_w: 0,
        pre_eps: 0.0,
        tokens,
        hidden,
        inter,
        n_experts: n_exp,
        top_k,
    };
    let row = |kernel: String, shape: String, ms: f64, bytes: f64, flops: f64| {
        let gbps = bytes / (ms * 1e-3) / 1e9;
        KernelBench { kernel, shape, ms, tflops: flops / (ms * 1e-3) / 1e12, gbps, of_ceiling: gbps / CEILING_GBPS }
    };
    let mut rows = Vec::new();
    for (tokens, distinct) in [(1usize, 4usize), (8, 24), (16, 40)] {
        let sets = n_exp / distinct.min(n_exp / 2);
        let ids: Vec<DevBuf> = (0..sets)
            .map(|s| dev.upload("moe_small bench", &bench_ids(tokens, top_k, distinct, s * distinct, n_exp)))
            .collect::<OpResult<_>>()?;
        let ms = time_ms(dev, PER, |i| moe_small_ws(dev, &args(tokens, &ids[i % sets]), ws.ptr()))?;
        let shape = format!("T {tokens}, {distinct} experts of 64, top-4, hidden {hidden}, I {inter} bf16");
        let flops = 6.0 * (tokens * top_k * hidden * inter) as f64;
        rows.push(row(
            "moe_small (gate_up + down/combine)".into(),
            shape.clone(),
            ms,
            distinct as f64 * expert_bytes,
            flops,
        ));
        if tokens == 1 {
            let ms = time_ms(dev, PER, |i| moe_small(dev, &args(tokens, &ids[i % sets])))?;
            rows.push(row("moe_small incl. workspace alloc".into(), shape.clone(), ms, 4.0 * expert_bytes, flops));
            let fused = |i: usize| {
                let m = &sh[i % SHARED_SETS];
                MoeSmallArgs {
                    shared_gate: m[0].ptr(),
                    shared_up: m[1].ptr(),
                    shared_down: m[2].ptr(),
                    ..args(tokens, &ids[i % sets])
                }
            };
            // Then the same with the post-attention add + RMSNorm inside the gate/up kernel (the
            // decode layer's `add_rms_norm_moe`): x += y + MoE(rms_norm(x + y)).
            let y = dev.upload("moe_small bench", &xs[hidden..2 * hidden])?;
            let nw = dev.upload("moe_small bench", &vec![1.0f32; hidden])?;
            let res = dev.upload("moe_small bench", &xs[..hidden])?;
            let pre = |i: usize| MoeSmallArgs {
                x: res.ptr(),
                out: res.ptr(),
                accumulate: true,
                pre_y: y.ptr(),
                pre_w: nw.ptr(),
                pre_eps: 1e-6,
                ..fused(i)
            };
            for (name, with_pre) in [
                ("moe_decode fused shared expert", false),
                ("moe_decode fused shared expert, add + RMSNorm inside (pre)", true),
            ] {
                let a = |i: usize| if with_pre { pre(i) } else { fused(i) };
                let ms = time_ms(dev, PER, |i| moe_small_ws(dev, &a(i), ws.ptr()))?;
                rows.push(row(
                    name.into(),
                    format!("{shape} + 1 shared of {inter}"),
                    ms,
                    (distinct + 1) as f64 * expert_bytes,
                    6.0 * (tokens * (top_k + 1) * hidden * inter) as f64,
                ));
            }
            for pf in [0, 1] {
                let ms = time_ms(dev, PER, |i| gate_up(dev, &args(tokens, &ids[i % sets]), ws.ptr(), pf))?;
                let bytes = 4.0 * expert_bytes * 2.0 / 3.0;
                rows.push(row(
                    format!("moe_decode gate_up (L2 prefetch {pf})"),
                    shape.clone(),
                    ms,
                    bytes,
                    flops * 2.0 / 3.0,
                ));
            }
            for pf in [0, 1, 2] {
                let ms = time_ms(dev, PER, |i| down(dev, &args(tokens, &ids[i % sets]), ws.ptr(), pf))?;
                let bytes = 4.0 * expert_bytes / 3.0;
                rows.push(row(
                    format!("moe_decode down+combine (L2 prefetch {pf})"),
                    shape.clone(),
                    ms,
                    bytes,
                    flops / 3.0,
                ));
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev;

    /// `moe_decode.cu` compiles with NVRTC (no GPU needed) and has the four entry points with the
    /// parameter lists launched above (pointers/ints in order).
    #[test]
    fn moe_decode_kernels_compile() {
        if !dev::nvrtc_present() {
            eprintln!("skipped: libnvrtc not found");
            return;
        }
        let ptx = dev::compile(&kernels::MOE_DECODE).unwrap_or_else(|e| panic!("{e}")).to_src();
        // (kernel, pointer arguments, i32 arguments): `gate_up` / `down` launch them so.
        for (name, ptrs, ints) in [
            ("moe_decode_gate_up_f32", 6, 7),
            ("moe_decode_gate_up_bf16", 6, 7),
            ("moe_decode_down_f32", 7, 7),
            ("moe_decode_down_bf16", 7, 7),
        ] {
            let kinds = entry_params(&ptx, name);
            let mut want: Vec<&str> =
                std::iter::repeat_n("u64", ptrs).chain(std::iter::repeat_n("u32", ints)).collect();
            if name.contains("down") {
                want.push("u64"); // ypre
            }
            assert_eq!(kinds, want, "{name}");
        }
        // res, y, nw, eps, ids, gate_up, shared gate, shared up, h, then n .. pf.
        let kinds = entry_params(&ptx, "moe_decode_gate_up_pre_bf16");
        let want: Vec<&str> = ["u64", "u64", "u64", "f32"]
            .into_iter()
            .chain(std::iter::repeat_n("u64", 5))
            .chain(std::iter::repeat_n("u32", 6))
            .collect();
        assert_eq!(kinds, want, "moe_decode_gate_up_pre_bf16");
        // mla.rs launches the combine merged into W_UV: ws_o, ws_ml, heads, r, splits, w, n_out, y.
        let kinds = entry_params(&ptx, "mla_combine_uv");
        assert_eq!(kinds, ["u64", "u64", "u32", "u32", "u32", "u64", "u32", "u64", "u32"], "mla_combine_uv");
    }

    /// The PTX parameter types (`u64`, `u32`, ...) of kernel `name`, in order.
    fn entry_params<'a>(ptx: &'a str, name: &str) -> Vec<&'a str> {
        let start = ptx.find(&format!(".entry {name}(")).unwrap_or_else(|| panic!("no entry {name}"));
        let params = &ptx[start..start + ptx[start..].find(')').expect("parameter list")];
        params
            .lines()
            .filter_map(|l| l.trim().strip_prefix(".param ."))
            .map(|l| l.split_whitespace().next().unwrap_or(""))
            .collect()
    }

    fn args(dtype: DType, tokens: usize, hidden: usize, inter: usize, top_k: usize) -> MoeSmallArgs {
        MoeSmallArgs {
            dtype,
            x: 256,
            ids: 512,
            weights: 768,
            gate_up: 1024,
            down: 2048,
            shared: 0,
            shared_gate: 0,
            shared_up: 0,
            shared_down: 0,
            out: 4096,
            accumulate: false,
            pre_y: 0,
            pre_w: 0,
            pre_eps: 0.0,
            tokens,
            hidden,
            inter,
            n_experts: 64,
            top_k,
        }
    }

    #[test]
    fn check_accepts_decode_shapes_and_rejects_the_rest() {
        assert!(check(&args(DType::BF16, 1, 2048, 1536, 4)).is_ok());
        assert!(check(&args(DType::BF16, MAX_DECODE_TOKENS, 7168, 2048, 8)).is_ok());
        assert!(check(&args(DType::F32, 3, 64, 32, 2)).is_ok());
        assert!(check(&args(DType::F32, 0, 64, 32, 2)).is_ok());
        assert!(check(&args(DType::F32, 4, 68, 36, 2)).is_ok(), "f32 needs multiples of 4 only");
        assert!(check(&args(DType::BF16, MAX_DECODE_TOKENS + 1, 2048, 1536, 4)).is_err());
        assert!(check(&args(DType::BF16, 16, 2048, 1536, 17)).is_err(), "more than MAX_PAIRS pairs");
        assert!(check(&args(DType::BF16, 1, 2048, 1536, 0)).is_err());
        assert!(check(&args(DType::BF16, 1, 2052, 1536, 4)).is_err(), "bf16 hidden not a multiple of 8");
        assert!(check(&args(DType::BF16, 1, 2048, 1540, 4)).is_err(), "bf16 inter not a multiple of 8");
        assert!(check(&args(DType::BF16, 1, 0, 1536, 4)).is_err());
        let mut a = args(DType::BF16, 1, 2048, 1536, 4);
        a.x += 8;
        assert!(check(&a).is_err(), "misaligned x");
        let mut a = args(DType::BF16, 1, 2048, 1536, 4);
        a.ids += 2;
        assert!(check(&a).is_err(), "misaligned ids");
        // The fused shared expert: all three pointers or none, 16-byte aligned.
        let fused = MoeSmallArgs {
            shared_gate: 8192,
            shared_up: 16384,
            shared_down: 32768,
            ..args(DType::BF16, MAX_DECODE_TOKENS, 2048, 1536, 4)
        };
        assert!(check(&fused).is_ok());
        assert!(check(&MoeSmallArgs { shared: 65536, ..fused }).is_ok(), "fused and precomputed shared terms");
        assert!(check(&MoeSmallArgs { shared_up: 0, ..fused }).is_err(), "shared_up missing");
        assert!(check(&MoeSmallArgs { shared_gate: 0, ..fused }).is_err(), "shared_gate missing");
        assert!(check(&MoeSmallArgs { shared_down: 0, ..fused }).is_err(), "shared_down missing");
        assert!(check(&MoeSmallArgs { shared_down: 32776, ..fused }).is_err(), "misaligned shared_down");
    }

    #[test]
    fn workspace_has_a_row_per_slot() {
        let a = args(DType::BF16, 3, 2048, 1536, 4);
        assert_eq!(workspace_bytes(&a), 3 * 4 * 1536 * 4);
        let fused = MoeSmallArgs { shared_gate: 8192, shared_up: 16384, shared_down: 32768, ..a };
        assert_eq!(workspace_bytes(&fused), 3 * (4 + 1) * 1536 * 4);
        assert_eq!(slots(&fused), 15);
    }

    #[test]
    fn bench_ids_cover_the_window_without_repeats_in_a_token() {
        for (tokens, distinct) in [(1usize, 4usize), (8, 24), (16, 40)] {
            let ids = bench_ids(tokens, 4, distinct, 60, 64);
            let mut all: Vec<i32> = ids.clone();
            all.sort_unstable();
            all.dedup();
            assert_eq!(all.len(), distinct, "T {tokens}");
            for row in ids.chunks(4) {
                let mut r = row.to_vec();
                r.sort_unstable();
                r.dedup();
                assert_eq!(r.len(), 4);
            }
        }
    }
}
