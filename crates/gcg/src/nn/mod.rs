//! Trainable building blocks whose backward pass is tested against finite differences.
//!
//! candle's fused `softmax_last_dim`, `layer_norm` and `rms_norm` kernels carry no gradient. The
//! blocks here use those fused kernels only when nothing upstream needs a gradient (frozen
//! inference), and otherwise compose differentiable primitives, so gradients reach soft prompts
//! through frozen networks (T5) and reach every trainable parameter.

pub mod attention;
pub mod cast;
pub mod dropout;
pub mod embedding;
pub mod init;
pub mod isa;
pub mod linear;
pub mod lora;
pub mod norm;
pub mod ops;
pub mod peak;

pub use attention::{causal_bias, merge_heads, padding_bias, scaled_dot_product_attention, split_heads};
pub use dropout::Dropout;
pub use embedding::Embedding;
pub use linear::{push_linear, torch_linear, Epilogue, FrozenMatmul, Linear};
pub use lora::{LoraAdapter, LoraConfig, LoraTarget};
pub use norm::{LayerNorm, RmsNorm};
pub use ops::{cross_entropy, gelu, log_softmax_last_dim, softmax_last_dim, top_k_sorted, Activation};

use crate::rng::SeededRng;
use std::cell::RefCell;

/// How a forward pass runs: in evaluation (dropout off, deterministic) or in training, where
/// dropout draws its masks from the run's seeded generator.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    rng: Option<&'a RefCell<SeededRng>>,
}

impl<'a> Ctx<'a> {
    pub fn eval() -> Self {
        Self { rng: None }
    }
    pub fn train(rng: &'a RefCell<SeededRng>) -> Self {
        Self { rng: Some(rng) }
    }
    pub fn is_train(&self) -> bool {
        self.rng.is_some()
    }
    pub fn rng(&self) -> Option<&'a RefCell<SeededRng>> {
        self.rng
    }
}

impl std::fmt::Debug for Ctx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ctx({})", if self.is_train() { "train" } else { "eval" })
    }
}

/// Half-precision work (bf16, f16) on the CPU with no gradient to carry: element-wise steps and
/// attention are then computed in f32 and rounded back once (as PyTorch's CPU kernels compute
/// half-precision element-wise ops in float). candle's CPU half-precision kernels convert element
/// by element and are several times slower than its f32 ones.
pub(crate) fn cpu_half_no_grad(xs: &[&candle_core::Tensor]) -> bool {
    xs.iter()
        .all(|x| x.device().is_cpu() && matches!(x.dtype(), candle_core::DType::BF16 | candle_core::DType::F16) && !x.track_op())
}

thread_local! {
    static NO_GRAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static AUTOCAST: std::cell::Cell<Option<candle_core::DType>> = const { std::cell::Cell::new(None) };
}

/// Inference on this thread until the guard is dropped (as `torch.no_grad()`): the layers
/// ([`Linear`]) then treat their weights as frozen even when they are trainable variables, so
/// products take the fast frozen-weight kernels (oneDNN) and no autograd graph is built.
/// Nested guards restore the state they found.
#[must_use = "inference mode ends when the guard is dropped"]
pub fn no_grad() -> NoGradGuard {
    NoGradGuard {
        no_grad: NO_GRAD.with(|g| g.replace(true)),
        autocast: AUTOCAST.with(|a| a.get()),
    }
}

/// [`no_grad`] for a model whose frozen backbone is in `dtype`: with a half-precision `dtype`
/// on the CPU, the products of f32 layers (the trainable Q-Former's) also run in bf16 with f32
/// accumulation and an f32 result (as `torch.autocast("cpu", torch.bfloat16)` runs them), so
/// the whole model computes at the backbone's precision.
#[must_use = "inference mode ends when the guard is dropped"]
pub fn inference(dtype: candle_core::DType) -> NoGradGuard {
    let guard = no_grad();
    let half = matches!(dtype, candle_core::DType::BF16).then_some(dtype);
    AUTOCAST.with(|a| a.set(half));
    guard
}

/// See [`no_grad`].
pub struct NoGradGuard {
    no_grad: bool,
    autocast: Option<candle_core::DType>,
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        if !self.no_grad {
            cast::clear_weights(); // the outermost scope ends
        }
        NO_GRAD.with(|g| g.set(self.no_grad));
        AUTOCAST.with(|a| a.set(self.autocast));
    }
}

