//! Lightning-indexer scores and exact top-k on the GPU against the CPU reference
//! (`indexcache_ops::cpu::reference::indexer_topk`, `select_topk`) on fresh random data.
//!
//! Every test skips with a message where no GPU is present. Score buffers are poisoned with NaN
//! (0xFF bytes) and selections with 0x7F7F7F7F (an impossible position; -1 is the padding value),
//! so an entry a kernel forgets to write fails the comparison.
//!
//! * f32 path: scores within 1e-4 (relative) of an f64 reference; selections equal the reference's
//!   sets, or (where two reference scores straddle the cut within float error) are still a valid
//!   top-k of the reference scores.
//! * bf16 path: the CPU runs on the bf16-rounded inputs; scores within 1e-3 of the sum of term
//!   magnitudes; selections share >= 99 % of their entries with the reference.
//! * top-k alone: host-built rows full of exact ties, NaN, ±0 and -inf, compared exactly (including
//!   the lower-position rule) on every kernel path (`Rows`, `Stream`, `Segmented`), up to 262,144
//!   keys; the paths must also agree with each other bit for bit. The streaming path gets its own
//!   adversarial rows (rising scores that force a compaction per batch, all-equal and two-valued
//!   rows, mostly -inf/NaN, zeros of both signs, subnormals, lengths around its batch size).

use half::bf16;
use indexcache_cuda::dev::{Dev, DevBuf};
use indexcache_cuda::indexer::{self, IndexerArgs, ScorePath, TopkArgs, TopkPath};
use indexcache_ops::cpu::reference;
use indexcache_ops::{DType, select_topk};
use rand::{RngExt, SeedableRng, rngs::StdRng};

fn gpu() -> Option<Dev> {
    indexcache_cuda::dev::gpu_or_skip()
}

/// A device buffer of `bytes` bytes, every byte `fill`.
fn poisoned(dev: &Dev, bytes: usize, fill: u8) -> DevBuf {
    dev.upload("poison", &vec![fill; bytes.max(1)]).expect("upload")
}

const NAN_BYTE: u8 = 0xFF;
const BAD_POS_BYTE: u8 = 0x7F;

/// One indexer problem on the host (inputs already rounded to `dtype`).
struct Problem {
    dtype: DType,
    heads: usize,
    d: usize,
    positions: Vec<usize>,
    /// `[rows, heads*d]`, `[rows, heads]`, `[key_rows, d]`
    q: Vec<f32>,
    w: Vec<f32>,
    keys: Vec<f32>,
    topk: usize,
    scale: f32,
}

impl Problem {
    #[allow(clippy::too_many_arguments)]
    fn new(
        rng: &mut StdRng,
        dtype: DType,
        heads: usize,
        d: usize,
        key_rows: usize,
        positions: Vec<usize>,
        topk: usize,
        scale: f32,
    ) -> Self {
        assert!(positions.iter().all(|&p| p < key_rows));
        let rows = positions.len();
        let mut draw = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    let x = rng.random_range(-1.0f32..1.0);
                    if dtype == DType::BF16 { bf16::from_f32(x).to_f32() } else { x }
                })
                .collect()
        };
        let q = draw(rows * heads * d);
        let w = draw(rows * heads);
        let keys = draw(key_rows * d);
        Self { dtype, heads, d, positions, q, w, keys, topk, scale }
    }

    fn rows(&self) -> usize {
        self.positions.len()
    }
    fn max_visible(&self) -> usize {
        self.positions.iter().max().map_or(0, |&p| p + 1)
    }
    fn k(&self) -> usize {
        self.topk.min(self.max_visible())
    }

    /// f64 scores of row `t` over its visible keys, and the sum of the terms' magnitudes.
    fn scores(&self, t: usize) -> (Vec<f64>, Vec<f64>) {
        let (h, d) = (self.heads, self.d);
        (0..=self.positions[t])
            .map(|s| {
                let k = &self.keys[s * d..(s + 1) * d];
                let (mut total, mut mag) = (0.0f64, 0.0f64);
                for hh in 0..h {
                    let q = &self.q[(t * h + hh) * d..(t * h + hh + 1) * d];
                    let dot: f64 = q.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let v = dot * self.scale as f64;
                    let w = self.w[t * h + hh] as f64;
                    total += w * v.max(0.0);
                    mag += (w * v).abs();
                }
                (total, mag)
            })
            .unzip()
    }

    fn reference(&self) -> indexcache_ops::TopK {
        reference::indexer_topk(
            &self.q,
            &self.w,
            &self.keys,
            self.heads,
            self.d,
            &self.positions,
            self.topk,
            self.scale,
        )
    }
}

