//! Asking about one video: `gcg ask` and `gcg serve`.
//!
//! ```text
//! video file / frame folder ─content hash─▶ cached? ──no──▶ decode T frames ─▶ ViT + CLIP image
//!                                            │                head ─▶ the ask cache (a feature store)
//!                                            ▼
//! question (+ options) ─CLIP text─▶ batch (collate_unlabelled, as the store's batches are read)
//!                                   ─▶ GcgModel::answer ─▶ answer, option scores, K moments, p(t)
//! ```
//!
//! A video's features go through the same code as `gcg features` into a feature store, the **ask
//! cache**, under the video's content hash: a second question about the same video skips the
//! decoding and the ViT, and the batch the model reads is made exactly as `gcg predict` makes it
//! from a store. The cache is one store per front end and T (a folder named by their
//! fingerprint), so features of different networks are never mixed.

pub mod frontend;

pub use frontend::{FrontEnd, FrontEndSpec};

use crate::data::{self, collate_unlabelled, BatchOptions, QaSample, OPTION_LETTERS};
use crate::features::extract::{
    decoded_frames, extract_features, model_frames, safetensors_frames, ExtractOptions, FeatureModels, VideoFrames, VideoJob,
};
use crate::features::labels::{question_text, ClipTextEncoder};
use crate::model::{Answered, Mode};
use crate::run::{build_model, BuiltModel, RunConfig};
use crate::store::Store;
use crate::video::{Ffmpeg, Sampling};
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A video that could not be decoded or encoded (the input's fault, not the machine's): its
/// message names the file and why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UnreadableVideo(pub String);

/// A video whose frames are larger than a reader takes ([`FrameReader::max_pixels`]): a limit of
/// the server's, not a fault of the file.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FramesTooLarge(pub String);

/// Longest question or option accepted (characters).
pub const MAX_TEXT_CHARS: usize = 1000;

/// A question about a video, with its candidate answers (none: open-ended). Any other key is an
/// error naming it (a misspelt `option` must not turn a multiple-choice question into an
/// open-ended one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Question {
    pub question: String,
    #[serde(default)]
    pub options: Vec<String>,
}

impl Question {
    /// An error naming what is wrong: an empty or overlong text, one option, more options than
    /// letters, an empty option.
    pub fn validate(&self) -> Result<()> {
        let q = self.question.trim();
        ensure!(!q.trim_end_matches('?').trim().is_empty(), "the question is empty");
        ensure!(
            q.chars().count() <= MAX_TEXT_CHARS,
            "the question has {} characters, more than the {MAX_TEXT_CHARS} accepted",
            q.chars().count()
        );
        ensure!(
            self.options.len() != 1,
            "one option was given: give none (an open-ended question) or at least two"
        );
        ensure!(
            self.options.len() <= OPTION_LETTERS.len(),
            "{} options were given; at most {} ({}) are accepted",
            self.options.len(),
            OPTION_LETTERS.len(),
            OPTION_LETTERS.join(", ")
        );
        for (i, o) in self.options.iter().enumerate() {
            ensure!(!o.trim().is_empty(), "option {} is empty", OPTION_LETTERS[i]);
            ensure!(
                o.chars().count() <= MAX_TEXT_CHARS,
                "option {} has {} characters, more than the {MAX_TEXT_CHARS} accepted",
                OPTION_LETTERS[i],
                o.chars().count()
            );
        }
        Ok(())
    }
}

/// One moment the language model looked at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Moment {
    /// The frame among the video's T sampled frames.
    pub frame: usize,
    /// Its time in seconds (null when the video has no frame times).
    pub time: Option<f64>,
}

