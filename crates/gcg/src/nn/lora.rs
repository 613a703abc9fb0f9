//! LoRA (low-rank adaptation) of a frozen projection, as PEFT's `lora.Linear` computes it:
//!
//! y = W x + (alpha / r) · B · A · dropout(x)
//!
//! with the frozen W [out, in] untouched and two trainable factors A [r, in] (`lora_A.weight`,
//! initialised as `nn.Linear`: kaiming-uniform with a = √5, i.e. uniform in ±1/√in) and B [out, r]
//! (`lora_B.weight`, zeros, so a new adapter leaves the network as it was). No bias (PEFT's
//! `bias = "none"`). The branch runs in the factors' dtype (f32 variables) and is cast to the
//! base output's dtype, as PEFT casts the input to `lora_A`'s dtype. Dropout acts on the branch's
//! input only, and only with a training [`Ctx`].
//!
//! The factors are named as in a PEFT adapter state dict under the wrapped layer's name
//! (`….SelfAttention.q.lora_A.weight`); see [`is_lora_name`].

use super::init::Init;
use super::{Ctx, Dropout, Linear};
use crate::weights::Loader;
use anyhow::{bail, ensure, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Which projections of an attention get an adapter (PEFT's `target_modules`, matched against
/// the T5 attention's `q`, `k`, `v`, `o`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
}

crate::choice_names!(LoraTarget, "lora target", { Q => "q", K => "k", V => "v", O => "o" });

/// The LoRA settings: the `lora` table of `[model.lmm]`. The defaults are the official GCG
/// `--use_lora` (`LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q", "v"])`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// r: the inner width of the adapter (≥ 1).
    pub rank: usize,
    /// alpha: the branch is scaled by alpha / r (> 0).
    pub alpha: f64,
    /// Dropout on the branch's input during training, in [0, 1).
    pub dropout: f64,
    /// The attention projections adapted, in every attention of the T5 (encoder self-attention,
    /// decoder self- and cross-attention): `q`, `k`, `v`, `o`.
    pub targets: Vec<LoraTarget>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            dropout: 0.05,
            targets: vec![LoraTarget::Q, LoraTarget::V],
        }
    }
}

impl LoraConfig {
    /// alpha / r.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    pub fn targets(&self, t: LoraTarget) -> bool {
        self.targets.contains(&t)
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.rank >= 1, "lora rank = {} must be at least 1", self.rank);
        ensure!(
            self.alpha.is_finite() && self.alpha > 0.0,
            "lora alpha = {} must be finite and > 0",
            self.alpha
        );
        ensure!(
            (0.0..1.0).contains(&self.dropout),
            "lora dropout = {} must be in [0, 1)",
            self.dropout
        );
        ensure!(!self.targets.is_empty(), "lora targets is empty: name at least one of q, k, v, o");
        for (i, t) in self.targets.iter().enumerate() {
            if self.targets[..i].contains(t) {
                bail!("lora targets names {} twice", t.name());
            }
        }
        Ok(())
    }
}

/// Is `name` a LoRA factor (`….lora_A.weight` / `….lora_B.weight`)?
pub fn is_lora_name(name: &str) -> bool {
    name.contains(".lora_A.") || name.contains(".lora_B.") || name.starts_with("lora_A.") || name.starts_with("lora_B.")
}

/// The trainable low-rank branch of one projection.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `lora_A`: [r, in].
    pub a: Linear,
    /// `lora_B`: [out, r].
    pub b: Linear,
    /// alpha / r.
    pub scaling: f64,
    pub dropout: Dropout,
}

impl LoraAdapter {
    /// The adapter of the projection at `lb` (`{lb}.lora_A.weight`, `{lb}.lora_B.weight`): read
    /// when the source holds it (a PEFT adapter, a trained run), else initialised as PEFT does.
    pub fn load(lb: &Loader, in_dim: usize, out_dim: usize, cfg: &LoraConfig) -> Result<Self> {
        cfg.validate()?;
        let bound = 1.0 / (in_dim.max(1) as f64).sqrt();
        let a = lb
            .pp("lora_A")
            .get_or_init((cfg.rank, in_dim), "weight", Init::Uniform { lo: -bound, hi: bound })?;
        let b = lb.pp("lora_B").get_or_init((out_dim, cfg.rank), "weight", Init::Zeros)?;
        Ok(Self::new(a, b, cfg.scaling(), cfg.dropout))
    }

    pub fn new(a: Tensor, b: Tensor, scaling: f64, dropout: f64) -> Self {
        Self {
            a: Linear::new(a, None),
            b: Linear::new(b, None),
            scaling,
            dropout: Dropout::new(dropout),
        }
    }

    /// (alpha / r) · B · A · dropout(x): x [.., in] → [.., out], in the factors' dtype.
    pub fn forward(&self, x: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let dt = self.a.weight.dtype();
        let x = if x.dtype() == dt { x.clone() } else { x.to_dtype(dt)? };
        let h = self.a.forward(&self.dropout.forward(&x, ctx)?)?; // [.., r]
        Ok(self.b.forward(&h)?.affine(self.scaling, 0.0)?) // [.., out]
    }
}
