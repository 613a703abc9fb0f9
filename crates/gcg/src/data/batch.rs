//! The one batch the model reads: questions with what the feature store holds for them (frame
//! features, CLIP embeddings, pseudo-labels) and their prompts as token ids, collated by
//! prefetching workers in a seeded order.
//!
//! The order of an epoch depends only on the seed and the epoch number: the sample indices are
//! shuffled by `SeededRng::new(seed).fork(epoch)` and cut into batches; batch `i` is collated by
//! worker `i mod W` and handed out in order `0, 1, 2, …` whatever W is. Each worker keeps at most
//! `prefetch` finished batches ahead (a bounded channel), so memory stays bounded and the model
//! does not wait on the disk once the workers are ahead.

use super::prompt::{PromptEncoder, PromptTokens};
use super::{Answer, QaSample};
use crate::rng::SeededRng;
use crate::store::{f16_to_bf16, f16_to_f32, Snapshot};
use crate::util::{non_finite_f16, non_finite_f32};
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use half::f16;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The T pre-processed frames of a stored video, decoded again from its source: (video id, its
/// store entry) → pixels [T, 3, S, S] (f32, CPU). Given by the layer that knows how videos are
/// decoded (see `run::build`), for the online ViT.
pub type PixelSource = Arc<dyn Fn(&str, &crate::store::VideoEntry) -> Result<Tensor> + Send + Sync>;

/// How batches are made.
#[derive(Clone)]
pub struct BatchOptions {
    pub batch_size: usize,
    pub shuffle: bool,
    pub seed: u64,
    /// Drop the last, smaller batch of an epoch.
    pub drop_last: bool,
    /// Collating threads (0: collate on the caller's thread).
    pub workers: usize,
    /// Finished batches each worker may hold ahead.
    pub prefetch: usize,
    /// dtype of the frame features (F16 as stored, F32 or BF16); `None` leaves them out.
    pub features: Option<DType>,
    /// Decode every video's frames instead of reading its features (the online ViT: the batch
    /// carries `pixel_values` and no `frame_features`).
    pub pixels: Option<PixelSource>,
    /// Where the batch tensors go (moved there on the caller's thread).
    pub device: Device,
    /// Tokenize the prompts and targets (the model's tokenizers and answer format); `None`
    /// leaves them out (store benchmarks, tests of the store).
    pub prompts: Option<PromptEncoder>,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self {
            batch_size: 4,
            shuffle: true,
            seed: 0,
            drop_last: false,
            workers: 2,
            prefetch: 2,
            features: Some(DType::F32),
            pixels: None,
            device: Device::Cpu,
            prompts: None,
        }
    }
}

