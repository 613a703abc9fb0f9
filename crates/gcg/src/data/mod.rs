//! VideoQA datasets: one question as a [`QaSample`], whatever benchmark it comes from.
//!
//! Readers for the published annotation formats (NExT-QA, NExT-GQA, IntentQA, Causal-VidQA,
//! STAR, SUTD-TrafficQA, VLEP, the open-ended JSON sets) turn files into samples; [`batch`] turns samples + the feature store into
//! the one [`Batch`] the model reads, with the prompts tokenized ([`prompt`]).
//!
//! Every reader has a strict form (`read`: the first malformed row is an error naming the file,
//! line and column, see [`BadRow`]) and `read_with(.., &ReadOptions)`, which with
//! `skip_bad_rows` collects the malformed rows into [`Annotations::bad_rows`] and goes on.

pub mod batch;
pub mod causalvidqa;
pub mod intentqa;
mod mc_csv;
pub mod nextgqa;
pub mod nextqa;
pub mod open_ended;
pub mod prompt;
pub mod read;
pub mod star;
pub mod trafficqa;
pub mod vlep;

pub use batch::{collate_unlabelled, Batch, BatchLoader, BatchOptions, PixelSource};
pub use mc_csv::{NEXTQA_TYPES, NUM_OPTIONS};
pub use prompt::{AnswerFormat, PromptEncoder, PromptTokens, TextTokenizers};
pub use read::{Annotations, BadRow, ReadOptions};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The benchmarks gcg reads. In files (the run config) kebab-case (`next-qa`, `traffic-qa`, ...)
/// or the command-line [`name`](Self::name) (`nextqa`, `trafficqa`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dataset {
    #[serde(alias = "nextqa")]
    NextQa,
    #[serde(alias = "nextgqa")]
    NextGqa,
    #[serde(alias = "intentqa")]
    IntentQa,
    #[serde(alias = "causalvidqa")]
    CausalVidQa,
    /// STAR (situated reasoning; `STAR_{train,val}.json`).
    Star,
    /// SUTD-TrafficQA (`R2_all.jsonl`, `R3_{train,test}.jsonl`).
    #[serde(alias = "trafficqa", alias = "sutd-trafficqa")]
    TrafficQa,
    /// VLEP (video-and-language event prediction; `vlep_{train,dev}_release.jsonl`).
    Vlep,
    /// MSVD-QA, MSRVTT-QA, ActivityNet-QA, ...
    OpenEnded,
}

/// The answer of a question: an option index (multiple choice) or a text (open-ended). In JSON a
/// non-negative integer or a string; anything else is an error that says what was found.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum Answer {
    Choice(usize),
    Text(String),
}

