//! Frames → frozen ViT → store, for many videos: decoding in worker threads while the model runs
//! on the caller's thread, shards written by a writer thread, resumable and failure-tolerant.
//!
//! ```text
//! jobs ─▶ W decode threads (FrameSource: frames, pre-processed) ─▶ bounded channel
//!      ─▶ caller: ViT (un-normalised last hidden state, rounded to f16) ─▶ CLIP image head on the
//!         f16-rounded features (as the official code computes them from the cache)
//!      ─▶ bounded channel ─▶ writer thread (StoreWriter: shards + index)
//! ```
//!
//! Videos already in the store are skipped, so a run stopped at any point is resumed by running
//! it again; records buffered but not yet written are redone. A video that fails (unreadable,
//! too short, a model error) is reported in [`ExtractReport::failed`] and the others go on.

use crate::models::clip_branch::ClipImageHead;
use crate::models::vit::VisionModel;
use crate::store::{Extractor, Index, StoreMeta, StoreWriter, VideoRecord, WriterOptions};
use crate::video::{uniform_indices, UniformRule};
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Tensor};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::{Scope, ScopedJoinHandle};

/// One video to process.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoJob {
    /// The id the store files it under (the annotations' video id).
    pub id: String,
    pub path: PathBuf,
}

/// The sampled, model-ready frames of one video.
#[derive(Debug, Clone)]
pub struct VideoFrames {
    /// CLIP-pre-processed pixels [T, 3, S, S] (f32, on the CPU).
    pub pixel_values: Tensor,
    /// Time of each frame in seconds (empty when unknown).
    pub timestamps: Vec<f64>,
    pub duration: Option<f64>,
    pub fps: Option<f64>,
}

/// Gives the T pre-processed frames of a video (decoding, sampling, resizing, normalising).
/// Called from several threads at once.
pub trait FrameSource: Send + Sync {
    fn frames(&self, job: &VideoJob, num_frames: usize) -> Result<VideoFrames>;
}

impl<F> FrameSource for F
where
    F: Fn(&VideoJob, usize) -> Result<VideoFrames> + Send + Sync,
{
    fn frames(&self, job: &VideoJob, num_frames: usize) -> Result<VideoFrames> {
        self(job, num_frames)
    }
}

/// The frozen networks: the ViT and the CLIP branch's image head.
pub struct FeatureModels<'a> {
    pub vit: &'a VisionModel,
    pub clip: &'a ClipImageHead,
    /// Frames per ViT forward pass.
    pub frame_batch: usize,
}

impl FeatureModels<'_> {
    /// Pixels [T, 3, S, S] → (features [T, N, D] rounded to f16, CLIP frame embeddings [T, E]).
    pub fn encode(&self, pixel_values: &Tensor) -> Result<(Tensor, Tensor)> {
        self.encode_timed(pixel_values).map(|(f, e, _)| (f, e))
    }

    /// [`Self::encode`], with the seconds spent in the ViT and in the CLIP branch (the device
    /// synchronised before each clock reading).
    pub fn encode_timed(&self, pixel_values: &Tensor) -> Result<(Tensor, Tensor, EncodeTimes)> {
        let dev = self.vit.post_layernorm.weight.device();
        let started = std::time::Instant::now();
        let dtype = self.vit.post_layernorm.weight.dtype();
        let t = pixel_values.dim(0)?;
        let mut parts = Vec::new();
        let step = self.frame_batch.max(1);
        for start in (0..t).step_by(step) {
            let px = pixel_values
                .narrow(0, start, step.min(t - start))?
                .to_device(dev)?
                .to_dtype(dtype)?;
            parts.push(self.vit.forward_wo_norm(&px)?.to_dtype(DType::F16)?);
        }
        let features = Tensor::cat(&parts, 0)?; // [T, N, D] f16
        dev.synchronize()?;
        let vit_seconds = started.elapsed().as_secs_f64();
        tracing::info!("ViT: {t} frames in {vit_seconds:.2} s, {step} a pass");
        let started = std::time::Instant::now();
        let embeds = self.clip.forward(&features.to_dtype(dtype)?)?; // [T, E]
        dev.synchronize()?;
        let times = EncodeTimes {
            frames: t,
            vit_seconds,
            clip_seconds: started.elapsed().as_secs_f64(),
        };
        Ok((features, embeds, times))
    }
}

