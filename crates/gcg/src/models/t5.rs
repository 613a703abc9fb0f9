//! Flan-T5 (T5 v1.1): the frozen encoder–decoder language model of InstructBLIP-FlanT5.
//!
//! The visual tokens enter as soft prompts: the caller builds `inputs_embeds` (projected Q-Former
//! outputs followed by [`T5Model::embed`]ded text) and runs [`T5Model::encode`]. From the encoder
//! output the model gives
//! * [`T5Model::loss`] — teacher-forced token cross-entropy (HF `labels`, -100 = ignored); the
//!   gradient flows back to `inputs_embeds` although every T5 weight is a frozen plain tensor;
//! * [`T5Model::generate`] — greedy or beam search with a key/value cache, as HF `generate()`;
//! * [`T5Model::score_options`] — the log-likelihood of candidate answers.
//!
//! Architecture (HF `modeling_t5.py`): pre-norm blocks with T5's RMS LayerNorm; self-attention
//! without 1/sqrt(d) scaling and with a learned relative position bias (bucketed, bidirectional in
//! the encoder, causal in the decoder; only the first block of a stack owns the table, the others
//! reuse its bias); decoder blocks add cross-attention over the encoder output; gated-GELU FFN
//! (`act(wi_0 x) * wi_1 x → wo`); a final norm per stack; an untied `lm_head`.
//!
//! Tensor names are those of the published checkpoints, relative to a caller-chosen prefix
//! (`language_model.` in the InstructBLIP snapshot, none in a plain Flan-T5 snapshot).
//!
//! Notes:
//! * Dropout (`dropout_rate`, 0.1 for Flan-T5) acts only with a training [`Ctx`]. The official
//!   GCG code freezes T5 with `.eval()` but its training loop calls `model.train()`, which turns
//!   T5's dropout back on; pass `Ctx::eval()` to T5 for a strictly frozen language model.
//! * With gradients flowing through a frozen projection, the projection is one autograd node
//!   whose only input is the activation (see `nn::linear::FrozenMatmul`): candle would otherwise compute and
//!   keep a gradient for every frozen weight (3 B values for Flan-T5-XL).
//! * LoRA ([`T5Model::load_with_lora`]): PEFT's `target_modules` matched against every attention
//!   (encoder self-attention, decoder self- and cross-attention); the adapters sit under the
//!   projections' names (`….SelfAttention.q.lora_A.weight`) and their dropout acts with a training
//!   [`Ctx`], the cross-attention's keys/values included.
//! * Generation follows transformers 5's `generate()` step for step (greedy: argmax, finished rows
//!   fed pad; beam search: `_beam_search` with its length penalty, early-stopping heuristic and
//!   2·num_beams candidates), `min_new_tokens` included; sampling is deliberately not offered.

use crate::nn::attention::{causal_bias, padding_bias, MultiHeadAttention};
use crate::nn::cast::cast;
use crate::nn::init::Init;
use crate::nn::lora::{LoraAdapter, LoraConfig, LoraTarget};
use crate::nn::{cross_entropy, log_softmax_last_dim, Activation, Ctx, Dropout, Embedding, Epilogue, Linear, RmsNorm};
use crate::weights::checkpoints::hf_section;
use crate::weights::Loader;
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    /// Width of one attention head.
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_decoder_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    /// The FFN activation (HF `dense_act_fn`). Flan-T5's config says `gelu_new` (tanh
    /// approximation); the official GCG code switches it to exact `gelu`.
    pub dense_act_fn: Activation,
    /// `feed_forward_proj = "gated-…"`: `wi_0`/`wi_1` gate, else a single `wi`.
    pub is_gated_act: bool,
    pub layer_norm_epsilon: f64,
    /// Dropout (only active with a training [`Ctx`]).
    pub dropout_rate: f64,
    pub pad_token_id: u32,
    pub eos_token_id: u32,
    pub decoder_start_token_id: u32,
    /// When true, a checkpoint without `lm_head.weight` reuses `shared.weight` as output layer.
    pub tie_word_embeddings: bool,
    /// Multiply the decoder output by d_model^-0.5 before `lm_head` (original T5 with tied
    /// embeddings; HF ≥ 5 calls it `scale_decoder_outputs`). False for Flan-T5.
    pub scale_decoder_outputs: bool,
}

/// HF's `T5Config` as `config.json` writes it (the fields read here), with its defaults; the
/// fields whose default is another field's value are options.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct HfT5Config {
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    /// Default: `num_layers`.
    pub num_decoder_layers: Option<usize>,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    /// `ACT` or `gated-ACT`.
    pub feed_forward_proj: String,
    /// Default: derived from `feed_forward_proj`.
    pub dense_act_fn: Option<String>,
    pub layer_norm_epsilon: f64,
    pub dropout_rate: f64,
    pub pad_token_id: HfTokenId,
    pub eos_token_id: HfTokenId,
    /// Default: `pad_token_id`.
    pub decoder_start_token_id: Option<HfTokenId>,
    pub tie_word_embeddings: bool,
    /// Default: `tie_word_embeddings`.
    pub scale_decoder_outputs: Option<bool>,
}

/// A token id, written as a number or a one-element list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum HfTokenId {
    One(u32),
    List(Vec<u32>),
}

impl HfTokenId {
    fn id(&self, key: &str) -> Result<u32> {
        match self {
            Self::One(id) => Ok(*id),
            Self::List(a) if a.len() == 1 => Ok(a[0]),
            Self::List(a) => bail!("T5 config: '{key}' should be one token id, got {a:?}"),
        }
    }
}

impl Default for HfT5Config {
    fn default() -> Self {
        Self {
            model_type: None,
            vocab_size: 32128,
            d_model: 512,
            d_kv: 64,
            d_ff: 2048,
            num_layers: 6,
            num_decoder_layers: None,
            num_heads: 8,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            feed_forward_proj: "relu".into(),
            dense_act_fn: None,
            layer_norm_epsilon: 1e-6,
            dropout_rate: 0.1,
            pad_token_id: HfTokenId::One(0),
            eos_token_id: HfTokenId::One(1),
            decoder_start_token_id: None,
            tie_word_embeddings: true,
            scale_decoder_outputs: None,
        }
    }
}

