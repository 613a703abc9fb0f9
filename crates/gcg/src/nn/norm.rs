//! LayerNorm and T5's RMS-style LayerNorm, both with a working backward.

use super::init::Init;
use crate::weights::Loader;
use anyhow::Result;
use candle_core::{DType, Tensor, D};

use super::cast::cast;

fn internal_dtype(dt: DType) -> DType {
    match dt {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// `nn.LayerNorm(dim, eps)`: statistics in f32 (f64 for f64 input), affine in the input dtype.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor, // [dim]
    pub bias: Tensor,   // [dim]
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(lb: &Loader, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: lb.get(dim, "weight", Init::Ones)?,
            bias: lb.get(dim, "bias", Init::Zeros)?,
            eps,
        })
    }

    /// Load with alternative tensor names (e.g. `gamma`/`beta` or `weight`/`bias`).
    pub fn load_named(lb: &Loader, dim: usize, eps: f64, weight: &[&str], bias: &[&str]) -> Result<Self> {
        Ok(Self {
            weight: lb.get_any(dim, weight, Init::Ones)?,
            bias: lb.get_any(dim, bias, Init::Zeros)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        if super::cpu_half_no_grad(&[x]) && !super::needs_grad(&[&self.weight, &self.bias]) {
            // In f32, rounded back once (see cpu_half_no_grad).
            return Ok(cast(&self.forward(&cast(x, DType::F32)?)?, dt)?);
        }
        let w = cast(&self.weight, dt)?;
        let b = cast(&self.bias, dt)?;
        if !super::needs_grad(&[x, &w, &b]) && dt != DType::F64 {
            return Ok(candle_nn::ops::layer_norm(&x.contiguous()?, &w, &b, self.eps as f32)?);
        }
        let xi = cast(x, internal_dtype(dt))?;
        let mean = xi.mean_keepdim(D::Minus1)?;
        let xc = xi.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(cast(&xn, dt)?.broadcast_mul(&w)?.broadcast_add(&b)?)
    }
}

/// T5's LayerNorm: no mean subtraction, no bias: w · x / sqrt(mean(x²) + eps), statistics in f32.
/// As in HF T5, a half-precision weight turns the normalised input to that dtype first.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor, // [dim]
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(lb: &Loader, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: lb.get(dim, "weight", Init::Ones)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let w = cast(&self.weight, dt)?;
        if super::cpu_half_no_grad(&[x]) && !super::needs_grad(&[&w]) {
            // Statistics and scaling in f32, rounded to the half-precision weight's dtype once.
            let xn = candle_nn::ops::rms_norm(
                &cast(x, DType::F32)?.contiguous()?,
                &cast(&self.weight, DType::F32)?,
                self.eps as f32,
            )?;
            return Ok(cast(&xn, dt)?);
        }
        if !super::needs_grad(&[x, &w]) && dt != DType::F64 {
            return Ok(candle_nn::ops::rms_norm(&x.contiguous()?, &w, self.eps as f32)?);
        }
        let xi = cast(x, internal_dtype(dt))?;
        let ms = xi.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xi.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
        Ok(cast(&xn, dt)?.broadcast_mul(&w)?)
    }
}