/// One batch of B questions, in the paper's words.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Position of the batch in its epoch.
    pub index: usize,
    pub samples: Vec<QaSample>,
    /// Un-normalised ViT features E (when asked for). [B, T, N, Dv]
    pub frame_features: Option<Tensor>,
    /// The frames, CLIP pre-processed, when the ViT runs in the loop (`BatchOptions::pixels`;
    /// f32). [B, T, 3, S, S]
    pub pixel_values: Option<Tensor>,
    /// CLIP frame embeddings F (f32). [B, T, d]
    pub clip_frames: Tensor,
    /// CLIP text embedding of each question (f32). [B, d]
    pub clip_question: Tensor,
    /// CLIP text embeddings of the options (multiple choice; f32). [B, O, d]
    pub clip_options: Option<Tensor>,
    /// CLIP text embedding of the answer (f32). [B, d]
    pub clip_answer: Tensor,
    /// CLIP text embedding of the event text, the contrastive anchor (f32). [B, d]
    pub clip_event: Tensor,
    /// Pseudo-label scores s_t = cos(F_t, text(event)) (f32). [B, T]
    pub pseudo_label_scores: Tensor,
    /// Pseudo-labels: the top-K frames of s_t sorted by time, per sample.
    pub pseudo_labels: Vec<Vec<usize>>,
    /// The right option of each question (multiple-choice batches).
    pub answer_indices: Option<Vec<usize>>,
    /// Frame times in seconds, per sample (empty when unknown).
    pub timestamps: Vec<Vec<f64>>,
    /// Prompts and targets as token ids (when the loader tokenizes).
    pub prompts: Option<PromptTokens>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The store's pseudo-labels when they were made for `k` moments (one row of `k` frames per
    /// question); `None` when they hold another K.
    pub fn pseudo_labels_for(&self, k: usize) -> Option<&[Vec<usize>]> {
        let made_for_k = self.pseudo_labels.len() == self.samples.len() && self.pseudo_labels.iter().all(|p| p.len() == k);
        made_for_k.then_some(self.pseudo_labels.as_slice())
    }

    /// The batch with its prompts tokenized by `encoder` (for batches built by hand).
    pub fn with_prompts(mut self, encoder: &PromptEncoder) -> Result<Self> {
        let dev = self.clip_frames.device().clone();
        self.prompts = Some(encoder.encode(&self.samples)?.into_device(&dev)?);
        Ok(self)
    }

    /// The batch's tensors on `dev`.
    pub fn into_device(self, dev: &Device) -> Result<Self> {
        if dev.is_cpu() {
            return Ok(self);
        }
        let mv = |t: Tensor| t.to_device(dev);
        Ok(Self {
            frame_features: self.frame_features.map(mv).transpose()?,
            pixel_values: self.pixel_values.map(mv).transpose()?,
            clip_frames: mv(self.clip_frames)?,
            clip_question: mv(self.clip_question)?,
            clip_options: self.clip_options.map(mv).transpose()?,
            clip_answer: mv(self.clip_answer)?,
            clip_event: mv(self.clip_event)?,
            pseudo_label_scores: mv(self.pseudo_label_scores)?,
            prompts: self.prompts.map(|p| p.into_device(dev)).transpose()?,
            ..self
        })
    }
}

/// Makes batches of `samples` from a store snapshot.
#[derive(Clone)]
pub struct BatchLoader {
    snap: Arc<Snapshot>,
    samples: Arc<Vec<QaSample>>,
    opts: BatchOptions,
}

impl BatchLoader {
    /// Checks up front that every sample has features and labels in the snapshot, and that the
    /// frame counts, option counts and K agree (a batch is stacked).
    pub fn new(snap: Arc<Snapshot>, samples: Vec<QaSample>, opts: BatchOptions) -> Result<Self> {
        ensure!(opts.batch_size > 0, "batch size must be at least 1");
        ensure!(!samples.is_empty(), "no samples to batch");
        if let Some(dt) = opts.features {
            ensure!(
                matches!(dt, DType::F16 | DType::F32 | DType::BF16),
                "batch features dtype {dt:?}: expected f16, f32 or bf16"
            );
        }
        let mut missing = Vec::new();
        let mut shape: Option<(usize, usize, usize, String)> = None;
        for s in &samples {
            let (v, q) = (snap.index().videos.get(&s.video), snap.index().questions.get(&s.key));
            let (Some(v), Some(q)) = (v, q) else {
                missing.push(match (v, q) {
                    (None, None) => format!("{} (video {} has no features, the question no labels)", s.key, s.video),
                    (None, _) => format!("{} (video {} has no features)", s.key, s.video),
                    _ => format!("{} (no labels: run `gcg labels`)", s.key),
                });
                continue;
            };
            ensure!(
                q.video == s.video,
                "sample {}: the store labelled this key for video {}, the annotations say video {}",
                s.key,
                q.video,
                s.video
            );
            ensure!(
                q.num_options == s.options.len(),
                "sample {}: {} options in the annotations, {} in the store",
                s.key,
                s.options.len(),
                q.num_options
            );
            let this = (v.num_frames, q.num_options, q.pseudo_labels.len());
            match &shape {
                None => shape = Some((this.0, this.1, this.2, s.key.clone())),
                Some((t, o, k, first)) => ensure!(
                    (*t, *o, *k) == this,
                    "samples {first} and {} cannot share a batch: (frames, options, K) = {:?} vs {:?}",
                    s.key,
                    (t, o, k),
                    this
                ),
            }
        }
        if opts.features.is_some() && opts.pixels.is_none() {
            let without: Vec<&str> = samples
                .iter()
                .filter_map(|s| {
                    snap.index()
                        .videos
                        .get(&s.video)
                        .filter(|v| v.features.is_none())
                        .map(|_| s.video.as_str())
                })
                .collect();
            if !without.is_empty() {
                bail!(
                    "{} of the samples' videos were stored without their ViT features in {} (gcg features --embeddings-only), \
                     e.g. {}: train with `[data] online_vit = true` (the frames are decoded and the ViT runs in the loop)",
                    without.len(),
                    snap.dir().display(),
                    without.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
                );
            }
        }
        if !missing.is_empty() {
            let no_video = samples.iter().filter(|s| !snap.index().videos.contains_key(&s.video)).count();
            bail!(
                "{} of {} samples are missing from the feature store {} ({} whose video has no features: `gcg features`; \
                 {} without labels: `gcg labels`), e.g. {}",
                missing.len(),
                samples.len(),
                snap.dir().display(),
                no_video,
                missing.len() - no_video,
                missing.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
            );
        }
        Ok(Self {
            snap,
            samples: Arc::new(samples),
            opts,
        })
    }