impl TryFrom<HfT5Config> for T5Config {
    type Error = anyhow::Error;
    fn try_from(h: HfT5Config) -> Result<Self> {
        if let Some(mt) = &h.model_type {
            ensure!(mt == "t5", "T5 config: model_type is {mt:?}, expected \"t5\"");
        }
        let ffp = h.feed_forward_proj.as_str();
        let parts: Vec<&str> = ffp.split('-').collect();
        let (is_gated_act, act_name) = match parts.as_slice() {
            ["gated", act] => (true, *act),
            [act] => (false, *act),
            _ => bail!("T5 config: feed_forward_proj {ffp:?} should be 'ACT' or 'gated-ACT'"),
        };
        let derived = if ffp == "gated-gelu" { "gelu_new" } else { act_name };
        let act_name = h.dense_act_fn.as_deref().unwrap_or(derived);
        let dense_act_fn = Activation::from_hf(act_name).context("T5 config: dense_act_fn")?;
        let pad_token_id = h.pad_token_id.id("pad_token_id")?;
        let cfg = Self {
            vocab_size: h.vocab_size,
            d_model: h.d_model,
            d_kv: h.d_kv,
            d_ff: h.d_ff,
            num_layers: h.num_layers,
            num_decoder_layers: h.num_decoder_layers.unwrap_or(h.num_layers),
            num_heads: h.num_heads,
            relative_attention_num_buckets: h.relative_attention_num_buckets,
            relative_attention_max_distance: h.relative_attention_max_distance,
            dense_act_fn,
            is_gated_act,
            layer_norm_epsilon: h.layer_norm_epsilon,
            dropout_rate: h.dropout_rate,
            pad_token_id,
            eos_token_id: h.eos_token_id.id("eos_token_id")?,
            decoder_start_token_id: match &h.decoder_start_token_id {
                Some(t) => t.id("decoder_start_token_id")?,
                None => pad_token_id,
            },
            tie_word_embeddings: h.tie_word_embeddings,
            // HF ≥ 5 stores the scaling flag separately (and then always writes
            // tie_word_embeddings = true); older configs imply it by tie_word_embeddings.
            scale_decoder_outputs: h.scale_decoder_outputs.unwrap_or(h.tie_word_embeddings),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl T5Config {
    /// The test preset (equal to the parity fixture driver's `tiny` text config).
    pub fn tiny() -> Self {
        Self {
            vocab_size: 100,
            d_model: 32,
            d_kv: 8,
            d_ff: 64,
            num_layers: 2,
            num_decoder_layers: 2,
            num_heads: 4,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            dense_act_fn: Activation::GeluTanh,
            is_gated_act: true,
            layer_norm_epsilon: 1e-6,
            dropout_rate: 0.1,
            pad_token_id: 0,
            eos_token_id: 1,
            decoder_start_token_id: 0,
            tie_word_embeddings: false,
            scale_decoder_outputs: false,
        }
    }

    /// `tiny` with exact GELU, as the official GCG code runs Flan-T5.
    pub fn tiny_gelu() -> Self {
        Self::tiny().with_activation(Activation::Gelu)
    }

    /// google/flan-t5-xl as published (`gated-gelu` = tanh-approximated GELU).
    pub fn flan_t5_xl() -> Self {
        Self {
            vocab_size: 32128,
            d_model: 2048,
            d_kv: 64,
            d_ff: 5120,
            num_layers: 24,
            num_decoder_layers: 24,
            num_heads: 32,
            ..Self::tiny()
        }
    }

    /// Flan-T5-XL as the official GCG code runs it (`dense_act_fn = "gelu"`, exact).
    pub fn flan_t5_xl_gcg() -> Self {
        Self::flan_t5_xl().with_activation(Activation::Gelu)
    }

    /// A preset by name: `tiny`, `tiny-gelu`, `flan-t5-xl`, `flan-t5-xl-gcg`.
    pub fn preset(name: &str) -> Result<Self> {
        Ok(match name {
            "tiny" => Self::tiny(),
            "tiny-gelu" => Self::tiny_gelu(),
            "flan-t5-xl" | "flan_t5_xl" => Self::flan_t5_xl(),
            "flan-t5-xl-gcg" | "flan_t5_xl_gcg" => Self::flan_t5_xl_gcg(),
            other => bail!("unknown T5 preset {other:?} (expected tiny, tiny-gelu, flan-t5-xl or flan-t5-xl-gcg)"),
        })
    }

    /// Override the FFN activation (GCG sets `dense_act_fn = "gelu"` after loading the config).
    pub fn with_activation(mut self, act: Activation) -> Self {
        self.dense_act_fn = act;
        self
    }

    /// Read an HF T5 `config.json` (or a composite config with a `text_config`, as InstructBLIP's).
    ///
    /// The activation comes from `dense_act_fn` when the file has it (what `save_pretrained`
    /// writes: the activation the model ran with), else from `feed_forward_proj` as HF derives it
    /// (`gated-gelu` → `gelu_new`). Missing fields take HF's `T5Config` defaults.
    pub fn from_hf_config(v: &Value) -> Result<Self> {
        let v = match v.get("text_config") {
            Some(t) if t.is_object() => t,
            _ => v,
        };
        Self::try_from(hf_section::<HfT5Config>(v, "T5 config")?)
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.vocab_size > 0 && self.d_model > 0 && self.d_kv > 0 && self.d_ff > 0,
            "T5 config: sizes must be positive: {self:?}"
        );
        ensure!(self.num_heads > 0, "T5 config: num_heads must be positive");
        ensure!(
            self.relative_attention_num_buckets >= 4,
            "T5 config: relative_attention_num_buckets {} is too small (at least 4)",
            self.relative_attention_num_buckets
        );
        for (name, id) in [
            ("pad", self.pad_token_id),
            ("eos", self.eos_token_id),
            ("decoder start", self.decoder_start_token_id),
        ] {
            ensure!(
                (id as usize) < self.vocab_size,
                "T5 config: {name} token {id} is outside the vocabulary of {}",
                self.vocab_size
            );
        }
        Ok(())
    }

    /// heads × head width.
    pub fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }
}

// ---------------------------------------------------------------------------------------------
// Relative position buckets
// ---------------------------------------------------------------------------------------------

/// T5's bucket of a relative position (key position − query position), as HF
/// `_relative_position_bucket`: half of the buckets are exact small distances, the rest grow
/// logarithmically up to `max_distance`. Bidirectional (encoder): separate buckets for keys after
/// the query; causal (decoder): keys after the query all fall into bucket 0.
///
/// The logarithm is evaluated in f32 as in PyTorch so that bucket edges agree exactly.
pub fn relative_position_bucket(relative_position: i64, bidirectional: bool, num_buckets: usize, max_distance: usize) -> usize {
    let mut num_buckets = num_buckets as i64;
    let mut bucket = 0i64;
    let rp = if bidirectional {
        num_buckets /= 2;
        if relative_position > 0 {
            bucket += num_buckets;
        }
        relative_position.abs()
    } else {
        -relative_position.min(0)
    };
    let max_exact = num_buckets / 2;
    if rp < max_exact {
        bucket += rp;
    } else {
        let ratio = (rp as f32 / max_exact as f32).ln();
        let denom = (max_distance as f64 / max_exact as f64).ln() as f32;
        let scaled = ratio / denom * (num_buckets - max_exact) as f32;
        let large = max_exact + scaled as i64; // truncation, as `.to(torch.long)`
        bucket += large.min(num_buckets - 1);
    }
    bucket as usize
}

// ---------------------------------------------------------------------------------------------
// Modules
// ---------------------------------------------------------------------------------------------

/// One T5 attention (self or cross): q/k/v/o without biases, no 1/sqrt(d) scaling. Its frozen
/// projections carry gradients to the activations only ([`Linear::forward_frozen`]).
pub type T5Attention = MultiHeadAttention;

/// T5's attention under `lb` (`q`, `k`, `v`, `o`), with T5's initialisation when not loaded,
/// and a LoRA branch on each projection `lora` targets.
fn load_attention(lb: &Loader, cfg: &T5Config, lora: Option<&LoraConfig>) -> Result<T5Attention> {
    let (d, inner) = (cfg.d_model, cfg.inner_dim());
    let normal = |std: f64| Init::Normal { std };
    let proj = |name: &str, target: LoraTarget, d_in: usize, d_out: usize, std: f64| -> Result<Linear> {
        let plb = lb.pp(name);
        let lin = Linear::load_with(&plb, d_in, d_out, false, normal(std))?;
        Ok(match lora {
            Some(l) if l.targets(target) => lin.with_lora(LoraAdapter::load(&plb, d_in, d_out, l)?),
            _ => lin,
        })
    };
    Ok(MultiHeadAttention {
        q: proj("q", LoraTarget::Q, d, inner, ((d * cfg.d_kv) as f64).powf(-0.5))?,
        k: proj("k", LoraTarget::K, d, inner, (d as f64).powf(-0.5))?,
        v: proj("v", LoraTarget::V, d, inner, (d as f64).powf(-0.5))?,
        o: proj("o", LoraTarget::O, inner, d, (inner as f64).powf(-0.5))?,
        heads: cfg.num_heads,
        scale: None,
        dropout: Dropout::new(cfg.dropout_rate),
    })
}

/// The FFN: gated `act(wi_0 x) * wi_1 x → wo`, or plain `act(wi x) → wo`.
#[derive(Debug, Clone)]
pub struct T5DenseActDense {
    /// `wi_0` (gated) or `wi`.
    pub wi_0: Linear,
    /// `wi_1`, only in the gated variant.
    pub wi_1: Option<Linear>,
    pub wo: Linear,
    pub act: Activation,
    pub dropout: Dropout,
}

impl T5DenseActDense {
    fn load(lb: &Loader, cfg: &T5Config) -> Result<Self> {
        let (d, ff) = (cfg.d_model, cfg.d_ff);
        let init_in = Init::Normal {
            std: (d as f64).powf(-0.5),
        };
        let (wi_0, wi_1) = if cfg.is_gated_act {
            (
                Linear::load_with(&lb.pp("wi_0"), d, ff, false, init_in)?,
                Some(Linear::load_with(&lb.pp("wi_1"), d, ff, false, init_in)?),
            )
        } else {
            (Linear::load_with(&lb.pp("wi"), d, ff, false, init_in)?, None)
        };
        Ok(Self {
            wi_0,
            wi_1,
            wo: Linear::load_with(
                &lb.pp("wo"),
                ff,
                d,
                false,
                Init::Normal {
                    std: (ff as f64).powf(-0.5),
                },
            )?,
            act: cfg.dense_act_fn,
            dropout: Dropout::new(cfg.dropout_rate),
        })
    }