/// A grounded answer: what `gcg ask --json` prints and `POST /api/videos/{id}/ask` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroundedAnswer {
    pub question: String,
    /// The video's content id (its key in the ask cache).
    pub video: String,
    /// The answer's text: the chosen option, or the generated text.
    pub answer: String,
    /// The chosen option (null when open-ended, or when a generated text names no option).
    pub answer_index: Option<usize>,
    pub options: Vec<String>,
    /// Each option's T5 log-likelihood (option scoring).
    pub option_scores: Option<Vec<f32>>,
    /// The K moments, sorted by time.
    pub moments: Vec<Moment>,
    /// [first, last] moment in seconds (the span NExT-GQA's metrics score).
    pub span: Option<[f64; 2]>,
    /// The T sampled frames' times in seconds.
    pub timestamps: Vec<f64>,
    /// p(t) over the T frames (grounding mode; null in uniform mode).
    pub p: Option<Vec<f32>>,
    /// Seconds per stage (`hash`, `features` (decoding + ViT; 0 when cached), `text`, `answer`).
    pub seconds: BTreeMap<String, f64>,
    /// What the reader should know about this answer (e.g. a video shorter than the T frames
    /// the model reads, whose frames repeat); absent when there is nothing to say.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl GroundedAnswer {
    fn from_answered(q: &Question, video: &PreparedVideo, a: Answered) -> Self {
        let (answer, answer_index) = match &a.prediction {
            data::Answer::Choice(i) => (q.options.get(*i).cloned().unwrap_or_default(), Some(*i)),
            data::Answer::Text(t) => (t.clone(), None),
        };
        let times: Vec<Option<f64>> = a.seconds.iter().map(|s| s.is_finite().then_some(*s)).collect();
        let span = a.span();
        Self {
            question: q.question.clone(),
            video: video.id.clone(),
            answer,
            answer_index,
            options: q.options.clone(),
            option_scores: a.option_scores,
            moments: a.frames.iter().zip(times).map(|(&frame, time)| Moment { frame, time }).collect(),
            span,
            timestamps: video.timestamps.clone(),
            p: a.curve,
            seconds: video.seconds.clone(),
            notes: repeated_frames_note(&video.timestamps).into_iter().collect(),
        }
    }
}

/// A note when the sampled frames' times hold fewer distinct instants than frames: the video
/// had fewer frames than the model reads (they were repeated), so moments may share a time.
fn repeated_frames_note(timestamps: &[f64]) -> Option<String> {
    let mut distinct: Vec<f64> = timestamps.iter().copied().filter(|t| t.is_finite()).collect();
    if distinct.len() < timestamps.len() || distinct.is_empty() {
        return None;
    }
    distinct.sort_by(f64::total_cmp);
    distinct.dedup();
    let (d, t) = (distinct.len(), timestamps.len());
    (d < t).then(|| {
        format!(
            "the video gave {d} distinct frame{} for the {t} the model reads: the others repeat them, so moments can share a time",
            if d == 1 { "" } else { "s" }
        )
    })
}

/// A video whose features are in the ask cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreparedVideo {
    /// Content id (`sha256-` + the first 32 hex digits of the content's SHA-256).
    pub id: String,
    pub path: PathBuf,
    /// T and the sampled frames' times in seconds.
    pub num_frames: usize,
    pub timestamps: Vec<f64>,
    pub duration: Option<f64>,
    /// Were the features already cached?
    pub cached: bool,
    /// Seconds spent: `hash`, `features`.
    pub seconds: BTreeMap<String, f64>,
}

/// How `gcg ask` reads videos.
#[derive(Debug, Clone)]
pub struct AskOptions {
    /// Frame sampling (default: the run store's, else uniform).
    pub sampling: Option<Sampling>,
    /// Frames per ViT forward pass.
    pub frame_batch: usize,
    /// Use the decodable part of a damaged video.
    pub lenient: bool,
    /// The root of the ask caches (one store per front end and T beneath it).
    pub cache_root: PathBuf,
}

impl AskOptions {
    /// `$GCG_CACHE`, else `$XDG_CACHE_HOME/gcg/ask`, else `~/.cache/gcg/ask`.
    pub fn default_cache_root() -> PathBuf {
        crate::util::ask_cache_root()
    }
}

impl Default for AskOptions {
    fn default() -> Self {
        Self {
            sampling: None,
            frame_batch: 32,
            lenient: false,
            cache_root: Self::default_cache_root(),
        }
    }
}

