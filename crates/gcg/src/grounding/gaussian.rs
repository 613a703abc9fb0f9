//! The Gaussian mixture over time that turns the generator's K centres into frame scores p(t).
//!
//! On the grid τ_t = t/(T−1), t = 0..T−1:
//! `g_k(t) = exp(−(τ_t − μ_k)² / (2s²)) / (√(2π)·s)` with `s = max(width, 0.01) / 9`,
//! `p(t) = Σ_k g_k(t)`, then `p ← p / max_t p` so that p ∈ (0, 1] (official
//! `generate_gauss_weight` / `generate_gmm_weight`; the official grid is `torch.linspace(0, 1, T)`,
//! which equals t/(T−1) up to one f32 rounding).

use anyhow::{ensure, Context, Result};
use candle_core::{Tensor, D};

/// The official `self.sigma`: a Gaussian's standard deviation is its width divided by this.
pub const WIDTH_DIVISOR: f64 = 9.0;

/// The standard deviation of each Gaussian for a given width: max(width, 0.01) / 9.
pub fn gaussian_std(width: f64) -> f64 {
    width.max(0.01) / WIDTH_DIVISOR
}

/// τ_t = t/(T−1) for t = 0..T−1 (T ≥ 2).
pub fn time_grid(frames: usize) -> Result<Vec<f64>> {
    ensure!(frames >= 2, "the Gaussian grid needs at least 2 frames, got {frames}");
    Ok((0..frames).map(|t| t as f64 / (frames - 1) as f64).collect())
}

/// The K Gaussians g_k(t) before summing: centres [B, K] (in (0, 1)) → [B, K, T] (differentiable
/// in the centres).
pub fn gaussians(centres: &Tensor, frames: usize, width: f64) -> Result<Tensor> {
    let (b, k) = centres
        .dims2()
        .with_context(|| format!("Gaussian centres must be [B, K], got {:?}", centres.dims()))?;
    let s = gaussian_std(width);
    let grid = Tensor::from_vec(time_grid(frames)?, (1, 1, frames), centres.device())?.to_dtype(centres.dtype())?;
    let diff = grid.broadcast_sub(&centres.reshape((b, k, 1))?)?; // [B, K, T]
    let norm = 1.0 / ((2.0 * std::f64::consts::PI).sqrt() * s);
    Ok((diff.sqr()? * (-1.0 / (2.0 * s * s)))?.exp()?.affine(norm, 0.0)?)
}

/// The normalised mixture p(t): centres [B, K] → [B, T] with max_t p = 1.
///
/// The maximum is taken at one frame, the first argmax, and the gradient flows through that frame
/// only, as with `torch.max(dim)` (a plain max reduction would send it to every tied frame, e.g.
/// to both ends when saturated centres sit at 0 and 1).
pub fn gaussian_mixture(centres: &Tensor, frames: usize, width: f64) -> Result<Tensor> {
    let p = gaussians(centres, frames, width)?.sum(1)?; // [B, T]
    let argmax = p.detach().argmax_keepdim(D::Minus1)?; // [B, 1]
    let max = p.gather(&argmax, D::Minus1)?; // [B, 1]
    Ok(p.broadcast_div(&max)?)
}
