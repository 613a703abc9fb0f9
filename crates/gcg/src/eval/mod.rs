//! Official metrics of the benchmarks, in percent, and prediction files.
//!
//! * NExT-QA (`eval_mc.py`): accuracy per type CW, CH, TN (TP counted as TN), TC, DC, DL, DO,
//!   per group C, T, D (first letter) and overall; groups without questions are left out (as
//!   NExT-GQA's `eval_next.py` does; NExT-GQA has no D questions).
//! * NExT-GQA: the same QA accuracies over the questions with a ground-truth entry
//!   (`eval_next.py`'s grounded subset) and the grounding metrics of [`grounding`]. Its files
//!   give the answer as a text, so every option with that text is right (test 3842638015_4 has
//!   two; a Python loader's `options.index` picks 3, NExT-QA's file says 4).
//! * IntentQA (`eval_intentqa.py`): CW, CH, TN&TP (TN with TP), C, T, overall.
//! * Causal-VidQA (`eval_mc.py` of bcmi/Causal-VidQA): per video D, E, PA, PR, CA, CR; P (and C)
//!   count when answer AND reason are right; overall = mean of D, E, P, C over videos.
//! * STAR (the benchmark's per-type split of `run_program.py`, the challenge's "Mean"): accuracy
//!   per question type Interaction, Sequence, Prediction, Feasibility; overall = the mean of the
//!   type accuracies (of the types with questions: all four in the released splits), not the
//!   accuracy over all questions.
//! * SUTD-TrafficQA: accuracy per question type U, A, F, R, C, I and over all questions.
//! * VLEP (`standalone_eval/eval.py`): accuracy over all examples, computed as the script does
//!   (`correct / n * 100`; the script prints it rounded to 2 decimals).
//! * Open-ended: exact match of the predicted text (compared after trimming, lower-casing and
//!   collapsing runs of white space), overall and per annotated type.
//!
//! Where the official scripts read the `answer` of the prediction file, gcg uses the
//! annotation's answer (a disagreeing row is reported); a question without a usable prediction
//! counts as wrong and in `missing` (the official scripts fail on it).

pub mod grounding;
pub mod predictions;

pub use grounding::{grounding_metrics, iou_iop, GroundingMetrics};
pub use predictions::{
    read_predictions, Moments, OnMismatch, PredictionFile, PredictionRow, PredictionWriter, Problem, ProblemKind, Provenance,
};

use crate::data::nextgqa::Grounding;
use crate::data::{Answer, Dataset, QaSample};
use anyhow::{bail, Result};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};

/// One accuracy: `correct` of `total`, in percent.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    pub name: String,
    pub correct: usize,
    pub total: usize,
    pub value: f64,
}

impl Score {
    fn new(name: &str, correct: usize, total: usize) -> Self {
        // The official scripts: acc * 100.0 / cnt.
        Self {
            name: name.to_string(),
            correct,
            total,
            value: correct as f64 * 100.0 / total as f64,
        }
    }
}

/// The metrics of one evaluation.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub dataset: Dataset,
    /// In display order; `overall` last.
    pub scores: Vec<Score>,
    /// Open-ended: accuracy per annotated type (empty types left out).
    pub by_type: Vec<Score>,
    pub grounding: Option<GroundingMetrics>,
    /// Questions evaluated (for Causal-VidQA: questions, 6 per video).
    pub questions: usize,
    /// Of those, questions without a usable prediction (counted as wrong).
    pub missing: usize,
    /// Annotated questions left out: NExT-GQA with a grounding file, those without spans in it
    /// (the official script scores the grounding file's questions); Causal-VidQA, those of
    /// videos without all six questions.
    pub excluded: usize,
}

impl Metrics {
    pub fn get(&self, name: &str) -> Option<f64> {
        if let Some(s) = self.scores.iter().find(|s| s.name == name) {
            return Some(s.value);
        }
        self.grounding.as_ref()?.named().iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }

    pub fn overall(&self) -> f64 {
        self.get("overall").unwrap_or(f64::NAN)
    }