/// A loaded model with its front end, ready for questions.
pub struct Asker {
    pub cfg: RunConfig,
    pub built: BuiltModel,
    pub front: FrontEnd,
    /// The ask cache (a feature store) of this front end and T.
    pub cache: PathBuf,
    pub sampling: Sampling,
    frame_batch: usize,
    ffmpeg: Ffmpeg,
}

impl Asker {
    /// Load the model of `cfg` (its `[weights] init` set to the checkpoint to use) and the front
    /// end of `spec`. When the run's store can be read, the front end must be the one that made
    /// it and T must match ([`FrontEnd::check_against_store`]).
    pub fn open(cfg: &RunConfig, spec: &FrontEndSpec, opts: &AskOptions) -> Result<Self> {
        cfg.validate()?;
        if cfg.model.mode == Mode::Oracle {
            bail!(
                "this run is in oracle mode: it places its moments at the answer's CLIP pseudo-labels, which a new \
                 question does not have; ask a grounding or uniform run"
            );
        }
        let dev = cfg.device.open()?;
        let dtype = crate::run::Precision::resolve(cfg.dtype, &dev);
        let front = FrontEnd::load(spec, &dev, dtype)?;
        let t = cfg.model.frames();
        let mut sampling = opts.sampling;
        if cfg.data.store.join(crate::store::INDEX_FILE).exists() {
            let store = Store::open(&cfg.data.store).with_context(|| format!("[data] store = {}", cfg.data.store.display()))?;
            let snap = store.snapshot();
            front.check_against_store(&snap)?;
            if let Some((id, v)) = snap.index().videos.iter().find(|(_, v)| v.num_frames != t) {
                bail!(
                    "the run's store {} holds video {id} with T = {} frames, but the model is configured for T = {t}",
                    cfg.data.store.display(),
                    v.num_frames
                );
            }
            let stored: Option<Sampling> = snap
                .index()
                .videos
                .values()
                .find_map(|v| v.extractor.as_ref().and_then(|e| e.sampling.parse().ok()));
            if let (Some(asked), Some(stored)) = (sampling, stored) {
                ensure!(
                    asked == stored,
                    "--sampling {asked}: the run's store was sampled {stored}; the model was trained on those frames"
                );
            }
            sampling = sampling.or(stored);
        } else {
            tracing::warn!(
                "the run's feature store {} is not here: the front end cannot be checked against it",
                cfg.data.store.display()
            );
        }
        let sampling = sampling.unwrap_or(Sampling::Uniform);
        let embed_dim = front.image.config.embed_dim;
        let built = build_model(cfg, embed_dim)?;
        // Everything that changes the cached features: the networks, the frames (sampling, T,
        // lenient decoding, the rules of reading a video) and the arithmetic (dtype, device).
        let mut fingerprint = crate::util::Fnv64::default();
        fingerprint.update(
            format!(
                "{}\n{}\n{sampling}\n{t}\n{dtype:?}\n{}\nlenient {}\nreading rules {}",
                front.models,
                front.text_encoder,
                cfg.device.name(),
                opts.lenient,
                crate::video::READING_RULES
            )
            .as_bytes(),
        );
        let cache = opts.cache_root.join(format!("{:016x}", fingerprint.0));
        std::fs::create_dir_all(&cache).with_context(|| format!("creating the ask cache {}", cache.display()))?;
        let about = cache.join("about.json");
        if !about.exists() {
            let text = serde_json::to_string_pretty(&serde_json::json!({
                "image_models": front.models,
                "text_encoder": front.text_encoder,
                "sampling": sampling.to_string(),
                "frames": t,
                "dtype": format!("{dtype:?}"),
                "device": cfg.device.name(),
                "lenient": opts.lenient,
                "reading_rules": crate::video::READING_RULES,
            }))?;
            crate::util::write_atomic(&about, text.as_bytes())?;
        }
        Ok(Self {
            cfg: cfg.clone(),
            built,
            front,
            cache,
            sampling,
            frame_batch: opts.frame_batch.max(1),
            ffmpeg: Ffmpeg {
                strict: !opts.lenient,
                ..Ffmpeg::from_env()
            },
        })
    }

