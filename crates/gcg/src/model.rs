//! The whole GCG model: the video LMM plus the Gaussian grounding module, in three modes.
//!
//! * `uniform` — the LLM sees K frames at evenly spaced indices of the T sampled frames;
//! * `oracle` — it sees the hard top-K of a Gaussian mixture centred on the top-K pseudo-label
//!   frames (an upper bound: the pseudo-labels peek at the answer);
//! * `grounding` — GCG: the Gaussian generator predicts K centres from the frames and the question
//!   (+ options); training mixes the frames with the perturbed top-k TopK_σ(p, K) so L_vqa also
//!   trains the generator, and adds L_reg and L_con; inference takes the hard top-K of p.
//!
//! Training returns L_vqa, L_reg, L_con and L = L_vqa + α1·L_reg + α2·L_con; answering returns the
//! answer (option scoring or generation), the K selected frames, their timestamps and p(t).

use crate::data::{self, Batch, PromptEncoder, PromptTokens, QaSample};
pub use crate::data::{AnswerFormat, TextTokenizers};
use crate::grounding::{
    gaussian_mixture, hard_selection, hard_topk, one_hot_selection, Grounding, GroundingConfig, GroundingInputs, NonFiniteRows, TopkNoises,
};
use crate::models::lmm::{LlmInputs, LmmConfig, LmmOptions, VideoLmm};
use crate::models::t5::GenerateConfig;
use crate::nn::Ctx;
use crate::rng::SeededRng;
use crate::weights::Loader;
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Uniform,
    Oracle,
    Grounding,
}

crate::choice_names!(Mode, "mode", { Uniform => "uniform", Oracle => "oracle", Grounding => "grounding" });

/// How the uniform mode spaces its K frames over T, and the function that does it.
pub use crate::video::{uniform_indices, UniformRule};

/// How a multiple-choice answer is produced at evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum AnswerMethod {
    /// The option whose letter has the highest log-likelihood (deterministic; the default).
    OptionScoring,
    /// Decode (greedy when `num_beams` = 1) and match the letter (or the text, open-ended).
    Generate { num_beams: usize, max_new_tokens: usize },
}

/// The GCG method: the `[model]` table of a run config. The network sizes are not here: they
/// come from the checkpoint (or the preset) as an [`LmmConfig`], which `lmm` adjusts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GcgConfig {
    /// uniform | oracle | grounding.
    pub mode: Mode,
    /// α1 (L_reg) and α2 (L_con).
    pub alpha_reg: f64,
    pub alpha_con: f64,
    /// How the uniform mode spaces its K frames over T.
    pub uniform_rule: UniformRule,
    /// How a multiple-choice answer is produced at evaluation (`[model.answer]`, `kind =
    /// "option-scoring"` or `"generate"` with `num_beams`, `max_new_tokens`).
    pub answer: AnswerMethod,
    /// `letter` (official) or `text`: what the language model learns to write for a
    /// multiple-choice question and what option scoring scores.
    pub answer_format: AnswerFormat,
    /// The video LMM's switches (`[model.lmm]`).
    pub lmm: LmmOptions,
    /// The grounding module, T sampled frames and K moments (`[model.grounding]`).
    pub grounding: GroundingConfig,
}

impl Default for GcgConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Grounding,
            alpha_reg: 1.0,
            alpha_con: 1.0,
            uniform_rule: UniformRule::OfficialTruncate,
            answer: AnswerMethod::OptionScoring,
            answer_format: AnswerFormat::Letter,
            lmm: LmmOptions::default(),
            grounding: GroundingConfig::gcg(),
        }
    }
}

impl GcgConfig {
    /// T sampled frames.
    pub fn frames(&self) -> usize {
        self.grounding.frames
    }
    /// K selected moments.
    pub fn moments(&self) -> usize {
        self.grounding.moments
    }

    pub fn validate(&self) -> Result<()> {
        match self.mode {
            // "All frames" (K = T) is allowed where no grounding module runs.
            Mode::Uniform => self.grounding.validate_sizes()?,
            Mode::Grounding | Mode::Oracle => self.grounding.validate()?,
        }
        ensure!(
            self.alpha_reg.is_finite() && self.alpha_reg >= 0.0 && self.alpha_con.is_finite() && self.alpha_con >= 0.0,
            "model: alpha_reg {} and alpha_con {} must be finite and >= 0",
            self.alpha_reg,
            self.alpha_con
        );
        self.lmm.validate()
    }
}

