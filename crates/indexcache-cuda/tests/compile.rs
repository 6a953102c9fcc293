//! Every CUDA kernel source compiles with NVRTC for `compute_90a` — on any machine with libnvrtc,
//! no GPU needed. CI sets `INDEXCACHE_REQUIRE_NVRTC=1` (and installs NVRTC from PyPI), so a kernel
//! that does not compile fails CI rather than the GPU run.

use indexcache_cuda::{dev, kernels};

#[test]
fn every_kernel_compiles_for_sm90a() {
    if !dev::nvrtc_present() {
        let required = std::env::var("INDEXCACHE_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
        assert!(!required, "INDEXCACHE_REQUIRE_NVRTC=1 but libnvrtc cannot be loaded (LD_LIBRARY_PATH?)");
        eprintln!("skipped: libnvrtc not found");
        return;
    }
    let mut failed = Vec::new();
    for src in kernels::all() {
        match dev::compile(src) {
            Ok(ptx) => {
                let text = ptx.to_src();
                assert!(text.contains(".target sm_90a"), "{}: PTX not for sm_90a", src.name);
                eprintln!("{}.cu: {} bytes of PTX", src.name, text.len());
            }
            Err(e) => failed.push(e),
        }
    }
    assert!(failed.is_empty(), "kernels failed to compile:\n{}", failed.join("\n"));
}

/// The compile check can fail: a broken source is reported with its name.
#[test]
fn a_broken_kernel_is_reported() {
    if !dev::nvrtc_present() {
        return;
    }
    let bad = dev::Source { name: "broken", code: "extern \"C\" __global__ void k() { undefined_symbol(); }" };
    let err = dev::compile(&bad).expect_err("must not compile");
    assert!(err.contains("broken.cu"), "{err}");
}
