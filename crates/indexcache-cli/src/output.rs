//! Writing results: safetensors files of named tensors, written atomically.

use anyhow::{Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use std::path::Path;

/// A named tensor to write.
pub enum OutTensor {
    F32 { name: String, shape: Vec<usize>, data: Vec<f32> },
    I32 { name: String, shape: Vec<usize>, data: Vec<i32> },
}

/// Write tensors to `path` (via a temporary file + rename, so a failure never leaves half a file).
pub fn write_safetensors(path: &Path, tensors: &[OutTensor]) -> Result<()> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            let (name, dtype, shape, bytes): (&String, Dtype, &Vec<usize>, &[u8]) = match t {
                OutTensor::F32 { name, shape, data } => (name, Dtype::F32, shape, bytemuck::cast_slice(data)),
                OutTensor::I32 { name, shape, data } => (name, Dtype::I32, shape, bytemuck::cast_slice(data)),
            };
            let view = TensorView::new(dtype, shape.clone(), bytes).with_context(|| format!("tensor {name}"))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, None).context("serialising safetensors")?;
    let tmp = path.with_extension("safetensors.tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}