/// The trainable names of the whole model: the LMM's (Q-Former, query tokens, projection, frame
/// positions) and the grounding module's.
pub fn is_trainable(name: &str) -> bool {
    crate::models::lmm::is_trainable(name) || crate::grounding::is_trainable(name)
}

/// The losses of a training step (scalars).
pub struct Losses {
    pub vqa: Tensor,
    pub reg: Option<Tensor>,
    pub con: Option<Tensor>,
    pub total: Tensor,
}

/// An answered question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answered {
    pub key: String,
    /// Option index (multiple choice) or text (open-ended).
    pub prediction: data::Answer,
    /// The decoded text, when the answer was generated.
    pub generated: Option<String>,
    /// Per-option log-likelihoods, when scored.
    pub option_scores: Option<Vec<f32>>,
    /// The K frames the LLM saw, sorted by time, and their seconds.
    pub frames: Vec<usize>,
    pub seconds: Vec<f64>,
    /// p(t) over the T frames (grounding and oracle modes).
    pub curve: Option<Vec<f32>>,
}

impl Answered {
    /// The grounded span: the first to the last moment in seconds, as NExT-GQA's metrics score
    /// it; none when a moment has no time (a frame folder without times).
    pub fn span(&self) -> Option<[f64; 2]> {
        if self.seconds.is_empty() || !self.seconds.iter().all(|x| x.is_finite()) {
            return None;
        }
        let first = self.seconds.iter().cloned().fold(f64::INFINITY, f64::min);
        let last = self.seconds.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        Some([first, last])
    }
}

pub struct GcgModel {
    pub cfg: GcgConfig,
    pub lmm: VideoLmm,
    pub grounding: Option<Grounding>,
    pub tokenizers: Arc<TextTokenizers>,
    /// Frames per ViT pass when the ViT runs in the loop on a batch's `pixel_values` (as `gcg
    /// features --frame-batch`: the same value gives the stored features' bits).
    pub vit_frame_batch: usize,
}

