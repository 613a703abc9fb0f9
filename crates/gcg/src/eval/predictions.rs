//! Prediction files: JSONL, one question a line —
//! `{"qid", "video", "prediction", "type"?, "answer"?, "span"?, "moments"?, "curve"?}`.
//!
//! `prediction` / `answer` are an option index (multiple choice) or a text (open-ended); `span` is
//! the predicted evidence `[start, end]` in seconds; `moments` the selected frames (indices into
//! the sampled frames and their times); `curve` the grounding curve p(t) over the sampled frames.
//! A question is identified by `(video, qid)`. A file that is one JSON document instead — an
//! array of such rows, or the official scripts' result object `{"<video>_<qid>": {"prediction",
//! "answer"}}` — is read as its rows.
//!
//! A file gcg writes has a sidecar `FILE.meta.json`, its [`Provenance`]: what wrote it (run
//! directory, weights and their hash, annotations, store, a hash of the model's config). The
//! JSONL itself stays plain, so files of other tools read the same; gcg resumes a file only when
//! the sidecar matches the model that would continue it ([`PredictionWriter::open`]).

use crate::data::{Answer, QaSample};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The key moments the model selected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    /// Indices into the sampled frames.
    pub frames: Vec<usize>,
    /// Their times in seconds.
    pub seconds: Vec<f64>,
}

/// One line of a prediction file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionRow {
    #[serde(deserialize_with = "string_or_int")]
    pub qid: String,
    #[serde(deserialize_with = "string_or_int")]
    pub video: String,
    #[serde(rename = "type", default)]
    pub qtype: String,
    pub prediction: Answer,
    /// The annotated answer, written by gcg for reading the file alone; optional on reading (the
    /// annotations are what is scored against; a row whose answer differs is reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<Answer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span: Option<[f64; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moments: Option<Moments>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub curve: Option<Vec<f64>>,
}

impl PredictionRow {
    /// A row for `sample` with its annotated answer and type; grounding fields unset.
    pub fn for_sample(sample: &QaSample, prediction: Answer) -> Self {
        Self {
            qid: sample.qid.clone(),
            video: sample.video.clone(),
            qtype: sample.qtype.clone(),
            prediction,
            answer: Some(sample.answer.clone()),
            span: None,
            moments: None,
            curve: None,
        }
    }

    /// `(video, qid)`, the key that joins predictions and annotations.
    pub fn key(&self) -> (String, String) {
        (self.video.clone(), self.qid.clone())
    }

    /// What makes a row unusable whatever the annotations say.
    fn check(&self) -> std::result::Result<(), String> {
        if self.qid.is_empty() || self.video.is_empty() {
            return Err("empty qid or video".into());
        }
        if let Some([a, b]) = self.span {
            if !a.is_finite() || !b.is_finite() {
                return Err(format!("span [{a}, {b}] is not finite"));
            }
        }
        if let Some(m) = &self.moments {
            if m.frames.len() != m.seconds.len() {
                return Err(format!("moments: {} frames but {} times", m.frames.len(), m.seconds.len()));
            }
        }
        Ok(())
    }
}

/// A `qid` or `video`: a string or an integer (NExT-QA's ids are both); anything else is an
/// error saying what was found ("invalid type: floating point `1.5`, expected a string or an
/// integer id").
fn string_or_int<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    struct IdVisitor;
    impl serde::de::Visitor<'_> for IdVisitor {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a string or an integer id")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(IdVisitor)
}