    /// T, frames per video.
    pub fn num_frames(&self) -> usize {
        self.cfg.model.frames()
    }

    /// K, moments per answer.
    pub fn num_moments(&self) -> usize {
        self.cfg.model.moments()
    }

    /// What decoding a video for this model takes, without the model: for decoding on another
    /// thread ([`Asker::prepare_frames`] then encodes the frames).
    pub fn frame_reader(&self) -> FrameReader {
        FrameReader {
            num_frames: self.num_frames(),
            sampling: self.sampling,
            ffmpeg: self.ffmpeg.clone(),
            image_size: self.front.image_size,
            max_pixels: None,
        }
    }

    /// [`Asker::prepare_with_id`] with the frames decoded already (by [`FrameReader::read`], in
    /// `decode_seconds`, counted in `features`); they are encoded unless the content is cached.
    pub fn prepare_frames(
        &self,
        path: &Path,
        id: String,
        hash_seconds: f64,
        frames: VideoFrames,
        decode_seconds: f64,
    ) -> Result<PreparedVideo> {
        let mut frames = Some(frames);
        let mut p = self.prepare_from(path, id, hash_seconds, &mut frames)?;
        if !p.cached {
            *p.seconds.entry("features".into()).or_default() += decode_seconds;
        }
        Ok(p)
    }

    /// The features of the video (a file, a frame folder, or a `.safetensors` of pre-decoded
    /// frames) in the ask cache: computed unless its content is already there.
    pub fn prepare(&self, path: &Path) -> Result<PreparedVideo> {
        let t0 = Instant::now();
        let id = content_id(path)?;
        self.prepare_with_id(path, id, t0.elapsed().as_secs_f64())
    }

    /// [`Asker::prepare`] for a video whose content id the caller computed already
    /// ([`content_id`], in `hash_seconds`; `gcg serve` hashes an upload as it receives it).
    pub fn prepare_with_id(&self, path: &Path, id: String, hash_seconds: f64) -> Result<PreparedVideo> {
        self.prepare_from(path, id, hash_seconds, &mut None)
    }

    /// Prepares from `frames` when given (taken), else by decoding `path`.
    fn prepare_from(&self, path: &Path, id: String, hash_seconds: f64, frames: &mut Option<VideoFrames>) -> Result<PreparedVideo> {
        let t1 = Instant::now();
        // A record of the same content, made from any path, is this video.
        let store = self.cached_store()?;
        let cached = store.as_ref().is_some_and(|s| s.snapshot().contains_video(&id));
        let store = if cached {
            store
        } else {
            self.extract(&id, path, frames.take())?;
            self.cached_store()?
        };
        let features_s = if cached { 0.0 } else { t1.elapsed().as_secs_f64() };
        let store = store.ok_or_else(|| anyhow!("the ask cache {} has no index after extraction", self.cache.display()))?;
        let snap = store.snapshot();
        let v = snap.video(&id)?;
        Ok(PreparedVideo {
            id,
            path: path.to_path_buf(),
            num_frames: v.num_frames,
            timestamps: v.timestamps.clone(),
            duration: v.duration,
            cached,
            seconds: BTreeMap::from([("hash".to_string(), hash_seconds), ("features".to_string(), features_s)]),
        })
    }

    fn cached_store(&self) -> Result<Option<Store>> {
        open_cache(&self.cache)
    }