impl GcgModel {
    /// Build from a loader at the checkpoint root: the video LMM of `lmm`'s sizes with `cfg`'s
    /// switches, and the grounding module in grounding mode (`with_vision`: also the ViT trunk).
    pub fn load(lb: &Loader, lmm: &LmmConfig, cfg: &GcgConfig, tokenizers: TextTokenizers, with_vision: bool) -> Result<Self> {
        cfg.validate()?;
        let lmm_cfg = cfg.lmm.apply(lmm, cfg.frames(), cfg.mode == Mode::Uniform);
        let lmm = VideoLmm::load(lb, &lmm_cfg, with_vision)?;
        let grounding = match cfg.mode {
            Mode::Grounding => Some(Grounding::load(&lb.pp("grounding"), &cfg.grounding)?),
            _ => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            lmm,
            grounding,
            tokenizers: Arc::new(tokenizers),
            vit_frame_batch: 32,
        })
    }

    /// How this model's batches tokenize their prompts (its tokenizers and answer format): what
    /// a [`BatchLoader`](crate::data::BatchLoader) is given.
    pub fn prompt_encoder(&self) -> PromptEncoder {
        PromptEncoder {
            tokenizers: self.tokenizers.clone(),
            answer_format: self.cfg.answer_format,
        }
    }

    fn device(&self) -> Device {
        self.lmm.query_tokens.device().clone()
    }

    fn check_batch(&self, batch: &Batch) -> Result<(usize, usize)> {
        let (b, t) = match (&batch.frame_features, &batch.pixel_values) {
            (None, Some(px)) => {
                let (b, t, _, _, _) = px.dims5().context("batch pixel values must be [B, T, 3, S, S]")?;
                (b, t)
            }
            _ => {
                let (b, t, _, _) = Self::frame_features(batch)?
                    .dims4()
                    .context("batch frame features must be [B, T, N, Dv]")?;
                (b, t)
            }
        };
        ensure!(
            b == batch.samples.len(),
            "batch: {} samples but features for {b}",
            batch.samples.len()
        );
        ensure!(
            t == self.cfg.frames(),
            "batch: {t} frames per video, the model is configured for T = {}",
            self.cfg.frames()
        );
        ensure!(
            batch.timestamps.len() == b,
            "batch: {} timestamp rows for {b} samples",
            batch.timestamps.len()
        );
        Ok((b, t))
    }

    /// The frames the LLM sees: a [B, K, T] selection (soft in grounding training, one-hot
    /// otherwise), the per-sample hard frame indices, and p(t) where there is one.
    fn frame_features(batch: &Batch) -> Result<&Tensor> {
        batch
            .frame_features
            .as_ref()
            .ok_or_else(|| anyhow!("batch {}: no frame features (the loader was asked for none)", batch.index))
    }

    fn prompts(batch: &Batch) -> Result<&PromptTokens> {
        batch.prompts.as_ref().ok_or_else(|| {
            anyhow!(
                "batch {}: no tokenized prompts (give the loader the model's prompt_encoder)",
                batch.index
            )
        })
    }

    fn select(&self, batch: &Batch, train: Option<(&RefCell<SeededRng>, Ctx)>) -> Result<Selection> {
        let (b, t) = self.check_batch(batch)?;
        let k = self.cfg.moments();
        let dev = self.device();
        match self.cfg.mode {
            Mode::Uniform => {
                let idx = uniform_indices(t, k, self.cfg.uniform_rule);
                let rows = vec![idx; b];
                Ok(Selection {
                    matrix: one_hot_selection(&rows, t, DType::F32, &dev)?,
                    frames: rows,
                    curve: None,
                    centres: None,
                    reg: None,
                    con: None,
                })
            }
            Mode::Oracle => {
                // Gaussians at the top-K pseudo-label frames (the store's, when made for this K),
                // then their hard top-K.
                let peaks = match batch.pseudo_labels_for(k) {
                    Some(labels) => labels.to_vec(),
                    None => hard_topk(&batch.pseudo_label_scores, k)?,
                };
                let centres: Vec<f32> = peaks.iter().flatten().map(|&i| i as f32 / (t - 1) as f32).collect();
                let centres = Tensor::from_vec(centres, (b, k), &dev)?;
                let p = gaussian_mixture(&centres, t, self.cfg.grounding.width)?;
                let (frames, matrix) = hard_selection(&p, k)?;
                Ok(Selection {
                    matrix,
                    frames,
                    curve: Some(p),
                    centres: Some(centres),
                    reg: None,
                    con: None,
                })
            }
            Mode::Grounding => {
                let g = self
                    .grounding
                    .as_ref()
                    .ok_or_else(|| anyhow!("grounding mode without a grounding module"))?;
                let inputs = GroundingInputs {
                    frames: &batch.clip_frames,
                    question: &batch.clip_question,
                    options: batch.clip_options.as_ref(),
                    answer_ids: batch.clip_options.as_ref().and(batch.answer_indices.as_deref()),
                    answer: &batch.clip_event,
                    pseudo_label_scores: &batch.pseudo_label_scores,
                    pseudo_labels: batch.pseudo_labels_for(k),
                };
                match train {
                    Some((rng, ctx)) => {
                        // L_con's negatives are the other options: training needs the answers.
                        ensure!(
                            batch.clip_options.is_none() || batch.answer_indices.is_some(),
                            "batch {}: options without the answers' indices",
                            batch.index
                        );
                        let out = g
                            .forward_train(&inputs, TopkNoises::from_rng(rng), ctx)
                            .map_err(|e| name_rows(e, batch))?;
                        let (frames, _) = hard_selection(&out.frame_scores.detach(), k)?;
                        Ok(Selection {
                            matrix: out.selection,
                            frames,
                            curve: Some(out.frame_scores),
                            centres: Some(out.gaussian_centres),
                            reg: Some(out.regression.total()?),
                            con: Some(out.contrastive),
                        })
                    }
                    None => {
                        let pred = g
                            .predict(&batch.clip_frames, &batch.clip_question, batch.clip_options.as_ref())
                            .map_err(|e| name_rows(e, batch))?;
                        Ok(Selection {
                            matrix: pred.selection,
                            frames: pred.moments,
                            curve: Some(pred.frame_scores),
                            centres: Some(pred.gaussian_centres),
                            reg: None,
                            con: None,
                        })
                    }
                }
            }
        }
    }

    /// Visual tokens for the LLM from a selection.
    fn visual_tokens(&self, batch: &Batch, sel: &Selection, prompts: &PromptTokens, ctx: Ctx) -> Result<Tensor> {
        let features = Self::frame_features(batch)?;
        let (b, t, n, dv) = features.dims4()?;
        let k = self.cfg.moments();
        let dt = self.lmm.post_layernorm.weight.dtype();
        let normed = self.lmm.normalize_features(&features.to_dtype(dt)?)?; // [B, T, N, Dv]
        let chosen = if sel.matrix.track_op() {
            // Soft selection: mix the T frames (gradients reach p through the perturbed top-k).
            let m = sel.matrix.to_dtype(normed.dtype())?;
            m.matmul(&normed.reshape((b, t, n * dv))?)?.reshape((b, k, n, dv))?
        } else {
            // Hard selection: gather the frames.
            let idx: Vec<u32> = sel
                .frames
                .iter()
                .enumerate()
                .flat_map(|(bi, r)| r.iter().map(move |&f| (bi * t + f) as u32))
                .collect();
            let idx = Tensor::from_vec(idx, b * k, normed.device())?;
            normed.reshape((b * t, n, dv))?.index_select(&idx, 0)?.reshape((b, k, n, dv))?
        };
        self.lmm
            .visual_tokens(&chosen, Some(&normed), &prompts.qformer_ids, &prompts.qformer_mask, ctx)
    }

    /// The batch with frame features: its own, or (the online ViT) the frozen ViT's on its
    /// decoded frames, computed as `gcg features` computes them — one video at a time,
    /// `vit_frame_batch` frames per pass, rounded to f16 as the store keeps them — so a run on
    /// decoded frames sees the features a store would hold.
    pub fn with_frame_features<'b>(&self, batch: &'b Batch) -> Result<std::borrow::Cow<'b, Batch>> {
        let (None, Some(px)) = (&batch.frame_features, &batch.pixel_values) else {
            return Ok(std::borrow::Cow::Borrowed(batch));
        };
        let (b, t, _, _, _) = px.dims5().context("batch pixel values must be [B, T, 3, S, S]")?;
        let dt = self.lmm.post_layernorm.weight.dtype();
        let vit_dt = match &self.lmm.vision {
            Some(v) => v.post_layernorm.weight.dtype(),
            None => bail!(
                "batch {}: decoded frames but no ViT to run on them (build the model with `[data] online_vit = true`)",
                batch.index
            ),
        };
        let step = self.vit_frame_batch.max(1);
        let mut videos = Vec::with_capacity(b);
        for i in 0..b {
            let frames = px.get(i)?; // [T, 3, S, S]
            let mut parts = Vec::new();
            for start in (0..t).step_by(step) {
                let chunk = frames.narrow(0, start, step.min(t - start))?.to_dtype(vit_dt)?;
                parts.push(self.lmm.encode_pixels(&chunk)?.to_dtype(DType::F16)?);
            }
            videos.push(Tensor::cat(&parts, 0)?.to_dtype(dt)?.detach()); // [T, N, Dv]
        }
        let mut out = batch.clone();
        out.frame_features = Some(Tensor::stack(&videos, 0)?); // [B, T, N, Dv]
        Ok(std::borrow::Cow::Owned(out))
    }

    /// A training step's forward: the three losses and their weighted sum.
    pub fn forward_train(&self, batch: &Batch, rng: &RefCell<SeededRng>) -> Result<Losses> {
        let batch = &*self.with_frame_features(batch)?;
        let ctx = Ctx::train(rng);
        let sel = self.select(batch, Some((rng, ctx)))?;
        let prompts = Self::prompts(batch)?;
        let visual = self.visual_tokens(batch, &sel, prompts, ctx)?;
        let inputs = self.lmm.llm_inputs(&visual, &prompts.t5_ids, &prompts.t5_mask)?;
        let labels = &prompts.target_labels;
        let vqa = self.lmm.loss(&inputs, labels, ctx)?.to_dtype(DType::F32)?;
        let mut total = vqa.clone();
        if let Some(r) = &sel.reg {
            total = (total + (r.to_dtype(DType::F32)? * self.cfg.alpha_reg)?)?;
        }
        if let Some(c) = &sel.con {
            total = (total + (c.to_dtype(DType::F32)? * self.cfg.alpha_con)?)?;
        }
        Ok(Losses {
            vqa,
            reg: sel.reg,
            con: sel.con,
            total,
        })
    }

    /// A grounding warm-up step's forward (grounding mode only): the generator's weak losses
    /// α1·L_reg + α2·L_con from the pseudo-labels, without the language model (`vqa` is 0 and
    /// carries no gradient). The language model's frames are not needed, so no LLM runs.
    pub fn forward_grounding(&self, batch: &Batch, rng: &RefCell<SeededRng>) -> Result<Losses> {
        ensure!(
            self.cfg.mode == Mode::Grounding,
            "the grounding warm-up needs mode = grounding (this model is in {} mode)",
            self.cfg.mode.name()
        );
        let sel = self.select(batch, Some((rng, Ctx::train(rng))))?;
        let (Some(reg), Some(con)) = (sel.reg, sel.con) else {
            bail!("grounding mode returned no grounding losses");
        };
        let (reg, con) = (reg.to_dtype(DType::F32)?, con.to_dtype(DType::F32)?);
        let total = ((&reg * self.cfg.alpha_reg)? + (&con * self.cfg.alpha_con)?)?;
        Ok(Losses {
            vqa: Tensor::zeros((), DType::F32, &self.device())?,
            reg: Some(reg),
            con: Some(con),
            total,
        })
    }

    /// Deterministic answers with their grounding.
    pub fn answer(&self, batch: &Batch) -> Result<Vec<Answered>> {
        let _inference = crate::nn::inference(self.lmm.t5.dtype());
        let batch = &*self.with_frame_features(batch)?;
        let ctx = Ctx::eval();
        let sel = self.select(batch, None)?;
        let prompts = Self::prompts(batch)?;
        let visual = self.visual_tokens(batch, &sel, prompts, ctx)?;
        let inputs = self.lmm.llm_inputs(&visual, &prompts.t5_ids, &prompts.t5_mask)?;
        let mc = batch.samples.iter().all(|s| s.is_multiple_choice());
        let open = batch.samples.iter().all(|s| !s.is_multiple_choice());
        ensure!(
            mc || open,
            "batch {}: it mixes multiple-choice and open-ended questions",
            batch.index
        );
        let preds = match (&self.cfg.answer, mc) {
            (AnswerMethod::OptionScoring, true) => {
                let options = prompts
                    .option_ids
                    .as_ref()
                    .ok_or_else(|| anyhow!("batch {}: multiple choice without tokenized options", batch.index))?;
                let scores = self.lmm.score_options(&inputs, options)?;
                let rows: Vec<usize> = (0..scores.len()).filter(|&i| scores[i].iter().any(|x| !x.is_finite())).collect();
                if !rows.is_empty() {
                    let tensor = "the option scores (T5 log-likelihoods of each option)";
                    return Err(name_rows(NonFiniteRows { tensor, rows }.into(), batch));
                }
                Self::best_options(scores, &batch.samples)
            }
            (AnswerMethod::OptionScoring, false) => self.generated_answers(batch, &inputs, 1, OPEN_ENDED_MAX_NEW_TOKENS)?,
            (AnswerMethod::Generate { num_beams, max_new_tokens }, _) => {
                self.generated_answers(batch, &inputs, *num_beams, *max_new_tokens)?
            }
        };
        let curves: Option<Vec<Vec<f32>>> = match &sel.curve {
            Some(p) => Some(p.detach().to_dtype(DType::F32)?.to_vec2::<f32>()?),
            None => None,
        };
        let mut out = Vec::with_capacity(batch.len());
        for (i, (s, pred)) in batch.samples.iter().zip(preds).enumerate() {
            let frames = sel.frames[i].clone();
            let seconds = frames
                .iter()
                .map(|&f| batch.timestamps[i].get(f).copied().unwrap_or(f64::NAN))
                .collect();
            out.push(Answered {
                key: s.key.clone(),
                prediction: pred.answer,
                generated: pred.generated,
                option_scores: pred.option_scores,
                frames,
                seconds,
                curve: curves.as_ref().map(|c| c[i].clone()),
            });
        }
        Ok(out)
    }

    /// Option scoring: the highest-scoring option of each question, the first of equal ones (as
    /// `torch.argmax`; `max_by` alone keeps the last); empty options (a TrafficQA question with
    /// fewer than four candidates) are never chosen.
    fn best_options(scores: Vec<Vec<f32>>, samples: &[QaSample]) -> Vec<Prediction> {
        scores
            .into_iter()
            .zip(samples)
            .map(|(row, s)| {
                let best = row
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| s.options.get(*j).is_none_or(|o| !o.is_empty()))
                    .rev()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(i, _)| i);
                Prediction {
                    answer: data::Answer::Choice(best),
                    generated: None,
                    option_scores: Some(row),
                }
            })
            .collect()
    }

    /// Decoded answers (greedy when `num_beams` = 1), read as an option letter or text for a
    /// multiple-choice question.
    fn generated_answers(&self, batch: &Batch, inputs: &LlmInputs, num_beams: usize, max_new_tokens: usize) -> Result<Vec<Prediction>> {
        let gen = GenerateConfig {
            max_new_tokens,
            num_beams,
            ..Default::default()
        };
        let out = self.lmm.generate(inputs, &gen)?;
        let vocab = self.tokenizers.t5.vocab_size() as u32;
        let mut preds = Vec::with_capacity(batch.len());
        for (s, ids) in batch.samples.iter().zip(out) {
            // Ids past the tokenizer's vocabulary (T5's padded embedding rows) decode to nothing.
            let ids: Vec<u32> = ids.into_iter().filter(|&i| i < vocab).collect();
            let text = self.tokenizers.t5.decode(&ids, true)?;
            preds.push(Prediction {
                answer: read_generated(s, &text),
                generated: Some(text),
                option_scores: None,
            });
        }
        Ok(preds)
    }
}

