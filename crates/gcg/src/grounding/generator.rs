//! The Gaussian generator (the official `Grounding` module's `mmt_encode`): CLIP frame and text
//! embeddings → K Gaussian centres μ ∈ (0, 1)^K → frame scores p(t).
//!
//! ```text
//! frames F [B,T,d] ─dropout─Linear(d→h)─+positions─+modality[1]─┐
//! text   Q [B,S,d] ─dropout─Linear(d→h)───────────+modality[0]─┴─cat─▶ 2 pre-LN blocks ─▶ first T
//!   ─+positions─▶ attention pool a = softmax_t(w₂·tanh(W₁x_t + b₁) + b₂), G = Σ a_t x_t
//!   ─dropout─Linear(h→K)─sigmoid─▶ μ ─Gaussian mixture─▶ p [B,T]
//! ```
//! h = d/4. Text tokens are the question followed by the options (S = 1 + O; S = 1 without options).
//!
//! The encoder block is the official `models/Transformer.py` `TransformerBlock` (DistilBERT-style
//! names, pre-LN): `x + attn(sa_layer_norm(x))`, then `+ ffn(output_layer_norm(·))` with
//! `ffn = dropout(lin2(gelu(lin1(·))))`; LayerNorm eps 1e-12, exact GELU, no final LayerNorm. The
//! official code builds it from a RoBERTa config with `attention_probs_dropout_prob = dropout`, which
//! it uses both on the attention weights and after the FFN (there is no dropout on the attention
//! output projection); `hidden_dropout_prob` is never read. The attention mask is all ones.
//!
//! Parameter names are the official module's (under the caller's `grounding.` prefix):
//! `embedding.1.weight`, `modality_embedding.modality_embedding.weight`,
//! `position_v.position_embeddings.weight`, `encoder.layer.{i}.attention.{q,k,v,out}_lin.*`,
//! `encoder.layer.{i}.{sa,output}_layer_norm.*`, `encoder.layer.{i}.ffn.lin{1,2}.*`,
//! `satt_pool_frame.{0,2}.*`, `logit_gauss_c.1.*` (and `proj_head.{1,3}.*`, see `losses.rs`).
//! Without a checkpoint the parameters are initialised as PyTorch does for these layers
//! (Linear: U(±1/√fan_in) for weight and bias; LayerNorm 1/0; modality embedding 0; positions
//! sinusoidal).

use super::gaussian::gaussian_mixture;
use super::GroundingConfig;
use crate::nn::attention::MultiHeadAttention;
use crate::nn::init::Init;
use crate::nn::{push_linear, softmax_last_dim, torch_linear, Activation, Ctx, Dropout, Embedding, LayerNorm, Linear};
use crate::weights::Loader;
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor};

/// One pre-LN encoder block of the official `Transformer.py`.
#[derive(Debug, Clone)]
pub struct EncoderBlock {
    pub attention: MultiHeadAttention,
    pub sa_layer_norm: LayerNorm,
    pub lin1: Linear,
    pub lin2: Linear,
    pub output_layer_norm: LayerNorm,
    pub ffn_dropout: Dropout,
}

impl EncoderBlock {
    pub fn load(lb: &Loader, cfg: &GroundingConfig) -> Result<Self> {
        let h = cfg.inner_dim();
        let alb = lb.pp("attention");
        let lin = |name: &str| torch_linear(&alb.pp(name), h, h, true);
        let attention = MultiHeadAttention {
            q: lin("q_lin")?,
            k: lin("k_lin")?,
            v: lin("v_lin")?,
            o: lin("out_lin")?,
            heads: cfg.heads,
            scale: Some(1.0 / ((h / cfg.heads) as f64).sqrt()),
            dropout: Dropout::new(cfg.dropout),
        };
        Ok(Self {
            attention,
            sa_layer_norm: LayerNorm::load(&lb.pp("sa_layer_norm"), h, cfg.layer_norm_eps)?,
            lin1: torch_linear(&lb.pp("ffn").pp("lin1"), h, cfg.ffn_mult * h, true)?,
            lin2: torch_linear(&lb.pp("ffn").pp("lin2"), cfg.ffn_mult * h, h, true)?,
            output_layer_norm: LayerNorm::load(&lb.pp("output_layer_norm"), h, cfg.layer_norm_eps)?,
            ffn_dropout: Dropout::new(cfg.dropout),
        })
    }