    /// `residual + FFN(x)`. Without a gradient to carry or dropout to draw, the activation, the
    /// gate and the residual are fused into the products ([`Linear::forward_fused`]: one oneDNN
    /// call each for `wi_0` and `wo` on the CPU); otherwise the plain ops of [`Self::forward`].
    fn forward_residual(&self, x: &Tensor, residual: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let frozen_eval = !ctx.is_train() && (crate::nn::grad_disabled() || !crate::nn::needs_grad(&[x, residual]));
        if !frozen_eval {
            return Ok((residual + self.forward(x, ctx)?)?);
        }
        let gate = match &self.wi_1 {
            Some(wi_1) => Some(wi_1.forward_frozen(x)?),
            None => None,
        };
        let hidden = Epilogue {
            act: Some(self.act),
            gate: gate.as_ref(),
            out: Some(self.wo.weight.dtype()),
            ..Default::default()
        };
        let h = self.wi_0.forward_fused(x, hidden)?; // [.., d_ff]
        let out = Epilogue {
            residual: Some(residual),
            out: Some(residual.dtype()),
            ..Default::default()
        };
        self.wo.forward_fused(&h, out)
    }

    fn forward(&self, x: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let mut h = self.act.forward(&self.wi_0.forward_frozen(x)?)?; // [.., d_ff]
        if let Some(wi_1) = &self.wi_1 {
            h = (h * wi_1.forward_frozen(x)?)?;
        }
        self.wo.forward_frozen(&self.dropout.forward(&h, ctx)?)
    }
}

/// One block: self-attention, (decoder) cross-attention, FFN; each pre-normed with a residual.
#[derive(Debug, Clone)]
pub struct T5Block {
    pub self_attn: T5Attention,
    pub self_attn_norm: RmsNorm,
    /// Decoder only: `layer.1.EncDecAttention` and its norm.
    pub cross_attn: Option<(T5Attention, RmsNorm)>,
    pub ff: T5DenseActDense,
    pub ff_norm: RmsNorm,
    pub dropout: Dropout,
}

impl T5Block {
    fn load(lb: &Loader, cfg: &T5Config, is_decoder: bool, lora: Option<&LoraConfig>) -> Result<Self> {
        let eps = cfg.layer_norm_epsilon;
        let l0 = lb.pp("layer.0");
        let cross_attn = if is_decoder {
            let l1 = lb.pp("layer.1");
            Some((
                load_attention(&l1.pp("EncDecAttention"), cfg, lora)?,
                RmsNorm::load(&l1.pp("layer_norm"), cfg.d_model, eps)?,
            ))
        } else {
            None
        };
        let lf = lb.pp(if is_decoder { "layer.2" } else { "layer.1" });
        Ok(Self {
            self_attn: load_attention(&l0.pp("SelfAttention"), cfg, lora)?,
            self_attn_norm: RmsNorm::load(&l0.pp("layer_norm"), cfg.d_model, eps)?,
            cross_attn,
            ff: T5DenseActDense::load(&lf.pp("DenseReluDense"), cfg)?,
            ff_norm: RmsNorm::load(&lf.pp("layer_norm"), cfg.d_model, eps)?,
            dropout: Dropout::new(cfg.dropout_rate),
        })
    }

    /// x: [N, L, d]. `self_bias`: position bias + mask for the self-attention. `cache`: this
    /// block's cached self-attention keys/values (decoding), extended in place. `cross`: the
    /// encoder keys/values and their padding bias (decoder).
    fn forward(
        &self,
        x: &Tensor,
        self_bias: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        cross: Option<(&CrossKv, &Tensor)>,
        ctx: Ctx,
    ) -> Result<Tensor> {
        // self-attention
        let h = self.self_attn_norm.forward(x)?;
        let (mut k, mut v) = self.self_attn.project_kv(&h, ctx)?;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let a = self.self_attn.forward_with_kv(&h, &k, &v, Some(self_bias), ctx)?;
        let mut x = (x + self.dropout.forward(&a, ctx)?)?;

        // cross-attention
        if let Some((attn, norm)) = &self.cross_attn {
            let (kv, bias) = cross.ok_or_else(|| anyhow!("T5 decoder block called without encoder states"))?;
            let h = norm.forward(&x)?;
            let a = attn.forward_with_kv(&h, &kv.0, &kv.1, Some(bias), ctx)?;
            x = (x + self.dropout.forward(&a, ctx)?)?;
        }

        // FFN (dropout on its output only in training, where forward_residual takes the plain ops)
        if !ctx.is_train() {
            return self.ff.forward_residual(&self.ff_norm.forward(&x)?, &x, ctx);
        }
        let h = self.ff.forward(&self.ff_norm.forward(&x)?, ctx)?;
        Ok((x + self.dropout.forward(&h, ctx)?)?)
    }
}

/// The encoder's keys and values for one decoder block's cross-attention, [N, H, Le, Dh] each.
pub type CrossKv = (Tensor, Tensor);

/// A stack of blocks (the encoder or the decoder).
#[derive(Debug, Clone)]
pub struct T5Stack {
    pub blocks: Vec<T5Block>,
    /// `block.0.layer.0.SelfAttention.relative_attention_bias.weight`, [num_buckets, heads].
    pub relative_attention_bias: Tensor,
    pub final_layer_norm: RmsNorm,
    pub is_decoder: bool,
    pub num_buckets: usize,
    pub max_distance: usize,
    pub dropout: Dropout,
}

impl T5Stack {
    fn load(lb: &Loader, cfg: &T5Config, is_decoder: bool, lora: Option<&LoraConfig>) -> Result<Self> {
        let n = if is_decoder { cfg.num_decoder_layers } else { cfg.num_layers };
        ensure!(
            n > 0,
            "T5 config: the {} needs at least one layer",
            if is_decoder { "decoder" } else { "encoder" }
        );
        let blocks = (0..n)
            .map(|i| T5Block::load(&lb.pp(format!("block.{i}")), cfg, is_decoder, lora))
            .collect::<Result<Vec<_>>>()?;
        let relative_attention_bias = lb.pp("block.0.layer.0.SelfAttention.relative_attention_bias").get(
            (cfg.relative_attention_num_buckets, cfg.num_heads),
            "weight",
            Init::Normal {
                std: (cfg.d_model as f64).powf(-0.5),
            },
        )?;
        if is_decoder {
            // Some old checkpoints carry a cross-attention bias table HF never uses.
            let stray = "block.0.layer.1.EncDecAttention.relative_attention_bias.weight";
            if lb.contains(stray) {
                lb.mark_used(stray);
            }
        }
        Ok(Self {
            blocks,
            relative_attention_bias,
            final_layer_norm: RmsNorm::load(&lb.pp("final_layer_norm"), cfg.d_model, cfg.layer_norm_epsilon)?,
            is_decoder,
            num_buckets: cfg.relative_attention_num_buckets,
            max_distance: cfg.relative_attention_max_distance,
            dropout: Dropout::new(cfg.dropout_rate),
        })
    }