/// Longest generated answer to an open-ended question under option scoring.
const OPEN_ENDED_MAX_NEW_TOKENS: usize = 30;

/// One question's answer before its grounding is attached.
struct Prediction {
    answer: data::Answer,
    generated: Option<String>,
    option_scores: Option<Vec<f32>>,
}

/// A generated text as an answer to `s`: for multiple choice, the option letter it names, or the
/// option whose text it is (else the text, which matches no option).
/// A [`NonFiniteRows`] error told in the batch's words: which questions of which videos.
fn name_rows(e: anyhow::Error, batch: &Batch) -> anyhow::Error {
    let Some(nf) = e.downcast_ref::<NonFiniteRows>() else { return e };
    let named: Vec<String> = nf
        .rows
        .iter()
        .filter_map(|&r| batch.samples.get(r))
        .map(|s| format!("question {} (video {})", s.key, s.video))
        .collect();
    let more = named.len().saturating_sub(3);
    anyhow!(
        "batch {}: {} are not finite for {}{}; the stored inputs were checked finite when read, so the model's \
         weights are not (did training diverge?)",
        batch.index,
        nf.tensor,
        named[..named.len().min(3)].join(", "),
        if more > 0 { format!(" and {more} more") } else { String::new() }
    )
}

fn read_generated(s: &QaSample, text: &str) -> data::Answer {
    if !s.is_multiple_choice() {
        return data::Answer::Text(text.to_string());
    }
    let said = text.trim();
    match data::OPTION_LETTERS.iter().position(|l| *l == said) {
        Some(i) if i < s.options.len() => data::Answer::Choice(i),
        _ => match s.options.iter().position(|o| o.trim() == said) {
            Some(i) => data::Answer::Choice(i),
            None => data::Answer::Text(text.to_string()),
        },
    }
}

