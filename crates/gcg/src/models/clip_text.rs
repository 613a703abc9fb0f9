//! EVA-CLIP's text tower (GCG `models/eva_clip_branch_encoder.py`, `TextTransformer`), frozen.
//!
//! ```text
//! ids [B, 77] ─▶ token embedding + positions ─▶ layers × causal pre-LN block
//!   (x + attn(ln_1(x)); x + c_proj(gelu(c_fc(ln_2(x)))))  ─▶ ln_final at the end-of-text token
//!   (the largest id of each row) ─▶ · text_projection [W, E] ─▶ [B, E]
//! ```
//!
//! Names as in GCG's `eva_clip_text_model.pth`: `token_embedding.weight`, `positional_embedding`,
//! `transformer.resblocks.{i}.{ln_1, attn.{in_proj_weight, in_proj_bias, out_proj}, ln_2,
//! mlp.{c_fc, c_proj}}`, `ln_final`, `text_projection`, `logit_scale`.
//!
//! Only positions up to the last end-of-text token of the batch are computed: with a causal mask
//! the later positions cannot influence the pooled one.

use super::vit::PackedSelfAttention;
use crate::nn::{causal_bias, init::Init, Activation, Embedding, LayerNorm, Linear};
use crate::weights::Loader;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// Sizes of the text tower.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub width: usize,
    pub heads: usize,
    pub layers: usize,
    pub context_length: usize,
    pub embed_dim: usize,
    pub mlp_width: usize,
    pub layer_norm_eps: f64,
}

impl ClipTextConfig {
    /// EVA-CLIP-g's text tower as GCG builds it.
    pub fn eva_clip_g() -> Self {
        Self {
            vocab_size: 49408,
            width: 768,
            heads: 12,
            layers: 12,
            context_length: 77,
            embed_dim: 1024,
            mlp_width: 3072,
            layer_norm_eps: 1e-5,
        }
    }

    /// The test preset (the fixture driver's tiny `clip_config`).
    pub fn tiny() -> Self {
        Self {
            vocab_size: 200,
            width: 32,
            heads: 4,
            layers: 2,
            context_length: 77,
            embed_dim: 24,
            mlp_width: 128,
            layer_norm_eps: 1e-5,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.width.checked_rem(self.heads) != Some(0) {
            bail!("CLIP text config: width {} is not divisible by {} heads", self.width, self.heads);
        }
        Ok(())
    }
}

/// One residual attention block.
#[derive(Debug, Clone)]
pub struct ClipTextBlock {
    pub ln_1: LayerNorm,
    pub attn: PackedSelfAttention,
    pub ln_2: LayerNorm,
    pub c_fc: Linear,
    pub c_proj: Linear,
}

impl ClipTextBlock {
    pub fn load(lb: &Loader, cfg: &ClipTextConfig) -> Result<Self> {
        let (w, eps) = (cfg.width, cfg.layer_norm_eps);
        let a = lb.pp("attn");
        let in_w = a.get(
            (3 * w, w),
            "in_proj_weight",
            Init::Normal {
                std: (w as f64).powf(-0.5),
            },
        )?;
        let in_b = a.get(3 * w, "in_proj_bias", Init::Zeros)?;
        let out = Linear::load(&a.pp("out_proj"), w, w, true)?;
        Ok(Self {
            ln_1: LayerNorm::load(&lb.pp("ln_1"), w, eps)?,
            attn: PackedSelfAttention::new(in_w, Some(in_b), out, cfg.heads)?,
            ln_2: LayerNorm::load(&lb.pp("ln_2"), w, eps)?,
            c_fc: Linear::load(&lb.pp("mlp.c_fc"), w, cfg.mlp_width, true)?,
            c_proj: Linear::load(&lb.pp("mlp.c_proj"), cfg.mlp_width, w, true)?,
        })
    }

    /// x: [B, L, W], `mask` an additive causal bias [1, 1, L, L].
    pub fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln_1.forward(x)?, Some(mask))?)?;
        let h = self
            .c_proj
            .forward(&Activation::Gelu.forward(&self.c_fc.forward(&self.ln_2.forward(&x)?)?)?)?;
        Ok((x + h)?)
    }
}