/// The problem's tensors on the device, in its dtype.
struct OnDevice {
    q: DevBuf,
    w: DevBuf,
    keys: DevBuf,
    pos: DevBuf,
}

impl OnDevice {
    fn new(dev: &Dev, p: &Problem) -> Self {
        let up = |v: &[f32]| match p.dtype {
            DType::F32 => dev.upload("test", v),
            DType::BF16 => dev.upload("test", &v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect::<Vec<u16>>()),
        };
        let pos: Vec<i32> = p.positions.iter().map(|&x| x as i32).collect();
        Self {
            q: up(&p.q).expect("upload"),
            w: up(&p.w).expect("upload"),
            keys: up(&p.keys).expect("upload"),
            pos: dev.upload("test", &pos).expect("upload"),
        }
    }

    fn args(&self, p: &Problem) -> IndexerArgs {
        IndexerArgs {
            dtype: p.dtype,
            q: self.q.ptr(),
            head_w: self.w.ptr(),
            keys: self.keys.ptr(),
            pos: self.pos.ptr(),
            rows: p.rows(),
            heads: p.heads,
            d: p.d,
            max_visible: p.max_visible(),
            topk: p.topk,
            scale: p.scale,
        }
    }
}

/// Runs the scoring kernel into a NaN-poisoned buffer and returns it as `[rows, stride]`.
fn gpu_scores(dev: &Dev, p: &Problem) -> (Vec<f32>, usize) {
    let on = OnDevice::new(dev, p);
    let stride = indexer::score_stride(p.max_visible());
    let buf = poisoned(dev, p.rows() * stride * 4, NAN_BYTE);
    indexer::indexer_scores(dev, &on.args(p), buf.ptr(), stride).expect("indexer_scores");
    (dev.download::<f32>("test", &buf, p.rows() * stride).expect("download"), stride)
}

/// Runs the whole op into a poisoned selection buffer (optionally with a small workspace budget).
fn gpu_topk(dev: &Dev, p: &Problem, budget: Option<usize>) -> Vec<i32> {
    let on = OnDevice::new(dev, p);
    let n = p.rows() * p.k();
    let out = poisoned(dev, n * 4, BAD_POS_BYTE);
    let a = on.args(p);
    match budget {
        Some(b) => indexer::indexer_topk_budget(dev, &a, out.ptr(), b),
        None => indexer::indexer_topk_into(dev, &a, out.ptr()),
    }
    .expect("indexer_topk");
    dev.download::<i32>("test", &out, n).expect("download")
}

/// A row of the selection: `want` valid positions, ascending, each <= pos, then -1 padding.
fn check_structure(row: &[i32], want: usize, pos: usize, ctx: &str) {
    let (valid, pad) = row.split_at(want);
    assert!(pad.iter().all(|&v| v == -1), "{ctx}: bad padding {row:?}");
    assert!(valid.iter().all(|&v| v >= 0 && v as usize <= pos), "{ctx}: invalid position in {valid:?} (pos {pos})");
    assert!(valid.windows(2).all(|w| w[0] < w[1]), "{ctx}: not strictly ascending {valid:?}");
}

fn sorted_valid(row: &[i32]) -> Vec<i32> {
    let mut v: Vec<i32> = row.iter().copied().filter(|&x| x >= 0).collect();
    v.sort_unstable();
    v
}

/// Shapes of the small-model tests: (heads, d).
const F32_SHAPES: [(usize, usize); 6] = [(3, 16), (4, 64), (2, 128), (5, 40), (1, 256), (8, 32)];

/// Position sets: a prefill from 0 spanning several 64-row tiles, a chunk starting at 50, and
/// decode rows; with the key rows each needs.
fn position_sets() -> Vec<(&'static str, Vec<usize>, usize)> {
    vec![
        ("prefill 0..150", (0..150).collect(), 150),
        ("chunk 50..70", (50..70).collect(), 90),
        ("decode", vec![700, 701, 702], 703),
    ]
}

