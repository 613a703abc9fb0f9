//! InstructBLIP's Q-Former: a BERT encoder whose learned query tokens read the image through
//! cross-attention, while the instruction text shares their self-attention.
//!
//! One forward pass, top to bottom (B batch, Q queries, L instruction tokens, N image tokens):
//!
//! ```text
//! query_tokens [B, Q, H] ─┐
//! input_ids [B, L] ─ word + position(0..L) embeddings ─ concat ─ LayerNorm ─ dropout ─▶ x [B, Q+L, H]
//! for each layer i:
//!     x  = PostLN(x + SelfAttention(x, mask = [1]*Q ++ attention_mask))
//!     xq = x[:, :Q]           (the queries)        xt = x[:, Q:]   (the instruction tokens)
//!     if i % cross_attention_frequency == 0:
//!         xq = PostLN(xq + CrossAttention(xq, image_embeds, image_mask))
//!     x  = [FFN_query(xq) ; FFN_text(xt)]      (separate feed-forward weights)
//! query_output = x[:, :Q]                                               [B, Q, H]
//! ```
//!
//! PostLN(x + f) is BERT's residual: `LayerNorm(dropout(dense(f)) + x)`. The text tokens never see
//! the image; they reach the queries only through self-attention. Without instruction text the
//! queries run alone (BLIP-2 style).
//!
//! Weights are named as in the published HF checkpoint (`Salesforce/instructblip-flan-t5-xl`,
//! under the prefix `qformer.`); [`crate::weights::layouts::gcg_qformer_name`] maps the names of GCG's release file
//! `qformer_t5.pth` (LAVIS' `BertLMHeadModel` without its LM head) onto them. The learned query
//! tokens (`query_tokens` [1, Q, H] in both checkpoints) are a parameter of the caller, passed to
//! [`QFormer::forward`].

use crate::nn::attention::{padding_bias, MultiHeadAttention, ProjNames};
use crate::nn::{Activation, Ctx, Dropout, Embedding, LayerNorm, Linear};
use crate::weights::checkpoints::hf_section;
use crate::weights::Loader;
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// The Q-Former's sizes (HF `InstructBlipQFormerConfig` plus the number of query tokens).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QFormerConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: Activation,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    /// Layer i has cross-attention to the image when `i % cross_attention_frequency == 0`.
    pub cross_attention_frequency: usize,
    /// Width of the image tokens (the ViT's width).
    pub encoder_hidden_size: usize,
    /// Number of learned query tokens (the caller's `query_tokens` is [1, Q, hidden_size]).
    pub num_query_tokens: usize,
}

/// HF's `InstructBlipQFormerConfig` as `config.json` writes it (the fields read here), with its
/// defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct HfQFormerConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    pub cross_attention_frequency: usize,
    pub encoder_hidden_size: usize,
    pub position_embedding_type: String,
}

impl Default for HfQFormerConfig {
    /// HF's defaults: InstructBLIP's Q-Former, but BERT's vocabulary (without `[DEC]`).
    fn default() -> Self {
        let c = QFormerConfig::instructblip();
        Self {
            vocab_size: 30522,
            hidden_size: c.hidden_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            intermediate_size: c.intermediate_size,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: c.hidden_dropout_prob,
            attention_probs_dropout_prob: c.attention_probs_dropout_prob,
            max_position_embeddings: c.max_position_embeddings,
            layer_norm_eps: c.layer_norm_eps,
            cross_attention_frequency: c.cross_attention_frequency,
            encoder_hidden_size: c.encoder_hidden_size,
            position_embedding_type: "absolute".into(),
        }
    }
}

impl QFormerConfig {
    /// The tiny Q-Former of the parity fixtures (`make_parity.py --preset tiny`).
    pub fn tiny() -> Self {
        Self {
            vocab_size: 120,
            hidden_size: 32,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            intermediate_size: 64,
            hidden_act: Activation::Gelu,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 64,
            layer_norm_eps: 1e-12,
            cross_attention_frequency: 2,
            encoder_hidden_size: 48,
            num_query_tokens: 8,
        }
    }

    /// InstructBLIP's Q-Former: BERT-base (vocab 30522 + `[DEC]`), cross-attention to the
    /// 1408-wide EVA ViT-g tokens in layers 0, 2, 4, ..., 32 query tokens.
    pub fn instructblip() -> Self {
        Self {
            vocab_size: 30523,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: Activation::Gelu,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            layer_norm_eps: 1e-12,
            cross_attention_frequency: 2,
            encoder_hidden_size: 1408,
            num_query_tokens: 32,
        }
    }