/// The EVA-CLIP text encoder.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    pub token_embedding: Embedding,
    pub positional_embedding: Tensor, // [context, W]
    pub blocks: Vec<ClipTextBlock>,
    pub ln_final: LayerNorm,
    pub text_projection: Tensor, // [W, E]
    /// CLIP's learned temperature (log scale); not used by GCG, kept because the file holds it.
    pub logit_scale: Option<Tensor>,
    pub config: ClipTextConfig,
}

impl ClipTextModel {
    pub fn load(lb: &Loader, cfg: &ClipTextConfig) -> Result<Self> {
        cfg.validate()?;
        let w = cfg.width;
        let blocks = (0..cfg.layers)
            .map(|i| ClipTextBlock::load(&lb.pp(format!("transformer.resblocks.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let logit_scale = if !lb.has_source() || lb.contains("logit_scale") {
            Some(lb.get((), "logit_scale", Init::Const((1.0f64 / 0.07).ln()))?)
        } else {
            None
        };
        Ok(Self {
            token_embedding: Embedding::load(&lb.pp("token_embedding"), cfg.vocab_size, w)?,
            positional_embedding: lb.get((cfg.context_length, w), "positional_embedding", Init::Normal { std: 0.01 })?,
            blocks,
            ln_final: LayerNorm::load(&lb.pp("ln_final"), w, cfg.layer_norm_eps)?,
            text_projection: lb.get(
                (w, cfg.embed_dim),
                "text_projection",
                Init::Normal {
                    std: (w as f64).powf(-0.5),
                },
            )?,
            logit_scale,
            config: cfg.clone(),
        })
    }

    /// Token ids [B, L] (L ≤ context length; any integer dtype; zero padded after the
    /// end-of-text token as the CLIP tokenizer writes them) → text embeddings [B, E].
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        if l == 0 || l > self.config.context_length {
            bail!("CLIP text: {l} tokens per row, expected 1..={}", self.config.context_length);
        }
        let rows = ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let mut eot = Vec::with_capacity(b);
        for (r, row) in rows.iter().enumerate() {
            if let Some((j, &id)) = row
                .iter()
                .enumerate()
                .find(|(_, &id)| id < 0 || id as usize >= self.config.vocab_size)
            {
                bail!(
                    "CLIP text: token id {id} at row {r}, position {j} is outside the vocabulary of {}",
                    self.config.vocab_size
                );
            }
            // The end-of-text token has the largest id; the first occurrence, as torch.argmax.
            let mut best = 0;
            for (j, &id) in row.iter().enumerate() {
                if id > row[best] {
                    best = j;
                }
            }
            eot.push(best);
        }
        let len = eot.iter().max().map_or(1, |m| m + 1);
        let dev = self.positional_embedding.device();
        let ids = ids.narrow(1, 0, len)?.to_device(dev)?;
        let mut x = self
            .token_embedding
            .forward(&ids)?
            .broadcast_add(&self.positional_embedding.narrow(0, 0, len)?)?; // [B, len, W]
        let mask = causal_bias(len, len, 0, x.dtype(), dev)?;
        for block in &self.blocks {
            x = block.forward(&x, &mask)?;
        }
        let w = self.config.width;
        let pick: Vec<u32> = eot.iter().enumerate().map(|(r, &j)| (r * len + j) as u32).collect();
        let pooled = x.reshape((b * len, w))?.index_select(&Tensor::new(pick.as_slice(), dev)?, 0)?; // [B, W]
        Ok(self
            .ln_final
            .forward(&pooled)?
            .matmul(&self.text_projection.to_dtype(pooled.dtype())?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn tiny() -> Result<ClipTextModel> {
        ClipTextModel::load(&Loader::random(&Device::Cpu, DType::F32, 7), &ClipTextConfig::tiny())
    }

    #[test]
    fn ids_outside_the_vocabulary_are_errors() -> Result<()> {
        let m = tiny()?;
        let ids = Tensor::new(&[[198i64, 5, 200, 0]], &Device::Cpu)?;
        let err = format!("{:#}", m.forward(&ids).unwrap_err());
        assert!(err.contains("200") && err.contains("row 0") && err.contains("position 2"), "{err}");
        let ids = Tensor::new(&[[198i64, -1, 199, 0]], &Device::Cpu)?;
        assert!(m.forward(&ids).is_err());
        let ids = Tensor::zeros((1, 78), DType::I64, &Device::Cpu)?;
        assert!(m.forward(&ids).is_err());
        Ok(())
    }
}
