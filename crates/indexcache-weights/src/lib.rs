//! Memory-mapped safetensors checkpoints and GGUF files.
//!
//! * [`WeightStore::open`] reads `model.safetensors.index.json` (sharded) or every `*.safetensors`
//!   in a directory (single file), memory-maps the files and validates headers.
//! * [`WeightStore::load_f32`] decodes one tensor to `f32` (f32, bf16, f16, fp8 e4m3fn with a
//!   `<name>_scale_inv` companion of 128×128 block scales, edge blocks partial), checking shape.
//! * Every tensor that was loaded is remembered, so [`WeightStore::unused`] reports the rest.
//! * [`GgufFile::open`] reads a llama.cpp GGUF (v2/v3) file: metadata, tensor table, and
//!   [`GgufFile::load_f32`] dequantises F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 tensors.
//!
//! ```no_run
//! # fn main() -> Result<(), indexcache_weights::WeightError> {
//! use indexcache_weights::WeightStore;
//! let mut store = WeightStore::open(std::path::Path::new("/models/DeepSeek-V3.2"))?;
//! store.set_fp8_block([128, 128]);
//! let wk = store.load_f32("model.layers.0.self_attn.indexer.wk.weight", &[128, 7168])?;
//! # let _ = wk; Ok(()) }
//! ```

mod fp8;
pub mod gguf;
mod header;

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use memmap2::Mmap;
use rayon::prelude::*;
use serde::Deserialize;
use thiserror::Error;

pub use fp8::{f8e4m3_lut, f8e4m3_to_f32, f32_to_f8e4m3};
pub use gguf::{GgmlType, GgufArray, GgufError, GgufFile, GgufTensorInfo, GgufValue, GgufValueType};

/// Name of the shard index of a sharded HF checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The HF name of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// Suffix appended to an fp8 weight's name to find its block scales
/// (`"a.weight"` → `"a.weight_scale_inv"`).
pub const SCALE_SUFFIX: &str = "_scale_inv";

/// Tensors with at least this many elements are converted with rayon.
pub(crate) const PAR_THRESHOLD: usize = 1 << 16;

/// A dtype as stored on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// OCP FP8 e4m3fn (safetensors `F8_E4M3`).
    F8E4M3,
    /// Signed 32-bit integer.
    I32,
    /// Signed 64-bit integer.
    I64,
    /// Any other safetensors dtype (BOOL, U8, I8, F64, F8_E5M2, F8_E8M0, ...).
    Other,
}

impl DType {
    /// Bytes per element, or `None` for [`DType::Other`] (whose width depends on the on-disk type).
    pub fn size_in_bytes(self) -> Option<usize> {
        match self {
            DType::F32 | DType::I32 => Some(4),
            DType::F16 | DType::BF16 => Some(2),
            DType::F8E4M3 => Some(1),
            DType::I64 => Some(8),
            DType::Other => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8E4M3 => "F8_E4M3",
            DType::I32 => "I32",
            DType::I64 => "I64",
            DType::Other => "other",
        };
        f.write_str(s)
    }
}

/// Errors from opening or reading a checkpoint. Every message names the file and, where one is
/// involved, the tensor.
#[derive(Debug, Error)]
pub enum WeightError {
    /// A file- or directory-level problem (I/O, bad header, missing shard, ...).
    #[error("{path}: {message}")]
    File {
        /// The file or directory concerned.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The requested tensor is not in the checkpoint.
    #[error("tensor {name:?} not found in the checkpoint")]
    Missing {
        /// The tensor name that was asked for.
        name: String,
    },
    /// The stored shape differs from the one the caller expects.
    #[error("tensor {name:?} in {file}: expected shape {expected:?}, found {found:?}")]
    Shape {
        /// Tensor name.
        name: String,
        /// File holding the tensor.
        file: String,
        /// Shape the caller asked for.
        expected: Vec<usize>,
        /// Shape stored in the file.
        found: Vec<usize>,
    },
    /// The tensor's dtype cannot be decoded by the requested operation.
    #[error("tensor {name:?} in {file}: unsupported dtype {dtype}")]
    DType {
        /// Tensor name.
        name: String,
        /// File holding the tensor.
        file: String,
        /// The dtype as spelled in the file (`"I64"`, ...).
        dtype: String,
    },
    /// Anything else wrong with one tensor (bad fp8 scales, missing companion, ...).
    #[error("tensor {name:?} in {file}: {message}")]
    Invalid {
        /// Tensor name.
        name: String,
        /// File holding the tensor.
        file: String,
        /// What is wrong.
        message: String,
    },
}

fn file_err(path: &Path, message: impl Into<String>) -> WeightError {
    WeightError::File { path: path.display().to_string(), message: message.into() }
}

/// Metadata of one stored tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Full tensor name, e.g. `model.layers.0.self_attn.q_a_proj.weight`.
    pub name: String,
    /// On-disk dtype.
    pub dtype: DType,
    /// On-disk shape (row-major).
    pub shape: Vec<usize>,
    /// The safetensors file holding it.
    pub file: PathBuf,
}