/// A line of a prediction file that could not be used, or that disagrees with the annotations.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    /// 1-based line in the prediction file.
    pub line: u64,
    pub kind: ProblemKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    /// Not a valid row (JSON, fields, values); ignored.
    Malformed,
    /// A second row for a question; ignored (the first one counts).
    Duplicate,
    /// The question is not in the annotations; ignored.
    Unknown,
    /// The prediction does not fit the question (text for multiple choice, index out of range);
    /// ignored, so the question counts as missing.
    Invalid,
    /// The row's `answer` differs from the annotation; the annotation is used.
    AnswerMismatch,
    /// The row's `type` differs from the annotation's question type (a file of another split or
    /// dataset?); the annotation's is used.
    TypeMismatch,
    /// The span cannot be a moment of the video (reversed, before its start, past its end); the
    /// row is scored as given, as the official scripts would, and reported (`--strict` fails).
    Implausible,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            ProblemKind::Malformed => "malformed",
            ProblemKind::Duplicate => "duplicate",
            ProblemKind::Unknown => "unknown question",
            ProblemKind::Invalid => "invalid prediction",
            ProblemKind::AnswerMismatch => "answer mismatch",
            ProblemKind::TypeMismatch => "type mismatch",
            ProblemKind::Implausible => "implausible span",
        };
        write!(f, "line {}: {kind}: {}", self.line, self.message)
    }
}

/// A prediction file as read: the usable rows with their line numbers, and the problems.
#[derive(Debug, Clone, Default)]
pub struct PredictionFile {
    pub path: PathBuf,
    pub rows: Vec<(u64, PredictionRow)>,
    pub problems: Vec<Problem>,
    /// Later rows of a video and question already predicted (each reported in `problems` as a
    /// duplicate): scoring uses the first of them that can answer the question when the first
    /// row cannot (an option index out of range, a text for a choice).
    pub duplicates: Vec<(u64, PredictionRow)>,
    /// The rows came from the official scripts' result object, whose keys `"<video>_<qid>"` were
    /// split at their last `_` (for the rows' fields and messages): evaluation matches each by
    /// the whole key, as those scripts look them up (a qid may hold `_`).
    pub joined_keys: bool,
}

