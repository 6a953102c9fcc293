//! safetensors header parsing with per-tensor diagnostics.
//!
//! The header is parsed here (rather than only through `safetensors::SafeTensors`) so that
//! errors can name the offending tensor and say *why* it is wrong (truncated file, size not
//! matching shape × dtype, ...). After these checks pass, `safetensors`' own validation runs as
//! a final consistency check (contiguous offsets, full coverage of the data section).

use std::collections::HashMap;

use serde::Deserialize;

use crate::DType;

/// Length of the little-endian u64 header-size prefix.
pub(crate) const PREFIX: usize = 8;

/// One tensor as declared in a safetensors header, validated against the file.
#[derive(Debug, Clone)]
pub(crate) struct HeaderTensor {
    pub name: String,
    pub dtype: DType,
    /// The dtype spelled as in the file (`"BF16"`, `"F8_E4M3"`, ...).
    pub dtype_name: &'static str,
    pub shape: Vec<usize>,
    /// Absolute byte range of the data in the file.
    pub start: usize,
    pub end: usize,
}

#[derive(Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// Known safetensors dtypes: (name, bits per element, our DType).
const DTYPES: &[(&str, usize, DType)] = &[
    ("BOOL", 8, DType::Other),
    ("F4", 4, DType::Other),
    ("F6_E2M3", 6, DType::Other),
    ("F6_E3M2", 6, DType::Other),
    ("U8", 8, DType::Other),
    ("I8", 8, DType::Other),
    ("F8_E5M2", 8, DType::Other),
    ("F8_E4M3", 8, DType::F8E4M3),
    ("F8_E8M0", 8, DType::Other),
    ("F8_E4M3FNUZ", 8, DType::Other),
    ("F8_E5M2FNUZ", 8, DType::Other),
    ("I16", 16, DType::Other),
    ("U16", 16, DType::Other),
    ("F16", 16, DType::F16),
    ("BF16", 16, DType::BF16),
    ("I32", 32, DType::I32),
    ("U32", 32, DType::Other),
    ("F32", 32, DType::F32),
    ("C64", 64, DType::Other),
    ("F64", 64, DType::Other),
    ("I64", 64, DType::I64),
    ("U64", 64, DType::Other),
];

fn lookup_dtype(name: &str) -> Option<(&'static str, usize, DType)> {
    DTYPES.iter().copied().find(|(n, _, _)| *n == name)
}

/// Parses and validates the header of a whole safetensors file held in `buf`.
/// Errors are plain messages; the caller prefixes the file path.
pub(crate) fn parse(buf: &[u8]) -> Result<Vec<HeaderTensor>, String> {
    let file_len = buf.len();
    let Some(prefix) = buf.get(..PREFIX) else {
        return Err(format!("file is {file_len} bytes, too small for a safetensors header (needs at least {PREFIX})"));
    };
    let mut len_bytes = [0u8; PREFIX];
    len_bytes.copy_from_slice(prefix);
    let header_len = u64::from_le_bytes(len_bytes);
    let available = (file_len - PREFIX) as u64;
    if header_len > available {
        return Err(format!(
            "header length {header_len} exceeds the {available} bytes that follow the length prefix \
             (file size {file_len}; truncated or not a safetensors file)"
        ));
    }
    // header_len <= file_len, so it fits in usize.
    let header_end = PREFIX + header_len as usize;
    let header_bytes = &buf[PREFIX..header_end];
    let text = std::str::from_utf8(header_bytes).map_err(|e| format!("header is not valid UTF-8: {e}"))?;
    let raw: HashMap<String, serde_json::Value> =
        serde_json::from_str(text.trim_end()).map_err(|e| format!("header is not valid safetensors JSON: {e}"))?;

    let data_len = file_len - header_end;
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        if name == "__metadata__" {
            continue;
        }
        let info: RawInfo =
            serde_json::from_value(value).map_err(|e| format!("tensor {name:?}: bad header entry: {e}"))?;
        let Some((dtype_name, bits, dtype)) = lookup_dtype(&info.dtype) else {
            return Err(format!("tensor {name:?}: unknown dtype {:?}", info.dtype));
        };
        let (s, e) = info.data_offsets;
        if e < s {
            return Err(format!("tensor {name:?}: data offsets [{s}, {e}] are reversed"));
        }
        if e > data_len {
            return Err(format!(
                "tensor {name:?}: data offsets [{s}, {e}] extend past the end of the data section \
                 ({data_len} bytes; file truncated?)"
            ));
        }
        let nbits = info
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_mul(bits))
            .ok_or_else(|| format!("tensor {name:?}: shape {:?} of {dtype_name} overflows", info.shape))?;
        if nbits % 8 != 0 {
            return Err(format!("tensor {name:?}: shape {:?} of {dtype_name} does not fill whole bytes", info.shape));
        }
        let need = nbits / 8;
        if e - s != need {
            return Err(format!(
                "tensor {name:?}: shape {:?} of {dtype_name} needs {need} bytes but data offsets \
                 [{s}, {e}] hold {}",
                info.shape,
                e - s
            ));
        }
        tensors.push(HeaderTensor {
            name,
            dtype,
            dtype_name,
            shape: info.shape,
            start: header_end + s,
            end: header_end + e,
        });
    }

    // Final structural validation by the safetensors crate itself (contiguous, non-overlapping
    // offsets that cover the whole data section).
    safetensors::SafeTensors::read_metadata(buf).map_err(|e| format!("invalid safetensors file: {e}"))?;

    Ok(tensors)
}