    /// From the `qformer_config` object of an HF InstructBLIP `config.json` and the top-level
    /// `num_query_tokens`. Fields the file leaves out take `InstructBlipQFormerConfig`'s defaults
    /// (transformers writes only non-default values).
    pub fn from_hf_config(v: &serde_json::Value, num_query_tokens: usize) -> Result<Self> {
        let h: HfQFormerConfig = hf_section(v, "qformer_config")?;
        ensure!(
            h.position_embedding_type == "absolute",
            "qformer_config.position_embedding_type = {:?}: only \"absolute\" is supported",
            h.position_embedding_type
        );
        let cfg = Self {
            vocab_size: h.vocab_size,
            hidden_size: h.hidden_size,
            num_hidden_layers: h.num_hidden_layers,
            num_attention_heads: h.num_attention_heads,
            intermediate_size: h.intermediate_size,
            hidden_act: Activation::from_hf(&h.hidden_act).context("qformer_config.hidden_act")?,
            hidden_dropout_prob: h.hidden_dropout_prob,
            attention_probs_dropout_prob: h.attention_probs_dropout_prob,
            max_position_embeddings: h.max_position_embeddings,
            layer_norm_eps: h.layer_norm_eps,
            cross_attention_frequency: h.cross_attention_frequency,
            encoder_hidden_size: h.encoder_hidden_size,
            num_query_tokens,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.num_attention_heads > 0, "qformer: num_attention_heads must be positive");
        ensure!(
            self.hidden_size % self.num_attention_heads == 0,
            "qformer: hidden_size {} is not divisible by num_attention_heads {}",
            self.hidden_size,
            self.num_attention_heads
        );
        ensure!(
            self.cross_attention_frequency > 0,
            "qformer: cross_attention_frequency must be positive"
        );
        ensure!(self.num_query_tokens > 0, "qformer: num_query_tokens must be positive");
        Ok(())
    }

    pub fn has_cross_attention(&self, layer: usize) -> bool {
        layer % self.cross_attention_frequency == 0
    }
}

/// An attention block with BERT's post-LN residual: `LayerNorm(dropout(dense(attn(x, kv))) + x)`.
/// Checkpoint names: `attention.{query,key,value}`, `output.dense`, `output.LayerNorm`.
#[derive(Debug, Clone)]
pub struct QFormerAttention {
    pub attention: MultiHeadAttention,
    pub layernorm: LayerNorm,
    pub dropout: Dropout,
}

impl QFormerAttention {
    fn load(lb: &Loader, cfg: &QFormerConfig, kv_dim: usize) -> Result<Self> {
        let h = cfg.hidden_size;
        let names = ProjNames {
            q: "attention.query",
            k: "attention.key",
            v: "attention.value",
            o: "output.dense",
        };
        let attention = MultiHeadAttention::load(
            lb,
            names,
            h,
            kv_dim,
            h,
            cfg.num_attention_heads,
            true,
            true,
            cfg.attention_probs_dropout_prob,
        )?;
        Ok(Self {
            attention,
            layernorm: LayerNorm::load(&lb.pp("output.LayerNorm"), h, cfg.layer_norm_eps)?,
            dropout: Dropout::new(cfg.hidden_dropout_prob),
        })
    }

    /// x: [B, Lq, H]; kv: [B, Lk, kv_dim]; bias broadcastable to [B, heads, Lq, Lk].
    fn forward(&self, x: &Tensor, kv: &Tensor, bias: Option<&Tensor>, ctx: Ctx) -> Result<Tensor> {
        let a = self.attention.forward(x, kv, bias, ctx)?;
        self.residual(x, a, ctx)
    }

    /// The cross-attention's form of [`Self::forward`] ([`MultiHeadAttention::forward_cross`]:
    /// 32 queries over the frames' ViT tokens).
    fn forward_cross(&self, x: &Tensor, kv: &Tensor, bias: Option<&Tensor>, ctx: Ctx) -> Result<Tensor> {
        let a = self.attention.forward_cross(x, kv, bias, ctx)?;
        self.residual(x, a, ctx)
    }