    /// The relative position bias [1, H, Lq, Lk] for queries at positions `offset..offset+Lq`
    /// over keys `0..Lk`.
    pub fn position_bias(&self, lq: usize, lk: usize, offset: usize) -> Result<Tensor> {
        let idx: Vec<u32> = (0..lq)
            .flat_map(|i| {
                (0..lk).map(move |j| {
                    let rel = j as i64 - (i + offset) as i64;
                    relative_position_bucket(rel, !self.is_decoder, self.num_buckets, self.max_distance) as u32
                })
            })
            .collect();
        let w = &self.relative_attention_bias; // [buckets, H]
        let heads = w.dim(1)?;
        let idx = Tensor::from_vec(idx, lq * lk, w.device())?;
        let b = w
            .index_select(&idx, 0)?
            .reshape((lq, lk, heads))?
            .permute((2, 0, 1))?
            .contiguous()?;
        Ok(b.unsqueeze(0)?)
    }

    fn finish(&self, h: &Tensor, ctx: Ctx) -> Result<Tensor> {
        self.dropout.forward(&self.final_layer_norm.forward(h)?, ctx)
    }
}

/// Per decoder block: the cached self-attention keys and values [N, H, L, Dh].
#[derive(Debug, Clone, Default)]
pub struct SelfKvCache {
    pub layers: Vec<Option<(Tensor, Tensor)>>,
    /// Number of decoder positions already cached.
    pub len: usize,
}

impl SelfKvCache {
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
            len: 0,
        }
    }

    /// Keep rows `idx` (beam search reordering), [N] → [idx.len()].
    pub fn select_rows(&mut self, idx: &Tensor) -> Result<()> {
        for slot in self.layers.iter_mut().flatten() {
            *slot = (slot.0.index_select(idx, 0)?, slot.1.index_select(idx, 0)?);
        }
        Ok(())
    }
}

/// Early stopping of beam search, as HF's `early_stopping` flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EarlyStopping {
    /// HF `False` (the default): stop a row when no running beam can beat the worst finished
    /// one, estimating a running beam's best score at the current length.
    #[default]
    Heuristic,
    /// HF `True`: stop a row as soon as it has `num_beams` finished hypotheses.
    AllFinished,
    /// HF `"never"`: canonical beam search (with a positive length penalty, the best possible
    /// score is estimated at the maximum length).
    Never,
}

impl EarlyStopping {
    /// From HF's value: `false`, `true` or `"never"`.
    pub fn from_hf(v: &Value) -> Result<Self> {
        match v {
            Value::Bool(false) | Value::Null => Ok(Self::Heuristic),
            Value::Bool(true) => Ok(Self::AllFinished),
            Value::String(s) if s == "never" => Ok(Self::Never),
            other => bail!("early_stopping must be true, false or \"never\", got {other}"),
        }
    }
}

/// Decoding settings (deterministic; HF `generate()` with `do_sample = False`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateConfig {
    /// At most this many generated tokens (eos included).
    pub max_new_tokens: usize,
    /// 1 = greedy, more = beam search.
    pub num_beams: usize,
    /// Beam scores are divided by length^length_penalty.
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
    /// eos is forbidden before this many tokens (HF `min_new_tokens`).
    pub min_new_tokens: usize,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 30,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
            min_new_tokens: 0,
        }
    }
}

/// The log-likelihood of one candidate answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptionScore {
    /// Σ log p(token) over the candidate's tokens (eos included).
    pub sum: f32,
    /// `sum / len`.
    pub mean: f32,
    pub len: usize,
}

/// Flan-T5: shared embedding, encoder, decoder and `lm_head`.
#[derive(Debug, Clone)]
pub struct T5Model {
    pub cfg: T5Config,
    /// `shared.weight` [V, d] (also `encoder.embed_tokens` / `decoder.embed_tokens`).
    pub shared: Embedding,
    pub encoder: T5Stack,
    pub decoder: T5Stack,
    /// `lm_head.weight` [V, d] (or `shared.weight` when tied and absent).
    pub lm_head: Linear,
}

impl T5Model {
    /// Load from `lb` (already positioned at the model's prefix, e.g. `lb.pp("language_model")`).
    pub fn load(lb: &Loader, cfg: &T5Config) -> Result<Self> {
        Self::load_with_lora(lb, cfg, None)
    }

    /// [`T5Model::load`] with LoRA branches on the attention projections `lora` targets (read
    /// from the source when it holds them, else initialised as PEFT does: B = 0).
    pub fn load_with_lora(lb: &Loader, cfg: &T5Config, lora: Option<&LoraConfig>) -> Result<Self> {
        cfg.validate()?;
        if let Some(l) = lora {
            l.validate()?;
        }
        let (v, d) = (cfg.vocab_size, cfg.d_model);
        let emb_names = ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"];
        let weight = lb.get_any((v, d), &emb_names, Init::Normal { std: 1.0 })?;
        // The copies HF writes next to `shared.weight` are the same table.
        for name in emb_names {
            if lb.contains(name) {
                if lb.stored_shape(name).as_deref() != Some(&[v, d][..]) {
                    bail!(
                        "tensor '{}' has shape {:?}, expected [{v}, {d}]",
                        lb.full_name(name),
                        lb.stored_shape(name)
                    );
                }
                lb.mark_used(name);
            }
        }
        let shared = Embedding::new(weight);
        let encoder = T5Stack::load(&lb.pp("encoder"), cfg, false, lora)?;
        let decoder = T5Stack::load(&lb.pp("decoder"), cfg, true, lora)?;
        let lm_head = if cfg.tie_word_embeddings && !lb.contains("lm_head.weight") {
            Linear::new(shared.weight.clone(), None)
        } else {
            Linear::load_with(&lb.pp("lm_head"), d, v, false, Init::Normal { std: 1.0 })?
        };
        Ok(Self {
            cfg: cfg.clone(),
            shared,
            encoder,
            decoder,
            lm_head,
        })
    }

    pub fn device(&self) -> &Device {
        self.shared.weight.device()
    }

    pub fn dtype(&self) -> DType {
        self.shared.weight.dtype()
    }

