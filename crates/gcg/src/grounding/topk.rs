//! Top-k frame selection: the differentiable *perturbed* top-k (Berthet et al. 2020, "Learning with
//! differentiable perturbed optimizers") used in training, and the hard top-k used in inference.
//!
//! **Forward.** For scores x ∈ R^{B×T}, n noise samples Z_s ~ N(0, I_T) and σ > 0:
//! `TopK_σ(x)[b, k, t] = (1/n) Σ_s one_hot(sort(topk(x_b + σ Z_{b,s}, K)))[k, t]`, i.e. the k-th
//! smallest (in time) of the K largest perturbed scores of sample s, averaged over the samples.
//! Output [B, K, T]: row k is a distribution over frames (a soft "k-th selected frame").
//!
//! **Backward.** For Gaussian noise ∇_x E_Z[f(x + σZ)] = E_Z[f(x + σZ) Z] / σ, so the Jacobian of
//! the smoothed selection is estimated from the same samples as
//! `J[k, d, e] = ∂TopK[k, d]/∂x[e] ≈ (1/(nσ)) Σ_s one_hot_s[k, d] · Z_s[e]`
//! ([`TopkGradient::Full`], the default). The official GCG code (`PerturbedTopKFunction`) keeps only
//! the diagonal e = d of that Jacobian, `∂L/∂x[d] = Σ_k g[k, d] · (1/(nσ)) Σ_s one_hot_s[k, d] Z_s[d]`;
//! [`TopkGradient::Diagonal`] reproduces that formula (same noise → same gradient, up to float
//! summation order).
//!
//! **How the custom backward is attached.** The forward is computed without autograd (the top-k of
//! each sample on the host). When `x` needs a gradient, the returned tensor is
//! `Y + J·(x − detach(x))` (full) or `Y + E ⊙ (x − detach(x))` (diagonal, E = the official
//! "expected gradient"), with `Y`, `J`, `E` constants. `x − detach(x)` is exactly zero in value, so
//! the output equals `Y` bit for bit, while its only autograd path is the linear map whose Jacobian
//! is the estimator above. This works on every candle device (only matmul/mul/sub are recorded)
//! and needs no device-specific kernels.
//!
//! **Noise.** Either drawn from the run's [`SeededRng`] (order b, s, t — the layout of the official
//! `torch.normal(size=(b, num_samples, d))`) or passed in as a [B, n, T] tensor (parity tests).
//! The perturbed scores are formed as `x + Z·σ` in f32 (f64 when x is f64), as the official code does,
//! so that the same noise selects the same frames.

use crate::nn::top_k_sorted;
use crate::rng::SeededRng;
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;

/// Which estimator the backward pass of the perturbed top-k uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopkGradient {
    /// The full perturbed-optimizer Jacobian estimator (Berthet et al. 2020).
    Full,
    /// Only the Jacobian's diagonal, exactly as the official GCG code.
    Diagonal,
}

/// Settings of the perturbed top-k: samples n [500], noise scale σ [0.05], backward estimator.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PerturbedTopK {
    /// n: noisy samples per estimate.
    pub num_samples: usize,
    /// σ: the noise scale.
    pub sigma: f64,
    /// `full` (default) or `diagonal` (the official code's).
    pub gradient: TopkGradient,
}

impl Default for PerturbedTopK {
    fn default() -> Self {
        Self {
            num_samples: 500,
            sigma: 0.05,
            gradient: TopkGradient::Full,
        }
    }
}

