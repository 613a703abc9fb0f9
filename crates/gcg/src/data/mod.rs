//! VideoQA datasets: one question as a [`QaSample`], whatever benchmark it comes from.
//!
//! Readers for the published annotation formats (NExT-QA, NExT-GQA, IntentQA, Causal-VidQA, the
//! open-ended JSON sets) turn files into samples; batching turns samples + the feature store into
//! model inputs.

use serde::{Deserialize, Serialize};

/// The benchmarks gcg reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dataset {
    NextQa,
    NextGqa,
    IntentQa,
    CausalVidQa,
    /// MSVD-QA, MSRVTT-QA, ActivityNet-QA, ...
    OpenEnded,
}

/// The answer of a question: an option index (multiple choice) or a text (open-ended).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Answer {
    Choice(usize),
    Text(String),
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
    /// The question type as annotated (NExT-QA: CW, CH, TN, TC, TP, DC, DL, DO; ...).
    pub qtype: String,
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
}

/// The option letters of the prompt.
pub const OPTION_LETTERS: [&str; 5] = ["A", "B", "C", "D", "E"];

/// The LLM prompt of the official code (SPEC §2.6):
/// `Question: {q}?\nOptions: \nA: {a0} \nB: {a1} ...\nAnswer: ` for multiple choice and
/// `Question: {q}?\nAnswer: ` for open-ended questions. The target is the option letter (or the
/// answer text).
pub fn prompt(sample: &QaSample) -> String {
    let mut s = format!("Question: {}?\n", sample.question.trim_end_matches('?'));
    if sample.is_multiple_choice() {
        s.push_str("Options: ");
        for (i, o) in sample.options.iter().enumerate() {
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
