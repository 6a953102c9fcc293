//! GGUF (llama.cpp / ggml) model files, versions 2 and 3.
//!
//! [`GgufFile::open`] memory-maps a file, parses and validates its header, metadata and tensor
//! table; [`GgufFile::load_f32`] dequantises one tensor to `f32`.
//!
//! # Format
//!
//! Everything is little-endian. A file is
//!
//! ```text
//! magic      4 bytes  "GGUF"
//! version    u32      3 (2 is identical for this reader; 1 used u32 counts and is rejected)
//! n_tensors  u64
//! n_kv       u64
//! n_kv ×     metadata entry: key (string), value type (u32), value
//! n_tensors× tensor info: name (string), n_dims (u32, at most 4), dims (n_dims × u64),
//!            ggml type (u32), offset (u64, relative to the data section)
//! padding    to a multiple of `general.alignment` (u32 metadata, default 32)
//! data       tensor data; every tensor offset is a multiple of the alignment
//! ```
//!
//! A string is a u64 byte length followed by that many UTF-8 bytes (no terminator). A metadata
//! value is one of the [`GgufValueType`]s; an array is an element type (u32), a u64 count and
//! the elements, which may themselves be arrays (their element type, count and elements).
//!
//! Tensor dims are in ggml order: `dims[0]` is the fastest-varying (the row length), so the
//! PyTorch / row-major shape is the reverse ([`GgufTensorInfo::shape`]). Data is stored
//! row-major in that reversed shape, quantised types as consecutive blocks of
//! [`GgmlType::block_size`] elements ([`GgmlType::type_size`] bytes each) along `dims[0]`,
//! which must therefore be a multiple of the block size.
//!
//! # Validation
//!
//! A malformed file gives a [`GgufError`] naming the file and, where one is involved, the
//! metadata key or tensor — never a panic. Counts and lengths read from the file are checked
//! against the bytes that remain before anything is allocated for them (a header claiming 2^60
//! tensors is rejected up front), nested arrays are limited to [`GGUF_MAX_ARRAY_DEPTH`] levels,
//! and every tensor's byte range must be aligned, consistent with its type and dims, inside the
//! file and disjoint from the others.
//!
//! ```no_run
//! # fn main() -> Result<(), indexcache_weights::GgufError> {
//! use indexcache_weights::GgufFile;
//! let gguf = GgufFile::open("/models/model-Q8_0.gguf")?;
//! let n_layers = gguf.get_u32("llama.block_count")?;
//! let tokens = gguf.get_str_array("tokenizer.ggml.tokens")?;
//! let info = gguf.tensor_info("token_embd.weight").expect("present");
//! let embd = gguf.load_f32("token_embd.weight")?; // info.shape() == [vocab, hidden]
//! # let _ = (n_layers, tokens, embd); Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;
use thiserror::Error;

use crate::{PAR_THRESHOLD, WeightError};

/// The four magic bytes at the start of every GGUF file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// Metadata key holding the data alignment (u32).
pub const GGUF_ALIGNMENT_KEY: &str = "general.alignment";

/// Alignment used when `general.alignment` is absent.
pub const GGUF_DEFAULT_ALIGNMENT: usize = 32;

/// Largest accepted `general.alignment` (as in ggml: larger values only serve to make a
/// reader pad absurdly).
pub const GGUF_MAX_ALIGNMENT: usize = 1 << 20;

/// Most tensor dimensions a GGUF file may declare (ggml's `GGML_MAX_DIMS`).
pub const GGUF_MAX_DIMS: usize = 4;

/// Deepest nesting of metadata arrays accepted (an array of arrays is depth 2).
pub const GGUF_MAX_ARRAY_DEPTH: usize = 8;

/// Size of the fixed header: magic, version, tensor count, metadata count.
const HEADER_LEN: usize = 4 + 4 + 8 + 8;

/// Smallest possible encoding of one metadata entry: empty key (8), type (4), one-byte value.
const MIN_KV_LEN: usize = 8 + 4 + 1;

