//! IntentQA: the NExT-QA columns (`video_id` first, answer as an option index) plus `action`,
//! `lemma` (and `lemma_id` in the release), kept in `QaSample::extra`. Types: CW, CH, TN, TP
//! (the reader accepts all NExT-QA types).

use super::mc_csv::{read_mc_csv, AnswerColumn, McCsvFormat, NEXTQA_TYPES};
use super::read::{Annotations, ReadOptions};
use super::{Dataset, QaSample};
use anyhow::Result;
use std::path::Path;

const FORMAT: McCsvFormat = McCsvFormat {
    dataset: Dataset::IntentQa,
    video_columns: &["video_id", "video"],
    answer: AnswerColumn::Index,
    extra_required: &["action", "lemma"],
    extra_optional: &["lemma_id"],
    types: &NEXTQA_TYPES,
};

/// Read an IntentQA split (`train.csv`, `val.csv`, `test.csv`).
pub fn read(path: &Path) -> Result<Vec<QaSample>> {
    Ok(read_with(path, &ReadOptions::strict())?.samples)
}

pub fn read_with(path: &Path, opts: &ReadOptions) -> Result<Annotations> {
    read_mc_csv(path, &FORMAT, opts)
}
