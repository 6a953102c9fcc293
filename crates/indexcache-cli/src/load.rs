//! Choosing the device once, and loading a model onto it with a progress bar and a report of what
//! was skipped.
//!
//! Commands are written once, generic over [`Backend`]; [`ExecArgs::backend`] resolves
//! `--device`/`--dtype` into an [`AnyBackend`] and [`with_backend!`] runs the command's generic
//! body with the concrete backend (one monomorphised copy per device). Model code never branches
//! on the device.

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use indexcache_config::ScheduleOverride;
use indexcache_model::{DsaModel, IndexerSelection, LoadOptions};
use indexcache_ops::cpu::CpuBackend;
use indexcache_ops::{Backend, DType};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;
use std::time::Instant;

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DTypeArg {
    F32,
    Bf16,
}

impl DTypeArg {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn dtype(self) -> DType {
        match self {
            DTypeArg::F32 => DType::F32,
            DTypeArg::Bf16 => DType::BF16,
        }
    }
}

/// Where and how a model runs (every command that loads one).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ExecArgs {
    /// Device: cpu, or cuda (GPU 0; needs a build with `--features cuda`). Default: cuda when the
    /// build has it and a GPU is usable, else cpu.
    #[arg(long, value_enum)]
    pub device: Option<Device>,
    /// Activation and cache dtype: f32 (cpu; the exact mode on cuda) or bf16 (cuda only, its
    /// default).
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Prefill chunk: a long prompt runs through the model this many tokens at a time, bounding
    /// activations and the indexer's [chunk, context] scores (default: the device's, 1024 on cpu).
    #[arg(long, value_name = "TOKENS", value_parser = positive)]
    pub chunk: Option<usize>,
    /// Lightning-indexer numerics: exact (f32/bf16 scores, as transformers), or fp8 (DeepSeek's
    /// reference: Hadamard rotation + UE8M0-scaled e4m3 q and k, as production engines select).
    #[arg(long, value_enum, default_value = "exact")]
    pub indexer_numerics: IndexerNumerics,
    /// Attention: sparse (the lightning indexers pick the top-k, IndexCache schedules apply), or
    /// dense (every token attends to all earlier ones, no indexer runs: the baseline of a dense
    /// model with indexers added; grouped-query models only). A model without indexers (a plain
    /// GGUF) always runs dense.
    #[arg(long, value_enum, default_value = "sparse")]
    pub attention: AttentionArg,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionArg {
    #[default]
    Sparse,
    Dense,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IndexerNumerics {
    #[default]
    Exact,
    Fp8,
}

impl ExecArgs {
    /// Apply the model-level options (indexer numerics) to a loaded model.
    pub fn configure<B: Backend>(&self, model: &mut DsaModel<B>) -> Result<()> {
        model.set_fp8_indexer(self.indexer_numerics == IndexerNumerics::Fp8).context("--indexer-numerics fp8")?;
        Ok(())
    }
}

/// `--chunk` and the like: an integer ≥ 1.
pub fn positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

/// The backend chosen for this run.
pub enum AnyBackend {
    Cpu(CpuBackend),
    #[cfg(feature = "cuda")]
    Cuda(indexcache_cuda::CudaBackend),
}

/// `with_backend!(backend, |b| body)`: `body` with `b` bound to the concrete backend (`B:
/// Backend`), compiled once per device.
macro_rules! with_backend {
    ($backend:expr, |$b:ident| $body:expr) => {
        match $backend {
            $crate::load::AnyBackend::Cpu($b) => $body,
            #[cfg(feature = "cuda")]
            $crate::load::AnyBackend::Cuda($b) => $body,
        }
    };
}
pub(crate) use with_backend;

impl ExecArgs {
    /// The prefill chunk for `backend`: `--chunk`, else the backend's default.
    pub fn chunk<B: Backend>(&self, backend: &B) -> usize {
        self.chunk.unwrap_or_else(|| backend.default_chunk()).max(1)
    }

    /// Resolve `--device` / `--dtype` into a backend (opening the GPU where asked or by default).
    pub fn backend(&self) -> Result<AnyBackend> {
        let backend = match self.device {
            Some(Device::Cpu) => cpu(self.dtype)?,
            Some(Device::Cuda) => cuda(self.dtype.unwrap_or(DTypeArg::Bf16))?,
            None => match default_cuda(self.dtype.unwrap_or(DTypeArg::Bf16)) {
                Some(b) => b,
                None => cpu(self.dtype).context("no GPU is in use (pass --device cuda to require one)")?,
            },
        };
        Ok(backend)
    }
}

fn cpu(dtype: Option<DTypeArg>) -> Result<AnyBackend> {
    if dtype == Some(DTypeArg::Bf16) {
        bail!("--dtype bf16 needs --device cuda: the cpu backend computes in f32 only");
    }
    Ok(AnyBackend::Cpu(CpuBackend::new()))
}

#[cfg(feature = "cuda")]
fn cuda(dtype: DTypeArg) -> Result<AnyBackend> {
    if !indexcache_cuda::dev::driver_present() {
        bail!("--device cuda: no CUDA driver found (libcuda could not be loaded); use --device cpu");
    }
    let b = indexcache_cuda::CudaBackend::new(0, dtype.dtype())
        .map_err(|e| anyhow::anyhow!("--device cuda: could not open GPU 0 ({}): {e}", dtype.dtype().name()))?;
    Ok(AnyBackend::Cuda(b))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_dtype: DTypeArg) -> Result<AnyBackend> {
    bail!(
        "--device cuda: this indexcache was built without CUDA support; rebuild with \
         `cargo build --release -p indexcache-cli --features cuda`, or use --device cpu"
    )
}

/// The GPU when the build has CUDA support and GPU 0 opens; `None` (with the reason logged) else.
#[cfg(feature = "cuda")]
fn default_cuda(dtype: DTypeArg) -> Option<AnyBackend> {
    if !indexcache_cuda::dev::driver_present() {
        tracing::debug!("no CUDA driver: running on the cpu");
        return None;
    }
    match indexcache_cuda::CudaBackend::new(0, dtype.dtype()) {
        Ok(b) => Some(AnyBackend::Cuda(b)),
        Err(e) => {
            tracing::warn!("a CUDA driver is present but GPU 0 could not be opened ({e}); running on the cpu");
            None
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn default_cuda(_dtype: DTypeArg) -> Option<AnyBackend> {
    None
}

/// Load the checkpoint in `dir` onto `backend`.
pub fn load_model<B: Backend>(
    dir: &Path,
    backend: B,
    schedule: Option<ScheduleOverride>,
    indexers: IndexerSelection,
    exec: &ExecArgs,
) -> Result<DsaModel<B>> {
    let t0 = Instant::now();
    let bar = progress_bar("loading weights", "{wide_msg}", 0);
    let indexers = if exec.attention == AttentionArg::Dense { IndexerSelection::None } else { indexers };
    let opts = LoadOptions { schedule, indexers };
    let mut on_tensor = |name: &str, done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(name.to_string());
    };
    let loaded = DsaModel::load(dir, backend, &opts, &mut on_tensor);
    bar.finish_and_clear();
    let (mut model, report) = loaded.with_context(|| format!("loading model from {}", dir.display()))?;
    exec.configure(&mut model)?;
    if !report.skipped_mtp.is_empty() {
        tracing::info!(
            "skipped {} tensors of the multi-token-prediction layer (model.layers.{}), as transformers does",
            report.skipped_mtp.len(),
            model.config().num_hidden_layers
        );
    }
    if !report.unused.is_empty() {
        let shown: Vec<&str> = report.unused.iter().take(8).map(String::as_str).collect();
        tracing::info!(
            "{} checkpoint tensors unused by this schedule/model: {}{}",
            report.unused.len(),
            shown.join(", "),
            if report.unused.len() > 8 { ", …" } else { "" }
        );
    }
    let attention = match model.dense_attention() {
        true => "dense attention (no indexer)".to_string(),
        false => format!(
            "schedule {} ({} Full of {})",
            model.schedule(),
            model.schedule().num_full(),
            model.schedule().len()
        ),
    };
    tracing::info!(
        "loaded {} tensors in {:.2}s; {attention}; backend {}",
        report.tensors_loaded,
        t0.elapsed().as_secs_f64(),
        model.backend().name(),
    );
    Ok(model)
}

/// A progress bar on stderr: `{spinner} <prefix> [=====>   ] pos/len <suffix>`; hidden when
/// stderr is not a terminal.
pub fn progress_bar(prefix: &str, suffix: &str, len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let template = format!("{{spinner}} {prefix} [{{bar:30}}] {{pos}}/{{len}} {suffix}");
    // invariant: the template is built from literals with valid placeholders.
    bar.set_style(ProgressStyle::with_template(&template).expect("valid template").progress_chars("=> "));
    bar
}