/// Where encoding time went: frames through the ViT, seconds in it and in the CLIP branch.
#[derive(Debug, Clone, Copy, Default)]
pub struct EncodeTimes {
    pub frames: usize,
    pub vit_seconds: f64,
    pub clip_seconds: f64,
}

impl EncodeTimes {
    fn add(&mut self, o: EncodeTimes) {
        self.frames += o.frames;
        self.vit_seconds += o.vit_seconds;
        self.clip_seconds += o.clip_seconds;
    }
}

/// Settings of [`extract_features`].
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// T, frames sampled per video.
    pub num_frames: usize,
    /// Decoding threads.
    pub jobs: usize,
    /// Recompute videos that are already stored.
    pub overwrite: bool,
    pub writer: WriterOptions,
    /// What makes the features (stored with each video; see [`crate::features::provenance`]).
    /// Stored videos made otherwise, or with another T, are an error unless `overwrite`. None:
    /// not known (only T is compared, and nothing is recorded).
    pub extractor: Option<Extractor>,
    /// Store the CLIP frame embeddings and frame times only, not the ViT features (training then
    /// runs the ViT on the decoded frames, `[data] online_vit`). A video stored without features
    /// is recomputed by a run that wants them.
    pub embeddings_only: bool,
    /// Set (by a SIGINT/SIGTERM handler) to stop after the video being encoded: the videos
    /// done so far are written to the store, and the call returns an error saying so.
    pub interrupted: Option<&'static AtomicBool>,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        Self {
            num_frames: 32,
            jobs: 2,
            overwrite: false,
            writer: WriterOptions::default(),
            extractor: None,
            embeddings_only: false,
            interrupted: None,
        }
    }
}

/// Progress of [`extract_features`].
#[derive(Debug)]
pub enum ExtractProgress<'a> {
    /// `total` videos given, `skipped` of them already stored.
    Start {
        total: usize,
        skipped: usize,
    },
    /// A video's features were computed and handed to the writer.
    Done {
        video: &'a str,
        frames: usize,
    },
    Failed {
        video: &'a str,
        error: &'a str,
    },
}

/// What [`extract_features`] did.
#[derive(Debug, Clone, Default)]
pub struct ExtractReport {
    pub done: usize,
    pub skipped: usize,
    /// (video id, error) per failed video.
    pub failed: Vec<(String, String)>,
    /// The encoding of the videos done and of those whose record the store then refused.
    pub encoding: EncodeTimes,
}

