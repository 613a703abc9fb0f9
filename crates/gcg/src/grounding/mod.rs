//! GCG's grounding module: the Gaussian generator, the perturbed top-k frame selection and the
//! grounding losses (SPEC §4–6; official `models/grounding_module.py`).
//!
//! * [`generator`] — frames + question/options (CLIP space) → Gaussian centres μ [B, K] → p [B, T];
//! * [`gaussian`] — the Gaussian mixture p(t);
//! * [`topk`] — TopK_σ (perturbed top-k with its own backward) and the hard top-k;
//! * [`losses`] — L_reg and L_con (with the projection head).
//!
//! [`Grounding`] ties them together as the official `Grounding.forward` does: in training it
//! returns μ, p, L_reg, L_con and the soft selection TopK_σ(p, K) [B, K, T] that mixes the frames'
//! features for the LLM; in inference the hard top-K of p sorted by time.
//!
//! Differences from the official code (SPEC wins; see also `losses.rs` and `topk.rs`):
//! * the perturbed top-k's backward is the full Jacobian estimator by default
//!   ([`topk::TopkGradient::Full`]); the official diagonal is [`topk::TopkGradient::Diagonal`];
//! * the official code draws fresh noise for each of its three perturbed top-k calls (positives,
//!   intra negatives, LLM selection); [`TopkNoises`] makes the three explicit, drawn from one
//!   seeded generator in that order (or given, for parity tests);
//! * the official code feeds the *cosine similarities* of frames and answer as `label_probs` to the
//!   regression loss; [`GroundingInputs::pseudo_label_scores`] is whatever the caller passes (the
//!   SPEC's s_t).

pub mod gaussian;
pub mod generator;
pub mod losses;
pub mod topk;

pub use gaussian::{gaussian_mixture, gaussian_std, gaussians};
pub use generator::{GaussianGenerator, GeneratorOutput};
pub use losses::{contrastive_loss, regression_loss, regression_loss_to, ContrastiveInputs, ProjectionHead, RegressionLoss};
pub use topk::{hard_selection, hard_topk, one_hot_selection, perturbed_topk, Noise, PerturbedTopK, TopkGradient};

use crate::nn::Ctx;
use crate::rng::SeededRng;
use crate::weights::Loader;
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;

/// Sizes and hyper-parameters of the grounding module: the `[model.grounding]` table of a run
/// config (defaults: the official GCG settings, [`GroundingConfig::gcg`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroundingConfig {
    /// CLIP embedding width d (frames, question, options, answer). Not a setting of a run: it is
    /// the feature store's CLIP width.
    #[serde(skip)]
    pub dim: usize,
    /// Attention heads of the encoder (over the inner width h = d/4).
    pub heads: usize,
    /// Encoder blocks.
    pub layers: usize,
    /// FFN width as a multiple of h.
    pub ffn_mult: usize,
    /// Dropout of the embedding, attention weights, FFN, centre head and projection head.
    pub dropout: f64,
    /// T: frames per video (rows of the frame-position table).
    pub frames: usize,
    /// K: Gaussians / selected moments (the official `window_size`).
    pub moments: usize,
    /// Gaussian width (s = max(width, 0.01)/9 on the [0, 1] time axis).
    pub width: f64,
    /// InfoNCE temperature.
    pub temperature: f64,
    pub layer_norm_eps: f64,
    /// The perturbed top-k (samples, σ, backward estimator): `[model.grounding.topk]`.
    pub topk: PerturbedTopK,
}

impl Default for GroundingConfig {
    fn default() -> Self {
        Self::gcg()
    }
}

impl GroundingConfig {
    /// The official GCG settings: d = 1024 (EVA-CLIP-g), 4 heads, 2 layers, dropout 0.3, T = 32,
    /// K = 4, width 0.2, temperature 0.1, n = 500, σ = 0.05.
    pub fn gcg() -> Self {
        Self {
            dim: 1024,
            heads: 4,
            layers: 2,
            ffn_mult: 4,
            dropout: 0.3,
            frames: 32,
            moments: 4,
            width: 0.2,
            temperature: 0.1,
            layer_norm_eps: 1e-12,
            topk: PerturbedTopK::default(),
        }
    }

