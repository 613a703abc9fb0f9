//! SUTD-TrafficQA (Xu et al., CVPR 2021): `R2_all.jsonl`, `R3_train.jsonl`, `R3_test.jsonl` —
//! JSON Lines whose rows are JSON lists,
//! `[record_id, vid_id, vid_filename, perspective, q_body, q_type, option0, option1, option2,
//! option3, answer]` (ints: record_id, vid_id, perspective 1 | 3, answer 0–3), the first line
//! being that header as a list of strings.
//!
//! The question types (`q_type`): U basic understanding, A attribution, F event forecasting,
//! R reverse reasoning, C counterfactual inference, I introspection. A question with fewer than
//! four candidates has empty option texts; they stay in their slots (every question has four
//! options, so the questions of a split stack into one batch), and the answer must name a
//! non-empty one. The video is the file name without its extension (`b_1a4411B7sb_clip_005`);
//! the sample key and qid are the `record_id`; `vid_id`, `vid_filename`, `perspective` and the
//! number of non-empty candidates (`candidates`) are kept in [`QaSample::extra`].

use super::read::{read_jsonl, Annotations, BadRow, OJson, ReadOptions, RowSink, UniqueSamples};
use super::{Answer, Dataset, QaSample};
use anyhow::{anyhow, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Candidate slots per question.
pub const NUM_OPTIONS: usize = 4;

/// The question types and what they ask, in the paper's order.
pub const TRAFFICQA_TYPES: [(&str, &str); 6] = [
    ("U", "basic understanding"),
    ("A", "attribution"),
    ("F", "event forecasting"),
    ("R", "reverse reasoning"),
    ("C", "counterfactual inference"),
    ("I", "introspection"),
];

/// The header row (line 1 of the released files).
pub const HEADER: [&str; 11] = [
    "record_id",
    "vid_id",
    "vid_filename",
    "perspective",
    "q_body",
    "q_type",
    "option0",
    "option1",
    "option2",
    "option3",
    "answer",
];

/// Read a TrafficQA annotation file strictly.
pub fn read(path: &Path) -> Result<Vec<QaSample>> {
    Ok(read_with(path, &ReadOptions::strict())?.samples)
}

/// Read a TrafficQA annotation file; with `skip_bad_rows` malformed rows are reported and left
/// out.
pub fn read_with(path: &Path, opts: &ReadOptions) -> Result<Annotations> {
    let lines = read_jsonl(path)?;
    let mut sink = RowSink::new(opts);
    let mut samples = UniqueSamples::new();
    for (k, (line, parsed)) in lines.into_iter().enumerate() {
        let row = match parsed {
            Ok(r) => r,
            Err(b) => {
                sink.reject(b)?;
                continue;
            }
        };
        if k == 0 && is_header(&row) {
            continue;
        }
        match parse_row(path, line, &row) {
            Ok(s) => samples.push(&mut sink, s, format!("line {line}"), "record_id", |m| {
                BadRow::new(path, m).line(line).column("0 (record_id)")
            })?,
            Err(b) => sink.reject(b)?,
        }
    }
    if samples.is_empty(&sink) {
        return Err(anyhow!(BadRow::new(path, "no questions (an empty file, or only the header)")));
    }
    Ok(samples.finish(sink))
}

fn is_header(row: &OJson) -> bool {
    matches!(row, OJson::Arr(a) if a.first().and_then(OJson::as_str) == Some(HEADER[0]))
}

fn parse_row(path: &Path, line: u64, row: &OJson) -> Result<QaSample, BadRow> {
    let bad = |i: usize, reason: String| BadRow::new(path, reason).line(line).column(format!("{i} ({})", HEADER[i]));
    let OJson::Arr(f) = row else {
        return Err(BadRow::new(path, format!("expected a list [{}], found {}", HEADER.join(", "), row.kind())).line(line));
    };
    if f.len() != HEADER.len() {
        return Err(BadRow::new(
            path,
            format!("expected {} fields [{}], found {}", HEADER.len(), HEADER.join(", "), f.len()),
        )
        .line(line));
    }
    let int = |i: usize| -> Result<i64, BadRow> {
        match &f[i] {
            OJson::Int(x) if *x >= 0 => Ok(*x),
            OJson::Str(s) if s.trim().parse::<i64>().is_ok_and(|x| x >= 0) => Ok(s.trim().parse::<i64>().unwrap_or_default()),
            other => Err(bad(i, format!("expected a non-negative integer, found {}", other.preview()))),
        }
    };
    let text = |i: usize| -> Result<String, BadRow> {
        f[i].as_str()
            .map(|s| s.trim().to_string())
            .ok_or_else(|| bad(i, format!("expected a text, found {}", f[i].preview())))
    };
    let non_empty = |i: usize| -> Result<String, BadRow> {
        let t = text(i)?;
        if t.is_empty() {
            Err(bad(i, "expected a text, found an empty one".into()))
        } else {
            Ok(t)
        }
    };

    let record_id = int(0)?.to_string();
    let vid_id = int(1)?.to_string();
    let vid_filename = non_empty(2)?;
    let video = match vid_filename.rsplit_once('.') {
        Some((stem, _)) if !stem.is_empty() => stem.to_string(),
        _ => vid_filename.clone(),
    };
    let perspective = int(3)?;
    if perspective != 1 && perspective != 3 {
        return Err(bad(
            3,
            format!("expected 1 (first person) or 3 (third person), found {perspective}"),
        ));
    }
    let question = non_empty(4)?.trim_end_matches('?').trim_end().to_string();
    let qtype = non_empty(5)?;
    if !TRAFFICQA_TYPES.iter().any(|(t, _)| *t == qtype) {
        let known: Vec<String> = TRAFFICQA_TYPES.iter().map(|(t, d)| format!("{t} ({d})")).collect();
        return Err(bad(
            5,
            format!("expected a question type among {}, found `{qtype}`", known.join(", ")),
        ));
    }
    let options = (6..6 + NUM_OPTIONS).map(text).collect::<Result<Vec<_>, _>>()?;
    let answer = match &f[10] {
        OJson::Int(a) if (0..NUM_OPTIONS as i64).contains(a) => *a as usize,
        other => {
            return Err(bad(
                10,
                format!("expected an option index 0-{}, found {}", NUM_OPTIONS - 1, other.preview()),
            ))
        }
    };
    if options[answer].is_empty() {
        return Err(bad(10, format!("the answer is option{answer}, which is empty")));
    }
    let candidates = options.iter().filter(|o| !o.is_empty()).count();
    if candidates < 2 {
        return Err(bad(6, format!("expected at least 2 non-empty options, found {candidates}")));
    }

    let mut extra = BTreeMap::new();
    extra.insert("vid_id".to_string(), vid_id);
    extra.insert("vid_filename".to_string(), vid_filename);
    extra.insert("perspective".to_string(), perspective.to_string());
    extra.insert("candidates".to_string(), candidates.to_string());
    Ok(QaSample {
        dataset: Dataset::TrafficQa,
        key: record_id.clone(),
        qid: record_id,
        video,
        question,
        options,
        answer: Answer::Choice(answer),
        qtype,
        extra,
    })
}
