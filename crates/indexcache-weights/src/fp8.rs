//! OCP FP8 E4M3FN ("e4m3fn", torch `float8_e4m3fn`) conversions.
//!
//! Layout: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits. There are no infinities;
//! `S.1111.111` (0x7F / 0xFF) is NaN, so the largest finite magnitude is `S.1111.110` = 448.
//! Exponent field 0 encodes subnormals `m * 2^-9`.
//!
//! Also the loader of block-scaled FP8 checkpoint tensors (e4m3 weights with per-block scales).

use crate::{PAR_THRESHOLD, SCALE_SUFFIX, WeightError, decode_plain};
use rayon::prelude::*;

/// Decoding table for all 256 e4m3fn codes, built at compile time.
static F8E4M3_LUT: [f32; 256] = build_lut();

const fn decode_bits(b: u8) -> u32 {
    let sign = ((b as u32) >> 7) << 31;
    let exp = ((b >> 3) & 0x0F) as u32;
    let man = (b & 0x07) as u32;
    if exp == 0x0F && man == 0x07 {
        // Quiet NaN carrying the sign bit.
        return sign | 0x7FC0_0000;
    }
    if exp == 0 {
        if man == 0 {
            return sign;
        }
        // Subnormal: man * 2^-9 with man in 1..=7. Normalise: the leading one of `man`
        // at bit position p (0..=2) gives value 2^(p-9) * (1 + rest / 2^p).
        let p = 31 - man.leading_zeros(); // 0, 1 or 2
        let rest = man & !(1 << p);
        let f32_exp = (p + 127) - 9;
        let f32_man = rest << (23 - p);
        return sign | (f32_exp << 23) | f32_man;
    }
    // Normal: (1 + man/8) * 2^(exp - 7).
    let f32_exp = exp + 127 - 7;
    sign | (f32_exp << 23) | (man << 20)
}

const fn build_lut() -> [f32; 256] {
    let mut lut = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        lut[i] = f32::from_bits(decode_bits(i as u8));
        i += 1;
    }
    lut
}

/// Decodes one OCP FP8 e4m3fn byte to `f32` (table lookup; exact).
///
/// `0x7F` and `0xFF` decode to NaN; `0x7E` is 448, `0x01` is the smallest subnormal 2^-9.
#[inline]
pub fn f8e4m3_to_f32(b: u8) -> f32 {
    F8E4M3_LUT[b as usize]
}

/// The full 256-entry decoding table (index = code).
pub fn f8e4m3_lut() -> &'static [f32; 256] {
    &F8E4M3_LUT
}

/// Encodes an `f32` as OCP FP8 e4m3fn with round-to-nearest-even.
///
/// Magnitudes at or above 448 (including infinities) saturate to ±448 (`0x7E` / `0xFE`);
/// NaN maps to `0x7F` (or `0xFF` when the sign bit is set). Values below the subnormal
/// range round to (signed) zero.
pub fn f32_to_f8e4m3(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    if x.is_nan() {
        return sign | 0x7F;
    }
    let a = x.abs();
    if a >= 448.0 {
        return sign | 0x7E;
    }
    // Smallest normal e4m3 value is 2^-6.
    if a < 1.0 / 64.0 {
        // Subnormal range: code = round(a * 2^9), which is exact scaling by a power of two.
        // A result of 8 is the code of the smallest normal (0x08 = 2^-6), so it needs no
        // special case.
        let q = (a * 512.0).round_ties_even() as u8;
        return sign | q;
    }
    let abits = a.to_bits();
    let exp = (abits >> 23) as i32 - 127; // -6..=8
    let man = abits & 0x007F_FFFF;
    let mut keep = man >> 20;
    let rem = man & 0x000F_FFFF;
    const HALF: u32 = 0x0008_0000;
    if rem > HALF || (rem == HALF && (keep & 1) == 1) {
        keep += 1;
    }
    // A mantissa carry propagates into the exponent field naturally.
    let code = (((exp + 7) as u32) << 3) + keep;
    // a < 448 rounds to at most 448 (0x7E); keep the clamp as a guard.
    sign | code.min(0x7E) as u8
}