/// Computes and stores the features of every job not yet in the store at `store_dir`.
pub fn extract_features(
    store_dir: &Path,
    jobs: &[VideoJob],
    source: &dyn FrameSource,
    models: &FeatureModels<'_>,
    opts: &ExtractOptions,
    progress: &mut dyn FnMut(ExtractProgress<'_>),
) -> Result<ExtractReport> {
    ensure!(opts.num_frames > 0, "--num-frames must be at least 1");
    let mut ids = std::collections::HashSet::new();
    for j in jobs {
        ensure!(
            ids.insert(j.id.as_str()),
            "video id {} is given twice (e.g. {})",
            j.id,
            j.path.display()
        );
    }
    let writer = StoreWriter::open(store_dir, opts.writer.clone())?;
    let mut todo: Vec<&VideoJob> = plan_videos(
        writer.index(),
        store_dir,
        jobs,
        opts.num_frames,
        opts.extractor.as_ref(),
        opts.overwrite,
    )?;
    if !opts.embeddings_only {
        // Videos stored without their features are not done for a run that stores them.
        let planned: std::collections::HashSet<&str> = todo.iter().map(|j| j.id.as_str()).collect();
        let idx = writer.index();
        let without: Vec<&VideoJob> = jobs
            .iter()
            .filter(|j| !planned.contains(j.id.as_str()) && idx.videos.get(&j.id).is_some_and(|v| v.features.is_none()))
            .collect();
        todo.extend(without);
    }
    let mut report = ExtractReport {
        skipped: jobs.len() - todo.len(),
        ..Default::default()
    };
    progress(ExtractProgress::Start {
        total: jobs.len(),
        skipped: report.skipped,
    });
    if todo.is_empty() {
        writer.finish()?;
        return Ok(report);
    }

    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let workers = opts.jobs.max(1).min(todo.len());
    let result = std::thread::scope(|scope| -> Result<()> {
        let frames_rx = spawn_decoders(scope, workers, &todo, source, opts, &next, &stop)?;
        let meta = writer.index().meta;
        let (rec_tx, write_thread) = spawn_store_writer(scope, writer)?;
        // The model, on this thread.
        let ran = encode_videos(&frames_rx, &todo, models, opts, meta, &rec_tx, &mut report, progress);
        stop.store(true, Ordering::Relaxed);
        drop(frames_rx);
        drop(rec_tx);
        let wrote = write_thread.join().map_err(|_| anyhow!("the store writer thread panicked"))?;
        // A writer error explains a failed send; report it first.
        wrote.and(ran)
    });
    result?;
    Ok(report)
}

/// Decoded frames of the `todo` job at an index (or why they could not be read).
type Decoded = (usize, Result<VideoFrames>);

/// Starts `workers` decoding threads that take the next job of `todo` until it is done or `stop` is
/// set, and send its checked frames down the returned channel.
fn spawn_decoders<'scope, 'env>(
    scope: &'scope Scope<'scope, 'env>,
    workers: usize,
    todo: &'env [&'env VideoJob],
    source: &'env dyn FrameSource,
    opts: &'env ExtractOptions,
    next: &'env AtomicUsize,
    stop: &'env AtomicBool,
) -> Result<Receiver<Decoded>> {
    let (frames_tx, frames_rx) = sync_channel::<Decoded>(workers);
    for w in 0..workers {
        let tx = frames_tx.clone();
        std::thread::Builder::new()
            .name(format!("gcg-decode-{w}"))
            .spawn_scoped(scope, move || loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = todo.get(i) else { return };
                let frames = source
                    .frames(job, opts.num_frames)
                    .and_then(|f| check_frames(f, opts.num_frames))
                    .with_context(|| format!("reading the frames of {}", job.path.display()));
                if tx.send((i, frames)).is_err() {
                    return;
                }
            })
            .context("starting a decoding thread")?;
    }
    drop(frames_tx);
    Ok(frames_rx)
}

/// Starts the thread that adds each record it receives to the store and finishes the store.
#[allow(clippy::type_complexity)]
fn spawn_store_writer<'scope>(
    scope: &'scope Scope<'scope, '_>,
    writer: StoreWriter,
) -> Result<(SyncSender<VideoRecord>, ScopedJoinHandle<'scope, Result<()>>)> {
    let (rec_tx, rec_rx) = sync_channel::<VideoRecord>(2);
    let write_thread = std::thread::Builder::new()
        .name("gcg-store-writer".into())
        .spawn_scoped(scope, move || -> Result<()> {
            let mut writer = writer;
            for rec in rec_rx {
                writer.add_video(rec)?;
            }
            writer.finish()?;
            Ok(())
        })
        .context("starting the store writer thread")?;
    Ok((rec_tx, write_thread))
}