/// Smallest possible encoding of one tensor info: empty name (8), n_dims (4), type (4),
/// offset (8).
const MIN_TENSOR_INFO_LEN: usize = 8 + 4 + 4 + 8;

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Errors from reading a GGUF file. Every message names the file and, where one is involved,
/// the metadata key or tensor, and says what is wrong.
#[derive(Debug, Error)]
pub enum GgufError {
    /// A file-level problem: I/O, bad magic or version, truncated or corrupt header/tables.
    #[error("{path}: {message}")]
    File {
        /// The file concerned.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A metadata entry is malformed (bad value, truncated, duplicate, out-of-range element).
    #[error("{path}: metadata key {key:?}: {message}")]
    Metadata {
        /// The file concerned.
        path: String,
        /// The metadata key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The requested metadata key is not in the file.
    #[error("{path}: metadata key {key:?} not found")]
    MissingKey {
        /// The file concerned.
        path: String,
        /// The key that was asked for.
        key: String,
    },
    /// A metadata value has a different type than the accessor expects.
    #[error("{path}: metadata key {key:?}: expected {expected}, found {found}")]
    KeyType {
        /// The file concerned.
        path: String,
        /// The metadata key.
        key: String,
        /// The type the accessor wanted (`"u32"`, `"array of string"`, ...).
        expected: String,
        /// The type stored in the file.
        found: String,
    },
    /// The requested tensor is not in the file.
    #[error("{path}: tensor {name:?} not found")]
    MissingTensor {
        /// The file concerned.
        path: String,
        /// The tensor name that was asked for.
        name: String,
    },
    /// A tensor entry is malformed or its data is unusable (bad dims, misaligned or
    /// out-of-range offset, truncated data, duplicate name, shape mismatch, ...).
    #[error("{path}: tensor {name:?}: {message}")]
    Tensor {
        /// The file concerned.
        path: String,
        /// The tensor name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// The tensor's ggml type id is unknown (at open: its size cannot be determined) or cannot
    /// be dequantised by [`GgufFile::load_f32`].
    #[error("{path}: tensor {name:?}: unsupported ggml type {type_name} (type id {type_id}): {message}")]
    UnsupportedType {
        /// The file concerned.
        path: String,
        /// The tensor name.
        name: String,
        /// The type id as stored in the file.
        type_id: u32,
        /// The type's ggml name, or `"unknown"`.
        type_name: String,
        /// Why it cannot be used.
        message: String,
    },
}

impl From<GgufError> for WeightError {
    fn from(e: GgufError) -> Self {
        let text = e.to_string();
        match e {
            GgufError::MissingTensor { name, .. } => WeightError::Missing { name },
            GgufError::Tensor { path, name, message } => WeightError::Invalid { name, file: path, message },
            GgufError::UnsupportedType { path, name, type_name, .. } => {
                WeightError::DType { name, file: path, dtype: type_name }
            }
            GgufError::File { path, .. }
            | GgufError::Metadata { path, .. }
            | GgufError::MissingKey { path, .. }
            | GgufError::KeyType { path, .. } => {
                // `text` already starts with the path; keep the rest as the message.
                let message = text.strip_prefix(&format!("{path}: ")).unwrap_or(&text).to_string();
                WeightError::File { path, message }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Metadata values
// ---------------------------------------------------------------------------------------------

/// The type tag of a GGUF metadata value (the u32 stored before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgufValueType {
    /// 0: unsigned 8-bit integer.
    U8,
    /// 1: signed 8-bit integer.
    I8,
    /// 2: unsigned 16-bit integer.
    U16,
    /// 3: signed 16-bit integer.
    I16,
    /// 4: unsigned 32-bit integer.
    U32,
    /// 5: signed 32-bit integer.
    I32,
    /// 6: IEEE binary32.
    F32,
    /// 7: one byte, 0 (false) or 1 (true).
    Bool,
    /// 8: u64 length + UTF-8 bytes.
    String,
    /// 9: element type (u32) + u64 count + elements.
    Array,
    /// 10: unsigned 64-bit integer.
    U64,
    /// 11: signed 64-bit integer.
    I64,
    /// 12: IEEE binary64.
    F64,
}

impl GgufValueType {
    /// The type for a stored tag, or `None` for an unknown tag.
    pub fn from_id(id: u32) -> Option<Self> {
        use GgufValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The tag stored in the file.
    pub fn id(self) -> u32 {
        use GgufValueType::*;
        match self {
            U8 => 0,
            I8 => 1,
            U16 => 2,
            I16 => 3,
            U32 => 4,
            I32 => 5,
            F32 => 6,
            Bool => 7,
            String => 8,
            Array => 9,
            U64 => 10,
            I64 => 11,
            F64 => 12,
        }
    }

    /// Lower-case name (`"u32"`, `"string"`, `"array"`, ...).
    pub fn name(self) -> &'static str {
        use GgufValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }

    /// Encoded size of a fixed-size value, `None` for strings and arrays.
    fn fixed_size(self) -> Option<usize> {
        use GgufValueType::*;
        match self {
            U8 | I8 | Bool => Some(1),
            U16 | I16 => Some(2),
            U32 | I32 | F32 => Some(4),
            U64 | I64 | F64 => Some(8),
            String | Array => None,
        }
    }

    /// Smallest possible encoding of one value of this type (used to bound counts before
    /// allocating): a string is at least its length prefix, an array its type and count.
    fn min_encoded_len(self) -> usize {
        match self {
            GgufValueType::String => 8,
            GgufValueType::Array => 4 + 8,
            other => other.fixed_size().unwrap_or(1),
        }
    }
}

impl fmt::Display for GgufValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A metadata array. Elements are stored unboxed by type, so an array costs about as much
/// memory as its encoding (strings and nested arrays a small constant factor more).
#[derive(Debug, Clone, PartialEq)]
pub enum GgufArray {
    /// Array of u8.
    U8(Vec<u8>),
    /// Array of i8.
    I8(Vec<i8>),
    /// Array of u16.
    U16(Vec<u16>),
    /// Array of i16.
    I16(Vec<i16>),
    /// Array of u32.
    U32(Vec<u32>),
    /// Array of i32.
    I32(Vec<i32>),
    /// Array of f32.
    F32(Vec<f32>),
    /// Array of bool.
    Bool(Vec<bool>),
    /// Array of strings.
    String(Vec<String>),
    /// Array of arrays (each with its own element type and length).
    Array(Vec<GgufArray>),
    /// Array of u64.
    U64(Vec<u64>),
    /// Array of i64.
    I64(Vec<i64>),
    /// Array of f64.
    F64(Vec<f64>),
}

impl GgufArray {
    /// The element type.
    pub fn elem_type(&self) -> GgufValueType {
        match self {
            GgufArray::U8(_) => GgufValueType::U8,
            GgufArray::I8(_) => GgufValueType::I8,
            GgufArray::U16(_) => GgufValueType::U16,
            GgufArray::I16(_) => GgufValueType::I16,
            GgufArray::U32(_) => GgufValueType::U32,
            GgufArray::I32(_) => GgufValueType::I32,
            GgufArray::F32(_) => GgufValueType::F32,
            GgufArray::Bool(_) => GgufValueType::Bool,
            GgufArray::String(_) => GgufValueType::String,
            GgufArray::Array(_) => GgufValueType::Array,
            GgufArray::U64(_) => GgufValueType::U64,
            GgufArray::I64(_) => GgufValueType::I64,
            GgufArray::F64(_) => GgufValueType::F64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F64(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A description of the type such as `"array of u32"` or `"array of array of string"`
    /// (nested arrays are described by their first element; an empty nested array by
    /// `"array of array"`).
    pub fn type_description(&self) -> String {
        match self {
            GgufArray::Array(v) => match v.first() {
                Some(inner) => format!("array of {}", inner.type_description()),
                None => "array of array".to_string(),
            },
            other => format!("array of {}", other.elem_type()),
        }
    }

    /// Element `i` of an integer array widened to i128, `None` for non-integer arrays or an
    /// index out of range.
    fn int_at(&self, i: usize) -> Option<i128> {
        Some(match self {
            GgufArray::U8(v) => i128::from(*v.get(i)?),
            GgufArray::I8(v) => i128::from(*v.get(i)?),
            GgufArray::U16(v) => i128::from(*v.get(i)?),
            GgufArray::I16(v) => i128::from(*v.get(i)?),
            GgufArray::U32(v) => i128::from(*v.get(i)?),
            GgufArray::I32(v) => i128::from(*v.get(i)?),
            GgufArray::U64(v) => i128::from(*v.get(i)?),
            GgufArray::I64(v) => i128::from(*v.get(i)?),
            _ => return None,
        })
    }

    fn is_integer(&self) -> bool {
        matches!(
            self,
            GgufArray::U8(_)
                | GgufArray::I8(_)
                | GgufArray::U16(_)
                | GgufArray::I16(_)
                | GgufArray::U32(_)
                | GgufArray::I32(_)
                | GgufArray::U64(_)
                | GgufArray::I64(_)
        )
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// u8 value.
    U8(u8),
    /// i8 value.
    I8(i8),
    /// u16 value.
    U16(u16),
    /// i16 value.
    I16(i16),
    /// u32 value.
    U32(u32),
    /// i32 value.
    I32(i32),
    /// f32 value.
    F32(f32),
    /// bool value.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Array (possibly of arrays).
    Array(GgufArray),
    /// u64 value.
    U64(u64),
    /// i64 value.
    I64(i64),
    /// f64 value.
    F64(f64),
}

impl GgufValue {
    /// The value's type tag.
    pub fn value_type(&self) -> GgufValueType {
        match self {
            GgufValue::U8(_) => GgufValueType::U8,
            GgufValue::I8(_) => GgufValueType::I8,
            GgufValue::U16(_) => GgufValueType::U16,
            GgufValue::I16(_) => GgufValueType::I16,
            GgufValue::U32(_) => GgufValueType::U32,
            GgufValue::I32(_) => GgufValueType::I32,
            GgufValue::F32(_) => GgufValueType::F32,
            GgufValue::Bool(_) => GgufValueType::Bool,
            GgufValue::String(_) => GgufValueType::String,
            GgufValue::Array(_) => GgufValueType::Array,
            GgufValue::U64(_) => GgufValueType::U64,
            GgufValue::I64(_) => GgufValueType::I64,
            GgufValue::F64(_) => GgufValueType::F64,
        }
    }

    /// A description of the type for messages: `"u32"`, `"string"`, `"array of f32"`, ...
    pub fn type_description(&self) -> String {
        match self {
            GgufValue::Array(a) => a.type_description(),
            other => other.value_type().name().to_string(),
        }
    }

    /// The string, if this is a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The array, if this is an array value.
    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// Any integer value widened to i128 (bools are not integers here).
    pub fn as_int(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => v.into(),
            GgufValue::I64(v) => v.into(),
            _ => return None,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor types
// ---------------------------------------------------------------------------------------------

/// A ggml tensor type (the u32 `type` of a tensor info). Names follow ggml.
///
/// Every type ggml can store in a GGUF file is known (so its size can be validated), but only
/// the types for which [`GgmlType::can_dequantize`] holds can be loaded with
/// [`GgufFile::load_f32`].
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 0: IEEE binary32.
    F32,
    /// 1: IEEE binary16.
    F16,
    /// 2: blocks of 32: `{f16 d; u8 qs[16]}`, value `j` (0..16) is `((qs[j] & 0xF) - 8) * d`,
    /// value `j + 16` is `((qs[j] >> 4) - 8) * d`.
    Q4_0,
    /// 3: blocks of 32: `{f16 d; f16 m; u8 qs[16]}`, nibbles as in Q4_0 (unbiased),
    /// value = `nibble * d + m`.
    Q4_1,
    /// 6: blocks of 32: `{f16 d; u8 qh[4]; u8 qs[16]}`, a 5-bit quant whose high bit for
    /// element `i` is bit `i` of the little-endian u32 `qh`; value = `(q - 16) * d`.
    Q5_0,
    /// 7: blocks of 32: `{f16 d; f16 m; u8 qh[4]; u8 qs[16]}`, quants as in Q5_0 (unbiased),
    /// value = `q * d + m`.
    Q5_1,
    /// 8: blocks of 32: `{f16 d; i8 qs[32]}`, value = `qs[j] * d`.
    Q8_0,
    /// 9: blocks of 32: `{f16 d; f16 s; i8 qs[32]}` (`s = d * sum(qs)`), value = `qs[j] * d`.
    /// An intermediate format of ggml's dot products, not normally found in files.
    Q8_1,
    /// 10: k-quant, super-blocks of 256.
    Q2_K,
    /// 11: k-quant, super-blocks of 256.
    Q3_K,
    /// 12: k-quant, super-blocks of 256.
    Q4_K,
    /// 13: k-quant, super-blocks of 256.
    Q5_K,
    /// 14: k-quant, super-blocks of 256.
    Q6_K,
    /// 15: k-quant, super-blocks of 256.
    Q8_K,
    /// 16: i-quant.
    IQ2_XXS,
    /// 17: i-quant.
    IQ2_XS,
    /// 18: i-quant.
    IQ3_XXS,
    /// 19: i-quant.
    IQ1_S,
    /// 20: i-quant, blocks of 32.
    IQ4_NL,
    /// 21: i-quant.
    IQ3_S,
    /// 22: i-quant.
    IQ2_S,
    /// 23: i-quant.
    IQ4_XS,
    /// 24: signed 8-bit integer.
    I8,
    /// 25: signed 16-bit integer.
    I16,
    /// 26: signed 32-bit integer.
    I32,
    /// 27: signed 64-bit integer.
    I64,
    /// 28: IEEE binary64.
    F64,
    /// 29: i-quant.
    IQ1_M,
    /// 30: bfloat16.
    BF16,
    /// 34: ternary quant.
    TQ1_0,
    /// 35: ternary quant.
    TQ2_0,
    /// 39: OCP MX fp4, blocks of 32.
    MXFP4,
    /// 40: NVIDIA fp4, blocks of 64.
    NVFP4,
    /// 41: 1-bit quant, blocks of 128.
    Q1_0,
}

/// (type, id, name, block size in elements, block size in bytes), from ggml's type traits.
/// Ids 4, 5 (Q4_2/Q4_3), 31–33 (Q4_0_4_4, ...) and 36–38 (IQ4_NL_4_4, ...) were removed
/// from ggml and are rejected as unknown.
const GGML_TYPES: &[(GgmlType, u32, &str, usize, usize)] = &[
    (GgmlType::F32, 0, "F32", 1, 4),
    (GgmlType::F16, 1, "F16", 1, 2),
    (GgmlType::Q4_0, 2, "Q4_0", 32, 2 + 16),
    (GgmlType::Q4_1, 3, "Q4_1", 32, 2 + 2 + 16),
    (GgmlType::Q5_0, 6, "Q5_0", 32, 2 + 4 + 16),
    (GgmlType::Q5_1, 7, "Q5_1", 32, 2 + 2 + 4 + 16),
    (GgmlType::Q8_0, 8, "Q8_0", 32, 2 + 32),
    (GgmlType::Q8_1, 9, "Q8_1", 32, 2 + 2 + 32),
    (GgmlType::Q2_K, 10, "Q2_K", 256, 2 + 2 + 256 / 16 + 256 / 4),
    (GgmlType::Q3_K, 11, "Q3_K", 256, 2 + 256 / 4 + 256 / 8 + 12),
    (GgmlType::Q4_K, 12, "Q4_K", 256, 2 + 2 + 256 / 2 + 12),
    (GgmlType::Q5_K, 13, "Q5_K", 256, 2 + 2 + 256 / 2 + 256 / 8 + 12),
    (GgmlType::Q6_K, 14, "Q6_K", 256, 2 + 256 / 2 + 256 / 4 + 256 / 16),
    (GgmlType::Q8_K, 15, "Q8_K", 256, 4 + 256 + 256 / 8),
    (GgmlType::IQ2_XXS, 16, "IQ2_XXS", 256, 2 + 256 / 4),
    (GgmlType::IQ2_XS, 17, "IQ2_XS", 256, 2 + 256 / 4 + 256 / 32),
    (GgmlType::IQ3_XXS, 18, "IQ3_XXS", 256, 2 + 256 / 4 + 256 / 8),
    (GgmlType::IQ1_S, 19, "IQ1_S", 256, 2 + 256 / 8 + 256 / 16),
    (GgmlType::IQ4_NL, 20, "IQ4_NL", 32, 2 + 16),
    (GgmlType::IQ3_S, 21, "IQ3_S", 256, 2 + 256 / 4 + 256 / 8 + 256 / 32 + 4),
    (GgmlType::IQ2_S, 22, "IQ2_S", 256, 2 + 256 / 4 + 256 / 16),
    (GgmlType::IQ4_XS, 23, "IQ4_XS", 256, 2 + 2 + 256 / 2 + 256 / 64),
    (GgmlType::I8, 24, "I8", 1, 1),
    (GgmlType::I16, 25, "I16", 1, 2),
    (GgmlType::I32, 26, "I32", 1, 4),
    (GgmlType::I64, 27, "I64", 1, 8),
    (GgmlType::F64, 28, "F64", 1, 8),
    (GgmlType::IQ1_M, 29, "IQ1_M", 256, 256 / 8 + 256 / 16 + 256 / 32),
    (GgmlType::BF16, 30, "BF16", 1, 2),
    (GgmlType::TQ1_0, 34, "TQ1_0", 256, 2 + 4 * 13),
    (GgmlType::TQ2_0, 35, "TQ2_0", 256, 2 + 64),
    (GgmlType::MXFP4, 39, "MXFP4", 32, 1 + 16),
    (GgmlType::NVFP4, 40, "NVFP4", 64, 4 + 32),
    (GgmlType::Q1_0, 41, "Q1_0", 128, 2 + 16),
];

impl GgmlType {
    fn traits(self) -> (u32, &'static str, usize, usize) {
        // Every variant is in the table (checked by a unit test); the fallback is unreachable.
        GGML_TYPES.iter().find(|t| t.0 == self).map_or((u32::MAX, "?", 1, 1), |t| (t.1, t.2, t.3, t.4))
    }

    /// The type for a stored type id, `None` for an unknown or removed id.
    pub fn from_id(id: u32) -> Option<Self> {
        GGML_TYPES.iter().find(|t| t.1 == id).map(|t| t.0)
    }

    /// The type id stored in the file.
    pub fn id(self) -> u32 {
        self.traits().0
    }

    /// ggml's name (`"Q8_0"`, `"BF16"`, ...).
    pub fn name(self) -> &'static str {
        self.traits().1
    }

    /// Elements per block (1 for plain types).
    pub fn block_size(self) -> usize {
        self.traits().2
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.traits().3
    }

    /// Whether [`GgufFile::load_f32`] can decode this type.
    pub fn can_dequantize(self) -> bool {
        matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::F64
                | GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q5_0
                | GgmlType::Q5_1
                | GgmlType::Q8_0
                | GgmlType::Q8_1
        )
    }

    /// Bytes needed for `numel` elements with rows of `row_len` elements, or a message saying
    /// why the shape does not fit the type.
    fn nbytes(self, row_len: usize, numel: usize) -> Result<usize, String> {
        let block = self.block_size();
        if !row_len.is_multiple_of(block) {
            return Err(format!(
                "row length (dims[0]) {row_len} is not a multiple of the {} block size {block}",
                self.name()
            ));
        }
        (numel / block)
            .checked_mul(self.type_size())
            .ok_or_else(|| format!("{numel} elements of {} overflow the address space", self.name()))
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Names of the types [`GgufFile::load_f32`] decodes, for messages.
const DEQUANT_TYPES: &str = "F32, F16, BF16, F64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1";

// ---------------------------------------------------------------------------------------------
// Tensor info
// ---------------------------------------------------------------------------------------------

/// One entry of the tensor table, validated against the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dims in ggml order: `dims[0]` is the fastest-varying (row length). See
    /// [`GgufTensorInfo::shape`] for the PyTorch order.
    pub dims: Vec<usize>,
    /// Storage type.
    pub ggml_type: GgmlType,
    /// Offset of the data relative to the start of the data section (a multiple of the
    /// alignment).
    pub offset: usize,
    /// Absolute byte offset of the data in the file.
    pub data_start: usize,
    /// Size of the data in bytes.
    pub n_bytes: usize,
}

impl GgufTensorInfo {
    /// Shape in PyTorch / row-major order (the reverse of [`GgufTensorInfo::dims`]); `[]` for a
    /// 0-dim tensor.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }

    /// Number of elements (product of the dims; 1 for a 0-dim tensor).
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// Absolute byte range of the data in the file.
    pub fn data_range(&self) -> std::ops::Range<usize> {
        self.data_start..self.data_start + self.n_bytes
    }
}

// ---------------------------------------------------------------------------------------------
// Byte reader
// ---------------------------------------------------------------------------------------------

/// A bounds-checked little-endian reader over the mapped file. Errors are plain messages; the
/// caller adds the file and key/tensor.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            format!(
                "unexpected end of file reading {what}: {n} bytes needed at offset {}, {} left \
                 (file is {} bytes; truncated?)",
                self.pos,
                self.remaining(),
                self.buf.len()
            )
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Checks that `count` items of at least `min_len` bytes each can still fit in the file,
    /// before anything is allocated for them; returns `count` as usize.
    fn check_count(&self, count: u64, min_len: usize, what: &str) -> Result<usize, String> {
        let need = u128::from(count) * min_len as u128;
        if need > self.remaining() as u128 {
            return Err(format!(
                "{what}: count {count} needs at least {need} bytes ({min_len} each) but only {} \
                 bytes remain after offset {} (corrupt count or truncated file)",
                self.remaining(),
                self.pos
            ));
        }
        // need <= remaining <= usize::MAX, so count fits.
        usize::try_from(count).map_err(|_| format!("{what}: count {count} does not fit in memory"))
    }

    /// A GGUF string: u64 length + UTF-8 bytes.
    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.u64(&format!("the length of {what}"))?;
        let start = self.pos;
        if len > self.remaining() as u64 {
            return Err(format!(
                "{what}: length {len} exceeds the {} bytes remaining after offset {start} (corrupt \
                 length or truncated file)",
                self.remaining()
            ));
        }
        // len <= remaining, so it fits in usize.
        let n = len as usize;
        let bytes = self.take(n, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => Err(format!("{what} at offset {start} is not valid UTF-8: {e}")),
        }
    }
}

fn read_fixed<const N: usize, T>(
    r: &mut Reader<'_>,
    count: usize,
    what: &str,
    conv: impl Fn([u8; N]) -> T,
) -> Result<Vec<T>, String> {
    let bytes = r.take(count * N, what)?;
    Ok(bytes
        .chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            conv(a)
        })
        .collect())
}

fn read_bool(b: u8, what: &str) -> Result<bool, String> {
    match b {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(format!("{what}: invalid bool byte {other} (must be 0 or 1)")),
    }
}

fn read_value_type(r: &mut Reader<'_>, what: &str) -> Result<GgufValueType, String> {
    let id = r.u32(what)?;
    GgufValueType::from_id(id).ok_or_else(|| format!("unknown {what} {id} (valid: 0..=12)"))
}

/// Reads one value of type `ty`. `depth` is the array nesting level of the value.
fn read_value(r: &mut Reader<'_>, ty: GgufValueType, depth: usize) -> Result<GgufValue, String> {
    Ok(match ty {
        GgufValueType::U8 => GgufValue::U8(r.u8("a u8 value")?),
        GgufValueType::I8 => GgufValue::I8(i8::from_le_bytes(r.array("an i8 value")?)),
        GgufValueType::U16 => GgufValue::U16(u16::from_le_bytes(r.array("a u16 value")?)),
        GgufValueType::I16 => GgufValue::I16(i16::from_le_bytes(r.array("an i16 value")?)),
        GgufValueType::U32 => GgufValue::U32(r.u32("a u32 value")?),
        GgufValueType::I32 => GgufValue::I32(i32::from_le_bytes(r.array("an i32 value")?)),
        GgufValueType::F32 => GgufValue::F32(f32::from_le_bytes(r.array("an f32 value")?)),
        GgufValueType::Bool => GgufValue::Bool(read_bool(r.u8("a bool value")?, "bool value")?),
        GgufValueType::String => GgufValue::String(r.string("string value")?),
        GgufValueType::Array => GgufValue::Array(read_array(r, depth + 1)?),
        GgufValueType::U64 => GgufValue::U64(r.u64("a u64 value")?),
        GgufValueType::I64 => GgufValue::I64(i64::from_le_bytes(r.array("an i64 value")?)),
        GgufValueType::F64 => GgufValue::F64(f64::from_le_bytes(r.array("an f64 value")?)),
    })
}

/// Reads an array body (element type, count, elements); `depth` is its nesting level (1 for
/// an array that is itself a metadata value).
fn read_array(r: &mut Reader<'_>, depth: usize) -> Result<GgufArray, String> {
    if depth > GGUF_MAX_ARRAY_DEPTH {
        return Err(format!(
            "array nesting depth {depth} exceeds the limit of {GGUF_MAX_ARRAY_DEPTH} (at offset {})",
            r.pos
        ));
    }
    let elem = read_value_type(r, "array element type")?;
    let count = r.u64("the array length")?;
    let n = r.check_count(count, elem.min_encoded_len(), &format!("array of {elem}"))?;
    let what = format!("an array of {n} {elem}");
    let what = what.as_str();
    Ok(match elem {
        GgufValueType::U8 => GgufArray::U8(r.take(n, what)?.to_vec()),
        GgufValueType::I8 => GgufArray::I8(read_fixed(r, n, what, i8::from_le_bytes)?),
        GgufValueType::U16 => GgufArray::U16(read_fixed(r, n, what, u16::from_le_bytes)?),
        GgufValueType::I16 => GgufArray::I16(read_fixed(r, n, what, i16::from_le_bytes)?),
        GgufValueType::U32 => GgufArray::U32(read_fixed(r, n, what, u32::from_le_bytes)?),
        GgufValueType::I32 => GgufArray::I32(read_fixed(r, n, what, i32::from_le_bytes)?),
        GgufValueType::F32 => GgufArray::F32(read_fixed(r, n, what, f32::from_le_bytes)?),
        GgufValueType::U64 => GgufArray::U64(read_fixed(r, n, what, u64::from_le_bytes)?),
        GgufValueType::I64 => GgufArray::I64(read_fixed(r, n, what, i64::from_le_bytes)?),
        GgufValueType::F64 => GgufArray::F64(read_fixed(r, n, what, f64::from_le_bytes)?),
        GgufValueType::Bool => {
            let bytes = r.take(n, what)?;
            let mut v = Vec::with_capacity(n);
            for (i, &b) in bytes.iter().enumerate() {
                v.push(read_bool(b, &format!("bool array element {i}"))?);
            }
            GgufArray::Bool(v)
        }
        GgufValueType::String => {
            let mut v = Vec::with_capacity(n);
            for i in 0..n {
                v.push(r.string(&format!("string array element {i}"))?);
            }
            GgufArray::String(v)
        }
        GgufValueType::Array => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(read_array(r, depth + 1)?);
            }
            GgufArray::Array(v)
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The file
// ---------------------------------------------------------------------------------------------

/// A memory-mapped, validated GGUF file.
///
/// `Send + Sync`: tensors can be loaded from several threads at once.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    version: u32,
    alignment: usize,
    data_offset: usize,
    /// Metadata in file order.
    metadata: Vec<(String, GgufValue)>,
    meta_index: HashMap<String, usize>,
    /// Tensors in file order.
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens, memory-maps and validates a GGUF file (version 2 or 3, little-endian).
    ///
    /// Checks: magic `GGUF`; version 2 or 3; metadata and tensor counts that fit in the file;
    /// every metadata value well-formed (known type tags, valid UTF-8 strings, bools 0/1, no
    /// duplicate keys, arrays nested at most [`GGUF_MAX_ARRAY_DEPTH`] deep);
    /// `general.alignment`, if present, a u32 power of two ≤ [`GGUF_MAX_ALIGNMENT`]; every
    /// tensor with a unique UTF-8 name, at most [`GGUF_MAX_DIMS`] dims, a known ggml type,
    /// `dims[0]` a multiple of the type's block size, an offset that is a multiple of the
    /// alignment, and data inside the file not overlapping any other tensor's.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref();
        let p = path.display().to_string();
        let ferr = |message: String| GgufError::File { path: p.clone(), message };
        let file = File::open(path).map_err(|e| ferr(format!("cannot open: {e}")))?;
        let len = file.metadata().map_err(|e| ferr(format!("cannot stat: {e}")))?.len();
        if len < HEADER_LEN as u64 {
            // Small enough to read; say what is there (e.g. a wrong magic) if we can.
            let bytes = std::fs::read(path).map_err(|e| ferr(format!("cannot read: {e}")))?;
            if let Some(magic) = bytes.get(..4)
                && magic != GGUF_MAGIC
            {
                return Err(ferr(bad_magic(magic)));
            }
            return Err(ferr(format!(
                "file is {len} bytes, too small for a GGUF header (needs at least {HEADER_LEN}; truncated?)"
            )));
        }
        // SAFETY: the map is read-only and private to this value. As with every mmap-based
        // loader, modifying or truncating the file while it is mapped is undefined behaviour;
        // model files are treated as immutable.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ferr(format!("cannot memory-map: {e}")))?;
        let parsed = parse(&map, &p)?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            version: parsed.version,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
            meta_index: parsed.metadata.iter().enumerate().map(|(i, (k, _))| (k.clone(), i)).collect(),
            metadata: parsed.metadata,
            by_name: parsed.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect(),
            tensors: parsed.tensors,
        })
    }

    /// The file this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Data alignment in bytes (`general.alignment`, default 32).
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Absolute offset of the data section (the aligned end of the tensor table).
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// Size of the file in bytes.
    pub fn file_len(&self) -> usize {
        self.map.len()
    }

    fn path_str(&self) -> String {
        self.path.display().to_string()
    }

    // ----- metadata -----

    /// The value of metadata `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// Metadata keys in file order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.metadata.iter().map(|(k, _)| k.as_str())
    }

    /// Metadata entries in file order.
    pub fn metadata(&self) -> impl Iterator<Item = (&str, &GgufValue)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of metadata entries.
    pub fn metadata_len(&self) -> usize {
        self.metadata.len()
    }

    fn require(&self, key: &str) -> Result<&GgufValue, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey { path: self.path_str(), key: key.to_string() })
    }