#[test]
fn f32_scores_match_reference() {
    let Some(dev) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(11);
    for (heads, d) in F32_SHAPES {
        for (name, positions, key_rows) in position_sets() {
            let p = Problem::new(&mut rng, DType::F32, heads, d, key_rows, positions, 8, 0.37);
            let (got, stride) = gpu_scores(&dev, &p);
            let mut worst = 0.0f64;
            for (t, &pos) in p.positions.iter().enumerate() {
                let (want, _) = p.scores(t);
                let row = &got[t * stride..(t + 1) * stride];
                for (s, &w) in want.iter().enumerate() {
                    let g = row[s] as f64;
                    let err = (g - w).abs() / (1.0 + w.abs());
                    worst = worst.max(err);
                    assert!(err <= 1e-4, "{heads}x{d} {name}: row {t} key {s}: gpu {g} ref {w}");
                }
                // Nothing past the row's position is written.
                assert!(
                    row[pos + 1..p.max_visible()].iter().all(|v| v.to_bits() == u32::MAX),
                    "{heads}x{d} {name}: row {t} written past its position"
                );
            }
            eprintln!("f32 scores {heads}x{d} {name}: max rel err {worst:.2e}");
        }
    }
}

#[test]
fn f32_topk_matches_reference() {
    let Some(dev) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(12);
    let mut differing = 0;
    let mut rows_total = 0;
    for (heads, d) in F32_SHAPES {
        for (name, positions, key_rows) in position_sets() {
            for topk in [1usize, 7, 64, 1000] {
                let p = Problem::new(&mut rng, DType::F32, heads, d, key_rows, positions.clone(), topk, 0.37);
                let got = gpu_topk(&dev, &p, None);
                let want = p.reference();
                let k = p.k();
                assert_eq!(want.k, k);
                for (t, &pos) in p.positions.iter().enumerate() {
                    let ctx = format!("{heads}x{d} {name} topk {topk} row {t}");
                    let row = &got[t * k..(t + 1) * k];
                    let n = topk.min(pos + 1);
                    check_structure(row, n, pos, &ctx);
                    rows_total += 1;
                    if sorted_valid(row) == sorted_valid(want.row(t)) {
                        continue;
                    }
                    // Sets differ only where reference scores tie within float error at the cut.
                    differing += 1;
                    let (scores, _) = p.scores(t);
                    let picked: std::collections::HashSet<i32> = row[..n].iter().copied().collect();
                    let lowest_in = row[..n].iter().map(|&s| scores[s as usize]).fold(f64::INFINITY, f64::min);
                    let highest_out = (0..=pos)
                        .filter(|s| !picked.contains(&(*s as i32)))
                        .map(|s| scores[s])
                        .fold(f64::NEG_INFINITY, f64::max);
                    assert!(
                        lowest_in >= highest_out - 1e-5 * (1.0 + highest_out.abs()),
                        "{ctx}: not a top-k of the reference scores ({lowest_in} < {highest_out})"
                    );
                }
            }
        }
    }
    eprintln!("f32 top-k: {differing} of {rows_total} rows differ from the reference within float error");
    assert!(differing * 1000 <= rows_total, "more than 0.1 % of rows differ");
}

/// bf16 shapes: kernel variants m1 (<= 16 heads), m2 (<= 32), two head groups (<= 64), with padding.
const BF16_HEADS: [usize; 5] = [8, 20, 32, 40, 64];

fn bf16_position_sets() -> Vec<(&'static str, Vec<usize>, usize)> {
    vec![
        ("prefill 0..300", (0..300).collect(), 300),
        ("chunk 1000..1037", (1000..1037).collect(), 1100),
        ("decode", vec![4999, 5000, 5001], 5002),
    ]
}

