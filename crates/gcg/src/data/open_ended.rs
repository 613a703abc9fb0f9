//! Open-ended VideoQA in the published JSON formats:
//!
//! * MSVD-QA / MSRVTT-QA (`{train,val,test}_qa.json`): a list of
//!   `{"answer": str, "id": int, "question": str, "video_id": int[, "category_id": int]}`;
//! * ActivityNet-QA: `{split}_q.json` = list of `{"video_name", "question", "question_id"}` and
//!   `{split}_a.json` = list of `{"answer", "type", "question_id"}`, joined on `question_id`
//!   (give the `_q.json` path; the `_a.json` beside it is read too).
//!
//! Ids and video ids may be written as numbers or strings; they become strings. The sample key
//! is the question id; the type is `category_id` / `type` when present.

use super::read::{read_json_file, Annotations, BadRow, OJson, ReadOptions, RowSink, UniqueSamples};
use super::{Answer, Dataset, QaSample};
use anyhow::{anyhow, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const ID_FIELDS: [&str; 3] = ["id", "question_id", "qid"];
const VIDEO_FIELDS: [&str; 3] = ["video_id", "video_name", "video"];
const TYPE_FIELDS: [&str; 2] = ["category_id", "type"];

pub fn read(path: &Path) -> Result<Vec<QaSample>> {
    Ok(read_with(path, &ReadOptions::strict())?.samples)
}

pub fn read_with(path: &Path, opts: &ReadOptions) -> Result<Annotations> {
    let json = read_json_file(path)?;
    let OJson::Arr(entries) = json else {
        return Err(anyhow!(BadRow::new(
            path,
            format!("expected a list of questions, found {}", json.kind())
        )));
    };
    let mut sink = RowSink::new(opts);
    // ActivityNet-QA: the answers are in the `_a.json` file next to the `_q.json` one.
    let answers = match answers_file(path) {
        Some(a) if entries.iter().all(|e| e.get("answer").is_none()) => Some(read_answers(&a, &mut sink)?),
        _ => None,
    };
    let mut samples = UniqueSamples::new();
    for (i, e) in entries.iter().enumerate() {
        let bad = |col: &str, reason: String| BadRow::new(path, reason).entry(format!("entry {i}")).column(col);
        let parsed = (|| -> Result<QaSample, BadRow> {
            if !matches!(e, OJson::Obj(_)) {
                return Err(BadRow::new(path, format!("expected an object, found {}", e.kind())).entry(format!("entry {i}")));
            }
            let id =
                first_id(e, &ID_FIELDS).ok_or_else(|| bad(&ID_FIELDS.join("|"), "expected a question id (string or integer)".into()))?;
            let video =
                first_id(e, &VIDEO_FIELDS).ok_or_else(|| bad(&VIDEO_FIELDS.join("|"), "expected a video id (string or integer)".into()))?;
            let question = e
                .get("question")
                .and_then(OJson::as_str)
                .map(|q| q.trim().trim_end_matches('?').trim_end().to_string())
                .filter(|q| !q.is_empty())
                .ok_or_else(|| bad("question", "expected the question text".into()))?;
            let (answer, qtype) = match &answers {
                Some(map) => map
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| bad("question_id", format!("question {id} has no entry in the answers file")))?,
                None => {
                    let a = e.get("answer").ok_or_else(|| bad("answer", "missing answer".into()))?;
                    let a = answer_text(a).ok_or_else(|| bad("answer", format!("expected the answer text, found {}", a.preview())))?;
                    (a, first_id(e, &TYPE_FIELDS).unwrap_or_default())
                }
            };
            Ok(QaSample {
                dataset: Dataset::OpenEnded,
                key: id.clone(),
                qid: id,
                video,
                question,
                options: Vec::new(),
                answer: Answer::Text(answer),
                qtype,
                extra: BTreeMap::new(),
            })
        })();
        match parsed {
            Ok(s) => samples.push(&mut sink, s, format!("entry {i}"), "question id", |m| bad("id", m))?,
            Err(b) => sink.reject(b)?,
        }
    }
    Ok(samples.finish(sink))
}

/// `test_q.json` → `test_a.json` when that file exists.
fn answers_file(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    let stem = name.strip_suffix("_q.json")?;
    let a = path.with_file_name(format!("{stem}_a.json"));
    a.is_file().then_some(a)
}

fn read_answers(path: &Path, sink: &mut RowSink) -> Result<HashMap<String, (String, String)>> {
    let json = read_json_file(path)?;
    let OJson::Arr(entries) = json else {
        return Err(anyhow!(BadRow::new(
            path,
            format!("expected a list of answers, found {}", json.kind())
        )));
    };
    let mut map = HashMap::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let bad = |col: &str, reason: String| BadRow::new(path, reason).entry(format!("entry {i}")).column(col);
        let Some(id) = first_id(e, &ID_FIELDS) else {
            sink.reject(bad("question_id", "expected a question id".into()))?;
            continue;
        };
        let Some(answer) = e.get("answer").and_then(answer_text) else {
            sink.reject(bad("answer", "expected the answer text".into()))?;
            continue;
        };
        let qtype = first_id(e, &TYPE_FIELDS).unwrap_or_default();
        map.insert(id, (answer, qtype));
    }
    Ok(map)
}

fn first_id(e: &OJson, fields: &[&str]) -> Option<String> {
    fields
        .iter()
        .find_map(|f| e.get(f))
        .and_then(OJson::as_id)
        .filter(|s| !s.is_empty())
}

fn answer_text(a: &OJson) -> Option<String> {
    match a {
        OJson::Str(s) => Some(s.trim().to_string()),
        OJson::Int(i) => Some(i.to_string()),
        _ => None,
    }
}