/// Encodes each decoded video and sends its record to the store writer; a video that could not be
/// read or encoded is reported as failed and skipped.
#[allow(clippy::too_many_arguments)]
fn encode_videos(
    frames_rx: &Receiver<Decoded>,
    todo: &[&VideoJob],
    models: &FeatureModels<'_>,
    opts: &ExtractOptions,
    mut meta: Option<StoreMeta>,
    rec_tx: &SyncSender<VideoRecord>,
    report: &mut ExtractReport,
    progress: &mut dyn FnMut(ExtractProgress<'_>),
) -> Result<()> {
    for (i, frames) in frames_rx.iter() {
        if opts.interrupted.as_ref().is_some_and(|f| f.load(Ordering::Relaxed)) {
            bail!(
                "interrupted: the {} videos encoded are written to the store, {} are not done; the same command continues",
                report.done,
                todo.len() - report.done - report.failed.len()
            );
        }
        let job = todo[i];
        let rec = frames.and_then(|f| {
            let (features, embeds, times) = models
                .encode_timed(&f.pixel_values)
                .with_context(|| format!("encoding video {}", job.id))?;
            report.encoding.add(times);
            let mut rec = VideoRecord::from_tensors(job.id.clone(), &features, &embeds, f.timestamps)?;
            rec.duration = f.duration;
            rec.fps = f.fps;
            // Absolute: the online ViT decodes the video again from here.
            let source = std::path::absolute(&job.path).unwrap_or_else(|_| job.path.clone());
            rec.source = Some(source.display().to_string());
            // None where the frames came from elsewhere than a file or folder at the job's path.
            rec.source_fingerprint = crate::features::provenance::source_fingerprint(&job.path).ok();
            rec.extractor = opts.extractor.clone();
            if opts.embeddings_only {
                rec = rec.without_features();
            }
            // What the writer would refuse is this video's failure, not the run's.
            rec.check()?;
            if let Some(m) = meta {
                ensure!(
                    rec.meta() == m,
                    "video {}: features [T, {}, {}] with CLIP width {}, but the store holds [T, {}, {}] with CLIP width {} \
                     (other networks: use another --store)",
                    rec.id,
                    rec.features_shape[1],
                    rec.features_shape[2],
                    rec.embed_dim,
                    m.tokens,
                    m.width,
                    m.embed_dim
                );
            }
            Ok(rec)
        });
        match rec {
            Ok(rec) => {
                meta.get_or_insert(rec.meta());
                let frames = rec.num_frames();
                rec_tx.send(rec).map_err(|_| anyhow!("the store writer stopped (see its error)"))?;
                report.done += 1;
                progress(ExtractProgress::Done { video: &job.id, frames });
            }
            Err(e) => {
                let err = format!("{e:#}");
                progress(ExtractProgress::Failed {
                    video: &job.id,
                    error: &err,
                });
                report.failed.push((job.id.clone(), err));
            }
        }
    }
    Ok(())
}

/// T finite frames with sane times (see [`crate::store::check_times`]), or an error.
fn check_frames(f: VideoFrames, t: usize) -> Result<VideoFrames> {
    let dims = f.pixel_values.dims().to_vec();
    ensure!(
        dims.len() == 4 && dims[0] == t && dims[1] == 3,
        "frames of shape {dims:?}, expected [{t}, 3, S, S]"
    );
    ensure!(
        f.timestamps.is_empty() || f.timestamps.len() == t,
        "{} timestamps for {t} frames",
        f.timestamps.len()
    );
    // Read in place (no copy of the frames), whatever their float type.
    if let Some(bad) = crate::util::non_finite(&f.pixel_values)? {
        anyhow::bail!(
            "the input frames (pixel values [T, 3, S, S] = {dims:?}) hold {} — not encoded",
            bad.describe(&dims)
        );
    }
    crate::store::check_times(&f.timestamps, f.duration, f.fps).context("the frame times")?;
    Ok(f)
}

/// The jobs to compute: those not stored yet, and (with `overwrite`) all. Without `overwrite`,
/// stored videos made with another T or extractor are an error listing them; so is a run that
/// would leave the store with videos of different T. Stored videos of unknown provenance (older
/// gcg) count as made alike, with a warning.
pub fn plan_videos<'a>(
    index: &Index,
    store_dir: &Path,
    jobs: &'a [VideoJob],
    num_frames: usize,
    extractor: Option<&Extractor>,
    overwrite: bool,
) -> Result<Vec<&'a VideoJob>> {
    let mut todo = Vec::new();
    let mut differ: std::collections::BTreeMap<String, Vec<&str>> = Default::default();
    let mut unknown = Vec::new();
    let mut changed = Vec::new();
    for j in jobs {
        let Some(v) = index.videos.get(&j.id) else {
            todo.push(j);
            continue;
        };
        if overwrite {
            todo.push(j);
            continue;
        }
        // A file replaced under the same id (a re-encode, another video of that name) is
        // recomputed, not kept with the old file's features.
        if let Some(stored) = &v.source_fingerprint {
            match crate::features::provenance::source_fingerprint(&j.path) {
                Ok(now) if now != *stored => {
                    changed.push(j.id.as_str());
                    todo.push(j);
                    continue;
                }
                // Unreadable now (deleted after its extraction, say): its stored features stand.
                Ok(_) | Err(_) => {}
            }
        }
        let mut d = Vec::new();
        if v.num_frames != num_frames {
            d.push(format!("T = {}, this run asks T = {num_frames}", v.num_frames));
        }
        match (&v.extractor, extractor) {
            (Some(a), Some(b)) => d.extend(a.difference(b)),
            (None, Some(_)) => unknown.push(j.id.as_str()),
            _ => {}
        }
        if !d.is_empty() {
            differ.entry(d.join("; ")).or_default().push(j.id.as_str());
        }
    }
    if !differ.is_empty() {
        let lines: Vec<String> = differ
            .iter()
            .map(|(d, ids)| {
                format!(
                    "{} videos in {} were extracted with {d} (e.g. {})",
                    ids.len(),
                    store_dir.display(),
                    ids[..ids.len().min(3)].join(", ")
                )
            })
            .collect();
        anyhow::bail!("{}\ngive --overwrite to recompute them, or use another --store", lines.join("\n"));
    }
    if !changed.is_empty() {
        tracing::warn!(
            "{} stored videos (e.g. {}) are not the files their features in {} were made from (size or content \
             differ); recomputing them",
            changed.len(),
            changed[..changed.len().min(3)].join(", "),
            store_dir.display()
        );
    }
    if !unknown.is_empty() {
        tracing::warn!(
            "{} videos in {} (e.g. {}) were stored by an older gcg that did not record how they were extracted; \
             they are taken as made with this run's settings (--overwrite recomputes them)",
            unknown.len(),
            store_dir.display(),
            unknown[0]
        );
    }
    if !todo.is_empty() {
        let redone: std::collections::HashSet<&str> = todo.iter().map(|j| j.id.as_str()).collect();
        let kept: Vec<(&String, usize)> = index
            .videos
            .iter()
            .filter(|(id, v)| !redone.contains(id.as_str()) && v.num_frames != num_frames)
            .map(|(id, v)| (id, v.num_frames))
            .collect();
        if let Some((id, t)) = kept.first() {
            anyhow::bail!(
                "{} videos in {} have T = {t} (e.g. {id}) and this run, which asks T = {num_frames}, does not recompute \
                 them: a store holds videos of one T; list them too with --overwrite, or use another --store",
                kept.len(),
                store_dir.display()
            );
        }
        // Likewise the networks and the sampling: a store whose videos were made by other
        // weights would feed a model features of two kinds (`gcg store verify` calls it mixed).
        if let Some(ex) = extractor {
            let other: Vec<(&String, String)> = index
                .videos
                .iter()
                .filter(|(id, _)| !redone.contains(id.as_str()))
                .filter_map(|(id, v)| v.extractor.as_ref().and_then(|a| a.difference(ex)).map(|d| (id, d)))
                .collect();
            if let Some((id, d)) = other.first() {
                anyhow::bail!(
                    "{} videos in {} were extracted with {d} (e.g. {id}); adding videos made by this run would mix the \
                     two in one store: use the same weights, sampling and precision (--dtype, --matmul-precision), list them too \
                     with --overwrite, or use another --store",
                    other.len(),
                    store_dir.display()
                );
            }
        }
    }
    Ok(todo)
}