    /// Decode (unless `frames` are given), encode and store one video under `id`.
    fn extract(&self, id: &str, path: &Path, frames: Option<VideoFrames>) -> Result<()> {
        let job = VideoJob {
            id: id.to_string(),
            path: path.to_path_buf(),
        };
        let reader = self.frame_reader();
        let given = std::sync::Mutex::new(frames);
        let source = move |job: &VideoJob, t: usize| match given.lock().map(|mut g| g.take()) {
            Ok(Some(frames)) => Ok(frames),
            _ => reader.frames(job, t),
        };
        let models = FeatureModels {
            vit: &self.front.vit,
            clip: &self.front.image,
            frame_batch: self.frame_batch,
        };
        let opts = ExtractOptions {
            num_frames: self.num_frames(),
            jobs: 1,
            overwrite: false,
            extractor: Some(crate::features::provenance::extractor(
                self.sampling.to_string(),
                self.front.models.clone(),
            )),
            ..ExtractOptions::default()
        };
        let report = extract_features(&self.cache, std::slice::from_ref(&job), &source, &models, &opts, &mut |_| {})
            .with_context(|| format!("computing the features of {}", path.display()))?;
        if let Some((_, e)) = report.failed.first() {
            return Err(UnreadableVideo(format!("{}: {e}", path.display())).into());
        }
        Ok(())
    }

    /// Answer `questions` about a prepared video, batched (questions with the same number of
    /// options go through the model together, `[train] batch_size` at a time).
    pub fn ask(&self, video: &PreparedVideo, questions: &[Question]) -> Result<Vec<GroundedAnswer>> {
        // Nothing trains here: one no-grad scope over every batch, so a bf16 model casts its
        // f32 Q-Former weights to bf16 once, not per batch (nn::cast::cast_weight).
        let _casts_kept = crate::nn::no_grad();
        for (i, q) in questions.iter().enumerate() {
            q.validate().with_context(|| {
                if questions.len() > 1 {
                    format!("question {} ({:?})", i + 1, q.question)
                } else {
                    format!("question {:?}", q.question)
                }
            })?;
        }
        let store = self.cached_store()?.ok_or_else(|| {
            anyhow!(
                "video {} is not in the ask cache {} (prepare it first)",
                video.id,
                self.cache.display()
            )
        })?;
        let snap = store.snapshot();
        ensure!(
            snap.contains_video(&video.id),
            "video {} ({}) is not in the ask cache {} (was the cache cleared?)",
            video.id,
            video.path.display(),
            self.cache.display()
        );
        let samples: Vec<QaSample> = questions
            .iter()
            .enumerate()
            .map(|(i, q)| QaSample {
                dataset: self.cfg.data.dataset,
                key: format!("ask-{i}"),
                qid: i.to_string(),
                video: video.id.clone(),
                question: q.question.trim().trim_end_matches('?').trim_end().to_string(),
                options: q.options.iter().map(|o| o.trim().to_string()).collect(),
                answer: data::Answer::Text(String::new()),
                qtype: String::new(),
                extra: Default::default(),
            })
            .collect();
        let encoder = ClipTextEncoder {
            model: &self.front.text,
            tokenizer: &self.front.tokenizer,
            device: self.front.device.clone(),
            batch_size: 64,
        };
        let opts = BatchOptions {
            batch_size: self.cfg.train.batch_size.max(1),
            features: Some(self.built.feature_dtype()),
            device: self.built.device.clone(),
            prompts: Some(self.built.model.prompt_encoder()),
            ..BatchOptions::default()
        };
        // Groups of questions with the same number of options, in order of first appearance.
        let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, s) in samples.iter().enumerate() {
            groups.entry(s.options.len()).or_default().push(i);
        }
        let mut out: Vec<Option<GroundedAnswer>> = vec![None; samples.len()];
        for idx in groups.values() {
            for chunk in idx.chunks(opts.batch_size) {
                let t0 = Instant::now();
                let part: Vec<QaSample> = chunk.iter().map(|&i| samples[i].clone()).collect();
                let rows = part
                    .iter()
                    .map(|s| {
                        let mut texts = vec![question_text(s)];
                        texts.extend(s.options.iter().cloned());
                        Ok(encoder.encode(&texts)?.into_iter().flatten().collect::<Vec<f32>>())
                    })
                    .collect::<Result<Vec<_>>>()?;
                let text_s = t0.elapsed().as_secs_f64();
                let t1 = Instant::now();
                let batch = collate_unlabelled(&snap, &part, &rows, 0, &opts)?.into_device(&self.built.device)?;
                let answered = self.built.model.answer(&batch)?;
                let answer_s = t1.elapsed().as_secs_f64();
                for (&i, a) in chunk.iter().zip(answered) {
                    let mut g = GroundedAnswer::from_answered(&questions[i], video, a);
                    let n = chunk.len() as f64;
                    g.seconds.insert("text".into(), text_s / n);
                    g.seconds.insert("answer".into(), answer_s / n);
                    out[i] = Some(g);
                }
            }
        }
        out.into_iter()
            .enumerate()
            .map(|(i, a)| a.ok_or_else(|| anyhow!("question {} was not answered", i + 1)))
            .collect()
    }
}