    pub fn samples(&self) -> &[QaSample] {
        &self.samples
    }

    /// The store snapshot the batches are read from.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snap.clone()
    }

    pub fn options(&self) -> &BatchOptions {
        &self.opts
    }

    pub fn num_batches(&self) -> usize {
        let n = self.samples.len();
        if self.opts.drop_last {
            n / self.opts.batch_size
        } else {
            n.div_ceil(self.opts.batch_size)
        }
    }

    /// The sample indices of each batch of `epoch`.
    pub fn epoch_batches(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.samples.len()).collect();
        if self.opts.shuffle {
            SeededRng::new(self.opts.seed).fork(epoch).shuffle(&mut order);
        }
        let mut batches: Vec<Vec<usize>> = order.chunks(self.opts.batch_size).map(<[usize]>::to_vec).collect();
        if self.opts.drop_last && batches.last().is_some_and(|b| b.len() < self.opts.batch_size) {
            batches.pop();
        }
        batches
    }

    /// Collates the samples at `indices` (on this thread, on the CPU).
    pub fn collate(&self, index: usize, indices: &[usize]) -> Result<Batch> {
        collate(&self.snap, &self.samples, index, indices, &self.opts)
    }

    /// The batches of `epoch`, in order, collated by the workers ahead of the caller.
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        let batches = Arc::new(self.epoch_batches(epoch));
        let stop = Arc::new(AtomicBool::new(false));
        let w = self.opts.workers;
        let mut receivers = Vec::with_capacity(w);
        let mut handles = Vec::with_capacity(w);
        for worker in 0..w {
            let (tx, rx) = sync_channel::<Result<Batch>>(self.opts.prefetch.max(1));
            let (w_snap, w_samples, w_batches, w_stop, w_opts) = (
                self.snap.clone(),
                self.samples.clone(),
                batches.clone(),
                stop.clone(),
                self.opts.clone(),
            );
            let h = std::thread::Builder::new().name(format!("gcg-batch-{worker}")).spawn(move || {
                for i in (worker..w_batches.len()).step_by(w) {
                    if w_stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let b = collate(&w_snap, &w_samples, i, &w_batches[i], &w_opts);
                    if tx.send(b).is_err() {
                        return;
                    }
                }
            });
            match h {
                Ok(h) => handles.push(h),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    return EpochIter {
                        loader: self.clone(),
                        batches,
                        next: 0,
                        receivers: Vec::new(),
                        handles,
                        stop,
                        error: Some(anyhow!("starting batch worker {worker}: {e}")),
                    };
                }
            }
            receivers.push(rx);
        }
        EpochIter {
            loader: self.clone(),
            batches,
            next: 0,
            receivers,
            handles,
            stop,
            error: None,
        }
    }
}