impl TensorInfo {
    /// Number of elements (product of the shape; 1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

struct Entry {
    info: TensorInfo,
    dtype_name: &'static str,
    file_idx: usize,
    start: usize,
    end: usize,
}

/// A set of memory-mapped safetensors files with a name index.
///
/// `Send + Sync`: tensors can be loaded from several threads at once; the "used" marks are atomic.
pub struct WeightStore {
    files: Vec<PathBuf>,
    maps: Vec<Mmap>,
    /// Sorted by name.
    entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
    used: Vec<AtomicBool>,
    fp8_block: Option<[usize; 2]>,
}

impl fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeightStore")
            .field("files", &self.files)
            .field("tensors", &self.entries.len())
            .field("fp8_block", &self.fp8_block)
            .finish()
    }
}

#[derive(Deserialize)]
struct IndexJson {
    weight_map: HashMap<String, String>,
}

impl WeightStore {
    /// Opens a checkpoint directory.
    ///
    /// If `model.safetensors.index.json` exists its `weight_map` is used: every shard it names
    /// must exist and every mapped tensor must be present in its shard (else an error naming the
    /// file/tensor). Otherwise every `*.safetensors` file in the directory is opened (sorted by
    /// name). A directory without safetensors files is an error naming the directory; the same
    /// tensor name in two files is an error.
    pub fn open(dir: &Path) -> Result<Self, WeightError> {
        let index_path = dir.join(INDEX_FILE);
        if index_path.is_file() {
            return Self::open_index(dir, &index_path);
        }
        // The HF single-file name wins, so other safetensors files kept beside a checkpoint
        // (reference dumps, adapters) are not mistaken for weights.
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::open_files(&[single]);
        }
        let rd = std::fs::read_dir(dir).map_err(|e| file_err(dir, format!("cannot read checkpoint directory: {e}")))?;
        let mut files = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| file_err(dir, format!("cannot read checkpoint directory: {e}")))?;
            let path = ent.path();
            let is_st = path.extension().is_some_and(|x| x == "safetensors");
            if is_st && path.is_file() {
                files.push(path);
            }
        }
        if files.is_empty() {
            return Err(file_err(
                dir,
                format!("no *.safetensors files and no {INDEX_FILE} in the checkpoint directory"),
            ));
        }
        files.sort();
        Self::open_files(&files)
    }

    fn open_index(dir: &Path, index_path: &Path) -> Result<Self, WeightError> {
        let text = std::fs::read_to_string(index_path)
            .map_err(|e| file_err(index_path, format!("cannot read shard index: {e}")))?;
        let index: IndexJson =
            serde_json::from_str(&text).map_err(|e| file_err(index_path, format!("invalid shard index JSON: {e}")))?;
        let mut shard_names: Vec<&str> = index.weight_map.values().map(String::as_str).collect();
        shard_names.sort_unstable();
        shard_names.dedup();
        if shard_names.is_empty() {
            return Err(file_err(index_path, "shard index has an empty weight_map"));
        }
        let mut files = Vec::with_capacity(shard_names.len());
        for shard in &shard_names {
            let path = dir.join(shard);
            if !path.is_file() {
                return Err(file_err(&path, format!("shard file listed in {} does not exist", index_path.display())));
            }
            files.push(path);
        }
        let store = Self::open_files(&files)?;
        let mut mapped: Vec<(&String, &String)> = index.weight_map.iter().collect();
        mapped.sort_unstable();
        for (name, shard) in mapped {
            let shard_path = dir.join(shard);
            let ok = store.by_name.get(name.as_str()).is_some_and(|&i| store.entries[i].info.file == shard_path);
            if !ok {
                let actually = match store.by_name.get(name.as_str()) {
                    Some(&i) => format!(" (it is in {})", store.entries[i].info.file.display()),
                    None => String::new(),
                };
                return Err(WeightError::Invalid {
                    name: name.clone(),
                    file: shard_path.display().to_string(),
                    message: format!(
                        "mapped to this shard by {} but not present in it{actually}",
                        index_path.display()
                    ),
                });
            }
        }
        Ok(store)
    }

    /// Opens an explicit list of safetensors files (in the given order). An empty list gives an
    /// empty store. The same tensor name in two files is an error.
    pub fn open_files(files: &[PathBuf]) -> Result<Self, WeightError> {
        let mut maps = Vec::with_capacity(files.len());
        let mut entries: Vec<Entry> = Vec::new();
        let mut first_file: HashMap<String, usize> = HashMap::new();
        for (file_idx, path) in files.iter().enumerate() {
            let file = File::open(path).map_err(|e| file_err(path, format!("cannot open: {e}")))?;
            let len = file.metadata().map_err(|e| file_err(path, format!("cannot stat: {e}")))?.len();
            if len < header::PREFIX as u64 {
                return Err(file_err(
                    path,
                    format!(
                        "file is {len} bytes, too small for a safetensors header (needs at least {})",
                        header::PREFIX
                    ),
                ));
            }
            // SAFETY: the map is read-only and private to this store. As with every mmap-based
            // loader, modifying or truncating the file while it is mapped is undefined behaviour;
            // checkpoints are treated as immutable.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| file_err(path, format!("cannot memory-map: {e}")))?;
            let tensors = header::parse(&map).map_err(|m| file_err(path, m))?;
            for t in tensors {
                if let Some(&prev) = first_file.get(&t.name) {
                    return Err(WeightError::Invalid {
                        name: t.name,
                        file: path.display().to_string(),
                        message: format!("duplicate tensor name (also in {})", files[prev].display()),
                    });
                }
                first_file.insert(t.name.clone(), file_idx);
                entries.push(Entry {
                    info: TensorInfo { name: t.name, dtype: t.dtype, shape: t.shape, file: path.clone() },
                    dtype_name: t.dtype_name,
                    file_idx,
                    start: t.start,
                    end: t.end,
                });
            }
            maps.push(map);
        }
        entries.sort_unstable_by(|a, b| a.info.name.cmp(&b.info.name));
        let by_name = entries.iter().enumerate().map(|(i, e)| (e.info.name.clone(), i)).collect();
        let used = entries.iter().map(|_| AtomicBool::new(false)).collect();
        Ok(Self { files: files.to_vec(), maps, entries, by_name, used, fp8_block: None })
    }

    /// Sets the block size `[rows, cols]` of fp8 block scales (from config.json
    /// `quantization_config.weight_block_size`, `[128, 128]` for DeepSeek-V3.2 and GLM-5-FP8).
    pub fn set_fp8_block(&mut self, block: [usize; 2]) {
        self.fp8_block = Some(block);
    }

    /// The fp8 block size set by [`WeightStore::set_fp8_block`], if any.
    pub fn fp8_block(&self) -> Option<[usize; 2]> {
        self.fp8_block
    }

    /// The files of this store, in the order they were opened.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Metadata of tensor `name`.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.entries[i].info)
    }

    /// Whether tensor `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.info.name.as_str()).collect()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the store holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sum of the tensors' data sizes in bytes (headers excluded).
    pub fn total_bytes(&self) -> u64 {
        self.entries.iter().map(|e| (e.end - e.start) as u64).sum()
    }

    fn entry(&self, name: &str) -> Result<usize, WeightError> {
        self.by_name.get(name).copied().ok_or_else(|| WeightError::Missing { name: name.to_string() })
    }

    pub(crate) fn bytes(&self, idx: usize) -> Result<&[u8], WeightError> {
        let e = &self.entries[idx];
        self.maps.get(e.file_idx).and_then(|m| m.get(e.start..e.end)).ok_or_else(|| WeightError::Invalid {
            name: e.info.name.clone(),
            file: e.info.file.display().to_string(),
            message: format!("data range [{}, {}) lies outside the file", e.start, e.end),
        })
    }

    pub(crate) fn mark(&self, idx: usize) {
        self.used[idx].store(true, Ordering::Relaxed);
    }

    pub(crate) fn invalid(&self, idx: usize, message: String) -> WeightError {
        let e = &self.entries[idx];
        WeightError::Invalid { name: e.info.name.clone(), file: e.info.file.display().to_string(), message }
    }

    /// Decodes tensor `name` to `f32`, checking that its stored shape equals `expected`.
    ///
    /// F32/BF16/F16 convert directly. F8E4M3 requires a 2-D tensor `[rows, cols]`, a block size
    /// (see [`WeightStore::set_fp8_block`]) `[br, bc]` and a companion `<name>_scale_inv` (f32,
    /// bf16, f16 or e8m0) of shape `[ceil(rows/br), ceil(cols/bc)]` (edge blocks are partial);
    /// element `(r, c)` is `e4m3(w[r][c]) * scale_inv[r / br][c / bc]`. Other dtypes give
    /// [`WeightError::DType`]. The tensor (and its scale) are marked as used.
    pub fn load_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, WeightError> {
        let idx = self.entry(name)?;
        let e = &self.entries[idx];
        if e.info.shape != expected {
            return Err(WeightError::Shape {
                name: name.to_string(),
                file: e.info.file.display().to_string(),
                expected: expected.to_vec(),
                found: e.info.shape.clone(),
            });
        }
        let out = match e.info.dtype {
            DType::F32 | DType::BF16 | DType::F16 => {
                decode_plain(e.dtype_name, self.bytes(idx)?).ok_or_else(|| WeightError::DType {
                    name: name.to_string(),
                    file: e.info.file.display().to_string(),
                    dtype: e.dtype_name.to_string(),
                })?
            }
            DType::F8E4M3 => self.load_fp8(idx)?,
            DType::I32 | DType::I64 | DType::Other => {
                return Err(WeightError::DType {
                    name: name.to_string(),
                    file: e.info.file.display().to_string(),
                    dtype: e.dtype_name.to_string(),
                });
            }
        };
        self.mark(idx);
        Ok(out)
    }

    /// Raw view of tensor `name` for upload elsewhere: `(dtype, shape, little-endian bytes)`.
    /// Marks the tensor as used. The bytes may be unaligned.
    pub fn raw(&self, name: &str) -> Result<(DType, &[usize], &[u8]), WeightError> {
        let idx = self.entry(name)?;
        let bytes = self.bytes(idx)?;
        self.mark(idx);
        let e = &self.entries[idx];
        Ok((e.info.dtype, &e.info.shape, bytes))
    }

    /// The on-disk dtype of tensor `name` spelled as in the file (`"F8_E8M0"`, `"U8"`, ...),
    /// useful when [`TensorInfo::dtype`] is [`DType::Other`].
    pub fn dtype_name(&self, name: &str) -> Option<&'static str> {
        self.by_name.get(name).map(|&i| self.entries[i].dtype_name)
    }

    /// Marks tensor `name` as used without loading it (e.g. for tensors deliberately ignored).
    /// Returns whether it exists.
    pub fn mark_used(&self, name: &str) -> bool {
        match self.by_name.get(name) {
            Some(&i) => {
                self.mark(i);
                true
            }
            None => false,
        }
    }

    /// Names of tensors never loaded through [`WeightStore::load_f32`] or [`WeightStore::raw`]
    /// (or marked by [`WeightStore::mark_used`]), sorted.
    pub fn unused(&self) -> Vec<String> {
        self.entries
            .iter()
            .zip(&self.used)
            .filter(|(_, u)| !u.load(Ordering::Relaxed))
            .map(|(e, _)| e.info.name.clone())
            .collect()
    }
}

