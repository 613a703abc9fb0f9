//! The prompt and target of each question as token ids: what the language model reads and
//! learns to write. Tokenized once per batch, by the batch workers ([`super::batch`]).

use super::{prompt, target, QaSample, OPTION_LETTERS};
use crate::text::{QFormerTokenizer, T5Tokenizer, TruncationSide};
use anyhow::Result;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// What the language model is trained to write for a multiple-choice question, and what option
/// scoring scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AnswerFormat {
    /// The option letter (A–E), as the official code.
    #[default]
    Letter,
    /// The option's text (a language model trained from scratch learns this far sooner than to
    /// point at a letter; used by the demo).
    Text,
}

/// Longest option text (in T5 tokens) that option scoring scores.
const MAX_OPTION_TOKENS: usize = 32;

/// The two tokenizers of the video LMM: the Q-Former's instruction and the T5's prompt/target.
pub struct TextTokenizers {
    pub qformer: QFormerTokenizer,
    pub t5: T5Tokenizer,
}

/// A batch of prompts and targets as ids. [B, L] each.
#[derive(Debug, Clone)]
pub struct PromptTokens {
    /// The Q-Former instruction (the prompt, left-truncated) and its mask (u32).
    pub qformer_ids: Tensor,
    pub qformer_mask: Tensor,
    /// The T5 encoder's prompt and its mask (u32).
    pub t5_ids: Tensor,
    pub t5_mask: Tensor,
    /// The target ids for L_vqa (i64; −100 at padding, ignored by the loss).
    pub target_labels: Tensor,
    /// Multiple choice: each option's scored text (letter or option text, by the answer format)
    /// as T5 ids, per sample.
    pub option_ids: Option<Vec<Vec<Vec<u32>>>>,
}

impl PromptTokens {
    fn to_device(&self, dev: &Device) -> Result<Self> {
        Ok(Self {
            qformer_ids: self.qformer_ids.to_device(dev)?,
            qformer_mask: self.qformer_mask.to_device(dev)?,
            t5_ids: self.t5_ids.to_device(dev)?,
            t5_mask: self.t5_mask.to_device(dev)?,
            target_labels: self.target_labels.to_device(dev)?,
            option_ids: self.option_ids.clone(),
        })
    }

    /// The same ids on `dev`.
    pub fn into_device(self, dev: &Device) -> Result<Self> {
        if dev.is_cpu() {
            Ok(self)
        } else {
            self.to_device(dev)
        }
    }
}

/// The official prompt template and the answer format, tokenized.
#[derive(Clone)]
pub struct PromptEncoder {
    pub tokenizers: std::sync::Arc<TextTokenizers>,
    pub answer_format: AnswerFormat,
}

impl PromptEncoder {
    /// What the language model learns to write for `s`.
    pub fn target_text(&self, s: &QaSample) -> String {
        match (self.answer_format, s.is_multiple_choice()) {
            (AnswerFormat::Text, true) => s.answer_text().to_string(),
            _ => target(s),
        }
    }

    /// What option scoring scores for option `i` of `s`.
    pub fn option_text<'a>(&self, s: &'a QaSample, i: usize) -> &'a str {
        match self.answer_format {
            AnswerFormat::Letter => OPTION_LETTERS[i.min(OPTION_LETTERS.len() - 1)],
            AnswerFormat::Text => s.options[i].as_str(),
        }
    }

    /// Prompts, targets and (multiple choice) options of `samples` as ids on the CPU.
    pub fn encode(&self, samples: &[QaSample]) -> Result<PromptTokens> {
        let dev = Device::Cpu;
        let tok = &self.tokenizers;
        let prompts: Vec<String> = samples.iter().map(prompt).collect();
        let q = tok.qformer.encode_batch(&prompts)?;
        let t = tok.t5.encode_inputs(&prompts)?;
        let targets: Vec<String> = samples.iter().map(|s| self.target_text(s)).collect();
        let tb = tok.t5.encode_targets(&targets)?;
        let pad = tok.t5.pad_id();
        let labels: Vec<i64> = tb
            .input_ids
            .iter()
            .flatten()
            .map(|&x| if x == pad { -100 } else { x as i64 })
            .collect();
        let option_ids = if !samples.is_empty() && samples.iter().all(QaSample::is_multiple_choice) {
            let ids = samples
                .iter()
                .map(|s| {
                    (0..s.options.len())
                        .map(|i| tok.t5.encode(self.option_text(s, i), TruncationSide::Right, MAX_OPTION_TOKENS))
                        .collect::<Result<Vec<_>>>()
                })
                .collect::<Result<Vec<_>>>()?;
            Some(ids)
        } else {
            None
        };
        Ok(PromptTokens {
            qformer_ids: q.ids_tensor(&dev)?,
            qformer_mask: q.mask_tensor(&dev)?,
            t5_ids: t.ids_tensor(&dev)?,
            t5_mask: t.mask_tensor(&dev)?,
            target_labels: Tensor::from_vec(labels, (tb.batch_size(), tb.seq_len()), &dev)?,
            option_ids,
        })
    }
}
