//! STAR (situated reasoning in real-world videos, Wu et al., NeurIPS 2021): `STAR_train.json`,
//! `STAR_val.json` — one JSON list of questions,
//! `{"question_id": "Interaction_T1_13", "question", "video_id" (a Charades id), "start", "end"
//! (the question's clip of the video, seconds), "answer" (the TEXT of the right choice),
//! "choices": [{"choice_id", "choice", ...} × 4], "question_program", "situations", ...}`.
//!
//! The question type is the `question_id` up to its first `_` (Interaction, Sequence,
//! Prediction, Feasibility), as the benchmark's own code splits it (`run_program.py`'s
//! `split_by_qtype`); the template (`T1`, ...) is the next part. The options are the choices in
//! `choice_id` order (0–3); the answer is the choice whose text equals `answer`. `start` / `end`,
//! the template and the (numeric) part after it are kept in [`QaSample::extra`]. The sample key
//! and qid are the `question_id` (unique in a split). `STAR_test.json` holds no answers and is
//! refused with a message saying so.

use super::read::{read_json_file, Annotations, BadRow, OJson, ReadOptions, RowSink, UniqueSamples};
use super::{Answer, Dataset, QaSample};
use anyhow::{anyhow, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Choices per question.
pub const NUM_OPTIONS: usize = 4;

/// The four question types, in the order the benchmark reports them.
pub const STAR_TYPES: [&str; 4] = ["Interaction", "Sequence", "Prediction", "Feasibility"];

/// Read a STAR split strictly.
pub fn read(path: &Path) -> Result<Vec<QaSample>> {
    Ok(read_with(path, &ReadOptions::strict())?.samples)
}

/// Read a STAR split; with `skip_bad_rows` malformed questions are reported and left out.
pub fn read_with(path: &Path, opts: &ReadOptions) -> Result<Annotations> {
    let json = read_json_file(path)?;
    let OJson::Arr(entries) = json else {
        return Err(anyhow!(BadRow::new(
            path,
            format!("expected a list of STAR questions, found {}", json.kind())
        )));
    };
    let mut sink = RowSink::new(opts);
    let mut samples = UniqueSamples::new();
    for (i, e) in entries.iter().enumerate() {
        match parse_entry(path, i, e) {
            Ok(s) => samples.push(&mut sink, s, format!("entry {i}"), "question_id", |m| {
                BadRow::new(path, m).entry(format!("entry {i}")).column("question_id")
            })?,
            Err(b) => sink.reject(b)?,
        }
    }
    Ok(samples.finish(sink))
}

fn parse_entry(path: &Path, i: usize, e: &OJson) -> Result<QaSample, BadRow> {
    if !matches!(e, OJson::Obj(_)) {
        return Err(BadRow::new(path, format!("expected a question object, found {}", e.kind())).entry(format!("entry {i}")));
    }
    // Name the question in errors once its id is known.
    let id = e.get("question_id").and_then(OJson::as_str).map(str::to_string);
    let entry = match &id {
        Some(q) => format!("entry {i} ({q})"),
        None => format!("entry {i}"),
    };
    let bad = |col: &str, reason: String| BadRow::new(path, reason).entry(&entry).column(col);
    let found = |v: Option<&OJson>| v.map(OJson::preview).unwrap_or_else(|| "nothing".into());

    let Some(qid) = id.filter(|q| !q.is_empty()) else {
        return Err(bad(
            "question_id",
            format!(
                "expected the question id (e.g. \"Interaction_T1_13\"), found {}",
                found(e.get("question_id"))
            ),
        ));
    };
    let mut parts = qid.split('_');
    let qtype = parts.next().unwrap_or_default().to_string();
    if !STAR_TYPES.contains(&qtype.as_str()) {
        return Err(bad(
            "question_id",
            format!(
                "the question type (the id up to its first `_`) is `{qtype}`, expected one of {}",
                STAR_TYPES.join(", ")
            ),
        ));
    }
    let template = parts.next().unwrap_or_default().to_string();

    let video = e
        .get("video_id")
        .and_then(OJson::as_id)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| bad("video_id", format!("expected the video id, found {}", found(e.get("video_id")))))?;
    let question = e
        .get("question")
        .and_then(OJson::as_str)
        .map(|q| q.trim().trim_end_matches('?').trim_end().to_string())
        .filter(|q| !q.is_empty())
        .ok_or_else(|| {
            bad(
                "question",
                format!("expected the question text, found {}", found(e.get("question"))),
            )
        })?;
    let mut window = [0.0f64; 2];
    for (k, field) in ["start", "end"].iter().enumerate() {
        window[k] = match e.get(field).and_then(OJson::as_f64) {
            Some(x) if x.is_finite() && x >= 0.0 => x,
            _ => {
                return Err(bad(
                    field,
                    format!("expected a time in seconds (>= 0), found {}", found(e.get(field))),
                ))
            }
        };
    }
    if window[1] < window[0] {
        return Err(bad(
            "end",
            format!("the clip ends ({}) before it starts ({})", window[1], window[0]),
        ));
    }

    let options = choices(e.get("choices")).map_err(|reason| bad("choices", reason))?;
    let answer_text = match e.get("answer") {
        Some(OJson::Str(a)) => a.trim().to_string(),
        None => {
            return Err(bad(
                "answer",
                "missing answer (STAR_test.json holds no answers; its predictions are scored by the STAR \
                 challenge server)"
                    .into(),
            ))
        }
        Some(other) => return Err(bad("answer", format!("expected the answer text, found {}", other.preview()))),
    };
    let answer = options.iter().position(|o| *o == answer_text).ok_or_else(|| {
        bad(
            "answer",
            format!("the answer {answer_text:?} equals none of the choices {options:?}"),
        )
    })?;

    let mut extra = BTreeMap::new();
    extra.insert("start".to_string(), window[0].to_string());
    extra.insert("end".to_string(), window[1].to_string());
    extra.insert("template".to_string(), template);
    Ok(QaSample {
        dataset: Dataset::Star,
        key: qid.clone(),
        qid,
        video,
        question,
        options,
        answer: Answer::Choice(answer),
        qtype,
        extra,
    })
}