/// The longest side of the pictures [`FrameReader::read`] writes for showing.
pub const PICTURE_SIDE: u32 = 640;

/// How an [`Asker`] reads a video's frames (no network: cheap to clone, for any thread).
#[derive(Debug, Clone)]
pub struct FrameReader {
    num_frames: usize,
    sampling: Sampling,
    ffmpeg: Ffmpeg,
    image_size: usize,
    /// Largest frame (width × height) decoded; a video of larger frames is an
    /// [`UnreadableVideo`] (a server's limit: T frames of 4096² take 1.6 GB while decoded).
    pub max_pixels: Option<u64>,
}

impl FrameReader {
    /// The T frames the model reads, and, with `pictures`, the sampled frames written there as
    /// `frame_{i}.jpg` + `frames.json` for showing (from the same decoding; at most
    /// [`PICTURE_SIDE`] pixels a side: a viewer's thumbnails, not 4K JPEGs). A video that cannot
    /// be read, or has frames over `max_pixels`, is an [`UnreadableVideo`].
    pub fn read(&self, path: &Path, pictures: Option<&Path>) -> Result<VideoFrames> {
        let unreadable = |e: anyhow::Error| anyhow::Error::from(UnreadableVideo(format!("{e:#}")));
        if path.extension().is_some_and(|e| e == "safetensors") {
            ensure!(pictures.is_none(), "{} holds pre-processed frames, not pictures", path.display());
            return self.frames(
                &VideoJob {
                    id: String::new(),
                    path: path.to_path_buf(),
                },
                self.num_frames,
            );
        }
        if let Some(max) = self.max_pixels.filter(|_| path.is_file()) {
            let info = self.ffmpeg.probe(path).map_err(unreadable)?;
            let pixels = info.width as u64 * info.height as u64;
            if pixels > max {
                return Err(FramesTooLarge(format!(
                    "{}: its frames are {}×{} ({} megapixels); this server decodes frames of at most {} megapixels",
                    path.display(),
                    info.width,
                    info.height,
                    pixels as f64 / 1e6,
                    max as f64 / 1e6
                ))
                .into());
            }
        }
        let sampled = crate::video::load_frames(path, self.num_frames, self.sampling, &self.ffmpeg).map_err(unreadable)?;
        if let Some(out) = pictures {
            crate::video::write_frames(&sampled.downscaled(PICTURE_SIDE), out, true)?;
        }
        model_frames(&sampled, self.image_size)
    }

    /// The frames of `job` as feature extraction reads them (a `.safetensors` of pre-processed
    /// frames, or decoded).
    fn frames(&self, job: &VideoJob, t: usize) -> Result<VideoFrames> {
        if job.path.extension().is_some_and(|e| e == "safetensors") {
            safetensors_frames(job, t)
        } else {
            decoded_frames(job, t, self.sampling, &self.ffmpeg, self.image_size)
        }
    }
}

fn open_cache(cache: &Path) -> Result<Option<Store>> {
    if !cache.join(crate::store::INDEX_FILE).exists() {
        return Ok(None);
    }
    Ok(Some(
        Store::open(cache).with_context(|| format!("opening the ask cache {}", cache.display()))?,
    ))
}

/// Is video `id`'s content in the ask cache `cache`?
pub fn in_cache(cache: &Path, id: &str) -> Result<bool> {
    Ok(open_cache(cache)?.is_some_and(|s| s.snapshot().contains_video(id)))
}

