//! Trainable building blocks whose backward pass is tested against finite differences.
//!
//! candle's fused `softmax_last_dim`, `layer_norm` and `rms_norm` kernels carry no gradient. The
//! blocks here use those fused kernels only when nothing upstream needs a gradient (frozen
//! inference), and otherwise compose differentiable primitives, so gradients reach soft prompts
//! through frozen networks (T5) and reach every trainable parameter.

pub mod attention;
pub mod dropout;
pub mod embedding;
pub mod init;
pub mod linear;
pub mod lora;
pub mod norm;
pub mod ops;

pub use attention::{causal_bias, merge_heads, padding_bias, scaled_dot_product_attention, split_heads};
pub use dropout::Dropout;
pub use embedding::Embedding;
pub use linear::{push_linear, torch_linear, FrozenMatmul, Linear};
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

/// True when gradients must flow through `xs` (it is a variable or was computed from one).
pub fn needs_grad(xs: &[&candle_core::Tensor]) -> bool {
    xs.iter().any(|x| x.track_op())
}