    fn residual(&self, x: &Tensor, a: Tensor, ctx: Ctx) -> Result<Tensor> {
        let a = self.dropout.forward(&a, ctx)?;
        self.layernorm.forward(&(a + x)?)
    }
}

/// BERT's feed-forward block: `LayerNorm(dropout(output(act(intermediate(x)))) + x)`.
/// Checkpoint names: `{intermediate}.dense`, `{output}.dense`, `{output}.LayerNorm`.
#[derive(Debug, Clone)]
pub struct QFormerFeedForward {
    pub intermediate: Linear,
    pub output: Linear,
    pub layernorm: LayerNorm,
    pub act: Activation,
    pub dropout: Dropout,
}

impl QFormerFeedForward {
    fn load(lb: &Loader, cfg: &QFormerConfig, intermediate: &str, output: &str) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            intermediate: Linear::load(&lb.pp(intermediate).pp("dense"), h, i, true)?,
            output: Linear::load(&lb.pp(output).pp("dense"), i, h, true)?,
            layernorm: LayerNorm::load(&lb.pp(output).pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            act: cfg.hidden_act,
            dropout: Dropout::new(cfg.hidden_dropout_prob),
        })
    }

    fn forward(&self, x: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let y = self.act.forward(&self.intermediate.forward(x)?)?;
        let y = self.dropout.forward(&self.output.forward(&y)?, ctx)?;
        self.layernorm.forward(&(y + x)?)
    }
}

/// One Q-Former layer (`encoder.layer.{i}`).
#[derive(Debug, Clone)]
pub struct QFormerLayer {
    /// Self-attention over [queries ; text].
    pub attention: QFormerAttention,
    /// Queries → image tokens (layers with `i % cross_attention_frequency == 0`).
    pub crossattention: Option<QFormerAttention>,
    /// Feed-forward of the text positions (`intermediate`, `output`).
    pub feed_forward: QFormerFeedForward,
    /// Feed-forward of the query positions (`intermediate_query`, `output_query`).
    pub feed_forward_query: QFormerFeedForward,
}

impl QFormerLayer {
    fn load(lb: &Loader, cfg: &QFormerConfig, index: usize) -> Result<Self> {
        let crossattention = if cfg.has_cross_attention(index) {
            Some(QFormerAttention::load(&lb.pp("crossattention"), cfg, cfg.encoder_hidden_size)?)
        } else {
            None
        };
        Ok(Self {
            attention: QFormerAttention::load(&lb.pp("attention"), cfg, cfg.hidden_size)?,
            crossattention,
            feed_forward: QFormerFeedForward::load(lb, cfg, "intermediate", "output")?,
            feed_forward_query: QFormerFeedForward::load(lb, cfg, "intermediate_query", "output_query")?,
        })
    }

    /// x: [B, Q+L, H]; `self_bias`: [B, 1, 1, Q+L] or None; image: [B, N, Dv];
    /// `image_bias`: [B, 1, 1, N] or None.
    fn forward(
        &self,
        x: &Tensor,
        num_queries: usize,
        self_bias: Option<&Tensor>,
        image: &Tensor,
        image_bias: Option<&Tensor>,
        ctx: Ctx,
    ) -> Result<Tensor> {
        let total = x.dim(1)?;
        let x = self.attention.forward(x, x, self_bias, ctx)?; // [B, Q+L, H]
        let mut queries = x.narrow(1, 0, num_queries)?; // [B, Q, H]
        if let Some(cross) = &self.crossattention {
            queries = cross.forward_cross(&queries, image, image_bias, ctx)?;
        }
        let queries = self.feed_forward_query.forward(&queries, ctx)?;
        if total == num_queries {
            return Ok(queries);
        }
        let text = self.feed_forward.forward(&x.narrow(1, num_queries, total - num_queries)?, ctx)?; // [B, L, H]
        Ok(Tensor::cat(&[&queries, &text], 1)?)
    }
}

/// Word and absolute position embeddings of the instruction text, prefixed by the query tokens.
#[derive(Debug, Clone)]
pub struct QFormerEmbeddings {
    pub word_embeddings: Embedding,     // [V, H]
    pub position_embeddings: Embedding, // [P, H]
    pub layernorm: LayerNorm,
    pub dropout: Dropout,
}