#[test]
fn bf16_scores_match_reference_on_rounded_inputs() {
    let Some(dev) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(13);
    for heads in BF16_HEADS {
        for (name, positions, key_rows) in bf16_position_sets() {
            for scale in [0.09f32, -0.2] {
                let p = Problem::new(&mut rng, DType::BF16, heads, 128, key_rows, positions.clone(), 64, scale);
                let (got, stride) = gpu_scores(&dev, &p);
                let mut worst = 0.0f64;
                for t in 0..p.rows() {
                    let (want, mag) = p.scores(t);
                    for s in 0..want.len() {
                        let g = got[t * stride + s] as f64;
                        let err = (g - want[s]).abs() / (mag[s] + 1e-3);
                        worst = worst.max(err);
                        assert!(err <= 1e-3, "{heads} heads {name} scale {scale}: row {t} key {s}: {g} vs {}", want[s]);
                    }
                }
                eprintln!("bf16 scores {heads} heads {name} scale {scale}: max err / magnitude {worst:.2e}");
            }
        }
    }
}

/// Every bf16 scoring kernel (`ScorePath::Whole`, `KeySplit` for <= 32 heads) writes the
/// same bits, and nothing past each row's position (every head count: m1, m2, two head groups;
/// decode rows whose keys are split over many CTAs; a ragged last tile).
#[test]
fn bf16_score_paths_are_bit_identical() {
    let Some(dev) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(22);
    let mut sets = bf16_position_sets();
    sets.push(("ragged 0..77 + decode 3000", (0..77).chain([3000]).collect(), 3001));
    for heads in BF16_HEADS {
        for (name, positions, key_rows) in &sets {
            let p = Problem::new(&mut rng, DType::BF16, heads, 128, *key_rows, positions.clone(), 64, -0.11);
            let on = OnDevice::new(&dev, &p);
            let stride = indexer::score_stride(p.max_visible());
            let run = |path: ScorePath| -> Vec<u32> {
                let buf = poisoned(&dev, p.rows() * stride * 4, NAN_BYTE);
                indexer::indexer_scores_path(&dev, &on.args(&p), buf.ptr(), stride, path).expect("indexer_scores");
                dev.download::<u32>("test", &buf, p.rows() * stride).expect("download")
            };
            let whole = run(ScorePath::Whole);
            // `Whole` itself is in the list for the written-range checks below.
            let mut others = vec![(ScorePath::Whole, whole.clone())];
            if heads <= 32 {
                others.push((ScorePath::KeySplit, run(ScorePath::KeySplit)));
            } else {
                let e = indexer::indexer_scores_path(&dev, &on.args(&p), 0, stride, ScorePath::KeySplit);
                assert!(e.is_err(), "{heads} heads: the key-split kernel must refuse > 32 heads");
            }
            for (path, other) in &others {
                for (t, &pos) in p.positions.iter().enumerate() {
                    let (a, b) = (&whole[t * stride..(t + 1) * stride], &other[t * stride..(t + 1) * stride]);
                    if let Some(s) = (0..stride).find(|&s| a[s] != b[s]) {
                        panic!(
                            "{heads} heads {name} {path:?}: row {t} (pos {pos}) key {s}: {:#x} vs whole {:#x}",
                            b[s], a[s]
                        );
                    }
                    assert!(
                        b[pos + 1..].iter().all(|&v| v == u32::MAX),
                        "{heads} heads {name}: row {t} written past {pos}"
                    );
                    assert!(
                        b[..=pos].iter().all(|&v| v != u32::MAX),
                        "{heads} heads {name}: row {t} has unwritten keys"
                    );
                }
            }
        }
    }
}

/// Shared entries of two selections (as sets), summed over rows, and the total entries.
fn overlap(got: &[i32], want: &indexcache_ops::TopK) -> (usize, usize) {
    let mut shared = 0;
    let mut total = 0;
    for t in 0..want.rows {
        let g = sorted_valid(&got[t * want.k..(t + 1) * want.k]);
        let w: std::collections::HashSet<i32> = want.valid(t).map(|s| s as i32).collect();
        shared += g.iter().filter(|s| w.contains(s)).count();
        total += w.len();
    }
    (shared, total)
}

