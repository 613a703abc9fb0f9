//! Fully connected layer, weights stored as PyTorch does: `weight` [out, in], `bias` [out], and
//! the linear helpers: the frozen-weight projection ([`Linear::forward_frozen`]), `nn.Linear`'s
//! default initialisation ([`torch_linear`]) and the trainable-tensor listing ([`push_linear`]).
//! A layer may carry a LoRA branch ([`LoraAdapter`]) that every forward adds.
//!
//! On the CPU, the products of layers with a frozen weight (`x · Wᵀ`, f32 or bf16, both sides at
//! least [`ONEDNN_MIN_DIM`] wide) go to oneDNN when gcg was built with it (build.rs finds
//! Debian's `libdnnl-dev`): about twice candle's f32 speed and four times its bf16 speed on an
//! AVX-512 machine. Smaller products, trainable weights and other devices stay with candle.

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
        let mut y = if ONEDNN && x.device().is_cpu() && !x.track_op() && !w.track_op() {
            // No gradient to carry: the frozen-weight product (oneDNN when it applies).
            let x2 = x2.contiguous()?;
            x2.apply_op1_arc(Arc::new(Box::new(FrozenMatmul { w: w.contiguous()? })))?
        } else {
            x2.matmul(&w.t()?)?
        };
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
            Storage::Cpu(w) => {
                #[cfg(gcg_onednn)]
                if let Some(out) = onednn::try_matmul_wt(x, xl, w, wl)? {
                    return Ok(out);
                }
                matmul_wt(x, xl, w, wl)
            }
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

/// Is gcg built with oneDNN's matrix products (see the module docs)?
pub const ONEDNN: bool = cfg!(gcg_onednn);

/// Products narrower than this (inputs or outputs) stay with candle: the tiny test networks keep
/// their exact results, and oneDNN's set-up would not pay off.
pub const ONEDNN_MIN_DIM: usize = 256;

/// Products computed by oneDNN since the process started (for tests and benchmarks).
pub fn onednn_calls() -> usize {
    ONEDNN_CALLS.load(std::sync::atomic::Ordering::Relaxed)
}

static ONEDNN_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[cfg(gcg_onednn)]
mod onednn {
    use candle_core::{CpuStorage, Layout, Shape};
    use std::os::raw::{c_int, c_long, c_void};

    extern "C" {
        /// csrc/onednn_matmul.c: y [m, n] = x [m, k] · w [n, k]ᵀ, row-major, f32 or bf16.
        fn gcg_onednn_matmul_wt(bf16: c_int, m: c_long, n: c_long, k: c_long, x: *const c_void, w: *const c_void, y: *mut c_void) -> c_int;
    }

    /// `x · wᵀ` by oneDNN, or `None` when it does not apply (sizes, layouts, dtypes).
    pub fn try_matmul_wt(x: &CpuStorage, xl: &Layout, w: &CpuStorage, wl: &Layout) -> candle_core::Result<Option<(CpuStorage, Shape)>> {
        let (Ok((m, k)), Ok((n, kw))) = (xl.shape().dims2(), wl.shape().dims2()) else {
            return Ok(None);
        };
        let min = super::ONEDNN_MIN_DIM;
        if k != kw || k < min || n < min || m == 0 || !xl.is_contiguous() || !wl.is_contiguous() {
            return Ok(None);
        }
        fn run<T: Copy + Default>(bf16: bool, m: usize, n: usize, k: usize, x: &[T], w: &[T]) -> candle_core::Result<Vec<T>> {
            if x.len() < m * k || w.len() < n * k {
                candle_core::bail!(
                    "oneDNN product: buffers of {} and {} values for [{m}, {k}] · [{n}, {k}]ᵀ",
                    x.len(),
                    w.len()
                );
            }
            let mut y = vec![T::default(); m * n];
            // SAFETY: x holds m·k, w n·k and y m·n values of the type the flag names, row-major
            // and contiguous (checked above); the call only reads x and w and writes y.
            let status = unsafe {
                gcg_onednn_matmul_wt(
                    bf16 as c_int,
                    m as c_long,
                    n as c_long,
                    k as c_long,
                    x.as_ptr() as *const c_void,
                    w.as_ptr() as *const c_void,
                    y.as_mut_ptr() as *mut c_void,
                )
            };
            if status != 0 {
                candle_core::bail!("oneDNN matrix product [{m}, {k}] · [{n}, {k}]ᵀ failed (dnnl_status_t {status})");
            }
            super::ONEDNN_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(y)
        }
        let (xo, wo) = (xl.start_offset(), wl.start_offset());
        let y = match (x, w) {
            (CpuStorage::F32(xs), CpuStorage::F32(ws)) => CpuStorage::F32(run(false, m, n, k, &xs[xo..], &ws[wo..])?),
            (CpuStorage::BF16(xs), CpuStorage::BF16(ws)) => CpuStorage::BF16(run(true, m, n, k, &xs[xo..], &ws[wo..])?),
            _ => return Ok(None),
        };
        Ok(Some((y, Shape::from((m, n)))))
    }
}