// ---- FP8 checkpoints: e4m3 weights with their block scales ---------------------------------------

impl crate::WeightStore {
    /// Dequantises 2-D e4m3 tensor `idx` with its `{name}_scale_inv` block scales (F32, BF16, F16 or
    /// UE8M0, shape `[ceil(rows / br), ceil(cols / bc)]` for the store's FP8 block `[br, bc]`).
    pub(crate) fn load_fp8(&self, idx: usize) -> Result<Vec<f32>, WeightError> {
        let e = &self.entries[idx];
        let name = &e.info.name;
        let &[rows, cols] = e.info.shape.as_slice() else {
            return Err(self.invalid(
                idx,
                format!("fp8 e4m3 tensors must be 2-D for block dequantisation, found shape {:?}", e.info.shape),
            ));
        };
        let Some([br, bc]) = self.fp8_block else {
            return Err(self.invalid(
                idx,
                "fp8 e4m3 tensor but no fp8 block size is set (WeightStore::set_fp8_block, from \
                 config.json quantization_config.weight_block_size)"
                    .to_string(),
            ));
        };
        if br == 0 || bc == 0 {
            return Err(self.invalid(idx, format!("invalid fp8 block size [{br}, {bc}]")));
        }
        let scale_name = format!("{name}{SCALE_SUFFIX}");
        let Some(&sidx) = self.by_name.get(&scale_name) else {
            return Err(
                self.invalid(idx, format!("fp8 e4m3 tensor without its block scales {scale_name:?} in the checkpoint"))
            );
        };
        let s = &self.entries[sidx];
        let want = [rows.div_ceil(br), cols.div_ceil(bc)];
        if s.info.shape != want {
            return Err(self.invalid(
                idx,
                format!(
                    "block scales {scale_name:?} (in {}) have shape {:?}, expected {want:?} for \
                     shape [{rows}, {cols}] with block [{br}, {bc}]",
                    s.info.file.display(),
                    s.info.shape
                ),
            ));
        }
        let scales = match s.dtype_name {
            "F8_E8M0" => self.bytes(sidx)?.iter().map(|&b| e8m0_to_f32(b)).collect(),
            other => decode_plain(other, self.bytes(sidx)?).ok_or_else(|| {
                self.invalid(
                    idx,
                    format!(
                        "block scales {scale_name:?} have unsupported dtype {other} (need F32, \
                         BF16, F16 or F8_E8M0)"
                    ),
                )
            })?,
        };
        let w = self.bytes(idx)?;
        let mut out = vec![0f32; w.len()];
        if out.is_empty() {
            self.mark(sidx);
            return Ok(out);
        }
        let lut = f8e4m3_lut();
        let scale_cols = want[1];
        let row = |(r, (orow, wrow)): (usize, (&mut [f32], &[u8]))| {
            let srow = &scales[(r / br) * scale_cols..(r / br + 1) * scale_cols];
            for ((ob, wb), &sc) in orow.chunks_mut(bc).zip(wrow.chunks(bc)).zip(srow) {
                for (o, &b) in ob.iter_mut().zip(wb) {
                    *o = lut[b as usize] * sc;
                }
            }
        };
        if out.len() >= PAR_THRESHOLD {
            out.par_chunks_mut(cols).zip(w.par_chunks(cols)).enumerate().for_each(row);
        } else {
            out.chunks_mut(cols).zip(w.chunks(cols)).enumerate().for_each(row);
        }
        self.mark(sidx);
        Ok(out)
    }
}

