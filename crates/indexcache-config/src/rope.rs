//! RoPE resolution and frequency tables, following transformers 5.24
//! (`convert_rope_params_to_dict`, `standardize_rope_params`, `_compute_yarn_parameters`,
//! `DeepseekV32RotaryEmbedding.compute_default_rope_parameters`, `yarn_apply_mscale`).
//!
//! The `rope_scaling` / `rope_parameters` dict is read as raw JSON rather than through serde
//! structs because transformers' rules depend on Python truthiness (`beta_fast or 32`,
//! `if mscale and mscale_all_dim`) and on the difference between a missing key and `null`
//! (`attention_factor`, `factor`), which typed fields would blur.

use crate::config::{ConfigError, RopeConfig, RopeScaling};
use serde_json::{Map, Value};

/// transformers' `default_theta`.
const DEFAULT_THETA: f64 = 10_000.0;

/// YaRN's `get_mscale` (`yarn_get_mscale` in the modeling files): `0.1·m·ln(s) + 1`, or 1 when
/// the scale does not extend the context (`s <= 1`).
pub(crate) fn get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 { 1.0 } else { 0.1 * mscale * scale.ln() + 1.0 }
}

impl RopeConfig {
    /// Inverse frequencies, `dim / 2` entries, as transformers builds its `inv_freq` buffer
    /// (its float32 tensor ops reproduced op by op in `f32`; YaRN's correction range in `f64`
    /// like the Python floats it is computed from).
    ///
    /// `theta ** (2i / dim)` is evaluated in `f64` and rounded to `f32`, i.e. correctly rounded.
    /// torch's CPU float32 `pow` is a SIMD routine accurate to 1 ulp, so an entry can differ
    /// from transformers by 1 ulp (seen for theta 5e4); the DeepSeek-V3.2 and GLM-5 tables match
    /// bit for bit. An `f32` `powf` would be off by a few ulps on many entries.
    pub fn inv_freq(&self) -> Vec<f32> {
        let dim = self.dim;
        let pos_freqs: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| {
                // `torch.arange(0, dim, 2, dtype=float) / dim`, a float32 division.
                let exponent = i as f32 / dim as f32;
                self.theta.powf(f64::from(exponent)) as f32
            })
            .collect();
        match &self.scaling {
            RopeScaling::Default => pos_freqs.iter().map(|&p| 1.0 / p).collect(),
            RopeScaling::Yarn { factor, original_max_position_embeddings, beta_fast, beta_slow, truncate, .. } => {
                let (low, high) = yarn_correction_range(
                    *beta_fast,
                    *beta_slow,
                    dim,
                    self.theta,
                    *original_max_position_embeddings as f64,
                    *truncate,
                );
                // `linear_ramp_factor(low, high, dim // 2)`; the +0.001 avoids a 0/0 when the
                // range collapses. `max - min` is a Python float, then cast into the f32 op.
                let high = if low == high { high + 0.001 } else { high };
                let span = (high - low) as f32;
                let low32 = low as f32;
                let factor32 = *factor as f32;
                pos_freqs
                    .iter()
                    .enumerate()
                    .map(|(i, &p)| {
                        let ramp = ((i as f32 - low32) / span).clamp(0.0, 1.0);
                        let extrapolation_factor = 1.0 - ramp;
                        let extrapolation = 1.0 / p;
                        let interpolation = 1.0 / (factor32 * p);
                        interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
                    })
                    .collect()
            }
        }
    }

    /// Multiplier transformers applies to cos/sin (`attention_scaling`): 1 for default RoPE, the
    /// resolved YaRN `attention_factor` otherwise (1 for DeepSeek-V3.2: mscale == mscale_all_dim).
    pub fn attention_factor(&self) -> f32 {
        match &self.scaling {
            RopeScaling::Default => 1.0,
            RopeScaling::Yarn { attention_factor, .. } => *attention_factor as f32,
        }
    }
}

/// `find_correction_range` of `_compute_yarn_parameters`, in Python float (f64) arithmetic.
fn yarn_correction_range(
    beta_fast: f64,
    beta_slow: f64,
    dim: usize,
    base: f64,
    original_max_position_embeddings: f64,
    truncate: bool,
) -> (f64, f64) {
    let correction_dim = |num_rotations: f64| {
        (dim as f64 * (original_max_position_embeddings / (num_rotations * 2.0 * std::f64::consts::PI)).ln())
            / (2.0 * base.ln())
    };
    let mut low = correction_dim(beta_fast);
    let mut high = correction_dim(beta_slow);
    if truncate {
        low = low.floor();
        high = high.ceil();
    }
    (low.max(0.0), high.min(dim as f64 - 1.0))
}