    /// Token embeddings: ids [B, L] → [B, L, d].
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.shared.forward(ids)
    }

    /// The encoder over soft prompts: inputs_embeds [B, L, d], mask [B, L] (1 = token,
    /// 0 = padding) → [B, L, d]. Differentiable w.r.t. `inputs_embeds`.
    pub fn encode(&self, inputs_embeds: &Tensor, mask: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let (b, l, d) = inputs_embeds
            .dims3()
            .context("T5 encode: inputs_embeds should be [B, L, d_model]")?;
        ensure!(
            d == self.cfg.d_model,
            "T5 encode: inputs_embeds width {d}, expected d_model {}",
            self.cfg.d_model
        );
        let (mb, ml) = mask.dims2().context("T5 encode: the attention mask should be [B, L]")?;
        ensure!(
            (mb, ml) == (b, l),
            "T5 encode: mask is [{mb}, {ml}] but inputs_embeds is [{b}, {l}, {d}]"
        );
        let dt = self.dtype();
        // position bias [1, H, L, L] + padding [B, 1, 1, L], shared by all blocks
        let bias = self.encoder.position_bias(l, l, 0)?.broadcast_add(&padding_bias(mask, dt)?)?; // [B, H, L, L]
        let mut h = self.encoder.dropout.forward(&cast(inputs_embeds, dt)?, ctx)?;
        for blk in &self.encoder.blocks {
            h = blk.forward(&h, &bias, None, None, ctx)?;
        }
        self.encoder.finish(&h, ctx) // [B, L, d]
    }

    /// Every decoder block's cross-attention keys/values over `enc` [B, Le, d] (evaluation).
    pub fn cross_kv(&self, enc: &Tensor) -> Result<Vec<CrossKv>> {
        self.cross_kv_ctx(enc, Ctx::eval())
    }

    /// [`T5Model::cross_kv`] in `ctx` (a LoRA branch's dropout acts in training).
    pub fn cross_kv_ctx(&self, enc: &Tensor, ctx: Ctx) -> Result<Vec<CrossKv>> {
        let enc = cast(enc, self.dtype())?;
        self.decoder
            .blocks
            .iter()
            .map(|blk| match &blk.cross_attn {
                Some((attn, _)) => attn.project_kv(&enc, ctx),
                None => Err(anyhow!("T5 decoder block without cross-attention")),
            })
            .collect()
    }

    fn cross_bias(&self, enc: &Tensor, enc_mask: &Tensor) -> Result<Tensor> {
        let (b, le, _) = enc.dims3().context("T5: encoder states should be [B, Le, d_model]")?;
        let (mb, ml) = enc_mask.dims2().context("T5: the encoder mask should be [B, Le]")?;
        ensure!(
            (mb, ml) == (b, le),
            "T5: encoder mask is [{mb}, {ml}] but the encoder states are [{b}, {le}, ..]"
        );
        padding_bias(enc_mask, self.dtype()) // [B, 1, 1, Le]
    }

    /// The decoder over `ids` [N, Lq] (positions `cache.len..` when a cache is given), returning
    /// the final hidden states [N, Lq, d].
    pub fn run_decoder(
        &self,
        ids: &Tensor,
        cross: &[CrossKv],
        cross_bias: &Tensor,
        mut cache: Option<&mut SelfKvCache>,
        ctx: Ctx,
    ) -> Result<Tensor> {
        let (_, lq) = ids.dims2().context("T5 decoder: ids should be [N, L]")?;
        ensure!(
            cross.len() == self.decoder.blocks.len(),
            "T5 decoder: {} cross-attention caches for {} blocks",
            cross.len(),
            self.decoder.blocks.len()
        );
        if let Some(c) = cache.as_ref() {
            ensure!(
                c.layers.len() == self.decoder.blocks.len(),
                "T5 decoder: a cache for {} blocks, the decoder has {}",
                c.layers.len(),
                self.decoder.blocks.len()
            );
        }
        let offset = cache.as_ref().map_or(0, |c| c.len);
        let lk = offset + lq;
        let mut self_bias = self.decoder.position_bias(lq, lk, offset)?; // [1, H, Lq, Lk]
        if lq > 1 {
            self_bias = self_bias.broadcast_add(&causal_bias(lq, lk, offset, self.dtype(), self.device())?)?;
        }
        let mut h = self.decoder.dropout.forward(&self.embed(ids)?, ctx)?;
        for (i, blk) in self.decoder.blocks.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            h = blk.forward(&h, &self_bias, slot, Some((&cross[i], cross_bias)), ctx)?;
        }
        if let Some(c) = cache {
            c.len += lq;
        }
        self.decoder.finish(&h, ctx)
    }

    /// `lm_head` (with HF's d_model^-0.5 rescaling for tied T5 v1.0 configs): [.., d] → [.., V].
    pub fn lm_logits(&self, h: &Tensor) -> Result<Tensor> {
        let h = if self.cfg.scale_decoder_outputs {
            (h * (self.cfg.d_model as f64).powf(-0.5))?
        } else {
            h.clone()
        };
        self.lm_head.forward_frozen(&h)
    }

    /// Teacher-forced logits: enc [B, Le, d], enc_mask [B, Le], decoder_input_ids [B, Ld]
    /// (starting with the decoder start token) → [B, Ld, V]. Evaluation mode.
    pub fn forward_logits(&self, enc: &Tensor, enc_mask: &Tensor, decoder_input_ids: &Tensor) -> Result<Tensor> {
        self.forward_logits_ctx(enc, enc_mask, decoder_input_ids, Ctx::eval())
    }

    pub fn forward_logits_ctx(&self, enc: &Tensor, enc_mask: &Tensor, decoder_input_ids: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let cross_bias = self.cross_bias(enc, enc_mask)?;
        let (b, _) = decoder_input_ids.dims2().context("T5: decoder_input_ids should be [B, Ld]")?;
        ensure!(b == enc.dim(0)?, "T5: {b} decoder rows for {} encoder rows", enc.dim(0)?);
        let cross = self.cross_kv_ctx(enc, ctx)?;
        let h = self.run_decoder(decoder_input_ids, &cross, &cross_bias, None, ctx)?;
        self.lm_logits(&h)
    }

    /// HF `_shift_right`: labels [B, Ld] (-100 = ignored) → decoder inputs [B, Ld] starting
    /// with the decoder start token, -100 replaced by pad.
    pub fn shift_right(&self, labels: &Tensor) -> Result<Tensor> {
        let (b, l) = labels.dims2().context("T5: labels should be [B, Ld]")?;
        let rows = labels.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let mut out = Vec::with_capacity(b * l);
        for (r, row) in rows.iter().enumerate() {
            for j in 0..l {
                let id = if j == 0 {
                    self.cfg.decoder_start_token_id as i64
                } else {
                    row[j - 1]
                };
                let id = if id == -100 { self.cfg.pad_token_id as i64 } else { id };
                ensure!(
                    id >= 0 && (id as usize) < self.cfg.vocab_size,
                    "T5: label {id} in row {r} is outside the vocabulary of {}",
                    self.cfg.vocab_size
                );
                out.push(id as u32);
            }
        }
        Ok(Tensor::from_vec(out, (b, l), labels.device())?)
    }

    /// Token cross-entropy of `labels` [B, Ld] (-100 = ignored; mean over the others, as HF),
    /// decoder inputs = labels shifted right. Gradients flow to `enc` and through it to the
    /// soft prompts.
    pub fn loss(&self, enc: &Tensor, enc_mask: &Tensor, labels: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let dec_ids = self.shift_right(labels)?;
        let logits = self.forward_logits_ctx(enc, enc_mask, &dec_ids, ctx)?; // [B, Ld, V]
        let (b, l, v) = logits.dims3()?;
        cross_entropy(&logits.reshape((b * l, v))?, &labels.flatten_all()?, -100)
    }

    /// Deterministic decoding as HF `generate()` (greedy for `num_beams = 1`, beam search
    /// otherwise), starting from the decoder start token and stopping at eos. Returns per row the
    /// generated ids without the start token, up to and including eos (no padding).
    pub fn generate(&self, enc: &Tensor, enc_mask: &Tensor, cfg: &GenerateConfig) -> Result<Vec<Vec<u32>>> {
        ensure!(cfg.num_beams >= 1, "generate: num_beams must be at least 1");
        ensure!(cfg.length_penalty.is_finite(), "generate: length_penalty must be finite");
        if cfg.max_new_tokens == 0 {
            return Ok(vec![Vec::new(); enc.dim(0)?]);
        }
        if cfg.num_beams == 1 {
            self.greedy(enc, enc_mask, cfg)
        } else {
            self.beam_search(enc, enc_mask, cfg)
        }
    }

    /// One decoding step for `tokens` (one per row): next-token logits [N, V] in f32.
    fn step_logits(&self, tokens: &[u32], cross: &[CrossKv], cross_bias: &Tensor, cache: &mut SelfKvCache) -> Result<Tensor> {
        let ids = Tensor::from_vec(tokens.to_vec(), (tokens.len(), 1), self.device())?;
        let h = self.run_decoder(&ids, cross, cross_bias, Some(cache), Ctx::eval())?; // [N, 1, d]
        Ok(self.lm_logits(&h.squeeze(1)?)?.to_dtype(DType::F32)?) // [N, V]
    }

    fn greedy(&self, enc: &Tensor, enc_mask: &Tensor, cfg: &GenerateConfig) -> Result<Vec<Vec<u32>>> {
        let b = enc.dim(0)?;
        let cross_bias = self.cross_bias(enc, enc_mask)?;
        let cross = self.cross_kv(enc)?;
        let mut cache = SelfKvCache::new(self.decoder.blocks.len());
        let (eos, pad) = (self.cfg.eos_token_id, self.cfg.pad_token_id);
        let mut tokens = vec![self.cfg.decoder_start_token_id; b];
        let mut out = vec![Vec::new(); b];
        let mut done = vec![false; b];
        for step in 0..cfg.max_new_tokens {
            let logits = self.step_logits(&tokens, &cross, &cross_bias, &mut cache)?.to_vec2::<f32>()?;
            for (r, row) in logits.into_iter().enumerate() {
                if done[r] {
                    tokens[r] = pad;
                    continue;
                }
                let mut row = row;
                if step < cfg.min_new_tokens {
                    row[eos as usize] = f32::NEG_INFINITY;
                }
                let next = argmax(&row) as u32;
                out[r].push(next);
                tokens[r] = next;
                done[r] = next == eos;
            }
            if done.iter().all(|&d| d) {
                break;
            }
        }
        Ok(out)
    }

    /// Beam search, step for step as HF's `_beam_search` (transformers 5): per row keep the
    /// 2·num_beams best continuations, continue the best num_beams that did not end, and collect
    /// ended ones (only from the top num_beams) scored by sum(log p) / length^length_penalty.
    fn beam_search(&self, enc: &Tensor, enc_mask: &Tensor, cfg: &GenerateConfig) -> Result<Vec<Vec<u32>>> {
        let nb = cfg.num_beams;
        let b = enc.dim(0)?;
        let n = b * nb;
        let p = BeamParams {
            nb,
            keep: 2 * nb, // max(2, 1 + #eos) · num_beams with one eos token
            eos: self.cfg.eos_token_id,
            max_length: cfg.max_new_tokens + 1, // including the decoder start token
            early_stopping: cfg.early_stopping,
        };
        let lp = cfg.length_penalty;
        let (cross, cross_bias) = self.beam_cross(enc, enc_mask, nb)?;
        let mut cache = SelfKvCache::new(self.decoder.blocks.len());
        let mut rows: Vec<BeamRow> = (0..b).map(|_| BeamRow::new(nb)).collect();
        let mut tokens = vec![self.cfg.decoder_start_token_id; n];
        let mut cur_len = 1usize;

        loop {
            let logits = self.step_logits(&tokens, &cross, &cross_bias, &mut cache)?;
            let logp = beam_log_probs(&logits, p.eos, cur_len - 1 < cfg.min_new_tokens)?; // [N, V]
            let denom = ((cur_len + 1 - 1) as f64).powf(lp) as f32;
            let mut all_hit = true;
            let mut beam_idx = Vec::with_capacity(n);
            for (r, row) in rows.iter_mut().enumerate() {
                let (hit, beams) = row.step(&logp[r * nb..(r + 1) * nb], &p, cur_len, denom);
                all_hit &= hit;
                beam_idx.extend(beams.iter().map(|&j| (r * nb + j) as u32));
            }

            // g. reorder the cache to the surviving beams, check whether to go on
            let idx = Tensor::from_vec(beam_idx, n, self.device())?;
            cache.select_rows(&idx)?;
            cur_len += 1;
            let best_len = if cfg.early_stopping == EarlyStopping::Never && lp > 0.0 {
                p.max_length - 1
            } else {
                cur_len - 1
            };
            let best_denom = (best_len as f64).powf(lp) as f32;
            for row in rows.iter_mut() {
                row.update_unsatisfied(best_denom);
            }
            let all_done = rows.iter().all(|row| row.fin_done.iter().all(|&d| d));
            let open = !(all_done && cfg.early_stopping == EarlyStopping::AllFinished);
            if !(rows.iter().any(|row| row.unsatisfied) && open && !all_hit) {
                break;
            }
            for (r, row) in rows.iter().enumerate() {
                for (j, s) in row.run_seq.iter().enumerate() {
                    tokens[r * nb + j] = *s.last().ok_or_else(|| anyhow!("beam search: empty running beam"))?;
                }
            }
        }
        Ok(rows.into_iter().map(|mut row| row.fin_seq.swap_remove(0)).collect())
    }

    /// The encoder's cross-attention keys/values and bias, repeated per beam: row r·nb + j ← r.
    fn beam_cross(&self, enc: &Tensor, enc_mask: &Tensor, nb: usize) -> Result<(Vec<CrossKv>, Tensor)> {
        let n = enc.dim(0)? * nb;
        let rep: Vec<u32> = (0..n).map(|i| (i / nb) as u32).collect();
        let rep = Tensor::from_vec(rep, n, self.device())?;
        let cross_bias = self.cross_bias(enc, enc_mask)?.index_select(&rep, 0)?;
        let cross = self
            .cross_kv(enc)?
            .into_iter()
            .map(|(k, v)| Ok((k.index_select(&rep, 0)?, v.index_select(&rep, 0)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok((cross, cross_bias))
    }

    /// For every batch row and each of its candidate token sequences (eos included), the sum of
    /// the tokens' log-probabilities under teacher forcing.
    pub fn score_options(&self, enc: &Tensor, enc_mask: &Tensor, options: &[Vec<Vec<u32>>]) -> Result<Vec<Vec<f32>>> {
        Ok(self
            .score_options_detailed(enc, enc_mask, options)?
            .into_iter()
            .map(|r| r.into_iter().map(|s| s.sum).collect())
            .collect())
    }

    /// As [`T5Model::score_options`], the per-token mean log-probability.
    pub fn score_options_mean(&self, enc: &Tensor, enc_mask: &Tensor, options: &[Vec<Vec<u32>>]) -> Result<Vec<Vec<f32>>> {
        Ok(self
            .score_options_detailed(enc, enc_mask, options)?
            .into_iter()
            .map(|r| r.into_iter().map(|s| s.mean).collect())
            .collect())
    }

    /// Sum, mean and length of every candidate's log-likelihood; all candidates of all rows run
    /// as one decoder batch sharing the rows' encoder keys/values.
    pub fn score_options_detailed(&self, enc: &Tensor, enc_mask: &Tensor, options: &[Vec<Vec<u32>>]) -> Result<Vec<Vec<OptionScore>>> {
        let b = enc.dim(0)?;
        ensure!(
            options.len() == b,
            "score_options: {} option lists for {b} batch rows",
            options.len()
        );
        let mut rows = Vec::new();
        let mut cands: Vec<&[u32]> = Vec::new();
        for (r, opts) in options.iter().enumerate() {
            for (o, c) in opts.iter().enumerate() {
                ensure!(!c.is_empty(), "score_options: candidate {o} of row {r} is empty");
                if let Some(&bad) = c.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
                    bail!(
                        "score_options: token {bad} of candidate {o} of row {r} is outside the vocabulary of {}",
                        self.cfg.vocab_size
                    );
                }
                rows.push(r as u32);
                cands.push(c);
            }
        }
        let mut out: Vec<Vec<OptionScore>> = options.iter().map(|o| Vec::with_capacity(o.len())).collect();
        if cands.is_empty() {
            return Ok(out);
        }
        let n = cands.len();
        let lmax = cands.iter().map(|c| c.len()).max().unwrap_or(1);
        let (start, pad) = (self.cfg.decoder_start_token_id, self.cfg.pad_token_id);
        let mut dec = Vec::with_capacity(n * lmax);
        let mut tgt = Vec::with_capacity(n * lmax);
        for c in &cands {
            for j in 0..lmax {
                dec.push(if j == 0 { start } else { c.get(j - 1).copied().unwrap_or(pad) });
                tgt.push(c.get(j).copied().unwrap_or(pad));
            }
        }
        let dev = self.device();
        let rows_t = Tensor::from_vec(rows.clone(), n, dev)?;
        let cross_bias = self.cross_bias(enc, enc_mask)?.index_select(&rows_t, 0)?;
        let cross = self
            .cross_kv(enc)?
            .into_iter()
            .map(|(k, v)| Ok((k.index_select(&rows_t, 0)?, v.index_select(&rows_t, 0)?)))
            .collect::<Result<Vec<_>>>()?;
        let dec = Tensor::from_vec(dec, (n, lmax), dev)?;
        let h = self.run_decoder(&dec, &cross, &cross_bias, None, Ctx::eval())?;
        let logits = self.lm_logits(&h)?.to_dtype(DType::F32)?; // [N, Lmax, V]
        let tgt = Tensor::from_vec(tgt, (n, lmax, 1), dev)?;
        let picked = log_softmax_last_dim(&logits)?.gather(&tgt, D::Minus1)?.squeeze(D::Minus1)?; // [N, Lmax]
        let picked = picked.to_vec2::<f32>()?;
        for (i, c) in cands.iter().enumerate() {
            let sum: f32 = picked[i][..c.len()].iter().sum();
            out[rows[i] as usize].push(OptionScore {
                sum,
                mean: sum / c.len() as f32,
                len: c.len(),
            });
        }
        Ok(out)
    }
}

/// Index of the largest value (the first on ties, as `torch.argmax`); NaN never wins.
fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] || xs[best].is_nan() {
            best = i;
        }
    }
    best
}