    fn key_type(&self, key: &str, expected: &str, found: &GgufValue) -> GgufError {
        GgufError::KeyType {
            path: self.path_str(),
            key: key.to_string(),
            expected: expected.to_string(),
            found: found.type_description(),
        }
    }

    fn meta_err(&self, key: &str, message: String) -> GgufError {
        GgufError::Metadata { path: self.path_str(), key: key.to_string(), message }
    }

    /// An integer of any width/signedness converted losslessly to `T`.
    fn get_int<T: TryFrom<i128>>(&self, key: &str, expected: &str) -> Result<T, GgufError> {
        let v = self.require(key)?;
        let i = v.as_int().ok_or_else(|| self.key_type(key, expected, v))?;
        T::try_from(i).map_err(|_| {
            self.meta_err(key, format!("value {i} (stored as {}) does not fit in {expected}", v.type_description()))
        })
    }

    /// Metadata `key` as u32. Any integer type is accepted if the value fits; other types are a
    /// [`GgufError::KeyType`] error, values out of range a [`GgufError::Metadata`] error.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        self.get_int(key, "u32")
    }

    /// Metadata `key` as u64 (any integer type whose value fits).
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get_int(key, "u64")
    }

    /// Metadata `key` as i32 (any integer type whose value fits).
    pub fn get_i32(&self, key: &str) -> Result<i32, GgufError> {
        self.get_int(key, "i32")
    }

    /// Metadata `key` as i64 (any integer type whose value fits).
    pub fn get_i64(&self, key: &str) -> Result<i64, GgufError> {
        self.get_int(key, "i64")
    }

    /// Metadata `key` as usize (any integer type whose value fits).
    pub fn get_usize(&self, key: &str) -> Result<usize, GgufError> {
        self.get_int(key, "usize")
    }

    /// Metadata `key` as f32: an f32 value, or an f64 value rounded to f32.
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        match self.require(key)? {
            GgufValue::F32(x) => Ok(*x),
            GgufValue::F64(x) => Ok(*x as f32),
            other => Err(self.key_type(key, "f32", other)),
        }
    }

    /// Metadata `key` as f64 (an f32 or f64 value).
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        match self.require(key)? {
            GgufValue::F32(x) => Ok(f64::from(*x)),
            GgufValue::F64(x) => Ok(*x),
            other => Err(self.key_type(key, "f64", other)),
        }
    }

    /// Metadata `key` as bool.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        match self.require(key)? {
            GgufValue::Bool(b) => Ok(*b),
            other => Err(self.key_type(key, "bool", other)),
        }
    }

    /// Metadata `key` as a string.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.require(key)? {
            GgufValue::String(s) => Ok(s),
            other => Err(self.key_type(key, "string", other)),
        }
    }

    /// Metadata `key` as an array of any element type.
    pub fn get_array(&self, key: &str) -> Result<&GgufArray, GgufError> {
        match self.require(key)? {
            GgufValue::Array(a) => Ok(a),
            other => Err(self.key_type(key, "array", other)),
        }
    }

    /// Metadata `key` as an array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        match self.require(key)? {
            GgufValue::Array(GgufArray::String(v)) => Ok(v.iter().map(String::as_str).collect()),
            other => Err(self.key_type(key, "array of string", other)),
        }
    }

    /// Metadata `key` as an array of f32 (an f32 array, or an f64 array rounded to f32).
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>, GgufError> {
        match self.require(key)? {
            GgufValue::Array(GgufArray::F32(v)) => Ok(v.clone()),
            GgufValue::Array(GgufArray::F64(v)) => Ok(v.iter().map(|&x| x as f32).collect()),
            other => Err(self.key_type(key, "array of f32", other)),
        }
    }

    fn get_int_array<T: TryFrom<i128>>(&self, key: &str, expected: &str) -> Result<Vec<T>, GgufError> {
        let v = self.require(key)?;
        let arr = match v {
            GgufValue::Array(a) if a.is_integer() => a,
            other => return Err(self.key_type(key, &format!("array of {expected}"), other)),
        };
        let mut out = Vec::with_capacity(arr.len());
        for i in 0..arr.len() {
            let x = arr.int_at(i).ok_or_else(|| self.meta_err(key, format!("element {i} missing")))?;
            out.push(T::try_from(x).map_err(|_| {
                self.meta_err(
                    key,
                    format!("element {i} = {x} (stored as {}) does not fit in {expected}", arr.elem_type()),
                )
            })?);
        }
        Ok(out)
    }

    /// Metadata `key` as an array of i32 (any integer array whose elements all fit).
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        self.get_int_array(key, "i32")
    }

    /// Metadata `key` as an array of u32 (any integer array whose elements all fit).
    pub fn get_u32_array(&self, key: &str) -> Result<Vec<u32>, GgufError> {
        self.get_int_array(key, "u32")
    }

    // ----- tensors -----

    /// Metadata of tensor `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// All tensors, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// All tensor names, in file order.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.iter().map(|t| t.name.as_str()).collect()
    }

    /// Whether tensor `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the file holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    fn info_or_missing(&self, name: &str) -> Result<&GgufTensorInfo, GgufError> {
        self.tensor_info(name).ok_or_else(|| GgufError::MissingTensor { path: self.path_str(), name: name.to_string() })
    }

    fn tensor_err(&self, name: &str, message: String) -> GgufError {
        GgufError::Tensor { path: self.path_str(), name: name.to_string(), message }
    }

    /// The raw (possibly quantised) bytes of tensor `name`, e.g. for upload elsewhere.
    /// Their layout is given by [`GgufTensorInfo::ggml_type`] and [`GgufTensorInfo::dims`].
    pub fn raw(&self, name: &str) -> Result<(&GgufTensorInfo, &[u8]), GgufError> {
        let info = self.info_or_missing(name)?;
        let bytes = self.map.get(info.data_range()).ok_or_else(|| {
            self.tensor_err(
                name,
                format!("data range [{}, {}) lies outside the file", info.data_start, info.data_start + info.n_bytes),
            )
        })?;
        Ok((info, bytes))
    }

    /// Decodes tensor `name` to `f32` in row-major order of [`GgufTensorInfo::shape`] (the
    /// reverse of the ggml dims).
    ///
    /// Supported types: F32, F16, BF16, F64 (converted) and the block quantisations Q4_0, Q4_1,
    /// Q5_0, Q5_1, Q8_0, Q8_1 (dequantised exactly as ggml's `dequantize_row_*`). Other types
    /// give [`GgufError::UnsupportedType`] naming the tensor and the type id.
    pub fn load_f32(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let (info, bytes) = self.raw(name)?;
        let t = info.ggml_type;
        let block_fn: BlockFn = match t {
            GgmlType::F32 => |b, o| o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            GgmlType::F16 => |b, o| o[0] = f16_at(b, 0),
            GgmlType::BF16 => |b, o| o[0] = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16),
            GgmlType::F64 => |b, o| o[0] = f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32,
            GgmlType::Q4_0 => dequant_q4_0,
            GgmlType::Q4_1 => dequant_q4_1,
            GgmlType::Q5_0 => dequant_q5_0,
            GgmlType::Q5_1 => dequant_q5_1,
            GgmlType::Q8_0 => dequant_q8_0,
            GgmlType::Q8_1 => dequant_q8_1,
            other => {
                return Err(GgufError::UnsupportedType {
                    path: self.path_str(),
                    name: name.to_string(),
                    type_id: other.id(),
                    type_name: other.name().to_string(),
                    message: format!("load_f32 cannot dequantise it (supported: {DEQUANT_TYPES})"),
                });
            }
        };
        let numel = info.numel();
        let (bs, ts) = (t.block_size(), t.type_size());
        // Validated at open; re-checked so a logic error cannot index out of bounds.
        if !numel.is_multiple_of(bs) || bytes.len() != numel / bs * ts {
            return Err(self.tensor_err(
                name,
                format!("{} bytes of {t} cannot hold {numel} elements (dims {:?})", bytes.len(), info.dims),
            ));
        }
        let mut out = vec![0f32; numel];
        // Process many blocks per task so small block types do not drown in scheduling.
        let blocks_per_task = (1 << 14) / bs;
        let run = |(o, b): (&mut [f32], &[u8])| {
            for (ob, bb) in o.chunks_exact_mut(bs).zip(b.chunks_exact(ts)) {
                block_fn(bb, ob);
            }
        };
        if numel >= PAR_THRESHOLD {
            out.par_chunks_mut(blocks_per_task * bs).zip(bytes.par_chunks(blocks_per_task * ts)).for_each(run);
        } else {
            run((&mut out, bytes));
        }
        Ok(out)
    }

    /// [`GgufFile::load_f32`] after checking that the tensor's PyTorch-order shape equals
    /// `expected`.
    pub fn load_f32_checked(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, GgufError> {
        let info = self.info_or_missing(name)?;
        let shape = info.shape();
        if shape != expected {
            return Err(self.tensor_err(
                name,
                format!("expected shape {expected:?}, found {shape:?} (ggml dims {:?})", info.dims),
            ));
        }
        self.load_f32(name)
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

struct Parsed {
    version: u32,
    alignment: usize,
    data_offset: usize,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<GgufTensorInfo>,
}

fn bad_magic(magic: &[u8]) -> String {
    if magic == b"FUGG" {
        return "big-endian GGUF file (magic \"FUGG\"); only little-endian files are supported".to_string();
    }
    format!("not a GGUF file: magic bytes {magic:02x?} ({:?}), expected \"GGUF\"", String::from_utf8_lossy(magic))
}

/// Parses and validates the whole file held in `buf`; `path` is used in errors.
fn parse(buf: &[u8], path: &str) -> Result<Parsed, GgufError> {
    let ferr = |message: String| GgufError::File { path: path.to_string(), message };
    let kerr =
        |key: &str, message: String| GgufError::Metadata { path: path.to_string(), key: key.to_string(), message };
    let terr =
        |name: &str, message: String| GgufError::Tensor { path: path.to_string(), name: name.to_string(), message };
    let mut r = Reader { buf, pos: 0 };

    // Header.
    let magic = r.take(4, "the magic").map_err(ferr)?;
    if magic != GGUF_MAGIC {
        return Err(ferr(bad_magic(magic)));
    }
    let version = r.u32("the version").map_err(ferr)?;
    if version != 2 && version != 3 {
        let hint = if version & 0xFFFF == 0 && version != 0 {
            " (looks byte-swapped: a big-endian file? only little-endian files are supported)"
        } else if version == 1 {
            " (GGUF v1 used 32-bit counts and is obsolete; re-convert the model)"
        } else {
            ""
        };
        return Err(ferr(format!("unsupported GGUF version {version}; this reader supports versions 2 and 3{hint}")));
    }
    let n_tensors_raw = r.u64("the tensor count").map_err(ferr)?;
    let n_kv_raw = r.u64("the metadata count").map_err(ferr)?;
    let n_kv = r.check_count(n_kv_raw, MIN_KV_LEN, "header metadata count").map_err(ferr)?;
    let n_tensors = r.check_count(n_tensors_raw, MIN_TENSOR_INFO_LEN, "header tensor count").map_err(ferr)?;

    // Metadata.
    let mut metadata: Vec<(String, GgufValue)> = Vec::with_capacity(n_kv);
    let mut meta_index: HashMap<String, usize> = HashMap::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = r.string("key").map_err(|e| ferr(format!("metadata entry {i} (of {n_kv}): {e}")))?;
        if meta_index.contains_key(&key) {
            return Err(kerr(&key, format!("duplicate key (metadata entry {i})")));
        }
        let value = read_value_type(&mut r, "value type")
            .and_then(|ty| read_value(&mut r, ty, 0))
            .map_err(|e| kerr(&key, format!("metadata entry {i}: {e}")))?;
        meta_index.insert(key.clone(), metadata.len());
        metadata.push((key, value));
    }

    // Alignment.
    let alignment = match meta_index.get(GGUF_ALIGNMENT_KEY).map(|&i| &metadata[i].1) {
        None => GGUF_DEFAULT_ALIGNMENT,
        Some(GgufValue::U32(a)) => {
            let a = *a as usize;
            if a == 0 || !a.is_power_of_two() || a > GGUF_MAX_ALIGNMENT {
                return Err(kerr(
                    GGUF_ALIGNMENT_KEY,
                    format!("alignment {a} must be a power of two between 1 and {GGUF_MAX_ALIGNMENT}"),
                ));
            }
            a
        }
        Some(other) => {
            return Err(GgufError::KeyType {
                path: path.to_string(),
                key: GGUF_ALIGNMENT_KEY.to_string(),
                expected: "u32".to_string(),
                found: other.type_description(),
            });
        }
    };

    // Tensor table.
    struct RawTensor {
        name: String,
        dims: Vec<usize>,
        ggml_type: GgmlType,
        offset: u64,
        n_bytes: usize,
    }
    let mut raw: Vec<RawTensor> = Vec::with_capacity(n_tensors);
    let mut seen: HashMap<String, usize> = HashMap::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = r.string("name").map_err(|e| ferr(format!("tensor info {i} (of {n_tensors}): {e}")))?;
        if let Some(&prev) = seen.get(&name) {
            return Err(terr(&name, format!("duplicate tensor name (tensor infos {prev} and {i})")));
        }
        let n_dims = r.u32("the dim count").map_err(|e| terr(&name, e))? as usize;
        if n_dims > GGUF_MAX_DIMS {
            return Err(terr(&name, format!("{n_dims} dims; GGUF tensors have at most {GGUF_MAX_DIMS}")));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for d in 0..n_dims {
            let v = r.u64(&format!("dim {d}")).map_err(|e| terr(&name, e))?;
            let v = usize::try_from(v)
                .ok()
                .filter(|&v| v as u64 <= i64::MAX as u64)
                .ok_or_else(|| terr(&name, format!("dim {d} = {v} is out of range")))?;
            dims.push(v);
        }
        let type_id = r.u32("the tensor type").map_err(|e| terr(&name, e))?;
        let Some(ggml_type) = GgmlType::from_id(type_id) else {
            return Err(GgufError::UnsupportedType {
                path: path.to_string(),
                name,
                type_id,
                type_name: "unknown".to_string(),
                message: "not a ggml type this reader knows, so the tensor's size cannot be determined".to_string(),
            });
        };
        let offset = r.u64("the data offset").map_err(|e| terr(&name, e))?;
        let numel = dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| terr(&name, format!("dims {dims:?} overflow the element count")))?;
        let row_len = dims.first().copied().unwrap_or(1);
        let n_bytes = ggml_type
            .nbytes(row_len, numel)
            .map_err(|e| terr(&name, format!("{e} (ggml dims {dims:?}, type {ggml_type})")))?;
        seen.insert(name.clone(), i);
        raw.push(RawTensor { name, dims, ggml_type, offset, n_bytes });
    }

    // Data section: the aligned end of the tensor table.
    let table_end = r.pos;
    let data_offset = table_end.div_ceil(alignment).checked_mul(alignment).ok_or_else(|| {
        ferr(format!("data section offset overflows (tensor table ends at {table_end}, alignment {alignment})"))
    })?;
    let file_len = buf.len();
    let mut tensors = Vec::with_capacity(raw.len());
    for t in raw {
        if !t.offset.is_multiple_of(alignment as u64) {
            return Err(terr(
                &t.name,
                format!("data offset {} is not a multiple of the alignment {alignment}", t.offset),
            ));
        }
        let start = u128::from(t.offset) + data_offset as u128;
        let end = start + t.n_bytes as u128;
        if end > file_len as u128 {
            return Err(terr(
                &t.name,
                format!(
                    "data [{start}, {end}) ({} bytes of {} at offset {} in the data section starting at \
                     {data_offset}) extends past the end of the file ({file_len} bytes; truncated?)",
                    t.n_bytes, t.ggml_type, t.offset
                ),
            ));
        }
        // end <= file_len, so both fit in usize.
        tensors.push(GgufTensorInfo {
            name: t.name,
            dims: t.dims,
            ggml_type: t.ggml_type,
            offset: start as usize - data_offset,
            data_start: start as usize,
            n_bytes: t.n_bytes,
        });
    }

    // No two tensors may share bytes.
    let mut order: Vec<usize> = (0..tensors.len()).filter(|&i| tensors[i].n_bytes > 0).collect();
    order.sort_unstable_by_key(|&i| tensors[i].data_start);
    for w in order.windows(2) {
        let (a, b) = (&tensors[w[0]], &tensors[w[1]]);
        if a.data_range().end > b.data_start {
            return Err(terr(
                &b.name,
                format!(
                    "data [{}, {}) overlaps tensor {:?} at [{}, {})",
                    b.data_start,
                    b.data_range().end,
                    a.name,
                    a.data_start,
                    a.data_range().end
                ),
            ));
        }
    }

    Ok(Parsed { version, alignment, data_offset, metadata, tensors })
}