/// Read a JSONL prediction file. Malformed lines and duplicates are reported in `problems`
/// (with line numbers), not errors; only I/O failures are.
pub fn read_predictions(path: &Path) -> Result<PredictionFile> {
    let mut text = String::new();
    File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .with_context(|| format!("reading prediction file {}", path.display()))?;
    let mut out = PredictionFile {
        path: path.to_path_buf(),
        ..Default::default()
    };
    // A UTF-8 byte-order mark (some editors and tools write one) is not part of the first row.
    if let Some(rest) = text.strip_prefix('\u{feff}') {
        text = rest.to_string();
    }
    // One JSON document instead of JSONL: the official scripts' result object, or an array of rows.
    let document = whole_document_rows(&text);
    out.joined_keys = document.as_ref().is_some_and(|(_, what)| *what == OFFICIAL_OBJECT);
    let is_document = document.is_some();
    let lines: Vec<(u64, DocumentEntry)> = match document {
        Some((rows, what)) => {
            tracing::info!(
                "{}: read as {what}; the line numbers below count its entries (an object's in the sorted order of \
                 its keys, each named)",
                path.display()
            );
            rows.into_iter().enumerate().map(|(i, r)| (i as u64 + 1, r)).collect()
        }
        None => text
            .split('\n')
            .enumerate()
            .map(|(i, l)| (i as u64 + 1, (None, Ok(l.to_string()))))
            .collect(),
    };
    // Another JSON document (pretty-printed rows under a key, say): JSONL is what is read.
    let other_document =
        !is_document && lines.len() > 1 && serde_json::from_str::<serde_json::Value>(text.trim()).is_ok_and(|v| !v.is_null());
    let mut seen: HashMap<(String, String), u64> = HashMap::new();
    for (n, (key, line)) in &lines {
        // An object's entries are named by their key in every problem.
        let at = key.as_ref().map(|k| format!("key {k}: ")).unwrap_or_default();
        let n = *n;
        let line = match line {
            Ok(l) => l.as_str(),
            Err(why) => {
                out.problems.push(Problem {
                    line: n,
                    kind: ProblemKind::Malformed,
                    message: format!("{at}{why}"),
                });
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let mut row = match serde_json::from_str::<PredictionRow>(line) {
            Ok(r) => r,
            Err(e) => match without_bad_grounding(line) {
                // The answer is scored; only the grounding fields that do not read are left out.
                Some((r, dropped)) => {
                    out.problems.push(Problem {
                        line: n,
                        kind: ProblemKind::Malformed,
                        message: format!(
                            "{at}{}; its {} left out ({}; the prediction is scored, without them)",
                            json_error(&e, key.is_some()),
                            dropped.join(", "),
                            dropped.iter().map(|f| grounding_form(f)).collect::<Vec<_>>().join("; ")
                        ),
                    });
                    r
                }
                None => {
                    let hint = if n == 1 && other_document {
                        " (expected JSONL: one JSON object per line, {\"video\", \"qid\", \"prediction\", ...}; or \
                         the official scripts' {\"<video>_<qid>\": {\"prediction\": ...}} object)"
                    } else {
                        ""
                    };
                    out.problems.push(Problem {
                        line: n,
                        kind: ProblemKind::Malformed,
                        message: format!("{at}{}{hint}", json_error(&e, key.is_some())),
                    });
                    continue;
                }
            },
        };
        // Frames and times of the moments that disagree: the moments are left out, the
        // prediction is scored.
        if let Some(m) = row.moments.as_ref().filter(|m| m.frames.len() != m.seconds.len()) {
            out.problems.push(Problem {
                line: n,
                kind: ProblemKind::Malformed,
                message: format!(
                    "{at}moments: {} frames but {} times; left out (the prediction is scored, without them)",
                    m.frames.len(),
                    m.seconds.len()
                ),
            });
            row.moments = None;
        }
        if let Err(m) = row.check() {
            out.problems.push(Problem {
                line: n,
                kind: ProblemKind::Malformed,
                message: format!("{at}{m}"),
            });
            continue;
        }
        if let Some(first) = seen.get(&row.key()) {
            out.problems.push(Problem {
                line: n,
                kind: ProblemKind::Duplicate,
                message: format!("{at}video {} qid {} already predicted at line {first}", row.video, row.qid),
            });
            out.duplicates.push((n, row));
            continue;
        }
        seen.insert(row.key(), n);
        if let Some([a, b]) = row.span {
            if a > b || a < 0.0 {
                out.problems.push(Problem {
                    line: n,
                    kind: ProblemKind::Implausible,
                    message: format!(
                        "{at}video {} qid {}: span [{a}, {b}] {}",
                        row.video,
                        row.qid,
                        if a > b {
                            "ends before it starts"
                        } else {
                            "starts before the video"
                        }
                    ),
                });
            }
        }
        out.rows.push((n, row));
    }
    Ok(out)
}

/// A JSON reading error; without its position for an entry of the official object (its row was
/// made from the entry, so the position would point into text the file does not hold).
fn json_error(e: &serde_json::Error, keyed: bool) -> String {
    let text = e.to_string();
    match text.rsplit_once(" at line ") {
        Some((message, _)) if keyed => message.to_string(),
        _ => text,
    }
}

/// What [`whole_document_rows`] calls the official scripts' result object.
const OFFICIAL_OBJECT: &str = "the official scripts' result object (keyed \"<video>_<qid>\")";

/// One entry of a prediction file read as one JSON document: the official object's key (None
/// for an array's rows), and the entry as a JSONL line of gcg's format, or what makes it none.
type DocumentEntry = (Option<String>, std::result::Result<String, String>);

/// The rows of a prediction file written as one JSON document, as JSONL lines of gcg's format:
/// a JSON array of rows, or the official evaluation scripts' result file (`eval_next.py`,
/// `eval_mc.py`: one object mapping `"<video>_<qid>"` to `{"prediction": i, "answer": i}`;
/// an entry of another form is reported by its key, the others are read) when at least one of
/// its entries has that form; None for any other text. The key is split at its last `_` (NExT
/// ids hold none: video ids are digits); evaluation matches the whole key
/// (`PredictionFile::joined_keys`).
fn whole_document_rows(text: &str) -> Option<(Vec<DocumentEntry>, &'static str)> {
    let trimmed = text.trim();
    if trimmed.starts_with('[') {
        let rows: Vec<serde_json::Value> = serde_json::from_str(trimmed).ok()?;
        let rows = rows.iter().map(|r| (None, Ok(r.to_string()))).collect();
        return Some((rows, "a JSON array of rows"));
    }
    if !trimmed.starts_with('{') {
        return None;
    }
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(trimmed).ok()?;
    // A one-line JSONL file of one row is an object too: it has the row's own fields.
    if map.contains_key("prediction") || map.is_empty() {
        return None;
    }
    let mut rows = Vec::with_capacity(map.len());
    let mut official = false;
    for (key, v) in map {
        let row = match (key.rsplit_once('_'), v.as_object()) {
            (Some((video, qid)), Some(fields)) => {
                official |= fields.contains_key("prediction");
                let mut row = fields.clone();
                row.insert("video".into(), video.into());
                row.insert("qid".into(), qid.into());
                Ok(serde_json::Value::Object(row).to_string())
            }
            (None, _) => Err("the key is not \"<video>_<qid>\"".to_string()),
            (_, None) => Err(format!("expected an object {{\"prediction\": ...}}, found {v}")),
        };
        rows.push((Some(key), row));
    }
    official.then_some((rows, OFFICIAL_OBJECT))
}

/// What a grounding field of a row holds, for the message that leaves one out.
fn grounding_form(field: &str) -> &'static str {
    match field {
        "span" => "a span is [start, end] in seconds",
        "moments" => "moments are {\"frames\": [indices], \"seconds\": [times]}",
        _ => "a curve is a list of numbers, one a frame",
    }
}

/// A row whose grounding fields (`span`, `moments`, `curve`) do not all read: the row without
/// those that do not, and their names; None when the row is bad otherwise.
fn without_bad_grounding(line: &str) -> Option<(PredictionRow, Vec<&'static str>)> {
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line).ok()?;
    let mut dropped = Vec::new();
    let reads: [(&'static str, fn(&serde_json::Value) -> bool); 3] = [
        ("span", |x| serde_json::from_value::<Option<[f64; 2]>>(x.clone()).is_ok()),
        ("moments", |x| serde_json::from_value::<Option<Moments>>(x.clone()).is_ok()),
        ("curve", |x| serde_json::from_value::<Option<Vec<f64>>>(x.clone()).is_ok()),
    ];
    for (field, ok) in reads {
        if v.get(field).is_some_and(|x| !ok(x)) {
            v.remove(field);
            dropped.push(field);
        }
    }
    if dropped.is_empty() {
        return None;
    }
    let row: PredictionRow = serde_json::from_value(serde_json::Value::Object(v)).ok()?;
    Some((row, dropped))
}

/// What wrote a prediction file, stored beside it as `FILE.meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The run directory whose checkpoint predicted (none for a model of a config).
    pub run_dir: Option<String>,
    /// The trained weights loaded (a checkpoint's `weights.safetensors`) and a hash of their
    /// bytes.
    pub weights: Option<String>,
    pub weights_hash: Option<String>,
    /// The annotation file of the questions and the feature store.
    pub annotations: String,
    pub store: String,
    /// A hash of the model-relevant part of the config (`[weights]` but `init`, `[model]`, the
    /// dataset and dtype).
    pub config_hash: String,
    /// A hash of what the predictions were made from: the annotation file's bytes and the
    /// store's records of its questions and videos (absent in files of an older gcg). A store
    /// recomputed or relabelled in place, or an edited annotation file, changes it, so its rows
    /// are not continued by rows of the new data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs_hash: Option<String>,
}

