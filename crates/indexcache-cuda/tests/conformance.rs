//! The model conformance suite (`indexcache_model::conformance`, the same checks the CPU runs in
//! `crates/indexcache-model/tests/parity.rs`) on the CUDA backend, in its exact f32 mode and its
//! bf16 mode. Skipped, with a message, where no GPU is present.

use indexcache_cuda::CudaBackend;
use indexcache_model::conformance::{Check, Suite, Tolerance, fixtures_dir};
use indexcache_ops::DType;

fn run(dtype: DType, tol: Tolerance) {
    if let Err(e) = CudaBackend::new(0, dtype) {
        eprintln!("skipped: no GPU ({e})");
        return;
    }
    let make = move || CudaBackend::new(0, dtype).map_err(|e| e.to_string());
    let suite = Suite { make: &make, tol, fixtures: fixtures_dir(), records_steps: true };
    let checks: Vec<Check> = suite.run_all().expect("suite ran");
    eprintln!("== conformance, cuda {}", dtype.name());
    for c in &checks {
        eprintln!("{c}");
    }
    let failed: Vec<String> = checks.iter().filter(|c| !c.pass).map(|c| c.to_string()).collect();
    assert!(failed.is_empty(), "cuda {}: failed checks:\n{}", dtype.name(), failed.join("\n"));
}

#[test]
fn conformance_f32() {
    run(DType::F32, Tolerance::F32);
}

#[test]
fn conformance_bf16() {
    run(DType::BF16, Tolerance::BF16);
}