/// The batches of one epoch, in order.
pub struct EpochIter {
    loader: BatchLoader,
    batches: Arc<Vec<Vec<usize>>>,
    next: usize,
    receivers: Vec<Receiver<Result<Batch>>>,
    handles: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    error: Option<anyhow::Error>,
}

impl EpochIter {
    pub fn len(&self) -> usize {
        self.batches.len()
    }
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if let Some(e) = self.error.take() {
            self.next = self.batches.len();
            return Some(Err(e));
        }
        if self.next >= self.batches.len() {
            return None;
        }
        let i = self.next;
        self.next += 1;
        let b = if self.receivers.is_empty() {
            self.loader.collate(i, &self.batches[i])
        } else {
            let w = self.receivers.len();
            self.receivers[i % w]
                .recv()
                .map_err(|_| anyhow!("batch worker {} stopped before batch {i}", i % w))
                .and_then(|b| b)
        };
        Some(b.and_then(|b| b.into_device(&self.loader.opts.device)))
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.receivers.clear(); // unblocks workers waiting to send
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Batch `index`: the samples at `indices` gathered from the store into CPU tensors.
fn collate(snap: &Snapshot, samples: &[QaSample], index: usize, indices: &[usize], opts: &BatchOptions) -> Result<Batch> {
    let b = indices.len();
    ensure!(b > 0, "batch {index} is empty");
    let first = &samples[indices[0]];
    let q0 = snap.question(&first.key)?;
    let (t, o, k) = (q0.num_frames, q0.num_options, q0.pseudo_labels.len());
    let meta = snap.meta().ok_or_else(|| anyhow!("the feature store has no videos"))?;
    let mut buf = BatchBuffers::new(
        opts.features,
        opts.pixels.clone(),
        b,
        (t, o, k),
        (meta.tokens, meta.width, meta.embed_dim),
    );
    for (j, &si) in indices.iter().enumerate() {
        let s = samples
            .get(si)
            .ok_or_else(|| anyhow!("batch {index}: sample index {si} out of range"))?;
        buf.push(snap, index, j, s)?;
    }
    buf.into_batch(index, opts)
}

/// A batch of questions that are not in the store (`gcg ask`): each sample's video is read from
/// `snap` as [`BatchLoader`] reads it, and its CLIP text embeddings are given (`text_rows[j]`:
/// the question, then its options, [1 + O, E] row-major). Such questions have no answer, event
/// text or pseudo-labels: those tensors are zeros, `pseudo_labels` and `answer_indices` are empty.
/// Every sample must have the same number of options.
pub fn collate_unlabelled(
    snap: &Snapshot,
    samples: &[QaSample],
    text_rows: &[Vec<f32>],
    index: usize,
    opts: &BatchOptions,
) -> Result<Batch> {
    let b = samples.len();
    ensure!(b > 0, "batch {index} is empty");
    ensure!(
        text_rows.len() == b,
        "batch {index}: {} rows of text embeddings for {b} questions",
        text_rows.len()
    );
    let first = &samples[0];
    let t = snap.video(&first.video)?.num_frames;
    let o = first.options.len();
    let meta = snap.meta().ok_or_else(|| anyhow!("the feature store has no videos"))?;
    let mut buf = BatchBuffers::new(
        opts.features,
        opts.pixels.clone(),
        b,
        (t, o, 0),
        (meta.tokens, meta.width, meta.embed_dim),
    );
    for (j, (s, rows)) in samples.iter().zip(text_rows).enumerate() {
        buf.push_unlabelled(snap, index, j, s, rows)?;
    }
    buf.into_batch(index, opts)
}

/// The CPU buffers a batch is gathered into, sample by sample, before they become its tensors.
struct BatchBuffers {
    /// The frame features' dtype (None: the batch carries none).
    features: Option<DType>,
    /// Batch size; frames, options and K of every sample; ViT tokens and width; CLIP embedding size.
    b: usize,
    t: usize,
    o: usize,
    k: usize,
    n: usize,
    d: usize,
    e: usize,
    f16_buf: Vec<f16>,
    f32_buf: Vec<f32>,
    /// The online ViT's frames: the source, and [B, T, 3, S, S] gathered (S from the first video).
    pixels: Option<PixelSource>,
    pixel_buf: Vec<f32>,
    pixel_size: usize,
    frame_embeds: Vec<f32>,
    text: Vec<f32>,
    answer: Vec<f32>,
    event: Vec<f32>,
    labels: Vec<Vec<usize>>,
    curves: Vec<f32>,
    answers: Vec<Option<usize>>,
    timestamps: Vec<Vec<f64>>,
    rows: Vec<f32>,
    samples: Vec<QaSample>,
}

impl BatchBuffers {
    /// Empty buffers for `b` samples of (frames, options, K) and the store's (tokens, width,
    /// embed_dim).
    fn new(
        features: Option<DType>,
        pixels: Option<PixelSource>,
        b: usize,
        (t, o, k): (usize, usize, usize),
        (n, d, e): (usize, usize, usize),
    ) -> Self {
        let per_video = t * n * d;
        let mut f16_buf: Vec<f16> = Vec::new();
        let mut f32_buf: Vec<f32> = Vec::new();
        // The online ViT's frames replace the stored features.
        let features = if pixels.is_some() { None } else { features };
        match features {
            Some(DType::F32) => f32_buf = vec![0f32; b * per_video],
            Some(_) => f16_buf = Vec::with_capacity(b * per_video),
            None => {}
        }
        Self {
            features,
            pixels,
            pixel_buf: Vec::new(),
            pixel_size: 0,
            b,
            t,
            o,
            k,
            n,
            d,
            e,
            f16_buf,
            f32_buf,
            frame_embeds: Vec::with_capacity(b * t * e),
            text: vec![0f32; b * (1 + o) * e],
            answer: vec![0f32; b * e],
            event: vec![0f32; b * e],
            labels: Vec::with_capacity(b),
            curves: Vec::with_capacity(b * t),
            answers: Vec::with_capacity(b),
            timestamps: Vec::with_capacity(b),
            rows: vec![0f32; (o + 3) * e],
            samples: Vec::with_capacity(b),
        }
    }