/// The next-token log-probabilities of every beam [N][V], eos forbidden when `no_eos`.
fn beam_log_probs(logits: &Tensor, eos: u32, no_eos: bool) -> Result<Vec<Vec<f32>>> {
    let mut logp = log_softmax_last_dim(logits)?.to_vec2::<f32>()?;
    if no_eos {
        for row in logp.iter_mut() {
            row[eos as usize] = f32::NEG_INFINITY;
        }
    }
    Ok(logp)
}

/// A score low enough to rule a beam or hypothesis out (HF's stand-in for -inf).
const BEAM_NEG: f32 = -1.0e9;

/// The fixed settings of one beam search.
struct BeamParams {
    /// Beams per row, and continuations kept per step (2·num_beams).
    nb: usize,
    keep: usize,
    eos: u32,
    /// The longest sequence, the decoder start token included.
    max_length: usize,
    early_stopping: EarlyStopping,
}

/// One batch row's beam search state: its running beams and its finished hypotheses.
struct BeamRow {
    run_seq: Vec<Vec<u32>>,
    run_score: Vec<f32>,
    fin_seq: Vec<Vec<u32>>,
    fin_score: Vec<f32>,
    fin_done: Vec<bool>,
    /// Whether a running beam may still beat a finished hypothesis.
    unsatisfied: bool,
}

