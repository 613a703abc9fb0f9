//! CLIP text embeddings and pseudo-labels per question (SPEC §3).
//!
//! For each question: the EVA-CLIP text embeddings of the question (`"{question}?"`, as the
//! official code feeds it), of each option, of the answer and of the *event text*; the
//! similarity curve s_t = cos(F_t, text(event)) against the video's stored CLIP frame embeddings
//! F; and the pseudo-labels, the K frames with the highest s_t sorted by time (ties: the earlier
//! frame first).
//!
//! The event text ([`EventSource`]): the answer text (what the official code uses for NExT-QA),
//! the question and answer as one sentence (`"{question}? {answer}"`), or a declarative
//! statement per question written offline (a JSON map sample key → sentence).

use crate::data::QaSample;
use crate::models::clip_text::ClipTextModel;
use crate::store::{QuestionRecord, StoreWriter, WriterOptions};
use crate::store::{Snapshot, Store};
use crate::text::ClipTokenizer;
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Device};
use std::collections::HashMap;
use std::path::Path;

/// Where the event text of a question comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum EventSource {
    /// The answer text.
    Answer,
    /// `"{question}? {answer}"`.
    QuestionAnswer,
    /// A declarative sentence per sample key.
    Statements(HashMap<String, String>),
}

impl EventSource {
    /// The name stored with each question (`answer`, `question-answer`, `statements`).
    pub fn mode(&self) -> &'static str {
        match self {
            Self::Answer => "answer",
            Self::QuestionAnswer => "question-answer",
            Self::Statements(_) => "statements",
        }
    }

    /// Reads a statements file: a JSON object mapping sample keys (`QaSample::key`) to sentences.
    pub fn statements_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading the statements file {}", path.display()))?;
        let map: HashMap<String, String> = serde_json::from_str(&text)
            .with_context(|| format!("{} should be a JSON object mapping question keys to sentences", path.display()))?;
        Ok(Self::Statements(map))
    }

    /// The event text of one question.
    pub fn event_text(&self, s: &QaSample) -> Result<String> {
        let answer = s.answer_text();
        ensure!(!answer.trim().is_empty(), "question {}: the answer text is empty", s.key);
        Ok(match self {
            Self::Answer => answer.to_string(),
            Self::QuestionAnswer => question_answer_sentence(s),
            Self::Statements(m) => m
                .get(&s.key)
                .cloned()
                .ok_or_else(|| anyhow!("question {}: the statements file has no sentence for this key", s.key))?,
        })
    }
}

/// The question as the official code gives it to CLIP: with its question mark.
pub fn question_text(s: &QaSample) -> String {
    format!("{}?", s.question.trim_end().trim_end_matches('?'))
}

/// A fingerprint of a question's texts as `gcg labels` embeds them (the question, its options,
/// its answer), stored with its labels and compared by readers with their annotations.
pub fn texts_hash(s: &QaSample) -> String {
    let mut h = crate::util::Fnv64::default();
    for t in std::iter::once(question_text(s).as_str())
        .chain(s.options.iter().map(String::as_str))
        .chain([s.answer_text()])
    {
        h.update(t.as_bytes());
        h.update(&[0]);
    }
    h.tagged()
}

/// Whether a stored question's labels were made from the texts of `s` (as far as the record
/// tells: its texts' fingerprint, else its event text where the event mode derives it from the
/// annotation); the reason when not.
pub fn stale_texts(q: &crate::store::QuestionEntry, s: &QaSample) -> Option<String> {
    if let Some(h) = &q.texts_hash {
        return (*h != texts_hash(s)).then(|| "its question, options or answer changed in the annotations".to_string());
    }
    let event = match q.event_mode.as_str() {
        "answer" => s.answer_text().to_string(),
        "question-answer" => question_answer_sentence(s),
        _ => return None,
    };
    (q.event != event).then(|| format!("its event text was {:?}, the annotations now give {event:?}", q.event))
}

/// Question and answer as one sentence: `"{question}? {answer}"`.
pub fn question_answer_sentence(s: &QaSample) -> String {
    format!("{} {}", question_text(s), s.answer_text().trim())
}