struct Selection {
    /// [B, K, T]
    matrix: Tensor,
    /// Hard frame indices per sample, sorted by time.
    frames: Vec<Vec<usize>>,
    /// p(t) [B, T]
    curve: Option<Tensor>,
    #[allow(dead_code)]
    centres: Option<Tensor>,
    reg: Option<Tensor>,
    con: Option<Tensor>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_options_never_pick_an_empty_option() {
        let q = |options: &[&str]| QaSample {
            dataset: data::Dataset::TrafficQa,
            key: "1".into(),
            qid: "1".into(),
            video: "v".into(),
            question: "q".into(),
            options: options.iter().map(|o| o.to_string()).collect(),
            answer: data::Answer::Choice(0),
            qtype: "U".into(),
            extra: Default::default(),
        };
        let samples = [
            q(&["Yes", "No", "", ""]),
            q(&["a", "b", "c", "d"]),
            q(&["", "x", "", "y"]),
            // Equal scores: the first of them, as torch.argmax([-1, -0.5, -0.5, -2]) = 1.
            q(&["a", "b", "c", "d"]),
            q(&["", "x", "", "y"]),
            q(&["a", "b", "c", "d"]),
        ];
        let scores = vec![
            vec![-3.0, -2.0, -0.5, -0.1],
            vec![-3.0, -2.0, -0.5, -0.1],
            vec![-0.1, -2.0, -0.2, -1.0],
            vec![-1.0, -0.5, -0.5, -2.0],
            vec![0.0, -1.0, 0.0, -1.0],
            vec![0.25; 4],
        ];
        let picks: Vec<data::Answer> = GcgModel::best_options(scores, &samples).into_iter().map(|p| p.answer).collect();
        assert_eq!(picks, [1, 3, 3, 1, 1, 0].map(data::Answer::Choice));
    }