impl BeamRow {
    /// Before the first step: beam 0 alone is live, no hypothesis has finished.
    fn new(nb: usize) -> Self {
        Self {
            run_seq: vec![Vec::new(); nb],
            run_score: (0..nb).map(|j| if j == 0 { 0.0 } else { BEAM_NEG }).collect(),
            fin_seq: vec![Vec::new(); nb],
            fin_score: vec![BEAM_NEG; nb],
            fin_done: vec![false; nb],
            unsatisfied: true,
        }
    }

    /// One step of this row from its beams' next-token log-probabilities `logp` [nb][V]: returns
    /// whether every kept continuation ended, and the beam each new running beam continues.
    fn step(&mut self, logp: &[Vec<f32>], p: &BeamParams, cur_len: usize, denom: f32) -> (bool, Vec<usize>) {
        // c. top-`keep` continuations over (beam, token) of the accumulated scores
        let cands = top_continuations(logp, &self.run_score, p.keep);
        let hits: Vec<bool> = cands.iter().map(|c| c.token == p.eos || cur_len + 1 >= p.max_length).collect();
        let all_hit = hits.iter().all(|&h| h);

        // e. the best num_beams continuations that did not end keep running
        let run_vals: Vec<f32> = cands
            .iter()
            .zip(&hits)
            .map(|(c, &h)| c.score + if h { BEAM_NEG } else { 0.0 })
            .collect();
        let order = top_indices(&run_vals, p.nb);
        let new_seq: Vec<Vec<u32>> = order
            .iter()
            .map(|&k| {
                let mut s = self.run_seq[cands[k].beam].clone();
                s.push(cands[k].token);
                s
            })
            .collect();
        let beams = order.iter().map(|&k| cands[k].beam).collect();

        self.collect_finished(&cands, &hits, p, denom);
        self.run_score = order.iter().map(|&k| run_vals[k]).collect();
        self.run_seq = new_seq;
        (all_hit, beams)
    }