    /// Test sizes in the tiny CLIP space (embed_dim 24 → h = 6, 2 heads), T = 8, K = 4.
    pub fn tiny() -> Self {
        Self {
            dim: 24,
            heads: 2,
            frames: 8,
            ..Self::gcg()
        }
    }

    /// h = d/4.
    pub fn inner_dim(&self) -> usize {
        self.dim / 4
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.moments < self.frames,
            "grounding: K = {} moments must be fewer than the {} frames (L_con needs T − K intra-video negatives)",
            self.moments,
            self.frames
        );
        self.validate_sizes()
    }

    /// Everything but K < T (uniform mode may take all frames, K = T, as the official code allows).
    pub fn validate_sizes(&self) -> Result<()> {
        let h = self.inner_dim();
        ensure!(
            self.dim % 4 == 0 && h >= 2 && h % 2 == 0,
            "grounding: dim {} must be a multiple of 8",
            self.dim
        );
        if self.heads == 0 || h % self.heads != 0 {
            let fits: Vec<usize> = (1..=h.min(16)).filter(|n| h % n == 0).collect();
            bail!(
                "grounding: inner width {h} (the CLIP width {} / 4) is not divisible by {} heads: set [model.grounding] \
                 heads to one of {fits:?} (e.g. --set model.grounding.heads={})",
                self.dim,
                self.heads,
                fits.iter().rev().find(|&&n| n <= self.heads.max(1)).unwrap_or(&1)
            );
        }
        ensure!(self.frames >= 2, "grounding: needs at least 2 frames, got {}", self.frames);
        ensure!(self.ffn_mult >= 1, "grounding: ffn_mult {} must be at least 1", self.ffn_mult);
        ensure!(
            self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0,
            "grounding: layer_norm_eps {} must be a finite number > 0",
            self.layer_norm_eps
        );
        ensure!(
            self.moments >= 1 && self.moments <= self.frames,
            "grounding: K = {} moments must be in 1..={} (at most the frames)",
            self.moments,
            self.frames
        );
        ensure!(
            (0.0..1.0).contains(&self.dropout),
            "grounding: dropout {} must be in [0, 1)",
            self.dropout
        );
        ensure!(self.temperature > 0.0, "grounding: temperature {} must be > 0", self.temperature);
        ensure!(
            self.width.is_finite() && self.width > 0.0,
            "grounding: width {} must be a finite number > 0 (the Gaussians' width on the [0, 1] time axis)",
            self.width
        );
        ensure!(
            self.topk.num_samples >= 1,
            "grounding: the perturbed top-k needs at least one sample"
        );
        ensure!(self.topk.sigma >= 0.0, "grounding: top-k sigma {} must be >= 0", self.topk.sigma);
        Ok(())
    }
}

/// Names of the grounding module's parameters (all trained).
pub fn is_trainable(name: &str) -> bool {
    name.starts_with("grounding.")
}

/// The noise of the three perturbed top-k calls of one training step.
#[derive(Clone, Copy)]
pub struct TopkNoises<'a> {
    /// TopK_σ(p, K) for the contrastive positives.
    pub positives: Noise<'a>,
    /// TopK_σ(1 − p, T − K) for the intra-video negatives.
    pub negatives: Noise<'a>,
    /// TopK_σ(p, K) for the LLM's frames.
    pub selection: Noise<'a>,
}

impl<'a> TopkNoises<'a> {
    /// All three drawn from one generator (in the order positives, negatives, selection).
    pub fn from_rng(rng: &'a RefCell<SeededRng>) -> Self {
        Self {
            positives: Noise::Rng(rng),
            negatives: Noise::Rng(rng),
            selection: Noise::Rng(rng),
        }
    }
}

/// One batch of grounding inputs (CLIP space).
pub struct GroundingInputs<'a> {
    /// Frame embeddings F.
    pub frames: &'a Tensor, // [B, T, d]
    /// Question embedding.
    pub question: &'a Tensor, // [B, d]
    /// Option embeddings (multiple choice), or `None` (open-ended: the text is the question only).
    pub options: Option<&'a Tensor>, // [B, O, d]
    /// Index of the right option per sample (needed with options, for the option negatives).
    pub answer_ids: Option<&'a [usize]>,
    /// Answer (event) text embedding: the contrastive anchor.
    pub answer: &'a Tensor, // [B, d]
    /// Pseudo-label scores s_t; their hard top-K (time-sorted) are the regression targets.
    pub pseudo_label_scores: &'a Tensor, // [B, T]
    /// That top-K when the caller has it for this K (the feature store's pseudo-labels): the
    /// regression targets instead of the top-K of the scores.
    pub pseudo_labels: Option<&'a [Vec<usize>]>,
}

