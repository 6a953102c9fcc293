//! The IndexCache toolkit: everything needed to *choose*, check and export a Full/Shared
//! pattern for a DSA model.
//!
//! * [`data`] — calibration/eval text and token windows;
//! * [`loss`] — mean next-token NLL of token windows under a schedule;
//! * [`generate`] — generation with a chunked prefill;
//! * [`search`] — the paper's greedy Algorithm 1 with prefix reuse and the pipeline-block variant;
//! * [`overlap`] — |T_i ∩ T_j| / k between every pair of layers' top-k;
//! * [`eval`] — synthetic long-context retrieval (passkey, needle-in-a-haystack);
//! * [`pattern`] — a pattern from the command line or a file;
//! * [`export`] — the pattern as transformers / SGLang / vLLM configuration;
//! * [`gguf_tokenizer`] — a tokenizer and chat template from a GGUF file's metadata;
//! * [`plot`] — heatmaps and curves (PNG + SVG).

pub mod data;
pub mod distill;
pub mod error;
pub mod eval;
pub mod export;
pub mod generate;
pub mod gguf_tokenizer;
pub mod loss;
pub mod overlap;
pub mod pattern;
pub mod plot;
pub mod search;

pub use error::ToolError;

/// The host's `MemAvailable` in bytes (Linux `/proc/meminfo`); `None` where unknown.
pub fn host_mem_available() -> Option<u64> {
    indexcache_ops::cpu::proc_kib(&std::fs::read_to_string("/proc/meminfo").ok()?, "MemAvailable:")
}