impl<'de> Deserialize<'de> for Answer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct AnswerVisitor;
        impl serde::de::Visitor<'_> for AnswerVisitor {
            type Value = Answer;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an option index (a non-negative integer) or an answer text")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Answer, E> {
                usize::try_from(v)
                    .map(Answer::Choice)
                    .map_err(|_| E::custom(format!("option index {v} is too large")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Answer, E> {
                match u64::try_from(v) {
                    Ok(u) => self.visit_u64(u),
                    Err(_) => Err(E::custom(format!("option index {v} is negative"))),
                }
            }
            /// A number written as a float: a whole one is its integer (`1.0`, `1e0`, `-0`; Python's
            /// scripts compare them equal to the index), others are named as what they are.
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Answer, E> {
                if !v.is_finite() || v.fract() != 0.0 {
                    return Err(E::custom(format!("option index {v} is not a whole number")));
                }
                if v < 0.0 {
                    return Err(E::custom(format!("option index {v} is negative")));
                }
                // Exact below 2^53; anything that large is no option index anyway.
                if v >= 9_007_199_254_740_992.0 {
                    return Err(E::custom(format!("option index {v:e} is too large")));
                }
                Ok(Answer::Choice(v as usize))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Answer, E> {
                Ok(Answer::Text(v.to_string()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> std::result::Result<Answer, E> {
                Ok(Answer::Text(v))
            }
        }
        d.deserialize_any(AnswerVisitor)
    }
}

/// One question about one video.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QaSample {
    pub dataset: Dataset,
    /// Unique within a split: `"{video}_{qid}"` for the NExT family (their `qid` repeats across
    /// videos), the dataset's own id otherwise.
    pub key: String,
    /// The question id as the annotation file writes it.
    pub qid: String,
    /// The video id (the feature store's key).
    pub video: String,
    /// The question text without a trailing question mark.
    pub question: String,
    /// The candidate answers (empty for open-ended questions).
    pub options: Vec<String>,
    pub answer: Answer,
    /// The question type as annotated (NExT-QA: CW, CH, TN, TC, TP, DC, DL, DO; Causal-VidQA:
    /// D, E, PA, PR, CA, CR; STAR: Interaction, Sequence, Prediction, Feasibility; TrafficQA:
    /// U, A, F, R, C, I; VLEP: empty; open-ended: the category / type id, or empty).
    pub qtype: String,
    /// Further columns of the annotation: `frame_count`, `width`, `height` (NExT family),
    /// `action`, `lemma`, `lemma_id` (IntentQA), `category`, `part` and, for reason questions,
    /// `given_answer` (Causal-VidQA), `start`, `end` (seconds: STAR's question clip, VLEP's
    /// premise event), `template` (STAR), `vid_id`, `vid_filename`, `perspective`, `candidates`
    /// (TrafficQA), `split` (VLEP).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, String>,
}

impl QaSample {
    /// The answer's text (the option text for multiple choice).
    pub fn answer_text(&self) -> &str {
        match &self.answer {
            Answer::Choice(i) => self.options.get(*i).map(String::as_str).unwrap_or(""),
            Answer::Text(t) => t,
        }
    }

    pub fn is_multiple_choice(&self) -> bool {
        !self.options.is_empty()
    }

    /// Whether `prediction` is scored as this question's answer. An option index must equal the
    /// annotation's, except in NExT-GQA, whose files give the answer as a text: there every
    /// option with that text is right (test 3842638015_4 has a3 = a4 = "happy"; the row's
    /// answer index is only the first of them, and NExT-QA's own index for it is 4).
    pub fn accepts(&self, prediction: &Answer) -> bool {
        if *prediction == self.answer {
            return true;
        }
        match (self.dataset, prediction, &self.answer) {
            (Dataset::NextGqa, Answer::Choice(p), Answer::Choice(a)) => {
                matches!((self.options.get(*p), self.options.get(*a)), (Some(x), Some(y)) if x == y)
            }
            _ => false,
        }
    }
}

impl Dataset {
    /// The name used on the command line and in files: `nextqa`, `nextgqa`, `intentqa`,
    /// `causalvidqa`, `star`, `trafficqa`, `vlep`, `open-ended`.
    pub fn name(self) -> &'static str {
        match self {
            Dataset::NextQa => "nextqa",
            Dataset::NextGqa => "nextgqa",
            Dataset::IntentQa => "intentqa",
            Dataset::CausalVidQa => "causalvidqa",
            Dataset::Star => "star",
            Dataset::TrafficQa => "trafficqa",
            Dataset::Vlep => "vlep",
            Dataset::OpenEnded => "open-ended",
        }
    }

    /// Every dataset's [`name`](Self::name), for messages.
    pub const NAMES: [&'static str; 8] = [
        "nextqa",
        "nextgqa",
        "intentqa",
        "causalvidqa",
        "star",
        "trafficqa",
        "vlep",
        "open-ended",
    ];

    pub fn from_name(name: &str) -> Option<Self> {
        let n = name.to_ascii_lowercase().replace(['-', '_'], "");
        Some(match n.as_str() {
            "nextqa" => Dataset::NextQa,
            "nextgqa" => Dataset::NextGqa,
            "intentqa" => Dataset::IntentQa,
            "causalvidqa" => Dataset::CausalVidQa,
            "star" => Dataset::Star,
            "trafficqa" | "sutdtrafficqa" => Dataset::TrafficQa,
            "vlep" => Dataset::Vlep,
            "openended" | "msvdqa" | "msrvttqa" | "activitynetqa" => Dataset::OpenEnded,
            _ => return None,
        })
    }
}

impl std::str::FromStr for Dataset {
    type Err = anyhow::Error;
    /// [`Dataset::from_name`]: case, `-` and `_` do not matter; the open-ended sets' own names
    /// (`msvd-qa`, `msrvtt-qa`, `activitynet-qa`) read as `open-ended`, `sutd-trafficqa` as
    /// `trafficqa`.
    fn from_str(s: &str) -> Result<Self> {
        Self::from_name(s).ok_or_else(|| anyhow::anyhow!("unknown dataset {s:?} (expected {})", Dataset::NAMES.join(", ")))
    }
}

impl std::fmt::Display for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Read the annotations of any benchmark: a CSV file for the NExT family, the QA directory for
/// Causal-VidQA (all its videos; use [`causalvidqa::read_with`] for a split), the split's JSON
/// file for STAR, its JSON Lines file for TrafficQA and VLEP, a JSON file for the open-ended
/// sets.
pub fn read_annotations(dataset: Dataset, path: &Path, opts: &ReadOptions) -> Result<Annotations> {
    match dataset {
        Dataset::NextQa => nextqa::read_with(path, opts),
        Dataset::NextGqa => nextgqa::read_with(path, opts),
        Dataset::IntentQa => intentqa::read_with(path, opts),
        Dataset::CausalVidQa => causalvidqa::read_with(path, None, opts),
        Dataset::Star => star::read_with(path, opts),
        Dataset::TrafficQa => trafficqa::read_with(path, opts),
        Dataset::Vlep => vlep::read_with(path, opts),
        Dataset::OpenEnded => open_ended::read_with(path, opts),
    }
}

/// The files of one split: its annotations, optionally the list of its videos (Causal-VidQA's
/// `split/{train,val,test}.pkl`, a JSON list or one id a line: only these videos' questions), and
/// NExT-GQA's grounding spans (`gsub_{val,test}.json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitFiles {
    pub annotations: std::path::PathBuf,
    pub videos: Option<std::path::PathBuf>,
    pub grounding: Option<std::path::PathBuf>,
}