#[cfg(test)]
mod onednn_tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The oneDNN product against candle's plain matmul it replaces: f32 to float rounding,
    /// bf16 to bf16 rounding; narrow products and gradient-carrying ones stay with candle.
    #[test]
    fn frozen_products_equal_candles_matmul() -> Result<()> {
        if std::env::var("GCG_REQUIRE_ONEDNN").is_ok_and(|v| v == "1") {
            assert!(
                ONEDNN,
                "GCG_REQUIRE_ONEDNN=1 but gcg was built without oneDNN (apt install libdnnl-dev)"
            );
        }
        let dev = Device::Cpu;
        let mut rng = crate::rng::SeededRng::new(7);
        let (m, k, n) = (300, 320, 288);
        let x = Tensor::from_vec(rng.normal_vec(2 * m * k, 0.0, 1.0), (2, m, k), &dev)?;
        let w = Tensor::from_vec(rng.normal_vec(n * k, 0.0, 0.1), (n, k), &dev)?;
        let b = Tensor::from_vec(rng.normal_vec(n, 0.0, 1.0), n, &dev)?;
        let lin = Linear::new(w.clone(), Some(b.clone()));
        for dt in [DType::F32, DType::BF16] {
            let (xd, wd, bd) = (x.to_dtype(dt)?, w.to_dtype(dt)?, b.to_dtype(dt)?);
            let lin = Linear::new(wd.clone(), Some(bd.clone()));
            let before = onednn_calls();
            let y = lin.forward(&xd)?.to_dtype(DType::F32)?;
            assert_eq!(
                onednn_calls() - before,
                usize::from(ONEDNN),
                "{dt:?}: oneDNN used once when built in"
            );
            let want = xd
                .reshape((2 * m, k))?
                .matmul(&wd.t()?)?
                .broadcast_add(&bd)?
                .reshape((2, m, n))?
                .to_dtype(DType::F32)?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            let err = (y - &want)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
            let tol = if dt == DType::F32 { 1e-5 } else { 1e-2 };
            assert!(err <= tol, "{dt:?}: max error {err} of the largest value (tolerance {tol})");
        }
        // Narrow: candle.
        let before = onednn_calls();
        let narrow = Linear::new(w.narrow(0, 0, 64)?, None);
        narrow.forward(&x)?;
        assert_eq!(onednn_calls(), before);
        // A trainable weight: candle's matmul (its gradient is needed).
        let var = candle_core::Var::from_tensor(&w)?;
        let trainable = Linear::new(var.as_tensor().clone(), None);
        let before = onednn_calls();
        let y = trainable.forward(&x)?;
        assert_eq!(onednn_calls(), before);
        let g = y.sum_all()?.backward()?;
        assert!(g.get(var.as_tensor()).is_some());
        // Gradients through a frozen weight (the frozen T5 in training): the oneDNN forward, and
        // the input's gradient equal to candle's.
        let frozen = Linear::new(w.clone(), None);
        let xv = candle_core::Var::from_tensor(&x)?;
        let before = onednn_calls();
        let y = frozen.forward_frozen(xv.as_tensor())?;
        assert_eq!(onednn_calls() - before, usize::from(ONEDNN));
        let want = x.reshape((2 * m, k))?.matmul(&w.t()?)?.reshape((2, m, n))?;
        let err = (&y - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err <= 1e-5 * want.abs()?.max_all()?.to_scalar::<f32>()?, "{err}");
        let g = (y.sqr()?.sum_all()? * 0.5)?.backward()?;
        let gx = g.get(xv.as_tensor()).expect("a gradient for x");
        let want_gx = want.reshape((2 * m, n))?.matmul(&w)?.reshape((2, m, k))?;
        let err = (gx - &want_gx)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err <= 1e-4 * want_gx.abs()?.max_all()?.to_scalar::<f32>()?, "gradient error {err}");
        let _ = lin;
        Ok(())
    }
}
