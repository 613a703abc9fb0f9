//! The video LMM of GCG: InstructBLIP-FlanT5 applied to K selected frames.
//!
//! cached features ─post-LN─▶ [selection / soft mixing by the caller] ─▶ Q-Former per frame
//! (+ learned frame-position embedding) (+ one "spatial" Q-Former pass over all T frames) ─▶
//! projection ─▶ [visual tokens ; embedded prompt] ─▶ Flan-T5 ─▶ loss | generated answer | option
//! scores.
//!
//! Follows the official code (`models/blip2_t5_instruct.py` of WHB139426/GCG) with one deliberate
//! difference: the official code repeats the Q-Former instruction with `ids.repeat(K, 1)` while it
//! flattens frames as `(b k)`, pairing frame k of sample b with the instruction of sample
//! `(b·K + k) mod B` when B > 1; here every frame is paired with its own sample's instruction.

use crate::models::qformer::{QFormer, QFormerConfig};
use crate::models::t5::{GenerateConfig, T5Config, T5Model};
use crate::models::vit::{VisionModel, VitConfig};
use crate::nn::init::Init;
use crate::nn::lora::{is_lora_name, LoraConfig};
use crate::nn::{Ctx, Embedding, LayerNorm, Linear};
use crate::weights::checkpoints::hf_section;
use crate::weights::Loader;
use anyhow::{anyhow, ensure, Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// The top level of HF's InstructBLIP `config.json`: the three sections (each read by its own
/// config) and the number of query tokens. All are required; serde leaves them optional so that
/// the error can say which one is missing.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct HfInstructBlipConfig {
    pub vision_config: Option<serde_json::Value>,
    pub qformer_config: Option<serde_json::Value>,
    pub text_config: Option<serde_json::Value>,
    pub num_query_tokens: Option<usize>,
}

/// Sizes and switches of the video LMM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LmmConfig {
    pub vision: VitConfig,
    pub qformer: QFormerConfig,
    pub num_query_tokens: usize,
    pub t5: T5Config,
    /// Rows of the frame-position table (the official code sizes it by the sampled frame count T).
    pub max_frames: usize,
    /// Add the learned, sinusoidal-initialised frame-position embedding to each selected frame's
    /// query outputs (the official oracle and grounding modes do; its uniform mode does not).
    pub frame_positions: bool,
    /// Append one Q-Former pass whose queries attend to the patches of all T frames.
    pub spatial: bool,
    /// LoRA adapters on the T5's attention projections (none: the T5 as the checkpoint has it).
    #[serde(default)]
    pub lora: Option<LoraConfig>,
}

impl LmmConfig {
    pub fn tiny() -> Self {
        Self {
            vision: VitConfig::tiny(),
            qformer: QFormerConfig::tiny(),
            num_query_tokens: 8,
            t5: T5Config::tiny(),
            max_frames: 32,
            frame_positions: true,
            spatial: true,
            lora: None,
        }
    }

    /// InstructBLIP-FlanT5-XL with the official GCG settings (exact GELU in T5, T = 32 frames).
    pub fn instructblip_flan_t5_xl() -> Self {
        Self {
            vision: VitConfig::eva_vit_g(),
            qformer: QFormerConfig::instructblip(),
            num_query_tokens: 32,
            t5: T5Config::flan_t5_xl_gcg(),
            max_frames: 32,
            frame_positions: true,
            spatial: true,
            lora: None,
        }
    }

    pub fn preset(preset: crate::models::Preset) -> Self {
        match preset {
            crate::models::Preset::Tiny => Self::tiny(),
            crate::models::Preset::InstructblipFlanT5Xl => Self::instructblip_flan_t5_xl(),
        }
    }

    /// From an HF InstructBLIP `config.json` (vision_config, qformer_config, text_config,
    /// num_query_tokens). GCG's own settings (frame positions, spatial pass, T) keep their defaults.
    pub fn from_hf_config(v: &serde_json::Value) -> Result<Self> {
        let h: HfInstructBlipConfig = hf_section(v, "config.json")?;
        let part = |k: &str, x: &Option<serde_json::Value>| x.clone().ok_or_else(|| anyhow!("config.json has no \"{k}\""));
        let num_query_tokens = h
            .num_query_tokens
            .ok_or_else(|| anyhow!("config.json has no \"num_query_tokens\""))?;
        Ok(Self {
            vision: VitConfig::from_hf_config(&part("vision_config", &h.vision_config)?).context("config.json vision_config")?,
            qformer: QFormerConfig::from_hf_config(&part("qformer_config", &h.qformer_config)?, num_query_tokens)
                .context("config.json qformer_config")?,
            num_query_tokens,
            t5: T5Config::from_hf_config(&part("text_config", &h.text_config)?).context("config.json text_config")?,
            max_frames: 32,
            frame_positions: true,
            spatial: true,
            lora: None,
        })
    }