#[test]
fn bf16_topk_shares_99_percent_with_reference() {
    let Some(dev) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(14);
    for heads in BF16_HEADS {
        for (name, positions, key_rows) in bf16_position_sets() {
            for topk in [1usize, 64, 2048] {
                let p = Problem::new(&mut rng, DType::BF16, heads, 128, key_rows, positions.clone(), topk, 0.09);
                let got = gpu_topk(&dev, &p, None);
                let k = p.k();
                for (t, &pos) in p.positions.iter().enumerate() {
                    check_structure(&got[t * k..(t + 1) * k], topk.min(pos + 1), pos, &format!("{heads} {name} {t}"));
                }
                let (shared, total) = overlap(&got, &p.reference());
                assert!(
                    shared as f64 >= 0.99 * total as f64,
                    "{heads} heads {name} topk {topk}: {shared} of {total} shared"
                );
            }
        }
    }
}

#[test]
fn decode_rows_at_200k_keys_bf16() {
    let Some(dev) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(15);
    // One row at 200K (segmented top-k), and three rows of different lengths.
    for positions in [vec![199_999usize], vec![40_000, 150_000, 199_999]] {
        let p = Problem::new(&mut rng, DType::BF16, 32, 128, 200_000, positions, 2048, 0.09);
        let got = gpu_topk(&dev, &p, None);
        for (t, &pos) in p.positions.iter().enumerate() {
            check_structure(&got[t * 2048..(t + 1) * 2048], 2048, pos, &format!("decode row {t}"));
        }
        let (shared, total) = overlap(&got, &p.reference());
        eprintln!("decode {:?}: {shared} of {total} shared", p.positions);
        assert!(shared as f64 >= 0.99 * total as f64, "{shared} of {total}");
    }
}

#[test]
fn chunked_workspace_gives_identical_selections() {
    let Some(dev) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(16);
    for (dtype, heads, d) in [(DType::F32, 4, 64), (DType::BF16, 32, 128)] {
        let p = Problem::new(&mut rng, dtype, heads, d, 400, (100..400).collect(), 50, 0.2);
        let whole = gpu_topk(&dev, &p, None);
        let row_bytes = indexer::score_stride(p.max_visible()) * 4;
        // 3 rows per chunk (100 chunks), 70 -> 64 rows per chunk (5 chunks).
        for rows_per_chunk in [3, 70] {
            let chunked = gpu_topk(&dev, &p, Some(rows_per_chunk * row_bytes));
            assert!(whole == chunked, "{dtype:?}: chunks of {rows_per_chunk} rows differ");
        }
        // And the same again: deterministic bit for bit.
        assert!(whole == gpu_topk(&dev, &p, None), "{dtype:?}: not deterministic");
    }
}

#[test]
fn unsupported_shapes_are_errors() {
    let Some(dev) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(17);
    let p = Problem::new(&mut rng, DType::BF16, 4, 128, 10, vec![9], 4, 1.0);
    let on = OnDevice::new(&dev, &p);
    let out = poisoned(&dev, 64, 0);
    // (bf16 with d != 128 or > 64 heads takes the CUDA-core kernel on bf16 storage; only shapes
    // no kernel takes are refused.)
    for a in [
        IndexerArgs { d: 300, ..on.args(&p) },
        IndexerArgs { max_visible: indexer::MAX_KEYS + 1, ..on.args(&p) },
        IndexerArgs { dtype: DType::F32, d: 300, ..on.args(&p) },
    ] {
        let e = indexer::indexer_topk_into(&dev, &a, out.ptr()).expect_err("must be refused");
        assert!(e.to_string().contains("indexer_topk"), "{e}");
    }
}

// ---- top-k alone --------------------------------------------------------------------------------