    /// Gathers sample `s` from the store into row `j` of batch `index`; its sizes must match the batch's.
    fn push(&mut self, snap: &Snapshot, index: usize, j: usize, s: &QaSample) -> Result<()> {
        let (t, o, k, e) = (self.t, self.o, self.k, self.e);
        let q = snap.question(&s.key)?;
        let v = snap.video(&s.video)?;
        ensure!(
            (v.num_frames, q.num_options, q.pseudo_labels.len()) == (t, o, k),
            "batch {index}: sample {} has (frames, options, K) = {:?}, the batch {:?}",
            s.key,
            (v.num_frames, q.num_options, q.pseudo_labels.len()),
            (t, o, k)
        );
        if self.pixels.is_some() {
            self.push_pixels(snap, s)?;
        } else if self.features.is_some() {
            self.push_features(snap, j, s)?;
        }
        let frame_embeds = snap.frame_embeds(&s.video)?.to_f32()?;
        finite(snap, s, "CLIP frame embeddings [T, E]", &frame_embeds, &[t, e])?;
        self.frame_embeds.extend(frame_embeds);
        let rows = &mut self.rows;
        snap.question_rows_into(q, rows).with_context(|| format!("sample {}", s.key))?;
        finite(
            snap,
            s,
            "CLIP text embeddings [question, options, answer, event]",
            rows,
            &[o + 3, e],
        )?;
        self.text[j * (1 + o) * e..(j + 1) * (1 + o) * e].copy_from_slice(&rows[..(1 + o) * e]);
        self.answer[j * e..(j + 1) * e].copy_from_slice(&rows[(1 + o) * e..(2 + o) * e]);
        self.event[j * e..(j + 1) * e].copy_from_slice(&rows[(2 + o) * e..]);
        self.labels.push(q.pseudo_labels.iter().map(|&x| x as usize).collect::<Vec<_>>());
        let curve = snap.curve(&s.key)?;
        finite(snap, s, "similarity curve s_t", &curve, &[t])?;
        self.curves.extend(curve);
        self.answers.push(match s.answer {
            Answer::Choice(i) => Some(i),
            Answer::Text(_) => None,
        });
        self.timestamps.push(v.timestamps.clone());
        self.samples.push(s.clone());
        Ok(())
    }