impl GroundingInputs<'_> {
    /// The generator's text tokens: [question ; options].
    pub fn text_tokens(&self) -> Result<Tensor> {
        text_tokens(self.question, self.options)
    }
}

/// The generator's text tokens: question [B, d] and options [B, O, d] → [B, 1 + O, d]
/// (or [B, 1, d] without options).
pub fn text_tokens(question: &Tensor, options: Option<&Tensor>) -> Result<Tensor> {
    let (b, d) = question
        .dims2()
        .with_context(|| format!("grounding: question embeddings must be [B, d], got {:?}", question.dims()))?;
    let q = question.reshape((b, 1, d))?;
    match options {
        None => Ok(q),
        Some(o) => {
            let (bo, _, dopt) = o
                .dims3()
                .with_context(|| format!("grounding: options must be [B, O, d], got {:?}", o.dims()))?;
            ensure!(
                bo == b && dopt == d,
                "grounding: options {:?} do not match the questions [{b}, {d}]",
                o.dims()
            );
            Ok(Tensor::cat(&[&q, &o.to_dtype(q.dtype())?], 1)?)
        }
    }
}

/// Everything a training step needs from the grounding module.
#[derive(Debug, Clone)]
pub struct GroundingTrainOutput {
    pub gaussian_centres: Tensor, // [B, K]
    pub frame_scores: Tensor,     // [B, T]
    pub regression: RegressionLoss,
    pub contrastive: Tensor,
    /// TopK_σ(p, K) of the contrastive positives.
    pub positive_selection: Tensor, // [B, K, T]
    /// TopK_σ(1 − p, T − K) of the intra-video negatives.
    pub negative_selection: Tensor, // [B, T-K, T]
    /// TopK_σ(p, K): the soft selection that mixes the T frames into K LLM inputs.
    pub selection: Tensor, // [B, K, T]
}

/// L_reg and L_con with the soft selections they used.
#[derive(Debug, Clone)]
pub struct GroundingLosses {
    pub regression: RegressionLoss,
    pub contrastive: Tensor,
    pub positive_selection: Tensor, // [B, K, T]
    pub negative_selection: Tensor, // [B, T-K, T]
}

/// The inference-time grounding.
#[derive(Debug, Clone)]
pub struct GroundingPrediction {
    pub gaussian_centres: Tensor, // [B, K]
    pub frame_scores: Tensor,     // [B, T]
    /// The hard top-K frames of p sorted by time (the grounded moments).
    pub moments: Vec<Vec<usize>>,
    /// Their one-hot selection.
    pub selection: Tensor, // [B, K, T]
}

/// A batch computation gave NaN or ±∞ in these rows (questions) of `tensor`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{tensor} are not finite in batch rows {rows:?}")]
pub struct NonFiniteRows {
    pub tensor: &'static str,
    pub rows: Vec<usize>,
}

/// The official `Grounding` module: generator + projection head.
#[derive(Debug, Clone)]
pub struct Grounding {
    pub cfg: GroundingConfig,
    pub generator: GaussianGenerator,
    pub proj_head: ProjectionHead,
}