    /// Visual tokens the LLM receives for K frames.
    pub fn num_visual_tokens(&self, k: usize) -> usize {
        self.num_query_tokens * (k + usize::from(self.spatial))
    }
}

/// GCG's switches on top of a checkpoint's sizes: the `[model.lmm]` table of a run config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LmmOptions {
    /// Append the spatial Q-Former pass over all T frames (the official code does).
    pub spatial: bool,
    /// Frame-position embeddings (default: off in uniform mode, on otherwise, as the official code).
    pub frame_positions: Option<bool>,
    /// Dropout of the Q-Former and T5 (default: the checkpoint's or preset's, 0.1).
    pub dropout: Option<f64>,
    /// LoRA on the frozen T5 (the official `--use_lora`: `lora = {}` gives its rank 16,
    /// alpha 32, dropout 0.05 on the `q` and `v` projections of every attention); only the
    /// adapters train, the T5's own weights stay frozen. None (the default): no adapters.
    pub lora: Option<LoraConfig>,
}

impl Default for LmmOptions {
    fn default() -> Self {
        Self {
            spatial: true,
            frame_positions: None,
            dropout: None,
            lora: None,
        }
    }
}

impl LmmOptions {
    pub fn validate(&self) -> Result<()> {
        if let Some(p) = self.dropout {
            ensure!(
                (0.0..1.0).contains(&p),
                "model.lmm: dropout {p} must be in [0, 1) (1 would hide every input from the language model)"
            );
        }
        if let Some(l) = &self.lora {
            l.validate().context("[model.lmm] lora")?;
        }
        Ok(())
    }

    /// The LMM config of a checkpoint (or preset) with these switches, for T sampled frames and
    /// a model whose mode is `uniform` or not.
    pub fn apply(&self, base: &LmmConfig, frames: usize, uniform: bool) -> LmmConfig {
        let mut cfg = base.clone();
        cfg.spatial = self.spatial;
        if let Some(p) = self.dropout {
            cfg.qformer.hidden_dropout_prob = p;
            cfg.qformer.attention_probs_dropout_prob = p;
            cfg.t5.dropout_rate = p;
        }
        cfg.max_frames = cfg.max_frames.max(frames);
        // The official uniform mode has no frame-position embedding, whatever is asked.
        cfg.frame_positions = !uniform && self.frame_positions.unwrap_or(true);
        cfg.lora = self.lora.clone();
        cfg
    }
}

/// The names GCG trains: Q-Former, query tokens, projection and frame positions, and the T5's
/// LoRA adapters when it has them (`language_model.….lora_A.weight` / `lora_B`).
pub fn is_trainable(name: &str) -> bool {
    name.starts_with("qformer.")
        || name == "query_tokens"
        || name.starts_with("language_projection.")
        || name.starts_with("frame_embeds.")
        || is_t5_lora(name)
}

/// A LoRA factor of the T5 (`language_model.….lora_A.weight` / `lora_B.weight`).
pub fn is_t5_lora(name: &str) -> bool {
    name.starts_with("language_model.") && is_lora_name(name)
}

/// Checkpoint tensors a model built without the ViT leaves unused (features come from the store).
pub fn is_vit_trunk(name: &str) -> bool {
    name.starts_with("vision_model.") && !name.starts_with("vision_model.post_layernorm.")
}

/// Pixel frames or cached features in, visual tokens / loss / answers out.
pub struct VideoLmm {
    pub cfg: LmmConfig,
    /// The ViT, when built (features may instead come from the feature store).
    pub vision: Option<VisionModel>,
    /// BLIP-2's `ln_vision` (`vision_model.post_layernorm`), applied to cached features.
    pub post_layernorm: LayerNorm,
    pub qformer: QFormer,
    pub query_tokens: Tensor,            // [1, Q, Dq]
    pub frame_embeds: Option<Embedding>, // [T, Dq]
    pub language_projection: Linear,
    pub t5: T5Model,
}