/// The K indices of the largest values, sorted by index (ties: the smaller index wins): the rule
/// of [`crate::nn::top_k_sorted`], on a similarity curve that must be finite.
pub fn top_k_sorted(curve: &[f32], k: usize) -> Result<Vec<usize>> {
    ensure!(k <= curve.len(), "top-{k} of a curve of {} frames", curve.len());
    ensure!(
        curve.iter().all(|x| x.is_finite()),
        "the similarity curve has a non-finite value: {curve:?}"
    );
    crate::nn::top_k_sorted(curve, k)
}

/// s_t = cos(F_t, event) for frame embeddings `frames` [T, E] (row-major) and the event's
/// embedding [E], and the top-K frames of s sorted by time.
pub fn pseudo_labels(frames: &[f32], event: &[f32], k: usize) -> Result<(Vec<f32>, Vec<usize>)> {
    let e = event.len();
    ensure!(
        e > 0 && frames.len().is_multiple_of(e) && !frames.is_empty(),
        "frame embeddings of {} values do not split into rows of the event width {e}",
        frames.len()
    );
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt();
    let ne = norm(event);
    let curve: Vec<f32> = frames
        .chunks_exact(e)
        .map(|f| {
            let dot: f64 = f.iter().zip(event).map(|(a, b)| *a as f64 * *b as f64).sum();
            (dot / (norm(f) * ne).max(1e-12)) as f32
        })
        .collect();
    let top = top_k_sorted(&curve, k)?;
    Ok((curve, top))
}

/// EVA-CLIP text embeddings of strings.
pub struct ClipTextEncoder<'a> {
    pub model: &'a ClipTextModel,
    pub tokenizer: &'a ClipTokenizer,
    pub device: Device,
    /// Texts per forward pass.
    pub batch_size: usize,
}

impl ClipTextEncoder<'_> {
    /// One embedding [E] (f32) per text.
    pub fn encode<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(self.batch_size.max(1)) {
            let ids = self.tokenizer.tokenize(chunk)?.ids_tensor(&self.device)?;
            let emb = self.model.forward(&ids)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            out.extend(emb);
        }
        Ok(out)
    }
}

/// Settings of [`label_questions`].
#[derive(Debug, Clone)]
pub struct LabelOptions {
    pub event: EventSource,
    /// K.
    pub top_k: usize,
    /// Keep questions already labelled with the same event text, K and options.
    pub skip_existing: bool,
    /// Questions whose texts are encoded together (texts repeated inside are encoded once).
    pub chunk: usize,
    pub writer: WriterOptions,
    /// Which CLIP text tower and tokenizer embed the texts (stored with each question; see
    /// [`crate::features::provenance::text_encoder`]). With `skip_existing`, stored questions
    /// embedded by another are an error; None: not known (not compared, not recorded).
    pub text_encoder: Option<String>,
}

impl Default for LabelOptions {
    fn default() -> Self {
        Self {
            event: EventSource::Answer,
            top_k: 4,
            skip_existing: true,
            chunk: 512,
            writer: WriterOptions {
                shard_bytes: 64 << 20,
                ..Default::default()
            },
            text_encoder: None,
        }
    }
}

/// Progress of [`label_questions`].
#[derive(Debug)]
pub enum LabelProgress<'a> {
    Start { total: usize, skipped: usize },
    Done { key: &'a str },
    Failed { key: &'a str, error: &'a str },
}

/// What [`label_questions`] did.
#[derive(Debug, Clone, Default)]
pub struct LabelReport {
    pub labelled: usize,
    pub skipped: usize,
    /// (sample key, error) of each question that could not be labelled.
    pub failed: Vec<(String, String)>,
    /// The videos of questions that are not in the store, with those questions' keys (also in
    /// `failed`; not reported one question at a time: a full-size split over part of the videos
    /// would give thousands of lines).
    pub missing_videos: std::collections::BTreeMap<String, Vec<String>>,
}

/// The texts of one question, in the order of the store's rows.
struct QuestionTextsToEncode {
    question: String,
    options: Vec<String>,
    answer: String,
    event: String,
}

