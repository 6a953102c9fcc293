//! The DSA model with IndexCache: weights ([`weights`]), per-sequence caches ([`cache`]), the
//! forward pass ([`model`]) and sampling ([`sampler`]).
//!
//! ```text
//! let (model, report) = DsaModel::load(dir, CpuBackend::new(), &LoadOptions::default(), &mut |_, _, _| {})?;
//! let mut cache = model.new_cache(4096)?;
//! let out = model.forward(&ids, &mut cache, &ForwardOptions::default())?;
//! ```

pub mod cache;
pub mod conformance;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod model;
pub mod sampler;
pub mod weights;

pub use cache::{Cache, CacheBytes, LayerKv, cache_bytes_per_token};
pub use error::ModelError;
pub use generate::{GenStats, generate};
pub use model::{
    DsaModel, ForwardOptions, ForwardOutput, LayerTap, LoadOptions, LoadReport, Logits, StageTimes, StepState,
    check_indexers, format_layers,
};
pub use sampler::{Sampler, SamplingParams};
pub use weights::{IndexerSelection, RandomSource, WeightSource, parameter_count};