// ---------------------------------------------------------------------------------------------
// Dequantisation (block layouts as in ggml-common.h, arithmetic as ggml's dequantize_row_*)
// ---------------------------------------------------------------------------------------------

/// Decodes one block (`block.len() == type_size`) into `out` (`out.len() == block_size`).
type BlockFn = fn(&[u8], &mut [f32]);

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Q4_0: `{f16 d; u8 qs[16]}`; low nibbles are elements 0..16, high nibbles 16..32, both
/// offset by 8.
fn dequant_q4_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    let (lo, hi) = out.split_at_mut(16);
    for ((&q, l), h) in qs.iter().zip(lo).zip(hi) {
        *l = ((q & 0x0F) as i32 - 8) as f32 * d;
        *h = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1: `{f16 d; f16 m; u8 qs[16]}`; nibbles as Q4_0 but unbiased, value `q * d + m`.
fn dequant_q4_1(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    let (lo, hi) = out.split_at_mut(16);
    for ((&q, l), h) in qs.iter().zip(lo).zip(hi) {
        *l = (q & 0x0F) as f32 * d + m;
        *h = (q >> 4) as f32 * d + m;
    }
}

/// The 5-bit quants of a Q5 block: element `j` (0..16) is `(qs[j] & 0xF) | bit j of qh << 4`,
/// element `j + 16` is `(qs[j] >> 4) | bit (j + 16) of qh << 4`.
fn q5_quants(qh: u32, qs: &[u8], mut f: impl FnMut(usize, i32)) {
    for (j, &q) in qs.iter().enumerate() {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        f(j, i32::from(q & 0x0F) | h0 as i32);
        f(j + 16, i32::from(q >> 4) | h1 as i32);
    }
}

/// Q5_0: `{f16 d; u8 qh[4]; u8 qs[16]}`, value `(q - 16) * d`.
fn dequant_q5_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    q5_quants(qh, &b[6..22], |i, q| out[i] = (q - 16) as f32 * d);
}

