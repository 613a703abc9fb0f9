//! Fully connected layer, weights stored as PyTorch does: `weight` [out, in], `bias` [out], and
//! the linear helpers: the frozen-weight projection ([`Linear::forward_frozen`]), `nn.Linear`'s
//! default initialisation ([`torch_linear`]) and the trainable-tensor listing ([`push_linear`]).
//! A layer may carry a LoRA branch ([`LoraAdapter`]) that every forward adds.

use super::init::Init;
use super::lora::LoraAdapter;
use super::Ctx;
use crate::weights::Loader;
use anyhow::{anyhow, Result};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Shape, Storage, Tensor};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,       // [out, in]
    pub bias: Option<Tensor>, // [out]
    /// A low-rank trainable branch added to the output (the T5's adapted projections).
    pub lora: Option<Box<LoraAdapter>>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias, lora: None }
    }

    /// This layer with a LoRA branch.
    pub fn with_lora(mut self, lora: LoraAdapter) -> Self {
        self.lora = Some(Box::new(lora));
        self
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
        Ok(Self::new(weight, bias))
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dim(1).unwrap_or(0)
    }
    pub fn out_dim(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    /// x: [..., in] → [..., out] (+ the LoRA branch, dropout off).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_base(x)?;
        self.add_lora(x, y, Ctx::eval())
    }

    /// `y` plus the LoRA branch of `x` (in `y`'s dtype), when the layer has one.
    fn add_lora(&self, x: &Tensor, y: Tensor, ctx: Ctx) -> Result<Tensor> {
        match &self.lora {
            None => Ok(y),
            Some(l) => {
                let d = l.forward(x, ctx)?;
                let d = if d.dtype() == y.dtype() { d } else { d.to_dtype(y.dtype())? };
                Ok((y + d)?)
            }
        }
    }

    /// W x (+ b), without the LoRA branch.
    fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
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

    /// `forward` for a bias-free layer whose weight is frozen: when gradients flow through `x`
    /// and the weight is a plain tensor, the product is one autograd node ([`FrozenMatmul`]) whose
    /// only input is `x`, so no weight gradient is computed or stored. Otherwise (no gradient to
    /// carry, a trainable weight, or a bias) it is [`Linear::forward`]. The LoRA branch, when
    /// there is one, is added with dropout off ([`Linear::project`] with a training context).
    pub fn forward_frozen(&self, x: &Tensor) -> Result<Tensor> {
        self.project(x, Ctx::eval())
    }

    /// [`Linear::forward_frozen`] whose LoRA branch (if any) runs in `ctx` (its dropout acts in
    /// training): W x + (alpha / r) · B · A · dropout(x).
    pub fn project(&self, x: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let y = self.frozen_base(x)?;
        self.add_lora(x, y, ctx)
    }

    /// W x through [`FrozenMatmul`] when it applies, else [`Linear::forward_base`].
    fn frozen_base(&self, x: &Tensor) -> Result<Tensor> {
        let w = &self.weight;
        if !x.track_op() || w.track_op() || self.bias.is_some() {
            return self.forward_base(x);
        }
        let dims = x.dims().to_vec();
        let k = *dims.last().ok_or_else(|| anyhow!("projection of a scalar"))?;
        let rows = x.elem_count() / k.max(1);
        let x = if x.dtype() == w.dtype() {
            x.clone()
        } else {
            x.to_dtype(w.dtype())?
        };
        let x2 = x.reshape((rows, k))?.contiguous()?;
        let y = x2.apply_op1_arc(Arc::new(Box::new(FrozenMatmul { w: w.contiguous()? })))?;
        let mut out_dims = dims[..dims.len() - 1].to_vec();
        out_dims.push(w.dim(0)?);
        Ok(y.reshape(out_dims)?)
    }
}

/// `nn.Linear(in, out, bias)` with PyTorch's default initialisation when not loaded
/// (weight and bias uniform in ±1/sqrt(in)).
pub fn torch_linear(lb: &Loader, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
    let bound = 1.0 / (in_dim as f64).sqrt();
    let init = Init::Uniform { lo: -bound, hi: bound };
    let weight = lb.get((out_dim, in_dim), "weight", init)?;
    let bias = if bias { Some(lb.get(out_dim, "bias", init)?) } else { None };
    Ok(Linear::new(weight, bias))
}

/// List a layer's tensors as `{prefix}.weight` (and `{prefix}.bias`) for a trainable-tensor
/// listing.
pub fn push_linear<'a>(v: &mut Vec<(String, &'a mut Tensor)>, prefix: &str, lin: &'a mut Linear) {
    v.push((format!("{prefix}.weight"), &mut lin.weight));
    if let Some(b) = lin.bias.as_mut() {
        v.push((format!("{prefix}.bias"), b));
    }
}

/// `x · wᵀ` for a frozen weight `w` [out, in], as one autograd node whose only input is `x`.
///
/// candle's matmul backward computes the gradient of both operands, also of a plain (frozen)
/// weight, and keeps it in the gradient store: for Flan-T5-XL that is 3 B wasted values and
/// about a third of the backward time. This op's backward computes only `grad · w`.
pub struct FrozenMatmul {
    pub w: Tensor, // [out, in]
}

fn matmul_wt<S: candle_core::backend::BackendStorage>(x: &S, xl: &Layout, w: &S, wl: &Layout) -> candle_core::Result<(S, Shape)> {
    let (rows, k) = xl.shape().dims2()?;
    let (n, kw) = wl.shape().dims2()?;
    if k != kw {
        candle_core::bail!("frozen linear: input width {k}, weight [{n}, {kw}]");
    }
    let out = x.matmul(w, (1, rows, n, k), xl, &wl.transpose(0, 1)?)?;
    Ok((out, Shape::from((rows, n))))
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        match &*ws {
            Storage::Cpu(w) => matmul_wt(x, xl, w, wl),
            _ => candle_core::bail!("frozen linear: input on the CPU, weight on {:?}", self.w.device()),
        }
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        match &*ws {
            Storage::Cuda(w) => matmul_wt(x, xl, w, wl),
            _ => candle_core::bail!("frozen linear: input on CUDA, weight on {:?}", self.w.device()),
        }
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?)) // [rows, out] · [out, in]
    }
}
