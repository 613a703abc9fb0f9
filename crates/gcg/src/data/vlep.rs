//! VLEP (video-and-language event prediction, Lei et al., EMNLP 2020):
//! `vlep_{train,dev}_release.jsonl` — JSON Lines of
//! `{"example_id": int, "vid_name": str, "ts": [start, end] (the premise event, seconds),
//! "events": [two possible future events], "answer": 0 | 1, "split": str}`.
//!
//! The task has no question text: the two events are the options and every sample asks
//! [`QUESTION`]. The sample key and qid are the `example_id`; the video is `vid_name`; the premise
//! window (`start`, `end`) and `split` are kept in [`QaSample::extra`]; there are no question
//! types. `vlep_test_release.jsonl` holds no answers (they are scored by the VLEP CodaLab server)
//! and is refused with a message saying so.

use super::read::{read_jsonl, Annotations, BadRow, OJson, ReadOptions, RowSink, UniqueSamples};
use super::{Answer, Dataset, QaSample};
use anyhow::{anyhow, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Options (future events) per example.
pub const NUM_OPTIONS: usize = 2;

/// The question every VLEP sample asks (VLEP itself has none; LMM VideoQA code bases pose the
/// task as this multiple-choice question).
pub const QUESTION: &str = "Which event is more likely to happen right after";

/// Read a VLEP split strictly.
pub fn read(path: &Path) -> Result<Vec<QaSample>> {
    Ok(read_with(path, &ReadOptions::strict())?.samples)
}

/// Read a VLEP split; with `skip_bad_rows` malformed lines are reported and left out.
pub fn read_with(path: &Path, opts: &ReadOptions) -> Result<Annotations> {
    let lines = read_jsonl(path)?;
    let mut sink = RowSink::new(opts);
    let mut samples = UniqueSamples::new();
    for (line, parsed) in lines {
        match parsed.and_then(|row| parse_row(path, line, &row)) {
            Ok(s) => samples.push(&mut sink, s, format!("line {line}"), "example_id", |m| {
                BadRow::new(path, m).line(line).column("example_id")
            })?,
            Err(b) => sink.reject(b)?,
        }
    }
    if samples.is_empty(&sink) {
        return Err(anyhow!(BadRow::new(path, "no examples (an empty file)")));
    }
    Ok(samples.finish(sink))
}

fn parse_row(path: &Path, line: u64, row: &OJson) -> Result<QaSample, BadRow> {
    let bad = |col: &str, reason: String| BadRow::new(path, reason).line(line).column(col);
    let found = |f: &str| row.get(f).map(OJson::preview).unwrap_or_else(|| "nothing".into());
    if !matches!(row, OJson::Obj(_)) {
        return Err(BadRow::new(path, format!("expected an example object, found {}", row.kind())).line(line));
    }
    let id = match row.get("example_id") {
        Some(OJson::Int(i)) if *i >= 0 => i.to_string(),
        Some(OJson::Str(s)) if !s.trim().is_empty() => s.trim().to_string(),
        _ => return Err(bad("example_id", format!("expected the example id, found {}", found("example_id")))),
    };
    let video = row
        .get("vid_name")
        .and_then(OJson::as_str)
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| bad("vid_name", format!("expected the video name, found {}", found("vid_name"))))?
        .to_string();
    let window = match row.get("ts") {
        Some(OJson::Arr(a)) if a.len() == 2 => {
            let t: Vec<f64> = a.iter().filter_map(OJson::as_f64).filter(|x| x.is_finite() && *x >= 0.0).collect();
            match t[..] {
                [s, e] if e >= s => [s, e],
                _ => {
                    return Err(bad(
                        "ts",
                        format!("expected [start, end] in seconds, 0 <= start <= end, found {}", found("ts")),
                    ))
                }
            }
        }
        _ => return Err(bad("ts", format!("expected [start, end] in seconds, found {}", found("ts")))),
    };
    let options: Vec<String> = match row.get("events") {
        Some(OJson::Arr(a)) if a.len() == NUM_OPTIONS => {
            let t: Vec<String> = a
                .iter()
                .filter_map(OJson::as_str)
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            if t.len() != NUM_OPTIONS {
                return Err(bad(
                    "events",
                    format!("expected {NUM_OPTIONS} event texts, found {}", found("events")),
                ));
            }
            t
        }
        _ => {
            return Err(bad(
                "events",
                format!("expected {NUM_OPTIONS} event texts, found {}", found("events")),
            ))
        }
    };
    let answer = match row.get("answer") {
        Some(OJson::Int(a)) if (0..NUM_OPTIONS as i64).contains(a) => *a as usize,
        None => {
            return Err(bad(
                "answer",
                "missing answer (vlep_test_release.jsonl holds no answers; its predictions are scored by the VLEP \
                 CodaLab server)"
                    .into(),
            ))
        }
        Some(_) => return Err(bad("answer", format!("expected 0 or 1, found {}", found("answer")))),
    };
    let mut extra = BTreeMap::new();
    extra.insert("start".to_string(), window[0].to_string());
    extra.insert("end".to_string(), window[1].to_string());
    if let Some(split) = row.get("split").and_then(OJson::as_str) {
        extra.insert("split".to_string(), split.to_string());
    }
    Ok(QaSample {
        dataset: Dataset::Vlep,
        key: id.clone(),
        qid: id,
        video,
        question: QUESTION.to_string(),
        options,
        answer: Answer::Choice(answer),
        qtype: String::new(),
        extra,
    })
}