/// Converts little-endian F32/BF16/F16 bytes to f32; `None` for any other dtype.
pub(crate) fn decode_plain(dtype_name: &str, bytes: &[u8]) -> Option<Vec<f32>> {
    let (width, conv): (usize, fn(&[u8]) -> f32) = match dtype_name {
        "F32" => (4, |c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        "BF16" => (2, |c| f32::from_bits((u32::from(u16::from_le_bytes([c[0], c[1]]))) << 16)),
        "F16" => (2, |c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()),
        _ => return None,
    };
    let n = bytes.len() / width;
    let mut out = vec![0f32; n];
    const CHUNK: usize = 1 << 14;
    if n >= PAR_THRESHOLD {
        out.par_chunks_mut(CHUNK).zip(bytes.par_chunks(CHUNK * width)).for_each(|(o, b)| {
            for (x, c) in o.iter_mut().zip(b.chunks_exact(width)) {
                *x = conv(c);
            }
        });
    } else {
        for (x, c) in out.iter_mut().zip(bytes.chunks_exact(width)) {
            *x = conv(c);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<WeightStore>();
    }

    #[test]
    fn decode_plain_rejects_other() {
        assert!(decode_plain("I32", &[0; 4]).is_none());
        assert_eq!(decode_plain("BF16", &[0x80, 0x3F]), Some(vec![1.0]));
    }
}