/// Decodes an OCP e8m0 (ue8m0) scale byte: 2^(b - 127), 0xFF is NaN.
pub(crate) fn e8m0_to_f32(b: u8) -> f32 {
    if b == 0xFF {
        f32::NAN
    } else if b == 0 {
        // 2^-127 is an f32 subnormal.
        f32::from_bits(1 << 22)
    } else {
        f32::from_bits((b as u32) << 23)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e8m0_values() {
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(128), 2.0);
        assert_eq!(e8m0_to_f32(120), 2f32.powi(-7));
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
        assert!(e8m0_to_f32(255).is_nan());
    }

    /// Straightforward float-arithmetic reference decoder.
    fn reference(b: u8) -> f32 {
        let s = if b & 0x80 != 0 { -1.0f64 } else { 1.0 };
        let e = ((b >> 3) & 0x0F) as i32;
        let m = (b & 0x07) as f64;
        if e == 15 && m == 7.0 {
            return f32::NAN;
        }
        let v = if e == 0 { m / 8.0 * 2f64.powi(-6) } else { (1.0 + m / 8.0) * 2f64.powi(e - 7) };
        (s * v) as f32
    }

    #[test]
    fn lut_matches_reference_for_all_codes() {
        for b in 0..=255u8 {
            let got = f8e4m3_to_f32(b);
            let want = reference(b);
            if want.is_nan() {
                assert!(got.is_nan(), "code {b:#04x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "code {b:#04x}");
            }
        }
    }

    #[test]
    fn encode_rounds_to_nearest_even() {
        // 1.0 = 0x38, next code 1.125 = 0x39; midpoint 1.0625 ties to even (0x38).
        assert_eq!(f32_to_f8e4m3(1.0625), 0x38);
        // 1.125 .. 1.25 midpoint 1.1875 ties to even (0x3A = 1.25).
        assert_eq!(f32_to_f8e4m3(1.1875), 0x3A);
        assert_eq!(f32_to_f8e4m3(1.07), 0x39);
        // Subnormal ties: 0.5 * 2^-9 -> 0; 1.5 * 2^-9 -> 2 * 2^-9.
        assert_eq!(f32_to_f8e4m3(2f32.powi(-10)), 0x00);
        assert_eq!(f32_to_f8e4m3(1.5 * 2f32.powi(-9)), 0x02);
        // 7.5 * 2^-9 rounds to even 8 * 2^-9 = 2^-6 (code 0x08).
        assert_eq!(f32_to_f8e4m3(7.5 * 2f32.powi(-9)), 0x08);
        // Carry into the exponent: 1.9375 ties between 1.875 (0x3F) and 2.0 (0x40) -> 0x40.
        assert_eq!(f32_to_f8e4m3(1.9375), 0x40);
    }

    #[test]
    fn encode_saturates_and_handles_specials() {
        assert_eq!(f32_to_f8e4m3(448.0), 0x7E);
        assert_eq!(f32_to_f8e4m3(440.0), 0x7E);
        assert_eq!(f32_to_f8e4m3(500.0), 0x7E);
        assert_eq!(f32_to_f8e4m3(1e30), 0x7E);
        assert_eq!(f32_to_f8e4m3(f32::INFINITY), 0x7E);
        assert_eq!(f32_to_f8e4m3(-1e30), 0xFE);
        assert_eq!(f32_to_f8e4m3(f32::NEG_INFINITY), 0xFE);
        assert_eq!(f32_to_f8e4m3(f32::NAN), 0x7F);
        assert_eq!(f32_to_f8e4m3(-0.0), 0x80);
        assert_eq!(f32_to_f8e4m3(0.0), 0x00);
        assert_eq!(f32_to_f8e4m3(1e-30), 0x00);
        assert_eq!(f32_to_f8e4m3(f32::from_bits(1)), 0x00);
        // 416 .. 448: midpoint 432 ties to even -> 448 (0x7E has mantissa 6, even).
        assert_eq!(f32_to_f8e4m3(432.0), 0x7E);
        assert_eq!(f32_to_f8e4m3(420.0), 0x7D);
    }
}
