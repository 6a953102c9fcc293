//! Counter-based random numbers that every backend computes identically, so seeded random
//! weights are the same on the CPU and on a GPU (which generates them in place).

/// SplitMix64 finaliser of `seed`-mixed counter `i`.
#[inline]
pub fn hash(seed: u64, i: u64) -> u64 {
    let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_add(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Element `i` of the stream `seed`: uniform in `[-1, 1)` with 24 random bits (exact in f32).
#[inline]
pub fn uniform(seed: u64, i: u64) -> f32 {
    ((hash(seed, i) >> 40) as f32) * (1.0 / (1u64 << 23) as f32) - 1.0
}

/// A tensor's seed from a model seed and its name (FNV-1a), so each weight gets its own stream.
pub fn seed_for(model_seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ model_seed;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// `n` values of the stream, scaled by `bound`.
pub fn fill(seed: u64, bound: f32, n: usize) -> Vec<f32> {
    (0..n as u64).map(|i| uniform(seed, i) * bound).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_range_and_mean() {
        let v = fill(7, 1.0, 100_000);
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert_ne!(fill(7, 1.0, 8), fill(8, 1.0, 8));
    }
}
