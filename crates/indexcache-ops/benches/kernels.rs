//! Kernel micro-benchmarks for the CPU backend: `cargo bench -p indexcache-ops`.
//! Shapes follow configs/small-glm5.json (16 heads, R=256, P=32, indexer 8×64, top-k 256).
//! Prints the best of 3 runs with GFLOP/s (FLOPs counted as 2 per multiply-add).

use indexcache_ops::cpu::{CpuBackend, CpuTensor};
use indexcache_ops::{Backend, TopK, WeightInit};
use std::time::Instant;

fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            ((s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn best_of<F: FnMut()>(mut f: F) -> f64 {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn report(name: &str, secs: f64, flops: f64) {
    println!("{name:<44} {:>9.2} ms {:>8.1} GFLOP/s", secs * 1e3, flops / secs / 1e9);
}

fn main() {
    let b = CpuBackend::new();
    println!("backend: {}", b.name());
    // Dense projections.
    for &(m, k, n) in &[(1usize, 1024usize, 1024usize), (4096, 1024, 384), (4096, 384, 1536), (4096, 1024, 1024)] {
        let x = CpuTensor::new(rand(m * k, 1), m, k);
        let w = b.weight(WeightInit::Host(rand(n * k, 2)), 1, n, k).unwrap();
        let s = best_of(|| {
            std::hint::black_box(b.matmul_t(&x, &w).unwrap());
        });
        report(&format!("matmul_t {m}x{k} · ({n}x{k})ᵀ"), s, 2.0 * (m * k * n) as f64);
    }
    // Decode GEMVs (one token): f32 weights, and the same shapes with bf16-exact weights, which
    // the backend keeps as bf16 (half the bytes). GB/s counts the weight bytes read.
    for &(k, n) in &[(1024usize, 1024usize), (1024, 2816), (2048, 8192)] {
        let x = CpuTensor::new(rand(k, 1), 1, k);
        for (name, bytes) in [("f32", 4usize), ("bf16", 2)] {
            let mut v = rand(n * k, 2);
            if bytes == 2 {
                v.iter_mut().for_each(|x| *x = f32::from_bits(x.to_bits() & 0xFFFF_0000));
            }
            let w = b.weight(WeightInit::Host(v), 1, n, k).unwrap();
            let s = best_of(|| {
                std::hint::black_box(b.matmul_t(&x, &w).unwrap());
            });
            report(&format!("gemv 1x{k} · ({n}x{k})ᵀ {name}"), s, 2.0 * (k * n) as f64);
            println!("{:<44} {:>9.1} GB/s of weights", "", (n * k * bytes) as f64 / s / 1e9);
        }
    }
    // Indexer + top-k: causal prefill of L tokens, and one decode row at L.
    let (hi, d, topk) = (8usize, 64usize, 256usize);
    for &l in &[4096usize, 16384] {
        let keys = CpuTensor::new(rand(l * d, 3), l, d);
        let q = CpuTensor::new(rand(l * hi * d, 4), l, hi * d);
        let w = CpuTensor::new(rand(l * hi, 5), l, hi);
        let pos = b.positions(&(0..l).collect::<Vec<_>>()).unwrap();
        let s = best_of(|| {
            std::hint::black_box(b.indexer_topk(&q, &w, &keys, &pos, topk, 0.125).unwrap());
        });
        report(&format!("indexer_topk prefill L={l}"), s, (hi * d) as f64 * (l * l) as f64);
        let q1 = b.rows(&q, l - 1, 1).unwrap();
        let w1 = b.rows(&w, l - 1, 1).unwrap();
        let p1 = b.positions(&[l - 1]).unwrap();
        let s = best_of(|| {
            std::hint::black_box(b.indexer_topk(&q1, &w1, &keys, &p1, topk, 0.125).unwrap());
        });
        report(&format!("indexer_topk decode S={l}"), s, 2.0 * (hi * d * l) as f64);
    }
    // Sparse MLA over 256 selected positions per row.
    let (h, r, p) = (16usize, 256usize, 32usize);
    for &t in &[1usize, 4096] {
        let s_len = 16384;
        let cache = CpuTensor::new(rand(s_len * (r + p), 6), s_len, r + p);
        let q_lat = CpuTensor::new(rand(t * h * r, 7), t, h * r);
        let q_pe = CpuTensor::new(rand(t * h * p, 8), t, h * p);
        let mut sel = TopK { rows: t, k: topk, data: vec![0; t * topk] };
        for (i, v) in sel.data.iter_mut().enumerate() {
            *v = ((i * 7919) % s_len) as i32;
        }
        let s = best_of(|| {
            std::hint::black_box(b.sparse_mla(&q_lat, &q_pe, &cache, &sel, 0.1).unwrap());
        });
        report(&format!("sparse_mla T={t} k={topk}"), s, 2.0 * (t * h * topk * (2 * r + p)) as f64);
    }
}
