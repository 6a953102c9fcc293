//! Writing results: files written atomically into directories created on demand, and
//! safetensors files of named tensors.

use anyhow::{Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use std::path::Path;

/// A named tensor to write.
pub enum OutTensor {
    F32 {
        name: String,
        shape: Vec<usize>,
        data: Vec<f32>,
    },
    I32 {
        name: String,
        shape: Vec<usize>,
        data: Vec<i32>,
    },
    /// bf16 bit patterns (round to nearest even from f32 with `half::bf16::from_f32`).
    BF16 {
        name: String,
        shape: Vec<usize>,
        data: Vec<u16>,
    },
}

/// Create the directory `path` goes into (every `--out` may name a directory that does not exist
/// yet).
pub fn create_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Write `bytes` to `path` via a temporary file + rename (a failure never leaves half a file),
/// creating the parent directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    create_parent(path)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Write tensors to `path` (atomically, see [`write_atomic`]).
pub fn write_safetensors(path: &Path, tensors: &[OutTensor]) -> Result<()> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            let (name, dtype, shape, bytes): (&String, Dtype, &Vec<usize>, &[u8]) = match t {
                OutTensor::F32 { name, shape, data } => (name, Dtype::F32, shape, bytemuck::cast_slice(data)),
                OutTensor::I32 { name, shape, data } => (name, Dtype::I32, shape, bytemuck::cast_slice(data)),
                OutTensor::BF16 { name, shape, data } => (name, Dtype::BF16, shape, bytemuck::cast_slice(data)),
            };
            let view = TensorView::new(dtype, shape.clone(), bytes).with_context(|| format!("tensor {name}"))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, None).context("serialising safetensors")?;
    write_atomic(path, &bytes)
}