/// The frames of a video file or frame folder ([`crate::video::load_frames`]), CLIP
/// pre-processed at the ViT's input size (`image_size`, 224 for EVA ViT-g; the tiny test models
/// take smaller frames: the same resize + centre crop + normalisation at that size).
pub fn decoded_frames(
    job: &VideoJob,
    num_frames: usize,
    sampling: crate::video::Sampling,
    ffmpeg: &crate::video::Ffmpeg,
    image_size: usize,
) -> Result<VideoFrames> {
    let sampled = crate::video::load_frames(&job.path, num_frames, sampling, ffmpeg)?;
    model_frames(&sampled, image_size)
}

/// Sampled frames as a ViT of `image_size` reads them (resized, cropped, normalised as CLIP's
/// pre-processing), with their times.
pub fn model_frames(sampled: &crate::video::SampledFrames, image_size: usize) -> Result<VideoFrames> {
    use crate::video::preprocess::{normalize_chw, resize_and_crop, CLIP_MEAN, CLIP_SIZE, CLIP_STD};
    let cpu = candle_core::Device::Cpu;
    let pixel_values = if image_size == CLIP_SIZE as usize {
        sampled.clip_pixels(1, &cpu)?
    } else {
        let mut data = Vec::with_capacity(sampled.frames.len() * 3 * image_size * image_size);
        for f in &sampled.frames {
            data.extend(normalize_chw(&resize_and_crop(&f.image, image_size as u32)?, CLIP_MEAN, CLIP_STD));
        }
        Tensor::from_vec(data, (sampled.frames.len(), 3, image_size, image_size), &cpu)?
    };
    Ok(VideoFrames {
        pixel_values,
        timestamps: sampled.timestamps().unwrap_or_default(),
        duration: sampled.duration,
        fps: sampled.fps,
    })
}