/// Uploads score rows into a `[rows, stride]` buffer whose entries past each row's end are +inf
/// (selected at once if a kernel read them), runs `topk`, checks each row exactly against
/// `select_topk` and returns the selection.
fn check_topk_exact(dev: &Dev, rows: &[Vec<f32>], topk: usize, path: TopkPath, ctx: &str) -> Vec<i32> {
    let max_visible = rows.iter().map(Vec::len).max().unwrap_or(0);
    let stride = indexer::score_stride(max_visible);
    let mut host = vec![f32::INFINITY; rows.len() * stride];
    for (t, r) in rows.iter().enumerate() {
        host[t * stride..t * stride + r.len()].copy_from_slice(r);
    }
    let pos: Vec<i32> = rows.iter().map(|r| r.len() as i32 - 1).collect();
    let k = topk.min(max_visible);
    let scores = dev.upload("test", &host).expect("upload");
    let pos_d = dev.upload("test", &pos).expect("upload");
    let out = poisoned(dev, rows.len() * k * 4, BAD_POS_BYTE);
    let a = TopkArgs {
        scores: scores.ptr(),
        stride,
        pos: pos_d.ptr(),
        rows: rows.len(),
        max_visible,
        topk,
        out: out.ptr(),
        path,
    };
    indexer::topk(dev, &a).expect("topk");
    let got = dev.download::<i32>("test", &out, rows.len() * k).expect("download");
    let mut want = vec![0i32; k];
    let mut scratch = Vec::new();
    for (t, r) in rows.iter().enumerate() {
        select_topk(r, k, &mut want, &mut scratch);
        let row = &got[t * k..(t + 1) * k];
        let n = topk.min(r.len());
        check_structure(row, n, r.len() - 1, &format!("{ctx} {path:?} row {t}"));
        assert_eq!(sorted_valid(row), sorted_valid(&want), "{ctx} {path:?} row {t} (n {}, topk {topk})", r.len());
    }
    got
}

/// Rows of `n` scores drawn from a few values (exact ties everywhere), with NaN, -inf and ±0.
fn tie_row(rng: &mut StdRng, n: usize, kind: usize) -> Vec<f32> {
    const VALUES: [f32; 8] = [0.0, -0.0, 1.0, 2.0, 3.0, f32::NAN, f32::NEG_INFINITY, -1.5];
    (0..n)
        .map(|_| match kind {
            0 => VALUES[rng.random_range(0..VALUES.len())],
            1 => 2.5,                                                    // all equal
            2 => [0.0f32, 1.0][rng.random_range(0..2)],                  // two values
            3 => 1000.0 + rng.random_range(0..4) as f32 * 0.000_061_035, // same top 22 bits, 4 values
            _ => rng.random_range(-1.0f32..1.0),                         // few ties
        })
        .collect()
}

#[test]
fn topk_ties_go_to_the_lower_positions_exactly() {
    let Some(dev) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(18);
    // Short rows (n <= topk, n around the shared-memory capacity 8192) and long ones whose level-0
    // bin overflows shared memory (all equal / two values at 20K): every branch of the selection.
    let lens = [1usize, 2, 5, 63, 64, 300, 1000, 4096, 8191, 8192, 8193, 12_000, 20_000];
    for topk in [1usize, 16, 300, 5000] {
        for kind in 0..5 {
            let rows: Vec<Vec<f32>> = lens.iter().map(|&n| tie_row(&mut rng, n, kind)).collect();
            let ctx = format!("kind {kind} topk {topk}");
            let a = check_topk_exact(&dev, &rows, topk, TopkPath::Rows, &ctx);
            let b = check_topk_exact(&dev, &rows, topk, TopkPath::Segmented, &ctx);
            // Every path emits the same ascending rows, bit for bit.
            assert!(a == b, "{ctx}: paths disagree");
            if topk <= indexer::STREAM_MAX_K {
                let c = check_topk_exact(&dev, &rows, topk, TopkPath::Stream, &ctx);
                assert!(a == c, "{ctx}: stream disagrees");
            }
            assert!(a == check_topk_exact(&dev, &rows, topk, TopkPath::Auto, &ctx), "{ctx}: auto disagrees");
        }
    }
}

#[test]
fn topk_long_rows_exact() {
    let Some(dev) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(19);
    let mut normal_row = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|i| {
                // Mostly continuous values, every 97th a tie at 0.5.
                if i % 97 == 0 { 0.5 } else { rng.random_range(-1.0f32..1.0) * rng.random_range(0.0f32..1.0) }
            })
            .collect()
    };
    let single = vec![normal_row(200_000)];
    let max = vec![normal_row(indexer::MAX_KEYS)];
    let mixed = vec![normal_row(50_000), normal_row(131_072), normal_row(7)];
    for (name, rows) in [("200K", &single), ("262144", &max), ("mixed", &mixed)] {
        for path in [TopkPath::Rows, TopkPath::Stream, TopkPath::Segmented, TopkPath::Auto] {
            check_topk_exact(&dev, rows, 2048, path, name);
        }
    }
}

