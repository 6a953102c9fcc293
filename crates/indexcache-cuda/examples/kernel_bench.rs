//! Kernel micro-benchmarks on the GPU: each kernel's time (CUDA events, median), achieved
//! TFLOP/s or GB/s and the fraction of the H200's measured ceiling.
//! `kernel_bench [--json FILE]` (built by scripts/gpu/bundle.sh, run by scripts/gpu/check.sh).

use indexcache_cuda::dev::Dev;
use indexcache_cuda::{KernelBench, backend, fp8, indexer, mla, moe_decode};
use std::sync::Arc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().position(|a| a == "--json").and_then(|i| args.get(i + 1)).cloned();
    let dev = match Dev::open(0) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            eprintln!("kernel_bench: {e}");
            std::process::exit(1);
        }
    };
    println!("{} ({} SMs)", dev.device_name, dev.sm_count);
    let mut rows: Vec<KernelBench> = Vec::new();
    let mut failed = false;
    for name in ["backend", "indexer", "mla", "fp8", "moe_decode"] {
        let result = match name {
            "backend" => backend::bench(&dev),
            "indexer" => indexer::bench(&dev),
            "mla" => mla::bench(&dev),
            "moe_decode" => moe_decode::bench(&dev),
            _ => fp8::bench(&dev),
        };
        match result {
            Ok(r) => rows.extend(r),
            Err(e) => {
                failed = true;
                eprintln!("{name} bench failed: {e}");
            }
        }
    }
    println!("{:<44} {:<44} {:>10} {:>9} {:>9} {:>8}", "kernel", "shape", "ms", "TFLOP/s", "GB/s", "of ceil");
    for r in &rows {
        println!(
            "{:<44} {:<44} {:>10.4} {:>9.1} {:>9.1} {:>7.0}%",
            r.kernel,
            r.shape,
            r.ms,
            r.tflops,
            r.gbps,
            r.of_ceiling * 100.0
        );
    }
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&rows).expect("serialize");
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("writing {path}: {e}");
            failed = true;
        }
    }
    if failed {
        std::process::exit(2);
    }
}
