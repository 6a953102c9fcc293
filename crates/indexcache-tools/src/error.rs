use indexcache_config::{ConfigError, ScheduleError};
use indexcache_model::ModelError;
use indexcache_weights::GgufError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ToolError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// A GGUF file could not be read or its metadata is missing, mistyped or unsupported.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("interrupted")]
    Interrupted,
}

impl ToolError {
    pub fn file(path: &std::path::Path, message: impl std::fmt::Display) -> Self {
        ToolError::File { path: path.display().to_string(), message: message.to_string() }
    }
}
