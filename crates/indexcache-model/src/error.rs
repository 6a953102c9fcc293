//! Errors of model loading and running. Every variant names what the user has to fix.

use indexcache_config::{ConfigError, ScheduleError};
use indexcache_weights::WeightError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error("invalid schedule: {0}")]
    Schedule(#[from] ScheduleError),
    #[error(
        "layer {layer} is Full in the schedule but the checkpoint has no indexer weights for it \
         (missing {tensor:?}); this checkpoint ships indexers only on layers {available}"
    )]
    MissingIndexer { layer: usize, tensor: String, available: String },
    #[error(
        "context too long: {needed} tokens needed but the {what} allows {limit} \
         (prompt + generated tokens must fit)"
    )]
    ContextTooLong { needed: usize, limit: usize, what: &'static str },
    #[error("token id {id} at input position {index} is out of range for vocabulary size {vocab}")]
    TokenOutOfRange { id: u32, index: usize, vocab: usize },
    #[error("empty input: at least one token is required")]
    EmptyInput,
    #[error("schedule has {got} layers but the model has {expected}")]
    ScheduleLength { expected: usize, got: usize },
    #[error("{0}")]
    Invalid(String),
    #[error("loading {tensor}: {source}")]
    Device { tensor: String, source: indexcache_ops::OpError },
    #[error(transparent)]
    Op(#[from] indexcache_ops::OpError),
    #[error("allocating the cache of layer {layer} for {capacity} tokens: {source}")]
    Cache { layer: usize, capacity: usize, source: indexcache_ops::OpError },
}