    /// x: [B, L, h] → [B, L, h]
    pub fn forward(&self, x: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let h = self.sa_layer_norm.forward(x)?;
        let x = (x + self.attention.forward(&h, &h, None, ctx)?)?;
        let h = self.output_layer_norm.forward(&x)?;
        let f = self.lin2.forward(&Activation::Gelu.forward(&self.lin1.forward(&h)?)?)?;
        Ok((x + self.ffn_dropout.forward(&f, ctx)?)?)
    }
}

/// What the generator predicts for a batch.
#[derive(Debug, Clone)]
pub struct GeneratorOutput {
    /// μ ∈ (0, 1)^K, the Gaussian centres on the normalised time axis.
    pub gaussian_centres: Tensor, // [B, K]
    /// p(t), the normalised Gaussian mixture (max 1 per sample).
    pub frame_scores: Tensor, // [B, T]
}

/// The Gaussian generator.
#[derive(Debug, Clone)]
pub struct GaussianGenerator {
    pub cfg: GroundingConfig,
    pub embed_dropout: Dropout,
    /// Down-sampling Linear(d → h, no bias) shared by frames and text.
    pub embedding: Linear,
    /// Modality table: row 0 = question/text, row 1 = video.
    pub modality_embedding: Embedding, // [2, h]
    /// Learned frame positions (sinusoidal-initialised).
    pub frame_positions: Tensor, // [T, h]
    pub layers: Vec<EncoderBlock>,
    pub pool_hidden: Linear, // h → h/2
    pub pool_score: Linear,  // h/2 → 1
    pub centre_dropout: Dropout,
    pub centre_head: Linear, // h → K
}

impl GaussianGenerator {
    /// Build from a loader at the grounding module's prefix (`grounding`).
    pub fn load(lb: &Loader, cfg: &GroundingConfig) -> Result<Self> {
        cfg.validate()?;
        let (d, h) = (cfg.dim, cfg.inner_dim());
        let modality = lb.pp("modality_embedding").pp("modality_embedding");
        Ok(Self {
            cfg: cfg.clone(),
            embed_dropout: Dropout::new(cfg.dropout),
            embedding: torch_linear(&lb.pp("embedding.1"), d, h, false)?,
            modality_embedding: Embedding::new(modality.get((2, h), "weight", Init::Zeros)?),
            frame_positions: lb
                .pp("position_v")
                .pp("position_embeddings")
                .get((cfg.frames, h), "weight", Init::Sinusoidal)?,
            layers: (0..cfg.layers)
                .map(|i| EncoderBlock::load(&lb.pp("encoder").pp("layer").pp(i.to_string()), cfg))
                .collect::<Result<_>>()?,
            pool_hidden: torch_linear(&lb.pp("satt_pool_frame.0"), h, h / 2, true)?,
            pool_score: torch_linear(&lb.pp("satt_pool_frame.2"), h / 2, 1, true)?,
            centre_dropout: Dropout::new(cfg.dropout),
            centre_head: torch_linear(&lb.pp("logit_gauss_c.1"), h, cfg.moments, true)?,
        })
    }

    /// The dtype the generator computes in (its parameters').
    pub fn dtype(&self) -> DType {
        self.embedding.weight.dtype()
    }