impl SplitFiles {
    /// Just an annotation file (every question in it).
    pub fn annotations(path: impl Into<std::path::PathBuf>) -> Self {
        Self {
            annotations: path.into(),
            videos: None,
            grounding: None,
        }
    }

    /// The split's questions: the annotations, restricted to the listed videos when a list is
    /// given (an error when no question is left).
    pub fn read(&self, dataset: Dataset, opts: &ReadOptions) -> Result<Annotations> {
        let Some(list) = &self.videos else {
            return read_annotations(dataset, &self.annotations, opts);
        };
        let videos = causalvidqa::read_split(list)?;
        let mut ann = match dataset {
            Dataset::CausalVidQa => causalvidqa::read_with(&self.annotations, Some(&videos), opts)?,
            _ => {
                let keep: std::collections::HashSet<&str> = videos.iter().map(String::as_str).collect();
                let mut a = read_annotations(dataset, &self.annotations, opts)?;
                a.samples.retain(|s| keep.contains(s.video.as_str()));
                a
            }
        };
        ann.samples.shrink_to_fit();
        anyhow::ensure!(
            !ann.samples.is_empty(),
            "{} has no questions of the {} videos listed in {}",
            self.annotations.display(),
            videos.len(),
            list.display()
        );
        Ok(ann)
    }
}

/// The option letters of the prompt.
pub const OPTION_LETTERS: [&str; 5] = ["A", "B", "C", "D", "E"];

/// The LLM prompt of the official code (SPEC §2.6):
/// `Question: {q}?\nOptions: \nA: {a0} \nB: {a1} ...\nAnswer: ` for multiple choice and
/// `Question: {q}?\nAnswer: ` for open-ended questions (empty options are left out). The target
/// is the option letter (or the answer text).
pub fn prompt(sample: &QaSample) -> String {
    let mut s = format!("Question: {}?\n", sample.question.trim_end_matches('?'));
    if sample.is_multiple_choice() {
        s.push_str("Options: ");
        for (i, o) in sample.options.iter().enumerate() {
            // An empty option (a TrafficQA question with fewer than four candidates) is not
            // shown; the others keep their letters.
            if o.is_empty() {
                continue;
            }
            let letter = OPTION_LETTERS.get(i).copied().unwrap_or("?");
            s.push_str(&format!("\n{letter}: {o} "));
        }
        // The official template ends the last option with "\nAnswer: " directly after its text.
        if s.ends_with(' ') {
            s.pop();
        }
        s.push('\n');
    }
    s.push_str("Answer: ");
    s
}

/// The training target text: the option letter, or the answer text.
pub fn target(sample: &QaSample) -> String {
    match &sample.answer {
        Answer::Choice(i) => OPTION_LETTERS.get(*i).copied().unwrap_or("?").to_string(),
        Answer::Text(t) => t.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_read_whole_numbers_however_written_and_name_the_rest() {
        let read = |json: &str| serde_json::from_str::<Answer>(json).map_err(|e| e.to_string());
        for (json, want) in [("3", 3), ("3.0", 3), ("1e0", 1), ("-0", 0), ("-0.0", 0), ("4e1", 40)] {
            assert_eq!(read(json), Ok(Answer::Choice(want)), "{json}");
        }
        assert_eq!(read("\"happy\""), Ok(Answer::Text("happy".into())));
        for (json, says) in [
            ("1.5", "option index 1.5 is not a whole number"),
            ("-1", "option index -1 is negative"),
            ("-2.0", "option index -2 is negative"),
            ("18446744073709551616", "option index 1.8446744073709552e19 is too large"),
            ("1e300", "is too large"),
            ("true", "expected an option index (a non-negative integer) or an answer text"),
        ] {
            let e = read(json).unwrap_err();
            assert!(e.contains(says), "{json}: {e}");
        }
    }

    #[test]
    fn prompt_matches_the_official_template() {
        let s = QaSample {
            dataset: Dataset::NextQa,
            key: "1_0".into(),
            qid: "0".into(),
            video: "1".into(),
            question: "why did the boy pick up the present".into(),
            options: ["share", "unwrap it", "c", "d", "e"].iter().map(|x| x.to_string()).collect(),
            answer: Answer::Choice(1),
            qtype: "CW".into(),
            extra: Default::default(),
        };
        // finetune_ans.py: 'Question: ' + question + '?' + f'\nOptions: \nA: {a0} \nB: {a1} \nC: {a2} \nD: {a3} \nE: {a4}' + '\nAnswer: '
        let want = "Question: why did the boy pick up the present?\nOptions: \nA: share \nB: unwrap it \nC: c \nD: d \nE: e\nAnswer: ";
        assert_eq!(prompt(&s), want);
        assert_eq!(target(&s), "B");
        assert_eq!(s.answer_text(), "unwrap it");
        let open = QaSample {
            options: vec![],
            answer: Answer::Text("dog".into()),
            ..s
        };
        assert_eq!(prompt(&open), "Question: why did the boy pick up the present?\nAnswer: ");
        assert_eq!(target(&open), "dog");
    }
}