/// Is this thread inside a [`no_grad`] scope?
pub fn grad_disabled() -> bool {
    NO_GRAD.with(|g| g.get())
}

/// The products' dtype of an [`inference`] scope, when it lowers f32 products (read by the
/// oneDNN path; without oneDNN f32 layers stay in f32).
#[cfg_attr(not(gcg_onednn), allow(dead_code))]
pub(crate) fn autocast_dtype() -> Option<candle_core::DType> {
    if grad_disabled() {
        AUTOCAST.with(|a| a.get())
    } else {
        None
    }
}

/// `t` cut from the autograd graph inside a [`no_grad`] scope, else `t` itself.
pub(crate) fn detach_if_no_grad(t: &candle_core::Tensor) -> candle_core::Tensor {
    if grad_disabled() && t.track_op() {
        t.detach()
    } else {
        t.clone()
    }
}

/// True when gradients must flow through `xs` (it is a variable or was computed from one).
pub fn needs_grad(xs: &[&candle_core::Tensor]) -> bool {
    xs.iter().any(|x| x.track_op())
}

#[cfg(test)]
mod half_tests {
    //! The CPU half-precision paths (computed in f32, rounded once) against the plain
    //! half-precision ops they replace: equal to bf16 rounding.
    use super::attention::scaled_dot_product_attention;
    use super::norm::{LayerNorm, RmsNorm};
    use super::ops::Activation;
    use candle_core::{DType, Device, Tensor};

    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b) = (a.to_dtype(DType::F32).unwrap(), b.to_dtype(DType::F32).unwrap());
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() / scale
    }

    #[test]
    fn bf16_cpu_paths_equal_the_plain_bf16_ops_to_rounding() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let mut rng = crate::rng::SeededRng::new(3);
        let mut randn = |shape: &[usize], std: f64| -> Tensor {
            let n = shape.iter().product();
            Tensor::from_vec(rng.normal_vec(n, 0.0, std), shape, &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        // Attention, against candle's bf16 matmuls and fused bf16 softmax.
        let (q, k, v) = (
            randn(&[2, 4, 37, 16], 1.0),
            randn(&[2, 4, 37, 16], 1.0),
            randn(&[2, 4, 37, 16], 1.0),
        );
        let bias = randn(&[1, 1, 37, 37], 1.0);
        let got = scaled_dot_product_attention(&q, &k, &v, Some(0.25), Some(&bias), None)?;
        assert_eq!(got.dtype(), DType::BF16);
        let scores = (&q * 0.25)?.matmul(&k.t()?)?.broadcast_add(&bias)?;
        let plain = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
        assert!(rel_err(&got, &plain) < 2e-2, "attention {}", rel_err(&got, &plain));
        // GELU.
        let x = randn(&[64, 96], 2.0);
        let got = Activation::Gelu.forward(&x)?;
        assert_eq!(got.dtype(), DType::BF16);
        assert!(rel_err(&got, &x.gelu_erf()?) < 1e-2);
        // LayerNorm and T5's RMS norm.
        let w = randn(&[96], 1.0);
        let b = randn(&[96], 1.0);
        let ln = LayerNorm {
            weight: w.clone(),
            bias: b.clone(),
            eps: 1e-6,
        };
        let got = ln.forward(&x)?;
        let plain = candle_nn::ops::layer_norm(&x, &w, &b, 1e-6)?;
        assert!(rel_err(&got, &plain) < 2e-2, "layer norm {}", rel_err(&got, &plain));
        let rms = RmsNorm {
            weight: w.clone(),
            eps: 1e-6,
        };
        let got = rms.forward(&x)?;
        let plain = candle_nn::ops::rms_norm(&x, &w, 1e-6)?;
        assert!(rel_err(&got, &plain) < 2e-2, "rms norm {}", rel_err(&got, &plain));
        // f32 input: untouched by these paths (the same bits as before).
        let x32 = x.to_dtype(DType::F32)?;
        let a = Activation::Gelu.forward(&x32)?;
        assert_eq!(a.to_vec2::<f32>()?, x32.gelu_erf()?.to_vec2::<f32>()?);
        Ok(())
    }
}