/// The T5 encoder input built from visual tokens and a tokenised prompt.
pub struct LlmInputs {
    pub embeds: Tensor, // [B, V + L, d]
    pub mask: Tensor,   // [B, V + L]
}

impl VideoLmm {
    /// Build from a loader at the checkpoint root (canonical names: `vision_model.*`, `qformer.*`,
    /// `query_tokens`, `language_projection.*`, `language_model.*`, `frame_embeds.weight`).
    /// `with_vision = false` skips the ViT trunk (its tensors should then be ignored by the loader,
    /// see [`is_vit_trunk`]).
    pub fn load(lb: &Loader, cfg: &LmmConfig, with_vision: bool) -> Result<Self> {
        let vlb = lb.pp("vision_model");
        let vision = if with_vision {
            Some(VisionModel::load(&vlb, &cfg.vision)?)
        } else {
            None
        };
        let post_layernorm = match &vision {
            Some(v) => v.post_layernorm.clone(),
            None => LayerNorm::load(&vlb.pp("post_layernorm"), cfg.vision.hidden_size, cfg.vision.layer_norm_eps)?,
        };
        let dq = cfg.qformer.hidden_size;
        ensure!(
            cfg.qformer.encoder_hidden_size == cfg.vision.hidden_size,
            "the Q-Former cross-attends to width {} but the ViT is {} wide",
            cfg.qformer.encoder_hidden_size,
            cfg.vision.hidden_size
        );
        let query_tokens = lb.get((1, cfg.num_query_tokens, dq), "query_tokens", Init::Normal { std: 0.02 })?;
        let qformer = QFormer::load(&lb.pp("qformer"), &cfg.qformer)?;
        let frame_embeds = if cfg.frame_positions {
            Some(Embedding::new(lb.get_or_init(
                (cfg.max_frames, dq),
                "frame_embeds.weight",
                Init::Sinusoidal,
            )?))
        } else {
            None
        };
        let language_projection = Linear::load(&lb.pp("language_projection"), dq, cfg.t5.d_model, true)?;
        let t5 = T5Model::load_with_lora(&lb.pp("language_model"), &cfg.t5, cfg.lora.as_ref())?;
        Ok(Self {
            cfg: cfg.clone(),
            vision,
            post_layernorm,
            qformer,
            query_tokens,
            frame_embeds,
            language_projection,
            t5,
        })
    }

    /// Un-normalised ViT features [..., N, Dv] → the Q-Former's image input (post-LayerNorm).
    pub fn normalize_features(&self, features: &Tensor) -> Result<Tensor> {
        self.post_layernorm.forward(features)
    }

    /// Pixels [F, 3, S, S] → un-normalised features [F, N, Dv] (needs the ViT).
    pub fn encode_pixels(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let vit = self
            .vision
            .as_ref()
            .ok_or_else(|| anyhow!("this model was built without the ViT; pass cached features"))?;
        vit.forward_wo_norm(pixel_values)
    }

    /// Q-Former queries for a batch of images: image_embeds [M, N, Dv] (normalised), the
    /// instruction of each image [M, L] → [M, Q, Dq].
    pub fn query_outputs(&self, image_embeds: &Tensor, qformer_ids: &Tensor, qformer_mask: &Tensor, ctx: Ctx) -> Result<Tensor> {
        Ok(self
            .qformer
            .forward(&self.query_tokens, Some(qformer_ids), Some(qformer_mask), image_embeds, None, ctx)?
            .query_output)
    }

