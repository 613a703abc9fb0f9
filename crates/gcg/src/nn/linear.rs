//! Fully connected layer, weights stored as PyTorch does: `weight` [out, in], `bias` [out].

use super::init::Init;
use crate::weights::Loader;
use anyhow::Result;
use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,       // [out, in]
    pub bias: Option<Tensor>, // [out]
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Load `{prefix}.weight` (and `{prefix}.bias` when `bias`); random init follows
    /// `nn.Linear`'s conventions of the reference code (normal(0, 0.02), zero bias) unless a
    /// specific init is asked for with [`Linear::load_with`].
    pub fn load(lb: &Loader, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        Self::load_with(lb, in_dim, out_dim, bias, Init::Normal { std: 0.02 })
    }

    pub fn load_with(lb: &Loader, in_dim: usize, out_dim: usize, bias: bool, init: Init) -> Result<Self> {
        let weight = lb.get((out_dim, in_dim), "weight", init)?;
        let bias = if bias { Some(lb.get(out_dim, "bias", Init::Zeros)?) } else { None };
        Ok(Self { weight, bias })
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dim(1).unwrap_or(0)
    }
    pub fn out_dim(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    /// x: [..., in] → [..., out]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().ok_or_else(|| anyhow::anyhow!("Linear on a scalar"))?;
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        let w = if self.weight.dtype() == x.dtype() {
            self.weight.clone()
        } else {
            self.weight.to_dtype(x.dtype())?
        };
        let mut y = x2.matmul(&w.t()?)?;
        if let Some(b) = &self.bias {
            let b = if b.dtype() == y.dtype() {
                b.clone()
            } else {
                b.to_dtype(y.dtype())?
            };
            y = y.broadcast_add(&b)?;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.out_dim();
        Ok(y.reshape(out_dims)?)
    }
}