impl QFormerEmbeddings {
    fn load(lb: &Loader, cfg: &QFormerConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        // transformers ≤ 4.3x saved the constant buffer `position_ids` (the published checkpoint
        // has it); it is arange(P) by construction and carries no information.
        if lb.contains("position_ids") {
            lb.mark_used("position_ids");
        }
        Ok(Self {
            word_embeddings: Embedding::load(&lb.pp("word_embeddings"), cfg.vocab_size, h)?,
            position_embeddings: Embedding::load(&lb.pp("position_embeddings"), cfg.max_position_embeddings, h)?,
            layernorm: LayerNorm::load_named(
                lb,
                h,
                cfg.layer_norm_eps,
                &["layernorm.weight", "LayerNorm.weight"],
                &["layernorm.bias", "LayerNorm.bias"],
            )?,
            dropout: Dropout::new(cfg.hidden_dropout_prob),
        })
    }

    /// queries: [B, Q, H] (in the compute dtype); input_ids: [B, L] → [B, Q+L, H].
    fn forward(&self, queries: &Tensor, input_ids: Option<&Tensor>, ctx: Ctx) -> Result<Tensor> {
        let x = match input_ids {
            None => queries.clone(),
            Some(ids) => {
                let l = ids.dim(1)?;
                let words = self.word_embeddings.forward(ids)?; // [B, L, H]
                let positions = self.position_embeddings.weight.narrow(0, 0, l)?; // [L, H]
                let text = words.broadcast_add(&positions)?.to_dtype(queries.dtype())?;
                Tensor::cat(&[queries, &text], 1)?
            }
        };
        self.dropout.forward(&self.layernorm.forward(&x)?, ctx)
    }
}

/// What a Q-Former pass returns.
#[derive(Debug, Clone)]
pub struct QFormerOutput {
    /// The query positions of the last layer: the visual tokens. [B, Q, H]
    pub query_output: Tensor,
    /// All positions of the last layer (queries, then text). [B, Q+L, H]
    pub last_hidden_state: Tensor,
}

/// The Q-Former (`qformer.*` in the HF checkpoint).
#[derive(Debug, Clone)]
pub struct QFormer {
    pub cfg: QFormerConfig,
    pub embeddings: QFormerEmbeddings,
    pub layers: Vec<QFormerLayer>,
}