    /// Visual tokens for the LLM, projected: frames [B, K, N, Dv] (normalised, already selected or
    /// softly mixed), all T normalised frames [B, T, N, Dv] for the spatial pass, and the Q-Former
    /// instruction [B, L] → [B, K·Q (+ Q), d_model].
    pub fn visual_tokens(
        &self,
        frames: &Tensor,
        all_frames: Option<&Tensor>,
        qformer_ids: &Tensor,
        qformer_mask: &Tensor,
        ctx: Ctx,
    ) -> Result<Tensor> {
        let (b, k, n, dv) = frames.dims4().context("visual_tokens: frames must be [B, K, N, Dv]")?;
        let (bi, l) = qformer_ids.dims2().context("visual_tokens: qformer_ids must be [B, L]")?;
        ensure!(bi == b, "visual_tokens: {b} samples of frames but {bi} instructions");
        if let Some(fe) = &self.frame_embeds {
            ensure!(k <= fe.num(), "visual_tokens: {k} frames exceed the {} frame positions", fe.num());
        }
        let flat = frames.reshape((b * k, n, dv))?;
        // Each frame with its own sample's instruction: rows b·K + k take instruction b.
        let rep = |t: &Tensor| -> Result<Tensor> { Ok(t.unsqueeze(1)?.broadcast_as((b, k, l))?.contiguous()?.reshape((b * k, l))?) };
        let q = self.query_outputs(&flat, &rep(qformer_ids)?, &rep(qformer_mask)?, ctx)?; // [B·K, Q, Dq]
        let (_, nq, dq) = q.dims3()?;
        let mut q = q.reshape((b, k, nq, dq))?;
        if let Some(fe) = &self.frame_embeds {
            let pos = fe.weight.narrow(0, 0, k)?.to_dtype(q.dtype())?.reshape((1, k, 1, dq))?;
            q = q.broadcast_add(&pos)?;
        }
        let mut tokens = q.reshape((b, k * nq, dq))?;
        if self.cfg.spatial {
            let all = all_frames.ok_or_else(|| anyhow!("the spatial pass needs all T frames (all_frames)"))?;
            let (ba, t, na, dva) = all.dims4().context("visual_tokens: all_frames must be [B, T, N, Dv]")?;
            ensure!(
                ba == b && na == n && dva == dv,
                "visual_tokens: all_frames {:?} do not match frames {:?}",
                all.dims(),
                frames.dims()
            );
            let sp = self.query_outputs(&all.reshape((b, t * n, dv))?, qformer_ids, qformer_mask, ctx)?; // [B, Q, Dq]
            tokens = Tensor::cat(&[&tokens, &sp.to_dtype(tokens.dtype())?], 1)?;
        }
        self.language_projection.forward(&tokens)
    }

    /// [visual tokens ; embedded prompt] and its mask, in the T5's dtype.
    pub fn llm_inputs(&self, visual: &Tensor, input_ids: &Tensor, attention_mask: &Tensor) -> Result<LlmInputs> {
        let (b, v, _) = visual.dims3()?;
        let dt = self.t5.dtype();
        let text = self.t5.embed(input_ids)?;
        let embeds = Tensor::cat(&[&visual.to_dtype(dt)?, &text.to_dtype(dt)?], 1)?;
        let ones = Tensor::ones((b, v), DType::U32, visual.device())?;
        let mask = Tensor::cat(&[&ones, &attention_mask.to_dtype(DType::U32)?], 1)?;
        Ok(LlmInputs { embeds, mask })
    }

    /// L_vqa: token cross-entropy of the target (labels [B, Ld], −100 ignored).
    pub fn loss(&self, inputs: &LlmInputs, labels: &Tensor, ctx: Ctx) -> Result<Tensor> {
        let enc = self.t5.encode(&inputs.embeds, &inputs.mask, ctx)?;
        self.t5.loss(&enc, &inputs.mask, labels, ctx)
    }

    /// Deterministic decoding (greedy or beam search).
    pub fn generate(&self, inputs: &LlmInputs, cfg: &GenerateConfig) -> Result<Vec<Vec<u32>>> {
        let enc = self.t5.encode(&inputs.embeds, &inputs.mask, Ctx::eval())?;
        self.t5.generate(&enc, &inputs.mask, cfg)
    }

    /// Σ log p of each candidate answer (token ids with their eos) per sample.
    pub fn score_options(&self, inputs: &LlmInputs, options: &[Vec<Vec<u32>>]) -> Result<Vec<Vec<f32>>> {
        let enc = self.t5.encode(&inputs.embeds, &inputs.mask, Ctx::eval())?;
        self.t5.score_options(&enc, &inputs.mask, options)
    }

    /// The HF single-image path: pixels [B, 3, S, S] → projected query outputs [B, Q, d].
    pub fn image_language_inputs(&self, pixel_values: &Tensor, qformer_ids: &Tensor, qformer_mask: &Tensor) -> Result<Tensor> {
        let feats = self.encode_pixels(pixel_values)?;
        let normed = self.normalize_features(&feats)?;
        let q = self.query_outputs(&normed, qformer_ids, qformer_mask, Ctx::eval())?;
        self.language_projection.forward(&q)
    }
}