impl Provenance {
    /// The sidecar of a prediction file: `FILE.meta.json`.
    pub fn path_of(predictions: &Path) -> PathBuf {
        let mut name = predictions.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(".meta.json");
        predictions.with_file_name(name)
    }

    /// The provenance recorded beside a prediction file (none when it has no sidecar).
    pub fn read(predictions: &Path) -> Result<Option<Self>> {
        let p = Self::path_of(predictions);
        if !p.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        Ok(Some(
            serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?,
        ))
    }

    /// Write the sidecar of `predictions` (atomically).
    pub fn write(&self, predictions: &Path) -> Result<()> {
        crate::util::write_atomic(&Self::path_of(predictions), (serde_json::to_string_pretty(self)? + "\n").as_bytes())
    }

    /// Whether predictions of `self` may be continued by `other`: the same model
    /// ([`Self::same_model`]) on the same inputs.
    pub fn same_source(&self, other: &Provenance) -> bool {
        self.same_model(other) && self.inputs_hash == other.inputs_hash
    }

    /// The same weights, config, annotation file and store path (the run directory may have
    /// moved), whatever the inputs' contents.
    pub fn same_model(&self, other: &Provenance) -> bool {
        self.weights_hash == other.weights_hash
            && self.config_hash == other.config_hash
            && self.annotations == other.annotations
            && self.store == other.store
    }