    /// The encoder's frame outputs with the positions added again: frames [B, T, d], text tokens
    /// [B, S, d] → [B, T, h].
    pub fn encode(&self, frames: &Tensor, text: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let (b, t, d) = frames
            .dims3()
            .with_context(|| format!("grounding frames must be [B, T, d], got {:?}", frames.dims()))?;
        let (bt, s, dt) = text
            .dims3()
            .with_context(|| format!("grounding text tokens must be [B, S, d], got {:?}", text.dims()))?;
        ensure!(
            t == self.cfg.frames,
            "grounding: {t} frames per video, but the generator was built for {} (its position table)",
            self.cfg.frames
        );
        ensure!(
            d == self.cfg.dim && dt == self.cfg.dim,
            "grounding: frame width {d} / text width {dt}, expected the CLIP width {}",
            self.cfg.dim
        );
        ensure!(bt == b, "grounding: {b} videos but {bt} text rows");
        ensure!(s >= 1, "grounding: no text tokens (need at least the question)");
        let dtype = self.dtype();
        let frames = frames.to_dtype(dtype)?;
        let text = text.to_dtype(dtype)?;
        let video_type = self.modality_embedding.weight.narrow(0, 1, 1)?; // [1, h]
        let text_type = self.modality_embedding.weight.narrow(0, 0, 1)?; // [1, h]
        let fr = self.embedding.forward(&self.embed_dropout.forward(&frames, ctx)?)?; // [B, T, h]
        let fr = fr.broadcast_add(&self.frame_positions)?.broadcast_add(&video_type)?;
        let tx = self.embedding.forward(&self.embed_dropout.forward(&text, ctx)?)?; // [B, S, h]
        let tx = tx.broadcast_add(&text_type)?;
        let mut x = Tensor::cat(&[&fr, &tx], 1)?; // [B, T + S, h]
        for layer in &self.layers {
            x = layer.forward(&x, ctx)?;
        }
        Ok(x.narrow(1, 0, t)?.broadcast_add(&self.frame_positions)?) // [B, T, h]
    }

    /// Attention pooling over frames: [B, T, h] → G [B, h].
    pub fn pool(&self, x: &Tensor) -> Result<Tensor> {
        let scores = self.pool_score.forward(&self.pool_hidden.forward(x)?.tanh()?)?.squeeze(2)?; // [B, T]
        let a = softmax_last_dim(&scores)?; // [B, T]
        Ok(x.broadcast_mul(&a.unsqueeze(2)?)?.sum(1)?) // [B, h]
    }

    /// Gaussian centres μ = sigmoid(Linear(dropout(G))): G [B, h] → [B, K].
    pub fn centres(&self, pooled: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let logits = self.centre_head.forward(&self.centre_dropout.forward(pooled, ctx)?)?;
        Ok(candle_nn::ops::sigmoid(&logits)?)
    }

    /// frames F [B, T, d], text tokens [B, S, d] (question ; options) → μ [B, K] and p [B, T].
    pub fn forward(&self, frames: &Tensor, text: &Tensor, ctx: Ctx) -> Result<GeneratorOutput> {
        let x = self.encode(frames, text, ctx)?;
        let mu = self.centres(&self.pool(&x)?, ctx)?;
        let p = gaussian_mixture(&mu, self.cfg.frames, self.cfg.width)?;
        Ok(GeneratorOutput {
            gaussian_centres: mu,
            frame_scores: p,
        })
    }

    /// Every parameter with its name relative to the module prefix (official names), mutable so
    /// tests can swap in variables of another dtype.
    pub fn params_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut v: Vec<(String, &mut Tensor)> = vec![
            ("embedding.1.weight".into(), &mut self.embedding.weight),
            (
                "modality_embedding.modality_embedding.weight".into(),
                &mut self.modality_embedding.weight,
            ),
            ("position_v.position_embeddings.weight".into(), &mut self.frame_positions),
        ];
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("encoder.layer.{i}");
            let a = &mut l.attention;
            for (name, lin) in [("q_lin", &mut a.q), ("k_lin", &mut a.k), ("v_lin", &mut a.v), ("out_lin", &mut a.o)] {
                push_linear(&mut v, &format!("{p}.attention.{name}"), lin);
            }
            v.push((format!("{p}.sa_layer_norm.weight"), &mut l.sa_layer_norm.weight));
            v.push((format!("{p}.sa_layer_norm.bias"), &mut l.sa_layer_norm.bias));
            push_linear(&mut v, &format!("{p}.ffn.lin1"), &mut l.lin1);
            push_linear(&mut v, &format!("{p}.ffn.lin2"), &mut l.lin2);
            v.push((format!("{p}.output_layer_norm.weight"), &mut l.output_layer_norm.weight));
            v.push((format!("{p}.output_layer_norm.bias"), &mut l.output_layer_norm.bias));
        }
        push_linear(&mut v, "satt_pool_frame.0", &mut self.pool_hidden);
        push_linear(&mut v, "satt_pool_frame.2", &mut self.pool_score);
        push_linear(&mut v, "logit_gauss_c.1", &mut self.centre_head);
        v
    }
}