    #[test]
    fn uniform_rules() {
        assert_eq!(uniform_indices(32, 4, UniformRule::OfficialTruncate), vec![0, 10, 20, 31]);
        assert_eq!(uniform_indices(32, 4, UniformRule::Round), vec![0, 10, 21, 31]);
        assert_eq!(uniform_indices(8, 1, UniformRule::Round), vec![0]);
    }

    #[test]
    fn official_truncation_equals_torch_linspace_int() {
        // torch.linspace(0, T-1, K, dtype=torch.int).tolist(), printed by PyTorch 2.15.
        let cases: Vec<(usize, usize, Vec<usize>)> = vec![
            (2, 1, vec![0]),
            (2, 2, vec![0, 1]),
            (3, 1, vec![0]),
            (3, 2, vec![0, 2]),
            (3, 3, vec![0, 1, 2]),
            (5, 1, vec![0]),
            (5, 2, vec![0, 4]),
            (5, 3, vec![0, 2, 4]),
            (5, 4, vec![0, 1, 2, 4]),
            (5, 5, vec![0, 1, 2, 3, 4]),
            (6, 1, vec![0]),
            (6, 2, vec![0, 5]),
            (6, 3, vec![0, 2, 5]),
            (6, 4, vec![0, 1, 3, 5]),
            (6, 5, vec![0, 1, 2, 3, 5]),
            (6, 6, vec![0, 1, 2, 3, 4, 5]),
            (7, 1, vec![0]),
            (7, 2, vec![0, 6]),
            (7, 3, vec![0, 3, 6]),
            (7, 4, vec![0, 2, 4, 6]),
            (7, 5, vec![0, 1, 3, 4, 6]),
            (7, 6, vec![0, 1, 2, 3, 4, 6]),
            (7, 7, vec![0, 1, 2, 3, 4, 5, 6]),
            (8, 1, vec![0]),
            (8, 2, vec![0, 7]),
            (8, 3, vec![0, 3, 7]),
            (8, 4, vec![0, 2, 4, 7]),
            (8, 5, vec![0, 1, 3, 5, 7]),
            (8, 6, vec![0, 1, 2, 4, 5, 7]),
            (8, 7, vec![0, 1, 2, 3, 4, 5, 7]),
            (8, 8, vec![0, 1, 2, 3, 4, 5, 6, 7]),
            (9, 1, vec![0]),
            (9, 2, vec![0, 8]),
            (9, 3, vec![0, 4, 8]),
            (9, 4, vec![0, 2, 5, 8]),
            (9, 5, vec![0, 2, 4, 6, 8]),
            (9, 6, vec![0, 1, 3, 4, 6, 8]),
            (9, 7, vec![0, 1, 2, 4, 5, 6, 8]),
            (9, 8, vec![0, 1, 2, 3, 4, 5, 6, 8]),
            (9, 9, vec![0, 1, 2, 3, 4, 5, 6, 7, 8]),
            (10, 1, vec![0]),
            (10, 2, vec![0, 9]),
            (10, 3, vec![0, 4, 9]),
            (10, 4, vec![0, 3, 6, 9]),
            (10, 5, vec![0, 2, 4, 6, 9]),
            (10, 6, vec![0, 1, 3, 5, 7, 9]),
            (10, 7, vec![0, 1, 3, 4, 6, 7, 9]),
            (10, 8, vec![0, 1, 2, 3, 5, 6, 7, 9]),
            (10, 9, vec![0, 1, 2, 3, 4, 5, 6, 7, 9]),
            (12, 1, vec![0]),
            (12, 2, vec![0, 11]),
            (12, 3, vec![0, 5, 11]),
            (12, 4, vec![0, 3, 7, 11]),
            (12, 5, vec![0, 2, 5, 8, 11]),
            (12, 6, vec![0, 2, 4, 6, 8, 11]),
            (12, 7, vec![0, 1, 3, 5, 7, 9, 11]),
            (12, 8, vec![0, 1, 3, 4, 6, 7, 9, 11]),
            (12, 9, vec![0, 1, 2, 4, 5, 6, 8, 9, 11]),
            (16, 1, vec![0]),
            (16, 2, vec![0, 15]),
            (16, 3, vec![0, 7, 15]),
            (16, 4, vec![0, 5, 10, 15]),
            (16, 5, vec![0, 3, 7, 11, 15]),
            (16, 6, vec![0, 3, 6, 9, 12, 15]),
            (16, 7, vec![0, 2, 5, 7, 10, 12, 15]),
            (16, 8, vec![0, 2, 4, 6, 8, 10, 12, 15]),
            (16, 9, vec![0, 1, 3, 5, 7, 9, 11, 13, 15]),
            (20, 1, vec![0]),
            (20, 2, vec![0, 19]),
            (20, 3, vec![0, 9, 19]),
            (20, 4, vec![0, 6, 12, 19]),
            (20, 5, vec![0, 4, 9, 14, 19]),
            (20, 6, vec![0, 3, 7, 11, 15, 19]),
            (20, 7, vec![0, 3, 6, 9, 12, 15, 19]),
            (20, 8, vec![0, 2, 5, 8, 10, 13, 16, 19]),
            (20, 9, vec![0, 2, 4, 7, 9, 11, 14, 16, 19]),
            (24, 1, vec![0]),
            (24, 2, vec![0, 23]),
            (24, 3, vec![0, 11, 23]),
            (24, 4, vec![0, 7, 15, 23]),
            (24, 5, vec![0, 5, 11, 17, 23]),
            (24, 6, vec![0, 4, 9, 13, 18, 23]),
            (24, 7, vec![0, 3, 7, 11, 15, 19, 23]),
            (24, 8, vec![0, 3, 6, 9, 13, 16, 19, 23]),
            (24, 9, vec![0, 2, 5, 8, 11, 14, 17, 20, 23]),
            (32, 1, vec![0]),
            (32, 2, vec![0, 31]),
            (32, 3, vec![0, 15, 31]),
            (32, 4, vec![0, 10, 20, 31]),
            (32, 5, vec![0, 7, 15, 23, 31]),
            (32, 6, vec![0, 6, 12, 18, 24, 31]),
            (32, 7, vec![0, 5, 10, 15, 20, 25, 31]),
            (32, 8, vec![0, 4, 8, 13, 17, 22, 26, 31]),
            (32, 9, vec![0, 3, 7, 11, 15, 19, 23, 27, 31]),
            (33, 1, vec![0]),
            (33, 2, vec![0, 32]),
            (33, 3, vec![0, 16, 32]),
            (33, 4, vec![0, 10, 21, 32]),
            (33, 5, vec![0, 8, 16, 24, 32]),
            (33, 6, vec![0, 6, 12, 19, 25, 32]),
            (33, 7, vec![0, 5, 10, 16, 21, 26, 32]),
            (33, 8, vec![0, 4, 9, 13, 18, 22, 27, 32]),
            (33, 9, vec![0, 4, 8, 12, 16, 20, 24, 28, 32]),
            (48, 1, vec![0]),
            (48, 2, vec![0, 47]),
            (48, 3, vec![0, 23, 47]),
            (48, 4, vec![0, 15, 31, 47]),
            (48, 5, vec![0, 11, 23, 35, 47]),
            (48, 6, vec![0, 9, 18, 28, 37, 47]),
            (48, 7, vec![0, 7, 15, 23, 31, 39, 47]),
            (48, 8, vec![0, 6, 13, 20, 26, 33, 40, 47]),
            (48, 9, vec![0, 5, 11, 17, 23, 29, 35, 41, 47]),
            (64, 1, vec![0]),
            (64, 2, vec![0, 63]),
            (64, 3, vec![0, 31, 63]),
            (64, 4, vec![0, 21, 42, 63]),
            (64, 5, vec![0, 15, 31, 47, 63]),
            (64, 6, vec![0, 12, 25, 37, 50, 63]),
            (64, 7, vec![0, 10, 21, 31, 42, 52, 63]),
            (64, 8, vec![0, 9, 18, 27, 36, 45, 54, 63]),
            (64, 9, vec![0, 7, 15, 23, 31, 39, 47, 55, 63]),
            (100, 1, vec![0]),
            (100, 2, vec![0, 99]),
            (100, 3, vec![0, 49, 99]),
            (100, 4, vec![0, 33, 66, 99]),
            (100, 5, vec![0, 24, 49, 74, 99]),
            (100, 6, vec![0, 19, 39, 59, 79, 99]),
            (100, 7, vec![0, 16, 33, 49, 66, 82, 99]),
            (100, 8, vec![0, 14, 28, 42, 56, 70, 84, 99]),
            (100, 9, vec![0, 12, 24, 37, 49, 61, 74, 86, 99]),
            (128, 1, vec![0]),
            (128, 2, vec![0, 127]),
            (128, 3, vec![0, 63, 127]),
            (128, 4, vec![0, 42, 84, 127]),
            (128, 5, vec![0, 31, 63, 95, 127]),
            (128, 6, vec![0, 25, 50, 76, 101, 127]),
            (128, 7, vec![0, 21, 42, 63, 84, 105, 127]),
            (128, 8, vec![0, 18, 36, 54, 72, 90, 108, 127]),
            (128, 9, vec![0, 15, 31, 47, 63, 79, 95, 111, 127]),
        ];
        for (t, k, want) in cases {
            assert_eq!(uniform_indices(t, k, UniformRule::OfficialTruncate), want, "T={t} K={k}");
        }
    }
}