/// The choices' texts in `choice_id` order; the ids must be 0–3, each once.
fn choices(v: Option<&OJson>) -> std::result::Result<Vec<String>, String> {
    let Some(OJson::Arr(list)) = v else {
        return Err(format!(
            "expected a list of {NUM_OPTIONS} choices {{choice_id, choice}}, found {}",
            v.map(OJson::preview).unwrap_or_else(|| "nothing".into())
        ));
    };
    if list.len() != NUM_OPTIONS {
        return Err(format!("expected {NUM_OPTIONS} choices, found {}", list.len()));
    }
    let mut options: Vec<Option<String>> = vec![None; NUM_OPTIONS];
    for (k, c) in list.iter().enumerate() {
        let id = match c.get("choice_id") {
            Some(OJson::Int(id)) if (0..NUM_OPTIONS as i64).contains(id) => *id as usize,
            other => {
                return Err(format!(
                    "choice {k}: expected a choice_id 0-{}, found {}",
                    NUM_OPTIONS - 1,
                    other.map(OJson::preview).unwrap_or_else(|| "nothing".into())
                ))
            }
        };
        let text = match c.get("choice").and_then(OJson::as_str).map(str::trim) {
            Some(t) if !t.is_empty() => t.to_string(),
            _ => {
                return Err(format!(
                    "choice {k}: expected the choice text, found {}",
                    c.get("choice").map(OJson::preview).unwrap_or_else(|| "nothing".into())
                ))
            }
        };
        if options[id].is_some() {
            return Err(format!("choice {k}: choice_id {id} appears twice"));
        }
        options[id] = Some(text);
    }
    Ok(options.into_iter().map(Option::unwrap_or_default).collect())
}
