//! LayerNorm and T5's RMS-style LayerNorm, both with a working backward.

use super::init::Init;
use crate::weights::Loader;
use anyhow::Result;
use candle_core::{DType, Tensor, D};
use rayon::prelude::*;

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
            return self.forward_as(&cast(x, DType::F32)?, dt);
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

    /// The layer norm of `x` in `out`'s dtype: for an f32 `x` on the CPU with nothing needing a
    /// gradient and a bf16 `out`, written as bf16 by one pass over each row ([`Self::fused`]),
    /// so that a bf16 product after it (the ViT's mixed precision) reads bf16 without a cast of
    /// its own; otherwise [`Self::forward`] then a cast. (f32 results keep candle's kernel: the
    /// fused one rounds differently, and the demo's numbers, measured with candle's, moved.)
    pub fn forward_as(&self, x: &Tensor, out: DType) -> Result<Tensor> {
        if out == DType::BF16 {
            if let Some(y) = self.fused(x, out)? {
                return Ok(y);
            }
        }
        Ok(cast(&self.forward(x)?, out)?)
    }

    /// The inference kernel: rows of an f32 CPU tensor on all threads; mean, then the variance
    /// about it (two passes over the row, as PyTorch's CPU kernel), in f32 with 16 partial
    /// sums; the affine in f32, rounded once to bf16 for a bf16 `out` (as the cast rounds).
    /// `None` when it does not apply (another device or dtype, a gradient, a short tensor).
    fn fused(&self, x: &Tensor, out: DType) -> Result<Option<Tensor>> {
        let d = self.weight.elem_count();
        if !x.device().is_cpu()
            || x.dtype() != DType::F32
            || !matches!(out, DType::F32 | DType::BF16)
            || super::needs_grad(&[x, &self.weight, &self.bias])
            || x.dims().last() != Some(&d)
            || x.elem_count() < FUSED_MIN
        {
            return Ok(None);
        }
        let x = x.contiguous()?;
        let w = cast(&self.weight, DType::F32)?.to_vec1::<f32>()?;
        let b = cast(&self.bias, DType::F32)?.to_vec1::<f32>()?;
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Ok(None);
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Ok(None);
        };
        let src = &cpu.as_slice::<f32>()?[start..end];
        let (eps, shape) = (self.eps as f32, x.shape().clone());
        let y = match out {
            DType::BF16 => Tensor::from_vec(norm_rows(src, &w, &b, eps, norm_row_bf16), shape, x.device())?,
            _ => Tensor::from_vec(norm_rows(src, &w, &b, eps, norm_row), shape, x.device())?,
        };
        Ok(Some(y))
    }
}

/// Tensors below this many elements keep candle's kernel (threads would cost more than they save).
const FUSED_MIN: usize = 1 << 15;
/// About this many elements per task of the fused kernel.
const FUSED_CHUNK: usize = 1 << 14;

/// `row` over each row of `src` (rows as wide as `w`), on all threads, into a new vector.
fn norm_rows<O: Copy + Default + Send>(
    src: &[f32],
    w: &[f32],
    b: &[f32],
    eps: f32,
    row: fn(&[f32], &[f32], &[f32], f32, &mut [O]),
) -> Vec<O> {
    let d = w.len();
    let per = (FUSED_CHUNK / d).max(1) * d;
    let mut y = vec![O::default(); src.len()];
    y.par_chunks_mut(per).zip(src.par_chunks(per)).for_each(|(yc, xc)| {
        for (yr, xr) in yc.chunks_exact_mut(d).zip(xc.chunks_exact(d)) {
            row(xr, w, b, eps, yr);
        }
    });
    y
}