    /// Gathers question `s` (not in the store) into row `j` of batch `index`: its video from the
    /// store, its text embeddings `rows` [1 + O, E] as given.
    fn push_unlabelled(&mut self, snap: &Snapshot, index: usize, j: usize, s: &QaSample, rows: &[f32]) -> Result<()> {
        let (t, o, e) = (self.t, self.o, self.e);
        let v = snap.video(&s.video)?;
        ensure!(
            (v.num_frames, s.options.len()) == (t, o),
            "batch {index}: question {} has (frames, options) = {:?}, the batch {:?}",
            s.key,
            (v.num_frames, s.options.len()),
            (t, o)
        );
        ensure!(
            rows.len() == (1 + o) * e,
            "question {}: {} text-embedding values, expected [1 + {o} options, {e}]",
            s.key,
            rows.len()
        );
        if let Some(bad) = non_finite_f32(rows) {
            bail!(
                "question {}: its CLIP text embeddings [question, options] hold {} (the CLIP text tower's weights are not finite?)",
                s.key,
                bad.describe(&[1 + o, e])
            );
        }
        if self.pixels.is_some() {
            self.push_pixels(snap, s)?;
        } else if self.features.is_some() {
            self.push_features(snap, j, s)?;
        }
        let frame_embeds = snap.frame_embeds(&s.video)?.to_f32()?;
        finite(snap, s, "CLIP frame embeddings [T, E]", &frame_embeds, &[t, e])?;
        self.frame_embeds.extend(frame_embeds);
        self.text[j * (1 + o) * e..(j + 1) * (1 + o) * e].copy_from_slice(rows);
        self.labels.push(Vec::new());
        self.curves.extend(std::iter::repeat_n(0f32, t));
        self.answers.push(None);
        self.timestamps.push(v.timestamps.clone());
        self.samples.push(s.clone());
        Ok(())
    }

    /// The frames of sample `s`'s video, decoded again (the online ViT), appended.
    fn push_pixels(&mut self, snap: &Snapshot, s: &QaSample) -> Result<()> {
        let Some(source) = &self.pixels else { return Ok(()) };
        let v = snap.video(&s.video)?;
        let px = source(&s.video, v).with_context(|| format!("decoding the frames of video {} (question {})", s.video, s.key))?;
        let dims = px.dims().to_vec();
        let size = dims.get(2).copied().unwrap_or(0);
        ensure!(
            dims.len() == 4 && dims[0] == self.t && dims[1] == 3 && dims[3] == size && size > 0,
            "video {}: decoded frames of shape {dims:?}, expected [{}, 3, S, S]",
            s.video,
            self.t
        );
        if self.pixel_size == 0 {
            self.pixel_size = size;
        }
        ensure!(
            size == self.pixel_size,
            "video {}: frames of {size}×{size} pixels, the batch's are {}×{}",
            s.video,
            self.pixel_size,
            self.pixel_size
        );
        let values = px.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if let Some(bad) = non_finite_f32(&values) {
            bail!("video {}: its decoded frames hold {}", s.video, bad.describe(&dims));
        }
        self.pixel_buf.extend(values);
        Ok(())
    }