impl QFormer {
    /// `lb` points at the Q-Former's namespace (e.g. `root.pp("qformer")`).
    pub fn load(lb: &Loader, cfg: &QFormerConfig) -> Result<Self> {
        cfg.validate()?;
        let embeddings = QFormerEmbeddings::load(&lb.pp("embeddings"), cfg)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| QFormerLayer::load(&lb.pp("encoder.layer").pp(i.to_string()), cfg, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            embeddings,
            layers,
        })
    }

    /// The dtype the pass computes in: the dtype of the model's weights (f32 when trained).
    pub fn dtype(&self) -> DType {
        self.embeddings.word_embeddings.weight.dtype()
    }

    /// One pass.
    ///
    /// * `query_tokens`: [B or 1, Q, H] — the learned queries (1 is broadcast over the batch);
    /// * `input_ids`: [B, L] instruction tokens (positions 0..L), or None for queries only;
    /// * `attention_mask`: [B, L] text mask (1 = token, 0 = padding; None = all tokens); the
    ///   queries are always attended;
    /// * `image_embeds`: [B, N, Dv] image tokens (the post-LayerNorm ViT output);
    /// * `image_mask`: [B, N] (None = all image tokens);
    /// * `ctx`: dropout in training.
    ///
    /// Inputs are cast to the model's dtype ([`QFormer::dtype`]).
    pub fn forward(
        &self,
        query_tokens: &Tensor,
        input_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        image_embeds: &Tensor,
        image_mask: Option<&Tensor>,
        ctx: Ctx,
    ) -> Result<QFormerOutput> {
        let dt = self.dtype();
        let (b, n) = self.check_image_embeds(image_embeds)?;
        let (q, h) = self.check_query_tokens(query_tokens, b)?;
        let queries = query_tokens.to_dtype(dt)?.broadcast_as((b, q, h))?.contiguous()?; // [B, Q, H]
        let text_len = self.check_text(input_ids, attention_mask, b, image_embeds)?;
        // Self-attention bias over [queries ; text]: queries always visible.
        let self_bias = match attention_mask {
            Some(m) if text_len > 0 => {
                let ones = Tensor::ones((b, q), DType::F32, m.device())?;
                let full = Tensor::cat(&[&ones, &m.to_dtype(DType::F32)?], 1)?; // [B, Q+L]
                Some(padding_bias(&full, dt)?) // [B, 1, 1, Q+L]
            }
            _ => None,
        };
        let image_bias = match image_mask {
            Some(m) => {
                ensure!(
                    m.dims() == [b, n],
                    "qformer: image_mask {:?} does not match image_embeds [{b}, {n}, ..]",
                    m.dims()
                );
                Some(padding_bias(m, dt)?) // [B, 1, 1, N]
            }
            None => None,
        };
        // The image only enters the cross-attentions' key/value products. When those run in
        // bf16 (an f32 Q-Former in a bf16 inference, nn::inference) a bf16 image goes in as it
        // is: casting it to f32 and back for every product gives the same values.
        let lowered = |a: &QFormerAttention| a.attention.k.lowered_to(image_embeds) == Some(image_embeds.dtype());
        let image = if self.layers.iter().filter_map(|l| l.crossattention.as_ref()).all(lowered) {
            image_embeds.clone()
        } else {
            crate::nn::cast::cast(image_embeds, dt)?
        };

        let mut x = self.embeddings.forward(&queries, input_ids, ctx)?; // [B, Q+L, H]
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer
                .forward(&x, q, self_bias.as_ref(), &image, image_bias.as_ref(), ctx)
                .with_context(|| format!("qformer layer {i}"))?;
        }
        Ok(QFormerOutput {
            query_output: x.narrow(1, 0, q)?,
            last_hidden_state: x,
        })
    }

    /// `image_embeds` must be [B, N, encoder_hidden_size]; returns (B, N).
    fn check_image_embeds(&self, image_embeds: &Tensor) -> Result<(usize, usize)> {
        let cfg = &self.cfg;
        let (b, n, dv) = image_embeds.dims3().with_context(|| {
            format!(
                "qformer: image_embeds must be [B, N, {}], got {:?}",
                cfg.encoder_hidden_size,
                image_embeds.dims()
            )
        })?;
        ensure!(
            dv == cfg.encoder_hidden_size,
            "qformer: image_embeds {:?} have width {dv}, the config's encoder_hidden_size is {}",
            image_embeds.dims(),
            cfg.encoder_hidden_size
        );
        Ok((b, n))
    }

    /// `query_tokens` must be [1 or B, Q > 0, hidden_size]; returns (Q, H).
    fn check_query_tokens(&self, query_tokens: &Tensor, b: usize) -> Result<(usize, usize)> {
        let cfg = &self.cfg;
        let (bq, q, h) = query_tokens.dims3().with_context(|| {
            format!(
                "qformer: query_tokens must be [B or 1, Q, {}], got {:?}",
                cfg.hidden_size,
                query_tokens.dims()
            )
        })?;
        ensure!(
            h == cfg.hidden_size && (bq == 1 || bq == b) && q > 0,
            "qformer: query_tokens {:?} do not fit hidden_size {} and batch {b} (expected [1 or {b}, Q, {}])",
            query_tokens.dims(),
            cfg.hidden_size,
            cfg.hidden_size
        );
        Ok((q, h))
    }

    /// The instruction's length L (0 without `input_ids`): `input_ids` must be [B, L] with L within
    /// the position embeddings, and `attention_mask` (only with them) [B, L].
    fn check_text(&self, input_ids: Option<&Tensor>, attention_mask: Option<&Tensor>, b: usize, image_embeds: &Tensor) -> Result<usize> {
        let cfg = &self.cfg;
        let Some(ids) = input_ids else {
            ensure!(attention_mask.is_none(), "qformer: an attention_mask was given without input_ids");
            return Ok(0);
        };
        let (bi, l) = ids
            .dims2()
            .with_context(|| format!("qformer: input_ids must be [B, L], got {:?}", ids.dims()))?;
        ensure!(
            bi == b,
            "qformer: input_ids {:?} have batch {bi}, image_embeds {:?} have batch {b}",
            ids.dims(),
            image_embeds.dims()
        );
        ensure!(
            l <= cfg.max_position_embeddings,
            "qformer: {l} instruction tokens exceed max_position_embeddings {}",
            cfg.max_position_embeddings
        );
        if let Some(m) = attention_mask {
            ensure!(
                m.dims() == [b, l],
                "qformer: attention_mask {:?} does not match input_ids [{b}, {l}]",
                m.dims()
            );
        }
        Ok(l)
    }
}
