//! A small, seedable, serialisable random number generator.
//!
//! Everything random in gcg (weight initialisation, dropout masks, shuffling, the perturbation
//! noise of the perturbed top-k) draws from a [`SeededRng`], so a run is reproducible from its seed
//! and a checkpoint can store the generator's exact state and resume the same stream.
//! The generator is xoshiro256** seeded through SplitMix64; normals come from Box–Muller.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeededRng {
    s: [u64; 4],
    /// The second normal of the last Box–Muller pair, not yet handed out (stored as its bit
    /// pattern so that a JSON round trip is exact).
    #[serde(with = "f64_bits")]
    spare_normal: Option<f64>,
}

mod f64_bits {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        v.map(f64::to_bits).serialize(s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(f64::from_bits))
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The Box–Muller pair (r·cos θ, r·sin θ) of two uniforms.
fn box_muller(u1: f64, u2: f64) -> (f64, f64) {
    let r = (-2.0 * u1.ln()).sqrt();
    let theta = 2.0 * std::f64::consts::PI * u2;
    (r * theta.cos(), r * theta.sin())
}

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let s = [splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm)];
        Self { s, spare_normal: None }
    }

    /// A generator for a named sub-stream: independent of the parent's future draws.
    pub fn fork(&mut self, salt: u64) -> Self {
        Self::new(self.next_u64() ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "SeededRng::below(0)");
        // Lemire's multiply-shift; the tiny bias for huge n is irrelevant here.
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Standard normal N(0, 1).
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        loop {
            let u1 = self.uniform();
            if u1 <= f64::MIN_POSITIVE {
                continue;
            }
            let (c, s) = box_muller(u1, self.uniform());
            self.spare_normal = Some(s);
            return c;
        }
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.below(i + 1);
            xs.swap(i, j);
        }
    }

    /// `n` draws of N(mean, std²), the same values as `n` calls of [`SeededRng::normal`]
    /// (and the same generator state after). Long vectors (random weights of a large model)
    /// draw their uniforms in order and run the Box–Muller transform, the costly part, on every
    /// core: same functions on the same inputs, so the same bits.
    pub fn normal_vec(&mut self, n: usize, mean: f64, std: f64) -> Vec<f32> {
        const PARALLEL_FROM: usize = 1 << 16;
        if n < PARALLEL_FROM {
            return (0..n).map(|_| (mean + std * self.normal()) as f32).collect();
        }
        let mut out = Vec::with_capacity(n);
        if let Some(z) = self.spare_normal.take() {
            out.push((mean + std * z) as f32);
        }
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
        const BLOCK_PAIRS: usize = 1 << 20;
        let mut uniforms: Vec<(f64, f64)> = Vec::with_capacity(BLOCK_PAIRS.min(n / 2 + 1));
        while out.len() < n {
            let pairs = (n - out.len()).div_ceil(2).min(BLOCK_PAIRS);
            uniforms.clear();
            for _ in 0..pairs {
                // As in `normal`: u1 is redrawn while it is too small for the logarithm.
                let u1 = loop {
                    let u1 = self.uniform();
                    if u1 > f64::MIN_POSITIVE {
                        break u1;
                    }
                };
                uniforms.push((u1, self.uniform()));
            }
            let start = out.len();
            out.resize(start + 2 * pairs, 0.0);
            let chunk = pairs.div_ceil(threads).max(1);
            let dst = &mut out[start..];
            std::thread::scope(|scope| {
                for (us, ys) in uniforms.chunks(chunk).zip(dst.chunks_mut(2 * chunk)) {
                    scope.spawn(move || {
                        for (&(u1, u2), y) in us.iter().zip(ys.chunks_exact_mut(2)) {
                            let (c, s) = box_muller(u1, u2);
                            y[0] = (mean + std * c) as f32;
                            y[1] = (mean + std * s) as f32;
                        }
                    });
                }
            });
        }
        if out.len() > n {
            // An odd count: the last pair's second normal is the spare, as `normal` keeps it.
            let (u1, u2) = *uniforms.last().expect("at least one pair was drawn");
            self.spare_normal = Some(box_muller(u1, u2).1);
            out.truncate(n);
        }
        out
    }

    /// Normal truncated to [mean - 2 std, mean + 2 std] by rejection (as `trunc_normal_`).
    pub fn trunc_normal_vec(&mut self, n: usize, mean: f64, std: f64) -> Vec<f32> {
        (0..n)
            .map(|_| loop {
                let z = self.normal();
                if z.abs() <= 2.0 {
                    break (mean + std * z) as f32;
                }
            })
            .collect()
    }

    pub fn uniform_vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..n).map(|_| (lo + (hi - lo) * self.uniform()) as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_resumable() {
        let mut a = SeededRng::new(7);
        let _ = a.normal();
        let saved = serde_json::to_string(&a).unwrap();
        let xs: Vec<f64> = (0..5).map(|_| a.normal()).collect();
        let mut b: SeededRng = serde_json::from_str(&saved).unwrap();
        let ys: Vec<f64> = (0..5).map(|_| b.normal()).collect();
        assert_eq!(xs, ys);
    }

    /// The parallel `normal_vec` hands out the same values as one `normal` call after another
    /// and leaves the generator where they leave it (odd and even lengths, a spare on entry).
    #[test]
    fn normal_vec_equals_sequential_normals() {
        for (n, pre) in [(200_001usize, 0usize), (150_000, 1), (65_537, 3), (1 << 16, 0)] {
            let mut a = SeededRng::new(11);
            let mut b = SeededRng::new(11);
            for _ in 0..pre {
                a.normal();
                b.normal();
            }
            let fast = a.normal_vec(n, 0.5, 0.02);
            let slow: Vec<f32> = (0..n).map(|_| (0.5 + 0.02 * b.normal()) as f32).collect();
            assert!(
                fast.iter().zip(&slow).all(|(x, y)| x.to_bits() == y.to_bits()),
                "n {n}, {pre} drawn before"
            );
            assert_eq!(a, b, "generator state after n {n}");
        }
    }

    #[test]
    fn normal_moments() {
        let mut r = SeededRng::new(1);
        let n = 200_000;
        let v: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
    }

    #[test]
    fn below_is_in_range_and_covers() {
        let mut r = SeededRng::new(3);
        let mut seen = [false; 5];
        for _ in 0..1000 {
            let k = r.below(5);
            seen[k] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
}
