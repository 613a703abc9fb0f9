//! Dropout with masks drawn from the run's seeded generator (reproducible, resumable).

use super::Ctx;
use anyhow::Result;
use candle_core::Tensor;

#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f64,
}

impl Dropout {
    pub fn new(p: f64) -> Self {
        Self { p }
    }

    pub fn forward(&self, x: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let Some(rng) = ctx.rng() else { return Ok(x.clone()) };
        if self.p <= 0.0 {
            return Ok(x.clone());
        }
        if self.p >= 1.0 {
            return Ok(x.zeros_like()?);
        }
        let n = x.elem_count();
        let scale = 1.0 / (1.0 - self.p);
        let keep: Vec<u8> = {
            let mut r = rng.borrow_mut();
            (0..n).map(|_| u8::from(r.uniform() >= self.p)).collect()
        };
        let keep = Tensor::from_vec(keep, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok(x.mul(&keep)?.affine(scale, 0.0)?)
    }
}