/// Embeds the texts of `samples` and computes their pseudo-labels from the frame embeddings in
/// the store at `store_dir`; writes them into the store. A question that fails (its video is not
/// in the store, no statement, K larger than T) is reported and the others go on.
pub fn label_questions(
    store_dir: &Path,
    samples: &[QaSample],
    encoder: &ClipTextEncoder<'_>,
    opts: &LabelOptions,
    progress: &mut dyn FnMut(LabelProgress<'_>),
) -> Result<LabelReport> {
    ensure!(opts.top_k > 0, "--top-k must be at least 1");
    // The store must exist already (a mistyped path is an error, not a new empty store).
    let store = Store::open(store_dir)?;
    let mut writer = StoreWriter::open(store_dir, opts.writer.clone())?;
    // Opening the writer drops records whose shard is broken; see the index as it left it.
    store.refresh()?;
    let snap = store.snapshot();
    // Frame embeddings of another CLIP width (a store made with another preset or weights)
    // cannot meet this text encoder's: said once, before any text is encoded.
    if let Some(m) = snap.meta() {
        let e = encoder.model.config.embed_dim;
        ensure!(
            m.embed_dim == e,
            "the store {} holds frame embeddings of width {} but this text encoder's are {e} wide: label with the \
             CLIP weights (or --preset) the store's videos were made with",
            store_dir.display(),
            m.embed_dim
        );
    }
    if let Some(w) = frame_count_mismatches(samples, &snap) {
        tracing::warn!("{w}");
    }
    let mut report = LabelReport::default();
    if opts.skip_existing {
        check_text_encoder(samples, &snap, store_dir, opts.text_encoder.as_deref())?;
        check_label_settings(samples, &snap, store_dir, opts)?;
    }
    let (todo, failed_early) = plan_questions(samples, &snap, opts, &mut report)?;
    progress(LabelProgress::Start {
        total: samples.len(),
        skipped: report.skipped,
    });
    for (key, err) in failed_early {
        progress(LabelProgress::Failed { key: &key, error: &err });
        report.failed.push((key, err));
    }
    for chunk in todo.chunks(opts.chunk.max(1)) {
        label_chunk(chunk, encoder, &snap, opts, &mut writer, &mut report, progress)?;
    }
    writer.flush()?;
    refused_by_the_store(&mut writer, &mut report, progress);
    writer.finish()?;
    Ok(report)
}

/// Questions counted as labelled that a commit refused (their video was stored again while
/// this job ran): failed, with the store's reason.
fn refused_by_the_store(writer: &mut StoreWriter, report: &mut LabelReport, progress: &mut dyn FnMut(LabelProgress<'_>)) {
    for (key, why) in writer.take_refused_questions() {
        report.labelled = report.labelled.saturating_sub(1);
        progress(LabelProgress::Failed { key: &key, error: &why });
        report.failed.push((key, why));
    }
}

/// Stored questions of `samples` embedded by another text encoder than `asked` are an error
/// naming how many and both encoders; those of unknown encoder (older gcg) are taken as
/// embedded by it, with a warning.
fn check_text_encoder(samples: &[QaSample], snap: &Snapshot, store_dir: &Path, asked: Option<&str>) -> Result<()> {
    let Some(asked) = asked else { return Ok(()) };
    let mut differ: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    let mut unknown = Vec::new();
    for s in samples {
        let Some(q) = snap.index().questions.get(&s.key) else { continue };
        match q.text_encoder.as_deref() {
            Some(e) if e != asked => differ.entry(e).or_default().push(s.key.as_str()),
            None => unknown.push(s.key.as_str()),
            _ => {}
        }
    }
    if !differ.is_empty() {
        bail!(
            "{}\nthis run uses {asked}; give --overwrite to relabel them, or use another --store",
            grouped(&differ, store_dir, "embedded by the text encoder")
        );
    }
    if !unknown.is_empty() {
        tracing::warn!(
            "{} questions in {} (e.g. {}) were labelled by an older gcg that did not record the text encoder; \
             they are taken as embedded by this run's (--overwrite relabels them)",
            unknown.len(),
            store_dir.display(),
            unknown[0]
        );
    }
    Ok(())
}

/// Stored questions of `samples` labelled with another K or event mode than `opts` asks are an
/// error naming how many, both settings and the fix: relabelling them silently would change the
/// data under runs already trained on them (a changed event *text*, an edited annotation, is
/// relabelled: the old labels describe a question that no longer exists).
fn check_label_settings(samples: &[QaSample], snap: &Snapshot, store_dir: &Path, opts: &LabelOptions) -> Result<()> {
    let mut differ: std::collections::BTreeMap<String, Vec<&str>> = Default::default();
    for s in samples {
        let Some(q) = snap.index().questions.get(&s.key) else { continue };
        let mut d = Vec::new();
        if q.event_mode != opts.event.mode() {
            d.push(format!("--event {}", q.event_mode));
        }
        let k = snap
            .index()
            .videos
            .get(&s.video)
            .map_or(opts.top_k, |v| opts.top_k.min(v.num_frames));
        if q.pseudo_labels.len() != k {
            d.push(format!("--top-k {}", q.pseudo_labels.len()));
        }
        if !d.is_empty() {
            differ.entry(d.join(", ")).or_default().push(s.key.as_str());
        }
    }
    if differ.is_empty() {
        return Ok(());
    }
    bail!(
        "{}\nthis run asks --event {} --top-k {}; give --overwrite to relabel them (runs trained on the old labels then \
         no longer match the store), or use another --store",
        grouped(&differ, store_dir, "labelled with"),
        opts.event.mode(),
        opts.top_k
    )
}

/// One line per group of stored questions made otherwise: "N questions in STORE were {how} X
/// (e.g. up to three keys)".
fn grouped<K: std::fmt::Display>(differ: &std::collections::BTreeMap<K, Vec<&str>>, store_dir: &Path, how: &str) -> String {
    differ
        .iter()
        .map(|(d, keys)| {
            format!(
                "{} questions in {} were {how} {d} (e.g. {})",
                keys.len(),
                store_dir.display(),
                keys[..keys.len().min(3)].join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A question to label and its texts.
type Todo<'a> = (&'a QaSample, QuestionTextsToEncode);

/// A warning when stored videos last far from what the annotations' `frame_count` column (the
/// NExT family's) says: the stored duration × fps more than 20% (and 2 s) off. A wrong id → file
/// mapping would otherwise go unnoticed: each video's questions would be labelled and trained on
/// another video's frames. Videos without a duration or frame rate (frame folders) are not
/// compared.
pub fn frame_count_mismatches(samples: &[QaSample], snap: &Snapshot) -> Option<String> {
    let mut seen = std::collections::HashSet::new();
    let (mut compared, mut off) = (0usize, Vec::new());
    for s in samples {
        if !seen.insert(s.video.as_str()) {
            continue;
        }
        let Some(annotated) = s.extra.get("frame_count").and_then(|c| c.parse::<f64>().ok()) else {
            continue;
        };
        let Some(v) = snap.index().videos.get(&s.video) else { continue };
        let (Some(d), Some(fps)) = (v.duration, v.fps) else { continue };
        compared += 1;
        let stored = d * fps;
        if (stored - annotated).abs() > (0.2 * annotated).max(2.0 * fps) {
            off.push(format!(
                "{}: {annotated} frames annotated, {stored:.0} stored ({d:.1} s at {fps:.2} fps)",
                s.video
            ));
        }
    }
    (!off.is_empty()).then(|| {
        format!(
            "{} of {compared} videos last far from the annotations' frame_count (a wrong id → file mapping?): {}{}",
            off.len(),
            off.iter().take(3).cloned().collect::<Vec<_>>().join("; "),
            if off.len() > 3 { "; ..." } else { "" }
        )
    })
}

/// The questions still to label, with their texts, and those whose texts could not be made
/// (key, error); counts the ones already labelled alike in `report.skipped` (with `skip_existing`).
/// A key given twice is an error.
#[allow(clippy::type_complexity)]
fn plan_questions<'a>(
    samples: &'a [QaSample],
    snap: &Snapshot,
    opts: &LabelOptions,
    report: &mut LabelReport,
) -> Result<(Vec<Todo<'a>>, Vec<(String, String)>)> {
    let mut seen = std::collections::HashSet::new();
    let mut todo: Vec<Todo<'a>> = Vec::new();
    let mut failed_early = Vec::new();
    for s in samples {
        if !seen.insert(s.key.as_str()) {
            bail!("question key {} appears twice in the annotations", s.key);
        }
        if !snap.contains_video(&s.video) {
            report.missing_videos.entry(s.video.clone()).or_default().push(s.key.clone());
            report
                .failed
                .push((s.key.clone(), format!("video {} is not in the store (no features)", s.video)));
            continue;
        }
        let texts = opts.event.event_text(s).map(|event| QuestionTextsToEncode {
            question: question_text(s),
            options: s.options.clone(),
            answer: s.answer_text().to_string(),
            event,
        });
        match texts {
            Ok(t) => {
                if opts.skip_existing && already_labelled(snap, opts, s, &t) {
                    report.skipped += 1;
                    continue;
                }
                todo.push((s, t));
            }
            Err(e) => failed_early.push((s.key.clone(), format!("{e:#}"))),
        }
    }
    Ok((todo, failed_early))
}

/// Whether the store already holds this question labelled the same way (same event mode and
/// text, video, option count, K and frame count).
fn already_labelled(snap: &Snapshot, opts: &LabelOptions, s: &QaSample, t: &QuestionTextsToEncode) -> bool {
    let Some(q) = snap.index().questions.get(&s.key) else {
        return false;
    };
    let k = snap.index().videos.get(&s.video).map(|v| opts.top_k.min(v.num_frames));
    q.event_mode == opts.event.mode()
        && q.event == t.event
        && q.texts_hash.as_deref().is_none_or(|h| h == texts_hash(s))
        && q.video == s.video
        && q.num_options == s.options.len()
        && Some(q.pseudo_labels.len()) == k
        && q.num_frames == snap.index().videos.get(&s.video).map_or(0, |v| v.num_frames)
        && q.video_shard
            .as_deref()
            .is_none_or(|from| snap.index().videos.get(&s.video).is_some_and(|v| v.shard == from))
}

/// Labels one chunk of questions: their unique texts are encoded once each, then every question's
/// record is written (or its failure reported).
fn label_chunk(
    chunk: &[Todo<'_>],
    encoder: &ClipTextEncoder<'_>,
    snap: &Snapshot,
    opts: &LabelOptions,
    writer: &mut StoreWriter,
    report: &mut LabelReport,
    progress: &mut dyn FnMut(LabelProgress<'_>),
) -> Result<()> {
    let mut rows: HashMap<&str, usize> = HashMap::new();
    let mut unique: Vec<&str> = Vec::new();
    for (_, t) in chunk {
        for s in std::iter::once(&t.question).chain(&t.options).chain([&t.answer, &t.event]) {
            rows.entry(s.as_str()).or_insert_with(|| {
                unique.push(s.as_str());
                unique.len() - 1
            });
        }
    }
    let emb = encoder.encode(&unique)?;
    let get = |s: &str| emb[rows[s]].clone();
    for (s, t) in chunk {
        match question_record(s, t, snap, opts, &get).and_then(|rec| writer.add_question(rec)) {
            Ok(_) => {
                report.labelled += 1;
                progress(LabelProgress::Done { key: &s.key });
            }
            Err(e) => {
                let err = format!("{e:#}");
                progress(LabelProgress::Failed { key: &s.key, error: &err });
                report.failed.push((s.key.clone(), err));
            }
        }
        refused_by_the_store(writer, report, progress);
    }
    Ok(())
}

/// One question's record: its text embeddings (`get` looks a text's up) and the pseudo-labels of
/// its event against its video's CLIP frame embeddings.
fn question_record(
    s: &QaSample,
    t: &QuestionTextsToEncode,
    snap: &Snapshot,
    opts: &LabelOptions,
    get: &dyn Fn(&str) -> Vec<f32>,
) -> Result<QuestionRecord> {
    let video_shard = snap.video(&s.video)?.shard.clone();
    let frames = snap
        .frame_embeds(&s.video)
        .with_context(|| format!("question {}: no CLIP frame embeddings", s.key))?
        .to_f32()?;
    let event = get(&t.event);
    let (curve, top) = pseudo_labels(&frames, &event, opts.top_k).with_context(|| format!("question {}", s.key))?;
    Ok(QuestionRecord {
        key: s.key.clone(),
        video: s.video.clone(),
        question: get(&t.question),
        options: t.options.iter().flat_map(|o| get(o)).collect(),
        num_options: t.options.len(),
        answer: get(&t.answer),
        event,
        event_mode: opts.event.mode().to_string(),
        event_text: t.event.clone(),
        curve,
        pseudo_labels: top,
        text_encoder: opts.text_encoder.clone(),
        texts_hash: Some(texts_hash(s)),
        video_shard: Some(video_shard),
    })
}