impl Grounding {
    /// Build from a loader at the module prefix (the caller passes `lb.pp("grounding")`).
    pub fn load(lb: &Loader, cfg: &GroundingConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg: cfg.clone(),
            generator: GaussianGenerator::load(lb, cfg)?,
            proj_head: ProjectionHead::load(lb, cfg.dim, cfg.inner_dim(), cfg.dropout)?,
        })
    }

    /// μ and p for frames [B, T, d] and text tokens [B, S, d]; a [`NonFiniteRows`] error when
    /// a row's Gaussian centres are not finite (its p(t) and top-k would be meaningless).
    pub fn generate(&self, frames: &Tensor, text: &Tensor, ctx: Ctx) -> Result<GeneratorOutput> {
        let out = self.generator.forward(frames, text, ctx)?;
        let centres = out.gaussian_centres.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
        let rows: Vec<usize> = (0..centres.len()).filter(|&i| centres[i].iter().any(|c| !c.is_finite())).collect();
        if !rows.is_empty() {
            return Err(NonFiniteRows {
                tensor: "the Gaussian centres μ of the grounding generator",
                rows,
            }
            .into());
        }
        Ok(out)
    }

    /// TopK_σ(scores, K) [B, K, T] with the configured samples, σ and backward.
    pub fn soft_selection(&self, frame_scores: &Tensor, noise: Noise) -> Result<Tensor> {
        perturbed_topk(frame_scores, self.cfg.moments, &self.cfg.topk, noise)
    }

    /// Hard top-K of the scores sorted by time, and its one-hot selection [B, K, T].
    pub fn hard_selection(&self, frame_scores: &Tensor) -> Result<(Vec<Vec<usize>>, Tensor)> {
        hard_selection(frame_scores, self.cfg.moments)
    }

    /// L_reg and L_con for generator outputs (positives / negatives drawn with the given noise).
    pub fn losses(
        &self,
        inputs: &GroundingInputs,
        out: &GeneratorOutput,
        positives: Noise,
        negatives: Noise,
        ctx: Ctx,
    ) -> Result<GroundingLosses> {
        let (t, k) = (self.cfg.frames, self.cfg.moments);
        let regression = match inputs.pseudo_labels {
            Some(labels) => regression_loss_to(&out.gaussian_centres, labels, t)?,
            None => regression_loss(&out.gaussian_centres, inputs.pseudo_label_scores)?,
        };
        let p = &out.frame_scores;
        let positive_selection = perturbed_topk(p, k, &self.cfg.topk, positives)?; // [B, K, T]
        let negative_selection = perturbed_topk(&p.affine(-1.0, 1.0)?, t - k, &self.cfg.topk, negatives)?; // [B, T-K, T]
        let options = match (inputs.options, inputs.answer_ids) {
            (Some(o), Some(ids)) => Some((o, ids)),
            (Some(_), None) => return Err(anyhow!("grounding: options given without the answer indices")),
            (None, _) => None,
        };
        let con = contrastive_loss(
            &self.proj_head,
            &ContrastiveInputs {
                frames: inputs.frames,
                answer: inputs.answer,
                options,
                positive_selection: &positive_selection,
                negative_selection: &negative_selection,
            },
            self.cfg.temperature,
            ctx,
        )?;
        Ok(GroundingLosses {
            regression,
            contrastive: con,
            positive_selection,
            negative_selection,
        })
    }

    /// A training step's grounding: μ, p, L_reg, L_con and the LLM's soft selection.
    pub fn forward_train(&self, inputs: &GroundingInputs, noises: TopkNoises, ctx: Ctx) -> Result<GroundingTrainOutput> {
        let out = self.generate(inputs.frames, &inputs.text_tokens()?, ctx)?;
        let losses = self.losses(inputs, &out, noises.positives, noises.negatives, ctx)?;
        let selection = self.soft_selection(&out.frame_scores, noises.selection)?;
        Ok(GroundingTrainOutput {
            gaussian_centres: out.gaussian_centres,
            frame_scores: out.frame_scores,
            regression: losses.regression,
            contrastive: losses.contrastive,
            positive_selection: losses.positive_selection,
            negative_selection: losses.negative_selection,
            selection,
        })
    }

    /// Inference: μ, p and the hard top-K moments (eval mode: no dropout). `options` may be `None`.
    pub fn predict(&self, frames: &Tensor, question: &Tensor, options: Option<&Tensor>) -> Result<GroundingPrediction> {
        let text = text_tokens(question, options)?;
        let out = self.generate(frames, &text, Ctx::eval())?;
        let (moments, selection) = self.hard_selection(&out.frame_scores)?;
        Ok(GroundingPrediction {
            gaussian_centres: out.gaussian_centres,
            frame_scores: out.frame_scores,
            moments,
            selection,
        })
    }

    /// Every parameter with its official name relative to the module prefix.
    pub fn params_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut v = self.generator.params_mut();
        v.extend(self.proj_head.params_mut());
        v
    }
}