/// Rows built to stress the streaming top-k (`TopkPath::Stream`): its threshold only rises at
/// compactions, the first compaction comes after 8192 elements, batches are 4096 elements.
fn stream_row(rng: &mut StdRng, n: usize, kind: usize) -> Vec<f32> {
    (0..n)
        .map(|i| match kind {
            0 => i as f32 * 1e-3,                        // rising: a compaction per batch
            1 => -(i as f32),                            // falling: nothing after the first
            2 => 0.75,                                   // all equal
            3 => [0.25f32, 0.5][rng.random_range(0..2)], // two values
            4 => {
                if rng.random_range(0..64) == 0 {
                    rng.random_range(-1.0f32..1.0)
                } else {
                    f32::NEG_INFINITY
                }
            }
            5 => {
                if rng.random_range(0..8) == 0 {
                    rng.random_range(-1.0f32..1.0)
                } else {
                    f32::NAN
                }
            }
            6 => [0.0f32, -0.0][rng.random_range(0..2)], // zeros of both signs
            7 => f32::from_bits(rng.random_range(0u32..8) | if rng.random_range(0..2) == 0 { 0x8000_0000 } else { 0 }),
            8 => (rng.random_range(-8i32..8) as f32) * 0.25, // coarse: many exact ties
            9 => rng.random_range(-1.0f32..1.0) + i as f32 * 4.0 / n as f32, // rising trend + noise
            10 => (rng.random_range(-3.0f32..3.0)).exp(),    // positive, wide range
            _ => rng.random_range(-1.0f32..1.0),
        })
        .collect()
}

#[test]
fn topk_stream_adversarial_rows_exact() {
    let Some(dev) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(20);
    // Lengths around the batch (4096) and the first compaction (8192), and long rows.
    let lens = [2049usize, 4095, 4096, 4097, 8191, 8192, 8193, 12_289, 40_000, 131_072];
    for kind in 0..12 {
        for topk in [1usize, 7, 2048, 4095, indexer::STREAM_MAX_K] {
            let rows: Vec<Vec<f32>> = lens.iter().map(|&n| stream_row(&mut rng, n, kind)).collect();
            let ctx = format!("stream kind {kind} topk {topk}");
            let a = check_topk_exact(&dev, &rows, topk, TopkPath::Stream, &ctx);
            let b = check_topk_exact(&dev, &rows, topk, TopkPath::Rows, &ctx);
            assert!(a == b, "{ctx}: stream and rows disagree");
        }
    }
    // Rows just longer than topk, and one row at the largest length.
    for topk in [1usize, 100, 4096] {
        let rows: Vec<Vec<f32>> = (0..3).map(|j| stream_row(&mut rng, topk + 1 + j, 11)).collect();
        check_topk_exact(&dev, &rows, topk, TopkPath::Stream, "n = topk + 1..3");
    }
    for kind in [0usize, 2, 11] {
        let rows = vec![stream_row(&mut rng, indexer::MAX_KEYS, kind)];
        check_topk_exact(&dev, &rows, 2048, TopkPath::Stream, &format!("262144 kind {kind}"));
    }
}

#[test]
fn topk_stream_refuses_large_k_and_auto_falls_back() {
    let Some(dev) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(21);
    let k = indexer::STREAM_MAX_K + 1;
    let rows: Vec<Vec<f32>> = [5000usize, 20_000].iter().map(|&n| stream_row(&mut rng, n, 11)).collect();
    // Auto takes the two-pass kernel for topk > STREAM_MAX_K.
    check_topk_exact(&dev, &rows, k, TopkPath::Auto, "auto, topk > STREAM_MAX_K");
    let stride = indexer::score_stride(20_000);
    let scores = poisoned(&dev, 2 * stride * 4, NAN_BYTE);
    let pos = dev.upload("test", &[4999i32, 19_999]).expect("upload");
    let out = poisoned(&dev, 2 * k * 4, BAD_POS_BYTE);
    let a = TopkArgs {
        scores: scores.ptr(),
        stride,
        pos: pos.ptr(),
        rows: 2,
        max_visible: 20_000,
        topk: k,
        out: out.ptr(),
        path: TopkPath::Stream,
    };
    let e = indexer::topk(&dev, &a).expect_err("stream must refuse topk > STREAM_MAX_K");
    assert!(e.to_string().contains("streaming"), "{e}");
}