    /// `{"dataset", "overall", <type / group names>, <grounding names>, "missing",
    /// "grounding_missing", "counts": {name: total}, "by_type"?}`.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("dataset".into(), json!(self.dataset.name()));
        for s in &self.scores {
            m.insert(s.name.clone(), json!(s.value));
        }
        if let Some(g) = &self.grounding {
            for (n, v) in g.named() {
                m.insert(n.into(), if v.is_finite() { json!(v) } else { Value::Null });
            }
            m.insert("grounding_evaluated".into(), json!(g.evaluated));
            m.insert("grounding_missing".into(), json!(g.missing));
            if g.not_in_annotations > 0 {
                m.insert("grounding_not_in_annotations".into(), json!(g.not_in_annotations));
            }
        }
        m.insert("questions".into(), json!(self.questions));
        m.insert("missing".into(), json!(self.missing));
        if self.excluded > 0 {
            m.insert("excluded".into(), json!(self.excluded));
        }
        let counts: Map<String, Value> = self.scores.iter().map(|s| (s.name.clone(), json!(s.total))).collect();
        m.insert("counts".into(), Value::Object(counts));
        if !self.by_type.is_empty() {
            let by: Map<String, Value> = self
                .by_type
                .iter()
                .map(|s| (s.name.clone(), json!({"accuracy": s.value, "correct": s.correct, "total": s.total})))
                .collect();
            m.insert("by_type".into(), Value::Object(by));
        }
        Value::Object(m)
    }
}

/// Metrics and what was wrong with the prediction file.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub metrics: Metrics,
    /// From reading (malformed, duplicate) and from joining with the annotations (unknown
    /// question, invalid prediction, answer mismatch), sorted by line.
    pub problems: Vec<Problem>,
}

