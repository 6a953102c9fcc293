//! Smoke test of the CUDA stack on a GPU machine: driver, NVRTC (compute_90a PTX, JIT by the
//! driver), a launch, a copy back, cuBLAS. `cargo run --release --example smoke -p indexcache-cuda`.

use cudarc::driver::LaunchConfig;
use indexcache_cuda::dev::{Dev, Source};

const SRC: Source = Source {
    name: "smoke",
    code: r#"
extern "C" __global__ void axpy(float* y, const float* x, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += a * x[i];
}
"#,
};

fn main() {
    println!("driver present: {}", indexcache_cuda::dev::driver_present());
    println!("nvrtc present: {}", indexcache_cuda::dev::nvrtc_present());
    let dev = match Dev::open(0) {
        Ok(d) => d,
        Err(e) => {
            println!("open failed: {e}");
            std::process::exit(1);
        }
    };
    println!("{} | {} SMs | {:.1} GiB", dev.device_name, dev.sm_count, dev.total_memory as f64 / (1u64 << 30) as f64);
    let n = 1 << 20;
    let a = 2.0f32;
    let n_i = n as i32;
    let x: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
    let y: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let xb = dev.upload("smoke", &x).unwrap();
    let yb = dev.upload("smoke", &y).unwrap();
    let t = std::time::Instant::now();
    let f = dev.function(&SRC, "axpy").unwrap();
    println!("compile + load: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    let (yp, xp) = (yb.ptr(), xb.ptr());
    let mut b = dev.builder(&f);
    b.arg(&yp).arg(&xp).arg(&a).arg(&n_i);
    dev.launch(b, LaunchConfig::for_num_elems(n as u32), "axpy", || format!("[{n}]")).unwrap();
    let got: Vec<f32> = dev.download("smoke", &yb, n).unwrap();
    let bad = got.iter().enumerate().filter(|(i, v)| **v != *i as f32 * 2.0).count();
    println!("axpy: {} wrong of {n}", bad);
    match cudarc::cublas::CudaBlas::new(dev.stream.clone()) {
        Ok(_) => println!("cublas: ok"),
        Err(e) => println!("cublas: {e:?}"),
    }
    println!("peak bytes: {}", dev.mem().peak());
    // An allocation far beyond the card is an error naming the op, not a panic.
    match dev.alloc("smoke-oom", 1 << 50) {
        Ok(_) => println!("oom: unexpectedly succeeded"),
        Err(e) => println!("oom error: {e}"),
    }
}