/// Q5_1: `{f16 d; f16 m; u8 qh[4]; u8 qs[16]}`, value `q * d + m`.
fn dequant_q5_1(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    q5_quants(qh, &b[8..24], |i, q| out[i] = q as f32 * d + m);
}

/// Q8_0: `{f16 d; i8 qs[32]}`, value `qs[j] * d`.
fn dequant_q8_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = f32::from(q as i8) * d;
    }
}

/// Q8_1: `{f16 d; f16 s; i8 qs[32]}`, value `qs[j] * d` (`s` is a cached sum).
fn dequant_q8_1(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[4..36]) {
        *o = f32::from(q as i8) * d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<GgufFile>();
    }

    #[test]
    fn type_table_is_consistent() {
        let all = [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::Q8_1,
            GgmlType::Q2_K,
            GgmlType::Q3_K,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
            GgmlType::Q8_K,
            GgmlType::IQ2_XXS,
            GgmlType::IQ2_XS,
            GgmlType::IQ3_XXS,
            GgmlType::IQ1_S,
            GgmlType::IQ4_NL,
            GgmlType::IQ3_S,
            GgmlType::IQ2_S,
            GgmlType::IQ4_XS,
            GgmlType::I8,
            GgmlType::I16,
            GgmlType::I32,
            GgmlType::I64,
            GgmlType::F64,
            GgmlType::IQ1_M,
            GgmlType::BF16,
            GgmlType::TQ1_0,
            GgmlType::TQ2_0,
            GgmlType::MXFP4,
            GgmlType::NVFP4,
            GgmlType::Q1_0,
        ];
        assert_eq!(all.len(), GGML_TYPES.len());
        for t in all {
            assert_eq!(GgmlType::from_id(t.id()), Some(t), "{t}");
            assert_ne!(t.id(), u32::MAX, "{t:?} missing from GGML_TYPES");
        }
        for removed in [4, 5, 31, 32, 33, 36, 37, 38, 42, u32::MAX] {
            assert_eq!(GgmlType::from_id(removed), None);
        }
        // Sizes that ggml-common.h static_asserts.
        assert_eq!((GgmlType::Q4_K.block_size(), GgmlType::Q4_K.type_size()), (256, 144));
        assert_eq!(GgmlType::Q6_K.type_size(), 210);
        assert_eq!(GgmlType::Q2_K.type_size(), 84);
        assert_eq!(GgmlType::Q8_1.type_size(), 36);
    }

    #[test]
    fn value_type_ids_roundtrip() {
        for id in 0..13 {
            let t = GgufValueType::from_id(id).expect("valid id");
            assert_eq!(t.id(), id);
        }
        assert_eq!(GgufValueType::from_id(13), None);
    }

    #[test]
    fn q5_0_high_bits() {
        // d = 1.0; qh has bit 0 (element 0) and bit 16 (element 16) set, all nibbles 0xF.
        let mut b = vec![0x00, 0x3C];
        b.extend_from_slice(&0x0001_0001u32.to_le_bytes());
        b.extend_from_slice(&[0xFF; 16]);
        let mut out = [0f32; 32];
        dequant_q5_0(&b, &mut out);
        assert_eq!(out[0], 15.0); // 31 - 16
        assert_eq!(out[1], -1.0); // 15 - 16
        assert_eq!(out[16], 15.0);
        assert_eq!(out[17], -1.0);
    }
}