/// The top-level `config.json` values that take part in RoPE resolution.
pub(crate) struct RopeInputs<'a> {
    pub origin: &'a str,
    pub rope_scaling: Option<&'a Value>,
    pub rope_parameters: Option<&'a Value>,
    pub rope_theta: Option<f64>,
    pub partial_rotary_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
    pub max_position_embeddings: usize,
    /// `qk_rope_head_dim`: transformers points `head_dim` at it.
    pub dim: usize,
}

/// The dict transformers ends up with, and the name it came from (for error messages).
struct RopeDict<'a> {
    name: &'static str,
    map: Option<&'a Map<String, Value>>,
}

impl RopeDict<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.and_then(|m| m.get(key))
    }

    fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.name)
    }
}

fn invalid(origin: &str, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { origin: origin.to_string(), key: key.into(), message: message.into() }
}

fn unsupported(origin: &str, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Unsupported { origin: origin.to_string(), key: key.into(), message: message.into() }
}

/// A number as Python sees it: `None` for missing / `null`, bools as 0 / 1.
fn number(v: Option<&Value>, origin: &str, key: &str) -> Result<Option<f64>, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(if *b { 1.0 } else { 0.0 })),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|x| x.is_finite())
            .map(Some)
            .ok_or_else(|| invalid(origin, key, format!("{n} is not a finite number"))),
        Some(other) => Err(invalid(origin, key, format!("expected a number, got {other}"))),
    }
}

/// Python truthiness of a number-or-null value (`x or default`, `if x`).
fn truthy(x: Option<f64>) -> Option<f64> {
    x.filter(|&v| v != 0.0)
}

/// Resolves RoPE exactly as transformers does for these two model types.
pub(crate) fn resolve_rope(inp: &RopeInputs<'_>) -> Result<RopeConfig, ConfigError> {
    let origin = inp.origin;
    // `self.rope_parameters = rope_scaling or self.rope_parameters`: an empty or null legacy
    // dict falls through to `rope_parameters`, and a missing one to {}.
    let is_set = |v: Option<&Value>| match v {
        None | Some(Value::Null) => false,
        Some(Value::Object(m)) => !m.is_empty(),
        Some(_) => true,
    };
    let (name, value) = if is_set(inp.rope_scaling) {
        ("rope_scaling", inp.rope_scaling)
    } else {
        ("rope_parameters", inp.rope_parameters)
    };
    let map = match value {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m),
        Some(other) => {
            return Err(invalid(origin, name, format!("expected an object, got {other}")));
        }
    };
    let dict = RopeDict { name, map };

    // `setdefault("rope_type", get("type", "default"))`.
    let (type_key, rope_type) = match (dict.get("rope_type"), dict.get("type")) {
        (Some(v), _) => (dict.key("rope_type"), Some(v)),
        (None, Some(v)) => (dict.key("type"), Some(v)),
        (None, None) => (dict.key("rope_type"), None),
    };
    let rope_type = match rope_type {
        None => "default",
        Some(Value::String(s)) => s.as_str(),
        Some(other) => return Err(invalid(origin, type_key, format!("expected a string, got {other}"))),
    };

    // Theta: the dict's `rope_theta`, else the top-level `rope_theta`, else 10000.
    let theta = match dict.get("rope_theta") {
        Some(v) => number(Some(v), origin, &dict.key("rope_theta"))?
            .ok_or_else(|| invalid(origin, dict.key("rope_theta"), "must be a number, got null"))?,
        None => inp.rope_theta.unwrap_or(DEFAULT_THETA),
    };
    let theta_key = if dict.get("rope_theta").is_some() { dict.key("rope_theta") } else { "rope_theta".into() };
    // theta <= 1 would make every frequency 1 (and YaRN divide by ln(theta) <= 0).
    if !(theta.is_finite() && theta > 1.0) {
        return Err(invalid(origin, theta_key, format!("must be a finite number > 1, got {theta}")));
    }

    // partial_rotary_factor: the dict's, else the top-level key; only full rotation is supported.
    let (prf_key, prf) = match dict.get("partial_rotary_factor") {
        Some(v) => (dict.key("partial_rotary_factor"), number(Some(v), origin, &dict.key("partial_rotary_factor"))?),
        None => ("partial_rotary_factor".to_string(), inp.partial_rotary_factor),
    };
    if let Some(p) = prf
        && p != 1.0
    {
        return Err(unsupported(
            origin,
            prf_key,
            format!("{p} (only 1.0, i.e. all of qk_rope_head_dim, is supported)"),
        ));
    }

    let scaling = match rope_type {
        "default" => RopeScaling::Default,
        "yarn" => resolve_yarn(inp, &dict)?,
        other => {
            return Err(unsupported(
                origin,
                type_key,
                format!("rope type {other:?} (supported: \"default\", \"yarn\")"),
            ));
        }
    };
    Ok(RopeConfig { theta, dim: inp.dim, scaling })
}