/// The sum of `v` in f32 with 16 partial sums (vectorised), then the partial sums in order.
#[inline(always)]
fn sum16(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += f(*x);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn norm_row_plain<O: Copy>(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [O], put: impl Fn(f32) -> O) {
    let n = x.len() as f32;
    let mean = sum16(x, |v| v) / n;
    let var = sum16(x, |v| (v - mean) * (v - mean)) / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((o, &v), (&wi, &bi)) in y.iter_mut().zip(x).zip(w.iter().zip(b)) {
        *o = put((v - mean) * inv * wi + bi);
    }
}

/// One row's layer norm into `y` (f32 or bf16 through `put`), compiled for AVX-512 where the CPU
/// has it (the binary targets plain x86-64).
macro_rules! norm_row_fn {
    ($name:ident, $out:ty, $put:expr) => {
        fn $name(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [$out]) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw")]
                unsafe fn wide(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [$out]) {
                    norm_row_plain(x, w, b, eps, y, $put)
                }
                if super::isa::avx512() {
                    // SAFETY: the CPU has the features `wide` is compiled for.
                    return unsafe { wide(x, w, b, eps, y) };
                }
            }
            norm_row_plain(x, w, b, eps, y, $put)
        }
    };
}
norm_row_fn!(norm_row, f32, |v| v);
norm_row_fn!(norm_row_bf16, half::bf16, super::cast::round_bf16);

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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The layer norm written out in f64 from the same f32 values.
    fn reference(x: &[f32], w: &[f32], b: &[f32], eps: f64) -> Vec<f64> {
        let d = w.len();
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks(d) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            let inv = 1.0 / (var + eps).sqrt();
            out.extend(
                row.iter()
                    .zip(w.iter().zip(b))
                    .map(|(&v, (&wi, &bi))| (v as f64 - mean) * inv * wi as f64 + bi as f64),
            );
        }
        out
    }

    /// The fused inference kernel against the formula in f64 (rows whose mean is far from 0,
    /// widths with and without a tail of fewer than 16), a non-contiguous input, and its bf16
    /// output against the f32 one rounded by the cast: bit for bit.
    #[test]
    fn fused_layer_norm_equals_the_formula() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = crate::rng::SeededRng::new(5);
        for (rows, d) in [(70, 1408), (41, 1003)] {
            let x: Vec<f32> = rng.normal_vec(rows * d, 3.0, 2.0);
            let w: Vec<f32> = rng.normal_vec(d, 1.0, 0.3);
            let b: Vec<f32> = rng.normal_vec(d, 0.0, 0.5);
            let ln = LayerNorm {
                weight: Tensor::from_vec(w.clone(), d, &dev)?,
                bias: Tensor::from_vec(b.clone(), d, &dev)?,
                eps: 1e-6,
            };
            let want = reference(&x, &w, &b, 1e-6);
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            let xt = Tensor::from_vec(x.clone(), (rows, d), &dev)?;
            let got = ln.fused(&xt, DType::F32)?.expect("the fused kernel applies");
            let err = got
                .to_vec2::<f32>()?
                .concat()
                .iter()
                .zip(&want)
                .fold(0f64, |m, (&g, &r)| m.max((g as f64 - r).abs()));
            assert!(err <= 1e-5 * scale, "{rows}x{d}: error {err} against the largest value {scale}");
            // bf16 out is the f32 result rounded.
            let half = ln.forward_as(&xt, DType::BF16)?;
            assert_eq!(half.dtype(), DType::BF16);
            assert_eq!(
                half.to_dtype(DType::F32)?.to_vec2::<f32>()?,
                got.to_dtype(DType::BF16)?.to_dtype(DType::F32)?.to_vec2::<f32>()?
            );
            // A transposed view gives the same rows.
            let tv = Tensor::from_vec(x.clone(), (rows, d), &dev)?.t()?.contiguous()?.t()?;
            assert!(!tv.is_contiguous());
            assert_eq!(
                ln.fused(&tv, DType::F32)?.expect("applies").to_vec2::<f32>()?,
                got.to_vec2::<f32>()?
            );
        }
        Ok(())
    }
}