/// Where the perturbation noise comes from.
#[derive(Clone, Copy)]
pub enum Noise<'a> {
    /// Draw n·B·T standard normals from the run's generator (order b, s, t).
    Rng(&'a RefCell<SeededRng>),
    /// Use the given noise [B, n, T] (n is taken from the tensor, overriding `num_samples`).
    Given(&'a Tensor),
}

fn rows_f64(x: &Tensor, what: &str) -> Result<(usize, usize, Vec<f64>)> {
    let (b, t) = x.dims2().with_context(|| format!("{what} must be [B, T], got {:?}", x.dims()))?;
    let v = x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok((b, t, v))
}

/// Hard top-k per row, sorted by time: scores [B, T] → B lists of k frame indices.
pub fn hard_topk(scores: &Tensor, k: usize) -> Result<Vec<Vec<usize>>> {
    let (b, t, v) = rows_f64(scores, "hard_topk scores")?;
    ensure!(k >= 1 && k <= t, "hard_topk: k = {k} must be in 1..={t} (the number of frames)");
    (0..b)
        .map(|i| top_k_sorted(&v[i * t..(i + 1) * t], k).with_context(|| format!("hard_topk: row {i}")))
        .collect()
}

/// One-hot selection [B, K, T] from per-sample frame indices (row k selects frame indices[b][k]).
pub fn one_hot_selection(indices: &[Vec<usize>], frames: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let b = indices.len();
    let k = indices.first().map_or(0, |r| r.len());
    let mut v = vec![0f32; b * k * frames];
    for (i, row) in indices.iter().enumerate() {
        ensure!(
            row.len() == k,
            "one_hot_selection: row {i} has {} indices, row 0 has {k}",
            row.len()
        );
        for (j, &f) in row.iter().enumerate() {
            ensure!(f < frames, "one_hot_selection: index {f} (row {i}) outside {frames} frames");
            v[(i * k + j) * frames + f] = 1.0;
        }
    }
    Ok(Tensor::from_vec(v, (b, k, frames), device)?.to_dtype(dtype)?)
}

/// Hard top-k of scores [B, T] sorted by time: the indices and their one-hot selection [B, K, T]
/// (the inference-time frame choice).
pub fn hard_selection(scores: &Tensor, k: usize) -> Result<(Vec<Vec<usize>>, Tensor)> {
    let idx = hard_topk(scores, k)?;
    let t = scores.dim(1)?;
    let sel = one_hot_selection(&idx, t, scores.dtype(), scores.device())?;
    Ok((idx, sel))
}

/// The noise [B·n·T] as f64 values, plus n. In the f32 path every value is an f32.
fn noise_values(noise: Noise, b: usize, t: usize, num_samples: usize, f32_path: bool) -> Result<(usize, Vec<f64>)> {
    match noise {
        Noise::Given(z) => {
            let (zb, n, zt) = z
                .dims3()
                .with_context(|| format!("perturbed top-k noise must be [B, n, T], got {:?}", z.dims()))?;
            ensure!(
                zb == b && zt == t,
                "perturbed top-k noise has shape {:?}, expected [{b}, n, {t}] for scores [{b}, {t}]",
                z.dims()
            );
            ensure!(n >= 1, "perturbed top-k noise has no samples");
            let dt = if f32_path { DType::F32 } else { DType::F64 };
            Ok((n, z.to_dtype(dt)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?))
        }
        Noise::Rng(rng) => {
            ensure!(num_samples >= 1, "perturbed top-k needs at least one noise sample");
            let mut r = rng.borrow_mut();
            let v = (0..b * num_samples * t)
                .map(|_| {
                    let z = r.normal();
                    if f32_path {
                        z as f32 as f64
                    } else {
                        z
                    }
                })
                .collect();
            Ok((num_samples, v))
        }
    }
}

/// The perturbed top-k TopK_σ(x, k): scores [B, T] → soft selection [B, K, T], with the backward of
/// `cfg.gradient` when `x` carries a gradient (see the module docs).
pub fn perturbed_topk(x: &Tensor, k: usize, cfg: &PerturbedTopK, noise: Noise) -> Result<Tensor> {
    let (b, t, xs) = rows_f64(x, "perturbed top-k scores")?;
    ensure!(
        k >= 1 && k <= t,
        "perturbed top-k: k = {k} must be in 1..={t} (the number of frames)"
    );
    ensure!(
        cfg.sigma >= 0.0 && cfg.sigma.is_finite(),
        "perturbed top-k: sigma {} must be >= 0",
        cfg.sigma
    );
    if let Some(i) = xs.iter().position(|v| !v.is_finite()) {
        bail!("perturbed top-k: score {} of sample {} is {}", i % t, i / t, xs[i]);
    }
    let f32_path = x.dtype() != DType::F64;
    let (n, z) = noise_values(noise, b, t, cfg.num_samples, f32_path)?;

    // Per sample: the sorted top-k indices of x + Z·σ (arithmetic in the official order and precision).
    let mut idx = vec![0usize; b * n * k]; // [B, n, K]
    let mut pert = vec![0f64; t];
    for bi in 0..b {
        let xrow = &xs[bi * t..(bi + 1) * t];
        for s in 0..n {
            let zrow = &z[(bi * n + s) * t..(bi * n + s + 1) * t];
            for j in 0..t {
                pert[j] = if f32_path {
                    (xrow[j] as f32 + zrow[j] as f32 * cfg.sigma as f32) as f64
                } else {
                    xrow[j] + zrow[j] * cfg.sigma
                };
            }
            let top = top_k_sorted(&pert, k)?;
            idx[(bi * n + s) * k..(bi * n + s + 1) * k].copy_from_slice(&top);
        }
    }

    // Forward: the mean of the one-hot selections.
    let mut y = vec![0f64; b * k * t];
    for bi in 0..b {
        for s in 0..n {
            for (kk, &d) in idx[(bi * n + s) * k..(bi * n + s + 1) * k].iter().enumerate() {
                y[(bi * k + kk) * t + d] += 1.0;
            }
        }
    }
    let inv_n = 1.0 / n as f64;
    y.iter_mut().for_each(|v| *v *= inv_n);
    let y = Tensor::from_vec(y, (b, k, t), x.device())?.to_dtype(x.dtype())?;
    if !x.track_op() || cfg.sigma <= 1e-20 {
        // No gradient wanted, or σ = 0 where the official code returns a zero gradient.
        return Ok(y);
    }

    let scale = 1.0 / (n as f64 * cfg.sigma);
    let delta = (x - x.detach())?; // exactly zero, carries the gradient path to x
    let surrogate = match cfg.gradient {
        TopkGradient::Full => {
            // J[b, k·T + d, e] = (1/(nσ)) Σ_s [idx_s[k] = d] Z_s[e]
            let mut j = vec![0f64; b * k * t * t];
            for bi in 0..b {
                for s in 0..n {
                    let zrow = &z[(bi * n + s) * t..(bi * n + s + 1) * t];
                    for (kk, &d) in idx[(bi * n + s) * k..(bi * n + s + 1) * k].iter().enumerate() {
                        let row = &mut j[((bi * k + kk) * t + d) * t..((bi * k + kk) * t + d + 1) * t];
                        row.iter_mut().zip(zrow).for_each(|(a, &zv)| *a += zv);
                    }
                }
            }
            j.iter_mut().for_each(|v| *v *= scale);
            let j = Tensor::from_vec(j, (b, k * t, t), x.device())?.to_dtype(x.dtype())?;
            j.matmul(&delta.unsqueeze(2)?)?.reshape((b, k, t))? // [B, K, T]
        }
        TopkGradient::Diagonal => {
            // E[b, k, d] = (1/(nσ)) Σ_s [idx_s[k] = d] Z_s[d]  (the official "expected_gradient")
            let mut e = vec![0f64; b * k * t];
            for bi in 0..b {
                for s in 0..n {
                    let zrow = &z[(bi * n + s) * t..(bi * n + s + 1) * t];
                    for (kk, &d) in idx[(bi * n + s) * k..(bi * n + s + 1) * k].iter().enumerate() {
                        e[(bi * k + kk) * t + d] += zrow[d];
                    }
                }
            }
            e.iter_mut().for_each(|v| *v *= scale);
            let e = Tensor::from_vec(e, (b, k, t), x.device())?.to_dtype(x.dtype())?;
            e.broadcast_mul(&delta.unsqueeze(1)?)? // [B, K, T]
        }
    };
    Ok((y + surrogate)?)
}

/// Parse a gradient estimator name (`full` | `diagonal`).
impl std::str::FromStr for TopkGradient {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "full" => Ok(Self::Full),
            "diagonal" | "diag" | "official" => Ok(Self::Diagonal),
            other => Err(anyhow!("unknown top-k gradient estimator {other:?} (expected full or diagonal)")),
        }
    }
}