fn resolve_yarn(inp: &RopeInputs<'_>, dict: &RopeDict<'_>) -> Result<RopeScaling, ConfigError> {
    let origin = inp.origin;

    // `original_max_position_embeddings`: transformers' `standardize_rope_params` (re-run inside
    // `_compute_yarn_parameters`, after config.json's extra keys became attributes) gives a
    // top-level key priority over the dict ("Phi3 exception"); then the dict; then
    // `max_position_embeddings`.
    let original = match (inp.original_max_position_embeddings, dict.get("original_max_position_embeddings")) {
        (Some(top), _) => top,
        (None, Some(v)) => {
            let key = dict.key("original_max_position_embeddings");
            let x = number(Some(v), origin, &key)?
                .ok_or_else(|| invalid(origin, &key, "must be a positive integer, got null"))?;
            if !(x >= 1.0 && x.fract() == 0.0 && x <= u32::MAX as f64) {
                return Err(invalid(origin, key, format!("must be a positive integer, got {x}")));
            }
            x as usize
        }
        (None, None) => inp.max_position_embeddings,
    };
    if original == 0 {
        return Err(invalid(origin, "original_max_position_embeddings", "must be > 0"));
    }

    // `factor` is a required key for yarn (transformers raises KeyError); null means
    // `max_position_embeddings / original_max_position_embeddings`.
    let factor_key = dict.key("factor");
    let factor = match dict.get("factor") {
        None => {
            return Err(invalid(origin, factor_key, "missing (required for rope type \"yarn\")"));
        }
        Some(v) => {
            number(Some(v), origin, &factor_key)?.unwrap_or(inp.max_position_embeddings as f64 / original as f64)
        }
    };
    if factor <= 0.0 {
        return Err(invalid(origin, factor_key, format!("must be > 0, got {factor}")));
    }

    let mscale = number(dict.get("mscale"), origin, &dict.key("mscale"))?;
    let mscale_all_dim = number(dict.get("mscale_all_dim"), origin, &dict.key("mscale_all_dim"))?;
    let attention_factor = match number(dict.get("attention_factor"), origin, &dict.key("attention_factor"))? {
        Some(explicit) => explicit,
        None => match (truthy(mscale), truthy(mscale_all_dim)) {
            (Some(m), Some(m_all)) => get_mscale(factor, m) / get_mscale(factor, m_all),
            _ => get_mscale(factor, 1.0),
        },
    };

    let beta_fast = truthy(number(dict.get("beta_fast"), origin, &dict.key("beta_fast"))?).unwrap_or(32.0);
    let beta_slow = truthy(number(dict.get("beta_slow"), origin, &dict.key("beta_slow"))?).unwrap_or(1.0);
    // Both enter `ln(original / (beta·2π))`.
    for (name, beta) in [("beta_fast", beta_fast), ("beta_slow", beta_slow)] {
        if beta <= 0.0 {
            return Err(invalid(origin, dict.key(name), format!("must be > 0, got {beta}")));
        }
    }

    // `rope_parameters.get("truncate", True)`, used as `if truncate:`.
    let truncate = match dict.get("truncate") {
        None => true,
        Some(v) => truthy(number(Some(v), origin, &dict.key("truncate"))?).is_some(),
    };

    Ok(RopeScaling::Yarn {
        factor,
        original_max_position_embeddings: original,
        beta_fast,
        beta_slow,
        truncate,
        attention_factor,
        mscale_all_dim: mscale_all_dim.unwrap_or(0.0),
    })
}