/// Bytes the features of video `id` take in the ask cache `cache` (its shard file; 0 when it is
/// not there).
pub fn cached_bytes(cache: &Path, id: &str) -> Result<u64> {
    let Some(store) = open_cache(cache)? else { return Ok(0) };
    let snap = store.snapshot();
    let Some(v) = snap.index().videos.get(id) else { return Ok(0) };
    Ok(std::fs::metadata(cache.join(crate::store::SHARD_DIR).join(&v.shard))
        .map(|m| m.len())
        .unwrap_or(0))
}

/// Removes videos' features from the ask cache `cache` (a video asked about again is computed
/// again). Returns the bytes freed.
pub fn forget(cache: &Path, ids: &[&str]) -> Result<u64> {
    if !cache.join(crate::store::INDEX_FILE).exists() {
        return Ok(0);
    }
    let mut w = crate::store::StoreWriter::open(cache, crate::store::WriterOptions::default())?;
    let freed = w.remove_videos(ids)?;
    w.finish()?;
    Ok(freed)
}

/// A content id of a video file, a frame folder (its files' names and bytes, in name order) or
/// a frames file: `sha256-` and the first 32 hex digits of the SHA-256.
pub fn content_id(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("the video {} cannot be read", path.display()))?;
    let mut h = Sha256::new();
    if meta.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("listing {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        ensure!(!files.is_empty(), "the frame folder {} is empty", path.display());
        for f in files {
            let name = f.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update(std::fs::metadata(&f)?.len().to_le_bytes());
            hash_file(&mut h, &f)?;
        }
    } else {
        ensure!(meta.len() > 0, "the video {} is empty (0 bytes)", path.display());
        hash_file(&mut h, path)?;
    }
    let digest = h.finalize();
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    Ok(format!("sha256-{hex}"))
}

fn hash_file(h: &mut Sha256, path: &Path) -> Result<()> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

/// The text `gcg ask` prints for an answer.
pub fn describe(a: &GroundedAnswer) -> String {
    let mut s = format!("Q: {}\nA: {}", a.question, a.answer);
    if let Some(i) = a.answer_index {
        s.push_str(&format!(" ({})", OPTION_LETTERS.get(i).copied().unwrap_or("?")));
    }
    s.push('\n');
    if let Some(scores) = &a.option_scores {
        let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f64> = scores.iter().map(|x| ((x - max) as f64).exp()).collect();
        let z: f64 = exp.iter().sum();
        for (i, (o, sc)) in a.options.iter().zip(scores).enumerate() {
            let mark = if Some(i) == a.answer_index { "*" } else { " " };
            s.push_str(&format!(
                "  {mark} {}: {o}  (log-likelihood {sc:.3}, p {:.2})\n",
                OPTION_LETTERS.get(i).copied().unwrap_or("?"),
                exp[i] / z
            ));
        }
    }
    // Moments at the same time (a video with fewer frames than T) are listed once.
    let mut moments: Vec<(Option<f64>, Vec<usize>)> = Vec::new();
    for m in &a.moments {
        match moments.last_mut() {
            Some((Some(t), frames)) if m.time == Some(*t) => frames.push(m.frame),
            _ => moments.push((m.time, vec![m.frame])),
        }
    }
    let moments: Vec<String> = moments
        .iter()
        .map(|(time, frames)| {
            let list = frames.iter().map(|f| f.to_string()).collect::<Vec<_>>().join(", ");
            let frames = if frames.len() == 1 {
                format!("frame {list}")
            } else {
                format!("frames {list}")
            };
            match time {
                Some(t) => format!("{t:.2} s ({frames})"),
                None => frames,
            }
        })
        .collect();
    s.push_str(&format!("moments: {}\n", moments.join(", ")));
    if let Some([a0, a1]) = a.span {
        s.push_str(&format!("span: {a0:.2} s – {a1:.2} s\n"));
    }
    for n in &a.notes {
        s.push_str(&format!("note: {n}\n"));
    }
    s
}