/// A [`FrameSource`] for pre-decoded frames saved as safetensors: `pixel_values` [T', 3, S, S]
/// (CLIP-pre-processed, any float dtype), optionally `timestamps` [T'] (seconds) and scalar
/// `duration`, `fps` tensors. T frames are taken uniformly (repeating frames, with a warning, when
/// T' < T, as for a short video).
pub fn safetensors_frames(job: &VideoJob, num_frames: usize) -> Result<VideoFrames> {
    let tensors = candle_core::safetensors::load(&job.path, &candle_core::Device::Cpu)
        .with_context(|| format!("reading frames file {}", job.path.display()))?;
    let px = tensors
        .get("pixel_values")
        .ok_or_else(|| anyhow!("frames file {} has no pixel_values tensor", job.path.display()))?
        .to_dtype(DType::F32)?;
    let n = px.dim(0)?;
    ensure!(n >= 1, "frames file {} holds no frames (pixel_values [0, ...])", job.path.display());
    if n < num_frames {
        // As a short video or frame folder: the frames repeat (uniformly), with a warning.
        tracing::warn!(
            "{}: only {n} frames for {num_frames} requested; padded by repeating frames",
            job.path.display()
        );
    }
    let idx = uniform_indices(n, num_frames, UniformRule::RoundExact);
    let sel = Tensor::new(idx.iter().map(|&i| i as u32).collect::<Vec<_>>(), &candle_core::Device::Cpu)?;
    let pixel_values = if n == num_frames { px } else { px.index_select(&sel, 0)? };
    let timestamps = match tensors.get("timestamps") {
        Some(t) => {
            let all = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            ensure!(
                all.len() == n,
                "frames file {}: {} timestamps for {n} frames",
                job.path.display(),
                all.len()
            );
            idx.iter().map(|&i| all[i]).collect()
        }
        None => Vec::new(),
    };
    let scalar = |name: &str| -> Result<Option<f64>> {
        tensors
            .get(name)
            .map(|t| -> Result<f64> {
                let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                ensure!(
                    v.len() == 1,
                    "frames file {}: {name} has shape {:?}, expected one value",
                    job.path.display(),
                    t.dims()
                );
                ensure!(
                    v[0].is_finite() && v[0] > 0.0,
                    "frames file {}: {name} is {}, expected a finite positive number",
                    job.path.display(),
                    v[0]
                );
                Ok(v[0])
            })
            .transpose()
    };
    Ok(VideoFrames {
        pixel_values,
        timestamps,
        duration: scalar("duration")?,
        fps: scalar("fps")?,
    })
}