/// Evaluate `preds` against `samples` (the annotations of `dataset`). For NExT-GQA,
/// `grounding` (gsub) adds the grounding metrics and restricts QA accuracy to its questions.
pub fn evaluate(dataset: Dataset, samples: &[QaSample], preds: &PredictionFile, grounding: Option<&Grounding>) -> Result<Evaluation> {
    if grounding.is_some() && dataset != Dataset::NextGqa {
        bail!("grounding annotations are only evaluated for NExT-GQA, not {}", dataset.name());
    }
    if preds.rows.is_empty() {
        bail!(
            "{} holds no usable prediction row ({} malformed or duplicate line(s){})",
            preds.path.display(),
            preds.problems.len(),
            preds.problems.first().map(|p| format!("; first: {p}")).unwrap_or_default()
        );
    }
    let mut problems = preds.problems.clone();
    let index: HashMap<(&str, &str), usize> = samples
        .iter()
        .enumerate()
        .map(|(i, s)| ((s.video.as_str(), s.qid.as_str()), i))
        .collect();
    // The official result object's keys are matched whole, as its scripts look them up (its
    // rows were split at the key's last `_`, and a qid may hold `_`).
    let mut whole: HashMap<String, Vec<usize>> = HashMap::new();
    if preds.joined_keys {
        for (i, s) in samples.iter().enumerate() {
            whole.entry(format!("{}_{}", s.video, s.qid)).or_default().push(i);
        }
    }
    let mut joined: Vec<Option<&PredictionRow>> = vec![None; samples.len()];
    for (line, row) in &preds.rows {
        let key = format!("{}_{}", row.video, row.qid);
        let found = match (preds.joined_keys, index.get(&(row.video.as_str(), row.qid.as_str()))) {
            (false, Some(&i)) => Ok(i),
            (true, _) => match whole.get(&key).map(Vec::as_slice) {
                Some(&[i]) => Ok(i),
                Some(many) => Err(format!(
                    "key {key} is ambiguous: it names {} annotated questions ({})",
                    many.len(),
                    many.iter()
                        .map(|&i| format!("video {} qid {}", samples[i].video, samples[i].qid))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                None => Err(format!("key {key} is not in the annotations")),
            },
            (false, None) => Err(format!("video {} qid {} is not in the annotations", row.video, row.qid)),
        };
        let i = match found {
            Ok(i) => i,
            Err(message) => {
                problems.push(Problem {
                    line: *line,
                    kind: ProblemKind::Unknown,
                    message,
                });
                continue;
            }
        };
        let s = &samples[i];
        let (line, row) = match fits(s, &row.prediction) {
            Ok(()) => (line, row),
            Err(m) => {
                problems.push(Problem {
                    line: *line,
                    kind: ProblemKind::Invalid,
                    message: format!("{}: {m}", s.key),
                });
                // A later row of the question that can answer it stands in for this one (it
                // was reported as a duplicate of this line; it is the question's row now).
                let Some((l, r)) = preds
                    .duplicates
                    .iter()
                    .find(|(l, r)| l > line && r.key() == row.key() && fits(s, &r.prediction).is_ok())
                else {
                    continue;
                };
                problems.retain(|p| !(p.line == *l && p.kind == ProblemKind::Duplicate));
                (l, r)
            }
        };
        if let Some(a) = row.answer.as_ref().filter(|a| !s.accepts(a)) {
            let show = |a: &Answer| match a {
                Answer::Choice(i) => format!("option {i}"),
                Answer::Text(t) => format!("{t:?}"),
            };
            problems.push(Problem {
                line: *line,
                kind: ProblemKind::AnswerMismatch,
                message: format!(
                    "{}: the row's answer is {}, the annotation's {} (the annotation's is scored)",
                    s.key,
                    show(a),
                    show(&s.answer)
                ),
            });
        }
        if !row.qtype.is_empty() && row.qtype != s.qtype {
            problems.push(Problem {
                line: *line,
                kind: ProblemKind::TypeMismatch,
                message: format!(
                    "{}: the row's type is {:?}, the annotation's {:?} (the annotation's is used)",
                    s.key, row.qtype, s.qtype
                ),
            });
        }
        if let (Some([_, end]), Some(video)) = (row.span, grounding.and_then(|g| g.video(&s.video))) {
            // Frame times may run a little past a duration rounded in the annotations: only a
            // span ending well after the video (2 s or 10% of it) is implausible.
            if end > video.duration + (0.1 * video.duration).max(2.0) {
                problems.push(Problem {
                    line: *line,
                    kind: ProblemKind::Implausible,
                    message: format!("{}: span ends at {end} s, after the video's end at {} s", s.key, video.duration),
                });
            }
        }
        joined[i] = Some(row);
    }
    problems.sort_by_key(|p| p.line);

    let metrics = match dataset {
        Dataset::NextQa | Dataset::NextGqa | Dataset::IntentQa => {
            let keep: Vec<usize> = match grounding {
                Some(g) => (0..samples.len())
                    .filter(|&i| g.segments(&samples[i].video, &samples[i].qid).is_some())
                    .collect(),
                None => (0..samples.len()).collect(),
            };
            if keep.is_empty() && grounding.is_some() && !samples.is_empty() {
                bail!(
                    "none of the {} annotated questions has spans in the grounding annotations (are they another split's?)",
                    samples.len()
                );
            }
            let sub: Vec<(&QaSample, Option<&PredictionRow>)> = keep.iter().map(|&i| (&samples[i], joined[i])).collect();
            let mut m = nextqa_family(dataset, &sub)?;
            m.excluded = samples.len() - keep.len();
            if let Some(g) = grounding {
                let by_key: HashMap<(&str, &str), usize> = index.clone();
                let mut gm = grounding_metrics(g, |video, qid| {
                    let i = *by_key.get(&(video, qid))?;
                    let row = joined[i]?;
                    let span = row.span?;
                    Some((span, samples[i].accepts(&row.prediction)))
                });
                // The ground truth's questions that these annotations do not hold are not
                // predictions missing from this file.
                gm.not_in_annotations = g
                    .videos
                    .iter()
                    .flat_map(|v| v.location.iter().map(move |(q, _)| (v.video.as_str(), q.as_str())))
                    .filter(|k| !by_key.contains_key(k))
                    .count();
                gm.missing -= gm.not_in_annotations;
                m.grounding = Some(gm);
            }
            m
        }
        Dataset::CausalVidQa => causal_vidqa(samples, &joined)?,
        Dataset::Star => typed_accuracy(dataset, samples, &joined, &crate::data::star::STAR_TYPES, Overall::MeanOfTypes)?,
        Dataset::TrafficQa => {
            let types = crate::data::trafficqa::TRAFFICQA_TYPES.map(|(t, _)| t);
            typed_accuracy(dataset, samples, &joined, &types, Overall::AllQuestions)?
        }
        Dataset::Vlep => typed_accuracy(dataset, samples, &joined, &[], Overall::VlepScript)?,
        Dataset::OpenEnded => open_ended(samples, &joined)?,
    };
    Ok(Evaluation { metrics, problems })
}

/// Whether a prediction can answer the question at all.
fn fits(s: &QaSample, p: &Answer) -> std::result::Result<(), String> {
    match (s.is_multiple_choice(), p) {
        (true, Answer::Choice(i)) if *i < s.options.len() => Ok(()),
        (true, Answer::Choice(i)) => Err(format!(
            "option index {i} out of range (the question has {} options)",
            s.options.len()
        )),
        (true, Answer::Text(t)) => Err(format!(
            "expected an option index for a multiple-choice question, found the text {t:?}"
        )),
        (false, Answer::Text(_)) => Ok(()),
        (false, Answer::Choice(i)) => Err(format!("expected an answer text for an open-ended question, found the index {i}")),
    }
}

fn is_right(s: &QaSample, p: Option<&PredictionRow>) -> bool {
    p.is_some_and(|r| s.accepts(&r.prediction))
}

/// NExT-QA / NExT-GQA / IntentQA accuracies.
fn nextqa_family(dataset: Dataset, items: &[(&QaSample, Option<&PredictionRow>)]) -> Result<Metrics> {
    const GROUPS: [&str; 7] = ["CW", "CH", "TN", "TC", "DC", "DL", "DO"];
    let mut acc = [0usize; 7];
    let mut cnt = [0usize; 7];
    let mut missing = 0;
    for (s, p) in items {
        let t = if s.qtype == "TP" { "TN" } else { s.qtype.as_str() };
        let Some(g) = GROUPS.iter().position(|x| *x == t) else {
            bail!("{}: question type `{}` is none of CW, CH, TN, TP, TC, DC, DL, DO", s.key, s.qtype);
        };
        cnt[g] += 1;
        if p.is_none() {
            missing += 1;
        }
        if is_right(s, *p) {
            acc[g] += 1;
        }
    }
    let mut scores = Vec::new();
    for (g, name) in GROUPS.iter().enumerate() {
        if cnt[g] > 0 {
            let shown = if dataset == Dataset::IntentQa && *name == "TN" {
                "TN&TP"
            } else {
                name
            };
            scores.push(Score::new(shown, acc[g], cnt[g]));
        }
    }
    for letter in ["C", "T", "D"] {
        let (a, c) = GROUPS
            .iter()
            .enumerate()
            .filter(|(_, n)| n.starts_with(letter))
            .fold((0, 0), |(a, c), (g, _)| (a + acc[g], c + cnt[g]));
        if c > 0 {
            scores.push(Score::new(letter, a, c));
        }
    }
    let total: usize = cnt.iter().sum();
    if total == 0 {
        bail!("no questions to evaluate");
    }
    scores.push(Score::new("overall", acc.iter().sum(), total));
    Ok(Metrics {
        dataset,
        scores,
        by_type: Vec::new(),
        grounding: None,
        questions: total,
        missing,
        excluded: 0,
    })
}

/// Causal-VidQA: six questions a video.
fn causal_vidqa(samples: &[QaSample], joined: &[Option<&PredictionRow>]) -> Result<Metrics> {
    const TYPES: [&str; 6] = ["D", "E", "PA", "PR", "CA", "CR"];
    let mut videos: Vec<&str> = Vec::new();
    let mut per_video: HashMap<&str, [Option<usize>; 6]> = HashMap::new();
    for (i, s) in samples.iter().enumerate() {
        let Some(t) = TYPES.iter().position(|x| *x == s.qtype) else {
            bail!("{}: question type `{}` is none of D, E, PA, PR, CA, CR", s.key, s.qtype);
        };
        let slot = per_video.entry(s.video.as_str()).or_insert_with(|| {
            videos.push(s.video.as_str());
            [None; 6]
        });
        if slot[t].is_some() {
            bail!("video {} has two {} questions", s.video, s.qtype);
        }
        slot[t] = Some(i);
    }
    let mut right = [0usize; 6];
    let (mut p_both, mut c_both, mut all) = (0usize, 0usize, 0usize);
    let mut missing = 0;
    // A video without all six questions cannot give its P and C pairs: it is left out (counted
    // in `excluded`), as the official evaluation covers only complete videos.
    let incomplete: Vec<&str> = videos
        .iter()
        .copied()
        .filter(|v| per_video[v].iter().any(Option::is_none))
        .collect();
    if let Some(v) = incomplete.first() {
        let lacks: Vec<&str> = (0..6).filter(|&t| per_video[v][t].is_none()).map(|t| TYPES[t]).collect();
        tracing::warn!(
            "{} videos lack some of the six Causal-VidQA questions and are not scored (e.g. {v} lacks {})",
            incomplete.len(),
            lacks.join(", ")
        );
    }
    let excluded: usize = incomplete.iter().map(|v| per_video[v].iter().flatten().count()).sum();
    videos.retain(|v| !incomplete.contains(v));
    for v in &videos {
        let slot = per_video[v];
        let mut ok = [false; 6];
        for t in 0..6 {
            let Some(i) = slot[t] else {
                unreachable!("incomplete videos were left out")
            };
            if joined[i].is_none() {
                missing += 1;
            }
            ok[t] = is_right(&samples[i], joined[i]);
            if ok[t] {
                right[t] += 1;
            }
        }
        let p = ok[2] && ok[3];
        let c = ok[4] && ok[5];
        p_both += p as usize;
        c_both += c as usize;
        all += ok[0] as usize + ok[1] as usize + p as usize + c as usize;
    }
    let n = videos.len();
    if n == 0 {
        bail!(
            "no video has all six Causal-VidQA questions ({} incomplete videos); nothing to evaluate",
            incomplete.len()
        );
    }
    let scores = vec![
        Score::new("D", right[0], n),
        Score::new("E", right[1], n),
        Score::new("PA", right[2], n),
        Score::new("PR", right[3], n),
        Score::new("P", p_both, n),
        Score::new("CA", right[4], n),
        Score::new("CR", right[5], n),
        Score::new("C", c_both, n),
        Score::new("overall", all, 4 * n),
    ];
    Ok(Metrics {
        dataset: Dataset::CausalVidQa,
        scores,
        by_type: Vec::new(),
        grounding: None,
        questions: 6 * n,
        missing,
        excluded,
    })
}

/// How a benchmark makes its overall number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Overall {
    /// Accuracy over all questions (`correct * 100 / n`).
    AllQuestions,
    /// Accuracy over all questions in the VLEP script's order of operations (`correct / n * 100`).
    VlepScript,
    /// The mean of the per-type accuracies (STAR).
    MeanOfTypes,
}

/// Accuracy per question type (`types`, in display order; types without questions left out; no
/// types: every question's type must be empty) and overall.
fn typed_accuracy(
    dataset: Dataset,
    samples: &[QaSample],
    joined: &[Option<&PredictionRow>],
    types: &[&str],
    overall: Overall,
) -> Result<Metrics> {
    if samples.is_empty() {
        bail!("no questions to evaluate");
    }
    let mut acc = vec![0usize; types.len()];
    let mut cnt = vec![0usize; types.len()];
    let (mut right, mut missing) = (0usize, 0usize);
    for (s, p) in samples.iter().zip(joined) {
        let ok = is_right(s, *p);
        right += ok as usize;
        missing += p.is_none() as usize;
        if types.is_empty() {
            if !s.qtype.is_empty() {
                bail!("{}: question type `{}` (a {} question has none)", s.key, s.qtype, dataset.name());
            }
            continue;
        }
        let Some(t) = types.iter().position(|x| *x == s.qtype) else {
            bail!("{}: question type `{}` is none of {}", s.key, s.qtype, types.join(", "));
        };
        cnt[t] += 1;
        acc[t] += ok as usize;
    }
    let mut scores: Vec<Score> = (0..types.len())
        .filter(|&t| cnt[t] > 0)
        .map(|t| Score::new(types[t], acc[t], cnt[t]))
        .collect();
    let n = samples.len();
    let all = match overall {
        Overall::AllQuestions => Score::new("overall", right, n),
        Overall::VlepScript => Score {
            value: right as f64 / n as f64 * 100.0,
            ..Score::new("overall", right, n)
        },
        Overall::MeanOfTypes => Score {
            // The four type accuracies summed in display order, then divided.
            value: scores.iter().map(|s| s.value).fold(0.0, |a, v| a + v) / scores.len() as f64,
            ..Score::new("overall", right, n)
        },
    };
    scores.push(all);
    Ok(Metrics {
        dataset,
        scores,
        by_type: Vec::new(),
        grounding: None,
        questions: n,
        missing,
        excluded: 0,
    })
}

/// The form in which open-ended answers are compared.
pub fn normalize_answer(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

fn open_ended(samples: &[QaSample], joined: &[Option<&PredictionRow>]) -> Result<Metrics> {
    if samples.is_empty() {
        bail!("no questions to evaluate");
    }
    let mut types: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let (mut right, mut missing) = (0usize, 0usize);
    for (s, p) in samples.iter().zip(joined) {
        let ok = match (p, &s.answer) {
            (Some(row), Answer::Text(a)) => match &row.prediction {
                Answer::Text(t) => normalize_answer(t) == normalize_answer(a),
                Answer::Choice(_) => false,
            },
            _ => false,
        };
        missing += p.is_none() as usize;
        right += ok as usize;
        if !s.qtype.is_empty() {
            let e = types.entry(s.qtype.as_str()).or_insert((0, 0));
            e.0 += ok as usize;
            e.1 += 1;
        }
    }
    let by_type = types.iter().map(|(t, (r, n))| Score::new(t, *r, *n)).collect();
    let scores = vec![Score::new("overall", right, samples.len())];
    Ok(Metrics {
        dataset: Dataset::OpenEnded,
        scores,
        by_type,
        grounding: None,
        questions: samples.len(),
        missing,
        excluded: 0,
    })
}

/// Whether a metrics JSON may be written at `path`: nothing is there, an empty file, or a
/// metrics file that gcg wrote (a JSON object with a `dataset` name and a `questions` count), which it replaces.
/// Anything else — weights, a store's index, a run's config, annotations — is refused with an
/// error naming it, so that a mistyped `--json` loses nothing.
pub fn check_metrics_target(path: &std::path::Path) -> anyhow::Result<()> {
    let meta = match path.metadata() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("inspecting {}", path.display()))),
        Ok(m) => m,
    };
    anyhow::ensure!(
        !meta.is_dir(),
        "{} is a directory: the metrics JSON goes to a file (e.g. {})",
        path.display(),
        path.join("metrics.json").display()
    );
    // An empty file (made by `mktemp` for it) holds nothing to lose.
    if meta.is_file() && meta.len() == 0 {
        return Ok(());
    }
    let is_metrics = meta.is_file()
        && meta.len() <= 16 << 20
        && std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|v| v.get("dataset").is_some_and(Value::is_string) && v.get("questions").is_some_and(Value::is_u64));
    anyhow::ensure!(
        is_metrics,
        "{} exists and is not a metrics file written by gcg (a JSON object with \"dataset\" and \"questions\"); \
         refusing to replace it — give another path, or delete it first",
        path.display()
    );
    Ok(())
}

/// Write a metrics JSON atomically, where [`check_metrics_target`] allows it.
pub fn write_metrics_json(path: &std::path::Path, metrics: &Value) -> anyhow::Result<()> {
    check_metrics_target(path)?;
    crate::util::write_atomic(path, (serde_json::to_string_pretty(metrics)? + "\n").as_bytes())
}