    /// The frame features of sample `s` (stored f16) into row `j`, widened to f32 when the batch is f32.
    fn push_features(&mut self, snap: &Snapshot, j: usize, s: &QaSample) -> Result<()> {
        let per_video = self.t * self.n * self.d;
        let m = snap.features(&s.video)?;
        let src = m.as_f16()?;
        ensure!(
            src.len() == per_video,
            "video {}: {} feature values, expected {per_video}",
            s.video,
            src.len()
        );
        if let Some(bad) = non_finite_f16(&src) {
            bail!(
                "video {} (question {}): its stored ViT features hold {} in the feature store {} \
                 (`gcg store verify --values --repair` drops such records; `gcg features` recomputes them)",
                s.video,
                s.key,
                bad.describe(m.shape()),
                snap.dir().display()
            );
        }
        if self.features == Some(DType::F32) {
            f16_to_f32(&src, &mut self.f32_buf[j * per_video..(j + 1) * per_video]);
        } else {
            self.f16_buf.extend_from_slice(&src);
        }
        Ok(())
    }

    /// The gathered samples as batch `index`'s tensors (on the CPU), with the prompts tokenized.
    fn into_batch(self, index: usize, opts: &BatchOptions) -> Result<Batch> {
        let (b, t, o, n, d, e) = (self.b, self.t, self.o, self.n, self.d, self.e);
        let cpu = Device::Cpu;
        let features = match self.features {
            None => None,
            Some(DType::F32) => Some(Tensor::from_vec(self.f32_buf, (b, t, n, d), &cpu)?),
            Some(DType::BF16) => Some(Tensor::from_vec(f16_to_bf16(&self.f16_buf), (b, t, n, d), &cpu)?),
            Some(_) => Some(Tensor::from_vec(self.f16_buf, (b, t, n, d), &cpu)?),
        };
        let answer_indices = if self.answers.iter().all(Option::is_some) {
            Some(self.answers.into_iter().flatten().collect())
        } else {
            None
        };
        // [B, 1 + O, d]: the question, then its options.
        let text = Tensor::from_vec(self.text, (b, 1 + o, e), &cpu)?;
        let clip_question = text.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?;
        let clip_options = if o > 0 { Some(text.narrow(1, 1, o)?.contiguous()?) } else { None };
        let prompts = match &opts.prompts {
            Some(enc) => Some(
                enc.encode(&self.samples)
                    .with_context(|| format!("batch {index}: tokenizing the prompts"))?,
            ),
            None => None,
        };
        let pixel_values = match self.pixels {
            Some(_) => {
                let sz = self.pixel_size;
                Some(Tensor::from_vec(self.pixel_buf, (b, t, 3, sz, sz), &cpu)?)
            }
            None => None,
        };
        Ok(Batch {
            index,
            samples: self.samples,
            frame_features: features,
            pixel_values,
            clip_frames: Tensor::from_vec(self.frame_embeds, (b, t, e), &cpu)?,
            clip_question,
            clip_options,
            clip_answer: Tensor::from_vec(self.answer, (b, e), &cpu)?,
            clip_event: Tensor::from_vec(self.event, (b, e), &cpu)?,
            pseudo_label_scores: Tensor::from_vec(self.curves, (b, t), &cpu)?,
            pseudo_labels: self.labels,
            answer_indices,
            timestamps: self.timestamps,
            prompts,
        })
    }
}

/// An error naming the sample, its video and the tensor when `xs` holds NaN or ±∞ (a store
/// written before the writer refused such values, or altered since).
fn finite(snap: &Snapshot, s: &QaSample, what: &str, xs: &[f32], shape: &[usize]) -> Result<()> {
    match non_finite_f32(xs) {
        None => Ok(()),
        Some(bad) => bail!(
            "question {} (video {}): its stored {what} hold {} in the feature store {} \
             (`gcg store verify --values --repair` drops such records; `gcg features` / `gcg labels` recompute them)",
            s.key,
            s.video,
            bad.describe(shape),
            snap.dir().display()
        ),
    }
}