    /// One line saying what wrote the file.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(r) = &self.run_dir {
            parts.push(format!("run {r}"));
        }
        match (&self.weights, &self.weights_hash) {
            (Some(w), Some(h)) => parts.push(format!("weights {w} ({h})")),
            (Some(w), None) => parts.push(format!("weights {w}")),
            _ => parts.push("no trained weights".into()),
        }
        parts.push(format!("config {}", self.config_hash));
        parts.push(format!("annotations {}", self.annotations));
        parts.push(format!("store {}", self.store));
        if let Some(h) = &self.inputs_hash {
            parts.push(format!("inputs {h}"));
        }
        parts.join(", ")
    }
}

/// What [`PredictionWriter::open`] does with an existing file that another model wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMismatch {
    /// An error naming both (a file the user named).
    Refuse,
    /// Start the file over (a run's own derived file, e.g. after a new best checkpoint).
    Replace,
}

/// Appends prediction rows to a JSONL file, one `write` per complete line, flushed after each,
/// and resumes: rows already in the file are known and not written again.
pub struct PredictionWriter {
    path: PathBuf,
    file: File,
    done: HashSet<(String, String)>,
    /// `.{name}.lock` beside the file, held while writing (one writer per file).
    _lock: crate::util::LockFile,
}

impl PredictionWriter {
    /// Start a new file (an existing one is truncated).
    pub fn create(path: &Path) -> Result<Self> {
        Self::make_dir(path)?;
        // Not truncated under another writer's feet.
        let lock = Self::lock(path)?;
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)
            .with_context(|| format!("creating prediction file {}", path.display()))?;
        drop(file);
        Self::resume_locked(path, lock)
    }

    /// Open for appending, keeping what is there. An incomplete last line (a run killed while
    /// writing) is cut off; a malformed complete line is an error (the file is not ours to fix).
    pub fn resume(path: &Path) -> Result<Self> {
        Self::make_dir(path)?;
        Self::resume_locked(path, Self::lock(path)?)
    }

    fn resume_locked(path: &Path, lock: crate::util::LockFile) -> Result<Self> {
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening prediction file {}", path.display()))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .with_context(|| format!("reading {}", path.display()))?;
        let complete = bytes.iter().rposition(|&b| b == b'\n').map(|i| i + 1).unwrap_or(0);
        if complete < bytes.len() {
            tracing::warn!(
                "{}: dropping an incomplete last line ({} bytes)",
                path.display(),
                bytes.len() - complete
            );
            file.set_len(complete as u64)
                .with_context(|| format!("truncating {}", path.display()))?;
            file.seek(SeekFrom::End(0))?;
        }
        let text = std::str::from_utf8(&bytes[..complete]).with_context(|| format!("{} is not UTF-8", path.display()))?;
        let mut done = HashSet::new();
        for (i, line) in text.split('\n').enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let row: PredictionRow = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a prediction row; refusing to append to it", path.display(), i + 1))?;
            done.insert(row.key());
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            done,
            _lock: lock,
        })
    }

    /// The lock file of a prediction file: `.{name}.lock` beside it.
    pub fn lock_path(path: &Path) -> PathBuf {
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        path.with_file_name(format!(".{name}.lock"))
    }

    fn lock(path: &Path) -> Result<crate::util::LockFile> {
        crate::util::lock_exclusive(&Self::lock_path(path), &format!("the prediction file {}", path.display()))
    }

    /// Open a prediction file for the model described by `prov`: a new file (or one without
    /// rows) starts with `prov` as its sidecar; a file with rows is resumed only when its
    /// sidecar matches `prov`, else refused or started over (`on_mismatch`). A file with rows
    /// and no sidecar (another tool's, or an older gcg's) is treated as a mismatch.
    pub fn open(path: &Path, prov: &Provenance, on_mismatch: OnMismatch) -> Result<Self> {
        match Self::check(path, prov) {
            Ok(true) => return Self::resume(path),
            Ok(false) => {}
            Err(e) if on_mismatch == OnMismatch::Replace => {
                tracing::info!("starting over: {e:#}");
            }
            Err(e) => return Err(e),
        }
        // Rows go only under a sidecar that describes them: the old rows are removed first, so a
        // kill in between leaves an empty file, never old rows under the new sidecar.
        let w = Self::create(path)?;
        prov.write(path)?;
        Ok(w)
    }

    /// Whether `path` holds rows that the model of `prov` may continue (true), nothing to
    /// continue (false), or rows of another model or of unknown provenance (an error naming
    /// both).
    pub fn check(path: &Path, prov: &Provenance) -> Result<bool> {
        let has_rows = std::fs::metadata(path).map(|m| m.len() > 0).unwrap_or(false);
        if !has_rows {
            return Ok(false);
        }
        match Provenance::read(path)? {
            Some(f) if f.same_source(prov) => Ok(true),
            Some(f) if f.same_model(prov) && f.inputs_hash.is_none() => bail!(
                "{} was written by an older gcg that did not record a fingerprint of its inputs, so whether the \
                 annotations or the store changed since cannot be told; it is not continued (give another --out, or \
                 delete {} and {} to start over)",
                path.display(),
                path.display(),
                Provenance::path_of(path).display()
            ),
            Some(f) if f.same_model(prov) => bail!(
                "{} was made by this model from other data: the annotations {} or the store {}'s records of their \
                 questions changed since (recomputed, relabelled or edited in place: {} now, {} then), and its rows \
                 would mix with rows of the new data\n(give another --out, or delete {} and {})",
                path.display(),
                prov.annotations,
                prov.store,
                prov.inputs_hash.as_deref().unwrap_or("-"),
                f.inputs_hash.as_deref().unwrap_or("not recorded"),
                path.display(),
                Provenance::path_of(path).display()
            ),
            Some(f) => bail!(
                "{} was written by another model and cannot be resumed by this one:\n  it has:     {}\n  this model: {}\n(give another --out, or delete {} and {})",
                path.display(),
                f.describe(),
                prov.describe(),
                path.display(),
                Provenance::path_of(path).display()
            ),
            None => bail!(
                "{} exists but has no {} saying what wrote it: it is not a prediction file of this gcg's (another tool's, an older gcg's, or not predictions at all); refusing to add to it (give another --out, or delete it)",
                path.display(),
                Provenance::path_of(path).display()
            ),
        }
    }

    fn make_dir(path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))?;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the question already has a row.
    pub fn contains(&self, video: &str, qid: &str) -> bool {
        self.done.contains(&(video.to_string(), qid.to_string()))
    }

    /// Number of rows in the file.
    pub fn len(&self) -> usize {
        self.done.len()
    }

    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
    }

    /// Append one row (an error if the question already has one).
    pub fn write(&mut self, row: &PredictionRow) -> Result<()> {
        if let Err(m) = row.check() {
            bail!("refusing to write a malformed prediction row: {m}");
        }
        let key = row.key();
        if self.done.contains(&key) {
            bail!("video {} qid {} already has a prediction in {}", key.0, key.1, self.path.display());
        }
        let mut line = serde_json::to_vec(row)?;
        line.push(b'\n');
        crate::util::fault_point_then("prediction-row", || {
            let _ = self.file.write_all(&line[..line.len() / 2]).and_then(|_| self.file.flush());
        });
        self.file
            .write_all(&line)
            .and_then(|_| self.file.flush())
            .with_context(|| format!("appending to {}", self.path.display()))?;
        self.done.insert(key);
        Ok(())
    }

    /// fsync the file (call at checkpoints; every row is already flushed to the OS).
    pub fn sync(&mut self) -> Result<()> {
        self.file.sync_data().with_context(|| format!("syncing {}", self.path.display()))
    }
}