/// MLA softmax scale, `yarn_apply_mscale(rope_parameters, qk_head_dim ** -0.5)`: times
/// `get_mscale(factor, mscale_all_dim)²` for a non-default rope type with a truthy
/// `mscale_all_dim`.
pub(crate) fn softmax_scale(qk_head_dim: usize, rope: &RopeConfig) -> f32 {
    let mut scale = (qk_head_dim as f64).powf(-0.5);
    if let RopeScaling::Yarn { factor, mscale_all_dim, .. } = rope.scaling
        && mscale_all_dim != 0.0
    {
        let mscale = get_mscale(factor, mscale_all_dim);
        scale = scale * mscale * mscale;
    }
    scale as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds_v32_rope() -> RopeConfig {
        RopeConfig {
            theta: 10_000.0,
            dim: 64,
            scaling: RopeScaling::Yarn {
                factor: 40.0,
                original_max_position_embeddings: 4096,
                beta_fast: 32.0,
                beta_slow: 1.0,
                truncate: true,
                attention_factor: 1.0,
                mscale_all_dim: 1.0,
            },
        }
    }

    /// DeepSeek-V3.2's `inv_freq` as transformers 5.24 / torch 2.15 (CPU) computes it
    /// (`DeepseekV32RotaryEmbedding(config).inv_freq`, printed with `float.hex`).
    const DS_V32_INV_FREQ_BITS: [u32; 32] = [
        0x3f800000, 0x3f3ff911, 0x3f0ff59a, 0x3ed7e89b, 0x3ea1e89b, 0x3e72d423, 0x3e361887, 0x3e088d77, 0x3dcccccd,
        0x3d99940d, 0x3d6655c2, 0x3d1fc5ba, 0x3cdc321b, 0x3c968dc3, 0x3c4bf283, 0x3c088d77, 0x3bb43959, 0x3b697066,
        0x3b136a16, 0x3ab3a2cd, 0x3a4f3e37, 0x39d99312, 0x393a7753, 0x380bd471, 0x37d1b717, 0x379d43a3, 0x376bdcf0,
        0x3730df51, 0x3704a2b3, 0x36c6ecdd, 0x36952c42, 0x365fba4f,
    ];

    #[test]
    fn ds_v32_inv_freq_matches_transformers_bitwise() {
        let got = ds_v32_rope().inv_freq();
        assert_eq!(got.len(), 32);
        for (i, (&g, &want)) in got.iter().zip(DS_V32_INV_FREQ_BITS.iter()).enumerate() {
            assert_eq!(g.to_bits(), want, "inv_freq[{i}] = {g:e}, want {:e}", f32::from_bits(want));
        }
        // Spot values (plain-math readings of the same table): the first entries are pure
        // extrapolation (10000^(-2i/64)), the last are interpolated (divided by 40).
        assert_eq!(got[0], 1.0);
        assert!((got[8] - 0.1).abs() < 1e-8);
        assert!((got[31] - 10_000f64.powf(-62.0 / 64.0) as f32 / 40.0).abs() < 1e-12);
    }

    #[test]
    fn ds_v32_softmax_scale_and_attention_factor() {
        let rope = ds_v32_rope();
        let scale = softmax_scale(192, &rope);
        // 192^-0.5 · (1 + 0.1·ln 40)².
        assert!((scale - 0.135_234).abs() < 1e-6, "{scale}");
        assert_eq!(scale, 0.135_233_778_860_880_1_f64 as f32);
        assert_eq!(rope.attention_factor(), 1.0);
    }

    #[test]
    fn default_inv_freq() {
        let rope = RopeConfig { theta: 1_000_000.0, dim: 64, scaling: RopeScaling::Default };
        let f = rope.inv_freq();
        assert_eq!(f.len(), 32);
        assert_eq!(f[0], 1.0);
        // 1e6^(-16/64) = 10^-1.5.
        assert!((f[8] - 0.031_622_776).abs() < 1e-8, "{}", f[8]);
        assert_eq!(rope.attention_factor(), 1.0);
        assert_eq!(softmax_scale(256, &rope), 0.0625);
    }

    #[test]
    fn mscale() {
        assert_eq!(get_mscale(1.0, 1.0), 1.0);
        assert_eq!(get_mscale(0.5, 3.0), 1.0);
        assert!((get_mscale(40.0, 1.0) - (1.0 + 0.1 * 40f64.ln())).abs() < 1e-15);
    }

    #[test]
    fn correction_range() {
        // DS-V3.2: corr(32) = 64·ln(4096/(64π))/(2 ln 1e4) ≈ 10.47 → 10; corr(1) ≈ 22.51 → 23.
        assert_eq!(yarn_correction_range(32.0, 1.0, 64, 10_000.0, 4096.0, true), (10.0, 23.0));
        let (lo, hi) = yarn_correction_range(32.0, 1.0, 64, 10_000.0, 4096.0, false);
        assert!(
            (lo - 10.472_240_810_318_025).abs() < 1e-12 && (hi - 22.513_440_636_877_274).abs() < 1e-12,
            "{lo} {hi}"
        );
        // Clamped to [0, dim - 1].
        assert_eq!(yarn_correction_range(32.0, 1.0, 64, 10_000.0, 1.0, true).0, 0.0);
        assert_eq!(yarn_correction_range(32.0, 1e-9, 64, 10_000.0, 4096.0, true).1, 63.0);
    }
}