    /// f. ended continuations among the top num_beams join the finished hypotheses (scored by
    /// `score / denom`); the best num_beams of old and new are kept.
    fn collect_finished(&mut self, cands: &[Continuation], hits: &[bool], p: &BeamParams, denom: f32) {
        let full = self.fin_done.iter().all(|&d| d) && p.early_stopping == EarlyStopping::AllFinished;
        let mut m_score = self.fin_score.clone();
        let mut m_done = self.fin_done.clone();
        let mut m_seq: Vec<Vec<u32>> = self.fin_seq.clone();
        for (k, c) in cands.iter().enumerate() {
            let did_finish = hits[k] && k < p.nb;
            let mut s = c.score / denom;
            s += if full { BEAM_NEG } else { 0.0 };
            s += if self.unsatisfied { 0.0 } else { BEAM_NEG };
            s += if did_finish { 0.0 } else { BEAM_NEG };
            m_score.push(s);
            m_done.push(did_finish);
            let mut seq = self.run_seq[c.beam].clone();
            seq.push(c.token);
            m_seq.push(seq);
        }
        let best = top_indices(&m_score, p.nb);
        self.fin_score = best.iter().map(|&i| m_score[i]).collect();
        self.fin_done = best.iter().map(|&i| m_done[i]).collect();
        self.fin_seq = best.iter().map(|&i| std::mem::take(&mut m_seq[i])).collect();
    }

    /// The row stays unsatisfied while its best running beam (scored at `best_denom`) could still
    /// beat its worst finished hypothesis.
    fn update_unsatisfied(&mut self, best_denom: f32) {
        let best_running = self.run_score[0] / best_denom;
        let worst_fin = self.fin_score.iter().cloned().fold(f32::INFINITY, f32::min);
        let improvable = self.fin_done.iter().any(|&d| best_running > if d { worst_fin } else { BEAM_NEG });
        self.unsatisfied = self.unsatisfied && improvable;
    }
}

/// Indices of the `k` largest values, largest first (earlier index first on ties).
fn top_indices(xs: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..xs.len()).collect();
    idx.sort_by(|&a, &b| xs[b].total_cmp(&xs[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

#[derive(Debug, Clone, Copy)]
struct Continuation {
    score: f32,
    beam: usize,
    token: u32,
}

/// The `keep` best (beam, token) pairs by `logp[beam][token] + beam_score[beam]` (f32, as HF's
/// accumulated scores), best first; on ties the smaller flat index `beam·V + token` first.
fn top_continuations(logp: &[Vec<f32>], beam_score: &[f32], keep: usize) -> Vec<Continuation> {
    let mut best: Vec<Continuation> = Vec::with_capacity(keep + 1);
    for (j, row) in logp.iter().enumerate() {
        for (t, &lp) in row.iter().enumerate() {
            let s = lp + beam_score[j];
            // also skips NaN
            if best.len() == keep && s.partial_cmp(&best[keep - 1].score) != Some(std::cmp::Ordering::Greater) {
                continue;
            }
            let pos = best.iter().position(|c| s > c.score).unwrap_or(best.len());
            best.insert(
                pos,
                Continuation {
                    score: s,
                    beam: j,
                    token: t as u32,
                },
            );
            best.truncate(keep);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused FFN (activation, gate and residual inside the oneDNN products) against the
    /// plain ops, f32 to float rounding and bf16 to its rounding; gated and plain variants.
    #[test]
    fn fused_ffn_equals_the_plain_ops() -> Result<()> {
        let dev = Device::Cpu;
        for gated in [true, false] {
            for dt in [DType::F32, DType::BF16] {
                let cfg = T5Config {
                    d_model: 256,
                    d_ff: 512,
                    is_gated_act: gated,
                    ..T5Config::flan_t5_xl()
                };
                let ff = T5DenseActDense::load(&Loader::random(&dev, dt, 2), &cfg)?;
                let mut rng = crate::rng::SeededRng::new(8);
                let x = Tensor::from_vec(rng.normal_vec(2 * 7 * 256, 0.0, 1.0), (2, 7, 256), &dev)?.to_dtype(dt)?;
                let r = Tensor::from_vec(rng.normal_vec(2 * 7 * 256, 0.0, 1.0), (2, 7, 256), &dev)?.to_dtype(dt)?;
                let before = crate::nn::linear::onednn_calls();
                let got = ff.forward_residual(&x, &r, Ctx::eval())?;
                let calls = crate::nn::linear::onednn_calls() - before;
                assert_eq!(calls, if crate::nn::linear::ONEDNN { 2 + usize::from(gated) } else { 0 });
                let want = (&r + ff.forward(&x, Ctx::eval())?)?;
                let f = |t: &Tensor| t.to_dtype(DType::F32);
                let scale = f(&want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let err = (f(&got)? - f(&want)?)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
                let tol = if dt == DType::F32 { 1e-5 } else { 2e-2 };
                assert!(err <= tol, "gated {gated}, {dt:?}: {err}");
            }
        }
        Ok(())
    }

    #[test]
    fn buckets_are_monotone_and_bounded() {
        for &bidir in &[true, false] {
            let mut prev = 0;
            for rp in 0..400i64 {
                let b = relative_position_bucket(if bidir { rp } else { -rp }, bidir, 32, 128);
                assert!(b < 32);
                assert!(b >= prev, "bucket decreased at {rp}");
                prev = b;
            }
        }
        // small exact distances
        assert_eq!(relative_position_bucket(0, true, 32, 128), 0);
        assert_eq!(relative_position_bucket(-3, true, 32, 128), 3);
        assert_eq!(relative_position_bucket(3, true, 32, 128), 19);
        assert_eq!(relative_position_bucket(5, false, 32, 128), 0);
        assert_eq!(relative_position_bucket(-5, false, 32, 128), 5);
    }

    #[test]
    fn top_helpers() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(top_indices(&[0.5, 2.0, -1.0, 2.0], 3), vec![1, 3, 0]);
        let c = top_continuations(&[vec![-1.0, -0.5, -3.0], vec![-0.1, -0.2, -0.3]], &[0.0, -1.0], 3);
        let got: Vec<(usize, u32)> = c.iter().map(|c| (c.beam, c.token)).collect();
        assert_eq!(got, vec![(0, 1), (0, 0), (1, 0)]);
    }

    #[test]
    fn config_roundtrip_and_hf_parsing() {
        let v = serde_json::json!({
            "model_type": "t5", "vocab_size": 32128, "d_model": 2048, "d_kv": 64, "d_ff": 5120,
            "num_layers": 24, "num_heads": 32, "feed_forward_proj": "gated-gelu",
            "tie_word_embeddings": false, "decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0,
            "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6
        });
        let c = T5Config::from_hf_config(&v).unwrap();
        assert_eq!(c, T5Config::flan_t5_xl());
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<T5Config>(&s).unwrap(), c);
        let mut v2 = v.clone();
        v2["dense_act_fn"] = "gelu".into();
        assert_eq!(T5Config::from_hf_config(&v2).unwrap().dense_act_fn, Activation::Gelu);
        let mut v3 = v.clone();
        v3["feed_forward_proj"] = "gated-gelu-x".into();
        assert!(T5Config::from_hf_config(&v3).is_err());
        // A token id may be a one-element list; null means "the default"; errors name the field.
        let mut v4 = v.clone();
        v4["eos_token_id"] = serde_json::json!([1]);
        v4["num_decoder_layers"] = serde_json::Value::Null;
        assert_eq!(T5Config::from_hf_config(&v4).unwrap(), T5Config::flan_t5_xl());
        v4["eos_token_id"] = serde_json::json!([1, 2]);
        assert!(format!("{:#}", T5Config::from_hf_config(&v4).unwrap_err()).contains("eos_token_id"));
        let mut v5 = v.clone();
        v5["d_ff"] = "5120".into();
        let err = format!("{:#}", T5Config::from_hf_config(&v5).unwrap_err());
        assert!(err.contains("T5 config.d_ff"), "{err}");
    }
}
